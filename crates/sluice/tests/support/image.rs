//! Helpers for the `image_*` tests: image fixtures made with qemu-img and qemu-io at test
//! time, qemu-nbd as the reference server, and the comparisons the tests assert on.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{output, path_str, run, wait_timeout};

/// A fixture: image files in a temporary directory, `top` being the one to serve.
pub struct Images {
    pub dir: tempfile::TempDir,
    pub top: PathBuf,
}

impl Images {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A copy of every file of the fixture in a new directory (backing names are relative,
    /// so the copy is a chain of its own).
    pub fn copy(&self) -> Images {
        let dir = tempfile::tempdir().unwrap();
        for e in std::fs::read_dir(self.dir.path()).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
        }
        let top = dir.path().join(self.top.file_name().unwrap());
        Images { dir, top }
    }

    /// The chain flattened to raw (`flat.raw` in the fixture's directory) by qemu-img,
    /// before anything else touches it: the content the top must keep.
    pub fn flattened(&self) -> PathBuf {
        let flat = self.path("flat.raw");
        flatten(&self.top, &flat);
        flat
    }
}

/// Runs qemu-img and returns its stdout (panics on failure).
pub fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

/// Runs qemu-io with `-f FORMAT` and one `-c` per command; panics if it reports a failure.
pub fn qemu_io(format: &str, target: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", format];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(target);
    let out = run("qemu-io", &args);
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io {cmds:?} on {target}: {out}"
    );
    out
}

/// The image at `top` (with its chain) converted to raw at `out`.
pub fn flatten(top: &Path, out: &Path) {
    qemu_img(&["convert", "-O", "raw", path_str(top), path_str(out)]);
}

/// The image's `qemu-img info --output=json` (`-U`: read while a daemon may still hold the
/// image, which is what shows that a change of its header is durable at once).
pub fn image_info(path: &Path) -> serde_json::Value {
    serde_json::from_str(&qemu_img(&["info", "-U", "--output=json", path_str(path)])).unwrap()
}

/// `qemu-img create -q -f qcow2 OPTS... -b BACKING -F qcow2 PATH [SIZE]`: a qcow2 layer over
/// the qcow2 image `backing`, named as the header will hold it (relative to `path`'s
/// directory, so that a copy of the directory is a chain of its own). Without `size`, the
/// backing image's.
pub fn qcow2_over(path: &Path, backing: &str, opts: &[&str], size: Option<&str>) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(opts);
    args.extend(["-b", backing, "-F", "qcow2", path_str(path)]);
    args.extend(size);
    qemu_img(&args);
}

/// Three 4 MiB qcow2 layers in `dir` with unaligned data in each and different cluster sizes:
/// `PREFIXbase` (64 KiB clusters) <- `PREFIXmid` (4 KiB clusters, also a zero range over base
/// data) <- `PREFIXtop`, each `.qcow2`, with relative backing names. Returns (base, mid, top).
pub fn qcow2_chain(dir: &Path, prefix: &str) -> (PathBuf, PathBuf, PathBuf) {
    let name = |n: &str| format!("{prefix}{n}.qcow2");
    let (base, mid, top) = (
        dir.join(name("base")),
        dir.join(name("mid")),
        dir.join(name("top")),
    );
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&base), "4M"]);
    qemu_io(
        "qcow2",
        path_str(&base),
        &["write -P 0x11 0 1M", "write -P 0x12 3000001 77777"],
    );
    qcow2_over(
        &mid,
        &name("base"),
        &["-o", "cluster_size=4096"],
        Some("4M"),
    );
    qemu_io(
        "qcow2",
        path_str(&mid),
        &[
            "write -P 0x21 100001 300000",
            "write -z 700000 10000",
            "write -P 0x22 2000003 5000",
            "write -P 0x23 3050000 1234",
        ],
    );
    qcow2_over(&top, &name("mid"), &[], Some("4M"));
    qemu_io(
        "qcow2",
        path_str(&top),
        &["write -P 0x31 200000 4321", "write -P 0x32 2001000 100"],
    );
    (base, mid, top)
}

fn create(dir: &Path, name: &str, opts: &[&str], size: Option<&str>) -> PathBuf {
    let p = dir.join(name);
    let mut args = vec!["create", "-q"];
    args.extend_from_slice(opts);
    args.push(path_str(&p));
    if let Some(s) = size {
        args.push(s);
    }
    qemu_img(&args);
    p
}

/// One qcow2 layer (8 MiB, no backing): deflate-compressed clusters, a zero cluster, an
/// all-zero compressed range, and unaligned data written after conversion.
pub fn one_layer() -> Images {
    let dir = tempfile::tempdir().unwrap();
    let src = create(dir.path(), "src.raw", &["-f", "raw"], Some("8M"));
    qemu_io(
        "raw",
        path_str(&src),
        &["write -P 0x5a 0 3M", "write -P 0 4M 1M"],
    );
    let top = dir.path().join("top.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        path_str(&src),
        path_str(&top),
    ]);
    std::fs::remove_file(&src).unwrap();
    qemu_io(
        "qcow2",
        path_str(&top),
        &[
            "write -P 0x66 5000001 33333",
            "write -z 6M 128k",
            "write -P 0x67 7654321 4321",
        ],
    );
    Images { dir, top }
}

/// Two layers: a sparse raw base (4 MiB) under a qcow2 top of 5 MiB (longer than its base)
/// with unaligned data and zero clusters (one unmapped, one allocated).
pub fn two_layers() -> Images {
    let dir = tempfile::tempdir().unwrap();
    let base = create(dir.path(), "base.raw", &["-f", "raw"], Some("4M"));
    qemu_io(
        "raw",
        path_str(&base),
        &["write -P 0x11 0 1M", "write -P 0x12 2M 100k"],
    );
    let top = create(
        dir.path(),
        "top.qcow2",
        &["-f", "qcow2", "-b", "base.raw", "-F", "raw"],
        Some("5M"),
    );
    qemu_io(
        "qcow2",
        path_str(&top),
        &[
            "write -P 0x21 512k 1M",
            "write -z 3M 64k",
            "write -P 0x22 3333 7777",
            "write -z -u 2M 128k",
            "write -P 0x32 4500000 300000",
        ],
    );
    Images { dir, top }
}

/// Three qcow2 layers with different cluster sizes: a v2 (compat=0.10) base with 4 KiB
/// clusters, a 512-byte-cluster middle with a zero range, and a default top of 3 MiB.
pub fn three_layers() -> Images {
    let dir = tempfile::tempdir().unwrap();
    let base = create(
        dir.path(),
        "base.qcow2",
        &["-f", "qcow2", "-o", "compat=0.10,cluster_size=4096"],
        Some("2M"),
    );
    qemu_io("qcow2", path_str(&base), &["write -P 1 0 1M"]);
    let mid = create(
        dir.path(),
        "mid.qcow2",
        &[
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
        ],
        Some("3M"),
    );
    qemu_io(
        "qcow2",
        path_str(&mid),
        &["write -P 2 100000 300000", "write -z 700000 10000"],
    );
    let top = create(
        dir.path(),
        "top.qcow2",
        &["-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2"],
        None,
    );
    qemu_io(
        "qcow2",
        path_str(&top),
        &["write -P 3 1M 64k", "write -P 4 2500000 100"],
    );
    Images { dir, top }
}

/// A lone qcow2 v2 image (no zero clusters in the format) with 4 KiB clusters.
pub fn v2_alone() -> Images {
    let dir = tempfile::tempdir().unwrap();
    let top = create(
        dir.path(),
        "top.qcow2",
        &["-f", "qcow2", "-o", "compat=0.10,cluster_size=4096"],
        Some("2M"),
    );
    qemu_io("qcow2", path_str(&top), &["write -P 1 0 1M"]);
    Images { dir, top }
}

/// qemu-nbd serving one image on a private socket, stopped when dropped.
pub struct QemuNbd {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
}

impl QemuNbd {
    /// `qemu-nbd -t -k SOCKET ARGS...`, waiting until it greets a client. qemu-nbd listens
    /// before it opens (and locks) the image, so a socket that accepts a connection is not
    /// enough: the greeting comes once the export is up.
    pub fn start(args: &[&str]) -> QemuNbd {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("q.sock");
        let child = Command::new("qemu-nbd")
            .args(["-t", "-k"])
            .arg(&socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot run qemu-nbd (run scripts/test.sh to install it)");
        let deadline = Instant::now() + Duration::from_secs(20);
        let greeted = || {
            use std::io::Read;
            let mut s = std::os::unix::net::UnixStream::connect(&socket).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            let mut magic = [0u8; 8];
            s.read_exact(&mut magic).ok()?;
            (&magic == b"NBDMAGIC").then_some(())
        };
        while greeted().is_none() {
            assert!(Instant::now() < deadline, "qemu-nbd {args:?} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuNbd {
            child: Some(child),
            dir,
            socket,
        }
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            if wait_timeout(&mut c, Duration::from_secs(10)).is_none() {
                let _ = c.wait();
            }
        }
    }
}

/// `nbdinfo --map=CONTEXT URI`.
pub fn nbdinfo_map(uri: &str, context: &str) -> String {
    run("nbdinfo", &[&format!("--map={context}"), uri])
}

/// `qemu-img map --output=json TARGET` (a file or an NBD URI).
pub fn qemu_img_map(target: &str) -> String {
    qemu_img(&["map", "--output=json", target])
}

/// qemu-img map JSON reduced to what NBD `base:allocation` can carry: runs of
/// (start, length, data, zero), adjacent equal runs merged.
pub fn data_zero_runs(map_json: &str) -> Vec<(u64, u64, bool, bool)> {
    let v: serde_json::Value = serde_json::from_str(map_json).unwrap();
    let mut runs: Vec<(u64, u64, bool, bool)> = Vec::new();
    for e in v.as_array().unwrap() {
        let start = e["start"].as_u64().unwrap();
        let len = e["length"].as_u64().unwrap();
        let data = e["data"].as_bool().unwrap();
        let zero = e["zero"].as_bool().unwrap();
        match runs.last_mut() {
            Some(last) if last.2 == data && last.3 == zero && last.0 + last.1 == start => {
                last.1 += len
            }
            _ => runs.push((start, len, data, zero)),
        }
    }
    runs
}

/// `qemu-img check` of an image: (exit code, output). 0 is clean, 3 means leaked clusters
/// only, 2 means corruption.
pub fn qemu_img_check(path: &Path) -> (i32, String) {
    let out = output("qemu-img", &["check", path_str(path)]);
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}
