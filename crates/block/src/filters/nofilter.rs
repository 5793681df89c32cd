//! The nofilter filter (nbdkit-nofilter-filter): passes everything through unchanged. It is
//! the measure of what a layer costs: one virtual call per request, nothing more.

use std::sync::Arc;

use crate::error::Result;
use crate::filter::{Filter, Next};
use crate::plugin::{OpenContext, Plugin};
use crate::plugins::ConfigArg;

use super::{each_param, over, FilterEnv, FilterSpec};

pub const SPEC: FilterSpec = FilterSpec {
    name: "nofilter",
    keys: &[],
    help: "",
    open,
};

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    each_param(&SPEC, params, |_, _| Ok(()))?;
    Ok(over(NoFilter, inner))
}

pub struct NoFilter;

impl Filter for NoFilter {
    type Conn = ();
    fn name(&self) -> &str {
        "nofilter"
    }
    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<((), Next)> {
        Ok(((), Next::open(next, ctx)?))
    }
    /// Reads pass through unchanged, so their bytes lie where the layer below says.
    const READS_PASS_THROUGH: bool = true;
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;

    #[test]
    fn nofilter_three_deep_has_the_plugins_capabilities() {
        let mem = memory(1 << 20);
        let top = (0..3).fold(mem.clone(), |p, _| filter("nofilter", &[], p));
        assert_eq!(export(top, false).caps(), export(mem, false).caps());
    }
}
