//! A node's write threshold: qemu's `block-set-write-threshold` and its one-shot
//! `BLOCK_WRITE_THRESHOLD` event.
//!
//! A management tool that gives a thin-provisioned disk its space in steps asks to be told
//! when a write reaches past some offset. [`WriteThreshold`] holds that offset (0: off) and
//! what to call when a write ends beyond it; the first such write disarms it (the offset
//! goes back to 0, as in qemu), so the notice comes once per arming.
//!
//! The check sits on the request path of every write and zero of the node, so it is one
//! relaxed atomic load in the common case (no threshold, or a write below it); only the
//! write that crosses does a compare-and-swap (so that of two writes crossing at once, one
//! reports) and takes the lock around the callback, which is set rarely, by the monitor.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// What a crossing write reports: `(amount_exceeded, threshold)`.
pub type OnExceeded = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// A write threshold (see the module doc).
#[derive(Default)]
pub struct WriteThreshold {
    /// The offset, 0 when off.
    limit: AtomicU64,
    on_exceeded: Mutex<Option<OnExceeded>>,
}

impl std::fmt::Debug for WriteThreshold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteThreshold")
            .field("limit", &self.get())
            .finish_non_exhaustive()
    }
}

impl WriteThreshold {
    pub fn new() -> WriteThreshold {
        WriteThreshold::default()
    }

    /// The armed offset, 0 when off.
    pub fn get(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Arms the threshold at `limit` (0 disarms it); `on_exceeded` is called by the write
    /// that first ends beyond it.
    pub fn set(&self, limit: u64, on_exceeded: Option<OnExceeded>) {
        *self
            .on_exceeded
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = on_exceeded;
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Called for a write or zero of `[offset, offset+len)`: reports and disarms if it ends
    /// beyond the threshold.
    #[inline]
    pub fn check(&self, offset: u64, len: u64) {
        let limit = self.limit.load(Ordering::Relaxed);
        let end = offset.saturating_add(len);
        if limit == 0 || end <= limit {
            return;
        }
        self.cross(limit, end);
    }

    #[cold]
    fn cross(&self, limit: u64, end: u64) {
        if self
            .limit
            .compare_exchange(limit, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let hook = self
            .on_exceeded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(hook) = hook {
            hook(end - limit, limit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Seen = Arc<Mutex<Vec<(u64, u64)>>>;

    fn recorder() -> (Seen, OnExceeded) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        (seen, Arc::new(move |a, t| s.lock().unwrap().push((a, t))))
    }

    #[test]
    fn write_ending_beyond_reports_once_and_disarms() {
        let (seen, hook) = recorder();
        let t = WriteThreshold::new();
        t.set(1000, Some(hook));
        t.check(0, 1000);
        assert!(seen.lock().unwrap().is_empty());
        t.check(900, 200);
        t.check(5000, 10);
        assert_eq!(*seen.lock().unwrap(), vec![(100, 1000)]);
        assert_eq!(t.get(), 0);
    }

    #[test]
    fn zero_threshold_never_reports() {
        let (seen, hook) = recorder();
        let t = WriteThreshold::new();
        t.set(0, Some(hook));
        t.check(u64::MAX - 1, 10);
        assert!(seen.lock().unwrap().is_empty());
    }
}
