//! The daemon's `rbd` driver against a real Ceph cluster (`scripts/ceph-cluster.sh`, one
//! cluster shared by this file's tests, torn down at exit): `blockdev-add driver=rbd` with
//! qemu's options, served over NBD, its `query-named-block-nodes` entry, `key-secret` from
//! a `--object secret`, the errors, and the exclusive lock between two daemons (refusal,
//! and failover after kill -9 with `break-lock`).
//!
//! Debian's qemu-storage-daemon here has no rbd module (qemu-block-extra is not installed
//! for its version), so the `query-named-block-nodes` shape is checked against qemu's
//! schema and block/rbd.c rather than a live qsd. librbd's own view (python3-rbd) is the
//! oracle for the bytes.

use crate::support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::ceph::{self, Cluster};
use support::qmp::{named_node, ok, start_nbd, Qmp, QmpDaemon};
use support::{assert_same_bytes, export_bytes, qemu_io, qemu_io_with};

const MIB: u64 = 1 << 20;

/// `blockdev-add` options of `rbd/IMAGE` on `c` (with its conf, as client.admin).
fn rbd_node(c: &Cluster, node: &str, image: &str, extra: Value) -> Value {
    let mut v = json!({"driver": "rbd", "node-name": node, "pool": "rbd", "image": image,
                       "conf": c.conf_str()});
    v.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    v
}

/// Exports `node` as `name` (writable unless `ro`) on the daemon's NBD socket.
fn export(q: &mut Qmp, node: &str, name: &str, writable: bool) {
    ok(
        q,
        "block-export-add",
        json!({"type": "nbd", "id": name, "node-name": node, "name": name,
               "writable": writable}),
    );
}

/// The error description of a failed command.
fn error_desc(r: &Value) -> String {
    r["error"]["desc"]
        .as_str()
        .unwrap_or_else(|| panic!("expected an error, got {r}"))
        .to_string()
}

#[test]
fn daemon_rbd_node_serves_the_image_and_shows_as_qemu_does() {
    let c = ceph::shared();
    c.create_image("dnode", 16 * MIB);
    let d = QmpDaemon::sluice(&[]);
    let mut q = d.connect_negotiated();
    ok(
        &mut q,
        "blockdev-add",
        rbd_node(c, "disk", "dnode", json!({})),
    );
    start_nbd(&mut q, &d);
    export(&mut q, "disk", "disk", true);
    let uri = d.nbd_uri("disk");
    qemu_io(
        &uri,
        &[
            "write -P 0x5a 0 1M",
            "write -P 0x6b 4190000 20000",
            "write -z 100000 3000",
            "write -f -P 0x7c 9M 64K",
            "flush",
        ],
    );
    assert_same_bytes(
        &export_bytes(&uri, d.dir.path()),
        &c.read_image("rbd/dnode"),
        "NBD view of the rbd node vs python3-rbd",
    );

    let n = named_node(&mut q, "disk");
    let filename = format!(
        "json:{{\"conf\": \"{}\", \"driver\": \"rbd\", \"image\": \"dnode\", \"pool\": \"rbd\"}}",
        c.conf_str()
    );
    assert_eq!(n["drv"], "rbd", "{n}");
    assert_eq!(n["file"], filename.as_str(), "{n}");
    assert_eq!(n["ro"], false);
    assert_eq!(n["backing_file_depth"], 0);
    let img = &n["image"];
    assert_eq!(img["filename"], filename.as_str());
    assert_eq!(img["format"], "rbd");
    assert_eq!(img["virtual-size"], 16 * MIB);
    // qemu's rbd driver reports no allocated size and an rbd format-specific part whose
    // only member (encryption-format) is absent for unencrypted images.
    assert!(img.get("actual-size").is_none(), "{img}");
    assert!(img.get("dirty-flag").is_none(), "{img}");
    assert_eq!(img["format-specific"], json!({"type": "rbd", "data": {}}));

    // The export goes away, then the node: the image is closed and its lock released, so
    // another client can take it at once.
    ok(&mut q, "block-export-del", json!({"id": "disk"}));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = q.exec("blockdev-del", json!({"node-name": "disk"}));
        if r == json!({"return": {}}) {
            break;
        }
        assert!(Instant::now() < deadline, "blockdev-del: {r}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let start = Instant::now();
    c.rbd(&["snap", "create", "rbd/dnode@after"]);
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn daemon_rbd_snapshot_node_is_read_only_with_the_snapshot_bytes() {
    let c = ceph::shared();
    c.create_image("dsnap", 8 * MIB);
    let d = QmpDaemon::sluice(&[]);
    let mut q = d.connect_negotiated();
    ok(
        &mut q,
        "blockdev-add",
        rbd_node(c, "head", "dsnap", json!({})),
    );
    start_nbd(&mut q, &d);
    export(&mut q, "head", "head", true);
    qemu_io(&d.nbd_uri("head"), &["write -P 0x31 0 8M", "flush"]);
    ok(&mut q, "block-export-del", json!({"id": "head"}));
    std::thread::sleep(Duration::from_millis(200));
    ok(&mut q, "blockdev-del", json!({"node-name": "head"}));
    c.rbd(&["snap", "create", "rbd/dsnap@s1"]);

    // Writable: refused with qemu's words; read-only: served.
    let r = q.exec(
        "blockdev-add",
        rbd_node(c, "snap", "dsnap", json!({"snapshot": "s1"})),
    );
    assert_eq!(error_desc(&r), "rbd snapshots are read-only");
    ok(
        &mut q,
        "blockdev-add",
        rbd_node(
            c,
            "snap",
            "dsnap",
            json!({"snapshot": "s1", "read-only": true}),
        ),
    );
    let n = named_node(&mut q, "snap");
    assert_eq!(n["ro"], true);
    assert!(
        n["file"].as_str().unwrap().contains("\"snapshot\": \"s1\""),
        "{n}"
    );
    export(&mut q, "snap", "snap", false);
    qemu_io_with(&["-r"], &d.nbd_uri("snap"), &["read -P 0x31 0 8M"]);
}

#[test]
fn daemon_rbd_wrong_pool_image_secret_and_key_fail_in_one_line_and_daemon_lives_on() {
    let c = ceph::shared();
    c.create_image("derr", 4 * MIB);
    // A client whose key is only given through a secret object (the conf's keyring does
    // not hold it).
    let key = c
        .ceph(&[
            "auth",
            "get-or-create-key",
            "client.dsecret",
            "mon",
            "profile rbd",
            "osd",
            "profile rbd pool=rbd",
        ])
        .trim()
        .to_string();
    let admin_key = c
        .ceph(&["auth", "get-key", "client.admin"])
        .trim()
        .to_string();
    let good = format!("secret,id=good,format=base64,data={key}");
    let wrong = format!("secret,id=wrong,format=base64,data={admin_key}");
    let mut d = QmpDaemon::sluice(&["--object", &good, "--object", &wrong]);
    let mut q = d.connect_negotiated();

    let cases = [
        (
            json!({"pool": "nopool"}),
            "rbd: pool 'nopool': no such pool",
        ),
        (
            json!({"image": "noimage"}),
            "rbd: image rbd/noimage: no such image in pool 'rbd'",
        ),
        (json!({"key-secret": "nope"}), "No secret with id 'nope'"),
        (
            json!({"user": "dsecret", "key-secret": "wrong"}),
            "as client.dsecret: authentication failed",
        ),
        (json!({"conf": "/no/such/ceph.conf"}), "/no/such/ceph.conf"),
    ];
    for (extra, want) in cases {
        let start = Instant::now();
        let r = q.exec("blockdev-add", rbd_node(c, "bad", "derr", extra.clone()));
        let desc = error_desc(&r);
        assert!(desc.contains(want), "{extra}: {desc}");
        assert!(!desc.contains('\n'), "{desc}");
        assert!(start.elapsed() < Duration::from_secs(40), "{extra}");
        assert!(q.exec("query-named-block-nodes", json!({}))["return"]
            .as_array()
            .unwrap()
            .is_empty());
    }
    // The right secret authenticates client.dsecret, whose key no keyring holds.
    ok(
        &mut q,
        "blockdev-add",
        rbd_node(
            c,
            "good",
            "derr",
            json!({"user": "dsecret", "key-secret": "good",
                   "auth-client-required": ["cephx"]}),
        ),
    );
    start_nbd(&mut q, &d);
    export(&mut q, "good", "good", true);
    qemu_io(&d.nbd_uri("good"), &["write -P 0x42 0 64K", "flush"]);
    assert!(c.read_image("rbd/derr")[..65536].iter().all(|&b| b == 0x42));
    d.assert_alive();
}

/// Objects that parse but cannot be created stop the daemon at start-up with qsd's message and
/// exit code 1, like a `--blockdev` that cannot be opened (a malformed option exits 2, see
/// `daemon_cli.rs`).
#[test]
fn daemon_object_creation_errors_exit_1_with_qsd_message() {
    for (obj, want) in [
        ("secret,id=s", "Either 'file' or 'data' must be provided"),
        ("secret,id=s,data=x,keyid=k", "No secret with id 'k'"),
        (
            "secret,id=s,file=/nonexistent/key",
            "Unable to read /nonexistent/key: Failed to open file \u{201c}/nonexistent/key\u{201d}: \
             No such file or directory",
        ),
    ] {
        let out = Command::new(support::sluice_bin())
            .args(["daemon", "--object", obj])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{obj}: {err}");
        assert_eq!(
            err.trim(),
            format!("sluice daemon: --object {obj}: {want}"),
            "{obj}"
        );
    }
}

/// Starts a daemon with `rbd/IMAGE` as writable node `disk` exported as `disk`.
fn writer(c: &Cluster, image: &str, extra: Value) -> (QmpDaemon, Qmp) {
    let d = QmpDaemon::sluice(&[]);
    let mut q = d.connect_negotiated();
    let r = q.exec("blockdev-add", rbd_node(c, "disk", image, extra));
    assert_eq!(r, json!({"return": {}}), "{}", d.stderr());
    start_nbd(&mut q, &d);
    export(&mut q, "disk", "disk", true);
    (d, q)
}

#[test]
fn daemon_rbd_second_writer_is_refused_while_the_first_holds_the_lock() {
    let c = ceph::shared();
    c.create_image("dlock", 8 * MIB);
    let (a, _qa) = writer(c, "dlock", json!({}));
    qemu_io(&a.nbd_uri("disk"), &["write -P 0x11 0 1M", "flush"]);

    // A second daemon: writable is refused (in bounded time), read-only is fine.
    let b = QmpDaemon::sluice(&[]);
    let mut qb = b.connect_negotiated();
    let start = Instant::now();
    let r = qb.exec("blockdev-add", rbd_node(c, "disk", "dlock", json!({})));
    let desc = error_desc(&r);
    assert!(
        desc.starts_with("rbd: image rbd/dlock is locked by another client (127.0.0.1:"),
        "{desc}"
    );
    assert!(desc.contains("break-lock=on"), "{desc}");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
    eprintln!("refusal took {:?}", start.elapsed());
    ok(
        &mut qb,
        "blockdev-add",
        rbd_node(c, "ro", "dlock", json!({"read-only": true})),
    );
    // `sluice serve` is refused the same way, at startup, in one line.
    let sock = b.path("serve.sock");
    let out = Command::new("timeout")
        .args(["60", support::sluice_bin(), "serve", "-f", "-U"])
        .arg(&sock)
        .args(["rbd", "rbd/dlock", &c.conf_param()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("is locked by another client"), "{err}");
    // The first writer still writes: nothing was taken from it.
    qemu_io(&a.nbd_uri("disk"), &["write -P 0x22 1M 1M", "flush"]);
    let image = c.read_image("rbd/dlock");
    assert!(image[MIB as usize..2 * MIB as usize]
        .iter()
        .all(|&b| b == 0x22));
}

#[test]
fn daemon_rbd_failover_after_kill_9_with_break_lock_keeps_every_acknowledged_write() {
    let c = ceph::shared();
    c.create_image("dfail", 16 * MIB);
    let (mut a, _qa) = writer(c, "dfail", json!({}));
    let pid = a.child.as_ref().unwrap().id();
    // 256 FUA writes of 16 KiB, 64 in flight; once 100 are acknowledged the first daemon is
    // killed with the rest in flight. The script prints the acknowledged ones.
    let script = format!(
        "import nbd, os\n\
         h = nbd.NBD()\n\
         h.connect_uri({uri:?})\n\
         h.flush()\n\
         B = 16384\n\
         cookies = {{}}\n\
         done = []\n\
         nxt = 0\n\
         while len(done) < 100:\n\
         \x20   while nxt < 256 and len(cookies) < 64:\n\
         \x20       cookies[h.aio_pwrite(bytes([nxt % 251 + 1]) * B, nxt * B * 4, flags=nbd.CMD_FLAG_FUA)] = nxt\n\
         \x20       nxt += 1\n\
         \x20   h.poll(10000)\n\
         \x20   for ck in [ck for ck in cookies if h.aio_command_completed(ck)]:\n\
         \x20       done.append(cookies.pop(ck))\n\
         os.kill({pid}, 9)\n\
         print(' '.join(map(str, done)))\n",
        uri = a.nbd_uri("disk"),
    );
    let out = Command::new(support::PYTHON)
        .args(["-c", &script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        a.stderr()
    );
    let acked: Vec<usize> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|w| w.parse().unwrap())
        .collect();
    assert!(acked.len() >= 100, "{acked:?}");
    assert!(!a.wait().success());

    // Without break-lock the dead owner's lock still counts until its watch times out;
    // with it, the second daemon takes over at once.
    let b = QmpDaemon::sluice(&[]);
    let mut qb = b.connect_negotiated();
    let start = Instant::now();
    let r = qb.exec(
        "blockdev-add",
        rbd_node(c, "disk", "dfail", json!({"break-lock": true})),
    );
    let took = start.elapsed();
    assert_eq!(r, json!({"return": {}}), "{}", b.stderr());
    assert!(took < Duration::from_secs(10), "took over in {took:?}");
    eprintln!("failover: blockdev-add with break-lock took {took:?}");
    // The dead owner is fenced: blocklisted.
    let blocklist = c.ceph(&["osd", "blocklist", "ls"]);
    assert!(blocklist.contains("127.0.0.1"), "{blocklist}");

    start_nbd(&mut qb, &b);
    export(&mut qb, "disk", "disk", true);
    let uri = b.nbd_uri("disk");
    let image = export_bytes(&uri, b.dir.path());
    for &i in &acked {
        let at = i * 16384 * 4;
        assert!(
            image[at..at + 16384]
                .iter()
                .all(|&x| x == (i % 251 + 1) as u8),
            "acknowledged FUA write {i} is not in the image after failover"
        );
    }
    // And the new owner writes.
    qemu_io(&uri, &["write -P 0xee 15M 1M", "flush"]);
    assert!(c.read_image("rbd/dfail")[15 * MIB as usize..]
        .iter()
        .all(|&x| x == 0xee));
}

#[test]
fn daemon_rbd_lock_is_released_at_exit_so_the_next_writer_starts_at_once() {
    let c = ceph::shared();
    c.create_image("dexit", 4 * MIB);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let (mut a, _qa) = writer(c, "dexit", json!({}));
        qemu_io(&a.nbd_uri("disk"), &["write -P 0x99 0 64K"]);
        assert!(a.signal(sig).success(), "{}", a.stderr());
        // What was written without a flush is in the image (flushed at exit) ...
        assert!(c.read_image("rbd/dexit")[..65536]
            .iter()
            .all(|&b| b == 0x99));
        // ... and the lock is free: a plain writable open (no break-lock) is immediate,
        // where a lock left to time out would take ~30 s.
        let start = Instant::now();
        let (mut b, _qb) = writer(c, "dexit", json!({}));
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "signal {sig}: {:?}",
            start.elapsed()
        );
        assert!(b.signal(libc::SIGTERM).success(), "{}", b.stderr());
    }
}
