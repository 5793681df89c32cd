//! Active `block-commit` over QMP (the top is the exported, written device): the job copies
//! what the layers above the base hold, reaches `ready` (BLOCK_JOB_READY), mirrors the
//! writes clients make through NBD, and on `job-complete` pivots: the export serves the
//! base from then on, on the connections already open too. Checked against the image files
//! with qemu-img check/compare, and the event sequences against qemu-storage-daemon's.
//! Also: writes during the copy phase, soft cancel (block-job-cancel without force while
//! ready: completes without pivot), forced cancel, and job-complete while paused (standby).

use crate::support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::image::{qcow2_over, qemu_img, qemu_img_check, qemu_io};
use support::live::{assert_same, query_job, run_names, Client};
use support::path_str;
use support::qmp::{file, ok, start_nbd, Qmp, QmpDaemon, JOB_RUNS_TO_THE_END};

const MIB: u64 = 1 << 20;

/// A job that ends successfully after the command's reply (job-complete, soft cancel): the
/// end of [`JOB_RUNS_TO_THE_END`], from the reply on.
const COMPLETED_AFTER_REPLY: &[&str] = JOB_RUNS_TO_THE_END.split_at(2).1;

/// Three 8 MiB qcow2 layers with unaligned data in each (mid with 4 KiB clusters and a zero
/// range over base data). Returns (dir, base, mid, top).
fn chain() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let (base, mid, top) = (p("base.qcow2"), p("mid.qcow2"), p("top.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&base), "8M"]);
    qemu_io(
        "qcow2",
        path_str(&base),
        &["write -P 0x11 0 2M", "write -P 0x12 6000001 77777"],
    );
    qcow2_over(&mid, "base.qcow2", &["-o", "cluster_size=4096"], Some("8M"));
    qcow2_over(&top, "mid.qcow2", &["-o", "cluster_size=65536"], Some("8M"));
    qemu_io(
        "qcow2",
        path_str(&mid),
        &[
            "write -P 0x21 100001 1300000",
            "write -z 1700000 10000",
            "write -P 0x22 4000003 5000",
        ],
    );
    qemu_io(
        "qcow2",
        path_str(&top),
        &[
            "write -P 0x31 200000 4321",
            "write -P 0x32 4001000 100",
            "write -P 0x33 5M 2M",
        ],
    );
    (dir, base, mid, top)
}

/// The chain added by name (base, mid read-only; top writable) and exported as `top`. The
/// file nodes under base and mid are not marked read-only: qsd then reopens the base
/// read-write for the commit (with a read-only file node it refuses).
fn setup(c: &mut Qmp, d: &QmpDaemon, base: &Path, mid: &Path, top: &Path) -> String {
    let file_of = |p: &Path| json!({"driver": "file", "filename": path_str(p)});
    for args in [
        json!({"driver": "qcow2", "node-name": "base", "read-only": true,
               "file": file_of(base)}),
        json!({"driver": "qcow2", "node-name": "mid", "read-only": true, "backing": "base",
               "file": file_of(mid)}),
        json!({"driver": "qcow2", "node-name": "top", "backing": "mid",
               "file": file(top, false)}),
    ] {
        ok(c, "blockdev-add", args);
    }
    start_nbd(c, d);
    ok(
        c,
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "top", "name": "disk", "writable": true}),
    );
    d.nbd_uri("disk")
}

/// A fresh [`chain`] exported by a daemon ([`setup`]), and the guest's view of its top now
/// (what the base must hold after the commit) in `expected.raw`. Returns (dir, base,
/// expected, daemon, monitor, NBD URI).
fn exported_chain() -> (tempfile::TempDir, PathBuf, PathBuf, QmpDaemon, Qmp, String) {
    let (dir, base, mid, top) = chain();
    let expected = dir.path().join("expected.raw");
    flatten(&top, &expected);
    let d = QmpDaemon::sluice(&[]);
    let mut c = d.connect_negotiated();
    let uri = setup(&mut c, &d, &base, &mid, &top);
    (dir, base, expected, d, c, uri)
}

/// Quits the daemon (which must exit 0), then checks the base: clean, and the same content
/// as `expected`.
fn quit_and_check_base(mut c: Qmp, mut d: QmpDaemon, base: &Path, expected: &Path) {
    ok(&mut c, "quit", json!({}));
    drop(c);
    assert!(d.wait().success());
    assert_clean(base);
    assert_same(base, expected);
}

/// The guest's view of `top` now, as a raw file (what the base must hold after a commit).
fn flatten(top: &Path, out: &Path) {
    qemu_img(&["convert", "-U", "-O", "raw", path_str(top), path_str(out)]);
}

/// Waits until the job has seen more than `len` bytes of work and copied everything it
/// knows of (offset == len).
fn wait_synced(c: &mut Qmp, len: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let j = query_job(c);
        if j["len"].as_u64() > Some(len) && j["offset"] == j["len"] && j["status"] == "ready" {
            return j;
        }
        assert!(Instant::now() < deadline, "never in sync: {j}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_clean(img: &Path) {
    let (code, out) = qemu_img_check(img);
    assert_eq!(code, 0, "qemu-img check {}: {out}", img.display());
}

#[test]
fn active_commit_mirrors_writes_and_pivots_the_export_to_the_base() {
    let (_dir, base, expected, d, mut c, uri) = exported_chain();
    let mut client = Client::connect(&uri);
    client.write(&expected, 3 * MIB + 7, 5000, 0xa0);

    let got = run_names(
        &mut c,
        json!({"execute": "block-commit",
               "arguments": {"job-id": "c0", "device": "top", "base-node": "base"}}),
        "BLOCK_JOB_READY",
    );
    assert_eq!(
        got,
        ["created", "running", "return", "ready", "BLOCK_JOB_READY"]
    );
    let ready = c.events.pop();
    assert!(ready.is_none(), "{ready:?}");
    let j = query_job(&mut c);
    assert_eq!(j["type"], "commit");
    assert_eq!(j["ready"], true);
    assert_eq!(j["offset"], j["len"]);

    // Writes while ready: over data of every layer, in holes, unaligned; the job mirrors
    // them (len grows with them).
    let len_at_ready = j["len"].as_u64().unwrap();
    client.write(&expected, 0, 4096, 0xa1);
    client.write(&expected, 150_000, 70_000, 0xa2);
    client.write(&expected, 7 * MIB + 5, 300_000, 0xa3);
    support::qemu_io(&uri, &["write -P 0xa4 5M 64k", "write -z 1M 128k"]);
    qemu_io(
        "raw",
        path_str(&expected),
        &["write -P 0xa4 5M 64k", "write -z 1M 128k"],
    );
    wait_synced(&mut c, len_at_ready);

    let got = run_names(
        &mut c,
        json!({"execute": "job-complete", "arguments": {"id": "c0"}}),
        "null",
    );
    assert_eq!(got, COMPLETED_AFTER_REPLY);
    let exports = c.exec("query-block-exports", json!({}));
    assert_eq!(exports["return"][0]["node-name"], "base", "{exports}");
    let nodes = c.exec("query-named-block-nodes", json!({"flat": true}));
    let base_info = nodes["return"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "base")
        .unwrap()
        .clone();
    assert_eq!(base_info["ro"], false, "{base_info}");

    // The connection opened before the pivot now reads and writes the base.
    client.op("r", 3 * MIB + 7, 5000, 0xa0);
    client.op("r", 5 * MIB, 65536, 0xa4);
    client.write(&expected, 6 * MIB, 100_000, 0xa5);
    client.op("f", 0, 0, 0);
    client.close();
    support::qemu_io(&uri, &["read -P 0xa5 6M 100000"]);

    ok(&mut c, "block-export-del", json!({"id": "e0"}));
    c.wait_event("BLOCK_EXPORT_DELETED");
    quit_and_check_base(c, d, &base, &expected);
    // The base's header is untouched: it has no backing, as before.
    let info = qemu_img(&["info", "--output=json", path_str(&base)]);
    assert!(!info.contains("backing-filename"), "{info}");
}

#[test]
fn active_commit_catches_writes_made_during_the_copy() {
    let (_dir, base, expected, d, mut c, uri) = exported_chain();
    // ~3.5 MiB to copy at 512 KiB/s: the writes below land while it runs, some in ranges
    // already copied, some ahead.
    let got = run_names(
        &mut c,
        json!({"execute": "block-commit",
               "arguments": {"job-id": "c0", "device": "top", "speed": MIB / 2}}),
        "return",
    );
    assert_eq!(got, ["created", "running", "return"]);
    let mut client = Client::connect(&uri);
    for (i, (off, len)) in [
        (0, 4096),
        (5 * MIB, 1000),
        (200_000, 64 * 1024),
        (7 * MIB, MIB),
    ]
    .into_iter()
    .enumerate()
    {
        client.write(&expected, off, len, 0xb0 + i as u8);
        std::thread::sleep(Duration::from_millis(200));
    }
    let j = query_job(&mut c);
    assert_eq!(
        j["status"], "running",
        "the copy ended before the writes: {j}"
    );
    ok(
        &mut c,
        "block-job-set-speed",
        json!({"device": "c0", "speed": 0}),
    );
    c.wait_event("BLOCK_JOB_READY");
    ok(&mut c, "block-job-complete", json!({"device": "c0"}));
    c.wait_event("BLOCK_JOB_COMPLETED");
    client.write(&expected, 2 * MIB, 4096, 0xbf);
    client.close();
    quit_and_check_base(c, d, &base, &expected);
}

#[test]
fn active_commit_soft_cancel_forced_cancel_and_complete_while_paused() {
    let (dir, base, mid, top) = chain();
    let d = QmpDaemon::sluice(&[]);
    let mut c = d.connect_negotiated();
    let uri = setup(&mut c, &d, &base, &mid, &top);
    let commit = json!({"execute": "block-commit",
                        "arguments": {"job-id": "c0", "device": "top"}});

    // Soft cancel: completes (BLOCK_JOB_COMPLETED) without the pivot.
    run_names(&mut c, commit.clone(), "BLOCK_JOB_READY");
    let got = run_names(
        &mut c,
        json!({"execute": "block-job-cancel", "arguments": {"device": "c0"}}),
        "null",
    );
    assert_eq!(got, COMPLETED_AFTER_REPLY);
    let exports = c.exec("query-block-exports", json!({}));
    assert_eq!(exports["return"][0]["node-name"], "top", "{exports}");
    // The export still writes the top, and the base holds what the top held.
    support::qemu_io(&uri, &["write -P 0xc1 0 4k"]);
    let in_base = support::run(
        "qemu-io",
        &[
            "-U",
            "-r",
            "-f",
            "qcow2",
            "-c",
            "read -P 0x33 5M 2M",
            path_str(&base),
        ],
    );
    assert!(in_base.contains("read 2097152/2097152"), "{in_base}");

    // Forced cancel while ready: BLOCK_JOB_CANCELLED, no pivot.
    run_names(&mut c, commit.clone(), "BLOCK_JOB_READY");
    let got = run_names(
        &mut c,
        json!({"execute": "job-cancel", "arguments": {"id": "c0"}}),
        "return",
    );
    assert_eq!(
        got,
        [
            "aborting",
            "BLOCK_JOB_CANCELLED",
            "concluded",
            "null",
            "return"
        ]
    );
    let exports = c.exec("query-block-exports", json!({}));
    assert_eq!(exports["return"][0]["node-name"], "top", "{exports}");

    // Paused in ready is standby; job-complete is accepted then and acts on resume.
    let expected = dir.path().join("expected.raw");
    flatten(&top, &expected);
    run_names(&mut c, commit, "BLOCK_JOB_READY");
    assert_eq!(
        run_names(
            &mut c,
            json!({"execute": "job-pause", "arguments": {"id": "c0"}}),
            "return"
        ),
        ["standby", "return"]
    );
    let j = query_job(&mut c);
    assert_eq!(
        (j["status"].as_str(), j["paused"].as_bool()),
        (Some("standby"), Some(true))
    );
    ok(&mut c, "job-complete", json!({"id": "c0"}));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(query_job(&mut c)["status"], "standby");
    let got = run_names(
        &mut c,
        json!({"execute": "job-resume", "arguments": {"id": "c0"}}),
        "null",
    );
    assert_eq!(
        got,
        [
            "ready",
            "return",
            "waiting",
            "pending",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
    let exports = c.exec("query-block-exports", json!({}));
    assert_eq!(exports["return"][0]["node-name"], "base", "{exports}");
    quit_and_check_base(c, d, &base, &expected);
}

/// The same active-commit scenario on qsd and on sluice, as message names and error
/// classes (job-complete while running depends on timing, so it is not in it).
fn scenario(d: &QmpDaemon, base: &Path, mid: &Path, top: &Path) -> Vec<String> {
    let mut c = d.connect_negotiated();
    setup(&mut c, d, base, mid, top);
    let mut out = Vec::new();
    let mut step = |c: &mut Qmp, cmd: Value, last: &str| {
        let got = run_names(c, cmd.clone(), last);
        eprintln!("{} -> {}", cmd["execute"], got.join(" "));
        out.push(format!("{} -> {}", cmd["execute"], got.join(" ")));
    };
    step(
        &mut c,
        json!({"execute": "block-commit", "arguments": {"job-id": "c0", "device": "top"}}),
        "BLOCK_JOB_READY",
    );
    for cmd in [
        json!({"execute": "job-finalize", "arguments": {"id": "c0"}}),
        json!({"execute": "job-dismiss", "arguments": {"id": "c0"}}),
        json!({"execute": "block-commit", "arguments": {"job-id": "c1", "device": "top"}}),
        json!({"execute": "block-job-pause", "arguments": {"device": "c0"}}),
        json!({"execute": "block-job-cancel", "arguments": {"device": "c0"}}),
        json!({"execute": "block-job-complete", "arguments": {"device": "c0"}}),
    ] {
        step(&mut c, cmd, "return");
    }
    step(
        &mut c,
        json!({"execute": "block-job-resume", "arguments": {"device": "c0"}}),
        "null",
    );
    step(&mut c, json!({"execute": "query-block-exports"}), "return");
    step(
        &mut c,
        json!({"execute": "block-commit", "arguments": {"job-id": "c2", "device": "base"}}),
        "return",
    );
    step(&mut c, json!({"execute": "query-jobs"}), "return");
    let j = c.exec("query-block-exports", json!({}));
    out.push(format!("export on {}", j["return"][0]["node-name"]));
    out
}

#[test]
fn active_commit_scenario_matches_qemu_storage_daemon_in_shape() {
    let (_d1, b1, m1, t1) = chain();
    let (_d2, b2, m2, t2) = chain();
    let sluice = scenario(&QmpDaemon::sluice(&[]), &b1, &m1, &t1);
    let qsd = scenario(&QmpDaemon::qsd(&[]), &b2, &m2, &t2);
    assert_eq!(sluice, qsd);
    // Both left the same base.
    qemu_img(&["compare", "-q", path_str(&b1), path_str(&b2)]);
}
