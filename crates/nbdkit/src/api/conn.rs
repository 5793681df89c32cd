//! The connection-scoped part of nbdkit's API: `nbdkit_export_name`, `nbdkit_is_tls`,
//! `nbdkit_peer_*`, the interned strings, `nbdkit_nanosleep`, `nbdkit_shutdown` and
//! `nbdkit_disconnect`. All of them read the thread-local frame of [`crate::context`].

use std::ffi::{c_char, c_int, c_uint, CStr};
use std::time::Duration;

use crate::api::log::report_error;
use sluice_block::{host, PeerCreds};

use crate::context::{self, lossless_cstring, ConnShared};

/// The connection of the call in progress, or an `nbdkit_error` like nbdkit's.
fn conn() -> Option<&'static ConnShared> {
    let frame = context::current();
    if frame.conn.is_null() {
        report_error("no connection in this thread".into());
        return None;
    }
    // SAFETY: the scope owner keeps the connection alive for the whole call, and the
    // reference does not escape the `extern "C"` function that asked for it (the 'static is
    // a local convenience, never stored).
    Some(unsafe { &*frame.conn })
}

/// `const char *nbdkit_export_name (void)`.
#[no_mangle]
pub extern "C" fn nbdkit_export_name() -> *const c_char {
    let frame = context::current();
    if conn().is_none() {
        return std::ptr::null();
    }
    frame.export_name
}

/// `int nbdkit_is_tls (void)`.
#[no_mangle]
pub extern "C" fn nbdkit_is_tls() -> c_int {
    let frame = context::current();
    match conn() {
        Some(_) => c_int::from(frame.is_tls),
        None => -1,
    }
}

/// `int nbdkit_peer_name (struct sockaddr *addr, socklen_t *addrlen)`: like getpeername(2),
/// truncating to `*addrlen` and storing the full length back.
///
/// # Safety
/// `addr` is writable for `*addrlen` bytes; `addrlen` is writable.
#[no_mangle]
pub unsafe extern "C" fn nbdkit_peer_name(
    addr: *mut libc::sockaddr,
    addrlen: *mut libc::socklen_t,
) -> c_int {
    let Some(c) = conn() else { return -1 };
    let Some(peer) = c.state().peer_addr() else {
        report_error("socket not open".into());
        return -1;
    };
    if addr.is_null() || addrlen.is_null() {
        report_error("nbdkit_peer_name: NULL address buffer".into());
        return -1;
    }
    // SAFETY: readable/writable per the contract.
    let room = unsafe { *addrlen } as usize;
    let n = room.min(peer.len());
    // SAFETY: `addr` has room for `room >= n` bytes; `peer` has `n` readable bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(peer.as_ptr(), addr.cast::<u8>(), n);
        *addrlen = peer.len() as libc::socklen_t;
    }
    0
}

fn peer_cred(what: &str, pick: impl Fn(PeerCreds) -> i64) -> i64 {
    let Some(c) = conn() else { return -1 };
    match c.state().peer_creds() {
        Some(p) => pick(p),
        None => {
            report_error(format!(
                "{what}: the client is not connected over a Unix domain socket"
            ));
            -1
        }
    }
}

/// `int64_t nbdkit_peer_pid (void)`.
#[no_mangle]
pub extern "C" fn nbdkit_peer_pid() -> i64 {
    peer_cred("nbdkit_peer_pid", |p| i64::from(p.pid))
}

/// `int64_t nbdkit_peer_uid (void)`.
#[no_mangle]
pub extern "C" fn nbdkit_peer_uid() -> i64 {
    peer_cred("nbdkit_peer_uid", |p| i64::from(p.uid))
}

/// `int64_t nbdkit_peer_gid (void)`.
#[no_mangle]
pub extern "C" fn nbdkit_peer_gid() -> i64 {
    peer_cred("nbdkit_peer_gid", |p| i64::from(p.gid))
}

/// `const char *nbdkit_strdup_intern (const char *str)`.
///
/// # Safety
/// `s` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn nbdkit_strdup_intern(s: *const c_char) -> *const c_char {
    if s.is_null() {
        report_error("nbdkit_strdup_intern: NULL string".into());
        return std::ptr::null();
    }
    // SAFETY: non-NULL and NUL-terminated per the contract.
    let bytes = unsafe { CStr::from_ptr(s) }.to_bytes();
    context::intern(lossless_cstring(bytes))
}

/// `const char *nbdkit_strndup_intern (const char *str, size_t n)`: at most `n` bytes.
///
/// # Safety
/// `s` points to at least `n` readable bytes or is NUL-terminated before them.
#[no_mangle]
pub unsafe extern "C" fn nbdkit_strndup_intern(s: *const c_char, n: usize) -> *const c_char {
    if s.is_null() {
        report_error("nbdkit_strndup_intern: NULL string".into());
        return std::ptr::null();
    }
    // SAFETY: strnlen reads at most `n` bytes and stops at a NUL, per the contract.
    let len = unsafe { libc::strnlen(s, n) };
    // SAFETY: `len` bytes from `s` are readable (strnlen just read them).
    let bytes = unsafe { std::slice::from_raw_parts(s.cast::<u8>(), len) };
    context::intern(lossless_cstring(bytes))
}

/// `int nbdkit_nanosleep (unsigned sec, unsigned nsec)`: 0 after the full sleep, -1
/// (ESHUTDOWN) as soon as the server shuts down or the client goes.
#[no_mangle]
pub extern "C" fn nbdkit_nanosleep(sec: c_uint, nsec: c_uint) -> c_int {
    if u64::from(sec) >= i32::MAX as u64 - u64::from(nsec / 1_000_000_000) {
        report_error("sleep request is too long".into());
        context::set_errno(libc::EINVAL);
        return -1;
    }
    let duration = Duration::from_secs(u64::from(sec)) + Duration::from_nanos(u64::from(nsec));
    let frame = context::current();
    // SAFETY: see `conn`.
    let conn = (!frame.conn.is_null()).then(|| unsafe { &*frame.conn });
    if host::sleep(duration, conn.map(ConnShared::state)) {
        0
    } else {
        report_error("aborting sleep to shut down".into());
        context::set_errno(libc::ESHUTDOWN);
        -1
    }
}

/// `void nbdkit_shutdown (void)`: asks the server to shut down, asynchronously.
#[no_mangle]
pub extern "C" fn nbdkit_shutdown() {
    tracing::info!("plugin requested server shutdown");
    host::plugin_requested_shutdown();
}

/// `void nbdkit_disconnect (int force)` (nbdkit 1.34): asks the server to drop the current
/// client; see `Connection::disconnect_requested`.
#[no_mangle]
pub extern "C" fn nbdkit_disconnect(force: c_int) {
    let frame = context::current();
    if frame.conn.is_null() {
        tracing::debug!(target: "nbdkit", "nbdkit_disconnect: no connection in this thread");
        return;
    }
    // SAFETY: see `conn`.
    unsafe { &*frame.conn }
        .state()
        .request_disconnect(force != 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::{take_last_error, with_conn, Connection, Frame, PluginScope, Scope};
    use sluice_block::ConnectionInfo;

    #[test]
    fn export_name_outside_connection_is_null_with_error() {
        let p = PluginScope::new("test".into());
        let _s = Scope::enter(Frame::for_plugin(&p));
        assert!(nbdkit_export_name().is_null());
        assert_eq!(take_last_error().unwrap(), "no connection in this thread");
        assert_eq!(nbdkit_is_tls(), -1);
    }

    #[test]
    fn peer_functions_read_connection() {
        let addr = vec![1u8, 0, b'/', b's'];
        let conn = Connection::new(ConnectionInfo {
            peer_creds: Some(PeerCreds {
                pid: 42,
                uid: 1000,
                gid: 100,
            }),
            peer_addr: Some(addr.clone()),
            ..ConnectionInfo::default()
        });
        with_conn(&conn, || {
            assert_eq!(nbdkit_peer_pid(), 42);
            assert_eq!(nbdkit_peer_uid(), 1000);
            assert_eq!(nbdkit_peer_gid(), 100);
            // SAFETY: sockaddr_storage is plain data.
            let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            let mut len = 2 as libc::socklen_t;
            // SAFETY: `ss` has room for `len` (2) bytes.
            let r = unsafe {
                nbdkit_peer_name((&mut ss as *mut libc::sockaddr_storage).cast(), &mut len)
            };
            assert_eq!(r, 0);
            assert_eq!(len, 4);
            assert_eq!(ss.ss_family, 1);
        });
    }

    #[test]
    fn peer_pid_without_creds_is_error() {
        let p = PluginScope::new("test".into());
        let _s = Scope::enter(Frame::for_plugin(&p));
        let conn = Connection::new(ConnectionInfo::default());
        with_conn(&conn, || {
            assert_eq!(nbdkit_peer_pid(), -1);
            assert!(take_last_error().unwrap().contains("Unix domain socket"));
        });
    }

    #[test]
    fn strndup_intern_limits_length() {
        let conn = Connection::new(ConnectionInfo::default());
        with_conn(&conn, || {
            // SAFETY: valid string of 6 bytes.
            let p = unsafe { nbdkit_strndup_intern(c"abcdef".as_ptr(), 3) };
            // SAFETY: interned for the connection, alive here.
            assert_eq!(unsafe { CStr::from_ptr(p) }.to_str().unwrap(), "abc");
        });
    }

    #[test]
    fn nanosleep_too_long_is_einval() {
        assert_eq!(nbdkit_nanosleep(i32::MAX as u32, 0), -1);
        assert_eq!(context::errno(), libc::EINVAL);
    }

    #[test]
    fn nanosleep_short_sleeps() {
        assert_eq!(nbdkit_nanosleep(0, 1_000_000), 0);
    }

    #[test]
    fn nanosleep_ends_when_connection_closes() {
        let conn = Connection::new(ConnectionInfo::default());
        let closer = conn.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            closer.mark_closed();
        });
        let start = std::time::Instant::now();
        let r = with_conn(&conn, || nbdkit_nanosleep(30, 0));
        t.join().unwrap();
        assert_eq!(r, -1);
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn disconnect_is_recorded_on_connection() {
        let conn = Connection::new(ConnectionInfo::default());
        assert_eq!(conn.disconnect_requested(), None);
        with_conn(&conn, || nbdkit_disconnect(0));
        assert_eq!(conn.disconnect_requested(), Some(false));
        with_conn(&conn, || nbdkit_disconnect(1));
        assert_eq!(conn.disconnect_requested(), Some(true));
    }
}
