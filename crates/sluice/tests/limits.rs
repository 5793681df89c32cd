//! Limits on clients: the handshake time limit (qsd's `handshake-max-seconds`, qemu-nbd's
//! `--handshake-limit`, `sluice serve --handshake-limit`) and the connection limit (qsd's
//! `max-connections`, `sluice serve --max-connections`). Each behaviour is checked on sluice
//! and, where qemu-storage-daemon has the same knob, on qsd with the same client bytes.
//! Memory: what large requests needed is given back once they are done.
//!
//! Silent and slow clients are raw sockets: real clients never stall on purpose.

use crate::support;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use support::qmp::QmpDaemon;
use support::{nbdinfo_json, nbdsh, path_str, NbdHolder, Server};

/// Connects, reads the 18-byte newstyle greeting, and returns the socket.
fn greeted(path: &Path) -> UnixStream {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[..8], b"NBDMAGIC");
    s
}

/// Waits (at most 30 s) until the server closes `s`, which must send nothing meanwhile;
/// returns the time since `since`.
fn time_until_closed(s: &mut UnixStream, since: Instant) -> Duration {
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => since.elapsed(),
        Ok(n) => panic!("server sent {n} bytes to a silent client"),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => since.elapsed(),
        Err(e) => panic!("server kept a silent client for 30 s: {e}"),
    }
}

/// Sends a client's handshake one byte every `gap`, for at most `total`; returns the time
/// until the server cut it, or None if it never did.
fn drip(s: &mut UnixStream, gap: Duration, total: Duration) -> Option<Duration> {
    let start = Instant::now();
    // Client flags (fixed newstyle, no zeroes), then NBD_OPT_GO for "" that never ends.
    let mut bytes = vec![0, 0, 0, 3];
    bytes.extend_from_slice(b"IHAVEOPT");
    bytes.extend_from_slice(&7u32.to_be_bytes());
    bytes.extend_from_slice(&1000u32.to_be_bytes());
    bytes.resize(1000, 0);
    for b in bytes {
        if start.elapsed() > total {
            return None;
        }
        if s.write_all(&[b]).is_err() {
            return Some(start.elapsed());
        }
        std::thread::sleep(gap);
    }
    None
}

/// An NBD server on `{dir}/nbd.sock` of a daemon, with a null-co node exported as "e", started with `extra` arguments merged into nbd-server-start.
fn daemon_with_export(d: &QmpDaemon, qsd: bool, extra: serde_json::Value) {
    let mut q = d.connect_negotiated();
    let node = json!({"driver": "null-co", "node-name": "n", "size": 1048576, "read-zeroes": true});
    assert_eq!(
        q.exec("blockdev-add", node),
        json!({"return": {}}),
        "qsd={qsd}"
    );
    let mut args = json!({"addr": {"type": "unix",
                          "data": {"path": path_str(&d.path("nbd.sock"))}}});
    for (k, v) in extra.as_object().unwrap() {
        args[k] = v.clone();
    }
    assert_eq!(q.exec("nbd-server-start", args), json!({"return": {}}));
    assert_eq!(
        q.exec(
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "n", "name": "e"})
        ),
        json!({"return": {}})
    );
}

#[test]
fn serve_handshake_limit_disconnects_silent_client() {
    let mut server = Server::start(&["--handshake-limit", "1", "memory", "1M"]);
    let start = Instant::now();
    let mut s = greeted(&server.socket);
    let t = time_until_closed(&mut s, start);
    assert!(
        t >= Duration::from_millis(900) && t < Duration::from_secs(4),
        "cut after {t:?}"
    );
    server.assert_serving("");
    assert!(server.stderr().is_empty() || !server.stderr().contains("panicked"));
}

#[test]
fn serve_handshake_limit_disconnects_client_dripping_bytes() {
    let mut server = Server::start(&["--handshake-limit", "1", "memory", "1M"]);
    let mut s = greeted(&server.socket);
    let cut = drip(&mut s, Duration::from_millis(100), Duration::from_secs(10));
    let cut = cut.expect("a client sending a byte every 100 ms kept negotiating for 10 s");
    assert!(cut < Duration::from_secs(4), "cut after {cut:?}");
    server.assert_serving("");
}

#[test]
fn serve_handshake_limit_spares_negotiated_clients() {
    let mut server = Server::start(&["--handshake-limit", "1", "memory", "1M"]);
    // Connected, then idle for twice the limit: transmission has no limit, as with qemu.
    let out = nbdsh(
        &server.uri(),
        "import time\nh = nbd.NBD()\nh.connect_uri(uri)\ntime.sleep(2.5)\nh.pwrite(b'x' * 512, 0)\nprint(bytes(h.pread(1, 0)))",
    );
    assert_eq!(out.trim(), "b'x'");
    server.assert_serving("");
}

#[test]
fn serve_handshake_limit_zero_means_no_limit() {
    let mut server = Server::start(&["--handshake-limit", "0", "memory", "1M"]);
    let mut s = greeted(&server.socket);
    s.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut b = [0u8; 1];
    let e = s.read(&mut b).expect_err("the server must keep waiting");
    assert!(matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut
    ));
    server.assert_serving("");
}

#[test]
fn daemon_handshake_max_seconds_disconnects_like_qsd() {
    for qsd in [false, true] {
        let d = if qsd {
            QmpDaemon::qsd(&[])
        } else {
            QmpDaemon::sluice(&[])
        };
        daemon_with_export(&d, qsd, json!({"handshake-max-seconds": 1}));
        let start = Instant::now();
        let mut s = greeted(&d.path("nbd.sock"));
        let t = time_until_closed(&mut s, start);
        let who = if qsd { "qsd" } else { "sluice" };
        assert!(
            t >= Duration::from_millis(900) && t < Duration::from_secs(4),
            "{who} cut after {t:?}"
        );
        // Negotiated clients stay.
        let out = nbdsh(
            &d.nbd_uri("e"),
            "import time\nh = nbd.NBD()\nh.connect_uri(uri)\ntime.sleep(1.5)\nprint(bytes(h.pread(1, 0)))",
        );
        assert_eq!(out.trim(), "b'\\x00'", "{who}");
    }
}

#[test]
fn daemon_default_handshake_limit_is_ten_seconds_like_qsd() {
    let daemons = [QmpDaemon::sluice(&[]), QmpDaemon::qsd(&[])];
    let mut socks = Vec::new();
    for (i, d) in daemons.iter().enumerate() {
        daemon_with_export(d, i == 1, json!({}));
        socks.push(greeted(&d.path("nbd.sock")));
    }
    let start = Instant::now();
    for (i, s) in socks.iter_mut().enumerate() {
        let t = time_until_closed(s, start);
        assert!(
            t >= Duration::from_secs(9) && t < Duration::from_secs(13),
            "{} cut after {t:?}",
            ["sluice", "qsd"][i]
        );
    }
}

/// A second client at the limit gets no greeting until the first leaves.
fn check_second_client_waits(path: &Path, uri: &str, who: &str) {
    let holder = NbdHolder::connect(uri, "");
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(1000)))
        .unwrap();
    let mut g = [0u8; 18];
    let e = s.read(&mut g).expect_err("greeted past max-connections");
    assert!(
        matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{who}: {e}"
    );
    assert_eq!(holder.release(), "read ok\n", "{who}");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.read_exact(&mut g)
        .unwrap_or_else(|e| panic!("{who}: no greeting after the first client left: {e}"));
    assert_eq!(&g[..8], b"NBDMAGIC", "{who}");
}

#[test]
fn serve_max_connections_makes_further_clients_wait() {
    let mut server = Server::start(&["--max-connections", "1", "memory", "1M"]);
    check_second_client_waits(&server.socket, &server.uri(), "sluice");
    server.assert_alive();
}

#[test]
fn daemon_max_connections_makes_further_clients_wait_like_qsd() {
    for qsd in [false, true] {
        let d = if qsd {
            QmpDaemon::qsd(&[])
        } else {
            QmpDaemon::sluice(&[])
        };
        daemon_with_export(&d, qsd, json!({"max-connections": 1}));
        let who = if qsd { "qsd" } else { "sluice" };
        check_second_client_waits(&d.path("nbd.sock"), &d.nbd_uri("e"), who);
    }
}

#[test]
fn max_connections_one_stops_advertising_multi_conn_like_qsd() {
    for (qsd, limit, want) in [
        (false, 1, false),
        (true, 1, false),
        (false, 2, true),
        (true, 2, true),
    ] {
        let d = if qsd {
            QmpDaemon::qsd(&[])
        } else {
            QmpDaemon::sluice(&[])
        };
        daemon_with_export(&d, qsd, json!({"max-connections": limit}));
        let info = nbdinfo_json(&[], &d.nbd_uri("e"));
        assert_eq!(
            info["exports"][0]["can_multi_conn"],
            json!(want),
            "qsd={qsd} max-connections={limit}"
        );
    }
    let server = Server::start(&["--max-connections", "1", "memory", "1M"]);
    let info = nbdinfo_json(&[], &server.uri());
    assert_eq!(info["exports"][0]["can_multi_conn"], json!(false));
}

/// A client that sends a write's payload a byte at a time holds only its own connection:
/// each connection has threads of its own (`sluice_server::nbd`), so others are served at
/// full speed meanwhile, and once the payload is complete the write is answered. The
/// transmission phase has no time limit, as with qemu and nbdkit (an idle qemu keeps its
/// connection for days); the handshake limit covers clients that never negotiate.
#[test]
fn serve_slow_request_holds_only_its_own_connection() {
    use support::raw::RawClient;
    let mut server = Server::start(&["memory", "1M"]);
    let (mut slow, _) = RawClient::handshake(&server, false, false);
    // NBD_CMD_WRITE of 64 bytes: the header now, the payload a byte at a time.
    slow.request(0, 1, 77, 4096, 64, &[]);
    let uri = server.uri();
    let other = std::thread::spawn(move || {
        let out = nbdsh(
            &uri,
            "h = nbd.NBD()\nh.connect_uri(uri)\nfor i in range(200):\n    \
             h.pwrite(b'y' * 4096, 65536)\n    h.pread(4096, 65536)\nprint('done')",
        );
        (out, Instant::now())
    });
    // 64 bytes at 10 a second: 6.4 s for one 64-byte write.
    for _ in 0..64 {
        slow.send(&[0x5a]);
        std::thread::sleep(Duration::from_millis(100));
    }
    let drip_done = Instant::now();
    let (out, other_done) = other.join().unwrap();
    assert_eq!(out.trim(), "done");
    assert!(
        other_done < drip_done,
        "the other client finished only after the slow one's payload"
    );
    assert_eq!(slow.simple_error(77), 0);
    assert_eq!(slow.simple_read(78, 4096, 64), vec![0x5a; 64]);
    server.assert_alive();
}

/// The resident memory of process `pid`, in MiB.
fn rss_mib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib / 1024
}

/// Memory that large requests needed goes back once they are done: eight clients at once
/// write and read 8 MiB requests (each connection's buffers on threads of its own), three
/// spells over, and the idle server then holds at most 40 MiB more than before (the 8 MiB
/// written, and slack). With glibc's default, which raises its mmap and trim thresholds
/// after the first large block is freed, the arenas kept the buffers: 76 MiB more
/// (`process::fix_malloc_thresholds` in the binary).
#[test]
fn serve_gives_back_the_memory_of_large_requests() {
    let mut server = Server::start(&["memory", "64M"]);
    std::thread::sleep(Duration::from_millis(200));
    let idle = rss_mib(server.pid());
    let script = "import threading\n\
def client(i):\n    \
    c = nbd.NBD()\n    \
    c.connect_uri(uri)\n    \
    for k in range(4):\n        \
        c.pwrite(bytes([i + 1]) * (8 << 20), 0)\n        \
        c.pread(8 << 20, 0)\n    \
    c.shutdown()\n\
for spell in range(3):\n    \
    ts = [threading.Thread(target=client, args=(i,)) for i in range(8)]\n    \
    [t.start() for t in ts]\n    \
    [t.join() for t in ts]\n\
print('done')";
    assert_eq!(nbdsh(&server.uri(), script).trim(), "done");
    // Connection threads end once their client has gone.
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_mib(server.pid());
    assert!(
        after <= idle + 40,
        "idle RSS {idle} MiB before, {after} MiB after the large requests"
    );
    server.assert_alive();
}
