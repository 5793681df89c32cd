//! `--dump-plugin` output, captured in-process.
//!
//! Capturing a plugin's dump redirects file descriptor 1 for the whole process (plugins print
//! with C stdio, and the sh plugin's script prints from a child process). libtest prints test
//! progress on the same descriptor from its main thread while other tests run, so these
//! checks live in a test binary of their own with a single test: nothing else writes to
//! standard output while a dump is captured.

mod support;

use sluice_block::Plugin;
use sluice_nbdkit::{dump_plugin, load_with, DebugFlag};
use support::{bare, debian_plugin, kv, scratch_path, test_plugin};

#[test]
fn dump_outputs_match_nbdkit() {
    short_struct_dump_shows_declared_size_and_no_later_fields();
    debug_flag_is_set_before_load();
    dump_plugin_matches_nbdkit_for_recorder();
    dump_plugin_matches_nbdkit_memory();
    dump_plugin_matches_nbdkit_file();
    dump_plugin_matches_nbdkit_null();
    dump_plugin_matches_nbdkit_data();
    dump_plugin_matches_nbdkit_sh();
    dump_plugin_matches_nbdkit_info();
}

fn short_struct_dump_shows_declared_size_and_no_later_fields() {
    let text = dump_plugin(&test_plugin("small_struct"), &[bare("foo")]).unwrap();
    assert!(text.contains("\nstruct_size=192\n"), "{text}");
    assert!(!text.contains("magic_config_key"), "{text}");
    assert!(!text.contains("has_dump_plugin"), "{text}");
    assert!(text.contains("has__zero_v1=1"), "{text}");
}

fn debug_flag_is_set_before_load() {
    let log = scratch_path("flag.log");
    let flag: DebugFlag = "recorder.verbose=7".parse().unwrap();
    let plugin = load_with(
        &test_plugin("recorder"),
        &[kv("log", log.to_str().unwrap())],
        &[flag],
    )
    .unwrap();
    assert_eq!(plugin.dump(), ["recorder_verbose=7"]);
}

fn dump_plugin_matches_nbdkit_for_recorder() {
    let path = test_plugin("recorder");
    let log = scratch_path("dump.log");
    let args = [kv("log", log.to_str().unwrap()), bare("1M")];
    let ours = dump_plugin(&path, &args).unwrap();
    let Some(theirs) = nbdkit_dump(&path, &["log=/dev/null", "1M"]) else {
        return;
    };
    assert_eq!(ours, theirs);
    assert!(ours.ends_with("recorder_verbose=0\n"));
}

/// `nbdkit --dump-plugin PATH ARGS...`, or None if nbdkit is not installed.
fn nbdkit_dump(path: &std::path::Path, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("nbdkit")
        .arg("--dump-plugin")
        .arg(path)
        .args(args)
        .output()
        .ok()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap())
}

/// Compares our dump with nbdkit's for the same file and parameters. They must be equal
/// line for line: every key, every value, the plugin's own lines.
fn assert_dump_matches(name: &str, args: &[&str]) {
    let Some(path) = debian_plugin(name) else {
        return;
    };
    let ours = dump_plugin(
        &path,
        &args
            .iter()
            .map(|a| sluice_block::plugins::ConfigArg::parse(a))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let Some(theirs) = nbdkit_dump(&path, args) else {
        return;
    };
    assert_eq!(ours, theirs, "dump of {name}");
}

fn dump_plugin_matches_nbdkit_memory() {
    assert_dump_matches("memory", &[]);
}

fn dump_plugin_matches_nbdkit_file() {
    assert_dump_matches("file", &[]);
}

fn dump_plugin_matches_nbdkit_null() {
    assert_dump_matches("null", &[]);
}

fn dump_plugin_matches_nbdkit_data() {
    assert_dump_matches("data", &["1 2 3"]);
}

fn dump_plugin_matches_nbdkit_sh() {
    assert_dump_matches("sh", &[]);
}

fn dump_plugin_matches_nbdkit_info() {
    assert_dump_matches("info", &[]);
}
