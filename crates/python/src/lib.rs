//! Hosts nbdkit's Python plugins — unmodified `.py` scripts written for
//! `nbdkit python SCRIPT` — on sluice's [`Plugin`](sluice_block::Plugin)/
//! [`Handle`](sluice_block::Handle) traits, by embedding CPython through pyo3.
//!
//! The script runs as `__main__`; its module-level functions are nbdkit's callbacks, found by
//! name (`open`, `get_size`, `pread` required). `API_VERSION` 1 (the default) and 2 are
//! supported with nbdkit's signatures for each, and `import nbdkit` gives nbdkit's module
//! functions and constants (module [`module`]). The semantics of absent callbacks, booleans
//! and errors are nbdkit's python plugin's (module `handle`); the policy that *uses* the
//! capabilities (FUA emulated by flush, zero by writes...) is the block layer's export
//! policy, shared with every kind of plugin.
//!
//! # The GIL and threads
//!
//! One interpreter per process, started on first [`load`] and never finalised. The GIL is
//! held only while Python runs: every call into the script takes it on the calling thread
//! (`interp::attach`, which keeps the thread's Python thread state from one call to the next)
//! and drops it on return, and everything else — logging the traceback of
//! a failed request, waiting in `nbdkit.nanosleep`, the shutdown hook — runs with it released.
//! No Rust lock is held while Python runs (per-call state is thread-local, the per-handle
//! `can_zero` cache is an atomic), so a script that blocks cannot wedge the server's locks,
//! and a script that declares `THREAD_MODEL_PARALLEL` really runs requests concurrently
//! whenever its code releases the GIL (I/O, `time.sleep`, `nbdkit.nanosleep`). The
//! script's declared thread model is reported by `Plugin::thread_model` and enforced by the
//! server, not here. Python exceptions never unwind into Rust and Rust panics never unwind
//! into Python (pyo3 turns them into exceptions at the boundary).
//!
//! # What the server does
//!
//! - Load: [`split_script`] the `python` plugin's parameters, then [`load`] (nbdkit's whole
//!   startup: run the script, `config`, `config_complete`, `thread_model`, `get_ready`,
//!   `after_fork`). A server that daemonizes uses [`load_before_fork`], forks, then calls
//!   [`PythonPlugin::after_fork`] in the child, as nbdkit orders it. `--dump-plugin`:
//!   [`dump_plugin`].
//! - Per connection, like `sluice-nbdkit`: create a [`Connection`] from a [`ConnInfo`] (peer
//!   credentials, TLS; the block layer's `ConnectionInfo`) when the client is accepted, and wrap the plugin-level calls
//!   (`preconnect`, `list_exports`, `default_export`, `open`) in [`with_conn`]; handles
//!   remember their connection. Optionally [`Connection::set_tls`] after STARTTLS,
//!   [`Connection::mark_closed`] when the client goes (wakes `nbdkit.nanosleep`), and check
//!   [`Connection::disconnect_requested`] after requests (`nbdkit.disconnect`).
//! - Shutdown: [`request_shutdown`] when the server begins to stop; [`set_shutdown_hook`] to
//!   learn that a script called `nbdkit.shutdown()`. Both are [`sluice_block::host`]'s,
//!   re-exported: one flag and one hook serve every plugin host, C plugins included.

mod context;
pub mod error;
mod handle;
mod interp;
pub mod module;
mod plugin;

pub use context::{with_conn, Connection};
pub use error::LoadError;
pub use plugin::{
    dump_plugin, load, load_before_fork, split_script, PythonPlugin, MAX_API_VERSION,
};
pub use sluice_block::host::{request_shutdown, set_shutdown_hook, shutdown_requested};
/// What the server knows about a client: the block layer's
/// [`ConnectionInfo`](sluice_block::ConnectionInfo), under the name `sluice-nbdkit` uses too.
pub use sluice_block::ConnectionInfo as ConnInfo;
pub use sluice_block::PeerCreds;
