//! One open RBD image and its cluster connection, with the I/O calls a block server needs.
//!
//! [`Image::open`] runs Ceph's whole connection sequence once: create the cluster handle as
//! `client.ID`, read the configuration, apply credentials, timeouts and `ceph.*` options,
//! connect, open the pool (and namespace), open the image (read-only for snapshots and
//! read-only exports). Each step that fails says which step it was (see [`crate::error`]).
//! The three handles live and die together in one [`Image`]: the image closes first (which
//! waits for its in-flight requests and flushes its cache), then the pool context, then the
//! cluster connection.
//!
//! **Thread model.** librbd's image handle is thread-safe: any number of threads may submit
//! requests on it at once, which is how qemu and rbd-nbd use it. So one [`Image`] is shared
//! (`Arc`) by every connection of an export and no lock of ours is held around I/O. Every
//! data request is submitted with `rbd_aio_*` and a completion, in one of two ways:
//! - [`Image::submit`] returns at once. The buffer moves into the request (so the caller
//!   cannot touch or free it while librbd uses it) and librbd's completion callback, on one
//!   of librbd's threads, hands it back with the result to the caller's `done`, then
//!   releases the completion. The callback catches panics (nothing unwinds into C) and must
//!   not block: the NBD server's sink only queues the reply for its sender thread. No thread
//!   waits per request; this is the path of the NBD server's reads, writes, flushes, trims
//!   and zeroes (see `sluice_block::aio`).
//! - The synchronous methods ([`Image::read`], [`Image::write`], ...) wait for their
//!   completion (`rbd_aio_wait_for_complete`), for callers that need the answer at once (the
//!   daemon's jobs, filters, what needs a flush after it). Requests that librbd limits in
//!   size (discard and write-zeroes return an `int` in places) are split into pieces of at
//!   most [`MAX_CHUNK`] bytes, all submitted before the first is waited for.
//!
//! Either way librbd's own threads carry the requests to the OSDs, and requests of all
//! connections are in flight together. Closing the image (`rbd_close`) waits for requests in
//! flight; the server closes its handle only after the last completion was answered.
//!
//! **Durability.** With librbd's default cache policy (`writearound`) a write completes once
//! it is sent (after the client's first flush: until then librbd writes through, Ceph's
//! `rbd_cache_writethrough_until_flush`, kept here for clients that never flush), and
//! `rbd_aio_flush` waits until every completed write is on the OSDs; a write
//! submitted with `LIBRADOS_OP_FLAG_FADVISE_FUA` bypasses that window, which is what NBD's
//! FUA asks (Ceph's own wnbd does the same). With `rbd_cache_policy=writeback` the
//! object cacher is not documented to honour the flag, so [`Image::native_fua`] is false
//! then and the server emulates FUA by a flush. Write-zeroes and discard never go through a
//! write-back window (librbd sends them straight to the OSDs) but are still followed by a
//! flush when FUA is asked, because the C API has no flag for them.
//!
//! **Exclusive lock: one writer per image, across hosts.** librbd's exclusive-lock feature
//! normally moves the lock between cooperating clients on demand: a second writer asks the
//! holder to release it and the two then take turns, which for two hosts serving the same
//! disk means two writers interleaving. So a writable open of an image with the feature
//! takes the lock explicitly (`rbd_lock_acquire`, as `rbd-nbd --exclusive` does), which
//! turns librbd's automatic hand-over off for this client: another client asking for the
//! lock is refused, and a second sluice serving the image writable fails to start with
//! [`RbdError::Locked`] naming the holder. The lock is released when the image closes.
//!
//! A holder that died (kill -9, a host gone) keeps the lock until its watch on the image
//! header times out (`osd_client_watch_timeout`, 30 s); librbd then breaks it by itself, so
//! a plain second open succeeds after that wait. `break-lock=on` (sluice's spelling; qemu
//! has no such option) does not wait: it breaks the current holder's lock with
//! `rbd_lock_break`, which also blocklists that client (`rbd_blocklist_on_break_lock`,
//! Ceph's default), so a holder that was only partitioned away cannot write again when it
//! comes back. Never two writers at once: the old one is fenced before the new one writes.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

use sluice_block::Errno;

use crate::error::{errno_of, RbdError};
use crate::options::{
    conf_display, RbdOptions, CEPH_TIMEOUT_DEFAULTS, DEFAULT_OSD_TIMEOUT, DEFAULT_TIMEOUT,
};
use crate::sys::{self, Api, CompletionT, ConfigOption, ImageInfo, ImageT, IoCtxT, RadosT};

/// The largest piece one discard or write-zeroes request is split into.
pub const MAX_CHUNK: u64 = 1 << 30;

/// A C string of a value already checked to hold no NUL (see [`RbdOptions::from_args`]);
/// a NUL from a caller that built the options by hand becomes EINVAL.
fn cstring(what: &str, s: &str) -> Result<CString, RbdError> {
    CString::new(s).map_err(|_| RbdError::Config {
        what: format!("{what}: contains a NUL byte"),
        errno: Errno::EINVAL,
    })
}

/// A cluster handle (`rados_t`), shut down when dropped.
struct Cluster {
    raw: RadosT,
    api: &'static Api,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: `raw` came from rados_create2 and is shut down exactly once, after every
        // pool context and image using it (the owners drop those first).
        unsafe { (self.api.rados_shutdown)(self.raw) };
    }
}

impl Cluster {
    fn set(&self, option: &str, value: &str) -> Result<(), RbdError> {
        let o = cstring("option name", option)?;
        let v = cstring("option value", value)?;
        // SAFETY: `raw` is a live handle not yet connected; both strings are NUL-terminated
        // and outlive the call (librados copies them).
        let r = unsafe { (self.api.rados_conf_set)(self.raw, o.as_ptr(), v.as_ptr()) };
        if r < 0 {
            let what = if r == -libc::ENOENT {
                format!("ceph.{option}: no such Ceph option")
            } else {
                format!("ceph.{option}={value}: {}", errno_of(r).describe())
            };
            return Err(RbdError::Config {
                what,
                errno: errno_of(r),
            });
        }
        Ok(())
    }

    fn get(&self, option: &str) -> Option<String> {
        let o = CString::new(option).ok()?;
        let mut buf = [0 as c_char; 256];
        // SAFETY: `buf` is writable for its length; librados NUL-terminates what it writes.
        let r = unsafe { (self.api.rados_conf_get)(self.raw, o.as_ptr(), buf.as_mut_ptr(), 256) };
        if r < 0 {
            return None;
        }
        // SAFETY: on success the buffer holds a NUL-terminated string.
        Some(
            unsafe { CStr::from_ptr(buf.as_ptr()) }
                .to_string_lossy()
                .into_owned(),
        )
    }

    fn get_secs(&self, option: &str) -> Option<f64> {
        self.get(option)?.trim().parse().ok()
    }
}

/// A pool context (`rados_ioctx_t`), destroyed when dropped.
struct IoCtx {
    raw: IoCtxT,
    api: &'static Api,
}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: `raw` came from rados_ioctx_create and is destroyed once, after the image
        // opened in it was closed and before its cluster is shut down.
        unsafe { (self.api.rados_ioctx_destroy)(self.raw) };
    }
}

/// One extent of an image as `rbd_diff_iterate2` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiffExtent {
    pub offset: u64,
    pub length: u64,
    /// True: the range may hold data. False: it is known to read as zeroes.
    pub exists: bool,
}

/// An open image with its pool context and cluster connection.
pub struct Image {
    raw: ImageT,
    // Dropped after `raw` is closed (in Drop), in this order: pool, then cluster.
    _io: IoCtx,
    _cluster: Cluster,
    api: &'static Api,
    /// `pool/image[@snap]`, for messages; shared with requests in flight, whose errors name it.
    spec: Arc<str>,
    writable: bool,
    object_size: u64,
    features: u64,
    native_fua: bool,
}

// SAFETY: librbd's image handle may be used from any thread, by several threads at once
// (librbd locks internally; qemu, rbd-nbd and fio's rbd engine all rely on this). The only
// call that needs exclusive access, rbd_close, is made from Drop (`&mut self`).
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("spec", &self.spec)
            .field("writable", &self.writable)
            .field("object_size", &self.object_size)
            .field("features", &format_args!("{:#x}", self.features))
            .field("native_fua", &self.native_fua)
            .finish()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: `raw` is the open image; no request is in flight (every request method
        // waits for its completions before returning, and they borrow `self`).
        let r = unsafe { (self.api.rbd_close)(self.raw) };
        if r < 0 {
            tracing::warn!("rbd: closing {}: {}", self.spec, errno_of(r).describe());
        }
    }
}

/// A completion (`rbd_completion_t`), released when dropped.
struct Completion {
    raw: CompletionT,
    api: &'static Api,
    submitted: bool,
}

impl Completion {
    fn new(api: &'static Api) -> Result<Completion, Errno> {
        let mut raw = ptr::null_mut();
        // SAFETY: no callback and no argument: the completion is waited for explicitly.
        let r = unsafe { (api.rbd_aio_create_completion)(ptr::null_mut(), None, &mut raw) };
        if r < 0 {
            return Err(errno_of(r));
        }
        Ok(Completion {
            raw,
            api,
            submitted: false,
        })
    }

    /// Waits for the submitted request and returns its result (`>= 0`, or `-errno`).
    fn wait(&mut self) -> isize {
        self.submitted = false;
        // SAFETY: `raw` is a live completion of a submitted request.
        unsafe {
            (self.api.rbd_aio_wait_for_complete)(self.raw);
            (self.api.rbd_aio_get_return_value)(self.raw)
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if self.submitted {
            // A submitted request must finish before its completion (and the caller's
            // buffer) goes away, also when unwinding.
            self.wait();
        }
        // SAFETY: `raw` is released once; no request refers to it any more.
        unsafe { (self.api.rbd_aio_release)(self.raw) };
    }
}

/// One librbd request for [`Image::submit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AioOp {
    /// Read `len` bytes into the buffer at `at`.
    Read { at: usize, len: usize },
    /// Write `len` bytes of the buffer from `at`; `fua` only where it is native.
    Write { at: usize, len: usize, fua: bool },
    /// Make every completed write durable.
    Flush,
    /// Discard (advisory) `len` bytes.
    Discard { len: u64 },
    /// Zero `len` bytes, exactly; `thick` keeps them allocated.
    WriteZeroes { len: u64, thick: bool },
}

/// A request submitted by [`Image::submit`], owned by librbd's completion (its argument)
/// until the callback takes it back.
struct Pending<F> {
    buf: Vec<u8>,
    done: F,
    api: &'static Api,
    op: &'static str,
    offset: u64,
    len: u64,
    spec: Arc<str>,
    /// A read's length: librbd clips reads at the image's end, and a short one is an error.
    expect: Option<usize>,
}

/// librbd's completion callback for [`Image::submit`]: hands the buffer and the result to
/// the request's `done`, then releases the completion. Nothing unwinds into librbd: a panic
/// is caught and logged (its request then has no answer).
unsafe extern "C" fn on_complete<F>(c: CompletionT, arg: *mut c_void)
where
    F: FnOnce(Vec<u8>, Result<(), RbdError>) + Send + 'static,
{
    // SAFETY: `arg` is the Box<Pending<F>> leaked by Image::submit for this completion;
    // librbd calls back once, so it is taken back once.
    let pending = unsafe { Box::from_raw(arg.cast::<Pending<F>>()) };
    let api = pending.api;
    let caught = catch_unwind(AssertUnwindSafe(move || {
        // SAFETY: `c` is the completion being completed: its return value is set.
        let rv = unsafe { (api.rbd_aio_get_return_value)(c) };
        let Pending {
            buf,
            done,
            op,
            offset,
            len,
            spec,
            expect,
            ..
        } = *pending;
        let errno = if rv < 0 {
            Some(Errno(-rv as i32))
        } else {
            // A short read: the image shrank under us (as in Image::read).
            expect.filter(|&n| n != rv as usize).map(|_| Errno::EIO)
        };
        let result = match errno {
            None => Ok(()),
            Some(errno) => Err(RbdError::Io {
                op,
                spec: spec.to_string(),
                offset,
                len,
                errno,
            }),
        };
        done(buf, result);
    }));
    // SAFETY: released once; librbd keeps the completion alive until this callback returns.
    unsafe { (api.rbd_aio_release)(c) };
    if caught.is_err() {
        let _ = catch_unwind(|| {
            tracing::error!("rbd: a completion callback panicked: its request is not answered")
        });
    }
}

impl Image {
    /// Connects to the cluster and opens the image described by `opts`, read-only if
    /// `readonly` or a snapshot is asked for. Fails within the configured timeout when the
    /// cluster cannot be reached.
    pub fn open(opts: &RbdOptions, readonly: bool) -> Result<Image, RbdError> {
        let api = sys::api().map_err(|reason| RbdError::Library { reason })?;
        let cluster = connect(api, opts)?;
        let pool = cstring("pool", &opts.pool)?;
        let mut io = ptr::null_mut();
        // SAFETY: `cluster.raw` is connected; `pool` is NUL-terminated; `io` receives the
        // new context.
        let r = unsafe { (api.rados_ioctx_create)(cluster.raw, pool.as_ptr(), &mut io) };
        if r < 0 {
            return Err(RbdError::pool(&opts.pool, opts.client_id(), r));
        }
        let io = IoCtx { raw: io, api };
        if let Some(ns) = opts.namespace.as_deref().filter(|n| !n.is_empty()) {
            let ns = cstring("namespace", ns)?;
            // SAFETY: `io.raw` is live; librados copies the namespace.
            unsafe { (api.rados_ioctx_set_namespace)(io.raw, ns.as_ptr()) };
        }
        let spec: Arc<str> = opts.spec().into();
        let (raw, writable) = open_image(api, &io, opts, readonly || opts.snapshot.is_some())?;
        let mut image = Image {
            raw,
            _io: io,
            _cluster: cluster,
            api,
            spec,
            writable,
            object_size: 0,
            features: 0,
            native_fua: true,
        };
        let mut info = std::mem::MaybeUninit::<ImageInfo>::zeroed();
        // SAFETY: `info` is a writable rbd_image_info_t of the size passed.
        let r = unsafe {
            (api.rbd_stat)(
                image.raw,
                info.as_mut_ptr(),
                std::mem::size_of::<ImageInfo>(),
            )
        };
        if r < 0 {
            return Err(RbdError::image(&image.spec, "stat", r));
        }
        // SAFETY: rbd_stat filled the struct (and it was zeroed before).
        image.object_size = unsafe { info.assume_init() }.obj_size;
        // SAFETY: writes one u64 through a valid pointer.
        let r = unsafe { (api.rbd_get_features)(image.raw, &mut image.features) };
        if r < 0 {
            return Err(RbdError::image(&image.spec, "get features", r));
        }
        if image.writable && image.features & sys::FEATURE_EXCLUSIVE_LOCK != 0 {
            image.take_lock(opts.break_lock)?;
        }
        let cache = image.config("rbd_cache").unwrap_or_default();
        let policy = image.config("rbd_cache_policy").unwrap_or_default();
        image.native_fua = !(cache == "true" && policy == "writeback");
        tracing::debug!("rbd: opened {image:?} (rbd_cache={cache}, rbd_cache_policy={policy})");
        Ok(image)
    }

    /// Takes the image's exclusive lock for this client (see the module doc); with
    /// `break_lock`, breaks (and blocklists) the current holder first.
    fn take_lock(&self, break_lock: bool) -> Result<(), RbdError> {
        if break_lock {
            for owner in self.lock_owners()? {
                let o = cstring("lock owner", &owner)?;
                // SAFETY: `raw` is open; `o` is NUL-terminated and outlives the call.
                let r = unsafe {
                    (self.api.rbd_lock_break)(self.raw, sys::LOCK_MODE_EXCLUSIVE, o.as_ptr())
                };
                // ENOENT: the holder let go (or was broken) meanwhile.
                if r < 0 && r != -libc::ENOENT {
                    return Err(RbdError::image(&self.spec, "break the exclusive lock", r));
                }
                tracing::warn!("rbd: {}: broke the exclusive lock of {owner}", self.spec);
            }
        }
        // SAFETY: `raw` is open; the call blocks until the lock is taken or refused.
        let r = unsafe { (self.api.rbd_lock_acquire)(self.raw, sys::LOCK_MODE_EXCLUSIVE) };
        if r < 0 {
            let owners = self.lock_owners().unwrap_or_default();
            if r == -libc::EROFS || r == -libc::EBUSY || !owners.is_empty() {
                return Err(RbdError::Locked {
                    spec: self.spec.to_string(),
                    owners: if owners.is_empty() {
                        "holder unknown".to_string()
                    } else {
                        owners.join(", ")
                    },
                    errno: errno_of(r),
                });
            }
            return Err(RbdError::image(&self.spec, "take the exclusive lock", r));
        }
        Ok(())
    }

    /// The clients holding the image's exclusive lock (`client.4123 ...` as librbd names
    /// them); empty if none.
    pub fn lock_owners(&self) -> Result<Vec<String>, RbdError> {
        const MAX: usize = 8;
        let mut mode: c_int = 0;
        let mut owners = [ptr::null_mut::<c_char>(); MAX];
        let mut n: usize = MAX;
        // SAFETY: `owners` has room for `n` pointers, which librbd fills with strings it
        // allocates and rbd_lock_get_owners_cleanup frees.
        let r = unsafe {
            (self.api.rbd_lock_get_owners)(self.raw, &mut mode, owners.as_mut_ptr(), &mut n)
        };
        if r == -libc::ENOENT {
            return Ok(Vec::new());
        }
        if r < 0 {
            return Err(RbdError::image(
                &self.spec,
                "list the exclusive lock's owners",
                r,
            ));
        }
        let n = n.min(MAX);
        let list = owners[..n]
            .iter()
            .filter(|p| !p.is_null())
            // SAFETY: filled entries are NUL-terminated strings.
            .map(|p| unsafe { CStr::from_ptr(*p) }.to_string_lossy().into_owned())
            .collect();
        // SAFETY: frees the `n` strings the successful call allocated, once.
        unsafe { (self.api.rbd_lock_get_owners_cleanup)(owners.as_mut_ptr(), n) };
        Ok(list)
    }

    /// Flushes and lets go of the exclusive lock, if this client holds it. For a process
    /// about to exit without closing the image (the QMP daemon): otherwise the lock stays
    /// with the exited client until its watch times out, and the next writer waits ~30 s.
    pub fn release_lock(&self) -> Result<(), RbdError> {
        if !self.is_lock_owner() {
            return Ok(());
        }
        self.flush()?;
        // SAFETY: `raw` is open and this client owns the lock.
        let r = unsafe { (self.api.rbd_lock_release)(self.raw) };
        if r < 0 {
            return Err(RbdError::image(&self.spec, "release the exclusive lock", r));
        }
        Ok(())
    }

    /// True if this client holds the image's exclusive lock.
    pub fn is_lock_owner(&self) -> bool {
        let mut owner: c_int = 0;
        // SAFETY: writes one int through a valid pointer.
        let r = unsafe { (self.api.rbd_is_exclusive_lock_owner)(self.raw, &mut owner) };
        r >= 0 && owner != 0
    }

    /// `pool/[namespace/]image[@snap]`.
    pub fn spec(&self) -> &str {
        &self.spec
    }

    /// False for snapshots, read-only opens, and clients whose caps only allow reading.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The image's object size (4 MiB unless chosen at creation).
    pub fn object_size(&self) -> u64 {
        self.object_size
    }

    /// `RBD_FEATURE_*` bits.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// True if a write flagged FUA is durable when it completes (see the module doc).
    pub fn native_fua(&self) -> bool {
        self.native_fua
    }

    /// The image's current size (librbd follows resizes made by other clients).
    pub fn size(&self) -> Result<u64, RbdError> {
        let mut size = 0;
        // SAFETY: writes one u64 through a valid pointer.
        let r = unsafe { (self.api.rbd_get_size)(self.raw, &mut size) };
        if r < 0 {
            return Err(RbdError::image(&self.spec, "get size", r));
        }
        Ok(size)
    }

    /// The effective value of an image-level option (client config, pool and image
    /// overrides applied), as `rbd config image get` shows it.
    pub fn config(&self, name: &str) -> Option<String> {
        let mut n: c_int = 0;
        // SAFETY: asking for the count only: a null array of 0 entries.
        let r = unsafe { (self.api.rbd_config_image_list)(self.raw, ptr::null_mut(), &mut n) };
        if r != -libc::ERANGE || n <= 0 {
            return None;
        }
        let mut opts: Vec<ConfigOption> = (0..n)
            .map(|_| ConfigOption {
                name: ptr::null_mut(),
                value: ptr::null_mut(),
                source: 0,
            })
            .collect();
        let mut len = n;
        // SAFETY: `opts` has room for `len` entries, which librbd fills with strings it
        // allocates and rbd_config_image_list_cleanup frees.
        let r = unsafe { (self.api.rbd_config_image_list)(self.raw, opts.as_mut_ptr(), &mut len) };
        if r < 0 {
            return None;
        }
        let found = opts[..len.clamp(0, n) as usize].iter().find_map(|o| {
            // SAFETY: filled entries hold NUL-terminated strings (or null).
            let key = (!o.name.is_null()).then(|| unsafe { CStr::from_ptr(o.name) })?;
            (key.to_bytes() == name.as_bytes() && !o.value.is_null()).then(|| {
                // SAFETY: as above.
                unsafe { CStr::from_ptr(o.value) }
                    .to_string_lossy()
                    .into_owned()
            })
        });
        // SAFETY: frees what the successful list call allocated, once.
        unsafe { (self.api.rbd_config_image_list_cleanup)(opts.as_mut_ptr(), len) };
        found
    }

    fn io_error(&self, op: &'static str, offset: u64, len: u64, errno: Errno) -> RbdError {
        RbdError::Io {
            op,
            spec: self.spec.to_string(),
            offset,
            len,
            errno,
        }
    }

    /// Submits one request with a fresh completion and waits for it.
    fn submit_wait(
        &self,
        op: &'static str,
        offset: u64,
        len: u64,
        submit: impl FnOnce(CompletionT) -> c_int,
    ) -> Result<usize, RbdError> {
        let mut c = Completion::new(self.api).map_err(|e| self.io_error(op, offset, len, e))?;
        let r = submit(c.raw);
        if r < 0 {
            return Err(self.io_error(op, offset, len, errno_of(r)));
        }
        c.submitted = true;
        let rv = c.wait();
        if rv < 0 {
            return Err(self.io_error(op, offset, len, Errno(-rv as i32)));
        }
        Ok(rv as usize)
    }

    /// Submits `op` for each piece of `[offset, offset+len)` (at most [`MAX_CHUNK`] each),
    /// then waits for all of them; the first error is reported.
    fn submit_chunked(
        &self,
        op: &'static str,
        offset: u64,
        len: u64,
        mut submit: impl FnMut(u64, u64, CompletionT) -> c_int,
    ) -> Result<(), RbdError> {
        let mut pending = Vec::with_capacity(len.div_ceil(MAX_CHUNK) as usize);
        let mut first_error = None;
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = (end - at).min(MAX_CHUNK);
            let mut c = match Completion::new(self.api) {
                Ok(c) => c,
                Err(e) => {
                    first_error = Some(self.io_error(op, at, n, e));
                    break;
                }
            };
            let r = submit(at, n, c.raw);
            if r < 0 {
                first_error = Some(self.io_error(op, at, n, errno_of(r)));
                break;
            }
            c.submitted = true;
            pending.push((at, n, c));
            at += n;
        }
        for (at, n, c) in &mut pending {
            let rv = c.wait();
            if rv < 0 && first_error.is_none() {
                first_error = Some(self.io_error(op, *at, *n, Errno(-rv as i32)));
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Reads exactly `buf.len()` bytes at `offset` (holes read as zeroes).
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), RbdError> {
        let len = buf.len();
        let p = buf.as_mut_ptr().cast::<c_char>();
        let n = self.submit_wait("read", offset, len as u64, |c| {
            // SAFETY: `buf` stays borrowed (writable, `len` bytes) until the completion has
            // been waited for, which submit_wait does before returning, also on unwind.
            unsafe { (self.api.rbd_aio_read2)(self.raw, offset, len, p, c, 0) }
        })?;
        if n != len {
            // librbd clips reads at the end of the image: it shrank under us.
            return Err(self.io_error("read", offset, len as u64, Errno::EIO));
        }
        Ok(())
    }

    /// Writes `buf` at `offset`; with `fua` the data is durable when this returns (see the
    /// module doc for when that is native).
    pub fn write(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), RbdError> {
        let len = buf.len();
        let p = buf.as_ptr().cast::<c_char>();
        let flags = if fua && self.native_fua {
            sys::OP_FLAG_FADVISE_FUA
        } else {
            0
        };
        self.submit_wait("write", offset, len as u64, |c| {
            // SAFETY: `buf` stays borrowed (readable, `len` bytes) until the completion has
            // been waited for.
            unsafe { (self.api.rbd_aio_write2)(self.raw, offset, len, p, c, flags) }
        })?;
        if fua && !self.native_fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Makes `[offset, offset+len)` read as zeroes, exactly (unlike discard). With `thick`
    /// the range stays allocated (zeroes are written); otherwise librbd may deallocate whole
    /// objects. With `fua` it is durable when this returns.
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        thick: bool,
        fua: bool,
    ) -> Result<(), RbdError> {
        let zero_flags = if thick {
            sys::WRITE_ZEROES_FLAG_THICK_PROVISION
        } else {
            0
        };
        self.submit_chunked("write zeroes", offset, len, |at, n, c| {
            // SAFETY: no buffer is involved; `n` fits in usize (at most MAX_CHUNK).
            unsafe { (self.api.rbd_aio_write_zeroes)(self.raw, at, n as usize, c, zero_flags, 0) }
        })?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Discards `[offset, offset+len)`: advisory, librbd ignores pieces smaller than its
    /// discard granularity (64 KiB by default) and what it discards reads as zeroes.
    pub fn discard(&self, offset: u64, len: u64, fua: bool) -> Result<(), RbdError> {
        self.submit_chunked("discard", offset, len, |at, n, c| {
            // SAFETY: no buffer is involved.
            unsafe { (self.api.rbd_aio_discard)(self.raw, at, n, c) }
        })?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Waits until every write completed so far is durable on the OSDs.
    pub fn flush(&self) -> Result<(), RbdError> {
        self.submit_wait("flush", 0, 0, |c| {
            // SAFETY: no buffer is involved.
            unsafe { (self.api.rbd_aio_flush)(self.raw, c) }
        })
        .map(|_| ())
    }

    /// Submits `op` at `offset` and returns at once: librbd carries it out on its own
    /// threads and `done` gets `buf` back with the result, called once on one of librbd's
    /// threads (see "Thread model" in the module doc). A read fills `buf[at..at+len]`, a
    /// write sends it. If the submission itself fails, `done` is not called and the buffer
    /// comes back with the error.
    ///
    /// Only what one librbd request does is taken: a FUA write when FUA is native
    /// ([`Image::native_fua`]), zeroes and discards of at most [`MAX_CHUNK`] bytes without
    /// FUA. Anything else is refused with EINVAL: the synchronous methods do it.
    pub fn submit<F>(
        &self,
        op: AioOp,
        offset: u64,
        buf: Vec<u8>,
        done: F,
    ) -> Result<(), (Vec<u8>, RbdError)>
    where
        F: FnOnce(Vec<u8>, Result<(), RbdError>) + Send + 'static,
    {
        let (name, len, data) = match op {
            AioOp::Read { at, len } | AioOp::Write { at, len, .. } => {
                let name = if matches!(op, AioOp::Read { .. }) {
                    "read"
                } else {
                    "write"
                };
                if at.checked_add(len).is_none_or(|end| end > buf.len()) {
                    let e = self.io_error(name, offset, len as u64, Errno::EINVAL);
                    return Err((buf, e));
                }
                (name, len as u64, Some(at))
            }
            AioOp::Flush => ("flush", 0, None),
            AioOp::Discard { len } => ("discard", len, None),
            AioOp::WriteZeroes { len, .. } => ("write zeroes", len, None),
        };
        let refused = match op {
            AioOp::Write { fua, .. } => fua && !self.native_fua,
            AioOp::Discard { len } | AioOp::WriteZeroes { len, .. } => len > MAX_CHUNK,
            AioOp::Read { .. } | AioOp::Flush => false,
        };
        if refused {
            return Err((buf, self.io_error(name, offset, len, Errno::EINVAL)));
        }
        let mut pending = Box::new(Pending {
            buf,
            done,
            api: self.api,
            op: name,
            offset,
            len,
            spec: self.spec.clone(),
            expect: matches!(op, AioOp::Read { .. }).then_some(len as usize),
        });
        // The data pointer is into the Vec's heap block, which neither moving the Box nor
        // handing the Box to librbd moves.
        let p = data.map_or(ptr::null_mut(), |at| {
            // SAFETY: `at + len <= buf.len()` was checked above.
            unsafe { pending.buf.as_mut_ptr().add(at) }.cast::<c_char>()
        });
        let arg = Box::into_raw(pending).cast::<c_void>();
        // Reclaims the box of a request that was never submitted.
        let unsubmitted = |errno: Errno| {
            // SAFETY: `arg` came from Box::into_raw above and librbd holds no copy of it
            // (the completion was not created, or released before any submission).
            let pending = unsafe { Box::from_raw(arg.cast::<Pending<F>>()) };
            let e = self.io_error(name, offset, len, errno);
            Err((pending.buf, e))
        };
        let mut c = ptr::null_mut();
        // SAFETY: `on_complete::<F>` matches rbd_callback_t and expects exactly this `arg`.
        let r =
            unsafe { (self.api.rbd_aio_create_completion)(arg, Some(on_complete::<F>), &mut c) };
        if r < 0 {
            return unsubmitted(errno_of(r));
        }
        // SAFETY: `c` is a fresh completion; the buffer (`p`, `len` bytes for read and write)
        // is owned by the pending request, which only the completion callback frees, after
        // librbd is done with it.
        let r = unsafe {
            match op {
                AioOp::Read { len, .. } => (self.api.rbd_aio_read2)(self.raw, offset, len, p, c, 0),
                AioOp::Write { len, fua, .. } => {
                    let flags = if fua { sys::OP_FLAG_FADVISE_FUA } else { 0 };
                    (self.api.rbd_aio_write2)(self.raw, offset, len, p, c, flags)
                }
                AioOp::Flush => (self.api.rbd_aio_flush)(self.raw, c),
                AioOp::Discard { len } => (self.api.rbd_aio_discard)(self.raw, offset, len, c),
                AioOp::WriteZeroes { len, thick } => {
                    let zero_flags = if thick {
                        sys::WRITE_ZEROES_FLAG_THICK_PROVISION
                    } else {
                        0
                    };
                    (self.api.rbd_aio_write_zeroes)(
                        self.raw,
                        offset,
                        len as usize,
                        c,
                        zero_flags,
                        0,
                    )
                }
            }
        };
        if r < 0 {
            // SAFETY: the request was refused, so the callback will never run; the
            // completion is released once.
            unsafe { (self.api.rbd_aio_release)(c) };
            return unsubmitted(errno_of(r));
        }
        Ok(())
    }

    /// The allocated ranges within `[offset, offset+len)` as librbd reports them (parents
    /// included, not whole objects), in ascending order. Ranges not reported read as zeroes.
    /// librbd flushes completed writes first, so they are included.
    pub fn allocated(&self, offset: u64, len: u64) -> Result<Vec<DiffExtent>, RbdError> {
        unsafe extern "C" fn collect(
            off: u64,
            len: usize,
            exists: c_int,
            arg: *mut c_void,
        ) -> c_int {
            // SAFETY: `arg` is the `&mut Vec` passed below, alive and not otherwise touched
            // while rbd_diff_iterate2 runs (it calls back on the calling thread).
            let out = unsafe { &mut *arg.cast::<Vec<DiffExtent>>() };
            out.push(DiffExtent {
                offset: off,
                length: len as u64,
                exists: exists != 0,
            });
            0
        }
        let mut out: Vec<DiffExtent> = Vec::new();
        // SAFETY: `collect` matches the callback type; `out` outlives the call.
        let r = unsafe {
            (self.api.rbd_diff_iterate2)(
                self.raw,
                ptr::null(),
                offset,
                len,
                1,
                0,
                collect,
                (&mut out as *mut Vec<DiffExtent>).cast(),
            )
        };
        if r < 0 {
            return Err(self.io_error("block status", offset, len, errno_of(r)));
        }
        out.sort_by_key(|e| e.offset);
        Ok(out)
    }
}

/// Creates the cluster handle, configures it and connects.
fn connect(api: &'static Api, opts: &RbdOptions) -> Result<Cluster, RbdError> {
    let name = cstring("id", &format!("client.{}", opts.client_id()))?;
    let mut raw = ptr::null_mut();
    // SAFETY: `raw` receives the handle; the names are NUL-terminated and copied.
    let r = unsafe { (api.rados_create2)(&mut raw, c"ceph".as_ptr(), name.as_ptr(), 0) };
    if r < 0 {
        return Err(RbdError::Config {
            what: format!(
                "cannot create a Ceph client handle for client.{}: {}",
                opts.client_id(),
                errno_of(r).describe()
            ),
            errno: errno_of(r),
        });
    }
    let cluster = Cluster { raw, api };
    let conf_path = opts
        .conf
        .as_deref()
        .map(|p| cstring("conf", &p.to_string_lossy()))
        .transpose()?;
    let conf_ptr = conf_path.as_ref().map_or(ptr::null(), |c| c.as_ptr());
    // SAFETY: a NUL-terminated path, or null for Ceph's default search path.
    let r = unsafe { (api.rados_conf_read_file)(cluster.raw, conf_ptr) };
    // Without conf=, having no configuration file is fine (mon_host may come from ceph.*).
    if r < 0 && !(opts.conf.is_none() && r == -libc::ENOENT) {
        return Err(RbdError::Config {
            what: format!(
                "cannot read {}: {}",
                conf_display(opts.conf.as_deref()),
                errno_of(r).describe()
            ),
            errno: errno_of(r),
        });
    }
    if let Some(keyring) = &opts.keyring {
        cluster.set("keyring", &keyring.to_string_lossy())?;
    }
    if let Some(key) = &opts.key {
        cluster.set("key", key)?;
    }
    for (option, default) in CEPH_TIMEOUT_DEFAULTS {
        let osd = option == "rados_osd_op_timeout";
        let value = match opts.timeout {
            Some(t) if osd => t * 2,
            Some(t) => t,
            // Only where the configuration file left Ceph's default.
            None if cluster.get_secs(option) == Some(default) => {
                if osd {
                    DEFAULT_OSD_TIMEOUT
                } else {
                    DEFAULT_TIMEOUT
                }
            }
            None => continue,
        };
        cluster.set(option, &value.as_secs_f64().to_string())?;
    }
    for (option, value) in &opts.ceph {
        cluster.set(option, value)?;
    }
    // Without any monitor address librados would try DNS SRV records and then report a
    // confusing ENOENT; say what is missing instead.
    let mon_host = cluster.get("mon_host").unwrap_or_default();
    if mon_host.trim().is_empty() {
        return Err(RbdError::Config {
            what: format!(
                "no monitor address: {} names none (give conf=CEPH.CONF or ceph.mon_host=)",
                conf_display(opts.conf.as_deref())
            ),
            errno: Errno(libc::ENOENT),
        });
    }
    let timeout = cluster
        .get_secs("client_mount_timeout")
        .map_or(DEFAULT_TIMEOUT, Duration::from_secs_f64);
    // SAFETY: `cluster.raw` is configured and not yet connected.
    let r = unsafe { (api.rados_connect)(cluster.raw) };
    if r < 0 {
        return Err(RbdError::connect(
            conf_display(opts.conf.as_deref()),
            opts.client_id(),
            r,
            timeout,
            opts.key.is_some(),
        ));
    }
    Ok(cluster)
}

/// Opens the image, falling back to read-only when the client may only read. Returns the
/// handle and whether it is writable.
fn open_image(
    api: &'static Api,
    io: &IoCtx,
    opts: &RbdOptions,
    readonly: bool,
) -> Result<(ImageT, bool), RbdError> {
    let spec = opts.spec();
    let name = cstring("image", &opts.image)?;
    let snap = opts
        .snapshot
        .as_deref()
        .map(|s| cstring("snapshot", s))
        .transpose()?;
    let snap_ptr = snap.as_ref().map_or(ptr::null(), |s| s.as_ptr());
    let open = |ro: bool, snap: *const c_char| {
        let mut img = ptr::null_mut();
        // SAFETY: `io.raw` is live; the strings are NUL-terminated (or null for the head).
        let r = unsafe {
            if ro {
                (api.rbd_open_read_only)(io.raw, name.as_ptr(), &mut img, snap)
            } else {
                (api.rbd_open)(io.raw, name.as_ptr(), &mut img, snap)
            }
        };
        if r < 0 {
            Err(r)
        } else {
            Ok(img)
        }
    };
    match open(readonly, snap_ptr) {
        Ok(img) => Ok((img, !readonly)),
        Err(r) if !readonly && (r == -libc::EPERM || r == -libc::EACCES) => {
            let img = open(true, snap_ptr).map_err(|_| RbdError::image(&spec, "open", r))?;
            tracing::info!(
                "rbd: client.{} may only read {spec}: serving it read-only",
                opts.client_id()
            );
            Ok((img, false))
        }
        Err(r) if r == -libc::ENOENT => {
            // Which of the two is missing? Opening the head read-only tells.
            if snap.is_some() {
                if let Ok(img) = open(true, ptr::null()) {
                    // SAFETY: closing the probe image just opened.
                    unsafe { (api.rbd_close)(img) };
                    return Err(RbdError::not_found(
                        &spec,
                        "no such snapshot: check snapshot= (`rbd snap ls POOL/IMAGE` lists them)",
                    ));
                }
            }
            let ns = match opts.namespace.as_deref() {
                Some(ns) if !ns.is_empty() => format!(" namespace '{ns}'"),
                _ => String::new(),
            };
            Err(RbdError::not_found(
                &spec,
                &format!(
                    "no such image in pool '{}'{ns}: check image= (`rbd ls` lists them)",
                    opts.pool
                ),
            ))
        }
        Err(r) => Err(RbdError::image(&spec, "open", r)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pending request as Image::submit makes it, of a read of 4096 bytes at 8192.
    fn pending<F>(done: F, expect: Option<usize>) -> Pending<F> {
        Pending {
            buf: vec![1, 2, 3],
            done,
            api: sys::api().expect("librbd is installed"),
            op: "read",
            offset: 8192,
            len: 4096,
            spec: "rbd/x".into(),
            expect,
        }
    }

    /// Runs the completion callback as librbd would, on a completion that was created but
    /// never submitted (its return value is 0), which the callback then releases.
    fn complete_by_hand<F>(p: Pending<F>)
    where
        F: FnOnce(Vec<u8>, Result<(), RbdError>) + Send + 'static,
    {
        let api = p.api;
        let mut c = ptr::null_mut();
        // SAFETY: creates a completion without callback, released by on_complete below.
        let r = unsafe { (api.rbd_aio_create_completion)(ptr::null_mut(), None, &mut c) };
        assert_eq!(r, 0);
        let arg = Box::into_raw(Box::new(p)).cast::<c_void>();
        // SAFETY: `arg` is a Box<Pending<F>> taken back once by the callback; `c` is live.
        unsafe { on_complete::<F>(c, arg) };
    }

    #[test]
    fn completion_callback_catches_a_panic_of_its_done() {
        complete_by_hand(pending(|_, _| panic!("a sink that panics"), None));
        // Reaching this line is the test: an unwind out of an extern "C" fn aborts.
    }

    #[test]
    fn completion_callback_hands_back_the_buffer_and_a_short_read_is_eio() {
        let (tx, rx) = std::sync::mpsc::channel();
        complete_by_hand(pending(
            move |buf, r| tx.send((buf, r)).unwrap(),
            Some(4096),
        ));
        let (buf, r) = rx.recv().unwrap();
        assert_eq!(buf, [1, 2, 3]);
        let e = r.unwrap_err();
        assert_eq!(e.errno(), Errno::EIO);
        assert!(
            e.to_string()
                .starts_with("rbd: read at offset 8192 length 4096 of rbd/x: "),
            "{e}"
        );
        // A request that is not a read completes with its return value (0): success.
        let (tx, rx) = std::sync::mpsc::channel();
        complete_by_hand(pending(
            move |_, r: Result<(), RbdError>| tx.send(r.is_ok()).unwrap(),
            None,
        ));
        assert!(rx.recv().unwrap());
    }
}
