//! `block-stream`: copy what a node reads from its backing chain into the node, then drop
//! the copied layers from the chain.
//!
//! The command checks its arguments in qemu-storage-daemon's order and with its messages
//! (`'base' and 'base-node' cannot be specified at the same time`, `Cannot find device=...`,
//! `Node 'x' is busy: block device is in use by block job: stream`, ...), resolves the top
//! node and the base, and starts a [`Job`] whose [`StreamDriver`] walks the image in
//! [`CHUNK`]-sized steps: each step copies the ranges of the step that the top does not
//! hold but a layer above the base does, charges the copied bytes to the rate limit, and
//! advances the progress by the step (so `offset` ends at `len`, as in QEMU).
//!
//! Nodes without a backing chain (every node kind the daemon has today: file, null,
//! plugins) have nothing to copy: as in qsd, the job then runs through all its states inside
//! the command, before the reply, with `len` and `offset` 0.

use crate::block::not_found;
use crate::commands::Session;
use crate::generated::{BlockStreamArgs, BlockdevOnError, JobType};
use crate::jobs::{Job, JobCtx, JobDriver, JobParams, WorkError};
use crate::QmpError;

/// Bytes the job looks at per step (QEMU's stream uses 512 KiB too).
pub const CHUNK: u64 = 512 * 1024;

/// The stream job's work.
#[derive(Debug)]
pub struct StreamDriver {
    /// The virtual size of the top node.
    size: u64,
}

impl JobDriver for StreamDriver {
    fn nothing_to_do(&self) -> bool {
        self.size == 0
    }

    fn run(&mut self, ctx: &mut JobCtx<'_>) -> Result<(), WorkError> {
        ctx.set_total(self.size);
        let mut offset = 0;
        while offset < self.size {
            let n = CHUNK.min(self.size - offset);
            // Nothing above a base in this chain: no copy, only a pause point per step.
            ctx.throttle(0)?;
            ctx.progress(n);
            offset += n;
        }
        Ok(())
    }
}

/// The `block-stream` command.
pub(crate) fn block_stream(s: &mut Session<'_>, args: BlockStreamArgs) -> Result<(), QmpError> {
    if args.base.is_some() && args.base_node.is_some() {
        return Err(QmpError::generic(
            "'base' and 'base-node' cannot be specified at the same time",
        ));
    }
    if args.base.is_some() && args.bottom.is_some() {
        return Err(QmpError::generic(
            "'base' and 'bottom' cannot be specified at the same time",
        ));
    }
    if args.bottom.is_some() && args.base_node.is_some() {
        return Err(QmpError::generic(
            "'bottom' and 'base-node' cannot be specified at the same time",
        ));
    }
    let Some(top) = s.state.graph.get(&args.device) else {
        return Err(not_found(&args.device, &args.device));
    };
    let has_backing = top.children.iter().any(|(role, _)| role == "backing");
    if let Some(base) = &args.base {
        // No node of this daemon has a backing chain to look in yet.
        return Err(QmpError::generic(format!(
            "Can't find '{base}' in the backing chain"
        )));
    }
    for (arg, name) in [("base-node", &args.base_node), ("bottom", &args.bottom)] {
        if let Some(n) = name {
            if s.state.graph.get(n).is_none() {
                return Err(not_found("", n));
            }
            return Err(QmpError::generic(format!(
                "Node '{n}' is not a backing image of '{}' ({arg})",
                args.device
            )));
        }
    }
    if args.backing_file.is_some() {
        return Err(QmpError::generic(
            "backing file specified, but streaming the entire chain",
        ));
    }
    if has_backing {
        return Err(QmpError::generic(format!(
            "block-stream of '{}': streaming from a backing chain is not supported by sluice yet",
            args.device
        )));
    }
    if let Some(j) = s.state.jobs.using_node(&args.device) {
        return Err(QmpError::generic(format!(
            "Node '{}' is busy: block device is in use by block job: {}",
            args.device, j.job_type
        )));
    }
    // Only a backing chain gives work; none: QEMU's stream ends at once, reporting len 0.
    let size = if has_backing { top.size()? } else { 0 };
    let params = JobParams {
        // QEMU's default is the device's name, and qsd's nodes have none: '' (refused).
        id: args.job_id.unwrap_or_default(),
        job_type: JobType::Stream,
        auto_finalize: args.auto_finalize.unwrap_or(true),
        auto_dismiss: args.auto_dismiss.unwrap_or(true),
        speed: args.speed.unwrap_or(0),
        on_error: args.on_error.unwrap_or(BlockdevOnError::Report),
        nodes: vec![args.device.clone()],
    };
    Job::start(s.daemon, s.state, params, Box::new(StreamDriver { size }))?;
    Ok(())
}
