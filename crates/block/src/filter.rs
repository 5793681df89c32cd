//! The filter layer: code that sits between the export policy and a plugin, sees every call
//! on its way down, and may change it (nbdkit's filters, nbdkit-filter(3)).
//!
//! It owns four things:
//!
//! - [`Filter`], the trait a filter implements. It has one method per [`Plugin`] and
//!   [`Handle`] method, and each receives the layer below and **passes straight through to it
//!   by default**. A filter writes only the methods it changes; a method it does not write
//!   forwards, so forgetting one can never answer a silent default (the trouble with
//!   hand-written wrappers of [`Handle`], whose own defaults answer "no" or "EINVAL").
//! - [`Next`], the layer below as one connection of a filter sees it: a [`Handle`] that a
//!   filter calls like any other, which can also be reopened or shared.
//! - [`Filtered`], the one adapter: a filter over the layer below *is* a [`Plugin`]. Stacking
//!   is nesting (`Filtered<A>` over `Filtered<B>` over the plugin), so the server, the export
//!   policy ([`crate::export`]) and the daemon see an ordinary plugin, and every capability is
//!   asked through the whole stack: a filter that answers `can_fua() = None` or
//!   `can_multi_conn() = false` changes what the export advertises, with no second path.
//! - [`Stack`], a builder that pushes filters over a plugin.
//!
//! The adapter is the single place that maps [`Plugin`]/[`Handle`] onto [`Filter`]; its impls
//! (and [`Next`]'s) deny `clippy::missing_trait_methods`, so a method added to either trait
//! fails `cargo clippy` here until it is forwarded, instead of compiling into a default.
//!
//! A filter is configured by its constructor, as the built-in plugins are by theirs
//! (`from_args`): [`Plugin`] has no config, get_ready or after_fork step, so neither has
//! [`Filter`]. The stack's [`Plugin::name`] stays the plugin's; [`Filter::name`] names the
//! filter itself.
//!
//! # Per-export and per-connection state
//!
//! A filter value belongs to one stack, and each export gets its own stack (the daemon builds
//! one per `block-export-add`; `sluice serve` one for its plugin), so `&self` is the
//! per-export state (a cow overlay, a cache, stats counters, a rate bucket shared by all
//! clients). Per-connection state is the filter's associated type [`Filter::Conn`], built by
//! [`Filter::open`] as in nbdkit: `open` receives the layer below and the client's
//! [`OpenContext`], opens the layer below itself with [`Next::open`] (possibly with another
//! context: `readonly: true` under a writable cow layer, another export name), may then
//! use it at once (read a partition table, ask the size, cache the capabilities it will need on
//! every request: what nbdkit does in `.prepare`) and returns its `Conn` together with the
//! `Next`. Every later call on the connection gets `(&self, &conn, &next)`. When the client's
//! handle is dropped, [`Filter::close`] runs with the layer below still open (nbdkit's
//! `.finalize`, outermost filter first), then the layer below is closed.
//!
//! A filter that must replace the layer below mid-connection (nbdkit's retry filter) opens it
//! with [`Next::open_reopenable`] and calls [`Next::reopen`]; the methods it does not override
//! then reach the new handle too, because the swap happens inside `Next`. A filter that shares
//! one handle of the layer below between connections (nbdkit's openonce) or that must reach
//! other connections (multi-conn emulation flushing every connection) builds its `Next` with
//! [`Next::from_handle`] or keeps [`Next::handle`] in its per-export state.
//!
//! Capabilities are asked once per connection, by [`crate::export::Export::open`], from the top
//! of the stack; each layer answers from the one below or overrides. Nothing caches per
//! layer: a filter that needs the layer below's answer on every request (retry checking
//! `can_write`, blocksize checking `can_fua`) asks in `open` and keeps it in its `Conn`.
//!
//! The thread model of a stack is the strictest of its filters' and its plugin's: a filter
//! states what *it* needs ([`Filter::thread_model`], parallel by default) and the adapter takes
//! the minimum, so a filter can tighten the model but never relax it (nbdkit silently ignores a
//! relaxation; here it cannot be written). `may_block` is likewise or-ed down the stack, and so
//! is `must_see_every_read` (a layer that counts, logs, delays or fails reads turns off the
//! server's hole shortcut).
//!
//! # The request path
//!
//! A pass-through layer costs one virtual call and nothing else: the export policy calls the
//! top `Box<dyn Handle>`, the adapter calls its filter's method statically (it is generic over
//! the filter, so a default method inlines into a plain call on `Next`), and `Next` calls the
//! layer below through its `dyn Handle` after one well-predicted branch (fixed or
//! reopenable). No allocation, no lock, no reference count is touched per request. Only a
//! `Next` opened as reopenable takes a read lock per call (uncontended unless a reopen is
//! under way), and only for the filter that asked for it.
//!
//! A filter that moves offsets must override every ranged method: `pread`, `pwrite`, `trim`,
//! `zero`, `cache`, `extents` and `allocation_depth`; one that changes the size overrides
//! `get_size`. Forwarding is the safe default only for what the filter does not change.
//!
//! One method is the exception: [`Filter::file_range`] (where a read's bytes lie in a file, so
//! that the server can splice them to the socket) answers `None` unless a filter says
//! otherwise, because a read answered from a file never reaches the filter's `pread`: a
//! filter that forgot to turn it off would be passed by, unseen. Filters that only change
//! capabilities forward it; cow and cache answer it from their own state.

use std::sync::{Arc, PoisonError, RwLock};

use crate::aio::AioHandle;
use crate::error::{BlockError, Errno, Result};
use crate::extents::Extents;
use crate::plugin::{
    BlockSize, ConnectionInfo, ExportEntry, FileRange, Flags, Handle, OpenContext, Plugin, Support,
    ThreadModel,
};

/// A filter: a layer over a plugin (or over another filter) that may change any call.
///
/// Every method but [`Filter::name`] and [`Filter::open`] has a default that forwards to the
/// layer below unchanged; override only what the filter changes. Plugin-level methods receive
/// the plugin below (`next: &dyn Plugin`); connection-level methods receive the filter's
/// per-connection state and the layer below as the connection opened it (`next: &Next`).
/// See the module doc for the per-export and per-connection model.
pub trait Filter: Send + Sync + 'static {
    /// Per-connection state, built by [`Filter::open`] (`()` for a filter without any).
    type Conn: Send + Sync + 'static;

    /// The filter's own name (`cow`, `offset`, ...), for logs. The stack's
    /// [`Plugin::name`] stays the plugin's.
    fn name(&self) -> &str;

    /// The plugin's version string (`--dump-plugin`).
    fn version<'a>(&'a self, next: &'a dyn Plugin) -> Option<&'a str> {
        next.version()
    }

    /// The concurrency *this filter* tolerates. The stack runs at the strictest of this and
    /// the layer below, so the default (parallel) leaves the plugin's model unchanged.
    fn thread_model(&self) -> ThreadModel {
        ThreadModel::Parallel
    }

    /// Whether *this filter's* code may block for long (a delay, a rate limit). Or-ed with
    /// the layer below.
    fn may_block(&self) -> bool {
        false
    }

    /// Whether *this filter* must see every read (it counts, logs, delays, limits or fails
    /// them: [`Plugin::must_see_every_read`]). Or-ed with the layer below.
    fn must_see_every_read(&self) -> bool {
        false
    }

    /// Called for every new connection before negotiation; an error refuses the client.
    fn preconnect(&self, next: &dyn Plugin, readonly: bool) -> Result<()> {
        next.preconnect(readonly)
    }

    /// The export name used when the client asks for "".
    fn default_export(&self, next: &dyn Plugin, readonly: bool, is_tls: bool) -> Result<String> {
        next.default_export(readonly, is_tls)
    }

    /// Exports listed by NBD_OPT_LIST.
    fn list_exports(
        &self,
        next: &dyn Plugin,
        readonly: bool,
        is_tls: bool,
    ) -> Result<Vec<ExportEntry>> {
        next.list_exports(readonly, is_tls)
    }

    /// Runs a whole client connection `f` (see [`Plugin::with_connection`]). A filter that
    /// must see connections come and go wraps the call; it must call the layer below once.
    fn with_connection(&self, next: &dyn Plugin, info: &ConnectionInfo, f: &mut dyn FnMut()) {
        next.with_connection(info, f)
    }

    /// Opens one connection: opens the layer below (normally `Next::open(next, ctx)`, possibly
    /// with a changed context) and builds the per-connection state. Required, because only
    /// the filter knows how to build its `Conn`; an error refuses the client.
    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<(Self::Conn, Next)>;

    /// The connection's handle is being dropped; the layer below is still open (nbdkit's
    /// `.finalize`). Runs outermost filter first. Nothing to do by default.
    fn close(&self, _conn: &mut Self::Conn, _next: &Next) {}

    /// True if the stack should offer `qemu:allocation-depth`.
    fn has_allocation_depth(&self, next: &dyn Plugin) -> bool {
        next.has_allocation_depth()
    }

    /// Lines `key=value` for `--dump-plugin`.
    fn dump(&self, next: &dyn Plugin) -> Vec<String> {
        next.dump()
    }

    /// Size of the export in bytes.
    fn get_size(&self, _conn: &Self::Conn, next: &Next) -> Result<u64> {
        next.get_size()
    }
    fn export_description(&self, _conn: &Self::Conn, next: &Next) -> Result<Option<String>> {
        next.export_description()
    }
    fn block_size(&self, _conn: &Self::Conn, next: &Next) -> Result<Option<BlockSize>> {
        next.block_size()
    }
    fn can_write(&self, _conn: &Self::Conn, next: &Next) -> Result<bool> {
        next.can_write()
    }
    fn can_flush(&self, _conn: &Self::Conn, next: &Next) -> Result<bool> {
        next.can_flush()
    }
    fn is_rotational(&self, _conn: &Self::Conn, next: &Next) -> Result<bool> {
        next.is_rotational()
    }
    fn can_trim(&self, _conn: &Self::Conn, next: &Next) -> Result<bool> {
        next.can_trim()
    }
    /// `Support::None` hides WRITE_ZEROES entirely, as only nbdkit filters can.
    fn can_zero(&self, _conn: &Self::Conn, next: &Next) -> Result<Support> {
        next.can_zero()
    }
    fn can_fast_zero(&self, _conn: &Self::Conn, next: &Next) -> Result<bool> {
        next.can_fast_zero()
    }
    fn can_fua(&self, _conn: &Self::Conn, next: &Next) -> Result<Support> {
        next.can_fua()
    }
    fn can_multi_conn(&self, _conn: &Self::Conn, next: &Next) -> Result<bool> {
        next.can_multi_conn()
    }
    fn can_cache(&self, _conn: &Self::Conn, next: &Next) -> Result<Support> {
        next.can_cache()
    }
    fn can_extents(&self, _conn: &Self::Conn, next: &Next) -> Result<bool> {
        next.can_extents()
    }

    fn pread(
        &self,
        _conn: &Self::Conn,
        next: &Next,
        buf: &mut [u8],
        offset: u64,
        flags: Flags,
    ) -> Result<()> {
        next.pread(buf, offset, flags)
    }
    fn pwrite(
        &self,
        _conn: &Self::Conn,
        next: &Next,
        buf: &[u8],
        offset: u64,
        flags: Flags,
    ) -> Result<()> {
        next.pwrite(buf, offset, flags)
    }
    fn flush(&self, _conn: &Self::Conn, next: &Next, flags: Flags) -> Result<()> {
        next.flush(flags)
    }
    fn trim(
        &self,
        _conn: &Self::Conn,
        next: &Next,
        count: u64,
        offset: u64,
        flags: Flags,
    ) -> Result<()> {
        next.trim(count, offset, flags)
    }
    fn zero(
        &self,
        _conn: &Self::Conn,
        next: &Next,
        count: u64,
        offset: u64,
        flags: Flags,
    ) -> Result<()> {
        next.zero(count, offset, flags)
    }
    fn cache(
        &self,
        _conn: &Self::Conn,
        next: &Next,
        count: u64,
        offset: u64,
        flags: Flags,
    ) -> Result<()> {
        next.cache(count, offset, flags)
    }
    fn extents(
        &self,
        _conn: &Self::Conn,
        next: &Next,
        count: u64,
        offset: u64,
        flags: Flags,
        extents: &mut Extents,
    ) -> Result<()> {
        next.extents(count, offset, flags, extents)
    }
    fn allocation_depth(
        &self,
        _conn: &Self::Conn,
        next: &Next,
        count: u64,
        offset: u64,
        out: &mut Extents,
    ) -> Result<()> {
        next.allocation_depth(count, offset, out)
    }
    /// True for a filter whose `pread` is the layer below's and that need not see reads: its
    /// [`Filter::file_range`] then forwards. False by default (see there).
    const READS_PASS_THROUGH: bool = false;
    /// Where the bytes of `[offset, offset+count)` are stored in a file
    /// ([`Handle::file_range`]). **The one method that does not forward by default**: a read
    /// answered from a file range never reaches [`Filter::pread`], so a filter that changes,
    /// moves, counts, logs, delays or fails reads would be passed by. A filter whose `pread`
    /// is the layer below's, and that need not see reads, sets
    /// [`Filter::READS_PASS_THROUGH`]; a filter that keeps data in a file of its own may
    /// answer with that file.
    fn file_range<'a>(
        &'a self,
        _conn: &'a Self::Conn,
        next: &'a Next,
        count: u64,
        offset: u64,
    ) -> Option<FileRange<'a>> {
        if Self::READS_PASS_THROUGH {
            next.file_range(count, offset)
        } else {
            None
        }
    }
}

/// The layer below one connection of a filter. It is a [`Handle`]: call it as the plugin.
pub struct Next {
    plugin: Arc<dyn Plugin>,
    slot: Slot,
}

enum Slot {
    /// The common case: the handle never changes, so calls take no lock.
    Fixed(Arc<dyn Handle>),
    /// Opened with [`Next::open_reopenable`]. `None` after a reopen whose open failed.
    Reopenable(RwLock<Option<Arc<dyn Handle>>>),
}

impl Next {
    /// Opens the layer below for one connection.
    pub fn open(plugin: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<Next> {
        Ok(Next {
            plugin: plugin.clone(),
            slot: Slot::Fixed(Arc::from(plugin.open(ctx)?)),
        })
    }

    /// Opens the layer below so that [`Next::reopen`] can replace it later. Every call then
    /// takes a read lock (uncontended but for a reopen), so only filters that reopen use this.
    pub fn open_reopenable(plugin: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<Next> {
        Ok(Next {
            plugin: plugin.clone(),
            slot: Slot::Reopenable(RwLock::new(Some(Arc::from(plugin.open(ctx)?)))),
        })
    }

    /// A `Next` over a handle of `plugin` that the filter opened or shares itself (one handle
    /// for every connection, as nbdkit's openonce filter does).
    pub fn from_handle(plugin: &Arc<dyn Plugin>, handle: Arc<dyn Handle>) -> Next {
        Next {
            plugin: plugin.clone(),
            slot: Slot::Fixed(handle),
        }
    }

    /// The plugin (or filter stack) below, to open further handles of it.
    pub fn plugin(&self) -> &Arc<dyn Plugin> {
        &self.plugin
    }

    /// The current handle of the layer below, to keep (a multi-conn filter that flushes every
    /// connection keeps a `Weak` of each).
    pub fn handle(&self) -> Result<Arc<dyn Handle>> {
        self.with(|h| Ok(h.clone()))
    }

    /// Closes the handle of the layer below and opens a new one with `ctx` (nbdkit's retry
    /// filter): the old handle is dropped first, as nbdkit closes before it reopens. Calls in
    /// flight on this connection finish on the old handle first. If the open fails, every
    /// call fails with ESHUTDOWN until a later reopen succeeds.
    pub fn reopen(&self, ctx: &OpenContext<'_>) -> Result<()> {
        let Slot::Reopenable(slot) = &self.slot else {
            return Err(BlockError::new(
                Errno::EINVAL,
                "reopen: the layer below was not opened with Next::open_reopenable",
            ));
        };
        let mut slot = slot.write().unwrap_or_else(PoisonError::into_inner);
        *slot = None;
        *slot = Some(Arc::from(self.plugin.open(ctx)?));
        Ok(())
    }

    #[inline]
    fn with<R>(&self, f: impl FnOnce(&Arc<dyn Handle>) -> Result<R>) -> Result<R> {
        match &self.slot {
            Slot::Fixed(h) => f(h),
            Slot::Reopenable(slot) => match &*slot.read().unwrap_or_else(PoisonError::into_inner) {
                Some(h) => f(h),
                None => Err(BlockError::new(
                    Errno::ESHUTDOWN,
                    "the layer below is closed: reopening it failed",
                )),
            },
        }
    }
}

#[deny(clippy::missing_trait_methods)]
impl Handle for Next {
    fn get_size(&self) -> Result<u64> {
        self.with(|h| h.get_size())
    }
    fn export_description(&self) -> Result<Option<String>> {
        self.with(|h| h.export_description())
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        self.with(|h| h.block_size())
    }
    fn can_write(&self) -> Result<bool> {
        self.with(|h| h.can_write())
    }
    fn can_flush(&self) -> Result<bool> {
        self.with(|h| h.can_flush())
    }
    fn is_rotational(&self) -> Result<bool> {
        self.with(|h| h.is_rotational())
    }
    fn can_trim(&self) -> Result<bool> {
        self.with(|h| h.can_trim())
    }
    fn can_zero(&self) -> Result<Support> {
        self.with(|h| h.can_zero())
    }
    fn can_fast_zero(&self) -> Result<bool> {
        self.with(|h| h.can_fast_zero())
    }
    fn can_fua(&self) -> Result<Support> {
        self.with(|h| h.can_fua())
    }
    fn can_multi_conn(&self) -> Result<bool> {
        self.with(|h| h.can_multi_conn())
    }
    fn can_cache(&self) -> Result<Support> {
        self.with(|h| h.can_cache())
    }
    fn can_extents(&self) -> Result<bool> {
        self.with(|h| h.can_extents())
    }
    fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        self.with(|h| h.pread(buf, offset, flags))
    }
    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.with(|h| h.pwrite(buf, offset, flags))
    }
    fn flush(&self, flags: Flags) -> Result<()> {
        self.with(|h| h.flush(flags))
    }
    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.with(|h| h.trim(count, offset, flags))
    }
    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.with(|h| h.zero(count, offset, flags))
    }
    fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.with(|h| h.cache(count, offset, flags))
    }
    fn aio(&self) -> Option<&dyn AioHandle> {
        // Only a fixed layer below can lend its submission out: a reopenable one may be
        // swapped, and its lock is not held across an asynchronous request.
        match &self.slot {
            Slot::Fixed(h) => h.aio(),
            Slot::Reopenable(_) => None,
        }
    }
    fn file_range(&self, count: u64, offset: u64) -> Option<FileRange<'_>> {
        // As for aio: a reopenable layer's handle may be swapped (and closed) while the
        // caller still reads the file.
        match &self.slot {
            Slot::Fixed(h) => h.file_range(count, offset),
            Slot::Reopenable(_) => None,
        }
    }
    fn extents(&self, count: u64, offset: u64, flags: Flags, extents: &mut Extents) -> Result<()> {
        self.with(|h| h.extents(count, offset, flags, extents))
    }
    fn allocation_depth(&self, count: u64, offset: u64, out: &mut Extents) -> Result<()> {
        self.with(|h| h.allocation_depth(count, offset, out))
    }
}

/// A filter over the layer below, as a [`Plugin`] (the adapter; see the module doc).
pub struct Filtered<F: Filter> {
    filter: Arc<F>,
    next: Arc<dyn Plugin>,
}

impl<F: Filter> Filtered<F> {
    /// Puts `filter` over `next` (a plugin or another `Filtered`).
    pub fn new(filter: F, next: Arc<dyn Plugin>) -> Filtered<F> {
        Filtered {
            filter: Arc::new(filter),
            next,
        }
    }

    /// The filter (its per-export state).
    pub fn filter(&self) -> &Arc<F> {
        &self.filter
    }

    /// The layer below.
    pub fn next(&self) -> &Arc<dyn Plugin> {
        &self.next
    }
}

#[deny(clippy::missing_trait_methods)]
impl<F: Filter> Plugin for Filtered<F> {
    fn name(&self) -> &str {
        self.next.name()
    }
    fn version(&self) -> Option<&str> {
        self.filter.version(self.next.as_ref())
    }
    fn thread_model(&self) -> ThreadModel {
        self.filter.thread_model().min(self.next.thread_model())
    }
    fn may_block(&self) -> bool {
        self.filter.may_block() || self.next.may_block()
    }
    fn must_see_every_read(&self) -> bool {
        self.filter.must_see_every_read() || self.next.must_see_every_read()
    }
    fn preconnect(&self, readonly: bool) -> Result<()> {
        self.filter.preconnect(self.next.as_ref(), readonly)
    }
    fn default_export(&self, readonly: bool, is_tls: bool) -> Result<String> {
        self.filter
            .default_export(self.next.as_ref(), readonly, is_tls)
    }
    fn list_exports(&self, readonly: bool, is_tls: bool) -> Result<Vec<ExportEntry>> {
        self.filter
            .list_exports(self.next.as_ref(), readonly, is_tls)
    }
    fn with_connection(&self, info: &ConnectionInfo, f: &mut dyn FnMut()) {
        self.filter.with_connection(self.next.as_ref(), info, f)
    }
    fn open(&self, ctx: &OpenContext<'_>) -> Result<Box<dyn Handle>> {
        let (conn, next) = self.filter.open(&self.next, ctx)?;
        Ok(Box::new(FilterHandle {
            filter: self.filter.clone(),
            conn,
            next,
        }))
    }
    fn has_allocation_depth(&self) -> bool {
        self.filter.has_allocation_depth(self.next.as_ref())
    }
    fn dump(&self) -> Vec<String> {
        self.filter.dump(self.next.as_ref())
    }
}

/// One connection of a [`Filtered`]: the filter, its per-connection state, the layer below.
struct FilterHandle<F: Filter> {
    filter: Arc<F>,
    conn: F::Conn,
    next: Next,
}

impl<F: Filter> Drop for FilterHandle<F> {
    fn drop(&mut self) {
        // Before the fields drop: the filter finalizes with the layer below still open.
        self.filter.close(&mut self.conn, &self.next);
    }
}

#[deny(clippy::missing_trait_methods)]
impl<F: Filter> Handle for FilterHandle<F> {
    fn get_size(&self) -> Result<u64> {
        self.filter.get_size(&self.conn, &self.next)
    }
    fn export_description(&self) -> Result<Option<String>> {
        self.filter.export_description(&self.conn, &self.next)
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        self.filter.block_size(&self.conn, &self.next)
    }
    fn can_write(&self) -> Result<bool> {
        self.filter.can_write(&self.conn, &self.next)
    }
    fn can_flush(&self) -> Result<bool> {
        self.filter.can_flush(&self.conn, &self.next)
    }
    fn is_rotational(&self) -> Result<bool> {
        self.filter.is_rotational(&self.conn, &self.next)
    }
    fn can_trim(&self) -> Result<bool> {
        self.filter.can_trim(&self.conn, &self.next)
    }
    fn can_zero(&self) -> Result<Support> {
        self.filter.can_zero(&self.conn, &self.next)
    }
    fn can_fast_zero(&self) -> Result<bool> {
        self.filter.can_fast_zero(&self.conn, &self.next)
    }
    fn can_fua(&self) -> Result<Support> {
        self.filter.can_fua(&self.conn, &self.next)
    }
    fn can_multi_conn(&self) -> Result<bool> {
        self.filter.can_multi_conn(&self.conn, &self.next)
    }
    fn can_cache(&self) -> Result<Support> {
        self.filter.can_cache(&self.conn, &self.next)
    }
    fn can_extents(&self) -> Result<bool> {
        self.filter.can_extents(&self.conn, &self.next)
    }
    fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        self.filter
            .pread(&self.conn, &self.next, buf, offset, flags)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.filter
            .pwrite(&self.conn, &self.next, buf, offset, flags)
    }
    fn flush(&self, flags: Flags) -> Result<()> {
        self.filter.flush(&self.conn, &self.next, flags)
    }
    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.filter
            .trim(&self.conn, &self.next, count, offset, flags)
    }
    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.filter
            .zero(&self.conn, &self.next, count, offset, flags)
    }
    fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.filter
            .cache(&self.conn, &self.next, count, offset, flags)
    }
    fn aio(&self) -> Option<&dyn AioHandle> {
        // A filter sees every call; a request submitted to the layer below would pass it by.
        // A filtered stack therefore runs every request synchronously, through the filter.
        None
    }
    fn file_range(&self, count: u64, offset: u64) -> Option<FileRange<'_>> {
        self.filter
            .file_range(&self.conn, &self.next, count, offset)
    }
    fn extents(&self, count: u64, offset: u64, flags: Flags, extents: &mut Extents) -> Result<()> {
        self.filter
            .extents(&self.conn, &self.next, count, offset, flags, extents)
    }
    fn allocation_depth(&self, count: u64, offset: u64, out: &mut Extents) -> Result<()> {
        self.filter
            .allocation_depth(&self.conn, &self.next, count, offset, out)
    }
}

/// Builds a stack of filters over a plugin.
///
/// Each [`Stack::push`] puts a filter on top, over everything pushed before: requests reach
/// the last one pushed first. `Stack::new(p).push(a).push(b)` is nbdkit's
/// `nbdkit --filter=b --filter=a p`.
pub struct Stack {
    top: Arc<dyn Plugin>,
}

impl Stack {
    /// A stack with no filter yet: just `plugin`.
    pub fn new(plugin: Arc<dyn Plugin>) -> Stack {
        Stack { top: plugin }
    }

    /// Puts `filter` on top of the stack.
    pub fn push<F: Filter>(self, filter: F) -> Stack {
        Stack {
            top: Arc::new(Filtered::new(filter, self.top)),
        }
    }

    /// The stack as a plugin, to give to a [`crate::export::Backend`].
    pub fn into_plugin(self) -> Arc<dyn Plugin> {
        self.top
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::{Mutex, OnceLock};

    use sluice_proto::nbd::consts as nbd;

    use super::*;
    use crate::export::{Backend, Export};
    use crate::extents::{Extent, EXTENT_HOLE, EXTENT_ZERO};
    use crate::plugins::pattern::fill_pattern;
    use crate::plugins::{MemoryPlugin, PatternPlugin};

    fn ctx(readonly: bool) -> OpenContext<'static> {
        OpenContext {
            readonly,
            export_name: "x",
            is_tls: false,
        }
    }

    /// A call log shared between a test and the plugin it drives.
    #[derive(Default)]
    struct Log(Mutex<Vec<String>>);

    impl Log {
        fn push(&self, s: impl Into<String>) {
            self.0.lock().unwrap().push(s.into());
        }
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    /// A plugin that logs every call with its arguments and answers every question with
    /// something other than the trait's default, so that an answer which did not come from
    /// it shows.
    struct Recorder(Arc<Log>);

    struct RecHandle(Arc<Log>);

    impl Plugin for Recorder {
        fn name(&self) -> &str {
            self.0.push("name");
            "recorder"
        }
        fn version(&self) -> Option<&str> {
            self.0.push("version");
            Some("9.9")
        }
        fn thread_model(&self) -> ThreadModel {
            self.0.push("thread_model");
            ThreadModel::SerializeRequests
        }
        fn may_block(&self) -> bool {
            self.0.push("may_block");
            true
        }
        fn must_see_every_read(&self) -> bool {
            self.0.push("must_see_every_read");
            false
        }
        fn preconnect(&self, readonly: bool) -> Result<()> {
            self.0.push(format!("preconnect {readonly}"));
            Ok(())
        }
        fn default_export(&self, readonly: bool, is_tls: bool) -> Result<String> {
            self.0.push(format!("default_export {readonly} {is_tls}"));
            Ok("rec-default".into())
        }
        fn list_exports(&self, readonly: bool, is_tls: bool) -> Result<Vec<ExportEntry>> {
            self.0.push(format!("list_exports {readonly} {is_tls}"));
            Ok(vec![ExportEntry {
                name: "a".into(),
                description: Some("b".into()),
            }])
        }
        fn with_connection(&self, info: &ConnectionInfo, f: &mut dyn FnMut()) {
            self.0.push(format!("with_connection {}", info.is_tls));
            f()
        }
        fn open(&self, ctx: &OpenContext<'_>) -> Result<Box<dyn Handle>> {
            self.0.push(format!(
                "open {} {} {}",
                ctx.readonly, ctx.export_name, ctx.is_tls
            ));
            Ok(Box::new(RecHandle(self.0.clone())))
        }
        fn has_allocation_depth(&self) -> bool {
            self.0.push("has_allocation_depth");
            true
        }
        fn dump(&self) -> Vec<String> {
            self.0.push("dump");
            vec!["recorder=1".into()]
        }
    }

    impl Drop for RecHandle {
        fn drop(&mut self) {
            self.0.push("close");
        }
    }

    impl Handle for RecHandle {
        fn get_size(&self) -> Result<u64> {
            self.0.push("get_size");
            Ok(1 << 20)
        }
        fn export_description(&self) -> Result<Option<String>> {
            self.0.push("export_description");
            Ok(Some("rec".into()))
        }
        fn block_size(&self) -> Result<Option<BlockSize>> {
            self.0.push("block_size");
            Ok(Some(BlockSize {
                minimum: 1,
                preferred: 4096,
                maximum: 1 << 20,
            }))
        }
        fn can_write(&self) -> Result<bool> {
            self.0.push("can_write");
            Ok(true)
        }
        fn can_flush(&self) -> Result<bool> {
            self.0.push("can_flush");
            Ok(true)
        }
        fn is_rotational(&self) -> Result<bool> {
            self.0.push("is_rotational");
            Ok(true)
        }
        fn can_trim(&self) -> Result<bool> {
            self.0.push("can_trim");
            Ok(true)
        }
        fn can_zero(&self) -> Result<Support> {
            self.0.push("can_zero");
            Ok(Support::Native)
        }
        fn can_fast_zero(&self) -> Result<bool> {
            self.0.push("can_fast_zero");
            Ok(true)
        }
        fn can_fua(&self) -> Result<Support> {
            self.0.push("can_fua");
            Ok(Support::Native)
        }
        fn can_multi_conn(&self) -> Result<bool> {
            self.0.push("can_multi_conn");
            Ok(true)
        }
        fn can_cache(&self) -> Result<Support> {
            self.0.push("can_cache");
            Ok(Support::Native)
        }
        fn can_extents(&self) -> Result<bool> {
            self.0.push("can_extents");
            Ok(true)
        }
        fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
            self.0
                .push(format!("pread {} {offset} {:#x}", buf.len(), flags.0));
            buf.fill(0xab);
            Ok(())
        }
        fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
            self.0
                .push(format!("pwrite {} {offset} {:#x}", buf.len(), flags.0));
            Ok(())
        }
        fn flush(&self, flags: Flags) -> Result<()> {
            self.0.push(format!("flush {:#x}", flags.0));
            Ok(())
        }
        fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
            self.0.push(format!("trim {count} {offset} {:#x}", flags.0));
            Ok(())
        }
        fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
            self.0.push(format!("zero {count} {offset} {:#x}", flags.0));
            Ok(())
        }
        fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
            self.0
                .push(format!("cache {count} {offset} {:#x}", flags.0));
            Ok(())
        }
        fn extents(&self, count: u64, offset: u64, flags: Flags, e: &mut Extents) -> Result<()> {
            self.0
                .push(format!("extents {count} {offset} {:#x}", flags.0));
            e.add(offset, count, EXTENT_HOLE | EXTENT_ZERO)
        }
        fn allocation_depth(&self, count: u64, offset: u64, out: &mut Extents) -> Result<()> {
            self.0.push(format!("allocation_depth {count} {offset}"));
            out.add(offset, count, 2)
        }
    }

    /// A filter that writes nothing but what it must.
    struct Noop;

    impl Filter for Noop {
        type Conn = ();
        fn name(&self) -> &str {
            "noop"
        }
        fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<((), Next)> {
            Ok(((), Next::open(next, ctx)?))
        }
    }

    fn noop_stack(n: usize, plugin: Arc<dyn Plugin>) -> Arc<dyn Plugin> {
        (0..n)
            .fold(Stack::new(plugin), |s, _| s.push(Noop))
            .into_plugin()
    }

    #[test]
    fn noop_stack_every_plugin_method_reaches_plugin_once_with_its_answer() {
        let log = Arc::new(Log::default());
        let top = noop_stack(3, Arc::new(Recorder(log.clone())));

        assert_eq!(top.name(), "recorder");
        assert_eq!(top.version(), Some("9.9"));
        assert_eq!(top.thread_model(), ThreadModel::SerializeRequests);
        assert!(top.may_block());
        assert!(!top.must_see_every_read());
        top.preconnect(true).unwrap();
        assert_eq!(top.default_export(true, true).unwrap(), "rec-default");
        assert_eq!(
            top.list_exports(false, true).unwrap(),
            [ExportEntry {
                name: "a".into(),
                description: Some("b".into())
            }]
        );
        let mut ran = 0;
        let info = ConnectionInfo {
            is_tls: true,
            ..ConnectionInfo::default()
        };
        top.with_connection(&info, &mut || ran += 1);
        assert_eq!(ran, 1);
        assert!(top.has_allocation_depth());
        assert_eq!(top.dump(), ["recorder=1"]);
        let h = top
            .open(&OpenContext {
                readonly: true,
                export_name: "e",
                is_tls: true,
            })
            .unwrap();
        drop(h);

        assert_eq!(
            log.take(),
            [
                "name",
                "version",
                "thread_model",
                "may_block",
                "must_see_every_read",
                "preconnect true",
                "default_export true true",
                "list_exports false true",
                "with_connection true",
                "has_allocation_depth",
                "dump",
                "open true e true",
                "close",
            ]
        );
    }

    #[test]
    fn noop_stack_every_handle_method_reaches_plugin_once_with_its_answer() {
        let log = Arc::new(Log::default());
        let top = noop_stack(3, Arc::new(Recorder(log.clone())));
        let h = top.open(&ctx(false)).unwrap();
        log.take();

        assert_eq!(h.get_size().unwrap(), 1 << 20);
        assert_eq!(h.export_description().unwrap().as_deref(), Some("rec"));
        assert_eq!(h.block_size().unwrap().unwrap().preferred, 4096);
        assert!(h.can_write().unwrap());
        assert!(h.can_flush().unwrap());
        assert!(h.is_rotational().unwrap());
        assert!(h.can_trim().unwrap());
        assert_eq!(h.can_zero().unwrap(), Support::Native);
        assert!(h.can_fast_zero().unwrap());
        assert_eq!(h.can_fua().unwrap(), Support::Native);
        assert!(h.can_multi_conn().unwrap());
        assert_eq!(h.can_cache().unwrap(), Support::Native);
        assert!(h.can_extents().unwrap());
        let mut buf = [0u8; 512];
        h.pread(&mut buf, 4096, Flags::NONE).unwrap();
        assert_eq!(buf, [0xab; 512]);
        h.pwrite(&buf, 8192, Flags::FUA).unwrap();
        h.flush(Flags::NONE).unwrap();
        h.trim(1024, 512, Flags::FUA).unwrap();
        h.zero(2048, 0, Flags::MAY_TRIM | Flags::FAST_ZERO).unwrap();
        h.cache(4096, 0, Flags::NONE).unwrap();
        let mut ext = Extents::new(0, 4096);
        h.extents(4096, 0, Flags::REQ_ONE, &mut ext).unwrap();
        assert_eq!(
            ext.as_slice(),
            [Extent {
                offset: 0,
                length: 4096,
                kind: EXTENT_HOLE | EXTENT_ZERO
            }]
        );
        let mut depth = Extents::new(0, 4096);
        h.allocation_depth(4096, 0, &mut depth).unwrap();
        assert_eq!(depth.as_slice()[0].kind, 2);

        assert_eq!(
            log.take(),
            [
                "get_size",
                "export_description",
                "block_size",
                "can_write",
                "can_flush",
                "is_rotational",
                "can_trim",
                "can_zero",
                "can_fast_zero",
                "can_fua",
                "can_multi_conn",
                "can_cache",
                "can_extents",
                "pread 512 4096 0x0",
                "pwrite 512 8192 0x2",
                "flush 0x0",
                "trim 1024 512 0x2",
                "zero 2048 0 0x9",
                "cache 4096 0 0x0",
                "extents 4096 0 0x4",
                "allocation_depth 4096 0",
            ]
        );
    }

    #[test]
    fn noop_stack_export_has_the_plugins_capabilities() {
        let plugin: Arc<dyn Plugin> = Arc::new(MemoryPlugin::new(1 << 20));
        let bare = Export::open(&Backend::new(plugin.clone()), &ctx(false)).unwrap();
        let stacked = Export::open(&Backend::new(noop_stack(4, plugin)), &ctx(false)).unwrap();
        assert_eq!(stacked.caps(), bare.caps());
    }

    /// Turns off FUA, zero, trim, cache, extents and multi-conn; turns rotational on.
    struct Restrict;

    impl Filter for Restrict {
        type Conn = ();
        fn name(&self) -> &str {
            "restrict"
        }
        fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<((), Next)> {
            Ok(((), Next::open(next, ctx)?))
        }
        fn can_fua(&self, _: &(), _: &Next) -> Result<Support> {
            Ok(Support::None)
        }
        fn can_zero(&self, _: &(), _: &Next) -> Result<Support> {
            Ok(Support::None)
        }
        fn can_trim(&self, _: &(), _: &Next) -> Result<bool> {
            Ok(false)
        }
        fn can_cache(&self, _: &(), _: &Next) -> Result<Support> {
            Ok(Support::None)
        }
        fn can_extents(&self, _: &(), _: &Next) -> Result<bool> {
            Ok(false)
        }
        fn can_multi_conn(&self, _: &(), _: &Next) -> Result<bool> {
            Ok(false)
        }
        fn is_rotational(&self, _: &(), _: &Next) -> Result<bool> {
            Ok(true)
        }
    }

    #[test]
    fn capability_filter_changes_what_the_export_advertises() {
        let plugin: Arc<dyn Plugin> = Arc::new(MemoryPlugin::new(1 << 20));
        let bare = Export::open(&Backend::new(plugin.clone()), &ctx(false)).unwrap();
        // Under a no-op, so that the override is seen through a deeper stack too.
        let top = Stack::new(plugin).push(Restrict).push(Noop).into_plugin();
        let e = Export::open(&Backend::new(top), &ctx(false)).unwrap();

        let off = nbd::NBD_FLAG_SEND_FUA
            | nbd::NBD_FLAG_SEND_WRITE_ZEROES
            | nbd::NBD_FLAG_SEND_FAST_ZERO
            | nbd::NBD_FLAG_SEND_TRIM
            | nbd::NBD_FLAG_SEND_CACHE
            | nbd::NBD_FLAG_CAN_MULTI_CONN;
        assert_eq!(bare.caps().transmission_flags() & off, off);
        assert_eq!(
            bare.caps().transmission_flags() & nbd::NBD_FLAG_ROTATIONAL,
            0
        );
        assert_eq!(e.caps().transmission_flags() & off, 0);
        assert_ne!(e.caps().transmission_flags() & nbd::NBD_FLAG_ROTATIONAL, 0);
        assert!(!e.caps().extents);

        // The export policy now refuses what was turned off, and block status is all data
        // although the memory plugin would report a hole.
        assert_eq!(
            e.write(&[1; 512], 0, Flags::FUA).unwrap_err().errno,
            Errno::EINVAL
        );
        assert_eq!(
            e.zero(512, 0, Flags::NONE).unwrap_err().errno,
            Errno::EINVAL
        );
        assert_eq!(
            e.trim(512, 0, Flags::NONE).unwrap_err().errno,
            Errno::EINVAL
        );
        assert_eq!(
            e.extents(4096, 0, Flags::NONE).unwrap().as_slice(),
            [Extent {
                offset: 0,
                length: 4096,
                kind: 0
            }]
        );
        assert_eq!(
            bare.extents(4096, 0, Flags::NONE).unwrap().as_slice()[0].kind,
            EXTENT_HOLE | EXTENT_ZERO
        );
    }

    /// Wants the given thread model for itself.
    struct Model(ThreadModel);

    impl Filter for Model {
        type Conn = ();
        fn name(&self) -> &str {
            "model"
        }
        fn thread_model(&self) -> ThreadModel {
            self.0
        }
        fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<((), Next)> {
            Ok(((), Next::open(next, ctx)?))
        }
    }

    #[test]
    fn thread_model_filter_tightens_but_cannot_relax() {
        let memory: Arc<dyn Plugin> = Arc::new(MemoryPlugin::new(4096));
        assert_eq!(memory.thread_model(), ThreadModel::Parallel);
        let tight = Stack::new(memory)
            .push(Model(ThreadModel::SerializeAllRequests))
            .push(Noop)
            .into_plugin();
        assert_eq!(tight.thread_model(), ThreadModel::SerializeAllRequests);
        assert_eq!(
            Backend::new(tight).thread_model(),
            ThreadModel::SerializeAllRequests
        );

        let log = Arc::new(Log::default());
        let relaxed = Stack::new(Arc::new(Recorder(log)))
            .push(Model(ThreadModel::Parallel))
            .into_plugin();
        assert_eq!(relaxed.thread_model(), ThreadModel::SerializeRequests);
    }

    /// nbdkit's offset filter: the export is `range` bytes (or the rest) from `offset`.
    struct Offset {
        offset: u64,
        range: Option<u64>,
    }

    impl Filter for Offset {
        type Conn = ();
        fn name(&self) -> &str {
            "offset"
        }
        fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<((), Next)> {
            Ok(((), Next::open(next, ctx)?))
        }
        fn get_size(&self, _: &(), next: &Next) -> Result<u64> {
            let rest = next.get_size()?.checked_sub(self.offset).ok_or_else(|| {
                BlockError::new(Errno::EINVAL, "offset is beyond the end of the plugin")
            })?;
            Ok(self.range.map_or(rest, |r| r.min(rest)))
        }
        fn pread(&self, _: &(), next: &Next, buf: &mut [u8], off: u64, f: Flags) -> Result<()> {
            next.pread(buf, off + self.offset, f)
        }
        fn pwrite(&self, _: &(), next: &Next, buf: &[u8], off: u64, f: Flags) -> Result<()> {
            next.pwrite(buf, off + self.offset, f)
        }
        fn trim(&self, _: &(), next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
            next.trim(n, off + self.offset, f)
        }
        fn zero(&self, _: &(), next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
            next.zero(n, off + self.offset, f)
        }
        fn cache(&self, _: &(), next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
            next.cache(n, off + self.offset, f)
        }
        fn extents(
            &self,
            _: &(),
            next: &Next,
            n: u64,
            off: u64,
            f: Flags,
            out: &mut Extents,
        ) -> Result<()> {
            let mut below = Extents::new(off + self.offset, out.end() + self.offset);
            next.extents(n, off + self.offset, f, &mut below)?;
            for e in below.as_slice() {
                out.add(e.offset - self.offset, e.length, e.kind)?;
            }
            Ok(())
        }
        fn allocation_depth(
            &self,
            _: &(),
            next: &Next,
            n: u64,
            off: u64,
            out: &mut Extents,
        ) -> Result<()> {
            let mut below = Extents::new(off + self.offset, out.end() + self.offset);
            next.allocation_depth(n, off + self.offset, &mut below)?;
            for e in below.as_slice() {
                out.add(e.offset - self.offset, e.length, e.kind)?;
            }
            Ok(())
        }
    }

    #[test]
    fn two_offset_filters_remap_size_reads_writes_and_extents() {
        let pattern: Arc<dyn Plugin> = Arc::new(PatternPlugin::new(1 << 20));
        let top = Stack::new(pattern)
            .push(Offset {
                offset: 512,
                range: None,
            })
            .push(Offset {
                offset: 1024,
                range: Some(8192),
            })
            .into_plugin();
        let e = Export::open(&Backend::new(top), &ctx(true)).unwrap();
        assert_eq!(e.size(), 8192);
        let mut got = vec![0u8; 4096];
        e.read(&mut got, 100).unwrap();
        let mut want = vec![0u8; 4096];
        fill_pattern(&mut want, 1536 + 100);
        assert_eq!(got, want);
        assert_eq!(
            e.read(&mut got, 8192 - 4095).unwrap_err().errno,
            Errno::EINVAL
        );

        // Writes and extents land 1536 bytes further in the plugin, and come back.
        let memory = Arc::new(MemoryPlugin::new(1 << 20));
        let top = Stack::new(memory.clone())
            .push(Offset {
                offset: 512,
                range: None,
            })
            .push(Offset {
                offset: 1024,
                range: None,
            })
            .into_plugin();
        let e = Export::open(&Backend::new(top), &ctx(false)).unwrap();
        assert_eq!(e.size(), (1 << 20) - 1536);
        let page = crate::plugins::memory::PAGE_SIZE as u64;
        e.write(&[7u8; 512], 2 * page - 1536, Flags::NONE).unwrap();
        let direct = memory.open(&ctx(true)).unwrap();
        let mut buf = [0u8; 512];
        direct.pread(&mut buf, 2 * page, Flags::NONE).unwrap();
        assert_eq!(buf, [7u8; 512]);
        let ext = e.extents(4 * page, 0, Flags::NONE).unwrap();
        let mut below = Extents::new(1536, 4 * page + 1536);
        direct
            .extents(4 * page, 1536, Flags::NONE, &mut below)
            .unwrap();
        let shifted: Vec<Extent> = below
            .as_slice()
            .iter()
            .map(|x| Extent {
                offset: x.offset - 1536,
                ..*x
            })
            .collect();
        assert_eq!(ext.as_slice(), shifted);
        assert!(ext
            .as_slice()
            .iter()
            .any(|x| x.offset == 2 * page - 1536 && x.kind == 0));
        let depth = e.allocation_depth(4 * page, 0, Flags::NONE).unwrap();
        assert!(depth
            .as_slice()
            .iter()
            .any(|x| x.offset == 2 * page - 1536 && x.kind == 1));
    }

    /// Per-export: connection ids and the closed ones. Per-connection: its id and read count.
    #[derive(Default)]
    struct Counter {
        next_id: AtomicU64,
        closed: Mutex<Vec<u64>>,
        log: Option<(Arc<Log>, &'static str)>,
    }

    struct CounterConn {
        id: u64,
        reads: AtomicU64,
    }

    impl Filter for Counter {
        type Conn = CounterConn;
        fn name(&self) -> &str {
            "counter"
        }
        fn open(
            &self,
            next: &Arc<dyn Plugin>,
            ctx: &OpenContext<'_>,
        ) -> Result<(CounterConn, Next)> {
            let next = Next::open(next, ctx)?;
            let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
            Ok((
                CounterConn {
                    id,
                    reads: AtomicU64::new(0),
                },
                next,
            ))
        }
        fn close(&self, conn: &mut CounterConn, next: &Next) {
            // The layer below is still open here.
            next.get_size().unwrap();
            self.closed.lock().unwrap().push(conn.id);
            if let Some((log, name)) = &self.log {
                log.push(format!("close {name}"));
            }
        }
        fn export_description(&self, c: &CounterConn, _: &Next) -> Result<Option<String>> {
            Ok(Some(format!(
                "conn {} after {} reads",
                c.id,
                c.reads.load(Ordering::Relaxed)
            )))
        }
        fn pread(
            &self,
            c: &CounterConn,
            next: &Next,
            buf: &mut [u8],
            off: u64,
            f: Flags,
        ) -> Result<()> {
            c.reads.fetch_add(1, Ordering::Relaxed);
            next.pread(buf, off, f)
        }
    }

    #[test]
    fn per_connection_state_is_separate_and_per_export_state_shared() {
        let top = Arc::new(Filtered::new(
            Counter::default(),
            Arc::new(PatternPlugin::new(4096)),
        ));
        let a = top.open(&ctx(true)).unwrap();
        let b = top.open(&ctx(true)).unwrap();
        let mut buf = [0u8; 8];
        a.pread(&mut buf, 0, Flags::NONE).unwrap();
        a.pread(&mut buf, 8, Flags::NONE).unwrap();
        b.pread(&mut buf, 0, Flags::NONE).unwrap();
        assert_eq!(
            a.export_description().unwrap().as_deref(),
            Some("conn 1 after 2 reads")
        );
        assert_eq!(
            b.export_description().unwrap().as_deref(),
            Some("conn 2 after 1 reads")
        );
        drop(b);
        assert_eq!(*top.filter().closed.lock().unwrap(), [2]);
        drop(a);
        assert_eq!(*top.filter().closed.lock().unwrap(), [2, 1]);
    }

    #[test]
    fn close_runs_outermost_first_and_before_the_plugin_handle_closes() {
        let log = Arc::new(Log::default());
        let counter = |name| Counter {
            log: Some((log.clone(), name)),
            ..Counter::default()
        };
        let top = Stack::new(Arc::new(Recorder(log.clone())))
            .push(counter("inner"))
            .push(counter("outer"))
            .into_plugin();
        let h = top.open(&ctx(true)).unwrap();
        log.take();
        drop(h);
        // Each close asked the size below it, which reached the plugin.
        assert_eq!(
            log.take(),
            [
                "get_size",
                "close outer",
                "get_size",
                "close inner",
                "close"
            ]
        );
    }

    /// Handles numbered from 1 by open; the first one fails reads. Opens after
    /// `opens_allowed` fail.
    struct Flaky {
        opens: AtomicUsize,
        open_handles: Arc<AtomicUsize>,
        opens_allowed: usize,
    }

    struct FlakyHandle {
        generation: usize,
        open_handles: Arc<AtomicUsize>,
    }

    impl Flaky {
        fn new(opens_allowed: usize) -> Flaky {
            Flaky {
                opens: AtomicUsize::new(0),
                open_handles: Arc::default(),
                opens_allowed,
            }
        }
    }

    impl Plugin for Flaky {
        fn name(&self) -> &str {
            "flaky"
        }
        fn open(&self, _ctx: &OpenContext<'_>) -> Result<Box<dyn Handle>> {
            let generation = self.opens.fetch_add(1, Ordering::SeqCst) + 1;
            if generation > self.opens_allowed {
                return Err(BlockError::new(Errno::EIO, "flaky: cannot open"));
            }
            self.open_handles.fetch_add(1, Ordering::SeqCst);
            Ok(Box::new(FlakyHandle {
                generation,
                open_handles: self.open_handles.clone(),
            }))
        }
    }

    impl Drop for FlakyHandle {
        fn drop(&mut self) {
            self.open_handles.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl Handle for FlakyHandle {
        fn get_size(&self) -> Result<u64> {
            Ok(4096)
        }
        fn export_description(&self) -> Result<Option<String>> {
            Ok(Some(format!("generation {}", self.generation)))
        }
        fn pread(&self, buf: &mut [u8], _offset: u64, _flags: Flags) -> Result<()> {
            if self.generation == 1 {
                return Err(BlockError::new(Errno::EIO, "flaky: first handle fails"));
            }
            buf.fill(self.generation as u8);
            Ok(())
        }
    }

    /// nbdkit's retry filter, reduced: on EIO, reopen the layer below once and retry.
    struct Retry;

    struct RetryConn {
        readonly: bool,
        export_name: String,
    }

    impl Filter for Retry {
        type Conn = RetryConn;
        fn name(&self) -> &str {
            "retry"
        }
        fn thread_model(&self) -> ThreadModel {
            ThreadModel::SerializeRequests
        }
        fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<(RetryConn, Next)> {
            let conn = RetryConn {
                readonly: ctx.readonly,
                export_name: ctx.export_name.to_owned(),
            };
            Ok((conn, Next::open_reopenable(next, ctx)?))
        }
        fn pread(
            &self,
            c: &RetryConn,
            next: &Next,
            buf: &mut [u8],
            off: u64,
            f: Flags,
        ) -> Result<()> {
            match next.pread(buf, off, f) {
                Err(e) if e.errno == Errno::EIO => {
                    next.reopen(&OpenContext {
                        readonly: c.readonly,
                        export_name: &c.export_name,
                        is_tls: false,
                    })?;
                    next.pread(buf, off, f)
                }
                r => r,
            }
        }
    }

    #[test]
    fn reopen_replaces_the_layer_below_for_every_method_and_closes_the_old() {
        let flaky = Arc::new(Flaky::new(2));
        let top = Stack::new(flaky.clone())
            .push(Retry)
            .push(Noop)
            .into_plugin();
        assert_eq!(top.thread_model(), ThreadModel::SerializeRequests);
        let h = top.open(&ctx(true)).unwrap();
        assert_eq!(
            h.export_description().unwrap().as_deref(),
            Some("generation 1")
        );
        let mut buf = [0u8; 16];
        h.pread(&mut buf, 0, Flags::NONE).unwrap();
        assert_eq!(buf, [2u8; 16]);
        // A method the filter does not override reaches the new handle too.
        assert_eq!(
            h.export_description().unwrap().as_deref(),
            Some("generation 2")
        );
        assert_eq!(flaky.opens.load(Ordering::SeqCst), 2);
        assert_eq!(flaky.open_handles.load(Ordering::SeqCst), 1);
        drop(h);
        assert_eq!(flaky.open_handles.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn failed_reopen_leaves_the_connection_failing_with_eshutdown() {
        let flaky = Arc::new(Flaky::new(1));
        let top = Stack::new(flaky.clone()).push(Retry).into_plugin();
        let h = top.open(&ctx(true)).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(
            h.pread(&mut buf, 0, Flags::NONE).unwrap_err().errno,
            Errno::EIO
        );
        assert_eq!(flaky.open_handles.load(Ordering::SeqCst), 0);
        assert_eq!(h.get_size().unwrap_err().errno, Errno::ESHUTDOWN);
    }

    #[test]
    fn reopen_of_a_fixed_next_is_einval() {
        let plugin: Arc<dyn Plugin> = Arc::new(PatternPlugin::new(4096));
        let next = Next::open(&plugin, &ctx(true)).unwrap();
        assert_eq!(next.reopen(&ctx(true)).unwrap_err().errno, Errno::EINVAL);
        assert_eq!(next.get_size().unwrap(), 4096);
    }

    /// nbdkit's openonce, reduced: one handle of the layer below for every connection.
    #[derive(Default)]
    struct OpenOnce(OnceLock<Arc<dyn Handle>>);

    impl Filter for OpenOnce {
        type Conn = ();
        fn name(&self) -> &str {
            "openonce"
        }
        fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<((), Next)> {
            let h = match self.0.get() {
                Some(h) => h.clone(),
                None => self
                    .0
                    .get_or_init(|| Arc::from(next.open(ctx).unwrap()))
                    .clone(),
            };
            Ok(((), Next::from_handle(next, h)))
        }
    }

    #[test]
    fn per_export_state_can_share_one_handle_of_the_layer_below() {
        let flaky = Arc::new(Flaky::new(1));
        let top = Stack::new(flaky.clone())
            .push(OpenOnce::default())
            .into_plugin();
        let a = top.open(&ctx(true)).unwrap();
        let b = top.open(&ctx(true)).unwrap();
        assert_eq!(flaky.opens.load(Ordering::SeqCst), 1);
        assert_eq!(
            b.export_description().unwrap().as_deref(),
            Some("generation 1")
        );
        drop((a, b));
        // The filter still holds it for the next client.
        assert_eq!(flaky.open_handles.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn next_handle_outlives_the_next_that_opened_it() {
        let flaky = Arc::new(Flaky::new(1));
        let plugin: Arc<dyn Plugin> = flaky.clone();
        let next = Next::open(&plugin, &ctx(true)).unwrap();
        assert!(Arc::ptr_eq(next.plugin(), &plugin));
        let kept = next.handle().unwrap();
        drop(next);
        assert_eq!(flaky.open_handles.load(Ordering::SeqCst), 1);
        assert_eq!(kept.get_size().unwrap(), 4096);
        drop(kept);
        assert_eq!(flaky.open_handles.load(Ordering::SeqCst), 0);
    }
}
