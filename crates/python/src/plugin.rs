//! Loading a script and running its startup lifecycle; the [`Plugin`] side of the host.
//!
//! The sequence is nbdkit's (`plugins/python/plugin.c`, `server/main.c`): the script runs
//! (that is nbdkit's `script=` parameter), `open`, `get_size` and `pread` must exist,
//! `API_VERSION` (default 1) must be 1 or 2, then `config(key, value)` per parameter,
//! `config_complete()`, `thread_model()` (default SERIALIZE_ALL_REQUESTS), `get_ready()` and
//! `after_fork()` (which a forking server runs after the fork: see [`load_before_fork`]).
//! Where nbdkit would exit, [`load`] returns a [`LoadError`] naming the script
//! and, for Python errors, the line.
//!
//! A loaded script is an `Arc<Shared>` held by the [`PythonPlugin`] and by each open handle;
//! the last owner calls `cleanup()` (if startup completed) and drops the module under the GIL.
//! Callbacks are looked up by name on every call, as nbdkit does, so a script may define or
//! replace them at run time; a name that is absent or not callable counts as not defined.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyModule, PyTuple};
use sluice_block::plugins::ConfigArg;
use sluice_block::{
    BlockError, Errno, ExportEntry, Handle, OpenContext, Plugin, Result, ThreadModel,
};

use crate::context::{self, Connection, Frame, Scope};
use crate::error::LoadError;
use crate::handle::PythonHandle;
use crate::interp::{self, Failure};

/// The highest `API_VERSION` this host accepts, printed by `--dump-plugin` as nbdkit does.
pub const MAX_API_VERSION: i64 = 2;

/// nbdkit's `PYTHON_ABI_VERSION` line of `--dump-plugin` (PEP 384's stable ABI version).
const PYTHON_ABI_VERSION: u32 = 3;

/// Finds the script in the command-line parameters: the first one, either bare
/// (`sluice serve python ./plugin.py size=1G`) or `script=PATH`, as nbdkit's python plugin
/// takes it. Returns the script and the remaining parameters, for [`load`].
pub fn split_script(args: &[ConfigArg]) -> Result<(PathBuf, &[ConfigArg]), LoadError> {
    match args.split_first() {
        Some((first, rest)) if first.key.is_none() || first.key.as_deref() == Some("script") => {
            Ok((PathBuf::from(&first.value), rest))
        }
        _ => Err(LoadError::NoScript),
    }
}

/// Loads the nbdkit Python plugin `script` and runs its whole startup with `args` (the
/// parameters after the script, each given to the script's `config(key, value)`), up to and
/// including `after_fork()`. For a server that forks into the background after loading, use
/// [`load_before_fork`] instead.
pub fn load(script: &Path, args: &[ConfigArg]) -> Result<Arc<dyn Plugin>, LoadError> {
    let plugin = load_before_fork(script, args)?;
    plugin.after_fork()?;
    Ok(plugin)
}

/// [`load`] up to and including `get_ready()`; call [`PythonPlugin::after_fork`] in the
/// process that will serve, after forking. nbdkit runs `after_fork()` in the daemon, and
/// scripts start their background threads there: threads started before a `fork(2)` would
/// not exist in the child (and a thread holding the GIL at the fork would deadlock it). With
/// no Python thread running, forking an initialised interpreter is safe.
pub fn load_before_fork(script: &Path, args: &[ConfigArg]) -> Result<Arc<PythonPlugin>, LoadError> {
    let mut shared = register(script)?;
    shared.configure(args)?;
    shared.lifecycle("config_complete")?;
    shared.thread_model = shared.script_thread_model()?;
    shared.lifecycle("get_ready")?;
    shared.ready.store(true, Ordering::Release);
    tracing::debug!(
        "loaded python plugin {}, API_VERSION={}, thread_model={}",
        script.display(),
        shared.api_version,
        shared.thread_model.as_str()
    );
    Ok(Arc::new(PythonPlugin {
        shared: Arc::new(shared),
        forked: AtomicBool::new(false),
    }))
}

/// nbdkit's `--dump-plugin` for the python plugin: the standard lines, the Python version
/// and the highest API version, then what the script's own `dump_plugin()` prints. With a
/// script, it is run and configured (not `config_complete`, as nbdkit) first.
pub fn dump_plugin(script: Option<&Path>, args: &[ConfigArg]) -> Result<String, LoadError> {
    interp::ensure()?;
    let mut out = String::new();
    let shared = match script {
        Some(path) => {
            let mut shared = register(path)?;
            shared.configure(args)?;
            shared.thread_model = shared.script_thread_model()?;
            let shown = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
            out += &format!("path={}\n", shown.display());
            Some(shared)
        }
        None => None,
    };
    let thread_model = shared
        .as_ref()
        .map_or(ThreadModel::SerializeAllRequests, |s| s.thread_model);
    out += "name=python\n";
    out += &format!("version={}\n", env!("CARGO_PKG_VERSION"));
    out += "api_version=2\n";
    out += "max_thread_model=parallel\n";
    out += &format!("thread_model={}\n", thread_model.as_str());
    out += "errno_is_preserved=0\n";
    for line in python_lines() {
        out += &line;
        out.push('\n');
    }
    if let Some(shared) = &shared {
        out += &shared.run_dump_plugin()?;
    }
    Ok(out)
}

/// The `python_version=`, `python_pep_384_abi_version=` and
/// `nbdkit_python_maximum_api_version=` lines.
fn python_lines() -> Vec<String> {
    let version = interp::python_version();
    vec![
        format!("python_version={version}"),
        format!("python_pep_384_abi_version={PYTHON_ABI_VERSION}"),
        format!("nbdkit_python_maximum_api_version={MAX_API_VERSION}"),
    ]
}

/// Runs the script and checks what nbdkit checks before configuration.
fn register(path: &Path) -> Result<Shared, LoadError> {
    interp::ensure()?;
    // Read with the GIL released: the file may be on a slow disk.
    let source = std::fs::read(path).map_err(|source| LoadError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let display = path.to_string_lossy().into_owned();
    let (module, api_version) = interp::attach(|py| -> Result<_, LoadError> {
        let _scope = Scope::enter(Frame::default());
        let module = interp::run_script(py, path, &source)?;
        for callback in ["open", "get_size", "pread"] {
            if function(&module, callback).ok().flatten().is_none() {
                return Err(LoadError::MissingCallback {
                    path: path.to_path_buf(),
                    callback,
                });
            }
        }
        let api_version = match module.getattr_opt("API_VERSION") {
            Ok(None) => 1,
            Ok(Some(v)) => match v.extract::<i64>() {
                Ok(n @ 1..=MAX_API_VERSION) => n as u32,
                _ => {
                    let shown = v
                        .repr()
                        .map(|r| r.to_string())
                        .unwrap_or_else(|_| "?".into());
                    return Err(LoadError::Incompatible {
                        path: path.to_path_buf(),
                        api_version: shown,
                    });
                }
            },
            Err(e) => {
                return Err(LoadError::Interpreter {
                    message: e.to_string(),
                })
            }
        };
        Ok((module.unbind(), api_version))
    })?;
    Ok(Shared {
        path: path.to_path_buf(),
        display,
        module: Some(module),
        api_version,
        thread_model: ThreadModel::SerializeAllRequests,
        ready: AtomicBool::new(false),
    })
}

/// The callable `name` of `module`, or None if it is absent or not callable (nbdkit's
/// `callback_defined`).
pub(crate) fn function<'py>(
    module: &Bound<'py, PyModule>,
    name: &str,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    Ok(module.getattr_opt(name)?.filter(|f| f.is_callable()))
}

/// A loaded script; shared by the [`PythonPlugin`] and its handles.
pub(crate) struct Shared {
    pub(crate) path: PathBuf,
    /// The path as code objects and messages spell it.
    pub(crate) display: String,
    /// The script's `__main__` module; `None` only during `Drop`.
    module: Option<Py<PyModule>>,
    /// 1 or 2.
    pub(crate) api_version: u32,
    pub(crate) thread_model: ThreadModel,
    /// Startup completed (`get_ready` ran): `cleanup()` is due at the end.
    ready: AtomicBool,
}

impl Shared {
    pub(crate) fn module<'py>(&self, py: Python<'py>) -> &Bound<'py, PyModule> {
        self.module
            .as_ref()
            .expect("the module lives until Drop")
            .bind(py)
    }

    /// Calls into the script with the GIL held and `frame` installed, for a request or a
    /// query. A Python exception becomes a [`BlockError`] whose errno is the script's
    /// `nbdkit.set_error` value, or EIO; its traceback is logged once, after the GIL is
    /// released.
    pub(crate) fn call<R>(
        &self,
        op: &'static str,
        frame: Frame,
        body: impl for<'py> FnOnce(Python<'py>, &Bound<'py, PyModule>) -> PyResult<R>,
    ) -> Result<R> {
        let _scope = Scope::enter(frame);
        let r = interp::attach(|py| {
            body(py, self.module(py)).map_err(|e| interp::describe(py, &e, &self.display))
        });
        r.map_err(|f| self.request_error(op, f))
    }

    fn request_error(&self, op: &str, f: Failure) -> BlockError {
        let set = context::error_set();
        let errno = if set != 0 { set } else { libc::EIO };
        tracing::error!("{}: {op}: {}", self.display, f.traceback);
        BlockError::new(
            Errno(errno),
            format!("{}: {op}: {}", self.display, f.summary),
        )
    }

    /// Calls a lifecycle function if the script defines it, with `args`.
    fn lifecycle_call(
        &self,
        callback: &'static str,
        args: impl for<'py> FnOnce(Python<'py>) -> PyResult<Bound<'py, PyTuple>>,
    ) -> Result<Option<Py<PyAny>>, LoadError> {
        let _scope = Scope::enter(Frame::default());
        interp::attach(|py| {
            let run = || -> PyResult<Option<Py<PyAny>>> {
                let Some(f) = function(self.module(py), callback)? else {
                    return Ok(None);
                };
                Ok(Some(f.call1(args(py)?)?.unbind()))
            };
            run().map_err(|e| {
                let f = interp::describe(py, &e, &self.display);
                self.lifecycle_error(callback, f)
            })
        })
    }

    fn lifecycle_error(&self, callback: &'static str, f: Failure) -> LoadError {
        tracing::error!("{}: {callback}: {}", self.display, f.traceback);
        LoadError::Callback {
            path: self.path.clone(),
            line: f.line,
            callback,
            message: f.summary,
        }
    }

    fn lifecycle(&self, callback: &'static str) -> Result<(), LoadError> {
        self.lifecycle_call(callback, |py| Ok(PyTuple::empty(py)))
            .map(drop)
    }

    /// `config(key, value)` per parameter, as nbdkit's python plugin passes them.
    fn configure(&mut self, args: &[ConfigArg]) -> Result<(), LoadError> {
        for arg in args {
            let Some(key) = &arg.key else {
                return Err(LoadError::BareParameter {
                    path: self.path.clone(),
                    value: arg.value.clone(),
                });
            };
            let has_config =
                interp::attach(|py| function(self.module(py), "config").ok().flatten().is_some());
            if !has_config {
                return Err(LoadError::NoConfig {
                    path: self.path.clone(),
                    param: format!("{key}={}", arg.value),
                });
            }
            tracing::debug!("python: config key={key}, value={}", arg.value);
            self.lifecycle_call("config", |py| {
                PyTuple::new(py, [key.as_str(), arg.value.as_str()])
            })?;
        }
        Ok(())
    }

    /// `thread_model()`, or SERIALIZE_ALL_REQUESTS if the script has none.
    fn script_thread_model(&self) -> Result<ThreadModel, LoadError> {
        let Some(r) = self.lifecycle_call("thread_model", |py| Ok(PyTuple::empty(py)))? else {
            return Ok(ThreadModel::SerializeAllRequests);
        };
        interp::attach(|py| {
            let r = r.bind(py);
            r.extract::<i32>()
                .ok()
                .and_then(ThreadModel::from_i32)
                .ok_or_else(|| LoadError::ThreadModel {
                    path: self.path.clone(),
                    model: r
                        .repr()
                        .map(|s| s.to_string())
                        .unwrap_or_else(|_| "?".into()),
                })
        })
    }

    /// Runs the script's `dump_plugin()`, returning what it printed.
    fn run_dump_plugin(&self) -> Result<String, LoadError> {
        let _scope = Scope::enter(Frame::default());
        interp::attach(|py| {
            let run = || -> PyResult<String> {
                let Some(f) = function(self.module(py), "dump_plugin")? else {
                    return Ok(String::new());
                };
                let sys = py.import("sys")?;
                let buf = py.import("io")?.getattr("StringIO")?.call0()?;
                let saved = sys.getattr("stdout")?;
                sys.setattr("stdout", &buf)?;
                let r = f.call0();
                sys.setattr("stdout", saved)?;
                r?;
                buf.call_method0("getvalue")?.extract()
            };
            run().map_err(|e| {
                let f = interp::describe(py, &e, &self.display);
                self.lifecycle_error("dump_plugin", f)
            })
        })
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let module = self.module.take();
        let ready = self.ready.load(Ordering::Acquire);
        let _scope = Scope::enter(Frame::default());
        // try_attach: never panic in Drop, even if the interpreter is going away.
        let _ = Python::try_attach(|py| {
            if let Some(m) = &module {
                if ready {
                    if let Ok(Some(cleanup)) = function(m.bind(py), "cleanup") {
                        tracing::debug!("{}: cleanup", self.display);
                        if let Err(e) = cleanup.call0() {
                            let f = interp::describe(py, &e, &self.display);
                            tracing::error!("{}: cleanup: {}", self.display, f.traceback);
                        }
                    }
                }
            }
            drop(module);
        });
    }
}

/// An nbdkit Python plugin script, loaded and started, as a sluice [`Plugin`].
pub struct PythonPlugin {
    shared: Arc<Shared>,
    /// `after_fork()` ran.
    forked: AtomicBool,
}

impl std::fmt::Debug for PythonPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PythonPlugin")
            .field("script", &self.shared.path)
            .field("api_version", &self.shared.api_version)
            .finish_non_exhaustive()
    }
}

impl PythonPlugin {
    /// The script's path, as given.
    pub fn script(&self) -> &Path {
        &self.shared.path
    }

    /// The script's `API_VERSION`: 1 or 2.
    pub fn api_version(&self) -> u32 {
        self.shared.api_version
    }

    /// Runs the script's `after_fork()` (once; later calls do nothing). [`load`] calls it;
    /// after [`load_before_fork`], the server calls it once it has forked.
    pub fn after_fork(&self) -> Result<(), LoadError> {
        if self.forked.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.shared.lifecycle("after_fork")
    }

    fn call<R>(
        &self,
        op: &'static str,
        is_tls: Option<bool>,
        body: impl for<'py> FnOnce(Python<'py>, &Bound<'py, PyModule>) -> PyResult<R>,
    ) -> Result<R> {
        self.shared.call(op, Frame::for_plugin(is_tls), body)
    }
}

impl Plugin for PythonPlugin {
    fn name(&self) -> &str {
        "python"
    }

    fn with_connection(&self, info: &sluice_block::ConnectionInfo, f: &mut dyn FnMut()) {
        let conn = Connection::new(info.clone());
        context::with_conn(&conn, f);
        conn.mark_closed();
    }

    fn version(&self) -> Option<&str> {
        Some(env!("CARGO_PKG_VERSION"))
    }

    fn thread_model(&self) -> ThreadModel {
        self.shared.thread_model
    }

    fn may_block(&self) -> bool {
        true
    }

    /// nbdkit calls a plugin's pread for every read; foreign code may count or log them.
    fn must_see_every_read(&self) -> bool {
        true
    }

    fn preconnect(&self, readonly: bool) -> Result<()> {
        self.call("preconnect", None, |_, m| {
            if let Some(f) = function(m, "preconnect")? {
                f.call1((readonly,))?;
            }
            Ok(())
        })
    }

    fn default_export(&self, readonly: bool, is_tls: bool) -> Result<String> {
        self.call("default_export", Some(is_tls), |_, m| {
            match function(m, "default_export")? {
                Some(f) => f.call1((readonly, is_tls))?.extract::<String>(),
                None => Ok(String::new()),
            }
        })
    }

    fn list_exports(&self, readonly: bool, is_tls: bool) -> Result<Vec<ExportEntry>> {
        let listed = self.call("list_exports", Some(is_tls), |_, m| {
            let Some(f) = function(m, "list_exports")? else {
                return Ok(None);
            };
            let mut out = Vec::new();
            for item in f.call1((readonly, is_tls))?.try_iter()? {
                let item = item?;
                out.push(match item.extract::<String>() {
                    Ok(name) => ExportEntry {
                        name,
                        description: None,
                    },
                    Err(_) => {
                        let (name, desc) = item.extract::<(String, String)>().map_err(|_| {
                            pyo3::exceptions::PyTypeError::new_err(
                                "list_exports method did not return an iterable of strings or (name, description) string 2-tuples",
                            )
                        })?;
                        ExportEntry {
                            name,
                            description: Some(desc),
                        }
                    }
                });
            }
            Ok(Some(out))
        })?;
        match listed {
            Some(list) => Ok(list),
            None => Ok(vec![ExportEntry::default_export(self, readonly, is_tls)?]),
        }
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
        PythonHandle::open(self.shared.clone(), conn, ctx).map(|h| Box::new(h) as Box<dyn Handle>)
    }

    fn dump(&self) -> Vec<String> {
        let mut lines = python_lines();
        match self.shared.run_dump_plugin() {
            Ok(text) => lines.extend(text.lines().map(str::to_owned)),
            Err(e) => tracing::warn!("{e}"),
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_script_takes_first_bare_or_script_key() {
        let args = [ConfigArg::bare("./p.py"), ConfigArg::kv("size", "1M")];
        let (script, rest) = split_script(&args).unwrap();
        assert_eq!(script, Path::new("./p.py"));
        assert_eq!(rest, &args[1..]);
        let args = [ConfigArg::kv("script", "/x.py")];
        assert_eq!(split_script(&args).unwrap().0, Path::new("/x.py"));
        assert!(matches!(
            split_script(&[ConfigArg::kv("size", "1")]),
            Err(LoadError::NoScript)
        ));
        assert!(matches!(split_script(&[]), Err(LoadError::NoScript)));
    }
}
