//! sluice's servers: where bytes meet the block layer.
//!
//! [`nbd`] serves NBD. Listening, accepting, signals and process orchestration run on tokio;
//! each accepted NBD connection then runs on OS threads of its own with blocking socket I/O,
//! as nbdkit does. Plugin calls are synchronous (C and Python plugins block, and may block for
//! long), so running them on async worker threads would stall other connections, while
//! handing every request from an async reader to a thread pool and back costs two thread
//! wake-ups per request — measured as the dominant cost at queue depth 1. A connection's
//! worker threads take turns reading one request each, run it, and write the reply, which
//! keeps the request path free of hand-offs and lets replies complete out of order.
//!
//! [`tls`] upgrades a connection when its negotiation asks for it (`NBD_OPT_STARTTLS`); the
//! upgraded connection is still a [`Stream`], so nothing after the handshake knows about TLS.
//!
//! [`metrics`] serves the Prometheus endpoint from counters the others keep.

pub mod metrics;
pub mod nbd;
pub mod stream;
pub mod tls;

pub use nbd::{ExportContext, ExportTable, Exports, NamedExport, NbdServer, ServerConfig};
pub use stream::{Listener, Stream};
pub use tls::{PeerIdentity, TlsConfig, TlsError, TlsMode, X509Files};
