//! Bad input to `sluice serve image`: each refused at startup with one clear line (and no
//! panic), or, for damage found only on the request path, EIO for that request while the
//! server keeps serving and the image is not written.

use crate::support;

use std::os::unix::fs::FileExt;

use support::image::{qcow2_over, qemu_img, qemu_io, two_layers};
use support::{path_str, Server};

fn start_err(args: &[&str]) -> String {
    let err = Server::try_start(args).err().expect("sluice should refuse");
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn patch(path: &std::path::Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

fn be64_at(path: &std::path::Path, offset: u64) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, offset).unwrap();
    u64::from_be_bytes(b)
}

fn new_qcow2(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&p), "4M"]);
    p
}

#[test]
fn errors_truncated_header_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let img = new_qcow2(dir.path());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(60)
        .unwrap();
    let err = start_err(&["image", path_str(&img), "format=qcow2"]);
    assert!(err.contains("the file is truncated"), "{err}");
}

#[test]
fn errors_corrupt_header_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let img = new_qcow2(dir.path());
    patch(&img, 4, &7u32.to_be_bytes());
    let err = start_err(&["image", path_str(&img), "format=qcow2"]);
    assert!(err.contains("qcow2 version 7 is not supported"), "{err}");
}

#[test]
fn errors_backing_loop_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&a), "1M"]);
    qcow2_over(&b, "a.qcow2", &[], None);
    qemu_img(&["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", path_str(&a)]);
    let err = start_err(&["image", path_str(&b), "format=qcow2", "backing=auto"]);
    assert!(err.contains("backing chain loop"), "{err}");
    // Named explicitly, the same loop is refused before anything is opened.
    let err = start_err(&[
        "image",
        path_str(&b),
        "format=qcow2",
        &format!("backing={}", a.display()),
        &format!("backing={}", b.display()),
    ]);
    assert!(err.contains("backing chain loop"), "{err}");
}

#[test]
fn errors_missing_backing_file_is_refused_at_open() {
    let images = two_layers();
    std::fs::remove_file(images.path("base.raw")).unwrap();
    let err = start_err(&["image", path_str(&images.top), "backing=auto"]);
    assert!(
        err.contains("cannot open its backing file") && err.contains("No such file"),
        "{err}"
    );
}

#[test]
fn errors_backing_not_named_is_refused_with_hint() {
    let images = two_layers();
    let err = start_err(&["image", path_str(&images.top), "format=qcow2"]);
    assert!(err.contains("backing=auto"), "{err}");
    // backing=none serves the top layer alone; backing=PATH names the base.
    {
        let server = Server::start(&["image", path_str(&images.top), "backing=none"]);
        support::run("nbdinfo", &["--size", &server.uri()]);
    }
    let base = format!("backing={}", images.path("base.raw").display());
    let server = Server::start(&["image", path_str(&images.top), &base]);
    support::run("nbdinfo", &["--size", &server.uri()]);
}

#[test]
fn errors_probing_warns_about_untrusted_images() {
    let images = two_layers();
    let server = Server::start(&["image", path_str(&images.top), "backing=auto"]);
    support::run("nbdinfo", &["--size", &server.uri()]);
    assert!(
        server
            .stderr()
            .contains("probed qcow2. Probing is unsafe for untrusted images"),
        "{}",
        server.stderr()
    );
}

#[test]
fn errors_l2_table_past_end_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let img = new_qcow2(dir.path());
    qemu_io("qcow2", path_str(&img), &["write -P 7 0 64k"]);
    let l1 = be64_at(&img, 40);
    patch(&img, l1, &0x8000_0000_1000_0000u64.to_be_bytes());
    let err = start_err(&["image", path_str(&img), "format=qcow2"]);
    assert!(
        err.contains("points to an L2 table at 0x10000000 past the end of the file"),
        "{err}"
    );
}

#[test]
fn errors_data_cluster_past_end_is_eio_and_image_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let img = new_qcow2(dir.path());
    qemu_io("qcow2", path_str(&img), &["write -P 7 0 64k"]);
    let l1 = be64_at(&img, 40);
    let l2 = be64_at(&img, l1) & 0x00ff_ffff_ffff_fe00;
    patch(&img, l2, &0x8000_0000_4000_0000u64.to_be_bytes());
    let before = std::fs::read(&img).unwrap();
    let mut server = Server::start(&["image", path_str(&img), "format=qcow2"]);
    let out = support::nbdsh(
        &server.uri(),
        "h = nbd.NBD(); h.connect_uri(uri)\n\
         for op in (lambda: h.pread(512, 0), lambda: h.pwrite(b'x' * 512, 0)):\n\
         \x20   try:\n\
         \x20       op(); print('ok')\n\
         \x20   except nbd.Error as e:\n\
         \x20       print(e.errno)\n\
         print(h.pread(512, 65536) == bytes(512))",
    );
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["EIO", "EIO", "True"]
    );
    server.assert_serving("");
    assert!(server.stop().success());
    assert_eq!(std::fs::read(&img).unwrap(), before);
}
