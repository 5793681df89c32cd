//! Named dirty bitmaps: QEMU's `block-dirty-bitmap-*` on one node, and the rules they keep.
//!
//! Every node of the daemon's graph owns one [`Bitmaps`] set. Image nodes keep it in the
//! [`crate::Node`] itself and mark it in the node's gate (`node/gate.rs`), after every write,
//! zero and trim and before the gate is let go, so no path can change data unmarked: NBD
//! clients, block jobs and an active commit's writer (which shares its base's set, see
//! [`crate::Node::open_writer`]) all pass there. Other nodes (plugins) are marked by a filter
//! the daemon puts over their plugin. A [`Bitmap`] is a [`DirtyMap`] with QEMU's state:
//! recording (enabled), persistent, busy (an export or job uses it) and inconsistent (loaded
//! from an image that was not closed cleanly).
//!
//! The checks and their messages are qemu-storage-daemon 10.0.2's
//! (`block/dirty-bitmap.c`, `block/monitor/bitmap-qmp-cmds.c`), decided here once so that
//! the QMP commands, exports and jobs cannot disagree: [`Bitmap::check`] is QEMU's
//! `bdrv_dirty_bitmap_check`.
//!
//! Locking: the set is a read-write lock over a short list, taken shared by every marking
//! request (one uncontended read lock when the list is empty) and exclusively only to add or
//! remove a bitmap; each bitmap's bits have their own mutex (in [`DirtyMap`]) and its flags
//! are atomics, so marking never waits for a QMP command longer than one list change.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::dirty::DirtyMap;

/// Longest bitmap name in bytes (QEMU's `BDRV_BITMAP_MAX_NAME_SIZE`).
pub const MAX_BITMAP_NAME: usize = 1023;
/// Smallest granularity QEMU accepts.
pub const MIN_GRANULARITY: u64 = 512;

/// Why a bitmap operation was refused; the text is qemu-storage-daemon's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    #[error("Bitmap name cannot be empty")]
    EmptyName,
    #[error("Bitmap already exists: {0}")]
    Exists(String),
    #[error("Bitmap name too long: {0}")]
    NameTooLong(String),
    #[error("Granularity must be power of 2 and at least 512")]
    Granularity,
    #[error("Dirty bitmap '{0}' not found")]
    NotFound(String),
    #[error("Bitmap '{0}' is currently in use by another operation and cannot be used")]
    Busy(String),
    #[error("Bitmap '{0}' is inconsistent and cannot be used")]
    Inconsistent(String),
    #[error(
        "Bitmaps are of different sizes (destination size is {dst}, source size is {src}) \
         and can't be merged"
    )]
    Sizes { dst: u64, src: u64 },
}

/// What an operation needs of a bitmap (QEMU's `BDRV_BITMAP_*` check flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Read it or change its recording state (enable, disable, merge source, export).
    Read,
    /// Change its bits (clear, merge target).
    Modify,
    /// Delete it: only busy bitmaps are refused (an inconsistent one may go).
    Remove,
}

/// One named dirty bitmap (see the module doc).
#[derive(Debug)]
pub struct Bitmap {
    name: String,
    map: DirtyMap,
    recording: AtomicBool,
    persistent: AtomicBool,
    /// Number of users (exports, jobs) holding it busy.
    busy: AtomicU32,
    inconsistent: bool,
}

impl Bitmap {
    /// A clean bitmap over `size` bytes.
    pub fn new(name: &str, size: u64, granularity: u64, recording: bool) -> Bitmap {
        Bitmap {
            name: name.to_string(),
            map: DirtyMap::new(size, granularity),
            recording: AtomicBool::new(recording),
            persistent: AtomicBool::new(false),
            busy: AtomicU32::new(0),
            inconsistent: false,
        }
    }

    /// A persistent bitmap loaded from an image (see [`crate::qcow2_bitmaps::load`]); an
    /// inconsistent one has no bits, does not record (as in QEMU) and refuses every use but
    /// removal.
    pub fn loaded(name: &str, map: DirtyMap, recording: bool, inconsistent: bool) -> Bitmap {
        Bitmap {
            name: name.to_string(),
            map,
            recording: AtomicBool::new(recording && !inconsistent),
            persistent: AtomicBool::new(true),
            busy: AtomicU32::new(0),
            inconsistent,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    /// The bits.
    pub fn map(&self) -> &DirtyMap {
        &self.map
    }
    pub fn granularity(&self) -> u64 {
        self.map.granularity()
    }
    /// QEMU's `count`: dirty bits times the granularity.
    pub fn count(&self) -> u64 {
        self.map.count()
    }
    pub fn is_recording(&self) -> bool {
        self.recording.load(Ordering::Relaxed)
    }
    pub fn set_recording(&self, on: bool) {
        self.recording.store(on, Ordering::Relaxed);
    }
    pub fn is_persistent(&self) -> bool {
        self.persistent.load(Ordering::Relaxed)
    }
    pub fn set_persistent(&self, on: bool) {
        self.persistent.store(on, Ordering::Relaxed);
    }
    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed) > 0
    }
    pub fn is_inconsistent(&self) -> bool {
        self.inconsistent
    }

    /// Marks the bitmap busy until the guard is dropped (an export serving it).
    pub fn hold(self: &Arc<Self>) -> BusyGuard {
        self.busy.fetch_add(1, Ordering::Relaxed);
        BusyGuard(self.clone())
    }

    /// QEMU's `bdrv_dirty_bitmap_check`: busy bitmaps refuse everything, inconsistent ones
    /// everything but removal.
    pub fn check(&self, what: Use) -> Result<(), BitmapError> {
        if self.is_busy() {
            return Err(BitmapError::Busy(self.name.clone()));
        }
        if self.inconsistent && what != Use::Remove {
            return Err(BitmapError::Inconsistent(self.name.clone()));
        }
        Ok(())
    }
}

/// Holds a bitmap busy (see [`Bitmap::hold`]).
#[derive(Debug)]
pub struct BusyGuard(Arc<Bitmap>);

impl BusyGuard {
    pub fn bitmap(&self) -> &Arc<Bitmap> {
        &self.0
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The bitmaps of one node (see the module doc).
#[derive(Debug, Default)]
pub struct Bitmaps {
    list: RwLock<Vec<Arc<Bitmap>>>,
}

/// The granularity QEMU picks when none is given: the cluster size clamped to
/// 4 KiB..64 KiB, or 64 KiB for nodes without clusters.
pub fn default_granularity(cluster_size: Option<u64>) -> u64 {
    match cluster_size {
        Some(c) if c > 0 => c.clamp(4096, 65536),
        _ => 65536,
    }
}

impl Bitmaps {
    /// Marks `[offset, offset+len)` in every recording bitmap.
    pub fn mark(&self, offset: u64, len: u64) {
        let list = self.list.read();
        for b in list.iter().filter(|b| b.is_recording()) {
            b.map.mark(offset, len);
        }
    }

    /// The bitmap named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Bitmap>> {
        self.list.read().iter().find(|b| b.name == name).cloned()
    }

    /// The bitmap named `name`, or QEMU's "not found" error.
    pub fn lookup(&self, name: &str) -> Result<Arc<Bitmap>, BitmapError> {
        self.get(name)
            .ok_or_else(|| BitmapError::NotFound(name.to_string()))
    }

    /// Every bitmap, newest first (the order `query-named-block-nodes` lists them).
    pub fn list(&self) -> Vec<Arc<Bitmap>> {
        self.list.read().iter().rev().cloned().collect()
    }

    /// True if the node has no bitmaps.
    pub fn is_empty(&self) -> bool {
        self.list.read().is_empty()
    }

    /// Checks a granularity given by the user.
    pub fn check_granularity(granularity: u64) -> Result<(), BitmapError> {
        if granularity < MIN_GRANULARITY || !granularity.is_power_of_two() {
            return Err(BitmapError::Granularity);
        }
        Ok(())
    }

    /// Checks a new bitmap's name (QEMU's `bdrv_create_dirty_bitmap` order: taken, then
    /// too long).
    pub fn check_new_name(&self, name: &str) -> Result<(), BitmapError> {
        if self.get(name).is_some() {
            return Err(BitmapError::Exists(name.to_string()));
        }
        if name.len() > MAX_BITMAP_NAME {
            return Err(BitmapError::NameTooLong(name.to_string()));
        }
        Ok(())
    }

    /// Adds `bitmap` (its name must have passed [`Bitmaps::check_new_name`]; checked again
    /// under the lock).
    pub fn insert(&self, bitmap: Arc<Bitmap>) -> Result<(), BitmapError> {
        let mut list = self.list.write();
        if list.iter().any(|b| b.name == bitmap.name) {
            return Err(BitmapError::Exists(bitmap.name.clone()));
        }
        list.push(bitmap);
        Ok(())
    }

    /// [`Bitmaps::check_new_name`] for a bitmap that may replace an inconsistent one of the
    /// same name (sluice's way back from a crash, which QEMU lacks): returns the bitmap it
    /// would replace, or QEMU's error when the name is taken by a usable bitmap.
    pub fn check_replacement_name(&self, name: &str) -> Result<Option<Arc<Bitmap>>, BitmapError> {
        match self.get(name) {
            Some(old) if old.is_inconsistent() && !old.is_busy() => Ok(Some(old)),
            _ => self.check_new_name(name).map(|()| None),
        }
    }

    /// Puts `new` where `old` is, keeping its place in the list; false (nothing changed) if
    /// `old` is no longer in the set or `new`'s name is another bitmap's.
    pub fn replace(&self, old: &Arc<Bitmap>, new: Arc<Bitmap>) -> bool {
        let mut list = self.list.write();
        let clash = list
            .iter()
            .any(|b| b.name == new.name && !Arc::ptr_eq(b, old));
        match list.iter().position(|b| Arc::ptr_eq(b, old)) {
            Some(i) if !clash => {
                list[i] = new;
                true
            }
            _ => false,
        }
    }

    /// Removes the bitmap named `name` (after [`Bitmap::check`] with [`Use::Remove`]).
    pub fn remove(&self, name: &str) -> Option<Arc<Bitmap>> {
        let mut list = self.list.write();
        let i = list.iter().position(|b| b.name == name)?;
        Some(list.remove(i))
    }
}

/// QEMU's merge: `sources` are merged into a scratch copy first, so a failure half-way
/// leaves `target` unchanged. `target` must have passed its own check.
pub fn merge(target: &Bitmap, sources: &[Arc<Bitmap>]) -> Result<(), BitmapError> {
    let scratch = DirtyMap::new(target.map.size(), target.granularity());
    for src in sources {
        src.check(Use::Read)?;
        if src.map.size() != target.map.size() {
            return Err(BitmapError::Sizes {
                dst: target.map.size(),
                src: src.map.size(),
            });
        }
        scratch.merge_from(&src.map);
    }
    target.map.merge_from(&scratch);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_reaches_recording_bitmaps_only() {
        let set = Bitmaps::default();
        let on = Arc::new(Bitmap::new("on", 1 << 20, 65536, true));
        let off = Arc::new(Bitmap::new("off", 1 << 20, 65536, false));
        set.insert(on.clone()).unwrap();
        set.insert(off.clone()).unwrap();
        set.mark(100, 1);
        assert_eq!((on.count(), off.count()), (65536, 0));
        assert_eq!(
            set.insert(Arc::new(Bitmap::new("on", 1, 512, true))),
            Err(BitmapError::Exists("on".into()))
        );
        assert_eq!(set.list()[0].name(), "off");
    }

    #[test]
    fn inconsistent_bitmap_name_may_be_replaced_in_place() {
        let set = Bitmaps::default();
        let bad = Arc::new(Bitmap::loaded(
            "b",
            DirtyMap::new(1 << 20, 65536),
            true,
            true,
        ));
        let good = Arc::new(Bitmap::new("g", 1 << 20, 65536, true));
        set.insert(bad.clone()).unwrap();
        set.insert(good.clone()).unwrap();
        assert_eq!(
            set.check_replacement_name("g").unwrap_err(),
            BitmapError::Exists("g".into())
        );
        assert!(set.check_replacement_name("new").unwrap().is_none());
        let old = set.check_replacement_name("b").unwrap().unwrap();
        assert!(Arc::ptr_eq(&old, &bad));
        let fresh = Arc::new(Bitmap::new("b", 1 << 20, 65536, true));
        assert!(set.replace(&old, fresh.clone()));
        assert!(Arc::ptr_eq(&set.get("b").unwrap(), &fresh));
        assert_eq!(set.list()[1].name(), "b");
        // Gone already: nothing changes.
        assert!(!set.replace(&old, Arc::new(Bitmap::new("b", 1, 512, true))));
        assert!(Arc::ptr_eq(&set.get("b").unwrap(), &fresh));
    }

    #[test]
    fn busy_bitmap_refuses_everything_until_released() {
        let b = Arc::new(Bitmap::new("b", 1 << 20, 65536, true));
        let g = b.hold();
        assert_eq!(b.check(Use::Remove), Err(BitmapError::Busy("b".into())));
        drop(g);
        assert_eq!(b.check(Use::Modify), Ok(()));
    }

    #[test]
    fn merge_checks_sizes_and_leaves_target_unchanged_on_error() {
        let t = Bitmap::new("t", 1 << 20, 65536, true);
        let a = Arc::new(Bitmap::new("a", 1 << 20, 512, true));
        let other = Arc::new(Bitmap::new("o", 2 << 20, 65536, true));
        a.map().mark(0, 1);
        let err = merge(&t, &[a.clone(), other]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Bitmaps are of different sizes (destination size is 1048576, source size is \
             2097152) and can't be merged"
        );
        assert_eq!(t.count(), 0);
        merge(&t, &[a]).unwrap();
        assert_eq!(t.count(), 65536);
    }

    #[test]
    fn granularity_and_names_are_checked_as_qemu_does() {
        assert!(Bitmaps::check_granularity(512).is_ok());
        assert!(Bitmaps::check_granularity(1 << 31).is_ok());
        assert!(Bitmaps::check_granularity(256).is_err());
        assert!(Bitmaps::check_granularity(1000).is_err());
        let set = Bitmaps::default();
        assert!(set.check_new_name(&"x".repeat(1023)).is_ok());
        assert!(matches!(
            set.check_new_name(&"x".repeat(1024)),
            Err(BitmapError::NameTooLong(_))
        ));
        assert_eq!(default_granularity(Some(2 << 20)), 65536);
        assert_eq!(default_granularity(Some(512)), 4096);
        assert_eq!(default_granularity(None), 65536);
    }
}
