//! Block exports and the NBD server they are served by.
//!
//! One [`ExportTable`] lives as long as the daemon; `nbd-server-start` creates an
//! [`NbdServer`] over it and spawns its accept loop on the runtime, `nbd-server-stop` stops
//! it and removes every NBD export. An export is a node's plugin under a [`Gate`] filter, in a
//! [`Backend`]; the gate is what makes `block-export-del` with `mode: hard` take effect
//! for clients that are still connected: their further requests fail with ESHUTDOWN, and
//! BLOCK_EXPORT_DELETED is sent once the last of them has disconnected (the server holds an
//! `Arc` of the export per connection, which is how "in use" is known).
//!
//! Each export has its own `Backend`, so a plugin with a serializing thread model that is
//! exported under two names is serialized per export, not across them.
//!
//! The server offers every meta context sluice knows ([`META_CONTEXTS`]); each export then
//! offers `base:allocation` and, when added with `allocation-depth: true` (as with
//! qemu-storage-daemon), `qemu:allocation-depth`. A hard `block-export-del` also closes the
//! connections of clients still using the export ([`NbdServer::disconnect_export`]), as
//! qemu-storage-daemon does.
//!
//! `bitmaps: [...]` adds one `qemu:dirty-bitmap:NAME` context per bitmap, answered by the
//! export itself ([`BitmapContext`], an [`ExportContext`] of the server's table entry), not
//! by the node's plugin: the bitmap is the daemon's, beside the node. The context holds the
//! bitmap busy, so it is busy exactly while the entry lives (the table, the daemon's export
//! list and each connection hold it), as qsd marks an exported bitmap busy until the export
//! is gone.

use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sluice_block::error::strerror;
use sluice_block::export::Backend;
use sluice_block::{
    BlockError, BlockStats, Errno, Extents, Filter, Filtered, Flags, Handle, Next, OpenContext,
    Plugin,
};
use sluice_image::bitmaps::BusyGuard;
use sluice_proto::nbd::consts::NBD_STATE_DIRTY;
use sluice_server::{ExportContext, Listener, NamedExport, NbdServer};

use crate::generated::{NbdServerOptions, SocketAddress};
use crate::objects::Objects;
use crate::QmpError;

/// Longest export name or description (the NBD protocol's string limit).
pub const NBD_MAX_STRING: usize = 4096;

/// The meta contexts the daemon's NBD server knows, in the order that gives their ids.
pub const META_CONTEXTS: [&str; 2] = [
    sluice_proto::nbd::CONTEXT_BASE_ALLOCATION,
    sluice_proto::nbd::CONTEXT_QEMU_ALLOCATION_DEPTH,
];

/// One export.
pub struct Export {
    pub id: String,
    pub node: String,
    /// The NBD export name.
    pub name: String,
    pub named: Arc<NamedExport>,
    pub gate: Arc<AtomicBool>,
    /// Removed with `mode: hard` while clients were connected.
    pub shutting_down: bool,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("id", &self.id)
            .field("node", &self.node)
            .field("name", &self.name)
            .field("shutting_down", &self.shutting_down)
            .finish_non_exhaustive()
    }
}

impl Export {
    /// True while a client connection holds the export.
    pub fn in_use(&self) -> bool {
        // Ours, plus the table's while it is listed.
        Arc::strong_count(&self.named) > if self.shutting_down { 1 } else { 2 }
    }
}

/// The running NBD server.
pub struct RunningNbd {
    pub server: Arc<NbdServer>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Unix socket to unlink when the server stops.
    unix_path: Option<PathBuf>,
}

impl std::fmt::Debug for RunningNbd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningNbd")
            .field("unix_path", &self.unix_path)
            .finish_non_exhaustive()
    }
}

impl RunningNbd {
    /// Binds `opts.addr` and starts accepting (must be called inside the tokio runtime), with
    /// TLS required if `opts.tls_creds` names credentials in `objects`.
    pub fn start(
        opts: &NbdServerOptions,
        table: Arc<sluice_server::ExportTable>,
        config: sluice_server::ServerConfig,
        objects: &Arc<Objects>,
    ) -> Result<RunningNbd, QmpError> {
        // TLS is resolved before the address is bound (qsd binds first): a mistake in either
        // is reported the same way, and no socket is left behind. qsd 10.0 accepts
        // `tls-authz` without `tls-creds` (and then has nothing to check); so does sluice.
        let mut config = config;
        if let Some(id) = &opts.tls_creds {
            let mut tls = objects.server_tls(id)?;
            if let Some(authz) = &opts.tls_authz {
                tls = tls.with_authz(crate::objects::authz_hook(objects, authz));
            }
            config.tls = Some(tls);
        }
        let (listener, unix_path) = match &opts.addr.u {
            crate::generated::SocketAddressBranch::Unix(u) => {
                let l = std::os::unix::net::UnixListener::bind(&u.path).map_err(|e| {
                    QmpError::generic(format!(
                        "Failed to bind socket to {}: {}",
                        u.path,
                        strerror(&e)
                    ))
                })?;
                let l = Listener::from_std_unix(l).map_err(|e| {
                    QmpError::generic(format!("Failed to listen on {}: {}", u.path, strerror(&e)))
                })?;
                (l, Some(PathBuf::from(&u.path)))
            }
            crate::generated::SocketAddressBranch::Inet(i) => {
                let port: u16 = i.port.parse().map_err(|_| {
                    QmpError::generic(format!("Port '{}' is not a number from 0 to 65535", i.port))
                })?;
                let addr = (i.host.as_str(), port)
                    .to_socket_addrs()
                    .map_err(|e| {
                        QmpError::generic(format!(
                            "address resolution failed for {}:{}: {}",
                            i.host,
                            i.port,
                            strerror(&e)
                        ))
                    })?
                    .next()
                    .ok_or_else(|| {
                        QmpError::generic(format!(
                            "address resolution failed for {}:{}",
                            i.host, i.port
                        ))
                    })?;
                let l = std::net::TcpListener::bind(addr).map_err(|e| {
                    QmpError::generic(format!("Failed to bind socket: {}", strerror(&e)))
                })?;
                let l = Listener::from_std_tcp(l).map_err(|e| {
                    QmpError::generic(format!("Failed to listen on {addr}: {}", strerror(&e)))
                })?;
                (l, None)
            }
        };
        // qsd's defaults and meaning: 10 s, 0 is no limit; 0 connections is no limit.
        config.handshake_timeout = match opts.handshake_max_seconds {
            None => Some(sluice_server::nbd::DEFAULT_HANDSHAKE_TIMEOUT),
            Some(0) => None,
            Some(n) => Some(Duration::from_secs(u64::from(n))),
        };
        config.max_connections = opts.max_connections.filter(|&n| n > 0).map(|n| n as usize);
        for c in META_CONTEXTS {
            if !config.meta_contexts.iter().any(|m| m == c) {
                config.meta_contexts.push(c.to_string());
            }
        }
        let server = NbdServer::with_table(table, config);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let s = server.clone();
        tokio::spawn(async move {
            s.serve(vec![listener], async move {
                let _ = rx.await;
            })
            .await;
        });
        Ok(RunningNbd {
            server,
            stop: Some(tx),
            unix_path,
        })
    }

    /// Stops accepting and ends every connection after its current request.
    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.server.begin_shutdown();
        if let Some(p) = self.unix_path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for RunningNbd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The address a `--nbd-server`/`nbd-server-start` listens on, for messages.
pub fn describe(addr: &SocketAddress) -> String {
    match &addr.u {
        crate::generated::SocketAddressBranch::Unix(u) => u.path.clone(),
        crate::generated::SocketAddressBranch::Inet(i) => format!("{}:{}", i.host, i.port),
    }
}

/// The filter that makes `block-export-del` with `mode: hard` take effect for clients that
/// are still connected: once its gate closes, new connections are refused and every data
/// request fails with ESHUTDOWN; size and capability questions still answer, as they touch
/// no data. Every other method is the filter layer's pass-through.
pub struct Gate {
    open: Arc<AtomicBool>,
}

impl Gate {
    /// A gate that lets calls through while `open` is true.
    pub fn new(open: Arc<AtomicBool>) -> Gate {
        Gate { open }
    }

    fn check(&self) -> sluice_block::Result<()> {
        if self.open.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(BlockError::new(Errno::ESHUTDOWN, "the export was removed"))
        }
    }
}

impl Filter for Gate {
    type Conn = ();

    fn name(&self) -> &str {
        "gate"
    }
    fn preconnect(&self, next: &dyn Plugin, readonly: bool) -> sluice_block::Result<()> {
        self.check()?;
        next.preconnect(readonly)
    }
    fn open(
        &self,
        next: &Arc<dyn Plugin>,
        ctx: &OpenContext<'_>,
    ) -> sluice_block::Result<((), Next)> {
        self.check()?;
        Ok(((), Next::open(next, ctx)?))
    }
    fn pread(
        &self,
        _: &(),
        next: &Next,
        buf: &mut [u8],
        offset: u64,
        flags: Flags,
    ) -> sluice_block::Result<()> {
        self.check()?;
        next.pread(buf, offset, flags)
    }
    fn pwrite(
        &self,
        _: &(),
        next: &Next,
        buf: &[u8],
        offset: u64,
        flags: Flags,
    ) -> sluice_block::Result<()> {
        self.check()?;
        next.pwrite(buf, offset, flags)
    }
    fn flush(&self, _: &(), next: &Next, flags: Flags) -> sluice_block::Result<()> {
        self.check()?;
        next.flush(flags)
    }
    fn trim(
        &self,
        _: &(),
        next: &Next,
        count: u64,
        offset: u64,
        flags: Flags,
    ) -> sluice_block::Result<()> {
        self.check()?;
        next.trim(count, offset, flags)
    }
    fn zero(
        &self,
        _: &(),
        next: &Next,
        count: u64,
        offset: u64,
        flags: Flags,
    ) -> sluice_block::Result<()> {
        self.check()?;
        next.zero(count, offset, flags)
    }
    fn cache(
        &self,
        _: &(),
        next: &Next,
        count: u64,
        offset: u64,
        flags: Flags,
    ) -> sluice_block::Result<()> {
        self.check()?;
        next.cache(count, offset, flags)
    }
    fn extents(
        &self,
        _: &(),
        next: &Next,
        count: u64,
        offset: u64,
        flags: Flags,
        extents: &mut Extents,
    ) -> sluice_block::Result<()> {
        self.check()?;
        next.extents(count, offset, flags, extents)
    }
    fn allocation_depth(
        &self,
        _: &(),
        next: &Next,
        count: u64,
        offset: u64,
        out: &mut Extents,
    ) -> sluice_block::Result<()> {
        self.check()?;
        next.allocation_depth(count, offset, out)
    }
}

/// A dirty bitmap served as `qemu:dirty-bitmap:NAME`, held busy while served.
pub struct BitmapContext(pub BusyGuard);

impl ExportContext for BitmapContext {
    /// qemu's `bitmap_to_extents`: alternating clean and dirty runs (flag
    /// `NBD_STATE_DIRTY`), cut off after `max` runs. Past the bitmap's end (a backing
    /// layer's bitmap under a larger top) everything is clean, as in qemu.
    fn status(&self, offset: u64, len: u64, max: usize) -> Vec<(u64, u32)> {
        let map = self.0.bitmap().map();
        let mut out: Vec<(u64, u32)> = Vec::new();
        let mut end = offset;
        map.status(offset, len, |_, n, dirty| {
            if out.len() < max {
                out.push((n, if dirty { NBD_STATE_DIRTY } else { 0 }));
                end += n;
            }
        });
        let stop = offset.saturating_add(len);
        // The clean rest, once every run up to the bitmap's end was given.
        if end >= map.size().max(offset) && end < stop {
            let room = out.len() < max;
            match out.last_mut() {
                Some((n, 0)) => *n += stop - end,
                _ if room => out.push((stop - end, 0)),
                _ => {}
            }
        }
        out
    }
}

/// `qemu:dirty-bitmap:NAME` for the held bitmap: one of a server's own contexts (a daemon
/// export's `bitmaps`, `sluice serve image ... bitmap=NAME`), by full name.
pub fn bitmap_context(guard: BusyGuard) -> (String, Arc<dyn ExportContext>) {
    let name = sluice_proto::nbd::dirty_bitmap_context(guard.bitmap().name());
    (name, Arc::new(BitmapContext(guard)))
}

/// A new entry for the server's table: the node's plugin behind a gate, and the gate. The
/// export's requests are counted in its backend's statistics and in `node_stats`.
/// `allocation_depth`: offer `qemu:allocation-depth` besides `base:allocation`;
/// `bitmaps`: `(bitmap name, held bitmap)` to offer as `qemu:dirty-bitmap:NAME`.
pub fn named_export(
    plugin: Arc<dyn Plugin>,
    node_stats: Option<Arc<BlockStats>>,
    writable: bool,
    description: Option<String>,
    allocation_depth: bool,
    bitmaps: Vec<(String, BusyGuard)>,
) -> (NamedExport, Arc<AtomicBool>) {
    let mut meta_contexts: Vec<String> = META_CONTEXTS[..if allocation_depth { 2 } else { 1 }]
        .iter()
        .map(|c| c.to_string())
        .collect();
    let own_contexts: Vec<(String, Arc<dyn ExportContext>)> = bitmaps
        .into_iter()
        .map(|(_, guard)| bitmap_context(guard))
        .collect();
    meta_contexts.extend(own_contexts.iter().map(|(n, _)| n.clone()));
    let gate = Arc::new(AtomicBool::new(true));
    let backend = Arc::new(Backend::with_stats(
        Arc::new(Filtered::new(Gate::new(gate.clone()), plugin)),
        node_stats,
    ));
    (
        NamedExport {
            backend,
            writable,
            description,
            meta_contexts,
            own_contexts,
        },
        gate,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_block::plugins::NullPlugin;
    use sluice_block::{Support, ThreadModel};

    fn gated(size: u64) -> (Filtered<Gate>, Arc<AtomicBool>) {
        let gate = Arc::new(AtomicBool::new(true));
        let p = Filtered::new(Gate::new(gate.clone()), Arc::new(NullPlugin::new(size)));
        (p, gate)
    }

    const CTX: OpenContext<'static> = OpenContext {
        readonly: false,
        export_name: "",
        is_tls: false,
    };

    #[test]
    fn gated_handle_fails_with_eshutdown_once_closed() {
        let (p, gate) = gated(4096);
        let h = p
            .open(&OpenContext {
                readonly: true,
                ..CTX
            })
            .unwrap();
        let mut buf = [1u8; 512];
        h.pread(&mut buf, 0, Flags::NONE).unwrap();
        assert_eq!(buf, [0u8; 512]);
        gate.store(false, Ordering::Release);
        let e = h.pread(&mut buf, 0, Flags::NONE).unwrap_err();
        assert_eq!(e.errno, Errno::ESHUTDOWN);
        assert_eq!(h.get_size().unwrap(), 4096);
    }

    #[test]
    fn gate_closed_fails_every_data_call_but_answers_capabilities() {
        let (p, gate) = gated(1 << 20);
        let h = p.open(&CTX).unwrap();
        let mut ext = Extents::new(0, 4096);
        h.extents(4096, 0, Flags::NONE, &mut ext).unwrap();
        gate.store(false, Ordering::Release);

        let mut buf = [0u8; 512];
        let mut ext = Extents::new(0, 4096);
        let mut depth = Extents::new(0, 4096);
        let errs = [
            h.pread(&mut buf, 0, Flags::NONE),
            h.pwrite(&buf, 0, Flags::NONE),
            h.flush(Flags::NONE),
            h.trim(512, 0, Flags::NONE),
            h.zero(512, 0, Flags::NONE),
            h.cache(512, 0, Flags::NONE),
            h.extents(4096, 0, Flags::NONE, &mut ext),
            h.allocation_depth(4096, 0, &mut depth),
        ];
        for r in errs {
            assert_eq!(r.unwrap_err().errno, Errno::ESHUTDOWN);
        }
        // The null plugin's own answers, not the Handle trait's defaults.
        assert_eq!(h.get_size().unwrap(), 1 << 20);
        assert!(h.can_write().unwrap());
        assert!(h.can_trim().unwrap());
        assert_eq!(h.can_zero().unwrap(), Support::Native);
        assert_eq!(h.can_fua().unwrap(), Support::Native);
        assert!(h.can_multi_conn().unwrap());
        assert_eq!(h.can_cache().unwrap(), Support::Native);
        assert!(h.can_extents().unwrap());
    }

    /// A 1 MiB bitmap (64 KiB granules) with one dirty granule at 128 KiB, as a context.
    fn bitmap_1m() -> BitmapContext {
        let b = Arc::new(sluice_image::bitmaps::Bitmap::new(
            "b",
            1 << 20,
            64 << 10,
            true,
        ));
        b.map().mark(128 << 10, 4096);
        BitmapContext(b.hold())
    }

    #[test]
    fn bitmap_context_past_the_bitmaps_end_is_clean_as_in_qemu() {
        let c = bitmap_1m();
        // Within: clean, dirty, clean to the end; past it the clean run goes on (qemu's
        // bitmap_to_extents adds "the rest as clean" to the last run).
        let d = NBD_STATE_DIRTY;
        let (k64, m1) = (64 << 10, 1 << 20);
        assert_eq!(
            c.status(0, 2 * m1, 16),
            [(2 * k64, 0), (k64, d), (2 * m1 - 3 * k64, 0)]
        );
        assert_eq!(
            c.status(0, m1, 16),
            [(2 * k64, 0), (k64, d), (m1 - 3 * k64, 0)]
        );
        // Wholly past the end: one clean run.
        assert_eq!(c.status(m1 + 4096, 8192, 16), [(8192, 0)]);
        // Ending dirty at the bitmap's end: the clean rest is a run of its own.
        c.0.bitmap().map().mark(m1 - 4096, 4096);
        assert_eq!(c.status(m1 - k64, 2 * k64, 16), [(k64, d), (k64, 0)]);
        // Cut off by `max` before the bitmap's end: nothing is added.
        assert_eq!(c.status(0, 2 * m1, 2), [(2 * k64, 0), (k64, d)]);
        // Cut off by `max` at the bitmap's end, on a dirty run: no room for the rest.
        assert_eq!(c.status(m1 - k64, 2 * k64, 1), [(k64, d)]);
    }

    #[test]
    fn gate_closed_refuses_new_connections_with_eshutdown() {
        let (p, gate) = gated(4096);
        p.preconnect(false).unwrap();
        gate.store(false, Ordering::Release);
        assert_eq!(p.preconnect(false).unwrap_err().errno, Errno::ESHUTDOWN);
        assert_eq!(p.open(&CTX).err().unwrap().errno, Errno::ESHUTDOWN);
        // Plugin-level questions still reach the node's plugin.
        assert_eq!(p.name(), "null");
        assert!(!p.may_block());
        assert_eq!(p.thread_model(), ThreadModel::Parallel);
        assert_eq!(p.list_exports(false, false).unwrap()[0].name, "");
    }
}
