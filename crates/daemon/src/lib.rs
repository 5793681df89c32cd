//! sluice's qemu-storage-daemon: QMP, the QEMU Machine Protocol, as qemu-storage-daemon
//! speaks it, over the interface generated from the QAPI schema in `schema/`.
//!
//! - [`generated`]: what `build.rs` generates from the schema with `sluice-qapi`: typed
//!   arguments and results, the [`generated::Handlers`] trait with one method per command,
//!   dispatch, the command and event tables, the introspection table.
//! - [`objects`]: user-creatable objects (`object-add`): TLS credentials, authorization,
//!   secrets.
//! - [`graph`]: the graph of named block nodes, their dirty bitmaps (`graph::bitmaps`) and
//!   the driver registry (file, raw and qcow2 from `crates/image`; null-co, null-aio,
//!   sluice-plugin).
//! - [`exports`]: block exports and the NBD server behind them.
//! - [`events`]: event delivery to monitors, in order with command replies.
//! - [`jobs`]: background jobs: the generic job state machine and verbs (generic over the
//!   daemon's state), one file per kind (block-stream, block-commit, active commit,
//!   blockdev-mirror; the last two share the mirror engine) and the job commands on top.
//! - [`state`]: the state every monitor shares (graph, exports, NBD server, jobs) behind one
//!   lock, and [`Daemon`], the handle to it (lock, emit, shutdown).
//! - [`commands`]: the commands (one method of the generated `Handlers` each) and
//!   [`Daemon::execute`]; [`monitor`]: one client connection, and the listener.
//!
//! # Layers
//!
//! Modules import only modules below them, in this order: `generated`, `events`, `objects`,
//! `graph`, `exports`, `jobs` (the framework), `state`, the job kinds (`jobs::stream`,
//! `jobs::mirror_engine`, `jobs::create` and `jobs::backup`; `jobs::active_commit` and
//! `jobs::mirror` on the engine; `jobs::commit` and `jobs::drive_mirror`), `jobs::commands`
//! and `transaction`,
//! `snapshot`, `blockstats`, `commands`, `monitor`.
//! `tests/layering.rs` reads the sources and fails on an import that goes up.
//!
//! # Where things go
//!
//! - A QMP command: its definition in `schema/*.json`; the build then asks for a method of
//!   `Handlers`, which goes in [`commands`] (or, for job verbs, `jobs/commands.rs`).
//! - A job kind: one file in `jobs/` with a [`jobs::JobDriver`] (`run`, and `prepare` /
//!   `abort` / `clean` for the graph at the end) and a function that checks the command's
//!   arguments and calls [`jobs::Job::start`]; copy `jobs/stream.rs`.
//! - A block driver (`blockdev-add driver=...`): a `NodeDriver` in [`graph`].
//!
//! The wire format itself (JSON stream, request checks, reply encoding) is sans-IO code in
//! `sluice_proto::qmp`; the QAPI language, the generator and the ABI checker are in
//! `sluice-qapi`; this crate adds everything that needs state, threads or sockets.

pub mod blockstats;
pub mod commands;
pub mod events;
pub mod exports;
pub mod generated;
pub mod graph;
pub mod jobs;
pub mod monitor;
pub mod objects;
pub mod snapshot;
pub mod state;
pub mod throttle;
pub mod transaction;

pub use commands::MonitorState;
pub use monitor::MonitorListener;
pub use sluice_proto::qmp::{ErrorClass, QmpError};
pub use state::{Daemon, DaemonConfig};
