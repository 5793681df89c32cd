//! The retry-request filter (nbdkit-retry-request-filter): retries a single failing request
//! (and, unless `retry-request-open=false`, a failing open) up to `retry-request-retries`
//! times (2), `retry-request-delay` seconds (2) apart, without reopening the plugin.

use std::sync::Arc;
use std::time::Duration;

use crate::error::Result;
use crate::extents::Extents;
use crate::filter::{Filter, Next};
use crate::plugin::{Flags, Handle, OpenContext, Plugin};
use crate::plugins::ConfigArg;

use super::{bad, each_param, nap, over, parse_bool, parse_u32, FilterEnv, FilterSpec};

pub const SPEC: FilterSpec = FilterSpec {
    name: "retry-request",
    keys: &[
        "retry-request-retries",
        "retry-request-delay",
        "retry-request-open",
    ],
    help: "retry-request-retries=<N> Number of retries (default: 2).\n\
           retry-request-delay=<N>   Seconds to wait before retry (default: 2).\n\
           retry-request-open=false  Do not retry opening the plugin (default: true).",
    open,
};

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut f = RetryRequest {
        retries: 2,
        delay: 2,
        retry_open: true,
    };
    each_param(&SPEC, params, |k, v| {
        match k {
            "retry-request-retries" => {
                f.retries = parse_u32("retry-request", k, v)?;
                if f.retries > 1000 {
                    return Err(bad("retry-request", k, "value too large"));
                }
            }
            "retry-request-delay" => {
                f.delay = parse_u32("retry-request", k, v)?;
                if f.delay == 0 {
                    return Err(bad("retry-request", k, "retry-request-delay cannot be 0"));
                }
            }
            _ => f.retry_open = parse_bool("retry-request", k, v)?,
        }
        Ok(())
    })?;
    Ok(over(f, inner))
}

pub struct RetryRequest {
    retries: u32,
    delay: u32,
    retry_open: bool,
}

impl RetryRequest {
    /// Runs `op` up to `retries + 1` times, sleeping between attempts.
    fn run<T>(&self, what: &str, mut op: impl FnMut() -> Result<T>) -> Result<T> {
        let mut i = 0;
        loop {
            match op() {
                Ok(v) => return Ok(v),
                Err(e) if i >= self.retries => return Err(e),
                Err(e) => {
                    i += 1;
                    tracing::debug!(
                        "retry-request: {what} failed ({e}); retry {i}: waiting {} seconds",
                        self.delay
                    );
                    if nap(Duration::from_secs(self.delay.into())).is_err() {
                        return Err(e);
                    }
                }
            }
        }
    }
}

impl Filter for RetryRequest {
    type Conn = ();
    fn name(&self) -> &str {
        "retry-request"
    }
    fn may_block(&self) -> bool {
        true
    }
    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<((), Next)> {
        let next = if self.retry_open {
            self.run("open", || Next::open(next, ctx))?
        } else {
            Next::open(next, ctx)?
        };
        Ok(((), next))
    }
    fn pread(&self, _: &(), next: &Next, buf: &mut [u8], off: u64, f: Flags) -> Result<()> {
        self.run("pread", || next.pread(buf, off, f))
    }
    fn pwrite(&self, _: &(), next: &Next, buf: &[u8], off: u64, f: Flags) -> Result<()> {
        self.run("pwrite", || next.pwrite(buf, off, f))
    }
    fn trim(&self, _: &(), next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        self.run("trim", || next.trim(n, off, f))
    }
    fn flush(&self, _: &(), next: &Next, f: Flags) -> Result<()> {
        self.run("flush", || next.flush(f))
    }
    fn zero(&self, _: &(), next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        self.run("zero", || next.zero(n, off, f))
    }
    fn extents(
        &self,
        _: &(),
        next: &Next,
        n: u64,
        off: u64,
        f: Flags,
        out: &mut Extents,
    ) -> Result<()> {
        let got = self.run("extents", || {
            let mut e = Extents::new(off, out.end());
            next.extents(n, off, f, &mut e)?;
            Ok(e)
        })?;
        for e in got.as_slice() {
            out.add(e.offset, e.length, e.kind)?;
        }
        Ok(())
    }
    fn cache(&self, _: &(), next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        self.run("cache", || next.cache(n, off, f))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::super::test_support::*;
    use super::*;
    use crate::Errno;

    #[test]
    fn retry_request_retries_the_request_on_the_same_handle() {
        let flaky = Arc::new(Flaky {
            bad_reads: 1,
            ..Flaky::new()
        });
        let e = export(
            filter(
                "retry-request",
                &[("retry-request-delay", "1")],
                flaky.clone(),
            ),
            true,
        );
        let mut buf = [0u8; 16];
        e.read(&mut buf, 0).unwrap();
        assert_eq!(buf, [1u8; 16]);
        assert_eq!(flaky.reads.load(Ordering::SeqCst), 2);
        assert_eq!(flaky.opens.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn retry_request_retries_open_unless_told_not_to() {
        let flaky = Arc::new(Flaky {
            bad_opens: 1,
            ..Flaky::new()
        });
        let top = filter(
            "retry-request",
            &[("retry-request-delay", "1")],
            flaky.clone(),
        );
        crate::Export::open(&crate::Backend::new(top), &ctx(true)).unwrap();
        let flaky = Arc::new(Flaky {
            bad_opens: 1,
            ..Flaky::new()
        });
        let top = filter("retry-request", &[("retry-request-open", "false")], flaky);
        let err = crate::Export::open(&crate::Backend::new(top), &ctx(true))
            .err()
            .unwrap();
        assert_eq!(err.errno, Errno::EIO);
    }
}
