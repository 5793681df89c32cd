//! Standard output of `sluice qmp`: whole lines, and on a terminal one progress line redrawn
//! in place.
//!
//! Everything goes through [`Out`] so that a line printed while a progress bar is showing
//! (an event, a "job is ready" note) first clears the bar, and the bar is redrawn after it,
//! instead of the two overwriting each other. Whether stdout is a terminal is decided once,
//! here. A write error ends the program: with a closed pipe (`| head`) quietly, as `cat`
//! would; otherwise with one line on stderr.

use std::io::{IsTerminal, Write};

use serde_json::Value;

use super::conn::Message;

/// Standard output.
pub struct Out {
    tty: bool,
    /// A progress line is on the screen without its newline.
    bar_shown: bool,
}

impl Out {
    pub fn new() -> Out {
        Out {
            tty: std::io::stdout().is_terminal(),
            bar_shown: false,
        }
    }

    pub fn is_tty(&self) -> bool {
        self.tty
    }

    /// Prints one line (clearing the progress bar first if it is showing).
    pub fn line(&mut self, text: &str) {
        let clear = if self.bar_shown { "\r\x1b[K" } else { "" };
        self.bar_shown = false;
        self.write(format!("{clear}{text}\n").as_bytes());
    }

    /// Draws the progress line in place (terminal only).
    pub fn bar(&mut self, text: &str) {
        self.bar_shown = true;
        self.write(format!("\r{text}\x1b[K").as_bytes());
    }

    /// Leaves the progress line on the screen and moves below it.
    pub fn end_bar(&mut self) {
        if self.bar_shown {
            self.bar_shown = false;
            self.write(b"\n");
        }
    }

    /// The terminal's width in columns (80 when it cannot be read).
    pub fn width(&self) -> usize {
        // SAFETY: `winsize` is plain data for which all-zero bytes are a valid value.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which points to ours.
        let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
        if ok && ws.ws_col > 0 {
            ws.ws_col as usize
        } else {
            80
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut out = std::io::stdout().lock();
        if let Err(e) = out.write_all(bytes).and_then(|_| out.flush()) {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                eprintln!("sluice: cannot write to standard output: {e}");
            }
            std::process::exit(1);
        }
    }
}

/// An event as one line: `2025-06-01 12:34:56.123456 NAME {data}` (local time, the data as
/// QEMU writes JSON: compact, `", "` and `": "` separators).
pub fn event_line(m: &Message) -> String {
    let ts = &m.value["timestamp"];
    let (s, us) = (ts["seconds"].as_i64(), ts["microseconds"].as_i64());
    let when = match (s, us) {
        (Some(s), Some(us)) if s >= 0 && us >= 0 => local_time(s, us),
        _ => "-".to_string(),
    };
    let name = m.event().unwrap_or("?");
    match m.value.get("data") {
        Some(data) if *data != Value::Null => {
            let mut json = Vec::new();
            sluice_proto::qmp::write_value(data, &mut json);
            format!("{when} {name} {}", String::from_utf8_lossy(&json))
        }
        _ => format!("{when} {name}"),
    }
}

/// `YYYY-MM-DD HH:MM:SS.uuuuuu` in the local time zone (TZ as the C library reads it).
fn local_time(secs: i64, micros: i64) -> String {
    let t = secs as libc::time_t;
    // SAFETY: `tm` is plain data (integers and a nullable pointer): all-zero is valid.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: localtime_r reads `t` and writes only the `tm` we pass; both outlive the call.
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return format!("{secs}.{micros:06}");
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{micros:06}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(raw: &str) -> Message {
        Message {
            raw: raw.into(),
            value: serde_json::from_str(raw).unwrap(),
        }
    }

    #[test]
    fn event_line_has_time_name_and_compact_data() {
        let l = event_line(&msg(
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "s0"}, "timestamp": {"seconds": 1700000000, "microseconds": 42}}"#,
        ));
        let (date, rest) = l.split_at(26);
        assert!(date.starts_with("2023-11-1"), "{l}");
        assert!(date.ends_with(".000042"), "{l}");
        assert_eq!(
            rest,
            r#" JOB_STATUS_CHANGE {"status": "running", "id": "s0"}"#
        );
    }

    #[test]
    fn event_line_without_data_or_clock() {
        assert_eq!(
            event_line(&msg(
                r#"{"event": "SHUTDOWN", "timestamp": {"seconds": -1, "microseconds": -1}}"#
            )),
            "- SHUTDOWN"
        );
    }
}
