//! `nbdkit --dump-plugin` through sluice's host: `cargo run -p sluice-nbdkit --example
//! dump_plugin -- memory size=1M`. Also the smallest example of a binary that loads nbdkit
//! plugins: its only linking requirement is the dynamic-list argument that this package's
//! build.rs passes to examples (a binary crate's build.rs passes it to its bins).

use std::path::PathBuf;
use std::process::ExitCode;

use sluice_block::plugins::ConfigArg;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(name) = args.next() else {
        eprintln!("usage: dump_plugin PLUGIN [KEY=VALUE...]");
        return ExitCode::FAILURE;
    };
    let dirs = [PathBuf::from(sluice_nbdkit::NBDKIT_PLUGIN_DIR)];
    let Some(path) = sluice_nbdkit::resolve(&name, &dirs) else {
        eprintln!("dump_plugin: {name}: no such plugin");
        return ExitCode::FAILURE;
    };
    let params: Vec<ConfigArg> = args.map(|a| ConfigArg::parse(&a)).collect();
    match sluice_nbdkit::dump_plugin(&path, &params) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dump_plugin: {e}");
            ExitCode::FAILURE
        }
    }
}
