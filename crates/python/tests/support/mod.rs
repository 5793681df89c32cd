//! Shared helpers of sluice-python's integration tests: the test scripts, scratch files,
//! parameters, opening handles and exports, reading the call logs the scripts write, and
//! running the same script under Debian's `nbdkit python` for comparison.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use sluice_block::plugins::ConfigArg;
use sluice_block::{Backend, Export, Flags, Handle, OpenContext, Plugin};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// `tests/plugins/NAME`.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/plugins")
        .join(name)
}

/// A per-test-binary scratch directory under cargo's target tmpdir.
pub fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let stem = exe.file_stem().unwrap().to_string_lossy().into_owned();
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("sluice-python")
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

/// `key=value`.
pub fn kv(key: &str, value: &str) -> ConfigArg {
    ConfigArg::kv(key, value)
}

/// An open context for a writable export named `export_name`.
pub fn ctx(export_name: &str) -> OpenContext<'_> {
    OpenContext {
        readonly: false,
        export_name,
        is_tls: false,
    }
}

/// Loads `tests/plugins/NAME` with `args`, panicking with the error's text on failure.
pub fn load(name: &str, args: &[ConfigArg]) -> Arc<dyn Plugin> {
    match sluice_python::load(&script(name), args) {
        Ok(p) => p,
        Err(e) => panic!("loading {name}: {e}"),
    }
}

/// Loads `name` with a fresh call log (`log=PATH`) plus `args`; returns the log's path too.
pub fn load_logged(name: &str, args: &[ConfigArg]) -> (Arc<dyn Plugin>, PathBuf) {
    let log = scratch_path(&format!("{name}.log"));
    let mut all = vec![kv("log", log.to_str().unwrap())];
    all.extend_from_slice(args);
    (load(name, &all), log)
}

/// Opens a writable handle on export "".
pub fn open(plugin: &Arc<dyn Plugin>) -> Box<dyn Handle> {
    plugin.open(&ctx("")).unwrap()
}

/// Opens a writable export (the block layer's policy over a handle) on export "".
pub fn export(plugin: &Arc<dyn Plugin>) -> Export {
    let backend = Backend::new(plugin.clone());
    Export::open(&backend, &ctx("")).unwrap()
}

/// Reads `len` bytes at `offset` through the handle.
pub fn read(h: &dyn Handle, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    h.pread(&mut buf, offset, Flags::NONE).unwrap();
    buf
}

/// The lines the script logged so far that start with one of `prefixes`.
pub fn log_calls(path: &Path, prefixes: &[&str]) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| prefixes.iter().any(|p| l.starts_with(p)))
        .map(str::to_string)
        .collect()
}

/// True if Debian's nbdkit, its python plugin and nbdcopy are installed; else says why not.
pub fn have_nbdkit_python() -> bool {
    let ok = Path::new("/usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-python-plugin.so").exists()
        && which("nbdkit")
        && which("nbdcopy");
    if !ok {
        eprintln!("skipping: nbdkit, nbdkit-plugin-python or nbdcopy is not installed");
    }
    ok
}

fn which(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Runs `nbdkit -U - python SCRIPT ARGS --run RUN` with `env`; panics on failure.
pub fn nbdkit_python(script: &Path, args: &[&str], run: &str, env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new("nbdkit");
    cmd.args(["-U", "-", "python"]).arg(script).args(args);
    cmd.args(["--run", run]);
    // nbdcopy/nbdinfo are Debian's; keep a pyenv python off the front of PATH.
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    cmd.env("PATH", path);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run nbdkit");
    assert!(
        out.status.success(),
        "nbdkit python {} failed: {}\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
