//! Fixtures for the node tests: images made at test time with qemu-img and qemu-io, and
//! short ways to open, read and inspect nodes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use serde_json::json;
use sluice_block::extents::Extents;

use super::{open_node, Node};
use crate::error::ImageError;
use crate::options::BlockdevOptions;

pub(super) fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e} (run scripts/test.sh)"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(super) fn qemu_io(format: &str, path: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", format];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(path.to_str().unwrap());
    run("qemu-io", &args);
}

/// `qemu-img create -q OPTS DIR/NAME [SIZE]`.
pub(super) fn create(dir: &Path, name: &str, opts: &[&str], size: Option<&str>) -> PathBuf {
    let p = dir.join(name);
    let mut a = vec!["create", "-q"];
    a.extend_from_slice(opts);
    a.push(p.to_str().unwrap());
    a.extend(size);
    run("qemu-img", &a);
    p
}

pub(super) fn no_nodes(_: &str) -> Option<Arc<Node>> {
    None
}

pub(super) fn open_json(v: serde_json::Value) -> Result<Arc<Node>, ImageError> {
    open_node(&BlockdevOptions::from_json(&v).unwrap(), &no_nodes)
}

pub(super) fn qcow2_opts(path: &Path, read_only: bool) -> serde_json::Value {
    json!({"driver": "qcow2", "read-only": read_only,
           "file": {"driver": "file", "filename": path, "read-only": read_only}})
}

/// A new writable 1 MiB qcow2 `o.qcow2` in `dir`, opened without a backing: a snapshot's
/// overlay.
pub(super) fn bare_overlay(dir: &Path) -> Arc<Node> {
    let o = create(dir, "o.qcow2", &["-f", "qcow2"], Some("1M"));
    let mut v = qcow2_opts(&o, false);
    v["backing"] = serde_json::Value::Null;
    open_json(v).unwrap()
}

pub(super) fn read(node: &Node, len: usize, offset: u64) -> Vec<u8> {
    let mut buf = vec![0xee; len];
    node.read(&mut buf, offset).unwrap();
    buf
}

pub(super) fn extents(node: &Node, count: u64, offset: u64, depth: bool) -> Vec<(u64, u64, u32)> {
    let mut e = Extents::new(offset, offset + count);
    if depth {
        node.allocation_depth(count, offset, &mut e).unwrap();
    } else {
        node.block_status(count, offset, false, &mut e).unwrap();
    }
    e.as_slice()
        .iter()
        .map(|e| (e.offset, e.length, e.kind))
        .collect()
}

/// base.raw (2 MiB: 0x11 in the first 64 KiB) under top.qcow2 (0x22 at 1 MiB, 64 KiB).
pub(super) fn chain() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let base = create(dir.path(), "base.raw", &["-f", "raw"], Some("2M"));
    qemu_io("raw", &base, &["write -P 0x11 0 64k"]);
    let top = create(
        dir.path(),
        "top.qcow2",
        &["-f", "qcow2", "-b", "base.raw", "-F", "raw"],
        None,
    );
    qemu_io("qcow2", &top, &["write -P 0x22 1M 64k"]);
    (dir, top)
}

pub(super) fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

/// a.qcow2 <- b.qcow2 <- c.qcow2 (1 MiB, 64 KiB clusters), data at unaligned offsets in
/// every layer; returns the dir and c.
pub(super) fn chain3() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let a = create(dir.path(), "a.qcow2", &["-f", "qcow2"], Some("1M"));
    qemu_io("qcow2", &a, &["write -P 0x11 1000 300k"]);
    let b = create(
        dir.path(),
        "b.qcow2",
        &["-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2"],
        None,
    );
    qemu_io(
        "qcow2",
        &b,
        &["write -P 0x22 200k 5000", "write -z 600k 64k"],
    );
    let c = create(
        dir.path(),
        "c.qcow2",
        &["-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2"],
        None,
    );
    qemu_io("qcow2", &c, &["write -P 0x33 70000 1234"]);
    (dir, c)
}

pub(super) fn stream_all(node: &Node, base: Option<&Node>) -> u64 {
    let mut copied = 0;
    let mut at = 0;
    while at < node.size() {
        copied += node.stream_range(at, 256 << 10, base).unwrap();
        at += 256 << 10;
    }
    copied
}

/// `qemu-img info --output=json PATH`.
pub(super) fn qemu_img_info(path: &Path) -> String {
    run(
        "qemu-img",
        &["info", "--output=json", path.to_str().unwrap()],
    )
}

/// Asserts that `qemu-img check` finds the qcow2 `image` clean and that `qemu-img compare`
/// finds it equal to `want` (written beside it as flat.raw).
pub(super) fn assert_image_is(image: &Path, want: &[u8]) {
    run("qemu-img", &["check", "-q", image.to_str().unwrap()]);
    let flat = image.with_file_name("flat.raw");
    std::fs::write(&flat, want).unwrap();
    run(
        "qemu-img",
        &[
            "compare",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            image.to_str().unwrap(),
            flat.to_str().unwrap(),
        ],
    );
}
