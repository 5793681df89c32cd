//! The block store shared by the cow and cache filters: a sparse temporary file the size of
//! the layer below, cut into fixed-size blocks, and one state byte per block in memory.
//!
//! The file is made in `$TMPDIR` (else `/var/tmp`, as nbdkit) and unlinked at once, so it
//! vanishes with the process. Block contents live only in the file (the page cache keeps hot
//! blocks in memory); the state of each block (what the filter means by 0, 1, 2: "not
//! there", "there", "trimmed" for cow, "not cached", "clean", "dirty" for cache) is an atomic
//! byte, so lookups take no lock.
//!
//! # Concurrency
//!
//! nbdkit's filters hold one global lock over their block maps (the cache filter over all of
//! its I/O). Here each block has its own busy bit in its state byte instead: whoever changes a
//! block's contents or state (a write, a read-modify-write, a cow-on-read copy, a write-back)
//! first acquires the block with a compare-and-swap ([`Overlay::lock`]), does its file I/O and
//! releases it with the new state. Requests to different blocks never wait for each other;
//! two requests to one block are serialised, which makes read-modify-write and "copy on read
//! only if nobody wrote meanwhile" ([`Overlay::try_lock`]) safe. Readers do not lock: a read
//! racing a write to the same block may see either, as on any disk. Locks are only ever held
//! over one block's I/O, and blocks are acquired one at a time in ascending order, so there
//! is no deadlock.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::OnceLock;

use crate::error::{BlockError, Errno, Result};
use crate::plugin::FileRange;

const BUSY: u8 = 0x80;
/// The cache filter's "recently used" bit (its clock hand clears it).
pub const RECENT: u8 = 0x40;
const STATE: u8 = 0x3f;

/// The most blocks an overlay may have (one state byte each).
const MAX_BLOCKS: u64 = 1 << 32;

/// A temporary block file plus per-block states.
pub struct Overlay {
    file: File,
    blksize: u64,
    /// Per-block state bytes, sized at the first connection.
    blocks: OnceLock<(u64, Box<[AtomicU8]>)>,
    /// Blocks in a state other than 0.
    used: AtomicU64,
}

impl Overlay {
    /// Creates the (empty, unlinked) temporary file for a filter called `owner`, with blocks
    /// of `blksize` bytes, or of the file system's block size if `fs_min` and that is larger
    /// (so that reclaimed blocks can be punched out).
    pub fn create(owner: &str, blksize: u64, fs_min: bool) -> Result<Overlay> {
        let dir = std::env::var_os("TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp"));
        static SEQ: AtomicU64 = AtomicU64::new(0);
        for _ in 0..100 {
            let name = format!(
                "sluice-{owner}-{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            );
            let path = dir.join(name);
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(file) => {
                    let _ = std::fs::remove_file(&path);
                    let blksize = if fs_min {
                        use std::os::unix::fs::MetadataExt;
                        blksize.max(file.metadata().map_or(0, |m| m.blksize()))
                    } else {
                        blksize
                    };
                    return Ok(Overlay {
                        file,
                        blksize,
                        blocks: OnceLock::new(),
                        used: AtomicU64::new(0),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(BlockError::new(
                        Errno::EINVAL,
                        format!("{owner}: temporary file in {}: {e}", dir.display()),
                    ))
                }
            }
        }
        Err(BlockError::new(
            Errno::EINVAL,
            format!(
                "{owner}: cannot create a temporary file in {}",
                dir.display()
            ),
        ))
    }

    pub fn blksize(&self) -> u64 {
        self.blksize
    }

    /// Sizes the overlay for a layer below of `size` bytes (first connection), or checks
    /// that the size has not changed (later ones).
    pub fn set_size(&self, owner: &str, size: u64) -> Result<()> {
        let nblocks = size.div_ceil(self.blksize);
        if nblocks > MAX_BLOCKS {
            return Err(BlockError::new(
                Errno::ENOMEM,
                format!("{owner}: the disk is too large for the block size"),
            ));
        }
        let (have, _) = self.blocks.get_or_init(|| {
            let _ = self.file.set_len(nblocks * self.blksize);
            (size, (0..nblocks).map(|_| AtomicU8::new(0)).collect())
        });
        if *have != size {
            return Err(BlockError::new(
                Errno::EIO,
                format!("{owner}: the underlying size changed ({have} to {size})"),
            ));
        }
        Ok(())
    }

    fn states(&self) -> &[AtomicU8] {
        self.blocks.get().map_or(&[], |(_, b)| b)
    }

    /// The state of block `blk` (without the busy and recent bits).
    pub fn state(&self, blk: u64) -> u8 {
        self.states()
            .get(blk as usize)
            .map_or(0, |s| s.load(Ordering::Acquire) & STATE)
    }

    /// How many of the `max` blocks from `blk` share `blk`'s state.
    pub fn run(&self, blk: u64, max: u64) -> (u8, u64) {
        let s = self.state(blk);
        let n = (1..max).take_while(|&i| self.state(blk + i) == s).count() as u64 + 1;
        (s, n)
    }

    /// The state shared by every block that `[off, off+count)` touches, or None if they
    /// differ (or the range is empty).
    pub fn uniform(&self, off: u64, count: u64) -> Option<u8> {
        let end = off.checked_add(count).filter(|_| count > 0)?;
        let (first, last) = (off / self.blksize, (end - 1) / self.blksize);
        let (state, n) = self.run(first, last - first + 1);
        (n == last - first + 1).then_some(state)
    }

    /// Where the file keeps the bytes at disk offset `off`: block `b` lives at
    /// `b * blksize`, so at the same offset.
    pub fn file_range(&self, off: u64) -> FileRange<'_> {
        FileRange {
            fd: self.file.as_fd(),
            offset: off,
        }
    }

    /// Marks `blk` recently used (cache LRU).
    pub fn touch(&self, blk: u64) {
        if let Some(s) = self.states().get(blk as usize) {
            s.fetch_or(RECENT, Ordering::Relaxed);
        }
    }

    /// Blocks whose state is not 0.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn nblocks(&self) -> u64 {
        self.states().len() as u64
    }

    /// Acquires block `blk` (waiting while another holds it).
    pub fn lock(&self, blk: u64) -> BlockGuard<'_> {
        let cell = &self.states()[blk as usize];
        let mut spins = 0u32;
        loop {
            let cur = cell.load(Ordering::Relaxed);
            if cur & BUSY == 0
                && cell
                    .compare_exchange_weak(cur, cur | BUSY, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return BlockGuard {
                    overlay: self,
                    cell,
                    old: cur & STATE,
                    new: cur & STATE,
                };
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Acquires block `blk` only if nobody holds it and its state is `state`.
    pub fn try_lock(&self, blk: u64, state: u8) -> Option<BlockGuard<'_>> {
        let cell = &self.states()[blk as usize];
        let cur = cell.load(Ordering::Relaxed);
        if cur & (BUSY | STATE) != state {
            return None;
        }
        cell.compare_exchange(cur, cur | BUSY, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| BlockGuard {
                overlay: self,
                cell,
                old: state,
                new: state,
            })
    }

    /// Clears the recent bit of `blk`, returning whether it was set (the clock's test).
    pub fn take_recent(&self, blk: u64) -> bool {
        self.states()
            .get(blk as usize)
            .is_some_and(|s| s.fetch_and(!RECENT, Ordering::Relaxed) & RECENT != 0)
    }

    /// Reads whole blocks from `blk` into `buf` (a multiple of the block size).
    pub fn read(&self, blk: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, blk * self.blksize)
            .map_err(|e| BlockError::io(format!("overlay: pread at {}", blk * self.blksize), e))
    }

    /// Reads `buf.len()` bytes of block `blk` from byte `at`.
    pub fn read_at(&self, blk: u64, at: usize, buf: &mut [u8]) -> Result<()> {
        let off = blk * self.blksize + at as u64;
        self.file
            .read_exact_at(buf, off)
            .map_err(|e| BlockError::io(format!("overlay: pread at {off}"), e))
    }

    /// Writes whole blocks at `blk` from `buf`.
    pub fn write(&self, blk: u64, buf: &[u8]) -> Result<()> {
        self.file
            .write_all_at(buf, blk * self.blksize)
            .map_err(|e| BlockError::io(format!("overlay: pwrite at {}", blk * self.blksize), e))
    }

    /// Writes `patch` into block `blk` at byte `at` (a block already in the overlay).
    pub fn write_at(&self, blk: u64, at: usize, patch: &Patch<'_>) -> Result<()> {
        let off = blk * self.blksize + at as u64;
        let r = match patch {
            Patch::Data(d) => self.file.write_all_at(d, off),
            Patch::Zero(n) => {
                let zeroes = super::lower::zero_buffer();
                let mut done = 0;
                let mut r = Ok(());
                while done < *n && r.is_ok() {
                    let k = (*n - done).min(zeroes.len());
                    r = self.file.write_all_at(&zeroes[..k], off + done as u64);
                    done += k;
                }
                r
            }
        };
        r.map_err(|e| BlockError::io(format!("overlay: pwrite at {off}"), e))
    }

    /// Frees the file space of block `blk` (its contents become zeroes).
    pub fn punch(&self, blk: u64) {
        use std::os::fd::AsRawFd;
        // SAFETY: fallocate on a file descriptor we own, with plain integer arguments; it
        // touches no memory of ours.
        unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (blk * self.blksize) as libc::off_t,
                self.blksize as libc::off_t,
            );
        }
    }

    /// Bytes of the layer below (the size given to [`Overlay::set_size`]).
    pub fn size(&self) -> u64 {
        self.blocks.get().map_or(0, |(s, _)| *s)
    }
}

/// Splits a read of `buf` at `off` over blocks of `bs` bytes: `part(blk, at, piece)` for
/// an unaligned head or tail inside one block, `whole(blk, piece)` for the run of whole
/// blocks between them (one call).
pub fn split_read(
    bs: u64,
    buf: &mut [u8],
    off: u64,
    mut part: impl FnMut(u64, usize, &mut [u8]) -> Result<()>,
    mut whole: impl FnMut(u64, &mut [u8]) -> Result<()>,
) -> Result<()> {
    let mut blk = off / bs;
    let head = (off % bs) as usize;
    let mut buf = buf;
    if head != 0 {
        let n = (bs as usize - head).min(buf.len());
        let (piece, rest) = buf.split_at_mut(n);
        part(blk, head, piece)?;
        buf = rest;
        blk += 1;
    }
    let body = buf.len() / bs as usize * bs as usize;
    let (run, tail) = buf.split_at_mut(body);
    if !run.is_empty() {
        whole(blk, run)?;
        blk += body as u64 / bs;
    }
    if !tail.is_empty() {
        part(blk, 0, tail)?;
    }
    Ok(())
}

/// A change to part of a block: bytes to write, or a run of zeroes.
pub enum Patch<'a> {
    Data(&'a [u8]),
    Zero(usize),
}

impl Patch<'_> {
    /// Applies the change to a whole block's bytes at `at`.
    pub fn apply(&self, block: &mut [u8], at: usize) {
        match self {
            Patch::Data(d) => block[at..at + d.len()].copy_from_slice(d),
            Patch::Zero(n) => block[at..at + n].fill(0),
        }
    }
}

/// Exclusive hold of one block; releases it with the state set by [`BlockGuard::set`].
pub struct BlockGuard<'a> {
    overlay: &'a Overlay,
    cell: &'a AtomicU8,
    old: u8,
    new: u8,
}

impl BlockGuard<'_> {
    /// The block's state when acquired.
    pub fn state(&self) -> u8 {
        self.old
    }
    /// The state to leave the block in.
    pub fn set(&mut self, state: u8) {
        self.new = state;
    }
}

impl Drop for BlockGuard<'_> {
    fn drop(&mut self) {
        match (self.old, self.new) {
            (0, n) if n != 0 => {
                self.overlay.used.fetch_add(1, Ordering::Relaxed);
            }
            (o, 0) if o != 0 => {
                self.overlay.used.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
        // Keep the recent bit; drop busy; set the state.
        let recent = self.cell.load(Ordering::Relaxed) & RECENT;
        self.cell.store(self.new | recent, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_blocks_round_trip_and_states_count() {
        let o = Overlay::create("test", 4096, false).unwrap();
        o.set_size("test", 10000).unwrap();
        assert_eq!(o.nblocks(), 3);
        assert!(o.set_size("test", 20000).is_err());
        {
            let mut g = o.lock(1);
            o.write(1, &[7u8; 4096]).unwrap();
            g.set(1);
        }
        assert_eq!(o.state(1), 1);
        assert_eq!(o.used(), 1);
        assert_eq!(o.run(0, 3), (0, 1));
        let mut buf = [0u8; 4096];
        o.read(1, &mut buf).unwrap();
        assert_eq!(buf, [7u8; 4096]);
        assert!(o.try_lock(1, 0).is_none());
        let g = o.try_lock(2, 0).unwrap();
        assert!(o.try_lock(2, 0).is_none());
        drop(g);
        o.touch(2);
        assert!(o.take_recent(2));
        assert!(!o.take_recent(2));
        assert_eq!(o.state(2), 0);
    }
}
