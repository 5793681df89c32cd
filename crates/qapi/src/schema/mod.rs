//! The QAPI schema language: reading, checking and introspecting `schema/*.json`.
//!
//! It serves two users: the daemon's build script, which generates the Rust types, argument
//! parsers, command dispatch and introspection table from the schema (with [`crate::codegen`]),
//! and the ABI checker, which reads the schema at run time. Keeping one implementation for
//! both is what makes the checker's view of the schema the daemon's view. It uses only `std`
//! and `serde_json` so that the build script stays small.
//!
//! [`parse`] reads the syntax, [`model`] applies QAPI's rules and resolves definitions,
//! [`introspect`] produces `query-qmp-schema`'s table.

pub mod introspect;
pub mod model;
pub mod parse;

pub use introspect::introspect;
pub use model::{
    builtin_json_type, CommandDef, DirSource, Entity, EnumValue, EventDef, Kind, MemSource, Member,
    Pragma, Schema, Source, StructDef, TypeRef, UnionDef, Variant,
};
pub use parse::{Doc, Loc, SchemaError};

/// The schema's main file, which includes the others.
pub const MAIN_FILE: &str = "sluice.json";

/// Loads the schema in `dir` (its main file and includes), checks that every `*.json` file
/// there is included, and applies `cfg` to `'if'` conditions.
pub fn load_dir(dir: &std::path::Path, cfg: &dyn Fn(&str) -> bool) -> Result<Schema, SchemaError> {
    let main = dir.join(MAIN_FILE);
    let schema = Schema::load(&DirSource, &main.display().to_string(), cfg)?;
    let mut stray = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for entry in rd.flatten() {
            let p = entry.path();
            if p.extension().is_some_and(|e| e == "json")
                && !schema.files.iter().any(|f| std::path::Path::new(f) == p)
            {
                stray.push(p.display().to_string());
            }
        }
    }
    stray.sort();
    if let Some(f) = stray.first() {
        return Err(SchemaError {
            at: f.clone(),
            message: format!("not included from {MAIN_FILE}"),
        });
    }
    Ok(schema)
}

#[cfg(test)]
mod tests;
