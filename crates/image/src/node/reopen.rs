//! Reopening a node in place (`blockdev-reopen`): read-only to read-write and back, and a
//! qcow2 node's backing changed in memory.
//!
//! A node keeps its identity through a reopen: exports, parents and jobs hold the same
//! `Arc<Node>` before and after, so nothing above has to be rebuilt or told. What changes is
//! what sits behind it:
//! - **A file node's descriptor.** The access mode of an open file description cannot be
//!   changed, so a new description is opened (by path, and checked to be the same file) and
//!   `dup3` puts it behind both descriptor numbers the node has: its own (locks, `lseek`,
//!   `fadvise`) and imago's duplicate. The storage object, which every format node above
//!   reads through, stays the same object; a request running during the switch finishes on
//!   the description it started on. qemu's lock bytes move with it: they are let go on the
//!   old description first (OFD locks of one process's two descriptions conflict, so
//!   testing the new set while holding the old would find ourselves) and taken and tested
//!   on the new one; on a conflict the old ones are taken back (`lock.rs`).
//! - **A node's imago object.** imago opens an image read-only or writable for the
//!   object's life, so a reopen builds a new object over the same storage and swaps it in
//!   with the node's `View`, as a backing switch does (`jobs.rs`): under the exclusive `io`
//!   lock, after writing back what the old one cached. A qcow2 node's share of the file's
//!   lock changes with it (writable qcow2 users use write and resize).
//! - **A qcow2 node's backing**, in memory only: as with qemu, the image header keeps the
//!   backing file name it has.
//!
//! Nodes whose backing is a reopened node read it through its old imago object; the caller
//! rebinds them ([`Node::rebind_backing`]) so that they read through the new one.
//!
//! The order across nodes is the caller's (the daemon's graph): a node becomes writable
//! after its file node, and read-only before it. [`Node::check_reopen`] answers, with no
//! side effect, what can be known before anything changes, so that a list of reopens can
//! be refused as a whole; what can still fail after it (opening the file, a lock held by
//! another process, imago) fails in [`Node::reopen`] with this node left as it was.
//!
//! Not done: a qcow2 image with persistent bitmaps is not reopened (its bitmaps would have
//! to be saved and marked in use again, which imago's own header writes undo), nor a raw
//! node with persistent bitmaps in its sidecar file (the same life cycle), nor a node
//! an active commit or a snapshot forwards to another node.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::FormatAccess;

use super::open::{check_refcounts, qcow2_perms, raw_perms, read_header};
use super::persist::Persist;
use super::{Layer, Node, Qcow2Info, Storage, View};
use crate::error::ImageError;
use crate::header::{HeaderError, EXT_BITMAPS};
use crate::options::Driver;
use crate::qcow2_bitmaps::AUTOCLEAR_BITMAPS;

impl Node {
    /// Why this node cannot be reopened `read_only` (or, with `read_only` unchanged, get a
    /// new imago object for a backing change), or Ok. No side effect.
    pub fn check_reopen(&self, read_only: bool) -> Result<(), ImageError> {
        if !Arc::ptr_eq(&self.active(), &self.arc()) {
            return Err(ImageError::Permission(format!(
                "node '{}' forwards its requests to node '{}' (after a commit or a snapshot): \
                 sluice cannot reopen it",
                self.name,
                self.active().name
            )));
        }
        self.check_mode_change(read_only)
    }

    /// [`Node::check_reopen`] without its refusal of a node that forwards its requests.
    fn check_mode_change(&self, read_only: bool) -> Result<(), ImageError> {
        if self.driver == Driver::Plugin {
            return Err(ImageError::Permission(format!(
                "node '{}' is a device seen as a layer: reopen the device's own node",
                self.name
            )));
        }
        if *self.persist.lock() == Persist::Stored {
            return Err(ImageError::Permission(format!(
                "node '{}' is closed (its persistent bitmaps were saved)",
                self.name
            )));
        }
        // A raw node's persistent bitmaps live in its sidecar file (`raw_bitmaps.rs`), whose
        // in-use mark follows the mode it was opened in: refused as a qcow2 node's are.
        let persistent = self.bitmaps().list().iter().any(|b| b.is_persistent());
        let sidecar =
            matches!(&*self.persist.lock(), Persist::Sidecar(k) if Node::sidecar_on_disk(k));
        if (persistent || sidecar) && self.driver == Driver::Raw {
            return Err(ImageError::Permission(format!(
                "node '{}' has persistent dirty bitmaps: sluice cannot reopen it yet",
                self.name
            )));
        }
        let Some(q) = self.qcow2() else {
            return Ok(());
        };
        let has_bitmaps = q.header.extensions.iter().any(|e| e.kind == EXT_BITMAPS) || persistent;
        if has_bitmaps {
            return Err(ImageError::Permission(format!(
                "node '{}' has persistent dirty bitmaps: sluice cannot reopen it yet",
                self.name
            )));
        }
        if !read_only && q.header.nb_snapshots > 0 {
            return Err(ImageError::bad_image(
                &self.filename,
                HeaderError::Unsupported(format!(
                    "the image has {} internal snapshots; sluice serves such images read-only",
                    q.header.nb_snapshots
                )),
            ));
        }
        Ok(())
    }

    /// Reopens this node `read_only`, and (qcow2, `Some`) with `backing` as its backing
    /// (`Some(None)`: none), in memory. Does nothing if neither changes. On an error the
    /// node is as it was. The caller checked [`Node::check_reopen`] and the order (see the
    /// module doc).
    pub fn reopen(
        &self,
        read_only: bool,
        backing: Option<Option<Arc<Node>>>,
    ) -> Result<(), ImageError> {
        let was_read_only = self.is_read_only();
        let backing = backing.filter(|b| match (b, self.backing()) {
            (Some(b), Some(cur)) => !Arc::ptr_eq(b, &cur),
            (None, None) => false,
            _ => true,
        });
        if read_only == was_read_only && backing.is_none() {
            return Ok(());
        }
        if backing.is_some() && self.driver != Driver::Qcow2 {
            return Err(ImageError::Permission(format!(
                "node '{}' is not qcow2: only qcow2 images have a backing",
                self.name
            )));
        }
        if let (false, Some(f)) = (read_only, &self.file) {
            if f.is_read_only() {
                return Err(ImageError::Permission(format!(
                    "node '{}' cannot be writable: its file node '{}' is read-only",
                    self.name, f.name
                )));
            }
        }
        self.check_reopen(read_only)?;
        self.reopen_unchecked(read_only, backing)
    }

    /// A node whose requests now go to the overlay of a snapshot (`snapshot_onto`), and its
    /// file node, reopened read-only, as qemu's external snapshot does (`bdrv_reopen_set_
    /// read_only` of the old node in `external_snapshot_commit`): nothing writes them any
    /// more, and their image's write lock is let go, so other programs can read the frozen
    /// image (`qemu-img convert` of the base, the usual backup after a snapshot). The
    /// overlay's view is rebuilt over the node's new one. On an error the node keeps what it
    /// had (qemu ignores this step's errors too).
    pub fn freeze(&self) -> Result<(), ImageError> {
        let overlay = self.active();
        // A device seen as a layer (rbd) is locked by its own node, not by this one.
        if Arc::ptr_eq(&overlay, &self.arc())
            || self.is_read_only()
            || self.driver == Driver::Plugin
        {
            return Ok(());
        }
        self.check_mode_change(true)?;
        self.reopen_unchecked(true, None)?;
        if let Some(f) = &self.file {
            f.reopen(true, None)?;
        }
        overlay.rebind_backing()
    }

    /// [`Node::reopen`] once its checks passed.
    fn reopen_unchecked(
        &self,
        read_only: bool,
        backing: Option<Option<Arc<Node>>>,
    ) -> Result<(), ImageError> {
        let was_read_only = self.is_read_only();
        let _g = self.io.write();
        if !was_read_only {
            self.flush_for_change()?;
        }
        let changes_mode = read_only != was_read_only;
        if changes_mode {
            self.reopen_share(read_only)?;
        }
        let backing = backing.unwrap_or_else(|| self.backing());
        match self.build_view(read_only, backing) {
            Ok(view) => {
                *self.view.write() = Arc::new(view);
                self.read_only.store(read_only, Ordering::Release);
                if changes_mode {
                    self.reopen_persist(read_only);
                }
                Ok(())
            }
            Err(e) => {
                if changes_mode {
                    if let Err(undo) = self.reopen_share(was_read_only) {
                        tracing::error!("reopen of '{}': undoing it: {undo}", self.name);
                    }
                }
                Err(e)
            }
        }
    }

    /// After this node's backing got a new imago object (its reopen), builds this node's
    /// own again over it, so that reads that fall through see what the backing holds now.
    /// Does nothing for nodes without a backing.
    pub fn rebind_backing(&self) -> Result<(), ImageError> {
        let Some(backing) = self.backing() else {
            return Ok(());
        };
        let _g = self.io.write();
        let read_only = self.is_read_only();
        if !read_only {
            self.flush_for_change()?;
        }
        let view = self.build_view(read_only, Some(backing))?;
        *self.view.write() = Arc::new(view);
        Ok(())
    }

    /// What a change of mode changes below the imago object: a file node's descriptor (and
    /// lock bytes), a qcow2 node's share of its file's lock. The caller holds `io`.
    fn reopen_share(&self, read_only: bool) -> Result<(), ImageError> {
        match self.driver {
            Driver::File => self.reopen_descriptor(read_only),
            Driver::Qcow2 => {
                let fs = self.file_state();
                let (used, unshared) = qcow2_perms(read_only);
                fs.lock.lock().update(&fs.os, &self.name, used, unshared)
            }
            Driver::Raw | Driver::Blkdebug | Driver::Plugin => Ok(()),
        }
    }

    /// A file node's new descriptor, opened `read_only` or not, put behind both of the
    /// node's descriptor numbers with its lock bytes (see the module doc).
    fn reopen_descriptor(&self, read_only: bool) -> Result<(), ImageError> {
        let fs = self
            .file_state
            .as_ref()
            .expect("file nodes have their own descriptor");
        let failed = |e: std::io::Error| {
            ImageError::Permission(format!(
                "Could not reopen file: {}",
                sluice_block::error::strerror(&e)
            ))
        };
        let new = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_NOCTTY)
            .open(&self.filename)
            .map_err(failed)?;
        let (old_meta, new_meta) = (
            fs.os.metadata().map_err(failed)?,
            new.metadata().map_err(failed)?,
        );
        if (old_meta.dev(), old_meta.ino()) != (new_meta.dev(), new_meta.ino()) {
            return Err(ImageError::Permission(format!(
                "Could not reopen file: '{}' is another file now (renamed or replaced)",
                self.filename.display()
            )));
        }
        let (used, unshared) = raw_perms(read_only);
        fs.lock
            .lock()
            .move_to(&fs.os, &new, &self.name, used, unshared)?;
        let os_fd = fs.os.as_raw_fd();
        if let Err(e) = dup_onto(&new, os_fd) {
            return Err(failed(e));
        }
        if let Err(e) = dup_onto(&new, fs.storage_fd) {
            // The old description is still behind imago's number: put it back behind ours.
            // SAFETY: both numbers are open descriptors this node owns (`os` and imago's
            // duplicate, alive as long as the node); dup3 replaces the second atomically.
            unsafe { libc::dup3(fs.storage_fd, os_fd, libc::O_CLOEXEC) };
            return Err(failed(e));
        }
        fs.writable.store(!read_only, Ordering::Release);
        Ok(())
    }

    /// A view with a new imago object over this node's storage, opened `read_only` or not,
    /// with `backing` (qcow2). The caller holds `io`.
    fn build_view(&self, read_only: bool, backing: Option<Arc<Node>>) -> Result<View, ImageError> {
        let path = &self.filename;
        let open_err = |e: std::io::Error| ImageError::open(path, e);
        match self.driver {
            Driver::Qcow2 => {
                let file = self.file.as_ref().expect("format nodes have a file child");
                let header = read_header(file)?;
                if !read_only {
                    check_refcounts(file, &header)?;
                    // See storage.rs: L1 entries reach the file after their refcounts.
                    self.file_state()
                        .ordered
                        .defer_l1_writes(header.l1_range())
                        .map_err(open_err)?;
                }
                let mut q =
                    Qcow2::<Storage, Arc<Layer>>::open_image(self.storage().clone(), !read_only)
                        .map_err(open_err)?;
                q.set_data_file(None);
                q.set_backing(backing.as_ref().map(|b| b.view().layer.clone()));
                Ok(View::new(
                    backing,
                    Some(Qcow2Info { header }),
                    FormatAccess::new(q),
                ))
            }
            Driver::Raw | Driver::File | Driver::Blkdebug | Driver::Plugin => {
                let r =
                    Raw::open_image(self.layer_storage().clone(), !read_only).map_err(open_err)?;
                Ok(View::new(None, None, FormatAccess::new(r)))
            }
        }
    }

    /// The persistent bitmaps' life cycle follows the mode (the node has none, see
    /// [`Node::check_reopen`]): a writable node saves the ones created later at close.
    fn reopen_persist(&self, read_only: bool) {
        let mut st = self.persist.lock();
        if self.driver == Driver::Raw {
            // No sidecar file and no persistent bitmap here (see check_reopen): only the
            // claim on the image's sidecar follows the mode.
            let next = match (&*st, read_only) {
                (Persist::NotLoaded | Persist::Stored, _) => return,
                (Persist::Sidecar(kept), true) => {
                    Node::release_sidecar(kept);
                    Persist::ReadOnly
                }
                (_, true) => Persist::ReadOnly,
                (_, false) => self.load_sidecar().unwrap_or_else(|e| {
                    tracing::warn!("{}: {e}", self.name);
                    Persist::NotLoaded
                }),
            };
            *st = next;
            return;
        }
        *st = match (&*st, read_only) {
            (Persist::NotLoaded, _) | (Persist::Stored, _) => return,
            (_, true) => Persist::ReadOnly,
            (_, false) => {
                let trusted = self
                    .qcow2()
                    .is_some_and(|q| q.header.autoclear_features & AUTOCLEAR_BITMAPS != 0);
                Persist::Open { trusted }
            }
        };
    }
}

/// Puts the open file description of `new` behind descriptor number `fd` (dup3, retried on
/// EINTR).
fn dup_onto(new: &std::fs::File, fd: i32) -> std::io::Result<()> {
    loop {
        // SAFETY: `new` is an open descriptor; `fd` is one the caller owns and keeps open
        // (dup3 closes what was behind it and puts a duplicate of `new` there, atomically).
        let r = unsafe { libc::dup3(new.as_raw_fd(), fd, libc::O_CLOEXEC) };
        if r >= 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::test_support::*;
    use serde_json::json;

    /// A qcow2 node over a named file node, both `read_only`; returns (dir, path, file, qcow2).
    fn qcow2_pair(
        read_only: bool,
    ) -> (tempfile::TempDir, std::path::PathBuf, Arc<Node>, Arc<Node>) {
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "a.qcow2", &["-f", "qcow2"], Some("1M"));
        qemu_io("qcow2", &p, &["write -P 0x11 0 64k"]);
        let file = open_json(
            json!({"driver": "file", "filename": p, "read-only": read_only,
                                    "node-name": "f"}),
        )
        .unwrap();
        let f2 = file.clone();
        let resolve = move |n: &str| (n == "f").then(|| f2.clone());
        let opts = crate::BlockdevOptions::from_json(&json!({
            "driver": "qcow2", "node-name": "q", "read-only": read_only, "file": "f"}))
        .unwrap();
        let q = crate::open_node(&opts, &resolve).unwrap();
        (dir, p, file, q)
    }

    #[test]
    fn reopen_read_only_qcow2_writable_then_writes_reach_the_image() {
        let (_dir, p, file, q) = qcow2_pair(true);
        assert_eq!(
            q.write(&[1; 512], 0).unwrap_err().errno,
            sluice_block::Errno::EROFS
        );
        file.reopen(false, None).unwrap();
        q.reopen(false, None).unwrap();
        assert!(!q.is_read_only() && !file.is_read_only());
        q.write(&[0x22; 512], 4096).unwrap();
        q.flush().unwrap();
        assert_eq!(read(&q, 512, 4096), vec![0x22; 512]);
        drop((q, file));
        let mut want = vec![0u8; 1 << 20];
        want[..65536].fill(0x11);
        want[4096..4608].fill(0x22);
        assert_image_is(&p, &want);
    }

    #[test]
    fn reopen_writable_qcow2_read_only_refuses_writes_and_lets_others_write() {
        let (_dir, p, file, q) = qcow2_pair(false);
        q.write(&[0x33; 512], 0).unwrap();
        q.reopen(true, None).unwrap();
        file.reopen(true, None).unwrap();
        assert_eq!(
            q.write(&[1; 512], 0).unwrap_err().errno,
            sluice_block::Errno::EROFS
        );
        assert_eq!(read(&q, 512, 0), vec![0x33; 512]);
        // No write lock is held any more: a second read-only qcow2 user (which refuses to
        // share write) can open the image.
        let other = open_json(qcow2_opts(&p, true)).unwrap();
        assert_eq!(read(&other, 512, 0), vec![0x33; 512]);
    }

    #[test]
    fn reopen_file_writable_while_another_process_forbids_writes_is_locked_and_unchanged() {
        let (_dir, p, file, q) = qcow2_pair(true);
        // Another description of ours that uses the image as a read-only qcow2 user, which
        // unshares write (as `qemu-nbd -r` does).
        let other = open_json(qcow2_opts(&p, true)).unwrap();
        let err = file.reopen(false, None).unwrap_err();
        assert!(
            matches!(err, ImageError::Locked { perm: "write", .. }),
            "{err}"
        );
        assert!(file.is_read_only());
        assert_eq!(read(&q, 512, 0), vec![0x11; 512]);
        drop(other);
        // The lock goes with the last copy of the other description: a process another test
        // forks in these microseconds holds one until its exec closes it (O_CLOEXEC), so the
        // reopen may have to wait for that.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match file.reopen(false, None) {
                Ok(()) => break,
                Err(ImageError::Locked { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(e) => panic!("{e}"),
            }
        }
        q.reopen(false, None).unwrap();
        q.write(&[5; 512], 0).unwrap();
    }

    #[test]
    fn reopen_format_writable_over_read_only_file_is_refused() {
        let (_dir, _p, _file, q) = qcow2_pair(true);
        let err = q.reopen(false, None).unwrap_err();
        assert!(
            err.to_string().contains("its file node 'f' is read-only"),
            "{err}"
        );
        assert!(q.is_read_only());
    }

    #[test]
    fn reopen_backing_changes_what_reads_fall_through_to_but_not_the_header() {
        let (_dir, top) = chain();
        let node = open_json(qcow2_opts(&top, false)).unwrap();
        assert_eq!(read(&node, 16, 0), vec![0x11; 16]);
        node.reopen(false, Some(None)).unwrap();
        assert!(node.backing().is_none());
        assert_eq!(read(&node, 16, 0), vec![0; 16]);
        assert_eq!(read(&node, 16, 1 << 20), vec![0x22; 16]);
        let other_dir = tempfile::tempdir().unwrap();
        let other = create(other_dir.path(), "o.qcow2", &["-f", "qcow2"], Some("2M"));
        qemu_io("qcow2", &other, &["write -P 0x77 0 64k"]);
        let b = open_json(qcow2_opts(&other, true)).unwrap();
        node.reopen(false, Some(Some(b.clone()))).unwrap();
        assert!(Arc::ptr_eq(&node.backing().unwrap(), &b));
        assert_eq!(read(&node, 16, 0), vec![0x77; 16]);
        drop(node);
        assert!(qemu_img_info(&top).contains("\"backing-filename\": \"base.raw\""));
    }

    #[test]
    fn rebind_backing_reads_what_a_reopened_backing_wrote() {
        let (_dir, top) = chain();
        let node = open_json(qcow2_opts(&top, true)).unwrap();
        let base = node.backing().unwrap();
        let base_file = base.file_child().unwrap().clone();
        assert_eq!(read(&node, 16, 0), vec![0x11; 16]);
        base_file.reopen(false, None).unwrap();
        base.reopen(false, None).unwrap();
        node.rebind_backing().unwrap();
        base.write(&[0x99; 16], 0).unwrap();
        assert_eq!(read(&node, 16, 0), vec![0x99; 16]);
    }
}
