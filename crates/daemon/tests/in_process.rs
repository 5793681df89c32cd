//! The QMP daemon embedded in a process, without the `sluice` binary: a monitor on a Unix
//! socket, negotiation, a node, the NBD server and an export, events, and `quit`. This is the
//! library's contract with the binary (and with any other embedder).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use sluice_daemon::graph::{BuiltinLoader, DriverRegistry};
use sluice_daemon::{Daemon, DaemonConfig, MonitorListener};
use sluice_qapi::runtime::CompatPolicy;

struct Client {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Client {
    fn connect(path: &std::path::Path) -> Client {
        let w = UnixStream::connect(path).unwrap();
        w.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let r = BufReader::new(w.try_clone().unwrap());
        Client { w, r }
    }

    fn line(&mut self) -> Value {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        assert!(l.ends_with("\r\n"), "{l:?}");
        serde_json::from_str(&l).unwrap()
    }

    fn cmd(&mut self, v: Value) -> Value {
        writeln!(self.w, "{v}").unwrap();
        self.line()
    }
}

#[test]
fn embedded_daemon_serves_a_monitor_and_stops_on_quit() {
    let dir = tempfile::tempdir().unwrap();
    let qmp = dir.path().join("qmp.sock");
    let nbd = dir.path().join("nbd.sock");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let daemon = Daemon::new(DaemonConfig {
        objects: Default::default(),
        policy: CompatPolicy::default(),
        drivers: DriverRegistry::builtin(Arc::new(BuiltinLoader)),
        nbd: sluice_server::ServerConfig::default(),
    });
    let d = daemon.clone();
    let q = qmp.clone();
    let waiter = rt.spawn(async move {
        let l = tokio::net::UnixListener::bind(&q).unwrap();
        d.spawn_monitor_listener(MonitorListener::Unix(l, q));
        let cause = d.wait_shutdown().await;
        assert!(d.finish(Duration::from_secs(10)).await);
        cause
    });
    let mut c = None;
    for _ in 0..200 {
        if qmp.exists() {
            c = Some(Client::connect(&qmp));
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut c = c.expect("monitor socket");
    assert_eq!(c.line()["QMP"]["capabilities"], json!(["oob"]));
    assert_eq!(
        c.cmd(json!({"execute": "qmp_capabilities"})),
        json!({"return": {}})
    );
    let ok = json!({"return": {}});
    assert_eq!(
        c.cmd(json!({"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n", "size": 512}})),
        ok
    );
    assert_eq!(
        c.cmd(json!({"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "path": nbd.to_str().unwrap()}}})),
        ok
    );
    assert_eq!(
        c.cmd(json!({"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e", "node-name": "n"}})),
        ok
    );
    assert!(nbd.exists());
    writeln!(c.w, "{}", json!({"execute": "quit"})).unwrap();
    assert_eq!(c.line()["event"], "BLOCK_EXPORT_DELETED");
    assert_eq!(c.line()["event"], "SHUTDOWN");
    assert_eq!(c.line(), ok);
    let cause = rt.block_on(waiter).unwrap();
    assert_eq!(cause.as_str(), "host-qmp-quit");
    assert!(
        !nbd.exists(),
        "nbd-server's socket is removed when it stops"
    );
    assert!(daemon.is_shutting_down());
}
