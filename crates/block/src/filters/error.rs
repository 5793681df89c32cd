//! The error filter (nbdkit-error-filter): injects errors into requests, at random or while
//! a trigger file exists, to test how clients cope.
//!
//! `error`, `error-rate` and `error-file` set the errno (EIO by default), the probability
//! (`N%` or `0..1`) and the trigger file for every request type; `error-pread*`,
//! `error-pwrite*`, `error-trim*`, `error-zero*`, `error-extents*` and `error-cache*` set one
//! type. Parameters apply in command-line order, so a later general one overrides an earlier
//! specific one, as in nbdkit. Each connection has its own random generator.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{BlockError, Errno, Result};
use crate::extents::Extents;
use crate::filter::{Filter, Next};
use crate::plugin::{Flags, Handle, OpenContext, Plugin};
use crate::plugins::ConfigArg;

use super::{bad, each_param, over, FilterEnv, FilterSpec};

pub const SPEC: FilterSpec = FilterSpec {
    name: "error",
    keys: &[
        "error",
        "error-rate",
        "error-file",
        "error-pread",
        "error-pread-rate",
        "error-pread-file",
        "error-pwrite",
        "error-pwrite-rate",
        "error-pwrite-file",
        "error-trim",
        "error-trim-rate",
        "error-trim-file",
        "error-zero",
        "error-zero-rate",
        "error-zero-file",
        "error-extents",
        "error-extents-rate",
        "error-extents-file",
        "error-cache",
        "error-cache-rate",
        "error-cache-file",
    ],
    help: "error=EPERM|EIO|ENOMEM|EINVAL|ENOSPC|ESHUTDOWN\n\
           \x20                              The error indication to return.\n\
           error-rate=0%..100%|0..1       Rate of errors to generate.\n\
           error-file=TRIGGER             Set trigger filename.\n\
           error-pread*, error-pwrite*, error-trim*, error-zero*, error-extents*\n\
           \x20                              Apply settings only to read/write/etc",
    open,
};

/// Request types, in the order of [`ErrorFilter::settings`].
const OPS: [&str; 6] = ["pread", "pwrite", "trim", "zero", "extents", "cache"];

const ERRORS: [(&str, i32); 6] = [
    ("EPERM", libc::EPERM),
    ("EIO", libc::EIO),
    ("ENOMEM", libc::ENOMEM),
    ("EINVAL", libc::EINVAL),
    ("ENOSPC", libc::ENOSPC),
    ("ESHUTDOWN", libc::ESHUTDOWN),
];

/// What to inject into one request type.
#[derive(Debug, Clone)]
pub struct Settings {
    pub errno: i32,
    pub rate: f64,
    pub file: Option<PathBuf>,
}

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut settings: [Settings; 6] = std::array::from_fn(|_| Settings {
        errno: libc::EIO,
        rate: 0.0,
        file: None,
    });
    each_param(&SPEC, params, |k, v| {
        let rest = &k["error".len()..];
        // "" | "-rate" | "-file" | "-OP" | "-OP-rate" | "-OP-file"
        let (op, what) = match rest.strip_prefix('-') {
            None => (None, ""),
            Some(r) => match OPS
                .iter()
                .position(|o| r == *o || r.starts_with(&format!("{o}-")))
            {
                Some(i) => (Some(i), &r[OPS[i].len()..]),
                None => (None, rest),
            },
        };
        let targets: Vec<usize> = op.map_or_else(|| (0..6).collect(), |i| vec![i]);
        match what {
            "" => {
                let errno = ERRORS
                    .iter()
                    .find(|(n, _)| *n == v)
                    .map(|(_, e)| *e)
                    .ok_or_else(|| bad("error", k, format!("unknown error name '{v}'")))?;
                targets.iter().for_each(|&i| settings[i].errno = errno);
            }
            "-rate" => {
                let rate = parse_rate(k, v)?;
                targets.iter().for_each(|&i| settings[i].rate = rate);
            }
            _ => {
                let path = std::path::absolute(v).unwrap_or_else(|_| PathBuf::from(v));
                targets
                    .iter()
                    .for_each(|&i| settings[i].file = Some(path.clone()));
            }
        }
        Ok(())
    })?;
    Ok(over(ErrorFilter { settings }, inner))
}

/// `N%` or a probability `0..1`.
fn parse_rate(key: &str, value: &str) -> Result<f64> {
    let (num, scale) = match value.strip_suffix('%') {
        Some(n) => (n, 100.0),
        None => (value, 1.0),
    };
    let d = num
        .trim()
        .parse::<f64>()
        .map_err(|_| bad("error", key, format!("could not parse rate '{value}'")))?
        / scale;
    if !(0.0..=1.0).contains(&d) {
        return Err(bad(
            "error",
            key,
            format!("rate out of range: '{value}' parsed as {d}"),
        ));
    }
    Ok(d)
}

pub struct ErrorFilter {
    /// Per request type, in [`OPS`] order.
    pub settings: [Settings; 6],
}

/// Per connection: a xorshift random generator.
pub struct Conn {
    rng: AtomicU64,
}

impl Conn {
    fn next_f64(&self) -> f64 {
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Ordering::Relaxed);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl ErrorFilter {
    fn inject(&self, c: &Conn, op: usize) -> Result<()> {
        let s = &self.settings[op];
        if s.rate <= 0.0 {
            return Ok(());
        }
        if let Some(f) = &s.file {
            if !f.exists() {
                return Ok(());
            }
        }
        if s.rate < 1.0 && c.next_f64() >= s.rate {
            return Ok(());
        }
        let name = ERRORS
            .iter()
            .find(|e| e.1 == s.errno)
            .map_or("EIO", |e| e.0);
        Err(BlockError::new(
            Errno(s.errno),
            format!("error: injecting {name} error into {}", OPS[op]),
        ))
    }
}

impl Filter for ErrorFilter {
    type Conn = Conn;
    fn name(&self) -> &str {
        "error"
    }
    /// It fails reads: each must reach it.
    fn must_see_every_read(&self) -> bool {
        true
    }
    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<(Conn, Next)> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let seed = (t ^ SEQ.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)) | 1;
        Ok((
            Conn {
                rng: AtomicU64::new(seed),
            },
            Next::open(next, ctx)?,
        ))
    }
    fn pread(&self, c: &Conn, next: &Next, buf: &mut [u8], off: u64, f: Flags) -> Result<()> {
        self.inject(c, 0)?;
        next.pread(buf, off, f)
    }
    fn pwrite(&self, c: &Conn, next: &Next, buf: &[u8], off: u64, f: Flags) -> Result<()> {
        self.inject(c, 1)?;
        next.pwrite(buf, off, f)
    }
    fn trim(&self, c: &Conn, next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        self.inject(c, 2)?;
        next.trim(n, off, f)
    }
    fn zero(&self, c: &Conn, next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        self.inject(c, 3)?;
        next.zero(n, off, f)
    }
    fn extents(
        &self,
        c: &Conn,
        next: &Next,
        n: u64,
        off: u64,
        f: Flags,
        out: &mut Extents,
    ) -> Result<()> {
        self.inject(c, 4)?;
        next.extents(n, off, f, out)
    }
    fn cache(&self, c: &Conn, next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        self.inject(c, 5)?;
        next.cache(n, off, f)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn error_rate_one_fails_every_request_of_its_type() {
        let e = export(
            filter(
                "error",
                &[("error", "ENOSPC"), ("error-pwrite-rate", "100%")],
                memory(1 << 20),
            ),
            false,
        );
        let mut buf = [0u8; 512];
        e.read(&mut buf, 0).unwrap();
        assert_eq!(
            e.write(&buf, 0, Flags::NONE).unwrap_err().errno.0,
            libc::ENOSPC
        );
        e.zero(512, 0, Flags::NONE).unwrap();
    }

    #[test]
    fn error_rate_half_fails_about_half() {
        let e = export(
            filter("error", &[("error-rate", "0.5")], memory(1 << 20)),
            true,
        );
        let mut buf = [0u8; 512];
        let fails = (0..2000).filter(|_| e.read(&mut buf, 0).is_err()).count();
        assert!((800..1200).contains(&fails), "{fails}");
    }

    #[test]
    fn error_file_switches_injection() {
        let dir = tempfile::tempdir().unwrap();
        let trigger = dir.path().join("inject");
        let e = export(
            filter(
                "error",
                &[
                    ("error-rate", "1"),
                    ("error-file", trigger.to_str().unwrap()),
                ],
                memory(1 << 20),
            ),
            true,
        );
        let mut buf = [0u8; 512];
        e.read(&mut buf, 0).unwrap();
        std::fs::write(&trigger, "").unwrap();
        assert_eq!(e.read(&mut buf, 0).unwrap_err().errno, Errno::EIO);
    }

    #[test]
    fn error_parameters_are_checked() {
        assert_eq!(
            config_error("error", &[("error-rate", "1.5")]),
            "error: error-rate: rate out of range: '1.5' parsed as 1.5"
        );
        assert_eq!(
            config_error("error", &[("error", "EFOO")]),
            "error: error: unknown error name 'EFOO'"
        );
    }
}
