//! NBD protocol corner cases driven with raw bytes over the Unix socket: malformed and hostile
//! input in both phases, limits, and the exact bytes of the parts of the protocol that real
//! clients never exercise. Every test also checks that the server survives (it keeps serving
//! other clients) and never panicked.

use crate::support;

use std::io::Read;

use sluice_proto::nbd::consts::*;
use support::raw::{
    assemble_read, be16, be32, be64, export_info, info_payload, OptReply, RawClient, Reply,
};
use support::Server;

const MIB: u64 = 1024 * 1024;
const FIXED_NO_ZEROES: u32 = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

fn memory_server() -> Server {
    Server::start(&["memory", "size=64M"])
}

/// A `file dir=` server over a temporary directory holding `disk1` (1 MiB).
fn dir_server() -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("disk1"), vec![0u8; MIB as usize]).unwrap();
    let arg = format!("dir={}", dir.path().display());
    (Server::start(&["file", &arg]), dir)
}

/// Peak virtual memory of a process, in bytes.
fn vm_peak(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmPeak:"))
        .expect("VmPeak in /proc/PID/status");
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmPeak value");
    kb * 1024
}

#[test]
fn greeting_on_connect_is_nbdmagic_ihaveopt_flags_3() {
    let mut server = memory_server();
    let (_c, greeting) = RawClient::connect_greeted(&server);
    let mut expected = Vec::new();
    expected.extend_from_slice(b"NBDMAGIC");
    expected.extend_from_slice(b"IHAVEOPT");
    expected.extend_from_slice(&[0, 3]);
    assert_eq!(greeting.to_vec(), expected);
    server.assert_serving("");
}

#[test]
fn client_flags_unknown_bits_connection_closed_server_serves_others() {
    let mut server = memory_server();
    let mut c = RawClient::connect_with_flags(&server, 0xdead_beef);
    c.expect_eof_now();
    server.assert_serving("");
}

#[test]
fn option_magic_wrong_connection_closed_server_serves_others() {
    let mut server = memory_server();
    let mut c = RawClient::connect_with_flags(&server, FIXED_NO_ZEROES);
    let mut opt = Vec::new();
    opt.extend_from_slice(b"IHAVEOPX");
    opt.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
    opt.extend_from_slice(&0u32.to_be_bytes());
    c.send(&opt);
    c.expect_eof_now();
    server.assert_serving("");
}

#[test]
fn client_disconnect_mid_option_others_unaffected() {
    let mut server = memory_server();
    let mut c = RawClient::connect_with_flags(&server, FIXED_NO_ZEROES);
    c.send(&IHAVEOPT.to_be_bytes()[..3]);
    drop(c);
    server.assert_serving("");
    // A client that stops before even sending its flags.
    let (c, _) = RawClient::connect_greeted(&server);
    drop(c);
    server.assert_serving("");
}

#[test]
fn client_disconnect_mid_request_header_others_unaffected() {
    let mut server = memory_server();
    let (mut c, _) = RawClient::handshake(&server, false, false);
    let mut header = Vec::new();
    sluice_proto::nbd::request::encode_request(
        &mut header,
        &sluice_proto::nbd::RequestHeader {
            flags: 0,
            kind: NBD_CMD_READ,
            cookie: 1,
            offset: 0,
            length: 512,
        },
        false,
    );
    c.send(&header[..14]);
    drop(c);
    server.assert_serving("");
}

#[test]
fn client_disconnect_mid_write_payload_others_unaffected() {
    let mut server = memory_server();
    let (mut c, _) = RawClient::handshake(&server, false, false);
    let payload = vec![0x5a; 1000];
    c.request(0, NBD_CMD_WRITE, 1, 0, 65536, &payload);
    drop(c);
    server.assert_serving("");
    // The torn write did not land (the server only writes whole payloads).
    let (mut c, _) = RawClient::handshake(&server, false, false);
    assert_eq!(c.simple_read(2, 0, 1000), vec![0u8; 1000]);
}

#[test]
fn option_unknown_replies_unsup_then_go_succeeds() {
    let mut server = memory_server();
    let mut c = RawClient::connect_with_flags(&server, FIXED_NO_ZEROES);
    let r = c.option(999, b"some data the server must skip");
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].option, 999);
    assert_eq!(r[0].kind, NBD_REP_ERR_UNSUP);
    let (size, _) = c.go("");
    assert_eq!(size, 64 * MIB);
    assert_eq!(c.simple_write(1, 0, b"after unsup"), NBD_OK);
    assert_eq!(c.simple_read(2, 0, 11), b"after unsup");
    server.assert_serving("");
}

#[test]
fn info_missing_export_dir_replies_err_unknown() {
    let (mut server, _dir) = dir_server();
    let mut c = RawClient::connect_with_flags(&server, FIXED_NO_ZEROES);
    let r = c.option(NBD_OPT_INFO, &info_payload(b"no-such-disk", &[]));
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(
        (r[0].option, r[0].kind),
        (NBD_OPT_INFO, NBD_REP_ERR_UNKNOWN)
    );
    // Negotiation goes on: INFO on an export that exists works on the same connection.
    let r = c.option(NBD_OPT_INFO, &info_payload(b"disk1", &[]));
    assert_eq!(r.last().unwrap().kind, NBD_REP_ACK, "{r:?}");
    assert_eq!(export_info(&r).unwrap().0, MIB);
    server.assert_serving("disk1");
}

#[test]
fn go_missing_export_dir_replies_err_unknown_then_go_succeeds() {
    let (mut server, _dir) = dir_server();
    let mut c = RawClient::connect_with_flags(&server, FIXED_NO_ZEROES);
    let r = c.option(NBD_OPT_GO, &info_payload(b"no-such-disk", &[]));
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!((r[0].option, r[0].kind), (NBD_OPT_GO, NBD_REP_ERR_UNKNOWN));
    let (size, _) = c.go("disk1");
    assert_eq!(size, MIB);
    assert_eq!(c.simple_read(1, 0, 16), vec![0u8; 16]);
    server.assert_serving("disk1");
}

#[test]
fn go_empty_name_dir_replies_err_unknown() {
    let (mut server, _dir) = dir_server();
    let mut c = RawClient::connect_with_flags(&server, FIXED_NO_ZEROES);
    let r = c.option(NBD_OPT_GO, &info_payload(b"", &[]));
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!((r[0].option, r[0].kind), (NBD_OPT_GO, NBD_REP_ERR_UNKNOWN));
    server.assert_serving("disk1");
}

#[test]
fn go_export_name_4097_bytes_replies_err_invalid_then_go_succeeds() {
    let mut server = memory_server();
    let mut c = RawClient::connect_with_flags(&server, FIXED_NO_ZEROES);
    let name = vec![b'a'; 4097];
    let r = c.option(NBD_OPT_GO, &info_payload(&name, &[]));
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!((r[0].option, r[0].kind), (NBD_OPT_GO, NBD_REP_ERR_INVALID));
    c.go("");
    assert_eq!(c.simple_read(1, 0, 8), vec![0u8; 8]);
    server.assert_serving("");
}

#[test]
fn export_name_option_4097_bytes_connection_closed() {
    let mut server = memory_server();
    let mut c = RawClient::connect_with_flags(&server, FIXED_NO_ZEROES);
    // NBD_OPT_EXPORT_NAME has no error reply: the spec leaves only a hard disconnect.
    c.send_option(NBD_OPT_EXPORT_NAME, &vec![b'a'; 4097]);
    c.expect_eof_now();
    server.assert_serving("");
}

#[test]
fn option_length_2_pow_31_replies_too_big_without_allocating() {
    let mut server = memory_server();
    let before = vm_peak(server.pid());
    let mut c = RawClient::connect_with_flags(&server, FIXED_NO_ZEROES);
    let mut opt = Vec::new();
    opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&NBD_OPT_INFO.to_be_bytes());
    opt.extend_from_slice(&(1u32 << 31).to_be_bytes());
    c.send(&opt);
    let r = c.read_opt_reply();
    assert_eq!((r.option, r.kind), (NBD_OPT_INFO, NBD_REP_ERR_TOO_BIG));
    // Some of the claimed data arrives; the server drops it as it comes.
    c.send(&vec![0x42; 4 * MIB as usize]);
    server.assert_serving("");
    let after = vm_peak(server.pid());
    assert!(
        after < before + 1024 * MIB,
        "server address space grew from {before} to {after} bytes for a 2 GiB option"
    );
    drop(c);
    server.assert_serving("");
}

#[test]
fn request_bad_magic_connection_closed_server_alive() {
    let mut server = memory_server();
    let (mut c, _) = RawClient::handshake(&server, false, false);
    let mut garbage = vec![0xffu8; 28];
    garbage[..4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    c.send(&garbage);
    c.expect_eof_now();
    server.assert_serving("");
}

#[test]
fn read_over_32_mib_replies_einval_connection_usable() {
    let mut server = memory_server();
    let (mut c, _) = RawClient::handshake(&server, false, false);
    c.request(0, NBD_CMD_READ, 7, 0, 32 * MIB + 1, &[]);
    assert_eq!(c.simple_error(7), NBD_EINVAL);
    assert_eq!(c.simple_write(8, 4096, b"still in sync"), NBD_OK);
    assert_eq!(c.simple_read(9, 4096, 13), b"still in sync");
    server.assert_serving("");
}

#[test]
fn read_over_32_mib_structured_replies_einval_error_chunk() {
    let mut server = memory_server();
    let (mut c, _) = RawClient::handshake(&server, true, false);
    c.request(0, NBD_CMD_READ, 7, 0, 33 * MIB, &[]);
    let chunks = c.read_chunks(7);
    assert_eq!(chunks.len(), 1, "{chunks:?}");
    let Reply::Chunk { kind, flags, .. } = &chunks[0] else {
        panic!("structured read answered with a simple reply: {chunks:?}");
    };
    assert_eq!(*kind, NBD_REPLY_TYPE_ERROR);
    assert_eq!(*flags, NBD_REPLY_FLAG_DONE);
    assert_eq!(chunks[0].error(), NBD_EINVAL);
    c.request(0, NBD_CMD_READ, 8, 0, 512, &[]);
    assert_eq!(assemble_read(&c.read_chunks(8), 0, 512), vec![0u8; 512]);
    server.assert_serving("");
}

#[test]
fn write_payload_48_mib_replies_einval_connection_in_sync() {
    let mut server = memory_server();
    let (mut c, _) = RawClient::handshake(&server, false, false);
    let len = 48 * MIB as usize;
    let payload = vec![0x77u8; len];
    c.request(0, NBD_CMD_WRITE, 1, 0, len as u64, &payload);
    assert_eq!(c.simple_error(1), NBD_EINVAL);
    // Nothing of the refused write landed, and the next request is parsed as a request.
    assert_eq!(c.simple_read(2, 0, 4096), vec![0u8; 4096]);
    assert_eq!(c.simple_write(3, 0, b"next"), NBD_OK);
    assert_eq!(c.simple_read(4, 0, 4), b"next");
    server.assert_serving("");
}

#[test]
fn write_extended_length_2_pow_40_connection_closed_server_alive() {
    let mut server = memory_server();
    let (mut c, n) = RawClient::handshake(&server, true, true);
    assert!(n.extended);
    c.request(
        NBD_CMD_FLAG_PAYLOAD_LEN,
        NBD_CMD_WRITE,
        1,
        0,
        1 << 40,
        &[0u8; 4096],
    );
    c.expect_closed();
    server.assert_serving("");
}

#[test]
fn command_unknown_type_replies_einval() {
    let mut server = memory_server();
    let (mut c, _) = RawClient::handshake(&server, false, false);
    for (cookie, kind) in [(1u64, 100u16), (2, NBD_CMD_RESIZE), (3, 0xffff)] {
        c.request(0, kind, cookie, 0, 512, &[]);
        assert_eq!(c.simple_error(cookie), NBD_EINVAL, "command {kind}");
    }
    assert_eq!(c.simple_read(4, 0, 512), vec![0u8; 512]);
    server.assert_serving("");
}

#[test]
fn command_unknown_flags_replies_einval() {
    let mut server = memory_server();
    let (mut c, _) = RawClient::handshake(&server, false, false);
    c.request(1 << 15, NBD_CMD_READ, 1, 0, 512, &[]);
    assert_eq!(c.simple_error(1), NBD_EINVAL);
    c.request(1 << 9, NBD_CMD_FLUSH, 2, 0, 0, &[]);
    assert_eq!(c.simple_error(2), NBD_EINVAL);
    // A write with a bad flag still carries its payload, which the server must consume.
    c.request(1 << 14, NBD_CMD_WRITE, 3, 0, 4, b"nope");
    assert_eq!(c.simple_error(3), NBD_EINVAL);
    assert_eq!(c.simple_read(4, 0, 4), vec![0u8; 4]);
    server.assert_serving("");
}

#[test]
fn command_flag_df_without_structured_replies_einval() {
    let mut server = memory_server();
    let (mut c, n) = RawClient::handshake(&server, false, false);
    assert_eq!(
        n.flags & NBD_FLAG_SEND_DF,
        0,
        "DF offered without structured replies"
    );
    c.request(NBD_CMD_FLAG_DF, NBD_CMD_READ, 1, 0, 512, &[]);
    assert_eq!(c.simple_error(1), NBD_EINVAL);
    server.assert_serving("");
}

#[test]
fn block_status_without_meta_context_replies_einval() {
    let mut server = memory_server();
    let (mut c, _) = RawClient::handshake(&server, false, false);
    c.request(0, NBD_CMD_BLOCK_STATUS, 1, 0, 4096, &[]);
    assert_eq!(c.simple_error(1), NBD_EINVAL);
    assert_eq!(c.simple_read(2, 0, 16), vec![0u8; 16]);
    server.assert_serving("");
}

#[test]
fn disc_after_pipelined_requests_replies_then_closes() {
    let mut server = memory_server();
    let (mut c, _) = RawClient::handshake(&server, false, false);
    // One send: the server has all four requests before it answers any.
    let mut bytes = Vec::new();
    let mut req = |flags, kind, cookie, offset, length: u64, payload: &[u8]| {
        sluice_proto::nbd::request::encode_request(
            &mut bytes,
            &sluice_proto::nbd::RequestHeader {
                flags,
                kind,
                cookie,
                offset,
                length,
            },
            false,
        );
        bytes.extend_from_slice(payload);
    };
    req(0, NBD_CMD_WRITE, 1, 0, 4096, &[0x11; 4096]);
    req(0, NBD_CMD_READ, 2, 8192, 4096, &[]);
    req(0, NBD_CMD_FLUSH, 3, 0, 0, &[]);
    req(0, NBD_CMD_DISC, 4, 0, 0, &[]);
    c.send(&bytes);
    let mut seen = Vec::new();
    for _ in 0..3 {
        let cookie = match c.read_reply() {
            Reply::Simple { error, cookie } => {
                assert_eq!(error, NBD_OK, "request {cookie}");
                cookie
            }
            r => panic!("simple reply expected: {r:?}"),
        };
        if cookie == 2 {
            assert_eq!(c.read_n(4096), vec![0u8; 4096]);
        }
        seen.push(cookie);
    }
    seen.sort();
    assert_eq!(seen, vec![1, 2, 3], "NBD_CMD_DISC must get no reply");
    c.expect_eof_now();
    // The write before DISC was done.
    let (mut c, _) = RawClient::handshake(&server, false, false);
    assert_eq!(c.simple_read(5, 0, 4096), vec![0x11; 4096]);
    server.assert_serving("");
}

#[test]
fn export_name_without_no_zeroes_sends_124_zero_bytes() {
    let mut server = memory_server();
    let mut c = RawClient::connect_with_flags(&server, NBD_FLAG_C_FIXED_NEWSTYLE);
    c.send_option(NBD_OPT_EXPORT_NAME, b"");
    let reply = c.read_n(8 + 2 + 124);
    assert_eq!(be64(&reply[0..8]), 64 * MIB);
    let flags = be16(&reply[8..10]);
    assert_ne!(flags & NBD_FLAG_HAS_FLAGS, 0);
    assert_eq!(flags & NBD_FLAG_READ_ONLY, 0);
    assert_eq!(reply[10..], [0u8; 124]);
    // The next bytes are the reply to the first request, not more padding.
    assert_eq!(c.simple_write(1, 0, b"abc"), NBD_OK);
    assert_eq!(c.simple_read(2, 0, 3), b"abc");
    server.assert_serving("");
}

#[test]
fn export_name_with_no_zeroes_sends_no_padding() {
    let mut server = memory_server();
    let mut c = RawClient::connect_with_flags(&server, FIXED_NO_ZEROES);
    c.send_option(NBD_OPT_EXPORT_NAME, b"");
    let reply = c.read_n(8 + 2);
    assert_eq!(be64(&reply[0..8]), 64 * MIB);
    assert_eq!(c.simple_read(1, 0, 3), vec![0u8; 3]);
    server.assert_serving("");
}

#[test]
fn extended_headers_write_read_block_status_succeed() {
    let mut server = memory_server();
    let (mut c, n) = RawClient::handshake(&server, true, true);
    let context = n.base_allocation.expect("base:allocation selected");
    // The spec: with extended headers NBD_CMD_FLAG_PAYLOAD_LEN MUST be set on writes.
    let data = vec![0xabu8; 4096];
    c.request(NBD_CMD_FLAG_PAYLOAD_LEN, NBD_CMD_WRITE, 1, MIB, 4096, &data);
    let r = c.read_chunks(1);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].error(), NBD_OK, "extended write failed: {r:?}");
    assert!(matches!(
        r[0],
        Reply::Chunk {
            kind: NBD_REPLY_TYPE_NONE,
            offset: Some(o),
            ..
        } if o == MIB
    ));

    c.request(0, NBD_CMD_READ, 2, MIB, 4096, &[]);
    let chunks = c.read_chunks(2);
    assert_eq!(assemble_read(&chunks, MIB, 4096), data);

    c.request(0, NBD_CMD_BLOCK_STATUS, 3, 0, 2 * MIB, &[]);
    let chunks = c.read_chunks(3);
    assert_eq!(chunks.len(), 1, "{chunks:?}");
    let Reply::Chunk { kind, payload, .. } = &chunks[0] else {
        panic!("simple reply to block status: {chunks:?}");
    };
    assert_eq!(*kind, NBD_REPLY_TYPE_BLOCK_STATUS_EXT);
    assert_eq!(be32(&payload[0..4]), context);
    let count = be32(&payload[4..8]) as usize;
    let extents: Vec<(u64, u64)> = (0..count)
        .map(|i| {
            let e = &payload[8 + 16 * i..];
            (be64(&e[0..8]), be64(&e[8..16]))
        })
        .collect();
    // 32 KiB memory pages: a hole up to the written page, the page, a hole after it.
    let hole = u64::from(NBD_STATE_HOLE | NBD_STATE_ZERO);
    assert_eq!(
        extents,
        vec![(MIB, hole), (32768, 0), (MIB - 32768, hole)],
        "block status extents"
    );
    server.assert_serving("");
}

#[test]
fn extended_write_without_payload_len_carries_payload_succeeds() {
    // The spec says writes MUST set NBD_CMD_FLAG_PAYLOAD_LEN under extended headers, but
    // qemu 10 omits it and qemu's server still reads `length` bytes: sluice does the same.
    let mut server = memory_server();
    let (mut c, _) = RawClient::handshake(&server, true, true);
    c.request(0, NBD_CMD_WRITE, 1, 0, 512, &[0x3c; 512]);
    let r = c.read_chunks(1);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].error(), NBD_OK, "{r:?}");
    c.request(0, NBD_CMD_READ, 2, 0, 512, &[]);
    assert_eq!(assemble_read(&c.read_chunks(2), 0, 512), vec![0x3c; 512]);
    server.assert_serving("");
}

#[test]
fn extended_read_with_payload_len_replies_einval_payload_skipped() {
    let mut server = memory_server();
    let (mut c, _) = RawClient::handshake(&server, true, true);
    // A payload on a command that takes none: the spec says EINVAL, and the length tells
    // the server how much to skip to stay in sync.
    c.request(
        NBD_CMD_FLAG_PAYLOAD_LEN,
        NBD_CMD_READ,
        1,
        0,
        64,
        &[0x99; 64],
    );
    let r = c.read_chunks(1);
    assert_eq!(r.last().unwrap().error(), NBD_EINVAL, "{r:?}");
    c.request(0, NBD_CMD_READ, 2, 0, 512, &[]);
    assert_eq!(assemble_read(&c.read_chunks(2), 0, 512), vec![0u8; 512]);
    server.assert_serving("");
}

#[test]
fn compact_request_after_extended_headers_connection_closed() {
    let mut server = memory_server();
    let (mut c, _) = RawClient::handshake(&server, true, true);
    c.extended = false;
    c.request(0, NBD_CMD_READ, 1, 0, 512, &[]);
    c.expect_eof_now();
    server.assert_serving("");
}

#[test]
fn list_dir_replies_server_per_file_then_ack() {
    let (mut server, dir) = dir_server();
    std::fs::write(dir.path().join("disk2"), [0u8; 512]).unwrap();
    std::fs::create_dir(dir.path().join("subdir")).unwrap();
    let mut c = RawClient::connect_with_flags(&server, FIXED_NO_ZEROES);
    let r = c.option(NBD_OPT_LIST, &[]);
    let names: Vec<String> = r
        .iter()
        .filter(|r| r.kind == NBD_REP_SERVER)
        .map(|r| {
            let len = be32(&r.data[0..4]) as usize;
            String::from_utf8(r.data[4..4 + len].to_vec()).unwrap()
        })
        .collect();
    assert_eq!(names, vec!["disk1", "disk2"]);
    assert_eq!(
        r.last().unwrap(),
        &OptReply {
            option: NBD_OPT_LIST,
            kind: NBD_REP_ACK,
            data: vec![]
        }
    );
    server.assert_serving("disk2");
}

#[test]
fn abort_option_acked_then_closed() {
    let mut server = memory_server();
    let mut c = RawClient::connect_with_flags(&server, FIXED_NO_ZEROES);
    c.option_ack(NBD_OPT_ABORT);
    let mut rest = Vec::new();
    c.sock.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "bytes after the ABORT ack: {rest:02x?}");
    server.assert_serving("");
}

#[test]
fn option_over_64_kib_replies_too_big_then_go_succeeds() {
    let mut server = memory_server();
    let mut c = RawClient::connect_with_flags(&server, FIXED_NO_ZEROES);
    // Sent in full: the server skips exactly the claimed length and reads the next option.
    let r = c.option(NBD_OPT_INFO, &vec![0x61; 128 * 1024]);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(
        (r[0].option, r[0].kind),
        (NBD_OPT_INFO, NBD_REP_ERR_TOO_BIG)
    );
    c.go("");
    assert_eq!(c.simple_read(1, 0, 8), vec![0u8; 8]);
    server.assert_serving("");
}

#[test]
fn client_stalled_mid_handshake_others_served() {
    let mut server = memory_server();
    let mut stalled = RawClient::connect_with_flags(&server, FIXED_NO_ZEROES);
    stalled.send(&IHAVEOPT.to_be_bytes());
    let (idle, _) = RawClient::connect_greeted(&server);
    server.assert_serving("");
    // The stalled client can still finish.
    stalled.send(&NBD_OPT_GO.to_be_bytes());
    let payload = info_payload(b"", &[]);
    stalled.send(&(payload.len() as u32).to_be_bytes());
    stalled.send(&payload);
    let r = stalled.read_opt_replies();
    assert_eq!(r.last().unwrap().kind, NBD_REP_ACK, "{r:?}");
    drop(idle);
    server.assert_serving("");
}

#[test]
fn export_name_with_request_in_same_write_served() {
    let mut server = memory_server();
    let mut c = RawClient::connect_with_flags(&server, FIXED_NO_ZEROES);
    // The last option and the first request arrive together: the request bytes read with the
    // handshake must start the transmission phase.
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
    bytes.extend_from_slice(&NBD_OPT_EXPORT_NAME.to_be_bytes());
    bytes.extend_from_slice(&0u32.to_be_bytes());
    sluice_proto::nbd::request::encode_request(
        &mut bytes,
        &sluice_proto::nbd::RequestHeader {
            flags: 0,
            kind: NBD_CMD_WRITE,
            cookie: 1,
            offset: 0,
            length: 5,
        },
        false,
    );
    bytes.extend_from_slice(b"early");
    c.send(&bytes);
    assert_eq!(be64(&c.read_n(10)), 64 * MIB);
    assert_eq!(c.simple_error(1), NBD_OK);
    assert_eq!(c.simple_read(2, 0, 5), b"early");
    server.assert_serving("");
}

#[test]
fn extended_read_over_4_gib_replies_einval_connection_usable() {
    let mut server = memory_server();
    let (mut c, _) = RawClient::handshake(&server, true, true);
    c.request(0, NBD_CMD_READ, 1, 0, 1 << 33, &[]);
    let r = c.read_chunks(1);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].error(), NBD_EINVAL);
    c.request(0, NBD_CMD_READ, 2, 0, 512, &[]);
    assert_eq!(assemble_read(&c.read_chunks(2), 0, 512), vec![0u8; 512]);
    server.assert_serving("");
}

#[test]
fn request_offset_plus_length_overflowing_replies_einval() {
    let mut server = memory_server();
    let (mut c, _) = RawClient::handshake(&server, false, false);
    c.request(0, NBD_CMD_READ, 1, u64::MAX - 10, 512, &[]);
    assert_eq!(c.simple_error(1), NBD_EINVAL);
    c.request(0, NBD_CMD_WRITE, 2, u64::MAX - 10, 512, &[0xee; 512]);
    assert_eq!(c.simple_error(2), NBD_EINVAL);
    c.request(0, NBD_CMD_TRIM, 3, u64::MAX, 1, &[]);
    assert_eq!(c.simple_error(3), NBD_EINVAL);
    assert_eq!(c.simple_read(4, 64 * MIB - 512, 512), vec![0u8; 512]);
    server.assert_serving("");
}
