//! The scan filter (nbdkit-scan-filter): while a client is connected, prefetches the whole
//! disk in the background with cache requests to the layer below, `scan-size` bytes at a
//! time from the start to the end.
//!
//! Parameters are nbdkit 1.32's: `scan-ahead` (default true: when a client reads past the
//! scan, the scan jumps to just after that read), `scan-clock` (default true: the position
//! reached is kept for the export, so the next connection resumes there instead of at 0),
//! `scan-forever` (default false: after the end, start over at 0 while the client stays) and
//! `scan-size` (default 2M, a power of two in 512..32M).
//!
//! # Threads
//!
//! Each connection that can scan has one thread of its own, as in nbdkit. It holds a clone of
//! the connection's handle of the layer below and calls `cache` on it beside the client's
//! requests, so the filter scans only when that is safe and useful, and otherwise warns and
//! passes everything through: the export must be the default one (""), the layer below must
//! run in the parallel thread model, and it must cache natively (put the cache or cow filter
//! below this one otherwise). A client's read only raises the connection's "furthest read
//! end" with one atomic `fetch_max` (no lock, no allocation, no queue to grow on the request
//! path, where nbdkit appends to a locked command queue); the thread takes it before each
//! prefetch. The thread ends when the scan is done (unless `scan-forever`), when the
//! connection closes ([`Filter::close`] raises its quit flag and joins it, so no thread
//! outlives its connection), or when the server begins to shut down
//! ([`crate::host::shutdown_requested`]), both checked before each prefetch. The clock is one
//! atomic for the export. A failed prefetch is a missed optimisation and is ignored, as
//! nbdkit ignores it; client data never passes through the thread.
//!
//! The filter only issues cache requests; it never reads on the client's behalf, as nbdkit.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::error::Result;
use crate::filter::{Filter, Next};
use crate::plugin::{Flags, Handle, OpenContext, Plugin, Support, ThreadModel};
use crate::plugins::ConfigArg;

use super::{bad, each_param, over, parse_bool, parse_size, FilterEnv, FilterSpec};

pub const SPEC: FilterSpec = FilterSpec {
    name: "scan",
    keys: &["scan-ahead", "scan-clock", "scan-forever", "scan-size"],
    help: "scan-ahead=false         Skip ahead when client reads faster.\n\
           scan-clock=false         Always start prefetching from beginning.\n\
           scan-forever=true        Scan in a loop while clients connected.\n\
           scan-size=NN             Set scan block size.",
    open,
};

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut opts = Options {
        ahead: true,
        clock: true,
        forever: false,
        size: 2 << 20,
    };
    each_param(&SPEC, params, |k, v| {
        match k {
            "scan-ahead" => opts.ahead = parse_bool("scan", k, v)?,
            "scan-clock" => opts.clock = parse_bool("scan", k, v)?,
            "scan-forever" => opts.forever = parse_bool("scan", k, v)?,
            _ => opts.size = parse_size("scan", k, v)?,
        }
        Ok(())
    })?;
    if !(512..=32 << 20).contains(&opts.size) || !opts.size.is_power_of_two() {
        return Err(bad(
            "scan",
            "scan-size",
            format!("{} should be [512..32M] and a power of two", opts.size),
        ));
    }
    Ok(over(
        Scan {
            opts,
            clock: Arc::new(AtomicU64::new(0)),
        },
        inner,
    ))
}

/// The parameters.
#[derive(Debug, Clone, Copy)]
struct Options {
    ahead: bool,
    clock: bool,
    forever: bool,
    size: u64,
}

/// The filter: its parameters and the export's clock (how far scanning got).
pub struct Scan {
    opts: Options,
    clock: Arc<AtomicU64>,
}

/// Per connection: the scanning thread and what it shares with the connection (None when
/// this connection does not scan).
pub struct Conn {
    worker: Option<(Arc<Control>, JoinHandle<()>)>,
}

/// What a connection tells its scanning thread.
#[derive(Default)]
struct Control {
    /// The furthest end of a client read not yet taken by the thread (0: none).
    read_end: AtomicU64,
    /// The connection is closing.
    quit: AtomicBool,
}

impl Scan {
    /// Why this connection cannot scan, if it cannot (nbdkit's warnings).
    fn refusal(
        &self,
        plugin: &dyn Plugin,
        ctx: &OpenContext<'_>,
        next: &Next,
    ) -> Result<Option<&'static str>> {
        Ok(if !ctx.export_name.is_empty() {
            Some("scan: warning: not the default export, not scanning")
        } else if plugin.thread_model() != ThreadModel::Parallel {
            Some(
                "scan: warning: underlying plugin does not support the PARALLEL thread model, \
                 not scanning",
            )
        } else if next.can_cache()? != Support::Native {
            Some(
                "scan: warning: underlying plugin does not support NBD_CMD_CACHE, not \
                 scanning; try adding --filter=cache after this filter",
            )
        } else {
            None
        })
    }
}

impl Filter for Scan {
    type Conn = Conn;
    fn name(&self) -> &str {
        "scan"
    }
    fn open(&self, plugin: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<(Conn, Next)> {
        let next = Next::open(plugin, ctx)?;
        if let Some(why) = self.refusal(plugin.as_ref(), ctx, &next)? {
            tracing::warn!("{why}");
            return Ok((Conn { worker: None }, next));
        }
        let handle = next.handle()?;
        let control = Arc::new(Control::default());
        let (ctl, opts, clock) = (control.clone(), self.opts, self.clock.clone());
        let thread = std::thread::Builder::new()
            .name("scan".into())
            .spawn(move || scan(handle.as_ref(), &ctl, opts, &clock))
            .map_err(|e| crate::BlockError::io("scan: spawn", e))?;
        Ok((
            Conn {
                worker: Some((control, thread)),
            },
            next,
        ))
    }
    fn close(&self, conn: &mut Conn, _: &Next) {
        if let Some((control, thread)) = conn.worker.take() {
            control.quit.store(true, Ordering::Release);
            let _ = thread.join();
        }
    }
    fn pread(&self, c: &Conn, next: &Next, buf: &mut [u8], off: u64, f: Flags) -> Result<()> {
        if self.opts.ahead {
            if let Some((control, _)) = &c.worker {
                // Nobody reads it once the thread has finished; that costs nothing.
                control
                    .read_end
                    .fetch_max(off + buf.len() as u64, Ordering::Relaxed);
            }
        }
        next.pread(buf, off, f)
    }
}

/// The scanning thread's loop: prefetch `opts.size` bytes at a time from the clock (or 0) to
/// the end, skipping past client reads before each prefetch; stop when the connection closes
/// or the server shuts down.
fn scan(below: &dyn Handle, control: &Control, opts: Options, clock: &AtomicU64) {
    let Ok(size) = below.get_size() else {
        return;
    };
    loop {
        let mut offset = if opts.clock {
            clock.load(Ordering::Relaxed)
        } else {
            0
        };
        while offset < size {
            if control.quit.load(Ordering::Acquire) {
                tracing::debug!("scan: exiting background thread on connection close");
                return;
            }
            if crate::host::shutdown_requested() {
                return;
            }
            offset = offset.max(control.read_end.swap(0, Ordering::Relaxed));
            clock.fetch_max(offset, Ordering::Relaxed);
            if offset < size {
                let n = opts.size.min(size - offset);
                // A failed prefetch only loses the optimisation.
                let _ = below.cache(n, offset, Flags::NONE);
            }
            offset = offset.saturating_add(opts.size);
        }
        if !opts.forever {
            break;
        }
        clock.store(0, Ordering::Relaxed);
    }
    tracing::debug!("scan: finished scanning the plugin");
}

#[cfg(test)]
mod tests {
    use std::sync::{Condvar, Mutex};
    use std::time::{Duration, Instant};

    use super::super::test_support::*;
    use super::*;
    use crate::plugins::MemoryPlugin;

    /// A gate that holds cache requests until opened.
    type Gate = Arc<(Mutex<bool>, Condvar)>;

    /// Memory that records the (offset, count) of every cache request, caches natively or
    /// not at all, and may hold each cache request at a gate after recording it.
    struct Recording {
        mem: MemoryPlugin,
        log: Arc<Mutex<Vec<(u64, u64)>>>,
        native: bool,
        gate: Option<Gate>,
    }
    struct RecordingHandle {
        inner: Box<dyn Handle>,
        log: Arc<Mutex<Vec<(u64, u64)>>>,
        native: bool,
        gate: Option<Gate>,
    }
    impl Plugin for Recording {
        fn name(&self) -> &str {
            "recording"
        }
        fn open(&self, ctx: &OpenContext<'_>) -> Result<Box<dyn Handle>> {
            Ok(Box::new(RecordingHandle {
                inner: self.mem.open(ctx)?,
                log: self.log.clone(),
                native: self.native,
                gate: self.gate.clone(),
            }))
        }
    }
    impl Handle for RecordingHandle {
        fn get_size(&self) -> Result<u64> {
            self.inner.get_size()
        }
        fn can_cache(&self) -> Result<Support> {
            Ok(if self.native {
                Support::Native
            } else {
                Support::None
            })
        }
        fn can_write(&self) -> Result<bool> {
            self.inner.can_write()
        }
        fn pread(&self, buf: &mut [u8], off: u64, f: Flags) -> Result<()> {
            self.inner.pread(buf, off, f)
        }
        fn pwrite(&self, buf: &[u8], off: u64, f: Flags) -> Result<()> {
            self.inner.pwrite(buf, off, f)
        }
        fn cache(&self, n: u64, off: u64, _: Flags) -> Result<()> {
            self.log.lock().unwrap().push((off, n));
            if let Some(gate) = &self.gate {
                let mut open = gate.0.lock().unwrap();
                while !*open {
                    open = gate.1.wait(open).unwrap();
                }
            }
            Ok(())
        }
    }

    type Log = Arc<Mutex<Vec<(u64, u64)>>>;

    fn recording_gated(size: u64, native: bool, gate: Option<Gate>) -> (Arc<dyn Plugin>, Log) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let p = Arc::new(Recording {
            mem: MemoryPlugin::new(size),
            log: log.clone(),
            native,
            gate,
        });
        (p, log)
    }

    fn recording(size: u64, native: bool) -> (Arc<dyn Plugin>, Log) {
        recording_gated(size, native, None)
    }

    /// Waits (generously) until `log` has at least `n` entries.
    fn wait_for(log: &Mutex<Vec<(u64, u64)>>, n: usize) {
        let start = Instant::now();
        while log.lock().unwrap().len() < n {
            assert!(start.elapsed() < Duration::from_secs(30), "no prefetch");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn scan_prefetches_the_whole_disk_once_in_blocks() {
        let (p, log) = recording(4 << 20 | 4096, true);
        let e = export(filter("scan", &[("scan-size", "1M")], p), true);
        wait_for(&log, 5);
        drop(e); // joins the thread
        let seen = log.lock().unwrap().clone();
        assert_eq!(
            seen,
            [
                (0, 1 << 20),
                (1 << 20, 1 << 20),
                (2 << 20, 1 << 20),
                (3 << 20, 1 << 20),
                (4 << 20, 4096)
            ]
        );
    }

    #[test]
    fn scan_clock_resumes_where_the_last_connection_stopped() {
        let (p, log) = recording(4 << 20, true);
        let top = filter("scan", &[("scan-size", "1M")], p);
        let e = export(top.clone(), true);
        wait_for(&log, 4);
        drop(e);
        log.lock().unwrap().clear();
        let e = export(top, true);
        wait_for(&log, 1);
        drop(e);
        // The clock stood at the last block: only that one is prefetched again.
        assert_eq!(*log.lock().unwrap(), [(3 << 20, 1 << 20)]);
    }

    /// Reads 4 KiB at 3M while the first prefetch is held; returns every prefetch.
    fn read_during_first_prefetch(kv: &[(&str, &str)]) -> Vec<(u64, u64)> {
        let gate: Gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (p, log) = recording_gated(4 << 20, true, Some(gate.clone()));
        let e = export(filter("scan", kv, p), true);
        wait_for(&log, 1);
        let mut buf = vec![0u8; 4096];
        e.read(&mut buf, 3 << 20).unwrap();
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        let ahead = kv.iter().all(|&(k, v)| k != "scan-ahead" || v != "false");
        wait_for(&log, if ahead { 2 } else { 4 });
        drop(e);
        let seen = log.lock().unwrap();
        seen.clone()
    }

    #[test]
    fn scan_ahead_skips_past_a_client_read() {
        assert_eq!(
            read_during_first_prefetch(&[("scan-size", "1M")]),
            [(0, 1 << 20), ((3 << 20) + 4096, (1 << 20) - 4096)]
        );
    }

    #[test]
    fn scan_ahead_false_ignores_client_reads() {
        assert_eq!(
            read_during_first_prefetch(&[("scan-size", "1M"), ("scan-ahead", "false")]),
            [
                (0, 1 << 20),
                (1 << 20, 1 << 20),
                (2 << 20, 1 << 20),
                (3 << 20, 1 << 20)
            ]
        );
    }

    #[test]
    fn scan_without_clock_starts_at_zero_each_time() {
        let (p, log) = recording(2 << 20, true);
        let top = filter("scan", &[("scan-size", "1M"), ("scan-clock", "false")], p);
        let e = export(top.clone(), true);
        wait_for(&log, 2);
        drop(e);
        log.lock().unwrap().clear();
        let e = export(top, true);
        wait_for(&log, 1);
        drop(e);
        assert_eq!(log.lock().unwrap()[0], (0, 1 << 20));
    }

    #[test]
    fn scan_forever_starts_over_until_the_connection_closes() {
        let (p, log) = recording(2 << 20, true);
        let e = export(
            filter("scan", &[("scan-size", "1M"), ("scan-forever", "true")], p),
            true,
        );
        wait_for(&log, 6);
        drop(e); // must not hang: the thread sees the connection go
        let seen = log.lock().unwrap().clone();
        assert_eq!(
            &seen[..4],
            [
                (0, 1 << 20),
                (1 << 20, 1 << 20),
                (0, 1 << 20),
                (1 << 20, 1 << 20)
            ]
        );
        let after = seen.len();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            log.lock().unwrap().len(),
            after,
            "the thread outlived its connection"
        );
    }

    #[test]
    fn scan_without_native_cache_only_passes_reads_through() {
        let (p, log) = recording(1 << 20, false);
        let e = export(filter("scan", &[], p), false);
        e.write(&[7u8; 512], 4096, Flags::NONE).unwrap();
        let mut buf = [0u8; 512];
        e.read(&mut buf, 4096).unwrap();
        assert_eq!(buf, [7u8; 512]);
        drop(e);
        assert!(log.lock().unwrap().is_empty());
    }

    #[test]
    fn scan_of_a_named_export_does_not_scan() {
        let (p, log) = recording(1 << 20, true);
        let top = filter("scan", &[], p);
        let ctx = OpenContext {
            readonly: true,
            export_name: "other",
            is_tls: false,
        };
        let e = crate::Export::open(&crate::Backend::new(top), &ctx).unwrap();
        drop(e);
        assert!(log.lock().unwrap().is_empty());
    }

    #[test]
    fn scan_bad_size_names_the_key() {
        for size in ["1000", "256", "64M", "2X"] {
            let msg = config_error("scan", &[("scan-size", size)]);
            assert!(msg.starts_with("scan: scan-size: "), "{msg}");
        }
        let msg = config_error("scan", &[("scan-ahead", "perhaps")]);
        assert!(msg.starts_with("scan: scan-ahead: "), "{msg}");
    }
}
