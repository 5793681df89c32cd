//! Small pipelined reads answered on the thread that read them (`transmit::inline_read`): from
//! a file whose pages are cached, one `preadv2(RWF_NOWAIT)` each, no hand-off to another
//! worker, and their replies sent together; from pages that are not cached, the non-blocking
//! read fails and the read runs as before, as does a read that comes alone. The bytes are the
//! file's either way, also right after a write through the server.
//!
//! The servers run under `strace -f`, so each test also sees which calls served the reads.

use crate::support;

use std::fs::File;
use std::os::fd::AsRawFd;

use sluice_proto::nbd::consts::{NBD_CMD_READ, NBD_OK};
use sluice_proto::nbd::request::encode_request;
use sluice_proto::nbd::RequestHeader;
use support::raw::RawClient;
use support::strace::{returned, Traced};
use support::{path_str, random_bytes};

const BLOCK: usize = 4096;
const BLOCKS: usize = 64;

/// A file of random bytes, written here (so its pages are in the page cache).
fn image() -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let data = random_bytes(BLOCK * BLOCKS, 0x1a11);
    std::fs::write(&path, &data).unwrap();
    (dir, path, data)
}

/// 4 KiB read requests of `blocks` (cookie = block), in one buffer.
fn reads(blocks: &[usize]) -> Vec<u8> {
    let mut v = Vec::new();
    for &b in blocks {
        let h = RequestHeader {
            flags: 0,
            kind: NBD_CMD_READ,
            cookie: b as u64,
            offset: (b * BLOCK) as u64,
            length: BLOCK as u64,
        };
        encode_request(&mut v, &h, false);
    }
    v
}

/// Sends reads of `blocks` in one write and checks each reply against `data`.
fn read_together(c: &mut RawClient, blocks: &[usize], data: &[u8]) {
    c.send(&reads(blocks));
    for _ in blocks {
        let cookie = match c.read_reply() {
            support::raw::Reply::Simple { error, cookie } if error == NBD_OK => cookie,
            r => panic!("expected a successful simple reply, got {r:?}"),
        };
        let b = cookie as usize;
        assert!(
            c.read_n(BLOCK) == data[b * BLOCK..(b + 1) * BLOCK],
            "block {b} differs from the file"
        );
    }
}

/// How many of strace's `lines` are calls that returned a whole block (the reads; the
/// dynamic loader's own `pread64` calls at start-up are a few hundred bytes).
fn block_reads<'a>(lines: impl IntoIterator<Item = &'a String>) -> usize {
    lines
        .into_iter()
        .filter(|l| returned(l) == Some(BLOCK as i64))
        .count()
}

#[test]
fn pipelined_reads_of_cached_pages_are_answered_inline_and_sent_together() {
    let (_dir, path, data) = image();
    let s = Traced::start(
        "preadv2,pread64,write,sendto",
        &[],
        &["file", path_str(&path)],
    );
    let (mut c, _) = RawClient::handshake(&s.server, false, false);
    // 32 reads in one write: the server reads all their headers at once.
    let n = 32;
    let blocks: Vec<usize> = (0..n).map(|i| 2 * i).collect();
    read_together(&mut c, &blocks, &data);
    drop(c);
    let nowait = s.server_lines_so_far("preadv2");
    let plain = s.server_lines_so_far("pread64");
    let mut writes = s.server_lines_so_far("write");
    let sent = s.finish("sendto");
    writes.extend(sent);
    let inline = block_reads(nowait.iter().filter(|l| l.contains("RWF_NOWAIT")));
    assert_eq!(inline, n, "reads answered inline: {nowait:?}");
    assert_eq!(
        block_reads(&plain),
        0,
        "reads that ran the usual way: {plain:?}"
    );
    // 32 replies of 4 KiB + 16 bytes: a few writes (64 KiB each at most), not 32.
    let reply = (BLOCK + 16) as i64;
    let reply_writes: Vec<i64> = writes
        .iter()
        .filter_map(|l| returned(l))
        .filter(|&r| r >= reply)
        .collect();
    assert_eq!(
        reply_writes.iter().sum::<i64>(),
        n as i64 * reply,
        "reply writes: {reply_writes:?}"
    );
    assert!(
        reply_writes.len() <= 4,
        "32 replies took {} writes: {reply_writes:?}",
        reply_writes.len()
    );
}

#[test]
fn reads_of_pages_not_cached_run_as_before_and_see_writes() {
    let (_dir, path, mut data) = image();
    let s = Traced::start("preadv2,pread64", &[], &["file", path_str(&path)]);
    let (mut c, _) = RawClient::handshake(&s.server, false, false);
    // Two reads sent together, of cached pages: both inline.
    read_together(&mut c, &[5, 6], &data);
    // Written through the server, then read inline: the new bytes.
    let new = random_bytes(BLOCK, 7);
    assert_eq!(c.simple_write(2, 9 * BLOCK as u64, &new), NBD_OK);
    data[9 * BLOCK..10 * BLOCK].copy_from_slice(&new);
    read_together(&mut c, &[9, 10], &data);
    // Dropped from the page cache (clean pages: synced first): the non-blocking read fails
    // and the reads are made as before, with the same bytes.
    let f = File::open(&path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: advice on an open descriptor; no memory is involved.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0);
    read_together(&mut c, &[20, 9], &data);
    // A read that comes alone (queue depth 1) runs as before, with no try.
    assert!(c.simple_read(3, 30 * BLOCK as u64, BLOCK as u32) == data[30 * BLOCK..31 * BLOCK]);
    drop(c);
    let nowait = s.server_lines_so_far("preadv2");
    let plain = s.finish("pread64");
    assert_eq!(block_reads(&nowait), 4, "reads answered inline: {nowait:?}");
    let eagain = nowait.iter().filter(|l| l.contains("EAGAIN")).count();
    assert!(
        (1..=2).contains(&eagain),
        "non-blocking reads of uncached pages: {nowait:?}"
    );
    assert_eq!(block_reads(&plain), 3, "{plain:?}");
}

/// Under a serializing thread model (the noparallel filter, which passes file ranges on) no
/// read is tried inline: the try would wait for the export's lock while holding the reader.
#[test]
fn no_inline_reads_when_requests_are_serialized() {
    let (_dir, path, data) = image();
    let s = Traced::start(
        "preadv2,pread64",
        &[],
        &["--filter=noparallel", "file", path_str(&path)],
    );
    let (mut c, _) = RawClient::handshake(&s.server, false, false);
    read_together(&mut c, &[1, 3, 5, 7], &data);
    drop(c);
    let nowait = s.server_lines_so_far("preadv2");
    let plain = s.finish("pread64");
    assert!(nowait.is_empty(), "reads tried inline: {nowait:?}");
    assert_eq!(block_reads(&plain), 4, "{plain:?}");
}
