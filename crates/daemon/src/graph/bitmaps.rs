//! Dirty bitmaps on graph nodes: `block-dirty-bitmap-*` with qemu-storage-daemon's checks, in
//! its order, and the marking of nodes that are not images.
//!
//! Every graph node has a [`Bitmaps`] set ([`super::Node::bitmaps`]). An image node's set is
//! the one its `sluice_image::Node` marks in its request gate; any other node (`null-co`,
//! `sluice-plugin`) gets a fresh set and its plugin is wrapped, once, at insertion, in
//! [`MarkBitmaps`], a filter that marks after each write, zero and trim: the node's plugin
//! is what every export and every job reaches, so no path goes around it. The rules
//! (busy, inconsistent, sizes, names) and their messages are `sluice_image::bitmaps`'s;
//! this module adds the node lookups and the order of the checks.
//!
//! `persistent: true` is accepted on writable qcow2 nodes, whose image saves the bitmap at
//! close (`sluice_image::qcow2_bitmaps`), and, beyond qsd (which refuses them), on writable
//! raw nodes over a regular file, which keep it in a sidecar file beside the image
//! (`sluice_image::sidecar`). That file records the image's size, mtime and inode, so a raw
//! disk that qemu or any other tool wrote meanwhile loads its bitmaps inconsistent, never
//! stale. On any other node (`file`, plugins, a raw block device) it is refused with qsd's
//! error.
//!
//! **Beyond qsd: the way back from an inconsistent bitmap.** A bitmap loaded `in_use` (its
//! writer crashed) refuses every use but removal, as in qsd. sluice adds two things:
//! `block-dirty-bitmap-add` of the same name *replaces* it (qsd: "Bitmap already exists")
//! with a new bitmap that starts all dirty, since what changed while nothing recorded is
//! unknown: the next incremental backup from it copies everything, which is the full backup
//! the broken chain needs anyway, and it records from then on; and the refusal's message,
//! qsd's words first, says so ([`bitmap_error`]). Every other check of the add (granularity,
//! `persistent`) is the usual one, and the replacement keeps the old one's place.

use std::sync::Arc;

use sluice_block::{Filter, Flags, Handle, Next, OpenContext, Plugin, Result};
use sluice_image::bitmaps::{default_granularity, merge, Bitmap, BitmapError, Bitmaps, Use};

use super::{Graph, Node};
use crate::generated::{
    BlockDirtyBitmap, BlockDirtyBitmapAdd, BlockDirtyBitmapMerge, BlockDirtyBitmapOrStr,
    BlockDirtyInfo,
};
use crate::QmpError;

/// Marks a plugin node's bitmaps after each write, zero and trim (see the module doc), and
/// checks its write threshold on each write and zero (an image node does both in its gate).
#[derive(Debug)]
pub struct MarkBitmaps(pub Arc<Bitmaps>, pub Arc<sluice_block::WriteThreshold>);

impl Filter for MarkBitmaps {
    type Conn = ();

    fn name(&self) -> &str {
        "mark-bitmaps"
    }

    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<((), Next)> {
        Ok(((), Next::open(next, ctx)?))
    }

    fn pwrite(&self, _: &(), next: &Next, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.1.check(offset, buf.len() as u64);
        let r = next.pwrite(buf, offset, flags);
        self.0.mark(offset, buf.len() as u64);
        r
    }

    fn trim(&self, _: &(), next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let r = next.trim(count, offset, flags);
        self.0.mark(offset, count);
        r
    }

    fn zero(&self, _: &(), next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.1.check(offset, count);
        let r = next.zero(count, offset, flags);
        self.0.mark(offset, count);
        r
    }
}

fn qmp(e: BitmapError) -> QmpError {
    bitmap_error(e)
}

/// A bitmap refusal as QMP reports it: qsd's message, and for an inconsistent bitmap the way
/// back after it (see the module doc).
pub fn bitmap_error(e: BitmapError) -> QmpError {
    match &e {
        BitmapError::Inconsistent(name) => QmpError::generic(format!(
            "{e}; remove it with block-dirty-bitmap-remove, or replace it with \
             block-dirty-bitmap-add of '{name}' (the new bitmap starts all dirty)"
        )),
        _ => QmpError::generic(e.to_string()),
    }
}

/// What `query-named-block-nodes` shows of a node's bitmaps (absent when it has none).
pub fn dirty_info(bitmaps: &Bitmaps) -> Option<Vec<BlockDirtyInfo>> {
    if bitmaps.is_empty() {
        return None;
    }
    Some(
        bitmaps
            .list()
            .iter()
            .map(|b| BlockDirtyInfo {
                name: Some(b.name().to_string()),
                count: b.count() as i64,
                granularity: b.granularity() as u32,
                recording: b.is_recording(),
                busy: b.is_busy(),
                persistent: b.is_persistent(),
                inconsistent: b.is_inconsistent().then_some(true),
            })
            .collect(),
    )
}

impl Graph {
    /// QEMU's `block_dirty_bitmap_lookup`: the node, then its bitmap.
    pub fn bitmap(&self, node: &str, name: &str) -> Result<(&Node, Arc<Bitmap>), QmpError> {
        let Some(n) = self.get(node) else {
            return Err(QmpError::generic(format!("Node '{node}' not found")));
        };
        let b = n.bitmaps.lookup(name).map_err(qmp)?;
        Ok((n, b))
    }

    /// `block-dirty-bitmap-add`; returns the inconsistent bitmap it replaced, if any (see
    /// the module doc).
    pub fn bitmap_add(&self, args: &BlockDirtyBitmapAdd) -> Result<Option<Arc<Bitmap>>, QmpError> {
        if args.name.is_empty() {
            return Err(qmp(BitmapError::EmptyName));
        }
        let Some(n) = self.get(&args.node) else {
            return Err(super::not_found(&args.node, &args.node));
        };
        let granularity = match args.granularity {
            Some(g) => {
                Bitmaps::check_granularity(g.into()).map_err(qmp)?;
                u64::from(g)
            }
            None => default_granularity(n.opened.info.cluster_size.map(|c| c as u64)),
        };
        let persistent = args.persistent == Some(true);
        if persistent {
            // qsd's checks and words. Deliberate difference: qsd accepts a persistent
            // bitmap on a read-only qcow2 node and loses it at close ("Lost persistent
            // bitmaps during inactivation"); sluice refuses it up front.
            use sluice_image::Driver;
            match super::image::image_node(&n.opened) {
                Some(img) if matches!(img.driver(), Driver::Qcow2 | Driver::Raw) => {
                    img.can_store_bitmap(granularity).map_err(|why| {
                        QmpError::generic(format!(
                            "Can't make bitmap '{}' persistent in '{}': {why}",
                            args.name, n.name
                        ))
                    })?
                }
                // File nodes, plugins: refused as qsd refuses them (and raw nodes).
                _ => {
                    return Err(QmpError::generic(format!(
                        "Can't store persistent bitmaps to {}: Operation not supported",
                        n.name
                    )))
                }
            }
        }
        let replaces = n.bitmaps.check_replacement_name(&args.name).map_err(qmp)?;
        let size = n.size()?;
        let b = Bitmap::new(
            &args.name,
            size,
            granularity,
            !args.disabled.unwrap_or(false),
        );
        b.set_persistent(persistent);
        let b = Arc::new(b);
        match replaces {
            None => n.bitmaps.insert(b).map_err(qmp).map(|()| None),
            Some(old) => {
                // Nothing is known of what changed since the crash: all of it may have.
                b.map().mark(0, size);
                if !n.bitmaps.replace(&old, b) {
                    return Err(qmp(BitmapError::Exists(args.name.clone())));
                }
                tracing::info!(
                    "node '{}': inconsistent bitmap '{}' replaced by a new one, all dirty",
                    n.name,
                    args.name
                );
                Ok(Some(old))
            }
        }
    }

    /// `block-dirty-bitmap-remove`.
    pub fn bitmap_remove(&self, args: &BlockDirtyBitmap) -> Result<(), QmpError> {
        let (n, b) = self.bitmap(&args.node, &args.name)?;
        b.check(Use::Remove).map_err(qmp)?;
        n.bitmaps.remove(&args.name);
        Ok(())
    }

    /// `block-dirty-bitmap-clear`.
    pub fn bitmap_clear(&self, args: &BlockDirtyBitmap) -> Result<(), QmpError> {
        let (_, b) = self.bitmap(&args.node, &args.name)?;
        b.check(Use::Modify).map_err(qmp)?;
        b.map().clear();
        Ok(())
    }

    /// `block-dirty-bitmap-enable` / `-disable`.
    pub fn bitmap_set_recording(&self, args: &BlockDirtyBitmap, on: bool) -> Result<(), QmpError> {
        let (_, b) = self.bitmap(&args.node, &args.name)?;
        b.check(Use::Read).map_err(qmp)?;
        b.set_recording(on);
        Ok(())
    }

    /// `block-dirty-bitmap-merge`: the target and its check first, then each source in
    /// order (a local name on the target's node, or `{node, name}` anywhere).
    pub fn bitmap_merge(&self, args: &BlockDirtyBitmapMerge) -> Result<(), QmpError> {
        let (n, target) = self.bitmap(&args.node, &args.target)?;
        target.check(Use::Modify).map_err(qmp)?;
        let mut sources = Vec::with_capacity(args.bitmaps.len());
        for s in &args.bitmaps {
            let src = match s {
                BlockDirtyBitmapOrStr::Local(name) => n.bitmaps.lookup(name).map_err(qmp)?,
                BlockDirtyBitmapOrStr::External(e) => self.bitmap(&e.node, &e.name)?.1,
            };
            // Checked in order, as QEMU merges them one by one.
            src.check(Use::Read).map_err(qmp)?;
            if src.map().size() != target.map().size() {
                return Err(qmp(BitmapError::Sizes {
                    dst: target.map().size(),
                    src: src.map().size(),
                }));
            }
            sources.push(src);
        }
        merge(&target, &sources).map_err(qmp)
    }
}
