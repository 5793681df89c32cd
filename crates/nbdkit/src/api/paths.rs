//! `nbdkit_absolute_path`, `nbdkit_realpath`, `nbdkit_read_password`, `nbdkit_stdio_safe`:
//! the configuration-time helpers that touch the file system or the terminal.
//!
//! Strings returned to the plugin are `malloc`'d because the plugin `free`s them.

use std::ffi::{c_char, c_int, CStr};
use std::sync::atomic::{AtomicBool, Ordering};

use sluice_block::Errno;

use crate::api::log::report_error;
use crate::context;

static STDIO_SAFE: AtomicBool = AtomicBool::new(true);

/// Whether plugins may talk to stdin/stdout while they are configured; the binary sets
/// false when the NBD client is on stdin/stdout (nbdkit `-s`). Plugins see false anyway once
/// their configuration is complete, as with nbdkit.
pub fn set_stdio_safe(safe: bool) {
    STDIO_SAFE.store(safe, Ordering::Release);
}

/// Copies `bytes` into a `malloc`'d C string (NULL if allocation fails).
pub(crate) fn malloc_cstring(bytes: &[u8]) -> *mut c_char {
    // SAFETY: malloc of len+1 bytes; NULL is checked before use.
    let p = unsafe { libc::malloc(bytes.len() + 1) }.cast::<u8>();
    if p.is_null() {
        return std::ptr::null_mut();
    }
    // SAFETY: `p` has room for len+1 bytes and does not overlap `bytes`.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
        p.add(bytes.len()).write(0);
    }
    p.cast()
}

/// # Safety
/// `p` is NULL or a NUL-terminated string.
unsafe fn bytes<'a>(p: *const c_char) -> Option<&'a [u8]> {
    if p.is_null() {
        None
    } else {
        // SAFETY: non-NULL and NUL-terminated per the contract.
        Some(unsafe { CStr::from_ptr(p) }.to_bytes())
    }
}

/// `char *nbdkit_absolute_path (const char *path)`: prepends the current directory to a
/// relative path (no other checks). The result is `malloc`'d.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn nbdkit_absolute_path(path: *const c_char) -> *mut c_char {
    // SAFETY: forwarded contract.
    let path = match unsafe { bytes(path) } {
        Some(p) if !p.is_empty() => p,
        _ => {
            report_error("cannot convert null or empty path to an absolute path".into());
            return std::ptr::null_mut();
        }
    };
    if path[0] == b'/' {
        return malloc_cstring(path);
    }
    match std::env::current_dir() {
        Ok(cwd) => {
            use std::os::unix::ffi::OsStrExt;
            let mut full = cwd.as_os_str().as_bytes().to_vec();
            full.push(b'/');
            full.extend_from_slice(path);
            malloc_cstring(&full)
        }
        Err(e) => {
            report_error(format!("get_current_dir_name: {e}"));
            std::ptr::null_mut()
        }
    }
}

/// `char *nbdkit_realpath (const char *path)`: resolves symlinks; fails if the path does not
/// exist. The result is `malloc`'d.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn nbdkit_realpath(path: *const c_char) -> *mut c_char {
    // SAFETY: forwarded contract.
    match unsafe { bytes(path) } {
        Some(p) if !p.is_empty() => {}
        _ => {
            report_error("cannot resolve a null or empty path".into());
            return std::ptr::null_mut();
        }
    }
    // SAFETY: `path` is a valid C string; with a NULL buffer realpath mallocs the result.
    let r = unsafe { libc::realpath(path, std::ptr::null_mut()) };
    if r.is_null() {
        let err = context::errno();
        // SAFETY: checked non-NULL above.
        let shown = unsafe { CStr::from_ptr(path) }.to_string_lossy();
        report_error(format!("realpath: {shown}: {}", Errno(err).describe()));
    }
    r
}

/// `int nbdkit_stdio_safe (void)`.
#[no_mangle]
pub extern "C" fn nbdkit_stdio_safe() -> c_int {
    let frame = context::current();
    let configured = !frame.plugin.is_null()
        // SAFETY: a frame's plugin pointer is alive for the call in progress.
        && unsafe { &*frame.plugin }.is_configured();
    c_int::from(STDIO_SAFE.load(Ordering::Acquire) && !configured)
}

/// `int nbdkit_read_password (const char *value, char **password)`: the value itself, `-`
/// (ask on the terminal), `-FD` (read and close an inherited fd) or `+FILE`. The password
/// is the first line, without its newline, `malloc`'d into `*password`. The spellings are
/// [`sluice_block::password`]'s, shared with the built-in filters that take a secret.
///
/// # Safety
/// `value` is a NUL-terminated string; `password` is writable.
#[no_mangle]
pub unsafe extern "C" fn nbdkit_read_password(
    value: *const c_char,
    password: *mut *mut c_char,
) -> c_int {
    if password.is_null() {
        report_error("nbdkit_read_password: NULL password pointer".into());
        return -1;
    }
    // SAFETY: writable per the contract.
    unsafe { *password = std::ptr::null_mut() };
    // SAFETY: forwarded contract.
    let Some(v) = (unsafe { bytes(value) }) else {
        report_error("nbdkit_read_password: NULL value".into());
        return -1;
    };
    let result = sluice_block::password::read_password(v, nbdkit_stdio_safe() != 0);
    match result {
        Ok(pw) => {
            let p = malloc_cstring(&pw);
            if p.is_null() {
                report_error("strdup: Cannot allocate memory".into());
                return -1;
            }
            // SAFETY: writable per the contract.
            unsafe { *password = p };
            0
        }
        Err(msg) => {
            report_error(msg);
            -1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::{take_last_error, Frame, PluginScope, Scope};
    use std::ffi::CString;
    use std::fs::File;
    use std::os::fd::IntoRawFd;

    fn read(value: &[u8]) -> Result<String, String> {
        let p = PluginScope::new("test".into());
        let _s = Scope::enter(Frame::for_plugin(&p));
        let v = CString::new(value).unwrap();
        let mut out: *mut c_char = std::ptr::null_mut();
        // SAFETY: valid C string and out-pointer.
        let r = unsafe { nbdkit_read_password(v.as_ptr(), &mut out) };
        if r == -1 {
            assert!(out.is_null());
            return Err(take_last_error().unwrap());
        }
        // SAFETY: on success `out` is a malloc'd C string that we own.
        let s = unsafe { CStr::from_ptr(out) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: malloc'd by us.
        unsafe { libc::free(out.cast()) };
        Ok(s)
    }

    fn temp_file(contents: &[u8]) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!(
            "sluice-nbdkit-pw-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn read_password_plain_value() {
        assert_eq!(read(b"secret"), Ok("secret".into()));
    }

    #[test]
    fn read_password_from_file_takes_first_line() {
        let path = temp_file(b"hunter2\nsecond line\n");
        let mut v = b"+".to_vec();
        v.extend_from_slice(path.to_str().unwrap().as_bytes());
        assert_eq!(read(&v), Ok("hunter2".into()));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn read_password_from_fd_closes_it() {
        let path = temp_file(b"fdpass");
        let fd = File::open(&path).unwrap().into_raw_fd();
        assert_eq!(read(format!("-{fd}").as_bytes()), Ok("fdpass".into()));
        // SAFETY: querying a descriptor number is harmless.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_GETFD) }, -1);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn read_password_refuses_stdio_fds() {
        assert_eq!(
            read(b"-1"),
            Err("cannot use password -FD for stdin/stdout/stderr".into())
        );
    }

    #[test]
    fn read_password_missing_file_is_error() {
        let e = read(b"+/nonexistent/pw").unwrap_err();
        assert_eq!(e, "open /nonexistent/pw: No such file or directory");
    }

    #[test]
    fn absolute_path_prefixes_cwd() {
        // SAFETY: valid C string; result malloc'd.
        let p = unsafe { nbdkit_absolute_path(c"disk.img".as_ptr()) };
        // SAFETY: non-NULL malloc'd C string.
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        // SAFETY: ours to free.
        unsafe { libc::free(p.cast()) };
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(s, format!("{}/disk.img", cwd.display()));
    }

    #[test]
    fn realpath_of_missing_file_is_null() {
        let p = PluginScope::new("test".into());
        let _s = Scope::enter(Frame::for_plugin(&p));
        // SAFETY: valid C string.
        let r = unsafe { nbdkit_realpath(c"/nonexistent/x".as_ptr()) };
        assert!(r.is_null());
        assert_eq!(
            take_last_error().unwrap(),
            "realpath: /nonexistent/x: No such file or directory"
        );
    }
}
