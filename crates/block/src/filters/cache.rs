//! The cache filter (nbdkit-cache-filter): keeps blocks of the plugin in an [`Overlay`] so
//! that repeated reads (and, in writeback mode, writes) do not reach it.
//!
//! `cache=writeback` (default) keeps writes in the cache, marked dirty, until a flush (or a
//! FUA write) writes them to the plugin; `writethrough` writes every write to the plugin at
//! once too; `unsafe` ignores flush and FUA. Reads fill the cache only with
//! `cache-on-read` (true, false or an absolute path whose existence switches it); cache
//! requests always do. Blocks are `cache-min-block-size` (64 KiB) or the temporary file
//! system's block size, whichever is larger. Zero is written as zero blocks (a fast zero
//! fails with ENOTSUP); trim goes to the plugin.
//!
//! `cache-max-size` bounds the cache: once it passes `cache-high-threshold` percent (95) of
//! it, each request reclaims up to two blocks until it is under `cache-low-threshold` (80),
//! least recently used first (a clock over per-block "recently used" bits, in place of
//! nbdkit's two bitmaps). Reads hold a shared lock while they look at the cache, which
//! reclaiming takes exclusively, so a block is never punched out under a reader; without
//! `cache-max-size` the lock is not taken. Unlike nbdkit 1.32, which drops a dirty block it reclaims, a dirty
//! block is written to the plugin before it is dropped; and block status reports dirty blocks
//! as data (nbdkit passes the plugin's answer through, which can call unflushed data a hole).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use crate::error::{BlockError, Errno, Result};
use crate::extents::Extents;
use crate::filter::{Filter, Next};
use crate::plugin::{BlockSize, FileRange, Flags, Handle, OpenContext, Plugin, Support};
use crate::plugins::ConfigArg;

use super::cow::Switch;
use super::lower::Lower;
use super::overlay::{split_read, Overlay, Patch};
use super::{bad, each_param, over, parse_size, parse_u32, FilterEnv, FilterSpec};

pub const SPEC: FilterSpec = FilterSpec {
    name: "cache",
    keys: &[
        "cache",
        "cache-min-block-size",
        "cache-max-size",
        "cache-high-threshold",
        "cache-low-threshold",
        "cache-on-read",
    ],
    help: "cache=MODE                Set cache MODE, one of writeback (default),\n\
           \x20                         writethrough, or unsafe.\n\
           cache-on-read=BOOL|/PATH  Set to true to cache on reads (default false).\n\
           cache-max-size=SIZE       Set maximum space used by cache.\n\
           cache-high-threshold=PCT  Percentage of max size where reclaim begins.\n\
           cache-low-threshold=PCT   Percentage of max size where reclaim ends.",
    open,
};

const NOT_CACHED: u8 = 0;
const CLEAN: u8 = 1;
const DIRTY: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Writeback,
    Writethrough,
    Unsafe,
}

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut mode = Mode::Writeback;
    let mut min_block = 65536;
    let mut max_size = None;
    let (mut hi, mut lo) = (95u64, 80u64);
    let mut on_read = Switch::Off;
    each_param(&SPEC, params, |k, v| {
        match k {
            "cache" => {
                mode = match v {
                    "writeback" => Mode::Writeback,
                    "writethrough" => Mode::Writethrough,
                    "unsafe" => Mode::Unsafe,
                    _ => {
                        return Err(bad(
                            "cache",
                            k,
                            "invalid cache parameter, should be writeback|writethrough|unsafe",
                        ))
                    }
                }
            }
            "cache-min-block-size" => {
                let r = parse_size("cache", k, v)?;
                if r < 4096 || !r.is_power_of_two() || r > u64::from(u32::MAX) {
                    return Err(bad(
                        "cache",
                        k,
                        "is not a power of 2, or is too small or too large",
                    ));
                }
                min_block = r;
            }
            "cache-max-size" => {
                let r = parse_size("cache", k, v)?;
                if r < 1024 * 1024 {
                    return Err(bad("cache", k, "is too small"));
                }
                max_size = Some(r);
            }
            "cache-high-threshold" | "cache-low-threshold" => {
                let t = u64::from(parse_u32("cache", k, v)?);
                if t == 0 {
                    return Err(bad("cache", k, "must be greater than zero"));
                }
                if k == "cache-high-threshold" {
                    hi = t;
                } else {
                    lo = t;
                }
            }
            _ => on_read = Switch::parse("cache", k, v)?,
        }
        Ok(())
    })?;
    if max_size.is_some() && lo >= hi {
        return Err(bad(
            "cache",
            "cache-low-threshold",
            "must be less than cache-high-threshold",
        ));
    }
    let overlay = Overlay::create("cache", min_block, true)?;
    Ok(over(
        Cache {
            overlay,
            mode,
            on_read,
            limits: max_size.map(|m| (m * hi / 100, m * lo / 100)),
            reclaiming: AtomicBool::new(false),
            hand: AtomicU64::new(0),
            reclaim_lock: RwLock::new(()),
        },
        inner,
    ))
}

pub struct Cache {
    overlay: Overlay,
    mode: Mode,
    on_read: Switch,
    /// (start reclaiming above, stop below) in bytes, if cache-max-size was given.
    limits: Option<(u64, u64)>,
    reclaiming: AtomicBool,
    /// The reclaim clock's hand.
    hand: AtomicU64,
    /// Shared by reads, exclusive while reclaiming (only taken with cache-max-size).
    reclaim_lock: RwLock<()>,
}

/// Per connection: the plugin's size and capabilities.
pub struct Conn {
    size: u64,
    lower: Lower,
}

impl Cache {
    fn bs(&self) -> u64 {
        self.overlay.blksize()
    }

    /// Reads from the plugin at `offset`, zero-filling past its end.
    fn read_plugin(c: &Conn, next: &Next, offset: u64, buf: &mut [u8]) -> Result<()> {
        let n = c.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        if n > 0 {
            next.pread(&mut buf[..n], offset, Flags::NONE)?;
        }
        buf[n..].fill(0);
        Ok(())
    }

    /// Writes `data` (whole block `blk`) to the plugin, clipped to its size.
    fn write_plugin(&self, c: &Conn, next: &Next, blk: u64, data: &[u8], f: Flags) -> Result<()> {
        let at = blk * self.bs();
        let n = c.size.saturating_sub(at).min(data.len() as u64) as usize;
        c.lower.pwrite(next, &data[..n], at, f)
    }

    /// Drops up to two blocks while the cache is over its high threshold (until it is under
    /// the low one), least recently used first; dirty ones are written back first.
    fn reclaim(&self, c: &Conn, next: &Next) -> Result<()> {
        let Some((high, low)) = self.limits else {
            return Ok(());
        };
        let used = self.overlay.used() * self.bs();
        if self.reclaiming.load(Ordering::Relaxed) {
            if used < low {
                self.reclaiming.store(false, Ordering::Relaxed);
                return Ok(());
            }
        } else if used < high {
            return Ok(());
        } else {
            self.reclaiming.store(true, Ordering::Relaxed);
        }
        // Readers of the overlay hold this shared: a block must not be punched out between
        // a reader's look at its state and its read.
        let _readers_out = self
            .reclaim_lock
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let n = self.overlay.nblocks();
        let mut reclaimed = 0;
        // Two sweeps clear every recent bit, so a victim is found if any block is cached.
        for _ in 0..2 * n {
            if reclaimed == 2 {
                break;
            }
            let blk = self.hand.fetch_add(1, Ordering::Relaxed) % n;
            let state = self.overlay.state(blk);
            if state == NOT_CACHED || self.overlay.take_recent(blk) {
                continue;
            }
            let Some(mut g) = self.overlay.try_lock(blk, state) else {
                continue;
            };
            if state == DIRTY {
                let mut block = vec![0u8; self.bs() as usize];
                self.overlay.read(blk, &mut block)?;
                self.write_plugin(c, next, blk, &block, Flags::NONE)?;
            }
            self.overlay.punch(blk);
            g.set(NOT_CACHED);
            reclaimed += 1;
        }
        Ok(())
    }

    /// Reads whole blocks from `blk` into `buf`, from the cache or the plugin.
    fn read_blocks(&self, c: &Conn, next: &Next, mut blk: u64, mut buf: &mut [u8]) -> Result<()> {
        let bs = self.bs();
        let on_read = self.on_read.on();
        while !buf.is_empty() {
            let (state, n) = self.overlay.run(blk, buf.len() as u64 / bs);
            let (piece, rest) = buf.split_at_mut((n * bs) as usize);
            if state == NOT_CACHED {
                Self::read_plugin(c, next, blk * bs, piece)?;
                if on_read {
                    for (i, block) in piece.chunks(bs as usize).enumerate() {
                        let b = blk + i as u64;
                        if let Some(mut g) = self.overlay.try_lock(b, NOT_CACHED) {
                            self.overlay.write(b, block)?;
                            g.set(CLEAN);
                            self.overlay.touch(b);
                        }
                    }
                }
            } else {
                self.overlay.read(blk, piece)?;
                (blk..blk + n).for_each(|b| self.overlay.touch(b));
            }
            buf = rest;
            blk += n;
        }
        Ok(())
    }

    /// Reads part of block `blk` from byte `at`: only those bytes, from the cache or the
    /// plugin, unless cache-on-read wants the whole block cached.
    fn read_part(&self, c: &Conn, next: &Next, blk: u64, at: usize, out: &mut [u8]) -> Result<()> {
        if self.overlay.state(blk) != NOT_CACHED {
            self.overlay.read_at(blk, at, out)?;
            self.overlay.touch(blk);
            return Ok(());
        }
        if !self.on_read.on() {
            return Self::read_plugin(c, next, blk * self.bs() + at as u64, out);
        }
        let mut block = vec![0u8; self.bs() as usize];
        self.read_blocks(c, next, blk, &mut block)?;
        out.copy_from_slice(&block[at..at + out.len()]);
        Ok(())
    }

    /// Stores whole block `blk` (the caller holds it): written through to the plugin in
    /// writethrough mode or for FUA in writeback mode, else kept dirty.
    fn store(
        &self,
        c: &Conn,
        next: &Next,
        g: &mut super::overlay::BlockGuard<'_>,
        blk: u64,
        data: &[u8],
        f: Flags,
    ) -> Result<()> {
        self.overlay.write(blk, data)?;
        if self.through(f) {
            self.write_plugin(c, next, blk, data, f)?;
            g.set(CLEAN);
        } else {
            g.set(DIRTY);
        }
        self.overlay.touch(blk);
        Ok(())
    }

    /// Changes part of block `blk`. A cached block that is kept dirty is patched in place;
    /// otherwise (not cached, or written through, which writes whole blocks) it is read,
    /// patched and stored whole.
    fn modify(
        &self,
        c: &Conn,
        next: &Next,
        blk: u64,
        f: Flags,
        at: usize,
        patch: Patch<'_>,
    ) -> Result<()> {
        self.reclaim(c, next)?;
        let mut g = self.overlay.lock(blk);
        if g.state() != NOT_CACHED && !self.through(f) {
            self.overlay.write_at(blk, at, &patch)?;
            g.set(DIRTY);
            self.overlay.touch(blk);
            return Ok(());
        }
        let mut block = vec![0u8; self.bs() as usize];
        if g.state() == NOT_CACHED {
            Self::read_plugin(c, next, blk * self.bs(), &mut block)?;
        } else {
            self.overlay.read(blk, &mut block)?;
        }
        patch.apply(&mut block, at);
        self.store(c, next, &mut g, blk, &block, f)
    }

    /// Whether a write with flags `f` goes to the plugin at once.
    fn through(&self, f: Flags) -> bool {
        self.mode == Mode::Writethrough || (self.mode == Mode::Writeback && f.contains(Flags::FUA))
    }

    fn write_block(&self, c: &Conn, next: &Next, blk: u64, data: &[u8], f: Flags) -> Result<()> {
        self.reclaim(c, next)?;
        let mut g = self.overlay.lock(blk);
        self.store(c, next, &mut g, blk, data, f)
    }

    /// Calls `part(blk, at, len, done)` for partial blocks and `whole(blk, done)` for whole
    /// ones covering `[off, off+count)`; `done` is the bytes before this piece.
    fn split(
        &self,
        count: u64,
        off: u64,
        mut part: impl FnMut(u64, usize, usize, usize) -> Result<()>,
        mut whole: impl FnMut(u64, usize) -> Result<()>,
    ) -> Result<()> {
        let bs = self.bs();
        let mut blk = off / bs;
        let head = off % bs;
        let mut count = count;
        let mut done = 0usize;
        if head != 0 {
            let n = (bs - head).min(count);
            part(blk, head as usize, n as usize, done)?;
            blk += 1;
            count -= n;
            done += n as usize;
        }
        while count >= bs {
            whole(blk, done)?;
            blk += 1;
            count -= bs;
            done += bs as usize;
        }
        if count > 0 {
            part(blk, 0, count as usize, done)?;
        }
        Ok(())
    }

    /// FUA that needs a flush after the whole request, and the flags for each block.
    fn fua(&self, c: &Conn, f: Flags) -> (Flags, bool) {
        if f.contains(Flags::FUA) && (self.mode == Mode::Unsafe || c.lower.fua == Support::Emulate)
        {
            (f.without(Flags::FUA), true)
        } else {
            (f, false)
        }
    }

    fn write_back(&self, c: &Conn, next: &Next) -> Result<()> {
        let mut first_err: Option<BlockError> = None;
        let mut block = vec![0u8; self.bs() as usize];
        for blk in 0..self.overlay.nblocks() {
            if self.overlay.state(blk) != DIRTY {
                continue;
            }
            let Some(mut g) = self.overlay.try_lock(blk, DIRTY).or_else(|| {
                let g = self.overlay.lock(blk);
                (g.state() == DIRTY).then_some(g)
            }) else {
                continue;
            };
            let r = self
                .overlay
                .read(blk, &mut block)
                .and_then(|()| self.write_plugin(c, next, blk, &block, Flags::NONE));
            match r {
                Ok(()) => g.set(CLEAN),
                Err(e) => {
                    tracing::error!("cache: flush of block {blk} failed: {e}");
                    first_err.get_or_insert(e);
                }
            }
        }
        let flushed = c.lower.flush(next);
        match (first_err, flushed) {
            (Some(e), _) | (None, Err(e)) => Err(e),
            _ => Ok(()),
        }
    }
}

impl Filter for Cache {
    type Conn = Conn;
    fn name(&self) -> &str {
        "cache"
    }
    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<(Conn, Next)> {
        let next = Next::open(next, ctx)?;
        let size = next.get_size()?;
        self.overlay.set_size("cache", size)?;
        let lower = Lower::query(&next, ctx.readonly)?;
        Ok((Conn { size, lower }, next))
    }
    fn block_size(&self, _: &Conn, next: &Next) -> Result<Option<BlockSize>> {
        let bs = self.bs() as u32;
        Ok(Some(match next.block_size()? {
            None => BlockSize {
                minimum: 1,
                preferred: bs,
                maximum: u32::MAX,
            },
            Some(b) if b.maximum >= bs => BlockSize {
                preferred: b.preferred.max(bs),
                ..b
            },
            Some(b) => b,
        }))
    }
    fn can_cache(&self, _: &Conn, _: &Next) -> Result<Support> {
        Ok(Support::Native)
    }
    fn can_fast_zero(&self, _: &Conn, _: &Next) -> Result<bool> {
        Ok(true)
    }
    fn can_flush(&self, _: &Conn, next: &Next) -> Result<bool> {
        match self.mode {
            Mode::Unsafe => Ok(true),
            _ => next.can_flush(),
        }
    }
    fn can_fua(&self, _: &Conn, next: &Next) -> Result<Support> {
        match self.mode {
            Mode::Unsafe => Ok(Support::Native),
            _ => next.can_fua(),
        }
    }
    fn can_multi_conn(&self, _: &Conn, next: &Next) -> Result<bool> {
        match self.mode {
            Mode::Writethrough => next.can_multi_conn(),
            _ => Ok(true),
        }
    }
    fn pread(&self, c: &Conn, next: &Next, buf: &mut [u8], off: u64, _: Flags) -> Result<()> {
        self.reclaim(c, next)?;
        let _no_reclaim = self.limits.map(|_| {
            self.reclaim_lock
                .read()
                .unwrap_or_else(PoisonError::into_inner)
        });
        split_read(
            self.bs(),
            buf,
            off,
            |blk, at, piece| self.read_part(c, next, blk, at, piece),
            |blk, run| self.read_blocks(c, next, blk, run),
        )
    }
    /// Where [`Cache::pread`] would read all of the range from one place: the plugin, for a
    /// range not in the cache (unless cache-on-read must fill it), or the cache file, for one
    /// cached in every block. Only without `cache-max-size`: a reclaim punches blocks out of
    /// the file (which can zero pages still on their way to a client) and reads must mark
    /// blocks recently used, so with a limit every read goes through `pread`.
    fn file_range<'a>(
        &'a self,
        _: &'a Conn,
        next: &'a Next,
        count: u64,
        off: u64,
    ) -> Option<FileRange<'a>> {
        if self.limits.is_some() {
            return None;
        }
        match self.overlay.uniform(off, count)? {
            NOT_CACHED if !self.on_read.on() => next.file_range(count, off),
            NOT_CACHED => None,
            _ => Some(self.overlay.file_range(off)),
        }
    }
    fn pwrite(&self, c: &Conn, next: &Next, buf: &[u8], off: u64, f: Flags) -> Result<()> {
        let (f, flush) = self.fua(c, f);
        let bs = self.bs() as usize;
        self.split(
            buf.len() as u64,
            off,
            |blk, at, n, done| self.modify(c, next, blk, f, at, Patch::Data(&buf[done..done + n])),
            |blk, done| self.write_block(c, next, blk, &buf[done..done + bs], f),
        )?;
        if flush {
            self.flush(c, next, Flags::NONE)?;
        }
        Ok(())
    }
    fn zero(&self, c: &Conn, next: &Next, count: u64, off: u64, f: Flags) -> Result<()> {
        if f.contains(Flags::FAST_ZERO) {
            return Err(BlockError::new(
                Errno::ENOTSUP,
                "cache: zeroing is never faster than writing",
            ));
        }
        let (f, flush) = self.fua(c, f.without(Flags::MAY_TRIM));
        let zeroes = vec![0u8; self.bs() as usize];
        self.split(
            count,
            off,
            |blk, at, n, _| self.modify(c, next, blk, f, at, Patch::Zero(n)),
            |blk, _| self.write_block(c, next, blk, &zeroes, f),
        )?;
        if flush {
            self.flush(c, next, Flags::NONE)?;
        }
        Ok(())
    }
    fn flush(&self, c: &Conn, next: &Next, _: Flags) -> Result<()> {
        if self.mode == Mode::Unsafe {
            return Ok(());
        }
        self.write_back(c, next)
    }
    fn cache(&self, c: &Conn, next: &Next, count: u64, off: u64, _: Flags) -> Result<()> {
        let bs = self.bs();
        let mut block = vec![0u8; bs as usize];
        for blk in off / bs..(off + count).div_ceil(bs) {
            self.reclaim(c, next)?;
            if let Some(mut g) = self.overlay.try_lock(blk, NOT_CACHED) {
                Self::read_plugin(c, next, blk * bs, &mut block)?;
                self.overlay.write(blk, &block)?;
                g.set(CLEAN);
            }
            self.overlay.touch(blk);
        }
        Ok(())
    }
    fn extents(
        &self,
        c: &Conn,
        next: &Next,
        count: u64,
        off: u64,
        f: Flags,
        out: &mut Extents,
    ) -> Result<()> {
        if self.overlay.used() == 0 {
            return c.lower.extents(next, count, off, f, out);
        }
        let mut below = Extents::new(off, out.end());
        c.lower.extents(next, count, off, f, &mut below)?;
        // Dirty blocks hold data the plugin has not seen yet.
        let bs = self.bs();
        for e in below.as_slice() {
            let mut at = e.offset;
            let end = e.offset + e.length;
            while at < end {
                let blk_end = ((at / bs + 1) * bs).min(end);
                let kind = if e.kind != 0 && self.overlay.state(at / bs) == DIRTY {
                    0
                } else {
                    e.kind
                };
                out.add(at, blk_end - at, kind)?;
                at = blk_end;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::super::test_support::*;
    use super::*;

    /// Memory that logs writes and flushes.
    struct Logged(Arc<dyn Plugin>, Arc<Mutex<Vec<String>>>);
    struct LoggedHandle(Box<dyn Handle>, Arc<Mutex<Vec<String>>>);
    impl Plugin for Logged {
        fn name(&self) -> &str {
            "logged"
        }
        fn open(&self, ctx: &OpenContext<'_>) -> Result<Box<dyn Handle>> {
            Ok(Box::new(LoggedHandle(self.0.open(ctx)?, self.1.clone())))
        }
    }
    impl Handle for LoggedHandle {
        fn get_size(&self) -> Result<u64> {
            self.0.get_size()
        }
        fn can_write(&self) -> Result<bool> {
            Ok(true)
        }
        fn can_flush(&self) -> Result<bool> {
            Ok(true)
        }
        fn can_fua(&self) -> Result<Support> {
            Ok(Support::Native)
        }
        fn can_extents(&self) -> Result<bool> {
            Ok(true)
        }
        fn pread(&self, buf: &mut [u8], off: u64, f: Flags) -> Result<()> {
            self.1
                .lock()
                .unwrap()
                .push(format!("pread {off} {}", buf.len()));
            self.0.pread(buf, off, f)
        }
        fn pwrite(&self, buf: &[u8], off: u64, f: Flags) -> Result<()> {
            self.1
                .lock()
                .unwrap()
                .push(format!("pwrite {off} {}", buf.len()));
            self.0.pwrite(buf, off, f)
        }
        fn flush(&self, f: Flags) -> Result<()> {
            self.1.lock().unwrap().push("flush".into());
            self.0.flush(f)
        }
        fn extents(&self, n: u64, off: u64, f: Flags, e: &mut Extents) -> Result<()> {
            self.0.extents(n, off, f, e)
        }
    }

    fn setup(kv: &[(&str, &str)]) -> (crate::Export, Arc<dyn Plugin>, Arc<Mutex<Vec<String>>>) {
        let mem = memory(4 << 20);
        let log = Arc::new(Mutex::new(Vec::new()));
        let p = Arc::new(Logged(mem.clone(), log.clone()));
        (export(filter("cache", kv, p), false), mem, log)
    }

    fn take(log: &Mutex<Vec<String>>) -> Vec<String> {
        std::mem::take(&mut *log.lock().unwrap())
    }

    #[test]
    fn cache_file_range_is_the_cache_file_only_for_whole_hits_without_a_size_limit() {
        let (e, _, _) = setup(&[]);
        let at = |e: &crate::Export, count, off| e.with_file_range(count, off, |r| r.offset);
        e.write(&[3u8; 131072], 0, Flags::NONE).unwrap();
        assert_eq!(at(&e, 131072, 0), Some(0));
        assert_eq!(at(&e, 5000, 70_000), Some(70_000));
        assert_eq!(at(&e, 131073, 0), None, "one byte of a block not cached");
        // A miss is the memory plugin's, which has no file.
        assert_eq!(at(&e, 4096, 200_000), None);
        // With cache-max-size, a reclaim may punch a block out under a spliced read.
        let (e, _, _) = setup(&[("cache-max-size", "1M")]);
        e.write(&[3u8; 131072], 0, Flags::NONE).unwrap();
        assert_eq!(at(&e, 131072, 0), None);
    }

    #[test]
    fn cache_writeback_holds_writes_until_flush() {
        let (e, mem, log) = setup(&[]);
        e.write(&[3u8; 100_000], 10, Flags::NONE).unwrap();
        assert!(take(&log).iter().all(|l| !l.starts_with("pwrite")));
        let mut below = [0u8; 100];
        export(mem.clone(), true).read(&mut below, 10).unwrap();
        assert_eq!(below, [0u8; 100], "not written back yet");
        // Block status already shows data.
        assert_eq!(
            e.extents(65536, 0, Flags::NONE).unwrap().as_slice()[0].kind,
            0
        );
        let mut back = vec![0u8; 100_000];
        e.read(&mut back, 10).unwrap();
        assert!(back.iter().all(|&b| b == 3));
        e.flush().unwrap();
        assert_eq!(
            take(&log),
            ["pwrite 0 65536", "pwrite 65536 65536", "flush"]
        );
        export(mem, true).read(&mut below, 10).unwrap();
        assert_eq!(below, [3u8; 100]);
        // Reads now come from the cache.
        e.read(&mut back, 10).unwrap();
        assert!(take(&log).is_empty());
    }

    #[test]
    fn cache_partial_writes_patch_dirty_blocks_and_fua_writes_the_whole_block() {
        let (e, mem, log) = setup(&[]);
        e.write(&[1u8; 100], 50, Flags::NONE).unwrap();
        e.write(&[2u8; 10], 60, Flags::NONE).unwrap();
        let mut buf = [9u8; 200];
        e.read(&mut buf, 0).unwrap();
        let mut want = [0u8; 200];
        want[50..150].fill(1);
        want[60..70].fill(2);
        assert_eq!(buf, want);
        take(&log);
        // FUA on a dirty block writes the whole block through, earlier patches included.
        e.write(&[3u8; 1], 0, Flags::FUA).unwrap();
        assert_eq!(take(&log), ["pwrite 0 65536"]);
        export(mem, true).read(&mut buf, 0).unwrap();
        want[0] = 3;
        assert_eq!(buf, want);
    }

    #[test]
    fn cache_writethrough_and_fua_write_at_once() {
        let (e, _, log) = setup(&[("cache", "writethrough")]);
        e.write(&[1u8; 65536], 0, Flags::NONE).unwrap();
        assert_eq!(take(&log), ["pwrite 0 65536"]);
        let (e, _, log) = setup(&[]);
        e.write(&[1u8; 65536], 0, Flags::FUA).unwrap();
        assert_eq!(take(&log), ["pwrite 0 65536"]);
        let (e, _, log) = setup(&[("cache", "unsafe")]);
        e.write(&[1u8; 65536], 0, Flags::FUA).unwrap();
        e.flush().unwrap();
        assert!(take(&log).is_empty());
    }

    #[test]
    fn cache_on_read_and_cache_requests_fill_the_cache() {
        let (e, _, log) = setup(&[("cache-on-read", "true")]);
        let mut buf = vec![0u8; 65536];
        e.read(&mut buf, 0).unwrap();
        e.read(&mut buf, 0).unwrap();
        assert_eq!(take(&log), ["pread 0 65536"]);
        let (e, _, log) = setup(&[]);
        e.cache(65536, 65536).unwrap();
        e.read(&mut buf, 65536).unwrap();
        assert_eq!(take(&log), ["pread 65536 65536"]);
        assert_eq!(
            e.zero(4096, 0, Flags::FAST_ZERO).unwrap_err().errno,
            Errno::ENOTSUP
        );
    }

    #[test]
    fn cache_max_size_reclaims_and_writes_dirty_blocks_back_first() {
        let (e, mem, _) = setup(&[("cache-max-size", "1M")]);
        // 4 MiB of writes through a 1 MiB cache: reclaim must write back, not lose data.
        for i in 0..64u64 {
            e.write(&[i as u8 + 1; 65536], i * 65536, Flags::NONE)
                .unwrap();
        }
        let mut buf = vec![0u8; 65536];
        for i in 0..64u64 {
            e.read(&mut buf, i * 65536).unwrap();
            assert!(buf.iter().all(|&b| b == i as u8 + 1), "block {i}");
        }
        e.flush().unwrap();
        export(mem, true).read(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 1));
    }

    #[test]
    fn cache_parameters_are_checked() {
        assert!(config_error("cache", &[("cache", "x")]).contains("writeback|writethrough|unsafe"));
        assert!(config_error("cache", &[("cache-max-size", "100k")]).contains("too small"));
        assert!(config_error(
            "cache",
            &[("cache-max-size", "1G"), ("cache-low-threshold", "96")]
        )
        .contains("must be less than"));
    }
}
