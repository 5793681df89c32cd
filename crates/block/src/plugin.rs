//! The plugin trait: what a backend must answer so that sluice can export it over NBD.
//!
//! It is shaped after nbdkit's plugin interface (one method per NBD command, per-connection
//! handles, capability queries answered once per connection, a thread model) so that nbdkit's
//! C plugins and Python scripts can be hosted on this same trait by thin adapters. The trait
//! states *what the plugin can do*; the policy that fills the gaps the way nbdkit users expect
//! (FUA emulated by a flush, zero emulated by writes, cache by reads, extents checked) lives
//! in [`crate::export`], once, for every kind of plugin.
//!
//! A [`Plugin`] is loaded once per server. Each client connection calls [`Plugin::open`] and
//! gets a [`Handle`]; dropping the handle is nbdkit's `close`. Data methods take `&self` so
//! that a [`ThreadModel::Parallel`] plugin can serve several requests of one handle at once;
//! the server serialises calls for the stricter thread models.

use std::os::fd::BorrowedFd;

use crate::aio::AioHandle;
use crate::error::{BlockError, Errno, Result};
use crate::extents::Extents;

/// Per-request flags, with nbdkit's bit values (so they pass to C plugins unchanged).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Flags(pub u32);

impl Flags {
    pub const NONE: Flags = Flags(0);
    /// zero only: the plugin may punch a hole (the inverse of NBD_CMD_FLAG_NO_HOLE).
    pub const MAY_TRIM: Flags = Flags(1 << 0);
    /// pwrite, zero, trim: the data must be durable before the call returns.
    pub const FUA: Flags = Flags(1 << 1);
    /// extents: one extent is enough.
    pub const REQ_ONE: Flags = Flags(1 << 2);
    /// zero: fail at once with ENOTSUP rather than do slow work.
    pub const FAST_ZERO: Flags = Flags(1 << 3);

    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
    pub fn without(self, other: Flags) -> Flags {
        Flags(self.0 & !other.0)
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        Flags(self.0 | rhs.0)
    }
}

/// How much concurrency a plugin tolerates (nbdkit's four models, same numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(i32)]
pub enum ThreadModel {
    /// One connection at a time.
    SerializeConnections = 0,
    /// Many connections, one request in flight across the whole plugin.
    SerializeAllRequests = 1,
    /// One request in flight per handle; handles run concurrently.
    SerializeRequests = 2,
    /// Any number of requests at once, even on one handle.
    Parallel = 3,
}

impl ThreadModel {
    pub fn from_i32(v: i32) -> Option<ThreadModel> {
        Some(match v {
            0 => ThreadModel::SerializeConnections,
            1 => ThreadModel::SerializeAllRequests,
            2 => ThreadModel::SerializeRequests,
            3 => ThreadModel::Parallel,
            _ => return None,
        })
    }

    /// nbdkit's spelling, as printed by `--dump-plugin`.
    pub fn as_str(self) -> &'static str {
        match self {
            ThreadModel::SerializeConnections => "serialize_connections",
            ThreadModel::SerializeAllRequests => "serialize_all_requests",
            ThreadModel::SerializeRequests => "serialize_requests",
            ThreadModel::Parallel => "parallel",
        }
    }
}

/// A tri-state capability (nbdkit's FUA_*, CACHE_*, ZERO_* values: 0, 1, 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(i32)]
pub enum Support {
    /// Not offered to the client.
    None = 0,
    /// Offered; the server does it with other calls (flush after write, pwrite of zeroes,
    /// pread for cache).
    Emulate = 1,
    /// Offered; the plugin does it itself.
    Native = 2,
}

impl Support {
    pub fn from_i32(v: i32) -> Option<Support> {
        Some(match v {
            0 => Support::None,
            1 => Support::Emulate,
            2 => Support::Native,
            _ => return None,
        })
    }
}

/// Block size constraints (NBD_INFO_BLOCK_SIZE). `maximum` is `u32::MAX` for "no limit".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

impl BlockSize {
    /// nbdkit's validation of a plugin's block_size answer: min a power of two in 1..=64K,
    /// preferred a power of two in 512..=32M, max -1 or a multiple of min, min <= pref <= max.
    pub fn validate(self) -> Result<BlockSize> {
        let BlockSize {
            minimum,
            preferred,
            maximum,
        } = self;
        let bad = |what: &str| {
            Err(BlockError::new(
                Errno::EINVAL,
                format!("plugin block_size {what}: min={minimum} pref={preferred} max={maximum}"),
            ))
        };
        if !minimum.is_power_of_two() || minimum > 65536 {
            return bad("minimum is not a power of 2 between 1 and 64K");
        }
        if !preferred.is_power_of_two() || !(512..=32 * 1024 * 1024).contains(&preferred) {
            return bad("preferred is not a power of 2 between 512 and 32M");
        }
        if maximum != u32::MAX && maximum % minimum != 0 {
            return bad("maximum is not -1 or a multiple of minimum");
        }
        if minimum > preferred || preferred > maximum {
            return bad("is not min <= preferred <= max");
        }
        Ok(self)
    }
}

/// One entry of an export list (NBD_OPT_LIST).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportEntry {
    pub name: String,
    pub description: Option<String>,
}

impl ExportEntry {
    /// `plugin`'s default export, without a description: the whole list of a plugin that
    /// lists no exports itself, and what nbdkit's `nbdkit_use_default_export` adds to a list.
    pub fn default_export<P: Plugin + ?Sized>(
        plugin: &P,
        readonly: bool,
        is_tls: bool,
    ) -> Result<ExportEntry> {
        Ok(ExportEntry {
            name: plugin.default_export(readonly, is_tls)?,
            description: None,
        })
    }
}

/// What a plugin learns about the client when a connection opens a handle.
#[derive(Debug, Clone, Copy)]
pub struct OpenContext<'a> {
    /// The client may not write (server `-r`, or the plugin said it cannot).
    pub readonly: bool,
    /// The export name the client asked for.
    pub export_name: &'a str,
    /// The connection is TLS-protected.
    pub is_tls: bool,
}

/// Credentials of a client connected over a Unix domain socket (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCreds {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// What the server knows about a client connection's peer, for plugins that ask
/// (nbdkit's `nbdkit_peer_*`). Plugin hosts keep it for the connection's lifetime in a
/// [`crate::host::ConnectionState`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// Unix-socket peer credentials; `None` for TCP or unknown.
    pub peer_creds: Option<PeerCreds>,
    /// The peer's raw `struct sockaddr` as `getpeername(2)` returned it.
    pub peer_addr: Option<Vec<u8>>,
    /// The connection is TLS-protected.
    pub is_tls: bool,
}

/// A loaded plugin. One value serves every connection.
pub trait Plugin: Send + Sync + 'static {
    /// Short name (`memory`, `file`, ...), as in `sluice serve NAME`.
    fn name(&self) -> &str;

    /// Version string printed by `--dump-plugin`.
    fn version(&self) -> Option<&str> {
        None
    }

    /// The concurrency this plugin tolerates.
    fn thread_model(&self) -> ThreadModel {
        ThreadModel::Parallel
    }

    /// Whether calls can block for long (disk, network, an interpreter): the server then runs
    /// them off its socket threads. Plugins that only touch memory answer false and are called
    /// inline, which saves a thread hand-off per request.
    fn may_block(&self) -> bool {
        true
    }

    /// True if every read must reach [`Handle::pread`], even one the server could answer from
    /// block status alone. The server answers a large read of a hole without reading (one
    /// OFFSET_HOLE chunk); that is invisible for plain storage, but not for a layer that
    /// counts, logs, delays, limits or fails reads, nor for foreign plugin code, which nbdkit
    /// always calls. Such a layer answers true, and a stack answers true if any layer does.
    fn must_see_every_read(&self) -> bool {
        false
    }

    /// Called for every new connection before negotiation; an error refuses the client.
    fn preconnect(&self, _readonly: bool) -> Result<()> {
        Ok(())
    }

    /// The export name used when the client asks for "".
    fn default_export(&self, _readonly: bool, _is_tls: bool) -> Result<String> {
        Ok(String::new())
    }

    /// Exports listed by NBD_OPT_LIST. The default lists only the default export.
    fn list_exports(&self, readonly: bool, is_tls: bool) -> Result<Vec<ExportEntry>> {
        Ok(vec![ExportEntry::default_export(self, readonly, is_tls)?])
    }

    /// Runs `f` (a whole client connection: negotiation and transmission) with the
    /// connection's peer information available to the plugin. Plugin hosts that keep
    /// per-connection state for foreign code (nbdkit's thread-local connection) install it
    /// here; the default just runs `f`.
    fn with_connection(&self, _info: &ConnectionInfo, f: &mut dyn FnMut()) {
        f()
    }

    /// Opens a handle for one connection (may be called twice per connection: INFO then GO).
    fn open(&self, ctx: &OpenContext<'_>) -> Result<Box<dyn Handle>>;

    /// True if the plugin's handles know which layer of an image holds data, so the server
    /// should offer the `qemu:allocation-depth` meta context (as `qemu-nbd -A` does).
    fn has_allocation_depth(&self) -> bool {
        false
    }

    /// Lines `key=value` for `--dump-plugin`, after the standard ones.
    fn dump(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Where the bytes of a range of an export are stored: the same number of bytes at `offset`
/// of the open regular file `fd` ([`Handle::file_range`]). The server may then send them
/// with `splice(2)` from the page cache, without reading them into memory.
#[derive(Debug, Clone, Copy)]
pub struct FileRange<'a> {
    pub fd: BorrowedFd<'a>,
    pub offset: u64,
}

/// A per-connection handle. Capability queries are asked once per connection and cached by
/// the server. Data methods are only called for capabilities the handle reported.
pub trait Handle: Send + Sync {
    /// Size of the export in bytes.
    fn get_size(&self) -> Result<u64>;

    fn export_description(&self) -> Result<Option<String>> {
        Ok(None)
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        Ok(None)
    }
    fn can_write(&self) -> Result<bool> {
        Ok(false)
    }
    fn can_flush(&self) -> Result<bool> {
        Ok(false)
    }
    fn is_rotational(&self) -> Result<bool> {
        Ok(false)
    }
    fn can_trim(&self) -> Result<bool> {
        Ok(false)
    }
    /// Native: [`Handle::zero`] is called. Emulate: the server writes zeroes with
    /// [`Handle::pwrite`]. None: WRITE_ZEROES is not offered.
    fn can_zero(&self) -> Result<Support> {
        Ok(Support::Emulate)
    }
    /// True if [`Handle::zero`] honours FAST_ZERO (fails fast instead of writing).
    fn can_fast_zero(&self) -> Result<bool> {
        Ok(false)
    }
    /// Native: FUA reaches the plugin. Emulate: the server flushes after the write.
    fn can_fua(&self) -> Result<Support> {
        Ok(if self.can_flush()? {
            Support::Emulate
        } else {
            Support::None
        })
    }
    /// True if every connection sees the writes of every other once flushed.
    fn can_multi_conn(&self) -> Result<bool> {
        Ok(false)
    }
    /// Native: [`Handle::cache`] is called. Emulate: the server reads and discards.
    fn can_cache(&self) -> Result<Support> {
        Ok(Support::None)
    }
    fn can_extents(&self) -> Result<bool> {
        Ok(false)
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()>;

    fn pwrite(&self, _buf: &[u8], _offset: u64, _flags: Flags) -> Result<()> {
        Err(BlockError::errno(Errno::EROFS))
    }
    fn flush(&self, _flags: Flags) -> Result<()> {
        Err(BlockError::errno(Errno::EINVAL))
    }
    fn trim(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Err(BlockError::errno(Errno::EINVAL))
    }
    /// Writes zeroes. Returning ENOTSUP (without FAST_ZERO) makes the server fall back to
    /// writing zero buffers.
    fn zero(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Err(BlockError::errno(Errno::ENOTSUP))
    }
    fn cache(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Ok(())
    }
    /// The handle's asynchronous submission, if its backend completes requests by callback
    /// (see [`crate::aio`]); `None`, the default, keeps every request on the methods above.
    fn aio(&self) -> Option<&dyn AioHandle> {
        None
    }

    /// `Some` if the bytes [`Handle::pread`] would read from `[offset, offset+count)` are,
    /// right now, the bytes at [`FileRange::offset`] of a regular file (what reading the file
    /// with `pread(2)` returns), and reading them there instead of through `pread` skips
    /// nothing this layer must do (count, log, delay, translate, cache, evict). The range is
    /// inside the export. The default, `None`, sends every read through [`Handle::pread`].
    ///
    /// The server reads the file under the same thread-model lock as a pread, but the kernel
    /// may send pages as they are when the reply leaves (as `sendfile(2)` does): so a layer
    /// answers only for a file whose bytes in the range change only by writes of clients
    /// (which race with the read anyway), never by its own housekeeping (a cache reclaiming
    /// blocks, for example).
    fn file_range(&self, _count: u64, _offset: u64) -> Option<FileRange<'_>> {
        None
    }

    /// Adds extents describing `[offset, offset+count)` to `extents` (at least one).
    fn extents(&self, count: u64, offset: u64, _flags: Flags, extents: &mut Extents) -> Result<()> {
        extents.add(offset, count, 0)
    }

    /// `qemu:allocation-depth`: adds extents whose `kind` is the depth of the layer that
    /// holds each range (0 unallocated, 1 this layer, 2 its backing file, ...). The default,
    /// for plugins without layers, derives it from [`Handle::extents`]: holes are
    /// unallocated, everything else is in this layer.
    fn allocation_depth(&self, count: u64, offset: u64, out: &mut Extents) -> Result<()> {
        let mut ext = Extents::new(offset, offset.saturating_add(count));
        if self.can_extents()? {
            self.extents(count, offset, Flags::NONE, &mut ext)?;
        } else {
            ext.add(offset, count, 0)?;
        }
        for e in ext.as_slice() {
            let depth = u32::from(e.kind & crate::extents::EXTENT_HOLE == 0);
            out.add(e.offset, e.length, depth)?;
        }
        Ok(())
    }
}
