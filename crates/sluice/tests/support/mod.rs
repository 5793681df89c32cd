//! Shared helpers for the integration tests: start the real `sluice` binary, wait until it
//! serves, run the real NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy, nbdsh/libnbd) and
//! stop the server. The test binary's root (`integration.rs`) declares it; each test module `use`s
//! `crate::support`.
#![allow(dead_code)]

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The python that can import Debian's libnbd bindings.
pub const PYTHON: &str = "/usr/bin/python3";

pub fn sluice_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sluice")
}

/// A sluice server on a private Unix socket, stopped (SIGTERM) when dropped.
pub struct Server {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    stderr_path: PathBuf,
}

impl Server {
    /// Starts `sluice serve -f -U SOCKET ARGS...` and waits until it accepts NBD clients.
    pub fn start(args: &[&str]) -> Server {
        Self::try_start(args).unwrap_or_else(|e| panic!("sluice {args:?} did not start: {e}"))
    }

    /// [`Server::start`], returning why the server did not start instead of panicking.
    pub fn try_start(args: &[&str]) -> Result<Server, String> {
        Server::try_start_program(sluice_bin(), &["serve", "-f", "-U"], args)
    }

    /// nbd+unix URI of the default export (or `export`).
    pub fn uri(&self) -> String {
        self.uri_for("")
    }

    pub fn uri_for(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// qemu's spelling of the same export.
    pub fn qemu_uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("server already stopped");
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        wait_timeout(&mut child, Duration::from_secs(30)).expect("server did not exit on SIGTERM")
    }

    /// Asserts the server process is still alive.
    pub fn assert_alive(&mut self) {
        if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("server exited ({st}); stderr:\n{}", self.stderr());
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn wait_timeout(child: &mut Child, t: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + t;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command and returns its output, panicking with its stderr if it failed.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = output(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn output(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e} (run scripts/test.sh to install it)"))
}

/// Runs a Python script with Debian's python3 (libnbd importable as `nbd`), with `uri` set
/// as a global, and returns its stdout. Panics if the script fails.
pub fn nbdsh(uri: &str, script: &str) -> String {
    let full = format!("import nbd, sys, os, errno\nuri = {uri:?}\n{script}\n");
    run(PYTHON, &["-c", &full])
}

/// A libnbd client in a process of its own (Debian's python3) that holds a connection open
/// until released: it connects to `uri`, runs `on_connect` (Python, the handle is `h`) and
/// says `connected`; once its stdin closes it tries one read and reports `read ok` or
/// `read failed ERRNO`.
pub struct NbdHolder {
    child: Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl NbdHolder {
    /// Starts the client and waits until it is connected (and `on_connect` passed).
    pub fn connect(uri: &str, on_connect: &str) -> NbdHolder {
        let script = format!(
            "import nbd, sys\nh = nbd.NBD(); h.connect_uri(sys.argv[1])\n{on_connect}\n\
             print('connected', flush=True)\nsys.stdin.read()\n\
             try:\n    h.pread(512, 0); print('read ok')\n\
             except nbd.Error as e:\n    print('read failed', e.errno)\n"
        );
        let mut child = Command::new(PYTHON)
            .arg("-c")
            .arg(script)
            .arg(uri)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {PYTHON}: {e} (run scripts/test.sh)"));
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
        assert_eq!(line, "connected\n");
        NbdHolder { child, stdout }
    }

    /// Lets the client go on: returns what its read reported (`read ok\n`,
    /// `read failed ENOTCONN\n`...), after checking that it exited successfully.
    pub fn release(mut self) -> String {
        drop(self.child.stdin.take());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut self.stdout, &mut line).unwrap();
        assert!(self.child.wait().unwrap().success());
        line
    }
}

/// A file of `len` bytes of a repeatable pseudo-random pattern.
pub fn random_file(path: &Path, len: usize, seed: u64) {
    std::fs::write(path, random_bytes(len, seed)).unwrap();
}

pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub mod captive;
pub mod ceph;
pub mod crash;
pub mod image;
pub mod live;
pub mod raw;
pub mod strace;
pub mod tls;

impl Server {
    /// Asserts the server's stderr shows no Rust panic (on any thread, including ones that
    /// did not take the process down).
    pub fn assert_no_panic(&self) {
        let err = self.stderr();
        assert!(!err.contains("panicked"), "server panicked; stderr:\n{err}");
    }

    /// Asserts the server still serves new clients: nbdinfo completes a handshake on the
    /// default export (or `export`) and the process is alive without having panicked.
    pub fn assert_serving(&mut self, export: &str) {
        run("nbdinfo", &["--size", &self.uri_for(export)]);
        self.assert_alive();
        self.assert_no_panic();
    }
}

impl Server {
    /// Starts nbdkit itself the way [`Server::start`] starts sluice (`nbdkit -f -U SOCKET
    /// ARGS...`), for tests that compare the two servers.
    pub fn try_start_nbdkit(args: &[&str]) -> Result<Server, String> {
        Server::try_start_program("nbdkit", &["-f", "-U"], args)
    }

    /// Starts `PROGRAM LEADING... SOCKET ARGS...` and waits until it greets NBD clients on
    /// SOCKET.
    pub fn try_start_program(
        program: &str,
        leading: &[&str],
        args: &[&str],
    ) -> Result<Server, String> {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let child = Command::new(program)
            .args(leading)
            .arg(&socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot run {program}: {e}"))?;
        let mut server = Server {
            child: Some(child),
            dir,
            socket,
            stderr_path,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) = UnixStream::connect(&server.socket) {
                // The greeting proves the server is serving.
                let mut magic = [0u8; 8];
                if s.read_exact(&mut magic).is_ok() && &magic == b"NBDMAGIC" {
                    return Ok(server);
                }
            }
            if let Some(st) = server.child.as_mut().unwrap().try_wait().unwrap() {
                return Err(format!("exited with {st}: {}", server.stderr()));
            }
            if Instant::now() > deadline {
                return Err(format!("timed out; stderr: {}", server.stderr()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Compiles the C test plugin `NAME.c` with the system `cc` against Debian's nbdkit headers
/// into `out_dir/NAME.so`. The source is this crate's `tests/plugins/NAME.c` if there is
/// one, else sluice-nbdkit's `crates/nbdkit/tests/plugins/NAME.c` (whose `common.h` both
/// may include).
pub fn compile_c_plugin(name: &str, out_dir: &Path) -> PathBuf {
    let ours = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/plugins");
    let nbdkit_tests = nbdkit_test_plugin_dir();
    let src = [&ours, &nbdkit_tests]
        .iter()
        .map(|d| d.join(format!("{name}.c")))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("no test plugin source {name}.c"));
    let out = out_dir.join(format!("{name}.so"));
    let status = Command::new("cc")
        .args([
            "-shared",
            "-fPIC",
            "-O1",
            "-Wall",
            "-Wno-unused-parameter",
            "-Werror",
        ])
        .arg("-I")
        .arg(&nbdkit_tests)
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .status()
        .expect("run cc (install gcc and nbdkit-plugin-dev: scripts/test.sh)");
    assert!(status.success(), "compiling {}", src.display());
    out
}

/// sluice-nbdkit's C test plugins.
pub fn nbdkit_test_plugin_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../nbdkit/tests/plugins")
}

/// Runs `qemu-io -f raw URI -c CMD...` and returns its stdout. qemu-io exits 0 even when a
/// command fails or `read -P` finds other bytes, so this also panics if the output reports a
/// pattern mismatch or any failed command.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    qemu_io_with(&[], uri, cmds)
}

/// Runs `qemu-io OPTIONS -f raw URI -c CMD...` and returns its output and its stdout
/// followed by its stderr as text, whatever they say.
pub fn qemu_io_run(options: &[&str], uri: &str, cmds: &[&str]) -> (std::process::Output, String) {
    let mut args = options.to_vec();
    args.extend(["-f", "raw", uri]);
    for c in cmds {
        args.extend(["-c", c]);
    }
    let out = output("qemu-io", &args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

/// [`qemu_io`] with extra qemu-io options before the image (`-r` for read-only exports).
pub fn qemu_io_with(options: &[&str], uri: &str, cmds: &[&str]) -> String {
    let (out, text) = qemu_io_run(options, uri, cmds);
    assert!(
        out.status.success()
            && !text.contains("Pattern verification failed")
            && !text.contains("failed")
            && !text.to_lowercase().contains("error"),
        "qemu-io {cmds:?} on {uri} ({}):\n{text}",
        out.status
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `qemu-io -f raw URI -c CMD...` without judging the result.
pub fn qemu_io_unchecked(uri: &str, cmds: &[&str]) -> Output {
    let mut args = vec!["-f", "raw", uri];
    for c in cmds {
        args.extend(["-c", c]);
    }
    output("qemu-io", &args)
}

/// `nbdinfo --json ARGS... URI`, parsed.
pub fn nbdinfo_json(args: &[&str], uri: &str) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    all.push(uri);
    let text = run("nbdinfo", &all);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("nbdinfo --json output: {e}\n{text}"))
}

/// The bytes of the whole export at `uri`, copied out with nbdcopy into `dir`.
pub fn export_bytes(uri: &str, dir: &Path) -> Vec<u8> {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out = dir.join(format!("export-copy-{n}.bin"));
    run("nbdcopy", &[uri, path_str(&out)]);
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

/// Asserts two byte strings are equal, reporting the first differing offset instead of
/// dumping megabytes.
#[track_caller]
pub fn assert_same_bytes(actual: &[u8], expected: &[u8], what: &str) {
    if let Some(i) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at offset {i}: {:#04x} != expected {:#04x}",
            actual[i], expected[i]
        );
    }
    assert_eq!(actual.len(), expected.len(), "{what}: lengths differ");
}

pub mod qmp;

/// The C test plugin `NAME.so` (see [`compile_c_plugin`]), compiled once per test binary into
/// [`c_plugin_build_dir`].
pub fn c_plugin(name: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, so)) = built.iter().find(|(n, _)| n == name) {
        return so.clone();
    }
    let so = compile_c_plugin(name, c_plugin_build_dir());
    built.push((name.to_string(), so.clone()));
    so
}

/// Where this test binary compiles C test plugins: a directory of its own under cargo's
/// target tmpdir.
pub fn c_plugin_build_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let stem = exe.file_stem().unwrap().to_string_lossy().into_owned();
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("c-plugins")
            .join(format!("{stem}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    })
}
pub mod filters;

/// Runs `sluice serve -f -U SOCK ARGS...` that must fail: (exit code, stderr).
pub fn serve_fails(args: &[&str]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let mut all = vec!["serve", "-f", "-U", path_str(&sock)];
    all.extend_from_slice(args);
    let out = output(sluice_bin(), &all);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The lines of `stderr` that are not log lines (timestamped warnings).
pub fn message_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.starts_with("sluice:"))
        .collect()
}
