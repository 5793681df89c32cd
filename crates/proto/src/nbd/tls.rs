//! The NBD server's TLS policy: which answer each option gets before and after
//! `NBD_OPT_STARTTLS`, in each of the spec's server modes (`doc/proto.md`, "TLS support").
//!
//! The rules are decided here, once, as pure functions of (mode, is TLS active, option) so
//! that they read like the spec and are tested branch by branch; [`Handshake`] holds the state
//! (is TLS active, what was negotiated before it) and applies these answers. No TLS library
//! is involved: the handshake only says *when* the stream must be upgraded
//! ([`Event::StartTls`]), and the server does the cryptography.
//!
//! The spec's modes map onto nbdkit's `--tls` values:
//!
//! | [`TlsMode`] | spec name    | nbdkit          | STARTTLS      | other options before TLS |
//! |-------------|--------------|-----------------|---------------|--------------------------|
//! | `Off`       | NOTLS        | `--tls=off`     | `ERR_POLICY`  | served                   |
//! | `On`        | SELECTIVETLS (no TLS-only export) | `--tls=on` | `ACK` | served             |
//! | `Require`   | FORCEDTLS    | `--tls=require` | `ACK`         | `ERR_TLS_REQD`; `EXPORT_NAME` closes |
//!
//! Two rules go beyond the letter of the spec, both for safety:
//!
//! - A client that did not set `NBD_FLAG_C_FIXED_NEWSTYLE` cannot use TLS (the spec makes the
//!   server NOTLS for it). Under `Require` such a client could never be served, so it is
//!   disconnected at once; under `On` it gets `Off`'s answers.
//! - Bytes the client sent after `NBD_OPT_STARTTLS` but before it could have read the
//!   server's `NBD_REP_ACK` were sent in plaintext: treating them as part of the TLS session
//!   would let a man in the middle inject options into it (nbdkit's CVE-2021-3716 was this
//!   bug). The connection is closed instead ([`HandshakeError::StartTlsNotLast`]).
//!
//! [`Handshake`]: super::Handshake
//! [`Event::StartTls`]: super::Event::StartTls
//! [`HandshakeError::StartTlsNotLast`]: super::HandshakeError::StartTlsNotLast

use super::consts::*;
use super::handshake::HandshakeError;

/// How the server offers TLS: the spec's server modes, spelled as nbdkit's `--tls`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum TlsMode {
    /// NOTLS: `NBD_OPT_STARTTLS` is refused with `NBD_REP_ERR_POLICY`, and
    /// `NBD_REP_ERR_TLS_REQD` is never sent.
    #[default]
    Off,
    /// TLS is offered and optional: clients that upgrade and clients that do not are both
    /// served (the spec's SELECTIVETLS with no TLS-only export).
    On,
    /// FORCEDTLS: before TLS, every option but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` is
    /// refused with `NBD_REP_ERR_TLS_REQD`, and `NBD_OPT_EXPORT_NAME` closes the connection,
    /// so no export name, size or data is ever exchanged in plaintext.
    Require,
}

impl TlsMode {
    /// The mode for one connection, given the client's flags: a client without fixed
    /// newstyle cannot use TLS (the spec makes the server NOTLS for it), so `On` becomes
    /// `Off`; under `Require` such a client is refused ([`TlsMode::check_client_flags`]).
    pub(crate) fn for_client(self, fixed_newstyle: bool) -> TlsMode {
        match self {
            TlsMode::On if !fixed_newstyle => TlsMode::Off,
            mode => mode,
        }
    }

    /// Whether a client with these flags may go on: under `Require`, one without fixed
    /// newstyle could only ever send `NBD_OPT_EXPORT_NAME`, which must close the connection.
    pub(crate) fn check_client_flags(self, fixed_newstyle: bool) -> Result<(), HandshakeError> {
        if self == TlsMode::Require && !fixed_newstyle {
            return Err(HandshakeError::TlsNeedsFixedNewstyle);
        }
        Ok(())
    }

    /// What happens to `option` (any option but `NBD_OPT_STARTTLS`) before it is looked at:
    /// whether TLS is required first. `active` is true once the TLS session is up.
    pub(crate) fn gate(self, active: bool, option: u32) -> Gate {
        if self != TlsMode::Require || active {
            return Gate::Pass;
        }
        match option {
            NBD_OPT_STARTTLS | NBD_OPT_ABORT => Gate::Pass,
            NBD_OPT_EXPORT_NAME => Gate::Close(HandshakeError::ExportNameWithoutTls),
            _ => Gate::Refuse {
                code: NBD_REP_ERR_TLS_REQD,
                message: "TLS is required on this server: send NBD_OPT_STARTTLS first",
            },
        }
    }

    /// The answer to `NBD_OPT_STARTTLS`. `payload_len` is the option's data length (the
    /// option has none), `active` whether TLS is already up, and `trailing` how many bytes the
    /// client sent after the option before the server answered it.
    pub(crate) fn starttls(self, active: bool, payload_len: usize, trailing: usize) -> StartTls {
        if payload_len != 0 {
            return StartTls::Refuse {
                code: NBD_REP_ERR_INVALID,
                message: "option NBD_OPT_STARTTLS takes no data",
            };
        }
        if self == TlsMode::Off {
            return StartTls::Refuse {
                code: NBD_REP_ERR_POLICY,
                message: "TLS is not enabled on this server",
            };
        }
        if active {
            return StartTls::Refuse {
                code: NBD_REP_ERR_INVALID,
                message: "TLS is already active on this connection",
            };
        }
        if trailing != 0 {
            return StartTls::Close(HandshakeError::StartTlsNotLast(trailing));
        }
        StartTls::Upgrade
    }
}

/// Whether an option may be handled, given the TLS state ([`TlsMode::gate`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Gate {
    /// Handle the option as usual.
    Pass,
    /// Skip the option's data and send this error reply.
    Refuse { code: u32, message: &'static str },
    /// Close the connection without a reply.
    Close(HandshakeError),
}

/// The answer to `NBD_OPT_STARTTLS` ([`TlsMode::starttls`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StartTls {
    /// Send `NBD_REP_ACK`, then the TLS handshake starts.
    Upgrade,
    /// Send this error reply; negotiation continues as it was.
    Refuse { code: u32, message: &'static str },
    /// Close the connection without a reply.
    Close(HandshakeError),
}

#[cfg(test)]
mod tests {
    use super::*;

    const OTHER_OPTIONS: [u32; 9] = [
        NBD_OPT_LIST,
        NBD_OPT_PEEK_EXPORT,
        NBD_OPT_INFO,
        NBD_OPT_GO,
        NBD_OPT_STRUCTURED_REPLY,
        NBD_OPT_LIST_META_CONTEXT,
        NBD_OPT_SET_META_CONTEXT,
        NBD_OPT_EXTENDED_HEADERS,
        0xdead_beef,
    ];

    #[test]
    fn gate_off_and_on_pass_everything() {
        for mode in [TlsMode::Off, TlsMode::On] {
            for active in [false, true] {
                for option in OTHER_OPTIONS.into_iter().chain([NBD_OPT_EXPORT_NAME]) {
                    assert_eq!(mode.gate(active, option), Gate::Pass, "{mode:?} {option}");
                }
            }
        }
    }

    #[test]
    fn gate_require_before_tls_refuses_with_tls_reqd() {
        for option in OTHER_OPTIONS {
            assert!(
                matches!(
                    TlsMode::Require.gate(false, option),
                    Gate::Refuse {
                        code: NBD_REP_ERR_TLS_REQD,
                        ..
                    }
                ),
                "option {option}"
            );
        }
    }

    #[test]
    fn gate_require_before_tls_passes_starttls_and_abort() {
        assert_eq!(TlsMode::Require.gate(false, NBD_OPT_STARTTLS), Gate::Pass);
        assert_eq!(TlsMode::Require.gate(false, NBD_OPT_ABORT), Gate::Pass);
    }

    #[test]
    fn gate_require_before_tls_export_name_closes() {
        assert_eq!(
            TlsMode::Require.gate(false, NBD_OPT_EXPORT_NAME),
            Gate::Close(HandshakeError::ExportNameWithoutTls)
        );
    }

    #[test]
    fn gate_require_after_tls_passes_everything() {
        for option in OTHER_OPTIONS.into_iter().chain([NBD_OPT_EXPORT_NAME]) {
            assert_eq!(TlsMode::Require.gate(true, option), Gate::Pass);
        }
    }

    #[test]
    fn starttls_off_refused_with_policy_never_tls_reqd() {
        assert!(matches!(
            TlsMode::Off.starttls(false, 0, 0),
            StartTls::Refuse {
                code: NBD_REP_ERR_POLICY,
                ..
            }
        ));
    }

    #[test]
    fn starttls_with_data_refused_invalid_in_every_mode() {
        for mode in [TlsMode::Off, TlsMode::On, TlsMode::Require] {
            assert!(matches!(
                mode.starttls(false, 4, 0),
                StartTls::Refuse {
                    code: NBD_REP_ERR_INVALID,
                    ..
                }
            ));
        }
    }

    #[test]
    fn starttls_on_and_require_upgrade() {
        assert_eq!(TlsMode::On.starttls(false, 0, 0), StartTls::Upgrade);
        assert_eq!(TlsMode::Require.starttls(false, 0, 0), StartTls::Upgrade);
    }

    #[test]
    fn starttls_twice_refused_invalid() {
        for mode in [TlsMode::On, TlsMode::Require] {
            assert!(matches!(
                mode.starttls(true, 0, 0),
                StartTls::Refuse {
                    code: NBD_REP_ERR_INVALID,
                    ..
                }
            ));
        }
    }

    #[test]
    fn starttls_followed_by_early_bytes_closes() {
        assert_eq!(
            TlsMode::On.starttls(false, 0, 5),
            StartTls::Close(HandshakeError::StartTlsNotLast(5))
        );
    }

    #[test]
    fn for_client_without_fixed_newstyle_is_off_under_on() {
        assert_eq!(TlsMode::On.for_client(false), TlsMode::Off);
        assert_eq!(TlsMode::On.for_client(true), TlsMode::On);
        assert_eq!(TlsMode::Require.for_client(false), TlsMode::Require);
    }

    #[test]
    fn check_client_flags_require_needs_fixed_newstyle() {
        assert_eq!(
            TlsMode::Require.check_client_flags(false),
            Err(HandshakeError::TlsNeedsFixedNewstyle)
        );
        assert_eq!(TlsMode::Require.check_client_flags(true), Ok(()));
        assert_eq!(TlsMode::On.check_client_flags(false), Ok(()));
    }
}
