//! `--wait`: follow one job from its command's reply to its end.
//!
//! Two sources, because neither is enough alone: events say *what happens* (status changes
//! in order, the outcome with its error in BLOCK_JOB_COMPLETED / BLOCK_JOB_CANCELLED, errors
//! under on-error=stop) and are never missed, since the connection was negotiated before the
//! command and events read while waiting for a reply are queued; `query-jobs`, polled a few
//! times a second, says *how far* it got (QEMU sends no progress events) and gives the error
//! of a job that waits concluded (auto-dismiss=false, or a job kind without BLOCK_JOB_*
//! events such as blockdev-create).
//!
//! The job ends for us when it reaches `null` (dismissed, by the server or by us), or when it
//! waits `concluded`: then its error is read from query-jobs and we dismiss it. Events are
//! always handled before deciding, in the order they came, so a job that auto-dismisses
//! (its `null` is sent right after `concluded`) is never dismissed twice. A job that waits
//! for a user (`ready` for job-complete, `pending` with auto-finalize=false) is reported and
//! followed further, or, with `--complete`, sent job-complete / job-finalize.

use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::conn::{Connection, Message, Reply};
use super::output::{event_line, Out};
use super::progress::{bar_line, bytes, plain_line, Rate, Snapshot};
use super::Exit;

/// How to follow the job.
#[derive(Debug, Clone)]
pub struct WaitOptions {
    /// The job's id.
    pub id: String,
    /// `--complete`: send job-complete when ready, job-finalize when it waits pending.
    pub complete: bool,
    /// The command asked for auto-finalize=false, so `pending` waits for job-finalize.
    pub manual_finalize: bool,
    /// `--events`: print every event too.
    pub print_events: bool,
    /// `--json`: events as the raw lines.
    pub json: bool,
}

/// How the job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Completed,
    Failed(String),
    Cancelled,
}

/// Redraws of the terminal bar (and polls of query-jobs).
const TTY_INTERVAL: Duration = Duration::from_millis(250);
/// Polls without a terminal; plain lines come at most once per [`PLAIN_LINE_EVERY`].
const PLAIN_INTERVAL: Duration = Duration::from_millis(500);
const PLAIN_LINE_EVERY: Duration = Duration::from_secs(1);

struct Follower<'a> {
    conn: &'a mut Connection,
    out: &'a mut Out,
    opts: &'a WaitOptions,
    start: Instant,
    kind: Option<String>,
    status: String,
    current: u64,
    total: u64,
    rate: Rate,
    outcome: Option<Outcome>,
    aborted: bool,
    concluded: bool,
    /// `null` seen: the job no longer exists.
    gone: bool,
    /// We dismissed it (or found it already gone).
    finished: bool,
    /// The last query-jobs did not list the job.
    unlisted: bool,
    /// Any event named the job.
    seen: bool,
    /// The waiting status last reported (`ready`, `pending`), to say it once.
    said_waiting: Option<String>,
    last_plain: Option<(Instant, u64, String)>,
}

/// Follows the job until it ends; returns how it ended.
pub fn follow(
    conn: &mut Connection,
    out: &mut Out,
    opts: &WaitOptions,
    start: Instant,
) -> Result<Outcome, Exit> {
    let mut f = Follower {
        conn,
        out,
        opts,
        start,
        kind: None,
        status: "created".into(),
        current: 0,
        total: 0,
        rate: Rate::default(),
        outcome: None,
        aborted: false,
        concluded: false,
        gone: false,
        finished: false,
        unlisted: false,
        seen: false,
        said_waiting: None,
        last_plain: None,
    };
    f.run()
}

impl Follower<'_> {
    fn run(&mut self) -> Result<Outcome, Exit> {
        let interval = if self.out.is_tty() {
            TTY_INTERVAL
        } else {
            PLAIN_INTERVAL
        };
        let mut next_poll = Instant::now();
        loop {
            while let Some(m) = self.conn.events.pop_front() {
                self.event(&m)?;
            }
            if self.gone || self.finished {
                break;
            }
            if self.concluded {
                self.collect_concluded()?;
                continue;
            }
            if self.unlisted {
                let id = &self.opts.id;
                return Err(Exit::Failed(if self.seen {
                    format!("job '{id}' disappeared (dismissed by another client?)")
                } else {
                    format!("the command started no job '{id}' (query-jobs does not list it)")
                }));
            }
            if Instant::now() >= next_poll {
                self.poll()?;
                next_poll = Instant::now() + interval;
                self.draw(false);
                continue;
            }
            if let Some(m) = self.conn.next(Some(next_poll)).map_err(|e| {
                Exit::Failed(format!("{e} while job '{}' was running", self.opts.id))
            })? {
                if m.event().is_some() {
                    self.event(&m)?;
                }
            }
        }
        let outcome = self.outcome.clone().unwrap_or(if self.aborted {
            Outcome::Failed("the job was aborted".into())
        } else {
            Outcome::Completed
        });
        if outcome == Outcome::Completed {
            // The last poll may predate the end; a completed job did all its work.
            self.current = self.current.max(self.total);
        }
        self.status = match outcome {
            Outcome::Completed => "completed",
            Outcome::Failed(_) => "failed",
            Outcome::Cancelled => "cancelled",
        }
        .into();
        if self.out.is_tty() {
            self.draw(true);
            self.out.end_bar();
        }
        if outcome == Outcome::Completed {
            let secs = self.start.elapsed().as_secs_f64();
            let kind = self
                .kind
                .as_deref()
                .map(|k| format!(" ({k})"))
                .unwrap_or_default();
            let rate = if secs > 0.0 && self.total > 0 {
                format!(", {}/s", bytes((self.total as f64 / secs) as u64))
            } else {
                String::new()
            };
            self.out.line(&format!(
                "job '{}'{kind} completed: {} in {secs:.1} s{rate}",
                self.opts.id,
                bytes(self.total)
            ));
        }
        Ok(outcome)
    }

    fn ours(&self, data: &Value, key: &str) -> bool {
        data.get(key).and_then(Value::as_str) == Some(self.opts.id.as_str())
    }

    fn event(&mut self, m: &Message) -> Result<(), Exit> {
        if self.opts.print_events {
            let line = if self.opts.json {
                m.raw.clone()
            } else {
                event_line(m)
            };
            self.out.line(&line);
        }
        let data = m.data();
        let id = self.opts.id.clone();
        match m.event() {
            Some("JOB_STATUS_CHANGE") if self.ours(data, "id") => {
                self.seen = true;
                let status = data["status"].as_str().unwrap_or("").to_string();
                let was = std::mem::replace(&mut self.status, status.clone());
                match status.as_str() {
                    "ready" => self.waits(
                        "ready",
                        "job-complete",
                        "waiting for job-complete (send it, or use --complete)",
                    )?,
                    "pending" if self.opts.manual_finalize => self.waits(
                        "pending",
                        "job-finalize",
                        "waiting for job-finalize (auto-finalize=false; send it, or use \
                         --complete)",
                    )?,
                    "paused" if !self.out.is_tty() => {
                        self.out.line(&format!("job '{id}' is paused"))
                    }
                    "running" if was == "paused" && !self.out.is_tty() => {
                        self.out.line(&format!("job '{id}' is running again"))
                    }
                    "aborting" => self.aborted = true,
                    "concluded" => {
                        self.concluded = true;
                        if let Some(e) = data.get("error").and_then(Value::as_str) {
                            self.outcome.get_or_insert(Outcome::Failed(e.to_string()));
                        }
                    }
                    "null" => self.gone = true,
                    _ => {}
                }
                self.draw(false);
            }
            Some(name @ ("BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED"))
                if self.ours(data, "device") =>
            {
                self.seen = true;
                if let (Some(len), Some(off)) = (data["len"].as_u64(), data["offset"].as_u64()) {
                    self.total = len;
                    self.current = off;
                }
                if let Some(t) = data["type"].as_str() {
                    self.kind.get_or_insert_with(|| t.to_string());
                }
                let outcome = match (name, data.get("error").and_then(Value::as_str)) {
                    ("BLOCK_JOB_CANCELLED", _) => Outcome::Cancelled,
                    (_, Some(e)) => Outcome::Failed(e.to_string()),
                    (_, None) => Outcome::Completed,
                };
                self.outcome.get_or_insert(outcome);
            }
            Some("BLOCK_JOB_ERROR") if self.ours(data, "device") => {
                let op = data["operation"].as_str().unwrap_or("I/O");
                let action = data["action"].as_str().unwrap_or("?");
                let then = if action == "stop" {
                    format!("; the job pauses until job-resume id={id}")
                } else {
                    String::new()
                };
                self.out.line(&format!(
                    "job '{id}': {op} error (on-error action: {action}){then}"
                ));
            }
            _ => {}
        }
        Ok(())
    }

    /// The job waits for `verb`: send it with --complete, else say so once and keep
    /// following.
    fn waits(&mut self, status: &str, verb: &str, why: &str) -> Result<(), Exit> {
        let id = self.opts.id.clone();
        if self.opts.complete {
            self.out
                .line(&format!("job '{id}' is {status}: sending {verb}"));
            let mut args = Map::new();
            args.insert("id".into(), json!(id));
            match self.conn.execute(verb, &args).map_err(lost)? {
                Reply::Return(_) => Ok(()),
                Reply::Error { class, desc } => Err(Exit::Failed(format!(
                    "{verb} of job '{id}' failed: {class}: {desc}"
                ))),
            }
        } else {
            if self.said_waiting.as_deref() != Some(status) {
                self.said_waiting = Some(status.to_string());
                self.out.line(&format!("job '{id}' is {status}: {why}"));
            }
            Ok(())
        }
    }

    /// The job is concluded and not yet gone: take its error from query-jobs and dismiss
    /// it, unless it turns out to be gone already.
    fn collect_concluded(&mut self) -> Result<(), Exit> {
        let Some(job) = self.query()? else {
            // Not listed: its `null` event came before this reply and is queued.
            self.finished = true;
            return Ok(());
        };
        if job["status"] != "concluded" {
            // Concluded and then... something else; follow the events.
            self.concluded = false;
            return Ok(());
        }
        if let Some(e) = job.get("error").and_then(Value::as_str) {
            self.outcome.get_or_insert(Outcome::Failed(e.to_string()));
        }
        self.update(&job);
        let mut args = Map::new();
        args.insert("id".into(), json!(self.opts.id));
        // An error here means someone dismissed it first; the outcome is known either way.
        let _ = self.conn.execute("job-dismiss", &args).map_err(lost)?;
        self.finished = true;
        Ok(())
    }

    /// Polls query-jobs for progress.
    fn poll(&mut self) -> Result<(), Exit> {
        match self.query()? {
            Some(job) => self.update(&job),
            None => self.unlisted = true,
        }
        Ok(())
    }

    /// The job's query-jobs entry, if listed.
    fn query(&mut self) -> Result<Option<Value>, Exit> {
        match self.conn.execute("query-jobs", &Map::new()).map_err(lost)? {
            Reply::Return(Value::Array(jobs)) => {
                Ok(jobs.into_iter().find(|j| j["id"] == self.opts.id.as_str()))
            }
            Reply::Return(other) => Err(Exit::Failed(format!(
                "query-jobs returned {other}, not a list"
            ))),
            Reply::Error { class, desc } => {
                Err(Exit::Failed(format!("query-jobs failed: {class}: {desc}")))
            }
        }
    }

    fn update(&mut self, job: &Value) {
        if let (Some(cur), Some(total)) = (
            job["current-progress"].as_u64(),
            job["total-progress"].as_u64(),
        ) {
            self.current = cur;
            self.total = total;
            self.rate.add(self.start.elapsed().as_secs_f64(), cur);
        }
        if let Some(t) = job["type"].as_str() {
            self.kind.get_or_insert_with(|| t.to_string());
        }
    }

    /// The bar on a terminal; otherwise a plain line when a second has passed and something
    /// changed.
    fn draw(&mut self, final_draw: bool) {
        let snap = Snapshot {
            id: &self.opts.id,
            status: &self.status,
            current: self.current,
            total: self.total,
            rate: self.rate.get(),
        };
        // Only the states a job stays in are shown; `created`, `waiting`, `pending`,
        // `aborting`... pass in a moment, and the end is drawn by `run` with its outcome.
        let lasting = match self.status.as_str() {
            "running" | "paused" | "ready" | "standby" => true,
            "pending" => self.opts.manual_finalize,
            _ => final_draw,
        };
        if !lasting || (self.total == 0 && !final_draw) {
            return;
        }
        if self.out.is_tty() {
            let line = bar_line(&snap, self.out.width());
            self.out.bar(&line);
            return;
        }
        let now = Instant::now();
        let due = match &self.last_plain {
            None => true,
            Some((t, cur, status)) => {
                now.duration_since(*t) >= PLAIN_LINE_EVERY
                    && (*cur != self.current || *status != self.status)
            }
        };
        if due {
            let line = plain_line(&snap);
            self.out.line(&line);
            self.last_plain = Some((now, self.current, self.status.clone()));
        }
    }
}

fn lost(e: super::conn::ConnError) -> Exit {
    Exit::Failed(e.to_string())
}

/// The id of the job a command starts, if it is one `--wait` can follow: its `job-id`, or
/// for block-stream and block-commit (whose job-id defaults to the device) the `device`.
pub fn job_id(command: &str, args: &Map<String, Value>) -> Option<String> {
    let text = |k: &str| args.get(k).and_then(Value::as_str).map(str::to_string);
    text("job-id").or_else(|| {
        matches!(command, "block-stream" | "block-commit")
            .then(|| text("device"))
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn job_id_from_job_id_or_device_of_stream_and_commit() {
        assert_eq!(
            job_id(
                "block-stream",
                &args(json!({"job-id": "s0", "device": "top"}))
            ),
            Some("s0".into())
        );
        assert_eq!(
            job_id("block-commit", &args(json!({"device": "top"}))),
            Some("top".into())
        );
        assert_eq!(
            job_id(
                "blockdev-mirror",
                &args(json!({"job-id": "m", "device": "a"}))
            ),
            Some("m".into())
        );
        assert_eq!(
            job_id("blockdev-mirror", &args(json!({"device": "a"}))),
            None
        );
        assert_eq!(job_id("query-jobs", &args(json!({}))), None);
    }
}
