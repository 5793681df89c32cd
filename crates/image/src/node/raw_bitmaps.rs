//! A raw node's persistent bitmaps over its life, kept in the image's sidecar file
//! (`crate::sidecar` has the format and why the file records the image's identity).
//!
//! The life cycle is qcow2's (`persist.rs`), with the sidecar for the bitmaps directory:
//! - **Load** ([`Node::load_bitmaps`]): every bitmap of the sidecar is loaded; all of them
//!   *inconsistent* when the file says a writer had the image open (`in_use`), when the
//!   image's size, mtime, device or inode differ from what the file recorded (another
//!   program changed or replaced the image), or when its checksum fails (the names are
//!   salvaged). A file that does not parse at all (bad magic, a newer version, truncated)
//!   fails the open with what is wrong: guessing would hide it. A writable node then
//!   rewrites the file with `in_use` set (and no bits), durably, before it takes a request,
//!   so a crash from here on leaves the bitmaps detectably inconsistent.
//! - **Add**: `persistent: true` is accepted on a writable raw node over a regular file whose
//!   directory takes the file ([`Node::can_store_bitmap`] tries). A block device has no
//!   directory that survives a reboot (`/dev` is a tmpfs) nor an mtime that writes keep,
//!   so it is refused.
//! - **Save** ([`Node::store_bitmaps`], at `blockdev-del`, at exit and from `Drop`): with
//!   every request held off, the image is flushed, *then* its identity taken (so sluice's
//!   own writes do not make its own file look stale), then the file written atomically
//!   without `in_use`; with no persistent bitmap left it is removed instead. As for qcow2
//!   the node takes no more changes afterwards: one would make the file stale.
//!   `block-dirty-bitmap-remove` of a persistent bitmap takes effect here, at close (a crash
//!   before then brings it back inconsistent, not stale).
//!
//! **Timestamps.** The identity check relies on a later write giving the image another
//! mtime. Timestamps come from the kernel's coarse clock (a tick, 1-10 ms) and some file
//! systems keep whole seconds, so a write in the same tick as sluice's last one would keep
//! the mtime sluice recorded. Saving therefore waits, before it lets the image go (the image
//! lock keeps other writers out until then), until the coarse clock has passed the recorded
//! mtime by the file system's apparent granularity (a second when the recorded nanoseconds
//! are 0, else one tick): at most that long, once per close.
//!
//! **One keeper per image.** Two writable raw nodes of one process may share a file node
//! (qemu's lock bytes do not separate them); only the first keeps the sidecar. The other
//! loads nothing and refuses persistent bitmaps, instead of both writing the file.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::persist::Persist;
use super::Node;
use crate::bitmaps::Bitmap;
use crate::dirty::DirtyMap;
use crate::error::ImageError;
use crate::sidecar::{self, Entry, Identity, Sidecar, SidecarError};

/// A writable raw node's sidecar (see the module doc).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Kept {
    path: PathBuf,
    /// The image's (device, inode): this node's claim in [`KEPT`].
    key: (u64, u64),
    /// A sidecar existed at open (it is rewritten or removed at close).
    on_disk: bool,
}

/// The images whose sidecar a node of this process keeps, by (device, inode).
static KEPT: std::sync::Mutex<Vec<(u64, u64)>> = std::sync::Mutex::new(Vec::new());

fn claim(key: (u64, u64)) -> bool {
    let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
    if kept.contains(&key) {
        return false;
    }
    kept.push(key);
    true
}

fn release(key: (u64, u64)) {
    let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
    kept.retain(|k| *k != key);
}

/// The coarse real-time clock the kernel stamps files with, in nanoseconds.
fn coarse_now() -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux knows.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    if r != 0 {
        return i128::MAX;
    }
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// Waits until a write would stamp the image with an mtime other than `id`'s (see the
/// module doc): at most the granularity and a few ticks.
fn settle_mtime(id: &Identity) {
    let mtime = i128::from(id.mtime_sec) * 1_000_000_000 + i128::from(id.mtime_nsec);
    let granularity: i128 = if id.mtime_nsec == 0 { 1_000_000_000 } else { 1 };
    let until = mtime + granularity;
    let start = coarse_now();
    // A stamp in the future (a clock set back, `touch -d`) needs no wait: a later write is
    // stamped with the present, not with it. The bound keeps such a close short.
    let limit = start.saturating_add(granularity + 50_000_000);
    loop {
        let now = coarse_now();
        if now >= until || now >= limit {
            return;
        }
        let left = (until - now).clamp(1_000_000, 20_000_000);
        std::thread::sleep(Duration::from_nanos(left as u64));
    }
}

impl Node {
    fn sidecar_error(&self, path: &Path, source: SidecarError) -> ImageError {
        ImageError::Sidecar {
            path: path.to_owned(),
            image: self.filename.clone(),
            source,
        }
    }

    /// The sidecar file that keeps this raw node's persistent bitmaps, or None (not a raw
    /// node, or its image cannot be resolved).
    pub fn sidecar_path(&self) -> Option<PathBuf> {
        (self.driver == crate::options::Driver::Raw)
            .then(|| sidecar::path_for(&self.filename).ok())
            .flatten()
    }

    /// Loads the sidecar's bitmaps (see the module doc); returns the state to keep.
    pub(super) fn load_sidecar(&self) -> Result<Persist, ImageError> {
        let os = &self.file_state().os;
        let meta = os
            .metadata()
            .map_err(|e| ImageError::open(&self.filename, e))?;
        if !meta.is_file() {
            return Ok(Persist::NotLoaded);
        }
        let path =
            sidecar::path_for(&self.filename).map_err(|e| ImageError::open(&self.filename, e))?;
        let now = Identity::of(os).map_err(|e| ImageError::open(&self.filename, e))?;
        let key = (now.dev, now.ino);
        if !self.is_read_only() && !claim(key) {
            tracing::warn!(
                "{}: another node of this process keeps the bitmaps of this image; node \
                 '{}' neither loads nor saves them",
                self.filename.display(),
                self.name
            );
            return Ok(Persist::Elsewhere);
        }
        let loaded = self.read_sidecar(&path, &now);
        let entries = match loaded {
            Ok(e) => e,
            Err(e) => {
                if !self.is_read_only() {
                    release(key);
                }
                return Err(e);
            }
        };
        let on_disk = entries.is_some();
        let entries = entries.unwrap_or_default();
        let size = self.size();
        for (e, bits) in &entries {
            let map = DirtyMap::new(size, e.granularity);
            if let Some(bits) = bits {
                map.load_bytes(bits);
            }
            let b = Bitmap::loaded(&e.name, map, e.enabled, bits.is_none());
            self.bitmaps()
                .insert(Arc::new(b))
                .expect("names in a sidecar are unique");
        }
        if self.is_read_only() {
            return Ok(Persist::ReadOnly);
        }
        if on_disk {
            // In use from here until the node saves: durably, before any request.
            let in_use = Sidecar {
                in_use: true,
                identity: now,
                bitmaps: entries
                    .into_iter()
                    .map(|(e, bits)| Entry {
                        bits: Vec::new(),
                        inconsistent: bits.is_none(),
                        ..e
                    })
                    .collect(),
            };
            if let Err(e) = sidecar::write(&path, &in_use, meta.mode()) {
                release(key);
                return Err(self.sidecar_error(&path, e));
            }
        }
        Ok(Persist::Sidecar(Kept { path, key, on_disk }))
    }

    /// The sidecar's entries, each with its bits (None: inconsistent), or None when there
    /// is no sidecar. Says why in the log when they are inconsistent.
    #[allow(clippy::type_complexity)]
    fn read_sidecar(
        &self,
        path: &Path,
        now: &Identity,
    ) -> Result<Option<Vec<(Entry, Option<Vec<u8>>)>>, ImageError> {
        let Some(bytes) = sidecar::read(path).map_err(|e| self.sidecar_error(path, e))? else {
            return Ok(None);
        };
        let image = self.filename.display();
        let s = match sidecar::decode(&bytes) {
            Ok(s) => s,
            Err(e @ SidecarError::Checksum { .. }) => {
                let names = sidecar::salvage(&bytes).unwrap_or_default();
                tracing::warn!(
                    "{image}: its bitmap file {} fails its checksum ({e}); its {} bitmaps \
                     are loaded inconsistent",
                    path.display(),
                    names.len()
                );
                let entries = names
                    .into_iter()
                    .map(|(name, granularity, enabled)| {
                        let e = Entry {
                            name,
                            granularity,
                            enabled,
                            inconsistent: true,
                            bits: Vec::new(),
                        };
                        (e, None)
                    })
                    .collect();
                return Ok(Some(entries));
            }
            Err(source) => {
                return Err(ImageError::SidecarUnreadable {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let why = if s.in_use {
            Some("sluice had the image open read-write and did not close it (a crash, kill -9)")
        } else if s.identity != *now {
            Some("the image was written, resized or replaced since sluice saved its bitmaps")
        } else {
            None
        };
        if let (Some(why), false) = (why, s.bitmaps.is_empty()) {
            tracing::warn!(
                "{image}: {why}; its bitmaps (in {}) are loaded inconsistent",
                path.display()
            );
        }
        Ok(Some(
            s.bitmaps
                .into_iter()
                .map(|mut e| {
                    let bits =
                        (why.is_none() && !e.inconsistent).then(|| std::mem::take(&mut e.bits));
                    (e, bits)
                })
                .collect(),
        ))
    }

    /// Why a raw node cannot keep a new persistent bitmap of `granularity`, or Ok.
    pub(super) fn can_store_in_sidecar(
        &self,
        st: &Persist,
        granularity: u64,
    ) -> Result<(), String> {
        let kept = match st {
            Persist::Sidecar(k) => k,
            Persist::Elsewhere => {
                return Err(format!(
                    "another node of this process keeps the bitmaps of {}",
                    self.filename.display()
                ))
            }
            Persist::Stored => return Err("the node is closed".into()),
            _ => {
                return Err(format!(
                    "a raw image keeps its bitmaps in a sidecar file, which needs a regular \
                     image file ({} is not one)",
                    self.filename.display()
                ))
            }
        };
        let count = self
            .bitmaps()
            .list()
            .iter()
            .filter(|b| b.is_persistent())
            .count();
        if count >= sidecar::MAX_BITMAPS {
            return Err("Maximum number of persistent bitmaps is already reached".into());
        }
        if sidecar::bits_len(self.size(), granularity) > sidecar::MAX_BITS_LEN {
            return Err(
                "Too much space will be occupied by the bitmap. Use larger granularity".into(),
            );
        }
        sidecar::check_writable(&kept.path)
            .map_err(|e| format!("cannot write its sidecar file {}: {e}", kept.path.display()))
    }

    /// Saves the persistent bitmaps into the sidecar at close, or removes the sidecar when
    /// none is left (see the module doc). Returns false when there was nothing to do (no
    /// persistent bitmap, no sidecar): the node stays open to changes.
    pub(super) fn store_sidecar(&self, kept: &Kept) -> Result<bool, ImageError> {
        // Oldest first, the order they are loaded back in.
        let list: Vec<Arc<Bitmap>> = self
            .bitmaps()
            .list()
            .into_iter()
            .rev()
            .filter(|b| b.is_persistent())
            .collect();
        if list.is_empty() && !kept.on_disk {
            return Ok(false);
        }
        let os = &self.file_state().os;
        self.close_changes(|| {
            let _io = self.io.write();
            self.flush_for_change()?;
            if list.is_empty() {
                return sidecar::remove(&kept.path).map_err(|e| self.sidecar_error(&kept.path, e));
            }
            // After the flush: sluice's own writes are part of what it records.
            let io_err = |e| self.sidecar_error(&kept.path, SidecarError::Io(e));
            let identity = Identity::of(os).map_err(io_err)?;
            let mode = os.metadata().map_err(io_err)?.mode();
            let s = Sidecar {
                in_use: false,
                identity,
                bitmaps: list
                    .iter()
                    .map(|b| Entry {
                        name: b.name().to_string(),
                        granularity: b.granularity(),
                        enabled: b.is_recording(),
                        inconsistent: b.is_inconsistent(),
                        bits: if b.is_inconsistent() {
                            Vec::new()
                        } else {
                            b.map().to_bytes()
                        },
                    })
                    .collect(),
            };
            settle_mtime(&identity);
            sidecar::write(&kept.path, &s, mode).map_err(|e| self.sidecar_error(&kept.path, e))
        })?;
        Ok(true)
    }

    /// Whether the image had a sidecar file when the node took it (`blockdev-reopen`
    /// leaves such a node alone: the file's in-use mark follows the mode).
    pub(super) fn sidecar_on_disk(kept: &Kept) -> bool {
        kept.on_disk
    }

    /// Lets another node keep this image's sidecar (at close).
    pub(super) fn release_sidecar(kept: &Kept) {
        release(kept.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::test_support::*;
    use serde_json::json;

    fn raw_opts(path: &Path, read_only: bool) -> serde_json::Value {
        json!({"driver": "raw", "read-only": read_only,
               "file": {"driver": "file", "filename": path, "read-only": read_only}})
    }

    /// A 1 MiB raw image whose sidecar holds `b` (64 KiB) with block 1 dirty.
    fn saved(dir: &Path) -> PathBuf {
        let img = dir.join("a.raw");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        let node = open_json(raw_opts(&img, false)).unwrap();
        node.load_bitmaps().unwrap();
        node.can_store_bitmap(65536).unwrap();
        let b = Bitmap::new("b", node.size(), 65536, true);
        b.set_persistent(true);
        node.bitmaps().insert(Arc::new(b)).unwrap();
        node.write(&[1; 512], 70000).unwrap();
        node.store_bitmaps().unwrap();
        // Closed to changes once saved.
        assert!(node.write(&[1; 512], 0).is_err());
        img
    }

    fn shown(node: &Node) -> Vec<(String, u64, bool, bool)> {
        node.bitmaps()
            .list()
            .iter()
            .map(|b| {
                (
                    b.name().to_string(),
                    b.count(),
                    b.is_recording(),
                    b.is_inconsistent(),
                )
            })
            .collect()
    }

    #[test]
    fn raw_node_saves_and_loads_back_its_sidecar_bitmaps() {
        let dir = tempfile::tempdir().unwrap();
        let img = saved(dir.path());
        let node = open_json(raw_opts(&img, true)).unwrap();
        node.load_bitmaps().unwrap();
        assert_eq!(shown(&node), [("b".to_string(), 65536, true, false)]);
        assert_eq!(
            node.bitmaps().get("b").unwrap().map().runs(),
            [(65536, 65536)]
        );
        assert_eq!(
            node.can_store_bitmap(65536).unwrap_err(),
            "Cannot store persistent bitmaps in a read-only node"
        );
    }

    #[test]
    fn raw_node_dropped_without_close_leaves_bitmaps_inconsistent() {
        let dir = tempfile::tempdir().unwrap();
        let img = saved(dir.path());
        let node = open_json(raw_opts(&img, false)).unwrap();
        node.load_bitmaps().unwrap();
        // What a kill -9 leaves: the in-use file, written at open.
        let crashed = std::fs::read(sidecar::path_for(&img).unwrap()).unwrap();
        drop(node);
        let side = sidecar::path_for(&img).unwrap();
        std::fs::write(&side, &crashed).unwrap();
        let node = open_json(raw_opts(&img, true)).unwrap();
        node.load_bitmaps().unwrap();
        assert_eq!(shown(&node), [("b".to_string(), 0, false, true)]);
    }

    #[test]
    fn raw_image_changed_or_sidecar_damaged_loads_inconsistent_unreadable_fails() {
        let dir = tempfile::tempdir().unwrap();
        let img = saved(dir.path());
        let side = sidecar::path_for(&img).unwrap();
        let good = std::fs::read(&side).unwrap();
        let load = || {
            let node = open_json(raw_opts(&img, true))?;
            node.load_bitmaps()?;
            Ok::<_, ImageError>(shown(&node))
        };
        let inconsistent = [("b".to_string(), 0, false, true)];
        // A flipped bit in the bits: the checksum fails, the name is kept.
        let mut bad = good.clone();
        let n = bad.len();
        bad[n - 5] ^= 1;
        std::fs::write(&side, &bad).unwrap();
        assert_eq!(load().unwrap(), inconsistent);
        // Truncated: the open fails and says what to do.
        std::fs::write(&side, &good[..40]).unwrap();
        let e = load().unwrap_err().to_string();
        assert!(
            e.contains("truncated")
                && e.ends_with("move the file away to open the image without its bitmaps"),
            "{e}"
        );
        // Grown by another program.
        std::fs::write(&side, &good).unwrap();
        assert!(!load().unwrap()[0].3);
        let f = std::fs::OpenOptions::new().append(true).open(&img).unwrap();
        f.set_len(2 << 20).unwrap();
        assert_eq!(load().unwrap(), inconsistent);
    }

    #[test]
    fn raw_node_removing_the_last_persistent_bitmap_removes_the_sidecar() {
        let dir = tempfile::tempdir().unwrap();
        let img = saved(dir.path());
        let side = sidecar::path_for(&img).unwrap();
        let node = open_json(raw_opts(&img, false)).unwrap();
        node.load_bitmaps().unwrap();
        // A second writable raw node over the same file node does not keep the sidecar.
        let file = node.file_child().unwrap().clone();
        let other = super::super::open::open_raw_node("o".into(), file, false, false).unwrap();
        other.load_bitmaps().unwrap();
        assert!(other.bitmaps().is_empty());
        assert!(other
            .can_store_bitmap(65536)
            .unwrap_err()
            .starts_with("another node of this process keeps the bitmaps of"));
        node.bitmaps().remove("b").unwrap();
        assert!(side.exists());
        node.store_bitmaps().unwrap();
        assert!(!side.exists());
    }

    #[test]
    fn settle_mtime_returns_once_the_clock_passed_the_stamp() {
        let now = coarse_now();
        let id = Identity {
            mtime_sec: (now / 1_000_000_000) as i64,
            mtime_nsec: (now % 1_000_000_000) as u32 | 1,
            ..Identity::default()
        };
        settle_mtime(&id);
        let m = i128::from(id.mtime_sec) * 1_000_000_000 + i128::from(id.mtime_nsec);
        assert!(coarse_now() > m);
        // A stamp far in the future is not waited for (the wait is bounded).
        let future = Identity {
            mtime_sec: id.mtime_sec + 3600,
            ..id
        };
        settle_mtime(&future);
    }
}
