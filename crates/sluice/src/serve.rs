//! `sluice serve`: nbdkit's command line for one plugin exported over NBD.
//!
//! The order of startup is nbdkit's, because filters and plugins observe it: parameters are
//! split between the filters and the plugin, the plugin is loaded, the filter stack is built
//! over it and made ready (files opened, required parameters checked), then the sockets are
//! bound, privileges dropped, the process goes into the background, and the serving stage
//! starts the filters' threads before the first client is accepted.

use std::ffi::OsString;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use sluice_block::export::Backend;
use sluice_block::plugins::{self, ConfigArg};
use sluice_block::Plugin;
use sluice_server::{Listener, NbdServer, ServerConfig, TlsConfig, TlsMode, X509Files};

const EXAMPLES: &str = "\
Examples:
  sluice serve -U - memory 1G --run 'qemu-img info \"$uri\"'
                                   a private 1 GiB RAM disk for one command
  sluice serve -f -U /tmp/disk.sock memory size=1G
                                   serve a RAM disk on a Unix socket, in the foreground
  sluice serve -f -p 10809 file disk.img
                                   serve a file over TCP (nbd://localhost:10809/)
  sluice serve -f -r file dir=/srv/images
                                   serve each file of a directory as a read-only export

  sluice serve -f -U /tmp/d.sock data '1 2 3 @0x1000 4'
                                   run nbdkit's data plugin (any nbdkit C plugin works)
  sluice serve --dump-plugin memory
                                   show a plugin's details, as nbdkit --dump-plugin

  sluice serve -f -U /tmp/p.sock python ./plugin.py size=1G
                                   run an nbdkit Python plugin script, unmodified
  sluice serve -f -U /tmp/r.sock rbd rbd/disk1 conf=/etc/ceph/ceph.conf id=admin
                                   serve a Ceph RBD image (pool/image[@snapshot])
  sluice serve -f -U /tmp/i.sock image disk.qcow2 format=qcow2 bitmap=daily
                                   serve a disk image and its bitmap as
                                   qemu:dirty-bitmap:daily (qemu-nbd -B daily)
  sluice serve -U - --filter=log memory 1G logfile=/tmp/log --run 'qemu-img info \"$uri\"'
                                   log every request (filters: --filter=NAME --help)

Built-in plugins: memory (size=), file (file= or dir=), null (size=), pattern (size=),
image (raw or qcow2: file= format= backing= readonly= locking= bitmap=
bitmap-file=),
rbd ([pool/]image[@snap] pool= namespace= snapshot= conf= id= keyring= key= timeout=
ceph.OPTION=; see `sluice serve --dump-plugin rbd` for the librbd it loads).
`python SCRIPT` runs nbdkit Python plugin scripts (API_VERSION 1 and 2); a script can
start with `#!/usr/bin/env -S sluice serve python` to be run directly.
Other names load nbdkit's C plugins unmodified (nbdkit-NAME-plugin.so from --plugin-dir,
then /usr/local/lib/sluice/plugins, then nbdkit's plugin directory).
A bare value (`1G`, `disk.img`) sets the plugin's main parameter.";

/// sluice's own directory of nbdkit-ABI plugins, searched before nbdkit's.
pub const SLUICE_PLUGIN_DIR: &str = match option_env!("SLUICE_PLUGINDIR") {
    Some(d) => d,
    None => "/usr/local/lib/sluice/plugins",
};

/// Arguments of `sluice serve`.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct ServeArgs {
    /// Listen on this Unix socket. `-U -` makes a private socket in a temporary directory
    /// (for --run).
    #[arg(short = 'U', long = "unix", value_name = "SOCKET")]
    unix: Option<PathBuf>,

    /// Listen on this TCP port (default 10809 when no -U is given).
    #[arg(short = 'p', long = "port", value_name = "PORT")]
    port: Option<u16>,

    /// Listen on this IP address or host name only (default: all addresses).
    #[arg(
        short = 'i',
        long = "ipaddr",
        visible_alias = "ip-addr",
        value_name = "IPADDR"
    )]
    ipaddr: Option<String>,

    /// Serve read-only: writes, trims and zeroes are refused with EPERM.
    #[arg(short = 'r', long = "readonly", visible_alias = "read-only")]
    readonly: bool,

    /// The export name put in the printed URI and in $exportname for --run.
    #[arg(
        short = 'e',
        long = "exportname",
        visible_alias = "export-name",
        value_name = "EXPORTNAME"
    )]
    exportname: Option<String>,

    /// Stay in the foreground (otherwise sluice forks into the background once listening).
    #[arg(short = 'f', long = "foreground", visible_alias = "no-fork")]
    foreground: bool,

    /// Write the server's process ID to this file once it is ready for clients.
    #[arg(
        short = 'P',
        long = "pidfile",
        visible_alias = "pid-file",
        value_name = "PIDFILE"
    )]
    pidfile: Option<PathBuf>,

    /// Exit when the parent process exits (implies --foreground).
    #[arg(long = "exit-with-parent")]
    exit_with_parent: bool,

    /// Captive mode: run CMD once the server is ready, with $uri, $unixsocket, $port and
    /// $exportname set, then exit with CMD's exit status (implies --foreground).
    #[arg(long = "run", value_name = "CMD")]
    run: Option<String>,

    /// Most worker threads per connection for plugins that run requests in parallel.
    #[arg(short = 't', long = "threads", value_name = "N", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: u16,

    /// Disconnect a client that has not finished negotiating (TLS included) after SECONDS;
    /// 0 for no limit. qemu-nbd's option and default; nbdkit 1.32 has no such limit.
    #[arg(long = "handshake-limit", value_name = "SECONDS", default_value_t = 10)]
    handshake_limit: u32,

    /// Serve at most N clients at once (0: no limit, the default); further clients wait
    /// until one leaves, as with qemu-storage-daemon's max-connections. N=1 also stops
    /// advertising multi-conn. (nbdkit's `--filter=limit limit=N` refuses them instead.)
    #[arg(long = "max-connections", value_name = "N", default_value_t = 0)]
    max_connections: u32,

    /// Debug messages on stderr.
    #[arg(short = 'v', long = "verbose")]
    verbose: bool,

    /// Serve Prometheus metrics on `GET /metrics` at HOST:PORT (e.g. 127.0.0.1:9100) or on
    /// the Unix socket unix:PATH: requests, bytes, errors by errno, latency histograms and
    /// requests in flight of the export, connections open/total/refused, TLS failures.
    #[arg(long = "metrics", value_name = "HOST:PORT|unix:PATH",
          value_parser = sluice_server::metrics::MetricsAddr::parse)]
    metrics: Option<sluice_server::metrics::MetricsAddr>,

    /// Log as `text` (the default) or `json` (one object per line, with the operator events:
    /// connection open/close/refused, failed requests).
    #[arg(
        long = "log-format",
        value_name = "text|json",
        value_enum,
        default_value_t
    )]
    log_format: crate::process::LogFormat,

    /// TLS, as nbdkit: `off` refuses it; `on` (the default) offers it when credentials are
    /// found and serves plaintext clients too; `require` serves only clients that upgrade
    /// (STARTTLS), so nothing is exchanged in plaintext. Example:
    /// `sluice serve --tls=require --tls-psk=keys.psk -p 10809 file disk.img`, then
    /// `nbdinfo 'nbds://alice@localhost/?tls-psk-file=keys.psk'`.
    #[arg(long = "tls", value_name = "off|on|require", value_parser = parse_tls_mode)]
    tls: Option<TlsMode>,

    /// X.509 credentials: a directory with ca-cert.pem, server-cert.pem, server-key.pem and
    /// optionally ca-crl.pem. Default: $HOME/.pki/nbdkit or $HOME/.config/pki/nbdkit, or
    /// /etc/pki/nbdkit for root (nbdkit's directories).
    #[arg(long = "tls-certificates", value_name = "DIR")]
    tls_certificates: Option<PathBuf>,

    /// Require a client certificate signed by ca-cert.pem (and not revoked by ca-crl.pem).
    #[arg(long = "tls-verify-peer")]
    tls_verify_peer: bool,

    /// Pre-shared keys instead of certificates: psktool's `username:hexkey` lines.
    #[arg(long = "tls-psk", value_name = "FILE")]
    tls_psk: Option<PathBuf>,

    /// Print the plugin's details in nbdkit's key=value format and exit.
    #[arg(long = "dump-plugin")]
    dump_plugin: bool,

    /// Set a plugin debug flag (the integer variable NAME_debug_FLAG), as nbdkit's -D.
    #[arg(short = 'D', long = "debug", value_name = "NAME.FLAG=N")]
    debug_flags: Vec<sluice_nbdkit::DebugFlag>,

    /// Look for nbdkit-NAME-plugin.so in this directory first (repeatable); then sluice's
    /// plugin directory, then nbdkit's.
    #[arg(long = "plugin-dir", value_name = "DIR")]
    plugin_dirs: Vec<PathBuf>,

    /// Put filter NAME over the plugin (repeatable; the first given is the outermost). Its
    /// key=value parameters go beside the plugin's; `--filter=NAME --help` lists them.
    #[arg(long = "filter", value_name = "NAME")]
    filters: Vec<String>,

    #[command(flatten)]
    nbdkit: crate::compat::NbdkitOptions,

    /// The plugin: a built-in (memory, file, null, pattern, rbd), an nbdkit plugin's short name
    /// (found as nbdkit-NAME-plugin.so), or the path of an nbdkit plugin .so file.
    #[arg(value_name = "PLUGIN")]
    plugin: String,

    /// Plugin parameters, `key=value` or a bare value for the plugin's main parameter.
    #[arg(value_name = "PARAMS")]
    params: Vec<OsString>,
}

/// A user-facing failure: what to print and which exit code to use.
struct Failure {
    code: i32,
    err: anyhow::Error,
}

/// What `/metrics` shows of `sluice serve`: its one export, labelled with the plugin's name,
/// and its connections.
struct ServeMetrics(Arc<NbdServer>);

impl sluice_server::metrics::MetricsSource for ServeMetrics {
    fn collect(&self) -> sluice_server::metrics::Collected {
        let exports = match self.0.exports() {
            sluice_server::Exports::Single(b) => {
                vec![(b.plugin().name().to_string(), b.stats().snapshot())]
            }
            sluice_server::Exports::Table(_) => Vec::new(),
        };
        sluice_server::metrics::Collected {
            exports,
            connections: Some(self.0.connection_stats()),
            ..Default::default()
        }
    }
}

fn usage(err: anyhow::Error) -> Failure {
    Failure { code: 2, err }
}

pub fn main(args: ServeArgs) -> i32 {
    use std::io::IsTerminal;
    // Colours only where stderr is a terminal that stays the log's destination.
    let stays = args.foreground || args.run.is_some() || args.nbdkit.single;
    crate::process::init_logging_to(
        args.verbose,
        args.nbdkit.log.unwrap_or(crate::compat::LogTo::Stderr),
        stays && std::io::stderr().is_terminal(),
        args.log_format,
    );
    match serve(args) {
        Ok(code) => code,
        Err(f) => {
            eprintln!("sluice: {:#}", f.err);
            f.code
        }
    }
}

fn parse_params(params: &[OsString]) -> Result<Vec<ConfigArg>, Failure> {
    params
        .iter()
        .map(|p| {
            let p = p
                .to_str()
                .ok_or_else(|| usage(anyhow::anyhow!("parameter {p:?} is not valid UTF-8")))?;
            Ok(match p.split_once('=') {
                Some((k, v)) if !k.is_empty() && !k.contains('/') => ConfigArg {
                    key: Some(k.to_string()),
                    value: v.to_string(),
                },
                _ => ConfigArg {
                    key: None,
                    value: p.to_string(),
                },
            })
        })
        .collect()
}

/// Where the server listens, decided before any fork.
struct Listening {
    unix: Vec<(std::os::unix::net::UnixListener, PathBuf)>,
    tcp: Vec<std::net::TcpListener>,
    /// A private directory made for `-U -`, removed at exit.
    tempdir: Option<PathBuf>,
    /// Socket file to unlink at exit.
    socket_path: Option<PathBuf>,
    /// An inherited (socket-activated) Unix socket's path: in the URI, but not ours to unlink.
    inherited_path: Option<PathBuf>,
    activated: bool,
}

fn serve(args: ServeArgs) -> Result<i32, Failure> {
    let params = parse_params(&args.params)?;
    let (chosen, params) = crate::filters::route(&args.filters, params).map_err(|e| Failure {
        code: 1,
        err: e.into(),
    })?;
    if args.dump_plugin {
        return dump_plugin(&args, &params, &chosen);
    }
    let tls = tls_config(&args)?;
    check_nbdkit_options(&args).map_err(usage)?;
    let Loaded {
        plugin,
        python,
        rbd,
        contexts,
    } = if args.plugin == "python" {
        open_python(&params)?
    } else if args.plugin == sluice_rbd::NAME {
        open_rbd(&args, &params)?
    } else if args.plugin == "image" {
        open_image(&args, &params, &chosen)?
    } else {
        Loaded {
            plugin: open_plugin(&args, &params)?,
            python: None,
            rbd: None,
            contexts: Vec::new(),
        }
    };
    let env = sluice_block::filters::FilterEnv::default();
    let filter_failure = |e: sluice_block::BlockError| Failure {
        code: crate::filters::exit_code(&e),
        err: e.into(),
    };
    let plugin = chosen.stack(plugin, &env).map_err(filter_failure)?;
    env.lifecycle
        .ready(plugin.thread_model())
        .map_err(filter_failure)?;
    if args.nbdkit.swap {
        crate::process::lock_memory().map_err(|e| Failure { code: 1, err: e })?;
    }
    let shutdown = Arc::new(tokio::sync::Notify::new());
    let hook = shutdown.clone();
    // One hook for every plugin host (nbdkit_shutdown and nbdkit.shutdown alike).
    sluice_block::host::set_shutdown_hook(Box::new(move || hook.notify_one()));
    let single = args.nbdkit.single;
    let (listening, stdio) = if single {
        let stream = crate::process::stdio_stream().map_err(|e| Failure { code: 1, err: e })?;
        (Listening::none(), Some(stream))
    } else {
        // Sockets created meanwhile get the --selinux-label; the guard resets it.
        let label = crate::process::SocketLabel::set(args.nbdkit.selinux_label.as_deref())
            .map_err(|e| Failure { code: 1, err: e })?;
        let listening = listen(&args).map_err(usage)?;
        drop(label);
        (listening, None)
    };
    crate::process::change_user(args.nbdkit.user.as_deref(), args.nbdkit.group.as_deref())
        .map_err(|e| Failure { code: 1, err: e })?;
    let foreground = args.foreground
        || args.run.is_some()
        || args.exit_with_parent
        || listening.activated
        || single;
    let tls_mode = tls.as_ref().map_or(TlsMode::Off, TlsConfig::mode);
    let uri = uri_of(&args, &listening, tls_mode);

    let mut ready_pipe = if foreground {
        None
    } else {
        Some(crate::process::daemonize(&uri).map_err(|e| Failure { code: 1, err: e })?)
    };
    if ready_pipe.is_some() && args.nbdkit.log.is_none() {
        // As nbdkit: once in the background, messages go to the system log.
        crate::process::set_log_destination(crate::compat::LogTo::Syslog);
    }
    if let Some(p) = &python {
        p.after_fork().map_err(python_failure)?;
    }
    if let Some(r) = &rbd {
        if let Err(e) = r.connect() {
            // One line, printed by whichever process the user is waiting on.
            cleanup(
                listening.socket_path.as_deref(),
                listening.tempdir.as_deref(),
                None,
            );
            return match ready_pipe.take() {
                Some(fd) => {
                    fd.failed(&format!("sluice: {e}"));
                    Ok(1)
                }
                None => Err(Failure {
                    code: 1,
                    err: e.into(),
                }),
            };
        }
    }
    if args.exit_with_parent {
        // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag on this process.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) };
    }
    env.lifecycle
        .serving(sluice_block::filters::cli_registered::Serving {
            forked: ready_pipe.is_some() || args.run.is_some(),
        })
        .map_err(filter_failure)?;

    let mut config = ServerConfig {
        readonly: args.readonly,
        threads: args.threads as usize,
        tls,
        structured_replies: !args.nbdkit.no_sr,
        oldstyle: args.nbdkit.oldstyle,
        handshake_timeout: (args.handshake_limit > 0)
            .then(|| std::time::Duration::from_secs(u64::from(args.handshake_limit))),
        max_connections: (args.max_connections > 0).then_some(args.max_connections as usize),
        ..ServerConfig::default()
    };
    if let Some(mask) = args.nbdkit.mask_handshake {
        config.handshake_flags &= mask;
    }
    if plugin.has_allocation_depth() {
        config
            .meta_contexts
            .push(sluice_proto::nbd::CONTEXT_QEMU_ALLOCATION_DEPTH.to_string());
    }
    let backend = Arc::new(Backend::new(plugin));
    let server = NbdServer::with_contexts(backend, config, contexts);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure {
            code: 1,
            err: anyhow::anyhow!("cannot start runtime: {e}"),
        })?;
    let code = rt.block_on(async {
        let mut listeners = Vec::new();
        for (l, path) in listening.unix {
            listeners.push(
                Listener::from_std_unix(l)
                    .with_context(|| format!("listening on {}", path.display()))?,
            );
        }
        for l in listening.tcp {
            listeners.push(Listener::from_std_tcp(l).context("listening on TCP")?);
        }
        // After any fork (the endpoint's threads must be the child's), before readiness, so a
        // bad address fails the start.
        let _metrics = match &args.metrics {
            Some(addr) => Some(
                sluice_server::metrics::MetricsServer::start(
                    addr,
                    Arc::new(ServeMetrics(server.clone())),
                )
                .context("--metrics")?,
            ),
            None => None,
        };
        if let Some(pidfile) = &args.pidfile {
            crate::process::write_pidfile(pidfile)?;
        }
        match ready_pipe {
            Some(fd) => fd.ready(),
            // With -s, standard output is the client's socket. nbdkit 1.32 prints nothing
            // (tools that start it rely on that: nbdcopy's `[ CMD ]` shares its stdout).
            None if args.run.is_none() && !single && !crate::compat::invoked_as_nbdkit() => {
                let mut out = std::io::stdout();
                let _ = writeln!(out, "{uri}");
                let _ = out.flush();
            }
            None => {}
        }
        tracing::debug!("serving {uri}");

        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<i32>();
        if let Some(cmd) = &args.run {
            let child = captive_command(cmd, &uri, &args, &listening.socket_path, tls_mode)?;
            tokio::spawn(async move {
                let code = wait_captive(child).await;
                let _ = done_tx.send(code);
            });
        } else if let Some(stream) = stdio {
            // -s: the one client is on standard input; the server ends with it.
            server.clone().spawn_connection(stream);
            let s = server.clone();
            tokio::task::spawn_blocking(move || {
                while !s.wait_idle(Duration::from_secs(3600)) {}
                let _ = done_tx.send(0);
            });
        } else {
            drop(done_tx);
        }
        let run_code = Arc::new(std::sync::Mutex::new(0));
        let rc = run_code.clone();
        let stop = async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            let run_done = async {
                match done_rx.await {
                    Ok(code) => *rc.lock().unwrap_or_else(|e| e.into_inner()) = code,
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => tracing::debug!("SIGINT: shutting down"),
                _ = term.recv() => tracing::debug!("SIGTERM: shutting down"),
                _ = run_done => tracing::debug!("--run command or -s client finished"),
                _ = shutdown.notified() => tracing::debug!("plugin or filter asked for shutdown"),
            }
            // Wakes plugins sleeping in nbdkit_nanosleep / nbdkit.nanosleep.
            sluice_block::host::request_shutdown();
        };
        server.serve(listeners, stop).await;
        let s = server.clone();
        let finished = tokio::task::spawn_blocking(move || s.wait_idle(Duration::from_secs(60)))
            .await
            .unwrap_or(false);
        if !finished {
            tracing::warn!("some connections did not finish within 60 s; exiting anyway");
        }
        let code = *run_code.lock().unwrap_or_else(|e| e.into_inner());
        anyhow::Ok(code)
    });
    // Runtime tasks hold the server: drop them, then the server, so the plugin is closed
    // (nbdkit's cleanup and unload) before exit.
    drop(rt);
    drop(server);
    cleanup(
        listening.socket_path.as_deref(),
        listening.tempdir.as_deref(),
        args.pidfile.as_deref(),
    );
    code.map_err(|e| Failure { code: 1, err: e })
}

/// Removes what serving left in the file system: our socket, `-U -`'s directory, the pidfile.
fn cleanup(socket_path: Option<&Path>, tempdir: Option<&Path>, pidfile: Option<&Path>) {
    if let Some(p) = socket_path {
        let _ = std::fs::remove_file(p);
    }
    if let Some(d) = tempdir {
        let _ = std::fs::remove_dir_all(d);
    }
    if let Some(p) = pidfile {
        let _ = std::fs::remove_file(p);
    }
}

/// nbdkit options that sluice accepts but cannot honour, and combinations nbdkit refuses.
fn check_nbdkit_options(args: &ServeArgs) -> anyhow::Result<()> {
    let o = &args.nbdkit;
    if o.vsock {
        bail!("--vsock: sluice does not serve AF_VSOCK sockets; use -U (a Unix socket) or -p");
    }
    if o.single && (args.unix.is_some() || args.port.is_some()) {
        bail!("-s (serve standard input) cannot be used with -U or -p");
    }
    Ok(())
}

fn plugin_dirs(args: &ServeArgs) -> Vec<PathBuf> {
    let mut dirs = args.plugin_dirs.clone();
    dirs.push(PathBuf::from(SLUICE_PLUGIN_DIR));
    dirs.push(PathBuf::from(sluice_nbdkit::NBDKIT_PLUGIN_DIR));
    dirs
}

/// A loaded plugin, and what must run in the process that serves it (after any fork).
struct Loaded {
    plugin: Arc<dyn Plugin>,
    python: Option<Arc<sluice_python::PythonPlugin>>,
    /// librados starts threads, so the cluster connection is made after the fork.
    rbd: Option<Arc<sluice_rbd::RbdPlugin>>,
    /// Meta contexts the server answers itself (`image ... bitmap=NAME`).
    contexts: Vec<(String, Arc<dyn sluice_server::ExportContext>)>,
}

/// Configures the `rbd` plugin (`sluice serve rbd POOL/IMAGE conf=...`) without connecting.
fn open_rbd(args: &ServeArgs, params: &[ConfigArg]) -> Result<Loaded, Failure> {
    if !args.debug_flags.is_empty() {
        tracing::warn!("-D flags are ignored by built-in plugins");
    }
    let p = Arc::new(
        sluice_rbd::RbdPlugin::from_args(params, args.readonly).map_err(|e| usage(e.into()))?,
    );
    Ok(Loaded {
        plugin: p.clone(),
        python: None,
        rbd: Some(p),
        contexts: Vec::new(),
    })
}

/// Loads a Python plugin script (`sluice serve python SCRIPT [key=value...]`). Its
/// `after_fork` runs later, in the serving process, since script threads don't survive fork.
fn open_python(params: &[ConfigArg]) -> Result<Loaded, Failure> {
    let (script, rest) = sluice_python::split_script(params).map_err(|e| usage(e.into()))?;
    let p = sluice_python::load_before_fork(&script, rest).map_err(python_failure)?;
    Ok(Loaded {
        plugin: p.clone(),
        python: Some(p),
        rbd: None,
        contexts: Vec::new(),
    })
}

fn python_failure(e: sluice_python::LoadError) -> Failure {
    let code = if matches!(e, sluice_python::LoadError::Incompatible { .. }) {
        1
    } else {
        2
    };
    Failure {
        code,
        err: e.into(),
    }
}

/// Opens `sluice serve image ...`: the image node, and each `bitmap=NAME` as the context
/// `qemu:dirty-bitmap:NAME`, offered in the reverse of the command line's order as qemu-nbd
/// offers its `-B` bitmaps. Bitmaps are refused under filters: a filter may move or resize
/// what the client sees (offset, partition, truncate), and the bitmap's offsets are the image's.
fn open_image(
    args: &ServeArgs,
    params: &[ConfigArg],
    chosen: &crate::filters::Chosen,
) -> Result<Loaded, Failure> {
    let mut params = params.to_vec();
    if args.readonly {
        params.push(ConfigArg::kv("readonly", "true"));
    }
    if !chosen.filters.is_empty() && params.iter().any(|p| p.key.as_deref() == Some("bitmap")) {
        return Err(usage(anyhow::anyhow!(
            "image: bitmap= cannot be used with filters (a filter may move or resize what \
             clients see, the bitmap describes the image itself)"
        )));
    }
    let e = sluice_image::open_image_export(&params).map_err(|e| Failure {
        code: if matches!(e, sluice_image::ImageError::InvalidOption(_)) {
            2
        } else {
            1
        },
        err: e.into(),
    })?;
    let contexts = e
        .bitmaps
        .into_iter()
        .rev()
        .map(sluice_daemon::exports::bitmap_context)
        .collect();
    Ok(Loaded {
        plugin: e.node,
        python: None,
        rbd: None,
        contexts,
    })
}

/// Loads the plugin the user named: built-in first, then an nbdkit C plugin.
fn open_plugin(args: &ServeArgs, params: &[ConfigArg]) -> Result<Arc<dyn Plugin>, Failure> {
    if let Some(r) = plugins::open_builtin(&args.plugin, params) {
        // nbdkit.* flags are the server's (virt-v2v passes -D nbdkit.backend.datapath=0).
        if args.debug_flags.iter().any(|f| f.name != "nbdkit") {
            tracing::warn!("-D flags are ignored by built-in plugins");
        }
        return r.map_err(|e| usage(e.into()));
    }
    let Some(path) = sluice_nbdkit::resolve(&args.plugin, &plugin_dirs(args)) else {
        return Err(usage(anyhow::anyhow!(
            "unknown plugin '{}': not a built-in ({}) and no nbdkit-{}-plugin.so found in {}",
            args.plugin,
            plugins::builtin_names().join(", "),
            args.plugin,
            plugin_dirs(args)
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    match sluice_nbdkit::load_with(&path, params, &args.debug_flags) {
        Ok(p) => Ok(p),
        Err(e) => Err(load_failure(e)),
    }
}

/// Configuration mistakes are usage errors (exit 2); a plugin that cannot be loaded or
/// started is a failure (exit 1), as with nbdkit.
fn load_failure(e: sluice_nbdkit::LoadError) -> Failure {
    use sluice_nbdkit::LoadError as L;
    let code = match &e {
        L::NoConfig { .. } | L::BareParameter { .. } | L::DebugFlag { .. } => 2,
        L::Callback { callback, .. } if *callback == "config" || *callback == "config_complete" => {
            2
        }
        _ => 1,
    };
    Failure {
        code,
        err: e.into(),
    }
}

/// `--dump-plugin`: nbdkit's key=value description of a plugin, with the thread model of
/// the whole stack when there are filters (whose parameters are checked, as nbdkit's
/// `.config`, but which open nothing).
fn dump_plugin(
    args: &ServeArgs,
    params: &[ConfigArg],
    chosen: &crate::filters::Chosen,
) -> Result<i32, Failure> {
    let filters = chosen.thread_model().map_err(|e| Failure {
        code: crate::filters::exit_code(&e),
        err: e.into(),
    })?;
    let text = if args.plugin == "python" {
        let (script, rest) = match params.first() {
            Some(_) => {
                let (s, r) = sluice_python::split_script(params).map_err(|e| usage(e.into()))?;
                (Some(s), r)
            }
            None => (None, params),
        };
        sluice_python::dump_plugin(script.as_deref(), rest).map_err(python_failure)?
    } else if args.plugin == sluice_rbd::NAME {
        sluice_rbd::dump_plugin()
    } else if let Some(r) = plugins::open_builtin(&args.plugin, params) {
        let p = r.map_err(|e| usage(e.into()))?;
        let tm = p.thread_model().as_str();
        let mut t = format!(
            "name={}\nversion={}\napi_version=2\nmax_thread_model={tm}\nthread_model={tm}\n",
            p.name(),
            p.version().unwrap_or(env!("CARGO_PKG_VERSION")),
        );
        if let Some(key) = plugins::builtin_magic_key(p.name()) {
            t.push_str(&format!("magic_config_key={key}\n"));
        }
        for line in p.dump() {
            t.push_str(&line);
            t.push('\n');
        }
        t
    } else {
        let Some(path) = sluice_nbdkit::resolve(&args.plugin, &plugin_dirs(args)) else {
            return Err(usage(anyhow::anyhow!("unknown plugin '{}'", args.plugin)));
        };
        sluice_nbdkit::dump_plugin_with(&path, params, &args.debug_flags).map_err(load_failure)?
    };
    let text = crate::filters::dump_with_thread_model(&text, filters);
    print!("{text}");
    let _ = std::io::stdout().flush();
    Ok(0)
}

impl Listening {
    /// No socket (`-s` serves standard input).
    fn none() -> Listening {
        Listening {
            unix: Vec::new(),
            tcp: Vec::new(),
            tempdir: None,
            socket_path: None,
            inherited_path: None,
            activated: false,
        }
    }
}

/// Binds the sockets: systemd socket activation, `-U`, or TCP.
fn listen(args: &ServeArgs) -> anyhow::Result<Listening> {
    let mut l = Listening::none();
    if let Some(fds) = activation_fds()? {
        if args.unix.is_some() || args.port.is_some() {
            bail!("-U and -p cannot be used with socket activation (LISTEN_FDS)");
        }
        for fd in fds {
            // SAFETY: systemd passes us these listening sockets (LISTEN_PID is our pid); we
            // take ownership of each exactly once.
            let sock = unsafe { socket2_kind(fd) };
            match sock {
                libc::AF_UNIX => l.unix.push((
                    // SAFETY: as above; the fd is an AF_UNIX listening socket.
                    unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) },
                    PathBuf::from(format!("<fd {fd}>")),
                )),
                // SAFETY: as above; the fd is an inet listening socket.
                _ => l
                    .tcp
                    .push(unsafe { std::net::TcpListener::from_raw_fd(fd) }),
            }
        }
        l.inherited_path = l
            .unix
            .first()
            .and_then(|(u, _)| u.local_addr().ok())
            .and_then(|a| a.as_pathname().map(Path::to_path_buf));
        l.activated = true;
        return Ok(l);
    }
    if let Some(path) = &args.unix {
        if args.port.is_some() {
            bail!("-U and -p cannot be used together");
        }
        let path = if path.as_os_str() == "-" {
            let dir = make_tempdir()?;
            let p = dir.join("sluice.sock");
            l.tempdir = Some(dir);
            p
        } else {
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                use std::os::unix::fs::FileTypeExt;
                if meta.file_type().is_socket() {
                    let _ = std::fs::remove_file(path);
                }
            }
            path.clone()
        };
        let listener = std::os::unix::net::UnixListener::bind(&path)
            .with_context(|| format!("cannot listen on {}", path.display()))?;
        l.socket_path = Some(path.clone());
        l.unix.push((listener, path));
        return Ok(l);
    }
    let port = args.port.unwrap_or(10809);
    let mut addrs: Vec<SocketAddr> = match &args.ipaddr {
        // A host name binds every address it resolves to, as nbdkit's getaddrinfo loop.
        Some(host) => {
            use std::net::ToSocketAddrs;
            let mut v: Vec<SocketAddr> = (host.as_str(), port)
                .to_socket_addrs()
                .with_context(|| format!("-i {host}: cannot resolve the address"))?
                .collect();
            v.dedup();
            v
        }
        None => vec![
            SocketAddr::new(IpAddr::from([0u16; 8]), port),
            SocketAddr::new(IpAddr::from([0u8; 4]), port),
        ],
    };
    addrs.retain(|a| !(args.nbdkit.ipv4_only && a.is_ipv6()));
    addrs.retain(|a| !(args.nbdkit.ipv6_only && a.is_ipv4()));
    if addrs.is_empty() {
        bail!("no address to listen on with the address family asked for (-4/-6)");
    }
    let mut last_err = None;
    for a in addrs {
        match bind_tcp(a) {
            Ok(t) => l.tcp.push(t),
            Err(e) => last_err = Some(e.context(format!("cannot listen on {a}"))),
        }
    }
    if l.tcp.is_empty() {
        return Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no address to listen on")));
    }
    Ok(l)
}

fn bind_tcp(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    // IPv6 sockets are made v6-only so that the IPv4 wildcard can be bound beside them.
    let domain = if addr.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    // SAFETY: plain socket(2) call; the fd is owned by the TcpListener below.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: fd is a fresh socket we own.
    let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let setopt = |level, name| {
        // SAFETY: valid fd and a c_int option value that lives across the call.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    setopt(libc::SOL_SOCKET, libc::SO_REUSEADDR);
    if addr.is_ipv6() {
        setopt(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY);
    }
    let (storage, len) = sockaddr_of(addr);
    // SAFETY: storage holds a valid sockaddr of `len` bytes for this family.
    if unsafe { libc::bind(fd, &storage as *const _ as *const libc::sockaddr, len) } < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: listening on our own bound socket.
    if unsafe { libc::listen(fd, 1024) } < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(listener)
}

fn sockaddr_of(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// The address family of a socket fd.
///
/// # Safety
/// `fd` must be an open socket.
unsafe fn socket2_kind(fd: RawFd) -> libc::c_int {
    // SAFETY: sockaddr_storage is plain old data.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: the caller guarantees fd is a socket; ss/len describe a writable buffer.
    unsafe { libc::getsockname(fd, &mut ss as *mut _ as *mut libc::sockaddr, &mut len) };
    ss.ss_family as libc::c_int
}

/// systemd socket activation: fds 3.. when LISTEN_PID is us.
fn activation_fds() -> anyhow::Result<Option<Vec<RawFd>>> {
    let (Ok(pid), Ok(n)) = (std::env::var("LISTEN_PID"), std::env::var("LISTEN_FDS")) else {
        return Ok(None);
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    let n: i32 = n
        .trim()
        .parse()
        .ok()
        .filter(|n| (1..=64).contains(n))
        .ok_or_else(|| anyhow::anyhow!("LISTEN_FDS={n:?} is not a number between 1 and 64"))?;
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    Ok(Some((3..3 + n).collect()))
}

fn make_tempdir() -> anyhow::Result<PathBuf> {
    let base = std::env::var_os("TMPDIR").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    for i in 0..100u32 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = base.join(format!("sluice{}-{:x}{i}", std::process::id(), nanos));
        match std::fs::DirBuilder::new().mode_private().create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
        }
    }
    bail!("cannot create a temporary directory in {}", base.display())
}

trait PrivateDir {
    fn mode_private(&mut self) -> &mut Self;
}
impl PrivateDir for std::fs::DirBuilder {
    fn mode_private(&mut self) -> &mut Self {
        use std::os::unix::fs::DirBuilderExt;
        self.mode(0o700)
    }
}

/// The NBD URI clients use to reach this server: `nbds` when TLS is required, as nbdkit.
fn uri_of(args: &ServeArgs, l: &Listening, tls: TlsMode) -> String {
    let export = args.exportname.clone().unwrap_or_default();
    let export = uri_escape(&export);
    let scheme = if tls == TlsMode::Require {
        "nbds"
    } else {
        "nbd"
    };
    if let Some(p) = l.socket_path.as_ref().or(l.inherited_path.as_ref()) {
        return format!("{scheme}+unix:///{export}?socket={}", p.display());
    }
    let port = l
        .tcp
        .first()
        .and_then(|t| t.local_addr().ok())
        .map_or(10809, |a| a.port());
    let host = match &args.ipaddr {
        Some(h) if h.parse::<std::net::Ipv6Addr>().is_ok() => format!("[{h}]"),
        Some(h) => h.clone(),
        None => "localhost".to_string(),
    };
    format!("{scheme}://{host}:{port}/{export}")
}

fn uri_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn captive_command(
    cmd: &str,
    uri: &str,
    args: &ServeArgs,
    socket: &Option<PathBuf>,
    tls: TlsMode,
) -> anyhow::Result<tokio::process::Child> {
    let mut c = tokio::process::Command::new("/bin/sh");
    c.arg("-c").arg(cmd);
    c.env("uri", uri).env("nbd", uri);
    // nbdkit's $tls: unset without TLS, 1 for on, 2 for require.
    match tls {
        TlsMode::Off => c.env_remove("tls"),
        TlsMode::On => c.env("tls", "1"),
        TlsMode::Require => c.env("tls", "2"),
    };
    c.env("exportname", args.exportname.clone().unwrap_or_default());
    match socket {
        Some(p) => {
            c.env("unixsocket", p).env("port", "");
        }
        None => {
            c.env("unixsocket", "")
                .env("port", args.port.unwrap_or(10809).to_string());
        }
    }
    c.spawn().with_context(|| format!("cannot run {cmd:?}"))
}

async fn wait_captive(mut child: tokio::process::Child) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match child.wait().await {
        Ok(st) => st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0)),
        Err(e) => {
            tracing::error!("waiting for --run command: {e}");
            1
        }
    }
}

/// `--tls` values, as nbdkit reads them: its boolean spellings, or require (also `required`
/// and `force`).
fn parse_tls_mode(s: &str) -> Result<TlsMode, String> {
    match s.to_ascii_lowercase().as_str() {
        "require" | "required" | "force" => Ok(TlsMode::Require),
        "on" | "1" | "true" | "t" | "yes" | "y" => Ok(TlsMode::On),
        "off" | "0" | "false" | "f" | "no" | "n" => Ok(TlsMode::Off),
        _ => Err(format!("expected off, on or require, not {s:?}")),
    }
}

/// nbdkit's default certificate directories.
fn default_certificate_dirs() -> Vec<PathBuf> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return vec![PathBuf::from("/etc/pki/nbdkit")];
    }
    match std::env::var_os("HOME") {
        Some(home) => {
            let home = PathBuf::from(home);
            vec![home.join(".pki/nbdkit"), home.join(".config/pki/nbdkit")]
        }
        None => Vec::new(),
    }
}

/// The TLS settings the options ask for, as nbdkit decides them: `--tls-psk` wins over
/// certificates; without `--tls-certificates` nbdkit's directories are searched, and finding
/// nothing turns TLS off (with a warning if `--tls=on` was given, an error for `require`).
/// A credential file that is named or found but cannot be used is an error (exit 2).
fn tls_config(args: &ServeArgs) -> Result<Option<TlsConfig>, Failure> {
    let mode = args.tls.unwrap_or(TlsMode::On);
    if mode == TlsMode::Off {
        return Ok(None);
    }
    if let Some(file) = &args.tls_psk {
        return TlsConfig::psk(mode, file)
            .map(Some)
            .map_err(|e| usage(anyhow::anyhow!("--tls-psk: {e}")));
    }
    let files = match &args.tls_certificates {
        Some(dir) => X509Files::in_dir(dir),
        None => match X509Files::find(&default_certificate_dirs()) {
            Ok(files) => files,
            Err(e) if mode == TlsMode::Require => {
                return Err(usage(anyhow::anyhow!(
                    "--tls=require: {e}; give --tls-certificates DIR or --tls-psk FILE"
                )))
            }
            Err(e) => {
                if args.tls.is_some() {
                    eprintln!(
                        "sluice: warning: --tls=on: {e}; TLS is disabled and clients asking \
                         for it are refused"
                    );
                }
                return Ok(None);
            }
        },
    };
    TlsConfig::x509(mode, &files, args.tls_verify_peer)
        .map(Some)
        .map_err(|e| usage(anyhow::anyhow!("--tls-certificates: {e}")))
}
