//! nbdkit's limit filter: at most `limit=N` clients at once (default 1, 0 for no limit).
//!
//! As in nbdkit, a client is refused in preconnect (before any negotiation or TLS work) when
//! the limit is reached, and counted from its open to its close; the open checks again,
//! because a client could otherwise slip in by negotiating slowly.

use std::sync::{Arc, Mutex, PoisonError};

use crate::error::{BlockError, Errno, Result};
use crate::filter::{Filter, Next};
use crate::filters::{each_param, over, parse_u32, FilterEnv, FilterSpec};
use crate::plugin::{OpenContext, Plugin};
use crate::plugins::ConfigArg;

pub const SPEC: FilterSpec = FilterSpec {
    name: "limit",
    keys: &["limit"],
    help: "",
    open,
};

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _env: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut limit = 1;
    each_param(&SPEC, params, |k, v| {
        limit = parse_u32("limit", k, v)?;
        Ok(())
    })?;
    Ok(over(
        Limit {
            limit,
            connections: Mutex::new(0),
        },
        inner,
    ))
}

struct Limit {
    /// 0: unlimited.
    limit: u32,
    connections: Mutex<u32>,
}

impl Limit {
    fn check(&self, connections: u32) -> Result<()> {
        if self.limit > 0 && connections >= self.limit {
            return Err(BlockError::new(
                Errno::EPERM,
                "limit: too many clients connected, connection rejected",
            ));
        }
        Ok(())
    }
}

impl Filter for Limit {
    type Conn = ();

    fn name(&self) -> &str {
        "limit"
    }

    fn preconnect(&self, next: &dyn Plugin, readonly: bool) -> Result<()> {
        next.preconnect(readonly)?;
        self.check(
            *self
                .connections
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<((), Next)> {
        let next = Next::open(next, ctx)?;
        let mut n = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.check(*n)?;
        *n += 1;
        Ok(((), next))
    }

    fn close(&self, _conn: &mut (), _next: &Next) {
        *self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner) -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::MemoryPlugin;

    fn limited(params: &[ConfigArg]) -> Result<Arc<dyn Plugin>> {
        (SPEC.open)(
            params,
            Arc::new(MemoryPlugin::new(4096)),
            &FilterEnv::default(),
        )
    }

    fn ctx() -> OpenContext<'static> {
        OpenContext {
            readonly: false,
            export_name: "",
            is_tls: false,
        }
    }

    #[test]
    fn default_limit_is_one_client_refused_in_preconnect_and_open() {
        let top = limited(&[]).unwrap();
        let a = top.open(&ctx()).unwrap();
        assert!(top.preconnect(false).is_err());
        let e = top.open(&ctx()).err().unwrap();
        assert_eq!(e.errno, Errno::EPERM);
        drop(a);
        top.preconnect(false).unwrap();
        top.open(&ctx()).unwrap();
    }

    #[test]
    fn zero_is_unlimited() {
        let top = limited(&[ConfigArg::kv("limit", "0")]).unwrap();
        let _h: Vec<_> = (0..10).map(|_| top.open(&ctx()).unwrap()).collect();
        top.preconnect(false).unwrap();
    }

    #[test]
    fn bad_limit_names_filter_and_key() {
        let e = limited(&[ConfigArg::kv("limit", "x")]).err().unwrap();
        assert_eq!(e.errno, Errno::EINVAL);
        assert!(e.message.starts_with("limit: limit: "), "{e}");
    }
}
