//! What nbdkit guarantees a filter when it calls the layer below, for filters that change a
//! capability and so can no longer rely on the export policy at the top of the stack.
//!
//! In nbdkit the plugin layer emulates what a plugin lacks (FUA by a flush, zero by writes,
//! cache by reads, extents as "all data") for *any* caller, so a filter may pass FUA down when
//! `next->can_fua` is not NONE, and `next->zero` never fails with ENOTSUP unless the caller
//! asked for a fast zero. In sluice that emulation lives once, in [`crate::export`], at the
//! top of the stack, which is exact for filters that pass capabilities through. A filter that
//! advertises more than the layer below (fua=native over an emulating plugin, a blocksize or
//! cow layer that writes on its own) asks the layer below's capabilities once in `open`
//! ([`Lower::query`]) and sends its own calls through these methods, which apply the same
//! rules as the export policy.

use crate::error::{BlockError, Errno, Result};
use crate::extents::Extents;
use crate::filter::Next;
use crate::plugin::{Flags, Handle, Support};

/// Size of the zero buffer used when zeroing is emulated by writes.
const ZERO_CHUNK: usize = 1024 * 1024;

/// The layer below's capabilities, asked once per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lower {
    pub writable: bool,
    pub flush: bool,
    pub fua: Support,
    pub zero: Support,
    pub fast_zero: bool,
    pub trim: bool,
    pub cache: Support,
    pub extents: bool,
}

impl Lower {
    /// Asks `next` what it can do (`readonly` connections ask only the read side).
    pub fn query(next: &Next, readonly: bool) -> Result<Lower> {
        let writable = !readonly && next.can_write()?;
        let flush = next.can_flush()?;
        Ok(Lower {
            writable,
            flush,
            fua: if writable {
                match next.can_fua()? {
                    Support::Emulate if !flush => Support::None,
                    s => s,
                }
            } else {
                Support::None
            },
            zero: if writable {
                next.can_zero()?
            } else {
                Support::None
            },
            fast_zero: writable && next.can_fast_zero()?,
            trim: writable && next.can_trim()?,
            cache: next.can_cache()?,
            extents: next.can_extents()?,
        })
    }

    /// The flags the layer below may see: FUA only if it handles FUA itself.
    fn flags(&self, flags: Flags) -> Flags {
        if self.fua == Support::Native {
            flags
        } else {
            flags.without(Flags::FUA)
        }
    }

    /// After a successful write: the flush that emulates FUA below.
    fn finish(&self, next: &Next, flags: Flags) -> Result<()> {
        if flags.contains(Flags::FUA) && self.fua == Support::Emulate {
            next.flush(Flags::NONE)?;
        }
        Ok(())
    }

    /// `next->pwrite`: FUA honoured whatever the layer below does with it.
    pub fn pwrite(&self, next: &Next, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        next.pwrite(buf, offset, self.flags(flags))?;
        self.finish(next, flags)
    }

    /// `next->trim`, with FUA honoured.
    pub fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        next.trim(count, offset, self.flags(flags))?;
        self.finish(next, flags)
    }

    /// `next->zero`: native if the layer below can, else (or on ENOTSUP) written zeroes; fails
    /// with ENOTSUP only for a fast zero that would need writes.
    pub fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let fast = flags.contains(Flags::FAST_ZERO);
        if fast && !self.fast_zero {
            return Err(BlockError::new(
                Errno::ENOTSUP,
                "zero: fast zero is not supported by the layer below",
            ));
        }
        if self.zero == Support::Native {
            match next.zero(count, offset, self.flags(flags)) {
                Ok(()) => return self.finish(next, flags),
                Err(e) if (e.errno == Errno::ENOTSUP || e.errno.0 == libc::EOPNOTSUPP) && !fast => {
                }
                Err(e) => return Err(e),
            }
        } else if fast {
            return Err(BlockError::new(
                Errno::ENOTSUP,
                "zero: fast zero requested but zeroing would need writes",
            ));
        }
        write_zeroes(
            next,
            count,
            offset,
            self.flags(flags).without(Flags::MAY_TRIM),
        )?;
        self.finish(next, flags)
    }

    /// `next->cache`: native, or emulated by reading, or nothing when the layer below has no
    /// cache.
    pub fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        match self.cache {
            Support::Native => next.cache(count, offset, flags),
            Support::Emulate => read_and_discard(next, count, offset),
            Support::None => Ok(()),
        }
    }

    /// `next->extents`: the layer below's answer, or all data when it has none.
    pub fn extents(
        &self,
        next: &Next,
        count: u64,
        offset: u64,
        flags: Flags,
        out: &mut Extents,
    ) -> Result<()> {
        if self.extents {
            next.extents(count, offset, flags, out)
        } else {
            out.add(offset, count, 0)
        }
    }

    /// `next->flush`, or nothing when the layer below cannot flush.
    pub fn flush(&self, next: &Next) -> Result<()> {
        if self.flush {
            next.flush(Flags::NONE)
        } else {
            Ok(())
        }
    }
}

/// Writes `count` zero bytes at `offset` with pwrite, in chunks; FUA (if any) on the last.
pub fn write_zeroes(next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
    let zeroes = zero_buffer();
    let mut done = 0u64;
    while done < count {
        let n = (count - done).min(ZERO_CHUNK as u64) as usize;
        let f = if done + n as u64 == count {
            flags
        } else {
            flags.without(Flags::FUA)
        };
        next.pwrite(&zeroes[..n], offset + done, f)?;
        done += n as u64;
    }
    Ok(())
}

/// Reads `[offset, offset+count)` and throws it away (cache emulation).
pub fn read_and_discard(next: &Next, count: u64, offset: u64) -> Result<()> {
    let mut buf = vec![0u8; count.min(ZERO_CHUNK as u64) as usize];
    let mut done = 0u64;
    while done < count {
        let n = (count - done).min(buf.len() as u64) as usize;
        next.pread(&mut buf[..n], offset + done, Flags::NONE)?;
        done += n as u64;
    }
    Ok(())
}

/// A shared buffer of [`ZERO_CHUNK`] zero bytes.
pub fn zero_buffer() -> &'static [u8] {
    static ZEROES: std::sync::OnceLock<Box<[u8]>> = std::sync::OnceLock::new();
    ZEROES.get_or_init(|| vec![0u8; ZERO_CHUNK].into_boxed_slice())
}

/// nbdkit_extents_full: asks `next` repeatedly until `[offset, offset+count)` is covered
/// (a layer may answer less than asked), adding everything to `out`.
pub fn extents_full(
    next: &Next,
    count: u64,
    offset: u64,
    flags: Flags,
    out: &mut Extents,
) -> Result<()> {
    let end = offset + count;
    let mut at = offset;
    while at < end {
        let mut part = Extents::new(at, end);
        next.extents(end - at, at, flags.without(Flags::REQ_ONE), &mut part)?;
        let Some(last) = part.as_slice().last() else {
            return Err(BlockError::new(
                Errno::EIO,
                "extents: the layer below returned no extents",
            ));
        };
        at = last.offset + last.length;
        for e in part.as_slice() {
            out.add(e.offset, e.length, e.kind)?;
        }
    }
    Ok(())
}
