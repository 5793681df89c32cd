//! qemu's own NBD client (qemu-io, qemu-img) against sluice's memory, file and pattern
//! exports: patterned writes read back, FUA, write-zeroes with and without unmap, discard,
//! flush, unaligned requests, `qemu-img info`, `map`, `convert` and `compare`.
//!
//! qemu-io exits 0 even when a command fails or a `read -P` finds other bytes, so every
//! qemu-io run goes through `support::qemu_io`, which also judges its output. Each test uses
//! fresh qemu-io processes (new NBD connections) to read back, so data must have reached the
//! server, not a client cache.

use crate::support;

use std::path::Path;

use support::{
    assert_same_bytes, output, path_str, qemu_io, qemu_io_unchecked, qemu_io_with, random_bytes,
    run, Server,
};

const MIB: usize = 1 << 20;

/// Parses qemu-io's `read -v` hex dump ("00100001:  00 5a ...  ..Z") into its bytes,
/// checking that the dumped offsets are contiguous from `offset`.
fn parse_hexdump(out: &str, offset: u64) -> Vec<u8> {
    let mut bytes = Vec::new();
    for line in out.lines() {
        let Some((addr, rest)) = line.split_once(":  ") else {
            continue;
        };
        let Ok(addr) = u64::from_str_radix(addr, 16) else {
            continue;
        };
        assert_eq!(addr, offset + bytes.len() as u64, "hexdump line {line:?}");
        let (hex, _ascii) = rest.split_once("  ").expect("hexdump has an ASCII column");
        for b in hex.split_whitespace() {
            bytes.push(u8::from_str_radix(b, 16).unwrap());
        }
    }
    bytes
}

/// `read -v OFFSET LEN` through a read-only qemu-io, as bytes.
fn qemu_read(uri: &str, offset: u64, len: usize) -> Vec<u8> {
    let out = qemu_io_with(&["-r"], uri, &[&format!("read -v {offset} {len}")]);
    let bytes = parse_hexdump(&out, offset);
    assert_eq!(bytes.len(), len, "qemu-io read -v output:\n{out}");
    bytes
}

/// `qemu-img map --output=json` as (start, length, data, zero) tuples.
fn qemu_img_map(uri: &str) -> Vec<(u64, u64, bool, bool)> {
    let text = run("qemu-img", &["map", "-f", "raw", "--output=json", uri]);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// A data file of `len` pseudo-random bytes in `dir`, returned with its contents.
fn data_file(dir: &Path, name: &str, len: usize, seed: u64) -> (String, Vec<u8>) {
    let path = dir.join(name);
    let bytes = random_bytes(len, seed);
    std::fs::write(&path, &bytes).unwrap();
    (path_str(&path).to_string(), bytes)
}

fn memory_64m() -> Server {
    Server::start(&["memory", "64M"])
}

#[test]
fn memory_patterned_write_reads_back_on_new_connection() {
    let s = memory_64m();
    let uri = s.qemu_uri();
    let out = qemu_io(&uri, &["write -P 0x5a 1M 64k"]);
    assert!(
        out.contains("wrote 65536/65536 bytes at offset 1048576"),
        "{out}"
    );

    let out = qemu_io(
        &uri,
        &[
            "read -P 0x5a 1M 64k",
            "read -P 0 0 1M",
            "read -P 0 1114112 64k",
        ],
    );
    assert!(
        out.contains("read 65536/65536 bytes at offset 1048576"),
        "{out}"
    );
    assert!(
        out.contains("read 1048576/1048576 bytes at offset 0"),
        "{out}"
    );
    assert!(
        out.contains("read 65536/65536 bytes at offset 1114112"),
        "{out}"
    );
}

#[test]
fn memory_read_other_pattern_reports_verification_failure() {
    // The check that every other test relies on: a wrong pattern is noticed.
    let s = memory_64m();
    let uri = s.qemu_uri();
    qemu_io(&uri, &["write -P 0x5a 1M 64k"]);
    let out = qemu_io_unchecked(&uri, &["read -P 0x5b 1M 64k"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Pattern verification failed at offset 1048576, 65536 bytes"),
        "{text}"
    );
}

#[test]
fn memory_fua_write_reads_back() {
    let s = memory_64m();
    let uri = s.qemu_uri();
    let out = qemu_io(&uri, &["write -f -P 0x33 8M 256k"]);
    assert!(
        out.contains("wrote 262144/262144 bytes at offset 8388608"),
        "{out}"
    );
    qemu_io(&uri, &["read -P 0x33 8M 256k", "read -P 0 9175040 4k"]);
}

#[test]
fn memory_write_zeroes_with_and_without_unmap_read_zero() {
    let s = memory_64m();
    let uri = s.qemu_uri();
    qemu_io(
        &uri,
        &[
            "write -P 0x77 0 256k",
            "write -z 64k 64k",
            "write -z -u 128k 64k",
        ],
    );
    qemu_io(
        &uri,
        &[
            "read -P 0x77 0 64k",
            "read -P 0 64k 128k",
            "read -P 0x77 192k 64k",
        ],
    );
}

#[test]
fn memory_discard_then_flush_reads_zero() {
    // The memory plugin, like nbdkit's, zeroes what it trims.
    let s = memory_64m();
    let uri = s.qemu_uri();
    qemu_io(&uri, &["write -P 0x42 2M 1M"]);
    let out = qemu_io(&uri, &["discard 2M 512k", "flush"]);
    assert!(
        out.contains("discard 524288/524288 bytes at offset 2097152"),
        "{out}"
    );
    qemu_io(&uri, &["read -P 0 2M 512k", "read -P 0x42 2621440 512k"]);
}

#[test]
fn memory_unaligned_reads_return_exact_bytes() {
    let s = memory_64m();
    let uri = s.qemu_uri();
    qemu_io(&uri, &["write -P 0x5a 1M 64k"]);
    qemu_io(
        &uri,
        &[
            "read -P 0x5a 1048577 7",
            "read -P 0x5a 1114111 1",
            "read -P 0 1048573 3",
            "read -P 0 1114112 1",
        ],
    );
    // Straddling both edges of the written range.
    assert_eq!(qemu_read(&uri, 1048574, 4), [0, 0, 0x5a, 0x5a]);
    assert_eq!(qemu_read(&uri, 1114110, 5), [0x5a, 0x5a, 0, 0, 0]);
}

#[test]
fn memory_unaligned_write_reads_back_and_leaves_neighbours() {
    let s = memory_64m();
    let uri = s.qemu_uri();
    qemu_io(&uri, &["write -P 0xff 0 16k", "write -P 0xab 4097 5000"]);
    qemu_io(
        &uri,
        &[
            "read -P 0xff 0 4097",
            "read -P 0xab 4097 5000",
            "read -P 0xff 9097 7287",
        ],
    );
}

#[test]
fn pattern_unaligned_reads_return_offset_words() {
    let s = Server::start(&["pattern", "2M"]);
    let uri = s.qemu_uri();
    for (offset, len) in [(1048577u64, 7usize), (3, 21), (2097151, 1), (4093, 300)] {
        let expected: Vec<u8> = (offset..offset + len as u64)
            .map(|o| (o & !7).to_be_bytes()[(o % 8) as usize])
            .collect();
        assert_eq!(qemu_read(&uri, offset, len), expected, "at {offset}+{len}");
    }
}

#[test]
fn file_writes_zeroes_fua_reach_the_file_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (path, mut model) = data_file(dir.path(), "disk.img", 4 * MIB, 7);
    let s = Server::start(&["file", &path]);
    let uri = s.qemu_uri();
    qemu_io(
        &uri,
        &[
            "write -P 0x5a 4097 65535",
            "write -f -P 0x3c 1M 4k",
            "write -z 2M 64k",
            "write -z -u 2228224 64k",
            "write -P 0xe1 4194303 1",
            "flush",
        ],
    );
    model[4097..4097 + 65535].fill(0x5a);
    model[MIB..MIB + 4096].fill(0x3c);
    model[2 * MIB..2 * MIB + 65536].fill(0);
    model[2228224..2228224 + 65536].fill(0);
    model[4 * MIB - 1] = 0xe1;

    qemu_io(
        &uri,
        &[
            "read -P 0x5a 4097 65535",
            "read -P 0x3c 1M 4k",
            "read -P 0 2M 64k",
            "read -P 0 2228224 64k",
            "read -P 0xe1 4194303 1",
        ],
    );
    assert_same_bytes(&std::fs::read(&path).unwrap(), &model, "file after writes");
    let out = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &uri, &path],
    );
    assert_eq!(out, "Images are identical.\n");
}

#[test]
fn file_unaligned_reads_return_file_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (path, bytes) = data_file(dir.path(), "disk.img", MIB + 1000, 11);
    let s = Server::start(&["file", &path]);
    let uri = s.qemu_uri();
    for (offset, len) in [(1usize, 7usize), (4095, 2), (65537, 333), (MIB + 990, 10)] {
        assert_eq!(
            qemu_read(&uri, offset as u64, len),
            &bytes[offset..offset + len],
            "at {offset}+{len}"
        );
    }
}

#[test]
fn file_discard_leaves_export_equal_to_file() {
    // What a discarded range reads as depends on the host filesystem, but the export must
    // always show exactly the file's bytes, and the rest must be untouched.
    let dir = tempfile::tempdir().unwrap();
    let (path, bytes) = data_file(dir.path(), "disk.img", 4 * MIB, 13);
    let s = Server::start(&["file", &path]);
    let uri = s.qemu_uri();
    let out = qemu_io(&uri, &["discard 1M 1M", "flush"]);
    assert!(
        out.contains("discard 1048576/1048576 bytes at offset 1048576"),
        "{out}"
    );
    let now = std::fs::read(&path).unwrap();
    assert_eq!(now.len(), 4 * MIB);
    assert_same_bytes(&now[..MIB], &bytes[..MIB], "before the discarded range");
    assert_same_bytes(
        &now[2 * MIB..],
        &bytes[2 * MIB..],
        "after the discarded range",
    );
    let out = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &uri, &path],
    );
    assert_eq!(out, "Images are identical.\n");
}

#[test]
fn qemu_img_info_memory_reports_virtual_size() {
    let s = memory_64m();
    let text = run(
        "qemu-img",
        &["info", "-f", "raw", "--output=json", &s.qemu_uri()],
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["virtual-size"], 67108864, "{text}");
    assert_eq!(v["format"], "raw", "{text}");
}

#[test]
fn qemu_img_info_file_reports_odd_virtual_size() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = data_file(dir.path(), "odd.img", 3 * MIB + 512, 3);
    let s = Server::start(&["file", &path]);
    let text = run(
        "qemu-img",
        &["info", "-f", "raw", "--output=json", &s.qemu_uri()],
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["virtual-size"], 3 * MIB as u64 + 512, "{text}");
}

#[test]
fn qemu_img_map_memory_write_at_1m_data_there_zero_elsewhere() {
    let s = memory_64m();
    let uri = s.qemu_uri();
    qemu_io(&uri, &["write -P 0x5a 1M 64k"]);
    assert_eq!(
        qemu_img_map(&uri),
        [
            (0, 1048576, false, true),
            (1048576, 65536, true, false),
            (1114112, 67108864 - 1114112, false, true),
        ]
    );
}

#[test]
fn qemu_img_map_memory_fresh_disk_all_zero() {
    let s = memory_64m();
    assert_eq!(qemu_img_map(&s.qemu_uri()), [(0, 67108864, false, true)]);
}

#[test]
fn qemu_img_map_memory_zeroed_write_is_hole_again() {
    let s = memory_64m();
    let uri = s.qemu_uri();
    qemu_io(&uri, &["write -P 0x5a 1M 64k", "write -P 0x5a 8M 64k"]);
    qemu_io(&uri, &["write -z 1M 64k", "discard 8M 64k"]);
    assert_eq!(qemu_img_map(&uri), [(0, 67108864, false, true)]);
}

#[test]
fn qemu_img_map_memory_two_writes_two_data_ranges() {
    let s = memory_64m();
    let uri = s.qemu_uri();
    // 32 KiB pages: a write covering whole pages maps to exactly those pages.
    qemu_io(&uri, &["write -P 1 0 32k", "write -P 2 32M 96k"]);
    assert_eq!(
        qemu_img_map(&uri),
        [
            (0, 32768, true, false),
            (32768, 33554432 - 32768, false, true),
            (33554432, 98304, true, false),
            (33554432 + 98304, 33554432 - 98304, false, true),
        ]
    );
}

#[test]
fn qemu_img_convert_memory_to_qcow2_compare_identical() {
    let s = memory_64m();
    let uri = s.qemu_uri();
    qemu_io(
        &uri,
        &[
            "write -P 0x11 0 64k",
            "write -P 0x22 5M 1M",
            "write -P 0x33 67108863 1",
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let qcow2 = dir.path().join("out.qcow2");
    let qcow2 = path_str(&qcow2);
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", &uri, qcow2],
    );
    let out = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", &uri, qcow2],
    );
    assert_eq!(out, "Images are identical.\n");
    // The qcow2 holds the bytes too, read without sluice.
    let raw = dir.path().join("back.raw");
    run(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", qcow2, path_str(&raw)],
    );
    let back = std::fs::read(&raw).unwrap();
    assert_eq!(back.len(), 64 * MIB);
    assert!(back[..65536].iter().all(|&b| b == 0x11));
    assert!(back[65536..5 * MIB].iter().all(|&b| b == 0));
    assert!(back[5 * MIB..6 * MIB].iter().all(|&b| b == 0x22));
    assert!(back[6 * MIB..64 * MIB - 1].iter().all(|&b| b == 0));
    assert_eq!(back[64 * MIB - 1], 0x33);
}

#[test]
fn qemu_img_compare_memory_after_later_write_reports_mismatch() {
    let s = memory_64m();
    let uri = s.qemu_uri();
    qemu_io(&uri, &["write -P 0x11 0 64k"]);
    let dir = tempfile::tempdir().unwrap();
    let qcow2 = dir.path().join("out.qcow2");
    let qcow2 = path_str(&qcow2);
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", &uri, qcow2],
    );
    qemu_io(&uri, &["write -P 0x99 3M 1"]);
    let out = output(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", &uri, qcow2],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Content mismatch at offset 3145728!\n"
    );
}

#[test]
fn qemu_img_convert_file_to_qcow2_equals_export_and_source() {
    let dir = tempfile::tempdir().unwrap();
    let (path, mut model) = data_file(dir.path(), "disk.img", 8 * MIB, 21);
    let s = Server::start(&["file", &path]);
    let uri = s.qemu_uri();
    qemu_io(
        &uri,
        &["write -P 0x5a 3M 100000", "write -z 6M 1M", "flush"],
    );
    model[3 * MIB..3 * MIB + 100000].fill(0x5a);
    model[6 * MIB..7 * MIB].fill(0);

    let qcow2 = dir.path().join("out.qcow2");
    let qcow2 = path_str(&qcow2);
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", &uri, qcow2],
    );
    let out = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", &uri, qcow2],
    );
    assert_eq!(out, "Images are identical.\n");
    let out = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", &path, qcow2],
    );
    assert_eq!(out, "Images are identical.\n");

    assert_same_bytes(&std::fs::read(&path).unwrap(), &model, "source file");
    let raw = dir.path().join("back.raw");
    run(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", qcow2, path_str(&raw)],
    );
    assert_same_bytes(
        &std::fs::read(&raw).unwrap(),
        &model,
        "qcow2 converted back",
    );
}

#[test]
fn qemu_img_convert_into_memory_export_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let (path, bytes) = data_file(dir.path(), "src.img", 4 * MIB, 5);
    let s = Server::start(&["memory", "4M"]);
    let uri = s.qemu_uri();
    run(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", &path, &uri],
    );
    let out = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &uri, &path],
    );
    assert_eq!(out, "Images are identical.\n");
    assert_same_bytes(
        &support::export_bytes(&s.uri(), dir.path()),
        &bytes,
        "export after qemu-img convert",
    );
}

#[test]
fn readonly_memory_qemu_io_refuses_read_write_open_allows_reads() {
    let s = Server::start(&["-r", "memory", "1M"]);
    let uri = s.qemu_uri();
    let out = qemu_io_unchecked(&uri, &["write -P 1 0 4k"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Permission denied"), "{err}");
    qemu_io_with(&["-r"], &uri, &["read -P 0 0 1M"]);
}
