//! The export policy: one opened plugin handle as an NBD client sees it.
//!
//! [`Export::open`] asks the handle's capabilities once (in nbdkit's order) and caches them;
//! every data call then goes through here, so the rules are written once for every kind of
//! plugin (built-in, nbdkit C, Python):
//!
//! - requests are checked first: range inside the export, write/trim/zero only on a writable
//!   export, FUA only when offered, FAST_ZERO only when offered (EINVAL/EPERM otherwise);
//! - FUA: *Native* passes the flag to the plugin; *Emulate* clears it and flushes after a
//!   successful write, zero or trim; *None* is refused (EINVAL);
//! - zero: *Native* calls the plugin; if that fails with ENOTSUP, or the mode is *Emulate*, the
//!   zeroes are written with pwrite in chunks, except for FAST_ZERO which fails at once with
//!   ENOTSUP, as nbdkit does;
//! - cache: *Native* calls the plugin, *Emulate* reads and discards;
//! - extents: a plugin without extents reports everything as data; an answer with no extent or
//!   one that breaks the ordering rules fails the request with EINVAL, never the server;
//! - asynchronous submission ([`Export::submit`], see [`crate::aio`]): only a request that
//!   passes all of the above and needs nothing after the plugin's call (no emulated FUA, no
//!   zero by writes), on a parallel export; anything else is declined to the synchronous path.
//!
//! Thread models are enforced here too: a lock shared by the whole plugin for
//! SerializeConnections/SerializeAllRequests, one per handle for SerializeRequests, none for
//! Parallel. (Serialising whole connections is the server's job: it holds
//! [`Backend::connection_lock`] for the life of a connection.)

use std::sync::{Arc, Mutex, MutexGuard};

use sluice_proto::nbd::consts as nbd;

use crate::aio::{AioKind, AioRequest, AioSink, Declined};
use crate::error::{BlockError, Errno, Result};
use crate::extents::Extents;
use crate::plugin::{
    BlockSize, FileRange, Flags, Handle, OpenContext, Plugin, Support, ThreadModel,
};
use crate::stats::BlockStats;

/// Size of the chunks in which zeroes are written when a plugin cannot zero natively.
const ZERO_CHUNK: usize = 1024 * 1024;

/// A loaded plugin plus the server-wide state its thread model needs.
pub struct Backend {
    plugin: Arc<dyn Plugin>,
    thread_model: ThreadModel,
    request_lock: Arc<Mutex<()>>,
    connection_lock: Mutex<()>,
    /// Where the server counts this export's requests: its own statistics first, then any
    /// the caller shares (a daemon's node, whose figures add up every export on it).
    stats: Vec<Arc<BlockStats>>,
}

impl Backend {
    pub fn new(plugin: Arc<dyn Plugin>) -> Backend {
        Backend::with_stats(plugin, None)
    }

    /// A backend whose requests are also counted in `shared` (a node's statistics).
    pub fn with_stats(plugin: Arc<dyn Plugin>, shared: Option<Arc<BlockStats>>) -> Backend {
        let thread_model = plugin.thread_model();
        let mut stats = vec![Arc::new(BlockStats::new())];
        stats.extend(shared);
        Backend {
            plugin,
            thread_model,
            request_lock: Arc::new(Mutex::new(())),
            connection_lock: Mutex::new(()),
            stats,
        }
    }

    /// This export's own statistics.
    pub fn stats(&self) -> &Arc<BlockStats> {
        &self.stats[0]
    }

    /// Every statistics a request is counted in (the export's, then shared ones).
    pub fn stats_sinks(&self) -> &[Arc<BlockStats>] {
        &self.stats
    }

    pub fn plugin(&self) -> &Arc<dyn Plugin> {
        &self.plugin
    }

    pub fn thread_model(&self) -> ThreadModel {
        self.thread_model
    }

    /// Held by a connection for its whole life when the model is SerializeConnections.
    pub fn connection_lock(&self) -> Option<MutexGuard<'_, ()>> {
        (self.thread_model == ThreadModel::SerializeConnections).then(|| {
            self.connection_lock
                .lock()
                .unwrap_or_else(|e| e.into_inner())
        })
    }
}

/// Capabilities of one open export, asked once when it was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caps {
    pub size: u64,
    pub writable: bool,
    pub flush: bool,
    pub rotational: bool,
    pub trim: bool,
    pub zero: Support,
    pub fast_zero: bool,
    pub fua: Support,
    pub multi_conn: bool,
    pub cache: Support,
    pub extents: bool,
    pub block_size: Option<BlockSize>,
    pub description: Option<String>,
}

impl Caps {
    /// NBD transmission flags for these capabilities (HAS_FLAGS included).
    pub fn transmission_flags(&self) -> u16 {
        let mut f = nbd::NBD_FLAG_HAS_FLAGS | nbd::NBD_FLAG_SEND_DF;
        let set = |f: &mut u16, cond: bool, bit: u16| {
            if cond {
                *f |= bit
            }
        };
        set(&mut f, !self.writable, nbd::NBD_FLAG_READ_ONLY);
        set(&mut f, self.flush, nbd::NBD_FLAG_SEND_FLUSH);
        set(&mut f, self.fua != Support::None, nbd::NBD_FLAG_SEND_FUA);
        set(&mut f, self.rotational, nbd::NBD_FLAG_ROTATIONAL);
        set(&mut f, self.trim, nbd::NBD_FLAG_SEND_TRIM);
        set(
            &mut f,
            self.zero != Support::None,
            nbd::NBD_FLAG_SEND_WRITE_ZEROES,
        );
        set(&mut f, self.fast_zero, nbd::NBD_FLAG_SEND_FAST_ZERO);
        set(&mut f, self.multi_conn, nbd::NBD_FLAG_CAN_MULTI_CONN);
        set(
            &mut f,
            self.cache != Support::None,
            nbd::NBD_FLAG_SEND_CACHE,
        );
        f
    }
}

/// One opened export: a plugin handle, its cached capabilities and its locking.
pub struct Export {
    handle: Box<dyn Handle>,
    caps: Caps,
    lock: Option<Arc<Mutex<()>>>,
}

impl Export {
    /// Opens a handle and asks its capabilities, in nbdkit's order. `readonly` forces a
    /// read-only export whatever the plugin could do.
    pub fn open(backend: &Backend, ctx: &OpenContext<'_>) -> Result<Export> {
        let lock = match backend.thread_model {
            ThreadModel::SerializeConnections | ThreadModel::SerializeAllRequests => {
                Some(backend.request_lock.clone())
            }
            ThreadModel::SerializeRequests => Some(Arc::new(Mutex::new(()))),
            ThreadModel::Parallel => None,
        };
        let handle = {
            let _g = lock
                .as_ref()
                .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()));
            backend.plugin.open(ctx)?
        };
        let caps = {
            let _g = lock
                .as_ref()
                .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()));
            query_caps(handle.as_ref(), ctx.readonly)?
        };
        Ok(Export { handle, caps, lock })
    }

    pub fn caps(&self) -> &Caps {
        &self.caps
    }

    pub fn size(&self) -> u64 {
        self.caps.size
    }

    fn guard(&self) -> Option<MutexGuard<'_, ()>> {
        self.lock
            .as_ref()
            .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn check_range(&self, what: &str, count: u64, offset: u64) -> Result<()> {
        if count == 0 {
            return Err(einval(format!("{what}: zero-length request")));
        }
        match offset.checked_add(count) {
            Some(end) if end <= self.caps.size => Ok(()),
            _ => Err(einval(format!(
                "{what}: request beyond end of export (offset {offset}, count {count}, size {})",
                self.caps.size
            ))),
        }
    }

    fn check_write(&self, what: &str, flags: Flags) -> Result<()> {
        if !self.caps.writable {
            return Err(BlockError::new(
                Errno::EPERM,
                format!("{what}: export is read-only"),
            ));
        }
        if flags.contains(Flags::FUA) && self.caps.fua == Support::None {
            return Err(einval(format!(
                "{what}: FUA is not supported by this export"
            )));
        }
        Ok(())
    }

    /// After a successful write/zero/trim: the flush that emulates FUA.
    fn finish_fua(&self, flags: Flags) -> Result<()> {
        if flags.contains(Flags::FUA) && self.caps.fua == Support::Emulate {
            let _g = self.guard();
            self.handle.flush(Flags::NONE)?;
        }
        Ok(())
    }

    /// The flags the plugin sees: FUA only when it handles FUA itself.
    fn plugin_flags(&self, flags: Flags) -> Flags {
        if self.caps.fua == Support::Native {
            flags
        } else {
            flags.without(Flags::FUA)
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range("read", buf.len() as u64, offset)?;
        let _g = self.guard();
        self.handle.pread(buf, offset, Flags::NONE)
    }

    /// If the handle says where the bytes of `[offset, offset+count)` lie in a file
    /// ([`Handle::file_range`]), runs `read` on that range, under the thread model's lock as
    /// [`Export::read`] would hold it, and returns its result; `None` (nothing was run) when
    /// the range is not one a read may be made of, or the handle has no file for it. The
    /// caller then reads with [`Export::read`], whose answer (data or error) is the request's.
    pub fn with_file_range<R>(
        &self,
        count: u64,
        offset: u64,
        read: impl FnOnce(FileRange<'_>) -> R,
    ) -> Option<R> {
        self.check_range("read", count, offset).ok()?;
        let _g = self.guard();
        self.handle.file_range(count, offset).map(read)
    }

    /// Writes `buf` at `offset`; `flags` may hold FUA.
    pub fn write(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.check_range("write", buf.len() as u64, offset)?;
        self.check_write("write", flags)?;
        {
            let _g = self.guard();
            self.handle.pwrite(buf, offset, self.plugin_flags(flags))?;
        }
        self.finish_fua(flags)
    }

    pub fn flush(&self) -> Result<()> {
        if !self.caps.flush {
            return Err(einval("flush: not supported by this export"));
        }
        let _g = self.guard();
        self.handle.flush(Flags::NONE)
    }

    /// Discards a range; `flags` may hold FUA.
    pub fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.check_range("trim", count, offset)?;
        self.check_write("trim", flags)?;
        if !self.caps.trim {
            return Err(einval("trim: not supported by this export"));
        }
        {
            let _g = self.guard();
            self.handle.trim(count, offset, self.plugin_flags(flags))?;
        }
        self.finish_fua(flags)
    }

    /// Writes zeroes; `flags` may hold MAY_TRIM, FUA and FAST_ZERO.
    pub fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.check_range("zero", count, offset)?;
        self.check_write("zero", flags)?;
        let fast = flags.contains(Flags::FAST_ZERO);
        if fast && !self.caps.fast_zero {
            return Err(einval("zero: fast zero is not supported by this export"));
        }
        let native = match self.caps.zero {
            Support::None => return Err(einval("zero: not supported by this export")),
            Support::Native => {
                let r = {
                    let _g = self.guard();
                    self.handle.zero(count, offset, self.plugin_flags(flags))
                };
                match r {
                    Ok(()) => true,
                    Err(e) if e.errno == Errno::ENOTSUP || e.errno.0 == libc::EOPNOTSUPP => {
                        if fast {
                            return Err(e);
                        }
                        false
                    }
                    Err(e) => return Err(e),
                }
            }
            Support::Emulate => false,
        };
        if !native {
            if fast {
                return Err(BlockError::new(
                    Errno::ENOTSUP,
                    "zero: fast zero requested but zeroing would need writes",
                ));
            }
            self.write_zeroes(
                count,
                offset,
                self.plugin_flags(flags).without(Flags::MAY_TRIM),
            )?;
            // With native FUA the last chunk carried the flag; with emulation flush below.
        }
        self.finish_fua(flags)
    }

    fn write_zeroes(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let zeroes = zero_buffer();
        let mut done = 0u64;
        while done < count {
            let n = (count - done).min(ZERO_CHUNK as u64) as usize;
            let last = done + n as u64 == count;
            // FUA (when native) only on the last chunk: the earlier ones are made durable by
            // it too, since the plugin must flush its whole state for FUA.
            let f = if last {
                flags
            } else {
                flags.without(Flags::FUA)
            };
            let _g = self.guard();
            self.handle.pwrite(&zeroes[..n], offset + done, f)?;
            done += n as u64;
        }
        Ok(())
    }

    /// True if some requests of this export may be submitted asynchronously
    /// ([`Export::submit`]): the handle offers it and no lock of the thread model is held
    /// around plugin calls.
    pub fn is_async(&self) -> bool {
        self.lock.is_none() && self.handle.aio().is_some()
    }

    /// Submits `req` asynchronously if this export may (see [`crate::aio`]): every check the
    /// synchronous method makes passes, the request needs nothing from this policy after the
    /// plugin's call (no emulated FUA, no zero by writes) and the plugin takes it. Anything
    /// else is declined with [`Declined::Sync`] and must run through the synchronous method,
    /// which then gives the same answer as before (an error included). `req.flags` are the
    /// client's (FUA, MAY_TRIM, FAST_ZERO).
    pub fn submit(
        &self,
        req: &AioRequest,
        buf: Vec<u8>,
        sink: &Arc<dyn AioSink>,
        tag: usize,
    ) -> std::result::Result<(), Declined> {
        let Some(aio) = self.handle.aio().filter(|_| self.lock.is_none()) else {
            return Err(Declined::Sync(buf));
        };
        if !self.may_submit(req) || !aio.can_submit(req) {
            return Err(Declined::Sync(buf));
        }
        aio.submit(req, buf, sink, tag)
    }

    /// True if `req` passes the synchronous path's checks and needs only the plugin's call.
    fn may_submit(&self, req: &AioRequest) -> bool {
        let caps = &self.caps;
        let fua = req.flags.contains(Flags::FUA);
        let writes =
            || self.check_write("", req.flags).is_ok() && (!fua || caps.fua == Support::Native);
        match req.kind {
            AioKind::Flush => caps.flush,
            AioKind::Read => self.check_range("", req.count, req.offset).is_ok(),
            AioKind::Write => self.check_range("", req.count, req.offset).is_ok() && writes(),
            AioKind::Trim => {
                self.check_range("", req.count, req.offset).is_ok() && writes() && caps.trim
            }
            AioKind::Zero => {
                self.check_range("", req.count, req.offset).is_ok()
                    && writes()
                    && caps.zero == Support::Native
                    && (!req.flags.contains(Flags::FAST_ZERO) || caps.fast_zero)
            }
        }
    }

    /// NBD_CMD_CACHE: prefetch a range.
    pub fn cache(&self, count: u64, offset: u64) -> Result<()> {
        self.check_range("cache", count, offset)?;
        match self.caps.cache {
            Support::None => Err(einval("cache: not supported by this export")),
            Support::Native => {
                let _g = self.guard();
                self.handle.cache(count, offset, Flags::NONE)
            }
            Support::Emulate => {
                let mut buf = vec![0u8; (count.min(ZERO_CHUNK as u64)) as usize];
                let mut done = 0u64;
                while done < count {
                    let n = (count - done).min(buf.len() as u64) as usize;
                    let _g = self.guard();
                    self.handle
                        .pread(&mut buf[..n], offset + done, Flags::NONE)?;
                    done += n as u64;
                }
                Ok(())
            }
        }
    }

    /// Block status of `[offset, offset+count)`, clipped to the export. `flags` may hold
    /// REQ_ONE. The answer has at least one extent and starts at `offset`.
    pub fn extents(&self, count: u64, offset: u64, flags: Flags) -> Result<Extents> {
        self.check_range("block status", count, offset)?;
        let mut ext = Extents::new(offset, offset + count);
        if self.caps.extents {
            let r = {
                let _g = self.guard();
                self.handle.extents(count, offset, flags, &mut ext)
            };
            if let Err(e) = r {
                // An ordering mistake is the plugin's bug: EINVAL for this request only.
                return Err(if e.errno == Errno::ERANGE {
                    einval(format!(
                        "block status: plugin answered invalid extents: {e}"
                    ))
                } else {
                    e
                });
            }
            if ext.is_empty() {
                return Err(einval("block status: plugin returned no extents"));
            }
        } else {
            ext.add(offset, count, 0)?;
        }
        if flags.contains(Flags::REQ_ONE) {
            ext.truncate_to_one();
        }
        Ok(ext)
    }
}

impl Export {
    /// `qemu:allocation-depth` of `[offset, offset+count)`: extents whose kind is a depth.
    pub fn allocation_depth(&self, count: u64, offset: u64, flags: Flags) -> Result<Extents> {
        self.check_range("block status", count, offset)?;
        let mut ext = Extents::new(offset, offset + count);
        let r = {
            let _g = self.guard();
            self.handle.allocation_depth(count, offset, &mut ext)
        };
        if let Err(e) = r {
            return Err(if e.errno == Errno::ERANGE {
                einval(format!("block status: plugin answered invalid depths: {e}"))
            } else {
                e
            });
        }
        if ext.is_empty() {
            return Err(einval("block status: plugin returned no allocation depth"));
        }
        if flags.contains(Flags::REQ_ONE) {
            ext.truncate_to_one();
        }
        Ok(ext)
    }
}

fn einval(msg: impl Into<String>) -> BlockError {
    BlockError::new(Errno::EINVAL, msg)
}

fn zero_buffer() -> &'static [u8] {
    static ZEROES: std::sync::OnceLock<Box<[u8]>> = std::sync::OnceLock::new();
    ZEROES.get_or_init(|| vec![0u8; ZERO_CHUNK].into_boxed_slice())
}

fn query_caps(h: &dyn Handle, readonly: bool) -> Result<Caps> {
    let size = h.get_size()?;
    if size > i64::MAX as u64 {
        return Err(einval(format!("plugin size {size} is larger than 2^63-1")));
    }
    let writable = !readonly && h.can_write()?;
    let zero = if writable {
        h.can_zero()?
    } else {
        Support::None
    };
    let fast_zero = writable && zero != Support::None && h.can_fast_zero()?;
    let trim = writable && h.can_trim()?;
    let fua = if writable {
        h.can_fua()?
    } else {
        Support::None
    };
    let flush = h.can_flush()?;
    let rotational = h.is_rotational()?;
    let multi_conn = h.can_multi_conn()?;
    let cache = h.can_cache()?;
    let extents = h.can_extents()?;
    let block_size = match h.block_size()? {
        Some(bs) => Some(bs.validate()?),
        None => None,
    };
    let description = h.export_description()?;
    // FUA emulation needs a flush; without one the plugin cannot promise durability.
    let fua = if fua == Support::Emulate && !flush {
        Support::None
    } else {
        fua
    };
    Ok(Caps {
        size,
        writable,
        flush,
        rotational,
        trim,
        zero,
        fast_zero,
        fua,
        multi_conn,
        cache,
        extents,
        block_size,
        description,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extents::{EXTENT_HOLE, EXTENT_ZERO};
    use crate::plugin::Plugin;

    /// A RAM disk that records every call with its flags, with selectable capabilities.
    struct Recorder {
        fua: Support,
        zero: Support,
        fast_zero: bool,
        cache: Support,
        extents: bool,
        zero_fails_enotsup: bool,
        /// Offers asynchronous submission (answered at once, from the submitting thread).
        aio: bool,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl Default for Recorder {
        fn default() -> Self {
            Recorder {
                fua: Support::Native,
                zero: Support::Native,
                fast_zero: true,
                cache: Support::Native,
                extents: true,
                zero_fails_enotsup: false,
                aio: false,
                log: Arc::default(),
            }
        }
    }

    struct RecHandle {
        cfg: Arc<Recorder>,
        data: Mutex<Vec<u8>>,
    }

    impl Plugin for Arc<Recorder> {
        fn name(&self) -> &str {
            "recorder"
        }
        fn open(&self, _ctx: &OpenContext<'_>) -> Result<Box<dyn Handle>> {
            Ok(Box::new(RecHandle {
                cfg: self.clone(),
                data: Mutex::new(vec![0xff; 4 << 20]),
            }))
        }
    }

    impl RecHandle {
        fn log(&self, s: String) {
            self.cfg.log.lock().unwrap().push(s);
        }
    }

    impl Handle for RecHandle {
        fn get_size(&self) -> Result<u64> {
            Ok(4 << 20)
        }
        fn can_write(&self) -> Result<bool> {
            Ok(true)
        }
        fn can_flush(&self) -> Result<bool> {
            Ok(true)
        }
        fn can_trim(&self) -> Result<bool> {
            Ok(true)
        }
        fn can_zero(&self) -> Result<Support> {
            Ok(self.cfg.zero)
        }
        fn can_fast_zero(&self) -> Result<bool> {
            Ok(self.cfg.fast_zero)
        }
        fn can_fua(&self) -> Result<Support> {
            Ok(self.cfg.fua)
        }
        fn can_cache(&self) -> Result<Support> {
            Ok(self.cfg.cache)
        }
        fn can_extents(&self) -> Result<bool> {
            Ok(self.cfg.extents)
        }
        fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
            self.log(format!("pread {} {offset} {:#x}", buf.len(), flags.0));
            let d = self.data.lock().unwrap();
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
            self.log(format!("pwrite {} {offset} {:#x}", buf.len(), flags.0));
            let mut d = self.data.lock().unwrap();
            d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self, flags: Flags) -> Result<()> {
            self.log(format!("flush {:#x}", flags.0));
            Ok(())
        }
        fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
            self.log(format!("trim {count} {offset} {:#x}", flags.0));
            Ok(())
        }
        fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
            self.log(format!("zero {count} {offset} {:#x}", flags.0));
            if self.cfg.zero_fails_enotsup {
                return Err(BlockError::errno(Errno::ENOTSUP));
            }
            let mut d = self.data.lock().unwrap();
            d[offset as usize..(offset + count) as usize].fill(0);
            Ok(())
        }
        fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
            self.log(format!("cache {count} {offset} {:#x}", flags.0));
            Ok(())
        }
        fn aio(&self) -> Option<&dyn crate::aio::AioHandle> {
            self.cfg.aio.then_some(self as &dyn crate::aio::AioHandle)
        }
        fn extents(&self, count: u64, offset: u64, _f: Flags, e: &mut Extents) -> Result<()> {
            e.add(offset, count / 2, 0)?;
            e.add(
                offset + count / 2,
                count - count / 2,
                EXTENT_HOLE | EXTENT_ZERO,
            )
        }
    }

    impl crate::aio::AioHandle for RecHandle {
        fn can_submit(&self, _req: &AioRequest) -> bool {
            true
        }
        fn submit(
            &self,
            req: &AioRequest,
            buf: Vec<u8>,
            sink: &Arc<dyn AioSink>,
            tag: usize,
        ) -> std::result::Result<(), Declined> {
            self.log(format!(
                "submit {:?} {} {} {:#x}",
                req.kind, req.count, req.offset, req.flags.0
            ));
            sink.complete(tag, buf, Ok(()));
            Ok(())
        }
    }

    /// Counts completions.
    #[derive(Default)]
    struct Sink(Mutex<Vec<usize>>);

    impl AioSink for Sink {
        fn complete(&self, tag: usize, _buf: Vec<u8>, result: Result<()>) {
            assert!(result.is_ok());
            self.0.lock().unwrap().push(tag);
        }
    }

    fn aio(kind: AioKind, count: u64, offset: u64, flags: Flags) -> AioRequest {
        AioRequest {
            kind,
            offset,
            count,
            at: 0,
            flags,
        }
    }

    /// True if `e` took `req` asynchronously, false if it declined it to the synchronous path.
    fn submitted(e: &Export, req: AioRequest) -> bool {
        let sink: Arc<dyn AioSink> = Arc::new(Sink::default());
        match e.submit(&req, vec![0; req.count as usize], &sink, 7) {
            Ok(()) => true,
            Err(Declined::Sync(buf)) => {
                assert_eq!(buf.len(), req.count as usize, "the buffer comes back");
                false
            }
            Err(Declined::Failed(_, err)) => panic!("submission failed: {err}"),
        }
    }

    #[test]
    fn submit_takes_requests_that_need_only_the_plugin() {
        let (e, log) = open(
            Recorder {
                aio: true,
                ..Recorder::default()
            },
            false,
        );
        assert!(e.is_async());
        assert!(submitted(&e, aio(AioKind::Read, 512, 0, Flags::NONE)));
        assert!(submitted(&e, aio(AioKind::Write, 512, 512, Flags::FUA)));
        assert!(submitted(&e, aio(AioKind::Flush, 0, 0, Flags::NONE)));
        assert!(submitted(&e, aio(AioKind::Trim, 512, 0, Flags::FUA)));
        let zero = Flags::MAY_TRIM | Flags::FAST_ZERO;
        assert!(submitted(&e, aio(AioKind::Zero, 512, 0, zero)));
        assert_eq!(
            calls(&log),
            [
                "submit Read 512 0 0x0",
                "submit Write 512 512 0x2",
                "submit Flush 0 0 0x0",
                "submit Trim 512 0 0x2",
                "submit Zero 512 0 0x9"
            ]
        );
    }

    #[test]
    fn submit_declines_what_the_policy_must_check_or_finish() {
        let (e, log) = open(
            Recorder {
                aio: true,
                fua: Support::Emulate,
                zero: Support::Emulate,
                fast_zero: false,
                ..Recorder::default()
            },
            false,
        );
        let size = e.size();
        // Emulated FUA needs a flush after the write; zero by writes; a range error.
        assert!(!submitted(&e, aio(AioKind::Write, 512, 0, Flags::FUA)));
        assert!(!submitted(&e, aio(AioKind::Zero, 512, 0, Flags::MAY_TRIM)));
        assert!(!submitted(&e, aio(AioKind::Read, 512, size, Flags::NONE)));
        assert!(!submitted(&e, aio(AioKind::Read, 0, 0, Flags::NONE)));
        assert!(submitted(&e, aio(AioKind::Write, 512, 0, Flags::NONE)));
        assert_eq!(calls(&log), ["submit Write 512 0 0x0"]);
        // Read-only: writes go the synchronous way, which refuses them.
        let (ro, log) = open(
            Recorder {
                aio: true,
                ..Recorder::default()
            },
            true,
        );
        assert!(!submitted(&ro, aio(AioKind::Write, 512, 0, Flags::NONE)));
        assert!(!submitted(&ro, aio(AioKind::Trim, 512, 0, Flags::NONE)));
        assert!(submitted(&ro, aio(AioKind::Read, 512, 0, Flags::NONE)));
        assert_eq!(calls(&log), ["submit Read 512 0 0x0"]);
        // A handle without the capability.
        let (sync, _) = open(Recorder::default(), false);
        assert!(!sync.is_async());
        assert!(!submitted(&sync, aio(AioKind::Read, 512, 0, Flags::NONE)));
    }

    fn open(cfg: Recorder, readonly: bool) -> (Export, Arc<Mutex<Vec<String>>>) {
        let cfg = Arc::new(cfg);
        let log = cfg.log.clone();
        let backend = Backend::new(Arc::new(cfg));
        let ctx = OpenContext {
            readonly,
            export_name: "",
            is_tls: false,
        };
        (Export::open(&backend, &ctx).unwrap(), log)
    }

    fn calls(log: &Arc<Mutex<Vec<String>>>) -> Vec<String> {
        std::mem::take(&mut *log.lock().unwrap())
    }

    #[test]
    fn write_fua_native_passes_flag_without_flush() {
        let (e, log) = open(Recorder::default(), false);
        e.write(&[1; 512], 0, Flags::FUA).unwrap();
        assert_eq!(calls(&log), ["pwrite 512 0 0x2"]);
    }

    #[test]
    fn write_fua_emulate_clears_flag_and_flushes_after() {
        let (e, log) = open(
            Recorder {
                fua: Support::Emulate,
                ..Recorder::default()
            },
            false,
        );
        e.write(&[1; 512], 0, Flags::FUA).unwrap();
        e.zero(512, 0, Flags::FUA | Flags::MAY_TRIM).unwrap();
        e.trim(512, 0, Flags::FUA).unwrap();
        assert_eq!(
            calls(&log),
            [
                "pwrite 512 0 0x0",
                "flush 0x0",
                "zero 512 0 0x1",
                "flush 0x0",
                "trim 512 0 0x0",
                "flush 0x0"
            ]
        );
    }

    #[test]
    fn zero_native_passes_fua_and_may_trim_and_fast_zero() {
        let (e, log) = open(Recorder::default(), false);
        e.zero(512, 0, Flags::FUA | Flags::MAY_TRIM).unwrap();
        e.zero(512, 0, Flags::FAST_ZERO | Flags::MAY_TRIM).unwrap();
        assert_eq!(calls(&log), ["zero 512 0 0x3", "zero 512 0 0x9"]);
    }

    #[test]
    fn write_fua_none_is_refused_with_einval() {
        let (e, log) = open(
            Recorder {
                fua: Support::None,
                ..Recorder::default()
            },
            false,
        );
        assert_eq!(e.caps().transmission_flags() & nbd::NBD_FLAG_SEND_FUA, 0);
        let err = e.write(&[1; 512], 0, Flags::FUA).unwrap_err();
        assert_eq!(err.errno, Errno::EINVAL);
        assert!(calls(&log).is_empty());
    }

    #[test]
    fn zero_emulate_writes_zeroes_in_chunks_and_fast_zero_fails_at_once() {
        let (e, log) = open(
            Recorder {
                zero: Support::Emulate,
                ..Recorder::default()
            },
            false,
        );
        let err = e.zero(4096, 0, Flags::FAST_ZERO).unwrap_err();
        assert_eq!(err.errno, Errno::ENOTSUP);
        assert_eq!(err.nbd_error(true, false), nbd::NBD_ENOTSUP);
        assert!(calls(&log).is_empty());
        let n = ZERO_CHUNK as u64 + 512;
        e.zero(n, 1024, Flags::MAY_TRIM).unwrap();
        assert_eq!(
            calls(&log),
            [
                format!("pwrite {ZERO_CHUNK} 1024 0x0"),
                format!("pwrite 512 {} 0x0", 1024 + ZERO_CHUNK)
            ]
        );
        let mut buf = vec![1u8; n as usize];
        e.read(&mut buf, 1024).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn zero_native_enotsup_falls_back_to_writes_but_not_for_fast_zero() {
        let (e, log) = open(
            Recorder {
                zero_fails_enotsup: true,
                ..Recorder::default()
            },
            false,
        );
        e.zero(512, 0, Flags::MAY_TRIM | Flags::FUA).unwrap();
        assert_eq!(calls(&log), ["zero 512 0 0x3", "pwrite 512 0 0x2"]);
        let err = e.zero(512, 0, Flags::FAST_ZERO).unwrap_err();
        assert_eq!(err.errno, Errno::ENOTSUP);
        assert_eq!(calls(&log), ["zero 512 0 0x8"]);
    }

    #[test]
    fn fast_zero_not_offered_is_einval() {
        let (e, _log) = open(
            Recorder {
                fast_zero: false,
                ..Recorder::default()
            },
            false,
        );
        assert_eq!(
            e.caps().transmission_flags() & nbd::NBD_FLAG_SEND_FAST_ZERO,
            0
        );
        let err = e.zero(512, 0, Flags::FAST_ZERO).unwrap_err();
        assert_eq!(err.errno, Errno::EINVAL);
    }

    #[test]
    fn cache_emulate_reads_and_native_calls_plugin() {
        let (e, log) = open(
            Recorder {
                cache: Support::Emulate,
                ..Recorder::default()
            },
            false,
        );
        e.cache(4096, 512).unwrap();
        assert_eq!(calls(&log), ["pread 4096 512 0x0"]);
        let (e, log) = open(Recorder::default(), false);
        e.cache(4096, 512).unwrap();
        assert_eq!(calls(&log), ["cache 4096 512 0x0"]);
    }

    #[test]
    fn request_beyond_end_is_einval_without_calling_plugin() {
        let (e, log) = open(Recorder::default(), false);
        let mut buf = [0u8; 512];
        assert_eq!(
            e.read(&mut buf, (4 << 20) - 511).unwrap_err().errno,
            Errno::EINVAL
        );
        assert_eq!(
            e.trim(1, u64::MAX, Flags::NONE).unwrap_err().errno,
            Errno::EINVAL
        );
        assert_eq!(e.read(&mut [], 0).unwrap_err().errno, Errno::EINVAL);
        assert!(calls(&log).is_empty());
    }

    #[test]
    fn readonly_export_refuses_writes_with_eperm() {
        let (e, log) = open(Recorder::default(), true);
        let f = e.caps().transmission_flags();
        assert_ne!(f & nbd::NBD_FLAG_READ_ONLY, 0);
        assert_eq!(
            f & (nbd::NBD_FLAG_SEND_TRIM | nbd::NBD_FLAG_SEND_WRITE_ZEROES),
            0
        );
        assert_eq!(
            e.write(&[0; 1], 0, Flags::NONE).unwrap_err().errno,
            Errno::EPERM
        );
        assert_eq!(e.zero(1, 0, Flags::NONE).unwrap_err().errno, Errno::EPERM);
        assert!(calls(&log).is_empty());
    }

    #[test]
    fn extents_req_one_keeps_first_and_absent_extents_are_data() {
        let (e, _log) = open(Recorder::default(), false);
        let ext = e.extents(4096, 0, Flags::NONE).unwrap();
        assert_eq!(ext.as_slice().len(), 2);
        let ext = e.extents(4096, 0, Flags::REQ_ONE).unwrap();
        assert_eq!(
            ext.as_slice(),
            &[crate::Extent {
                offset: 0,
                length: 2048,
                kind: 0
            }]
        );
        let (e, _log) = open(
            Recorder {
                extents: false,
                ..Recorder::default()
            },
            false,
        );
        let ext = e.extents(4096, 512, Flags::NONE).unwrap();
        assert_eq!(
            ext.as_slice(),
            &[crate::Extent {
                offset: 512,
                length: 4096,
                kind: 0
            }]
        );
    }

    #[test]
    fn allocation_depth_default_derives_from_extents() {
        let (e, _log) = open(Recorder::default(), false);
        let ext = e.allocation_depth(4096, 0, Flags::NONE).unwrap();
        assert_eq!(
            ext.as_slice(),
            &[
                crate::Extent {
                    offset: 0,
                    length: 2048,
                    kind: 1
                },
                crate::Extent {
                    offset: 2048,
                    length: 2048,
                    kind: 0
                }
            ]
        );
    }
}
