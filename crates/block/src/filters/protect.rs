//! The protect filter (nbdkit-protect-filter): write-protects byte ranges of the layer
//! below while the export stays writable.
//!
//! `protect=START-END` (inclusive; either end may be omitted) protects a range,
//! `protect=~START-END` its complement; the parameter may repeat. Ranges are sorted and
//! merged at configuration. A write, trim or zero touching a protected range is allowed only
//! if it would not change it (the bytes written equal those there, or the range already
//! reads as zeroes); otherwise it fails with EPERM and nothing is written.
//!
//! nbdkit merges overlapping ranges by taking the later range's end, which shrinks a range
//! that contains the next one (`0-100` and `10-20` protect only `0-20`); sluice keeps the
//! larger end, so a byte the user asked to protect always is.

use std::sync::Arc;

use crate::error::{BlockError, Errno, Result};
use crate::filter::{Filter, Next};
use crate::plugin::{Flags, Handle, OpenContext, Plugin};
use crate::plugins::ConfigArg;

use super::{bad, each_param, over, parse_u64, FilterEnv, FilterSpec};

pub const SPEC: FilterSpec = FilterSpec {
    name: "protect",
    keys: &["protect"],
    help: "protect=<START>-<END>      Protect range of bytes START-END (inclusive).",
    open,
};

/// The end of the address space nbdkit uses for "to the end".
const END: u64 = i64::MAX as u64;

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut ranges = Vec::new();
    each_param(&SPEC, params, |k, v| parse_range(k, v, &mut ranges))?;
    Ok(over(Protect::new(ranges), inner))
}

/// Parses `START-END` or `~START-END` into `out` (inclusive ranges).
fn parse_range(key: &str, value: &str, out: &mut Vec<(u64, u64)>) -> Result<()> {
    let (negate, body) = match value.strip_prefix('~') {
        Some(b) => (true, b),
        None => (false, value),
    };
    let Some((s, e)) = body.split_once('-') else {
        return Err(bad(
            "protect",
            key,
            format!("cannot parse range, missing '-': {value}"),
        ));
    };
    let start = if s.is_empty() {
        0
    } else {
        parse_u64("protect", key, s)?
    };
    let end = if e.is_empty() {
        END
    } else {
        parse_u64("protect", key, e)?
    };
    if end < start {
        return Err(bad(
            "protect",
            key,
            format!("invalid range, end < start: {value}"),
        ));
    }
    if !negate {
        out.push((start, end));
    } else {
        if start > 0 {
            out.push((0, start - 1));
        }
        if end < END {
            out.push((end + 1, END));
        }
    }
    Ok(())
}

/// The protected ranges, sorted, merged, inclusive.
pub struct Protect {
    ranges: Vec<(u64, u64)>,
}

impl Protect {
    pub fn new(mut ranges: Vec<(u64, u64)>) -> Protect {
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (s, e) in ranges {
            match merged.last_mut() {
                Some(last) if last.1.saturating_add(1) >= s => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        Protect { ranges: merged }
    }

    /// Fails with EPERM if writing `data` (None: zeroes) at `offset` would change a
    /// protected byte.
    fn check(&self, next: &Next, count: u64, offset: u64, data: Option<&[u8]>) -> Result<()> {
        let last = offset + count - 1;
        let first = self.ranges.partition_point(|r| r.1 < offset);
        for &(s, e) in self.ranges[first..].iter().take_while(|r| r.0 <= last) {
            let from = s.max(offset);
            let to = e.min(last);
            let mut have = vec![0u8; (to - from + 1) as usize];
            next.pread(&mut have, from, Flags::NONE)?;
            let same = match data {
                Some(d) => {
                    let at = (from - offset) as usize;
                    have[..] == d[at..at + have.len()]
                }
                None => have.iter().all(|&b| b == 0),
            };
            if !same {
                let desc = if e == END {
                    format!("{s}-")
                } else {
                    format!("{s}-{e}")
                };
                return Err(BlockError::new(
                    Errno::EPERM,
                    format!("protect filter prevented write to protected range {desc}"),
                ));
            }
        }
        Ok(())
    }
}

impl Filter for Protect {
    type Conn = ();
    fn name(&self) -> &str {
        "protect"
    }
    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<((), Next)> {
        Ok(((), Next::open(next, ctx)?))
    }
    fn pwrite(&self, _: &(), next: &Next, buf: &[u8], off: u64, f: Flags) -> Result<()> {
        self.check(next, buf.len() as u64, off, Some(buf))?;
        next.pwrite(buf, off, f)
    }
    fn trim(&self, _: &(), next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        self.check(next, n, off, None)?;
        next.trim(n, off, f)
    }
    fn zero(&self, _: &(), next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        self.check(next, n, off, None)?;
        next.zero(n, off, f)
    }
    /// Reads pass through unchanged, so their bytes lie where the layer below says.
    const READS_PASS_THROUGH: bool = true;
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn protect_merges_and_complements_ranges() {
        let mut v = Vec::new();
        parse_range("protect", "~1024-2047", &mut v).unwrap();
        parse_range("protect", "0x10-0x1f", &mut v).unwrap();
        parse_range("protect", "0-100", &mut v).unwrap();
        parse_range("protect", "10-20", &mut v).unwrap();
        assert_eq!(Protect::new(v).ranges, [(0, 1023), (2048, END)]);
        let mut w = Vec::new();
        parse_range("protect", "-", &mut w).unwrap();
        assert_eq!(w, [(0, END)]);
        assert!(parse_range("protect", "5", &mut w).is_err());
        assert_eq!(
            config_error("protect", &[("protect", "9-3")]),
            "protect: protect: invalid range, end < start: 9-3"
        );
    }

    #[test]
    fn protect_refuses_changes_but_allows_same_data_and_unprotected_writes() {
        let mem = memory(1 << 20);
        let e = export(filter("protect", &[("protect", "512-1023")], mem), false);
        e.write(&[1u8; 512], 0, Flags::NONE).unwrap();
        e.write(&[0u8; 1024], 512, Flags::NONE).unwrap(); // unchanged protected bytes
        let err = e.write(&[2u8; 1024], 0, Flags::NONE).unwrap_err();
        assert_eq!(err.errno, Errno::EPERM);
        // Nothing of the refused write landed.
        let mut buf = [9u8; 512];
        e.read(&mut buf, 0).unwrap();
        assert_eq!(buf, [1u8; 512]);
        e.zero(1024, 512, Flags::NONE).unwrap(); // the range is zero already
        e.trim(512, 0, Flags::NONE).unwrap();
    }

    #[test]
    fn protect_zero_over_protected_data_is_eperm() {
        let mem = memory(1 << 20);
        export(mem.clone(), false)
            .write(&[3u8; 512], 4096, Flags::NONE)
            .unwrap();
        let e = export(filter("protect", &[("protect", "~0-4095")], mem), false);
        assert_eq!(
            e.zero(8192, 0, Flags::NONE).unwrap_err().errno,
            Errno::EPERM
        );
        assert_eq!(
            e.trim(512, 4096, Flags::NONE).unwrap_err().errno,
            Errno::EPERM
        );
        e.zero(4096, 0, Flags::NONE).unwrap();
    }
}
