//! Dirty bitmaps exported over NBD (`block-export-add bitmaps: [...]`, issue #15 item 3) on
//! qemu-storage-daemon and `sluice daemon`, each on a fresh copy of the same image: the
//! same commands must succeed or fail with the same class and message, and after the same
//! writes `nbdinfo --map=qemu:dirty-bitmap:NAME`, `qemu-img map` with `x-dirty-bitmap` and
//! `LIST_META_CONTEXT` for `qemu:` and `qemu:dirty-bitmap:` must print the same.
//!
//! `sluice serve image ... bitmap=NAME` against qemu-nbd's `-B` is in `serve_bitmaps.rs`.

use crate::support;

use serde_json::{json, Value};
use support::image::{qemu_img, qemu_io as qemu_io_image};
use support::path_str;
use support::qmp::{Qmp, QmpDaemon};

/// What one daemon answered and printed, step by step: (what, answer).
type Transcript = Vec<(String, Value)>;

/// Runs one command; records its reply's shape (`"ok"` or class and desc).
fn step(q: &mut Qmp, out: &mut Transcript, name: &str, args: Value) -> Value {
    let r = q.exec(name, args.clone());
    let shape = match r.get("error") {
        Some(e) => json!({"class": e["class"], "desc": e["desc"]}),
        None => json!("ok"),
    };
    out.push((format!("{name} {args}"), shape));
    r
}

/// The `dirty-bitmaps` of node `node` in a `query-named-block-nodes` reply.
fn bitmaps_of(r: &Value, node: &str) -> Value {
    r["return"]
        .as_array()
        .expect("query-named-block-nodes")
        .iter()
        .find(|n| n["node-name"] == node)
        .and_then(|n| n.get("dirty-bitmaps").cloned())
        .unwrap_or(Value::Null)
}

/// The contexts a LIST_META_CONTEXT with `query` lists for `uri` (python3-libnbd).
fn list_contexts(uri: &str, query: &str) -> String {
    support::nbdsh(
        uri,
        &format!(
            "h = nbd.NBD()\nh.set_opt_mode(True)\nh.connect_uri(uri)\n\
             h.clear_meta_contexts()\nh.add_meta_context({query:?})\n\
             got = []\nh.opt_list_meta_context(lambda name: got.append(name))\n\
             print(' '.join(sorted(got)))\nh.opt_abort()"
        ),
    )
}

/// `qemu-img map --output=json` of a dirty-bitmap context: qemu reports a dirty extent as
/// `data: false` (its trick: the context's bit 0 lands on NBD_STATE_HOLE).
fn qemu_img_map_bitmap(sock: &str, export: &str, bitmap: &str) -> String {
    qemu_img(&[
        "map",
        "--output=json",
        "--image-opts",
        &format!(
            "driver=nbd,server.type=unix,server.path={sock},export={export},\
             x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}"
        ),
    ])
}

/// The scenario, on one daemon over `image` (64 MiB qcow2, 4 MiB of data at 0).
fn scenario(d: &QmpDaemon, image: &str, scratch: &str) -> Transcript {
    let mut q = d.connect_negotiated();
    let sock = d.path("nbd.sock");
    let sock = path_str(&sock);
    let mut out = Transcript::new();
    let s = &mut out;
    step(
        &mut q,
        s,
        "blockdev-add",
        json!({"driver": "file", "node-name": "df", "filename": image}),
    );
    step(
        &mut q,
        s,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "d", "file": "df"}),
    );
    for args in [
        json!({"node": "d", "name": "b0"}),
        json!({"node": "d", "name": "fine", "granularity": 4096}),
        json!({"node": "d", "name": "dis", "disabled": true}),
        json!({"node": "d", "name": "idle"}),
    ] {
        step(&mut q, s, "block-dirty-bitmap-add", args);
    }
    step(
        &mut q,
        s,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    );
    let export = |id: &str, writable: bool, bitmaps: Value| {
        json!({"type": "nbd", "id": id, "node-name": "d", "name": id, "writable": writable,
               "bitmaps": bitmaps})
    };
    for args in [
        // Refusals first: nothing may be left busy by them.
        export("x1", true, json!(["zz"])),
        export("x2", true, json!([{"node": "nope", "name": "b0"}])),
        export("x3", true, json!([{"node": "d", "name": "zz"}])),
        export("x4", false, json!(["idle"])),
        export("x5", true, json!(["b0", "zz"])),
        export("e0", true, json!(["b0", {"node": "d", "name": "fine"}])),
        // Busy now: a bitmap is exported by one export at a time.
        export("x6", true, json!(["b0"])),
        export("ro", false, json!(["dis"])),
    ] {
        step(&mut q, s, "block-export-add", args);
    }
    let r = step(&mut q, s, "query-named-block-nodes", json!({}));
    s.push(("dirty-bitmaps while exported".into(), bitmaps_of(&r, "d")));
    step(
        &mut q,
        s,
        "block-dirty-bitmap-remove",
        json!({"node": "d", "name": "b0"}),
    );
    step(
        &mut q,
        s,
        "block-dirty-bitmap-clear",
        json!({"node": "d", "name": "fine"}),
    );
    let uri = |e: &str| format!("nbd+unix:///{e}?socket={sock}");
    // Writes: a whole 64 KiB block, 128 KiB across two, 1000 bytes inside one block, a
    // zero and a trim (the granularity-4096 bitmap sees the smaller ranges).
    support::qemu_io(
        &uri("e0"),
        &[
            "write -P 0x22 8M 64k",
            "write -P 0x23 20M 128k",
            "write -P 0x24 33000 1000",
            "write -z 40M 12k",
            "write -P 0x25 63M 4k",
        ],
    );
    for (export, bitmap) in [("e0", "b0"), ("e0", "fine"), ("ro", "dis")] {
        s.push((
            format!("nbdinfo --map qemu:dirty-bitmap:{bitmap} on {export}"),
            json!(support::image::nbdinfo_map(
                &uri(export),
                &format!("qemu:dirty-bitmap:{bitmap}")
            )),
        ));
        s.push((
            format!("qemu-img map x-dirty-bitmap={bitmap} on {export}"),
            json!(qemu_img_map_bitmap(sock, export, bitmap)),
        ));
    }
    for query in [
        "qemu:",
        "qemu:dirty-bitmap:",
        "qemu:dirty-bitmap:fine",
        "base:",
    ] {
        s.push((
            format!("LIST_META_CONTEXT {query} on e0"),
            json!(list_contexts(&uri("e0"), query)),
        ));
    }
    s.push((
        "nbdinfo --json contexts on e0".into(),
        support::nbdinfo_json(&[], &uri("e0"))["exports"][0]["contexts"].clone(),
    ));
    // A scratch qcow2 over the node (libvirt's pull mode): a plain name is looked up down
    // the backing chain.
    step(
        &mut q,
        s,
        "blockdev-add",
        json!({"driver": "file", "node-name": "sf", "filename": scratch}),
    );
    step(
        &mut q,
        s,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "sc", "file": "sf", "backing": "d"}),
    );
    step(
        &mut q,
        s,
        "block-dirty-bitmap-disable",
        json!({"node": "d", "name": "idle"}),
    );
    step(
        &mut q,
        s,
        "block-export-add",
        json!({"type": "nbd", "id": "sc", "node-name": "sc", "bitmaps": ["idle"]}),
    );
    step(&mut q, s, "block-export-del", json!({"id": "e0"}));
    let r = step(&mut q, s, "query-named-block-nodes", json!({}));
    s.push(("dirty-bitmaps after export-del".into(), bitmaps_of(&r, "d")));
    step(
        &mut q,
        s,
        "block-dirty-bitmap-remove",
        json!({"node": "d", "name": "b0"}),
    );
    // nbd-server-add's single bitmap (deprecated, still used by older libvirt).
    let r = step(
        &mut q,
        s,
        "nbd-server-add",
        json!({"device": "d", "name": "old", "bitmap": "fine", "writable": true}),
    );
    if r.get("error").is_some() {
        return out;
    }
    s.push((
        "nbdinfo --map qemu:dirty-bitmap:fine on old".into(),
        json!(support::image::nbdinfo_map(
            &uri("old"),
            "qemu:dirty-bitmap:fine"
        )),
    ));
    out
}

#[test]
fn bitmap_export_matches_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let img = |n: &str| {
        let p = dir.path().join(n);
        qemu_img(&["create", "-q", "-f", "qcow2", path_str(&p), "64M"]);
        qemu_io_image("qcow2", path_str(&p), &["write -P 0x11 0 4M"]);
        path_str(&p).to_string()
    };
    let scratch = |n: &str| {
        let p = dir.path().join(n);
        qemu_img(&["create", "-q", "-f", "qcow2", path_str(&p), "64M"]);
        path_str(&p).to_string()
    };
    let qsd = scenario(
        &QmpDaemon::qsd(&[]),
        &img("qsd.qcow2"),
        &scratch("qs.qcow2"),
    );
    let sluice = scenario(
        &QmpDaemon::sluice(&[]),
        &img("sluice.qcow2"),
        &scratch("ss.qcow2"),
    );
    assert_eq!(qsd.len(), sluice.len());
    let mut diffs = Vec::new();
    for ((what, a), (_, b)) in qsd.iter().zip(&sluice) {
        // The image paths differ between the two runs.
        let same = |v: &Value, from: &str| -> Value {
            serde_json::from_str(&v.to_string().replace(from, "IMG")).unwrap()
        };
        let (a, b) = (same(a, "qsd.qcow2"), same(b, "sluice.qcow2"));
        if a != b {
            diffs.push(format!("{what}\n  qsd:    {a}\n  sluice: {b}"));
        }
    }
    assert!(diffs.is_empty(), "differences:\n{}", diffs.join("\n"));
    if std::env::var_os("SHOW").is_some() {
        for (what, v) in &sluice {
            eprintln!("{what}\n    {v}");
        }
    }
    // Equal is not enough: the map is what was written.
    let map = &sluice
        .iter()
        .find(|(w, _)| w == "nbdinfo --map qemu:dirty-bitmap:b0 on e0")
        .unwrap()
        .1;
    let dirty: Vec<(u64, u64)> = map
        .as_str()
        .unwrap()
        .lines()
        .filter(|l| l.ends_with("dirty"))
        .map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .take(2)
                .map(|n| n.parse().unwrap())
                .collect();
            (f[0], f[1])
        })
        .collect();
    let k = 1024;
    assert_eq!(
        dirty,
        vec![
            (0, 64 * k),
            (8 << 20, 64 * k),
            (20 << 20, 128 * k),
            (40 << 20, 64 * k),
            (63 << 20, 64 * k)
        ],
        "{map}"
    );
    assert!(
        sluice.iter().any(|(w, _)| w.contains("on old")),
        "nbd-server-add with a bitmap failed"
    );
}
