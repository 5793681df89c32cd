//! Helpers for the filters' unit tests: configure a filter from the registry over a plugin
//! and open it through the export policy, as the server would.

use std::sync::Arc;

use crate::export::{Backend, Export};
use crate::plugin::{OpenContext, Plugin};
use crate::plugins::{ConfigArg, MemoryPlugin};

use super::{find, FilterEnv};

pub fn ctx(readonly: bool) -> OpenContext<'static> {
    OpenContext {
        readonly,
        export_name: "",
        is_tls: false,
    }
}

/// `key=value` words as configuration arguments.
pub fn args(kv: &[(&str, &str)]) -> Vec<ConfigArg> {
    kv.iter().map(|(k, v)| ConfigArg::kv(k, v)).collect()
}

/// The registered filter `name`, configured with `kv`, over `inner`.
pub fn filter(name: &str, kv: &[(&str, &str)], inner: Arc<dyn Plugin>) -> Arc<dyn Plugin> {
    try_filter(name, kv, inner).unwrap_or_else(|e| panic!("{name} {kv:?}: {e}"))
}

pub fn try_filter(
    name: &str,
    kv: &[(&str, &str)],
    inner: Arc<dyn Plugin>,
) -> crate::Result<Arc<dyn Plugin>> {
    let spec = find(name).unwrap_or_else(|| panic!("no filter {name}"));
    (spec.open)(&args(kv), inner, &FilterEnv::default())
}

/// The error message a bad configuration gives.
pub fn config_error(name: &str, kv: &[(&str, &str)]) -> String {
    match try_filter(name, kv, memory(1 << 20)) {
        Ok(_) => panic!("{name} {kv:?} was accepted"),
        Err(e) => {
            assert_eq!(e.errno, crate::Errno::EINVAL);
            e.message
        }
    }
}

pub fn memory(size: u64) -> Arc<dyn Plugin> {
    Arc::new(MemoryPlugin::new(size))
}

/// Opens `plugin` as a client would (capabilities asked, policy applied).
pub fn export(plugin: Arc<dyn Plugin>, readonly: bool) -> Export {
    Export::open(&Backend::new(plugin), &ctx(readonly)).unwrap()
}

/// A RAM disk of 64 KiB whose handles count opens and flushes, and whose first
/// `bad_opens` opens fail and whose reads fail on handles opened before `good_from`
/// (1-based), or for the first `bad_reads` reads of any handle.
pub struct Flaky {
    pub opens: std::sync::atomic::AtomicUsize,
    pub flushes: Arc<std::sync::atomic::AtomicUsize>,
    pub reads: Arc<std::sync::atomic::AtomicUsize>,
    pub bad_opens: usize,
    pub good_from: usize,
    pub bad_reads: usize,
    pub multi_conn: bool,
}

impl Flaky {
    pub fn new() -> Flaky {
        Flaky {
            opens: Default::default(),
            flushes: Default::default(),
            reads: Default::default(),
            bad_opens: 0,
            good_from: 1,
            bad_reads: 0,
            multi_conn: false,
        }
    }
}

struct FlakyHandle {
    generation: usize,
    good_from: usize,
    bad_reads: usize,
    reads: Arc<std::sync::atomic::AtomicUsize>,
    flushes: Arc<std::sync::atomic::AtomicUsize>,
    multi_conn: bool,
    readonly: bool,
}

impl Plugin for Flaky {
    fn name(&self) -> &str {
        "flaky"
    }
    fn open(&self, ctx: &OpenContext<'_>) -> crate::Result<Box<dyn crate::Handle>> {
        use std::sync::atomic::Ordering;
        let generation = self.opens.fetch_add(1, Ordering::SeqCst) + 1;
        if generation <= self.bad_opens {
            return Err(crate::BlockError::new(
                crate::Errno::EIO,
                "flaky: open fails",
            ));
        }
        Ok(Box::new(FlakyHandle {
            generation,
            good_from: self.good_from,
            bad_reads: self.bad_reads,
            reads: self.reads.clone(),
            flushes: self.flushes.clone(),
            multi_conn: self.multi_conn,
            readonly: ctx.readonly,
        }))
    }
}

impl crate::Handle for FlakyHandle {
    fn get_size(&self) -> crate::Result<u64> {
        Ok(65536)
    }
    fn can_write(&self) -> crate::Result<bool> {
        Ok(!self.readonly)
    }
    fn can_flush(&self) -> crate::Result<bool> {
        Ok(true)
    }
    fn can_fua(&self) -> crate::Result<crate::Support> {
        Ok(crate::Support::Native)
    }
    fn can_multi_conn(&self) -> crate::Result<bool> {
        Ok(self.multi_conn)
    }
    fn pread(&self, buf: &mut [u8], _: u64, _: crate::Flags) -> crate::Result<()> {
        use std::sync::atomic::Ordering;
        let n = self.reads.fetch_add(1, Ordering::SeqCst);
        if self.generation < self.good_from || n < self.bad_reads {
            return Err(crate::BlockError::new(
                crate::Errno::EIO,
                "flaky: read fails",
            ));
        }
        buf.fill(self.generation as u8);
        Ok(())
    }
    fn pwrite(&self, _: &[u8], _: u64, _: crate::Flags) -> crate::Result<()> {
        Ok(())
    }
    fn flush(&self, _: crate::Flags) -> crate::Result<()> {
        self.flushes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}
