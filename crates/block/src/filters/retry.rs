//! The retry filter (nbdkit-retry-filter): when a request fails, closes and reopens the
//! plugin and tries again, waiting `retry-delay` seconds (2), doubled each time with
//! `retry-exponential` (on by default), up to `retries` times (5).
//!
//! `retry-readonly` reopens the plugin read-only after the first failure, after which
//! writes fail with EROFS. Before each attempt the request is checked against the reopened
//! handle (range, can_write, FUA...), since a reopened plugin may have changed. Requests on
//! one connection are serialised so that a reopen never runs beside another request of the
//! same connection; the reopen itself is [`Next::reopen`].

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{BlockError, Errno, Result};
use crate::extents::Extents;
use crate::filter::{Filter, Next};
use crate::plugin::{Flags, Handle, OpenContext, Plugin, Support, ThreadModel};
use crate::plugins::ConfigArg;

use super::{bad, each_param, nap, over, parse_bool, parse_u32, FilterEnv, FilterSpec};

pub const SPEC: FilterSpec = FilterSpec {
    name: "retry",
    keys: &[
        "retries",
        "retry-delay",
        "retry-exponential",
        "retry-readonly",
    ],
    help: "retries=<N>              Number of retries (default: 5).\n\
           retry-delay=<N>          Seconds to wait before retry (default: 2).\n\
           retry-exponential=yes|no Exponential back-off (default: yes).\n\
           retry-readonly=yes|no    Force read-only on failure (default: no).",
    open,
};

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut f = Retry {
        retries: 5,
        delay: 2,
        exponential: true,
        readonly: false,
    };
    each_param(&SPEC, params, |k, v| {
        match k {
            "retries" => f.retries = parse_u32("retry", k, v)?,
            "retry-delay" => {
                f.delay = parse_u32("retry", k, v)?;
                if f.delay == 0 {
                    return Err(bad("retry", k, "retry-delay cannot be 0"));
                }
            }
            "retry-exponential" => f.exponential = parse_bool("retry", k, v)?,
            _ => f.readonly = parse_bool("retry", k, v)?,
        }
        Ok(())
    })?;
    Ok(over(f, inner))
}

pub struct Retry {
    retries: u32,
    delay: u32,
    exponential: bool,
    readonly: bool,
}

/// Per connection: how to reopen, how often it was, and whether the plugin is open.
pub struct Conn {
    readonly: bool,
    export_name: String,
    is_tls: bool,
    reopens: AtomicU32,
    open: AtomicBool,
}

/// Where one request is in its retries.
struct Attempt {
    retry: u32,
    delay: u64,
}

impl Retry {
    /// After a failure: waits, reopens, and says whether to try again (nbdkit's do_retry).
    fn again(&self, c: &Conn, next: &Next, a: &mut Attempt, what: &str, err: &BlockError) -> bool {
        if a.retry == 0 {
            a.delay = self.delay.into();
        }
        loop {
            if a.retry >= self.retries {
                tracing::debug!("retry: could not recover after {} retries", self.retries);
                return false;
            }
            tracing::debug!(
                "retry: {what} failed ({err}); retry {}: waiting {} seconds",
                a.retry + 1,
                a.delay
            );
            if nap(Duration::from_secs(a.delay)).is_err() {
                return false;
            }
            a.retry += 1;
            if self.exponential {
                a.delay *= 2;
            }
            c.reopens.fetch_add(1, Ordering::Relaxed);
            let ctx = OpenContext {
                readonly: c.readonly || self.readonly,
                export_name: &c.export_name,
                is_tls: c.is_tls,
            };
            match next.reopen(&ctx) {
                Ok(()) => {
                    c.open.store(true, Ordering::Relaxed);
                    return true;
                }
                Err(_) => c.open.store(false, Ordering::Relaxed),
            }
        }
    }

    /// Runs `op` with retries; `check` validates the request against the current handle.
    fn run<T>(
        &self,
        c: &Conn,
        next: &Next,
        what: &str,
        write: bool,
        mut op: impl FnMut() -> Result<T>,
    ) -> Result<T> {
        let mut a = Attempt { retry: 0, delay: 0 };
        loop {
            if write && self.readonly && c.reopens.load(Ordering::Relaxed) > 0 {
                return Err(BlockError::errno(Errno::EROFS));
            }
            let r = if c.open.load(Ordering::Relaxed) {
                op()
            } else {
                Err(BlockError::new(
                    Errno::ESHUTDOWN,
                    "retry: the plugin could not be reopened",
                ))
            };
            match r {
                Ok(v) => return Ok(v),
                Err(e) => {
                    if !self.again(c, next, &mut a, what, &e) {
                        return Err(e);
                    }
                }
            }
        }
    }
}

fn valid_range(next: &Next, count: u64, offset: u64, write: bool) -> Result<()> {
    match offset.checked_add(count) {
        Some(end) if end <= next.get_size()? => Ok(()),
        _ => Err(BlockError::errno(if write {
            Errno::ENOSPC
        } else {
            Errno::EIO
        })),
    }
}

fn fua_ok(next: &Next, f: Flags) -> Result<()> {
    if f.contains(Flags::FUA) && next.can_fua()? == Support::None {
        return Err(BlockError::errno(Errno::EIO));
    }
    Ok(())
}

impl Filter for Retry {
    type Conn = Conn;
    fn name(&self) -> &str {
        "retry"
    }
    fn thread_model(&self) -> ThreadModel {
        ThreadModel::SerializeRequests
    }
    fn may_block(&self) -> bool {
        true
    }
    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<(Conn, Next)> {
        let next = Next::open_reopenable(next, ctx)?;
        Ok((
            Conn {
                readonly: ctx.readonly,
                export_name: ctx.export_name.to_owned(),
                is_tls: ctx.is_tls,
                reopens: AtomicU32::new(0),
                open: AtomicBool::new(true),
            },
            next,
        ))
    }
    fn close(&self, c: &mut Conn, _: &Next) {
        tracing::debug!(
            "retry: reopens needed: {}",
            c.reopens.load(Ordering::Relaxed)
        );
    }
    fn pread(&self, c: &Conn, next: &Next, buf: &mut [u8], off: u64, f: Flags) -> Result<()> {
        let n = buf.len() as u64;
        self.run(c, next, "pread", false, || {
            valid_range(next, n, off, false)?;
            next.pread(buf, off, f)
        })
    }
    fn pwrite(&self, c: &Conn, next: &Next, buf: &[u8], off: u64, f: Flags) -> Result<()> {
        self.run(c, next, "pwrite", true, || {
            valid_range(next, buf.len() as u64, off, true)?;
            if !next.can_write()? {
                return Err(BlockError::errno(Errno::EROFS));
            }
            fua_ok(next, f)?;
            next.pwrite(buf, off, f)
        })
    }
    fn trim(&self, c: &Conn, next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        self.run(c, next, "trim", true, || {
            valid_range(next, n, off, true)?;
            if !next.can_trim()? {
                return Err(BlockError::errno(Errno::EROFS));
            }
            fua_ok(next, f)?;
            next.trim(n, off, f)
        })
    }
    fn flush(&self, c: &Conn, next: &Next, f: Flags) -> Result<()> {
        self.run(c, next, "flush", false, || {
            if !next.can_flush()? {
                return Err(BlockError::errno(Errno::EIO));
            }
            next.flush(f)
        })
    }
    fn zero(&self, c: &Conn, next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        if f.contains(Flags::FAST_ZERO)
            && (!c.open.load(Ordering::Relaxed) || !next.can_fast_zero()?)
        {
            return Err(BlockError::errno(Errno::ENOTSUP));
        }
        self.run(c, next, "zero", true, || {
            valid_range(next, n, off, true)?;
            if next.can_zero()? == Support::None {
                return Err(BlockError::errno(Errno::EROFS));
            }
            fua_ok(next, f)?;
            next.zero(n, off, f)
        })
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
        let got = self.run(c, next, "extents", false, || {
            valid_range(next, n, off, false)?;
            if !next.can_extents()? {
                return Err(BlockError::errno(Errno::EIO));
            }
            // Each attempt starts from an empty list.
            let mut e = Extents::new(off, out.end());
            next.extents(n, off, f, &mut e)?;
            Ok(e)
        })?;
        for e in got.as_slice() {
            out.add(e.offset, e.length, e.kind)?;
        }
        Ok(())
    }
    fn cache(&self, c: &Conn, next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        self.run(c, next, "cache", false, || {
            if next.can_cache()? == Support::None {
                return Err(BlockError::errno(Errno::EIO));
            }
            next.cache(n, off, f)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::super::test_support::*;
    use super::*;

    #[test]
    fn retry_reopens_the_plugin_and_succeeds() {
        let flaky = Arc::new(Flaky {
            good_from: 2,
            ..Flaky::new()
        });
        let top = filter("retry", &[("retry-delay", "1")], flaky.clone());
        assert_eq!(top.thread_model(), ThreadModel::SerializeRequests);
        let e = export(top, false);
        let mut buf = [0u8; 16];
        let t = std::time::Instant::now();
        e.read(&mut buf, 0).unwrap();
        assert!(t.elapsed() >= Duration::from_secs(1));
        assert_eq!(buf, [2u8; 16], "served by the second handle");
        assert_eq!(flaky.opens.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn retry_gives_up_after_retries_and_readonly_refuses_writes() {
        let flaky = Arc::new(Flaky {
            good_from: 100,
            ..Flaky::new()
        });
        let e = export(
            filter(
                "retry",
                &[
                    ("retries", "1"),
                    ("retry-delay", "1"),
                    ("retry-readonly", "yes"),
                ],
                flaky.clone(),
            ),
            false,
        );
        let mut buf = [0u8; 16];
        assert_eq!(e.read(&mut buf, 0).unwrap_err().errno, Errno::EIO);
        assert_eq!(flaky.opens.load(Ordering::SeqCst), 2);
        assert_eq!(
            e.write(&buf, 0, Flags::NONE).unwrap_err().errno,
            Errno::EROFS
        );
        assert!(config_error("retry", &[("retry-delay", "0")]).contains("cannot be 0"));
    }
}
