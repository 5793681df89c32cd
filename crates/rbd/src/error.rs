//! Errors of the RBD backend: librados' and librbd's negative errno, with what was being done
//! and what the user can do about it.
//!
//! Ceph reports everything as a bare negative errno, and the same number means different
//! things at different steps (ENOENT is a missing keyring while connecting, a missing pool
//! when opening the pool, a missing image when opening the image). So the step is part of the
//! error, and [`RbdError`]'s message is written per step and errno: one line that says what
//! was wrong and which parameter to check. [`RbdError::errno`] is what an NBD client sees;
//! conversion into [`BlockError`] keeps both.

use std::time::Duration;

use sluice_block::{BlockError, Errno};

/// A failed RBD operation.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RbdError {
    /// librados/librbd could not be loaded.
    #[error("rbd: {reason}: install librbd1 (Debian) or librbd (Fedora)")]
    Library { reason: String },

    /// The Ceph configuration could not be read or applied.
    #[error("rbd: {what}")]
    Config { what: String, errno: Errno },

    /// Connecting to the cluster (monitors, authentication) failed.
    #[error("rbd: cannot connect to the Ceph cluster ({conf}) as client.{id}: {hint}")]
    Connect {
        conf: String,
        id: String,
        errno: Errno,
        hint: String,
    },

    /// The pool could not be opened.
    #[error("rbd: pool '{pool}': {hint}")]
    Pool {
        pool: String,
        errno: Errno,
        hint: String,
    },

    /// The image (or its snapshot) could not be opened or queried.
    #[error("rbd: image {spec}: {hint}")]
    Image {
        spec: String,
        errno: Errno,
        hint: String,
    },

    /// The image's exclusive lock is held by another client (a writer elsewhere).
    #[error(
        "rbd: image {spec} is locked by another client ({owners}): it is being written \
         elsewhere; stop that client, serve the image read-only, or take the lock over with \
         break-lock=on (which blocklists the other client)"
    )]
    Locked {
        spec: String,
        owners: String,
        errno: Errno,
    },

    /// A data request failed.
    #[error("rbd: {op} at offset {offset} length {len} of {spec}: {}", errno.describe())]
    Io {
        op: &'static str,
        spec: String,
        offset: u64,
        len: u64,
        errno: Errno,
    },
}

impl RbdError {
    /// The errno the failure stands for (what an NBD client is told).
    pub fn errno(&self) -> Errno {
        match self {
            RbdError::Library { .. } => Errno(libc::ELIBACC),
            RbdError::Config { errno, .. }
            | RbdError::Connect { errno, .. }
            | RbdError::Pool { errno, .. }
            | RbdError::Image { errno, .. }
            | RbdError::Locked { errno, .. }
            | RbdError::Io { errno, .. } => *errno,
        }
    }

    /// Connecting failed with librados' return value `r`.
    /// `key_given`: the key came from `key=` (so a malformed one is the likely EINVAL).
    pub(crate) fn connect(
        conf: String,
        id: &str,
        r: i32,
        timeout: Duration,
        key_given: bool,
    ) -> RbdError {
        let errno = errno_of(r);
        let hint = match errno.0 {
            libc::EACCES | libc::EPERM => format!(
                "authentication failed ({}): check id=, keyring= and key=",
                errno.describe()
            ),
            libc::ENOENT => {
                "no key found for this client: give keyring= or key=, or fix the keyring in the \
                 configuration"
                    .to_string()
            }
            libc::ETIMEDOUT => format!(
                "no monitor answered within {} s: is the cluster running, and is mon_host in \
                 the configuration right?",
                timeout.as_secs_f64()
            ),
            libc::EINVAL if key_given => {
                "key= is not a valid Ceph key (copy it from `ceph auth get-key client.ID`)"
                    .to_string()
            }
            libc::EINVAL => format!(
                "{}: check mon_host and the client's key in the configuration",
                errno.describe()
            ),
            _ => errno.describe(),
        };
        RbdError::Connect {
            conf,
            id: id.to_owned(),
            errno,
            hint,
        }
    }

    /// Opening pool `pool` failed with `r`.
    pub(crate) fn pool(pool: &str, id: &str, r: i32) -> RbdError {
        let errno = errno_of(r);
        let hint = match errno.0 {
            libc::ENOENT => "no such pool: check pool= (`ceph osd pool ls` lists them)".to_string(),
            libc::EACCES | libc::EPERM => {
                format!(
                    "client.{id} may not use it ({}): check its caps",
                    errno.describe()
                )
            }
            _ => errno.describe(),
        };
        RbdError::Pool {
            pool: pool.to_owned(),
            errno,
            hint,
        }
    }

    /// Opening or querying image `spec` failed with `r`; `what` says which step.
    pub(crate) fn image(spec: &str, what: &str, r: i32) -> RbdError {
        let errno = errno_of(r);
        let hint = match errno.0 {
            libc::EACCES | libc::EPERM | libc::ESHUTDOWN => format!(
                "{what}: {}: check the client's caps (or whether it is blocklisted)",
                errno.describe()
            ),
            _ => format!("{what}: {}", errno.describe()),
        };
        RbdError::Image {
            spec: spec.to_owned(),
            errno,
            hint,
        }
    }

    /// A missing image or snapshot, which librbd reports as a plain ENOENT.
    pub(crate) fn not_found(spec: &str, what: &str) -> RbdError {
        RbdError::Image {
            spec: spec.to_owned(),
            errno: Errno(libc::ENOENT),
            hint: what.to_owned(),
        }
    }
}

/// librados/librbd return `-errno`; anything else non-negative was success and never gets
/// here, so an unexpected positive value is reported as EIO.
pub(crate) fn errno_of(r: i32) -> Errno {
    if r < 0 {
        Errno(-r)
    } else {
        Errno::EIO
    }
}

impl From<RbdError> for BlockError {
    fn from(e: RbdError) -> BlockError {
        BlockError::new(e.errno(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_timeout_says_what_to_check() {
        let e = RbdError::connect(
            "/x/ceph.conf".into(),
            "admin",
            -libc::ETIMEDOUT,
            Duration::from_secs(3),
            false,
        );
        assert_eq!(e.errno(), Errno(libc::ETIMEDOUT));
        assert_eq!(
            e.to_string(),
            "rbd: cannot connect to the Ceph cluster (/x/ceph.conf) as client.admin: no \
             monitor answered within 3 s: is the cluster running, and is mon_host in the \
             configuration right?"
        );
    }

    #[test]
    fn connect_permission_names_the_parameters() {
        let e = RbdError::connect(
            "c".into(),
            "bob",
            -libc::EACCES,
            Duration::from_secs(1),
            true,
        );
        assert!(
            e.to_string().contains("client.bob: authentication failed"),
            "{e}"
        );
        assert!(e.to_string().contains("keyring= and key="), "{e}");
    }

    #[test]
    fn pool_missing_and_io_messages() {
        let e = RbdError::pool("nope", "admin", -libc::ENOENT);
        assert_eq!(
            e.to_string(),
            "rbd: pool 'nope': no such pool: check pool= (`ceph osd pool ls` lists them)"
        );
        let e = RbdError::Io {
            op: "write",
            spec: "rbd/d".into(),
            offset: 4096,
            len: 512,
            errno: Errno::EIO,
        };
        assert_eq!(
            e.to_string(),
            "rbd: write at offset 4096 length 512 of rbd/d: Input/output error"
        );
        let b: BlockError = e.into();
        assert_eq!(b.errno, Errno::EIO);
    }

    #[test]
    fn errno_of_positive_is_eio() {
        assert_eq!(errno_of(-libc::ENOENT), Errno(libc::ENOENT));
        assert_eq!(errno_of(3), Errno::EIO);
    }
}
