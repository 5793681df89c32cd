//! `blockdev-backup` and `transaction` (issue #15 items 4 and 5) on qemu-storage-daemon and
//! `sluice daemon`, each on a fresh copy of the same images, compared: the events of each
//! job, its BLOCK_JOB_COMPLETED / BLOCK_JOB_CANCELLED data, every refusal's class and
//! message, the bitmaps afterwards, and the bytes of the backups (`qemu-img compare`).
//!
//! Deliberate difference: qsd drains the source around the start of a backup and around
//! export changes, so its job also reports `paused` then `running` there; sluice has no
//! drain and sends neither. Those pairs are dropped from qsd's events before comparing.

use crate::support;

use std::path::Path;

use serde_json::{json, Value};
use support::image::{qemu_img, qemu_io as qemu_io_image};
use support::path_str;
use support::qmp::{names, run_until, Qmp, QmpDaemon};

/// Event and reply names, without qsd's drain pairs (see the module doc).
fn flow(msgs: &[Value]) -> Vec<String> {
    let all = names(msgs);
    let mut out: Vec<String> = Vec::new();
    for n in all {
        if n == "running" && out.last().is_some_and(|l| l == "paused") {
            out.pop();
            continue;
        }
        out.push(n);
    }
    out
}

/// A job-end event's data without the timestamp.
fn end_data(msgs: &[Value], event: &str) -> Value {
    msgs.iter()
        .find(|m| m["event"] == event)
        .map(|m| m["data"].clone())
        .unwrap_or(Value::Null)
}

/// A reply's shape: `"ok"` or class and desc.
fn shape(r: &Value) -> Value {
    match r.get("error") {
        Some(e) => json!({"class": e["class"], "desc": e["desc"]}),
        None => json!("ok"),
    }
}

fn add_qcow2(q: &mut Qmp, name: &str, path: &Path, backing: Option<&str>) {
    let r = q.exec(
        "blockdev-add",
        json!({"driver": "file", "node-name": format!("{name}-f"), "filename": path_str(path)}),
    );
    assert_eq!(r, json!({"return": {}}));
    let mut args = json!({"driver": "qcow2", "node-name": name, "file": format!("{name}-f")});
    if let Some(b) = backing {
        args["backing"] = json!(b);
    }
    assert_eq!(q.exec("blockdev-add", args), json!({"return": {}}));
}

fn qcow2(path: &Path, size: &str) {
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(path), size]);
}

fn dirty_bitmaps(q: &mut Qmp, node: &str) -> Value {
    let r = q.exec("query-named-block-nodes", json!({}));
    r["return"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == node)
        .and_then(|n| n.get("dirty-bitmaps").cloned())
        .unwrap_or(Value::Null)
}

/// `qemu-img compare` of two images: true if they read the same.
fn same_content(a: &Path, b: &Path) -> bool {
    support::output("qemu-img", &["compare", "-q", path_str(a), path_str(b)])
        .status
        .success()
}

/// The push flow (libvirt's full then incremental backup) in `dir` on one daemon:
/// returns the transcript, and checks the backups' bytes on the way.
fn push_flow(d: &QmpDaemon, dir: &Path) -> Vec<(String, Value)> {
    let p = |n: &str| dir.join(n);
    qcow2(&p("disk.qcow2"), "64M");
    qemu_io_image("qcow2", path_str(&p("disk.qcow2")), &["write -P 0x11 0 4M"]);
    std::fs::copy(p("disk.qcow2"), p("t0.qcow2")).unwrap();
    qcow2(&p("full.qcow2"), "64M");
    qcow2(&p("inc.qcow2"), "64M");
    let mut q = d.connect_negotiated();
    let mut out = Vec::new();
    add_qcow2(&mut q, "disk", &p("disk.qcow2"), None);
    add_qcow2(&mut q, "full", &p("full.qcow2"), None);
    add_qcow2(&mut q, "inc", &p("inc.qcow2"), None);
    // The checkpoint and the full backup in one transaction.
    let msgs = run_until(
        &mut q,
        json!({"execute": "transaction", "arguments": {"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "b0"}},
            {"type": "blockdev-backup", "data": {"device": "disk", "job-id": "full",
                "target": "full", "sync": "full"}}]}}),
        "null",
    );
    out.push(("full: events".into(), json!(flow(&msgs))));
    out.push((
        "full: BLOCK_JOB_COMPLETED".into(),
        end_data(&msgs, "BLOCK_JOB_COMPLETED"),
    ));
    // Writes after the checkpoint, through an export.
    let sock = d.path("nbd.sock");
    let r = q.exec(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": path_str(&sock)}}}),
    );
    assert_eq!(r, json!({"return": {}}));
    let r = q.exec(
        "block-export-add",
        json!({"type": "nbd", "id": "vm", "node-name": "disk", "writable": true}),
    );
    assert_eq!(r, json!({"return": {}}));
    support::qemu_io(
        &d.nbd_uri("disk"),
        &[
            "write -P 0x22 8M 64k",
            "write -P 0x23 20M 128k",
            "write -P 0x24 33000 1000",
            "write -z 1M 64k",
        ],
    );
    out.push(("b0 after writes".into(), dirty_bitmaps(&mut q, "disk")));
    let msgs = run_until(
        &mut q,
        json!({"execute": "blockdev-backup", "arguments": {"job-id": "inc", "device": "disk",
            "target": "inc", "sync": "incremental", "bitmap": "b0"}}),
        "null",
    );
    out.push(("inc: events".into(), json!(flow(&msgs))));
    out.push((
        "inc: BLOCK_JOB_COMPLETED".into(),
        end_data(&msgs, "BLOCK_JOB_COMPLETED"),
    ));
    // on-success: the bitmap now holds only what was written since the incremental began.
    out.push(("b0 after inc".into(), dirty_bitmaps(&mut q, "disk")));
    let r = q.exec("quit", json!({}));
    assert_eq!(r, json!({"return": {}}));
    drop(q);
    // The full backup is the disk at its start; full + incremental is the disk now.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        same_content(&p("full.qcow2"), &p("t0.qcow2")),
        "full backup differs from the disk at its start"
    );
    qemu_img(&[
        "rebase",
        "-u",
        "-q",
        "-f",
        "qcow2",
        "-b",
        path_str(&p("full.qcow2")),
        "-F",
        "qcow2",
        path_str(&p("inc.qcow2")),
    ]);
    assert!(
        same_content(&p("inc.qcow2"), &p("disk.qcow2")),
        "full + incremental differs from the disk"
    );
    // The incremental holds only the dirty clusters (and their metadata).
    let map = support::image::qemu_img_map(path_str(&p("inc.qcow2")));
    let runs: Vec<(u64, u64)> = serde_json::from_str::<Value>(&map)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    out.push(("inc.qcow2 own extents".into(), json!(runs)));
    out
}

#[test]
fn push_full_then_incremental_matches_qsd_and_restores_the_disk() {
    let (dq, ds) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let qsd = push_flow(&QmpDaemon::qsd(&[]), dq.path());
    let sluice = push_flow(&QmpDaemon::sluice(&[]), ds.path());
    assert_eq!(qsd, sluice);
    let completed = &sluice[1].1;
    assert_eq!(completed["len"], 67108864, "{completed}");
    assert_eq!(completed["type"], "backup");
    // Three 64 KiB blocks (block 0, 8 MiB, 1 MiB) and two at 20 MiB.
    assert_eq!(sluice[4].1["len"], 5 * 65536, "{:?}", sluice[4]);
}

/// Refusals, in qsd's order and words, and transactions that fail half-way.
fn refusals(d: &QmpDaemon, dir: &Path) -> Vec<(String, Value)> {
    let p = |n: &str| dir.join(n);
    qcow2(&p("disk.qcow2"), "64M");
    qcow2(&p("t.qcow2"), "64M");
    qcow2(&p("small.qcow2"), "32M");
    let mut q = d.connect_negotiated();
    add_qcow2(&mut q, "disk", &p("disk.qcow2"), None);
    add_qcow2(&mut q, "t", &p("t.qcow2"), None);
    add_qcow2(&mut q, "small", &p("small.qcow2"), None);
    let mut out = Vec::new();
    let mut run = |q: &mut Qmp, name: &str, args: Value| {
        let r = q.exec(name, args.clone());
        out.push((format!("{name} {args}"), shape(&r)));
    };
    run(
        &mut q,
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "b0"}),
    );
    let backup = |extra: Value| {
        let mut a = json!({"job-id": "j", "device": "disk", "target": "t", "sync": "full"});
        for (k, v) in extra.as_object().unwrap() {
            a[k] = v.clone();
        }
        a
    };
    for args in [
        backup(json!({"device": "nope"})),
        backup(json!({"target": "nope"})),
        backup(json!({"sync": "bitmap"})),
        backup(json!({"sync": "incremental"})),
        backup(json!({"sync": "incremental", "bitmap": "b0", "bitmap-mode": "never"})),
        backup(json!({"sync": "bitmap", "bitmap": "zz", "bitmap-mode": "never"})),
        backup(json!({"sync": "bitmap", "bitmap": "b0"})),
        backup(json!({"sync": "none", "bitmap": "b0", "bitmap-mode": "always"})),
        backup(json!({"bitmap": "b0", "bitmap-mode": "never"})),
        backup(json!({"bitmap-mode": "always"})),
        backup(json!({"target": "disk"})),
        backup(json!({"target": "small"})),
        backup(json!({"job-id": "1x"})),
        backup(json!({"speed": -1})),
    ] {
        run(&mut q, "blockdev-backup", args);
    }
    // All or nothing: the add and the disable before the failing action are undone.
    let tx = |actions: Value| json!({"actions": actions});
    for args in [
        tx(json!([
            {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "t1"}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "disk", "name": "b0"}},
            {"type": "abort", "data": {}}
        ])),
        tx(json!([
            {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "t2"}},
            {"type": "block-dirty-bitmap-clear", "data": {"node": "disk", "name": "b0"}},
            {"type": "block-dirty-bitmap-merge", "data": {"node": "disk", "target": "b0",
                "bitmaps": ["zz"]}}
        ])),
        tx(json!([
            {"type": "block-dirty-bitmap-remove", "data": {"node": "disk", "name": "b0"}},
            {"type": "blockdev-backup", "data": {"device": "disk", "target": "small",
                "sync": "full", "job-id": "j"}}
        ])),
        json!({"actions": [{"type": "block-dirty-bitmap-add",
            "data": {"node": "disk", "name": "g"}}],
            "properties": {"completion-mode": "grouped"}}),
        tx(json!([])),
    ] {
        run(&mut q, "transaction", args);
    }
    out.push(("bitmaps after".into(), dirty_bitmaps(&mut q, "disk")));
    out
}

#[test]
fn refusals_and_failed_transactions_match_qsd() {
    let (dq, ds) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let qsd = refusals(&QmpDaemon::qsd(&[]), dq.path());
    let sluice = refusals(&QmpDaemon::sluice(&[]), ds.path());
    assert_eq!(qsd.len(), sluice.len());
    let diffs: Vec<String> = qsd
        .iter()
        .zip(&sluice)
        .filter(|((_, a), (_, b))| a != b)
        .map(|((w, a), (_, b))| format!("{w}\n  qsd:    {a}\n  sluice: {b}"))
        .collect();
    assert!(diffs.is_empty(), "differences:\n{}", diffs.join("\n"));
    // The failed transactions left b0 as it was: recording, nothing added.
    let last = &sluice.last().unwrap().1;
    assert_eq!(last.as_array().unwrap().len(), 1, "{last}");
    assert_eq!(last[0]["recording"], true);
}

/// libvirt's pull mode: a scratch over the live disk, backup sync=none, the scratch
/// exported with the merged bitmap while the VM writes. Returns the transcript.
fn pull_flow(d: &QmpDaemon, dir: &Path) -> Vec<(String, Value)> {
    let p = |n: &str| dir.join(n);
    qcow2(&p("disk.qcow2"), "64M");
    qemu_io_image("qcow2", path_str(&p("disk.qcow2")), &["write -P 0x11 0 4M"]);
    qcow2(&p("scratch.qcow2"), "64M");
    let mut q = d.connect_negotiated();
    let mut out = Vec::new();
    add_qcow2(&mut q, "disk", &p("disk.qcow2"), None);
    let r = q.exec(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "b0"}),
    );
    assert_eq!(r, json!({"return": {}}));
    let sock = d.path("nbd.sock");
    let r = q.exec(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": path_str(&sock)}}}),
    );
    assert_eq!(r, json!({"return": {}}));
    let r = q.exec(
        "block-export-add",
        json!({"type": "nbd", "id": "vm", "node-name": "disk", "name": "vm", "writable": true}),
    );
    assert_eq!(r, json!({"return": {}}));
    support::qemu_io(&d.nbd_uri("vm"), &["write -P 0x22 8M 64k"]);
    add_qcow2(&mut q, "scratch", &p("scratch.qcow2"), Some("disk"));
    let msgs = run_until(
        &mut q,
        json!({"execute": "transaction", "arguments": {"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "scratch", "name": "backup-vm",
                "disabled": true}},
            {"type": "block-dirty-bitmap-merge", "data": {"node": "scratch",
                "target": "backup-vm", "bitmaps": [{"node": "disk", "name": "b0"}]}},
            {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "b1"}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "disk", "name": "b0"}},
            {"type": "blockdev-backup", "data": {"device": "disk", "job-id": "backup-vm",
                "target": "scratch", "sync": "none"}}]}}),
        "return",
    );
    out.push(("transaction".into(), json!(flow(&msgs))));
    let r = q.exec(
        "block-export-add",
        json!({"type": "nbd", "id": "backup", "node-name": "scratch", "name": "backup-vm",
               "writable": false, "bitmaps": ["backup-vm"]}),
    );
    out.push(("export scratch".into(), shape(&r)));
    // The VM overwrites the range the backup is about; the scratch still reads the old.
    support::qemu_io(
        &d.nbd_uri("vm"),
        &["write -P 0x33 8M 64k", "write -P 0x44 0 4k"],
    );
    let scratch = d.nbd_uri("backup-vm");
    support::qemu_io_with(
        &["-r"],
        &scratch,
        &[
            "read -P 0x22 8M 64k",
            "read -P 0x11 0 4k",
            "read -P 0 60M 4k",
        ],
    );
    support::qemu_io(
        &d.nbd_uri("vm"),
        &["read -P 0x33 8M 64k", "read -P 0x44 0 4k"],
    );
    out.push((
        "map backup-vm".into(),
        json!(support::image::nbdinfo_map(
            &scratch,
            "qemu:dirty-bitmap:backup-vm"
        )),
    ));
    let r = q.exec("block-export-del", json!({"id": "backup"}));
    out.push(("export-del".into(), shape(&r)));
    let msgs = run_until(
        &mut q,
        json!({"execute": "job-cancel", "arguments": {"id": "backup-vm"}}),
        "return",
    );
    out.push(("job-cancel".into(), json!(flow(&msgs))));
    out.push((
        "BLOCK_JOB_CANCELLED".into(),
        end_data(&msgs, "BLOCK_JOB_CANCELLED"),
    ));
    for node in ["scratch", "scratch-f"] {
        let r = q.exec("blockdev-del", json!({"node-name": node}));
        out.push((format!("blockdev-del {node}"), shape(&r)));
    }
    out.push(("disk bitmaps".into(), dirty_bitmaps(&mut q, "disk")));
    out
}

#[test]
fn pull_mode_scratch_keeps_the_point_in_time_and_matches_qsd() {
    let (dq, ds) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let qsd = pull_flow(&QmpDaemon::qsd(&[]), dq.path());
    let sluice = pull_flow(&QmpDaemon::sluice(&[]), ds.path());
    assert_eq!(qsd, sluice);
    let map = sluice.iter().find(|(w, _)| w == "map backup-vm").unwrap();
    assert!(
        map.1
            .as_str()
            .unwrap()
            .contains("   8388608       65536    1  dirty"),
        "{map:?}"
    );
}

/// A full backup under a client writing all over the disk while it copies (the job is
/// slowed by `speed`): the target is the disk as it was at the start.
#[test]
fn full_backup_under_writes_is_the_point_in_time() {
    let d = QmpDaemon::sluice(&[]);
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    qcow2(&p("disk.qcow2"), "16M");
    qemu_io_image(
        "qcow2",
        path_str(&p("disk.qcow2")),
        &["write -P 0x11 0 6M", "write -P 0x12 10M 6M"],
    );
    std::fs::copy(p("disk.qcow2"), p("t0.qcow2")).unwrap();
    qcow2(&p("full.qcow2"), "16M");
    let mut q = d.connect_negotiated();
    add_qcow2(&mut q, "disk", &p("disk.qcow2"), None);
    add_qcow2(&mut q, "full", &p("full.qcow2"), None);
    support::qmp::start_nbd(&mut q, &d);
    let r = q.exec(
        "block-export-add",
        json!({"type": "nbd", "id": "vm", "node-name": "disk", "writable": true}),
    );
    assert_eq!(r, json!({"return": {}}));
    // 16 MiB at 8 MiB/s: about two seconds of copying to write into.
    let r = q.exec(
        "blockdev-backup",
        json!({"job-id": "full", "device": "disk", "target": "full", "sync": "full",
               "speed": 8 << 20}),
    );
    assert_eq!(r, json!({"return": {}}));
    let mut cmds = Vec::new();
    for i in 0..16u64 {
        cmds.push(format!("write -P {} {}M 64k", 0x40 + i, 15 - i));
        cmds.push(format!("write -z {}k 4k", i * 1000));
    }
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    support::qemu_io(&d.nbd_uri("disk"), &cmds);
    let done = support::qmp::wait_for(
        &mut q,
        "BLOCK_JOB_COMPLETED",
        std::time::Duration::from_secs(30),
    );
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(q.exec("quit", json!({})), json!({"return": {}}));
    drop(q);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        same_content(&p("full.qcow2"), &p("t0.qcow2")),
        "the backup is not the disk at its start"
    );
    assert!(!same_content(&p("disk.qcow2"), &p("t0.qcow2")));
}
