//! `block-commit` over QMP: an intermediate commit of a three-layer qcow2 chain (mid into
//! base, with unaligned data in every layer), checked with qsd's event order and then with
//! qemu-img info/check/compare; and the refusals (bad job id, unknown or non-root device, arguments
//! that conflict or name nodes outside the chain).

use crate::support;

use std::path::{Path, PathBuf};

use serde_json::json;
use support::image::{flatten, image_info, qcow2_chain, qemu_img, qemu_img_check};
use support::path_str;
use support::qmp::{
    daemon_with_named_chain, named_node, names, run_until, Qmp, JOB_RUNS_TO_THE_END,
};

/// Three 4 MiB qcow2 layers with different cluster sizes and unaligned data in each:
/// base (64 KiB clusters) <- mid (4 KiB clusters, also a zero range over base data) <- top.
/// Returns (dir, base, mid, top).
fn chain() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (base, mid, top) = qcow2_chain(dir.path(), "");
    (dir, base, mid, top)
}

/// `qemu-img compare` of two raw files: panics unless identical.
fn assert_same_raw(a: &Path, b: &Path) {
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        path_str(a),
        path_str(b),
    ]);
}

#[test]
fn intermediate_commit_moves_mid_into_base_and_drops_it() {
    let (dir, base, mid, top) = chain();
    let flat = dir.path().join("flat.raw");
    flatten(&top, &flat);
    let (_d, mut c) = daemon_with_named_chain(&base, &mid, &top);
    let msgs = run_until(
        &mut c,
        json!({"execute": "block-commit", "arguments": {"job-id": "c0", "device": "top",
               "top-node": "mid", "base-node": "base"}}),
        "null",
    );
    assert_eq!(names(&msgs), JOB_RUNS_TO_THE_END, "{msgs:?}");
    assert_eq!(
        msgs[5]["data"],
        json!({"type": "commit", "device": "c0", "len": 4194304, "offset": 4194304,
               "speed": 0})
    );
    // The graph follows: top sits on base, mid is gone.
    let top_node = named_node(&mut c, "top");
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
    flatten(&base, &flat_base);
    flatten(&mid, &flat_mid);
    let (_d, mut c) = daemon_with_named_chain(&base, &mid, &top);
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
    assert_same_raw(&before, &flat_base);
    let msgs = run_until(
        &mut c,
        json!({"execute": "block-commit", "arguments": {"job-id": "c0", "device": "top",
               "top-node": "mid", "base-node": "base"}}),
        "null",
    );
    assert!(
        msgs.iter()
            .any(|m| m["event"] == "BLOCK_JOB_COMPLETED" && m["data"].get("error").is_none()),
        "{msgs:?}"
    );
    // Base now reads as mid did (mid covered all of base's reads).
    let after = dir.path().join("after.raw");
    qemu_img(&["convert", "-O", "raw", &uri, path_str(&after)]);
    assert_same_raw(&after, &flat_mid);
}

#[test]
fn commit_refusals() {
    let (_dir, base, mid, top) = chain();
    let (_d, mut c) = daemon_with_named_chain(&base, &mid, &top);
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
