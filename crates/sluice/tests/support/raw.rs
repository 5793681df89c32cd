//! A raw-bytes NBD client for protocol corner cases: it sends exactly what a test says, byte
//! for byte, and decodes what comes back without second-guessing it. Real clients (libnbd,
//! qemu) are too well-behaved to send garbage, so this is how the server's handling of bad
//! input gets tested.
//!
//! Encoding uses `sluice_proto`'s request encoder and constants; decoding is written out here
//! from the spec's layouts, so a bug in the server's reply encoder is not mirrored by the test.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use sluice_proto::nbd::consts::*;
use sluice_proto::nbd::request::encode_request;
use sluice_proto::nbd::RequestHeader;

use super::Server;

/// Generous timeout for every socket read: a hung server fails the test instead of hanging it.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// One option reply of the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

/// One transmission-phase reply message (a simple reply or one chunk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Simple reply header; read data (if any) is read separately with [`RawClient::read_n`].
    Simple { error: u32, cookie: u64 },
    /// A structured (compact) or extended chunk with its whole payload. `offset` is the
    /// extended header's echo of the request offset (None for compact chunks).
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        offset: Option<u64>,
        payload: Vec<u8>,
    },
}

impl Reply {
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Chunk { cookie, .. } => *cookie,
        }
    }

    /// The NBD error of a simple reply or an error chunk; 0 for anything else.
    pub fn error(&self) -> u32 {
        match self {
            Reply::Simple { error, .. } => *error,
            Reply::Chunk { kind, payload, .. } if kind & 0x8000 != 0 => be32(&payload[0..4]),
            Reply::Chunk { .. } => 0,
        }
    }

    pub fn is_done(&self) -> bool {
        match self {
            Reply::Simple { .. } => true,
            Reply::Chunk { flags, .. } => flags & NBD_REPLY_FLAG_DONE != 0,
        }
    }
}

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}

pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// `NBD_OPT_INFO`/`NBD_OPT_GO` payload: name length, name, count, info requests.
pub fn info_payload(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name);
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

/// `NBD_OPT_{LIST,SET}_META_CONTEXT` payload: export name and queries.
pub fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

/// What a completed GO handshake agreed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    pub extended: bool,
    /// The id of `base:allocation`, if it was selected.
    pub base_allocation: Option<u32>,
}

/// A client socket with the server's replies read back as typed values.
pub struct RawClient {
    pub sock: UnixStream,
    /// Send requests with extended headers (set by [`RawClient::handshake`] when they were
    /// negotiated; a test may flip it to send the wrong style on purpose).
    pub extended: bool,
}

impl RawClient {
    /// Connects without reading anything.
    pub fn connect(server: &Server) -> RawClient {
        let sock = UnixStream::connect(&server.socket).expect("connect to the server socket");
        sock.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        sock.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
        RawClient {
            sock,
            extended: false,
        }
    }

    /// Connects and reads the 18-byte greeting, returning it.
    pub fn connect_greeted(server: &Server) -> (RawClient, [u8; 18]) {
        let mut c = Self::connect(server);
        let mut g = [0u8; 18];
        c.sock.read_exact(&mut g).expect("read the greeting");
        (c, g)
    }

    /// Connects, reads the greeting and sends client flags.
    pub fn connect_with_flags(server: &Server, client_flags: u32) -> RawClient {
        let (mut c, _) = Self::connect_greeted(server);
        c.send(&client_flags.to_be_bytes());
        c
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).expect("send to the server");
    }

    /// Reads exactly `n` bytes, panicking on EOF or timeout.
    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.sock
            .read_exact(&mut v)
            .unwrap_or_else(|e| panic!("reading {n} bytes from the server: {e}"));
        v
    }

    /// Asserts the server closes the connection: a read sees end of input (or a reset) before
    /// the read timeout. Any bytes still in flight before the close are skipped.
    pub fn expect_closed(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            match self.sock.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => panic!("expected the server to close the connection, got: {e}"),
            }
        }
    }

    /// Asserts the server closes the connection without sending anything more first.
    pub fn expect_eof_now(&mut self) {
        let mut buf = [0u8; 64];
        match self.sock.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!(
                "expected end of input, got {n} more bytes: {:02x?}",
                &buf[..n]
            ),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("expected the server to close the connection, got: {e}"),
        }
    }

    /// Sends `IHAVEOPT, option, length, data`.
    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut v = Vec::with_capacity(16 + data.len());
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        self.send(&v);
    }

    /// Reads one option reply, checking its magic.
    pub fn read_opt_reply(&mut self) -> OptReply {
        let h = self.read_n(20);
        assert_eq!(
            be64(&h[0..8]),
            REPLY_MAGIC_OPT,
            "option reply magic; header {h:02x?}"
        );
        let len = be32(&h[16..20]) as usize;
        assert!(len <= 64 * 1024, "implausible option reply length {len}");
        OptReply {
            option: be32(&h[8..12]),
            kind: be32(&h[12..16]),
            data: self.read_n(len),
        }
    }

    /// Reads option replies up to and including the final one (ACK or an error).
    pub fn read_opt_replies(&mut self) -> Vec<OptReply> {
        let mut v = Vec::new();
        loop {
            let r = self.read_opt_reply();
            let last = r.kind == NBD_REP_ACK || r.kind & NBD_REP_FLAG_ERROR != 0;
            v.push(r);
            if last {
                return v;
            }
        }
    }

    /// Sends one option and returns all its replies.
    pub fn option(&mut self, option: u32, data: &[u8]) -> Vec<OptReply> {
        self.send_option(option, data);
        self.read_opt_replies()
    }

    /// Sends an option that must be acknowledged with a lone ACK.
    pub fn option_ack(&mut self, option: u32) {
        let r = self.option(option, &[]);
        assert_eq!(
            r,
            vec![OptReply {
                option,
                kind: NBD_REP_ACK,
                data: vec![]
            }],
            "option {option} not acknowledged"
        );
    }

    /// Sends GO for `name` and returns the size and transmission flags from its
    /// `NBD_INFO_EXPORT`, panicking unless it ends in ACK.
    pub fn go(&mut self, name: &str) -> (u64, u16) {
        let replies = self.option(NBD_OPT_GO, &info_payload(name.as_bytes(), &[]));
        let last = replies.last().unwrap();
        assert_eq!(
            last.kind,
            NBD_REP_ACK,
            "GO {name:?} failed: {replies:?} ({})",
            String::from_utf8_lossy(&last.data)
        );
        export_info(&replies).expect("GO replied without NBD_INFO_EXPORT")
    }

    /// The full fixed-newstyle handshake to transmission on the default export: client flags
    /// FIXED_NEWSTYLE|NO_ZEROES, then optionally structured replies, extended headers and
    /// `base:allocation`, then GO "".
    pub fn handshake(server: &Server, structured: bool, extended: bool) -> (RawClient, Negotiated) {
        let mut c =
            Self::connect_with_flags(server, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
        if extended {
            c.option_ack(NBD_OPT_EXTENDED_HEADERS);
        } else if structured {
            c.option_ack(NBD_OPT_STRUCTURED_REPLY);
        }
        let mut base_allocation = None;
        if structured || extended {
            let r = c.option(
                NBD_OPT_SET_META_CONTEXT,
                &meta_payload("", &["base:allocation"]),
            );
            assert_eq!(r.len(), 2, "SET_META_CONTEXT replies: {r:?}");
            assert_eq!(r[0].kind, NBD_REP_META_CONTEXT);
            assert_eq!(&r[0].data[4..], b"base:allocation");
            base_allocation = Some(be32(&r[0].data[0..4]));
            assert_eq!(r[1].kind, NBD_REP_ACK);
        }
        let (size, flags) = c.go("");
        c.extended = extended;
        let n = Negotiated {
            size,
            flags,
            structured: structured || extended,
            extended,
            base_allocation,
        };
        (c, n)
    }

    /// Sends a request header (compact, or extended if [`RawClient::extended`]) and its
    /// payload.
    pub fn request(
        &mut self,
        flags: u16,
        kind: u16,
        cookie: u64,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) {
        let mut v = Vec::with_capacity(32 + payload.len());
        let h = RequestHeader {
            flags,
            kind,
            cookie,
            offset,
            length,
        };
        encode_request(&mut v, &h, self.extended);
        v.extend_from_slice(payload);
        self.send(&v);
    }

    /// Reads one reply message: a simple reply header (data not read), or one whole chunk.
    pub fn read_reply(&mut self) -> Reply {
        let magic = be32(&self.read_n(4));
        match magic {
            NBD_SIMPLE_REPLY_MAGIC => {
                let h = self.read_n(12);
                Reply::Simple {
                    error: be32(&h[0..4]),
                    cookie: be64(&h[4..12]),
                }
            }
            NBD_STRUCTURED_REPLY_MAGIC => {
                let h = self.read_n(16);
                let len = be32(&h[12..16]) as usize;
                Reply::Chunk {
                    flags: be16(&h[0..2]),
                    kind: be16(&h[2..4]),
                    cookie: be64(&h[4..12]),
                    offset: None,
                    payload: self.read_n(len),
                }
            }
            NBD_EXTENDED_REPLY_MAGIC => {
                let h = self.read_n(28);
                let len = be64(&h[20..28]);
                assert!(len <= 64 << 20, "implausible chunk length {len}");
                Reply::Chunk {
                    flags: be16(&h[0..2]),
                    kind: be16(&h[2..4]),
                    cookie: be64(&h[4..12]),
                    offset: Some(be64(&h[12..20])),
                    payload: self.read_n(len as usize),
                }
            }
            m => panic!("unknown reply magic {m:#010x}"),
        }
    }

    /// Reads chunks until one has NBD_REPLY_FLAG_DONE (or a simple reply), all for `cookie`.
    pub fn read_chunks(&mut self, cookie: u64) -> Vec<Reply> {
        let mut v = Vec::new();
        loop {
            let r = self.read_reply();
            assert_eq!(r.cookie(), cookie, "reply for another request: {r:?}");
            let done = r.is_done();
            v.push(r);
            if done {
                return v;
            }
        }
    }

    /// Reads a simple reply for `cookie` and returns its error.
    pub fn simple_error(&mut self, cookie: u64) -> u32 {
        match self.read_reply() {
            Reply::Simple { error, cookie: c } => {
                assert_eq!(c, cookie, "simple reply for another request");
                error
            }
            r => panic!("expected a simple reply, got {r:?}"),
        }
    }

    /// A compact-mode READ without structured replies; returns the data.
    pub fn simple_read(&mut self, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        self.request(0, NBD_CMD_READ, cookie, offset, len.into(), &[]);
        assert_eq!(self.simple_error(cookie), NBD_OK, "read at {offset}");
        self.read_n(len as usize)
    }

    /// A compact-mode WRITE; returns the simple reply's error.
    pub fn simple_write(&mut self, cookie: u64, offset: u64, data: &[u8]) -> u32 {
        self.request(0, NBD_CMD_WRITE, cookie, offset, data.len() as u64, data);
        self.simple_error(cookie)
    }
}

/// Size and transmission flags from the `NBD_INFO_EXPORT` among `replies`.
pub fn export_info(replies: &[OptReply]) -> Option<(u64, u16)> {
    replies
        .iter()
        .find(|r| r.kind == NBD_REP_INFO && be16(&r.data) == NBD_INFO_EXPORT)
        .map(|r| (be64(&r.data[2..10]), be16(&r.data[10..12])))
}

/// Reassembles the data of a structured read of `len` bytes at `offset` from its chunks
/// (OFFSET_DATA and OFFSET_HOLE), asserting that they cover every byte exactly once and that
/// none is an error.
pub fn assemble_read(chunks: &[Reply], offset: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    let mut covered = vec![false; len];
    let mut mark = |start: u64, n: usize| {
        let at = usize::try_from(start - offset).unwrap();
        assert!(at + n <= len, "chunk at {start}+{n} outside the read");
        for c in &mut covered[at..at + n] {
            assert!(!*c, "byte covered twice");
            *c = true;
        }
        at
    };
    for c in chunks {
        let Reply::Chunk { kind, payload, .. } = c else {
            panic!("simple reply to a structured read: {c:?}");
        };
        match *kind {
            NBD_REPLY_TYPE_OFFSET_DATA => {
                let n = payload.len() - 8;
                let at = mark(be64(&payload[0..8]), n);
                data[at..at + n].copy_from_slice(&payload[8..]);
            }
            NBD_REPLY_TYPE_OFFSET_HOLE => {
                // Already zero in `data`.
                mark(be64(&payload[0..8]), be32(&payload[8..12]) as usize);
            }
            NBD_REPLY_TYPE_NONE => {}
            k => panic!("unexpected chunk type {k:#x} in a read reply: {c:?}"),
        }
    }
    assert!(
        covered.iter().all(|&c| c),
        "read reply left bytes uncovered"
    );
    data
}
