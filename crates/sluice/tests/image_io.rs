//! `sluice serve image`: writes, zeroes and discards from qemu-io over NBD leave the image
//! exactly as the same qemu-io commands run on a copy of the image directly: the same
//! content (`qemu-img compare`), a clean `qemu-img check`, and the same allocation as
//! qemu-nbd reports for the directly modified copy (both meta contexts). Fixtures cover
//! chains of one to three layers, raw and qcow2 backings, v2 and v3, 512 B to 64 KiB
//! clusters, compressed clusters (read, and overwritten with copy-on-write), zero clusters
//! and unaligned ranges.

use crate::support;

use support::image::{
    nbdinfo_map, one_layer, qemu_img, qemu_img_check, qemu_io, three_layers, two_layers, v2_alone,
    Images, QemuNbd,
};
use support::{path_str, Server};

/// Runs `ops` through sluice on one copy and directly on another, then compares.
fn ops_over_nbd_match_direct(fixture: Images, ops: &[&str]) {
    let direct = fixture.copy();
    let served = fixture.copy();
    qemu_io("qcow2", path_str(&direct.top), ops);

    let mut server = Server::start(&[
        "image",
        &format!("file={}", served.top.display()),
        "format=qcow2",
        "backing=auto",
    ]);
    qemu_io("raw", &server.uri(), ops);
    let sluice_maps = [
        nbdinfo_map(&server.uri(), "base:allocation"),
        nbdinfo_map(&server.uri(), "qemu:allocation-depth"),
    ];
    server.assert_no_panic();
    assert!(server.stop().success());

    qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        path_str(&direct.top),
        path_str(&served.top),
    ]);
    let (code, out) = qemu_img_check(&served.top);
    assert_eq!(code, 0, "{out}");

    let qemu = QemuNbd::start(&["-r", "-A", "-f", "qcow2", path_str(&direct.top)]);
    assert_eq!(sluice_maps[0], nbdinfo_map(&qemu.uri(), "base:allocation"));
    assert_eq!(
        sluice_maps[1],
        nbdinfo_map(&qemu.uri(), "qemu:allocation-depth")
    );
}

#[test]
fn ops_one_layer_with_compressed_clusters_match_direct_qemu_io() {
    ops_over_nbd_match_direct(
        one_layer(),
        &[
            "write -P 0x71 1000 5000",
            "write -P 0x72 2000000 100000",
            "write -z 500000 1000000",
            "discard 4194304 1048576",
            "write -z -u 6300000 300000",
            "discard 7000000 900000",
            "write -P 0x73 8388000 608",
        ],
    );
}

#[test]
fn ops_two_layers_raw_backing_match_direct_qemu_io() {
    ops_over_nbd_match_direct(
        two_layers(),
        &[
            "write -P 0x41 100000 200000",
            "write -P 0x42 1040000 70000",
            "write -z 1200000 300000",
            "write -z -u 2100000 200000",
            "write -z -u 2162688 131072",
            "discard 3000000 500000",
            "discard 3145728 65536",
            "write -P 0x43 4190000 20000",
            "write -z 4800000 400000",
            "write -P 0x44 5177344 65536",
        ],
    );
}

#[test]
fn ops_three_layers_mixed_clusters_match_direct_qemu_io() {
    ops_over_nbd_match_direct(
        three_layers(),
        &[
            "write -P 0x81 50000 200000",
            "write -z 600000 300000",
            "discard 0 131072",
            "write -z -u 1179648 65536",
            "write -P 0x82 3000000 145728",
            "discard 2000000 1000000",
        ],
    );
}

#[test]
fn ops_v2_image_match_direct_qemu_io() {
    ops_over_nbd_match_direct(
        v2_alone(),
        &[
            "write -P 0x91 50000 200000",
            "write -z 600000 300000",
            "discard 0 131072",
            "write -z -u 1179648 65536",
        ],
    );
}

#[test]
fn fua_write_then_check_is_clean_without_shutdown() {
    let images = two_layers();
    let mut server = Server::start(&[
        "image",
        path_str(&images.top),
        "format=qcow2",
        "backing=auto",
    ]);
    // A new cluster allocated with FUA must be fully on disk (data, L2, refcounts and L1)
    // when the reply comes: check the file while the server still runs.
    support::nbdsh(
        &server.uri(),
        "h = nbd.NBD()\nh.connect_uri(uri)\n\
         h.pwrite(b'\\x5c' * 70000, 4000000, nbd.CMD_FLAG_FUA)\nh.shutdown()",
    );
    let (code, out) = {
        let out = support::output("qemu-img", &["check", "-U", path_str(&images.top)]);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    assert_eq!(code, 0, "{out}");
    let read = support::run(
        "qemu-io",
        &[
            "-U",
            "-r",
            "-f",
            "qcow2",
            "-c",
            "read -P 0x5c 4000000 70000",
            path_str(&images.top),
        ],
    );
    assert!(read.contains("read 70000/70000"), "{read}");
    server.assert_no_panic();
    assert!(server.stop().success());
}

#[test]
fn multi_conn_second_connection_sees_first_ones_writes() {
    let images = one_layer();
    let server = Server::start(&["image", path_str(&images.top), "format=qcow2"]);
    let out = support::nbdsh(
        &server.uri(),
        "a = nbd.NBD(); a.connect_uri(uri)\nb = nbd.NBD(); b.connect_uri(uri)\n\
         assert a.can_multi_conn() and b.can_multi_conn()\n\
         a.pwrite(b'\\x42' * 4096, 12345)\na.flush()\n\
         print(b.pread(4096, 12345) == b'\\x42' * 4096)",
    );
    assert_eq!(out.trim(), "True");
}
