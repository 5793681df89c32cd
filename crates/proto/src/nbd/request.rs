//! Transmission-phase request headers: decoding what clients send, and encoding for tests.
//!
//! A request is a fixed-size header, optionally followed by a payload (the data of a write).
//! Only the header is decoded here: the connection knows where the payload should land (a
//! buffer from its pool, straight from the socket) and reads it there itself, so the decoder
//! never copies or allocates. [`RequestHeader::payload_len`] tells it how many bytes follow.
//!
//! Two layouts exist (`doc/proto.md`, "Request message"):
//!
//! ```text
//! compact (28 bytes)                      extended (32 bytes, after NBD_OPT_EXTENDED_HEADERS)
//!  0  u32 NBD_REQUEST_MAGIC                0  u32 NBD_EXTENDED_REQUEST_MAGIC
//!  4  u16 command flags                    4  u16 command flags
//!  6  u16 type                             6  u16 type
//!  8  u64 cookie                           8  u64 cookie
//! 16  u64 offset                          16  u64 offset
//! 24  u32 length                          24  u64 length (payload length if
//!                                                 NBD_CMD_FLAG_PAYLOAD_LEN, else effect length)
//! ```
//!
//! Semantic checks are answered with an errno while the connection carries on: whether a flag
//! is valid for a command is [`super::command`]'s rule, whether the range fits the export the
//! server's. The errors here instead mean the stream is out of sync and the connection must
//! close.

use super::consts::{
    NBD_CMD_FLAG_DF, NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLAG_PAYLOAD_LEN, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_WRITE, NBD_EXTENDED_REQUEST_MAGIC,
    NBD_REQUEST_MAGIC,
};

/// Size of a compact request header.
pub const REQUEST_LEN: usize = 28;
/// Size of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;

/// One decoded request header, whichever layout it came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// `NBD_CMD_FLAG_*` bits.
    pub flags: u16,
    /// `NBD_CMD_*` command type.
    pub kind: u16,
    /// Opaque client value to echo in every reply to this request.
    pub cookie: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Length: 32 bits on the wire in compact mode, 64 in extended mode.
    pub length: u64,
}

impl RequestHeader {
    /// How many payload bytes follow this header on the wire.
    ///
    /// `NBD_CMD_WRITE` always carries `length` bytes, in both header styles. The spec asks an
    /// extended write to set `NBD_CMD_FLAG_PAYLOAD_LEN`, but qemu 10 sends the data without it
    /// and qemu's own server reads it the same way, so sluice does too (a write refused for the
    /// missing flag would leave its data to be misread as the next header). Any other command
    /// carries a payload of `length` bytes exactly when it sets `NBD_CMD_FLAG_PAYLOAD_LEN`
    /// under extended headers; none takes one (see [`super::command::takes_payload`]), so the
    /// server skips it and refuses the request.
    #[inline]
    pub fn payload_len(&self, extended: bool) -> u64 {
        if self.kind == NBD_CMD_WRITE || (extended && self.has_flag(NBD_CMD_FLAG_PAYLOAD_LEN)) {
            self.length
        } else {
            0
        }
    }

    /// True if every bit of `flag` is set.
    #[inline]
    pub fn has_flag(&self, flag: u16) -> bool {
        self.flags & flag == flag
    }

    /// `NBD_CMD_FLAG_FUA`: persist before replying.
    #[inline]
    pub fn fua(&self) -> bool {
        self.has_flag(NBD_CMD_FLAG_FUA)
    }

    /// `NBD_CMD_FLAG_NO_HOLE`: a write-zeroes that must allocate (the server may not trim).
    #[inline]
    pub fn no_hole(&self) -> bool {
        self.has_flag(NBD_CMD_FLAG_NO_HOLE)
    }

    /// `NBD_CMD_FLAG_DF`: a read whose data must come in one chunk.
    #[inline]
    pub fn df(&self) -> bool {
        self.has_flag(NBD_CMD_FLAG_DF)
    }

    /// `NBD_CMD_FLAG_REQ_ONE`: block status wants one extent per context.
    #[inline]
    pub fn req_one(&self) -> bool {
        self.has_flag(NBD_CMD_FLAG_REQ_ONE)
    }

    /// `NBD_CMD_FLAG_FAST_ZERO`: a write-zeroes that must fail rather than be slow.
    #[inline]
    pub fn fast_zero(&self) -> bool {
        self.has_flag(NBD_CMD_FLAG_FAST_ZERO)
    }
}

/// A request header that cannot be decoded: the byte stream is out of sync, close.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequestError {
    /// The first four bytes are neither request magic.
    #[error(
        "request magic {0:#010x} is not an NBD request magic; the client is out of sync, \
         closing the connection"
    )]
    BadMagic(u32),
    /// The magic belongs to the header style that was not negotiated.
    #[error(
        "request magic {0:#010x} belongs to the other header style than the one negotiated \
         (NBD_OPT_EXTENDED_HEADERS decides); closing the connection"
    )]
    WrongHeaderStyle(u32),
}

/// Decodes one request header from the start of `buf`.
///
/// Returns `Ok(None)` when `buf` holds fewer bytes than a header (read more and retry), or the
/// header and the number of bytes it used. Does not read the write payload (see
/// [`RequestHeader::payload_len`]). A bad magic is reported as soon as four bytes are there.
pub fn decode_request(
    buf: &[u8],
    extended: bool,
) -> Result<Option<(RequestHeader, usize)>, RequestError> {
    let Some(magic) = buf.get(..4) else {
        return Ok(None);
    };
    let magic = u32::from_be_bytes([magic[0], magic[1], magic[2], magic[3]]);
    let (expected, other, len) = if extended {
        (
            NBD_EXTENDED_REQUEST_MAGIC,
            NBD_REQUEST_MAGIC,
            EXTENDED_REQUEST_LEN,
        )
    } else {
        (NBD_REQUEST_MAGIC, NBD_EXTENDED_REQUEST_MAGIC, REQUEST_LEN)
    };
    if magic != expected {
        return Err(if magic == other {
            RequestError::WrongHeaderStyle(magic)
        } else {
            RequestError::BadMagic(magic)
        });
    }
    let Some(h) = buf.get(..len) else {
        return Ok(None);
    };
    let length = if extended {
        be_u64(&h[24..32])
    } else {
        u64::from(u32::from_be_bytes([h[24], h[25], h[26], h[27]]))
    };
    let header = RequestHeader {
        flags: u16::from_be_bytes([h[4], h[5]]),
        kind: u16::from_be_bytes([h[6], h[7]]),
        cookie: be_u64(&h[8..16]),
        offset: be_u64(&h[16..24]),
        length,
    };
    Ok(Some((header, len)))
}

/// Appends the wire form of `h` to `out` (for tests, fuzzing and client-side tools).
///
/// In compact mode `length` must fit in 32 bits; larger values are a caller bug (checked in
/// debug builds) and are truncated.
pub fn encode_request(out: &mut Vec<u8>, h: &RequestHeader, extended: bool) {
    let magic = if extended {
        NBD_EXTENDED_REQUEST_MAGIC
    } else {
        NBD_REQUEST_MAGIC
    };
    out.extend_from_slice(&magic.to_be_bytes());
    out.extend_from_slice(&h.flags.to_be_bytes());
    out.extend_from_slice(&h.kind.to_be_bytes());
    out.extend_from_slice(&h.cookie.to_be_bytes());
    out.extend_from_slice(&h.offset.to_be_bytes());
    if extended {
        out.extend_from_slice(&h.length.to_be_bytes());
    } else {
        debug_assert!(
            h.length <= u64::from(u32::MAX),
            "compact length over 32 bits"
        );
        out.extend_from_slice(&(h.length as u32).to_be_bytes());
    }
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::consts::{NBD_CMD_READ, NBD_CMD_TRIM};

    fn header(length: u64) -> RequestHeader {
        RequestHeader {
            flags: NBD_CMD_FLAG_FUA,
            kind: NBD_CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 0x1122_3344_5566_7788,
            length,
        }
    }

    #[test]
    fn encode_request_compact_matches_spec_layout() {
        let mut out = Vec::new();
        encode_request(&mut out, &header(0x9abc_def0), false);
        let expected: Vec<u8> = [
            &[0x25, 0x60, 0x95, 0x13][..],
            &[0x00, 0x01],
            &[0x00, 0x01],
            &[1, 2, 3, 4, 5, 6, 7, 8],
            &[0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88],
            &[0x9a, 0xbc, 0xde, 0xf0],
        ]
        .concat();
        assert_eq!(out, expected);
        assert_eq!(out.len(), REQUEST_LEN);
    }

    #[test]
    fn encode_request_extended_matches_spec_layout() {
        let mut out = Vec::new();
        encode_request(&mut out, &header(0x1_0000_0002), true);
        let expected: Vec<u8> = [
            &[0x21, 0xe4, 0x1c, 0x71][..],
            &[0x00, 0x01],
            &[0x00, 0x01],
            &[1, 2, 3, 4, 5, 6, 7, 8],
            &[0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88],
            &[0, 0, 0, 1, 0, 0, 0, 2],
        ]
        .concat();
        assert_eq!(out, expected);
        assert_eq!(out.len(), EXTENDED_REQUEST_LEN);
    }

    #[test]
    fn decode_request_compact_round_trips() {
        let h = header(4096);
        let mut out = Vec::new();
        encode_request(&mut out, &h, false);
        out.extend_from_slice(b"payload follows");
        assert_eq!(decode_request(&out, false), Ok(Some((h, REQUEST_LEN))));
    }

    #[test]
    fn decode_request_extended_round_trips() {
        let h = header(u64::MAX);
        let mut out = Vec::new();
        encode_request(&mut out, &h, true);
        assert_eq!(
            decode_request(&out, true),
            Ok(Some((h, EXTENDED_REQUEST_LEN)))
        );
    }

    #[test]
    fn decode_request_short_buffer_needs_more() {
        let mut out = Vec::new();
        encode_request(&mut out, &header(1), true);
        for n in 0..out.len() {
            assert_eq!(decode_request(&out[..n], true), Ok(None), "prefix of {n}");
        }
    }

    #[test]
    fn decode_request_bad_magic_errors_after_four_bytes() {
        assert_eq!(
            decode_request(&[0xde, 0xad, 0xbe, 0xef], false),
            Err(RequestError::BadMagic(0xdead_beef))
        );
    }

    #[test]
    fn decode_request_compact_magic_in_extended_mode_errors() {
        let mut out = Vec::new();
        encode_request(&mut out, &header(1), false);
        assert_eq!(
            decode_request(&out, true),
            Err(RequestError::WrongHeaderStyle(NBD_REQUEST_MAGIC))
        );
    }

    #[test]
    fn decode_request_extended_magic_in_compact_mode_errors() {
        let mut out = Vec::new();
        encode_request(&mut out, &header(1), true);
        assert_eq!(
            decode_request(&out, false),
            Err(RequestError::WrongHeaderStyle(NBD_EXTENDED_REQUEST_MAGIC))
        );
    }

    #[test]
    fn payload_len_compact_write_is_length() {
        assert_eq!(header(512).payload_len(false), 512);
    }

    #[test]
    fn payload_len_compact_read_is_zero() {
        let h = RequestHeader {
            kind: NBD_CMD_READ,
            ..header(512)
        };
        assert_eq!(h.payload_len(false), 0);
    }

    #[test]
    fn payload_len_extended_follows_payload_len_flag() {
        let with = RequestHeader {
            kind: NBD_CMD_READ,
            flags: NBD_CMD_FLAG_PAYLOAD_LEN,
            ..header(512)
        };
        let without = RequestHeader {
            kind: NBD_CMD_TRIM,
            ..header(1 << 40)
        };
        assert_eq!(with.payload_len(true), 512);
        assert_eq!(without.payload_len(true), 0);
        // Only extended headers frame a payload with the flag.
        assert_eq!(with.payload_len(false), 0);
    }

    #[test]
    fn payload_len_extended_write_carries_length_with_or_without_flag() {
        let with = RequestHeader {
            flags: NBD_CMD_FLAG_PAYLOAD_LEN,
            ..header(512)
        };
        assert_eq!(with.payload_len(true), 512);
        // qemu 10 sends extended writes without the flag; the data still follows.
        assert_eq!(header(512).payload_len(true), 512);
    }

    #[test]
    fn flag_accessors_read_their_own_bit() {
        let flags = [
            (
                NBD_CMD_FLAG_FUA,
                RequestHeader::fua as fn(&RequestHeader) -> bool,
            ),
            (NBD_CMD_FLAG_NO_HOLE, RequestHeader::no_hole),
            (NBD_CMD_FLAG_DF, RequestHeader::df),
            (NBD_CMD_FLAG_REQ_ONE, RequestHeader::req_one),
            (NBD_CMD_FLAG_FAST_ZERO, RequestHeader::fast_zero),
        ];
        for (bit, get) in flags {
            let on = RequestHeader {
                flags: bit,
                ..header(0)
            };
            let off = RequestHeader {
                flags: !bit,
                ..header(0)
            };
            assert!(get(&on), "{bit:#x} set");
            assert!(!get(&off), "{bit:#x} clear");
        }
    }
}
