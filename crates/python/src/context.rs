//! The per-connection and per-call state that the `nbdkit` module's functions read.
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
//! What outlives one call lives in a [`Connection`]: the state every plugin host shares
//! ([`ConnectionState`]: peer credentials, TLS, whether the client has gone or the script
//! asked for it to be dropped) and the export name negotiated so far. The server makes one per client and wraps its plugin-level calls
//! (`preconnect`, `list_exports`, `default_export`, `open`) in [`with_conn`]; handles
//! remember the connection they were opened in. The API mirrors `sluice-nbdkit`'s, so the
//! server can treat both hosts alike.
//!
//! Shutdown and `nbdkit.nanosleep` are [`sluice_block::host`]'s, shared with the C plugin
//! host; this host's part is calling them with the GIL released (module `module`).

use std::cell::{Cell, RefCell};
use std::sync::{Arc, Mutex};

use sluice_block::host::ConnectionState;
use sluice_block::ConnectionInfo;

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
            .field("peer", &self.0.state.peer_creds())
            .field("is_tls", &self.is_tls())
            .finish_non_exhaustive()
    }
}

struct ConnState {
    state: ConnectionState,
    export_name: Mutex<Arc<str>>,
}

impl Connection {
    /// A connection with the export name "" (set it with [`Connection::set_export_name`]
    /// once negotiated; a handle uses the name in the `OpenContext` it was opened with).
    pub fn new(info: ConnectionInfo) -> Connection {
        Connection(Arc::new(ConnState {
            state: ConnectionState::new(info),
            export_name: Mutex::new("".into()),
        }))
    }

    /// Records that the connection now runs over TLS (after NBD_OPT_STARTTLS).
    pub fn set_tls(&self, is_tls: bool) {
        self.0.state.set_tls(is_tls);
    }

    /// Records the export name negotiated so far (seen by calls made inside [`with_conn`]).
    pub fn set_export_name(&self, name: &str) {
        *lock(&self.0.export_name) = name.into();
    }

    /// Tells scripts sleeping in `nbdkit.nanosleep` on this connection that the client has
    /// gone, so they return early.
    pub fn mark_closed(&self) {
        self.0.state.mark_closed();
    }

    /// `Some(force)` once the script called `nbdkit.disconnect(force)` on this connection:
    /// the server should drop the client (at once if `force`, else after the requests in
    /// flight).
    pub fn disconnect_requested(&self) -> Option<bool> {
        self.0.state.disconnect_requested()
    }

    /// Peer, TLS, closed and disconnect state, as every plugin host keeps it.
    pub(crate) fn state(&self) -> &ConnectionState {
        &self.0.state
    }

    pub(crate) fn is_tls(&self) -> bool {
        self.0.state.is_tls()
    }

    pub(crate) fn export_name(&self) -> Arc<str> {
        lock(&self.0.export_name).clone()
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

/// Locks, ignoring poisoning: the export name behind the mutex stays consistent if a holder
/// panicked.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_conn_installs_and_restores() {
        let conn = Connection::new(ConnectionInfo {
            is_tls: true,
            ..ConnectionInfo::default()
        });
        conn.set_export_name("exp");
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
}
