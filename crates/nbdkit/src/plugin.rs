//! Loading an nbdkit plugin `.so` and running its startup lifecycle; the [`Plugin`] side of
//! the adapter.
//!
//! The sequence is nbdkit's (`server/main.c`, `server/plugins.c`): `dlopen(RTLD_NOW |
//! RTLD_GLOBAL)`, `plugin_init()`, the `_api_version` check, the `_struct_size`-clamped
//! copy into a zeroed struct, the required callbacks, the name rules, debug flags, `.load`,
//! `.config` per parameter (bare values go to `magic_config_key`, or to `script` when it is
//! the first one and there is no magic key), `.config_complete`, the thread model,
//! `.get_ready` and `.after_fork` (sluice never forks, but plugins use it to start their
//! background threads). Where nbdkit would `exit(1)`, [`load`] returns a [`LoadError`] and
//! unwinds what ran: `.unload` and `dlclose`.
//!
//! A loaded plugin is an `Arc<Shared>` held by the [`LoadedPlugin`] and by each open handle,
//! so the library stays mapped while any handle is alive; the last owner runs `.cleanup`
//! (if startup completed), `.unload` and `dlclose`.

use std::ffi::{c_char, c_int, CStr, CString};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
use sluice_block::plugins::ConfigArg;
use sluice_block::{ExportEntry, Handle, OpenContext, Plugin, Result, ThreadModel};

use crate::abi::{NbdkitPlugin, PLUGIN_STRUCT_SIZE};
use crate::api::lists::ExportList;
use crate::context::{
    self, call_error, errno, lock, lossless_cstring, take_last_error, Connection, Frame,
    PluginScope, Scope,
};
use crate::debug_flags::{set_debug_flag, set_server_debug_flag, DebugFlag};
use crate::error::LoadError;
use crate::handle::PluginHandle;

/// Where Debian installs nbdkit's plugins (`nbdkit --dump-config`'s `plugindir`).
pub const NBDKIT_PLUGIN_DIR: &str = "/usr/lib/x86_64-linux-gnu/nbdkit/plugins";

/// Finds a plugin: a value containing `/` or ending in `.so` is a path, used as given;
/// a short name `NAME` is `DIR/nbdkit-NAME-plugin.so` in the first of `plugin_dirs` that has
/// it.
pub fn resolve(name_or_path: &str, plugin_dirs: &[PathBuf]) -> Option<PathBuf> {
    if name_or_path.contains('/') || name_or_path.ends_with(".so") {
        return Some(PathBuf::from(name_or_path));
    }
    if name_or_path.is_empty() {
        return None;
    }
    plugin_dirs
        .iter()
        .map(|dir| dir.join(format!("nbdkit-{name_or_path}-plugin.so")))
        .find(|p| p.is_file())
}

/// Loads and starts the nbdkit plugin at `path` with its parameters.
pub fn load(path: &Path, args: &[ConfigArg]) -> Result<Arc<dyn Plugin>, LoadError> {
    Ok(load_with(path, args, &[])?)
}

/// [`load`], also applying `-D NAME.FLAG=N` debug flags: those named after this plugin set
/// its `NAME_debug_FLAG` variable before `.load` (an error if it has none), `nbdkit.*` ones
/// set sluice's own `nbdkit_debug_*` variables; flags for other names are ignored.
pub fn load_with(
    path: &Path,
    args: &[ConfigArg],
    debug_flags: &[DebugFlag],
) -> Result<Arc<LoadedPlugin>, LoadError> {
    let mut shared = register(path, debug_flags)?;
    shared.configure(args)?;
    shared.call_lifecycle("config_complete", shared.p.config_complete)?;
    shared.scope.set_configured();
    shared.thread_model = shared.effective_thread_model()?;
    shared.call_lifecycle("get_ready", shared.p.get_ready)?;
    shared.call_lifecycle("after_fork", shared.p.after_fork)?;
    shared.ready = true;
    tracing::debug!(
        "loaded nbdkit plugin {} ({}), api_version={}, thread_model={}",
        shared.name,
        path.display(),
        shared.p._api_version,
        shared.thread_model.as_str()
    );
    Ok(Arc::new(LoadedPlugin(Arc::new(shared))))
}

/// nbdkit's `--dump-plugin`: loads the plugin, runs `.config` for each parameter and
/// `.thread_model` (not `.config_complete`, like nbdkit), and returns the `key=value` lines:
/// path, name, version, api_version, struct_size, max_thread_model, thread_model,
/// errno_is_preserved, magic_config_key, `has_FIELD=1` per callback, then whatever the
/// plugin's own `.dump_plugin` prints (captured from its stdout).
pub fn dump_plugin(path: &Path, args: &[ConfigArg]) -> Result<String, LoadError> {
    dump_plugin_with(path, args, &[])
}

/// [`dump_plugin`], also applying `-D NAME.FLAG=N` debug flags first, as [`load_with`] does
/// (`nbdkit -D recorder.verbose=1 --dump-plugin ...` shows the flag to `.dump_plugin`).
pub fn dump_plugin_with(
    path: &Path,
    args: &[ConfigArg],
    debug_flags: &[DebugFlag],
) -> Result<String, LoadError> {
    let mut shared = register(path, debug_flags)?;
    shared.configure(args)?;
    shared.thread_model = shared.effective_thread_model()?;
    let p = &shared.p;
    let mut out = String::new();
    let shown = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    out += &format!("path={}\n", shown.display());
    out += &format!("name={}\n", shared.name);
    if let Some(v) = &shared.version {
        out += &format!("version={v}\n");
    }
    out += &format!("api_version={}\n", p._api_version);
    out += &format!("struct_size={}\n", p._struct_size);
    let max = ThreadModel::from_i32(p._thread_model).map_or("unknown", ThreadModel::as_str);
    out += &format!("max_thread_model={max}\n");
    out += &format!("thread_model={}\n", shared.thread_model.as_str());
    out += &format!(
        "errno_is_preserved={}\n",
        i32::from(p.errno_is_preserved != 0)
    );
    if let Some(key) = cstr_opt(p.magic_config_key) {
        out += &format!("magic_config_key={key}\n");
    }
    for field in p.present_fields() {
        out += &format!("has_{field}=1\n");
    }
    out += &shared.run_dump_plugin()?;
    Ok(out)
}

/// A C string field of the plugin struct, if set.
fn cstr_opt(p: *const c_char) -> Option<String> {
    if p.is_null() {
        None
    } else {
        // SAFETY: the plugin's string fields point to NUL-terminated strings in the loaded
        // library, which outlives every caller of this function.
        Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }
}

/// The part of `register` up to and including `.load`.
fn register(path: &Path, debug_flags: &[DebugFlag]) -> Result<Shared, LoadError> {
    crate::keep_symbols();
    let err_path = || path.to_path_buf();

    // SAFETY: loading a library runs its initialisers. That is the point: the user asked
    // for this plugin, exactly as with nbdkit.
    let lib = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }.map_err(|e| {
        LoadError::Open {
            path: err_path(),
            reason: dl_reason(e),
        }
    })?;
    type InitFn = unsafe extern "C" fn() -> *const NbdkitPlugin;
    // SAFETY: `plugin_init` has this signature in every nbdkit plugin (made by
    // NBDKIT_REGISTER_PLUGIN).
    let init: InitFn =
        *unsafe { lib.get::<InitFn>(b"plugin_init\0") }.map_err(|e| LoadError::NoInit {
            path: err_path(),
            reason: dl_reason(e),
        })?;
    // SAFETY: calling the plugin's registration function, with no arguments, once.
    let theirs = unsafe { init() };
    if theirs.is_null() {
        return Err(LoadError::InitFailed { path: err_path() });
    }
    // The first two fields are in every version of the struct; read them before trusting
    // anything else (a future API may have changed the rest).
    // SAFETY: non-NULL pointer to the plugin's static struct, at least 16 bytes long.
    let (struct_size, api_version) = unsafe { ((*theirs)._struct_size, (*theirs)._api_version) };
    if api_version != 1 && api_version != 2 {
        return Err(LoadError::Incompatible {
            path: err_path(),
            api_version,
        });
    }
    let mut p = NbdkitPlugin::zeroed();
    let n = usize::try_from(struct_size)
        .unwrap_or(usize::MAX)
        .min(PLUGIN_STRUCT_SIZE);
    // SAFETY: the plugin declares its struct `_struct_size` bytes long and we copy no more
    // than that, nor more than ours; the two do not overlap. A partial copy leaves the
    // remaining fields zero (NULL), which is how older plugins are meant to read.
    unsafe {
        std::ptr::copy_nonoverlapping(
            theirs.cast::<u8>(),
            (&mut p as *mut NbdkitPlugin).cast::<u8>(),
            n,
        );
    }
    let missing = |callback| LoadError::MissingCallback {
        path: err_path(),
        callback,
    };
    if p.open.is_none() {
        return Err(missing("open"));
    }
    if p.get_size.is_none() {
        return Err(missing("get_size"));
    }
    if p.pread.is_none() && p._pread_v1.is_none() {
        return Err(missing("pread"));
    }
    let name = check_name(path, p.name)?;

    for f in debug_flags {
        if f.name == name {
            set_debug_flag(path, &lib, &f.name, &f.flag, f.value)?;
        } else if f.name == "nbdkit" && !set_server_debug_flag(&f.flag, f.value) {
            return Err(LoadError::DebugFlag {
                path: err_path(),
                name: f.name.clone(),
                flag: f.flag.clone(),
                symbol: f.symbol(),
            });
        }
    }

    let shared = Shared {
        path: path.to_path_buf(),
        version: cstr_opt(p.version),
        scope: PluginScope::new(name.clone()),
        name,
        p,
        thread_model: ThreadModel::SerializeConnections,
        ready: false,
        config_strings: Vec::new(),
        lib: ManuallyDrop::new(lib),
    };
    tracing::debug!(
        "registered plugin {} (name {})",
        path.display(),
        shared.name
    );
    if let Some(load) = shared.p.load {
        let _scope = Scope::enter(Frame::for_plugin(&shared.scope));
        // SAFETY: the plugin's `.load`, called once, before any other callback but
        // plugin_init, as nbdkit does.
        unsafe { load() };
    }
    Ok(shared)
}

fn dl_reason(e: libloading::Error) -> String {
    match e {
        libloading::Error::DlOpen { desc } | libloading::Error::DlSym { desc } => {
            format!("{desc:?}").trim_matches('"').to_string()
        }
        other => other.to_string(),
    }
}

/// nbdkit's `.name` rules: present, non-empty, ASCII alphanumerics and non-leading dashes.
fn check_name(path: &Path, name: *const c_char) -> Result<String, LoadError> {
    let bad = |problem: String| LoadError::BadName {
        path: path.to_path_buf(),
        problem,
    };
    let Some(name) = cstr_opt(name) else {
        return Err(bad("plugin must have a .name field".into()));
    };
    if name.is_empty() {
        return Err(bad("plugin.name field must not be empty".into()));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(bad(format!(
            "plugin.name ('{name}') field must begin with an ASCII alphanumeric character"
        )));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(bad(format!(
            "plugin.name ('{name}') field must contain only ASCII alphanumeric or dash characters"
        )));
    }
    Ok(name)
}

/// A loaded plugin and its library; shared by the [`LoadedPlugin`] and its handles.
pub(crate) struct Shared {
    pub(crate) path: PathBuf,
    pub(crate) name: String,
    pub(crate) version: Option<String>,
    /// The plugin's struct, copied and clamped at load.
    pub(crate) p: NbdkitPlugin,
    pub(crate) scope: PluginScope,
    /// Effective: `min(_thread_model, .thread_model())`.
    pub(crate) thread_model: ThreadModel,
    /// Startup completed (`.get_ready` ran): `.cleanup` is due at the end.
    ready: bool,
    /// `.config` keys and values, alive until after `.unload` (fields drop after `Drop`).
    config_strings: Vec<CString>,
    /// Closed (dlclose) last, in `Drop`.
    lib: ManuallyDrop<Library>,
}

// SAFETY: `Shared` is immutable after loading. Its raw pointers are the plugin's static
// strings and function pointers, valid while `lib` is loaded (until Drop) and safe to read
// from any thread; whether the *functions* may run concurrently is the thread model's
// business, which the server enforces.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

impl Shared {
    pub(crate) fn errno_is_preserved(&self) -> bool {
        self.p.errno_is_preserved != 0
    }

    fn lifecycle_error(&self, callback: &'static str) -> LoadError {
        LoadError::Callback {
            path: self.path.clone(),
            callback,
            message: take_last_error()
                .unwrap_or_else(|| format!("plugin's .{callback} returned an error")),
        }
    }

    /// Calls an `int (*)(void)` lifecycle callback if present; -1 is an error.
    fn call_lifecycle(
        &self,
        callback: &'static str,
        f: Option<unsafe extern "C" fn() -> c_int>,
    ) -> Result<(), LoadError> {
        let Some(f) = f else { return Ok(()) };
        let _scope = Scope::enter(Frame::for_plugin(&self.scope));
        // SAFETY: a lifecycle callback of the loaded plugin, in nbdkit's order.
        if unsafe { f() } == -1 {
            return Err(self.lifecycle_error(callback));
        }
        Ok(())
    }

    /// Runs `.config` per parameter. The key and value strings are kept until after
    /// `.unload`: nbdkit documents them as valid for the plugin's lifetime (they are its
    /// argv), and plugins such as data and eval keep the pointers without copying.
    fn configure(&mut self, args: &[ConfigArg]) -> Result<(), LoadError> {
        let magic = cstr_opt(self.p.magic_config_key);
        for (i, arg) in args.iter().enumerate() {
            let key = match (&arg.key, &magic) {
                (Some(k), _) => k.clone(),
                (None, Some(m)) => m.clone(),
                (None, None) if i == 0 => "script".to_string(),
                (None, None) => {
                    return Err(LoadError::BareParameter {
                        path: self.path.clone(),
                        value: arg.value.clone(),
                    })
                }
            };
            let Some(config) = self.p.config else {
                return Err(LoadError::NoConfig {
                    path: self.path.clone(),
                    param: format!("{key}={}", arg.value),
                });
            };
            let nul = |what: String| LoadError::Nul {
                path: self.path.clone(),
                what,
            };
            let ckey = CString::new(key.as_str()).map_err(|_| nul(format!("key {key:?}")))?;
            let cvalue =
                CString::new(arg.value.as_str()).map_err(|_| nul(format!("value of {key}")))?;
            tracing::debug!("{}: config key={key}, value={}", self.name, arg.value);
            let scope = Scope::enter(Frame::for_plugin(&self.scope));
            // SAFETY: `.config` with two valid C strings, kept alive until after `.unload`.
            let r = unsafe { config(ckey.as_ptr(), cvalue.as_ptr()) };
            // Taken inside the call's scope: its end would log the message instead.
            let failed = (r == -1).then(|| self.lifecycle_error("config"));
            drop(scope);
            self.config_strings.push(ckey);
            self.config_strings.push(cvalue);
            if let Some(e) = failed {
                return Err(e);
            }
        }
        Ok(())
    }

    fn effective_thread_model(&self) -> Result<ThreadModel, LoadError> {
        let bad = |model| LoadError::ThreadModel {
            path: self.path.clone(),
            model,
        };
        let declared = self.p._thread_model;
        let mut model = ThreadModel::from_i32(declared).ok_or_else(|| bad(declared))?;
        if let Some(f) = self.p.thread_model {
            let _scope = Scope::enter(Frame::for_plugin(&self.scope));
            // SAFETY: `.thread_model`, after configuration, as nbdkit calls it.
            let r = unsafe { f() };
            if r == -1 {
                return Err(self.lifecycle_error("thread_model"));
            }
            let theirs = ThreadModel::from_i32(r).ok_or_else(|| bad(r))?;
            model = model.min(theirs);
        }
        Ok(model)
    }

    /// Runs `.dump_plugin`, returning what it printed on stdout.
    fn run_dump_plugin(&self) -> Result<String, LoadError> {
        let Some(f) = self.p.dump_plugin else {
            return Ok(String::new());
        };
        capture_stdout(|| {
            let _scope = Scope::enter(Frame::for_plugin(&self.scope));
            // SAFETY: the plugin's `.dump_plugin`, which prints to stdout.
            unsafe { f() };
        })
        .map_err(|source| LoadError::Dump {
            path: self.path.clone(),
            source,
        })
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        {
            let _scope = Scope::enter(Frame::for_plugin(&self.scope));
            if self.ready {
                if let Some(cleanup) = self.p.cleanup {
                    tracing::debug!("{}: cleanup", self.name);
                    // SAFETY: `.cleanup` once, after the last handle closed (we are the
                    // last owner) and before `.unload`.
                    unsafe { cleanup() };
                }
            }
            if let Some(unload) = self.p.unload {
                tracing::debug!("{}: unload", self.name);
                // SAFETY: `.unload` once, last, since `.load` ran.
                unsafe { unload() };
            }
        }
        // SAFETY: no plugin code or pointer into the library is used after this point:
        // handles hold an Arc to us, so none are left, and `p` is not read again.
        unsafe { ManuallyDrop::drop(&mut self.lib) };
    }
}

/// Runs `f` with file descriptor 1 redirected to an anonymous file, and returns what was
/// written (by C stdio, by Rust, by child processes). Process-wide, so serialised.
fn capture_stdout(f: impl FnOnce()) -> std::io::Result<String> {
    static CAPTURE: Mutex<()> = Mutex::new(());
    let _guard = lock(&CAPTURE);
    std::io::stdout().flush()?;
    // SAFETY: fflush(NULL) flushes every C stdio output stream; no pointers involved.
    unsafe { libc::fflush(std::ptr::null_mut()) };
    // SAFETY: memfd_create with a valid name; the result is checked.
    let memfd = unsafe { libc::memfd_create(c"sluice-dump-plugin".as_ptr(), libc::MFD_CLOEXEC) };
    if memfd == -1 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: we own the new descriptor; the File closes it.
    let mut file = unsafe { File::from_raw_fd(memfd) };
    // SAFETY: dup of fd 1; checked.
    let saved = unsafe { libc::dup(1) };
    if saved == -1 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are open; fd 1 now refers to the memfd.
    if unsafe { libc::dup2(memfd, 1) } == -1 {
        let e = std::io::Error::last_os_error();
        // SAFETY: closing our own duplicate.
        unsafe { libc::close(saved) };
        return Err(e);
    }
    f();
    // SAFETY: as above; then put the original stdout back and drop our duplicate.
    unsafe {
        libc::fflush(std::ptr::null_mut());
        libc::dup2(saved, 1);
        libc::close(saved);
    }
    file.rewind()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// An nbdkit C plugin, loaded and started, as a sluice [`Plugin`].
pub struct LoadedPlugin(pub(crate) Arc<Shared>);

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("name", &self.0.name)
            .field("path", &self.0.path)
            .finish_non_exhaustive()
    }
}

impl LoadedPlugin {
    /// The path it was loaded from, as given.
    pub fn path(&self) -> &Path {
        &self.0.path
    }

    /// 1 or 2.
    pub fn api_version(&self) -> i32 {
        self.0.p._api_version
    }

    /// The key that bare parameters are given to.
    pub fn magic_config_key(&self) -> Option<String> {
        cstr_opt(self.0.p.magic_config_key)
    }

    /// nbdkit's `--help PLUGIN` text: name, long name, path, description, config help.
    pub fn usage(&self) -> String {
        let p = &self.0.p;
        let mut out = format!("plugin: {}", self.0.name);
        if let Some(long) = cstr_opt(p.longname) {
            out += &format!(" ({long})");
        }
        out += &format!("\n({})\n", self.0.path.display());
        for text in [cstr_opt(p.description), cstr_opt(p.config_help)]
            .into_iter()
            .flatten()
        {
            out += &text;
            if !text.ends_with('\n') {
                out.push('\n');
            }
        }
        out
    }

    fn scope(&self) -> Scope {
        Scope::enter(Frame::for_plugin(&self.0.scope))
    }

    fn scope_tls(&self, is_tls: bool) -> Scope {
        Scope::enter(Frame {
            is_tls,
            ..Frame::for_plugin(&self.0.scope)
        })
    }
}

impl Plugin for LoadedPlugin {
    fn name(&self) -> &str {
        &self.0.name
    }

    fn with_connection(&self, info: &sluice_block::ConnectionInfo, f: &mut dyn FnMut()) {
        let conn = Connection::new(info.clone());
        context::with_conn(&conn, f);
        conn.mark_closed();
    }

    fn version(&self) -> Option<&str> {
        self.0.version.as_deref()
    }

    fn thread_model(&self) -> ThreadModel {
        self.0.thread_model
    }

    fn may_block(&self) -> bool {
        true
    }

    /// nbdkit calls a plugin's pread for every read; foreign code may count or log them.
    fn must_see_every_read(&self) -> bool {
        true
    }

    fn preconnect(&self, readonly: bool) -> Result<()> {
        let Some(f) = self.0.p.preconnect else {
            return Ok(());
        };
        let _scope = self.scope();
        // SAFETY: `.preconnect` of the loaded plugin.
        if unsafe { f(c_int::from(readonly)) } == -1 {
            let e = errno();
            return Err(call_error("preconnect", self.0.errno_is_preserved(), e));
        }
        Ok(())
    }

    fn default_export(&self, readonly: bool, is_tls: bool) -> Result<String> {
        let Some(f) = self.0.p.default_export else {
            return Ok(String::new());
        };
        let _scope = self.scope_tls(is_tls);
        // SAFETY: `.default_export` of the loaded plugin.
        let r = unsafe { f(c_int::from(readonly), c_int::from(is_tls)) };
        if r.is_null() {
            let e = errno();
            return Err(call_error("default_export", self.0.errno_is_preserved(), e));
        }
        // SAFETY: the plugin returns a C string valid at least until the next call on this
        // connection (a literal or an interned copy); we copy it at once.
        Ok(unsafe { CStr::from_ptr(r) }.to_string_lossy().into_owned())
    }

    fn list_exports(&self, readonly: bool, is_tls: bool) -> Result<Vec<ExportEntry>> {
        let Some(f) = self.0.p.list_exports else {
            return Ok(vec![ExportEntry::default_export(self, readonly, is_tls)?]);
        };
        let mut list = ExportList::default();
        {
            let _scope = self.scope_tls(is_tls);
            // SAFETY: `.list_exports` with a live list that nothing else touches meanwhile.
            if unsafe { f(c_int::from(readonly), c_int::from(is_tls), list.as_opaque()) } == -1 {
                let e = errno();
                return Err(call_error("list_exports", self.0.errno_is_preserved(), e));
            }
        }
        let mut out: Vec<ExportEntry> = list
            .entries
            .iter()
            .map(|(name, desc)| ExportEntry {
                name: name.to_string_lossy().into_owned(),
                description: desc.as_ref().map(|d| d.to_string_lossy().into_owned()),
            })
            .collect();
        if list.use_default {
            out.push(ExportEntry::default_export(self, readonly, is_tls)?);
        }
        Ok(out)
    }

    fn open(&self, ctx: &OpenContext<'_>) -> Result<Box<dyn Handle>> {
        // Outside any `with_conn` (a direct caller, not the server): a connection of the
        // handle's own. Its export name stays "": the handle's frames carry `ctx`'s.
        let conn = context::current_connection().unwrap_or_else(|| {
            Connection::new(sluice_block::ConnectionInfo {
                is_tls: ctx.is_tls,
                ..Default::default()
            })
        });
        let export_name = conn
            .shared()
            .intern(lossless_cstring(ctx.export_name.as_bytes()));
        PluginHandle::open(self.0.clone(), conn, export_name, ctx.is_tls, ctx.readonly)
            .map(|h| Box::new(h) as Box<dyn Handle>)
    }

    fn dump(&self) -> Vec<String> {
        match self.0.run_dump_plugin() {
            Ok(text) => text.lines().map(str::to_string).collect(),
            Err(e) => {
                tracing::warn!("{e}");
                Vec::new()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_short_name_in_dirs() {
        let dirs = [
            PathBuf::from("/nonexistent"),
            PathBuf::from(NBDKIT_PLUGIN_DIR),
        ];
        let want = Path::new(NBDKIT_PLUGIN_DIR).join("nbdkit-memory-plugin.so");
        if want.exists() {
            assert_eq!(resolve("memory", &dirs), Some(want));
        }
        assert_eq!(resolve("no-such-plugin", &dirs), None);
    }

    #[test]
    fn resolve_path_is_used_as_given() {
        assert_eq!(resolve("./x.so", &[]), Some(PathBuf::from("./x.so")));
        assert_eq!(resolve("a/b", &[]), Some(PathBuf::from("a/b")));
        assert_eq!(resolve("plug.so", &[]), Some(PathBuf::from("plug.so")));
    }

    #[test]
    fn check_name_rules() {
        let p = Path::new("x.so");
        assert!(check_name(p, c"memory".as_ptr()).is_ok());
        assert!(check_name(p, c"sparse-random".as_ptr()).is_ok());
        assert!(check_name(p, std::ptr::null()).is_err());
        assert!(check_name(p, c"".as_ptr()).is_err());
        assert!(check_name(p, c"-x".as_ptr()).is_err());
        assert!(check_name(p, c"a_b".as_ptr()).is_err());
    }
}
