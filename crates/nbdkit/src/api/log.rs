//! `nbdkit_error`, `nbdkit_debug` (formatted by the C shim, which calls in here) and
//! `nbdkit_set_error`.
//!
//! An error message becomes the pending message of the callback in progress, so that the
//! `BlockError` of a failed request carries the plugin's own words; a message that no error
//! carries is logged when the callback returns (see [`crate::context`]). Either way each
//! message is shown once, as nbdkit prints each.

use std::ffi::{c_char, c_int, CStr};

use crate::context;

/// Reports one `nbdkit_error` for the call in progress. Preserves errno.
pub(crate) fn report_error(msg: String) {
    let saved = context::errno();
    context::set_last_error(msg);
    context::set_errno(saved);
}

/// Writes an `nbdkit_error` message to the log, naming the plugin being called.
pub(crate) fn log_error(msg: &str) {
    context::with_plugin_name(|plugin| {
        if plugin.is_empty() {
            tracing::error!(target: "nbdkit", "{msg}");
        } else {
            tracing::error!(target: "nbdkit", "{plugin}: {msg}");
        }
    });
}

/// Called by the C shim with the formatted text of `nbdkit_error`/`nbdkit_verror`.
///
/// # Safety
/// `msg` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn sluice_nbdkit_emit_error(msg: *const c_char) {
    if msg.is_null() {
        return;
    }
    // SAFETY: the shim passes a NUL-terminated string that lives until we return.
    let text = unsafe { CStr::from_ptr(msg) }.to_string_lossy();
    report_error(text.trim_end_matches('\n').to_string());
}

/// Called by the C shim with the formatted text of `nbdkit_debug`/`nbdkit_vdebug`.
///
/// # Safety
/// `msg` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn sluice_nbdkit_emit_debug(msg: *const c_char) {
    if msg.is_null() {
        return;
    }
    let saved = context::errno();
    // SAFETY: as in `sluice_nbdkit_emit_error`.
    let text = unsafe { CStr::from_ptr(msg) }.to_string_lossy();
    let text = text.trim_end_matches('\n');
    context::with_plugin_name(|plugin| {
        if plugin.is_empty() {
            tracing::debug!(target: "nbdkit", "{text}");
        } else {
            tracing::debug!(target: "nbdkit", "{plugin}: {text}");
        }
    });
    context::set_errno(saved);
}

/// Lets the shim skip formatting debug messages nobody will see (nbdkit without `-v`).
#[no_mangle]
pub extern "C" fn sluice_nbdkit_debug_enabled() -> c_int {
    c_int::from(tracing::enabled!(target: "nbdkit", tracing::Level::DEBUG))
}

/// `void nbdkit_set_error (int err)`: the errno of the request that is failing.
#[no_mangle]
pub extern "C" fn nbdkit_set_error(err: c_int) {
    context::set_error(err);
}
