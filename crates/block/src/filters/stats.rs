//! nbdkit's stats filter: counts and times every request and writes a summary to
//! `statsfile=` (replaced, or appended to with `statsappend=true`) when the server exits.
//!
//! The summary is nbdkit 1.32's, line for line: a total, then per request type the number of
//! operations, the time spent in the layer below, the bytes and rates, and (unless
//! `statsthreshold=0`) a histogram of request sizes (by bits needed for the size) and offset
//! alignments, cut at the `statsthreshold` percentile (default 95).
//!
//! One quirk is kept on purpose, because the point is to print what nbdkit prints: nbdkit
//! indexes size buckets by their request count when it sorts them, so of two buckets with the
//! same count only one is printed, the one its hash map yields last. libstdc++ yields small
//! integer keys most recently created first, so that is the order used here; and the
//! `other sizes` line reports the bytes of every request of the type, as nbdkit's does.
//!
//! The file is opened, and the clock started, in the ready stage (nbdkit's `.get_ready`); the
//! summary is written when the filter is dropped with the stack at exit (nbdkit's
//! `.unload`). Counters sit under one lock taken once per request, as in nbdkit.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use crate::error::{BlockError, Errno, Result};
use crate::extents::Extents;
use crate::filter::{Filter, Next};
use crate::filters::{bad, each_param, over, parse_bool, FilterEnv, FilterSpec};
use crate::plugin::{Flags, Handle, OpenContext, Plugin};
use crate::plugins::ConfigArg;

pub const SPEC: FilterSpec = FilterSpec {
    name: "stats",
    keys: &["statsfile", "statsappend", "statsthreshold"],
    help: "statsfile=<FILE>    (required) The file to place the log in.\n\
           statsappend=<BOOL>  True to append to the log (default false).",
    open,
};

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, env: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut file = None;
    let mut append = false;
    let mut threshold = 0.95;
    each_param(&SPEC, params, |k, v| {
        match k {
            "statsfile" => {
                file = Some(std::path::absolute(v).map_err(|e| bad("stats", k, e))?);
            }
            "statsappend" => append = parse_bool("stats", k, v)?,
            _ => {
                let n: i32 = v.trim().parse().map_err(|_| {
                    bad(
                        "stats",
                        k,
                        format!("could not parse printing threshold: {v}"),
                    )
                })?;
                if !(0..=100).contains(&n) {
                    return Err(bad(
                        "stats",
                        k,
                        "statsthreshold must be between 0 and 100 (percent)",
                    ));
                }
                threshold = f64::from(n) / 100.0;
            }
        }
        Ok(())
    })?;
    let shared = Arc::new(Shared {
        threshold,
        out: Mutex::new(None),
        stats: Mutex::new(Stats::default()),
    });
    let ready = shared.clone();
    env.lifecycle.on_ready(move |_| {
        let path = file.ok_or_else(|| {
            bad(
                "stats",
                "statsfile",
                "the stats filter requires this parameter",
            )
        })?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .append(append)
            .truncate(!append)
            .open(&path)
            .map_err(|e| {
                BlockError::new(
                    Errno(e.raw_os_error().unwrap_or(libc::EIO)),
                    format!("stats: open: {}: {e}", path.display()),
                )
            })?;
        *ready.out.lock().unwrap_or_else(PoisonError::into_inner) = Some((f, Instant::now()));
        Ok(())
    });
    Ok(over(StatsFilter(shared), inner))
}

struct Shared {
    /// `statsthreshold` as a fraction; 0 turns the histograms off.
    threshold: f64,
    /// The summary's file and the time it was opened, once ready.
    out: Mutex<Option<(std::fs::File, Instant)>>,
    stats: Mutex<Stats>,
}

/// Counters of one request type.
#[derive(Debug, Default)]
struct Stat {
    ops: u64,
    bytes: u64,
    usecs: u64,
    /// Size buckets in the order they were created (see the module doc).
    buckets: Vec<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// floor(log2(size)).
    bits: i32,
    /// Requests per offset alignment (trailing zero bits; -1 for offset 0).
    aligns: BTreeMap<i32, u64>,
    bytes: u64,
}

#[derive(Debug, Default)]
struct Stats {
    read: Stat,
    write: Stat,
    trim: Stat,
    zero: Stat,
    extents: Stat,
    cache: Stat,
    flush: Stat,
}

impl Stat {
    fn record(&mut self, size: u64, offset: u64, usecs: u64, histogram: bool) {
        self.ops += 1;
        self.bytes += size;
        self.usecs += usecs;
        if !histogram || size == 0 {
            return;
        }
        let bits = 63 - size.leading_zeros() as i32;
        let align = if offset == 0 {
            -1
        } else {
            offset.trailing_zeros() as i32
        };
        let i = match self.buckets.iter().position(|b| b.bits == bits) {
            Some(i) => i,
            None => {
                self.buckets.push(Bucket {
                    bits,
                    aligns: BTreeMap::new(),
                    bytes: 0,
                });
                self.buckets.len() - 1
            }
        };
        let b = &mut self.buckets[i];
        *b.aligns.entry(align).or_default() += 1;
        b.bytes += size;
    }
}

impl Shared {
    fn record(&self, which: fn(&mut Stats) -> &mut Stat, size: u64, offset: u64, start: Instant) {
        let usecs = start.elapsed().as_micros() as u64;
        let mut stats = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        which(&mut stats).record(size, offset, usecs, self.threshold != 0.0);
    }
}

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * 1024 * 1024;

fn humansize(bytes: u64) -> String {
    if bytes < KIB {
        format!("{bytes} bytes")
    } else if bytes < MIB {
        format!("{:.2} KiB", bytes as f64 / KIB as f64)
    } else if bytes < GIB {
        format!("{:.2} MiB", bytes as f64 / MIB as f64)
    } else {
        format!("{:.2} GiB", bytes as f64 / GIB as f64)
    }
}

fn humanrate(bytes: u64, usecs: u64) -> String {
    let secs = usecs as f64 / 1_000_000.0;
    if secs != 0.0 {
        humansize((bytes as f64 / secs) as u64)
    } else {
        "(n/a)".to_string()
    }
}

/// The summary nbdkit writes, for `usecs` since the ready stage.
fn summary(s: &Stats, usecs: u64, threshold: f64) -> String {
    let mut out = String::new();
    let ops = s.read.ops + s.write.ops + s.trim.ops + s.zero.ops + s.extents.ops + s.flush.ops;
    let bytes = s.read.bytes + s.write.bytes + s.trim.bytes + s.zero.bytes;
    out.push_str(&format!(
        "total: {ops} ops, {:.6} s, {}, {}/s\n",
        usecs as f64 / 1_000_000.0,
        humansize(bytes),
        humanrate(bytes, usecs)
    ));
    for (name, st) in [
        ("read", &s.read),
        ("write", &s.write),
        ("trim", &s.trim),
        ("zero", &s.zero),
        ("extents", &s.extents),
        ("cache", &s.cache),
        ("flush", &s.flush),
    ] {
        if st.ops == 0 {
            continue;
        }
        out.push_str(&format!(
            "{name}: {} ops, {:.6} s, {}, {}/s op, {}/s total\n",
            st.ops,
            st.usecs as f64 / 1_000_000.0,
            humansize(st.bytes),
            humanrate(st.bytes, st.usecs),
            humanrate(st.bytes, usecs)
        ));
        if threshold != 0.0 && !st.buckets.is_empty() {
            out.push_str("  Request size and alignment breakdown:\n");
            histogram(&mut out, st, threshold);
            out.push('\n');
        }
    }
    out
}

fn histogram(out: &mut String, st: &Stat, threshold: f64) {
    // Buckets by request count, as nbdkit's std::map<count, bits>: equal counts collide and
    // the bucket its hash map yields last wins (most recently created first, see above).
    let mut by_count: BTreeMap<u64, &Bucket> = BTreeMap::new();
    let mut total = 0.0;
    for b in st.buckets.iter().rev() {
        let requests: u64 = b.aligns.values().sum();
        by_count.insert(requests, b);
        total += requests as f64;
    }
    let to_print = (threshold * total) as u64;
    let mut printed = 0u64;
    for (&requests, b) in by_count.iter().rev() {
        if printed >= to_print {
            let rest = st.ops - printed;
            out.push_str(&format!(
                "    other sizes: {:4.1}% ({rest} reqs, {} total)\n",
                rest as f64 / total * 100.0,
                humansize(st.bytes)
            ));
            break;
        }
        out.push_str(&format!(
            "    {:2} bits: {:4.1}% ({requests} reqs, {} total)\n",
            b.bits,
            requests as f64 / total * 100.0,
            humansize(b.bytes)
        ));
        printed += requests;
        alignments(out, &b.aligns, threshold);
    }
}

/// nbdkit's `print_align_hist` for one size bucket.
fn alignments(out: &mut String, aligns: &BTreeMap<i32, u64>, threshold: f64) {
    let any = aligns.get(&-1).copied().unwrap_or(0);
    let total: u64 = aligns.values().sum();
    let mut hist: Vec<(i32, u64)> = aligns
        .iter()
        .filter(|(&bits, _)| bits != -1)
        .map(|(&b, &n)| (b, n))
        .collect();
    // A request aligned to 2^n is aligned to every smaller power too.
    for i in 0..hist.len() {
        let requests = hist[i].1;
        for lower in &mut hist[..i] {
            lower.1 += requests;
        }
        hist[i].1 += any;
    }
    let cutoff = ((1.0 - threshold) * total as f64) as u64;
    for (i, &(bits, requests)) in hist.iter().enumerate() {
        if requests < cutoff {
            out.push_str(&format!(
                "         {bits:2}+ bit-aligned: {:4.1}% ({requests})\n",
                requests as f64 / total as f64 * 100.0
            ));
            break;
        }
        if hist.get(i + 1).is_none_or(|&(_, n)| n != requests) {
            out.push_str(&format!(
                "         {bits:2} bit aligned: {:5.1}% ({requests})\n",
                (requests * 100) as f64 / total as f64
            ));
        }
    }
}

struct StatsFilter(Arc<Shared>);

impl Drop for StatsFilter {
    fn drop(&mut self) {
        let out = self
            .0
            .out
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some((mut file, start)) = out else {
            return;
        };
        let usecs = start.elapsed().as_micros() as u64;
        if usecs > 0 {
            let stats = self.0.stats.lock().unwrap_or_else(PoisonError::into_inner);
            if let Err(e) = file.write_all(summary(&stats, usecs, self.0.threshold).as_bytes()) {
                tracing::error!("stats: cannot write the statistics: {e}");
            }
        }
    }
}

impl Filter for StatsFilter {
    type Conn = ();

    fn name(&self) -> &str {
        "stats"
    }

    /// It counts reads: each must reach it.
    fn must_see_every_read(&self) -> bool {
        true
    }

    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<((), Next)> {
        Ok(((), Next::open(next, ctx)?))
    }

    fn pread(&self, _: &(), next: &Next, buf: &mut [u8], off: u64, f: Flags) -> Result<()> {
        let start = Instant::now();
        next.pread(buf, off, f)?;
        self.0.record(|s| &mut s.read, buf.len() as u64, off, start);
        Ok(())
    }

    fn pwrite(&self, _: &(), next: &Next, buf: &[u8], off: u64, f: Flags) -> Result<()> {
        let start = Instant::now();
        next.pwrite(buf, off, f)?;
        self.0
            .record(|s| &mut s.write, buf.len() as u64, off, start);
        Ok(())
    }

    fn flush(&self, _: &(), next: &Next, f: Flags) -> Result<()> {
        let start = Instant::now();
        next.flush(f)?;
        self.0.record(|s| &mut s.flush, 0, 0, start);
        Ok(())
    }

    fn trim(&self, _: &(), next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        let start = Instant::now();
        next.trim(n, off, f)?;
        self.0.record(|s| &mut s.trim, n, off, start);
        Ok(())
    }

    fn zero(&self, _: &(), next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        let start = Instant::now();
        next.zero(n, off, f)?;
        self.0.record(|s| &mut s.zero, n, off, start);
        Ok(())
    }

    fn cache(&self, _: &(), next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        let start = Instant::now();
        next.cache(n, off, f)?;
        self.0.record(|s| &mut s.cache, n, off, start);
        Ok(())
    }

    fn extents(
        &self,
        _: &(),
        next: &Next,
        n: u64,
        off: u64,
        f: Flags,
        out: &mut Extents,
    ) -> Result<()> {
        let start = Instant::now();
        next.extents(n, off, f, out)?;
        self.0.record(|s| &mut s.extents, n, off, start);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(requests: &[(u64, u64)]) -> Stat {
        let mut st = Stat::default();
        for &(size, offset) in requests {
            st.record(size, offset, 1, true);
        }
        st
    }

    #[test]
    fn human_sizes_and_rates_as_nbdkit_prints_them() {
        assert_eq!(humansize(512), "512 bytes");
        assert_eq!(humansize(4608), "4.50 KiB");
        assert_eq!(humansize(3 * MIB + MIB / 2), "3.50 MiB");
        assert_eq!(humansize(25 * GIB), "25.00 GiB");
        assert_eq!(humanrate(512, 0), "(n/a)");
        assert_eq!(humanrate(512, 1), "488.28 MiB");
    }

    /// The write section of a session checked against Debian's nbdkit 1.32.5: writes of 512
    /// at 0, 4096 at 4096, 4096 at 8192 and 1024 at 1536.
    #[test]
    fn histogram_matches_nbdkit_including_colliding_counts() {
        let st = stat(&[(512, 0), (4096, 4096), (4096, 8192), (1024, 1536)]);
        let mut out = String::new();
        histogram(&mut out, &st, 0.95);
        assert_eq!(
            out,
            "    12 bits: 50.0% (2 reqs, 8.00 KiB total)\n\
             \x20        12 bit aligned: 100.0% (2)\n\
             \x20        13 bit aligned:  50.0% (1)\n\
             \x20    9 bits: 25.0% (1 reqs, 512 bytes total)\n"
        );
        // One request: everything is "other sizes".
        let mut out = String::new();
        histogram(&mut out, &stat(&[(512, 512)]), 0.95);
        assert_eq!(out, "    other sizes: 100.0% (1 reqs, 512 bytes total)\n");
    }

    #[test]
    fn summary_lists_types_with_operations_in_nbdkit_order() {
        let mut s = Stats::default();
        s.read.record(512, 0, 0, true);
        s.flush.record(0, 0, 0, true);
        let text = summary(&s, 1_000_000, 0.95);
        assert_eq!(
            text,
            "total: 2 ops, 1.000000 s, 512 bytes, 512 bytes/s\n\
             read: 1 ops, 0.000000 s, 512 bytes, (n/a)/s op, 512 bytes/s total\n\
             \x20 Request size and alignment breakdown:\n\
             \x20   other sizes: 100.0% (1 reqs, 512 bytes total)\n\
             \n\
             flush: 1 ops, 0.000000 s, 0 bytes, (n/a)/s op, 0 bytes/s total\n"
        );
        assert!(!summary(&s, 1, 0.0).contains("breakdown"));
    }

    #[test]
    fn bad_threshold_names_filter_and_key() {
        for v in ["101", "x", "-1"] {
            let e = (SPEC.open)(
                &[ConfigArg::kv("statsthreshold", v)],
                Arc::new(crate::plugins::MemoryPlugin::new(4096)),
                &FilterEnv::default(),
            )
            .err()
            .unwrap();
            assert!(e.message.starts_with("stats: statsthreshold: "), "{e}");
        }
    }

    #[test]
    fn statsfile_is_required_in_the_ready_stage() {
        let env = FilterEnv::default();
        let top =
            (SPEC.open)(&[], Arc::new(crate::plugins::MemoryPlugin::new(4096)), &env).unwrap();
        let e = env.lifecycle.ready(top.thread_model()).unwrap_err();
        assert_eq!(e.errno, Errno::EINVAL);
        assert!(e.message.starts_with("stats: statsfile: "), "{e}");
    }
}
