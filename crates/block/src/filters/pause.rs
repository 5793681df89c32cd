//! nbdkit's pause filter: holds requests while paused, through a control socket.
//!
//! `pause-control=SOCKET` names a Unix socket the filter listens on (bound in the ready
//! stage, replacing a socket file already there). A controller connects and sends single
//! bytes: `p` pauses (the `P` answer comes once every request already in flight has
//! finished), `r` resumes (`R`), newline, tab and space are ignored, anything else is answered
//! `X`. nbdkit 1.32's protocol, one controller at a time.
//!
//! While paused, reads, writes, zeroes, trims, block status and cache requests wait before
//! reaching the layer below; flush and negotiation are not held, as in nbdkit. The state is a
//! mutex and a condition variable: requests wait for "not paused" and count themselves in
//! flight, the pause waits for the count to reach zero.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use crate::error::{BlockError, Errno, Result};
use crate::extents::Extents;
use crate::filter::{Filter, Next};
use crate::filters::{bad, each_param, over, FilterEnv, FilterSpec};
use crate::plugin::{Flags, Handle, OpenContext, Plugin};
use crate::plugins::ConfigArg;

pub const SPEC: FilterSpec = FilterSpec {
    name: "pause",
    keys: &["pause-control"],
    help: "pause-control=SOCKET           Control socket.",
    open,
};

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, env: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut socket: Option<PathBuf> = None;
    each_param(&SPEC, params, |k, v| {
        socket = Some(std::path::absolute(v).map_err(|e| bad("pause", k, e))?);
        Ok(())
    })?;
    let gate = Arc::new(Gate::default());
    let listener: Arc<Mutex<Option<UnixListener>>> = Arc::default();
    let bound = listener.clone();
    env.lifecycle.on_ready(move |_| {
        let path = socket.ok_or_else(|| {
            bad(
                "pause",
                "pause-control",
                "the pause-control socket was not set",
            )
        })?;
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).map_err(|e| {
            BlockError::new(
                Errno(e.raw_os_error().unwrap_or(libc::EIO)),
                format!("pause: {}: {e}", path.display()),
            )
        })?;
        *bound.lock().unwrap_or_else(PoisonError::into_inner) = Some(l);
        Ok(())
    });
    let control = gate.clone();
    env.lifecycle.on_serving(move |_| {
        let Some(l) = listener
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return Ok(());
        };
        std::thread::Builder::new()
            .name("pause-control".into())
            .spawn(move || {
                for s in l.incoming() {
                    match s {
                        Ok(s) => control.serve(s),
                        Err(e) => tracing::error!("pause: accept: {e}"),
                    }
                }
            })
            .map(drop)
            .map_err(|e| BlockError::new(Errno::ENOMEM, format!("pause: cannot start thread: {e}")))
    });
    Ok(over(Pause(gate), inner))
}

#[derive(Debug, Default)]
struct State {
    paused: bool,
    in_flight: u64,
}

/// Requests in flight and whether new ones may start.
#[derive(Debug, Default)]
struct Gate {
    state: Mutex<State>,
    changed: Condvar,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, g: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(g).unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs one request once not paused, counted in flight.
    fn request<T>(&self, f: impl FnOnce() -> T) -> T {
        let mut g = self.lock();
        while g.paused {
            g = self.wait(g);
        }
        g.in_flight += 1;
        drop(g);
        let r = f();
        self.lock().in_flight -= 1;
        self.changed.notify_all();
        r
    }

    /// Stops new requests and waits for those in flight.
    fn pause(&self) {
        let mut g = self.lock();
        g.paused = true;
        tracing::debug!("pause: pausing, waiting for requests to complete");
        while g.in_flight > 0 {
            g = self.wait(g);
        }
        tracing::debug!("pause: paused");
    }

    fn resume(&self) {
        self.lock().paused = false;
        self.changed.notify_all();
        tracing::debug!("pause: resumed");
    }

    /// One controller connection: commands until end of file.
    fn serve(&self, mut s: UnixStream) {
        let mut c = [0u8; 1];
        while let Ok(1) = s.read(&mut c) {
            let answer = match c[0] {
                b'p' => {
                    self.pause();
                    b'P'
                }
                b'r' => {
                    self.resume();
                    b'R'
                }
                b'\n' | b'\t' | b' ' => continue,
                _ => b'X',
            };
            if s.write_all(&[answer]).is_err() {
                break;
            }
        }
    }
}

struct Pause(Arc<Gate>);

impl Filter for Pause {
    type Conn = ();

    fn name(&self) -> &str {
        "pause"
    }

    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<((), Next)> {
        Ok(((), Next::open(next, ctx)?))
    }

    fn pread(&self, _: &(), next: &Next, buf: &mut [u8], off: u64, f: Flags) -> Result<()> {
        self.0.request(|| next.pread(buf, off, f))
    }

    fn pwrite(&self, _: &(), next: &Next, buf: &[u8], off: u64, f: Flags) -> Result<()> {
        self.0.request(|| next.pwrite(buf, off, f))
    }

    fn zero(&self, _: &(), next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        self.0.request(|| next.zero(n, off, f))
    }

    fn trim(&self, _: &(), next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        self.0.request(|| next.trim(n, off, f))
    }

    fn cache(&self, _: &(), next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        self.0.request(|| next.cache(n, off, f))
    }

    fn extents(
        &self,
        _: &(),
        next: &Next,
        n: u64,
        off: u64,
        f: Flags,
        out: &mut Extents,
    ) -> Result<()> {
        self.0.request(|| next.extents(n, off, f, out))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::plugin::Handle;
    use crate::plugins::MemoryPlugin;

    #[test]
    fn pause_holds_reads_until_resume_over_the_control_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("ctl");
        let env = FilterEnv::default();
        let params = [ConfigArg::kv("pause-control", sock.to_str().unwrap())];
        let top = (SPEC.open)(&params, Arc::new(MemoryPlugin::new(4096)), &env).unwrap();
        env.lifecycle.ready(top.thread_model()).unwrap();
        env.lifecycle
            .serving(crate::filters::cli_registered::Serving { forked: false })
            .unwrap();
        let h: Arc<dyn Handle> = Arc::from(
            top.open(&OpenContext {
                readonly: false,
                export_name: "",
                is_tls: false,
            })
            .unwrap(),
        );
        let mut ctl = UnixStream::connect(&sock).unwrap();
        let mut answer = [0u8; 3];
        ctl.write_all(b"p\nq").unwrap();
        ctl.read_exact(&mut answer[..2]).unwrap();
        assert_eq!(&answer[..2], b"PX");
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = h.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            reader.pread(&mut buf, 0, Flags::NONE).unwrap();
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "read ran while paused"
        );
        ctl.write_all(b"r").unwrap();
        ctl.read_exact(&mut answer[..1]).unwrap();
        assert_eq!(answer[0], b'R');
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
    }

    #[test]
    fn missing_control_socket_is_a_parameter_error_when_ready() {
        let env = FilterEnv::default();
        let top = (SPEC.open)(&[], Arc::new(MemoryPlugin::new(4096)), &env).unwrap();
        let e = env.lifecycle.ready(top.thread_model()).unwrap_err();
        assert_eq!(e.errno, Errno::EINVAL);
        assert!(e.message.starts_with("pause: pause-control: "), "{e}");
    }
}
