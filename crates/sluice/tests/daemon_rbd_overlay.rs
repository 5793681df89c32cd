//! qcow2 overlays over an `rbd` base in the daemon, on a real Ceph cluster
//! (`scripts/ceph-cluster.sh`, one cluster shared by this file's tests, torn down at exit):
//! an overlay put over the rbd node by `blockdev-snapshot` (reads fall through, writes land
//! in the overlay), `block-stream` from the rbd base into an overlay added with
//! `backing: <rbd node>`, and `block-commit` of a middle layer into the rbd base (after
//! which the image's exclusive lock is free again), and an active commit of an overlay
//! into the rbd base, completed (the base then writable, its lock let go of at exit).
//!
//! qemu-storage-daemon has no rbd driver here, so the reference for events and replies is
//! qsd running the same steps with a raw file holding the same bytes in the base's place;
//! the reference for the data is a model of the writes, `rbd export` of the image, and
//! `qemu-img compare` of the overlay against it.

use crate::support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::ceph::{self, Cluster};
use support::image::{image_info, nbdinfo_map, qemu_img};
use support::qmp::{names, ok, run_until, start_nbd, Qmp, QmpDaemon, JOB_RUNS_TO_THE_END};
use support::{assert_same_bytes, export_bytes, path_str, qemu_io, random_bytes};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;

/// Client writes through an export of the overlay: unaligned, across clusters, one zero
/// range over base data, and the model of what they leave.
const WRITES: [&str; 4] = [
    "write -P 0x61 1000 70000",
    "write -P 0x62 3M 64K",
    "write -z 5000000 100000",
    "write -P 0x63 8323072 65536",
];

/// `base` with [`WRITES`] applied.
fn after_writes(base: &[u8]) -> Vec<u8> {
    let mut want = base.to_vec();
    want[1000..71000].fill(0x61);
    want[3 * MIB as usize..3 * MIB as usize + 65536].fill(0x62);
    want[5_000_000..5_100_000].fill(0);
    want[8_323_072..8_388_608].fill(0x63);
    want
}

/// Where the base's bytes come from, in the daemon under test (an rbd image) and in the
/// reference daemon (a raw file: qsd has no rbd driver).
enum Base<'a> {
    Rbd(&'a Cluster, &'a str),
    Raw(&'a Path),
}

impl Base<'_> {
    /// `blockdev-add` options of the base node `base`.
    fn options(&self, read_only: bool) -> Value {
        match self {
            Base::Rbd(c, image) => json!({"driver": "rbd", "node-name": "base",
                "pool": "rbd", "image": image, "conf": c.conf_str(), "read-only": read_only}),
            // The file node inherits read-only (qsd reopens an explicitly read-only file
            // node for no commit: "Block node is read-only").
            Base::Raw(path) => json!({"driver": "raw", "node-name": "base",
                "read-only": read_only,
                "file": {"driver": "file", "filename": path_str(path)}}),
        }
    }

    fn daemon(&self) -> QmpDaemon {
        match self {
            Base::Rbd(..) => QmpDaemon::sluice(&[]),
            Base::Raw(_) => QmpDaemon::qsd(&[]),
        }
    }
}

/// A new rbd image `rbd/NAME` holding `bytes` (imported from a file), and the same bytes in
/// `DIR/NAME.raw` for the reference daemon.
fn image_with(c: &Cluster, dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let raw = dir.join(format!("{name}.raw"));
    std::fs::write(&raw, bytes).unwrap();
    c.rbd(&[
        "import",
        "--no-progress",
        path_str(&raw),
        &format!("rbd/{name}"),
    ]);
    raw
}

/// A new qcow2 image of [`SIZE`] without a backing file.
fn qcow2(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        path_str(&p),
        &SIZE.to_string(),
    ]);
    p
}

/// `blockdev-add` options of qcow2 node `node` over `path`, with `backing` as given.
fn qcow2_node(node: &str, path: &Path, backing: Value, read_only: bool) -> Value {
    json!({"driver": "qcow2", "node-name": node, "read-only": read_only, "backing": backing,
           "file": {"driver": "file", "filename": path_str(path), "read-only": read_only}})
}

/// Exports `node` writable as `node`, runs `cmds` through qemu-io, and returns what the
/// export then reads; the export is deleted again.
fn write_and_read(q: &mut Qmp, d: &QmpDaemon, node: &str, cmds: &[&str]) -> Vec<u8> {
    ok(
        q,
        "block-export-add",
        json!({"type": "nbd", "id": node, "node-name": node, "writable": true}),
    );
    let uri = d.nbd_uri(node);
    qemu_io(&uri, cmds);
    let bytes = export_bytes(&uri, d.dir.path());
    ok(q, "block-export-del", json!({"id": node}));
    support::qmp::wait_for(q, "BLOCK_EXPORT_DELETED", Duration::from_secs(10));
    bytes
}

/// `qemu-img convert` of qcow2 `image` alone (no backing is opened) to raw `out`, then
/// `qemu-img compare` with the raw file `want`.
fn assert_alone_equals(image: &Path, out: &Path, want: &Path) {
    qemu_img(&[
        "convert",
        "-U",
        "-f",
        "qcow2",
        "-O",
        "raw",
        path_str(image),
        path_str(out),
    ]);
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        path_str(out),
        path_str(want),
    ]);
}

/// Runs a job command until its job is gone (JOB_STATUS_CHANGE `null`); returns every
/// message read. A daemon that dies meanwhile fails the test with its stderr.
fn run_job(q: &mut Qmp, d: &mut QmpDaemon, cmd: Value) -> Vec<Value> {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_until(q, cmd, "null")));
    r.unwrap_or_else(|_| {
        d.assert_alive();
        panic!("the monitor connection closed; stderr:\n{}", d.stderr())
    })
}

/// Deletes nodes, newest first.
fn delete(q: &mut Qmp, nodes: &[&str]) {
    for n in nodes {
        ok(q, "blockdev-del", json!({"node-name": n}));
    }
}

/// `qemu:allocation-depth` of an export of `node` (added with `allocation-depth`), as
/// nbdinfo prints it; the export is deleted again.
fn depth_map(q: &mut Qmp, d: &QmpDaemon, node: &str) -> String {
    ok(
        q,
        "block-export-add",
        json!({"type": "nbd", "id": node, "node-name": node, "allocation-depth": true}),
    );
    let map = nbdinfo_map(&d.nbd_uri(node), "qemu:allocation-depth");
    ok(q, "block-export-del", json!({"id": node}));
    support::qmp::wait_for(q, "BLOCK_EXPORT_DELETED", Duration::from_secs(10));
    map
}

/// Scenario 1 on one daemon: the base node, an overlay added with `backing: null`, and
/// `blockdev-snapshot` onto it; writes through an export of the overlay. Returns the
/// snapshot's reply, what the export read, and its allocation depth.
fn snapshot_scenario(base: &Base<'_>, dir: &Path) -> (Value, Vec<u8>, String) {
    let d = base.daemon();
    let mut q = d.connect_negotiated();
    ok(&mut q, "blockdev-add", base.options(true));
    let top = qcow2(dir, "top.qcow2");
    ok(
        &mut q,
        "blockdev-add",
        qcow2_node("top", &top, Value::Null, false),
    );
    let reply = q.exec(
        "blockdev-snapshot",
        json!({"node": "base", "overlay": "top"}),
    );
    start_nbd(&mut q, &d);
    let read = write_and_read(&mut q, &d, "top", &WRITES);
    let depth = depth_map(&mut q, &d, "top");
    delete(&mut q, &["top", "base"]);
    (reply, read, depth)
}

#[test]
fn daemon_rbd_overlay_writes_land_in_overlay_and_reads_fall_through() {
    let c = ceph::shared();
    let dir = tempfile::tempdir().unwrap();
    let bytes = random_bytes(SIZE as usize, 17);
    let raw = image_with(c, dir.path(), "ovl-snap", &bytes);
    let want = after_writes(&bytes);

    let ours = tempfile::tempdir().unwrap();
    let (reply, read, depth) = snapshot_scenario(&Base::Rbd(c, "ovl-snap"), ours.path());
    let qsd = tempfile::tempdir().unwrap();
    let (qsd_reply, qsd_read, qsd_depth) = snapshot_scenario(&Base::Raw(&raw), qsd.path());
    assert_eq!(reply, qsd_reply, "blockdev-snapshot's reply, sluice vs qsd");
    // The written clusters at depth 1 (the overlay), the rest at depth 2 (the base), as
    // qsd reports them over a raw base.
    assert_eq!(depth, qsd_depth, "allocation depth, sluice vs qsd");
    assert!(
        depth.contains("1  local") && depth.contains("2  backing depth 2"),
        "{depth}"
    );
    assert_same_bytes(
        &qsd_read,
        &want,
        "qsd's overlay over a raw base vs the model",
    );
    assert_same_bytes(&read, &want, "the overlay over rbd vs the model");

    // The writes are in the overlay, not in the image.
    assert_same_bytes(
        &c.export_image("rbd/ovl-snap"),
        &bytes,
        "rbd export after writing the overlay",
    );
    // The overlay alone holds exactly the written clusters: what it reads without its
    // backing is the writes over zeroes, outside them nothing.
    let alone = dir.path().join("alone.raw");
    qemu_img(&[
        "convert",
        "-U",
        "-f",
        "qcow2",
        "-O",
        "raw",
        path_str(&ours.path().join("top.qcow2")),
        path_str(&alone),
    ]);
    let alone = std::fs::read(&alone).unwrap();
    assert_eq!(alone[1000], 0x61);
    assert_eq!(alone[3 * MIB as usize], 0x62);
    // The rest of the partly written clusters (64 KiB) was filled from the rbd base
    // (copy-on-write); the clusters after them are not in the overlay.
    assert_same_bytes(&alone[..1000], &bytes[..1000], "head of cluster 0");
    assert_same_bytes(
        &alone[71000..131072],
        &bytes[71000..131072],
        "tail of cluster 1",
    );
    assert!(alone[131072..3 * MIB as usize].iter().all(|&b| b == 0));
}

/// A daemon with the base node and, over it (`backing: "base"`), a new qcow2 overlay
/// `NAME.qcow2` named NAME, exported, into which [`WRITES`] went through the export.
fn written_overlay(base: &Base<'_>, dir: &Path, name: &str) -> (QmpDaemon, Qmp) {
    let d = base.daemon();
    let mut q = d.connect_negotiated();
    ok(&mut q, "blockdev-add", base.options(true));
    let path = qcow2(dir, &format!("{name}.qcow2"));
    ok(
        &mut q,
        "blockdev-add",
        qcow2_node(name, &path, json!("base"), false),
    );
    start_nbd(&mut q, &d);
    write_and_read(&mut q, &d, name, &WRITES);
    (d, q)
}

/// Scenario 2 on one daemon: an overlay added with `backing: "base"`, written through an
/// export, then `block-stream` of the whole chain into it. Returns the stream's messages.
fn stream_scenario(base: &Base<'_>, dir: &Path) -> Vec<Value> {
    let (mut d, mut q) = written_overlay(base, dir, "top");
    let msgs = run_job(
        &mut q,
        &mut d,
        json!({"execute": "block-stream", "arguments": {"job-id": "s0", "device": "top"}}),
    );
    delete(&mut q, &["top", "base"]);
    msgs
}

#[test]
fn daemon_rbd_overlay_block_stream_copies_the_rbd_base_up() {
    let c = ceph::shared();
    let dir = tempfile::tempdir().unwrap();
    let bytes = random_bytes(SIZE as usize, 23);
    let raw = image_with(c, dir.path(), "ovl-stream", &bytes);
    let want = dir.path().join("want.raw");
    std::fs::write(&want, after_writes(&bytes)).unwrap();

    let ours = tempfile::tempdir().unwrap();
    let msgs = stream_scenario(&Base::Rbd(c, "ovl-stream"), ours.path());
    let qsd = tempfile::tempdir().unwrap();
    let qsd_msgs = stream_scenario(&Base::Raw(&raw), qsd.path());
    assert_eq!(names(&qsd_msgs), JOB_RUNS_TO_THE_END, "qsd: {qsd_msgs:?}");
    assert_eq!(names(&msgs), names(&qsd_msgs), "sluice: {msgs:?}");
    let completed = |m: &[Value]| m[5]["data"].clone();
    assert_eq!(completed(&msgs), completed(&qsd_msgs));
    assert_eq!(
        completed(&msgs),
        json!({"type": "stream", "device": "s0", "len": SIZE, "offset": SIZE, "speed": 0})
    );

    // The overlay stands alone now: no backing in its header, every byte its own.
    let top = ours.path().join("top.qcow2");
    let info = image_info(&top);
    assert!(info.get("backing-filename").is_none(), "{info}");
    assert_alone_equals(&top, &dir.path().join("streamed.raw"), &want);
    // The rbd image was only read.
    assert_same_bytes(
        &c.export_image("rbd/ovl-stream"),
        &bytes,
        "rbd export after the stream",
    );
}

/// Scenario 3 on one daemon: base <- mid (`backing: "base"`, written through an export)
/// <- top (a `blockdev-snapshot` of mid), then `block-commit` of mid into the base.
/// Returns the commit's messages; the daemon stays up (the base node open, read-only) for
/// the lock check.
fn commit_scenario(base: &Base<'_>, dir: &Path) -> (QmpDaemon, Qmp, Vec<Value>) {
    let (mut d, mut q) = written_overlay(base, dir, "mid");
    let top = qcow2(dir, "top.qcow2");
    ok(
        &mut q,
        "blockdev-add",
        qcow2_node("top", &top, Value::Null, false),
    );
    ok(
        &mut q,
        "blockdev-snapshot",
        json!({"node": "mid", "overlay": "top"}),
    );
    let msgs = run_job(
        &mut q,
        &mut d,
        json!({"execute": "block-commit", "arguments": {"job-id": "c0", "device": "top",
               "top-node": "mid", "base-node": "base"}}),
    );
    (d, q, msgs)
}

#[test]
fn daemon_rbd_overlay_block_commit_writes_into_rbd_and_frees_its_lock() {
    let c = ceph::shared();
    let dir = tempfile::tempdir().unwrap();
    let bytes = random_bytes(SIZE as usize, 29);
    let raw = image_with(c, dir.path(), "ovl-commit", &bytes);
    let want = after_writes(&bytes);

    let qsd = tempfile::tempdir().unwrap();
    let (_qd, _qq, qsd_msgs) = commit_scenario(&Base::Raw(&raw), qsd.path());
    assert_eq!(names(&qsd_msgs), JOB_RUNS_TO_THE_END, "qsd: {qsd_msgs:?}");

    let ours = tempfile::tempdir().unwrap();
    let (d, mut q, msgs) = commit_scenario(&Base::Rbd(c, "ovl-commit"), ours.path());
    assert_eq!(names(&msgs), names(&qsd_msgs), "sluice: {msgs:?}");
    assert_eq!(msgs[5]["data"], qsd_msgs[5]["data"]);
    assert_eq!(
        msgs[5]["data"],
        json!({"type": "commit", "device": "c0", "len": SIZE, "offset": SIZE, "speed": 0})
    );

    // The data is in the image, as `rbd export` reads it.
    assert_same_bytes(
        &c.export_image("rbd/ovl-commit"),
        &want,
        "rbd export after the commit",
    );
    // The lock went with the job: another writer takes it at once (a snapshot needs it),
    // while the daemon still has the base open (read-only).
    let start = Instant::now();
    c.rbd(&["snap", "create", "rbd/ovl-commit@after"]);
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "the image's lock was still held: {:?}",
        start.elapsed()
    );

    // top now stands on the rbd base and reads the same through it.
    assert_same_bytes(
        &write_and_read(&mut q, &d, "top", &["flush"]),
        &want,
        "top over the committed base",
    );
    delete(&mut q, &["top", "mid", "base"]);
}

/// Scenario 4 on one daemon: an overlay added with `backing: "base"`, written through an
/// export, then an active `block-commit` of it into the base, completed. Returns the
/// messages up to READY and from `job-complete` on; the daemon is then told to quit with
/// the base (writable since the pivot) still open.
fn active_commit_scenario(base: &Base<'_>, dir: &Path) -> (Vec<Value>, Vec<Value>) {
    let (mut d, mut q) = written_overlay(base, dir, "top");
    let ready = run_until(
        &mut q,
        json!({"execute": "block-commit", "arguments": {"job-id": "c0", "device": "top",
               "base-node": "base"}}),
        "BLOCK_JOB_READY",
    );
    let done = run_until(
        &mut q,
        json!({"execute": "job-complete", "arguments": {"id": "c0"}}),
        "null",
    );
    ok(&mut q, "quit", json!({}));
    assert!(d.wait().success(), "{}", d.stderr());
    (ready, done)
}

#[test]
fn daemon_rbd_overlay_active_commit_pivots_onto_rbd_and_frees_its_lock_at_exit() {
    let c = ceph::shared();
    let dir = tempfile::tempdir().unwrap();
    let bytes = random_bytes(SIZE as usize, 31);
    let raw = image_with(c, dir.path(), "ovl-active", &bytes);
    let want = after_writes(&bytes);

    let qsd = tempfile::tempdir().unwrap();
    let (qsd_ready, qsd_done) = active_commit_scenario(&Base::Raw(&raw), qsd.path());
    let ours = tempfile::tempdir().unwrap();
    let (ready, done) = active_commit_scenario(&Base::Rbd(c, "ovl-active"), ours.path());
    assert_eq!(names(&ready), names(&qsd_ready), "sluice: {ready:?}");
    assert_eq!(names(&done), names(&qsd_done), "sluice: {done:?}");
    assert_same_bytes(
        &c.export_image("rbd/ovl-active"),
        &want,
        "rbd export after the active commit",
    );
    // The base was writable after the pivot (holding the image's lock); the daemon let go
    // of the lock at exit, so a plain writable open (no break-lock) takes it at once, where
    // a lock left to time out would take ~30 s. (Not a snapshot: its notification waits
    // for the exited daemon's watch to time out, lock or no lock.)
    let start = Instant::now();
    let next = QmpDaemon::sluice(&[]);
    let mut nq = next.connect_negotiated();
    ok(
        &mut nq,
        "blockdev-add",
        Base::Rbd(c, "ovl-active").options(false),
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "the image's lock was still held: {:?}",
        start.elapsed()
    );
}
