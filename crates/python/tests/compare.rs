//! The same scripts under sluice's host and under Debian's `nbdkit python`: reads, block
//! status and — with Debian's own unmodified `nbdkit-S3-plugin` script on a stand-in boto3 —
//! data written by one server and read by the other. Skipped if nbdkit is not installed.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Once;

use sluice_block::{Export, Flags};
use support::{export, have_nbdkit_python, kv, load, nbdkit_python, scratch_path, script};

const S3_PLUGIN: &str = "/usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-S3-plugin";

/// Puts the stand-in boto3 on the embedded interpreter's path and points it at this test
/// binary's bucket directory (`fake_s3_dir`). It must run before the first script is loaded
/// in this process (the interpreter reads the environment once, when it starts), so every
/// test here calls it first.
fn fake_s3_path() -> PathBuf {
    static SET: Once = Once::new();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake_s3");
    SET.call_once(|| {
        std::env::set_var("PYTHONPATH", &dir);
        std::env::set_var("FAKE_S3_DIR", fake_s3_dir());
        // Keep __pycache__ out of the source tree (nbdkit inherits this too).
        std::env::set_var("PYTHONDONTWRITEBYTECODE", "1");
    });
    dir
}

/// Where the stand-in boto3 keeps its buckets in this test binary.
fn fake_s3_dir() -> PathBuf {
    support::scratch_dir().join("s3")
}

fn read_all(e: &Export) -> Vec<u8> {
    let mut buf = vec![0u8; e.size() as usize];
    e.read(&mut buf, 0).unwrap();
    buf
}

#[test]
fn ram_v2_reads_match_nbdkit() {
    fake_s3_path();
    if !have_nbdkit_python() {
        return;
    }
    let out = scratch_path("ram_v2.img");
    nbdkit_python(
        &script("ram_v2.py"),
        &["size=256K", "pattern=1"],
        &format!("nbdcopy \"$uri\" {}", out.display()),
        &[],
    );
    let theirs = std::fs::read(&out).unwrap();
    let p = load("ram_v2.py", &[kv("size", "256K"), kv("pattern", "1")]);
    let ours = read_all(&export(&p));
    assert_eq!(ours.len(), 256 * 1024);
    assert!(ours == theirs, "reads differ from nbdkit's");
}

#[test]
fn extents_map_matches_nbdinfo() {
    fake_s3_path();
    if !have_nbdkit_python() {
        return;
    }
    let map = nbdkit_python(&script("extents.py"), &[], "nbdinfo --map \"$uri\"", &[]);
    let theirs: Vec<(u64, u64, u32)> = map
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    let p = load("extents.py", &[]);
    let e = export(&p);
    let got = e.extents(e.size(), 0, Flags::NONE).unwrap();
    let ours: Vec<(u64, u64, u32)> = got
        .as_slice()
        .iter()
        .map(|x| (x.offset, x.length, x.kind))
        .collect();
    assert_eq!(ours, theirs);
}

/// A 1 MiB disk of 64 KiB objects in a fresh fake bucket directory.
fn s3_args(dir: &Path) -> (Vec<sluice_block::plugins::ConfigArg>, Vec<String>) {
    std::fs::create_dir_all(dir).unwrap();
    let pairs = [
        ("bucket", "b"),
        ("key", "disk"),
        ("size", "1M"),
        ("object-size", "64K"),
    ];
    (
        pairs.iter().map(|(k, v)| kv(k, v)).collect(),
        pairs.iter().map(|(k, v)| format!("{k}={v}")).collect(),
    )
}

#[test]
fn debian_s3_plugin_data_crosses_between_sluice_and_nbdkit() {
    let pythonpath = fake_s3_path();
    if !Path::new(S3_PLUGIN).exists() {
        eprintln!("skipping: {S3_PLUGIN} is not installed");
        return;
    }
    let dir = fake_s3_dir();
    let (args, cli) = s3_args(&dir);
    let plugin = match sluice_python::load(Path::new(S3_PLUGIN), &args) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(plugin.thread_model(), sluice_block::ThreadModel::Parallel);
    let e = export(&plugin);
    assert!(e.caps().writable);
    assert_eq!(e.caps().fua, sluice_block::Support::Native);

    // Write through sluice: aligned and unaligned writes, FUA, a zero that punches objects.
    let mut model = vec![0u8; 1 << 20];
    let mut put = |e: &Export, off: usize, data: &[u8], flags| {
        e.write(data, off as u64, flags).unwrap();
        model[off..off + data.len()].copy_from_slice(data);
    };
    let block: Vec<u8> = (0..65536u32).map(|i| (i % 253) as u8).collect();
    put(&e, 0, &block, Flags::NONE);
    put(&e, 3 * 65536, &block, Flags::FUA);
    put(&e, 100_000, b"unaligned write across objects", Flags::NONE);
    put(&e, 5 * 65536, &block, Flags::NONE);
    put(&e, 6 * 65536, &block, Flags::NONE);
    e.zero(2 * 65536, 5 * 65536, Flags::MAY_TRIM).unwrap();
    model[5 * 65536..7 * 65536].fill(0);
    let ours = read_all(&e);
    assert!(ours == model, "sluice reads back what it wrote");

    if !have_nbdkit_python() {
        return;
    }
    let env = [
        ("PYTHONPATH", pythonpath.to_str().unwrap()),
        ("FAKE_S3_DIR", dir.to_str().unwrap()),
    ];
    let cli: Vec<&str> = cli.iter().map(String::as_str).collect();
    let out = scratch_path("s3-out.img");
    nbdkit_python(
        Path::new(S3_PLUGIN),
        &cli,
        &format!("nbdcopy \"$uri\" {}", out.display()),
        &env,
    );
    assert!(
        std::fs::read(&out).unwrap() == model,
        "nbdkit reads what sluice wrote"
    );

    // And the other way: nbdkit writes a new image, sluice reads it.
    let img = scratch_path("s3-in.img");
    let new: Vec<u8> = (0..(1u32 << 20)).map(|i| (i / 512 % 249) as u8).collect();
    std::fs::write(&img, &new).unwrap();
    nbdkit_python(
        Path::new(S3_PLUGIN),
        &cli,
        &format!("nbdcopy {} \"$uri\"", img.display()),
        &env,
    );
    let e = export(&plugin);
    assert!(read_all(&e) == new, "sluice reads what nbdkit wrote");
}
