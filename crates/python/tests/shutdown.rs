//! `nbdkit.shutdown()` from a script reaches the server's hook. (Its own test binary: the
//! shutdown flag is process-wide.)

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use sluice_block::{Errno, Flags};
use sluice_python::{set_shutdown_hook, shutdown_requested};

#[test]
fn script_shutdown_calls_hook_and_cuts_sleeps_short() {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    set_shutdown_hook(Box::new(move || {
        seen.fetch_add(1, Ordering::SeqCst);
    }));
    let p = support::load("api.py", &[]);
    let h = support::open(&p);
    assert!(!shutdown_requested());
    h.pwrite(b"x", 4096, Flags::NONE).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(shutdown_requested());
    // A 30 s nbdkit.nanosleep now ends at once.
    let start = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let err = h.pread(&mut buf, 4096, Flags::NONE).unwrap_err();
    assert_eq!(err.errno, Errno::ESHUTDOWN);
    assert!(start.elapsed() < std::time::Duration::from_secs(5));
}
