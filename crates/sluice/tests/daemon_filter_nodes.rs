//! qemu-storage-daemon's filter nodes on `sluice daemon`, each scenario run on both daemons
//! with the same inputs and compared: `blkdebug` (its rules seen through qemu-io on an NBD
//! export of a raw node over it, its refusals, its `query-named-block-nodes` entry, and a
//! block-stream whose reads of the base fail through it, with on-error stop and report, and
//! a mirror whose target's flush before `ready` fails through it, with on-target-error stop);
//! `copy-on-read` (reads through an export populate the top image, seen with `qemu-img map`,
//! and the node's entry); `throttle` with `throttle-group` objects (`--object` with `x-` and
//! `limits.` members, object-add's and qom-set's checks, qom-get, object-del of a group in
//! use, the node's entry) and the rates a group enforces, measured through an export.
//!
//! Compared loosely where the daemons differ on purpose (reported): a `json:` filename is
//! compared as parsed JSON (qemu writes its keys in hash order, sluice sorted); a failed
//! read is compared as "failed" (qsd drops the NBD connection after a failed read, with the
//! client seeing EIO; sluice answers the request with the error and keeps the connection).

use crate::support;

use std::path::Path;

use serde_json::{json, Value};
use support::image::{qcow2_over, qemu_img};
use support::path_str;
use support::qmp::{ok, run_until, start_nbd, Qmp, QmpDaemon};

const MIB: u64 = 1 << 20;

/// Both daemons, each in its own directory.
fn both() -> [(&'static str, QmpDaemon); 2] {
    [
        ("sluice", QmpDaemon::sluice(&[])),
        ("qsd", QmpDaemon::qsd(&[])),
    ]
}

/// `value` with the daemon's directory written `<dir>`, `json:` filenames parsed (so that
/// key order does not count) and generated node names written `#block`.
fn norm(value: &Value, dir: &Path) -> Value {
    match value {
        Value::String(s) => {
            let s = s.replace(path_str(dir), "<dir>");
            if let Some(j) = s.strip_prefix("json:") {
                let v: Value = serde_json::from_str(j).unwrap_or_else(|e| panic!("{e}: {s}"));
                return json!({"json": norm(&v, dir)});
            }
            if s.starts_with("#block") {
                return json!("#block");
            }
            Value::String(s)
        }
        Value::Array(a) => Value::Array(a.iter().map(|v| norm(v, dir)).collect()),
        // An image file's allocated size depends on how the filesystem placed the writes
        // that made it (4 KiB apart between two copies made the same way): whether it is
        // reported is compared, not its value.
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| match k.as_str() {
                    "actual-size" => (k.clone(), json!("<bytes>")),
                    _ => (k.clone(), norm(v, dir)),
                })
                .collect(),
        ),
        v => v.clone(),
    }
}

/// The `query-named-block-nodes` entries of `nodes` (in that order), normalized.
fn node_entries(c: &mut Qmp, d: &QmpDaemon, nodes: &[&str], flat: bool) -> Vec<Value> {
    let r = c.exec("query-named-block-nodes", json!({"flat": flat}));
    let all = r["return"].as_array().unwrap_or_else(|| panic!("{r}"));
    nodes
        .iter()
        .map(|n| {
            let e = all
                .iter()
                .find(|e| e["node-name"] == *n)
                .unwrap_or_else(|| panic!("no node {n}: {r}"));
            norm(e, d.dir.path())
        })
        .collect()
}

/// The reply to a command: `ok`, or `error:CLASS:DESC` with the directory written `<dir>`.
fn reply(c: &mut Qmp, d: &QmpDaemon, cmd: &str, args: Value) -> String {
    let r = c.exec(cmd, args);
    match r.get("error") {
        None => "ok".into(),
        Some(e) => format!(
            "error:{}:{}",
            e["class"].as_str().unwrap_or(""),
            e["desc"]
                .as_str()
                .unwrap_or("")
                .replace(path_str(d.dir.path()), "<dir>")
        ),
    }
}

/// Runs each qemu-io command on its own connection to `uri` and says whether it worked.
fn io_results(uri: &str, cmds: &[&str]) -> Vec<String> {
    cmds.iter()
        .map(|cmd| {
            let out = support::qemu_io_unchecked(uri, &[cmd]);
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let failed = !out.status.success() || text.contains("failed");
            format!("{cmd}: {}", if failed { "failed" } else { "ok" })
        })
        .collect()
}

/// A raw image of `size` bytes filled with byte `fill`.
fn raw_image(path: &Path, size: u64, fill: u8) {
    std::fs::write(path, vec![fill; size as usize]).unwrap();
}

fn file_opts(d: &QmpDaemon, name: &str) -> Value {
    json!({"driver": "file", "filename": path_str(&d.path(name))})
}

/// What one daemon gave for the blkdebug scenario.
#[derive(Debug, PartialEq)]
struct BlkdebugRun {
    refusals: Vec<String>,
    nodes: Vec<Value>,
    io: Vec<String>,
}

fn blkdebug_scenario(d: &QmpDaemon) -> BlkdebugRun {
    let mut c = d.connect_negotiated();
    for n in ["a.raw", "b.raw", "c.raw"] {
        raw_image(&d.path(n), 4 * MIB, 0x11);
    }
    let mut refusals = Vec::new();
    for args in [
        json!({"driver": "blkdebug", "node-name": "bad1", "image": "nosuch"}),
        json!({"driver": "blkdebug", "node-name": "bad2", "image": file_opts(d, "a.raw"),
               "inject-error": [{"event": "bogus"}]}),
        json!({"driver": "blkdebug", "node-name": "bad3", "image": file_opts(d, "a.raw"),
               "inject-error": [{"errno": 5}]}),
        json!({"driver": "blkdebug", "node-name": "bad4"}),
    ] {
        refusals.push(reply(&mut c, d, "blockdev-add", args));
    }
    // "r": reads of sector 8 fail once with ENOSPC. "w": after a write fails (any sector),
    // the active rule fails reads too, as qemu's rules apply to every I/O type.
    // "plain": blkdebug without rules; "direct": exported itself, so no format node raises
    // events and nothing fails.
    let added = [
        json!({"driver": "raw", "node-name": "r",
               "file": {"driver": "blkdebug", "node-name": "dbg", "image": file_opts(d, "a.raw"),
                        "inject-error": [{"event": "read_aio", "errno": 28, "sector": 8,
                                          "once": true}]}}),
        json!({"driver": "raw", "node-name": "w",
               "file": {"driver": "blkdebug", "node-name": "wdbg", "image": file_opts(d, "b.raw"),
                        "inject-error": [{"event": "write_aio", "errno": 28}]}}),
        json!({"driver": "blkdebug", "node-name": "direct", "image": file_opts(d, "c.raw"),
               "inject-error": [{"event": "read_aio"}]}),
    ];
    for args in added {
        ok(&mut c, "blockdev-add", args);
    }
    let nodes = [
        node_entries(&mut c, d, &["dbg", "r", "wdbg", "direct"], false),
        node_entries(&mut c, d, &["dbg", "r"], true),
    ]
    .concat();
    start_nbd(&mut c, d);
    for n in ["r", "w", "direct"] {
        ok(
            &mut c,
            "block-export-add",
            json!({"type": "nbd", "id": n, "node-name": n, "writable": true}),
        );
    }
    let mut io = io_results(
        &d.nbd_uri("r"),
        &[
            "read 0 4096",
            "read 4096 512",
            "read 4096 512",
            "write 4096 512",
            "read 0 64k",
        ],
    );
    io.extend(io_results(
        &d.nbd_uri("w"),
        &[
            "read 0 4096",
            "write 0 512",
            "read 0 4096",
            "write 8192 512",
        ],
    ));
    io.extend(io_results(
        &d.nbd_uri("direct"),
        &["read 0 4096", "write 0 512", "read 0 4096"],
    ));
    BlkdebugRun {
        refusals,
        nodes,
        io,
    }
}

#[test]
fn blkdebug_rules_refusals_and_nodes_match_qsd() {
    let [(_, s), (_, q)] = both();
    let got = blkdebug_scenario(&s);
    let want = blkdebug_scenario(&q);
    assert_eq!(got.refusals, want.refusals);
    assert_eq!(got.io, want.io);
    for (g, w) in got.nodes.iter().zip(&want.nodes) {
        assert_eq!(g, w, "\nsluice: {g:#}\nqsd: {w:#}");
    }
    // The rules did something: the once rule failed exactly one read.
    assert_eq!(got.io[1], "read 4096 512: failed");
    assert_eq!(got.io[2], "read 4096 512: ok");
}

/// A base qcow2 image full of data and an empty top over it, both 4 MiB.
fn two_layers(dir: &Path) {
    let base = path_str(&dir.join("base.qcow2")).to_string();
    let top = path_str(&dir.join("top.qcow2")).to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &base, "4M"]);
    support::image::qemu_io("qcow2", &base, &["write -P 0x5a 0 4M"]);
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top,
    ]);
}

/// The events of a message list, reduced to what does not depend on timing.
fn events(msgs: &[Value]) -> Vec<Value> {
    msgs.iter()
        .filter(|v| v.get("event").is_some())
        .map(|v| {
            let mut d = v["data"].clone();
            if let Some(m) = d.as_object_mut() {
                // Where a stopped job stood depends on the chunking; checked below.
                if v["event"] != "BLOCK_JOB_COMPLETED" || m.contains_key("error") {
                    m.remove("offset");
                }
                m.remove("len");
                // sluice's own addition to JOB_STATUS_CHANGE `concluded` (see
                // daemon_jobs_compare.rs).
                if v["event"] == "JOB_STATUS_CHANGE" {
                    m.remove("error");
                }
            }
            json!({"event": v["event"], "data": d})
        })
        .collect()
}

/// The stream scenario on one daemon: a base whose first data read fails once (stop, then a
/// resume that succeeds) and one whose data reads always fail (report). Returns the events
/// of each step and the top's data after the good stream.
fn stream_scenario(d: &QmpDaemon) -> Vec<Vec<Value>> {
    two_layers(d.dir.path());
    std::fs::copy(d.path("base.qcow2"), d.path("base2.qcow2")).unwrap();
    let top2 = d.path("top2.qcow2");
    qcow2_over(&top2, path_str(&d.path("base2.qcow2")), &[], None);
    let mut c = d.connect_negotiated();
    let chains = [
        ("s", "base.qcow2", "top.qcow2", true),
        ("r", "base2.qcow2", "top2.qcow2", false),
    ];
    for (p, base, top, once) in chains {
        ok(
            &mut c,
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": format!("{p}base"), "read-only": true,
                   "file": {"driver": "blkdebug", "image": file_opts(d, base),
                            "inject-error": [{"event": "read_aio", "errno": 5, "once": once}]}}),
        );
        ok(
            &mut c,
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": format!("{p}top"), "backing": format!("{p}base"),
                   "file": file_opts(d, top)}),
        );
    }
    let mut steps = Vec::new();
    let stream = |args: Value| json!({"execute": "block-stream", "arguments": args});
    // stop: the job pauses at the failed read; the retry succeeds (the rule was once).
    let got = run_until(
        &mut c,
        stream(json!({"job-id": "e0", "device": "stop", "on-error": "stop"})),
        "paused",
    );
    steps.push(events(&got));
    let r = c.exec("query-block-jobs", json!({}));
    let job = &r["return"][0];
    assert_eq!(
        (&job["io-status"], &job["paused"], &job["status"]),
        (&json!("failed"), &json!(true), &json!("paused")),
        "{r}"
    );
    let got = run_until(
        &mut c,
        json!({"execute": "job-resume", "arguments": {"id": "e0"}}),
        "null",
    );
    steps.push(events(&got));
    // report (the default): the job fails.
    let got = run_until(
        &mut c,
        stream(json!({"job-id": "e1", "device": "rtop"})),
        "null",
    );
    steps.push(events(&got));
    // The good stream left every cluster in the top, the failed one none.
    let map = |n: &str| {
        let out = qemu_img(&["map", "-U", "--output=json", path_str(&d.path(n))]);
        let runs: Vec<Value> = serde_json::from_str(&out).unwrap();
        runs.iter()
            .map(|r| json!([r["depth"], r["length"]]))
            .collect::<Vec<_>>()
    };
    assert_eq!(map("top.qcow2"), vec![json!([0, 4 * MIB])]);
    assert_eq!(map("top2.qcow2"), vec![json!([1, 4 * MIB])]);
    steps
}

#[test]
fn stream_on_error_through_blkdebug_matches_qsd() {
    let [(_, s), (_, q)] = both();
    let got = stream_scenario(&s);
    let want = stream_scenario(&q);
    assert_eq!(got, want);
    assert!(
        got[0].iter().any(|e| e["event"] == "BLOCK_JOB_ERROR"),
        "{got:?}"
    );
}

/// The mirror scenario on one daemon: a target whose first flush fails (blkdebug
/// `flush_to_disk`, once), mirrored into with on-target-error stop. The mirror flushes the
/// target before it is ready, so the job pauses with a write error there; the resumed job
/// flushes again and is ready. Returns the events of each step.
fn mirror_flush_scenario(d: &QmpDaemon) -> Vec<Vec<Value>> {
    let (src, tgt) = (d.path("src.qcow2"), d.path("tgt.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&src), "4M"]);
    support::image::qemu_io("qcow2", path_str(&src), &["write -P 0x6b 0 4M"]);
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&tgt), "4M"]);
    let mut c = d.connect_negotiated();
    ok(
        &mut c,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "src", "file": file_opts(d, "src.qcow2")}),
    );
    ok(
        &mut c,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "tgt",
               "file": {"driver": "blkdebug", "image": file_opts(d, "tgt.qcow2"),
                        "inject-error": [{"event": "flush_to_disk", "errno": 5, "once": true}]}}),
    );
    let mut steps = Vec::new();
    let got = run_until(
        &mut c,
        json!({"execute": "blockdev-mirror",
               "arguments": {"job-id": "m0", "device": "src", "target": "tgt", "sync": "full",
                             "on-target-error": "stop"}}),
        "paused",
    );
    steps.push(events(&got));
    let got = run_until(
        &mut c,
        json!({"execute": "job-resume", "arguments": {"id": "m0"}}),
        "ready",
    );
    steps.push(events(&got));
    let got = run_until(
        &mut c,
        json!({"execute": "job-complete", "arguments": {"id": "m0"}}),
        "null",
    );
    steps.push(events(&got));
    steps
}

#[test]
fn mirror_flushes_its_target_before_ready_as_qsd() {
    let [(_, s), (_, q)] = both();
    let got = mirror_flush_scenario(&s);
    let want = mirror_flush_scenario(&q);
    assert_eq!(got, want);
    assert!(
        got[0].iter().any(|e| e["event"] == "BLOCK_JOB_ERROR"),
        "{got:?}"
    );
    let compare = |d: &QmpDaemon| {
        qemu_img(&[
            "compare",
            "-U",
            path_str(&d.path("src.qcow2")),
            path_str(&d.path("tgt.qcow2")),
        ])
    };
    compare(&s);
    compare(&q);
}

/// The allocation of a qcow2 image as (start, length, depth, data) runs.
fn map_runs(path: &Path) -> Vec<Value> {
    let out = qemu_img(&["map", "-U", "--output=json", path_str(path)]);
    let runs: Vec<Value> = serde_json::from_str(&out).unwrap();
    runs.iter()
        .map(|r| json!([r["start"], r["length"], r["depth"], r["data"]]))
        .collect()
}

/// What one daemon gave for the copy-on-read scenario.
#[derive(Debug, PartialEq)]
struct CorRun {
    refusals: Vec<String>,
    nodes: Vec<Value>,
    io: Vec<String>,
    map: Vec<Value>,
}

fn cor_scenario(d: &QmpDaemon) -> CorRun {
    two_layers(d.dir.path());
    let mut c = d.connect_negotiated();
    let refusals = vec![reply(
        &mut c,
        d,
        "blockdev-add",
        json!({"driver": "copy-on-read", "node-name": "bad", "file": "nosuch"}),
    )];
    ok(
        &mut c,
        "blockdev-add",
        json!({"driver": "copy-on-read", "node-name": "cor",
               "file": {"driver": "qcow2", "node-name": "top",
                        "file": file_opts(d, "top.qcow2")}}),
    );
    let nodes = [
        node_entries(&mut c, d, &["cor"], false),
        node_entries(&mut c, d, &["cor"], true),
    ]
    .concat();
    start_nbd(&mut c, d);
    ok(
        &mut c,
        "block-export-add",
        json!({"type": "nbd", "id": "cor", "node-name": "cor", "writable": true}),
    );
    // Two cluster-aligned reads and one unaligned read inside a third cluster.
    let io = io_results(
        &d.nbd_uri("cor"),
        &[
            "read -P 0x5a 0 64k",
            "read -P 0x5a 1M 64k",
            "read -P 0x5a 2097252 1000",
        ],
    );
    CorRun {
        refusals,
        nodes,
        io,
        map: map_runs(&d.path("top.qcow2")),
    }
}

#[test]
fn copy_on_read_populates_top_as_qsd() {
    let [(_, s), (_, q)] = both();
    let got = cor_scenario(&s);
    let want = cor_scenario(&q);
    assert_eq!(got.refusals, want.refusals);
    assert_eq!(got.io, want.io);
    for (g, w) in got.nodes.iter().zip(&want.nodes) {
        assert_eq!(g, w, "\nsluice: {g:#}\nqsd: {w:#}");
    }
    assert_eq!(got.map, want.map);
    // The reads did copy: the top holds three clusters of its own.
    let own: Vec<&Value> = got
        .map
        .iter()
        .filter(|r| r[2] == 0 && r[3] == true)
        .collect();
    assert_eq!(own.len(), 3, "{:?}", got.map);
}

/// What one daemon gave for the throttle scenario.
#[derive(Debug, PartialEq)]
struct ThrottleRun {
    replies: Vec<String>,
    values: Vec<Value>,
    nodes: Vec<Value>,
}

fn throttle_scenario(d: &QmpDaemon) -> ThrottleRun {
    let mut c = d.connect_negotiated();
    raw_image(&d.path("t.raw"), 8 * MIB, 0x33);
    let mut replies = Vec::new();
    let mut values = Vec::new();
    let mut get = |c: &mut Qmp, path: &str, prop: &str| {
        let r = c.exec("qom-get", json!({"path": path, "property": prop}));
        values.push(r.get("return").cloned().unwrap_or(Value::Null));
    };
    get(&mut c, "tg0", "limits");
    let group =
        |id: &str, limits: Value| json!({"qom-type": "throttle-group", "id": id, "limits": limits});
    for args in [
        group("bad", json!({"iops-total": 100, "iops-read": 5})),
        group("bad", json!({"iops-total": -1})),
        group("bad", json!({"iops-total-max": 10})),
        group("bad", json!({"iops-total": 100, "iops-total-max": 10})),
        group("tg", json!({"iops-total": 100})),
        json!({"qom-type": "secret", "id": "sec", "data": "x"}),
    ] {
        replies.push(reply(&mut c, d, "object-add", args));
    }
    for (path, prop, value) in [
        ("nosuch", "limits", json!({})),
        ("tg", "nosuch", json!(1)),
        ("tg", "x-iops-total", json!(5)),
        ("tg", "limits", json!({"iops-total": -5})),
        ("tg", "limits", json!({"iops-read": 5})),
        ("tg", "limits", json!({"iops-foo": 5})),
        ("tg", "limits", json!(5)),
        ("sec", "limits", json!({})),
        ("/objects/tg0", "limits", json!({"bps-total": 2000})),
    ] {
        replies.push(reply(
            &mut c,
            d,
            "qom-set",
            json!({"path": path, "property": prop, "value": value}),
        ));
    }
    for (path, prop) in [("nosuch", "limits"), ("tg", "nosuch"), ("sec", "limits")] {
        replies.push(reply(
            &mut c,
            d,
            "qom-get",
            json!({"path": path, "property": prop}),
        ));
    }
    get(&mut c, "tg0", "limits");
    get(&mut c, "tg0", "x-bps-total");
    get(&mut c, "/objects/tg", "x-iops-total");
    let node = |name: &str, group: &str| {
        json!({"driver": "throttle", "node-name": name, "throttle-group": group,
               "file": {"driver": "raw", "file": file_opts(d, "t.raw")}})
    };
    for args in [node("bad", "nosuch"), node("bad", "sec"), node("thr", "tg")] {
        replies.push(reply(&mut c, d, "blockdev-add", args));
    }
    replies.push(reply(&mut c, d, "object-del", json!({"id": "tg"})));
    let nodes = [
        node_entries(&mut c, d, &["thr"], false),
        node_entries(&mut c, d, &["thr"], true),
    ]
    .concat();
    ThrottleRun {
        replies,
        values,
        nodes,
    }
}

const GROUP0: &str = "throttle-group,id=tg0,x-iops-total=50,limits.bps-total=1000";

#[test]
fn throttle_groups_and_nodes_match_qsd() {
    let s = QmpDaemon::sluice(&["--object", GROUP0]);
    let q = QmpDaemon::qsd(&["--object", GROUP0]);
    let got = throttle_scenario(&s);
    let want = throttle_scenario(&q);
    assert_eq!(got.replies, want.replies);
    assert_eq!(got.values, want.values);
    for (g, w) in got.nodes.iter().zip(&want.nodes) {
        assert_eq!(g, w, "\nsluice: {g:#}\nqsd: {w:#}");
    }
    assert_eq!(got.values[0]["iops-total"], 50);
    assert_eq!(got.values[1]["bps-total"], 2000);
}

/// Runs qemu-io with `cmds` on `uri` and returns how long it took.
fn timed_io(uri: &str, cmds: &[String]) -> f64 {
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let t = std::time::Instant::now();
    support::qemu_io_with(&["-r"], uri, &cmds);
    t.elapsed().as_secs_f64()
}

#[test]
fn throttle_group_limits_the_rate_and_qom_set_changes_it() {
    let d = QmpDaemon::sluice(&[]);
    let mut c = d.connect_negotiated();
    raw_image(&d.path("t.raw"), 8 * MIB, 0x33);
    ok(
        &mut c,
        "object-add",
        json!({"qom-type": "throttle-group", "id": "tg", "limits": {"iops-total": 100}}),
    );
    ok(
        &mut c,
        "blockdev-add",
        json!({"driver": "throttle", "node-name": "thr", "throttle-group": "tg",
               "file": {"driver": "raw", "file": file_opts(&d, "t.raw")}}),
    );
    start_nbd(&mut c, &d);
    ok(
        &mut c,
        "block-export-add",
        json!({"type": "nbd", "id": "thr", "node-name": "thr"}),
    );
    let uri = d.nbd_uri("thr");
    // 160 requests at 100/s: the first 10 are the burst (a tenth of a second), the rest
    // take 1.5 s.
    let reads: Vec<String> = (0..160).map(|i| format!("read {} 4k", i * 4096)).collect();
    let secs = timed_io(&uri, &reads);
    let iops = 150.0 / secs;
    assert!(
        (80.0..=120.0).contains(&iops),
        "{iops:.1} IOPS in {secs:.2} s (limit 100)"
    );
    // Now bytes: 2 MiB/s, no request limit (0 lifts it).
    ok(
        &mut c,
        "qom-set",
        json!({"path": "tg", "property": "limits",
               "value": {"iops-total": 0, "bps-total": 2 * MIB}}),
    );
    let reads: Vec<String> = (0..48).map(|i| format!("read {} 64k", i * 65536)).collect();
    let secs = timed_io(&uri, &reads);
    // 3 MiB, of which a tenth of a second's worth is the burst.
    let bps = (3.0 * MIB as f64 - 0.2 * MIB as f64) / secs;
    assert!(
        (0.8..=1.2).contains(&(bps / (2 * MIB) as f64)),
        "{bps:.0} B/s in {secs:.2} s (limit {})",
        2 * MIB
    );
    eprintln!(
        "throttle: {iops:.1} IOPS (limit 100), {bps:.0} B/s (limit {})",
        2 * MIB
    );
}
