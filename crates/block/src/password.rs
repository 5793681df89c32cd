//! nbdkit's secret parameters (`nbdkit_read_password`): how a `key=VALUE` parameter that
//! holds a password or passphrase is spelled, for the built-in filters that take one (luks).
//!
//! - `VALUE`: the secret itself (visible in `ps`, so only for tests);
//! - `+FILE`: the first line of FILE;
//! - `-`: asked on the terminal, without echo (only if stdin is a terminal);
//! - `-FD`: the first line read from the inherited descriptor FD (not 0, 1 or 2), which is
//!   closed afterwards.
//!
//! A secret is read once, when the parameters are checked, as nbdkit reads it during
//! `.config`; the trailing newline is dropped and a NUL ends it (nbdkit keeps C strings).

use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;

use crate::Errno;

/// Reads the secret `value` names (bytes, as a C plugin's string may not be UTF-8).
/// `stdin_ok` is false when stdin carries the NBD connection (`-s`) or may no longer be
/// used. The error is one line without the caller's name.
pub fn read_password(value: &[u8], stdin_ok: bool) -> Result<Vec<u8>, String> {
    if value == b"-" {
        read_interactive(stdin_ok)
    } else if let Some(fd) = value.strip_prefix(b"-") {
        read_fd(&String::from_utf8_lossy(fd))
    } else if let Some(path) = value.strip_prefix(b"+") {
        let shown = String::from_utf8_lossy(path);
        let file = File::open(OsStr::from_bytes(path)).map_err(|e| {
            let errno = Errno(e.raw_os_error().unwrap_or(libc::EIO));
            format!("open {shown}: {}", errno.describe())
        })?;
        first_line(file, &shown)
    } else {
        Ok(value.to_vec())
    }
}

/// The first line of `r` (empty at EOF), without the newline and cut at any NUL.
fn first_line(r: impl Read, what: &str) -> Result<Vec<u8>, String> {
    let mut line = Vec::new();
    BufReader::new(r)
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("could not read password from {what}: {e}"))?;
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    if let Some(nul) = line.iter().position(|&b| b == 0) {
        line.truncate(nul);
    }
    Ok(line)
}

fn read_fd(text: &str) -> Result<Vec<u8>, String> {
    let fd: i32 = text
        .parse()
        .map_err(|_| format!("password file descriptor: could not parse number: {text}"))?;
    if fd < 0 {
        return Err(format!("password file descriptor: bad number: {text}"));
    }
    if fd <= 2 {
        return Err("cannot use password -FD for stdin/stdout/stderr".into());
    }
    // SAFETY: fcntl F_GETFD only asks whether the descriptor is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        let errno = Errno(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        return Err(format!("fdopen {fd}: {}", errno.describe()));
    }
    // SAFETY: the user handed this descriptor over for the password; nbdkit takes it the
    // same way (fdopen, then fclose), so owning and closing it is what is asked for.
    let file = unsafe { File::from_raw_fd(fd) };
    first_line(file, &format!("file descriptor {fd}"))
}

fn read_interactive(stdin_ok: bool) -> Result<Vec<u8>, String> {
    if !stdin_ok {
        return Err("stdin is not available for reading password".into());
    }
    // SAFETY: isatty only queries the descriptor.
    if unsafe { libc::isatty(0) } == 0 {
        return Err("stdin is not a tty, cannot read password interactively".into());
    }
    let mut out = std::io::stdout();
    let _ = write!(out, "password: ");
    let _ = out.flush();
    // SAFETY: termios is plain data, filled by tcgetattr for fd 0 (a tty, checked above).
    let mut orig: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let have_termios = unsafe { libc::tcgetattr(0, &mut orig) } == 0;
    if have_termios {
        let mut noecho = orig;
        noecho.c_lflag &= !libc::ECHO;
        // SAFETY: a valid termios for fd 0; best effort, as in nbdkit.
        unsafe { libc::tcsetattr(0, libc::TCSAFLUSH, &noecho) };
    }
    let mut line = Vec::new();
    let r = std::io::stdin().lock().read_until(b'\n', &mut line);
    if have_termios {
        // SAFETY: restores the settings read above.
        unsafe { libc::tcsetattr(0, libc::TCSAFLUSH, &orig) };
    }
    let _ = writeln!(out);
    r.map_err(|e| format!("could not read password from stdin: {e}"))?;
    first_line(&line[..], "stdin")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    #[test]
    fn read_password_plain_value_is_itself() {
        assert_eq!(read_password(b"s3cret", true).unwrap(), b"s3cret");
    }

    #[test]
    fn read_password_plus_file_takes_the_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "line one\nline two\n").unwrap();
        let v = format!("+{}", p.display());
        assert_eq!(read_password(v.as_bytes(), true).unwrap(), b"line one");
        let e = read_password(b"+/nonexistent/pw", true).unwrap_err();
        assert_eq!(e, "open /nonexistent/pw: No such file or directory");
    }

    #[test]
    fn read_password_minus_fd_reads_the_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "from-fd").unwrap();
        let fd = File::open(&p).unwrap().into_raw_fd();
        // The descriptor is the filter's now (it is closed after reading): not closed here.
        assert_eq!(
            read_password(format!("-{fd}").as_bytes(), true).unwrap(),
            b"from-fd"
        );
    }

    #[test]
    fn read_password_minus_fd_refuses_stdio_and_junk() {
        assert!(read_password(b"-1", true)
            .unwrap_err()
            .contains("stdin/stdout"));
        assert!(read_password(b"-x", true)
            .unwrap_err()
            .contains("could not parse number: x"));
    }

    #[test]
    fn read_password_minus_without_stdin_is_refused() {
        assert!(read_password(b"-", false)
            .unwrap_err()
            .contains("stdin is not available"));
    }
}
