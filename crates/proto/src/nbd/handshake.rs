//! Server side of NBD fixed-newstyle negotiation, as a sans-IO state machine.
//!
//! Negotiation is a conversation in which the server must be consulted mid-way (does this
//! export exist, how big is it, which exports are there), so it is a state machine rather
//! than a parser: the connection feeds bytes in with [`Handshake::feed`], asks
//! [`Handshake::poll`] what happened, answers questions with [`Handshake::answer_list`] and
//! [`Handshake::answer_export`], and writes [`Handshake::take_output`] to the socket. No
//! socket, clock or export table lives here, which keeps every branch testable with byte
//! strings and lets the fuzzer drive it.
//!
//! Wire layout (`doc/proto.md`, "Fixed newstyle negotiation"):
//!
//! ```text
//! S: u64 NBDMAGIC, u64 IHAVEOPT, u16 handshake flags
//! C: u32 client flags
//! C: u64 IHAVEOPT, u32 option, u32 length, length bytes of data       (repeated)
//! S: u64 REPLY_MAGIC_OPT, u32 option, u32 reply type, u32 length, data (one or more per option)
//! ```
//!
//! Rules worth knowing before changing this file:
//!
//! - Client bytes are untrusted. Nothing is allocated from a length the client claims: an
//!   option longer than [`NBD_MAX_OPTION_LEN`] is answered with `NBD_REP_ERR_TOO_BIG` and its
//!   bytes are discarded as they are fed, and every count inside a payload is checked against
//!   the bytes actually present.
//! - Malformed options get an error reply and negotiation continues (the spec says a server
//!   should keep erroring until the client gives up). Only what cannot be answered closes the
//!   connection: bad client flags, a lost option magic, and `NBD_OPT_EXPORT_NAME` problems
//!   (that option has no error reply).
//! - Clients without `NBD_FLAG_C_FIXED_NEWSTYLE` are still offered fixed-newstyle replies, which
//!   the spec allows; such clients only ever send `NBD_OPT_EXPORT_NAME` anyway.
//! - Extended headers imply structured replies: [`Negotiated::structured_replies`] is true
//!   whenever [`Negotiated::extended_headers`] is, and `NBD_OPT_STRUCTURED_REPLY` after them is
//!   refused with `NBD_REP_ERR_EXT_HEADER_REQD` as the spec says. Repeating either option gets
//!   `NBD_REP_ERR_INVALID` (the spec's answer to repeated state-changing options). Neither
//!   resets the meta-context selection: only `NBD_OPT_STARTTLS` does in the spec, and qemu's
//!   server behaves the same way.
//! - TLS ([`HandshakeConfig::tls`]): which option gets which answer before and after
//!   `NBD_OPT_STARTTLS` is decided in [`super::tls`]; this machine applies it. After the
//!   `NBD_REP_ACK` it reports [`Event::StartTls`] and waits: the server upgrades its stream,
//!   calls [`Handshake::tls_started`], and feeds the same machine the decrypted bytes. What was
//!   negotiated before (structured replies, extended headers, meta contexts) is forgotten
//!   then, as the spec requires, so nothing a man in the middle did in plaintext carries over.

use super::consts::*;
use super::context::CONTEXT_BASE_ALLOCATION;
use super::reply::ReplyForm;
use super::tls::{Gate, StartTls, TlsMode};
use super::truncate_str;

/// What the server offers during negotiation.
#[derive(Debug, Clone)]
pub struct HandshakeConfig {
    /// Meta contexts the server supports, e.g. `vec!["base:allocation".into()]`. The context
    /// id given to clients is the index here plus one.
    pub meta_contexts: Vec<String>,
    /// Acknowledge `NBD_OPT_STRUCTURED_REPLY` (true by default).
    pub allow_structured_replies: bool,
    /// Acknowledge `NBD_OPT_EXTENDED_HEADERS` (true by default). Extended headers imply
    /// structured replies, so they are refused as well when structured replies are disabled.
    pub allow_extended_headers: bool,
    /// Whether `NBD_OPT_STARTTLS` is offered, and whether it must come first ([`TlsMode`];
    /// `Off` by default).
    pub tls: TlsMode,
    /// Handshake flags advertised in the greeting (nbdkit's `--mask-handshake`): by default
    /// `NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES`. A client setting a flag the server did
    /// not advertise is refused, as nbdkit refuses it.
    pub handshake_flags: u16,
}

impl Default for HandshakeConfig {
    fn default() -> Self {
        HandshakeConfig {
            meta_contexts: vec![CONTEXT_BASE_ALLOCATION.into()],
            allow_structured_replies: true,
            allow_extended_headers: true,
            tls: TlsMode::Off,
            handshake_flags: NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES,
        }
    }
}

/// The server's answer about one export, for `NBD_OPT_INFO`, `NBD_OPT_GO` and
/// `NBD_OPT_EXPORT_NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportDetails {
    /// Canonical export name, sent in `NBD_INFO_NAME` when the client asks for it.
    pub name: String,
    /// Sent in `NBD_INFO_DESCRIPTION` when the client asks and this is `Some`.
    pub description: Option<String>,
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags computed by the server. The state machine ORs in
    /// `NBD_FLAG_HAS_FLAGS`, clears `NBD_FLAG_SEND_DF` unless structured replies (or extended
    /// headers) were negotiated, and clears `NBD_FLAG_BLOCK_STAT_PAYLOAD` unless extended
    /// headers were.
    pub transmission_flags: u16,
    /// `(minimum, preferred, maximum)` block sizes: sent in `NBD_INFO_BLOCK_SIZE` whenever
    /// `Some`, requested or not.
    pub block_size: Option<(u32, u32, u32)>,
}

/// Why the server refuses an export (for anything but `NBD_OPT_EXPORT_NAME`, which cannot be
/// refused politely and closes the connection instead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportRefusal {
    /// `NBD_REP_ERR_UNKNOWN` with this message.
    Unknown(String),
    /// Any `NBD_REP_ERR_*` code (bit 31 set) with a message. A code without bit 31 is not an
    /// error and is sent as `NBD_REP_ERR_INVALID` instead.
    Error {
        /// An `NBD_REP_ERR_*` value.
        code: u32,
        /// Human-readable text, cut to 4096 bytes.
        message: String,
    },
}

impl ExportRefusal {
    fn code(&self) -> u32 {
        match self {
            ExportRefusal::Unknown(_) => NBD_REP_ERR_UNKNOWN,
            ExportRefusal::Error { code, .. } if code & NBD_REP_FLAG_ERROR != 0 => *code,
            ExportRefusal::Error { .. } => NBD_REP_ERR_INVALID,
        }
    }

    fn message(&self) -> &str {
        match self {
            ExportRefusal::Unknown(m) | ExportRefusal::Error { message: m, .. } => m,
        }
    }
}

/// Which option an [`Event::ExportQuery`] comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// `NBD_OPT_INFO`: describe the export, negotiation continues.
    Info,
    /// `NBD_OPT_GO`: describe the export and enter transmission.
    Go,
    /// `NBD_OPT_EXPORT_NAME`: enter transmission; a refusal closes the connection.
    ExportName,
    /// `NBD_OPT_LIST_META_CONTEXT`: only whether the export exists matters.
    ListMetaContext,
    /// `NBD_OPT_SET_META_CONTEXT`: only whether the export exists matters.
    SetMetaContext,
}

impl Purpose {
    fn option(self) -> u32 {
        match self {
            Purpose::Info => NBD_OPT_INFO,
            Purpose::Go => NBD_OPT_GO,
            Purpose::ExportName => NBD_OPT_EXPORT_NAME,
            Purpose::ListMetaContext => NBD_OPT_LIST_META_CONTEXT,
            Purpose::SetMetaContext => NBD_OPT_SET_META_CONTEXT,
        }
    }
}

/// The outcome of a successful negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The export name exactly as the client sent it.
    pub export_name: String,
    /// Structured replies may be used; also true when extended headers were negotiated.
    pub structured_replies: bool,
    /// Extended (32-byte) request and reply headers are in use.
    pub extended_headers: bool,
    /// `(context id, name)` selected by the last `NBD_OPT_SET_META_CONTEXT`, if it named this
    /// export; empty otherwise.
    pub meta_contexts: Vec<(u32, String)>,
    /// What was sent for the final `NBD_OPT_GO` / `NBD_OPT_EXPORT_NAME`, with the transmission
    /// flags as they went on the wire (after the adjustments described on
    /// [`ExportDetails::transmission_flags`]).
    pub details: ExportDetails,
    /// The client asked for `NBD_INFO_BLOCK_SIZE` in its `NBD_OPT_GO`, which per the spec
    /// promises it will obey the advertised block sizes. False for `NBD_OPT_EXPORT_NAME`.
    pub client_requested_block_size: bool,
}

impl Negotiated {
    /// The reply form (and request header style) of the transmission phase that follows.
    pub fn reply_form(&self) -> ReplyForm {
        ReplyForm::new(self.structured_replies, self.extended_headers)
    }
}

/// The `(id, name)` candidates a LIST/SET_META_CONTEXT with `queries` matches: every one
/// for a LIST without queries; else those named exactly, and for a LIST those in a
/// namespace query (`qemu:`, `qemu:dirty-bitmap:`).
fn select_contexts(
    candidates: impl Iterator<Item = (u32, String)>,
    queries: &[String],
    set: bool,
) -> Vec<(u32, String)> {
    let all = !set && queries.is_empty();
    candidates
        .filter(|(_, ctx)| {
            all || queries
                .iter()
                .any(|q| *q == *ctx || (!set && q.ends_with(':') && ctx.starts_with(q.as_str())))
        })
        .collect()
}

/// The oldstyle protocol's whole negotiation (nbdkit's `-o`): the server sends `NBDMAGIC`,
/// the oldstyle magic, the export's size, 16 bits of handshake flags (none), 16 bits of
/// transmission flags and 124 zero bytes, and transmission starts at once: no options, so
/// one export, simple replies, no meta contexts. Returns the greeting and what was agreed.
pub fn oldstyle(details: ExportDetails) -> (Vec<u8>, Negotiated) {
    let flags = (details.transmission_flags | NBD_FLAG_HAS_FLAGS)
        & !(NBD_FLAG_SEND_DF | NBD_FLAG_BLOCK_STAT_PAYLOAD);
    let mut out = Vec::with_capacity(152);
    out.extend_from_slice(&NBDMAGIC.to_be_bytes());
    out.extend_from_slice(&NBD_OLDSTYLE_MAGIC.to_be_bytes());
    out.extend_from_slice(&details.size.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0u8; 124]);
    let negotiated = Negotiated {
        export_name: String::new(),
        structured_replies: false,
        extended_headers: false,
        meta_contexts: Vec::new(),
        details: ExportDetails {
            transmission_flags: flags,
            ..details
        },
        client_requested_block_size: false,
    };
    (out, negotiated)
}

/// What [`Handshake::poll`] reports.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// Write [`Handshake::take_output`] to the peer, then [`Handshake::feed`] more bytes and
    /// poll again.
    NeedInput,
    /// `NBD_OPT_LIST` arrived: call [`Handshake::answer_list`].
    ListExports,
    /// The client named an export: call [`Handshake::answer_export`]. Polling again before
    /// answering repeats this event.
    ExportQuery {
        /// The name as the client sent it (empty means the default export).
        name: String,
        /// Which option asked.
        purpose: Purpose,
    },
    /// Negotiation is over (`NBD_OPT_GO` acknowledged or `NBD_OPT_EXPORT_NAME` answered). Flush
    /// [`Handshake::take_output`]; transmission follows, and bytes already fed past the
    /// handshake come from [`Handshake::take_leftover`].
    Ready(Box<Negotiated>),
    /// `NBD_OPT_ABORT` (its acknowledgement is queued) or `NBD_OPT_EXPORT_NAME` on a refused
    /// export: flush [`Handshake::take_output`] and close.
    Aborted,
    /// `NBD_OPT_STARTTLS` was accepted and its `NBD_REP_ACK` is queued: flush
    /// [`Handshake::take_output`], run the TLS handshake on the connection, then call
    /// [`Handshake::tls_started`] and go on feeding the bytes read through TLS. Polling again
    /// before that repeats this event; if the TLS handshake fails, close the connection.
    StartTls,
}

/// A negotiation that cannot continue: close the connection (after flushing any output).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The option did not start with `IHAVEOPT`.
    #[error(
        "client sent option magic {0:#018x} instead of IHAVEOPT (0x49484156454f5054); \
         it is not an NBD client or lost sync, closing"
    )]
    BadMagic(u64),
    /// The client set flags this server does not know (the spec says: close).
    #[error(
        "client sent unknown handshake flags {0:#x}; only FIXED_NEWSTYLE (0x1) and \
         NO_ZEROES (0x2) are understood, closing"
    )]
    ClientFlags(u32),
    /// `NBD_OPT_EXPORT_NAME` with a name over 4096 bytes; that option cannot be answered with
    /// an error.
    #[error(
        "NBD_OPT_EXPORT_NAME with a {0}-byte name, over the 4096-byte limit; \
         this option has no error reply, closing"
    )]
    ExportNameTooLong(u32),
    /// `NBD_OPT_EXPORT_NAME` with a name that is not UTF-8 or contains NUL.
    #[error(
        "NBD_OPT_EXPORT_NAME with a name that is not valid UTF-8 or contains NUL; \
         this option has no error reply, closing"
    )]
    ExportNameInvalid,
    /// `NBD_OPT_EXPORT_NAME` after extended headers were acknowledged, which the spec forbids.
    #[error(
        "NBD_OPT_EXPORT_NAME after extended headers were negotiated, which the spec forbids \
         (the client must use NBD_OPT_GO); closing"
    )]
    ExportNameAfterExtendedHeaders,
    /// [`Handshake::poll`] was called after [`Event::Ready`] was returned.
    #[error("negotiation already finished; the connection is in transmission phase")]
    Finished,
    /// `NBD_OPT_EXPORT_NAME` before TLS on a server that requires TLS: that option has no
    /// error reply, so the spec says to close.
    #[error(
        "NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS on a server that requires TLS; \
         this option has no error reply, closing"
    )]
    ExportNameWithoutTls,
    /// A client without `NBD_FLAG_C_FIXED_NEWSTYLE` on a server that requires TLS: it cannot
    /// negotiate TLS, so it could never be served.
    #[error(
        "client did not set NBD_FLAG_C_FIXED_NEWSTYLE, so it cannot use TLS, \
         and this server requires TLS; closing"
    )]
    TlsNeedsFixedNewstyle,
    /// The client sent bytes after `NBD_OPT_STARTTLS` before it could have read the reply:
    /// they travelled in plaintext and must not be taken as part of the TLS session.
    #[error(
        "client sent {0} bytes after NBD_OPT_STARTTLS without waiting for the reply; \
         plaintext sent before the TLS handshake cannot be trusted, closing"
    )]
    StartTlsNotLast(usize),
}

#[derive(Debug)]
struct Query {
    name: String,
    purpose: Purpose,
    want_name: bool,
    want_description: bool,
    want_block_size: bool,
    meta_queries: Vec<String>,
}

impl Query {
    fn new(name: String, purpose: Purpose) -> Query {
        Query {
            name,
            purpose,
            want_name: false,
            want_description: false,
            want_block_size: false,
            meta_queries: Vec::new(),
        }
    }
}

#[derive(Debug)]
struct MetaSelection {
    export: String,
    contexts: Vec<(u32, String)>,
}

#[derive(Debug)]
enum State {
    ClientFlags,
    Options,
    AwaitingList,
    AwaitingExport(Query),
    Ready(Box<Negotiated>),
    /// `NBD_REP_ACK` to `NBD_OPT_STARTTLS` queued; waiting for [`Handshake::tls_started`].
    StartingTls,
    Finished,
    Aborted,
    Failed(HandshakeError),
}

/// Size of an option header: magic, option, length.
const OPTION_HEADER_LEN: usize = 16;

/// Server side of one connection's negotiation. See the module documentation.
#[derive(Debug)]
pub struct Handshake {
    config: HandshakeConfig,
    state: State,
    /// Fed bytes not yet parsed. Never holds more than one option plus what the client sent
    /// early.
    input: Vec<u8>,
    output: Vec<u8>,
    leftover: Vec<u8>,
    /// Bytes of an oversized option still to discard as they are fed.
    skip: u64,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    meta: Option<MetaSelection>,
    /// The TLS mode for this client (the configured one, adjusted to its flags).
    tls: TlsMode,
    /// The TLS session is up: every byte fed since came through it.
    tls_active: bool,
}

impl Handshake {
    /// Starts a negotiation and queues the greeting: `NBDMAGIC`, `IHAVEOPT`, and the
    /// configured handshake flags (`NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES` by default).
    pub fn new(config: HandshakeConfig) -> Handshake {
        let mut output = Vec::with_capacity(18);
        output.extend_from_slice(&NBDMAGIC.to_be_bytes());
        output.extend_from_slice(&IHAVEOPT.to_be_bytes());
        output.extend_from_slice(&config.handshake_flags.to_be_bytes());
        Handshake {
            state: State::ClientFlags,
            input: Vec::new(),
            output,
            leftover: Vec::new(),
            skip: 0,
            no_zeroes: false,
            structured: false,
            extended: false,
            meta: None,
            tls: config.tls,
            tls_active: false,
            config,
        }
    }

    /// Bytes to send to the client now (possibly empty).
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// Hands bytes read from the client to the state machine. Bytes that belong to an
    /// oversized option are dropped here, before they are stored; bytes after the end of
    /// negotiation are kept for [`Handshake::take_leftover`].
    pub fn feed(&mut self, data: &[u8]) {
        match self.state {
            State::Ready(_) | State::Finished => {
                self.leftover.extend_from_slice(data);
                return;
            }
            State::Aborted | State::Failed(_) => return,
            State::StartingTls => {
                // Read before the TLS handshake, so sent in plaintext: never trusted.
                self.state = State::Failed(HandshakeError::StartTlsNotLast(data.len()));
                return;
            }
            _ => {}
        }
        let mut data = data;
        if self.skip > 0 {
            let n = usize::try_from(self.skip).map_or(data.len(), |s| s.min(data.len()));
            self.skip -= n as u64;
            data = &data[n..];
        }
        self.input.extend_from_slice(data);
    }

    /// Advances negotiation as far as the fed bytes allow and reports what the connection
    /// must do next. An error means: flush output and close.
    pub fn poll(&mut self) -> Result<Event, HandshakeError> {
        loop {
            match &self.state {
                State::Failed(e) => return Err(e.clone()),
                State::Aborted => return Ok(Event::Aborted),
                State::Finished => return Err(HandshakeError::Finished),
                State::Ready(_) => {
                    if let State::Ready(n) = std::mem::replace(&mut self.state, State::Finished) {
                        return Ok(Event::Ready(n));
                    }
                }
                State::AwaitingList => return Ok(Event::ListExports),
                State::StartingTls => return Ok(Event::StartTls),
                State::AwaitingExport(q) => {
                    return Ok(Event::ExportQuery {
                        name: q.name.clone(),
                        purpose: q.purpose,
                    })
                }
                State::ClientFlags => {
                    let Some(b) = self.input.get(..4) else {
                        return Ok(Event::NeedInput);
                    };
                    let flags = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                    self.input.drain(..4);
                    // The client flags have the handshake flags' bit values.
                    if flags & !u32::from(self.config.handshake_flags) != 0 {
                        return self.fail(HandshakeError::ClientFlags(flags));
                    }
                    let fixed = flags & NBD_FLAG_C_FIXED_NEWSTYLE != 0;
                    if let Err(e) = self.tls.check_client_flags(fixed) {
                        return self.fail(e);
                    }
                    self.tls = self.tls.for_client(fixed);
                    self.no_zeroes = flags & NBD_FLAG_C_NO_ZEROES != 0;
                    self.state = State::Options;
                }
                State::Options => match self.next_option() {
                    Ok(true) => {}
                    Ok(false) => return Ok(Event::NeedInput),
                    Err(e) => return self.fail(e),
                },
            }
        }
    }

    /// Answers [`Event::ListExports`]: one `NBD_REP_SERVER` per `(name, description)`, then
    /// `NBD_REP_ACK`.
    ///
    /// The description, when present, goes in the reply's optional trailing bytes, which the
    /// spec defines as text for a human. Names over 4096 bytes are left out (no client could
    /// send them back) and descriptions are cut to 4096 bytes. Ignored (and a debug assertion)
    /// when no list was asked for.
    pub fn answer_list(&mut self, exports: &[(String, Option<String>)]) {
        if !matches!(self.state, State::AwaitingList) {
            debug_assert!(false, "answer_list without Event::ListExports");
            return;
        }
        for (name, description) in exports {
            if name.len() > NBD_MAX_STRING {
                continue;
            }
            let description = truncate_str(description.as_deref().unwrap_or(""), NBD_MAX_STRING);
            let len = 4 + name.len() + description.len();
            self.reply_header(NBD_OPT_LIST, NBD_REP_SERVER, len);
            self.output
                .extend_from_slice(&(name.len() as u32).to_be_bytes());
            self.output.extend_from_slice(name.as_bytes());
            self.output.extend_from_slice(description.as_bytes());
        }
        self.reply(NBD_OPT_LIST, NBD_REP_ACK, &[]);
        self.state = State::Options;
    }

    /// Answers [`Event::ListExports`] with an error (the plugin could not or would not list
    /// its exports: nbdkit sends `NBD_REP_ERR_PLATFORM`, or the refusal's code). Ignored
    /// (and a debug assertion) when no list was asked for.
    pub fn answer_list_error(&mut self, refusal: ExportRefusal) {
        if !matches!(self.state, State::AwaitingList) {
            debug_assert!(false, "answer_list_error without Event::ListExports");
            return;
        }
        self.reply_error(NBD_OPT_LIST, refusal.code(), refusal.message());
        self.state = State::Options;
    }

    /// Answers [`Event::ExportQuery`]. Ignored (and a debug assertion) when no export query is
    /// pending.
    ///
    /// - `Info`/`Go`: `Ok` sends `NBD_REP_INFO` for `NBD_INFO_EXPORT`, `NBD_INFO_NAME` and
    ///   `NBD_INFO_DESCRIPTION` if requested, `NBD_INFO_BLOCK_SIZE` whenever known, then
    ///   `NBD_REP_ACK`; for `Go` the next poll returns [`Event::Ready`]. `Err` sends the error
    ///   reply and negotiation continues.
    /// - `ExportName`: `Ok` sends size and flags (plus 124 zero bytes unless the client set
    ///   `NBD_FLAG_C_NO_ZEROES`) and leads to [`Event::Ready`]; `Err` leads to
    ///   [`Event::Aborted`], as the spec requires.
    /// - `ListMetaContext`/`SetMetaContext`: `Ok` (the details are not used) sends one
    ///   `NBD_REP_META_CONTEXT` per matching context, then `NBD_REP_ACK`; `Err` sends the error.
    pub fn answer_export(&mut self, answer: Result<ExportDetails, ExportRefusal>) {
        let State::AwaitingExport(query) = std::mem::replace(&mut self.state, State::Options)
        else {
            debug_assert!(false, "answer_export without Event::ExportQuery");
            return;
        };
        let option = query.purpose.option();
        let details = match answer {
            Ok(details) => details,
            Err(_) if query.purpose == Purpose::ExportName => {
                self.state = State::Aborted;
                return;
            }
            Err(refusal) => {
                self.reply_error(option, refusal.code(), refusal.message());
                return;
            }
        };
        match query.purpose {
            Purpose::ExportName => {
                let details = self.adjust(details);
                self.output.extend_from_slice(&details.size.to_be_bytes());
                self.output
                    .extend_from_slice(&details.transmission_flags.to_be_bytes());
                if !self.no_zeroes {
                    self.output.extend_from_slice(&[0u8; 124]);
                }
                self.finish(query.name, details, false);
            }
            Purpose::Info | Purpose::Go => {
                let details = self.adjust(details);
                self.send_info(option, &query, &details);
                self.reply(option, NBD_REP_ACK, &[]);
                if query.purpose == Purpose::Go {
                    self.finish(query.name, details, query.want_block_size);
                }
            }
            Purpose::ListMetaContext | Purpose::SetMetaContext => self.meta_reply(query, None),
        }
    }

    /// Answers an [`Event::ExportQuery`] with purpose `ListMetaContext` or `SetMetaContext`
    /// for an export that offers its own set of meta contexts: `Ok(offered)` lists or
    /// selects the contexts named in `offered`. A configured context keeps the id of
    /// [`HandshakeConfig::meta_contexts`], so every export agrees on them; a context only
    /// this export offers (qemu's `qemu:dirty-bitmap:NAME`) gets an id after the configured
    /// ones, from its place in `offered`. `Err` sends the error. For other purposes this is
    /// [`Handshake::answer_export`] refusing the export.
    pub fn answer_meta_query(&mut self, answer: Result<&[String], ExportRefusal>) {
        let State::AwaitingExport(query) = std::mem::replace(&mut self.state, State::Options)
        else {
            debug_assert!(false, "answer_meta_query without Event::ExportQuery");
            return;
        };
        let is_meta = matches!(
            query.purpose,
            Purpose::ListMetaContext | Purpose::SetMetaContext
        );
        match answer {
            Ok(offered) if is_meta => self.meta_reply(query, Some(offered)),
            answer => {
                debug_assert!(answer.is_err(), "answer_meta_query for an export query");
                self.state = State::AwaitingExport(query);
                let refusal = answer
                    .err()
                    .unwrap_or_else(|| ExportRefusal::Unknown("not a meta context query".into()));
                self.answer_export(Err(refusal));
            }
        }
    }

    /// Replies to LIST/SET_META_CONTEXT: one `NBD_REP_META_CONTEXT` per matching context
    /// (among `offered`, if given), then `NBD_REP_ACK`.
    fn meta_reply(&mut self, query: Query, offered: Option<&[String]>) {
        let option = query.purpose.option();
        let set = query.purpose == Purpose::SetMetaContext;
        let contexts = match offered {
            None => self.matching_contexts(&query.meta_queries, set),
            Some(offered) => {
                let configured = &self.config.meta_contexts;
                let base = configured.len() as u32 + 1;
                let candidates = offered.iter().enumerate().map(|(i, name)| {
                    let id = match configured.iter().position(|c| c == name) {
                        Some(at) => at as u32 + 1,
                        None => base + i as u32,
                    };
                    (id, name.clone())
                });
                let mut contexts: Vec<(u32, String)> =
                    select_contexts(candidates, &query.meta_queries, set);
                // The configured ones in their (id) order, as without `offered`.
                contexts.sort_by_key(|(id, _)| *id);
                contexts
            }
        };
        for (id, name) in &contexts {
            // The spec reserves the id in LIST replies and asks for zero.
            let id = if set { *id } else { 0 };
            self.reply_header(option, NBD_REP_META_CONTEXT, 4 + name.len());
            self.output.extend_from_slice(&id.to_be_bytes());
            self.output.extend_from_slice(name.as_bytes());
        }
        self.reply(option, NBD_REP_ACK, &[]);
        if set {
            self.meta = Some(MetaSelection {
                export: query.name,
                contexts,
            });
        }
    }

    /// Bytes fed after the option that ended negotiation: the start of the transmission
    /// phase, to be parsed before anything else read from the socket.
    pub fn take_leftover(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.leftover)
    }

    /// Answers [`Event::StartTls`]: the TLS session is up, and every byte fed from now on
    /// comes through it. Negotiation starts over from the options (the greeting and client
    /// flags are not repeated), with everything negotiated in plaintext forgotten. Ignored
    /// (and a debug assertion) when no upgrade is pending.
    pub fn tls_started(&mut self) {
        if !matches!(self.state, State::StartingTls) {
            debug_assert!(false, "tls_started without Event::StartTls");
            return;
        }
        self.tls_active = true;
        self.structured = false;
        self.extended = false;
        self.meta = None;
        self.state = State::Options;
    }

    /// True once the TLS session is up ([`Handshake::tls_started`]).
    pub fn is_tls(&self) -> bool {
        self.tls_active
    }

    fn fail(&mut self, e: HandshakeError) -> Result<Event, HandshakeError> {
        self.state = State::Failed(e.clone());
        self.input = Vec::new();
        Err(e)
    }

    /// Parses and handles one option if all of it is there. Ok(false) means: need more bytes.
    fn next_option(&mut self) -> Result<bool, HandshakeError> {
        if self.skip > 0 {
            return Ok(false);
        }
        let Some(h) = self.input.get(..OPTION_HEADER_LEN) else {
            return Ok(false);
        };
        let magic = u64::from_be_bytes(h[0..8].try_into().unwrap_or_default());
        let option = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
        let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        if magic != IHAVEOPT {
            return Err(HandshakeError::BadMagic(magic));
        }
        // TLS comes first: under FORCEDTLS nothing else about the option is looked at.
        match self.tls.gate(self.tls_active, option) {
            Gate::Pass => {}
            Gate::Close(e) => return Err(e),
            Gate::Refuse { code, message } => {
                self.skip_option(len);
                self.reply_error(option, code, message);
                return Ok(true);
            }
        }
        if option == NBD_OPT_EXPORT_NAME && len as usize > NBD_MAX_STRING {
            return Err(HandshakeError::ExportNameTooLong(len));
        }
        if len > NBD_MAX_OPTION_LEN {
            self.skip_option(len);
            self.reply_error(
                option,
                NBD_REP_ERR_TOO_BIG,
                &format!(
                    "option {} of {len} bytes is over this server's limit of \
                     {NBD_MAX_OPTION_LEN} bytes",
                    option_name(option)
                ),
            );
            return Ok(true);
        }
        let end = OPTION_HEADER_LEN + len as usize;
        if self.input.len() < end {
            return Ok(false);
        }
        let payload = self.input[OPTION_HEADER_LEN..end].to_vec();
        self.input.drain(..end);
        self.handle_option(option, &payload)?;
        Ok(true)
    }

    /// Drops the option whose header is at the start of `input` and its `len` data bytes:
    /// those already fed now, the rest as they are fed, never buffered.
    fn skip_option(&mut self, len: u32) {
        self.input.drain(..OPTION_HEADER_LEN);
        let n = self.input.len().min(len as usize);
        self.input.drain(..n);
        self.skip = u64::from(len) - n as u64;
    }

    fn handle_option(&mut self, option: u32, payload: &[u8]) -> Result<(), HandshakeError> {
        match option {
            NBD_OPT_STARTTLS => {
                match self
                    .tls
                    .starttls(self.tls_active, payload.len(), self.input.len())
                {
                    StartTls::Upgrade => {
                        self.reply(option, NBD_REP_ACK, &[]);
                        self.state = State::StartingTls;
                    }
                    StartTls::Refuse { code, message } => self.reply_error(option, code, message),
                    StartTls::Close(e) => return Err(e),
                }
            }
            NBD_OPT_EXPORT_NAME => {
                if self.extended {
                    return Err(HandshakeError::ExportNameAfterExtendedHeaders);
                }
                let name = nbd_string(payload).ok_or(HandshakeError::ExportNameInvalid)?;
                self.state = State::AwaitingExport(Query::new(name, Purpose::ExportName));
            }
            NBD_OPT_ABORT => {
                // The spec says to ignore any data rather than refuse it.
                self.reply(option, NBD_REP_ACK, &[]);
                self.state = State::Aborted;
            }
            NBD_OPT_LIST => {
                if payload.is_empty() {
                    self.state = State::AwaitingList;
                } else {
                    self.reject_payload(option);
                }
            }
            NBD_OPT_INFO | NBD_OPT_GO => self.handle_info(option, payload),
            NBD_OPT_STRUCTURED_REPLY => {
                if !payload.is_empty() {
                    self.reject_payload(option);
                } else if !self.config.allow_structured_replies {
                    self.reply_error(option, NBD_REP_ERR_UNSUP, "structured replies are disabled");
                } else if self.extended {
                    self.reply_error(
                        option,
                        NBD_REP_ERR_EXT_HEADER_REQD,
                        "extended headers already negotiated",
                    );
                } else if self.structured {
                    self.reply_error(
                        option,
                        NBD_REP_ERR_INVALID,
                        "structured replies already negotiated",
                    );
                } else {
                    self.structured = true;
                    self.reply(option, NBD_REP_ACK, &[]);
                }
            }
            NBD_OPT_EXTENDED_HEADERS => {
                if !payload.is_empty() {
                    self.reject_payload(option);
                } else if !(self.config.allow_extended_headers
                    && self.config.allow_structured_replies)
                {
                    self.reply_error(option, NBD_REP_ERR_UNSUP, "extended headers are disabled");
                } else if self.extended {
                    self.reply_error(
                        option,
                        NBD_REP_ERR_INVALID,
                        "extended headers already negotiated",
                    );
                } else {
                    self.extended = true;
                    self.reply(option, NBD_REP_ACK, &[]);
                }
            }
            NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => {
                self.handle_meta(option, payload)
            }
            _ => self.reply_error(
                option,
                NBD_REP_ERR_UNSUP,
                &format!("option {} is not supported", option_name(option)),
            ),
        }
        Ok(())
    }

    /// `NBD_OPT_INFO` / `NBD_OPT_GO`: u32 name length, name, u16 count, count x u16 info types.
    fn handle_info(&mut self, option: u32, payload: &[u8]) {
        let mut r = Reader(payload);
        let Some(name_len) = r.u32() else {
            return self.invalid(option, "option data is shorter than its fixed fields");
        };
        if name_len as usize > NBD_MAX_STRING {
            return self.invalid(option, "export name is longer than 4096 bytes");
        }
        let (Some(name), Some(count)) = (r.take(name_len as usize), r.u16()) else {
            return self.invalid(option, "export name length runs past the option data");
        };
        if r.0.len() != 2 * usize::from(count) {
            return self.invalid(
                option,
                "number of information requests does not match the option length",
            );
        }
        let Some(name) = nbd_string(name) else {
            return self.invalid(option, "export name is not valid UTF-8 or contains NUL");
        };
        let purpose = if option == NBD_OPT_GO {
            Purpose::Go
        } else {
            Purpose::Info
        };
        let mut query = Query::new(name, purpose);
        while let Some(info) = r.u16() {
            match info {
                NBD_INFO_NAME => query.want_name = true,
                NBD_INFO_DESCRIPTION => query.want_description = true,
                NBD_INFO_BLOCK_SIZE => query.want_block_size = true,
                // NBD_INFO_EXPORT is always sent; unknown requests must be ignored.
                _ => {}
            }
        }
        self.state = State::AwaitingExport(query);
    }

    /// `NBD_OPT_{LIST,SET}_META_CONTEXT`: u32 name length, name, u32 count, then count x
    /// (u32 length, query).
    fn handle_meta(&mut self, option: u32, payload: &[u8]) {
        let set = option == NBD_OPT_SET_META_CONTEXT;
        if set {
            // The spec: SET replaces the previous selection even when it fails.
            self.meta = None;
            if !self.structured && !self.extended {
                return self.invalid(
                    option,
                    "negotiate structured replies or extended headers before selecting \
                     meta contexts",
                );
            }
        }
        let mut r = Reader(payload);
        let Some(name_len) = r.u32() else {
            return self.invalid(option, "option data is shorter than its fixed fields");
        };
        if name_len as usize > NBD_MAX_STRING {
            return self.invalid(option, "export name is longer than 4096 bytes");
        }
        let (Some(name), Some(count)) = (r.take(name_len as usize), r.u32()) else {
            return self.invalid(option, "export name length runs past the option data");
        };
        let Some(name) = nbd_string(name) else {
            return self.invalid(option, "export name is not valid UTF-8 or contains NUL");
        };
        // Each query takes at least 4 bytes, so a count beyond that is a lie; checking first
        // keeps the loop below bounded by the data actually present.
        if count as usize > r.0.len() / 4 {
            return self.invalid(option, "number of queries does not fit the option length");
        }
        let mut queries = Vec::new();
        for _ in 0..count {
            let Some(len) = r.u32() else {
                return self.invalid(option, "number of queries does not fit the option length");
            };
            if len as usize > NBD_MAX_STRING {
                return self.invalid(option, "meta context query is longer than 4096 bytes");
            }
            let Some(query) = r.take(len as usize) else {
                return self.invalid(option, "meta context query runs past the option data");
            };
            let Some(query) = nbd_string(query) else {
                return self.invalid(option, "meta context query is not valid UTF-8");
            };
            queries.push(query);
        }
        if !r.0.is_empty() {
            return self.invalid(option, "option data continues after the last query");
        }
        let purpose = if set {
            Purpose::SetMetaContext
        } else {
            Purpose::ListMetaContext
        };
        let mut query = Query::new(name, purpose);
        query.meta_queries = queries;
        self.state = State::AwaitingExport(query);
    }

    /// Which configured contexts the queries name, in configuration order, each once.
    ///
    /// An exact name selects that context. A query ending in `:` (such as `base:`) is a
    /// wildcard for everything starting with it, for LIST only: the spec says SET must ignore
    /// `base:` and should not select anything with an empty leaf name. LIST with no queries
    /// lists everything; SET with no queries selects nothing. Unknown names are ignored.
    fn matching_contexts(&self, queries: &[String], set: bool) -> Vec<(u32, String)> {
        let candidates = self
            .config
            .meta_contexts
            .iter()
            .enumerate()
            .map(|(i, ctx)| ((i + 1) as u32, ctx.clone()));
        select_contexts(candidates, queries, set)
    }

    fn send_info(&mut self, option: u32, query: &Query, details: &ExportDetails) {
        let mut export = [0u8; 12];
        export[0..2].copy_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
        export[2..10].copy_from_slice(&details.size.to_be_bytes());
        export[10..12].copy_from_slice(&details.transmission_flags.to_be_bytes());
        self.reply(option, NBD_REP_INFO, &export);
        if query.want_name {
            let name = truncate_str(&details.name, NBD_MAX_STRING);
            self.info_string(option, NBD_INFO_NAME, name);
        }
        if let (true, Some(description)) = (query.want_description, &details.description) {
            let description = truncate_str(description, NBD_MAX_STRING);
            self.info_string(option, NBD_INFO_DESCRIPTION, description);
        }
        if let Some((min, preferred, max)) = details.block_size {
            let mut b = [0u8; 14];
            b[0..2].copy_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
            b[2..6].copy_from_slice(&min.to_be_bytes());
            b[6..10].copy_from_slice(&preferred.to_be_bytes());
            b[10..14].copy_from_slice(&max.to_be_bytes());
            self.reply(option, NBD_REP_INFO, &b);
        }
    }

    fn info_string(&mut self, option: u32, info: u16, s: &str) {
        self.reply_header(option, NBD_REP_INFO, 2 + s.len());
        self.output.extend_from_slice(&info.to_be_bytes());
        self.output.extend_from_slice(s.as_bytes());
    }

    /// Applies the flag rules the spec ties to negotiation (see
    /// [`ExportDetails::transmission_flags`]).
    fn adjust(&self, mut details: ExportDetails) -> ExportDetails {
        let mut flags = details.transmission_flags | NBD_FLAG_HAS_FLAGS;
        if !self.structured && !self.extended {
            flags &= !NBD_FLAG_SEND_DF;
        }
        if !self.extended {
            flags &= !NBD_FLAG_BLOCK_STAT_PAYLOAD;
        }
        details.transmission_flags = flags;
        details
    }

    fn finish(&mut self, export_name: String, details: ExportDetails, block_size: bool) {
        let meta_contexts = match self.meta.take() {
            Some(m) if m.export == export_name => m.contexts,
            _ => Vec::new(),
        };
        let negotiated = Negotiated {
            export_name,
            structured_replies: self.structured || self.extended,
            extended_headers: self.extended,
            meta_contexts,
            details,
            client_requested_block_size: block_size,
        };
        self.leftover.append(&mut self.input);
        self.state = State::Ready(Box::new(negotiated));
    }

    fn reply_header(&mut self, option: u32, kind: u32, len: usize) {
        self.output
            .extend_from_slice(&REPLY_MAGIC_OPT.to_be_bytes());
        self.output.extend_from_slice(&option.to_be_bytes());
        self.output.extend_from_slice(&kind.to_be_bytes());
        // Every reply built here is bounded by a few 4096-byte strings.
        self.output.extend_from_slice(&(len as u32).to_be_bytes());
    }

    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) {
        self.reply_header(option, kind, data.len());
        self.output.extend_from_slice(data);
    }

    fn reply_error(&mut self, option: u32, code: u32, message: &str) {
        self.reply(
            option,
            code,
            truncate_str(message, NBD_MAX_STRING).as_bytes(),
        );
    }

    fn invalid(&mut self, option: u32, message: &str) {
        self.reply_error(option, NBD_REP_ERR_INVALID, message);
    }

    fn reject_payload(&mut self, option: u32) {
        let message = format!("option {} takes no data", option_name(option));
        self.invalid(option, &message);
    }
}

/// A big-endian cursor over an option payload; every read fails cleanly at the end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// A protocol string: UTF-8, no NUL, at most 4096 bytes.
fn nbd_string(bytes: &[u8]) -> Option<String> {
    if bytes.len() > NBD_MAX_STRING || bytes.contains(&0) {
        return None;
    }
    std::str::from_utf8(bytes).ok().map(str::to_owned)
}

fn option_name(option: u32) -> String {
    let name = match option {
        NBD_OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        NBD_OPT_ABORT => "NBD_OPT_ABORT",
        NBD_OPT_LIST => "NBD_OPT_LIST",
        NBD_OPT_PEEK_EXPORT => "NBD_OPT_PEEK_EXPORT",
        NBD_OPT_STARTTLS => "NBD_OPT_STARTTLS",
        NBD_OPT_INFO => "NBD_OPT_INFO",
        NBD_OPT_GO => "NBD_OPT_GO",
        NBD_OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        NBD_OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        NBD_OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        NBD_OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => return option.to_string(),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXED: u32 = NBD_FLAG_C_FIXED_NEWSTYLE;
    const FIXED_NO_ZEROES: u32 = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;
    const SIZE: u64 = 1 << 20;

    fn option(code: u32, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn info_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(name.len() as u32).to_be_bytes());
        v.extend_from_slice(name);
        v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            v.extend_from_slice(&i.to_be_bytes());
        }
        v
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
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

    fn config_with(contexts: &[&str]) -> HandshakeConfig {
        HandshakeConfig {
            meta_contexts: contexts.iter().map(|s| s.to_string()).collect(),
            ..HandshakeConfig::default()
        }
    }

    /// A handshake past the greeting and the client flags.
    fn started(config: HandshakeConfig, flags: u32) -> Handshake {
        let mut h = Handshake::new(config);
        h.take_output();
        h.feed(&flags.to_be_bytes());
        assert_eq!(h.poll(), Ok(Event::NeedInput));
        h
    }

    fn details(name: &str) -> ExportDetails {
        ExportDetails {
            name: name.to_owned(),
            description: Some("a test disk".to_owned()),
            size: SIZE,
            transmission_flags: NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_DF,
            block_size: None,
        }
    }

    #[derive(Debug, PartialEq, Eq)]
    struct Rep {
        option: u32,
        kind: u32,
        data: Vec<u8>,
    }

    /// Splits server output into option replies; panics on anything else.
    fn replies(mut bytes: &[u8]) -> Vec<Rep> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            assert!(bytes.len() >= 20, "truncated reply header: {bytes:?}");
            assert_eq!(bytes[0..8], REPLY_MAGIC_OPT.to_be_bytes());
            let option = u32::from_be_bytes(bytes[8..12].try_into().unwrap());
            let kind = u32::from_be_bytes(bytes[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(bytes[16..20].try_into().unwrap()) as usize;
            out.push(Rep {
                option,
                kind,
                data: bytes[20..20 + len].to_vec(),
            });
            bytes = &bytes[20 + len..];
        }
        out
    }

    /// Sends one option and returns the event it leads to.
    fn exchange(h: &mut Handshake, code: u32, data: &[u8]) -> Result<Event, HandshakeError> {
        h.feed(&option(code, data));
        h.poll()
    }

    fn ack(option: u32) -> Rep {
        Rep {
            option,
            kind: NBD_REP_ACK,
            data: Vec::new(),
        }
    }

    fn kinds(reps: &[Rep]) -> Vec<u32> {
        reps.iter().map(|r| r.kind).collect()
    }

    fn ask(h: &mut Handshake, code: u32, data: &[u8], name: &str, purpose: Purpose) {
        assert_eq!(
            exchange(h, code, data),
            Ok(Event::ExportQuery {
                name: name.to_owned(),
                purpose
            })
        );
    }

    /// GO on `name` answered with [`details`], expecting Ready.
    fn go(h: &mut Handshake, name: &str) -> Negotiated {
        ask(
            h,
            NBD_OPT_GO,
            &info_data(name.as_bytes(), &[]),
            name,
            Purpose::Go,
        );
        h.answer_export(Ok(details(name)));
        match h.poll() {
            Ok(Event::Ready(n)) => *n,
            other => panic!("expected Ready, got {other:?}"),
        }
    }

    fn meta_replies(reps: &[Rep]) -> Vec<(u32, String)> {
        reps.iter()
            .filter(|r| r.kind == NBD_REP_META_CONTEXT)
            .map(|r| {
                let id = u32::from_be_bytes(r.data[0..4].try_into().unwrap());
                (id, String::from_utf8(r.data[4..].to_vec()).unwrap())
            })
            .collect()
    }

    #[test]
    fn new_greeting_is_magics_and_flags() {
        let mut h = Handshake::new(HandshakeConfig::default());
        let expected: Vec<u8> = [&b"NBDMAGIC"[..], b"IHAVEOPT", &[0, 3]].concat();
        assert_eq!(h.take_output(), expected);
        assert!(h.take_output().is_empty());
        assert_eq!(h.poll(), Ok(Event::NeedInput));
    }

    #[test]
    fn client_flags_unknown_bit_closes() {
        let mut h = Handshake::new(HandshakeConfig::default());
        h.feed(&(FIXED | 4).to_be_bytes());
        assert_eq!(h.poll(), Err(HandshakeError::ClientFlags(FIXED | 4)));
        // The failure sticks.
        h.feed(&option(NBD_OPT_LIST, &[]));
        assert_eq!(h.poll(), Err(HandshakeError::ClientFlags(FIXED | 4)));
    }

    #[test]
    fn list_can_be_refused_and_negotiation_goes_on() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        h.feed(&option(NBD_OPT_LIST, &[]));
        assert_eq!(h.poll(), Ok(Event::ListExports));
        h.answer_list_error(ExportRefusal::Error {
            code: NBD_REP_ERR_PLATFORM,
            message: "no list".into(),
        });
        assert_eq!(h.poll(), Ok(Event::NeedInput));
        let out = h.take_output();
        assert_eq!(&out[12..16], &NBD_REP_ERR_PLATFORM.to_be_bytes());
        assert_eq!(&out[20..], b"no list");
    }

    #[test]
    fn oldstyle_greeting_is_152_bytes_with_size_and_flags() {
        let details = ExportDetails {
            name: "x".into(),
            description: None,
            size: 0x1234,
            transmission_flags: NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_DF,
            block_size: None,
        };
        let (greeting, n) = oldstyle(details);
        assert_eq!(greeting.len(), 152);
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        assert_eq!(&greeting[8..16], &NBD_OLDSTYLE_MAGIC.to_be_bytes());
        assert_eq!(&greeting[16..24], &0x1234u64.to_be_bytes());
        let flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH;
        assert_eq!(&greeting[24..28], &[0, 0, (flags >> 8) as u8, flags as u8]);
        assert!(greeting[28..].iter().all(|&b| b == 0));
        assert!(!n.structured_replies && n.meta_contexts.is_empty());
        assert_eq!(n.details.transmission_flags, flags);
    }

    #[test]
    fn masked_handshake_flags_are_advertised_and_enforced() {
        let config = HandshakeConfig {
            handshake_flags: NBD_FLAG_FIXED_NEWSTYLE,
            ..HandshakeConfig::default()
        };
        let mut h = Handshake::new(config.clone());
        assert_eq!(&h.take_output()[16..], &[0, 1]);
        h.feed(&FIXED.to_be_bytes());
        assert_eq!(h.poll(), Ok(Event::NeedInput));
        // NO_ZEROES was not offered: a client asking for it is refused.
        let mut h = Handshake::new(config);
        h.feed(&(FIXED | NBD_FLAG_C_NO_ZEROES).to_be_bytes());
        assert!(h.poll().is_err());
    }

    #[test]
    fn option_bad_magic_closes() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        let mut bytes = option(NBD_OPT_LIST, &[]);
        bytes[0] = b'X';
        h.feed(&bytes);
        assert_eq!(
            h.poll(),
            Err(HandshakeError::BadMagic(u64::from_be_bytes(*b"XHAVEOPT")))
        );
    }

    #[test]
    fn export_name_with_no_zeroes_replies_size_and_flags_only() {
        let mut h = started(HandshakeConfig::default(), FIXED_NO_ZEROES);
        ask(
            &mut h,
            NBD_OPT_EXPORT_NAME,
            b"disk",
            "disk",
            Purpose::ExportName,
        );
        h.answer_export(Ok(details("disk")));
        let Ok(Event::Ready(n)) = h.poll() else {
            panic!("not ready")
        };
        let mut expected = SIZE.to_be_bytes().to_vec();
        // HAS_FLAGS added, SEND_DF dropped: no structured replies.
        expected.extend_from_slice(&(NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH).to_be_bytes());
        assert_eq!(h.take_output(), expected);
        assert_eq!(n.export_name, "disk");
        assert!(!n.structured_replies && !n.extended_headers);
        assert!(!n.client_requested_block_size);
    }

    #[test]
    fn export_name_without_no_zeroes_pads_124_zeroes() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        ask(&mut h, NBD_OPT_EXPORT_NAME, b"", "", Purpose::ExportName);
        h.answer_export(Ok(details("")));
        assert!(matches!(h.poll(), Ok(Event::Ready(_))));
        let out = h.take_output();
        assert_eq!(out.len(), 8 + 2 + 124);
        assert!(out[10..].iter().all(|&b| b == 0));
    }

    #[test]
    fn export_name_refused_aborts_without_reply() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        ask(
            &mut h,
            NBD_OPT_EXPORT_NAME,
            b"nope",
            "nope",
            Purpose::ExportName,
        );
        h.answer_export(Err(ExportRefusal::Unknown("no such export".into())));
        assert_eq!(h.poll(), Ok(Event::Aborted));
        assert!(h.take_output().is_empty());
    }

    #[test]
    fn export_name_over_4096_bytes_closes_before_payload() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        // Only the header: the decision must not wait for (or buffer) the name.
        h.feed(&option(NBD_OPT_EXPORT_NAME, &vec![b'a'; 4097])[..16]);
        assert_eq!(h.poll(), Err(HandshakeError::ExportNameTooLong(4097)));
    }

    #[test]
    fn export_name_with_nul_closes() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        assert_eq!(
            exchange(&mut h, NBD_OPT_EXPORT_NAME, b"a\0b"),
            Err(HandshakeError::ExportNameInvalid)
        );
    }

    #[test]
    fn export_name_after_extended_headers_closes() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        exchange(&mut h, NBD_OPT_EXTENDED_HEADERS, &[]).unwrap();
        assert_eq!(
            exchange(&mut h, NBD_OPT_EXPORT_NAME, b"disk"),
            Err(HandshakeError::ExportNameAfterExtendedHeaders)
        );
    }

    #[test]
    fn info_then_go_replies_info_ack_then_ready() {
        let mut h = started(HandshakeConfig::default(), FIXED_NO_ZEROES);
        ask(
            &mut h,
            NBD_OPT_INFO,
            &info_data(b"disk", &[]),
            "disk",
            Purpose::Info,
        );
        let mut d = details("disk");
        d.block_size = Some((512, 4096, 1 << 25));
        h.answer_export(Ok(d.clone()));
        assert_eq!(h.poll(), Ok(Event::NeedInput));

        let mut export = NBD_INFO_EXPORT.to_be_bytes().to_vec();
        export.extend_from_slice(&SIZE.to_be_bytes());
        export.extend_from_slice(&(NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH).to_be_bytes());
        let mut block = NBD_INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [512u32, 4096, 1 << 25] {
            block.extend_from_slice(&v.to_be_bytes());
        }
        let info = |data| Rep {
            option: NBD_OPT_INFO,
            kind: NBD_REP_INFO,
            data,
        };
        assert_eq!(
            replies(&h.take_output()),
            vec![info(export), info(block), ack(NBD_OPT_INFO)]
        );

        ask(
            &mut h,
            NBD_OPT_GO,
            &info_data(b"disk", &[NBD_INFO_BLOCK_SIZE]),
            "disk",
            Purpose::Go,
        );
        h.answer_export(Ok(d));
        let Ok(Event::Ready(n)) = h.poll() else {
            panic!("not ready")
        };
        let reps = replies(&h.take_output());
        assert_eq!(
            kinds(&reps),
            vec![NBD_REP_INFO, NBD_REP_INFO, NBD_REP_ACK],
            "{reps:?}"
        );
        assert!(reps.iter().all(|r| r.option == NBD_OPT_GO));
        assert!(n.client_requested_block_size);
        assert_eq!(
            n.details.transmission_flags,
            NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH
        );
        assert_eq!(h.poll(), Err(HandshakeError::Finished));
    }

    #[test]
    fn info_name_and_description_requested_are_sent() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        ask(
            &mut h,
            NBD_OPT_INFO,
            &info_data(b"", &[NBD_INFO_NAME, NBD_INFO_DESCRIPTION, 999]),
            "",
            Purpose::Info,
        );
        h.answer_export(Ok(details("canonical")));
        let reps = replies(&h.take_output());
        let strings: Vec<(u16, Vec<u8>)> = reps
            .iter()
            .filter(|r| r.kind == NBD_REP_INFO)
            .map(|r| {
                (
                    u16::from_be_bytes([r.data[0], r.data[1]]),
                    r.data[2..].to_vec(),
                )
            })
            .collect();
        assert_eq!(strings.len(), 3);
        assert_eq!(strings[1], (NBD_INFO_NAME, b"canonical".to_vec()));
        assert_eq!(strings[2], (NBD_INFO_DESCRIPTION, b"a test disk".to_vec()));
        assert_eq!(reps.last(), Some(&ack(NBD_OPT_INFO)));
    }

    #[test]
    fn info_unknown_export_replies_error_and_continues() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        ask(
            &mut h,
            NBD_OPT_INFO,
            &info_data(b"x", &[]),
            "x",
            Purpose::Info,
        );
        h.answer_export(Err(ExportRefusal::Unknown("export 'x' not found".into())));
        assert_eq!(h.poll(), Ok(Event::NeedInput));
        assert_eq!(
            replies(&h.take_output()),
            vec![Rep {
                option: NBD_OPT_INFO,
                kind: NBD_REP_ERR_UNKNOWN,
                data: b"export 'x' not found".to_vec()
            }]
        );
        go(&mut h, "disk");
    }

    #[test]
    fn go_refused_with_code_replies_that_code() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        ask(&mut h, NBD_OPT_GO, &info_data(b"d", &[]), "d", Purpose::Go);
        h.answer_export(Err(ExportRefusal::Error {
            code: NBD_REP_ERR_BLOCK_SIZE_REQD,
            message: String::new(),
        }));
        assert_eq!(h.poll(), Ok(Event::NeedInput));
        assert_eq!(
            kinds(&replies(&h.take_output())),
            vec![NBD_REP_ERR_BLOCK_SIZE_REQD]
        );
    }

    #[test]
    fn refusal_code_without_error_bit_sent_as_invalid() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        ask(&mut h, NBD_OPT_GO, &info_data(b"d", &[]), "d", Purpose::Go);
        h.answer_export(Err(ExportRefusal::Error {
            code: NBD_REP_ACK,
            message: "oops".into(),
        }));
        assert_eq!(kinds(&replies(&h.take_output())), vec![NBD_REP_ERR_INVALID]);
    }

    #[test]
    fn go_with_structured_replies_keeps_send_df() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        exchange(&mut h, NBD_OPT_STRUCTURED_REPLY, &[]).unwrap();
        let n = go(&mut h, "disk");
        assert!(n.structured_replies && !n.extended_headers);
        assert_eq!(
            n.details.transmission_flags,
            NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_DF
        );
    }

    #[test]
    fn go_block_stat_payload_cleared_without_extended_headers() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        exchange(&mut h, NBD_OPT_STRUCTURED_REPLY, &[]).unwrap();
        ask(&mut h, NBD_OPT_GO, &info_data(b"d", &[]), "d", Purpose::Go);
        let mut d = details("d");
        d.transmission_flags |= NBD_FLAG_BLOCK_STAT_PAYLOAD;
        h.answer_export(Ok(d));
        let Ok(Event::Ready(n)) = h.poll() else {
            panic!("not ready")
        };
        assert_eq!(
            n.details.transmission_flags & NBD_FLAG_BLOCK_STAT_PAYLOAD,
            0
        );
    }

    #[test]
    fn info_name_over_4096_bytes_replies_invalid() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        let ev = exchange(&mut h, NBD_OPT_INFO, &info_data(&[b'a'; 4097], &[]));
        assert_eq!(ev, Ok(Event::NeedInput));
        assert_eq!(kinds(&replies(&h.take_output())), vec![NBD_REP_ERR_INVALID]);
    }

    #[test]
    fn info_name_of_4096_bytes_accepted() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        let name = "a".repeat(4096);
        ask(
            &mut h,
            NBD_OPT_INFO,
            &info_data(name.as_bytes(), &[]),
            &name,
            Purpose::Info,
        );
    }

    #[test]
    fn info_name_length_past_payload_replies_invalid() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        let mut data = info_data(b"disk", &[]);
        data[3] = 200;
        assert_eq!(exchange(&mut h, NBD_OPT_GO, &data), Ok(Event::NeedInput));
        assert_eq!(kinds(&replies(&h.take_output())), vec![NBD_REP_ERR_INVALID]);
    }

    #[test]
    fn info_request_count_mismatch_replies_invalid() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        let mut data = info_data(b"disk", &[NBD_INFO_NAME]);
        data.push(0); // an odd trailing byte
        assert_eq!(exchange(&mut h, NBD_OPT_GO, &data), Ok(Event::NeedInput));
        assert_eq!(kinds(&replies(&h.take_output())), vec![NBD_REP_ERR_INVALID]);
    }

    #[test]
    fn info_invalid_utf8_name_replies_invalid() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        let ev = exchange(&mut h, NBD_OPT_GO, &info_data(&[0xff, 0xfe], &[]));
        assert_eq!(ev, Ok(Event::NeedInput));
        assert_eq!(kinds(&replies(&h.take_output())), vec![NBD_REP_ERR_INVALID]);
    }

    #[test]
    fn unknown_option_replies_unsup_then_go_succeeds() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        for code in [NBD_OPT_PEEK_EXPORT, 0xdead] {
            assert_eq!(exchange(&mut h, code, b"junk"), Ok(Event::NeedInput));
            let reps = replies(&h.take_output());
            assert_eq!(reps.len(), 1);
            assert_eq!((reps[0].option, reps[0].kind), (code, NBD_REP_ERR_UNSUP));
        }
        go(&mut h, "disk");
    }

    #[test]
    fn list_replies_server_per_export_then_ack() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        assert_eq!(exchange(&mut h, NBD_OPT_LIST, &[]), Ok(Event::ListExports));
        // Polling again before answering repeats the question.
        assert_eq!(h.poll(), Ok(Event::ListExports));
        h.answer_list(&[
            ("a".into(), None),
            ("bb".into(), Some("second disk".into())),
        ]);
        assert_eq!(h.poll(), Ok(Event::NeedInput));
        let server = |data: &[u8]| Rep {
            option: NBD_OPT_LIST,
            kind: NBD_REP_SERVER,
            data: data.to_vec(),
        };
        assert_eq!(
            replies(&h.take_output()),
            vec![
                server(&[0, 0, 0, 1, b'a']),
                server(&[&[0, 0, 0, 2][..], b"bb", b"second disk"].concat()),
                ack(NBD_OPT_LIST),
            ]
        );
    }

    #[test]
    fn list_with_data_replies_invalid() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        assert_eq!(exchange(&mut h, NBD_OPT_LIST, b"x"), Ok(Event::NeedInput));
        assert_eq!(kinds(&replies(&h.take_output())), vec![NBD_REP_ERR_INVALID]);
    }

    #[test]
    fn list_meta_context_namespace_query_lists_namespace() {
        let config = config_with(&["base:allocation", "qemu:dirty-bitmap:b", "x-other:thing"]);
        let mut h = started(config, FIXED);
        ask(
            &mut h,
            NBD_OPT_LIST_META_CONTEXT,
            &meta_data("disk", &["base:", "qemu:dirty-bitmap:"]),
            "disk",
            Purpose::ListMetaContext,
        );
        h.answer_export(Ok(details("disk")));
        let reps = replies(&h.take_output());
        // LIST replies carry id 0, as the spec asks.
        assert_eq!(
            meta_replies(&reps),
            vec![
                (0, "base:allocation".to_owned()),
                (0, "qemu:dirty-bitmap:b".to_owned())
            ]
        );
        assert_eq!(reps.last(), Some(&ack(NBD_OPT_LIST_META_CONTEXT)));
    }

    #[test]
    fn list_meta_context_no_queries_lists_all() {
        let mut h = started(config_with(&["base:allocation", "x-a:b"]), FIXED);
        ask(
            &mut h,
            NBD_OPT_LIST_META_CONTEXT,
            &meta_data("", &[]),
            "",
            Purpose::ListMetaContext,
        );
        h.answer_export(Ok(details("")));
        assert_eq!(meta_replies(&replies(&h.take_output())).len(), 2);
    }

    #[test]
    fn list_meta_context_without_structured_replies_allowed() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        ask(
            &mut h,
            NBD_OPT_LIST_META_CONTEXT,
            &meta_data("d", &["base:allocation", "base:allocation"]),
            "d",
            Purpose::ListMetaContext,
        );
        h.answer_export(Ok(details("d")));
        // Each context once, even when two queries name it.
        assert_eq!(meta_replies(&replies(&h.take_output())).len(), 1);
    }

    #[test]
    fn set_meta_context_before_structured_replies_invalid() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        let ev = exchange(
            &mut h,
            NBD_OPT_SET_META_CONTEXT,
            &meta_data("disk", &["base:allocation"]),
        );
        assert_eq!(ev, Ok(Event::NeedInput));
        assert_eq!(kinds(&replies(&h.take_output())), vec![NBD_REP_ERR_INVALID]);
    }

    #[test]
    fn set_meta_context_exact_name_selects_with_index_id() {
        let mut h = started(config_with(&["x-a:b", "base:allocation"]), FIXED);
        exchange(&mut h, NBD_OPT_STRUCTURED_REPLY, &[]).unwrap();
        h.take_output();
        ask(
            &mut h,
            NBD_OPT_SET_META_CONTEXT,
            &meta_data("disk", &["base:allocation", "base:unknown", "nocolon"]),
            "disk",
            Purpose::SetMetaContext,
        );
        h.answer_export(Ok(details("disk")));
        let reps = replies(&h.take_output());
        assert_eq!(meta_replies(&reps), vec![(2, "base:allocation".to_owned())]);
        assert_eq!(reps.last(), Some(&ack(NBD_OPT_SET_META_CONTEXT)));
        let n = go(&mut h, "disk");
        assert_eq!(n.meta_contexts, vec![(2, "base:allocation".to_owned())]);
    }

    #[test]
    fn answer_meta_query_offered_subset_keeps_configured_ids() {
        let mut h = started(
            config_with(&["base:allocation", "qemu:allocation-depth"]),
            FIXED,
        );
        exchange(&mut h, NBD_OPT_STRUCTURED_REPLY, &[]).unwrap();
        h.take_output();
        ask(
            &mut h,
            NBD_OPT_LIST_META_CONTEXT,
            &meta_data("disk", &[]),
            "disk",
            Purpose::ListMetaContext,
        );
        h.answer_meta_query(Ok(&["qemu:allocation-depth".to_owned()]));
        assert_eq!(
            meta_replies(&replies(&h.take_output())),
            vec![(0, "qemu:allocation-depth".to_owned())]
        );
        ask(
            &mut h,
            NBD_OPT_SET_META_CONTEXT,
            &meta_data("disk", &["base:allocation", "qemu:allocation-depth"]),
            "disk",
            Purpose::SetMetaContext,
        );
        h.answer_meta_query(Ok(&["qemu:allocation-depth".to_owned()]));
        assert_eq!(
            meta_replies(&replies(&h.take_output())),
            vec![(2, "qemu:allocation-depth".to_owned())]
        );
        let n = go(&mut h, "disk");
        assert_eq!(
            n.meta_contexts,
            vec![(2, "qemu:allocation-depth".to_owned())]
        );
    }

    #[test]
    fn answer_meta_query_export_own_contexts_listed_by_namespace_with_ids_after_configured() {
        let mut h = started(
            config_with(&["base:allocation", "qemu:allocation-depth"]),
            FIXED,
        );
        exchange(&mut h, NBD_OPT_STRUCTURED_REPLY, &[]).unwrap();
        h.take_output();
        let offered = [
            "base:allocation".to_owned(),
            "qemu:dirty-bitmap:b0".to_owned(),
            "qemu:dirty-bitmap:b1".to_owned(),
        ];
        for (query, want) in [
            (
                "qemu:",
                vec!["qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"],
            ),
            (
                "qemu:dirty-bitmap:",
                vec!["qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"],
            ),
            ("base:", vec!["base:allocation"]),
        ] {
            ask(
                &mut h,
                NBD_OPT_LIST_META_CONTEXT,
                &meta_data("disk", &[query]),
                "disk",
                Purpose::ListMetaContext,
            );
            h.answer_meta_query(Ok(&offered));
            let got: Vec<String> = meta_replies(&replies(&h.take_output()))
                .into_iter()
                .map(|(_, n)| n)
                .collect();
            assert_eq!(got, want, "{query}");
        }
        ask(
            &mut h,
            NBD_OPT_SET_META_CONTEXT,
            &meta_data("disk", &["qemu:dirty-bitmap:b1", "base:allocation"]),
            "disk",
            Purpose::SetMetaContext,
        );
        h.answer_meta_query(Ok(&offered));
        let want = vec![
            (1, "base:allocation".to_owned()),
            (5, "qemu:dirty-bitmap:b1".to_owned()),
        ];
        assert_eq!(meta_replies(&replies(&h.take_output())), want);
        assert_eq!(go(&mut h, "disk").meta_contexts, want);
    }

    #[test]
    fn answer_meta_query_refusal_sends_error() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        exchange(&mut h, NBD_OPT_STRUCTURED_REPLY, &[]).unwrap();
        h.take_output();
        ask(
            &mut h,
            NBD_OPT_LIST_META_CONTEXT,
            &meta_data("nope", &[]),
            "nope",
            Purpose::ListMetaContext,
        );
        h.answer_meta_query(Err(ExportRefusal::Unknown("no such export".into())));
        assert_eq!(kinds(&replies(&h.take_output())), vec![NBD_REP_ERR_UNKNOWN]);
    }

    #[test]
    fn set_meta_context_namespace_query_selects_nothing() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        exchange(&mut h, NBD_OPT_STRUCTURED_REPLY, &[]).unwrap();
        h.take_output();
        ask(
            &mut h,
            NBD_OPT_SET_META_CONTEXT,
            &meta_data("disk", &["base:"]),
            "disk",
            Purpose::SetMetaContext,
        );
        h.answer_export(Ok(details("disk")));
        assert_eq!(
            replies(&h.take_output()),
            vec![ack(NBD_OPT_SET_META_CONTEXT)]
        );
        assert!(go(&mut h, "disk").meta_contexts.is_empty());
    }

    #[test]
    fn set_meta_context_for_other_export_not_in_ready() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        exchange(&mut h, NBD_OPT_STRUCTURED_REPLY, &[]).unwrap();
        ask(
            &mut h,
            NBD_OPT_SET_META_CONTEXT,
            &meta_data("one", &["base:allocation"]),
            "one",
            Purpose::SetMetaContext,
        );
        h.answer_export(Ok(details("one")));
        assert!(go(&mut h, "two").meta_contexts.is_empty());
    }

    #[test]
    fn set_meta_context_failed_set_clears_previous_selection() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        exchange(&mut h, NBD_OPT_STRUCTURED_REPLY, &[]).unwrap();
        ask(
            &mut h,
            NBD_OPT_SET_META_CONTEXT,
            &meta_data("disk", &["base:allocation"]),
            "disk",
            Purpose::SetMetaContext,
        );
        h.answer_export(Ok(details("disk")));
        ask(
            &mut h,
            NBD_OPT_SET_META_CONTEXT,
            &meta_data("gone", &["base:allocation"]),
            "gone",
            Purpose::SetMetaContext,
        );
        h.answer_export(Err(ExportRefusal::Unknown("no".into())));
        assert!(go(&mut h, "disk").meta_contexts.is_empty());
    }

    #[test]
    fn meta_context_unknown_export_replies_err_unknown() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        ask(
            &mut h,
            NBD_OPT_LIST_META_CONTEXT,
            &meta_data("nope", &[]),
            "nope",
            Purpose::ListMetaContext,
        );
        h.answer_export(Err(ExportRefusal::Unknown("no such export".into())));
        assert_eq!(kinds(&replies(&h.take_output())), vec![NBD_REP_ERR_UNKNOWN]);
    }

    #[test]
    fn meta_context_query_over_4096_bytes_replies_invalid() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        let long = format!("base:{}", "a".repeat(4092));
        assert_eq!(long.len(), 4097);
        let ev = exchange(&mut h, NBD_OPT_LIST_META_CONTEXT, &meta_data("d", &[&long]));
        assert_eq!(ev, Ok(Event::NeedInput));
        assert_eq!(kinds(&replies(&h.take_output())), vec![NBD_REP_ERR_INVALID]);
    }

    #[test]
    fn meta_context_export_name_over_4096_bytes_replies_invalid() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        let name = "n".repeat(4097);
        let ev = exchange(&mut h, NBD_OPT_LIST_META_CONTEXT, &meta_data(&name, &[]));
        assert_eq!(ev, Ok(Event::NeedInput));
        assert_eq!(kinds(&replies(&h.take_output())), vec![NBD_REP_ERR_INVALID]);
    }

    #[test]
    fn meta_context_query_count_past_payload_replies_invalid() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        let mut data = meta_data("d", &["base:allocation"]);
        data[5..9].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            exchange(&mut h, NBD_OPT_LIST_META_CONTEXT, &data),
            Ok(Event::NeedInput)
        );
        assert_eq!(kinds(&replies(&h.take_output())), vec![NBD_REP_ERR_INVALID]);
    }

    #[test]
    fn meta_context_trailing_bytes_replies_invalid() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        let mut data = meta_data("d", &["base:allocation"]);
        data.extend_from_slice(b"xyz");
        assert_eq!(
            exchange(&mut h, NBD_OPT_LIST_META_CONTEXT, &data),
            Ok(Event::NeedInput)
        );
        assert_eq!(kinds(&replies(&h.take_output())), vec![NBD_REP_ERR_INVALID]);
    }

    #[test]
    fn structured_reply_acked_once_then_invalid() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        exchange(&mut h, NBD_OPT_STRUCTURED_REPLY, &[]).unwrap();
        exchange(&mut h, NBD_OPT_STRUCTURED_REPLY, &[]).unwrap();
        assert_eq!(
            kinds(&replies(&h.take_output())),
            vec![NBD_REP_ACK, NBD_REP_ERR_INVALID]
        );
    }

    #[test]
    fn structured_reply_with_data_replies_invalid() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        exchange(&mut h, NBD_OPT_STRUCTURED_REPLY, b"x").unwrap();
        assert_eq!(kinds(&replies(&h.take_output())), vec![NBD_REP_ERR_INVALID]);
        assert!(!go(&mut h, "d").structured_replies);
    }

    #[test]
    fn structured_reply_after_extended_headers_replies_ext_header_reqd() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        exchange(&mut h, NBD_OPT_EXTENDED_HEADERS, &[]).unwrap();
        exchange(&mut h, NBD_OPT_STRUCTURED_REPLY, &[]).unwrap();
        assert_eq!(
            kinds(&replies(&h.take_output())),
            vec![NBD_REP_ACK, NBD_REP_ERR_EXT_HEADER_REQD]
        );
        let n = go(&mut h, "d");
        assert!(n.extended_headers && n.structured_replies);
    }

    #[test]
    fn structured_reply_disabled_replies_unsup() {
        let config = HandshakeConfig {
            allow_structured_replies: false,
            ..HandshakeConfig::default()
        };
        let mut h = started(config, FIXED);
        exchange(&mut h, NBD_OPT_STRUCTURED_REPLY, &[]).unwrap();
        exchange(&mut h, NBD_OPT_EXTENDED_HEADERS, &[]).unwrap();
        assert_eq!(
            kinds(&replies(&h.take_output())),
            vec![NBD_REP_ERR_UNSUP, NBD_REP_ERR_UNSUP]
        );
        assert!(!go(&mut h, "d").structured_replies);
    }

    #[test]
    fn extended_headers_then_go_negotiates_extended() {
        let mut h = started(HandshakeConfig::default(), FIXED_NO_ZEROES);
        assert_eq!(
            exchange(&mut h, NBD_OPT_EXTENDED_HEADERS, &[]),
            Ok(Event::NeedInput)
        );
        assert_eq!(
            replies(&h.take_output()),
            vec![ack(NBD_OPT_EXTENDED_HEADERS)]
        );
        ask(&mut h, NBD_OPT_GO, &info_data(b"d", &[]), "d", Purpose::Go);
        let mut d = details("d");
        d.transmission_flags |= NBD_FLAG_BLOCK_STAT_PAYLOAD;
        h.answer_export(Ok(d));
        let Ok(Event::Ready(n)) = h.poll() else {
            panic!("not ready")
        };
        assert!(n.extended_headers && n.structured_replies);
        assert_eq!(
            n.details.transmission_flags,
            NBD_FLAG_HAS_FLAGS
                | NBD_FLAG_SEND_FLUSH
                | NBD_FLAG_SEND_DF
                | NBD_FLAG_BLOCK_STAT_PAYLOAD
        );
    }

    #[test]
    fn extended_headers_repeated_replies_invalid() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        exchange(&mut h, NBD_OPT_EXTENDED_HEADERS, &[]).unwrap();
        exchange(&mut h, NBD_OPT_EXTENDED_HEADERS, &[]).unwrap();
        assert_eq!(
            kinds(&replies(&h.take_output())),
            vec![NBD_REP_ACK, NBD_REP_ERR_INVALID]
        );
    }

    #[test]
    fn extended_headers_disabled_replies_unsup_then_structured_acked() {
        let config = HandshakeConfig {
            allow_extended_headers: false,
            ..HandshakeConfig::default()
        };
        let mut h = started(config, FIXED);
        // qemu's order: extended headers first, structured replies as the fallback.
        exchange(&mut h, NBD_OPT_EXTENDED_HEADERS, &[]).unwrap();
        exchange(&mut h, NBD_OPT_STRUCTURED_REPLY, &[]).unwrap();
        assert_eq!(
            kinds(&replies(&h.take_output())),
            vec![NBD_REP_ERR_UNSUP, NBD_REP_ACK]
        );
        let n = go(&mut h, "d");
        assert!(n.structured_replies && !n.extended_headers);
    }

    #[test]
    fn extended_headers_with_data_replies_invalid() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        exchange(&mut h, NBD_OPT_EXTENDED_HEADERS, &[0]).unwrap();
        assert_eq!(kinds(&replies(&h.take_output())), vec![NBD_REP_ERR_INVALID]);
    }

    #[test]
    fn extended_headers_keep_meta_selection() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        exchange(&mut h, NBD_OPT_STRUCTURED_REPLY, &[]).unwrap();
        ask(
            &mut h,
            NBD_OPT_SET_META_CONTEXT,
            &meta_data("d", &["base:allocation"]),
            "d",
            Purpose::SetMetaContext,
        );
        h.answer_export(Ok(details("d")));
        exchange(&mut h, NBD_OPT_EXTENDED_HEADERS, &[]).unwrap();
        let n = go(&mut h, "d");
        assert!(n.extended_headers);
        assert_eq!(n.meta_contexts, vec![(1, "base:allocation".to_owned())]);
    }

    #[test]
    fn abort_acks_and_aborts() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        assert_eq!(
            exchange(&mut h, NBD_OPT_ABORT, b"ignored"),
            Ok(Event::Aborted)
        );
        assert_eq!(replies(&h.take_output()), vec![ack(NBD_OPT_ABORT)]);
        assert_eq!(h.poll(), Ok(Event::Aborted));
    }

    #[test]
    fn options_fed_byte_by_byte_give_same_result() {
        let mut bytes = FIXED_NO_ZEROES.to_be_bytes().to_vec();
        bytes.extend(option(NBD_OPT_EXTENDED_HEADERS, &[]));
        bytes.extend(option(0x77, b"unknown"));
        bytes.extend(option(
            NBD_OPT_GO,
            &info_data(b"disk", &[NBD_INFO_NAME, NBD_INFO_BLOCK_SIZE]),
        ));

        let run = |chunk: usize| {
            let mut h = Handshake::new(HandshakeConfig::default());
            let mut out = h.take_output();
            let mut ready = None;
            for piece in bytes.chunks(chunk) {
                h.feed(piece);
                loop {
                    match h.poll().unwrap() {
                        Event::NeedInput => break,
                        Event::ExportQuery { name, .. } => h.answer_export(Ok(details(&name))),
                        Event::Ready(n) => {
                            ready = Some(n);
                            break;
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
                out.extend(h.take_output());
            }
            (out, ready.expect("negotiation finished"))
        };
        let whole = run(bytes.len());
        assert_eq!(run(1), whole);
        assert_eq!(run(7), whole);
        assert!(whole.1.extended_headers);
    }

    #[test]
    fn huge_option_skipped_without_buffering() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        let len = NBD_MAX_OPTION_LEN + 1;
        let mut header = IHAVEOPT.to_be_bytes().to_vec();
        header.extend_from_slice(&NBD_OPT_INFO.to_be_bytes());
        header.extend_from_slice(&len.to_be_bytes());
        // Header plus the first bytes of the payload in one piece.
        header.extend_from_slice(&[7u8; 100]);
        h.feed(&header);
        assert_eq!(h.poll(), Ok(Event::NeedInput));
        assert_eq!(kinds(&replies(&h.take_output())), vec![NBD_REP_ERR_TOO_BIG]);

        let mut rest = len as usize - 100;
        let chunk = [7u8; 4096];
        while rest > 0 {
            let n = rest.min(chunk.len());
            h.feed(&chunk[..n]);
            assert_eq!(h.poll(), Ok(Event::NeedInput));
            assert!(h.input.capacity() <= 4096, "skipped bytes were buffered");
            rest -= n;
        }
        assert!(h.take_output().is_empty());
        // The stream is back in sync: the next option works.
        go(&mut h, "disk");
    }

    #[test]
    fn huge_option_length_u32_max_replies_too_big() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        let mut header = IHAVEOPT.to_be_bytes().to_vec();
        header.extend_from_slice(&0x1234u32.to_be_bytes());
        header.extend_from_slice(&u32::MAX.to_be_bytes());
        h.feed(&header);
        assert_eq!(h.poll(), Ok(Event::NeedInput));
        assert_eq!(kinds(&replies(&h.take_output())), vec![NBD_REP_ERR_TOO_BIG]);
        assert_eq!(h.skip, u64::from(u32::MAX));
        let capacity = h.input.capacity();
        h.feed(&[0u8; 1000]);
        assert!(h.input.is_empty());
        assert_eq!(h.input.capacity(), capacity);
        assert_eq!(h.skip, u64::from(u32::MAX) - 1000);
    }

    #[test]
    fn leftover_after_go_is_returned() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        let mut bytes = option(NBD_OPT_GO, &info_data(b"d", &[]));
        bytes.extend_from_slice(b"request bytes");
        h.feed(&bytes);
        assert!(matches!(h.poll(), Ok(Event::ExportQuery { .. })));
        h.feed(b" and more");
        h.answer_export(Ok(details("d")));
        h.feed(b" and after");
        assert!(matches!(h.poll(), Ok(Event::Ready(_))));
        h.feed(b" and later");
        assert_eq!(
            h.take_leftover(),
            b"request bytes and more and after and later".to_vec()
        );
        assert!(h.take_leftover().is_empty());
    }

    #[test]
    fn export_query_repeated_until_answered() {
        let mut h = started(HandshakeConfig::default(), FIXED);
        ask(
            &mut h,
            NBD_OPT_INFO,
            &info_data(b"d", &[]),
            "d",
            Purpose::Info,
        );
        assert_eq!(
            h.poll(),
            Ok(Event::ExportQuery {
                name: "d".into(),
                purpose: Purpose::Info
            })
        );
    }

    // --- TLS (the policy itself is tested in `tls.rs`; these test the states) ---

    fn tls_config(mode: TlsMode) -> HandshakeConfig {
        HandshakeConfig {
            tls: mode,
            ..HandshakeConfig::default()
        }
    }

    /// STARTTLS acknowledged and the upgrade reported (repeatedly, until answered), then
    /// TLS declared up.
    fn start_tls(h: &mut Handshake) {
        assert_eq!(exchange(h, NBD_OPT_STARTTLS, &[]), Ok(Event::StartTls));
        assert_eq!(replies(&h.take_output()), vec![ack(NBD_OPT_STARTTLS)]);
        assert_eq!(h.poll(), Ok(Event::StartTls));
        assert!(!h.is_tls());
        h.tls_started();
        assert!(h.is_tls());
        assert_eq!(h.poll(), Ok(Event::NeedInput));
    }

    #[test]
    fn tls_off_starttls_replies_policy_then_go_succeeds() {
        let mut h = started(tls_config(TlsMode::Off), FIXED);
        assert_eq!(
            exchange(&mut h, NBD_OPT_STARTTLS, &[]),
            Ok(Event::NeedInput)
        );
        assert_eq!(kinds(&replies(&h.take_output())), vec![NBD_REP_ERR_POLICY]);
        assert!(!h.is_tls());
        go(&mut h, "d");
    }

    #[test]
    fn tls_off_never_replies_tls_reqd() {
        let mut h = started(tls_config(TlsMode::Off), FIXED);
        assert_eq!(exchange(&mut h, NBD_OPT_LIST, &[]), Ok(Event::ListExports));
        h.answer_list(&[("d".into(), None)]);
        assert_eq!(exchange(&mut h, 0xdead, &[]), Ok(Event::NeedInput));
        let kinds = kinds(&replies(&h.take_output()));
        assert_eq!(kinds, vec![NBD_REP_SERVER, NBD_REP_ACK, NBD_REP_ERR_UNSUP]);
    }

    #[test]
    fn tls_on_plaintext_client_is_served() {
        let mut h = started(tls_config(TlsMode::On), FIXED);
        let n = go(&mut h, "d");
        assert_eq!(n.details.size, SIZE);
        assert!(!h.is_tls());
    }

    #[test]
    fn tls_on_starttls_acks_then_go_over_tls() {
        let mut h = started(tls_config(TlsMode::On), FIXED);
        start_tls(&mut h);
        let n = go(&mut h, "d");
        assert_eq!(n.export_name, "d");
        assert!(h.is_tls());
    }

    #[test]
    fn tls_require_refuses_every_option_before_tls_without_export_data() {
        let mut h = started(tls_config(TlsMode::Require), FIXED);
        let options = [
            (NBD_OPT_LIST, vec![]),
            (NBD_OPT_INFO, info_data(b"d", &[NBD_INFO_NAME])),
            (NBD_OPT_GO, info_data(b"d", &[])),
            (NBD_OPT_STRUCTURED_REPLY, vec![]),
            (NBD_OPT_EXTENDED_HEADERS, vec![]),
            (NBD_OPT_LIST_META_CONTEXT, meta_data("d", &[])),
            (
                NBD_OPT_SET_META_CONTEXT,
                meta_data("d", &["base:allocation"]),
            ),
            (0xdead, vec![1, 2, 3]),
        ];
        for (code, data) in &options {
            // No ExportQuery or ListExports: the server is never even asked.
            assert_eq!(exchange(&mut h, *code, data), Ok(Event::NeedInput));
        }
        let reps = replies(&h.take_output());
        assert_eq!(reps.len(), options.len());
        for (rep, (code, _)) in reps.iter().zip(&options) {
            assert_eq!((rep.option, rep.kind), (*code, NBD_REP_ERR_TLS_REQD));
        }
        // Still a usable negotiation: TLS, then the export.
        start_tls(&mut h);
        go(&mut h, "d");
    }

    #[test]
    fn tls_require_oversized_option_before_tls_skipped_with_tls_reqd() {
        let mut h = started(tls_config(TlsMode::Require), FIXED);
        let len = NBD_MAX_OPTION_LEN + 10;
        let mut header = option(NBD_OPT_INFO, &[]);
        header[12..16].copy_from_slice(&len.to_be_bytes());
        h.feed(&header);
        assert_eq!(h.poll(), Ok(Event::NeedInput));
        h.feed(&vec![0u8; len as usize]);
        assert_eq!(h.poll(), Ok(Event::NeedInput));
        assert_eq!(
            kinds(&replies(&h.take_output())),
            vec![NBD_REP_ERR_TLS_REQD]
        );
        start_tls(&mut h);
    }

    #[test]
    fn tls_require_export_name_before_tls_closes_without_reply() {
        let mut h = started(tls_config(TlsMode::Require), FIXED);
        assert_eq!(
            exchange(&mut h, NBD_OPT_EXPORT_NAME, b"d"),
            Err(HandshakeError::ExportNameWithoutTls)
        );
        assert!(h.take_output().is_empty());
        // The failure sticks.
        h.feed(&option(NBD_OPT_STARTTLS, &[]));
        assert_eq!(h.poll(), Err(HandshakeError::ExportNameWithoutTls));
    }

    #[test]
    fn tls_require_abort_before_tls_acks() {
        let mut h = started(tls_config(TlsMode::Require), FIXED);
        assert_eq!(exchange(&mut h, NBD_OPT_ABORT, &[]), Ok(Event::Aborted));
        assert_eq!(replies(&h.take_output()), vec![ack(NBD_OPT_ABORT)]);
    }

    #[test]
    fn tls_require_after_tls_export_name_served() {
        let mut h = started(tls_config(TlsMode::Require), FIXED_NO_ZEROES);
        start_tls(&mut h);
        ask(&mut h, NBD_OPT_EXPORT_NAME, b"d", "d", Purpose::ExportName);
        h.answer_export(Ok(details("d")));
        assert!(matches!(h.poll(), Ok(Event::Ready(_))));
        assert_eq!(h.take_output().len(), 10);
    }

    #[test]
    fn tls_require_without_fixed_newstyle_closes_at_flags() {
        let mut h = Handshake::new(tls_config(TlsMode::Require));
        h.take_output();
        h.feed(&NBD_FLAG_C_NO_ZEROES.to_be_bytes());
        assert_eq!(h.poll(), Err(HandshakeError::TlsNeedsFixedNewstyle));
    }

    #[test]
    fn tls_on_without_fixed_newstyle_starttls_replies_policy() {
        let mut h = started(tls_config(TlsMode::On), 0);
        assert_eq!(
            exchange(&mut h, NBD_OPT_STARTTLS, &[]),
            Ok(Event::NeedInput)
        );
        assert_eq!(kinds(&replies(&h.take_output())), vec![NBD_REP_ERR_POLICY]);
    }

    #[test]
    fn tls_starttls_twice_replies_invalid() {
        for mode in [TlsMode::On, TlsMode::Require] {
            let mut h = started(tls_config(mode), FIXED);
            start_tls(&mut h);
            assert_eq!(
                exchange(&mut h, NBD_OPT_STARTTLS, &[]),
                Ok(Event::NeedInput)
            );
            assert_eq!(kinds(&replies(&h.take_output())), vec![NBD_REP_ERR_INVALID]);
            assert!(h.is_tls());
            go(&mut h, "d");
        }
    }

    #[test]
    fn tls_starttls_with_data_replies_invalid() {
        let mut h = started(tls_config(TlsMode::On), FIXED);
        assert_eq!(
            exchange(&mut h, NBD_OPT_STARTTLS, &[0; 4]),
            Ok(Event::NeedInput)
        );
        assert_eq!(kinds(&replies(&h.take_output())), vec![NBD_REP_ERR_INVALID]);
        start_tls(&mut h);
    }

    #[test]
    fn tls_starttls_forgets_structured_replies_and_meta_contexts() {
        let mut h = started(tls_config(TlsMode::On), FIXED);
        exchange(&mut h, NBD_OPT_STRUCTURED_REPLY, &[]).unwrap();
        ask(
            &mut h,
            NBD_OPT_SET_META_CONTEXT,
            &meta_data("d", &["base:allocation"]),
            "d",
            Purpose::SetMetaContext,
        );
        h.answer_export(Ok(details("d")));
        h.take_output();
        start_tls(&mut h);
        // Selecting contexts now needs structured replies again: they were forgotten.
        assert_eq!(
            exchange(
                &mut h,
                NBD_OPT_SET_META_CONTEXT,
                &meta_data("d", &["base:allocation"])
            ),
            Ok(Event::NeedInput)
        );
        assert_eq!(kinds(&replies(&h.take_output())), vec![NBD_REP_ERR_INVALID]);
        let n = go(&mut h, "d");
        assert!(!n.structured_replies);
        assert!(n.meta_contexts.is_empty());
        assert_eq!(n.details.transmission_flags & NBD_FLAG_SEND_DF, 0);
    }

    #[test]
    fn tls_starttls_forgets_extended_headers() {
        let mut h = started(tls_config(TlsMode::On), FIXED_NO_ZEROES);
        exchange(&mut h, NBD_OPT_EXTENDED_HEADERS, &[]).unwrap();
        h.take_output();
        start_tls(&mut h);
        // EXPORT_NAME is forbidden after extended headers, but they no longer count.
        ask(&mut h, NBD_OPT_EXPORT_NAME, b"d", "d", Purpose::ExportName);
        h.answer_export(Ok(details("d")));
        match h.poll() {
            Ok(Event::Ready(n)) => assert!(!n.extended_headers && !n.structured_replies),
            other => panic!("expected Ready, got {other:?}"),
        }
    }

    #[test]
    fn tls_starttls_with_early_bytes_closes_without_ack() {
        let mut h = started(tls_config(TlsMode::On), FIXED);
        // STARTTLS and, in the same read, a structured-reply option an attacker slipped in.
        let mut bytes = option(NBD_OPT_STARTTLS, &[]);
        bytes.extend_from_slice(&option(NBD_OPT_STRUCTURED_REPLY, &[]));
        h.feed(&bytes);
        assert_eq!(h.poll(), Err(HandshakeError::StartTlsNotLast(16)));
        assert!(h.take_output().is_empty());
    }

    #[test]
    fn tls_bytes_fed_before_tls_started_fail() {
        let mut h = started(tls_config(TlsMode::On), FIXED);
        assert_eq!(exchange(&mut h, NBD_OPT_STARTTLS, &[]), Ok(Event::StartTls));
        h.feed(&option(NBD_OPT_STRUCTURED_REPLY, &[]));
        assert_eq!(h.poll(), Err(HandshakeError::StartTlsNotLast(16)));
    }

    /// xorshift64*: deterministic, no dependencies.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Random bytes, or random options that are close enough to valid to reach deep states.
    fn garbage(rng: &mut Rng) -> Vec<u8> {
        let mut v = Vec::new();
        if rng.below(4) == 0 {
            let n = rng.below(200) as usize;
            v.extend((0..n).map(|_| rng.next() as u8));
            return v;
        }
        v.extend_from_slice(&(rng.below(4) as u32).to_be_bytes());
        for _ in 0..rng.below(8) {
            let code = rng.below(13) as u32;
            let data: Vec<u8> = match rng.below(4) {
                0 => info_data(b"d", &[rng.below(5) as u16]),
                1 => meta_data("d", &["base:", "base:allocation"]),
                _ => (0..rng.below(40)).map(|_| rng.next() as u8).collect(),
            };
            let mut opt = option(code, &data);
            if rng.below(10) == 0 {
                let i = rng.below(opt.len() as u64) as usize;
                opt[i] = rng.next() as u8;
            }
            v.extend(opt);
        }
        v
    }

    #[test]
    fn handshake_garbage_never_panics() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..4000 {
            let bytes = garbage(&mut rng);
            let mut config = config_with(&["base:allocation", "x-a:b"]);
            config.tls = [TlsMode::Off, TlsMode::On, TlsMode::Require][rng.below(3) as usize];
            let mut h = Handshake::new(config);
            let mut rest = &bytes[..];
            let mut steps = 0;
            'feed: while steps < 1000 {
                steps += 1;
                let n = (rng.below(32) as usize + 1).min(rest.len());
                h.feed(&rest[..n]);
                rest = &rest[n..];
                let event = match h.poll() {
                    Ok(e) => e,
                    Err(_) => break,
                };
                h.take_output();
                match event {
                    Event::NeedInput if rest.is_empty() => break 'feed,
                    Event::NeedInput => {}
                    Event::ListExports => h.answer_list(&[("d".into(), Some("x".into()))]),
                    Event::ExportQuery { name, .. } => {
                        if rng.below(2) == 0 {
                            h.answer_export(Ok(details(&name)));
                        } else {
                            h.answer_export(Err(ExportRefusal::Unknown(name)));
                        }
                    }
                    Event::StartTls => h.tls_started(),
                    Event::Ready(_) | Event::Aborted => break 'feed,
                }
            }
        }
    }

    #[test]
    fn decode_request_garbage_never_panics() {
        use crate::nbd::request::{decode_request, encode_request};
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for i in 0..4000 {
            let extended = i % 2 == 0;
            let n = rng.below(40) as usize;
            let mut bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            if i % 3 == 0 && n >= 4 {
                let magic = if extended {
                    NBD_EXTENDED_REQUEST_MAGIC
                } else {
                    NBD_REQUEST_MAGIC
                };
                bytes[..4].copy_from_slice(&magic.to_be_bytes());
            }
            if let Ok(Some((h, used))) = decode_request(&bytes, extended) {
                let mut again = Vec::new();
                encode_request(&mut again, &h, extended);
                assert_eq!(again, bytes[..used]);
            }
        }
    }
}
