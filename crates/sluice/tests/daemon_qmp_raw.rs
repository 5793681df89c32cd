//! `sluice daemon`'s QMP monitor driven with raw bytes: negotiation, `id` echo, framing,
//! QEMU's error messages, malformed and hostile input, several monitors, events.
//!
//! Every hostile-input test ends by checking that the same monitor (when it is still open)
//! and another monitor still work and that the daemon did not panic.

use crate::support;

use std::io::Write;
use std::time::Duration;

use serde_json::{json, Value};
use support::qmp::{Qmp, QmpDaemon};
use support::NbdHolder;

fn err(reply: &Value) -> (String, String) {
    Qmp::error(reply)
}

fn generic(desc: &str) -> (String, String) {
    ("GenericError".to_string(), desc.to_string())
}

/// The daemon and a second, fresh monitor still answer.
fn assert_healthy(d: &mut QmpDaemon) {
    d.assert_alive();
    let mut other = d.connect_negotiated();
    let v = other.cmd(json!({"execute": "query-version", "id": "health"}));
    assert_eq!(v["id"], "health");
    assert!(v["return"]["package"]
        .as_str()
        .unwrap()
        .starts_with("sluice "));
}

#[test]
fn greeting_on_connect_has_version_and_oob_capability() {
    let d = QmpDaemon::sluice(&[]);
    let c = d.connect();
    let v = &c.greeting["QMP"];
    assert_eq!(v["capabilities"], json!(["oob"]));
    assert_eq!(
        v["version"]["qemu"],
        json!({"major": 0, "minor": 1, "micro": 0})
    );
    assert_eq!(v["version"]["package"], json!("sluice 0.1.0"));
}

#[test]
fn command_before_negotiation_is_command_not_found() {
    let d = QmpDaemon::sluice(&[]);
    let mut c = d.connect();
    let r = c.cmd(json!({"execute": "query-version", "id": "early-1"}));
    assert_eq!(r["id"], "early-1");
    assert_eq!(
        err(&r),
        (
            "CommandNotFound".into(),
            "Expecting capabilities negotiation with 'qmp_capabilities'".into()
        )
    );
    // Unknown commands get the same answer in this mode.
    let r = c.cmd(json!({"execute": "frobnicate"}));
    assert_eq!(err(&r).0, "CommandNotFound");
}

#[test]
fn qmp_capabilities_twice_is_command_not_found() {
    let d = QmpDaemon::sluice(&[]);
    let mut c = d.connect();
    let r = c.cmd(
        json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": "cap-1"}),
    );
    assert_eq!(r, json!({"return": {}, "id": "cap-1"}));
    let r = c.cmd(json!({"execute": "qmp_capabilities", "id": "cap-2"}));
    assert_eq!(
        err(&r),
        (
            "CommandNotFound".into(),
            "Capabilities negotiation is already complete, command ignored".into()
        )
    );
}

#[test]
fn qmp_capabilities_bad_capability_is_a_validation_error() {
    let d = QmpDaemon::sluice(&[]);
    let mut c = d.connect();
    let r = c.exec("qmp_capabilities", json!({"enable": ["bogus"]}));
    assert_eq!(
        err(&r),
        generic("Parameter 'null' does not accept value 'bogus'")
    );
    let r = c.exec("qmp_capabilities", json!({"enable": [5]}));
    assert_eq!(
        err(&r),
        generic("Invalid parameter type for 'enable[0]', expected: string")
    );
    // Still in negotiation mode.
    let r = c.cmd(json!({"execute": "query-version"}));
    assert_eq!(err(&r).0, "CommandNotFound");
}

#[test]
fn id_of_any_json_type_is_echoed_verbatim() {
    let d = QmpDaemon::sluice(&[]);
    let mut c = d.connect_negotiated();
    for id in [
        json!("v-1"),
        json!(42),
        json!({"any": ["json", 1, null]}),
        json!(null),
        json!([true, -1.5]),
    ] {
        let r = c.cmd(json!({"execute": "query-version", "id": id}));
        assert_eq!(r["id"], id);
        assert!(r.get("return").is_some());
    }
    let r = c.cmd(json!({"execute": "query-version"}));
    assert!(r.get("id").is_none());
}

#[test]
fn input_is_a_json_stream_not_lines() {
    let d = QmpDaemon::sluice(&[]);
    let mut c = d.connect_negotiated();
    // Two objects on one line, single quotes, CRLF, whitespace-only lines.
    c.send_raw(b"{\"execute\": \"query-block-exports\", \"id\": \"one\"}{'execute': 'query-version', 'id': 'two'}\r\n   \n");
    assert_eq!(c.reply()["id"], "one");
    assert_eq!(c.reply()["id"], "two");
    // An object split across writes is answered once complete.
    c.send_raw(b"{\"execute\": \"query-block-");
    assert!(c.try_read_line(Duration::from_millis(300)).is_none());
    c.send_raw(b"exports\", \"id\": \"split\"\n");
    assert!(c.try_read_line(Duration::from_millis(300)).is_none());
    c.send_raw(b"}");
    assert_eq!(c.reply(), json!({"return": [], "id": "split"}));
}

#[test]
fn pipelined_commands_are_answered_in_order() {
    let d = QmpDaemon::sluice(&[]);
    let mut c = d.connect_negotiated();
    let mut batch = Vec::new();
    for i in 0..50 {
        batch.extend_from_slice(
            format!("{{\"execute\": \"query-version\", \"id\": {i}}}\n").as_bytes(),
        );
    }
    c.send_raw(&batch);
    for i in 0..50 {
        assert_eq!(c.reply()["id"], json!(i));
    }
}

#[test]
fn top_level_errors_match_qemu() {
    let d = QmpDaemon::sluice(&[]);
    let mut c = d.connect_negotiated();
    let cases = [
        (json!([1, 2, 3]), "QMP input must be a JSON object", None),
        (
            json!({"id": "noexec"}),
            "QMP input lacks member 'execute'",
            Some(json!("noexec")),
        ),
        (
            json!({"execute": 1, "id": "n"}),
            "QMP input member 'execute' must be a string",
            Some(json!("n")),
        ),
        (
            json!({"execute": "query-version", "arguments": [], "id": "a"}),
            "QMP input member 'arguments' must be an object",
            Some(json!("a")),
        ),
        (
            json!({"execute": "query-version", "foo": 1, "id": "e"}),
            "QMP input member 'foo' is unexpected",
            Some(json!("e")),
        ),
        (
            json!({"exec-oob": "query-version"}),
            "QMP input member 'exec-oob' is unexpected",
            None,
        ),
    ];
    for (input, desc, id) in cases {
        let r = c.cmd(input.clone());
        assert_eq!(err(&r), generic(desc), "{input}");
        assert_eq!(r.get("id").cloned(), id, "{input}");
    }
}

#[test]
fn exec_oob_after_enabling_oob_is_refused_for_every_command() {
    let d = QmpDaemon::sluice(&[]);
    let mut c = d.connect();
    c.exec("qmp_capabilities", json!({"enable": ["oob"]}));
    let r = c.cmd(json!({"exec-oob": "query-version", "id": "oob-1"}));
    assert_eq!(r["id"], "oob-1");
    assert_eq!(
        err(&r),
        generic("The command query-version does not support OOB")
    );
    let r = c.cmd(json!({"execute": "query-version", "exec-oob": "query-version"}));
    assert_eq!(
        err(&r),
        generic("QMP input member 'execute' clashes with 'exec-oob'")
    );
}

#[test]
fn argument_errors_match_qemu_before_any_side_effect() {
    let d = QmpDaemon::sluice(&[]);
    let mut c = d.connect_negotiated();
    let cases = [
        (
            "frobnicate",
            json!({}),
            (
                "CommandNotFound",
                "The command frobnicate has not been found",
            ),
        ),
        (
            "query-version",
            json!({"bogus": 1}),
            ("GenericError", "Parameter 'bogus' is unexpected"),
        ),
        (
            "blockdev-del",
            json!({}),
            ("GenericError", "Parameter 'node-name' is missing"),
        ),
        (
            "blockdev-del",
            json!({"node-name": 5}),
            (
                "GenericError",
                "Invalid parameter type for 'node-name', expected: string",
            ),
        ),
        (
            "blockdev-add",
            json!({"node-name": "n"}),
            ("GenericError", "Parameter 'driver' is missing"),
        ),
        (
            "blockdev-add",
            json!({"driver": "bogus"}),
            (
                "GenericError",
                "Parameter 'driver' does not accept value 'bogus'",
            ),
        ),
        (
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "n0", "size": 1.5}),
            (
                "GenericError",
                "Invalid parameter type for 'size', expected: integer",
            ),
        ),
        (
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "n0", "cache": {"bogus": 1}}),
            ("GenericError", "Parameter 'cache.bogus' is unexpected"),
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "file": 5}),
            (
                "GenericError",
                "Invalid parameter type for 'file', expected: BlockdevRef",
            ),
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "file": {"driver": "file"}}),
            ("GenericError", "Parameter 'file.filename' is missing"),
        ),
        (
            "block-export-add",
            json!({"type": "bogus", "id": "x", "node-name": "n0"}),
            (
                "GenericError",
                "Parameter 'type' does not accept value 'bogus'",
            ),
        ),
        (
            "nbd-server-start",
            json!({}),
            ("GenericError", "Parameter 'addr' is missing"),
        ),
        (
            "nbd-server-start",
            json!({"addr": {"type": "unix"}}),
            ("GenericError", "Parameter 'addr.data' is missing"),
        ),
        (
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": 1}}}),
            (
                "GenericError",
                "Invalid parameter type for 'addr.data.path', expected: string",
            ),
        ),
        (
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": "x"}}, "max-connections": -1}),
            (
                "GenericError",
                "Parameter 'max-connections' expects uint32_t",
            ),
        ),
    ];
    for (cmd, args, (class, desc)) in cases {
        let r = c.exec(cmd, args.clone());
        assert_eq!(
            err(&r),
            (class.to_string(), desc.to_string()),
            "{cmd} {args}"
        );
    }
    // None of the refused commands changed anything.
    assert_eq!(
        c.exec("query-named-block-nodes", json!({})),
        json!({"return": []})
    );
    assert_eq!(
        c.exec("query-block-exports", json!({})),
        json!({"return": []})
    );
}

#[test]
fn non_ascii_text_comes_back_escaped() {
    let d = QmpDaemon::sluice(&[]);
    let mut c = d.connect_negotiated();
    c.send_raw("{\"execute\": \"blockdev-del\", \"arguments\": {\"node-name\": \"é☃\"}, \"id\": \"utf8\"}\n".as_bytes());
    let line = c.read_line().unwrap();
    assert_eq!(
        line,
        r#"{"error": {"class": "GenericError", "desc": "Failed to find node with node-name='\u00E9\u2603'"}, "id": "utf8"}"#
    );
}

#[test]
fn garbage_gets_parse_errors_without_id_and_the_monitor_recovers() {
    let mut d = QmpDaemon::sluice(&[]);
    let mut c = d.connect_negotiated();
    c.send_raw(b"this is not json\n");
    for word in ["this", "is", "not", "json"] {
        assert_eq!(
            c.reply(),
            json!({"error": {"class": "GenericError", "desc": format!("JSON parse error, invalid keyword '{word}'")}})
        );
    }
    c.send_raw(b"{\"execute\": \"query-version\",, \"id\": \"bad-2\"}\n{\"execute\": \"query-block-exports\", \"id\": \"after\"}\n");
    assert_eq!(
        err(&c.reply()),
        generic("JSON parse error, expecting value")
    );
    assert_eq!(c.reply(), json!({"return": [], "id": "after"}));
    c.send_raw(b"}\n");
    assert_eq!(
        err(&c.reply()),
        generic("JSON parse error, expecting value")
    );
    // An unterminated string swallows input until a control character resets the parser.
    c.send_raw(b"{\"execute\": \"query-block-exports\", \"id\": \"unterminated\n");
    assert_eq!(
        err(&c.reply()),
        generic("JSON parse error, stray '\"unterminated\n'")
    );
    c.send_raw(b"\x01{\"execute\": \"query-block-exports\", \"id\": \"after-reset\"}\n");
    assert_eq!(err(&c.reply()), generic("JSON parse error, stray '\u{1}'"));
    assert_eq!(c.reply(), json!({"return": [], "id": "after-reset"}));
    // Invalid UTF-8 inside a string.
    c.send_raw(b"[\"\xc3\"]\n");
    assert_eq!(
        err(&c.reply()),
        generic("JSON parse error, invalid UTF-8 sequence in string")
    );
    assert_healthy(&mut d);
}

#[test]
fn nesting_2000_deep_gets_one_error_and_the_monitor_recovers() {
    let mut d = QmpDaemon::sluice(&[]);
    let mut c = d.connect_negotiated();
    let mut input = b"{\"execute\": \"query-version\", \"arguments\": {\"x\": ".to_vec();
    input.extend(std::iter::repeat_n(b'[', 2000));
    input.extend(std::iter::repeat_n(b']', 2000));
    input.extend_from_slice(b"}}\n{\"execute\": \"query-version\", \"id\": \"after-deep\"}\n");
    c.send_raw(&input);
    assert_eq!(
        err(&c.reply()),
        generic("JSON nesting depth limit exceeded")
    );
    assert_eq!(c.reply()["id"], "after-deep");
    // Depth 1000 (within the limit) is parsed, then refused by the argument check.
    let mut ok = b"{\"execute\": \"query-version\", \"arguments\": {\"x\": ".to_vec();
    ok.extend(std::iter::repeat_n(b'[', 1000));
    ok.extend(std::iter::repeat_n(b']', 1000));
    ok.extend_from_slice(b"}}\n");
    c.send_raw(&ok);
    assert_eq!(err(&c.reply()), generic("Parameter 'x' is unexpected"));
    assert_healthy(&mut d);
}

/// Peak resident memory of a process in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn string_of_100_mib_gets_an_error_and_memory_stays_bounded() {
    let mut d = QmpDaemon::sluice(&[]);
    let mut c = d.connect_negotiated();
    let pid = d.child.as_ref().unwrap().id();
    let mut w = c.stream.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        w.write_all(b"{\"execute\": \"query-version\", \"id\": \"")
            .unwrap();
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..100 {
            w.write_all(&chunk).unwrap();
        }
        w.write_all(b"\"}\n{\"execute\": \"query-version\", \"id\": \"after-big\"}\n")
            .unwrap();
    });
    assert_eq!(err(&c.reply()), generic("JSON token size limit exceeded"));
    assert_eq!(c.reply()["id"], "after-big");
    writer.join().unwrap();
    // The message limit is 64 MiB; the daemon never held the whole 100 MiB.
    let peak = peak_rss_kib(pid);
    assert!(peak < 96 * 1024, "peak RSS {peak} KiB");
    assert_healthy(&mut d);
}

#[test]
fn client_disconnecting_mid_command_leaves_others_working() {
    let mut d = QmpDaemon::sluice(&[]);
    let mut watcher = d.connect_negotiated();
    for partial in [
        &b"{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": \"null-co\""[..],
        &b"{\"execute\": \"qmp_capabilities\"}{\"execute\": \"query-qmp-schema\"}"[..],
        &b"{\"execute\": \"qmp_capabilities\"}{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": \"null-co\", \"node-name\": \"gone\"}}"[..],
        &b"\"unterminated"[..],
    ] {
        let mut c = d.connect();
        c.send_raw(partial);
        drop(c);
    }
    // The complete blockdev-add from the vanished client still ran, exactly once.
    let mut names: Vec<String> = Vec::new();
    for _ in 0..500 {
        let nodes = watcher.exec("query-named-block-nodes", json!({}));
        names = nodes["return"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["node-name"].as_str().unwrap().to_string())
            .collect();
        if !names.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(names, vec!["gone"]);
    assert_healthy(&mut d);
}

#[test]
fn events_go_to_every_negotiated_monitor_only() {
    let mut d = QmpDaemon::sluice(&[]);
    let mut a = d.connect_negotiated();
    let mut b = d.connect_negotiated();
    let mut negotiating = d.connect();
    let nbd = d.path("nbd.sock");
    a.exec(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n0", "size": 1048576}),
    );
    let r = a.exec(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": nbd.to_str().unwrap()}}}),
    );
    assert_eq!(r, json!({"return": {}}));
    a.exec(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "n0"}),
    );
    // The event comes before the reply on the monitor that deleted the export...
    a.send(&json!({"execute": "block-export-del", "arguments": {"id": "e0"}, "id": "del"}));
    let first = a.read_value().unwrap();
    assert_eq!(first["event"], "BLOCK_EXPORT_DELETED");
    assert_eq!(first["data"], json!({"id": "e0"}));
    assert!(first["timestamp"]["seconds"].as_i64().unwrap() > 0);
    assert_eq!(a.read_value().unwrap(), json!({"return": {}, "id": "del"}));
    // ...and reaches the other negotiated monitor, but not the one still negotiating.
    let ev = b.wait_event("BLOCK_EXPORT_DELETED");
    assert_eq!(ev["data"], json!({"id": "e0"}));
    assert!(negotiating
        .try_read_line(Duration::from_millis(300))
        .is_none());
    assert_healthy(&mut d);
}

#[test]
fn several_monitors_negotiate_independently() {
    let d = QmpDaemon::sluice(&[]);
    let mut monitors: Vec<Qmp> = (0..8).map(|_| d.connect()).collect();
    for (i, m) in monitors.iter_mut().enumerate() {
        if i % 2 == 0 {
            m.exec("qmp_capabilities", json!({}));
        }
    }
    for (i, m) in monitors.iter_mut().enumerate() {
        let r = m.cmd(json!({"execute": "query-version", "id": i}));
        assert_eq!(r["id"], json!(i));
        assert_eq!(r.get("return").is_some(), i % 2 == 0, "monitor {i}: {r}");
    }
}

#[test]
fn quit_sends_events_then_reply_then_closes_and_exits_0() {
    let mut d = QmpDaemon::sluice(&[
        "--blockdev",
        "driver=null-co,node-name=n0",
        "--nbd-server",
        "addr.type=unix,addr.path={dir}/nbd.sock",
        "--export",
        "type=nbd,id=exp0,node-name=n0",
    ]);
    let mut other = d.connect_negotiated();
    let mut c = d.connect_negotiated();
    c.send(&json!({"execute": "quit", "id": "q"}));
    let lines: Vec<Value> = (0..3).map(|_| c.read_value().unwrap()).collect();
    assert_eq!(lines[0]["event"], "BLOCK_EXPORT_DELETED");
    assert_eq!(lines[0]["data"], json!({"id": "exp0"}));
    assert_eq!(lines[1]["event"], "SHUTDOWN");
    assert_eq!(
        lines[1]["data"],
        json!({"guest": false, "reason": "host-qmp-quit"})
    );
    assert_eq!(lines[2], json!({"return": {}, "id": "q"}));
    assert!(c.closed());
    assert!(other.closed());
    let names: Vec<&str> = other
        .events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["BLOCK_EXPORT_DELETED", "SHUTDOWN"]);
    assert_eq!(d.wait().code(), Some(0));
    assert!(!d.qmp.exists(), "monitor socket left behind");
    assert!(!d.path("nbd.sock").exists(), "NBD socket left behind");
}

#[test]
fn export_in_use_is_kept_in_safe_mode_and_disconnected_in_hard_mode() {
    let mut d = QmpDaemon::sluice(&[
        "--blockdev",
        "driver=null-co,node-name=n0,size=65536",
        "--nbd-server",
        "addr.type=unix,addr.path={dir}/nbd.sock",
        "--export",
        "type=nbd,id=e0,node-name=n0",
    ]);
    let mut c = d.connect_negotiated();
    // A client that connects, waits for its stdin to close, then tries to read.
    let holder = NbdHolder::connect(&d.nbd_uri("n0"), "");
    let r = c.exec("block-export-del", json!({"id": "e0"}));
    assert_eq!(err(&r), generic("export 'e0' still in use"));
    // Hard: as with qemu-storage-daemon, the client is disconnected at once, so the export
    // is gone (BLOCK_EXPORT_DELETED) before the reply.
    let r = c.exec("block-export-del", json!({"id": "e0", "mode": "hard"}));
    assert_eq!(r, json!({"return": {}}));
    let names: Vec<&Value> = c.events.iter().map(|e| &e["event"]).collect();
    assert_eq!(names, vec!["BLOCK_EXPORT_DELETED"]);
    assert_eq!(c.events[0]["data"], json!({"id": "e0"}));
    c.events.clear();
    assert_eq!(
        c.exec("query-block-exports", json!({})),
        json!({"return": []})
    );
    // The client finds its connection closed.
    assert_eq!(holder.release(), "read failed ENOTCONN\n");
    assert_eq!(
        c.exec("blockdev-del", json!({"node-name": "n0"})),
        json!({"return": {}})
    );
    assert_healthy(&mut d);
}
