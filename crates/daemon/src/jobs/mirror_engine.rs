//! The mirror engine: copy a live node into another while its clients keep writing, then
//! (optionally) pivot the node's requests to the copy. Active `block-commit` and
//! `blockdev-mirror` are both this engine with a different target and a different first
//! pass, as in QEMU, where active commit is a mirror job of type `commit`.
//!
//! How no write is lost (see `sluice_image::dirty`): before the job starts,
//! [`start_tracked`] installs a [`DirtyMap`] on the source's image node, which marks every
//! range a write, zero or trim changes once it has completed. The job first marks what
//! its sync mode copies ([`Initial`]), then takes dirty runs one at a time — a run is
//! cleared before it is read through the source and written into the target, so a write
//! landing meanwhile marks it again. When the map is first clean the target is flushed (as
//! QEMU's mirror does, so the pivot has little to write back) and the job is `ready`
//! (BLOCK_JOB_READY) and keeps mirroring new writes until `job-complete`; then, in the
//! kind's `prepare` (the daemon's state lock held), [`MirrorEngine::pivot`] holds the
//! source's requests off, copies what is still dirty, flushes the target and the source
//! (nothing reaches the source's own caches after the pivot) and redirects the
//! source node to the target ([`sluice_image::Node::pivot`]), and [`move_exports`] makes the
//! source's exports the target's in the graph. Open NBD connections keep their handle on
//! the source node, which now forwards to the target: they survive the pivot.
//!
//! A soft cancel (`block-job-cancel` without force while ready) copies what is dirty and
//! ends without the pivot. A failure or a forced cancel leaves the source as it was.
//!
//! Each step takes up to [`IN_FLIGHT`] dirty runs of at most [`MirrorEngine::step`] bytes
//! and copies them at once, each on its own thread (QEMU's mirror keeps up to 16 copies in
//! flight): while clients write, the runs are small and scattered, and one copy at a time
//! could not clean the map faster than the writes dirty it, so READY came late or not at
//! all. (Copies that do not wait for a disk are copied on the job's thread alone, which is
//! as fast with less CPU: see [`Workers`].) Each run is read through the source: a run
//! that reads as zeroes is written as a zero request (which keeps a sparse target sparse,
//! as QEMU's mirror does with block status), anything else as data. A failed read goes to
//! the on-source-error policy, a failed write to on-target-error; ranges skipped under
//! `ignore` stay dirty, so the pivot copies them or fails.
//!
//! [`ActiveSync`] is QEMU's `actively_synced` (what `query-block-jobs` reports of a mirror):
//! set when the job, in copy mode `write-blocking`, is ready and finds nothing dirty (from
//! then on every write completes on both sides), cleared when a write-blocking copy fails,
//! as `block/mirror.c` does.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sluice_block::extents::Extents;
use sluice_image::DirtyMap;

use crate::generated::{BlockdevOnError, IoOperationType};
use crate::jobs::{
    copy_run, with_workers, Completion, CopyError, ErrorAction, Job, JobCtx, JobDriver, JobParams,
    WorkError, Workers, Writeback, IN_FLIGHT,
};
use crate::state::{Daemon, State};
use crate::QmpError;

/// How long a ready job waits for new writes before it looks again (also the longest a
/// write waits to be mirrored).
const IDLE: Duration = Duration::from_millis(20);

/// What the first pass marks dirty (QEMU's sync modes, and active commit's layers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initial {
    /// The whole node (sync `full`: unallocated ranges are written as zeroes).
    All,
    /// What the layers above depth `n` hold, seen from the source (1 = the source itself):
    /// depths `1..n`. Sync `top` is `Above(2)`; an active commit into the layer at depth d
    /// is `Above(d)`.
    Above(u32),
    /// Nothing: only what clients write from now on (sync `none`).
    Nothing,
}

/// Which half of a copy failed.
/// A mirror's state (see the module doc): owned by the kind's driver.
#[derive(Debug)]
pub struct MirrorEngine {
    /// For log lines: the command that started the job.
    pub label: &'static str,
    /// The source (graph name, image node): the node clients write to.
    pub source: (String, Arc<sluice_image::Node>),
    /// Where the copy goes (a writable image node).
    pub target: Arc<sluice_image::Node>,
    /// What the source's clients changed and the job has not copied yet.
    pub dirty: Arc<DirtyMap>,
    /// The first pass.
    pub initial: Initial,
    /// The largest run copied in one step.
    pub step: u64,
    pub on_source_error: BlockdevOnError,
    pub on_target_error: BlockdevOnError,
    /// Fail at the start when the target's size differs from the source's (mirror; an
    /// active commit's base may be larger).
    pub same_size: bool,
    /// Set when the job was asked to complete (job-complete): prepare pivots.
    completed: bool,
    /// The copy mode and `actively-synced` (see the module doc).
    pub active: Arc<ActiveSync>,
    /// Starts the target's writeback as the job copies (it is flushed before READY).
    writeback: Writeback,
}

/// A mirror's copy mode and QEMU's `actively_synced` (see the module doc), shared by the
/// job, its write-blocking hook and `query-block-jobs`.
#[derive(Debug, Default)]
pub struct ActiveSync {
    /// Copy mode `write-blocking` is on.
    write_blocking: AtomicBool,
    /// QEMU's `actively_synced`.
    synced: Arc<AtomicBool>,
    /// The ranges being copied into the target, by the background copy or a write-blocking
    /// copy of a client's change (see [`WriteBlocking`]).
    copying: CopyLocks,
}

/// Ranges held while they are copied into the target: a copy of a range waits until no
/// overlapping one is in progress. Each copy reads the source while it holds its range, so
/// of two copies of the same bytes the later one carries the newer data.
///
/// Locks (as in `backup.rs`): a write-blocking copy waits here inside the source's gate
/// (shared), and a background copy, holding its range, reads the source through that gate
/// (shared). That is safe while nothing waits for the gate exclusively during the copy: the
/// hook is installed once, before any hook can wait (`block-job-change` to the mode already
/// set changes nothing), and the pivot and [`MirrorEngine::stop_tracking`] run after the
/// job's copy threads have ended. Backup's `Copier` keeps its in-flight runs the same way,
/// but under the lock of its own `todo` map, so the two do not share the type.
#[derive(Debug, Default)]
struct CopyLocks {
    held: std::sync::Mutex<Vec<(u64, u64)>>,
    freed: std::sync::Condvar,
}

/// A range of [`CopyLocks`], let go when dropped.
struct CopyGuard<'a> {
    locks: &'a CopyLocks,
    range: (u64, u64),
}

impl CopyLocks {
    fn lock(&self, offset: u64, len: u64) -> CopyGuard<'_> {
        let overlaps = |&(o, l): &(u64, u64)| o < offset + len && offset < o + l;
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        while held.iter().any(overlaps) {
            held = self.freed.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        held.push((offset, len));
        CopyGuard {
            locks: self,
            range: (offset, len),
        }
    }
}

impl Drop for CopyGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = held.iter().position(|&r| r == self.range) {
            held.swap_remove(i);
        }
        drop(held);
        self.locks.freed.notify_all();
    }
}

impl ActiveSync {
    /// The flag `query-block-jobs` reads ([`crate::jobs::Job::set_actively_synced`]).
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.synced.clone()
    }

    /// The job is ready and nothing is dirty: synced, if write-blocking.
    fn clean(&self) {
        if self.write_blocking.load(Ordering::Acquire) {
            self.synced.store(true, Ordering::Release);
        }
    }
}

impl MirrorEngine {
    /// An engine with a clean dirty map of `granularity` over the source.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        label: &'static str,
        source: (String, Arc<sluice_image::Node>),
        target: Arc<sluice_image::Node>,
        initial: Initial,
        granularity: u64,
        step: u64,
        on_source_error: BlockdevOnError,
        on_target_error: BlockdevOnError,
    ) -> MirrorEngine {
        let dirty = Arc::new(DirtyMap::new(source.1.size(), granularity));
        MirrorEngine {
            label,
            source,
            target,
            dirty,
            initial,
            step: step.max(granularity),
            on_source_error,
            on_target_error,
            same_size: false,
            completed: false,
            active: Arc::default(),
            writeback: Writeback::default(),
        }
    }

    /// True once `job-complete` ended the ready phase: prepare must pivot.
    pub fn wants_pivot(&self) -> bool {
        self.completed
    }

    /// Stops tracking the source's writes, and copying them if write-blocking
    /// (idempotent).
    pub fn stop_tracking(&self) {
        self.source.1.set_after_write(None);
        self.source.1.track_writes(None);
    }

    /// The first pass: marks what [`Initial`] says.
    fn mark_initial(&self, ctx: &mut JobCtx<'_, State>) -> Result<(), WorkError> {
        let depth = match self.initial {
            Initial::Nothing => return Ok(()),
            Initial::All => {
                self.dirty.mark(0, self.source.1.size());
                return Ok(());
            }
            Initial::Above(d) => d,
        };
        let src = &self.source.1;
        let size = src.size();
        let chunk = 1 << 30;
        let mut at = 0;
        while at < size {
            let n = chunk.min(size - at);
            let mut depths = Extents::new(at, at + n);
            src.allocation_depth(n, at, &mut depths).map_err(|e| {
                tracing::warn!("{} of '{}': {e}", self.label, self.source.0);
                WorkError::Failed(e.errno.describe())
            })?;
            for e in depths.as_slice() {
                if e.kind >= 1 && e.kind < depth {
                    self.dirty.mark(e.offset, e.length);
                }
            }
            ctx.checkpoint()?;
            at += n;
        }
        Ok(())
    }

    /// Copies one range from the source into the target (holding it against a
    /// write-blocking copy of the same bytes).
    fn copy(&self, offset: u64, len: u64, buf: &mut Vec<u8>) -> Result<(), CopyError> {
        let _held = self.active.copying.lock(offset, len);
        copy_run(
            |b, o| self.source.1.read(b, o),
            &self.target,
            offset,
            len,
            buf,
        )
    }

    /// One step: copies the next dirty runs, up to one per buffer, at once (applying the
    /// on-error policies in order). Ok(false) when nothing was dirty.
    fn step(
        &self,
        ctx: &mut JobCtx<'_, State>,
        cursor: &mut u64,
        workers: &mut Workers<'_>,
    ) -> Result<bool, WorkError> {
        let most = if ctx.rate_limited() { 1 } else { IN_FLIGHT };
        let mut runs = Vec::with_capacity(most);
        while runs.len() < most {
            let Some((offset, len)) = self.dirty.take(*cursor, self.step) else {
                break;
            };
            *cursor = offset + len;
            runs.push((offset, len));
        }
        if runs.is_empty() {
            return Ok(false);
        }
        let results = workers.copy(&runs);
        // Runs that failed go back into the map before any policy is applied, so a
        // reported error or a cancel leaves every uncopied byte dirty.
        let mut failed = None;
        let mut copied = 0;
        for (&(offset, len), r) in runs.iter().zip(results) {
            match r {
                Ok(()) => copied += len,
                Err(side) => {
                    self.dirty.mark(offset, len);
                    failed.get_or_insert(side);
                }
            }
        }
        if copied > 0 {
            ctx.progress(copied);
            ctx.set_remaining(self.dirty.dirty_bytes());
            self.writeback.copied(&self.target, copied);
        }
        if let Some(side) = failed {
            let (policy, op, e) = match side {
                CopyError::Source(e) => (self.on_source_error, IoOperationType::Read, e),
                CopyError::Target(e) => (self.on_target_error, IoOperationType::Write, e),
            };
            tracing::warn!("{} of '{}': {e}", self.label, self.source.0);
            let enospc = e.errno.0 == libc::ENOSPC;
            match ctx.io_error_with(policy, op, enospc)? {
                ErrorAction::Report => return Err(WorkError::Failed(e.errno.describe())),
                // Ignored ranges stay dirty: the pivot copies them or fails.
                ErrorAction::Retry | ErrorAction::Ignore => {}
            }
        }
        if copied > 0 {
            ctx.throttle(copied)?;
        }
        Ok(true)
    }

    /// Writes the target back before the job first becomes ready, as QEMU's mirror does:
    /// the pivot, which holds the source's requests off, then only flushes what was copied
    /// since. A failure goes to the on-target-error policy; Ok(false) to try again.
    fn flush_target(&self, ctx: &mut JobCtx<'_, State>) -> Result<bool, WorkError> {
        let Err(e) = self.target.flush() else {
            return Ok(true);
        };
        tracing::warn!("{} of '{}': {e}", self.label, self.source.0);
        let enospc = e.errno.0 == libc::ENOSPC;
        match ctx.io_error_with(self.on_target_error, IoOperationType::Write, enospc)? {
            ErrorAction::Report => Err(WorkError::Failed(e.errno.describe())),
            ErrorAction::Retry => Ok(false),
            ErrorAction::Ignore => {
                // QEMU retries too; not at once, so a flush that keeps failing is not a
                // busy loop of error events.
                ctx.idle(IDLE)?;
                Ok(false)
            }
        }
    }

    /// The job's work: the first pass, the copy, `ready`, mirroring until asked to end.
    pub fn run(&mut self, ctx: &mut JobCtx<'_, State>) -> Result<(), WorkError> {
        if self.same_size && self.source.1.size() != self.target.size() {
            return Err(WorkError::Failed(
                "Source and target image have different sizes".into(),
            ));
        }
        self.mark_initial(ctx)?;
        ctx.set_remaining(self.dirty.dirty_bytes());
        let mut cursor = 0;
        let mut ready = ctx.is_ready();
        let copy = |offset, len, buf: &mut Vec<u8>| self.copy(offset, len, buf);
        let completed = with_workers(IN_FLIGHT, copy, |workers| loop {
            match ctx.completion() {
                Some(Completion::Complete) => return Ok(true),
                Some(Completion::SoftCancel) => {
                    // The target gets what is dirty now; no pivot.
                    while self.step(ctx, &mut cursor, workers)? {}
                    return Ok(false);
                }
                None => {}
            }
            if self.step(ctx, &mut cursor, workers)? {
                continue;
            }
            if ready {
                self.active.clean();
                ctx.idle(IDLE)?;
            } else if self.flush_target(ctx)? {
                ctx.set_ready()?;
                ready = true;
            }
        })?;
        self.completed = completed;
        Ok(())
    }

    /// The pivot (see the module doc): on success the source's requests go to the target.
    pub fn pivot(&self) -> Result<(), String> {
        self.source
            .1
            .pivot(&self.dirty, self.target.clone())
            .map(|_| ())
            .map_err(|e| e.errno.describe())
    }
}

/// Makes the exports of graph node `from` exports of `to` (after a pivot); returns how
/// many moved.
pub fn move_exports(st: &mut State, from: &str, to: &str) -> usize {
    let mut moved = 0;
    for e in st.exports.iter_mut().filter(|e| e.node == from) {
        e.node = to.to_string();
        moved += 1;
    }
    if let Some(n) = st.graph.get_mut(from) {
        n.exports -= moved;
    }
    if let Some(n) = st.graph.get_mut(to) {
        n.exports += moved;
    }
    moved
}

/// What [`start_tracked`] installs: the source node and the map its writes mark (and the
/// target and the copy mode, for [`Tracking::write_blocking`]).
#[derive(Debug, Clone)]
pub struct Tracking(
    Arc<sluice_image::Node>,
    Arc<DirtyMap>,
    Arc<sluice_image::Node>,
    Arc<ActiveSync>,
);

impl MirrorEngine {
    /// What [`start_tracked`] needs of this engine (taken before the driver is boxed).
    pub fn tracking(&self) -> Tracking {
        Tracking(
            self.source.1.clone(),
            self.dirty.clone(),
            self.target.clone(),
            self.active.clone(),
        )
    }
}

/// Starts a mirror-engine job: tracking starts before the job exists, so every write from
/// now on is seen; if the job does not start, nothing tracks.
pub fn start_tracked(
    daemon: &Arc<Daemon>,
    st: &mut State,
    params: JobParams,
    tracking: Tracking,
    driver: Box<dyn JobDriver<State>>,
) -> Result<Arc<Job<State>>, QmpError> {
    let Tracking(source, dirty, ..) = tracking;
    source.track_writes(Some(dirty));
    let started = Job::start(daemon, st, params, driver);
    if started.is_err() {
        source.track_writes(None);
    }
    started
}

/// QEMU's `write-blocking` copy mode: each change of the source is copied to the target
/// before it completes (see `sluice_image::node::gate`), and, once copied, is not marked
/// in the job's dirty map: the background copy then only has to finish its own pass, so
/// the job gets to READY however fast clients write (in background mode a client that
/// dirties ranges faster than they are copied keeps it from ever getting there). The copy
/// reads the source and writes the target holding its range in [`CopyLocks`], as the
/// background copy does: a background copy that read the range before the change either
/// finished before this copy starts or starts after it ends, and reads the change then.
#[derive(Debug)]
struct WriteBlocking {
    target: Arc<sluice_image::Node>,
    active: Arc<ActiveSync>,
}

impl sluice_image::AfterWrite for WriteBlocking {
    fn after_write(
        &self,
        offset: u64,
        len: u64,
        read: &dyn Fn(&mut [u8], u64) -> sluice_block::Result<()>,
    ) -> sluice_block::Result<()> {
        let _held = self.active.copying.lock(offset, len);
        let r = copy_run(read, &self.target, offset, len, &mut Vec::new());
        if let Err(CopyError::Source(e) | CopyError::Target(e)) = r {
            // The target lacks this write: no longer in sync (block/mirror.c).
            self.active.synced.store(false, Ordering::Release);
            return Err(e);
        }
        Ok(())
    }
}

impl Tracking {
    /// Switches the mirror to write-blocking (idempotent: a second switch keeps the one
    /// hook). Called with the daemon's state lock held, while the job runs.
    pub fn write_blocking(&self) {
        let Tracking(source, _, target, active) = self;
        active.write_blocking.store(true, Ordering::Release);
        source.set_after_write(Some(Arc::new(WriteBlocking {
            target: target.clone(),
            active: active.clone(),
        })));
    }

    /// For a job ready from the start: synced at once if write-blocking and nothing was
    /// written since tracking began (as QEMU's first loop turn finds it, before the
    /// command's reply).
    pub fn clean_at_start(&self) {
        let Tracking(_, dirty, _, active) = self;
        if dirty.is_clean() {
            active.clean();
        }
    }
}
