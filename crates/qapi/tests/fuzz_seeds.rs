//! The fuzz targets' checks, run over their committed seed corpora (`fuzz/seeds/TARGET/`) as
//! ordinary tests. Building the fuzzers takes minutes of CPU, too long for every CI run, so
//! CI runs this smoke instead and `scripts/fuzz.sh` runs the fuzzers by hand; a crash the
//! fuzzer finds is added to the seeds, and so stays a test here.

#[path = "../fuzz/checks/keyval.rs"]
mod keyval;

fn run_seeds(target: &str, check: fn(&[u8])) {
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

#[test]
fn keyval_seeds_pass_the_fuzz_checks() {
    run_seeds("keyval", keyval::run);
}
