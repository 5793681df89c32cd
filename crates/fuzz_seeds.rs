//! Runs a fuzz target's checks over its committed seed corpus (`fuzz/seeds/TARGET/` of the
//! crate that includes this file) as an ordinary test. Every crate with fuzz targets has a
//! `tests/fuzz_seeds.rs` that includes this file with `#[path]` and names its targets.
//!
//! The seeds run here in every test run, with the ordinary build; `scripts/fuzz.sh` runs the
//! fuzzers themselves (in CI for 20 s each, all but the daemon's, whose build is too long),
//! and a crash the fuzzer finds is added to the seeds, and so stays a test here.

/// Runs `check` on every seed of `target`; fails if there are none.
pub fn run_seeds(target: &str, check: fn(&[u8])) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        eprintln!("{}", path.display());
        check(&data);
        n += 1;
    }
    assert!(
        n > 0,
        "no seeds in {} (run scripts/fuzz-seeds.py)",
        dir.display()
    );
}
