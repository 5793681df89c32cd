//! The nozero filter (nbdkit-nozero-filter): weakens WRITE_ZEROES handling.
//!
//! `zeromode=none` (default) hides WRITE_ZEROES; `emulate` advertises it but always writes
//! zero buffers; `notrim` passes zero requests down without MAY_TRIM; `plugin` passes them
//! unchanged. `fastzeromode` decides fast zeroes: `default` (fail them under emulate, else
//! the plugin's answer), `none` (not advertised), `slow` (advertised, always ENOTSUP),
//! `ignore` (advertised, the flag dropped). Zero support is answered *native* whenever it is
//! on, and this filter does the emulation itself through [`Lower`], so that `ignore` and
//! `notrim` behave the same whatever the plugin's own zero support.

use std::sync::Arc;

use crate::error::{BlockError, Errno, Result};
use crate::filter::{Filter, Next};
use crate::plugin::{Flags, Handle, OpenContext, Plugin, Support};
use crate::plugins::ConfigArg;

use super::lower::{write_zeroes, Lower};
use super::{bad, each_param, over, FilterEnv, FilterSpec};

pub const SPEC: FilterSpec = FilterSpec {
    name: "nozero",
    keys: &["zeromode", "fastzeromode"],
    help: "zeromode=<MODE>      One of 'none' (default), 'emulate', 'notrim', 'plugin'.\n\
           fastzeromode=<MODE>  One of 'default', 'none', 'slow', 'ignore'.",
    open,
};

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut f = NoZero {
        zero: ZeroMode::None,
        fast: FastMode::Default,
    };
    each_param(&SPEC, params, |k, v| {
        if k == "zeromode" {
            f.zero = match v {
                "none" => ZeroMode::None,
                "emulate" => ZeroMode::Emulate,
                "notrim" => ZeroMode::NoTrim,
                "plugin" => ZeroMode::Plugin,
                _ => return Err(bad("nozero", k, format!("unknown zeromode '{v}'"))),
            };
        } else {
            f.fast = match v {
                "default" => FastMode::Default,
                "none" => FastMode::None,
                "slow" => FastMode::Slow,
                "ignore" => FastMode::Ignore,
                _ => return Err(bad("nozero", k, format!("unknown fastzeromode '{v}'"))),
            };
        }
        Ok(())
    })?;
    Ok(over(f, inner))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroMode {
    None,
    Emulate,
    NoTrim,
    Plugin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FastMode {
    Default,
    None,
    Slow,
    Ignore,
}

pub struct NoZero {
    pub zero: ZeroMode,
    pub fast: FastMode,
}

impl Filter for NoZero {
    type Conn = Lower;
    fn name(&self) -> &str {
        "nozero"
    }
    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<(Lower, Next)> {
        let next = Next::open(next, ctx)?;
        let lower = Lower::query(&next, ctx.readonly)?;
        if !ctx.readonly
            && matches!(self.zero, ZeroMode::NoTrim | ZeroMode::Plugin)
            && lower.zero == Support::None
        {
            let m = if self.zero == ZeroMode::NoTrim {
                "notrim"
            } else {
                "plugin"
            };
            return Err(BlockError::new(
                Errno::EINVAL,
                format!("nozero: zeromode '{m}' requires plugin zero support"),
            ));
        }
        Ok((lower, next))
    }
    fn can_zero(&self, _: &Lower, next: &Next) -> Result<Support> {
        Ok(match self.zero {
            ZeroMode::None => Support::None,
            // Done here, by writes or by the layer below: native as far as the export sees.
            ZeroMode::Emulate => Support::Native,
            ZeroMode::NoTrim | ZeroMode::Plugin => match next.can_zero()? {
                Support::None => Support::None,
                _ => Support::Native,
            },
        })
    }
    fn can_fast_zero(&self, _: &Lower, next: &Next) -> Result<bool> {
        match (self.zero, self.fast) {
            (ZeroMode::None, _) => Ok(false),
            (ZeroMode::NoTrim | ZeroMode::Plugin, FastMode::Default) => next.can_fast_zero(),
            (_, fast) => Ok(fast != FastMode::None),
        }
    }
    fn zero(&self, l: &Lower, next: &Next, n: u64, off: u64, mut f: Flags) -> Result<()> {
        if f.contains(Flags::FAST_ZERO) {
            // Under emulate, nbdkit 1.32 emulates zero itself and fails every fast zero,
            // whatever fastzeromode says (its manual promises `ignore` would write).
            if self.fast == FastMode::Slow || self.zero == ZeroMode::Emulate {
                return Err(BlockError::errno(Errno::ENOTSUP));
            }
            if self.fast == FastMode::Ignore {
                f = f.without(Flags::FAST_ZERO);
            }
        }
        match self.zero {
            ZeroMode::NoTrim => l.zero(next, n, off, f.without(Flags::MAY_TRIM)),
            ZeroMode::Plugin => l.zero(next, n, off, f),
            ZeroMode::Emulate | ZeroMode::None => {
                // FUA on the last write only; Lower turns it into a flush if need be.
                write_zeroes(next, n, off, f.without(Flags::FUA).without(Flags::MAY_TRIM))?;
                if f.contains(Flags::FUA) {
                    l.flush(next)?;
                }
                Ok(())
            }
        }
    }
    /// Reads pass through unchanged, so their bytes lie where the layer below says.
    const READS_PASS_THROUGH: bool = true;
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use crate::plugin::{Flags, Support};
    use crate::Errno;

    fn caps(kv: &[(&str, &str)]) -> (Support, bool) {
        let e = export(filter("nozero", kv, memory(1 << 20)), false);
        (e.caps().zero, e.caps().fast_zero)
    }

    #[test]
    fn nozero_default_hides_write_zeroes() {
        assert_eq!(caps(&[]), (Support::None, false));
    }

    #[test]
    fn nozero_modes_advertise_as_nbdkit() {
        assert_eq!(caps(&[("zeromode", "emulate")]), (Support::Native, true));
        assert_eq!(
            caps(&[("zeromode", "emulate"), ("fastzeromode", "none")]),
            (Support::Native, false)
        );
        assert_eq!(caps(&[("zeromode", "plugin")]), (Support::Native, true));
        assert_eq!(caps(&[("zeromode", "notrim")]), (Support::Native, true));
    }

    #[test]
    fn nozero_emulate_writes_data_and_fails_fast_zero() {
        let mem = memory(1 << 20);
        let e = export(
            filter("nozero", &[("zeromode", "emulate")], mem.clone()),
            false,
        );
        e.write(&[5; 65536], 0, Flags::NONE).unwrap();
        e.zero(65536, 0, Flags::MAY_TRIM | Flags::FUA).unwrap();
        let mut buf = [1u8; 65536];
        e.read(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        // The pages were written, not punched: still allocated.
        let ext = e.extents(65536, 0, Flags::NONE).unwrap();
        assert_eq!(ext.as_slice()[0].kind, 0);
        let err = e.zero(4096, 0, Flags::FAST_ZERO).unwrap_err();
        assert_eq!(err.errno, Errno::ENOTSUP);
        let ignore = export(
            filter(
                "nozero",
                &[("zeromode", "plugin"), ("fastzeromode", "ignore")],
                mem,
            ),
            false,
        );
        ignore.zero(4096, 0, Flags::FAST_ZERO).unwrap();
    }

    #[test]
    fn nozero_slow_fails_every_fast_zero() {
        let e = export(
            filter(
                "nozero",
                &[("zeromode", "plugin"), ("fastzeromode", "slow")],
                memory(1 << 20),
            ),
            false,
        );
        assert_eq!(
            e.zero(4096, 0, Flags::FAST_ZERO).unwrap_err().errno,
            Errno::ENOTSUP
        );
        e.zero(4096, 0, Flags::NONE).unwrap();
    }

    #[test]
    fn nozero_unknown_mode_is_refused() {
        assert_eq!(
            config_error("nozero", &[("zeromode", "x")]),
            "nozero: zeromode: unknown zeromode 'x'"
        );
    }
}
