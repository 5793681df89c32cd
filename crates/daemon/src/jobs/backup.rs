//! `blockdev-backup`: write a node's content, as it was when the job started, into another
//! node, while clients keep writing to it.
//!
//! The point in time is kept by copy-before-write, QEMU's `copy-before-write` filter done
//! as a hook on the source's request gate ([`sluice_image::BeforeWrite`], see
//! `sluice_image::node::gate`): [`Copier`] holds `todo`, a map of what the target still
//! needs from the source. Before any change to the source runs, the hook claims the part of
//! `todo` it touches and copies that old data into the target; the job's thread claims the
//! rest, up to [`IN_FLIGHT`] chunks at a time, and copies them at once on scoped threads
//! (QEMU's block-copy also keeps several copies in flight) once copies wait for a disk,
//! and on its own thread while they do not ([`Workers`]). A range leaves `todo` under the
//! copier's lock, so one of them only copies it; the hook copies under the lock, and the
//! job's copies run outside it but are listed in `copying` until they are in the target: a
//! write to a range the job is copying waits until that copy is done (a failed one goes
//! back into `todo`, and the waiting hook then copies it itself). What a client writes
//! after its range was copied is not the backup's business.
//!
//! The sync modes only differ in the first `todo`: `full` everything, `top` what the
//! source's own layer holds, `bitmap` (and `incremental`) what the job's bitmap marks,
//! `none` everything, but the job copies nothing itself: only the hook does (libvirt's
//! pull mode: the target is a scratch qcow2 whose backing is the source, exported while the
//! job runs, and the job ends when it is cancelled). Progress is what `todo` no longer
//! holds, so copies by clients' hooks count too (qsd reports the same).
//!
//! The job's bitmap follows QEMU's successor rule without a second, hidden bitmap: at the
//! start its bits move to a private copy and the bitmap, cleared, records what is written
//! from then on (it is busy meanwhile); at the end `bitmap-mode` decides whether the copy
//! is merged back (`never`, or `on-success` after a failure) or dropped, and `always`
//! after a failure merges back what was not copied.
//!
//! Locks: a hook runs inside the source's gate (shared) and takes the copier's lock, and
//! waits there for the job's copies that overlap its write; the job's copies read the
//! source through its gate (shared). That is safe while nothing waits for the gate
//! exclusively, and only an active commit or a mirror does (track writes, pivot), which
//! the daemon refuses on a node a job holds.
//!
//! The command checks its arguments in qsd's order with its messages (`blockdev.c`
//! `do_backup_common`, `block/backup.c` `backup_job_create`). Refused by sluice, with a
//! clear message: `compress` and `discard-source`. `filter-node-name` is accepted and no
//! filter node appears in the graph.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use sluice_block::extents::Extents;
use sluice_block::Result as BlockResult;
use sluice_image::bitmaps::{Bitmap, BusyGuard, Use};
use sluice_image::{BeforeWrite, DirtyMap, Node as ImageNode};

use crate::generated::{
    BitmapSyncMode, BlockdevBackup, BlockdevOnError, IoOperationType, JobType, MirrorSyncMode,
};
use crate::graph::image::image_node;
use crate::graph::not_found;
use crate::jobs::{
    copy_run, with_workers, CopyError, ErrorAction, Job, JobCtx, JobDriver, JobParams, WorkError,
    Workers, COPY_CHUNK, IN_FLIGHT,
};
use crate::state::{Daemon, State};
use crate::QmpError;

/// The smallest unit the backup copies (QEMU's block-copy cluster: 64 KiB, or the
/// target's cluster if larger).
const MIN_CLUSTER: u64 = 64 * 1024;

/// What the target still needs, and the lock and runs that keep each range copied once
/// (see the module doc).
#[derive(Debug)]
pub struct Copier {
    todo: DirtyMap,
    /// The runs the job's threads are copying, outside the lock: claimed from `todo`
    /// under it, removed (failed ones marked back) under it when their copies end.
    copying: Mutex<Vec<(u64, u64)>>,
    /// Signalled when runs leave `copying`.
    copied: Condvar,
    target: Arc<ImageNode>,
}

impl Copier {
    fn lock(&self) -> MutexGuard<'_, Vec<(u64, u64)>> {
        self.copying.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims up to `most` runs of `todo` from `at` on (wrapping), for the job to copy.
    fn claim(&self, at: u64, most: usize) -> Vec<(u64, u64)> {
        let mut copying = self.lock();
        let mut runs = Vec::with_capacity(most);
        let mut at = at;
        while runs.len() < most {
            let Some((o, l)) = self.todo.take(at, COPY_CHUNK) else {
                break;
            };
            runs.push((o, l));
            at = o + l;
        }
        copying.extend_from_slice(&runs);
        runs
    }

    /// Ends the job's copies of `runs`: the failed ones are needed again.
    fn release(&self, runs: &[(u64, u64)], failed: impl Fn(usize) -> bool) {
        let mut copying = self.lock();
        for (i, &(o, l)) in runs.iter().enumerate() {
            if failed(i) {
                self.todo.mark(o, l);
            }
        }
        copying.retain(|r| !runs.contains(r));
        self.copied.notify_all();
    }
}

impl BeforeWrite for Copier {
    fn before_write(
        &self,
        offset: u64,
        len: u64,
        read: &dyn Fn(&mut [u8], u64) -> BlockResult<()>,
    ) -> BlockResult<()> {
        let mut copying = self.lock();
        // A run the job is copying is old data on its way to the target: wait for it.
        while copying
            .iter()
            .any(|&(o, l)| o < offset + len && offset < o + l)
        {
            copying = self.copied.wait(copying).unwrap_or_else(|e| e.into_inner());
        }
        let runs = self.todo.take_within(offset, len);
        let mut buf = Vec::new();
        for (i, &(o, l)) in runs.iter().enumerate() {
            if let Err(CopyError::Source(e) | CopyError::Target(e)) =
                copy_run(read, &self.target, o, l, &mut buf)
            {
                // Not copied: still needed (QEMU's on-cbw-error=break-guest-write: the
                // client's write fails and the old data stays for the job).
                for &(o, l) in &runs[i..] {
                    self.todo.mark(o, l);
                }
                return Err(e);
            }
        }
        drop(copying);
        Ok(())
    }
}

/// The job's bitmap while it runs (see the module doc).
#[derive(Debug)]
struct SyncBitmap {
    guard: BusyGuard,
    /// The bits it had at the start.
    before: DirtyMap,
    mode: BitmapSyncMode,
}

impl SyncBitmap {
    fn bitmap(&self) -> &Bitmap {
        self.guard.bitmap()
    }
}

/// The backup job's work.
#[derive(Debug)]
pub struct BackupDriver {
    source: Arc<ImageNode>,
    copier: Arc<Copier>,
    /// Copy nothing but what the hook copies; end only when cancelled.
    hook_only: bool,
    /// The progress total.
    total: u64,
    bitmap: Option<SyncBitmap>,
    on_source_error: BlockdevOnError,
    on_target_error: BlockdevOnError,
}

impl BackupDriver {
    fn done(&self) -> u64 {
        self.total.saturating_sub(self.copier.todo.dirty_bytes())
    }

    /// The job's copies: claims up to [`IN_FLIGHT`] chunks of `todo` at a time and copies
    /// them at once, until `todo` is empty.
    fn copy_all(
        &self,
        ctx: &mut JobCtx<'_, State>,
        workers: &mut Workers<'_>,
    ) -> Result<(), WorkError> {
        let mut at = 0;
        loop {
            ctx.checkpoint()?;
            let most = if ctx.rate_limited() { 1 } else { IN_FLIGHT };
            let runs = self.copier.claim(at, most);
            let Some(&(last, last_len)) = runs.last() else {
                return Ok(());
            };
            let results = workers.copy(&runs);
            self.copier.release(&runs, |i| results[i].is_err());
            let copied: u64 = (runs.iter().zip(&results))
                .filter(|(_, r)| r.is_ok())
                .map(|(&(_, l), _)| l)
                .sum();
            ctx.set_done(self.done());
            // The first failure (in offset order) decides, as one copy at a time would.
            let failed = runs
                .iter()
                .zip(results)
                .find_map(|(&(o, _), r)| r.err().map(|e| (o, e)));
            let Some((o, side)) = failed else {
                at = last + last_len;
                ctx.throttle(copied)?;
                continue;
            };
            at = o;
            let (policy, op, e) = match side {
                CopyError::Source(e) => (self.on_source_error, IoOperationType::Read, e),
                CopyError::Target(e) => (self.on_target_error, IoOperationType::Write, e),
            };
            tracing::warn!("blockdev-backup: {e}");
            let enospc = e.errno.0 == libc::ENOSPC;
            // As QEMU's backup: anything but report retries the range.
            if ctx.io_error_with(policy, op, enospc)? == ErrorAction::Report {
                return Err(WorkError::Failed(e.errno.describe()));
            }
        }
    }

    /// What `bitmap-mode` does at the end (QEMU's `backup_cleanup_sync_bitmap`).
    fn end_bitmap(&mut self, ok: bool) {
        let Some(b) = self.bitmap.take() else {
            return;
        };
        let keep_new = (ok || b.mode == BitmapSyncMode::Always) && b.mode != BitmapSyncMode::Never;
        if !keep_new {
            b.bitmap().map().merge_from(&b.before);
        } else if !ok {
            b.bitmap().map().merge_from(&self.copier.todo);
        }
    }
}

impl JobDriver<State> for BackupDriver {
    fn run(&mut self, ctx: &mut JobCtx<'_, State>) -> Result<(), WorkError> {
        ctx.set_total(self.total);
        if self.hook_only {
            // Clients' hooks copy; the job only publishes their progress, every 20 ms
            // while it runs and once more when cancelled, so the event's offset counts
            // every copy made before the cancel (qsd's counts them as they happen).
            loop {
                ctx.set_done(self.done());
                if let Err(e) = ctx.idle(std::time::Duration::from_millis(20)) {
                    ctx.set_done(self.done());
                    return Err(e);
                }
            }
        }
        let read = |buf: &mut [u8], offset| self.source.read(buf, offset);
        let copy = |o, l, buf: &mut Vec<u8>| copy_run(read, &self.copier.target, o, l, buf);
        with_workers(IN_FLIGHT, copy, |workers| self.copy_all(ctx, workers))?;
        ctx.set_done(self.total);
        Ok(())
    }

    fn prepare(&mut self, _st: &mut State) -> Result<(), String> {
        self.end_bitmap(true);
        Ok(())
    }

    fn abort(&mut self, _st: &mut State) {
        self.end_bitmap(false);
    }

    /// The hook goes (waiting for the writes in flight), the target is written back.
    fn clean(&mut self, _st: &mut State) {
        self.source.set_before_write(None);
        if let Err(e) = self.copier.target.flush() {
            tracing::warn!("blockdev-backup: flushing the target: {e}");
        }
        self.end_bitmap(false);
    }
}

/// A backup whose arguments passed every check, ready to start (a transaction's
/// `blockdev-backup` action is prepared with the others and started once all passed).
#[derive(Debug)]
pub struct PreparedBackup {
    params: JobParams,
    source: Arc<ImageNode>,
    target: Arc<ImageNode>,
    sync: MirrorSyncMode,
    bitmap: Option<(Arc<Bitmap>, BitmapSyncMode)>,
    on_source_error: BlockdevOnError,
    on_target_error: BlockdevOnError,
}

impl PreparedBackup {
    /// The job's id.
    pub fn id(&self) -> &str {
        &self.params.id
    }
}

fn generic(m: impl Into<String>) -> QmpError {
    QmpError::generic(m)
}

/// The checks of `blockdev-backup`, in qsd's order.
pub(crate) fn prepare(st: &State, args: BlockdevBackup) -> Result<PreparedBackup, QmpError> {
    let Some(device) = st.graph.get(&args.device) else {
        return Err(not_found(&args.device, &args.device));
    };
    let Some(target) = st.graph.get(&args.target) else {
        return Err(not_found(&args.target, &args.target));
    };
    let mut sync = args.sync;
    let mut mode = args.bitmap_mode;
    if matches!(sync, MirrorSyncMode::Bitmap | MirrorSyncMode::Incremental) && args.bitmap.is_none()
    {
        return Err(generic(format!(
            "must provide a valid bitmap name for '{sync}' sync mode"
        )));
    }
    if sync == MirrorSyncMode::Incremental {
        if mode.is_some_and(|m| m != BitmapSyncMode::OnSuccess) {
            return Err(generic(
                "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'",
            ));
        }
        sync = MirrorSyncMode::Bitmap;
        mode = Some(BitmapSyncMode::OnSuccess);
    }
    let mut bitmap = None;
    if let Some(name) = &args.bitmap {
        let Some(b) = device.bitmaps.get(name) else {
            return Err(generic(format!("Bitmap '{name}' could not be found")));
        };
        let Some(m) = mode else {
            return Err(generic(
                "Bitmap sync mode must be given when providing a bitmap",
            ));
        };
        b.check(Use::Read)
            .map_err(crate::graph::bitmaps::bitmap_error)?;
        if sync == MirrorSyncMode::None {
            return Err(generic(
                "sync mode 'none' does not produce meaningful bitmap outputs",
            ));
        }
        if m == BitmapSyncMode::Never && sync != MirrorSyncMode::Bitmap {
            return Err(generic(format!(
                "Bitmap sync mode 'never' has no meaningful effect when combined with sync \
                 mode '{sync}'"
            )));
        }
        bitmap = Some((b, m));
    } else if mode.is_some() {
        return Err(generic("Cannot specify bitmap sync mode without a bitmap"));
    }
    if device.name == target.name {
        return Err(generic("Source and target cannot be the same"));
    }
    if args.compress == Some(true) {
        return Err(generic(
            "blockdev-backup: 'compress' is not supported by sluice (back up uncompressed, \
             then 'qemu-img convert -c')",
        ));
    }
    if args.discard_source == Some(true) {
        return Err(generic(
            "blockdev-backup: 'discard-source' is not supported by sluice",
        ));
    }
    for n in [&device.name, &target.name] {
        if let Some(j) = st.jobs.using_node(n) {
            return Err(generic(format!(
                "Node '{n}' is busy: block device is in use by block job: {}",
                j.job_type
            )));
        }
    }
    if target.read_only {
        return Err(generic("Block node is read-only"));
    }
    let image = |n: &crate::graph::Node| {
        image_node(&n.opened).ok_or_else(|| {
            generic(format!(
                "blockdev-backup: node '{}' is not an image node (sluice backs up between \
                 file, raw and qcow2 nodes)",
                n.name
            ))
        })
    };
    let (source, target_image) = (image(device)?, image(target)?);
    if source.size() != target_image.size() {
        return Err(generic("Source and target image have different sizes"));
    }
    // The job's own checks, before anything changes (Job::start repeats them).
    let id = args.job_id.clone().unwrap_or_default();
    if !crate::graph::id_wellformed(&id) {
        return Err(generic(format!("Invalid job ID '{id}'")));
    }
    if st.jobs.get(&id).is_some() {
        return Err(generic(format!("Job ID '{id}' already in use")));
    }
    let speed = args.speed.unwrap_or(0);
    if speed < 0 {
        return Err(generic("Parameter 'speed' expects a non-negative value"));
    }
    let on_target_error = args.on_target_error.unwrap_or(BlockdevOnError::Report);
    Ok(PreparedBackup {
        params: JobParams {
            id,
            job_type: JobType::Backup,
            auto_finalize: args.auto_finalize.unwrap_or(true),
            auto_dismiss: args.auto_dismiss.unwrap_or(true),
            speed,
            on_error: on_target_error,
            nodes: vec![device.name.clone(), target.name.clone()],
            writes: vec![target.name.clone()],
            total: 0,
            completable: false,
        },
        source,
        target: target_image,
        sync,
        bitmap,
        on_source_error: args.on_source_error.unwrap_or(BlockdevOnError::Report),
        on_target_error,
    })
}

/// Starts a prepared backup: its first `todo`, the bitmap's hand-over, the hook, the job.
pub(crate) fn start(
    daemon: &Arc<Daemon>,
    st: &mut State,
    p: PreparedBackup,
) -> Result<(), QmpError> {
    let size = p.source.size();
    let cluster = p.target.cluster_size().max(MIN_CLUSTER);
    let todo = DirtyMap::new(size, cluster);
    let bitmap = p.bitmap.map(|(b, mode)| {
        let before = DirtyMap::new(b.map().size(), b.granularity());
        before.merge_from(b.map());
        b.map().clear();
        SyncBitmap {
            guard: b.hold(),
            before,
            mode,
        }
    });
    match p.sync {
        MirrorSyncMode::Top => {
            let mut depth = Extents::new(0, size);
            if let Err(e) = p.source.allocation_depth(size, 0, &mut depth) {
                if let Some(b) = &bitmap {
                    b.bitmap().map().merge_from(&b.before);
                }
                return Err(generic(format!("blockdev-backup: {e}")));
            }
            for e in depth.as_slice().iter().filter(|e| e.kind == 1) {
                todo.mark(e.offset, e.length);
            }
        }
        MirrorSyncMode::Bitmap | MirrorSyncMode::Incremental => {
            if let Some(b) = &bitmap {
                todo.merge_from(&b.before);
            }
        }
        MirrorSyncMode::Full | MirrorSyncMode::None => todo.mark(0, size),
    }
    let total = match p.sync {
        MirrorSyncMode::Bitmap | MirrorSyncMode::Incremental => todo.dirty_bytes(),
        _ => size,
    };
    let copier = Arc::new(Copier {
        todo,
        copying: Mutex::new(Vec::new()),
        copied: Condvar::new(),
        target: p.target,
    });
    p.source.set_before_write(Some(copier.clone()));
    let driver = BackupDriver {
        source: p.source.clone(),
        copier,
        hook_only: p.sync == MirrorSyncMode::None,
        total,
        bitmap,
        on_source_error: p.on_source_error,
        on_target_error: p.on_target_error,
    };
    let mut params = p.params;
    params.total = total;
    let source = p.source;
    Job::start(daemon, st, params, Box::new(driver))
        .map(|_| ())
        .inspect_err(|_| source.set_before_write(None))
}

/// The `blockdev-backup` command.
pub(crate) fn blockdev_backup(
    daemon: &Arc<Daemon>,
    st: &mut State,
    args: BlockdevBackup,
) -> Result<(), QmpError> {
    let p = prepare(st, args)?;
    start(daemon, st, p)
}
