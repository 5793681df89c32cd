//! The request path's fast paths, each checked for what it must keep: busy-polling before a
//! blocking read (`SLUICE_SPIN_US`) keeps data, order and end-of-input handling on every
//! thread model; connection threads kept warm between clients are really reused and never
//! carry one client's state into the next.

use crate::support;

use std::collections::BTreeSet;
use std::time::Duration;

use sluice_proto::nbd::consts::{
    NBD_CMD_DISC, NBD_CMD_READ, NBD_CMD_WRITE, NBD_FLAG_C_FIXED_NEWSTYLE,
};
use sluice_proto::nbd::request::encode_request;
use sluice_proto::nbd::RequestHeader;
use support::raw::RawClient;
use support::{random_bytes, sluice_bin, Server};

/// `sluice serve` with busy-polling on (50 µs).
fn spinning_server(args: &[&str]) -> Server {
    let leading = ["SLUICE_SPIN_US=50", sluice_bin(), "serve", "-f", "-U"];
    Server::try_start_program("env", &leading, args).expect("sluice with SLUICE_SPIN_US starts")
}

/// A compact request header (no payload), as bytes.
fn request(kind: u16, cookie: u64, offset: u64, length: u64) -> Vec<u8> {
    let mut req = Vec::new();
    let header = RequestHeader {
        flags: 0,
        kind,
        cookie,
        offset,
        length,
    };
    encode_request(&mut req, &header, false);
    req
}

/// The server's thread ids.
fn tids(server: &Server) -> BTreeSet<u32> {
    std::fs::read_dir(format!("/proc/{}/task", server.pid()))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap())
        .collect()
}

/// Writes, reads back and compares through libnbd, one request at a time (QD1) and then 16
/// in flight, so both the polling path and the blocking path are taken.
fn write_read_compare(server: &Server) {
    let script = r#"
h = nbd.NBD()
h.connect_uri(uri)
import random
rng = random.Random(7)
size = h.get_size()
model = bytearray(size)
for i in range(300):
    off = rng.randrange(0, size // 4096) * 4096
    data = bytes([rng.randrange(256)]) * 4096
    h.pwrite(data, off)
    model[off:off+4096] = data
    assert h.pread(4096, off) == data
bufs = []
for i in range(64):
    off = rng.randrange(0, size // 4096) * 4096
    buf = nbd.Buffer(4096)
    bufs.append((off, buf, h.aio_pread(buf, off)))
    while h.aio_in_flight() >= 16:
        h.poll(-1)
while h.aio_in_flight() > 0:
    h.poll(-1)
for off, buf, cookie in bufs:
    h.aio_command_completed(cookie)
    assert buf.to_bytearray() == model[off:off+4096], off
h.flush()
print("ok")
"#;
    let out = support::nbdsh(&server.uri(), script);
    assert_eq!(out.trim(), "ok", "nbdsh said: {out}");
}

#[test]
fn spin_memory_qd1_and_qd16_data_correct() {
    let mut server = spinning_server(&["memory", "size=16M"]);
    write_read_compare(&server);
    server.assert_alive();
    server.assert_no_panic();
}

#[test]
fn spin_file_parallel_data_correct() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk");
    std::fs::write(&path, vec![0u8; 16 << 20]).unwrap();
    let arg = format!("file={}", path.display());
    let mut server = spinning_server(&["file", &arg]);
    write_read_compare(&server);
    server.assert_alive();
    server.assert_no_panic();
}

#[test]
fn spin_header_split_across_pauses_is_assembled() {
    // A request header arriving in pieces with pauses longer than the polling budget: the
    // worker polls, misses, blocks, and must still assemble the header.
    let server = spinning_server(&["memory", "size=1M"]);
    let (mut c, _) = RawClient::handshake(&server, false, false);
    let data = random_bytes(4096, 3);
    assert_eq!(c.simple_write(1, 8192, &data), 0);
    let req = request(NBD_CMD_READ, 2, 8192, 4096);
    for piece in req.chunks(7) {
        c.send(piece);
        std::thread::sleep(Duration::from_millis(3));
    }
    let header = c.read_n(16);
    assert_eq!(&header[4..8], &[0, 0, 0, 0], "no error");
    assert_eq!(c.read_n(4096), data);
}

#[test]
fn spin_client_gone_mid_request_connection_ends_server_serves_others() {
    let mut server = spinning_server(&["memory", "size=1M"]);
    {
        let (mut c, _) = RawClient::handshake(&server, false, false);
        c.send(&[0x25, 0x60, 0x95, 0x13, 0, 0]);
        // Dropped with half a header sent.
    }
    write_read_compare(&server);
    server.assert_alive();
    server.assert_no_panic();
}

#[test]
fn pool_next_connection_runs_on_the_finished_connections_thread() {
    let server = Server::start(&["memory", "size=1M"]);
    // The first client's connection thread stays after it leaves (idle in the pool)...
    {
        let (mut c, _) = RawClient::handshake(&server, false, false);
        assert_eq!(c.simple_write(1, 0, &[7u8; 512]), 0);
    }
    std::thread::sleep(Duration::from_millis(200));
    let warm = tids(&server);
    // ...and the next client is served by it: no thread is created for it.
    let (mut c, _) = RawClient::handshake(&server, false, false);
    assert_eq!(c.simple_read(2, 0, 512), vec![7u8; 512]);
    assert_eq!(
        tids(&server),
        warm,
        "a new thread was started for the second client"
    );
}

#[test]
fn pool_many_sequential_clients_bounded_threads_each_sees_its_own_export() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["a", "b"] {
        std::fs::write(dir.path().join(name), name.repeat(4096)).unwrap();
    }
    let arg = format!("dir={}", dir.path().display());
    let server = Server::start(&["file", &arg]);
    let before = tids(&server).len();
    for i in 0..40 {
        let name = if i % 2 == 0 { "a" } else { "b" };
        let mut c = RawClient::connect_with_flags(&server, NBD_FLAG_C_FIXED_NEWSTYLE);
        c.go(name);
        assert_eq!(
            c.simple_read(1, 0, 16),
            name.repeat(16).into_bytes(),
            "client {i}"
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    let after = tids(&server).len();
    assert!(
        after <= before + 8,
        "{after} threads after 40 sequential clients ({before} before): idle threads not capped"
    );
}

/// A connection's first wait does not poll: a client that connects, negotiates and
/// disconnects (a health check, `nbdinfo`) costs no polling, while one that goes on sending
/// requests one at a time is polled for from its second request on.
#[test]
fn spin_not_for_a_connections_first_request() {
    let s = support::strace::Traced::start(
        "recvfrom",
        &["SLUICE_SPIN_US=1000"],
        &["memory", "size=1M"],
    );
    let disc = |c: &mut RawClient| {
        c.send(&request(NBD_CMD_DISC, 9, 0, 0));
        c.expect_closed();
    };
    for _ in 0..10 {
        let (mut c, _) = RawClient::handshake(&s.server, false, false);
        std::thread::sleep(Duration::from_millis(2));
        disc(&mut c);
    }
    let cycles = polls(&s.server_lines_so_far("recvfrom"));
    // One client that goes on: its later requests are polled for.
    let (mut c, _) = RawClient::handshake(&s.server, false, false);
    for i in 0..10 {
        assert_eq!(c.simple_read(i, 0, 512), vec![0u8; 512]);
    }
    disc(&mut c);
    let all = polls(&s.finish("recvfrom"));
    assert_eq!(
        cycles, 0,
        "the poller ran for connections that only negotiated"
    );
    assert!(all >= 5, "{all} polls for 10 requests sent one at a time");
}

/// A write's payload that arrives a moment after its header (libnbd sends them in two
/// writes) is polled for too: under strace, each payload is read by the poller's
/// non-blocking `recvfrom`, not by a blocking read after the thread went to sleep.
#[test]
fn spin_polls_for_a_write_payload_sent_after_its_header() {
    // A 1 ms budget: strace slows each poll, and the payload comes 300 µs after the header.
    let s = support::strace::Traced::start(
        "recvfrom",
        &["SLUICE_SPIN_US=1000"],
        &["memory", "size=1M"],
    );
    let server = &s.server;
    let (mut c, _) = RawClient::handshake(server, false, false);
    let writes = 20;
    for i in 0..writes {
        let data = vec![i as u8 + 1; 4096];
        c.send(&request(NBD_CMD_WRITE, i, i * 4096, 4096));
        std::thread::sleep(Duration::from_micros(300));
        c.send(&data);
        assert_eq!(c.simple_error(i), 0, "write {i}");
    }
    for i in 0..writes {
        assert_eq!(
            c.simple_read(100 + i, i * 4096, 4096),
            vec![i as u8 + 1; 4096]
        );
    }
    drop(c);
    let payloads = s
        .finish("recvfrom")
        .iter()
        .filter(|l| l.contains("MSG_DONTWAIT") && l.ends_with("= 4096"))
        .count();
    assert!(
        payloads >= writes as usize / 2,
        "{payloads} of {writes} payloads sent after their header were read by the poller"
    );
}

/// The busy-poller's reads in a strace log: the non-blocking `recvfrom` calls (the blocking
/// path reads with no flags).
fn polls(lines: &[String]) -> usize {
    lines.iter().filter(|l| l.contains("MSG_DONTWAIT")).count()
}

/// Busy-polling is on by default (50 µs) and off with `SLUICE_SPIN_US=0`: under strace, a
/// client's one-at-a-time requests are read by the poller's non-blocking reads in the first
/// case only. The data stays right either way.
#[test]
fn spin_is_on_by_default_and_off_with_zero() {
    let run = |env: &str| {
        let s = support::strace::Traced::start("recvfrom", &[env], &["memory", "size=16M"]);
        let script = r#"
h = nbd.NBD()
h.connect_uri(uri)
for i in range(50):
    h.pwrite(bytes([i]) * 4096, i * 4096)
    assert h.pread(4096, i * 4096) == bytes([i]) * 4096
print("ok")
"#;
        let out = support::nbdsh(&s.uri(), script);
        assert_eq!(out.trim(), "ok", "nbdsh said: {out}");
        polls(&s.finish("recvfrom"))
    };
    let default = run("SLUICE_SPIN_US");
    assert!(
        default >= 50,
        "by default the server should poll before blocking: {default} polls in 100 requests"
    );
    assert_eq!(
        run("SLUICE_SPIN_US=0"),
        0,
        "SLUICE_SPIN_US=0 turns polling off"
    );
}
