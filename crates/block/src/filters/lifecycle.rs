//! The process stages that server-level filters hook into: nbdkit's `.get_ready` and
//! `.after_fork`.
//!
//! A filter is configured by its constructor (see [`crate::filter`]), but some work must wait
//! for later stages of the process, exactly as in nbdkit:
//!
//! - **ready** runs once the whole stack is built, before the server binds its sockets, with
//!   the stack's final thread model. It is where a filter checks that its required parameters
//!   were given and opens what it writes to (nbdkit's `.config_complete` and `.get_ready`):
//!   `--dump-plugin` builds the stack but never gets here, so a filter whose files or sockets
//!   are opened in this stage can be described without side effects, as with nbdkit.
//! - **serving** runs in the process that will serve, after it forked into the background
//!   (if it does). Threads must start here, because a thread started before `fork(2)` does
//!   not exist in the child.
//!
//! Hooks are registered by filter constructors on the [`Lifecycle`] carried by
//! [`super::FilterEnv`], and run in registration order, which is innermost filter first
//! (the binary builds the stack from the plugin up), nbdkit's order. The binary calls
//! [`Lifecycle::ready`] and [`Lifecycle::serving`] once each; each hook runs at most once.

use std::sync::{Mutex, PoisonError};

use crate::error::Result;
use crate::plugin::ThreadModel;

/// What the serving stage knows about the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Serving {
    /// True where nbdkit forks at this point: when the server goes into the background, and
    /// in captive mode (`--run`), where nbdkit forks to run the command while sluice runs it
    /// as a child. nbdkit's log filter logs `Fork` exactly then.
    pub forked: bool,
}

type ReadyHook = Box<dyn FnOnce(ThreadModel) -> Result<()> + Send>;
type ServingHook = Box<dyn FnOnce(Serving) -> Result<()> + Send>;

/// The hooks registered for the ready and serving stages (see the module doc).
#[derive(Default)]
pub struct Lifecycle {
    ready: Mutex<Vec<ReadyHook>>,
    serving: Mutex<Vec<ServingHook>>,
}

impl std::fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lifecycle").finish_non_exhaustive()
    }
}

impl Lifecycle {
    /// Runs `hook` in the ready stage with the stack's thread model. An EINVAL error is a
    /// configuration mistake (a required parameter missing), any other a failure to start.
    pub fn on_ready(&self, hook: impl FnOnce(ThreadModel) -> Result<()> + Send + 'static) {
        lock(&self.ready).push(Box::new(hook));
    }

    /// Runs `hook` in the serving process, before the first client is accepted.
    pub fn on_serving(&self, hook: impl FnOnce(Serving) -> Result<()> + Send + 'static) {
        lock(&self.serving).push(Box::new(hook));
    }

    /// The ready stage: runs every ready hook, stopping at the first error.
    pub fn ready(&self, thread_model: ThreadModel) -> Result<()> {
        let hooks = std::mem::take(&mut *lock(&self.ready));
        hooks.into_iter().try_for_each(|h| h(thread_model))
    }

    /// The serving stage: runs every serving hook, stopping at the first error.
    pub fn serving(&self, serving: Serving) -> Result<()> {
        let hooks = std::mem::take(&mut *lock(&self.serving));
        hooks.into_iter().try_for_each(|h| h(serving))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::error::{BlockError, Errno};

    #[test]
    fn hooks_run_once_in_registration_order_and_stop_at_an_error() {
        let life = Lifecycle::default();
        let seen = Arc::new(Mutex::new(Vec::new()));
        for (name, fail) in [("inner", false), ("middle", true), ("outer", false)] {
            let seen = seen.clone();
            life.on_ready(move |tm| {
                seen.lock().unwrap().push(format!("{name} {}", tm.as_str()));
                match fail {
                    true => Err(BlockError::new(Errno::EINVAL, "f: k: missing")),
                    false => Ok(()),
                }
            });
        }
        let e = life.ready(ThreadModel::SerializeRequests).unwrap_err();
        assert_eq!(e.errno, Errno::EINVAL);
        assert_eq!(
            *seen.lock().unwrap(),
            ["inner serialize_requests", "middle serialize_requests"]
        );
        // Consumed: a second call runs nothing.
        life.ready(ThreadModel::Parallel).unwrap();
        assert_eq!(seen.lock().unwrap().len(), 2);
    }

    #[test]
    fn serving_hooks_see_whether_the_process_forked() {
        let life = Lifecycle::default();
        let seen = Arc::new(Mutex::new(None));
        let s = seen.clone();
        life.on_serving(move |serving| {
            *s.lock().unwrap() = Some(serving.forked);
            Ok(())
        });
        life.serving(Serving { forked: true }).unwrap();
        assert_eq!(*seen.lock().unwrap(), Some(true));
    }
}
