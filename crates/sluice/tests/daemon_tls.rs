//! TLS for `sluice daemon` (issue #12): `--object` / `object-add` of `tls-creds-x509`,
//! `tls-creds-psk`, `authz-simple`, `authz-list` and `secret`, and `nbd-server-start` with
//! `tls-creds` and `tls-authz`. Every scenario runs against qemu-storage-daemon 10.0 too,
//! with the same objects and the same real GnuTLS clients (nbdinfo, nbdcopy, qemu-io), and
//! the outcomes (and QMP error classes and messages) are compared.
//!
//! Deliberate differences, asserted as such (see `crates/daemon/src/objects.rs`):
//! `tls-authz` is checked for PSK usernames (qsd ignores it), an unidentified client
//! (`verify-peer=off`, no certificate) is refused when `tls-authz` is set (qsd does not
//! check), a malformed `keys.psk` is refused by `object-add` (qsd accepts it), and OpenSSL's
//! reason replaces GnuTLS's for a malformed certificate.

use crate::support;

use std::path::Path;

use serde_json::{json, Value};
use support::qmp::{ok, Qmp, QmpDaemon};
use support::tls::{Pki, PSK_USER};
use support::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Sluice,
    Qsd,
}

const SIDES: [Side; 2] = [Side::Sluice, Side::Qsd];

/// The exported image's size.
const SIZE: usize = 1 << 20;

/// A daemon with `objects` (each an `--object` argument) and node `n0` over a 1 MiB image
/// of a known pattern (`{dir}/disk.img`), and a negotiated monitor.
fn daemon(side: Side, objects: &[String]) -> (QmpDaemon, Qmp) {
    let mut args: Vec<String> = Vec::new();
    for o in objects {
        args.push("--object".into());
        args.push(o.clone());
    }
    let d = match side {
        Side::Sluice => QmpDaemon::sluice(&strs(&args)),
        Side::Qsd => QmpDaemon::qsd(&strs(&args)),
    };
    random_file(&d.path("disk.img"), SIZE, 12);
    let mut c = d.connect_negotiated();
    ok(
        &mut c,
        "blockdev-add",
        json!({"driver": "file", "node-name": "n0",
               "filename": path_str(&d.path("disk.img"))}),
    );
    (d, c)
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `nbd-server-start` on `{dir}/nbd.sock` with `tls` (extra arguments: `tls-creds`,
/// `tls-authz`), then a writable export `n0` of node `n0`.
fn serve(c: &mut Qmp, d: &QmpDaemon, tls: Value) {
    let mut args = json!({"addr": {"type": "unix",
                                   "data": {"path": path_str(&d.path("nbd.sock"))}}});
    for (k, v) in tls.as_object().unwrap() {
        args[k] = v.clone();
    }
    ok(c, "nbd-server-start", args);
    ok(
        c,
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "n0", "name": "n0", "writable": true}),
    );
}

fn x509_object(id: &str, dir: &Path, extra: &str) -> String {
    format!(
        "tls-creds-x509,id={id},endpoint=server,dir={}{extra}",
        dir.display()
    )
}

fn psk_object(id: &str) -> String {
    format!(
        "tls-creds-psk,id={id},endpoint=server,dir={}",
        Pki::get().psk_dir().display()
    )
}

/// The export over TLS with X.509 client credentials `client` (a [`Pki::client`] name).
fn x509_uri(d: &QmpDaemon, client: &str) -> String {
    format!(
        "nbds+unix:///n0?socket={}&tls-certificates={}",
        path_str(&d.path("nbd.sock")),
        Pki::get().client(client).display()
    )
}

/// The export over TLS with pre-shared keys for `user` from `file`.
fn psk_uri(d: &QmpDaemon, user: &str, file: &Path) -> String {
    format!(
        "nbds+unix://{user}@/n0?socket={}&tls-psk-file={}",
        path_str(&d.path("nbd.sock")),
        file.display()
    )
}

/// True if nbdinfo at `uri` connects and reports the export's size.
fn connects(uri: &str) -> bool {
    let out = output("nbdinfo", &["--size", uri]);
    out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == SIZE.to_string()
}

/// The `--object` (client side) and `--image-opts` qemu-io takes for export `n0` of `d`.
fn qemu_io(d: &QmpDaemon, object: &str, cmds: &[&str]) -> std::process::Output {
    let mut args = vec![
        "--object".to_string(),
        object.to_string(),
        "--image-opts".to_string(),
        format!(
            "driver=nbd,server.type=unix,server.path={},export=n0,tls-creds=c0,\
             tls-hostname=localhost",
            path_str(&d.path("nbd.sock"))
        ),
    ];
    for c in cmds {
        args.push("-c".into());
        args.push(c.to_string());
    }
    output("qemu-io", &strs(&args))
}

#[test]
fn x509_export_served_to_libnbd_and_qemu_and_plaintext_refused() {
    let pki = Pki::get();
    for side in SIDES {
        let (d, mut c) = daemon(side, &[x509_object("t0", &pki.server(), "")]);
        serve(&mut c, &d, json!({"tls-creds": "t0"}));

        // nbdcopy reads every byte over TLS.
        let copy = d.path("copy.img");
        run("nbdcopy", &[&x509_uri(&d, "client1"), path_str(&copy)]);
        assert_eq!(
            std::fs::read(&copy).unwrap(),
            random_bytes(SIZE, 12),
            "{side:?}"
        );

        // qemu-io with a tls-creds-x509 client object writes and reads back.
        let client = format!(
            "tls-creds-x509,id=c0,endpoint=client,dir={}",
            pki.client("client1").display()
        );
        let out = qemu_io(
            &d,
            &client,
            &["write -P 0x5a 4096 64k", "read -P 0x5a 4096 64k"],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("read 65536/65536"),
            "{side:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );

        // tls-creds makes TLS mandatory: a plaintext client learns nothing.
        let plain = output("nbdinfo", &["--size", &d.nbd_uri("n0")]);
        assert!(!plain.status.success(), "{side:?}");
        let err = String::from_utf8_lossy(&plain.stderr);
        assert!(
            err.contains("server requires TLS encryption first"),
            "{side:?}: {err}"
        );
        assert!(connects(&x509_uri(&d, "client1")), "{side:?}");
    }
}

#[test]
fn x509_verify_peer_default_requires_a_client_certificate_from_the_ca() {
    let pki = Pki::get();
    for side in SIDES {
        let (d, mut c) = daemon(side, &[x509_object("t0", &pki.server_with_crl(), "")]);
        serve(&mut c, &d, json!({"tls-creds": "t0"}));
        assert!(!connects(&x509_uri(&d, "nocert")), "{side:?}: no cert");
        assert!(!connects(&x509_uri(&d, "stranger")), "{side:?}: other CA");
        assert!(!connects(&x509_uri(&d, "revoked")), "{side:?}: revoked");
        // The refusals did not disturb the server.
        assert!(connects(&x509_uri(&d, "client1")), "{side:?}");
    }
}

#[test]
fn x509_verify_peer_off_serves_clients_without_certificates() {
    let pki = Pki::get();
    for side in SIDES {
        let (d, mut c) = daemon(
            side,
            &[x509_object("t0", &pki.server(), ",verify-peer=off")],
        );
        serve(&mut c, &d, json!({"tls-creds": "t0"}));
        assert!(connects(&x509_uri(&d, "nocert")), "{side:?}");
        assert!(connects(&x509_uri(&d, "client1")), "{side:?}");
    }
}

#[test]
fn psk_export_served_and_wrong_or_unknown_keys_refused() {
    let pki = Pki::get();
    for side in SIDES {
        let (d, mut c) = daemon(side, &[psk_object("p0")]);
        serve(&mut c, &d, json!({"tls-creds": "p0"}));
        assert!(connects(&psk_uri(&d, PSK_USER, &pki.psk())), "{side:?}");
        assert!(
            !connects(&psk_uri(&d, PSK_USER, &pki.wrong_psk())),
            "{side:?}"
        );
        assert!(
            !connects(&psk_uri(&d, "mallory", &pki.unknown_psk())),
            "{side:?}"
        );
        let client = format!(
            "tls-creds-psk,id=c0,endpoint=client,dir={},username={PSK_USER}",
            pki.psk_dir().display()
        );
        let out = qemu_io(&d, &client, &["read -P 0 0 0"]);
        assert!(
            out.status.success(),
            "{side:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(connects(&psk_uri(&d, PSK_USER, &pki.psk())), "{side:?}");
    }
}

/// `authz_object` (its id `a0`) guards an X.509 server; is client1 let in?
fn x509_authz_allows(side: Side, authz_object: &str) -> bool {
    let pki = Pki::get();
    let (d, mut c) = daemon(
        side,
        &[
            x509_object("t0", &pki.server(), ""),
            authz_object.to_string(),
        ],
    );
    serve(&mut c, &d, json!({"tls-creds": "t0", "tls-authz": "a0"}));
    connects(&x509_uri(&d, "client1"))
}

#[test]
fn authz_matches_the_distinguished_name_as_qsd_spells_it() {
    // client1's certificate is C=GB, O=Test, CN=client1 (support::tls). GnuTLS, and so qsd,
    // writes the name in the certificate's order, not RFC 4514's reversed one.
    let cases = [
        ("authz-simple,id=a0,identity=C=GB,,O=Test,,CN=client1", true),
        (
            "authz-simple,id=a0,identity=CN=client1,,O=Test,,C=GB",
            false,
        ),
        (
            "authz-list,id=a0,policy=deny,rules.0.match=*CN=client1,rules.0.policy=allow,\
             rules.0.format=glob",
            true,
        ),
        (
            "authz-list,id=a0,policy=allow,rules.0.match=C=GB,,O=Test,,CN=client1,\
             rules.0.policy=deny",
            false,
        ),
        // The first matching rule decides; then the default.
        (
            "authz-list,id=a0,policy=deny,rules.0.match=*CN=other,rules.0.policy=allow,\
             rules.0.format=glob,rules.1.match=C=GB*,rules.1.policy=allow,rules.1.format=glob",
            true,
        ),
        ("authz-list,id=a0", false),
        ("authz-list,id=a0,policy=allow", true),
        // tls-authz naming something that is not an authorization object.
        ("secret,id=a0,data=x", false),
    ];
    for (object, want) in cases {
        for side in SIDES {
            assert_eq!(x509_authz_allows(side, object), want, "{side:?} {object}");
        }
    }
}

#[test]
fn authz_object_is_looked_up_at_each_handshake() {
    let pki = Pki::get();
    for side in SIDES {
        let (d, mut c) = daemon(side, &[x509_object("t0", &pki.server(), "")]);
        // qsd (and sluice) take a tls-authz id that names nothing yet.
        serve(&mut c, &d, json!({"tls-creds": "t0", "tls-authz": "a0"}));
        assert!(!connects(&x509_uri(&d, "client1")), "{side:?}: no a0 yet");
        let add = json!({"qom-type": "authz-simple", "id": "a0",
                         "identity": "C=GB,O=Test,CN=client1"});
        ok(&mut c, "object-add", add.clone());
        assert!(connects(&x509_uri(&d, "client1")), "{side:?}: a0 added");
        ok(&mut c, "object-del", json!({"id": "a0"}));
        assert!(!connects(&x509_uri(&d, "client1")), "{side:?}: a0 deleted");
        // object-del of the credentials the server runs with is not refused (qsd keeps a
        // reference): the server goes on serving with them.
        ok(&mut c, "object-add", add);
        ok(&mut c, "object-del", json!({"id": "t0"}));
        assert!(connects(&x509_uri(&d, "client1")), "{side:?}: t0 deleted");
        let r = c.exec("object-del", json!({"id": "t0"}));
        assert_eq!(
            Qmp::error(&r),
            ("GenericError".into(), "object 't0' not found".into())
        );
    }
}

#[test]
fn authz_checks_psk_usernames_in_sluice_only() {
    for (identity, sluice, qsd) in [(PSK_USER, true, true), ("bob", false, true)] {
        for side in SIDES {
            let (d, mut c) = daemon(
                side,
                &[
                    psk_object("p0"),
                    format!("authz-simple,id=a0,identity={identity}"),
                ],
            );
            serve(&mut c, &d, json!({"tls-creds": "p0", "tls-authz": "a0"}));
            let got = connects(&psk_uri(&d, PSK_USER, &Pki::get().psk()));
            // Deliberate: qsd ignores tls-authz for PSK; sluice checks the username.
            let want = if side == Side::Sluice { sluice } else { qsd };
            assert_eq!(got, want, "{side:?} identity={identity}");
        }
    }
}

#[test]
fn authz_refuses_unidentified_clients_in_sluice_only() {
    let pki = Pki::get();
    for side in SIDES {
        let (d, mut c) = daemon(
            side,
            &[
                x509_object("t0", &pki.server(), ",verify-peer=off"),
                "authz-list,id=a0,policy=allow".to_string(),
            ],
        );
        serve(&mut c, &d, json!({"tls-creds": "t0", "tls-authz": "a0"}));
        // Deliberate: with verify-peer=off qsd skips tls-authz; sluice has no identity to
        // check and refuses.
        assert_eq!(
            connects(&x509_uri(&d, "nocert")),
            side == Side::Qsd,
            "{side:?}"
        );
    }
}

#[test]
fn tcp_nbds_on_loopback() {
    let pki = Pki::get();
    for side in SIDES {
        let (d, mut c) = daemon(side, &[x509_object("t0", &pki.server(), "")]);
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        ok(
            &mut c,
            "nbd-server-start",
            json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1",
                                                     "port": port.to_string()}},
                   "tls-creds": "t0"}),
        );
        ok(
            &mut c,
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "n0", "name": "n0"}),
        );
        let uri = format!(
            "nbds://127.0.0.1:{port}/n0?tls-certificates={}",
            pki.client("client1").display()
        );
        assert!(connects(&uri), "{side:?}");
        let copy = d.path("copy.img");
        run("nbdcopy", &[&uri, path_str(&copy)]);
        assert_eq!(std::fs::read(&copy).unwrap(), random_bytes(SIZE, 12));
        assert!(!connects(&format!("nbd://127.0.0.1:{port}/n0")), "{side:?}");
    }
}

/// Every object-add / object-del / nbd-server-start mistake gets qsd's class and message.
#[test]
fn qmp_errors_match_qsd() {
    let pki = Pki::get();
    let work = tempfile::tempdir().unwrap();
    let no_key = work.path().join("no-key");
    std::fs::create_dir(&no_key).unwrap();
    for f in ["ca-cert.pem", "server-cert.pem"] {
        std::fs::copy(pki.server().join(f), no_key.join(f)).unwrap();
    }
    let server = path_str(&pki.server()).to_string();
    let x509 = |id: &str, extra: Value| {
        let mut v = json!({"qom-type": "tls-creds-x509", "id": id, "endpoint": "server",
                           "dir": server});
        for (k, e) in extra.as_object().unwrap() {
            if e.is_null() {
                v.as_object_mut().unwrap().remove(k);
            } else {
                v[k] = e.clone();
            }
        }
        v
    };
    let cmds: Vec<(&str, Value)> = vec![
        ("object-add", x509("t0", json!({}))),
        ("object-add", x509("t0", json!({}))),
        (
            "object-add",
            json!({"qom-type": "authz-simple", "id": "t0", "identity": "x"}),
        ),
        ("object-add", json!({"qom-type": "nosuch", "id": "x"})),
        ("object-add", json!({"id": "x"})),
        ("object-add", json!({"qom-type": "secret"})),
        ("object-add", x509("bad id", json!({}))),
        ("object-add", x509("1x", json!({}))),
        ("object-add", x509("t1", json!({"endpoint": "bogus"}))),
        ("object-add", x509("t1", json!({"dir": null}))),
        ("object-add", x509("t1", json!({"dir": "/nonexistent"}))),
        ("object-add", x509("t1", json!({"dir": path_str(&no_key)}))),
        ("object-add", x509("t1", json!({"extra": 1}))),
        ("object-add", x509("t1", json!({"verify-peer": "yes"}))),
        ("object-add", x509("t1", json!({"passwordid": "nosuch"}))),
        (
            "object-add",
            json!({"qom-type": "tls-creds-x509", "id": "client", "endpoint": "client",
                   "dir": path_str(&pki.client("client1"))}),
        ),
        (
            "object-add",
            json!({"qom-type": "tls-creds-x509", "id": "t2", "endpoint": "client",
                   "dir": "/nonexistent"}),
        ),
        (
            "object-add",
            json!({"qom-type": "tls-creds-psk", "id": "p0", "endpoint": "server",
                   "dir": "/nonexistent"}),
        ),
        (
            "object-add",
            json!({"qom-type": "tls-creds-psk", "id": "p0", "endpoint": "server",
                   "dir": path_str(&pki.psk_dir()), "username": "alice"}),
        ),
        (
            "object-add",
            json!({"qom-type": "authz-simple", "id": "a1"}),
        ),
        (
            "object-add",
            json!({"qom-type": "authz-list", "id": "l0",
                   "rules": [{"match": "x", "policy": "allow", "format": "regex"}]}),
        ),
        (
            "object-add",
            json!({"qom-type": "authz-list", "id": "l0", "rules": [{"policy": "allow"}]}),
        ),
        (
            "object-add",
            json!({"qom-type": "authz-list", "id": "l0", "policy": "maybe"}),
        ),
        ("object-add", json!({"qom-type": "secret", "id": "s0"})),
        (
            "object-add",
            json!({"qom-type": "secret", "id": "s0", "data": "x", "file": "/etc/hostname"}),
        ),
        (
            "object-add",
            json!({"qom-type": "secret", "id": "s0", "data": "!!!", "format": "base64"}),
        ),
        (
            "object-add",
            json!({"qom-type": "secret", "id": "s0", "data": "x", "format": "hex"}),
        ),
        (
            "object-add",
            json!({"qom-type": "secret", "id": "s0", "file": "/nonexistent"}),
        ),
        (
            "object-add",
            json!({"qom-type": "secret", "id": "s0", "data": "x", "keyid": "nosuch"}),
        ),
        (
            "object-add",
            json!({"qom-type": "secret", "id": "s0", "data": "aGVsbG8=", "format": "base64"}),
        ),
        (
            "object-add",
            json!({"qom-type": "authz-simple", "id": "a0", "identity": "x"}),
        ),
        ("object-del", json!({"id": "nosuch"})),
        ("object-del", json!({})),
        ("nbd-server-start", json!({"tls-creds": "nosuch"})),
        ("nbd-server-start", json!({"tls-creds": "a0"})),
        ("nbd-server-start", json!({"tls-creds": "s0"})),
        ("nbd-server-start", json!({"tls-creds": "client"})),
        (
            "nbd-server-start",
            json!({"tls-creds": "t0", "tls-authz": "a0"}),
        ),
        ("object-del", json!({"id": "t0"})),
        ("object-del", json!({"id": "a0"})),
        ("object-del", json!({"id": "s0"})),
        ("object-del", json!({"id": "t0"})),
    ];
    let mut replies = Vec::new();
    for side in SIDES {
        let (d, mut c) = daemon(side, &[]);
        let sock = path_str(&d.path("nbd.sock")).to_string();
        let got: Vec<Value> = cmds
            .iter()
            .map(|(name, args)| {
                let mut args = args.clone();
                if *name == "nbd-server-start" {
                    args["addr"] = json!({"type": "unix", "data": {"path": sock}});
                }
                let r = c.exec(name, args);
                match r.get("error") {
                    Some(e) => json!([e["class"], e["desc"]]),
                    None => r["return"].clone(),
                }
            })
            .collect();
        replies.push(got);
    }
    for (i, (name, args)) in cmds.iter().enumerate() {
        assert_eq!(replies[0][i], replies[1][i], "{name} {args}: sluice vs qsd");
    }
    // Spot-check that the comparison covered real errors, in qsd's words.
    let desc = |i: usize| replies[0][i][1].as_str().unwrap_or("").to_string();
    assert_eq!(
        desc(1),
        "attempt to add duplicate property 't0' to object (type 'container')"
    );
    assert_eq!(
        desc(3),
        "Parameter 'qom-type' does not accept value 'nosuch'"
    );
    assert_eq!(desc(9), "Missing 'dir' property value");
    assert_eq!(
        desc(11),
        format!(
            "Unable to access credentials {}/server-key.pem: No such file or directory",
            no_key.display()
        )
    );
}

/// Deliberate differences in object-add, each asserted on both sides.
#[test]
fn object_add_differences_from_qsd() {
    let work = tempfile::tempdir().unwrap();
    let bad_psk = work.path().join("bad-psk");
    std::fs::create_dir(&bad_psk).unwrap();
    std::fs::write(bad_psk.join("keys.psk"), "garbage\n").unwrap();
    let bad_cert = work.path().join("bad-cert");
    std::fs::create_dir(&bad_cert).unwrap();
    for f in ["ca-cert.pem", "server-key.pem"] {
        std::fs::copy(Pki::get().server().join(f), bad_cert.join(f)).unwrap();
    }
    std::fs::write(bad_cert.join("server-cert.pem"), "junk\n").unwrap();
    let cases = [
        // sluice refuses a malformed keys.psk at once; qsd fails each handshake later.
        json!({"qom-type": "tls-creds-psk", "id": "p", "endpoint": "server",
               "dir": path_str(&bad_psk)}),
        // A GnuTLS priority string means nothing to OpenSSL: refused, not ignored.
        json!({"qom-type": "tls-creds-x509", "id": "t", "endpoint": "server",
               "dir": path_str(&Pki::get().server()), "priority": "NORMAL"}),
    ];
    for side in SIDES {
        let (_d, mut c) = daemon(side, &[]);
        for case in &cases {
            let r = c.exec("object-add", case.clone());
            match side {
                Side::Qsd => assert_eq!(r, json!({"return": {}}), "{case}"),
                Side::Sluice => {
                    let (class, desc) = Qmp::error(&r);
                    assert_eq!(class, "GenericError");
                    let named = match case.get("priority") {
                        Some(_) => "priority".to_string(),
                        None => format!("{}/keys.psk", bad_psk.display()),
                    };
                    assert!(desc.contains(&named), "{desc}");
                }
            }
        }
        // Both refuse a malformed certificate, each with its TLS library's reason.
        let r = c.exec(
            "object-add",
            json!({"qom-type": "tls-creds-x509", "id": "bad", "endpoint": "server",
                   "dir": path_str(&bad_cert)}),
        );
        let (class, desc) = Qmp::error(&r);
        assert_eq!(class, "GenericError");
        assert!(desc.contains("server-cert.pem"), "{side:?}: {desc}");
    }
}

#[test]
fn object_option_errors_name_the_option_like_qsd() {
    for (object, message) in [
        (
            "nosuch,id=x",
            "--object nosuch,id=x: Parameter 'qom-type' does not accept value 'nosuch'",
        ),
        (
            "tls-creds-x509,id=t0,endpoint=server,dir=/nonexistent",
            "--object tls-creds-x509,id=t0,endpoint=server,dir=/nonexistent: Unable to access \
             credentials /nonexistent/ca-cert.pem: No such file or directory",
        ),
        (
            "secret,id=s0",
            "--object secret,id=s0: Either 'file' or 'data' must be provided",
        ),
    ] {
        let qsd = output("qemu-storage-daemon", &["--object", object]);
        let sluice = output(sluice_bin(), &["daemon", "--object", object]);
        assert!(
            !qsd.status.success() && !sluice.status.success(),
            "{object}"
        );
        let qsd_err = String::from_utf8_lossy(&qsd.stderr);
        let sluice_err = String::from_utf8_lossy(&sluice.stderr);
        assert_eq!(
            qsd_err.trim(),
            format!("qemu-storage-daemon: {message}"),
            "{object}"
        );
        assert_eq!(
            sluice_err.trim(),
            format!("sluice daemon: {message}"),
            "{object}"
        );
    }
}

#[test]
fn object_option_duplicate_id_refused() {
    let pki = Pki::get();
    let o = x509_object("t0", &pki.server(), "");
    let sluice = output(sluice_bin(), &["daemon", "--object", &o, "--object", &o]);
    assert!(!sluice.status.success());
    assert_eq!(
        String::from_utf8_lossy(&sluice.stderr).trim(),
        format!(
            "sluice daemon: --object {o}: attempt to add duplicate property 't0' to object \
             (type 'container')"
        )
    );
}
