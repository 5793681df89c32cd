//! Server shutdown as C plugins see it: `nbdkit_shutdown` (a plugin asks the server to stop)
//! and `nbdkit_nanosleep` (a plugin's sleep that ends early when the server stops or the
//! client leaves).
//!
//! One process-wide flag and one condition variable serve every plugin: shutdown is a
//! process event, and sleeping plugins are rare enough that waking all of them on any event
//! (shutdown, a connection closed, a disconnect request) and letting each re-check its own
//! reason costs nothing worth a finer design. The server learns of a plugin's
//! `nbdkit_shutdown` through the hook it registers with [`set_shutdown_hook`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::context::{lock, ConnShared};

static SHUTDOWN: AtomicBool = AtomicBool::new(false);
static SLEEP_LOCK: Mutex<()> = Mutex::new(());
static SLEEP_WAKE: Condvar = Condvar::new();

type Hook = Box<dyn Fn() + Send + Sync>;
static HOOK: RwLock<Option<Hook>> = RwLock::new(None);

/// Tells sleeping plugins that the server is shutting down: every `nbdkit_nanosleep` in
/// progress or to come returns -1 (ESHUTDOWN) at once. Call it when the server begins to
/// stop (signal, QMP quit...), before waiting for connections to finish.
pub fn request_shutdown() {
    SHUTDOWN.store(true, Ordering::Release);
    wake_sleepers();
}

/// True once [`request_shutdown`] or a plugin's `nbdkit_shutdown` was called.
pub fn shutdown_requested() -> bool {
    SHUTDOWN.load(Ordering::Acquire)
}

/// Registers what to do when a plugin calls `nbdkit_shutdown()`. The hook runs on the
/// plugin's thread, inside the plugin call: it must only start the shutdown (send on a
/// channel, notify a task), never wait for it. Replaces any previous hook.
pub fn set_shutdown_hook(f: Box<dyn Fn() + Send + Sync>) {
    *HOOK.write().unwrap_or_else(|e| e.into_inner()) = Some(f);
}

/// `nbdkit_shutdown`: the flag, then the server's hook.
pub(crate) fn plugin_requested_shutdown() {
    tracing::info!("plugin requested server shutdown");
    request_shutdown();
    if let Some(hook) = HOOK.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        hook();
    }
}

pub(crate) fn wake_sleepers() {
    let _guard = lock(&SLEEP_LOCK);
    SLEEP_WAKE.notify_all();
}

/// Sleeps for `duration` unless the server shuts down or `conn` closes or is asked to
/// disconnect first. Returns false if the sleep was cut short.
pub(crate) fn sleep(duration: Duration, conn: Option<&ConnShared>) -> bool {
    let deadline = Instant::now() + duration;
    let interrupted =
        || shutdown_requested() || conn.is_some_and(|c| c.is_closed() || c.disconnect_pending());
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
