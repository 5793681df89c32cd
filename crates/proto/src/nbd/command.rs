//! Transmission commands: their names, the flags each accepts, and the checks a request must
//! pass before a server runs it.
//!
//! These are the protocol's rules about a request as such, independent of any export: is the
//! command known, are its flags ones it takes (`doc/proto.md`, "Request types" and "Command
//! flags"), may it carry a payload. Some depend on what was negotiated (DF needs structured
//! replies, `NBD_CMD_FLAG_PAYLOAD_LEN` frames an extended write), which is why
//! [`check_request`] takes the [`ReplyForm`]. A failed check is a [`CommandError`], answered
//! with `NBD_EINVAL` while the connection carries on; a stream that cannot be decoded at all is
//! a [`RequestError`](super::RequestError) instead.

use super::consts::*;
use super::reply::ReplyForm;
use super::request::RequestHeader;

/// A request the protocol does not allow, as sluice negotiated it. Every case is answered
/// with `NBD_EINVAL` ([`CommandError::NBD_ERROR`]); the message is for the server's log and
/// for a structured error chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// A command type sluice does not implement.
    #[error("unknown command {0}")]
    UnknownCommand(u16),
    /// A flag the command does not take. `flags` is every flag the request carried.
    #[error("invalid flags {flags:#x} for {}", command_name(*kind))]
    InvalidFlags { kind: u16, flags: u16 },
    /// `NBD_CMD_FLAG_DF` without structured replies, where a read cannot be split anyway.
    #[error("DF flag needs structured replies")]
    DfNeedsStructured,
    /// A payload on a command that takes none (only `NBD_CMD_WRITE` does).
    #[error("{} takes no payload", command_name(*kind))]
    UnexpectedPayload { kind: u16 },
}

impl CommandError {
    /// The wire error every [`CommandError`] is answered with.
    pub const NBD_ERROR: u32 = NBD_EINVAL;
}

/// The command's name for logs and messages ("write-zeroes"), or "unknown".
pub fn command_name(kind: u16) -> &'static str {
    match kind {
        NBD_CMD_READ => "read",
        NBD_CMD_WRITE => "write",
        NBD_CMD_DISC => "disconnect",
        NBD_CMD_FLUSH => "flush",
        NBD_CMD_TRIM => "trim",
        NBD_CMD_CACHE => "cache",
        NBD_CMD_WRITE_ZEROES => "write-zeroes",
        NBD_CMD_BLOCK_STATUS => "block-status",
        _ => "unknown",
    }
}

/// The `NBD_CMD_FLAG_*` bits a command accepts, or `None` for a command sluice does not
/// implement (`NBD_CMD_RESIZE` among them).
#[inline]
pub fn allowed_flags(kind: u16) -> Option<u16> {
    Some(match kind {
        NBD_CMD_READ => NBD_CMD_FLAG_DF,
        NBD_CMD_WRITE => NBD_CMD_FLAG_FUA,
        NBD_CMD_DISC | NBD_CMD_FLUSH | NBD_CMD_CACHE => 0,
        NBD_CMD_TRIM => NBD_CMD_FLAG_FUA,
        NBD_CMD_WRITE_ZEROES => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
        NBD_CMD_BLOCK_STATUS => NBD_CMD_FLAG_REQ_ONE,
        _ => return None,
    })
}

/// True for the commands whose payload is data to use: only `NBD_CMD_WRITE`. Any other
/// payload (see [`RequestHeader::payload_len`]) is skipped and refused with
/// [`CommandError::UnexpectedPayload`].
#[inline]
pub fn takes_payload(kind: u16) -> bool {
    kind == NBD_CMD_WRITE
}

/// The checks every request passes before it runs: a known command, only flags it accepts,
/// DF only with structured replies.
///
/// `NBD_CMD_FLAG_PAYLOAD_LEN` on an extended write only says how the payload was framed (the
/// connection has read it by now), so it is not held against the write; on anything else it
/// is a flag the command does not take.
#[inline]
pub fn check_request(req: &RequestHeader, form: ReplyForm) -> Result<(), CommandError> {
    let Some(allowed) = allowed_flags(req.kind) else {
        return Err(CommandError::UnknownCommand(req.kind));
    };
    let mut flags = req.flags;
    if form.is_extended() && req.kind == NBD_CMD_WRITE {
        flags &= !NBD_CMD_FLAG_PAYLOAD_LEN;
    }
    if flags & !allowed != 0 {
        return Err(CommandError::InvalidFlags {
            kind: req.kind,
            flags: req.flags,
        });
    }
    if req.df() && !form.is_structured() {
        return Err(CommandError::DfNeedsStructured);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_FORMS: [ReplyForm; 3] = [
        ReplyForm::Simple,
        ReplyForm::Structured,
        ReplyForm::Extended,
    ];

    fn req(kind: u16, flags: u16) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            cookie: 1,
            offset: 0,
            length: 512,
        }
    }

    #[test]
    fn allowed_flags_matches_spec_per_command() {
        assert_eq!(allowed_flags(NBD_CMD_READ), Some(NBD_CMD_FLAG_DF));
        assert_eq!(allowed_flags(NBD_CMD_WRITE), Some(NBD_CMD_FLAG_FUA));
        assert_eq!(allowed_flags(NBD_CMD_DISC), Some(0));
        assert_eq!(allowed_flags(NBD_CMD_FLUSH), Some(0));
        assert_eq!(allowed_flags(NBD_CMD_CACHE), Some(0));
        assert_eq!(allowed_flags(NBD_CMD_TRIM), Some(NBD_CMD_FLAG_FUA));
        assert_eq!(
            allowed_flags(NBD_CMD_WRITE_ZEROES),
            Some(NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO)
        );
        assert_eq!(
            allowed_flags(NBD_CMD_BLOCK_STATUS),
            Some(NBD_CMD_FLAG_REQ_ONE)
        );
    }

    #[test]
    fn allowed_flags_unimplemented_command_is_none() {
        assert_eq!(allowed_flags(NBD_CMD_RESIZE), None);
        assert_eq!(allowed_flags(0xffff), None);
    }

    #[test]
    fn command_name_each_command_and_unknown() {
        let names = [
            (NBD_CMD_READ, "read"),
            (NBD_CMD_WRITE, "write"),
            (NBD_CMD_DISC, "disconnect"),
            (NBD_CMD_FLUSH, "flush"),
            (NBD_CMD_TRIM, "trim"),
            (NBD_CMD_CACHE, "cache"),
            (NBD_CMD_WRITE_ZEROES, "write-zeroes"),
            (NBD_CMD_BLOCK_STATUS, "block-status"),
            (NBD_CMD_RESIZE, "unknown"),
        ];
        for (kind, name) in names {
            assert_eq!(command_name(kind), name);
        }
    }

    #[test]
    fn takes_payload_only_write() {
        for kind in 0..=NBD_CMD_RESIZE {
            assert_eq!(takes_payload(kind), kind == NBD_CMD_WRITE, "{kind}");
        }
    }

    #[test]
    fn check_request_unknown_command_errors() {
        for form in ALL_FORMS {
            assert_eq!(
                check_request(&req(NBD_CMD_RESIZE, 0), form),
                Err(CommandError::UnknownCommand(NBD_CMD_RESIZE))
            );
        }
        assert_eq!(
            CommandError::UnknownCommand(42).to_string(),
            "unknown command 42"
        );
    }

    #[test]
    fn check_request_foreign_flag_errors_with_all_flags_in_message() {
        let r = req(NBD_CMD_FLUSH, NBD_CMD_FLAG_FUA);
        let err = check_request(&r, ReplyForm::Structured).unwrap_err();
        assert_eq!(
            err,
            CommandError::InvalidFlags {
                kind: NBD_CMD_FLUSH,
                flags: NBD_CMD_FLAG_FUA
            }
        );
        assert_eq!(err.to_string(), "invalid flags 0x1 for flush");
    }

    #[test]
    fn check_request_accepted_flags_pass_in_every_form() {
        let ok = [
            req(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA),
            req(NBD_CMD_TRIM, NBD_CMD_FLAG_FUA),
            req(
                NBD_CMD_WRITE_ZEROES,
                NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
            ),
            req(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE),
            req(NBD_CMD_CACHE, 0),
            req(NBD_CMD_READ, 0),
        ];
        for form in ALL_FORMS {
            for r in &ok {
                assert_eq!(check_request(r, form), Ok(()), "{r:?} in {form:?}");
            }
        }
    }

    #[test]
    fn check_request_payload_len_allowed_only_on_extended_write() {
        let write = req(NBD_CMD_WRITE, NBD_CMD_FLAG_PAYLOAD_LEN | NBD_CMD_FLAG_FUA);
        assert_eq!(check_request(&write, ReplyForm::Extended), Ok(()));
        assert_eq!(
            check_request(&write, ReplyForm::Structured),
            Err(CommandError::InvalidFlags {
                kind: NBD_CMD_WRITE,
                flags: NBD_CMD_FLAG_PAYLOAD_LEN | NBD_CMD_FLAG_FUA
            })
        );
        let read = req(NBD_CMD_READ, NBD_CMD_FLAG_PAYLOAD_LEN);
        assert!(matches!(
            check_request(&read, ReplyForm::Extended),
            Err(CommandError::InvalidFlags { .. })
        ));
    }

    #[test]
    fn check_request_df_needs_structured_replies() {
        let read = req(NBD_CMD_READ, NBD_CMD_FLAG_DF);
        assert_eq!(
            check_request(&read, ReplyForm::Simple),
            Err(CommandError::DfNeedsStructured)
        );
        assert_eq!(check_request(&read, ReplyForm::Structured), Ok(()));
        assert_eq!(check_request(&read, ReplyForm::Extended), Ok(()));
        // DF on a command that does not take it is a flag error first.
        assert!(matches!(
            check_request(&req(NBD_CMD_WRITE, NBD_CMD_FLAG_DF), ReplyForm::Simple),
            Err(CommandError::InvalidFlags { .. })
        ));
    }

    #[test]
    fn command_error_messages_and_errno() {
        assert_eq!(
            CommandError::DfNeedsStructured.to_string(),
            "DF flag needs structured replies"
        );
        assert_eq!(
            CommandError::UnexpectedPayload { kind: NBD_CMD_TRIM }.to_string(),
            "trim takes no payload"
        );
        assert_eq!(CommandError::NBD_ERROR, NBD_EINVAL);
    }
}
