//! Helpers for the kill -9 tests (`daemon_stream_crash`, `daemon_mirror_crash`): a seeded
//! PRNG for repeatable kill points, seeds from the environment, the SIGKILL itself (which
//! checks that the daemon was alive to be killed and had not panicked), and the one
//! verdict every crash test asks of an image: `qemu-img check` finds no errors (leaked
//! clusters are allowed: a crash before the next flush leaks what was allocated since,
//! see `crates/image/src/storage.rs`).
#![allow(dead_code)]

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::qmp::{Qmp, QmpDaemon};
use super::{output, path_str};

/// xorshift64*: kill points and delays, repeatable from a seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// An unsigned number from the environment variable `name` (decimal or `0x` hex).
pub fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    Some(match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).unwrap(),
        None => v.parse().unwrap(),
    })
}

/// Kills the daemon with SIGKILL, asserting that it was still alive and had not panicked,
/// then reads what it had already sent on `c` (events, a reply) into `c.events`.
pub fn kill_9(d: &mut QmpDaemon, c: &mut Qmp) {
    let st = d.signal(libc::SIGKILL);
    assert_eq!(
        st.signal(),
        Some(libc::SIGKILL),
        "the daemon was not alive to be killed ({st}); stderr:\n{}",
        d.stderr()
    );
    assert!(!d.stderr().contains("panicked"), "{}", d.stderr());
    while let Some(line) = c.try_read_line(Duration::from_millis(1)) {
        c.events.push(serde_json::from_str(&line).unwrap());
    }
}

/// `qemu-img check --output=json`: the image's leaked clusters; panics (naming `ctx`) on
/// anything but "clean" and "leaked clusters only".
pub fn check_leaks_only(path: &Path, ctx: &str) -> u64 {
    let out = output("qemu-img", &["check", "--output=json", path_str(path)]);
    let text = String::from_utf8_lossy(&out.stdout);
    let code = out.status.code().unwrap_or(-1);
    let v: Option<Value> = serde_json::from_str(&text).ok();
    let field = |k: &str| {
        v.as_ref()
            .and_then(|v| v.get(k))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let leaks = field("leaks");
    let clean = v.is_some()
        && field("check-errors") == 0
        && field("corruptions") == 0
        && ((code == 0 && leaks == 0) || (code == 3 && leaks > 0));
    if !clean {
        let human = output("qemu-img", &["check", path_str(path)]);
        panic!(
            "{ctx}: qemu-img check {} exit {code}:\n{text}{}\n{}",
            path.display(),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&human.stdout)
        );
    }
    leaks
}
