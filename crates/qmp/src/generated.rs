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
