//! The cow filter (nbdkit-cow-filter): a writable copy-on-write overlay over a plugin that is
//! opened read-only and never written.
//!
//! Writes, zeroes and trims land in an [`Overlay`] of `cow-block-size` blocks (64 KiB by
//! default) shared by every connection and thrown away at exit; reads come from the overlay
//! where a block was written and from the plugin elsewhere. Unaligned writes are
//! read-modify-writes of one block. `cow-on-read` (true, false, or an absolute path whose
//! existence switches it) also copies blocks read from the plugin into the overlay;
//! `cow-on-cache` does so for cache requests. Block status reports written blocks as data,
//! trimmed ones as holes, and asks the plugin about the rest.
//!
//! Capabilities are nbdkit 1.32's: writable, trim, flush and FUA (both no-ops: the overlay
//! is temporary), cache, extents and multi-conn on; WRITE_ZEROES follows the read-only
//! plugin below, so it is off, as nbdkit advertises it.

use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{BlockError, Errno, Result};
use crate::extents::{Extents, EXTENT_HOLE, EXTENT_ZERO};
use crate::filter::{Filter, Next};
use crate::plugin::{BlockSize, FileRange, Flags, Handle, OpenContext, Plugin, Support};
use crate::plugins::ConfigArg;

use super::lower::{extents_full, read_and_discard};
use super::overlay::{split_read, Overlay, Patch};
use super::{bad, each_param, over, parse_bool, parse_size, FilterEnv, FilterSpec};

pub const SPEC: FilterSpec = FilterSpec {
    name: "cow",
    keys: &["cow-block-size", "cow-on-cache", "cow-on-read"],
    help: "cow-block-size=<N>       Set COW block size.\n\
           cow-on-cache=<BOOL>      Copy cache (prefetch) requests to the overlay.\n\
           cow-on-read=<BOOL>|/PATH Copy read requests to the overlay.",
    open,
};

/// Block states in the overlay.
const ABSENT: u8 = 0;
const PRESENT: u8 = 1;
const TRIMMED: u8 = 2;

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut blksize = 65536;
    let mut on_cache = false;
    let mut on_read = Switch::Off;
    each_param(&SPEC, params, |k, v| {
        match k {
            "cow-block-size" => {
                let r = parse_size("cow", k, v)?;
                if !(4096..=u64::from(u32::MAX)).contains(&r) || !r.is_power_of_two() {
                    return Err(bad(
                        "cow",
                        k,
                        "is out of range (4096..2G) or not a power of 2",
                    ));
                }
                blksize = r;
            }
            "cow-on-cache" => on_cache = parse_bool("cow", k, v)?,
            _ => on_read = Switch::parse("cow", k, v)?,
        }
        Ok(())
    })?;
    let overlay = Overlay::create("cow", blksize, false)?;
    Ok(over(
        Cow {
            overlay,
            on_cache,
            on_read,
        },
        inner,
    ))
}

/// `true`, `false`, or "while this absolute path exists" (cow-on-read, cache-on-read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Switch {
    Off,
    On,
    Path(PathBuf),
}

impl Switch {
    pub fn parse(filter: &str, key: &str, value: &str) -> Result<Switch> {
        if value.starts_with('/') {
            Ok(Switch::Path(value.into()))
        } else if parse_bool(filter, key, value)? {
            Ok(Switch::On)
        } else {
            Ok(Switch::Off)
        }
    }
    pub fn on(&self) -> bool {
        match self {
            Switch::Off => false,
            Switch::On => true,
            Switch::Path(p) => p.exists(),
        }
    }
}

pub struct Cow {
    overlay: Overlay,
    on_cache: bool,
    on_read: Switch,
}

/// Per connection: what the read-only plugin below can do.
pub struct Conn {
    size: u64,
    /// Whether the layer below has extents, asked at the first extents request (as nbdkit's
    /// cow does: a connection that never asks block status never asks the plugin).
    extents: std::sync::OnceLock<bool>,
    cache: Support,
}

impl Cow {
    fn bs(&self) -> u64 {
        self.overlay.blksize()
    }

    /// Reads `buf.len() / bs` whole blocks from `blk`, from the overlay or the plugin.
    fn read_blocks(&self, c: &Conn, next: &Next, mut blk: u64, mut buf: &mut [u8]) -> Result<()> {
        let bs = self.bs();
        let on_read = self.on_read.on();
        while !buf.is_empty() {
            let (state, n) = self.overlay.run(blk, buf.len() as u64 / bs);
            let (piece, rest) = buf.split_at_mut((n * bs) as usize);
            match state {
                PRESENT => self.overlay.read(blk, piece)?,
                TRIMMED => piece.fill(0),
                _ => {
                    read_plugin(c, next, blk * bs, piece)?;
                    if on_read {
                        for (i, block) in piece.chunks(bs as usize).enumerate() {
                            if let Some(mut g) = self.overlay.try_lock(blk + i as u64, ABSENT) {
                                self.overlay.write(blk + i as u64, block)?;
                                g.set(PRESENT);
                            }
                        }
                    }
                }
            }
            buf = rest;
            blk += n;
        }
        Ok(())
    }

    /// Reads part of block `blk` from byte `at`: only those bytes, from wherever the block
    /// is, unless cow-on-read wants the whole block copied.
    fn read_part(&self, c: &Conn, next: &Next, blk: u64, at: usize, out: &mut [u8]) -> Result<()> {
        match self.overlay.state(blk) {
            PRESENT => self.overlay.read_at(blk, at, out),
            TRIMMED => {
                out.fill(0);
                Ok(())
            }
            _ if !self.on_read.on() => read_plugin(c, next, blk * self.bs() + at as u64, out),
            _ => {
                let mut block = vec![0u8; self.bs() as usize];
                self.read_blocks(c, next, blk, &mut block)?;
                out.copy_from_slice(&block[at..at + out.len()]);
                Ok(())
            }
        }
    }

    /// Changes part of block `blk` (under the block's lock): a block already in the overlay
    /// is patched in place; any other is read, patched and written whole.
    fn modify(&self, c: &Conn, next: &Next, blk: u64, at: usize, patch: Patch<'_>) -> Result<()> {
        let mut g = self.overlay.lock(blk);
        if g.state() == PRESENT {
            return self.overlay.write_at(blk, at, &patch);
        }
        let mut block = vec![0u8; self.bs() as usize];
        if g.state() == ABSENT {
            read_plugin(c, next, blk * self.bs(), &mut block)?;
        }
        patch.apply(&mut block, at);
        self.overlay.write(blk, &block)?;
        g.set(PRESENT);
        Ok(())
    }

    fn write_block(&self, blk: u64, data: &[u8]) -> Result<()> {
        let mut g = self.overlay.lock(blk);
        self.overlay.write(blk, data)?;
        g.set(PRESENT);
        Ok(())
    }

    /// Splits `[off, off+count)` into an unaligned head, whole blocks and a tail, calling
    /// `part(blk, at, len, done)` for the partial ones and `whole(blk, done)` for the rest;
    /// `done` counts the bytes before the piece.
    fn split(
        &self,
        count: u64,
        off: u64,
        mut part: impl FnMut(u64, usize, usize, usize) -> Result<()>,
        mut whole: impl FnMut(u64, usize) -> Result<()>,
    ) -> Result<()> {
        let bs = self.bs();
        let (mut blk, head) = (off / bs, off % bs);
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
}

/// Reads from the plugin at `offset`, zero-filling past its end (the last partial block).
fn read_plugin(c: &Conn, next: &Next, offset: u64, buf: &mut [u8]) -> Result<()> {
    let n = (c.size.saturating_sub(offset)).min(buf.len() as u64) as usize;
    if n > 0 {
        next.pread(&mut buf[..n], offset, Flags::NONE)?;
    }
    buf[n..].fill(0);
    Ok(())
}

impl Filter for Cow {
    type Conn = Conn;
    fn name(&self) -> &str {
        "cow"
    }
    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<(Conn, Next)> {
        let below = OpenContext {
            readonly: true,
            ..*ctx
        };
        let next = Next::open(next, &below)?;
        let size = next.get_size()?;
        self.overlay.set_size("cow", size)?;
        let conn = Conn {
            size,
            extents: std::sync::OnceLock::new(),
            cache: next.can_cache()?,
        };
        Ok((conn, next))
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
    fn can_write(&self, _: &Conn, _: &Next) -> Result<bool> {
        Ok(true)
    }
    fn can_trim(&self, _: &Conn, _: &Next) -> Result<bool> {
        Ok(true)
    }
    fn can_extents(&self, _: &Conn, _: &Next) -> Result<bool> {
        Ok(true)
    }
    fn can_flush(&self, _: &Conn, _: &Next) -> Result<bool> {
        Ok(true)
    }
    fn can_fua(&self, _: &Conn, _: &Next) -> Result<Support> {
        Ok(Support::Native)
    }
    fn can_cache(&self, _: &Conn, _: &Next) -> Result<Support> {
        Ok(Support::Native)
    }
    fn can_multi_conn(&self, _: &Conn, _: &Next) -> Result<bool> {
        Ok(true)
    }
    /// nbdkit asks the plugin, which it opened read-only, so WRITE_ZEROES is not offered.
    fn can_zero(&self, _: &Conn, _: &Next) -> Result<Support> {
        Ok(Support::None)
    }
    fn can_fast_zero(&self, _: &Conn, _: &Next) -> Result<bool> {
        Ok(true)
    }
    fn pread(&self, c: &Conn, next: &Next, buf: &mut [u8], off: u64, _: Flags) -> Result<()> {
        split_read(
            self.bs(),
            buf,
            off,
            |blk, at, piece| self.read_part(c, next, blk, at, piece),
            |blk, run| self.read_blocks(c, next, blk, run),
        )
    }
    /// Where [`Cow::pread`] would read all of the range from one place: the plugin, for a
    /// range no client has changed (unless cow-on-read must copy it), or the overlay file,
    /// for one written in every block. Trimmed blocks (zeroes) and mixed ranges are read.
    fn file_range<'a>(
        &'a self,
        _: &'a Conn,
        next: &'a Next,
        count: u64,
        off: u64,
    ) -> Option<FileRange<'a>> {
        match self.overlay.uniform(off, count)? {
            ABSENT if !self.on_read.on() => next.file_range(count, off),
            PRESENT => Some(self.overlay.file_range(off)),
            _ => None,
        }
    }
    fn pwrite(&self, c: &Conn, next: &Next, buf: &[u8], off: u64, _: Flags) -> Result<()> {
        let bs = self.bs() as usize;
        self.split(
            buf.len() as u64,
            off,
            |blk, at, n, done| self.modify(c, next, blk, at, Patch::Data(&buf[done..done + n])),
            |blk, done| self.write_block(blk, &buf[done..done + bs]),
        )
    }
    fn zero(&self, c: &Conn, next: &Next, count: u64, off: u64, f: Flags) -> Result<()> {
        if f.contains(Flags::FAST_ZERO) {
            return Err(BlockError::new(
                Errno::ENOTSUP,
                "cow: zeroing is never faster than writing",
            ));
        }
        let zeroes = vec![0u8; self.bs() as usize];
        self.split(
            count,
            off,
            |blk, at, n, _| self.modify(c, next, blk, at, Patch::Zero(n)),
            |blk, _| self.write_block(blk, &zeroes),
        )
    }
    fn trim(&self, c: &Conn, next: &Next, count: u64, off: u64, _: Flags) -> Result<()> {
        self.split(
            count,
            off,
            |blk, at, n, _| self.modify(c, next, blk, at, Patch::Zero(n)),
            |blk, _| {
                let mut g = self.overlay.lock(blk);
                self.overlay.punch(blk);
                g.set(TRIMMED);
                Ok(())
            },
        )
    }
    fn flush(&self, _: &Conn, _: &Next, _: Flags) -> Result<()> {
        Ok(())
    }
    fn cache(&self, c: &Conn, next: &Next, count: u64, off: u64, _: Flags) -> Result<()> {
        let bs = self.bs();
        let first = off / bs;
        let last = (off + count).div_ceil(bs);
        let mut block = vec![0u8; bs as usize];
        for blk in first..last {
            if self.overlay.state(blk) != ABSENT {
                continue;
            }
            let at = blk * bs;
            let n = bs.min(c.size.saturating_sub(at));
            if self.on_cache {
                read_plugin(c, next, at, &mut block)?;
                if let Some(mut g) = self.overlay.try_lock(blk, ABSENT) {
                    self.overlay.write(blk, &block)?;
                    g.set(PRESENT);
                }
            } else {
                match c.cache {
                    Support::None => {}
                    Support::Emulate => read_and_discard(next, n, at)?,
                    Support::Native => next.cache(n, at, Flags::NONE)?,
                }
            }
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
        let bs = self.bs();
        let req_one = f.contains(Flags::REQ_ONE);
        let mut blk = off / bs;
        let end_blk = (off + count).div_ceil(bs);
        while blk < end_blk {
            let state = self.overlay.state(blk);
            if state != ABSENT {
                let kind = if state == TRIMMED {
                    EXTENT_HOLE | EXTENT_ZERO
                } else {
                    0
                };
                out.add(blk * bs, bs, kind)?;
                blk += 1;
            } else {
                let start = blk;
                while blk < end_blk
                    && self.overlay.state(blk) == ABSENT
                    && (blk - start) * bs < u64::from(u32::MAX) - bs
                {
                    blk += 1;
                }
                let from = start * bs;
                let to = (blk * bs).min(c.size);
                let below = match c.extents.get() {
                    Some(b) => *b,
                    None => {
                        let b = next.can_extents()?;
                        *c.extents.get_or_init(|| b)
                    }
                };
                if below {
                    if to > from {
                        extents_full(next, to - from, from, f, out)?;
                    }
                } else {
                    out.add(from, (blk - start) * bs, 0)?;
                }
            }
            if req_one && !out.is_empty() {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::super::test_support::*;
    use super::*;
    use crate::plugins::PatternPlugin;

    /// A plugin that fails any write-like call, counting attempts.
    struct NoWrites(Arc<dyn Plugin>, Arc<AtomicUsize>);
    struct NoWritesHandle(Box<dyn Handle>, Arc<AtomicUsize>);
    impl Plugin for NoWrites {
        fn name(&self) -> &str {
            "nowrites"
        }
        fn open(&self, ctx: &OpenContext<'_>) -> Result<Box<dyn Handle>> {
            assert!(ctx.readonly, "cow must open the plugin read-only");
            Ok(Box::new(NoWritesHandle(self.0.open(ctx)?, self.1.clone())))
        }
    }
    impl Handle for NoWritesHandle {
        fn get_size(&self) -> Result<u64> {
            self.0.get_size()
        }
        fn can_extents(&self) -> Result<bool> {
            self.0.can_extents()
        }
        fn pread(&self, buf: &mut [u8], off: u64, f: Flags) -> Result<()> {
            self.0.pread(buf, off, f)
        }
        fn extents(&self, n: u64, off: u64, f: Flags, e: &mut Extents) -> Result<()> {
            self.0.extents(n, off, f, e)
        }
        fn pwrite(&self, _: &[u8], _: u64, _: Flags) -> Result<()> {
            self.1.fetch_add(1, Ordering::SeqCst);
            Err(BlockError::errno(Errno::EROFS))
        }
    }

    fn cow_over(inner: Arc<dyn Plugin>, kv: &[(&str, &str)]) -> (crate::Export, Arc<AtomicUsize>) {
        let writes = Arc::new(AtomicUsize::new(0));
        let p = Arc::new(NoWrites(inner, writes.clone()));
        (export(filter("cow", kv, p), false), writes)
    }

    #[test]
    fn cow_file_range_is_the_overlay_only_where_every_block_was_written() {
        // The pattern plugin has no file: only ranges wholly in the overlay have one.
        let pat: Arc<dyn Plugin> = Arc::new(PatternPlugin::new(1 << 20));
        let (e, _) = cow_over(pat, &[]);
        let at = |count, off| e.with_file_range(count, off, |r| r.offset);
        e.write(&[1u8; 131072], 65536, Flags::NONE).unwrap();
        e.write(&[2u8; 10], 300_000, Flags::NONE).unwrap();
        assert_eq!(at(131072, 65536), Some(65536));
        assert_eq!(at(1000, 70_000), Some(70_000));
        // Block 4 holds the partial write (read-modify-write made it whole).
        assert_eq!(at(65536, 262_144), Some(262_144));
        assert_eq!(at(131073, 65536), None, "one byte into an untouched block");
        assert_eq!(at(4096, 0), None, "untouched: the plugin's (no file)");
        e.trim(65536, 65536, Flags::NONE).unwrap();
        assert_eq!(at(4096, 65536), None, "trimmed blocks read as zeroes");
    }

    #[test]
    fn cow_writes_land_in_the_overlay_and_never_below() {
        let pat: Arc<dyn Plugin> = Arc::new(PatternPlugin::new((1 << 20) + 100));
        let (e, writes) = cow_over(pat.clone(), &[]);
        assert!(e.caps().writable);
        assert_eq!(e.caps().zero, Support::None);
        assert_eq!(e.caps().block_size.unwrap().preferred, 65536);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        e.write(&data, 1000, Flags::FUA).unwrap();
        e.trim(65536 * 4, 65536 * 8, Flags::NONE).unwrap();
        e.flush().unwrap();
        let mut all = vec![0u8; (1 << 20) + 100];
        e.read(&mut all, 0).unwrap();
        let mut want = vec![0u8; (1 << 20) + 100];
        crate::plugins::pattern::fill_pattern(&mut want, 0);
        want[1000..201_000].copy_from_slice(&data);
        want[65536 * 8..65536 * 12].fill(0);
        assert!(all == want, "cow view differs");
        assert_eq!(writes.load(Ordering::SeqCst), 0);
        // The plugin still has its pattern.
        let mut below = vec![0u8; 4096];
        export(pat, true).read(&mut below, 0).unwrap();
        crate::plugins::pattern::fill_pattern(&mut want[..4096], 0);
        assert_eq!(below, want[..4096]);
    }

    #[test]
    fn cow_extents_show_written_and_trimmed_blocks_over_the_plugins() {
        let (e, _) = cow_over(memory(1 << 20), &[("cow-block-size", "4k")]);
        e.write(&[1u8; 4096], 8192, Flags::NONE).unwrap();
        e.trim(4096, 16384, Flags::NONE).unwrap();
        let ext = e.extents(1 << 20, 0, Flags::NONE).unwrap();
        let got: Vec<_> = ext
            .as_slice()
            .iter()
            .map(|x| (x.offset, x.length, x.kind))
            .collect();
        let hz = EXTENT_HOLE | EXTENT_ZERO;
        assert_eq!(
            got,
            [
                (0, 8192, hz),
                (8192, 4096, 0),
                (12288, (1 << 20) - 12288, hz)
            ]
        );
        let one = e.extents(65536, 8192, Flags::REQ_ONE).unwrap();
        assert_eq!(one.as_slice().len(), 1);
    }

    #[test]
    fn cow_partial_writes_into_a_present_block_patch_it_in_place() {
        let (e, _) = cow_over(memory(1 << 20), &[]);
        e.write(&[1u8; 100], 50, Flags::NONE).unwrap();
        e.write(&[2u8; 10], 60, Flags::NONE).unwrap();
        e.zero(5, 70, Flags::NONE).unwrap_err(); // WRITE_ZEROES is not offered
        e.trim(5, 70, Flags::NONE).unwrap();
        let mut buf = [9u8; 200];
        e.read(&mut buf, 0).unwrap();
        let mut want = [0u8; 200];
        want[50..150].fill(1);
        want[60..70].fill(2);
        want[70..75].fill(0); // the trim
        assert_eq!(buf, want);
    }

    #[test]
    fn cow_on_read_copies_what_was_read() {
        let (e, _) = cow_over(memory(1 << 20), &[("cow-on-read", "true")]);
        let mut buf = vec![0u8; 65536];
        e.read(&mut buf, 0).unwrap();
        let ext = e.extents(65536, 0, Flags::NONE).unwrap();
        assert_eq!(
            ext.as_slice()[0].kind,
            0,
            "block now in the overlay, as data"
        );
    }

    #[test]
    fn cow_parameters_are_checked() {
        assert_eq!(
            config_error("cow", &[("cow-block-size", "1000")]),
            "cow: cow-block-size: is out of range (4096..2G) or not a power of 2"
        );
        assert!(config_error("cow", &[("cow-on-read", "maybe")]).starts_with("cow: cow-on-read: "));
    }
}
