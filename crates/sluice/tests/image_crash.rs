//! kill -9 of `sluice serve image` in the middle of a stream of writes (allocating new L2
//! tables and clusters, with flushes in between) never corrupts the image: `qemu-img check`
//! reports no errors, at most leaked clusters, and everything flushed before the kill reads
//! back.

use crate::support;

use support::image::{qemu_img_check, qemu_io};
use support::{path_str, Server};

/// The writer: 64 KiB writes at scattered offsets (every 5th unaligned, crossing clusters),
/// a flush every 8 writes, printing the count of flushed writes; after `n` writes it says
/// "go" and keeps writing until the server dies.
const WRITER: &str = r#"
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
n = int(os.environ["KILL_AFTER"])
i = 0
try:
    while True:
        off = (i * 7919 * 65536) % (size - 200000)
        if i % 5 == 0:
            off += 1234
        h.pwrite(bytes([i % 251 + 1]) * 65536, off)
        i += 1
        if i % 8 == 0:
            h.flush()
            print("flushed", i, flush=True)
        if i == n:
            print("go", flush=True)
except nbd.Error:
    pass
"#;

fn kill_during_writes_leaves_consistent_image(kill_after: u32) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    support::image::qemu_img(&["create", "-q", "-f", "qcow2", path_str(&img), "64G"]);
    let server = Server::start(&["image", path_str(&img), "format=qcow2"]);
    let script = format!("import nbd, os\nuri = {:?}\n{WRITER}", server.uri());
    let mut writer = std::process::Command::new(support::PYTHON)
        .args(["-c", &script])
        .env("KILL_AFTER", kill_after.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut flushed = 0;
    {
        use std::io::BufRead;
        let stdout = writer.stdout.as_mut().unwrap();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(n) = line.strip_prefix("flushed ") {
                flushed = n.parse().unwrap();
            }
            if line == "go" {
                // SAFETY: signalling our own child process.
                unsafe { libc::kill(server.pid(), libc::SIGKILL) };
                break;
            }
        }
    }
    writer.wait().unwrap();
    drop(server);

    let (code, out) = qemu_img_check(&img);
    assert!(code == 0 || code == 3, "qemu-img check exit {code}:\n{out}");
    assert!(!out.contains("ERROR"), "{out}");
    // The first flushed write (i = 0: offset 1234) reads back.
    assert!(flushed >= 8);
    qemu_io("qcow2", path_str(&img), &["read -P 1 1234 65536"]);
}

#[test]
fn kill_9_after_50_writes_leaves_consistent_image() {
    kill_during_writes_leaves_consistent_image(50);
}

#[test]
fn kill_9_after_300_writes_leaves_consistent_image() {
    kill_during_writes_leaves_consistent_image(300);
}
