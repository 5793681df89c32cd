//! Helpers for tests of live jobs (mirror, active commit): QMP exchanges as short names
//! (on [`super::qmp`]'s `run_until`), and an NBD client (python3-libnbd) kept open across a pivot, driven line by line.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use serde_json::{json, Value};

use super::image::qemu_io;
use super::path_str;
use super::qmp::{names, run_until, Qmp};

/// Sends `cmd` and reads messages until `last` has been read after the reply, as
/// [`run_until`]; returns their [`names`](super::qmp::names).
pub fn run_names(c: &mut Qmp, cmd: Value, last: &str) -> Vec<String> {
    names(&run_until(c, cmd, last))
}

/// One NBD connection kept open across the pivot: python3-libnbd driven line by line.
pub struct Client {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

const CLIENT: &str = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("size", h.get_size(), flush=True)
for line in sys.stdin:
    op, off, n, byte = line.split()
    off, n, byte = int(off), int(n), int(byte, 16)
    if op == "w":
        h.pwrite(bytes([byte]) * n, off)
        print("ok", flush=True)
    elif op == "r":
        got = h.pread(n, off)
        print("ok" if got == bytes([byte]) * n else "bad %r" % got[:16], flush=True)
    elif op == "f":
        h.flush()
        print("ok", flush=True)
h.shutdown()
"#;

impl Client {
    pub fn connect(uri: &str) -> Client {
        let mut child = Command::new("/usr/bin/python3")
            .args(["-c", CLIENT, uri])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3-libnbd (run scripts/test.sh)");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert!(line.starts_with("size "), "client: {line}");
        Client {
            child,
            stdin,
            stdout,
        }
    }

    pub fn op(&mut self, op: &str, offset: u64, len: u64, byte: u8) {
        writeln!(self.stdin, "{op} {offset} {len} {byte:x}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ok", "{op} {offset} {len} {byte:#x}");
    }

    /// Writes through the connection and into the expected image.
    pub fn write(&mut self, expected: &Path, offset: u64, len: u64, byte: u8) {
        self.op("w", offset, len, byte);
        qemu_io(
            "raw",
            path_str(expected),
            &[&format!("write -P {byte} {offset} {len}")],
        );
    }

    pub fn close(mut self) {
        drop(self.stdin);
        let st = self.child.wait().unwrap();
        assert!(st.success(), "client exited with {st}");
    }
}

pub fn query_job(c: &mut Qmp) -> Value {
    let r = c.exec("query-block-jobs", json!({}));
    r["return"][0].clone()
}

pub fn assert_same(img: &Path, raw: &Path) {
    let out = super::output(
        "qemu-img",
        &["compare", "-F", "raw", path_str(img), path_str(raw)],
    );
    assert!(
        out.status.success(),
        "{} differs from {}: {}{}",
        img.display(),
        raw.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
