//! The same command line under Debian's nbdkit and under sluice run as `nbdkit` (a symlink
//! to the sluice binary in a directory put first on PATH), for tests that compare the two.
//!
//! Both run captive (`-U - ... --run SCRIPT`) with the same PATH order: the directory holding
//! the `nbdkit` link (for sluice) first, then `/usr/bin`, whose python3 can import libnbd, so
//! that nbdsh and `/usr/bin/env python3` scripts work and only `nbdkit` differs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use super::sluice_bin;

/// Which server a comparison runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// Debian's `/usr/bin/nbdkit` with its C filters.
    Nbdkit,
    /// sluice through the `nbdkit` symlink.
    Sluice,
}

pub const BOTH: [Peer; 2] = [Peer::Nbdkit, Peer::Sluice];

/// A directory holding `nbdkit`, a symlink to the sluice binary under test.
pub fn nbdkit_link_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("nbdkit-link")
            .join(std::process::id().to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let link = dir.join("nbdkit");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(sluice_bin(), &link).unwrap();
        dir
    })
}

/// PATH for a peer: the link directory first for sluice, then `/usr/bin`, then the rest.
pub fn path_for(peer: Peer) -> String {
    let rest = std::env::var("PATH").unwrap_or_default();
    match peer {
        Peer::Nbdkit => format!("/usr/bin:{rest}"),
        Peer::Sluice => format!("{}:/usr/bin:{rest}", nbdkit_link_dir().display()),
    }
}

/// Debian's directory of nbdkit plugins (for loading the very same C plugin in both).
pub fn nbdkit_plugin(name: &str) -> String {
    static DIR: OnceLock<String> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let out = Command::new("/usr/bin/nbdkit")
            .arg("--dump-config")
            .output()
            .expect("run nbdkit --dump-config (install nbdkit: scripts/test.sh)");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("plugindir=").map(str::to_string))
            .expect("nbdkit --dump-config has plugindir=")
    });
    format!("{dir}/nbdkit-{name}-plugin.so")
}

impl Peer {
    /// The program to run: `/usr/bin/nbdkit`, or the link to sluice.
    pub fn program(self) -> PathBuf {
        match self {
            Peer::Nbdkit => PathBuf::from("/usr/bin/nbdkit"),
            Peer::Sluice => nbdkit_link_dir().join("nbdkit"),
        }
    }

    /// A command running this peer's `nbdkit ARGS...` with this peer's PATH.
    pub fn command(self, args: &[&str]) -> Command {
        let mut c = Command::new(self.program());
        c.args(args)
            .env("PATH", path_for(self))
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .stdin(Stdio::null());
        c
    }

    /// `nbdkit -U - ARGS... --run SCRIPT`, run to the end.
    pub fn captive(self, args: &[&str], script: &str) -> Output {
        let mut all = vec!["-U", "-"];
        all.extend_from_slice(args);
        all.extend(["--run", script]);
        self.command(&all)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", self.program()))
    }

    /// Like [`Peer::captive`], asserting success; returns stdout.
    #[track_caller]
    pub fn captive_ok(self, args: &[&str], script: &str) -> String {
        let out = self.captive(args, script);
        assert!(
            out.status.success(),
            "{self:?} {args:?} --run {script:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Runs the same captive command under both peers and asserts they print the same.
#[track_caller]
pub fn same_output(args: &[&str], script: &str) -> String {
    let nbdkit = Peer::Nbdkit.captive_ok(args, script);
    let sluice = Peer::Sluice.captive_ok(args, script);
    assert_eq!(
        sluice, nbdkit,
        "sluice (left) and nbdkit (right) differ for {args:?}"
    );
    sluice
}

/// Log filter lines without their timestamps (`YYYY-MM-DD HH:MM:SS.uuuuuu `).
pub fn log_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| {
            assert!(
                l.len() > 27 && l.as_bytes()[26] == b' ',
                "not a log line: {l:?}"
            );
            l[27..].to_string()
        })
        .collect()
}

/// `nbdinfo --json` output without the `uri` fields (socket paths differ between runs) and
/// the block size fields: sluice's server always sends NBD_INFO_BLOCK_SIZE, nbdkit only for
/// plugins that state block sizes, which is a difference of the servers, not of the filters.
pub fn without_uris(mut v: serde_json::Value) -> serde_json::Value {
    match &mut v {
        serde_json::Value::Object(m) => {
            m.remove("uri");
            for k in [
                "block_size_minimum",
                "block_size_preferred",
                "block_size_maximum",
            ] {
                m.remove(k);
            }
            for (_, x) in m.iter_mut() {
                *x = without_uris(x.take());
            }
        }
        serde_json::Value::Array(a) => {
            for x in a.iter_mut() {
                *x = without_uris(x.take());
            }
        }
        _ => {}
    }
    v
}
