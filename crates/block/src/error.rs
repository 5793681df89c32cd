//! Errors of the block layer.
//!
//! Every failure a plugin reports is a [`BlockError`]: an errno (what kind of failure, the
//! same vocabulary nbdkit plugins speak) plus a one-line message for the log. The errno alone
//! decides what the NBD client sees ([`BlockError::nbd_error`], following nbdkit's
//! `nbd_errno` mapping), so C, Python and Rust plugins fail the same way on the wire.

use sluice_proto::nbd::consts as nbd;

/// A POSIX errno value (`libc::EIO`, ...). Kept as a newtype so signatures say what they mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl Errno {
    pub const EPERM: Errno = Errno(libc::EPERM);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const ENOMEM: Errno = Errno(libc::ENOMEM);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const ENOSPC: Errno = Errno(libc::ENOSPC);
    pub const EROFS: Errno = Errno(libc::EROFS);
    pub const ENOTSUP: Errno = Errno(libc::ENOTSUP);
    pub const EOVERFLOW: Errno = Errno(libc::EOVERFLOW);
    pub const ESHUTDOWN: Errno = Errno(libc::ESHUTDOWN);
    pub const ERANGE: Errno = Errno(libc::ERANGE);

    /// The NBD wire error for this errno (nbdkit's `server/protocol.c nbd_errno`).
    /// `fast_zero` / `df` say whether the failing request carried those flags: ENOTSUP is only
    /// reported as such for fast-zero requests and EOVERFLOW only for DF reads.
    pub fn to_nbd(self, fast_zero: bool, df: bool) -> u32 {
        match self.0 {
            libc::EROFS | libc::EPERM => nbd::NBD_EPERM,
            libc::EIO => nbd::NBD_EIO,
            libc::ENOMEM => nbd::NBD_ENOMEM,
            libc::EDQUOT | libc::EFBIG | libc::ENOSPC => nbd::NBD_ENOSPC,
            libc::ESHUTDOWN => nbd::NBD_ESHUTDOWN,
            libc::ENOTSUP if fast_zero => nbd::NBD_ENOTSUP,
            libc::EOVERFLOW if df => nbd::NBD_EOVERFLOW,
            _ => nbd::NBD_EINVAL,
        }
    }

    /// The system's text for this errno ("Input/output error"), as `strerror(3)` gives it.
    pub fn describe(self) -> String {
        strerror(&std::io::Error::from_raw_os_error(self.0))
    }
}

/// An I/O error's text as C's `strerror(3)` gives it, which is what nbdkit and QEMU print:
/// std's text without the " (os error N)" it appends. An error that is not an OS error keeps
/// its own text.
pub fn strerror(err: &std::io::Error) -> String {
    let text = err.to_string();
    match text.rfind(" (os error ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// A failed block operation: the errno that goes to the client and the message for the log.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct BlockError {
    pub errno: Errno,
    pub message: String,
}

impl BlockError {
    pub fn new(errno: Errno, message: impl Into<String>) -> Self {
        BlockError {
            errno,
            message: message.into(),
        }
    }

    /// An error with only an errno; the message is the system's text for it.
    pub fn errno(errno: Errno) -> Self {
        BlockError {
            errno,
            message: errno.describe(),
        }
    }

    /// Wraps an I/O error, prefixing what was being done ("pread at 4096").
    pub fn io(context: impl std::fmt::Display, err: std::io::Error) -> Self {
        BlockError {
            errno: Errno(err.raw_os_error().unwrap_or(libc::EIO)),
            message: format!("{context}: {err}"),
        }
    }

    /// The NBD wire error (see [`Errno::to_nbd`]).
    pub fn nbd_error(&self, fast_zero: bool, df: bool) -> u32 {
        self.errno.to_nbd(fast_zero, df)
    }
}

/// Result of block-layer calls.
pub type Result<T, E = BlockError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_is_strerror_text_without_the_os_error_suffix() {
        assert_eq!(Errno::EIO.describe(), "Input/output error");
        assert_eq!(Errno(libc::ENOSPC).describe(), "No space left on device");
        assert_eq!(Errno(9999).describe(), "Unknown error 9999");
    }

    #[test]
    fn strerror_keeps_the_text_of_errors_that_are_not_os_errors() {
        let err = std::io::Error::other("socket path too long");
        assert_eq!(strerror(&err), "socket path too long");
        let err = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(strerror(&err), "No such file or directory");
    }

    #[test]
    fn errno_enotsup_maps_to_einval_unless_fast_zero() {
        assert_eq!(Errno::ENOTSUP.to_nbd(false, false), nbd::NBD_EINVAL);
        assert_eq!(Errno::ENOTSUP.to_nbd(true, false), nbd::NBD_ENOTSUP);
    }

    #[test]
    fn errno_eoverflow_needs_df() {
        assert_eq!(Errno::EOVERFLOW.to_nbd(false, false), nbd::NBD_EINVAL);
        assert_eq!(Errno::EOVERFLOW.to_nbd(false, true), nbd::NBD_EOVERFLOW);
    }

    #[test]
    fn errno_space_errors_map_to_enospc() {
        for e in [libc::EDQUOT, libc::EFBIG, libc::ENOSPC] {
            assert_eq!(Errno(e).to_nbd(false, false), nbd::NBD_ENOSPC);
        }
        assert_eq!(Errno::EROFS.to_nbd(false, false), nbd::NBD_EPERM);
        assert_eq!(Errno(libc::ENOENT).to_nbd(false, false), nbd::NBD_EINVAL);
    }
}
