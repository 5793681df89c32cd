//! Everything generated from `schema/*.json` at build time (see `build.rs` and
//! `build/codegen.rs`): one Rust type per QAPI type with its argument parser and JSON
//! output, one `*Event` type per event, the [`Handlers`] trait with one method per command,
//! [`dispatch`], the [`COMMANDS`] and [`EVENTS`] tables, and the introspection table.
//!
//! The code is generated rather than written so that the schema — which is the ABI, checked
//! by `sluice-schema-check` — cannot drift from what the daemon accepts and returns.
#![allow(
    clippy::all,
    unused_imports,
    dead_code,
    missing_debug_implementations,
    non_camel_case_types
)]

include!(concat!(env!("OUT_DIR"), "/qapi.rs"));

/// The introspection table (`query-qmp-schema`'s reply), as compact JSON.
pub const INTROSPECTION: &str = include_str!(concat!(env!("OUT_DIR"), "/introspection.json"));

#[cfg(test)]
mod tests {
    use std::path::Path;

    fn config() -> Vec<String> {
        super::CONFIG.iter().map(|c| c.to_string()).collect()
    }

    fn schema_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schema")
    }

    #[test]
    fn schema_with_this_builds_config_matches_its_baseline() {
        let dir = schema_dir();
        let report = sluice_qapi::abi::check(&dir, &dir.join("baseline"), &config()).unwrap();
        let breaking: Vec<String> = report
            .findings
            .iter()
            .filter(|f| f.rule.is_breaking())
            .map(|f| f.to_string())
            .collect();
        assert_eq!(breaking, Vec::<String>::new());
    }

    #[test]
    fn introspection_table_is_what_the_abi_checker_reads() {
        let checked = sluice_qapi::abi::current(&schema_dir(), &config()).unwrap();
        let built: Vec<serde_json::Value> = serde_json::from_str(super::INTROSPECTION).unwrap();
        assert_eq!(built, checked);
    }
}
