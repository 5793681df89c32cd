//! The same block-job scenarios run against qemu-storage-daemon and `sluice daemon`, each on a
//! fresh copy of the same images, and compared in shape: per command sent, the messages that
//! came back (reply and events, in order) reduced to what does not depend on timing. Events
//! keep their name and data (JOB_STATUS_CHANGE its status); `offset` / `current-progress`
//! stays only where it is deterministic (equal to `len` / `total-progress`, shown as `=len`),
//! `busy` of a running job is dropped, errors are class + desc, paths are `<dir>`. Where qsd
//! itself answers a verb before or after the job has reacted, depending on timing (pause,
//! resume, cancel of a job in the middle of an I/O request), the step waits for the event and
//! the reply's place among the events is not compared ([`Opts::settles`]).
//!
//! Scenarios: streams of three-layer chains (whole chain, `base-node`, `bottom`) with the graph
//! after them and the image content; a throttled stream driven through pause, resume,
//! set-speed and cancel, with the verbs each state refuses; manual finalize and dismiss; an
//! intermediate commit and commit's refusals (including nodes busy with a running commit); and
//! on-error policies with an injected read error: both daemons inject it with blkdebug on the
//! base's file (as in the reference transcript, B8). A sluice-only test then fails the reads
//! by truncating the base (sluice refuses to read a data cluster past the end of the file
//! with EIO), restores the cut tail while the stopped job is paused and resumes it to
//! completion.
//!
//! Compared exactly since sluice was fixed to match: errno text ("Input/output error"),
//! on-error=ignore failing the job at the end, block-commit's messages and its root-node
//! check, job-resume's not-paused check before the verb table, the total known right
//! after the command. Left out: sluice's `error` member on JOB_STATUS_CHANGE `concluded`
//! (its own addition, see [`norm`]), and after a stream switched a node's backing, the
//! `file` / `image.filename` that qsd reports as the plain path and sluice as a `json:`
//! description ([`nodes_shape`]).
//!
//! Left out entirely (reported): `speed: -1` in block-stream / block-commit (qsd emits
//! `created` and `null` before its error, sluice only the error), block-stream with `bottom`
//! = the device itself (qsd runs an empty job, sluice refuses), and query-block (sluice does
//! not have it).

use crate::support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::image::{
    flatten, image_info, qcow2_chain, qcow2_over, qemu_img, qemu_img_check, qemu_io,
};
use support::path_str;
use support::qmp::{names, short, Qmp, QmpDaemon};

const MIB: u64 = 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Qsd,
    Sluice,
}

impl Kind {
    fn start(self) -> QmpDaemon {
        match self {
            Kind::Qsd => QmpDaemon::qsd(&[]),
            Kind::Sluice => QmpDaemon::sluice(&[]),
        }
    }
}

/// How one step is read and compared.
#[derive(Clone, Copy, Default)]
struct Opts {
    /// Also read until this event (its [`short`] name: `EVENT`, or a JOB_STATUS_CHANGE's
    /// status), before or after the reply.
    until: Option<&'static str>,
    /// The reply's place among the events is not compared (it is moved to the end).
    reply_anywhere: bool,
    /// Only the error class is compared (a desc difference that is a reported sluice bug).
    class_only: bool,
    /// Runs of equal messages count once (their number depends on how a job chunks).
    dedup: bool,
    /// Only the messages this keeps are compared.
    keep: Option<fn(&Value) -> bool>,
    /// What the transcript shows as sent (for a command whose arguments differ by daemon).
    label: Option<&'static str>,
}

impl Opts {
    fn until(e: &'static str) -> Opts {
        Opts {
            until: Some(e),
            ..Opts::default()
        }
    }

    /// For verbs whose effect qsd may show only after its reply (a job in the middle of an
    /// I/O request reaches its pause or cancel point later; sluice always waits for it):
    /// read until `e` and do not compare where the reply came.
    fn settles(e: &'static str) -> Opts {
        Opts {
            until: Some(e),
            reply_anywhere: true,
            ..Opts::default()
        }
    }
}

/// One command and the normalised messages it got.
type Step = (String, Vec<Value>);

/// A monitor connection that records a transcript.
struct Session {
    kind: Kind,
    d: QmpDaemon,
    c: Qmp,
    steps: Vec<Step>,
}

impl Session {
    fn new(kind: Kind) -> Session {
        let d = kind.start();
        let c = d.connect_negotiated();
        Session {
            kind,
            d,
            c,
            steps: Vec::new(),
        }
    }

    fn dir(&self) -> PathBuf {
        self.d.dir.path().to_path_buf()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.d.path(name)
    }

    /// The next message, waiting up to a minute.
    fn read(&mut self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(line) = self.c.try_read_line(Duration::from_millis(200)) {
                return serde_json::from_str(&line).unwrap();
            }
            self.d.assert_alive();
            assert!(
                Instant::now() < deadline,
                "{:?}: nothing for a minute after {:?}",
                self.kind,
                self.steps.last().map(|s| &s.0)
            );
        }
    }

    /// Sends a command, reads its reply (and `opts.until`), records the step; returns the
    /// messages as received.
    fn step_with(&mut self, cmd: &str, args: Value, opts: Opts) -> Vec<Value> {
        let msg = json!({"execute": cmd, "arguments": args});
        self.c.send(&msg);
        let mut got = Vec::new();
        let (mut replied, mut seen) = (false, opts.until.is_none());
        while !(replied && seen) {
            let v = self.read();
            replied |= v.get("event").is_none();
            seen |= opts.until == Some(short(&v).as_str());
            got.push(v);
        }
        let dir = self.dir();
        let dir = path_str(&dir);
        let mut shapes: Vec<Value> = got
            .iter()
            .filter(|v| opts.keep.is_none_or(|keep| keep(v)))
            .map(|v| norm(cmd, v, dir, opts.class_only))
            .collect();
        if opts.reply_anywhere {
            let i = shapes.iter().position(|v| v.get("event").is_none());
            if let Some(i) = i {
                let r = shapes.remove(i);
                shapes.push(r);
            }
        }
        if opts.dedup {
            shapes.dedup();
        }
        let sent = match opts.label {
            Some(l) => l.to_string(),
            None => serde_json::to_string(&msg).unwrap().replace(dir, "<dir>"),
        };
        self.steps.push((sent, shapes));
        got
    }

    fn step(&mut self, cmd: &str, args: Value) -> Vec<Value> {
        self.step_with(cmd, args, Opts::default())
    }

    /// The reply of a step (the last message that is not an event).
    fn step_reply(&mut self, cmd: &str, args: Value) -> Value {
        let got = self.step(cmd, args);
        got.into_iter()
            .rev()
            .find(|v| v.get("event").is_none())
            .unwrap()
    }

    /// Waits (without recording) until `query-jobs` shows the only job's total progress.
    /// sluice's job thread sets it only once it runs, so right after `block-stream` sluice
    /// may report `total-progress` / `len` 0 (and `busy` false) where qsd already gives the
    /// image size: a reported sluice bug, kept out of the comparison by this wait.
    fn wait_for_total(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.c.send(&json!({"execute": "query-jobs"}));
            let r = self.read();
            assert!(r.get("event").is_none(), "unexpected event {r}");
            if r["return"][0]["total-progress"].as_u64().unwrap_or(0) > 0 {
                return;
            }
            assert!(Instant::now() < deadline, "no total progress: {r}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Ends the transcript with whatever arrives in the next 300 ms (nothing, if every step
    /// waited for what it caused).
    fn finish(mut self) -> (Vec<Step>, QmpDaemon) {
        let dir = self.dir();
        let mut late = Vec::new();
        while let Some(line) = self.c.try_read_line(Duration::from_millis(300)) {
            let v: Value = serde_json::from_str(&line).unwrap();
            late.push(norm("", &v, path_str(&dir), false));
        }
        self.d.assert_alive();
        self.steps.push(("<late messages>".into(), late));
        (self.steps, self.d)
    }
}

/// Replaces `dir` in every string.
fn paths(v: &Value, dir: &str) -> Value {
    match v {
        Value::String(s) => Value::String(s.replace(dir, "<dir>")),
        Value::Array(a) => Value::Array(a.iter().map(|e| paths(e, dir)).collect()),
        Value::Object(m) => {
            Value::Object(m.iter().map(|(k, e)| (k.clone(), paths(e, dir))).collect())
        }
        v => v.clone(),
    }
}

/// Progress and busy-ness as far as they do not depend on timing: `offset` (with `len`) and
/// `current-progress` (with `total-progress`) become `=len` when complete, else `*`; `busy`
/// of a running job becomes `*`.
fn untimed(v: &Value) -> Value {
    match v {
        Value::Array(a) => Value::Array(a.iter().map(untimed).collect()),
        Value::Object(m) => {
            let mut out = serde_json::Map::new();
            for (k, e) in m {
                let e = match k.as_str() {
                    "offset" if m.contains_key("len") => {
                        json!(if *e == m["len"] { "=len" } else { "*" })
                    }
                    "current-progress" if m.contains_key("total-progress") => {
                        json!(if *e == m["total-progress"] {
                            "=len"
                        } else {
                            "*"
                        })
                    }
                    "busy" if m.get("status") == Some(&json!("running")) => json!("*"),
                    _ => untimed(e),
                };
                out.insert(k.clone(), e);
            }
            Value::Object(out)
        }
        v => v.clone(),
    }
}

/// `query-named-block-nodes` reduced to the named nodes (not qsd's implicit `#blockNNN` file
/// and filter nodes) and their backing: sorted by name. `file` / `image.filename` are left
/// out: after a stream switched the backing, qsd gives the plain path and sluice a `json:`
/// description (reported).
fn nodes_shape(ret: &Value) -> Value {
    let mut nodes: Vec<Value> = ret
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| !n["node-name"].as_str().unwrap_or("#").starts_with('#'))
        .map(|n| {
            let img = &n["image"];
            json!({
                "node-name": n["node-name"],
                "drv": n["drv"],
                "ro": n["ro"],
                "backing_file": n.get("backing_file"),
                "backing_file_depth": n["backing_file_depth"],
                "image.virtual-size": img["virtual-size"],
                "image.backing-filename": img.get("backing-filename"),
                "image.full-backing-filename": img.get("full-backing-filename"),
                "image.backing-filename-format": img.get("backing-filename-format"),
            })
        })
        .collect();
    nodes.sort_by_key(|n| n["node-name"].as_str().unwrap().to_string());
    Value::Array(nodes)
}

/// The comparable form of one message received after sending `cmd`.
fn norm(cmd: &str, v: &Value, dir: &str, class_only: bool) -> Value {
    let v = paths(v, dir);
    if let Some(e) = v.get("event") {
        let mut data = untimed(&v["data"]);
        if e == "JOB_STATUS_CHANGE" {
            // sluice's addition (the outcome on `concluded`, see schema/job.json), which
            // qsd does not send; the jobs unit tests and daemon_active_commit assert it.
            if let Some(m) = data.as_object_mut() {
                m.remove("error");
            }
        }
        return json!({"event": e, "data": data});
    }
    if let Some(err) = v.get("error") {
        let desc = if class_only {
            json!("<not compared>")
        } else {
            err["desc"].clone()
        };
        return json!({"error": {"class": err["class"], "desc": desc}});
    }
    if cmd == "query-named-block-nodes" {
        return json!({"return": nodes_shape(&v["return"])});
    }
    json!({"return": untimed(&v["return"])})
}

/// Runs `scenario` against qsd and then sluice and asserts the transcripts are equal,
/// printing both step by step where they differ.
fn compare(what: &str, scenario: impl Fn(&mut Session)) {
    let run = |kind| {
        let mut s = Session::new(kind);
        scenario(&mut s);
        s.finish().0
    };
    let qsd = run(Kind::Qsd);
    let sluice = run(Kind::Sluice);
    if sluice == qsd {
        return;
    }
    let lines = |msgs: Option<&Step>| match msgs {
        None => "(no such step)".to_string(),
        Some((_, m)) => m
            .iter()
            .map(|v| serde_json::to_string(v).unwrap())
            .collect::<Vec<_>>()
            .join("\n            "),
    };
    let mut report = format!("{what}: sluice differs from qemu-storage-daemon ('!' steps):\n");
    for i in 0..qsd.len().max(sluice.len()) {
        let (q, s) = (qsd.get(i), sluice.get(i));
        let sent = q.or(s).map(|x| x.0.as_str()).unwrap();
        if q == s {
            report += &format!("  = {sent}\n");
        } else {
            report += &format!(
                "  ! {sent}\n    qsd:    {}\n    sluice: {}\n",
                lines(q),
                lines(s)
            );
        }
    }
    panic!("{report}");
}

// ---- images --------------------------------------------------------------------------

/// `Pbase` (`size`, the first `base_data` bytes written) <- `Ptop` (a few unaligned bytes).
fn two_layers(dir: &Path, p: &str, size: &str, base_data: &str) {
    let base = dir.join(format!("{p}base.qcow2"));
    let top = dir.join(format!("{p}top.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&base), size]);
    let w = format!("write -P 0x5a 0 {base_data}");
    qemu_io(
        "qcow2",
        path_str(&base),
        &[&w, "write -P 0x5b 5000001 77777"],
    );
    qcow2_over(&top, &format!("{p}base.qcow2"), &[], None);
    qemu_io("qcow2", path_str(&top), &["write -P 0x31 200000 4321"]);
}

/// Copies every file of `from` into `to`.
fn copy_files(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// `qemu-img compare` of an image with a raw file: panics unless identical.
fn assert_content(top: &Path, flat: &Path) {
    qemu_img(&["compare", "-U", "-F", "raw", path_str(top), path_str(flat)]);
}

/// The runs of data of a qcow2 image as (guest offset, host offset), by host offset.
fn data_runs(img: &Path) -> Vec<(u64, u64)> {
    let map: Value =
        serde_json::from_str(&qemu_img(&["map", "--output=json", path_str(img)])).unwrap();
    let mut runs: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["offset"].as_u64().unwrap()))
        .collect();
    runs.sort_by_key(|r| r.1);
    runs
}

/// Truncates the file at `at` and returns what was cut off.
fn cut_tail(path: &Path, at: u64) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    assert!(at < bytes.len() as u64);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(at).unwrap();
    bytes[at as usize..].to_vec()
}

/// Appends `tail` back.
fn restore_tail(path: &Path, tail: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(tail).unwrap();
    f.sync_all().unwrap();
}

/// `blockdev-add` of `Pbase` (read-only), `Pmid` (read-only) and `Ptop` from the session's
/// directory, each with its backing named (steps recorded).
fn add_three(s: &mut Session, p: &str) {
    let f = |s: &Session, n: &str| json!({"driver": "file", "filename": path_str(&s.path(&format!("{p}{n}.qcow2")))});
    let (base, mid, top) = (format!("{p}base"), format!("{p}mid"), format!("{p}top"));
    let args = json!({"driver": "qcow2", "node-name": base, "read-only": true,
                      "file": f(s, "base")});
    s.step("blockdev-add", args);
    let args = json!({"driver": "qcow2", "node-name": mid, "read-only": true, "backing": base,
                      "file": f(s, "mid")});
    s.step("blockdev-add", args);
    let args = json!({"driver": "qcow2", "node-name": top, "backing": mid, "file": f(s, "top")});
    s.step("blockdev-add", args);
}

/// `blockdev-add` of `Pbase` (read-only; shown as `label` if given) and `Ptop` over it.
fn add_two(s: &mut Session, p: &str, base_file: Value, label: Option<&'static str>) {
    let (base, top) = (format!("{p}base"), format!("{p}top"));
    let args = json!({"driver": "qcow2", "node-name": base, "read-only": true, "file": base_file});
    let opts = Opts {
        label,
        ..Opts::default()
    };
    s.step_with("blockdev-add", args, opts);
    let file = json!({"driver": "file", "filename": path_str(&s.path(&format!("{p}top.qcow2")))});
    let args = json!({"driver": "qcow2", "node-name": top, "backing": base, "file": file});
    s.step("blockdev-add", args);
}

// ---- scenarios -----------------------------------------------------------------------

#[test]
fn stream_of_three_layer_chains_matches_qsd() {
    let tpl = tempfile::tempdir().unwrap();
    for p in ["a", "b", "c"] {
        qcow2_chain(tpl.path(), p);
    }
    let flat = tpl.path().join("flat.raw");
    flatten(&tpl.path().join("atop.qcow2"), &flat);
    compare("stream", |s| {
        copy_files(tpl.path(), &s.dir());
        for p in ["a", "b", "c"] {
            add_three(s, p);
        }
        s.step("query-named-block-nodes", json!({"flat": true}));
        let done = "null";
        for args in [
            json!({"job-id": "s0", "device": "atop"}),
            json!({"job-id": "s1", "device": "btop", "base-node": "bbase"}),
            json!({"job-id": "s2", "device": "ctop", "bottom": "cmid"}),
        ] {
            s.step_with("block-stream", args, Opts::until(done));
        }
        s.step("query-named-block-nodes", json!({"flat": true}));
        s.step("query-jobs", json!({}));
        // The streamed layers are no longer anyone's backing: all can go.
        for n in [
            "atop", "amid", "abase", "btop", "bmid", "bbase", "ctop", "cmid", "cbase",
        ] {
            s.step("blockdev-del", json!({"node-name": n}));
        }
        // atop has no backing; btop and ctop sit on their base. Without the layers that
        // were streamed, each reads as the whole chain did.
        let img = |n: &str| s.path(&format!("{n}.qcow2"));
        assert!(image_info(&img("atop")).get("backing-filename").is_none());
        for p in ["b", "c"] {
            let info = image_info(&img(&format!("{p}top")));
            assert_eq!(
                info["backing-filename"],
                json!(path_str(&img(&format!("{p}base")))),
                "{:?} {info}",
                s.kind
            );
        }
        for n in ["amid", "abase", "bmid", "cmid"] {
            std::fs::remove_file(img(n)).unwrap();
        }
        for p in ["a", "b", "c"] {
            let top = img(&format!("{p}top"));
            assert_eq!(qemu_img_check(&top).0, 0, "{:?} {p}top", s.kind);
            assert_content(&top, &flat);
        }
    });
}

#[test]
fn throttled_stream_verbs_match_qsd() {
    let tpl = tempfile::tempdir().unwrap();
    two_layers(tpl.path(), "", "16M", "16M");
    let flat = tpl.path().join("flat.raw");
    flatten(&tpl.path().join("top.qcow2"), &flat);
    compare("throttled stream", |s| {
        copy_files(tpl.path(), &s.dir());
        let base_file = json!({"driver": "file", "filename": path_str(&s.path("base.qcow2"))});
        add_two(s, "", base_file, None);
        // 16 MiB at 1 MiB/s: 16 s, far more than the steps below take.
        s.step(
            "block-stream",
            json!({"job-id": "j", "device": "top", "speed": MIB}),
        );
        s.wait_for_total();
        s.step("query-jobs", json!({}));
        s.step("query-block-jobs", json!({}));
        for verb in ["job-complete", "job-finalize", "job-dismiss", "job-resume"] {
            s.step(verb, json!({"id": "j"}));
        }
        s.step("block-stream", json!({"job-id": "j2", "device": "top"}));
        s.step("block-stream", json!({"job-id": "j2", "device": "base"}));
        s.step_with("job-pause", json!({"id": "j"}), Opts::settles("paused"));
        s.step("query-jobs", json!({}));
        s.step("query-block-jobs", json!({}));
        s.step("job-complete", json!({"id": "j"}));
        s.step("block-job-pause", json!({"device": "j"}));
        s.step("block-job-cancel", json!({"device": "j"}));
        s.step(
            "block-job-set-speed",
            json!({"device": "j", "speed": 2 * MIB}),
        );
        s.step_with("job-resume", json!({"id": "j"}), Opts::settles("running"));
        s.step("block-job-resume", json!({"device": "j"}));
        s.step("block-job-set-speed", json!({"device": "j", "speed": -1}));
        s.step("query-block-jobs", json!({}));
        s.step_with(
            "block-job-cancel",
            json!({"device": "j"}),
            Opts::settles("null"),
        );
        s.step("query-jobs", json!({}));
        s.step("block-job-cancel", json!({"device": "j"}));
        // Cancelled: the top keeps its backing and reads as before.
        s.step("query-named-block-nodes", json!({"flat": true}));
        s.step("blockdev-del", json!({"node-name": "top"}));
        assert_eq!(
            image_info(&s.path("top.qcow2"))["backing-filename"],
            json!("base.qcow2")
        );
        assert_content(&s.path("top.qcow2"), &flat);
    });
}

#[test]
fn manual_finalize_and_dismiss_match_qsd() {
    let tpl = tempfile::tempdir().unwrap();
    qcow2_chain(tpl.path(), "m");
    let flat = tpl.path().join("flat.raw");
    flatten(&tpl.path().join("mtop.qcow2"), &flat);
    compare("manual finalize", |s| {
        copy_files(tpl.path(), &s.dir());
        add_three(s, "m");
        s.step_with(
            "block-stream",
            json!({"job-id": "j", "device": "mtop", "base-node": "mbase",
                   "auto-finalize": false, "auto-dismiss": false}),
            Opts::until("BLOCK_JOB_PENDING"),
        );
        s.step("query-jobs", json!({}));
        s.step("query-block-jobs", json!({}));
        for verb in ["job-pause", "job-complete", "job-dismiss"] {
            s.step(verb, json!({"id": "j"}));
        }
        // qsd checks "was it paused" before the verb table: "Can't resume a job that was not
        // paused"; sluice says "Job 'j' in state 'pending' cannot accept command verb
        // 'resume'" (reported).
        s.step("job-resume", json!({"id": "j"}));
        s.step("block-job-set-speed", json!({"device": "j", "speed": 1}));
        // Nothing has changed in the graph before finalize.
        s.step("query-named-block-nodes", json!({"flat": true}));
        s.step_with(
            "job-finalize",
            json!({"id": "j"}),
            Opts::settles("concluded"),
        );
        s.step("query-jobs", json!({}));
        s.step("query-block-jobs", json!({}));
        s.step("job-finalize", json!({"id": "j"}));
        s.step("job-cancel", json!({"id": "j"}));
        // (qsd 10.0.2 crashes on query-named-block-nodes between job-finalize and
        // job-dismiss of this job; the graph is compared after the dismiss.)
        s.step_with("job-dismiss", json!({"id": "j"}), Opts::settles("null"));
        s.step("query-named-block-nodes", json!({"flat": true}));
        s.step("query-jobs", json!({}));
        s.step("job-dismiss", json!({"id": "j"}));
        for n in ["mtop", "mmid"] {
            s.step("blockdev-del", json!({"node-name": n}));
        }
        std::fs::remove_file(s.path("mmid.qcow2")).unwrap();
        assert_content(&s.path("mtop.qcow2"), &flat);
    });
}

#[test]
fn intermediate_commit_and_refusals_match_qsd() {
    let tpl = tempfile::tempdir().unwrap();
    qcow2_chain(tpl.path(), "a");
    // Chain b: a fully written 16 MiB mid, for a commit that runs long when throttled.
    let b = |n: &str| tpl.path().join(format!("b{n}.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&b("base")), "16M"]);
    qemu_io("qcow2", path_str(&b("base")), &["write -P 0x41 0 1M"]);
    for (n, backing) in [("mid", "bbase.qcow2"), ("top", "bmid.qcow2")] {
        qcow2_over(&b(n), backing, &[], None);
    }
    qemu_io("qcow2", path_str(&b("mid")), &["write -P 0x42 0 16M"]);
    let flat = tpl.path().join("flat.raw");
    flatten(&tpl.path().join("atop.qcow2"), &flat);
    compare("commit", |s| {
        copy_files(tpl.path(), &s.dir());
        add_three(s, "a");
        add_three(s, "b");
        s.step(
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "other", "size": 4 * MIB}),
        );
        let c = |extra: Value| {
            let mut a = json!({"job-id": "c9", "device": "atop"});
            a.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            a
        };
        for args in [
            json!({"device": "nope"}),
            c(json!({"top-node": "amid", "base-node": "amid"})),
            c(json!({"top-node": "abase", "base-node": "amid"})),
            c(json!({"top-node": "abase"})),
            c(json!({"top-node": "nope", "base-node": "abase"})),
            c(json!({"top-node": "amid", "base-node": "nope"})),
            c(json!({"top-node": "other", "base-node": "abase"})),
            c(json!({"top-node": "amid", "base-node": "other"})),
            c(json!({"top-node": "amid", "base-node": "bbase"})),
            c(json!({"top-node": "amid", "base": "nope"})),
            c(json!({"top": "nope", "base-node": "abase"})),
            json!({"device": "atop", "top-node": "amid", "base-node": "abase"}),
            c(json!({"job-id": "bad id", "top-node": "amid", "base-node": "abase"})),
        ] {
            s.step("block-commit", args);
        }
        // Known desc differences (reported): qsd says "'base-node' and 'base' are mutually
        // exclusive", "'top-node' and 'top' are mutually exclusive", and "Need a root block
        // node" for a device that is some node's backing.
        for args in [
            c(json!({"top-node": "amid", "base": "x", "base-node": "abase"})),
            c(json!({"top": "x", "top-node": "amid"})),
            c(json!({"device": "amid", "top-node": "atop", "base-node": "abase"})),
        ] {
            s.step("block-commit", args);
        }
        s.step("query-jobs", json!({}));
        s.step_with(
            "block-commit",
            json!({"job-id": "c0", "device": "atop", "top-node": "amid", "base-node": "abase"}),
            Opts::until("null"),
        );
        s.step("query-named-block-nodes", json!({"flat": true}));

        // A throttled commit in chain b (16 MiB at 1 MiB/s) keeps its nodes busy.
        s.step(
            "block-commit",
            json!({"job-id": "c1", "device": "btop", "top-node": "bmid", "base-node": "bbase",
                   "speed": MIB}),
        );
        s.wait_for_total();
        // "Need a root block node": the running job is a parent of btop.
        s.step(
            "block-commit",
            json!({"job-id": "c2", "device": "btop", "top-node": "bmid", "base-node": "bbase"}),
        );
        s.step("block-stream", json!({"job-id": "s0", "device": "btop"}));
        s.step(
            "block-stream",
            json!({"job-id": "s0", "device": "btop", "base-node": "bmid"}),
        );
        s.step("block-stream", json!({"job-id": "s0", "device": "bmid"}));
        s.step("query-block-jobs", json!({}));
        s.step_with(
            "block-job-cancel",
            json!({"device": "c1"}),
            Opts::settles("null"),
        );
        s.step("query-jobs", json!({}));
        for n in ["atop", "amid", "abase", "btop", "bmid", "bbase"] {
            s.step("blockdev-del", json!({"node-name": n}));
        }
        // atop now sits on abase, which holds what amid held.
        let img = |n: &str| s.path(&format!("{n}.qcow2"));
        let info = image_info(&img("atop"));
        assert_eq!(info["backing-filename"], json!(path_str(&img("abase"))));
        for n in ["atop", "abase", "bbase"] {
            assert_eq!(qemu_img_check(&img(n)).0, 0, "{:?} {n}", s.kind);
        }
        std::fs::remove_file(img("amid")).unwrap();
        assert_content(&img("atop"), &flat);
    });
}

/// What the ignore step compares: everything but the error events' count (collapsed):
/// after ignored errors both fail the job at the end (aborting, BLOCK_JOB_COMPLETED with
/// "Input/output error"), keeping the backing, since the skipped data was not copied.
fn ignore_shape(_: &Value) -> bool {
    true
}

/// One stream per policy (stop, report, ignore), each of its own chain whose base fails
/// every data read through blkdebug.
fn on_error_scenario(s: &mut Session, tpl: &Path) {
    copy_files(tpl, &s.dir());
    for p in ["stp", "rep", "ign"] {
        let base = s.path(&format!("{p}base.qcow2"));
        let file = json!({"driver": "file", "filename": path_str(&base)});
        let base_file = json!({"driver": "blkdebug",
                               "inject-error": [{"event": "read_aio", "errno": 5}],
                               "image": file});
        let label = match p {
            "stp" => "<blockdev-add stpbase, reads fail>",
            "rep" => "<blockdev-add repbase, reads fail>",
            _ => "<blockdev-add ignbase, reads fail>",
        };
        add_two(s, p, base_file, Some(label));
    }
    // stop: the job pauses itself; a resume retries (and fails again).
    let paused = "paused";
    s.step_with(
        "block-stream",
        json!({"job-id": "e0", "device": "stptop", "on-error": "stop"}),
        Opts::until(paused),
    );
    s.step("query-block-jobs", json!({}));
    s.step("query-jobs", json!({}));
    s.step("block-job-cancel", json!({"device": "e0"}));
    s.step("block-job-pause", json!({"device": "e0"}));
    // qsd's blkdebug fails at once, inside the command; sluice's retry runs after the reply.
    s.step_with("job-resume", json!({"id": "e0"}), Opts::settles(paused));
    s.step("query-block-jobs", json!({}));
    s.step_with(
        "block-job-cancel",
        json!({"device": "e0", "force": true}),
        Opts::settles("null"),
    );
    s.step("query-jobs", json!({}));

    // report (the default): the job fails.
    s.step_with(
        "block-stream",
        json!({"job-id": "e1", "device": "reptop", "auto-dismiss": false}),
        Opts::until("concluded"),
    );
    s.step("query-jobs", json!({}));
    s.step("query-block-jobs", json!({}));
    s.step_with("job-dismiss", json!({"id": "e1"}), Opts::settles("null"));

    // ignore: every failed range gives an error event; see ignore_shape.
    s.step_with(
        "block-stream",
        json!({"job-id": "e2", "device": "igntop", "on-error": "ignore", "auto-dismiss": false}),
        Opts {
            until: Some("concluded"),
            dedup: true,
            keep: Some(ignore_shape),
            ..Opts::default()
        },
    );
    s.step_with("job-dismiss", json!({"id": "e2"}), Opts::settles("null"));
    // The failed and the cancelled stream left their top on its backing.
    for n in ["stptop", "reptop"] {
        s.step("blockdev-del", json!({"node-name": n}));
    }
}

#[test]
fn on_error_with_injected_read_error_matches_qsd() {
    let tpl = tempfile::tempdir().unwrap();
    for p in ["stp", "rep", "ign"] {
        two_layers(tpl.path(), p, "16M", "4M");
    }
    compare("on-error", |s| on_error_scenario(s, tpl.path()));
}

#[test]
fn stopped_stream_resumes_after_the_error_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    two_layers(dir.path(), "", "16M", "4M");
    let flat = dir.path().join("flat.raw");
    flatten(&dir.path().join("top.qcow2"), &flat);
    let mut s = Session::new(Kind::Sluice);
    copy_files(dir.path(), &s.dir());
    let base = s.path("base.qcow2");
    let top = s.path("top.qcow2");
    // Cut base's last run of data clusters (the 77777 bytes at 5000001): the stream copies
    // what comes before, then fails there. (The cut is at the start of a run: a run that
    // starts before the end of the file and goes on past it reads zeroes past the end in
    // sluice instead of failing, and the stream would copy those zeroes - a reported bug.)
    let tail = cut_tail(&base, data_runs(&base).last().unwrap().1);
    add_two(
        &mut s,
        "",
        json!({"driver": "file", "filename": path_str(&base)}),
        None,
    );
    let got = s.step_with(
        "block-stream",
        json!({"job-id": "e0", "device": "top", "on-error": "stop"}),
        Opts::until("paused"),
    );
    assert_eq!(
        names(&got),
        ["created", "running", "return", "BLOCK_JOB_ERROR", "paused"]
    );
    assert_eq!(
        got[3]["data"],
        json!({"device": "e0", "operation": "read", "action": "stop"})
    );
    let r = s.step_reply("query-block-jobs", json!({}));
    let job = &r["return"][0];
    assert_eq!(job["io-status"], "failed", "{r}");
    assert_eq!(job["paused"], true, "{r}");
    assert_eq!(job["status"], "paused", "{r}");
    let off = job["offset"].as_u64().unwrap();
    assert!(off > 0 && off < 16 * MIB, "{r}");

    // Still broken: the retry fails again, at the same place.
    s.step_with("job-resume", json!({"id": "e0"}), Opts::until("paused"));
    let r = s.step_reply("query-block-jobs", json!({}));
    assert_eq!(r["return"][0]["offset"], off, "{r}");

    // Repaired while paused: the retry succeeds and the job completes.
    restore_tail(&base, &tail);
    let got = s.step_with("job-resume", json!({"id": "e0"}), Opts::until("null"));
    // (Where the reply comes among the events is not checked: sluice's job thread may
    // reach `waiting` / `pending` before the monitor has written the reply; qsd replies
    // first. Reported.)
    assert!(got.contains(&json!({"return": {}})), "{got:?}");
    let got: Vec<Value> = got
        .into_iter()
        .filter(|v| v.get("event").is_some())
        .collect();
    assert_eq!(
        names(&got),
        [
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ],
        "{got:?}"
    );
    assert_eq!(
        got[3]["data"],
        json!({"type": "stream", "device": "e0", "len": 16 * MIB, "offset": 16 * MIB,
               "speed": 0})
    );
    s.step("blockdev-del", json!({"node-name": "top"}));
    let (steps, _d) = s.finish();
    assert_eq!(steps.last().unwrap().1, Vec::<Value>::new(), "{steps:?}");
    assert_eq!(qemu_img_check(&top).0, 0);
    assert!(image_info(&top).get("backing-filename").is_none());
    std::fs::remove_file(&base).unwrap();
    assert_content(&top, &flat);
}
