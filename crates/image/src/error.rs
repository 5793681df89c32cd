//! Errors of the image layer.
//!
//! Opening a node fails with an [`ImageError`]: a small set of matchable kinds, each with the
//! context a user needs (the path, the option, the lock) in a one-line message that says what
//! was wrong. Each error knows the errno an NBD client would see ([`ImageError::errno`]) and the
//! QMP error class the daemon reports ([`ImageError::qmp_class`]), so the CLI and the QMP
//! monitor fail the same way. Request-time failures are [`sluice_block::BlockError`]s, like
//! every other plugin's.

use std::path::{Path, PathBuf};

use sluice_block::{BlockError, Errno};

use crate::header::HeaderError;

/// Why a node or an image could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// An option is missing, unknown or has a bad value.
    #[error("{0}")]
    InvalidOption(String),

    /// A node named as a child does not exist.
    #[error("cannot find node '{0}'")]
    NodeNotFound(String),

    /// The file could not be opened or read.
    #[error("{}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },

    /// The qcow2 header (or the table it points to) is truncated, corrupt or uses a feature
    /// sluice does not implement.
    #[error("{}: {source}", path.display())]
    BadImage { path: PathBuf, source: HeaderError },

    /// Another process (or another node of this one) holds a lock that excludes ours
    /// (qemu's image locking convention).
    #[error(
        "{}: failed to get {}\"{perm}\" lock: is another process using the image? \
         (qemu-img/qemu-io accept -U to look at an image in use)",
        path.display(),
        if *shared { "shared " } else { "" }
    )]
    Locked {
        path: PathBuf,
        perm: &'static str,
        /// True: we could not unshare `perm` because someone else uses it.
        shared: bool,
    },

    /// Following backing files from the headers came back to an image already in the chain.
    #[error("backing chain loop: {chain}")]
    BackingLoop { chain: String },

    /// The chain of backing files is longer than sluice follows.
    #[error("{}: backing chain is longer than {max} images", path.display())]
    ChainTooLong { path: PathBuf, max: usize },

    /// A backing file named in an image header cannot be opened.
    #[error("{}: cannot open its backing file {}: {source}", image.display(), backing.display())]
    Backing {
        image: PathBuf,
        backing: PathBuf,
        source: Box<ImageError>,
    },

    /// The image names a backing file but the user did not say how to treat it.
    #[error(
        "{}: the image has a backing file ({backing}); pass backing=auto to open the chain its \
         headers name, backing=PATH to name each backing file, or backing=none to serve the \
         top layer alone",
        path.display()
    )]
    BackingNotAllowed { path: PathBuf, backing: String },

    /// The node graph would break a rule (a writable node over a read-only file, a writable
    /// backing, ...).
    #[error("{0}")]
    Permission(String),

    /// The image's persistent bitmaps could not be loaded or saved.
    #[error("{}: {source}", path.display())]
    Bitmaps {
        path: PathBuf,
        source: crate::qcow2_bitmaps::Qcow2BitmapError,
    },

    /// A raw image's sidecar bitmap file could not be written (or read).
    #[error("{}: its bitmap file {}: {source}", image.display(), path.display())]
    Sidecar {
        path: PathBuf,
        image: PathBuf,
        source: crate::sidecar::SidecarError,
    },

    /// A raw image's sidecar bitmap file is not one this sluice can read (bad magic, a newer
    /// version, truncated, corrupt): the image is not opened rather than opened without it.
    #[error(
        "{}: {source}; move the file away to open the image without its bitmaps",
        path.display()
    )]
    SidecarUnreadable {
        path: PathBuf,
        source: crate::sidecar::SidecarError,
    },

    /// A bitmap the command line asked to serve (`bitmap=NAME`) cannot be used: it was
    /// loaded inconsistent (left `in_use` by a writer that did not close the image, or, for
    /// a raw image's sidecar, the image changed since it was saved).
    #[error("{}", unusable(path, name, why, sidecar.as_deref()))]
    BitmapUnusable {
        path: PathBuf,
        name: String,
        why: crate::bitmaps::BitmapError,
        /// The raw image's sidecar file (None: a qcow2 image).
        sidecar: Option<PathBuf>,
    },

    /// An I/O error while opening (imago's own checks land here too).
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

/// [`ImageError::BitmapUnusable`]'s message: qemu-nbd's words, why, and the way back.
fn unusable(
    path: &Path,
    name: &str,
    why: &crate::bitmaps::BitmapError,
    sidecar: Option<&Path>,
) -> String {
    let p = path.display();
    match sidecar {
        None => format!(
            "image: {why} ({p} was not closed cleanly while it recorded): remove it with \
             `qemu-img bitmap --remove {p} {name}`, or replace it with block-dirty-bitmap-add \
             in sluice daemon"
        ),
        Some(s) => format!(
            "image: {why} ({p} was changed by another program, or not closed cleanly, since \
             its bitmaps were saved in {}): remove it with block-dirty-bitmap-remove or \
             replace it with block-dirty-bitmap-add in sluice daemon, or delete {} to drop \
             every bitmap of the image",
            s.display(),
            s.display()
        ),
    }
}

impl ImageError {
    /// The errno a client would see for this error.
    pub fn errno(&self) -> Errno {
        match self {
            ImageError::InvalidOption(_) | ImageError::Permission(_) => Errno::EINVAL,
            ImageError::NodeNotFound(_) => Errno(libc::ENOENT),
            ImageError::Open { source, .. } | ImageError::Io { source, .. } => {
                Errno(source.raw_os_error().unwrap_or(libc::EIO))
            }
            ImageError::BadImage { .. } => Errno::EINVAL,
            ImageError::Locked { .. } => Errno(libc::EAGAIN),
            ImageError::BackingLoop { .. } | ImageError::ChainTooLong { .. } => Errno(libc::ELOOP),
            ImageError::Backing { source, .. } => source.errno(),
            ImageError::BackingNotAllowed { .. } => Errno::EPERM,
            ImageError::Bitmaps { .. }
            | ImageError::BitmapUnusable { .. }
            | ImageError::Sidecar { .. }
            | ImageError::SidecarUnreadable { .. } => Errno::EIO,
        }
    }

    /// The QMP error class (qemu reports every blockdev-add failure as `GenericError`, except
    /// a missing node, `DeviceNotFound`).
    pub fn qmp_class(&self) -> &'static str {
        match self {
            ImageError::NodeNotFound(_) => "DeviceNotFound",
            _ => "GenericError",
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> ImageError {
        ImageError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn open(path: &Path, source: std::io::Error) -> ImageError {
        ImageError::Open {
            path: path.to_owned(),
            source,
        }
    }

    pub(crate) fn bad_image(path: &Path, source: HeaderError) -> ImageError {
        ImageError::BadImage {
            path: path.to_owned(),
            source,
        }
    }
}

impl From<ImageError> for BlockError {
    fn from(e: ImageError) -> BlockError {
        BlockError::new(e.errno(), e.to_string())
    }
}

/// An imago I/O error on the request path, as the client's errno plus context.
pub(crate) fn io_error(context: impl std::fmt::Display, err: std::io::Error) -> BlockError {
    // A plugin node's device failed: its own errno (see `node/plugin.rs`).
    let inner = err.get_ref().and_then(|e| e.downcast_ref::<BlockError>());
    let errno = match (err.raw_os_error(), inner) {
        (Some(e), _) => Errno(e),
        (None, Some(b)) => b.errno,
        (None, None) => match err.kind() {
            std::io::ErrorKind::Unsupported => Errno::ENOTSUP,
            std::io::ErrorKind::StorageFull => Errno::ENOSPC,
            std::io::ErrorKind::PermissionDenied => Errno::EPERM,
            _ => Errno::EIO,
        },
    };
    BlockError::new(errno, format!("{context}: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locked_message_names_path_and_lock() {
        let e = ImageError::Locked {
            path: "/x/a.qcow2".into(),
            perm: "write",
            shared: false,
        };
        assert_eq!(
            e.to_string(),
            "/x/a.qcow2: failed to get \"write\" lock: is another process using the image? \
             (qemu-img/qemu-io accept -U to look at an image in use)"
        );
        assert_eq!(e.qmp_class(), "GenericError");
    }

    #[test]
    fn node_not_found_is_device_not_found() {
        let e = ImageError::NodeNotFound("base".into());
        assert_eq!(e.qmp_class(), "DeviceNotFound");
        assert_eq!(e.to_string(), "cannot find node 'base'");
    }

    #[test]
    fn io_error_kind_maps_to_errno() {
        let e = io_error("x", std::io::ErrorKind::Unsupported.into());
        assert_eq!(e.errno, Errno::ENOTSUP);
        let e = io_error("x", std::io::Error::other("boom"));
        assert_eq!(e.errno, Errno::EIO);
        let e = io_error("x", std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.errno, Errno::ENOSPC);
    }
}
