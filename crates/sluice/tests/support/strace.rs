//! A sluice server under `strace`, for tests that check which system calls the request path
//! makes (splice for file reads, the busy-poller's non-blocking reads).

use std::time::Duration;

use super::{path_str, sluice_bin, wait_timeout, Server};

/// `sluice serve -f -U SOCK ARGS...` under `strace -ff -qq -e trace=CALLS -o LOG`: one log per
/// thread (`LOG.TID`), so that no call is split over two lines.
pub struct Traced {
    pub server: Server,
    logs: tempfile::TempDir,
}

impl Traced {
    /// Starts it, tracing `calls` (strace's `trace=` list), with `env` given to strace's `-E`
    /// (`VAR=VALUE` sets a variable for sluice, a bare `VAR` removes it).
    pub fn start(calls: &str, env: &[&str], args: &[&str]) -> Traced {
        let logs = tempfile::tempdir().unwrap();
        let log = logs.path().join("strace");
        let trace = format!("trace={calls}");
        let mut leading = vec!["-ff", "-qq", "-e", &trace, "-o", path_str(&log)];
        for e in env {
            leading.extend(["-E", e]);
        }
        leading.extend([sluice_bin(), "serve", "-f", "-U"]);
        let server = Server::try_start_program("strace", &leading, args)
            .unwrap_or_else(|e| panic!("sluice {args:?} under strace did not start: {e}"));
        Traced { server, logs }
    }

    pub fn uri(&self) -> String {
        self.server.uri()
    }

    /// Sends `signal` to sluice, strace's only child (strace then exits with it).
    fn signal_sluice(&self, signal: i32) {
        if let Some(strace) = self.server.child.as_ref() {
            signal_traced(strace.id(), signal);
        }
    }

    /// Stops sluice and returns strace's lines of the call `name` (those starting `name(`).
    pub fn finish(mut self, name: &str) -> Vec<String> {
        self.signal_sluice(libc::SIGTERM);
        let mut strace = self.server.child.take().unwrap();
        wait_timeout(&mut strace, Duration::from_secs(30)).expect("strace exits");
        self.server_lines_so_far(name)
    }

    /// strace's whole lines of the call `name` logged so far, sluice still running (a call
    /// in progress may be missing).
    pub fn server_lines_so_far(&self, name: &str) -> Vec<String> {
        let prefix = format!("{name}(");
        let mut lines = Vec::new();
        for e in std::fs::read_dir(self.logs.path()).unwrap() {
            let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
            lines.extend(
                text.lines()
                    .filter(|l| l.starts_with(&prefix))
                    .map(str::to_owned),
            );
        }
        lines
    }
}

impl Drop for Traced {
    /// A test that fails before [`Traced::finish`] must not leave sluice running: killing
    /// strace (what [`Server`]'s drop does) would only detach it.
    fn drop(&mut self) {
        self.signal_sluice(libc::SIGKILL);
    }
}

/// The return value of a strace line (`call(...) = N`), if it is a number.
pub fn returned(line: &str) -> Option<i64> {
    line.rsplit_once(" = ")?
        .1
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Sends `signal` to the process that the strace `strace_pid` started (its first child).
pub fn signal_traced(strace_pid: u32, signal: i32) {
    let children =
        std::fs::read_to_string(format!("/proc/{strace_pid}/task/{strace_pid}/children"))
            .unwrap_or_default();
    if let Some(pid) = children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
    {
        // SAFETY: signalling a process this test started (strace's child).
        unsafe { libc::kill(pid, signal) };
    }
}
