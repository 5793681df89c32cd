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
    /// The child is strace, and the daemon its child ([`QmpDaemon::sluice_traced`]).
    traced: bool,
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

    /// [`QmpDaemon::sluice`] under `strace -f -qq -e trace=CALLS -o LOG`, for tests of the
    /// system calls a job makes. `quit` ends both; a drop kills sluice, then strace.
    pub fn sluice_traced(calls: &str, log: &Path, args: &[&str]) -> QmpDaemon {
        let dir = tempfile::tempdir().unwrap();
        let qmp = dir.path().join("qmp.sock");
        let mut cmd = Command::new("strace");
        cmd.args(["-f", "-qq", "-e", &format!("trace={calls}"), "-o"])
            .arg(log)
            .arg(sluice_bin())
            .arg("daemon")
            .arg("--qmp")
            .arg(&qmp);
        let mut d = Self::start(cmd, dir, qmp, args);
        d.traced = true;
        d
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
            traced: false,
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

    /// The URI of `export` on the daemon's NBD server at `{dir}/nbd.sock` (where
    /// [`start_nbd`] or `--nbd-server addr.type=unix,addr.path={dir}/nbd.sock` puts it).
    pub fn nbd_uri(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            super::path_str(&self.path("nbd.sock"))
        )
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
            if self.traced {
                // Killing strace would only detach it from the daemon.
                super::strace::signal_traced(c.id(), libc::SIGKILL);
            }
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

    /// Runs a command and gives its outcome as one comparable value: the return value, or
    /// the string `error:CLASS:DESC` (for transcripts compared between sluice and qsd).
    pub fn outcome(&mut self, name: &str, args: Value) -> Value {
        let r = self.exec(name, args);
        match r.get("error") {
            Some(e) => json!(format!(
                "error:{}:{}",
                e["class"].as_str().unwrap(),
                e["desc"].as_str().unwrap()
            )),
            None => r["return"].clone(),
        }
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

/// qemu-storage-daemon's messages, as [`short`] names, for a job that its command starts
/// (`created`, `running`, then the reply) and that runs to its end with auto-finalize and
/// auto-dismiss: what `run_until(c, command, "null")` reads.
pub const JOB_RUNS_TO_THE_END: [&str; 8] = [
    "created",
    "running",
    "return",
    "waiting",
    "pending",
    "BLOCK_JOB_COMPLETED",
    "concluded",
    "null",
];

/// A message as a short name: `return`, `error:DESC`, the event's name, or for
/// JOB_STATUS_CHANGE the job's new status alone (`created`, `running`...: lower case, so
/// never confused with an event's name).
pub fn short(v: &Value) -> String {
    if let Some(e) = v["event"].as_str() {
        return match v["data"]["status"].as_str() {
            Some(s) if e == "JOB_STATUS_CHANGE" => s.to_string(),
            _ => e.to_string(),
        };
    }
    if v.get("return").is_some() {
        "return".into()
    } else {
        format!("error:{}", v["error"]["desc"].as_str().unwrap_or(""))
    }
}

/// The [`short`] names of `msgs`, in order.
pub fn names(msgs: &[Value]) -> Vec<String> {
    msgs.iter().map(short).collect()
}

/// Sends `cmd` and reads messages until `last` (a [`short`] name; `return`: the reply, error
/// or not) has been read after the reply. Returns every message read, in order (none is
/// kept in `c.events`).
pub fn run_until(c: &mut Qmp, cmd: Value, last: &str) -> Vec<Value> {
    c.send(&cmd);
    let mut got = Vec::new();
    let mut replied = false;
    loop {
        let v = c.read_value().expect("connection closed");
        let reply = v.get("event").is_none();
        replied |= reply;
        let done = replied && (short(&v) == last || (last == "return" && reply));
        got.push(v);
        if done {
            return got;
        }
    }
}

/// Runs a command that must succeed with an empty return.
#[track_caller]
pub fn ok(c: &mut Qmp, cmd: &str, args: Value) {
    let r = c.exec(cmd, args.clone());
    assert_eq!(r, json!({"return": {}}), "{cmd} {args}");
}

/// The [`short`] names of the events read so far (kept in `c.events`), in order.
pub fn seen(c: &Qmp) -> Vec<String> {
    names(&c.events)
}

/// Reads events into `c.events` until one whose [`short`] name is `name` has arrived (or
/// returns it if it was read before), for up to `limit`; panics on a reply meanwhile.
pub fn wait_for(c: &mut Qmp, name: &str, limit: Duration) -> Value {
    if let Some(v) = c.events.iter().find(|v| short(v) == name) {
        return v.clone();
    }
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(line) = c.try_read_line(Duration::from_millis(100)) {
            let v: Value = serde_json::from_str(&line).unwrap();
            assert!(v.get("event").is_some(), "unexpected reply {v}");
            c.events.push(v.clone());
            if short(&v) == name {
                return v;
            }
        }
    }
    panic!("no {name} within {limit:?}; saw {:?}", seen(c));
}

/// `file` driver options for the image at `path`.
pub fn file(path: &Path, read_only: bool) -> Value {
    json!({"driver": "file", "filename": super::path_str(path), "read-only": read_only})
}

/// A daemon with the qcow2 image `top` opened read-write as node `top` (its backing chain
/// from the headers), and a negotiated monitor connection.
pub fn daemon_with_top(top: &Path) -> (QmpDaemon, Qmp) {
    let d = QmpDaemon::sluice(&[]);
    let mut c = d.connect_negotiated();
    let r = c.exec(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top",
               "file": {"driver": "file", "filename": super::path_str(top)}}),
    );
    assert_eq!(r, json!({"return": {}}), "blockdev-add; {}", d.stderr());
    (d, c)
}

/// The `query-named-block-nodes` entry of node `name`.
pub fn named_node(c: &mut Qmp, name: &str) -> Value {
    let nodes = c.exec("query-named-block-nodes", json!({}));
    nodes["return"]
        .as_array()
        .unwrap_or_else(|| panic!("{nodes}"))
        .iter()
        .find(|n| n["node-name"] == name)
        .unwrap_or_else(|| panic!("no node {name}: {nodes}"))
        .clone()
}

/// A daemon with the qcow2 images `base` and `mid` (read-only) and `top` (writable) added
/// as nodes of those names, each naming its backing node, and a negotiated connection.
pub fn daemon_with_named_chain(base: &Path, mid: &Path, top: &Path) -> (QmpDaemon, Qmp) {
    let d = QmpDaemon::sluice(&[]);
    let mut c = d.connect_negotiated();
    for args in [
        json!({"driver": "qcow2", "node-name": "base", "read-only": true,
               "file": file(base, true)}),
        json!({"driver": "qcow2", "node-name": "mid", "read-only": true, "backing": "base",
               "file": file(mid, true)}),
        json!({"driver": "qcow2", "node-name": "top", "backing": "mid",
               "file": file(top, false)}),
    ] {
        assert_eq!(c.exec("blockdev-add", args), json!({"return": {}}));
    }
    (d, c)
}

/// `nbd-server-start` on the daemon's `{dir}/nbd.sock` (see [`QmpDaemon::nbd_uri`]).
pub fn start_nbd(c: &mut Qmp, d: &QmpDaemon) {
    ok(
        c,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": super::path_str(&d.path("nbd.sock"))}}}),
    );
}

/// The `dirty-bitmaps` of node `node`, as (name, count, granularity, recording, persistent,
/// inconsistent) sorted by name.
pub fn node_bitmaps(q: &mut Qmp, node: &str) -> Vec<(String, u64, u64, bool, bool, bool)> {
    let r = q.exec("query-named-block-nodes", json!({"flat": true}));
    let n = r["return"]
        .as_array()
        .unwrap_or_else(|| panic!("{r}"))
        .iter()
        .find(|n| n["node-name"] == node)
        .unwrap_or_else(|| panic!("no node {node}: {r}"))
        .clone();
    let mut v: Vec<_> = n["dirty-bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["count"].as_u64().unwrap(),
                b["granularity"].as_u64().unwrap(),
                b["recording"].as_bool().unwrap(),
                b["persistent"].as_bool().unwrap(),
                b["inconsistent"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    v.sort();
    v
}

/// Exports `node` writable as `node` on the daemon's NBD server, runs qemu-io `cmds` on it,
/// then deletes the export and waits until it is gone.
pub fn write_through_export(q: &mut Qmp, d: &QmpDaemon, node: &str, cmds: &[&str]) {
    ok(
        q,
        "block-export-add",
        json!({"type": "nbd", "id": node, "node-name": node, "writable": true}),
    );
    super::qemu_io(&d.nbd_uri(node), cmds);
    ok(q, "block-export-del", json!({"id": node}));
    wait_for(q, "BLOCK_EXPORT_DELETED", Duration::from_secs(10));
}
