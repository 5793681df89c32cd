//! The table of named exports a daemon serves.
//!
//! Entries are added and removed while the server runs (QMP `block-export-add` / `-del`).
//! A connection holds an `Arc` of the entry it negotiated, so an entry removed from the table
//! stays valid for clients already using it, and [`ExportTable::in_use`] can tell whether any
//! client still does.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use sluice_block::export::Backend;

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
