//! `blockdev-mirror`: copy a live node into another node, then (on `job-complete`) make
//! the device's users use the copy — live storage migration.
//!
//! The work is the mirror engine ([`super::mirror_engine`]), which active commit shares:
//! sync `full` marks the whole device (unallocated ranges become zeroes in the target),
//! `top` what the device's own layer holds, `none` nothing; then every write clients make
//! is mirrored, the job reaches `ready` (BLOCK_JOB_READY) and, on `job-complete`, pivots:
//! the device node forwards its requests to the target and the device's exports become
//! the target's in the graph (open NBD connections keep working, now on the target).
//! `block-job-cancel` without force while ready ends the job without the pivot, as qsd's
//! soft cancel, with BLOCK_JOB_COMPLETED.
//!
//! The command checks its arguments in qsd's order with its messages (`Cannot find
//! device=...`, `Need a root block node`, `Node 'x' is busy: ...`, `Sync mode 'bitmap'
//! not supported`, `Parameter 'granularity' expects ...`, `Can't mirror node into
//! itself`, ...); a target of another size fails the job when it starts with qsd's
//! `Source and target image have different sizes`. Where qsd creates the job before a
//! refusal (a read-only target, a target someone uses), sluice refuses before creating it,
//! so the `created`/`null` events qsd emits then are not sent.
//!
//! `copy-mode: write-blocking`, at the start or switched to by `block-job-change`, makes
//! every client write wait until the target has it too (see the mirror engine's
//! `WriteBlocking`); switching back is refused, as in qsd.
//!
//! What sluice does not do: `replaces` is accepted only naming the device
//! itself (sluice has no filter nodes above a device to replace); `filter-node-name` is
//! accepted and no filter node is inserted. After a pivot the source node keeps
//! forwarding to the target (it is how the open connections survive), so a new export of
//! the source serves the target too.

use std::sync::Arc;

use crate::generated::{
    BlockJobChangeOptions, BlockJobChangeOptionsBranch, BlockdevMirrorArgs, BlockdevOnError,
    JobType, MirrorCopyMode, MirrorSyncMode,
};
use crate::graph::image::image_node;
use crate::graph::not_found;
use crate::jobs::mirror_engine::{move_exports, start_tracked, Initial, MirrorEngine};
use crate::jobs::{JobCtx, JobDriver, JobParams, WorkError, COPY_CHUNK};
use crate::state::{Daemon, State};
use crate::QmpError;

/// The mirror job's work.
#[derive(Debug)]
pub struct MirrorDriver {
    /// The copy from the device into the target.
    engine: MirrorEngine,
    /// The target's graph name.
    target: String,
}

impl MirrorDriver {
    /// Stops tracking and writes the target back (the end without a pivot).
    fn close(&self) -> Result<(), String> {
        self.engine.stop_tracking();
        self.engine.target.flush().map_err(|e| e.errno.describe())
    }
}

impl JobDriver<State> for MirrorDriver {
    fn run(&mut self, ctx: &mut JobCtx<'_, State>) -> Result<(), WorkError> {
        self.engine.run(ctx)
    }

    /// The pivot and the exports' move (see the module doc), or, after a soft cancel, the
    /// target written back.
    fn prepare(&mut self, st: &mut State) -> Result<(), String> {
        if !self.engine.wants_pivot() {
            return self.close();
        }
        self.engine.pivot()?;
        let device = self.engine.source.0.clone();
        move_exports(st, &device, &self.target);
        Ok(())
    }

    fn abort(&mut self, _st: &mut State) {
        if let Err(e) = self.close() {
            tracing::warn!(
                "blockdev-mirror: flushing the target '{}': {e}",
                self.target
            );
        }
    }

    fn clean(&mut self, _st: &mut State) {
        self.engine.stop_tracking();
    }
}

/// The `blockdev-mirror` command.
pub(crate) fn blockdev_mirror(
    daemon: &Arc<Daemon>,
    st: &mut State,
    args: BlockdevMirrorArgs,
) -> Result<(), QmpError> {
    let Some(device) = st.graph.get(&args.device) else {
        return Err(not_found(&args.device, &args.device));
    };
    let Some(target) = st.graph.get(&args.target) else {
        return Err(not_found(&args.target, &args.target));
    };
    if st.graph.has_parent(&device.name) || st.jobs.using_node(&device.name).is_some() {
        return Err(QmpError::generic("Need a root block node"));
    }
    let t = &target.name;
    if let Some(j) = st.jobs.using_node(t) {
        return Err(QmpError::generic(format!(
            "Node '{t}' is busy: block device is in use by block job: {}",
            j.job_type
        )));
    }
    // qsd names the parent that took the node as its backing last.
    if let Some(p) = st.graph.parents(t, "backing").last() {
        return Err(QmpError::generic(format!(
            "Node '{t}' is busy: node is used as backing hd of '{}'",
            p.name
        )));
    }
    let sync = args.sync;
    if matches!(sync, MirrorSyncMode::Incremental | MirrorSyncMode::Bitmap) {
        return Err(QmpError::generic(format!(
            "Sync mode '{sync}' not supported"
        )));
    }
    let granularity = u64::from(args.granularity.unwrap_or(0));
    if granularity != 0 && !(512..=64 << 20).contains(&granularity) {
        return Err(QmpError::generic(
            "Parameter 'granularity' expects a value in range [512B, 64MB]",
        ));
    }
    if granularity != 0 && granularity & (granularity - 1) != 0 {
        return Err(QmpError::generic(
            "Parameter 'granularity' expects a power of 2",
        ));
    }
    if let Some(r) = &args.replaces {
        if st.graph.get(r).is_none() {
            return Err(QmpError::generic(format!(
                "Failed to find node with node-name='{r}'"
            )));
        }
        if *r != device.name {
            return Err(QmpError::generic(format!(
                "Cannot replace '{r}' by a node mirrored from '{}', because it cannot be \
                 guaranteed that doing so would not lead to an abrupt change of visible data",
                device.name
            )));
        }
    }
    let buf_size = args.buf_size.unwrap_or(0);
    if buf_size < 0 {
        return Err(QmpError::generic("Invalid parameter 'buf-size'"));
    }
    if device.name == *t {
        return Err(QmpError::generic("Can't mirror node into itself"));
    }
    // What qsd's permission system says of a target someone else uses.
    if let Some(e) = st.exports.iter().find(|e| e.node == *t) {
        let perms = if e.named.writable {
            "consistent read, write"
        } else {
            "consistent read"
        };
        return Err(QmpError::generic(format!(
            "Permission conflict on node '{t}': permissions '{perms}' are both required by an \
             unnamed block device (uses node '{t}' as 'root' child) and unshared by an \
             unnamed block device (uses node '{t}' as 'root' child)."
        )));
    }
    if let Some((p, role)) = st.graph.iter().find_map(|n| {
        n.children
            .iter()
            .find(|(_, c)| c == t)
            .map(|(r, _)| (n.name.clone(), r.clone()))
    }) {
        return Err(QmpError::generic(format!(
            "Permission conflict on node '{t}': permissions 'consistent read, write, resize' \
             are both required by node '{p}' (uses node '{t}' as '{role}' child) and unshared \
             by an unnamed block device (uses node '{t}' as 'root' child)."
        )));
    }
    if target.read_only {
        return Err(QmpError::generic("Block node is read-only"));
    }
    let image = |n: &crate::graph::Node| {
        image_node(&n.opened).ok_or_else(|| {
            QmpError::generic(format!(
                "blockdev-mirror: node '{}' is not an image node (sluice mirrors between \
                 file, raw and qcow2 nodes)",
                n.name
            ))
        })
    };
    let (device_image, target_image) = (image(device)?, image(target)?);
    let initial = match sync {
        MirrorSyncMode::Full => Initial::All,
        MirrorSyncMode::Top => Initial::Above(2),
        _ => Initial::Nothing,
    };
    let granularity = match granularity {
        0 => sluice_image::dirty::DIRTY_GRANULARITY,
        g => g,
    };
    let step = match buf_size {
        0 => COPY_CHUNK,
        b => (b as u64).min(COPY_CHUNK),
    };
    let on_target_error = args.on_target_error.unwrap_or(BlockdevOnError::Report);
    let mut engine = MirrorEngine::new(
        "blockdev-mirror",
        (device.name.clone(), device_image),
        target_image,
        initial,
        granularity,
        step,
        args.on_source_error.unwrap_or(BlockdevOnError::Report),
        on_target_error,
    );
    engine.same_size = true;
    let params = JobParams {
        // QEMU's default is the device's name, and qsd's nodes have none: '' (refused).
        id: args.job_id.unwrap_or_default(),
        job_type: JobType::Mirror,
        auto_finalize: args.auto_finalize.unwrap_or(true),
        auto_dismiss: args.auto_dismiss.unwrap_or(true),
        speed: args.speed.unwrap_or(0),
        on_error: on_target_error,
        nodes: vec![device.name.clone(), t.clone()],
        writes: vec![t.clone()],
        total: 0,
        completable: true,
    };
    let tracking = engine.tracking();
    let driver = MirrorDriver {
        engine,
        target: t.clone(),
    };
    let mode = args.copy_mode.unwrap_or(MirrorCopyMode::Background);
    let job = start_tracked(daemon, st, params, tracking.clone(), Box::new(driver))?;
    if mode == MirrorCopyMode::WriteBlocking {
        tracking.write_blocking();
    }
    // The current mode; changed only here, with the daemon's state lock held.
    let mode = std::sync::Mutex::new(mode);
    job.set_changer(Arc::new(move |opts: &BlockJobChangeOptions| {
        // qsd leaves a mirror given another job type alone.
        let BlockJobChangeOptionsBranch::Mirror(m) = &opts.u else {
            return Ok(());
        };
        let mut current = mode
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if m.copy_mode == *current {
            return Ok(());
        }
        if m.copy_mode != MirrorCopyMode::WriteBlocking {
            return Err(QmpError::generic(format!(
                "Change to copy mode '{}' is not implemented",
                m.copy_mode.as_str()
            )));
        }
        tracking.write_blocking();
        *current = MirrorCopyMode::WriteBlocking;
        Ok(())
    }));
    Ok(())
}
