//! `block-stream`: copy what a node reads from its backing chain into the node, then drop
//! the copied layers from the chain.
//!
//! The command checks its arguments in qemu-storage-daemon's order and with its messages
//! (`'base' and 'base-node' cannot be specified at the same time`, `Cannot find device=...`,
//! `Node 'x' is busy: block device is in use by block job: stream`, ...), resolves the top
//! node and the base, and starts a [`Job`] whose [`StreamDriver`] walks the image in
//! [`COPY_CHUNK`](crate::jobs::COPY_CHUNK)-sized steps: each step copies the ranges of the step that the top does not
//! hold but a layer above the base does, charges the copied bytes to the rate limit, and
//! advances the progress by the step (so `offset` ends at `len`, as in QEMU).
//!
//! The copy is [`sluice_image::Node::stream_range`] (copy-on-read under the node's
//! exclusive io lock, so concurrent client writes win), with a flush every
//! [`FLUSH_EVERY`] bytes so that a crash loses little of the work; at prepare,
//! [`sluice_image::Node::switch_backing`] rewrites the top's header to name the base (or
//! nothing) and the graph's `backing` edge follows, dropping the streamed layers that
//! nothing else holds.
//!
//! The base may be a device (an `rbd` node under a qcow2 overlay): the copy reads it
//! through the plugin node the top's chain stands on (see [`crate::graph::layers`]), and
//! the header then names it by its options (`json:{...}`), format raw, as qemu does for a
//! protocol node.
//!
//! Nodes without a backing chain (file, null, plugins, qcow2 without backing) have nothing
//! to copy: as in qsd, the job then runs through all its states inside the command, before
//! the reply, with `len` and `offset` 0.

use std::path::Path;
use std::sync::Arc;

use sluice_image::{Driver, Format};

use crate::generated::{BlockStreamArgs, BlockdevOnError, JobType};
use crate::graph::image::{image_node, qmp_error};
use crate::graph::layers::layer_in_chain;
use crate::graph::not_found;
use crate::jobs::{Job, JobCtx, JobDriver, JobParams, WorkError, Writeback};
use crate::state::{Daemon, State};
use crate::QmpError;

/// How often (in bytes of the image walked) the stream flushes the top: what was copied
/// before a crash then stays copied, and the clusters a crash can leak (allocated, not yet
/// referenced from the L1 table, see `sluice_image::storage`) are bounded by what was
/// copied since. A multiple of [`COPY_CHUNK`](crate::jobs::COPY_CHUNK).
const FLUSH_EVERY: u64 = 256 << 20;

/// The stream job's work.
#[derive(Debug)]
pub struct StreamDriver {
    /// The virtual size of the top node (0: no backing, nothing to do).
    size: u64,
    /// The top node (graph name, image node); None when it has no backing chain.
    top: Option<(String, Arc<sluice_image::Node>)>,
    /// The base (graph name, image node): the first layer not copied, the new backing.
    base: Option<(String, Arc<sluice_image::Node>)>,
    /// The name to write into the top's header (`backing-file`), else the base's path.
    backing_file: Option<String>,
}

impl JobDriver<State> for StreamDriver {
    fn nothing_to_do(&self) -> bool {
        self.size == 0
    }

    fn run(&mut self, ctx: &mut JobCtx<'_, State>) -> Result<(), WorkError> {
        let base = self.base.as_ref().map(|(_, n)| &**n);
        let top = self.top.as_ref().map(|(_, n)| n);
        // The top is flushed every FLUSH_EVERY: its writeback starts as the job copies.
        let writeback = Writeback::default();
        ctx.copy_in_chunks(self.size, |offset, n| match top {
            None => Ok(0),
            Some(top) => {
                let copied = top.stream_range(offset, n, base)?;
                writeback.copied(top, copied);
                if (offset + n) % FLUSH_EVERY == 0 {
                    top.flush()?;
                }
                Ok(copied)
            }
        })
    }

    /// The backing switch, in the top's header and then in the graph.
    fn prepare(&mut self, st: &mut State) -> Result<(), String> {
        let Some((top_name, top)) = &self.top else {
            return Ok(());
        };
        let name = self.backing_file.clone().or_else(|| {
            self.base
                .as_ref()
                .map(|(_, b)| b.filename().display().to_string())
        });
        let format = self.base.as_ref().map(|(_, b)| match b.driver() {
            Driver::Qcow2 => Format::Qcow2,
            Driver::Raw | Driver::File | Driver::Blkdebug | Driver::Plugin => Format::Raw,
        });
        let base = self.base.as_ref().map(|(_, b)| b.clone());
        top.switch_backing(base, name.as_deref(), format)
            .map_err(|e| qmp_error(e).desc)?;
        let base_name = self.base.as_ref().map(|(n, _)| n.as_str());
        st.graph.replace_child(top_name, "backing", base_name);
        Ok(())
    }
}

/// The `block-stream` command.
pub(crate) fn block_stream(
    daemon: &Arc<Daemon>,
    st: &mut State,
    args: BlockStreamArgs,
) -> Result<(), QmpError> {
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
    let Some(top) = st.graph.get(&args.device) else {
        return Err(not_found(&args.device, &args.device));
    };
    // The backing chain below the top, by graph name, top-down.
    let mut chain = Vec::new();
    let mut next = st.graph.child(top, "backing");
    while let Some(n) = next {
        chain.push(n);
        next = st.graph.child(n, "backing");
    }
    // The index in `chain` of the base (the first layer not copied); chain.len(): none.
    let base_at = if let Some(base) = &args.base {
        chain
            .iter()
            .position(|n| {
                n.opened.info.filename == *base
                    || image_node(&n.opened).is_some_and(|i| i.filename() == Path::new(base))
            })
            .ok_or_else(|| QmpError::generic(format!("Can't find '{base}' in the backing chain")))?
    } else if let Some(b) = &args.base_node {
        if st.graph.get(b).is_none() {
            return Err(not_found("", b));
        }
        chain.iter().position(|n| n.name == *b).ok_or_else(|| {
            QmpError::generic(format!(
                "Node '{b}' is not a backing image of '{}'",
                args.device
            ))
        })?
    } else if let Some(b) = &args.bottom {
        if st.graph.get(b).is_none() {
            return Err(not_found("", b));
        }
        1 + chain.iter().position(|n| n.name == *b).ok_or_else(|| {
            QmpError::generic(format!(
                "Node '{b}' is not in the backing chain of '{}'",
                args.device
            ))
        })?
    } else {
        chain.len()
    };
    if args.backing_file.is_some() && base_at == chain.len() {
        return Err(QmpError::generic(
            "backing file specified, but streaming the entire chain",
        ));
    }
    let mut nodes = vec![args.device.clone()];
    nodes.extend(chain[..base_at].iter().map(|n| n.name.clone()));
    for n in &nodes {
        if let Some(j) = st.jobs.using_node(n) {
            return Err(QmpError::generic(format!(
                "Node '{n}' is busy: block device is in use by block job: {}",
                j.job_type
            )));
        }
    }
    let not_image = |n: &crate::graph::Node| {
        QmpError::generic(format!(
            "block-stream of '{}': node '{}' is not an image node",
            args.device, n.name
        ))
    };
    let image = |n: &crate::graph::Node| image_node(&n.opened).ok_or_else(|| not_image(n));
    let driver = if chain.is_empty() {
        StreamDriver {
            size: 0,
            top: None,
            base: None,
            backing_file: None,
        }
    } else {
        if top.read_only {
            return Err(QmpError::generic("Block node is read-only"));
        }
        let top_image = image(top)?;
        // The base may be a device (an rbd image): its layer is the plugin node the top's
        // chain reads it through.
        let base = match chain.get(base_at) {
            Some(b) => Some((
                b.name.clone(),
                layer_in_chain(b, &top_image).ok_or_else(|| not_image(b))?,
            )),
            None => None,
        };
        StreamDriver {
            size: top.size()?,
            top: Some((args.device.clone(), top_image)),
            base,
            backing_file: args.backing_file.clone(),
        }
    };
    let params = JobParams {
        // QEMU's default is the device's name, and qsd's nodes have none: '' (refused).
        id: args.job_id.unwrap_or_default(),
        job_type: JobType::Stream,
        auto_finalize: args.auto_finalize.unwrap_or(true),
        auto_dismiss: args.auto_dismiss.unwrap_or(true),
        speed: args.speed.unwrap_or(0),
        on_error: args.on_error.unwrap_or(BlockdevOnError::Report),
        writes: vec![args.device.clone()],
        nodes,
        total: driver.size,
        completable: false,
    };
    Job::start(daemon, st, params, Box::new(driver))?;
    Ok(())
}
