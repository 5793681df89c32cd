//! The swab filter (nbdkit-swab-filter): swaps the bytes of every 16-, 32- or 64-bit word
//! (`swab-bits`, default 16; 8 turns it off).
//!
//! Requests must be aligned to the word (EINVAL otherwise; the advertised minimum block size
//! says so), the size is rounded down to it, and block status is hidden because extents of
//! the layer below need not fall on word boundaries.

use std::sync::Arc;

use crate::error::{BlockError, Errno, Result};
use crate::extents::Extents;
use crate::filter::{Filter, Next};
use crate::plugin::{BlockSize, Flags, Handle, OpenContext, Plugin};
use crate::plugins::ConfigArg;

use super::{bad, each_param, over, FilterEnv, FilterSpec};

pub const SPEC: FilterSpec = FilterSpec {
    name: "swab",
    keys: &["swab-bits"],
    help: "swab-bits=8|16|32|64       Size of byte swap (default 16).",
    open,
};

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut bits = 16;
    each_param(&SPEC, params, |k, v| {
        bits = match v.trim().parse::<u32>() {
            Ok(b @ (8 | 16 | 32 | 64)) => b,
            Ok(_) => return Err(bad("swab", k, "invalid swab-bits, must be 8, 16, 32 or 64")),
            Err(_) => return Err(bad("swab", k, format!("could not parse number: {v}"))),
        };
        Ok(())
    })?;
    Ok(over(
        Swab {
            word: bits as usize / 8,
        },
        inner,
    ))
}

/// Swaps words of `word` bytes.
pub struct Swab {
    pub word: usize,
}

impl Swab {
    fn aligned(&self, count: u64, offset: u64) -> Result<()> {
        let w = self.word as u64;
        if !count.is_multiple_of(w) || !offset.is_multiple_of(w) {
            return Err(BlockError::new(
                Errno::EINVAL,
                "swab: requests to this filter must be aligned",
            ));
        }
        Ok(())
    }

    fn swap(&self, buf: &mut [u8]) {
        if self.word > 1 {
            buf.chunks_exact_mut(self.word).for_each(<[u8]>::reverse);
        }
    }
}

impl Filter for Swab {
    type Conn = ();
    fn name(&self) -> &str {
        "swab"
    }
    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<((), Next)> {
        Ok(((), Next::open(next, ctx)?))
    }
    fn get_size(&self, _: &(), next: &Next) -> Result<u64> {
        let s = next.get_size()?;
        Ok(s - s % self.word as u64)
    }
    fn block_size(&self, _: &(), next: &Next) -> Result<Option<BlockSize>> {
        let w = self.word as u32;
        Ok(Some(match next.block_size()? {
            None => BlockSize {
                minimum: w,
                preferred: 512,
                maximum: u32::MAX,
            },
            Some(b) => BlockSize {
                minimum: b.minimum.max(w),
                ..b
            },
        }))
    }
    fn can_extents(&self, _: &(), _: &Next) -> Result<bool> {
        Ok(false)
    }
    fn pread(&self, _: &(), next: &Next, buf: &mut [u8], off: u64, f: Flags) -> Result<()> {
        self.aligned(buf.len() as u64, off)?;
        next.pread(buf, off, f)?;
        self.swap(buf);
        Ok(())
    }
    fn pwrite(&self, _: &(), next: &Next, buf: &[u8], off: u64, f: Flags) -> Result<()> {
        self.aligned(buf.len() as u64, off)?;
        let mut swapped = buf.to_vec();
        self.swap(&mut swapped);
        next.pwrite(&swapped, off, f)
    }
    fn trim(&self, _: &(), next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        self.aligned(n, off)?;
        next.trim(n, off, f)
    }
    fn zero(&self, _: &(), next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        self.aligned(n, off)?;
        next.zero(n, off, f)
    }
    fn cache(&self, _: &(), next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        self.aligned(n, off)?;
        next.cache(n, off, f)
    }
    fn extents(
        &self,
        _: &(),
        _: &Next,
        n: u64,
        off: u64,
        _: Flags,
        out: &mut Extents,
    ) -> Result<()> {
        out.add(off, n, 0)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::test_support::*;
    use crate::plugin::Flags;
    use crate::plugins::PatternPlugin;
    use crate::Errno;

    #[test]
    fn swab_swaps_words_of_the_configured_size() {
        let pat = || Arc::new(PatternPlugin::new(1001)) as Arc<dyn crate::Plugin>;
        let e = export(filter("swab", &[("swab-bits", "64")], pat()), true);
        assert_eq!(e.size(), 1000);
        let mut buf = [0u8; 16];
        e.read(&mut buf, 8).unwrap();
        // The pattern plugin stores each offset as a big-endian u64: swapped, little-endian.
        assert_eq!(u64::from_le_bytes(buf[..8].try_into().unwrap()), 8);
        assert_eq!(e.caps().block_size.unwrap().minimum, 8);
        assert!(!e.caps().extents);
        assert_eq!(e.read(&mut buf[..4], 8).unwrap_err().errno, Errno::EINVAL);
        let e16 = export(filter("swab", &[], memory(4096)), false);
        e16.write(&[1, 2, 3, 4], 0, Flags::NONE).unwrap();
        let mut b = [0u8; 4];
        e16.read(&mut b, 0).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
    }

    #[test]
    fn swab_bits_must_be_8_16_32_or_64() {
        assert_eq!(
            config_error("swab", &[("swab-bits", "24")]),
            "swab: swab-bits: invalid swab-bits, must be 8, 16, 32 or 64"
        );
    }
}
