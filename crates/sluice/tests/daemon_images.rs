//! `sluice daemon` with image nodes: `blockdev-add` of `file`, `raw` and `qcow2` nodes and
//! qcow2 backing chains (opened from the headers, or node by node), their exports (block
//! status in both contexts equal to qemu-nbd's, writes that leave a clean image), the
//! errors and refusals qemu-storage-daemon gives for the same cases, and a hard
//! `block-export-del` disconnecting a client.
//!
//! Images are made at test time with qemu-img and qemu-io (see `support/image.rs`).

use crate::support;

use std::path::Path;

use serde_json::{json, Value};
use support::image::{nbdinfo_map, qemu_img, qemu_img_check, three_layers, two_layers, QemuNbd};
use support::qmp::{daemon_with_top, ok, run_qmp_python, start_nbd, Qmp, QmpDaemon};
use support::{path_str, qemu_io, NbdHolder};

/// A daemon with the qcow2 image `top` (backing from its header) exported writable as `top`.
fn export_top(top: &Path) -> (QmpDaemon, Qmp) {
    let (d, mut c) = daemon_with_top(top);
    start_nbd(&mut c, &d);
    ok(
        &mut c,
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "top", "writable": true}),
    );
    (d, c)
}

/// Runs `execute`, asserts a GenericError and returns its message.
fn generic_error(c: &mut Qmp, cmd: &str, args: Value) -> String {
    let r = c.exec(cmd, args.clone());
    let (class, desc) = Qmp::error(&r);
    assert_eq!(class, "GenericError", "{cmd} {args}: {desc}");
    desc
}

/// `block-export-del` in safe mode once the last client's connection has ended (a client
/// that has exited may still be being disconnected for a moment), then its event.
fn del_export_once_clients_left(c: &mut Qmp, id: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = c.exec("block-export-del", json!({"id": id}));
        if r == json!({"return": {}}) {
            break;
        }
        assert_eq!(
            Qmp::error(&r).1,
            format!("export '{id}' still in use"),
            "{r}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "export {id} stayed in use"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        c.wait_event("BLOCK_EXPORT_DELETED")["data"],
        json!({"id": id})
    );
}

/// Block status of `uri` in both contexts, as nbdinfo prints them.
fn maps(uri: &str) -> [String; 2] {
    [
        nbdinfo_map(uri, "base:allocation"),
        nbdinfo_map(uri, "qemu:allocation-depth"),
    ]
}

/// qemu-nbd's answer for the same image (read-only, with allocation depth).
fn qemu_nbd_maps(top: &std::path::Path) -> [String; 2] {
    let q = QemuNbd::start(&["-r", "-A", "-f", "qcow2", path_str(top)]);
    maps(&q.uri())
}

/// Adds nodes, starts the NBD server and exports with `allocation-depth`, through QEMU's
/// Python client library.
const EXPORT_CHAIN_WITH_QEMU_QMP: &str = r#"
import asyncio, sys
from qemu.qmp import QMPClient

qmp_path, nbd_path, top = sys.argv[1:4]

async def main():
    q = QMPClient('sluice-test')
    await q.connect(qmp_path)
    await q.execute('blockdev-add', {'driver': 'qcow2', 'node-name': 'top', 'read-only': True,
                                     'file': {'driver': 'file', 'filename': top}})
    await q.execute('nbd-server-start', {'addr': {'type': 'unix', 'data': {'path': nbd_path}}})
    await q.execute('block-export-add', {'type': 'nbd', 'id': 'e0', 'node-name': 'top',
                                         'allocation-depth': True})
    nodes = await q.execute('query-named-block-nodes')
    for n in nodes:
        print(n['node-name'].startswith('#'), n['drv'], n['ro'], n['backing_file_depth'])
    await q.disconnect()

asyncio.run(main())
"#;

#[test]
fn qcow2_chain_from_headers_export_maps_match_qemu_nbd() {
    let images = two_layers();
    let reference = qemu_nbd_maps(&images.top);
    let d = QmpDaemon::sluice(&[]);
    let out = run_qmp_python(
        EXPORT_CHAIN_WITH_QEMU_QMP,
        &[
            path_str(&d.qmp),
            path_str(&d.path("nbd.sock")),
            path_str(&images.top),
        ],
    );
    // Newest first: the raw base and its file (opened from the header) after the top.
    assert_eq!(
        out,
        "True raw True 0\nTrue file True 0\nFalse qcow2 True 1\nTrue file True 0\n"
    );
    assert_eq!(maps(&d.nbd_uri("top")), reference);
}

#[test]
fn qcow2_chain_by_node_names_export_maps_match_qemu_nbd() {
    let images = three_layers();
    let reference = qemu_nbd_maps(&images.top);
    let d = QmpDaemon::sluice(&[]);
    let mut c = d.connect_negotiated();
    for (name, backing) in [
        ("base", Value::Null),
        ("mid", json!("base")),
        ("top", json!("mid")),
    ] {
        let file = format!("{name}-file");
        ok(
            &mut c,
            "blockdev-add",
            json!({"driver": "file", "node-name": file, "read-only": true,
                   "filename": path_str(&images.path(&format!("{name}.qcow2")))}),
        );
        ok(
            &mut c,
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": name, "read-only": true, "file": file,
                   "backing": backing}),
        );
    }
    start_nbd(&mut c, &d);
    ok(
        &mut c,
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "top", "allocation-depth": true}),
    );
    ok(
        &mut c,
        "block-export-add",
        json!({"type": "nbd", "id": "e1", "node-name": "top", "name": "plain"}),
    );
    assert_eq!(maps(&d.nbd_uri("top")), reference);
    // Without `allocation-depth`, only base:allocation is offered (as with qsd).
    assert_eq!(
        nbdinfo_map(&d.nbd_uri("plain"), "base:allocation"),
        reference[0]
    );
    let out = support::output(
        "nbdinfo",
        &["--map=qemu:allocation-depth", &d.nbd_uri("plain")],
    );
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "nbdinfo: --map: server does not support metadata context \"qemu:allocation-depth\"\n"
    );
}

#[test]
fn query_named_block_nodes_chain_reports_backing_as_qsd() {
    let images = three_layers();
    let d = QmpDaemon::sluice(&[]);
    let mut c = d.connect_negotiated();
    let top = path_str(&images.top).to_string();
    let dir = path_str(images.dir.path()).to_string();
    ok(
        &mut c,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top", "read-only": true,
               "file": {"driver": "file", "filename": top}}),
    );
    let flat = c.exec("query-named-block-nodes", json!({"flat": true}))["return"].clone();
    let full = c.exec("query-named-block-nodes", json!({}))["return"].clone();
    let summary = |v: &Value| -> Vec<Value> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|n| {
                json!([
                    n["drv"],
                    n["file"],
                    n["backing_file"],
                    n["backing_file_depth"]
                ])
            })
            .collect()
    };
    let mid = format!("{dir}/mid.qcow2");
    let base = format!("{dir}/base.qcow2");
    // qemu-storage-daemon's order: newest first, a backing after the node that opened it.
    assert_eq!(
        summary(&flat),
        vec![
            json!(["qcow2", base, null, 0]),
            json!(["file", base, null, 0]),
            json!(["qcow2", mid, base, 0]),
            json!(["file", mid, null, 0]),
            json!(["qcow2", top, mid, 0]),
            json!(["file", top, null, 0]),
        ]
    );
    assert_eq!(full[4]["backing_file_depth"], json!(2));
    let image = &full[4]["image"];
    assert_eq!(image["backing-filename"], json!("mid.qcow2"));
    assert_eq!(image["full-backing-filename"], json!(mid));
    assert_eq!(image["backing-filename-format"], json!("qcow2"));
    assert_eq!(image["cluster-size"], json!(65536));
    assert_eq!(image["virtual-size"], json!(3 << 20));
    assert_eq!(
        image["format-specific"],
        json!({"type": "qcow2", "data": {"compat": "1.1", "lazy-refcounts": false,
               "corrupt": false, "refcount-bits": 16, "extended-l2": false,
               "compression-type": "zlib"}})
    );
    assert_eq!(image["backing-image"]["filename"], json!(mid));
    assert_eq!(image["backing-image"]["cluster-size"], json!(512));
    assert_eq!(
        image["backing-image"]["backing-image"]["format-specific"]["data"],
        json!({"compat": "0.10", "refcount-bits": 16, "compression-type": "zlib"})
    );
    assert!(flat[4]["image"].get("backing-image").is_none());
}

#[test]
fn qcow2_export_written_through_nbd_passes_qemu_img_check() {
    let images = two_layers();
    let reference = images.copy();
    let writes = [
        "write -P 0x41 0 64k",
        "write -P 0x42 1000000 70000",
        "write -z 2M 128k",
        "discard 3M 64k",
        "write -P 0x43 5177344 65536",
    ];
    support::image::qemu_io("qcow2", path_str(&reference.top), &writes);

    let (mut d, mut c) = export_top(&images.top);
    qemu_io(&d.nbd_uri("top"), &writes);
    qemu_io(
        &d.nbd_uri("top"),
        &[
            "read -P 0x41 0 64k",
            "read -P 0 2M 128k",
            "read -P 0x43 5177344 65536",
        ],
    );
    del_export_once_clients_left(&mut c, "e0");
    ok(&mut c, "blockdev-del", json!({"node-name": "top"}));
    ok(&mut c, "quit", json!({}));
    assert_eq!(d.wait().code(), Some(0));

    let (code, text) = qemu_img_check(&images.top);
    assert_eq!(code, 0, "qemu-img check: {text}");
    qemu_img(&["compare", path_str(&reference.top), path_str(&images.top)]);
}

#[test]
fn blockdev_del_nodes_in_use_refused_with_qsd_messages() {
    let images = two_layers();
    let d = QmpDaemon::sluice(&[]);
    let mut c = d.connect_negotiated();
    ok(
        &mut c,
        "blockdev-add",
        json!({"driver": "file", "node-name": "bf", "read-only": true,
               "filename": path_str(&images.path("base.raw"))}),
    );
    ok(
        &mut c,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "base", "read-only": true, "file": "bf"}),
    );
    ok(
        &mut c,
        "blockdev-add",
        json!({"driver": "file", "node-name": "tf", "filename": path_str(&images.top)}),
    );
    ok(
        &mut c,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top", "file": "tf", "backing": "base"}),
    );
    start_nbd(&mut c, &d);
    ok(
        &mut c,
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "top"}),
    );
    let del = |c: &mut Qmp, n: &str| generic_error(c, "blockdev-del", json!({"node-name": n}));
    assert_eq!(del(&mut c, "top"), "Node top is in use");
    assert_eq!(
        del(&mut c, "base"),
        "Node 'base' is busy: node is used as backing hd of 'top'"
    );
    assert_eq!(del(&mut c, "tf"), "Block device tf is in use");
    assert_eq!(del(&mut c, "bf"), "Block device bf is in use");
    del_export_once_clients_left(&mut c, "e0");
    for n in ["top", "base", "tf", "bf"] {
        ok(&mut c, "blockdev-del", json!({"node-name": n}));
    }
    assert_eq!(
        c.exec("query-named-block-nodes", json!({})),
        json!({"return": []})
    );
}

#[test]
fn blockdev_add_image_errors_use_qsd_messages() {
    let images = two_layers();
    let d = QmpDaemon::sluice(&[]);
    let mut c = d.connect_negotiated();
    let top = path_str(&images.top).to_string();
    let base = path_str(&images.path("base.raw")).to_string();
    let missing = path_str(&images.path("missing.qcow2")).to_string();
    let add = |c: &mut Qmp, v: Value| generic_error(c, "blockdev-add", v);
    assert_eq!(
        add(
            &mut c,
            json!({"driver": "qcow2", "node-name": "m", "file": {"driver": "file", "filename": missing}})
        ),
        format!("Could not open '{missing}': No such file or directory")
    );
    assert_eq!(
        add(
            &mut c,
            json!({"driver": "qcow2", "node-name": "m", "file": {"driver": "file", "filename": base}})
        ),
        "Image is not in qcow2 format"
    );
    assert_eq!(
        add(
            &mut c,
            json!({"driver": "qcow2", "node-name": "m", "file": "nope"})
        ),
        "Cannot find device='nope' nor node-name='nope'"
    );
    assert_eq!(
        add(
            &mut c,
            json!({"driver": "qcow2", "node-name": "m", "backing": "nope",
                   "file": {"driver": "file", "filename": top}})
        ),
        "Could not open backing file: Cannot find device='nope' nor node-name='nope'"
    );
    assert_eq!(
        add(
            &mut c,
            json!({"driver": "raw", "node-name": "m", "backing": null,
                   "file": {"driver": "file", "filename": base}})
        ),
        "Parameter 'backing' is unexpected"
    );
    ok(
        &mut c,
        "blockdev-add",
        json!({"driver": "file", "node-name": "ro", "read-only": true, "filename": top}),
    );
    assert_eq!(
        add(
            &mut c,
            json!({"driver": "qcow2", "node-name": "m", "file": "ro"})
        ),
        "Block node is read-only"
    );
    ok(&mut c, "blockdev-del", json!({"node-name": "ro"}));
    ok(
        &mut c,
        "blockdev-add",
        json!({"driver": "file", "node-name": "tf", "filename": top}),
    );
    ok(
        &mut c,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top", "file": "tf"}),
    );
    assert_eq!(
        add(
            &mut c,
            json!({"driver": "qcow2", "node-name": "top", "file": "tf"})
        ),
        "Duplicate nodes with node-name='top'"
    );
    assert_eq!(
        add(
            &mut c,
            json!({"driver": "qcow2", "node-name": "top2", "file": "tf"})
        ),
        "Permission conflict on node 'tf': permissions 'write, resize' are both required by \
         node 'top' (uses node 'tf' as 'file' child) and unshared by node 'top2' (uses node \
         'tf' as 'file' child)."
    );
    // The image is in use by this daemon: a second file node cannot take its locks.
    assert_eq!(
        add(
            &mut c,
            json!({"driver": "qcow2", "node-name": "top3", "file": {"driver": "file", "filename": top}})
        ),
        "Failed to get \"write\" lock"
    );
    // A failed add leaves nothing behind.
    let nodes = c.exec("query-named-block-nodes", json!({"flat": true}));
    let names: Vec<&Value> = nodes["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| &n["drv"])
        .collect();
    assert_eq!(names, vec!["raw", "file", "qcow2", "file"]);
}

#[test]
fn hard_export_del_disconnects_connected_nbdsh_client() {
    let images = two_layers();
    let (d, mut c) = export_top(&images.top);
    // nbdsh's library (libnbd): connect, read, wait for stdin to close, read again.
    let holder = NbdHolder::connect(
        &d.nbd_uri("top"),
        "assert h.pread(512, 0) == b'\\x11' * 512",
    );
    assert_eq!(
        generic_error(&mut c, "block-export-del", json!({"id": "e0"})),
        "export 'e0' still in use"
    );
    ok(
        &mut c,
        "block-export-del",
        json!({"id": "e0", "mode": "hard"}),
    );
    // Disconnected at once: the export is gone before the reply, as with qsd.
    let events: Vec<Value> = c.events.drain(..).collect();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["event"], "BLOCK_EXPORT_DELETED");
    assert_eq!(events[0]["data"], json!({"id": "e0"}));
    assert_eq!(
        c.exec("query-block-exports", json!({})),
        json!({"return": []})
    );
    assert_eq!(holder.release(), "read failed ENOTCONN\n");
    // The node is free again.
    ok(&mut c, "blockdev-del", json!({"node-name": "top"}));
}
