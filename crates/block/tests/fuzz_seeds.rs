//! The fuzz targets' checks over their committed seeds, as ordinary tests (see
//! `crates/fuzz_seeds.rs`, shared by every crate with fuzz targets).

#[path = "../../fuzz_seeds.rs"]
mod seeds;
use seeds::run_seeds;

#[path = "../fuzz/checks/size.rs"]
mod size;

#[path = "../fuzz/checks/config.rs"]
mod config;

#[test]
fn size_seeds_pass_the_fuzz_checks() {
    run_seeds("size", size::run);
}

#[test]
fn config_seeds_pass_the_fuzz_checks() {
    run_seeds("config", config::run);
}

#[path = "../fuzz/checks/xz_index.rs"]
mod xz_index;

#[test]
fn xz_index_seeds_pass_the_fuzz_checks() {
    run_seeds("xz_index", xz_index::run);
}
