//! Generates the QMP layer from the QAPI schema in the workspace's `schema/` directory:
//! Rust types, argument parsers, the command dispatch trait (`$OUT_DIR/qapi.rs`) and the
//! introspection table (`$OUT_DIR/introspection.json`), with the QAPI toolchain in
//! `sluice-qapi` (a build-dependency). `sluice-schema-check` reads the schema with the same
//! code, so the ABI checker and the daemon agree on it.
//!
//! `'if'` conditions in the schema hold for `CONFIG_LINUX` on Linux and for
//! `CONFIG_<FEATURE>` for every enabled cargo feature of this crate.

use sluice_qapi::{codegen, schema};
use std::path::PathBuf;

fn main() {
    let manifest =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dir = manifest.join("../../schema");
    println!("cargo:rerun-if-changed={}", dir.display());

    let mut config: Vec<String> = std::env::vars()
        .filter_map(|(k, _)| {
            k.strip_prefix("CARGO_FEATURE_")
                .map(|f| format!("CONFIG_{f}"))
        })
        .collect();
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        config.push("CONFIG_LINUX".to_string());
    }
    config.sort();

    let schema = match schema::load_dir(&dir, &|c| config.iter().any(|x| x == c)) {
        Ok(s) => s,
        Err(e) => fail(&format!("schema error: {e}")),
    };
    let mut code = match codegen::generate(&schema) {
        Ok(c) => c,
        Err(e) => fail(&format!("code generation failed: {e}")),
    };
    code.push_str("\n/// The `'if'` names this build enabled.\npub const CONFIG: &[&str] = &[");
    for c in &config {
        code.push_str(&format!("{c:?}, "));
    }
    code.push_str("];\n");
    write(&out.join("qapi.rs"), &code);
    let intro = serde_json::to_string(&schema::introspect(&schema)).expect("JSON values serialize");
    write(&out.join("introspection.json"), &intro);
}

fn write(path: &std::path::Path, text: &str) {
    if let Err(e) = std::fs::write(path, text) {
        fail(&format!("cannot write {}: {e}", path.display()));
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1);
}
