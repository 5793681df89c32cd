//! A raw node's persistent bitmaps over its life, kept in the image's sidecar file
//! (`crate::sidecar` has the format and why the file records the image's identity).
//!
//! The life cycle is qcow2's (`persist.rs`), with the sidecar for the bitmaps directory:
//! - **Where**: the node's `bitmap-file` option when given, else `IMAGE.bitmaps` beside a
//!   regular image file. A block device has no directory that survives a reboot (`/dev` is
//!   a tmpfs), so a raw node over one keeps bitmaps only with `bitmap-file`.
//! - **Load** ([`Node::load_bitmaps`]): every bitmap of the sidecar is loaded; all of them
//!   *inconsistent* when the file says a writer had the image open (`in_use`), when the
//!   image's identity differs from what the file recorded (a file's size, mtime, device or
//!   inode; a block device's number, size, diskseq, boot id or write counters: another
//!   program changed or replaced the image, see `crate::sidecar`), or when its checksum
//!   fails (the names are salvaged); one log line says which. A file that does not parse
//!   at all (bad magic, a newer version, truncated) fails the open with what is wrong:
//!   guessing would hide it. So does a block device whose identity cannot be taken (the
//!   kernel does not count its I/O). A writable node then
//!   rewrites the file with `in_use` set (and no bits), durably, before it takes a request,
//!   so a crash from here on leaves the bitmaps detectably inconsistent.
//! - **Add**: `persistent: true` is accepted on a writable raw node with a sidecar location
//!   (above) whose directory takes the file ([`Node::can_store_bitmap`] tries). A block
//!   device without `bitmap-file` is refused with a message naming the option.
//! - **Save** ([`Node::store_bitmaps`], at `blockdev-del`, at exit and from `Drop`): with
//!   every request held off, the image is flushed, *then* its identity taken (so sluice's
//!   own writes do not make its own file look stale), then the file written atomically
//!   without `in_use`; with no persistent bitmap left it is removed instead. As for qcow2
//!   the node takes no more changes afterwards: one would make the file stale.
//!   `block-dirty-bitmap-remove` of a persistent bitmap takes effect here, at close (a crash
//!   before then brings it back inconsistent, not stale).
//!
//! **Timestamps** (regular files only). The identity check relies on a later write giving
//! the image another mtime. Timestamps come from the kernel's coarse clock (a tick, 1-10 ms) and some file
//! systems keep whole seconds, so a write in the same tick as sluice's last one would keep
//! the mtime sluice recorded. Saving therefore waits, before it lets the image go (the image
//! lock keeps other writers out until then), until the coarse clock has passed the recorded
//! mtime by the file system's apparent granularity (a second when the recorded nanoseconds
//! are 0, else one tick): at most that long, once per close.
//!
//! **One keeper per image.** Two writable raw nodes of one process may share a file node
//! (qemu's lock bytes do not separate them); only the first keeps the sidecar. The other
//! loads nothing and refuses persistent bitmaps, instead of both writing the file. A
//! block device is one image whatever node in `/dev` opened it (its device number), and
//! two images of one process naming the same `bitmap-file` are refused at the second open.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::persist::Persist;
use super::Node;
use crate::bitmaps::Bitmap;
use crate::dirty::DirtyMap;
use crate::error::ImageError;
use crate::sidecar::{self, Entry, FileIdentity, Identity, Sidecar, SidecarError};

/// A writable raw node's sidecar (see the module doc).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Kept {
    path: PathBuf,
    /// The image: this node's claim in [`KEPT`].
    key: ImageKey,
    /// A sidecar existed at open (it is rewritten or removed at close).
    on_disk: bool,
}

/// What makes two nodes' images the same image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ImageKey {
    /// A regular file: (device, inode).
    File(u64, u64),
    /// A block device, by its number (two nodes in `/dev` may name one device).
    Device(u64),
}

impl ImageKey {
    fn of(id: &Identity) -> ImageKey {
        match id {
            Identity::File(f) => ImageKey::File(f.dev, f.ino),
            Identity::Device(d) => ImageKey::Device(d.rdev),
        }
    }
}

/// The images whose sidecar a node of this process keeps, and where.
static KEPT: std::sync::Mutex<Vec<(ImageKey, PathBuf)>> = std::sync::Mutex::new(Vec::new());

/// Why a node cannot keep the sidecar at `path` of the image `key`.
enum Taken {
    /// Another node keeps this image's sidecar.
    Image,
    /// Another image's node keeps its sidecar in this file.
    File,
}

fn claim(key: ImageKey, path: &Path) -> Result<(), Taken> {
    let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
    if kept.iter().any(|(k, _)| *k == key) {
        return Err(Taken::Image);
    }
    if kept.iter().any(|(_, p)| p == path) {
        return Err(Taken::File);
    }
    kept.push((key, path.to_owned()));
    Ok(())
}

fn release(key: ImageKey) {
    let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
    kept.retain(|(k, _)| *k != key);
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
fn settle_mtime(id: &FileIdentity) {
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
    /// node, a block device without `bitmap-file`, or its image cannot be resolved).
    pub fn sidecar_path(&self) -> Option<PathBuf> {
        if self.driver != crate::options::Driver::Raw {
            return None;
        }
        if let Some(p) = &self.bitmap_file {
            return Some(p.clone());
        }
        let regular = std::fs::metadata(&self.filename).is_ok_and(|m| m.is_file());
        regular
            .then(|| sidecar::path_for(&self.filename).ok())
            .flatten()
    }

    /// Loads the sidecar's bitmaps (see the module doc); returns the state to keep.
    pub(super) fn load_sidecar(&self) -> Result<Persist, ImageError> {
        let os = &self.file_state().os;
        let meta = os
            .metadata()
            .map_err(|e| ImageError::open(&self.filename, e))?;
        let path = match &self.bitmap_file {
            Some(p) => p.clone(),
            None if meta.is_file() => sidecar::path_for(&self.filename)
                .map_err(|e| ImageError::open(&self.filename, e))?,
            // A block device without `bitmap-file`: nowhere to keep them.
            None => return Ok(Persist::NotLoaded),
        };
        let now = Identity::of(os).map_err(|e| self.sidecar_error(&path, SidecarError::Io(e)))?;
        let key = ImageKey::of(&now);
        if !self.is_read_only() {
            match claim(key, &path) {
                Ok(()) => {}
                Err(Taken::Image) => {
                    tracing::warn!(
                        "{}: another node of this process keeps the bitmaps of this image; \
                         node '{}' neither loads nor saves them",
                        self.filename.display(),
                        self.name
                    );
                    return Ok(Persist::Elsewhere);
                }
                Err(Taken::File) => {
                    return Err(self.sidecar_error(
                        &path,
                        SidecarError::Io(std::io::Error::other(
                            "another image's node of this process keeps its bitmaps in that \
                             file: give each image a bitmap-file of its own",
                        )),
                    ))
                }
            }
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
            Some(
                "sluice had the image open read-write and did not close it (a crash, kill -9)"
                    .to_string(),
            )
        } else {
            s.identity.differs(now)
        };
        if let (Some(why), false) = (&why, s.bitmaps.is_empty()) {
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
            _ if self.sidecar_path().is_none() => {
                return Err(format!(
                    "a raw image over a block device keeps its bitmaps in the file its \
                     bitmap-file option names ({} has none: add bitmap-file=PATH, on a file \
                     system that outlives a reboot)",
                    self.filename.display()
                ))
            }
            _ => return Err("the node's persistent bitmaps were not loaded".into()),
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
            if let Identity::File(f) = &identity {
                settle_mtime(f);
            }
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
        let other =
            super::super::open::open_raw_node("o".into(), file, false, false, None).unwrap();
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
        let id = FileIdentity {
            mtime_sec: (now / 1_000_000_000) as i64,
            mtime_nsec: (now % 1_000_000_000) as u32 | 1,
            ..FileIdentity::default()
        };
        settle_mtime(&id);
        let m = i128::from(id.mtime_sec) * 1_000_000_000 + i128::from(id.mtime_nsec);
        assert!(coarse_now() > m);
        // A stamp far in the future is not waited for (the wait is bounded).
        let future = FileIdentity {
            mtime_sec: id.mtime_sec + 3600,
            ..id
        };
        settle_mtime(&future);
    }
}
