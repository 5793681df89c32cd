//! The delay filter (nbdkit-delay-filter): sleeps before requests, to simulate a slow or
//! remote server.
//!
//! Each delay is whole seconds (`5`) or milliseconds (`100ms`): `rdelay`/`delay-read` for
//! reads, `delay-write`, `delay-zero`, `delay-trim`, `delay-extents`, `delay-cache`, `wdelay`
//! for writes, zeroes and trims together, `delay-open` and `delay-close` for connections.
//! `delay-fast-zero=false` fails fast zeroes at once instead of delaying them. Sleeps end
//! early, with ESHUTDOWN, when the server shuts down.

use std::sync::Arc;
use std::time::Duration;

use crate::error::{BlockError, Errno, Result};
use crate::extents::Extents;
use crate::filter::{Filter, Next};
use crate::plugin::{Flags, Handle, OpenContext, Plugin};
use crate::plugins::ConfigArg;

use super::{bad, each_param, nap, over, parse_bool, FilterEnv, FilterSpec};

pub const SPEC: FilterSpec = FilterSpec {
    name: "delay",
    keys: &[
        "rdelay",
        "delay-read",
        "delay-write",
        "delay-zero",
        "delay-trim",
        "delay-extents",
        "delay-cache",
        "wdelay",
        "delay-fast-zero",
        "delay-open",
        "delay-close",
    ],
    help: "rdelay=<NN>[ms]                Read delay in seconds/milliseconds.\n\
           delay-read=<NN>[ms]            Read delay in seconds/milliseconds.\n\
           delay-write=<NN>[ms]           Write delay in seconds/milliseconds.\n\
           delay-zero=<NN>[ms]            Zero delay in seconds/milliseconds.\n\
           delay-trim=<NN>[ms]            Trim delay in seconds/milliseconds.\n\
           delay-extents=<NN>[ms]         Extents delay in seconds/milliseconds.\n\
           delay-cache=<NN>[ms]           Cache delay in seconds/milliseconds.\n\
           wdelay=<NN>[ms]                Write, zero and trim delay in secs/msecs.\n\
           delay-fast-zero=<BOOL>         Delay fast zero requests (default true).\n\
           delay-open=<NN>[ms]            Open delay in seconds/milliseconds.\n\
           delay-close=<NN>[ms]           Close delay in seconds/milliseconds.",
    open,
};

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut f = Delay {
        fast_zero: true,
        ..Delay::default()
    };
    each_param(&SPEC, params, |k, v| {
        if k == "delay-fast-zero" {
            f.fast_zero = parse_bool("delay", k, v)?;
            return Ok(());
        }
        let d = parse_delay(k, v)?;
        match k {
            "rdelay" | "delay-read" => f.read = d,
            "delay-write" => f.write = d,
            "delay-zero" => f.zero = d,
            "delay-trim" => f.trim = d,
            "delay-extents" => f.extents = d,
            "delay-cache" => f.cache = d,
            "wdelay" => (f.write, f.zero, f.trim) = (d, d, d),
            "delay-open" => f.open = d,
            _ => f.close = d,
        }
        Ok(())
    })?;
    Ok(over(f, inner))
}

/// `SECS` or `NNms`, unsigned integers.
fn parse_delay(key: &str, value: &str) -> Result<Duration> {
    let (num, ms) = match value.strip_suffix("ms") {
        Some(n) => (n, true),
        None => (value, false),
    };
    let n = num
        .parse::<u32>()
        .map_err(|_| bad("delay", key, format!("could not parse number: \"{value}\"")))?;
    Ok(if ms {
        Duration::from_millis(n.into())
    } else {
        Duration::from_secs(n.into())
    })
}

#[derive(Default)]
pub struct Delay {
    read: Duration,
    write: Duration,
    zero: Duration,
    trim: Duration,
    extents: Duration,
    cache: Duration,
    open: Duration,
    close: Duration,
    fast_zero: bool,
}

impl Filter for Delay {
    type Conn = ();
    fn name(&self) -> &str {
        "delay"
    }
    /// It delays reads: each must reach it.
    fn must_see_every_read(&self) -> bool {
        true
    }
    fn may_block(&self) -> bool {
        true
    }
    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<((), Next)> {
        nap(self.open)?;
        Ok(((), Next::open(next, ctx)?))
    }
    fn close(&self, _: &mut (), _: &Next) {
        let _ = nap(self.close);
    }
    fn pread(&self, _: &(), next: &Next, buf: &mut [u8], off: u64, f: Flags) -> Result<()> {
        nap(self.read)?;
        next.pread(buf, off, f)
    }
    fn pwrite(&self, _: &(), next: &Next, buf: &[u8], off: u64, f: Flags) -> Result<()> {
        nap(self.write)?;
        next.pwrite(buf, off, f)
    }
    fn zero(&self, _: &(), next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        if f.contains(Flags::FAST_ZERO) && !self.fast_zero && !self.zero.is_zero() {
            return Err(BlockError::new(
                Errno::ENOTSUP,
                "delay: fast zero refused rather than delayed",
            ));
        }
        nap(self.zero)?;
        next.zero(n, off, f)
    }
    fn trim(&self, _: &(), next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        nap(self.trim)?;
        next.trim(n, off, f)
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
        nap(self.extents)?;
        next.extents(n, off, f, out)
    }
    fn cache(&self, _: &(), next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        nap(self.cache)?;
        next.cache(n, off, f)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::super::test_support::*;
    use super::*;

    #[test]
    fn delay_read_and_write_sleep_as_asked() {
        let e = export(
            filter(
                "delay",
                &[("rdelay", "50ms"), ("wdelay", "80ms")],
                memory(1 << 20),
            ),
            false,
        );
        let mut buf = [0u8; 512];
        let t = Instant::now();
        e.read(&mut buf, 0).unwrap();
        let r = t.elapsed();
        assert!(
            r >= Duration::from_millis(50) && r < Duration::from_millis(200),
            "{r:?}"
        );
        let t = Instant::now();
        e.zero(512, 0, Flags::NONE).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(80));
    }

    #[test]
    fn delay_fast_zero_false_refuses_at_once() {
        let e = export(
            filter(
                "delay",
                &[("delay-zero", "5"), ("delay-fast-zero", "false")],
                memory(1 << 20),
            ),
            false,
        );
        let t = Instant::now();
        assert_eq!(
            e.zero(512, 0, Flags::FAST_ZERO).unwrap_err().errno,
            Errno::ENOTSUP
        );
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn delay_parses_seconds_and_milliseconds_only() {
        assert_eq!(parse_delay("k", "2").unwrap(), Duration::from_secs(2));
        assert_eq!(
            parse_delay("k", "250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert!(config_error("delay", &[("rdelay", "1.5")]).starts_with("delay: rdelay: "));
    }
}
