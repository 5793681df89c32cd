//! Helpers for the filter tests: run the same filter stack under sluice and under Debian's
//! nbdkit and compare what clients see (capabilities in `nbdinfo --json`, data, errors).

use std::collections::BTreeMap;

use serde_json::Value;

use super::{nbdinfo_json, run, Server, PYTHON};

/// The same command line (`--filter=X ... PLUGIN ARGS...`) under sluice and nbdkit.
pub struct Pair {
    pub sluice: Server,
    pub nbdkit: Server,
}

impl Pair {
    pub fn start(args: &[&str]) -> Pair {
        let nbdkit = Server::try_start_nbdkit(args)
            .unwrap_or_else(|e| panic!("nbdkit {args:?} did not start: {e}"));
        Pair {
            sluice: Server::start(args),
            nbdkit,
        }
    }

    /// Runs `script` (Python, libnbd as `nbd`, `uri` set) against both; returns
    /// (sluice's output, nbdkit's output).
    pub fn py(&self, script: &str) -> (String, String) {
        (
            py(&self.sluice.uri(), script),
            py(&self.nbdkit.uri(), script),
        )
    }

    /// Asserts `script` prints the same under both servers, and returns that output.
    #[track_caller]
    pub fn same_py(&self, what: &str, script: &str) -> String {
        let (s, n) = self.py(script);
        assert_eq!(s, n, "{what}: sluice vs nbdkit");
        s
    }
}

/// The capability fields of `nbdinfo --json` that a filter can change. The block size
/// fields are left out unless `block_size`: sluice's server states block sizes for every
/// export (nbdkit only when a layer has `.block_size`), and caps the maximum at its payload
/// limit, so only minimum and preferred are compared.
pub fn caps(uri: &str, block_size: bool) -> BTreeMap<String, Value> {
    let info = nbdinfo_json(&[], uri);
    let export = &info["exports"][0];
    let mut keys = vec![
        "is_rotational",
        "is_read_only",
        "can_cache",
        "can_fast_zero",
        "can_flush",
        "can_fua",
        "can_multi_conn",
        "can_trim",
        "can_zero",
        "export-size",
    ];
    if block_size {
        keys.extend(["block_size_minimum", "block_size_preferred"]);
    }
    keys.into_iter()
        .map(|k| (k.to_string(), export[k].clone()))
        .collect()
}

/// Starts the stack under both servers and asserts the same capabilities; returns them.
#[track_caller]
pub fn same_caps(args: &[&str], block_size: bool) -> BTreeMap<String, Value> {
    let pair = Pair::start(args);
    let s = caps(&pair.sluice.uri(), block_size);
    let n = caps(&pair.nbdkit.uri(), block_size);
    assert_eq!(s, n, "capabilities of {args:?}: sluice vs nbdkit");
    s
}

/// `nbdinfo --map URI` output.
pub fn map(uri: &str) -> String {
    run("nbdinfo", &["--map", uri])
}

/// Runs a Python script with libnbd; the prelude gives `uri`, a connected handle `h`
/// (structured replies, base:allocation), `t(f)` which returns "ok" or the errno name of
/// the failure, and `sha(b)`.
pub fn py(uri: &str, script: &str) -> String {
    let full = format!(
        "import nbd, sys, os, errno, hashlib, time\n\
         uri = {uri:?}\n\
         h = nbd.NBD()\n\
         h.add_meta_context('base:allocation')\n\
         h.connect_uri(uri)\n\
         def t(f):\n\
         \x20   try:\n\
         \x20       f()\n\
         \x20       return 'ok'\n\
         \x20   except nbd.Error as e:\n\
         \x20       return errno.errorcode.get(e.errno, str(e.errno))\n\
         def sha(b):\n\
         \x20   return hashlib.sha256(b).hexdigest()[:16]\n\
         {script}\n"
    );
    run(PYTHON, &["-c", &full])
}

/// Runs `sluice serve ARGS...`, which must refuse its configuration: asserts exit status 2
/// and exactly one `sluice:` line on stderr, containing `want`.
#[track_caller]
pub fn sluice_refuses(args: &[&str], want: &str) {
    let out = std::process::Command::new(super::sluice_bin())
        .arg("serve")
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: {err}");
    assert!(
        lines[0].starts_with("sluice:") && lines[0].contains(want),
        "{args:?}: {err}"
    );
}
