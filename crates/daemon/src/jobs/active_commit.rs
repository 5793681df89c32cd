//! Active `block-commit`: the top is the device itself, the layer clients write to.
//!
//! As in QEMU (where this is a mirror job of type `commit`), this is the mirror engine
//! ([`super::mirror_engine`]) with the base as its target: the job copies into the base
//! everything the layers above it hold (the engine's [`Initial::Above`] the base's depth),
//! keeps copying what clients write meanwhile, sits in `ready` until `job-complete`, and
//! then pivots: the device's requests go to the base from then on, and the exports of the
//! device become exports of the base.
//!
//! What is particular to a commit: the base is a read-only backing node, so the job writes
//! through a writable node over the same image ([`crate::graph::layers::open_writer`]: an
//! image opened again, or an rbd base's image opened again read-write),
//! which after the pivot *is* the base: the graph node of the base gets it (and becomes
//! writable, as in qsd). Without a pivot (soft cancel, failure, forced cancel) the writer
//! is flushed and the base node drops its stale caches; the chain stays as it was (the
//! base then holds some of the top's data, which the layers above it hide, as in QEMU).

use std::sync::Arc;

use sluice_block::Plugin;

use crate::graph::image::{close_writer, refresh_info};
use crate::jobs::mirror_engine::{move_exports, MirrorEngine};
use crate::jobs::{JobCtx, JobDriver, WorkError};
use crate::state::State;

#[cfg(doc)]
use crate::jobs::mirror_engine::Initial;

/// The active commit job's work.
#[derive(Debug)]
pub struct ActiveCommitDriver {
    /// The copy from the device into the writer over the base.
    pub engine: MirrorEngine,
    /// The base (graph name, image node): the commit's target.
    pub base: (String, Arc<sluice_image::Node>),
    /// What a device base's graph node keeps once the writer is the base (its writable
    /// rbd plugin, see [`crate::graph::layers::Writer`]).
    pub base_payload: Option<Arc<dyn std::any::Any + Send + Sync>>,
    /// The writer was flushed and the base node reloaded (a run without pivot is over).
    pub closed: bool,
}

impl ActiveCommitDriver {
    /// Flushes the writer and makes the base node forget its stale caches (when the job
    /// ends without a pivot).
    fn close(&mut self) -> Result<(), String> {
        self.engine.stop_tracking();
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        close_writer(Some(&self.engine.target), &self.base.1)
    }
}

impl JobDriver<State> for ActiveCommitDriver {
    fn run(&mut self, ctx: &mut JobCtx<'_, State>) -> Result<(), WorkError> {
        self.engine.run(ctx)
    }

    /// The pivot (see the module doc), or, after a soft cancel, just the end of the copy.
    fn prepare(&mut self, st: &mut State) -> Result<(), String> {
        if !self.engine.wants_pivot() {
            return self.close();
        }
        self.engine.pivot()?;
        self.closed = true;
        // The exports of the device are now the base's, and the base is writable.
        let (device_name, base_name) = (self.engine.source.0.clone(), self.base.0.clone());
        move_exports(st, &device_name, &base_name);
        if let Some(n) = st.graph.get_mut(&base_name) {
            let writer = self.engine.target.clone();
            n.read_only = false;
            n.opened.plugin = writer.clone() as Arc<dyn Plugin>;
            // A device base (rbd) keeps what it reports; its driver's payload is now the
            // device opened read-write (see graph::layers), which holds the lock.
            if writer.driver() == sluice_image::Driver::Plugin {
                n.opened.payload = self.base_payload.take();
            } else {
                n.opened.payload = Some(writer);
                refresh_info(&mut n.opened);
            }
        }
        Ok(())
    }

    fn abort(&mut self, _st: &mut State) {
        if let Err(e) = self.close() {
            tracing::warn!("block-commit: closing the base '{}': {e}", self.base.0);
        }
    }

    fn clean(&mut self, _st: &mut State) {
        self.engine.stop_tracking();
    }
}
