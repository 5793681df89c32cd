//! The cacheextents filter (nbdkit-cacheextents-filter): remembers the last block-status
//! answer of the plugin and serves later requests that start inside it from memory, for
//! clients that ask one extent at a time over a plugin whose answers are slow but long.
//!
//! The plugin is asked without REQ_ONE and may answer up to the end of the export; the
//! answer is shared by every connection and forgotten on any write, trim or zero.

use std::sync::{Arc, Mutex, PoisonError};

use crate::error::Result;
use crate::extents::{Extent, Extents};
use crate::filter::{Filter, Next};
use crate::plugin::{Flags, Handle, OpenContext, Plugin};
use crate::plugins::ConfigArg;

use super::{each_param, over, FilterEnv, FilterSpec};

pub const SPEC: FilterSpec = FilterSpec {
    name: "cacheextents",
    keys: &[],
    help: "",
    open,
};

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    each_param(&SPEC, params, |_, _| Ok(()))?;
    Ok(over(CacheExtents::default(), inner))
}

/// The last answer: extents covering a contiguous range.
#[derive(Default)]
pub struct CacheExtents {
    last: Mutex<Vec<Extent>>,
}

impl CacheExtents {
    fn forget(&self) {
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

impl Filter for CacheExtents {
    type Conn = u64;
    fn name(&self) -> &str {
        "cacheextents"
    }
    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<(u64, Next)> {
        let next = Next::open(next, ctx)?;
        let size = next.get_size()?;
        Ok((size, next))
    }
    fn extents(
        &self,
        size: &u64,
        next: &Next,
        count: u64,
        off: u64,
        f: Flags,
        out: &mut Extents,
    ) -> Result<()> {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let hit = match (last.first(), last.last()) {
            (Some(a), Some(z)) => off >= a.offset && off < z.offset + z.length,
            _ => false,
        };
        if !hit {
            let mut below = Extents::new(off, *size);
            next.extents(count, off, f.without(Flags::REQ_ONE), &mut below)?;
            *last = below.as_slice().to_vec();
        }
        for e in last.iter() {
            out.add(e.offset, e.length, e.kind)?;
        }
        Ok(())
    }
    fn pwrite(&self, _: &u64, next: &Next, buf: &[u8], off: u64, f: Flags) -> Result<()> {
        self.forget();
        next.pwrite(buf, off, f)
    }
    fn trim(&self, _: &u64, next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        self.forget();
        next.trim(n, off, f)
    }
    fn zero(&self, _: &u64, next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        self.forget();
        next.zero(n, off, f)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use crate::extents::{EXTENT_HOLE, EXTENT_ZERO};
    use crate::plugin::Flags;

    #[test]
    fn cacheextents_serves_from_the_last_answer_until_a_write() {
        let mem = memory(1 << 20);
        let e = export(filter("cacheextents", &[], mem.clone()), false);
        e.write(&[1u8; 65536], 65536, Flags::NONE).unwrap();
        let first = e.extents(1 << 20, 0, Flags::REQ_ONE).unwrap();
        assert_eq!(first.as_slice()[0].length, 65536);
        // A write behind the filter's back is not seen: the answer is cached.
        export(mem, false)
            .write(&[1u8; 4096], 0, Flags::NONE)
            .unwrap();
        let again = e.extents(4096, 0, Flags::NONE).unwrap();
        assert_eq!(again.as_slice()[0].kind, EXTENT_HOLE | EXTENT_ZERO);
        // A write through it forgets.
        e.write(&[2u8; 512], 8192, Flags::NONE).unwrap();
        let fresh = e.extents(4096, 0, Flags::NONE).unwrap();
        assert_eq!(fresh.as_slice()[0].kind, 0);
    }
}
