//! TLS for `sluice serve` (issue #12), with real GnuTLS clients: libnbd's nbdinfo, nbdcopy
//! and nbdsh, qemu-img and qemu-io, over Unix and TCP sockets, with X.509 certificates and
//! pre-shared keys made at test time (`support::tls`). Refusals (no certificate, another CA,
//! a revoked one, a wrong or unknown PSK) leave the server serving others; FORCEDTLS is
//! checked with raw bytes; and every client scenario is run against `nbdkit --tls=...` too,
//! comparing outcomes.

use crate::support;

use std::path::Path;
use std::process::{Command, Stdio};

use sluice_proto::nbd::consts::*;
use support::raw::{info_payload, meta_payload, RawClient};
use support::tls::{py_tls, Pki, PSK_USER};
use support::*;

/// The export's size: odd enough that its big-endian bytes would stand out in a reply.
const SIZE: &str = "7777280";
const SIZE_BYTES: [u8; 8] = 7_777_280u64.to_be_bytes();

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Sluice,
    Nbdkit,
}

const SIDES: [Side; 2] = [Side::Sluice, Side::Nbdkit];

fn start(side: Side, args: &[&str]) -> Server {
    match side {
        Side::Sluice => Server::start(args),
        Side::Nbdkit => Server::try_start_nbdkit(args).expect("nbdkit starts"),
    }
}

/// `--tls=MODE --tls-certificates=DIR`.
fn x509_args(mode: &str, dir: &Path) -> Vec<String> {
    vec![
        format!("--tls={mode}"),
        format!("--tls-certificates={}", dir.display()),
    ]
}

fn psk_args(mode: &str) -> Vec<String> {
    vec![
        format!("--tls={mode}"),
        format!("--tls-psk={}", Pki::get().psk().display()),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Starts `side` with TLS arguments and then `rest` (the plugin and its parameters).
fn start_with(side: Side, tls: &[String], rest: &[&str]) -> Server {
    let mut args = strs(tls);
    args.extend_from_slice(rest);
    start(side, &args)
}

/// libnbd URI of the server's default export over TLS with X.509 client credentials.
fn x509_uri(server: &Server, client: &Path) -> String {
    format!(
        "nbds+unix:///?socket={}&tls-certificates={}",
        server.socket.display(),
        client.display()
    )
}

/// libnbd URI over TLS with pre-shared keys for `user` from `file`.
fn psk_uri(server: &Server, user: &str, file: &Path) -> String {
    format!(
        "nbds+unix://{user}@/?socket={}&tls-psk-file={}",
        server.socket.display(),
        file.display()
    )
}

/// True if nbdinfo completes a handshake and reads the size.
fn connects(uri: &str) -> bool {
    output("nbdinfo", &["--size", uri]).status.success()
}

/// qemu-io with a TLS credentials object, on the server's Unix socket; panics unless every
/// command succeeds.
fn qemu_io_tls(object: &str, server: &Server, cmds: &[&str]) -> String {
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},tls-creds=t0,tls-hostname=localhost",
        server.socket.display()
    );
    let mut args = vec!["--object", object, "--image-opts", &opts];
    for c in cmds {
        args.extend(["-c", c]);
    }
    let out = output("qemu-io", &args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success()
            && !text.contains("Pattern verification failed")
            && !text.contains("failed")
            && !text.to_lowercase().contains("error"),
        "qemu-io {cmds:?} ({}):\n{text}",
        out.status
    );
    text
}

/// Copies `len` random bytes into the export at `uri` with nbdcopy, then back out, and
/// checks both ways with nbdsh that the connection really negotiated TLS.
fn copy_round_trip(uri: &str, dir: &Path, seed: u64) {
    let input = dir.join(format!("in-{seed}.bin"));
    let data = random_bytes(4 << 20, seed);
    std::fs::write(&input, &data).unwrap();
    run("nbdcopy", &[path_str(&input), uri]);
    assert_same_bytes(
        &export_bytes(uri, dir)[..data.len()],
        &data,
        "nbdcopy round trip",
    );
    let out = nbdsh(
        uri,
        "h = nbd.NBD()\nh.set_uri_allow_local_file(True)\nh.connect_uri(uri)\n\
         assert h.get_tls_negotiated()\n\
         h.pwrite(b'\\x5a' * 4096, 8192)\nh.flush()\nassert h.pread(4096, 8192) == b'\\x5a' * 4096\n\
         h.shutdown()\nprint('ok')",
    );
    assert_eq!(out, "ok\n");
    let info = nbdinfo_json(&[], uri);
    assert_eq!(info["TLS"], serde_json::Value::Bool(true), "{info}");
}

#[test]
fn x509_libnbd_tools_over_unix_socket() {
    let pki = Pki::get();
    let s = start_with(
        Side::Sluice,
        &x509_args("require", &pki.server()),
        &["memory", SIZE],
    );
    copy_round_trip(&x509_uri(&s, &pki.client("client1")), s.dir.path(), 1);
}

#[test]
fn psk_libnbd_tools_over_unix_socket() {
    let pki = Pki::get();
    let s = start_with(Side::Sluice, &psk_args("require"), &["memory", SIZE]);
    copy_round_trip(&psk_uri(&s, PSK_USER, &pki.psk()), s.dir.path(), 2);
}

/// TCP via captive mode (`-p 0` picks a free port; the command builds its URIs from $uri).
fn captive_tcp(tls: &[String], script: &str) -> String {
    let mut args = vec!["serve", "-p", "0", "-i", "127.0.0.1"];
    args.extend(strs(tls));
    args.extend(["memory", SIZE, "--run", script]);
    run(sluice_bin(), &args)
}

#[test]
fn x509_and_psk_over_tcp_with_libnbd_and_qemu_img() {
    let pki = Pki::get();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.bin");
    random_file(&data, 1 << 20, 3);
    let back = dir.path().join("back.bin");
    let script = format!(
        "set -e\ncase \"$uri\" in nbds://127.0.0.1:*) ;; *) echo \"bad uri $uri\"; exit 1;; esac\n\
         p=${{uri##*:}}; p=${{p%/}}\n\
         nbdcopy {data} \"$uri?tls-certificates={cli}\"\n\
         nbdcopy \"$uri?tls-certificates={cli}\" {back}\n\
         qemu-img info --output=json --object tls-creds-x509,id=t0,endpoint=client,dir={cli} \
           --image-opts driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=$p,tls-creds=t0 \
           | grep -q '\"virtual-size\": {SIZE}'\necho ok",
        data = data.display(),
        back = back.display(),
        cli = pki.client("client1").display(),
    );
    assert_eq!(
        captive_tcp(&x509_args("require", &pki.server()), &script),
        "ok\n"
    );
    assert_same_bytes(
        &std::fs::read(&back).unwrap()[..1 << 20],
        &std::fs::read(&data).unwrap(),
        "TCP X.509 copy",
    );
    let script = format!(
        "set -e\nu=$(echo \"$uri\" | sed 's|nbds://|nbds://{PSK_USER}@|')\n\
         p=${{uri##*:}}; p=${{p%/}}\n\
         nbdinfo --size \"$u?tls-psk-file={psk}\"\n\
         qemu-img info --output=json --object tls-creds-psk,id=t0,endpoint=client,dir={pskdir},username={PSK_USER} \
           --image-opts driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=$p,tls-creds=t0 \
           | grep -q '\"virtual-size\": {SIZE}'\necho ok",
        psk = pki.psk().display(),
        pskdir = pki.psk_dir().display(),
    );
    assert_eq!(
        captive_tcp(&psk_args("require"), &script),
        format!("{SIZE}\nok\n")
    );
}

#[test]
fn qemu_io_x509_and_psk_over_unix_socket() {
    let pki = Pki::get();
    let s = start_with(
        Side::Sluice,
        &x509_args("require", &pki.server()),
        &["memory", SIZE],
    );
    let object = format!(
        "tls-creds-x509,id=t0,endpoint=client,dir={}",
        pki.client("client1").display()
    );
    qemu_io_tls(
        &object,
        &s,
        &[
            "write -P 0x5a 0 1M",
            "write -z 1M 64k",
            "read -P 0x5a 0 1M",
            "read -P 0 1M 64k",
        ],
    );
    let s = start_with(Side::Sluice, &psk_args("require"), &["memory", SIZE]);
    let object = format!(
        "tls-creds-psk,id=t0,endpoint=client,dir={},username={PSK_USER}",
        pki.psk_dir().display()
    );
    qemu_io_tls(
        &object,
        &s,
        &["write -P 0x33 4k 64k", "read -P 0x33 4k 64k"],
    );
}

/// Which clients get through `--tls-verify-peer` with a CRL: the same for sluice and nbdkit,
/// and refusals leave the server serving the next client.
#[test]
fn verify_peer_refuses_missing_foreign_and_revoked_certificates() {
    let pki = Pki::get();
    let clients = [
        "nocert", "stranger", "revoked", "client1", "nocert", "client1",
    ];
    let mut outcomes = Vec::new();
    for side in SIDES {
        let mut tls = x509_args("require", &pki.server_with_crl());
        tls.push("--tls-verify-peer".into());
        let mut s = start_with(side, &tls, &["memory", SIZE]);
        let got: Vec<bool> = clients
            .iter()
            .map(|c| connects(&x509_uri(&s, &pki.client(c))))
            .collect();
        s.assert_alive();
        if side == Side::Sluice {
            s.assert_no_panic();
            let log = s.stderr();
            assert!(log.contains("certificate revoked"), "{log}");
            assert!(log.contains("did not return a certificate"), "{log}");
        }
        outcomes.push(got);
    }
    assert_eq!(
        outcomes[0],
        vec![false, false, false, true, false, true],
        "sluice"
    );
    assert_eq!(outcomes[0], outcomes[1], "sluice vs nbdkit");
}

/// Without `--tls-verify-peer` no certificate is asked for, as with nbdkit.
#[test]
fn without_verify_peer_any_client_certificate_is_accepted() {
    let pki = Pki::get();
    for side in SIDES {
        let s = start_with(
            side,
            &x509_args("require", &pki.server_with_crl()),
            &["memory", SIZE],
        );
        for c in ["nocert", "stranger", "revoked", "client1"] {
            assert!(connects(&x509_uri(&s, &pki.client(c))), "{side:?} {c}");
        }
    }
}

#[test]
fn psk_refuses_wrong_key_and_unknown_user() {
    let pki = Pki::get();
    let mut outcomes = Vec::new();
    for side in SIDES {
        let mut s = start_with(side, &psk_args("require"), &["memory", SIZE]);
        let got = vec![
            connects(&psk_uri(&s, PSK_USER, &pki.wrong_psk())),
            connects(&psk_uri(&s, "mallory", &pki.unknown_psk())),
            connects(&psk_uri(&s, PSK_USER, &pki.psk())),
            connects(&psk_uri(&s, "mallory", &pki.unknown_psk())),
            connects(&psk_uri(&s, PSK_USER, &pki.psk())),
        ];
        s.assert_alive();
        outcomes.push(got);
    }
    assert_eq!(outcomes[0], vec![false, false, true, false, true], "sluice");
    assert_eq!(outcomes[0], outcomes[1], "sluice vs nbdkit");
}

/// Which clients each `--tls` mode serves, and what `--run` sees ($tls, the URI scheme):
/// the same as nbdkit.
#[test]
fn modes_off_on_require_serve_and_run_like_nbdkit() {
    let pki = Pki::get();
    let script = "echo \"tls=${tls-unset} ${uri%%:*}\"";
    let mut results = Vec::new();
    for side in SIDES {
        let mut per_side = Vec::new();
        for mode in ["off", "on", "require"] {
            let s = start_with(side, &x509_args(mode, &pki.server()), &["memory", SIZE]);
            let plain = connects(&s.uri());
            let tls = connects(&x509_uri(&s, &pki.client("client1")));
            let (program, lead): (&str, &[&str]) = match side {
                Side::Sluice => (sluice_bin(), &["serve", "-U", "-"]),
                Side::Nbdkit => ("nbdkit", &["-U", "-"]),
            };
            let mut args = lead.to_vec();
            let tls_args = x509_args(mode, &pki.server());
            args.extend(strs(&tls_args));
            args.extend(["memory", SIZE, "--run", script]);
            let seen = run(program, &args);
            per_side.push((mode, plain, tls, seen));
        }
        results.push(per_side);
    }
    let expected = vec![
        ("off", true, false, "tls=unset nbd+unix\n".to_string()),
        ("on", true, true, "tls=1 nbd+unix\n".to_string()),
        ("require", false, true, "tls=2 nbds+unix\n".to_string()),
    ];
    assert_eq!(results[0], expected, "sluice");
    assert_eq!(results[0], results[1], "sluice vs nbdkit");
}

/// Under `--tls=require`, a raw plaintext client gets NBD_REP_ERR_TLS_REQD for every option
/// but STARTTLS and ABORT, NBD_OPT_EXPORT_NAME closes the connection, and no reply carries
/// the export's size or data. nbdkit answers the same.
#[test]
fn require_plaintext_options_get_tls_reqd_and_no_export_data() {
    let pki = Pki::get();
    let options: Vec<(u32, Vec<u8>)> = vec![
        (
            NBD_OPT_INFO,
            info_payload(
                b"",
                &[NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE],
            ),
        ),
        (NBD_OPT_GO, info_payload(b"", &[])),
        (NBD_OPT_LIST, vec![]),
        (NBD_OPT_STRUCTURED_REPLY, vec![]),
        (NBD_OPT_LIST_META_CONTEXT, meta_payload("", &[])),
        (
            NBD_OPT_SET_META_CONTEXT,
            meta_payload("", &["base:allocation"]),
        ),
        (0xdead, b"junk".to_vec()),
    ];
    let mut per_side = Vec::new();
    for side in SIDES {
        let mut s = start_with(
            side,
            &x509_args("require", &pki.server()),
            &["memory", SIZE],
        );
        let mut c = RawClient::connect_with_flags(&s, NBD_FLAG_C_FIXED_NEWSTYLE);
        let mut kinds = Vec::new();
        for (code, data) in &options {
            let replies = c.option(*code, data);
            for r in &replies {
                assert!(
                    !r.data.windows(8).any(|w| w == SIZE_BYTES),
                    "{side:?}: option {code} leaked the export size: {replies:?}"
                );
            }
            kinds.push(replies.iter().map(|r| r.kind).collect::<Vec<_>>());
        }
        // EXPORT_NAME cannot be refused: the connection is closed, with nothing sent.
        c.send_option(NBD_OPT_EXPORT_NAME, b"");
        c.expect_eof_now();
        // ABORT is still answered.
        let mut c = RawClient::connect_with_flags(&s, NBD_FLAG_C_FIXED_NEWSTYLE);
        c.option_ack(NBD_OPT_ABORT);
        // A plaintext libnbd client is refused, a TLS one served.
        assert!(!connects(&s.uri()), "{side:?}");
        assert!(connects(&x509_uri(&s, &pki.client("client1"))), "{side:?}");
        s.assert_alive();
        per_side.push(kinds);
    }
    let tls_reqd = vec![vec![NBD_REP_ERR_TLS_REQD]; options.len()];
    assert_eq!(per_side[0], tls_reqd, "sluice");
    assert_eq!(per_side[0], per_side[1], "sluice vs nbdkit");
}

/// STARTTLS a second time is refused with ERR_INVALID, and what was negotiated in plaintext
/// (structured replies) is forgotten: asking again over TLS is acknowledged, not refused as
/// a repeat. Then GO and a read work over TLS. nbdkit answers the same.
#[test]
fn starttls_twice_invalid_and_plaintext_state_forgotten() {
    let pki = Pki::get();
    let body = r#"
s = connect(sock)
out = []
out.append([k for k, _ in opt(s, 8)])            # structured replies, in plaintext
out.append([k for k, _ in opt(s, 5)])            # STARTTLS
t = tls(s, client)
out.append([k for k, _ in opt(t, 5)])            # STARTTLS again
out.append([k for k, _ in opt(t, 8)])            # structured replies: forgotten, so ACK
out.append([k for k, _ in opt(t, 8)])            # and now a repeat
r = opt(t, 7, info())
out.append(r[-1][0])
t.sendall(struct.pack('>IHHQQI', 0x25609513, 0, 0, 42, 0, 4096))
magic, flags, kind, cookie, ln = struct.unpack('>IHHQI', recvn(t, 20))
out.append([hex(magic), cookie])
print(json.dumps(out))
"#;
    let mut outs = Vec::new();
    for side in SIDES {
        let mut s = start_with(side, &x509_args("on", &pki.server()), &["memory", SIZE]);
        let out = py_tls(&s.socket, &pki.client("client1"), body);
        outs.push(serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap());
        s.assert_alive();
    }
    let ack = NBD_REP_ACK;
    let expected = format!(
        "[[{ack}], [{ack}], [{}], [{ack}], [{}], {ack}, [\"0x668e33ef\", 42]]",
        NBD_REP_ERR_INVALID, NBD_REP_ERR_INVALID
    );
    assert_eq!(
        outs[0],
        serde_json::from_str::<Vec<serde_json::Value>>(&expected).unwrap(),
        "sluice"
    );
    // A repeated NBD_OPT_STRUCTURED_REPLY is refused by sluice (as by qemu) and acknowledged
    // again by nbdkit: that difference is not about TLS, so it is left out of the comparison.
    for out in &mut outs {
        out.remove(4);
    }
    assert_eq!(outs[0], outs[1], "sluice vs nbdkit");
}

/// After the ACK to STARTTLS: garbage, a truncated ClientHello followed by a close, and a
/// truncated ClientHello that then stalls. Each connection fails alone; the server keeps
/// serving (a TLS client succeeds while the stalled one is still open). nbdkit the same.
#[test]
fn garbage_and_truncated_client_hello_after_ack() {
    let pki = Pki::get();
    let body = r#"
def hello():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, outb = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, outb, server_hostname='localhost')
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outb.read()
out = []
s = connect(sock)
out.append([k for k, _ in opt(s, 5)])
s.sendall(b'GET / HTTP/1.0\r\n\r\n' + bytes(range(256)) * 4)
out.append(closed(s))
h = hello()
s = connect(sock)
opt(s, 5)
s.sendall(h[:len(h) // 2])
s.close()
stalled = connect(sock)
opt(stalled, 5)
stalled.sendall(h[:len(h) // 2])
c = connect(sock)
opt(c, 5)
c = tls(c, client)
out.append(opt(c, 7, info())[-1][0])
stalled.close()
print(json.dumps(out))
"#;
    let mut outs = Vec::new();
    for side in SIDES {
        let mut s = start_with(
            side,
            &x509_args("require", &pki.server()),
            &["memory", SIZE],
        );
        outs.push(py_tls(&s.socket, &pki.client("client1"), body));
        assert!(connects(&x509_uri(&s, &pki.client("client1"))), "{side:?}");
        s.assert_alive();
        if side == Side::Sluice {
            s.assert_no_panic();
        }
    }
    assert_eq!(
        outs[0],
        format!("[[{NBD_REP_ACK}], true, {NBD_REP_ACK}]\n"),
        "sluice"
    );
    assert_eq!(outs[0], outs[1], "sluice vs nbdkit");
}

/// A client that sends its ClientHello with STARTTLS, without waiting for the ACK: the bytes
/// travelled in plaintext and are never taken into the TLS session; the connection is closed
/// without an ACK.
#[test]
fn bytes_pipelined_after_starttls_close_the_connection() {
    let pki = Pki::get();
    let mut s = start_with(
        Side::Sluice,
        &x509_args("require", &pki.server()),
        &["memory", SIZE],
    );
    let mut c = RawClient::connect_with_flags(&s, NBD_FLAG_C_FIXED_NEWSTYLE);
    let mut bytes = Vec::new();
    for (code, len) in [(NBD_OPT_STARTTLS, 0u32), (NBD_OPT_STRUCTURED_REPLY, 0)] {
        bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
        bytes.extend_from_slice(&code.to_be_bytes());
        bytes.extend_from_slice(&len.to_be_bytes());
    }
    c.send(&bytes);
    c.expect_eof_now();
    s.assert_serving_tls(&pki.client("client1"));
}

/// 100 libnbd clients (GnuTLS) do their TLS handshakes at the same moment; all are served.
#[test]
fn hundred_concurrent_tls_handshakes() {
    let pki = Pki::get();
    let script = r#"
import threading
n = 100
barrier = threading.Barrier(n)
results = []
def one(i):
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    barrier.wait()
    h.connect_uri(uri)
    ok = h.get_tls_negotiated() and h.pread(4096, i * 4096) == b'\0' * 4096
    h.shutdown()
    results.append(ok)
threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
for t in threads: t.start()
for t in threads: t.join()
print(len(results), all(results))
"#;
    for side in SIDES {
        let mut s = start_with(
            side,
            &x509_args("require", &pki.server()),
            &["memory", SIZE],
        );
        let out = nbdsh(&x509_uri(&s, &pki.client("client1")), script);
        assert_eq!(out, "100 True\n", "{side:?}");
        s.assert_alive();
    }
}

/// TLS 1.2 (GnuTLS told to disable 1.3 through its system priority file) with PSK and X.509.
#[test]
fn tls_1_2_clients_are_served() {
    let pki = Pki::get();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("gnutls.conf");
    std::fs::write(&conf, "[overrides]\ndisabled-version = tls1.3\n").unwrap();
    let nbdinfo12 = |uri: &str| {
        let out = Command::new("nbdinfo")
            .args(["--size", uri])
            .env("GNUTLS_SYSTEM_PRIORITY_FILE", &conf)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{uri}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let mut tls = x509_args("require", &pki.server());
    tls.push("-v".into());
    let s = start_with(Side::Sluice, &tls, &["memory", SIZE]);
    nbdinfo12(&x509_uri(&s, &pki.client("client1")));
    let mut tls = psk_args("require");
    tls.push("-v".into());
    let p = start_with(Side::Sluice, &tls, &["memory", SIZE]);
    nbdinfo12(&psk_uri(&p, PSK_USER, &pki.psk()));
    for server in [&s, &p] {
        let log = server.stderr();
        assert!(log.contains("TLS TLSv1.2 "), "{log}");
    }
    assert!(
        p.stderr().contains("PSK username \"alice\""),
        "{}",
        p.stderr()
    );
}

/// `nbdkit_is_tls()` in a C plugin (in `open`, `export_description` and `list_exports`'s
/// argument) and `nbdkit.is_tls()` in a Python plugin: true over TLS, false in plaintext
/// (`--tls=on` serves both). The C plugin is compared with nbdkit; Debian's nbdkit 1.32 has
/// no `nbdkit.is_tls()` in its Python module (newer nbdkit does), so the Python half is
/// checked on sluice only.
#[test]
fn plugins_see_is_tls() {
    let pki = Pki::get();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("tls.py");
    std::fs::write(
        &script,
        "import nbdkit\nAPI_VERSION = 2\n\
         def open(readonly): return 1\n\
         def get_size(h): return 512\n\
         def pread(h, buf, offset, flags):\n    buf[:] = (b'1' if nbdkit.is_tls() else b'0') * len(buf)\n",
    )
    .unwrap();
    let recorder = c_plugin("recorder");
    let mut per_side = Vec::new();
    for side in SIDES {
        let log = dir.path().join(format!("rec-{side:?}.log"));
        let log_arg = format!("log={}", log.display());
        let c = start_with(
            side,
            &x509_args("on", &pki.server()),
            &[path_str(&recorder), &log_arg, "size=1M"],
        );
        let tls_uri = x509_uri(&c, &pki.client("client1"));
        let description = |uri: &str| {
            nbdinfo_json(&[], uri)["exports"][0]["description"]
                .as_str()
                .unwrap_or_default()
                .split(" pid=")
                .next()
                .unwrap()
                .to_string()
        };
        let c_tls = description(&tls_uri);
        let c_plain = description(&c.uri());
        run("nbdinfo", &["--list", &tls_uri]);
        let calls = std::fs::read_to_string(&log).unwrap();
        let listed_tls = calls.contains("list_exports readonly=0 is_tls=1");
        let opened_tls = calls.contains("tls=1");

        per_side.push((c_tls, c_plain, listed_tls, opened_tls));
    }
    let expected = (
        "export def tls=1".to_string(),
        "export def tls=0".to_string(),
        true,
        true,
    );
    assert_eq!(per_side[0], expected, "sluice");
    assert_eq!(per_side[0], per_side[1], "sluice vs nbdkit");

    let mut py_args = x509_args("on", &pki.server());
    py_args.push("python".into());
    py_args.push(path_str(&script).into());
    let p = start(Side::Sluice, &strs(&py_args));
    let read = "h = nbd.NBD()\nh.set_uri_allow_local_file(True)\nh.connect_uri(uri)\n\
                print(h.pread(1, 0).decode())";
    assert_eq!(nbdsh(&x509_uri(&p, &pki.client("client1")), read), "1\n");
    assert_eq!(nbdsh(&p.uri(), read), "0\n");
}

/// Runs `sluice serve -f -U SOCK ARGS memory 1M` expecting a startup failure; returns the
/// exit code and stderr.
fn startup_failure(args: &[&str]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let mut all = vec!["serve", "-f", "-U", path_str(&sock)];
    all.extend_from_slice(args);
    all.extend(["memory", "1M"]);
    let out = Command::new(sluice_bin())
        .args(&all)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Exit 2 with one `sluice:` line that names the file and says what is wrong with it.
#[track_caller]
fn assert_bad_file(args: &[&str], file: &Path, problem: &str) {
    let (code, err) = startup_failure(args);
    assert_eq!(code, 2, "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: one line expected: {err}");
    assert!(err.starts_with("sluice: "), "{err}");
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(err.contains(problem), "{problem:?} not in {err}");
}

#[test]
fn bad_credential_files_exit_2_naming_the_file() {
    let pki = Pki::get();
    let dir = tempfile::tempdir().unwrap();
    let copy_server = |name: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
            std::fs::copy(pki.server().join(f), d.join(f)).unwrap();
        }
        d
    };
    let certs = |d: &Path| format!("--tls-certificates={}", d.display());

    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_bad_file(
        &["--tls=require", &certs(&empty)],
        &empty.join("ca-cert.pem"),
        "cannot read: No such file or directory",
    );

    let d = copy_server("nokey");
    std::fs::remove_file(d.join("server-key.pem")).unwrap();
    assert_bad_file(
        &["--tls=on", &certs(&d)],
        &d.join("server-key.pem"),
        "No such file or directory",
    );

    let d = copy_server("dirkey");
    std::fs::remove_file(d.join("server-key.pem")).unwrap();
    std::fs::create_dir(d.join("server-key.pem")).unwrap();
    assert_bad_file(
        &["--tls=require", &certs(&d)],
        &d.join("server-key.pem"),
        "cannot read: Is a directory",
    );

    let d = copy_server("badcert");
    std::fs::write(d.join("server-cert.pem"), "garbage\n").unwrap();
    assert_bad_file(
        &["--tls=require", &certs(&d)],
        &d.join("server-cert.pem"),
        "PEM certificate",
    );

    let d = copy_server("badkey");
    std::fs::write(
        d.join("server-key.pem"),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    assert_bad_file(
        &["--tls=require", &certs(&d)],
        &d.join("server-key.pem"),
        "not a PEM private key",
    );

    let d = copy_server("mismatch");
    std::fs::copy(
        pki.client("client1").join("client-key.pem"),
        d.join("server-key.pem"),
    )
    .unwrap();
    assert_bad_file(
        &["--tls=require", &certs(&d)],
        &d.join("server-key.pem"),
        "does not match the certificate",
    );

    let d = copy_server("badcrl");
    std::fs::write(d.join("ca-crl.pem"), "not a crl\n").unwrap();
    assert_bad_file(
        &["--tls=require", "--tls-verify-peer", &certs(&d)],
        &d.join("ca-crl.pem"),
        "not a PEM certificate revocation list",
    );

    let missing = dir.path().join("missing.psk");
    assert_bad_file(
        &["--tls=require", &format!("--tls-psk={}", missing.display())],
        &missing,
        "cannot read: No such file or directory",
    );
    let bad = dir.path().join("bad.psk");
    std::fs::write(&bad, "alice:00ff\nbob:zz\n").unwrap();
    assert_bad_file(
        &["--tls=require", &format!("--tls-psk={}", bad.display())],
        &bad,
        "line 2: key of \"bob\" is not an even number of hexadecimal digits",
    );

    let (code, err) = startup_failure(&["--tls=sometimes"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("sometimes"), "{err}");
}

/// Without --tls-certificates, nbdkit's default directory is searched (root's is
/// /etc/pki/nbdkit): nothing there is an error for `require`, a warning for an explicit
/// `on` (TLS then off), and silence for the default.
#[test]
fn no_certificates_found_require_fails_on_warns() {
    if Path::new("/etc/pki/nbdkit").exists() || unsafe_geteuid() != 0 {
        eprintln!("skipped: needs root without /etc/pki/nbdkit");
        return;
    }
    let (code, err) = startup_failure(&["--tls=require"]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no TLS certificates found"), "{err}");
    assert!(err.contains("/etc/pki/nbdkit"), "{err}");

    for (tls, warned) in [(Some("--tls=on"), true), (None, false)] {
        let mut args = vec!["serve", "-U", "-"];
        args.extend(tls);
        args.extend([
            "memory",
            "1M",
            "--run",
            "echo \"${tls-unset}\"; nbdinfo --size \"$uri\"",
        ]);
        let out = Command::new(sluice_bin())
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "unset\n1048576\n");
        assert_eq!(err.contains("warning: --tls=on"), warned, "{err}");
    }
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// A world-readable key is accepted, as nbdkit accepts it.
#[test]
fn world_readable_key_is_accepted_as_by_nbdkit() {
    use std::os::unix::fs::PermissionsExt;
    let pki = Pki::get();
    let dir = tempfile::tempdir().unwrap();
    for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
        std::fs::copy(pki.server().join(f), dir.path().join(f)).unwrap();
    }
    let key = dir.path().join("server-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    for side in SIDES {
        let mut s = start_with(side, &x509_args("require", dir.path()), &["memory", SIZE]);
        s.assert_serving_tls(&pki.client("client1"));
    }
}

impl TlsServing for Server {
    fn assert_serving_tls(&mut self, client: &Path) {
        assert!(
            connects(&x509_uri(self, client)),
            "stderr: {}",
            self.stderr()
        );
        self.assert_alive();
    }
}

trait TlsServing {
    /// A TLS client with the credentials in `client` is served.
    fn assert_serving_tls(&mut self, client: &Path);
}
