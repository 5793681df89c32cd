//! The node drivers that are not images: `null-co`/`null-aio` and `sluice-plugin` (`file`,
//! `raw` and `qcow2` are in [`super::image`]).
//!
//! Each turns its `blockdev-add` options into a plugin from `sluice-block` (or any plugin the
//! daemon's [`PluginLoader`] can load) and the facts `query-named-block-nodes` reports.
//! Errors use qemu-storage-daemon's words where it has the same case (`Could not open
//! 'x': No such file or directory`). Options QEMU has but sluice does not implement are
//! refused with a message saying so, rather than silently ignored, except pure performance
//! hints (`aio`).

use std::sync::Arc;

use serde_json::Value;
use sluice_block::plugins::{ConfigArg, NullPlugin};

use super::{NodeDriver, NodeInfo, OpenCtx, OpenedNode, PluginLoader};
use crate::generated::{BlockdevOptions, BlockdevOptionsBranch};
use crate::QmpError;

/// `null-co` and `null-aio`: reads zeroes, discards writes.
#[derive(Debug)]
pub struct NullDriver;

impl NodeDriver for NullDriver {
    fn open(
        &self,
        opts: &BlockdevOptions,
        _json: &Value,
        _ctx: &mut OpenCtx<'_>,
    ) -> Result<OpenedNode, QmpError> {
        let (BlockdevOptionsBranch::NullCo(n) | BlockdevOptionsBranch::NullAio(n)) = &opts.u else {
            unreachable!("registered for the null drivers only");
        };
        let size = n.size.unwrap_or(1 << 30);
        if size < 0 {
            return Err(QmpError::generic("size must not be negative"));
        }
        match n.latency_ns {
            None | Some(0) => {}
            Some(l) if l > i64::MAX as u64 => {
                return Err(QmpError::generic("latency-ns is invalid"))
            }
            Some(_) => {
                return Err(QmpError::generic(
                    "latency-ns is not supported by sluice yet (only 0)",
                ))
            }
        }
        let name = opts.u.tag().as_str();
        Ok(OpenedNode::new(
            Arc::new(NullPlugin::new(size as u64)),
            NodeInfo {
                filename: format!("{name}://"),
                format: name.to_string(),
                actual_size: Some(0),
                dirty_flag: None,
                format_specific: None,
                ..NodeInfo::default()
            },
        ))
    }
}

/// `sluice-plugin`: any plugin the daemon can load.
pub struct PluginDriver {
    pub loader: Arc<dyn PluginLoader>,
}

impl std::fmt::Debug for PluginDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginDriver").finish_non_exhaustive()
    }
}

impl NodeDriver for PluginDriver {
    fn open(
        &self,
        opts: &BlockdevOptions,
        _json: &Value,
        _ctx: &mut OpenCtx<'_>,
    ) -> Result<OpenedNode, QmpError> {
        let BlockdevOptionsBranch::SluicePlugin(p) = &opts.u else {
            unreachable!("registered for driver sluice-plugin only");
        };
        let params: Vec<ConfigArg> = p
            .params
            .iter()
            .flatten()
            .map(|w| ConfigArg::parse(w))
            .collect();
        let plugin = self
            .loader
            .load(&p.plugin, &params)
            .map_err(|e| QmpError::generic(format!("Could not load plugin '{}': {e}", p.plugin)))?;
        Ok(OpenedNode::new(
            plugin,
            NodeInfo {
                filename: p.plugin.clone(),
                format: "sluice-plugin".to_string(),
                actual_size: None,
                dirty_flag: None,
                format_specific: None,
                ..NodeInfo::default()
            },
        ))
    }
}
