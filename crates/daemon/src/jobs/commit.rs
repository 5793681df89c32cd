//! `block-commit` of an intermediate layer: copy what the layers `top` down to (not
//! including) `base` hold into `base`, then drop those layers from the chain.
//!
//! The command checks its arguments in qemu-storage-daemon's order and with its messages,
//! resolves the top and the base, and starts a [`Job`] whose [`CommitDriver`] walks the
//! image in [`COPY_CHUNK`](crate::jobs::COPY_CHUNK)-sized steps: each step finds (by allocation depth, seen from `top`)
//! the ranges that a layer from `top` down to above `base` holds, reads them through `top`
//! (the newest of those layers wins) and writes them into `base`
//! ([`sluice_image::Node::commit_range`], which reads `top`'s own chain even after an
//! external snapshot sent `top`'s requests to its overlay), charges the copied bytes to the
//! rate limit and advances the progress by the step.
//!
//! `base` is a read-only backing node; as qsd reopens it read-write for the job, the driver
//! writes through a writable node over the same image ([`sluice_image::Node::open_writer`]),
//! which is flushed and closed at the end, after which the base node drops its caches
//! ([`sluice_image::Node::reload`]). Nothing reads those ranges through `base` meanwhile:
//! they are all held by a layer above it. At prepare, the layer above `top` (the overlay)
//! gets `base` as its backing in its header ([`sluice_image::Node::switch_backing`]) and in
//! the graph, which drops the committed layers that nothing else holds.
//!
//! The base may be an `rbd` node under a qcow2 layer: the job reads the chain as it stands
//! (the base through its plugin node) and writes through the rbd image opened again
//! read-write for the job, whose exclusive lock goes when the writer is closed (see
//! [`crate::graph::layers::open_writer`]).
//!
//! Active commit (`top` is the device itself) is a mirror job: see [`super::active_commit`].
//! The overlay must be writable (its header is rewritten).

use std::path::Path;
use std::sync::Arc;

use sluice_block::Errno;
use sluice_image::{Driver, Format};

use crate::generated::{BlockCommitArgs, BlockdevOnError, JobType};
use crate::graph::image::{close_writer, image_node, qmp_error};
use crate::graph::layers::{self, layer_in_chain};
use crate::jobs::active_commit::ActiveCommitDriver;
use crate::jobs::mirror_engine::{start_tracked, Initial, MirrorEngine};
use crate::jobs::{Job, JobCtx, JobDriver, JobParams, WorkError, Writeback, COPY_CHUNK};
use crate::state::{Daemon, State};
use crate::{ErrorClass, QmpError};

/// The commit job's work.
#[derive(Debug)]
pub struct CommitDriver {
    /// The virtual size of the top node.
    size: u64,
    /// The top node (image): the first layer committed.
    top: Arc<sluice_image::Node>,
    /// Depth (seen from `top`, 1 = top) of the base: ranges at depth 1..base_depth are copied.
    base_depth: u32,
    /// The base (graph name, image node): the commit's target and the new backing.
    base: (String, Arc<sluice_image::Node>),
    /// The layer above `top` (graph name, image node): its backing becomes `base`.
    overlay: (String, Arc<sluice_image::Node>),
    /// The name to write into the overlay's header (`backing-file`), else the base's path.
    backing_file: Option<String>,
    /// The writable node over the base's image while the job writes into it.
    writer: Option<Arc<sluice_image::Node>>,
}

impl CommitDriver {
    /// Copies the ranges of `[offset, offset+n)` held above the base; returns the bytes.
    fn commit_range(&self, offset: u64, n: u64) -> sluice_block::Result<u64> {
        let writer = self
            .writer
            .as_ref()
            .ok_or_else(|| sluice_block::BlockError::new(Errno::EROFS, "base not writable"))?;
        self.top.commit_range(offset, n, self.base_depth, writer)
    }

    /// Flushes and closes the writer, then makes the base node forget its stale caches.
    fn close_writer(&mut self) -> Result<(), String> {
        close_writer(self.writer.take().as_ref(), &self.base.1)
    }
}

/// The image node behind `n`, which a commit of `device` needs.
fn image_of(device: &str, n: &crate::graph::Node) -> Result<Arc<sluice_image::Node>, QmpError> {
    image_node(&n.opened).ok_or_else(|| {
        QmpError::generic(format!(
            "block-commit of '{device}': node '{}' is not an image node",
            n.name
        ))
    })
}

/// The layer of `base` in the chain below `top` (an image node, or the plugin node over an
/// rbd base, see [`crate::graph::layers`]).
fn base_layer(
    device: &str,
    base: &crate::graph::Node,
    top: &Arc<sluice_image::Node>,
) -> Result<Arc<sluice_image::Node>, QmpError> {
    layer_in_chain(base, top).ok_or_else(|| {
        QmpError::generic(format!(
            "block-commit of '{device}': node '{}' is not an image node",
            base.name
        ))
    })
}

/// Checks that `base` can take `top`'s data and opens the writable node over its image
/// (qsd's reopen of the base read-write; for an rbd base, its image opened again
/// read-write, with its exclusive lock, until the job ends).
fn base_writer(
    top: &crate::graph::Node,
    base: &crate::graph::Node,
    base_image: &Arc<sluice_image::Node>,
) -> Result<(u64, layers::Writer), QmpError> {
    let size = top.size()?;
    if base.size()? < size {
        return Err(QmpError::generic(format!(
            "block-commit: base '{}' is smaller than top '{}' (growing the base is not \
             supported by sluice yet)",
            base.name, top.name
        )));
    }
    let writer = layers::open_writer(base, base_image)?;
    Ok((size, writer))
}

impl JobDriver<State> for CommitDriver {
    fn run(&mut self, ctx: &mut JobCtx<'_, State>) -> Result<(), WorkError> {
        let size = self.size;
        // The base's writer is flushed at the end: its writeback starts as the job copies.
        let writeback = Writeback::default();
        ctx.copy_in_chunks(size, |offset, n| {
            let copied = self.commit_range(offset, n)?;
            if let Some(w) = &self.writer {
                writeback.copied(w, copied);
            }
            Ok(copied)
        })
    }

    /// Closes the base's writer, then switches the overlay's backing to the base, in its
    /// header and then in the graph.
    fn prepare(&mut self, st: &mut State) -> Result<(), String> {
        self.close_writer()?;
        let (base_name, base) = &self.base;
        let (overlay_name, overlay) = &self.overlay;
        let name = self
            .backing_file
            .clone()
            .unwrap_or_else(|| base.filename().display().to_string());
        let format = match base.driver() {
            Driver::Qcow2 => Format::Qcow2,
            Driver::Raw | Driver::File | Driver::Blkdebug | Driver::Plugin => Format::Raw,
        };
        overlay
            .switch_backing(Some(base.clone()), Some(&name), Some(format))
            .map_err(|e| qmp_error(e).desc)?;
        st.graph
            .replace_child(overlay_name, "backing", Some(base_name.as_str()));
        Ok(())
    }

    /// The base keeps what was written (as in QEMU); its node must see it.
    fn abort(&mut self, _st: &mut State) {
        if let Err(e) = self.close_writer() {
            tracing::warn!("block-commit: closing the base '{}': {e}", self.base.0);
        }
    }

    fn clean(&mut self, _st: &mut State) {
        self.writer = None;
    }
}

/// The `block-commit` command.
pub(crate) fn block_commit(
    daemon: &Arc<Daemon>,
    st: &mut State,
    args: BlockCommitArgs,
) -> Result<(), QmpError> {
    if args.base.is_some() && args.base_node.is_some() {
        return Err(QmpError::generic(
            "'base-node' and 'base' are mutually exclusive",
        ));
    }
    if args.top.is_some() && args.top_node.is_some() {
        return Err(QmpError::generic(
            "'top-node' and 'top' are mutually exclusive",
        ));
    }
    let Some(device) = st.graph.get(&args.device) else {
        return Err(QmpError::new(
            ErrorClass::DeviceNotFound,
            format!("Device '{}' not found", args.device),
        ));
    };
    // QEMU commits from a root node only: not one another node (or a job) uses.
    if st.graph.has_parent(&device.name) || st.jobs.using_node(&device.name).is_some() {
        return Err(QmpError::generic("Need a root block node"));
    }
    // The chain from the device down, by graph name: chain[0] is the device.
    let mut chain = vec![device];
    let mut next = st.graph.child(device, "backing");
    while let Some(n) = next {
        chain.push(n);
        next = st.graph.child(n, "backing");
    }
    let matches_file = |n: &crate::graph::Node, f: &str| {
        n.opened.info.filename == f
            || image_node(&n.opened).is_some_and(|i| i.filename() == Path::new(f))
    };
    let top_at = if let Some(t) = &args.top_node {
        if st.graph.get(t).is_none() {
            return Err(crate::graph::not_found("", t));
        }
        chain
            .iter()
            .position(|n| n.name == *t)
            .ok_or_else(|| QmpError::generic(format!("'{t}' is not in this backing file chain")))?
    } else if let Some(t) = &args.top {
        chain
            .iter()
            .skip(1)
            .position(|n| matches_file(n, t))
            .map(|i| i + 1)
            .ok_or_else(|| QmpError::generic(format!("Top image file {t} not found")))?
    } else {
        0
    };
    let base_at = if let Some(b) = &args.base_node {
        if st.graph.get(b).is_none() {
            return Err(crate::graph::not_found("", b));
        }
        chain
            .iter()
            .position(|n| n.name == *b)
            .ok_or_else(|| QmpError::generic(format!("'{b}' is not in this backing file chain")))?
    } else if let Some(b) = &args.base {
        chain
            .iter()
            .position(|n| matches_file(n, b))
            .ok_or_else(|| QmpError::generic(format!("Can't find '{b}' in the backing chain")))?
    } else if chain.len() > 1 {
        chain.len() - 1
    } else {
        0
    };
    if base_at == top_at {
        return Err(QmpError::generic("cannot commit an image into itself"));
    }
    if base_at < top_at {
        return Err(QmpError::generic(format!(
            "'{}' is not in this backing file chain",
            chain[base_at].name
        )));
    }
    let mut nodes: Vec<String> = chain[top_at.saturating_sub(1)..=base_at]
        .iter()
        .map(|n| n.name.clone())
        .collect();
    nodes.dedup();
    for n in &nodes {
        if let Some(j) = st.jobs.using_node(n) {
            return Err(QmpError::generic(format!(
                "Node '{n}' is busy: block device is in use by block job: {}",
                j.job_type
            )));
        }
    }
    let image = |n: &crate::graph::Node| image_of(&args.device, n);
    if top_at == 0 {
        let (driver, params) = active_job(args, &chain, base_at, nodes)?;
        let tracking = driver.engine.tracking();
        return start_tracked(daemon, st, params, tracking, Box::new(driver)).map(|_| ());
    }
    let overlay = chain[top_at - 1];
    if overlay.read_only {
        return Err(QmpError::generic(format!(
            "block-commit: node '{}' above the top is read-only (sluice rewrites its backing \
             file only in writable nodes)",
            overlay.name
        )));
    }
    let top = chain[top_at];
    let base = chain[base_at];
    let top_image = image(top)?;
    let base_image = base_layer(&args.device, base, &top_image)?;
    let (size, writer) = base_writer(top, base, &base_image)?;
    let driver = CommitDriver {
        size,
        top: top_image,
        base_depth: (base_at - top_at + 1) as u32,
        base: (base.name.clone(), base_image),
        overlay: (overlay.name.clone(), image(overlay)?),
        backing_file: args.backing_file.clone(),
        writer: Some(writer.node),
    };
    let params = JobParams {
        // QEMU's default is the device's name, and qsd's nodes have none: '' (refused).
        id: args.job_id.unwrap_or_default(),
        job_type: JobType::Commit,
        auto_finalize: args.auto_finalize.unwrap_or(true),
        auto_dismiss: args.auto_dismiss.unwrap_or(true),
        speed: args.speed.unwrap_or(0),
        on_error: args.on_error.unwrap_or(BlockdevOnError::Report),
        nodes,
        // The base takes the data; the overlay's header is rewritten at the end.
        writes: vec![base.name.clone(), overlay.name.clone()],
        total: size,
        completable: false,
    };
    Job::start(daemon, st, params, Box::new(driver))?;
    Ok(())
}

/// The job of an active `block-commit` (the top is the device): see
/// [`super::active_commit`].
fn active_job(
    args: BlockCommitArgs,
    chain: &[&crate::graph::Node],
    base_at: usize,
    nodes: Vec<String>,
) -> Result<(ActiveCommitDriver, JobParams), QmpError> {
    let (device, base) = (chain[0], chain[base_at]);
    if device.read_only {
        return Err(QmpError::generic(format!(
            "Block node '{}' is read-only: an active commit writes to it",
            device.name
        )));
    }
    let image = |n: &crate::graph::Node| image_of(&args.device, n);
    let device_image = image(device)?;
    let base_image = base_layer(&args.device, base, &device_image)?;
    let (_, writer) = base_writer(device, base, &base_image)?;
    let base_payload = writer.payload;
    let writer = writer.node;
    let on_error = args.on_error.unwrap_or(BlockdevOnError::Report);
    let mut engine = MirrorEngine::new(
        "block-commit",
        (device.name.clone(), device_image),
        writer,
        Initial::Above((base_at + 1) as u32),
        sluice_image::dirty::DIRTY_GRANULARITY,
        COPY_CHUNK,
        on_error,
        on_error,
    );
    // The base may be larger than the device: only the device's size is copied.
    engine.same_size = false;
    let driver = ActiveCommitDriver {
        engine,
        base: (base.name.clone(), base_image),
        base_payload,
        closed: false,
    };
    let params = JobParams {
        id: args.job_id.unwrap_or_default(),
        job_type: JobType::Commit,
        auto_finalize: args.auto_finalize.unwrap_or(true),
        auto_dismiss: args.auto_dismiss.unwrap_or(true),
        speed: args.speed.unwrap_or(0),
        on_error,
        nodes,
        writes: vec![base.name.clone()],
        total: 0,
        completable: true,
    };
    Ok((driver, params))
}
