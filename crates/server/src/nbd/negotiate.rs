//! Drives the sans-IO NBD handshake ([`sluice_proto::nbd::Handshake`]) over a blocking socket
//! and answers its questions from the plugin: export lists, and the details of an export,
//! which means opening it. An export opened for NBD_OPT_INFO is closed again (clients then
//! send GO and it is reopened, as with nbdkit); the one opened for the final GO or
//! EXPORT_NAME is kept for the transmission phase.
//!
//! [`Negotiation`] hands every export open back to its caller ([`Step::Open`]) so that the
//! caller decides the scope it runs in: a one-plugin server answers at once (its plugin's
//! connection hooks already wrap the whole connection); a daemon looks the name up in its
//! table and runs the open, and after GO the rest of the connection, inside that export's
//! plugin hooks (see `mod.rs`).
//!
//! TLS: when the handshake reports [`Event::StartTls`] (its `NBD_REP_ACK` already sent), the
//! socket is handed to [`crate::tls::TlsConfig::accept`] and replaced by the encrypted stream,
//! and the same handshake goes on over it. Plugins learn whether the connection is encrypted
//! from the `is_tls` of every call made during negotiation (`list_exports`,
//! `default_export`, `open`), which is what `nbdkit_is_tls()` and `nbdkit.is_tls()` answer.

use std::io::{self, Read, Write};

use sluice_block::plugin::OpenContext;
use sluice_block::{BlockError, Errno, Export};
use sluice_proto::nbd::{
    Event, ExportDetails, ExportRefusal, Handshake, HandshakeConfig, Negotiated, Purpose, TlsMode,
};

use std::sync::Arc;

use sluice_block::export::Backend;

use super::spare::{self, Recycled};
use super::{Exports, NamedExport, NbdServer};
use crate::stream::Stream;

/// What the transmission phase starts from.
pub(super) struct Session {
    pub stream: Stream,
    pub export: Export,
    pub backend: Arc<Backend>,
    /// The export's name (the one asked for, or the plugin's default export for "").
    pub name: String,
    /// Keeps a daemon's table entry alive (and counted as in use) while connected.
    pub named: Option<Arc<NamedExport>>,
    pub negotiated: Negotiated,
    /// Bytes the client sent after the handshake's last message.
    pub leftover: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum NegotiateError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Protocol(#[from] sluice_proto::nbd::HandshakeError),
    #[error("{0}")]
    Tls(#[from] crate::tls::HandshakeError),
}

impl NegotiateError {
    /// The client simply went away (closed or reset the socket): not worth an info line.
    pub(super) fn is_disconnect(&self) -> bool {
        match self {
            NegotiateError::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            ),
            NegotiateError::Tls(e) => e.is_disconnect(),
            NegotiateError::Protocol(_) => false,
        }
    }
}

/// What the handshake needs from the caller next (see [`Negotiation::next`]).
pub(super) enum Step {
    /// The client asked for export `name` (NBD_OPT_INFO, NBD_OPT_GO or NBD_OPT_EXPORT_NAME):
    /// answer with [`Negotiation::answer_open`], inside the export's connection scope.
    Open { name: String, purpose: Purpose },
    /// Negotiation is over; [`Negotiation::session`] gives what transmission starts from.
    Ready(Box<Negotiated>),
    /// The client aborted or went away.
    Ended,
}

/// One client's handshake in progress.
///
/// The caller drives it with [`Negotiation::next`] and opens exports when asked, so that it
/// can run each open (and, after GO, the whole transmission phase) inside the plugin's
/// connection hooks: for one plugin those wrap the whole connection, but a daemon's table
/// only knows which plugin a client wants once the client names an export.
pub(super) struct Negotiation<'s> {
    server: &'s NbdServer,
    stream: Option<Stream>,
    hs: Handshake,
    /// The export opened for the final GO or EXPORT_NAME, kept for transmission.
    kept: Option<Opened>,
    buf: Recycled,
}

impl<'s> Negotiation<'s> {
    pub(super) fn new(server: &'s NbdServer, stream: Stream) -> Negotiation<'s> {
        // TLS needs a socket: on a pipe pair (`-s` over pipes) STARTTLS is not offered under
        // --tls=on, and under --tls=require the client can only be refused.
        let tls = match server.config.tls.as_ref().map(|t| t.mode()) {
            Some(mode) if stream.can_starttls() || mode == TlsMode::Require => mode,
            _ => TlsMode::Off,
        };
        let config = HandshakeConfig {
            meta_contexts: server.config.meta_contexts.clone(),
            tls,
            allow_structured_replies: server.config.structured_replies,
            handshake_flags: server.config.handshake_flags,
            ..HandshakeConfig::default()
        };
        Negotiation {
            server,
            stream: Some(stream),
            hs: Handshake::new(config),
            kept: None,
            buf: spare::take(16 * 1024),
        }
    }

    /// Runs the handshake (sending replies, reading options, answering export lists and
    /// meta-context queries itself) until it needs an export opened, ends, or the client
    /// leaves.
    pub(super) fn next(&mut self) -> Result<Step, NegotiateError> {
        loop {
            let Some(stream) = self.stream.as_mut() else {
                return Ok(Step::Ended);
            };
            // poll() may queue replies before it asks for input: send them first.
            let event = self.hs.poll()?;
            let out = self.hs.take_output();
            if !out.is_empty() {
                let sent = stream.write_all(&out);
                // A client that sends NBD_OPT_ABORT may close without reading the
                // acknowledgement (libnbd's nbd_opt_abort does, so every `nbdinfo --list`),
                // so failing to send that last reply is the normal end, not an error to log.
                if matches!(event, Event::Aborted) {
                    return Ok(Step::Ended);
                }
                sent?;
            }
            match event {
                Event::NeedInput => {
                    let n = stream.read(&mut self.buf)?;
                    if n == 0 {
                        return Ok(Step::Ended);
                    }
                    self.hs.feed(&self.buf[..n]);
                }
                Event::StartTls => self.start_tls()?,
                Event::ListExports => match list_exports(self.server, self.hs.is_tls()) {
                    Ok(list) => self.hs.answer_list(&list),
                    Err(e) => self.hs.answer_list_error(ExportRefusal::Error {
                        code: sluice_proto::nbd::consts::NBD_REP_ERR_PLATFORM,
                        message: e.to_string(),
                    }),
                },
                Event::ExportQuery {
                    name,
                    purpose: Purpose::ListMetaContext | Purpose::SetMetaContext,
                } => {
                    // Meta-context negotiation only needs to know the export exists (and, in
                    // a table, which contexts it offers): opening the plugin for it would run
                    // its open/close once more per client (nbdkit does not).
                    match &self.server.exports {
                        Exports::Single(_) => {
                            let answer = match export_exists(self.server, &name) {
                                true => Ok(ExportDetails {
                                    name: name.clone(),
                                    description: None,
                                    size: 0,
                                    transmission_flags: 0,
                                    block_size: None,
                                }),
                                false => {
                                    Err(ExportRefusal::Unknown(format!("no export named {name:?}")))
                                }
                            };
                            self.hs.answer_export(answer);
                        }
                        Exports::Table(table) => match table.get(&name) {
                            Some(named) => self.hs.answer_meta_query(Ok(&named.meta_contexts)),
                            None => {
                                self.hs
                                    .answer_meta_query(Err(ExportRefusal::Unknown(format!(
                                        "no export named {name:?}"
                                    ))))
                            }
                        },
                    }
                }
                Event::ExportQuery { name, purpose } => return Ok(Step::Open { name, purpose }),
                Event::Ready(negotiated) => return Ok(Step::Ready(negotiated)),
                Event::Aborted => return Ok(Step::Ended),
            }
        }
    }

    /// Upgrades the connection after the handshake's `NBD_REP_ACK` to `NBD_OPT_STARTTLS` was
    /// sent: runs the TLS handshake and continues negotiation over the encrypted stream.
    fn start_tls(&mut self) -> Result<(), NegotiateError> {
        let (Some(tls), Some(plain)) = (self.server.config.tls.as_ref(), self.stream.take()) else {
            // The handshake only offers STARTTLS when TLS is configured.
            return Err(io::Error::other("STARTTLS accepted without a TLS configuration").into());
        };
        if !plain.can_starttls() {
            return Err(io::Error::other("STARTTLS on a pipe: TLS needs a socket").into());
        }
        let (stream, _identity) = tls.accept(plain)?;
        self.stream = Some(stream);
        self.hs.tls_started();
        Ok(())
    }

    /// Answers [`Step::Open`]: opens the export (`named`, the table entry the caller looked
    /// up, in a daemon; None there means there is no such export) and tells the client.
    /// Returns true if the export was opened for transmission (a successful GO or
    /// EXPORT_NAME): the next [`Negotiation::next`] then gives [`Step::Ready`] without
    /// reading from the client.
    pub(super) fn answer_open(
        &mut self,
        name: &str,
        purpose: Purpose,
        named: Option<Arc<NamedExport>>,
    ) -> bool {
        let server = self.server;
        let answer = open_export(server, name, named, self.hs.is_tls()).map(|opened| {
            let details = details(server, &opened);
            if matches!(purpose, Purpose::Go | Purpose::ExportName) {
                self.kept = Some(opened);
            }
            details
        });
        let answer = answer.map_err(|e| {
            tracing::info!("export {name:?} refused: {e}");
            ExportRefusal::Unknown(format!("export {name:?}: {e}"))
        });
        self.hs.answer_export(answer);
        self.kept.is_some()
    }

    /// What the transmission phase starts from, after [`Step::Ready`].
    pub(super) fn session(&mut self, negotiated: Negotiated) -> Result<Session, NegotiateError> {
        let (Some(opened), Some(stream)) = (self.kept.take(), self.stream.take()) else {
            return Err(io::Error::other("negotiation finished without an open export").into());
        };
        Ok(Session {
            stream,
            export: opened.export,
            backend: opened.backend,
            name: opened.name,
            named: opened.named,
            negotiated,
            leftover: self.hs.take_leftover(),
        })
    }
}

/// Negotiates with every export opened at once (a server of one plugin, whose connection
/// hooks already wrap the whole connection).
pub(super) fn negotiate(
    server: &NbdServer,
    stream: Stream,
) -> Result<Option<Session>, NegotiateError> {
    if server.config.oldstyle {
        return oldstyle(server, stream).map(Some);
    }
    let mut neg = Negotiation::new(server, stream);
    loop {
        match neg.next()? {
            Step::Open { name, purpose } => {
                neg.answer_open(&name, purpose, None);
            }
            Step::Ready(negotiated) => return neg.session(*negotiated).map(Some),
            Step::Ended => return Ok(None),
        }
    }
}

/// The oldstyle protocol: the default export, opened before the client says anything.
fn oldstyle(server: &NbdServer, mut stream: Stream) -> Result<Session, NegotiateError> {
    // Oldstyle has no STARTTLS: its connections are plaintext.
    let opened = open_export(server, "", None, false).map_err(|e| {
        tracing::info!("oldstyle client refused: {e}");
        io::Error::other(e.to_string())
    })?;
    let (greeting, negotiated) = sluice_proto::nbd::oldstyle(details(server, &opened));
    stream.write_all(&greeting)?;
    Ok(Session {
        stream,
        export: opened.export,
        backend: opened.backend,
        name: opened.name,
        named: None,
        negotiated,
        leftover: Vec::new(),
    })
}

/// An export opened for a client.
struct Opened {
    export: Export,
    /// The export's name: the one asked for, or the plugin's default export for "".
    name: String,
    backend: Arc<Backend>,
    named: Option<Arc<NamedExport>>,
}

/// The export list for NBD_OPT_LIST. A plugin that fails to list (or refuses to, as nbdkit's
/// exportname filter can) gets the client an error reply, as with nbdkit.
fn list_exports(
    server: &NbdServer,
    is_tls: bool,
) -> Result<Vec<(String, Option<String>)>, BlockError> {
    match &server.exports {
        Exports::Single(backend) => {
            match backend
                .plugin()
                .list_exports(server.config.readonly, is_tls)
            {
                Ok(list) => Ok(list.into_iter().map(|e| (e.name, e.description)).collect()),
                Err(e) => {
                    tracing::info!("list_exports failed: {e}");
                    Err(e)
                }
            }
        }
        Exports::Table(table) => Ok(table.list()),
    }
}

/// True if a client may ask for `name`: a plugin answers to any name (as with nbdkit, it
/// refuses unknown ones when opened), a daemon only to the names in its table.
fn export_exists(server: &NbdServer, name: &str) -> bool {
    match &server.exports {
        Exports::Single(_) => name.len() <= sluice_proto::nbd::consts::NBD_MAX_STRING,
        Exports::Table(table) => table.get(name).is_some(),
    }
}

/// Opens the export a client named ("" is the plugin's default export). In a daemon,
/// `named` is the table entry for `name` (None: there is none).
fn open_export(
    server: &NbdServer,
    name: &str,
    named: Option<Arc<NamedExport>>,
    is_tls: bool,
) -> Result<Opened, BlockError> {
    if name.len() > sluice_proto::nbd::consts::NBD_MAX_STRING {
        return Err(BlockError::new(Errno::EINVAL, "export name too long"));
    }
    let (backend, named, readonly) = match &server.exports {
        Exports::Single(backend) => (backend.clone(), None, server.config.readonly),
        Exports::Table(_) => {
            let named = named.ok_or_else(|| {
                BlockError::new(Errno(libc::ENOENT), format!("no export named {name:?}"))
            })?;
            let readonly = server.config.readonly || !named.writable;
            (named.backend.clone(), Some(named), readonly)
        }
    };
    let plugin = backend.plugin();
    let resolved;
    let plugin_name = if name.is_empty() && named.is_none() {
        resolved = plugin.default_export(readonly, is_tls)?;
        resolved.as_str()
    } else if named.is_some() {
        // A daemon's export name is its own; the node behind it has no export names.
        ""
    } else {
        name
    };
    let ctx = OpenContext {
        readonly,
        export_name: plugin_name,
        is_tls,
    };
    let export = Export::open(&backend, &ctx)?;
    let name = if named.is_some() { name } else { plugin_name };
    Ok(Opened {
        export,
        name: name.to_string(),
        backend,
        named,
    })
}

fn details(server: &NbdServer, opened: &Opened) -> ExportDetails {
    let caps = opened.export.caps();
    let max = server.config.max_payload;
    let block_size = match caps.block_size {
        Some(bs) => (bs.minimum, bs.preferred, bs.maximum.min(max)),
        None => (1, 4096, max),
    };
    let description = match &opened.named {
        Some(n) if n.description.is_some() => n.description.clone(),
        _ => caps.description.clone(),
    };
    let mut transmission_flags = caps.transmission_flags();
    if server.config.max_connections == Some(1) {
        // As qsd: a server of one client at a time does not advertise multi-conn.
        transmission_flags &= !sluice_proto::nbd::consts::NBD_FLAG_CAN_MULTI_CONN;
    }
    ExportDetails {
        name: opened.name.clone(),
        description,
        size: caps.size,
        transmission_flags,
        block_size: Some(block_size),
    }
}
