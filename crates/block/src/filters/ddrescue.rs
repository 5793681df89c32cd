//! The ddrescue filter (nbdkit-ddrescue-filter): serves a disk image recovered with GNU
//! ddrescue, failing reads of what its map file does not mark as rescued.
//!
//! The map file (`ddrescue-mapfile=FILE`) is read once, when the filter is configured, as
//! nbdkit reads it: lines starting with `#` are comments; the first other line is the
//! current-position line and is skipped; every later line that reads as `POS SIZE STATUS`
//! (numbers in C's `%li` forms: decimal, `0x` hex or `0` octal) is a block, and only blocks
//! whose status is `+` (finished) count. Lines that do not read that way are ignored, as
//! nbdkit's `sscanf` ignores them; a negative position or size is an error. Several
//! `ddrescue-mapfile` parameters add their blocks together, as in nbdkit.
//!
//! A read succeeds only if every byte of it lies in finished blocks; any other read fails
//! with EIO before reaching the layer below. The finished blocks are kept sorted and merged,
//! so a read is one binary search with no lock. As in nbdkit the export is read-only
//! (`can_write` is false, whatever the layer below says) and offers no cache requests; the
//! rest (extents, flush) passes through.
//!
//! Deliberate differences from nbdkit 1.32.5:
//! - a read spanning two adjacent finished blocks succeeds; nbdkit checks each block on its
//!   own and fails it with EIO (GNU ddrescue merges neighbours, so only hand-written map
//!   files show this);
//! - `ddrescue-mapfile` is required; without it nbdkit serves a disk whose every read fails.

use std::sync::Arc;

use crate::error::{BlockError, Errno, Result};
use crate::filter::{Filter, Next};
use crate::plugin::{Flags, Handle, OpenContext, Plugin, Support};
use crate::plugins::ConfigArg;

use super::{bad, each_param, over, FilterEnv, FilterSpec};

pub const SPEC: FilterSpec = FilterSpec {
    name: "ddrescue",
    keys: &["ddrescue-mapfile"],
    help: "ddrescue-mapfile=...     Specify ddrescue mapfile to use",
    open,
};

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut blocks = Vec::new();
    let mut seen = false;
    each_param(&SPEC, params, |k, v| {
        seen = true;
        let text = std::fs::read(v).map_err(|e| bad("ddrescue", k, format!("{v}: {e}")))?;
        let parsed = parse_mapfile(&String::from_utf8_lossy(&text))
            .map_err(|e| bad("ddrescue", k, format!("{v}: {e}")))?;
        blocks.extend(parsed);
        Ok(())
    })?;
    if !seen {
        return Err(bad(
            "ddrescue",
            "ddrescue-mapfile",
            "required: the GNU ddrescue map file of the image",
        ));
    }
    Ok(over(
        Ddrescue {
            finished: merge(blocks),
        },
        inner,
    ))
}

/// One block of a map file: `size` bytes at `pos`, with its status character.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub pos: u64,
    pub size: u64,
    pub status: u8,
}

/// A map file line that is a block but cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MapError {
    #[error("line {line}: block offset must not be negative")]
    NegativeOffset { line: usize },
    #[error("line {line}: block length must not be negative")]
    NegativeLength { line: usize },
    #[error("line {line}: block ends beyond 2^64")]
    OutOfRange { line: usize },
}

/// Parses a GNU ddrescue map file into its blocks (every status, in file order).
pub fn parse_mapfile(text: &str) -> std::result::Result<Vec<Block>, MapError> {
    let mut blocks = Vec::new();
    let mut status_seen = false;
    for (i, line) in text.split('\n').enumerate() {
        let line_no = i + 1;
        if line.starts_with('#') {
            continue;
        }
        if !line.is_empty() && !status_seen {
            // The current position, status and pass: not a block.
            status_seen = true;
            continue;
        }
        let Some((pos, rest)) = scan_long(line) else {
            continue;
        };
        let Some((size, rest)) = scan_long(rest) else {
            continue;
        };
        // `\t%c`: any whitespace, then one character.
        let Some(&status) = rest.trim_start().as_bytes().first() else {
            continue;
        };
        if pos < 0 {
            return Err(MapError::NegativeOffset { line: line_no });
        }
        if size < 0 {
            return Err(MapError::NegativeLength { line: line_no });
        }
        let (pos, size) = (pos as u64, size as u64);
        if pos.checked_add(size).is_none() {
            return Err(MapError::OutOfRange { line: line_no });
        }
        blocks.push(Block { pos, size, status });
    }
    Ok(blocks)
}

/// C's `%li`: leading whitespace, an optional sign, then `0x` hex, `0` octal or decimal.
/// Returns the value and the rest of the string, or None if no digits were read. A value
/// that does not fit saturates, as `strtol` does.
fn scan_long(s: &str) -> Option<(i64, &str)> {
    let s = s.trim_start();
    let (neg, s) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let b = s.as_bytes();
    let (radix, start) =
        if b.len() > 2 && b[0] == b'0' && (b[1] | 0x20) == b'x' && b[2].is_ascii_hexdigit() {
            (16, 2)
        } else if b.first() == Some(&b'0') {
            (8, 0)
        } else {
            (10, 0)
        };
    let digits = s[start..]
        .bytes()
        .take_while(|c| (*c as char).is_digit(radix))
        .count();
    if digits == 0 {
        return None;
    }
    let text = &s[start..start + digits];
    // Only too many digits fail here: saturate, as strtol does.
    let v = i128::from_str_radix(text, radix).unwrap_or(i128::MAX);
    let v = if neg { -v } else { v };
    let v = v.clamp(i64::MIN as i128, i64::MAX as i128) as i64;
    Some((v, &s[start + digits..]))
}

/// The finished (`+`) blocks as sorted, merged `[start, end)` ranges.
pub fn merge(blocks: Vec<Block>) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = blocks
        .into_iter()
        .filter(|b| b.status == b'+' && b.size > 0)
        .map(|b| (b.pos, b.pos + b.size))
        .collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

/// The filter: the finished ranges, sorted and merged.
pub struct Ddrescue {
    finished: Vec<(u64, u64)>,
}

impl Ddrescue {
    /// True if `[off, off + len)` lies inside one finished range.
    fn rescued(&self, off: u64, len: u64) -> bool {
        // The last range starting at or before `off`.
        let i = self.finished.partition_point(|r| r.0 <= off);
        i > 0 && {
            let (_, end) = self.finished[i - 1];
            off < end && off.saturating_add(len) <= end
        }
    }
}

impl Filter for Ddrescue {
    type Conn = ();
    fn name(&self) -> &str {
        "ddrescue"
    }
    fn must_see_every_read(&self) -> bool {
        true
    }
    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<((), Next)> {
        Ok(((), Next::open(next, ctx)?))
    }
    fn can_write(&self, _: &(), _: &Next) -> Result<bool> {
        Ok(false)
    }
    fn can_cache(&self, _: &(), _: &Next) -> Result<Support> {
        Ok(Support::None)
    }
    fn pread(&self, _: &(), next: &Next, buf: &mut [u8], off: u64, f: Flags) -> Result<()> {
        if !self.rescued(off, buf.len() as u64) {
            return Err(BlockError::new(
                Errno::EIO,
                format!(
                    "ddrescue: pread: range: {off:#x} {:#x} is not rescued in the map file",
                    buf.len()
                ),
            ));
        }
        next.pread(buf, off, f)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    const MAP: &str = "# Mapfile. Created by GNU ddrescue version 1.27\n\
                       # current_pos  current_status  current_pass\n\
                       0x00010000     +               1\n\
                       #      pos        size  status\n\
                       0x00000000  0x00001000  +\n\
                       0x00001000  0x00000200  -\n\
                       4608\t512\t/\n\
                       0x00001400  0x00000C00  +\n\
                       this line is ignored\n";

    #[test]
    fn parse_mapfile_skips_comments_and_the_status_line() {
        let blocks = parse_mapfile(MAP).unwrap();
        assert_eq!(
            blocks,
            [
                Block {
                    pos: 0,
                    size: 0x1000,
                    status: b'+'
                },
                Block {
                    pos: 0x1000,
                    size: 0x200,
                    status: b'-'
                },
                Block {
                    pos: 4608,
                    size: 512,
                    status: b'/'
                },
                Block {
                    pos: 0x1400,
                    size: 0xc00,
                    status: b'+'
                },
            ]
        );
    }

    #[test]
    fn parse_mapfile_without_a_status_line_skips_the_first_block() {
        let blocks = parse_mapfile("0 512 +\n512 512 +\n").unwrap();
        assert_eq!(
            blocks,
            [Block {
                pos: 512,
                size: 512,
                status: b'+'
            }]
        );
    }

    #[test]
    fn parse_mapfile_negative_numbers_are_errors() {
        assert_eq!(
            parse_mapfile("0 + 1\n-1 512 +\n").unwrap_err(),
            MapError::NegativeOffset { line: 2 }
        );
        assert_eq!(
            parse_mapfile("0 + 1\n\n0 -512 +\n").unwrap_err(),
            MapError::NegativeLength { line: 3 }
        );
    }

    #[test]
    fn scan_long_reads_c_integer_forms() {
        assert_eq!(scan_long("  0x1F rest"), Some((31, " rest")));
        assert_eq!(scan_long("010"), Some((8, "")));
        assert_eq!(scan_long("0"), Some((0, "")));
        assert_eq!(scan_long("-12\t"), Some((-12, "\t")));
        assert_eq!(scan_long("0x"), Some((0, "x")));
        assert_eq!(scan_long("+"), None);
        assert_eq!(scan_long("99999999999999999999"), Some((i64::MAX, "")));
    }

    #[test]
    fn merge_joins_adjacent_and_overlapping_finished_blocks() {
        let b = |pos, size, status| Block { pos, size, status };
        let m = merge(vec![
            b(4096, 4096, b'+'),
            b(0, 4096, b'+'),
            b(8192, 512, b'-'),
            b(10000, 100, b'+'),
            b(10050, 100, b'+'),
            b(20000, 0, b'+'),
        ]);
        assert_eq!(m, [(0, 8192), (10000, 10150)]);
    }

    fn ddrescue_over(map: &str) -> crate::Export {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("map");
        std::fs::write(&path, map).unwrap();
        let p = path.to_str().unwrap();
        export(
            filter("ddrescue", &[("ddrescue-mapfile", p)], memory(0x4000)),
            false,
        )
    }

    #[test]
    fn ddrescue_reads_fail_outside_finished_blocks() {
        let e = ddrescue_over(MAP);
        let mut buf = [0u8; 512];
        assert!(e.read(&mut buf, 0).is_ok());
        assert!(e.read(&mut buf, 0xe00).is_ok());
        assert_eq!(e.read(&mut buf, 0x1000).unwrap_err().errno, Errno::EIO);
        assert_eq!(e.read(&mut buf, 0xf00).unwrap_err().errno, Errno::EIO);
        assert!(e.read(&mut buf, 0x1400).is_ok());
        assert_eq!(e.read(&mut buf, 0x2000).unwrap_err().errno, Errno::EIO);
        assert_eq!(e.read(&mut buf, 0x3000).unwrap_err().errno, Errno::EIO);
    }

    #[test]
    fn ddrescue_export_is_read_only_without_cache() {
        let e = ddrescue_over(MAP);
        assert!(e.write(&[1u8; 512], 0, Flags::NONE).is_err());
        let caps = e.caps();
        assert!(!caps.writable);
        assert_eq!(caps.cache, Support::None);
    }

    #[test]
    fn ddrescue_mapfile_problems_name_the_key() {
        assert!(config_error("ddrescue", &[]).starts_with("ddrescue: ddrescue-mapfile: required"));
        let msg = config_error("ddrescue", &[("ddrescue-mapfile", "/nonexistent/map")]);
        assert!(
            msg.starts_with("ddrescue: ddrescue-mapfile: /nonexistent/map: "),
            "{msg}"
        );
    }
}
