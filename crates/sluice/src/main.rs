//! The `sluice` command: parses the command line and wires plugins, listeners and servers.
//!
//! All policy lives in the library crates; this file only turns user input into calls and
//! errors into one clear line and an exit code (2 for bad usage or configuration, 1 for
//! failures at run time).

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Export a plugin over NBD (like nbdkit).
    Serve(serve::ServeArgs),
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Serve(args) => serve::main(args),
    };
    std::process::exit(code);
}
