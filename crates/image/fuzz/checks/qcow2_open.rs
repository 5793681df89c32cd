//! Fuzzes opening a whole qcow2 image file: header, L1 and L2 tables, refcount table and
//! blocks, backing name, snapshots, all as the fuzzer wrote them.
//!
//! The input is written to a file and opened as a writable qcow2 node (its backing, if the
//! header names one, is not followed: that would open arbitrary paths). A node that opens is
//! then read, written (which allocates clusters and so walks the refcount structures) and
//! flushed. Properties: no panic, no crash (imago's stack overflow on corrupt refcounts
//! was one), and every failure is an error value.

use std::path::PathBuf;
use std::sync::OnceLock;

use sluice_image::{open_node, BackingRef, BlockdevOptions, Driver};

fn image_path() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("sluice-fuzz-qcow2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir.join("image.qcow2")
    })
}

/// Runs the target's checks on one input (a fuzz input or a committed seed).
pub fn run(data: &[u8]) {
    let path = image_path();
    std::fs::write(path, data).expect("write the image file");
    let mut opts = BlockdevOptions::image(Driver::Qcow2, path, false);
    opts.backing = BackingRef::None;
    let Ok(node) = open_node(&opts, &|_| None) else {
        return;
    };
    let size = node.size();
    let mut buf = vec![0u8; 65536];
    let _ = node.read(&mut buf, 0);
    if size > 0 {
        let at = (u64::from(data.len() as u32) * 4096) % size;
        let len = (size - at).min(4096) as usize;
        let _ = node.read(&mut buf[..len], at);
        buf[..len].fill(0x5a);
        let _ = node.write(&buf[..len], at);
        let _ = node.write(&buf[..len.min(512)], 0);
    }
    let _ = node.flush();
}
