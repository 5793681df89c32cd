//! What block jobs build on: stream copy-on-read, the backing switch, a writer into a
//! read-only base, and reloading a node that such a writer changed.
//!
//! **Streaming and backing switches** ([`Node::stream_range`], [`Node::switch_backing`]).
//! The copy-on-read of a stream checks the allocation depth and copies under the exclusive
//! `io` lock, so a client write can never be overwritten by older backing data. A backing
//! switch also takes `io` exclusively: imago keeps its own copy of the header, so the node
//! flushes, writes the first cluster encoded by [`crate::header::Qcow2Header::encode`] in
//! one `pwrite` + `fdatasync`, reopens imago over the same file node with the new chain and
//! swaps that view (backing, header, imago instance) in. Requests take the view after
//! their `io` guard, so each sees one chain from start to end.
//!
//! **Commits** ([`Node::commit_range`], [`Node::open_writer`], [`Node::reload`]).
//! `block-commit` copies what the committed layers hold, read from the top layer's own
//! chain (not through its gate, which an external snapshot turned to the overlay), into a
//! read-only base through a second, writable node over the same image; afterwards the base
//! drops what it cached, since the file changed under it. An active commit's write tracking
//! and pivot are the other side of the request gate, and live with it in `gate.rs`.
//!
//! These steps do not pass the gate (see `gate.rs` for why that is sound).

use std::sync::Arc;

use imago::qcow2::Qcow2;
use imago::FormatAccess;
use sluice_block::{BlockError, Errno, Result};

use super::open::{open_node, read_header};
use super::{Layer, Node, Qcow2Info, Storage, View};
use crate::error::ImageError;
use crate::header::{Format, HeaderError};
use crate::lock::Locking;
use crate::options::{BackingRef, BlockdevOptions, ChildRef, Driver};

impl Node {
    /// Copy-on-read for `block-stream`: copies into this node the data of
    /// `[offset, offset+count)` that this node does not hold and that a layer above `base`
    /// holds (every layer below this node when `base` is None). Returns the bytes copied.
    ///
    /// The check and the copy happen under the exclusive `io` lock, so a client write
    /// (which holds it shared) lands either before the check (and is then kept: the range is
    /// allocated here) or after the copy (and overwrites it): older backing data never
    /// overwrites a newer write.
    pub fn stream_range(&self, offset: u64, count: u64, base: Option<&Node>) -> Result<u64> {
        self.check_writable("stream")?;
        let end = offset.saturating_add(count).min(self.size());
        // Depth of the first layer not to copy from (qemu's base): 1 = self, 2 = backing...
        let mut base_depth = u32::MAX;
        if let Some(base) = base {
            let mut depth = 1u32;
            let mut next = self.backing();
            while let Some(n) = next {
                depth += 1;
                if std::ptr::eq(&*n, base) {
                    base_depth = depth;
                    break;
                }
                next = n.backing();
            }
            if base_depth == u32::MAX {
                return Err(BlockError::new(
                    Errno::EINVAL,
                    format!(
                        "stream: '{}' is not a backing node of '{}'",
                        base.name, self.name
                    ),
                ));
            }
        }
        let _g = self.io.write();
        self.copy_held(offset, end, "stream", 2..base_depth, |buf, at| {
            self.write_locked(buf, at)
        })
    }

    /// The copy loop of stream and commit, with `io` held by the caller: reads (through
    /// this node's own chain) each range of `[offset, end)` held at a depth in `depths`
    /// (1 = this node) and hands it to `write`. Returns the bytes copied.
    fn copy_held(
        &self,
        offset: u64,
        end: u64,
        what: &'static str,
        depths: std::ops::Range<u32>,
        mut write: impl FnMut(&[u8], u64) -> Result<()>,
    ) -> Result<u64> {
        let mut copied = 0u64;
        let mut buf = Vec::new();
        for seg in self.segments(offset, end, Some(what)) {
            let (at, seg) = seg?;
            if depths.contains(&seg.depth) {
                buf.resize(seg.len as usize, 0);
                self.read_locked(&mut buf, at)?;
                write(&buf, at)?;
                copied += seg.len;
            }
        }
        Ok(copied)
    }

    /// A commit's copy of `[offset, offset+count)`: writes into `writer` (the base's
    /// writer, see [`Node::open_writer`]) what this node and the layers below it hold down
    /// to, not including, the layer at `base_depth` (1 = this node). Returns the bytes
    /// copied.
    ///
    /// This node's own chain is read, not through its gate: after an external snapshot
    /// the gate sends this node's requests to the overlay, whose data is not this commit's
    /// (and whose depths are one deeper). Nothing writes to a committed layer meanwhile
    /// (it is a read-only backing node, and the daemon runs one job per node).
    pub fn commit_range(
        &self,
        offset: u64,
        count: u64,
        base_depth: u32,
        writer: &Node,
    ) -> Result<u64> {
        let end = offset.saturating_add(count).min(self.size());
        let _g = self.io.read();
        self.copy_held(offset, end, "commit", 1..base_depth, |buf, at| {
            writer.write(buf, at)
        })
    }

    /// Makes `backing` this qcow2 node's backing, durably: writes back everything, writes
    /// the first cluster with the new backing file `name` and `format` (None: no backing)
    /// in one write and `fdatasync`s it, then reopens imago over the same file with the new
    /// chain and swaps that in. All under the exclusive `io` lock: no request sees a mix.
    /// The data the dropped layers held must already be in this node (see
    /// [`Node::stream_range`]).
    pub fn switch_backing(
        &self,
        backing: Option<Arc<Node>>,
        name: Option<&str>,
        format: Option<Format>,
    ) -> std::result::Result<(), ImageError> {
        use std::os::unix::fs::FileExt;
        let path = self.filename.clone();
        let unsupported = |why: String| ImageError::bad_image(&path, HeaderError::Unsupported(why));
        if self.driver != Driver::Qcow2 {
            return Err(unsupported(format!(
                "node '{}' is not qcow2: only qcow2 images have a backing file",
                self.name
            )));
        }
        self.check_writable("switch backing")
            .map_err(|e| unsupported(e.to_string()))?;
        let same = match (&backing, self.backing()) {
            (Some(b), Some(cur)) => Arc::ptr_eq(b, &cur),
            _ => false,
        };
        if let Some(b) = backing.as_ref().filter(|_| !same) {
            if !b.is_read_only() {
                return Err(ImageError::Permission(format!(
                    "node '{}' cannot be the backing of '{}': backing nodes must be read-only",
                    b.name, self.name
                )));
            }
        }
        let _g = self.io.write();
        self.flush_locked()
            .map_err(|e| unsupported(e.to_string()))?;
        // Read back, not the copy from open: imago may have moved the refcount table since.
        let file = self.file.as_ref().expect("format nodes have a file child");
        let mut header = read_header(file)?;
        header.set_backing(name, format);
        let mut cluster = header
            .encode()
            .map_err(|e| ImageError::bad_image(&path, e))?;
        cluster.resize(header.cluster_size() as usize, 0);
        let fs = self.file_state();
        fs.os
            .write_all_at(&cluster, 0)
            .and_then(|()| fs.os.sync_data())
            .map_err(|e| ImageError::open(&path, e))?;
        let mut q = Qcow2::<Storage, Arc<Layer>>::open_image(self.storage().clone(), true)
            .map_err(|e| ImageError::open(&path, e))?;
        q.set_data_file(None);
        q.set_backing(backing.as_ref().map(|b| b.view().layer.clone()));
        let view = View::new(backing, Some(Qcow2Info { header }), FormatAccess::new(q));
        *self.view.write() = Arc::new(view);
        Ok(())
    }

    /// `change-backing-file`: rewrites the backing file name (and format) this qcow2
    /// node's header records, leaving its backing node as it is. A writable node does it as
    /// [`Node::switch_backing`] to the same backing; a read-only one, like qemu's brief
    /// reopen read-write, through a descriptor of its own opened for writing, then keeps
    /// the new header for what it reports (its imago instance never writes the header).
    pub fn change_backing_file(
        &self,
        name: &str,
        format: Option<Format>,
    ) -> std::result::Result<(), ImageError> {
        use std::os::unix::fs::FileExt;
        if !self.is_read_only()
            && self
                .file_state()
                .writable
                .load(std::sync::atomic::Ordering::Acquire)
        {
            return self.switch_backing(self.backing(), Some(name), format);
        }
        let path = self.filename.clone();
        if self.driver != Driver::Qcow2 {
            return Err(ImageError::bad_image(
                &path,
                HeaderError::Unsupported(format!("node '{}' is not qcow2", self.name)),
            ));
        }
        let _g = self.io.write();
        let file = self.file.as_ref().expect("format nodes have a file child");
        let mut header = read_header(file)?;
        header.set_backing(Some(name), format);
        let mut cluster = header
            .encode()
            .map_err(|e| ImageError::bad_image(&path, e))?;
        cluster.resize(header.cluster_size() as usize, 0);
        let rw = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| ImageError::open(&path, e))?;
        rw.write_all_at(&cluster, 0)
            .and_then(|()| rw.sync_data())
            .map_err(|e| ImageError::open(&path, e))?;
        let view = self.view();
        let new = View {
            backing: view.backing.clone(),
            qcow2: Some(Qcow2Info { header }),
            layer: view.layer.clone(),
        };
        *self.view.write() = Arc::new(new);
        Ok(())
    }

    /// Makes `backing` this qcow2 node's backing in memory only: the header keeps the
    /// backing file name it has (qemu's `blockdev-snapshot` does not rewrite it either).
    /// Unlike [`Node::switch_backing`], the backing may be writable: it is the node an
    /// external snapshot freezes, whose own requests go to this node from then on (see
    /// [`Node::snapshot_onto`]).
    pub fn attach_backing(&self, backing: Arc<Node>) -> std::result::Result<(), ImageError> {
        let path = self.filename.clone();
        if self.driver != Driver::Qcow2 {
            return Err(ImageError::Permission(
                "The overlay does not support backing images".into(),
            ));
        }
        let _g = self.io.write();
        self.flush_locked()
            .map_err(|e| ImageError::open(&path, std::io::Error::other(e.to_string())))?;
        let mut q =
            Qcow2::<Storage, Arc<Layer>>::open_image(self.storage().clone(), !self.is_read_only())
                .map_err(|e| ImageError::open(&path, e))?;
        q.set_data_file(None);
        q.set_backing(Some(backing.view().layer.clone()));
        let header = self.view().qcow2.clone();
        *self.view.write() = Arc::new(View::new(Some(backing), header, FormatAccess::new(q)));
        Ok(())
    }

    /// A writable node over this (read-only) node's image, for `block-commit`, which writes
    /// into a read-only base. It has this node's backing as its backing (so partial-cluster
    /// writes fill in from the same chain) and takes no image locks: the locks this node
    /// already holds keep other processes out, and the writer is the daemon's own. While
    /// the writer lives, this node must not read the ranges written through it; once done,
    /// flush and drop the writer, then [`Node::reload`] this node. Its writes mark this
    /// node's dirty bitmaps.
    ///
    /// A plugin node has no image to open again: the owner of its device opens a writable
    /// device and makes it a node ([`crate::open_plugin_node`]).
    pub fn open_writer(&self) -> std::result::Result<Arc<Node>, ImageError> {
        if self.driver == Driver::Plugin {
            return Err(ImageError::Permission(format!(
                "node '{}' is a device seen as a layer: open the device writable instead",
                self.name
            )));
        }
        let backing = self.backing();
        let mut opts = BlockdevOptions::image(self.driver_of_image(), &self.filename, false);
        opts.locking = Locking::Off;
        if let Some(ChildRef::Options(f)) = &mut opts.file {
            f.locking = Locking::Off;
        }
        opts.backing = match &backing {
            Some(b) => BackingRef::Child(ChildRef::Node(b.name.clone())),
            None => BackingRef::None,
        };
        let resolve = |n: &str| backing.clone().filter(|b| b.name == n);
        let writer = open_node(&opts, &resolve)?;
        // The writer changes this node's image: it marks this node's bitmaps.
        let _ = writer.bitmaps.set(self.bitmaps().clone());
        // Opening it writable cleared autoclear bit 0 (imago does, as any program that does
        // not know bitmaps): mark the image's persistent bitmaps in use and set the bit
        // back, so that they read as inconsistent from now on (this read-only node cannot
        // save them) and the header again matches what this node's imago instance holds
        // (its reload refuses a changed autoclear field).
        if let Some(q) = self.qcow2() {
            // Through the writer's descriptor: this node's is read-only.
            let os = &writer.file_state().os;
            crate::qcow2_bitmaps::mark_in_use(os, &q.header).map_err(|source| {
                ImageError::Bitmaps {
                    path: self.filename.clone(),
                    source,
                }
            })?;
        }
        Ok(writer)
    }

    /// The format driver of this node's image (a `file` node is a raw image).
    fn driver_of_image(&self) -> Driver {
        match self.driver {
            Driver::Qcow2 => Driver::Qcow2,
            Driver::Raw | Driver::File | Driver::Blkdebug | Driver::Plugin => Driver::Raw,
        }
    }

    /// Drops what this qcow2 node cached of its image (header, L1/L2 tables, refcounts)
    /// after another writer (see [`Node::open_writer`]) changed the image: imago reloads
    /// them from the file on the next access. The imago instance itself stays, because the
    /// nodes above this one read through it as their backing (and find this node by it).
    /// Nothing to do for raw and file nodes.
    pub fn reload(&self) -> std::result::Result<(), ImageError> {
        if self.driver != Driver::Qcow2 {
            return Ok(());
        }
        let path = self.filename.clone();
        let _g = self.io.write();
        if !self.is_read_only() {
            self.flush_locked()
                .map_err(|e| ImageError::open(&path, std::io::Error::other(e.to_string())))?;
        }
        let file = self.file.as_ref().expect("format nodes have a file child");
        let header = read_header(file)?;
        let old = self.view();
        // SAFETY: the exclusive `io` lock keeps this node's requests out, what this node had
        // to write back was flushed above (a read-only node has nothing), and the other
        // writer flushed before this is called, so the file is consistent.
        unsafe { old.layer.invalidate_cache() }.map_err(|e| ImageError::open(&path, e))?;
        *self.view.write() = Arc::new(View {
            backing: old.backing.clone(),
            qcow2: Some(Qcow2Info { header }),
            layer: old.layer.clone(),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::test_support::*;

    #[test]
    fn stream_range_then_switch_backing_to_none_flattens() {
        let (_dir, c) = chain3();
        let node = open_json(qcow2_opts(&c, false)).unwrap();
        let before = read(&node, 1 << 20, 0);
        assert!(stream_all(&node, None) > 0);
        // Everything is in the top now: a second pass copies nothing.
        assert_eq!(stream_all(&node, None), 0);
        node.switch_backing(None, None, None).unwrap();
        assert!(node.backing().is_none());
        assert_eq!(read(&node, 1 << 20, 0), before);
        node.write(&[0x44; 10], 5).unwrap();
        node.flush().unwrap();
        drop(node);
        let info = qemu_img_info(&c);
        assert!(!info.contains("backing-filename"), "{info}");
        let mut want = before;
        want[5..15].fill(0x44);
        assert_image_is(&c, &want);
    }

    #[test]
    fn stream_range_with_base_keeps_base_and_switches_to_it() {
        let (_dir, c) = chain3();
        let node = open_json(qcow2_opts(&c, false)).unwrap();
        let before = read(&node, 1 << 20, 0);
        let b = node.backing().unwrap();
        let a = b.backing().unwrap();
        let copied = stream_all(&node, Some(&a));
        // Only b's clusters: 200k+5000 spans 2 clusters of 64 KiB, the zero write one.
        assert_eq!(copied, 3 * 65536);
        node.switch_backing(Some(a.clone()), Some("a.qcow2"), Some(Format::Qcow2))
            .unwrap();
        assert!(Arc::ptr_eq(&node.backing().unwrap(), &a));
        assert_eq!(read(&node, 1 << 20, 0), before);
        drop((node, b, a));
        let info = qemu_img_info(&c);
        assert!(info.contains("\"backing-filename\": \"a.qcow2\""), "{info}");
        assert!(
            info.contains("\"backing-filename-format\": \"qcow2\""),
            "{info}"
        );
        assert_image_is(&c, &before);
    }

    #[test]
    fn commit_range_after_snapshot_copies_the_layer_not_its_overlay() {
        let (dir, c) = chain3();
        let node = open_json(qcow2_opts(&c, false)).unwrap();
        let before = read(&node, 1 << 20, 0);
        let overlay = bare_overlay(dir.path());
        node.snapshot_onto(overlay.clone()).unwrap();
        // The node's requests go to the overlay now; this write is not the node's data.
        overlay.write(&[0x77; 4096], 69632).unwrap();
        let a = node.backing().unwrap().backing().unwrap();
        let writer = a.open_writer().unwrap();
        // c and b (depths 1 and 2) into a (depth 3).
        assert!(node.commit_range(0, 1 << 20, 3, &writer).unwrap() > 0);
        writer.flush().unwrap();
        drop(writer);
        a.reload().unwrap();
        assert_eq!(read(&a, 1 << 20, 0), before);
    }

    #[test]
    fn stream_range_does_not_overwrite_top_data() {
        let (_dir, c) = chain3();
        let node = open_json(qcow2_opts(&c, false)).unwrap();
        node.write(&[0x55; 100], 1100).unwrap();
        stream_all(&node, None);
        let got = read(&node, 2000, 0);
        assert!(got[1100..1200].iter().all(|&x| x == 0x55));
        assert!(got[1000..1100].iter().all(|&x| x == 0x11));
    }
}
