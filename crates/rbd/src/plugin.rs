//! The `rbd` plugin: an RBD image as a sluice [`Plugin`], one open image shared by every
//! connection of the export.
//!
//! [`RbdPlugin::new`] only records the options; [`RbdPlugin::connect`] opens the image and
//! is meant to be called once at startup, so that a wrong pool, image or key, or a cluster
//! that is down, fails there with one clear message (the first `open` connects if nobody
//! did). The split exists because librados starts threads: `sluice serve` forks into the
//! background after configuring the plugin, and must connect only in the process that
//! serves.
//!
//! How NBD maps onto librbd, decided here once:
//! - **Thread model** parallel: any number of requests of any connection run at once on the
//!   shared image (see [`crate::image`] for why that is safe and how waiting works).
//! - **Asynchronous** ([`sluice_block::AioHandle`]): read, write (with native FUA), flush,
//!   and trim and zero without FUA are one `rbd_aio_*` request each, answered from librbd's
//!   callback with no thread waiting. A zero or trim with FUA (a flush after it), a range
//!   over [`MAX_CHUNK`], and block status run synchronously.
//! - **FUA** native (the write carries `LIBRADOS_OP_FLAG_FADVISE_FUA`) unless the image's
//!   effective cache policy is `writeback`, where the server emulates it with a flush.
//! - **Flush** `rbd_aio_flush`. **Trim** `rbd_aio_discard`: advisory, as NBD allows; librbd
//!   skips pieces under its discard granularity.
//! - **Zero** `rbd_aio_write_zeroes`, exact at any alignment. Without MAY_TRIM (NBD's
//!   NO_HOLE) the range must stay allocated, so it is written thick
//!   (`RBD_WRITE_ZEROES_FLAG_THICK_PROVISION`), as qemu's rbd driver does; that writes
//!   zeroes, so FAST_ZERO then fails with ENOTSUP. With MAY_TRIM librbd deallocates or uses
//!   the OSD's zero operation, which moves no data: fast zero is honoured.
//! - **Block status** from `rbd_diff_iterate2` over the head (parents included,
//!   `whole_object=false`): what it reports is data, everything else reads as zeroes and is
//!   a hole. librbd's answer is coarse (an object's whole written span, without a
//!   from-snapshot) but never too small, so data is never reported as a hole. One answer
//!   covers at most [`MAX_STATUS_OBJECTS`] objects; the client asks again for the rest.
//! - **Multi-conn** advertised: all connections share one image handle, so a flush on any
//!   of them flushes the writes of all (nbdkit's condition for multi-conn). Other hosts
//!   writing the same image are a different matter, guarded by RBD's exclusive lock.
//! - **Cache** not offered: with librbd's default cache policy reads are not cached, so a
//!   read-ahead hint would only cost a read.
//! - **Snapshots** are opened read-only, and so is everything for a read-only export (which
//!   then never takes the image's exclusive lock).

use std::sync::{Arc, Mutex, OnceLock};

use sluice_block::extents::{EXTENT_HOLE, EXTENT_ZERO};
use sluice_block::plugins::{ConfigArg, ConfigError};
use sluice_block::{
    AioHandle, AioKind, AioRequest, AioSink, BlockError, Declined, Errno, Extents, Flags, Handle,
    OpenContext, Plugin, Result, Support,
};

use crate::error::RbdError;
use crate::image::{AioOp, DiffExtent, Image, MAX_CHUNK};
use crate::options::RbdOptions;

/// The plugin's name, as in `sluice serve rbd`.
pub const NAME: &str = "rbd";

/// The most objects one block-status answer covers (bounds the time librbd spends listing
/// them: without the object map it asks the OSD about each).
pub const MAX_STATUS_OBJECTS: u64 = 256;

/// An RBD image served over NBD.
pub struct RbdPlugin {
    opts: RbdOptions,
    readonly: bool,
    image: OnceLock<Arc<Image>>,
    /// Serialises connecting, so two first clients do not both connect.
    connecting: Mutex<()>,
}

impl std::fmt::Debug for RbdPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbdPlugin")
            .field("opts", &self.opts)
            .field("readonly", &self.readonly)
            .field("image", &self.image.get())
            .finish()
    }
}

impl RbdPlugin {
    /// A plugin for the image `opts` describes, not connected yet. With `readonly` the image
    /// is opened read-only (as it always is for a snapshot).
    pub fn new(opts: RbdOptions, readonly: bool) -> RbdPlugin {
        RbdPlugin {
            opts,
            readonly,
            image: OnceLock::new(),
            connecting: Mutex::new(()),
        }
    }

    /// Configures from nbdkit-style parameters (see [`crate::options::HELP`]).
    pub fn from_args(args: &[ConfigArg], readonly: bool) -> Result<RbdPlugin, ConfigError> {
        Ok(RbdPlugin::new(RbdOptions::from_args(args)?, readonly))
    }

    pub fn options(&self) -> &RbdOptions {
        &self.opts
    }

    /// The open image, if [`RbdPlugin::connect`] succeeded.
    pub fn image(&self) -> Option<&Arc<Image>> {
        self.image.get()
    }

    /// Connects to the cluster and opens the image, once; later calls return the same
    /// image. Fails within the configured timeout when the cluster is unreachable.
    pub fn connect(&self) -> Result<&Arc<Image>, RbdError> {
        if let Some(image) = self.image.get() {
            return Ok(image);
        }
        let _guard = self.connecting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(image) = self.image.get() {
            return Ok(image);
        }
        let image = Arc::new(Image::open(&self.opts, self.readonly)?);
        Ok(self.image.get_or_init(|| image))
    }
}

impl Plugin for RbdPlugin {
    fn name(&self) -> &str {
        NAME
    }

    fn version(&self) -> Option<&str> {
        Some(env!("CARGO_PKG_VERSION"))
    }

    fn open(&self, ctx: &OpenContext<'_>) -> Result<Box<dyn Handle>> {
        let image = self.connect()?.clone();
        let size = image.size()?;
        Ok(Box::new(RbdHandle {
            writable: image.writable() && !ctx.readonly,
            image,
            size,
        }))
    }

    fn dump(&self) -> Vec<String> {
        dump_lines()
    }
}

/// The plugin's own `--dump-plugin` lines: which librbd and librados this process loads.
pub fn dump_lines() -> Vec<String> {
    match crate::sys::api() {
        Ok(api) => vec![
            format!("rbd_librbd_version={}", crate::sys::librbd_version(api)),
            format!("rbd_librados_version={}", crate::sys::librados_version(api)),
        ],
        Err(e) => vec![format!("rbd_library_error={e}")],
    }
}

/// One connection's view: the shared image, and what this connection may do with it.
struct RbdHandle {
    image: Arc<Image>,
    writable: bool,
    /// The size when the connection opened (NBD fixes it for the connection's lifetime).
    size: u64,
}

impl Handle for RbdHandle {
    fn get_size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn can_write(&self) -> Result<bool> {
        Ok(self.writable)
    }
    fn can_flush(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_trim(&self) -> Result<bool> {
        Ok(self.writable)
    }
    fn can_zero(&self) -> Result<Support> {
        Ok(Support::Native)
    }
    fn can_fast_zero(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_fua(&self) -> Result<Support> {
        Ok(if self.image.native_fua() {
            Support::Native
        } else {
            Support::Emulate
        })
    }
    fn can_multi_conn(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_cache(&self) -> Result<Support> {
        Ok(Support::None)
    }
    fn can_extents(&self) -> Result<bool> {
        Ok(true)
    }

    fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        Ok(self.image.read(buf, offset)?)
    }

    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        Ok(self.image.write(buf, offset, flags.contains(Flags::FUA))?)
    }

    fn flush(&self, _flags: Flags) -> Result<()> {
        Ok(self.image.flush()?)
    }

    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        Ok(self
            .image
            .discard(offset, count, flags.contains(Flags::FUA))?)
    }

    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let thick = !flags.contains(Flags::MAY_TRIM);
        if thick && flags.contains(Flags::FAST_ZERO) {
            return Err(BlockError::new(
                Errno::ENOTSUP,
                "rbd: zeroing without deallocating writes zeroes, which is not fast",
            ));
        }
        Ok(self
            .image
            .write_zeroes(offset, count, thick, flags.contains(Flags::FUA))?)
    }

    fn aio(&self) -> Option<&dyn AioHandle> {
        Some(self)
    }

    fn extents(&self, count: u64, offset: u64, _flags: Flags, extents: &mut Extents) -> Result<()> {
        let cap = MAX_STATUS_OBJECTS.saturating_mul(self.image.object_size().max(4096));
        let end = offset
            .saturating_add(count.min(cap))
            .min(self.size.max(offset));
        if end <= offset {
            return extents.add(offset, count, EXTENT_HOLE | EXTENT_ZERO);
        }
        let allocated = self.image.allocated(offset, end - offset)?;
        fill_extents(offset, end, &allocated, extents)
    }
}

/// Read, write (FUA included where native), flush, and trim and zero without FUA go out as
/// one `rbd_aio_*` request each and are answered from its completion. What needs a second
/// request (a flush after a zero or trim with FUA, pieces of a range over [`MAX_CHUNK`]) or
/// fails before librbd (thick zero with FAST_ZERO) runs synchronously, as does block status
/// (`rbd_diff_iterate2` has no asynchronous form).
impl AioHandle for RbdHandle {
    fn can_submit(&self, req: &AioRequest) -> bool {
        let fua = req.flags.contains(Flags::FUA);
        match req.kind {
            AioKind::Read | AioKind::Flush => true,
            AioKind::Write => !fua || self.image.native_fua(),
            AioKind::Trim => !fua && req.count <= MAX_CHUNK,
            AioKind::Zero => {
                let thick = !req.flags.contains(Flags::MAY_TRIM);
                !fua && req.count <= MAX_CHUNK && !(thick && req.flags.contains(Flags::FAST_ZERO))
            }
        }
    }

    fn submit(
        &self,
        req: &AioRequest,
        buf: Vec<u8>,
        sink: &Arc<dyn AioSink>,
        tag: usize,
    ) -> std::result::Result<(), Declined> {
        if !self.can_submit(req) {
            return Err(Declined::Sync(buf));
        }
        let len = req.count as usize;
        let op = match req.kind {
            AioKind::Read => AioOp::Read { at: req.at, len },
            AioKind::Write => AioOp::Write {
                at: req.at,
                len,
                fua: req.flags.contains(Flags::FUA),
            },
            AioKind::Flush => AioOp::Flush,
            AioKind::Trim => AioOp::Discard { len: req.count },
            AioKind::Zero => AioOp::WriteZeroes {
                len: req.count,
                thick: !req.flags.contains(Flags::MAY_TRIM),
            },
        };
        let sink = sink.clone();
        let done = move |buf, r: std::result::Result<(), RbdError>| {
            sink.complete(tag, buf, r.map_err(BlockError::from));
        };
        self.image
            .submit(op, req.offset, buf, done)
            .map_err(|(buf, e)| Declined::Failed(buf, e.into()))
    }
}

/// Describes `[offset, end)` from librbd's diff: every range reported as existing is data
/// (overlapping reports, from a clone and its parent, are merged, data winning); the rest
/// reads as zeroes and is unallocated.
fn fill_extents(offset: u64, end: u64, diff: &[DiffExtent], out: &mut Extents) -> Result<()> {
    const HOLE: u32 = EXTENT_HOLE | EXTENT_ZERO;
    let mut pos = offset;
    for e in diff.iter().filter(|e| e.exists) {
        let start = e.offset.max(pos);
        let stop = e.offset.saturating_add(e.length).min(end);
        if stop <= start {
            continue;
        }
        if start > pos {
            out.add(pos, start - pos, HOLE)?;
        }
        out.add(start, stop - start, 0)?;
        pos = stop;
    }
    if pos < end {
        out.add(pos, end - pos, HOLE)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOLE: u32 = EXTENT_HOLE | EXTENT_ZERO;

    fn d(offset: u64, length: u64, exists: bool) -> DiffExtent {
        DiffExtent {
            offset,
            length,
            exists,
        }
    }

    fn fill(offset: u64, end: u64, diff: &[DiffExtent]) -> Vec<(u64, u64, u32)> {
        let mut e = Extents::new(offset, end);
        fill_extents(offset, end, diff, &mut e).unwrap();
        e.as_slice()
            .iter()
            .map(|x| (x.offset, x.length, x.kind))
            .collect()
    }

    #[test]
    fn fill_extents_nothing_allocated_is_one_hole() {
        assert_eq!(fill(0, 100, &[]), [(0, 100, HOLE)]);
    }

    #[test]
    fn fill_extents_data_between_holes_clipped_to_range() {
        // Objects of 4 MiB reported whole, the query in the middle of them.
        let m = 1 << 20;
        let got = fill(3 * m, 13 * m, &[d(0, 4 * m, true), d(8 * m, 4 * m, true)]);
        assert_eq!(
            got,
            [
                (3 * m, m, 0),
                (4 * m, 4 * m, HOLE),
                (8 * m, 4 * m, 0),
                (12 * m, m, HOLE)
            ]
        );
    }

    #[test]
    fn fill_extents_overlaps_merge_and_data_wins() {
        // A clone's "known zero" report overlapping its parent's data stays data.
        let got = fill(
            0,
            100,
            &[
                d(0, 50, false),
                d(10, 30, true),
                d(20, 40, true),
                d(70, 5, false),
            ],
        );
        assert_eq!(got, [(0, 10, HOLE), (10, 50, 0), (60, 40, HOLE)]);
    }

    #[test]
    fn new_does_not_connect() {
        let p = RbdPlugin::new(RbdOptions::new("rbd", "x"), false);
        assert!(p.image.get().is_none());
        assert_eq!(p.name(), "rbd");
    }
}
