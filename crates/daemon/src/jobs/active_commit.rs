//! Active `block-commit`: the top is the device itself, the layer clients write to.
//!
//! As in QEMU (where this is a mirror job of type `commit`), the job copies into the base
//! everything the layers above it hold, keeps copying what clients write meanwhile, and
//! then sits in `ready` (BLOCK_JOB_READY) mirroring new writes until `job-complete`, when
//! it *pivots*: the device's requests go to the base from then on, and the exports of the
//! device become exports of the base.
//!
//! How no write is lost (see `sluice_image::dirty`): before the job starts, the command
//! installs a [`DirtyMap`] on the device's image node, which marks every range a write,
//! zero or trim changes once it has completed. The job marks what the layers above the
//! base hold (allocation depth), then takes dirty runs one at a time — a run is cleared
//! before it is read through the device and written into the base, so a write landing
//! meanwhile marks it again. When the map is clean the job is `ready`; on completion,
//! [`sluice_image::Node::pivot`] holds the device's requests off, copies what is still
//! dirty, flushes the base and redirects the device node to it, all in `prepare` with the
//! daemon's state lock held, so the graph and the exports switch with it.
//!
//! The base is a read-only backing node; the job writes through a writable node over the
//! same image ([`sluice_image::Node::open_writer`]), which after the pivot *is* the base:
//! the graph node of the base gets it (and becomes writable, as in qsd). A soft cancel
//! (`block-job-cancel` without force while ready) completes the job without the pivot;
//! a failure or a forced cancel leaves the chain as it was (the base then holds some of
//! the top's data, which the layers above it hide, as in QEMU).

use std::sync::Arc;
use std::time::Duration;

use sluice_block::extents::Extents;
use sluice_block::Plugin;
use sluice_image::DirtyMap;

use crate::graph::image::close_writer;
use crate::graph::image::refresh_info;
use crate::jobs::{Completion, ErrorAction, JobCtx, JobDriver, WorkError, COPY_CHUNK};
use crate::state::State;

/// How long a ready job waits for new writes before it looks again (also the longest a
/// write waits to be mirrored).
const IDLE: Duration = Duration::from_millis(20);

/// The active commit job's work.
#[derive(Debug)]
pub struct ActiveCommitDriver {
    /// The device (graph name, image node): the top, written by clients.
    pub device: (String, Arc<sluice_image::Node>),
    /// Depth (seen from the device, 1 = device) of the base: depths 1..base_depth are copied.
    pub base_depth: u32,
    /// The base (graph name, image node): the commit's target.
    pub base: (String, Arc<sluice_image::Node>),
    /// The writable node over the base's image.
    pub writer: Arc<sluice_image::Node>,
    /// What the device's clients changed and the job has not copied yet.
    pub dirty: Arc<DirtyMap>,
    /// Finish with the pivot (job-complete) or without (soft cancel).
    pub pivot: bool,
    /// The writer was flushed and the base node reloaded (a run without pivot is over).
    pub closed: bool,
}

impl ActiveCommitDriver {
    /// Marks what the layers from the device down to above the base hold.
    fn mark_allocated(&self, ctx: &mut JobCtx<'_, State>) -> Result<(), WorkError> {
        let top = &self.device.1;
        let size = top.size();
        let step = 1 << 30;
        let mut at = 0;
        while at < size {
            let n = step.min(size - at);
            let mut depths = Extents::new(at, at + n);
            top.allocation_depth(n, at, &mut depths).map_err(|e| {
                tracing::warn!("block-commit of '{}': {e}", self.device.0);
                WorkError::Failed(e.errno.describe())
            })?;
            for e in depths.as_slice() {
                if e.kind >= 1 && e.kind < self.base_depth {
                    self.dirty.mark(e.offset, e.length);
                }
            }
            ctx.checkpoint()?;
            at += n;
        }
        Ok(())
    }

    /// Copies one range from the device into the base.
    fn copy(&self, offset: u64, len: u64, buf: &mut Vec<u8>) -> sluice_block::Result<()> {
        buf.resize(len as usize, 0);
        self.device.1.read(buf, offset)?;
        self.writer.write(buf, offset)
    }

    /// One step: copies the next dirty run (applying the on-error policy). Ok(false) when
    /// nothing was dirty.
    fn step(
        &self,
        ctx: &mut JobCtx<'_, State>,
        cursor: &mut u64,
        buf: &mut Vec<u8>,
    ) -> Result<bool, WorkError> {
        let Some((offset, len)) = self.dirty.take(*cursor, COPY_CHUNK) else {
            return Ok(false);
        };
        *cursor = offset + len;
        match self.copy(offset, len, buf) {
            Ok(()) => {
                ctx.progress(len);
                ctx.set_remaining(self.dirty.dirty_bytes());
                ctx.throttle(len)?;
            }
            Err(e) => {
                tracing::warn!("block-commit of '{}': {e}", self.device.0);
                self.dirty.mark(offset, len);
                match ctx.block_error(&e)? {
                    ErrorAction::Report => return Err(WorkError::Failed(e.errno.describe())),
                    // Ignored ranges stay dirty: the pivot copies them or fails.
                    ErrorAction::Retry | ErrorAction::Ignore => {}
                }
            }
        }
        Ok(true)
    }

    /// Flushes the writer and makes the base node forget its stale caches (when the job
    /// ends without a pivot).
    fn close(&mut self) -> Result<(), String> {
        self.device.1.track_writes(None);
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        close_writer(Some(&self.writer), &self.base.1)
    }
}

impl JobDriver<State> for ActiveCommitDriver {
    fn run(&mut self, ctx: &mut JobCtx<'_, State>) -> Result<(), WorkError> {
        self.mark_allocated(ctx)?;
        ctx.set_remaining(self.dirty.dirty_bytes());
        let mut cursor = 0;
        let mut buf = Vec::new();
        let mut ready = false;
        loop {
            match ctx.completion() {
                Some(Completion::Complete) => {
                    self.pivot = true;
                    return Ok(());
                }
                Some(Completion::SoftCancel) => {
                    // The base gets what is dirty now; no pivot.
                    while self.step(ctx, &mut cursor, &mut buf)? {}
                    return Ok(());
                }
                None => {}
            }
            if self.step(ctx, &mut cursor, &mut buf)? {
                continue;
            }
            if ready {
                ctx.idle(IDLE)?;
            } else {
                ctx.set_ready()?;
                ready = true;
            }
        }
    }

    /// The pivot (see the module doc), or, after a soft cancel, just the end of the copy.
    fn prepare(&mut self, st: &mut State) -> Result<(), String> {
        if !self.pivot {
            return self.close();
        }
        let (device_name, device) = &self.device;
        let (base_name, _) = &self.base;
        device
            .pivot(&self.dirty, self.writer.clone())
            .map_err(|e| e.errno.describe())?;
        self.closed = true;
        // The exports of the device are now the base's, and the base is writable.
        let mut moved = 0;
        for e in st.exports.iter_mut().filter(|e| e.node == *device_name) {
            e.node = base_name.clone();
            moved += 1;
        }
        if let Some(n) = st.graph.get_mut(device_name) {
            n.exports -= moved;
        }
        if let Some(n) = st.graph.get_mut(base_name) {
            n.exports += moved;
            n.read_only = false;
            n.opened.plugin = self.writer.clone() as Arc<dyn Plugin>;
            n.opened.payload = Some(self.writer.clone());
            refresh_info(&mut n.opened);
        }
        Ok(())
    }

    fn abort(&mut self, _st: &mut State) {
        if let Err(e) = self.close() {
            tracing::warn!("block-commit: closing the base '{}': {e}", self.base.0);
        }
    }

    fn clean(&mut self, _st: &mut State) {
        self.device.1.track_writes(None);
    }
}
