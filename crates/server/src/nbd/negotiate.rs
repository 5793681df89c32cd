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

use super::NbdServer;
use crate::stream::Stream;

/// What the transmission phase starts from.
pub(super) struct Session {
    pub stream: Stream,
    pub export: Export,
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

pub(super) fn negotiate(
    server: &NbdServer,
    mut stream: Stream,
) -> Result<Option<Session>, NegotiateError> {
    let config = HandshakeConfig {
        meta_contexts: server.config.meta_contexts.clone(),
        ..HandshakeConfig::default()
    };
    let mut hs = Handshake::new(config);
    let mut kept: Option<Export> = None;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // poll() may queue replies before it asks for input: send them first.
        let event = hs.poll()?;
        let out = hs.take_output();
        if !out.is_empty() {
            stream.write_all(&out)?;
        }
        match event {
            Event::NeedInput => {
                let n = stream.read(&mut buf)?;
                if n == 0 {
                    return Ok(None);
                }
                hs.feed(&buf[..n]);
            }
            Event::ListExports => {
                let list = server
                    .backend
                    .plugin()
                    .list_exports(server.config.readonly, false);
                match list {
                    Ok(list) => {
                        let list: Vec<(String, Option<String>)> =
                            list.into_iter().map(|e| (e.name, e.description)).collect();
                        hs.answer_list(&list);
                    }
                    Err(e) => {
                        tracing::warn!("list_exports failed: {e}");
                        hs.answer_list(&[]);
                    }
                }
            }
            Event::ExportQuery { name, purpose } => {
                let answer = open_export(server, &name).map(|export| {
                    let details = details(server, &name, &export);
                    if matches!(purpose, Purpose::Go | Purpose::ExportName) {
                        kept = Some(export);
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
                let export = kept.take().ok_or_else(|| {
                    io::Error::other("negotiation finished without an open export")
                })?;
                return Ok(Some(Session {
                    stream,
                    export,
                    negotiated: *negotiated,
                    leftover: hs.take_leftover(),
                }));
            }
            Event::Aborted => return Ok(None),
        }
    }
}

/// Opens the export a client named ("" is the plugin's default export).
fn open_export(server: &NbdServer, name: &str) -> Result<Export, BlockError> {
    let plugin = server.backend.plugin();
    let readonly = server.config.readonly;
    let resolved;
    let name = if name.is_empty() {
        resolved = plugin.default_export(readonly, false)?;
        resolved.as_str()
    } else {
        name
    };
    if name.len() > sluice_proto::nbd::consts::NBD_MAX_STRING {
        return Err(BlockError::new(Errno::EINVAL, "export name too long"));
    }
    let ctx = OpenContext {
        readonly,
        export_name: name,
        is_tls: false,
    };
    Export::open(&server.backend, &ctx)
}

fn details(server: &NbdServer, name: &str, export: &Export) -> ExportDetails {
    let caps = export.caps();
    let max = server.config.max_payload;
    let block_size = match caps.block_size {
        Some(bs) => (bs.minimum, bs.preferred, bs.maximum.min(max)),
        None => (1, 4096, max),
    };
    ExportDetails {
        name: name.to_string(),
        description: caps.description.clone(),
        size: caps.size,
        transmission_flags: caps.transmission_flags(),
        block_size: Some(block_size),
    }
}
