//! The `null` plugin: a bit bucket, like nbdkit-null-plugin.
//!
//! Reads return zeroes, writes are discarded, and every other request succeeds at once. It is
//! the cheapest possible backend, which makes it the baseline for measuring the server's own
//! per-request cost, and the plugin used to probe filters. Every capability is native so that
//! the server never emulates anything on top of it.

use crate::error::Result;
use crate::extents::{Extents, EXTENT_HOLE, EXTENT_ZERO};
use crate::plugin::{Flags, Handle, OpenContext, Plugin, Support};

use super::{for_each_arg, size_arg, ConfigArg, ConfigError};

/// The key a bare value on the command line stands for.
pub const MAGIC_KEY: &str = "size";

/// Parameter help for `--help`.
pub const HELP: &str = "[size=]<SIZE>           Size of the backing disk (default 0).";

/// A disk of `size` bytes that reads as zeroes and discards writes.
#[derive(Debug, Clone)]
pub struct NullPlugin {
    size: u64,
}

impl NullPlugin {
    /// A null disk of `size` bytes (callers keep it at most `i64::MAX`).
    pub fn new(size: u64) -> NullPlugin {
        NullPlugin { size }
    }

    /// Configures from `[size=]SIZE` (optional, default 0).
    pub fn from_args(args: &[ConfigArg]) -> Result<NullPlugin, ConfigError> {
        let mut size = 0;
        for_each_arg(args, MAGIC_KEY, |key, value| match key {
            "size" => {
                size = size_arg("null", "size", value)?;
                Ok(())
            }
            _ => Err(ConfigError::UnknownParameter {
                plugin: "null",
                key: key.to_owned(),
            }),
        })?;
        Ok(NullPlugin::new(size))
    }
}

impl Plugin for NullPlugin {
    fn name(&self) -> &str {
        "null"
    }
    fn version(&self) -> Option<&str> {
        Some(env!("CARGO_PKG_VERSION"))
    }
    fn may_block(&self) -> bool {
        false
    }
    fn open(&self, _ctx: &OpenContext<'_>) -> Result<Box<dyn Handle>> {
        Ok(Box::new(NullHandle { size: self.size }))
    }
}

struct NullHandle {
    size: u64,
}

impl Handle for NullHandle {
    fn get_size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn can_write(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_flush(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_trim(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_zero(&self) -> Result<Support> {
        Ok(Support::Native)
    }
    fn can_fast_zero(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_fua(&self) -> Result<Support> {
        Ok(Support::Native)
    }
    fn can_multi_conn(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_cache(&self) -> Result<Support> {
        Ok(Support::Native)
    }
    fn can_extents(&self) -> Result<bool> {
        Ok(true)
    }

    fn pread(&self, buf: &mut [u8], _offset: u64, _flags: Flags) -> Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn pwrite(&self, _buf: &[u8], _offset: u64, _flags: Flags) -> Result<()> {
        Ok(())
    }
    fn flush(&self, _flags: Flags) -> Result<()> {
        Ok(())
    }
    fn trim(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Ok(())
    }
    fn zero(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Ok(())
    }
    fn cache(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Ok(())
    }
    fn extents(&self, count: u64, offset: u64, _flags: Flags, extents: &mut Extents) -> Result<()> {
        extents.add(offset, count, EXTENT_HOLE | EXTENT_ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extents::Extent;

    fn handle(args: &[ConfigArg]) -> Box<dyn Handle> {
        let ctx = OpenContext {
            readonly: false,
            export_name: "",
            is_tls: false,
        };
        NullPlugin::from_args(args).unwrap().open(&ctx).unwrap()
    }

    #[test]
    fn from_args_no_size_is_zero_sized() {
        assert_eq!(handle(&[]).get_size().unwrap(), 0);
    }

    #[test]
    fn from_args_size_key_sets_size() {
        assert_eq!(
            handle(&[ConfigArg::kv("size", "1k")]).get_size().unwrap(),
            1024
        );
    }

    #[test]
    fn pread_after_pwrite_reads_zeroes() {
        let h = handle(&[ConfigArg::bare("1M")]);
        h.pwrite(&[0xaa; 512], 0, Flags::FUA).unwrap();
        let mut buf = [0xff; 512];
        h.pread(&mut buf, 0, Flags::NONE).unwrap();
        assert_eq!(buf, [0; 512]);
    }

    #[test]
    fn extents_whole_range_is_hole_zero() {
        let h = handle(&[ConfigArg::bare("1M")]);
        let mut e = Extents::new(4096, 1 << 20);
        h.extents((1 << 20) - 4096, 4096, Flags::NONE, &mut e)
            .unwrap();
        assert_eq!(
            e.as_slice(),
            &[Extent {
                offset: 4096,
                length: (1 << 20) - 4096,
                kind: EXTENT_HOLE | EXTENT_ZERO
            }]
        );
    }

    #[test]
    fn capabilities_all_native() {
        let h = handle(&[]);
        assert!(h.can_write().unwrap() && h.can_trim().unwrap() && h.can_fast_zero().unwrap());
        assert_eq!(h.can_zero().unwrap(), Support::Native);
        assert_eq!(h.can_fua().unwrap(), Support::Native);
        assert_eq!(h.can_cache().unwrap(), Support::Native);
        assert!(h.can_multi_conn().unwrap());
    }
}
