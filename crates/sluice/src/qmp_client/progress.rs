//! How a job's progress looks: the terminal bar, the plain line, byte counts, rate and ETA.
//!
//! Pure functions of a [`Snapshot`], so the exact text is unit-tested; the caller decides
//! when to draw (the bar a few times a second, redrawn in place with `\r`; plain lines at
//! most once a second, for logs and pipes). The rate is measured over a sliding window of
//! recent samples ([`Rate`]) rather than since the start, so that after a pause, a
//! `block-job-set-speed` or a slow start the ETA follows what the job does now.

use std::collections::VecDeque;

/// What is known about a job at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot<'a> {
    pub id: &'a str,
    /// The job's status (`running`, `paused`, `ready`, ...), or a final word.
    pub status: &'a str,
    /// `current-progress` / `total-progress` of query-jobs (bytes for block jobs).
    pub current: u64,
    pub total: u64,
    /// Bytes per second over the recent window, once there is one.
    pub rate: Option<f64>,
}

impl Snapshot<'_> {
    /// Whole percent done, once the total is known.
    pub fn percent(&self) -> Option<u64> {
        (self.total > 0).then(|| (self.current.min(self.total) * 100) / self.total)
    }

    /// Seconds left at the current rate.
    fn eta(&self) -> Option<f64> {
        let rate = self.rate.filter(|r| *r > 0.0)?;
        (self.total >= self.current).then(|| (self.total - self.current) as f64 / rate)
    }

    /// `45%  230.0 MiB / 512.0 MiB  85.2 MiB/s  ETA 0:03`, or the status instead of the
    /// ETA when the job is not running.
    fn figures(&self) -> String {
        let mut s = match self.percent() {
            Some(p) => format!("{p:>3}%  "),
            None => String::new(),
        };
        s += &format!("{} / {}", bytes(self.current), bytes(self.total));
        if self.status == "running" {
            if let Some(r) = self.rate {
                s += &format!("  {}/s", bytes(r as u64));
            }
            s += &format!(
                "  ETA {}",
                self.eta().map(duration).unwrap_or_else(|| "--:--".into())
            );
        } else {
            s += "  ";
            s += self.status;
        }
        s
    }
}

/// Room kept for the figures after the bar: enough for `100%  512.0 GiB / 512.0 GiB  128.0
/// MiB/s  ETA 1:02:03`. Longer figures are cut at the terminal's edge.
const FIGURES_WIDTH: usize = 52;

/// The terminal line: `ID [#####.....] 45%  230.0 MiB / 512.0 MiB  85.2 MiB/s  ETA 0:03`,
/// at most `width - 1` characters (the last column would wrap on some terminals). The bar
/// shrinks, then goes, when the terminal is narrow.
pub fn bar_line(s: &Snapshot, width: usize) -> String {
    let figures = s.figures();
    let room = width.saturating_sub(1);
    // The bar's width depends only on the terminal and the id, so that it does not jump as
    // the figures change length (a rate appears, units change).
    let fixed = s.id.len() + " [] ".len() + FIGURES_WIDTH;
    let bar_width = room.saturating_sub(fixed).min(30);
    let line = if bar_width >= 10 {
        let filled = match s.percent() {
            Some(p) => (p as usize * bar_width) / 100,
            None => 0,
        };
        format!(
            "{} [{}{}] {figures}",
            s.id,
            "#".repeat(filled),
            ".".repeat(bar_width - filled)
        )
    } else {
        format!("{} {figures}", s.id)
    };
    line.chars().take(room.max(1)).collect()
}

/// The line for logs and pipes: `job 's0': 45% (230.0 MiB of 512.0 MiB, 85.2 MiB/s, ETA
/// 0:03)`.
pub fn plain_line(s: &Snapshot) -> String {
    let mut parts = vec![format!("{} of {}", bytes(s.current), bytes(s.total))];
    if s.status == "running" {
        if let Some(r) = s.rate {
            parts.push(format!("{}/s", bytes(r as u64)));
        }
        if let Some(eta) = s.eta() {
            parts.push(format!("ETA {}", duration(eta)));
        }
    } else {
        parts.push(s.status.to_string());
    }
    match s.percent() {
        Some(p) => format!("job '{}': {p}% ({})", s.id, parts.join(", ")),
        None => format!("job '{}': {}", s.id, parts.join(", ")),
    }
}

/// A byte count in binary units with one decimal (`512 B`, `1.5 KiB`, `230.0 MiB`).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Seconds as `M:SS` or `H:MM:SS`, rounded up (an ETA of 0.2 s shows `0:01`).
pub fn duration(secs: f64) -> String {
    let t = secs.max(0.0).ceil().min(u32::MAX as f64) as u64;
    let (h, m, s) = (t / 3600, (t / 60) % 60, t % 60);
    if h > 0 {
        format!("{h}:{m:02}:{s:02}")
    } else {
        format!("{m}:{s:02}")
    }
}

/// The rate of progress over the last [`Rate::WINDOW`] seconds.
#[derive(Debug, Default)]
pub struct Rate {
    /// (seconds since some fixed start, progress), oldest first.
    samples: VecDeque<(f64, u64)>,
}

impl Rate {
    pub const WINDOW: f64 = 5.0;
    /// Shorter spans than this give no rate: two samples close together say little.
    const MIN_SPAN: f64 = 0.5;

    pub fn add(&mut self, t: f64, current: u64) {
        if self.samples.back().is_some_and(|&(_, c)| current < c) {
            // Progress went back (a job restarted its count): start over.
            self.samples.clear();
        }
        self.samples.push_back((t, current));
        while self.samples.len() > 2 && t - self.samples[1].0 >= Self::WINDOW {
            self.samples.pop_front();
        }
    }

    /// Bytes per second, once the samples span [`Rate::MIN_SPAN`].
    pub fn get(&self) -> Option<f64> {
        let (&(t0, c0), &(t1, c1)) = (self.samples.front()?, self.samples.back()?);
        let span = t1 - t0;
        (span >= Self::MIN_SPAN).then(|| (c1 - c0) as f64 / span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn snap(status: &str, current: u64, total: u64, rate: Option<f64>) -> Snapshot<'_> {
        Snapshot {
            id: "s0",
            status,
            current,
            total,
            rate,
        }
    }

    #[test]
    fn bytes_in_binary_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(230 * MIB), "230.0 MiB");
        assert_eq!(bytes(3 << 40), "3.0 TiB");
    }

    #[test]
    fn duration_rounds_up_and_shows_hours() {
        assert_eq!(duration(0.2), "0:01");
        assert_eq!(duration(59.0), "0:59");
        assert_eq!(duration(61.5), "1:02");
        assert_eq!(duration(3723.0), "1:02:03");
        assert_eq!(duration(-1.0), "0:00");
    }

    #[test]
    fn bar_line_running_with_rate_and_eta() {
        let s = snap("running", 256 * MIB, 512 * MIB, Some(128.0 * MIB as f64));
        assert_eq!(
            bar_line(&s, 100),
            "s0 [###############...............]  50%  256.0 MiB / 512.0 MiB  128.0 MiB/s  ETA 0:02"
        );
    }

    #[test]
    fn bar_line_without_rate_shows_unknown_eta_and_status_when_not_running() {
        assert_eq!(
            bar_line(&snap("running", 0, 10 * MIB, None), 80),
            "s0 [.....................]   0%  0 B / 10.0 MiB  ETA --:--"
        );
        assert_eq!(
            bar_line(&snap("paused", 5 * MIB, 10 * MIB, Some(1.0)), 80),
            "s0 [##########...........]  50%  5.0 MiB / 10.0 MiB  paused"
        );
    }

    #[test]
    fn bar_line_fits_narrow_terminals() {
        let s = snap("running", 256 * MIB, 512 * MIB, Some(128.0 * MIB as f64));
        let l = bar_line(&s, 70);
        assert_eq!(
            l,
            "s0 [#####......]  50%  256.0 MiB / 512.0 MiB  128.0 MiB/s  ETA 0:02"
        );
        let l = bar_line(&s, 40);
        assert_eq!(l.len(), 39, "{l}");
        assert!(l.starts_with("s0  50%"), "{l}");
    }

    #[test]
    fn plain_line_running_and_paused() {
        assert_eq!(
            plain_line(&snap(
                "running",
                256 * MIB,
                512 * MIB,
                Some(128.0 * MIB as f64)
            )),
            "job 's0': 50% (256.0 MiB of 512.0 MiB, 128.0 MiB/s, ETA 0:02)"
        );
        assert_eq!(
            plain_line(&snap("ready", 512 * MIB, 512 * MIB, None)),
            "job 's0': 100% (512.0 MiB of 512.0 MiB, ready)"
        );
        assert_eq!(
            plain_line(&snap("running", 0, 0, None)),
            "job 's0': 0 B of 0 B"
        );
    }

    #[test]
    fn rate_over_sliding_window() {
        let mut r = Rate::default();
        r.add(0.0, 0);
        assert_eq!(r.get(), None);
        r.add(0.25, 10);
        assert_eq!(r.get(), None);
        r.add(1.0, 100);
        assert_eq!(r.get(), Some(100.0));
        // Ten seconds later at a new pace: the old samples have left the window.
        for i in 1..=40 {
            r.add(1.0 + i as f64 * 0.25, 100 + i * 1000);
        }
        let rate = r.get().unwrap();
        assert!((rate - 4000.0).abs() < 1e-6, "{rate}");
    }

    #[test]
    fn rate_restarts_when_progress_goes_back() {
        let mut r = Rate::default();
        r.add(0.0, 100);
        r.add(1.0, 200);
        r.add(2.0, 50);
        assert_eq!(r.get(), None);
    }
}
