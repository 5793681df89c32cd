//! The thread-local "current connection" that nbdkit's server API reads, and the per-call error
//! state.
//!
//! nbdkit plugins ask the server about the connection they are serving through functions with
//! no parameters (`nbdkit_export_name()`, `nbdkit_is_tls()`, `nbdkit_peer_pid()`,
//! `nbdkit_set_error()`...): nbdkit answers from thread-local state set by the worker thread
//! before it calls into the plugin. sluice does the same, and because sluice calls a handle
//! from whatever thread the server picks, *every* call into C goes through a `Scope` that
//! installs the caller's `Frame` on the current thread for the length of the call and
//! restores the previous one afterwards (so nesting — [`with_conn`] around
//! `Plugin::open` — works). A frame is four plain words (raw pointers into objects that the
//! caller keeps alive for the call), so entering one costs no allocation and no atomic.
//!
//! Per call, the scope also clears the thread's `nbdkit_set_error` value, the last
//! `nbdkit_error` message and the C `errno`; when the callback returns -1 the host reads them
//! back (see `call_error`) to build the [`BlockError`] the client will see.
//!
//! Every `nbdkit_error` message is shown exactly once. A message reported during a call is
//! held as the call's *pending* message: if the call fails, it becomes the message of the
//! returned error (whose receiver shows it, as the server does for a failed request or
//! `sluice` for a failed startup); otherwise it is logged when the call ends. A plugin that
//! reports several messages in one call gets the earlier ones logged as the next arrives.
//! Messages from threads that are in no call (a plugin's own threads) are logged at once.
//!
//! What outlives a single call lives in a [`Connection`]: the state every plugin host shares
//! ([`ConnectionState`]: the client's peer address and credentials, its TLS state, whether it
//! has gone or is to be dropped), plus what only C needs: the export names it opened
//! (interned, so the pointers that `nbdkit_export_name` returned stay valid) and the strings
//! the plugin interned with `nbdkit_strdup_intern` during the connection. A connection is shared (`Arc`) by the server
//! and by every handle opened on it, and is freed with the last of them, which is nbdkit's
//! "lifetime of the connection". Strings interned outside any connection belong to the
//! plugin (freed after `unload`) or, from a thread sluice knows nothing of, to the process.

use std::cell::{Cell, RefCell};
use std::ffi::{c_char, CString};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::{Arc, Mutex};

use sluice_block::host::ConnectionState;
use sluice_block::{BlockError, ConnectionInfo, Errno};

/// One client connection as nbdkit plugins see it. Cheap to clone (an `Arc`).
///
/// The server makes one per accepted client and wraps every call it makes on the plugin
/// *outside* a handle (`preconnect`, `list_exports`, `default_export`, `open`) in
/// [`with_conn`]. Handles opened inside remember the connection and install it themselves on
/// every later call, so nothing else is needed for data requests.
#[derive(Clone)]
pub struct Connection(Arc<ConnShared>);

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.0.state.peer_creds())
            .field("is_tls", &self.0.state.is_tls())
            .finish_non_exhaustive()
    }
}

pub(crate) struct ConnShared {
    state: ConnectionState,
    /// Points into `interned`; never NULL.
    export_name: AtomicPtr<c_char>,
    interned: Mutex<Vec<CString>>,
}

impl Connection {
    /// A connection with the export name "" (set it with [`Connection::set_export_name`]
    /// once negotiated).
    pub fn new(info: ConnectionInfo) -> Connection {
        let shared = ConnShared {
            state: ConnectionState::new(info),
            export_name: AtomicPtr::new(ptr::null_mut()),
            interned: Mutex::new(Vec::new()),
        };
        let name = shared.intern(c"".into());
        shared.export_name.store(name.cast_mut(), Ordering::Release);
        Connection(Arc::new(shared))
    }

    /// Records that the connection now runs over TLS (after NBD_OPT_STARTTLS).
    pub fn set_tls(&self, is_tls: bool) {
        self.0.state.set_tls(is_tls);
    }

    /// Records the export name negotiated so far (seen by calls made inside [`with_conn`]).
    pub fn set_export_name(&self, name: &str) {
        let p = self.0.intern(lossless_cstring(name.as_bytes()));
        self.0.export_name.store(p.cast_mut(), Ordering::Release);
    }

    /// Tells plugins sleeping in `nbdkit_nanosleep` on this connection that the client has
    /// gone, so they return early.
    pub fn mark_closed(&self) {
        self.0.state.mark_closed();
    }

    /// `Some(force)` once the plugin called `nbdkit_disconnect(force)` on this connection:
    /// the server should drop the client (at once if `force`, else after the requests in
    /// flight).
    pub fn disconnect_requested(&self) -> Option<bool> {
        self.0.state.disconnect_requested()
    }

    pub(crate) fn shared(&self) -> &ConnShared {
        &self.0
    }
}

impl ConnShared {
    /// Keeps `s` until the connection is freed and returns its stable address.
    pub(crate) fn intern(&self, s: CString) -> *const c_char {
        let p = s.as_ptr();
        // A CString's bytes are a separate heap block: moving it into the Vec (or the Vec
        // growing) does not move them, so `p` stays valid while the CString is in the list.
        lock(&self.interned).push(s);
        p
    }

    /// Peer, TLS, closed and disconnect state, as every plugin host keeps it.
    pub(crate) fn state(&self) -> &ConnectionState {
        &self.state
    }

    pub(crate) fn export_name(&self) -> *const c_char {
        self.export_name.load(Ordering::Acquire)
    }
}

/// Per-plugin state reachable from the thread-local frame: the name for log lines, the
/// strings interned outside any connection, and whether configuration is over (for
/// `nbdkit_stdio_safe`).
pub(crate) struct PluginScope {
    pub(crate) name: String,
    interned: Mutex<Vec<CString>>,
    configured: AtomicBool,
}

impl PluginScope {
    pub(crate) fn new(name: String) -> PluginScope {
        PluginScope {
            name,
            interned: Mutex::new(Vec::new()),
            configured: AtomicBool::new(false),
        }
    }

    pub(crate) fn set_configured(&self) {
        self.configured.store(true, Ordering::Release);
    }

    pub(crate) fn is_configured(&self) -> bool {
        self.configured.load(Ordering::Acquire)
    }
}

/// Strings interned on threads that are in no plugin call at all: kept for the process.
static PROCESS_INTERNED: Mutex<Vec<CString>> = Mutex::new(Vec::new());

/// What a C call may ask about its caller. All pointers may be NULL; non-NULL ones point to
/// objects the code that entered the [`Scope`] keeps alive until the scope ends.
#[derive(Clone, Copy)]
pub(crate) struct Frame {
    pub(crate) plugin: *const PluginScope,
    pub(crate) conn: *const ConnShared,
    pub(crate) export_name: *const c_char,
    pub(crate) is_tls: bool,
}

impl Frame {
    const EMPTY: Frame = Frame {
        plugin: ptr::null(),
        conn: ptr::null(),
        export_name: ptr::null(),
        is_tls: false,
    };

    /// A frame for a call into `plugin`, inside the connection the current thread is in (if
    /// any, from [`with_conn`]).
    pub(crate) fn for_plugin(plugin: &PluginScope) -> Frame {
        let outer = current();
        Frame { plugin, ..outer }
    }
}

thread_local! {
    static FRAME: Cell<Frame> = const { Cell::new(Frame::EMPTY) };
    static CONN: RefCell<Option<Connection>> = const { RefCell::new(None) };
    static SET_ERROR: Cell<i32> = const { Cell::new(0) };
    static LAST_ERROR: RefCell<Option<String>> = const { RefCell::new(None) };
    /// How many [`Scope`]s are open on this thread.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// The frame of the call in progress on this thread.
pub(crate) fn current() -> Frame {
    FRAME.with(Cell::get)
}

/// The connection installed by [`with_conn`] on this thread, if any.
pub(crate) fn current_connection() -> Option<Connection> {
    CONN.with(|c| c.borrow().clone())
}

/// Installs a [`Frame`] for one call into C; restores the previous frame when dropped.
pub(crate) struct Scope {
    prev: Frame,
    /// Scopes are thread-bound.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Scope {
    pub(crate) fn enter(frame: Frame) -> Scope {
        // A nested call: what the outer call reported so far is shown under its own name.
        log_pending();
        let prev = FRAME.with(|f| f.replace(frame));
        DEPTH.with(|d| d.set(d.get() + 1));
        SET_ERROR.with(|e| e.set(0));
        set_errno(0);
        Scope {
            prev,
            _not_send: std::marker::PhantomData,
        }
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        // Nobody took the message into an error (the call succeeded): show it now, while
        // the frame still names the plugin.
        log_pending();
        DEPTH.with(|d| d.set(d.get() - 1));
        FRAME.with(|f| f.set(self.prev));
    }
}

/// Runs `f` with `conn` as this thread's current nbdkit connection.
///
/// The server wraps its calls of `Plugin::preconnect`, `list_exports`, `default_export` and
/// `open` in this, so that C plugins calling `nbdkit_peer_name`, `nbdkit_is_tls`,
/// `nbdkit_strdup_intern`... from those callbacks see the client, and so that handles opened
/// inside remember it. Calls may nest; the previous connection is restored afterwards.
/// For plugins that are not nbdkit plugins it has no effect.
pub fn with_conn<R>(conn: &Connection, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Connection>, Frame);
    impl Drop for Restore {
        fn drop(&mut self) {
            CONN.with(|c| *c.borrow_mut() = self.0.take());
            FRAME.with(|f| f.set(self.1));
        }
    }
    let prev_conn = CONN.with(|c| c.borrow_mut().replace(conn.clone()));
    let shared = conn.shared();
    let prev_frame = FRAME.with(|f| {
        f.replace(Frame {
            plugin: f.get().plugin,
            conn: shared,
            export_name: shared.export_name(),
            is_tls: shared.state().is_tls(),
        })
    });
    let _restore = Restore(prev_conn, prev_frame);
    f()
}

/// `nbdkit_set_error`.
pub(crate) fn set_error(err: i32) {
    SET_ERROR.with(|e| e.set(err));
}

/// Records the message of an `nbdkit_error`: pending for the call in progress (logging the
/// one it replaces), or logged at once on a thread that is in no call.
pub(crate) fn set_last_error(msg: String) {
    if DEPTH.with(Cell::get) == 0 {
        crate::api::log::log_error(&msg);
        return;
    }
    log_pending();
    LAST_ERROR.with(|m| *m.borrow_mut() = Some(msg));
}

/// Logs and clears the pending `nbdkit_error` message, if any. Preserves errno.
fn log_pending() {
    if let Some(msg) = LAST_ERROR.with(|m| m.borrow_mut().take()) {
        let saved = errno();
        crate::api::log::log_error(&msg);
        set_errno(saved);
    }
}

/// The pending `nbdkit_error` message of the call in progress; the caller now shows it (or
/// hands it on in an error).
pub(crate) fn take_last_error() -> Option<String> {
    LAST_ERROR.with(|m| m.borrow_mut().take())
}

/// Builds the error of a callback that returned failure, following nbdkit: the errno is the
/// `nbdkit_set_error` value if the plugin set one, else `errno` (read by the caller right
/// after the callback returned) if the plugin declared `errno_is_preserved`, else EIO. The
/// message is the plugin's last `nbdkit_error`, or `"{op}: {strerror}"`.
pub(crate) fn call_error(op: &str, errno_is_preserved: bool, saved_errno: i32) -> BlockError {
    let set = SET_ERROR.with(Cell::get);
    let errno = if set != 0 {
        set
    } else if errno_is_preserved && saved_errno != 0 {
        saved_errno
    } else {
        libc::EIO
    };
    let message = take_last_error().unwrap_or_else(|| format!("{op}: {}", Errno(errno).describe()));
    BlockError::new(Errno(errno), message)
}

/// Stores `s` for the lifetime nbdkit promises interned strings: the current connection's,
/// else the current plugin's (until unload), else the process's.
pub(crate) fn intern(s: CString) -> *const c_char {
    let frame = current();
    if !frame.conn.is_null() {
        // SAFETY: a non-NULL frame pointer refers to a connection the scope's owner keeps
        // alive for the whole call, and we are inside that call.
        return unsafe { &*frame.conn }.intern(s);
    }
    let p = s.as_ptr();
    if !frame.plugin.is_null() {
        // SAFETY: as above, for the plugin.
        lock(&unsafe { &*frame.plugin }.interned).push(s);
    } else {
        lock(&PROCESS_INTERNED).push(s);
    }
    p
}

/// The name of the plugin being called on this thread ("" outside any call).
pub(crate) fn with_plugin_name<R>(f: impl FnOnce(&str) -> R) -> R {
    let frame = current();
    if frame.plugin.is_null() {
        f("")
    } else {
        // SAFETY: see `intern`.
        f(&unsafe { &*frame.plugin }.name)
    }
}

/// The current thread's C `errno`.
pub(crate) fn errno() -> i32 {
    // SAFETY: __errno_location always returns a valid pointer to this thread's errno.
    unsafe { *libc::__errno_location() }
}

pub(crate) fn set_errno(v: i32) {
    // SAFETY: as in `errno`.
    unsafe { *libc::__errno_location() = v }
}

/// A C string of `bytes` up to the first NUL (C cannot see past it anyway).
pub(crate) fn lossless_cstring(bytes: &[u8]) -> CString {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    CString::new(&bytes[..end]).expect("no NUL before end")
}

/// Locks, ignoring poisoning: every structure behind these mutexes is append-only and stays
/// consistent if a holder panicked.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    #[test]
    fn call_error_prefers_set_error_then_errno_then_eio() {
        let plugin = PluginScope::new("t".into());
        let _s = Scope::enter(Frame::for_plugin(&plugin));
        set_error(libc::ENOSPC);
        assert_eq!(
            call_error("pwrite", true, libc::EPERM).errno,
            Errno(libc::ENOSPC)
        );
        let _s = Scope::enter(Frame::for_plugin(&plugin));
        assert_eq!(
            call_error("pwrite", true, libc::EPERM).errno,
            Errno(libc::EPERM)
        );
        assert_eq!(call_error("pwrite", false, libc::EPERM).errno, Errno::EIO);
        assert_eq!(call_error("pwrite", true, 0).errno, Errno::EIO);
    }

    #[test]
    fn call_error_message_is_last_error_or_strerror() {
        let plugin = PluginScope::new("t".into());
        let _s = Scope::enter(Frame::for_plugin(&plugin));
        assert_eq!(
            call_error("pread", false, 0).message,
            "pread: Input/output error"
        );
        set_last_error("disk on fire".into());
        assert_eq!(call_error("pread", false, 0).message, "disk on fire");
    }

    #[test]
    fn message_of_failed_call_is_taken_not_left_pending() {
        let plugin = PluginScope::new("t".into());
        {
            let _s = Scope::enter(Frame::for_plugin(&plugin));
            set_last_error("first".into());
            // A second message replaces the first, which is logged instead of kept.
            set_last_error("second".into());
            assert_eq!(call_error("pwrite", false, 0).message, "second");
            assert_eq!(take_last_error(), None);
        }
        assert_eq!(LAST_ERROR.with(|m| m.borrow().clone()), None);
    }

    #[test]
    fn pending_message_is_cleared_when_call_ends() {
        let plugin = PluginScope::new("t".into());
        {
            let _s = Scope::enter(Frame::for_plugin(&plugin));
            set_last_error("logged at the end".into());
        }
        assert_eq!(DEPTH.with(Cell::get), 0);
        assert_eq!(take_last_error(), None);
    }

    #[test]
    fn message_outside_any_call_is_not_kept() {
        set_last_error("from a plugin thread".into());
        assert_eq!(take_last_error(), None);
    }

    #[test]
    fn with_conn_installs_and_restores() {
        let conn = Connection::new(ConnectionInfo {
            is_tls: true,
            ..ConnectionInfo::default()
        });
        conn.set_export_name("exp");
        assert!(current().conn.is_null());
        with_conn(&conn, || {
            let f = current();
            assert!(!f.conn.is_null());
            assert!(f.is_tls);
            // SAFETY: the connection is alive for this closure.
            let name = unsafe { CStr::from_ptr(f.export_name) };
            assert_eq!(name.to_str().unwrap(), "exp");
            assert!(current_connection().is_some());
        });
        assert!(current().conn.is_null());
        assert!(current_connection().is_none());
    }
}
