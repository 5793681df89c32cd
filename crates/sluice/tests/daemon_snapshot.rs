//! External snapshots over QMP, run on sluice and on qemu-storage-daemon alike:
//! `blockdev-snapshot-sync` and `blockdev-snapshot` taken while a python3-libnbd client
//! writes through the export. Every write must land exactly once, on the right layer: the
//! writes that reached the old image form a prefix of the client's sequence, the rest are
//! in the overlay, and the chain equals a model of all writes. The export moves to the
//! overlay as in qsd. The refusals are compared with qsd's messages.

use crate::support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use support::image::{qemu_img, qemu_img_check};
use support::path_str;
use support::qmp::{ok, Qmp, QmpDaemon};

/// Writes it makes; write `i` puts byte `i % 250 + 1` over 4 KiB at `i * 32 KiB`.
const WRITES: u64 = 200;

const WRITER: &str = r#"
import nbd, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for i in range(int(sys.argv[2])):
    h.pwrite(bytes([i % 250 + 1]) * 4096, i * 32768)
    if i == 10:
        print("started", flush=True)
    time.sleep(0.002)
h.flush()
h.shutdown()
print("done", flush=True)
"#;

/// The byte write `i` leaves at its range.
fn byte(i: u64) -> u8 {
    (i % 250 + 1) as u8
}

/// The first byte of every write's range in `raw` (a raw image file).
fn firsts(raw: &Path) -> Vec<u8> {
    let data = std::fs::read(raw).unwrap();
    (0..WRITES).map(|i| data[(i * 32768) as usize]).collect()
}

/// On daemon `d`: a new empty qcow2 `base.qcow2` of `size` added as node `node`, the NBD
/// server started, and the node exported writable as `name` (export id `id`). Returns the
/// negotiated monitor.
fn exported_base(d: &QmpDaemon, size: &str, node: &str, id: &str, name: &str) -> Qmp {
    let base = d.path("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&base), size]);
    let mut c = d.connect_negotiated();
    ok(
        &mut c,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": node,
               "file": {"driver": "file", "filename": path_str(&base)}}),
    );
    support::qmp::start_nbd(&mut c, d);
    ok(
        &mut c,
        "block-export-add",
        json!({"type": "nbd", "id": id, "node-name": node, "name": name, "writable": true}),
    );
    c
}

/// One scenario on daemon `d`: an empty 8 MiB base.qcow2
/// exported writable as `vm`, the writer running, a snapshot taken by `take` meanwhile.
/// Returns `query-block-exports` after the snapshot.
fn live_snapshot(d: &mut QmpDaemon, take: &dyn Fn(&mut Qmp, &QmpDaemon)) -> Value {
    let mut c = exported_base(d, "8M", "disk", "e0", "vm");
    let mut w = Command::new("/usr/bin/python3")
        .args(["-c", WRITER, &d.nbd_uri("vm"), &WRITES.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3-libnbd");
    let mut out = BufReader::new(w.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "started");
    take(&mut c, d);
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "done");
    assert!(w.wait().unwrap().success());
    let exports = c.exec("query-block-exports", json!({}));
    ok(&mut c, "quit", json!({}));
    assert!(d.wait().success());
    exports["return"].clone()
}

/// The checks after a live snapshot of base.qcow2 onto `overlay` (see the module doc).
fn check_layers(d: &QmpDaemon, overlay: &str) {
    let base = d.path("base.qcow2");
    let top = d.path(overlay);
    assert_eq!(qemu_img_check(&base).0, 0);
    assert_eq!(qemu_img_check(&top).0, 0);
    let (braw, traw) = (d.path("base.raw"), d.path("top.raw"));
    qemu_img(&["convert", "-O", "raw", path_str(&base), path_str(&braw)]);
    qemu_img(&["convert", "-O", "raw", path_str(&top), path_str(&traw)]);
    // The whole chain holds every write.
    let want: Vec<u8> = (0..WRITES).map(byte).collect();
    assert_eq!(firsts(&traw), want, "a write is missing from the chain");
    // The old image holds a prefix of them, and nothing of the rest.
    let b = firsts(&braw);
    let k = b.iter().position(|&x| x == 0).unwrap_or(WRITES as usize);
    assert!(k >= 10, "the snapshot came after the writer started: {k}");
    assert!(
        k < WRITES as usize,
        "the snapshot came before the writer ended: {k}"
    );
    assert_eq!(&b[..k], &want[..k]);
    assert!(
        b[k..].iter().all(|&x| x == 0),
        "a write after the snapshot landed in the base: {b:?}"
    );
}

#[test]
fn blockdev_snapshot_sync_under_a_writer_loses_nothing_and_moves_the_export() {
    let take = |c: &mut Qmp, d: &QmpDaemon| {
        ok(
            c,
            "blockdev-snapshot-sync",
            json!({"node-name": "disk", "snapshot-file": path_str(&d.path("snap.qcow2")),
                   "snapshot-node-name": "snap"}),
        );
    };
    let mut exports = Vec::new();
    for mut d in [QmpDaemon::sluice(&[]), QmpDaemon::qsd(&[])] {
        exports.push(live_snapshot(&mut d, &take));
        check_layers(&d, "snap.qcow2");
        // The overlay names the old image and its format, as qemu-img would.
        let info = support::image::image_info(&d.path("snap.qcow2"));
        assert_eq!(info["backing-filename"], path_str(&d.path("base.qcow2")));
        assert_eq!(info["backing-filename-format"], "qcow2");
    }
    assert_eq!(exports[0], exports[1]);
    assert_eq!(exports[0][0]["node-name"], "snap");
}

#[test]
fn blockdev_snapshot_under_a_writer_loses_nothing_and_moves_the_export() {
    let take = |c: &mut Qmp, d: &QmpDaemon| {
        let ov = d.path("ov.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            path_str(&d.path("base.qcow2")),
            "-F",
            "qcow2",
            "-u",
            path_str(&ov),
            "8M",
        ]);
        ok(
            c,
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "ov", "backing": null,
                   "file": {"driver": "file", "filename": path_str(&ov)}}),
        );
        ok(
            c,
            "blockdev-snapshot",
            json!({"node": "disk", "overlay": "ov"}),
        );
    };
    let mut exports = Vec::new();
    for mut d in [QmpDaemon::sluice(&[]), QmpDaemon::qsd(&[])] {
        exports.push(live_snapshot(&mut d, &take));
        check_layers(&d, "ov.qcow2");
    }
    assert_eq!(exports[0], exports[1]);
    assert_eq!(exports[0][0]["node-name"], "ov");
}

/// The refusals (and the node states after) on one daemon.
fn refusals(d: &QmpDaemon) -> Vec<Value> {
    let p = |n: &str| path_str(&d.path(n)).to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &p("b.qcow2"), "4M"]);
    qemu_img(&["create", "-q", "-f", "qcow2", &p("o1.qcow2"), "4M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &p("b.qcow2"),
        "-F",
        "qcow2",
        &p("o2.qcow2"),
    ]);
    let mut c = d.connect_negotiated();
    let f = |n: &str| json!({"driver": "file", "filename": p(n)});
    ok(
        &mut c,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "b", "file": f("b.qcow2")}),
    );
    ok(
        &mut c,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "o1", "file": f("o1.qcow2")}),
    );
    ok(
        &mut c,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "o2", "file": f("o2.qcow2"), "backing": null}),
    );
    support::qmp::start_nbd(&mut c, d);
    let mut got = Vec::new();
    let mut run = |c: &mut Qmp, cmd: &str, args: Value| {
        let r = c.exec(cmd, args);
        let desc = r.get("error").map_or("ok".to_string(), |e| {
            e["desc"].as_str().unwrap().to_string()
        });
        got.push(json!(desc.replace(path_str(d.dir.path()), "$W")));
    };
    run(
        &mut c,
        "blockdev-snapshot",
        json!({"node": "nosuch", "overlay": "o2"}),
    );
    run(
        &mut c,
        "blockdev-snapshot",
        json!({"node": "b", "overlay": "nosuch"}),
    );
    run(
        &mut c,
        "blockdev-snapshot",
        json!({"node": "b", "overlay": "b"}),
    );
    ok(
        &mut c,
        "block-export-add",
        json!({"type": "nbd", "id": "e1", "node-name": "o2"}),
    );
    run(
        &mut c,
        "blockdev-snapshot",
        json!({"node": "b", "overlay": "o2"}),
    );
    let _ = c.exec("block-export-del", json!({"id": "e1"}));
    std::thread::sleep(std::time::Duration::from_millis(200));
    run(
        &mut c,
        "blockdev-snapshot",
        json!({"node": "b", "overlay": "o1"}),
    );
    run(
        &mut c,
        "blockdev-snapshot",
        json!({"node": "o1", "overlay": "b"}),
    );
    run(
        &mut c,
        "blockdev-snapshot",
        json!({"node": "b", "overlay": "o2"}),
    );
    run(
        &mut c,
        "blockdev-snapshot-sync",
        json!({"node-name": "o1", "snapshot-file": p("s.qcow2"), "snapshot-node-name": "b"}),
    );
    run(
        &mut c,
        "blockdev-snapshot-sync",
        json!({"device": "o1", "snapshot-file": p("s.qcow2")}),
    );
    run(
        &mut c,
        "blockdev-snapshot-sync",
        json!({"node-name": "o1", "snapshot-file": p("nodir/x.qcow2"), "snapshot-node-name": "x"}),
    );
    run(
        &mut c,
        "blockdev-snapshot-sync",
        json!({"node-name": "o1", "snapshot-file": p("none.qcow2"), "snapshot-node-name": "x", "mode": "existing"}),
    );
    run(
        &mut c,
        "blockdev-snapshot-sync",
        json!({"node-name": "o1", "snapshot-file": p("r.raw"), "snapshot-node-name": "x", "format": "raw"}),
    );
    let nodes = c.exec("query-named-block-nodes", json!({"flat": true}));
    let mut states: Vec<String> = nodes["return"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| !n["node-name"].as_str().unwrap().starts_with('#'))
        .map(|n| {
            format!(
                "{} ro={} backing={}",
                n["node-name"], n["ro"], n["backing_file"]
            )
        })
        .map(|s| s.replace(path_str(d.dir.path()), "$W"))
        .collect();
    states.sort();
    got.push(json!(states));
    ok(&mut c, "quit", json!({}));
    got
}

#[test]
fn snapshot_refusals_match_qsd() {
    let s = refusals(&QmpDaemon::sluice(&[]));
    let q = refusals(&QmpDaemon::qsd(&[]));
    assert_eq!(s, q);
}

/// What one daemon shows after `blockdev-snapshot-sync` of an exported qcow2 node: each
/// node's read-only flag (auto-generated names as `#`), and whether another program can
/// open the old image for reading with qemu's locking (`qemu-img info` without `-U`) and
/// the new one (it cannot: the overlay is written).
fn frozen_base(d: &QmpDaemon) -> (Vec<(String, bool)>, bool, bool) {
    let mut c = exported_base(d, "4M", "b", "e", "b");
    let opens = |name: &str| {
        Command::new("qemu-img")
            .args(["info", path_str(&d.path(name))])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(
        !opens("base.qcow2"),
        "the image is locked while it is written"
    );
    ok(
        &mut c,
        "blockdev-snapshot-sync",
        json!({"node-name": "b", "snapshot-file": path_str(&d.path("top.qcow2")),
               "snapshot-node-name": "t", "format": "qcow2"}),
    );
    let r = c.exec("query-named-block-nodes", json!({}));
    let mut nodes: Vec<(String, bool)> = r["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let name = n["node-name"].as_str().unwrap();
            let name = if name.starts_with('#') {
                format!(
                    "#{}",
                    n["file"].as_str().unwrap().rsplit('/').next().unwrap()
                )
            } else {
                name.to_string()
            };
            (name, n["ro"].as_bool().unwrap())
        })
        .collect();
    nodes.sort();
    // A client that connects after the snapshot writes (into the overlay).
    let uri = format!("nbd+unix:///b?socket={}", path_str(&d.path("nbd.sock")));
    let out = support::run("qemu-io", &["-f", "raw", "-c", "write -P 0x77 0 64k", &uri]);
    assert!(out.contains("wrote 65536/65536 bytes"), "{out}");
    (nodes, opens("base.qcow2"), opens("top.qcow2"))
}

#[test]
fn snapshot_reopens_the_old_node_read_only_and_frees_its_image_as_qsd() {
    let s = QmpDaemon::sluice(&[]);
    let q = QmpDaemon::qsd(&[]);
    let got = frozen_base(&s);
    assert_eq!(got, frozen_base(&q));
    assert_eq!(
        got,
        (
            vec![
                ("#base.qcow2".to_string(), true),
                ("#top.qcow2".to_string(), false),
                ("b".to_string(), true),
                ("t".to_string(), false),
            ],
            true,
            false
        )
    );
}

/// The images daemon `d` holds open, by file name.
fn open_images(d: &QmpDaemon) -> Vec<String> {
    let pid = d.child.as_ref().unwrap().id();
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.extension().is_some_and(|x| x == "qcow2"))
        .map(|t| t.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// One daemon's side of the teardown after a snapshot of an exported node `b`: with `sync`
/// false, `blockdev-snapshot` onto a monitor-owned overlay `t`, then the export deleted,
/// then `t`, then `b`; with `sync` true, `blockdev-snapshot-sync` (an overlay only the export
/// holds), then the export deleted, then `b`. Returns the images the daemon holds open after
/// each step, and the first byte a new export of `b` shows before `b` is deleted.
fn snapshot_teardown(d: &QmpDaemon, sync: bool) -> (Vec<Vec<String>>, String) {
    let top = d.path("top.qcow2");
    let mut c = exported_base(d, "4M", "b", "e", "b");
    if !sync {
        qemu_img(&["create", "-q", "-f", "qcow2", path_str(&top), "4M"]);
        ok(
            &mut c,
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "t", "backing": null,
                   "file": {"driver": "file", "filename": path_str(&top)}}),
        );
    }
    let uri = d.nbd_uri("b");
    let out = support::run("qemu-io", &["-f", "raw", "-c", "write -P 0x11 0 64k", &uri]);
    assert!(out.contains("wrote 65536/65536 bytes"), "{out}");
    if sync {
        ok(
            &mut c,
            "blockdev-snapshot-sync",
            json!({"node-name": "b", "snapshot-file": path_str(&top),
                   "snapshot-node-name": "t", "format": "qcow2"}),
        );
    } else {
        ok(
            &mut c,
            "blockdev-snapshot",
            json!({"node": "b", "overlay": "t"}),
        );
    }
    let out = support::run("qemu-io", &["-f", "raw", "-c", "write -P 0x22 0 64k", &uri]);
    assert!(out.contains("wrote 65536/65536 bytes"), "{out}");
    ok(&mut c, "block-export-del", json!({"id": "e"}));
    c.wait_event("BLOCK_EXPORT_DELETED");
    let mut open = vec![open_images(d)];
    if !sync {
        ok(&mut c, "blockdev-del", json!({"node-name": "t"}));
        open.push(open_images(d));
    }
    // What is left of `b` is its own image, the snapshot's point in time.
    ok(
        &mut c,
        "block-export-add",
        json!({"type": "nbd", "id": "e2", "node-name": "b", "name": "b2"}),
    );
    let out = support::run(
        "qemu-io",
        &["-f", "raw", "-r", "-c", "read -v 0 1", &d.nbd_uri("b2")],
    );
    let first = out.lines().next().unwrap_or("").to_string();
    ok(&mut c, "block-export-del", json!({"id": "e2"}));
    c.wait_event("BLOCK_EXPORT_DELETED");
    ok(&mut c, "blockdev-del", json!({"node-name": "b"}));
    open.push(open_images(d));
    (open, first)
}

/// Deleting the overlay after a snapshot closes it, and deleting the old node then closes
/// that too: neither keeps the other alive (the old node forwards to the overlay, the
/// overlay has the old node as its backing), as in qsd.
#[test]
fn snapshot_overlay_and_old_node_close_when_deleted_as_qsd() {
    let s = QmpDaemon::sluice(&[]);
    let q = QmpDaemon::qsd(&[]);
    let got = snapshot_teardown(&s, false);
    assert_eq!(got, snapshot_teardown(&q, false));
    assert_eq!(
        got.0,
        vec![
            vec!["base.qcow2".to_string(), "top.qcow2".to_string()],
            vec!["base.qcow2".to_string()],
            vec![],
        ]
    );
    assert!(got.1.starts_with("00000000:  11"), "{}", got.1);
}

/// The overlay `blockdev-snapshot-sync` made is held only by the export that moved onto it:
/// deleting the export frees it and closes its image, and the old node shows the snapshot's
/// point in time again, as in qsd.
#[test]
fn snapshot_sync_overlay_goes_with_its_export_as_qsd() {
    let s = QmpDaemon::sluice(&[]);
    let q = QmpDaemon::qsd(&[]);
    let got = snapshot_teardown(&s, true);
    assert_eq!(got, snapshot_teardown(&q, true));
    assert_eq!(got.0, vec![vec!["base.qcow2".to_string()], vec![]]);
    assert!(got.1.starts_with("00000000:  11"), "{}", got.1);
}
