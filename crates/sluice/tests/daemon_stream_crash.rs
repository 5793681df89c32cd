//! kill -9 of `sluice daemon` at many points of a `block-stream` of a 1 GiB three-layer qcow2
//! chain (issue #7): after every kill `qemu-img check` reports no errors (leaked clusters are
//! allowed: a crash before the next flush leaks what was allocated since, see
//! `crates/image/src/storage.rs`), the chain is either the old one or the streamed one
//! (`switch_backing` rewrites the header in one pwrite), the guest-visible content is the
//! flattened reference's; and a new daemon then streams the crashed chain to completion
//! without leaking more.
//!
//! The top comes with 64 KiB clusters (all its metadata stays in imago's caches until the
//! stream's final flush) and with 4 KiB clusters (more L2 tables and refcount blocks than
//! imago caches, so metadata is written back during the stream and a crash leaves leaks
//! and partly updated tables). Each iteration starts from a fresh copy of the pristine chain
//! (a completed restart leaves nothing to stream) and kills the daemon one to three times in
//! a row, so later kills hit a chain an earlier crash left behind. Kill points: before the
//! `block-stream` reply, right after it, after a random delay, at a random progress, as
//! `waiting` or `pending` arrive (before the backing switch), a random few ms after
//! `pending` (in the switch's flush, or after), the moment the header on disk names no
//! backing (in the switch's fdatasync), at `BLOCK_JOB_COMPLETED`, and after the job has
//! gone. The last kill of iteration `i` is of kind `i % KINDS`, so
//! every kind runs with both tops; the others and all delays come from a seeded PRNG
//! (`SLUICE_STREAM_CRASH_SEED` overrides the seed, `SLUICE_STREAM_CRASH_ITERS` the number
//! of iterations; every line printed names the seed and iteration).

use crate::support;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::crash::{check_leaks_only, env_u64, kill_9, Rng};
use support::image::{qcow2_over, qemu_img, qemu_io};
use support::qmp::{daemon_with_top, short, wait_for, Qmp};
use support::{output, path_str, random_bytes, random_file};

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;
/// The default seed of the kill points.
const SEED: u64 = 0x5105_e7c4_a5b1_0007;
/// Iterations (fresh chains) by default, each with 1-3 kills and a restart: every kind of
/// kill point ([`KINDS`]) with both tops ([`TOPS`]).
const ITERS: u64 = 20;
/// The speed limit of the killed streams, so that they last long enough (1.3 s or more for
/// the ~300 MiB to copy) for random kill points to fall all along the copy.
const SPEED: u64 = 224 * MIB;

/// Where a kill lands.
#[derive(Debug, Clone, Copy)]
enum Kill {
    /// Right after sending `block-stream`, without waiting for its reply.
    BeforeReply,
    /// Right after the reply: before (or at) the first copy.
    AfterReply,
    /// After this many milliseconds of the stream.
    Delay(u64),
    /// As soon as `query-jobs` reports this much progress (or the job is gone).
    Progress(u64),
    /// This many microseconds after this event (short name, see [`short`]) arrives.
    Event(&'static str, u64),
    /// As soon as the top's header on disk names no backing file (polled with pread: right
    /// after the backing switch's pwrite, in its fdatasync or just after).
    HeaderSwitched,
    /// This many milliseconds after the job's `null` (streamed, header switched, flushed).
    AfterDone(u64),
}

/// The number of kinds of [`Kill`] points, as [`kill_point`] numbers them.
const KINDS: u64 = 10;

/// Kill point number `kind`. An `early` one (kinds 0-3 only) always lands before the end of
/// the copy: the stream copies ~300 MiB at [`SPEED`] at most, which takes 1.3 s or more.
fn kill_point(kind: u64, early: bool, rng: &mut Rng) -> Kill {
    match kind % KINDS {
        0 => Kill::BeforeReply,
        1 => Kill::AfterReply,
        2 => Kill::Delay(rng.below(if early { 1000 } else { 1500 })),
        3 => Kill::Progress(rng.below(if early { 960 * MIB } else { GIB })),
        4 => Kill::Event("waiting", 0),
        5 => Kill::Event("pending", 0),
        // During the flush and header write of the backing switch, or just after.
        6 => Kill::Event("pending", 1 + rng.below(60_000)),
        7 => Kill::HeaderSwitched,
        8 => Kill::Event("BLOCK_JOB_COMPLETED", 0),
        _ => Kill::AfterDone(rng.below(30)),
    }
}

/// The pristine chain (`base.qcow2` <- `mid.qcow2` <- a top of [`TOPS`], relative backing names)
/// in `dir/chain`, and its guest-visible content flattened to the sparse `dir/flat.raw`.
fn build_chain(dir: &Path) -> (PathBuf, PathBuf) {
    let chain = dir.join("chain");
    let scratch = dir.join("scratch");
    std::fs::create_dir_all(&chain).unwrap();
    std::fs::create_dir_all(&scratch).unwrap();
    // base: ~257 MiB of pseudo-random data in regions at unaligned offsets all over the
    // GiB, written to a sparse raw file and converted; then a zeroed range inside the first
    // region and a compressed range.
    let raw = scratch.join("base.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(GIB).unwrap();
    let regions = [
        (1_000_001, 48 * MIB),
        (150 * MIB + 12_345, 64 * MIB),
        (300 * MIB + 777, 32 * MIB),
        (480 * MIB + 4095, 16 * MIB),
        (700 * MIB + 65_537, 40 * MIB),
        (900 * MIB + 3, 56 * MIB),
        (GIB - 777_777, 777_772),
    ];
    for (i, (off, len)) in regions.iter().enumerate() {
        f.write_all_at(&random_bytes(*len as usize, 0xba5e + i as u64), *off)
            .unwrap();
    }
    drop(f);
    let base = chain.join("base.qcow2");
    qemu_img(&["convert", "-O", "qcow2", path_str(&raw), path_str(&base)]);
    std::fs::remove_file(&raw).unwrap();
    qemu_io(
        "qcow2",
        path_str(&base),
        &["write -z 20M 1M", "write -c -P 0x33 960M 4M"],
    );

    // mid (32 KiB clusters): random regions overlapping base data and not, a constant
    // range, unaligned zeroes over base data, and a range running into the last region.
    let mid = chain.join("mid.qcow2");
    qcow2_over(&mid, "base.qcow2", &["-o", "cluster_size=32768"], None);
    let pattern = |name: &str, len: u64, seed: u64| {
        let p = scratch.join(name);
        random_file(&p, len as usize, seed);
        p
    };
    let p1 = pattern("p1", 20 * MIB, 0x1111);
    let p2 = pattern("p2", 8 * MIB, 0x2222);
    let p3 = pattern("p3", 24 * MIB, 0x3333);
    let p4 = pattern("p4", 4 * MIB, 0x4444);
    let p5 = pattern("p5", MIB, 0x5555);
    let from = |p: &Path, off: u64, len: u64| format!("write -s {} {off} {len}", path_str(p));
    let mid_cmds = [
        from(&p1, 40 * MIB + 333, 20 * MIB),
        from(&p2, 170 * MIB + 4321, 8 * MIB),
        from(&p3, 600 * MIB + 99, 24 * MIB),
        format!("write -P 0x44 {} {}", 820 * MIB + 5, 3 * MIB),
        format!("write -z {} {}", 310 * MIB + 1234, 2 * MIB + 1000),
        from(&p4, GIB - 3 * MIB - 1, 3 * MIB),
    ];
    let mid_cmds: Vec<&str> = mid_cmds.iter().map(String::as_str).collect();
    qemu_io("qcow2", path_str(&mid), &mid_cmds);

    // top (twice: 64 KiB clusters, and 4 KiB clusters, whose 1 GiB needs more L2 tables
    // and refcount blocks than imago caches, so that metadata reaches the file during the
    // stream): a few small writes, over base data, over mid data, zeroes over both, and
    // where no layer has data.
    let top_cmds = [
        format!("write -P 0x55 {} {}", 151 * MIB + 7, 100 * 1024),
        from(&p5, 605 * MIB + 12_345, MIB),
        format!("write -z {} {}", 45 * MIB, 64 * 1024),
        format!("write -P 0x66 {} {}", 1000 * MIB, 4096),
        "write -P 0x77 0 512".to_string(),
    ];
    let top_cmds: Vec<&str> = top_cmds.iter().map(String::as_str).collect();
    for (name, cluster) in TOPS {
        let top = chain.join(name);
        let cluster_size = format!("cluster_size={cluster}");
        qcow2_over(&top, "mid.qcow2", &["-o", &cluster_size], None);
        qemu_io("qcow2", path_str(&top), &top_cmds);
    }
    std::fs::remove_dir_all(&scratch).unwrap();

    let flat = dir.join("flat.raw");
    let top = chain.join(TOPS[0].0);
    qemu_img(&["convert", "-O", "raw", path_str(&top), path_str(&flat)]);
    for (name, _) in &TOPS[1..] {
        let other = chain.join(name);
        qemu_img(&["compare", "-F", "raw", path_str(&other), path_str(&flat)]);
    }
    (chain, flat)
}

/// The pristine tops (file name, cluster size): the same writes over the same mid.
const TOPS: [(&str, u32); 2] = [("top-64k.qcow2", 65536), ("top-4k.qcow2", 4096)];

/// A copy of the chain in `dir`, with `top_name` as `top.qcow2`; returns the top's path.
fn copy_chain(chain: &Path, top_name: &str, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for name in ["base.qcow2", "mid.qcow2"] {
        std::fs::copy(chain.join(name), dir.join(name)).unwrap();
    }
    let top = dir.join("top.qcow2");
    std::fs::copy(chain.join(top_name), &top).unwrap();
    top
}

/// The stream job's progress, or None once the job is gone.
fn progress(c: &mut Qmp) -> Option<u64> {
    let r = c.exec("query-jobs", json!({}));
    let jobs = r["return"].as_array().unwrap_or_else(|| panic!("{r}"));
    jobs.first()
        .map(|j| j["current-progress"].as_u64().unwrap())
}

/// Starts a throttled stream, kills the daemon with SIGKILL at `kill`, and describes where
/// the kill landed.
fn stream_and_kill(top: &Path, kill: Kill) -> String {
    let (mut d, mut c) = daemon_with_top(top);
    let args = json!({"job-id": "s", "device": "top", "speed": SPEED});
    c.send(&json!({"execute": "block-stream", "arguments": args}));
    let t0 = Instant::now();
    let at = if let Kill::BeforeReply = kill {
        "before the reply".to_string()
    } else {
        let r = c.reply();
        assert_eq!(r, json!({"return": {}}), "block-stream; {}", d.stderr());
        match kill {
            Kill::BeforeReply => unreachable!(),
            Kill::AfterReply => "right after the reply".to_string(),
            Kill::Delay(ms) => {
                std::thread::sleep(Duration::from_millis(ms).saturating_sub(t0.elapsed()));
                match progress(&mut c) {
                    Some(p) => format!("progress {} MiB", p / MIB),
                    None => "job gone".to_string(),
                }
            }
            Kill::Progress(target) => {
                let deadline = Instant::now() + Duration::from_secs(120);
                loop {
                    match progress(&mut c) {
                        Some(p) if p >= target => break format!("progress {} MiB", p / MIB),
                        Some(_) => {}
                        None => break "job gone".to_string(),
                    }
                    assert!(Instant::now() < deadline, "stream stuck");
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            Kill::Event(name, us) => {
                wait_for(&mut c, name, Duration::from_secs(120));
                std::thread::sleep(Duration::from_micros(us));
                format!("{us} us after {name}")
            }
            Kill::HeaderSwitched => {
                let f = std::fs::File::open(top).unwrap();
                let deadline = Instant::now() + Duration::from_secs(120);
                let mut polls = 0u64;
                loop {
                    // backing_file_offset: bytes 8..16, big-endian.
                    let mut field = [0u8; 8];
                    f.read_exact_at(&mut field, 8).unwrap();
                    if field == [0; 8] {
                        break format!("header switched (poll {polls})");
                    }
                    polls += 1;
                    assert!(Instant::now() < deadline, "no backing switch");
                    if polls.is_multiple_of(1024) {
                        std::thread::sleep(Duration::from_micros(100));
                    }
                }
            }
            Kill::AfterDone(ms) => {
                let done = wait_for(&mut c, "BLOCK_JOB_COMPLETED", Duration::from_secs(120));
                assert!(done["data"].get("error").is_none(), "{done}");
                wait_for(&mut c, "null", Duration::from_secs(10));
                std::thread::sleep(Duration::from_millis(ms));
                "after null".to_string()
            }
        }
    };
    let elapsed = t0.elapsed();
    // Whatever was already sent (e.g. a failure) is read into the events.
    kill_9(&mut d, &mut c);
    for e in &c.events {
        assert!(
            e.get("error").is_none() && e["data"].get("error").is_none(),
            "the stream reported {e}"
        );
    }
    let last = c.events.last().map(short).unwrap_or_default();
    format!("{at}, {} ms in (last event {last:?})", elapsed.as_millis())
}

/// A new daemon streams `top` to the end at full speed and quits.
fn restart_and_complete(top: &Path) -> Value {
    let (mut d, mut c) = daemon_with_top(top);
    let r = c.exec("block-stream", json!({"job-id": "s", "device": "top"}));
    assert_eq!(r, json!({"return": {}}), "block-stream; {}", d.stderr());
    let done = wait_for(&mut c, "BLOCK_JOB_COMPLETED", Duration::from_secs(120));
    assert!(
        done["data"].get("error").is_none(),
        "restart failed: {done}"
    );
    assert_eq!(done["data"]["offset"], done["data"]["len"], "{done}");
    wait_for(&mut c, "null", Duration::from_secs(10));
    assert_eq!(c.exec("query-jobs", json!({})), json!({"return": []}));
    assert_eq!(
        c.exec("blockdev-del", json!({"node-name": "top"})),
        json!({"return": {}})
    );
    assert_eq!(c.exec("quit", json!({})), json!({"return": {}}));
    let st = d.wait();
    assert_eq!(st.code(), Some(0), "daemon exit; stderr:\n{}", d.stderr());
    done["data"].clone()
}

/// The state of the chain after a kill.
struct Verdict {
    /// Leaked clusters in the top.
    leaks: u64,
    /// The top's header names no backing any more.
    streamed: bool,
}

/// Judges the chain in `dir` (top.qcow2 over mid.qcow2 over base.qcow2, or top alone once
/// streamed): check without errors, a valid chain, and the reference's content.
fn verify(dir: &Path, flat: &Path, ctx: &str) -> Verdict {
    let top = dir.join("top.qcow2");
    let leaks = check_leaks_only(&top, ctx);
    for lower in ["mid.qcow2", "base.qcow2"] {
        let l = check_leaks_only(&dir.join(lower), ctx);
        assert_eq!(l, 0, "{ctx}: {lower} (never written) has leaks");
    }
    let info: Value = serde_json::from_str(&qemu_img(&[
        "info",
        "--backing-chain",
        "--output=json",
        path_str(&top),
    ]))
    .unwrap();
    let chain = info.as_array().unwrap();
    for img in chain {
        assert_eq!(img["format"], "qcow2", "{ctx}: {img}");
        assert_eq!(img["virtual-size"], GIB, "{ctx}: {img}");
        assert_eq!(img["dirty-flag"], false, "{ctx}: {img}");
        assert_eq!(
            img["format-specific"]["data"]["corrupt"], false,
            "{ctx}: {img}"
        );
    }
    let backing: Vec<Option<&str>> = chain
        .iter()
        .map(|i| i["backing-filename"].as_str())
        .collect();
    let streamed = match backing[..] {
        [None] => true,
        [Some("mid.qcow2"), Some("base.qcow2"), None] => {
            assert_eq!(chain[1]["backing-filename-format"], "qcow2", "{ctx}");
            assert_eq!(chain[0]["backing-filename-format"], "qcow2", "{ctx}");
            false
        }
        _ => panic!("{ctx}: not the old chain nor the streamed image: {info}"),
    };
    let cmp = output(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            path_str(&top),
            path_str(flat),
        ],
    );
    assert!(
        cmp.status.success(),
        "{ctx}: guest-visible content changed (exit {}):\n{}{}",
        cmp.status,
        String::from_utf8_lossy(&cmp.stdout),
        String::from_utf8_lossy(&cmp.stderr)
    );
    Verdict { leaks, streamed }
}

#[test]
fn kill_9_during_stream_of_1g_chain_keeps_images_and_restart_completes() {
    let seed = env_u64("SLUICE_STREAM_CRASH_SEED").unwrap_or(SEED);
    let iters = env_u64("SLUICE_STREAM_CRASH_ITERS").unwrap_or(ITERS);
    let t_all = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let (pristine, flat) = build_chain(dir.path());
    eprintln!(
        "seed {seed:#x}: chain built in {} ms; {iters} iterations",
        t_all.elapsed().as_millis()
    );
    let mut rng = Rng(seed | 1);
    let mut kills = 0;
    let mut total_leaks = 0;
    for iter in 0..iters {
        let t_iter = Instant::now();
        let work = dir.path().join(format!("it{iter}"));
        // Every kind of kill point with both tops.
        let (top_name, cluster) = TOPS[((iter + iter / KINDS) % 2) as usize];
        let top = copy_chain(&pristine, top_name, &work);
        let extra = rng.below(3);
        let mut leaks = 0;
        for k in 0..=extra {
            // Early kills first, so that the iteration's own kind always runs, last.
            let last = k == extra;
            let kind = if last { iter } else { rng.below(4) };
            let kill = kill_point(kind, !last, &mut rng);
            let ctx = format!(
                "seed {seed:#x} iteration {iter} ({cluster} B clusters) kill {k} ({kill:?})"
            );
            let at = stream_and_kill(&top, kill);
            kills += 1;
            let v = verify(&work, &flat, &ctx);
            eprintln!(
                "{ctx}: killed {at}; check ok, {} leaked clusters, {}",
                v.leaks,
                if v.streamed {
                    "streamed (no backing)"
                } else {
                    "old chain"
                }
            );
            leaks = v.leaks;
            if !last && v.streamed {
                // The stream flushes as it goes, so what an earlier round copied stays
                // copied and a later round can finish before its early kill: the rest of
                // the iteration (its own kind last) starts over on a fresh chain.
                eprintln!("{ctx}: the stream finished first; a fresh chain for the rest");
                copy_chain(&pristine, top_name, &work);
            }
        }
        total_leaks += leaks;
        let ctx = format!("seed {seed:#x} iteration {iter} ({cluster} B clusters) restart");
        let done = restart_and_complete(&top);
        let v = verify(&work, &flat, &ctx);
        assert!(v.streamed, "{ctx}: the top still has a backing file");
        assert!(
            v.leaks <= leaks,
            "{ctx}: a clean stream leaked clusters ({leaks} -> {})",
            v.leaks
        );
        eprintln!(
            "{ctx}: completed (len {}, offset {}); check ok, {} leaked clusters, no backing; \
             iteration took {} ms",
            done["len"],
            done["offset"],
            v.leaks,
            t_iter.elapsed().as_millis()
        );
        std::fs::remove_dir_all(&work).unwrap();
    }
    eprintln!(
        "seed {seed:#x}: {kills} kills in {iters} iterations, {total_leaks} leaked clusters \
         in all, {} s",
        t_all.elapsed().as_secs()
    );
}
