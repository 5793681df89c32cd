//! Image locking with qemu's convention, so that sluice, qemu-img, qemu-io, qemu-nbd and QEMU
//! exclude each other.
//!
//! qemu (block/file-posix.c) expresses "who uses this file how" with open-file-description
//! (OFD) byte-range locks on the image file itself: for each permission bit `i` (consistent
//! read, write, write-unchanged, resize) a user holds a shared lock on byte `100 + i` if it
//! *uses* the permission, and a shared lock on byte `200 + i` if it does *not share* it with
//! others. Before going ahead it tests, without locking, that nobody holds `200 + i` for a
//! permission it uses and nobody holds `100 + i` for a permission it refuses to share. All
//! locks are shared (read) locks, so two users only conflict through that test, and the
//! kernel drops them when the last descriptor of the open file description closes (also on
//! kill -9). OFD locks, unlike POSIX locks, also conflict between two descriptions opened by
//! one process, which is what makes "one writable node per image" hold inside one sluice.
//!
//! The permissions sluice takes follow what qemu takes for the same use (observed with
//! /proc/locks): a qcow2 node uses consistent read (plus write and resize when writable) and
//! never shares write or resize, read-only or not, because its metadata must not change
//! under it; a read-only raw node uses consistent read and shares everything; a writable raw
//! node uses consistent read and write and, stricter than qemu-nbd, shares neither write nor
//! resize, so that two writers of one raw image are refused as well.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::ImageError;

/// qemu's permission bits (BLK_PERM_*).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Perms(pub u8);

impl Perms {
    pub const NONE: Perms = Perms(0);
    pub const CONSISTENT_READ: Perms = Perms(0x1);
    pub const WRITE: Perms = Perms(0x2);
    pub const WRITE_UNCHANGED: Perms = Perms(0x4);
    pub const RESIZE: Perms = Perms(0x8);
    pub const ALL: Perms = Perms(0xf);

    pub fn contains(self, p: Perms) -> bool {
        self.0 & p.0 == p.0
    }

    fn bits(self) -> impl Iterator<Item = (usize, Perms)> {
        (0..4)
            .map(|i| (i, Perms(1 << i)))
            .filter(move |(_, p)| self.contains(*p))
    }
}

impl std::ops::BitOr for Perms {
    type Output = Perms;
    fn bitor(self, rhs: Perms) -> Perms {
        Perms(self.0 | rhs.0)
    }
}

/// qemu's names for the permission bits, used in its "Failed to get ... lock" messages.
fn perm_name(i: usize) -> &'static str {
    ["consistent read", "write", "write unchanged", "resize"][i]
}

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// Whether to lock at all (the file driver's `locking=` option).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Locking {
    /// Lock; if the file system does not support OFD locks, warn and go on.
    #[default]
    Auto,
    /// Lock; fail if the file system cannot.
    On,
    /// Do not lock (for images known not to be shared).
    Off,
}

impl Locking {
    pub fn from_name(s: &str) -> Option<Locking> {
        match s {
            "auto" => Some(Locking::Auto),
            "on" => Some(Locking::On),
            "off" => Some(Locking::Off),
            _ => None,
        }
    }
}

/// What a file's users need, accumulated over the nodes that use it.
#[derive(Debug)]
pub struct ImageLock {
    path: PathBuf,
    locking: Locking,
    used: Perms,
    unshared: Perms,
    /// False once we found the file system cannot lock (Auto only).
    active: bool,
}

impl ImageLock {
    pub fn new(path: &Path, locking: Locking) -> ImageLock {
        ImageLock {
            path: path.to_owned(),
            locking,
            used: Perms::NONE,
            unshared: Perms::NONE,
            active: locking != Locking::Off,
        }
    }

    /// Adds a user that needs `used` and refuses to share `unshared`: takes the lock bytes on
    /// `file` (which must stay open as long as the locks should hold), then tests that no
    /// other open file description conflicts. On a conflict the bytes taken stay locked (they
    /// are released with the file), as in qemu.
    pub fn add(&mut self, file: &File, used: Perms, unshared: Perms) -> Result<(), ImageError> {
        if !self.active {
            return Ok(());
        }
        for (i, _) in used.bits() {
            if let Err(e) = ofd_lock(file, PERM_BASE + i as i64) {
                return self.unsupported(e);
            }
        }
        for (i, _) in unshared.bits() {
            if let Err(e) = ofd_lock(file, SHARED_BASE + i as i64) {
                return self.unsupported(e);
            }
        }
        for (i, _) in used.bits() {
            if ofd_test(file, SHARED_BASE + i as i64).map_err(|e| self.io(e))? {
                return Err(ImageError::Locked {
                    path: self.path.clone(),
                    perm: perm_name(i),
                    shared: false,
                });
            }
        }
        for (i, _) in unshared.bits() {
            if ofd_test(file, PERM_BASE + i as i64).map_err(|e| self.io(e))? {
                return Err(ImageError::Locked {
                    path: self.path.clone(),
                    perm: perm_name(i),
                    shared: true,
                });
            }
        }
        self.used = self.used | used;
        self.unshared = self.unshared | unshared;
        Ok(())
    }

    /// The `locking=` mode, for files opened on behalf of this one (its backing chain).
    pub fn locking(&self) -> Locking {
        self.locking
    }

    /// Permissions in use by this file's nodes.
    pub fn used(&self) -> Perms {
        self.used
    }

    fn unsupported(&mut self, e: std::io::Error) -> Result<(), ImageError> {
        let no_ofd = matches!(
            e.raw_os_error(),
            Some(libc::EINVAL | libc::ENOLCK | libc::EOPNOTSUPP)
        );
        if no_ofd && self.locking == Locking::Auto {
            tracing::warn!(
                "{}: file system does not support OFD locks; image locking is off",
                self.path.display()
            );
            self.active = false;
            return Ok(());
        }
        Err(self.io(e))
    }

    fn io(&self, e: std::io::Error) -> ImageError {
        ImageError::io(format!("{}: image lock", self.path.display()), e)
    }
}

fn flock_at(byte: i64, kind: libc::c_short) -> libc::flock {
    // SAFETY: `flock` is a plain C struct of integers; all zeroes is a valid value (and
    // l_pid must be 0 for OFD locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

/// Takes a shared OFD lock on one byte, without waiting.
fn ofd_lock(file: &File, byte: i64) -> std::io::Result<()> {
    let fl = flock_at(byte, libc::F_RDLCK as libc::c_short);
    // SAFETY: fcntl on a descriptor owned by `file`, which outlives the call; `fl` is a valid
    // flock that the kernel only reads.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// True if another open file description holds a lock on `byte` (qemu's
/// `qemu_lock_fd_test` with an exclusive probe).
fn ofd_test(file: &File, byte: i64) -> std::io::Result<bool> {
    let mut fl = flock_at(byte, libc::F_WRLCK as libc::c_short);
    // SAFETY: fcntl on a descriptor owned by `file`, which outlives the call; `fl` is a valid
    // flock the kernel overwrites with the conflicting lock, if any.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    fn writer() -> (Perms, Perms) {
        (
            Perms::CONSISTENT_READ | Perms::WRITE | Perms::RESIZE,
            Perms::WRITE | Perms::RESIZE,
        )
    }

    #[test]
    fn add_second_writer_in_same_process_is_locked() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let (a, b) = (open(f.path()), open(f.path()));
        let mut la = ImageLock::new(f.path(), Locking::On);
        let (used, unshared) = writer();
        la.add(&a, used, unshared).unwrap();
        let mut lb = ImageLock::new(f.path(), Locking::On);
        let err = lb.add(&b, used, unshared).unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::Locked {
                    perm: "write",
                    shared: false,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn add_two_readers_that_unshare_write_coexist() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let (a, b) = (open(f.path()), open(f.path()));
        for file in [&a, &b] {
            ImageLock::new(f.path(), Locking::On)
                .add(file, Perms::CONSISTENT_READ, Perms::WRITE | Perms::RESIZE)
                .unwrap();
        }
    }

    #[test]
    fn add_writer_after_reader_that_unshares_write_is_locked() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let (a, b) = (open(f.path()), open(f.path()));
        ImageLock::new(f.path(), Locking::On)
            .add(&a, Perms::CONSISTENT_READ, Perms::WRITE | Perms::RESIZE)
            .unwrap();
        let (used, unshared) = writer();
        let err = ImageLock::new(f.path(), Locking::On)
            .add(&b, used, unshared)
            .unwrap_err();
        assert!(
            matches!(err, ImageError::Locked { perm: "write", .. }),
            "{err}"
        );
    }

    #[test]
    fn add_after_first_closed_succeeds() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let (used, unshared) = writer();
        {
            let a = open(f.path());
            ImageLock::new(f.path(), Locking::On)
                .add(&a, used, unshared)
                .unwrap();
        }
        let b = open(f.path());
        ImageLock::new(f.path(), Locking::On)
            .add(&b, used, unshared)
            .unwrap();
    }

    #[test]
    fn add_with_locking_off_ignores_conflicts() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let (a, b) = (open(f.path()), open(f.path()));
        let (used, unshared) = writer();
        ImageLock::new(f.path(), Locking::On)
            .add(&a, used, unshared)
            .unwrap();
        ImageLock::new(f.path(), Locking::Off)
            .add(&b, used, unshared)
            .unwrap();
    }
}
