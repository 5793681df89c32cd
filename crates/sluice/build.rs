//! Exports exactly the `nbdkit_*` functions from the `sluice` executable's dynamic symbol
//! table, so that nbdkit C plugins loaded with dlopen resolve them against us (and nothing
//! else of ours is exported). The list comes from the sluice-nbdkit crate.

fn main() {
    let list = std::env::var("DEP_SLUICE_NBDKIT_SHIM_DYNLIST")
        .expect("sluice-nbdkit must be a direct dependency (it provides the dynamic list)");
    println!("cargo:rustc-link-arg-bins=-Wl,--dynamic-list={list}");
    println!("cargo:rerun-if-changed=build.rs");
}
