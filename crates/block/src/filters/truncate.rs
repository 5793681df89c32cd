//! The truncate filter (nbdkit-truncate-filter): changes the size of the layer below to
//! `truncate=SIZE`, and/or rounds it up or down to a power of two.
//!
//! Each connection remembers the real size and the served size from when it opened (NBD
//! sizes do not change mid-connection). Past the real end the export reads as zeroes, and
//! accepts writes, zeroes and trims there as long as they leave zeroes (writes of anything
//! else fail with ENOSPC); block status reports the tail as a hole, and fast zero is
//! advertised because zeroing the tail costs nothing.

use std::sync::Arc;

use crate::error::{BlockError, Errno, Result};
use crate::extents::{Extents, EXTENT_HOLE, EXTENT_ZERO};
use crate::filter::{Filter, Next};
use crate::plugin::{Flags, Handle, OpenContext, Plugin};
use crate::plugins::ConfigArg;

use super::{bad, each_param, over, parse_size, FilterEnv, FilterSpec};

pub const SPEC: FilterSpec = FilterSpec {
    name: "truncate",
    keys: &["truncate", "round-up", "round-down"],
    help: "truncate=<SIZE>                The new size.\n\
           round-up=<N>                   Round up to next multiple of N.\n\
           round-down=<N>                 Round down to multiple of N.",
    open,
};

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut f = Truncate::default();
    each_param(&SPEC, params, |k, v| {
        match k {
            "truncate" => f.size = Some(parse_size("truncate", k, v)?),
            "round-up" => f.round_up = round_param(k, v)?,
            _ => f.round_down = round_param(k, v)?,
        }
        Ok(())
    })?;
    Ok(over(f, inner))
}

/// nbdkit parses round-up/round-down as a size that must be a power of two up to 2^32-1.
fn round_param(key: &str, value: &str) -> Result<u64> {
    let r = parse_size("truncate", key, value)?;
    if r == 0 {
        return Err(bad("truncate", key, "if set, must be > 0"));
    }
    if r > u64::from(u32::MAX) {
        return Err(bad("truncate", key, "is too large"));
    }
    if !r.is_power_of_two() {
        return Err(bad("truncate", key, "must be a power of 2"));
    }
    Ok(r)
}

/// The configured size change; 0 means "no rounding".
#[derive(Default)]
pub struct Truncate {
    size: Option<u64>,
    round_up: u64,
    round_down: u64,
}

/// Per connection: the layer below's size and the size served, from open.
pub struct Conn {
    real: u64,
    size: u64,
}

impl Conn {
    /// How much of `[offset, offset+count)` lies inside the layer below.
    fn inside(&self, count: u64, offset: u64) -> u64 {
        if offset >= self.real {
            0
        } else {
            count.min(self.real - offset)
        }
    }
}

impl Filter for Truncate {
    type Conn = Conn;
    fn name(&self) -> &str {
        "truncate"
    }
    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<(Conn, Next)> {
        let next = Next::open(next, ctx)?;
        let real = next.get_size()?;
        let mut size = self.size.unwrap_or(real);
        if self.round_up > 0 {
            size = size
                .checked_next_multiple_of(self.round_up)
                .filter(|&s| s <= i64::MAX as u64)
                .ok_or_else(|| {
                    BlockError::new(
                        Errno::EINVAL,
                        format!(
                            "truncate: cannot round size {size} up to next boundary of {}",
                            self.round_up
                        ),
                    )
                })?;
        }
        if self.round_down > 0 {
            size -= size % self.round_down;
        }
        Ok((Conn { real, size }, next))
    }
    fn get_size(&self, c: &Conn, _: &Next) -> Result<u64> {
        Ok(c.size)
    }
    fn can_extents(&self, _: &Conn, next: &Next) -> Result<bool> {
        next.can_extents()?;
        Ok(true)
    }
    fn can_fast_zero(&self, _: &Conn, next: &Next) -> Result<bool> {
        next.can_fast_zero()?;
        Ok(true)
    }
    fn pread(&self, c: &Conn, next: &Next, buf: &mut [u8], off: u64, f: Flags) -> Result<()> {
        let n = c.inside(buf.len() as u64, off) as usize;
        if n > 0 {
            next.pread(&mut buf[..n], off, f)?;
        }
        buf[n..].fill(0);
        Ok(())
    }
    fn pwrite(&self, c: &Conn, next: &Next, buf: &[u8], off: u64, f: Flags) -> Result<()> {
        let n = c.inside(buf.len() as u64, off) as usize;
        if n > 0 {
            next.pwrite(&buf[..n], off, f)?;
        }
        if buf[n..].iter().any(|&b| b != 0) {
            return Err(BlockError::new(
                Errno::ENOSPC,
                "truncate: write beyond end of underlying device",
            ));
        }
        Ok(())
    }
    fn trim(&self, c: &Conn, next: &Next, count: u64, off: u64, f: Flags) -> Result<()> {
        match c.inside(count, off) {
            0 => Ok(()),
            n => next.trim(n, off, f),
        }
    }
    fn zero(&self, c: &Conn, next: &Next, count: u64, off: u64, f: Flags) -> Result<()> {
        match c.inside(count, off) {
            0 => Ok(()),
            n => {
                if f.contains(Flags::FAST_ZERO) && !next.can_fast_zero()? {
                    return Err(BlockError::errno(Errno::ENOTSUP));
                }
                next.zero(n, off, f)
            }
        }
    }
    fn cache(&self, c: &Conn, next: &Next, count: u64, off: u64, f: Flags) -> Result<()> {
        match c.inside(count, off) {
            0 => Ok(()),
            n => next.cache(n, off, f),
        }
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
        if off >= c.real {
            return out.add(c.real, c.size - c.real, EXTENT_HOLE | EXTENT_ZERO);
        }
        let mut below = Extents::new(off, c.real);
        let n = c.inside(count, off);
        if next.can_extents()? {
            next.extents(n, off, f, &mut below)?;
        } else {
            below.add(off, n, 0)?;
        }
        for e in below.as_slice() {
            out.add(e.offset, e.length, e.kind)?;
        }
        Ok(())
    }
    fn allocation_depth(
        &self,
        c: &Conn,
        next: &Next,
        count: u64,
        off: u64,
        out: &mut Extents,
    ) -> Result<()> {
        if off >= c.real {
            return out.add(c.real, c.size - c.real, 0);
        }
        let mut below = Extents::new(off, c.real);
        next.allocation_depth(c.inside(count, off), off, &mut below)?;
        for e in below.as_slice() {
            out.add(e.offset, e.length, e.kind)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use crate::extents::{EXTENT_HOLE, EXTENT_ZERO};
    use crate::plugin::Flags;
    use crate::Errno;

    #[test]
    fn truncate_larger_reads_zero_tail_and_refuses_nonzero_writes_there() {
        let e = export(
            filter("truncate", &[("truncate", "12288")], memory(8192)),
            false,
        );
        assert_eq!(e.size(), 12288);
        e.write(&[1u8; 8192], 0, Flags::NONE).unwrap();
        let mut buf = vec![0u8; 8192];
        e.read(&mut buf, 4096).unwrap();
        assert_eq!(&buf[..4096], &[1u8; 4096][..]);
        assert_eq!(&buf[4096..], &[0u8; 4096][..]);
        e.write(&[0u8; 4096], 8192, Flags::NONE).unwrap();
        let err = e.write(&[1u8; 4096], 6144, Flags::NONE).unwrap_err();
        assert_eq!(err.errno, Errno::ENOSPC);
        e.zero(4096, 8192, Flags::FAST_ZERO).unwrap();
        e.trim(8192, 4096, Flags::NONE).unwrap();
        let tail = e.extents(4096, 8192, Flags::NONE).unwrap();
        assert_eq!(tail.as_slice()[0].kind, EXTENT_HOLE | EXTENT_ZERO);
        assert_eq!(tail.as_slice()[0].length, 4096);
    }

    #[test]
    fn truncate_rounds_up_and_down() {
        let up = export(
            filter("truncate", &[("round-up", "4096")], memory(5000)),
            true,
        );
        assert_eq!(up.size(), 8192);
        let down = export(
            filter("truncate", &[("round-down", "4k")], memory(5000)),
            true,
        );
        assert_eq!(down.size(), 4096);
        let both = export(
            filter(
                "truncate",
                &[("truncate", "100"), ("round-up", "512")],
                memory(1 << 20),
            ),
            true,
        );
        assert_eq!(both.size(), 512);
    }

    #[test]
    fn truncate_round_must_be_a_power_of_two() {
        let msg = config_error("truncate", &[("round-up", "3000")]);
        assert_eq!(msg, "truncate: round-up: must be a power of 2");
        assert!(config_error("truncate", &[("round-down", "0")]).contains("must be > 0"));
    }
}
