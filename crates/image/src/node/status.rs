//! Block status of a node: `base:allocation` and `qemu:allocation-depth` as qemu-nbd
//! reports them, and the walk down the chain ([`Segment`]) that they, cache and stream share.
//!
//! A range resolves layer by layer: imago's shallow mapping says whether this node holds it
//! (a data, zero or compressed cluster, or a range of a raw file) or a backing layer does,
//! and the walk goes down until a layer holds it or the chain ends (unallocated: depth 0).
//! The range past the end of a shorter backing reads as zeroes that qemu counts as
//! allocated in the short layer, and so does sluice.
//!
//! **qemu's guesses.** qemu-nbd reports a qcow2 data cluster as data, unless it guesses
//! that the image was created with metadata preallocation: then it looks through the
//! cluster at the file's holes and reports them as data that reads as zeroes. It guesses
//! once, at the first block status, and so does sluice (`metadata_preallocated`). Raw
//! layers report their file's holes, found with `SEEK_DATA`/`SEEK_HOLE` (see
//! [`sluice_block::fileio`]); where the file system cannot tell, everything is data, as in
//! qemu. A plugin layer (an RBD image) reports its device's extents. With REQ_ONE, the
//! first extent runs on while its kind stays the same, as in qemu.

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use imago::{ShallowMapping, StorageExt};
use sluice_block::extents::{Extents, EXTENT_HOLE, EXTENT_ZERO};
use sluice_block::fileio::data_runs;
use sluice_block::{BlockError, Errno, Result};

use super::gate::Reading;
use super::{FileState, Node};
use crate::error::io_error;
use crate::options::Driver;

/// One stretch of the image as the chain resolves it (block status, depth, cache).
#[derive(Debug, Clone)]
pub(crate) struct Segment {
    pub len: u64,
    /// 0: unallocated in every layer; 1: the node itself; 2: its backing; ... (the range past
    /// the end of a shorter backing counts as allocated in it, as in qemu).
    pub depth: u32,
    pub kind: SegmentKind,
}

#[derive(Debug, Clone)]
pub(crate) enum SegmentKind {
    /// Stored in a data cluster of the qcow2 node `layer`, at `host` in its file: data (or,
    /// when qemu would guess the image metadata-preallocated, what the file says).
    Cluster { host: u64, layer: Arc<Node> },
    /// Stored 1:1 in the file of a raw (or file) layer at `host`; the file's holes tell data
    /// from zeroes. `layer` is the node whose file holds it.
    RawFile { host: u64, layer: Arc<Node> },
    /// Stored 1:1 in the device of a plugin node `layer` at `host`; the device's extents
    /// tell data from zeroes.
    Device { host: u64, layer: Arc<Node> },
    /// Reads as zeroes (zero clusters, unallocated to the bottom, past a shorter backing).
    Zero,
    /// A compressed cluster: data.
    Compressed,
}

impl Node {
    /// `base:allocation` of `[offset, offset+count)`, as qemu-nbd reports it: qcow2 data
    /// and compressed clusters are data; zero clusters, unallocated ranges and the ranges
    /// past a shorter backing are holes reading as zeroes; raw layers report their file's
    /// holes. `one` (REQ_ONE): stop once the first extent is complete.
    pub fn block_status(
        &self,
        count: u64,
        offset: u64,
        one: bool,
        out: &mut Extents,
    ) -> Result<()> {
        self.look(|n, pass| n.block_status_body(pass, count, offset, one, out))
    }

    /// The body of [`Node::block_status`].
    fn block_status_body(
        &self,
        _: Reading,
        count: u64,
        offset: u64,
        one: bool,
        out: &mut Extents,
    ) -> Result<()> {
        let _g = self.io.read();
        self.block_status_locked(count, offset, one, out)
    }

    /// [`Node::block_status`] for a caller that holds the `io` lock.
    fn block_status_locked(
        &self,
        count: u64,
        offset: u64,
        one: bool,
        out: &mut Extents,
    ) -> Result<()> {
        for seg in self.segments(offset, offset + count, Some("block status")) {
            let (at, seg) = seg?;
            match seg.kind {
                SegmentKind::Cluster { host, ref layer } if layer.metadata_preallocated() => {
                    // Holes in the file under a data cluster read as zeroes: data + zero.
                    raw_file_extents(layer.file_state(), at, host, seg.len, EXTENT_ZERO, out)?
                }
                SegmentKind::Cluster { .. } | SegmentKind::Compressed => out.add(at, seg.len, 0)?,
                SegmentKind::Zero => out.add(at, seg.len, EXTENT_HOLE | EXTENT_ZERO)?,
                SegmentKind::RawFile { host, ref layer } => {
                    let hole = EXTENT_HOLE | EXTENT_ZERO;
                    raw_file_extents(layer.file_state(), at, host, seg.len, hole, out)?;
                }
                SegmentKind::Device { host, ref layer } => {
                    layer.device_extents(at, host, seg.len, out)?
                }
            }
            // REQ_ONE: like qemu, the first extent runs on while the kind stays the same.
            if one && out.as_slice().len() > 1 {
                break;
            }
        }
        Ok(())
    }

    /// `qemu:allocation-depth` of `[offset, offset+count)`: each extent's kind is the layer
    /// that holds it (1 = this node, 2 = its backing, ...; 0 = unallocated).
    pub fn allocation_depth(&self, count: u64, offset: u64, out: &mut Extents) -> Result<()> {
        self.look(|n, pass| n.allocation_depth_body(pass, count, offset, out))
    }

    /// The body of [`Node::allocation_depth`].
    fn allocation_depth_body(
        &self,
        _: Reading,
        count: u64,
        offset: u64,
        out: &mut Extents,
    ) -> Result<()> {
        let _g = self.io.read();
        for seg in self.segments(offset, offset + count, Some("allocation depth")) {
            let (at, seg) = seg?;
            out.add(at, seg.len, seg.depth)?;
        }
        Ok(())
    }

    /// The segments of `[offset, end)` in order, each with its start (see
    /// [`Node::segment`]). A segment of length 0, a mapping that would never advance, ends
    /// the walk: with EIO naming `what` ("block status", ...), or quietly for advisory
    /// callers (`what` None: cache).
    pub(super) fn segments(
        &self,
        offset: u64,
        end: u64,
        what: Option<&'static str>,
    ) -> Segments<'_> {
        Segments {
            node: self,
            at: offset,
            end,
            what,
        }
    }

    /// Resolves the stretch starting at `offset` (at most `max` bytes) through the chain.
    pub(crate) fn segment(&self, offset: u64, max: u64) -> Result<Segment> {
        let ctx = || format!("block status at {offset}");
        let mut node = self.arc();
        let mut depth = 1u32;
        let mut at = offset;
        let mut max = max;
        loop {
            let view = node.view();
            let (m, len) = view
                .layer
                .get_shallow_mapping(at, max)
                .map_err(|e| io_error(ctx(), e))?;
            let len = len.min(max);
            let seg = |len, depth, kind| Segment { len, depth, kind };
            match m {
                ShallowMapping::Raw { offset: host, .. } => {
                    let kind = match node.driver {
                        Driver::Qcow2 => SegmentKind::Cluster { host, layer: node },
                        Driver::Plugin => SegmentKind::Device { host, layer: node },
                        _ => SegmentKind::RawFile { host, layer: node },
                    };
                    return Ok(seg(len, depth, kind));
                }
                ShallowMapping::Indirect { layer, offset, .. } => {
                    let b = view
                        .backing
                        .clone()
                        .filter(|b| std::ptr::eq(&*b.view().layer, layer))
                        .ok_or_else(|| {
                            BlockError::new(Errno::EIO, format!("{}: unknown backing layer", ctx()))
                        })?;
                    node = b;
                    at = offset;
                    max = len;
                    depth += 1;
                }
                ShallowMapping::Zero { explicit, .. } => {
                    return Ok(seg(
                        len,
                        if explicit { depth } else { 0 },
                        SegmentKind::Zero,
                    ))
                }
                // Past the end of a shorter backing: zeroes that qemu counts as allocated in
                // the short layer.
                ShallowMapping::Eof { .. } if depth > 1 => {
                    return Ok(seg(max, depth, SegmentKind::Zero))
                }
                ShallowMapping::Special { .. } => {
                    return Ok(seg(len, depth, SegmentKind::Compressed))
                }
                _ => {
                    return Err(BlockError::new(
                        Errno::EIO,
                        format!("{}: no mapping (past the end?)", ctx()),
                    ))
                }
            }
        }
    }

    /// True if `[offset, offset+len)` reads as zeroes by block status (qemu's `is_zero`).
    /// The caller holds the `io` lock.
    pub(super) fn reads_zero(&self, offset: u64, len: u64) -> Result<bool> {
        let mut ext = Extents::new(offset, offset + len);
        self.block_status_locked(len, offset, false, &mut ext)?;
        Ok(ext.as_slice().iter().all(|e| e.kind & EXTENT_ZERO != 0))
    }

    /// qemu's `qcow2_detect_metadata_preallocation`, which decides whether block status
    /// looks through data clusters at the file's holes: true when the clusters with a
    /// nonzero refcount outnumber the file's allocated blocks (by 10%, at least 2). qemu
    /// guesses once, at the first block status, and so does sluice.
    fn metadata_preallocated(&self) -> bool {
        *self.prealloc_guess.get_or_init(|| {
            self.detect_metadata_preallocation().unwrap_or_else(|e| {
                tracing::debug!("{}: preallocation guess: {e}", self.filename.display());
                false
            })
        })
    }

    fn detect_metadata_preallocation(&self) -> std::io::Result<bool> {
        let view = self.view();
        let Some(q) = &view.qcow2 else {
            return Ok(false);
        };
        let h = &q.header;
        let fs = self.file_state();
        if !self.is_read_only() {
            // The refcounts must be read from the file: write back imago's cache first.
            view.layer.flush()?;
        }
        let meta = fs.os.metadata()?;
        let cs = h.cluster_size();
        let real_clusters = meta.blocks() * 512 / cs;
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let end_cluster = meta.len().div_ceil(cs);
        let mut table = vec![0u8; (u64::from(h.refcount_table_clusters) * cs) as usize];
        self.storage()
            .read(&mut table[..], h.refcount_table_offset)?;
        let bits = 1u64 << h.refcount_order;
        let per_block = cs * 8 / bits;
        let mut block = vec![0u8; cs as usize];
        let mut loaded = None;
        let mut count = 0u64;
        let mut i = 0u64;
        while i < end_cluster && count < threshold {
            let rb = (i / per_block) as usize;
            let Some(entry) = table.get(rb * 8..rb * 8 + 8) else {
                break;
            };
            let rb_offset = u64::from_be_bytes(entry.try_into().expect("8 bytes")) & !(cs - 1);
            if rb_offset == 0 {
                i = (i / per_block + 1) * per_block;
                continue;
            }
            if loaded != Some(rb_offset) {
                self.storage().read(&mut block[..], rb_offset)?;
                loaded = Some(rb_offset);
            }
            let bit = (i % per_block) * bits;
            let nonzero = if bits >= 8 {
                let at = (bit / 8) as usize;
                block[at..at + (bits / 8) as usize].iter().any(|&b| b != 0)
            } else {
                // Sub-byte refcounts are stored least significant bits first.
                (block[(bit / 8) as usize] >> (bit % 8)) & ((1u8 << bits) - 1) != 0
            };
            count += u64::from(nonzero);
            i += 1;
        }
        Ok(count >= threshold)
    }
}

/// The iterator of [`Node::segments`].
pub(super) struct Segments<'a> {
    node: &'a Node,
    at: u64,
    end: u64,
    what: Option<&'static str>,
}

impl Iterator for Segments<'_> {
    type Item = Result<(u64, Segment)>;

    fn next(&mut self) -> Option<Self::Item> {
        let at = self.at;
        if at >= self.end {
            return None;
        }
        let seg = match self.node.segment(at, self.end - at) {
            Ok(seg) if seg.len > 0 => seg,
            Ok(_) => {
                self.at = self.end;
                let what = self.what?;
                let msg = format!("{what} at {at}: empty mapping");
                return Some(Err(BlockError::new(Errno::EIO, msg)));
            }
            Err(e) => {
                self.at = self.end;
                return Some(Err(e));
            }
        };
        self.at += seg.len;
        Some(Ok((at, seg)))
    }
}

/// Adds the extents of a file range (data, or holes of kind `hole_kind`), found with
/// SEEK_DATA/SEEK_HOLE as qemu's file driver does.
fn raw_file_extents(
    fs: &FileState,
    guest: u64,
    host: u64,
    len: u64,
    hole_kind: u32,
    out: &mut Extents,
) -> Result<()> {
    for run in data_runs(&fs.os, host, host + len) {
        match run {
            Ok(run) => {
                let kind = if run.data { 0 } else { hole_kind };
                out.add(guest + (run.offset - host), run.length, kind)?;
            }
            // No information: the rest is data (qemu does the same).
            Err(e) => out.add(guest + (e.offset - host), host + len - e.offset, 0)?,
        }
    }
    Ok(())
}
