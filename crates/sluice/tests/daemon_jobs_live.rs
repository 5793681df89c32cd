//! Long-running `block-stream` jobs over QMP: a throttled stream of a 32 MiB qcow2 chain
//! (the backing fully allocated by qemu-io, so the stream copies for seconds at a few
//! MiB/s) paused and resumed, re-throttled with `block-job-set-speed`, cancelled, finalized
//! by hand, and streamed while an NBD client writes to the top. Event sequences are
//! qemu-storage-daemon's (see the reference transcript); images are judged with qemu-img
//! check/info/compare. Timing bounds are generous: the machine may be slow and busy.

use crate::support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::image::{image_info, qcow2_over, qemu_img, qemu_img_check, qemu_io, Images};
use support::path_str;
use support::qmp::{daemon_with_top, named_node, ok, seen, start_nbd, wait_for, Qmp};

const MIB: u64 = 1024 * 1024;
/// The chain's virtual size.
const SIZE: u64 = 32 * MIB;
/// The stream job's step (`sluice_daemon::jobs::stream::CHUNK`).
const CHUNK: u64 = 512 * 1024;

/// A chain `top.qcow2` (a few ranges of its own) over `base.qcow2` (every MiB written with
/// its own pattern), both [`SIZE`] bytes.
fn big_chain() -> Images {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&base), "32M"]);
    let cmds: Vec<String> = (0..SIZE / MIB)
        .map(|i| format!("write -P {} {}M 1M", i + 1, i))
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io("qcow2", path_str(&base), &cmds);
    qcow2_over(&top, "base.qcow2", &[], None);
    qemu_io(
        "qcow2",
        path_str(&top),
        &["write -P 0xee 3M 512k", "write -P 0xdd 20M 64k"],
    );
    Images { dir, top }
}

/// How long a job may take to reach an event.
const MINUTE: Duration = Duration::from_secs(60);

/// Lets job `j` run to its end at full speed; returns the names of the events seen.
fn run_to_end(c: &mut Qmp) -> Vec<String> {
    ok(c, "block-job-set-speed", json!({"device": "j", "speed": 0}));
    wait_for(c, "null", MINUTE);
    seen(c)
}

/// The job's only `query-jobs` entry.
fn query_job(c: &mut Qmp) -> Value {
    let r = c.exec("query-jobs", json!({}));
    let jobs = r["return"].as_array().unwrap_or_else(|| panic!("{r}"));
    assert_eq!(jobs.len(), 1, "{r}");
    jobs[0].clone()
}

fn progress(c: &mut Qmp) -> u64 {
    query_job(c)["current-progress"].as_u64().unwrap()
}

/// Closes the node, then checks the image: qemu-img check clean, no backing left, and the
/// same guest-visible content as `expected` (raw).
fn assert_streamed(c: &mut Qmp, top: &Path, expected: &Path) {
    ok(c, "blockdev-del", json!({"node-name": "top"}));
    let (rc, out) = qemu_img_check(top);
    assert_eq!(rc, 0, "{out}");
    let info = image_info(top);
    assert!(info.get("backing-filename").is_none(), "{info}");
    qemu_img(&["compare", "-F", "raw", path_str(top), path_str(expected)]);
}

fn start_stream(c: &mut Qmp, args: Value) {
    let r = c.exec("block-stream", args.clone());
    assert_eq!(r, json!({"return": {}}), "{args}");
    assert_eq!(seen(c), ["created", "running"]);
}

#[test]
fn stream_pause_freezes_progress_and_resume_continues() {
    let imgs = big_chain();
    let flat = imgs.flattened();
    let (_d, mut c) = daemon_with_top(&imgs.top);
    start_stream(
        &mut c,
        json!({"job-id": "j", "device": "top", "speed": 8 * MIB}),
    );
    std::thread::sleep(Duration::from_millis(300));
    ok(&mut c, "job-pause", json!({"id": "j"}));
    // As in qsd, `paused` comes before the reply.
    assert_eq!(seen(&c), ["created", "running", "paused"]);
    let at_pause = query_job(&mut c);
    assert_eq!(at_pause["status"], "paused", "{at_pause}");
    assert_eq!(at_pause["total-progress"], SIZE, "{at_pause}");
    let paused_at = at_pause["current-progress"].as_u64().unwrap();
    assert!(paused_at < SIZE, "{at_pause}");
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(progress(&mut c), paused_at, "progress moved while paused");
    let bj = c.exec("query-block-jobs", json!({}));
    let bj = &bj["return"][0];
    assert_eq!(bj["paused"], true, "{bj}");
    assert_eq!(bj["busy"], false, "{bj}");
    assert_eq!(bj["status"], "paused", "{bj}");
    assert_eq!(bj["offset"], paused_at, "{bj}");
    let r = c.exec("block-job-pause", json!({"device": "j"}));
    assert_eq!(
        Qmp::error(&r),
        ("GenericError".into(), "Job is already paused".into())
    );

    ok(&mut c, "job-resume", json!({"id": "j"}));
    assert_eq!(seen(&c), ["created", "running", "paused", "running"]);
    let r = c.exec("block-job-resume", json!({"device": "j"}));
    assert_eq!(
        Qmp::error(&r),
        (
            "GenericError".into(),
            "Can't resume a job that was not paused".into()
        )
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while progress(&mut c) == paused_at {
        assert!(Instant::now() < deadline, "no progress after resume");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Let the rest go at full speed.
    assert_eq!(
        run_to_end(&mut c),
        [
            "created",
            "running",
            "paused",
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
    let completed = &c.events[6]["data"];
    assert_eq!(
        *completed,
        json!({"type": "stream", "device": "j", "len": SIZE, "offset": SIZE, "speed": 0})
    );
    assert_eq!(c.exec("query-jobs", json!({})), json!({"return": []}));
    assert_streamed(&mut c, &imgs.top, &flat);
}

#[test]
fn stream_speed_limits_progress_and_set_speed_raises_it() {
    let imgs = big_chain();
    let flat = imgs.flattened();
    let (_d, mut c) = daemon_with_top(&imgs.top);
    let speed = 8 * MIB;
    let t0 = Instant::now();
    start_stream(
        &mut c,
        json!({"job-id": "j", "device": "top", "speed": speed}),
    );
    std::thread::sleep(Duration::from_secs(1));
    let off = progress(&mut c);
    let elapsed = t0.elapsed().as_secs_f64();
    let bound = 2.0 * speed as f64 * elapsed + CHUNK as f64;
    assert!(
        (off as f64) <= bound,
        "offset {off} after {elapsed:.2} s at {speed} B/s (bound {bound})"
    );
    assert!(off > 0, "no progress in {elapsed:.2} s");
    assert!(
        off < SIZE,
        "finished in {elapsed:.2} s despite the speed limit"
    );
    let bj = c.exec("query-block-jobs", json!({}));
    assert_eq!(bj["return"][0]["speed"], speed, "{bj}");

    let r = c.exec("block-job-set-speed", json!({"device": "j", "speed": -1}));
    assert_eq!(
        Qmp::error(&r),
        (
            "GenericError".into(),
            "Parameter 'speed' expects a non-negative value".into()
        )
    );
    let fast = 1024 * MIB;
    ok(
        &mut c,
        "block-job-set-speed",
        json!({"device": "j", "speed": fast}),
    );
    let bj = c.exec("query-block-jobs", json!({}));
    if let Some(j) = bj["return"].as_array().unwrap().first() {
        assert_eq!(j["speed"], fast, "{bj}");
    }
    let t1 = Instant::now();
    let done = wait_for(&mut c, "BLOCK_JOB_COMPLETED", MINUTE);
    // The rest (at most 32 MiB) at 1 GiB/s: well under the 3 s it would take at 8 MiB/s.
    assert!(
        t1.elapsed() < Duration::from_millis(2500),
        "took {:?} after raising the speed",
        t1.elapsed()
    );
    assert_eq!(
        done["data"],
        json!({"type": "stream", "device": "j", "len": SIZE, "offset": SIZE, "speed": fast})
    );
    wait_for(&mut c, "null", MINUTE);
    assert_eq!(
        seen(&c),
        [
            "created",
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
    assert_streamed(&mut c, &imgs.top, &flat);
}

#[test]
fn stream_cancel_keeps_backing_and_content() {
    let imgs = big_chain();
    let flat = imgs.flattened();
    let base = imgs.path("base.qcow2");
    let (_d, mut c) = daemon_with_top(&imgs.top);
    let speed = 4 * MIB;
    start_stream(
        &mut c,
        json!({"job-id": "j", "device": "top", "speed": speed}),
    );
    std::thread::sleep(Duration::from_millis(700));
    let r = c.exec("block-job-cancel", json!({"device": "j"}));
    assert_eq!(r, json!({"return": {}}));
    // As in qsd with auto-dismiss: all of it before the reply.
    assert_eq!(
        seen(&c),
        [
            "created",
            "running",
            "aborting",
            "BLOCK_JOB_CANCELLED",
            "concluded",
            "null"
        ]
    );
    let cancelled = &c.events[3]["data"];
    let mut keys: Vec<&String> = cancelled.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        ["device", "len", "offset", "speed", "type"],
        "{cancelled}"
    );
    assert_eq!(cancelled["device"], "j");
    assert_eq!(cancelled["type"], "stream");
    assert_eq!(cancelled["len"], SIZE);
    assert_eq!(cancelled["speed"], speed);
    let off = cancelled["offset"].as_u64().unwrap();
    assert!(off > 0 && off < SIZE, "{cancelled}");
    assert_eq!(c.exec("query-jobs", json!({})), json!({"return": []}));
    // The node still reads through its backing, and a new job may start on it.
    let top = named_node(&mut c, "top");
    // The full path, as qsd reports a backing opened from the header's relative name.
    assert_eq!(top["backing_file"], json!(path_str(&base)), "{top}");

    ok(&mut c, "blockdev-del", json!({"node-name": "top"}));
    let (rc, out) = qemu_img_check(&imgs.top);
    assert_eq!(rc, 0, "{out}");
    let info = image_info(&imgs.top);
    assert_eq!(info["backing-filename"], json!("base.qcow2"), "{info}");
    assert_eq!(
        info["full-backing-filename"],
        json!(path_str(&base)),
        "{info}"
    );
    qemu_img(&["compare", "-F", "raw", path_str(&imgs.top), path_str(&flat)]);
}

#[test]
fn stream_auto_finalize_false_stops_at_pending_and_auto_dismiss_false_at_concluded() {
    let imgs = big_chain();
    let flat = imgs.flattened();
    let (_d, mut c) = daemon_with_top(&imgs.top);
    start_stream(
        &mut c,
        json!({"job-id": "j", "device": "top", "speed": 16 * MIB,
               "auto-finalize": false, "auto-dismiss": false}),
    );
    let r = c.exec("job-finalize", json!({"id": "j"}));
    assert_eq!(
        Qmp::error(&r),
        (
            "GenericError".into(),
            "Job 'j' in state 'running' cannot accept command verb 'finalize'".into()
        )
    );
    let pending = wait_for(&mut c, "BLOCK_JOB_PENDING", MINUTE);
    assert_eq!(pending["data"], json!({"type": "stream", "id": "j"}));
    assert_eq!(
        seen(&c),
        [
            "created",
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_PENDING"
        ]
    );
    // Nothing more comes by itself; the graph has not changed yet.
    std::thread::sleep(Duration::from_millis(300));
    assert!(c.try_read_line(Duration::from_millis(200)).is_none());
    assert_eq!(
        query_job(&mut c),
        json!({"id": "j", "type": "stream", "status": "pending",
               "current-progress": SIZE, "total-progress": SIZE})
    );
    let info = image_info(&imgs.top);
    assert_eq!(info["backing-filename"], json!("base.qcow2"), "{info}");

    ok(&mut c, "job-finalize", json!({"id": "j"}));
    assert_eq!(
        seen(&c)[5..],
        ["BLOCK_JOB_COMPLETED", "concluded"],
        "{:?}",
        seen(&c)
    );
    assert_eq!(
        c.events[5]["data"],
        json!({"type": "stream", "device": "j", "len": SIZE, "offset": SIZE, "speed": 16 * MIB})
    );
    // Finalized: the header no longer names a backing, even before dismiss.
    assert!(image_info(&imgs.top).get("backing-filename").is_none());
    std::thread::sleep(Duration::from_millis(300));
    assert!(c.try_read_line(Duration::from_millis(200)).is_none());
    assert_eq!(query_job(&mut c)["status"], "concluded");
    ok(&mut c, "job-dismiss", json!({"id": "j"}));
    assert_eq!(seen(&c)[7..], ["null"]);
    assert_eq!(c.exec("query-jobs", json!({})), json!({"return": []}));
    assert_streamed(&mut c, &imgs.top, &flat);
}

#[test]
fn stream_while_nbd_client_writes_keeps_the_client_writes() {
    let imgs = big_chain();
    let expected = imgs.path("expected.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        path_str(&imgs.top),
        path_str(&expected),
    ]);
    let (d, mut c) = daemon_with_top(&imgs.top);
    start_nbd(&mut c, &d);
    ok(
        &mut c,
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "top", "name": "top", "writable": true}),
    );
    let uri = d.nbd_uri("top");
    start_stream(
        &mut c,
        json!({"job-id": "j", "device": "top", "speed": 8 * MIB}),
    );
    // Writes in ranges held by the backing (ahead of and behind the stream), straddling
    // MiB and chunk boundaries, over the top's own data, and unaligned.
    let batches: [&[&str]; 3] = [
        &["write -P 0xa1 30M 1M", "write -P 0xa2 1536k 1M"],
        &[
            "write -P 0xa3 3M 4k",
            "write -P 0xa4 12345 777",
            "write -P 0xa5 25M 3M",
        ],
        &["write -P 0xa6 511k 2k", "write -P 0xa7 31M 1M"],
    ];
    for cmds in batches {
        support::qemu_io(&uri, cmds);
        qemu_io("raw", path_str(&expected), cmds);
        std::thread::sleep(Duration::from_millis(300));
    }
    let before_end = progress(&mut c);
    assert!(
        before_end < SIZE,
        "the stream ended before the writes were done"
    );
    assert_eq!(
        run_to_end(&mut c),
        [
            "created",
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
    // The export serves the streamed image, and it reads as expected.
    support::qemu_io(&uri, &["read -P 0xa1 30M 1M", "read -P 0xa4 12345 777"]);
    ok(&mut c, "block-export-del", json!({"id": "e0"}));
    wait_for(&mut c, "BLOCK_EXPORT_DELETED", MINUTE);
    assert_streamed(&mut c, &imgs.top, &expected);
}
