//! nbdkit's exitwhen filter: exit gracefully once an outside event happens (a file created or
//! deleted, a pipe closed, a process exited, or a script exiting with status 88).
//!
//! As in nbdkit, events are checked when a client connects or disconnects and, while no
//! client is connected, every `exit-when-poll` seconds (60 by default) by a thread started in
//! the serving stage. Once an event has happened, new clients are refused in preconnect and
//! the server exits when the last connected client leaves (at once if none is). An event
//! that has already happened at startup ends the process before it listens, with status 0.
//! Clients are counted as exitlast counts them ([`ConnectionCount`]).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::error::{BlockError, Errno, Result};
use crate::filter::{Filter, Next};
use crate::filters::{bad, each_param, over, parse_u32, FilterEnv, FilterSpec};
use crate::plugin::{ConnectionInfo, OpenContext, Plugin};
use crate::plugins::ConfigArg;

use super::exitlast::ConnectionCount;
use super::run_shell;

pub const SPEC: FilterSpec = FilterSpec {
    name: "exitwhen",
    keys: &[
        "exit-when-file-created",
        "exit-when-file-deleted",
        "exit-when-pipe-closed",
        "exit-when-fd-closed",
        "exit-when-process-exits",
        "exit-when-pid-exits",
        "exit-when-script",
        "exit-when-poll",
    ],
    help: "",
    open,
};

/// One event to watch for.
#[derive(Debug)]
enum Event {
    FileCreated(PathBuf),
    FileDeleted(PathBuf),
    /// The read end of a pipe (or a socket) passed by the parent.
    FdClosed(i32),
    /// An open `/proc/PID/stat`: reading it fails with ESRCH once the process has gone.
    ProcessExits(std::fs::File),
    Script(String),
}

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, env: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut events = Vec::new();
    let mut poll = 60;
    each_param(&SPEC, params, |k, v| {
        let event = match k {
            "exit-when-file-created" | "exit-when-file-deleted" => {
                let path = std::path::absolute(v).map_err(|e| bad("exitwhen", k, e))?;
                if k.ends_with("created") {
                    Event::FileCreated(path)
                } else {
                    Event::FileDeleted(path)
                }
            }
            "exit-when-pipe-closed" | "exit-when-fd-closed" => Event::FdClosed(
                v.trim()
                    .parse()
                    .map_err(|_| bad("exitwhen", k, format!("could not parse number: {v}")))?,
            ),
            "exit-when-process-exits" | "exit-when-pid-exits" => {
                let pid: u64 = v
                    .trim()
                    .parse()
                    .map_err(|_| bad("exitwhen", k, format!("could not parse number: {v}")))?;
                let stat = format!("/proc/{pid}/stat");
                let file = std::fs::File::open(&stat)
                    .map_err(|e| bad("exitwhen", k, format!("{stat}: {e}")))?;
                Event::ProcessExits(file)
            }
            "exit-when-script" => Event::Script(v.to_string()),
            _ => {
                poll = parse_u32("exitwhen", k, v)?;
                return Ok(());
            }
        };
        events.push(event);
        Ok(())
    })?;
    let shared = Arc::new(Shared {
        events,
        exiting: Mutex::new(false),
        clients: ConnectionCount::default(),
        exit: env.exit.clone(),
    });
    let ready = shared.clone();
    env.lifecycle.on_ready(move |_| {
        if ready.check() {
            // nbdkit exits here, before it listens or runs a --run command.
            std::process::exit(0);
        }
        Ok(())
    });
    let serving = shared.clone();
    env.lifecycle.on_serving(move |_| {
        if serving.events.is_empty() {
            return Ok(());
        }
        let secs = u64::from(poll);
        std::thread::Builder::new()
            .name("exitwhen-poll".into())
            .spawn(move || loop {
                if serving.clients.get() == 0 && serving.check() {
                    tracing::debug!("exitwhen: shutdown from polling thread");
                    (serving.exit)();
                }
                std::thread::sleep(Duration::from_secs(secs));
            })
            .map(drop)
            .map_err(|e| {
                BlockError::new(Errno::ENOMEM, format!("exitwhen: cannot start thread: {e}"))
            })
    });
    Ok(over(ExitWhen(shared), inner))
}

struct Shared {
    events: Vec<Event>,
    /// Set once an event has happened; the lock also serializes the checks.
    exiting: Mutex<bool>,
    clients: ConnectionCount,
    exit: Arc<dyn Fn() + Send + Sync>,
}

impl Shared {
    /// nbdkit's `check_for_event`: true once any event has happened.
    fn check(&self) -> bool {
        let mut exiting = self.exiting.lock().unwrap_or_else(PoisonError::into_inner);
        if !*exiting {
            *exiting = self.events.iter().any(happened);
        }
        *exiting
    }
}

fn happened(event: &Event) -> bool {
    match event {
        Event::FileCreated(p) => {
            let yes = readable(p).is_ok();
            if yes {
                tracing::debug!("exit-when-file-created: detected {} created", p.display());
            }
            yes
        }
        Event::FileDeleted(p) => match readable(p) {
            Ok(()) => false,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
                tracing::debug!("exit-when-file-deleted: detected {} deleted", p.display());
                true
            }
            Err(e) => {
                tracing::error!("exit-when-file-deleted: access: {}: {e}", p.display());
                false
            }
        },
        Event::FdClosed(fd) => {
            let mut pfd = libc::pollfd {
                fd: *fd,
                events: 0,
                revents: 0,
            };
            // SAFETY: one valid pollfd, zero timeout; poll only reports on the fd.
            let r = unsafe { libc::poll(&mut pfd, 1, 0) };
            if r == 1 && pfd.revents & libc::POLLHUP != 0 {
                tracing::debug!("exit-when-pipe-closed: detected pipe closed");
                true
            } else if r == 1 && pfd.revents & libc::POLLNVAL != 0 {
                tracing::error!("exit-when-pipe-closed: invalid file descriptor");
                true
            } else {
                if r == -1 {
                    tracing::error!(
                        "exit-when-pipe-closed: poll: {}",
                        std::io::Error::last_os_error()
                    );
                }
                false
            }
        }
        Event::ProcessExits(file) => {
            use std::os::unix::fs::FileExt;
            let mut b = [0u8; 1];
            match file.read_at(&mut b, 0) {
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                    tracing::debug!("exit-when-process-exits: detected process exit");
                    true
                }
                Err(e) => {
                    tracing::error!("exit-when-process-exits: read: {e}");
                    false
                }
                Ok(_) => false,
            }
        }
        Event::Script(script) => match run_shell(script) {
            Some(0) => false,
            Some(88) => {
                tracing::debug!("exit-when-script: detected scripted event");
                true
            }
            other => {
                tracing::error!("exit-when-script: the script failed ({other:?})");
                false
            }
        },
    }
}

/// `access(path, R_OK)`.
fn readable(p: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a NUL-terminated path that lives across the call.
    match unsafe { libc::access(c.as_ptr(), libc::R_OK) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

struct ExitWhen(Arc<Shared>);

impl Filter for ExitWhen {
    type Conn = ();

    fn name(&self) -> &str {
        "exitwhen"
    }

    fn with_connection(&self, next: &dyn Plugin, info: &ConnectionInfo, f: &mut dyn FnMut()) {
        let s = &self.0;
        if let Some(left) = s.clients.run(|| next.with_connection(info, f)) {
            if s.check() && left == 0 {
                tracing::debug!("exitwhen: exiting on last client connection");
                (s.exit)();
            }
        }
    }

    fn preconnect(&self, next: &dyn Plugin, readonly: bool) -> Result<()> {
        if self.0.check() {
            return Err(BlockError::new(
                Errno::ESHUTDOWN,
                "exitwhen: nbdkit is exiting: rejecting new connection",
            ));
        }
        next.preconnect(readonly)
    }

    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<((), Next)> {
        let next = Next::open(next, ctx)?;
        self.0.clients.opened();
        Ok(((), next))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::plugins::MemoryPlugin;

    fn filter(params: &[(&str, &str)], exits: &Arc<AtomicUsize>) -> Result<Arc<dyn Plugin>> {
        let params: Vec<_> = params.iter().map(|(k, v)| ConfigArg::kv(k, v)).collect();
        let e = exits.clone();
        let env = FilterEnv {
            exit: Arc::new(move || {
                e.fetch_add(1, Ordering::SeqCst);
            }),
            ..FilterEnv::default()
        };
        (SPEC.open)(&params, Arc::new(MemoryPlugin::new(4096)), &env)
    }

    #[test]
    fn a_created_file_refuses_new_clients_and_exits_after_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let stop = dir.path().join("stop");
        let exits = Arc::new(AtomicUsize::new(0));
        let top = filter(
            &[("exit-when-file-created", stop.to_str().unwrap())],
            &exits,
        )
        .unwrap();
        let ctx = OpenContext {
            readonly: false,
            export_name: "",
            is_tls: false,
        };
        top.with_connection(&ConnectionInfo::default(), &mut || {
            top.preconnect(false).unwrap();
            let _h = top.open(&ctx).unwrap();
            std::fs::write(&stop, "").unwrap();
            // Connected clients go on; new ones are refused.
            assert!(top.preconnect(false).is_err());
            assert_eq!(exits.load(Ordering::SeqCst), 0);
        });
        assert_eq!(exits.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn scripts_trigger_with_status_88_only() {
        let exits = Arc::new(AtomicUsize::new(0));
        let no = filter(&[("exit-when-script", "exit 1")], &exits).unwrap();
        no.preconnect(false).unwrap();
        let yes = filter(&[("exit-when-script", "exit 88")], &exits).unwrap();
        assert!(yes.preconnect(false).is_err());
    }

    #[test]
    fn bad_parameters_name_filter_and_key() {
        let exits = Arc::new(AtomicUsize::new(0));
        for (k, v) in [
            ("exit-when-poll", "soon"),
            ("exit-when-pipe-closed", "x"),
            ("exit-when-process-exits", "999999999"),
        ] {
            let e = filter(&[(k, v)], &exits).err().unwrap();
            assert!(e.message.starts_with(&format!("exitwhen: {k}: ")), "{e}");
        }
    }
}
