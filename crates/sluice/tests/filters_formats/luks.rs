//! The luks filter over LUKSv1 images made at test time by `qemu-img create -f luks` (and
//! `cryptsetup --type luks1`), filled and checked with qemu's own luks driver (`qemu-io`,
//! `qemu-img convert`): sluice and nbdkit serve the same size, bytes and capabilities, and
//! what sluice writes, qemu and nbdkit read back.
//!
//! Where sluice deliberately differs from nbdkit 1.32.5 (see the filter's module doc) the
//! test says so: ESSIV images, which nbdkit refuses, are compared with qemu only; partial-
//! sector writes are checked with qemu only (nbdkit 1.32.5 garbles the rest of the sector);
//! after a refused connection nbdkit 1.32.5 crashes, so only its message is compared.

use std::path::{Path, PathBuf};

use crate::support::filters::{caps, Pair};
use crate::support::{output, path_str, run, serve_fails, Server, PYTHON};

const PASS: &str = "PASS";

/// `qemu-img create -f luks ... 16M` with a low iteration time, so unlocking is quick.
fn make_image(dir: &Path, name: &str, opts: &str) -> PathBuf {
    let path = dir.join(name);
    let o = format!("key-secret=sec0,iter-time=10{opts}");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "luks",
            "--object",
            &format!("secret,id=sec0,data={PASS}"),
            "-o",
            &o,
            path_str(&path),
            "16M",
        ],
    );
    path
}

/// qemu's luks driver over `path`: its `--image-opts` spelling.
fn qemu_luks(path: &Path) -> String {
    format!(
        "driver=luks,key-secret=sec0,file.filename={}",
        path_str(path)
    )
}

/// Runs qemu-io commands on the decrypted image; panics if any fails or mismatches.
fn qemu_io(path: &Path, cmds: &[&str]) -> String {
    let secret = format!("secret,id=sec0,data={PASS}");
    let image = qemu_luks(path);
    let mut args = vec!["--object", &secret, "--image-opts", &image];
    for c in cmds {
        args.extend(["-c", c]);
    }
    let out = output("qemu-io", &args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("rror"),
        "qemu-io {cmds:?} on {}:\n{text}",
        path.display()
    );
    text
}

/// The sha256 (16 hex digits) of the plaintext as qemu decrypts it.
fn qemu_plain_sha(path: &Path, dir: &Path) -> String {
    let raw = dir.join("plain.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "--object",
            &format!("secret,id=sec0,data={PASS}"),
            "--image-opts",
            &qemu_luks(path),
            "-O",
            "raw",
            path_str(&raw),
        ],
    );
    let sha = run(
        PYTHON,
        &[
            "-c",
            "import hashlib,sys;print(hashlib.sha256(open(sys.argv[1],'rb').read()).hexdigest()[:16])",
            path_str(&raw),
        ],
    );
    std::fs::remove_file(&raw).unwrap();
    sha.trim().to_string()
}

/// Known data, aligned and not, up to the last sector.
fn fill(path: &Path) {
    qemu_io(
        path,
        &[
            "write -P 0x41 0 1M",
            "write -P 0x42 1000 3000",
            "write -P 0x43 8M 64k",
            "write -P 0x44 16773120 4096",
        ],
    );
}

const READ_ALL: &str = "print(h.get_size(), sha(h.pread(h.get_size(), 0)))";

fn luks_args(path: &Path) -> Vec<&str> {
    vec!["--filter=luks", "file", path_str(path), "passphrase=PASS"]
}

#[test]
fn luks_reads_the_same_as_nbdkit_and_qemu_for_each_cipher() {
    let dir = tempfile::tempdir().unwrap();
    for (name, opts) in [
        ("xts256-sha256.img", ""),
        (
            "xts128-sha1.img",
            ",cipher-alg=aes-128,cipher-mode=xts,hash-alg=sha1",
        ),
        (
            "cbc256-plain64.img",
            ",cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=plain64,hash-alg=sha256",
        ),
        (
            "cbc128-plain.img",
            ",cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=plain,hash-alg=sha512",
        ),
    ] {
        let img = make_image(dir.path(), name, opts);
        fill(&img);
        let want = qemu_plain_sha(&img, dir.path());
        let pair = Pair::start(&luks_args(&img));
        let out = pair.same_py(name, READ_ALL);
        assert_eq!(out.trim(), format!("16777216 {want}"), "{name}");
        // Unaligned reads inside a sector and across sectors.
        pair.same_py(
            name,
            "h.set_strict_mode(0)\n\
             print(h.pread(7, 997).hex(), sha(h.pread(5000, 999)), sha(h.pread(1, 16777215)))",
        );
        assert_eq!(
            caps(&pair.sluice.uri(), true),
            caps(&pair.nbdkit.uri(), true),
            "{name}: capabilities"
        );
    }
}

#[test]
fn luks_caps_turn_off_trim_extents_and_fast_zero_like_nbdkit() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path(), "caps.img", "");
    let pair = Pair::start(&luks_args(&img));
    let c = caps(&pair.sluice.uri(), true);
    assert_eq!(c, caps(&pair.nbdkit.uri(), true));
    assert_eq!(c["can_trim"], false);
    assert_eq!(c["can_zero"], true);
    assert_eq!(c["can_fast_zero"], false);
    assert_eq!(c["block_size_minimum"], 512);
    // The file plugin has holes; through luks every extent is data.
    let (s, n) = pair.py("print(h.can_meta_context('base:allocation'))");
    assert_eq!(s, n);
    let map = crate::support::filters::map(&pair.sluice.uri());
    assert_eq!(map, crate::support::filters::map(&pair.nbdkit.uri()));
    assert_eq!(map.lines().count(), 1, "{map}");
}

#[test]
fn luks_essiv_images_read_as_qemu_reads_them_though_nbdkit_refuses_them() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(
        dir.path(),
        "essiv.img",
        ",cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha1",
    );
    fill(&img);
    let want = qemu_plain_sha(&img, dir.path());
    let sluice = Server::start(&luks_args(&img));
    let out = crate::support::filters::py(&sluice.uri(), READ_ALL);
    assert_eq!(out.trim(), format!("16777216 {want}"));

    // Deliberate difference: nbdkit 1.32.5 has no ESSIV and refuses the connection.
    let nbdkit = Server::try_start_nbdkit(&luks_args(&img)).unwrap();
    let r = output("nbdinfo", &["--size", &nbdkit.uri()]);
    assert!(!r.status.success());
    assert!(
        nbdkit
            .stderr()
            .contains("unknown IV generation algorithm: essiv"),
        "{}",
        nbdkit.stderr()
    );
}

#[test]
fn luks_cryptsetup_luks1_images_read_as_qemu_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let img = cryptsetup_format(
        dir.path(),
        "cs.img",
        16,
        &[
            "--type",
            "luks1",
            "--cipher",
            "aes-xts-plain64",
            "--key-size",
            "256",
            "--hash",
            "sha256",
        ],
    );
    fill_small(&img);
    let want = qemu_plain_sha(&img, dir.path());
    let pair = Pair::start(&luks_args(&img));
    let out = pair.same_py("cryptsetup image", READ_ALL);
    assert!(out.ends_with(&format!(" {want}\n")), "{out} vs {want}");
}

/// [`fill`] for a disk whose payload is less than 16M (cryptsetup's 2 MiB header).
fn fill_small(path: &Path) {
    qemu_io(
        path,
        &[
            "write -P 0x41 0 1M",
            "write -P 0x42 1000 3000",
            "write -P 0x43 8M 64k",
        ],
    );
}

#[test]
fn luks_writes_read_back_with_qemu_and_nbdkit() {
    let dir = tempfile::tempdir().unwrap();
    for (name, opts) in [
        ("w-xts.img", ""),
        (
            "w-cbc.img",
            ",cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=plain64,hash-alg=sha256",
        ),
    ] {
        let img = make_image(dir.path(), name, opts);
        fill(&img);
        // Known bytes around the partial writes (a fresh image decrypts to noise).
        qemu_io(&img, &["write -P 0x45 4M 4k"]);
        let mut sluice = Server::start(&luks_args(&img));
        crate::support::filters::py(
            &sluice.uri(),
            "h.set_strict_mode(0)\n\
             h.pwrite(b'\\x51' * 65536, 2 * 1048576)\n\
             h.pwrite(b'\\x52' * 10, 1005)\n\
             h.pwrite(b'\\x53' * 1500, 4 * 1048576 + 300)\n\
             h.zero(8192, 8 * 1048576)\n\
             h.flush()",
        );
        sluice.stop();
        // qemu's driver sees exactly what was written, and the neighbours of the partial
        // writes are untouched.
        qemu_io(
            &img,
            &[
                "read -P 0x41 0 1000",
                "read -P 0x52 1005 10",
                "read -P 0x42 1015 2985",
                "read -P 0x51 2M 64k",
                "read -P 0x45 4194304 300",
                "read -P 0x53 4194604 1500",
                "read -P 0x45 4196104 504",
                "read -P 0x00 8M 8k",
                "read -P 0x43 8396800 57344",
                "read -P 0x44 16773120 4096",
            ],
        );
        // Zeroes are written encrypted: the file holds no run of zeroes there.
        let raw = std::fs::read(&img).unwrap();
        let size = raw.len() - (16 << 20);
        let at = size + (8 << 20);
        assert!(raw[at..at + 8192].iter().any(|&b| b != 0), "{name}");
        // nbdkit's filter reads back the same plaintext.
        let want = qemu_plain_sha(&img, dir.path());
        let nbdkit = Server::try_start_nbdkit(&luks_args(&img)).unwrap();
        let out = crate::support::filters::py(&nbdkit.uri(), READ_ALL);
        assert_eq!(out.trim(), format!("16777216 {want}"), "{name}");
    }
}

#[test]
fn luks_aligned_writes_read_the_same_through_nbdkit_after_sluice() {
    // Whole-sector writes are where both filters must agree byte for byte: write the same
    // data through each into copies of one image and compare the files' plaintexts.
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path(), "a.img", "");
    fill(&img);
    let copy = dir.path().join("b.img");
    std::fs::copy(&img, &copy).unwrap();
    let script = "h.pwrite(bytes(range(256)) * 512, 3 * 1048576 + 512)\n\
                  h.zero(4096, 1048576)\n\
                  h.flush()";
    let mut s = Server::start(&luks_args(&img));
    crate::support::filters::py(&s.uri(), script);
    s.stop();
    let mut n = Server::try_start_nbdkit(&luks_args(&copy)).unwrap();
    crate::support::filters::py(&n.uri(), script);
    n.stop();
    assert_eq!(
        qemu_plain_sha(&img, dir.path()),
        qemu_plain_sha(&copy, dir.path())
    );
}

#[test]
fn luks_wrong_passphrase_refuses_the_client_like_nbdkit() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path(), "wrong.img", "");
    let args = ["--filter=luks", "file", path_str(&img), "passphrase=WRONG"];
    // Both servers start: the passphrase is checked when a client connects.
    let pair = Pair::start(&args);
    let msg = "LUKS passphrase is not correct, no key slot could be unlocked";
    for (who, server) in [("sluice", &pair.sluice), ("nbdkit", &pair.nbdkit)] {
        let r = output("nbdinfo", &["--size", &server.uri()]);
        assert!(!r.status.success(), "{who} served with a wrong passphrase");
        assert!(server.stderr().contains(msg), "{who}: {}", server.stderr());
    }
    assert!(pair.sluice.stderr().contains(&format!("luks: {msg}")));
    // Deliberate difference: sluice keeps serving (nbdkit 1.32.5 crashes here).
    let mut sluice = pair.sluice;
    sluice.assert_alive();
    sluice.assert_no_panic();
}

#[test]
fn luks_passphrase_from_a_file_and_missing_passphrase_like_nbdkit() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path(), "pf.img", "");
    fill(&img);
    let pw = dir.path().join("pw");
    std::fs::write(&pw, format!("{PASS}\nignored second line\n")).unwrap();
    let plus = format!("passphrase=+{}", path_str(&pw));
    let pair = Pair::start(&["--filter=luks", "file", path_str(&img), &plus]);
    let out = pair.same_py("+FILE", READ_ALL);
    assert!(out.starts_with("16777216 "), "{out}");

    // No passphrase: both refuse to start.
    let args = ["--filter=luks", "file", path_str(&img)];
    let (code, err) = serve_fails(&args);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("sluice: luks: LUKS \"passphrase\" parameter is missing"),
        "{err}"
    );
    let n = Server::try_start_nbdkit(&args)
        .err()
        .expect("nbdkit started");
    assert!(
        n.contains("LUKS \"passphrase\" parameter is missing"),
        "{n}"
    );

    // `-` with stdin not a terminal: both refuse to start.
    let args = ["--filter=luks", "file", path_str(&img), "passphrase=-"];
    let (code, err) = serve_fails(&args);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("stdin is not a tty"), "{err}");
    let n = Server::try_start_nbdkit(&args)
        .err()
        .expect("nbdkit started");
    assert!(n.contains("stdin is not a tty"), "{n}");
}

#[test]
fn luks_not_luks_and_luks2_are_refused_like_nbdkit() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.img");
    std::fs::write(&plain, vec![0u8; 1 << 20]).unwrap();
    let mut cases = vec![(plain, "this disk does not contain a LUKS header")];
    let v2 = cryptsetup_format(
        dir.path(),
        "v2.img",
        32,
        &["--type", "luks2", "--pbkdf", "pbkdf2"],
    );
    cases.push((v2, "LUKS version 2 header"));
    for (img, msg) in cases {
        let pair = Pair::start(&luks_args(&img));
        for (who, server) in [("sluice", &pair.sluice), ("nbdkit", &pair.nbdkit)] {
            let r = output("nbdinfo", &["--size", &server.uri()]);
            assert!(!r.status.success(), "{who} served {}", img.display());
            assert!(server.stderr().contains(msg), "{who}: {}", server.stderr());
        }
        if msg.contains("version 2") {
            assert!(pair.sluice.stderr().contains("LUKSv2 is not supported"));
        }
    }
}

#[test]
fn luks_passphrase_from_an_inherited_fd_like_nbdkit() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path(), "fd.img", "");
    fill(&img);
    let pw = dir.path().join("pw");
    std::fs::write(&pw, format!("{PASS}\n")).unwrap();
    // The shell opens the file on descriptor 3 and execs the server with it.
    let script = format!("exec \"$@\" 3<'{}'", path_str(&pw));
    let args = ["--filter=luks", "file", path_str(&img), "passphrase=-3"];
    let bin = crate::support::sluice_bin();
    let sluice = Server::try_start_program(
        "sh",
        &["-c", &script, "sh", bin, "serve", "-f", "-U"],
        &args,
    )
    .unwrap();
    let nbdkit =
        Server::try_start_program("sh", &["-c", &script, "sh", "nbdkit", "-f", "-U"], &args)
            .unwrap();
    let s = crate::support::filters::py(&sluice.uri(), READ_ALL);
    let n = crate::support::filters::py(&nbdkit.uri(), READ_ALL);
    assert_eq!(s, n);
    assert_eq!(
        s.trim(),
        format!("16777216 {}", qemu_plain_sha(&img, dir.path()))
    );
}

#[test]
fn luks_cryptsetup_aes192_key_material_unlocks_though_nbdkit_cannot() {
    // 24-byte keys × 4000 stripes is 187.5 sectors of key material: sluice decrypts it to
    // its end and the master key digest matches; nbdkit 1.32.5 stops at 187 sectors and
    // reports a wrong passphrase (qemu-img cannot make such images at all).
    let dir = tempfile::tempdir().unwrap();
    let img = cryptsetup_format(
        dir.path(),
        "c192.img",
        16,
        &[
            "--type",
            "luks1",
            "--cipher",
            "aes-cbc-plain64",
            "--key-size",
            "192",
        ],
    );
    let pair = Pair::start(&luks_args(&img));
    let out = crate::support::filters::py(
        &pair.sluice.uri(),
        "h.pwrite(b'\\x77' * 4096, 8192)\nprint(h.get_size(), h.pread(4096, 8192) == b'\\x77' * 4096)",
    );
    assert_eq!(out.trim(), "15728640 True");
    let r = output("nbdinfo", &["--size", &pair.nbdkit.uri()]);
    assert!(!r.status.success());
    assert!(pair
        .nbdkit
        .stderr()
        .contains("LUKS passphrase is not correct"));
}

/// A `size_mib` MiB disk `name` in `dir`, formatted by cryptsetup with `opts` and the test
/// passphrase (a key file without a newline: cryptsetup takes the file whole), at 1000
/// PBKDF2 iterations so the test stays quick.
fn cryptsetup_format(dir: &Path, name: &str, size_mib: u64, opts: &[&str]) -> PathBuf {
    let pw = dir.join("pw");
    std::fs::write(&pw, PASS).unwrap();
    let img = dir.join(name);
    std::fs::File::create(&img)
        .unwrap()
        .set_len(size_mib << 20)
        .unwrap();
    let mut args = vec![
        "luksFormat",
        "--batch-mode",
        "--pbkdf-force-iterations",
        "1000",
    ];
    args.extend_from_slice(opts);
    args.extend([path_str(&img), path_str(&pw)]);
    run("cryptsetup", &args);
    img
}
