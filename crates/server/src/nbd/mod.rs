//! The NBD server: accepting clients and running each connection.
//!
//! [`NbdServer::serve`] accepts on any number of listeners until told to stop. Each client
//! gets a thread that negotiates ([`negotiate`]) and then runs the transmission phase
//! ([`transmit`]) with up to [`ServerConfig::threads`] worker threads. Every live
//! connection is registered so that shutdown can wake its blocked readers: on SIGINT/SIGTERM
//! the server stops accepting, shuts the read side of every socket (workers see end of
//! input), lets in-flight requests finish and reply, then returns.
//!
//! Plugin connection hooks ([`Plugin::with_connection`] and [`Plugin::preconnect`]): a
//! server of one plugin runs the whole connection inside them, negotiation included, as
//! nbdkit does. A daemon's table only knows the plugin once the client names an export, so
//! there each open during negotiation (NBD_OPT_INFO) runs in a scope of its own, and the GO
//! (or EXPORT_NAME) open runs in a scope that lasts until the connection ends; `preconnect`
//! runs once per connection and export, before its first open, and a failure ends the
//! connection as with nbdkit. SerializeConnections is honoured in the same scopes.
//! [`NbdServer::disconnect_export`] closes the connections of one named export.

mod negotiate;
mod transmit;

pub use exports::{ExportContext, ExportTable, NamedExport};

mod exports;

use std::collections::HashMap;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use sluice_block::export::Backend;
use sluice_block::{ConnectionInfo, Plugin};
use sluice_proto::nbd::Purpose;

use crate::stream::{Listener, Stream};

/// Settings of an NBD server that apply to every connection.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Serve every export read-only (`-r`).
    pub readonly: bool,
    /// Most worker threads per connection for parallel plugins (`-t`, nbdkit's default 16).
    pub threads: usize,
    /// Largest read or write payload accepted, advertised as the maximum block size.
    pub max_payload: u32,
    /// Meta contexts offered.
    pub meta_contexts: Vec<String>,
    /// TLS: None serves plaintext only (STARTTLS is refused); otherwise the configuration's
    /// mode says whether TLS is optional or required (nbdkit's `--tls=on|require`, qemu's
    /// `tls-creds`), and its credentials and authorization hook apply to every connection.
    pub tls: Option<crate::tls::TlsConfig>,
    /// Offer structured replies (nbdkit's `--no-sr` turns them off).
    pub structured_replies: bool,
    /// Handshake flags advertised in the greeting (nbdkit's `--mask-handshake`).
    pub handshake_flags: u16,
    /// Speak the oldstyle protocol (nbdkit's `-o`): the default export, no options.
    pub oldstyle: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            readonly: false,
            threads: 16,
            max_payload: sluice_proto::nbd::consts::NBD_DEFAULT_MAX_PAYLOAD,
            meta_contexts: vec![sluice_proto::nbd::CONTEXT_BASE_ALLOCATION.to_string()],
            tls: None,
            structured_replies: true,
            handshake_flags: sluice_proto::nbd::HandshakeConfig::default().handshake_flags,
            oldstyle: false,
        }
    }
}

/// What a server exports: one plugin under every name (`sluice serve`, like nbdkit), or a
/// table of named exports that can change while serving (`sluice daemon`, like qsd).
#[derive(Clone)]
pub enum Exports {
    Single(Arc<Backend>),
    Table(Arc<ExportTable>),
}

/// An NBD server.
pub struct NbdServer {
    exports: Exports,
    config: ServerConfig,
    shutting_down: AtomicBool,
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Live>>,
    idle: Condvar,
}

/// A live connection, as shutdown and [`NbdServer::disconnect_export`] see it.
struct Live {
    /// A duplicate of the socket, to shut down.
    stream: Stream,
    /// The table export the client is using (after negotiation, in a daemon).
    export: Option<String>,
}

impl NbdServer {
    /// A server exporting one plugin (any export name reaches it, as with nbdkit).
    pub fn new(backend: Arc<Backend>, config: ServerConfig) -> Arc<NbdServer> {
        Self::with_exports(Exports::Single(backend), config)
    }

    /// A server exporting the entries of `table` by name.
    pub fn with_table(table: Arc<ExportTable>, config: ServerConfig) -> Arc<NbdServer> {
        Self::with_exports(Exports::Table(table), config)
    }

    fn with_exports(exports: Exports, config: ServerConfig) -> Arc<NbdServer> {
        Arc::new(NbdServer {
            exports,
            config,
            shutting_down: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            live: Mutex::new(HashMap::new()),
            idle: Condvar::new(),
        })
    }

    pub fn exports(&self) -> &Exports {
        &self.exports
    }

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Accepts clients on every listener until `stop` resolves, then begins shutdown.
    pub async fn serve(
        self: &Arc<Self>,
        listeners: Vec<Listener>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        let mut tasks = tokio::task::JoinSet::new();
        for l in listeners {
            let server = self.clone();
            tasks.spawn(async move {
                loop {
                    match l.accept().await {
                        Ok(stream) => server.clone().spawn_connection(stream),
                        Err(e) => {
                            tracing::warn!("accept failed: {e}");
                            // EMFILE and friends: back off instead of spinning.
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        }
                    }
                }
            });
        }
        stop.await;
        tasks.abort_all();
        self.begin_shutdown();
    }

    /// Runs one client connection on a thread of its own.
    pub fn spawn_connection(self: Arc<Self>, stream: Stream) {
        if self.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        match stream.try_clone() {
            Ok(c) => {
                self.live.lock().unwrap_or_else(|e| e.into_inner()).insert(
                    id,
                    Live {
                        stream: c,
                        export: None,
                    },
                );
            }
            Err(e) => {
                tracing::warn!("connection refused: cannot duplicate socket: {e}");
                return;
            }
        }
        let server = self.clone();
        let r = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                server.run_connection(id, stream);
                server.forget(id);
            });
        if let Err(e) = r {
            tracing::warn!("connection refused: cannot start thread: {e}");
            self.forget(id);
        }
    }

    fn forget(&self, id: u64) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.remove(&id);
        if live.is_empty() {
            self.idle.notify_all();
        }
    }

    fn run_connection(self: &Arc<Self>, id: u64, stream: Stream) {
        let peer = stream.peer();
        tracing::debug!(conn = id, "new connection from {peer}");
        let info = stream.connection_info();
        match &self.exports {
            Exports::Single(backend) => {
                let _serial = backend.connection_lock();
                if self.shutting_down.load(Ordering::SeqCst) {
                    return;
                }
                let plugin = backend.plugin();
                let mut stream = Some(stream);
                plugin.with_connection(&info, &mut || {
                    let Some(stream) = stream.take() else { return };
                    if let Err(e) = plugin.preconnect(self.config.readonly) {
                        tracing::warn!(conn = id, "connection refused by plugin preconnect: {e}");
                        return;
                    }
                    let r = negotiate::negotiate(self, stream);
                    self.after_negotiation(id, &peer, r);
                });
            }
            Exports::Table(table) => self.run_table_connection(id, &peer, &info, table, stream),
        }
        tracing::debug!(conn = id, "connection closed");
    }

    /// A daemon's connection: each export open runs inside that export's plugin hooks, and
    /// after GO so does the rest of the connection (see the module doc).
    fn run_table_connection(
        self: &Arc<Self>,
        id: u64,
        peer: &str,
        info: &ConnectionInfo,
        table: &ExportTable,
        stream: Stream,
    ) {
        let mut neg = negotiate::Negotiation::new(self, stream);
        // Backends whose preconnect has run on this connection.
        let mut preconnected: Vec<Arc<Backend>> = Vec::new();
        loop {
            let (name, purpose) = match neg.next() {
                Ok(negotiate::Step::Open { name, purpose }) => (name, purpose),
                Ok(negotiate::Step::Ready(_)) => {
                    // Every GO/EXPORT_NAME goes through Step::Open, which finishes it.
                    tracing::warn!(conn = id, "negotiation finished without an open export");
                    return;
                }
                Ok(negotiate::Step::Ended) => return self.after_negotiation(id, peer, Ok(None)),
                Err(e) => return self.after_negotiation(id, peer, Err(e)),
            };
            let Some(named) = table.get(&name) else {
                neg.answer_open(&name, purpose, None);
                continue;
            };
            let backend = named.backend.clone();
            let plugin: &Arc<dyn Plugin> = backend.plugin();
            let readonly = self.config.readonly || !named.writable;
            let mut end = false;
            plugin.with_connection(info, &mut || {
                let _serial = backend.connection_lock();
                if !preconnected.iter().any(|b| Arc::ptr_eq(b, &backend)) {
                    if let Err(e) = plugin.preconnect(readonly) {
                        tracing::warn!(conn = id, "connection refused by plugin preconnect: {e}");
                        end = true;
                        return;
                    }
                    preconnected.push(backend.clone());
                }
                if !neg.answer_open(&name, purpose, Some(named.clone())) {
                    if purpose == Purpose::ExportName {
                        end = true;
                    }
                    return;
                }
                // A successful GO/EXPORT_NAME ends negotiation without reading more.
                end = true;
                let r = match neg.next() {
                    Ok(negotiate::Step::Ready(n)) => neg.session(*n).map(Some),
                    Ok(_) => Ok(None),
                    Err(e) => Err(e),
                };
                self.after_negotiation(id, peer, r);
            });
            if end {
                return;
            }
        }
    }

    /// Runs the transmission phase of a negotiated session, or logs why there is none. A
    /// table export is recorded against the connection first, for
    /// [`NbdServer::disconnect_export`].
    fn after_negotiation(
        self: &Arc<Self>,
        id: u64,
        peer: &str,
        r: Result<Option<negotiate::Session>, negotiate::NegotiateError>,
    ) {
        match r {
            Ok(Some(session)) => {
                if let Some(named) = &session.named {
                    self.attach(id, &session.name, named);
                }
                transmit::run(self, id, session)
            }
            Ok(None) => tracing::debug!(conn = id, "client ended negotiation"),
            Err(e) if e.is_disconnect() => {
                tracing::debug!(conn = id, "client left during negotiation: {e}")
            }
            Err(e) => tracing::info!(conn = id, "negotiation with {peer} failed: {e}"),
        }
    }

    /// Records that connection `id` uses table export `name`. If the export has left the
    /// table meanwhile (removed while this client negotiated), the connection is closed at
    /// once, as [`NbdServer::disconnect_export`] would have.
    fn attach(&self, id: u64, name: &str, named: &Arc<NamedExport>) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let Some(l) = live.get_mut(&id) else { return };
        l.export = Some(name.to_string());
        let listed = match &self.exports {
            Exports::Table(t) => t.get(name).is_some_and(|e| Arc::ptr_eq(&e, named)),
            Exports::Single(_) => true,
        };
        if !listed {
            let _ = l.stream.shutdown(Shutdown::Read);
        }
    }

    /// Closes the connections of clients using table export `name` (call it after removing
    /// the export from the table): each connection's read side is shut, so it ends after the
    /// requests it is running finish and reply, and then closes its socket. Returns how many
    /// connections were told to close.
    pub fn disconnect_export(&self, name: &str) -> usize {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        for l in live.values() {
            if l.export.as_deref() == Some(name) {
                let _ = l.stream.shutdown(Shutdown::Read);
                n += 1;
            }
        }
        n
    }

    /// True once shutdown has begun: workers finish what they have and stop.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Stops new work: every connection's read side is shut so its workers see end of input
    /// after their current request.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        for l in live.values() {
            let _ = l.stream.shutdown(Shutdown::Read);
        }
    }

    /// Blocks until every connection has finished (after [`NbdServer::begin_shutdown`]), or
    /// the timeout passes. Returns true if all finished.
    pub fn wait_idle(&self, timeout: std::time::Duration) -> bool {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let (live, _) = self
            .idle
            .wait_timeout_while(live, timeout, |l| !l.is_empty())
            .unwrap_or_else(|e| e.into_inner());
        live.is_empty()
    }
}
