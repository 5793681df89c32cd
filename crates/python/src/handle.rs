//! One open script handle as a sluice [`Handle`]: capability defaults, API v1/v2 dispatch,
//! buffers and error mapping.
//!
//! Capabilities follow nbdkit's python plugin when a function is absent: `can_write`,
//! `can_flush`, `can_trim`, `can_zero` and `can_extents` are true iff `pwrite`, `flush`,
//! `trim`, `zero` and `extents` exist; `is_rotational` and `can_multi_conn` are false;
//! `can_fast_zero` is `not can_zero`; `can_fua` is EMULATE if `flush` exists, else NONE;
//! `can_cache` is NATIVE if `cache` exists, else NONE. Those are the C plugins' rules too
//! except for `can_fast_zero`, so the ladder is [`sluice_block::host::Ladder`], shared with
//! the C host; this file tells it which functions the script defines and what its `can_*`
//! functions return. A boolean `can_*` answer counts as true only if it *is* `True` (nbdkit
//! compares with `Py_True`, so `return 1` means false). A `can_zero` answer of false means
//! "emulate with writes", as nbdkit's core maps it.
//!
//! One deliberate difference: an API_VERSION 1 script's `can_fua` answer is capped at
//! FUA_EMULATE. The v1 signatures have no flags argument, so nbdkit silently drops the FUA bit
//! and the write is not made durable; emulating it with a flush keeps the promise to the
//! client (the same rule nbdkit applies to v1 C plugins, and the ladder's).
//!
//! Buffers are not copied on the way in or out where the API allows it: v2 `pread` gets a
//! writable `memoryview` over the caller's buffer and `pwrite` a read-only one; both are
//! released as soon as the call returns, so a script that kept the view gets `ValueError`
//! instead of touching memory it no longer owns. v1 `pread` must return a buffer-protocol
//! object, which is copied once into the caller's buffer.

use std::ffi::c_char;
use std::sync::Arc;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyModule, PyTuple};
use sluice_block::host::{Callback, CapCache, Capability, FastZeroDefault, ForeignAnswers};
use sluice_block::{BlockError, BlockSize, Errno, Extents, Flags, Handle, OpenContext, Result};

use crate::context::{self, Connection, Frame};
use crate::plugin::{function, Shared};

/// An open handle of a script. Dropping it calls `close(h)`.
pub(crate) struct PythonHandle {
    shared: Arc<Shared>,
    conn: Connection,
    export_name: Arc<str>,
    is_tls: bool,
    /// What the script's `open` returned; `None` only during `Drop`.
    h: Option<Py<PyAny>>,
    /// The script's `can_*` answers, each asked once per handle as nbdkit does.
    answers: CapCache,
}

impl PythonHandle {
    pub(crate) fn open(
        shared: Arc<Shared>,
        conn: Connection,
        ctx: &OpenContext<'_>,
    ) -> Result<PythonHandle> {
        let export_name: Arc<str> = ctx.export_name.into();
        let frame = Frame {
            conn: Some(conn.clone()),
            export_name: Some(export_name.clone()),
            is_tls: ctx.is_tls,
        };
        let readonly = ctx.readonly;
        let h = shared.call("open", frame, |_, m| {
            let f = required(m, "open")?;
            Ok(f.call1((readonly,))?.unbind())
        })?;
        Ok(PythonHandle {
            shared,
            conn,
            export_name,
            is_tls: ctx.is_tls,
            h: Some(h),
            answers: CapCache::default(),
        })
    }

    fn frame(&self) -> Frame {
        Frame {
            conn: Some(self.conn.clone()),
            export_name: Some(self.export_name.clone()),
            is_tls: self.is_tls,
        }
    }

    fn v1(&self) -> bool {
        self.shared.api_version == 1
    }

    /// Calls into the script with this handle's frame; `body` gets the module and the
    /// script's handle object.
    fn call<R>(
        &self,
        op: &'static str,
        body: impl for<'py> FnOnce(
            Python<'py>,
            &Bound<'py, PyModule>,
            &Bound<'py, PyAny>,
        ) -> PyResult<R>,
    ) -> Result<R> {
        let h = self.h.as_ref().expect("the handle lives until Drop");
        self.shared
            .call(op, self.frame(), |py, m| body(py, m, h.bind(py)))
    }

    /// The script's answer to a boolean `can_*` question, if it defines that function.
    fn ask_flag(&self, cap: Capability) -> Result<Option<bool>> {
        let name = cap.callback();
        self.call(name, |py, m, h| match function(m, name)? {
            Some(f) => Ok(Some(is_true(py, &f.call1((h,))?))),
            None => Ok(None),
        })
    }

    /// A data callback with the `(h, count, offset[, flags])` shape of trim and cache, and
    /// of flush without the counts.
    fn simple_call(
        &self,
        name: &'static str,
        args: impl for<'py> FnOnce(Python<'py>, &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyTuple>>,
    ) -> Result<()> {
        self.call(name, |py, m, h| {
            let f = required(m, name)?;
            f.call1(args(py, h)?)?;
            Ok(())
        })
    }
}

impl ForeignAnswers for PythonHandle {
    fn flag(&self, cap: Capability) -> Result<Option<bool>> {
        self.ask_flag(cap)
    }

    fn level(&self, cap: Capability) -> Result<Option<i64>> {
        let name = cap.callback();
        self.call(name, |_, m, h| match function(m, name)? {
            Some(f) => Ok(Some(f.call1((h,))?.extract::<i64>()?)),
            None => Ok(None),
        })
    }

    fn defines(&self, callback: Callback) -> Result<bool> {
        let name = callback.name();
        self.call(name, |_, m, _| Ok(function(m, name)?.is_some()))
    }

    fn api_version(&self) -> u32 {
        self.shared.api_version
    }

    fn fast_zero_default(&self) -> FastZeroDefault {
        FastZeroDefault::NotCanZero
    }

    fn invalid_answer(&self, cap: Capability, value: i64) -> BlockError {
        BlockError::new(
            Errno::EINVAL,
            format!(
                "{}: {}: script returned invalid value {value}",
                self.shared.display,
                cap.callback()
            ),
        )
    }

    fn answers(&self) -> &CapCache {
        &self.answers
    }
}

impl Drop for PythonHandle {
    fn drop(&mut self) {
        let Some(h) = self.h.take() else { return };
        let _scope = context::Scope::enter(self.frame());
        let shown = &self.shared.display;
        let _ = Python::try_attach(|py| {
            if let Ok(Some(close)) = function(self.shared.module(py), "close") {
                if let Err(e) = close.call1((h.bind(py),)) {
                    let f = crate::interp::describe(py, &e, shown);
                    tracing::error!("{shown}: close: {}", f.traceback);
                }
            }
            drop(h);
        });
    }
}

/// The callable `name`, or a `RuntimeError` if the script no longer defines it.
fn required<'py>(m: &Bound<'py, PyModule>, name: &str) -> PyResult<Bound<'py, PyAny>> {
    function(m, name)?.ok_or_else(|| {
        pyo3::exceptions::PyRuntimeError::new_err(format!("missing callback: {name}"))
    })
}

/// nbdkit's boolean rule: only the `True` object is true.
fn is_true(py: Python<'_>, r: &Bound<'_, PyAny>) -> bool {
    r.is(PyBool::new(py, true).as_any())
}

/// A `memoryview` over memory that Rust owns, released when dropped.
struct View<'py>(Bound<'py, PyAny>);

impl<'py> View<'py> {
    /// A writable view of `buf`.
    fn writable(py: Python<'py>, buf: &mut [u8]) -> PyResult<View<'py>> {
        // SAFETY: `buf` is valid and exclusively ours for `buf.len()` bytes for as long as
        // the caller's borrow lasts, which outlives this View: `View::drop` releases the
        // memoryview before the borrow ends, after which Python can no longer reach the
        // memory through it (a released view raises ValueError). Python plugins are trusted
        // code in the server's address space, like C plugins: a script that keeps a *derived*
        // view (a slice) past the call breaks the documented contract exactly as a C plugin
        // keeping the buffer pointer would.
        let ptr = unsafe {
            ffi::PyMemoryView_FromMemory(
                buf.as_mut_ptr().cast::<c_char>(),
                buf.len() as ffi::Py_ssize_t,
                ffi::PyBUF_WRITE,
            )
        };
        // SAFETY: a new reference or NULL with an exception set, as from any C API call.
        Ok(View(unsafe { Bound::from_owned_ptr_or_err(py, ptr) }?))
    }

    /// A read-only view of `buf`.
    fn readonly(py: Python<'py>, buf: &[u8]) -> PyResult<View<'py>> {
        // SAFETY: as in `writable`; PyBUF_READ makes the view read-only, so the const
        // pointer is never written through.
        let ptr = unsafe {
            ffi::PyMemoryView_FromMemory(
                buf.as_ptr().cast_mut().cast::<c_char>(),
                buf.len() as ffi::Py_ssize_t,
                ffi::PyBUF_READ,
            )
        };
        // SAFETY: as in `writable`.
        Ok(View(unsafe { Bound::from_owned_ptr_or_err(py, ptr) }?))
    }
}

impl Drop for View<'_> {
    fn drop(&mut self) {
        // Fails only if the script exported a buffer from the view itself and kept it
        // (`numpy.frombuffer(buf)`): say so, since that memory is about to be reused.
        if let Err(e) = self.0.call_method0("release") {
            tracing::error!(
                "python plugin kept a buffer exported from a request's memoryview after the call returned: {e}"
            );
        }
    }
}

impl Handle for PythonHandle {
    /// Asked once per handle, as nbdkit does.
    fn get_size(&self) -> Result<u64> {
        self.answers.size(|| {
            let size = self.call("get_size", |_, m, h| {
                required(m, "get_size")?.call1((h,))?.extract::<i64>()
            })?;
            u64::try_from(size).map_err(|_| {
                BlockError::new(
                    Errno::EIO,
                    format!(
                        "{}: get_size: script returned invalid size {size}",
                        self.shared.display
                    ),
                )
            })
        })
    }

    fn export_description(&self) -> Result<Option<String>> {
        self.call("export_description", |_, m, h| {
            match function(m, "export_description")? {
                Some(f) => Ok(Some(f.call1((h,))?.extract::<String>()?)),
                None => Ok(None),
            }
        })
    }

    fn block_size(&self) -> Result<Option<BlockSize>> {
        let r = self.call("block_size", |_, m, h| match function(m, "block_size")? {
            Some(f) => Ok(Some(f.call1((h,))?.extract::<(u32, u32, u32)>()?)),
            None => Ok(None),
        })?;
        match r {
            None | Some((0, 0, 0)) => Ok(None),
            Some((minimum, preferred, maximum)) => BlockSize {
                minimum,
                preferred,
                maximum,
            }
            .validate()
            .map(Some),
        }
    }

    sluice_block::foreign_capabilities!();

    fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let v1 = self.v1();
        self.call("pread", |py, m, h| {
            let f = required(m, "pread")?;
            if !v1 {
                let view = View::writable(py, buf)?;
                f.call1((h, &view.0, offset, flags.0))?;
                return Ok(());
            }
            let r = f.call1((h, buf.len() as u64, offset))?;
            copy_from_buffer(&r, buf)
        })
    }

    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let v1 = self.v1();
        self.call("pwrite", |py, m, h| {
            let Some(f) = function(m, "pwrite")? else {
                return Err(pyo3::exceptions::PyRuntimeError::new_err(
                    "pwrite not implemented",
                ));
            };
            let view = View::readonly(py, buf)?;
            if v1 {
                f.call1((h, &view.0, offset))?;
            } else {
                f.call1((h, &view.0, offset, flags.0))?;
            }
            Ok(())
        })
    }

    fn flush(&self, flags: Flags) -> Result<()> {
        if self.v1() {
            self.simple_call("flush", |py, h| (h,).into_pyobject(py))
        } else {
            self.simple_call("flush", |py, h| (h, flags.0).into_pyobject(py))
        }
    }

    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        if self.v1() {
            self.simple_call("trim", |py, h| (h, count, offset).into_pyobject(py))
        } else {
            self.simple_call("trim", |py, h| {
                (h, count, offset, flags.0).into_pyobject(py)
            })
        }
    }

    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        if self.v1() && flags.contains(Flags::FAST_ZERO) {
            return Err(BlockError::new(
                Errno::ENOTSUP,
                "zero: fast zero is not supported by API_VERSION 1 scripts",
            ));
        }
        let v1 = self.v1();
        let shown = &self.shared.display;
        self.call("zero", |_, m, h| {
            let Some(f) = function(m, "zero")? else {
                return Ok(Err(BlockError::new(
                    Errno::ENOTSUP,
                    "zero: script has no zero function",
                )));
            };
            let r = if v1 {
                f.call1((h, count, offset, flags.contains(Flags::MAY_TRIM)))
            } else {
                f.call1((h, count, offset, flags.0))
            };
            // nbdkit: set_error(ENOTSUP/EOPNOTSUPP) asks for the fallback to pwrite, whether
            // the script then raised or returned; the exception is not an error to log.
            let set = context::error_set();
            if set == libc::ENOTSUP || set == libc::EOPNOTSUPP {
                drop(r);
                return Ok(Err(BlockError::new(
                    Errno(set),
                    format!("{shown}: zero: script asked for the fallback to writes"),
                )));
            }
            r?;
            Ok(Ok(()))
        })?
    }

    fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.simple_call("cache", |py, h| {
            (h, count, offset, flags.0).into_pyobject(py)
        })
    }

    fn extents(&self, count: u64, offset: u64, flags: Flags, extents: &mut Extents) -> Result<()> {
        let shown = &self.shared.display;
        self.call("extents", |_, m, h| {
            let Some(f) = function(m, "extents")? else {
                return Ok(extents.add(offset, count, 0));
            };
            let r = f.call1((h, count, offset, flags.0))?;
            let iter = r.try_iter().map_err(|_| {
                PyTypeError::new_err("extents method did not return something which is iterable")
            })?;
            let mut n = 0usize;
            for item in iter {
                let item = item?;
                let t = item
                    .cast::<PyTuple>()
                    .ok()
                    .filter(|t| t.len() == 3)
                    .ok_or_else(|| {
                        PyTypeError::new_err(
                            "extents method did not return an iterable of 3-tuples",
                        )
                    })?;
                let (o, l, k) = t.extract::<(u64, u64, u32)>()?;
                n += 1;
                if let Err(e) = extents.add(o, l, k) {
                    return Ok(Err(BlockError::new(
                        e.errno,
                        format!("{shown}: extents: {}", e.message),
                    )));
                }
            }
            if n == 0 {
                return Ok(Err(BlockError::new(
                    Errno::EINVAL,
                    format!("{shown}: extents method cannot return an empty list"),
                )));
            }
            Ok(Ok(()))
        })?
    }
}

/// v1 `pread`: copies `buf.len()` bytes from the buffer-protocol object the script returned.
fn copy_from_buffer(r: &Bound<'_, PyAny>, buf: &mut [u8]) -> PyResult<()> {
    let mut view = ffi::Py_buffer::new();
    // SAFETY: `r` is a live object (we hold a reference and the GIL); `view` is a valid,
    // zero-initialised Py_buffer that the call fills on success.
    if unsafe { ffi::PyObject_GetBuffer(r.as_ptr(), &mut view, ffi::PyBUF_SIMPLE) } == -1 {
        // Replace the TypeError with nbdkit's message.
        let _ = PyErr::take(r.py());
        return Err(PyTypeError::new_err(
            "value returned from pread does not support the buffer protocol",
        ));
    }
    struct Release(ffi::Py_buffer);
    impl Drop for Release {
        fn drop(&mut self) {
            // SAFETY: the buffer was obtained by a successful PyObject_GetBuffer and is
            // released exactly once, with the GIL still held (the Release lives inside it).
            unsafe { ffi::PyBuffer_Release(&mut self.0) };
        }
    }
    let view = Release(view);
    let len = usize::try_from(view.0.len).unwrap_or(0);
    if len < buf.len() || view.0.buf.is_null() && !buf.is_empty() {
        return Err(PyValueError::new_err(format!(
            "buffer returned from pread is too small ({len} bytes, {} requested)",
            buf.len()
        )));
    }
    // SAFETY: a PyBUF_SIMPLE buffer is `len` contiguous readable bytes at `buf`, valid until
    // released (after this copy); we copy `buf.len() <= len` of them into memory that does not
    // overlap (ours, exclusively borrowed).
    unsafe {
        std::ptr::copy_nonoverlapping(view.0.buf.cast::<u8>(), buf.as_mut_ptr(), buf.len());
    }
    Ok(())
}
