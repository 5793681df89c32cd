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
//! `drive-mirror` ([`super::drive_mirror`]) is this job too, onto a node it made itself
//! ([`OwnedTarget`]): dropped from the graph when the job ends without the pivot, given
//! its backing edge at the pivot.
//!
//! What sluice does not do: `replaces` is accepted only naming the device
//! itself (sluice has no filter nodes above a device to replace; a node that is busy gets
//! qsd's `Node 'x' is busy: ...`); `filter-node-name` is
//! accepted and no filter node is inserted. After a pivot the source node keeps
//! forwarding to the target (it is how the open connections survive), so a new export of
//! the source serves the target too.

use std::sync::Arc;

use crate::generated::{
    BlockJobChangeOptions, BlockJobChangeOptionsBranch, BlockdevMirrorArgs, BlockdevOnError,
    JobType, MirrorCopyMode, MirrorSyncMode,
};
use crate::graph::image::{image_node, refresh_info_backing_from_header};
use crate::graph::not_found;
use crate::jobs::mirror_engine::{move_exports, start_tracked, Initial, MirrorEngine};
use crate::jobs::{JobCtx, JobDriver, JobParams, WorkError, COPY_CHUNK};
use crate::state::{Daemon, State};
use crate::QmpError;

/// A target node the command made (drive-mirror's), not the user.
#[derive(Debug, Clone, Default)]
pub struct OwnedTarget {
    /// The graph node that becomes the target's `backing` child at the pivot (its image
    /// is already the target image's backing, see [`super::drive_mirror`]).
    pub backing: Option<String>,
}

/// The mirror job's work.
#[derive(Debug)]
pub struct MirrorDriver {
    /// The copy from the device into the target.
    engine: MirrorEngine,
    /// The target's graph name.
    target: String,
    /// Set when the command made the target (drive-mirror).
    owned: Option<OwnedTarget>,
}

impl MirrorDriver {
    /// Stops tracking and writes the target back (the end without a pivot); a target the
    /// command made leaves the graph, as in qsd (its file stays).
    fn close(&self, st: &mut State) -> Result<(), String> {
        self.engine.stop_tracking();
        let r = self.engine.target.flush().map_err(|e| e.errno.describe());
        if self.owned.is_some() {
            st.graph.drop_unowned(&self.target);
        }
        r
    }
}

impl JobDriver<State> for MirrorDriver {
    fn run(&mut self, ctx: &mut JobCtx<'_, State>) -> Result<(), WorkError> {
        self.engine.run(ctx)
    }

    /// Sync `none` has nothing to copy first: ready before the command's reply, as qsd.
    fn ready_at_start(&self) -> bool {
        self.engine.initial == Initial::Nothing
    }

    /// The pivot and the exports' move (see the module doc), or, after a soft cancel, the
    /// target written back.
    fn prepare(&mut self, st: &mut State) -> Result<(), String> {
        if !self.engine.wants_pivot() {
            return self.close(st);
        }
        self.engine.pivot()?;
        let device = self.engine.source.0.clone();
        let moved = move_exports(st, &device, &self.target);
        if let Some(owned) = &self.owned {
            if moved == 0 {
                // Nothing uses the new node: qsd drops it (the device, which forwards to
                // it, keeps the image open).
                st.graph.drop_unowned(&self.target);
            } else if let Some(t) = st.graph.get_mut(&self.target) {
                if let Some(b) = &owned.backing {
                    t.children.push(("backing".to_string(), b.clone()));
                }
                // qsd names the node by its file again: its backing is what its header
                // says now.
                refresh_info_backing_from_header(&mut t.opened);
            }
        }
        Ok(())
    }

    fn abort(&mut self, st: &mut State) {
        if let Err(e) = self.close(st) {
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
    if st.graph.get(&args.target).is_none() {
        return Err(not_found(&args.target, &args.target));
    }
    root_device(st, &device.name)?;
    start(daemon, st, args, None)
}

/// qsd's `qmp_get_root_bs` check of a mirror's device: no parent, no job's filter above.
pub(crate) fn root_device(st: &State, device: &str) -> Result<(), QmpError> {
    if st.graph.has_parent(device) || st.jobs.using_node(device).is_some() {
        return Err(QmpError::generic("Need a root block node"));
    }
    Ok(())
}

/// qsd's refusal of a node a job or a parent holds as its backing (`bdrv_op_is_blocked`).
fn busy(st: &State, t: &str) -> Result<(), QmpError> {
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
    Ok(())
}

/// The checks and the start that blockdev-mirror and drive-mirror share (qsd's
/// `blockdev_mirror_common` and `mirror_start_job`), once both nodes exist and the device
/// is known to be a root node. `owned`: the command made the target (see [`OwnedTarget`]).
pub(crate) fn start(
    daemon: &Arc<Daemon>,
    st: &mut State,
    args: BlockdevMirrorArgs,
    owned: Option<OwnedTarget>,
) -> Result<(), QmpError> {
    let (Some(device), Some(target)) = (st.graph.get(&args.device), st.graph.get(&args.target))
    else {
        return Err(not_found(&args.target, &args.target));
    };
    let t = &target.name;
    busy(st, t)?;
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
        busy(st, r)?;
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
    let synced = engine.active.flag();
    let driver = MirrorDriver {
        engine,
        target: t.clone(),
        owned,
    };
    let mode = args.copy_mode.unwrap_or(MirrorCopyMode::Background);
    let job = start_tracked(daemon, st, params, tracking.clone(), Box::new(driver))?;
    job.set_actively_synced(synced);
    if mode == MirrorCopyMode::WriteBlocking {
        tracking.write_blocking();
        if initial == Initial::Nothing {
            tracking.clean_at_start();
        }
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
