//! The fuzz targets' checks over their committed seeds, as ordinary tests (see
//! `crates/fuzz_seeds.rs`, shared by every crate with fuzz targets).

#[path = "../../fuzz_seeds.rs"]
mod seeds;
use seeds::run_seeds;

#[path = "../fuzz/checks/handshake.rs"]
mod handshake;

#[path = "../fuzz/checks/qmp_json.rs"]
mod qmp_json;

#[path = "../fuzz/checks/request.rs"]
mod request;

#[test]
fn handshake_seeds_pass_the_fuzz_checks() {
    run_seeds("handshake", handshake::run);
}

#[test]
fn qmp_json_seeds_pass_the_fuzz_checks() {
    run_seeds("qmp_json", qmp_json::run);
}

#[test]
fn request_seeds_pass_the_fuzz_checks() {
    run_seeds("request", request::run);
}
