//! NBD protocol: constants, negotiation and transmission codecs.
//!
//! The split follows the protocol's two phases. [`handshake`] is the fixed-newstyle option
//! haggling, a state machine because negotiation is a conversation (the server must be asked
//! about exports mid-way). [`request`] and [`reply`] are the transmission phase, plain
//! functions because every message there stands alone: one header decoder, and encoders that
//! append to the caller's buffer so a connection can batch replies without extra copies.
//!
//! Every rule of the transmission phase that does not need an export lives here too, so the
//! server only moves bytes: [`command`] says which commands and flags a request may carry,
//! [`reply::ReplyForm`] which reply each outcome gets in the negotiated form, and [`context`]
//! spells the metadata context names.
pub mod command;
pub mod consts;
pub mod context;
pub mod handshake;
pub mod reply;
pub mod request;
pub mod tls;

pub use command::{check_request, command_name, CommandError};
pub use context::{
    dirty_bitmap_context, dirty_bitmap_name, MetaContext, CONTEXT_BASE_ALLOCATION,
    CONTEXT_QEMU_ALLOCATION_DEPTH, CONTEXT_QEMU_DIRTY_BITMAP,
};
pub use reply::ReplyForm;

pub use handshake::{
    oldstyle, Event, ExportDetails, ExportRefusal, Handshake, HandshakeConfig, HandshakeError,
    Negotiated, Purpose,
};
pub use request::{decode_request, RequestError, RequestHeader, EXTENDED_REQUEST_LEN, REQUEST_LEN};
pub use tls::TlsMode;

/// The longest prefix of `s` that is at most `max` bytes and ends on a char boundary.
///
/// The spec caps strings at 4096 bytes and requires UTF-8, so cutting in the middle of a
/// character would turn a too-long message into an invalid one.
pub(crate) fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::truncate_str;

    #[test]
    fn truncate_str_short_string_unchanged() {
        assert_eq!(truncate_str("abc", 4096), "abc");
    }

    #[test]
    fn truncate_str_multibyte_boundary_backs_off() {
        // "é" is two bytes; cutting after 3 bytes would split the second one.
        assert_eq!(truncate_str("éé", 3), "é");
        assert_eq!(truncate_str("éé", 4), "éé");
    }
}
