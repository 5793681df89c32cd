//! State that plugin hosts for foreign code share: the connection a callback runs for, the
//! process-wide shutdown flag and hook, and the interruptible sleep that both end.
//!
//! nbdkit's C plugins (`sluice-nbdkit`) and Python scripts (`sluice-python`) ask "the server"
//! the same questions through parameterless functions (`nbdkit_peer_pid()`,
//! `nbdkit.is_tls()`, `nbdkit_nanosleep()`, `nbdkit_shutdown()`, `nbdkit_disconnect()`...).
//! What the answers are made of lives here, once: a [`ConnectionState`] per client connection
//! (peer credentials and address from the server's [`ConnectionInfo`], TLS, whether the client
//! has gone or a plugin asked for it to be dropped) and the process-wide shutdown state. How a
//! host *finds* the current connection stays in the host, because that is where the hosts
//! differ: nbdkit keeps raw pointers in a thread-local frame and interns C strings for the
//! connection's lifetime; Python keeps an `Arc` and releases the GIL around waits.
//!
//! Shutdown is a process event, so one flag and one hook serve every host: a server that
//! hosts both kinds of plugin sets the hook and requests shutdown once. Sleepers of every
//! host wait on one condition variable; sleeping plugins are rare enough that waking all of
//! them on any event (shutdown, a connection closed, a disconnect request) and letting each
//! re-check its own reason costs nothing worth a finer design. No lock here is held while
//! foreign code runs, and none is taken by the hook, so Python's GIL cannot deadlock
//! against them as long as callers release the GIL before [`sleep`] and
//! [`plugin_requested_shutdown`] (the Python host does).

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use crate::plugin::{ConnectionInfo, PeerCreds};

/// The per-connection state that foreign plugins can observe or change, shared by the server
/// and every handle opened on the connection (hosts keep it behind their connection's `Arc`).
#[derive(Debug)]
pub struct ConnectionState {
    peer_creds: Option<PeerCreds>,
    peer_addr: Option<Vec<u8>>,
    is_tls: AtomicBool,
    closed: AtomicBool,
    /// 0: none, 1: after the requests in flight, 2: at once (`nbdkit_disconnect(force)`).
    disconnect: AtomicU8,
}

impl ConnectionState {
    /// The state of a connection the server just accepted (or, with a default `info`, of a
    /// handle opened outside any connection).
    pub fn new(info: ConnectionInfo) -> ConnectionState {
        ConnectionState {
            peer_creds: info.peer_creds,
            peer_addr: info.peer_addr,
            is_tls: AtomicBool::new(info.is_tls),
            closed: AtomicBool::new(false),
            disconnect: AtomicU8::new(0),
        }
    }

    /// Unix-socket peer credentials; `None` for TCP or unknown.
    pub fn peer_creds(&self) -> Option<PeerCreds> {
        self.peer_creds
    }

    /// The peer's raw `struct sockaddr`, if the server knows it.
    pub fn peer_addr(&self) -> Option<&[u8]> {
        self.peer_addr.as_deref()
    }

    pub fn is_tls(&self) -> bool {
        self.is_tls.load(Ordering::Acquire)
    }

    /// Records that the connection now runs over TLS (after NBD_OPT_STARTTLS).
    pub fn set_tls(&self, is_tls: bool) {
        self.is_tls.store(is_tls, Ordering::Release);
    }

    /// Records that the client has gone, and wakes plugins sleeping for this connection so
    /// they return early.
    pub fn mark_closed(&self) {
        self.closed.store(true, Ordering::Release);
        wake_sleepers();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// A plugin asks the server to drop this client (`nbdkit_disconnect(force)`); a forced
    /// request is never downgraded by a later gentle one. Wakes sleepers.
    pub fn request_disconnect(&self, force: bool) {
        self.disconnect
            .fetch_max(if force { 2 } else { 1 }, Ordering::AcqRel);
        wake_sleepers();
    }

    /// `Some(force)` once a plugin asked for the client to be dropped: the server should drop
    /// it (at once if `force`, else after the requests in flight).
    pub fn disconnect_requested(&self) -> Option<bool> {
        match self.disconnect.load(Ordering::Acquire) {
            0 => None,
            1 => Some(false),
            _ => Some(true),
        }
    }

    /// A sleep for this connection should end: the client left or is to be dropped.
    fn interrupted(&self) -> bool {
        self.is_closed() || self.disconnect.load(Ordering::Acquire) != 0
    }
}

static SHUTDOWN: AtomicBool = AtomicBool::new(false);
static SLEEP_LOCK: Mutex<()> = Mutex::new(());
static SLEEP_WAKE: Condvar = Condvar::new();

type Hook = Box<dyn Fn() + Send + Sync>;
static HOOK: RwLock<Option<Hook>> = RwLock::new(None);

/// Tells sleeping plugins of every host that the server is shutting down: every [`sleep`] in
/// progress or to come ends at once (nbdkit's ESHUTDOWN). Call it when the server begins to
/// stop (signal, QMP quit...), before waiting for connections to finish.
pub fn request_shutdown() {
    SHUTDOWN.store(true, Ordering::Release);
    wake_sleepers();
}

/// True once [`request_shutdown`] or [`plugin_requested_shutdown`] was called.
pub fn shutdown_requested() -> bool {
    SHUTDOWN.load(Ordering::Acquire)
}

/// Registers what to do when a plugin of any host asks for shutdown (`nbdkit_shutdown()`,
/// `nbdkit.shutdown()`). The hook runs on the plugin's thread, inside the plugin call: it must
/// only start the shutdown (notify a task, send on a channel), never wait for it. Replaces
/// any previous hook.
pub fn set_shutdown_hook(f: Box<dyn Fn() + Send + Sync>) {
    *HOOK.write().unwrap_or_else(|e| e.into_inner()) = Some(f);
}

/// A plugin asked the server to shut down: the flag (waking sleepers), then the server's hook.
pub fn plugin_requested_shutdown() {
    request_shutdown();
    if let Some(hook) = HOOK.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        hook();
    }
}

fn wake_sleepers() {
    let _guard = lock_sleep();
    SLEEP_WAKE.notify_all();
}

/// The sleep lock guards no data (a unit), so a poisoned one is as good as any.
fn lock_sleep() -> MutexGuard<'static, ()> {
    SLEEP_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sleeps for `duration` unless the server shuts down or `conn` closes or is asked to
/// disconnect first. Returns false if the sleep was cut short. Blocks the thread: a host
/// whose callers hold an interpreter lock releases it first.
pub fn sleep(duration: Duration, conn: Option<&ConnectionState>) -> bool {
    let deadline = Instant::now() + duration;
    let interrupted = || shutdown_requested() || conn.is_some_and(ConnectionState::interrupted);
    let mut guard = lock_sleep();
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    // The shutdown flag is process-wide and would cut every other test's sleep short, so it
    // is tested by the hosts' own single-test binaries, not here.

    #[test]
    fn connection_state_keeps_connection_info() {
        let creds = PeerCreds {
            pid: 42,
            uid: 1000,
            gid: 100,
        };
        let state = ConnectionState::new(ConnectionInfo {
            peer_creds: Some(creds),
            peer_addr: Some(vec![1, 0]),
            is_tls: true,
        });
        assert_eq!(state.peer_creds(), Some(creds));
        assert_eq!(state.peer_addr(), Some(&[1u8, 0][..]));
        assert!(state.is_tls());
        state.set_tls(false);
        assert!(!state.is_tls());
    }

    #[test]
    fn disconnect_request_is_never_downgraded() {
        let state = ConnectionState::new(ConnectionInfo::default());
        assert_eq!(state.disconnect_requested(), None);
        state.request_disconnect(false);
        assert_eq!(state.disconnect_requested(), Some(false));
        state.request_disconnect(true);
        assert_eq!(state.disconnect_requested(), Some(true));
        state.request_disconnect(false);
        assert_eq!(state.disconnect_requested(), Some(true));
    }

    #[test]
    fn sleep_without_interruption_runs_to_the_end() {
        assert!(sleep(Duration::from_millis(1), None));
        let state = ConnectionState::new(ConnectionInfo::default());
        assert!(sleep(Duration::from_millis(1), Some(&state)));
    }

    #[test]
    fn sleep_ends_when_connection_closes() {
        let state = Arc::new(ConnectionState::new(ConnectionInfo::default()));
        let closer = state.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            closer.mark_closed();
        });
        let start = Instant::now();
        assert!(!sleep(Duration::from_secs(30), Some(&state)));
        t.join().unwrap();
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn sleep_ends_when_disconnect_is_requested() {
        let state = Arc::new(ConnectionState::new(ConnectionInfo::default()));
        let requester = state.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            requester.request_disconnect(false);
        });
        assert!(!sleep(Duration::from_secs(30), Some(&state)));
        t.join().unwrap();
    }
}
