//! sluice's management side: QMP, the QEMU Machine Protocol, as qemu-storage-daemon speaks it.
//!
//! - [`schema`]: the QAPI schema language (reader, rules, introspection). `build.rs` uses it to
//!   generate [`generated`]: typed arguments and results, the [`generated::Handlers`] trait
//!   with one method per command, dispatch, and the introspection table.
//! - [`qapi`]: what generated code stands on (QEMU's argument checks and messages, `-compat`).
//! - [`block`]: the graph of named block nodes and the driver registry (file, raw and qcow2
//!   from `crates/image`; null-co, null-aio, sluice-plugin).
//! - [`exports`]: block exports and the NBD server behind them.
//! - [`daemon`]: the state every monitor shares, command execution, shutdown.
//! - [`commands`]: the commands; [`monitor`]: one client connection; [`events`]: delivery.
//! - [`jobs`]: background jobs (the generic job state machine and verbs, block-stream,
//!   intermediate block-commit).
//! - [`keyval`]: QEMU's `key=value,a.b=c` option syntax for the command line.
//! - [`abi`]: the schema ABI checker behind `sluice-schema-check`.
//!
//! The wire format itself (JSON stream, request checks, reply encoding) is sans-IO code in
//! `sluice_proto::qmp`; this crate adds everything that needs state, threads or sockets.

pub mod abi;
pub mod block;
pub mod commands;
pub mod daemon;
pub mod events;
pub mod exports;
pub mod generated;
pub mod jobs;
pub mod keyval;
pub mod monitor;
pub mod qapi;
pub mod schema;

pub use daemon::{Daemon, DaemonConfig, MonitorListener, MonitorState};
pub use sluice_proto::qmp::{ErrorClass, QmpError};
