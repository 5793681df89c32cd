//! Threads for connections, kept warm between clients.
//!
//! Every NBD connection runs on an OS thread of its own (see the crate doc). Starting a thread
//! costs a `clone`, a fresh stack (mmap, guard page, first-touch page faults) and, at exit,
//! the unmapping again: measured here as about a third of the server's CPU for a client that
//! connects, negotiates and disconnects (python3-libnbd in a loop, `perf stat`). Clients that
//! do exactly that are common: `nbdinfo`, `qemu-img info`, health checks, libnbd's
//! `connect_command` in scripts. So a thread whose connection has ended waits a while for the
//! next one instead of exiting.
//!
//! The pool is deliberately small and lazy: it never starts a thread ahead of demand, keeps at
//! most [`MAX_IDLE`] idle threads, and an idle thread exits after [`IDLE_TIMEOUT`]. A burst of
//! connections therefore still gets one thread each at once (there is no cap here: the limit
//! on connections is the server's business), and a quiet server holds no spare threads after
//! a few seconds. Hand-off is one mutex and one condvar signal per connection, which is less
//! than the thread start it replaces.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Most threads kept waiting for a connection.
pub(crate) const MAX_IDLE: usize = 8;
/// How long an idle thread waits for a connection before it exits.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A pool of connection threads (see the module doc).
pub(crate) struct ThreadPool {
    shared: Arc<Shared>,
    max_idle: usize,
    idle_timeout: Duration,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

struct State {
    /// Threads waiting for a job.
    idle: usize,
    /// Jobs handed over but not yet taken by an idle thread.
    queue: VecDeque<Job>,
}

impl ThreadPool {
    pub(crate) fn new() -> ThreadPool {
        Self::with_limits(MAX_IDLE, IDLE_TIMEOUT)
    }

    pub(crate) fn with_limits(max_idle: usize, idle_timeout: Duration) -> ThreadPool {
        ThreadPool {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    idle: 0,
                    queue: VecDeque::new(),
                }),
                wake: Condvar::new(),
            }),
            max_idle,
            idle_timeout,
        }
    }

    /// Runs `job` on an idle thread, or on a new one named `name` if none is idle.
    pub(crate) fn spawn(&self, name: String, job: Job) -> std::io::Result<()> {
        {
            let mut st = lock(&self.shared.state);
            // Only as many jobs may wait as there are idle threads to take them; each idle
            // thread takes exactly one, so no job is ever left waiting for a busy thread.
            if st.idle > st.queue.len() {
                st.queue.push_back(job);
                drop(st);
                self.shared.wake.notify_one();
                return Ok(());
            }
        }
        let shared = self.shared.clone();
        let (max_idle, timeout) = (self.max_idle, self.idle_timeout);
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                job();
                while let Some(next) = shared.next_job(max_idle, timeout) {
                    next();
                }
            })
            .map(|_| ())
    }

    /// Threads waiting for a connection now.
    #[cfg(test)]
    fn idle(&self) -> usize {
        lock(&self.shared.state).idle
    }
}

impl Shared {
    /// Waits for the next job as an idle thread; None when the thread should exit (the pool
    /// holds enough idle threads already, or none came within the timeout).
    fn next_job(&self, max_idle: usize, timeout: Duration) -> Option<Job> {
        let mut st = lock(&self.state);
        if st.idle >= max_idle {
            return None;
        }
        st.idle += 1;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(job) = st.queue.pop_front() {
                st.idle -= 1;
                return Some(job);
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                st.idle -= 1;
                return None;
            }
            st = self
                .wake
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn thread_id_of(pool: &ThreadPool) -> std::thread::ThreadId {
        let (tx, rx) = mpsc::channel();
        pool.spawn(
            "t".into(),
            Box::new(move || tx.send(std::thread::current().id()).unwrap()),
        )
        .unwrap();
        rx.recv().unwrap()
    }

    fn wait_idle(pool: &ThreadPool, n: usize) {
        for _ in 0..1000 {
            if pool.idle() == n {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!("pool never had {n} idle threads (has {})", pool.idle());
    }

    #[test]
    fn pool_finished_thread_runs_next_job() {
        let pool = ThreadPool::with_limits(2, Duration::from_secs(10));
        let first = thread_id_of(&pool);
        wait_idle(&pool, 1);
        assert_eq!(thread_id_of(&pool), first);
    }

    #[test]
    fn pool_busy_threads_mean_a_new_thread() {
        let pool = ThreadPool::with_limits(4, Duration::from_secs(10));
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let (started_tx, started_rx) = mpsc::channel();
        pool.spawn(
            "blocker".into(),
            Box::new(move || {
                started_tx.send(std::thread::current().id()).unwrap();
                release_rx.recv().unwrap();
            }),
        )
        .unwrap();
        let blocker = started_rx.recv().unwrap();
        // The only thread is busy: the next job must not wait for it.
        assert_ne!(thread_id_of(&pool), blocker);
        release_tx.send(()).unwrap();
    }

    #[test]
    fn pool_idle_threads_are_capped_and_time_out() {
        let pool = ThreadPool::with_limits(1, Duration::from_millis(50));
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Arc::new(Mutex::new(release_rx));
        for _ in 0..3 {
            let rx = release_rx.clone();
            pool.spawn(
                "b".into(),
                Box::new(move || {
                    let _ = lock(&rx).recv();
                }),
            )
            .unwrap();
        }
        for _ in 0..3 {
            release_tx.send(()).unwrap();
        }
        wait_idle(&pool, 1);
        wait_idle(&pool, 0);
    }
}
