//! Image locking: while sluice has an image open writable, qemu-io, qemu-img and a second
//! sluice are refused (qemu's OFD lock convention, so each side sees the other), and the
//! image is free again once sluice exits, even by kill -9.

use crate::support;

use support::image::{one_layer, qemu_img_check};
use support::{output, path_str, Server};

fn stderr_of(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = output(cmd, args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn lock_second_writer_refused_while_sluice_writes() {
    let images = one_layer();
    let top = path_str(&images.top);
    let mut server = Server::start(&["image", top, "format=qcow2"]);

    let (ok, err) = stderr_of("qemu-io", &["-f", "qcow2", "-c", "write 0 512", top]);
    assert!(!ok);
    assert!(err.contains("Failed to get \"write\" lock"), "{err}");

    let (ok, err) = stderr_of("qemu-img", &["info", top]);
    assert!(!ok, "qemu-img info without -U must be refused");
    assert!(err.contains("Failed to get shared \"write\" lock"), "{err}");
    let (ok, _) = stderr_of("qemu-img", &["info", "-U", top]);
    assert!(ok, "qemu-img info -U must work");

    let second = Server::try_start(&["image", top, "format=qcow2"])
        .err()
        .unwrap();
    assert!(
        second.contains("failed to get \"write\" lock: is another process using the image?"),
        "{second}"
    );
    let reader = Server::try_start(&["image", top, "format=qcow2", "readonly=true"])
        .err()
        .unwrap();
    assert!(
        reader.contains("failed to get shared \"write\" lock"),
        "{reader}"
    );

    server.assert_no_panic();
    assert!(server.stop().success());
    let (ok, err) = stderr_of("qemu-io", &["-f", "qcow2", "-c", "write 0 512", top]);
    assert!(ok, "{err}");
}

#[test]
fn lock_sluice_refused_while_qemu_nbd_writes() {
    let images = one_layer();
    let top = path_str(&images.top);
    let _q = support::image::QemuNbd::start(&["-f", "qcow2", top]);
    let err = Server::try_start(&["image", top, "format=qcow2"])
        .err()
        .unwrap();
    assert!(err.contains("failed to get"), "{err}");
}

#[test]
fn lock_released_by_kill_9() {
    let images = one_layer();
    let top = path_str(&images.top);
    let mut server = Server::start(&["image", top, "format=qcow2"]);
    let pid = server.pid();
    let mut child = server.child.take().unwrap();
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    child.wait().unwrap();
    let (ok, err) = stderr_of("qemu-io", &["-f", "qcow2", "-c", "write 0 512", top]);
    assert!(ok, "{err}");
    assert_eq!(qemu_img_check(&images.top).0, 0);
}

#[test]
fn lock_two_readers_coexist_with_qemu_nbd_reader() {
    let images = one_layer();
    let top = path_str(&images.top);
    let _q = support::image::QemuNbd::start(&["-r", "-f", "qcow2", top]);
    let a = Server::start(&["image", top, "format=qcow2", "readonly=true"]);
    let b = Server::start(&["image", top, "format=qcow2", "readonly=true"]);
    support::run("nbdinfo", &["--size", &a.uri()]);
    support::run("nbdinfo", &["--size", &b.uri()]);
}
