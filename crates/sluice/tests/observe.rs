//! Observability (issue #18): `query-blockstats` and `block-latency-histogram-set` after a
//! known workload from real clients (libnbd, qemu-io), its shape against
//! qemu-storage-daemon's, the `--metrics` endpoint (exact counters, `promtool check
//! metrics`, a real Prometheus server scraping it), and `--log-format=json`'s operator
//! events with secrets redacted.

use crate::support;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::qmp::{Qmp, QmpDaemon};
use support::{nbdsh, path_str, qemu_io, Server};

const MIB: u64 = 1024 * 1024;

/// The libnbd workload of [`expected_e0`]: known counts of every kind, one invalid read
/// (beyond the end; strict mode off so libnbd sends it).
const WORKLOAD: &str = "
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(uri)
h.pwrite(b'x' * 65536, 0)
h.pwrite(b'y' * 4096, 1048576)
for i in range(3):
    h.pread(4096, i * 4096)
h.zero(8192, 2 * 1048576)
h.trim(4096, 0)
h.flush()
try:
    h.pread(512, h.get_size())
    print('read beyond end succeeded')
except nbd.Error as e:
    print('invalid', e.errno)
h.shutdown()
";

/// A raw image of `size` bytes in `dir`.
fn image(dir: &Path, name: &str, size: u64) -> String {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    path_str(&p).to_string()
}

/// `GET path` over HTTP/1.0 on a Unix socket or TCP address; returns (status, body).
fn http_get(unix: Option<&Path>, tcp: Option<&str>, path: &str) -> (u32, String) {
    let req = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let mut text = String::new();
    match (unix, tcp) {
        (Some(p), _) => {
            let mut s = std::os::unix::net::UnixStream::connect(p).unwrap();
            s.write_all(req.as_bytes()).unwrap();
            s.read_to_string(&mut text).unwrap();
        }
        (None, Some(a)) => {
            let mut s = std::net::TcpStream::connect(a).unwrap();
            s.write_all(req.as_bytes()).unwrap();
            s.read_to_string(&mut text).unwrap();
        }
        _ => unreachable!(),
    }
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

/// The value of the sample `series` (name and labels exactly as written) in exposition text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A free TCP port on loopback (bound and released; the race is acceptable in tests).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn stats_of<'a>(list: &'a Value, key: &str, name: &str) -> &'a Value {
    list.as_array()
        .unwrap_or_else(|| panic!("{list}"))
        .iter()
        .find(|e| e[key] == name)
        .unwrap_or_else(|| panic!("no {key} {name} in {list}"))
}

/// Asserts `stats` has these exact counters.
#[track_caller]
fn assert_counts(stats: &Value, want: &[(&str, u64)]) {
    for (k, v) in want {
        assert_eq!(stats[*k], json!(v), "{k} in {stats}");
    }
}

#[test]
fn blockstats_count_a_libnbd_workload_exactly_per_export_and_node() {
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), "d.img", 4 * MIB);
    let d = QmpDaemon::sluice(&[
        "--blockdev",
        &format!("driver=file,filename={img},node-name=disk"),
        "--nbd-server",
        "addr.type=unix,addr.path={dir}/nbd.sock",
        "--export",
        "type=nbd,id=e0,node-name=disk,name=rw,writable=on",
        "--export",
        "type=nbd,id=e1,node-name=disk,name=ro",
        "--metrics",
        "unix:{dir}/metrics.sock",
    ]);
    let mut c = d.connect_negotiated();
    // Before any request: zeros, and no idle time yet (QEMU leaves it out then).
    let before = c.exec("query-blockstats", json!({}));
    let e0 = &stats_of(&before["return"], "device", "e0")["stats"];
    assert_counts(e0, &[("rd_operations", 0), ("wr_bytes", 0)]);
    assert!(e0.get("idle_time_ns").is_none(), "{e0}");

    assert_eq!(nbdsh(&d.nbd_uri("rw"), WORKLOAD), "invalid EINVAL\n");
    // A write to the read-only export: invalid (EPERM), counted on e1 and on the node.
    let out = nbdsh(
        &d.nbd_uri("ro"),
        "h = nbd.NBD()\nh.set_strict_mode(0)\nh.connect_uri(uri)\n\
         try:\n    h.pwrite(b'z' * 512, 0)\nexcept nbd.Error as e:\n    print('refused', e.errno)\n\
         h.shutdown()",
    );
    assert_eq!(out, "refused EPERM\n");

    let r = c.exec("query-blockstats", json!({}));
    let devices = &r["return"];
    assert_eq!(devices.as_array().unwrap().len(), 2, "{devices}");
    let e0 = stats_of(devices, "device", "e0");
    assert_eq!(e0["node-name"], "disk");
    let s = &e0["stats"];
    assert_counts(
        s,
        &[
            ("rd_operations", 3),
            ("rd_bytes", 3 * 4096),
            ("wr_operations", 3),
            ("wr_bytes", 65536 + 4096 + 8192),
            ("unmap_operations", 1),
            ("unmap_bytes", 4096),
            ("flush_operations", 1),
            ("invalid_rd_operations", 1),
            ("failed_rd_operations", 0),
            ("invalid_wr_operations", 0),
            ("wr_highest_offset", 2 * MIB + 8192),
            ("rd_merged", 0),
        ],
    );
    assert!(s["rd_total_time_ns"].as_u64().unwrap() > 0, "{s}");
    assert!(s["wr_total_time_ns"].as_u64().unwrap() > 0, "{s}");
    assert!(s["idle_time_ns"].as_u64().is_some(), "{s}");
    assert_eq!(s["timed_stats"], json!([]));
    let e1 = &stats_of(devices, "device", "e1")["stats"];
    assert_counts(e1, &[("invalid_wr_operations", 1), ("wr_operations", 0)]);

    // The node adds up both exports.
    let r = c.exec("query-blockstats", json!({"query-nodes": true}));
    let node = &stats_of(&r["return"], "node-name", "disk")["stats"];
    assert_counts(
        node,
        &[
            ("rd_operations", 3),
            ("wr_operations", 3),
            ("invalid_rd_operations", 1),
            ("invalid_wr_operations", 1),
            ("unmap_bytes", 4096),
        ],
    );

    // The same figures on /metrics, per export and per node, with errors by errno.
    let (status, text) = http_get(Some(&d.path("metrics.sock")), None, "/metrics");
    assert_eq!(status, 200, "{text}");
    for (series, v) in [
        (
            r#"sluice_requests_total{export="e0",op="read",result="ok"}"#,
            3.0,
        ),
        (
            r#"sluice_requests_total{export="e0",op="zero",result="ok"}"#,
            1.0,
        ),
        (
            r#"sluice_requests_total{export="e0",op="read",result="invalid"}"#,
            1.0,
        ),
        (
            r#"sluice_request_bytes_total{export="e0",op="write"}"#,
            69632.0,
        ),
        (
            r#"sluice_request_errors_total{export="e0",op="read",errno="EINVAL"}"#,
            1.0,
        ),
        (
            r#"sluice_request_errors_total{export="e1",op="write",errno="EPERM"}"#,
            1.0,
        ),
        (
            r#"sluice_node_requests_total{node="disk",op="write",result="invalid"}"#,
            1.0,
        ),
        (
            r#"sluice_request_duration_seconds_count{export="e0",op="read"}"#,
            3.0,
        ),
        (
            r#"sluice_request_duration_seconds_bucket{export="e0",op="read",le="+Inf"}"#,
            3.0,
        ),
        (r#"sluice_requests_in_flight{export="e0"}"#, 0.0),
        ("sluice_connections_total", 2.0),
        ("sluice_connections_open", 0.0),
    ] {
        assert_eq!(sample(&text, series), Some(v), "{series} in:\n{text}");
    }
    assert_eq!(
        http_get(Some(&d.path("metrics.sock")), None, "/other").0,
        404
    );
}

/// The same node layout (raw over file) on sluice and qsd.
fn raw_over_file(img: &str) -> Vec<String> {
    [
        "--blockdev".to_string(),
        format!("driver=file,filename={img},node-name=file0"),
        "--blockdev".into(),
        "driver=raw,file=file0,node-name=fmt0".into(),
        "--nbd-server".into(),
        "addr.type=unix,addr.path={dir}/nbd.sock".into(),
        "--export".into(),
        "type=nbd,id=e0,node-name=fmt0,writable=on".into(),
    ]
    .to_vec()
}

/// Keys of a BlockStats entry, recursively, as "path.key" strings.
fn shape(v: &Value, path: &str, out: &mut Vec<String>) {
    if let Value::Object(m) = v {
        for (k, child) in m {
            let p = format!("{path}.{k}");
            out.push(p.clone());
            if k != "timed_stats" {
                shape(child, &p, out);
            }
        }
    }
}

#[test]
fn blockstats_after_qemu_io_have_qsd_shape_and_real_figures() {
    let tmp = tempfile::tempdir().unwrap();
    let cmds = ["write 0 64k", "read 0 4k", "discard 0 4k", "flush"];
    let mut replies = Vec::new();
    for qsd in [false, true] {
        let img = image(tmp.path(), if qsd { "q.img" } else { "s.img" }, 8 * MIB);
        let args = raw_over_file(&img);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let d = if qsd {
            QmpDaemon::qsd(&args)
        } else {
            QmpDaemon::sluice(&args)
        };
        qemu_io(&d.nbd_uri("fmt0"), &cmds);
        let mut c = d.connect_negotiated();
        replies.push(c.exec("query-blockstats", json!({"query-nodes": true}))["return"].clone());
    }
    let (ours, qsd) = (&replies[0], &replies[1]);
    let mut a = Vec::new();
    let mut b = Vec::new();
    shape(ours, "", &mut a);
    shape(qsd, "", &mut b);
    // Deliberate: no driver-specific (the file driver's discard counts), and idle_time_ns
    // present once there was I/O (qsd counts nothing, so it never has it).
    b.retain(|k| !k.contains("driver-specific"));
    a.retain(|k| !k.ends_with(".idle_time_ns"));
    assert_eq!(a, b, "\nsluice: {ours}\nqsd: {qsd}");
    // qsd: all zeros except wr_highest_offset; sluice: the workload on the exported node.
    let q = &stats_of(qsd, "node-name", "fmt0")["stats"];
    assert_counts(q, &[("wr_operations", 0), ("wr_highest_offset", 65536)]);
    let s = &stats_of(ours, "node-name", "fmt0")["stats"];
    assert_counts(
        s,
        &[
            ("wr_operations", 1),
            ("wr_bytes", 65536),
            ("rd_operations", 1),
            ("rd_bytes", 4096),
            ("unmap_operations", 1),
            ("unmap_bytes", 4096),
            ("wr_highest_offset", 65536),
        ],
    );
    // qemu-io's explicit flush, and the one qemu sends when it closes the image.
    assert!(s["flush_operations"].as_u64().unwrap() >= 1, "{s}");
    // The file node below is reached through the format layer, not an export: zeros.
    let f = &stats_of(ours, "node-name", "fmt0")["parent"]["stats"];
    assert_counts(f, &[("wr_operations", 0)]);
}

#[test]
fn latency_histogram_set_bins_every_request_and_refuses_like_qemu() {
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), "d.img", 4 * MIB);
    let d = QmpDaemon::sluice(&[
        "--blockdev",
        &format!("driver=file,filename={img},node-name=disk"),
        "--nbd-server",
        "addr.type=unix,addr.path={dir}/nbd.sock",
        "--export",
        "type=nbd,id=e0,node-name=disk,writable=on",
    ]);
    let mut c = d.connect_negotiated();
    // All kinds: [0, 1ns), [1ns, 1000s), [1000s, inf); writes get their own boundaries.
    support::qmp::ok(
        &mut c,
        "block-latency-histogram-set",
        json!({"id": "e0", "boundaries": [1, 1_000_000_000_000u64],
               "boundaries-write": [10, 20, 1_000_000_000_000u64]}),
    );
    qemu_io(
        &d.nbd_uri("disk"),
        &["write 0 4k", "write 4k 4k", "read 0 4k", "read 0 8k"],
    );
    let r = c.exec("query-blockstats", json!({}));
    let s = &stats_of(&r["return"], "device", "e0")["stats"];
    assert_eq!(
        s["rd_latency_histogram"],
        json!({"boundaries": [1, 1_000_000_000_000u64], "bins": [0, 2, 0]}),
        "{s}"
    );
    let w = &s["wr_latency_histogram"];
    assert_eq!(w["boundaries"], json!([10, 20, 1_000_000_000_000u64]));
    let bins: u64 = w["bins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap())
        .sum();
    assert_eq!(bins, s["wr_operations"].as_u64().unwrap(), "{s}");
    assert_eq!(bins, 2);
    assert!(s.get("zone_append_latency_histogram").is_some());

    // A bad list changes nothing; an unknown id is DeviceNotFound; no boundaries removes all.
    let r = c.exec(
        "block-latency-histogram-set",
        json!({"id": "e0", "boundaries-flush": [5, 5]}),
    );
    assert_eq!(
        Qmp::error(&r),
        (
            "GenericError".into(),
            "Device 'e0' set flush boundaries fail".into()
        )
    );
    let r = c.exec("block-latency-histogram-set", json!({"id": "nosuch"}));
    assert_eq!(
        Qmp::error(&r),
        ("DeviceNotFound".into(), "Device 'nosuch' not found".into())
    );
    // A node name works too.
    support::qmp::ok(
        &mut c,
        "block-latency-histogram-set",
        json!({"id": "disk", "boundaries-read": [1000]}),
    );
    support::qmp::ok(&mut c, "block-latency-histogram-set", json!({"id": "e0"}));
    let r = c.exec("query-blockstats", json!({}));
    let s = &stats_of(&r["return"], "device", "e0")["stats"];
    assert!(s.get("rd_latency_histogram").is_none(), "{s}");
    let r = c.exec("query-blockstats", json!({"query-nodes": true}));
    let n = &stats_of(&r["return"], "node-name", "disk")["stats"];
    assert_eq!(n["rd_latency_histogram"]["boundaries"], json!([1000]));
}

/// A Prometheus server on loopback scraping `target` every second, killed when dropped.
struct Prometheus {
    child: Child,
    _dir: tempfile::TempDir,
    addr: String,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: sluice\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
            .spawn()
            .expect("prometheus (Debian package prometheus; run scripts/test.sh)");
        Prometheus {
            child,
            _dir: dir,
            addr,
        }
    }

    /// One instant query's answer (None if Prometheus did not answer).
    fn query(&self, query: &str) -> Option<Value> {
        let url = format!("/api/v1/query?query={}", urlencode(query));
        let mut s = std::net::TcpStream::connect(&self.addr).ok()?;
        let req = format!("GET {url} HTTP/1.0\r\nHost: localhost\r\n\r\n");
        s.write_all(req.as_bytes()).ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        serde_json::from_str(text.split_once("\r\n\r\n")?.1).ok()
    }

    /// Polls an instant query until it returns one series with value `want`.
    fn wait_for(&self, query: &str, want: &str) -> Value {
        let url = format!("/api/v1/query?query={}", urlencode(query));
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Ok(mut s) = std::net::TcpStream::connect(&self.addr) {
                let req = format!("GET {url} HTTP/1.0\r\nHost: localhost\r\n\r\n");
                let mut text = String::new();
                if s.write_all(req.as_bytes()).is_ok() && s.read_to_string(&mut text).is_ok() {
                    if let Some((_, body)) = text.split_once("\r\n\r\n") {
                        last = body.to_string();
                        if let Ok(v) = serde_json::from_str::<Value>(body) {
                            let res = &v["data"]["result"];
                            if res.as_array().is_some_and(|a| a.len() == 1)
                                && res[0]["value"][1] == want
                            {
                                return res[0].clone();
                            }
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("prometheus never answered {query} = {want}; last answer: {last}");
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn metrics_of_serve_pass_promtool_and_a_real_prometheus_scrapes_them() {
    let addr = format!("127.0.0.1:{}", free_port());
    let srv = Server::start(&["--metrics", &addr, "memory", "16M"]);
    let out = nbdsh(
        &srv.uri(),
        "h = nbd.NBD()\nh.connect_uri(uri)\n\
         for i in range(5):\n    h.pwrite(b'a' * 4096, i * 4096)\n\
         h.pread(4096, 0)\nh.shutdown()\nprint('ok')",
    );
    assert_eq!(out, "ok\n");
    let (status, text) = http_get(None, Some(&addr), "/metrics");
    assert_eq!(status, 200);
    assert_eq!(
        sample(
            &text,
            r#"sluice_requests_total{export="memory",op="write",result="ok"}"#
        ),
        Some(5.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"sluice_request_bytes_total{export="memory",op="write"}"#
        ),
        Some(20480.0)
    );
    assert!(text.contains("sluice_build_info{version=\""), "{text}");

    // promtool reads the exposition format from stdin.
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; run scripts/test.sh)");
    p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let o = p.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );

    let prom = Prometheus::start(&addr);
    let series = prom.wait_for(
        r#"sluice_requests_total{export="memory",op="write",result="ok"}"#,
        "5",
    );
    assert_eq!(series["metric"]["job"], "sluice");
    prom.wait_for(r#"sluice_request_duration_seconds_count{op="read"}"#, "1");
    // Every query of the Grafana dashboard in docs/ is valid PromQL for this Prometheus
    // (Grafana's variables replaced as Grafana would), and the export panels find data.
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/grafana-dashboard.json"),
        )
        .unwrap(),
    )
    .unwrap();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let q = t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$export", ".*");
            let a = prom.query(&q).unwrap_or_else(|| panic!("no answer to {q}"));
            assert_eq!(a["status"], "success", "{q}: {a}");
        }
    }
    let a = prom
        .query(r#"sum by (op) (sluice_request_bytes_total{export=~".*",op="write"})"#)
        .unwrap();
    assert_eq!(a["data"]["result"][0]["value"][1], "20480", "{a}");
}

#[test]
fn metrics_bad_address_is_one_line_and_exit_2() {
    for cmd in [
        &["serve", "--metrics", "nonsense", "memory", "1M"][..],
        &["daemon", "--metrics", "host:99999"],
    ] {
        let o = Command::new(support::sluice_bin())
            .args(cmd)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{cmd:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("--metrics"), "{err}");
    }
}

/// The JSON objects of a `--log-format=json` stderr (every line must be one).
fn json_lines(stderr: &str) -> Vec<Value> {
    stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn events<'a>(lines: &'a [Value], name: &str) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|v| v["fields"]["event"] == name)
        .collect()
}

#[test]
fn json_log_of_serve_has_connection_and_failed_request_events() {
    let mut srv = Server::start(&[
        "--log-format=json",
        "--filter=error",
        "memory",
        "1M",
        "error-pread-rate=1",
    ]);
    let out = nbdsh(
        &srv.uri(),
        "h = nbd.NBD()\nh.connect_uri(uri)\n\
         try:\n    h.pread(512, 0)\nexcept nbd.Error as e:\n    print('failed', e.errno)\n\
         h.shutdown()",
    );
    assert_eq!(out, "failed EIO\n");
    srv.stop();
    let lines = json_lines(&srv.stderr());
    let open = events(&lines, "connection_open");
    let close = events(&lines, "connection_close");
    // The readiness probe of the test harness is a connection too.
    assert!(!open.is_empty() && open.len() == close.len(), "{lines:?}");
    let failed = events(&lines, "request_failed");
    assert_eq!(failed.len(), 1, "{lines:?}");
    assert_eq!(failed[0]["fields"]["command"], "read");
    assert_eq!(failed[0]["fields"]["errno"], libc::EIO);
    assert_eq!(failed[0]["level"], "INFO");
}

#[test]
fn json_log_of_daemon_has_qmp_commands_with_secrets_redacted() {
    let d = QmpDaemon::sluice(&["--log-format", "json"]);
    let mut c = d.connect_negotiated();
    let r = c.exec(
        "query-version",
        json!({"password": "hunter2", "nested": {"key-secret": "sekrit"}}),
    );
    assert!(r.get("error").is_some(), "{r}");
    let r = c.exec("query-version", json!({}));
    assert!(r.get("return").is_some());
    drop(c);
    let mut d = d;
    d.signal(libc::SIGTERM);
    let err = d.stderr();
    assert!(!err.contains("hunter2") && !err.contains("sekrit"), "{err}");
    let lines = json_lines(&err);
    let cmds = events(&lines, "qmp_command");
    let failed = cmds
        .iter()
        .find(|v| v["fields"]["outcome"] == "error" && v["fields"]["command"] == "query-version")
        .unwrap_or_else(|| panic!("{lines:?}"));
    let args: Value =
        serde_json::from_str(failed["fields"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(
        args,
        json!({"password": "<redacted>", "nested": {"key-secret": "<redacted>"}})
    );
    assert_eq!(failed["fields"]["class"], "GenericError");
    assert!(cmds
        .iter()
        .any(|v| v["fields"]["command"] == "qmp_capabilities" && v["fields"]["outcome"] == "ok"));
}

#[test]
fn text_log_keeps_its_lines_without_operator_events() {
    let mut srv = Server::start(&["memory", "1M"]);
    nbdsh(
        &srv.uri(),
        "h = nbd.NBD()\nh.connect_uri(uri)\nh.shutdown()",
    );
    srv.stop();
    let err = srv.stderr();
    assert!(!err.contains("connection_open"), "{err}");
}

#[test]
fn job_progress_on_metrics_equals_query_jobs_and_json_log_has_its_states() {
    let tmp = tempfile::tempdir().unwrap();
    let (_base, _mid, top) = support::image::qcow2_chain(tmp.path(), "j");
    let mut d = QmpDaemon::sluice(&["--metrics", "unix:{dir}/m.sock", "--log-format=json"]);
    let mut c = d.connect_negotiated();
    support::qmp::ok(
        &mut c,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top",
               "file": {"driver": "file", "filename": path_str(&top)}}),
    );
    support::qmp::ok(
        &mut c,
        "block-stream",
        json!({"job-id": "s0", "device": "top", "auto-dismiss": false}),
    );
    support::qmp::wait_for(&mut c, "concluded", Duration::from_secs(30));
    let jobs = c.exec("query-jobs", json!({}));
    let job = &jobs["return"][0];
    assert_eq!(job["status"], "concluded", "{jobs}");
    let (done, total) = (
        job["current-progress"].as_u64().unwrap(),
        job["total-progress"].as_u64().unwrap(),
    );
    assert!(total > 0 && done == total, "{job}");
    let (_, text) = http_get(Some(&d.path("m.sock")), None, "/metrics");
    assert_eq!(
        sample(&text, r#"sluice_job_bytes_done{job="s0",type="stream"}"#),
        Some(done as f64),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"sluice_job_bytes_total{job="s0",type="stream"}"#),
        Some(total as f64)
    );
    assert_eq!(
        sample(
            &text,
            r#"sluice_job_state{job="s0",type="stream",state="concluded"}"#
        ),
        Some(1.0)
    );
    drop(c);
    d.signal(libc::SIGTERM);
    let lines = json_lines(&d.stderr());
    let states: Vec<&str> = events(&lines, "job_status_change")
        .iter()
        .map(|v| v["fields"]["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        ["created", "running", "waiting", "pending", "concluded"],
        "{lines:?}"
    );
}

#[test]
fn metrics_count_failed_tls_handshakes_and_refused_connections() {
    let pki = support::tls::Pki::get();
    let addr = format!("127.0.0.1:{}", free_port());
    let psk = format!("--tls-psk={}", pki.psk().display());
    let srv = Server::start(&["--tls=require", &psk, "--metrics", &addr, "memory", "1M"]);
    let uri = |file: &Path| {
        format!(
            "nbds+unix://{}@/?socket={}&tls-psk-file={}",
            support::tls::PSK_USER,
            srv.socket.display(),
            file.display()
        )
    };
    let wrong = support::output("nbdinfo", &["--size", &uri(&pki.wrong_psk())]);
    assert!(!wrong.status.success());
    let right = support::output("nbdinfo", &["--size", &uri(&pki.psk())]);
    assert!(right.status.success());
    let (_, text) = http_get(None, Some(&addr), "/metrics");
    assert_eq!(
        sample(&text, "sluice_tls_handshakes_failed_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "sluice_connections_refused_total"),
        Some(1.0),
        "{text}"
    );
    // The harness's readiness probe, the refused client and the served one.
    assert_eq!(
        sample(&text, "sluice_connections_total"),
        Some(3.0),
        "{text}"
    );
}
