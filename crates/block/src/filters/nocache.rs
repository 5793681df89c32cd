//! The nocache filter (nbdkit-nocache-filter): weakens NBD_CMD_CACHE handling.
//!
//! `cachemode=none` (default) hides CACHE; `emulate` advertises it and reads the range
//! (ignoring the plugin's own cache); `nop` advertises it and does nothing.

use std::sync::Arc;

use crate::error::Result;
use crate::filter::{Filter, Next};
use crate::plugin::{Flags, OpenContext, Plugin, Support};
use crate::plugins::ConfigArg;

use super::{bad, each_param, over, FilterEnv, FilterSpec};

pub const SPEC: FilterSpec = FilterSpec {
    name: "nocache",
    keys: &["cachemode"],
    help: "cachemode=<MODE>     Either 'none' (default), 'emulate', or 'nop'.",
    open,
};

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut mode = Mode::None;
    each_param(&SPEC, params, |k, v| {
        mode = match v {
            "none" => Mode::None,
            "emulate" => Mode::Emulate,
            "nop" => Mode::Nop,
            _ => return Err(bad("nocache", k, format!("unknown cachemode '{v}'"))),
        };
        Ok(())
    })?;
    Ok(over(NoCache { mode }, inner))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    None,
    Emulate,
    Nop,
}

pub struct NoCache {
    pub mode: Mode,
}

impl Filter for NoCache {
    type Conn = ();
    fn name(&self) -> &str {
        "nocache"
    }
    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<((), Next)> {
        Ok(((), Next::open(next, ctx)?))
    }
    fn can_cache(&self, _: &(), _: &Next) -> Result<Support> {
        Ok(match self.mode {
            Mode::None => Support::None,
            Mode::Emulate => Support::Emulate,
            Mode::Nop => Support::Native,
        })
    }
    fn cache(&self, _: &(), _: &Next, _: u64, _: u64, _: Flags) -> Result<()> {
        Ok(())
    }
    /// Reads pass through unchanged, so their bytes lie where the layer below says.
    const READS_PASS_THROUGH: bool = true;
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use crate::plugin::Support;

    #[test]
    fn nocache_modes_set_the_cache_capability() {
        for (mode, want) in [
            ("none", Support::None),
            ("emulate", Support::Emulate),
            ("nop", Support::Native),
        ] {
            let e = export(
                filter("nocache", &[("cachemode", mode)], memory(4096)),
                true,
            );
            assert_eq!(e.caps().cache, want, "{mode}");
            if want != Support::None {
                e.cache(4096, 0).unwrap();
            }
        }
        let e = export(filter("nocache", &[], memory(4096)), true);
        assert_eq!(e.caps().cache, Support::None);
    }
}
