//! The `luks_header` fuzz target: libFuzzer drives the checks in `checks/luks_header.rs`,
//! which the crate's `tests/fuzz_seeds.rs` also runs over the committed seeds.
#![no_main]

#[path = "../checks/luks_header.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
