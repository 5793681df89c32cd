//! sluice as a drop-in for nbdkit's command line.
//!
//! Two things live here. [`NbdkitOptions`] are the options of nbdkit 1.32 that only a tool
//! written for nbdkit passes (`-s`, `--log`, `--mask-handshake`, `--no-sr`, `-n`, `-o`, `-4`,
//! `-6`, `--vsock`, `-u`, `-g`, `--swap`, `--selinux-label`); `sluice serve` accepts them
//! too, so that switching is one word. And [`main`] is the program under the name `nbdkit`
//! (a symlink to the sluice binary): it takes nbdkit's whole command line, with no
//! subcommand, GNU getopt's unambiguous long-option prefixes, `--dump-config` without a
//! plugin and nbdkit's `--version`, and then runs exactly what `sluice serve` runs.
//!
//! Under that name sluice reports the nbdkit release whose interface it implements
//! ([`NBDKIT_COMPAT_VERSION`]), with its own version beside it, because tools check the
//! version before they use a feature (virt-v2v reads `version_major`/`version_minor` from
//! `--dump-config`), and the honest answer to "which nbdkit features can I use" is that one.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, ValueEnum};

use crate::serve::ServeArgs;

/// The nbdkit release whose command line, plugin interface and filters sluice matches.
pub const NBDKIT_COMPAT_VERSION: &str = "1.32.5";

/// Where log messages go (`--log`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogTo {
    /// Standard error (the default in the foreground).
    Stderr,
    /// The system log (the default once in the background, as nbdkit).
    Syslog,
    /// Nowhere.
    Null,
}

/// nbdkit's options for tools that start a server the nbdkit way.
#[derive(Debug, Clone, Default, Args)]
pub struct NbdkitOptions {
    /// Serve one client on standard input/output (inetd, libnbd's connect_command), then
    /// exit. Implies --foreground.
    #[arg(
        short = 's',
        long = "single",
        visible_alias = "stdin",
        conflicts_with = "run",
        help_heading = "nbdkit compatibility"
    )]
    pub single: bool,

    /// Where log messages go: stderr (default in the foreground), syslog (default in the
    /// background) or null.
    #[arg(
        long = "log",
        value_name = "stderr|syslog|null",
        help_heading = "nbdkit compatibility"
    )]
    pub log: Option<LogTo>,

    /// Advertise only these handshake flags (bit 0 fixed newstyle, bit 1 no zeroes).
    #[arg(long = "mask-handshake", value_name = "MASK", value_parser = parse_mask,
          help_heading = "nbdkit compatibility")]
    pub mask_handshake: Option<u16>,

    /// Do not offer structured replies (nor extended headers, which need them).
    #[arg(long = "no-sr", help_heading = "nbdkit compatibility")]
    pub no_sr: bool,

    /// Use the newstyle protocol (the default).
    #[arg(
        short = 'n',
        long = "newstyle",
        visible_alias = "new-style",
        overrides_with = "oldstyle",
        help_heading = "nbdkit compatibility"
    )]
    pub newstyle: bool,

    /// Use the oldstyle protocol: the default export's size and flags at once, no options.
    #[arg(
        short = 'o',
        long = "oldstyle",
        visible_alias = "old-style",
        overrides_with = "newstyle",
        help_heading = "nbdkit compatibility"
    )]
    pub oldstyle: bool,

    /// Listen on IPv4 addresses only.
    #[arg(
        short = '4',
        long = "ipv4-only",
        conflicts_with = "ipv6_only",
        help_heading = "nbdkit compatibility"
    )]
    pub ipv4_only: bool,

    /// Listen on IPv6 addresses only.
    #[arg(short = '6', long = "ipv6-only", help_heading = "nbdkit compatibility")]
    pub ipv6_only: bool,

    /// Listen on AF_VSOCK (not supported by sluice: refused with a message).
    #[arg(long = "vsock", help_heading = "nbdkit compatibility")]
    pub vsock: bool,

    /// Change to this user (name or number) after binding the sockets.
    #[arg(
        short = 'u',
        long = "user",
        value_name = "USER",
        help_heading = "nbdkit compatibility"
    )]
    pub user: Option<String>,

    /// Change to this group (name or number) after binding the sockets.
    #[arg(
        short = 'g',
        long = "group",
        value_name = "GROUP",
        help_heading = "nbdkit compatibility"
    )]
    pub group: Option<String>,

    /// The export is used as swap on this machine: lock the server into memory (mlockall).
    #[arg(long = "swap", help_heading = "nbdkit compatibility")]
    pub swap: bool,

    /// SELinux label for the listening sockets (needs SELinux enabled).
    #[arg(
        long = "selinux-label",
        value_name = "LABEL",
        help_heading = "nbdkit compatibility"
    )]
    pub selinux_label: Option<String>,
}

/// nbdkit_parse_unsigned for the mask: decimal, 0x hexadecimal or 0 octal.
fn parse_mask(s: &str) -> Result<u16, String> {
    let r = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u32::from_str_radix(h, 16)
    } else if s.len() > 1 && s.starts_with('0') {
        u32::from_str_radix(&s[1..], 8)
    } else {
        s.parse()
    };
    match r {
        Ok(n) => Ok((n & 0xffff) as u16),
        Err(_) => Err(format!("could not parse number: {s:?}")),
    }
}

/// The command line under the name `nbdkit`: `sluice serve`'s, with no subcommand.
#[derive(Debug, Parser)]
#[command(
    name = "nbdkit",
    disable_version_flag = true,
    infer_long_args = true,
    about = "sluice, run as nbdkit: serves a plugin over NBD with nbdkit's command line"
)]
struct NbdkitCli {
    #[command(flatten)]
    serve: ServeArgs,
}

/// True when the program was started under the name `nbdkit` (through a symlink).
pub fn invoked_as_nbdkit() -> bool {
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n == "nbdkit"))
        .unwrap_or(false)
}

/// The program under the name `nbdkit`. Returns the exit status.
pub fn main() -> i32 {
    let args: Vec<OsString> = std::env::args_os().collect();
    let words: Vec<String> = args
        .iter()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .take_while(|a| a != "--")
        .collect();
    if words.iter().any(|a| a == "--dump-config") {
        print!("{}", dump_config(true));
        let _ = std::io::stdout().flush();
        return 0;
    }
    if words.iter().any(|a| a == "-V" || a == "--version") {
        println!(
            "nbdkit {NBDKIT_COMPAT_VERSION} (sluice {})",
            env!("CARGO_PKG_VERSION")
        );
        return 0;
    }
    match NbdkitCli::try_parse_from(&args) {
        Ok(cli) => crate::serve::main(cli.serve),
        Err(e) => crate::usage_error(e, &words),
    }
}

/// `--dump-config`: nbdkit's keys, as scripts and tools read them. Under the name `nbdkit`
/// the version is [`NBDKIT_COMPAT_VERSION`] and `name=nbdkit`; `sluice_version` is sluice's.
pub fn dump_config(as_nbdkit: bool) -> String {
    let sluice = env!("CARGO_PKG_VERSION");
    let version = if as_nbdkit {
        NBDKIT_COMPAT_VERSION
    } else {
        sluice
    };
    let mut parts = version.split('.');
    let major = parts.next().unwrap_or("0");
    let minor = parts.next().unwrap_or("0");
    let binary = invoked_path().unwrap_or_else(|| PathBuf::from("sluice"));
    let bindir = binary.parent().map(Path::to_path_buf).unwrap_or_default();
    let plugindir = Path::new(sluice_nbdkit::NBDKIT_PLUGIN_DIR);
    let libdir = plugindir
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let filterdir = plugindir.with_file_name("filters");
    let selinux = if Path::new("/sys/fs/selinux/enforce").exists() {
        "yes"
    } else {
        "no"
    };
    format!(
        "binary={}\nbindir={}\nexit_with_parent=yes\nfilterdir={}\nhost_cpu={}\nhost_os={}\n\
         libdir={}\nname={}\nnbdkit_api_version=2\nnbdkit_plugindir={}\nplugindir={}\n\
         selinux={selinux}\nsluice_plugindir={}\nsluice_version={sluice}\nsysconfdir=/etc\n\
         tls=yes\nversion={version}\nversion_major={major}\nversion_minor={minor}\n",
        binary.display(),
        bindir.display(),
        filterdir.display(),
        std::env::consts::ARCH,
        std::env::consts::OS,
        libdir.display(),
        if as_nbdkit { "nbdkit" } else { "sluice" },
        plugindir.display(),
        plugindir.display(),
        crate::serve::SLUICE_PLUGIN_DIR,
    )
}

/// The path this program was started as, symlink kept (so that a tool that runs `binary`
/// from `--dump-config` gets nbdkit's command line again): argv[0] made absolute, or found
/// on PATH.
fn invoked_path() -> Option<PathBuf> {
    let argv0 = PathBuf::from(std::env::args_os().next()?);
    if argv0.components().count() > 1 {
        return std::path::absolute(&argv0).ok();
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join(&argv0))
            .find(|p| p.is_file())
            .and_then(|p| std::path::absolute(p).ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_takes_nbdkit_number_spellings() {
        assert_eq!(parse_mask("0"), Ok(0));
        assert_eq!(parse_mask("3"), Ok(3));
        assert_eq!(parse_mask("0x1"), Ok(1));
        assert_eq!(parse_mask("02"), Ok(2));
        assert!(parse_mask("x").is_err());
    }

    #[test]
    fn dump_config_as_nbdkit_reports_the_compatible_release() {
        let text = dump_config(true);
        assert!(text.contains("\nversion=1.32.5\nversion_major=1\nversion_minor=32\n"));
        assert!(text.contains("\nname=nbdkit\n"));
        assert!(text.contains(&format!("\nsluice_version={}\n", env!("CARGO_PKG_VERSION"))));
        let own = dump_config(false);
        assert!(own.contains("\nname=sluice\n"));
    }
}
