//! The scan, tar and ddrescue filters through the `sluice` binary, each beside Debian's nbdkit
//! 1.32.5 running the same filter over the same plugin: the same size, bytes, `nbdinfo
//! --json` capabilities and errors. Tar archives are made at test time with GNU `tar`
//! (gnu and pax formats, a name longer than 100 bytes, an entry that is not the first).
//!
//! Where sluice deliberately differs from nbdkit (see the filters' module docs) the test
//! says so and checks sluice against the truth instead: a GNU long-name entry (nbdkit serves
//! the bytes from the `././@LongLink` header on), `tar-limit` (not in 1.32.5), a ddrescue
//! read spanning two adjacent finished blocks (nbdkit fails it), and a required
//! `ddrescue-mapfile`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::filters::{caps, py, same_caps, sluice_refuses, Pair};
use crate::support::{path_str, random_bytes, run, NbdHolder, Server};

/// The sha256 prefix of `bytes`, as the Python prelude's `sha` prints it.
fn sha(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("b");
    std::fs::write(&f, bytes).unwrap();
    run(
        crate::support::PYTHON,
        &[
            "-c",
            "import hashlib,sys;print(hashlib.sha256(open(sys.argv[1],'rb').read()).hexdigest()[:16])",
            path_str(&f),
        ],
    )
    .trim()
    .to_string()
}

/// Asserts nbdkit refuses the same configuration (it exits 1).
#[track_caller]
fn nbdkit_refuses(args: &[&str]) {
    let out = Command::new("nbdkit")
        .args(["-f", "-U", "-", "--run", "true"])
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "nbdkit accepted {args:?}");
}

/// Asserts a client cannot open the default export of `server` (the filter refused it).
#[track_caller]
fn open_fails(server: &Server, what: &str) {
    let out = crate::support::output("nbdinfo", &["--size", &server.uri()]);
    assert!(!out.status.success(), "{what}: {} served it", server.uri());
}

/// A directory with three files and GNU tar archives of them in gnu and pax formats.
struct Archives {
    dir: tempfile::TempDir,
    long: String,
}

impl Archives {
    fn make() -> Archives {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let long = format!("sub/{}", "n".repeat(120));
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("first.txt"), random_bytes(5000, 1)).unwrap();
        std::fs::write(src.join("disk.img"), random_bytes(70000, 2)).unwrap();
        std::fs::write(src.join(&long), random_bytes(3000, 3)).unwrap();
        for (name, format) in [("gnu.tar", "gnu"), ("pax.tar", "pax")] {
            run(
                "tar",
                &[
                    &format!("--format={format}"),
                    "-C",
                    path_str(&src),
                    "-cf",
                    path_str(&dir.path().join(name)),
                    "first.txt",
                    "disk.img",
                    &long,
                ],
            );
        }
        Archives { dir, long }
    }

    fn path(&self, name: &str) -> String {
        path_str(&self.dir.path().join(name)).to_string()
    }

    fn source(&self, entry: &str) -> Vec<u8> {
        std::fs::read(self.dir.path().join("src").join(entry)).unwrap()
    }
}

/// The capabilities of a stack over the file plugin, but fast zero: the two file plugins
/// answer that differently with no filter at all (nbdkit's says no on ext4 here, sluice's
/// yes), and the tar filter passes it through unchanged in both.
fn file_caps(uri: &str) -> std::collections::BTreeMap<String, serde_json::Value> {
    let mut c = caps(uri, false);
    c.remove("can_fast_zero");
    c
}

const READ_ALL: &str = "print(h.get_size(), sha(h.pread(h.get_size(), 0)))";

#[test]
fn tar_serves_entries_of_gnu_and_pax_archives_as_nbdkit() {
    let a = Archives::make();
    for archive in ["gnu.tar", "pax.tar"] {
        let path = a.path(archive);
        for entry in ["disk.img", a.long.as_str(), "first.txt"] {
            let e = format!("tar-entry={entry}");
            let args = ["--filter=tar", "file", &path, &e];
            let want = a.source(entry);
            let truth = format!("{} {}\n", want.len(), sha(&want));
            let pair = Pair::start(&args);
            let (s, n) = pair.py(READ_ALL);
            assert_eq!(s, truth, "{archive} {entry}: sluice");
            if archive == "gnu.tar" && entry == a.long {
                // nbdkit 1.32.5 starts a GNU long-name entry at the `././@LongLink` header
                // `tar --block-number` reports, so its bytes are wrong; only the size agrees.
                assert_eq!(n.split(' ').next(), s.split(' ').next(), "{archive} long");
            } else {
                assert_eq!(s, n, "{archive} {entry}: sluice vs nbdkit");
            }
            assert_eq!(
                file_caps(&pair.sluice.uri()),
                file_caps(&pair.nbdkit.uri()),
                "{archive} {entry}"
            );
        }
    }
    // Read-only, as with -r.
    let path = a.path("pax.tar");
    let caps = same_caps(
        &["-r", "--filter=tar", "file", &path, "tar-entry=disk.img"],
        false,
    );
    assert_eq!(caps["is_read_only"], true);
}

#[test]
fn tar_writes_land_in_the_archive_as_nbdkit() {
    let a = Archives::make();
    let original = std::fs::read(a.path("pax.tar")).unwrap();
    let mut results = Vec::new();
    for who in ["sluice", "nbdkit"] {
        let copy = a.path(&format!("{who}.tar"));
        std::fs::write(&copy, &original).unwrap();
        let args = ["--filter=tar", "file", copy.as_str(), "tar-entry=disk.img"];
        let server = if who == "sluice" {
            Server::start(&args)
        } else {
            Server::try_start_nbdkit(&args).unwrap()
        };
        let out = py(
            &server.uri(),
            "h.pwrite(b'WRITTEN-THROUGH-TAR' * 100, 65000)\n\
             h.zero(1000, 100)\n\
             h.flush()\n\
             print(t(lambda: h.pwrite(b'x' * 10, 69995)))",
        );
        drop(server);
        let extracted = Command::new("tar")
            .args(["-xOf", &copy, "disk.img"])
            .output()
            .unwrap();
        assert!(extracted.status.success(), "{who}: tar -xOf");
        let listing = run("tar", &["-tf", &copy]);
        results.push((
            out,
            extracted.stdout,
            listing,
            std::fs::read(&copy).unwrap(),
        ));
    }
    let (s, n) = (&results[0], &results[1]);
    // A write past the entry's end is refused by both (the size is the entry's).
    assert_eq!(s.0, n.0);
    assert_eq!(s.0.trim(), "ENOSPC");
    let mut want = a.source("disk.img");
    want[100..1100].fill(0);
    let w = b"WRITTEN-THROUGH-TAR".repeat(100);
    want[65000..65000 + w.len()].copy_from_slice(&w);
    assert_eq!(s.1, want, "sluice: the entry as tar extracts it");
    assert_eq!(s.1, n.1);
    assert_eq!(s.2, n.2, "the archive's listing");
    assert_eq!(s.3.len(), original.len(), "the archive grew");
    assert!(s.3 == n.3, "sluice and nbdkit left different archives");
}

#[test]
fn tar_errors_match_nbdkit() {
    let a = Archives::make();
    let gnu = a.path("gnu.tar");
    // An entry that is not there: both refuse the client; sluice says why.
    let args = ["--filter=tar", "file", gnu.as_str(), "tar-entry=nope"];
    let pair = Pair::start(&args);
    open_fails(&pair.sluice, "sluice, missing entry");
    open_fails(&pair.nbdkit, "nbdkit, missing entry");
    assert!(
        pair.sluice
            .stderr()
            .contains("tar: nope: not found in the tar archive"),
        "{}",
        pair.sluice.stderr()
    );
    // A directory prefix is not an entry.
    let pair = Pair::start(&["--filter=tar", "file", gnu.as_str(), "tar-entry=sub"]);
    open_fails(&pair.sluice, "sluice, directory prefix");
    // A file that is not a tar archive.
    let junk = a.path("junk");
    std::fs::write(&junk, random_bytes(4096, 9)).unwrap();
    let pair = Pair::start(&["--filter=tar", "file", junk.as_str(), "tar-entry=disk.img"]);
    open_fails(&pair.sluice, "sluice, not a tar");
    open_fails(&pair.nbdkit, "nbdkit, not a tar");
    assert!(
        pair.sluice.stderr().contains("bad tar header at offset 0"),
        "{}",
        pair.sluice.stderr()
    );

    // Configuration errors: one line naming the filter and the key, exit 2.
    sluice_refuses(&["--filter=tar", "file", &gnu], "tar: tar-entry");
    nbdkit_refuses(&["--filter=tar", "file", &gnu]);
    let two = ["--filter=tar", "file", &gnu, "tar-entry=a", "tar-entry=b"];
    sluice_refuses(&two, "tar: tar-entry");
    nbdkit_refuses(&two);
    sluice_refuses(
        &["--filter=tar", "file", &gnu, "tar-entry=a", "tar-limit=1Q"],
        "tar: tar-limit",
    );
}

#[test]
fn tar_limit_bounds_the_search() {
    // Not in nbdkit 1.32.5 (later nbdkit's parameter): sluice only.
    let a = Archives::make();
    let gnu = a.path("gnu.tar");
    // disk.img's header is block 11 of gnu.tar (after first.txt's header and 10 blocks).
    let s = Server::start(&[
        "--filter=tar",
        "file",
        &gnu,
        "tar-entry=disk.img",
        "tar-limit=4k",
    ]);
    open_fails(&s, "tar-limit=4k");
    assert!(s.stderr().contains("tar-limit"), "{}", s.stderr());
    let s = Server::start(&[
        "--filter=tar",
        "file",
        &gnu,
        "tar-entry=disk.img",
        "tar-limit=6k",
    ]);
    assert_eq!(py(&s.uri(), "print(h.get_size())").trim(), "70000");
}

const MAPFILE: &str = "# Mapfile. Created by GNU ddrescue version 1.27\n\
# Command line: ddrescue /dev/sdx disk.img disk.map\n\
# current_pos  current_status  current_pass\n\
0x00008000     +               1\n\
#      pos        size  status\n\
0x00000000  0x00004000  +\n\
0x00004000  0x00001000  -\n\
20480  4096  /\n\
0x00006000  0x00001000  *\n\
0x00007000  0x00009000  +\n";

#[test]
fn ddrescue_fails_unrescued_reads_as_nbdkit() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, random_bytes(0x10000, 5)).unwrap();
    let map = dir.path().join("disk.map");
    std::fs::write(&map, MAPFILE).unwrap();
    let m = format!("ddrescue-mapfile={}", map.display());
    let args = ["--filter=ddrescue", "file", path_str(&disk), &m];
    let caps = same_caps(&args, false);
    assert_eq!(caps["is_read_only"], true);
    assert_eq!(caps["can_cache"], false);
    let pair = Pair::start(&args);
    let out = pair.same_py(
        "ddrescue reads",
        "r = lambda n, o: t(lambda: h.pread(n, o))\n\
         print(r(0x4000, 0), r(512, 0x3e00), r(1024, 0x3e00), r(512, 0x4000), \
               r(512, 0x5000), r(512, 0x6800), r(0x9000, 0x7000), r(512, 0x6e00), \
               sha(h.pread(0x4000, 0)), sha(h.pread(0x9000, 0x7000)))",
    );
    let disk_bytes = std::fs::read(&disk).unwrap();
    assert_eq!(
        out.trim(),
        format!(
            "ok ok EIO EIO EIO EIO ok EIO {} {}",
            sha(&disk_bytes[..0x4000]),
            sha(&disk_bytes[0x7000..])
        )
    );
    // The export is read-only for writes too.
    let out = pair.same_py(
        "ddrescue write",
        "print(t(lambda: h.pwrite(b'x' * 512, 0)))",
    );
    assert_eq!(out.trim(), "EPERM");
}

#[test]
fn ddrescue_adjacent_finished_blocks_serve_a_spanning_read() {
    // Deliberate difference: nbdkit checks each block alone and fails a read spanning two
    // adjacent finished blocks with EIO; sluice serves it, since every byte was rescued.
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("split.map");
    std::fs::write(
        &map,
        "0 + 1\n0 0x2000 +\n0x2000 0x2000 +\n0x4000 0xC000 -\n",
    )
    .unwrap();
    let m = format!("ddrescue-mapfile={}", map.display());
    let pair = Pair::start(&["--filter=ddrescue", "pattern", "64K", &m]);
    let (s, n) =
        pair.py("print(t(lambda: h.pread(4096, 0x1800)), t(lambda: h.pread(512, 0x4000)))");
    assert_eq!(s.trim(), "ok EIO");
    assert_eq!(n.trim(), "EIO EIO");
}

#[test]
fn ddrescue_bad_parameters_match_nbdkit() {
    sluice_refuses(
        &[
            "--filter=ddrescue",
            "pattern",
            "64K",
            "ddrescue-mapfile=/nonexistent/map",
        ],
        "ddrescue: ddrescue-mapfile",
    );
    nbdkit_refuses(&[
        "--filter=ddrescue",
        "pattern",
        "64K",
        "ddrescue-mapfile=/nonexistent/map",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("neg.map");
    std::fs::write(&map, "0 + 1\n-512 512 +\n").unwrap();
    let m = format!("ddrescue-mapfile={}", map.display());
    sluice_refuses(
        &["--filter=ddrescue", "pattern", "64K", &m],
        "must not be negative",
    );
    nbdkit_refuses(&["--filter=ddrescue", "pattern", "64K", &m]);
    // Deliberate difference: without a map file nbdkit serves a disk whose every read fails.
    sluice_refuses(
        &["--filter=ddrescue", "pattern", "64K"],
        "ddrescue: ddrescue-mapfile",
    );
}

/// The (offset, count) of each `Cache` request in a log filter's file.
fn cache_lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" Cache id=") && l.ends_with(" ..."))
        .map(|l| {
            let at = l.find("offset=").unwrap();
            l[at..l.len() - 4].to_string()
        })
        .collect()
}

/// Waits (generously) until `log` shows `n` cache requests; returns them.
fn wait_for_caches(log: &Path, n: usize) -> Vec<String> {
    let start = Instant::now();
    loop {
        let lines = cache_lines(log);
        if lines.len() >= n {
            return lines;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{} shows {} cache requests, not {n}",
            log.display(),
            lines.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn scan_prefetches_through_the_layer_below_as_nbdkit() {
    let dir = tempfile::tempdir().unwrap();
    let mut seen = Vec::new();
    for who in ["sluice", "nbdkit"] {
        let log = dir.path().join(format!("{who}.log"));
        let l = format!("logfile={}", log.display());
        // scan over log over the plugin: the log shows what scan sends down.
        let args = [
            "--filter=scan",
            "--filter=log",
            "pattern",
            "4M",
            &l,
            "scan-size=1M",
        ];
        let server = if who == "sluice" {
            Server::start(&args)
        } else {
            Server::try_start_nbdkit(&args).unwrap()
        };
        // Hold a client while the scan runs, then read everything once it is done.
        let holder = NbdHolder::connect(&server.uri(), "");
        let caches = wait_for_caches(&log, 4);
        let data = py(&server.uri(), READ_ALL);
        holder.release();
        seen.push((caches, data, caps(&server.uri(), false)));
    }
    let (s, n) = (&seen[0], &seen[1]);
    assert_eq!(
        s.0[..4],
        [
            "offset=0x0 count=0x100000",
            "offset=0x100000 count=0x100000",
            "offset=0x200000 count=0x100000",
            "offset=0x300000 count=0x100000"
        ]
    );
    assert_eq!(s.0[..4], n.0[..4], "prefetches: sluice vs nbdkit");
    // The data is the plugin's, unchanged.
    let plain = Pair::start(&["pattern", "4M"]);
    assert_eq!(s.1, py(&plain.sluice.uri(), READ_ALL));
    assert_eq!(s.1, n.1);
    assert_eq!(s.2, n.2, "capabilities");
}

#[test]
fn scan_without_native_cache_warns_and_passes_through() {
    // The nocache filter below hides cache requests, so neither server scans.
    let pair = Pair::start(&["--filter=scan", "--filter=nocache", "memory", "1M"]);
    let out = pair.same_py(
        "scan over nocache",
        "h.pwrite(b'z' * 4096, 8192)\nprint(sha(h.pread(1 << 20, 0)))",
    );
    assert!(!out.is_empty());
    assert_eq!(
        caps(&pair.sluice.uri(), false),
        caps(&pair.nbdkit.uri(), false)
    );
    assert!(
        pair.sluice
            .stderr()
            .contains("does not support NBD_CMD_CACHE, not scanning"),
        "{}",
        pair.sluice.stderr()
    );
}

/// How many threads named `scan` the process `pid` has.
fn scan_threads(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|c| c.trim() == "scan")
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn scan_forever_thread_ends_with_its_connection_and_at_shutdown() {
    let args = [
        "--filter=scan",
        "pattern",
        "64M",
        "scan-forever=true",
        "scan-size=64k",
    ];
    let mut s = Server::start(&args);
    let pid = s.pid();
    let wait = |want: usize| {
        let start = Instant::now();
        while scan_threads(pid) != want {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{} scan threads, not {want}",
                scan_threads(pid)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let holder = NbdHolder::connect(&s.uri(), "");
    wait(1);
    assert_eq!(holder.release(), "read ok\n");
    wait(0);
    // A client still connected while the server stops: the scan must not hold it up.
    let _holder = NbdHolder::connect(&s.uri(), "");
    wait(1);
    let status = s.stop();
    assert!(status.success(), "{status}; stderr:\n{}", s.stderr());
    s.assert_no_panic();
}

#[test]
fn scan_bad_parameters_match_nbdkit() {
    for kv in ["scan-size=1000", "scan-size=64M", "scan-size=256"] {
        let args = ["--filter=scan", "pattern", "1M", kv];
        sluice_refuses(&args, "scan: scan-size");
        nbdkit_refuses(&args);
    }
    let args = ["--filter=scan", "pattern", "1M", "scan-forever=sometimes"];
    sluice_refuses(&args, "scan: scan-forever");
    nbdkit_refuses(&args);
}
