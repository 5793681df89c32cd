//! sluice's qemu-storage-daemon: QMP, the QEMU Machine Protocol, as qemu-storage-daemon
//! speaks it, over the interface generated from the QAPI schema in `schema/`.
//!
//! - [`generated`]: what `build.rs` generates from the schema with `sluice-qapi`: typed
//!   arguments and results, the [`generated::Handlers`] trait with one method per command,
//!   dispatch, the command and event tables, the introspection table.
//! - [`graph`]: the graph of named block nodes and the driver registry (file, raw and qcow2
//!   from `crates/image`; null-co, null-aio, sluice-plugin).
//! - [`exports`]: block exports and the NBD server behind them.
//! - [`daemon`]: the state every monitor shares, command execution, shutdown.
//! - [`commands`]: the commands; [`monitor`]: one client connection; [`events`]: delivery.
//! - [`jobs`]: background jobs (the generic job state machine and verbs, block-stream,
//!   block-commit).
//!
//! The wire format itself (JSON stream, request checks, reply encoding) is sans-IO code in
//! `sluice_proto::qmp`; the QAPI language, the generator and the ABI checker are in
//! `sluice-qapi`; this crate adds everything that needs state, threads or sockets.

pub mod commands;
pub mod daemon;
pub mod events;
pub mod exports;
pub mod generated;
pub mod graph;
pub mod jobs;
pub mod monitor;

pub use daemon::{Daemon, DaemonConfig, MonitorListener, MonitorState};
pub use sluice_proto::qmp::{ErrorClass, QmpError};
