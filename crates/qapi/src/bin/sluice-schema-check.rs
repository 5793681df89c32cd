//! `sluice-schema-check`: lists the breaking changes between the QAPI schema and the baseline.
//!
//! ```text
//! sluice-schema-check [--schema DIR] [--baseline DIR] [--if NAME]... [--update]
//! ```
//!
//! With no options it reads `schema/` and `schema/baseline/` under the current directory (CI
//! runs it from the workspace root). Exit status: 0 when nothing breaks (notes may still be
//! printed), 1 when something does, 2 for usage or I/O errors. `--update` writes the current
//! schema's introspection as the new baseline instead (done at release time).

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "\
usage: sluice-schema-check [--schema DIR] [--baseline DIR] [--if NAME]... [--update]

Compares the QAPI schema in DIR (default: schema) with the recorded baseline
(default: schema/baseline/introspection.json) and lists breaking changes:
commands, events or members removed or renamed, types changed, optional
members made mandatory, new mandatory arguments, enum values removed, return
members that may now be absent. Removing something the baseline marks
'deprecated' is allowed. --update records the current schema as the baseline.
--if NAME enables the schema's 'if' condition NAME (repeatable); without it,
the names a build on this host enables by default (CONFIG_LINUX on Linux).";

fn main() -> ExitCode {
    let mut schema = PathBuf::from("schema");
    let mut baseline: Option<PathBuf> = None;
    let mut update = false;
    let mut config: Option<Vec<String>> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--schema" | "--baseline" => {
                let Some(v) = args.next() else {
                    eprintln!("sluice-schema-check: {a} needs a directory\n\n{USAGE}");
                    return ExitCode::from(2);
                };
                if a == "--schema" {
                    schema = PathBuf::from(v);
                } else {
                    baseline = Some(PathBuf::from(v));
                }
            }
            "--if" => {
                let Some(v) = args.next() else {
                    eprintln!("sluice-schema-check: --if needs a condition name\n\n{USAGE}");
                    return ExitCode::from(2);
                };
                config.get_or_insert_with(Vec::new).push(v);
            }
            "--update" => update = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("sluice-schema-check: unknown argument '{other}'\n\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let baseline = baseline.unwrap_or_else(|| schema.join("baseline"));
    let config = config.unwrap_or_else(sluice_qapi::abi::host_config);
    if update {
        return match sluice_qapi::abi::update(&schema, &baseline, &config) {
            Ok(p) => {
                println!("wrote {}", p.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sluice-schema-check: {e}");
                ExitCode::from(2)
            }
        };
    }
    match sluice_qapi::abi::check(&schema, &baseline, &config) {
        Ok(report) => {
            for f in &report.findings {
                println!("{f}");
            }
            let n = report.breaking();
            if n > 0 {
                eprintln!(
                    "sluice-schema-check: {n} breaking change(s) against {}",
                    baseline.display()
                );
                ExitCode::from(1)
            } else {
                println!("schema is compatible with {}", baseline.display());
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("sluice-schema-check: {e}");
            ExitCode::from(2)
        }
    }
}
