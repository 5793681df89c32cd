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
//!
//! Commands that make an image file as one step of something else (`blockdev-snapshot-sync`'s
//! overlay, `drive-mirror`'s target) use [`create_image`], qemu's `bdrv_img_create`: one
//! function, so that both take the file's lock before they clear it and write the same
//! header for the same backing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sluice_image::{Prealloc, Qcow2Create};

use crate::generated::{
    BlockdevCreateArgs, BlockdevCreateOptionsBranch, BlockdevCreateOptionsQcow2, BlockdevOnError,
    BlockdevQcow2Version, BlockdevRef, JobType, PreallocMode, Qcow2CompressionType,
};
use crate::graph::image::{image_node, qmp_error, refresh_info};
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

/// The formats [`create_image`] makes: qemu's names (`file` is a raw image without a format
/// node, as a source opened with the `file` driver alone has it).
const CREATABLE: [&str; 3] = ["qcow2", "raw", "file"];

/// Image formats qemu knows and sluice cannot create, for an honest refusal rather than
/// qemu's `Unknown file format`.
const OTHER_QEMU_FORMATS: [&str; 12] = [
    "bochs",
    "cloop",
    "dmg",
    "luks",
    "parallels",
    "qcow",
    "qed",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

/// Checks that [`create_image`] can make `format`, before anything is created (qemu's
/// `bdrv_find_format`, with its message for a name it does not know).
pub(crate) fn check_format(format: &str) -> Result<(), QmpError> {
    if CREATABLE.contains(&format) {
        Ok(())
    } else if OTHER_QEMU_FORMATS.contains(&format) {
        Err(QmpError::generic(format!(
            "sluice creates raw and qcow2 images only, not '{format}'"
        )))
    } else {
        Err(QmpError::generic(format!("Unknown file format '{format}'")))
    }
}

/// Makes the image file `path` of `size` bytes in `format` (see [`check_format`]), with
/// `backing` (file name, format) written into its header, as qemu's `bdrv_img_create`
/// does for `blockdev-snapshot-sync` and `drive-mirror`. The file's write lock is taken
/// before anything is cleared, so a file another node or process has open is refused with
/// qemu's `Failed to get "write" lock` and left as it was; a missing file is created first
/// (a missing directory: `Could not create '...': No such file or directory`).
pub(crate) fn create_image(
    path: &Path,
    format: &str,
    size: u64,
    backing: Option<(&str, &str)>,
) -> Result<(), QmpError> {
    check_format(format)?;
    if backing.is_some() && format != "qcow2" {
        return Err(QmpError::generic(format!(
            "Backing file not supported for file format '{format}'"
        )));
    }
    if !path.exists() {
        sluice_image::create_file(path, 0, Prealloc::Off).map_err(QmpError::generic)?;
    }
    // Held until the image is made: the lock that keeps everyone else out meanwhile.
    let file =
        sluice_image::open_node(&sluice_image::BlockdevOptions::file(path, false), &|_| None)
            .map_err(qmp_error)?;
    if format == "qcow2" {
        let o = Qcow2Create {
            size,
            backing_file: backing.map(|(f, _)| f.to_string()),
            backing_fmt: backing.map(|(_, f)| f.to_string()),
            ..Qcow2Create::default()
        };
        file.format_qcow2(&o).map_err(QmpError::generic)
    } else {
        sluice_image::create_file(path, size, Prealloc::Off).map_err(QmpError::generic)
    }
}
