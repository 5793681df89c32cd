//! The fuzz targets' checks over their committed seeds, as ordinary tests (see
//! `crates/fuzz_seeds.rs`, shared by every crate with fuzz targets).

#[path = "../../fuzz_seeds.rs"]
mod seeds;
use seeds::run_seeds;

#[path = "../fuzz/checks/keyval.rs"]
mod keyval;

#[test]
fn keyval_seeds_pass_the_fuzz_checks() {
    run_seeds("keyval", keyval::run);
}
