//! Persistent dirty bitmaps in qcow2 images (issue #15 item 2), side by side with qemu:
//! the same scenario runs on qemu-storage-daemon and `sluice daemon` over copies of one image,
//! and what each saved is read back by `qemu-img info`, `qemu-img check`, qsd and qemu-nbd
//! (`-B NAME`, whose `qemu:dirty-bitmap:` map shows the saved bits). Bitmaps qemu made are
//! loaded and marked by sluice; a kill -9 leaves them `in_use`, reported inconsistent by qsd
//! and sluice alike; `sluice serve image` saves them at exit.
//!
//! Deliberate differences (documented in `crates/daemon/src/graph/bitmaps.rs`): sluice refuses
//! `persistent: true` on a read-only qcow2 node, where qsd accepts it and loses it at close;
//! it accepts it on a raw node, which qsd refuses (`tests/raw_bitmaps.rs`).

use crate::support;

use std::path::Path;

use serde_json::{json, Value};
use support::image::{image_info, qcow2_over, qemu_img, qemu_img_check, QemuNbd};
use support::path_str;
use support::qmp::{node_bitmaps as bitmaps, ok, start_nbd, write_through_export, Qmp, QmpDaemon};

/// A fresh qcow2 image of `size` in `dir`.
fn create(dir: &Path, name: &str, size: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&p), size]);
    p
}

/// `format-specific.data.bitmaps` of `qemu-img info` (null when there are none).
fn info_bitmaps(path: &Path) -> Value {
    image_info(path)["format-specific"]["data"]["bitmaps"].clone()
}

#[track_caller]
fn assert_clean(path: &Path) {
    let (code, out) = qemu_img_check(path);
    assert_eq!(code, 0, "qemu-img check {}:\n{out}", path.display());
    assert!(out.contains("No errors were found"), "{out}");
}

fn add_image(q: &mut Qmp, node: &str, image: &Path) {
    ok(
        q,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": node,
               "file": {"driver": "file", "filename": path_str(image)}}),
    );
}

/// The `qemu:dirty-bitmap:NAME` map qemu-nbd serves for the image (read-only, `-B NAME`).
fn qemu_nbd_map(image: &Path, name: &str) -> String {
    let nbd = QemuNbd::start(&["-r", "-f", "qcow2", "-B", name, path_str(image)]);
    support::image::nbdinfo_map(&nbd.uri(), &format!("qemu:dirty-bitmap:{name}"))
}

/// The scenario run on both daemons: four persistent bitmaps of several granularities (one
/// disabled) and one that is not, writes through an export, then `blockdev-del`. Returns the
/// bitmaps as the daemon showed them before the delete.
fn save_scenario(d: &QmpDaemon, image: &Path) -> Vec<(String, u64, u64, bool, bool, bool)> {
    let mut q = d.connect_negotiated();
    add_image(&mut q, "d", image);
    for (name, extra) in [
        ("b0", json!({"persistent": true})),
        ("g512", json!({"persistent": true, "granularity": 512})),
        ("g1m", json!({"persistent": true, "granularity": 1 << 20})),
        ("dis", json!({"persistent": true, "disabled": true})),
        ("tmp", json!({})),
    ] {
        let mut args = json!({"node": "d", "name": name});
        args.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        ok(&mut q, "block-dirty-bitmap-add", args);
    }
    start_nbd(&mut q, d);
    write_through_export(
        &mut q,
        d,
        "d",
        &["write -P 7 100 1000", "write -z 1M 64k", "write 40M 3M"],
    );
    let shown = bitmaps(&mut q, "d");
    ok(&mut q, "blockdev-del", json!({"node-name": "d"}));
    shown
}

#[test]
fn sluice_saved_bitmaps_read_by_qemu_img_qsd_and_qemu_nbd_as_qsd_saved_ones() {
    let dir = tempfile::tempdir().unwrap();
    let q_img = create(dir.path(), "qsd.qcow2", "64M");
    let s_img = create(dir.path(), "sluice.qcow2", "64M");
    let qsd_shown = save_scenario(&QmpDaemon::qsd(&[]), &q_img);
    let s = QmpDaemon::sluice(&[]);
    let sluice_shown = save_scenario(&s, &s_img);
    assert_eq!(sluice_shown, qsd_shown);
    // The writes touched 64 KiB blocks 0, 16 and 640..688.
    let b0 = sluice_shown.iter().find(|b| b.0 == "b0").unwrap();
    assert_eq!(b0.1, (2 + 48) * 65536);

    // Saved at blockdev-del (sluice is still running): what qemu-img sees is the same.
    assert_clean(&s_img);
    assert_clean(&q_img);
    let saved = info_bitmaps(&s_img);
    assert_eq!(saved, info_bitmaps(&q_img));
    let names: Vec<&str> = saved
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 4, "{saved}");
    assert!(!names.contains(&"tmp"));
    let dis = saved
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "dis");
    assert_eq!(dis.unwrap()["flags"], json!([]));
    // Bit for bit: qemu-nbd serves the same dirty map from both images.
    for name in ["b0", "g512", "g1m", "dis"] {
        assert_eq!(
            qemu_nbd_map(&s_img, name),
            qemu_nbd_map(&q_img, name),
            "{name}"
        );
    }
    // qsd loads what sluice saved with the counts sluice showed.
    let qsd = QmpDaemon::qsd(&[]);
    let mut q = qsd.connect_negotiated();
    add_image(&mut q, "d", &s_img);
    let persistent: Vec<_> = sluice_shown.iter().filter(|b| b.4).cloned().collect();
    assert_eq!(bitmaps(&mut q, "d"), persistent);
}

#[test]
fn qemu_made_bitmaps_are_loaded_marked_in_use_and_saved_by_sluice() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "a.qcow2", "64M");
    let p = path_str(&img);
    qemu_img(&["bitmap", "--add", p, "b1"]);
    qemu_img(&["bitmap", "--add", "-g", "512", p, "b2"]);
    qemu_img(&["bitmap", "--add", p, "off"]);
    qemu_img(&["bitmap", "--disable", p, "off"]);
    support::image::qemu_io("qcow2", p, &["write 0 128k", "write 10M 512"]);
    qemu_img(&["bitmap", "--merge", "b2", p, "off"]);
    let copy = dir.path().join("copy.qcow2");
    std::fs::copy(&img, &copy).unwrap();

    // The same writes through sluice and through qsd give the same bitmaps.
    let cmds = ["write 1M 4k", "write -z 20M 1M"];
    let run = |d: &QmpDaemon, image: &Path| {
        let mut q = d.connect_negotiated();
        add_image(&mut q, "d", image);
        let loaded = bitmaps(&mut q, "d");
        // In use on disk while open read-write.
        let flags: Vec<Value> = info_bitmaps(image)
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["flags"].clone())
            .collect();
        assert!(
            flags
                .iter()
                .all(|f| f.as_array().unwrap().contains(&json!("in-use"))),
            "{flags:?}"
        );
        start_nbd(&mut q, d);
        write_through_export(&mut q, d, "d", &cmds);
        let after = bitmaps(&mut q, "d");
        ok(&mut q, "blockdev-del", json!({"node-name": "d"}));
        (loaded, after)
    };
    let (s_loaded, s_after) = run(&QmpDaemon::sluice(&[]), &img);
    let (q_loaded, q_after) = run(&QmpDaemon::qsd(&[]), &copy);
    assert_eq!(s_loaded, q_loaded);
    assert_eq!(s_after, q_after);
    let b1 = s_loaded.iter().find(|b| b.0 == "b1").unwrap();
    assert_eq!((b1.1, b1.3, b1.4), (2 * 65536 + 65536, true, true));
    let off = s_loaded.iter().find(|b| b.0 == "off").unwrap();
    assert!(!off.3 && off.1 > 0, "{off:?}");
    assert_clean(&img);
    assert_eq!(info_bitmaps(&img), info_bitmaps(&copy));
    for name in ["b1", "b2", "off"] {
        assert_eq!(
            qemu_nbd_map(&img, name),
            qemu_nbd_map(&copy, name),
            "{name}"
        );
    }
}

#[test]
fn kill_9_leaves_bitmaps_in_use_reported_inconsistent_as_qsd_does() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "a.qcow2", "64M");
    qemu_img(&["bitmap", "--add", path_str(&img), "b"]);
    let mut s = QmpDaemon::sluice(&[]);
    let mut q = s.connect_negotiated();
    add_image(&mut q, "d", &img);
    start_nbd(&mut q, &s);
    ok(
        &mut q,
        "block-export-add",
        json!({"type": "nbd", "id": "d", "node-name": "d", "writable": true}),
    );
    support::qemu_io(&s.nbd_uri("d"), &["write 0 64k"]);
    assert_eq!(bitmaps(&mut q, "d")[0].1, 65536);
    s.signal(libc::SIGKILL);
    drop(q);

    // qemu-img sees the flag; qsd and sluice both load the bitmap inconsistent and refuse
    // to use it with the same error; removing it is allowed, and leaves a clean image.
    let flags = &info_bitmaps(&img)[0]["flags"];
    assert!(
        flags.as_array().unwrap().contains(&json!("in-use")),
        "{flags}"
    );
    let copy = dir.path().join("copy.qcow2");
    std::fs::copy(&img, &copy).unwrap();
    let run = |d: &QmpDaemon, image: &Path| {
        let mut q = d.connect_negotiated();
        add_image(&mut q, "d", image);
        let shown = bitmaps(&mut q, "d");
        let refused = q.exec(
            "block-dirty-bitmap-clear",
            json!({"node": "d", "name": "b"}),
        );
        let r = q.exec(
            "block-dirty-bitmap-remove",
            json!({"node": "d", "name": "b"}),
        );
        ok(&mut q, "blockdev-del", json!({"node-name": "d"}));
        (shown, Qmp::error(&refused), r)
    };
    let s2 = QmpDaemon::sluice(&[]);
    let sluice = run(&s2, &img);
    let qsd = run(&QmpDaemon::qsd(&[]), &copy);
    assert_eq!((&sluice.0, &sluice.2), (&qsd.0, &qsd.2));
    assert_eq!(
        sluice.0,
        vec![("b".to_string(), 0, 65536, false, true, true)]
    );
    // Deliberate difference: sluice's refusal is qsd's message followed by the way back
    // (tests/serve_bitmaps.rs).
    assert_eq!(sluice.1 .0, qsd.1 .0);
    assert_eq!(qsd.1 .1, "Bitmap 'b' is inconsistent and cannot be used");
    assert!(
        sluice.1 .1.starts_with(&format!("{}; ", qsd.1 .1)),
        "{}",
        sluice.1 .1
    );
    assert_clean(&img);
    assert_eq!(info_bitmaps(&img), Value::Null);
}

#[test]
fn inconsistent_bitmap_kept_as_is_when_other_bitmaps_are_saved() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "a.qcow2", "64M");
    qemu_img(&["bitmap", "--add", path_str(&img), "old"]);
    // A crash of the sluice that had the image open leaves `old` in use.
    let mut s = QmpDaemon::sluice(&[]);
    let mut q = s.connect_negotiated();
    add_image(&mut q, "d", &img);
    s.signal(libc::SIGKILL);
    drop(q);
    let s = QmpDaemon::sluice(&[]);
    let mut q = s.connect_negotiated();
    add_image(&mut q, "d", &img);
    ok(
        &mut q,
        "block-dirty-bitmap-add",
        json!({"node": "d", "name": "new", "persistent": true}),
    );
    ok(&mut q, "quit", json!({}));
    drop(q);
    let mut s = s;
    assert!(s.wait().success());
    assert_clean(&img);
    let saved = info_bitmaps(&img);
    let flags = |n: &str| {
        saved
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == n)
            .unwrap_or_else(|| panic!("{saved}"))["flags"]
            .clone()
    };
    assert_eq!(flags("old"), json!(["in-use", "auto"]));
    assert_eq!(flags("new"), json!(["auto"]));
}

#[test]
fn persistent_refusals_match_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let run = |d: &QmpDaemon, tag: &str| {
        let v2 = dir.path().join(format!("{tag}-v2.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            path_str(&v2),
            "1M",
        ]);
        let big = create(dir.path(), &format!("{tag}-big.qcow2"), "8T");
        let mut q = d.connect_negotiated();
        add_image(&mut q, "v2", &v2);
        add_image(&mut q, "big", &big);
        let mut out = Vec::new();
        for (node, extra) in [("v2", json!({})), ("big", json!({"granularity": 512}))] {
            let mut args = json!({"node": node, "name": "p", "persistent": true});
            args.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let r = q.exec("block-dirty-bitmap-add", args);
            out.push(if r.get("error").is_some() {
                Qmp::error(&r)
            } else {
                Default::default()
            });
        }
        out
    };
    let qsd = run(&QmpDaemon::qsd(&[]), "q");
    let sluice = run(&QmpDaemon::sluice(&[]), "s");
    assert_eq!(sluice, qsd);
    assert_eq!(
        sluice[0].1,
        "Can't make bitmap 'p' persistent in 'v2': Cannot store dirty bitmaps in qcow2 v2 files"
    );
    // 8 TiB at 512 bytes would take 2 GiB of bitmap.
    assert!(
        sluice[1].1.ends_with("Use larger granularity"),
        "{sluice:?}"
    );
}

#[test]
fn one_tib_sparse_image_with_backing_saves_large_tables() {
    let dir = tempfile::tempdir().unwrap();
    let base = create(dir.path(), "base.qcow2", "1T");
    support::image::qemu_io("qcow2", path_str(&base), &["write -P 1 0 1M"]);
    let top = dir.path().join("top.qcow2");
    qcow2_over(&top, "base.qcow2", &[], None);
    let copy = dir.path().join("copy.qcow2");
    std::fs::copy(&top, &copy).unwrap();
    let run = |d: &QmpDaemon, image: &Path| {
        let mut q = d.connect_negotiated();
        add_image(&mut q, "d", image);
        for (name, g) in [("g64k", 65536u64), ("g1m", 1 << 20), ("g4k", 4096)] {
            ok(
                &mut q,
                "block-dirty-bitmap-add",
                json!({"node": "d", "name": name, "granularity": g, "persistent": true}),
            );
        }
        start_nbd(&mut q, d);
        write_through_export(
            &mut q,
            d,
            "d",
            &["write 4k 4k", "write 512G 1M", "write 1099511562240 64k"],
        );
        let shown = bitmaps(&mut q, "d");
        ok(&mut q, "blockdev-del", json!({"node-name": "d"}));
        shown
    };
    let sluice = run(&QmpDaemon::sluice(&[]), &top);
    let qsd = run(&QmpDaemon::qsd(&[]), &copy);
    assert_eq!(sluice, qsd);
    assert_clean(&top);
    assert_eq!(info_bitmaps(&top), info_bitmaps(&copy));
    // The 4 KiB bitmap of 1 TiB has 2^28 bits: 512 data clusters of table, 3 of them dirty.
    for name in ["g64k", "g1m", "g4k"] {
        assert_eq!(
            qemu_nbd_map(&top, name),
            qemu_nbd_map(&copy, name),
            "{name}"
        );
    }
    let qsd = QmpDaemon::qsd(&[]);
    let mut q = qsd.connect_negotiated();
    add_image(&mut q, "d", &top);
    assert_eq!(bitmaps(&mut q, "d"), sluice);
}

#[test]
fn serve_image_keeps_bitmaps_in_use_while_served_and_saves_them_at_exit() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "a.qcow2", "64M");
    qemu_img(&["bitmap", "--add", path_str(&img), "b"]);
    let copy = dir.path().join("copy.qcow2");
    std::fs::copy(&img, &copy).unwrap();
    let mut server = support::Server::start(&["image", path_str(&img), "format=qcow2"]);
    let flags = &info_bitmaps(&img)[0]["flags"];
    assert_eq!(flags, &json!(["in-use", "auto"]));
    let cmds = ["write 0 4k", "write -z 5M 128k"];
    support::qemu_io(&server.uri(), &cmds);
    assert!(server.stop().success(), "{}", server.stderr());
    assert_clean(&img);
    assert_eq!(info_bitmaps(&img)[0]["flags"], json!(["auto"]));
    // qemu-nbd with the same writes gives the same saved bitmap.
    {
        let nbd = QemuNbd::start(&["-f", "qcow2", path_str(&copy)]);
        support::qemu_io(&nbd.uri(), &cmds);
    }
    assert_eq!(qemu_nbd_map(&img, "b"), qemu_nbd_map(&copy, "b"));
    assert!(qemu_nbd_map(&img, "b").contains("dirty"));
}

#[test]
fn sigterm_saves_bitmaps_of_open_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "a.qcow2", "64M");
    let mut s = QmpDaemon::sluice(&[]);
    let mut q = s.connect_negotiated();
    add_image(&mut q, "d", &img);
    ok(
        &mut q,
        "block-dirty-bitmap-add",
        json!({"node": "d", "name": "b", "persistent": true, "granularity": 4096}),
    );
    start_nbd(&mut q, &s);
    write_through_export(&mut q, &s, "d", &["write 8k 8k"]);
    let shown = bitmaps(&mut q, "d");
    assert_eq!(shown[0].1, 8192);
    drop(q);
    assert!(s.signal(libc::SIGTERM).success(), "{}", s.stderr());
    assert_clean(&img);
    let qsd = QmpDaemon::qsd(&[]);
    let mut q = qsd.connect_negotiated();
    add_image(&mut q, "d", &img);
    assert_eq!(bitmaps(&mut q, "d"), shown);
}

#[test]
fn commit_into_a_base_with_bitmaps_leaves_them_in_use_not_stale() {
    // sluice's base node is read-only and cannot save the bitmaps the commit changes, so they
    // must read as inconsistent afterwards (qemu reopens the base read-write and saves them:
    // a documented difference), and the commit itself must still succeed.
    let dir = tempfile::tempdir().unwrap();
    let (base, mid, top) = support::image::qcow2_chain(dir.path(), "");
    qemu_img(&["bitmap", "--add", path_str(&base), "b"]);
    let (_d, mut c) = support::qmp::daemon_with_named_chain(&base, &mid, &top);
    let msgs = support::qmp::run_until(
        &mut c,
        json!({"execute": "block-commit", "arguments": {"job-id": "c0", "device": "top",
               "top-node": "mid", "base-node": "base"}}),
        "null",
    );
    assert!(
        msgs.iter()
            .any(|m| m["event"] == "BLOCK_JOB_COMPLETED" && m["data"].get("error").is_none()),
        "{msgs:?}"
    );
    let flags = &info_bitmaps(&base)[0]["flags"];
    assert!(
        flags.as_array().unwrap().contains(&json!("in-use")),
        "{flags}"
    );
}
