//! Hosts nbdkit's C plugins — the unmodified `.so` files Debian ships — on sluice's
//! [`Plugin`](sluice_block::Plugin)/[`Handle`](sluice_block::Handle) traits.
//!
//! Two directions of one ABI live here. Towards the plugin: [`abi`] has `struct
//! nbdkit_plugin` byte for byte, [`load`] runs nbdkit's startup sequence, and the loaded
//! plugin answers the traits with nbdkit's defaults for absent callbacks (module `handle`).
//! Towards the server: plugins call back into "the server" through ~50 `nbdkit_*`
//! functions that they import by name; [`api`] defines them (the printf-like ones in
//! `csrc/shim.c`, since stable Rust cannot define C-variadic functions), reading
//! thread-local connection state from [`context`].
//!
//! # Threads and thread-local state
//!
//! nbdkit answers `nbdkit_export_name()`, `nbdkit_set_error()`, `nbdkit_peer_pid()`... from
//! thread-local state of the worker thread calling the plugin. sluice's server may call a
//! handle from any thread, so every call into C installs its connection's state on the
//! calling thread for exactly the duration of the call (see [`context`]); nothing is
//! assumed about which thread runs what. The plugin's declared thread model is reported by
//! `Plugin::thread_model` and enforced by the server, not here.
//!
//! # What the server does per connection
//!
//! Create a [`Connection`] from a [`ConnInfo`] (the block layer's `ConnectionInfo`: peer
//! credentials/address, TLS) when the client is accepted, and wrap the calls it makes on the plugin outside handles
//! (`preconnect`, `list_exports`, `default_export`, `open`) in [`with_conn`]. Handles
//! remember their connection. Optionally: [`Connection::set_tls`] after STARTTLS,
//! [`Connection::mark_closed`] when the client goes (wakes plugins in `nbdkit_nanosleep`),
//! and check [`Connection::disconnect_requested`] after requests.
//!
//! # Linking
//!
//! The executable must export the `nbdkit_*` symbols in its dynamic symbol table, and only
//! those: link it with `-Wl,--dynamic-list=<this crate>/nbdkit.dynlist` (the binary's
//! `build.rs` gets the path as `DEP_SLUICE_NBDKIT_SHIM_DYNLIST`). The linker only keeps the
//! definitions if something references them; [`load`] and [`dump_plugin`] call
//! [`keep_symbols`], which takes the address of every one, so any binary that can load a
//! plugin keeps them. This crate's own integration tests get the same link argument from
//! `build.rs`.
//!
//! # Shutdown
//!
//! [`request_shutdown`] when the server begins to stop (sleeping plugins wake up);
//! [`set_shutdown_hook`] to learn that a plugin called `nbdkit_shutdown()`. Both are
//! [`sluice_block::host`]'s, re-exported: one flag and one hook serve every plugin host, so
//! they cover Python scripts too.

pub mod abi;
pub mod api;
pub mod context;
pub mod debug_flags;
pub mod error;
mod handle;
pub mod plugin;

pub use api::paths::set_stdio_safe;
pub use context::{with_conn, Connection};
pub use debug_flags::{set_debug_flag, set_server_debug_flag, DebugFlag};
pub use error::LoadError;
pub use plugin::{
    dump_plugin, dump_plugin_with, load, load_with, resolve, LoadedPlugin, NBDKIT_PLUGIN_DIR,
};
pub use sluice_block::host::{request_shutdown, set_shutdown_hook, shutdown_requested};
/// What the server knows about a client: the block layer's
/// [`ConnectionInfo`](sluice_block::ConnectionInfo), under this crate's name for it.
pub use sluice_block::ConnectionInfo as ConnInfo;
pub use sluice_block::PeerCreds;

/// Makes sure the linker keeps every exported `nbdkit_*` definition (Rust and C shim) in
/// the executable, by taking their addresses. Cheap; called by [`load`] and [`dump_plugin`],
/// so a binary that loads plugins need not call it itself.
pub fn keep_symbols() {
    std::hint::black_box(api::symbol_addresses());
}
