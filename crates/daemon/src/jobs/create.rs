//! `blockdev-create`: make an image file (`file`) or format a file node as qcow2, as a job
//! of type `create`.
//!
//! qsd runs image creation as a job so that a slow preallocation does not hold the
//! monitor; its shape is QEMU's: the command refuses only a driver that cannot create
//! (`Driver does not support blockdev-create`, raw among them) and a bad or used job id;
//! everything else — a file node that does not exist, a size that is not a multiple of 512,
//! an option qcow2 refuses — fails the job, whose `error` `query-jobs` then shows. A create
//! job is not a block job (see [`super::is_block_job`]): no `BLOCK_JOB_*` events, absent
//! from `query-block-jobs`; it is never dismissed automatically (qsd leaves it
//! `concluded` until `job-dismiss`), and its progress is 0 of 1, then 1 of 1, even when it
//! fails.
//!
//! The work itself is the image crate's ([`sluice_image::create_file`],
//! [`sluice_image::Node::format_qcow2`]). What sluice refuses that qsd can do, each with
//! its own message in the job: an inline `file` definition (add the node first),
//! `extended-l2: true`, `compression-type: zstd`.

use std::path::PathBuf;
use std::sync::Arc;

use sluice_image::{Prealloc, Qcow2Create};

use crate::generated::{
    BlockdevCreateArgs, BlockdevCreateOptionsBranch, BlockdevCreateOptionsQcow2, BlockdevOnError,
    BlockdevQcow2Version, BlockdevRef, JobType, PreallocMode, Qcow2CompressionType,
};
use crate::graph::image::{image_node, refresh_info};
use crate::graph::not_found;
use crate::jobs::{Job, JobCtx, JobDriver, JobParams, WorkError};
use crate::state::{Daemon, State};
use crate::QmpError;

/// What the job makes.
#[derive(Debug)]
enum Work {
    File {
        path: PathBuf,
        size: u64,
        prealloc: Prealloc,
    },
    /// The file node (graph name, image node) or why it cannot be used, and the options.
    Qcow2 {
        file: Result<(String, Arc<sluice_image::Node>), String>,
        opts: Result<Qcow2Create, String>,
    },
}

/// The create job's work.
#[derive(Debug)]
pub struct CreateDriver {
    work: Work,
}

impl JobDriver<State> for CreateDriver {
    fn run(&mut self, ctx: &mut JobCtx<'_, State>) -> Result<(), WorkError> {
        let r = match &self.work {
            Work::File {
                path,
                size,
                prealloc,
            } => sluice_image::create_file(path, *size, *prealloc),
            Work::Qcow2 { file, opts } => file
                .clone()
                .and_then(|(_, f)| opts.clone().and_then(|o| f.format_qcow2(&o))),
        };
        ctx.progress(1);
        r.map_err(WorkError::Failed)
    }

    /// The file node's `query-named-block-nodes` figures follow the new image.
    fn prepare(&mut self, st: &mut State) -> Result<(), String> {
        if let Work::Qcow2 {
            file: Ok((n, _)), ..
        } = &self.work
        {
            if let Some(node) = st.graph.get_mut(n) {
                refresh_info(&mut node.opened);
            }
        }
        Ok(())
    }
}

fn prealloc(p: Option<PreallocMode>) -> Prealloc {
    match p {
        None | Some(PreallocMode::Off) => Prealloc::Off,
        Some(PreallocMode::Metadata) => Prealloc::Metadata,
        Some(PreallocMode::Falloc) => Prealloc::Falloc,
        Some(PreallocMode::Full) => Prealloc::Full,
    }
}

/// The qcow2 options with qemu's defaults, or the job's error.
fn qcow2_options(q: &BlockdevCreateOptionsQcow2) -> Result<Qcow2Create, String> {
    let o = Qcow2Create {
        size: q.size,
        version: match q.version {
            Some(BlockdevQcow2Version::V2) => 2,
            _ => 3,
        },
        cluster_size: q.cluster_size.unwrap_or(65536),
        refcount_bits: q.refcount_bits.map_or(16, |b| b.max(0) as u64),
        lazy_refcounts: q.lazy_refcounts.unwrap_or(false),
        preallocation: prealloc(q.preallocation),
        backing_file: q.backing_file.clone(),
        backing_fmt: q.backing_fmt.map(|f| f.as_str().to_string()),
    };
    o.check()?;
    if q.extended_l2 == Some(true) {
        return Err("sluice cannot create images with extended L2 entries yet".into());
    }
    if q.compression_type == Some(Qcow2CompressionType::Zstd) {
        return Err("sluice creates qcow2 images with zlib compression only".into());
    }
    Ok(o)
}

/// The `blockdev-create` command.
pub(crate) fn blockdev_create(
    daemon: &Arc<Daemon>,
    st: &mut State,
    args: BlockdevCreateArgs,
) -> Result<(), QmpError> {
    let mut nodes = Vec::new();
    let work = match &args.options.u {
        BlockdevCreateOptionsBranch::File(f) => Work::File {
            path: PathBuf::from(&f.filename),
            size: f.size,
            prealloc: prealloc(f.preallocation),
        },
        BlockdevCreateOptionsBranch::Qcow2(q) => {
            let file = match &q.file {
                BlockdevRef::Reference(n) => match st.graph.get(n) {
                    None => Err(not_found(n, n).desc),
                    Some(node) => match image_node(&node.opened) {
                        Some(img) => {
                            nodes.push(n.clone());
                            Ok((n.clone(), img))
                        }
                        None => Err(format!(
                            "Node '{n}' (driver {}) cannot hold a qcow2 image: sluice formats \
                             file nodes only",
                            node.driver.as_str()
                        )),
                    },
                },
                BlockdevRef::Definition(_) => Err("sluice's blockdev-create takes the file \
                                                   node by name: add it with blockdev-add \
                                                   first"
                    .to_string()),
            };
            Work::Qcow2 {
                file,
                opts: qcow2_options(q),
            }
        }
        _ => return Err(QmpError::generic("Driver does not support blockdev-create")),
    };
    let params = JobParams {
        id: args.job_id,
        job_type: JobType::Create,
        auto_finalize: true,
        auto_dismiss: false,
        speed: 0,
        on_error: BlockdevOnError::Report,
        writes: nodes.clone(),
        nodes,
        total: 1,
        completable: false,
    };
    Job::start(daemon, st, params, Box::new(CreateDriver { work }))?;
    Ok(())
}
