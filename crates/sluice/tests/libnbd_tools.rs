//! libnbd's command-line tools (nbdinfo, nbdcopy) against sluice, and sluice side by side
//! with nbdkit for the same plugins and operations.
//!
//! nbdinfo checks what sluice advertises (size, flags, block sizes, meta contexts, export
//! lists, allocation maps); nbdcopy moves whole disks in and out over several connections
//! and many requests in flight. Where nbdkit has the same plugin, the bytes and maps must be
//! the same as nbdkit's, since users switch between the two by changing one word.

use crate::support;

use std::collections::BTreeMap;
use std::path::Path;

use support::{
    assert_same_bytes, export_bytes, nbdinfo_json, path_str, qemu_io, random_bytes, run, Server,
};

const MIB: usize = 1 << 20;

/// The one export of an `nbdinfo --json` answer.
fn only_export(v: &serde_json::Value) -> &serde_json::Value {
    let exports = v["exports"].as_array().expect("exports array");
    assert_eq!(exports.len(), 1, "{v:#}");
    &exports[0]
}

/// `nbdinfo --map` lines as (offset, length, type, description).
fn nbdinfo_map(uri: &str) -> Vec<(u64, u64, u32, String)> {
    run("nbdinfo", &["--map", uri])
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 4, "nbdinfo --map line {l:?}");
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
                f[3].to_string(),
            )
        })
        .collect()
}

fn hole(offset: u64, length: u64) -> (u64, u64, u32, String) {
    (offset, length, 3, "hole,zero".to_string())
}

fn data(offset: u64, length: u64) -> (u64, u64, u32, String) {
    (offset, length, 0, "data".to_string())
}

/// nbdkit's pattern plugin: each 8-byte word holds its own offset, big-endian.
fn pattern_bytes(len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|o| (o & !7).to_be_bytes()[(o % 8) as usize])
        .collect()
}

/// A 32 MiB source for nbdcopy: random data with an 8 MiB run of zeroes in the middle, so
/// that copies exercise both writes and zero requests.
fn copy_source(dir: &Path) -> (String, Vec<u8>) {
    let mut bytes = random_bytes(32 * MIB, 99);
    bytes[8 * MIB..16 * MIB].fill(0);
    let path = dir.join("src.img");
    std::fs::write(&path, &bytes).unwrap();
    (path_str(&path).to_string(), bytes)
}

/// A file of `len` zero bytes (sparse).
fn zero_file(path: &Path, len: u64) {
    std::fs::File::create(path).unwrap().set_len(len).unwrap();
}

fn nbdkit(args: &[&str]) -> Server {
    Server::try_start_nbdkit(args).unwrap_or_else(|e| panic!("nbdkit {args:?}: {e}"))
}

#[test]
fn nbdinfo_json_memory_reports_size_and_flags() {
    let s = Server::start(&["memory", "64M"]);
    let v = nbdinfo_json(&[], &s.uri());
    let e = only_export(&v);
    assert_eq!(e["export-size"], 67108864, "{e:#}");
    assert_eq!(e["is_read_only"], false);
    for flag in [
        "can_fua",
        "can_multi_conn",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_cache",
        "can_flush",
        "can_df",
    ] {
        assert_eq!(e[flag], true, "{flag} in {e:#}");
    }
    assert_eq!(e["contexts"], serde_json::json!(["base:allocation"]));
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 33554432);
    assert_eq!(v["protocol"], "newstyle-fixed");
    assert_eq!(v["structured"], true);
}

#[test]
fn nbdinfo_json_readonly_memory_reports_read_only_without_write_flags() {
    let s = Server::start(&["-r", "memory", "64M"]);
    let v = nbdinfo_json(&[], &s.uri());
    let e = only_export(&v);
    assert_eq!(e["export-size"], 67108864, "{e:#}");
    assert_eq!(e["is_read_only"], true);
    for flag in ["can_trim", "can_zero", "can_fast_zero", "can_fua"] {
        assert_eq!(e[flag], false, "{flag} in {e:#}");
    }
    for flag in ["can_multi_conn", "can_cache", "can_flush"] {
        assert_eq!(e[flag], true, "{flag} in {e:#}");
    }
}

#[test]
fn nbdinfo_json_file_reports_size_and_multi_conn() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::write(&path, random_bytes(3 * MIB + 4096, 1)).unwrap();
    let s = Server::start(&["file", path_str(&path)]);
    let v = nbdinfo_json(&[], &s.uri());
    let e = only_export(&v);
    assert_eq!(e["export-size"], 3 * MIB as u64 + 4096, "{e:#}");
    assert_eq!(e["is_read_only"], false);
    for flag in [
        "can_multi_conn",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_flush",
    ] {
        assert_eq!(e[flag], true, "{flag} in {e:#}");
    }
}

#[test]
fn nbdinfo_list_dir_names_every_file() {
    let dir = tempfile::tempdir().unwrap();
    for (name, len) in [("a.img", MIB), ("b.img", 2 * MIB), ("c.img", 3000)] {
        std::fs::write(dir.path().join(name), random_bytes(len, 2)).unwrap();
    }
    let s = Server::start(&["file", &format!("dir={}", path_str(dir.path()))]);
    let text = run("nbdinfo", &["--list", &s.uri()]);
    let mut names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("export=\"")?.strip_suffix("\":"))
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["a.img", "b.img", "c.img"], "{text}");
}

#[test]
fn nbdinfo_list_json_dir_reports_each_file_size() {
    let dir = tempfile::tempdir().unwrap();
    for (name, len) in [("a.img", MIB), ("b.img", 2 * MIB), ("c.img", 3000)] {
        std::fs::write(dir.path().join(name), random_bytes(len, 2)).unwrap();
    }
    let s = Server::start(&["file", &format!("dir={}", path_str(dir.path()))]);
    let v = nbdinfo_json(&["--list"], &s.uri());
    let sizes: BTreeMap<String, u64> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().unwrap().to_string(),
                e["export-size"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected: BTreeMap<String, u64> = [("a.img", 1048576), ("b.img", 2097152), ("c.img", 3000)]
        .into_iter()
        .map(|(n, s)| (n.to_string(), s))
        .collect();
    assert_eq!(sizes, expected, "{v:#}");
}

#[test]
fn nbdinfo_list_dir_leaves_no_failure_in_server_log() {
    // nbdinfo --list ends each connection with NBD_OPT_ABORT and closes without reading the
    // acknowledgement; the server failing to send it is the normal end of the conversation.
    let dir = tempfile::tempdir().unwrap();
    for name in ["a.img", "b.img"] {
        std::fs::write(dir.path().join(name), random_bytes(4096, 4)).unwrap();
    }
    let mut s = Server::start(&["file", &format!("dir={}", path_str(dir.path()))]);
    for _ in 0..10 {
        run("nbdinfo", &["--list", &s.uri()]);
    }
    assert_eq!(s.stop().code(), Some(0));
    let log = s.stderr();
    assert!(!log.contains("Broken pipe"), "{log}");
}

#[test]
fn nbdinfo_map_memory_after_writes_shows_data_between_holes() {
    let s = Server::start(&["memory", "4M"]);
    let uri = s.uri();
    qemu_io(&s.qemu_uri(), &["write -P 1 1M 64k", "write -P 2 3M 32k"]);
    assert_eq!(
        nbdinfo_map(&uri),
        [
            hole(0, 1048576),
            data(1048576, 65536),
            hole(1114112, 2031616),
            data(3145728, 32768),
            hole(3178496, 1015808),
        ]
    );
}

#[test]
fn nbdinfo_map_memory_fresh_disk_one_hole() {
    let s = Server::start(&["memory", "4M"]);
    assert_eq!(nbdinfo_map(&s.uri()), [hole(0, 4194304)]);
}

#[test]
fn nbdinfo_size_prints_export_size_in_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.img");
    std::fs::write(&path, random_bytes(3000, 3)).unwrap();
    for (args, size) in [
        (vec!["memory", "64M"], "67108864\n"),
        (vec!["null", "1G"], "1073741824\n"),
        (vec!["pattern", "1003"], "1003\n"),
        (vec!["file", path_str(&path)], "3000\n"),
    ] {
        let s = Server::start(&args);
        assert_eq!(run("nbdinfo", &["--size", &s.uri()]), size, "{args:?}");
    }
}

#[test]
fn nbdcopy_four_connections_round_trip_byte_equal() {
    let dir = tempfile::tempdir().unwrap();
    let (src, bytes) = copy_source(dir.path());
    let s = Server::start(&["memory", "32M"]);
    run("nbdcopy", &["--connections=4", &src, &s.uri()]);
    let out = dir.path().join("out.img");
    run("nbdcopy", &["--connections=4", &s.uri(), path_str(&out)]);
    assert_same_bytes(&std::fs::read(&out).unwrap(), &bytes, "copied back");
}

#[test]
fn nbdcopy_one_connection_one_request_round_trip_byte_equal() {
    let dir = tempfile::tempdir().unwrap();
    let (src, bytes) = copy_source(dir.path());
    let s = Server::start(&["memory", "32M"]);
    run(
        "nbdcopy",
        &["--connections=1", "--requests=1", "--flush", &src, &s.uri()],
    );
    let out = dir.path().join("out.img");
    run(
        "nbdcopy",
        &["--connections=1", "--requests=1", &s.uri(), path_str(&out)],
    );
    assert_same_bytes(&std::fs::read(&out).unwrap(), &bytes, "copied back");
}

#[test]
fn nbdcopy_one_worker_thread_per_connection_round_trip_byte_equal() {
    let dir = tempfile::tempdir().unwrap();
    let (src, bytes) = copy_source(dir.path());
    let s = Server::start(&["-t", "1", "memory", "32M"]);
    run(
        "nbdcopy",
        &["--connections=2", "--requests=64", &src, &s.uri()],
    );
    assert_same_bytes(&export_bytes(&s.uri(), dir.path()), &bytes, "copied back");
}

#[test]
fn nbdcopy_into_file_export_writes_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (src, bytes) = copy_source(dir.path());
    let target = dir.path().join("target.img");
    zero_file(&target, 32 * MIB as u64);
    let s = Server::start(&["file", path_str(&target)]);
    run("nbdcopy", &["--flush", &src, &s.uri()]);
    assert_same_bytes(&std::fs::read(&target).unwrap(), &bytes, "target file");
    assert_same_bytes(&export_bytes(&s.uri(), dir.path()), &bytes, "read back");
}

#[test]
fn nbdcopy_between_two_sluice_exports_byte_equal() {
    let dir = tempfile::tempdir().unwrap();
    let from = Server::start(&["pattern", "16M"]);
    let to = Server::start(&["memory", "16M"]);
    run("nbdcopy", &[&from.uri(), &to.uri()]);
    assert_same_bytes(
        &export_bytes(&to.uri(), dir.path()),
        &pattern_bytes(16 * MIB),
        "memory after copying pattern",
    );
}

#[test]
fn pattern_bytes_equal_nbdkit_pattern_and_formula() {
    let dir = tempfile::tempdir().unwrap();
    for size in ["1M", "1003"] {
        let ours = Server::start(&["pattern", size]);
        let theirs = nbdkit(&["pattern", size]);
        let ours = export_bytes(&ours.uri(), dir.path());
        let theirs = export_bytes(&theirs.uri(), dir.path());
        assert_same_bytes(&ours, &theirs, &format!("pattern {size} against nbdkit"));
        assert_same_bytes(&ours, &pattern_bytes(ours.len()), "pattern formula");
    }
}

#[test]
fn nbdkit_pattern_via_run_equals_sluice_pattern() {
    // The same comparison through nbdkit's captive mode, as a user would script it.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("nbdkit.bin");
    let cmd = format!("nbdcopy \"$uri\" {}", path_str(&out));
    run("nbdkit", &["-U", "-", "pattern", "1M", "--run", &cmd]);
    let ours = Server::start(&["pattern", "1M"]);
    assert_same_bytes(
        &export_bytes(&ours.uri(), dir.path()),
        &std::fs::read(&out).unwrap(),
        "sluice pattern against nbdkit --run",
    );
}

/// The same qemu-io commands, run against a sluice and an nbdkit export.
const SAME_OPS: &[&str] = &[
    "write -P 0x5a 1M 64k",
    "write -f -P 0x11 0 4k",
    "write -P 0x22 100000 3333",
    "write -z 2M 1M",
    "write -P 0x33 3M 256k",
    "write -z -u 3M 64k",
    "discard 3211264 32k",
    "flush",
];

#[test]
fn memory_same_operations_as_nbdkit_same_bytes_and_map() {
    let dir = tempfile::tempdir().unwrap();
    let ours = Server::start(&["memory", "4M"]);
    let theirs = nbdkit(&["memory", "4M"]);
    qemu_io(&ours.qemu_uri(), SAME_OPS);
    qemu_io(&theirs.qemu_uri(), SAME_OPS);
    assert_same_bytes(
        &export_bytes(&ours.uri(), dir.path()),
        &export_bytes(&theirs.uri(), dir.path()),
        "memory against nbdkit",
    );
    assert_eq!(nbdinfo_map(&ours.uri()), nbdinfo_map(&theirs.uri()));
}

#[test]
fn file_same_operations_as_nbdkit_same_file_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let original = random_bytes(4 * MIB, 8);
    let ours_path = dir.path().join("ours.img");
    let theirs_path = dir.path().join("theirs.img");
    std::fs::write(&ours_path, &original).unwrap();
    std::fs::write(&theirs_path, &original).unwrap();
    let ours = Server::start(&["file", path_str(&ours_path)]);
    let theirs = nbdkit(&["file", path_str(&theirs_path)]);
    qemu_io(&ours.qemu_uri(), SAME_OPS);
    qemu_io(&theirs.qemu_uri(), SAME_OPS);
    let ours_bytes = std::fs::read(&ours_path).unwrap();
    assert_same_bytes(
        &ours_bytes,
        &std::fs::read(&theirs_path).unwrap(),
        "file against nbdkit",
    );
    assert_same_bytes(
        &export_bytes(&ours.uri(), dir.path()),
        &ours_bytes,
        "export against its file",
    );
    // The operations did change the file (the comparison above is not vacuous).
    assert_eq!(&ours_bytes[MIB..MIB + 65536], &[0x5a; 65536][..]);
    assert_ne!(ours_bytes, original);
}

#[test]
fn nbdinfo_json_memory_and_pattern_flags_equal_nbdkit() {
    for args in [
        &["memory", "64M"][..],
        &["-r", "memory", "64M"],
        &["pattern", "1M"],
    ] {
        let ours = Server::start(args);
        let theirs = nbdkit(args);
        let mut a = only_export(&nbdinfo_json(&[], &ours.uri())).clone();
        let mut b = only_export(&nbdinfo_json(&[], &theirs.uri())).clone();
        // nbdkit 1.32's plugins state no block sizes; sluice's are checked above.
        for v in [&mut a, &mut b] {
            let o = v.as_object_mut().unwrap();
            for key in [
                "uri",
                "block_size_minimum",
                "block_size_preferred",
                "block_size_maximum",
            ] {
                o.remove(key);
            }
        }
        assert_eq!(a, b, "{args:?}: sluice (left) against nbdkit (right)");
    }
}
