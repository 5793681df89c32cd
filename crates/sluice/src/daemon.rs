//! `sluice daemon`: qemu-storage-daemon's command line over sluice's QMP daemon.
//!
//! The options are qsd's (`--blockdev`, `--nbd-server`, `--export`, `--chardev` +
//! `--monitor`, `--pidfile`, `--daemonize`) with the same keyval syntax, parsed by the
//! generated QAPI parsers in keyval mode, so a qsd command line works after changing the
//! program name. `--qmp PATH` is a shortcut for a monitor on a Unix socket, `--compat` is
//! QEMU's `-compat`. Everything is checked before anything starts (bad options exit 2);
//! then nodes, the NBD server, exports and monitors are set up in that order, so that once a
//! monitor socket accepts clients, everything the command line asked for exists. Failures at
//! that stage exit 1. The daemon runs until `quit`, SIGINT or SIGTERM, and exits 0.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Args;
use serde_json::Value;
use sluice_block::plugins::{self, ConfigArg};
use sluice_block::Plugin;

use crate::process;
use sluice_daemon::generated::{
    BlockExportOptions, BlockdevDriver, BlockdevOptions, CompatPolicy as CompatOptions,
    CompatPolicyInput, CompatPolicyOutput, NbdServerOptions, ObjectOptions, ShutdownCause,
};
use sluice_daemon::graph::filters::ThrottleDriver;
use sluice_daemon::graph::rbd::RbdDriver;
use sluice_daemon::graph::{DriverRegistry, PluginLoader};
use sluice_daemon::objects::Objects;
use sluice_daemon::{Daemon, DaemonConfig, MonitorListener};
use sluice_qapi::runtime::{CompatPolicy, Input, InputPolicy, OutputPolicy};

const EXAMPLES: &str = "\
Examples:
  sluice daemon --qmp /tmp/qmp.sock
                     a daemon managed over QMP only (e.g. with qemu.qmp's qmp-shell)

  sluice daemon \\
      --blockdev driver=file,node-name=disk,filename=disk.img \\
      --nbd-server addr.type=unix,addr.path=/tmp/nbd.sock \\
      --export type=nbd,id=exp0,node-name=disk,name=disk,writable=on \\
      --chardev socket,id=qmp0,path=/tmp/qmp.sock,server=on,wait=off \\
      --monitor chardev=qmp0
                     qemu-storage-daemon's spelling: export a file over NBD, with a monitor

  sluice daemon --blockdev driver=sluice-plugin,node-name=ram,plugin=memory,params.0=size=1G \\
      --nbd-server addr.type=inet,addr.host=127.0.0.1,addr.port=10809 \\
      --export nbd,id=e,node-name=ram,writable=on
                     any sluice plugin as a node (nbdkit C plugins and python scripts too)

Block node drivers: file, raw, qcow2, null-co, null-aio, rbd, sluice-plugin. Options take the names and values of QMP's blockdev-add,
block-export-add and nbd-server-start; nested members are dotted (cache.direct=off), lists are
numbered (params.0=...), and a literal comma is written ',,'. --blockdev also takes JSON.";

/// Arguments of `sluice daemon`.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct DaemonArgs {
    /// Add a block node, with the options of QMP blockdev-add as key=value pairs (or as JSON).
    #[arg(long = "blockdev", value_name = "OPTIONS")]
    blockdev: Vec<String>,

    /// Create an object, with the options of QMP object-add: tls-creds-x509,id=ID,
    /// endpoint=server,dir=DIR[,verify-peer=on|off]; tls-creds-psk,id=ID,endpoint=server,
    /// dir=DIR (keys.psk); authz-simple,id=ID,identity=NAME; authz-list,id=ID[,policy=allow|deny]
    /// [,rules.N.match=M,rules.N.policy=P[,rules.N.format=exact|glob]]; secret,id=ID,
    /// data=TEXT|file=PATH[,format=raw|base64]. Objects are created before the nodes.
    #[arg(long = "object", value_name = "OPTIONS")]
    object: Vec<String>,

    /// Start the NBD server: addr.type=unix,addr.path=PATH or
    /// addr.type=inet,addr.host=HOST,addr.port=PORT.
    #[arg(long = "nbd-server", value_name = "OPTIONS")]
    nbd_server: Vec<String>,

    /// Export a node: type=nbd,id=ID,node-name=NODE[,name=NAME][,description=TEXT][,writable=on].
    #[arg(long = "export", value_name = "OPTIONS")]
    export: Vec<String>,

    /// A character device for a monitor: socket,id=ID,path=PATH,server=on,wait=off (or
    /// host=HOST,port=PORT instead of path for TCP).
    #[arg(long = "chardev", value_name = "OPTIONS")]
    chardev: Vec<String>,

    /// A QMP monitor on a chardev: [chardev=]ID[,mode=control].
    #[arg(long = "monitor", value_name = "OPTIONS")]
    monitor: Vec<String>,

    /// A QMP monitor on a Unix socket (shortcut for --chardev and --monitor).
    #[arg(long = "qmp", value_name = "PATH")]
    qmp: Vec<PathBuf>,

    /// Write the daemon's process ID to this file once it is ready (removed at exit).
    #[arg(long = "pidfile", value_name = "PATH")]
    pidfile: Option<PathBuf>,

    /// Run in the background; the command returns once the daemon is ready.
    #[arg(long = "daemonize")]
    daemonize: bool,

    /// Policy for deprecated and unstable interfaces, as QEMU's -compat:
    /// deprecated-input=accept|reject|crash,deprecated-output=accept|hide (and unstable-*).
    #[arg(long = "compat", value_name = "POLICY")]
    compat: Option<String>,

    /// Look for nbdkit-NAME-plugin.so in this directory first (for sluice-plugin nodes).
    #[arg(long = "plugin-dir", value_name = "DIR")]
    plugin_dirs: Vec<PathBuf>,

    /// Debug messages on stderr.
    #[arg(short = 'v', long = "verbose")]
    verbose: bool,

    /// Serve Prometheus metrics on `GET /metrics` at HOST:PORT (e.g. 127.0.0.1:9100) or on
    /// the Unix socket unix:PATH: per export and per node requests, bytes, errors, latency
    /// histograms and requests in flight; NBD connections; every job's progress and state.
    #[arg(long = "metrics", value_name = "HOST:PORT|unix:PATH",
          value_parser = sluice_server::metrics::MetricsAddr::parse)]
    metrics: Option<sluice_server::metrics::MetricsAddr>,

    /// Log as `text` (the default) or `json` (one object per line, with the operator events:
    /// connection open/close/refused, failed requests, job state changes, QMP commands).
    #[arg(
        long = "log-format",
        value_name = "text|json",
        value_enum,
        default_value_t
    )]
    log_format: process::LogFormat,
}

/// A monitor socket to create.
#[derive(Debug)]
enum Chardev {
    Unix(PathBuf),
    Tcp(String, u16),
}

/// Everything the command line asked for, checked.
#[derive(Debug)]
struct Plan {
    policy: CompatPolicy,
    /// With the text they were given as, for messages.
    objects: Vec<(String, ObjectOptions)>,
    blockdevs: Vec<BlockdevOptions>,
    nbd: Option<NbdServerOptions>,
    exports: Vec<BlockExportOptions>,
    monitors: Vec<Chardev>,
}

pub fn main(args: DaemonArgs) -> i32 {
    process::init_logging(args.verbose, args.log_format);
    let plan = match plan(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("sluice daemon: {e:#}");
            return 2;
        }
    };
    let mut ready = if args.daemonize {
        match process::daemonize("") {
            Ok(fd) => Some(fd),
            Err(e) => {
                eprintln!("sluice daemon: {e:#}");
                return 1;
            }
        }
    } else {
        None
    };
    match run(&args, plan, &mut ready) {
        Ok(()) => 0,
        Err(e) => {
            let msg = format!("sluice daemon: {e:#}");
            match ready.take() {
                Some(fd) => fd.failed(&msg),
                None => eprintln!("{msg}"),
            }
            1
        }
    }
}

/// Reads an option value: JSON if it starts with `{`, else keyval.
fn option_value(opt: &str, text: &str, implied: Option<&str>) -> anyhow::Result<(Value, bool)> {
    if text.trim_start().starts_with('{') {
        let v: Value =
            serde_json::from_str(text).with_context(|| format!("{opt} {text}: not valid JSON"))?;
        return Ok((v, false));
    }
    let v = sluice_qapi::keyval::parse(text, implied).map_err(|e| anyhow!("{opt} {text}: {e}"))?;
    Ok((v, true))
}

/// Reads `text` as the QAPI type `T` (generated parsers, keyval or JSON mode).
fn typed<T>(
    opt: &str,
    text: &str,
    implied: Option<&str>,
    policy: &CompatPolicy,
    read: impl FnOnce(
        &mut Input<'_>,
        &serde_json::Map<String, Value>,
    ) -> Result<T, sluice_daemon::QmpError>,
) -> anyhow::Result<T> {
    let (v, keyval) = option_value(opt, text, implied)?;
    let Value::Object(obj) = v else {
        bail!("{opt} {text}: expected an object");
    };
    let mut inp = if keyval {
        Input::keyval(policy)
    } else {
        Input::json(policy)
    };
    read(&mut inp, &obj).map_err(|e| anyhow!("{opt} {text}: {}", e.desc))
}

fn plan(args: &DaemonArgs) -> anyhow::Result<Plan> {
    let policy = match &args.compat {
        None => CompatPolicy::default(),
        Some(text) => {
            let c: CompatOptions = typed(
                "--compat",
                text,
                None,
                &CompatPolicy::default(),
                CompatOptions::from_args,
            )?;
            let input = |p: Option<CompatPolicyInput>| match p {
                None | Some(CompatPolicyInput::Accept) => InputPolicy::Accept,
                Some(CompatPolicyInput::Reject) => InputPolicy::Reject,
                Some(CompatPolicyInput::Crash) => InputPolicy::Crash,
            };
            let output = |p: Option<CompatPolicyOutput>| match p {
                None | Some(CompatPolicyOutput::Accept) => OutputPolicy::Accept,
                Some(CompatPolicyOutput::Hide) => OutputPolicy::Hide,
            };
            CompatPolicy {
                deprecated_input: input(c.deprecated_input),
                deprecated_output: output(c.deprecated_output),
                unstable_input: input(c.unstable_input),
                unstable_output: output(c.unstable_output),
            }
        }
    };
    let mut objects = Vec::new();
    for o in &args.object {
        let opts = typed(
            "--object",
            o,
            Some("qom-type"),
            &policy,
            ObjectOptions::from_args,
        )?;
        objects.push((o.clone(), opts));
    }
    let mut blockdevs = Vec::new();
    for b in &args.blockdev {
        blockdevs.push(typed(
            "--blockdev",
            b,
            None,
            &policy,
            BlockdevOptions::from_args,
        )?);
    }
    if args.nbd_server.len() > 1 {
        bail!("--nbd-server can be given only once");
    }
    let nbd = match args.nbd_server.first() {
        Some(t) => Some(typed(
            "--nbd-server",
            t,
            None,
            &policy,
            NbdServerOptions::from_args,
        )?),
        None => None,
    };
    let mut exports = Vec::new();
    for e in &args.export {
        exports.push(typed(
            "--export",
            e,
            Some("type"),
            &policy,
            BlockExportOptions::from_args,
        )?);
    }
    let mut chardevs: Vec<(String, Chardev)> = Vec::new();
    for c in &args.chardev {
        let (id, dev) = chardev(c)?;
        if chardevs.iter().any(|(i, _)| *i == id) {
            bail!("--chardev {c}: duplicate chardev id '{id}'");
        }
        chardevs.push((id, dev));
    }
    let mut monitors = Vec::new();
    for m in &args.monitor {
        let id = monitor(m)?;
        let Some(i) = chardevs.iter().position(|(c, _)| *c == id) else {
            bail!("--monitor {m}: chardev '{id}' not found (define it with --chardev)");
        };
        monitors.push(chardevs.remove(i).1);
    }
    if let Some((id, _)) = chardevs.first() {
        bail!("--chardev id={id}: not used by any --monitor");
    }
    monitors.extend(args.qmp.iter().map(|p| Chardev::Unix(p.clone())));
    Ok(Plan {
        policy,
        objects,
        blockdevs,
        nbd,
        exports,
        monitors,
    })
}

/// `--chardev socket,id=ID,path=PATH|host=H,port=P,server=on,wait=off`.
fn chardev(text: &str) -> anyhow::Result<(String, Chardev)> {
    let v = sluice_qapi::keyval::parse(text, Some("backend"))
        .map_err(|e| anyhow!("--chardev {text}: {e}"))?;
    let Value::Object(m) = v else {
        unreachable!("keyval gives an object")
    };
    let get = |k: &str| m.get(k).and_then(Value::as_str);
    let fail = |why: String| anyhow!("--chardev {text}: {why}");
    for k in m.keys() {
        if !["backend", "id", "path", "host", "port", "server", "wait"].contains(&k.as_str()) {
            return Err(fail(format!("parameter '{k}' is not supported")));
        }
    }
    if get("backend") != Some("socket") {
        return Err(fail("only socket chardevs are supported".into()));
    }
    let id = get("id").ok_or_else(|| fail("Parameter 'id' is missing".into()))?;
    if !matches!(get("server"), Some("on" | "yes" | "true")) {
        return Err(fail(
            "a monitor socket must be a server: add server=on".into(),
        ));
    }
    if matches!(get("wait"), Some("on" | "yes" | "true")) {
        return Err(fail("wait=on is not supported: use wait=off".into()));
    }
    let dev = match (get("path"), get("host"), get("port")) {
        (Some(p), None, None) => Chardev::Unix(PathBuf::from(p)),
        (None, Some(h), Some(p)) => Chardev::Tcp(
            h.to_string(),
            p.parse()
                .map_err(|_| fail(format!("port '{p}' is not a number from 0 to 65535")))?,
        ),
        _ => return Err(fail("give either path=PATH or host=HOST,port=PORT".into())),
    };
    Ok((id.to_string(), dev))
}

/// `--monitor [chardev=]ID[,mode=control][,pretty=off]`: the chardev id.
fn monitor(text: &str) -> anyhow::Result<String> {
    let v = sluice_qapi::keyval::parse(text, Some("chardev"))
        .map_err(|e| anyhow!("--monitor {text}: {e}"))?;
    let Value::Object(m) = v else {
        unreachable!("keyval gives an object")
    };
    let get = |k: &str| m.get(k).and_then(Value::as_str);
    for k in m.keys() {
        if !["chardev", "mode", "pretty"].contains(&k.as_str()) {
            bail!("--monitor {text}: parameter '{k}' is not supported");
        }
    }
    if !matches!(get("mode"), None | Some("control")) {
        bail!("--monitor {text}: only mode=control (QMP) is supported");
    }
    if !matches!(get("pretty"), None | Some("off" | "no" | "false")) {
        bail!("--monitor {text}: pretty=on is not supported");
    }
    get("chardev")
        .map(str::to_string)
        .ok_or_else(|| anyhow!("--monitor {text}: Parameter 'chardev' is missing"))
}

/// Loads `sluice-plugin` nodes the way `sluice serve` finds plugins: built-in first, then
/// nbdkit C plugins (`python` is nbdkit's Python plugin, taking the script as first parameter).
struct CliLoader {
    dirs: Vec<PathBuf>,
}

impl PluginLoader for CliLoader {
    fn load(&self, name: &str, params: &[ConfigArg]) -> Result<Arc<dyn Plugin>, String> {
        if let Some(r) = plugins::open_builtin(name, params) {
            return r.map_err(|e| e.to_string());
        }
        let Some(path) = sluice_nbdkit::resolve(name, &self.dirs) else {
            return Err(format!(
                "not a built-in plugin ({}) and no nbdkit-{name}-plugin.so in {}",
                plugins::builtin_names().join(", "),
                self.dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        sluice_nbdkit::load(&path, params).map_err(|e| e.to_string())
    }
}

fn run(
    args: &DaemonArgs,
    plan: Plan,
    ready: &mut Option<process::Readiness>,
) -> anyhow::Result<()> {
    let mut dirs = args.plugin_dirs.clone();
    dirs.push(PathBuf::from(crate::serve::SLUICE_PLUGIN_DIR));
    dirs.push(PathBuf::from(sluice_nbdkit::NBDKIT_PLUGIN_DIR));
    let loader: Arc<dyn PluginLoader> = Arc::new(CliLoader { dirs });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // The rbd driver reads `key-secret` from the daemon's object table.
    let objects: Arc<Objects> = Arc::default();
    let mut drivers = DriverRegistry::builtin(loader);
    drivers.register(
        BlockdevDriver::Rbd,
        Arc::new(RbdDriver::new(objects.clone())),
    );
    // Throttle nodes share the daemon's throttle-group objects.
    drivers.register(
        BlockdevDriver::Throttle,
        Arc::new(ThrottleDriver::new(objects.clone())),
    );
    let daemon = Daemon::new(DaemonConfig {
        policy: plan.policy,
        drivers,
        objects,
        nbd: sluice_server::ServerConfig::default(),
    });
    let hook = daemon.clone();
    sluice_nbdkit::set_shutdown_hook(Box::new(move || hook.shutdown(ShutdownCause::HostError)));
    let mut sockets: Vec<PathBuf> = Vec::new();
    let result = rt.block_on(async {
        for (text, o) in &plan.objects {
            daemon
                .object_add(o)
                .map_err(|e| anyhow!("--object {text}: {}", e.desc))?;
        }
        for b in &plan.blockdevs {
            let name = b.node_name.as_deref().unwrap_or("");
            daemon
                .blockdev_add(b)
                .map_err(|e| anyhow!("--blockdev node-name={name}: {}", e.desc))?;
        }
        if let Some(n) = &plan.nbd {
            daemon.nbd_server_start(n).map_err(|e| {
                anyhow!(
                    "--nbd-server {}: {}",
                    sluice_daemon::exports::describe(&n.addr),
                    e.desc
                )
            })?;
        }
        for e in &plan.exports {
            daemon
                .block_export_add(e)
                .map_err(|err| anyhow!("--export id={}: {}", e.id, err.desc))?;
        }
        for m in &plan.monitors {
            let l = match m {
                Chardev::Unix(p) => {
                    let l = tokio::net::UnixListener::bind(p)
                        .with_context(|| format!("cannot listen on {}", p.display()))?;
                    sockets.push(p.clone());
                    MonitorListener::Unix(l, p.clone())
                }
                Chardev::Tcp(h, port) => MonitorListener::Tcp(
                    tokio::net::TcpListener::bind((h.as_str(), *port))
                        .await
                        .with_context(|| format!("cannot listen on {h}:{port}"))?,
                ),
            };
            daemon.spawn_monitor_listener(l);
        }
        let _metrics = match &args.metrics {
            Some(addr) => Some(
                sluice_server::metrics::MetricsServer::start(addr, daemon.clone())
                    .context("--metrics")?,
            ),
            None => None,
        };
        if let Some(p) = &args.pidfile {
            process::write_pidfile(p)?;
        }
        if let Some(fd) = ready.take() {
            fd.ready();
        }
        tracing::debug!("daemon ready");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot handle SIGTERM")?;
        let cause = tokio::select! {
            c = daemon.wait_shutdown() => c,
            _ = tokio::signal::ctrl_c() => ShutdownCause::HostSignal,
            _ = term.recv() => ShutdownCause::HostSignal,
        };
        daemon.shutdown(cause);
        sluice_nbdkit::request_shutdown();
        if !daemon.finish(Duration::from_secs(10)).await {
            tracing::warn!("some clients did not finish within 10 s; exiting anyway");
        }
        anyhow::Ok(())
    });
    if result.is_err() {
        daemon.shutdown(ShutdownCause::HostError);
    }
    drop(rt);
    for p in &sockets {
        let _ = std::fs::remove_file(p);
    }
    if let Some(p) = &args.pidfile {
        if result.is_ok() {
            let _ = std::fs::remove_file(p);
        }
    }
    result
}
