//! Decoding transmission replies: the client's side of [`super::ReplyForm`].
//!
//! sluice is a server, so nothing in it reads replies off a socket; this decoder exists so that
//! what the writer produces can be checked against the spec by something other than the
//! writer: unit tests, the `reply` fuzz target (encode, decode, compare), and client-side tools.
//! Like [`crate::nbd::decode_request`] it borrows: a [`Reply`] points into the caller's buffer
//! (messages, block status descriptors), nothing is allocated, and `Ok(None)` means "read more".
//!
//! Read data is not part of a decoded reply. A simple reply does not say how much data follows
//! (only the client knows what it asked for), and an `NBD_REPLY_TYPE_OFFSET_DATA` chunk is
//! decoded up to its offset field with the data length reported, so the caller reads the data
//! where it wants it, as the server writes only the header in front of data it already holds.
//!
//! The checks are the spec's (`doc/proto.md`, "Structured reply types"): each magic only in the
//! form that allows it, each chunk type with the payload length its fields imply, messages in
//! UTF-8, `NBD_REPLY_TYPE_NONE` only as a final chunk, compact and extended block status each in
//! its own form. Unknown chunk types are returned whole, as the spec lets clients skip them.

use super::super::consts::{
    NBD_EXTENDED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS,
    NBD_REPLY_TYPE_BLOCK_STATUS_EXT, NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_ERROR_OFFSET,
    NBD_REPLY_TYPE_NONE, NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_TYPE_OFFSET_HOLE,
    NBD_SIMPLE_REPLY_MAGIC, NBD_STRUCTURED_REPLY_MAGIC,
};
use super::{ReplyForm, EXTENDED_REPLY_LEN, SIMPLE_REPLY_LEN, STRUCTURED_REPLY_LEN};

/// Largest chunk payload (other than read data, which the caller reads itself) the decoder
/// waits for; a longer one is an error rather than a reason to buffer without end.
pub const MAX_CHUNK_PAYLOAD: u64 = 64 * 1024 * 1024;

/// One decoded reply message: a simple reply or one chunk of a structured reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply<'a> {
    /// A simple reply; after a successful read in the simple form, the data follows.
    Simple { cookie: u64, error: u32 },
    /// A structured or extended reply chunk.
    Chunk(Chunk<'a>),
}

/// One structured or extended reply chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk<'a> {
    /// `NBD_REPLY_FLAG_*` bits.
    pub flags: u16,
    /// The cookie of the request this chunk answers.
    pub cookie: u64,
    /// The request's offset, echoed by an extended header; `None` for a compact one.
    pub request_offset: Option<u64>,
    /// The chunk's type and fields.
    pub payload: ChunkPayload<'a>,
}

impl Chunk<'_> {
    /// True if this is the reply's final chunk (`NBD_REPLY_FLAG_DONE`).
    pub fn is_done(&self) -> bool {
        self.flags & NBD_REPLY_FLAG_DONE != 0
    }
}

/// The payload of a chunk, by type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChunkPayload<'a> {
    /// `NBD_REPLY_TYPE_NONE`: the end of a reply, no payload.
    None,
    /// `NBD_REPLY_TYPE_OFFSET_DATA`: `data_len` bytes of data for `offset` follow; they are not
    /// counted in the decoded length.
    OffsetData { offset: u64, data_len: u64 },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`: `length` bytes from `offset` read as zeroes.
    OffsetHole { offset: u64, length: u32 },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS` or `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`.
    BlockStatus(BlockStatusPayload<'a>),
    /// `NBD_REPLY_TYPE_ERROR`: a nonzero `NBD_E*` value and a message for a human.
    Error { error: u32, message: &'a str },
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`: an error at `offset` of the request's range.
    ErrorOffset {
        error: u32,
        message: &'a str,
        offset: u64,
    },
    /// A chunk type this decoder does not know, with its raw payload.
    Unknown { kind: u16, payload: &'a [u8] },
}

/// The payload of a block status chunk: one context's extents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatusPayload<'a> {
    /// The metadata context id the server gave in negotiation.
    pub context_id: u32,
    /// True for `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` (64-bit descriptors).
    pub extended: bool,
    /// The raw descriptors, checked to be a whole number of them.
    descriptors: &'a [u8],
}

impl<'a> BlockStatusPayload<'a> {
    fn descriptor_len(&self) -> usize {
        if self.extended {
            16
        } else {
            8
        }
    }

    /// The number of extents.
    pub fn len(&self) -> usize {
        self.descriptors.len() / self.descriptor_len()
    }

    /// True if there are no extents (the decoder never returns such a payload).
    pub fn is_empty(&self) -> bool {
        self.descriptors.is_empty()
    }

    /// The `(length, status flags)` of each extent, in order, widened to 64 bits.
    pub fn extents(&self) -> impl Iterator<Item = (u64, u64)> + 'a {
        let extended = self.extended;
        self.descriptors
            .chunks_exact(self.descriptor_len())
            .map(move |d| {
                if extended {
                    (be64(&d[0..8]), be64(&d[8..16]))
                } else {
                    (u64::from(be32(&d[0..4])), u64::from(be32(&d[4..8])))
                }
            })
    }
}

/// A reply that breaks the protocol: the stream cannot be trusted any further.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplyError {
    /// The first four bytes are no reply magic.
    #[error("reply magic {0:#010x} is not an NBD reply magic; the stream is out of sync")]
    BadMagic(u32),
    /// A reply magic the negotiated form does not allow (a simple reply under extended
    /// headers, a chunk without structured replies, or the other chunk header style).
    #[error("reply magic {magic:#010x} is not allowed in the negotiated {form:?} reply form")]
    WrongForm { magic: u32, form: ReplyForm },
    /// A chunk payload larger than [`MAX_CHUNK_PAYLOAD`].
    #[error(
        "reply chunk of type {kind:#06x} has a {len}-byte payload, over the {MAX_CHUNK_PAYLOAD}-byte limit"
    )]
    PayloadTooLarge { kind: u16, len: u64 },
    /// A chunk whose payload does not match its type.
    #[error("reply chunk of type {kind:#06x} is malformed: {reason}")]
    BadPayload { kind: u16, reason: &'static str },
}

/// Decodes one reply message from the start of `buf`, as a client that negotiated `form`.
///
/// Returns `Ok(None)` when more bytes are needed, or the reply and how many bytes it used. Read
/// data is never included (see the module doc): after a successful simple read or an
/// `OffsetData` chunk, the data starts at the returned length.
pub fn decode_reply(buf: &[u8], form: ReplyForm) -> Result<Option<(Reply<'_>, usize)>, ReplyError> {
    let Some(magic) = buf.get(..4) else {
        return Ok(None);
    };
    let magic = be32(magic);
    let allowed = match magic {
        NBD_SIMPLE_REPLY_MAGIC => !form.is_extended(),
        NBD_STRUCTURED_REPLY_MAGIC => form == ReplyForm::Structured,
        NBD_EXTENDED_REPLY_MAGIC => form.is_extended(),
        _ => return Err(ReplyError::BadMagic(magic)),
    };
    if !allowed {
        return Err(ReplyError::WrongForm { magic, form });
    }
    if magic == NBD_SIMPLE_REPLY_MAGIC {
        let Some(h) = buf.get(..SIMPLE_REPLY_LEN) else {
            return Ok(None);
        };
        let reply = Reply::Simple {
            error: be32(&h[4..8]),
            cookie: be64(&h[8..16]),
        };
        return Ok(Some((reply, SIMPLE_REPLY_LEN)));
    }
    let extended = form.is_extended();
    let header_len = if extended {
        EXTENDED_REPLY_LEN
    } else {
        STRUCTURED_REPLY_LEN
    };
    let Some(h) = buf.get(..header_len) else {
        return Ok(None);
    };
    let flags = be16(&h[4..6]);
    let kind = be16(&h[6..8]);
    let cookie = be64(&h[8..16]);
    let (request_offset, payload_len) = if extended {
        (Some(be64(&h[16..24])), be64(&h[24..32]))
    } else {
        (None, u64::from(be32(&h[16..20])))
    };
    let bad = |reason| ReplyError::BadPayload { kind, reason };
    let chunk = |payload| {
        Reply::Chunk(Chunk {
            flags,
            cookie,
            request_offset,
            payload,
        })
    };
    if kind == NBD_REPLY_TYPE_OFFSET_DATA {
        let Some(data_len) = payload_len.checked_sub(8) else {
            return Err(bad("payload shorter than the offset field"));
        };
        let Some(offset) = buf.get(header_len..header_len + 8) else {
            return Ok(None);
        };
        let payload = ChunkPayload::OffsetData {
            offset: be64(offset),
            data_len,
        };
        return Ok(Some((chunk(payload), header_len + 8)));
    }
    if payload_len > MAX_CHUNK_PAYLOAD {
        return Err(ReplyError::PayloadTooLarge {
            kind,
            len: payload_len,
        });
    }
    let used = header_len + payload_len as usize;
    let Some(p) = buf.get(header_len..used) else {
        return Ok(None);
    };
    let payload = match kind {
        NBD_REPLY_TYPE_NONE => {
            if !p.is_empty() {
                return Err(bad("NONE chunk with a payload"));
            }
            if flags & NBD_REPLY_FLAG_DONE == 0 {
                return Err(bad("NONE chunk without NBD_REPLY_FLAG_DONE"));
            }
            ChunkPayload::None
        }
        NBD_REPLY_TYPE_OFFSET_HOLE => {
            if p.len() != 12 {
                return Err(bad("hole payload is not 12 bytes"));
            }
            ChunkPayload::OffsetHole {
                offset: be64(&p[0..8]),
                length: be32(&p[8..12]),
            }
        }
        NBD_REPLY_TYPE_BLOCK_STATUS | NBD_REPLY_TYPE_BLOCK_STATUS_EXT => {
            let ext = kind == NBD_REPLY_TYPE_BLOCK_STATUS_EXT;
            if ext != extended {
                return Err(bad("block status type of the other header style"));
            }
            let (fixed, each) = if ext { (8, 16) } else { (4, 8) };
            if p.len() < fixed + each || (p.len() - fixed) % each != 0 {
                return Err(bad("block status is not a whole number of descriptors"));
            }
            let descriptors = &p[fixed..];
            if ext && be32(&p[4..8]) as usize != descriptors.len() / each {
                return Err(bad(
                    "block status descriptor count does not match the length",
                ));
            }
            ChunkPayload::BlockStatus(BlockStatusPayload {
                context_id: be32(&p[0..4]),
                extended: ext,
                descriptors,
            })
        }
        NBD_REPLY_TYPE_ERROR | NBD_REPLY_TYPE_ERROR_OFFSET => {
            let tail = if kind == NBD_REPLY_TYPE_ERROR { 0 } else { 8 };
            if p.len() < 6 {
                return Err(bad("error payload shorter than its fixed fields"));
            }
            let error = be32(&p[0..4]);
            if error == 0 {
                return Err(bad("error chunk with error 0"));
            }
            let msg_len = usize::from(be16(&p[4..6]));
            if p.len() != 6 + msg_len + tail {
                return Err(bad("error message length does not match the payload"));
            }
            let Ok(message) = std::str::from_utf8(&p[6..6 + msg_len]) else {
                return Err(bad("error message is not UTF-8"));
            };
            if tail == 0 {
                ChunkPayload::Error { error, message }
            } else {
                ChunkPayload::ErrorOffset {
                    error,
                    message,
                    offset: be64(&p[6 + msg_len..]),
                }
            }
        }
        _ => ChunkPayload::Unknown { kind, payload: p },
    };
    Ok(Some((chunk(payload), used)))
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::super::{block_status, chunk_header, error_chunk, offset_hole};
    use super::*;
    use crate::nbd::consts::*;
    use crate::nbd::RequestHeader;

    const COOKIE: u64 = 0xfeed_0000_0000_beef;

    fn req(kind: u16, offset: u64, length: u64) -> RequestHeader {
        RequestHeader {
            flags: 0,
            kind,
            cookie: COOKIE,
            offset,
            length,
        }
    }

    fn decode_all(mut buf: &[u8], form: ReplyForm) -> Vec<Reply<'_>> {
        let mut replies = Vec::new();
        while !buf.is_empty() {
            let (reply, used) = decode_reply(buf, form).unwrap().expect("whole reply");
            replies.push(reply);
            buf = &buf[used..];
        }
        replies
    }

    fn chunk(flags: u16, request_offset: Option<u64>, payload: ChunkPayload) -> Reply {
        Reply::Chunk(Chunk {
            flags,
            cookie: COOKIE,
            request_offset,
            payload,
        })
    }

    #[test]
    fn decode_success_round_trips_in_each_form() {
        let r = req(NBD_CMD_WRITE, 4096, 512);
        for form in [ReplyForm::Simple, ReplyForm::Structured] {
            let mut out = Vec::new();
            form.success(&mut out, &r);
            assert_eq!(
                decode_all(&out, form),
                [Reply::Simple {
                    cookie: COOKIE,
                    error: NBD_OK
                }]
            );
        }
        let mut out = Vec::new();
        ReplyForm::Extended.success(&mut out, &r);
        assert_eq!(
            decode_all(&out, ReplyForm::Extended),
            [chunk(NBD_REPLY_FLAG_DONE, Some(4096), ChunkPayload::None)]
        );
    }

    #[test]
    fn decode_read_data_stops_before_data() {
        let r = req(NBD_CMD_READ, 1 << 30, 4096);
        for form in [ReplyForm::Structured, ReplyForm::Extended] {
            let mut out = Vec::new();
            form.read_data(&mut out, &r);
            out.extend_from_slice(&[0xaa; 4096]);
            let (reply, used) = decode_reply(&out, form).unwrap().unwrap();
            assert_eq!(used, form.read_header_len());
            let expected_offset = form.is_extended().then_some(1 << 30);
            assert_eq!(
                reply,
                chunk(
                    NBD_REPLY_FLAG_DONE,
                    expected_offset,
                    ChunkPayload::OffsetData {
                        offset: 1 << 30,
                        data_len: 4096
                    }
                )
            );
        }
    }

    #[test]
    fn decode_hole_and_block_status_round_trip() {
        let r = req(NBD_CMD_READ, 0, 1 << 16);
        let mut out = Vec::new();
        ReplyForm::Extended.read_hole(&mut out, &r);
        let bs = req(NBD_CMD_BLOCK_STATUS, 0, 3 << 9);
        ReplyForm::Extended.block_status(&mut out, &bs, 7, [(512, 3), (1024, 0)], true);
        let replies = decode_all(&out, ReplyForm::Extended);
        assert_eq!(
            replies[0],
            chunk(
                NBD_REPLY_FLAG_DONE,
                Some(0),
                ChunkPayload::OffsetHole {
                    offset: 0,
                    length: 1 << 16
                }
            )
        );
        let Reply::Chunk(Chunk {
            flags,
            payload: ChunkPayload::BlockStatus(p),
            ..
        }) = replies[1]
        else {
            panic!("not block status: {:?}", replies[1]);
        };
        assert_eq!(flags, NBD_REPLY_FLAG_DONE);
        assert_eq!((p.context_id, p.extended, p.len()), (7, true, 2));
        assert_eq!(p.extents().collect::<Vec<_>>(), [(512, 3), (1024, 0)]);
    }

    #[test]
    fn decode_compact_block_status_round_trips() {
        let mut out = Vec::new();
        block_status(&mut out, COOKIE, 0, 1, [(4096, 1), (512, 2)], false, false);
        let replies = decode_all(&out, ReplyForm::Structured);
        let Reply::Chunk(Chunk {
            flags: 0,
            request_offset: None,
            payload: ChunkPayload::BlockStatus(p),
            ..
        }) = replies[0]
        else {
            panic!("not a compact block status: {:?}", replies[0]);
        };
        assert!(!p.extended);
        assert_eq!(p.extents().collect::<Vec<_>>(), [(4096, 1), (512, 2)]);
    }

    #[test]
    fn decode_error_round_trips_message() {
        let r = req(NBD_CMD_READ, 0, 1);
        let mut out = Vec::new();
        ReplyForm::Structured.error(&mut out, &r, NBD_EIO, "disk on fire");
        assert_eq!(
            decode_all(&out, ReplyForm::Structured),
            [chunk(
                NBD_REPLY_FLAG_DONE,
                None,
                ChunkPayload::Error {
                    error: NBD_EIO,
                    message: "disk on fire"
                }
            )]
        );
    }

    #[test]
    fn decode_error_offset_and_unknown_types() {
        let mut out = Vec::new();
        chunk_header(
            &mut out,
            0,
            NBD_REPLY_TYPE_ERROR_OFFSET,
            COOKIE,
            0,
            6 + 2 + 8,
            false,
        );
        out.extend_from_slice(&NBD_EIO.to_be_bytes());
        out.extend_from_slice(&2u16.to_be_bytes());
        out.extend_from_slice(b"hi");
        out.extend_from_slice(&4096u64.to_be_bytes());
        chunk_header(&mut out, 1, 0x4242, COOKIE, 0, 3, false);
        out.extend_from_slice(b"xyz");
        assert_eq!(
            decode_all(&out, ReplyForm::Structured),
            [
                chunk(
                    0,
                    None,
                    ChunkPayload::ErrorOffset {
                        error: NBD_EIO,
                        message: "hi",
                        offset: 4096
                    }
                ),
                chunk(
                    1,
                    None,
                    ChunkPayload::Unknown {
                        kind: 0x4242,
                        payload: b"xyz"
                    }
                )
            ]
        );
    }

    #[test]
    fn decode_every_prefix_needs_more() {
        let mut out = Vec::new();
        error_chunk(&mut out, COOKIE, 8, NBD_EIO, "message", true);
        for n in 0..out.len() {
            assert_eq!(
                decode_reply(&out[..n], ReplyForm::Extended),
                Ok(None),
                "prefix {n}"
            );
        }
        assert!(decode_reply(&out, ReplyForm::Extended).unwrap().is_some());
    }

    #[test]
    fn decode_magic_outside_its_form_errors() {
        let mut simple = Vec::new();
        ReplyForm::Simple.success(&mut simple, &req(NBD_CMD_FLUSH, 0, 0));
        assert_eq!(
            decode_reply(&simple, ReplyForm::Extended),
            Err(ReplyError::WrongForm {
                magic: NBD_SIMPLE_REPLY_MAGIC,
                form: ReplyForm::Extended
            })
        );
        let mut compact = Vec::new();
        offset_hole(&mut compact, COOKIE, 0, 0, 512, true, false);
        for form in [ReplyForm::Simple, ReplyForm::Extended] {
            assert!(matches!(
                decode_reply(&compact, form),
                Err(ReplyError::WrongForm { .. })
            ));
        }
        let mut ext = Vec::new();
        offset_hole(&mut ext, COOKIE, 0, 0, 512, true, true);
        assert!(matches!(
            decode_reply(&ext, ReplyForm::Structured),
            Err(ReplyError::WrongForm { .. })
        ));
        assert_eq!(
            decode_reply(&[1, 2, 3, 4], ReplyForm::Simple),
            Err(ReplyError::BadMagic(0x0102_0304))
        );
    }

    #[test]
    fn decode_malformed_payloads_error() {
        let cases: [(u16, u16, &[u8]); 6] = [
            (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, b"x"),
            (0, NBD_REPLY_TYPE_NONE, b""),
            (0, NBD_REPLY_TYPE_OFFSET_HOLE, &[0; 11]),
            (0, NBD_REPLY_TYPE_BLOCK_STATUS, &[0; 4 + 7]),
            (0, NBD_REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0, 9, b'a']),
            (0, NBD_REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0, 1, 0xff]),
        ];
        for (flags, kind, payload) in cases {
            let mut out = Vec::new();
            chunk_header(
                &mut out,
                flags,
                kind,
                COOKIE,
                0,
                payload.len() as u64,
                false,
            );
            out.extend_from_slice(payload);
            assert!(
                matches!(
                    decode_reply(&out, ReplyForm::Structured),
                    Err(ReplyError::BadPayload { .. })
                ),
                "type {kind} payload {payload:?}"
            );
        }
        let mut huge = Vec::new();
        chunk_header(&mut huge, 0, NBD_REPLY_TYPE_ERROR, COOKIE, 0, 1 << 40, true);
        assert_eq!(
            decode_reply(&huge, ReplyForm::Extended),
            Err(ReplyError::PayloadTooLarge {
                kind: NBD_REPLY_TYPE_ERROR,
                len: 1 << 40
            })
        );
    }

    #[test]
    fn decode_block_status_of_the_other_style_errors() {
        let mut out = Vec::new();
        block_status(&mut out, COOKIE, 0, 1, [(512, 0)], true, false);
        // Re-label the compact chunk as extended block status in a compact header.
        out[6..8].copy_from_slice(&NBD_REPLY_TYPE_BLOCK_STATUS_EXT.to_be_bytes());
        assert!(matches!(
            decode_reply(&out, ReplyForm::Structured),
            Err(ReplyError::BadPayload { .. })
        ));
    }
}
