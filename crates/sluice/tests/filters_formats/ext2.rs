//! The ext2 filter through the `sluice` binary, beside Debian's nbdkit 1.32.5 running its
//! ext2 filter over the same file plugin and filesystem image: the same size, bytes,
//! `nbdinfo --json` capabilities and errors. Filesystems are made at test time by `mke2fs -d`
//! (ext2, ext3 and ext4) from a directory holding random files (one whose size is not a
//! multiple of 4096), a file in a subdirectory, an empty directory and a symbolic link.
//!
//! Writes are checked with e2fsprogs' own tools once the server is gone: `e2fsck -fn` finds
//! the filesystem clean and `debugfs -R 'cat PATH'` reads back the expected bytes. Where
//! sluice deliberately differs from nbdkit (see the filter's module doc) the test says so:
//! the file's extents (nbdkit passes the image's map through, at the file's offsets).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::captive::BOTH;
use crate::support::filters::{caps, py, same_caps, sluice_refuses, Pair};
use crate::support::{output, path_str, random_bytes, run, Server};

/// The size of `/disk.raw`: 3 MiB and a bit, not a multiple of 4096.
const DISK: usize = 3 * 1024 * 1024 + 1234;
/// The size of `/sub/other.raw`.
const OTHER: usize = 1024 * 1024;

/// e2fsprogs' tool `name`, from /usr/sbin or /sbin (not on every user's PATH).
fn sbin(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{name} not found (install e2fsprogs: scripts/test.sh)"))
}

/// Filesystem images of one source directory, in a temporary directory.
struct Images {
    dir: tempfile::TempDir,
}

impl Images {
    fn make() -> Images {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::create_dir_all(src.join("emptydir")).unwrap();
        std::fs::write(src.join("disk.raw"), random_bytes(DISK, 11)).unwrap();
        std::fs::write(src.join("sub/other.raw"), random_bytes(OTHER, 12)).unwrap();
        std::os::unix::fs::symlink("disk.raw", src.join("link")).unwrap();
        let mke2fs = sbin("mke2fs");
        for kind in ["ext2", "ext3", "ext4"] {
            let img = dir.path().join(format!("{kind}.img"));
            run(
                path_str(&mke2fs),
                &[
                    "-q",
                    "-F",
                    "-t",
                    kind,
                    "-d",
                    path_str(&src),
                    path_str(&img),
                    "16M",
                ],
            );
        }
        Images { dir }
    }

    fn path(&self, name: &str) -> String {
        path_str(&self.dir.path().join(name)).to_string()
    }

    fn source(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.path().join("src").join(name)).unwrap()
    }

    /// A copy of `kind.img` called `name`.
    fn copy(&self, kind: &str, name: &str) -> String {
        let to = self.path(name);
        std::fs::copy(self.path(&format!("{kind}.img")), &to).unwrap();
        to
    }
}

/// What `READ_ALL` prints for `bytes`.
fn read_all_of(bytes: &[u8]) -> String {
    let script = "import hashlib,sys\nb=open(sys.argv[1],'rb').read()\n\
                  print(len(b), hashlib.sha256(b).hexdigest()[:16])";
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("b");
    std::fs::write(&f, bytes).unwrap();
    run(crate::support::PYTHON, &["-c", script, path_str(&f)])
}

const READ_ALL: &str = "print(h.get_size(), sha(h.pread(h.get_size(), 0)))";

/// `debugfs -R 'cat PATH' IMG`: the file's bytes as e2fsprogs reads them.
fn debugfs_cat(img: &str, path: &str) -> Vec<u8> {
    let out = Command::new(sbin("debugfs"))
        .args(["-R", &format!("cat {path}"), img])
        .output()
        .unwrap();
    assert!(out.status.success(), "debugfs: {out:?}");
    out.stdout
}

/// Asserts `e2fsck -fn IMG` finds nothing to fix (exit 0).
#[track_caller]
fn assert_fsck_clean(img: &str, who: &str) {
    let out = output(path_str(&sbin("e2fsck")), &["-fn", img]);
    assert!(
        out.status.success(),
        "{who}: e2fsck -fn {img} ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts a client cannot open the default export of `server`, and that its log says
/// `want`.
#[track_caller]
fn refuses_client(server: &Server, what: &str, want: &str) {
    let out = output("nbdinfo", &["--size", &server.uri()]);
    assert!(!out.status.success(), "{what}: {} served it", server.uri());
    let log = server.stderr();
    assert!(log.contains(want), "{what}: {want:?} not in:\n{log}");
}

/// Runs nbdkit with a configuration it must refuse: asserts exit 1 and returns its stderr.
fn nbdkit_refusal(args: &[&str]) -> String {
    let out = Command::new("nbdkit")
        .args(["-f", "-U", "-", "--run", "true"])
        .args(args)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "nbdkit {args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn ext2_serves_files_of_ext2_ext3_and_ext4_as_nbdkit() {
    let im = Images::make();
    for kind in ["ext2", "ext3", "ext4"] {
        let img = im.path(&format!("{kind}.img"));
        for (file, src) in [
            ("/disk.raw", "disk.raw"),
            ("/sub/other.raw", "sub/other.raw"),
        ] {
            let param = format!("ext2file={file}");
            let pair = Pair::start(&["--filter=ext2", "file", &img, &param]);
            let (s, n) = pair.py(READ_ALL);
            assert_eq!(s, read_all_of(&im.source(src)), "{kind} {file}: sluice");
            assert_eq!(s, n, "{kind} {file}: sluice vs nbdkit");
            if file == "/disk.raw" {
                // Every capability field nbdinfo shows, as nbdkit answers them: writable,
                // flush, native FUA, zero emulated, no trim, no fast zero, cache emulated,
                // no multi-conn.
                let c = caps(&pair.sluice.uri(), false);
                assert_eq!(c, caps(&pair.nbdkit.uri(), false), "{kind}: capabilities");
                assert_eq!(c["can_multi_conn"], false);
                assert_eq!(c["can_trim"], false);
                assert_eq!(c["can_fua"], true);
            }
        }
    }
    // Read-only (-r): the same capabilities again (no FUA, no zero).
    let img = im.path("ext4.img");
    let ro = same_caps(
        &["-r", "--filter=ext2", "file", &img, "ext2file=/disk.raw"],
        false,
    );
    assert_eq!(ro["is_read_only"], true);
}

#[test]
fn ext2_extents_are_the_files_not_the_images() {
    // Deliberate difference: nbdkit's filter passes block status through to the plugin,
    // which answers for the filesystem image at the file's offsets (so it can report holes
    // in a file full of random data). sluice reports the file as one data extent.
    let im = Images::make();
    let img = im.path("ext4.img");
    let s = Server::start(&["--filter=ext2", "file", &img, "ext2file=/disk.raw"]);
    let map = run("nbdinfo", &["--map", &s.uri()]);
    let rows: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 1, "{map}");
    assert_eq!(rows[0][..3], ["0", &DISK.to_string(), "0"], "{map}");
}

#[test]
fn ext2_writes_land_in_the_file_and_leave_a_clean_filesystem() {
    let im = Images::make();
    let mut want = im.source("disk.raw");
    let patch: Vec<u8> = (0..70000u32).map(|i| (i % 251) as u8).collect();
    want[4095..4095 + 5000].fill(b'A');
    want[1_000_003..1_000_003 + patch.len()].copy_from_slice(&patch);
    want[2_000_001..2_010_001].fill(0);
    want[DISK - 100..].fill(b'B');
    let script = format!(
        "h.pwrite(b'A' * 5000, 4095)\n\
         h.pwrite(bytes((i % 251) for i in range(70000)), 1000003, nbd.CMD_FLAG_FUA)\n\
         h.zero(10000, 2000001)\n\
         h.pwrite(b'B' * 100, {end})\n\
         h.flush()\n\
         print(t(lambda: h.pwrite(b'x' * 10, {past})), {READ_ALL_EXPR})",
        end = DISK - 100,
        past = DISK - 5,
    );
    // ext2 maps blocks with indirect blocks, ext4 with extents.
    for kind in ["ext2", "ext4"] {
        let mut seen = Vec::new();
        for who in ["sluice", "nbdkit"] {
            let img = im.copy(kind, &format!("{who}-{kind}.img"));
            let args = ["--filter=ext2", "file", img.as_str(), "ext2file=/disk.raw"];
            let mut server = if who == "sluice" {
                Server::start(&args)
            } else {
                Server::try_start_nbdkit(&args).unwrap()
            };
            let out = py(&server.uri(), &script);
            // The filesystem is closed (bitmaps and superblock written back) when the
            // client goes; stopping the server waits for that.
            let status = server.stop();
            assert!(status.success(), "{who}: {status}\n{}", server.stderr());
            assert_fsck_clean(&img, who);
            let bytes = debugfs_cat(&img, "/disk.raw");
            assert!(bytes == want, "{who} {kind}: the file as debugfs reads it");
            // The other file is untouched.
            assert!(debugfs_cat(&img, "/sub/other.raw") == im.source("sub/other.raw"));
            seen.push(out);
        }
        // A write past the file's end fails the same way; the reads saw the same bytes.
        assert_eq!(seen[0], seen[1], "{kind}: sluice vs nbdkit");
        assert_eq!(
            seen[0],
            format!("ENOSPC {}", read_all_of(&want)),
            "{kind}: sluice's client"
        );
    }
}

/// READ_ALL as one expression.
const READ_ALL_EXPR: &str = "h.get_size(), sha(h.pread(h.get_size(), 0))";

#[test]
fn ext2_read_only_leaves_the_image_byte_identical() {
    let im = Images::make();
    for kind in ["ext3", "ext4"] {
        let img = im.copy(kind, "ro.img");
        let before = std::fs::read(&img).unwrap();
        let mut s = Server::start(&["-r", "--filter=ext2", "file", &img, "ext2file=/disk.raw"]);
        let out = py(
            &s.uri(),
            &format!("h.flush()\nprint(t(lambda: h.pwrite(b'x', 0)), {READ_ALL_EXPR})"),
        );
        assert_eq!(
            out,
            format!("EPERM {}", read_all_of(&im.source("disk.raw")))
        );
        assert!(s.stop().success());
        assert!(
            std::fs::read(&img).unwrap() == before,
            "{kind}: -r changed the image"
        );
    }
}

#[test]
fn ext2_exportname_serves_the_file_the_client_names() {
    let im = Images::make();
    let img = im.path("ext4.img");
    let pair = Pair::start(&["--filter=ext2", "file", &img, "ext2file=exportname"]);
    for (export, src) in [
        ("disk.raw", "disk.raw"),
        ("sub/other.raw", "sub/other.raw"),
        ("/sub/other.raw", "sub/other.raw"),
    ] {
        let want = read_all_of(&im.source(src));
        for server in [&pair.sluice, &pair.nbdkit] {
            assert_eq!(py(&server.uri_for(export), READ_ALL), want, "{export}");
        }
    }
    // The default export "" is refused by both.
    refuses_client(&pair.sluice, "sluice, \"\"", "not permitted");
    refuses_client(&pair.nbdkit, "nbdkit, \"\"", "not permitted");
    // No exports are listed.
    for server in [&pair.sluice, &pair.nbdkit] {
        let list = run("nbdinfo", &["--list", "--json", &server.uri()]);
        let v: serde_json::Value = serde_json::from_str(&list).unwrap();
        assert_eq!(v["exports"].as_array().map(Vec::len), Some(0), "{list}");
    }
}

#[test]
fn ext2_open_errors_match_nbdkit() {
    let im = Images::make();
    let img = im.path("ext4.img");
    let junk = im.path("junk.img");
    std::fs::write(&junk, random_bytes(1 << 20, 5)).unwrap();
    let cases = [
        (
            img.as_str(),
            "/nope",
            "ext2: /nope: File not found by ext2_lookup",
            "/nope: namei: File not found by ext2_lookup",
        ),
        (
            img.as_str(),
            "/emptydir",
            "ext2: /emptydir: is a directory, not a regular file",
            "/emptydir: must be a regular file in the disk image",
        ),
        (
            img.as_str(),
            "/link",
            "ext2: /link: is a symbolic link",
            "/link: must be a regular file in the disk image",
        ),
        (
            junk.as_str(),
            "/disk.raw",
            "ext2: opening the filesystem: Bad magic number in super-block",
            "open: Bad magic number in super-block",
        ),
    ];
    for (image, file, ours, theirs) in cases {
        let param = format!("ext2file={file}");
        let pair = Pair::start(&["--filter=ext2", "file", image, &param]);
        refuses_client(&pair.sluice, file, ours);
        refuses_client(&pair.nbdkit, file, theirs);
    }
}

#[test]
fn ext2_bad_parameters_match_nbdkit() {
    let im = Images::make();
    let img = im.path("ext4.img");
    sluice_refuses(&["--filter=ext2", "file", &img], "ext2: ext2file: required");
    let err = nbdkit_refusal(&["--filter=ext2", "file", &img]);
    assert!(err.contains("you must supply ext2file="), "{err}");
    let relative = ["--filter=ext2", "file", &img, "ext2file=disk.raw"];
    sluice_refuses(&relative, "must be an absolute path");
    let err = nbdkit_refusal(&relative);
    assert!(err.contains("must refer to an absolute path"), "{err}");
    let twice = ["--filter=ext2", "file", &img, "ext2file=/a", "ext2file=/b"];
    sluice_refuses(&twice, "ext2: ext2file: only one");
    let err = nbdkit_refusal(&twice);
    assert!(err.contains("specified more than once"), "{err}");
}

#[test]
fn ext2_second_client_waits_for_the_first_as_nbdkit() {
    // serialize_connections, as nbdkit's filter: two filesystem handles on one image would
    // corrupt it, so a second client is only served once the first has gone.
    let im = Images::make();
    let img = im.path("ext4.img");
    let args = ["--filter=ext2", "file", img.as_str(), "ext2file=/disk.raw"];
    for peer in BOTH {
        let out = peer
            .command(&[&args[..], &["--dump-plugin"][..]].concat())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.lines()
                .any(|l| l == "thread_model=serialize_connections"),
            "{peer:?}:\n{text}"
        );
    }
    let s = Server::start(&args);
    let first = crate::support::NbdHolder::connect(&s.uri(), "");
    let uri = s.uri();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(run("nbdinfo", &["--size", &uri]));
    });
    let waited = rx.recv_timeout(std::time::Duration::from_millis(500));
    assert!(
        waited.is_err(),
        "the second client was served at once: {waited:?}"
    );
    assert_eq!(first.release(), "read ok\n");
    let size = rx.recv_timeout(std::time::Duration::from_secs(20)).unwrap();
    assert_eq!(size.trim(), DISK.to_string());
}
