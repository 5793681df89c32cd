//! The embedded CPython interpreter: starting it once per process, running a script as
//! `__main__`, and turning Python exceptions into one-line messages plus a traceback.
//!
//! There is one interpreter per process (CPython's extension modules do not support more),
//! started on first use with `Py_InitializeEx(0)`, so Python installs no signal handlers and
//! the server keeps SIGINT/SIGTERM. The GIL is released as soon as it is started: from then on
//! every entry into Python takes it with [`attach`] on the calling thread (nbdkit's
//! `PyGILState_Ensure` per callback) and gives it back when the call returns.
//!
//! Unlike nbdkit, [`attach`] keeps the calling thread's Python thread state from one call to
//! the next. `PyGILState_Ensure` on a thread with none creates one and the matching release
//! deletes it, so a callback per request cost a thread state's creation and deletion each time:
//! an `mmap` and `munmap` of its 16 KiB frame stack and a `gettid` (strace under fio at QD32:
//! one of each per request, in sluice and in nbdkit alike). [`attach`] first takes one
//! `PyGILState_Ensure` for the thread's lifetime and releases the GIL at once, so later
//! `Ensure`s only take the GIL; the thread state goes when the thread exits. sluice never
//! finalizes the interpreter, so it is still there whenever such a thread ends.
//!
//! Each loaded script gets a *fresh* module object named `__main__`, which is also put in
//! `sys.modules["__main__"]` while (and after) its top level runs, so the script sees
//! `__name__ == "__main__"` and `import __main__` works, as under nbdkit. A fresh module rather
//! than the interpreter's own `__main__` lets several scripts be loaded in one process (tests,
//! or one day several exports) without overwriting each other's functions and globals.

use std::cell::RefCell;
use std::path::Path;
use std::sync::OnceLock;

use pyo3::exceptions::PySyntaxError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyModule};

use crate::error::LoadError;

/// Starts the interpreter and registers the `nbdkit` module, once per process.
pub(crate) fn ensure() -> Result<(), LoadError> {
    static INIT: OnceLock<Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| {
        Python::initialize();
        Python::attach(|py| {
            let register = || -> PyResult<()> {
                let m = crate::module::create(py)?;
                py.import("sys")?
                    .getattr("modules")?
                    .set_item("nbdkit", m)?;
                Ok(())
            };
            register().map_err(|e| format!("cannot create the nbdkit module: {e}"))
        })
    })
    .clone()
    .map_err(|message| LoadError::Interpreter { message })
}

/// Runs `f` with the GIL held on this thread, keeping the thread's Python thread state for
/// its next call (the module doc says why). For every entry into Python after [`ensure`].
pub(crate) fn attach<R>(f: impl for<'py> FnOnce(Python<'py>) -> R) -> R {
    KEPT.with(|kept| {
        let mut kept = kept.borrow_mut();
        if kept.is_none() {
            *kept = KeptState::take();
        }
    });
    Python::attach(f)
}

thread_local! {
    static KEPT: RefCell<Option<KeptState>> = const { RefCell::new(None) };
}

/// One `PyGILState_Ensure` held for a thread's lifetime, the GIL itself released.
struct KeptState {
    gil: ffi::PyGILState_STATE,
    saved: *mut ffi::PyThreadState,
}

impl KeptState {
    /// None while this thread holds the GIL (inside a call: keeping a state there would
    /// release the caller's GIL) or before the interpreter runs.
    fn take() -> Option<KeptState> {
        // SAFETY: plain queries of the interpreter's state.
        let usable = unsafe { ffi::Py_IsInitialized() != 0 && ffi::PyGILState_Check() == 0 };
        if !usable {
            return None;
        }
        // SAFETY: the interpreter runs and this thread does not hold the GIL: Ensure creates
        // (or finds) its thread state and takes the GIL, SaveThread gives the GIL back and
        // leaves the state with a count of one, so later Ensure/Release pairs keep it.
        unsafe {
            let gil = ffi::PyGILState_Ensure();
            let saved = ffi::PyEval_SaveThread();
            Some(KeptState { gil, saved })
        }
    }
}

impl Drop for KeptState {
    fn drop(&mut self) {
        // SAFETY: runs on the thread that took the state, at its exit, outside any call (the
        // GIL is not held); the interpreter is never finalized while sluice runs, and the
        // check keeps a thread that outlived it from touching it.
        unsafe {
            if ffi::Py_IsInitialized() != 0 {
                ffi::PyEval_RestoreThread(self.saved);
                ffi::PyGILState_Release(self.gil);
            }
        }
    }
}

/// An exception, described for the log and for the one-line error.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    /// The exception's last line: `RuntimeError: disk on fire`.
    pub(crate) summary: String,
    /// The whole `traceback.format_exception` text.
    pub(crate) traceback: String,
    /// The innermost line of the script in the traceback.
    pub(crate) line: Option<u32>,
}

/// Describes `err`; `script` is the file name the script's code objects carry.
pub(crate) fn describe(py: Python<'_>, err: &PyErr, script: &str) -> Failure {
    let fallback = || err.to_string();
    let tb_mod = py.import("traceback").ok();
    let ty = err.get_type(py);
    let value = err.value(py);
    let tb = err.traceback(py);
    let summary = tb_mod
        .as_ref()
        .and_then(|m| {
            let lines = m.call_method1("format_exception_only", (&ty, value)).ok()?;
            let text: Vec<String> = lines.extract().ok()?;
            let joined = text.concat();
            joined.trim_end().lines().last().map(str::to_owned)
        })
        .unwrap_or_else(fallback);
    let traceback = tb_mod
        .as_ref()
        .and_then(|m| {
            let lines = m.call_method1("format_exception", (&ty, value, &tb)).ok()?;
            let text: Vec<String> = lines.extract().ok()?;
            Some(text.concat().trim_end().to_owned())
        })
        .unwrap_or_else(|| summary.clone());
    let line = tb_mod.as_ref().and_then(|m| {
        let frames = m.call_method1("extract_tb", (&tb,)).ok()?;
        let mut line = None;
        for frame in frames.try_iter().ok()? {
            let frame = frame.ok()?;
            let file: String = frame.getattr("filename").ok()?.extract().ok()?;
            if file == script {
                line = frame.getattr("lineno").ok()?.extract::<u32>().ok();
            }
        }
        line
    });
    Failure {
        summary,
        traceback,
        line,
    }
}

/// Runs the script at `path` (already read into `source`) as a fresh `__main__` module.
pub(crate) fn run_script<'py>(
    py: Python<'py>,
    path: &Path,
    source: &[u8],
) -> Result<Bound<'py, PyModule>, LoadError> {
    let filename = path.to_string_lossy().into_owned();
    let interp_err = |e: PyErr| LoadError::Interpreter {
        message: e.to_string(),
    };
    let builtins = py.import("builtins").map_err(interp_err)?;
    // compile() on bytes honours a PEP 263 coding line, as running the file would.
    let code = match builtins
        .getattr("compile")
        .and_then(|c| c.call1((PyBytes::new(py, source), &filename, "exec")))
    {
        Ok(code) => code,
        Err(e) if e.is_instance_of::<PySyntaxError>(py) => {
            return Err(syntax_error(py, path, &e));
        }
        Err(e) => {
            let f = describe(py, &e, &filename);
            return Err(LoadError::Run {
                path: path.to_path_buf(),
                line: f.line,
                message: f.summary,
            });
        }
    };
    let setup = || -> PyResult<Bound<'py, PyModule>> {
        let module = PyModule::new(py, "__main__")?;
        let d = module.dict();
        d.set_item("__file__", &filename)?;
        d.set_item("__builtins__", &builtins)?;
        py.import("sys")?
            .getattr("modules")?
            .set_item("__main__", &module)?;
        Ok(module)
    };
    let module = setup().map_err(interp_err)?;
    if let Err(e) = builtins
        .getattr("exec")
        .and_then(|exec| exec.call1((code, module.dict())))
    {
        let f = describe(py, &e, &filename);
        tracing::error!(
            "{}: error running this script:\n{}",
            path.display(),
            f.traceback
        );
        return Err(LoadError::Run {
            path: path.to_path_buf(),
            line: f.line,
            message: f.summary,
        });
    }
    Ok(module)
}

/// A `SyntaxError` from compiling the script, with its line and column.
fn syntax_error(py: Python<'_>, path: &Path, e: &PyErr) -> LoadError {
    let v = e.value(py);
    let line = v
        .getattr("lineno")
        .ok()
        .and_then(|l| l.extract::<u32>().ok())
        .unwrap_or(0);
    let kind = e
        .get_type(py)
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "SyntaxError".into());
    let msg = v
        .getattr("msg")
        .ok()
        .and_then(|m| m.extract::<String>().ok())
        .unwrap_or_else(|| e.to_string());
    let col = v
        .getattr("offset")
        .ok()
        .and_then(|o| o.extract::<u32>().ok());
    let text = v
        .getattr("text")
        .ok()
        .and_then(|t| t.extract::<String>().ok())
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty());
    let mut message = format!("{kind}: {msg}");
    if let Some(text) = text {
        message.push_str(&format!(" (in: {text})"));
    }
    LoadError::Syntax {
        path: path.to_path_buf(),
        line,
        column: col.filter(|&c| c > 0),
        message,
    }
}

/// The running interpreter's version, `3.11.2`.
pub(crate) fn python_version() -> String {
    Python::version_str()
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(source: &str) -> Result<(), LoadError> {
        ensure().unwrap();
        Python::attach(|py| run_script(py, Path::new("/t/s.py"), source.as_bytes()).map(drop))
    }

    #[test]
    fn run_script_syntax_error_has_line_and_column() {
        let err = run("x = 1\ny = (2,\n").unwrap_err();
        assert!(
            matches!(
                err,
                LoadError::Syntax {
                    line: 2,
                    column: Some(_),
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().starts_with("/t/s.py:2:"), "{err}");
    }

    #[test]
    fn run_script_exception_has_innermost_script_line() {
        let err = run("def f():\n    raise ValueError('x')\n\nf()\n").unwrap_err();
        assert!(
            matches!(err, LoadError::Run { line: Some(2), .. }),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "/t/s.py:2: error running this script: ValueError: x"
        );
    }

    #[test]
    fn run_script_sets_main_name_and_file() {
        ensure().unwrap();
        Python::attach(|py| {
            let m = run_script(py, Path::new("/t/m.py"), b"n = __name__\nf = __file__\n").unwrap();
            assert_eq!(
                m.getattr("n").unwrap().extract::<String>().unwrap(),
                "__main__"
            );
            assert_eq!(
                m.getattr("f").unwrap().extract::<String>().unwrap(),
                "/t/m.py"
            );
        });
    }
}
