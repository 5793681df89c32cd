//! qemu's filter drivers: `copy-on-read` and `throttle` nodes over one `file` child.
//!
//! A filter node is the child's plugin with a [`sluice_block::Filter`] over it (the same
//! filter layer `sluice serve --filter` stacks), so an export of the filter node, or a node
//! above it, goes through the filter and then the child, with no second I/O path:
//! - `copy-on-read`: before a read passes down, the clusters it covers that the child (a
//!   qcow2 node) does not hold are copied into it from its backing chain, with the child's
//!   own stream primitive ([`sluice_image::Node::stream_range`]), which does the check and
//!   the copy under the node's exclusive I/O lock, so a client write in between is never
//!   overwritten by older backing data.
//! - `throttle`: the limits of a `throttle-group` object, shared by every node that names the
//!   group (see [`crate::throttle`]).
//!
//! What `query-named-block-nodes` shows is qemu's: the driver's name as the format, a
//! `json:` filename of the node's options with the child's inline, the child's actual size,
//! cluster size and dirty flag (qemu's `bdrv_get_info` forwards to the filtered child), and
//! the child as `backing-image` (see [`super::Graph`]).

use std::sync::Arc;

use serde_json::{json, Value};
use sluice_block::filter::{Filter, Next};
use sluice_block::{Flags, Handle, OpenContext, Plugin, Result};

use super::{image, NodeDriver, NodeInfo, OpenCtx, OpenedNode};
use crate::generated::{BlockdevOptions, BlockdevOptionsBranch};
use crate::objects::Objects;
use crate::throttle::ThrottleGroup;
use crate::QmpError;

/// The options qemu shows for a node, inline in a parent's `json:` filename: those of its
/// `json:` filename if it has one, else its driver and file (a backing from the image header
/// is the default and not shown).
fn child_spec(node: &super::Node) -> Value {
    let fallback = || json!({"driver": node.driver.as_str()});
    if let Some(j) = node.opened.info.filename.strip_prefix("json:") {
        return serde_json::from_str(j).unwrap_or_else(|_| fallback());
    }
    match image::image_node(&node.opened) {
        Some(img) => {
            let mut spec = image::spec(&img);
            if let Some(m) = spec.as_object_mut() {
                m.remove("backing");
            }
            spec
        }
        None => fallback(),
    }
}

/// What a filter node reports: its own format and filename, the rest from its child.
fn filter_info(driver: &str, spec: &Value, child: &super::Node) -> NodeInfo {
    let c = &child.opened.info;
    NodeInfo {
        filename: format!("json:{}", image::qemu_json(spec)),
        format: driver.to_string(),
        actual_size: c.actual_size,
        dirty_flag: c.dirty_flag,
        cluster_size: c.cluster_size,
        ..NodeInfo::default()
    }
}

/// `copy-on-read` nodes.
#[derive(Debug, Default)]
pub struct CopyOnReadDriver;

impl NodeDriver for CopyOnReadDriver {
    fn open(
        &self,
        opts: &BlockdevOptions,
        _json: &Value,
        ctx: &mut OpenCtx<'_>,
    ) -> std::result::Result<OpenedNode, QmpError> {
        let BlockdevOptionsBranch::CopyOnRead(o) = &opts.u else {
            unreachable!("registered for driver copy-on-read only");
        };
        if o.bottom.is_some() {
            return Err(QmpError::generic(
                "copy-on-read: 'bottom' is not supported by sluice (it copies from the whole \
                 backing chain)",
            ));
        }
        let me = ctx.node_name().to_string();
        let file = ctx.child("file", &o.file)?;
        let child = ctx
            .node(&file)
            .ok_or_else(|| super::not_found(&file, &file))?;
        let Some(img) = image::image_node(&child.opened) else {
            return Err(QmpError::generic(format!(
                "Node '{file}' (driver {}) cannot be the file child of '{me}': sluice's \
                 copy-on-read driver reads raw and qcow2 nodes only",
                child.driver.as_str()
            )));
        };
        let spec = json!({"driver": "copy-on-read", "file": child_spec(child)});
        let info = filter_info("copy-on-read", &spec, child);
        let plugin = Arc::new(sluice_block::Filtered::new(
            CopyOnRead { node: img },
            child.plugin().clone(),
        ));
        Ok(OpenedNode::new(plugin, info))
    }
}

/// The copy-on-read filter over an image node.
struct CopyOnRead {
    node: Arc<sluice_image::Node>,
}

impl Filter for CopyOnRead {
    /// Whether this connection may write (a read-only one reads through, copying nothing).
    type Conn = bool;
    fn name(&self) -> &str {
        "copy-on-read"
    }
    /// Every read must reach it: a read of a hole answered from block status would copy
    /// nothing.
    fn must_see_every_read(&self) -> bool {
        true
    }
    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<(bool, Next)> {
        let writable = !ctx.readonly && !self.node.is_read_only();
        Ok((writable, Next::open(next, ctx)?))
    }
    fn pread(
        &self,
        writable: &bool,
        next: &Next,
        buf: &mut [u8],
        off: u64,
        f: Flags,
    ) -> Result<()> {
        if *writable && !buf.is_empty() {
            // qemu copies whole clusters.
            let cs = self.node.cluster_size().max(1);
            let start = off / cs * cs;
            let end = (off + buf.len() as u64).div_ceil(cs) * cs;
            self.node.stream_range(start, end - start, None)?;
        }
        next.pread(buf, off, f)
    }
}

/// Finds a `throttle-group` object by its id.
pub trait ThrottleGroups: Send + Sync {
    /// The group, or qemu's error message for the id.
    fn group(&self, id: &str) -> std::result::Result<Arc<ThrottleGroup>, QmpError>;
}

/// A daemon without objects: every group is unknown.
#[derive(Debug, Default)]
pub struct NoGroups;

impl ThrottleGroups for NoGroups {
    fn group(&self, id: &str) -> std::result::Result<Arc<ThrottleGroup>, QmpError> {
        Err(QmpError::generic(format!(
            "Throttle group '{id}' does not exist"
        )))
    }
}

/// The daemon's object table: `--object throttle-group,...` and `object-add`.
impl ThrottleGroups for Objects {
    fn group(&self, id: &str) -> std::result::Result<Arc<ThrottleGroup>, QmpError> {
        self.throttle_group(id)
    }
}

/// `throttle` nodes.
pub struct ThrottleDriver {
    groups: Arc<dyn ThrottleGroups>,
}

impl std::fmt::Debug for ThrottleDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThrottleDriver").finish_non_exhaustive()
    }
}

impl ThrottleDriver {
    pub fn new(groups: Arc<dyn ThrottleGroups>) -> ThrottleDriver {
        ThrottleDriver { groups }
    }
}

impl NodeDriver for ThrottleDriver {
    fn open(
        &self,
        opts: &BlockdevOptions,
        _json: &Value,
        ctx: &mut OpenCtx<'_>,
    ) -> std::result::Result<OpenedNode, QmpError> {
        let BlockdevOptionsBranch::Throttle(o) = &opts.u else {
            unreachable!("registered for driver throttle only");
        };
        // qemu looks the group up before it opens the child.
        let group = self.groups.group(&o.throttle_group)?;
        let file = ctx.child("file", &o.file)?;
        let child = ctx
            .node(&file)
            .ok_or_else(|| super::not_found(&file, &file))?;
        let spec = json!({"driver": "throttle", "throttle-group": o.throttle_group,
                          "file": child_spec(child)});
        let info = filter_info("throttle", &spec, child);
        let plugin = Arc::new(sluice_block::Filtered::new(
            Throttle { group },
            child.plugin().clone(),
        ));
        Ok(OpenedNode::new(plugin, info))
    }
}

/// The throttle filter: every request waits for its group's tokens.
struct Throttle {
    group: Arc<ThrottleGroup>,
}

impl Filter for Throttle {
    type Conn = ();
    fn name(&self) -> &str {
        "throttle"
    }
    /// It limits reads: each must reach it.
    fn must_see_every_read(&self) -> bool {
        true
    }
    fn may_block(&self) -> bool {
        true
    }
    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<((), Next)> {
        Ok(((), Next::open(next, ctx)?))
    }
    fn pread(&self, _: &(), next: &Next, buf: &mut [u8], off: u64, f: Flags) -> Result<()> {
        self.group.charge(false, buf.len() as u64)?;
        next.pread(buf, off, f)
    }
    fn pwrite(&self, _: &(), next: &Next, buf: &[u8], off: u64, f: Flags) -> Result<()> {
        self.group.charge(true, buf.len() as u64)?;
        next.pwrite(buf, off, f)
    }
    fn zero(&self, _: &(), next: &Next, count: u64, off: u64, f: Flags) -> Result<()> {
        self.group.charge(true, count)?;
        next.zero(count, off, f)
    }
    fn trim(&self, _: &(), next: &Next, count: u64, off: u64, f: Flags) -> Result<()> {
        self.group.charge(true, count)?;
        next.trim(count, off, f)
    }
}
