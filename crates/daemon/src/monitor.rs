//! One QMP monitor connection: greeting, negotiation, commands, events.
//!
//! The connection task alone owns its socket and its [`JsonStream`]. It reads whatever
//! arrives, lets the stream cut it into messages, and answers them in order: parse errors
//! without an `id`, malformed commands with QEMU's top-level messages, commands through
//! [`Daemon::execute`] on the blocking pool. Events reach it through the daemon's broadcast
//! channel once it has negotiated; events a command caused are written before that command's
//! reply, and events emitted after the command (by a job it started) after it (see
//! [`crate::events`] on sequence numbers). Replies are queued in one buffer and written when a command has run or the input is
//! used up, so a flood of garbage costs one write per read, not one per error.
//!
//! Reading stops while a command runs and while a write is blocked, so a client that does not
//! read its replies stops being read (QEMU's flow control). A client that disconnects, even in
//! the middle of a message or before its reply, ends only its own task.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sluice_proto::qmp::{
    encode_error, encode_greeting, encode_return, parse_request, JsonStream, QmpError,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, Semaphore};

use crate::commands::MonitorState;
use crate::events::EventMsg;
use crate::state::Daemon;

/// Most clients served at once on one monitor socket.
pub const MAX_CLIENTS_PER_MONITOR: usize = 64;

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 64 * 1024;

/// Serves one client until it disconnects or the daemon stops.
pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(daemon: Arc<Daemon>, stream: S) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut out = Vec::new();
    encode_greeting(&daemon.version_value(), &["oob"], &mut out);
    if wr.write_all(&out).await.is_err() {
        return;
    }
    out.clear();
    let mut mon = MonitorState::default();
    let mut events: Option<broadcast::Receiver<Arc<EventMsg>>> = None;
    // An event received while flushing up to a command's mark, to be written after its reply.
    let mut held: Option<Arc<EventMsg>> = None;
    let mut shutdown = daemon.shutdown_watch();
    let mut json = JsonStream::default();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut parsed = Vec::new();
    loop {
        if daemon.is_shutting_down() {
            break;
        }
        tokio::select! {
            r = rd.read(&mut buf) => {
                let n = match r {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => {
                        tracing::debug!("monitor read failed: {e}");
                        break;
                    }
                };
                json.feed(&buf[..n], &mut parsed);
                for p in parsed.drain(..) {
                    let (result, id) = match p {
                        Err(e) => (Err(QmpError::generic(e.to_string())), None),
                        Ok(v) => match parse_request(v, mon.oob) {
                            Err(bad) => (Err(bad.error), bad.id),
                            Ok(req) => {
                                let d = daemon.clone();
                                let (r, m, req) = match tokio::task::spawn_blocking(move || {
                                    let r = d.execute(&req, &mut mon);
                                    (r, mon, req)
                                })
                                .await
                                {
                                    Ok(x) => x,
                                    Err(e) => {
                                        tracing::error!("command task failed: {e}");
                                        return;
                                    }
                                };
                                mon = m;
                                if mon.negotiated && events.is_none() {
                                    events = Some(daemon.events().subscribe());
                                }
                                if !flush_events(
                                    &mut events,
                                    &mut out,
                                    mon.events_before_reply,
                                    &mut held,
                                ) {
                                    return;
                                }
                                (r, req.id)
                            }
                        },
                    };
                    match &result {
                        Ok(v) => encode_return(v, id.as_ref(), &mut out),
                        Err(e) => encode_error(e, id.as_ref(), &mut out),
                    }
                    if let Some(m) = held.take() {
                        out.extend_from_slice(&m.bytes);
                    }
                    if daemon.is_shutting_down() {
                        // `quit` (from here or elsewhere): nothing after it runs.
                        break;
                    }
                    if out.len() > READ_CHUNK {
                        if wr.write_all(&out).await.is_err() {
                            return;
                        }
                        out.clear();
                    }
                }
                if !out.is_empty() {
                    if wr.write_all(&out).await.is_err() {
                        return;
                    }
                    out.clear();
                }
            }
            ev = next_event(&mut events) => {
                match ev {
                    Ok(m) => {
                        if wr.write_all(&m.bytes).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!("a QMP monitor fell behind and lost {n} events");
                    }
                    Err(broadcast::error::RecvError::Closed) => events = None,
                }
            }
            _ = shutdown.changed() => {}
        }
    }
    // Shutting down or the client left: deliver what is pending (the SHUTDOWN event).
    if let Some(m) = held.take() {
        out.extend_from_slice(&m.bytes);
    }
    if flush_events(&mut events, &mut out, u64::MAX, &mut held) && !out.is_empty() {
        let _ = wr.write_all(&out).await;
    }
    let _ = wr.shutdown().await;
}

/// Appends the events already waiting, up to sequence number `upto`; the first later one is
/// put in `held` (the caller writes it after the reply; the rest stay in the channel). False
/// if the connection should end.
fn flush_events(
    events: &mut Option<broadcast::Receiver<Arc<EventMsg>>>,
    out: &mut Vec<u8>,
    upto: u64,
    held: &mut Option<Arc<EventMsg>>,
) -> bool {
    let Some(rx) = events else { return true };
    loop {
        match rx.try_recv() {
            Ok(m) if m.seq > upto => {
                *held = Some(m);
                return true;
            }
            Ok(m) => out.extend_from_slice(&m.bytes),
            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                tracing::warn!("a QMP monitor fell behind and lost {n} events");
            }
            Err(_) => return true,
        }
    }
}

async fn next_event(
    events: &mut Option<broadcast::Receiver<Arc<EventMsg>>>,
) -> Result<Arc<EventMsg>, broadcast::error::RecvError> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Daemon {
    /// Serves QMP monitors on `listener` until shutdown (spawned on the current runtime).
    pub fn spawn_monitor_listener(self: &Arc<Self>, listener: MonitorListener) {
        let daemon = self.clone();
        tokio::spawn(async move { daemon.accept_monitors(listener).await });
    }

    async fn accept_monitors(self: Arc<Self>, listener: MonitorListener) {
        let limit = Arc::new(Semaphore::new(MAX_CLIENTS_PER_MONITOR));
        let mut shutdown = self.shutdown_watch();
        loop {
            if self.is_shutting_down() {
                break;
            }
            let Ok(permit) = limit.clone().acquire_owned().await else {
                break;
            };
            tokio::select! {
                r = listener.accept() => match r {
                    Ok(stream) => {
                        self.monitor_opened();
                        let daemon = self.clone();
                        tokio::spawn(async move {
                            match stream {
                                MonitorStream::Unix(s) => run(daemon.clone(), s).await,
                                MonitorStream::Tcp(s) => run(daemon.clone(), s).await,
                            }
                            drop(permit);
                            daemon.monitor_closed();
                        });
                    }
                    Err(e) => {
                        tracing::warn!("monitor accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = shutdown.changed() => {}
            }
        }
        if let MonitorListener::Unix(_, path) = &listener {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A socket monitors are served on (`--chardev socket,...,server=on`).
#[derive(Debug)]
pub enum MonitorListener {
    /// The path is unlinked when the daemon stops.
    Unix(tokio::net::UnixListener, PathBuf),
    Tcp(tokio::net::TcpListener),
}

enum MonitorStream {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

impl MonitorListener {
    async fn accept(&self) -> std::io::Result<MonitorStream> {
        Ok(match self {
            MonitorListener::Unix(l, _) => MonitorStream::Unix(l.accept().await?.0),
            MonitorListener::Tcp(l) => MonitorStream::Tcp(l.accept().await?.0),
        })
    }
}
