//! `sluice qmp`, the QMP command line, against the real `sluice daemon` and the real
//! qemu-storage-daemon: query output equal to what a raw QMP client reads, key=value and JSON
//! arguments, `--json`, `--events`, a TCP monitor, `block-stream --wait` of a qcow2 chain
//! made with qemu-img and qemu-io (in a pseudo-terminal made by `script`, showing the bar,
//! and through a pipe, showing plain lines), an active commit completed with `--complete`,
//! streams that fail with a real EIO (sluice: a base truncated before its data; qsd:
//! blkdebug), and bad input: unknown command, bad JSON, missing or dead socket.
//!
//! Streams are throttled with `speed=` so that they last about two seconds: long enough for
//! several redraws, short enough for the file to run in well under a minute.

use crate::support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::image::{qemu_img, qemu_io};
use support::qmp::{Qmp, QmpDaemon};
use support::{path_str, sluice_bin};

const MIB: u64 = 1024 * 1024;
/// The chains' size: every byte of it is data in the base.
const CHAIN: u64 = 64 * MIB;
/// The throttle for streams that should last a while (two seconds for [`CHAIN`]).
const SPEED: u64 = 32 * MIB;

/// `sluice qmp ARGS...`, captured.
fn sluice_qmp(args: &[&str]) -> Output {
    Command::new(sluice_bin())
        .arg("qmp")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `sluice qmp SOCKET ARGS...`, which must succeed; returns stdout.
fn ok(d: &QmpDaemon, args: &[&str]) -> String {
    let mut all = vec![path_str(&d.qmp)];
    all.extend_from_slice(args);
    let o = sluice_qmp(&all);
    assert!(
        o.status.success(),
        "sluice qmp {args:?}: {}\nstdout: {}\nstderr: {}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Asserts a failure: `code`, nothing on stdout, and exactly the one line `line` on stderr.
#[track_caller]
fn assert_one_line(o: &Output, code: i32, line: &str) {
    assert_eq!(o.status.code(), Some(code), "stderr: {}", stderr(o));
    assert_eq!(stdout(o), "");
    assert_eq!(stderr(o), format!("{line}\n"));
}

/// `top.qcow2` over `base.qcow2` in `dir`, [`CHAIN`] bytes, the base fully written.
fn chain(dir: &Path) {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    let size = CHAIN.to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&base), &size]);
    qemu_io(
        "qcow2",
        path_str(&base),
        &[&format!("write -P 0x5a 0 {size}")],
    );
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        path_str(&top),
    ]);
    qemu_io("qcow2", path_str(&top), &["write -P 0x31 1M 64k"]);
}

/// `blockdev-add` of the chain in the daemon's directory as nodes `base` (read-only, its
/// file given as `base_file` if not the plain file) and `top`, through `sluice qmp` itself.
fn add_chain(d: &QmpDaemon, base_file: Option<Value>) {
    let base = d.path("base.qcow2");
    let file = base_file.unwrap_or(json!({"driver": "file", "filename": path_str(&base)}));
    let args = json!({"driver": "qcow2", "node-name": "base", "read-only": true, "file": file});
    assert_eq!(ok(d, &["blockdev-add", &args.to_string()]), "{}\n");
    let top = format!("file.filename={}", path_str(&d.path("top.qcow2")));
    assert_eq!(
        ok(
            d,
            &[
                "blockdev-add",
                "driver=qcow2",
                "node-name=top",
                "backing=base",
                "file.driver=file",
                &top
            ]
        ),
        "{}\n"
    );
}

/// `quit` through `sluice qmp`, then waits for the daemon to exit (so that its images are
/// closed and unlocked).
fn quit(d: &mut QmpDaemon) {
    assert_eq!(ok(d, &["quit"]), "{}\n");
    assert!(d.wait().success());
}

/// The image no longer has a backing file and reads as the chain did (byte 0 from the old
/// base, 1M from the top).
fn assert_streamed(top: &Path) {
    let info: Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", path_str(top)])).unwrap();
    assert!(info.get("backing-filename").is_none(), "{info}");
    qemu_io(
        "qcow2",
        path_str(top),
        &[
            "read -P 0x5a 0 1M",
            "read -P 0x31 1M 64k",
            "read -P 0x5a 63M 1M",
        ],
    );
}

/// `script -qec 'COMMAND' /dev/null`: COMMAND with its stdout on a pseudo-terminal; returns
/// what the terminal showed and the command's exit status.
fn in_terminal(words: &[&str]) -> (String, Option<i32>) {
    let cmd: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let o = Command::new("script")
        .args(["-qec", &cmd.join(" "), "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("run script (util-linux)");
    (stdout(&o), o.status.code())
}

/// The whole-number percentages shown in `text`.
fn percentages(text: &str) -> Vec<u64> {
    text.match_indices('%')
        .filter_map(|(i, _)| {
            let digits: String = text[..i]
                .chars()
                .rev()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.chars().rev().collect::<String>().parse().ok()
        })
        .collect()
}

#[test]
fn query_output_equals_raw_qmp_on_sluice_and_qsd() {
    let args = [
        "--blockdev",
        "driver=null-co,node-name=n0,size=1048576",
        "--nbd-server",
        "addr.type=unix,addr.path={dir}/nbd.sock",
        "--export",
        "type=nbd,id=e0,node-name=n0,name=disk",
    ];
    for d in [QmpDaemon::sluice(&args), QmpDaemon::qsd(&args)] {
        for cmd in ["query-version", "query-block-exports"] {
            let printed = ok(&d, &[cmd]);
            let raw = d.connect_negotiated().exec(cmd, json!({}))["return"].clone();
            // Pretty: several indented lines, and the same value a raw client reads.
            assert!(printed.lines().count() > 3, "{printed}");
            assert!(printed.contains("\n  "), "{printed}");
            let parsed: Value = serde_json::from_str(&printed).unwrap();
            assert_eq!(parsed, raw, "{cmd}");
        }
        let exports: Value = serde_json::from_str(&ok(&d, &["query-block-exports"])).unwrap();
        assert_eq!(exports[0]["id"], "e0");
        assert_eq!(exports[0]["node-name"], "n0");
    }
}

#[test]
fn key_value_and_json_arguments_make_the_same_nodes() {
    let d = QmpDaemon::sluice(&[]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        path_str(&d.path("a.qcow2")),
        "1M",
    ]);
    let filename = format!("file.filename={}", path_str(&d.path("a.qcow2")));
    // Typed values (a number, a boolean) and dotted keys.
    ok(
        &d,
        &[
            "blockdev-add",
            "driver=qcow2",
            "node-name=kv",
            "read-only=true",
            "file.driver=file",
            &filename,
        ],
    );
    ok(
        &d,
        &[
            "blockdev-add",
            "driver=null-co",
            "node-name=nkv",
            "size=4096",
        ],
    );
    let same = json!({"driver": "qcow2", "node-name": "js", "read-only": true,
                      "file": {"driver": "file", "filename": path_str(&d.path("a.qcow2"))}});
    ok(&d, &["blockdev-add", &same.to_string()]);
    ok(
        &d,
        &[
            "blockdev-add",
            r#"{"driver": "null-co", "node-name": "njs", "size": 4096}"#,
        ],
    );
    let nodes: Value =
        serde_json::from_str(&ok(&d, &["query-named-block-nodes", "flat=true"])).unwrap();
    let node = |name: &str| {
        nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == name)
            .unwrap_or_else(|| panic!("no node {name}: {nodes}"))
            .clone()
    };
    for (a, b) in [("kv", "js"), ("nkv", "njs")] {
        let (a, b) = (node(a), node(b));
        for key in ["drv", "ro", "file", "image"] {
            assert_eq!(a[key], b[key], "{key}");
        }
    }
    assert_eq!(node("kv")["ro"], true);
    assert_eq!(node("nkv")["image"]["virtual-size"], 4096);
    // A string where a number belongs is refused by the server: size=4096 was a number.
    let o = sluice_qmp(&[
        path_str(&d.qmp),
        "blockdev-add",
        "driver=null-co",
        "node-name=bad",
        "size=\"4096\"",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).starts_with("sluice: GenericError: "),
        "{}",
        stderr(&o)
    );
}

#[test]
fn json_flag_prints_the_raw_reply_line() {
    for d in [QmpDaemon::sluice(&[]), QmpDaemon::qsd(&[])] {
        let mut c = d.connect_negotiated();
        c.send(&json!({"execute": "query-version"}));
        let raw = c.read_line().unwrap();
        drop(c);
        assert_eq!(ok(&d, &["--json", "query-version"]), format!("{raw}\n"));
        assert_eq!(
            ok(&d, &["query-block-exports", "--json"]),
            "{\"return\": []}\n"
        );
        // An error reply: the raw line on stdout, the one-line message on stderr, status 1.
        let o = sluice_qmp(&[path_str(&d.qmp), "--json", "nope"]);
        assert_eq!(o.status.code(), Some(1));
        let line: Value = serde_json::from_str(stdout(&o).trim_end()).unwrap();
        assert_eq!(line["error"]["class"], "CommandNotFound");
        assert_eq!(
            stderr(&o),
            "sluice: CommandNotFound: The command nope has not been found\n"
        );
    }
}

#[test]
fn events_after_the_command_until_the_socket_closes() {
    let d = QmpDaemon::sluice(&["--blockdev", "driver=null-co,node-name=n0,size=4194304"]);
    let mut child = Command::new(sluice_bin())
        .args(["qmp", path_str(&d.qmp), "--events", "block-stream"])
        .args(["job-id=j0", "device=n0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    // A stream of a node without backing runs through all its states inside the command.
    while !seen
        .iter()
        .any(|l: &String| l.contains("\"status\": \"null\""))
    {
        seen.push(lines.next().expect("events until null").unwrap());
    }
    // Now (the command done, the client still following) make the server go away.
    let mut c = d.connect_negotiated();
    assert_eq!(c.exec("quit", json!({})), json!({"return": {}}));
    seen.extend(lines.map(Result::unwrap));
    let status = support::wait_timeout(&mut child, Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{status}: {seen:?}");
    // The events (in order, each: date, time, name, data), then the reply, then SHUTDOWN.
    let names: Vec<&str> = seen
        .iter()
        .map(|l| l.split(' ').nth(2).unwrap_or(l))
        .collect();
    assert_eq!(
        names[..9],
        [
            "JOB_STATUS_CHANGE",
            "JOB_STATUS_CHANGE",
            "JOB_STATUS_CHANGE",
            "JOB_STATUS_CHANGE",
            "BLOCK_JOB_COMPLETED",
            "JOB_STATUS_CHANGE",
            "JOB_STATUS_CHANGE",
            "{}",
            "SHUTDOWN"
        ],
        "{seen:#?}"
    );
    let first = &seen[0];
    let data: Value = serde_json::from_str(first.split_once(" JOB_STATUS_CHANGE ").unwrap().1)
        .unwrap_or_else(|e| panic!("{e}: {first}"));
    assert_eq!(data, json!({"id": "j0", "status": "created"}));
    // 2026-12-04 16:37:16.347293
    let b = first.as_bytes();
    assert!(
        b[4] == b'-' && b[10] == b' ' && b[13] == b':' && b[19] == b'.' && b[26] == b' ',
        "{first}"
    );
}

#[test]
fn tcp_monitor_by_host_and_port() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let chardev = format!("socket,id=t,host=127.0.0.1,port={port},server=on,wait=off");
    let d = QmpDaemon::sluice(&["--chardev", &chardev, "--monitor", "chardev=t"]);
    let o = sluice_qmp(&[&format!("127.0.0.1:{port}"), "query-version"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(
        v,
        d.connect_negotiated().exec("query-version", json!({}))["return"]
    );
}

#[test]
fn stream_wait_in_a_terminal_draws_a_bar_and_exits_0() {
    let mut d = QmpDaemon::sluice(&[]);
    chain(d.dir.path());
    add_chain(&d, None);
    let speed = format!("speed={SPEED}");
    let (shown, code) = in_terminal(&[
        sluice_bin(),
        "qmp",
        path_str(&d.qmp),
        "block-stream",
        "job-id=s0",
        "device=top",
        &speed,
        "--wait",
    ]);
    assert_eq!(code, Some(0), "{shown:?}");
    // Redrawn in place: many `\r` + bar, with percentages on the way and 100% at the end.
    let draws = shown.matches("\rs0 [").count();
    assert!(draws >= 3, "{draws} draws: {shown:?}");
    let pct = percentages(&shown);
    assert!(pct.iter().any(|p| (1..100).contains(p)), "{shown:?}");
    assert_eq!(pct.last(), Some(&100), "{shown:?}");
    assert!(shown.contains("MiB/s  ETA "), "{shown:?}");
    assert!(
        shown.contains("64.0 MiB / 64.0 MiB  completed"),
        "{shown:?}"
    );
    assert!(
        shown.contains("job 's0' (stream) completed: 64.0 MiB in "),
        "{shown:?}"
    );
    assert_eq!(
        d.connect_negotiated().exec("query-jobs", json!({})),
        json!({"return": []})
    );
    quit(&mut d);
    assert_streamed(&d.path("top.qcow2"));
}

#[test]
fn stream_wait_through_a_pipe_prints_plain_lines_and_exits_0() {
    let mut d = QmpDaemon::sluice(&[]);
    chain(d.dir.path());
    add_chain(&d, None);
    let speed = format!("speed={SPEED}");
    let t = Instant::now();
    let out = ok(
        &d,
        &["block-stream", "job-id=s0", "device=top", &speed, "--wait"],
    );
    let secs = t.elapsed().as_secs_f64();
    assert!(!out.contains('\r'), "{out:?}");
    let lines: Vec<&str> = out.lines().collect();
    let (last, progress) = lines.split_last().unwrap();
    assert!(
        last.starts_with("job 's0' (stream) completed: 64.0 MiB in "),
        "{out}"
    );
    // Plain progress lines, at most about one a second.
    assert!(!progress.is_empty(), "{out}");
    assert!(progress.len() as f64 <= secs + 1.5, "{secs} s: {out}");
    for l in progress {
        assert!(l.starts_with("job 's0': ") && l.contains("% ("), "{l}");
        assert!(l.contains(" of 64.0 MiB"), "{l}");
    }
    assert!(progress.iter().any(|l| l.contains("MiB/s, ETA ")), "{out}");
    quit(&mut d);
    assert_streamed(&d.path("top.qcow2"));
}

#[test]
fn active_commit_wait_complete_pivots_and_exits_0() {
    let mut d = QmpDaemon::sluice(&[]);
    chain(d.dir.path());
    add_chain(&d, None);
    // The base is opened read-write by the commit.
    let out = ok(
        &d,
        &[
            "block-commit",
            "job-id=c0",
            "device=top",
            "--wait",
            "--complete",
        ],
    );
    assert!(
        out.contains("job 'c0' is ready: sending job-complete\n"),
        "{out}"
    );
    assert!(
        out.lines()
            .last()
            .unwrap()
            .starts_with("job 'c0' (commit) completed: "),
        "{out}"
    );
    quit(&mut d);
    // The top's data is in the base now.
    qemu_io(
        "qcow2",
        path_str(&d.path("base.qcow2")),
        &["read -P 0x5a 0 1M", "read -P 0x31 1M 64k"],
    );
}

/// Truncates `path` at its first data cluster: every data read of the image then fails
/// with EIO in sluice (as `daemon_jobs_compare.rs` does for on-error).
fn cut_before_data(path: &Path) {
    let map: Value =
        serde_json::from_str(&qemu_img(&["map", "--output=json", path_str(path)])).unwrap();
    let first = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["offset"].as_u64().unwrap())
        .min()
        .unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(first)
        .unwrap();
}

#[test]
fn failing_stream_exits_1_with_the_job_error() {
    let d = QmpDaemon::sluice(&[]);
    chain(d.dir.path());
    cut_before_data(&d.path("base.qcow2"));
    add_chain(&d, None);
    // Dismissed by the server (the error from BLOCK_JOB_COMPLETED)...
    let o = sluice_qmp(&[
        path_str(&d.qmp),
        "block-stream",
        "job-id=e0",
        "device=top",
        "--wait",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("job 'e0': read error (on-error action: report)"),
        "{}",
        stdout(&o)
    );
    assert_eq!(stderr(&o), "sluice: job 'e0' failed: Input/output error\n");
    // ...and left concluded (the error from query-jobs), then dismissed by the client.
    let o = sluice_qmp(&[
        path_str(&d.qmp),
        "block-stream",
        r#"{"job-id": "e1", "device": "top", "auto-dismiss": false}"#,
        "--wait",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert_eq!(stderr(&o), "sluice: job 'e1' failed: Input/output error\n");
    assert_eq!(
        d.connect_negotiated().exec("query-jobs", json!({})),
        json!({"return": []})
    );
}

#[test]
fn qsd_stream_wait_exits_0_and_failing_stream_exits_1() {
    let mut d = QmpDaemon::qsd(&[]);
    chain(d.dir.path());
    add_chain(&d, None);
    let out = ok(&d, &["block-stream", "job-id=q0", "device=top", "--wait"]);
    assert!(
        out.lines()
            .last()
            .unwrap()
            .starts_with("job 'q0' (stream) completed: 64.0 MiB in "),
        "{out}"
    );
    quit(&mut d);
    assert_streamed(&d.path("top.qcow2"));

    // A second chain whose base fails every read (blkdebug), the job left concluded.
    let e = QmpDaemon::qsd(&[]);
    chain(e.dir.path());
    let file = json!({"driver": "blkdebug",
                      "inject-error": [{"event": "read_aio", "errno": 5}],
                      "image": {"driver": "file", "filename": path_str(&e.path("base.qcow2"))}});
    add_chain(&e, Some(file));
    let o = sluice_qmp(&[
        path_str(&e.qmp),
        "block-stream",
        "job-id=e0",
        "device=top",
        "auto-dismiss=false",
        "--wait",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert_eq!(stderr(&o), "sluice: job 'e0' failed: Input/output error\n");
    assert_eq!(ok(&e, &["query-jobs"]), "[]\n");
}

#[test]
fn bad_input_gives_one_clear_line() {
    let s = QmpDaemon::sluice(&[]);
    let q = QmpDaemon::qsd(&[]);
    for d in [&s, &q] {
        let o = sluice_qmp(&[path_str(&d.qmp), "no-such-command"]);
        assert_one_line(
            &o,
            1,
            "sluice: CommandNotFound: The command no-such-command has not been found",
        );
    }
    let sock = path_str(&s.qmp);
    // Bad arguments are found before connecting (the socket here is fine).
    let o = sluice_qmp(&[sock, "blockdev-add", r#"{"driver": "null-co",}"#]);
    assert_one_line(
        &o,
        2,
        "sluice: bad JSON arguments: trailing comma at line 1 column 22",
    );
    let o = sluice_qmp(&[sock, "blockdev-add", "file={driver: file}"]);
    assert_one_line(
        &o,
        2,
        "sluice: bad JSON in the value of 'file': key must be a string at line 1 column 2",
    );
    let o = sluice_qmp(&[sock, "blockdev-add", "driver"]);
    assert_one_line(&o, 2, "sluice: argument 'driver' is not KEY=VALUE");
    let o = sluice_qmp(&[sock, "query-jobs", "--wait"]);
    assert_one_line(
        &o,
        2,
        "sluice: --wait: cannot tell which job query-jobs starts (give it a job-id argument)",
    );
    // Nothing there, and a socket file nobody listens on.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.sock");
    let o = sluice_qmp(&[path_str(&missing), "query-version"]);
    assert_one_line(
        &o,
        2,
        &format!(
            "sluice: cannot connect to QMP monitor {}: No such file or directory",
            missing.display()
        ),
    );
    let dead = dir.path().join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
    let o = sluice_qmp(&[path_str(&dead), "query-version"]);
    assert_one_line(
        &o,
        2,
        &format!(
            "sluice: cannot connect to QMP monitor {}: Connection refused",
            dead.display()
        ),
    );
    // A socket that speaks something else: an NBD server.
    let nbd = support::Server::start(&["memory", "1M"]);
    let o = sluice_qmp(&[path_str(&nbd.socket), "query-version"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).starts_with(&format!(
            "sluice: {} is not a QMP monitor: its first line is not JSON: \"NBDMAGIC",
            nbd.socket.display()
        )),
        "{}",
        stderr(&o)
    );
    assert_eq!(stderr(&o).lines().count(), 1);
    // The daemons are fine after all that.
    let mut c: Qmp = s.connect_negotiated();
    assert!(c.exec("query-version", json!({})).get("return").is_some());
}
