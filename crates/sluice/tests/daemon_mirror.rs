//! `blockdev-mirror` over QMP: live storage migration of an exported, written device into a
//! new qcow2 (made with qemu-img, added with blockdev-add). A python3-libnbd client writes
//! through the export during the copy and after `ready`; `job-complete` pivots the export
//! to the target and the client's connection keeps working on it; the target then equals
//! a raw model (qemu-img compare). Also: sync `top` and `full` of a chain, soft cancel
//! (no pivot, BLOCK_JOB_COMPLETED), and the refusals, compared with qemu-storage-daemon's
//! classes, messages and event sequences.

use crate::support;

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use support::image::{qcow2_over, qemu_img, qemu_img_check, qemu_io};
use support::live::{assert_same, query_job, run_names, Client};
use support::path_str;
use support::qmp::{ok, Qmp, QmpDaemon};

const MIB: u64 = 1 << 20;

/// A job that ends successfully after the command's reply (job-complete, soft cancel).
const COMPLETED_AFTER_REPLY: [&str; 6] = [
    "return",
    "waiting",
    "pending",
    "BLOCK_JOB_COMPLETED",
    "concluded",
    "null",
];

/// An 8 MiB chain: base (data at 0..2M and unaligned at 6000001) under top (unaligned
/// data, 2 MiB at 5M, a zeroed range over base data), an empty 8 MiB qcow2 `full`, a qcow2
/// `topdst` backed by base, and a 4 MiB qcow2 `small`. Returns (dir, path of a name).
fn images() -> (tempfile::TempDir, impl Fn(&str) -> PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let p = move |n: &str| root.join(format!("{n}.qcow2"));
    let create = |n: &str, size: &str, backing: Option<&str>| {
        let mut a = vec!["create", "-q", "-f", "qcow2"];
        if let Some(b) = backing {
            a.extend(["-b", b, "-F", "qcow2"]);
        }
        let path = p(n);
        a.extend([path_str(&path), size]);
        qemu_img(&a);
    };
    create("base", "8M", None);
    create("top", "8M", Some("base.qcow2"));
    create("full", "8M", None);
    create("topdst", "8M", Some("base.qcow2"));
    create("small", "4M", None);
    qemu_io(
        "qcow2",
        path_str(&p("base")),
        &["write -P 0x11 0 2M", "write -P 0x12 6000001 77777"],
    );
    qemu_io(
        "qcow2",
        path_str(&p("top")),
        &[
            "write -P 0x31 200000 4321",
            "write -P 0x33 5M 2M",
            "write -z 1M 65536",
        ],
    );
    (dir, p)
}

/// The guest's view of `img` now, as a raw file.
fn flatten(img: &Path, out: &Path) {
    qemu_img(&["convert", "-U", "-O", "raw", path_str(img), path_str(out)]);
}

fn qcow2(name: &str, path: &Path, extra: Value) -> Value {
    let mut v = json!({"driver": "qcow2", "node-name": name,
                       "file": {"driver": "file", "filename": path_str(path)}});
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

/// Adds base (read-only), top over it, the targets, and exports top as `vm`. Returns the
/// NBD URI.
fn setup(c: &mut Qmp, d: &QmpDaemon, p: &dyn Fn(&str) -> PathBuf) -> String {
    ok(
        c,
        "blockdev-add",
        qcow2("base", &p("base"), json!({"read-only": true})),
    );
    ok(
        c,
        "blockdev-add",
        qcow2("top", &p("top"), json!({"backing": "base"})),
    );
    ok(c, "blockdev-add", qcow2("full", &p("full"), json!({})));
    ok(
        c,
        "blockdev-add",
        qcow2("topdst", &p("topdst"), json!({"backing": "base"})),
    );
    ok(c, "blockdev-add", qcow2("small", &p("small"), json!({})));
    let sock = d.path("nbd.sock");
    ok(
        c,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": path_str(&sock)}}}),
    );
    ok(
        c,
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "top", "name": "vm", "writable": true}),
    );
    format!("nbd+unix:///vm?socket={}", path_str(&sock))
}

fn export_node(c: &mut Qmp) -> Value {
    c.exec("query-block-exports", json!({}))["return"][0]["node-name"].clone()
}

fn quit(c: Qmp, d: QmpDaemon) {
    let mut c = c;
    ok(&mut c, "quit", json!({}));
    drop(c);
    let mut d = d;
    assert!(d.wait().success());
}

#[test]
fn mirror_full_migrates_a_written_export_and_pivots_under_a_live_client() {
    let (dir, p) = images();
    let expected = dir.path().join("expected.raw");
    flatten(&p("top"), &expected);
    let d = QmpDaemon::sluice(&[]);
    let mut c = d.connect_negotiated();
    let uri = setup(&mut c, &d, &p);
    let mut client = Client::connect(&uri);
    client.write(&expected, 3 * MIB + 7, 5000, 0xa0);

    // Slow at first, so that the client's writes land during the copy.
    let got = run_names(
        &mut c,
        json!({"execute": "blockdev-mirror",
               "arguments": {"job-id": "m0", "device": "top", "target": "full",
                             "sync": "full", "speed": MIB}}),
        "return",
    );
    assert_eq!(got, ["created", "running", "return"]);
    for (off, len, byte) in [
        (0, 4096, 0xb1),
        (7 * MIB + 1, 300_000, 0xb2),
        (2 * MIB - 10, 20, 0xb3),
    ] {
        client.write(&expected, off, len, byte);
    }
    let j = query_job(&mut c);
    assert_eq!(
        (j["type"].as_str(), j["status"].as_str()),
        (Some("mirror"), Some("running"))
    );
    ok(
        &mut c,
        "block-job-set-speed",
        json!({"device": "m0", "speed": 0}),
    );
    let ready = c.wait_event("BLOCK_JOB_READY");
    assert_eq!(ready["data"]["type"], "mirror");
    assert_eq!(ready["data"]["offset"], ready["data"]["len"]);
    assert!(ready["data"]["len"].as_u64().unwrap() >= 8 * MIB, "{ready}");

    // Writes while ready: mirrored too.
    client.write(&expected, 5 * MIB + 3, 70_000, 0xc1);
    client.write(&expected, 100, 1, 0xc2);
    client.op("f", 0, 0, 0);
    let got = run_names(
        &mut c,
        json!({"execute": "job-complete", "arguments": {"id": "m0"}}),
        "null",
    );
    assert_eq!(got, COMPLETED_AFTER_REPLY);
    assert_eq!(export_node(&mut c), "full");

    // The connection opened before the pivot now reads and writes the target.
    client.op("r", 3 * MIB + 7, 5000, 0xa0);
    client.op("r", 5 * MIB + 3, 70_000, 0xc1);
    client.write(&expected, 6 * MIB, 4096, 0xd1);
    client.op("f", 0, 0, 0);
    client.close();
    quit(c, d);
    let (code, out) = qemu_img_check(&p("full"));
    assert_eq!(code, 0, "{out}");
    assert_same(&p("full"), &expected);
}

#[test]
fn mirror_sync_top_copies_only_the_top_layer_and_soft_cancel_keeps_the_source() {
    let (dir, p) = images();
    let expected = dir.path().join("expected.raw");
    flatten(&p("top"), &expected);
    let d = QmpDaemon::sluice(&[]);
    let mut c = d.connect_negotiated();
    setup(&mut c, &d, &p);

    // Soft cancel of a full mirror: the target has everything, the export stays on top.
    run_names(
        &mut c,
        json!({"execute": "blockdev-mirror",
               "arguments": {"job-id": "m1", "device": "top", "target": "full",
                             "sync": "full", "granularity": 4096, "buf-size": 65536}}),
        "BLOCK_JOB_READY",
    );
    let got = run_names(
        &mut c,
        json!({"execute": "block-job-cancel", "arguments": {"device": "m1"}}),
        "null",
    );
    assert_eq!(got, COMPLETED_AFTER_REPLY);
    assert_eq!(export_node(&mut c), "top");

    // Sync top: only what top holds; the target's backing supplies the rest.
    run_names(
        &mut c,
        json!({"execute": "blockdev-mirror",
               "arguments": {"job-id": "m2", "device": "top", "target": "topdst",
                             "sync": "top"}}),
        "BLOCK_JOB_READY",
    );
    let j = query_job(&mut c);
    // What top holds: 4321 bytes at 200000 and 2 MiB at 5M, 64 KiB zeroed: whole granules.
    assert_eq!(j["len"], 2 * MIB + 2 * 65536, "{j}");
    let got = run_names(
        &mut c,
        json!({"execute": "job-complete", "arguments": {"id": "m2"}}),
        "null",
    );
    assert_eq!(got, COMPLETED_AFTER_REPLY);
    assert_eq!(export_node(&mut c), "topdst");
    quit(c, d);
    assert_same(&p("full"), &expected);
    assert_same(&p("topdst"), &expected);
    // Base's data was not copied into topdst: without its backing it reads zeroes there.
    let alone = format!(
        "driver=qcow2,file.filename={},backing=",
        path_str(&p("topdst"))
    );
    let out = support::output(
        "qemu-io",
        &["--image-opts", &alone, "-r", "-c", "read -P 0 0 131072"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("read 131072/131072"), "{text}");
}

/// The same mirror scenario on qsd and on sluice: messages as short names (refusals with
/// their class and message), so that the two can be compared.
fn scenario(d: &QmpDaemon, p: &dyn Fn(&str) -> PathBuf) -> Vec<String> {
    let mut c = d.connect_negotiated();
    setup(&mut c, d, p);
    let mut out = Vec::new();
    let mirror = |id: &str, device: &str, target: &str, extra: Value| {
        let mut a = json!({"job-id": id, "device": device, "target": target, "sync": "full"});
        for (k, x) in extra.as_object().unwrap() {
            a[k] = x.clone();
        }
        json!({"execute": "blockdev-mirror", "arguments": a})
    };
    let mut step = |c: &mut Qmp, cmd: Value, last: &str| {
        let got = run_names(c, cmd.clone(), last);
        let line = format!("{} -> {}", cmd["execute"], got.join(" "));
        eprintln!("{line}");
        out.push(line);
    };
    // Refusals (no job is created before them, in either daemon).
    for cmd in [
        mirror("r", "nope", "full", json!({})),
        mirror("r", "top", "nope", json!({})),
        mirror("r", "top", "top", json!({})),
        mirror("r", "base", "full", json!({})),
        mirror("r", "top", "base", json!({})),
        mirror("r", "top", "full", json!({"sync": "bitmap"})),
        mirror("r", "top", "full", json!({"granularity": 256})),
        mirror("r", "top", "full", json!({"granularity": 3000})),
        mirror("r", "top", "full", json!({"buf-size": -1})),
        mirror("r", "top", "full", json!({"replaces": "nope"})),
        mirror("r", "top", "full", json!({"replaces": "small"})),
        mirror("", "top", "full", json!({})),
    ] {
        step(&mut c, cmd, "return");
    }
    // A target of another size: the job starts and fails.
    step(&mut c, mirror("m0", "top", "small", json!({})), "null");
    // Mirror onto a node in use (the target of a running job), then a soft cancel.
    step(
        &mut c,
        mirror("m1", "top", "full", json!({})),
        "BLOCK_JOB_READY",
    );
    step(&mut c, mirror("m2", "small", "full", json!({})), "return");
    step(&mut c, mirror("m2", "top", "small", json!({})), "return");
    step(
        &mut c,
        json!({"execute": "block-job-cancel", "arguments": {"device": "m1"}}),
        "null",
    );
    step(&mut c, json!({"execute": "query-block-exports"}), "return");
    // Sync top, completed: the export moves.
    step(
        &mut c,
        mirror("m3", "top", "topdst", json!({"sync": "top"})),
        "BLOCK_JOB_READY",
    );
    step(
        &mut c,
        json!({"execute": "job-complete", "arguments": {"id": "m3"}}),
        "null",
    );
    out.push(format!("export on {}", export_node(&mut c)));
    // A node with an export, as a target: refused (qsd creates the job first, so only the
    // error is compared).
    let r = c.exec(
        "blockdev-mirror",
        json!({"job-id": "m4", "device": "small", "target": "topdst", "sync": "full"}),
    );
    out.push(format!("{:?}", Qmp::error(&r)));
    out
}

#[test]
fn mirror_scenario_matches_qemu_storage_daemon_in_shape() {
    let (_dir, p) = images();
    let (_dir2, p2) = images();
    let qsd = QmpDaemon::qsd(&[]);
    let want = scenario(&qsd, &p);
    drop(qsd);
    let sluice = QmpDaemon::sluice(&[]);
    let got = scenario(&sluice, &p2);
    assert_eq!(got, want);
}

/// Regression: the pivot flushes the source. Writes before the pivot (never flushed by
/// the client) into a source with no L2 table yet left the new table's L1 entry to be
/// written at close while imago's caches (the table, its refcount) were never written
/// back, since every flush after the pivot goes to the target: `qemu-img check` of the
/// source then found an L1 entry pointing at a cluster with refcount 0. Now the source
/// is, at the pivot, a clean image holding every write made before it.
#[test]
fn mirror_pivot_flushes_the_source_so_it_stays_a_clean_image_after_quit() {
    let (dir, p) = images();
    let fresh = dir.path().join("fresh.qcow2");
    qcow2_over(&fresh, "base.qcow2", &[], Some("8M"));
    let expected = dir.path().join("expected.raw");
    flatten(&fresh, &expected);
    let d = QmpDaemon::sluice(&[]);
    let mut c = d.connect_negotiated();
    ok(&mut c, "blockdev-add", qcow2("src", &fresh, json!({})));
    ok(&mut c, "blockdev-add", qcow2("dst", &p("full"), json!({})));
    support::qmp::start_nbd(&mut c, &d);
    ok(
        &mut c,
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "src", "name": "vm", "writable": true}),
    );
    let mut client = Client::connect(&d.nbd_uri("vm"));
    client.write(&expected, 3 * MIB + 7, 5000, 0xa0);
    run_names(
        &mut c,
        json!({"execute": "blockdev-mirror",
               "arguments": {"job-id": "m0", "device": "src", "target": "dst",
                             "sync": "full"}}),
        "BLOCK_JOB_READY",
    );
    client.write(&expected, 7 * MIB, 65536, 0xa1);
    let got = run_names(
        &mut c,
        json!({"execute": "job-complete", "arguments": {"id": "m0"}}),
        "null",
    );
    assert_eq!(got, COMPLETED_AFTER_REPLY);
    // After the pivot: the target's alone.
    let source_then = dir.path().join("source-then.raw");
    std::fs::copy(&expected, &source_then).unwrap();
    client.write(&expected, 100, 4096, 0xa2);
    client.close();
    quit(c, d);
    let (code, out) = qemu_img_check(&fresh);
    assert_eq!(code, 0, "the source after the pivot and quit: {out}");
    assert_same(&fresh, &source_then);
    let (code, out) = qemu_img_check(&p("full"));
    assert_eq!(code, 0, "{out}");
    assert_same(&p("full"), &expected);
}

/// A mirror starts its target's writeback as it copies (every 16 MiB, a non-blocking
/// `sync_file_range`), so the flush before READY does not find the whole copy dirty in the
/// page cache; `block-commit` does the same into its base. Seen under strace.
#[test]
fn mirror_and_commit_start_the_targets_writeback_as_they_copy() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(format!("{n}.qcow2"));
    let create = |n: &str, backing: Option<&str>| {
        let path = p(n);
        let mut a = vec!["create", "-q", "-f", "qcow2"];
        if let Some(b) = backing {
            a.extend(["-b", b, "-F", "qcow2"]);
        }
        a.extend([path_str(&path), "64M"]);
        qemu_img(&a);
    };
    for (n, backing) in [
        ("src", None),
        ("dst", None),
        ("base", None),
        ("mid", Some("base.qcow2")),
        ("top", Some("mid.qcow2")),
    ] {
        create(n, backing);
    }
    qemu_io("qcow2", path_str(&p("src")), &["write -P 0x5a 0 64M"]);
    qemu_io("qcow2", path_str(&p("mid")), &["write -P 0x6b 0 64M"]);
    let log = dir.path().join("strace.log");
    let kicks = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("sync_file_range(") && l.contains("SYNC_FILE_RANGE_WRITE"))
            .count()
    };
    let d = QmpDaemon::sluice_traced("sync_file_range", &log, &[]);
    let mut c = d.connect_negotiated();
    ok(&mut c, "blockdev-add", qcow2("src", &p("src"), json!({})));
    ok(&mut c, "blockdev-add", qcow2("dst", &p("dst"), json!({})));
    ok(
        &mut c,
        "blockdev-mirror",
        json!({"job-id": "m0", "device": "src", "target": "dst", "sync": "full"}),
    );
    c.wait_event("BLOCK_JOB_READY");
    ok(&mut c, "job-complete", json!({"id": "m0"}));
    c.wait_event("BLOCK_JOB_COMPLETED");
    let mirrored = kicks();
    assert!(
        mirrored >= 3,
        "{mirrored} writeback kicks while mirroring 64 MiB"
    );
    ok(
        &mut c,
        "blockdev-add",
        qcow2("base", &p("base"), json!({"read-only": true})),
    );
    ok(
        &mut c,
        "blockdev-add",
        qcow2(
            "mid",
            &p("mid"),
            json!({"read-only": true, "backing": "base"}),
        ),
    );
    ok(
        &mut c,
        "blockdev-add",
        qcow2("top", &p("top"), json!({"backing": "mid"})),
    );
    ok(
        &mut c,
        "block-commit",
        json!({"job-id": "c0", "device": "top", "top-node": "mid", "base-node": "base"}),
    );
    let ev = c.wait_event("BLOCK_JOB_COMPLETED");
    assert!(ev["data"].get("error").is_none(), "commit failed: {ev}");
    quit(c, d);
    let committed = kicks() - mirrored;
    assert!(
        committed >= 3,
        "{committed} writeback kicks while committing 64 MiB"
    );
    // What was copied is all there.
    qemu_io("qcow2", path_str(&p("dst")), &["read -P 0x5a 0 64M"]);
    qemu_io("qcow2", path_str(&p("base")), &["read -P 0x6b 0 64M"]);
}

/// copy-mode write-blocking converges however fast the client writes: each change is
/// copied to the target before it completes and is not left dirty, so only the background
/// pass has to finish (here rate-limited to 4 MiB/s, 2 s for 8 MiB). A client writing 4 KiB
/// all over the image without pause would keep a mirror that re-copies written ranges
/// from ever being READY. After READY, more writes, then the pivot: the target equals
/// everything the client wrote (qemu-img compare with a model).
#[test]
fn mirror_write_blocking_gets_ready_under_a_client_that_never_stops_writing() {
    let (dir, p) = images();
    let expected = dir.path().join("expected.raw");
    flatten(&p("top"), &expected);
    let mut model = std::fs::read(&expected).unwrap();
    let d = QmpDaemon::sluice(&[]);
    let mut c = d.connect_negotiated();
    let uri = setup(&mut c, &d, &p);
    let mut client = Client::connect(&uri);
    let mut write = |client: &mut Client, i: u64| {
        let off = (i * 7919 * 4096 + i * 13) % (8 * MIB - 4096);
        let byte = (i % 250) as u8 + 1;
        client.op("w", off, 4096, byte);
        model[off as usize..off as usize + 4096].fill(byte);
    };
    ok(
        &mut c,
        "blockdev-mirror",
        json!({"job-id": "m0", "device": "top", "target": "full", "sync": "full",
               "copy-mode": "write-blocking", "speed": 4 * MIB}),
    );
    let start = std::time::Instant::now();
    let mut i = 0;
    let ready = loop {
        write(&mut client, i);
        i += 1;
        if i % 8 == 0 {
            if let Some(line) = c.try_read_line(std::time::Duration::from_millis(1)) {
                if line.contains("BLOCK_JOB_READY") {
                    break true;
                }
            }
        }
        if start.elapsed() > std::time::Duration::from_secs(30) {
            break false;
        }
    };
    assert!(
        ready,
        "no BLOCK_JOB_READY in 30 s of a write-blocking mirror under {i} client writes"
    );
    assert!(
        i >= 200,
        "only {i} writes before READY: the test's load is too light"
    );
    for j in i..i + 200 {
        write(&mut client, j);
    }
    let got = run_names(
        &mut c,
        json!({"execute": "job-complete", "arguments": {"id": "m0"}}),
        "null",
    );
    assert_eq!(got, COMPLETED_AFTER_REPLY);
    client.op("f", 0, 0, 0);
    client.close();
    quit(c, d);
    std::fs::write(&expected, &model).unwrap();
    let (code, out) = qemu_img_check(&p("full"));
    assert_eq!(code, 0, "{out}");
    assert_same(&p("full"), &expected);
}
