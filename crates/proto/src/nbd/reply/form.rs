//! [`ReplyForm`]: which reply each request gets, decided once from what was negotiated.
//!
//! The spec ties the shape of a reply to two options (`doc/proto.md`, "Simple reply message",
//! "Structured reply chunk message", "Extended headers"):
//!
//! - without `NBD_OPT_STRUCTURED_REPLY` every reply is simple, and read data follows the simple
//!   header directly;
//! - with it, a read and a block status must be answered in chunks; any other command may
//!   still get a simple reply, which is shorter, so sluice sends one (as nbdkit does);
//! - with `NBD_OPT_EXTENDED_HEADERS` simple replies are forbidden: every reply is made of
//!   extended chunks, success of a command with no data being a lone `NBD_REPLY_TYPE_NONE`.
//!
//! Only structured replies can carry a message with an error or describe a hole. Every method
//! writes one complete reply for one request, ending it (`NBD_REPLY_FLAG_DONE`) where it is
//! final, so a server that calls them cannot send a reply the negotiation does not allow. They
//! append to the caller's buffer and sit on the request path, so they are small and inlined:
//! a `match` on a `Copy` enum and the codec it picks.

use super::super::consts::{NBD_CMD_BLOCK_STATUS, NBD_CMD_READ, NBD_OK};
use super::super::request::RequestHeader;
use super::{
    block_status, error_chunk, none_chunk, offset_data_header, offset_hole, simple_reply,
    EXTENDED_REPLY_LEN, SIMPLE_REPLY_LEN, STRUCTURED_REPLY_LEN,
};

/// The reply form a connection negotiated, and the writer of every transmission reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplyForm {
    /// Neither option: simple replies only, and compact request headers.
    Simple,
    /// `NBD_OPT_STRUCTURED_REPLY`: compact chunk headers, and compact request headers.
    Structured,
    /// `NBD_OPT_EXTENDED_HEADERS` (which implies structured replies): extended chunk headers
    /// only, and extended request headers.
    Extended,
}

impl ReplyForm {
    /// The form for these negotiated options (see [`crate::nbd::Negotiated::reply_form`]).
    /// Extended headers imply structured replies, so `extended_headers` alone is enough for
    /// [`ReplyForm::Extended`].
    pub const fn new(structured_replies: bool, extended_headers: bool) -> ReplyForm {
        if extended_headers {
            ReplyForm::Extended
        } else if structured_replies {
            ReplyForm::Structured
        } else {
            ReplyForm::Simple
        }
    }

    /// Structured replies are in use (also true for [`ReplyForm::Extended`]).
    #[inline]
    pub const fn is_structured(self) -> bool {
        !matches!(self, ReplyForm::Simple)
    }

    /// Extended headers are in use, for replies and for requests alike (the `extended`
    /// argument of [`crate::nbd::decode_request`]).
    #[inline]
    pub const fn is_extended(self) -> bool {
        matches!(self, ReplyForm::Extended)
    }

    /// Length of the header [`ReplyForm::read_data`] writes in front of a read's data: at most
    /// [`super::MAX_READ_HEADER_LEN`].
    #[inline]
    pub const fn read_header_len(self) -> usize {
        match self {
            ReplyForm::Simple => SIMPLE_REPLY_LEN,
            ReplyForm::Structured => STRUCTURED_REPLY_LEN + 8,
            ReplyForm::Extended => EXTENDED_REPLY_LEN + 8,
        }
    }

    /// Appends the reply to a successful command that returns no data (anything but a read or
    /// a block status): a simple reply, except under extended headers where it must be a
    /// final `NBD_REPLY_TYPE_NONE` chunk.
    #[inline]
    pub fn success(self, out: &mut Vec<u8>, req: &RequestHeader) {
        if self.is_extended() {
            none_chunk(out, req.cookie, req.offset, true);
        } else {
            simple_reply(out, req.cookie, NBD_OK);
        }
    }

    /// Appends the header of a successful read's reply; the caller sends `req.length` bytes of
    /// data right after it. Simple form: a simple reply. Structured: one final
    /// `NBD_REPLY_TYPE_OFFSET_DATA` chunk for the whole request (which also honours DF).
    /// Always [`ReplyForm::read_header_len`] bytes.
    #[inline]
    pub fn read_data(self, out: &mut Vec<u8>, req: &RequestHeader) {
        if self.is_structured() {
            offset_data_header(
                out,
                req.cookie,
                req.offset,
                req.offset,
                req.length,
                true,
                self.is_extended(),
            );
        } else {
            simple_reply(out, req.cookie, NBD_OK);
        }
    }

    /// True if a read may be answered with [`ReplyForm::read_hole`] instead of data: only
    /// structured replies can say "these bytes read as zeroes".
    #[inline]
    pub const fn can_reply_hole(self) -> bool {
        self.is_structured()
    }

    /// Appends the whole reply to a read whose range reads as zeroes: final
    /// `NBD_REPLY_TYPE_OFFSET_HOLE` chunks covering `req.length` bytes (more than one only
    /// past the 32-bit hole size). Call only when [`ReplyForm::can_reply_hole`]; in the simple
    /// form this is a caller bug (checked in debug builds) and a data header is written
    /// instead, which the caller would not follow with data.
    #[inline]
    pub fn read_hole(self, out: &mut Vec<u8>, req: &RequestHeader) {
        debug_assert!(
            self.can_reply_hole(),
            "hole reply without structured replies"
        );
        if self.is_structured() {
            offset_hole(
                out,
                req.cookie,
                req.offset,
                req.offset,
                req.length,
                true,
                self.is_extended(),
            );
        } else {
            simple_reply(out, req.cookie, NBD_OK);
        }
    }

    /// Appends the block status chunk of one metadata context: `NBD_REPLY_TYPE_BLOCK_STATUS`,
    /// or `_EXT` under extended headers (see [`super::block_status`] for the extent rules).
    ///
    /// A reply carries one chunk per negotiated context; `last` marks the final one, which
    /// alone carries `NBD_REPLY_FLAG_DONE`. Block status needs structured replies, which
    /// negotiating a meta context implies (checked in debug builds).
    #[inline]
    pub fn block_status<I>(
        self,
        out: &mut Vec<u8>,
        req: &RequestHeader,
        context_id: u32,
        extents: I,
        last: bool,
    ) where
        I: IntoIterator<Item = (u64, u32)>,
        I::IntoIter: ExactSizeIterator + Clone,
    {
        debug_assert!(
            self.is_structured(),
            "block status without structured replies"
        );
        block_status(
            out,
            req.cookie,
            req.offset,
            context_id,
            extents,
            last,
            self.is_extended(),
        );
    }

    /// True if an error reply to `req` is a chunk carrying the message; otherwise it is a
    /// simple reply with the errno alone. Under extended headers it is always a chunk. With
    /// structured replies a read must not get a simple reply (the spec allows one only for
    /// other commands) and block status is answered in chunks only; every other command keeps
    /// the shorter simple reply.
    #[inline]
    pub const fn error_has_message(self, req: &RequestHeader) -> bool {
        match self {
            ReplyForm::Simple => false,
            ReplyForm::Structured => matches!(req.kind, NBD_CMD_READ | NBD_CMD_BLOCK_STATUS),
            ReplyForm::Extended => true,
        }
    }

    /// Appends the reply to a failed request: `error` is the nonzero `NBD_E*` value, `message`
    /// goes into a final `NBD_REPLY_TYPE_ERROR` chunk when [`ReplyForm::error_has_message`]
    /// (cut to the spec's 4096 bytes) and is dropped otherwise.
    #[inline]
    pub fn error(self, out: &mut Vec<u8>, req: &RequestHeader, error: u32, message: &str) {
        if self.error_has_message(req) {
            error_chunk(
                out,
                req.cookie,
                req.offset,
                error,
                message,
                self.is_extended(),
            );
        } else {
            simple_reply(out, req.cookie, error);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::MAX_READ_HEADER_LEN;
    use super::*;
    use crate::nbd::consts::*;

    const COOKIE: u64 = 0x0102_0304_0506_0708;
    const COOKIE_BYTES: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];
    const SIMPLE_MAGIC: [u8; 4] = [0x67, 0x44, 0x66, 0x98];
    const STRUCTURED_MAGIC: [u8; 4] = [0x66, 0x8e, 0x33, 0xef];
    const EXTENDED_MAGIC: [u8; 4] = [0x6e, 0x8a, 0x27, 0x8c];
    const ALL: [ReplyForm; 3] = [
        ReplyForm::Simple,
        ReplyForm::Structured,
        ReplyForm::Extended,
    ];

    fn req(kind: u16, offset: u64, length: u64) -> RequestHeader {
        RequestHeader {
            flags: 0,
            kind,
            cookie: COOKIE,
            offset,
            length,
        }
    }

    fn be16(v: u16) -> [u8; 2] {
        v.to_be_bytes()
    }
    fn be32(v: u32) -> [u8; 4] {
        v.to_be_bytes()
    }
    fn be64(v: u64) -> [u8; 8] {
        v.to_be_bytes()
    }

    fn written(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut out = Vec::new();
        f(&mut out);
        out
    }

    fn simple(error: u32) -> Vec<u8> {
        [&SIMPLE_MAGIC[..], &be32(error), &COOKIE_BYTES].concat()
    }

    #[test]
    fn new_extended_implies_structured() {
        assert_eq!(ReplyForm::new(false, false), ReplyForm::Simple);
        assert_eq!(ReplyForm::new(true, false), ReplyForm::Structured);
        assert_eq!(ReplyForm::new(true, true), ReplyForm::Extended);
        assert_eq!(ReplyForm::new(false, true), ReplyForm::Extended);
        assert!(!ReplyForm::Simple.is_structured());
        assert!(ReplyForm::Structured.is_structured() && !ReplyForm::Structured.is_extended());
        assert!(ReplyForm::Extended.is_structured() && ReplyForm::Extended.is_extended());
    }

    #[test]
    fn success_simple_and_structured_send_simple_reply() {
        for form in [ReplyForm::Simple, ReplyForm::Structured] {
            let out = written(|o| form.success(o, &req(NBD_CMD_WRITE, 4096, 512)));
            assert_eq!(out, simple(NBD_OK), "{form:?}");
        }
    }

    #[test]
    fn success_extended_sends_final_none_chunk() {
        let out = written(|o| ReplyForm::Extended.success(o, &req(NBD_CMD_FLUSH, 4096, 0)));
        let expected = [
            &EXTENDED_MAGIC[..],
            &be16(NBD_REPLY_FLAG_DONE),
            &be16(NBD_REPLY_TYPE_NONE),
            &COOKIE_BYTES,
            &be64(4096),
            &be64(0),
        ]
        .concat();
        assert_eq!(out, expected);
    }

    #[test]
    fn read_data_simple_is_simple_reply() {
        let out = written(|o| ReplyForm::Simple.read_data(o, &req(NBD_CMD_READ, 4096, 512)));
        assert_eq!(out, simple(NBD_OK));
        assert_eq!(out.len(), ReplyForm::Simple.read_header_len());
    }

    #[test]
    fn read_data_structured_is_final_offset_data_header() {
        let out = written(|o| ReplyForm::Structured.read_data(o, &req(NBD_CMD_READ, 4096, 512)));
        let expected = [
            &STRUCTURED_MAGIC[..],
            &be16(NBD_REPLY_FLAG_DONE),
            &be16(NBD_REPLY_TYPE_OFFSET_DATA),
            &COOKIE_BYTES,
            &be32(8 + 512),
            &be64(4096),
        ]
        .concat();
        assert_eq!(out, expected);
        assert_eq!(out.len(), ReplyForm::Structured.read_header_len());
    }

    #[test]
    fn read_data_extended_echoes_offset_and_64_bit_length() {
        let out = written(|o| ReplyForm::Extended.read_data(o, &req(NBD_CMD_READ, 4096, 512)));
        let expected = [
            &EXTENDED_MAGIC[..],
            &be16(NBD_REPLY_FLAG_DONE),
            &be16(NBD_REPLY_TYPE_OFFSET_DATA),
            &COOKIE_BYTES,
            &be64(4096),
            &be64(8 + 512),
            &be64(4096),
        ]
        .concat();
        assert_eq!(out, expected);
        assert_eq!(out.len(), ReplyForm::Extended.read_header_len());
    }

    #[test]
    fn read_header_len_never_exceeds_max() {
        for form in ALL {
            assert!(form.read_header_len() <= MAX_READ_HEADER_LEN);
        }
        assert_eq!(ReplyForm::Extended.read_header_len(), MAX_READ_HEADER_LEN);
    }

    #[test]
    fn can_reply_hole_only_structured() {
        assert!(!ReplyForm::Simple.can_reply_hole());
        assert!(ReplyForm::Structured.can_reply_hole());
        assert!(ReplyForm::Extended.can_reply_hole());
    }

    #[test]
    fn read_hole_structured_is_final_hole_chunk() {
        let r = req(NBD_CMD_READ, 1 << 20, 65536);
        let out = written(|o| ReplyForm::Structured.read_hole(o, &r));
        let expected = [
            &STRUCTURED_MAGIC[..],
            &be16(NBD_REPLY_FLAG_DONE),
            &be16(NBD_REPLY_TYPE_OFFSET_HOLE),
            &COOKIE_BYTES,
            &be32(12),
            &be64(1 << 20),
            &be32(65536),
        ]
        .concat();
        assert_eq!(out, expected);
    }

    #[test]
    fn read_hole_extended_is_final_hole_chunk() {
        let r = req(NBD_CMD_READ, 1 << 20, 65536);
        let out = written(|o| ReplyForm::Extended.read_hole(o, &r));
        let expected = [
            &EXTENDED_MAGIC[..],
            &be16(NBD_REPLY_FLAG_DONE),
            &be16(NBD_REPLY_TYPE_OFFSET_HOLE),
            &COOKIE_BYTES,
            &be64(1 << 20),
            &be64(12),
            &be64(1 << 20),
            &be32(65536),
        ]
        .concat();
        assert_eq!(out, expected);
    }

    #[test]
    fn block_status_structured_only_last_chunk_is_done() {
        let r = req(NBD_CMD_BLOCK_STATUS, 0, 8192);
        let out = written(|o| {
            ReplyForm::Structured.block_status(o, &r, 1, [(8192, NBD_STATE_HOLE)], false);
            ReplyForm::Structured.block_status(o, &r, 2, [(8192, 0)], true);
        });
        let chunk = |flags: u16, id: u32, status: u32| {
            [
                &STRUCTURED_MAGIC[..],
                &be16(flags),
                &be16(NBD_REPLY_TYPE_BLOCK_STATUS),
                &COOKIE_BYTES,
                &be32(4 + 8),
                &be32(id),
                &be32(8192),
                &be32(status),
            ]
            .concat()
        };
        let expected = [
            chunk(0, 1, NBD_STATE_HOLE),
            chunk(NBD_REPLY_FLAG_DONE, 2, 0),
        ]
        .concat();
        assert_eq!(out, expected);
    }

    #[test]
    fn block_status_extended_uses_ext_descriptors() {
        let r = req(NBD_CMD_BLOCK_STATUS, 512, 1024);
        let out = written(|o| {
            ReplyForm::Extended.block_status(o, &r, 3, [(512, 1), (512, 2)], true);
        });
        let expected = [
            &EXTENDED_MAGIC[..],
            &be16(NBD_REPLY_FLAG_DONE),
            &be16(NBD_REPLY_TYPE_BLOCK_STATUS_EXT),
            &COOKIE_BYTES,
            &be64(512),
            &be64(8 + 2 * 16),
            &be32(3),
            &be32(2),
            &be64(512),
            &be64(1),
            &be64(512),
            &be64(2),
        ]
        .concat();
        assert_eq!(out, expected);
    }

    #[test]
    fn error_simple_form_is_simple_reply_without_message() {
        for kind in [NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_BLOCK_STATUS] {
            let out = written(|o| ReplyForm::Simple.error(o, &req(kind, 0, 1), NBD_EIO, "bad"));
            assert_eq!(out, simple(NBD_EIO), "kind {kind}");
        }
    }

    #[test]
    fn error_structured_chunk_only_for_read_and_block_status() {
        let form = ReplyForm::Structured;
        for kind in [NBD_CMD_READ, NBD_CMD_BLOCK_STATUS] {
            let out = written(|o| form.error(o, &req(kind, 4096, 1), NBD_EIO, "bad"));
            let expected = [
                &STRUCTURED_MAGIC[..],
                &be16(NBD_REPLY_FLAG_DONE),
                &be16(NBD_REPLY_TYPE_ERROR),
                &COOKIE_BYTES,
                &be32(6 + 3),
                &be32(NBD_EIO),
                &be16(3),
                b"bad",
            ]
            .concat();
            assert_eq!(out, expected, "kind {kind}");
        }
        for kind in [NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_FLUSH, NBD_CMD_RESIZE] {
            let out = written(|o| form.error(o, &req(kind, 4096, 1), NBD_ENOSPC, "full"));
            assert_eq!(out, simple(NBD_ENOSPC), "kind {kind}");
        }
    }

    #[test]
    fn error_extended_always_chunk_with_request_offset() {
        for kind in [NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_CACHE] {
            let out =
                written(|o| ReplyForm::Extended.error(o, &req(kind, 4096, 1), NBD_EPERM, "ro"));
            let expected = [
                &EXTENDED_MAGIC[..],
                &be16(NBD_REPLY_FLAG_DONE),
                &be16(NBD_REPLY_TYPE_ERROR),
                &COOKIE_BYTES,
                &be64(4096),
                &be64(6 + 2),
                &be32(NBD_EPERM),
                &be16(2),
                b"ro",
            ]
            .concat();
            assert_eq!(out, expected, "kind {kind}");
        }
    }
}
