//! `drive-mirror` over QMP, and `query-block-jobs`' `actively-synced`: each scenario runs on
//! qemu-storage-daemon and on sluice, each with its own copy of the same images, and the
//! transcripts (messages as short names, refusals with class and message, `qemu-img info`
//! of the files the command created, paths written as `DIR`) must be equal. A python3-libnbd
//! client writes through the exported device during the job and keeps its connection across
//! `job-complete`; the target then equals a raw model of what the client saw (qemu-img
//! compare). Where sluice differs from qsd on purpose (`docs/compat/drive-mirror.md`) the
//! test checks sluice alone.

use crate::support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::image::{flatten, image_info, qemu_img, qemu_io};
use support::live::{assert_same, query_job, run_names, Client};
use support::path_str;
use support::qmp::{ok, seen, short, start_nbd, wait_for, Qmp, QmpDaemon};

const MIB: u64 = 1 << 20;

/// An 8 MiB chain in a new directory: `base.qcow2` (data at 0..2M and at 6000001) under
/// `top.qcow2` (backing named relative: a copy of the directory is a chain of its own;
/// unaligned data, 1 MiB at 5M), and `flat.raw`, the chain's content.
fn chain() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        path_str(&p("base.qcow2")),
        "8M",
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        path_str(&p("top.qcow2")),
    ]);
    qemu_io(
        "qcow2",
        path_str(&p("base.qcow2")),
        &["write -P 0x11 0 2M", "write -P 0x12 6000001 77777"],
    );
    qemu_io(
        "qcow2",
        path_str(&p("top.qcow2")),
        &["write -P 0x31 200000 4321", "write -P 0x33 5M 1M"],
    );
    flatten(&p("top.qcow2"), &p("flat.raw"));
    dir
}

/// A daemon of either kind with `base` (read-only) and `top` over it added, `top` exported
/// writable as `vm` on `{dir}/nbd.sock`.
fn setup(d: &QmpDaemon, dir: &Path) -> Qmp {
    let mut c = d.connect_negotiated();
    let file = |n: &str| json!({"driver": "file", "filename": path_str(&dir.join(n))});
    ok(
        &mut c,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "base", "read-only": true,
               "file": file("base.qcow2")}),
    );
    ok(
        &mut c,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top", "backing": "base",
               "file": file("top.qcow2")}),
    );
    start_nbd(&mut c, d);
    ok(
        &mut c,
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "top", "name": "vm", "writable": true}),
    );
    c
}

/// `s` with the directory written as `DIR`, so that transcripts of two daemons compare.
fn norm(s: &str, dir: &Path) -> String {
    s.replace(path_str(dir), "DIR")
}

/// Sends a job's command and reads until BLOCK_JOB_READY, before or after the reply.
fn until_ready(c: &mut Qmp, cmd: Value) -> Vec<String> {
    let mut got = run_names(c, cmd, "return");
    if got.last().is_some_and(|r| r == "return") && !got.iter().any(|n| n == "BLOCK_JOB_READY") {
        wait_for(c, "BLOCK_JOB_READY", Duration::from_secs(20));
        got.extend(seen(c));
        c.events.clear();
    }
    got
}

/// Sends a command that ends a job and reads until the job's `null`, which qsd sends
/// before or after the reply depending on timing: the event names in order, without the
/// reply's place.
fn until_gone(c: &mut Qmp, cmd: Value) -> Vec<String> {
    c.send(&cmd);
    let (mut names, mut replied, mut gone) = (Vec::new(), false, false);
    while !(replied && gone) {
        let v = c.read_value().expect("connection closed");
        let n = short(&v);
        if v.get("event").is_none() {
            assert_eq!(n, "return", "{cmd}");
            replied = true;
        } else {
            gone |= n == "null";
            names.push(n);
        }
    }
    names
}

/// What `qemu-img info` says of an image that matters here: format, size, backing name
/// and format.
fn info_line(path: &Path, dir: &Path) -> String {
    let i = image_info(path);
    norm(
        &format!(
            "{} {} backing={} fmt={}",
            i["format"], i["virtual-size"], i["backing-filename"], i["backing-filename-format"]
        ),
        dir,
    )
}

/// The file names of the graph's nodes, newest first, except qsd's `mirror_top` filter
/// (sluice inserts none), with the backing file each reports.
fn node_files(c: &mut Qmp, dir: &Path) -> Vec<String> {
    let r = c.exec("query-named-block-nodes", json!({"flat": true}));
    r["return"]
        .as_array()
        .unwrap_or_else(|| panic!("{r}"))
        .iter()
        .filter(|n| n["drv"] != "mirror_top")
        .map(|n| {
            norm(
                &format!("{} {} {}", n["drv"], n["file"], n["backing_file"]),
                dir,
            )
        })
        .collect()
}

/// The node the export `e0` is on, by its file name.
fn export_file(c: &mut Qmp, dir: &Path) -> String {
    let node = c.exec("query-block-exports", json!({}))["return"][0]["node-name"].clone();
    let r = c.exec("query-named-block-nodes", json!({"flat": true}));
    let n = r["return"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == node)
        .unwrap_or_else(|| panic!("no node {node}: {r}"))
        .clone();
    norm(&n["file"].to_string(), dir)
}

fn quit(mut c: Qmp, mut d: QmpDaemon) {
    ok(&mut c, "quit", json!({}));
    drop(c);
    assert!(d.wait().success());
}

/// One drive-mirror of `top` into a new `tgt.qcow2` with `sync`, a client writing through
/// the export before and after READY, and job-complete under that client: the transcript.
/// `dir` ends equal to the model in `expected.raw`, which the test compares.
fn absolute_paths(d: QmpDaemon, dir: &Path, sync: &str) -> Vec<String> {
    let expected = dir.join("expected.raw");
    std::fs::copy(dir.join("flat.raw"), &expected).unwrap();
    let mut c = setup(&d, dir);
    let mut client = Client::connect(&d.nbd_uri("vm"));
    client.write(&expected, 3 * MIB + 7, 5000, 0xa0);
    let target = dir.join("tgt.qcow2");
    let mut out = vec![norm(
        &until_ready(
            &mut c,
            json!({"execute": "drive-mirror",
                   "arguments": {"job-id": "m0", "device": "top",
                                 "target": path_str(&target), "sync": sync}}),
        )
        .join(" "),
        dir,
    )];
    // While the job runs: a new image with a backing is opened without it.
    out.extend(node_files(&mut c, dir));
    out.push(info_line(&target, dir));
    client.write(&expected, 4096, 4096, 0xb1);
    client.write(&expected, 7 * MIB + 1, 300_000, 0xb2);
    client.op("f", 0, 0, 0);
    out.push(
        until_gone(
            &mut c,
            json!({"execute": "job-complete", "arguments": {"id": "m0"}}),
        )
        .join(" "),
    );
    out.push(format!("export on {}", export_file(&mut c, dir)));
    out.extend(node_files(&mut c, dir));
    // The connection opened before the pivot reads and writes the target now.
    client.op("r", 4096, 4096, 0xb1);
    client.write(&expected, 6 * MIB, 4096, 0xc1);
    client.op("f", 0, 0, 0);
    client.close();
    // Only the export holds the target now: deleting it frees the target node.
    ok(&mut c, "block-export-del", json!({"id": "e0"}));
    c.wait_event("BLOCK_EXPORT_DELETED");
    out.push("export deleted".to_string());
    out.extend(node_files(&mut c, dir));
    quit(c, d);
    out.push(info_line(&target, dir));
    out
}

#[test]
fn drive_mirror_absolute_paths_creates_the_target_as_qsd_for_full_top_and_none() {
    for sync in ["full", "top", "none"] {
        let (q, s) = (chain(), chain());
        let want = absolute_paths(QmpDaemon::qsd(&[]), q.path(), sync);
        let got = absolute_paths(QmpDaemon::sluice(&[]), s.path(), sync);
        assert_eq!(got, want, "sync {sync}");
        for dir in [q.path(), s.path()] {
            assert_same(&dir.join("tgt.qcow2"), &dir.join("expected.raw"));
        }
    }
}

/// `mode: existing` onto a qcow2 made by qemu-img (format given) and a raw file (format
/// probed), with `node-name`; a soft cancel of the first and a forced cancel of the second
/// drop the target node; the transcript.
fn existing(d: QmpDaemon, dir: &Path) -> Vec<String> {
    let mut c = setup(&d, dir);
    let (q, r) = (dir.join("pre.qcow2"), dir.join("pre.raw"));
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&q), "8M"]);
    qemu_img(&["create", "-q", "-f", "raw", path_str(&r), "8M"]);
    let mut out = Vec::new();
    for (target, extra, cancel) in [
        (&q, json!({"format": "qcow2"}), json!({"device": "m0"})),
        (&r, json!({}), json!({"device": "m0", "force": true})),
    ] {
        let mut a = json!({"job-id": "m0", "device": "top", "target": path_str(target),
                           "sync": "full", "mode": "existing", "node-name": "tgt"});
        for (k, v) in extra.as_object().unwrap() {
            a[k] = v.clone();
        }
        out.push(until_ready(&mut c, json!({"execute": "drive-mirror", "arguments": a})).join(" "));
        let n = support::qmp::named_node(&mut c, "tgt");
        out.push(norm(&format!("tgt: {} {}", n["drv"], n["file"]), dir));
        out.push(
            until_gone(
                &mut c,
                json!({"execute": "block-job-cancel", "arguments": cancel}),
            )
            .join(" "),
        );
        out.extend(node_files(&mut c, dir));
    }
    quit(c, d);
    out
}

#[test]
fn drive_mirror_mode_existing_opens_the_file_and_cancel_drops_the_node_as_qsd() {
    let (q, s) = (chain(), chain());
    let want = existing(QmpDaemon::qsd(&[]), q.path());
    let got = existing(QmpDaemon::sluice(&[]), s.path());
    assert_eq!(got, want);
    // The soft cancel copied everything: the pre-made qcow2 holds the chain's content.
    for dir in [q.path(), s.path()] {
        assert_same(&dir.join("pre.qcow2"), &dir.join("flat.raw"));
        assert_same(&dir.join("pre.raw"), &dir.join("flat.raw"));
    }
}

/// Refusals, each as `error:CLASS:DESC` (paths as `DIR`) and whether the command left a
/// file behind (qsd creates it before some of its checks).
fn refusals(d: QmpDaemon, dir: &Path) -> Vec<String> {
    let mut c = setup(&d, dir);
    let x = dir.join("x.qcow2");
    let xs = path_str(&x);
    let nodir = dir.join("nodir/x.qcow2");
    let mut out = Vec::new();
    for extra in [
        json!({"device": "nope"}),
        json!({"device": "base"}),
        json!({"replaces": "top"}),
        json!({"format": "nosuch"}),
        json!({"format": "raw", "sync": "top"}),
        json!({"format": "raw", "sync": "none"}),
        json!({"target": path_str(&nodir)}),
        json!({"target": path_str(&dir.join("top.qcow2"))}),
        json!({"target": path_str(&dir.join("base.qcow2")), "mode": "existing"}),
        json!({"target": path_str(&dir.join("missing.qcow2")), "mode": "existing"}),
        json!({"node-name": "top"}),
        json!({"node-name": "1bad"}),
        json!({"replaces": "base", "node-name": "n1"}),
        json!({"replaces": "nope", "node-name": "n1"}),
        json!({"sync": "bitmap"}),
        json!({"granularity": 3000}),
        json!({"granularity": 256}),
        json!({"buf-size": -1}),
        json!({"speed": -1}),
        json!({"job-id": "1bad"}),
    ] {
        let mut a = json!({"job-id": "r", "device": "top", "target": xs, "sync": "full"});
        for (k, v) in extra.as_object().unwrap() {
            a[k] = v.clone();
        }
        let r = c.outcome("drive-mirror", a);
        let left = x.exists();
        let _ = std::fs::remove_file(&x);
        out.push(norm(&format!("{extra} -> {r} file left: {left}"), dir));
    }
    // Nothing of it stays in the graph.
    out.extend(node_files(&mut c, dir));
    quit(c, d);
    out
}

#[test]
fn drive_mirror_refusals_match_qsd_in_class_message_and_files_left() {
    let (q, s) = (chain(), chain());
    let want = refusals(QmpDaemon::qsd(&[]), q.path());
    let got = refusals(QmpDaemon::sluice(&[]), s.path());
    assert_eq!(got, want);
    // The source images were not touched by the refused creations over them.
    for dir in [q.path(), s.path()] {
        assert_same(&dir.join("top.qcow2"), &dir.join("flat.raw"));
    }
}

/// Polls `query-block-jobs` until the first job's `actively-synced` is true (10 s at most);
/// returns whether it got there.
fn becomes_synced(c: &mut Qmp) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if query_job(c)["actively-synced"] == json!(true) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// `actively-synced` through a mirror's life: false in background mode (also once ready),
/// true after the switch to write-blocking; true at once for a write-blocking sync=none
/// drive-mirror; absent for an active commit. The transcript.
fn synced(d: QmpDaemon, dir: &Path) -> Vec<String> {
    let mut c = setup(&d, dir);
    let mut out = Vec::new();
    let show = |c: &mut Qmp, what: &str| {
        let j = query_job(c);
        format!("{what}: {} {}", j["type"], j["actively-synced"])
    };
    until_ready(
        &mut c,
        json!({"execute": "blockdev-mirror",
               "arguments": {"job-id": "m0", "device": "top", "target": "dst",
                             "sync": "full"}}),
    );
    out.push(show(&mut c, "blockdev-mirror ready, background"));
    ok(
        &mut c,
        "block-job-change",
        json!({"id": "m0", "type": "mirror", "copy-mode": "write-blocking"}),
    );
    out.push(format!("after the change: {}", becomes_synced(&mut c)));
    until_gone(
        &mut c,
        json!({"execute": "block-job-cancel", "arguments": {"device": "m0", "force": true}}),
    );
    let target = dir.join("wb.qcow2");
    run_names(
        &mut c,
        json!({"execute": "drive-mirror",
               "arguments": {"job-id": "m1", "device": "top", "target": path_str(&target),
                             "sync": "none", "copy-mode": "write-blocking"}}),
        "return",
    );
    out.push(show(&mut c, "drive-mirror none, write-blocking"));
    until_gone(
        &mut c,
        json!({"execute": "block-job-cancel", "arguments": {"device": "m1", "force": true}}),
    );
    until_ready(
        &mut c,
        json!({"execute": "block-commit", "arguments": {"job-id": "c0", "device": "top"}}),
    );
    out.push(show(&mut c, "active commit"));
    quit(c, d);
    out
}

#[test]
fn actively_synced_is_false_then_true_in_write_blocking_mode_as_qsd() {
    let (q, s) = (chain(), chain());
    let add_dst = |dir: &Path| {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            path_str(&dir.join("dst.qcow2")),
            "8M",
        ]);
    };
    let run = |d: QmpDaemon, dir: &Path| {
        add_dst(dir);
        let mut c = d.connect_negotiated();
        ok(
            &mut c,
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "dst",
                   "file": {"driver": "file", "filename": path_str(&dir.join("dst.qcow2"))}}),
        );
        drop(c);
        synced(d, dir)
    };
    let want = run(QmpDaemon::qsd(&[]), q.path());
    let got = run(QmpDaemon::sluice(&[]), s.path());
    assert_eq!(
        want,
        [
            "blockdev-mirror ready, background: \"mirror\" false",
            "after the change: true",
            "drive-mirror none, write-blocking: \"mirror\" true",
            "active commit: \"commit\" null",
        ]
    );
    assert_eq!(got, want);
}

/// The qsd bug sluice does not copy (see `docs/compat/drive-mirror.md`): with sync=none and
/// copy-mode write-blocking, a 4 KiB write becomes a whole cluster of the new target, which
/// qsd fills with zeroes around the write (its target has no backing until the pivot).
/// sluice's target reads the source around it: after the pivot the guest sees its data.
#[test]
fn drive_mirror_write_blocking_sync_none_keeps_the_data_around_a_small_write() {
    let dir = chain();
    let dir = dir.path();
    let expected: PathBuf = dir.join("expected.raw");
    std::fs::copy(dir.join("flat.raw"), &expected).unwrap();
    let d = QmpDaemon::sluice(&[]);
    let mut c = setup(&d, dir);
    let mut client = Client::connect(&d.nbd_uri("vm"));
    let target = dir.join("wb.qcow2");
    let got = until_ready(
        &mut c,
        json!({"execute": "drive-mirror",
               "arguments": {"job-id": "m0", "device": "top", "target": path_str(&target),
                             "sync": "none", "copy-mode": "write-blocking",
                             "granularity": 4096}}),
    );
    assert_eq!(
        got,
        ["created", "running", "ready", "BLOCK_JOB_READY", "return"]
    );
    // base holds 0x11 at 0..2M: the cluster at 0 must keep it around the write.
    client.write(&expected, 4096, 4096, 0x77);
    client.write(&expected, 5 * MIB + 100, 10, 0x78);
    until_gone(
        &mut c,
        json!({"execute": "job-complete", "arguments": {"id": "m0"}}),
    );
    client.op("r", 0, 4096, 0x11);
    client.close();
    quit(c, d);
    assert_same(&target, &expected);
}
