//! `sluice qmp`: a QMP command line for `sluice daemon`, qemu-storage-daemon and QEMU.
//!
//! One command per run: connect ([`conn`]), negotiate, send the command built from
//! `key=value` words or a JSON object ([`args`], parsed before connecting so a typo never
//! reaches the server), print the `return` value pretty (or the raw line with `--json`).
//! `--events` then prints events as they come; `--wait` follows the job the command started
//! to its end with a progress bar ([`job`], [`progress`], [`output`]).
//!
//! Exit status, as for the rest of the binary: 0 success; 1 an error reply, a failed or
//! cancelled job, or a connection lost midway; 2 bad input — a bad argument, a monitor that
//! cannot be reached or is not QMP. Every failure is one `sluice:` line on stderr.
//!
//! The client is blocking and single-threaded, with no new dependency: the wire is one JSON
//! object per line, which serde_json parses, and event data is written back in QEMU's style
//! with `sluice_proto::qmp::write_value`. The process ends on SIGINT as any command-line tool
//! does: nothing is left half-done on the server by stopping to watch a job.

mod args;
mod conn;
mod job;
mod output;
mod progress;

use std::time::Instant;

use clap::Args;
use serde_json::Value;

use conn::{Address, ConnError, Connection, Reply};
use output::{event_line, Out};

const SOCKET_HELP: &str = "\
SOCKET is the monitor's Unix socket path, or HOST:PORT for TCP (a word with a '/' is always
a path).";

const WAIT_HELP: &str = "\
--wait follows the job a command starts: block-stream and block-commit (job-id, else the
device), and any command with a job-id argument. On a terminal it draws a progress bar
(bytes done/total, rate, ETA); otherwise it prints a progress line at most once a second.
It ends when the job ends, dismissing it if it waits concluded (auto-dismiss=false), and
exits 0 if the job completed, 1 with the job's error if it failed or was cancelled. A job
that becomes ready (active commit, mirror) is reported and followed until someone sends
job-complete; --complete sends it (and job-finalize to a job made with auto-finalize=false).

Exit status: 0 success; 1 an error reply (its class and desc on stderr), a failed job, or a
connection lost midway; 2 bad arguments or a monitor that cannot be reached.

Examples:
  sluice qmp /tmp/qmp.sock query-version
  sluice qmp /tmp/qmp.sock blockdev-add driver=qcow2 node-name=top \\
      file.driver=file file.filename=top.qcow2
  sluice qmp /tmp/qmp.sock block-stream '{\"job-id\": \"s0\", \"device\": \"top\"}' --wait
  sluice qmp /tmp/qmp.sock block-commit job-id=c0 device=top --wait --complete
  sluice qmp localhost:4444 --events";

/// The text after the options in `--help`.
fn after_help() -> String {
    format!("{SOCKET_HELP}\n\n{}\n\n{WAIT_HELP}", args::RULE)
}

/// Arguments of `sluice qmp`.
#[derive(Debug, Args)]
#[command(after_help = after_help())]
pub struct QmpArgs {
    /// The QMP monitor: a Unix socket path, or HOST:PORT.
    #[arg(value_name = "SOCKET")]
    socket: String,

    /// The command to run (query-version, blockdev-add, block-stream, ...). Optional with
    /// --events.
    #[arg(value_name = "COMMAND")]
    command: Option<String>,

    /// The command's arguments: KEY=VALUE words or one JSON object (see below).
    #[arg(value_name = "ARGUMENTS")]
    arguments: Vec<String>,

    /// Print the reply (and events) as the raw lines the server sent.
    #[arg(long)]
    json: bool,

    /// After the command, or without one, print events as they arrive (time, name, data)
    /// until interrupted or the server closes the connection.
    #[arg(long)]
    events: bool,

    /// Follow the job the command starts until it ends, showing its progress.
    #[arg(long)]
    wait: bool,

    /// With --wait: complete the job when it becomes ready (job-complete), finalize it
    /// when it waits pending (job-finalize).
    #[arg(long, requires = "wait")]
    complete: bool,
}

/// How a run fails: the line for stderr and which exit status.
#[derive(Debug)]
pub enum Exit {
    /// Bad input: exit status 2.
    Usage(String),
    /// A failure at run time: exit status 1.
    Failed(String),
}

impl From<ConnError> for Exit {
    fn from(e: ConnError) -> Exit {
        if e.is_usage() {
            Exit::Usage(e.to_string())
        } else {
            Exit::Failed(e.to_string())
        }
    }
}

/// Runs `sluice qmp`; returns the exit status.
pub fn main(a: QmpArgs) -> i32 {
    match run(&a) {
        Ok(()) => 0,
        Err(Exit::Usage(m)) => {
            eprintln!("sluice: {m}");
            2
        }
        Err(Exit::Failed(m)) => {
            eprintln!("sluice: {m}");
            1
        }
    }
}

fn run(a: &QmpArgs) -> Result<(), Exit> {
    let arguments = args::parse(&a.arguments).map_err(|e| Exit::Usage(e.to_string()))?;
    let wait = match (&a.command, a.wait) {
        (None, false) if !a.events => {
            return Err(Exit::Usage(
                "give a COMMAND, or --events to watch events (see --help)".into(),
            ))
        }
        (None, true) => {
            return Err(Exit::Usage(
                "--wait needs a COMMAND that starts a job".into(),
            ))
        }
        (Some(cmd), true) => {
            let Some(id) = job::job_id(cmd, &arguments) else {
                return Err(Exit::Usage(format!(
                    "--wait: cannot tell which job {cmd} starts (give it a job-id argument)"
                )));
            };
            Some(job::WaitOptions {
                id,
                complete: a.complete,
                manual_finalize: arguments.get("auto-finalize") == Some(&Value::Bool(false)),
                print_events: a.events,
                json: a.json,
            })
        }
        _ => None,
    };

    let addr = Address::parse(&a.socket);
    let mut conn = Connection::open(&addr)?;
    let mut out = Out::new();
    let start = Instant::now();

    if let Some(cmd) = &a.command {
        let (msg, reply) = conn.execute_message(cmd, &arguments).map_err(|e| match e {
            ConnError::Closed => Exit::Failed(format!(
                "the QMP server closed the connection before replying to {cmd}"
            )),
            e => e.into(),
        })?;
        // Events that came before the reply, in order, when they are to be shown and no
        // job follower will show them.
        if a.events && wait.is_none() {
            while let Some(m) = conn.events.pop_front() {
                print_event(&mut out, &m, a.json);
            }
        }
        match reply {
            Reply::Error { class, desc } => {
                if a.json {
                    out.line(&msg.raw);
                }
                return Err(Exit::Failed(format!("{class}: {desc}")));
            }
            Reply::Return(v) => {
                if a.json {
                    out.line(&msg.raw);
                } else if !(wait.is_some() && v == Value::Object(Default::default())) {
                    out.line(&serde_json::to_string_pretty(&v).expect("JSON serializes"));
                }
            }
        }
    }

    if let Some(opts) = wait {
        return match job::follow(&mut conn, &mut out, &opts, start)? {
            job::Outcome::Completed => Ok(()),
            job::Outcome::Failed(e) => Err(Exit::Failed(format!("job '{}' failed: {e}", opts.id))),
            job::Outcome::Cancelled => {
                Err(Exit::Failed(format!("job '{}' was cancelled", opts.id)))
            }
        };
    }

    if a.events {
        loop {
            match conn.next(None) {
                Ok(Some(m)) => {
                    if m.event().is_some() {
                        print_event(&mut out, &m, a.json);
                    }
                }
                Ok(None) => {}
                Err(ConnError::Closed) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

fn print_event(out: &mut Out, m: &conn::Message, json: bool) {
    if json {
        out.line(&m.raw);
    } else {
        out.line(&event_line(m));
    }
}
