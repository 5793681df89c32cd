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
//!
//! nbdkit asks each `can_*` of a plugin at most once per connection and keeps the answer
//! (`server/backend.c` caches it in the connection's context), and plugins can see that (a
//! script that logs or counts its calls, one that answers differently each time). sluice asks
//! a handle's capabilities from several places: the export policy once, and filters again in
//! their `open` (cow asks whether it may write below, retry and blocksize what they pass on).
//! So the ladder keeps every answer it got in the handle's [`CapCache`]: the foreign callback
//! runs at most once per handle, whoever asks, and the ladder's own uses of another answer
//! (`can_fast_zero` from `can_zero` or `can_write`) read the cache too. A failed answer is not
//! kept, so it is asked again next time, as nbdkit does.

use std::sync::atomic::{AtomicBool, AtomicI8, AtomicU64, AtomicU8, Ordering};
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
    /// How many capabilities there are (the size of a [`CapCache`]).
    const COUNT: usize = 10;

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

/// The answers a handle's foreign plugin gave to its `can_*` callbacks (through the
/// [`Ladder`]), each asked once. One atomic per capability, so nothing is locked while the
/// plugin runs; two threads asking the same first question at once may both call the plugin,
/// which cannot happen on the server's path (capabilities are asked while a connection opens).
/// The export size (`get_size`) is kept here too: nbdkit also asks it once per connection.
#[derive(Debug)]
pub struct CapCache {
    caps: [AtomicI8; Capability::COUNT],
    size: AtomicU64,
}

impl Default for CapCache {
    fn default() -> CapCache {
        CapCache {
            caps: std::array::from_fn(|_| AtomicI8::new(CapCache::UNKNOWN)),
            size: AtomicU64::new(u64::MAX),
        }
    }
}

impl CapCache {
    const UNKNOWN: i8 = -1;

    /// The kept export size, else `ask`'s (kept if it succeeds). Sizes are at most 2^63-1,
    /// so `u64::MAX` can stand for "not asked yet".
    pub fn size(&self, ask: impl FnOnce() -> Result<u64>) -> Result<u64> {
        match self.size.load(Ordering::Acquire) {
            u64::MAX => {
                let size = ask()?;
                self.size.store(size, Ordering::Release);
                Ok(size)
            }
            size => Ok(size),
        }
    }

    fn get(&self, cap: Capability) -> Option<i8> {
        let v = self.caps[cap as usize].load(Ordering::Acquire);
        (v != CapCache::UNKNOWN).then_some(v)
    }

    fn set(&self, cap: Capability, value: i8) {
        self.caps[cap as usize].store(value, Ordering::Release);
    }

    /// The kept boolean answer to `cap`, else `ask`'s (kept if it succeeds).
    fn flag(&self, cap: Capability, ask: impl FnOnce() -> Result<bool>) -> Result<bool> {
        if let Some(v) = self.get(cap) {
            return Ok(v != 0);
        }
        let answer = ask()?;
        self.set(cap, i8::from(answer));
        Ok(answer)
    }

    /// The kept tri-state answer to `cap`, else `ask`'s (kept if it succeeds).
    fn support(&self, cap: Capability, ask: impl FnOnce() -> Result<Support>) -> Result<Support> {
        if let Some(s) = self.get(cap).and_then(|v| Support::from_i32(i32::from(v))) {
            return Ok(s);
        }
        let answer = ask()?;
        self.set(cap, answer as i8);
        Ok(answer)
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
    /// This handle's kept answers: one [`CapCache`] per open handle.
    fn answers(&self) -> &CapCache;
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

    /// A boolean capability from the cache, else the plugin's answer or its default.
    fn cached_flag(&self, cap: Capability, default: Option<Callback>) -> Result<bool> {
        self.0.answers().flag(cap, || self.flag_or(cap, default))
    }

    pub fn can_write(&self) -> Result<bool> {
        self.cached_flag(Capability::Write, Some(Callback::Pwrite))
    }

    pub fn can_flush(&self) -> Result<bool> {
        self.cached_flag(Capability::Flush, Some(Callback::Flush))
    }

    pub fn is_rotational(&self) -> Result<bool> {
        self.cached_flag(Capability::Rotational, None)
    }

    pub fn can_trim(&self) -> Result<bool> {
        self.cached_flag(Capability::Trim, Some(Callback::Trim))
    }

    /// The plugin's boolean `can_zero` only says whether its zero callback is called: false
    /// means the server emulates zeroing with writes (nbdkit's ZERO_EMULATE).
    pub fn can_zero(&self) -> Result<Support> {
        self.0.answers().support(Capability::Zero, || {
            Ok(if self.flag_or(Capability::Zero, Some(Callback::Zero))? {
                Support::Native
            } else {
                Support::Emulate
            })
        })
    }

    pub fn can_fast_zero(&self) -> Result<bool> {
        self.0.answers().flag(Capability::FastZero, || {
            if let Some(answer) = self.0.flag(Capability::FastZero)? {
                return Ok(answer);
            }
            match self.0.fast_zero_default() {
                FastZeroDefault::Core { v2_zero: false, .. } => Ok(true),
                FastZeroDefault::Core { readonly, .. } => Ok(readonly || !self.can_write()?),
                FastZeroDefault::NotCanZero => Ok(self.can_zero()? != Support::Native),
            }
        })
    }

    pub fn can_extents(&self) -> Result<bool> {
        self.cached_flag(Capability::Extents, Some(Callback::Extents))
    }

    /// API 1 callbacks take no flags, so the FUA bit would be dropped: an answer above
    /// EMULATE is capped there (before the range check, as nbdkit does), and the server
    /// flushes after the write instead. Without `can_fua`, nbdkit emulates FUA whenever
    /// there is a flush callback, even if `can_flush` says false.
    pub fn can_fua(&self) -> Result<Support> {
        self.0
            .answers()
            .support(Capability::Fua, || self.fua_answer())
    }

    fn fua_answer(&self) -> Result<Support> {
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
        self.cached_flag(Capability::MultiConn, None)
    }

    pub fn can_cache(&self) -> Result<Support> {
        self.0.answers().support(Capability::Cache, || {
            match self.0.level(Capability::Cache)? {
                Some(value) => self.support(Capability::Cache, value),
                None if self.0.defines(Callback::Cache)? => Ok(Support::Native),
                None => Ok(Support::None),
            }
        })
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
        answers: CapCache,
        /// Every flag/level question that reached the plugin.
        asked: Mutex<Vec<Capability>>,
    }

    impl Fake {
        /// This fake with its kept answers forgotten, for a test that changed its answers.
        fn fresh(&mut self) -> &Fake {
            self.answers = CapCache::default();
            self
        }

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
                answers: CapCache::default(),
                asked: Mutex::new(Vec::new()),
            }
        }
    }

    impl ForeignAnswers for Fake {
        fn flag(&self, cap: Capability) -> Result<Option<bool>> {
            self.asked.lock().unwrap().push(cap);
            Ok(self.flags.iter().find(|(c, _)| *c == cap).map(|(_, v)| *v))
        }
        fn level(&self, cap: Capability) -> Result<Option<i64>> {
            self.asked.lock().unwrap().push(cap);
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
        fn answers(&self) -> &CapCache {
            &self.answers
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
            assert_eq!(Ladder(p.fresh()).can_fua().unwrap(), expected, "{answer}");
        }
        p.levels = vec![(Capability::Fua, -2)];
        assert_eq!(
            Ladder(p.fresh()).can_fua().unwrap_err().message,
            "can_fua: -2"
        );
        p.api_version = 2;
        p.levels = vec![(Capability::Fua, 2)];
        assert_eq!(Ladder(p.fresh()).can_fua().unwrap(), Support::Native);
        p.levels = vec![(Capability::Fua, 7), (Capability::Cache, 3)];
        assert_eq!(
            Ladder(p.fresh()).can_fua().unwrap_err().message,
            "can_fua: 7"
        );
        assert_eq!(
            Ladder(p.fresh()).can_cache().unwrap_err().message,
            "can_cache: 3"
        );
    }

    #[test]
    fn ladder_fast_zero_core_rule_offers_it_only_when_zero_cannot_write() {
        let mut p = Fake::c(&ALL);
        assert!(!Ladder(p.fresh()).can_fast_zero().unwrap());
        p.fast_zero = FastZeroDefault::Core {
            v2_zero: true,
            readonly: true,
        };
        assert!(Ladder(p.fresh()).can_fast_zero().unwrap());
        p.fast_zero = FastZeroDefault::Core {
            v2_zero: true,
            readonly: false,
        };
        p.flags = vec![(Capability::Write, false)];
        assert!(Ladder(p.fresh()).can_fast_zero().unwrap());
        // A v1 zero callback cannot take FAST_ZERO: offered, and failed at once.
        p.flags.clear();
        p.fast_zero = FastZeroDefault::Core {
            v2_zero: false,
            readonly: false,
        };
        assert!(Ladder(p.fresh()).can_fast_zero().unwrap());
    }

    #[test]
    fn ladder_fast_zero_python_rule_is_not_can_zero() {
        let mut p = Fake::c(&ALL);
        p.fast_zero = FastZeroDefault::NotCanZero;
        assert!(!Ladder(p.fresh()).can_fast_zero().unwrap());
        p.flags = vec![(Capability::Zero, false)];
        assert!(Ladder(p.fresh()).can_fast_zero().unwrap());
        p.flags.clear();
        p.callbacks.retain(|c| *c != Callback::Zero);
        assert!(Ladder(p.fresh()).can_fast_zero().unwrap());
    }

    #[test]
    fn ladder_asks_each_capability_of_a_handle_once() {
        let mut p = Fake::c(&ALL);
        p.fast_zero = FastZeroDefault::NotCanZero;
        p.flags = vec![(Capability::Zero, true), (Capability::Write, true)];
        p.levels = vec![(Capability::Fua, 2), (Capability::Cache, 1)];
        let first = offered(&p);
        assert_eq!(offered(&p), first);
        assert!(!Ladder(&p).can_fast_zero().unwrap());
        let asked = p.asked.lock().unwrap().clone();
        assert_eq!(asked.len(), Capability::COUNT, "{asked:?}");
        for cap in &asked {
            let times = asked.iter().filter(|c| *c == cap).count();
            assert_eq!(times, 1, "{cap:?} reached the plugin {times} times");
        }
    }

    #[test]
    fn ladder_asks_again_after_a_failed_answer() {
        let mut p = Fake::c(&ALL);
        p.levels = vec![(Capability::Fua, 7)];
        assert!(Ladder(&p).can_fua().is_err());
        p.levels = vec![(Capability::Fua, 2)];
        assert_eq!(Ladder(&p).can_fua().unwrap(), Support::Native);
        assert_eq!(Ladder(&p).can_fua().unwrap(), Support::Native);
        let fua = p
            .asked
            .lock()
            .unwrap()
            .iter()
            .filter(|c| **c == Capability::Fua)
            .count();
        assert_eq!(fua, 2);
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
