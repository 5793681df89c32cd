//! The per-connection and per-call state that the `nbdkit` module's functions read, and
//! server shutdown as scripts see it.
//!
//! nbdkit's Python functions take no connection argument (`nbdkit.export_name()`,
//! `nbdkit.is_tls()`, `nbdkit.peer_uid()`, `nbdkit.set_error(e)`...): nbdkit answers them from
//! thread-local state of the worker thread that is calling the script. sluice does the same.
//! Every call into the script goes through a [`Scope`] that installs the caller's [`Frame`]
//! (its connection, export name and TLS flag) on the calling thread for the length of the call
//! and restores the previous one afterwards, and clears the thread's `set_error` value, which
//! the host reads back if the script raised. Python code always runs on the thread that
//! called it (the GIL is taken on that thread), so a thread-local is exactly right; a thread
//! the script starts itself has no frame and gets an exception from these functions, as in
//! nbdkit.
//!
//! What outlives one call lives in a [`Connection`]: the peer credentials, the TLS state, the
//! export name negotiated so far, and whether the client has gone or the script asked for it
//! to be dropped. The server makes one per client and wraps its plugin-level calls
//! (`preconnect`, `list_exports`, `default_export`, `open`) in [`with_conn`]; handles
//! remember the connection they were opened in. The API mirrors `sluice-nbdkit`'s, so the
//! server can treat both hosts alike.
//!
//! Shutdown is process-wide: [`request_shutdown`] wakes every `nbdkit.nanosleep` at once, and
//! a script's `nbdkit.shutdown()` calls the hook set with [`set_shutdown_hook`]. Sleepers
//! wait on one condition variable with the GIL released; none of these locks is ever held
//! while the GIL is being taken, so they cannot deadlock against Python.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Credentials of a client connected over a Unix domain socket (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCreds {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// What the server knows about a client connection, for `nbdkit.peer_*`, `nbdkit.is_tls`
/// and `nbdkit.export_name`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnInfo {
    /// The export name, if already negotiated ("" before). A handle uses the name in the
    /// `OpenContext` it was opened with instead.
    pub export_name: String,
    /// The connection is TLS-protected (update with [`Connection::set_tls`] after STARTTLS).
    pub is_tls: bool,
    /// Peer credentials for Unix-socket clients; `None` for TCP or unknown.
    pub peer: Option<PeerCreds>,
}

/// One client connection as Python scripts see it. Cheap to clone (an `Arc`).
///
/// The server makes one per accepted client and wraps every call it makes on the plugin
/// *outside* a handle (`preconnect`, `list_exports`, `default_export`, `open`) in
/// [`with_conn`]. Handles opened inside remember the connection and install it themselves on
/// every later call, so nothing else is needed for data requests. A handle opened outside any
/// `with_conn` gets a connection of its own with no peer credentials.
#[derive(Clone)]
pub struct Connection(Arc<ConnState>);

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.0.peer)
            .field("is_tls", &self.is_tls())
            .finish_non_exhaustive()
    }
}

struct ConnState {
    peer: Option<PeerCreds>,
    is_tls: AtomicBool,
    export_name: Mutex<Arc<str>>,
    closed: AtomicBool,
    /// 0: none, 1: after the requests in flight, 2: at once (`nbdkit.disconnect(force)`).
    disconnect: AtomicU8,
}

impl Connection {
    pub fn new(info: ConnInfo) -> Connection {
        Connection(Arc::new(ConnState {
            peer: info.peer,
            is_tls: AtomicBool::new(info.is_tls),
            export_name: Mutex::new(info.export_name.into()),
            closed: AtomicBool::new(false),
            disconnect: AtomicU8::new(0),
        }))
    }

    /// Records that the connection now runs over TLS (after NBD_OPT_STARTTLS).
    pub fn set_tls(&self, is_tls: bool) {
        self.0.is_tls.store(is_tls, Ordering::Release);
    }

    /// Records the export name negotiated so far (seen by calls made inside [`with_conn`]).
    pub fn set_export_name(&self, name: &str) {
        *lock(&self.0.export_name) = name.into();
    }

    /// Tells scripts sleeping in `nbdkit.nanosleep` on this connection that the client has
    /// gone, so they return early.
    pub fn mark_closed(&self) {
        self.0.closed.store(true, Ordering::Release);
        wake_sleepers();
    }

    /// `Some(force)` once the script called `nbdkit.disconnect(force)` on this connection:
    /// the server should drop the client (at once if `force`, else after the requests in
    /// flight).
    pub fn disconnect_requested(&self) -> Option<bool> {
        match self.0.disconnect.load(Ordering::Acquire) {
            0 => None,
            1 => Some(false),
            _ => Some(true),
        }
    }

    pub(crate) fn peer(&self) -> Option<PeerCreds> {
        self.0.peer
    }

    pub(crate) fn is_tls(&self) -> bool {
        self.0.is_tls.load(Ordering::Acquire)
    }

    pub(crate) fn export_name(&self) -> Arc<str> {
        lock(&self.0.export_name).clone()
    }

    pub(crate) fn request_disconnect(&self, force: bool) {
        self.0
            .disconnect
            .fetch_max(if force { 2 } else { 1 }, Ordering::AcqRel);
        wake_sleepers();
    }

    fn interrupted(&self) -> bool {
        self.0.closed.load(Ordering::Acquire) || self.0.disconnect.load(Ordering::Acquire) != 0
    }
}

/// What a script's call to the `nbdkit` module may ask about its caller.
#[derive(Clone, Default)]
pub(crate) struct Frame {
    pub(crate) conn: Option<Connection>,
    /// `None` outside a connection: `nbdkit.export_name()` then raises, as in nbdkit.
    pub(crate) export_name: Option<Arc<str>>,
    pub(crate) is_tls: bool,
}

impl Frame {
    /// The frame for a plugin-level call: the connection [`with_conn`] installed on this
    /// thread, if any. `is_tls` overrides the connection's flag when the caller knows better.
    pub(crate) fn for_plugin(is_tls: Option<bool>) -> Frame {
        match current_connection() {
            Some(conn) => Frame {
                export_name: Some(conn.export_name()),
                is_tls: is_tls.unwrap_or_else(|| conn.is_tls()),
                conn: Some(conn),
            },
            None => Frame {
                is_tls: is_tls.unwrap_or(false),
                ..Frame::default()
            },
        }
    }
}

thread_local! {
    static FRAME: RefCell<Option<Frame>> = const { RefCell::new(None) };
    static CONN: RefCell<Option<Connection>> = const { RefCell::new(None) };
    static SET_ERROR: Cell<i32> = const { Cell::new(0) };
}

/// Installs a [`Frame`] for one call into the script and clears the `set_error` value;
/// restores the previous frame when dropped.
pub(crate) struct Scope {
    prev: Option<Frame>,
    /// Scopes are thread-bound.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Scope {
    pub(crate) fn enter(frame: Frame) -> Scope {
        let prev = FRAME.with(|f| f.borrow_mut().replace(frame));
        SET_ERROR.with(|e| e.set(0));
        Scope {
            prev,
            _not_send: std::marker::PhantomData,
        }
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        let prev = self.prev.take();
        FRAME.with(|f| *f.borrow_mut() = prev);
    }
}

/// Runs `f` on the frame of the call in progress on this thread, if any.
pub(crate) fn with_frame<R>(f: impl FnOnce(Option<&Frame>) -> R) -> R {
    FRAME.with(|frame| f(frame.borrow().as_ref()))
}

/// The connection installed by [`with_conn`] on this thread, if any.
pub(crate) fn current_connection() -> Option<Connection> {
    CONN.with(|c| c.borrow().clone())
}

/// Runs `f` with `conn` as this thread's current connection.
///
/// The server wraps its calls of `Plugin::preconnect`, `list_exports`, `default_export` and
/// `open` in this, so that scripts calling `nbdkit.peer_uid()`, `nbdkit.is_tls()`... from those
/// callbacks see the client, and so that handles opened inside remember it. Calls may nest;
/// the previous connection is restored afterwards. For plugins that are not Python plugins it
/// has no effect.
pub fn with_conn<R>(conn: &Connection, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Connection>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let prev = self.0.take();
            CONN.with(|c| *c.borrow_mut() = prev);
        }
    }
    let prev = CONN.with(|c| c.borrow_mut().replace(conn.clone()));
    let _restore = Restore(prev);
    f()
}

/// `nbdkit.set_error(err)`.
pub(crate) fn set_error(err: i32) {
    SET_ERROR.with(|e| e.set(err));
}

/// The `nbdkit.set_error` value of the call in progress (0 if none).
pub(crate) fn error_set() -> i32 {
    SET_ERROR.with(Cell::get)
}

static SHUTDOWN: AtomicBool = AtomicBool::new(false);
static SLEEP_LOCK: Mutex<()> = Mutex::new(());
static SLEEP_WAKE: Condvar = Condvar::new();

type Hook = Box<dyn Fn() + Send + Sync>;
static HOOK: RwLock<Option<Hook>> = RwLock::new(None);

/// Tells sleeping scripts that the server is shutting down: every `nbdkit.nanosleep` in
/// progress or to come returns early with an exception (ESHUTDOWN). Call it when the server
/// begins to stop, before waiting for connections to finish.
pub fn request_shutdown() {
    SHUTDOWN.store(true, Ordering::Release);
    wake_sleepers();
}

/// True once [`request_shutdown`] or a script's `nbdkit.shutdown()` was called.
pub fn shutdown_requested() -> bool {
    SHUTDOWN.load(Ordering::Acquire)
}

/// Registers what to do when a script calls `nbdkit.shutdown()`. The hook runs on the
/// script's thread (with the GIL released): it must only start the shutdown (notify a task,
/// send on a channel), never wait for it. Replaces any previous hook.
pub fn set_shutdown_hook(f: Box<dyn Fn() + Send + Sync>) {
    *HOOK.write().unwrap_or_else(|e| e.into_inner()) = Some(f);
}

/// `nbdkit.shutdown()`: the flag, then the server's hook.
pub(crate) fn script_requested_shutdown() {
    tracing::info!("python plugin requested server shutdown");
    request_shutdown();
    if let Some(hook) = HOOK.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        hook();
    }
}

fn wake_sleepers() {
    let _guard = lock(&SLEEP_LOCK);
    SLEEP_WAKE.notify_all();
}

/// Sleeps for `duration` unless the server shuts down or `conn` closes or is asked to
/// disconnect first. Returns false if the sleep was cut short. Call with the GIL released.
pub(crate) fn sleep(duration: Duration, conn: Option<&Connection>) -> bool {
    let deadline = Instant::now() + duration;
    let interrupted = || shutdown_requested() || conn.is_some_and(Connection::interrupted);
    let mut guard = lock(&SLEEP_LOCK);
    loop {
        if interrupted() {
            return false;
        }
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        guard = SLEEP_WAKE
            .wait_timeout(guard, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// Locks, ignoring poisoning: the data behind these mutexes stays consistent if a holder
/// panicked (a name, a unit).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_conn_installs_and_restores() {
        let conn = Connection::new(ConnInfo {
            export_name: "exp".into(),
            is_tls: true,
            ..ConnInfo::default()
        });
        assert!(current_connection().is_none());
        with_conn(&conn, || {
            let f = Frame::for_plugin(None);
            assert_eq!(f.export_name.as_deref(), Some("exp"));
            assert!(f.is_tls);
            assert!(f.conn.is_some());
        });
        assert!(current_connection().is_none());
        assert!(Frame::for_plugin(None).export_name.is_none());
    }

    #[test]
    fn scope_clears_set_error_and_restores_frame() {
        set_error(5);
        {
            let _s = Scope::enter(Frame {
                export_name: Some("a".into()),
                ..Frame::default()
            });
            assert_eq!(error_set(), 0);
            set_error(28);
            {
                let _inner = Scope::enter(Frame::default());
                with_frame(|f| assert!(f.unwrap().export_name.is_none()));
            }
            with_frame(|f| assert_eq!(f.unwrap().export_name.as_deref(), Some("a")));
            assert_eq!(error_set(), 0, "the inner scope cleared it");
        }
        with_frame(|f| assert!(f.is_none()));
    }

    #[test]
    fn sleep_ends_when_connection_closes() {
        let conn = Connection::new(ConnInfo::default());
        let closer = conn.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            closer.mark_closed();
        });
        let start = Instant::now();
        assert!(!sleep(Duration::from_secs(30), Some(&conn)));
        t.join().unwrap();
        assert!(start.elapsed() < Duration::from_secs(10));
        assert!(sleep(Duration::from_millis(1), None));
    }

    #[test]
    fn disconnect_is_recorded_on_connection() {
        let conn = Connection::new(ConnInfo::default());
        assert_eq!(conn.disconnect_requested(), None);
        conn.request_disconnect(false);
        assert_eq!(conn.disconnect_requested(), Some(false));
        conn.request_disconnect(true);
        assert_eq!(conn.disconnect_requested(), Some(true));
        conn.request_disconnect(false);
        assert_eq!(conn.disconnect_requested(), Some(true));
    }
}
