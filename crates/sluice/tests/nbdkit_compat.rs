//! The nbdkit plugin compatibility matrix: every plugin Debian's nbdkit installs, run under
//! sluice and under nbdkit with the same parameters and compared, and the result written to
//! `docs/compat/nbdkit-plugins.md`.
//!
//! A plugin that needs no outside service is served by both servers from identical fresh
//! fixtures; each export's capabilities (nbdinfo --json), its contents (nbdcopy, or qemu-io
//! reads of a few ranges for large ones, or the files of a generated filesystem), and, when
//! writable, a qemu-io write and what it left behind (the export and the fixture files) must
//! be the same under both. Every plugin's `--dump-plugin` output must equal nbdkit's. The
//! ABI-edge test plugins (API 1, short struct, `_api_version = 3`, no `.open`) get rows too:
//! an old plugin on this server works, a newer one is refused exactly as nbdkit refuses it.
//!
//! The document is generated, not written by hand: this test renders it deterministically
//! (no paths, times or process ids) and fails if the committed file differs, unless
//! `SLUICE_UPDATE_DOCS=1` is set, in which case it rewrites the file.

use crate::support;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use support::{output, path_str, random_bytes, Server};

const DEBIAN_PLUGIN_DIR: &str = "/usr/lib/x86_64-linux-gnu/nbdkit/plugins";

/// Where the generated matrix lives, relative to the workspace root.
const DOC_PATH: &str = "docs/compat/nbdkit-plugins.md";

/// A placeholder in parameters for the case's private fixture directory.
const DIR: &str = "$DIR";
/// A placeholder for sluice-nbdkit's C test plugin sources.
const PLUGIN_SRC: &str = "$PLUGIN_SRC";

/// nbdinfo fields that legitimately differ, with the reason shown in the document.
const NOT_COMPARED: &[(&str, &str)] = &[
    ("uri", "names each server's own socket"),
    (
        "block_size_minimum, block_size_preferred, block_size_maximum",
        "sluice always sends NBD_INFO_BLOCK_SIZE (1/4096/32M unless the plugin's \
         .block_size says otherwise); nbdkit 1.32 sends it only for plugins with .block_size",
    ),
];

/// nbdinfo fields that differ because of a known sluice bug: shown in the matrix, but not
/// failing the test. Remove an entry when its bug is fixed.
const KNOWN_DIFFERENCES: &[(&str, &str)] = &[];

/// Where a plugin comes from.
#[derive(Clone, Copy)]
enum Source {
    /// Debian's `nbdkit-NAME-plugin.so` (or script) in [`DEBIAN_PLUGIN_DIR`].
    Debian,
    /// A C test plugin, compiled here (crates/nbdkit/tests/plugins/NAME.c).
    TestPlugin,
}

/// How the contents of an export are read.
#[derive(Clone, Copy)]
enum Read {
    /// The whole export with nbdcopy.
    Copy,
    /// `qemu-io read -v` of these (offset, length) ranges: for exports too large to copy.
    Ranges(&'static [(u64, u64)]),
    /// The export is a GPT disk with one ext2 filesystem (linuxdisk): compare its files,
    /// read with debugfs, since the image itself has random UUIDs and creation times.
    Ext2Files,
}

#[derive(Clone, Copy)]
enum Mode {
    /// Served, read, and written at (offset, length) if Some.
    Serve {
        export: &'static str,
        read: Read,
        write: Option<(u64, u64)>,
    },
    /// Needs an outside service: only `--dump-plugin` is compared.
    DumpOnly,
    /// An executable script, not a shared object: loaded by neither server as a path.
    Script,
    /// A plugin both servers must refuse to load (exit 1, nothing served).
    Refused,
}

/// One row of the matrix.
struct Case {
    name: &'static str,
    source: Source,
    /// Parameters, with [`DIR`] and [`PLUGIN_SRC`] placeholders.
    params: &'static [&'static str],
    fixture: fn(&Path) -> Vec<Server>,
    mode: Mode,
    notes: &'static str,
}

const fn serve(read: Read, write: Option<(u64, u64)>) -> Mode {
    Mode::Serve {
        export: "",
        read,
        write,
    }
}

const W: Option<(u64, u64)> = Some((4096, 4096));
const RO: Option<(u64, u64)> = None;

fn no_fixture(_: &Path) -> Vec<Server> {
    Vec::new()
}

/// `disk.img`: 1 MiB of a fixed pseudo-random pattern.
fn disk_fixture(dir: &Path) -> Vec<Server> {
    std::fs::write(dir.join("disk.img"), random_bytes(1 << 20, 7)).unwrap();
    Vec::new()
}

/// `p1.img` (64 KiB of 'A') and `p2.img` (128 KiB of 'B').
fn parts_fixture(dir: &Path) -> Vec<Server> {
    std::fs::write(dir.join("p1.img"), vec![b'A'; 64 << 10]).unwrap();
    std::fs::write(dir.join("p2.img"), vec![b'B'; 128 << 10]).unwrap();
    Vec::new()
}

/// `tree/` with a few files and a subdirectory, all with fixed times (filesystem images
/// record them).
fn tree_fixture(dir: &Path) -> Vec<Server> {
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("a.txt"), "hello, sluice\n").unwrap();
    std::fs::write(tree.join("b.bin"), random_bytes(5000, 3)).unwrap();
    std::fs::write(tree.join("sub/c.txt"), "nested\n").unwrap();
    let paths = ["sub/c.txt", "sub", "a.txt", "b.bin", "."].map(|p| tree.join(p));
    let mut touch = Command::new("touch");
    touch.args(["-h", "-d", "@1600000000"]).args(&paths);
    assert!(touch.status().unwrap().success());
    Vec::new()
}

/// `tree/` plus `mkiso.sh`, a stand-in for xorriso (not one of the test peers) that writes
/// a reproducible tar of the last directory argument.
fn iso_fixture(dir: &Path) -> Vec<Server> {
    tree_fixture(dir);
    write_script(
        &dir.join("mkiso.sh"),
        "#!/bin/sh\nfor last; do :; done\n\
         exec tar -C \"$last\" -c --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner .\n",
    );
    Vec::new()
}

/// `plugin.sh`: an nbdkit sh plugin serving `disk.img` beside it.
fn sh_fixture(dir: &Path) -> Vec<Server> {
    disk_fixture(dir);
    write_script(
        &dir.join("plugin.sh"),
        "#!/bin/sh\nf=\"$(dirname \"$0\")/disk.img\"\ncase \"$1\" in\n\
         get_size) stat -L -c %s \"$f\" ;;\n\
         pread) dd if=\"$f\" skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none ;;\n\
         pwrite) dd of=\"$f\" seek=$4 conv=notrunc oflag=seek_bytes status=none ;;\n\
         can_write) exit 0 ;;\n\
         *) exit 2 ;;\nesac\n",
    );
    Vec::new()
}

/// `plugin.py`: an nbdkit python plugin, a 64 KiB RAM disk.
fn python_fixture(dir: &Path) -> Vec<Server> {
    std::fs::write(
        dir.join("plugin.py"),
        "API_VERSION = 2\n\
         disk = bytearray(b'P' * 65536)\n\
         def open(readonly):\n    return 1\n\
         def get_size(h):\n    return len(disk)\n\
         def pread(h, buf, offset, flags):\n    buf[:] = disk[offset:offset + len(buf)]\n\
         def pwrite(h, buf, offset, flags):\n    disk[offset:offset + len(buf)] = buf\n",
    )
    .unwrap();
    Vec::new()
}

/// `backing.sock`: an nbdkit data plugin (a RAM disk with a little data) for the nbd plugin.
fn nbd_fixture(dir: &Path) -> Vec<Server> {
    let backing = Server::try_start_nbdkit(&["data", "1 2 3 @0x1000 4 5 6", "size=1M"])
        .expect("backing nbdkit for the nbd plugin");
    std::os::unix::fs::symlink(&backing.socket, dir.join("backing.sock")).unwrap();
    vec![backing]
}

fn exports_fixture(dir: &Path) -> Vec<Server> {
    std::fs::create_dir_all(dir.join("exports")).unwrap();
    Vec::new()
}

fn write_script(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The command tmpdisk and ondemand run to "format" a new disk.
const MKFS_COMMAND: &str =
    "command=truncate -s \"$size\" \"$disk\" && printf sluice | dd of=\"$disk\" conv=notrunc status=none";

/// Every plugin Debian's nbdkit 1.32 installs, and the ABI-edge test plugins.
fn cases() -> Vec<Case> {
    use Mode::{DumpOnly, Refused, Script};
    use Read::{Copy, Ext2Files, Ranges};
    use Source::{Debian, TestPlugin};
    let c = |name, source, params, fixture, mode, notes| Case {
        name,
        source,
        params,
        fixture,
        mode,
        notes,
    };
    vec![
        c("S3", Debian, &[], no_fixture, Script,
          "Python script (`#!/usr/bin/nbdkit python`); needs boto3 and an S3 service."),
        c("cc", Debian, &["$PLUGIN_SRC/recorder.c", "EXTRA_CFLAGS=-I$PLUGIN_SRC", "size=1M", "fua=native"],
          no_fixture, serve(Copy, W), "Compiles the C source with `cc` at startup and loads it."),
        c("cdi", Debian, &[], no_fixture, DumpOnly, "Needs podman and a container registry."),
        c("curl", Debian, &["url=file://$DIR/disk.img"], disk_fixture, serve(Copy, W),
          "A file:// URL; curl's upload replaces the file from offset 0, under both servers."),
        c("data", Debian, &["data=1 2 3 @0x1000 4 5 6 @^0x10000 (0x55 0xAA)*64", "size=1M"],
          no_fixture, serve(Copy, W), ""),
        c("eval", Debian, &[
            "get_size=stat -L -c %s $DIR/disk.img",
            "pread=dd if=$DIR/disk.img skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none",
            "pwrite=dd of=$DIR/disk.img seek=$4 conv=notrunc oflag=seek_bytes status=none",
        ], disk_fixture, serve(Copy, W), ""),
        c("example1", Debian, &[], no_fixture,
          serve(Ranges(&[(0, 512), (50 << 20, 512), ((100 << 20) - 512, 512)]), RO),
          "100 MiB: three ranges read with qemu-io."),
        c("example2", Debian, &["file=$DIR/disk.img"], disk_fixture, serve(Copy, RO), ""),
        c("example3", Debian, &["size=1M"], no_fixture, serve(Copy, W), ""),
        c("example4", Debian, &[], no_fixture, Script,
          "Perl script (`#!/usr/bin/nbdkit perl`); the perl plugin is not installed."),
        c("file", Debian, &["file=$DIR/disk.img"], disk_fixture, serve(Copy, W), ""),
        c("floppy", Debian, &["dir=$DIR/tree"], tree_fixture, serve(Copy, RO), ""),
        c("full", Debian, &["size=1M"], no_fixture, serve(Copy, W),
          "Writes fail with ENOSPC under both."),
        c("info", Debian, &["mode=exportname"], no_fixture,
          Mode::Serve { export: "sluice-compat", read: Copy, write: RO },
          "Read through the export name `sluice-compat`."),
        c("iso", Debian, &["dir=$DIR/tree", "prog=$DIR/mkiso.sh"], iso_fixture, serve(Copy, RO),
          "`prog=` is a stand-in for xorriso (not installed): a reproducible tar of the directory."),
        c("linuxdisk", Debian, &["dir=$DIR/tree"], tree_fixture, serve(Ext2Files, RO),
          "The image has random GPT/filesystem UUIDs and mkfs times, so its files are compared \
           (debugfs), not its bytes."),
        c("memory", Debian, &["size=1M"], no_fixture, serve(Copy, W),
          "Loaded as the .so; `sluice serve memory` is sluice's built-in."),
        c("nbd", Debian, &["socket=$DIR/backing.sock"], nbd_fixture, serve(Copy, W),
          "Proxies a private nbdkit data plugin."),
        c("null", Debian, &["size=1M"], no_fixture, serve(Copy, W), ""),
        c("ondemand", Debian, &["dir=$DIR/exports", "size=1M", "wait=true", MKFS_COMMAND],
          exports_fixture, serve(Copy, W),
          "`command=` writes a marker instead of running mkfs. `wait=true`: a client that \
           connects before the previous one's close has run waits instead of failing."),
        c("partitioning", Debian, &["file=$DIR/p1.img", "file=$DIR/p2.img"], parts_fixture,
          serve(Copy, Some((1 << 20, 4096))), "MBR; the write lands in the first partition."),
        c("pattern", Debian, &["size=1M"], no_fixture, serve(Copy, RO), ""),
        c("python", Debian, &["script=$DIR/plugin.py"], python_fixture, serve(Copy, W),
          "A 64 KiB RAM disk in Python, run by the embedded interpreter."),
        c("random", Debian, &["size=1M", "seed=42"], no_fixture, serve(Copy, W),
          "Writes of other data fail with EIO under both."),
        c("sh", Debian, &["$DIR/plugin.sh"], sh_fixture, serve(Copy, W), ""),
        c("sparse-random", Debian, &["size=4M", "seed=42"], no_fixture, serve(Copy, W),
          "Writes of other data fail with EIO under both."),
        c("split", Debian, &["file=$DIR/p1.img", "file=$DIR/p2.img"], parts_fixture,
          serve(Copy, Some((63 << 10, 4096))), "The write spans both files."),
        c("ssh", Debian, &[], no_fixture, DumpOnly, "Needs an SSH server."),
        c("tmpdisk", Debian, &["size=1M", MKFS_COMMAND], no_fixture, serve(Copy, W),
          "`command=` writes a marker instead of running mkfs."),
        c("torrent", Debian, &[], no_fixture, DumpOnly, "Needs BitTorrent peers."),
        c("zero", Debian, &[], no_fixture, serve(Copy, RO), "A 0-byte export."),
        // The C test plugins of crates/nbdkit/tests/plugins.
        c("api3", TestPlugin, &[], no_fixture, Refused,
          "A newer plugin (`_api_version = 3`) on this server: refused, exit 1, nothing served."),
        c("no_open", TestPlugin, &[], no_fixture, Refused, "No `.open`: refused, exit 1."),
        c("ramdisk_v1", TestPlugin, &["size=1M"], no_fixture, serve(Copy, W),
          "An old plugin (API 1, flag-less callbacks) on this server."),
        c("recorder", TestPlugin, &["size=1M", "fua=native"], no_fixture, serve(Copy, W),
          "API 2 with every callback."),
        c("small_struct", TestPlugin, &["foo"], no_fixture, serve(Copy, W),
          "`_struct_size = 192`: fields past it are ignored."),
    ]
}

// ---- running one side ---------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Sluice,
    Nbdkit,
}

/// What one server did with one case.
#[derive(Default, PartialEq, Eq)]
struct Outcome {
    /// Why it did not start (normalized), or None if it served.
    refused: Option<String>,
    /// nbdinfo --json fields of the export, except [`NOT_COMPARED`].
    caps: BTreeMap<String, String>,
    contents: Vec<u8>,
    /// qemu-io's report of the write (timing removed) and the contents afterwards.
    write: Option<(String, Vec<u8>)>,
    /// Every regular file in the fixture directory after the server stopped.
    files: BTreeMap<String, Vec<u8>>,
}

fn plugin_path(case: &Case) -> PathBuf {
    match case.source {
        Source::TestPlugin => support::c_plugin(case.name),
        Source::Debian => {
            let base = Path::new(DEBIAN_PLUGIN_DIR).join(format!("nbdkit-{}-plugin", case.name));
            let so = base.with_extension("so");
            if so.exists() {
                so
            } else {
                base
            }
        }
    }
}

fn params_for(case: &Case, dir: &Path) -> Vec<String> {
    let src = support::nbdkit_test_plugin_dir();
    case.params
        .iter()
        .map(|p| {
            p.replace(DIR, path_str(dir))
                .replace(PLUGIN_SRC, path_str(&src))
        })
        .collect()
}

/// Replaces the run's own paths and program name so that both sides' texts compare.
fn normalize(text: &str, dir: &Path) -> String {
    text.replace(path_str(dir), DIR)
        .replace(path_str(support::c_plugin_build_dir()), "$BUILD")
        .replace(path_str(&support::nbdkit_test_plugin_dir()), PLUGIN_SRC)
        .replace("sluice", "nbdkit")
}

fn start(side: Side, args: &[&str]) -> Result<Server, String> {
    match side {
        Side::Sluice => Server::try_start(args),
        Side::Nbdkit => Server::try_start_nbdkit(args),
    }
}

/// Runs `f` on a thread named `name`, so that a failing client command names the case and
/// the server it failed under.
fn named<T: Send>(name: String, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let t = std::thread::Builder::new()
            .name(name)
            .spawn_scoped(s, f)
            .unwrap();
        t.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// A case's fixture directory and the servers it needs running.
struct Fixture {
    dir: tempfile::TempDir,
    keep: Vec<Server>,
}

/// Two copies of a case's fixture, one per server, made together: filesystem plugins
/// (floppy) record inode change times, which no one can set, so both copies must be made
/// within the same second.
fn fixture_pair(case: &Case) -> (Fixture, Fixture) {
    let make = || {
        let dir = tempfile::tempdir().unwrap();
        let keep = (case.fixture)(dir.path());
        Fixture { dir, keep }
    };
    for _ in 0..10 {
        let (a, b) = (make(), make());
        if change_seconds(a.dir.path()) == change_seconds(b.dir.path()) {
            return (a, b);
        }
    }
    panic!(
        "{}: could not make two fixtures within one second",
        case.name
    );
}

/// The ctime (whole seconds) of every entry under `dir`, by relative path.
fn change_seconds(dir: &Path) -> BTreeMap<PathBuf, i64> {
    use std::os::unix::fs::MetadataExt;
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, i64>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            out.insert(path.strip_prefix(root).unwrap().to_path_buf(), meta.ctime());
            if meta.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn run_side(case: &Case, side: Side, fixture: Fixture) -> Outcome {
    let label = match side {
        Side::Sluice => "sluice",
        Side::Nbdkit => "nbdkit",
    };
    named(format!("{} under {label}", case.name), || {
        serve_case(case, side, fixture)
    })
}

fn serve_case(case: &Case, side: Side, fixture: Fixture) -> Outcome {
    let Fixture { dir, keep } = fixture;
    let plugin = plugin_path(case);
    let params = params_for(case, dir.path());
    let mut args = vec![path_str(&plugin)];
    args.extend(params.iter().map(String::as_str));
    let mut out = Outcome::default();
    let mut server = match start(side, &args) {
        Ok(s) => s,
        Err(e) => {
            out.refused = Some(normalize(&e, dir.path()));
            return out;
        }
    };
    let Mode::Serve {
        export,
        read,
        write,
    } = case.mode
    else {
        panic!("{}: started although it should not serve", case.name);
    };
    let uri = server.uri_for(export);
    out.caps = capabilities(&uri);
    out.contents = read_contents(&uri, read, dir.path());
    let writable = out.caps.get("is_read_only").map(String::as_str) == Some("false");
    if let (Some((offset, len)), true) = (write, writable) {
        let cmd = format!("write -P 0x5a {offset} {len}");
        let o = output("qemu-io", &["-f", "raw", "-c", &cmd, &uri]);
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let report: Vec<&str> = report.lines().filter(|l| !l.contains(" ops; ")).collect();
        out.write = Some((report.join("\n"), read_contents(&uri, read, dir.path())));
    }
    server.stop();
    drop(keep);
    out.files = fixture_files(dir.path());
    out
}

/// The export's nbdinfo --json fields, as text, except [`NOT_COMPARED`] ones.
fn capabilities(uri: &str) -> BTreeMap<String, String> {
    let json = support::run("nbdinfo", &["--json", uri]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let export = &v["exports"][0];
    let skip: Vec<&str> = NOT_COMPARED
        .iter()
        .flat_map(|(fields, _)| fields.split(", "))
        .collect();
    export
        .as_object()
        .expect("nbdinfo --json lists the export")
        .iter()
        .filter(|(k, _)| !skip.contains(&k.as_str()))
        .map(|(k, v)| {
            let mut v = v.to_string();
            if k == "description" {
                v = mask_pid(&v);
            }
            (k.clone(), v)
        })
        .collect()
}

/// The recorder's export description names the client's pid (`pid=1234`), which differs
/// between any two nbdinfo runs: `pid=N`.
fn mask_pid(text: &str) -> String {
    match text.split_once("pid=") {
        Some((head, tail)) => {
            let rest = tail.trim_start_matches(|c: char| c.is_ascii_digit() || c == '-');
            format!("{head}pid=N{rest}")
        }
        None => text.to_string(),
    }
}

fn read_contents(uri: &str, read: Read, dir: &Path) -> Vec<u8> {
    match read {
        Read::Copy => {
            let file = dir.join("copy.out");
            support::run("nbdcopy", &[uri, path_str(&file)]);
            let data = std::fs::read(&file).unwrap();
            std::fs::remove_file(&file).unwrap();
            data
        }
        Read::Ranges(ranges) => {
            let mut args = vec!["-f".to_string(), "raw".into(), "-r".into()];
            for (off, len) in ranges {
                args.push("-c".into());
                args.push(format!("read -v {off} {len}"));
            }
            args.push(uri.to_string());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let text = support::run("qemu-io", &args);
            text.lines()
                .filter(|l| !l.contains(" ops; "))
                .collect::<Vec<_>>()
                .join("\n")
                .into_bytes()
        }
        Read::Ext2Files => {
            let file = dir.join("copy.out");
            support::run("nbdcopy", &[uri, path_str(&file)]);
            let text = ext2_files(&file);
            std::fs::remove_file(&file).unwrap();
            text.into_bytes()
        }
    }
}

/// The listing and file contents of the ext2 filesystem in the first GPT partition of
/// `image`, as debugfs reports them.
fn ext2_files(image: &Path) -> String {
    let data = std::fs::read(image).unwrap();
    // The first GPT partition entry is at LBA 2; its first LBA at byte 32 of the entry.
    let lba = u64::from_le_bytes(data[1024 + 32..1024 + 40].try_into().unwrap());
    let start = usize::try_from(lba * 512).unwrap();
    assert_eq!(
        &data[start + 1024 + 56..start + 1024 + 58],
        &[0x53, 0xef],
        "no ext2 superblock in the first partition"
    );
    let part = image.with_extension("part");
    std::fs::write(&part, &data[start..]).unwrap();
    let mut text = String::new();
    for request in [
        "ls -p /",
        "ls -p /sub",
        "cat /a.txt",
        "cat /b.bin",
        "cat /sub/c.txt",
    ] {
        let o = output("debugfs", &["-R", request, path_str(&part)]);
        assert!(o.status.success(), "debugfs -R {request:?}");
        writeln!(text, "{request}:").unwrap();
        text.push_str(&String::from_utf8_lossy(&o.stdout));
    }
    std::fs::remove_file(&part).unwrap();
    text
}

fn fixture_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                walk(root, &path, out);
            } else if meta.is_file() {
                let rel = path.strip_prefix(root).unwrap().display().to_string();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// `--dump-plugin` under one server: Ok(stdout) or Err(stderr), normalized.
fn dump(case: &Case, side: Side) -> Result<String, String> {
    let dir = tempfile::tempdir().unwrap();
    let _keep = (case.fixture)(dir.path());
    let plugin = plugin_path(case);
    let params = params_for(case, dir.path());
    let (program, mut args) = match side {
        Side::Sluice => (support::sluice_bin(), vec!["serve", "--dump-plugin"]),
        Side::Nbdkit => ("nbdkit", vec!["--dump-plugin"]),
    };
    args.push(path_str(&plugin));
    args.extend(params.iter().map(String::as_str));
    let o = output(program, &args);
    let text = |b: &[u8]| normalize(&String::from_utf8_lossy(b), dir.path());
    if o.status.success() {
        Ok(text(&o.stdout))
    } else {
        Err(text(&o.stderr))
    }
}

// ---- comparing and rendering --------------------------------------------------------------

/// One rendered row, and whether every comparison came out the same.
struct Row {
    name: String,
    source: &'static str,
    api: String,
    params: String,
    served: String,
    caps: String,
    read: String,
    write: String,
    dump: String,
    notes: String,
    same: bool,
}

fn check_case(case: &Case) -> Row {
    let mut same = true;
    let mut verdict = |equal: bool, text: String| {
        same &= equal;
        if equal {
            text
        } else {
            format!("**differs**: {text}")
        }
    };
    let ours_dump = dump(case, Side::Sluice);
    let theirs_dump = dump(case, Side::Nbdkit);
    let api = match &theirs_dump {
        Ok(t) => t
            .lines()
            .find_map(|l| l.strip_prefix("api_version="))
            .unwrap_or("?")
            .to_string(),
        Err(e) => e
            .split_once("_api_version = ")
            .map(|(_, n)| n.trim_end_matches([')', '\n']).to_string())
            .unwrap_or_else(|| "—".into()),
    };
    let dump_cell = match (&ours_dump, &theirs_dump) {
        (Ok(a), Ok(b)) => verdict(a == b, "same".into()),
        // Script plugins fail dlopen in both, worded after each server's own loader.
        (Err(a), Err(b)) => verdict(
            a == b || matches!(case.mode, Mode::Script),
            format!("both refuse: {}", first_line(b)),
        ),
        (a, b) => verdict(
            false,
            format!("sluice {}, nbdkit {}", ok_or_refused(a), ok_or_refused(b)),
        ),
    };
    let (served, caps, read, write) = match case.mode {
        Mode::Serve { read, write, .. } => {
            let (a, b) = fixture_pair(case);
            let ours = run_side(case, Side::Sluice, a);
            let theirs = run_side(case, Side::Nbdkit, b);
            compare_served(&ours, &theirs, read, write, &mut verdict)
        }
        Mode::Refused => {
            let (a, b) = fixture_pair(case);
            let ours = run_side(case, Side::Sluice, a);
            let theirs = run_side(case, Side::Nbdkit, b);
            let served = match (&ours.refused, &theirs.refused) {
                (Some(a), Some(b)) => verdict(a == b, format!("both refuse: {}", first_line(b))),
                _ => verdict(false, "one of them served it".into()),
            };
            (served, "—".into(), "—".into(), "—".into())
        }
        Mode::DumpOnly => (
            "not run (needs a service)".into(),
            "—".into(),
            "—".into(),
            "—".into(),
        ),
        Mode::Script => (
            "not run (script)".into(),
            "—".into(),
            "—".into(),
            "—".into(),
        ),
    };
    Row {
        name: case.name.to_string(),
        source: match case.source {
            Source::Debian => "debian",
            Source::TestPlugin => "test",
        },
        api,
        params: if case.params.is_empty() {
            "—".into()
        } else {
            case.params
                .iter()
                .map(|p| format!("`{}`", p.replace('|', "\\|")))
                .collect::<Vec<_>>()
                .join(" ")
        },
        served,
        caps,
        read,
        write,
        dump: dump_cell,
        notes: case.notes.to_string(),
        same,
    }
}

fn ok_or_refused(r: &Result<String, String>) -> String {
    match r {
        Ok(_) => "dumps".into(),
        Err(e) => format!("refuses ({})", first_line(e)),
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").replace('|', "\\|")
}

fn compare_served(
    ours: &Outcome,
    theirs: &Outcome,
    read: Read,
    write: Option<(u64, u64)>,
    verdict: &mut impl FnMut(bool, String) -> String,
) -> (String, String, String, String) {
    if ours.refused.is_some() || theirs.refused.is_some() {
        let served = verdict(
            false,
            format!(
                "sluice: {}; nbdkit: {}",
                ours.refused.as_deref().map_or("served".into(), first_line),
                theirs
                    .refused
                    .as_deref()
                    .map_or("served".into(), first_line),
            ),
        );
        return (served, "—".into(), "—".into(), "—".into());
    }
    let served = "both".to_string();
    let size = theirs.caps.get("export-size").cloned().unwrap_or_default();
    let ro = theirs.caps.get("is_read_only").map(String::as_str) == Some("true");
    let keys: std::collections::BTreeSet<&String> =
        ours.caps.keys().chain(theirs.caps.keys()).collect();
    let differing: Vec<&String> = keys
        .into_iter()
        .filter(|k| ours.caps.get(*k) != theirs.caps.get(*k))
        .collect();
    let describe = |k: &String| {
        format!(
            "{k}: sluice {} nbdkit {}",
            ours.caps.get(k).map_or("-", String::as_str),
            theirs.caps.get(k).map_or("-", String::as_str)
        )
    };
    let known = |k: &String| KNOWN_DIFFERENCES.iter().any(|(f, _)| f == k);
    let summary = format!("same ({size} bytes, {})", if ro { "ro" } else { "rw" });
    let caps = if differing.iter().all(|k| known(k)) {
        let mut text = summary;
        for k in &differing {
            write!(text, "; known difference: {}", describe(k)).unwrap();
        }
        verdict(true, text)
    } else {
        let unknown: Vec<String> = differing
            .into_iter()
            .filter(|k| !known(k))
            .map(describe)
            .collect();
        verdict(false, unknown.join("; "))
    };
    let amount = match read {
        Read::Copy => format!("{} bytes", theirs.contents.len()),
        Read::Ranges(r) => format!("{} ranges", r.len()),
        Read::Ext2Files => "files".into(),
    };
    let read = verdict(ours.contents == theirs.contents, format!("same ({amount})"));
    let write = match (write, &ours.write, &theirs.write) {
        (None, _, _) => "—".into(),
        (Some(_), None, None) if ro => "— (read-only)".into(),
        (Some(_), Some((ro_a, after_a)), Some((ro_b, after_b))) => {
            let report = ro_b.lines().next().unwrap_or("").to_string();
            let files_same = ours.files == theirs.files;
            verdict(
                ro_a == ro_b && after_a == after_b && files_same,
                format!("same: {report}"),
            )
        }
        _ => verdict(false, "only one server took the write".into()),
    };
    // Without a write, the fixture files must still be the same afterwards.
    let wrote = ours.write.is_some() || theirs.write.is_some();
    let read = if wrote || ours.files == theirs.files {
        read
    } else {
        verdict(false, format!("{read}; fixture files differ"))
    };
    (served, caps, read, write)
}

fn render(rows: &[Row], installed: usize) -> String {
    let mut doc = String::new();
    let nbdkit_version = support::run("nbdkit", &["--version"]);
    let debian: Vec<&Row> = rows.iter().filter(|r| r.source == "debian").collect();
    let served = debian
        .iter()
        .filter(|r| r.served == "both" && r.same)
        .count();
    let dump_same = debian.iter().filter(|r| r.dump == "same").count();
    writeln!(
        doc,
        "# nbdkit plugins under sluice\n\n\
         <!-- Generated by crates/sluice/tests/nbdkit_compat.rs; do not edit by hand.\n     \
         Regenerate: SLUICE_UPDATE_DOCS=1 cargo test -p sluice --test integration nbdkit_compat:: -->\n\n\
         Every plugin that Debian's `{}` installs in `{DEBIAN_PLUGIN_DIR}` ({installed} files), \
         loaded unmodified by sluice and by nbdkit with the same parameters and compared. \
         {served} are served with identical results; {dump_same} of {} give the same \
         `--dump-plugin` output.\n",
        nbdkit_version.trim(),
        debian.len(),
    )
    .unwrap();
    doc.push_str(
        "How each plugin was compared:\n\n\
         - **served**: `sluice serve -f -U SOCK PLUGIN.so PARAMS` and `nbdkit -f -U SOCK \
         PLUGIN.so PARAMS`, each from its own fresh copy of the same fixture (`$DIR`).\n\
         - **capabilities**: every field of `nbdinfo --json` except the ones listed below.\n\
         - **read**: the whole export with `nbdcopy` (or the listed exception).\n\
         - **write**: `qemu-io -f raw -c 'write -P 0x5a OFFSET LENGTH'` (4096 bytes at 4096 \
         unless noted), then the export read again and every fixture file compared.\n\
         - **--dump-plugin**: `sluice serve --dump-plugin` against `nbdkit --dump-plugin`, \
         byte for byte.\n\n\
         Fields not compared, by design:\n\n",
    );
    for (fields, why) in NOT_COMPARED {
        writeln!(doc, "- `{fields}`: {why}.").unwrap();
    }
    doc.push_str(
        "- `description`: compared with any `pid=NUMBER` (the recorder names its client's \
         pid) read as `pid=N`.\n\n",
    );
    if !KNOWN_DIFFERENCES.is_empty() {
        doc.push_str(
            "Known differences (sluice bugs, shown in the table but not failing the test):\n\n",
        );
        for (field, why) in KNOWN_DIFFERENCES {
            writeln!(doc, "- `{field}`: {why}.").unwrap();
        }
        doc.push('\n');
    }
    let header = "| plugin | API | parameters | served | capabilities | read | write | \
                  --dump-plugin | notes |\n\
                  |---|---|---|---|---|---|---|---|---|\n";
    let line = |r: &Row| {
        format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.name, r.api, r.params, r.served, r.caps, r.read, r.write, r.dump, r.notes
        )
    };
    doc.push_str("\n## Debian's plugins\n\n");
    doc.push_str(header);
    for r in &debian {
        doc.push_str(&line(r));
    }
    doc.push_str(
        "\n## ABI edges\n\n\
         sluice-nbdkit's C test plugins (`crates/nbdkit/tests/plugins`, `$PLUGIN_SRC` above), \
         compiled with `cc` against Debian's headers: an old plugin on this server, and a \
         plugin newer than both servers.\n\n",
    );
    doc.push_str(header);
    for r in rows.iter().filter(|r| r.source == "test") {
        doc.push_str(&line(r));
    }
    doc
}

/// The plugin names Debian installed (`nbdkit-NAME-plugin[.so]`).
fn installed_plugins() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(DEBIAN_PLUGIN_DIR)
        .unwrap_or_else(|e| panic!("{DEBIAN_PLUGIN_DIR}: {e} (install nbdkit: scripts/test.sh)"))
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            let name = name.strip_suffix(".so").unwrap_or(&name).to_string();
            name.strip_prefix("nbdkit-")?
                .strip_suffix("-plugin")
                .map(str::to_string)
        })
        .collect();
    names.sort();
    names
}

#[test]
fn nbdkit_plugin_matrix_matches_nbdkit_and_committed_doc() {
    let cases = cases();
    let installed = installed_plugins();
    let known: Vec<&str> = cases
        .iter()
        .filter(|c| matches!(c.source, Source::Debian))
        .map(|c| c.name)
        .collect();
    let missing: Vec<&String> = installed
        .iter()
        .filter(|n| !known.contains(&n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "installed plugins without a case: {missing:?}"
    );

    // Two workers: the machine has two cores, and each case runs several processes.
    let next = Mutex::new(0usize);
    let rows: Mutex<Vec<(usize, Row)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let i = {
                    let mut n = next.lock().unwrap();
                    *n += 1;
                    *n - 1
                };
                let Some(case) = cases.get(i) else { break };
                let row = check_case(case);
                rows.lock().unwrap().push((i, row));
            });
        }
    });
    let mut rows = rows.into_inner().unwrap();
    rows.sort_by_key(|(i, _)| *i);
    let rows: Vec<Row> = rows.into_iter().map(|(_, r)| r).collect();

    let doc = render(&rows, installed.len());
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(DOC_PATH);
    if std::env::var_os("SLUICE_UPDATE_DOCS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &doc).unwrap();
    } else {
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        let changed: Vec<String> = committed
            .lines()
            .zip(doc.lines())
            .filter(|(a, b)| a != b)
            .map(|(a, b)| format!("- {a}\n+ {b}"))
            .collect();
        assert!(
            committed == doc,
            "{DOC_PATH} is out of date; regenerate it with SLUICE_UPDATE_DOCS=1. Changed \
             lines:\n{}",
            if changed.is_empty() {
                "(line count)".to_string()
            } else {
                changed.join("\n")
            }
        );
    }
    let differing: Vec<&str> = rows
        .iter()
        .filter(|r| !r.same)
        .map(|r| r.name.as_str())
        .collect();
    assert!(
        differing.is_empty(),
        "sluice differs from nbdkit for {differing:?}; see {DOC_PATH}"
    );
}
