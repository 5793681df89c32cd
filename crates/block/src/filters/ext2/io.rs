//! The libext2fs I/O manager whose channel is the layer below the ext2 filter.
//!
//! libext2fs does all its I/O through an `io_manager`: a table of C callbacks (open, close,
//! read and write blocks, write bytes, flush, discard, zero out, ...) and a channel each open
//! returns. This one is a static table of `extern "C"` functions written in Rust; its channel
//! carries a [`Below`]: the filter's handle of the layer below (an `Arc`, so the channel
//! cannot outlive it), that layer's size and the capabilities asked once at open, and the
//! last error it returned.
//!
//! `ext2fs_open` names the device by a string and calls the manager's `open` with it, on the
//! same thread, before it returns. Rather than print a pointer into that string and parse
//! it back (nbdkit's way), [`open_fs`] leaves the `Below` in a thread-local slot that the
//! `open` callback takes: no address travels through C, and a stray open finds the slot
//! empty and fails with `EXT2_ET_BAD_DEVICE_NAME`.
//!
//! **Errors.** A failure of the layer below is kept (its errno and message) in
//! [`Below::take_error`] and reported to libext2fs as its errno value (libext2fs' own I/O
//! managers return errno values too), which libext2fs hands back up unchanged; the filter
//! then reports the kept error, so the client gets the errno and the log the message that
//! the layer below gave. A request outside the layer below fails with libext2fs' short
//! read/write codes without reaching it.
//!
//! The channel's `read_error`/`write_error` hooks are not called: only e2fsck installs them,
//! on channels of its own I/O managers.
//!
//! **Panics.** A Rust panic must not unwind into C: every callback runs its body under
//! `catch_unwind`, and a panic becomes EIO for libext2fs, with the panic kept as the error.
//!
//! **Threads.** libext2fs is not thread-safe; a channel is only used by the one filesystem
//! handle that opened it, under the connection's lock (see the filter's module doc).

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_ulong, c_ulonglong, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, PoisonError};

use crate::error::{BlockError, Errno};
use crate::plugin::{Flags, Handle};

use super::sys::{self, Channel, Errcode, IoChannel, IoManager, IoStats};

/// The layer below as the I/O manager uses it.
pub struct Below {
    handle: Arc<dyn Handle>,
    size: u64,
    writable: bool,
    can_flush: bool,
    can_trim: bool,
    zero_native: bool,
    cache_native: bool,
    last_error: Mutex<Option<BlockError>>,
}

impl Below {
    /// The layer below through `handle`, asking its size and capabilities once.
    pub fn new(handle: Arc<dyn Handle>) -> crate::Result<Below> {
        use crate::plugin::Support;
        Ok(Below {
            size: handle.get_size()?,
            writable: handle.can_write()?,
            can_flush: handle.can_flush()?,
            can_trim: handle.can_trim()?,
            zero_native: handle.can_zero()? == Support::Native,
            cache_native: handle.can_cache()? == Support::Native,
            handle,
            last_error: Mutex::new(None),
        })
    }

    /// The handle of the layer below.
    pub fn handle(&self) -> &Arc<dyn Handle> {
        &self.handle
    }

    /// Whether the layer below can be written.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// Whether the layer below can flush.
    pub fn can_flush(&self) -> bool {
        self.can_flush
    }

    /// The error the layer below last returned to libext2fs, if any (and forgets it).
    pub fn take_error(&self) -> Option<BlockError> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Keeps `e` and returns the code libext2fs gets for it: its errno.
    fn fail(&self, e: BlockError) -> Errcode {
        let code = if e.errno.0 > 0 { e.errno.0 } else { libc::EIO };
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(e);
        code as Errcode
    }

    /// Checks `[off, off+len)` against the layer below's size.
    fn fits(&self, off: u64, len: u64) -> bool {
        off.checked_add(len).is_some_and(|end| end <= self.size)
    }

    fn read(&self, buf: &mut [u8], off: u64) -> Errcode {
        if !self.fits(off, buf.len() as u64) {
            return sys::ET_SHORT_READ;
        }
        match self.handle.pread(buf, off, Flags::NONE) {
            Ok(()) => 0,
            Err(e) => self.fail(e),
        }
    }

    fn write(&self, buf: &[u8], off: u64) -> Errcode {
        if !self.fits(off, buf.len() as u64) {
            return sys::ET_SHORT_WRITE;
        }
        match self.handle.pwrite(buf, off, Flags::NONE) {
            Ok(()) => 0,
            Err(e) => self.fail(e),
        }
    }
}

/// A channel's private data.
struct Private {
    below: Arc<Below>,
    /// Added to every offset (the `offset=` channel option; 0 unless libext2fs sets it).
    offset: u64,
    stats: IoStats,
    /// The channel's name, owned here (the channel points into it).
    name: std::ffi::CString,
}

thread_local! {
    /// The layer below for the `open` callback that `ext2fs_open` is about to make.
    static PENDING: RefCell<Option<Arc<Below>>> = const { RefCell::new(None) };
}

/// The device name passed to `ext2fs_open` (it only shows in libext2fs' messages).
const DEVICE_NAME: &CStr = c"sluice-ext2";

/// Opens the filesystem on `below` with `ext2fs_open`'s `flags`.
pub fn open_fs(api: &sys::Api, below: Arc<Below>, flags: c_int) -> Result<sys::Filsys, Errcode> {
    PENDING.with(|p| *p.borrow_mut() = Some(below));
    let mut fs: sys::Filsys = std::ptr::null_mut();
    // SAFETY: the name is NUL-terminated, the manager is a valid static table whose `open`
    // takes the layer below from PENDING, and `fs` is a valid out-pointer.
    let r = unsafe {
        (api.ext2fs_open)(
            DEVICE_NAME.as_ptr(),
            flags,
            0,
            0,
            std::ptr::addr_of!(MANAGER.0).cast_mut(),
            &mut fs,
        )
    };
    // Not left behind if libext2fs failed before opening the channel.
    PENDING.with(|p| p.borrow_mut().take());
    if r == 0 {
        Ok(fs)
    } else {
        Err(r)
    }
}

/// The static manager table (raw pointers are not `Sync`; the table is never written).
struct Manager(IoManager);

// SAFETY: the table is immutable: function pointers and a pointer to a static string.
unsafe impl Sync for Manager {}

static MANAGER: Manager = Manager(IoManager {
    magic: sys::ET_MAGIC_IO_MANAGER,
    name: c"sluice ext2 filter I/O manager".as_ptr(),
    open: Some(io_open),
    close: Some(io_close),
    set_blksize: Some(io_set_blksize),
    read_blk: Some(io_read_blk),
    write_blk: Some(io_write_blk),
    flush: Some(io_flush),
    write_byte: Some(io_write_byte),
    set_option: Some(io_set_option),
    get_stats: Some(io_get_stats),
    read_blk64: Some(io_read_blk64),
    write_blk64: Some(io_write_blk64),
    discard: Some(io_discard),
    cache_readahead: Some(io_cache_readahead),
    zeroout: Some(io_zeroout),
    reserved: [0; 14],
});

/// The bytes a block transfer covers: `count` blocks of `block_size`, or `-count` bytes
/// when `count` is negative (libext2fs' convention). `None` if that is not a sane size.
pub fn transfer_size(block_size: c_int, count: c_int) -> Option<usize> {
    let bytes = if count < 0 {
        -(count as i64)
    } else {
        (count as i64).checked_mul(block_size as i64)?
    };
    usize::try_from(bytes).ok()
}

/// The byte offset of `block` (of `block_size` bytes) after `offset`.
pub fn location(block: u64, block_size: c_int, offset: u64) -> Option<u64> {
    block
        .checked_mul(u64::try_from(block_size).ok()?)?
        .checked_add(offset)
}

/// The byte length and the offset below of a block transfer (`count` as in
/// [`transfer_size`]), or `None` when either overflows.
fn span(channel: &IoChannel, p: &Private, block: u64, count: c_int) -> Option<(usize, u64)> {
    Some((
        transfer_size(channel.block_size, count)?,
        location(block, channel.block_size, p.offset)?,
    ))
}

/// A number as C's `strtoull(arg, &end, 0)` reads it when all of `arg` must be used:
/// decimal, `0x` hex or `0` octal.
pub fn parse_c_number(arg: &str) -> Option<u64> {
    if let Some(hex) = arg.strip_prefix("0x").or_else(|| arg.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else if arg.len() > 1 && arg.starts_with('0') {
        u64::from_str_radix(&arg[1..], 8).ok()
    } else {
        arg.parse().ok()
    }
}

/// Runs a callback's body on a checked channel, turning a panic into EIO.
///
/// # Safety
/// `ch` must be null or a channel made by [`io_open`] and not yet closed.
unsafe fn with_channel(
    ch: Channel,
    what: &str,
    body: impl FnOnce(&mut IoChannel, &mut Private) -> Errcode,
) -> Errcode {
    // SAFETY: per the contract, a non-null `ch` is a live channel of ours.
    let Some(channel) = (unsafe { ch.as_mut() }) else {
        return sys::ET_INVALID_ARGUMENT;
    };
    if channel.magic != sys::ET_MAGIC_IO_CHANNEL || channel.private_data.is_null() {
        return sys::ET_INVALID_ARGUMENT;
    }
    // SAFETY: io_open set private_data to a leaked Box<Private>, freed only by io_close.
    let private = unsafe { &mut *channel.private_data.cast::<Private>() };
    let below = private.below.clone();
    match catch_unwind(AssertUnwindSafe(|| body(channel, private))) {
        Ok(code) => code,
        Err(_) => below.fail(BlockError::new(
            Errno::EIO,
            format!("ext2: the I/O manager's {what} callback panicked"),
        )),
    }
}

/// Catches a panic in a callback that has no channel yet.
fn guard(body: impl FnOnce() -> Errcode) -> Errcode {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(libc::EIO as Errcode)
}

unsafe extern "C" fn io_open(_name: *const c_char, flags: c_int, out: *mut Channel) -> Errcode {
    guard(|| {
        let Some(below) = PENDING.with(|p| p.borrow_mut().take()) else {
            return sys::ET_BAD_DEVICE_NAME;
        };
        if out.is_null() {
            return sys::ET_INVALID_ARGUMENT;
        }
        if flags & sys::IO_FLAG_RW != 0 && !below.writable {
            return libc::EPERM as Errcode;
        }
        let name = DEVICE_NAME.to_owned();
        let private = Box::new(Private {
            below,
            offset: 0,
            stats: IoStats {
                num_fields: 2,
                ..IoStats::default()
            },
            name,
        });
        let name_ptr = private.name.as_ptr().cast_mut();
        let channel = Box::new(IoChannel {
            magic: sys::ET_MAGIC_IO_CHANNEL,
            manager: std::ptr::addr_of!(MANAGER.0).cast_mut(),
            name: name_ptr,
            block_size: 1024,
            read_error: None,
            write_error: None,
            refcount: 1,
            flags: 0,
            reserved: [0; 14],
            private_data: Box::into_raw(private).cast(),
            app_data: std::ptr::null_mut(),
            align: 0,
        });
        // SAFETY: `out` is libext2fs' valid out-pointer for the new channel.
        unsafe { *out = Box::into_raw(channel) };
        0
    })
}

unsafe extern "C" fn io_close(ch: Channel) -> Errcode {
    let mut last = false;
    // SAFETY: libext2fs passes a channel io_open made.
    let code = unsafe {
        with_channel(ch, "close", |channel, _| {
            channel.refcount -= 1;
            last = channel.refcount <= 0;
            0
        })
    };
    if code != 0 || !last {
        return code;
    }
    guard(|| {
        // SAFETY: the last reference: both boxes came from io_open and are freed once.
        unsafe {
            let channel = Box::from_raw(ch);
            drop(Box::from_raw(channel.private_data.cast::<Private>()));
        }
        0
    })
}

unsafe extern "C" fn io_set_blksize(ch: Channel, blksize: c_int) -> Errcode {
    // SAFETY: libext2fs passes a channel io_open made.
    unsafe {
        with_channel(ch, "set_blksize", |channel, _| {
            if blksize <= 0 {
                return sys::ET_INVALID_ARGUMENT;
            }
            channel.block_size = blksize;
            0
        })
    }
}

unsafe extern "C" fn io_read_blk64(
    ch: Channel,
    block: c_ulonglong,
    count: c_int,
    data: *mut c_void,
) -> Errcode {
    // SAFETY: libext2fs passes a channel io_open made.
    unsafe {
        with_channel(ch, "read", |channel, p| {
            let Some((size, off)) = span(channel, p, block, count) else {
                return sys::ET_INVALID_ARGUMENT;
            };
            p.stats.bytes_read += size as u64;
            // SAFETY: libext2fs passes a buffer of at least `size` bytes.
            let buf = std::slice::from_raw_parts_mut(data.cast::<u8>(), size);
            p.below.read(buf, off)
        })
    }
}

unsafe extern "C" fn io_read_blk(
    ch: Channel,
    block: c_ulong,
    count: c_int,
    data: *mut c_void,
) -> Errcode {
    // SAFETY: the same contract as io_read_blk64.
    unsafe { io_read_blk64(ch, block as c_ulonglong, count, data) }
}

unsafe extern "C" fn io_write_blk64(
    ch: Channel,
    block: c_ulonglong,
    count: c_int,
    data: *const c_void,
) -> Errcode {
    // SAFETY: libext2fs passes a channel io_open made.
    unsafe {
        with_channel(ch, "write", |channel, p| {
            let Some((size, off)) = span(channel, p, block, count) else {
                return sys::ET_INVALID_ARGUMENT;
            };
            p.stats.bytes_written += size as u64;
            // SAFETY: libext2fs passes a buffer of at least `size` bytes.
            let buf = std::slice::from_raw_parts(data.cast::<u8>(), size);
            p.below.write(buf, off)
        })
    }
}

unsafe extern "C" fn io_write_blk(
    ch: Channel,
    block: c_ulong,
    count: c_int,
    data: *const c_void,
) -> Errcode {
    // SAFETY: the same contract as io_write_blk64.
    unsafe { io_write_blk64(ch, block as c_ulonglong, count, data) }
}

unsafe extern "C" fn io_write_byte(
    ch: Channel,
    offset: c_ulong,
    size: c_int,
    data: *const c_void,
) -> Errcode {
    // SAFETY: libext2fs passes a channel io_open made.
    unsafe {
        with_channel(ch, "write_byte", |_, p| {
            let (Ok(size), Some(off)) = (usize::try_from(size), offset.checked_add(p.offset))
            else {
                return sys::ET_INVALID_ARGUMENT;
            };
            p.stats.bytes_written += size as u64;
            // SAFETY: libext2fs passes a buffer of `size` bytes.
            let buf = std::slice::from_raw_parts(data.cast::<u8>(), size);
            p.below.write(buf, off)
        })
    }
}

unsafe extern "C" fn io_flush(ch: Channel) -> Errcode {
    // SAFETY: libext2fs passes a channel io_open made.
    unsafe {
        with_channel(ch, "flush", |_, p| {
            if !p.below.can_flush {
                return 0;
            }
            match p.below.handle.flush(Flags::NONE) {
                Ok(()) => 0,
                Err(e) => p.below.fail(e),
            }
        })
    }
}

unsafe extern "C" fn io_set_option(
    ch: Channel,
    option: *const c_char,
    arg: *const c_char,
) -> Errcode {
    // SAFETY: libext2fs passes a channel io_open made.
    unsafe {
        with_channel(ch, "set_option", |_, p| {
            if option.is_null() || arg.is_null() {
                return sys::ET_INVALID_ARGUMENT;
            }
            // SAFETY: both are NUL-terminated strings from libext2fs.
            let (option, arg) = (CStr::from_ptr(option), CStr::from_ptr(arg));
            match (
                option.to_bytes(),
                arg.to_str().ok().and_then(parse_c_number),
            ) {
                (b"offset", Some(off)) if i64::try_from(off).is_ok() => {
                    p.offset = off;
                    0
                }
                _ => sys::ET_INVALID_ARGUMENT,
            }
        })
    }
}

unsafe extern "C" fn io_get_stats(ch: Channel, stats: *mut *mut IoStats) -> Errcode {
    // SAFETY: libext2fs passes a channel io_open made.
    unsafe {
        with_channel(ch, "get_stats", |_, p| {
            if let Some(out) = stats.as_mut() {
                *out = &mut p.stats;
            }
            0
        })
    }
}

/// The byte range of `count` blocks at `block`, for discard, zero out and readahead.
fn block_range(channel: &IoChannel, p: &Private, block: u64, count: u64) -> Option<(u64, u64)> {
    let len = count.checked_mul(u64::try_from(channel.block_size).ok()?)?;
    let off = location(block, channel.block_size, p.offset)?;
    p.below.fits(off, len).then_some((off, len))
}

unsafe extern "C" fn io_discard(ch: Channel, block: c_ulonglong, count: c_ulonglong) -> Errcode {
    // SAFETY: libext2fs passes a channel io_open made.
    unsafe {
        with_channel(ch, "discard", |channel, p| {
            let Some((off, len)) = block_range(channel, p, block, count) else {
                return sys::ET_INVALID_ARGUMENT;
            };
            if !p.below.can_trim || len == 0 {
                return sys::ET_UNIMPLEMENTED;
            }
            match p.below.handle.trim(len, off, Flags::NONE) {
                Ok(()) => 0,
                Err(e) if e.errno == Errno::ENOTSUP || e.errno.0 == libc::EOPNOTSUPP => {
                    sys::ET_UNIMPLEMENTED
                }
                Err(e) => p.below.fail(e),
            }
        })
    }
}

unsafe extern "C" fn io_zeroout(ch: Channel, block: c_ulonglong, count: c_ulonglong) -> Errcode {
    // SAFETY: libext2fs passes a channel io_open made.
    unsafe {
        with_channel(ch, "zeroout", |channel, p| {
            let Some((off, len)) = block_range(channel, p, block, count) else {
                return sys::ET_INVALID_ARGUMENT;
            };
            // Without a native zero, libext2fs writes the zeroes itself.
            if !p.below.zero_native || len == 0 {
                return sys::ET_UNIMPLEMENTED;
            }
            match p.below.handle.zero(len, off, Flags::MAY_TRIM) {
                Ok(()) => 0,
                Err(e) if e.errno == Errno::ENOTSUP || e.errno.0 == libc::EOPNOTSUPP => {
                    sys::ET_UNIMPLEMENTED
                }
                Err(e) => p.below.fail(e),
            }
        })
    }
}

unsafe extern "C" fn io_cache_readahead(
    ch: Channel,
    block: c_ulonglong,
    count: c_ulonglong,
) -> Errcode {
    // SAFETY: libext2fs passes a channel io_open made.
    unsafe {
        with_channel(ch, "cache_readahead", |channel, p| {
            let Some((off, len)) = block_range(channel, p, block, count) else {
                return sys::ET_INVALID_ARGUMENT;
            };
            if !p.below.cache_native || len == 0 {
                return sys::ET_OP_NOT_SUPPORTED;
            }
            match p.below.handle.cache(len, off, Flags::NONE) {
                Ok(()) => 0,
                Err(e) => p.below.fail(e),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_size_counts_blocks_or_negative_bytes() {
        assert_eq!(transfer_size(4096, 2), Some(8192));
        assert_eq!(transfer_size(1024, 1), Some(1024));
        assert_eq!(transfer_size(1024, -1024), Some(1024));
        assert_eq!(transfer_size(4096, -3), Some(3));
        assert_eq!(transfer_size(4096, 0), Some(0));
        assert_eq!(transfer_size(-1, 2), None);
    }

    #[test]
    fn location_adds_the_channel_offset_and_refuses_overflow() {
        assert_eq!(location(3, 4096, 0), Some(12288));
        assert_eq!(location(1, 1024, 512), Some(1536));
        assert_eq!(location(u64::MAX, 4096, 0), None);
        assert_eq!(location(1, -4, 0), None);
    }

    #[test]
    fn parse_c_number_reads_decimal_hex_and_octal_whole() {
        assert_eq!(parse_c_number("1048576"), Some(1 << 20));
        assert_eq!(parse_c_number("0x100"), Some(256));
        assert_eq!(parse_c_number("010"), Some(8));
        assert_eq!(parse_c_number("0"), Some(0));
        assert_eq!(parse_c_number("12k"), None);
        assert_eq!(parse_c_number(""), None);
    }

    #[test]
    fn open_without_a_pending_layer_below_is_a_bad_device_name() {
        let mut ch: Channel = std::ptr::null_mut();
        // SAFETY: a valid name and out-pointer; nothing is pending on this thread.
        let r = unsafe { io_open(DEVICE_NAME.as_ptr(), 0, &mut ch) };
        assert_eq!(r, sys::ET_BAD_DEVICE_NAME);
        assert!(ch.is_null());
    }

    #[test]
    fn callbacks_refuse_a_foreign_channel() {
        let mut fake = IoChannel {
            magic: 0,
            manager: std::ptr::null_mut(),
            name: std::ptr::null_mut(),
            block_size: 1024,
            read_error: None,
            write_error: None,
            refcount: 1,
            flags: 0,
            reserved: [0; 14],
            private_data: std::ptr::null_mut(),
            app_data: std::ptr::null_mut(),
            align: 0,
        };
        let mut buf = [0u8; 1024];
        // SAFETY: the channel is valid memory; its magic makes the callback refuse it.
        let r = unsafe { io_read_blk64(&mut fake, 0, 1, buf.as_mut_ptr().cast()) };
        assert_eq!(r, sys::ET_INVALID_ARGUMENT);
        // SAFETY: a null channel is refused before it is used.
        let r = unsafe { io_flush(std::ptr::null_mut()) };
        assert_eq!(r, sys::ET_INVALID_ARGUMENT);
    }
}
