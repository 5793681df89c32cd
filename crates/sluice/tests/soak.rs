//! The soak test's short version: `bench/soak.py` for 30 s with 16 clients against
//! `serve memory`, `serve file`, `serve image` and the daemon at once (fio with crc32c
//! verify, nbdcopy round trips, connect churn, clients vanishing mid-request, block-job and
//! QMP monitor churn). It fails on any client error, verify failure, dead or panicked
//! server. The long run (`--minutes 10`, 64 clients) is by hand; see bench/README.md.

use crate::support;

use std::path::Path;

use support::{output, sluice_bin};

#[test]
fn soak_short_run_has_no_errors() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/soak.py");
    let out = output(
        "/usr/bin/python3",
        &[
            script.to_str().unwrap(),
            "--seconds",
            "30",
            "--clients",
            "16",
            "--sluice",
            sluice_bin(),
        ],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "soak failed:\n{text}");
    // Every kind of client ran.
    for kind in ["fio", "nbdcopy", "churn", "vanish", "jobs", "monitors"] {
        assert!(
            text.contains(&format!("  {kind} ")),
            "no {kind} clients:\n{text}"
        );
    }
}
