//! The storage object under every node: imago's file driver, plus the write-ordering rules
//! imago 0.2 does not keep (for a new image's header, see [`HeaderLast`]).
//!
//! imago caches L2 tables and refcount blocks and writes them back in dependency order
//! (refcounts before the L2 entries that use them, L2 entries before the refcounts they
//! free), but when it hooks a new L2 table into the L1 table it writes that L1 entry to the
//! file at once, while the new table's refcount may still sit in its cache. A crash between
//! the two (kill -9, power loss) leaves an L1 entry pointing at a cluster with refcount 0,
//! which `qemu-img check` reports as corruption. qemu avoids that by writing the refcount
//! cache before the L1 entry.
//!
//! [`OrderedFile`] restores the order from below: writes that fall inside the qcow2 node's
//! L1 table are held back (imago itself reads its L1 table from memory) and written out at
//! the next flush, which imago performs after writing back both caches. A crash before that
//! flush leaves the new L2 table and its data unreferenced: leaked clusters, which
//! `qemu-img check` reports as leaks, not errors. Reads of the L1 range (imago only reads it
//! at open) first write out what is held back. The range follows the table when a resize
//! moves it (`OrderedFile::defer_l1_writes`). Images with internal snapshots, where imago
//! may free an old L2 table right after replacing its L1 entry, are not opened writable
//! (see `node/open.rs`), so a held-back entry never points to a freed table.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::storage::drivers::CommonStorageHelper;
use imago::storage::PreallocateMode;
use imago::Storage;
use parking_lot::Mutex;
use sluice_block::WriteThreshold;

/// imago's file storage, with L1 writes deferred to the next flush (see the module doc).
#[derive(Debug)]
pub struct OrderedFile {
    inner: imago::file::File,
    /// The L1 table's byte range (`l1_start..l1_end`, none while `l1_end` is 0), set when a
    /// writable qcow2 node opens this file and moved when a resize moves the table. Read on
    /// every request, changed only while the node holds its I/O off.
    l1_start: AtomicU64,
    l1_end: AtomicU64,
    /// L1 entries written by imago but not yet to the file, by file offset.
    pending: Mutex<BTreeMap<u64, [u8; 8]>>,
    /// The file node's write threshold: every write and zero of the file passes here,
    /// whether a client of the file node or the format node above made it (host offsets,
    /// as qemu's threshold on a protocol node).
    threshold: Arc<WriteThreshold>,
}

impl OrderedFile {
    pub fn new(inner: imago::file::File) -> OrderedFile {
        OrderedFile {
            inner,
            l1_start: AtomicU64::new(0),
            l1_end: AtomicU64::new(0),
            pending: Mutex::new(BTreeMap::new()),
            threshold: Arc::default(),
        }
    }

    /// The file node's write threshold (see the field).
    pub fn write_threshold(&self) -> &Arc<WriteThreshold> {
        &self.threshold
    }

    /// Holds back writes to `range` (the L1 table of the qcow2 image in this file) from now
    /// on, instead of the range before: at open, and again after a resize moved the table
    /// (imago's grow writes a new table elsewhere and frees the old one). What is held back
    /// for the range before is written out first. The caller holds the node's I/O off.
    pub fn defer_l1_writes(&self, range: Range<u64>) -> std::io::Result<()> {
        self.write_pending()?;
        self.l1_end.store(0, Ordering::Release);
        self.l1_start.store(range.start, Ordering::Relaxed);
        self.l1_end.store(range.end, Ordering::Release);
        Ok(())
    }

    /// The L1 range whose writes are held back, if any.
    fn l1(&self) -> Option<Range<u64>> {
        let end = self.l1_end.load(Ordering::Acquire);
        (end != 0).then(|| self.l1_start.load(Ordering::Relaxed)..end)
    }

    /// Writes out the held-back L1 entries, in file order.
    fn write_pending(&self) -> std::io::Result<()> {
        let mut pending = self.pending.lock();
        while let Some((&offset, entry)) = pending.iter().next() {
            let entry = *entry;
            // SAFETY: the file is opened without O_DIRECT, so imago's buffered file driver
            // has no alignment requirement (req_align and mem_align are 1).
            unsafe { self.inner.pure_writev(IoVector::from(&entry[..]), offset)? };
            pending.remove(&offset);
        }
        Ok(())
    }

    fn in_l1(&self, offset: u64, len: u64) -> Option<bool> {
        let l1 = self.l1()?;
        let end = offset.checked_add(len)?;
        if end <= l1.start || offset >= l1.end {
            return Some(false);
        }
        // Whole entries inside the table are held back; anything else goes through.
        Some(
            offset >= l1.start
                && end <= l1.end
                && offset.is_multiple_of(8)
                && len.is_multiple_of(8),
        )
    }
}

impl std::fmt::Display for OrderedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

/// The imago `Storage` methods a wrapper over another storage (`self.inner`) passes through
/// unchanged: alignments, size, names. Used inside `impl Storage for` of [`OrderedFile`] and
/// the blkdebug wrapper, which differ only in the I/O methods.
macro_rules! forward_storage_geometry {
    () => {
        fn mem_align(&self) -> usize {
            self.inner.mem_align()
        }
        fn req_align(&self) -> usize {
            self.inner.req_align()
        }
        fn zero_align(&self) -> usize {
            self.inner.zero_align()
        }
        fn discard_align(&self) -> usize {
            self.inner.discard_align()
        }
        fn size(&self) -> std::io::Result<u64> {
            self.inner.size()
        }
        fn resolve_relative_path<P: AsRef<Path>>(&self, relative: P) -> std::io::Result<PathBuf> {
            self.inner.resolve_relative_path(relative)
        }
        fn get_filename(&self) -> Option<PathBuf> {
            self.inner.get_filename()
        }
    };
}
pub(crate) use forward_storage_geometry;

impl Storage for OrderedFile {
    forward_storage_geometry!();

    unsafe fn pure_readv(&self, bufv: IoVectorMut<'_>, offset: u64) -> std::io::Result<()> {
        let overlaps = self
            .l1()
            .is_some_and(|l1| offset < l1.end && offset.saturating_add(bufv.len()) > l1.start);
        if overlaps && !self.pending.lock().is_empty() {
            self.write_pending()?;
        }
        // SAFETY: the caller's alignment guarantee is passed on unchanged.
        unsafe { self.inner.pure_readv(bufv, offset) }
    }

    unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> std::io::Result<()> {
        self.threshold.check(offset, bufv.len());
        match self.in_l1(offset, bufv.len()) {
            Some(true) => {
                let mut bytes = vec![0u8; bufv.len() as usize];
                bufv.copy_into_slice(&mut bytes);
                let mut pending = self.pending.lock();
                for (i, e) in bytes.chunks_exact(8).enumerate() {
                    pending.insert(offset + 8 * i as u64, e.try_into().expect("8 bytes"));
                }
                Ok(())
            }
            Some(false) | None => {
                // A write over part of the table (never done by imago for in-range L1
                // indices) supersedes what is held back for it.
                if let Some(l1) = self.l1() {
                    let end = offset + bufv.len();
                    if offset < l1.end && end > l1.start {
                        self.pending
                            .lock()
                            .retain(|&o, _| o + 8 <= offset || o >= end);
                    }
                }
                // SAFETY: the caller's alignment guarantee is passed on unchanged.
                unsafe { self.inner.pure_writev(bufv, offset) }
            }
        }
    }

    unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> std::io::Result<()> {
        self.threshold.check(offset, length);
        // SAFETY: the caller's alignment guarantee is passed on unchanged.
        unsafe { self.inner.pure_write_zeroes(offset, length) }
    }

    unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> std::io::Result<()> {
        self.threshold.check(offset, length);
        // SAFETY: the caller's alignment guarantee is passed on unchanged.
        unsafe { self.inner.pure_write_allocated_zeroes(offset, length) }
    }

    unsafe fn pure_discard(&self, offset: u64, length: u64) -> std::io::Result<()> {
        // SAFETY: the caller's alignment guarantee is passed on unchanged.
        unsafe { self.inner.pure_discard(offset, length) }
    }

    fn flush(&self) -> std::io::Result<()> {
        self.write_pending()?;
        self.inner.flush()
    }

    fn sync(&self) -> std::io::Result<()> {
        self.write_pending()?;
        self.inner.sync()
    }

    fn settle_writes(&self) -> std::io::Result<()> {
        self.inner.settle_writes()
    }

    unsafe fn invalidate_cache(&self) -> std::io::Result<()> {
        // SAFETY: the caller's guarantee (on-disk state consistent) is passed on.
        unsafe { self.inner.invalidate_cache() }
    }

    fn get_storage_helper(&self) -> &CommonStorageHelper {
        self.inner.get_storage_helper()
    }

    fn resize(&self, new_size: u64, prealloc_mode: PreallocateMode) -> std::io::Result<()> {
        self.inner.resize(new_size, prealloc_mode)
    }
}

impl Drop for OrderedFile {
    fn drop(&mut self) {
        if let Err(e) = self.write_pending() {
            tracing::error!("{}: writing the L1 table at close: {e}", self.inner);
        }
    }
}

/// The storage a new qcow2 image is formatted through ([`crate::Node::format_qcow2`]): writes
/// into the header cluster are held back until the next flush (see the module doc).
///
/// imago's creation writes the refcount block, the refcount table and the header, then grows
/// the image: it allocates the L1 table (its refcount only in imago's cache), writes it, and
/// writes the header's L1 pointer and size at once. A crash before the creation's final
/// flush wrote the refcount block back left a header naming an L1 table with refcount 0:
/// `qemu-img check` found the image corrupt. Held back, the header reaches the file after
/// the refcounts it depends on, at the flush (imago writes its caches back first), so a
/// crash leaves the header as it was before (no image yet, or one of size 0 without an L1
/// table) and at most a leaked cluster. A read that overlaps a held write (imago reads the
/// header once, to open the image it has just written, before it allocates anything) and
/// any other request there write the held writes out first, in order.
pub(crate) struct HeaderLast {
    inner: crate::node::Storage,
    /// The header cluster's length: writes that start in it are held back.
    header: u64,
    /// The held writes, in the order they were made.
    held: Mutex<Vec<(u64, imago::io_buffers::IoBuffer)>>,
}

impl HeaderLast {
    /// Formats through `inner`, holding back writes into `0..cluster_size`.
    pub(crate) fn new(inner: crate::node::Storage, cluster_size: u64) -> HeaderLast {
        HeaderLast {
            inner,
            header: cluster_size,
            held: Mutex::new(Vec::new()),
        }
    }

    /// Writes out the held writes, in order, if one overlaps `[offset, offset+len)`.
    fn settle(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let mut held = self.held.lock();
        let end = offset.saturating_add(len);
        if held
            .iter()
            .any(|(o, b)| *o < end && o + b.len() as u64 > offset)
        {
            self.write_held(&mut held)?;
        }
        Ok(())
    }

    /// A flush or sync (`persist`): when header writes are held, what they depend on is
    /// made durable first, then they are written and made durable too, so that the header
    /// reaches the disk after its refcounts across a power cut as well as a kill.
    fn write_out(&self, persist: impl Fn(&Self) -> std::io::Result<()>) -> std::io::Result<()> {
        let mut held = self.held.lock();
        if !held.is_empty() {
            persist(self)?;
            self.write_held(&mut held)?;
        }
        persist(self)
    }

    fn write_held(
        &self,
        held: &mut Vec<(u64, imago::io_buffers::IoBuffer)>,
    ) -> std::io::Result<()> {
        while !held.is_empty() {
            let (offset, buf) = &held[0];
            // SAFETY: the buffer was allocated with the storage's memory alignment, and
            // offset and length are those imago gave, which met its request alignment.
            unsafe { self.inner.pure_writev(IoVector::from(buf), *offset)? };
            held.remove(0);
        }
        Ok(())
    }
}

impl std::fmt::Debug for HeaderLast {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeaderLast")
            .field("inner", &self.inner)
            .field("header", &self.header)
            .field("held", &self.held.lock().len())
            .finish()
    }
}

impl std::fmt::Display for HeaderLast {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl Storage for HeaderLast {
    forward_storage_geometry!();

    unsafe fn pure_readv(&self, bufv: IoVectorMut<'_>, offset: u64) -> std::io::Result<()> {
        self.settle(offset, bufv.len())?;
        // SAFETY: the caller's alignment guarantee is passed on unchanged.
        unsafe { self.inner.pure_readv(bufv, offset) }
    }

    unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> std::io::Result<()> {
        if offset < self.header {
            let mut buf =
                imago::io_buffers::IoBuffer::new(bufv.len() as usize, self.inner.mem_align())?;
            bufv.copy_into_slice(buf.as_mut().into_slice());
            self.held.lock().push((offset, buf));
            return Ok(());
        }
        self.settle(offset, bufv.len())?;
        // SAFETY: the caller's alignment guarantee is passed on unchanged.
        unsafe { self.inner.pure_writev(bufv, offset) }
    }

    unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> std::io::Result<()> {
        self.settle(offset, length)?;
        // SAFETY: the caller's alignment guarantee is passed on unchanged.
        unsafe { self.inner.pure_write_zeroes(offset, length) }
    }

    unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> std::io::Result<()> {
        self.settle(offset, length)?;
        // SAFETY: the caller's alignment guarantee is passed on unchanged.
        unsafe { self.inner.pure_write_allocated_zeroes(offset, length) }
    }

    unsafe fn pure_discard(&self, offset: u64, length: u64) -> std::io::Result<()> {
        self.settle(offset, length)?;
        // SAFETY: the caller's alignment guarantee is passed on unchanged.
        unsafe { self.inner.pure_discard(offset, length) }
    }

    fn flush(&self) -> std::io::Result<()> {
        self.write_out(|s| s.inner.flush())
    }

    fn sync(&self) -> std::io::Result<()> {
        self.write_out(|s| s.inner.sync())
    }

    fn settle_writes(&self) -> std::io::Result<()> {
        self.inner.settle_writes()
    }

    unsafe fn invalidate_cache(&self) -> std::io::Result<()> {
        // SAFETY: the caller's guarantee (on-disk state consistent) is passed on.
        unsafe { self.inner.invalidate_cache() }
    }

    fn get_storage_helper(&self) -> &CommonStorageHelper {
        self.inner.get_storage_helper()
    }

    fn resize(&self, new_size: u64, prealloc_mode: PreallocateMode) -> std::io::Result<()> {
        self.settle(new_size, u64::MAX)?;
        self.inner.resize(new_size, prealloc_mode)
    }
}
