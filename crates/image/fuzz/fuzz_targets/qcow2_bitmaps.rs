//! The `qcow2_bitmaps` fuzz target: libFuzzer drives the checks in `checks/qcow2_bitmaps.rs`,
//! which the crate's `tests/fuzz_seeds.rs` also runs over the committed seeds in every test
//! run.
#![no_main]

#[path = "../checks/qcow2_bitmaps.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
