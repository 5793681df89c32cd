//! Fuzzes the qcow2 bitmaps extension and directory parsers with untrusted bytes: the first
//! 24 bytes are an extension (its first bytes also pick the bitmap count, cluster size and
//! disk size the directory is read with), the rest a bitmap directory.
//!
//! Properties: no panic, and a directory that parses, once encoded, parses back the same
//! (padding bytes are not checked, as in qemu, so the bytes may differ there).

use sluice_image::qcow2_bitmaps::{encode_directory, parse_directory, BitmapsExt};

/// Runs the target's checks on one input (a fuzz input or a committed seed).
pub fn run(data: &[u8]) {
    if data.len() < 24 {
        return;
    }
    let (ext, dir) = data.split_at(24);
    let _ = BitmapsExt::parse(ext);
    let nb = u32::from(ext[0]) % 8;
    let cluster_size = 512u64 << (ext[1] % 13);
    let disk_size = u64::from_be_bytes(ext[8..16].try_into().unwrap()) >> (ext[2] % 64);
    if let Ok(entries) = parse_directory(dir, nb, cluster_size, disk_size) {
        let again = encode_directory(&entries);
        assert_eq!(again.len(), dir.len());
        assert_eq!(
            parse_directory(&again, nb, cluster_size, disk_size).ok(),
            Some(entries)
        );
    }
}
