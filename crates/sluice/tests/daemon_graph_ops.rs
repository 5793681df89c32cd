//! Live graph operations over QMP, each scenario run on sluice and on qemu-storage-daemon
//! with the same inputs and compared: `blockdev-create` (file and qcow2 with their options,
//! the refusals in the command and the failures inside the job), `block_resize` (grow and
//! shrink of raw and qcow2, and qsd's refusals). Images are compared with qemu-img (info,
//! check, compare), not with remembered values.

use crate::support;

use std::path::Path;

use serde_json::{json, Value};
use support::image::{image_info, qemu_img, qemu_img_check, qemu_io};
use support::path_str;
use support::qmp::{names, ok, run_until, QmpDaemon};

const MIB: u64 = 1 << 20;

/// What one scenario step gave: the messages' short names, with the reply's error text.
type Trace = Vec<(String, Vec<String>)>;

/// Both daemons, each in its own directory.
fn both() -> [(&'static str, QmpDaemon); 2] {
    [
        ("sluice", QmpDaemon::sluice(&[])),
        ("qsd", QmpDaemon::qsd(&[])),
    ]
}

/// Runs `blockdev-create` and reads until the job concluded (or the command failed).
fn create(c: &mut support::qmp::Qmp, id: &str, options: Value) -> Vec<String> {
    let cmd =
        json!({"execute": "blockdev-create", "arguments": {"job-id": id, "options": options}});
    c.send(&cmd);
    let r = c.reply();
    if r.get("error").is_some() {
        let mut v = names(&std::mem::take(&mut c.events));
        v.push(support::qmp::short(&r));
        return v;
    }
    let mut got = std::mem::take(&mut c.events);
    got.push(r);
    loop {
        let v = c.read_value().expect("connection closed");
        let done = v["data"]["status"] == "concluded";
        got.push(v);
        if done {
            return names(&got);
        }
    }
}

/// The create scenario on one daemon: returns the trace and `query-jobs` at the end.
fn create_scenario(d: &QmpDaemon) -> (Trace, Value) {
    let mut c = d.connect_negotiated();
    let p = |n: &str| path_str(&d.path(n)).to_string();
    for n in ["a", "b", "c", "e", "v2"] {
        std::fs::write(d.path(&format!("{n}.qcow2")), b"").unwrap();
        ok(
            &mut c,
            "blockdev-add",
            json!({"driver": "file", "node-name": format!("{n}-f"), "filename": p(&format!("{n}.qcow2"))}),
        );
    }
    let steps: Vec<(&str, Value)> = vec![
        (
            "file-full",
            json!({"driver": "file", "filename": p("f.img"), "size": MIB, "preallocation": "full"}),
        ),
        (
            "file-falloc",
            json!({"driver": "file", "filename": p("g.img"), "size": 3 * MIB + 512, "preallocation": "falloc"}),
        ),
        (
            "file-metadata",
            json!({"driver": "file", "filename": p("h.img"), "size": MIB, "preallocation": "metadata"}),
        ),
        (
            "qcow2-default",
            json!({"driver": "qcow2", "file": "a-f", "size": 32 * MIB}),
        ),
        (
            "qcow2-options",
            json!({"driver": "qcow2", "file": "b-f", "size": 16 * MIB,
            "cluster-size": 4096, "lazy-refcounts": true, "preallocation": "metadata"}),
        ),
        (
            "qcow2-backing",
            json!({"driver": "qcow2", "file": "c-f", "size": 8 * MIB,
            "backing-file": "base.raw", "backing-fmt": "raw"}),
        ),
        (
            "qcow2-v2",
            json!({"driver": "qcow2", "file": "v2-f", "size": 4 * MIB, "version": "v2"}),
        ),
        ("raw", json!({"driver": "raw"})),
        ("null", json!({"driver": "null-co"})),
        (
            "bad-cluster",
            json!({"driver": "qcow2", "file": "e-f", "size": MIB, "cluster-size": 1000}),
        ),
        (
            "bad-size",
            json!({"driver": "qcow2", "file": "e-f", "size": 1000}),
        ),
        (
            "fmt-alone",
            json!({"driver": "qcow2", "file": "e-f", "size": MIB, "backing-fmt": "qcow2"}),
        ),
        (
            "v2-lazy",
            json!({"driver": "qcow2", "file": "e-f", "size": MIB, "version": "v2", "lazy-refcounts": true}),
        ),
        (
            "backing-prealloc",
            json!({"driver": "qcow2", "file": "e-f", "size": MIB,
            "backing-file": "x", "preallocation": "metadata"}),
        ),
        (
            "no-node",
            json!({"driver": "qcow2", "file": "nosuch", "size": MIB}),
        ),
    ];
    let mut trace = Vec::new();
    for (i, (label, opts)) in steps.into_iter().enumerate() {
        let id = format!("j{i}");
        trace.push((label.to_string(), create(&mut c, &id, opts)));
    }
    // An id in use (j0 is concluded, not dismissed).
    trace.push((
        "id-in-use".into(),
        create(
            &mut c,
            "j0",
            json!({"driver": "file", "filename": p("z.img"), "size": 512}),
        ),
    ));
    let jobs = c.exec("query-jobs", json!({}));
    let blockjobs = c.exec("query-block-jobs", json!({}));
    trace.push(("query-block-jobs".into(), vec![blockjobs.to_string()]));
    let cancel = c.exec("block-job-cancel", json!({"device": "j0"}));
    trace.push(("block-job-cancel".into(), vec![cancel.to_string()]));
    let dismissed = run_until(
        &mut c,
        json!({"execute": "job-dismiss", "arguments": {"id": "j0"}}),
        "return",
    );
    trace.push(("dismiss".into(), names(&dismissed)));
    ok(&mut c, "quit", json!({}));
    (trace, jobs["return"].clone())
}

/// The fields of `qemu-img info` that describe how an image was made.
fn made(path: &Path) -> Value {
    let i = image_info(path);
    json!({
        "format": i["format"],
        "virtual-size": i["virtual-size"],
        "cluster-size": i["cluster-size"],
        "backing-filename": i["backing-filename"],
        "backing-filename-format": i["backing-filename-format"],
        "compat": i["format-specific"]["data"]["compat"],
        "lazy-refcounts": i["format-specific"]["data"]["lazy-refcounts"],
        "refcount-bits": i["format-specific"]["data"]["refcount-bits"],
    })
}

#[test]
fn blockdev_create_matches_qsd_in_events_errors_and_images() {
    let mut ds = both();
    let mut runs = Vec::new();
    for (who, d) in &mut ds {
        let (trace, jobs) = create_scenario(d);
        assert!(d.wait().success(), "{who}");
        runs.push((who.to_string(), trace, jobs));
    }
    let (_, st, sj) = &runs[0];
    let (_, qt, qj) = &runs[1];
    for (s, q) in st.iter().zip(qt) {
        assert_eq!(s, q, "step {}", s.0);
    }
    assert_eq!(st.len(), qt.len());
    // query-jobs: the same jobs, states, progress and errors (sluice lists oldest first, as qsd
    // does not: compare as sets by id).
    let by_id = |v: &Value| {
        let mut a = v.as_array().unwrap().clone();
        a.sort_by_key(|j| j["id"].as_str().unwrap().to_string());
        a
    };
    assert_eq!(by_id(sj), by_id(qj));
    // The jobs that succeeded are the successful steps: j0..j6 (except j2, metadata on a file).
    let failed: Vec<String> = by_id(sj)
        .iter()
        .filter(|j| j.get("error").is_some())
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(failed, ["j10", "j11", "j12", "j13", "j14", "j2", "j9"]);
    // The images: made the same way, clean, with the same contents.
    let (sd, qd) = (&ds[0].1, &ds[1].1);
    std::fs::write(sd.path("base.raw"), vec![0u8; 8 << 20]).unwrap();
    std::fs::write(qd.path("base.raw"), vec![0u8; 8 << 20]).unwrap();
    drop(runs);
    for img in [
        "a.qcow2", "b.qcow2", "c.qcow2", "v2.qcow2", "f.img", "g.img",
    ] {
        let (s, q) = (sd.path(img), qd.path(img));
        assert_eq!(made(&s), made(&q), "{img}");
        if img.ends_with(".qcow2") {
            let (code, out) = qemu_img_check(&s);
            assert_eq!(code, 0, "{img}: {out}");
        }
        let fmt = if img.ends_with(".qcow2") {
            "qcow2"
        } else {
            "raw"
        };
        qemu_img(&["compare", "-f", fmt, "-F", fmt, path_str(&s), path_str(&q)]);
    }
    // Preallocation: the data of the full and falloc files is allocated.
    use std::os::unix::fs::MetadataExt;
    for img in ["f.img", "g.img"] {
        let m = std::fs::metadata(sd.path(img)).unwrap();
        assert!(m.blocks() * 512 >= m.len(), "{img} not preallocated");
    }
}

#[test]
fn created_qcow2_is_usable_by_blockdev_add_and_qemu_io() {
    let mut d = QmpDaemon::sluice(&[]);
    let mut c = d.connect_negotiated();
    let img = d.path("new.qcow2");
    std::fs::write(&img, b"").unwrap();
    ok(
        &mut c,
        "blockdev-add",
        json!({"driver": "file", "node-name": "nf", "filename": path_str(&img)}),
    );
    let got = create(
        &mut c,
        "c0",
        json!({"driver": "qcow2", "file": "nf", "size": 4 * MIB}),
    );
    assert_eq!(
        got,
        [
            "created",
            "running",
            "return",
            "waiting",
            "pending",
            "concluded"
        ]
    );
    ok(&mut c, "job-dismiss", json!({"id": "c0"}));
    ok(
        &mut c,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "q", "file": "nf"}),
    );
    let nodes = c.exec("query-named-block-nodes", json!({}));
    let q = nodes["return"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "q")
        .unwrap()
        .clone();
    assert_eq!(q["image"]["virtual-size"], 4 * MIB);
    ok(&mut c, "quit", json!({}));
    assert!(d.wait().success());
    // After the daemon: qemu-io writes and reads it, qemu-img finds it clean.
    let out = qemu_io(
        "qcow2",
        path_str(&img),
        &["write -P 0x5a 1M 64k", "read -P 0x5a 1M 64k"],
    );
    assert!(!out.contains("fail"), "{out}");
    assert_eq!(qemu_img_check(&img).0, 0);
}

/// The resize scenario on one daemon: a qcow2 and a raw node, grown and shrunk, and the
/// refusals. Returns the trace.
fn resize_scenario(d: &QmpDaemon) -> Trace {
    let p = |n: &str| path_str(&d.path(n)).to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &p("q.qcow2"), "4M"]);
    qemu_io(
        "qcow2",
        &p("q.qcow2"),
        &["write -P 0x33 0 1M", "write -P 0x44 3M 1M"],
    );
    std::fs::write(d.path("r.img"), vec![0x22u8; MIB as usize]).unwrap();
    std::fs::write(d.path("ro.img"), vec![0u8; 4096]).unwrap();
    let mut c = d.connect_negotiated();
    for args in [
        json!({"driver": "file", "node-name": "qf", "filename": p("q.qcow2")}),
        json!({"driver": "qcow2", "node-name": "q", "file": "qf"}),
        json!({"driver": "file", "node-name": "rf", "filename": p("r.img")}),
        json!({"driver": "raw", "node-name": "r", "file": "rf"}),
        json!({"driver": "file", "node-name": "ro", "filename": p("ro.img"), "read-only": true}),
    ] {
        ok(&mut c, "blockdev-add", args);
    }
    support::qmp::start_nbd(&mut c, d);
    let mut trace = Vec::new();
    let mut step = |c: &mut support::qmp::Qmp, label: &str, args: Value| {
        let r = run_until(
            c,
            json!({"execute": "block_resize", "arguments": args}),
            "return",
        );
        let size = {
            let n = c.exec("query-named-block-nodes", json!({}));
            n["return"]
                .as_array()
                .unwrap()
                .iter()
                // The qcow2's file node: its length is the image's layout, which differs.
                .filter(|n| n["node-name"] != "qf")
                .map(|n| {
                    format!(
                        "{}={}",
                        n["node-name"].as_str().unwrap(),
                        n["image"]["virtual-size"]
                    )
                })
                .collect::<Vec<_>>()
        };
        let mut v = names(&r);
        v.extend(size);
        trace.push((label.to_string(), v));
    };
    step(
        &mut c,
        "grow-qcow2",
        json!({"node-name": "q", "size": 8 * MIB}),
    );
    step(
        &mut c,
        "shrink-qcow2",
        json!({"node-name": "q", "size": 2 * MIB}),
    );
    step(
        &mut c,
        "unaligned-qcow2",
        json!({"node-name": "q", "size": 2 * MIB + 1}),
    );
    step(&mut c, "negative", json!({"node-name": "q", "size": -1}));
    step(&mut c, "no-name", json!({"size": MIB}));
    step(&mut c, "device", json!({"device": "q", "size": MIB}));
    step(
        &mut c,
        "missing",
        json!({"node-name": "nosuch", "size": MIB}),
    );
    step(
        &mut c,
        "file-under-qcow2",
        json!({"node-name": "qf", "size": MIB}),
    );
    step(
        &mut c,
        "grow-raw",
        json!({"node-name": "r", "size": 3_000_000}),
    );
    step(
        &mut c,
        "shrink-raw",
        json!({"node-name": "r", "size": 512 * 1024}),
    );
    step(&mut c, "read-only", json!({"node-name": "ro", "size": MIB}));
    ok(
        &mut c,
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "r", "writable": false}),
    );
    step(&mut c, "exported", json!({"node-name": "r", "size": MIB}));
    let del = run_until(
        &mut c,
        json!({"execute": "block-export-del", "arguments": {"id": "e"}}),
        "return",
    );
    assert_eq!(names(&del).last().unwrap(), "return");
    ok(&mut c, "quit", json!({}));
    trace
}

#[test]
fn block_resize_matches_qsd_and_keeps_images_clean() {
    let mut ds = both();
    let mut traces: Vec<Trace> = Vec::new();
    for (who, d) in &mut ds {
        traces.push(resize_scenario(d));
        assert!(d.wait().success(), "{who}");
    }
    for (s, q) in traces[0].iter().zip(&traces[1]) {
        let sorted = |v: &Vec<String>| {
            let mut v = v.clone();
            v.sort();
            v
        };
        assert_eq!(sorted(&s.1), sorted(&q.1), "step {}", s.0);
    }
    let (sd, qd) = (&ds[0].1, &ds[1].1);
    for (img, fmt) in [("q.qcow2", "qcow2"), ("r.img", "raw")] {
        let (s, q) = (sd.path(img), qd.path(img));
        assert_eq!(made(&s)["virtual-size"], made(&q)["virtual-size"], "{img}");
        qemu_img(&["compare", "-f", fmt, "-F", fmt, path_str(&s), path_str(&q)]);
    }
    assert_eq!(qemu_img_check(&sd.path("q.qcow2")).0, 0);
    // The shrink kept what was below the cut: 0x33 in the first MiB.
    let out = qemu_io(
        "qcow2",
        path_str(&sd.path("q.qcow2")),
        &["read -P 0x33 0 1M"],
    );
    assert!(!out.contains("fail"), "{out}");
}
