//! A node's persistent bitmaps over its life: loaded at open, marked in use while the
//! node may write, saved when it closes. qcow2 images keep them in the image; raw images in
//! a sidecar file beside it (`raw_bitmaps.rs`, the same life cycle); other nodes have none.
//!
//! For qcow2 the format and the on-disk steps are `crate::qcow2_bitmaps`'s; this file
//! decides when they run, as qemu's `qcow2_load_dirty_bitmaps` /
//! `qcow2_store_persistent_dirty_bitmaps` do:
//! - [`Node::load_bitmaps`] is called by whoever opens a node for a user (the daemon's
//!   graph, `sluice serve image`), after imago opened the image. Not by [`Node::open_writer`]
//!   (a commit's second instance over the same file), whose bitmaps are its node's. Loading
//!   from the header read before imago opened the image is what makes it safe: imago, as
//!   any program that does not know bitmaps, clears autoclear bit 0 when it opens an image
//!   writable, and a writable node then sets `in_use` on every entry and the bit again.
//! - [`Node::store_bitmaps`] saves when the node closes: at `blockdev-del` and at exit
//!   (explicitly, so errors are logged while there is a log), and from `Drop` for the other
//!   ways a node goes (the CLI server dropping its plugin). It holds every request off,
//!   flushes imago, allocates through the refcounts itself (imago 0.2 has no public
//!   allocator, see `crate::refcounts`), and then closes the node to changes: imago's
//!   cached refcounts and header no longer match the file, so a later write through it
//!   could corrupt the image. Reads still work.
//!
//! Between the two, a crash (kill -9, power loss) leaves every bitmap `in_use`: the next
//! open, by qemu or sluice, reports it inconsistent, never silently wrong.

use std::sync::Arc;

use super::raw_bitmaps::Kept;
use super::Node;
use crate::bitmaps::Bitmap;
use crate::error::ImageError;
use crate::header::EXT_BITMAPS;
use crate::options::Driver;
use crate::qcow2_bitmaps::{self, Qcow2BitmapError, ToStore, AUTOCLEAR_BITMAPS};

/// Where a node is in the life cycle of the module doc.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) enum Persist {
    /// Not loaded (file nodes, raw nodes over a block device, a commit's writer, nodes no
    /// user opened yet).
    #[default]
    NotLoaded,
    /// Loaded by a read-only node: nothing to save.
    ReadOnly,
    /// Loaded by a writable qcow2 node, the entries marked in use. `trusted`: the directory
    /// was valid at open, so its clusters may be freed when it is replaced.
    Open { trusted: bool },
    /// Loaded by a writable raw node, which keeps the image's sidecar (see `raw_bitmaps.rs`).
    Sidecar(Kept),
    /// A writable raw node whose image's sidecar another node of this process keeps.
    Elsewhere,
    /// Saved; the node takes no more changes.
    Stored,
}

impl Node {
    fn bitmap_error(&self, source: Qcow2BitmapError) -> ImageError {
        ImageError::Bitmaps {
            path: self.filename.clone(),
            source,
        }
    }

    /// Loads the image's persistent bitmaps into [`Node::bitmaps`] and, for a writable
    /// node, marks them in use on disk (see the module doc): a qcow2 image's, or a raw
    /// image's sidecar. Does nothing for other drivers or a second time.
    pub fn load_bitmaps(&self) -> Result<(), ImageError> {
        let mut st = self.persist.lock();
        if *st != Persist::NotLoaded {
            return Ok(());
        }
        match self.driver {
            Driver::Qcow2 => {}
            Driver::Raw => {
                *st = self.load_sidecar()?;
                return Ok(());
            }
            _ => return Ok(()),
        }
        let header = self.qcow2().expect("qcow2 nodes have a header").header;
        let os = &self.file_state().os;
        let loaded = qcow2_bitmaps::load(os, &header).map_err(|e| self.bitmap_error(e))?;
        let has_ext = header.extensions.iter().any(|e| e.kind == EXT_BITMAPS);
        let trusted = header.autoclear_features & AUTOCLEAR_BITMAPS != 0;
        if has_ext && !trusted {
            // qemu's words (and its choice: such bitmaps are dropped).
            tracing::warn!(
                "{}: a program lacking bitmap support modified this file, so all bitmaps are \
                 now considered inconsistent; some clusters may be leaked, run 'qemu-img \
                 check -r' on the image file to fix",
                self.filename.display()
            );
        }
        for l in loaded {
            let b = Bitmap::loaded(&l.name, l.map, l.recording, l.inconsistent);
            self.bitmaps()
                .insert(Arc::new(b))
                .expect("names in a directory are unique");
        }
        if self.is_read_only() {
            *st = Persist::ReadOnly;
        } else {
            qcow2_bitmaps::mark_in_use(os, &header).map_err(|e| self.bitmap_error(e))?;
            *st = Persist::Open { trusted };
        }
        Ok(())
    }

    /// Why a new persistent bitmap of `granularity` could not be saved in this node's
    /// image or its sidecar (qemu's words where qemu has the case), or Ok.
    pub fn can_store_bitmap(&self, granularity: u64) -> Result<(), String> {
        if self.is_read_only() && matches!(self.driver, Driver::Qcow2 | Driver::Raw) {
            return Err("Cannot store persistent bitmaps in a read-only node".into());
        }
        if self.driver == Driver::Raw {
            return self.can_store_in_sidecar(&self.persist.lock(), granularity);
        }
        let Some(q) = self.qcow2() else {
            return Err("Operation not supported".into());
        };
        let count = self
            .bitmaps()
            .list()
            .iter()
            .filter(|b| b.is_persistent())
            .count();
        qcow2_bitmaps::can_store(&q.header, count, granularity)?;
        match *self.persist.lock() {
            Persist::Stored => Err("the node is closed".into()),
            _ => Ok(()),
        }
    }

    /// Saves the persistent bitmaps at close and closes the node to changes (see the module
    /// doc). Does nothing for a node that loaded none writable, has none and had none, or
    /// already saved.
    pub fn store_bitmaps(&self) -> Result<(), ImageError> {
        let mut st = self.persist.lock();
        if let Persist::Sidecar(kept) = &*st {
            if self.store_sidecar(kept)? {
                Node::release_sidecar(kept);
                *st = Persist::Stored;
            }
            return Ok(());
        }
        let Persist::Open { trusted } = *st else {
            return Ok(());
        };
        // Newest first, as qemu appends new bitmaps to the directory.
        let list: Vec<Arc<Bitmap>> = self
            .bitmaps()
            .list()
            .into_iter()
            .filter(|b| b.is_persistent())
            .collect();
        let had = self
            .qcow2()
            .is_some_and(|q| q.header.extensions.iter().any(|e| e.kind == EXT_BITMAPS));
        if list.is_empty() && !had {
            return Ok(());
        }
        let keep: Vec<&str> = list
            .iter()
            .filter(|b| b.is_inconsistent())
            .map(|b| b.name())
            .collect();
        let store: Vec<ToStore<'_>> = list
            .iter()
            .filter(|b| !b.is_inconsistent())
            .map(|b| ToStore {
                name: b.name(),
                recording: b.is_recording(),
                map: b.map(),
            })
            .collect();
        let os = &self.file_state().os;
        self.close_changes(|| {
            let _io = self.io.write();
            self.flush_for_change()?;
            qcow2_bitmaps::store(os, trusted, &keep, &store).map_err(|e| self.bitmap_error(e))
        })?;
        *st = Persist::Stored;
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if matches!(
            *self.persist.get_mut(),
            Persist::Open { .. } | Persist::Sidecar(_)
        ) {
            if let Err(e) = self.store_bitmaps() {
                tracing::error!("saving the bitmaps of node '{}': {e}", self.name);
            }
        }
        if let Persist::Sidecar(kept) = self.persist.get_mut() {
            // Not saved (an error, or nothing to save): another node may keep it now.
            Node::release_sidecar(kept);
        }
    }
}
