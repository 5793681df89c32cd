//! The extentlist filter (nbdkit-extentlist-filter): answers block status from a static
//! list in a file instead of asking the plugin.
//!
//! Each line of `extentlist=FILE` is `offset length [type]`, sizes in nbdkit's syntax, type
//! a number or words containing `hole` and/or `zero` (missing: data). The list is read,
//! sorted and checked for overlaps when the filter is configured; gaps (and everything after
//! the last extent) are holes that read as zeroes. Writes do not update it.

use std::sync::Arc;

use crate::error::Result;
use crate::extents::{Extents, EXTENT_HOLE, EXTENT_ZERO};
use crate::filter::{Filter, Next};
use crate::plugin::{Flags, OpenContext, Plugin};
use crate::plugins::ConfigArg;

use super::{bad, each_param, over, parse_size, FilterEnv, FilterSpec};

pub const SPEC: FilterSpec = FilterSpec {
    name: "extentlist",
    keys: &["extentlist"],
    help: "",
    open,
};

const HOLE: u32 = EXTENT_HOLE | EXTENT_ZERO;

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut file: Option<&str> = None;
    each_param(&SPEC, params, |k, v| {
        if file.is_some() {
            return Err(bad("extentlist", k, "extentlist cannot appear twice"));
        }
        file = Some(v);
        Ok(())
    })?;
    let Some(file) = file else {
        return Err(bad(
            "extentlist",
            "extentlist",
            "you must supply the extentlist parameter on the command line",
        ));
    };
    let text = std::fs::read_to_string(file)
        .map_err(|e| bad("extentlist", "extentlist", format!("open: {file}: {e}")))?;
    Ok(over(ExtentList::parse(file, &text)?, inner))
}

/// Sorted, contiguous extents `(offset, length, type)` covering `0..u64::MAX`.
pub struct ExtentList {
    list: Vec<(u64, u64, u32)>,
}

impl ExtentList {
    /// Parses the file's text (`file` names it in errors).
    pub fn parse(file: &str, text: &str) -> Result<ExtentList> {
        let mut list = Vec::new();
        for line in text.lines() {
            let mut words = line.split([' ', '\t']).filter(|w| !w.is_empty());
            let cannot = || {
                bad(
                    "extentlist",
                    "extentlist",
                    format!("{file}: cannot parse {line}"),
                )
            };
            let offset = words.next().ok_or_else(cannot)?;
            let offset = parse_size("extentlist", "extentlist", offset)?;
            let length = words.next().ok_or_else(cannot)?;
            let length = parse_size("extentlist", "extentlist", length)?;
            if length == 0 {
                continue;
            }
            let kind = match words.next() {
                None => 0,
                Some(t) => t.parse::<u32>().unwrap_or_else(|_| {
                    let mut k = 0;
                    if t.contains("hole") {
                        k |= EXTENT_HOLE;
                    }
                    if t.contains("zero") {
                        k |= EXTENT_ZERO;
                    }
                    k
                }),
            };
            list.push((offset, length, kind));
        }
        list.sort_unstable_by_key(|e| e.0);
        let mut end = 0u64;
        for &(o, l, _) in &list {
            match o.checked_add(l) {
                Some(e) if o >= end => end = e,
                _ => {
                    return Err(bad(
                        "extentlist",
                        "extentlist",
                        "extents in the extent list are overlapping",
                    ))
                }
            }
        }
        let mut full = Vec::with_capacity(list.len() * 2 + 1);
        let mut at = 0u64;
        for (o, l, k) in list {
            if o > at {
                full.push((at, o - at, HOLE));
            }
            full.push((o, l, k));
            at = o + l;
        }
        if at < u64::MAX {
            full.push((at, u64::MAX - at, HOLE));
        }
        Ok(ExtentList { list: full })
    }
}

impl Filter for ExtentList {
    type Conn = ();
    fn name(&self) -> &str {
        "extentlist"
    }
    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<((), Next)> {
        Ok(((), Next::open(next, ctx)?))
    }
    fn can_extents(&self, _: &(), _: &Next) -> Result<bool> {
        Ok(true)
    }
    fn extents(
        &self,
        _: &(),
        _: &Next,
        count: u64,
        offset: u64,
        _: Flags,
        out: &mut Extents,
    ) -> Result<()> {
        let first = self.list.partition_point(|e| e.0 + e.1 <= offset);
        let end = offset.saturating_add(count);
        let mut at = offset;
        for &(o, l, k) in &self.list[first..] {
            if at >= end {
                break;
            }
            out.add(at, o + l - at, k)?;
            at = o + l;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn extentlist_fills_gaps_with_holes() {
        let l = ExtentList::parse("f", "1M 1M\n0 4096 hole\n8192 4k 3\n").unwrap_or_else(|e| {
            panic!("{e}");
        });
        assert_eq!(
            l.list[..5],
            [
                (0, 4096, EXTENT_HOLE),
                (4096, 4096, HOLE),
                (8192, 4096, HOLE),
                (12288, (1 << 20) - 12288, HOLE),
                (1 << 20, 1 << 20, 0)
            ]
        );
        assert!(ExtentList::parse("f", "0 10\n5 10\n").is_err());
        assert!(ExtentList::parse("f", "0\n").is_err());
        // As in nbdkit, a blank line is a parse error.
        assert!(ExtentList::parse("f", "0 1\n\n").is_err());
    }

    #[test]
    fn extentlist_answers_block_status_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("list");
        std::fs::write(&path, "0 64k\n1M 64k\n").unwrap();
        let e = export(
            filter(
                "extentlist",
                &[("extentlist", path.to_str().unwrap())],
                memory(2 << 20),
            ),
            true,
        );
        let ext = e.extents(2 << 20, 0, Flags::NONE).unwrap();
        let got: Vec<_> = ext
            .as_slice()
            .iter()
            .map(|x| (x.offset, x.length, x.kind))
            .collect();
        assert_eq!(
            got,
            [
                (0, 65536, 0),
                (65536, (1 << 20) - 65536, HOLE),
                (1 << 20, 65536, 0),
                ((1 << 20) + 65536, (1 << 20) - 65536, HOLE)
            ]
        );
        assert!(config_error("extentlist", &[]).contains("you must supply"));
    }
}
