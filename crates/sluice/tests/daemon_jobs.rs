//! Jobs over QMP: `block-stream` of a three-layer qcow2 chain (flattened, and down to a
//! `base-node`; checked with qemu-img check/info/compare), on a node with no backing chain (nothing to copy, so the
//! job runs through all its states before the command's reply, as in qsd), manual finalize and dismiss, the job-* and block-job-* commands' refusals, and the
//! same scenario against qemu-storage-daemon compared in shape. The verbs on long-running
//! jobs (pause, set-speed, cancel, on-error) are covered by the unit tests of
//! `sluice_daemon::jobs` with a scripted job, and on real throttled streams (plus a stream
//! under NBD client writes) in `daemon_jobs_live.rs`.

use crate::support;

use serde_json::{json, Value};
use support::image::{image_info, qemu_img, qemu_img_check, three_layers};
use support::path_str;
use support::qmp::{
    daemon_with_named_chain, file, named_node, names, run_qmp_python, run_until, short, Qmp,
    QmpDaemon, JOB_RUNS_TO_THE_END,
};

fn daemon_with_node() -> (QmpDaemon, Qmp) {
    let d = QmpDaemon::sluice(&[]);
    let mut c = d.connect_negotiated();
    let r = c.exec(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n0", "size": 4194304}),
    );
    assert_eq!(r, json!({"return": {}}));
    (d, c)
}

#[test]
fn stream_without_backing_runs_through_before_reply_like_qsd() {
    let (_d, mut c) = daemon_with_node();
    let msgs = run_until(
        &mut c,
        json!({"execute": "block-stream", "arguments": {"job-id": "s0", "device": "n0"}}),
        "return",
    );
    assert_eq!(
        names(&msgs),
        [
            "created",
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null",
            "return"
        ]
    );
    assert_eq!(
        msgs[4]["data"],
        json!({"type": "stream", "device": "s0", "len": 0, "offset": 0, "speed": 0})
    );
    assert_eq!(c.exec("query-jobs", json!({})), json!({"return": []}));
}

#[test]
fn stream_auto_finalize_false_waits_for_job_finalize_then_dismiss() {
    let (_d, mut c) = daemon_with_node();
    let msgs = run_until(
        &mut c,
        json!({"execute": "block-stream", "arguments": {"job-id": "s0", "device": "n0",
               "auto-finalize": false, "auto-dismiss": false}}),
        "return",
    );
    assert_eq!(
        names(&msgs),
        [
            "created",
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_PENDING",
            "return"
        ]
    );
    assert_eq!(msgs[4]["data"], json!({"type": "stream", "id": "s0"}));
    assert_eq!(
        c.exec("query-jobs", json!({})),
        json!({"return": [{"id": "s0", "type": "stream", "status": "pending",
                           "current-progress": 0, "total-progress": 0}]})
    );
    let r = c.exec("job-dismiss", json!({"id": "s0"}));
    assert_eq!(
        Qmp::error(&r),
        (
            "GenericError".into(),
            "Job 's0' in state 'pending' cannot accept command verb 'dismiss'".into()
        )
    );
    let msgs = run_until(
        &mut c,
        json!({"execute": "job-finalize", "arguments": {"id": "s0"}}),
        "return",
    );
    assert_eq!(names(&msgs), ["BLOCK_JOB_COMPLETED", "concluded", "return"]);
    assert_eq!(
        c.exec("query-block-jobs", json!({})),
        json!({"return": [{"type": "stream", "device": "s0", "len": 0,
                           "offset": 0, "busy": false, "paused": false, "speed": 0,
                           "io-status": "ok", "ready": false, "status": "concluded",
                           "auto-finalize": false, "auto-dismiss": false}]})
    );
    // The id stays taken until the job is dismissed.
    let r = c.exec("block-stream", json!({"job-id": "s0", "device": "n0"}));
    assert_eq!(
        Qmp::error(&r),
        ("GenericError".into(), "Job ID 's0' already in use".into())
    );
    let msgs = run_until(
        &mut c,
        json!({"execute": "block-job-dismiss", "arguments": {"id": "s0"}}),
        "return",
    );
    assert_eq!(names(&msgs), ["null", "return"]);
    let r = c.exec("job-dismiss", json!({"id": "s0"}));
    assert_eq!(
        Qmp::error(&r),
        ("GenericError".into(), "Job not found".into())
    );
}

#[test]
fn job_commands_unknown_id_refused_with_qsd_classes() {
    let (_d, mut c) = daemon_with_node();
    for cmd in [
        "job-pause",
        "job-resume",
        "job-cancel",
        "job-complete",
        "job-finalize",
        "job-dismiss",
    ] {
        let r = c.exec(cmd, json!({"id": "nope"}));
        assert_eq!(
            Qmp::error(&r),
            ("GenericError".into(), "Job not found".into()),
            "{cmd}"
        );
    }
    for (cmd, args) in [
        ("block-job-pause", json!({"device": "nope"})),
        ("block-job-resume", json!({"device": "nope"})),
        ("block-job-cancel", json!({"device": "nope"})),
        ("block-job-complete", json!({"device": "nope"})),
        ("block-job-set-speed", json!({"device": "nope", "speed": 1})),
        ("block-job-finalize", json!({"id": "nope"})),
        ("block-job-dismiss", json!({"id": "nope"})),
    ] {
        let r = c.exec(cmd, args);
        assert_eq!(
            Qmp::error(&r),
            (
                "DeviceNotActive".into(),
                "Block job 'nope' not found".into()
            ),
            "{cmd}"
        );
    }
}

#[test]
fn stream_bad_arguments_refused_with_qsd_messages() {
    let (_d, mut c) = daemon_with_node();
    let cases = [
        (
            json!({"device": "n0", "base": "x", "base-node": "n0"}),
            "'base' and 'base-node' cannot be specified at the same time",
        ),
        (
            json!({"device": "n0", "bottom": "n0", "base-node": "n0"}),
            "'bottom' and 'base-node' cannot be specified at the same time",
        ),
        (
            json!({"device": "n0", "backing-file": "foo"}),
            "backing file specified, but streaming the entire chain",
        ),
        (
            json!({"device": "nope"}),
            "Cannot find device='nope' nor node-name='nope'",
        ),
        (json!({"device": "n0"}), "Invalid job ID ''"),
        (
            json!({"job-id": "s0", "device": "n0", "speed": -1}),
            "Parameter 'speed' expects a non-negative value",
        ),
    ];
    for (args, desc) in cases {
        let r = c.exec("block-stream", args.clone());
        assert_eq!(
            Qmp::error(&r),
            ("GenericError".into(), desc.to_string()),
            "{args}"
        );
    }
    assert_eq!(c.exec("query-jobs", json!({})), json!({"return": []}));
}

#[test]
fn stream_with_python_qmp_client_sees_events_in_order() {
    let (d, _c) = daemon_with_node();
    let script = r#"
import asyncio, sys
from qemu.qmp import QMPClient

async def main():
    qmp = QMPClient('t')
    await qmp.connect(sys.argv[1])
    seen = []
    async def collect():
        async for ev in qmp.events:
            if ev['event'] == 'JOB_STATUS_CHANGE':
                seen.append(ev['data']['status'])
            else:
                seen.append(ev['event'])
            if seen[-1] == 'null':
                return
    task = asyncio.create_task(collect())
    await qmp.execute('block-stream', {'job-id': 'py0', 'device': 'n0'})
    await asyncio.wait_for(task, 20)
    print(','.join(seen))
    print(len(await qmp.execute('query-jobs')))
    await qmp.disconnect()

asyncio.run(main())
"#;
    let out = run_qmp_python(script, &[d.qmp.to_str().unwrap()]);
    assert_eq!(
        out,
        "created,running,waiting,pending,BLOCK_JOB_COMPLETED,concluded,null\n0\n"
    );
}

/// The stream scenario as (sent, received names and error classes) for comparison.
fn compare_scenario(d: &QmpDaemon) -> Vec<String> {
    let mut c = d.connect_negotiated();
    let mut out = Vec::new();
    let mut step = |c: &mut Qmp, cmd: Value, last: &str| {
        let msgs = run_until(c, cmd.clone(), last);
        let shapes: Vec<String> = msgs
            .iter()
            .map(|v| match v["error"]["class"].as_str() {
                Some(class) => format!("error:{class}"),
                None => short(v),
            })
            .collect();
        out.push(format!("{} -> {}", cmd["execute"], shapes.join(" ")));
    };
    step(
        &mut c,
        json!({"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n0", "size": 4194304}}),
        "return",
    );
    for cmd in [
        json!({"execute": "block-stream", "arguments": {"job-id": "s0", "device": "n0"}}),
        json!({"execute": "block-stream", "arguments": {"job-id": "s1", "device": "n0", "auto-finalize": false, "auto-dismiss": false}}),
        json!({"execute": "job-dismiss", "arguments": {"id": "s1"}}),
        json!({"execute": "job-pause", "arguments": {"id": "s1"}}),
        json!({"execute": "job-complete", "arguments": {"id": "s1"}}),
        json!({"execute": "job-finalize", "arguments": {"id": "s1"}}),
        json!({"execute": "job-cancel", "arguments": {"id": "s1"}}),
        json!({"execute": "job-dismiss", "arguments": {"id": "s1"}}),
        json!({"execute": "job-dismiss", "arguments": {"id": "s1"}}),
        json!({"execute": "block-job-cancel", "arguments": {"device": "s1"}}),
        json!({"execute": "block-stream", "arguments": {"device": "nope"}}),
        json!({"execute": "block-stream", "arguments": {"device": "n0"}}),
        json!({"execute": "block-stream", "arguments": {"device": "n0", "base": "x", "base-node": "n0"}}),
        json!({"execute": "query-jobs"}),
    ] {
        step(&mut c, cmd, "return");
    }
    out
}

#[test]
fn stream_scenario_matches_qemu_storage_daemon_in_shape() {
    let sluice = compare_scenario(&QmpDaemon::sluice(&[]));
    let qsd = compare_scenario(&QmpDaemon::qsd(&[]));
    assert_eq!(sluice, qsd);
}

/// Runs a `block-stream` that must succeed; returns the `BLOCK_JOB_COMPLETED` data after
/// checking qsd's event order.
fn stream_ok(c: &mut Qmp, args: Value) -> Value {
    let msgs = run_until(
        c,
        json!({"execute": "block-stream", "arguments": args}),
        "null",
    );
    assert_eq!(names(&msgs), JOB_RUNS_TO_THE_END, "{msgs:?}");
    msgs[5]["data"].clone()
}

#[test]
fn stream_three_layer_chain_without_base_drops_the_backing() {
    let imgs = three_layers();
    let flat = imgs.flattened();
    let d = QmpDaemon::sluice(&[]);
    let mut c = d.connect_negotiated();
    let r = c.exec(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top", "file": file(&imgs.top, false)}),
    );
    assert_eq!(r, json!({"return": {}}));
    let done = stream_ok(&mut c, json!({"job-id": "s0", "device": "top"}));
    assert_eq!(
        done,
        json!({"type": "stream", "device": "s0", "len": 3145728, "offset": 3145728, "speed": 0})
    );
    // The graph follows: no backing, and the streamed layers are gone.
    let nodes = c.exec("query-named-block-nodes", json!({}));
    let nodes = nodes["return"].as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    assert!(nodes[0]["backing_file"].is_null(), "{nodes:?}");
    assert_eq!(
        c.exec("blockdev-del", json!({"node-name": "top"})),
        json!({"return": {}})
    );
    assert_eq!(qemu_img_check(&imgs.top).0, 0);
    assert!(image_info(&imgs.top).get("backing-filename").is_none());
    qemu_img(&["compare", "-F", "raw", path_str(&imgs.top), path_str(&flat)]);
}

#[test]
fn stream_with_base_node_copies_the_layers_above_it_only() {
    let imgs = three_layers();
    let flat = imgs.flattened();
    let base = imgs.path("base.qcow2");
    let mid = imgs.path("mid.qcow2");
    let (_d, mut c) = daemon_with_named_chain(&base, &mid, &imgs.top);
    // base-node = mid: nothing to copy, the header names mid (its path, as qsd writes).
    stream_ok(
        &mut c,
        json!({"job-id": "s0", "device": "top", "base-node": "mid"}),
    );
    assert_eq!(
        image_info(&imgs.top)["backing-filename"],
        json!(path_str(&mid))
    );
    // base-node = base: mid's data moves into top, which then sits on base.
    let done = stream_ok(
        &mut c,
        json!({"job-id": "s1", "device": "top", "base-node": "base"}),
    );
    assert_eq!(done["offset"], json!(3145728));
    let top = named_node(&mut c, "top");
    assert_eq!(top["backing_file"], json!(path_str(&base)), "{top}");
    assert_eq!(
        c.exec("blockdev-del", json!({"node-name": "top"})),
        json!({"return": {}})
    );
    assert_eq!(qemu_img_check(&imgs.top).0, 0);
    let info = image_info(&imgs.top);
    assert_eq!(info["backing-filename"], json!(path_str(&base)));
    assert_eq!(info["backing-filename-format"], json!("qcow2"));
    // mid is no longer read: the content is still the whole chain's.
    std::fs::remove_file(&mid).unwrap();
    qemu_img(&["compare", "-F", "raw", path_str(&imgs.top), path_str(&flat)]);
}
