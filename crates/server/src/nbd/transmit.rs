//! The NBD transmission phase of one connection.
//!
//! Shape (nbdkit's, chosen for the request path): a connection has 1..=N worker threads in a
//! [`std::thread::scope`]. A worker takes the reader lock, reads one request header and its
//! payload straight into its own buffer, releases the lock, runs the request against the
//! [`Export`], and writes the reply under the writer lock. Replies therefore go out in
//! completion order. When every worker is busy and the plugin may run requests in parallel,
//! another is started (up to N): at once for plugins that may block (a request arriving
//! behind a slow one must not wait for it), otherwise only when the client has already sent
//! more (input buffered or waiting in the socket), so that a client with one request in
//! flight is served by one thread with no lock hand-offs.
//!
//! **Pipelined reads from the page cache** are answered by the worker that read them, with
//! the reader lock still held and no other worker involved ([`inline_read`]), on exports
//! whose requests run in parallel (so that the try takes no lock): while another
//! request is buffered behind the one just read (the client sent several at once), a read
//! shorter than [`INLINE_READ_MAX`] whose bytes lie in a file ([`Export::with_file_range`], as
//! for splicing) is read with `preadv2(RWF_NOWAIT)`, which fails instead of waiting for a
//! disk, and its reply is gathered with the next ones into one write. A read that is not
//! all cached, or that came alone, runs as any request does.
//!
//! Each worker owns one buffer, laid out as `[reply header room | data]`: a read is done
//! into the data part and its reply header written just before it, so the reply leaves in a
//! single `write` with no copy; in steady state the request path allocates nothing. Socket
//! input is buffered so that small pipelined requests cost one `read` for many headers.
//!
//! **Asynchronous exports.** When the export can submit requests asynchronously
//! ([`Export::is_async`]: an RBD image, whose librbd completes requests by callback) no
//! worker waits for a request to finish. A worker first takes one of the connection's N slots
//! ([`super::inflight`]; N bounds the requests in flight, as N workers did), reads a request
//! and, if [`Export::submit`] takes it (read, write, flush, trim, zero, as the export
//! decides), hands its buffer over with the request and goes back to reading; the slot's
//! spare buffer becomes the worker's. On a plain Unix socket the backend's callback answers a
//! successful request itself when that costs no waiting ([`Replier`]: writer lock free, the
//! socket takes the whole reply at once); otherwise it queues the completion, and one reply
//! sender thread per connection ([`reply_sender`]) counts it in the statistics and writes its
//! reply. Either way the reply is exactly the bytes the synchronous path writes, in one
//! `write` under the writer lock, and the buffer goes back to the slot. A request the export declines (block
//! status, FUA that needs a flush after it, a failed check) runs synchronously in the worker as
//! before, so its error and reply are unchanged. Replies of both kinds go out in completion
//! order. At the end of input the connection waits until the sender has answered the last
//! request in flight (the backend's callback still holds the sender's queue, never a buffer
//! of a finished connection), then closes the handle.
//!
//! Lengths are checked before anything is read into memory: a payload larger than the
//! advertised maximum is refused (and skipped from the socket, or the connection closed if it
//! is absurd), never allocated.
//!
//! The protocol's rules are not decided here but in `sluice_proto::nbd`: which flags a command
//! takes and how a payload is framed (`command`, `RequestHeader`), and which reply each outcome
//! gets in the negotiated form ([`ReplyForm`], which writes every header this module sends).
//! This module owns the sockets, the buffers and the threads.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use sluice_block::plugin::{Flags, Support};
use sluice_block::stats::{now_ns, Op, Outcome};
use sluice_block::{
    AioKind, AioRequest, AioSink, BlockError, BlockStats, Declined, Errno, Export, ThreadModel,
};
use sluice_proto::nbd::command::{check_request, command_name, takes_payload, CommandError};
use sluice_proto::nbd::consts::{
    NBD_CMD_BLOCK_STATUS, NBD_CMD_CACHE, NBD_CMD_DISC, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_TRIM,
    NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_STATE_ZERO,
};
use sluice_proto::nbd::reply::MAX_READ_HEADER_LEN;
use sluice_proto::nbd::{decode_request, MetaContext, ReplyForm, RequestHeader};

use super::inflight::{Direct, Finished, Flight, Reservation};
use super::negotiate::Session;
use super::spare::{self, Recycled};
use super::spin::Spinner;
use super::splice;
use super::{ExportContext, NbdServer};
use crate::stream::Stream;

/// Room in front of read data for the largest reply header (extended header + offset).
const HEADROOM: usize = 64;
const _: () = assert!(HEADROOM >= MAX_READ_HEADER_LEN);
/// Socket input buffer size.
const READ_BUF: usize = 256 * 1024;
/// Reads at least this long on a plugin that reports extents are checked for holes first, so
/// a read of unallocated space goes out as one OFFSET_HOLE chunk instead of zeroes (unless a
/// layer must see every read: then every read reaches pread, as under nbdkit).
const HOLE_CHECK_MIN: u64 = 64 * 1024;
/// After this many hole checks in a row found data, a connection checks only one read in
/// [`HOLE_RECHECK_EVERY`] (a check can cost the plugin syscalls, e.g. two lseeks for `file`);
/// finding a hole makes it check every read again.
const HOLE_MISS_LIMIT: u32 = 8;
const HOLE_RECHECK_EVERY: u32 = 32;
/// Reads at least this long are spliced from a file when the export can place them in one
/// (see [`super::splice`]); shorter ones cost fewer system calls read and written.
const SPLICE_MIN: u64 = 32 * 1024;
/// A write payload at least this large makes the next socket read small ([`Reader::fill_limit`]).
const LARGE_PAYLOAD: u64 = 64 * 1024;
/// The socket read size after a large payload: a header and a little more.
const HEADER_FILL: usize = 4096;
/// An oversized write payload up to this size is read and dropped (the connection survives);
/// anything larger closes the connection.
const MAX_DISCARD: u64 = 64 * 1024 * 1024;

/// Buffered reader of requests.
struct Reader {
    stream: Stream,
    buf: Recycled,
    start: usize,
    end: usize,
    /// Most bytes one `read` asks for. After a large write payload it is small, so the next
    /// header is read without pulling much of the next payload into `buf` (which would then be
    /// copied again); otherwise it is the whole buffer, so many small requests cost one `read`.
    fill_limit: usize,
    /// Busy-polling before a blocking read (see [`super::spin`]); None when off or on TLS.
    spin: Option<Spinner>,
    /// Set by the worker before it reads: polling is allowed now (no other worker is busy).
    may_spin: bool,
}

/// Reads into `buf` from `stream`: first polling with `spin` when `allowed`
/// ([`Spinner::poll`]), then, if nothing came within its budget, blocking in `read`.
fn poll_or_read(
    spin: &mut Option<Spinner>,
    allowed: bool,
    stream: &mut Stream,
    buf: &mut [u8],
) -> io::Result<usize> {
    if let Some(polled) = spin
        .as_mut()
        .filter(|_| allowed)
        .and_then(|s| s.poll(stream.as_raw_fd(), buf))
    {
        return polled;
    }
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

/// Why a connection's input ended.
enum InputEnd {
    /// Clean end (EOF between requests, NBD_CMD_DISC, or server shutdown).
    Closed,
    /// The client broke the protocol or vanished mid-request: one log line, then close.
    Broken(String),
}

impl Reader {
    fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// True if a whole request header is buffered (so reading it will not block).
    fn has_buffered_request(&self, extended: bool) -> bool {
        !matches!(decode_request(self.buffered(), extended), Ok(None))
    }

    /// True if more client input is already here: buffered, or waiting in the socket.
    fn has_more_input(&self) -> bool {
        self.start != self.end || self.stream.has_pending_input()
    }

    /// Reads more input; Ok(false) at end of input.
    fn fill(&mut self) -> io::Result<bool> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > self.buf.len() / 2 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let stop = (self.end + self.fill_limit).min(self.buf.len());
        // Poll only between requests (nothing buffered), not inside a header.
        let poll = self.start == self.end && self.may_spin;
        let n = poll_or_read(
            &mut self.spin,
            poll,
            &mut self.stream,
            &mut self.buf[self.end..stop],
        )?;
        self.end += n;
        Ok(n > 0)
    }

    /// The next request header, or why input ended.
    fn header(&mut self, extended: bool) -> Result<RequestHeader, InputEnd> {
        loop {
            match decode_request(self.buffered(), extended) {
                Ok(Some((h, used))) => {
                    self.start += used;
                    return Ok(h);
                }
                Ok(None) => {}
                Err(e) => return Err(InputEnd::Broken(format!("bad request: {e}"))),
            }
            let partial = self.start != self.end;
            match self.fill() {
                Ok(true) => {}
                Ok(false) if !partial => return Err(InputEnd::Closed),
                Ok(false) => {
                    return Err(InputEnd::Broken(
                        "client disconnected in the middle of a request header".into(),
                    ))
                }
                Err(e) => return Err(InputEnd::Broken(format!("read error: {e}"))),
            }
        }
    }

    /// Fills `dst` from the buffer and then straight from the socket.
    fn payload(&mut self, dst: &mut [u8]) -> Result<(), InputEnd> {
        let have = (self.end - self.start).min(dst.len());
        dst[..have].copy_from_slice(&self.buf[self.start..self.start + have]);
        self.start += have;
        let mut got = have;
        while got < dst.len() {
            // A client may send the header and the payload in two writes (libnbd does): the
            // header then comes alone, and the payload a few microseconds later. A small
            // payload is polled for as a header is, or a QD1 write would sleep and be woken
            // between the two; a large one takes long enough that waking costs little.
            let small = (dst.len() - got) as u64 <= LARGE_PAYLOAD;
            let poll = self.may_spin && small;
            match poll_or_read(&mut self.spin, poll, &mut self.stream, &mut dst[got..]) {
                Ok(0) => {
                    return Err(InputEnd::Broken(
                        "client disconnected in the middle of a write payload".into(),
                    ))
                }
                Ok(n) => got += n,
                Err(e) => return Err(InputEnd::Broken(format!("read error: {e}"))),
            }
        }
        Ok(())
    }

    /// Skips `n` payload bytes without keeping them.
    fn discard(&mut self, mut n: u64) -> Result<(), InputEnd> {
        while n > 0 {
            if self.start == self.end {
                match self.fill() {
                    Ok(true) => {}
                    Ok(false) => {
                        return Err(InputEnd::Broken(
                            "client disconnected in the middle of a write payload".into(),
                        ))
                    }
                    Err(e) => return Err(InputEnd::Broken(format!("read error: {e}"))),
                }
            }
            let take = ((self.end - self.start) as u64).min(n) as usize;
            self.start += take;
            n -= take as u64;
        }
        Ok(())
    }
}

/// Worker bookkeeping: how many exist, how many are busy, whether input has ended.
struct Workers {
    count: usize,
    busy: usize,
    closing: bool,
}

/// A negotiated meta context and who answers it.
enum Answer {
    /// One of the contexts every export answers through its plugin.
    Plugin(MetaContext),
    /// One the export answers itself (a dirty bitmap).
    Export(Arc<dyn ExportContext>),
}

/// Most extents in one block-status chunk of an export's own context (qemu's
/// `NBD_MAX_BLOCK_STATUS_EXTENTS`, 1 MiB of 8-byte extents).
const MAX_OWN_EXTENTS: usize = (1 << 20) / 8;

struct Conn<'a> {
    server: &'a NbdServer,
    id: u64,
    export: Export,
    /// Where each finished request is counted (the export's statistics, then its node's).
    stats: Vec<Arc<BlockStats>>,
    /// The negotiated reply form: it writes every reply and decodes the request style.
    form: ReplyForm,
    /// Negotiated meta contexts, in the order their block-status chunks are sent.
    contexts: Vec<(u32, Answer)>,
    /// Pure-memory plugin: one worker that coalesces replies (see [`batch_worker`]).
    batch: bool,
    /// The plugin may block: start a spare worker whenever all are busy.
    blocking: bool,
    /// The export submits requests asynchronously: they are answered by the reply sender
    /// (see [`reply_sender`]), in flight in at most `max_workers` slots.
    flight: Option<Async>,
    /// Large reads of holes may be answered from block status without a pread: false when a
    /// layer of the stack must see every read ([`sluice_block::Plugin::must_see_every_read`]).
    hole_shortcut: bool,
    /// Hole checks in a row that found data, and reads since checking was thinned out.
    hole_misses: AtomicU32,
    hole_skips: AtomicU32,
    /// Read replies may be spliced from a file ([`super::splice`]): a plain socket, a worker
    /// per request (neither the batch worker nor the asynchronous reply sender splice).
    splice: bool,
    /// Small reads are tried from the page cache on the reading thread ([`inline_read`]).
    inline_reads: bool,
    max_workers: usize,
    reader: Mutex<Reader>,
    /// Shared with the backend's callback when it may answer requests itself ([`Replier`]).
    writer: Arc<Mutex<Stream>>,
    workers: Mutex<Workers>,
}

/// A connection's asynchronous requests: their slots, and the same as the backend's sink.
struct Async {
    flight: Arc<Flight>,
    sink: Arc<dyn AioSink>,
}

impl Conn<'_> {
    /// True if every worker is busy and another may be started.
    fn may_grow(&self) -> bool {
        let w = lock(&self.workers);
        w.busy + 1 >= w.count && w.count < self.max_workers
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs the transmission phase until the client disconnects or the server shuts down.
pub(super) fn run(server: &Arc<NbdServer>, id: u64, session: Session) {
    let Session {
        stream,
        export,
        backend,
        name: _,
        named,
        negotiated,
        leftover,
    } = session;
    // The poller reads with recv(2) and splice writes to the descriptor: a plain socket only
    // (not a TLS session, not `-s` on pipes). The callback's direct replies rely on a Unix
    // socket's all-or-nothing sends ([`DIRECT_MAX`]).
    let plain_socket = stream.is_plain_socket();
    let plain_unix = matches!(stream, Stream::Unix(_));
    let writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(conn = id, "cannot duplicate socket: {e}");
            return;
        }
    };
    let mut buf = spare::take(READ_BUF.max(leftover.len()));
    buf[..leftover.len()].copy_from_slice(&leftover);
    let batch = !backend.plugin().may_block();
    let max_workers = if batch || backend.thread_model() < ThreadModel::Parallel {
        1
    } else {
        server.config().threads.max(1)
    };
    let contexts = negotiated
        .meta_contexts
        .iter()
        .filter_map(|(id, name)| match MetaContext::from_name(name) {
            Some(c) => Some((*id, Answer::Plugin(c))),
            None => named
                .as_ref()
                .map_or(&server.own_contexts, |n| &n.own_contexts)
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, c)| (*id, Answer::Export(c.clone()))),
        })
        .collect();
    let flight = (!batch && export.is_async()).then(|| {
        let flight = Arc::new(Flight::new(max_workers));
        Async {
            sink: flight.clone(),
            flight,
        }
    });
    let splice = plain_socket && !batch && flight.is_none();
    // Only where requests run in parallel: under a serializing thread model the try would
    // wait for the export's lock, held by whatever request runs, with the reader held too.
    let inline_reads =
        !batch && flight.is_none() && backend.thread_model() >= ThreadModel::Parallel;
    let conn = Conn {
        server,
        id,
        export,
        stats: backend.stats_sinks().to_vec(),
        form: negotiated.reply_form(),
        contexts,
        batch,
        // Requests that go asynchronous do not hold a worker; the rest (block status) get a
        // spare worker only when the client has sent more, as for plugins that do not block.
        blocking: backend.plugin().may_block() && flight.is_none(),
        flight,
        hole_shortcut: !backend.plugin().must_see_every_read(),
        hole_misses: AtomicU32::new(0),
        hole_skips: AtomicU32::new(0),
        splice,
        inline_reads,
        max_workers,
        reader: Mutex::new(Reader {
            stream,
            buf,
            start: 0,
            end: leftover.len(),
            fill_limit: READ_BUF,
            spin: server
                .config()
                .spin
                .filter(|_| plain_socket)
                .map(Spinner::new),
            may_spin: true,
        }),
        writer: Arc::new(Mutex::new(writer)),
        workers: Mutex::new(Workers {
            count: 1,
            busy: 0,
            closing: false,
        }),
    };
    if conn.batch {
        batch_worker(&conn);
    } else if let Some(a) = &conn.flight {
        if plain_unix {
            a.flight.set_direct(Box::new(Replier {
                max: direct_max(&lock(&conn.writer)),
                writer: conn.writer.clone(),
                form: conn.form,
                stats: conn.stats.clone(),
            }));
        }
        std::thread::scope(|outer| {
            let sender = std::thread::Builder::new()
                .name(format!("nbd-reply-{}", conn.id))
                .spawn_scoped(outer, || reply_sender(&conn, &a.flight));
            if let Err(e) = sender {
                tracing::warn!(conn = id, "cannot start a reply thread: {e}");
                a.flight.disable();
            }
            // However the workers end, the sender is told, so that it ends (and this scope
            // with it) once the last request in flight is answered.
            struct InputOver<'f>(&'f Flight);
            impl Drop for InputOver<'_> {
                fn drop(&mut self) {
                    self.0.end_of_input();
                }
            }
            let _over = InputOver(&a.flight);
            std::thread::scope(|scope| worker(&conn, scope));
        });
        // Nothing is in flight any more: the slots' buffers go to this (pooled) thread.
        for b in a.flight.take_buffers() {
            drop(spare::Recycled::from(b));
        }
    } else {
        std::thread::scope(|scope| worker(&conn, scope));
    }
    // This thread waits for the next client with no pipe of this one's.
    if conn.splice {
        splice::close_pipe();
    }
    // Workers (and the reply sender) are gone, and so is every request in flight: dropping
    // `conn` closes the plugin handle.
}

/// A parsed request ready to run, with its payload (for writes) in the worker's buffer.
enum Next {
    Request(RequestHeader),
    /// A request refused before running (payload already skipped): reply with this error.
    Refused(RequestHeader, BlockError),
}

fn worker<'s, 'a: 's>(conn: &'s Conn<'a>, scope: &'s std::thread::Scope<'s, '_>) {
    let mut buf = spare::take(HEADROOM + 64 * 1024);
    let mut hdr: Vec<u8> = Vec::with_capacity(HEADROOM);
    // Replies of reads answered inline, gathered for one write.
    let mut out = Gather::default();
    let mut inline = InlineTries::default();
    let extended = conn.form.is_extended();
    loop {
        // An asynchronous export: a slot first, so that requests in flight stay bounded and a
        // worker that must wait for one holds no request meanwhile.
        let mut slot = conn.flight.as_ref().and_then(|a| a.flight.reserve());
        let (next, backlog) = {
            let mut reader = lock(&conn.reader);
            {
                let w = lock(&conn.workers);
                if w.closing {
                    drop(w);
                    release(conn, slot);
                    return;
                }
                // Poll only while no other worker runs a request: it needs the core more.
                reader.may_spin = w.busy == 0;
            }
            // Pipelined reads answered from the page cache keep this worker on the reader,
            // with no hand-off to another worker; their replies go out together once no
            // further read is buffered (and always before this worker could wait for input or
            // run anything else). Only while requests come in batches (another one buffered
            // behind this one, or replies already gathered): a read that came alone runs as
            // before, so that at queue depth 1 the next request is polled for by another
            // worker while this one answers (one thread that answers and then polls was
            // slower: 0.81x on a Unix socket, 0.63x on TCP, 4 KiB random reads at QD1).
            let next = loop {
                let n = next_request(conn, &mut reader, &mut buf);
                // The request after this one, if its header is all here.
                let behind = decode_request(reader.buffered(), extended);
                let answered = match &n {
                    Ok(Next::Request(req)) => {
                        (!out.is_empty() || !matches!(behind, Ok(None)))
                            && inline_read(conn, req, &mut out, &mut hdr, &mut inline)
                    }
                    _ => false,
                };
                // A read behind it carries no payload: reading it will not block.
                let read_behind = matches!(behind, Ok(Some((h, _))) if h.kind == NBD_CMD_READ);
                if answered && out.used < COALESCE_MAX && read_behind {
                    continue;
                }
                // What is gathered goes out now: no read follows to join it, or this request
                // runs the usual way, or input ended (replies to the requests before the end
                // still go out).
                if let Err(e) = send_gathered(conn, &mut out) {
                    drop(reader);
                    reply_failed(conn, &e);
                    release(conn, slot);
                    return;
                }
                if !answered {
                    break n;
                }
            };
            match next {
                Ok(n) => (n, conn.may_grow() && reader.has_more_input()),
                Err(end) => {
                    lock(&conn.workers).closing = true;
                    if let InputEnd::Broken(why) = end {
                        tracing::info!(conn = conn.id, "closing connection: {why}");
                        let _ = reader.stream.shutdown(Shutdown::Both);
                    }
                    release(conn, slot);
                    return;
                }
            }
        };
        // A request that will most likely go asynchronous holds this worker only while it is
        // submitted: it neither counts as busy nor calls for a spare worker.
        let brief = slot.is_some() && matches!(&next, Next::Request(r) if may_go_async(conn, r));
        if brief {
            hdr.clear();
            let reply_at = match next {
                Next::Request(req) => execute(conn, &req, &mut buf, &mut hdr, &mut slot),
                Next::Refused(..) => unreachable!("a refused request is not brief"),
            };
            release(conn, slot);
            if let Err(e) = send_ran(conn, &mut buf, &hdr, reply_at) {
                reply_failed(conn, &e);
                return;
            }
            continue;
        }
        {
            let mut w = lock(&conn.workers);
            w.busy += 1;
            // A plugin that may block gets a spare worker as soon as every worker is busy, so
            // a request arriving behind a slow one runs at once (PARALLEL means concurrent).
            // Otherwise another worker only pays off when the client has already sent more.
            if (backlog || conn.blocking)
                && w.busy == w.count
                && w.count < conn.max_workers
                && !w.closing
            {
                w.count += 1;
                let spawned = std::thread::Builder::new()
                    .name(format!("nbd-conn-{}", conn.id))
                    .spawn_scoped(scope, move || worker(conn, scope));
                if spawned.is_err() {
                    w.count -= 1;
                }
            }
        }
        hdr.clear();
        let reply_at = match next {
            Next::Request(req) => execute(conn, &req, &mut buf, &mut hdr, &mut slot),
            Next::Refused(req, err) => Ran::Reply(refuse(conn, &req, &err, &mut hdr)),
        };
        release(conn, slot);
        let ok = send_ran(conn, &mut buf, &hdr, reply_at);
        lock(&conn.workers).busy -= 1;
        if let Err(e) = ok {
            reply_failed(conn, &e);
            return;
        }
    }
}

/// Writes one reply: `hdr`, followed by `len` bytes at `buf[HEADROOM..]` for Some(len) (the
/// header is put just before them, so the reply leaves in one `write`).
fn write_reply(conn: &Conn, buf: &mut [u8], hdr: &[u8], data: Option<usize>) -> io::Result<()> {
    let mut out = lock(&conn.writer);
    match data {
        Some(len) => {
            let start = HEADROOM - hdr.len();
            buf[start..HEADROOM].copy_from_slice(hdr);
            out.write_all(&buf[start..HEADROOM + len])
        }
        None => out.write_all(hdr),
    }
}

/// Sends what a request's run left to send: its reply, a spliced read's reply, or nothing
/// (the request is in flight).
fn send_ran(conn: &Conn, buf: &mut [u8], hdr: &[u8], ran: Ran) -> io::Result<()> {
    match ran {
        Ran::Reply(data) => write_reply(conn, buf, hdr, data),
        Ran::Spliced { offset, length } => {
            let r = write_spliced(conn, buf, hdr, offset, length);
            if r.is_err() {
                splice::forget_pipe();
            }
            r
        }
        Ran::InFlight => Ok(()),
    }
}

/// Writes a read reply whose first data is in this thread's pipe ([`splice::start`]):
/// `hdr`, then the pipe, then the rest of `[offset, offset+length)` spliced piece by piece,
/// or read into `buf[HEADROOM..]` where the file cannot give it. An error here leaves the
/// reply unfinished: the caller closes the connection.
fn write_spliced(
    conn: &Conn,
    buf: &mut [u8],
    hdr: &[u8],
    offset: u64,
    length: u64,
) -> io::Result<()> {
    let mut out = lock(&conn.writer);
    let sock = out.as_raw_fd();
    splice::with_pipe(|p| {
        splice::send_header(sock, hdr)?;
        let mut done = p.held() as u64;
        loop {
            p.send(sock, done < length)?;
            if done == length {
                return Ok(());
            }
            let (at, rest) = (offset + done, length - done);
            let filled = conn.export.with_file_range(rest, at, |r| {
                p.fill(r.fd, r.offset, usize::try_from(rest).unwrap_or(usize::MAX))
            });
            match filled {
                // Bytes from the start of the rest: sent at the top of the loop.
                Some(f) if f.n > 0 => done += f.n as u64,
                _ => {
                    // The file cannot give the rest now: read it as the plain path does.
                    let n = rest as usize;
                    let data = &mut buf[HEADROOM..HEADROOM + n];
                    conn.export.read(data, at).map_err(|e| {
                        io::Error::other(format!(
                            "read at {at} failed after its reply began (the data cannot be \
                             replaced by an error now): {e}"
                        ))
                    })?;
                    return out.write_all(data);
                }
            }
        }
    })
    .unwrap_or_else(|| Err(io::Error::other("the splice pipe is gone")))
}

/// [`write_reply`]; false (after closing the connection) if it could not be sent.
fn send_reply(conn: &Conn, buf: &mut [u8], hdr: &[u8], data: Option<usize>) -> bool {
    match write_reply(conn, buf, hdr, data) {
        Ok(()) => true,
        Err(e) => {
            reply_failed(conn, &e);
            false
        }
    }
}

/// A reply could not be sent: the connection is closed (its reader sees the end of input).
fn reply_failed(conn: &Conn, e: &io::Error) {
    tracing::info!(conn = conn.id, "closing connection: cannot send reply: {e}");
    lock(&conn.workers).closing = true;
    let _ = lock(&conn.writer).shutdown(Shutdown::Both);
}

/// Gives back a slot the worker did not submit a request in.
fn release(conn: &Conn, slot: Option<Reservation>) {
    if let (Some(a), Some(r)) = (&conn.flight, slot) {
        a.flight.release(r);
    }
}

/// True if `req` will most likely be submitted asynchronously, so that the worker is not
/// held by it. Only a scheduling hint (whether it really goes is [`Export::submit`]'s
/// decision): FUA on a trim or zero, or emulated FUA on a write, usually needs a flush after
/// it, which runs synchronously.
fn may_go_async(conn: &Conn, req: &RequestHeader) -> bool {
    match req.kind {
        NBD_CMD_READ | NBD_CMD_FLUSH => true,
        NBD_CMD_WRITE => !req.fua() || conn.export.caps().fua == Support::Native,
        NBD_CMD_TRIM | NBD_CMD_WRITE_ZEROES => !req.fua(),
        _ => false,
    }
}

/// Answers a connection's asynchronous requests as they finish, in completion order: counts
/// each in the statistics, logs a failure, and writes its reply under the writer lock, from
/// the buffer the request came back with (a read's data is already after the header room).
/// Runs until the workers are gone and the last request in flight is answered; after a
/// failed write it keeps collecting completions (their buffers and slots) without writing.
fn reply_sender(conn: &Conn, flight: &Flight) {
    let mut hdr: Vec<u8> = Vec::with_capacity(HEADROOM);
    let mut broken = false;
    while let Some(Finished {
        slot,
        req,
        begun,
        mut buf,
        result,
    }) = flight.next_finished()
    {
        record(&conn.stats, &req, begun, result.as_ref().map(|_| ()));
        hdr.clear();
        let data = match result {
            Ok(()) if req.kind == NBD_CMD_READ => {
                conn.form.read_data(&mut hdr, &req);
                Some(req.length as usize)
            }
            Ok(()) => {
                success_reply(conn, &req, &mut hdr);
                None
            }
            Err(err) => {
                log_failure(conn, &req, &err);
                error_reply(conn, &req, &err, &mut hdr);
                None
            }
        };
        if !broken {
            broken = !send_reply(conn, &mut buf, &hdr, data);
        }
        flight.finish(slot, buf);
    }
}

/// Largest reply the backend's callback sends itself. Linux queues a message on a Unix stream
/// socket in one piece when it is at most half the send buffer less 64 bytes and at most
/// 32 KiB plus a page's head room, so a non-blocking send of one this size either takes all
/// of it or nothing. [`direct_max`] lowers it for a socket with a small send buffer.
const DIRECT_MAX: usize = 32 * 1024;

/// [`DIRECT_MAX`], or less if the socket's send buffer is small (`net.core.wmem_default`).
fn direct_max(stream: &Stream) -> usize {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_SNDBUF on our open socket writes one int.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 || v <= 0 {
        return 0;
    }
    DIRECT_MAX.min((v as usize / 2).saturating_sub(128))
}

/// Answers an asynchronous request on the backend's thread (librbd's callback), for a
/// connection on a plain Unix socket, when that costs no waiting: the writer lock is free
/// (`try_lock`) and the socket takes the whole reply in one non-blocking send. This saves the
/// wake-up of the reply sender per request (at queue depth 1, a quarter of the thread
/// hand-offs of a request). Anything else (a failure, a large read, a busy writer, a full
/// socket) is left to [`reply_sender`], which answers exactly as before; the bytes on the
/// wire are the same either way. A reply sent here is counted in the statistics just after
/// it is sent (the sender counts just before): only a send that went out may be counted here,
/// or a declined one would be counted twice.
struct Replier {
    writer: Arc<Mutex<Stream>>,
    /// Largest reply sent here ([`direct_max`]).
    max: usize,
    form: ReplyForm,
    stats: Vec<Arc<BlockStats>>,
}

impl Direct for Replier {
    fn try_reply(&self, req: &RequestHeader, begun: u64, buf: &mut [u8]) -> bool {
        thread_local! {
            // The backend's threads are few and long-lived: one header buffer each.
            static HDR: std::cell::RefCell<Vec<u8>> =
                std::cell::RefCell::new(Vec::with_capacity(HEADROOM));
        }
        HDR.with_borrow_mut(|hdr| {
            hdr.clear();
            let data = if req.kind == NBD_CMD_READ {
                self.form.read_data(hdr, req);
                req.length as usize
            } else {
                self.form.success(hdr, req);
                0
            };
            if hdr.len() + data > self.max || HEADROOM + data > buf.len() {
                return false;
            }
            let Ok(mut out) = self.writer.try_lock() else {
                return false;
            };
            let bytes: &[u8] = if data > 0 {
                let start = HEADROOM - hdr.len();
                buf[start..HEADROOM].copy_from_slice(hdr);
                &buf[start..HEADROOM + data]
            } else {
                hdr
            };
            // SAFETY: a send from a live slice on our open socket.
            let n = unsafe {
                libc::send(
                    out.as_raw_fd(),
                    bytes.as_ptr().cast(),
                    bytes.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n <= 0 {
                // Would block, or the socket is broken: the sender answers (and sees the error).
                return false;
            }
            let n = n as usize;
            if n < bytes.len() {
                // Not expected at this size on a Unix socket (see DIRECT_MAX); the rest must
                // follow these bytes, so it is written here.
                if let Err(e) = out.write_all(&bytes[n..]) {
                    tracing::info!("closing connection: cannot send reply: {e}");
                    let _ = out.shutdown(Shutdown::Both);
                }
            }
            drop(out);
            record(&self.stats, req, begun, Ok(()));
            true
        })
    }
}

/// Replies up to this size are gathered and sent together by [`batch_worker`].
const COALESCE_MAX: usize = 64 * 1024;

/// The worker for plugins that never block (memory, null, pattern): requests cost a copy, so
/// thread hand-offs would dominate. One thread runs every request the client has sent, in
/// order, gathering small replies and sending them in one `write` before it waits for input
/// again; a large read reply is sent straight from its buffer.
fn batch_worker(conn: &Conn) {
    let mut buf = spare::take(HEADROOM + 64 * 1024);
    let mut hdr: Vec<u8> = Vec::with_capacity(HEADROOM);
    let mut out = Gather::default();
    // Length of a successful read reply's header (the data follows it in `out`).
    let read_hdr_len = conn.form.read_header_len();
    let mut reader = lock(&conn.reader);
    let mut writer = lock(&conn.writer);
    let end = loop {
        // Before waiting for input, send what is gathered.
        if !out.is_empty() && !reader.has_buffered_request(conn.form.is_extended()) {
            if let Err(e) = writer.write_all(out.as_slice()) {
                break Err(e);
            }
            out.clear();
        }
        let next = match next_request(conn, &mut reader, &mut buf) {
            Ok(n) => n,
            Err(end) => break Ok(end),
        };
        hdr.clear();
        // A small read goes straight into the gathered output, its header in front.
        if let Next::Request(req) = &next {
            if req.kind == NBD_CMD_READ && req.length > 0 && req.length < HOLE_CHECK_MIN {
                let base = out.used;
                let slot = out.slot(read_hdr_len + req.length as usize);
                match small_read(conn, req, &mut slot[read_hdr_len..], &mut hdr) {
                    Ok(()) => slot[..read_hdr_len].copy_from_slice(&hdr),
                    Err(err) => {
                        out.used = base;
                        hdr.clear();
                        log_failure(conn, req, &err);
                        error_reply(conn, req, &err, &mut hdr);
                        out.push(&hdr);
                    }
                }
                continue;
            }
        }
        let data = match next {
            Next::Request(req) => match execute(conn, &req, &mut buf, &mut hdr, &mut None) {
                Ran::Reply(data) => data,
                Ran::InFlight => unreachable!("the batch worker submits nothing"),
                Ran::Spliced { .. } => unreachable!("the batch worker splices nothing"),
            },
            Next::Refused(req, err) => refuse(conn, &req, &err, &mut hdr),
        };
        match data {
            Some(len) if len > COALESCE_MAX => {
                let start = HEADROOM - hdr.len();
                buf[start..HEADROOM].copy_from_slice(&hdr);
                let r = writer
                    .write_all(out.as_slice())
                    .and_then(|_| writer.write_all(&buf[start..HEADROOM + len]));
                out.clear();
                if let Err(e) = r {
                    break Err(e);
                }
            }
            Some(len) => {
                out.push(&hdr);
                out.push(&buf[HEADROOM..HEADROOM + len]);
            }
            None => out.push(&hdr),
        }
    };
    // Replies to the requests before the end still go out, then a broken stream is cut.
    match end.and_then(|end| writer.write_all(out.as_slice()).map(|_| end)) {
        Ok(InputEnd::Closed) => {}
        Ok(InputEnd::Broken(why)) => {
            tracing::info!(conn = conn.id, "closing connection: {why}");
            let _ = reader.stream.shutdown(Shutdown::Both);
        }
        Err(e) => {
            tracing::info!(conn = conn.id, "closing connection: cannot send reply: {e}");
            let _ = writer.shutdown(Shutdown::Both);
        }
    }
}

/// Replies gathered for one `write`. The buffer keeps its initialised length, so filling a
/// slot costs no zeroing; `used` says how much of it is output.
#[derive(Default)]
struct Gather {
    buf: Recycled,
    used: usize,
}

impl Gather {
    fn is_empty(&self) -> bool {
        self.used == 0
    }
    fn clear(&mut self) {
        self.used = 0;
    }
    fn as_slice(&self) -> &[u8] {
        &self.buf[..self.used]
    }
    /// The next `n` bytes of output, to be filled in by the caller.
    fn slot(&mut self, n: usize) -> &mut [u8] {
        let end = self.used + n;
        if self.buf.is_empty() {
            self.buf = spare::take(end.max(256 * 1024));
        } else if self.buf.len() < end {
            self.buf.resize(end.max(256 * 1024), 0);
        }
        let start = self.used;
        self.used = end;
        &mut self.buf[start..end]
    }
    fn push(&mut self, bytes: &[u8]) {
        self.slot(bytes.len()).copy_from_slice(bytes);
    }
}

/// A read short enough to need no hole check, into `dst`; `hdr` gets its reply header.
fn small_read(
    conn: &Conn,
    req: &RequestHeader,
    dst: &mut [u8],
    hdr: &mut Vec<u8>,
) -> Result<(), BlockError> {
    let begun = begin(conn, req);
    let r = check_flags(conn, req).and_then(|()| conn.export.read(dst, req.offset));
    record(&conn.stats, req, begun, r.as_ref().map(|_| ()));
    r?;
    conn.form.read_data(hdr, req);
    Ok(())
}

/// Reads shorter than this are tried inline ([`inline_read`]); longer ones are spliced or
/// read by a worker.
const INLINE_READ_MAX: u64 = SPLICE_MIN;

/// When to try small reads inline: every one while they succeed; after [`INLINE_MISS_LIMIT`]
/// misses in a row (an export with no file beneath, or data not in the page cache), only
/// every [`INLINE_RETRY_EVERY`]th read, so that such exports pay for almost no tries.
#[derive(Default)]
struct InlineTries {
    misses: u32,
    skipped: u32,
}

const INLINE_MISS_LIMIT: u32 = 8;
const INLINE_RETRY_EVERY: u32 = 32;

impl InlineTries {
    fn due(&mut self) -> bool {
        if self.misses < INLINE_MISS_LIMIT {
            return true;
        }
        self.skipped = self.skipped.wrapping_add(1);
        self.skipped.is_multiple_of(INLINE_RETRY_EVERY)
    }
}

/// Answers a small read on the thread that read it, if its bytes lie in a file
/// ([`Export::with_file_range`], as for splicing) and are all in the page cache: one
/// `preadv2(RWF_NOWAIT)`, which fails rather than wait for a disk. Its reply (header and data)
/// is appended to `out`, and the request is counted in the statistics as usual. False, with
/// nothing sent or counted, when the read must run as usual (another request, no file, not
/// cached, short at the end of the file, a flag the protocol refuses).
fn inline_read(
    conn: &Conn,
    req: &RequestHeader,
    out: &mut Gather,
    hdr: &mut Vec<u8>,
    tries: &mut InlineTries,
) -> bool {
    if !conn.inline_reads
        || req.kind != NBD_CMD_READ
        || req.length == 0
        || req.length >= INLINE_READ_MAX
        || check_flags(conn, req).is_err()
        || !tries.due()
    {
        return false;
    }
    let begun = now_ns();
    let len = req.length as usize;
    let head = conn.form.read_header_len();
    let base = out.used;
    let slot = out.slot(head + len);
    let read = conn
        .export
        .with_file_range(req.length, req.offset, |r| {
            read_cached(r.fd.as_raw_fd(), &mut slot[head..], r.offset)
        })
        .unwrap_or(false);
    if !read {
        out.used = base;
        tries.misses = tries.misses.saturating_add(1);
        return false;
    }
    tries.misses = 0;
    hdr.clear();
    conn.form.read_data(hdr, req);
    slot[..head].copy_from_slice(hdr);
    for s in &conn.stats {
        s.start();
    }
    record(&conn.stats, req, begun, Ok(()));
    true
}

/// Fills `dst` from `fd` at `offset` only if the page cache holds all of it: true when the
/// whole range was read without waiting.
fn read_cached(fd: std::os::fd::RawFd, dst: &mut [u8], offset: u64) -> bool {
    let Ok(at) = libc::off_t::try_from(offset) else {
        return false;
    };
    let iov = libc::iovec {
        iov_base: dst.as_mut_ptr().cast(),
        iov_len: dst.len(),
    };
    // SAFETY: `iov` describes `dst`, valid for writes of its length for the call; `fd` is
    // borrowed from the export for the call.
    let n = unsafe { libc::preadv2(fd, &iov, 1, at, libc::RWF_NOWAIT) };
    usize::try_from(n).is_ok_and(|n| n == dst.len())
}

/// Writes the gathered replies, if any.
fn send_gathered(conn: &Conn, out: &mut Gather) -> io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    let r = lock(&conn.writer).write_all(out.as_slice());
    out.clear();
    r
}

/// What a request counts as in the statistics (DISC and unknown commands are not counted).
fn op_of(kind: u16) -> Option<Op> {
    Some(match kind {
        NBD_CMD_READ => Op::Read,
        NBD_CMD_WRITE => Op::Write,
        NBD_CMD_WRITE_ZEROES => Op::Zero,
        NBD_CMD_TRIM => Op::Trim,
        NBD_CMD_FLUSH => Op::Flush,
        NBD_CMD_CACHE => Op::Cache,
        NBD_CMD_BLOCK_STATUS => Op::BlockStatus,
        _ => return None,
    })
}

/// A request is about to run: counted as in flight (if of a counted kind); returns the clock
/// reading.
fn begin(conn: &Conn, req: &RequestHeader) -> u64 {
    if op_of(req.kind).is_some() {
        for s in &conn.stats {
            s.start();
        }
    }
    now_ns()
}

/// A request has finished: counted with its outcome and time in every statistics (the
/// connection's, `conn.stats`).
fn record(stats: &[Arc<BlockStats>], req: &RequestHeader, begun: u64, r: Result<(), &BlockError>) {
    let Some(op) = op_of(req.kind) else { return };
    let done = now_ns();
    let outcome = match r {
        Ok(()) => Outcome::Ok,
        Err(e) => Outcome::of_error(e.errno),
    };
    let end = req.offset.saturating_add(req.length);
    for s in stats {
        s.record(op, req.length, end, begun, done, outcome);
    }
}

/// A request refused before running (its payload already skipped): counted, then answered.
fn refuse(conn: &Conn, req: &RequestHeader, err: &BlockError, hdr: &mut Vec<u8>) -> Option<usize> {
    let begun = begin(conn, req);
    record(&conn.stats, req, begun, Err(err));
    error_reply(conn, req, err, hdr);
    None
}

/// Reads the next request (and a write's payload into `buf[HEADROOM..]`).
fn next_request(conn: &Conn, reader: &mut Reader, buf: &mut Vec<u8>) -> Result<Next, InputEnd> {
    if conn.server.is_shutting_down() && reader.buffered().is_empty() {
        return Err(InputEnd::Closed);
    }
    let req = reader.header(conn.form.is_extended())?;
    tracing::trace!(
        conn = conn.id,
        "request {} flags {:#x} offset {} length {}",
        command_name(req.kind),
        req.flags,
        req.offset,
        req.length
    );
    let max = conn.server.config().max_payload as u64;
    if req.kind == NBD_CMD_DISC {
        return Err(InputEnd::Closed);
    }
    // How a payload is framed, and that only a write may carry one, is the protocol crate's
    // rule; what is too large to read is this server's.
    let is_write = takes_payload(req.kind);
    let payload = req.payload_len(conn.form.is_extended());
    if payload > 0 && (!is_write || payload > max) {
        if payload > MAX_DISCARD {
            return Err(InputEnd::Broken(format!(
                "{} payload of {payload} bytes is over the maximum of {max}",
                command_name(req.kind)
            )));
        }
        reader.discard(payload)?;
        let msg = if is_write {
            format!("write of {payload} bytes is over the maximum of {max}")
        } else {
            CommandError::UnexpectedPayload { kind: req.kind }.to_string()
        };
        return Ok(Next::Refused(req, BlockError::new(Errno::EINVAL, msg)));
    }
    if is_write {
        let need = HEADROOM + payload as usize;
        if buf.len() < need {
            buf.resize(need, 0);
        }
        reader.payload(&mut buf[HEADROOM..need])?;
        reader.fill_limit = if payload >= LARGE_PAYLOAD {
            HEADER_FILL
        } else {
            READ_BUF
        };
    }
    Ok(Next::Request(req))
}

/// What became of a request.
enum Ran {
    /// Done: Some(data length) when the reply is `hdr` followed by that many bytes at
    /// `buf[HEADROOM..]`, None when the reply is `hdr` alone.
    Reply(Option<usize>),
    /// A read whose reply is `hdr` followed by `length` bytes at `offset`, the first of
    /// which are already in this thread's splice pipe ([`splice::start`]).
    Spliced { offset: u64, length: u64 },
    /// Submitted asynchronously in the worker's slot, with the worker's buffer: the reply
    /// sender counts and answers it.
    InFlight,
}

/// Runs one request, asynchronously if it can go so in `slot` (which it then takes).
fn execute(
    conn: &Conn,
    req: &RequestHeader,
    buf: &mut Vec<u8>,
    hdr: &mut Vec<u8>,
    slot: &mut Option<Reservation>,
) -> Ran {
    let begun = begin(conn, req);
    let r = run_request(conn, req, buf, hdr, begun, slot);
    if let Ok(Ran::InFlight) = r {
        return Ran::InFlight;
    }
    record(&conn.stats, req, begun, r.as_ref().map(|_| ()));
    match r {
        Ok(ran) => ran,
        Err(err) => {
            log_failure(conn, req, &err);
            hdr.clear();
            error_reply(conn, req, &err, hdr);
            Ran::Reply(None)
        }
    }
}

/// Submits `aio` (the request `req`, begun at `begun`) in `slot` with the worker's buffer,
/// which is swapped for the slot's spare. Ok(false): the export declined, run it
/// synchronously (nothing changed); Err: the submission failed, that is the request's result.
fn try_submit(
    conn: &Conn,
    req: &RequestHeader,
    aio: AioRequest,
    buf: &mut Vec<u8>,
    begun: u64,
    slot: &mut Option<Reservation>,
) -> Result<bool, BlockError> {
    let (Some(a), Some(r)) = (&conn.flight, slot.as_mut()) else {
        return Ok(false);
    };
    a.flight.arm(r.slot, *req, begun);
    let data = std::mem::replace(buf, std::mem::take(&mut r.buf));
    match conn.export.submit(&aio, data, &a.sink, r.slot) {
        Ok(()) => {
            // The slot is the request's now, until the sender has answered it.
            *slot = None;
            Ok(true)
        }
        Err(declined) => {
            a.flight.disarm(r.slot);
            let (data, err) = match declined {
                Declined::Sync(data) => (data, None),
                Declined::Failed(data, err) => (data, Some(err)),
            };
            r.buf = std::mem::replace(buf, data);
            err.map_or(Ok(false), Err)
        }
    }
}

/// Failed-request log lines per second, over all connections: a client hammering a failing
/// disk must not flood the log. The ones over the limit are counted, and the next line that
/// gets through says how many were left out.
const FAILURE_LINES_PER_SEC: u64 = 10;

/// True if this failure may be logged now; `suppressed` gets how many were dropped before it.
fn failure_log_allowed(suppressed: &mut u64) -> bool {
    use std::sync::atomic::AtomicU64;
    static WINDOW: AtomicU64 = AtomicU64::new(u64::MAX);
    static IN_WINDOW: AtomicU64 = AtomicU64::new(0);
    static DROPPED: AtomicU64 = AtomicU64::new(0);
    let sec = now_ns() / 1_000_000_000;
    if WINDOW.swap(sec, Ordering::Relaxed) != sec {
        IN_WINDOW.store(0, Ordering::Relaxed);
    }
    if IN_WINDOW.fetch_add(1, Ordering::Relaxed) < FAILURE_LINES_PER_SEC {
        *suppressed = DROPPED.swap(0, Ordering::Relaxed);
        true
    } else {
        DROPPED.fetch_add(1, Ordering::Relaxed);
        false
    }
}

fn log_failure(conn: &Conn, req: &RequestHeader, err: &BlockError) {
    let mut suppressed = 0;
    if !failure_log_allowed(&mut suppressed) {
        return;
    }
    tracing::info!(
        conn = conn.id,
        "request {} at offset {} length {} failed: {}",
        command_name(req.kind),
        req.offset,
        req.length,
        err
    );
    tracing::info!(
        target: super::EVENTS,
        event = "request_failed",
        conn = conn.id,
        command = command_name(req.kind),
        offset = req.offset,
        length = req.length,
        errno = err.errno.0,
        error = %err.message,
        suppressed_before = suppressed
    );
}

fn run_request(
    conn: &Conn,
    req: &RequestHeader,
    buf: &mut Vec<u8>,
    hdr: &mut Vec<u8>,
    begun: u64,
    slot: &mut Option<Reservation>,
) -> Result<Ran, BlockError> {
    check_flags(conn, req)?;
    // The request as an asynchronous one, tried where the synchronous call would be made.
    let aio = |kind, flags| AioRequest {
        kind,
        offset: req.offset,
        count: req.length,
        at: HEADROOM,
        flags,
    };
    let einval = |msg: String| BlockError::new(Errno::EINVAL, msg);
    let mut flags = Flags::NONE;
    if req.fua() {
        flags = flags | Flags::FUA;
    }
    let export = &conn.export;
    let max = conn.server.config().max_payload as u64;
    match req.kind {
        NBD_CMD_READ => {
            if req.length > max {
                return Err(einval(format!(
                    "read of {} bytes is over the maximum of {max}",
                    req.length
                )));
            }
            let len = req.length as usize;
            if conn.form.can_reply_hole() && read_is_hole(conn, req)? {
                conn.form.read_hole(hdr, req);
                return Ok(Ran::Reply(None));
            }
            if buf.len() < HEADROOM + len {
                buf.resize(HEADROOM + len, 0);
            }
            if conn.splice && req.length >= SPLICE_MIN {
                let scratch = &mut buf[HEADROOM..];
                if splice::start(export, req.offset, req.length, scratch).is_some() {
                    conn.form.read_data(hdr, req);
                    return Ok(Ran::Spliced {
                        offset: req.offset,
                        length: req.length,
                    });
                }
            }
            if try_submit(conn, req, aio(AioKind::Read, flags), buf, begun, slot)? {
                return Ok(Ran::InFlight);
            }
            export.read(&mut buf[HEADROOM..HEADROOM + len], req.offset)?;
            conn.form.read_data(hdr, req);
            return Ok(Ran::Reply(Some(len)));
        }
        NBD_CMD_WRITE => {
            if try_submit(conn, req, aio(AioKind::Write, flags), buf, begun, slot)? {
                return Ok(Ran::InFlight);
            }
            let len = req.length as usize;
            export.write(&buf[HEADROOM..HEADROOM + len], req.offset, flags)?;
        }
        NBD_CMD_FLUSH => {
            if try_submit(conn, req, aio(AioKind::Flush, flags), buf, begun, slot)? {
                return Ok(Ran::InFlight);
            }
            export.flush()?
        }
        NBD_CMD_TRIM => {
            if try_submit(conn, req, aio(AioKind::Trim, flags), buf, begun, slot)? {
                return Ok(Ran::InFlight);
            }
            export.trim(req.length, req.offset, flags)?
        }
        NBD_CMD_WRITE_ZEROES => {
            if !req.no_hole() {
                flags = flags | Flags::MAY_TRIM;
            }
            if req.fast_zero() {
                flags = flags | Flags::FAST_ZERO;
            }
            if try_submit(conn, req, aio(AioKind::Zero, flags), buf, begun, slot)? {
                return Ok(Ran::InFlight);
            }
            export.zero(req.length, req.offset, flags)?;
        }
        NBD_CMD_CACHE => export.cache(req.length, req.offset)?,
        NBD_CMD_BLOCK_STATUS => {
            if conn.contexts.is_empty() {
                return Err(einval(
                    "block status without a negotiated meta context".into(),
                ));
            }
            if req.req_one() {
                flags = flags | Flags::REQ_ONE;
            }
            // One chunk per context, in negotiation order.
            for (i, (id, ctx)) in conn.contexts.iter().enumerate() {
                let last = i + 1 == conn.contexts.len();
                let ext = match ctx {
                    Answer::Plugin(MetaContext::BaseAllocation) => {
                        export.extents(req.length, req.offset, flags)?
                    }
                    Answer::Plugin(MetaContext::AllocationDepth) => {
                        export.allocation_depth(req.length, req.offset, flags)?
                    }
                    Answer::Export(own) => {
                        let max = if req.req_one() { 1 } else { MAX_OWN_EXTENTS };
                        let runs = own.status(req.offset, req.length, max);
                        conn.form.block_status(hdr, req, *id, runs, last);
                        continue;
                    }
                };
                let extents = ext.as_slice().iter().map(|e| (e.length, e.kind));
                conn.form.block_status(hdr, req, *id, extents, last);
            }
            return Ok(Ran::Reply(None));
        }
        _ => unreachable!("check_request() accepted an unknown command"),
    }
    success_reply(conn, req, hdr);
    Ok(Ran::Reply(None))
}

/// The protocol's checks on a request ([`check_request`]), as a block error to answer.
fn check_flags(conn: &Conn, req: &RequestHeader) -> Result<(), BlockError> {
    check_request(req, conn.form).map_err(|e| BlockError::new(Errno::EINVAL, e.to_string()))
}

/// True if a read covers only space the plugin reports as reading zeroes.
fn read_is_hole(conn: &Conn, req: &RequestHeader) -> Result<bool, BlockError> {
    if req.length < HOLE_CHECK_MIN || !conn.hole_shortcut || !conn.export.caps().extents {
        return Ok(false);
    }
    if conn.hole_misses.load(Ordering::Relaxed) >= HOLE_MISS_LIMIT
        && !conn
            .hole_skips
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(HOLE_RECHECK_EVERY)
    {
        return Ok(false);
    }
    // A failed or odd answer only means we read normally.
    let Ok(ext) = conn.export.extents(req.length, req.offset, Flags::REQ_ONE) else {
        return Ok(false);
    };
    let hole = match ext.as_slice().first() {
        Some(e) => e.kind & NBD_STATE_ZERO != 0 && e.length >= req.length,
        None => false,
    };
    if hole {
        conn.hole_misses.store(0, Ordering::Relaxed);
    } else {
        let _ = conn
            .hole_misses
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| m.checked_add(1));
    }
    Ok(hole)
}

fn success_reply(conn: &Conn, req: &RequestHeader, hdr: &mut Vec<u8>) {
    conn.form.success(hdr, req);
}

fn error_reply(conn: &Conn, req: &RequestHeader, err: &BlockError, hdr: &mut Vec<u8>) {
    let code = err.nbd_error(req.fast_zero(), req.df());
    conn.form.error(hdr, req, code, &err.message);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// Non-blocking sends of `len` bytes into `s` until the socket is full: the byte counts
    /// each send took.
    fn fill(s: &UnixStream, len: usize) -> Vec<isize> {
        let data = vec![7u8; len];
        let mut took = Vec::new();
        loop {
            // SAFETY: a send from a live buffer on an open socket.
            let n = unsafe {
                libc::send(
                    s.as_raw_fd(),
                    data.as_ptr().cast(),
                    len,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 || took.len() > 100_000 {
                return took;
            }
            took.push(n);
        }
    }

    /// What the callback's replies rely on: a non-blocking send of at most [`direct_max`]
    /// bytes on a Unix socket takes all of it or nothing, with the default send buffer and a
    /// small one, until the socket is full.
    #[test]
    fn a_reply_of_direct_max_bytes_is_sent_whole_or_not_at_all() {
        for sndbuf in [None, Some(4096), Some(20_000)] {
            let (a, _b) = UnixStream::pair().unwrap();
            if let Some(v) = sndbuf {
                let v: libc::c_int = v;
                // SAFETY: SO_SNDBUF on an open socket, from one int.
                let r = unsafe {
                    libc::setsockopt(
                        a.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_SNDBUF,
                        (&v as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                assert_eq!(r, 0);
            }
            let stream = Stream::unix(a.try_clone().unwrap());
            let max = direct_max(&stream);
            assert!(max > 0 && max <= DIRECT_MAX, "{sndbuf:?}: {max}");
            let took = fill(&a, max);
            assert!(!took.is_empty(), "{sndbuf:?}: nothing was sent");
            assert!(
                took.iter().all(|&n| n == max as isize),
                "{sndbuf:?}: a send of {max} bytes was cut: {took:?}"
            );
        }
    }
}
