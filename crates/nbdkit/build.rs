//! Builds the C shim (nbdkit's variadic functions) and tells the linker of this crate's
//! integration tests to export the nbdkit_* symbols that dlopen'ed plugins resolve against.
//!
//! A binary that depends on this crate must do the same for itself; the path of the
//! dynamic-list file is published to dependents' build scripts as
//! `DEP_SLUICE_NBDKIT_SHIM_DYNLIST` (this package declares `links = "sluice_nbdkit_shim"`).

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets this"));
    let shim = dir.join("csrc/shim.c");
    let dynlist = dir.join("nbdkit.dynlist");
    println!("cargo:rerun-if-changed={}", shim.display());
    println!("cargo:rerun-if-changed={}", dynlist.display());

    cc::Build::new()
        .file(&shim)
        .warnings(true)
        .extra_warnings(true)
        .flag_if_supported("-std=gnu11")
        .compile("sluice_nbdkit_shim");

    // Integration tests and examples load C plugins into their own executable.
    println!(
        "cargo:rustc-link-arg-tests=-Wl,--dynamic-list={}",
        dynlist.display()
    );
    println!(
        "cargo:rustc-link-arg-examples=-Wl,--dynamic-list={}",
        dynlist.display()
    );
    println!("cargo:dynlist={}", dynlist.display());
}
