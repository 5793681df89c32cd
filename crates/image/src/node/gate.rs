//! The gate: the one door every request of a node passes, and what an active commit hangs
//! on it.
//!
//! An active commit needs two things of the node it commits (the one clients write to).
//! While it copies, every range a request changes must be recorded, so that the job copies
//! it again; at the end, every request must move to the base, with none straddling the move.
//! Both hang on one read-write lock per node, [`Tracking`]: every request holds it shared
//! for its whole run, marking what it changed before it lets go, and
//! [`Node::track_writes`] and [`Node::pivot`] take it exclusively, so tracking starts after
//! the requests in flight and the pivot sees every completed write.
//!
//! The gate is written once, here. Each public request method (in `io.rs` and `status.rs`)
//! is one call: [`Node::look`] for requests that only read, [`Node::change`] for those that
//! change the image, which marks the request's range when it ends (failed or not: a failed
//! write may have changed part of it). Their bodies take a pass, [`Reading`] or
//! [`Changing`], that only this module makes, so a new request method cannot reach a body
//! without passing the gate, and a body that changes the image cannot run as a read.
//!
//! The gate also checks a format node's write threshold (`sluice_block::threshold`: one
//! atomic load); a file node's is checked below it, in its storage, where the writes of the
//! format node above arrive too.
//!
//! A write-blocking mirror hangs a fourth, [`AfterWrite`]: after a change ran, with the
//! gate still held, the hook copies the range to the mirror's target before the request
//! completes. When it succeeds the range is not marked dirty: the target has it (QEMU's
//! active mirror resets its bitmap there too), so a guest that writes faster than the
//! background copy runs cannot keep the mirror from converging. The hook serializes its
//! copy with the mirror's background copies of overlapping ranges, and both read the
//! source when they copy, so the one that copies last copies the newest data. A failed
//! copy marks the range, so the background copy goes over it again.
//!
//! The same place marks the node's named dirty bitmaps ([`crate::bitmaps`]), so that they
//! see every change an NBD client, a job or an active commit's writer makes.
//!
//! A backup hangs a third thing there, [`BeforeWrite`]: QEMU's copy-before-write. Before
//! a change runs, with the gate held shared, the hook is given the range and a way to read
//! what the node holds now, and copies the old data of that range to the backup's target
//! if the backup still needs it. The write waits for that copy, so the target holds the
//! node as it was when the backup began, whatever clients write meanwhile. The hook reads
//! through the pass this module gives it, never through [`Node::read`], so it cannot wait
//! on the gate it is inside of.
//!
//! Block jobs' own steps (`jobs.rs`: stream copy-on-read, backing switch, reload) do not
//! pass the gate: they change no data the guest sees, so there is nothing to mark, and the
//! daemon refuses a second job on a node that already has one, so no commit tracks a node
//! being streamed.

use std::sync::Arc;

use parking_lot::RwLock;
use sluice_block::Result;

use super::Node;
use crate::dirty::DirtyMap;

/// What an active commit installs on its node (see the module doc).
#[derive(Debug, Default)]
pub(super) struct Tracking {
    state: RwLock<State>,
}

/// QEMU's copy-before-write, as a backup installs it on its source (see the module doc).
pub trait BeforeWrite: Send + Sync + std::fmt::Debug {
    /// Called before a request changes `[offset, offset+len)`, with the node's gate held;
    /// `read(buf, at)` reads what the node holds now. An error fails the request unchanged
    /// (QEMU's `on-cbw-error=break-guest-write`).
    fn before_write(
        &self,
        offset: u64,
        len: u64,
        read: &dyn Fn(&mut [u8], u64) -> Result<()>,
    ) -> Result<()>;
}

/// A mirror's write-blocking copy (QEMU's active mirror), hung on its source.
pub trait AfterWrite: Send + Sync + std::fmt::Debug {
    /// Called after a request changed `[offset, offset+len)` and before it completes, with
    /// the node's gate held; `read(buf, at)` reads what the node holds now. Ok: the copy
    /// has the range, which is not marked in the tracking dirty map. An error fails the
    /// request (the node has the change, the copy does not) and the range is marked.
    fn after_write(
        &self,
        offset: u64,
        len: u64,
        read: &dyn Fn(&mut [u8], u64) -> Result<()>,
    ) -> Result<()>;
}

#[derive(Debug, Default)]
struct State {
    /// A write-blocking mirror's copy.
    after_write: Option<Arc<dyn AfterWrite>>,
    /// Ranges written since tracking began.
    dirty: Option<Arc<DirtyMap>>,
    /// A backup's copy-before-write.
    before_write: Option<Arc<dyn BeforeWrite>>,
    /// Set by the pivot: this node's requests go to that node from now on.
    redirect: Option<Arc<Node>>,
    /// Set when the node saved its persistent bitmaps at close (`persist.rs`): from then on
    /// the image's metadata is no longer imago's alone, so nothing may change it.
    closed: bool,
}

/// Proof that a request that only reads passed the gate (or that the caller holds the gate
/// exclusively). Only this module makes one.
#[derive(Clone, Copy)]
pub(super) struct Reading(());

/// Proof that a request that changes the image passed the gate, which marks the request's
/// range when it ends. Only [`Node::change`] makes one.
#[derive(Clone, Copy)]
pub(super) struct Changing(());

impl Changing {
    /// A change may read too (qemu's block 0 check reads before it writes).
    pub(super) fn reading(self) -> Reading {
        Reading(())
    }
}

impl Node {
    /// Runs a request that only reads: on the node an active commit pivoted this one to, if
    /// it was; else on this node, holding the gate shared for the whole of `op`.
    pub(super) fn look<R>(&self, op: impl FnOnce(&Node, Reading) -> Result<R>) -> Result<R> {
        let state = self.tracking.state.read();
        if let Some(target) = state.redirect.clone() {
            drop(state);
            return target.look(op);
        }
        op(self, Reading(()))
    }

    /// Runs a request that changes `[offset, offset+len)`: as [`Node::look`], and the range
    /// is marked in the dirty map (if someone is tracking) and in the node's recording dirty
    /// bitmaps before the gate is let go.
    /// `writes`: the request writes data or zeroes (not a trim), so it counts against a
    /// format node's write threshold, as in qemu.
    pub(super) fn change<R>(
        &self,
        offset: u64,
        len: u64,
        writes: bool,
        op: impl FnOnce(&Node, Changing) -> Result<R>,
    ) -> Result<R> {
        let state = self.tracking.state.read();
        if let Some(target) = state.redirect.clone() {
            drop(state);
            return target.change(offset, len, writes, op);
        }
        if writes && self.file_state.is_none() {
            self.threshold.check(offset, len);
        }
        if state.closed {
            return Err(sluice_block::BlockError::new(
                sluice_block::Errno::EIO,
                format!(
                    "node '{}' is closed (its persistent bitmaps were saved)",
                    self.name
                ),
            ));
        }
        if let Some(hook) = &state.before_write {
            hook.before_write(offset, len, &|buf, at| self.read_body(Reading(()), buf, at))?;
        }
        let mut r = op(self, Changing(()));
        // A write-blocking mirror's copy of the change, when it succeeds, stands for the
        // mark (see the module doc).
        let mut copied = false;
        if let (Ok(_), Some(hook)) = (&r, &state.after_write) {
            match hook.after_write(offset, len, &|buf, at| self.read_body(Reading(()), buf, at)) {
                Ok(()) => copied = true,
                Err(e) => r = Err(e),
            }
        }
        if let (Some(dirty), false) = (&state.dirty, copied) {
            dirty.mark(offset, len);
        }
        if let Some(bitmaps) = self.bitmaps.get() {
            bitmaps.mark(offset, len);
        }
        r
    }

    /// Runs `close` with every request of this node held off; if it succeeds, the node
    /// refuses every change from then on (see `persist.rs`).
    pub(super) fn close_changes<R>(
        &self,
        close: impl FnOnce() -> std::result::Result<R, crate::ImageError>,
    ) -> std::result::Result<R, crate::ImageError> {
        let mut state = self.tracking.state.write();
        let r = close()?;
        state.closed = true;
        Ok(r)
    }

    /// The node that serves this node's requests now: itself, or the one an active commit
    /// pivoted it to.
    pub fn active(&self) -> Arc<Node> {
        match &self.tracking.state.read_recursive().redirect {
            Some(n) => n.active(),
            None => self.arc(),
        }
    }

    /// Starts (Some) or stops (None) recording in `map` the ranges that writes, zeroes and
    /// trims of this node change (see [`crate::dirty`]). Waits for the requests in flight,
    /// so every request that completes after this returns is recorded.
    pub fn track_writes(&self, map: Option<Arc<DirtyMap>>) {
        self.tracking.state.write().dirty = map;
    }

    /// Installs (Some) or removes (None) a backup's copy-before-write hook. Waits for the
    /// requests in flight, so every change that starts after this returns is seen by it.
    pub fn set_before_write(&self, hook: Option<Arc<dyn BeforeWrite>>) {
        self.tracking.state.write().before_write = hook;
    }

    /// Installs (Some) or removes (None) a write-blocking mirror's copy. Waits for the
    /// requests in flight, so every change that completes after this returns was copied.
    pub fn set_after_write(&self, hook: Option<Arc<dyn AfterWrite>>) {
        self.tracking.state.write().after_write = hook;
    }

    /// The end of an active commit or a mirror: with every request of this node held off,
    /// copies what `dirty` still marks from this node into `target`, flushes `target` and
    /// this node, and from then on sends every request of this node to `target` (which
    /// holds the same data, and whose backing must be what remains of this node's chain
    /// below it). Returns the bytes copied. On error nothing is redirected.
    ///
    /// This node is flushed here because nothing reaches its own caches afterwards: every
    /// later flush goes to `target`. Without it, what clients wrote before the pivot and
    /// never flushed stayed in imago's caches while the L1 entries held back for them
    /// (`storage.rs`) were written when the file closed: an L1 entry pointing at an L2
    /// table whose refcount never reached the file, which `qemu-img check` reports as
    /// corruption.
    pub fn pivot(&self, dirty: &DirtyMap, target: Arc<Node>) -> Result<u64> {
        let mut state = self.tracking.state.write();
        let mut copied = 0;
        let mut buf = Vec::new();
        while let Some((offset, len)) = dirty.take(0, 4 << 20) {
            buf.resize(len as usize, 0);
            // The gate is held exclusively: this read is inside it.
            let r = self
                .read_body(Reading(()), &mut buf, offset)
                .and_then(|()| target.write(&buf, offset));
            if let Err(e) = r {
                dirty.mark(offset, len);
                return Err(e);
            }
            copied += len;
        }
        target.flush()?;
        if !self.is_read_only() {
            // The gate is held exclusively: this flush is inside it.
            self.flush_body(Reading(()))?;
        }
        state.dirty = None;
        state.after_write = None;
        state.redirect = Some(target);
        Ok(copied)
    }
}

impl Node {
    /// An external snapshot: `overlay` (a qcow2 node with no backing) gets this node as its
    /// backing, and every request of this node goes to `overlay` from then on. With this
    /// node's requests held off (the gate exclusively), this node is written back and the
    /// overlay attached, so a write completed before belongs to this node's image and one
    /// that starts after lands in the overlay: none is lost, none lands on the wrong layer.
    pub fn snapshot_onto(&self, overlay: Arc<Node>) -> std::result::Result<(), crate::ImageError> {
        let mut state = self.tracking.state.write();
        if state.redirect.is_some() {
            return Err(crate::ImageError::Permission(format!(
                "node '{}' already forwards its requests to another node",
                self.name
            )));
        }
        if !self.is_read_only() {
            // The gate is held exclusively: this flush is inside it.
            self.flush_body(Reading(())).map_err(|e| {
                crate::ImageError::open(&self.filename, std::io::Error::other(e.to_string()))
            })?;
        }
        overlay.attach_backing(self.arc())?;
        state.redirect = Some(overlay);
        Ok(())
    }

    /// For a node that goes out of use: every node of its backing chain that forwards its
    /// requests to it (a snapshot's old node, a `sync: none` mirror's source) serves its
    /// own image again. Each of the two held the other (the forward and the backing), so
    /// without this neither would ever be freed, nor its image closed. Returns how many
    /// forwards were dropped.
    pub fn release_backing_forwards(&self) -> usize {
        let mut dropped = 0;
        let mut below = self.backing();
        while let Some(b) = below {
            let mut state = b.tracking.state.write();
            if state
                .redirect
                .as_ref()
                .is_some_and(|r| std::ptr::eq(Arc::as_ptr(r), self))
            {
                state.redirect = None;
                dropped += 1;
            }
            drop(state);
            below = b.backing();
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::test_support::*;
    use sluice_block::extents::Extents;
    use sluice_block::Errno;

    /// Active commit at the node level: writes during tracking are marked (also those
    /// between the copy and the pivot), the pivot copies what is left and redirects.
    #[test]
    fn track_writes_then_pivot_moves_every_write_to_the_target() {
        let (dir, c) = chain3();
        let top = open_json(qcow2_opts(&c, false)).unwrap();
        let a = top.backing().unwrap().backing().unwrap();
        let size = top.size();
        let dirty = Arc::new(DirtyMap::new(size, 65536));
        top.track_writes(Some(dirty.clone()));
        // What an active commit copies first: everything above a.
        let mut depth = Extents::new(0, size);
        top.allocation_depth(size, 0, &mut depth).unwrap();
        for e in depth.as_slice() {
            if e.kind == 1 || e.kind == 2 {
                dirty.mark(e.offset, e.length);
            }
        }
        let writer = a.open_writer().unwrap();
        while let Some((o, l)) = dirty.take(0, 1 << 20) {
            let mut buf = vec![0; l as usize];
            top.read(&mut buf, o).unwrap();
            writer.write(&buf, o).unwrap();
        }
        assert!(dirty.is_clean());
        // Client I/O after the copy: marked, so the pivot copies it.
        top.write(&[0x44; 3000], 500_000).unwrap();
        top.zero(65536, 0, true, false).unwrap();
        assert_eq!(dirty.dirty_bytes(), 2 * 65536);
        let before = read(&top, 1 << 20, 0);
        let copied = top.pivot(&dirty, writer.clone()).unwrap();
        assert_eq!(copied, 2 * 65536);
        assert!(Arc::ptr_eq(&top.active(), &writer));
        assert_eq!(read(&top, 1 << 20, 0), before);
        // From now on the top's requests land in a.
        top.write(&[0x66; 100], 900_000).unwrap();
        top.flush().unwrap();
        let mut want = before;
        want[900_000..900_100].fill(0x66);
        drop((top, writer, a));
        assert_image_is(&dir.path().join("a.qcow2"), &want);
    }

    /// Trims and failed requests are marked too: a failed write may have changed part of
    /// its range. Nothing is marked once tracking stops.
    #[test]
    fn change_marks_trims_and_failed_requests() {
        let (_dir, c) = chain3();
        let top = open_json(qcow2_opts(&c, false)).unwrap();
        let dirty = Arc::new(DirtyMap::new(top.size(), 65536));
        top.track_writes(Some(dirty.clone()));
        top.trim(65536, 4 * 65536).unwrap();
        assert_eq!(dirty.dirty_bytes(), 65536);
        // FAST_ZERO of a partial cluster whose rest holds backing data: refused.
        let err = top.zero(100, 100, false, true).unwrap_err();
        assert_eq!(err.errno, Errno::ENOTSUP);
        assert_eq!(dirty.dirty_bytes(), 2 * 65536);
        top.track_writes(None);
        top.write(&[1], 900_000).unwrap();
        assert_eq!(dirty.dirty_bytes(), 2 * 65536);
    }

    /// Copy-before-write: the hook sees each change's range before it runs and reads the
    /// old data; its error fails the request, which then changes nothing.
    #[test]
    fn before_write_sees_old_data_and_its_error_fails_the_write() {
        #[derive(Debug, Default)]
        struct Saved(parking_lot::Mutex<Vec<(u64, Vec<u8>)>>);
        impl BeforeWrite for Saved {
            fn before_write(
                &self,
                offset: u64,
                len: u64,
                read: &dyn Fn(&mut [u8], u64) -> Result<()>,
            ) -> Result<()> {
                if offset == 0 {
                    return Err(sluice_block::BlockError::new(Errno::EIO, "refused"));
                }
                let mut old = vec![0; len as usize];
                read(&mut old, offset)?;
                self.0.lock().push((offset, old));
                Ok(())
            }
        }
        let (_dir, c) = chain3();
        let top = open_json(qcow2_opts(&c, false)).unwrap();
        let before = read(&top, 4096, 70_000);
        let hook = Arc::new(Saved::default());
        top.set_before_write(Some(hook.clone()));
        top.write(&[9; 4096], 70_000).unwrap();
        assert_eq!(hook.0.lock()[0], (70_000, before));
        let at0 = read(&top, 10, 0);
        assert_eq!(top.write(&[8; 10], 0).unwrap_err().errno, Errno::EIO);
        assert_eq!(read(&top, 10, 0), at0);
        top.set_before_write(None);
        top.write(&[8; 10], 0).unwrap();
        assert_eq!(hook.0.lock().len(), 1);
    }

    /// Write-blocking: the hook sees each change after it ran, reading the new data; a
    /// change it copied is not marked dirty, one it failed is (and the request fails); once
    /// removed it sees nothing and changes are marked again.
    #[test]
    fn after_write_sees_new_data_and_its_error_fails_the_write() {
        #[derive(Debug, Default)]
        struct Copied(parking_lot::Mutex<Vec<(u64, Vec<u8>)>>);
        impl AfterWrite for Copied {
            fn after_write(
                &self,
                offset: u64,
                len: u64,
                read: &dyn Fn(&mut [u8], u64) -> Result<()>,
            ) -> Result<()> {
                if offset == 0 {
                    return Err(sluice_block::BlockError::new(Errno::EIO, "target failed"));
                }
                let mut now = vec![0; len as usize];
                read(&mut now, offset)?;
                self.0.lock().push((offset, now));
                Ok(())
            }
        }
        let (_dir, c) = chain3();
        let top = open_json(qcow2_opts(&c, false)).unwrap();
        let hook = Arc::new(Copied::default());
        let dirty = Arc::new(DirtyMap::new(top.size(), 65536));
        top.track_writes(Some(dirty.clone()));
        top.set_after_write(Some(hook.clone()));
        top.write(&[9; 4096], 70_000).unwrap();
        assert_eq!(hook.0.lock()[0], (70_000, vec![9; 4096]));
        assert!(dirty.is_clean(), "a change the hook copied is not dirty");
        assert_eq!(top.write(&[8; 10], 0).unwrap_err().errno, Errno::EIO);
        assert_eq!(
            dirty.dirty_bytes(),
            65536,
            "a change the hook failed is dirty"
        );
        top.set_after_write(None);
        top.write(&[7; 10], 200_000).unwrap();
        assert_eq!(hook.0.lock().len(), 1);
        assert_eq!(dirty.dirty_bytes(), 2 * 65536);
        top.track_writes(None);
    }

    /// Named bitmaps are marked by every change, also one made through an active commit's
    /// writer into a base; a disabled bitmap is not.
    #[test]
    fn change_marks_recording_bitmaps_and_writer_shares_them() {
        use crate::bitmaps::Bitmap;
        let (_dir, c) = chain3();
        let top = open_json(qcow2_opts(&c, false)).unwrap();
        let a = top.backing().unwrap().backing().unwrap();
        let on = Arc::new(Bitmap::new("on", top.size(), 65536, true));
        let off = Arc::new(Bitmap::new("off", top.size(), 65536, false));
        top.bitmaps().insert(on.clone()).unwrap();
        top.bitmaps().insert(off.clone()).unwrap();
        top.write(&[1; 10], 70_000).unwrap();
        top.zero(65536, 3 * 65536, true, false).unwrap();
        assert_eq!((on.count(), off.count()), (2 * 65536, 0));
        let in_a = Arc::new(Bitmap::new("a", a.size(), 65536, true));
        a.bitmaps().insert(in_a.clone()).unwrap();
        let writer = a.open_writer().unwrap();
        writer.write(&[2; 10], 0).unwrap();
        assert_eq!(in_a.count(), 65536);
    }

    /// A snapshot's old node and its overlay hold each other until the overlay goes out
    /// of use: then the old node serves its own image (the snapshot's point in time) and
    /// both are freed once nothing else holds them.
    #[test]
    fn release_backing_forwards_frees_a_snapshot_pair() {
        let (dir, c) = chain3();
        let node = open_json(qcow2_opts(&c, false)).unwrap();
        let before = read(&node, 4096, 65536);
        let overlay = bare_overlay(dir.path());
        node.snapshot_onto(overlay.clone()).unwrap();
        node.write(&[0x77; 4096], 65536).unwrap();
        assert_eq!(read(&overlay, 4096, 65536), vec![0x77; 4096]);
        let (weak_node, weak_overlay) = (Arc::downgrade(&node), Arc::downgrade(&overlay));
        // Another node's release leaves the forward alone.
        assert_eq!(node.release_backing_forwards(), 0);
        assert_eq!(overlay.release_backing_forwards(), 1);
        assert_eq!(read(&node, 4096, 65536), before);
        drop(overlay);
        assert!(
            weak_overlay.upgrade().is_none(),
            "the overlay outlived its last user"
        );
        drop(node);
        assert!(
            weak_node.upgrade().is_none(),
            "the old node outlived its last user"
        );
    }
}
