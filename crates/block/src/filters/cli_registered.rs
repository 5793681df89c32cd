//! The server-level filters (exitlast, exitwhen, exportname, ip, limit, log, pause, stats),
//! listed here so that the registry in [`super`] picks them up without that file changing
//! hands, and the process stages they hook into ([`lifecycle`]).
//!
//! These filters act on the server rather than on the data: who may connect, how many, when
//! the process exits, what the export list says, and what is recorded about requests. Their
//! files sit beside the data filters in this directory; the module declarations are here so
//! that each helper's registry lines stay in one file of its own.

#[path = "exitlast.rs"]
pub mod exitlast;
#[path = "exitwhen.rs"]
pub mod exitwhen;
#[path = "exportname.rs"]
pub mod exportname;
#[path = "ip.rs"]
pub mod ip;
#[path = "lifecycle.rs"]
pub mod lifecycle;
#[path = "limit.rs"]
pub mod limit;
#[path = "log.rs"]
pub mod log;
#[path = "pause.rs"]
pub mod pause;
#[path = "stats.rs"]
pub mod stats;

pub use lifecycle::{Lifecycle, Serving};

/// Filters registered by this file, merged into [`super::all`].
pub const CLI_FILTERS: &[super::FilterSpec] = &[
    exitlast::SPEC,
    exitwhen::SPEC,
    exportname::SPEC,
    ip::SPEC,
    limit::SPEC,
    log::SPEC,
    pause::SPEC,
    stats::SPEC,
];

/// Shell-quotes `s` as nbdkit's `shell_quote` does (log lines, scripts): a string of safe
/// characters only is written as is, anything else (the empty string included) in double
/// quotes with `$`, `` ` ``, `\` and `"` escaped.
pub(crate) fn shell_quote(s: &str) -> String {
    const SAFE: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789%+,-./:=@_";
    if !s.is_empty() && s.chars().all(|c| SAFE.contains(c)) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if matches!(c, '$' | '`' | '\\' | '"') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Runs `script` with `/bin/sh -c` as nbdkit's `system(3)` does, waits for it, and returns
/// its exit status (None if it could not run or was killed by a signal).
pub(crate) fn run_shell(script: &str) -> Option<i32> {
    match std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .status()
    {
        Ok(st) => st.code(),
        Err(e) => {
            tracing::error!("cannot run /bin/sh: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_leaves_safe_words_and_quotes_the_rest() {
        assert_eq!(shell_quote("disk-1.img"), "disk-1.img");
        assert_eq!(shell_quote(""), "\"\"");
        assert_eq!(shell_quote("a b"), "\"a b\"");
        assert_eq!(shell_quote("$x\"`\\"), "\"\\$x\\\"\\`\\\\\"");
    }

    #[test]
    fn every_cli_filter_is_found_by_name() {
        for spec in CLI_FILTERS {
            assert_eq!(super::super::find(spec.name).unwrap().name, spec.name);
        }
    }
}
