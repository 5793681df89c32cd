//! The daemon's state and the handle to it: [`State`] (node graph, exports, NBD server, job
//! table) behind one lock, and [`Daemon`], which holds that lock, the event bus, the
//! compatibility policy and the daemon's life (shutdown, the last flush).
//!
//! Layers: this module is the middle of the crate. It stands on the node graph
//! ([`crate::graph`]), exports ([`crate::exports`]), events and the job framework
//! ([`crate::jobs`], generic over this state); the job kinds, the commands
//! ([`crate::commands`], which also holds [`Daemon::execute`]) and the monitors
//! ([`crate::monitor`], which also holds the listener) stand on it. Nothing here imports
//! them: `tests/layering.rs` checks the order.
//!
//! # Concurrency
//!
//! All state (node graph, exports, NBD server) sits behind one mutex, and a command runs with
//! it held from argument check to reply, so commands from different monitors run one at a
//! time and each sees the effects of the previous one, as QEMU's main loop guarantees.
//! Commands are synchronous and may block (opening files, loading plugins), so monitors run
//! them on tokio's blocking pool, never on the async threads that read sockets; nothing
//! awaits while the lock is held. The NBD server's connections run on their own threads and
//! only touch the export table, which has its own lock.
//!
//! # Shutdown
//!
//! `quit`, SIGINT or SIGTERM call [`Daemon::shutdown`]: exports are removed
//! (BLOCK_EXPORT_DELETED each), the NBD server stops, running jobs are cancelled (as qsd
//! does; an image stream left half done is still a valid chain), SHUTDOWN is emitted, and the shutdown
//! watch fires. Monitors then write what they have (the `quit` reply included) and close;
//! [`Daemon::finish`] waits for them and for NBD connections, with a time limit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_server::{ExportTable, ServerConfig};
use tokio::sync::{watch, Notify};

use crate::events::EventBus;
use crate::exports::{named_export, Export, RunningNbd, NBD_MAX_STRING};
use crate::generated::BlockDirtyBitmapOrStr;
use crate::generated::{
    BlockExportDeletedEvent, BlockExportOptions, BlockExportOptionsBranch, BlockExportRemoveMode,
    BlockdevOptions, NbdServerOptions, ObjectOptions, ShutdownCause, ShutdownEvent, VersionInfo,
    VersionTriple,
};
use crate::graph::{not_found, DriverRegistry, Graph};
use crate::objects::Objects;
use crate::QmpError;
use sluice_image::bitmaps::{BusyGuard, Use};
use sluice_qapi::runtime::{CompatPolicy, Output, QapiEvent, ToQapi};

/// How long a hard `block-export-del` waits for disconnected clients' connections to end
/// before replying (they finish the request they are running first).
const HARD_DEL_WAIT: Duration = Duration::from_secs(1);

/// How the daemon is set up.
pub struct DaemonConfig {
    pub policy: CompatPolicy,
    pub drivers: DriverRegistry,
    /// Settings of the NBD server `nbd-server-start` creates.
    pub nbd: ServerConfig,
    /// The object table (`--object`, `object-add`); drivers built before the daemon (rbd's
    /// `key-secret`) may hold it too.
    pub objects: Arc<Objects>,
}

impl std::fmt::Debug for DaemonConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonConfig")
            .field("policy", &self.policy)
            .field("drivers", &self.drivers)
            .finish_non_exhaustive()
    }
}

/// Everything commands change.
pub struct State {
    pub graph: Graph,
    /// In the order they were added.
    pub exports: Vec<Export>,
    pub nbd: Option<RunningNbd>,
    /// Background jobs (block-stream, ...), including concluded ones not yet dismissed.
    pub jobs: crate::jobs::Jobs<State>,
    /// Stopped NBD servers whose connections may still be finishing a request.
    retired: Vec<Arc<sluice_server::NbdServer>>,
    shutting_down: bool,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("graph", &self.graph)
            .field("exports", &self.exports)
            .field("nbd", &self.nbd)
            .field("retired", &self.retired.len())
            .finish()
    }
}

/// The daemon.
pub struct Daemon {
    state: Mutex<State>,
    events: EventBus,
    policy: CompatPolicy,
    output: Output,
    table: Arc<ExportTable>,
    nbd_config: ServerConfig,
    /// `--object` / `object-add` objects; locked on their own (see `crate::objects`).
    objects: Arc<Objects>,
    shutdown_tx: watch::Sender<Option<ShutdownCause>>,
    monitors: AtomicUsize,
    monitors_idle: Notify,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon").finish_non_exhaustive()
    }
}

/// The version sluice reports (in QEMU's `VersionInfo` shape).
pub fn version() -> VersionInfo {
    let v = env!("CARGO_PKG_VERSION");
    let mut parts = v.split('.').map(|p| p.parse::<i64>().unwrap_or(0));
    VersionInfo {
        qemu: VersionTriple {
            major: parts.next().unwrap_or(0),
            minor: parts.next().unwrap_or(0),
            micro: parts.next().unwrap_or(0),
        },
        package: format!("sluice {v}"),
    }
}

impl Daemon {
    pub fn new(config: DaemonConfig) -> Arc<Daemon> {
        let output = config.policy.output();
        Arc::new(Daemon {
            state: Mutex::new(State {
                graph: Graph::new(config.drivers),
                exports: Vec::new(),
                nbd: None,
                jobs: crate::jobs::Jobs::default(),
                retired: Vec::new(),
                shutting_down: false,
            }),
            events: EventBus::new(output),
            policy: config.policy,
            output,
            table: Arc::new(ExportTable::new()),
            nbd_config: config.nbd,
            objects: config.objects,
            shutdown_tx: watch::channel(None).0,
            monitors: AtomicUsize::new(0),
            monitors_idle: Notify::new(),
        })
    }

    /// A monitor connection began (the count [`Daemon::finish`] waits on).
    pub(crate) fn monitor_opened(&self) {
        self.monitors.fetch_add(1, Ordering::SeqCst);
    }

    /// A monitor connection ended.
    pub(crate) fn monitor_closed(&self) {
        if self.monitors.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.monitors_idle.notify_waiters();
        }
    }

    pub fn policy(&self) -> &CompatPolicy {
        &self.policy
    }

    pub fn output(&self) -> &Output {
        &self.output
    }

    pub fn events(&self) -> &EventBus {
        &self.events
    }

    /// The state, locked.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The greeting's `version` value.
    pub fn version_value(&self) -> Value {
        static V: OnceLock<Value> = OnceLock::new();
        V.get_or_init(|| version().to_qapi(&Output::default()))
            .clone()
    }

    /// Emits an event to every negotiated monitor.
    pub fn emit<E: QapiEvent>(&self, event: &E) {
        self.events.emit(event);
    }

    /// The objects (`--object`, `object-add`).
    pub fn objects(&self) -> &Arc<Objects> {
        &self.objects
    }

    /// `--object` (QMP's `object-add` runs with the state locked, as every command).
    pub fn object_add(&self, opts: &ObjectOptions) -> Result<(), QmpError> {
        let _st = self.lock();
        self.objects.add(opts)
    }

    /// `blockdev-add` (also `--blockdev`).
    pub fn blockdev_add(&self, opts: &BlockdevOptions) -> Result<(), QmpError> {
        self.lock().graph.add(opts)
    }

    /// `nbd-server-start` with a flat address (also `--nbd-server`).
    pub fn nbd_server_start(&self, opts: &NbdServerOptions) -> Result<(), QmpError> {
        let mut st = self.lock();
        self.nbd_start_locked(&mut st, opts)
    }

    pub(crate) fn nbd_start_locked(
        &self,
        st: &mut State,
        opts: &NbdServerOptions,
    ) -> Result<(), QmpError> {
        if st.nbd.is_some() {
            return Err(QmpError::generic("NBD server already running"));
        }
        st.nbd = Some(RunningNbd::start(
            opts,
            self.table.clone(),
            self.nbd_config.clone(),
            &self.objects,
        )?);
        Ok(())
    }

    /// `nbd-server-stop`: every NBD export goes, newest first.
    pub(crate) fn nbd_stop_locked(&self, st: &mut State) -> Result<(), QmpError> {
        let Some(mut nbd) = st.nbd.take() else {
            return Err(QmpError::generic("NBD server not running"));
        };
        nbd.stop();
        // Keep only servers that still have connections, for finish().
        st.retired.retain(|s| !s.wait_idle(Duration::ZERO));
        st.retired.push(nbd.server.clone());
        self.close_all_exports(st);
        Ok(())
    }

    /// `block-export-add` (also `--export`).
    pub fn block_export_add(&self, opts: &BlockExportOptions) -> Result<(), QmpError> {
        let mut st = self.lock();
        self.export_add_locked(&mut st, opts)
    }

    /// qemu-storage-daemon's checks, in its order.
    pub(crate) fn export_add_locked(
        &self,
        st: &mut State,
        opts: &BlockExportOptions,
    ) -> Result<(), QmpError> {
        if !crate::graph::id_wellformed(&opts.id) {
            return Err(QmpError::generic("Invalid block export id"));
        }
        if st.exports.iter().any(|e| e.id == opts.id) {
            return Err(QmpError::generic(format!(
                "Block export id '{}' is already in use",
                opts.id
            )));
        }
        let Some(node) = st.graph.get(&opts.node_name) else {
            return Err(not_found("", &opts.node_name));
        };
        let writable = opts.writable.unwrap_or(false);
        if writable && node.read_only {
            return Err(QmpError::generic(
                "Cannot export read-only node as writable",
            ));
        }
        if st.nbd.is_none() {
            return Err(QmpError::generic("NBD server not running"));
        }
        let BlockExportOptionsBranch::Nbd(nbd) = &opts.u;
        let name = nbd.name.clone().unwrap_or_else(|| opts.node_name.clone());
        if name.len() > NBD_MAX_STRING {
            return Err(QmpError::generic(format!("export name '{name}' too long")));
        }
        if let Some(d) = &nbd.description {
            if d.len() > NBD_MAX_STRING {
                return Err(QmpError::generic(format!("description '{d}' too long")));
            }
        }
        if self.table.get(&name).is_some() {
            return Err(QmpError::generic(format!(
                "NBD server already has export named '{name}'"
            )));
        }
        let bitmaps = export_bitmaps(&st.graph, node, writable, nbd.bitmaps.as_deref())?;
        let (entry, gate) = named_export(
            node.plugin().clone(),
            Some(node.stats.clone()),
            writable,
            nbd.description.clone(),
            nbd.allocation_depth.unwrap_or(false),
            bitmaps,
        );
        if !self.table.insert(&name, entry) {
            return Err(QmpError::generic(format!(
                "NBD server already has export named '{name}'"
            )));
        }
        let named = self.table.get(&name).expect("just inserted");
        if let Some(n) = st.graph.get_mut(&opts.node_name) {
            n.exports += 1;
        }
        st.exports.push(Export {
            id: opts.id.clone(),
            node: opts.node_name.clone(),
            name,
            named,
            gate,
            shutting_down: false,
        });
        Ok(())
    }

    /// `block-export-del`.
    pub(crate) fn export_del_locked(
        self: &Arc<Self>,
        st: &mut State,
        id: &str,
        mode: BlockExportRemoveMode,
    ) -> Result<(), QmpError> {
        let Some(i) = st.exports.iter().position(|e| e.id == id) else {
            return Err(QmpError::generic(format!("Export '{id}' is not found")));
        };
        let e = &mut st.exports[i];
        if e.shutting_down {
            return Err(QmpError::generic(format!(
                "Export '{id}' is already shutting down"
            )));
        }
        if mode == BlockExportRemoveMode::Safe && !wait_until_idle(e) {
            return Err(QmpError::generic(format!("export '{id}' still in use")));
        }
        self.table.remove(&e.name);
        e.shutting_down = true;
        if !e.in_use() {
            self.finish_export(st, i);
            return Ok(());
        }
        // Hard: as qemu-storage-daemon, clients still connected are disconnected (their
        // requests in flight finish; any that follow fail). Connections usually end at once,
        // and then BLOCK_EXPORT_DELETED comes before the reply, as with qsd; a request that
        // takes longer is waited for in the background. (Commands run on blocking threads,
        // and connections never take the state lock, so waiting here is safe.)
        e.gate.store(false, Ordering::Release);
        if let Some(nbd) = &st.nbd {
            nbd.server.disconnect_export(&st.exports[i].name);
            let deadline = std::time::Instant::now() + HARD_DEL_WAIT;
            while st.exports[i].in_use() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            if !st.exports[i].in_use() {
                self.finish_export(st, i);
                return Ok(());
            }
        }
        let daemon = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let mut st = daemon.lock();
                match st
                    .exports
                    .iter()
                    .position(|e| e.id == id && e.shutting_down)
                {
                    Some(i) if !st.exports[i].in_use() => {
                        daemon.finish_export(&mut st, i);
                        return;
                    }
                    Some(_) => {}
                    None => return,
                }
            }
        });
        Ok(())
    }

    /// The export is gone: forget it and tell the monitors.
    fn finish_export(&self, st: &mut State, i: usize) {
        let e = st.exports.remove(i);
        if let Some(n) = st.graph.get_mut(&e.node) {
            n.exports = n.exports.saturating_sub(1);
        }
        // A node only the export held (the overlay `blockdev-snapshot-sync` made, the target
        // `drive-mirror` made, once they pivoted) goes with it, as qemu frees a node when its
        // last reference goes. At shutdown the graph closes every node in its own order.
        if !st.shutting_down && st.graph.unheld(&e.node) && st.jobs.using_node(&e.node).is_none() {
            st.graph.drop_unowned(&e.node);
        }
        self.emit(&BlockExportDeletedEvent { id: e.id });
    }

    /// Removes every export now, newest first (server stop, daemon shutdown).
    fn close_all_exports(&self, st: &mut State) {
        while let Some(i) = st.exports.len().checked_sub(1) {
            let e = &st.exports[i];
            e.gate.store(false, Ordering::Release);
            self.table.remove(&e.name);
            self.finish_export(st, i);
        }
    }

    /// Begins shutdown (idempotent): exports, NBD server, SHUTDOWN event, then the watch.
    pub fn shutdown(&self, cause: ShutdownCause) {
        let mut st = self.lock();
        self.shutdown_locked(&mut st, cause);
    }

    pub(crate) fn shutdown_locked(&self, st: &mut State, cause: ShutdownCause) {
        if st.shutting_down {
            return;
        }
        st.shutting_down = true;
        if let Some(mut nbd) = st.nbd.take() {
            nbd.stop();
            st.retired.push(nbd.server.clone());
        }
        self.close_all_exports(st);
        // As qsd: running jobs are cancelled (their events come before the reply).
        let jobs: Vec<_> = st.jobs.iter().cloned().collect();
        for job in jobs {
            // Jobs already over refuse the verb; nothing to do for them.
            let _ = job.cancel(st, true);
        }
        self.emit(&ShutdownEvent {
            guest: false,
            reason: cause,
        });
        tracing::debug!("shutting down: {cause}");
        let _ = self.shutdown_tx.send(Some(cause));
    }

    /// True once shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown_tx.borrow().is_some()
    }

    /// A receiver that changes when shutdown begins.
    pub fn shutdown_watch(&self) -> watch::Receiver<Option<ShutdownCause>> {
        self.shutdown_tx.subscribe()
    }

    /// Waits until shutdown begins and returns why.
    pub async fn wait_shutdown(&self) -> ShutdownCause {
        let mut rx = self.shutdown_watch();
        loop {
            if let Some(c) = *rx.borrow_and_update() {
                return c;
            }
            if rx.changed().await.is_err() {
                return ShutdownCause::HostError;
            }
        }
    }

    /// After shutdown: waits up to `timeout` for monitors to send their last replies and
    /// close, and for the connections of stopped NBD servers to end. True if everything
    /// finished in time.
    pub async fn finish(self: &Arc<Self>, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let idle = self.monitors_idle.notified();
            if self.monitors.load(Ordering::SeqCst) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return false;
            }
        }
        // NBD connections finish the request they are running (the servers were stopped).
        let servers = std::mem::take(&mut self.lock().retired);
        for s in servers {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let idle = tokio::task::spawn_blocking(move || s.wait_idle(left)).await;
            if !matches!(idle, Ok(true)) {
                return false;
            }
        }
        // As qsd at exit: what clients wrote without a flush reaches the images.
        let this = self.clone();
        let _ = tokio::task::spawn_blocking(move || this.lock().graph.flush_all()).await;
        true
    }
}

/// The bitmaps of `block-export-add`'s `bitmaps`, checked in qsd's order
/// (`nbd_export_create`) and held busy once all passed: a plain name is the exported
/// node's bitmap or, failing that, one of its backing chain's; `{node, name}` is looked up
/// as every bitmap command does.
fn export_bitmaps(
    graph: &Graph,
    node: &crate::graph::Node,
    writable: bool,
    wanted: Option<&[BlockDirtyBitmapOrStr]>,
) -> Result<Vec<(String, BusyGuard)>, QmpError> {
    let mut found = Vec::new();
    for want in wanted.unwrap_or_default() {
        let (name, bitmap) = match want {
            BlockDirtyBitmapOrStr::Local(name) => {
                let mut at = Some(node);
                let hit = loop {
                    let Some(n) = at else { break None };
                    if let Some(b) = n.bitmaps.get(name) {
                        break Some((n, b));
                    }
                    at = graph.child(n, "backing");
                };
                let Some((owner, bitmap)) = hit else {
                    return Err(QmpError::generic(format!("Bitmap '{name}' is not found")));
                };
                // A read-only export promises its contents stay put: a bitmap still
                // recording the writes of a writable node would not.
                if !writable && !owner.read_only && bitmap.is_recording() {
                    return Err(QmpError::generic(format!(
                        "Enabled bitmap '{name}' incompatible with readonly export"
                    )));
                }
                (name.clone(), bitmap)
            }
            BlockDirtyBitmapOrStr::External(e) => {
                (e.name.clone(), graph.bitmap(&e.node, &e.name)?.1)
            }
        };
        bitmap
            .check(Use::Read)
            .map_err(crate::graph::bitmaps::bitmap_error)?;
        found.push((name, bitmap));
    }
    Ok(found.into_iter().map(|(n, b)| (n, b.hold())).collect())
}

/// How long a safe `block-export-del` lets connections that are already ending finish.
const EXPORT_IDLE_GRACE: Duration = Duration::from_millis(200);

/// True once no client uses the export. A client that has hung up is not "in use", but its
/// connection thread may need a moment to notice and let go (`nbdinfo ...; block-export-del`
/// in a script would otherwise race it), so this waits briefly before answering no.
fn wait_until_idle(e: &crate::exports::Export) -> bool {
    let deadline = Instant::now() + EXPORT_IDLE_GRACE;
    while e.in_use() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

impl crate::jobs::HasJobs for State {
    fn jobs(&mut self) -> &mut crate::jobs::Jobs<State> {
        &mut self.jobs
    }
}

impl crate::jobs::JobHost<State> for Daemon {
    fn lock(&self) -> MutexGuard<'_, State> {
        Daemon::lock(self)
    }

    fn events(&self) -> &EventBus {
        &self.events
    }
}
