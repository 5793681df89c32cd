//! Transmission-phase replies: simple replies and structured/extended reply chunks.
//!
//! Every function appends to a caller-owned `Vec<u8>`, so a connection can build a batch of
//! replies in one buffer it reuses, and send read data with a vectored write after the header
//! ([`offset_data_header`] writes only the header part) instead of copying it in.
//!
//! Which header a chunk gets is decided in negotiation, passed here as `extended`:
//!
//! ```text
//! simple (16 bytes)          structured (20 bytes)        extended (32 bytes)
//!  0 u32 SIMPLE_REPLY_MAGIC   0 u32 STRUCTURED_MAGIC        0 u32 EXTENDED_REPLY_MAGIC
//!  4 u32 error                4 u16 flags                   4 u16 flags
//!  8 u64 cookie               6 u16 type                    6 u16 type
//!                             8 u64 cookie                  8 u64 cookie
//!                            16 u32 payload length         16 u64 offset of the *request*
//!                                                          24 u64 payload length
//! ```
//!
//! The extended header's offset must echo the client's request offset even when the payload
//! carries a different one (a read split into chunks), which is why the chunk helpers take
//! both `request_offset` and the payload `offset`.
//!
//! The free functions below are the codecs, one per chunk type, told which header to write.
//! *Which* reply a request gets (simple or chunk, which chunk type, whether an error carries
//! its message) follows from the negotiated options and is decided in one place,
//! [`ReplyForm`]: a connection builds one after negotiation and calls it for every reply, so
//! the spec's rules (simple replies are forbidden with extended headers; a read or block
//! status must be structured once structured replies are negotiated; holes exist only in
//! structured replies) are never restated by the server. [`decode_reply`] is the inverse, for
//! tests, fuzzing and client-side tools.

mod decode;
mod form;

pub use decode::{
    decode_reply, BlockStatusPayload, Chunk, ChunkPayload, Reply, ReplyError, MAX_CHUNK_PAYLOAD,
};
pub use form::ReplyForm;

use super::consts::{
    NBD_EXTENDED_REPLY_MAGIC, NBD_MAX_STRING, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS,
    NBD_REPLY_TYPE_BLOCK_STATUS_EXT, NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_NONE,
    NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_TYPE_OFFSET_HOLE, NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
};
use super::truncate_str;

/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured (compact) chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Size of an extended chunk header.
pub const EXTENDED_REPLY_LEN: usize = 32;
/// Largest extent or hole length a 32-bit field carries: the largest multiple of 512 that fits,
/// so that splitting a long extent keeps the pieces sector-aligned.
pub const MAX_COMPACT_EXTENT: u32 = 0xffff_fe00;
/// Longest header in front of a successful read's data, in any form (an extended
/// `NBD_REPLY_TYPE_OFFSET_DATA` header and its offset field): the room a connection keeps
/// before its read buffer so the reply goes out without a copy.
pub const MAX_READ_HEADER_LEN: usize = EXTENDED_REPLY_LEN + 8;

#[inline]
fn done_flag(done: bool) -> u16 {
    if done {
        NBD_REPLY_FLAG_DONE
    } else {
        0
    }
}

/// Appends a simple reply header. For a successful compact-mode read the caller appends the
/// data right after it.
#[inline]
pub fn simple_reply(out: &mut Vec<u8>, cookie: u64, error: u32) {
    out.extend_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Appends a chunk header of any type; the caller appends `payload_len` bytes of payload.
///
/// `offset` is only encoded in the extended header, and there it must be the offset of the
/// client's request. In compact mode `payload_len` must fit in 32 bits (checked in debug
/// builds).
#[inline]
pub fn chunk_header(
    out: &mut Vec<u8>,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    payload_len: u64,
    extended: bool,
) {
    if extended {
        out.extend_from_slice(&NBD_EXTENDED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&payload_len.to_be_bytes());
    } else {
        debug_assert!(
            payload_len <= u64::from(u32::MAX),
            "compact chunk over 4 GiB"
        );
        out.extend_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&(payload_len as u32).to_be_bytes());
    }
}

/// Appends an `NBD_REPLY_TYPE_OFFSET_DATA` chunk header plus its 8-byte `offset` field; the
/// caller appends `data_len` bytes of data (read from `offset` of the export) right after.
///
/// `request_offset` is the offset of the client's read (the extended header echoes it); in
/// compact mode `data_len` must leave room for the offset field within 32 bits.
#[inline]
pub fn offset_data_header(
    out: &mut Vec<u8>,
    cookie: u64,
    request_offset: u64,
    offset: u64,
    data_len: u64,
    done: bool,
    extended: bool,
) {
    chunk_header(
        out,
        done_flag(done),
        NBD_REPLY_TYPE_OFFSET_DATA,
        cookie,
        request_offset,
        8 + data_len,
        extended,
    );
    out.extend_from_slice(&offset.to_be_bytes());
}

/// Appends `NBD_REPLY_TYPE_OFFSET_HOLE` chunks saying `hole_len` bytes from `offset` read as
/// zeroes.
///
/// The hole size is 32 bits in both header styles (the spec defines no 64-bit hole), so a
/// longer hole becomes several chunks of at most [`MAX_COMPACT_EXTENT`] bytes; only the last
/// carries `NBD_REPLY_FLAG_DONE` when `done` is set. `hole_len` must be nonzero.
pub fn offset_hole(
    out: &mut Vec<u8>,
    cookie: u64,
    request_offset: u64,
    offset: u64,
    hole_len: u64,
    done: bool,
    extended: bool,
) {
    let mut offset = offset;
    let mut remaining = hole_len;
    loop {
        let piece = if remaining > u64::from(u32::MAX) {
            u64::from(MAX_COMPACT_EXTENT)
        } else {
            remaining
        };
        remaining -= piece;
        let last = remaining == 0;
        chunk_header(
            out,
            done_flag(done && last),
            NBD_REPLY_TYPE_OFFSET_HOLE,
            cookie,
            request_offset,
            12,
            extended,
        );
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&(piece as u32).to_be_bytes());
        if last {
            break;
        }
        offset = offset.wrapping_add(piece);
    }
}

/// Appends a final `NBD_REPLY_TYPE_ERROR` chunk (with `NBD_REPLY_FLAG_DONE`).
///
/// `error` is an `NBD_E*` value and must be nonzero. `message` is for a human and is cut to
/// the spec's 4096-byte string limit at a character boundary.
pub fn error_chunk(
    out: &mut Vec<u8>,
    cookie: u64,
    request_offset: u64,
    error: u32,
    message: &str,
    extended: bool,
) {
    let message = truncate_str(message, NBD_MAX_STRING);
    chunk_header(
        out,
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_ERROR,
        cookie,
        request_offset,
        6 + message.len() as u64,
        extended,
    );
    out.extend_from_slice(&error.to_be_bytes());
    // At most 4096, so it fits the 16-bit length field.
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
}

/// Appends a final `NBD_REPLY_TYPE_NONE` chunk (with `NBD_REPLY_FLAG_DONE`), which ends a
/// successful reply.
#[inline]
pub fn none_chunk(out: &mut Vec<u8>, cookie: u64, request_offset: u64, extended: bool) {
    chunk_header(
        out,
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_NONE,
        cookie,
        request_offset,
        0,
        extended,
    );
}

/// Appends the block status chunk for one metadata context.
///
/// `extents` are consecutive `(length, flags)` pairs starting at the request offset; there
/// must be at least one and none may be empty. They are taken as a cloneable iterator so a
/// caller can map its own extent list without collecting it first (the compact form needs
/// two passes).
///
/// - Compact (`extended == false`): `NBD_REPLY_TYPE_BLOCK_STATUS`, 32-bit lengths. An extent
///   longer than 32 bits is capped at [`MAX_COMPACT_EXTENT`] and ends the list, since a later
///   extent would no longer start where the capped one ends.
/// - Extended: `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`: context id, descriptor count, then per
///   extent a 64-bit length and 64-bit status (32 bits of zero padding, then the flags).
pub fn block_status<I>(
    out: &mut Vec<u8>,
    cookie: u64,
    request_offset: u64,
    context_id: u32,
    extents: I,
    done: bool,
    extended: bool,
) where
    I: IntoIterator<Item = (u64, u32)>,
    I::IntoIter: ExactSizeIterator + Clone,
{
    let flags = done_flag(done);
    let extents = extents.into_iter();
    if extended {
        let count = extents.len() as u64;
        chunk_header(
            out,
            flags,
            NBD_REPLY_TYPE_BLOCK_STATUS_EXT,
            cookie,
            request_offset,
            8 + 16 * count,
            true,
        );
        out.extend_from_slice(&context_id.to_be_bytes());
        // A count of 0 means "work it out from the length", the honest answer if it overflows.
        let count32 = u32::try_from(count).unwrap_or(0);
        out.extend_from_slice(&count32.to_be_bytes());
        for (len, status) in extents {
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&u64::from(status).to_be_bytes());
        }
    } else {
        let count = extents
            .clone()
            .position(|(len, _)| len > u64::from(u32::MAX))
            .map_or(extents.len(), |i| i + 1);
        chunk_header(
            out,
            flags,
            NBD_REPLY_TYPE_BLOCK_STATUS,
            cookie,
            request_offset,
            4 + 8 * count as u64,
            false,
        );
        out.extend_from_slice(&context_id.to_be_bytes());
        for (len, status) in extents.take(count) {
            let len = u32::try_from(len).unwrap_or(MAX_COMPACT_EXTENT);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&status.to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::consts::{NBD_EIO, NBD_STATE_HOLE, NBD_STATE_ZERO};

    const COOKIE: u64 = 0x0102_0304_0506_0708;
    const COOKIE_BYTES: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

    fn be64(v: u64) -> [u8; 8] {
        v.to_be_bytes()
    }

    #[test]
    fn simple_reply_matches_spec_layout() {
        let mut out = Vec::new();
        simple_reply(&mut out, COOKIE, NBD_EIO);
        let expected: Vec<u8> =
            [&[0x67, 0x44, 0x66, 0x98][..], &[0, 0, 0, 5], &COOKIE_BYTES].concat();
        assert_eq!(out, expected);
        assert_eq!(out.len(), SIMPLE_REPLY_LEN);
    }

    #[test]
    fn chunk_header_compact_matches_spec_layout() {
        let mut out = Vec::new();
        chunk_header(&mut out, 1, 0x8001, COOKIE, 0xffff, 0x1234, false);
        let expected: Vec<u8> = [
            &[0x66, 0x8e, 0x33, 0xef][..],
            &[0, 1],
            &[0x80, 0x01],
            &COOKIE_BYTES,
            &[0, 0, 0x12, 0x34],
        ]
        .concat();
        assert_eq!(out, expected);
        assert_eq!(out.len(), STRUCTURED_REPLY_LEN);
    }

    #[test]
    fn chunk_header_extended_matches_spec_layout() {
        let mut out = Vec::new();
        chunk_header(&mut out, 1, 6, COOKIE, 0xabcd, 0x1_0000_0000, true);
        let expected: Vec<u8> = [
            &[0x6e, 0x8a, 0x27, 0x8c][..],
            &[0, 1],
            &[0, 6],
            &COOKIE_BYTES,
            &be64(0xabcd),
            &be64(0x1_0000_0000),
        ]
        .concat();
        assert_eq!(out, expected);
        assert_eq!(out.len(), EXTENDED_REPLY_LEN);
    }

    #[test]
    fn offset_data_header_compact_counts_offset_in_length() {
        let mut out = Vec::new();
        offset_data_header(&mut out, COOKIE, 0, 4096, 512, true, false);
        let expected: Vec<u8> = [
            &[0x66, 0x8e, 0x33, 0xef][..],
            &[0, 1],
            &[0, 1],
            &COOKIE_BYTES,
            &(8u32 + 512).to_be_bytes(),
            &be64(4096),
        ]
        .concat();
        assert_eq!(out, expected);
    }

    #[test]
    fn offset_data_header_extended_echoes_request_offset() {
        let mut out = Vec::new();
        offset_data_header(&mut out, COOKIE, 1024, 4096, 512, false, true);
        let expected: Vec<u8> = [
            &[0x6e, 0x8a, 0x27, 0x8c][..],
            &[0, 0],
            &[0, 1],
            &COOKIE_BYTES,
            &be64(1024),
            &be64(8 + 512),
            &be64(4096),
        ]
        .concat();
        assert_eq!(out, expected);
    }

    #[test]
    fn offset_hole_compact_matches_spec_layout() {
        let mut out = Vec::new();
        offset_hole(&mut out, COOKIE, 0, 8192, 4096, true, false);
        let expected: Vec<u8> = [
            &[0x66, 0x8e, 0x33, 0xef][..],
            &[0, 1],
            &[0, 2],
            &COOKIE_BYTES,
            &[0, 0, 0, 12],
            &be64(8192),
            &4096u32.to_be_bytes(),
        ]
        .concat();
        assert_eq!(out, expected);
    }

    #[test]
    fn offset_hole_extended_keeps_u32_hole_size() {
        let mut out = Vec::new();
        offset_hole(&mut out, COOKIE, 512, 8192, 4096, false, true);
        let expected: Vec<u8> = [
            &[0x6e, 0x8a, 0x27, 0x8c][..],
            &[0, 0],
            &[0, 2],
            &COOKIE_BYTES,
            &be64(512),
            &be64(12),
            &be64(8192),
            &4096u32.to_be_bytes(),
        ]
        .concat();
        assert_eq!(out, expected);
    }

    #[test]
    fn offset_hole_over_u32_splits_into_aligned_chunks() {
        let mut out = Vec::new();
        let len = 1u64 << 33;
        offset_hole(&mut out, COOKIE, 0, 0, len, true, false);
        let chunk = STRUCTURED_REPLY_LEN + 12;
        assert_eq!(out.len() % chunk, 0);
        let mut covered = 0u64;
        let chunks: Vec<&[u8]> = out.chunks(chunk).collect();
        for (i, c) in chunks.iter().enumerate() {
            let flags = u16::from_be_bytes([c[4], c[5]]);
            let off = u64::from_be_bytes(c[20..28].try_into().unwrap());
            let size = u32::from_be_bytes(c[28..32].try_into().unwrap());
            assert_eq!(off, covered);
            assert_eq!(flags, if i == chunks.len() - 1 { 1 } else { 0 });
            covered += u64::from(size);
        }
        assert_eq!(covered, len);
        assert_eq!(chunks.len(), 3);
    }

    #[test]
    fn error_chunk_matches_spec_layout() {
        let mut out = Vec::new();
        error_chunk(&mut out, COOKIE, 0, NBD_EIO, "oops", false);
        let expected: Vec<u8> = [
            &[0x66, 0x8e, 0x33, 0xef][..],
            &[0, 1],
            &[0x80, 0x01],
            &COOKIE_BYTES,
            &[0, 0, 0, 10],
            &[0, 0, 0, 5],
            &[0, 4],
            b"oops",
        ]
        .concat();
        assert_eq!(out, expected);
    }

    #[test]
    fn error_chunk_long_message_truncated_at_char_boundary() {
        let message = "é".repeat(3000); // 6000 bytes
        let mut out = Vec::new();
        error_chunk(&mut out, COOKIE, 7, NBD_EIO, &message, true);
        let payload_len = u64::from_be_bytes(out[24..32].try_into().unwrap());
        let msg_len = u16::from_be_bytes([out[36], out[37]]);
        assert_eq!(msg_len, 4096);
        assert_eq!(payload_len, 6 + 4096);
        assert_eq!(out.len(), EXTENDED_REPLY_LEN + 6 + 4096);
        assert!(std::str::from_utf8(&out[38..]).is_ok());
    }

    #[test]
    fn none_chunk_is_done_with_empty_payload() {
        let mut out = Vec::new();
        none_chunk(&mut out, COOKIE, 99, true);
        let expected: Vec<u8> = [
            &[0x6e, 0x8a, 0x27, 0x8c][..],
            &[0, 1],
            &[0, 0],
            &COOKIE_BYTES,
            &be64(99),
            &be64(0),
        ]
        .concat();
        assert_eq!(out, expected);
    }

    #[test]
    fn block_status_compact_matches_spec_layout() {
        let mut out = Vec::new();
        block_status(
            &mut out,
            COOKIE,
            0,
            1,
            [(4096, 0), (8192, NBD_STATE_HOLE | NBD_STATE_ZERO)],
            true,
            false,
        );
        let expected: Vec<u8> = [
            &[0x66, 0x8e, 0x33, 0xef][..],
            &[0, 1],
            &[0, 5],
            &COOKIE_BYTES,
            &[0, 0, 0, 20],
            &[0, 0, 0, 1],
            &4096u32.to_be_bytes(),
            &[0, 0, 0, 0],
            &8192u32.to_be_bytes(),
            &[0, 0, 0, 3],
        ]
        .concat();
        assert_eq!(out, expected);
    }

    #[test]
    fn block_status_compact_long_extent_capped_and_last() {
        let mut out = Vec::new();
        block_status(
            &mut out,
            COOKIE,
            0,
            1,
            [(512, 0), (1 << 40, NBD_STATE_HOLE), (512, 0)],
            false,
            false,
        );
        assert_eq!(&out[16..20], &[0, 0, 0, 4 + 16]);
        assert_eq!(&out[32..36], &MAX_COMPACT_EXTENT.to_be_bytes());
        assert_eq!(&out[36..40], &NBD_STATE_HOLE.to_be_bytes());
        assert_eq!(out.len(), STRUCTURED_REPLY_LEN + 4 + 16);
        assert_eq!(MAX_COMPACT_EXTENT % 512, 0);
        assert!(u64::from(MAX_COMPACT_EXTENT) + 512 > u64::from(u32::MAX));
    }

    #[test]
    fn block_status_extended_matches_spec_layout() {
        let mut out = Vec::new();
        block_status(
            &mut out,
            COOKIE,
            4096,
            2,
            [(1 << 40, NBD_STATE_ZERO)],
            true,
            true,
        );
        let expected: Vec<u8> = [
            &[0x6e, 0x8a, 0x27, 0x8c][..],
            &[0, 1],
            &[0, 6],
            &COOKIE_BYTES,
            &be64(4096),
            &be64(8 + 16),
            &[0, 0, 0, 2],
            &[0, 0, 0, 1],
            &be64(1 << 40),
            &be64(2),
        ]
        .concat();
        assert_eq!(out, expected);
    }
}
