//! sluice's block layer.
//!
//! It owns everything between "a client asked for these bytes" and "a backend produced them":
//! the [`plugin::Plugin`]/[`plugin::Handle`] traits every backend implements (and the
//! optional asynchronous submission of [`aio`]), the [`export`]
//! policy that turns a handle's capabilities into NBD behaviour (FUA, zero and cache emulation,
//! thread-model locking, request checks), the [`extents`] rules, size parsing with nbdkit's
//! syntax, the built-in plugins, and the [`host`] state shared by the hosts of foreign plugins
//! (nbdkit's C plugins, Python scripts). It knows nothing of sockets.

pub mod aio;
pub mod error;
pub mod export;
pub mod extents;
pub mod fileio;
pub mod filter;
pub mod filters;
pub mod host;
pub mod password;
pub mod plugin;
pub mod plugins;
pub mod size;
pub mod stats;
pub mod threshold;

pub use aio::{AioHandle, AioKind, AioRequest, AioSink, Declined};
pub use error::{BlockError, Errno, Result};

pub use export::{Backend, Caps, Export};
pub use extents::{Extent, Extents};
pub use filter::{Filter, Filtered, Next, Stack};
pub use plugin::{
    BlockSize, ConnectionInfo, ExportEntry, FileRange, Flags, Handle, OpenContext, PeerCreds,
    Plugin, Support, ThreadModel,
};
pub use stats::BlockStats;
pub use threshold::WriteThreshold;
