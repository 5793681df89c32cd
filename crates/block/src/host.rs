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
//!
//! The capability ladder is here too: how nbdkit answers a `can_*` question that a plugin
//! leaves undefined (`can_write` from the presence of `pwrite`, FUA emulated when there is a
//! flush, at most emulated for API 1...). Both hosts must answer exactly as nbdkit does, and
//! the rules are the same for C plugins and scripts, so they are decided once, in [`Ladder`],
//! over what a host can tell about its plugin ([`ForeignAnswers`]: which callbacks exist and
//! what the defined `can_*` callbacks returned). The hosts keep only what really differs
//! between them: how a callback is looked up and called, what counts as true, and which of
//! nbdkit's two `can_fast_zero` fallbacks applies ([`FastZeroDefault`]).

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use crate::error::{BlockError, Result};
use crate::plugin::{ConnectionInfo, PeerCreds, Support};

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

/// A `can_*` question the server asks a handle, which a foreign plugin may answer itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Capability {
    Write,
    Flush,
    Rotational,
    Trim,
    Zero,
    FastZero,
    Extents,
    Fua,
    MultiConn,
    Cache,
}

impl Capability {
    /// The callback's name, the same in nbdkit's C and Python APIs.
    pub fn callback(self) -> &'static str {
        match self {
            Capability::Write => "can_write",
            Capability::Flush => "can_flush",
            Capability::Rotational => "is_rotational",
            Capability::Trim => "can_trim",
            Capability::Zero => "can_zero",
            Capability::FastZero => "can_fast_zero",
            Capability::Extents => "can_extents",
            Capability::Fua => "can_fua",
            Capability::MultiConn => "can_multi_conn",
            Capability::Cache => "can_cache",
        }
    }
}

/// A data callback whose presence decides a capability the plugin does not answer. For C
/// plugins each means the v2 callback or its `_v1` twin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Callback {
    Pwrite,
    Flush,
    Trim,
    Zero,
    Extents,
    Cache,
}

impl Callback {
    /// The callback's name, the same in nbdkit's C and Python APIs.
    pub fn name(self) -> &'static str {
        match self {
            Callback::Pwrite => "pwrite",
            Callback::Flush => "flush",
            Callback::Trim => "trim",
            Callback::Zero => "zero",
            Callback::Extents => "extents",
            Callback::Cache => "cache",
        }
    }
}

/// What `can_fast_zero` is when the plugin does not answer it. nbdkit has two rules, and
/// which one applies depends on the kind of plugin, not on its callbacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FastZeroDefault {
    /// nbdkit's core, for C plugins (`server/plugins.c`): true without a v2 `.zero` (a fast
    /// zero then fails at once instead of writing), else only if the export cannot be
    /// written (it asks `!backend_can_zero`, which is ZERO_NONE only for a read-only export).
    Core { v2_zero: bool, readonly: bool },
    /// nbdkit's python plugin: `not can_zero` (a script's `zero` is never called with
    /// FAST_ZERO unless the script says it can take it).
    NotCanZero,
}

/// What a host tells the capability [`Ladder`] about one open handle of a foreign plugin.
pub trait ForeignAnswers {
    /// The plugin's answer to a boolean question, or `None` if it does not define the
    /// callback. What counts as true is the host's API's rule (C: non-zero; Python: only
    /// `True`).
    fn flag(&self, cap: Capability) -> Result<Option<bool>>;
    /// The plugin's raw answer to a tri-state question (`can_fua`, `can_cache`), or `None`
    /// if it does not define the callback. The ladder checks the range.
    fn level(&self, cap: Capability) -> Result<Option<i64>>;
    /// Whether the plugin defines `callback`.
    fn defines(&self, callback: Callback) -> Result<bool>;
    /// The plugin's API version (1 or 2).
    fn api_version(&self) -> u32;
    /// Which of nbdkit's `can_fast_zero` rules applies to this handle.
    fn fast_zero_default(&self) -> FastZeroDefault;
    /// The error for a tri-state answer that is not 0, 1 or 2, in the host's words.
    fn invalid_answer(&self, cap: Capability, value: i64) -> BlockError;
}

/// nbdkit's capability answers for a handle of a foreign plugin: the plugin's own answer when
/// it defines the `can_*` callback, else nbdkit's default. Hosts implement the capability
/// methods of [`crate::Handle`] with it through [`crate::foreign_capabilities!`].
pub struct Ladder<'a, H: ?Sized>(pub &'a H);

impl<H: ForeignAnswers + ?Sized> Ladder<'_, H> {
    /// The plugin's answer, else whether `default` exists (false without one).
    fn flag_or(&self, cap: Capability, default: Option<Callback>) -> Result<bool> {
        match (self.0.flag(cap)?, default) {
            (Some(answer), _) => Ok(answer),
            (None, Some(callback)) => self.0.defines(callback),
            (None, None) => Ok(false),
        }
    }

    /// A tri-state answer, checked.
    fn support(&self, cap: Capability, value: i64) -> Result<Support> {
        i32::try_from(value)
            .ok()
            .and_then(Support::from_i32)
            .ok_or_else(|| self.0.invalid_answer(cap, value))
    }

    pub fn can_write(&self) -> Result<bool> {
        self.flag_or(Capability::Write, Some(Callback::Pwrite))
    }

    pub fn can_flush(&self) -> Result<bool> {
        self.flag_or(Capability::Flush, Some(Callback::Flush))
    }

    pub fn is_rotational(&self) -> Result<bool> {
        self.flag_or(Capability::Rotational, None)
    }

    pub fn can_trim(&self) -> Result<bool> {
        self.flag_or(Capability::Trim, Some(Callback::Trim))
    }

    /// The plugin's boolean `can_zero` only says whether its zero callback is called: false
    /// means the server emulates zeroing with writes (nbdkit's ZERO_EMULATE).
    pub fn can_zero(&self) -> Result<Support> {
        Ok(if self.flag_or(Capability::Zero, Some(Callback::Zero))? {
            Support::Native
        } else {
            Support::Emulate
        })
    }

    pub fn can_fast_zero(&self) -> Result<bool> {
        if let Some(answer) = self.0.flag(Capability::FastZero)? {
            return Ok(answer);
        }
        match self.0.fast_zero_default() {
            FastZeroDefault::Core { v2_zero: false, .. } => Ok(true),
            FastZeroDefault::Core { readonly, .. } => Ok(readonly || !self.can_write()?),
            FastZeroDefault::NotCanZero => Ok(self.can_zero()? != Support::Native),
        }
    }

    pub fn can_extents(&self) -> Result<bool> {
        self.flag_or(Capability::Extents, Some(Callback::Extents))
    }

    /// API 1 callbacks take no flags, so the FUA bit would be dropped: an answer above
    /// EMULATE is capped there (before the range check, as nbdkit does), and the server
    /// flushes after the write instead. Without `can_fua`, nbdkit emulates FUA whenever
    /// there is a flush callback, even if `can_flush` says false.
    pub fn can_fua(&self) -> Result<Support> {
        match self.0.level(Capability::Fua)? {
            Some(value) => {
                let value = if self.0.api_version() == 1 {
                    value.min(Support::Emulate as i64)
                } else {
                    value
                };
                self.support(Capability::Fua, value)
            }
            None if self.0.defines(Callback::Flush)? => Ok(Support::Emulate),
            None => Ok(Support::None),
        }
    }

    pub fn can_multi_conn(&self) -> Result<bool> {
        self.flag_or(Capability::MultiConn, None)
    }

    pub fn can_cache(&self) -> Result<Support> {
        match self.0.level(Capability::Cache)? {
            Some(value) => self.support(Capability::Cache, value),
            None if self.0.defines(Callback::Cache)? => Ok(Support::Native),
            None => Ok(Support::None),
        }
    }
}

/// The ten capability methods of [`crate::Handle`] answered by [`Ladder`], for use inside
/// `impl Handle for T` where `T: ForeignAnswers`. A macro rather than ten hand-written
/// forwards in each host, so that no host can answer one capability its own way by mistake.
#[macro_export]
macro_rules! foreign_capabilities {
    () => {
        $crate::foreign_capabilities!(@methods
            can_write -> bool,
            can_flush -> bool,
            is_rotational -> bool,
            can_trim -> bool,
            can_zero -> $crate::Support,
            can_fast_zero -> bool,
            can_fua -> $crate::Support,
            can_multi_conn -> bool,
            can_cache -> $crate::Support,
            can_extents -> bool
        );
    };
    (@methods $($name:ident -> $answer:ty),*) => {
        $(
            fn $name(&self) -> $crate::Result<$answer> {
                $crate::host::Ladder(self).$name()
            }
        )*
    };
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

    /// A plugin described by its `can_*` answers and data callbacks.
    struct Fake {
        flags: Vec<(Capability, bool)>,
        levels: Vec<(Capability, i64)>,
        callbacks: Vec<Callback>,
        api_version: u32,
        fast_zero: FastZeroDefault,
    }

    impl Fake {
        /// An API 2 C plugin with `callbacks` and no `can_*` callback, opened read-write.
        fn c(callbacks: &[Callback]) -> Fake {
            Fake {
                flags: Vec::new(),
                levels: Vec::new(),
                callbacks: callbacks.to_vec(),
                api_version: 2,
                fast_zero: FastZeroDefault::Core {
                    v2_zero: callbacks.contains(&Callback::Zero),
                    readonly: false,
                },
            }
        }
    }

    impl ForeignAnswers for Fake {
        fn flag(&self, cap: Capability) -> Result<Option<bool>> {
            Ok(self.flags.iter().find(|(c, _)| *c == cap).map(|(_, v)| *v))
        }
        fn level(&self, cap: Capability) -> Result<Option<i64>> {
            Ok(self.levels.iter().find(|(c, _)| *c == cap).map(|(_, v)| *v))
        }
        fn defines(&self, callback: Callback) -> Result<bool> {
            Ok(self.callbacks.contains(&callback))
        }
        fn api_version(&self) -> u32 {
            self.api_version
        }
        fn fast_zero_default(&self) -> FastZeroDefault {
            self.fast_zero
        }
        fn invalid_answer(&self, cap: Capability, value: i64) -> BlockError {
            BlockError::new(crate::Errno::EINVAL, format!("{}: {value}", cap.callback()))
        }
    }

    const ALL: [Callback; 6] = [
        Callback::Pwrite,
        Callback::Flush,
        Callback::Trim,
        Callback::Zero,
        Callback::Extents,
        Callback::Cache,
    ];

    /// Everything the ladder answers for `p`, on one line: the boolean capabilities that are
    /// true, then the tri-state ones.
    fn offered(p: &Fake) -> String {
        let l = Ladder(p);
        let flags = [
            ("write", l.can_write()),
            ("flush", l.can_flush()),
            ("rotational", l.is_rotational()),
            ("trim", l.can_trim()),
            ("fast_zero", l.can_fast_zero()),
            ("extents", l.can_extents()),
            ("multi_conn", l.can_multi_conn()),
        ];
        let mut out: Vec<String> = flags
            .into_iter()
            .filter(|(_, answer)| *answer.as_ref().unwrap())
            .map(|(name, _)| name.to_string())
            .collect();
        let levels = [
            ("zero", l.can_zero()),
            ("fua", l.can_fua()),
            ("cache", l.can_cache()),
        ];
        out.extend(levels.map(|(name, s)| format!("{name}={:?}", s.unwrap())));
        out.join(" ")
    }

    #[test]
    fn ladder_without_can_callbacks_follows_the_data_callbacks() {
        assert_eq!(
            offered(&Fake::c(&ALL)),
            "write flush trim extents zero=Native fua=Emulate cache=Native"
        );
        assert_eq!(
            offered(&Fake::c(&[])),
            "fast_zero zero=Emulate fua=None cache=None"
        );
    }

    #[test]
    fn ladder_takes_the_plugins_answers_over_the_defaults() {
        let mut p = Fake::c(&ALL);
        p.flags = [
            Capability::Write,
            Capability::Flush,
            Capability::Trim,
            Capability::Zero,
            Capability::Extents,
        ]
        .map(|c| (c, false))
        .to_vec();
        p.flags.push((Capability::Rotational, true));
        p.flags.push((Capability::MultiConn, true));
        p.flags.push((Capability::FastZero, true));
        p.levels = vec![(Capability::Fua, 0), (Capability::Cache, 1)];
        assert_eq!(
            offered(&p),
            "rotational fast_zero multi_conn zero=Emulate fua=None cache=Emulate"
        );
    }

    #[test]
    fn ladder_caps_fua_of_api_1_before_checking_the_range() {
        let mut p = Fake::c(&ALL);
        p.api_version = 1;
        for (answer, expected) in [(2, Support::Emulate), (7, Support::Emulate)] {
            p.levels = vec![(Capability::Fua, answer)];
            assert_eq!(Ladder(&p).can_fua().unwrap(), expected, "{answer}");
        }
        p.levels = vec![(Capability::Fua, -2)];
        assert_eq!(Ladder(&p).can_fua().unwrap_err().message, "can_fua: -2");
        p.api_version = 2;
        p.levels = vec![(Capability::Fua, 2)];
        assert_eq!(Ladder(&p).can_fua().unwrap(), Support::Native);
        p.levels = vec![(Capability::Fua, 7), (Capability::Cache, 3)];
        assert_eq!(Ladder(&p).can_fua().unwrap_err().message, "can_fua: 7");
        assert_eq!(Ladder(&p).can_cache().unwrap_err().message, "can_cache: 3");
    }

    #[test]
    fn ladder_fast_zero_core_rule_offers_it_only_when_zero_cannot_write() {
        let mut p = Fake::c(&ALL);
        assert!(!Ladder(&p).can_fast_zero().unwrap());
        p.fast_zero = FastZeroDefault::Core {
            v2_zero: true,
            readonly: true,
        };
        assert!(Ladder(&p).can_fast_zero().unwrap());
        p.fast_zero = FastZeroDefault::Core {
            v2_zero: true,
            readonly: false,
        };
        p.flags = vec![(Capability::Write, false)];
        assert!(Ladder(&p).can_fast_zero().unwrap());
        // A v1 zero callback cannot take FAST_ZERO: offered, and failed at once.
        p.flags.clear();
        p.fast_zero = FastZeroDefault::Core {
            v2_zero: false,
            readonly: false,
        };
        assert!(Ladder(&p).can_fast_zero().unwrap());
    }

    #[test]
    fn ladder_fast_zero_python_rule_is_not_can_zero() {
        let mut p = Fake::c(&ALL);
        p.fast_zero = FastZeroDefault::NotCanZero;
        assert!(!Ladder(&p).can_fast_zero().unwrap());
        p.flags = vec![(Capability::Zero, false)];
        assert!(Ladder(&p).can_fast_zero().unwrap());
        p.flags.clear();
        p.callbacks.retain(|c| *c != Callback::Zero);
        assert!(Ladder(&p).can_fast_zero().unwrap());
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
