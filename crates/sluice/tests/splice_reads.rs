//! Zero-copy read replies (`splice(2)` from a file to the socket): the bytes a client gets are
//! the file's, in every reply form, through the filters that pass a file range on (cow, cache)
//! and not through those that change bytes; and splice is really what sends them.
//!
//! The servers run under `strace -f -e trace=splice`, so each test also sees whether reads
//! were spliced, and from which files (a cow or cache read comes from the plugin's file or
//! from the overlay's). Reads are made with libnbd 1.14, with structured replies and without,
//! and with qemu-io (qemu 10 negotiates extended headers, so its replies are the extended
//! OFFSET_DATA chunk); they cover a read larger than the 1 MiB pipe, unaligned reads and reads
//! that end at the (unaligned) end of the export.

use crate::support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use support::strace::{returned, Traced};
use support::{path_str, random_bytes, run, PYTHON};

/// The export: 5 MiB and a bit, so that its end is not block-aligned.
const SIZE: usize = 5 * 1024 * 1024 + 12_345;

/// The descriptors that file-to-pipe splices at one of `offsets` read from (a file splice
/// names its offset: `splice(FD, [OFFSET], ...)`; a pipe-to-socket one has `NULL` there).
/// Each connection opens the plugin's file anew, so a file can have several.
fn spliced_files(lines: &[String], offsets: &[usize]) -> BTreeSet<u32> {
    lines
        .iter()
        .filter_map(|l| {
            let (fd, rest) = l.strip_prefix("splice(")?.split_once(", [")?;
            let (off, _) = rest.split_once(']')?;
            offsets
                .contains(&off.parse().ok()?)
                .then(|| fd.parse().ok())
                .flatten()
        })
        .collect()
}

/// Asserts that reads at `plugin` offsets and reads at `overlay` offsets were spliced, and
/// from different files.
#[track_caller]
fn assert_two_sources(lines: &[String], plugin: &[usize], overlay: &[usize]) {
    let below = spliced_files(lines, plugin);
    let own = spliced_files(lines, overlay);
    assert!(
        !below.is_empty() && !own.is_empty(),
        "{below:?} {own:?}: {lines:?}"
    );
    assert!(below.is_disjoint(&own), "{below:?} {own:?}: {lines:?}");
}

/// Bytes spliced into sockets that succeeded: the sum of the results of pipe-to-socket
/// splices.
fn spliced_out(lines: &[String]) -> u64 {
    lines
        .iter()
        .filter(|l| l.contains(", NULL, ") && !l.contains("SPLICE_F_NONBLOCK"))
        .filter_map(|l| u64::try_from(returned(l)?).ok())
        .sum()
}

/// A fresh copy of the pattern in the test's directory.
fn pattern_file(dir: &Path) -> PathBuf {
    let path = dir.join("disk.img");
    std::fs::write(&path, random_bytes(SIZE, 13)).unwrap();
    path
}

/// Reads that every test makes, `(offset, length)`: larger than the pipe, unaligned, ending
/// at the end of the export, small (read as before), and one block-aligned.
fn ranges() -> Vec<(usize, usize)> {
    vec![
        (0, 3 * 1024 * 1024 + 4097),
        (12_345, 200_001),
        (SIZE - 100_000, 100_000),
        (SIZE - 40_000, 40_000),
        (65_536, 65_536),
        (1_048_576 + 7, 1_048_576),
        (100, 1_000),
    ]
}

/// Makes the `writes` `(offset, byte, length)` on `uri` with libnbd, then reads every range
/// of [`ranges`] and of `more` with structured replies and again without, and compares each
/// with the expected bytes: the file `expected` with the same writes applied.
fn write_then_compare(
    uri: &str,
    expected: &Path,
    writes: &[(usize, u8, usize)],
    more: &[(usize, usize)],
) {
    let script = format!(
        r#"
import nbd
model = bytearray(open({expected:?}, 'rb').read())
writes = {writes:?}
ranges = {ranges:?}
h = nbd.NBD()
h.connect_uri({uri:?})
for off, byte, n in writes:
    h.pwrite(bytes([byte]) * n, off)
    model[off:off + n] = bytes([byte]) * n
h.flush()
for structured in (True, False):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.connect_uri({uri:?})
    assert h.get_structured_replies_negotiated() == structured
    assert h.get_size() == len(model)
    for off, n in ranges:
        got = h.pread(n, off)
        assert got == model[off:off + n], (structured, off, n)
    h.shutdown()
print("ok")
"#,
        expected = path_str(expected),
        ranges = [ranges(), more.to_vec()].concat(),
    );
    assert_eq!(run(PYTHON, &["-c", &script]), "ok\n");
}

#[test]
fn splice_file_reads_are_the_files_bytes_in_both_reply_forms() {
    let dir = tempfile::tempdir().unwrap();
    let img = pattern_file(dir.path());
    let s = Traced::start("splice", &[], &["file", path_str(&img)]);
    write_then_compare(&s.uri(), &img, &[], &[]);
    // qemu-io (structured replies) reads the same bytes back.
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 131072 196608",
            &s.server.qemu_uri(),
        ],
    );
    assert!(out.contains("wrote 196608/196608"), "{out}");
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x5a 131072 196608",
            &s.server.qemu_uri(),
        ],
    );
    assert!(out.contains("read 196608/196608"), "{out}");
    let lines = s.finish("splice");
    // Every read of 32 KiB or more went out spliced: twice the six large ranges, and qemu-io's.
    let large: u64 = ranges()
        .iter()
        .filter(|r| r.1 >= 32 * 1024)
        .map(|r| r.1 as u64)
        .sum();
    assert_eq!(spliced_out(&lines), 2 * large + 196_608, "{lines:?}");
}

#[test]
fn splice_cow_reads_come_from_the_plugin_and_the_overlay_and_match() {
    let dir = tempfile::tempdir().unwrap();
    let img = pattern_file(dir.path());
    let before = std::fs::read(&img).unwrap();
    let s = Traced::start("splice", &[], &["--filter=cow", "file", path_str(&img)]);
    // Whole blocks (the 1 MiB read at 1 MiB + 7 is then mixed), a partial block, and the
    // last (partial) block of the export.
    let writes = [
        (1_048_576, 0xab, 65_536),
        (4 * 1_048_576 + 100, 0xcd, 1_000),
        (SIZE - 5_000, 0xef, 5_000),
        (2 * 1_048_576, 0x11, 1_048_576 + 65_536),
    ];
    // Reads wholly in the overlay: whole blocks, and unaligned inside them.
    let overlay = [
        (2 * 1_048_576, 1_048_576 + 65_536),
        (2 * 1_048_576 + 3, 500_000),
    ];
    write_then_compare(&s.uri(), &img, &writes, &overlay);
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x11 2097152 1114112",
            &s.server.qemu_uri(),
        ],
    );
    assert!(out.contains("read 1114112/1114112"), "{out}");
    let lines = s.finish("splice");
    assert_eq!(
        std::fs::read(&img).unwrap(),
        before,
        "cow never writes the plugin's file"
    );
    assert_two_sources(
        &lines,
        &[12_345, 65_536],
        &[2 * 1_048_576, 2 * 1_048_576 + 3],
    );
}

#[test]
fn splice_cache_reads_of_hits_and_misses_match() {
    let dir = tempfile::tempdir().unwrap();
    let img = pattern_file(dir.path());
    let s = Traced::start("splice", &[], &["--filter=cache", "file", path_str(&img)]);
    // Writeback: the written blocks are in the cache file, dirty, and read from there.
    let writes = [(1_048_576, 0xab, 65_536), (3 * 1_048_576, 0x22, 1_048_576)];
    let hits = [(3 * 1_048_576, 1_048_576), (3 * 1_048_576 + 9, 700_001)];
    write_then_compare(&s.uri(), &img, &writes, &hits);
    let lines = s.finish("splice");
    assert_two_sources(
        &lines,
        &[12_345, 65_536],
        &[3 * 1_048_576, 3 * 1_048_576 + 9],
    );
}

#[test]
fn splice_is_not_used_under_a_filter_that_moves_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let img = pattern_file(dir.path());
    let bytes = std::fs::read(&img).unwrap();
    // offset: the export is the pattern, stored 4096 bytes into a larger file.
    let shifted = dir.path().join("shifted.img");
    let mut data = vec![0x77u8; 4096];
    data.extend_from_slice(&bytes);
    std::fs::write(&shifted, &data).unwrap();
    let s = Traced::start(
        "splice",
        &[],
        &["--filter=offset", "file", path_str(&shifted), "offset=4096"],
    );
    write_then_compare(&s.uri(), &img, &[], &[]);
    assert_eq!(s.finish("splice"), Vec::<String>::new());
}

#[test]
fn splice_read_past_a_shrunken_file_gets_the_same_error_and_the_connection_lives() {
    let dir = tempfile::tempdir().unwrap();
    let img = pattern_file(dir.path());
    let s = Traced::start("splice", &[], &["file", path_str(&img)]);
    // The export keeps its size; the file loses its last 50,000 bytes under it. The read of
    // the end is spliced partly, comes up short, and is read again with pread, whose EIO
    // is the reply, as before; the next read on the connection is answered.
    let script = format!(
        r#"
import nbd, os
h = nbd.NBD()
h.connect_uri({uri:?})
os.truncate({img:?}, {cut})
try:
    h.pread(100_000, {end})
    print("read ok")
except nbd.Error as e:
    print("read failed", e.errno)
assert h.pread(65536, 0) == open({img:?}, 'rb').read(65536)
print("alive")
"#,
        uri = s.uri(),
        img = path_str(&img),
        cut = SIZE - 50_000,
        end = SIZE - 100_000,
    );
    assert_eq!(run(PYTHON, &["-c", &script]), "read failed EIO\nalive\n");
    let lines = s.finish("splice");
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("[{}]", SIZE - 100_000))),
        "the short read was tried with splice: {lines:?}"
    );
}
