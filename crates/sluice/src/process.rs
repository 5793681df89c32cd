//! Process plumbing shared by `sluice serve` and `sluice daemon`: logging, the pidfile, and
//! going into the background.
//!
//! Daemonizing forks before any thread exists; the parent then waits on a pipe for the
//! child's verdict, so its exit status tells the caller whether the server really started:
//! `1` means ready (the parent prints an optional line, e.g. the NBD URI, and exits 0), any
//! other text is the child's startup error (printed, exit 1), and a closed pipe means the
//! child died during startup.

use std::io::Write;
use std::os::fd::RawFd;
use std::path::Path;

use anyhow::Context;

/// Logs to stderr: info by default, debug with `-v`, or as `SLUICE_LOG` says (tracing's
/// env-filter syntax). Colours only on a terminal.
pub fn init_logging(verbose: bool) {
    use std::io::IsTerminal;
    let default = if verbose { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Writes our pid to `path` atomically (a temporary file renamed into place).
pub fn write_pidfile(path: &Path) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{}\n", std::process::id()))
        .and_then(|_| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write pidfile {}", path.display()))
}

/// The child's end of the pipe its waiting parent reads.
#[derive(Debug)]
pub struct Readiness(RawFd);

impl Readiness {
    /// Startup succeeded: the parent exits 0. Standard input, output and error go to
    /// /dev/null from now on (so `$(sluice ...)` in a shell does not wait for the server).
    pub fn ready(self) {
        // SAFETY: writing one byte to our pipe and closing it, then pointing fds 0..2, which
        // we own, at /dev/null.
        unsafe {
            libc::write(self.0, b"1".as_ptr() as *const libc::c_void, 1);
            libc::close(self.0);
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
            if null >= 0 {
                libc::dup2(null, 0);
                libc::dup2(null, 1);
                libc::dup2(null, 2);
                if null > 2 {
                    libc::close(null);
                }
            }
        }
    }

    /// Startup failed: the parent prints `msg` and exits 1.
    pub fn failed(self, msg: &str) {
        // SAFETY: writing the message to our pipe, then closing it.
        unsafe {
            libc::write(self.0, msg.as_ptr() as *const libc::c_void, msg.len());
            libc::close(self.0);
        }
        let _ = std::io::stderr().flush();
    }
}

/// Forks into the background. Returns in the child; the parent waits for the child's
/// [`Readiness`] verdict and exits, printing `on_ready` (if not empty) when it succeeded.
/// Must be called before any thread exists.
pub fn daemonize(on_ready: &str) -> anyhow::Result<Readiness> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills the two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error()).context("pipe");
    }
    // SAFETY: no threads exist yet (the caller guarantees it), so fork is safe.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()).context("fork"),
        0 => {
            // SAFETY: closing our copy of the read end; setsid detaches from the terminal.
            unsafe {
                libc::close(fds[0]);
                libc::setsid();
            }
            Ok(Readiness(fds[1]))
        }
        _ => {
            // SAFETY: closing our copy of the write end.
            unsafe { libc::close(fds[1]) };
            let mut msg = Vec::new();
            let mut b = [0u8; 4096];
            loop {
                // SAFETY: reading into a buffer of the given length.
                let n = unsafe { libc::read(fds[0], b.as_mut_ptr() as *mut libc::c_void, b.len()) };
                if n <= 0 {
                    break;
                }
                msg.extend_from_slice(&b[..n as usize]);
            }
            if msg == b"1" {
                if !on_ready.is_empty() {
                    println!("{on_ready}");
                }
                std::process::exit(0);
            }
            let text = String::from_utf8_lossy(&msg);
            if text.is_empty() {
                eprintln!("sluice: the server exited during startup");
            } else {
                eprintln!("{text}");
            }
            std::process::exit(1);
        }
    }
}
