//! One open C handle as a sluice [`Handle`]: capability defaults, v1/v2 dispatch, request
//! splitting and error mapping.
//!
//! Capabilities follow nbdkit's `server/plugins.c` when a callback is absent (can_write from
//! the presence of pwrite, can_zero NATIVE if a zero callback exists, FUA capped at EMULATE
//! for API 1...): that ladder is [`sluice_block::host::Ladder`], shared with the Python host;
//! this file only tells it which C callbacks exist and what the `can_*` ones return (non-zero
//! is true). The policy that *uses* the answers (FUA emulated by flush, zero by pwrite, cache
//! by pread) is the block layer's export policy, shared with every kind of plugin.
//!
//! Every call into C enters a [`Scope`] carrying this handle's connection, export name and
//! TLS flag, so `nbdkit_export_name()` and friends answer correctly on whichever thread the
//! server runs the request; the scope also clears the per-call error state, which is read
//! back when the callback returns -1.
//!
//! The trait counts bytes in `u64`; C callbacks take `uint32_t`. Large trim/zero/cache
//! requests are split into pieces of at most 2^31 bytes (a power of two, so an aligned
//! request stays aligned piecewise); extents requests are clamped instead (the plugin may
//! answer for less than was asked, which the protocol allows).

use std::ffi::{c_char, c_int, CStr};
use std::sync::Arc;

use sluice_block::host::{Callback, CapCache, Capability, FastZeroDefault, ForeignAnswers};
use sluice_block::{BlockError, BlockSize, Errno, Extents, Flags, Handle, Result};

use crate::abi::CHandle;
use crate::context::{call_error, errno, Connection, Frame, Scope};
use crate::plugin::Shared;

/// Largest piece handed to one C data callback.
const CHUNK: u64 = 1 << 31;
/// Largest extents request: 4G - 512, so a 512-aligned request stays aligned.
const MAX_EXTENTS_COUNT: u64 = (u32::MAX - 511) as u64;

/// An open handle of a C plugin. Dropping it calls `.close`.
pub(crate) struct PluginHandle {
    shared: Arc<Shared>,
    conn: Connection,
    /// Interned in `conn`: valid as long as `conn` is.
    export_name: *const c_char,
    is_tls: bool,
    readonly: bool,
    h: CHandle,
    /// The plugin's `can_*` answers, each asked once per handle as nbdkit does.
    answers: CapCache,
}

// SAFETY: the C handle is an opaque token that nbdkit also uses from many worker threads;
// which calls may overlap is the plugin's thread model, enforced by the server. The export
// name pointer is immutable data owned by `conn`, which we hold.
unsafe impl Send for PluginHandle {}
// SAFETY: as above.
unsafe impl Sync for PluginHandle {}

impl PluginHandle {
    pub(crate) fn open(
        shared: Arc<Shared>,
        conn: Connection,
        export_name: *const c_char,
        is_tls: bool,
        readonly: bool,
    ) -> Result<PluginHandle> {
        let open = shared.p.open.expect("checked at load");
        let h = {
            let _scope = Scope::enter(Frame {
                plugin: &shared.scope,
                conn: conn.shared(),
                export_name,
                is_tls,
            });
            // SAFETY: `.open` of the loaded plugin, with the connection installed.
            let h = unsafe { open(c_int::from(readonly)) };
            if h.is_null() {
                let e = errno();
                return Err(call_error("open", shared.errno_is_preserved(), e));
            }
            h
        };
        Ok(PluginHandle {
            shared,
            conn,
            export_name,
            is_tls,
            readonly,
            h,
            answers: CapCache::default(),
        })
    }

    fn scope(&self) -> Scope {
        Scope::enter(Frame {
            plugin: &self.shared.scope,
            conn: self.conn.shared(),
            export_name: self.export_name,
            is_tls: self.is_tls,
        })
    }

    /// Calls an `int`-returning callback in this handle's scope; -1 is an error.
    fn call(&self, op: &str, f: impl FnOnce() -> c_int) -> Result<c_int> {
        let _scope = self.scope();
        let r = f();
        if r == -1 {
            let e = errno();
            return Err(call_error(op, self.shared.errno_is_preserved(), e));
        }
        Ok(r)
    }

    /// The plugin's `can_*` callback for `cap`, if it defines one.
    fn can_callback(&self, cap: Capability) -> Option<unsafe extern "C" fn(CHandle) -> c_int> {
        let p = &self.shared.p;
        match cap {
            Capability::Write => p.can_write,
            Capability::Flush => p.can_flush,
            Capability::Rotational => p.is_rotational,
            Capability::Trim => p.can_trim,
            Capability::Zero => p.can_zero,
            Capability::FastZero => p.can_fast_zero,
            Capability::Extents => p.can_extents,
            Capability::Fua => p.can_fua,
            Capability::MultiConn => p.can_multi_conn,
            Capability::Cache => p.can_cache,
        }
    }

    /// Calls the `can_*` callback for `cap`, if defined.
    fn ask(&self, cap: Capability) -> Result<Option<c_int>> {
        match self.can_callback(cap) {
            // SAFETY: a capability callback of the loaded plugin with our live handle.
            Some(f) => self.call(cap.callback(), || unsafe { f(self.h) }).map(Some),
            None => Ok(None),
        }
    }

    /// Splits `[offset, offset+count)` into pieces C can take and calls `f` on each.
    fn chunked(
        &self,
        op: &str,
        count: u64,
        offset: u64,
        mut f: impl FnMut(u32, u64) -> c_int,
    ) -> Result<()> {
        let mut done = 0;
        while done < count {
            let n = (count - done).min(CHUNK);
            self.call(op, || f(n as u32, offset + done))?;
            done += n;
        }
        Ok(())
    }
}

impl ForeignAnswers for PluginHandle {
    fn flag(&self, cap: Capability) -> Result<Option<bool>> {
        Ok(self.ask(cap)?.map(|r| r != 0))
    }

    fn level(&self, cap: Capability) -> Result<Option<i64>> {
        Ok(self.ask(cap)?.map(i64::from))
    }

    fn defines(&self, callback: Callback) -> Result<bool> {
        let p = &self.shared.p;
        Ok(match callback {
            Callback::Pwrite => p.pwrite.is_some() || p._pwrite_v1.is_some(),
            Callback::Flush => p.flush.is_some() || p._flush_v1.is_some(),
            Callback::Trim => p.trim.is_some() || p._trim_v1.is_some(),
            Callback::Zero => p.zero.is_some() || p._zero_v1.is_some(),
            Callback::Extents => p.extents.is_some(),
            Callback::Cache => p.cache.is_some(),
        })
    }

    fn api_version(&self) -> u32 {
        self.shared.p._api_version as u32
    }

    fn fast_zero_default(&self) -> FastZeroDefault {
        FastZeroDefault::Core {
            v2_zero: self.shared.p.zero.is_some(),
            readonly: self.readonly,
        }
    }

    fn invalid_answer(&self, cap: Capability, value: i64) -> BlockError {
        BlockError::new(
            Errno::EINVAL,
            format!("{}: plugin returned invalid value {value}", cap.callback()),
        )
    }

    fn answers(&self) -> &CapCache {
        &self.answers
    }
}

impl Drop for PluginHandle {
    fn drop(&mut self) {
        if let Some(close) = self.shared.p.close {
            let _scope = self.scope();
            // SAFETY: `.close` once, with the handle `.open` returned; nothing uses it after.
            unsafe { close(self.h) };
        }
    }
}

impl Handle for PluginHandle {
    /// Asked once per handle, as nbdkit does.
    fn get_size(&self) -> Result<u64> {
        self.answers.size(|| {
            let f = self.shared.p.get_size.expect("checked at load");
            let _scope = self.scope();
            // SAFETY: `.get_size` with our live handle.
            let r = unsafe { f(self.h) };
            if r == -1 {
                let e = errno();
                return Err(call_error("get_size", self.shared.errno_is_preserved(), e));
            }
            u64::try_from(r).map_err(|_| {
                BlockError::new(
                    Errno::EIO,
                    format!("get_size: plugin returned invalid size {r}"),
                )
            })
        })
    }

    fn export_description(&self) -> Result<Option<String>> {
        let Some(f) = self.shared.p.export_description else {
            return Ok(None);
        };
        let _scope = self.scope();
        // SAFETY: `.export_description` with our live handle.
        let r = unsafe { f(self.h) };
        if r.is_null() {
            return Ok(None);
        }
        // SAFETY: a C string the plugin keeps valid (literal or interned) for at least this
        // connection; copied at once.
        Ok(Some(
            unsafe { CStr::from_ptr(r) }.to_string_lossy().into_owned(),
        ))
    }

    fn block_size(&self) -> Result<Option<BlockSize>> {
        let Some(f) = self.shared.p.block_size else {
            return Ok(None);
        };
        let (mut minimum, mut preferred, mut maximum) = (0u32, 0u32, 0u32);
        // SAFETY: `.block_size` with our live handle and three writable u32s.
        self.call("block_size", || unsafe {
            f(self.h, &mut minimum, &mut preferred, &mut maximum)
        })?;
        if minimum == 0 && preferred == 0 && maximum == 0 {
            return Ok(None);
        }
        BlockSize {
            minimum,
            preferred,
            maximum,
        }
        .validate()
        .map(Some)
    }

    sluice_block::foreign_capabilities!();

    fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        let p = &self.shared.p;
        let mut off = offset;
        for piece in buf.chunks_mut(CHUNK as usize) {
            let n = piece.len() as u32;
            let ptr = piece.as_mut_ptr().cast();
            self.call("pread", || match (p.pread, p._pread_v1) {
                // SAFETY: the v2 read callback with our live handle and a buffer writable
                // for `n` bytes.
                (Some(f), _) => unsafe { f(self.h, ptr, n, off, 0) },
                // SAFETY: the same for v1.
                (None, Some(f)) => unsafe { f(self.h, ptr, n, off) },
                (None, None) => unreachable!("checked at load"),
            })?;
            off += u64::from(n);
        }
        Ok(())
    }

    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let p = &self.shared.p;
        if p.pwrite.is_none() && p._pwrite_v1.is_none() {
            return Err(BlockError::errno(Errno::EROFS));
        }
        let mut off = offset;
        for piece in buf.chunks(CHUNK as usize) {
            let n = piece.len() as u32;
            let ptr = piece.as_ptr().cast();
            self.call("pwrite", || match (p.pwrite, p._pwrite_v1) {
                // SAFETY: the v2 write callback with our live handle and a buffer readable
                // for `n` bytes.
                (Some(f), _) => unsafe { f(self.h, ptr, n, off, flags.0) },
                // SAFETY: the same for v1, which takes no flags (FUA is emulated above us).
                (None, Some(f)) => unsafe { f(self.h, ptr, n, off) },
                (None, None) => unreachable!("checked above"),
            })?;
            off += u64::from(n);
        }
        Ok(())
    }

    fn flush(&self, flags: Flags) -> Result<()> {
        let p = &self.shared.p;
        match (p.flush, p._flush_v1) {
            // SAFETY: the v2 flush callback with our live handle.
            (Some(f), _) => self.call("flush", || unsafe { f(self.h, flags.0) }),
            // SAFETY: the v1 flush callback with our live handle.
            (None, Some(f)) => self.call("flush", || unsafe { f(self.h) }),
            (None, None) => return Err(BlockError::errno(Errno::EINVAL)),
        }?;
        Ok(())
    }

    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let p = &self.shared.p;
        match (p.trim, p._trim_v1) {
            (Some(f), _) => self.chunked("trim", count, offset, |n, off| {
                // SAFETY: the v2 trim callback with our live handle.
                unsafe { f(self.h, n, off, flags.0) }
            }),
            (None, Some(f)) => self.chunked("trim", count, offset, |n, off| {
                // SAFETY: the v1 trim callback with our live handle.
                unsafe { f(self.h, n, off) }
            }),
            (None, None) => Err(BlockError::errno(Errno::EINVAL)),
        }
    }

    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        let p = &self.shared.p;
        match (p.zero, p._zero_v1) {
            (Some(f), _) => self.chunked("zero", count, offset, |n, off| {
                // SAFETY: the v2 zero callback with our live handle.
                unsafe { f(self.h, n, off, flags.0) }
            }),
            (None, Some(_)) if flags.contains(Flags::FAST_ZERO) => Err(BlockError::new(
                Errno::ENOTSUP,
                "zero: fast zero is not supported by API version 1 plugins",
            )),
            (None, Some(f)) => {
                let may_trim = c_int::from(flags.contains(Flags::MAY_TRIM));
                self.chunked("zero", count, offset, |n, off| {
                    // SAFETY: the v1 zero callback with our live handle.
                    unsafe { f(self.h, n, off, may_trim) }
                })
            }
            (None, None) => Err(BlockError::new(
                Errno::ENOTSUP,
                "zero: plugin has no zero callback",
            )),
        }
    }

    fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        match self.shared.p.cache {
            Some(f) => self.chunked("cache", count, offset, |n, off| {
                // SAFETY: the cache callback with our live handle.
                unsafe { f(self.h, n, off, flags.0) }
            }),
            // nbdkit: advertised but absent means a successful no-op.
            None => Ok(()),
        }
    }

    fn extents(&self, count: u64, offset: u64, flags: Flags, extents: &mut Extents) -> Result<()> {
        let Some(f) = self.shared.p.extents else {
            return Err(BlockError::errno(Errno::EINVAL));
        };
        let n = count.min(MAX_EXTENTS_COUNT) as u32;
        let list = (extents as *mut Extents).cast();
        // SAFETY: the extents callback with our live handle and a pointer to the caller's
        // `Extents`, exclusively borrowed for the call; `nbdkit_add_extent` casts it back.
        self.call("extents", || unsafe { f(self.h, n, offset, flags.0, list) })?;
        if extents.is_empty() {
            return Err(BlockError::new(
                Errno::EINVAL,
                "extents: plugin must return at least one extent",
            ));
        }
        Ok(())
    }
}
