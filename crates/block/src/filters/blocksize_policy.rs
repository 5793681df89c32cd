//! The blocksize-policy filter (nbdkit-blocksize-policy-filter): sets the block size
//! constraints advertised to clients and, with `blocksize-error-policy=error`, refuses
//! requests that break them with EINVAL before the plugin sees them.
//!
//! Values not given come from the plugin, or (when the plugin states none) from the defaults
//! 1 / 4096 / 4G-1. The checks are those of nbdkit 1.32: a request shorter than the minimum,
//! not a multiple of it or not aligned to it is refused, and so is a read or write longer
//! than the maximum.

use std::sync::Arc;

use crate::error::{BlockError, Errno, Result};
use crate::extents::Extents;
use crate::filter::{Filter, Next};
use crate::plugin::{BlockSize, Flags, Handle, OpenContext, Plugin};
use crate::plugins::ConfigArg;

use super::{bad, each_param, over, parse_size, FilterEnv, FilterSpec};

pub const SPEC: FilterSpec = FilterSpec {
    name: "blocksize-policy",
    keys: &[
        "blocksize-error-policy",
        "blocksize-minimum",
        "blocksize-preferred",
        "blocksize-maximum",
    ],
    help: "",
    open,
};

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut f = Policy::default();
    each_param(&SPEC, params, |k, v| {
        if k == "blocksize-error-policy" {
            f.error = match v {
                "allow" => false,
                "error" => true,
                _ => return Err(bad("blocksize-policy", k, format!("unknown {k}: {v}"))),
            };
            return Ok(());
        }
        let n = parse_size("blocksize-policy", k, v)
            .ok()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| bad("blocksize-policy", k, format!("could not parse {v}")))?;
        match k {
            "blocksize-minimum" => f.minimum = n,
            "blocksize-preferred" => f.preferred = n,
            _ => f.maximum = n,
        }
        Ok(())
    })?;
    f.check()?;
    Ok(over(f, inner))
}

/// Configured constraints (0 = not given) and the error policy.
#[derive(Default)]
pub struct Policy {
    minimum: u32,
    preferred: u32,
    maximum: u32,
    error: bool,
}

impl Policy {
    fn check(&self) -> Result<()> {
        let e = |k: &str, m: &str| Err(bad("blocksize-policy", k, m));
        if self.minimum != 0 {
            if !self.minimum.is_power_of_two() {
                return e("blocksize-minimum", "must be a power of 2");
            }
            if self.minimum > 65536 {
                return e("blocksize-minimum", "must be <= 64K");
            }
        }
        if self.preferred != 0 {
            if !self.preferred.is_power_of_two() {
                return e("blocksize-preferred", "must be a power of 2");
            }
            if !(512..=32 * 1024 * 1024).contains(&self.preferred) {
                return e("blocksize-preferred", "must be between 512 and 32M");
            }
        }
        if self.minimum != 0
            && self.maximum != 0
            && self.maximum != u32::MAX
            && !self.maximum.is_multiple_of(self.minimum)
        {
            return e(
                "blocksize-maximum",
                "must be -1 or a multiple of blocksize-minimum",
            );
        }
        if self.minimum != 0 && self.preferred != 0 && self.minimum > self.preferred {
            return e("blocksize-minimum", "must be <= blocksize-preferred");
        }
        if self.preferred != 0 && self.maximum != 0 && self.preferred > self.maximum {
            return e("blocksize-preferred", "must be <= blocksize-maximum");
        }
        Ok(())
    }

    /// The constraints to advertise, from the configuration and the layer below.
    fn compute(&self, next: &Next) -> Result<Option<BlockSize>> {
        let (min, pref, max) = (self.minimum, self.preferred, self.maximum);
        if min != 0 && pref != 0 && max != 0 {
            return Ok(Some(BlockSize {
                minimum: min,
                preferred: pref,
                maximum: max,
            }));
        }
        let below = next.block_size()?;
        if min == 0 && pref == 0 && max == 0 {
            return Ok(below);
        }
        let or = |v: u32, d: u32| if v != 0 { v } else { d };
        let bs = match below {
            None => BlockSize {
                minimum: or(min, 1),
                preferred: or(pref, 4096),
                maximum: or(max, u32::MAX),
            },
            Some(b) => BlockSize {
                minimum: or(min, b.minimum),
                preferred: or(pref, b.preferred),
                maximum: or(max, b.maximum),
            },
        };
        if bs.minimum > bs.preferred || bs.preferred > bs.maximum {
            return Err(BlockError::new(
                Errno::EINVAL,
                format!(
                    "blocksize-policy: computed block size values are invalid, minimum {} > \
                     preferred {} or preferred > maximum {}",
                    bs.minimum, bs.preferred, bs.maximum
                ),
            ));
        }
        Ok(Some(bs))
    }
}

/// Per connection: the constraints advertised (None: no constraints).
pub struct Conn {
    bs: Option<BlockSize>,
}

impl Conn {
    fn check(&self, what: &str, data: bool, count: u64, offset: u64) -> Result<()> {
        let Some(bs) = self.bs else { return Ok(()) };
        let min = u64::from(bs.minimum);
        let problem = if count < min {
            format!("count {count} is smaller than minimum size {min}")
        } else if data && count > u64::from(bs.maximum) {
            format!("count {count} is larger than maximum size {}", bs.maximum)
        } else if !count.is_multiple_of(min) {
            format!("count {count} is not a multiple of minimum size {min}")
        } else if !offset.is_multiple_of(min) {
            format!("offset {offset} is not aligned to a multiple of minimum size {min}")
        } else {
            return Ok(());
        };
        Err(BlockError::new(
            Errno::EINVAL,
            format!("blocksize-policy: client {what} request rejected: {problem}"),
        ))
    }
}

impl Policy {
    fn guard(&self, c: &Conn, what: &str, data: bool, count: u64, offset: u64) -> Result<()> {
        if self.error {
            c.check(what, data, count, offset)
        } else {
            Ok(())
        }
    }
}

impl Filter for Policy {
    type Conn = Conn;
    fn name(&self) -> &str {
        "blocksize-policy"
    }
    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<(Conn, Next)> {
        let next = Next::open(next, ctx)?;
        let bs = self.compute(&next)?;
        Ok((Conn { bs }, next))
    }
    fn block_size(&self, c: &Conn, _: &Next) -> Result<Option<BlockSize>> {
        Ok(c.bs)
    }
    fn pread(&self, c: &Conn, next: &Next, buf: &mut [u8], off: u64, f: Flags) -> Result<()> {
        self.guard(c, "pread", true, buf.len() as u64, off)?;
        next.pread(buf, off, f)
    }
    fn pwrite(&self, c: &Conn, next: &Next, buf: &[u8], off: u64, f: Flags) -> Result<()> {
        self.guard(c, "pwrite", true, buf.len() as u64, off)?;
        next.pwrite(buf, off, f)
    }
    fn zero(&self, c: &Conn, next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        self.guard(c, "zero", false, n, off)?;
        next.zero(n, off, f)
    }
    fn trim(&self, c: &Conn, next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        self.guard(c, "trim", false, n, off)?;
        next.trim(n, off, f)
    }
    fn cache(&self, c: &Conn, next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        self.guard(c, "cache", false, n, off)?;
        next.cache(n, off, f)
    }
    fn extents(
        &self,
        c: &Conn,
        next: &Next,
        n: u64,
        off: u64,
        f: Flags,
        out: &mut Extents,
    ) -> Result<()> {
        self.guard(c, "extents", false, n, off)?;
        next.extents(n, off, f, out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use crate::plugin::Flags;
    use crate::Errno;

    #[test]
    fn policy_advertises_given_values_over_defaults() {
        let e = export(
            filter(
                "blocksize-policy",
                &[("blocksize-preferred", "32K")],
                memory(1 << 20),
            ),
            true,
        );
        let bs = e.caps().block_size.unwrap();
        assert_eq!((bs.minimum, bs.preferred, bs.maximum), (1, 32768, u32::MAX));
        let bare = export(filter("blocksize-policy", &[], memory(1 << 20)), true);
        assert_eq!(bare.caps().block_size, None);
    }

    #[test]
    fn policy_error_refuses_bad_requests_allow_passes_them() {
        let kv = [("blocksize-minimum", "512"), ("blocksize-maximum", "64K")];
        let allow = export(filter("blocksize-policy", &kv, memory(1 << 20)), false);
        let mut buf = vec![0u8; 100];
        allow.read(&mut buf, 1).unwrap();
        let mut kv = kv.to_vec();
        kv.push(("blocksize-error-policy", "error"));
        let e = export(filter("blocksize-policy", &kv, memory(1 << 20)), false);
        assert_eq!(e.read(&mut buf, 0).unwrap_err().errno, Errno::EINVAL);
        let mut big = vec![0u8; 128 * 1024];
        assert_eq!(e.read(&mut big, 0).unwrap_err().errno, Errno::EINVAL);
        assert_eq!(
            e.zero(512, 100, Flags::NONE).unwrap_err().errno,
            Errno::EINVAL
        );
        e.zero(128 * 1024, 0, Flags::NONE).unwrap();
        let mut ok = vec![0u8; 1024];
        e.read(&mut ok, 512).unwrap();
    }

    #[test]
    fn policy_parameters_are_checked() {
        assert_eq!(
            config_error("blocksize-policy", &[("blocksize-minimum", "3")]),
            "blocksize-policy: blocksize-minimum: must be a power of 2"
        );
        assert!(
            config_error("blocksize-policy", &[("blocksize-error-policy", "x")])
                .contains("unknown blocksize-error-policy: x")
        );
    }
}
