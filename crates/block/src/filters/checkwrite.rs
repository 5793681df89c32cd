//! The checkwrite filter (nbdkit-checkwrite-filter): turns every write into a check that
//! the data is already there, for testing copying tools.
//!
//! The layer below is opened read-only and never written. A write succeeds if its bytes
//! equal those below; a trim or zero if the range reads as zeroes (ranges that block status
//! says are zero are not read). Anything else fails with EIO. Flush and FUA are accepted and
//! do nothing; a fast zero over data fails with ENOTSUP.

use std::sync::Arc;

use crate::error::{BlockError, Errno, Result};
use crate::extents::{Extents, EXTENT_ZERO};
use crate::filter::{Filter, Next};
use crate::plugin::{Flags, Handle, OpenContext, Plugin, Support};
use crate::plugins::ConfigArg;

use super::{each_param, over, FilterEnv, FilterSpec};

pub const SPEC: FilterSpec = FilterSpec {
    name: "checkwrite",
    keys: &[],
    help: "",
    open,
};

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    each_param(&SPEC, params, |_, _| Ok(()))?;
    Ok(over(CheckWrite, inner))
}

/// Largest read done at once while checking a trim or zero.
const MAX_READ: u64 = 64 * 1024 * 1024;

pub struct CheckWrite;

fn mismatch() -> BlockError {
    BlockError::new(
        Errno::EIO,
        "checkwrite: data written does not match expected",
    )
}

/// Checks that `[offset, offset+count)` of the layer below reads as zeroes.
fn check_zero(next: &Next, mut count: u64, mut offset: u64, f: Flags) -> Result<()> {
    let fast = f.contains(Flags::FAST_ZERO);
    let extents = next.can_extents()?;
    while count > 0 {
        // How far from `offset` is known zero, and how far the next piece runs.
        let (zero, piece) = if extents {
            let mut e = Extents::new(offset, offset + count);
            next.extents(count, offset, Flags::NONE, &mut e)?;
            match e.as_slice().first() {
                Some(x) => ((x.kind & EXTENT_ZERO) != 0, x.length.min(count)),
                None => (false, count),
            }
        } else {
            (false, count)
        };
        if !zero {
            if fast {
                return Err(BlockError::errno(Errno::ENOTSUP));
            }
            let mut left = piece;
            let mut buf = vec![0u8; left.min(MAX_READ) as usize];
            while left > 0 {
                let n = left.min(MAX_READ) as usize;
                next.pread(&mut buf[..n], offset, Flags::NONE)?;
                if buf[..n].iter().any(|&b| b != 0) {
                    return Err(mismatch());
                }
                left -= n as u64;
                offset += n as u64;
            }
        } else {
            offset += piece;
        }
        count -= piece;
    }
    Ok(())
}

impl Filter for CheckWrite {
    type Conn = ();
    fn name(&self) -> &str {
        "checkwrite"
    }
    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<((), Next)> {
        let below = OpenContext {
            readonly: true,
            ..*ctx
        };
        Ok(((), Next::open(next, &below)?))
    }
    fn can_write(&self, _: &(), _: &Next) -> Result<bool> {
        Ok(true)
    }
    fn can_flush(&self, _: &(), _: &Next) -> Result<bool> {
        Ok(true)
    }
    fn can_fua(&self, _: &(), _: &Next) -> Result<Support> {
        Ok(Support::Native)
    }
    fn can_trim(&self, _: &(), _: &Next) -> Result<bool> {
        Ok(true)
    }
    fn can_zero(&self, _: &(), _: &Next) -> Result<Support> {
        Ok(Support::Native)
    }
    fn can_fast_zero(&self, _: &(), _: &Next) -> Result<bool> {
        Ok(true)
    }
    fn can_multi_conn(&self, _: &(), _: &Next) -> Result<bool> {
        Ok(true)
    }
    fn pwrite(&self, _: &(), next: &Next, buf: &[u8], off: u64, _: Flags) -> Result<()> {
        let mut have = vec![0u8; buf.len()];
        next.pread(&mut have, off, Flags::NONE)?;
        if have != buf {
            return Err(mismatch());
        }
        Ok(())
    }
    fn flush(&self, _: &(), _: &Next, _: Flags) -> Result<()> {
        Ok(())
    }
    fn trim(&self, _: &(), next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        check_zero(next, n, off, f)
    }
    fn zero(&self, _: &(), next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        check_zero(next, n, off, f)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::test_support::*;
    use crate::plugin::{Flags, Support};
    use crate::plugins::PatternPlugin;
    use crate::Errno;

    #[test]
    fn checkwrite_accepts_the_same_data_and_refuses_other() {
        let pat: Arc<dyn crate::Plugin> = Arc::new(PatternPlugin::new(1 << 20));
        let e = export(filter("checkwrite", &[], pat.clone()), false);
        assert!(e.caps().writable);
        assert_eq!(e.caps().fua, Support::Native);
        let mut buf = vec![0u8; 4096];
        e.read(&mut buf, 8192).unwrap();
        e.write(&buf, 8192, Flags::FUA).unwrap();
        e.flush().unwrap();
        buf[100] ^= 1;
        assert_eq!(
            e.write(&buf, 8192, Flags::NONE).unwrap_err().errno,
            Errno::EIO
        );
        assert_eq!(
            e.zero(512, 4096, Flags::NONE).unwrap_err().errno,
            Errno::EIO
        );
        // Offset 0 of the pattern is eight zero bytes.
        e.zero(8, 0, Flags::NONE).unwrap();
    }

    #[test]
    fn checkwrite_zero_over_a_hole_uses_extents_and_fast_zero_over_data_fails() {
        let mem = memory(1 << 20);
        export(mem.clone(), false)
            .write(&[1; 512], 65536, Flags::NONE)
            .unwrap();
        let e = export(filter("checkwrite", &[], mem), false);
        e.zero(65536, 0, Flags::FAST_ZERO).unwrap();
        e.trim(65536, 0, Flags::NONE).unwrap();
        assert_eq!(
            e.zero(65536 * 2, 0, Flags::FAST_ZERO).unwrap_err().errno,
            Errno::ENOTSUP
        );
        assert_eq!(
            e.zero(65536 * 2, 0, Flags::NONE).unwrap_err().errno,
            Errno::EIO
        );
    }
}
