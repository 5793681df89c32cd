//! Throttle groups: the I/O limits a `throttle-group` object holds and every `throttle` node
//! naming it shares, as in qemu (`block/throttle-groups.c`).
//!
//! A group has six limits (requests and bytes per second, each total or split into read and
//! write) with their bursts, kept as qemu's `ThrottleLimits` and checked with qemu's rules
//! and messages. Each limit is a token bucket from sluice's rate filter
//! ([`sluice_block::filters::rate::Bucket`]), so the daemon's throttling and `sluice serve
//! --filter=rate` are one mechanism: a request takes its tokens (1, or `size / iops-size`
//! requests; its bytes) from each bucket that applies, sleeping on the connection's thread
//! until they are there. A bucket holds qemu's burst: `max * max-length` when a burst is set,
//! else a tenth of a second of the average (qemu's `throttle_fix_bucket`). `qom-set` of the
//! group's `limits` changes the limits at once for every node of the group (the members not
//! given keep their value, as in qemu); the buckets start again full.
//!
//! Differs from qemu: requests wait on their own threads instead of in a queue that
//! serves the group's nodes round-robin, so the share between nodes of one group is not
//! qemu's; the rates are.

use std::sync::Mutex;

use serde_json::{Map, Value};
use sluice_block::filters::rate::{take, Bucket};

use crate::generated::ThrottleLimits;
use crate::QmpError;

/// The six limits, in qemu's order.
const NAMES: [&str; 6] = [
    "iops-total",
    "iops-read",
    "iops-write",
    "bps-total",
    "bps-read",
    "bps-write",
];

/// qemu's THROTTLE_VALUE_MAX.
const VALUE_MAX: i64 = 1_000_000_000_000_000;

/// One limit: average per second, burst, burst length in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limit {
    avg: u64,
    max: u64,
    max_length: u64,
}

/// A group's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    limits: [Limit; 6],
    iops_size: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            limits: [Limit {
                avg: 0,
                max: 0,
                max_length: 1,
            }; 6],
            iops_size: 0,
        }
    }
}

impl Limits {
    /// These limits with the members `l` gives replaced, checked as qemu checks them.
    pub fn merge(&self, l: &ThrottleLimits) -> Result<Limits, QmpError> {
        let given: [[Option<i64>; 3]; 6] = [
            [l.iops_total, l.iops_total_max, l.iops_total_max_length],
            [l.iops_read, l.iops_read_max, l.iops_read_max_length],
            [l.iops_write, l.iops_write_max, l.iops_write_max_length],
            [l.bps_total, l.bps_total_max, l.bps_total_max_length],
            [l.bps_read, l.bps_read_max, l.bps_read_max_length],
            [l.bps_write, l.bps_write_max, l.bps_write_max_length],
        ];
        let mut out = self.clone();
        let range =
            || QmpError::generic("bps/iops/max values must be within [0, 1000000000000000]");
        for (lim, g) in out.limits.iter_mut().zip(given) {
            for (slot, v) in [&mut lim.avg, &mut lim.max].into_iter().zip([g[0], g[1]]) {
                if let Some(v) = v {
                    *slot = u64::try_from(v)
                        .ok()
                        .filter(|_| v <= VALUE_MAX)
                        .ok_or_else(range)?;
                }
            }
            if let Some(v) = g[2] {
                lim.max_length = u64::try_from(v).ok().filter(|v| *v >= 1).ok_or_else(|| {
                    QmpError::generic("bps_max_length/iops_max_length must be >= 1")
                })?;
            }
        }
        if let Some(v) = l.iops_size {
            out.iops_size = u64::try_from(v)
                .ok()
                .filter(|_| v <= VALUE_MAX)
                .ok_or_else(range)?;
        }
        out.check()?;
        Ok(out)
    }

    /// qemu's `throttle_is_valid`.
    fn check(&self) -> Result<(), QmpError> {
        let set = |i: usize| self.limits[i].avg > 0 || self.limits[i].max > 0;
        for base in [0, 3] {
            if set(base) && (set(base + 1) || set(base + 2)) {
                return Err(QmpError::generic(
                    "bps/iops/max total values and read/write values cannot be used at the \
                     same time",
                ));
            }
        }
        for l in &self.limits {
            if l.max > 0 && l.avg == 0 {
                return Err(QmpError::generic(
                    "bps_max/iops_max require corresponding bps/iops values",
                ));
            }
            if l.max > 0 && l.max < l.avg {
                return Err(QmpError::generic(
                    "bps_max/iops_max cannot be lower than bps/iops",
                ));
            }
            if l.max_length > 1 && l.max == 0 {
                return Err(QmpError::generic(
                    "bps_max_length/iops_max_length require corresponding bps_max/iops_max",
                ));
            }
        }
        Ok(())
    }

    /// The limits as `qom-get ... limits` shows them (every member).
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        for (name, l) in NAMES.iter().zip(&self.limits) {
            m.insert((*name).into(), l.avg.into());
            m.insert(format!("{name}-max"), l.max.into());
            m.insert(format!("{name}-max-length"), l.max_length.into());
        }
        m.insert("iops-size".into(), self.iops_size.into());
        Value::Object(m)
    }

    /// The token bucket of limit `i` (rate 0: no limit).
    fn bucket(&self, i: usize) -> Bucket {
        let l = self.limits[i];
        let secs = if l.max > 0 && l.avg > 0 {
            (l.max * l.max_length) as f64 / l.avg as f64
        } else {
            0.1
        };
        Bucket::new(l.avg, secs)
    }
}

/// A `throttle-group` object.
#[derive(Debug)]
pub struct ThrottleGroup {
    limits: Mutex<Limits>,
    buckets: [Mutex<Bucket>; 6],
}

impl ThrottleGroup {
    pub fn new(limits: Limits) -> ThrottleGroup {
        ThrottleGroup {
            buckets: std::array::from_fn(|i| Mutex::new(limits.bucket(i))),
            limits: Mutex::new(limits),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// New limits, in effect for the next request.
    pub fn set_limits(&self, limits: Limits) {
        for (i, b) in self.buckets.iter().enumerate() {
            *b.lock().unwrap_or_else(|e| e.into_inner()) = limits.bucket(i);
        }
        *self.limits.lock().unwrap_or_else(|e| e.into_inner()) = limits;
    }

    /// Waits until a read (or write) of `bytes` is within the limits.
    pub fn charge(&self, write: bool, bytes: u64) -> sluice_block::Result<()> {
        let iops_size = self.limits().iops_size;
        let ops = if iops_size > 0 && bytes > iops_size {
            bytes / iops_size
        } else {
            1
        };
        let split = if write { 2 } else { 1 };
        for (i, units) in [(0, ops), (split, ops), (3, bytes), (3 + split, bytes)] {
            take(&self.buckets[i], units)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn limits(v: Value) -> ThrottleLimits {
        let policy = sluice_qapi::runtime::CompatPolicy::default();
        let mut inp = sluice_qapi::runtime::Input::json(&policy);
        <ThrottleLimits as sluice_qapi::runtime::FromQapi>::from_qapi(&mut inp, &v).unwrap()
    }

    #[test]
    fn merge_keeps_members_not_given() {
        let a = Limits::default()
            .merge(&limits(json!({"iops-total": 100})))
            .unwrap();
        let b = a.merge(&limits(json!({"bps-total": 1000}))).unwrap();
        assert_eq!(b.to_json()["iops-total"], 100);
        assert_eq!(b.to_json()["bps-total"], 1000);
        assert_eq!(b.to_json()["bps-total-max-length"], 1);
    }

    #[test]
    fn merge_refuses_what_qemu_refuses() {
        let err = |v: Value| Limits::default().merge(&limits(v)).unwrap_err().desc;
        assert!(err(json!({"iops-total": -1})).contains("within [0, 1000000000000000]"));
        assert!(err(json!({"iops-total": 1, "iops-read": 1}))
            .contains("cannot be used at the same time"));
        assert!(err(json!({"iops-total-max": 10})).contains("require corresponding"));
        assert!(err(json!({"iops-total": 100, "iops-total-max": 10})).contains("cannot be lower"));
    }

    #[test]
    fn charge_without_limits_does_not_wait() {
        let g = ThrottleGroup::new(Limits::default());
        let t = std::time::Instant::now();
        for _ in 0..1000 {
            g.charge(false, 1 << 20).unwrap();
        }
        assert!(t.elapsed() < std::time::Duration::from_millis(100));
    }
}
