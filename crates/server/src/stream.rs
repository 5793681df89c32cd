//! Sockets the NBD server accepts on: Unix and TCP, behind one type each for listeners
//! (async, for accepting) and connections (blocking, for the transmission threads).
//!
//! A connection is usually one socket; `-s` on standard input and output that are not a socket
//! (two pipes, as a parent that spawns the server with `subprocess` pipes gets) is a
//! [`Stream::Pipe`]: reads from one descriptor, writes to the other, so the transmission code,
//! which reads on one thread and writes on others, works unchanged. A pipe cannot be shut
//! down, so closing such a connection waits for the client to close its end (the server
//! exits after its single connection anyway), and STARTTLS is refused on it (see
//! [`Stream::can_starttls`]).
//!
//! A connection upgraded with `NBD_OPT_STARTTLS` stays a [`Stream`] ([`Stream::Tls`]), so the
//! negotiation and transmission code reads and writes it as any other socket; how one TLS
//! session is shared by a connection's threads is [`crate::tls::TlsStream`]'s business.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use crate::tls::TlsStream;

/// A listening socket.
pub enum Listener {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

impl Listener {
    /// Waits for the next client and returns it as a blocking stream.
    pub async fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l) => {
                let (s, _) = l.accept().await?;
                let s = s.into_std()?;
                s.set_nonblocking(false)?;
                Ok(Stream::unix(s))
            }
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                let s = s.into_std()?;
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                Ok(Stream::tcp(s))
            }
        }
    }

    /// Wraps an already bound and listening std socket (used for socket activation too).
    /// Must be called inside a tokio runtime.
    pub fn from_std_unix(l: std::os::unix::net::UnixListener) -> io::Result<Listener> {
        l.set_nonblocking(true)?;
        Ok(Listener::Unix(tokio::net::UnixListener::from_std(l)?))
    }

    pub fn from_std_tcp(l: std::net::TcpListener) -> io::Result<Listener> {
        l.set_nonblocking(true)?;
        Ok(Listener::Tcp(tokio::net::TcpListener::from_std(l)?))
    }
}

/// A connected client socket in blocking mode, or a TLS session over one.
///
/// Clones share one descriptor (an `Arc`), not a `dup` each: a connection's reader, writer and
/// the server's handle for shutting it down cost one descriptor, so 10,000 idle connections
/// fit in a 20,000-descriptor limit. The socket closes when the last clone goes, as it did
/// when every clone was a duplicate.
#[derive(Debug)]
pub enum Stream {
    Unix(Arc<std::os::unix::net::UnixStream>),
    Tcp(Arc<std::net::TcpStream>),
    /// A TLS session; clones share it (one reader and one writer at a time).
    Tls(Arc<TlsStream>),
    /// Two one-way descriptors (`-s` on pipes): the client's requests come in on `read`,
    /// replies go out on `write`.
    Pipe {
        read: std::fs::File,
        write: std::fs::File,
    },
}

impl Stream {
    /// A connected Unix socket.
    pub fn unix(s: std::os::unix::net::UnixStream) -> Stream {
        Stream::Unix(Arc::new(s))
    }

    /// A connected TCP socket.
    pub fn tcp(s: std::net::TcpStream) -> Stream {
        Stream::Tcp(Arc::new(s))
    }

    /// Another handle on the same connection: the same socket (no new descriptor), or the same
    /// TLS session; a pipe pair's descriptors are duplicated.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.clone()),
            Stream::Tcp(s) => Stream::Tcp(s.clone()),
            Stream::Tls(t) => Stream::Tls(t.clone()),
            Stream::Pipe { read, write } => Stream::Pipe {
                read: read.try_clone()?,
                write: write.try_clone()?,
            },
        })
    }

    /// A connection on two descriptors (`-s` when standard input is not a socket).
    pub fn pipe(read: std::fs::File, write: std::fs::File) -> Stream {
        Stream::Pipe { read, write }
    }

    /// False for a pipe pair: a TLS session needs one two-way descriptor to wait on.
    pub fn can_starttls(&self) -> bool {
        !matches!(self, Stream::Pipe { .. })
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Tls(t) => t.socket().shutdown(how),
            // A pipe has no shutdown: its ends close when the last descriptor goes.
            Stream::Pipe { .. } => Ok(()),
        }
    }

    pub fn is_unix(&self) -> bool {
        match self {
            Stream::Unix(_) => true,
            Stream::Tcp(_) | Stream::Pipe { .. } => false,
            Stream::Tls(t) => t.socket().is_unix(),
        }
    }

    /// True for a Unix or TCP socket read and written directly: not a TLS session, not a
    /// pipe pair (what `recv(2)` and `send(2)` on [`AsRawFd::as_raw_fd`] may be used on).
    pub fn is_plain_socket(&self) -> bool {
        matches!(self, Stream::Unix(_) | Stream::Tcp(_))
    }

    /// True once the connection runs over TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    pub(crate) fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(on),
            Stream::Tcp(s) => s.set_nonblocking(on),
            Stream::Tls(t) => t.socket().set_nonblocking(on),
            Stream::Pipe { read, write } => {
                set_fd_nonblocking(read.as_raw_fd(), on)?;
                set_fd_nonblocking(write.as_raw_fd(), on)
            }
        }
    }

    /// True if client input is already here (reading will not block): bytes waiting in the
    /// socket or, with TLS, decrypted bytes waiting in the session.
    pub fn has_pending_input(&self) -> bool {
        if let Stream::Tls(t) = self {
            return t.has_pending_input();
        }
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD on our open socket writes one int.
        let r = unsafe { libc::ioctl(self.as_raw_fd(), libc::FIONREAD, &mut n) };
        r == 0 && n > 0
    }

    /// What a plugin may learn about the peer: credentials on Unix sockets, the address.
    pub fn connection_info(&self) -> sluice_block::ConnectionInfo {
        let fd = self.as_raw_fd();
        let mut info = sluice_block::ConnectionInfo::default();
        if self.is_unix() {
            // SAFETY: ucred is plain old data; getsockopt writes at most `len` bytes into it.
            let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
            // SAFETY: fd is our open socket; cred/len describe a writable buffer.
            let r = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_PEERCRED,
                    &mut cred as *mut _ as *mut libc::c_void,
                    &mut len,
                )
            };
            if r == 0 {
                info.peer_creds = Some(sluice_block::PeerCreds {
                    pid: cred.pid,
                    uid: cred.uid,
                    gid: cred.gid,
                });
            }
        }
        // SAFETY: sockaddr_storage is plain old data.
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: fd is our open socket; ss/len describe a writable buffer.
        if unsafe { libc::getpeername(fd, &mut ss as *mut _ as *mut libc::sockaddr, &mut len) } == 0
        {
            // SAFETY: getpeername wrote `len` bytes (at most the storage size) into `ss`.
            let bytes =
                unsafe { std::slice::from_raw_parts(&ss as *const _ as *const u8, len as usize) };
            info.peer_addr = Some(bytes.to_vec());
        }
        info
    }

    /// A short description of the peer for log lines.
    pub fn peer(&self) -> String {
        match self {
            Stream::Tls(t) => t.socket().peer(),
            Stream::Unix(_) => "unix".to_string(),
            Stream::Pipe { .. } => "pipe".to_string(),
            Stream::Tcp(s) => s
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp".into()),
        }
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Tls(t) => t.socket().as_raw_fd(),
            // The input side: what readiness checks (FIONREAD, poll for input) look at.
            Stream::Pipe { read, .. } => read.as_raw_fd(),
        }
    }
}

/// Sets or clears O_NONBLOCK on a descriptor.
fn set_fd_nonblocking(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no memory is passed.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = if on {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        if libc::fcntl(fd, libc::F_SETFL, flags) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => (&**s).read(buf),
            Stream::Tcp(s) => (&**s).read(buf),
            Stream::Tls(t) => t.read(buf),
            Stream::Pipe { read, .. } => read.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => (&**s).write(buf),
            Stream::Tcp(s) => (&**s).write(buf),
            Stream::Tls(t) => t.write(buf),
            Stream::Pipe { write, .. } => write.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
