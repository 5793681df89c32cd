//! The `sluice` command: parses the command line and wires plugins, listeners and servers.
//!
//! All policy lives in the library crates; this file only turns user input into calls and
//! errors into one clear line and an exit code (2 for bad usage or configuration, 1 for
//! failures at run time).

mod daemon;
mod process;
mod qmp_client;
mod serve;

use clap::{Parser, Subcommand};

/// sluice: a block-storage server for virtualization.
///
/// It exports disks over NBD (the Network Block Device protocol) to qemu, qemu-img,
/// nbdinfo, nbdcopy, nbdsh and the Linux kernel, from built-in plugins (memory, file, null,
/// pattern). Its command line follows nbdkit's, so `nbdkit -U sock memory 1G` becomes
/// `sluice serve -U sock memory 1G`.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about, long_about, propagate_version = true)]
struct Cli {
    /// Print sluice's build configuration in nbdkit's key=value format and exit.
    #[arg(long = "dump-config")]
    dump_config: bool,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Export a plugin over NBD (like nbdkit).
    Serve(serve::ServeArgs),
    /// Run a block-storage daemon managed over QMP (like qemu-storage-daemon).
    Daemon(daemon::DaemonArgs),
    /// Run one QMP command against a daemon (sluice's or qemu-storage-daemon), follow its
    /// events, or wait for a job with a progress bar.
    Qmp(qmp_client::QmpArgs),
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => usage_error(e),
    };
    if cli.dump_config {
        print!("{}", dump_config());
        std::process::exit(0);
    }
    let code = match cli.command {
        Some(Command::Serve(args)) => serve::main(args),
        Some(Command::Daemon(args)) => daemon::main(args),
        Some(Command::Qmp(args)) => qmp_client::main(args),
        None => {
            use clap::CommandFactory;
            let _ = Cli::command().print_help();
            2
        }
    };
    std::process::exit(code);
}

/// `--dump-config`: what scripts that parse `nbdkit --dump-config` look for.
fn dump_config() -> String {
    let version = env!("CARGO_PKG_VERSION");
    let mut parts = version.split('.');
    let major = parts.next().unwrap_or("0");
    let minor = parts.next().unwrap_or("0");
    let binary = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "sluice".into());
    format!(
        "binary={binary}\nexit_with_parent=yes\nhost_cpu={}\nhost_os={}\nname=sluice\n\
         nbdkit_api_version=2\nnbdkit_plugindir={}\nplugindir={}\ntls=no\nversion={version}\n\
         version_major={major}\nversion_minor={minor}\n",
        std::env::consts::ARCH,
        std::env::consts::OS,
        sluice_nbdkit::NBDKIT_PLUGIN_DIR,
        serve::SLUICE_PLUGIN_DIR,
    )
}

/// Help and version go to stdout as clap prints them; any other command-line mistake is one
/// line on stderr, `sluice: ...`, and exit status 2.
fn usage_error(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        std::process::exit(
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                2
            } else {
                0
            },
        );
    }
    let text = e.render().to_string();
    let first = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("invalid command line")
        .trim()
        .trim_start_matches("error: ");
    eprintln!("sluice: {first} (see --help)");
    std::process::exit(2);
}
