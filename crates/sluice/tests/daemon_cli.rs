//! `sluice daemon`'s command line: qemu-storage-daemon's options, exports read and written
//! with libnbd's tools, startup errors, `--pidfile`, `--daemonize`, signals, `--compat`, and
//! `sluice-plugin` nodes backed by built-in, nbdkit C and nbdkit Python plugins.

use crate::support;

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use support::qmp::{Qmp, QmpDaemon};
use support::{nbdsh, path_str, random_file, run, sluice_bin};

fn sluice_daemon(args: &[&str]) -> std::process::Output {
    Command::new(sluice_bin())
        .arg("daemon")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn blockdev_nbd_server_and_export_options_serve_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    random_file(&img, 1 << 20, 7);
    let d = QmpDaemon::sluice(&[
        "--blockdev",
        &format!("driver=file,node-name=disk,filename={}", path_str(&img)),
        "--nbd-server",
        "addr.type=unix,addr.path={dir}/nbd.sock",
        "--export",
        "type=nbd,id=exp0,node-name=disk,name=vol,description=a disk,,really,writable=on",
    ]);
    let uri = d.nbd_uri("vol");
    assert_eq!(run("nbdinfo", &["--size", &uri]).trim(), "1048576");
    let copy = dir.path().join("copy.img");
    run("nbdcopy", &[&uri, path_str(&copy)]);
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&img).unwrap());
    let out = nbdsh(
        &uri,
        "h = nbd.NBD(); h.set_full_info(True); h.connect_uri(uri)\n\
         print(h.get_export_description(), h.is_read_only())\n\
         h.pwrite(b'written over NBD', 4096)\n\
         h.flush()",
    );
    assert_eq!(out.trim(), "a disk,really False");
    assert_eq!(
        &std::fs::read(&img).unwrap()[4096..4112],
        b"written over NBD"
    );
}

#[test]
fn blockdev_json_and_implied_export_type_are_accepted() {
    let d = QmpDaemon::sluice(&[
        "--blockdev",
        r#"{"driver": "sluice-plugin", "node-name": "ram", "plugin": "memory", "params": ["size=1M"]}"#,
        "--nbd-server",
        "addr.type=unix,addr.path={dir}/nbd.sock",
        "--export",
        "nbd,id=e,node-name=ram,writable=on",
    ]);
    let uri = d.nbd_uri("ram");
    let out = nbdsh(
        &uri,
        "h = nbd.NBD(); h.connect_uri(uri)\n\
         h.pwrite(b'\\x5a' * 512, 0)\n\
         print(h.pread(4, 510).hex(), h.get_size())",
    );
    assert_eq!(out.trim(), "5a5a0000 1048576");
}

#[test]
fn read_only_export_refuses_writes() {
    let d = QmpDaemon::sluice(&[
        "--blockdev",
        "driver=null-co,node-name=n,size=65536,read-only=on",
        "--nbd-server",
        "addr.type=unix,addr.path={dir}/nbd.sock",
        "--export",
        "type=nbd,id=e,node-name=n",
    ]);
    let uri = d.nbd_uri("n");
    let out = nbdsh(
        &uri,
        "h = nbd.NBD(); h.connect_uri(uri)\nprint(h.is_read_only())",
    );
    assert_eq!(out.trim(), "True");
}

#[test]
fn bad_option_exits_2_naming_the_option() {
    let cases: [(&[&str], &str); 7] = [
        (&["--blockdev", "driver=file,node-name=f"], "sluice daemon: --blockdev driver=file,node-name=f: Parameter 'filename' is missing"),
        (&["--blockdev", "driver=null-co,node-name=n,size=big"], "sluice daemon: --blockdev driver=null-co,node-name=n,size=big: Parameter 'size' expects integer"),
        (&["--blockdev", "driver=null-co,node-name=n,read-only=maybe"], "sluice daemon: --blockdev driver=null-co,node-name=n,read-only=maybe: Parameter 'read-only' expects 'on' or 'off'"),
        (&["--export", "type=nbd,id=e"], "sluice daemon: --export type=nbd,id=e: Parameter 'node-name' is missing"),
        (&["--nbd-server", "addr.type=unix"], "sluice daemon: --nbd-server addr.type=unix: Parameter 'addr.path' is missing"),
        (&["--monitor", "chardev=nope"], "sluice daemon: --monitor chardev=nope: chardev 'nope' not found (define it with --chardev)"),
        (&["--chardev", "socket,id=m,path=/tmp/x", "--monitor", "m"], "sluice daemon: --chardev socket,id=m,path=/tmp/x: a monitor socket must be a server: add server=on"),
    ];
    for (args, want) in cases {
        let out = sluice_daemon(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).trim(),
            want,
            "{args:?}"
        );
    }
}

#[test]
fn startup_failure_exits_1_with_qemu_message() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.img");
    let out = sluice_daemon(&[
        "--blockdev",
        &format!("driver=file,node-name=f,filename={}", path_str(&missing)),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        format!(
            "sluice daemon: --blockdev node-name=f: Could not open '{}': No such file or directory",
            path_str(&missing)
        )
    );
    let out = sluice_daemon(&["--export", "type=nbd,id=e,node-name=nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "sluice daemon: --export id=e: Cannot find device='' nor node-name='nope'"
    );
}

#[test]
fn pidfile_is_written_when_ready_and_removed_at_exit() {
    let mut d = QmpDaemon::sluice(&["--pidfile", "{dir}/sluice.pid"]);
    let pid = std::fs::read_to_string(d.path("sluice.pid")).unwrap();
    assert_eq!(pid.trim(), d.child.as_ref().unwrap().id().to_string());
    assert_eq!(d.signal(libc::SIGTERM).code(), Some(0));
    assert!(!d.path("sluice.pid").exists());
}

#[test]
fn sigterm_sends_shutdown_and_exits_0() {
    let mut d = QmpDaemon::sluice(&[]);
    let mut c = d.connect_negotiated();
    assert_eq!(d.signal(libc::SIGTERM).code(), Some(0));
    let ev = c.wait_event("SHUTDOWN");
    assert_eq!(ev["data"], json!({"guest": false, "reason": "host-signal"}));
    assert!(c.closed());
}

#[test]
fn daemonize_returns_once_ready_and_daemon_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let qmp = dir.path().join("qmp.sock");
    let pidfile = dir.path().join("d.pid");
    let out = sluice_daemon(&[
        "--daemonize",
        "--pidfile",
        path_str(&pidfile),
        "--qmp",
        path_str(&qmp),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Ready means the monitor already accepts clients.
    let mut c = Qmp::connect(&qmp);
    c.exec("qmp_capabilities", json!({}));
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: signal 0 only checks that the process exists.
    assert_eq!(unsafe { libc::kill(pid, 0) }, 0);
    assert_eq!(c.cmd(json!({"execute": "quit"})), json!({"return": {}}));
    assert!(c.closed());
    for _ in 0..200 {
        // SAFETY: as above.
        if unsafe { libc::kill(pid, 0) } != 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("daemonized process {pid} did not exit after quit");
}

#[test]
fn daemonize_startup_failure_is_reported_by_the_parent() {
    let out = sluice_daemon(&[
        "--daemonize",
        "--blockdev",
        "driver=file,node-name=f,filename=/nonexistent/sluice-test.img",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "sluice daemon: --blockdev node-name=f: Could not open '/nonexistent/sluice-test.img': No such file or directory"
    );
}

#[test]
fn chardev_and_monitor_options_serve_qmp_on_tcp_too() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let d = QmpDaemon::sluice(&[
        "--chardev",
        &format!("socket,id=t,host=127.0.0.1,port={port},server=on,wait=off"),
        "--monitor",
        "chardev=t,mode=control",
    ]);
    let mut s = None;
    for _ in 0..100 {
        if let Ok(c) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            s = Some(c);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut s = std::io::BufReader::new(s.expect("TCP monitor"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut s, &mut line).unwrap();
    assert!(line.starts_with("{\"QMP\": {\"version\": "), "{line}");
    assert!(line.ends_with("\r\n"));
    drop(d);
}

#[test]
fn compat_deprecated_input_reject_refuses_deprecated_commands() {
    let d = QmpDaemon::sluice(&[
        "--compat",
        "deprecated-input=reject,deprecated-output=hide",
        "--blockdev",
        "driver=null-co,node-name=n",
        "--nbd-server",
        "addr.type=unix,addr.path={dir}/nbd.sock",
    ]);
    let mut c = d.connect_negotiated();
    let r = c.exec("nbd-server-add", json!({"device": "n"}));
    assert_eq!(
        Qmp::error(&r),
        (
            "CommandNotFound".to_string(),
            "Deprecated command nbd-server-add disabled by policy".to_string()
        )
    );
    // deprecated-output=hide: SchemaInfoEnum's deprecated 'values' member is left out.
    let schema = c.cmd(json!({"execute": "query-qmp-schema"}));
    let enums: Vec<&serde_json::Value> = schema["return"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["meta-type"] == "enum")
        .collect();
    assert!(!enums.is_empty());
    assert!(enums
        .iter()
        .all(|e| e.get("values").is_none() && e.get("members").is_some()));
}

#[test]
fn compat_default_accepts_deprecated_commands() {
    let d = QmpDaemon::sluice(&[
        "--blockdev",
        "driver=null-co,node-name=n,size=4096",
        "--nbd-server",
        "addr.type=unix,addr.path={dir}/nbd.sock",
    ]);
    let mut c = d.connect_negotiated();
    assert_eq!(
        c.exec("nbd-server-add", json!({"device": "n"})),
        json!({"return": {}})
    );
    let uri = d.nbd_uri("n");
    assert_eq!(run("nbdinfo", &["--size", &uri]).trim(), "4096");
    assert_eq!(
        c.exec("nbd-server-remove", json!({"name": "n"})),
        json!({"return": {}})
    );
    assert_eq!(
        c.wait_event("BLOCK_EXPORT_DELETED")["data"],
        json!({"id": "n"})
    );
    let schema = c.cmd(json!({"execute": "query-qmp-schema"}));
    let add = schema["return"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "nbd-server-add")
        .unwrap()
        .clone();
    assert_eq!(add["features"], json!(["deprecated"]));
    let bad = sluice_daemon(&["--compat", "deprecated-input=maybe"]);
    assert_eq!(bad.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&bad.stderr).trim(),
        "sluice daemon: --compat deprecated-input=maybe: Parameter 'deprecated-input' does not accept value 'maybe'"
    );
}

/// Adds a `sluice-plugin` node `node` hosting `plugin` with `params`, and exports it (under
/// the node's name) on the daemon's NBD server.
fn export_plugin(c: &mut Qmp, node: &str, plugin: &str, params: Value) {
    let r = c.exec(
        "blockdev-add",
        json!({"driver": "sluice-plugin", "node-name": node, "plugin": plugin, "params": params}),
    );
    assert_eq!(r, json!({"return": {}}));
    let r = c.exec(
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": node}),
    );
    assert_eq!(r, json!({"return": {}}));
}

#[test]
fn sluice_plugin_node_hosts_nbdkit_c_plugin() {
    let d = QmpDaemon::sluice(&["--nbd-server", "addr.type=unix,addr.path={dir}/nbd.sock"]);
    let mut c = d.connect_negotiated();
    export_plugin(
        &mut c,
        "d",
        "data",
        json!(["data=1 2 3 @0x1ff 4", "size=512"]),
    );
    let uri = d.nbd_uri("d");
    let out = nbdsh(&uri, "h = nbd.NBD(); h.connect_uri(uri)\nb = h.pread(512, 0)\nprint(b[0], b[1], b[2], b[511], h.get_size())");
    assert_eq!(out.trim(), "1 2 3 4 512");
    let r = c.exec(
        "blockdev-add",
        json!({"driver": "sluice-plugin", "node-name": "x", "plugin": "no-such-plugin"}),
    );
    let (class, desc) = Qmp::error(&r);
    assert_eq!(class, "GenericError");
    assert!(
        desc.starts_with("Could not load plugin 'no-such-plugin': not a built-in plugin"),
        "{desc}"
    );
}

#[test]
fn sluice_plugin_node_hosts_nbdkit_python_plugin() {
    let d = QmpDaemon::sluice(&["--nbd-server", "addr.type=unix,addr.path={dir}/nbd.sock"]);
    let script = d.path("plugin.py");
    std::fs::write(
        &script,
        "disk = bytearray(b'py' * 1024)\n\
         def open(readonly):\n    return 1\n\
         def get_size(h):\n    return len(disk)\n\
         def pread(h, count, offset):\n    return disk[offset:offset+count]\n",
    )
    .unwrap();
    let mut c = d.connect_negotiated();
    export_plugin(&mut c, "py", "python", json!([path_str(&script)]));
    let uri = d.nbd_uri("py");
    let out = nbdsh(
        &uri,
        "h = nbd.NBD(); h.connect_uri(uri)\nprint(bytes(h.pread(4, 100)), h.get_size())",
    );
    assert_eq!(out.trim(), "b'pypy' 2048");
}

#[test]
fn sluice_plugin_export_runs_plugin_preconnect_once_export_known() {
    let d = QmpDaemon::sluice(&["--nbd-server", "addr.type=unix,addr.path={dir}/nbd.sock"]);
    let script = d.path("hooks.py");
    // The plugin logs its preconnect and opens, and serves the log. (blockdev-add opens the
    // node once, outside any connection.)
    std::fs::write(
        &script,
        "log = []\n\
         def preconnect(readonly):\n    log.append('preconnect %s' % readonly)\n\
         def open(readonly):\n    log.append('open')\n    return 1\n\
         def get_size(h):\n    return 512\n\
         def pread(h, count, offset):\n    return ''.join(x + '\\n' for x in log).encode().ljust(512, b'.')[offset:offset+count]\n",
    )
    .unwrap();
    let mut c = d.connect_negotiated();
    export_plugin(&mut c, "py", "python", json!([path_str(&script)]));
    let uri = d.nbd_uri("py");
    let read_log = "h = nbd.NBD(); h.connect_uri(uri)\n\
                    print(bytes(h.pread(512, 0)).rstrip(b'.').decode(), end='')";
    assert_eq!(nbdsh(&uri, read_log), "open\npreconnect True\nopen\n");
    // Each connection runs preconnect once, before its open.
    assert_eq!(
        nbdsh(&uri, read_log),
        "open\npreconnect True\nopen\npreconnect True\nopen\n"
    );
}
