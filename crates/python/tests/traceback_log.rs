//! The traceback of a failing Python callback is logged exactly once.
//!
//! In a test binary of its own: the check installs a thread-local tracing subscriber, and
//! tracing caches each call site's interest process-wide, so a concurrent test thread without
//! a subscriber can make the event invisible to it (seen as a flaky "0 tracebacks").

mod support;

use sluice_block::Flags;
use support::{load, open};

#[test]
fn pread_exception_traceback_is_logged_once() {
    let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || Writer(sink.clone()))
        .with_ansi(false)
        .finish();
    let p = load("pread_raises.py", &[]);
    let h = open(&p);
    tracing::subscriber::with_default(subscriber, || {
        let mut buf = [0u8; 16];
        h.pread(&mut buf, 0, Flags::NONE).unwrap_err();
    });
    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert_eq!(
        text.matches("Traceback (most recent call last)").count(),
        1,
        "{text}"
    );
    assert!(text.contains("line 30, in pread"), "{text}");
    assert!(text.contains("ERROR"), "{text}");
}

struct Writer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Writer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
