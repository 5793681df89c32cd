//! An encrypted connection that several threads use at once: [`TlsStream`].
//!
//! The transmission phase reads and writes one socket from many threads (`nbd/transmit.rs`:
//! one worker at a time reads requests under the reader lock, another writes its reply under
//! the writer lock, concurrently). A TLS session is one state machine: OpenSSL's `SSL` object
//! must not be used by two threads at once, even for a read and a write. So:
//!
//! - The `SSL` object lives behind one mutex, and the socket under it is **non-blocking**.
//!   Every `SSL_read` and `SSL_write` is one short, non-blocking call made under the mutex
//!   (decrypting or encrypting what is there, at most a few records).
//! - When OpenSSL answers "want read" or "want write", the thread **releases the mutex** and
//!   waits in `poll(2)` on the socket, then retries. A reader blocked waiting for the client
//!   therefore never holds the lock, and a writer is never kept waiting by it; a writer
//!   blocked on a full socket buffer does not hold it either.
//! - Callers still serialize readers among themselves and writers among themselves (the
//!   transmission phase's reader and writer locks do), because a partial `SSL_write` must be
//!   retried with the same bytes before anything else is written.
//!
//! No wake-up can be lost: only `SSL_read` takes bytes from the socket (renegotiation, the one
//! case where a write reads, is disabled), so when `SSL_read` reports "want read" there is no
//! complete record buffered in OpenSSL, and the next byte to arrive wakes the `poll`. Server
//! shutdown shuts the socket's read side, which wakes the `poll` and reads as end of input.
//!
//! This keeps the transmission code unchanged for TLS (it sees a [`Stream`]) at the cost of
//! one uncontended mutex per read or write call, which is small next to the cipher. A
//! dedicated I/O thread per connection would cost two thread hand-offs per request instead.
//!
//! The handshake runs with the same loop, bounded by a deadline, so a client that stalls
//! mid-handshake (or sends half a ClientHello and waits) is dropped after
//! [`HANDSHAKE_TIMEOUT`](super::HANDSHAKE_TIMEOUT). When the stream is dropped, a
//! `close_notify` alert is sent (best effort), as GnuTLS peers expect.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use openssl::ssl::{ErrorCode, Ssl, SslContext, SslRef, SslStream};

use super::HandshakeError;
use crate::stream::Stream;

/// A TLS session over a client socket, usable from several threads (see the module doc).
pub struct TlsStream {
    ssl: Mutex<SslStream<Stream>>,
    /// A duplicate of the socket, for `poll`, shutdown and peer details without the lock.
    sock: Stream,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("sock", &self.sock)
            .finish_non_exhaustive()
    }
}

impl TlsStream {
    /// Runs the server side of the TLS handshake on `stream` (which is made non-blocking),
    /// giving up after `timeout`.
    pub(crate) fn accept(
        ctx: &SslContext,
        stream: Stream,
        timeout: Duration,
    ) -> Result<TlsStream, HandshakeError> {
        let sock = stream.try_clone()?;
        stream.set_nonblocking(true)?;
        let fd = sock.as_raw_fd();
        let ssl = Ssl::new(ctx).map_err(|e| HandshakeError::Tls(super::reason(&e)))?;
        let mut s =
            SslStream::new(ssl, stream).map_err(|e| HandshakeError::Tls(super::reason(&e)))?;
        let deadline = Instant::now() + timeout;
        loop {
            let e = match s.accept() {
                Ok(()) => break,
                Err(e) => e,
            };
            let ready = match e.code() {
                ErrorCode::WANT_READ => wait(fd, libc::POLLIN, Some(deadline)),
                ErrorCode::WANT_WRITE => wait(fd, libc::POLLOUT, Some(deadline)),
                ErrorCode::SYSCALL if e.io_error().is_none() => {
                    return Err(HandshakeError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "client closed the connection during the TLS handshake",
                    )))
                }
                _ => return Err(handshake_failure(s.ssl(), e)),
            };
            ready.map_err(|e| match e.kind() {
                io::ErrorKind::TimedOut => HandshakeError::Timeout,
                _ => HandshakeError::Io(e),
            })?;
        }
        Ok(TlsStream {
            ssl: Mutex::new(s),
            sock,
        })
    }

    /// Runs `f` on the session (under the lock), e.g. to read the peer's certificate.
    pub(crate) fn with_ssl<R>(&self, f: impl FnOnce(&SslRef) -> R) -> R {
        f(self.lock().ssl())
    }

    /// The protocol version and cipher, for log lines (`TLSv1.3 TLS_AES_256_GCM_SHA384`).
    pub fn describe(&self) -> String {
        self.with_ssl(|ssl| {
            let cipher = ssl.current_cipher().map_or("?", |c| c.name());
            format!("{} {cipher}", ssl.version_str())
        })
    }

    /// The plain socket underneath (a duplicate): for shutdown and peer details.
    pub(crate) fn socket(&self) -> &Stream {
        &self.sock
    }

    /// True if decrypted input is waiting in the session or raw input in the socket.
    pub(crate) fn has_pending_input(&self) -> bool {
        self.lock().ssl().pending() > 0 || self.sock.has_pending_input()
    }

    fn lock(&self) -> MutexGuard<'_, SslStream<Stream>> {
        self.ssl.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads decrypted bytes, waiting (without the lock) until some arrive; 0 at the end of
    /// the stream (`close_notify`, or the client closing the socket).
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let r = self.lock().ssl_read(buf);
            let e = match r {
                Ok(n) => return Ok(n),
                Err(e) => e,
            };
            match e.code() {
                ErrorCode::ZERO_RETURN => return Ok(0),
                ErrorCode::SYSCALL if e.io_error().is_none() => return Ok(0),
                ErrorCode::WANT_READ => wait(self.sock.as_raw_fd(), libc::POLLIN, None)?,
                ErrorCode::WANT_WRITE => wait(self.sock.as_raw_fd(), libc::POLLOUT, None)?,
                _ => return Err(io_failure(e)),
            }
        }
    }

    /// Encrypts and sends some of `buf`, waiting (without the lock) while the socket is full.
    /// One writer at a time (see the module doc).
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let r = self.lock().ssl_write(buf);
            let e = match r {
                Ok(n) => return Ok(n),
                Err(e) => e,
            };
            match e.code() {
                ErrorCode::WANT_WRITE => wait(self.sock.as_raw_fd(), libc::POLLOUT, None)?,
                ErrorCode::WANT_READ => wait(self.sock.as_raw_fd(), libc::POLLIN, None)?,
                ErrorCode::ZERO_RETURN => {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the client closed the TLS session",
                    ))
                }
                _ => return Err(io_failure(e)),
            }
        }
    }
}

impl Drop for TlsStream {
    fn drop(&mut self) {
        // Best effort close_notify; the socket is non-blocking, so this never waits.
        let s = self.ssl.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = s.shutdown();
    }
}

/// Waits until `fd` is ready for `events`, or the deadline passes (a handshake timeout).
/// Errors and hang-ups count as ready: the retried call reports them.
fn wait(fd: RawFd, events: libc::c_short, deadline: Option<Instant>) -> Result<(), io::Error> {
    loop {
        let timeout_ms = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                left.as_millis().min(i32::MAX as u128) as libc::c_int
            }
        };
        let mut pfd = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the length of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        match r {
            r if r > 0 => return Ok(()),
            0 => continue,
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// A handshake error with what OpenSSL and certificate verification say about it.
fn handshake_failure(ssl: &SslRef, e: openssl::ssl::Error) -> HandshakeError {
    if let Some(io) = e.io_error() {
        return HandshakeError::Io(io::Error::new(io.kind(), io.to_string()));
    }
    let mut why = match e.ssl_error() {
        Some(stack) => super::reason(stack),
        None => format!("OpenSSL error code {}", e.code().as_raw()),
    };
    let verify = ssl.verify_result();
    if verify.as_raw() != 0 {
        why = format!("{why}: {}", verify.error_string());
    }
    HandshakeError::Tls(why)
}

fn io_failure(e: openssl::ssl::Error) -> io::Error {
    match e.into_io_error() {
        Ok(io) => io,
        Err(e) => io::Error::other(match e.ssl_error() {
            Some(stack) => format!("TLS error: {}", super::reason(stack)),
            None => format!("TLS error: OpenSSL error code {}", e.code().as_raw()),
        }),
    }
}
