//! The requests of a node: read, write, zero, trim, flush and cache.
//!
//! Each public method is one call through the gate (see `gate.rs`), which runs its body
//! (`*_body`, which takes the gate's pass) on this node or on the one an active commit
//! pivoted it to. The `*_locked` functions are for callers that hold `io` themselves: the
//! bodies, and the steps of block jobs (see `jobs.rs`).
//!
//! **Concurrency inside a node.** Reads, writes and zero-writes run in parallel (imago locks
//! its L2 tables, allocator and refcount blocks itself, and orders its metadata writeback so
//! that refcounts reach the file before the L2 entries that use them). Discards invalidate
//! mappings that a concurrent request could hold, which imago only allows with exclusive
//! access, so each node has an `io` read-write lock: every request holds it shared; TRIM,
//! WRITE_ZEROES with unmap, and a zero request with partial clusters (whose rest is checked
//! for zeroes and then zeroed whole, as qemu does) hold it exclusively. No sluice lock is
//! held across anything but the request's own I/O.
//!
//! **Durability.** Flush writes imago's dirty L2 and refcount blocks (in dependency order),
//! then the L1 entries held back until then (see [`crate::storage`]: a crash never leaves an
//! L1 entry pointing at an unreferenced table, only leaked clusters), and then `fdatasync`s
//! the image file; FUA is a write followed by that flush, so data and metadata are durable
//! before the reply. Because one node (and one cache) serves every connection, a flush on
//! any connection covers writes completed on all of them, which is what NBD multi-conn
//! requires.
//!
//! **Bad images on the request path** (what open checks is in `open.rs`): a data cluster
//! that starts past the end of the file, or a write that would land in the header cluster,
//! fails with EIO instead of reading zeroes or growing the file into space the allocator
//! considers free. imago's own consistency errors surface as EIO. A raw image whose format
//! was probed refuses, as in qemu, writes that would make its block 0 probe as qcow2.

use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::{Mapping, ShallowMapping, Storage as _, StorageExt};
use sluice_block::fileio::fadvise;
use sluice_block::{BlockError, Errno, Result};

use super::gate::{Changing, Reading};
use super::status::SegmentKind;
use super::{Node, Storage};
use crate::error::io_error;
use crate::header::{self, Format};
use crate::options::Driver;

/// The ranges a qcow2 zero request leaves to be written as zero data (empty when none).
type ZeroData = [Range<u64>; 2];

impl Node {
    /// Reads `buf.len()` bytes at `offset` through the chain.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.look(|n, pass| n.read_body(pass, buf, offset))
    }

    /// The body of [`Node::read`].
    pub(super) fn read_body(&self, _: Reading, buf: &mut [u8], offset: u64) -> Result<()> {
        let _g = self.io.read();
        self.read_locked(buf, offset)
    }

    /// [`Node::read`] for a caller that holds the `io` lock.
    pub(super) fn read_locked(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let v = self.view();
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let want = (buf.len() - done) as u64;
            let (mapping, len) = v
                .layer
                .get_mapping(at, want)
                .map_err(|e| io_error(format_args!("read at {at}"), e))?;
            let len = len.min(want) as usize;
            let chunk = &mut buf[done..done + len];
            match mapping {
                Mapping::Raw {
                    storage, offset, ..
                } => {
                    self.check_host(storage, offset, len as u64, true, "read")?;
                    crate::blkdebug::raise(storage, crate::blkdebug::DebugEvent::ReadAio);
                    storage
                        .readv(IoVectorMut::from(chunk), offset)
                        .map_err(|e| io_error(format_args!("read at {at}"), e))?;
                }
                Mapping::Zero { .. } => chunk.fill(0),
                Mapping::Eof { .. } => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Mapping::Special { layer, offset, .. } => layer
                    .readv(IoVectorMut::from(chunk), offset)
                    .map_err(|e| io_error(format_args!("read (compressed) at {at}"), e))?,
                _ => {
                    return Err(BlockError::new(
                        Errno::EIO,
                        format!("read at {at}: unknown mapping"),
                    ))
                }
            }
            done += len;
        }
        Ok(())
    }

    /// Writes `buf` at `offset`, allocating (with copy-on-write from the backing for partial
    /// clusters) as needed.
    pub fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.change(offset, buf.len() as u64, true, |n, pass| {
            n.write_body(pass, buf, offset)
        })
    }

    /// The body of [`Node::write`].
    fn write_body(&self, pass: Changing, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable("write")?;
        if self.probed_raw && offset < 8 {
            self.check_block0(pass.reading(), buf, offset)?;
        }
        let _g = self.io.read();
        self.write_locked(buf, offset)
    }

    /// [`Node::write`] for a caller that holds the `io` lock (and has checked the write).
    pub(super) fn write_locked(&self, buf: &[u8], offset: u64) -> Result<()> {
        let v = self.view();
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let rest = &buf[done..];
            let mapping = v
                .layer
                .prepare_data_mapping(at, rest.len() as u64, true)
                .map_err(|e| io_error(format_args!("write at {at}"), e))?;
            let storage = mapping.storage();
            let host = mapping.offset();
            let len = (mapping.length() as usize).min(rest.len());
            self.check_host(storage, host, len as u64, mapping.is_nonblocking(), "write")?;
            crate::blkdebug::raise(storage, crate::blkdebug::DebugEvent::WriteAio);
            storage
                .writev(IoVector::from(&rest[..len]), host)
                .map_err(|e| io_error(format_args!("write at {at}"), e))?;
            v.layer
                .commit_data_mapping(mapping)
                .map_err(|e| io_error(format_args!("write at {at}"), e))?;
            done += len;
        }
        Ok(())
    }

    /// qemu's protection of probed raw images: block 0 must not start to look like qcow2.
    fn check_block0(&self, pass: Reading, buf: &[u8], offset: u64) -> Result<()> {
        let mut first = [0u8; 8];
        self.read_body(pass, &mut first, 0)?;
        let start = offset as usize;
        let n = buf.len().min(8 - start);
        first[start..start + n].copy_from_slice(&buf[..n]);
        if header::probe(&first) != Format::Raw {
            return Err(BlockError::new(
                Errno::EPERM,
                format!(
                    "write at {offset}: refusing to write a qcow2 header into {}, whose format \
                     was probed as raw (give format=raw to allow it)",
                    self.filename.display()
                ),
            ));
        }
        Ok(())
    }

    /// Makes `[offset, offset+count)` read as zeroes. `may_unmap`: clusters may be
    /// deallocated (NBD without NO_HOLE); `fast`: fail with ENOTSUP rather than write data.
    pub fn zero(&self, count: u64, offset: u64, may_unmap: bool, fast: bool) -> Result<()> {
        self.change(offset, count, true, |n, pass| {
            n.zero_body(pass, count, offset, may_unmap, fast)
        })
    }

    /// The body of [`Node::zero`].
    fn zero_body(
        &self,
        pass: Changing,
        count: u64,
        offset: u64,
        may_unmap: bool,
        fast: bool,
    ) -> Result<()> {
        self.check_writable("zero")?;
        let ctx = || format!("zero at {offset} (+{count})");
        match self.driver {
            Driver::Qcow2 => {
                for range in self.zero_qcow2(count, offset, may_unmap, fast)? {
                    self.write_zero_data(pass, range)?;
                }
                Ok(())
            }
            Driver::Raw | Driver::File | Driver::Blkdebug | Driver::Plugin => {
                let _g = self.io.read();
                let st = self.storage();
                let r = if may_unmap {
                    st.write_zeroes(offset, count)
                } else {
                    st.write_allocated_zeroes(offset, count)
                };
                r.map_err(|e| io_error(ctx(), e))
            }
        }
    }

    /// Zero for qcow2, following qemu: v3 marks zero clusters (unmapping them if allowed);
    /// v2 without a backing file unmaps whole clusters, since they then read as zeroes, and
    /// v2 with one cannot do better than zero data (ENOTSUP: the server writes it). A
    /// partial cluster whose rest already reads as zeroes is zeroed whole. Returns what is
    /// left to write as zero data (the partial clusters of a v2 image), to be written after
    /// the exclusive `io` lock is let go.
    fn zero_qcow2(&self, count: u64, offset: u64, may_unmap: bool, fast: bool) -> Result<ZeroData> {
        let ctx = || format!("zero at {offset} (+{count})");
        let view = self.view();
        let h = &view.qcow2.as_ref().expect("qcow2 node").header;
        let v2 = h.version < 3;
        if v2 && view.backing.is_some() {
            return Err(BlockError::new(
                Errno::ENOTSUP,
                format!("{}: a qcow2 v2 image cannot mark zero clusters", ctx()),
            ));
        }
        let cs = h.cluster_size();
        let size = self.size();
        let end = offset + count;
        let head = offset % cs;
        let tail = if end.is_multiple_of(cs) || end == size {
            0
        } else {
            end.next_multiple_of(cs).min(size) - end
        };
        if !v2 && head == 0 && tail == 0 {
            let r = if may_unmap {
                let _g = self.io.write();
                // SAFETY: the exclusive `io` lock keeps every other request of this node
                // (and so every mapping) out, as imago requires; backing nodes are
                // read-only and never discarded.
                unsafe { self.view().layer.discard_to_zero_unsafe(offset, count) }
                    .map_err(|e| io_error(ctx(), e))
            } else {
                let _g = self.io.read();
                self.view()
                    .layer
                    .write_zeroes(offset, count)
                    .map_err(|e| io_error(ctx(), e))
            };
            return r.map(|()| ZeroData::default());
        }
        // Partial clusters (or v2): checked and done under the exclusive lock, so that no
        // write lands in the rest of a cluster between the check and the zeroing.
        let g = self.io.write();
        let start = if head != 0 && self.reads_zero(offset - head, head)? {
            offset - head
        } else {
            offset
        };
        let end = if tail != 0 && self.reads_zero(end, tail)? {
            end + tail
        } else {
            end
        };
        // The whole clusters of [start, end); the rest needs zero data.
        let a = start.next_multiple_of(cs);
        let b = if end == size { end } else { end / cs * cs };
        let (a, b) = if a < b { (a, b) } else { (start, start) };
        if fast && (a != start || b != end) {
            return Err(BlockError::new(
                Errno::ENOTSUP,
                format!("{}: partial clusters, zeroing would write data", ctx()),
            ));
        }
        if !v2 {
            let r = if may_unmap {
                // SAFETY: as above, under the exclusive `io` lock.
                unsafe { self.view().layer.discard_to_zero_unsafe(start, end - start) }
            } else {
                self.view().layer.write_zeroes(start, end - start)
            };
            return r
                .map(|()| ZeroData::default())
                .map_err(|e| io_error(ctx(), e));
        }
        if a < b {
            // SAFETY: as above, under the exclusive `io` lock.
            unsafe { self.discard_clusters(a, b - a, true) }.map_err(|e| io_error(ctx(), e))?;
        }
        drop(g);
        Ok([start..a.max(start).min(end), b.max(start)..end])
    }

    /// Discards whole clusters: unmapped (reading from the backing, or zeroes without one)
    /// when `full`, else turned into zero clusters.
    ///
    /// # Safety
    /// The caller holds the `io` lock exclusively (no request of this node holds a mapping).
    unsafe fn discard_clusters(&self, offset: u64, len: u64, full: bool) -> std::io::Result<()> {
        if full {
            // SAFETY: the caller's guarantee is imago's condition.
            unsafe { self.view().layer.discard_to_backing_unsafe(offset, len) }
        } else {
            // SAFETY: the caller's guarantee is imago's condition.
            unsafe { self.view().layer.discard_to_zero_unsafe(offset, len) }
        }
    }

    /// Writes zero bytes over `range` (nothing if empty).
    fn write_zero_data(&self, pass: Changing, range: Range<u64>) -> Result<()> {
        static ZEROES: [u8; 65536] = [0; 65536];
        let (mut at, to) = (range.start, range.end);
        while at < to {
            let n = (to - at).min(ZEROES.len() as u64) as usize;
            self.write_body(pass, &ZEROES[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    /// Discards `[offset, offset+count)` as qemu's qcow2 driver does for NBD TRIM: only
    /// whole clusters, which then read as zeroes (v3) or are left alone (v2); unallocated
    /// clusters of an image without backing stay unallocated. Raw files get a hole punched.
    pub fn trim(&self, count: u64, offset: u64) -> Result<()> {
        self.change(offset, count, false, |n, pass| {
            n.trim_body(pass, count, offset)
        })
    }

    /// The body of [`Node::trim`].
    fn trim_body(&self, _: Changing, count: u64, offset: u64) -> Result<()> {
        self.check_writable("trim")?;
        let ctx = || format!("trim at {offset} (+{count})");
        match self.driver {
            Driver::Qcow2 => {
                let view = self.view();
                let h = &view.qcow2.as_ref().expect("qcow2 node").header;
                // qemu: v2 images unmap when nothing can show through, else ignore it.
                let full = h.version < 3;
                if full && view.backing.is_some() {
                    return Ok(());
                }
                let cs = h.cluster_size();
                let size = self.size();
                let start = offset.next_multiple_of(cs);
                let end = if offset + count == size {
                    size
                } else {
                    (offset + count) / cs * cs
                };
                if start >= end {
                    return Ok(());
                }
                let _g = self.io.write();
                let layer = self.view().layer.clone();
                let mut at = start;
                while at < end {
                    let (m, len) = layer
                        .get_shallow_mapping(at, end - at)
                        .map_err(|e| io_error(ctx(), e))?;
                    let len = len.min(end - at);
                    let unallocated = matches!(
                        m,
                        ShallowMapping::Zero {
                            explicit: false,
                            ..
                        }
                    );
                    if len == 0 {
                        break;
                    }
                    if !unallocated {
                        // SAFETY: the exclusive `io` lock keeps every other request of this
                        // node (and so every mapping) out, as imago requires.
                        unsafe { self.discard_clusters(at, len, full) }
                            .map_err(|e| io_error(ctx(), e))?;
                    }
                    at += len;
                }
                Ok(())
            }
            Driver::Raw | Driver::File | Driver::Blkdebug | Driver::Plugin => {
                let _g = self.io.read();
                self.storage()
                    .discard(offset, count)
                    .map_err(|e| io_error(ctx(), e))
            }
        }
    }

    /// Writes back imago's metadata caches and syncs the image file.
    pub fn flush(&self) -> Result<()> {
        self.look(|n, pass| n.flush_body(pass))
    }

    /// The body of [`Node::flush`].
    pub(super) fn flush_body(&self, _: Reading) -> Result<()> {
        let _g = self.io.read();
        self.flush_locked()
    }

    /// [`Node::flush`] for a caller that holds the `io` lock.
    pub(super) fn flush_locked(&self) -> Result<()> {
        let v = self.view();
        v.layer.flush().map_err(|e| io_error("flush", e))?;
        v.layer.sync().map_err(|e| io_error("sync", e))
    }

    /// [`Node::flush_locked`] for the node's own life-cycle steps (saving bitmaps,
    /// reopening), whose errors are [`crate::ImageError`]s naming the node.
    pub(super) fn flush_for_change(&self) -> std::result::Result<(), crate::ImageError> {
        self.flush_locked().map_err(|e| {
            crate::ImageError::io(
                format!("flushing '{}'", self.name),
                std::io::Error::other(e.to_string()),
            )
        })
    }

    /// Starts writing back what the node's file has dirty in the page cache, without
    /// waiting for it (`sync_file_range(SYNC_FILE_RANGE_WRITE)` over the whole file). A
    /// block job that flushes its target at the end calls this as it copies (see
    /// `sluice_daemon::jobs::Writeback`): the kernel's own writeback starts only past
    /// `dirty_background_ratio` (gigabytes on a large host), so otherwise the disk stays idle
    /// while the job copies and the final flush writes everything. A hint: it makes nothing
    /// durable (only a flush does) and its failure changes nothing. Nodes without a file of
    /// their own at the bottom (plugin nodes) ignore it.
    pub fn start_writeback(&self) {
        let _ = self.look(|n, _| {
            if let Some(fs) = n.file_state_if_any() {
                // SAFETY: a plain system call on the node's open descriptor.
                unsafe {
                    libc::sync_file_range(fs.os.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
                };
            }
            Ok(())
        });
    }

    /// NBD_CMD_CACHE: asks the kernel to read ahead the file ranges that hold the data.
    pub fn cache(&self, count: u64, offset: u64) -> Result<()> {
        self.look(|n, pass| n.cache_body(pass, count, offset))
    }

    /// The body of [`Node::cache`].
    fn cache_body(&self, _: Reading, count: u64, offset: u64) -> Result<()> {
        let _g = self.io.read();
        for seg in self.segments(offset, offset + count, None) {
            let (_, seg) = seg?;
            if let SegmentKind::RawFile { host, ref layer } = seg.kind {
                // A hint: its failure changes nothing.
                let _ = fadvise(
                    &layer.file_state().os,
                    host,
                    seg.len,
                    libc::POSIX_FADV_WILLNEED,
                );
            }
        }
        Ok(())
    }

    /// The node of this chain whose file is `storage` (self if none matches).
    fn owner_of(&self, storage: &Storage) -> Arc<Node> {
        if Arc::ptr_eq(self.storage(), storage) {
            return self.arc();
        }
        let mut next = self.backing();
        while let Some(node) = next {
            if Arc::ptr_eq(node.storage(), storage) {
                return node;
            }
            next = node.backing();
        }
        self.arc()
    }

    /// A qcow2 data cluster must begin inside the file and never in the header cluster.
    /// `len`: the bytes used from `host` on (a run of clusters): every cluster of the run
    /// is checked, so a run that starts inside the file and runs past its end fails too.
    fn check_host(
        &self,
        storage: &Storage,
        host: u64,
        len: u64,
        existing: bool,
        what: &str,
    ) -> Result<()> {
        let owner = self.owner_of(storage);
        if owner.driver != Driver::Qcow2 {
            return Ok(());
        }
        let eio = |why: String| {
            BlockError::new(
                Errno::EIO,
                format!("{what}: {}: corrupt image: {why}", owner.filename.display()),
            )
        };
        if host < owner.cluster_size() {
            return Err(eio(format!(
                "data mapped into the header cluster (offset {host:#x})"
            )));
        }
        if existing {
            let cs = owner.cluster_size();
            let last = (host + len.max(1) - 1) / cs * cs;
            let mut size = storage.size().map_err(|e| io_error(what, e))?;
            if last >= size && owner.is_read_only() {
                // imago remembers the size from open; a read-only node's image may have
                // grown since (a writer of the daemon's own, see `open_writer`, or the file
                // was restored).
                size = owner.file_state().os.metadata().map_or(size, |m| m.len());
            }
            if last >= size {
                return Err(eio(format!(
                    "data cluster at {last:#x} lies past the end of the file ({size} bytes)"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::Qcow2Header;
    use crate::lock::Locking;
    use crate::node::open::{open_file_node, open_raw_node};
    use crate::node::test_support::*;
    use sluice_block::extents::{EXTENT_HOLE, EXTENT_ZERO};

    #[test]
    fn write_copies_partial_cluster_from_backing_and_status_follows() {
        let (_dir, top) = chain();
        let node = open_json(qcow2_opts(&top, false)).unwrap();
        node.write(&[0x33; 100], 1000).unwrap();
        node.flush().unwrap();
        assert_eq!(read(&node, 3, 999), [0x11, 0x33, 0x33]);
        assert_eq!(read(&node, 2, 1099), [0x33, 0x11]);
        const HZ: u32 = EXTENT_HOLE | EXTENT_ZERO;
        assert_eq!(
            extents(&node, 2 << 20, 0, false),
            [
                (0, 65536, 0),
                (65536, 983040, HZ),
                (1 << 20, 65536, 0),
                ((1 << 20) + 65536, (1 << 20) - 65536, HZ)
            ]
        );
        assert_eq!(
            extents(&node, 2 << 20, 0, true),
            [
                (0, 65536, 1),
                (65536, 983040, 2),
                (1 << 20, 65536, 1),
                ((1 << 20) + 65536, (1 << 20) - 65536, 2)
            ]
        );
    }

    #[test]
    fn zero_and_trim_make_zero_clusters() {
        let (_dir, top) = chain();
        let node = open_json(qcow2_opts(&top, false)).unwrap();
        node.zero(65536, 0, true, true).unwrap();
        node.trim(65536, 1 << 20).unwrap();
        assert_eq!(read(&node, 2, 0), [0, 0]);
        assert_eq!(read(&node, 2, 1 << 20), [0, 0]);
        let depth = extents(&node, 2 << 20, 0, true);
        assert_eq!(depth[0], (0, 65536, 1));
        assert!(depth.contains(&(1 << 20, 65536, 1)), "{depth:?}");
        // FAST_ZERO of a partial cluster whose rest holds data cannot be done without data.
        node.write(&[1; 10], 200_000).unwrap();
        let err = node.zero(100, 200_100, false, true).unwrap_err();
        assert_eq!(err.errno, Errno::ENOTSUP);
    }

    #[test]
    fn read_of_l2_entry_past_eof_is_eio_and_write_does_not_grow_file() {
        let dir = tempfile::tempdir().unwrap();
        let img = create(dir.path(), "a.qcow2", &["-f", "qcow2"], Some("1M"));
        qemu_io("qcow2", &img, &["write -P 7 0 64k"]);
        let bytes = std::fs::read(&img).unwrap();
        let h = Qcow2Header::parse(&bytes[..4096]).unwrap();
        let l1 = h.l1_table_offset as usize;
        let l2 = u64::from_be_bytes(bytes[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00;
        // Point the first data cluster far past the end of the file.
        patch(&img, l2, &(0x8000_0000_4000_0000u64).to_be_bytes());
        let len = std::fs::metadata(&img).unwrap().len();
        let node = open_json(qcow2_opts(&img, false)).unwrap();
        let mut buf = [0u8; 512];
        assert_eq!(node.read(&mut buf, 0).unwrap_err().errno, Errno::EIO);
        assert_eq!(node.write(&buf, 0).unwrap_err().errno, Errno::EIO);
        drop(node);
        assert_eq!(std::fs::metadata(&img).unwrap().len(), len);
    }

    #[test]
    fn write_to_probed_raw_cannot_plant_qcow2_header() {
        let dir = tempfile::tempdir().unwrap();
        let raw = create(dir.path(), "r.raw", &["-f", "raw"], Some("1M"));
        let file = open_file_node("f".into(), &raw, false, Locking::Auto).unwrap();
        let node = open_raw_node("r".into(), file, false, true, None).unwrap();
        let err = node.write(b"QFI\xfb\0\0\0\x03", 0).unwrap_err();
        assert_eq!(err.errno, Errno::EPERM);
        node.write(b"QFI", 0).unwrap();
        assert_eq!(read(&node, 3, 0), b"QFI");
    }
}
