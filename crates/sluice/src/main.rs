//! The `sluice` command: parses the command line and wires plugins, listeners and servers.
//!
//! All policy lives in the library crates; this file only turns user input into calls and
//! errors into one clear line and an exit code (2 for bad usage or configuration, 1 for
//! failures at run time).

mod compat;
mod daemon;
mod filters;
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
    process::fix_malloc_thresholds();
    if compat::invoked_as_nbdkit() {
        std::process::exit(compat::main());
    }
    let words: Vec<String> = std::env::args().skip(1).collect();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => usage_error(e, &words),
    };
    if cli.dump_config {
        print!("{}", compat::dump_config(false));
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

/// Help and version go to stdout as clap prints them (help followed by what each `--filter`
/// named on the command line adds, as nbdkit's); any other command-line mistake is one line
/// on stderr, `sluice: ...`, and exit status 2. `args` are the words after the program name.
pub(crate) fn usage_error(e: clap::Error, args: &[String]) -> ! {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        if e.kind() == ErrorKind::DisplayHelp {
            match filters::help(&filters::names_in_args(args)) {
                Ok(text) => print!("{text}"),
                Err(unknown) => {
                    eprintln!("sluice: {unknown}");
                    std::process::exit(1);
                }
            }
        }
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
