//! Drives the sans-IO NBD handshake ([`sluice_proto::nbd::Handshake`]) over a blocking socket
//! and answers its questions from the plugin: export lists, and the details of an export,
//! which means opening it. An export opened for NBD_OPT_INFO is closed again (clients then
//! send GO and it is reopened, as with nbdkit); the one opened for the final GO or
//! EXPORT_NAME is kept for the transmission phase.

use std::io::{self, Read, Write};

use sluice_block::plugin::OpenContext;
use sluice_block::{BlockError, Errno, Export};
use sluice_proto::nbd::{
    Event, ExportDetails, ExportRefusal, Handshake, HandshakeConfig, Negotiated, Purpose,
};

use std::sync::Arc;

use sluice_block::export::Backend;

use super::{Exports, NamedExport, NbdServer};
use crate::stream::Stream;

/// What the transmission phase starts from.
pub(super) struct Session {
    pub stream: Stream,
    pub export: Export,
    pub backend: Arc<Backend>,
    /// Keeps a daemon's table entry alive (and counted as in use) while connected.
    pub _named: Option<Arc<NamedExport>>,
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
}

impl NegotiateError {
    /// The client simply went away (closed or reset the socket): not worth an info line.
    pub(super) fn is_disconnect(&self) -> bool {
        matches!(self, NegotiateError::Io(e) if matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::UnexpectedEof
        ))
    }
}

pub(super) fn negotiate(
    server: &NbdServer,
    mut stream: Stream,
) -> Result<Option<Session>, NegotiateError> {
    let config = HandshakeConfig {
        meta_contexts: server.config.meta_contexts.clone(),
        ..HandshakeConfig::default()
    };
    let mut hs = Handshake::new(config);
    let mut kept: Option<Opened> = None;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // poll() may queue replies before it asks for input: send them first.
        let event = hs.poll()?;
        let out = hs.take_output();
        if !out.is_empty() {
            let sent = stream.write_all(&out);
            // A client that sends NBD_OPT_ABORT may close without reading the
            // acknowledgement (libnbd's nbd_opt_abort does, so every `nbdinfo --list`), so
            // failing to send that last reply is the normal end, not an error to log.
            if matches!(event, Event::Aborted) {
                return Ok(None);
            }
            sent?;
        }
        match event {
            Event::NeedInput => {
                let n = stream.read(&mut buf)?;
                if n == 0 {
                    return Ok(None);
                }
                hs.feed(&buf[..n]);
            }
            Event::ListExports => hs.answer_list(&list_exports(server)),
            Event::ExportQuery {
                name,
                purpose: Purpose::ListMetaContext | Purpose::SetMetaContext,
            } => {
                // Meta-context negotiation only needs to know the export exists: opening the
                // plugin for it would run its open/close once more per client (nbdkit does not).
                let answer = match export_exists(server, &name) {
                    true => Ok(ExportDetails {
                        name: name.clone(),
                        description: None,
                        size: 0,
                        transmission_flags: 0,
                        block_size: None,
                    }),
                    false => Err(ExportRefusal::Unknown(format!("no export named {name:?}"))),
                };
                hs.answer_export(answer);
            }
            Event::ExportQuery { name, purpose } => {
                let answer = open_export(server, &name).map(|opened| {
                    let details = details(server, &opened);
                    if matches!(purpose, Purpose::Go | Purpose::ExportName) {
                        kept = Some(opened);
                    }
                    details
                });
                let answer = answer.map_err(|e| {
                    tracing::info!("export {name:?} refused: {e}");
                    ExportRefusal::Unknown(format!("export {name:?}: {e}"))
                });
                hs.answer_export(answer);
            }
            Event::Ready(negotiated) => {
                let opened = kept.take().ok_or_else(|| {
                    io::Error::other("negotiation finished without an open export")
                })?;
                return Ok(Some(Session {
                    stream,
                    export: opened.export,
                    backend: opened.backend,
                    _named: opened.named,
                    negotiated: *negotiated,
                    leftover: hs.take_leftover(),
                }));
            }
            Event::Aborted => return Ok(None),
        }
    }
}

/// An export opened for a client.
struct Opened {
    export: Export,
    /// The export's name: the one asked for, or the plugin's default export for "".
    name: String,
    backend: Arc<Backend>,
    named: Option<Arc<NamedExport>>,
}

fn list_exports(server: &NbdServer) -> Vec<(String, Option<String>)> {
    match &server.exports {
        Exports::Single(backend) => {
            match backend.plugin().list_exports(server.config.readonly, false) {
                Ok(list) => list.into_iter().map(|e| (e.name, e.description)).collect(),
                Err(e) => {
                    tracing::warn!("list_exports failed: {e}");
                    Vec::new()
                }
            }
        }
        Exports::Table(table) => table.list(),
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

/// Opens the export a client named ("" is the plugin's default export).
fn open_export(server: &NbdServer, name: &str) -> Result<Opened, BlockError> {
    if name.len() > sluice_proto::nbd::consts::NBD_MAX_STRING {
        return Err(BlockError::new(Errno::EINVAL, "export name too long"));
    }
    let (backend, named, readonly) = match &server.exports {
        Exports::Single(backend) => (backend.clone(), None, server.config.readonly),
        Exports::Table(table) => {
            let named = table.get(name).ok_or_else(|| {
                BlockError::new(Errno(libc::ENOENT), format!("no export named {name:?}"))
            })?;
            let readonly = server.config.readonly || !named.writable;
            (named.backend.clone(), Some(named), readonly)
        }
    };
    let plugin = backend.plugin();
    let resolved;
    let plugin_name = if name.is_empty() && named.is_none() {
        resolved = plugin.default_export(readonly, false)?;
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
        is_tls: false,
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
    ExportDetails {
        name: opened.name.clone(),
        description,
        size: caps.size,
        transmission_flags: caps.transmission_flags(),
        block_size: Some(block_size),
    }
}
