//! The `nbdkit` module that scripts `import`: nbdkit's server API for Python.
//!
//! The module is built once, when the interpreter is started, and put in `sys.modules`, so
//! `import nbdkit` finds it before any file on `sys.path` (a script cannot shadow it by
//! accident). Its functions are nbdkit's (`debug`, `export_name`, `set_error`, `parse_size`,
//! `shutdown`, `disconnect`, `is_tls`, `nanosleep`, `peer_pid`, `peer_uid`, `peer_gid`) and
//! its constants have nbdkit's values, so scripts run unmodified.
//!
//! Functions that are about the client read the thread-local frame of [`crate::context`]
//! installed by the host around the current callback; they raise `RuntimeError` outside a
//! connection, where nbdkit's C functions would fail. Anything that can wait (logging,
//! sleeping, the shutdown hook) runs with the GIL released, so other Python threads and
//! parallel requests keep running.

use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use sluice_block::{host, PeerCreds};

use crate::context::{self, Connection};

/// nbdkit's constants, by name, with nbdkit's values.
pub(crate) const CONSTANTS: &[(&str, i64)] = &[
    ("THREAD_MODEL_SERIALIZE_CONNECTIONS", 0),
    ("THREAD_MODEL_SERIALIZE_ALL_REQUESTS", 1),
    ("THREAD_MODEL_SERIALIZE_REQUESTS", 2),
    ("THREAD_MODEL_PARALLEL", 3),
    ("FLAG_MAY_TRIM", 1),
    ("FLAG_FUA", 2),
    ("FLAG_REQ_ONE", 4),
    ("FLAG_FAST_ZERO", 8),
    ("FUA_NONE", 0),
    ("FUA_EMULATE", 1),
    ("FUA_NATIVE", 2),
    ("CACHE_NONE", 0),
    ("CACHE_EMULATE", 1),
    ("CACHE_NATIVE", 2),
    ("EXTENT_HOLE", 1),
    ("EXTENT_ZERO", 2),
];

/// Builds the module (not yet registered anywhere).
pub(crate) fn create(py: Python<'_>) -> PyResult<Bound<'_, PyModule>> {
    let m = PyModule::new(py, "nbdkit")?;
    m.add(
        "__doc__",
        "Module used to access the sluice (nbdkit) server API",
    )?;
    m.add_function(wrap_pyfunction!(debug, &m)?)?;
    m.add_function(wrap_pyfunction!(export_name, &m)?)?;
    m.add_function(wrap_pyfunction!(set_error, &m)?)?;
    m.add_function(wrap_pyfunction!(parse_size, &m)?)?;
    m.add_function(wrap_pyfunction!(shutdown, &m)?)?;
    m.add_function(wrap_pyfunction!(disconnect, &m)?)?;
    m.add_function(wrap_pyfunction!(is_tls, &m)?)?;
    m.add_function(wrap_pyfunction!(nanosleep, &m)?)?;
    m.add_function(wrap_pyfunction!(peer_pid, &m)?)?;
    m.add_function(wrap_pyfunction!(peer_uid, &m)?)?;
    m.add_function(wrap_pyfunction!(peer_gid, &m)?)?;
    for (name, value) in CONSTANTS {
        m.add(*name, *value)?;
    }
    Ok(m)
}

/// `nbdkit.debug(msg)`: a debug message in the server's log.
#[pyfunction]
fn debug(py: Python<'_>, msg: String) {
    py.detach(move || tracing::debug!(target: "sluice_python::script", "{msg}"));
}

/// `nbdkit.export_name()`: the export name the client asked for.
#[pyfunction]
fn export_name() -> PyResult<String> {
    context::with_frame(|f| f.and_then(|f| f.export_name.as_deref().map(str::to_owned))).ok_or_else(
        || PyRuntimeError::new_err("nbdkit.export_name failed: no connection in this thread"),
    )
}

/// `nbdkit.set_error(err)`: the errno the client sees if the current callback raises.
#[pyfunction]
fn set_error(err: i32) {
    context::set_error(err);
}

/// `nbdkit.parse_size(str)`: nbdkit's size syntax (`1M`, `2G`, `512`...).
#[pyfunction]
fn parse_size(s: &str) -> PyResult<u64> {
    sluice_block::size::parse_size(s)
        .map_err(|e| PyValueError::new_err(format!("Unable to parse string as size: {s:?}: {e}")))
}

/// `nbdkit.shutdown()`: asks the server to shut down, asynchronously.
#[pyfunction]
fn shutdown(py: Python<'_>) {
    py.detach(|| {
        tracing::info!("python plugin requested server shutdown");
        host::plugin_requested_shutdown();
    });
}

/// `nbdkit.disconnect(force)`: asks the server to drop the current client.
#[pyfunction]
#[pyo3(signature = (force = false))]
fn disconnect(force: bool) {
    match current_conn() {
        Some(c) => c.state().request_disconnect(force),
        None => tracing::debug!("nbdkit.disconnect: no connection in this thread"),
    }
}

/// `nbdkit.is_tls()`: whether the client connection is protected by TLS.
#[pyfunction]
fn is_tls() -> PyResult<bool> {
    context::with_frame(|f| f.map(|f| f.is_tls))
        .ok_or_else(|| PyRuntimeError::new_err("nbdkit.is_tls: no connection in this thread"))
}

/// `nbdkit.nanosleep(sec, nsec)`: sleeps with the GIL released; ends early, raising
/// `OSError(ESHUTDOWN)` (and setting that errno for the request), when the server shuts down
/// or the client goes.
#[pyfunction]
fn nanosleep(py: Python<'_>, sec: u32, nsec: u32) -> PyResult<()> {
    if u64::from(sec) >= i32::MAX as u64 - u64::from(nsec / 1_000_000_000) {
        return Err(PyValueError::new_err(
            "nbdkit.nanosleep: sleep request is too long",
        ));
    }
    let duration = Duration::from_secs(u64::from(sec)) + Duration::from_nanos(u64::from(nsec));
    let conn = current_conn();
    if py.detach(move || host::sleep(duration, conn.as_ref().map(Connection::state))) {
        Ok(())
    } else {
        context::set_error(libc::ESHUTDOWN);
        Err(PyOSError::new_err((
            libc::ESHUTDOWN,
            "nbdkit.nanosleep: aborting sleep to shut down",
        )))
    }
}

/// `nbdkit.peer_pid()`.
#[pyfunction]
fn peer_pid() -> PyResult<i64> {
    peer("nbdkit.peer_pid", |p| i64::from(p.pid))
}

/// `nbdkit.peer_uid()`.
#[pyfunction]
fn peer_uid() -> PyResult<i64> {
    peer("nbdkit.peer_uid", |p| i64::from(p.uid))
}

/// `nbdkit.peer_gid()`.
#[pyfunction]
fn peer_gid() -> PyResult<i64> {
    peer("nbdkit.peer_gid", |p| i64::from(p.gid))
}

fn current_conn() -> Option<Connection> {
    context::with_frame(|f| f.and_then(|f| f.conn.clone()))
}

fn peer(what: &str, pick: impl Fn(PeerCreds) -> i64) -> PyResult<i64> {
    let conn = current_conn()
        .ok_or_else(|| PyRuntimeError::new_err(format!("{what}: no connection in this thread")))?;
    conn.state().peer_creds().map(pick).ok_or_else(|| {
        PyRuntimeError::new_err(format!(
            "{what}: the client is not connected over a Unix domain socket"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_block::extents::{EXTENT_HOLE, EXTENT_ZERO};
    use sluice_block::{Flags, Support, ThreadModel};

    fn value(name: &str) -> i64 {
        CONSTANTS.iter().find(|(n, _)| *n == name).unwrap().1
    }

    #[test]
    fn constants_have_the_block_layers_values() {
        assert_eq!(value("FLAG_MAY_TRIM"), i64::from(Flags::MAY_TRIM.0));
        assert_eq!(value("FLAG_FUA"), i64::from(Flags::FUA.0));
        assert_eq!(value("FLAG_REQ_ONE"), i64::from(Flags::REQ_ONE.0));
        assert_eq!(value("FLAG_FAST_ZERO"), i64::from(Flags::FAST_ZERO.0));
        assert_eq!(value("FUA_NATIVE"), Support::Native as i64);
        assert_eq!(value("CACHE_EMULATE"), Support::Emulate as i64);
        assert_eq!(value("EXTENT_HOLE"), i64::from(EXTENT_HOLE));
        assert_eq!(value("EXTENT_ZERO"), i64::from(EXTENT_ZERO));
        assert_eq!(value("THREAD_MODEL_PARALLEL"), ThreadModel::Parallel as i64);
        assert_eq!(
            value("THREAD_MODEL_SERIALIZE_CONNECTIONS"),
            ThreadModel::SerializeConnections as i64
        );
    }

    #[test]
    fn functions_outside_a_call_raise_runtime_error() {
        crate::interp::ensure().unwrap();
        Python::attach(|py| {
            let m = py.import("nbdkit").unwrap();
            for f in ["export_name", "is_tls", "peer_pid"] {
                let err = m.getattr(f).unwrap().call0().unwrap_err();
                assert!(err.is_instance_of::<PyRuntimeError>(py), "{f}: {err}");
            }
            assert_eq!(
                m.getattr("parse_size")
                    .unwrap()
                    .call1(("2k",))
                    .unwrap()
                    .extract::<u64>()
                    .unwrap(),
                2048
            );
            let err = m.getattr("parse_size").unwrap().call1(("2q",)).unwrap_err();
            assert!(err.is_instance_of::<PyValueError>(py), "{err}");
        });
    }
}
