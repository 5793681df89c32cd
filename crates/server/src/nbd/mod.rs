//! The NBD server: accepting clients and running each connection.
//!
//! [`NbdServer::serve`] accepts on any number of listeners until told to stop. Each client
//! gets a thread that negotiates ([`negotiate`]) and then runs the transmission phase
//! ([`transmit`]) with up to [`ServerConfig::threads`] worker threads. Every live
//! connection is registered so that shutdown can wake its blocked readers: on SIGINT/SIGTERM
//! the server stops accepting, shuts the read side of every socket (workers see end of
//! input), lets in-flight requests finish and reply, then returns.

mod negotiate;
mod transmit;

pub use exports::{ExportTable, NamedExport};

mod exports;

use std::collections::HashMap;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use sluice_block::export::Backend;

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
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            readonly: false,
            threads: 16,
            max_payload: sluice_proto::nbd::consts::NBD_DEFAULT_MAX_PAYLOAD,
            meta_contexts: vec!["base:allocation".to_string()],
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
    live: Mutex<HashMap<u64, Stream>>,
    idle: Condvar,
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
                self.live
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id, c);
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
        let mut stream = Some(stream);
        let mut session = || {
            let Some(stream) = stream.take() else { return };
            match negotiate::negotiate(self, stream) {
                Ok(Some(session)) => transmit::run(self, id, session),
                Ok(None) => tracing::debug!(conn = id, "client ended negotiation"),
                Err(e) if e.is_disconnect() => {
                    tracing::debug!(conn = id, "client left during negotiation: {e}")
                }
                Err(e) => tracing::info!(conn = id, "negotiation with {peer} failed: {e}"),
            }
        };
        match &self.exports {
            Exports::Single(backend) => {
                let _serial = backend.connection_lock();
                if self.shutting_down.load(Ordering::SeqCst) {
                    return;
                }
                let plugin = backend.plugin();
                plugin.with_connection(&info, &mut || {
                    if let Err(e) = plugin.preconnect(self.config.readonly) {
                        tracing::warn!(conn = id, "connection refused by plugin preconnect: {e}");
                        return;
                    }
                    session()
                });
            }
            Exports::Table(_) => session(),
        }
        tracing::debug!(conn = id, "connection closed");
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
        for s in live.values() {
            let _ = s.shutdown(Shutdown::Read);
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
