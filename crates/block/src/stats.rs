//! I/O statistics of an export or a node: what `query-blockstats` and `/metrics` report.
//!
//! The request path records every finished NBD request here ([`BlockStats::record`]), so the
//! counters must cost next to nothing and must not make the worker threads of one export
//! fight over a cache line. They are therefore **sharded**: a [`BlockStats`] holds
//! [`SHARDS`] cache-line-aligned blocks of relaxed atomics, and each thread writes to the
//! shard its thread-local index picks (threads are numbered round-robin on first use). A
//! worker thread thus always adds to the same lines, which stay in its core's cache; readers
//! (a QMP query, a Prometheus scrape) add the shards up, which is rare and may be slow. A
//! snapshot is not atomic across counters (one request may be half counted while a scrape
//! runs); each counter on its own is exact once the requests have finished.
//!
//! What is kept per operation ([`Op`], one per NBD command that reaches the plugin):
//! successful operations, their bytes and their total time, failed and invalid counts, and
//! a latency histogram with power-of-two nanosecond buckets (one `leading_zeros` to place a
//! sample; the buckets are fixed so Prometheus can sum them over time and instances).
//! *Invalid* means refused before the plugin did any work (EINVAL: bad flags, range
//! outside the export, over the maximum size; EPERM: a write to a read-only export), as
//! QEMU's `invalid_*_operations`; any other error is *failed*. Per errno error counts are
//! kept under a mutex, since only the failure path takes it.
//!
//! QEMU's `block-latency-histogram-set` histograms have boundaries chosen by the user, so
//! they cannot be derived from the fixed buckets: when one is set, requests of that kind
//! also add to its bins (shared atomics behind a read-mostly lock, taken only while some
//! histogram is set, which is the operator's choice to pay for).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Instant;

use crate::error::Errno;

/// Shards per [`BlockStats`]: enough that the worker threads of a busy export rarely share
/// one on this kind of machine, few enough that a scrape adding them up stays cheap.
pub const SHARDS: usize = 16;

/// Latency buckets: bucket `i` counts requests that took less than `2^(FIRST_BUCKET_LOG2+i)`
/// ns (bucket 0: under ~1 µs), the last one everything slower (Prometheus' `+Inf`).
pub const BUCKETS: usize = 26;
/// Upper bound of the first latency bucket, as a power of two of nanoseconds.
pub const FIRST_BUCKET_LOG2: u32 = 10;

/// An NBD operation as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    Read,
    Write,
    Zero,
    Trim,
    Flush,
    Cache,
    BlockStatus,
}

impl Op {
    pub const ALL: [Op; 7] = [
        Op::Read,
        Op::Write,
        Op::Zero,
        Op::Trim,
        Op::Flush,
        Op::Cache,
        Op::BlockStatus,
    ];

    /// The name used as a metric label.
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Zero => "zero",
            Op::Trim => "trim",
            Op::Flush => "flush",
            Op::Cache => "cache",
            Op::BlockStatus => "block_status",
        }
    }
}

const OPS: usize = Op::ALL.len();

/// How a request ended, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Refused before the plugin did any work (see the module doc).
    Invalid(Errno),
    Failed(Errno),
}

impl Outcome {
    /// The outcome of a request that failed with `errno`: EINVAL and EPERM are invalid.
    pub fn of_error(errno: Errno) -> Outcome {
        if errno == Errno::EINVAL || errno == Errno::EPERM {
            Outcome::Invalid(errno)
        } else {
            Outcome::Failed(errno)
        }
    }
}

/// The kinds of request a `block-latency-histogram-set` histogram is kept for (QEMU's; zone
/// append has no NBD counterpart and is never counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistKind {
    Read,
    Write,
    ZoneAppend,
    Flush,
}

impl HistKind {
    const ALL: [HistKind; 4] = [
        HistKind::Read,
        HistKind::Write,
        HistKind::ZoneAppend,
        HistKind::Flush,
    ];

    /// QEMU's accounting kind of an NBD operation (virtio-blk's: write zeroes is a write,
    /// discard has no histogram).
    fn of(op: Op) -> Option<HistKind> {
        match op {
            Op::Read => Some(HistKind::Read),
            Op::Write | Op::Zero => Some(HistKind::Write),
            Op::Flush => Some(HistKind::Flush),
            _ => None,
        }
    }
}

/// Nanoseconds since the first use of the statistics in this process: one clock for every
/// [`BlockStats`], so the same reading can be recorded into several.
pub fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    INDEX.with(|i| *i)
}

#[derive(Default)]
struct OpCounters {
    ok: AtomicU64,
    bytes: AtomicU64,
    time_ns: AtomicU64,
    failed: AtomicU64,
    invalid: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
}

/// One thread group's counters, on cache lines of its own.
#[repr(align(128))]
#[derive(Default)]
struct Shard {
    ops: [OpCounters; OPS],
    started: AtomicU64,
    /// Highest end offset written (write, zero, trim), QEMU's `wr_highest_offset`.
    wr_highest: AtomicU64,
    /// [`now_ns`] + 1 when the last request counted in time finished (0: none yet).
    last_done: AtomicU64,
}

/// A user-bounded histogram (`block-latency-histogram-set`).
struct UserHist {
    boundaries: Vec<u64>,
    bins: Vec<AtomicU64>,
}

impl UserHist {
    fn new(boundaries: Vec<u64>) -> UserHist {
        let bins = (0..=boundaries.len()).map(|_| AtomicU64::new(0)).collect();
        UserHist { boundaries, bins }
    }

    fn add(&self, ns: u64) {
        // QEMU's bins: [0, b0), [b0, b1), ..., [bn-1, +inf).
        let i = self.boundaries.partition_point(|&b| b <= ns);
        self.bins[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// A latency histogram as `query-blockstats` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Histogram {
    pub boundaries: Vec<u64>,
    pub bins: Vec<u64>,
}

/// The counters of one operation, added up over the shards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpSnapshot {
    pub ok: u64,
    pub bytes: u64,
    pub time_ns: u64,
    pub failed: u64,
    pub invalid: u64,
    /// Per latency bucket (not cumulative); see [`BUCKETS`].
    pub buckets: [u64; BUCKETS],
}

/// Everything a [`BlockStats`] holds, added up.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    ops: [OpSnapshot; OPS],
    pub started: u64,
    pub wr_highest_offset: u64,
    /// Nanoseconds since the last request finished; None before the first.
    pub idle_time_ns: Option<u64>,
    /// (operation, errno) → failed or invalid requests.
    pub errors: BTreeMap<(Op, i32), u64>,
    /// `block-latency-histogram-set` histograms: read, write, zone append, flush.
    pub histograms: [Option<Histogram>; 4],
}

impl Snapshot {
    pub fn op(&self, op: Op) -> &OpSnapshot {
        &self.ops[op as usize]
    }

    /// Requests started and not yet finished.
    pub fn in_flight(&self) -> u64 {
        let done: u64 = self.ops.iter().map(|o| o.ok + o.failed + o.invalid).sum();
        self.started.saturating_sub(done)
    }

    /// The histogram of one kind, if set.
    pub fn histogram(&self, kind: HistKind) -> Option<&Histogram> {
        self.histograms[kind as usize].as_ref()
    }
}

/// The statistics of one export or node (see the module doc).
pub struct BlockStats {
    shards: Box<[Shard]>,
    errors: Mutex<BTreeMap<(Op, i32), u64>>,
    hist_on: AtomicBool,
    hists: RwLock<[Option<Arc<UserHist>>; 4]>,
}

impl Default for BlockStats {
    fn default() -> Self {
        BlockStats::new()
    }
}

impl std::fmt::Debug for BlockStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockStats").finish_non_exhaustive()
    }
}

/// The bucket of a latency.
pub fn bucket_of(ns: u64) -> usize {
    let log2_ceil = 64 - ns.leading_zeros(); // ns < 2^log2_ceil
    (log2_ceil.saturating_sub(FIRST_BUCKET_LOG2) as usize).min(BUCKETS - 1)
}

/// Upper bound of latency bucket `i` in nanoseconds (None for the last, unbounded one).
pub fn bucket_bound_ns(i: usize) -> Option<u64> {
    (i + 1 < BUCKETS).then(|| 1u64 << (FIRST_BUCKET_LOG2 as usize + i))
}

impl BlockStats {
    pub fn new() -> BlockStats {
        BlockStats {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            errors: Mutex::new(BTreeMap::new()),
            hist_on: AtomicBool::new(false),
            hists: RwLock::new(Default::default()),
        }
    }

    fn shard(&self) -> &Shard {
        &self.shards[shard_index()]
    }

    /// A request has been read and is about to run (for the in-flight gauge).
    pub fn start(&self) {
        self.shard().started.fetch_add(1, Ordering::Relaxed);
    }

    /// A request finished. `bytes` is its length, `end` its end offset (for
    /// `wr_highest_offset`), `begun`/`done` [`now_ns`] readings around it.
    pub fn record(&self, op: Op, bytes: u64, end: u64, begun: u64, done: u64, outcome: Outcome) {
        let shard = self.shard();
        let c = &shard.ops[op as usize];
        match outcome {
            Outcome::Ok => {
                let ns = done.saturating_sub(begun);
                c.ok.fetch_add(1, Ordering::Relaxed);
                c.bytes.fetch_add(bytes, Ordering::Relaxed);
                c.time_ns.fetch_add(ns, Ordering::Relaxed);
                c.buckets[bucket_of(ns)].fetch_add(1, Ordering::Relaxed);
                if matches!(op, Op::Write | Op::Zero | Op::Trim) {
                    shard.wr_highest.fetch_max(end, Ordering::Relaxed);
                }
                shard.last_done.fetch_max(done + 1, Ordering::Relaxed);
                if self.hist_on.load(Ordering::Relaxed) {
                    self.add_to_histogram(op, ns);
                }
            }
            Outcome::Failed(e) | Outcome::Invalid(e) => {
                if matches!(outcome, Outcome::Failed(_)) {
                    c.failed.fetch_add(1, Ordering::Relaxed);
                } else {
                    c.invalid.fetch_add(1, Ordering::Relaxed);
                }
                *self
                    .errors
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry((op, e.0))
                    .or_insert(0) += 1;
            }
        }
    }

    #[cold]
    fn add_to_histogram(&self, op: Op, ns: u64) {
        let Some(kind) = HistKind::of(op) else { return };
        let hists = self.hists.read().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = &hists[kind as usize] {
            h.add(ns);
        }
    }

    /// Sets (new, empty bins) or removes the `block-latency-histogram-set` histogram of one
    /// kind. `boundaries` must be strictly increasing (the caller checks, with QEMU's message).
    pub fn set_histogram(&self, kind: HistKind, boundaries: Option<Vec<u64>>) {
        let mut hists = self.hists.write().unwrap_or_else(|e| e.into_inner());
        hists[kind as usize] = boundaries.map(|b| Arc::new(UserHist::new(b)));
        self.hist_on
            .store(hists.iter().any(Option::is_some), Ordering::Relaxed);
    }

    /// Adds up the shards.
    pub fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot::default();
        let mut last_done = 0;
        for shard in self.shards.iter() {
            for (o, c) in s.ops.iter_mut().zip(&shard.ops) {
                o.ok += c.ok.load(Ordering::Relaxed);
                o.bytes += c.bytes.load(Ordering::Relaxed);
                o.time_ns += c.time_ns.load(Ordering::Relaxed);
                o.failed += c.failed.load(Ordering::Relaxed);
                o.invalid += c.invalid.load(Ordering::Relaxed);
                for (b, a) in o.buckets.iter_mut().zip(&c.buckets) {
                    *b += a.load(Ordering::Relaxed);
                }
            }
            s.started += shard.started.load(Ordering::Relaxed);
            s.wr_highest_offset = s
                .wr_highest_offset
                .max(shard.wr_highest.load(Ordering::Relaxed));
            last_done = last_done.max(shard.last_done.load(Ordering::Relaxed));
        }
        if last_done > 0 {
            s.idle_time_ns = Some(now_ns().saturating_sub(last_done - 1));
        }
        s.errors = self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let hists = self.hists.read().unwrap_or_else(|e| e.into_inner());
        for kind in HistKind::ALL {
            s.histograms[kind as usize] = hists[kind as usize].as_ref().map(|h| Histogram {
                boundaries: h.boundaries.clone(),
                bins: h.bins.iter().map(|b| b.load(Ordering::Relaxed)).collect(),
            });
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_counts_ok_failed_invalid_and_bytes_exactly() {
        let s = BlockStats::new();
        for _ in 0..3 {
            s.start();
            s.record(Op::Write, 4096, 8192, 10, 1010, Outcome::Ok);
        }
        s.start();
        s.record(Op::Read, 512, 512, 0, 5, Outcome::Failed(Errno::EIO));
        s.start();
        s.record(
            Op::Read,
            512,
            1 << 40,
            0,
            5,
            Outcome::of_error(Errno::EINVAL),
        );
        let snap = s.snapshot();
        let w = snap.op(Op::Write);
        assert_eq!((w.ok, w.bytes, w.time_ns), (3, 3 * 4096, 3000));
        let r = snap.op(Op::Read);
        assert_eq!((r.ok, r.bytes, r.failed, r.invalid), (0, 0, 1, 1));
        assert_eq!(snap.wr_highest_offset, 8192);
        assert_eq!(snap.in_flight(), 0);
        assert_eq!(snap.errors[&(Op::Read, libc::EIO)], 1);
        assert_eq!(snap.errors[&(Op::Read, libc::EINVAL)], 1);
        assert!(snap.idle_time_ns.is_some());
    }

    #[test]
    fn in_flight_counts_started_not_finished() {
        let s = BlockStats::new();
        s.start();
        s.start();
        s.record(Op::Flush, 0, 0, 0, 1, Outcome::Ok);
        assert_eq!(s.snapshot().in_flight(), 1);
    }

    #[test]
    fn idle_time_absent_before_first_request() {
        assert_eq!(BlockStats::new().snapshot().idle_time_ns, None);
    }

    #[test]
    fn buckets_are_powers_of_two_of_nanoseconds() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1023), 0);
        assert_eq!(bucket_of(1024), 1);
        assert_eq!(bucket_of(2047), 1);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        assert_eq!(bucket_bound_ns(0), Some(1024));
        assert_eq!(bucket_bound_ns(BUCKETS - 1), None);
        // A sample is below its bucket's bound and at or above the previous one.
        for ns in [1u64, 999, 5000, 1 << 20, (1 << 34) + 7] {
            let b = bucket_of(ns);
            if let Some(hi) = bucket_bound_ns(b) {
                assert!(ns < hi, "{ns} in bucket {b}");
            }
            if b > 0 {
                assert!(ns >= bucket_bound_ns(b - 1).unwrap());
            }
        }
    }

    #[test]
    fn user_histogram_bins_follow_qemu_intervals() {
        let s = BlockStats::new();
        s.set_histogram(HistKind::Write, Some(vec![10, 100]));
        for ns in [0, 9, 10, 99, 100, 5000] {
            s.record(Op::Zero, 1, 1, 0, ns, Outcome::Ok);
        }
        // Reads have no histogram set.
        s.record(Op::Read, 1, 1, 0, 5, Outcome::Ok);
        let snap = s.snapshot();
        let h = snap.histogram(HistKind::Write).unwrap();
        assert_eq!(h.boundaries, vec![10, 100]);
        assert_eq!(h.bins, vec![2, 2, 2]);
        assert!(snap.histogram(HistKind::Read).is_none());
        s.set_histogram(HistKind::Write, None);
        assert!(s.snapshot().histogram(HistKind::Write).is_none());
    }

    #[test]
    fn threads_on_different_shards_add_up() {
        let s = Arc::new(BlockStats::new());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        s.start();
                        s.record(Op::Read, 10, 10, 0, 1, Outcome::Ok);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let snap = s.snapshot();
        assert_eq!(snap.op(Op::Read).ok, 8000);
        assert_eq!(snap.op(Op::Read).bytes, 80000);
        assert_eq!(snap.in_flight(), 0);
    }
}
