//! qcow2 cluster allocation outside imago: the refcount table and blocks, read, changed in
//! memory and written back, for the metadata sluice writes itself (persistent bitmaps).
//!
//! imago 0.2 keeps its allocator private, so the bitmap tables, bitmap data and bitmap
//! directory that [`crate::qcow2_bitmaps`] saves are allocated here, directly in the image's
//! refcount structures. That is only safe while imago does not allocate at the same time and
//! holds no refcount block in its cache that this code changes: the caller flushes imago's
//! caches first and lets no request change the image afterwards (a node saves its bitmaps
//! when it closes, see `node/persist.rs`). Allocation is qemu's simple first-fit: the lowest
//! run of clusters whose refcount is 0; a missing refcount block is placed in a free cluster
//! (which it may describe itself). Growing the refcount table is not done: a table that
//! cannot cover a new cluster fails with [`RefcountError::TableFull`] (qemu's tables cover
//! 16 TiB of file at the default cluster size, so only tiny-cluster images hit it).
//!
//! Nothing is written until [`Refcounts::commit`], which writes each changed refcount block
//! once and syncs: callers commit after allocating (before anything points at the new
//! clusters) and after freeing (after nothing points at the old ones any more), qemu's
//! order, so a crash can leak clusters but never leave a reference to a free one.
//!
//! All I/O goes through the small [`Io`] trait, so the unit tests run on a byte vector.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

/// Positioned I/O on an image file.
pub trait Io {
    /// Reads exactly `buf.len()` bytes at `offset`; bytes past the end of the file read as 0.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()>;
    fn file_len(&self) -> std::io::Result<u64>;
    /// Makes what was written durable.
    fn sync(&self) -> std::io::Result<()>;
}

impl Io for std::fs::File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut done = 0;
        while done < buf.len() {
            match FileExt::read_at(self, &mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, buf, offset)
    }
    fn file_len(&self) -> std::io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn sync(&self) -> std::io::Result<()> {
        self.sync_data()
    }
}

/// Why an allocation or a refcount change failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RefcountError {
    #[error("I/O error on the refcount structures: {0}")]
    Io(#[from] std::io::Error),
    #[error("refcount table entry {index} points to {offset:#x}, which is not cluster-aligned")]
    Corrupt { index: u64, offset: u64 },
    #[error(
        "the refcount table is full (it covers {covered} clusters): sluice does not grow it; \
         `qemu-img convert` the image to a larger cluster size"
    )]
    TableFull { covered: u64 },
    #[error("refcount of cluster {cluster} would overflow")]
    Overflow { cluster: u64 },
    #[error("cluster {cluster} is already free")]
    AlreadyFree { cluster: u64 },
}

type Res<T> = Result<T, RefcountError>;

/// The refcounts of one image, loaded on demand (see the module doc).
#[derive(Debug)]
pub struct Refcounts {
    cluster_bits: u32,
    /// log2 of the refcount width in bits.
    order: u32,
    /// The refcount table's entries (refcount block offsets, 0 = none).
    table: Vec<u64>,
    table_offset: u64,
    table_dirty: bool,
    /// Refcount blocks read so far, by table index.
    blocks: BTreeMap<u64, Vec<u8>>,
    dirty: BTreeSet<u64>,
    /// No free cluster lies below this one.
    hint: u64,
    /// The clusters [`Refcounts::alloc`] is taking (a refcount block made meanwhile must
    /// not land in them).
    run: Range<u64>,
}

impl Refcounts {
    /// Reads the refcount table (`clusters` clusters at `offset`).
    pub fn load(
        io: &dyn Io,
        cluster_bits: u32,
        order: u32,
        offset: u64,
        clusters: u32,
    ) -> Res<Refcounts> {
        let mut raw = vec![0u8; (u64::from(clusters) << cluster_bits) as usize];
        io.read_at(&mut raw, offset)?;
        let table = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();
        Ok(Refcounts {
            cluster_bits,
            order,
            table,
            table_offset: offset,
            table_dirty: false,
            blocks: BTreeMap::new(),
            dirty: BTreeSet::new(),
            hint: 1,
            run: 0..0,
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcounts per refcount block.
    fn per_block(&self) -> u64 {
        (self.cluster_size() * 8) >> self.order
    }

    /// Clusters the table can describe.
    pub fn covered(&self) -> u64 {
        self.table.len() as u64 * self.per_block()
    }

    /// The refcount block of table index `index`, read if needed; None if unallocated.
    fn block(&mut self, io: &dyn Io, index: u64) -> Res<Option<&mut Vec<u8>>> {
        let Some(&entry) = self.table.get(index as usize) else {
            return Ok(None);
        };
        let offset = entry & !0x1ff;
        if offset == 0 {
            return Ok(None);
        }
        if entry & 0x1ff != 0 || offset & (self.cluster_size() - 1) != 0 {
            return Err(RefcountError::Corrupt {
                index,
                offset: entry,
            });
        }
        if !self.blocks.contains_key(&index) {
            let mut b = vec![0u8; self.cluster_size() as usize];
            io.read_at(&mut b, offset)?;
            self.blocks.insert(index, b);
        }
        Ok(self.blocks.get_mut(&index))
    }

    /// The refcount of `cluster` (0 for clusters no block describes).
    pub fn get(&mut self, io: &dyn Io, cluster: u64) -> Res<u64> {
        let (index, slot) = (cluster / self.per_block(), cluster % self.per_block());
        let order = self.order;
        Ok(match self.block(io, index)? {
            Some(b) => get_entry(b, order, slot),
            None => 0,
        })
    }

    /// Sets the refcount of `cluster`, making its refcount block if it has none.
    fn set(&mut self, io: &dyn Io, cluster: u64, value: u64) -> Res<()> {
        let (index, slot) = (cluster / self.per_block(), cluster % self.per_block());
        if index >= self.table.len() as u64 {
            return Err(RefcountError::TableFull {
                covered: self.covered(),
            });
        }
        if self.block(io, index)?.is_none() {
            self.new_block(io, index)?;
        }
        let order = self.order;
        let b = self.blocks.get_mut(&index).expect("made above");
        if value > max_refcount(order) {
            return Err(RefcountError::Overflow { cluster });
        }
        set_entry(b, order, slot, value);
        self.dirty.insert(index);
        Ok(())
    }

    /// Makes the refcount block for table index `index`, in a free cluster.
    fn new_block(&mut self, io: &dyn Io, index: u64) -> Res<()> {
        // Every cluster of a block's range has refcount 0 while the block does not exist:
        // take the first one that the run being allocated does not use (the block then
        // counts itself), else any free cluster.
        let first = (index * self.per_block()).max(1);
        let end = (index + 1) * self.per_block();
        let in_run = self.run.contains(&first);
        let candidate = if in_run { self.run.end } else { first };
        let cluster = if candidate < end {
            candidate
        } else {
            self.find_free(io, 1)?
        };
        self.blocks
            .insert(index, vec![0u8; self.cluster_size() as usize]);
        self.table[index as usize] = cluster << self.cluster_bits;
        self.table_dirty = true;
        self.dirty.insert(index);
        let run = std::mem::replace(&mut self.run, cluster..cluster + 1);
        // The block's own refcount (in itself, or in a block that may in turn be made).
        let r = self.set(io, cluster, 1);
        self.run = run;
        r
    }

    /// The first run of `n` free clusters at or after the hint, clear of the run being
    /// allocated.
    fn find_free(&mut self, io: &dyn Io, n: u64) -> Res<u64> {
        let mut start = self.hint;
        let mut c = start;
        while c < start + n {
            if self.run.contains(&c) || self.get(io, c)? != 0 {
                start = c + 1;
            }
            c += 1;
        }
        Ok(start)
    }

    /// Allocates `n` contiguous clusters (refcount 1) and returns the first one's offset.
    /// Nothing reaches the file before [`Refcounts::commit`].
    pub fn alloc(&mut self, io: &dyn Io, n: u64) -> Res<u64> {
        let start = self.find_free(io, n)?;
        self.run = start..start + n;
        let r = (start..start + n).try_for_each(|c| self.set(io, c, 1));
        self.run = 0..0;
        r?;
        if start == self.hint {
            self.hint = start + n;
        }
        Ok(start << self.cluster_bits)
    }

    /// Drops one reference to each cluster of `range` (byte offsets, cluster-aligned).
    pub fn free(&mut self, io: &dyn Io, range: Range<u64>) -> Res<()> {
        self.reference_each(io, range, false)
    }

    /// Adds one reference to each cluster of `range` (byte offsets, cluster-aligned), each
    /// already in use: a hold on them while someone else (imago) might free them.
    pub fn pin(&mut self, io: &dyn Io, range: Range<u64>) -> Res<()> {
        self.reference_each(io, range, true)
    }

    /// One reference more (`add`) or less to each cluster of `range`, all in use.
    fn reference_each(&mut self, io: &dyn Io, range: Range<u64>, add: bool) -> Res<()> {
        let first = range.start >> self.cluster_bits;
        let end = range.end.div_ceil(self.cluster_size());
        for c in first..end {
            let r = self.get(io, c)?;
            if r == 0 {
                return Err(RefcountError::AlreadyFree { cluster: c });
            }
            let new = if add { r + 1 } else { r - 1 };
            self.set(io, c, new)?;
            if new == 0 {
                self.hint = self.hint.min(c);
            }
        }
        Ok(())
    }

    /// Writes the changed refcount blocks, then the table entries that point to new blocks,
    /// and syncs.
    pub fn commit(&mut self, io: &dyn Io) -> Res<()> {
        for index in std::mem::take(&mut self.dirty) {
            let offset = self.table[index as usize] & !0x1ff;
            io.write_at(&self.blocks[&index], offset)?;
        }
        if self.table_dirty {
            io.sync()?;
            let raw: Vec<u8> = self.table.iter().flat_map(|e| e.to_be_bytes()).collect();
            io.write_at(&raw, self.table_offset)?;
            self.table_dirty = false;
        }
        io.sync()?;
        Ok(())
    }
}

fn max_refcount(order: u32) -> u64 {
    if order == 6 {
        u64::MAX
    } else {
        (1u64 << (1 << order)) - 1
    }
}

/// Refcount `slot` of a block (qemu's layout: big-endian for 8 bits and wider; below, packed
/// from the least significant bit of each byte).
fn get_entry(block: &[u8], order: u32, slot: u64) -> u64 {
    let bits = 1u64 << order;
    if bits >= 8 {
        let bytes = (bits / 8) as usize;
        let at = slot as usize * bytes;
        block[at..at + bytes]
            .iter()
            .fold(0u64, |v, &b| (v << 8) | u64::from(b))
    } else {
        let per = 8 / bits;
        let byte = block[(slot / per) as usize];
        (u64::from(byte) >> ((slot % per) * bits)) & max_refcount(order)
    }
}

fn set_entry(block: &mut [u8], order: u32, slot: u64, value: u64) {
    let bits = 1u64 << order;
    if bits >= 8 {
        let bytes = (bits / 8) as usize;
        let at = slot as usize * bytes;
        let be = value.to_be_bytes();
        block[at..at + bytes].copy_from_slice(&be[8 - bytes..]);
    } else {
        let per = 8 / bits;
        let shift = (slot % per) * bits;
        let mask = (max_refcount(order) << shift) as u8;
        let b = &mut block[(slot / per) as usize];
        *b = (*b & !mask) | ((value << shift) as u8 & mask);
    }
}

/// An in-memory image file, for the unit tests of this module and of `qcow2_bitmaps`.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct MemIo(pub std::cell::RefCell<Vec<u8>>);

#[cfg(test)]
impl Io for MemIo {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let v = self.0.borrow();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = v.get(offset as usize + i).copied().unwrap_or(0);
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let mut v = self.0.borrow_mut();
        let end = offset as usize + buf.len();
        if v.len() < end {
            v.resize(end, 0);
        }
        v[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }
    fn file_len(&self) -> std::io::Result<u64> {
        Ok(self.0.borrow().len() as u64)
    }
    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 512-byte-cluster image: header in cluster 0, refcount table in cluster 1, its one
    /// refcount block in cluster 2 (16-bit refcounts, 256 per block).
    fn small_image() -> MemIo {
        let io = MemIo::default();
        io.write_at(&[0u8; 512 * 3], 0).unwrap();
        io.write_at(&(2u64 * 512).to_be_bytes(), 512).unwrap();
        let mut block = vec![0u8; 512];
        for c in 0..3 {
            set_entry(&mut block, 4, c, 1);
        }
        io.write_at(&block, 1024).unwrap();
        io
    }

    #[test]
    fn entries_use_qemu_layout_for_every_width() {
        let mut b = vec![0u8; 16];
        set_entry(&mut b, 4, 1, 0x1234);
        assert_eq!(&b[2..4], &[0x12, 0x34]);
        set_entry(&mut b, 0, 9, 1);
        assert_eq!(b[1] & 0b10, 0b10);
        set_entry(&mut b, 2, 1, 0xf);
        assert_eq!(b[0], 0xf0 | (b[0] & 0x0f));
        assert_eq!(get_entry(&b, 2, 1), 0xf);
        let mut b = vec![0u8; 16];
        set_entry(&mut b, 6, 1, u64::MAX - 1);
        assert_eq!(get_entry(&b, 6, 1), u64::MAX - 1);
    }

    #[test]
    fn alloc_takes_first_free_run_and_commit_writes_the_block() {
        let io = small_image();
        let mut r = Refcounts::load(&io, 9, 4, 512, 1).unwrap();
        assert_eq!(r.alloc(&io, 2).unwrap(), 3 * 512);
        assert_eq!(r.alloc(&io, 1).unwrap(), 5 * 512);
        r.free(&io, 3 * 512..4 * 512).unwrap();
        assert_eq!(r.alloc(&io, 1).unwrap(), 3 * 512);
        r.commit(&io).unwrap();
        let mut again = Refcounts::load(&io, 9, 4, 512, 1).unwrap();
        let counts: Vec<u64> = (0..7).map(|c| again.get(&io, c).unwrap()).collect();
        assert_eq!(counts, [1, 1, 1, 1, 1, 1, 0]);
        assert!(matches!(
            again.free(&io, 6 * 512..7 * 512),
            Err(RefcountError::AlreadyFree { cluster: 6 })
        ));
    }

    #[test]
    fn pin_keeps_a_freed_cluster_in_use_until_the_pin_is_freed() {
        let io = small_image();
        let mut r = Refcounts::load(&io, 9, 4, 512, 1).unwrap();
        assert_eq!(r.alloc(&io, 1).unwrap(), 3 * 512);
        r.pin(&io, 3 * 512..4 * 512).unwrap();
        // Someone else's free leaves it in use: the next allocation goes past it.
        r.free(&io, 3 * 512..4 * 512).unwrap();
        assert_eq!(r.alloc(&io, 1).unwrap(), 4 * 512);
        r.free(&io, 3 * 512..4 * 512).unwrap();
        assert_eq!(r.get(&io, 3).unwrap(), 0);
        assert!(matches!(
            r.pin(&io, 5 * 512..6 * 512),
            Err(RefcountError::AlreadyFree { cluster: 5 })
        ));
    }

    #[test]
    fn alloc_past_the_first_block_makes_a_block_that_counts_itself() {
        let io = small_image();
        let mut r = Refcounts::load(&io, 9, 4, 512, 1).unwrap();
        // Fill block 0 (clusters 0..256), then one more.
        assert_eq!(r.alloc(&io, 253).unwrap(), 3 * 512);
        assert_eq!(r.alloc(&io, 1).unwrap(), 256 * 512);
        assert_eq!(r.alloc(&io, 1).unwrap(), 258 * 512);
        r.commit(&io).unwrap();
        let mut again = Refcounts::load(&io, 9, 4, 512, 1).unwrap();
        assert_eq!(again.table[1], 257 * 512);
        assert_eq!(again.get(&io, 256).unwrap(), 1);
        assert_eq!(again.get(&io, 257).unwrap(), 1);
        assert_eq!(again.get(&io, 258).unwrap(), 1);
        assert_eq!(again.get(&io, 259).unwrap(), 0);
    }

    #[test]
    fn alloc_past_the_table_is_table_full() {
        let io = small_image();
        let mut r = Refcounts::load(&io, 9, 4, 512, 1).unwrap();
        // 64 table entries of 256 clusters.
        assert_eq!(r.covered(), 64 * 256);
        assert!(matches!(
            r.alloc(&io, 64 * 256),
            Err(RefcountError::TableFull { .. })
        ));
    }
}
