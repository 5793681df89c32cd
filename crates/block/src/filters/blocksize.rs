//! The blocksize filter (nbdkit-blocksize-filter): lets clients send requests of any size
//! and alignment to a plugin that needs aligned, bounded ones.
//!
//! `minblock` (a power of two up to 64 KiB, or the plugin's minimum) is the alignment the
//! layer below sees: reads are widened to it, unaligned heads and tails of writes and zeroes
//! become read-modify-write cycles of one block, unaligned parts of trims are dropped, and
//! the size is rounded down to it. `maxdata` (default 64 MiB, or the plugin's maximum) bounds
//! reads and writes, `maxlen` (default 4 GiB - minblock) trims, zeroes and block status;
//! longer requests are split. The client is told min 1, max 4G-1, and a preferred size of at
//! least 4 KiB and minblock.
//!
//! As in nbdkit, a read-modify-write holds a per-export lock exclusively and aligned writes
//! hold it shared, so a client's overlapping aligned write never lands between the read and
//! the write of an unaligned one. A fast zero that would need more than one call below fails
//! at once with ENOTSUP. FUA emulated below is one flush at the end, not one per piece.

use std::sync::{Arc, PoisonError, RwLock};

use crate::error::{BlockError, Errno, Result};
use crate::extents::Extents;
use crate::filter::{Filter, Next};
use crate::plugin::{BlockSize, Flags, Handle, OpenContext, Plugin, Support};
use crate::plugins::ConfigArg;

use super::lower::Lower;
use super::{bad, each_param, over, parse_size, FilterEnv, FilterSpec};

pub const SPEC: FilterSpec = FilterSpec {
    name: "blocksize",
    keys: &["minblock", "maxdata", "maxlen"],
    help: "minblock=<SIZE>      Minimum block size, power of 2 <= 64k (default 1).\n\
           maxdata=<SIZE>       Maximum size for read/write (default 64M).\n\
           maxlen=<SIZE>        Maximum size for trim/zero (default 4G-minblock).",
    open,
};

const MIN_LIMIT: u32 = 64 * 1024;
const DEFAULT_MAXDATA: u32 = 64 * 1024 * 1024;

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut f = BlockSizeFilter::default();
    each_param(&SPEC, params, |k, v| {
        let n = parse_size("blocksize", k, v)?;
        if n == 0 {
            return Err(bad("blocksize", k, "must be non-zero if specified"));
        }
        let n = u32::try_from(n).map_err(|_| bad("blocksize", k, "too large"))?;
        match k {
            "minblock" => f.minblock = n,
            "maxdata" => f.maxdata = n,
            _ => f.maxlen = n,
        }
        Ok(())
    })?;
    if f.minblock != 0 {
        if !f.minblock.is_power_of_two() {
            return Err(bad("blocksize", "minblock", "must be a power of 2"));
        }
        if f.minblock > MIN_LIMIT {
            return Err(bad(
                "blocksize",
                "minblock",
                format!("must not exceed {MIN_LIMIT}"),
            ));
        }
        for (key, v) in [("maxdata", f.maxdata), ("maxlen", f.maxlen)] {
            if v % f.minblock != 0 {
                return Err(bad(
                    "blocksize",
                    key,
                    format!("must be a multiple of {}", f.minblock),
                ));
            }
        }
    }
    Ok(over(f, inner))
}

/// The configured limits; 0 means "not given" (taken from the plugin at open).
#[derive(Default)]
pub struct BlockSizeFilter {
    minblock: u32,
    maxdata: u32,
    maxlen: u32,
    /// Exclusive for a read-modify-write, shared for aligned writes.
    rmw: RwLock<()>,
}

/// Per connection: the limits in force and the layer below's capabilities.
pub struct Conn {
    minblock: u64,
    maxdata: u64,
    maxlen: u64,
    lower: Lower,
}

impl Conn {
    fn head(&self, off: u64) -> u64 {
        off & (self.minblock - 1)
    }
    fn round_down(&self, n: u64) -> u64 {
        n & !(self.minblock - 1)
    }
    /// FUA emulated below is one flush after every piece: strip it and say so.
    fn fua(&self, f: Flags) -> (Flags, bool) {
        if f.contains(Flags::FUA) && self.lower.fua == Support::Emulate {
            (f.without(Flags::FUA), true)
        } else {
            (f, false)
        }
    }
}

impl BlockSizeFilter {
    fn exclusive(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.rmw.write().unwrap_or_else(PoisonError::into_inner)
    }
    fn shared(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.rmw.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Read-modify-write of the block at `block`: `edit` changes the bytes.
    fn rmw(
        &self,
        c: &Conn,
        next: &Next,
        block: u64,
        f: Flags,
        edit: impl FnOnce(&mut [u8]),
    ) -> Result<()> {
        let _g = self.exclusive();
        let mut bounce = vec![0u8; c.minblock as usize];
        next.pread(&mut bounce, block, Flags::NONE)?;
        edit(&mut bounce);
        c.lower.pwrite(
            next,
            &bounce,
            block,
            f.without(Flags::MAY_TRIM).without(Flags::FAST_ZERO),
        )
    }
}

impl Filter for BlockSizeFilter {
    type Conn = Conn;
    fn name(&self) -> &str {
        "blocksize"
    }
    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<(Conn, Next)> {
        let next = Next::open(next, ctx)?;
        let below = next.block_size()?;
        let (minimum, maximum) = below.map_or((1, 0), |b| (b.minimum, b.maximum));
        let minblock = self.minblock.max(1).max(minimum);
        let mut maxdata = match (self.maxdata, self.maxlen) {
            (0, 0) => DEFAULT_MAXDATA,
            (0, len) => len.min(DEFAULT_MAXDATA),
            (d, _) => d,
        };
        if maximum != 0 {
            maxdata = maxdata.min(maximum);
        }
        maxdata &= !(minblock - 1);
        let maxlen = match self.maxlen {
            0 => 0u32.wrapping_sub(minblock),
            l => l & !(minblock - 1),
        };
        if maxdata == 0 {
            return Err(BlockError::new(
                Errno::EINVAL,
                "blocksize: the plugin's maximum block size is below minblock",
            ));
        }
        let lower = Lower::query(&next, ctx.readonly)?;
        Ok((
            Conn {
                minblock: minblock.into(),
                maxdata: maxdata.into(),
                maxlen: maxlen.into(),
                lower,
            },
            next,
        ))
    }
    fn get_size(&self, c: &Conn, next: &Next) -> Result<u64> {
        Ok(c.round_down(next.get_size()?))
    }
    fn block_size(&self, c: &Conn, next: &Next) -> Result<Option<BlockSize>> {
        let preferred = next.block_size()?.map_or(0, |b| b.preferred);
        Ok(Some(BlockSize {
            minimum: 1,
            preferred: preferred.max(4096).max(c.minblock as u32),
            maximum: u32::MAX,
        }))
    }
    fn pread(&self, c: &Conn, next: &Next, buf: &mut [u8], mut off: u64, f: Flags) -> Result<()> {
        let mut buf = buf;
        let drop = c.head(off);
        if drop != 0 {
            let _g = self.exclusive();
            let keep = (c.minblock - drop).min(buf.len() as u64) as usize;
            let mut bounce = vec![0u8; c.minblock as usize];
            next.pread(&mut bounce, off - drop, f)?;
            buf[..keep].copy_from_slice(&bounce[drop as usize..drop as usize + keep]);
            buf = &mut buf[keep..];
            off += keep as u64;
        }
        while buf.len() as u64 >= c.minblock {
            let keep = c.maxdata.min(c.round_down(buf.len() as u64)) as usize;
            let (now, rest) = buf.split_at_mut(keep);
            next.pread(now, off, f)?;
            buf = rest;
            off += keep as u64;
        }
        if !buf.is_empty() {
            let _g = self.exclusive();
            let mut bounce = vec![0u8; c.minblock as usize];
            next.pread(&mut bounce, off, f)?;
            let n = buf.len();
            buf.copy_from_slice(&bounce[..n]);
        }
        Ok(())
    }
    fn pwrite(&self, c: &Conn, next: &Next, buf: &[u8], mut off: u64, f: Flags) -> Result<()> {
        let (f, flush) = c.fua(f);
        let mut buf = buf;
        let drop = c.head(off);
        if drop != 0 {
            let keep = (c.minblock - drop).min(buf.len() as u64) as usize;
            let d = drop as usize;
            self.rmw(c, next, off - drop, f, |b| {
                b[d..d + keep].copy_from_slice(&buf[..keep])
            })?;
            buf = &buf[keep..];
            off += keep as u64;
        }
        while buf.len() as u64 >= c.minblock {
            let _g = self.shared();
            let keep = c.maxdata.min(c.round_down(buf.len() as u64)) as usize;
            c.lower.pwrite(next, &buf[..keep], off, f)?;
            buf = &buf[keep..];
            off += keep as u64;
        }
        if !buf.is_empty() {
            self.rmw(c, next, off, f, |b| b[..buf.len()].copy_from_slice(buf))?;
        }
        if flush {
            next.flush(Flags::NONE)?;
        }
        Ok(())
    }
    fn trim(&self, c: &Conn, next: &Next, count: u64, mut off: u64, f: Flags) -> Result<()> {
        let (f, flush) = c.fua(f);
        let mut count = count;
        let drop = c.head(off);
        if drop != 0 {
            let keep = (c.minblock - drop).min(count);
            off += keep;
            count -= keep;
        }
        count = c.round_down(count);
        while count > 0 {
            let _g = self.shared();
            let keep = c.maxlen.min(count);
            c.lower.trim(next, keep, off, f)?;
            off += keep;
            count -= keep;
        }
        if flush {
            next.flush(Flags::NONE)?;
        }
        Ok(())
    }
    fn zero(&self, c: &Conn, next: &Next, count: u64, mut off: u64, f: Flags) -> Result<()> {
        if f.contains(Flags::FAST_ZERO)
            && ((off | count) & (c.minblock - 1) != 0 || count > c.maxlen)
        {
            return Err(BlockError::new(
                Errno::ENOTSUP,
                "blocksize: a fast zero that needs splitting is not fast",
            ));
        }
        let (f, flush) = c.fua(f);
        let mut count = count;
        let drop = c.head(off);
        if drop != 0 {
            let keep = (c.minblock - drop).min(count);
            let d = drop as usize;
            self.rmw(c, next, off - drop, f, |b| b[d..d + keep as usize].fill(0))?;
            off += keep;
            count -= keep;
        }
        while count >= c.minblock {
            let _g = self.shared();
            let keep = c.maxlen.min(c.round_down(count));
            c.lower.zero(next, keep, off, f)?;
            off += keep;
            count -= keep;
        }
        if count > 0 {
            self.rmw(c, next, off, f, |b| b[..count as usize].fill(0))?;
        }
        if flush {
            next.flush(Flags::NONE)?;
        }
        Ok(())
    }
    fn cache(&self, c: &Conn, next: &Next, count: u64, off: u64, f: Flags) -> Result<()> {
        let head = c.head(off);
        let mut off = off - head;
        let mut remaining = (count + head).next_multiple_of(c.minblock);
        while remaining > 0 {
            let n = c.maxdata.min(remaining);
            c.lower.cache(next, n, off, f)?;
            off += n;
            remaining -= n;
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
        let start = c.round_down(off);
        let end = (off + count).next_multiple_of(c.minblock);
        let mut below = Extents::new(start, end);
        let n = (end - start).min(c.maxlen);
        c.lower.extents(next, n, start, f, &mut below)?;
        for (o, l, k) in aligned(below.as_slice(), c.minblock) {
            out.add(o, l, k)?;
        }
        Ok(())
    }
}

/// nbdkit_extents_aligned: extents whose boundaries fall on multiples of `align`; a block
/// that several extents share gets the bits they all have (a block partly data is data). A
/// partial block at the end of the list is dropped unless it is all there is.
pub fn aligned(list: &[crate::Extent], align: u64) -> Vec<(u64, u64, u32)> {
    fn push(out: &mut Vec<(u64, u64, u32)>, o: u64, l: u64, k: u32) {
        match out.last_mut() {
            Some(last) if last.2 == k && last.0 + last.1 == o => last.1 += l,
            _ if l > 0 => out.push((o, l, k)),
            _ => {}
        }
    }
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    let mut i = 0;
    // A partial block being accumulated: (block start, bits so far).
    let mut partial: Option<(u64, u32)> = None;
    let mut cur = list.first().map(|e| (e.offset, e.length, e.kind));
    while let Some((o, l, k)) = cur {
        let e_end = o + l;
        if let Some((bstart, bits)) = partial {
            let bend = bstart + align;
            let bits = bits & k;
            if e_end >= bend {
                push(&mut out, bstart, align, bits);
                partial = None;
                cur = (e_end > bend).then_some((bend, e_end - bend, k));
                if cur.is_none() {
                    i += 1;
                    cur = list.get(i).map(|e| (e.offset, e.length, e.kind));
                }
            } else {
                partial = Some((bstart, bits));
                i += 1;
                cur = list.get(i).map(|e| (e.offset, e.length, e.kind));
            }
            continue;
        }
        let body_end = e_end & !(align - 1);
        if body_end > o {
            push(&mut out, o, body_end - o, k);
        }
        if e_end > body_end && body_end >= o {
            partial = Some((body_end, k));
        } else if e_end > body_end {
            partial = Some((o & !(align - 1), k));
        }
        i += 1;
        cur = list.get(i).map(|e| (e.offset, e.length, e.kind));
    }
    if let (Some((bstart, bits)), true) = (partial, out.is_empty()) {
        push(&mut out, bstart, align, bits);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::super::test_support::*;
    use super::*;
    use crate::extents::{EXTENT_HOLE, EXTENT_ZERO};
    use crate::Extent;

    /// A RAM disk that refuses any request not aligned to 512 or longer than 4096.
    struct Strict(Mutex<Vec<u8>>);
    struct StrictPlugin(Arc<Strict>);
    struct StrictHandle(Arc<Strict>);
    impl Plugin for StrictPlugin {
        fn name(&self) -> &str {
            "strict"
        }
        fn open(&self, _: &OpenContext<'_>) -> Result<Box<dyn Handle>> {
            Ok(Box::new(StrictHandle(self.0.clone())))
        }
    }
    fn check(n: u64, off: u64) -> Result<()> {
        if !n.is_multiple_of(512) || !off.is_multiple_of(512) || n > 4096 {
            return Err(BlockError::new(
                Errno::EIO,
                format!("bad request {n}@{off}"),
            ));
        }
        Ok(())
    }
    impl Handle for StrictHandle {
        fn get_size(&self) -> Result<u64> {
            Ok(self.0 .0.lock().unwrap().len() as u64)
        }
        fn can_write(&self) -> Result<bool> {
            Ok(true)
        }
        fn can_zero(&self) -> Result<Support> {
            Ok(Support::Native)
        }
        fn can_trim(&self) -> Result<bool> {
            Ok(true)
        }
        fn can_fast_zero(&self) -> Result<bool> {
            Ok(true)
        }
        fn block_size(&self) -> Result<Option<BlockSize>> {
            Ok(Some(BlockSize {
                minimum: 512,
                preferred: 512,
                maximum: 4096,
            }))
        }
        fn pread(&self, buf: &mut [u8], off: u64, _: Flags) -> Result<()> {
            check(buf.len() as u64, off)?;
            let d = self.0 .0.lock().unwrap();
            buf.copy_from_slice(&d[off as usize..off as usize + buf.len()]);
            Ok(())
        }
        fn pwrite(&self, buf: &[u8], off: u64, _: Flags) -> Result<()> {
            check(buf.len() as u64, off)?;
            let mut d = self.0 .0.lock().unwrap();
            d[off as usize..off as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn zero(&self, n: u64, off: u64, _: Flags) -> Result<()> {
            check(n.min(4096), off)?;
            let mut d = self.0 .0.lock().unwrap();
            d[off as usize..(off + n) as usize].fill(0);
            Ok(())
        }
        fn trim(&self, n: u64, off: u64, f: Flags) -> Result<()> {
            self.zero(n, off, f)
        }
    }

    fn strict(size: usize) -> Arc<dyn Plugin> {
        Arc::new(StrictPlugin(Arc::new(Strict(Mutex::new(vec![0xee; size])))))
    }

    #[test]
    fn blocksize_turns_any_request_into_aligned_bounded_ones() {
        let e = export(filter("blocksize", &[], strict(65536 + 100)), false);
        assert_eq!(e.size(), 65536);
        let bs = e.caps().block_size.unwrap();
        assert_eq!((bs.minimum, bs.preferred, bs.maximum), (1, 4096, u32::MAX));
        let data: Vec<u8> = (0..20000u32).map(|i| (i * 7) as u8).collect();
        e.write(&data, 3, Flags::NONE).unwrap();
        let mut back = vec![0u8; 20010];
        e.read(&mut back, 0).unwrap();
        assert_eq!(&back[..3], &[0xee; 3]);
        assert_eq!(&back[3..20003], &data[..]);
        assert_eq!(&back[20003..], &[0xee; 7]);
        e.zero(10000, 100, Flags::NONE).unwrap();
        e.read(&mut back, 0).unwrap();
        assert_eq!(
            &back[..100],
            &[0xee, 0xee, 0xee]
                .iter()
                .chain(&data[..97])
                .copied()
                .collect::<Vec<_>>()[..]
        );
        assert!(back[100..10100].iter().all(|&b| b == 0));
        assert_eq!(back[10100], data[10097]);
        assert_eq!(
            e.zero(1000, 100, Flags::FAST_ZERO).unwrap_err().errno,
            Errno::ENOTSUP
        );
        // Trim drops the unaligned ends.
        e.write(&[1u8; 2048], 0, Flags::NONE).unwrap();
        e.trim(1500, 100, Flags::NONE).unwrap();
        let mut t = vec![0u8; 2048];
        e.read(&mut t, 0).unwrap();
        assert!(t[..512].iter().all(|&b| b == 1));
        assert!(t[512..1536].iter().all(|&b| b == 0));
        assert!(t[1536..].iter().all(|&b| b == 1));
    }

    #[test]
    fn blocksize_minblock_rounds_size_and_preferred() {
        let e = export(
            filter(
                "blocksize",
                &[("minblock", "64k")],
                memory((1 << 20) + 4096),
            ),
            true,
        );
        assert_eq!(e.size(), 1 << 20);
        assert_eq!(e.caps().block_size.unwrap().preferred, 65536);
    }

    #[test]
    fn blocksize_parameters_are_checked() {
        assert_eq!(
            config_error("blocksize", &[("minblock", "3")]),
            "blocksize: minblock: must be a power of 2"
        );
        assert_eq!(
            config_error("blocksize", &[("minblock", "512"), ("maxdata", "1000")]),
            "blocksize: maxdata: must be a multiple of 512"
        );
        assert_eq!(
            config_error("blocksize", &[("maxlen", "0")]),
            "blocksize: maxlen: must be non-zero if specified"
        );
        assert!(
            config_error("blocksize", &[("minblock", "128k")]).contains("must not exceed 65536")
        );
    }

    fn ext(list: &[(u64, u64, u32)]) -> Vec<Extent> {
        list.iter()
            .map(|&(offset, length, kind)| Extent {
                offset,
                length,
                kind,
            })
            .collect()
    }

    #[test]
    fn aligned_extents_and_the_bits_of_shared_blocks() {
        let hz = EXTENT_HOLE | EXTENT_ZERO;
        assert_eq!(
            aligned(&ext(&[(0, 1024, hz), (1024, 1024, 0)]), 512),
            [(0, 1024, hz), (1024, 1024, 0)]
        );
        assert_eq!(
            aligned(
                &ext(&[(0, 700, hz), (700, 100, EXTENT_ZERO), (800, 1248, hz)]),
                512
            ),
            [(0, 512, hz), (512, 512, EXTENT_ZERO), (1024, 1024, hz)]
        );
        assert_eq!(aligned(&ext(&[(0, 100, hz)]), 512), [(0, 512, hz)]);
        assert_eq!(aligned(&ext(&[(0, 600, hz)]), 512), [(0, 512, hz)]);
    }
}
