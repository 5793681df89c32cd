//! The gzip and xz filters over the file plugin, compared with nbdkit 1.32 running the same
//! command line: the same size, bytes (whole-disk hash and reads straddling xz block and
//! stream boundaries), `nbdinfo --json` capabilities (read-only), the same refusals of
//! writes, and failures for files that are not gzip/xz or have too large a block.
//!
//! The compressed files are made at test time with the real `gzip` and `xz` tools, a few MiB
//! each. Error *messages* are our own wording (see the filters' module docs), so for bad
//! files only the failure, and the sense of the message, are compared. One deliberate
//! difference is tested against the expected bytes alone: stream padding after the last of
//! several xz streams, which nbdkit 1.32 cannot read.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::captive::{Peer, BOTH};
use crate::support::filters::{py, same_caps, Pair};
use crate::support::{output, path_str, random_bytes, run, Server};

/// Uncompressed test data: incompressible runs, zeroes and a text-like pattern, so that
/// compressed blocks differ in size.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let noise = random_bytes(len, seed);
    while v.len() < len {
        let i = v.len();
        match (i / 100_000) % 3 {
            0 => v.extend_from_slice(&noise[i..(i + 100_000).min(len)]),
            1 => v.resize((i + 70_000).min(len), 0),
            _ => {
                let line = format!("line {i} of the test data\n");
                v.extend_from_slice(&line.as_bytes()[..line.len().min(len - i)]);
            }
        }
    }
    v
}

/// Runs a compressor on `input` (keeping it), writing its stdout to `out`.
fn compress(tool: &str, args: &[&str], input: &Path, out: &Path) -> PathBuf {
    let f = std::fs::File::create(out).unwrap();
    let st = Command::new(tool)
        .args(args)
        .args(["-c", path_str(input)])
        .stdout(f)
        .status()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    assert!(st.success(), "{tool} {args:?}");
    out.to_path_buf()
}

/// `cat` of several files into one.
fn cat(parts: &[&Path], out: &Path) -> PathBuf {
    let mut all = Vec::new();
    for p in parts {
        all.extend(std::fs::read(p).unwrap());
    }
    std::fs::write(out, all).unwrap();
    out.to_path_buf()
}

/// A Python script printing the size, the whole-disk hash and the hash of each
/// `(offset, len)` read.
fn read_script(reads: &[(u64, u64)]) -> String {
    let list: Vec<String> = reads.iter().map(|(o, n)| format!("({o},{n})")).collect();
    format!(
        "size = h.get_size()\n\
         whole = bytearray()\n\
         for off in range(0, size, 1 << 20):\n\
         \x20   whole += h.pread(min(1 << 20, size - off), off)\n\
         print(size, sha(bytes(whole)))\n\
         for o, n in [{}]:\n\
         \x20   if o + n <= size:\n\
         \x20       print(o, n, sha(h.pread(n, o)))\n",
        list.join(",")
    )
}

/// Reads around each boundary, and some pseudo-random ones.
fn reads_around(boundaries: &[u64], size: u64) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = boundaries
        .iter()
        .filter(|&&b| b > 100 && b < size)
        .flat_map(|&b| [(b - 100, 200), (b - 1, 1), (b - 3000, 70_000)])
        .collect();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = 1 + x % 300_000;
        v.push((x % size.saturating_sub(len).max(1), len));
    }
    v
}

/// The sha256 prefix `sha()` in the scripts prints, of local bytes.
fn sha_of(bytes: &[u8], dir: &Path) -> String {
    let p = dir.join("sha-input");
    std::fs::write(&p, bytes).unwrap();
    run(
        crate::support::PYTHON,
        &[
            "-c",
            "import hashlib,sys;print(hashlib.sha256(open(sys.argv[1],'rb').read()).hexdigest()[:16])",
            path_str(&p),
        ],
    )
    .trim()
    .to_string()
}

/// Serves `file` through `filter` under both servers; asserts the same size, bytes and
/// capabilities, that the bytes are `expected`, and the same answers to writes.
fn same_as_nbdkit(filter: &str, file: &Path, extra: &[&str], expected: &[u8], cuts: &[u64]) {
    let f = format!("--filter={filter}");
    let mut args = vec![f.as_str(), "file", path_str(file)];
    args.extend_from_slice(extra);
    let pair = Pair::start(&args);
    let what = format!("{args:?}");
    let out = pair.same_py(
        &what,
        &read_script(&reads_around(cuts, expected.len() as u64)),
    );
    let dir = tempfile::tempdir().unwrap();
    let first = out.lines().next().unwrap();
    assert_eq!(
        first,
        format!("{} {}", expected.len(), sha_of(expected, dir.path())),
        "{what}: not the uncompressed data"
    );
    assert!(out.lines().count() > 20, "{what}: too few reads:\n{out}");

    // Writes: libnbd refuses them on a read-only export; without its strict mode they
    // reach the server, which refuses them too.
    let writes = "print([t(lambda: h.pwrite(b'x' * 512, 0)), t(lambda: h.trim(512, 0)), \
                  t(lambda: h.zero(512, 0)), t(lambda: h.cache(4096, 0)), t(lambda: h.flush())])\n\
                  h.set_strict_mode(0)\n\
                  print([t(lambda: h.pwrite(b'x' * 512, 0)), t(lambda: h.trim(512, 0)), \
                  t(lambda: h.zero(512, 0))])";
    let answers = pair.same_py(&format!("{what} writes"), writes);
    assert!(answers.starts_with("['EPERM', "), "{what}: {answers}");
    drop(pair);

    let caps = same_caps(&args, false);
    assert_eq!(caps["is_read_only"], true, "{what}");
    assert_eq!(caps["can_cache"], true, "{what}");
}

/// Starts both servers on `args`, asserts a client cannot connect to either, and returns
/// (sluice's stderr, nbdkit's stderr).
fn both_refuse(args: &[&str]) -> (String, String) {
    let pair = Pair::start(args);
    for (who, server) in [("sluice", &pair.sluice), ("nbdkit", &pair.nbdkit)] {
        let out = output("nbdinfo", &["--size", &server.uri()]);
        assert!(!out.status.success(), "{who} {args:?} served a client");
    }
    (pair.sluice.stderr(), pair.nbdkit.stderr())
}

#[test]
fn gzip_serves_the_same_bytes_and_caps_as_nbdkit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = data(3 << 20, 11);
    let b = data(1 << 20, 12);
    std::fs::write(d.join("a"), &a).unwrap();
    std::fs::write(d.join("b"), &b).unwrap();
    let a_gz = compress("gzip", &[], &d.join("a"), &d.join("a.gz"));
    let b_gz = compress("gzip", &["-9"], &d.join("b"), &d.join("b.gz"));
    same_as_nbdkit("gzip", &a_gz, &[], &a, &[1 << 20]);
    // Multi-member: as nbdkit (zlib's inflate), only the first member is served.
    let ab = cat(&[&a_gz, &b_gz], &d.join("ab.gz"));
    same_as_nbdkit("gzip", &ab, &[], &a, &[]);
}

#[test]
fn gzip_decompresses_into_an_unlinked_file_in_tmpdir_as_nbdkit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("a"), data(1 << 20, 13)).unwrap();
    let gz = compress("gzip", &[], &d.join("a"), &d.join("a.gz"));
    for peer in BOTH {
        let tmp = d.join(format!("tmp-{peer:?}"));
        std::fs::create_dir(&tmp).unwrap();
        // After a first client, the server holds its temporary file open, already unlinked.
        let out = peer
            .command(&[
                "-U",
                "-",
                "--filter=gzip",
                "file",
                path_str(&gz),
                "--run",
                // The server's pid differs with how --run forks: look at every process.
                "nbdinfo --size \"$uri\" && ls -l /proc/[0-9]*/fd/ 2>/dev/null | grep -F \"$TMPDIR/\"",
            ])
            .env("TMPDIR", &tmp)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{peer:?}: {out:?}");
        assert!(text.starts_with("1048576\n"), "{peer:?}: {text}");
        let held = format!("{}/", tmp.display());
        assert!(
            text.lines()
                .any(|l| l.contains(&held) && l.ends_with("(deleted)")),
            "{peer:?}: no unlinked file under {held}:\n{text}"
        );
        assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "{peer:?}");
    }
}

#[test]
fn gzip_bad_files_are_refused_as_by_nbdkit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("plain"), data(100_000, 14)).unwrap();
    let (s, n) = both_refuse(&["--filter=gzip", "file", path_str(&d.join("plain"))]);
    assert!(s.contains("not a gzip file"), "{s}");
    assert!(n.contains("incorrect header check"), "{n}");

    let gz = std::fs::read(compress("gzip", &[], &d.join("plain"), &d.join("p.gz"))).unwrap();
    std::fs::write(d.join("short.gz"), &gz[..gz.len() / 2]).unwrap();
    let (s, n) = both_refuse(&["--filter=gzip", "file", path_str(&d.join("short.gz"))]);
    assert!(s.contains("truncated gzip file"), "{s}");
    assert!(n.contains("gzip: inflate:"), "{n}");

    let mut bad = gz.clone();
    let len = bad.len();
    bad[len - 6] ^= 0x10; // the trailer's CRC-32
    std::fs::write(d.join("bad.gz"), &bad).unwrap();
    let (s, n) = both_refuse(&["--filter=gzip", "file", path_str(&d.join("bad.gz"))]);
    assert!(s.contains("corrupt gzip file"), "{s}");
    assert!(n.contains("incorrect data check"), "{n}");
}

#[test]
fn xz_serves_the_same_bytes_and_caps_as_nbdkit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = data(3 << 20, 21);
    let b = data(1_234_567, 22);
    std::fs::write(d.join("a"), &a).unwrap();
    std::fs::write(d.join("b"), &b).unwrap();
    const BS: u64 = 256 * 1024;
    let many = compress(
        "xz",
        &["-1", "--block-size=262144"],
        &d.join("a"),
        &d.join("many.xz"),
    );
    let listed = run("xz", &["--robot", "--list", path_str(&many)]);
    assert!(listed.contains("\t12\t"), "expected 12 blocks:\n{listed}");
    let cuts: Vec<u64> = (1..12).map(|i| i * BS).collect();
    same_as_nbdkit("xz", &many, &[], &a, &cuts);

    // One block, SHA-256 checks, a BCJ filter before LZMA2.
    let single = compress(
        "xz",
        &["--check=sha256", "--x86", "--lzma2=preset=1"],
        &d.join("b"),
        &d.join("single.xz"),
    );
    same_as_nbdkit("xz", &single, &[], &b, &[]);

    // Two streams with other checks, stream padding between them, a one-block cache.
    let second = compress(
        "xz",
        &["-0", "--block-size=100000", "--check=crc32"],
        &d.join("b"),
        &d.join("b.xz"),
    );
    let zeros = d.join("zeros");
    std::fs::write(&zeros, [0u8; 8]).unwrap();
    let multi = cat(&[&many, &zeros, &second], &d.join("multi.xz"));
    let mut ab = a.clone();
    ab.extend_from_slice(&b);
    let mut cuts = cuts;
    cuts.extend((0..13).map(|i| a.len() as u64 + i * 100_000));
    same_as_nbdkit("xz", &multi, &["xz-max-depth=1"], &ab, &cuts);

    // Deliberate difference: stream padding after the last of several streams. nbdkit 1.32
    // counts it against every stream, misplaces the later streams' blocks and aborts
    // ("invalid block header", then an assertion); sluice serves the data.
    let padded = cat(&[&many, &second, &zeros], &d.join("padded.xz"));
    let server = Server::start(&["--filter=xz", "file", path_str(&padded)]);
    let out = py(&server.uri(), &read_script(&[]));
    assert_eq!(
        out.trim(),
        format!("{} {}", ab.len(), sha_of(&ab, d)),
        "trailing stream padding"
    );
}

#[test]
fn xz_bad_files_and_limits_are_refused_as_by_nbdkit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("plain"), data(400_000, 23)).unwrap();
    let gz = compress("gzip", &[], &d.join("plain"), &d.join("plain.gz"));
    for file in [d.join("plain"), gz] {
        let (s, n) = both_refuse(&["--filter=xz", "file", path_str(&file)]);
        assert!(s.contains("xz: not an xz file"), "{s}");
        assert!(n.contains("xz: not an xz file"), "{n}");
    }

    // A single block of 400000 bytes is over a 256K limit: refused at open by both.
    let xz = compress("xz", &[], &d.join("plain"), &d.join("plain.xz"));
    let (s, n) = both_refuse(&["--filter=xz", "file", path_str(&xz), "xz-max-block=256K"]);
    assert!(s.contains("bigger than xz-max-block"), "{s}");
    assert!(s.contains("(400000 bytes)"), "{s}");
    assert!(n.contains("largest block is bigger than maxblock"), "{n}");
    // ...and served with the limit just at its size.
    let pair = Pair::start(&["--filter=xz", "file", path_str(&xz), "xz-max-block=400000"]);
    pair.same_py("limit at the block size", "print(h.get_size())");

    // A corrupt index: both refuse the file.
    let mut bytes = std::fs::read(&xz).unwrap();
    let len = bytes.len();
    bytes[len - 12 - 3] ^= 0x01; // inside the index's CRC32
    std::fs::write(d.join("badindex.xz"), &bytes).unwrap();
    let (s, _) = both_refuse(&["--filter=xz", "file", path_str(&d.join("badindex.xz"))]);
    assert!(s.contains("bad CRC32 of the index"), "{s}");

    // A bad parameter stops both servers before they serve.
    for bad in ["xz-max-depth=0", "xz-max-block=lots"] {
        for peer in BOTH {
            let out = peer.captive(&["--filter=xz", "file", path_str(&xz), bad], "true");
            assert!(!out.status.success(), "{peer:?} accepted {bad}");
        }
    }
}

#[test]
fn xz_help_lists_the_same_parameters_as_nbdkit() {
    // nbdkit's help says the depth defaults to 4; its code and man page use 8, and so
    // do we, and say so: the one deliberate difference.
    let section = |peer: Peer| {
        let out = peer
            .command(&["--filter=xz", "null", "--help"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("xz-"))
            .map(|l| l.replace("(default: 4)", "(default: 8)"))
            .collect::<Vec<_>>()
    };
    let s = section(Peer::Sluice);
    assert_eq!(s.len(), 2, "{s:?}");
    assert_eq!(s, section(Peer::Nbdkit));
}

#[test]
fn gzip_and_xz_thread_models_match_nbdkit() {
    // xz serializes requests (its per-connection block cache); gzip stays parallel.
    for (filter, model) in [("xz", "serialize_requests"), ("gzip", "parallel")] {
        for peer in BOTH {
            let f = format!("--filter={filter}");
            let out = peer
                .command(&[&f, "null", "--dump-plugin"])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.lines().any(|l| l == format!("thread_model={model}")),
                "{peer:?} {filter}:\n{text}"
            );
        }
    }
}
