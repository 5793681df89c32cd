//! Persistent qcow2 bitmaps served by `sluice serve image ... bitmap=NAME` (qemu-nbd's
//! `-B NAME`, issue #15 item 3), side by side with qemu-nbd on copies of one image, and the
//! way back from an inconsistent bitmap that sluice adds to qemu-storage-daemon's commands
//! (item 6, `docs/compat/qcow2-bitmaps.md`).
//!
//! Deliberate differences, asserted here:
//! - an unknown `bitmap=` exits 2 (a usage error, as other bad `image` parameters), where
//!   qemu-nbd exits 1; the message has qemu-nbd's words and names the bitmaps there are;
//! - `block-dirty-bitmap-add` with the name of an inconsistent bitmap replaces it with one
//!   that starts all dirty, where qsd answers "Bitmap already exists"; the refusal of an
//!   inconsistent bitmap carries qsd's message followed by that way back.

use crate::support;

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use support::image::{image_info, nbdinfo_map, qemu_img, qemu_img_check, qemu_io, QemuNbd};
use support::qmp::{ok, Qmp, QmpDaemon};
use support::{message_lines, path_str, serve_fails, Server};

/// 64 MiB qcow2 with qemu-made bitmaps `b0` (64 KiB), `fine` (4 KiB) and `dis` (disabled),
/// and writes qemu-io made while they recorded.
fn image_with_bitmaps(dir: &Path) -> PathBuf {
    let p = dir.join("a.qcow2");
    let img = path_str(&p);
    qemu_img(&["create", "-q", "-f", "qcow2", img, "64M"]);
    qemu_img(&["bitmap", "--add", img, "b0"]);
    qemu_img(&["bitmap", "--add", "-g", "4096", img, "fine"]);
    qemu_img(&["bitmap", "--add", img, "dis"]);
    qemu_img(&["bitmap", "--disable", img, "dis"]);
    qemu_io(
        "qcow2",
        img,
        &[
            "write -P 1 8M 64k",
            "write -P 2 33000 1000",
            "write -z 40M 12k",
        ],
    );
    p
}

/// A copy of `src` named `name` beside it.
fn copy(src: &Path, name: &str) -> PathBuf {
    let dst = src.with_file_name(name);
    std::fs::copy(src, &dst).unwrap();
    dst
}

/// The contexts a LIST_META_CONTEXT with `query` lists for `uri`, in the server's order.
fn list_contexts(uri: &str, query: &str) -> String {
    support::nbdsh(
        uri,
        &format!(
            "h = nbd.NBD()\nh.set_opt_mode(True)\nh.connect_uri(uri)\n\
             h.clear_meta_contexts()\nh.add_meta_context({query:?})\n\
             got = []\nh.opt_list_meta_context(lambda name: got.append(name))\n\
             print(' '.join(got))\nh.opt_abort()"
        ),
    )
}

/// The `contexts:` block of `nbdinfo --list`.
fn listed_contexts(uri: &str) -> Vec<String> {
    let out = support::run("nbdinfo", &["--list", uri]);
    out.lines()
        .skip_while(|l| l.trim() != "contexts:")
        .skip(1)
        .take_while(|l| l.starts_with("\t\t"))
        .map(|l| l.trim().to_string())
        .collect()
}

/// `qemu-img map --output=json` of a dirty-bitmap context over the Unix socket `sock`.
fn qemu_img_map_bitmap(sock: &Path, bitmap: &str) -> String {
    qemu_img(&[
        "map",
        "--output=json",
        "--image-opts",
        &format!(
            "driver=nbd,server.type=unix,server.path={},\
             x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}",
            sock.display()
        ),
    ])
}

/// Everything a client sees of the bitmaps on one server: the maps of each, and the lists.
fn observe(uri: &str, sock: &Path, bitmaps: &[&str]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for b in bitmaps {
        let ctx = format!("qemu:dirty-bitmap:{b}");
        out.push((format!("nbdinfo --map={ctx}"), nbdinfo_map(uri, &ctx)));
        out.push((format!("qemu-img map {ctx}"), qemu_img_map_bitmap(sock, b)));
    }
    for q in [
        "qemu:",
        "qemu:dirty-bitmap:",
        "qemu:dirty-bitmap:fine",
        "base:",
    ] {
        out.push((format!("LIST {q}"), list_contexts(uri, q)));
    }
    out.push(("nbdinfo --list".into(), listed_contexts(uri).join(" ")));
    out
}

/// `format-specific.data.bitmaps` of `qemu-img info`.
fn info_bitmaps(path: &Path) -> Value {
    image_info(path)["format-specific"]["data"]["bitmaps"].clone()
}

#[track_caller]
fn assert_clean(path: &Path) {
    let (code, out) = qemu_img_check(path);
    assert_eq!(code, 0, "qemu-img check {}:\n{out}", path.display());
}

/// Runs `qemu-nbd ARGS...` that must fail: (exit code, stderr).
fn qemu_nbd_fails(args: &[&str]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("q.sock");
    let mut all = vec!["-k", path_str(&sock)];
    all.extend_from_slice(args);
    let out = support::output("qemu-nbd", &all);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `image` with bitmap `b` left `in_use`: served writable by sluice, killed with SIGKILL.
fn crashed(dir: &Path) -> PathBuf {
    let p = dir.join("crashed.qcow2");
    let img = path_str(&p);
    qemu_img(&["create", "-q", "-f", "qcow2", img, "64M"]);
    qemu_img(&["bitmap", "--add", img, "b"]);
    qemu_io("qcow2", img, &["write -P 7 1M 64k"]);
    let mut s = Server::start(&["image", img, "format=qcow2"]);
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(s.pid(), libc::SIGKILL) };
    let _ = s.child.take().unwrap().wait();
    let flags = &info_bitmaps(&p)[0]["flags"];
    assert!(
        flags.as_array().unwrap().contains(&json!("in-use")),
        "{flags}"
    );
    p
}

#[test]
fn serve_image_bitmaps_match_qemu_nbd_and_are_saved() {
    let dir = tempfile::tempdir().unwrap();
    let src = image_with_bitmaps(dir.path());
    let (q_img, s_img) = (copy(&src, "q.qcow2"), copy(&src, "s.qcow2"));
    let names = ["b0", "fine", "dis"];
    // Clients write through each server: the enabled bitmaps record those writes too.
    let writes = [
        "write -P 3 20M 128k",
        "write -P 4 63M 4k",
        "write -z 50M 8k",
    ];
    let (qemu_seen, qemu_after) = {
        let q = QemuNbd::start(&[
            "-A",
            "-f",
            "qcow2",
            "-B",
            "b0",
            "-B",
            "fine",
            "-B",
            "dis",
            path_str(&q_img),
        ]);
        let before = observe(&q.uri(), &q.socket, &names);
        support::qemu_io(&q.uri(), &writes);
        (before, observe(&q.uri(), &q.socket, &names))
    };
    let mut s = Server::start(&[
        "image",
        path_str(&s_img),
        "format=qcow2",
        "bitmap=b0",
        "bitmap=fine",
        "bitmap=dis",
    ]);
    let sluice_seen = observe(&s.uri(), &s.socket, &names);
    support::qemu_io(&s.uri(), &writes);
    let sluice_after = observe(&s.uri(), &s.socket, &names);
    assert!(s.stop().success(), "{}", s.stderr());
    s.assert_no_panic();

    assert_eq!(sluice_seen, qemu_seen);
    assert_eq!(sluice_after, qemu_after);
    // Not vacuous: the bitmaps hold what qemu-io and the clients wrote.
    let b0 = &sluice_after[0].1;
    assert!(b0.contains("8388608       65536    1  dirty"), "{b0}");
    assert!(b0.contains("20971520      131072    1  dirty"), "{b0}");
    assert_eq!(
        sluice_after[sluice_after.len() - 1].1,
        "base:allocation qemu:allocation-depth qemu:dirty-bitmap:dis qemu:dirty-bitmap:fine \
         qemu:dirty-bitmap:b0"
    );
    // Saved at exit as qemu-nbd saved them: same flags, same bits read back by qemu-nbd.
    assert_eq!(info_bitmaps(&s_img), info_bitmaps(&q_img));
    assert_clean(&s_img);
    let reread = |img: &Path| {
        let q = QemuNbd::start(&["-r", "-f", "qcow2", "-B", "fine", path_str(img)]);
        nbdinfo_map(&q.uri(), "qemu:dirty-bitmap:fine")
    };
    assert_eq!(reread(&s_img), reread(&q_img));
}

#[test]
fn serve_image_read_only_bitmap_matches_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_bitmaps(dir.path());
    let before = std::fs::read(&img).unwrap();
    let qemu = {
        let q = QemuNbd::start(&["-r", "-A", "-f", "qcow2", "-B", "fine", path_str(&img)]);
        observe(&q.uri(), &q.socket, &["fine"])
    };
    let s = Server::start(&["-r", "image", path_str(&img), "format=qcow2", "bitmap=fine"]);
    assert_eq!(observe(&s.uri(), &s.socket, &["fine"]), qemu);
    drop(s);
    assert!(
        std::fs::read(&img).unwrap() == before,
        "a read-only serve changed the image"
    );
}

/// A bitmap of a backing file: `bitmap=b0` on a top layer without bitmaps finds `b0` in its
/// backing, as qemu-nbd's `-B` does; the top is 16 MiB larger than the backing, and past the
/// bitmap's end the context reads clean, as from qemu-nbd. The backing file is not changed.
#[test]
fn serve_image_bitmap_of_a_backing_file_matches_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let base = image_with_bitmaps(dir.path());
    let top = dir.path().join("top.qcow2");
    let top_s = path_str(&top);
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", top_s, "80M",
    ]);
    qemu_io("qcow2", top_s, &["write -P 9 2M 64k"]);
    let before = std::fs::read(&base).unwrap();
    let names = ["b0", "fine"];
    let qemu = {
        let q = QemuNbd::start(&["-A", "-f", "qcow2", "-B", "b0", "-B", "fine", top_s]);
        observe(&q.uri(), &q.socket, &names)
    };
    let mut s = Server::start(&[
        "image",
        top_s,
        "format=qcow2",
        "backing=auto",
        "bitmap=b0",
        "bitmap=fine",
    ]);
    let seen = observe(&s.uri(), &s.socket, &names);
    assert!(s.stop().success(), "{}", s.stderr());
    s.assert_no_panic();
    assert_eq!(seen, qemu);
    // Not vacuous: the backing's dirty granule, and clean up to the top's end.
    let b0 = &seen[0].1;
    assert!(b0.contains("8388608       65536    1  dirty"), "{b0}");
    let last: Vec<&str> = b0.lines().last().unwrap().split_whitespace().collect();
    let end = last[0].parse::<u64>().unwrap() + last[1].parse::<u64>().unwrap();
    assert_eq!((end, last[3]), (80 << 20, "clean"), "{b0}");
    assert!(
        std::fs::read(&base).unwrap() == before,
        "serving the top changed its backing file"
    );
    assert_clean(&base);
}

#[test]
fn serve_image_unknown_bitmap_exits_2_with_qemu_nbd_words() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_bitmaps(dir.path());
    let raw = dir.path().join("r.img");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    for (path, format, known, have) in [
        (
            &img,
            "qcow2",
            "bitmap=b0",
            format!("{} has: b0, fine, dis", img.display()),
        ),
        (
            &raw,
            "raw",
            "readonly=false",
            format!("{} has no persistent bitmaps", raw.display()),
        ),
    ] {
        let (qcode, qerr) = qemu_nbd_fails(&["-f", format, "-B", "nope", path_str(path)]);
        assert_eq!(qcode, 1, "{qerr}");
        assert!(qerr.contains("Bitmap 'nope' is not found"), "{qerr}");
        let (code, err) = serve_fails(&[
            "image",
            path_str(path),
            &format!("format={format}"),
            known,
            "bitmap=nope",
        ]);
        assert_eq!(code, 2, "{err}");
        assert_eq!(
            message_lines(&err),
            [format!(
                "sluice: image: Bitmap 'nope' is not found ({have})"
            )],
            "{err}"
        );
    }
    // Nothing changed: the bitmaps of the refused image are not left in use.
    assert_eq!(info_bitmaps(&img)[0]["flags"], json!(["auto"]));
    assert_clean(&img);
}

#[test]
fn serve_image_inconsistent_bitmap_refused_as_qemu_nbd_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let img = crashed(dir.path());
    let before = std::fs::read(&img).unwrap();
    let (qcode, qerr) = qemu_nbd_fails(&["-r", "-f", "qcow2", "-B", "b", path_str(&img)]);
    assert_eq!(qcode, 1, "{qerr}");
    let qemu_words = "Bitmap 'b' is inconsistent and cannot be used";
    assert!(qerr.contains(qemu_words), "{qerr}");
    let (code, err) = serve_fails(&["-r", "image", path_str(&img), "format=qcow2", "bitmap=b"]);
    assert_eq!(code, 1, "{err}");
    let lines = message_lines(&err);
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with(&format!("sluice: image: {qemu_words} (")),
        "{err}"
    );
    assert!(
        lines[0].contains(&format!("qemu-img bitmap --remove {} b", img.display())),
        "{err}"
    );
    assert!(std::fs::read(&img).unwrap() == before);
    // Without bitmap= the image is served; the bitmap stays inconsistent.
    drop(Server::start(&[
        "-r",
        "image",
        path_str(&img),
        "format=qcow2",
    ]));
    assert!(info_bitmaps(&img)[0]["flags"]
        .as_array()
        .unwrap()
        .contains(&json!("in-use")));
}

#[test]
fn serve_image_bitmap_under_filter_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_bitmaps(dir.path());
    let (code, err) = serve_fails(&[
        "--filter=offset",
        "image",
        path_str(&img),
        "format=qcow2",
        "bitmap=b0",
        "offset=1M",
    ]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(
        message_lines(&err),
        [
            "sluice: image: bitmap= cannot be used with filters (a filter may move or resize \
          what clients see, the bitmap describes the image itself)"
        ],
    );
}

/// The `dirty-bitmaps` of node `node` as (name, count, recording, persistent, inconsistent).
fn bitmaps(q: &mut Qmp, node: &str) -> Vec<(String, u64, bool, bool, bool)> {
    let r = q.exec("query-named-block-nodes", json!({"flat": true}));
    let n = r["return"]
        .as_array()
        .unwrap_or_else(|| panic!("{r}"))
        .iter()
        .find(|n| n["node-name"] == node)
        .unwrap_or_else(|| panic!("no node {node}: {r}"))
        .clone();
    n["dirty-bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["count"].as_u64().unwrap(),
                b["recording"].as_bool().unwrap(),
                b["persistent"].as_bool().unwrap(),
                b["inconsistent"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

fn add_image(q: &mut Qmp, node: &str, image: &Path) {
    ok(
        q,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": node,
               "file": {"driver": "file", "filename": path_str(image)}}),
    );
}

#[test]
fn daemon_inconsistent_bitmap_refusal_is_qsds_then_names_the_way_back() {
    let dir = tempfile::tempdir().unwrap();
    let img = crashed(dir.path());
    let copy_img = copy(&img, "copy.qcow2");
    let refusals = |d: &QmpDaemon, image: &Path| {
        let mut q = d.connect_negotiated();
        add_image(&mut q, "d", image);
        let mut out = Vec::new();
        for cmd in [
            "block-dirty-bitmap-clear",
            "block-dirty-bitmap-enable",
            "block-dirty-bitmap-disable",
        ] {
            out.push(Qmp::error(&q.exec(cmd, json!({"node": "d", "name": "b"}))));
        }
        ok(
            &mut q,
            "block-dirty-bitmap-add",
            json!({"node": "d", "name": "x"}),
        );
        for (target, source) in [("b", "x"), ("x", "b")] {
            out.push(Qmp::error(&q.exec(
                "block-dirty-bitmap-merge",
                json!({"node": "d", "target": target, "bitmaps": [source]}),
            )));
        }
        ok(&mut q, "blockdev-del", json!({"node-name": "d"}));
        out
    };
    let qsd = refusals(&QmpDaemon::qsd(&[]), &copy_img);
    let sluice = refusals(&QmpDaemon::sluice(&[]), &img);
    let hint = "; remove it with block-dirty-bitmap-remove, or replace it with \
                block-dirty-bitmap-add of 'b' (the new bitmap starts all dirty)";
    assert_eq!(qsd.len(), sluice.len());
    for ((qc, qd), (sc, sd)) in qsd.iter().zip(&sluice) {
        assert_eq!(sc, qc);
        assert_eq!(qd, "Bitmap 'b' is inconsistent and cannot be used");
        assert_eq!(*sd, format!("{qd}{hint}"));
    }
}

#[test]
fn daemon_add_over_inconsistent_bitmap_replaces_it_all_dirty() {
    let dir = tempfile::tempdir().unwrap();
    let img = crashed(dir.path());
    let copy_img = copy(&img, "copy.qcow2");
    let add = json!({"node": "d", "name": "b", "persistent": true});

    // qsd: the name is taken; the only way back is removing it.
    let qsd = QmpDaemon::qsd(&[]);
    let mut q = qsd.connect_negotiated();
    add_image(&mut q, "d", &copy_img);
    let r = q.exec("block-dirty-bitmap-add", add.clone());
    assert_eq!(
        Qmp::error(&r),
        ("GenericError".into(), "Bitmap already exists: b".into())
    );

    // sluice: the add replaces it, every bit set, recording, persistent.
    let s = QmpDaemon::sluice(&[]);
    let mut q = s.connect_negotiated();
    add_image(&mut q, "d", &img);
    assert_eq!(bitmaps(&mut q, "d"), [("b".into(), 0, false, true, true)]);
    // A transaction that fails after the add puts the inconsistent bitmap back.
    let r = q.exec(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": add},
            {"type": "abort", "data": {}}]}),
    );
    assert_eq!(
        Qmp::error(&r).1,
        "Transaction aborted using Abort action",
        "{r}"
    );
    assert_eq!(bitmaps(&mut q, "d"), [("b".into(), 0, false, true, true)]);
    // Other checks still apply, and refuse without changing anything.
    let r = q.exec(
        "block-dirty-bitmap-add",
        json!({"node": "d", "name": "b", "granularity": 1000}),
    );
    assert_eq!(
        Qmp::error(&r).1,
        "Granularity must be power of 2 and at least 512"
    );
    assert_eq!(bitmaps(&mut q, "d"), [("b".into(), 0, false, true, true)]);
    ok(&mut q, "block-dirty-bitmap-add", add.clone());
    assert_eq!(
        bitmaps(&mut q, "d"),
        [("b".into(), 64 << 20, true, true, false)]
    );
    // A usable bitmap's name stays taken, as in qsd.
    let r = q.exec("block-dirty-bitmap-add", add.clone());
    assert_eq!(Qmp::error(&r).1, "Bitmap already exists: b");
    ok(
        &mut q,
        "block-dirty-bitmap-clear",
        json!({"node": "d", "name": "b"}),
    );
    ok(&mut q, "blockdev-del", json!({"node-name": "d"}));

    // Saved as a sound bitmap qemu reads: no in-use flag, a clean image, and a clear then
    // no writes gives an empty map over qemu-nbd and over sluice serve.
    assert_eq!(info_bitmaps(&img)[0]["flags"], json!(["auto"]));
    assert_eq!(info_bitmaps(&img)[0]["name"], "b");
    assert_clean(&img);
    let qemu = {
        let q = QemuNbd::start(&["-r", "-f", "qcow2", "-B", "b", path_str(&img)]);
        nbdinfo_map(&q.uri(), "qemu:dirty-bitmap:b")
    };
    assert_eq!(qemu.trim(), "0    67108864    0  clean");
    let srv = Server::start(&["-r", "image", path_str(&img), "format=qcow2", "bitmap=b"]);
    assert_eq!(nbdinfo_map(&srv.uri(), "qemu:dirty-bitmap:b"), qemu);
}

#[test]
fn daemon_replacement_starts_all_dirty_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let img = crashed(dir.path());
    let s = QmpDaemon::sluice(&[]);
    let mut q = s.connect_negotiated();
    add_image(&mut q, "d", &img);
    ok(
        &mut q,
        "block-dirty-bitmap-add",
        json!({"node": "d", "name": "b", "persistent": true, "granularity": 4096}),
    );
    ok(&mut q, "blockdev-del", json!({"node-name": "d"}));
    let info = &info_bitmaps(&img)[0];
    assert_eq!(
        (&info["name"], &info["granularity"]),
        (&json!("b"), &json!(4096))
    );
    assert_clean(&img);
    let q = QemuNbd::start(&["-r", "-f", "qcow2", "-B", "b", path_str(&img)]);
    assert_eq!(
        nbdinfo_map(&q.uri(), "qemu:dirty-bitmap:b").trim(),
        "0    67108864    1  dirty"
    );
}
