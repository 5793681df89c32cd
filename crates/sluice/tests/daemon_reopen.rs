//! `blockdev-reopen` (issue #16), each scenario run on sluice and on qemu-storage-daemon
//! with the same images and compared: replies (class and message), `ro` and the file
//! names `query-named-block-nodes` shows, what NBD clients read and may write, and at the
//! end the images themselves (`qemu-img compare`, `qemu-img info`).
//!
//! Covered: read-only on and off (with the file node), writes refused then accepted,
//! a qcow2 backing changed to another node and to none (reads fall through to the new
//! one), all or nothing over a list with one bad entry, a writer (writable export, mirror
//! target) that would become read-only, options that cannot change, unknown nodes.
//!
//! Known differences, asserted on sluice alone (see `docs/compat/blockdev-reopen.md`): an
//! empty list (qsd 10.0.2 aborts), a `file` naming another node (qsd swaps the child), a
//! change on a node a job uses.
//!
//! Names qsd makes up for implicit nodes (`#blockNNN`) become `#auto`, the daemon's
//! directory `DIR`.

use crate::support;

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use support::image::{image_info, qcow2_over, qemu_img, qemu_io};
use support::path_str;
use support::qmp::{start_nbd, wait_for, Qmp, QmpDaemon};
use support::{output, qemu_io_run};

/// Both daemons, each in its own directory.
fn both() -> [(&'static str, QmpDaemon); 2] {
    [
        ("sluice", QmpDaemon::sluice(&[])),
        ("qsd", QmpDaemon::qsd(&[])),
    ]
}

/// `v` with every `#blockNNN` replaced by `#auto` and the daemon's directory by `DIR`.
fn normalize(v: &Value, dir: &str) -> Value {
    match v {
        Value::String(s) => {
            let s = s.replace(dir, "DIR");
            let mut out = String::new();
            let mut rest = s.as_str();
            while let Some(i) = rest.find("#block") {
                out.push_str(&rest[..i]);
                out.push_str("#auto");
                rest = rest[i + 6..].trim_start_matches(|c: char| c.is_ascii_digit());
            }
            out.push_str(rest);
            Value::String(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(|x| normalize(x, dir)).collect()),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| (k.clone(), normalize(x, dir)))
                .collect(),
        ),
        v => v.clone(),
    }
}

fn reopen(c: &mut Qmp, options: Value) -> Value {
    c.outcome("blockdev-reopen", json!({ "options": options }))
}

/// `[name, ro, file, backing_file]` of every node, sorted (implicit names as `#auto`).
fn nodes(c: &mut Qmp, dir: &str) -> Value {
    let r = c.exec("query-named-block-nodes", json!({"flat": true}));
    let mut v: Vec<Value> = r["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            normalize(
                &json!([n["node-name"], n["ro"], n["file"], n["backing_file"]]),
                dir,
            )
        })
        .collect();
    v.sort_by_key(|x| x.to_string());
    Value::Array(v)
}

/// The name of the node whose driver is `drv` and whose file name ends in `file`.
fn node_named(c: &mut Qmp, drv: &str, file: &str) -> String {
    let r = c.exec("query-named-block-nodes", json!({}));
    r["return"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["drv"] == drv && n["file"].as_str().unwrap().ends_with(file))
        .unwrap_or_else(|| panic!("no {drv} node of {file}: {r}"))["node-name"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Runs qemu-io on an NBD export and says whether every command worked ("ok") or how the
/// first failure reads (qemu-io's words, with the URI as `URI`).
fn nbd_io(d: &QmpDaemon, export: &str, cmds: &[&str]) -> Value {
    let uri = d.nbd_uri(export);
    // Reads open the export read-only (qemu-io opens read-write otherwise, which a
    // read-only export refuses).
    let reads = cmds.iter().all(|c| c.starts_with("read"));
    let options: &[&str] = if reads { &["-r"] } else { &[] };
    let (out, text) = qemu_io_run(options, &uri, cmds);
    let failure = text.lines().find(|l| {
        l.contains("failed") || l.contains("Pattern verification") || l.contains("can't open")
    });
    match (failure, out.status.success()) {
        (None, true) => json!("ok"),
        (Some(l), _) => json!(l.replace(&uri, "URI")),
        (None, false) => json!(format!("failed: {}", text.trim())),
    }
}

/// Stops a daemon cleanly (so that it writes everything back) and keeps its directory.
fn quit(d: &mut QmpDaemon, c: &mut Qmp) {
    c.send(&json!({"execute": "quit"}));
    d.wait();
}

/// True if the two images hold the same data (`qemu-img compare`, chains included).
fn same_data(a: &Path, b: &Path) -> bool {
    output("qemu-img", &["compare", path_str(a), path_str(b)])
        .status
        .success()
}

fn read_only_scenario(d: &QmpDaemon) -> Vec<Value> {
    let dir = path_str(d.dir.path()).to_string();
    let a = d.path("a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&a), "1M"]);
    qemu_io("qcow2", path_str(&a), &["write -P 0x11 0 64k"]);
    let mut c = d.connect_negotiated();
    let mut out = Vec::new();
    for args in [
        json!({"driver": "file", "node-name": "a-f", "filename": path_str(&a)}),
        json!({"driver": "qcow2", "node-name": "a", "file": "a-f"}),
    ] {
        out.push(c.outcome("blockdev-add", args));
    }
    start_nbd(&mut c, d);
    let ro = json!([{"driver": "qcow2", "node-name": "a", "file": "a-f", "read-only": true},
                    {"driver": "file", "node-name": "a-f", "filename": path_str(&a),
                     "read-only": true}]);
    let rw = json!([{"driver": "qcow2", "node-name": "a", "file": "a-f"},
                    {"driver": "file", "node-name": "a-f", "filename": path_str(&a)}]);
    // A writable export is a writer: neither the node nor its file may become read-only.
    out.push(c.outcome(
        "block-export-add",
        json!({"type": "nbd", "id": "w", "node-name": "a", "writable": true}),
    ));
    out.push(reopen(&mut c, json!([ro[0]])));
    out.push(reopen(&mut c, json!([ro[1]])));
    out.push(reopen(&mut c, ro.clone()));
    out.push(c.outcome("block-export-del", json!({"id": "w"})));
    wait_for(&mut c, "BLOCK_EXPORT_DELETED", Duration::from_secs(30));
    // Read-only: both nodes, writes through an export refused, no writable export.
    out.push(c.outcome(
        "block-export-add",
        json!({"type": "nbd", "id": "r", "node-name": "a"}),
    ));
    out.push(reopen(&mut c, ro.clone()));
    out.push(nodes(&mut c, &dir));
    out.push(nbd_io(d, "a", &["write -P 0x22 0 4k"]));
    out.push(c.outcome(
        "block-export-add",
        json!({"type": "nbd", "id": "w2", "node-name": "a", "name": "aw", "writable": true}),
    ));
    // The parent alone cannot become writable over its read-only file; the file alone can
    // (nothing writes through it), and back.
    out.push(reopen(&mut c, json!([rw[0]])));
    out.push(reopen(&mut c, json!([rw[1]])));
    out.push(reopen(&mut c, json!([ro[1]])));
    // Both writable again: a writable export works, and the read-only one sees its write.
    out.push(reopen(&mut c, rw.clone()));
    out.push(nodes(&mut c, &dir));
    out.push(c.outcome(
        "block-export-add",
        json!({"type": "nbd", "id": "w2", "node-name": "a", "name": "aw", "writable": true}),
    ));
    out.push(nbd_io(d, "aw", &["write -P 0x22 64k 4k"]));
    out.push(nbd_io(
        d,
        "a",
        &["read -P 0x22 64k 4k", "read -P 0x11 0 4k"],
    ));
    out.push(nbd_io(d, "a", &["write -P 0x22 0 4k"]));
    // An unknown node, a missing node-name.
    out.push(reopen(
        &mut c,
        json!([{"driver": "qcow2", "node-name": "nosuch", "file": "a-f"}]),
    ));
    out.push(reopen(&mut c, json!([{"driver": "qcow2", "file": "a-f"}])));
    out.iter().map(|v| normalize(v, &dir)).collect()
}

#[test]
fn read_only_on_and_off_matches_qsd_and_writes_follow() {
    let mut ds = both();
    let runs: Vec<_> = ds.iter().map(|(_, d)| read_only_scenario(d)).collect();
    assert_eq!(runs[0], runs[1], "sluice (left) vs qsd (right)");
    // Not two traces agreeing on failures: the refusals and the write are what they say.
    let r = &runs[0];
    let writer =
        json!("error:GenericError:Read-only block node 'a' cannot support read-write users");
    assert_eq!(r[3], writer);
    assert_eq!(
        r[4],
        json!("error:GenericError:Read-only block node 'a-f' cannot support read-write users")
    );
    assert_eq!(r[8], json!({}));
    assert_eq!(
        r[9],
        json!([
            ["a", true, "DIR/a.qcow2", null],
            ["a-f", true, "DIR/a.qcow2", null]
        ])
    );
    assert_eq!(
        r[10],
        json!("qemu-io: can't open device URI: Could not open image: Permission denied"),
        "a write through a read-only node's export"
    );
    assert_eq!(
        r[11],
        json!("error:GenericError:Cannot export read-only node as writable")
    );
    assert_eq!(r[12], json!("error:GenericError:Block node is read-only"));
    assert_eq!(
        r[16],
        json!([
            ["a", false, "DIR/a.qcow2", null],
            ["a-f", false, "DIR/a.qcow2", null]
        ])
    );
    assert_eq!(r[18], json!("ok"));
    assert_eq!(r[19], json!("ok"));
    assert_eq!(
        r[21],
        json!("error:GenericError:Failed to find node with node-name='nosuch'")
    );
    let images: Vec<_> = ds.iter().map(|(_, d)| d.path("a.qcow2")).collect();
    for (_, d) in ds.iter_mut() {
        let mut c = d.connect_negotiated();
        quit(d, &mut c);
    }
    assert!(
        same_data(&images[0], &images[1]),
        "sluice's and qsd's images differ"
    );
    let check = output("qemu-img", &["check", path_str(&images[0])]);
    assert!(check.status.success(), "{check:?}");
}

fn backing_scenario(d: &QmpDaemon) -> Vec<Value> {
    let dir = path_str(d.dir.path()).to_string();
    let (base, other, top) = (
        d.path("base.qcow2"),
        d.path("other.qcow2"),
        d.path("top.qcow2"),
    );
    for (p, byte) in [(&base, "0x11"), (&other, "0x22")] {
        qemu_img(&["create", "-q", "-f", "qcow2", path_str(p), "1M"]);
        qemu_io("qcow2", path_str(p), &[&format!("write -P {byte} 0 64k")]);
    }
    qcow2_over(&top, "base.qcow2", &[], None);
    qemu_io("qcow2", path_str(&top), &["write -P 0x33 512k 64k"]);
    let mut c = d.connect_negotiated();
    let mut out = Vec::new();
    out.push(c.outcome(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top",
               "file": {"driver": "file", "node-name": "top-f", "filename": path_str(&top)}}),
    ));
    out.push(c.outcome(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "other", "read-only": true,
               "file": {"driver": "file", "filename": path_str(&other)}}),
    ));
    start_nbd(&mut c, d);
    out.push(c.outcome(
        "block-export-add",
        json!({"type": "nbd", "id": "t", "node-name": "top"}),
    ));
    out.push(nbd_io(d, "top", &["read -P 0x11 0 64k"]));
    let header_base = node_named(&mut c, "qcow2", "base.qcow2");
    let with = |backing: Value| json!([{"driver": "qcow2", "node-name": "top", "file": "top-f", "backing": backing}]);
    // The header names a backing: the options must say which.
    out.push(reopen(
        &mut c,
        json!([{"driver": "qcow2", "node-name": "top", "file": "top-f"}]),
    ));
    // The same one: nothing changes.
    out.push(reopen(&mut c, with(json!(header_base))));
    out.push(nodes(&mut c, &dir));
    // Refusals: no such node, a cycle, other options for the header's backing, a driver
    // change (options the raw driver does not take).
    out.push(reopen(&mut c, with(json!("nosuch"))));
    out.push(reopen(&mut c, with(json!("top"))));
    out.push(reopen(
        &mut c,
        with(json!({"driver": "qcow2", "file": {"driver": "file", "filename": path_str(&other)}})),
    ));
    out.push(reopen(
        &mut c,
        json!([{"driver": "raw", "node-name": "top", "file": "top-f", "backing": header_base}]),
    ));
    // Another node: reads fall through to it; the header keeps its name.
    out.push(reopen(&mut c, with(json!("other"))));
    out.push(nodes(&mut c, &dir));
    out.push(nbd_io(
        d,
        "top",
        &["read -P 0x22 0 64k", "read -P 0x33 512k 64k"],
    ));
    out.push(c.outcome("blockdev-del", json!({"node-name": "other"})));
    // None: what the top does not hold reads as zeroes.
    out.push(reopen(&mut c, with(Value::Null)));
    out.push(nodes(&mut c, &dir));
    out.push(nbd_io(
        d,
        "top",
        &["read -P 0 0 64k", "read -P 0x33 512k 64k"],
    ));
    out.push(c.outcome("blockdev-del", json!({"node-name": "other"})));
    let info = image_info(&top);
    out.push(json!([
        info["backing-filename"],
        info["backing-filename-format"]
    ]));
    out.iter().map(|v| normalize(v, &dir)).collect()
}

#[test]
fn backing_change_matches_qsd_and_reads_follow_the_new_backing() {
    let ds = both();
    let runs: Vec<_> = ds.iter().map(|(_, d)| backing_scenario(d)).collect();
    assert_eq!(runs[0], runs[1], "sluice (left) vs qsd (right)");
    let r = &runs[0];
    assert_eq!(
        r[4],
        json!("error:GenericError:backing is missing for 'top'")
    );
    assert_eq!(r[5], json!({}));
    assert_eq!(
        r[8],
        json!("error:GenericError:Making 'top' a backing child of 'top' would create a cycle")
    );
    // Inline options for the backing the node opened from its header reopen that node
    // (it inherits from the top), whose file name cannot change.
    assert_eq!(
        r[9],
        json!("error:GenericError:Cannot change the option 'filename'")
    );
    assert_eq!(r[13], json!("ok"));
    assert_eq!(
        r[14],
        json!("error:GenericError:Node 'other' is busy: node is used as backing hd of 'top'")
    );
    assert_eq!(r[17], json!("ok"));
    assert_eq!(r[18], json!({}));
    assert_eq!(r[19], json!(["base.qcow2", "qcow2"]));
}

fn all_or_nothing_scenario(d: &QmpDaemon) -> Vec<Value> {
    let dir = path_str(d.dir.path()).to_string();
    let (a, r) = (d.path("a.qcow2"), d.path("r.raw"));
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&a), "1M"]);
    qemu_img(&["create", "-q", "-f", "raw", path_str(&r), "1M"]);
    let mut c = d.connect_negotiated();
    let mut out = Vec::new();
    for args in [
        json!({"driver": "file", "node-name": "a-f", "filename": path_str(&a)}),
        json!({"driver": "qcow2", "node-name": "a", "file": "a-f"}),
        json!({"driver": "raw", "node-name": "r",
               "file": {"driver": "file", "filename": path_str(&r)}}),
    ] {
        out.push(c.outcome("blockdev-add", args));
    }
    start_nbd(&mut c, d);
    out.push(c.outcome(
        "block-export-add",
        json!({"type": "nbd", "id": "w", "node-name": "r", "writable": true}),
    ));
    let r_file = node_named(&mut c, "file", "r.raw");
    let a_ro = json!({"driver": "qcow2", "node-name": "a", "file": "a-f", "read-only": true});
    let af_ro = json!({"driver": "file", "node-name": "a-f", "filename": path_str(&a),
                       "read-only": true});
    let r_ro = json!({"driver": "raw", "node-name": "r", "file": r_file, "read-only": true});
    // One bad entry, wherever it is, and nothing changes.
    for list in [
        json!([a_ro, af_ro, r_ro]),
        json!([a_ro, {"driver": "qcow2", "node-name": "nosuch", "file": "a-f"}]),
        json!([a_ro, af_ro, {"driver": "qcow2", "node-name": "r", "file": r_file}]),
        json!([af_ro]),
        json!([a_ro, af_ro, {"driver": "file", "node-name": "a-f", "filename": path_str(&a),
                             "locking": "off"}]),
    ] {
        out.push(reopen(&mut c, list));
        out.push(nodes(&mut c, &dir));
    }
    // Options that cannot change.
    for bad in [
        json!({"driver": "file", "node-name": "a-f", "filename": path_str(&r)}),
        json!({"driver": "file", "node-name": "a-f", "filename": path_str(&a), "aio": "threads"}),
        json!({"driver": "file", "node-name": "a-f", "filename": path_str(&a),
               "force-share": true}),
        json!({"driver": "qcow2", "node-name": "a",
               "file": {"driver": "file", "filename": path_str(&a)}}),
        json!({"driver": "file", "node-name": r_file, "filename": path_str(&r)}),
        json!({"driver": "raw", "node-name": "r",
               "file": {"driver": "file", "filename": path_str(&a)}}),
    ] {
        out.push(reopen(&mut c, json!([bad])));
    }
    // A child given inline is reopened with its parent, and follows its read-only.
    out.push(c.outcome("block-export-del", json!({"id": "w"})));
    wait_for(&mut c, "BLOCK_EXPORT_DELETED", Duration::from_secs(30));
    let inline = |ro: Value| {
        json!([{"driver": "raw", "node-name": "r", "read-only": ro,
                "file": {"driver": "file", "filename": path_str(&r)}}])
    };
    out.push(reopen(&mut c, inline(json!(true))));
    out.push(nodes(&mut c, &dir));
    out.push(reopen(&mut c, inline(json!(false))));
    out.push(nodes(&mut c, &dir));
    out.iter().map(|v| normalize(v, &dir)).collect()
}

#[test]
fn list_is_all_or_nothing_and_fixed_options_are_refused_as_qsd() {
    let ds = both();
    let runs: Vec<_> = ds.iter().map(|(_, d)| all_or_nothing_scenario(d)).collect();
    assert_eq!(runs[0], runs[1], "sluice (left) vs qsd (right)");
    let r = &runs[0];
    let unchanged = json!([
        ["#auto", false, "DIR/r.raw", null],
        ["a", false, "DIR/a.qcow2", null],
        ["a-f", false, "DIR/a.qcow2", null],
        ["r", false, "DIR/r.raw", null]
    ]);
    for (i, want) in [
        (
            4,
            "Read-only block node 'r' cannot support read-write users",
        ),
        (6, "Failed to find node with node-name='nosuch'"),
        (8, "Cannot change the option 'driver'"),
        (
            10,
            "Read-only block node 'a-f' cannot support read-write users",
        ),
        (12, "Cannot change the option 'locking'"),
        (14, "Cannot change the option 'filename'"),
        (15, "Cannot change the option 'aio'"),
        (16, "Cannot change the option 'force-share'"),
        (17, "Cannot change the option 'file.driver'"),
        (18, "Cannot change the option 'node-name'"),
        (19, "Cannot change the option 'filename'"),
    ] {
        assert_eq!(
            r[i],
            json!(format!("error:GenericError:{want}")),
            "step {i}"
        );
    }
    for i in [5, 7, 9, 11, 13] {
        assert_eq!(r[i], unchanged, "step {i}");
    }
    assert_eq!(
        r[22][0][1],
        json!(true),
        "the inline file child follows its parent"
    );
    assert_eq!(r[24], unchanged);
}

fn job_scenario(d: &QmpDaemon) -> Vec<Value> {
    let dir = path_str(d.dir.path()).to_string();
    let (src, dst) = (d.path("src.qcow2"), d.path("dst.qcow2"));
    for p in [&src, &dst] {
        qemu_img(&["create", "-q", "-f", "qcow2", path_str(p), "4M"]);
    }
    qemu_io("qcow2", path_str(&src), &["write -P 0x44 0 4M"]);
    let mut c = d.connect_negotiated();
    let mut out = Vec::new();
    for n in ["src", "dst"] {
        out.push(c.outcome(
            "blockdev-add",
            json!({"driver": "file", "node-name": format!("{n}-f"),
                   "filename": path_str(&d.path(&format!("{n}.qcow2")))}),
        ));
        out.push(c.outcome(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": n, "file": format!("{n}-f")}),
        ));
    }
    // One byte a second: the job is still copying when the reopens come.
    out.push(c.outcome(
        "blockdev-mirror",
        json!({"job-id": "m", "device": "src", "target": "dst", "sync": "full", "speed": 1}),
    ));
    out.push(reopen(
        &mut c,
        json!([{"driver": "qcow2", "node-name": "dst", "file": "dst-f", "read-only": true}]),
    ));
    out.push(reopen(
        &mut c,
        json!([{"driver": "file", "node-name": "dst-f", "filename": path_str(&dst),
                "read-only": true}]),
    ));
    // Unchanged options are no change, job or not.
    out.push(reopen(
        &mut c,
        json!([{"driver": "qcow2", "node-name": "dst", "file": "dst-f"}]),
    ));
    out.push(c.outcome("block-job-cancel", json!({"device": "m", "force": true})));
    wait_for(&mut c, "BLOCK_JOB_CANCELLED", Duration::from_secs(60));
    out.iter().map(|v| normalize(v, &dir)).collect()
}

#[test]
fn job_target_cannot_become_read_only_as_qsd() {
    let ds = both();
    let runs: Vec<_> = ds.iter().map(|(_, d)| job_scenario(d)).collect();
    assert_eq!(runs[0], runs[1], "sluice (left) vs qsd (right)");
    let writer = |n: &str| {
        json!(format!(
            "error:GenericError:Read-only block node '{n}' cannot support read-write users"
        ))
    };
    assert_eq!(runs[0][5], writer("dst"));
    assert_eq!(runs[0][6], writer("dst-f"));
    assert_eq!(runs[0][7], json!({}));
}

#[test]
fn empty_list_returns_empty_where_qsd_aborts() {
    // qsd 10.0.2 fails an assertion (`bs_queue != NULL`) and dies: not compared.
    let d = QmpDaemon::sluice(&[]);
    let mut c = d.connect_negotiated();
    assert_eq!(reopen(&mut c, json!([])), json!({}));
}

#[test]
fn file_child_naming_another_node_is_refused_where_qsd_swaps_it() {
    let d = QmpDaemon::sluice(&[]);
    let (a, r) = (d.path("a.qcow2"), d.path("r.raw"));
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&a), "1M"]);
    qemu_img(&["create", "-q", "-f", "raw", path_str(&r), "1M"]);
    let mut c = d.connect_negotiated();
    for args in [
        json!({"driver": "file", "node-name": "a-f", "filename": path_str(&a)}),
        json!({"driver": "qcow2", "node-name": "a", "file": "a-f"}),
        json!({"driver": "file", "node-name": "r-f", "filename": path_str(&r)}),
    ] {
        assert_eq!(c.outcome("blockdev-add", args), json!({}));
    }
    assert_eq!(
        reopen(
            &mut c,
            json!([{"driver": "qcow2", "node-name": "a", "file": "r-f"}])
        ),
        json!(
            "error:GenericError:Cannot change the option 'file': sluice does not replace \
               the file child of a node ('a' keeps 'a-f', not 'r-f')"
        )
    );
}

#[test]
fn node_a_job_uses_is_not_reopened_where_qsd_would() {
    let d = QmpDaemon::sluice(&[]);
    let (src, dst) = (d.path("src.qcow2"), d.path("dst.qcow2"));
    for p in [&src, &dst] {
        qemu_img(&["create", "-q", "-f", "qcow2", path_str(p), "4M"]);
    }
    qemu_io("qcow2", path_str(&src), &["write -P 0x44 0 4M"]);
    let mut c = d.connect_negotiated();
    for n in ["src", "dst"] {
        let f = d.path(&format!("{n}.qcow2"));
        assert_eq!(
            c.outcome(
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": n,
                       "file": {"driver": "file", "filename": path_str(&f)}})
            ),
            json!({})
        );
    }
    assert_eq!(
        c.outcome(
            "blockdev-mirror",
            json!({"job-id": "m", "device": "src", "target": "dst", "sync": "full", "speed": 1})
        ),
        json!({})
    );
    // qsd makes a mirror's source read-only under the running job; sluice does not.
    assert_eq!(
        reopen(
            &mut c,
            json!([{"driver": "qcow2", "node-name": "src", "read-only": true,
                    "file": {"driver": "file", "filename": path_str(&src)}}])
        ),
        json!("error:GenericError:Node 'src' is busy: block device is in use by block job: mirror")
    );
}
