//! The table of named exports a daemon serves.
//!
//! Entries are added and removed while the server runs (QMP `block-export-add` / `-del`).
//! A connection holds an `Arc` of the entry it negotiated, so an entry removed from the table
//! stays valid for clients already using it, and [`ExportTable::in_use`] can tell whether any
//! client still does.
//!
//! An entry may answer meta contexts of its own besides its plugin's ([`ExportContext`]):
//! qemu's `qemu:dirty-bitmap:NAME` reports a dirty bitmap the daemon keeps beside the node,
//! not anything the plugin knows, so the entry carries it, and whatever it holds (the
//! bitmap's "busy" mark) lives exactly as long as the entry and its connections.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use sluice_block::export::Backend;

/// A meta context an export answers itself, outside its plugin (see the module doc).
pub trait ExportContext: Send + Sync {
    /// The status of `[offset, offset+len)` as `(length, flags)` runs in order, the first
    /// starting at `offset`; at most `max` runs (the last may then end before `len`).
    fn status(&self, offset: u64, len: u64, max: usize) -> Vec<(u64, u32)>;
}

/// One named export: a backend and how it is offered.
pub struct NamedExport {
    pub backend: Arc<Backend>,
    /// Clients may write (still subject to the server's read-only setting and the plugin).
    pub writable: bool,
    /// NBD_INFO_DESCRIPTION, overriding the plugin's own.
    pub description: Option<String>,
    /// The meta contexts this export offers: a subset of the server's
    /// [`ServerConfig::meta_contexts`](super::ServerConfig::meta_contexts), whose order gives
    /// the context ids.
    pub meta_contexts: Vec<String>,
    /// Contexts the export answers itself, by full name (also listed in `meta_contexts`).
    pub own_contexts: Vec<(String, std::sync::Arc<dyn ExportContext>)>,
}

/// Named exports, looked up by clients at negotiation.
#[derive(Default)]
pub struct ExportTable {
    map: RwLock<BTreeMap<String, Arc<NamedExport>>>,
}

impl ExportTable {
    pub fn new() -> ExportTable {
        ExportTable::default()
    }

    /// Adds an export; false (and nothing changed) if the name is taken.
    pub fn insert(&self, name: &str, export: NamedExport) -> bool {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if map.contains_key(name) {
            return false;
        }
        map.insert(name.to_string(), Arc::new(export));
        true
    }

    /// Removes an export from the table (clients already connected keep using it).
    pub fn remove(&self, name: &str) -> Option<Arc<NamedExport>> {
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
    }

    pub fn get(&self, name: &str) -> Option<Arc<NamedExport>> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Export names with descriptions, sorted.
    pub fn list(&self) -> Vec<(String, Option<String>)> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.description.clone()))
            .collect()
    }

    /// True while a client connection uses the export.
    pub fn in_use(&self, name: &str) -> bool {
        self.get(name).is_some_and(|e| Arc::strong_count(&e) > 2)
    }
}
