//! Persistent dirty bitmaps of raw images, kept in a sidecar file `IMAGE.bitmaps` beside the
//! image (issue #15 item 6, beyond qsd; `docs/compat/qcow2-bitmaps.md`). qemu refuses
//! persistent bitmaps on raw nodes, so an incremental backup of a raw or LVM disk cannot
//! outlive its daemon there; sluice saves them at close and loads them back, and because
//! qemu and every other tool write raw images without knowing of that file, it loads them
//! *inconsistent* (never stale) when the image was not closed by sluice or changed since.
//!
//! A raw node over a block device keeps them in the file its `bitmap-file` option names, with
//! the kernel's account of the device (its write and discard counters, diskseq, boot id) as
//! the identity that tells whether anything else wrote it.
//!
//! Deliberate difference, asserted here: qsd answers `persistent: true` on a raw node with
//! "Can't store persistent bitmaps to NODE: Operation not supported"; sluice keeps it.

use crate::support;

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use support::image::{nbdinfo_map, qemu_img, qemu_io, QemuNbd};
use support::qmp::{node_bitmaps, ok, run_until, start_nbd, write_through_export, Qmp, QmpDaemon};
use support::{message_lines, path_str, serve_fails, Server};

/// Writes a client makes after the checkpoint.
const WRITES: [&str; 4] = [
    "write -P 0x22 8M 64k",
    "write -P 0x23 20M 128k",
    "write -P 0x24 33000 1000",
    "write -z 1M 64k",
];
/// The 64 KiB blocks [`WRITES`] dirty, as (offset, length) runs.
const DIRTY: [(u64, u64); 4] = [
    (0, 65536),
    (1 << 20, 65536),
    (8 << 20, 65536),
    (20 << 20, 131072),
];
const MIB_64: u64 = 64 << 20;

/// A raw image of 64 MiB, with data in its first 4 MiB.
fn raw_disk(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    qemu_img(&["create", "-q", "-f", "raw", path_str(&p), "64M"]);
    qemu_io("raw", path_str(&p), &["write -P 0x11 0 4M"]);
    p
}

fn sidecar(image: &Path) -> PathBuf {
    let mut name = image.file_name().unwrap().to_os_string();
    name.push(".bitmaps");
    image.with_file_name(name)
}

/// The header flag `in_use` of the sidecar beside `image`.
fn sidecar_in_use(image: &Path) -> bool {
    sidecar_in_use_at(&sidecar(image))
}

/// The header flag `in_use` of the sidecar at `side` (byte 15, bit 0: see
/// `crates/image/src/sidecar.rs`).
fn sidecar_in_use_at(side: &Path) -> bool {
    let b = std::fs::read(side).unwrap();
    assert_eq!(&b[..8], b"SLUICEBM");
    b[15] & 1 == 1
}

fn add_raw(q: &mut Qmp, node: &str, image: &Path, read_only: bool) {
    ok(
        q,
        "blockdev-add",
        json!({"driver": "raw", "node-name": node, "read-only": read_only,
               "file": support::qmp::file(image, read_only)}),
    );
}

/// The bitmaps a new daemon finds on `image`, opened read-only as node `disk`.
fn bitmaps_seen_by_a_new_daemon(image: &Path) -> Vec<(String, u64, u64, bool, bool, bool)> {
    let d = QmpDaemon::sluice(&[]);
    let mut q = d.connect_negotiated();
    add_raw(&mut q, "disk", image, true);
    node_bitmaps(&mut q, "disk")
}

fn add_bitmap(q: &mut Qmp, node: &str, name: &str) {
    ok(
        q,
        "block-dirty-bitmap-add",
        json!({"node": node, "name": name, "persistent": true}),
    );
}

/// `quit`, then waits for the daemon to exit successfully.
fn quit(mut d: QmpDaemon, mut q: Qmp) {
    ok(&mut q, "quit", json!({}));
    drop(q);
    assert!(d.wait().success(), "{}", d.stderr());
    assert!(!d.stderr().contains("panicked"), "{}", d.stderr());
}

/// The dirty runs of an `nbdinfo --map=qemu:dirty-bitmap:...` listing.
fn dirty_runs(map: &str) -> Vec<(u64, u64)> {
    map.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[2] == "1").then(|| (f[0].parse().unwrap(), f[1].parse().unwrap()))
        })
        .collect()
}

/// The dirty runs of bitmap `name` of `node`, read through an NBD export of it (writable:
/// qemu exports a recording bitmap only so).
fn exported_dirty_runs(q: &mut Qmp, d: &QmpDaemon, node: &str, name: &str) -> Vec<(u64, u64)> {
    ok(
        q,
        "block-export-add",
        json!({"type": "nbd", "id": "map", "node-name": node, "bitmaps": [name],
               "writable": true}),
    );
    let map = nbdinfo_map(&d.nbd_uri(node), &format!("qemu:dirty-bitmap:{name}"));
    ok(q, "block-export-del", json!({"id": "map"}));
    support::qmp::wait_for(
        q,
        "BLOCK_EXPORT_DELETED",
        std::time::Duration::from_secs(10),
    );
    dirty_runs(&map)
}

/// A checkpoint saved by a first run: `disk.raw` with persistent bitmap `b`, [`WRITES`]
/// recorded in it, the daemon quit.
fn checkpoint(dir: &Path) -> PathBuf {
    let disk = raw_disk(dir, "disk.raw");
    let d = QmpDaemon::sluice(&[]);
    let mut q = d.connect_negotiated();
    add_raw(&mut q, "disk", &disk, false);
    add_bitmap(&mut q, "disk", "b");
    start_nbd(&mut q, &d);
    write_through_export(&mut q, &d, "disk", &WRITES);
    quit(d, q);
    assert!(!sidecar_in_use(&disk));
    disk
}

/// An incremental `blockdev-backup` of `node` from `bitmap` into a new qcow2 image in `dir`
/// (returned), asserting that it copied the [`DIRTY`] blocks.
fn incremental_backup(q: &mut Qmp, dir: &Path, node: &str, bitmap: &str) -> PathBuf {
    let inc = dir.join("inc.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&inc), "64M"]);
    ok(
        q,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "inc", "file": support::qmp::file(&inc, false)}),
    );
    let msgs = run_until(
        q,
        json!({"execute": "blockdev-backup", "arguments": {"job-id": "inc", "device": node,
            "target": "inc", "sync": "incremental", "bitmap": bitmap}}),
        "null",
    );
    let done = msgs
        .iter()
        .find(|m| m["event"] == "BLOCK_JOB_COMPLETED")
        .unwrap_or_else(|| panic!("{msgs:?}"));
    assert_eq!(done["data"].get("error"), None, "{done}");
    assert_eq!(done["data"]["offset"], json!(5 * 65536), "{done}");
    inc
}

/// Exactly the [`DIRTY`] blocks are in `inc`, and `full` with `inc` over it is `disk` (a
/// raw image file or block device).
fn assert_full_plus_incremental_is(inc: &Path, full: &Path, disk: &Path) {
    let map: Value = serde_json::from_str(&support::image::qemu_img_map(path_str(inc))).unwrap();
    let own: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["present"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(own, DIRTY, "{map}");
    qemu_img(&[
        "rebase",
        "-u",
        "-q",
        "-f",
        "qcow2",
        "-b",
        path_str(full),
        "-F",
        "raw",
        path_str(inc),
    ]);
    let cmp = support::output(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            path_str(inc),
            path_str(disk),
        ],
    );
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
}

#[test]
fn raw_bitmap_survives_a_restart_and_drives_an_incremental_backup() {
    let dir = tempfile::tempdir().unwrap();
    let disk = raw_disk(dir.path(), "disk.raw");
    // The full backup taken at the checkpoint.
    let full = dir.path().join("full.raw");
    std::fs::copy(&disk, &full).unwrap();

    let d = QmpDaemon::sluice(&[]);
    let mut q = d.connect_negotiated();
    add_raw(&mut q, "disk", &disk, false);
    add_bitmap(&mut q, "disk", "b0");
    start_nbd(&mut q, &d);
    write_through_export(&mut q, &d, "disk", &WRITES);
    let shown = node_bitmaps(&mut q, "disk");
    assert_eq!(
        shown,
        [("b0".to_string(), 5 * 65536, 65536, true, true, false)]
    );
    // No sidecar until the first save: there was nothing to mark in use.
    assert!(!sidecar(&disk).exists());
    quit(d, q);
    assert!(!sidecar_in_use(&disk));

    // Restarted: the same bitmap, the same dirty blocks; in use while open read-write.
    let d = QmpDaemon::sluice(&[]);
    let mut q = d.connect_negotiated();
    add_raw(&mut q, "disk", &disk, false);
    assert_eq!(node_bitmaps(&mut q, "disk"), shown);
    assert!(sidecar_in_use(&disk));
    start_nbd(&mut q, &d);
    assert_eq!(exported_dirty_runs(&mut q, &d, "disk", "b0"), DIRTY);

    // The incremental backup copies what the bitmap says, and clears it.
    let inc = incremental_backup(&mut q, dir.path(), "disk", "b0");
    assert_eq!(node_bitmaps(&mut q, "disk")[0].1, 0);
    quit(d, q);
    assert_full_plus_incremental_is(&inc, &full, &disk);
    // The cleared bitmap was saved: a third run finds it clean and consistent.
    assert_eq!(
        bitmaps_seen_by_a_new_daemon(&disk),
        [("b0".to_string(), 0, 65536, true, true, false)]
    );
}

#[test]
fn kill_9_while_writable_leaves_raw_bitmaps_inconsistent_until_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let disk = checkpoint(dir.path());
    let mut d = QmpDaemon::sluice(&[]);
    let mut q = d.connect_negotiated();
    add_raw(&mut q, "disk", &disk, false);
    assert!(sidecar_in_use(&disk));
    start_nbd(&mut q, &d);
    write_through_export(&mut q, &d, "disk", &["write -P 5 40M 4k"]);
    support::crash::kill_9(&mut d, &mut q);
    assert!(sidecar_in_use(&disk));

    // `serve image` refuses it with qemu-nbd's words and this image's way back.
    let (code, err) = serve_fails(&["-r", "image", path_str(&disk), "format=raw", "bitmap=b"]);
    assert_eq!(code, 1, "{err}");
    let lines = message_lines(&err);
    assert_eq!(lines.len(), 1, "{err}");
    let side = sidecar(&disk).canonicalize().unwrap();
    assert!(
        lines[0].starts_with("sluice: image: Bitmap 'b' is inconsistent and cannot be used (")
            && lines[0].ends_with(&format!(
                "or delete {} to drop every bitmap of the image",
                side.display()
            )),
        "{err}"
    );

    // The daemon shows it inconsistent, refuses it with qsd's words and the way back...
    let d = QmpDaemon::sluice(&[]);
    let mut q = d.connect_negotiated();
    add_raw(&mut q, "disk", &disk, false);
    assert_eq!(
        node_bitmaps(&mut q, "disk"),
        [("b".to_string(), 0, 65536, false, true, true)]
    );
    let refused = q.exec(
        "block-dirty-bitmap-clear",
        json!({"node": "disk", "name": "b"}),
    );
    assert_eq!(
        Qmp::error(&refused),
        (
            "GenericError".into(),
            "Bitmap 'b' is inconsistent and cannot be used; remove it with \
             block-dirty-bitmap-remove, or replace it with block-dirty-bitmap-add of 'b' (the \
             new bitmap starts all dirty)"
                .into()
        )
    );
    assert!(
        d.stderr().contains("did not close it (a crash, kill -9)"),
        "{}",
        d.stderr()
    );
    // ...and the replacement starts all dirty, is saved, and comes back consistent.
    add_bitmap(&mut q, "disk", "b");
    let all_dirty = [("b".to_string(), MIB_64, 65536, true, true, false)];
    assert_eq!(node_bitmaps(&mut q, "disk"), all_dirty);
    quit(d, q);
    let d = QmpDaemon::sluice(&[]);
    let mut q = d.connect_negotiated();
    add_raw(&mut q, "disk", &disk, false);
    assert_eq!(node_bitmaps(&mut q, "disk"), all_dirty);
}

#[test]
fn raw_image_written_by_another_program_loads_its_bitmaps_inconsistent() {
    let dir = tempfile::tempdir().unwrap();
    let disk = checkpoint(dir.path());
    // Same size, same inode: only the mtime tells.
    qemu_io("raw", path_str(&disk), &["write -P 9 4M 4k"]);
    let d = QmpDaemon::sluice(&[]);
    let mut q = d.connect_negotiated();
    add_raw(&mut q, "disk", &disk, false);
    assert_eq!(
        node_bitmaps(&mut q, "disk"),
        [("b".to_string(), 0, 65536, false, true, true)]
    );
    assert!(
        d.stderr()
            .contains("the image was written, resized or replaced since sluice saved its bitmaps"),
        "{}",
        d.stderr()
    );
    // Removing the last persistent bitmap removes the sidecar at close.
    ok(
        &mut q,
        "block-dirty-bitmap-remove",
        json!({"node": "disk", "name": "b"}),
    );
    quit(d, q);
    assert!(!sidecar(&disk).exists());
}

#[test]
fn raw_image_replaced_by_a_copy_with_its_mtime_loads_its_bitmaps_inconsistent() {
    let dir = tempfile::tempdir().unwrap();
    let disk = checkpoint(dir.path());
    let copy = dir.path().join("copy.raw");
    support::run("cp", &["-p", path_str(&disk), path_str(&copy)]);
    std::fs::rename(&copy, &disk).unwrap();
    assert_eq!(
        bitmaps_seen_by_a_new_daemon(&disk),
        [("b".to_string(), 0, 65536, false, true, true)]
    );
}

#[test]
fn persistent_bitmap_on_raw_refused_by_qsd_is_kept_by_sluice() {
    let dir = tempfile::tempdir().unwrap();
    let run = |d: &QmpDaemon, tag: &str| {
        let rw = raw_disk(dir.path(), &format!("{tag}-rw.raw"));
        let ro = raw_disk(dir.path(), &format!("{tag}-ro.raw"));
        let f = raw_disk(dir.path(), &format!("{tag}-f.raw"));
        let mut q = d.connect_negotiated();
        add_raw(&mut q, "rw", &rw, false);
        add_raw(&mut q, "ro", &ro, true);
        ok(
            &mut q,
            "blockdev-add",
            json!({"driver": "file", "node-name": "f", "filename": path_str(&f)}),
        );
        let out: Vec<Option<String>> = ["rw", "ro", "f"]
            .iter()
            .map(|node| {
                let r = q.exec(
                    "block-dirty-bitmap-add",
                    json!({"node": node, "name": "p", "persistent": true}),
                );
                r.get("error").map(|_| Qmp::error(&r).1)
            })
            .collect();
        (q, rw, out)
    };
    let qsd = QmpDaemon::qsd(&[]);
    let (_, _, refused) = run(&qsd, "q");
    let unsupported =
        |n: &str| format!("Can't store persistent bitmaps to {n}: Operation not supported");
    assert_eq!(
        refused,
        [
            Some(unsupported("rw")),
            Some(unsupported("ro")),
            Some(unsupported("f"))
        ]
    );
    let s = QmpDaemon::sluice(&[]);
    let (mut q, rw, out) = run(&s, "s");
    assert_eq!(
        out,
        [
            None,
            Some(
                "Can't make bitmap 'p' persistent in 'ro': Cannot store persistent bitmaps in \
                 a read-only node"
                    .to_string()
            ),
            Some(unsupported("f"))
        ]
    );
    // Added and removed again: nothing is left beside the image.
    ok(
        &mut q,
        "block-dirty-bitmap-remove",
        json!({"node": "rw", "name": "p"}),
    );
    quit(s, q);
    assert!(!sidecar(&rw).exists());
}

#[test]
fn serve_image_offers_a_raw_images_bitmap_as_qemu_nbd_offers_a_qcow2_ones() {
    let dir = tempfile::tempdir().unwrap();
    let disk = raw_disk(dir.path(), "disk.raw");
    let d = QmpDaemon::sluice(&[]);
    let mut q = d.connect_negotiated();
    add_raw(&mut q, "disk", &disk, false);
    add_bitmap(&mut q, "disk", "b");
    quit(d, q);
    // The same bitmap in a qcow2 image, for qemu-nbd.
    let twin = dir.path().join("twin.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&twin), "64M"]);
    qemu_img(&["bitmap", "--add", path_str(&twin), "b"]);

    let writes = [
        "write -P 3 20M 128k",
        "write -P 4 63M 4k",
        "write -z 50M 8k",
    ];
    let mut s = Server::start(&["image", path_str(&disk), "format=raw", "bitmap=b"]);
    assert!(sidecar_in_use(&disk));
    support::qemu_io(&s.uri(), &writes);
    assert!(s.stop().success(), "{}", s.stderr());
    assert!(!sidecar_in_use(&disk));
    qemu_io("qcow2", path_str(&twin), &writes);

    let saved = std::fs::read(sidecar(&disk)).unwrap();
    let s = Server::start(&["-r", "image", path_str(&disk), "format=raw", "bitmap=b"]);
    let sluice = nbdinfo_map(&s.uri(), "qemu:dirty-bitmap:b");
    drop(s);
    let qemu = {
        let n = QemuNbd::start(&["-r", "-f", "qcow2", "-B", "b", path_str(&twin)]);
        nbdinfo_map(&n.uri(), "qemu:dirty-bitmap:b")
    };
    assert_eq!(sluice, qemu);
    assert_eq!(
        dirty_runs(&sluice),
        [(20 << 20, 131072), (50 << 20, 65536), (63 << 20, 65536)]
    );
    // A read-only serve leaves the sidecar as it was.
    assert!(std::fs::read(sidecar(&disk)).unwrap() == saved);
}

// --- Raw nodes over a block device: the sidecar its `bitmap-file` names -------------------
//
// A loop device is the real block device here (an LVM volume is one too, but there is no
// device-mapper on the test machines). The identity of a device is the kernel's account of
// it (`crates/image/src/sidecar/device.rs`): device number, size, diskseq, boot id, and its
// write and discard counters.

/// A loop device over a file of its own, detached when dropped (also when the test panics).
/// Tests run in parallel, with other tests' loop devices: each takes a free one
/// (`losetup -f --show`) and detaches exactly its own.
struct LoopDevice {
    dev: PathBuf,
    backing: PathBuf,
}

impl LoopDevice {
    fn attach(backing: &Path) -> LoopDevice {
        LoopDevice {
            dev: LoopDevice::free_device_over(backing),
            backing: backing.to_owned(),
        }
    }

    fn free_device_over(backing: &Path) -> PathBuf {
        let dev = support::run("losetup", &["-f", "--show", path_str(backing)]);
        PathBuf::from(dev.trim())
    }

    /// Detaches the device and attaches its file again (the kernel gives the disk a new
    /// diskseq, and maybe another device). Not by assigning a new `LoopDevice`: dropping
    /// the old one would detach its device again, which another test may have taken by
    /// then.
    fn reattach(&mut self) {
        support::run("losetup", &["-d", path_str(&self.dev)]);
        self.dev = LoopDevice::free_device_over(&self.backing);
    }

    /// The device number, as `MAJ:MIN`.
    fn maj_min(&self) -> String {
        use std::os::unix::fs::MetadataExt;
        let rdev = std::fs::metadata(&self.dev).unwrap().rdev();
        format!("{}:{}", libc::major(rdev), libc::minor(rdev))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = support::output("losetup", &["-d", path_str(&self.dev)]);
    }
}

/// A node's bitmaps, as [`node_bitmaps`] lists them.
type Shown = Vec<(String, u64, u64, bool, bool, bool)>;

/// The sidecar's format version (bytes 8..12).
fn sidecar_version(side: &Path) -> u32 {
    let b = std::fs::read(side).unwrap();
    u32::from_be_bytes(b[8..12].try_into().unwrap())
}

fn add_raw_device(q: &mut Qmp, node: &str, dev: &LoopDevice, side: &Path, read_only: bool) {
    ok(
        q,
        "blockdev-add",
        json!({"driver": "raw", "node-name": node, "read-only": read_only,
               "bitmap-file": path_str(side), "file": support::qmp::file(&dev.dev, read_only)}),
    );
}

/// The bitmaps a new daemon finds on `dev` with `side`, opened read-only as node `disk`,
/// and its log.
fn device_bitmaps_seen_by_a_new_daemon(dev: &LoopDevice, side: &Path) -> (Shown, String) {
    let d = QmpDaemon::sluice(&[]);
    let mut q = d.connect_negotiated();
    add_raw_device(&mut q, "disk", dev, side, true);
    let shown = node_bitmaps(&mut q, "disk");
    (shown, d.stderr())
}

/// A checkpoint on a block device: a loop device over `disk.raw`, persistent bitmap `b` in
/// `side` (`DIR/disk.bitmaps`, saved by a first run), [`WRITES`] recorded in it.
fn device_checkpoint(dir: &Path) -> (LoopDevice, PathBuf) {
    let dev = LoopDevice::attach(&raw_disk(dir, "disk.raw"));
    let side = dir.join("disk.bitmaps");
    let d = QmpDaemon::sluice(&[]);
    let mut q = d.connect_negotiated();
    add_raw_device(&mut q, "disk", &dev, &side, false);
    add_bitmap(&mut q, "disk", "b");
    start_nbd(&mut q, &d);
    write_through_export(&mut q, &d, "disk", &WRITES);
    quit(d, q);
    assert_eq!(sidecar_version(&side), 2);
    (dev, side)
}

/// Bitmap `b` as `query-named-block-nodes` shows it inconsistent.
fn inconsistent_b() -> Shown {
    vec![("b".to_string(), 0, 65536, false, true, true)]
}

/// Replaces the inconsistent bitmap `b` (it starts all dirty) and saves it: the device is
/// back at a consistent checkpoint.
fn replace_b(dev: &LoopDevice, side: &Path) {
    let d = QmpDaemon::sluice(&[]);
    let mut q = d.connect_negotiated();
    add_raw_device(&mut q, "disk", dev, side, false);
    assert_eq!(node_bitmaps(&mut q, "disk"), inconsistent_b());
    add_bitmap(&mut q, "disk", "b");
    quit(d, q);
    let all_dirty = vec![("b".to_string(), MIB_64, 65536, true, true, false)];
    assert_eq!(device_bitmaps_seen_by_a_new_daemon(dev, side).0, all_dirty);
}

#[test]
fn block_device_bitmap_survives_a_restart_and_drives_an_incremental_backup() {
    let dir = tempfile::tempdir().unwrap();
    let file = raw_disk(dir.path(), "disk.raw");
    let full = dir.path().join("full.raw");
    std::fs::copy(&file, &full).unwrap();
    let dev = LoopDevice::attach(&file);
    let side = dir.path().join("state").join("disk.bitmaps");
    std::fs::create_dir(side.parent().unwrap()).unwrap();

    let d = QmpDaemon::sluice(&[]);
    let mut q = d.connect_negotiated();
    add_raw_device(&mut q, "disk", &dev, &side, false);
    add_bitmap(&mut q, "disk", "b0");
    start_nbd(&mut q, &d);
    write_through_export(&mut q, &d, "disk", &WRITES);
    let shown = node_bitmaps(&mut q, "disk");
    assert_eq!(
        shown,
        [("b0".to_string(), 5 * 65536, 65536, true, true, false)]
    );
    // The node is shown as qsd shows a raw node: bitmap-file is not part of its name.
    let node = support::qmp::named_node(&mut q, "disk");
    assert_eq!(
        node["image"]["filename"],
        json!(path_str(&dev.dev)),
        "{node}"
    );
    quit(d, q);
    assert!(!sidecar_in_use_at(&side));
    assert_eq!(sidecar_version(&side), 2);
    // Nothing beside the device: /dev is a tmpfs.
    assert!(!sidecar(&dev.dev).exists());

    // Restarted: the same bitmap, consistent, the same dirty blocks.
    let d = QmpDaemon::sluice(&[]);
    let mut q = d.connect_negotiated();
    add_raw_device(&mut q, "disk", &dev, &side, false);
    assert_eq!(node_bitmaps(&mut q, "disk"), shown);
    assert!(sidecar_in_use_at(&side));
    assert!(!d.stderr().contains("inconsistent"), "{}", d.stderr());
    start_nbd(&mut q, &d);
    assert_eq!(exported_dirty_runs(&mut q, &d, "disk", "b0"), DIRTY);
    let inc = incremental_backup(&mut q, dir.path(), "disk", "b0");
    quit(d, q);
    assert_full_plus_incremental_is(&inc, &full, &dev.dev);
    // The cleared bitmap was saved: a third run finds it clean and consistent.
    let (seen, log) = device_bitmaps_seen_by_a_new_daemon(&dev, &side);
    assert_eq!(
        seen,
        [("b0".to_string(), 0, 65536, true, true, false)],
        "{log}"
    );
}

#[test]
fn block_device_written_or_discarded_behind_sluice_loads_bitmaps_inconsistent() {
    let dir = tempfile::tempdir().unwrap();
    let (dev, side) = device_checkpoint(dir.path());
    let (seen, log) = device_bitmaps_seen_by_a_new_daemon(&dev, &side);
    assert!(!seen[0].5, "{log}");
    let said = |log: &str, what: &str| {
        let want = format!(
            "the device was {what} by another program since sluice saved its bitmaps (its \
             counters in /sys/dev/block/{}/stat moved); its bitmaps (in {}) are loaded \
             inconsistent",
            dev.maj_min(),
            side.display()
        );
        assert!(log.contains(&want), "{want}\n{log}");
    };

    // One 4 KiB write, past sluice, through the device.
    support::run(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}", dev.dev.display()),
            "bs=4096",
            "count=1",
            "seek=2000",
            "oflag=direct",
            "conv=notrunc",
            "status=none",
        ],
    );
    let (seen, log) = device_bitmaps_seen_by_a_new_daemon(&dev, &side);
    assert_eq!(seen, inconsistent_b(), "{log}");
    said(&log, "written");

    // Back at a checkpoint, then a discard of 64 KiB.
    replace_b(&dev, &side);
    support::run(
        "blkdiscard",
        &["-o", "1048576", "-l", "65536", path_str(&dev.dev)],
    );
    let (seen, log) = device_bitmaps_seen_by_a_new_daemon(&dev, &side);
    assert_eq!(seen, inconsistent_b(), "{log}");
    said(&log, "discarded");
}

#[test]
fn block_device_attached_again_loads_bitmaps_inconsistent() {
    let dir = tempfile::tempdir().unwrap();
    let (mut dev, side) = device_checkpoint(dir.path());
    let before = dev.maj_min();
    dev.reattach();
    eprintln!("attached again as {} (was {before})", dev.maj_min());
    let (seen, log) = device_bitmaps_seen_by_a_new_daemon(&dev, &side);
    assert_eq!(seen, inconsistent_b(), "{log}");
    // The same device number gets a new diskseq; a free device of another number is
    // another device.
    let why = if dev.maj_min() == before {
        "the device was attached again or its media changed since sluice saved its bitmaps \
         (its diskseq was "
            .to_string()
    } else {
        format!(
            "the bitmap file was saved for device {before}, the image is device {}",
            dev.maj_min()
        )
    };
    assert!(log.contains(&why), "{why}\n{log}");
}

#[test]
fn kill_9_while_a_block_device_is_writable_leaves_its_bitmaps_inconsistent() {
    let dir = tempfile::tempdir().unwrap();
    let (dev, side) = device_checkpoint(dir.path());
    let mut d = QmpDaemon::sluice(&[]);
    let mut q = d.connect_negotiated();
    add_raw_device(&mut q, "disk", &dev, &side, false);
    assert!(sidecar_in_use_at(&side));
    start_nbd(&mut q, &d);
    write_through_export(&mut q, &d, "disk", &["write -P 5 40M 4k"]);
    support::crash::kill_9(&mut d, &mut q);
    assert!(sidecar_in_use_at(&side));
    let (seen, log) = device_bitmaps_seen_by_a_new_daemon(&dev, &side);
    assert_eq!(seen, inconsistent_b(), "{log}");
    assert!(log.contains("did not close it (a crash, kill -9)"), "{log}");
}

#[test]
fn block_device_without_bitmap_file_refuses_persistent_bitmaps_serve_image_keeps_them_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let dev = LoopDevice::attach(&raw_disk(dir.path(), "disk.raw"));
    let d = QmpDaemon::sluice(&[]);
    let mut q = d.connect_negotiated();
    add_raw(&mut q, "disk", &dev.dev, false);
    let r = q.exec(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "p", "persistent": true}),
    );
    assert_eq!(
        Qmp::error(&r),
        (
            "GenericError".to_string(),
            format!(
                "Can't make bitmap 'p' persistent in 'disk': a raw image over a block device \
                 keeps its bitmaps in the file its bitmap-file option names ({} has none: add \
                 bitmap-file=PATH, on a file system that outlives a reboot)",
                dev.dev.display()
            )
        )
    );
    // A bitmap that is not persistent needs no file.
    ok(
        &mut q,
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "t"}),
    );
    quit(d, q);

    // `serve image` with bitmap-file: the bitmap a daemon added, writes recorded, saved at
    // exit, offered by a second, read-only serve.
    let side = dir.path().join("disk.bitmaps");
    let d = QmpDaemon::sluice(&[]);
    let mut q = d.connect_negotiated();
    add_raw_device(&mut q, "disk", &dev, &side, false);
    add_bitmap(&mut q, "disk", "b");
    quit(d, q);
    let bitmap_file = format!("bitmap-file={}", side.display());
    let args = [
        "image",
        path_str(&dev.dev),
        "format=raw",
        &bitmap_file,
        "bitmap=b",
    ];
    let mut s = Server::start(&args);
    assert!(sidecar_in_use_at(&side));
    support::qemu_io(&s.uri(), &["write -P 3 20M 128k", "write -P 4 63M 4k"]);
    assert!(s.stop().success(), "{}", s.stderr());
    assert!(!sidecar_in_use_at(&side), "{}", s.stderr());
    let saved = std::fs::read(&side).unwrap();
    let mut ro = vec!["-r"];
    ro.extend_from_slice(&args);
    let s = Server::start(&ro);
    let map = nbdinfo_map(&s.uri(), "qemu:dirty-bitmap:b");
    drop(s);
    assert_eq!(dirty_runs(&map), [(20 << 20, 131072), (63 << 20, 65536)]);
    assert!(std::fs::read(&side).unwrap() == saved);
    // Without bitmap-file the device has no bitmaps at all.
    let (code, err) = serve_fails(&["-r", "image", path_str(&dev.dev), "format=raw", "bitmap=b"]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(
        message_lines(&err),
        [format!(
            "sluice: image: Bitmap 'b' is not found ({} has no persistent bitmaps)",
            dev.dev.display()
        )],
        "{err}"
    );
}

#[test]
fn bitmap_file_of_a_regular_image_replaces_the_file_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let disk = raw_disk(dir.path(), "disk.raw");
    let side = dir.path().join("elsewhere.bm");
    let d = QmpDaemon::sluice(&[]);
    let mut q = d.connect_negotiated();
    ok(
        &mut q,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "disk", "bitmap-file": path_str(&side),
               "file": support::qmp::file(&disk, false)}),
    );
    add_bitmap(&mut q, "disk", "b");
    quit(d, q);
    assert!(side.exists() && !sidecar(&disk).exists());
    // A regular file's identity: version 1, as before block devices had theirs.
    assert_eq!(sidecar_version(&side), 1);
    let (code, err) = serve_fails(&[
        "-r",
        "image",
        path_str(&disk),
        "format=raw",
        "bitmap=b",
        "bitmap-file=/nonexistent/x",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        message_lines(&err)[0].ends_with("has no persistent bitmaps)"),
        "{err}"
    );
    let s = Server::start(&[
        "-r",
        "image",
        path_str(&disk),
        "format=raw",
        "bitmap=b",
        &format!("bitmap-file={}", side.display()),
    ]);
    assert_eq!(
        dirty_runs(&nbdinfo_map(&s.uri(), "qemu:dirty-bitmap:b")),
        []
    );
}
