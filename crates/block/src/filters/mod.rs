//! nbdkit's filters, in Rust, and the registry that configures them from command-line
//! parameters.
//!
//! Each filter lives in its own file, mirrors the nbdkit 1.32 filter of the same name
//! (parameters, capabilities, behaviour) and is written on the filter layer
//! ([`crate::filter`]): it overrides only what it changes, so everything else, capabilities
//! included, is answered by the layer below. The registry here is the one place that maps a
//! filter name and its `key=value` parameters to a configured layer over a plugin: a
//! [`FilterSpec`] names the keys a filter owns (the binary routes each key to the first
//! filter, outermost first, that owns it, and the rest to the plugin, as nbdkit does), its
//! `--help` text, and the constructor that checks the parameters up front. A bad parameter
//! is an EINVAL [`BlockError`] whose message reads `FILTER: KEY: problem`.
//!
//! The parameter parsers below (`bool`, size, integer, errno) are nbdkit's, shared so that
//! every filter accepts the same spellings.

use std::sync::{Arc, OnceLock};

use crate::error::{BlockError, Errno, Result};
use crate::filter::{Filter, Filtered};
use crate::plugin::Plugin;
use crate::plugins::ConfigArg;

pub mod blocksize;
pub mod blocksize_policy;
pub mod cache;
pub mod cacheextents;
pub mod checkwrite;
pub mod cli_registered;
pub mod cow;
pub mod ddrescue;
pub mod delay;
pub mod error;
pub mod ext2;
pub mod extentlist;
pub mod fua;
pub mod gzip;
pub mod lower;
pub mod luks;
pub mod multi_conn;
pub mod nocache;
pub mod noextents;
pub mod nofilter;
pub mod noparallel;
pub mod nozero;
pub mod offset;
pub mod overlay;
pub mod partition;
pub mod protect;
pub mod rate;
pub mod readahead;
pub mod retry;
pub mod retry_request;
pub mod scan;
pub mod swab;
pub mod tar;
pub mod tls_fallback;
pub mod truncate;
pub mod xz;

#[cfg(test)]
mod test_support;

/// One filter as the command line knows it.
#[derive(Clone, Copy)]
pub struct FilterSpec {
    /// nbdkit's filter name, e.g. `cow`.
    pub name: &'static str,
    /// The `key=value` parameters it owns.
    pub keys: &'static [&'static str],
    /// `--help` text lines, as `nbdkit --filter=NAME PLUGIN --help` prints them.
    pub help: &'static str,
    /// Checks `params` (only keys of [`FilterSpec::keys`]) and puts the filter over `inner`.
    pub open: OpenFn,
}

/// A filter's constructor: checks `params` and puts the filter over `inner`.
pub type OpenFn =
    fn(params: &[ConfigArg], inner: Arc<dyn Plugin>, ctx: &FilterEnv) -> Result<Arc<dyn Plugin>>;

impl std::fmt::Debug for FilterSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilterSpec")
            .field("name", &self.name)
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

/// Process-level hooks that server-level filters need, filled in by the binary.
#[derive(Clone)]
pub struct FilterEnv {
    /// Asks the server to exit gracefully (exitlast, exitwhen).
    pub exit: Arc<dyn Fn() + Send + Sync>,
    /// The ready and serving stages (nbdkit's `.get_ready`, `.after_fork`), which the binary
    /// runs once the stack is built and once it serves (log, stats, pause, exitwhen).
    pub lifecycle: Arc<cli_registered::Lifecycle>,
}

impl Default for FilterEnv {
    /// Exiting goes through the server's shutdown hook, as a plugin's `nbdkit_shutdown`.
    fn default() -> Self {
        FilterEnv {
            exit: Arc::new(crate::host::plugin_requested_shutdown),
            lifecycle: Arc::default(),
        }
    }
}

/// The filters written in this directory by the data-path work (offset, cow, ...).
pub const DATA_FILTERS: &[FilterSpec] = &[
    blocksize::SPEC,
    blocksize_policy::SPEC,
    cache::SPEC,
    cacheextents::SPEC,
    checkwrite::SPEC,
    cow::SPEC,
    ddrescue::SPEC,
    delay::SPEC,
    error::SPEC,
    ext2::SPEC,
    extentlist::SPEC,
    fua::SPEC,
    gzip::SPEC,
    #[cfg(feature = "luks")]
    luks::SPEC,
    multi_conn::SPEC,
    nocache::SPEC,
    noextents::SPEC,
    nofilter::SPEC,
    noparallel::SPEC,
    nozero::SPEC,
    offset::SPEC,
    partition::SPEC,
    protect::SPEC,
    rate::SPEC,
    readahead::SPEC,
    retry::SPEC,
    retry_request::SPEC,
    scan::SPEC,
    swab::SPEC,
    tar::SPEC,
    tls_fallback::SPEC,
    truncate::SPEC,
    xz::SPEC,
];

/// Every filter sluice has, sorted by name.
pub fn all() -> &'static [FilterSpec] {
    static ALL: OnceLock<Vec<FilterSpec>> = OnceLock::new();
    ALL.get_or_init(|| {
        let mut v: Vec<FilterSpec> = DATA_FILTERS
            .iter()
            .chain(cli_registered::CLI_FILTERS)
            .copied()
            .collect();
        v.sort_by_key(|s| s.name);
        v
    })
}

/// The filter called `name`.
pub fn find(name: &str) -> Option<&'static FilterSpec> {
    all().iter().find(|s| s.name == name)
}

/// Puts `filter` over `inner`, as a plugin.
pub(crate) fn over<F: Filter>(filter: F, inner: Arc<dyn Plugin>) -> Arc<dyn Plugin> {
    Arc::new(Filtered::new(filter, inner))
}

/// The error for a bad parameter: `FILTER: KEY: problem`, EINVAL.
pub(crate) fn bad(filter: &str, key: &str, problem: impl std::fmt::Display) -> BlockError {
    BlockError::new(Errno::EINVAL, format!("{filter}: {key}: {problem}"))
}

/// Walks a filter's parameters, handing each `(key, value)` to `apply`; a bare value or a
/// key not in `spec.keys` is an error (the binary routes only owned keys here).
pub(crate) fn each_param<'a>(
    spec: &FilterSpec,
    params: &'a [ConfigArg],
    mut apply: impl FnMut(&'a str, &'a str) -> Result<()>,
) -> Result<()> {
    for p in params {
        match p.key.as_deref() {
            Some(k) if spec.keys.contains(&k) => apply(k, &p.value)?,
            Some(k) => return Err(bad(spec.name, k, "unknown parameter for this filter")),
            None => return Err(bad(spec.name, &p.value, "a filter takes only key=value")),
        }
    }
    Ok(())
}

/// Sleeps for `d` (nbdkit_nanosleep): cut short with ESHUTDOWN when the server shuts down.
pub(crate) fn nap(d: std::time::Duration) -> Result<()> {
    if d.is_zero() || crate::host::sleep(d, None) {
        Ok(())
    } else {
        Err(BlockError::new(
            Errno::ESHUTDOWN,
            "sleep interrupted: the server is shutting down",
        ))
    }
}

/// nbdkit_parse_bool: `1 true t yes y on` / `0 false f no n off`, any case.
pub(crate) fn parse_bool(filter: &str, key: &str, value: &str) -> Result<bool> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" | "t" | "yes" | "y" | "on" => Ok(true),
        "0" | "false" | "f" | "no" | "n" | "off" => Ok(false),
        _ => Err(bad(
            filter,
            key,
            format!("could not decipher boolean ({value})"),
        )),
    }
}

/// nbdkit_parse_size: a size with an optional `b|k|K|M|G|T|P|E` suffix (and `s` sectors).
pub(crate) fn parse_size(filter: &str, key: &str, value: &str) -> Result<u64> {
    crate::size::parse_size(value).map_err(|e| bad(filter, key, format!("{value}: {e}")))
}

/// nbdkit_parse_unsigned and friends: a decimal (or 0x hex, 0 octal) integer.
pub(crate) fn parse_u64(filter: &str, key: &str, value: &str) -> Result<u64> {
    let v = value.trim_start();
    let r = if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16)
    } else if v.len() > 1 && v.starts_with('0') {
        u64::from_str_radix(&v[1..], 8)
    } else {
        v.parse::<u64>()
    };
    r.map_err(|_| bad(filter, key, format!("could not parse number: {value}")))
}

/// Like [`parse_u64`], for a value that must fit in a `u32`.
pub(crate) fn parse_u32(filter: &str, key: &str, value: &str) -> Result<u32> {
    let v = parse_u64(filter, key, value)?;
    u32::try_from(v).map_err(|_| bad(filter, key, format!("number out of range: {value}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 1 MiB disk of zeroes whose handles say their bytes are at the same offset of an
    /// open file (any file: only the answer is looked at).
    struct Filed(Arc<std::fs::File>);
    struct FiledHandle(Arc<std::fs::File>);
    impl Plugin for Filed {
        fn name(&self) -> &str {
            "filed"
        }
        fn open(&self, _: &crate::plugin::OpenContext<'_>) -> Result<Box<dyn crate::Handle>> {
            Ok(Box::new(FiledHandle(self.0.clone())))
        }
    }
    impl crate::Handle for FiledHandle {
        fn get_size(&self) -> Result<u64> {
            Ok(1 << 20)
        }
        fn pread(&self, buf: &mut [u8], _: u64, _: crate::plugin::Flags) -> Result<()> {
            buf.fill(0);
            Ok(())
        }
        fn file_range(&self, _: u64, offset: u64) -> Option<crate::plugin::FileRange<'_>> {
            use std::os::fd::AsFd;
            Some(crate::plugin::FileRange {
                fd: self.0.as_fd(),
                offset,
            })
        }
    }

    /// The file offset the stack `top` would read `[offset, offset+count)` from, if any.
    fn spliced_from(top: Arc<dyn Plugin>, count: u64, offset: u64) -> Option<u64> {
        test_support::export(top, false).with_file_range(count, offset, |r| r.offset)
    }

    #[test]
    fn file_range_is_forwarded_only_by_filters_that_leave_reads_alone() {
        let file = Arc::new(std::fs::File::open("/dev/null").unwrap());
        let mut forwarding = Vec::new();
        for spec in all() {
            // Filters that need parameters or a format below cannot open over a blank disk;
            // the byte-changing ones among them are checked with parameters below.
            let Ok(top) = test_support::try_filter(spec.name, &[], Arc::new(Filed(file.clone())))
            else {
                continue;
            };
            let Ok(export) =
                crate::Export::open(&crate::Backend::new(top), &test_support::ctx(false))
            else {
                continue;
            };
            if export.with_file_range(4096, 8192, |r| r.offset).is_some() {
                forwarding.push(spec.name);
            }
        }
        assert_eq!(
            forwarding,
            [
                "cache",
                "cow",
                "nocache",
                "noextents",
                "nofilter",
                "noparallel",
                "nozero",
                "protect"
            ]
        );
        let filed = || -> Arc<dyn Plugin> { Arc::new(Filed(file.clone())) };
        assert_eq!(spliced_from(filed(), 4096, 8192), Some(8192));
        let nofilter3 = (0..3).fold(filed(), |p, _| test_support::filter("nofilter", &[], p));
        assert_eq!(spliced_from(nofilter3, 4096, 8192), Some(8192));
        for (name, kv) in [
            ("offset", &[("offset", "4096")][..]),
            ("offset", &[("offset", "0"), ("range", "65536")][..]),
            ("truncate", &[("truncate", "65536")][..]),
            ("swab", &[][..]),
            ("error", &[("error-rate", "0")][..]),
            ("log", &[("logfile", "/dev/null")][..]),
            ("stats", &[("statsfile", "/dev/null")][..]),
        ] {
            let top = test_support::filter(name, kv, filed());
            assert_eq!(spliced_from(top, 4096, 8192), None, "{name} {kv:?}");
        }
        // A pass-through layer over a byte-changing one forwards its None.
        let top = test_support::filter("nofilter", &[], test_support::filter("swab", &[], filed()));
        assert_eq!(spliced_from(top, 4096, 8192), None);
    }

    #[test]
    fn find_every_registered_name() {
        for s in all() {
            assert_eq!(find(s.name).unwrap().name, s.name);
        }
        assert!(find("no-such-filter").is_none());
    }

    #[test]
    fn all_is_sorted_with_unique_names() {
        let names: Vec<_> = all().iter().map(|s| s.name).collect();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(names, sorted);
    }

    #[test]
    fn parse_bool_accepts_nbdkit_spellings() {
        for t in ["1", "true", "T", "yes", "Y", "on"] {
            assert!(parse_bool("f", "k", t).unwrap());
        }
        for f in ["0", "FALSE", "f", "no", "n", "off"] {
            assert!(!parse_bool("f", "k", f).unwrap());
        }
        let e = parse_bool("cow", "cow-on-read", "maybe").unwrap_err();
        assert_eq!(e.errno, Errno::EINVAL);
        assert!(e.message.starts_with("cow: cow-on-read: "), "{}", e.message);
    }

    #[test]
    fn parse_u64_takes_decimal_hex_and_octal() {
        assert_eq!(parse_u64("f", "k", "42").unwrap(), 42);
        assert_eq!(parse_u64("f", "k", "0x10").unwrap(), 16);
        assert_eq!(parse_u64("f", "k", "010").unwrap(), 8);
        assert_eq!(parse_u64("f", "k", "0").unwrap(), 0);
        assert!(parse_u64("f", "k", "-1").is_err());
        assert!(parse_u32("f", "k", "4294967296").is_err());
    }
}
