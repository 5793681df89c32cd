//! nbdkit's exitlast filter: the server exits once the last client has gone (but never
//! before the first has come).
//!
//! nbdkit counts handles opened and closed. A client that asks for an export's details
//! (NBD_OPT_INFO) and then opens it (NBD_OPT_GO) has its first handle closed before the
//! second opens, which would count as "the last client left" in the middle of its handshake,
//! and sluice's graceful shutdown would cut that handshake short. So a *client connection*
//! is counted, from its first successful open to the end of the connection: the same clients
//! count as with nbdkit (one that never opens an export does not), and the exit comes when
//! the last of them disconnects. [`ConnectionCount`] is that counter, shared with exitwhen.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::error::Result;
use crate::filter::{Filter, Next};
use crate::filters::{each_param, over, FilterEnv, FilterSpec};
use crate::plugin::{ConnectionInfo, OpenContext, Plugin};
use crate::plugins::ConfigArg;

pub const SPEC: FilterSpec = FilterSpec {
    name: "exitlast",
    keys: &[],
    help: "",
    open,
};

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, env: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    each_param(&SPEC, params, |_, _| Ok(()))?;
    Ok(over(
        ExitLast {
            clients: ConnectionCount::default(),
            exit: env.exit.clone(),
        },
        inner,
    ))
}

struct ExitLast {
    clients: ConnectionCount,
    exit: Arc<dyn Fn() + Send + Sync>,
}

impl Filter for ExitLast {
    type Conn = ();

    fn name(&self) -> &str {
        "exitlast"
    }

    fn with_connection(&self, next: &dyn Plugin, info: &ConnectionInfo, f: &mut dyn FnMut()) {
        if self.clients.run(|| next.with_connection(info, f)) == Some(0) {
            tracing::debug!("exitlast: exiting on last client connection");
            (self.exit)();
        }
    }

    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<((), Next)> {
        let next = Next::open(next, ctx)?;
        self.clients.opened();
        Ok(((), next))
    }
}

thread_local! {
    /// Whether the connection running on this thread has been counted. A connection's
    /// negotiation, and so every open of it, runs on the thread that runs the connection.
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

/// Client connections that have opened an export and not yet disconnected.
#[derive(Default)]
pub(crate) struct ConnectionCount(AtomicUsize);

impl ConnectionCount {
    /// Runs a whole connection (`f`, inside [`Filter::with_connection`]). Returns the number
    /// of counted connections left if this one was counted (it opened an export), else None.
    pub(crate) fn run(&self, f: impl FnOnce()) -> Option<usize> {
        let outer = COUNTED.with(|c| c.replace(false));
        f();
        let counted = COUNTED.with(|c| c.replace(outer));
        counted.then(|| self.0.fetch_sub(1, Ordering::SeqCst) - 1)
    }

    /// An export was opened on the connection running on this thread: counts it, once.
    pub(crate) fn opened(&self) {
        if !COUNTED.with(|c| c.replace(true)) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Counted connections now.
    pub(crate) fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::plugins::MemoryPlugin;

    fn ctx() -> OpenContext<'static> {
        OpenContext {
            readonly: false,
            export_name: "",
            is_tls: false,
        }
    }

    #[test]
    fn exits_when_the_last_client_that_opened_disconnects() {
        let exits = Arc::new(AtomicUsize::new(0));
        let e = exits.clone();
        let env = FilterEnv {
            exit: Arc::new(move || {
                e.fetch_add(1, Ordering::SeqCst);
            }),
            ..FilterEnv::default()
        };
        let top = (SPEC.open)(&[], Arc::new(MemoryPlugin::new(4096)), &env).unwrap();
        let info = ConnectionInfo::default();
        // A client that never opens an export does not count.
        top.with_connection(&info, &mut || {});
        assert_eq!(exits.load(Ordering::SeqCst), 0);
        // INFO then GO: two opens, one client; the exit comes after it disconnects.
        top.with_connection(&info, &mut || {
            drop(top.open(&ctx()).unwrap());
            let _h = top.open(&ctx()).unwrap();
            assert_eq!(exits.load(Ordering::SeqCst), 0);
        });
        assert_eq!(exits.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn parameters_are_refused() {
        let e = (SPEC.open)(
            &[ConfigArg::kv("exitlast", "1")],
            Arc::new(MemoryPlugin::new(4096)),
            &FilterEnv::default(),
        )
        .err()
        .unwrap();
        assert!(e.message.starts_with("exitlast: exitlast: "), "{e}");
    }
}
