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
///
/// Each user (the file node itself, a qcow2 node above it) is remembered with its own
/// permissions, so that a reopen can change one user's ([`ImageLock::update`]) or move the
/// whole set to a new open file description ([`ImageLock::move_to`]).
#[derive(Debug)]
pub struct ImageLock {
    path: PathBuf,
    locking: Locking,
    /// (user, used, unshared), one entry per user.
    users: Vec<(String, Perms, Perms)>,
    used: Perms,
    unshared: Perms,
    /// False once we found the file system cannot lock (Auto only).
    active: bool,
}

/// How long a lock conflict is looked at again before it is reported (see
/// `ImageLock::test_conflicts`).
pub const CONFLICT_GRACE: std::time::Duration = std::time::Duration::from_millis(50);

impl ImageLock {
    pub fn new(path: &Path, locking: Locking) -> ImageLock {
        ImageLock {
            path: path.to_owned(),
            locking,
            users: Vec::new(),
            used: Perms::NONE,
            unshared: Perms::NONE,
            active: locking != Locking::Off,
        }
    }

    /// Adds user `user` (a node name), which needs `used` and refuses to share `unshared`:
    /// takes the lock bytes on `file` (which must stay open as long as the locks should
    /// hold), then tests that no other open file description conflicts. On a conflict the
    /// bytes taken stay locked (they are released with the file), as in qemu.
    pub fn add(
        &mut self,
        file: &File,
        user: &str,
        used: Perms,
        unshared: Perms,
    ) -> Result<(), ImageError> {
        if !self.active {
            self.remember(user, used, unshared);
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
        self.test_conflicts(file, used, unshared)?;
        self.remember(user, used, unshared);
        Ok(())
    }

    /// Records `user`'s permissions (added to what it had) and the totals.
    fn remember(&mut self, user: &str, used: Perms, unshared: Perms) {
        match self.users.iter_mut().find(|(u, _, _)| u == user) {
            Some(e) => {
                e.1 = e.1 | used;
                e.2 = e.2 | unshared;
            }
            None => self.users.push((user.to_string(), used, unshared)),
        }
        self.used = self.used | used;
        self.unshared = self.unshared | unshared;
    }

    /// The users with `user`'s permissions replaced, and their totals.
    fn replaced(&self, user: &str, used: Perms, unshared: Perms) -> UserSet {
        let mut users = self.users.clone();
        match users.iter_mut().find(|(u, _, _)| u == user) {
            Some(e) => (e.1, e.2) = (used, unshared),
            None => users.push((user.to_string(), used, unshared)),
        }
        let (mut u, mut s) = (Perms::NONE, Perms::NONE);
        for (_, used, unshared) in &users {
            u = u | *used;
            s = s | *unshared;
        }
        (users, u, s)
    }

    /// A reopen changes what `user` needs, on the same open file description `file`: the
    /// bytes of the new totals are taken and tested against other descriptions, then the
    /// bytes no longer needed are let go. On a conflict nothing changes.
    pub fn update(
        &mut self,
        file: &File,
        user: &str,
        used: Perms,
        unshared: Perms,
    ) -> Result<(), ImageError> {
        let (users, new_used, new_unshared) = self.replaced(user, used, unshared);
        if self.active {
            let added_used = Perms(new_used.0 & !self.used.0);
            let added_unshared = Perms(new_unshared.0 & !self.unshared.0);
            let r = self.take_and_test(file, added_used, added_unshared, new_used, new_unshared);
            if let Err(e) = r {
                unlock_bits(file, added_used, added_unshared);
                return Err(e);
            }
            unlock_bits(
                file,
                Perms(self.used.0 & !new_used.0),
                Perms(self.unshared.0 & !new_unshared.0),
            );
        }
        (self.users, self.used, self.unshared) = (users, new_used, new_unshared);
        Ok(())
    }

    /// A reopen moves the file to a new open file description `new` (opened with another
    /// access mode), with `user`'s needs changed: every byte is let go on `old` (so that the
    /// test does not meet this process's own locks), the new totals are taken on `new` and
    /// tested. On a conflict the old bytes are taken again on `old` and nothing changes; the
    /// caller closes `new`, which lets its bytes go.
    pub fn move_to(
        &mut self,
        old: &File,
        new: &File,
        user: &str,
        used: Perms,
        unshared: Perms,
    ) -> Result<(), ImageError> {
        let (users, new_used, new_unshared) = self.replaced(user, used, unshared);
        if self.active {
            unlock_bits(old, self.used, self.unshared);
            let r = self.take_and_test(new, new_used, new_unshared, new_used, new_unshared);
            if let Err(e) = r {
                for (i, _) in self.used.bits() {
                    let _ = ofd_lock(old, PERM_BASE + i as i64);
                }
                for (i, _) in self.unshared.bits() {
                    let _ = ofd_lock(old, SHARED_BASE + i as i64);
                }
                return Err(e);
            }
        }
        (self.users, self.used, self.unshared) = (users, new_used, new_unshared);
        Ok(())
    }

    /// Takes the bytes of `lock_used`/`lock_unshared` on `file`, then tests `used` and
    /// `unshared` against other descriptions (qemu's check at a permission change).
    fn take_and_test(
        &self,
        file: &File,
        lock_used: Perms,
        lock_unshared: Perms,
        used: Perms,
        unshared: Perms,
    ) -> Result<(), ImageError> {
        for (i, _) in lock_used.bits() {
            ofd_lock(file, PERM_BASE + i as i64).map_err(|e| self.io(e))?;
        }
        for (i, _) in lock_unshared.bits() {
            ofd_lock(file, SHARED_BASE + i as i64).map_err(|e| self.io(e))?;
        }
        self.test_conflicts(file, used, unshared)
    }

    /// Err when another open file description of the image holds a byte that conflicts
    /// with `used` (its "shared" byte: someone refuses to share it) or with `unshared`
    /// (its permission byte: someone uses what we refuse to share): qemu's check.
    ///
    /// A conflict is looked at again for up to [`CONFLICT_GRACE`] before it is reported: a
    /// process this one has just spawned (a `--run` command, a hosted nbdkit plugin that
    /// forks, a test's qemu-img) holds copies of all of this process's descriptors until it
    /// execs, and with them the locks of an image this process has just closed, so reopening
    /// it at once could fail on its own earlier lock. A real holder still conflicts, a few
    /// milliseconds later. (The image tests, which spawn qemu-img on many threads while
    /// others reopen images, failed about one run in thirty without it.)
    fn test_conflicts(&self, file: &File, used: Perms, unshared: Perms) -> Result<(), ImageError> {
        let start = std::time::Instant::now();
        let mut pause = std::time::Duration::from_millis(1);
        loop {
            match self.test_conflicts_once(file, used, unshared) {
                Err(ImageError::Locked { .. }) if start.elapsed() < CONFLICT_GRACE => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(std::time::Duration::from_millis(10));
                }
                r => return r,
            }
        }
    }

    fn test_conflicts_once(
        &self,
        file: &File,
        used: Perms,
        unshared: Perms,
    ) -> Result<(), ImageError> {
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

/// The users of a file with their permissions, and the totals (used, unshared).
type UserSet = (Vec<(String, Perms, Perms)>, Perms, Perms);

/// Lets go of the bytes of `used` and `unshared` on `file` (errors ignored: a byte not
/// held is no error, and there is nothing else to do).
fn unlock_bits(file: &File, used: Perms, unshared: Perms) {
    let bytes = used
        .bits()
        .map(|(i, _)| PERM_BASE + i as i64)
        .chain(unshared.bits().map(|(i, _)| SHARED_BASE + i as i64));
    for byte in bytes {
        let fl = flock_at(byte, libc::F_UNLCK as libc::c_short);
        // SAFETY: fcntl on a descriptor owned by `file`, which outlives the call; `fl` is a
        // valid flock that the kernel only reads.
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    }
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
        la.add(&a, "a", used, unshared).unwrap();
        let mut lb = ImageLock::new(f.path(), Locking::On);
        let err = lb.add(&b, "b", used, unshared).unwrap_err();
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
                .add(
                    file,
                    "r",
                    Perms::CONSISTENT_READ,
                    Perms::WRITE | Perms::RESIZE,
                )
                .unwrap();
        }
    }

    #[test]
    fn add_writer_after_reader_that_unshares_write_is_locked() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let (a, b) = (open(f.path()), open(f.path()));
        ImageLock::new(f.path(), Locking::On)
            .add(
                &a,
                "a",
                Perms::CONSISTENT_READ,
                Perms::WRITE | Perms::RESIZE,
            )
            .unwrap();
        let (used, unshared) = writer();
        let err = ImageLock::new(f.path(), Locking::On)
            .add(&b, "b", used, unshared)
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
                .add(&a, "a", used, unshared)
                .unwrap();
        }
        let b = open(f.path());
        ImageLock::new(f.path(), Locking::On)
            .add(&b, "b", used, unshared)
            .unwrap();
    }

    #[test]
    fn add_with_locking_off_ignores_conflicts() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let (a, b) = (open(f.path()), open(f.path()));
        let (used, unshared) = writer();
        ImageLock::new(f.path(), Locking::On)
            .add(&a, "a", used, unshared)
            .unwrap();
        ImageLock::new(f.path(), Locking::Off)
            .add(&b, "b", used, unshared)
            .unwrap();
    }
}
