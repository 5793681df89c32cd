//! The Prometheus endpoint (`--metrics ADDR:PORT` or `--metrics unix:PATH`): `GET /metrics`
//! answers the text exposition format (version 0.0.4) with what sluice is doing now.
//!
//! Shape: nothing here is on the request path. The NBD server counts into sharded atomics
//! ([`sluice_block::stats`], [`ConnStats`]); a scrape asks the program's [`MetricsSource`] for
//! a [`Collected`] snapshot (the exports and nodes it knows, its connections, its jobs) and
//! encodes it. The source is a trait so that `serve` (one export, no jobs) and `daemon`
//! (exports and nodes that come and go, jobs) fill it from their own state without this crate
//! knowing the daemon.
//!
//! Dependencies, and why: `prometheus-client` (the Prometheus project's own Rust client) for
//! the encoding, so names, label escaping, `_total` suffixes and histogram buckets follow the
//! format exactly; it is used through its `Collector` interface, since our figures live in our
//! own counters and are only read at scrape time. `tiny_http` serves it: a small, maintained,
//! synchronous HTTP/1.1 server with no async runtime of its own, which listens on TCP and on
//! Unix sockets alike; a scrape is rare, so one thread answering requests one by one is
//! enough, and no HTTP parsing is written here.

use std::borrow::Cow;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use sluice_block::stats::{bucket_bound_ns, Op, Snapshot};

/// Connection figures of an NBD server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnStats {
    /// Connections open now.
    pub open: u64,
    /// Connections accepted since start.
    pub total: u64,
    /// Connections ended without a session: refused by a plugin's preconnect or a failed
    /// handshake (protocol error, TLS required, TLS failure), not a client that just left.
    pub refused: u64,
    /// TLS handshakes that failed.
    pub tls_failed: u64,
}

/// One job's progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobMetric {
    pub id: String,
    /// The job type (`stream`, `mirror`, ...).
    pub kind: String,
    /// The job status (`running`, `ready`, `concluded`, ...).
    pub status: String,
    pub done: u64,
    pub total: u64,
}

/// Everything one scrape reports.
#[derive(Debug, Clone, Default)]
pub struct Collected {
    /// Per export: its name (the export id in a daemon) and its statistics.
    pub exports: Vec<(String, Snapshot)>,
    /// Per node (daemon only).
    pub nodes: Vec<(String, Snapshot)>,
    /// The NBD server's connections (None: no server running).
    pub connections: Option<ConnStats>,
    pub jobs: Vec<JobMetric>,
}

/// What a program reports at each scrape.
pub trait MetricsSource: Send + Sync + 'static {
    fn collect(&self) -> Collected;
}

/// Where the endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddr {
    Tcp(String),
    Unix(PathBuf),
}

impl MetricsAddr {
    /// `unix:PATH` or `HOST:PORT` (`[::1]:9100`, `127.0.0.1:0`).
    pub fn parse(s: &str) -> Result<MetricsAddr, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(format!("--metrics {s}: the Unix socket path is empty"));
            }
            return Ok(MetricsAddr::Unix(PathBuf::from(p)));
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(MetricsAddr::Tcp(s.to_string()))
            }
            _ => Err(format!(
                "--metrics {s}: expected HOST:PORT (e.g. 127.0.0.1:9100) or unix:PATH"
            )),
        }
    }
}

/// The running endpoint; dropping it stops the server thread.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    unix_path: Option<PathBuf>,
    /// The TCP address really bound (with the port chosen for port 0).
    pub local_addr: Option<std::net::SocketAddr>,
}

impl MetricsServer {
    /// Binds `addr` and serves `GET /metrics` from `source` on a thread of its own.
    pub fn start(addr: &MetricsAddr, source: Arc<dyn MetricsSource>) -> io::Result<MetricsServer> {
        let server = match addr {
            MetricsAddr::Tcp(a) => tiny_http::Server::http(a.as_str()),
            MetricsAddr::Unix(p) => {
                if std::fs::symlink_metadata(p)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                {
                    let _ = std::fs::remove_file(p);
                }
                tiny_http::Server::http_unix(p)
            }
        }
        .map_err(|e| io::Error::other(format!("cannot listen for --metrics: {e}")))?;
        let server = Arc::new(server);
        let local_addr = server.server_addr().to_ip();
        let s = server.clone();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for req in s.incoming_requests() {
                    respond(req, &*source);
                }
            })?;
        Ok(MetricsServer {
            server,
            thread: Some(thread),
            unix_path: match addr {
                MetricsAddr::Unix(p) => Some(p.clone()),
                MetricsAddr::Tcp(_) => None,
            },
            local_addr,
        })
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn respond(req: tiny_http::Request, source: &dyn MetricsSource) {
    let path = req.url().split('?').next().unwrap_or("");
    let (code, body, ctype) =
        if *req.method() != tiny_http::Method::Get && *req.method() != tiny_http::Method::Head {
            (405, "only GET is served\n".to_string(), "text/plain")
        } else if path == "/metrics" {
            match encode(&source.collect()) {
                Ok(text) => (
                    200,
                    text,
                    prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                ),
                Err(_) => (500, "encoding failed\n".to_string(), "text/plain"),
            }
        } else {
            (404, "see /metrics\n".to_string(), "text/plain")
        };
    let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], ctype.as_bytes())
        .expect("a static header is valid");
    let resp = tiny_http::Response::from_string(body)
        .with_status_code(code)
        .with_header(header);
    if let Err(e) = req.respond(resp) {
        tracing::debug!("metrics: cannot answer a scrape: {e}");
    }
}

/// The exposition text of one snapshot.
pub fn encode(c: &Collected) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("sluice");
    registry.register_collector(Box::new(Snap(c.clone())));
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
    Ok(out)
}

/// A [`Collected`] as a prometheus-client collector.
#[derive(Debug)]
struct Snap(Collected);

type Labels<'a> = Vec<(&'static str, Cow<'a, str>)>;

/// The name of an errno, for a label (`EIO`); unusual ones as `errno_N`.
pub fn errno_name(e: i32) -> Cow<'static, str> {
    Cow::Borrowed(match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::ERANGE => "ERANGE",
        libc::EDQUOT => "EDQUOT",
        libc::ENOTSUP => "ENOTSUP",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::ESHUTDOWN => "ESHUTDOWN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNRESET => "ECONNRESET",
        _ => return Cow::Owned(format!("errno_{e}")),
    })
}

/// The request families of exports (`key` = "export", no infix) or nodes ("node", "node_").
fn encode_io(
    enc: &mut DescriptorEncoder,
    key: &'static str,
    infix: &str,
    entries: &[(String, Snapshot)],
) -> Result<(), std::fmt::Error> {
    let name = |n: &str| format!("{infix}{n}");
    let n = name("requests");
    let mut m = enc.encode_descriptor(
        &n,
        "NBD requests finished, by operation and result (ok, failed, invalid)",
        None,
        MetricType::Counter,
    )?;
    for (id, s) in entries {
        for op in Op::ALL {
            let o = s.op(op);
            for (result, v) in [("ok", o.ok), ("failed", o.failed), ("invalid", o.invalid)] {
                let l: Labels = vec![
                    (key, Cow::Borrowed(id.as_str())),
                    ("op", op.name().into()),
                    ("result", result.into()),
                ];
                m.encode_family(&l)?
                    .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
            }
        }
    }
    let n = name("request_bytes");
    let mut m = enc.encode_descriptor(
        &n,
        "Bytes of successful NBD requests (read, written, zeroed, trimmed, cached, queried)",
        None,
        MetricType::Counter,
    )?;
    for (id, s) in entries {
        for op in Op::ALL {
            if op == Op::Flush {
                continue;
            }
            let l: Labels = vec![(key, id.as_str().into()), ("op", op.name().into())];
            m.encode_family(&l)?
                .encode_counter::<NoLabelSet, _, u64>(&s.op(op).bytes, None)?;
        }
    }
    let n = name("request_errors");
    let mut m = enc.encode_descriptor(
        &n,
        "Failed or invalid NBD requests by operation and errno",
        None,
        MetricType::Counter,
    )?;
    for (id, s) in entries {
        for ((op, errno), v) in &s.errors {
            let l: Labels = vec![
                (key, id.as_str().into()),
                ("op", op.name().into()),
                ("errno", errno_name(*errno)),
            ];
            m.encode_family(&l)?
                .encode_counter::<NoLabelSet, _, u64>(v, None)?;
        }
    }
    let n = name("request_duration_seconds");
    let mut m = enc.encode_descriptor(
        &n,
        "Time to serve successful NBD requests",
        None,
        MetricType::Histogram,
    )?;
    for (id, s) in entries {
        for op in Op::ALL {
            let o = s.op(op);
            let buckets: Vec<(f64, u64)> = o
                .buckets
                .iter()
                .enumerate()
                .map(|(i, &c)| {
                    let le = bucket_bound_ns(i).map_or(f64::INFINITY, |ns| ns as f64 / 1e9);
                    (le, c)
                })
                .collect();
            let l: Labels = vec![(key, id.as_str().into()), ("op", op.name().into())];
            m.encode_family(&l)?.encode_histogram::<NoLabelSet>(
                o.time_ns as f64 / 1e9,
                o.ok,
                &buckets,
                None,
            )?;
        }
    }
    let n = name("requests_in_flight");
    let mut m =
        enc.encode_descriptor(&n, "NBD requests being served now", None, MetricType::Gauge)?;
    for (id, s) in entries {
        let l: Labels = vec![(key, id.as_str().into())];
        m.encode_family(&l)?.encode_gauge(&s.in_flight())?;
    }
    let n = name("write_highest_offset_bytes");
    let mut m = enc.encode_descriptor(
        &n,
        "End of the highest write, zero or trim (QEMU's wr_highest_offset)",
        None,
        MetricType::Gauge,
    )?;
    for (id, s) in entries {
        let l: Labels = vec![(key, id.as_str().into())];
        m.encode_family(&l)?.encode_gauge(&s.wr_highest_offset)?;
    }
    Ok(())
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    ty: MetricType,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, ty)?;
    match ty {
        MetricType::Counter => m.encode_counter::<NoLabelSet, _, u64>(&v, None),
        _ => m.encode_gauge(&v),
    }
}

impl Collector for Snap {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = &self.0;
        {
            let mut m =
                enc.encode_descriptor("build", "sluice's version", None, MetricType::Info)?;
            let l: Labels = vec![("version", env!("CARGO_PKG_VERSION").into())];
            m.encode_info(&l)?;
        }
        encode_io(&mut enc, "export", "", &c.exports)?;
        if !c.nodes.is_empty() {
            encode_io(&mut enc, "node", "node_", &c.nodes)?;
        }
        if let Some(cs) = c.connections {
            gauge(
                &mut enc,
                "connections_open",
                "NBD connections open now",
                MetricType::Gauge,
                cs.open,
            )?;
            gauge(
                &mut enc,
                "connections",
                "NBD connections accepted",
                MetricType::Counter,
                cs.total,
            )?;
            gauge(
                &mut enc,
                "connections_refused",
                "NBD connections refused (preconnect, failed or refused handshake)",
                MetricType::Counter,
                cs.refused,
            )?;
            gauge(
                &mut enc,
                "tls_handshakes_failed",
                "TLS handshakes that failed",
                MetricType::Counter,
                cs.tls_failed,
            )?;
        }
        if !c.jobs.is_empty() {
            for (name, help, pick) in [
                (
                    "job_bytes_done",
                    "Bytes a job has done (its current-progress)",
                    (|j: &JobMetric| j.done) as fn(&JobMetric) -> u64,
                ),
                (
                    "job_bytes_total",
                    "Bytes a job expects to do (its total-progress)",
                    |j: &JobMetric| j.total,
                ),
            ] {
                let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
                for j in &c.jobs {
                    let l: Labels = vec![
                        ("job", j.id.as_str().into()),
                        ("type", j.kind.as_str().into()),
                    ];
                    m.encode_family(&l)?.encode_gauge(&pick(j))?;
                }
            }
            let mut m = enc.encode_descriptor(
                "job_state",
                "1 for a job's current status",
                None,
                MetricType::Gauge,
            )?;
            for j in &c.jobs {
                let l: Labels = vec![
                    ("job", j.id.as_str().into()),
                    ("type", j.kind.as_str().into()),
                    ("state", j.status.as_str().into()),
                ];
                m.encode_family(&l)?.encode_gauge(&1u64)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_block::stats::Outcome;
    use sluice_block::{BlockStats, Errno};

    fn sample() -> Collected {
        let s = BlockStats::new();
        s.start();
        s.record(Op::Write, 4096, 4096, 0, 1500, Outcome::Ok);
        s.start();
        s.record(Op::Read, 512, 512, 0, 10, Outcome::Failed(Errno::EIO));
        Collected {
            exports: vec![("disk \"a\"".into(), s.snapshot())],
            nodes: vec![],
            connections: Some(ConnStats {
                open: 1,
                total: 3,
                refused: 1,
                tls_failed: 0,
            }),
            jobs: vec![JobMetric {
                id: "j0".into(),
                kind: "stream".into(),
                status: "running".into(),
                done: 10,
                total: 100,
            }],
        }
    }

    #[test]
    fn encode_writes_counters_histograms_and_escaped_labels() {
        let text = encode(&sample()).unwrap();
        assert!(text.contains(
            "sluice_requests_total{export=\"disk \\\"a\\\"\",op=\"write\",result=\"ok\"} 1\n"
        ));
        assert!(text.contains(
            "sluice_request_errors_total{export=\"disk \\\"a\\\"\",op=\"read\",errno=\"EIO\"} 1\n"
        ));
        assert!(text.contains("# TYPE sluice_request_duration_seconds histogram"));
        // 1500 ns is in the bucket below 2048 ns.
        assert!(text.contains(
            "sluice_request_duration_seconds_bucket{export=\"disk \\\"a\\\"\",op=\"write\",le=\"2.048e-06\"} 1\n"
        ), "{text}");
        assert!(text.contains("sluice_connections_total 3\n"));
        assert!(text.contains("sluice_job_bytes_total{job=\"j0\",type=\"stream\"} 100\n"));
        assert!(text.contains("sluice_build_info{version="));
    }

    #[test]
    fn metrics_addr_parses_tcp_and_unix_and_names_bad_values() {
        assert_eq!(
            MetricsAddr::parse("127.0.0.1:9100").unwrap(),
            MetricsAddr::Tcp("127.0.0.1:9100".into())
        );
        assert_eq!(
            MetricsAddr::parse("unix:/tmp/m.sock").unwrap(),
            MetricsAddr::Unix("/tmp/m.sock".into())
        );
        for bad in ["9100", "host:", "host:99999", "unix:"] {
            let e = MetricsAddr::parse(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn errno_names_known_and_unknown() {
        assert_eq!(errno_name(libc::EIO), "EIO");
        assert_eq!(errno_name(9999), "errno_9999");
    }
}
