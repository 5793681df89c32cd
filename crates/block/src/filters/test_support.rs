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
