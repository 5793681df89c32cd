//! The noparallel filter (nbdkit-noparallel-filter): tightens the thread model.
//!
//! `serialize=requests` (default) allows one request in flight per connection,
//! `all-requests` one in the whole server, `connections` one client at a time; the last also
//! withdraws NBD_FLAG_CAN_MULTI_CONN, as nbdkit does for that model.

use std::sync::Arc;

use crate::error::Result;
use crate::filter::{Filter, Next};
use crate::plugin::{OpenContext, Plugin, ThreadModel};
use crate::plugins::ConfigArg;

use super::{bad, each_param, over, FilterEnv, FilterSpec};

pub const SPEC: FilterSpec = FilterSpec {
    name: "noparallel",
    keys: &["serialize", "serialise"],
    help: "serialize=<MODE>      'requests' (default), 'all-requests', or 'connections'.",
    open,
};

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut model = ThreadModel::SerializeRequests;
    each_param(&SPEC, params, |k, v| {
        model = match v {
            "requests" => ThreadModel::SerializeRequests,
            "all-requests" | "all_requests" => ThreadModel::SerializeAllRequests,
            "connections" => ThreadModel::SerializeConnections,
            _ => {
                return Err(bad(
                    "noparallel",
                    k,
                    format!("unknown serialize mode '{v}'"),
                ))
            }
        };
        Ok(())
    })?;
    Ok(over(NoParallel { model }, inner))
}

pub struct NoParallel {
    pub model: ThreadModel,
}

impl Filter for NoParallel {
    type Conn = ();
    fn name(&self) -> &str {
        "noparallel"
    }
    fn thread_model(&self) -> ThreadModel {
        self.model
    }
    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<((), Next)> {
        Ok(((), Next::open(next, ctx)?))
    }
    fn can_multi_conn(&self, _: &(), next: &Next) -> Result<bool> {
        Ok(self.model != ThreadModel::SerializeConnections && crate::Handle::can_multi_conn(next)?)
    }
    /// Reads pass through unchanged, so their bytes lie where the layer below says.
    const READS_PASS_THROUGH: bool = true;
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use crate::plugin::ThreadModel;

    #[test]
    fn noparallel_sets_the_thread_model() {
        for (mode, want) in [
            ("requests", ThreadModel::SerializeRequests),
            ("all-requests", ThreadModel::SerializeAllRequests),
            ("connections", ThreadModel::SerializeConnections),
        ] {
            let top = filter("noparallel", &[("serialize", mode)], memory(4096));
            assert_eq!(top.thread_model(), want);
            let e = export(top, true);
            assert_eq!(
                e.caps().multi_conn,
                want != ThreadModel::SerializeConnections
            );
        }
        let top = filter("noparallel", &[], memory(4096));
        assert_eq!(top.thread_model(), ThreadModel::SerializeRequests);
        assert!(config_error("noparallel", &[("serialize", "x")])
            .starts_with("noparallel: serialize: "));
    }
}
