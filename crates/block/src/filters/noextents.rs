//! The noextents filter (nbdkit-noextents-filter): hides block status, so the export looks
//! fully allocated. Extents asked by a filter above still answer "all data".

use std::sync::Arc;

use crate::error::Result;
use crate::extents::Extents;
use crate::filter::{Filter, Next};
use crate::plugin::{Flags, OpenContext, Plugin};
use crate::plugins::ConfigArg;

use super::{each_param, over, FilterEnv, FilterSpec};

pub const SPEC: FilterSpec = FilterSpec {
    name: "noextents",
    keys: &[],
    help: "",
    open,
};

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    each_param(&SPEC, params, |_, _| Ok(()))?;
    Ok(over(NoExtents, inner))
}

pub struct NoExtents;

impl Filter for NoExtents {
    type Conn = ();
    fn name(&self) -> &str {
        "noextents"
    }
    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<((), Next)> {
        Ok(((), Next::open(next, ctx)?))
    }
    fn can_extents(&self, _: &(), _: &Next) -> Result<bool> {
        Ok(false)
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
    fn has_allocation_depth(&self, _: &dyn Plugin) -> bool {
        false
    }
    fn allocation_depth(
        &self,
        _: &(),
        _: &Next,
        n: u64,
        off: u64,
        out: &mut Extents,
    ) -> Result<()> {
        out.add(off, n, 1)
    }
    /// Reads pass through unchanged, so their bytes lie where the layer below says.
    const READS_PASS_THROUGH: bool = true;
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use crate::plugin::Flags;

    #[test]
    fn noextents_reports_a_hole_as_data() {
        let bare = export(memory(1 << 20), true);
        assert_ne!(
            bare.extents(4096, 0, Flags::NONE).unwrap().as_slice()[0].kind,
            0
        );
        let e = export(filter("noextents", &[], memory(1 << 20)), true);
        assert!(!e.caps().extents);
        let ext = e.extents(1 << 20, 0, Flags::NONE).unwrap();
        assert_eq!(ext.as_slice().len(), 1);
        assert_eq!(ext.as_slice()[0].kind, 0);
    }
}
