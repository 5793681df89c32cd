//! The job framework against a scripted driver: tables, event order, verbs, rate limit,
//! on-error policies. Slow jobs are made with a rate limit of 1 byte/s, so they sleep
//! (interruptibly) after their first step and tests never depend on timing for correctness.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::broadcast;

use super::*;
use crate::events::EventMsg;
use crate::graph::{BuiltinLoader, DriverRegistry};
use crate::state::{Daemon, DaemonConfig, State};
use sluice_qapi::runtime::CompatPolicy;

/// A driver of `steps` steps of `step` bytes; step `fail_at` fails (once) with EIO.
struct Script {
    steps: u64,
    step: u64,
    fail_at: Option<u64>,
}

impl JobDriver<State> for Script {
    fn run(&mut self, ctx: &mut JobCtx<'_, State>) -> Result<(), WorkError> {
        ctx.set_total(self.steps * self.step);
        let mut i = 0;
        while i < self.steps {
            if self.fail_at == Some(i) {
                self.fail_at = None;
                match ctx.io_error(IoOperationType::Read, false)? {
                    ErrorAction::Report => {
                        return Err(WorkError::Failed("Input/output error".into()))
                    }
                    ErrorAction::Retry => continue,
                    ErrorAction::Ignore => {}
                }
            }
            ctx.progress(self.step);
            ctx.throttle(self.step)?;
            i += 1;
        }
        Ok(())
    }
}

struct Fixture {
    daemon: Arc<Daemon>,
    rx: broadcast::Receiver<Arc<EventMsg>>,
}

fn fixture() -> Fixture {
    let daemon = Daemon::new(DaemonConfig {
        objects: Default::default(),
        policy: CompatPolicy::default(),
        drivers: DriverRegistry::builtin(Arc::new(BuiltinLoader)),
        nbd: sluice_server::ServerConfig::default(),
    });
    let rx = daemon.events().subscribe();
    Fixture { daemon, rx }
}

fn params(id: &str) -> JobParams {
    JobParams {
        id: id.to_string(),
        job_type: JobType::Stream,
        auto_finalize: true,
        auto_dismiss: true,
        speed: 0,
        on_error: BlockdevOnError::Report,
        nodes: vec![format!("{id}-node")],
        writes: Vec::new(),
        total: 0,
        completable: false,
    }
}

impl Fixture {
    fn start(&self, p: JobParams, d: Script) -> Result<Arc<Job<State>>, QmpError> {
        let mut st = self.daemon.lock();
        Job::start(&self.daemon, &mut st, p, Box::new(d))
    }

    /// A job that does one 1 MiB step and then sleeps (rate limit 1 byte/s).
    fn slow(&self, p: JobParams) -> Arc<Job<State>> {
        let p = JobParams { speed: 1, ..p };
        self.start(
            p,
            Script {
                steps: 4,
                step: 1 << 20,
                fail_at: None,
            },
        )
        .unwrap()
    }

    /// The next event as `name` or `name:status` (JOB_STATUS_CHANGE) plus its data.
    fn event(&mut self) -> (String, Value) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.rx.try_recv() {
                Ok(m) => {
                    let v: Value = serde_json::from_slice(&m.bytes).unwrap();
                    let data = v["data"].clone();
                    let name = match data["status"].as_str() {
                        Some(s) if m.name == "JOB_STATUS_CHANGE" => format!("{}:{s}", m.name),
                        _ => m.name.to_string(),
                    };
                    return (name, data);
                }
                Err(broadcast::error::TryRecvError::Empty) => {
                    assert!(Instant::now() < deadline, "no event in 20 s");
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("event channel: {e}"),
            }
        }
    }

    fn names(&mut self, n: usize) -> Vec<String> {
        (0..n).map(|_| self.event().0).collect()
    }

    fn assert_no_event(&mut self) {
        assert!(self.rx.try_recv().is_err());
    }

    /// Waits until the job's progress is at least `n` (it makes its first step at once).
    fn wait_progress(&self, job: &Job<State>, n: i64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while job.info().current_progress < n {
            assert!(Instant::now() < deadline, "no progress in 20 s");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

fn status_names(v: &[&str]) -> Vec<String> {
    v.iter()
        .map(|s| match *s {
            s if s.starts_with("BLOCK_") => s.to_string(),
            s => format!("JOB_STATUS_CHANGE:{s}"),
        })
        .collect()
}

#[test]
fn transition_table_has_qemus_twenty_edges() {
    let all = [
        JobStatus::Undefined,
        JobStatus::Created,
        JobStatus::Running,
        JobStatus::Paused,
        JobStatus::Ready,
        JobStatus::Standby,
        JobStatus::Waiting,
        JobStatus::Pending,
        JobStatus::Aborting,
        JobStatus::Concluded,
        JobStatus::Null,
    ];
    let n = all
        .iter()
        .flat_map(|a| all.iter().map(move |b| (*a, *b)))
        .filter(|(a, b)| transition_allowed(*a, *b))
        .count();
    assert_eq!(n, 20);
    assert!(transition_allowed(JobStatus::Aborting, JobStatus::Aborting));
    assert!(!transition_allowed(JobStatus::Paused, JobStatus::Aborting));
    assert!(!transition_allowed(JobStatus::Null, JobStatus::Created));
}

#[test]
fn verb_table_matches_qemus() {
    use JobStatus::*;
    assert!(verb_allowed(JobVerb::Cancel, Pending));
    assert!(!verb_allowed(JobVerb::Cancel, Concluded));
    assert!(verb_allowed(JobVerb::Pause, Standby));
    assert!(!verb_allowed(JobVerb::Pause, Waiting));
    assert!(verb_allowed(JobVerb::Complete, Ready));
    assert!(!verb_allowed(JobVerb::Complete, Running));
    assert!(verb_allowed(JobVerb::Finalize, Pending));
    assert!(!verb_allowed(JobVerb::Finalize, Running));
    assert!(verb_allowed(JobVerb::Dismiss, Concluded));
    assert!(!verb_allowed(JobVerb::Dismiss, Pending));
    assert!(verb_allowed(JobVerb::SetSpeed, Paused));
}

#[test]
fn job_defaults_events_in_qsd_order_then_gone() {
    let mut f = fixture();
    f.start(
        params("j0"),
        Script {
            steps: 3,
            step: 4096,
            fail_at: None,
        },
    )
    .unwrap();
    assert_eq!(
        f.names(7),
        status_names(&[
            "created",
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ])
    );
    assert!(f.daemon.lock().jobs.get("j0").is_none());
}

#[test]
fn job_completed_event_has_qsd_payload() {
    let mut f = fixture();
    f.start(
        params("j0"),
        Script {
            steps: 2,
            step: 4096,
            fail_at: None,
        },
    )
    .unwrap();
    let (_, data) = (0..5).map(|_| f.event()).last().unwrap();
    assert_eq!(
        data,
        json!({"type": "stream", "device": "j0", "len": 8192, "offset": 8192, "speed": 0})
    );
    // Success: the concluded event has no `error`.
    assert_eq!(f.event().1, json!({"id": "j0", "status": "concluded"}));
}

#[test]
fn job_auto_finalize_false_waits_in_pending_until_finalize() {
    let mut f = fixture();
    let p = JobParams {
        auto_finalize: false,
        auto_dismiss: false,
        ..params("j0")
    };
    let job = f
        .start(
            p,
            Script {
                steps: 1,
                step: 512,
                fail_at: None,
            },
        )
        .unwrap();
    assert_eq!(
        f.names(5),
        status_names(&[
            "created",
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_PENDING"
        ])
    );
    f.assert_no_event();
    assert_eq!(job.status(), JobStatus::Pending);
    job.finalize(&mut f.daemon.lock()).unwrap();
    assert_eq!(
        f.names(2),
        status_names(&["BLOCK_JOB_COMPLETED", "concluded"])
    );
    assert_eq!(job.info().error, None);
    job.dismiss(&mut f.daemon.lock()).unwrap();
    assert_eq!(f.names(1), status_names(&["null"]));
    assert!(f.daemon.lock().jobs.get("j0").is_none());
}

#[test]
fn job_verbs_in_wrong_state_refused_with_qemus_message() {
    let f = fixture();
    let job = f.slow(params("big0"));
    let mut st = f.daemon.lock();
    let msg = |r: Result<(), QmpError>| r.unwrap_err().to_string();
    assert_eq!(
        msg(job.finalize(&mut st)),
        "Job 'big0' in state 'running' cannot accept command verb 'finalize'"
    );
    assert_eq!(
        msg(job.dismiss(&mut st)),
        "Job 'big0' in state 'running' cannot accept command verb 'dismiss'"
    );
    assert_eq!(
        msg(job.complete()),
        "Job 'big0' in state 'running' cannot accept command verb 'complete'"
    );
    assert_eq!(msg(job.resume()), "Can't resume a job that was not paused");
    assert_eq!(
        job.finalize(&mut st).unwrap_err().class,
        crate::ErrorClass::GenericError
    );
    job.cancel(&mut st, true).unwrap();
}

#[test]
fn job_duplicate_or_malformed_id_refused() {
    let f = fixture();
    let job = f.slow(params("big0"));
    let e = f.slow_err(params("big0"));
    assert_eq!(e, "Job ID 'big0' already in use");
    let e = f.slow_err(params("0bad"));
    assert_eq!(e, "Invalid job ID '0bad'");
    job.cancel(&mut f.daemon.lock(), true).unwrap();
}

impl Fixture {
    fn slow_err(&self, p: JobParams) -> String {
        self.start(
            p,
            Script {
                steps: 1,
                step: 1,
                fail_at: None,
            },
        )
        .unwrap_err()
        .to_string()
    }
}

#[test]
fn job_pause_freezes_progress_and_resume_continues() {
    let mut f = fixture();
    let job = f.slow(params("j0"));
    f.wait_progress(&job, 1 << 20);
    job.pause().unwrap();
    let at = job.info().current_progress;
    assert_eq!(job.info().status, JobStatus::Paused);
    assert!(job.block_info().paused);
    assert!(!job.block_info().busy);
    assert_eq!(
        job.pause().unwrap_err().to_string(),
        "Job is already paused"
    );
    // The limit is lifted while paused: a running job would finish at once.
    job.set_speed(0).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(job.info().current_progress, at);
    job.resume().unwrap();
    assert_eq!(
        f.names(9),
        status_names(&[
            "created",
            "running",
            "paused",
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null",
        ])
    );
    assert_eq!(job.info().current_progress, 4 << 20);
}

#[test]
fn job_cancel_running_emits_cancelled_and_keeps_error() {
    let mut f = fixture();
    let job = f.slow(JobParams {
        auto_dismiss: false,
        ..params("j0")
    });
    f.wait_progress(&job, 1 << 20);
    job.cancel(&mut f.daemon.lock(), true).unwrap();
    // Everything before the cancel's reply.
    assert_eq!(
        f.names(5),
        status_names(&[
            "created",
            "running",
            "aborting",
            "BLOCK_JOB_CANCELLED",
            "concluded"
        ])
    );
    f.assert_no_event();
    let info = job.info();
    assert_eq!(info.status, JobStatus::Concluded);
    assert_eq!(info.error.as_deref(), Some("Operation canceled"));
    assert_eq!(info.current_progress, 1 << 20);
    assert_eq!(
        job.cancel(&mut f.daemon.lock(), true)
            .unwrap_err()
            .to_string(),
        "Job 'j0' in state 'concluded' cannot accept command verb 'cancel'"
    );
}

#[test]
fn job_cancel_paused_without_force_refused_with_force_runs_then_aborts() {
    let mut f = fixture();
    let job = f.slow(params("e0"));
    job.pause().unwrap();
    assert_eq!(
        job.cancel(&mut f.daemon.lock(), false)
            .unwrap_err()
            .to_string(),
        "The block job for device 'e0' is currently paused"
    );
    job.cancel(&mut f.daemon.lock(), true).unwrap();
    assert_eq!(
        f.names(8),
        status_names(&[
            "created",
            "running",
            "paused",
            "running",
            "aborting",
            "BLOCK_JOB_CANCELLED",
            "concluded",
            "null"
        ])
    );
    assert!(f.daemon.lock().jobs.get("e0").is_none());
}

#[test]
fn job_cancel_pending_aborts_without_completion() {
    let mut f = fixture();
    let job = f
        .start(
            JobParams {
                auto_finalize: false,
                ..params("j0")
            },
            Script {
                steps: 1,
                step: 1,
                fail_at: None,
            },
        )
        .unwrap();
    f.names(5);
    job.cancel(&mut f.daemon.lock(), true).unwrap();
    assert_eq!(
        f.names(4),
        status_names(&["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"])
    );
}

#[test]
fn job_set_speed_negative_refused_zero_lifts_the_limit() {
    let mut f = fixture();
    let job = f.slow(params("j0"));
    assert_eq!(
        job.set_speed(-1).unwrap_err().to_string(),
        "Parameter 'speed' expects a non-negative value"
    );
    job.set_speed(0).unwrap();
    assert_eq!(job.block_info().speed, 0);
    assert_eq!(f.names(7).last().unwrap(), "JOB_STATUS_CHANGE:null");
}

#[test]
fn job_rate_limit_holds_over_time() {
    let mut f = fixture();
    // 10 steps of 64 KiB at 640 KiB/s: the first step is free, the other nine take 0.1 s
    // each at least.
    let t = Instant::now();
    f.start(
        JobParams {
            speed: 640 * 1024,
            ..params("j0")
        },
        Script {
            steps: 10,
            step: 64 * 1024,
            fail_at: None,
        },
    )
    .unwrap();
    assert_eq!(f.names(7).last().unwrap(), "JOB_STATUS_CHANGE:null");
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(850), "{took:?}");
}

#[test]
fn job_on_error_stop_pauses_with_error_event_and_resume_retries() {
    let mut f = fixture();
    let job = f
        .start(
            JobParams {
                on_error: BlockdevOnError::Stop,
                ..params("e0")
            },
            Script {
                steps: 3,
                step: 4096,
                fail_at: Some(1),
            },
        )
        .unwrap();
    assert_eq!(f.names(2), status_names(&["created", "running"]));
    let (name, data) = f.event();
    assert_eq!(name, "BLOCK_JOB_ERROR");
    assert_eq!(
        data,
        json!({"device": "e0", "operation": "read", "action": "stop"})
    );
    assert_eq!(f.names(1), status_names(&["paused"]));
    let bi = job.block_info();
    assert_eq!(bi.io_status, BlockDeviceIoStatus::Failed);
    assert!(bi.paused);
    assert_eq!(bi.offset, 4096);
    job.resume().unwrap();
    assert_eq!(job.block_info().io_status, BlockDeviceIoStatus::Ok);
    assert_eq!(
        f.names(6),
        status_names(&[
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ])
    );
}

#[test]
fn job_on_error_report_fails_with_error_in_completed() {
    let mut f = fixture();
    let job = f
        .start(
            JobParams {
                auto_dismiss: false,
                ..params("e1")
            },
            Script {
                steps: 3,
                step: 4096,
                fail_at: Some(0),
            },
        )
        .unwrap();
    let names: Vec<(String, Value)> = (0..6).map(|_| f.event()).collect();
    let only: Vec<&str> = names.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        only,
        status_names(&[
            "created",
            "running",
            "BLOCK_JOB_ERROR",
            "aborting",
            "BLOCK_JOB_COMPLETED",
            "concluded"
        ])
    );
    assert_eq!(names[2].1["action"], "report");
    // sluice's addition: the outcome on the concluded event (only on failure).
    assert_eq!(
        names[5].1,
        json!({"id": "e1", "status": "concluded", "error": "Input/output error"})
    );
    assert_eq!(
        names[4].1,
        json!({"type": "stream", "device": "e1", "len": 12288, "offset": 0, "speed": 0,
               "error": "Input/output error"})
    );
    assert_eq!(job.info().error.as_deref(), Some("Input/output error"));
}

#[test]
fn job_on_error_ignore_goes_on() {
    let mut f = fixture();
    f.start(
        JobParams {
            on_error: BlockdevOnError::Ignore,
            ..params("e2")
        },
        Script {
            steps: 2,
            step: 4096,
            fail_at: Some(0),
        },
    )
    .unwrap();
    let names = f.names(8);
    assert_eq!(names[2], "BLOCK_JOB_ERROR");
    assert_eq!(names[7], "JOB_STATUS_CHANGE:null");
}

#[test]
fn jobs_using_node_sees_only_live_jobs() {
    let f = fixture();
    let job = f.slow(JobParams {
        auto_dismiss: false,
        ..params("j0")
    });
    assert_eq!(
        f.daemon
            .lock()
            .jobs
            .using_node("j0-node")
            .map(|j| j.id.clone()),
        Some("j0".to_string())
    );
    job.cancel(&mut f.daemon.lock(), true).unwrap();
    assert!(f.daemon.lock().jobs.using_node("j0-node").is_none());
}

/// A copy function for [`Workers`] tests: fills the buffer with the run's first byte of
/// offset, fails the run at offset 3 with EIO, panics at offset 13; records the threads.
fn scripted_copy(
    threads: &Mutex<std::collections::HashSet<std::thread::ThreadId>>,
) -> impl Fn(u64, u64, &mut Vec<u8>) -> Result<(), CopyError> + Sync + '_ {
    waiting_copy(threads, Duration::ZERO)
}

/// [`scripted_copy`] that sleeps `wait` in every copy, as a copy that waits for a disk.
fn waiting_copy(
    threads: &Mutex<std::collections::HashSet<std::thread::ThreadId>>,
    wait: Duration,
) -> impl Fn(u64, u64, &mut Vec<u8>) -> Result<(), CopyError> + Sync + '_ {
    move |offset, len, buf| {
        threads.lock().unwrap().insert(std::thread::current().id());
        std::thread::sleep(wait);
        assert_ne!(offset, 13, "scripted panic");
        buf.clear();
        buf.resize(len as usize, offset as u8);
        if offset == 3 {
            return Err(CopyError::Source(sluice_block::BlockError::new(
                sluice_block::Errno::EIO,
                "scripted",
            )));
        }
        Ok(())
    }
}

#[test]
fn workers_copy_a_batch_at_once_and_answer_in_order() {
    let threads = Mutex::new(Default::default());
    // Copies that wait: after the first batch (alone), the workers copy.
    let copy = waiting_copy(&threads, Duration::from_millis(2));
    let batch = [(1, 8), (2, 8), (3, 8), (4, 8)];
    let results = with_workers(4, copy, |w| {
        let mut all = Vec::new();
        for batch in [&batch[..], &batch, &[(5, 8)], &[]] {
            all.extend(w.copy(batch).into_iter().map(|r| r.is_ok()));
        }
        all
    });
    assert_eq!(
        results,
        [true, true, false, true, true, true, false, true, true]
    );
    // The workers took part (a batch of 4 on 4 threads), and were started once.
    let n = threads.lock().unwrap().len();
    assert!((2..=4).contains(&n), "{n} threads");
}

/// Batches are copied on the calling thread alone until a batch's copies wait; then on the
/// workers, with a batch copied alone again after 32 batches, then 64 if copies still wait.
#[test]
fn workers_copy_alone_until_the_copies_wait() {
    let threads = Mutex::new(Default::default());
    let copy = waiting_copy(&threads, Duration::from_millis(1));
    let batch = [(1, 8), (2, 8), (4, 8)];
    let alone: Vec<usize> = with_workers(3, copy, |w| {
        (1..=100)
            .filter(|_| {
                threads.lock().unwrap().clear();
                w.copy(&batch);
                threads.lock().unwrap().len() == 1
            })
            .collect()
    });
    assert_eq!(
        alone,
        [
            1,
            1 + PROBE_FIRST as usize + 1,
            1 + 3 * PROBE_FIRST as usize + 2
        ]
    );
    // Copies that only spend CPU: the first batch is copied alone (no worker wakes up).
    let threads = Mutex::new(Default::default());
    let copy = scripted_copy(&threads);
    with_workers(3, copy, |w| w.copy(&batch));
    assert_eq!(threads.lock().unwrap().len(), 1);
}

#[test]
fn workers_with_one_thread_copy_everything_on_the_caller() {
    let threads = Mutex::new(Default::default());
    let copy = scripted_copy(&threads);
    let results = with_workers(1, copy, |w| w.copy(&[(1, 8), (3, 8), (4, 8)]));
    assert!(results[0].is_ok() && results[1].is_err() && results[2].is_ok());
    assert_eq!(threads.lock().unwrap().len(), 1);
}

#[test]
fn workers_pass_a_panic_on_to_the_caller() {
    let threads = Mutex::new(Default::default());
    let copy = scripted_copy(&threads);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        with_workers(3, copy, |w| w.copy(&[(1, 8), (13, 8), (2, 8)]))
    }));
    assert!(r.is_err());
}
