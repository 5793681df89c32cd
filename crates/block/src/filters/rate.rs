//! The rate filter (nbdkit-rate-filter): limits read and write bandwidth, for the whole
//! server (`rate`) and/or per connection (`connection-rate`), in bits per second.
//!
//! Each limit is a token bucket (one for reads, one for writes) holding `burstiness`
//! seconds' worth of tokens (2 by default) and starting full, as nbdkit's: a request takes
//! its size × 8 tokens, sleeping for as long as the missing tokens take to arrive. Zero,
//! trim and the rest cost nothing (they carry no data). `rate-file` / `connection-rate-file`
//! name a file whose first line, read before each request when it exists, sets a new rate.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::filter::{Filter, Next};
use crate::plugin::{Flags, Handle, OpenContext, Plugin};
use crate::plugins::ConfigArg;

use super::{bad, each_param, nap, over, parse_size, FilterEnv, FilterSpec};

pub const SPEC: FilterSpec = FilterSpec {
    name: "rate",
    keys: &[
        "rate",
        "connection-rate",
        "rate-file",
        "connection-rate-file",
        "burstiness",
    ],
    help: "rate=BITSPERSEC                Limit total bandwidth.\n\
           connection-rate=BITSPERSEC     Limit per-connection bandwidth.\n\
           rate-file=FILENAME             Dynamically adjust total bandwidth.\n\
           connection-rate-file=FILENAME  Dynamically adjust per-connection bandwidth.",
    open,
};

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let (mut rate, mut conn_rate) = (0u64, 0u64);
    let (mut rate_file, mut conn_rate_file) = (None, None);
    let mut burst = 2.0f64;
    each_param(&SPEC, params, |k, v| {
        match k {
            "rate" | "connection-rate" => {
                let slot = if k == "rate" {
                    &mut rate
                } else {
                    &mut conn_rate
                };
                if *slot > 0 {
                    return Err(bad("rate", k, "set twice on the command line"));
                }
                *slot = parse_size("rate", k, v)?;
                if *slot == 0 {
                    return Err(bad("rate", k, "cannot be set to 0"));
                }
            }
            "rate-file" => rate_file = Some(absolute(v)),
            "connection-rate-file" => conn_rate_file = Some(absolute(v)),
            _ => {
                burst = v
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|b| *b > 0.0)
                    .ok_or_else(|| {
                        bad(
                            "rate",
                            k,
                            "burstiness must be a floating point number (seconds)",
                        )
                    })?;
            }
        }
        Ok(())
    })?;
    Ok(over(
        Rate {
            read: Mutex::new(Bucket::new(rate, burst)),
            write: Mutex::new(Bucket::new(rate, burst)),
            conn_rate,
            burst,
            rate_file,
            conn_rate_file,
        },
        inner,
    ))
}

fn absolute(p: &str) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| PathBuf::from(p))
}

/// A token bucket of bits. Rate 0 means no limit.
#[derive(Debug)]
pub struct Bucket {
    rate: u64,
    capacity_secs: f64,
    capacity: u64,
    level: u64,
    last: Instant,
}

impl Bucket {
    pub fn new(rate: u64, capacity_secs: f64) -> Bucket {
        let capacity = (rate as f64 * capacity_secs) as u64;
        Bucket {
            rate,
            capacity_secs,
            capacity,
            level: capacity,
            last: Instant::now(),
        }
    }

    /// Changes the rate (and with it the capacity), keeping the tokens it holds.
    pub fn adjust(&mut self, rate: u64) {
        self.rate = rate;
        self.capacity = (rate as f64 * self.capacity_secs) as u64;
        self.level = self.level.min(self.capacity);
    }

    /// Takes up to `n` tokens; returns the tokens still missing and how long they take.
    pub fn run(&mut self, n: u64) -> (u64, Duration) {
        if self.rate == 0 {
            return (0, Duration::ZERO);
        }
        let now = Instant::now();
        let usec = now.duration_since(self.last).as_micros() as u64;
        let add = (u128::from(self.rate) * u128::from(usec) / 1_000_000) as u64;
        self.level += add.min(self.capacity - self.level);
        self.last = now;
        if self.level >= n {
            self.level -= n;
            return (0, Duration::ZERO);
        }
        let missing = n - self.level;
        self.level = 0;
        let nsec = u128::from(missing) * 1_000_000_000 / u128::from(self.rate);
        (missing, Duration::from_nanos(nsec as u64))
    }
}

pub struct Rate {
    read: Mutex<Bucket>,
    write: Mutex<Bucket>,
    conn_rate: u64,
    burst: f64,
    rate_file: Option<PathBuf>,
    conn_rate_file: Option<PathBuf>,
}

/// Per connection: its own read and write buckets.
pub struct Conn {
    read: Mutex<Bucket>,
    write: Mutex<Bucket>,
}

/// Reads a new rate from `file` into `bucket` if the file exists and parses.
fn maybe_adjust(file: Option<&PathBuf>, bucket: &Mutex<Bucket>) {
    let Some(file) = file else { return };
    let Ok(text) = std::fs::read_to_string(file) else {
        return;
    };
    let line = text.lines().next().unwrap_or("");
    if let Ok(rate) = crate::size::parse_size(line.trim()) {
        bucket
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .adjust(rate);
    }
}

/// Waits until `bytes` may pass `bucket`.
fn maybe_sleep(bucket: &Mutex<Bucket>, bytes: usize) -> Result<()> {
    take(bucket, bytes as u64 * 8)
}

/// Waits until `units` tokens could be taken from `bucket`, taking them (the daemon's
/// throttle groups count bytes and requests with the same buckets).
pub fn take(bucket: &Mutex<Bucket>, units: u64) -> Result<()> {
    let mut bits = units;
    while bits > 0 {
        let (missing, wait) = bucket
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .run(bits);
        bits = missing;
        if bits > 0 {
            nap(wait)?;
        }
    }
    Ok(())
}

impl Rate {
    fn limit(&self, global: &Mutex<Bucket>, own: &Mutex<Bucket>, bytes: usize) -> Result<()> {
        maybe_adjust(self.rate_file.as_ref(), global);
        maybe_sleep(global, bytes)?;
        maybe_adjust(self.conn_rate_file.as_ref(), own);
        maybe_sleep(own, bytes)
    }
}

impl Filter for Rate {
    type Conn = Conn;
    fn name(&self) -> &str {
        "rate"
    }
    /// It limits reads: each must reach it.
    fn must_see_every_read(&self) -> bool {
        true
    }
    fn may_block(&self) -> bool {
        true
    }
    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<(Conn, Next)> {
        let conn = Conn {
            read: Mutex::new(Bucket::new(self.conn_rate, self.burst)),
            write: Mutex::new(Bucket::new(self.conn_rate, self.burst)),
        };
        Ok((conn, Next::open(next, ctx)?))
    }
    fn pread(&self, c: &Conn, next: &Next, buf: &mut [u8], off: u64, f: Flags) -> Result<()> {
        self.limit(&self.read, &c.read, buf.len())?;
        next.pread(buf, off, f)
    }
    fn pwrite(&self, c: &Conn, next: &Next, buf: &[u8], off: u64, f: Flags) -> Result<()> {
        self.limit(&self.write, &c.write, buf.len())?;
        next.pwrite(buf, off, f)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn bucket_starts_full_then_charges_by_rate() {
        let mut b = Bucket::new(8000, 2.0);
        assert_eq!(b.run(16000), (0, Duration::ZERO));
        let (missing, wait) = b.run(8000);
        assert!(missing > 7900, "{missing}");
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_secs(1));
        let mut off = Bucket::new(0, 2.0);
        assert_eq!(off.run(u64::MAX / 16), (0, Duration::ZERO));
    }

    #[test]
    fn rate_limits_reads_after_the_burst() {
        // 800 kbit/s = 100 KB/s; burst 0.1 s = 10 KB.
        let e = export(
            filter(
                "rate",
                &[("rate", "800000"), ("burstiness", "0.1")],
                memory(1 << 20),
            ),
            true,
        );
        let mut buf = vec![0u8; 10_000];
        e.read(&mut buf, 0).unwrap(); // the burst
        let t = Instant::now();
        for _ in 0..3 {
            e.read(&mut buf, 0).unwrap();
        }
        let s = t.elapsed().as_secs_f64();
        assert!((0.24..0.45).contains(&s), "{s}");
    }

    #[test]
    fn rate_parameters_are_checked() {
        assert_eq!(
            config_error("rate", &[("rate", "0")]),
            "rate: rate: cannot be set to 0"
        );
        assert!(config_error("rate", &[("burstiness", "x")]).contains("floating point"));
    }
}
