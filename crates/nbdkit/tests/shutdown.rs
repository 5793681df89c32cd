//! `nbdkit_shutdown` and `nbdkit_nanosleep` against the process-wide shutdown flag. In a
//! test binary of its own: once shut down, every later sleep in the process ends at once.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_block::{Errno, Flags, OpenContext};
use sluice_nbdkit::{load, set_shutdown_hook, shutdown_requested};
use support::test_plugin;

#[test]
fn plugin_shutdown_runs_hook_and_ends_sleeps() {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    set_shutdown_hook(Box::new(move || {
        seen.fetch_add(1, Ordering::SeqCst);
    }));

    let plugin = load(&test_plugin("sleeper"), &[]).unwrap();
    let h = plugin
        .open(&OpenContext {
            readonly: false,
            export_name: "",
            is_tls: false,
        })
        .unwrap();
    let start = Instant::now();
    let err = std::thread::scope(|s| {
        let sleeper = s.spawn(|| {
            let mut buf = [0u8; 512];
            h.pread(&mut buf, 0, Flags::NONE)
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(!shutdown_requested());
        // The plugin calls nbdkit_shutdown() from pwrite.
        h.pwrite(&[0u8; 512], 0, Flags::NONE).unwrap();
        sleeper.join().unwrap().unwrap_err()
    });
    assert!(start.elapsed() < Duration::from_secs(30));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(shutdown_requested());
    assert_eq!(err.errno, Errno::ESHUTDOWN);
    assert_eq!(err.message, "aborting sleep to shut down");
}
