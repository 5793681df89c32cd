//! Shared helpers of sluice-nbdkit's integration tests: building the C test plugins, private
//! copies of Debian's plugins, parameters, and reading call logs.
//!
//! Every test gets its *own copy* of the `.so` it loads. A plugin's configuration lives in
//! its global variables, and dlopen of the same file returns the same instance, so tests
//! running in parallel on one copy would configure each other's plugin.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use sluice_block::plugins::ConfigArg;

pub const DEBIAN_PLUGIN_DIR: &str = "/usr/lib/x86_64-linux-gnu/nbdkit/plugins";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A per-test-binary scratch directory under cargo's target tmpdir.
pub fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let stem = exe.file_stem().unwrap().to_string_lossy().into_owned();
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("sluice-nbdkit")
            .join(format!("{stem}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    })
}

/// A fresh path in the scratch directory.
pub fn scratch_path(name: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    scratch_dir().join(format!("{n}-{name}"))
}

/// Compiles `tests/plugins/NAME.c` (once per test binary) and returns a private copy.
pub fn test_plugin(name: &str) -> PathBuf {
    static BUILT: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);
    let built = {
        let mut guard = BUILT.lock().unwrap();
        let map = guard.get_or_insert_with(HashMap::new);
        map.entry(name.to_string())
            .or_insert_with(|| compile(name))
            .clone()
    };
    private_copy(&built, name)
}

fn compile(name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/plugins")
        .join(format!("{name}.c"));
    let out = scratch_dir().join(format!("built-{name}.so"));
    let status = Command::new("cc")
        .args([
            "-shared",
            "-fPIC",
            "-O1",
            "-Wall",
            "-Wno-unused-parameter",
            "-Werror",
        ])
        // Several private copies of one plugin are loaded RTLD_GLOBAL at once: bind each
        // copy's references to its own symbols (its debug variables), not the first copy's.
        .arg("-Wl,-Bsymbolic")
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .status()
        .expect("run cc");
    assert!(status.success(), "compiling {}", src.display());
    out
}

/// A private copy of Debian's `nbdkit-NAME-plugin.so`, or None if it is not installed.
pub fn debian_plugin(name: &str) -> Option<PathBuf> {
    let src = Path::new(DEBIAN_PLUGIN_DIR).join(format!("nbdkit-{name}-plugin.so"));
    if !src.exists() {
        eprintln!("skipping: {} is not installed", src.display());
        return None;
    }
    Some(private_copy(&src, &format!("nbdkit-{name}-plugin")))
}

fn private_copy(src: &Path, name: &str) -> PathBuf {
    let dst = scratch_path(&format!("{name}.so"));
    std::fs::copy(src, &dst).unwrap();
    dst
}

/// `key=value`.
pub fn kv(key: &str, value: &str) -> ConfigArg {
    ConfigArg::kv(key, value)
}

/// A bare value (goes to the magic config key).
pub fn bare(value: &str) -> ConfigArg {
    ConfigArg::bare(value)
}

/// The lines a test plugin logged so far.
pub fn log_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The logged lines that start with one of `prefixes` (filters out get_ready etc.).
pub fn log_calls(path: &Path, prefixes: &[&str]) -> Vec<String> {
    log_lines(path)
        .into_iter()
        .filter(|l| prefixes.iter().any(|p| l.starts_with(p)))
        .collect()
}
