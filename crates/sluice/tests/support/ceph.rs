//! A real single-node Ceph cluster for the RBD tests, started with the project's
//! `scripts/ceph-cluster.sh` (one mon, one in-memory OSD, cephx, pool `rbd`, all inside a
//! temporary directory, ~2-4 s to start).
//!
//! One cluster serves a whole test binary ([`shared`]): it starts on first use and is torn
//! down when the process exits (an `atexit` hook, which runs after the harness has finished
//! every test, failed ones included). A watchdog process also tears it down if the test
//! process dies without exiting normally (SIGKILL, timeout), so no daemon outlives a run.
//! Tests that need a cluster of their own use [`Cluster::start`], torn down on drop (also
//! when the test panics). Nothing here depends on the rest of the support module, so other
//! crates' tests can include this file by path.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The python that can import Debian's rados and rbd bindings (python3-rbd).
pub const PYTHON: &str = "/usr/bin/python3";

/// The cluster script of this repository.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/ceph-cluster.sh")
}

/// A running cluster: `dir` holds everything, `conf` is its ceph.conf (with the
/// client.admin keyring named in it).
#[derive(Debug)]
pub struct Cluster {
    pub dir: PathBuf,
    pub conf: PathBuf,
    /// Torn down (and `dir` removed) on drop; false for the shared cluster, which the exit
    /// hook tears down.
    owned: bool,
}

impl Cluster {
    /// Starts a cluster in a new temporary directory, or panics with the script's output.
    pub fn start() -> Cluster {
        let mut c = Cluster::try_start().unwrap_or_else(|e| panic!("{e}"));
        c.owned = true;
        c
    }

    fn try_start() -> Result<Cluster, String> {
        let dir = tempfile::Builder::new()
            .prefix("sluice-ceph-")
            .tempdir()
            .map_err(|e| e.to_string())?
            .keep();
        let out = Command::new("bash")
            .arg(script())
            .arg("up")
            .arg(&dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script().display()))?;
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(format!(
                "ceph-cluster.sh up failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let conf = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        assert_eq!(
            conf,
            dir.join("ceph.conf"),
            "the script prints the conf path"
        );
        watchdog(&dir);
        Ok(Cluster {
            dir,
            conf,
            owned: false,
        })
    }

    pub fn conf_str(&self) -> &str {
        self.conf.to_str().unwrap()
    }

    /// `conf=...` for `sluice serve rbd`.
    pub fn conf_param(&self) -> String {
        format!("conf={}", self.conf.display())
    }

    /// Stops the daemons (idempotent).
    pub fn down(&self) {
        let out = Command::new("bash")
            .arg(script())
            .arg("down")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "ceph-cluster.sh down {}: {}",
                self.dir.display(),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("ceph-cluster.sh down: {e}"),
        }
    }

    /// Runs `TOOL -c CONF ARGS...` (`rbd`, `ceph`) and returns stdout; panics on failure.
    pub fn tool(&self, tool: &str, args: &[&str]) -> String {
        let out = Command::new(tool)
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn rbd(&self, args: &[&str]) -> String {
        self.tool("rbd", args)
    }

    pub fn ceph(&self, args: &[&str]) -> String {
        self.tool("ceph", args)
    }

    /// Creates image `rbd/NAME` of `size` bytes (a new name per test: images persist for
    /// the cluster's lifetime).
    pub fn create_image(&self, name: &str, size: u64) {
        self.rbd(&[
            "create",
            "--size",
            &format!("{}K", size / 1024),
            &format!("rbd/{name}"),
        ]);
    }

    /// The bytes of image `spec` (`pool/image[@snap]`) read through python3-rbd, librbd's
    /// own Python binding: the oracle the NBD view is compared with.
    pub fn read_image(&self, spec: &str) -> Vec<u8> {
        let (path, snap) = match spec.split_once('@') {
            Some((p, s)) => (p, Some(s)),
            None => (spec, None),
        };
        let (pool, image) = path.split_once('/').unwrap();
        let script = format!(
            "import rados, rbd, sys\n\
             c = rados.Rados(conffile={conf:?})\n\
             c.connect()\n\
             io = c.open_ioctx({pool:?})\n\
             img = rbd.Image(io, {image:?}, snapshot={snap}, read_only=True)\n\
             size = img.size()\n\
             off = 0\n\
             while off < size:\n\
             \x20   n = min(4 << 20, size - off)\n\
             \x20   sys.stdout.buffer.write(img.read(off, n))\n\
             \x20   off += n\n\
             img.close(); io.close(); c.shutdown()\n",
            conf = self.conf_str(),
            snap = snap.map_or("None".to_string(), |s| format!("{s:?}")),
        );
        let out = Command::new(PYTHON)
            .args(["-c", &script])
            .stdin(Stdio::null())
            .output()
            .expect("run /usr/bin/python3 (python3-rbd: scripts/test.sh installs it)");
        assert!(
            out.status.success(),
            "python3-rbd read of {spec}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// The bytes of image `spec` as `rbd export` writes them.
    pub fn export_image(&self, spec: &str) -> Vec<u8> {
        let file = self
            .dir
            .join(format!("export-{}", spec.replace(['/', '@'], "_")));
        let _ = std::fs::remove_file(&file);
        self.rbd(&["export", "--no-progress", spec, file.to_str().unwrap()]);
        let bytes = std::fs::read(&file).unwrap();
        std::fs::remove_file(&file).unwrap();
        bytes
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.owned {
            self.down();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Tears the cluster in `dir` down once this process is gone, however it ended. `down` is
/// idempotent, so the normal teardown and the watchdog's do not conflict.
fn watchdog(dir: &Path) {
    let pid = std::process::id();
    let cmd = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; bash '{}' down '{}'; rm -rf '{}'",
        script().display(),
        dir.display(),
        dir.display()
    );
    let _ = Command::new("setsid")
        .args(["sh", "-c", &cmd])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}

static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();

/// The cluster shared by every test of this binary, started on first use.
pub fn shared() -> &'static Cluster {
    let r = SHARED.get_or_init(|| {
        let c = Cluster::try_start()?;
        extern "C" fn teardown() {
            if let Some(Ok(c)) = SHARED.get() {
                c.down();
                let _ = std::fs::remove_dir_all(&c.dir);
            }
        }
        // SAFETY: registers a plain function to run at process exit; it only reads the
        // OnceLock (initialised by then) and runs the teardown script.
        unsafe { libc::atexit(teardown) };
        Ok(c)
    });
    match r {
        Ok(c) => c,
        Err(e) => panic!("no Ceph cluster for this test: {e}"),
    }
}
