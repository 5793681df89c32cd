//! The QAPI toolchain: QEMU's interface-definition language, apart from any daemon using it.
//!
//! - [`schema`]: the QAPI schema language: reading `schema/*.json`, QAPI's rules, the
//!   introspection table (`query-qmp-schema`'s reply).
//! - [`codegen`]: Rust code generation from a checked schema. A daemon's `build.rs` uses it
//!   (this crate is its build-dependency) to generate typed arguments and results, one
//!   `Handlers` method per command, dispatch and the command and event tables.
//! - [`runtime`]: what the generated code stands on at run time: QEMU's argument checks and
//!   their messages, output conversion, the `-compat` policy.
//! - [`abi`]: the schema ABI checker behind `sluice-schema-check`: compares a schema with a
//!   recorded baseline and lists breaking changes.
//! - [`keyval`]: QEMU's `key=value,a.b=c` command-line option syntax.
//!
//! It needs only `serde_json` (and `sluice-proto` for the QMP error type the generated code
//! returns), so the build scripts that use it stay small. The build script and the ABI
//! checker read the schema with the same code, so the checker's view of the schema is the
//! daemon's view.
//!
//! Where to add things: a QMP command or event is a definition in `schema/*.json` (the
//! generated `Handlers` trait then asks the daemon for its method); a new QAPI language
//! feature goes in [`schema::model`] and [`codegen`].

pub mod abi;
pub mod codegen;
pub mod keyval;
pub mod runtime;
pub mod schema;
