//! Fuzzes nbdkit-style `key=value` words as the built-in plugins and the data-path filters
//! take them.
//!
//! The input is lines: the first picks a built-in plugin (memory, null, pattern; not file,
//! which would open whatever path the fuzzer names) or a filter over a 1 MiB memory plugin;
//! every other line is one command-line word, split as nbdkit splits it
//! ([`ConfigArg::parse`]). Filters that read files named by a parameter (extentlist,
//! ddrescue) are left out for the same reason, and so is luks, whose `passphrase=-FD` would
//! take and close a descriptor of the fuzzer's own process, and ext2, which loads libext2fs
//! and hands it the disk (C code, not ours to fuzz here). Property: no panic, every refusal
//! is an error value. Only configuration runs: no I/O, so the delay and rate filters never
//! sleep here.

use std::sync::Arc;

use sluice_block::filters::{FilterEnv, DATA_FILTERS};
use sluice_block::plugins::{open_builtin, ConfigArg};

const PLUGINS: [&str; 3] = ["memory", "null", "pattern"];

/// Runs the target's checks on one input (a fuzz input or a committed seed).
pub fn run(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = s.split('\n');
    let pick = lines.next().unwrap_or("");
    let args: Vec<ConfigArg> = lines.map(ConfigArg::parse).collect();
    if let Some(p) = PLUGINS.iter().find(|p| **p == pick) {
        let _ = open_builtin(p, &args);
        return;
    }
    let Some(spec) = DATA_FILTERS
        .iter()
        .find(|f| f.name == pick && !["extentlist", "ddrescue", "luks", "ext2"].contains(&f.name))
    else {
        return;
    };
    // Only the filter's own keys reach it, as on the command line.
    let args: Vec<ConfigArg> = args
        .into_iter()
        .filter(|a| a.key.as_deref().is_some_and(|k| spec.keys.contains(&k)))
        .collect();
    let inner = open_builtin("memory", &[ConfigArg::kv("size", "1M")])
        .expect("memory is built in")
        .expect("1M is a size");
    let _ = (spec.open)(&args, Arc::clone(&inner), &FilterEnv::default());
}
