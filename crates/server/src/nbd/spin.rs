//! Busy-polling the socket briefly before sleeping in `read`.
//!
//! At queue depth 1 a client sends its next request a few microseconds after our reply
//! reached it. A worker that blocks in `read` in between is put to sleep and woken again: on
//! this machine kind the wake-up alone (scheduler, IPI, cache refill) is a large part of a
//! 4 KiB round trip. Polling the socket with non-blocking `recv` for a short budget first
//! catches the next request while the thread is still running. This is what `SO_BUSY_POLL`
//! does for NIC queues, which a Unix socket has not, so it is done here. A small write
//! payload that comes after its header (libnbd sends the two in separate writes) is polled
//! for the same way: without it, QD1 4 KiB writes to `memory` went at 24.5k IOPS against
//! reads' 40k, and with it at 39.5k.
//!
//! On by default, for [`DEFAULT_BUDGET`] (50 µs; `SLUICE_SPIN_US=N` sets another budget in
//! microseconds, `SLUICE_SPIN_US=0` turns it off). QEMU's IOThreads poll the same way by
//! default (`poll-max-ns`, 32 µs). Measured here (bench/README.md, "Busy-polling"): on a quiet
//! 2-vCPU VM, 4 KiB random reads at queue depth 1 went from 14.2k to 34.2k IOPS on `memory`
//! and from 21.5k to 25.0k on `file`, in one interleaved run with nbdkit at 15.0k and 14.4k:
//! an idle vCPU halts, and waking it costs more than the whole round trip (the floor row is 55
//! µs quiet and 11 µs with one core kept busy). With one core kept busy no vCPU halts, and
//! polling changes less (0.93x to 1.21x of the rows without it); no QD32 row got slower
//! (polling only happens while no other worker of the connection is running).
//!
//! It costs CPU, so it is bounded three ways:
//! - a budget per wait (above);
//! - only while no other worker of the connection is running a request (the caller decides):
//!   a busy worker needs the core more than a poller does;
//! - after [`MISS_LIMIT`] waits in a row in which nothing came within the budget (an idle or
//!   slow client), polling pauses for the next [`PAUSE_WAITS`] waits, so an idle connection
//!   does not keep a core busy.
//!
//! Between polls the thread yields, so on a loaded machine another runnable thread (a peer's,
//! or the client's own) gets the core first.

use std::io;
use std::os::fd::RawFd;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Waits in a row without input within the budget before polling pauses.
pub(crate) const MISS_LIMIT: u32 = 4;
/// Waits that go straight to a blocking read once polling has paused.
pub(crate) const PAUSE_WAITS: u32 = 64;

/// The polling budget when `SLUICE_SPIN_US` is not set.
pub(crate) const DEFAULT_BUDGET: Duration = Duration::from_micros(50);

/// The process-wide polling budget: `SLUICE_SPIN_US`, read once; None when off.
pub(crate) fn budget_from_env() -> Option<Duration> {
    static BUDGET: OnceLock<Option<Duration>> = OnceLock::new();
    *BUDGET.get_or_init(|| {
        let v = std::env::var("SLUICE_SPIN_US").ok();
        parse_budget(v.as_deref()).unwrap_or_else(|bad| {
            tracing::warn!(
                "SLUICE_SPIN_US={bad:?} is not a number of microseconds; polling {} µs",
                DEFAULT_BUDGET.as_micros()
            );
            Some(DEFAULT_BUDGET)
        })
    })
}

/// The budget `v` asks for: the default when unset, None (off) for 0, at most 1 ms; Err with
/// the value when it is not a number.
fn parse_budget(v: Option<&str>) -> Result<Option<Duration>, String> {
    let Some(v) = v else {
        return Ok(Some(DEFAULT_BUDGET));
    };
    let us: u64 = v.trim().parse().map_err(|_| v.to_string())?;
    // More than a millisecond of polling is never a latency win; cap it.
    Ok((us > 0).then(|| Duration::from_micros(us.min(1000))))
}

/// Per-connection polling state.
#[derive(Debug)]
pub(crate) struct Spinner {
    budget: Duration,
    misses: u32,
    paused: u32,
}

impl Spinner {
    /// A connection's spinner. Its first wait (for the first request after the handshake)
    /// does not poll: a client that connects for one request or none (nbdinfo, `qemu-img
    /// info`, a health check) gains nothing from it, and the poller would take the core that
    /// client's next handshake needs (a python3-libnbd connect loop made 15% fewer
    /// connections a second with it, at 1.4x the server CPU per connection).
    pub(crate) fn new(budget: Duration) -> Spinner {
        Spinner {
            budget,
            misses: 0,
            paused: 1,
        }
    }

    /// Polls `fd` for input into `buf` for up to the budget. Some(result of the read) when
    /// input (or end of input, or an error) came; None when the caller should block in `read`.
    pub(crate) fn poll(&mut self, fd: RawFd, buf: &mut [u8]) -> Option<io::Result<usize>> {
        if self.paused > 0 {
            self.paused -= 1;
            return None;
        }
        let start = Instant::now();
        loop {
            // SAFETY: fd is the connection's open socket; buf is writable for buf.len() bytes.
            let n =
                unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n >= 0 {
                self.misses = 0;
                return Some(Ok(n as usize));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => {}
                _ => return Some(Err(e)),
            }
            if start.elapsed() >= self.budget {
                self.misses += 1;
                if self.misses >= MISS_LIMIT {
                    self.misses = 0;
                    self.paused = PAUSE_WAITS;
                }
                return None;
            }
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn budget_parse_default_off_on_and_capped() {
        assert_eq!(parse_budget(None), Ok(Some(Duration::from_micros(50))));
        assert_eq!(parse_budget(Some("0")), Ok(None));
        assert_eq!(parse_budget(Some(" 0 ")), Ok(None));
        assert_eq!(parse_budget(Some("x")), Err("x".to_string()));
        assert_eq!(
            parse_budget(Some("30")),
            Ok(Some(Duration::from_micros(30)))
        );
        assert_eq!(
            parse_budget(Some("50000")),
            Ok(Some(Duration::from_millis(1)))
        );
    }

    /// A spinner past its connection's first wait.
    fn polling(budget: Duration) -> Spinner {
        Spinner {
            paused: 0,
            ..Spinner::new(budget)
        }
    }

    #[test]
    fn spinner_first_wait_does_not_poll() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut s = Spinner::new(Duration::from_micros(50));
        let mut buf = [0u8; 16];
        assert!(s.poll(b.as_raw_fd(), &mut buf).is_none());
        a.write_all(b"x").unwrap();
        assert_eq!(s.poll(b.as_raw_fd(), &mut buf).unwrap().unwrap(), 1);
    }

    #[test]
    fn spinner_input_already_there_is_read() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"hello").unwrap();
        let mut s = polling(Duration::from_micros(50));
        let mut buf = [0u8; 16];
        let n = s.poll(b.as_raw_fd(), &mut buf).unwrap().unwrap();
        assert_eq!(&buf[..n], b"hello");
    }

    #[test]
    fn spinner_end_of_input_is_reported() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        let mut s = polling(Duration::from_micros(50));
        let mut buf = [0u8; 16];
        assert_eq!(s.poll(b.as_raw_fd(), &mut buf).unwrap().unwrap(), 0);
    }

    #[test]
    fn spinner_idle_peer_pauses_polling_after_misses() {
        let (_a, b) = UnixStream::pair().unwrap();
        let mut s = polling(Duration::from_micros(20));
        let mut buf = [0u8; 16];
        for _ in 0..MISS_LIMIT {
            assert!(s.poll(b.as_raw_fd(), &mut buf).is_none());
        }
        // Paused: returns at once without polling, PAUSE_WAITS times.
        let t = Instant::now();
        for _ in 0..PAUSE_WAITS {
            assert!(s.poll(b.as_raw_fd(), &mut buf).is_none());
        }
        assert_eq!(s.paused, 0);
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
