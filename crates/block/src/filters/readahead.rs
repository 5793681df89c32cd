//! The readahead filter (nbdkit-readahead-filter): after each read, prefetches what follows
//! with an NBD cache request sent from a background thread, so the plugin can fetch it while
//! the client processes the read.
//!
//! The window starts at 32 KiB, doubles (up to 4 MiB) while reads move past the last
//! prefetch, stays while they move forward, and falls back when they go backwards; it is
//! shared by the export, as in nbdkit. Each connection has its own thread and queue; dropping
//! the connection ends the thread. As in nbdkit, the filter does nothing unless the layer
//! below caches natively and runs in the parallel thread model (the cache request then runs
//! beside the read); put the cache or cow filter below it otherwise.

use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use crate::error::Result;
use crate::filter::{Filter, Next};
use crate::plugin::{Flags, Handle, OpenContext, Plugin, Support, ThreadModel};
use crate::plugins::ConfigArg;

use super::{each_param, over, FilterEnv, FilterSpec};

pub const SPEC: FilterSpec = FilterSpec {
    name: "readahead",
    keys: &[],
    help: "",
    open,
};

const MIN: u64 = 32 * 1024;
const MAX: u64 = 4 * 1024 * 1024;

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    each_param(&SPEC, params, |_, _| Ok(()))?;
    Ok(over(ReadAhead::default(), inner))
}

/// The export's window: (window, last read offset, end of the last prefetch).
pub struct ReadAhead {
    window: Mutex<(u64, u64, u64)>,
}

impl Default for ReadAhead {
    fn default() -> Self {
        ReadAhead {
            window: Mutex::new((MIN, 0, 0)),
        }
    }
}

/// A connection's prefetch thread and the queue of (offset, count) it caches.
type Worker = (Sender<(u64, u64)>, JoinHandle<()>);

/// Per connection: the prefetch thread (None when the filter cannot work).
pub struct Conn {
    worker: Option<Worker>,
    size: u64,
}

impl Filter for ReadAhead {
    type Conn = Conn;
    fn name(&self) -> &str {
        "readahead"
    }
    fn open(&self, plugin: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<(Conn, Next)> {
        let next = Next::open(plugin, ctx)?;
        let working =
            plugin.thread_model() == ThreadModel::Parallel && next.can_cache()? == Support::Native;
        if !working {
            tracing::warn!(
                "readahead: warning: underlying plugin does not support NBD_CMD_CACHE or \
                 PARALLEL thread model, so the filter won't do anything"
            );
        }
        let worker = if working {
            let handle = next.handle()?;
            let (tx, rx) = channel::<(u64, u64)>();
            let thread = std::thread::Builder::new()
                .name("readahead".into())
                .spawn(move || {
                    for (offset, count) in rx {
                        // A failed prefetch is only a missed optimisation.
                        let _ = handle.cache(count, offset, Flags::NONE);
                    }
                })
                .map_err(|e| crate::BlockError::io("readahead: spawn", e))?;
            Some((tx, thread))
        } else {
            None
        };
        let size = next.get_size()?;
        Ok((Conn { worker, size }, next))
    }
    fn close(&self, conn: &mut Conn, _: &Next) {
        if let Some((tx, thread)) = conn.worker.take() {
            drop(tx);
            let _ = thread.join();
        }
    }
    fn pread(&self, c: &Conn, next: &Next, buf: &mut [u8], off: u64, f: Flags) -> Result<()> {
        if let Some((tx, _)) = &c.worker {
            let start = off + buf.len() as u64;
            let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
            let (window, last_offset, last_readahead) = *w;
            let count = if start < c.size {
                window.min(c.size - start)
            } else {
                0
            };
            let window = if last_readahead < off {
                (window * 2).min(MAX)
            } else if last_offset < off {
                window
            } else {
                MIN
            };
            *w = (window, off, start + count);
            drop(w);
            if count > 0 {
                let _ = tx.send((start, count));
            }
        }
        next.pread(buf, off, f)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::super::test_support::*;
    use super::*;
    use crate::plugins::MemoryPlugin;

    /// Memory that counts the bytes it was asked to cache.
    struct Counting(MemoryPlugin, Arc<AtomicU64>);
    struct CountingHandle(Box<dyn Handle>, Arc<AtomicU64>);
    impl Plugin for Counting {
        fn name(&self) -> &str {
            "counting"
        }
        fn open(&self, ctx: &OpenContext<'_>) -> Result<Box<dyn Handle>> {
            Ok(Box::new(CountingHandle(self.0.open(ctx)?, self.1.clone())))
        }
    }
    impl Handle for CountingHandle {
        fn get_size(&self) -> Result<u64> {
            self.0.get_size()
        }
        fn can_cache(&self) -> Result<Support> {
            Ok(Support::Native)
        }
        fn pread(&self, buf: &mut [u8], off: u64, f: Flags) -> Result<()> {
            self.0.pread(buf, off, f)
        }
        fn cache(&self, n: u64, _: u64, _: Flags) -> Result<()> {
            self.1.fetch_add(n, Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn readahead_prefetches_a_window_that_grows_when_reads_pass_it() {
        let cached = Arc::new(AtomicU64::new(0));
        let p = Arc::new(Counting(MemoryPlugin::new(16 << 20), cached.clone()));
        let e = export(filter("readahead", &[], p), true);
        let mut buf = vec![0u8; 4096];
        for off in [0, 128, 256, 512] {
            e.read(&mut buf, off * 1024).unwrap();
        }
        drop(e); // joins the prefetch thread
                 // 32K twice, then 64K and 128K: each later read started past the last prefetch.
        assert_eq!(cached.load(Ordering::SeqCst), (32 + 32 + 64 + 128) * 1024);
    }

    #[test]
    fn readahead_without_native_cache_does_nothing_but_reads() {
        let e = export(filter("readahead", &[], memory(1 << 20)), true);
        let mut buf = [1u8; 512];
        e.read(&mut buf, 0).unwrap();
        assert_eq!(buf, [0u8; 512]);
    }
}
