//! The `xz_index` fuzz target: libFuzzer drives the checks in `checks/xz_index.rs`, which the
//! crate's `tests/fuzz_seeds.rs` also runs over the committed seeds in every test run.
#![no_main]

#[path = "../checks/xz_index.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
