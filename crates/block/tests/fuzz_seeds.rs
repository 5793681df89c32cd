//! The fuzz targets' checks over their committed seeds, as ordinary tests (see
//! `crates/fuzz_seeds.rs`, shared by every crate with fuzz targets).

#[path = "../../fuzz_seeds.rs"]
mod seeds;
use seeds::run_seeds;

#[path = "../fuzz/checks/size.rs"]
mod size;

#[path = "../fuzz/checks/config.rs"]
mod config;

#[path = "../fuzz/checks/archive.rs"]
mod archive;
#[path = "../fuzz/checks/luks_header.rs"]
mod luks_header;
#[path = "../fuzz/checks/xz_index.rs"]
mod xz_index;

#[test]
fn size_seeds_pass_the_fuzz_checks() {
    run_seeds("size", size::run);
}

#[test]
fn config_seeds_pass_the_fuzz_checks() {
    run_seeds("config", config::run);
}

#[test]
fn archive_seeds_pass_the_fuzz_checks() {
    run_seeds("archive", archive::run);
}

#[test]
fn luks_header_seeds_pass_the_fuzz_checks() {
    run_seeds("luks_header", luks_header::run);
}

#[test]
fn xz_index_seeds_pass_the_fuzz_checks() {
    run_seeds("xz_index", xz_index::run);
}
