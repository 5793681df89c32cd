//! `block-commit` over QMP: an intermediate commit of a three-layer qcow2 chain (mid into
//! base, with unaligned data in every layer), checked with qsd's event order and then with
//! qemu-img info/check/compare; and the refusals (bad job id, unknown or non-root device, arguments
//! that conflict or name nodes outside the chain).

mod support;

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use support::image::{qemu_img, qemu_img_check, qemu_io};
use support::path_str;
use support::qmp::{Qmp, QmpDaemon};

/// A message as a short name: `return`, `error:...`, `EVENT` or `JOB_STATUS_CHANGE:status`.
fn short(v: &Value) -> String {
    if let Some(e) = v["event"].as_str() {
        return match v["data"]["status"].as_str() {
            Some(s) if e == "JOB_STATUS_CHANGE" => format!("{e}:{s}"),
            _ => e.to_string(),
        };
    }
    if v.get("return").is_some() {
        "return".into()
    } else {
        format!("error:{}", v["error"]["desc"].as_str().unwrap_or(""))
    }
}

/// Sends `cmd` and reads messages until `last` has been read after the reply.
fn run_until(c: &mut Qmp, cmd: Value, last: &str) -> Vec<Value> {
    c.send(&cmd);
    let mut got = Vec::new();
    let mut replied = false;
    loop {
        let v = c.read_value().expect("connection closed");
        replied |= v.get("event").is_none();
        let done = replied && short(&v) == last;
        got.push(v);
        if done {
            return got;
        }
    }
}

/// Three 4 MiB qcow2 layers with different cluster sizes and unaligned data in each:
/// base (64 KiB clusters) <- mid (4 KiB clusters, also a zero range over base data) <- top.
/// Returns (dir, base, mid, top).
fn chain() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let (base, mid, top) = (p("base.qcow2"), p("mid.qcow2"), p("top.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&base), "4M"]);
    qemu_io(
        "qcow2",
        path_str(&base),
        &["write -P 0x11 0 1M", "write -P 0x12 3000001 77777"],
    );
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        path_str(&mid),
        "4M",
    ]);
    qemu_io(
        "qcow2",
        path_str(&mid),
        &[
            "write -P 0x21 100001 300000",
            "write -z 700000 10000",
            "write -P 0x22 2000003 5000",
            "write -P 0x23 3050000 1234",
        ],
    );
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        path_str(&top),
        "4M",
    ]);
    qemu_io(
        "qcow2",
        path_str(&top),
        &["write -P 0x31 200000 4321", "write -P 0x32 2001000 100"],
    );
    (dir, base, mid, top)
}

fn file(path: &Path, read_only: bool) -> Value {
    json!({"driver": "file", "filename": path_str(path), "read-only": read_only})
}

fn image_info(path: &Path) -> Value {
    serde_json::from_str(&qemu_img(&["info", "-U", "--output=json", path_str(path)])).unwrap()
}

/// A daemon with base, mid (read-only) and top (writable) added by name.
fn daemon_with_chain(base: &Path, mid: &Path, top: &Path) -> (QmpDaemon, Qmp) {
    let d = QmpDaemon::sluice(&[]);
    let mut c = d.connect_negotiated();
    for args in [
        json!({"driver": "qcow2", "node-name": "base", "read-only": true,
               "file": file(base, true)}),
        json!({"driver": "qcow2", "node-name": "mid", "read-only": true, "backing": "base",
               "file": file(mid, true)}),
        json!({"driver": "qcow2", "node-name": "top", "backing": "mid",
               "file": file(top, false)}),
    ] {
        assert_eq!(c.exec("blockdev-add", args), json!({"return": {}}));
    }
    (d, c)
}

#[test]
fn intermediate_commit_moves_mid_into_base_and_drops_it() {
    let (dir, base, mid, top) = chain();
    let flat = dir.path().join("flat.raw");
    qemu_img(&["convert", "-O", "raw", path_str(&top), path_str(&flat)]);
    let (_d, mut c) = daemon_with_chain(&base, &mid, &top);
    let msgs = run_until(
        &mut c,
        json!({"execute": "block-commit", "arguments": {"job-id": "c0", "device": "top",
               "top-node": "mid", "base-node": "base"}}),
        "JOB_STATUS_CHANGE:null",
    );
    let names: Vec<String> = msgs.iter().map(short).collect();
    let want: Vec<String> = [
        "JOB_STATUS_CHANGE:created",
        "JOB_STATUS_CHANGE:running",
        "return",
        "JOB_STATUS_CHANGE:waiting",
        "JOB_STATUS_CHANGE:pending",
        "BLOCK_JOB_COMPLETED",
        "JOB_STATUS_CHANGE:concluded",
        "JOB_STATUS_CHANGE:null",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(names, want, "{msgs:?}");
    assert_eq!(
        msgs[5]["data"],
        json!({"type": "commit", "device": "c0", "len": 4194304, "offset": 4194304,
               "speed": 0})
    );
    // The graph follows: top sits on base, mid is gone.
    let nodes = c.exec("query-named-block-nodes", json!({}));
    let nodes = nodes["return"].as_array().unwrap();
    let top_node = nodes.iter().find(|n| n["node-name"] == "top").unwrap();
    assert_eq!(
        top_node["backing_file"],
        json!(path_str(&base)),
        "{top_node}"
    );
    // The header switch is durable at once (-U: the daemon still holds the images).
    let info = image_info(&top);
    assert_eq!(info["backing-filename"], json!(path_str(&base)));
    assert_eq!(info["backing-filename-format"], json!("qcow2"));
    assert_eq!(c.exec("query-jobs", json!({})), json!({"return": []}));
    assert_eq!(
        c.exec("blockdev-del", json!({"node-name": "top"})),
        json!({"return": {}})
    );
    // mid (added by the monitor) stays until deleted, but no longer in top's chain.
    for n in ["mid", "base"] {
        assert_eq!(
            c.exec("blockdev-del", json!({"node-name": n})),
            json!({"return": {}})
        );
    }
    assert_eq!(qemu_img_check(&top).0, 0, "{}", qemu_img_check(&top).1);
    assert_eq!(qemu_img_check(&base).0, 0, "{}", qemu_img_check(&base).1);
    // mid is no longer read: the content is still the whole chain's.
    std::fs::remove_file(&mid).unwrap();
    qemu_img(&["compare", "-F", "raw", path_str(&top), path_str(&flat)]);
}

#[test]
fn commit_base_node_reads_what_was_committed() {
    // The base node itself must see what was written into it (its caches are dropped).
    let (dir, base, mid, top) = chain();
    let flat_base = dir.path().join("flat-base.raw");
    let flat_mid = dir.path().join("flat-mid.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        path_str(&base),
        path_str(&flat_base),
    ]);
    qemu_img(&["convert", "-O", "raw", path_str(&mid), path_str(&flat_mid)]);
    let (_d, mut c) = daemon_with_chain(&base, &mid, &top);
    let sock = dir.path().join("nbd.sock");
    let r = c.exec(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "path": path_str(&sock)}}),
    );
    assert_eq!(r, json!({"return": {}}), "{r}");
    // Read base through the daemon first, so its node caches its L2 tables and file size.
    let r = c.exec(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "base", "writable": false}),
    );
    assert_eq!(r, json!({"return": {}}));
    let uri = format!("nbd+unix:///base?socket={}", path_str(&sock));
    let before = dir.path().join("before.raw");
    qemu_img(&["convert", "-O", "raw", &uri, path_str(&before)]);
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        path_str(&before),
        path_str(&flat_base),
    ]);
    let msgs = run_until(
        &mut c,
        json!({"execute": "block-commit", "arguments": {"job-id": "c0", "device": "top",
               "top-node": "mid", "base-node": "base"}}),
        "JOB_STATUS_CHANGE:null",
    );
    assert!(
        msgs.iter()
            .any(|m| m["event"] == "BLOCK_JOB_COMPLETED" && m["data"].get("error").is_none()),
        "{msgs:?}"
    );
    // Base now reads as mid did (mid covered all of base's reads).
    let after = dir.path().join("after.raw");
    qemu_img(&["convert", "-O", "raw", &uri, path_str(&after)]);
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        path_str(&after),
        path_str(&flat_mid),
    ]);
}

#[test]
fn commit_refusals() {
    let (_dir, base, mid, top) = chain();
    let (_d, mut c) = daemon_with_chain(&base, &mid, &top);
    let cases = [
        (
            json!({"device": "nope"}),
            ("DeviceNotFound", "Device 'nope' not found"),
        ),
        (
            json!({"job-id": "1c", "device": "top"}),
            ("GenericError", "Invalid job ID '1c'"),
        ),
        (
            json!({"job-id": "c0", "device": "top", "top-node": "top", "base-node": "top"}),
            ("GenericError", "cannot commit an image into itself"),
        ),
        (
            json!({"job-id": "c0", "device": "top", "base": "x", "base-node": "base"}),
            (
                "GenericError",
                "'base-node' and 'base' are mutually exclusive",
            ),
        ),
        (
            json!({"job-id": "c0", "device": "top", "top": "x", "top-node": "mid"}),
            (
                "GenericError",
                "'top-node' and 'top' are mutually exclusive",
            ),
        ),
        (
            json!({"job-id": "c0", "device": "top", "top-node": "mid", "base-node": "mid"}),
            ("GenericError", "cannot commit an image into itself"),
        ),
        (
            json!({"job-id": "c0", "device": "mid", "top-node": "top", "base-node": "base"}),
            ("GenericError", "Need a root block node"),
        ),
        (
            json!({"job-id": "c0", "device": "top", "top-node": "base", "base-node": "mid"}),
            ("GenericError", "'mid' is not in this backing file chain"),
        ),
    ];
    for (args, (class, desc)) in cases {
        let r = c.exec("block-commit", args.clone());
        assert_eq!(Qmp::error(&r), (class.into(), desc.into()), "{args}");
    }
    assert_eq!(c.exec("query-jobs", json!({})), json!({"return": []}));
}
