//! Zero-copy read replies: the bytes of a read go from a file's page cache to the client's
//! socket with `splice(2)`, never through a buffer of ours.
//!
//! A read the export can place in a file ([`Export::with_file_range`]: the `file` plugin, and
//! the filters that pass it through or keep data in a file of their own) is spliced from the
//! file into a pipe (the kernel takes references to the page-cache pages, it copies nothing),
//! and only then is its reply header written; the pipe is then spliced into the socket, which
//! since Linux 6.5 attaches the pages to the socket buffer (`MSG_SPLICE_PAGES`) instead of
//! copying them. A plain `pread` + `write` reply copies every byte twice; this one copies it
//! on the client's side only.
//!
//! Order is what keeps replies exact. The first part of the data is in the pipe *before* the
//! header is written: if the file cannot give it (no file range, an error, the file ending
//! early), the pipe is emptied and the request is read with `pread` as before, so the client
//! gets exactly the reply (data or error) it always got. A read larger than the pipe is sent
//! in pieces after the header; a piece the file cannot give is read with `pread` instead, and
//! only if that fails too is the connection closed (the header promised data that cannot
//! come), with one log line, as when a reply cannot be written.
//!
//! Each thread owns one pipe ([`with_pipe`]), created on its first spliced read and sized to
//! [`PIPE_SIZE`] if the system allows (otherwise the default 64 KiB, in more pieces). It is
//! empty between requests; a pipe left holding bytes after an error is closed, never reused.
//! It costs two descriptors per worker thread of a connection that has spliced a read, until
//! the connection ends ([`close_pipe`]); when no pipe can be made (out of descriptors), reads
//! go the old way.
//! Only plain Unix and TCP sockets splice: a TLS session must encrypt the bytes in memory.
//!
//! Pages in a pipe or a socket buffer are references, not copies (as with `sendfile(2)`): a
//! write into the same range after the read was spliced, before the client has taken the
//! reply, can change what the client receives. Only a request racing with the read can do
//! that, and racing requests have no order in NBD; layers whose own housekeeping rewrites a
//! file (a cache reclaiming blocks) do not offer it ([`sluice_block::Handle::file_range`]).

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use sluice_block::Export;

/// The pipe size asked for: a typical large read (nbdcopy's 256 KiB, qemu's up to 2 MiB) in
/// one or a few pieces. `/proc/sys/fs/pipe-max-size` is 1 MiB by default.
const PIPE_SIZE: usize = 1024 * 1024;

/// One thread's pipe and how many bytes it holds.
pub(super) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes one fill may ask for.
    cap: usize,
    /// Bytes in the pipe now (0 between requests).
    held: usize,
    /// Bytes that should have left the pipe could not be taken out: close it.
    broken: bool,
}

thread_local! {
    static PIPE: RefCell<Option<Pipe>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's pipe, creating it first if needed; None if no pipe can be made
/// (the caller then reads as before). A pipe that `f` marked broken is closed.
pub(super) fn with_pipe<R>(f: impl FnOnce(&mut Pipe) -> R) -> Option<R> {
    PIPE.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            match Pipe::new() {
                Ok(p) => *slot = Some(p),
                Err(e) => {
                    tracing::debug!("no pipe for spliced reads: {e}");
                    return None;
                }
            }
        }
        let pipe = slot.as_mut()?;
        let r = f(pipe);
        if pipe.broken {
            *slot = None;
        }
        Some(r)
    })
}

/// Closes this thread's pipe, if it has one (a connection thread at the end of its
/// connection: threads are kept for the next client, their pipes need not be).
pub(super) fn close_pipe() {
    PIPE.with(|cell| *cell.borrow_mut() = None);
}

/// Closes this thread's pipe if it holds bytes (after a reply that could not be finished).
pub(super) fn forget_pipe() {
    PIPE.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_some_and(|p| p.held != 0) {
            *slot = None;
        }
    });
}

/// How far a fill got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Filled {
    /// Bytes now in the pipe, from the start of the range asked for.
    pub n: usize,
    /// False if the file ended or failed before the bytes asked for (or the pipe) ran out.
    pub complete: bool,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the two-element array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are open descriptors that nothing else owns.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A refusal (over pipe-max-size, or the user's pipe quota) keeps the default size.
        // SAFETY: fcntl on a descriptor we own, with an integer argument.
        unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_SIZE as libc::c_int,
            )
        };
        // SAFETY: as above; F_GETPIPE_SZ takes no argument.
        let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        if size <= 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Pipe {
            read,
            write,
            cap: size as usize,
            held: 0,
            broken: false,
        })
    }

    pub fn held(&self) -> usize {
        self.held
    }

    /// Splices up to `len` bytes from `offset` of `file` into the (empty) pipe. Never
    /// blocks on the pipe: a fill stops when the pipe is full (an unaligned range needs one
    /// page more than its length), which still counts as complete.
    pub fn fill(&mut self, file: BorrowedFd<'_>, offset: u64, len: usize) -> Filled {
        debug_assert_eq!(self.held, 0, "a fill starts with an empty pipe");
        let want = len.min(self.cap);
        let Ok(mut off) = libc::off64_t::try_from(offset) else {
            return Filled {
                n: 0,
                complete: false,
            };
        };
        loop {
            if self.held == want {
                return Filled {
                    n: self.held,
                    complete: true,
                };
            }
            // SAFETY: both descriptors are open for the call (`file` is borrowed, the pipe is
            // ours); `off` is a valid off64_t the kernel advances; no user memory is passed.
            let r = unsafe {
                libc::splice(
                    file.as_raw_fd(),
                    &mut off,
                    self.write.as_raw_fd(),
                    std::ptr::null_mut(),
                    want - self.held,
                    libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
                )
            };
            match r {
                0 => {
                    return Filled {
                        n: self.held,
                        complete: false,
                    }
                }
                n if n > 0 => self.held += n as usize,
                _ => {
                    let e = io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::EINTR) => {}
                        // The pipe is full: what it holds goes first.
                        Some(libc::EAGAIN) if self.held > 0 => {
                            return Filled {
                                n: self.held,
                                complete: true,
                            }
                        }
                        _ => {
                            tracing::debug!("splice from a file at {offset}: {e}");
                            return Filled {
                                n: self.held,
                                complete: false,
                            };
                        }
                    }
                }
            }
        }
    }

    /// Splices everything the pipe holds into `sock` (blocking until the socket takes it);
    /// `more` says the reply goes on after it.
    pub fn send(&mut self, sock: RawFd, more: bool) -> io::Result<()> {
        let flags = libc::SPLICE_F_MOVE | if more { libc::SPLICE_F_MORE } else { 0 };
        let read = self.read.as_raw_fd();
        self.drain(io::ErrorKind::WriteZero, |held| {
            // SAFETY: both descriptors are open for the call; no user memory is passed.
            unsafe {
                libc::splice(
                    read,
                    std::ptr::null_mut(),
                    sock,
                    std::ptr::null_mut(),
                    held,
                    flags,
                )
            }
        })
    }

    /// Empties the pipe by reading it into `scratch` (bytes that will not be sent).
    pub fn discard(&mut self, scratch: &mut [u8]) -> io::Result<()> {
        let read = self.read.as_raw_fd();
        self.drain(io::ErrorKind::UnexpectedEof, |held| {
            let n = held.min(scratch.len());
            // SAFETY: `scratch` is valid for writes of `n <= scratch.len()` bytes.
            unsafe { libc::read(read, scratch.as_mut_ptr().cast(), n) }
        })
    }

    /// Takes the pipe's bytes out with `step` (given how many it holds; returns what a
    /// `read`-like call returns) until it is empty; a step that moves nothing is `zero`.
    fn drain(
        &mut self,
        zero: io::ErrorKind,
        mut step: impl FnMut(usize) -> isize,
    ) -> io::Result<()> {
        while self.held > 0 {
            match step(self.held) {
                0 => return Err(zero.into()),
                n if n > 0 => self.held -= n as usize,
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Puts the first part of the read `[offset, offset+length)` into this thread's pipe, if the
/// export can place the range in a file and the file gives it. Returns the bytes now in the
/// pipe; None (with the pipe empty) when the request must be read as before. `scratch`
/// receives bytes that must be thrown away.
pub(super) fn start(
    export: &Export,
    offset: u64,
    length: u64,
    scratch: &mut [u8],
) -> Option<usize> {
    with_pipe(|p| {
        let filled = export.with_file_range(length, offset, |r| {
            p.fill(
                r.fd,
                r.offset,
                usize::try_from(length).unwrap_or(usize::MAX),
            )
        })?;
        if filled.n > 0 && filled.complete {
            return Some(filled.n);
        }
        // Bytes of a range that came up short are thrown away; if even that fails, the pipe
        // is closed (by with_pipe), since it still holds them.
        if p.discard(scratch).is_err() {
            p.broken = true;
        }
        None
    })
    .flatten()
}

/// Writes all of `bytes` to `sock` with `MSG_MORE` (the reply's data follows).
pub(super) fn send_header(sock: RawFd, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        // SAFETY: `bytes` is valid for reads of its length for the call.
        let r = unsafe {
            libc::send(
                sock,
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_MORE | libc::MSG_NOSIGNAL,
            )
        };
        match r {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n if n > 0 => bytes = &bytes[n as usize..],
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    fn temp_file(bytes: &[u8]) -> std::fs::File {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("sluice-splice-{}-{:p}", std::process::id(), bytes));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn pipe_fill_then_send_moves_the_exact_range() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let file = temp_file(&data);
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 200_000];
            a.read_exact(&mut got).unwrap();
            got
        });
        let mut p = Pipe::new().unwrap();
        let mut at = 12_345u64;
        let end = at + 200_000;
        while at < end {
            let f = p.fill(file.as_fd(), at, (end - at) as usize);
            assert!(f.n > 0 && f.complete, "{f:?}");
            at += f.n as u64;
            p.send(b.as_raw_fd(), at < end).unwrap();
        }
        assert_eq!(reader.join().unwrap(), &data[12_345..212_345]);
    }

    #[test]
    fn pipe_fill_past_end_of_file_is_incomplete() {
        let file = temp_file(&[7u8; 10_000]);
        let mut p = Pipe::new().unwrap();
        let f = p.fill(file.as_fd(), 8_000, 4_096);
        assert_eq!(
            f,
            Filled {
                n: 2_000,
                complete: false
            }
        );
        p.discard(&mut [0u8; 512]).unwrap();
        assert_eq!(p.held(), 0);
    }
}
