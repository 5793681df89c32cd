//! The NBD server: accepting clients and running each connection.
//!
//! [`NbdServer::serve`] accepts on any number of listeners until told to stop. Each client
//! gets a thread (kept warm for the next client, see [`pool`]) that negotiates
//! ([`negotiate`]) and then runs the transmission phase ([`transmit`]) with up to
//! [`ServerConfig::threads`] worker threads. Every live
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
//!
//! **Limits** ([`ServerConfig::handshake_timeout`], [`ServerConfig::max_connections`]), as
//! qemu-storage-daemon's `handshake-max-seconds` and `max-connections`. A connection thread
//! blocks in its reads, so the handshake clock is kept outside it: one watchdog thread per
//! server wakes a few times a second and shuts the socket of every client still negotiating
//! past its deadline, which ends that thread's blocked read (a client dripping one byte a
//! second is cut as surely as a silent one). The clock starts when negotiation starts, after
//! a serializing plugin's connection lock, so clients queued behind another are not cut for
//! waiting. The connection limit is a semaphore taken before `accept`: at the limit the
//! server stops accepting and further clients wait in the listen backlog until one leaves,
//! which is what qsd does (it stops watching the listener), rather than being refused.

mod inflight;
mod negotiate;
mod pool;
mod spare;
mod spin;
mod splice;
mod transmit;

pub use exports::{ExportContext, ExportTable, NamedExport};

mod exports;

use std::collections::HashMap;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use sluice_block::export::Backend;
use sluice_block::{ConnectionInfo, Plugin};
use sluice_proto::nbd::Purpose;

use crate::metrics::ConnStats;
use crate::stream::{Listener, Stream};

/// The tracing target of the operator events (connection open/close/refused, failed
/// requests): one structured event each, which `--log-format=json` shows by default and the
/// text log only with `-v` (its lines stay nbdkit's).
pub const EVENTS: &str = "sluice::events";

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
    /// Busy-poll the socket this long before a blocking read (`SLUICE_SPIN_US`, 50 µs unless
    /// set; None = off).
    pub spin: Option<std::time::Duration>,
    /// Longest time a client may take to negotiate, TLS handshake included, before it is
    /// disconnected (qsd's `handshake-max-seconds`, qemu-nbd's `--handshake-limit`; both
    /// default to 10 s). None: no limit.
    pub handshake_timeout: Option<Duration>,
    /// Most clients served at once (qsd's `max-connections`); None: no limit. Further
    /// clients wait in the listen backlog until one leaves.
    pub max_connections: Option<usize>,
}

/// qsd's and qemu-nbd's default handshake limit.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
            spin: spin::budget_from_env(),
            handshake_timeout: Some(DEFAULT_HANDSHAKE_TIMEOUT),
            max_connections: None,
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
    /// Contexts a single-plugin server answers itself ([`NbdServer::with_contexts`]); a
    /// table's exports carry their own ([`NamedExport::own_contexts`]).
    own_contexts: Vec<(String, Arc<dyn ExportContext>)>,
    shutting_down: AtomicBool,
    next_id: AtomicU64,
    /// Live connections, apart from the server so that a connection's thread can let go of
    /// the server before it reports the connection gone (see [`Conns::forget`]).
    conns: Arc<Conns>,
    /// Connection threads, kept warm between clients.
    threads: pool::ThreadPool,
    /// Connection slots when `max_connections` is set (see the module doc).
    slots: Option<Arc<tokio::sync::Semaphore>>,
    /// Connections ended without a session (see [`ConnStats::refused`]).
    refused: AtomicU64,
    tls_failed: AtomicU64,
}

/// The live connections and the wake-up for [`NbdServer::wait_idle`].
#[derive(Default)]
struct Conns {
    live: Mutex<HashMap<u64, Live>>,
    idle: Condvar,
}

impl Conns {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Live>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connection `id` is gone. A connection's thread calls this only after dropping its
    /// reference to the server: once [`NbdServer::wait_idle`] returns, the caller's reference
    /// is the last, so dropping it closes the exports (and saves what they save at close,
    /// such as `serve image`'s bitmaps) on the caller's thread before the process exits,
    /// never on a connection thread that exit cuts short.
    fn forget(&self, id: u64) {
        let mut live = self.lock();
        live.remove(&id);
        if live.is_empty() {
            self.idle.notify_all();
        }
    }

    /// Shuts the sockets of clients negotiating past their deadline; returns how many.
    fn cut_slow_handshakes(&self, now: Instant) -> usize {
        let mut live = self.lock();
        let mut n = 0;
        for (id, l) in live.iter_mut() {
            if l.deadline.is_some_and(|d| d <= now) {
                l.deadline = None;
                tracing::info!(
                    conn = id,
                    "client {} did not finish negotiating in time: disconnected",
                    l.peer
                );
                let _ = l.stream.shutdown(Shutdown::Both);
                n += 1;
            }
        }
        n
    }
}

/// A live connection, as shutdown and [`NbdServer::disconnect_export`] see it.
struct Live {
    /// A duplicate of the socket, to shut down.
    stream: Stream,
    /// The table export the client is using (after negotiation, in a daemon).
    export: Option<String>,
    /// When the client must have finished negotiating (while it negotiates, with a limit).
    deadline: Option<Instant>,
    /// The client's address, for the log line when the watchdog cuts it.
    peer: String,
}

impl NbdServer {
    /// A server exporting one plugin (any export name reaches it, as with nbdkit).
    pub fn new(backend: Arc<Backend>, config: ServerConfig) -> Arc<NbdServer> {
        Self::with_exports(Exports::Single(backend), config, Vec::new())
    }

    /// A server exporting one plugin that also offers `contexts`, answered by the server
    /// rather than the plugin (`sluice serve image ... bitmap=NAME`'s
    /// `qemu:dirty-bitmap:NAME`); they are offered after the configured ones, in order.
    pub fn with_contexts(
        backend: Arc<Backend>,
        mut config: ServerConfig,
        contexts: Vec<(String, Arc<dyn ExportContext>)>,
    ) -> Arc<NbdServer> {
        for (name, _) in &contexts {
            if !config.meta_contexts.contains(name) {
                config.meta_contexts.push(name.clone());
            }
        }
        Self::with_exports(Exports::Single(backend), config, contexts)
    }

    /// A server exporting the entries of `table` by name.
    pub fn with_table(table: Arc<ExportTable>, config: ServerConfig) -> Arc<NbdServer> {
        Self::with_exports(Exports::Table(table), config, Vec::new())
    }

    fn with_exports(
        exports: Exports,
        config: ServerConfig,
        own_contexts: Vec<(String, Arc<dyn ExportContext>)>,
    ) -> Arc<NbdServer> {
        let slots = config
            .max_connections
            .map(|n| Arc::new(tokio::sync::Semaphore::new(n)));
        let timeout = config.handshake_timeout;
        let server = Arc::new(NbdServer {
            exports,
            config,
            own_contexts,
            shutting_down: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            conns: Arc::default(),
            threads: pool::ThreadPool::new(),
            slots,
            refused: AtomicU64::new(0),
            tls_failed: AtomicU64::new(0),
        });
        if let Some(limit) = timeout {
            // The connections only, not the server: a watchdog holding the server for a
            // moment could make its thread the one that closes the exports (Conns::forget).
            let weak = Arc::downgrade(&server.conns);
            if let Err(e) = std::thread::Builder::new()
                .name("nbd-handshake-watchdog".into())
                .spawn(move || watchdog(&weak, limit))
            {
                tracing::warn!("no handshake time limit: cannot start its thread: {e}");
            }
        }
        server
    }

    /// Connection figures for `/metrics`.
    pub fn connection_stats(&self) -> ConnStats {
        ConnStats {
            open: self.conns.lock().len() as u64,
            total: self.next_id.load(Ordering::Relaxed) - 1,
            refused: self.refused.load(Ordering::Relaxed),
            tls_failed: self.tls_failed.load(Ordering::Relaxed),
        }
    }

    /// A connection refused before any session: counted, and one `connection_refused` event.
    fn refuse(&self, id: u64, peer: &str, reason: &dyn std::fmt::Display) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            target: EVENTS,
            event = "connection_refused",
            conn = id,
            peer,
            reason = %reason
        );
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
                    // At the connection limit, wait for a slot before accepting (module doc).
                    let slot = match &server.slots {
                        Some(s) => match s.clone().acquire_owned().await {
                            Ok(p) => Some(p),
                            Err(_) => return,
                        },
                        None => None,
                    };
                    match l.accept().await {
                        Ok(stream) => server.clone().spawn_slotted(stream, slot),
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

    /// Runs one client connection on a thread of its own (a pooled one, see [`pool`]).
    pub fn spawn_connection(self: Arc<Self>, stream: Stream) {
        self.spawn_slotted(stream, None)
    }

    /// [`NbdServer::spawn_connection`] holding a connection slot until the connection ends.
    fn spawn_slotted(
        self: Arc<Self>,
        stream: Stream,
        slot: Option<tokio::sync::OwnedSemaphorePermit>,
    ) {
        if self.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        match stream.try_clone() {
            Ok(c) => {
                self.conns.lock().insert(
                    id,
                    Live {
                        stream: c,
                        export: None,
                        deadline: None,
                        peer: stream.peer(),
                    },
                );
            }
            Err(e) => {
                tracing::warn!("connection refused: cannot duplicate socket: {e}");
                self.refused.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        let server = self.clone();
        let conns = self.conns.clone();
        let r = self.threads.spawn(
            format!("nbd-conn-{id}"),
            Box::new(move || {
                server.run_connection(id, stream);
                drop(server);
                drop(slot);
                conns.forget(id);
            }),
        );
        if let Err(e) = r {
            tracing::warn!("connection refused: cannot start thread: {e}");
            self.refused.fetch_add(1, Ordering::Relaxed);
            self.conns.forget(id);
        }
    }

    /// Starts connection `id`'s handshake clock (see the module doc).
    fn start_clock(&self, id: u64) {
        let Some(limit) = self.config.handshake_timeout else {
            return;
        };
        let mut live = self.conns.lock();
        if let Some(l) = live.get_mut(&id) {
            l.deadline = Some(Instant::now() + limit);
        }
    }

    /// Stops connection `id`'s handshake clock: it negotiated in time.
    fn stop_clock(&self, id: u64) {
        let mut live = self.conns.lock();
        if let Some(l) = live.get_mut(&id) {
            l.deadline = None;
        }
    }

    fn run_connection(self: &Arc<Self>, id: u64, stream: Stream) {
        let peer = stream.peer();
        tracing::debug!(conn = id, "new connection from {peer}");
        tracing::info!(target: EVENTS, event = "connection_open", conn = id, peer = %peer);
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
                    self.start_clock(id);
                    if let Err(e) = plugin.preconnect(self.config.readonly) {
                        tracing::warn!(conn = id, "connection refused by plugin preconnect: {e}");
                        self.refuse(id, &peer, &e);
                        return;
                    }
                    let r = negotiate::negotiate(self, stream);
                    self.after_negotiation(id, &peer, r);
                });
            }
            Exports::Table(table) => self.run_table_connection(id, &peer, &info, table, stream),
        }
        tracing::debug!(conn = id, "connection closed");
        tracing::info!(target: EVENTS, event = "connection_close", conn = id, peer = %peer);
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
        self.start_clock(id);
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
                        self.refuse(id, peer, &e);
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
                self.stop_clock(id);
                if let Some(named) = &session.named {
                    self.attach(id, &session.name, named);
                }
                transmit::run(self, id, session)
            }
            Ok(None) => tracing::debug!(conn = id, "client ended negotiation"),
            Err(e) if e.is_disconnect() => {
                tracing::debug!(conn = id, "client left during negotiation: {e}")
            }
            Err(e) => {
                tracing::info!(conn = id, "negotiation with {peer} failed: {e}");
                if matches!(e, negotiate::NegotiateError::Tls(_)) {
                    self.tls_failed.fetch_add(1, Ordering::Relaxed);
                }
                self.refuse(id, peer, &e);
            }
        }
    }

    /// Records that connection `id` uses table export `name`. If the export has left the
    /// table meanwhile (removed while this client negotiated), the connection is closed at
    /// once, as [`NbdServer::disconnect_export`] would have.
    fn attach(&self, id: u64, name: &str, named: &Arc<NamedExport>) {
        let mut live = self.conns.lock();
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
        let live = self.conns.lock();
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
        let live = self.conns.lock();
        for l in live.values() {
            let _ = l.stream.shutdown(Shutdown::Read);
        }
    }

    /// Blocks until every connection has finished (after [`NbdServer::begin_shutdown`]), or
    /// the timeout passes. Returns true if all finished.
    pub fn wait_idle(&self, timeout: std::time::Duration) -> bool {
        let live = self.conns.lock();
        let (live, _) = self
            .conns
            .idle
            .wait_timeout_while(live, timeout, |l| !l.is_empty())
            .unwrap_or_else(|e| e.into_inner());
        live.is_empty()
    }
}

/// The handshake watchdog of one server (see the module doc): runs until the server is gone.
fn watchdog(conns: &Weak<Conns>, limit: Duration) {
    // A tenth of the limit, between 20 ms and 250 ms: a cut comes at most that late.
    let tick = (limit / 10).clamp(Duration::from_millis(20), Duration::from_millis(250));
    loop {
        std::thread::sleep(tick);
        let Some(conns) = conns.upgrade() else {
            return;
        };
        conns.cut_slow_handshakes(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_block::plugins::MemoryPlugin;

    /// `serve` drops its server right after `wait_idle`, expecting that to close the exports
    /// (and save what they save at close) before the process exits. So once `wait_idle`
    /// returns, no connection thread may still hold the server. Without Conns::forget's
    /// order, a connection thread held it for a moment after reporting itself gone.
    #[test]
    fn wait_idle_returns_once_no_connection_holds_the_server() {
        let config = ServerConfig {
            handshake_timeout: None,
            ..ServerConfig::default()
        };
        for _ in 0..500 {
            let plugin: Arc<dyn Plugin> = Arc::new(MemoryPlugin::new(1 << 20));
            let server = NbdServer::new(Arc::new(Backend::new(plugin)), config.clone());
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
            server.clone().spawn_connection(Stream::unix(ours));
            drop(theirs);
            assert!(server.wait_idle(Duration::from_secs(10)));
            assert_eq!(Arc::strong_count(&server), 1);
        }
    }
}
