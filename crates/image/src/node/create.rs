//! Making images and changing their size: what `blockdev-create` and `block_resize` do.
//!
//! **Creating.** A `file` image is made with plain file calls ([`create_file`]), as qemu's
//! file-posix does: create, truncate to zero, grow to the size, then preallocate as asked.
//! A qcow2 image is formatted onto an open `file` node ([`Node::format_qcow2`]) by imago's
//! own builder, through the node's descriptor (so its image lock keeps other processes
//! out while it is written). imago writes a version 3 header without lazy refcounts; the
//! two header settings it has no option for (`version: v2`, `lazy-refcounts`) are then
//! patched into the first cluster with sluice's header encoder, in one write and an
//! `fdatasync`, before anyone opens the image. The checks run first, in qemu's order and
//! with its messages, so that a refused request leaves the file as it was. imago's header
//! writes are held back until its refcount blocks are written (`storage::HeaderLast`), so
//! that a crash while an image is made (kill -9 while `drive-mirror` or
//! `blockdev-snapshot-sync` creates one) leaves a file without a header or a clean image,
//! never a header naming an L1 table whose refcount is still 0.
//!
//! **Resizing.** imago's resize needs exclusive access to its image object, which other
//! nodes share (a backing node's object is read by the nodes above it). So a resize, like
//! a backing switch (`jobs.rs`), happens under the exclusive `io` lock on a fresh imago
//! object over the same file: flush, open, resize, flush, and swap the new view in. The
//! `file` node below a format node is refreshed the same way, so that both report the
//! new file length. Callers refuse nodes that others use (the daemon's permission rules).
//! A qcow2 grow moves the L1 table to a new cluster, frees the old one and may put an L2
//! table there at once, all before the new header is written. So the old table's clusters
//! are pinned first (one more reference in the refcount block, durable: imago's free then
//! leaves them in use), the resizing object works through `HeaderLast` (the header's new L1
//! pointer reaches the file after the new table's refcount), and the pin is dropped once
//! the new header is durable ([`resize_qcow2`]): a kill at any write leaves the old image
//! or the new one, with leaked clusters at most. The file's `OrderedFile` then holds back L1
//! writes where the table now is.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use imago::format::PreallocateMode;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{FormatAccess, FormatCreateBuilder};

use super::open::read_header;
use super::{Layer, Node, Qcow2Info, Storage, View};
use crate::error::ImageError;
use crate::header::HeaderError;
use crate::options::Driver;
use crate::qcow2_bitmaps;
use crate::refcounts::{Io, RefcountError, Refcounts};
use crate::storage::HeaderLast;

/// How much of a new image is allocated up front (QAPI's `PreallocMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prealloc {
    #[default]
    Off,
    /// qcow2: the mapping tables (every cluster mapped, reading as zeroes).
    Metadata,
    /// `posix_fallocate` (qcow2: metadata as well).
    Falloc,
    /// Zeroes written (qcow2: metadata as well).
    Full,
}

impl Prealloc {
    /// QAPI's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Prealloc::Off => "off",
            Prealloc::Metadata => "metadata",
            Prealloc::Falloc => "falloc",
            Prealloc::Full => "full",
        }
    }
}

/// The options of a new qcow2 image (`BlockdevCreateOptionsQcow2`), defaults applied by
/// the caller as qemu does: version 3, 64 KiB clusters, 16-bit refcounts.
#[derive(Debug, Clone)]
pub struct Qcow2Create {
    pub size: u64,
    /// 2 or 3.
    pub version: u32,
    pub cluster_size: u64,
    pub refcount_bits: u64,
    pub lazy_refcounts: bool,
    pub preallocation: Prealloc,
    /// The backing file name written into the header, and its format.
    pub backing_file: Option<String>,
    pub backing_fmt: Option<String>,
}

impl Default for Qcow2Create {
    fn default() -> Self {
        Qcow2Create {
            size: 0,
            version: 3,
            cluster_size: 65536,
            refcount_bits: 16,
            lazy_refcounts: false,
            preallocation: Prealloc::Off,
            backing_file: None,
            backing_fmt: None,
        }
    }
}

impl Qcow2Create {
    /// qemu's checks of `qcow2_co_create`, in its order and words.
    pub fn check(&self) -> Result<(), String> {
        if !self.size.is_multiple_of(512) {
            return Err("Image size must be a multiple of 512 bytes".into());
        }
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return Err("Cluster size must be a power of two between 512 and 2048k".into());
        }
        if self.backing_file.is_some() && self.preallocation != Prealloc::Off {
            return Err(
                "Backing file and preallocation can only be used at the same time if \
                 extended_l2 is on"
                    .into(),
            );
        }
        if self.backing_fmt.is_some() && self.backing_file.is_none() {
            return Err("Backing format cannot be used without backing file".into());
        }
        if self.version < 3 && self.lazy_refcounts {
            return Err(
                "Lazy refcounts only supported with compatibility level 1.1 and above \
                        (use version=v3 or greater)"
                    .into(),
            );
        }
        if self.version < 3 && self.refcount_bits != 16 {
            return Err(
                "Different refcount widths than 16 bits require compatibility level \
                        1.1 or above (use version=v3 or greater)"
                    .into(),
            );
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return Err("Refcount width must be a power of two and may be at most 64 bits".into());
        }
        Ok(())
    }
}

/// Creates (or truncates) the image file `path` with `size` bytes, as qemu's file-posix
/// `blockdev-create` does.
pub fn create_file(path: &Path, size: u64, prealloc: Prealloc) -> Result<(), String> {
    if prealloc == Prealloc::Metadata {
        return Err("Unsupported preallocation mode: metadata".into());
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        // Cleared below with its own error message, as qemu does.
        .truncate(false)
        .mode(0o644)
        .open(path)
        .map_err(|e| {
            format!(
                "Could not create '{}': {}",
                path.display(),
                sluice_block::error::strerror(&e)
            )
        })?;
    let fail = |what: &str, e: std::io::Error| {
        format!(
            "Could not {what} '{}': {}",
            path.display(),
            sluice_block::error::strerror(&e)
        )
    };
    f.set_len(0).map_err(|e| fail("clear", e))?;
    match prealloc {
        Prealloc::Off | Prealloc::Metadata => f.set_len(size).map_err(|e| fail("resize", e))?,
        Prealloc::Falloc => {
            if size > 0 {
                // SAFETY: a valid descriptor that `f` owns for the call; no memory is passed.
                let r = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, size as i64) };
                if r != 0 {
                    return Err(fail("preallocate", std::io::Error::from_raw_os_error(r)));
                }
            }
        }
        Prealloc::Full => {
            let chunk = vec![0u8; 1 << 20];
            let mut at = 0;
            while at < size {
                let n = (size - at).min(chunk.len() as u64) as usize;
                f.write_all_at(&chunk[..n], at)
                    .map_err(|e| fail("write zeroes to", e))?;
                at += n as u64;
            }
        }
    }
    f.sync_all().map_err(|e| fail("sync", e))
}

/// Writes a new qcow2 image of `o` into the empty `storage` with imago's builder, its header
/// held back until what it names is counted ([`HeaderLast`]): a crash meanwhile leaves no
/// image, or one of size 0 (clean for `qemu-img check`, at most with leaked clusters).
/// The storage imago writes a qcow2 image's metadata through while it creates or resizes
/// one: both write the header's pointer to a newly placed L1 table at once, the new
/// cluster's refcount still in imago's cache, so the header is held back until that
/// refcount is written ([`HeaderLast`]).
fn header_last(storage: Storage, cluster_size: u64) -> Storage {
    Arc::new(HeaderLast::new(storage, cluster_size))
}

/// A qcow2 image's L1 table clusters, from its header.
fn l1_clusters(h: &crate::header::Qcow2Header) -> std::ops::Range<u64> {
    let cs = 1u64 << h.cluster_bits;
    let r = h.l1_range();
    r.start..r.start + (r.end - r.start).div_ceil(cs) * cs
}

fn refcounts_of(io: &dyn Io, h: &crate::header::Qcow2Header) -> Result<Refcounts, RefcountError> {
    Refcounts::load(
        io,
        h.cluster_bits,
        h.refcount_order,
        h.refcount_table_offset,
        h.refcount_table_clusters,
    )
}

/// Resizes the qcow2 image in `io` (the same file as `storage`) to `new_size` through a
/// new imago object over `storage` that `open` makes, in an order a crash at any write
/// leaves consistent (see the module doc): the current L1 table's clusters are pinned
/// (one more reference, durable) so that imago's grow, which frees the table it replaces,
/// cannot reuse them while the header on disk still names them; imago works through
/// [`header_last`]; once its new header is durable the pin is dropped. A crash between
/// leaks the pinned clusters at most.
fn resize_qcow2(
    io: &dyn Io,
    storage: Storage,
    open: impl FnOnce(Storage) -> std::io::Result<Layer>,
    new_size: u64,
) -> std::io::Result<()> {
    let rc_err = |e: RefcountError| std::io::Error::other(e.to_string());
    let before =
        qcow2_bitmaps::read_header(io).map_err(|e| std::io::Error::other(e.to_string()))?;
    let pinned = l1_clusters(&before);
    if !pinned.is_empty() {
        let mut rc = refcounts_of(io, &before).map_err(rc_err)?;
        rc.pin(io, pinned.clone()).map_err(rc_err)?;
        rc.commit(io).map_err(rc_err)?;
    }
    let cluster_size = 1u64 << before.cluster_bits;
    let mut layer = open(header_last(storage, cluster_size))?;
    resize_layer(&mut layer, new_size, true)?;
    drop(layer);
    if !pinned.is_empty() {
        // The header now on disk (imago may have grown the refcount table too).
        let after =
            qcow2_bitmaps::read_header(io).map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut rc = refcounts_of(io, &after).map_err(rc_err)?;
        rc.free(io, pinned).map_err(rc_err)?;
        rc.commit(io).map_err(rc_err)?;
    }
    Ok(())
}

/// Grows or shrinks `layer` to `new_size` and makes it durable. A grown range reads as
/// zeroes, never as backing data: a qcow2 layer allocates it zeroed.
fn resize_layer(layer: &mut Layer, new_size: u64, qcow2: bool) -> std::io::Result<()> {
    let old = layer.size();
    if new_size > old {
        let mode = if qcow2 {
            PreallocateMode::Zero
        } else {
            PreallocateMode::None
        };
        layer.resize_grow(new_size, mode)?;
    } else if new_size < old {
        layer.resize_shrink(new_size)?;
    }
    layer.flush()?;
    layer.sync()
}

fn create_qcow2(storage: Storage, o: &Qcow2Create) -> std::io::Result<()> {
    // imago's `full` writes the data; `falloc` allocates it.
    let mode = match o.preallocation {
        Prealloc::Off => PreallocateMode::None,
        Prealloc::Metadata => PreallocateMode::FormatAllocate,
        Prealloc::Falloc => PreallocateMode::FullAllocate,
        Prealloc::Full => PreallocateMode::WriteData,
    };
    let mut b = Qcow2::<Storage, Arc<Layer>>::create_builder(header_last(storage, o.cluster_size))
        .size(o.size)
        .preallocate(mode)
        .cluster_size(o.cluster_size as usize)
        .refcount_width(o.refcount_bits as usize);
    if let Some(bf) = &o.backing_file {
        let fmt = o.backing_fmt.clone().unwrap_or_default();
        b = b.backing(bf.clone(), fmt);
    }
    b.create()
}

impl Node {
    /// Formats this `file` node's image as qcow2 (`blockdev-create driver=qcow2`), after
    /// [`Qcow2Create::check`]. Whatever the file held is lost.
    pub fn format_qcow2(&self, o: &Qcow2Create) -> Result<(), String> {
        o.check()?;
        if self.driver != Driver::File {
            return Err(format!(
                "Node '{}' is not a file node: sluice formats qcow2 images onto file nodes \
                 only",
                self.name
            ));
        }
        self.check_writable("blockdev-create")
            .map_err(|e| e.to_string())?;
        let path = self.filename.clone();
        let io_err = |e: std::io::Error| format!("Could not format '{}': {e}", path.display());
        let _g = self.io.write();
        let fs = self.file_state();
        // Start from an empty file, as qemu does (it truncates the file to 0 first).
        fs.os.set_len(0).map_err(io_err)?;
        create_qcow2(self.storage().clone(), o).map_err(io_err)?;
        if o.version < 3 || o.lazy_refcounts || o.backing_fmt.is_none() {
            let mut h = read_header(self).map_err(|e| e.to_string())?;
            if o.lazy_refcounts {
                h.compatible_features |= 1;
            }
            if o.backing_fmt.is_none() {
                // imago wrote an empty format extension; qemu writes none.
                h.extensions
                    .retain(|e| e.kind != crate::header::EXT_BACKING_FORMAT);
            }
            if o.version < 3 {
                h.version = 2;
                h.incompatible_features = 0;
                h.compatible_features = 0;
                h.autoclear_features = 0;
                h.extensions
                    .retain(|e| e.kind == crate::header::EXT_BACKING_FORMAT);
            }
            let mut cluster = h.encode().map_err(|e| e.to_string())?;
            if cluster.len() as u64 > o.cluster_size {
                return Err(HeaderError::Unsupported("header too long".into()).to_string());
            }
            cluster.resize(o.cluster_size as usize, 0);
            fs.os
                .write_all_at(&cluster, 0)
                .and_then(|()| fs.os.sync_data())
                .map_err(io_err)?;
        }
        drop(_g);
        self.refresh_layer().map_err(|e| e.to_string())
    }

    /// `block_resize`: makes the node's virtual size `new_size` (grow or shrink; what is cut
    /// off is lost). A raw or qcow2 node's file node follows.
    pub fn resize(&self, new_size: u64) -> Result<(), ImageError> {
        let path = self.filename.clone();
        let io_err = |e: std::io::Error| ImageError::open(&path, e);
        if self.is_read_only() {
            return Err(ImageError::Permission("Image is read-only".into()));
        }
        if self.driver == Driver::Qcow2 && !new_size.is_multiple_of(512) {
            return Err(ImageError::InvalidOption(
                "The new size must be a multiple of 512".into(),
            ));
        }
        {
            let _g = self.io.write();
            self.flush_locked()
                .map_err(|e| io_err(std::io::Error::other(e.to_string())))?;
            let layer = if self.driver == Driver::Qcow2 {
                let open = |storage| {
                    self.qcow2_layer(storage)
                        .map_err(|e| std::io::Error::other(e.to_string()))
                };
                resize_qcow2(
                    &self.file_state().os,
                    self.storage().clone(),
                    open,
                    new_size,
                )
                .map_err(io_err)?;
                // The node's object works on the file itself again.
                self.fresh_layer()?
            } else {
                let mut layer = self.fresh_layer()?;
                resize_layer(&mut layer, new_size, false).map_err(io_err)?;
                layer
            };
            self.swap_layer(layer)?;
            if let Some(q) = &self.view().qcow2 {
                // The L1 entries it writes are held back where the table now is (the view
                // has the header as the resize left it).
                self.file_state()
                    .ordered
                    .defer_l1_writes(q.header.l1_range())
                    .map_err(io_err)?;
            }
        }
        if let Some(f) = &self.file {
            f.refresh_layer()?;
        }
        Ok(())
    }

    /// A new imago object over this node's image, with the current backing.
    fn fresh_layer(&self) -> Result<Layer, ImageError> {
        let path = &self.filename;
        let writable = !self.is_read_only();
        match self.driver {
            Driver::Qcow2 => self.qcow2_layer(self.storage().clone()),
            Driver::Raw | Driver::File | Driver::Blkdebug | Driver::Plugin => {
                let r = Raw::open_image(self.layer_storage().clone(), writable)
                    .map_err(|e| ImageError::open(path, e))?;
                Ok(FormatAccess::new(r))
            }
        }
    }

    /// A new imago object over this (qcow2) node's image through `storage`, with the current
    /// backing.
    fn qcow2_layer(&self, storage: Storage) -> Result<Layer, ImageError> {
        let mut q = Qcow2::<Storage, Arc<Layer>>::open_image(storage, !self.is_read_only())
            .map_err(|e| ImageError::open(&self.filename, e))?;
        q.set_data_file(None);
        q.set_backing(self.backing().map(|b| b.view().layer.clone()));
        Ok(FormatAccess::new(q))
    }

    /// The file node under this format node.
    fn format_file(&self) -> &Node {
        self.file.as_ref().expect("format nodes have a file")
    }

    /// Installs `layer` as this node's imago object, with the header read again (the
    /// caller holds `io` exclusively).
    fn swap_layer(&self, layer: Layer) -> Result<(), ImageError> {
        let qcow2 = match self.driver {
            Driver::Qcow2 => Some(Qcow2Info {
                header: read_header(self.format_file())?,
            }),
            _ => None,
        };
        *self.view.write() = Arc::new(View::new(self.backing(), qcow2, layer));
        Ok(())
    }

    /// Reopens this node's imago object (after its file changed size or format under it).
    fn refresh_layer(&self) -> Result<(), ImageError> {
        let _g = self.io.write();
        let layer = self.fresh_layer()?;
        self.swap_layer(layer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn qcow2_create_check_refuses_as_qemu() {
        let ok = Qcow2Create {
            size: 1 << 20,
            ..Qcow2Create::default()
        };
        assert_eq!(ok.check(), Ok(()));
        let bad = |f: &dyn Fn(&mut Qcow2Create)| {
            let mut o = ok.clone();
            f(&mut o);
            o.check().unwrap_err()
        };
        assert_eq!(
            bad(&|o| o.size = 1000),
            "Image size must be a multiple of 512 bytes"
        );
        assert!(bad(&|o| o.cluster_size = 1000).starts_with("Cluster size must be"));
        assert!(bad(&|o| o.cluster_size = 4 << 20).starts_with("Cluster size must be"));
        assert!(bad(&|o| {
            o.backing_file = Some("b".into());
            o.preallocation = Prealloc::Metadata;
        })
        .starts_with("Backing file and preallocation"));
        assert_eq!(
            bad(&|o| o.backing_fmt = Some("raw".into())),
            "Backing format cannot be used without backing file"
        );
        assert!(bad(&|o| {
            o.version = 2;
            o.lazy_refcounts = true;
        })
        .starts_with("Lazy refcounts only supported"));
    }

    #[test]
    fn create_file_sizes_and_preallocates() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.img");
        std::fs::write(&p, b"old contents").unwrap();
        create_file(&p, 1 << 20, Prealloc::Off).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.len(), 1 << 20);
        assert!(std::fs::read(&p).unwrap().iter().all(|&b| b == 0));
        create_file(&p, 1 << 20, Prealloc::Full).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&p).unwrap().blocks() * 512 >= 1 << 20);
        assert!(create_file(&p, 1, Prealloc::Metadata).is_err());
    }

    /// A file that stops changing after `left` more writes (zeroes, discards, resizes), as
    /// if the process had been killed: what reached it stays, nothing later does.
    #[derive(Debug)]
    struct Killed {
        inner: Storage,
        left: std::sync::atomic::AtomicUsize,
    }

    impl Killed {
        fn change(&self) -> std::io::Result<()> {
            use std::sync::atomic::Ordering;
            self.left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .map(|_| ())
                .map_err(|_| std::io::Error::other("killed"))
        }
    }

    impl std::fmt::Display for Killed {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            self.inner.fmt(f)
        }
    }

    impl imago::Storage for Killed {
        crate::storage::forward_storage_geometry!();

        unsafe fn pure_readv(
            &self,
            bufv: imago::io_buffers::IoVectorMut<'_>,
            offset: u64,
        ) -> std::io::Result<()> {
            // SAFETY: the caller's alignment guarantee is passed on unchanged.
            unsafe { self.inner.pure_readv(bufv, offset) }
        }

        unsafe fn pure_writev(
            &self,
            bufv: imago::io_buffers::IoVector<'_>,
            offset: u64,
        ) -> std::io::Result<()> {
            self.change()?;
            // SAFETY: the caller's alignment guarantee is passed on unchanged.
            unsafe { self.inner.pure_writev(bufv, offset) }
        }

        unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> std::io::Result<()> {
            self.change()?;
            // SAFETY: the caller's alignment guarantee is passed on unchanged.
            unsafe { self.inner.pure_write_zeroes(offset, length) }
        }

        unsafe fn pure_discard(&self, offset: u64, length: u64) -> std::io::Result<()> {
            self.change()?;
            // SAFETY: the caller's alignment guarantee is passed on unchanged.
            unsafe { self.inner.pure_discard(offset, length) }
        }

        fn flush(&self) -> std::io::Result<()> {
            self.inner.flush()
        }

        fn sync(&self) -> std::io::Result<()> {
            self.inner.sync()
        }

        unsafe fn invalidate_cache(&self) -> std::io::Result<()> {
            // SAFETY: the caller's guarantee is passed on.
            unsafe { self.inner.invalidate_cache() }
        }

        fn get_storage_helper(&self) -> &imago::storage::drivers::CommonStorageHelper {
            self.inner.get_storage_helper()
        }

        fn resize(
            &self,
            new_size: u64,
            prealloc_mode: imago::storage::PreallocateMode,
        ) -> std::io::Result<()> {
            self.change()?;
            self.inner.resize(new_size, prealloc_mode)
        }
    }

    /// A kill at every point of a qcow2 creation (with and without a backing, 64 KiB and
    /// 512-byte clusters, preallocated metadata) leaves no image or one `qemu-img check`
    /// finds clean (leaks allowed): imago alone wrote the L1 pointer into the header before
    /// the new L1 table's refcount.
    /// A grow moves the L1 table (imago writes a bigger one elsewhere): afterwards the L1
    /// entry of a new L2 table is still held back until the flush, now in the new table, and
    /// the image is clean for `qemu-img check` at the end. Before, the range stayed the old
    /// table's, so such an entry reached the file before the new table's refcount.
    #[test]
    fn resize_moves_the_held_back_l1_range_with_the_table() {
        use crate::header::Qcow2Header;
        use crate::node::test_support::{create, open_json, qcow2_opts, run};
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "a.qcow2", &["-f", "qcow2"], Some("1G"));
        let header = || Qcow2Header::parse(&std::fs::read(&p).unwrap()[..4096]).unwrap();
        let entry = |at: u64| {
            let mut e = [0u8; 8];
            std::fs::File::open(&p)
                .unwrap()
                .read_exact_at(&mut e, at)
                .unwrap();
            e
        };
        let node = open_json(qcow2_opts(&p, false)).unwrap();
        let before = header().l1_table_offset;
        node.resize(8 << 30).unwrap();
        let h = header();
        assert_ne!(h.l1_table_offset, before, "the grow moved the L1 table");
        assert!(h.l1_size >= 16, "{}", h.l1_size);
        // The grown range got its L2 tables in the resize (it reads as zeroes, never as
        // backing data); the old first GiB had none: a write there hooks in a new L2 table
        // through L1 entry 0 (512 MiB per entry at 64 KiB clusters).
        let at = h.l1_table_offset;
        assert_eq!(entry(at), [0; 8]);
        node.write(&[7u8; 4096], 0).unwrap();
        assert_eq!(
            entry(at),
            [0; 8],
            "the new L1 entry reached the file before the flush"
        );
        node.flush().unwrap();
        assert_ne!(entry(at), [0; 8], "the flush wrote the L1 entry");
        drop(node);
        run("qemu-img", &["check", p.to_str().unwrap()]);
    }

    /// The image file under a [`Killed`] storage, for the refcount code: its writes count
    /// against the same kill point.
    struct KilledIo {
        file: std::fs::File,
        killed: Arc<Killed>,
    }

    impl Io for KilledIo {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            Io::read_at(&self.file, buf, offset)
        }

        fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            self.killed.change()?;
            Io::write_at(&self.file, buf, offset)
        }

        fn file_len(&self) -> std::io::Result<u64> {
            Io::file_len(&self.file)
        }

        fn sync(&self) -> std::io::Result<()> {
            Io::sync(&self.file)
        }
    }

    /// A kill at every point of a qcow2 grow as `block_resize` runs it ([`resize_qcow2`]),
    /// at 64 KiB and 512-byte clusters, leaves an image `qemu-img check` finds clean (leaks
    /// allowed), of the old size or the new one, with the data written before it, and the
    /// grown range reading as zeroes. imago frees the L1 table it replaces and at once puts
    /// an L2 table there; with only the header held back, a kill after that left the header
    /// naming the old table, now zeroes: every mapping was gone.
    #[test]
    fn qcow2_grow_killed_at_any_write_leaves_a_clean_image() {
        use crate::node::test_support::{create, no_nodes, run};
        let dir = tempfile::tempdir().unwrap();
        for (n, cluster, grow_to) in [(0, "65536", 8u64 << 30), (1, "512", 20 << 20)] {
            let base = create(
                dir.path(),
                &format!("base{n}.qcow2"),
                &["-f", "qcow2", "-o", &format!("cluster_size={cluster}")],
                Some("16M"),
            );
            run(
                "qemu-io",
                &["-c", "write -P 5 1M 64k", base.to_str().unwrap()],
            );
            let pristine = std::fs::read(&base).unwrap();
            let p = dir.path().join(format!("grow{n}.qcow2"));
            let mut kept = Vec::new();
            for k in 0.. {
                std::fs::write(&p, &pristine).unwrap();
                // No image lock, as in the creation test above.
                let opts = crate::BlockdevOptions {
                    locking: crate::Locking::Off,
                    ..crate::BlockdevOptions::file(&p, false)
                };
                let file = crate::open_node(&opts, &no_nodes).unwrap();
                let killed = Arc::new(Killed {
                    inner: file.storage().clone(),
                    left: k.into(),
                });
                let io = KilledIo {
                    file: file.file_state().os.try_clone().unwrap(),
                    killed: killed.clone(),
                };
                let open =
                    |s| Qcow2::<Storage, Arc<Layer>>::open_image(s, true).map(FormatAccess::new);
                let done = resize_qcow2(&io, killed, open, grow_to).is_ok();
                drop(io);
                drop(file);
                let copy = dir.path().join(format!("g{n}-k{k}.qcow2"));
                std::fs::copy(&p, &copy).unwrap();
                kept.push((k, copy));
                if done {
                    break;
                }
            }
            assert!(
                kept.len() > 3,
                "cluster {cluster}: the grow took {} writes",
                kept.len()
            );
            let files: Vec<PathBuf> = kept.iter().map(|(_, f)| f.clone()).collect();
            let results = qemu_img_check_all(&files);
            for ((k, f), (code, out, info)) in kept.iter().zip(&results) {
                assert!(
                    *code == Some(0) || *code == Some(3),
                    "cluster {cluster}, kill {k}: qemu-img check exit {code:?}: {out}"
                );
                let size = info["virtual-size"].as_u64().unwrap();
                assert!(
                    size == 16 << 20 || size == grow_to,
                    "cluster {cluster}, kill {k}: size {size}"
                );
                let tail = format!("read -P 0 {} 64k", size - 65536);
                let f = f.to_str().unwrap();
                run(
                    "qemu-io",
                    &["-f", "qcow2", "-c", "read -P 5 1M 64k", "-c", &tail, f],
                );
            }
            let (code, _, last) = results.last().unwrap();
            assert_eq!(
                (*code, last["virtual-size"].as_u64()),
                (Some(0), Some(grow_to))
            );
        }
    }

    /// `qemu-img check` (exit status, JSON) and `qemu-img info -U` (JSON) of each of `files`,
    /// all run by one shell: this process spawns one child, not two per file. A child holds
    /// copies of this process's descriptors until it execs, and with them the image locks
    /// that other tests of this binary take, drop and take again; hundreds of spawns made
    /// those tests fail now and then with "failed to get write lock".
    fn qemu_img_check_all(files: &[PathBuf]) -> Vec<(Option<i32>, String, serde_json::Value)> {
        let script = "for f; do qemu-img check --output=json \"$f\" >\"$f.check\"; \
                      echo $? >\"$f.code\"; qemu-img info -U --output=json \"$f\" >\"$f.info\"; done";
        let st = std::process::Command::new("sh")
            .args(["-c", script, "sh"])
            .args(files)
            .status()
            .unwrap();
        assert!(st.success(), "qemu-img info failed: {st}");
        let read = |f: &PathBuf, ext: &str| {
            std::fs::read_to_string(format!("{}.{ext}", f.display())).unwrap()
        };
        files
            .iter()
            .map(|f| {
                let code = read(f, "code").trim().parse().ok();
                let info = serde_json::from_str(&read(f, "info")).unwrap();
                (code, read(f, "check"), info)
            })
            .collect()
    }

    /// A kill at every point of a qcow2 creation (with and without a backing, 64 KiB and
    /// 512-byte clusters, preallocated metadata) leaves no image or one `qemu-img check`
    /// finds clean (leaks allowed): imago alone wrote the L1 pointer into the header before
    /// the new L1 table's refcount.
    #[test]
    fn format_qcow2_killed_at_any_write_leaves_no_image_or_a_clean_one() {
        use crate::node::test_support::{create, no_nodes};
        let dir = tempfile::tempdir().unwrap();
        create(dir.path(), "b.qcow2", &["-f", "qcow2"], Some("16M"));
        let p = dir.path().join("new.qcow2");
        for (n, (cluster_size, backing, preallocation)) in [
            (65536, None, Prealloc::Off),
            (65536, Some("b.qcow2"), Prealloc::Off),
            (512, None, Prealloc::Off),
            (65536, None, Prealloc::Metadata),
        ]
        .into_iter()
        .enumerate()
        {
            let o = Qcow2Create {
                size: 16 << 20,
                cluster_size,
                preallocation,
                backing_file: backing.map(String::from),
                backing_fmt: backing.map(|_| "qcow2".to_string()),
                ..Qcow2Create::default()
            };
            // Every kill point in turn until the creation completes; what each left with a
            // qcow2 header is kept (beside the backing, whose name is relative) for qemu-img.
            let mut headed = Vec::new();
            let mut headless = 0;
            for k in 0.. {
                create_file(&p, 0, Prealloc::Off).unwrap();
                // No image lock: a child another test spawns holds a copy of the last
                // iteration's descriptor, and so its lock, until it execs.
                let opts = crate::BlockdevOptions {
                    locking: crate::Locking::Off,
                    ..crate::BlockdevOptions::file(&p, false)
                };
                let file = crate::open_node(&opts, &no_nodes).unwrap();
                let killed: Storage = Arc::new(Killed {
                    inner: file.storage().clone(),
                    left: k.into(),
                });
                let done = create_qcow2(killed, &o).is_ok();
                drop(file);
                let bytes = std::fs::read(&p).unwrap();
                if bytes.starts_with(b"QFI\xfb") {
                    let kept = dir.path().join(format!("c{n}-k{k}.qcow2"));
                    std::fs::write(&kept, &bytes).unwrap();
                    headed.push((k, kept));
                } else {
                    assert!(!done, "{o:?}, kill {k}: created, and no qcow2 header");
                    headless += 1;
                }
                if done {
                    break;
                }
            }
            assert!(
                headless > 0,
                "{o:?}: no kill left the image without a header"
            );
            let files: Vec<PathBuf> = headed.iter().map(|(_, f)| f.clone()).collect();
            let results = qemu_img_check_all(&files);
            for ((k, _), (code, out, _)) in headed.iter().zip(&results) {
                assert!(
                    *code == Some(0) || *code == Some(3),
                    "{o:?}, kill {k}: qemu-img check exit {code:?}: {out}"
                );
            }
            // The completed creation (the last kept) is the full image.
            let sizes: Vec<_> = results
                .iter()
                .map(|r| r.2["virtual-size"].clone())
                .collect();
            assert_eq!(sizes.last().unwrap(), 16 << 20, "{o:?}: {sizes:?}");
        }
    }
}
