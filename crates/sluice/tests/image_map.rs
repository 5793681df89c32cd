//! Block status of `sluice serve image`: `base:allocation` and `qemu:allocation-depth` equal
//! what qemu-nbd serves for the same image, and `qemu-img map` over NBD agrees with
//! `qemu-img map` of the file. nbdinfo (libnbd 1.14) reads the contexts with structured
//! replies; qemu-img (qemu 10) negotiates extended headers, which sluice offers, so both
//! reply shapes are covered.

use crate::support;

use support::image::{
    data_zero_runs, nbdinfo_map, one_layer, qemu_img_map, three_layers, two_layers, v2_alone,
    Images, QemuNbd,
};
use support::{path_str, Server};

fn maps_match_qemu_nbd(images: Images) {
    let reference = {
        let q = QemuNbd::start(&["-r", "-A", "-f", "qcow2", path_str(&images.top)]);
        [
            nbdinfo_map(&q.uri(), "base:allocation"),
            nbdinfo_map(&q.uri(), "qemu:allocation-depth"),
            qemu_img_map(&q.uri()),
        ]
    };
    let file_map = qemu_img_map(path_str(&images.top));

    let server = Server::start(&[
        "image",
        path_str(&images.top),
        "format=qcow2",
        "backing=auto",
        "readonly=true",
    ]);
    let uri = server.uri();
    assert_eq!(nbdinfo_map(&uri, "base:allocation"), reference[0]);
    assert_eq!(nbdinfo_map(&uri, "qemu:allocation-depth"), reference[1]);
    let nbd_map = qemu_img_map(&uri);
    assert_eq!(nbd_map, reference[2]);
    assert_eq!(data_zero_runs(&nbd_map), data_zero_runs(&file_map));
    server.assert_no_panic();
}

#[test]
fn maps_one_layer_compressed_match_qemu_nbd() {
    maps_match_qemu_nbd(one_layer());
}

#[test]
fn maps_two_layers_short_raw_backing_match_qemu_nbd() {
    maps_match_qemu_nbd(two_layers());
}

#[test]
fn maps_three_layers_match_qemu_nbd() {
    maps_match_qemu_nbd(three_layers());
}

#[test]
fn maps_v2_image_match_qemu_nbd() {
    maps_match_qemu_nbd(v2_alone());
}

#[test]
fn maps_sparse_raw_image_match_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("a.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(3 << 20)
        .unwrap();
    support::image::qemu_io(
        "raw",
        path_str(&raw),
        &["write -P 1 100000 300000", "write -P 2 2M 4096"],
    );
    let q = QemuNbd::start(&["-r", "-A", "-f", "raw", path_str(&raw)]);
    let server = Server::start(&["image", path_str(&raw), "format=raw", "readonly=true"]);
    for context in ["base:allocation", "qemu:allocation-depth"] {
        assert_eq!(
            nbdinfo_map(&server.uri(), context),
            nbdinfo_map(&q.uri(), context),
            "{context}"
        );
    }
}

#[test]
fn map_req_one_gives_first_extent_only() {
    let images = two_layers();
    let server = Server::start(&[
        "image",
        path_str(&images.top),
        "backing=auto",
        "readonly=true",
    ]);
    let out = support::nbdsh(
        &server.uri(),
        "h = nbd.NBD()\nh.add_meta_context('base:allocation')\nh.connect_uri(uri)\n\
         got = []\n\
         h.block_status(h.get_size(), 0, lambda c, o, e, err: got.append(list(e)), nbd.CMD_FLAG_REQ_ONE)\n\
         print(got)",
    );
    // The first 64 KiB cluster of the top holds data (written over the raw base's data).
    assert_eq!(out.trim(), "[[1572864, 0]]");
}
