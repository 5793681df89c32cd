//! Background jobs: one generic state machine, one set of verbs, QEMU's events.
//!
//! A job is what `block-stream`, `block-commit` and `blockdev-mirror` start: long work
//! that must not hold the monitor. Every kind shares [`Job`]: the status with QEMU's transition table
//! ([`transition_allowed`]), the verbs with QEMU's table of which state accepts which
//! ([`verb_allowed`]) and its refusal `Job 'x' in state 'y' cannot accept command verb 'z'`,
//! auto-finalize / auto-dismiss, progress, the rate limit and the on-error policy. A kind
//! only supplies a [`JobDriver`]: the work itself ([`JobDriver::run`]) and what happens to
//! the node graph at the end (prepare, abort, clean, as in QEMU's `JobDriver`).
//!
//! # Threads and locks
//!
//! Each job's work runs on its own OS thread: image I/O is blocking (see `sluice-image`),
//! and a job may run for minutes, so it must not sit on tokio's blocking pool that monitors
//! use for commands. The thread never holds the daemon's state lock while it works; it
//! shares a small [`Mutex`] + [`Condvar`] with the job's verbs:
//!
//! - Verbs (`job-pause`, `block-job-set-speed`, ...) run on a monitor's command thread with
//!   the state lock held, change the job's state under its mutex, emit the events, and wake
//!   the thread. Where QEMU's reply comes only after the effect, the verb waits on the
//!   condvar: `job-pause` until the thread has parked (so progress is frozen from the reply
//!   on), `job-cancel` until the work has stopped (so `aborting`, `BLOCK_JOB_CANCELLED`,
//!   `concluded` come before the reply, as in qsd). The thread only blocks on the state lock
//!   after it has published that its work is over, so these waits cannot deadlock.
//! - The thread calls [`JobCtx::checkpoint`] / [`JobCtx::throttle`] between chunks: there it
//!   parks while paused, sleeps for the rate limit (woken early by set-speed, pause or
//!   cancel), and stops when cancelled.
//! - The end of a job — prepare (graph and header changes), `BLOCK_JOB_COMPLETED`,
//!   `concluded`, `null` — runs with the state lock held: on the job thread when
//!   auto-finalize is on, else in `job-finalize`, or in the cancelling command. Whoever
//!   gets there first does it; [`Job::finish`] does nothing for a job already over.
//! - A new job's thread first takes the state lock once, so it starts only after the
//!   command that created it has finished; with the event sequence numbers (see
//!   [`crate::events`]) this puts `created`, `running` before the command's `return` and
//!   everything else after it, as qsd does.
//!
//! Lock order: daemon state, then a job's state, then its driver.

pub mod active_commit;
pub mod backup;
pub mod commands;
pub mod commit;
pub mod create;
pub mod drive_mirror;
pub mod mirror;
pub mod mirror_engine;
pub mod stream;

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::events::EventBus;
use crate::generated::{
    BlockDeviceIoStatus, BlockErrorAction, BlockJobCancelledEvent, BlockJobChangeOptions,
    BlockJobCompletedEvent, BlockJobErrorEvent, BlockJobInfo, BlockJobInfoBranch,
    BlockJobInfoMirror, BlockJobPendingEvent, BlockJobReadyEvent, BlockdevOnError, IoOperationType,
    JobInfo, JobStatus, JobStatusChangeEvent, JobType, JobVerb,
};
use crate::QmpError;

/// QEMU's `JobSTT`: may a job go from `from` to `to`?
pub fn transition_allowed(from: JobStatus, to: JobStatus) -> bool {
    use JobStatus::*;
    matches!(
        (from, to),
        (Undefined, Created)
            | (Created, Running | Aborting | Null)
            | (Running, Paused | Ready | Waiting | Aborting)
            | (Paused, Running)
            | (Ready, Standby | Waiting | Aborting)
            | (Standby, Ready)
            | (Waiting, Pending | Aborting)
            | (Pending, Aborting | Concluded)
            | (Aborting, Aborting | Concluded)
            | (Concluded, Null)
    )
}

/// QEMU's `JobVerbTable`: does a job in `status` accept `verb`?
pub fn verb_allowed(verb: JobVerb, status: JobStatus) -> bool {
    use JobStatus::*;
    match verb {
        JobVerb::Cancel => matches!(
            status,
            Created | Running | Paused | Ready | Standby | Waiting | Pending
        ),
        JobVerb::Pause | JobVerb::Resume | JobVerb::SetSpeed => {
            matches!(status, Created | Running | Paused | Ready | Standby)
        }
        JobVerb::Complete => matches!(status, Ready | Standby),
        JobVerb::Finalize => status == Pending,
        JobVerb::Dismiss => status == Concluded,
        JobVerb::Change => matches!(status, Running | Paused | Ready | Standby),
    }
}

/// What `block-job-change` does to a job of a kind that can change (mirror): set by the
/// kind when it starts the job, called with the state lock held.
pub type Changer = Arc<dyn Fn(&BlockJobChangeOptions) -> Result<(), QmpError> + Send + Sync>;

/// QEMU's split between generic jobs and block jobs: a `create` job is a plain job, with
/// no `BLOCK_JOB_*` events, not in `query-block-jobs` and not found by `block-job-*`.
pub fn is_block_job(t: JobType) -> bool {
    t != JobType::Create
}

/// The step of copying jobs ([`JobCtx::copy_in_chunks`]): progress and pause/cancel points
/// come at least this often (QEMU's stream and commit buffers are 512 KiB too).
pub const COPY_CHUNK: u64 = 512 * 1024;

/// Bytes a job copies into its target between two [`Writeback`] kicks.
pub const WRITEBACK_EVERY: u64 = 16 << 20;

/// Starts the writeback of a job's target as the job copies: every [`WRITEBACK_EVERY`]
/// bytes written into it, [`sluice_image::Node::start_writeback`] (a non-blocking
/// `sync_file_range`). For the jobs that flush their target before they end (mirror and
/// active commit before READY, commit at its end, stream every 256 MiB): without it the
/// kernel writes nothing back until the flush (its background threshold is a share of RAM),
/// so the disk idles while the job copies and then the job waits for all of it. Measured on
/// this machine kind: 1 GiB copied into a new file and fdatasync'ed took 0.75 s, with a
/// kick every 16 MiB 0.47 s; a `blockdev-mirror` of 1 GiB (bench/job-bench.py) see
/// bench/README.md. QEMU's jobs do not do this.
#[derive(Debug, Default)]
pub struct Writeback {
    pending: AtomicU64,
}

impl Writeback {
    /// `n` more bytes were written into `target`.
    pub fn copied(&self, target: &sluice_image::Node, n: u64) {
        let before = self.pending.fetch_add(n, Ordering::Relaxed);
        if before + n >= WRITEBACK_EVERY {
            self.pending.store(0, Ordering::Relaxed);
            target.start_writeback();
        }
    }
}

/// The most runs a mirror or a backup copies at once ([`Workers`]; see
/// `mirror_engine`'s module doc).
pub const IN_FLIGHT: usize = 8;

/// Which half of a copy failed ([`copy_run`]): the read of the source or the write of
/// the target, which have separate on-error policies in mirror and backup.
#[derive(Debug)]
pub enum CopyError {
    /// Reading the source failed.
    Source(sluice_block::BlockError),
    /// Writing the target failed.
    Target(sluice_block::BlockError),
}

/// Copies `[offset, offset+len)` from `read` into `target` through `buf`: a run that reads
/// as zeroes becomes a zero request (a sparse target stays sparse, as QEMU's mirror and
/// backup keep it with block status), anything else a write.
pub fn copy_run(
    read: impl FnOnce(&mut [u8], u64) -> sluice_block::Result<()>,
    target: &sluice_image::Node,
    offset: u64,
    len: u64,
    buf: &mut Vec<u8>,
) -> Result<(), CopyError> {
    buf.resize(len as usize, 0);
    read(buf, offset).map_err(CopyError::Source)?;
    let r = if buf.iter().all(|&b| b == 0) {
        target.zero(len, offset, true, false)
    } else {
        target.write(buf, offset)
    };
    r.map_err(CopyError::Target)
}

/// What [`Workers`] copy with: `copy(offset, len, buf)`.
type CopyFn<'a> = &'a (dyn Fn(u64, u64, &mut Vec<u8>) -> Result<(), CopyError> + Sync);

/// A run for a worker: its index in the batch, the run, a buffer.
type Work = (usize, (u64, u64), Vec<u8>);

/// A worker's answer: the index, the buffer back, the copy's result (or its panic).
type Done = (usize, Vec<u8>, std::thread::Result<Result<(), CopyError>>);

/// Threads that copy runs at once for a job (mirror's dirty runs, backup's chunks), started
/// once for the job's work by [`with_workers`]: a thread started per run cost more than a
/// 64 KiB copy (a backup with 5% dirty spent its time in `clone3` and `mmap`).
///
/// The workers only help when copies wait (for a disk, a cluster): copies that only spend
/// CPU, from and into the page cache, go no faster on more threads than the machine has
/// cores, and each run handed to a worker costs wake-ups and lock hand-offs. So a batch is
/// copied on the calling thread alone while its copies keep the thread busy (its CPU time
/// is at least half its wall time), and on the workers once they wait; after a number of
/// batches on the workers, one batch is copied alone again to see whether the copies still
/// wait: after [`PROBE_FIRST`] batches, then twice as many each time they still do, up to
/// [`PROBE_MOST`] (a batch copied alone while copies wait takes as long as several on the
/// workers: probing every 32 batches made a mirror from a cold disk 5% slower).
///
/// Measured with bench/job-bench.py at 2 GiB against the build that always used the
/// workers, in one interleaved run: an incremental backup (5% in 64 KiB runs) 1.69x the
/// MiB/s at 0.44x the CPU, a full backup 1.57x at 0.53x, an idle mirror 1.20x at 0.78x;
/// with `--cold` (the source read from the disk) all three within 3% of it.
pub struct Workers<'a> {
    copy: CopyFn<'a>,
    /// None without workers (`threads` 1).
    work: Option<std::sync::mpsc::Sender<Work>>,
    done: std::sync::mpsc::Receiver<Done>,
    /// Buffers not in use, kept between batches.
    spare: Vec<Vec<u8>>,
    /// Batches left before the next one is copied on the calling thread alone: 0 while the
    /// copies keep that thread busy.
    parallel_for: u32,
    /// How many batches go to the workers after the next batch copied alone that waits.
    probe_after: u32,
}

/// How many batches [`Workers`] copy on the workers, once copies wait, before they measure
/// again, alone, whether the copies still wait; doubled each time they do.
const PROBE_FIRST: u32 = 32;

/// The most batches [`Workers`] copy on the workers between two measurements.
const PROBE_MOST: u32 = 1024;

/// This thread's CPU time.
fn thread_cpu() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write into; the clock id is a constant.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs `body` with [`Workers`]: `threads - 1` threads beside the calling one, all copying
/// with `copy`; they end with `body`.
pub fn with_workers<T>(
    threads: usize,
    copy: impl Fn(u64, u64, &mut Vec<u8>) -> Result<(), CopyError> + Sync,
    body: impl FnOnce(&mut Workers<'_>) -> T,
) -> T {
    use std::sync::mpsc;
    let (work, queue) = mpsc::channel::<Work>();
    let queue = Mutex::new(queue);
    let (answer, done) = mpsc::channel::<Done>();
    let copy: CopyFn<'_> = &copy;
    std::thread::scope(|s| {
        for _ in 1..threads {
            let (queue, answer) = (&queue, answer.clone());
            s.spawn(move || loop {
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
                // The sender is gone: the job's work is over.
                let Ok((i, (offset, len), mut buf)) = next else {
                    break;
                };
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    copy(offset, len, &mut buf)
                }));
                if answer.send((i, buf, r)).is_err() {
                    break;
                }
            });
        }
        drop(answer);
        let mut workers = Workers {
            copy,
            work: (threads > 1).then_some(work),
            done,
            spare: Vec::new(),
            parallel_for: 0,
            probe_after: PROBE_FIRST,
        };
        body(&mut workers)
        // `workers` (the sender) is dropped here, before the scope joins the threads.
    })
}

impl Workers<'_> {
    /// Copies `runs`, on this thread alone or at once with the workers (the first run on
    /// this thread, the others on the workers; at most one run per thread is useful: the
    /// caller batches no more than it started), as the type's doc says; returns the
    /// results in the runs' order.
    pub fn copy(&mut self, runs: &[(u64, u64)]) -> Vec<Result<(), CopyError>> {
        if runs.len() > 1 && self.work.is_some() {
            if self.parallel_for > 0 {
                self.parallel_for -= 1;
            } else {
                return self.copy_alone(runs);
            }
        }
        self.copy_parallel(runs)
    }

    /// Copies `runs` one after the other on this thread, and goes to the workers for the
    /// next batches if the copies spent more than half their time waiting.
    fn copy_alone(&mut self, runs: &[(u64, u64)]) -> Vec<Result<(), CopyError>> {
        let (wall, cpu) = (std::time::Instant::now(), thread_cpu());
        let mut buf = self.spare.pop().unwrap_or_default();
        let results = runs
            .iter()
            .map(|&(offset, len)| (self.copy)(offset, len, &mut buf))
            .collect();
        self.spare.push(buf);
        if (thread_cpu().saturating_sub(cpu)) * 2 < wall.elapsed() {
            self.parallel_for = self.probe_after;
            self.probe_after = (self.probe_after * 2).min(PROBE_MOST);
        } else {
            self.probe_after = PROBE_FIRST;
        }
        results
    }

    /// Copies the first run on this thread and the others on the workers.
    fn copy_parallel(&mut self, runs: &[(u64, u64)]) -> Vec<Result<(), CopyError>> {
        let Some((&(offset, len), rest)) = runs.split_first() else {
            return Vec::new();
        };
        let mut results: Vec<Option<Result<(), CopyError>>> = runs.iter().map(|_| None).collect();
        let mut sent = 0;
        for (i, &run) in rest.iter().enumerate() {
            let buf = self.spare.pop().unwrap_or_default();
            let unsent = match &self.work {
                Some(work) => work.send((i + 1, run, buf)).err().map(|e| e.0),
                None => Some((i + 1, run, buf)),
            };
            if let Some((_, run, mut buf)) = unsent {
                // No worker: this thread copies it.
                results[i + 1] = Some((self.copy)(run.0, run.1, &mut buf));
                self.spare.push(buf);
            } else {
                sent += 1;
            }
        }
        let mut buf = self.spare.pop().unwrap_or_default();
        results[0] = Some((self.copy)(offset, len, &mut buf));
        self.spare.push(buf);
        for _ in 0..sent {
            let (i, buf, r) = self
                .done
                .recv()
                .expect("a worker answers every run it took");
            self.spare.push(buf);
            results[i] = Some(r.unwrap_or_else(|p| std::panic::resume_unwind(p)));
        }
        results
            .into_iter()
            .map(|r| r.expect("every run copied"))
            .collect()
    }
}

/// Why a job's work stopped early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkError {
    /// Cancelled by the user.
    Cancelled,
    /// Failed; the message is what `query-jobs` and `BLOCK_JOB_COMPLETED` report.
    Failed(String),
}

/// What a driver does after an I/O error, as the job's on-error policy decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAction {
    /// Fail the job with the error.
    Report,
    /// Skip the range and go on.
    Ignore,
    /// Retry the range (the job was stopped and has been resumed).
    Retry,
}

/// What the framework needs from the daemon that owns the jobs: its state lock (a job's
/// start waits for it, and a job's end runs under it) and its event delivery. The daemon's
/// state type `S` is a parameter, so that this module stays below the state it is part of.
pub trait JobHost<S>: Send + Sync {
    /// The daemon's state, locked.
    fn lock(&self) -> MutexGuard<'_, S>;
    /// Where job events go.
    fn events(&self) -> &EventBus;
}

/// The daemon state that holds the job table.
pub trait HasJobs: Sized + Send + 'static {
    fn jobs(&mut self) -> &mut Jobs<Self>;
}

/// The kind-specific part of a job.
pub trait JobDriver<S: HasJobs>: Send {
    /// True if the job has no work at all: it then runs through its states inside the
    /// creating command, before its reply, as QEMU's does when its coroutine returns
    /// before the first yield (a stream of a node without backing).
    fn nothing_to_do(&self) -> bool {
        false
    }

    /// True if the job is `ready` from the start: it then enters `ready` (with
    /// BLOCK_JOB_READY) inside the creating command, before its reply, as QEMU's mirror
    /// with nothing to copy first (sync `none`) does before its coroutine first yields.
    fn ready_at_start(&self) -> bool {
        false
    }

    /// The work, on the job thread; calls `ctx` between chunks.
    fn run(&mut self, ctx: &mut JobCtx<'_, S>) -> Result<(), WorkError>;

    /// At finalize, after success: make the job's changes (graph, image headers). An error
    /// fails the job instead.
    fn prepare(&mut self, _st: &mut S) -> Result<(), String> {
        Ok(())
    }

    /// After failure or cancel: undo what must be undone.
    fn abort(&mut self, _st: &mut S) {}

    /// In any case, at the end: release what the job held.
    fn clean(&mut self, _st: &mut S) {}
}

/// Parameters of a new job.
#[derive(Debug, Clone)]
pub struct JobParams {
    pub id: String,
    pub job_type: JobType,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
    /// Bytes per second; 0: unlimited (negative is refused, after the id checks, as QEMU).
    pub speed: i64,
    pub on_error: BlockdevOnError,
    /// Nodes the job uses: others may not start a job on them.
    pub nodes: Vec<String>,
    /// Those of `nodes` the job writes (a mirror's or backup's target, a commit's base, a
    /// stream's top): `blockdev-reopen` may not make them read-only while it runs.
    pub writes: Vec<String>,
    /// The progress total known at the start (a stream's or commit's size), so that
    /// queries right after the command see it, as in QEMU.
    pub total: u64,
    /// The kind has a `ready` phase that `job-complete` ends (mirror, active commit); a
    /// `block-job-cancel` without force then completes it without its final switch.
    pub completable: bool,
}

/// How a job in `ready` was asked to end (see [`JobCtx::completion`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// `job-complete` / `block-job-complete`: finish with the switch (the pivot).
    Complete,
    /// `block-job-cancel` without force: finish without it (QEMU's soft cancel).
    SoftCancel,
}

/// A job's mutable state (under [`Job::st`]).
#[derive(Debug)]
struct JobState {
    status: JobStatus,
    /// Paused by the user, or stopped by an error (QEMU's `user_paused`): resume needed.
    user_paused: bool,
    cancel: bool,
    /// The thread is working a chunk (not parked, not sleeping, not done).
    busy: bool,
    /// The thread is past its start gate; before that, cancel ends the job without it.
    started: bool,
    /// Set when the driver's work has returned.
    work_done: Option<Result<(), WorkError>>,
    /// Asked to end its `ready` phase.
    completion: Option<Completion>,
    speed: u64,
    /// The rate limiter must start a new window (speed changed, or the job was paused).
    new_window: bool,
    current: u64,
    total: u64,
    error: Option<String>,
    io_status: BlockDeviceIoStatus,
}

/// One job (see the module doc).
pub struct Job<S: HasJobs> {
    pub id: String,
    pub job_type: JobType,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
    on_error: BlockdevOnError,
    nodes: Vec<String>,
    writes: Vec<String>,
    completable: bool,
    st: Mutex<JobState>,
    cond: Condvar,
    driver: Mutex<Box<dyn JobDriver<S>>>,
    host: Weak<dyn JobHost<S>>,
    /// `block-job-change` (see [`Changer`]); unset: the kind cannot change.
    changer: std::sync::OnceLock<Changer>,
    /// A mirror's `actively-synced` (see [`Job::set_actively_synced`]).
    actively_synced: std::sync::OnceLock<Arc<AtomicBool>>,
}

impl<S: HasJobs> std::fmt::Debug for Job<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .field("type", &self.job_type)
            .field("state", &*self.lock())
            .finish_non_exhaustive()
    }
}

/// The jobs of a daemon (in the daemon's state), oldest first.
#[derive(Debug)]
pub struct Jobs<S: HasJobs> {
    list: Vec<Arc<Job<S>>>,
}

impl<S: HasJobs> Default for Jobs<S> {
    fn default() -> Self {
        Jobs { list: Vec::new() }
    }
}

impl<S: HasJobs> Jobs<S> {
    pub fn get(&self, id: &str) -> Option<Arc<Job<S>>> {
        self.list.iter().find(|j| j.id == id).cloned()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Job<S>>> {
        self.list.iter()
    }

    /// The job (not yet concluded) that uses `node`, if any.
    pub fn using_node(&self, node: &str) -> Option<&Arc<Job<S>>> {
        self.list.iter().find(|j| {
            j.nodes.iter().any(|n| n == node)
                && !matches!(j.status(), JobStatus::Concluded | JobStatus::Null)
        })
    }

    fn remove(&mut self, id: &str) {
        self.list.retain(|j| j.id != id);
    }
}

/// The refusal of a verb in the wrong state (QEMU's words).
fn verb_refused(id: &str, status: JobStatus, verb: JobVerb) -> QmpError {
    QmpError::generic(format!(
        "Job '{id}' in state '{status}' cannot accept command verb '{verb}'"
    ))
}

impl<S: HasJobs> Job<S> {
    /// Creates a job, registers it, emits `created` and `running`, and starts its thread.
    /// Checks the id first: well-formed and unused daemon-wide.
    pub fn start<H: JobHost<S> + 'static>(
        host: &Arc<H>,
        st: &mut S,
        params: JobParams,
        driver: Box<dyn JobDriver<S>>,
    ) -> Result<Arc<Job<S>>, QmpError> {
        if !crate::graph::id_wellformed(&params.id) {
            return Err(QmpError::generic(format!("Invalid job ID '{}'", params.id)));
        }
        if st.jobs().get(&params.id).is_some() {
            return Err(QmpError::generic(format!(
                "Job ID '{}' already in use",
                params.id
            )));
        }
        if params.speed < 0 {
            return Err(QmpError::generic(
                "Parameter 'speed' expects a non-negative value",
            ));
        }
        let job = Arc::new(Job {
            id: params.id,
            job_type: params.job_type,
            auto_finalize: params.auto_finalize,
            auto_dismiss: params.auto_dismiss,
            on_error: params.on_error,
            nodes: params.nodes,
            writes: params.writes,
            completable: params.completable,
            st: Mutex::new(JobState {
                status: JobStatus::Undefined,
                user_paused: false,
                cancel: false,
                busy: false,
                started: false,
                work_done: None,
                completion: None,
                speed: params.speed as u64,
                new_window: true,
                current: 0,
                total: params.total,
                error: None,
                io_status: BlockDeviceIoStatus::Ok,
            }),
            cond: Condvar::new(),
            driver: Mutex::new(driver),
            host: {
                let h: Arc<dyn JobHost<S>> = host.clone();
                Arc::downgrade(&h)
            },
            changer: std::sync::OnceLock::new(),
            actively_synced: std::sync::OnceLock::new(),
        });
        {
            let mut s = job.lock();
            job.set_status(&mut s, JobStatus::Created);
            job.set_status(&mut s, JobStatus::Running);
        }
        st.jobs().list.push(job.clone());
        let (trivial, ready) = {
            let d = job.driver.lock().unwrap_or_else(|e| e.into_inner());
            (d.nothing_to_do(), d.ready_at_start())
        };
        if ready {
            let mut s = job.lock();
            job.set_status(&mut s, JobStatus::Ready);
            job.emit_block(&BlockJobReadyEvent {
                r#type: job.job_type,
                device: job.id.clone(),
                len: s.total as i64,
                offset: s.current as i64,
                speed: s.speed as i64,
            });
        }
        if trivial {
            let mut s = job.lock();
            s.work_done = Some(Ok(()));
            job.set_status(&mut s, JobStatus::Waiting);
            job.set_status(&mut s, JobStatus::Pending);
            if job.auto_finalize {
                drop(s);
                job.finish(st);
            } else {
                job.emit_block(&BlockJobPendingEvent {
                    r#type: job.job_type,
                    id: job.id.clone(),
                });
                drop(s);
            }
            return Ok(job);
        }
        let j = job.clone();
        let d = job.host.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("job {}", job.id))
            .spawn(move || j.thread_main(d));
        if let Err(e) = spawned {
            // No thread: the job fails at once, as if its work had.
            job.lock().work_done = Some(Err(WorkError::Failed(format!(
                "cannot start a thread: {e}"
            ))));
            job.finish(st);
        }
        Ok(job)
    }

    fn lock(&self) -> MutexGuard<'_, JobState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The job's status now.
    pub fn status(&self) -> JobStatus {
        self.lock().status
    }

    /// Moves to `to` and emits JOB_STATUS_CHANGE (QEMU's table must allow it).
    fn set_status(&self, s: &mut JobState, to: JobStatus) {
        debug_assert!(
            transition_allowed(s.status, to),
            "job {}: {} -> {to}",
            self.id,
            s.status
        );
        s.status = to;
        tracing::info!(
            target: sluice_server::nbd::EVENTS,
            event = "job_status_change",
            job = %self.id,
            status = %to,
            error = s.error.as_deref().filter(|_| to == JobStatus::Concluded)
        );
        self.emit(&JobStatusChangeEvent {
            id: self.id.clone(),
            status: to,
            // sluice's addition: the outcome, on the event every job ends with.
            error: s.error.clone().filter(|_| to == JobStatus::Concluded),
        });
    }

    fn emit<E: sluice_qapi::runtime::QapiEvent>(&self, e: &E) {
        if let Some(h) = self.host.upgrade() {
            h.events().emit(e);
        }
    }

    /// Emits a `BLOCK_JOB_*` event, if this job is a block job (see [`is_block_job`]).
    fn emit_block<E: sluice_qapi::runtime::QapiEvent>(&self, e: &E) {
        if is_block_job(self.job_type) {
            self.emit(e);
        }
    }

    /// True if this is a block job (listed by `query-block-jobs`, found by `block-job-*`).
    /// The nodes the job uses (see [`JobParams::nodes`]).
    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    /// The nodes the job writes (see [`JobParams::writes`]).
    pub fn writes(&self) -> &[String] {
        &self.writes
    }

    pub fn is_block(&self) -> bool {
        is_block_job(self.job_type)
    }

    fn check_verb(&self, s: &JobState, verb: JobVerb) -> Result<(), QmpError> {
        if verb_allowed(verb, s.status) {
            Ok(())
        } else {
            Err(verb_refused(&self.id, s.status, verb))
        }
    }

    fn thread_main(self: Arc<Job<S>>, host: Weak<dyn JobHost<S>>) {
        // Start only once the creating command is over (see the module doc).
        match host.upgrade() {
            Some(h) => drop(h.lock()),
            None => return,
        }
        {
            let mut s = self.lock();
            if s.work_done.is_some() {
                return; // Cancelled before it began.
            }
            s.started = true;
        }
        let mut ctx = JobCtx {
            job: &self,
            window: None,
        };
        let r = {
            let mut drv = self.driver.lock().unwrap_or_else(|e| e.into_inner());
            // Pause points before and after: a job paused during its last chunk stays
            // paused here.
            ctx.checkpoint()
                .and_then(|()| drv.run(&mut ctx))
                .and_then(|()| ctx.checkpoint())
        };
        let ok = r.is_ok();
        {
            let mut s = self.lock();
            s.busy = false;
            s.work_done = Some(r);
            self.cond.notify_all();
            if s.cancel {
                // The cancelling command is waiting for this and ends the job itself.
                return;
            }
        }
        // What follows happens under the state lock, so that a command that let the job
        // finish (job-resume, set-speed, job-complete) has its reply before these events,
        // as in qsd, whose jobs only run when the monitor is idle.
        let Some(d) = host.upgrade() else { return };
        loop {
            let mut st = d.lock();
            let mut s = self.lock();
            if s.user_paused && !s.cancel {
                // Paused after its work was done: it stays paused until resumed (or
                // cancelled), without holding the state lock the verbs need.
                drop(st);
                drop(
                    self.cond
                        .wait_while(s, |s| s.user_paused && !s.cancel)
                        .unwrap_or_else(|e| e.into_inner()),
                );
                continue;
            }
            if s.cancel || !matches!(s.status, JobStatus::Running | JobStatus::Ready) {
                return; // A cancel got the state lock first and ended the job.
            }
            if ok {
                self.set_status(&mut s, JobStatus::Waiting);
                self.set_status(&mut s, JobStatus::Pending);
                if !self.auto_finalize {
                    self.emit_block(&BlockJobPendingEvent {
                        r#type: self.job_type,
                        id: self.id.clone(),
                    });
                    return;
                }
            }
            drop(s);
            self.finish(&mut st);
            return;
        }
    }

    /// Ends the job (with the state lock held): prepare/commit or abort, the completion
    /// event, `concluded`, and `null` with auto-dismiss. Nothing if the job is already over
    /// or its work is still running.
    fn finish(&self, st: &mut S) {
        let mut s = self.lock();
        if s.work_done.is_none()
            || matches!(
                s.status,
                JobStatus::Aborting | JobStatus::Concluded | JobStatus::Null
            )
        {
            return;
        }
        let mut drv = self.driver.lock().unwrap_or_else(|e| e.into_inner());
        let failure = match (&s.work_done, s.cancel) {
            (_, true) => Some(WorkError::Cancelled),
            (Some(Err(e)), false) => Some(e.clone()),
            _ => match drv.prepare(st) {
                Ok(()) => None,
                Err(m) => Some(WorkError::Failed(m)),
            },
        };
        let (len, offset, speed) = (s.total as i64, s.current as i64, s.speed as i64);
        match failure {
            None => {
                self.emit_block(&BlockJobCompletedEvent {
                    r#type: self.job_type,
                    device: self.id.clone(),
                    len,
                    offset,
                    speed,
                    error: None,
                });
            }
            Some(f) => {
                self.set_status(&mut s, JobStatus::Aborting);
                drv.abort(st);
                match f {
                    WorkError::Cancelled => {
                        s.error = Some("Operation canceled".to_string());
                        self.emit_block(&BlockJobCancelledEvent {
                            r#type: self.job_type,
                            device: self.id.clone(),
                            len,
                            offset,
                            speed,
                        });
                    }
                    WorkError::Failed(m) => {
                        s.error = Some(m.clone());
                        self.emit_block(&BlockJobCompletedEvent {
                            r#type: self.job_type,
                            device: self.id.clone(),
                            len,
                            offset,
                            speed,
                            error: Some(m),
                        });
                    }
                }
            }
        }
        drv.clean(st);
        self.set_status(&mut s, JobStatus::Concluded);
        if self.auto_dismiss {
            self.set_status(&mut s, JobStatus::Null);
            drop(s);
            st.jobs().remove(&self.id);
        }
    }

    /// Gives `query-block-jobs` a mirror's `actively-synced` flag, which the kind keeps
    /// (QEMU's `mirror_query`); once. A mirror job without one reports false.
    pub fn set_actively_synced(&self, flag: Arc<AtomicBool>) {
        let _ = self.actively_synced.set(flag);
    }

    /// Lets `block-job-change` change this job (see [`Changer`]); once.
    pub fn set_changer(&self, changer: Changer) {
        let _ = self.changer.set(changer);
    }

    /// `block-job-change`: QEMU's verb check, then the kind's change.
    pub fn change(&self, opts: &BlockJobChangeOptions) -> Result<(), QmpError> {
        self.check_verb(&self.lock(), JobVerb::Change)?;
        match self.changer.get() {
            Some(c) => c(opts),
            None => Err(QmpError::generic("Job type does not support change")),
        }
    }

    /// `job-pause`: the reply comes once the job has stopped working.
    pub fn pause(&self) -> Result<(), QmpError> {
        let mut s = self.lock();
        self.check_verb(&s, JobVerb::Pause)?;
        if s.user_paused {
            return Err(QmpError::generic("Job is already paused"));
        }
        s.user_paused = true;
        s.new_window = true;
        match s.status {
            JobStatus::Running => self.set_status(&mut s, JobStatus::Paused),
            JobStatus::Ready => self.set_status(&mut s, JobStatus::Standby),
            _ => {}
        }
        self.cond.notify_all();
        let _s = self
            .cond
            .wait_while(s, |s| s.busy)
            .unwrap_or_else(|e| e.into_inner());
        Ok(())
    }

    /// `job-resume` (also after an error stopped the job).
    pub fn resume(&self) -> Result<(), QmpError> {
        let mut s = self.lock();
        if !s.user_paused {
            return Err(QmpError::generic("Can't resume a job that was not paused"));
        }
        self.check_verb(&s, JobVerb::Resume)?;
        self.unpause(&mut s);
        Ok(())
    }

    fn unpause(&self, s: &mut JobState) {
        s.user_paused = false;
        s.io_status = BlockDeviceIoStatus::Ok;
        match s.status {
            JobStatus::Paused => self.set_status(s, JobStatus::Running),
            JobStatus::Standby => self.set_status(s, JobStatus::Ready),
            _ => {}
        }
        self.cond.notify_all();
    }

    /// `block-job-set-speed`.
    pub fn set_speed(&self, speed: i64) -> Result<(), QmpError> {
        let mut s = self.lock();
        self.check_verb(&s, JobVerb::SetSpeed)?;
        if speed < 0 {
            return Err(QmpError::generic(
                "Parameter 'speed' expects a non-negative value",
            ));
        }
        s.speed = speed as u64;
        s.new_window = true;
        self.cond.notify_all();
        Ok(())
    }

    /// `job-cancel` / `block-job-cancel`: stops the work and ends the job before returning.
    /// `force` false refuses a paused job (block-job-cancel's rule).
    pub fn cancel(&self, st: &mut S, force: bool) -> Result<(), QmpError> {
        {
            let mut s = self.lock();
            if s.user_paused && !force {
                return Err(QmpError::generic(format!(
                    "The block job for device '{}' is currently paused",
                    self.id
                )));
            }
            self.check_verb(&s, JobVerb::Cancel)?;
            if !force
                && self.completable
                && matches!(s.status, JobStatus::Ready | JobStatus::Standby)
            {
                // QEMU's soft cancel of a ready job: it completes, without its switch.
                s.completion = Some(Completion::SoftCancel);
                self.cond.notify_all();
                return Ok(());
            }
            s.cancel = true;
            if s.user_paused {
                self.unpause(&mut s);
            }
            self.cond.notify_all();
            if !s.started && s.work_done.is_none() {
                s.work_done = Some(Err(WorkError::Cancelled));
            }
            let _s = self
                .cond
                .wait_while(s, |s| s.work_done.is_none())
                .unwrap_or_else(|e| e.into_inner());
        }
        self.finish(st);
        Ok(())
    }

    /// `job-complete`: ends the `ready` phase (also while paused in `standby`: the job
    /// completes once resumed, as in QEMU).
    pub fn complete(&self) -> Result<(), QmpError> {
        let mut s = self.lock();
        self.check_verb(&s, JobVerb::Complete)?;
        if !self.completable || s.cancel {
            return Err(QmpError::generic(format!(
                "The active block job '{}' cannot be completed",
                self.id
            )));
        }
        s.completion = Some(Completion::Complete);
        self.cond.notify_all();
        Ok(())
    }

    /// `job-finalize`.
    pub fn finalize(&self, st: &mut S) -> Result<(), QmpError> {
        self.check_verb(&self.lock(), JobVerb::Finalize)?;
        self.finish(st);
        Ok(())
    }

    /// `job-dismiss`.
    pub fn dismiss(&self, st: &mut S) -> Result<(), QmpError> {
        {
            let mut s = self.lock();
            self.check_verb(&s, JobVerb::Dismiss)?;
            self.set_status(&mut s, JobStatus::Null);
        }
        st.jobs().remove(&self.id);
        Ok(())
    }

    /// What `query-jobs` says.
    pub fn info(&self) -> JobInfo {
        let s = self.lock();
        JobInfo {
            id: self.id.clone(),
            r#type: self.job_type,
            status: s.status,
            current_progress: s.current as i64,
            total_progress: s.total as i64,
            error: s.error.clone(),
        }
    }

    /// What `query-block-jobs` says: the common members, and a mirror's own (QEMU 10's
    /// union on `type`).
    pub fn block_info(&self) -> BlockJobInfo {
        let s = self.lock();
        let u = match self.job_type {
            JobType::Mirror => BlockJobInfoBranch::Mirror(BlockJobInfoMirror {
                actively_synced: self
                    .actively_synced
                    .get()
                    .is_some_and(|f| f.load(Ordering::Acquire)),
            }),
            JobType::Commit => BlockJobInfoBranch::Commit,
            JobType::Stream => BlockJobInfoBranch::Stream,
            JobType::Create => BlockJobInfoBranch::Create,
            JobType::Backup => BlockJobInfoBranch::Backup,
        };
        BlockJobInfo {
            u,
            device: self.id.clone(),
            len: s.total as i64,
            offset: s.current as i64,
            // A job whose thread has not started yet is about to work (QEMU: busy), unless
            // it is ready from the start (then it waits, as QEMU's does).
            busy: (s.busy && matches!(s.status, JobStatus::Running | JobStatus::Ready))
                || (!s.started && s.work_done.is_none() && s.status == JobStatus::Running),
            paused: s.user_paused,
            speed: s.speed as i64,
            io_status: s.io_status,
            ready: matches!(s.status, JobStatus::Ready | JobStatus::Standby),
            status: s.status,
            auto_finalize: self.auto_finalize,
            auto_dismiss: self.auto_dismiss,
            error: s.error.clone(),
        }
    }
}

/// What a driver's work sees of its job: progress, pause points, the rate limit, errors.
pub struct JobCtx<'a, S: HasJobs> {
    job: &'a Job<S>,
    /// Start of the rate limiter's window and the bytes charged in it.
    window: Option<(Instant, u64)>,
}

impl<S: HasJobs> std::fmt::Debug for JobCtx<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobCtx")
            .field("job", &self.job.id)
            .finish_non_exhaustive()
    }
}

impl<S: HasJobs> JobCtx<'_, S> {
    /// Sets the total progress (bytes for block jobs).
    pub fn set_total(&mut self, total: u64) {
        self.job.lock().total = total;
    }

    /// Adds to the progress done.
    pub fn progress(&mut self, n: u64) {
        self.job.lock().current += n;
    }

    /// Sets the progress done (a backup's, whose copies also happen outside the job's
    /// thread, in clients' copy-before-write).
    pub fn set_done(&mut self, current: u64) {
        self.job.lock().current = current;
    }

    /// Sets the work still to do: the total becomes what is done plus `remaining` (a job
    /// whose work grows, like QEMU's mirror: its `len` follows new writes).
    pub fn set_remaining(&mut self, remaining: u64) {
        let mut s = self.job.lock();
        s.total = s.current + remaining;
    }

    /// Enters `ready` and emits BLOCK_JOB_READY (after a pause point: a paused job gets
    /// there once resumed). Err if cancelled.
    pub fn set_ready(&mut self) -> Result<(), WorkError> {
        let s = self.job.lock();
        let mut s = self.park(s);
        if s.cancel {
            return Err(WorkError::Cancelled);
        }
        self.job.set_status(&mut s, JobStatus::Ready);
        self.job.emit_block(&BlockJobReadyEvent {
            r#type: self.job.job_type,
            device: self.job.id.clone(),
            len: s.total as i64,
            offset: s.current as i64,
            speed: s.speed as i64,
        });
        Ok(())
    }

    /// True once the job is `ready` (or paused in `standby`), also when it was ready from
    /// the start ([`JobDriver::ready_at_start`]).
    pub fn is_ready(&self) -> bool {
        matches!(
            self.job.lock().status,
            JobStatus::Ready | JobStatus::Standby
        )
    }

    /// How the job was asked to end its `ready` phase, if it was.
    pub fn completion(&self) -> Option<Completion> {
        self.job.lock().completion
    }

    /// Waits, not busy, up to `timeout` or until a verb wakes the job; also a pause
    /// point. Err if cancelled.
    pub fn idle(&mut self, timeout: Duration) -> Result<(), WorkError> {
        let mut s = self.job.lock();
        if s.completion.is_none() && !s.cancel && !s.user_paused {
            s.busy = false;
            self.job.cond.notify_all();
            s = self
                .job
                .cond
                .wait_timeout(s, timeout)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let s = self.park(s);
        if s.cancel {
            return Err(WorkError::Cancelled);
        }
        Ok(())
    }

    /// A pause point: parks while the job is paused; Err if it was cancelled.
    pub fn checkpoint(&mut self) -> Result<(), WorkError> {
        let s = self.job.lock();
        let s = self.park(s);
        if s.cancel {
            return Err(WorkError::Cancelled);
        }
        Ok(())
    }

    /// Parks while paused (busy false meanwhile; the window restarts after).
    fn park<'g>(&self, mut s: MutexGuard<'g, JobState>) -> MutexGuard<'g, JobState> {
        if s.user_paused && !s.cancel {
            s.busy = false;
            self.job.cond.notify_all();
            s = self
                .job
                .cond
                .wait_while(s, |s| s.user_paused && !s.cancel)
                .unwrap_or_else(|e| e.into_inner());
            s.new_window = true;
        }
        s.busy = true;
        s
    }

    /// True while the job has a speed limit (`speed`, `block-job-set-speed`): a job that
    /// copies several ranges at once copies one at a time then, so the limit is kept in
    /// small steps.
    pub fn rate_limited(&self) -> bool {
        self.job.lock().speed != 0
    }

    /// Charges `bytes` of I/O to the rate limit and sleeps until the average since the
    /// window began is back under the speed; also a pause point. Err if cancelled. A new
    /// speed, or a pause, starts a new window (what was charged before is forgiven).
    pub fn throttle(&mut self, bytes: u64) -> Result<(), WorkError> {
        let mut s = self.job.lock();
        let mut charge = bytes;
        loop {
            s = self.park(s);
            if s.cancel {
                return Err(WorkError::Cancelled);
            }
            if s.speed == 0 {
                self.window = None;
                return Ok(());
            }
            if s.new_window || self.window.is_none() {
                s.new_window = false;
                self.window = Some((Instant::now(), 0));
            }
            let (start, charged) = self.window.as_mut().expect("set above");
            *charged += std::mem::take(&mut charge);
            let due = *start + Duration::from_secs_f64(*charged as f64 / s.speed as f64);
            let now = Instant::now();
            if now >= due {
                return Ok(());
            }
            s.busy = false;
            self.job.cond.notify_all();
            s = self
                .job
                .cond
                .wait_timeout(s, due - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The loop of a copying job (stream, commit): walks `[0, size)` in [`COPY_CHUNK`] steps,
    /// calling `copy(offset, len)` (which returns the bytes it really copied, what the rate
    /// limit charges), reporting progress, and applying the on-error policy to failures: a
    /// write-side errno (ENOSPC, EROFS) is a write error, anything else a read error. A
    /// range skipped under `ignore` was not copied, so the job then fails at the end (its
    /// graph change would lose that data), as QEMU's stream does.
    pub fn copy_in_chunks(
        &mut self,
        size: u64,
        mut copy: impl FnMut(u64, u64) -> sluice_block::Result<u64>,
    ) -> Result<(), WorkError> {
        self.set_total(size);
        let mut offset = 0;
        let mut skipped = None;
        while offset < size {
            let n = COPY_CHUNK.min(size - offset);
            match copy(offset, n) {
                Ok(copied) => self.throttle(copied)?,
                Err(e) => {
                    tracing::warn!("job '{}': {e}", self.job.id);
                    match self.block_error(&e)? {
                        ErrorAction::Report => return Err(WorkError::Failed(e.errno.describe())),
                        ErrorAction::Retry => continue,
                        ErrorAction::Ignore => skipped = Some(e.errno.describe()),
                    }
                }
            }
            self.progress(n);
            offset += n;
        }
        match skipped {
            Some(m) => Err(WorkError::Failed(m)),
            None => Ok(()),
        }
    }

    /// [`JobCtx::io_error`] for a failed copy: a write-side errno (ENOSPC, EROFS) is a write
    /// error, anything else a read error.
    pub fn block_error(&mut self, e: &sluice_block::BlockError) -> Result<ErrorAction, WorkError> {
        let enospc = e.errno.0 == libc::ENOSPC;
        let op = if enospc || e.errno.0 == libc::EROFS {
            IoOperationType::Write
        } else {
            IoOperationType::Read
        };
        self.io_error(op, enospc)
    }

    /// Applies the on-error policy to a failed operation: emits BLOCK_JOB_ERROR and, for
    /// stop (and enospc on ENOSPC), stops the job until resumed (then [`ErrorAction::Retry`])
    /// or cancelled (then Err).
    pub fn io_error(
        &mut self,
        op: IoOperationType,
        enospc: bool,
    ) -> Result<ErrorAction, WorkError> {
        self.io_error_with(self.job.on_error, op, enospc)
    }

    /// [`JobCtx::io_error`] under `policy` rather than the job's on-error (mirror has one
    /// policy for the source and one for the target).
    pub fn io_error_with(
        &mut self,
        policy: BlockdevOnError,
        op: IoOperationType,
        enospc: bool,
    ) -> Result<ErrorAction, WorkError> {
        let action = match policy {
            BlockdevOnError::Report | BlockdevOnError::Auto => BlockErrorAction::Report,
            BlockdevOnError::Ignore => BlockErrorAction::Ignore,
            BlockdevOnError::Stop => BlockErrorAction::Stop,
            BlockdevOnError::Enospc if enospc => BlockErrorAction::Stop,
            BlockdevOnError::Enospc => BlockErrorAction::Report,
        };
        let mut s = self.job.lock();
        self.job.emit_block(&BlockJobErrorEvent {
            device: self.job.id.clone(),
            operation: op,
            action,
        });
        match action {
            BlockErrorAction::Report => Ok(ErrorAction::Report),
            BlockErrorAction::Ignore => Ok(ErrorAction::Ignore),
            BlockErrorAction::Stop => {
                s.user_paused = true;
                s.io_status = if enospc {
                    BlockDeviceIoStatus::Nospace
                } else {
                    BlockDeviceIoStatus::Failed
                };
                if s.status == JobStatus::Running {
                    self.job.set_status(&mut s, JobStatus::Paused);
                }
                drop(s);
                self.checkpoint()?;
                Ok(ErrorAction::Retry)
            }
        }
    }
}
