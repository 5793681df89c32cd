//! The fuzz targets' checks over their committed seeds, as ordinary tests (see
//! `crates/fuzz_seeds.rs`, shared by every crate with fuzz targets).

#[path = "../../fuzz_seeds.rs"]
mod seeds;
use seeds::run_seeds;

#[path = "../fuzz/checks/qcow2_header.rs"]
mod qcow2_header;

#[path = "../fuzz/checks/qcow2_open.rs"]
mod qcow2_open;

#[path = "../fuzz/checks/qcow2_bitmaps.rs"]
mod qcow2_bitmaps;

#[path = "../fuzz/checks/sidecar.rs"]
mod sidecar;

#[test]
fn qcow2_header_seeds_pass_the_fuzz_checks() {
    run_seeds("qcow2_header", qcow2_header::run);
}

#[test]
fn qcow2_open_seeds_pass_the_fuzz_checks() {
    run_seeds("qcow2_open", qcow2_open::run);
}

#[test]
fn qcow2_bitmaps_seeds_pass_the_fuzz_checks() {
    run_seeds("qcow2_bitmaps", qcow2_bitmaps::run);
}

#[test]
fn sidecar_seeds_pass_the_fuzz_checks() {
    run_seeds("sidecar", sidecar::run);
}

/// The sidecar seeds, written by `scripts/fuzz-seeds.py`'s own encoder from the format's
/// documentation, decode: the two encoders agree.
#[test]
fn sidecar_seeds_decode() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/sidecar");
    for (name, want) in [
        ("empty", vec![]),
        ("two", vec!["daily", "old"]),
        ("in-use", vec!["daily", "old"]),
        ("device", vec!["daily", "old"]),
    ] {
        let data = std::fs::read(dir.join(name)).unwrap();
        let s = sluice_image::sidecar::decode(&data).unwrap_or_else(|e| panic!("{name}: {e}"));
        let names: Vec<&str> = s.bitmaps.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, want, "{name}");
        assert_eq!(s.in_use, name == "in-use");
    }
}

/// The seeds taken from qemu-img's images reach the round trip (their directories parse), so
/// the target's checks are exercised past the parser's first refusal.
#[test]
fn qcow2_bitmaps_seeds_from_qemu_img_parse() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/qcow2_bitmaps");
    for (name, want) in [
        ("one", vec!["b0"]),
        ("three", vec!["a", "bb", &"c".repeat(40)]),
    ] {
        let data = std::fs::read(dir.join(name)).unwrap();
        let (ext, directory) = data.split_at(24);
        let cluster_size = 512u64 << ext[1];
        let disk_size = u64::from_be_bytes(ext[8..16].try_into().unwrap()) >> ext[2];
        let entries = sluice_image::qcow2_bitmaps::parse_directory(
            directory,
            u32::from(ext[0]),
            cluster_size,
            disk_size,
        )
        .unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, want, "{name}");
    }
}
