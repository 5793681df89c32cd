//! QMP test helpers: start `sluice daemon` (or qemu-storage-daemon, for comparisons) with a
//! monitor socket in a private directory, talk raw QMP to it line by line, and run Python
//! scripts with the `qemu.qmp` client library.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{sluice_bin, wait_timeout};

/// The Python that has `qemu.qmp` (`pip install qemu.qmp`, done by scripts/test.sh): the
/// `python3` first on PATH. (Debian's /usr/bin/python3, used for libnbd, does not have it.)
pub const QMP_PYTHON: &str = "python3";

/// A running daemon with a QMP monitor socket, killed when dropped.
pub struct QmpDaemon {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    /// The monitor socket.
    pub qmp: PathBuf,
    stderr_path: PathBuf,
}

impl QmpDaemon {
    /// `sluice daemon --qmp DIR/qmp.sock ARGS...`, waiting until the monitor greets.
    /// `{dir}` in an argument is replaced by the private directory.
    pub fn sluice(args: &[&str]) -> QmpDaemon {
        let dir = tempfile::tempdir().unwrap();
        let qmp = dir.path().join("qmp.sock");
        let mut cmd = Command::new(sluice_bin());
        cmd.arg("daemon").arg("--qmp").arg(&qmp);
        Self::start(cmd, dir, qmp, args)
    }

    /// qemu-storage-daemon with the same kind of monitor, for comparisons.
    pub fn qsd(args: &[&str]) -> QmpDaemon {
        let dir = tempfile::tempdir().unwrap();
        let qmp = dir.path().join("qmp.sock");
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--chardev")
            .arg(format!(
                "socket,id=m,path={},server=on,wait=off",
                qmp.display()
            ))
            .arg("--monitor")
            .arg("chardev=m");
        Self::start(cmd, dir, qmp, args)
    }

    fn start(mut cmd: Command, dir: tempfile::TempDir, qmp: PathBuf, args: &[&str]) -> QmpDaemon {
        let d = dir.path().to_str().unwrap().to_string();
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let child = cmd
            .args(args.iter().map(|a| a.replace("{dir}", &d)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e} (run scripts/test.sh)"));
        let mut daemon = QmpDaemon {
            child: Some(child),
            dir,
            qmp,
            stderr_path,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(s) = UnixStream::connect(&daemon.qmp) {
                let mut c = Qmp::from_stream(s);
                if c.read_line().is_some() {
                    return daemon;
                }
            }
            if let Some(st) = daemon.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited with {st}: {}", daemon.stderr());
            }
            if Instant::now() > deadline {
                panic!("daemon did not start; stderr: {}", daemon.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A path inside the daemon's private directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A new monitor connection (greeting read, not negotiated).
    pub fn connect(&self) -> Qmp {
        Qmp::connect(&self.qmp)
    }

    /// A new monitor connection, negotiated.
    pub fn connect_negotiated(&self) -> Qmp {
        let mut c = self.connect();
        assert_eq!(
            c.cmd(json!({"execute": "qmp_capabilities"})),
            json!({"return": {}})
        );
        c
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Waits for the daemon to exit and returns its status.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon already stopped");
        wait_timeout(&mut child, Duration::from_secs(30)).expect("daemon did not exit")
    }

    /// Sends a signal, then waits for the exit status.
    pub fn signal(&mut self, sig: i32) -> std::process::ExitStatus {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.as_ref().unwrap().id() as i32, sig) };
        self.wait()
    }

    pub fn assert_alive(&mut self) {
        if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("daemon exited ({st}); stderr:\n{}", self.stderr());
        }
        assert!(
            !self.stderr().contains("panicked"),
            "daemon panicked:\n{}",
            self.stderr()
        );
    }
}

impl Drop for QmpDaemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A raw QMP connection: lines in, JSON values out. Events read while waiting for a reply are
/// kept in `events`.
pub struct Qmp {
    pub stream: UnixStream,
    buf: Vec<u8>,
    pub greeting: Value,
    pub events: Vec<Value>,
}

impl Qmp {
    pub fn connect(path: &Path) -> Qmp {
        let s =
            UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        let mut q = Qmp::from_stream(s);
        q.greeting = q.read_value().expect("greeting");
        q
    }

    fn from_stream(stream: UnixStream) -> Qmp {
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Qmp {
            stream,
            buf: Vec::new(),
            greeting: Value::Null,
            events: Vec::new(),
        }
    }

    /// Writes bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    pub fn send(&mut self, v: &Value) {
        let mut line = serde_json::to_vec(v).unwrap();
        line.push(b'\n');
        self.send_raw(&line);
    }

    /// The next line (without CRLF), or None at end of stream or timeout.
    pub fn read_line(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..i + 2).take(i).collect();
                return Some(String::from_utf8(line).expect("QMP output is ASCII"));
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Like [`Qmp::read_line`] with a short timeout: None if nothing arrives in `t`.
    pub fn try_read_line(&mut self, t: Duration) -> Option<String> {
        self.stream.set_read_timeout(Some(t)).unwrap();
        let r = self.read_line();
        self.stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        r
    }

    pub fn read_value(&mut self) -> Option<Value> {
        let line = self.read_line()?;
        assert!(line.is_ascii(), "non-ASCII output: {line}");
        Some(
            serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("bad JSON from server: {e}: {line}")),
        )
    }

    /// The next reply (`return` or `error`), keeping events that come first.
    pub fn reply(&mut self) -> Value {
        loop {
            let v = self
                .read_value()
                .expect("connection closed before the reply");
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    /// Sends a command and returns its reply.
    pub fn cmd(&mut self, v: Value) -> Value {
        self.send(&v);
        self.reply()
    }

    /// Sends `execute` with `arguments` and returns the reply.
    pub fn exec(&mut self, name: &str, args: Value) -> Value {
        self.cmd(json!({"execute": name, "arguments": args}))
    }

    /// The `error` of a reply as (class, desc); panics on success.
    pub fn error(reply: &Value) -> (String, String) {
        let e = reply
            .get("error")
            .unwrap_or_else(|| panic!("expected an error: {reply}"));
        (
            e["class"].as_str().unwrap().to_string(),
            e["desc"].as_str().unwrap().to_string(),
        )
    }

    /// Waits for an event named `name` (read so far or arriving within 10 s).
    pub fn wait_event(&mut self, name: &str) -> Value {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return self.events.remove(i);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(line) = self.try_read_line(Duration::from_millis(200)) {
                let v: Value = serde_json::from_str(&line).unwrap();
                if v["event"] == name {
                    return v;
                }
                self.events.push(v);
            }
        }
        panic!("no {name} event; saw {:?}", self.events);
    }

    /// True once the server has closed the connection (within 10 s); lines read meanwhile
    /// go to `events`.
    pub fn closed(&mut self) -> bool {
        self.stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        loop {
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
            while let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..i + 2).take(i).collect();
                self.events.push(serde_json::from_slice(&line).unwrap());
            }
        }
    }
}

/// Runs a Python script with the `qemu.qmp` library; `args` become `sys.argv[1:]`. Returns
/// stdout; panics with stderr if the script fails.
pub fn run_qmp_python(script: &str, args: &[&str]) -> String {
    let out = Command::new(QMP_PYTHON)
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {QMP_PYTHON}: {e}"));
    assert!(
        out.status.success(),
        "python script failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
