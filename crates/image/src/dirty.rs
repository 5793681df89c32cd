//! Dirty maps: which ranges of a node were written since someone started looking.
//!
//! Active `block-commit` (like QEMU's mirror) copies what the active layer holds into the
//! base while clients keep writing to the active layer. A [`DirtyMap`] installed on the
//! node with [`crate::Node::track_writes`] records every write, zero and trim *after* it
//! has completed (with the node's request gate still held, see `node/gate.rs`); the copier
//! clears a range *before* it reads it. So a write that lands after the clear marks the
//! range again and is copied again later, and a write that landed before it is in what the
//! copier reads: no write is ever left behind.
//!
//! The map is a bitmap with a fixed granularity (64 KiB, QEMU's default for mirror): a
//! 1 GiB node needs 2 KiB of bits. The same map is the storage of a named dirty bitmap
//! (`block-dirty-bitmap-add`, see [`crate::bitmaps`]), which adds clearing, merging and
//! reading it back as runs for NBD's `qemu:dirty-bitmap:` context.

use parking_lot::Mutex;

/// The default granularity of a dirty map (QEMU's mirror default).
pub const DIRTY_GRANULARITY: u64 = 64 * 1024;

/// A bitmap of dirty ranges (see the module doc).
#[derive(Debug)]
pub struct DirtyMap {
    size: u64,
    granularity: u64,
    inner: Mutex<Bits>,
}

#[derive(Debug)]
struct Bits {
    words: Vec<u64>,
    /// Number of set bits.
    count: u64,
}

impl DirtyMap {
    /// A clean map of a node of `size` bytes; `granularity` must be a power of two.
    pub fn new(size: u64, granularity: u64) -> DirtyMap {
        assert!(granularity.is_power_of_two());
        let bits = size.div_ceil(granularity);
        DirtyMap {
            size,
            granularity,
            inner: Mutex::new(Bits {
                words: vec![0; bits.div_ceil(64) as usize],
                count: 0,
            }),
        }
    }

    /// The blocks (bit indexes) that `[offset, offset+len)` touches.
    fn blocks(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let end = offset.saturating_add(len).min(self.size);
        if len == 0 || offset >= end {
            return 0..0;
        }
        offset / self.granularity..end.div_ceil(self.granularity)
    }

    /// Marks `[offset, offset+len)` dirty.
    pub fn mark(&self, offset: u64, len: u64) {
        let mut b = self.inner.lock();
        for i in self.blocks(offset, len) {
            let (w, m) = ((i / 64) as usize, 1u64 << (i % 64));
            if b.words[w] & m == 0 {
                b.words[w] |= m;
                b.count += 1;
            }
        }
    }

    /// The size of the node the map covers.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Set bits times the granularity, unclipped: what QEMU reports as a bitmap's `count`.
    pub fn count(&self) -> u64 {
        self.inner.lock().count * self.granularity
    }

    /// Clears every bit.
    pub fn clear(&self) {
        let mut b = self.inner.lock();
        b.words.fill(0);
        b.count = 0;
    }

    /// Marks in this map every range `other` has dirty (granularities may differ: a range is
    /// marked in whole blocks of this map). `other` must not be `self`.
    pub fn merge_from(&self, other: &DirtyMap) {
        for (offset, len) in other.runs() {
            self.mark(offset, len);
        }
    }

    /// Every dirty run, in order, clipped to the size.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        self.status(0, self.size, |offset, len, dirty| {
            if dirty {
                out.push((offset, len));
            }
        });
        out
    }

    /// Calls `f(offset, len, dirty)` for the runs of equal state that cover
    /// `[offset, offset+len)` (clipped to the size), in order: NBD's block status of a
    /// `qemu:dirty-bitmap:` context.
    pub fn status(&self, offset: u64, len: u64, mut f: impl FnMut(u64, u64, bool)) {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return;
        }
        let b = self.inner.lock();
        let is_set = |i: u64| b.words[(i / 64) as usize] & (1 << (i % 64)) != 0;
        let mut at = offset;
        while at < end {
            let block = at / self.granularity;
            let dirty = is_set(block);
            let mut next = block + 1;
            while next * self.granularity < end && is_set(next) == dirty {
                next += 1;
            }
            let run_end = (next * self.granularity).min(end);
            f(at, run_end - at, dirty);
            at = run_end;
        }
    }

    /// Bytes marked dirty (whole blocks; the last one may run past the end).
    pub fn dirty_bytes(&self) -> u64 {
        (self.inner.lock().count * self.granularity).min(self.size)
    }

    /// True if nothing is dirty.
    pub fn is_clean(&self) -> bool {
        self.inner.lock().count == 0
    }

    /// Takes (clears and returns) the dirty runs that touch `[offset, offset+len)`, in
    /// whole blocks clipped to the size: a backup's copy-before-write claims what it must
    /// copy before a write there.
    pub fn take_within(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let mut b = self.inner.lock();
        let mut out: Vec<(u64, u64)> = Vec::new();
        if b.count == 0 {
            return out;
        }
        for i in self.blocks(offset, len) {
            let (w, m) = ((i / 64) as usize, 1u64 << (i % 64));
            if b.words[w] & m == 0 {
                continue;
            }
            b.words[w] &= !m;
            b.count -= 1;
            let start = i * self.granularity;
            let end = (start + self.granularity).min(self.size);
            match out.last_mut() {
                Some((o, l)) if *o + *l == start => *l += end - start,
                _ => out.push((start, end - start)),
            }
        }
        out
    }

    /// Takes the first dirty run of at most `max` bytes at or after `from` (wrapping
    /// around to 0), clearing it: the caller must now copy it. None when clean.
    pub fn take(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let mut b = self.inner.lock();
        if b.count == 0 {
            return None;
        }
        let nbits = self.size.div_ceil(self.granularity);
        let start = (from / self.granularity).min(nbits);
        let is_set = |b: &Bits, i: u64| b.words[(i / 64) as usize] & (1 << (i % 64)) != 0;
        let first = (start..nbits)
            .chain(0..start)
            .find(|&i| is_set(&b, i))
            .expect("count > 0");
        let max_blocks = (max / self.granularity).max(1);
        let mut last = first;
        while last + 1 < nbits && last + 1 - first < max_blocks && is_set(&b, last + 1) {
            last += 1;
        }
        for i in first..=last {
            b.words[(i / 64) as usize] &= !(1 << (i % 64));
        }
        b.count -= last - first + 1;
        let offset = first * self.granularity;
        let end = ((last + 1) * self.granularity).min(self.size);
        Some((offset, end - offset))
    }

    /// The bits as bytes in QEMU's serialization (bit `i` is bit `i % 8` of byte `i / 8`,
    /// least significant first): what a qcow2 bitmap's data clusters hold. One byte per
    /// eight blocks, rounded up.
    pub fn to_bytes(&self) -> Vec<u8> {
        let nbits = self.size.div_ceil(self.granularity);
        let b = self.inner.lock();
        let mut out: Vec<u8> = b.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        out.truncate(nbits.div_ceil(8) as usize);
        out
    }

    /// Replaces the bits with `bytes` in the layout of [`DirtyMap::to_bytes`]; missing bytes
    /// are clean and bits past the size are ignored.
    pub fn load_bytes(&self, bytes: &[u8]) {
        let nbits = self.size.div_ceil(self.granularity);
        let mut b = self.inner.lock();
        let mut count = 0;
        for (i, w) in b.words.iter_mut().enumerate() {
            let mut le = [0u8; 8];
            let from = (i * 8).min(bytes.len());
            let to = (i * 8 + 8).min(bytes.len());
            le[..to - from].copy_from_slice(&bytes[from..to]);
            let mut v = u64::from_le_bytes(le);
            let first = i as u64 * 64;
            if first + 64 > nbits {
                v &= (1u64 << (nbits - first)) - 1;
            }
            *w = v;
            count += u64::from(v.count_ones());
        }
        b.count = count;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_and_take_whole_blocks_in_order() {
        let m = DirtyMap::new(10 << 16, 1 << 16);
        assert!(m.is_clean());
        m.mark(100, 1); // block 0
        m.mark((3 << 16) - 1, 2); // blocks 2 and 3
        assert_eq!(m.dirty_bytes(), 3 << 16);
        assert_eq!(m.take(0, 1 << 20), Some((0, 1 << 16)));
        assert_eq!(m.take(0, 1 << 20), Some((2 << 16, 2 << 16)));
        assert_eq!(m.take(0, 1 << 20), None);
    }

    #[test]
    fn take_within_claims_whole_touched_blocks_once() {
        let m = DirtyMap::new(100_000, 1 << 16);
        m.mark(0, 100_000);
        assert_eq!(
            m.take_within(70_000, 10),
            vec![(1 << 16, 100_000 - (1 << 16))]
        );
        assert_eq!(m.take_within(60_000, 20_000), vec![(0, 1 << 16)]);
        assert_eq!(m.take_within(0, 100_000), vec![]);
        assert!(m.is_clean());
    }

    #[test]
    fn take_respects_max_and_wraps_around() {
        let m = DirtyMap::new(8 << 16, 1 << 16);
        m.mark(0, 8 << 16);
        assert_eq!(m.take(5 << 16, 2 << 16), Some((5 << 16, 2 << 16)));
        assert_eq!(m.take(7 << 16, 4 << 16), Some((7 << 16, 1 << 16)));
        // Wraps: the rest starts at 0.
        assert_eq!(m.take(7 << 16, 16 << 16), Some((0, 5 << 16)));
        assert!(m.is_clean());
    }

    #[test]
    fn last_block_is_clipped_to_the_size_and_past_end_is_ignored() {
        let m = DirtyMap::new(100_000, 1 << 16);
        m.mark(99_999, 10);
        m.mark(200_000, 10);
        assert_eq!(m.take(0, u64::MAX), Some((1 << 16, 100_000 - (1 << 16))));
        assert_eq!(m.dirty_bytes(), 0);
    }

    #[test]
    fn status_gives_runs_and_merge_converts_granularity() {
        let m = DirtyMap::new(1 << 20, 1 << 16);
        m.mark(100, 1);
        m.mark(5 << 16, 2 << 16);
        let mut runs = Vec::new();
        m.status(10, 1 << 20, |o, l, d| runs.push((o, l, d)));
        assert_eq!(
            runs,
            vec![
                (10, (1 << 16) - 10, true),
                (1 << 16, 4 << 16, false),
                (5 << 16, 2 << 16, true),
                (7 << 16, 9 << 16, false)
            ]
        );
        let fine = DirtyMap::new(1 << 20, 512);
        fine.merge_from(&m);
        assert_eq!(fine.count(), 3 << 16);
        let coarse = DirtyMap::new(1 << 20, 1 << 19);
        coarse.merge_from(&m);
        assert_eq!(coarse.count(), 1 << 19);
        assert_eq!(m.count(), 3 << 16);
        m.clear();
        assert!(m.is_clean());
    }

    #[test]
    fn bytes_are_qemu_serialization_and_load_back_clipped() {
        // 70 blocks: 9 bytes.
        let m = DirtyMap::new(70 * 512, 512);
        m.mark(0, 1);
        m.mark(9 * 512, 1);
        m.mark(69 * 512, 1);
        let b = m.to_bytes();
        assert_eq!(b.len(), 9);
        assert_eq!((b[0], b[1], b[8]), (0b1, 0b10, 0b10_0000));
        let n = DirtyMap::new(70 * 512, 512);
        let mut ones = vec![0xff; 9];
        n.load_bytes(&ones);
        assert_eq!(n.count(), 70 * 512);
        ones[0] = 0;
        n.load_bytes(&b);
        assert_eq!(n.runs(), m.runs());
        assert_eq!(n.count(), 3 * 512);
    }

    #[test]
    fn a_mark_after_take_is_seen_again() {
        let m = DirtyMap::new(4 << 16, 1 << 16);
        m.mark(0, 1);
        let (o, l) = m.take(0, 1 << 16).unwrap();
        m.mark(o, l);
        assert_eq!(m.take(0, 1 << 16), Some((0, 1 << 16)));
    }
}
