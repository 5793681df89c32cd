//! The `pattern` plugin: a read-only disk whose content is its own offsets, like
//! nbdkit-pattern-plugin.
//!
//! Every 8-byte aligned word holds its byte offset as a 64-bit big-endian integer, so any
//! byte can be checked without a reference copy: that makes it the test source for clients,
//! filters and the server's own read path, at any size up to `i64::MAX`. Reads are generated
//! straight into the caller's buffer, a word at a time, with the unaligned head and tail
//! cut out of the words they belong to, so that a read at any offset returns the same bytes
//! as the aligned read around it.

use crate::error::Result;
use crate::plugin::{Flags, Handle, OpenContext, Plugin, Support};

use super::{for_each_arg, size_arg, ConfigArg, ConfigError};

/// The key a bare value on the command line stands for.
pub const MAGIC_KEY: &str = "size";

/// Parameter help for `--help`.
pub const HELP: &str = "[size=]<SIZE>  (required) Size of the backing disk.";

/// A read-only disk of `size` bytes holding the offset pattern.
#[derive(Debug, Clone)]
pub struct PatternPlugin {
    size: u64,
}

impl PatternPlugin {
    /// A pattern disk of `size` bytes (callers keep it at most `i64::MAX`).
    pub fn new(size: u64) -> PatternPlugin {
        PatternPlugin { size }
    }

    /// Configures from `[size=]SIZE` (required).
    pub fn from_args(args: &[ConfigArg]) -> Result<PatternPlugin, ConfigError> {
        let mut size = None;
        for_each_arg(args, MAGIC_KEY, |key, value| match key {
            "size" => {
                size = Some(size_arg("pattern", "size", value)?);
                Ok(())
            }
            _ => Err(ConfigError::UnknownParameter {
                plugin: "pattern",
                key: key.to_owned(),
            }),
        })?;
        let size = size.ok_or(ConfigError::MissingParameter {
            plugin: "pattern",
            what: "size=<SIZE>",
        })?;
        Ok(PatternPlugin::new(size))
    }
}

impl Plugin for PatternPlugin {
    fn name(&self) -> &str {
        "pattern"
    }
    fn version(&self) -> Option<&str> {
        Some(env!("CARGO_PKG_VERSION"))
    }
    fn may_block(&self) -> bool {
        false
    }
    fn open(&self, _ctx: &OpenContext<'_>) -> Result<Box<dyn Handle>> {
        Ok(Box::new(PatternHandle { size: self.size }))
    }
}

struct PatternHandle {
    size: u64,
}

/// Fills `buf` with the pattern bytes of `[offset, offset + buf.len())`.
pub fn fill_pattern(buf: &mut [u8], offset: u64) {
    let mut buf = buf;
    let mut pos = offset;
    // Unaligned head: the tail end of the word that contains `offset`.
    let skip = (pos & 7) as usize;
    if skip != 0 {
        let word = (pos & !7).to_be_bytes();
        let n = (8 - skip).min(buf.len());
        buf[..n].copy_from_slice(&word[skip..skip + n]);
        buf = &mut buf[n..];
        pos += n as u64;
    }
    let mut words = buf.chunks_exact_mut(8);
    for w in &mut words {
        w.copy_from_slice(&pos.to_be_bytes());
        pos += 8;
    }
    // Unaligned tail: the start of the word at `pos`.
    let rest = words.into_remainder();
    let n = rest.len();
    rest.copy_from_slice(&pos.to_be_bytes()[..n]);
}

impl Handle for PatternHandle {
    fn get_size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn can_multi_conn(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_cache(&self) -> Result<Support> {
        Ok(Support::Native)
    }

    fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        fill_pattern(buf, offset);
        Ok(())
    }
    fn cache(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pattern byte at `pos`, computed the slow, obvious way.
    fn byte_at(pos: u64) -> u8 {
        (pos & !7).to_be_bytes()[(pos & 7) as usize]
    }

    fn handle(size: &str) -> Box<dyn Handle> {
        let ctx = OpenContext {
            readonly: true,
            export_name: "",
            is_tls: false,
        };
        PatternPlugin::from_args(&[ConfigArg::bare(size)])
            .unwrap()
            .open(&ctx)
            .unwrap()
    }

    #[test]
    fn pread_aligned_matches_nbdkit_dump() {
        // The first 48 bytes of `nbdkit pattern 1M`, and those at 65520 (from `od -t x1`).
        let h = handle("1M");
        let mut buf = [0u8; 48];
        h.pread(&mut buf, 0, Flags::NONE).unwrap();
        let mut want = [0u8; 48];
        for (i, w) in want.chunks_mut(8).enumerate() {
            w[7] = (i * 8) as u8;
        }
        assert_eq!(buf, want);
        let mut buf = [0u8; 24];
        h.pread(&mut buf, 65520, Flags::NONE).unwrap();
        assert_eq!(
            buf,
            [0, 0, 0, 0, 0, 0, 0xff, 0xf0, 0, 0, 0, 0, 0, 0, 0xff, 0xf8, 0, 0, 0, 0, 0, 1, 0, 0]
        );
    }

    #[test]
    fn pread_unaligned_matches_aligned_bytes() {
        let h = handle("1M");
        let base = 0x1_0000u64;
        let mut aligned = [0u8; 64];
        h.pread(&mut aligned, base, Flags::NONE).unwrap();
        for start in 0..24usize {
            for len in 0..24usize {
                let mut buf = vec![0xeeu8; len];
                h.pread(&mut buf, base + start as u64, Flags::NONE).unwrap();
                assert_eq!(
                    buf[..],
                    aligned[start..start + len],
                    "start {start} len {len}"
                );
            }
        }
    }

    #[test]
    fn pread_near_max_size_gives_high_offsets() {
        let h = handle("9223372036854775807");
        let pos = i64::MAX as u64 - 20;
        let mut buf = [0u8; 20];
        h.pread(&mut buf, pos, Flags::NONE).unwrap();
        for (i, b) in buf.iter().enumerate() {
            assert_eq!(*b, byte_at(pos + i as u64));
        }
    }

    #[test]
    fn from_args_missing_size_is_error() {
        let err = PatternPlugin::from_args(&[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "pattern: you must specify size=<SIZE> on the command line"
        );
    }

    #[test]
    fn capabilities_read_only_multi_conn_cache() {
        let h = handle("1M");
        assert!(!h.can_write().unwrap());
        assert!(h.can_multi_conn().unwrap());
        assert_eq!(h.can_cache().unwrap(), Support::Native);
    }
}
