//! Layers: the graph's nodes as the `sluice_image` nodes that backing chains and block jobs
//! are made of, whichever driver opened them.
//!
//! A qcow2 node reads its backing through `sluice_image`, and stream, commit and snapshots
//! walk chains of `sluice_image::Node`s. An image node (file, raw, qcow2, blkdebug) is one
//! already; a device node (`rbd`, `null-co`, `sluice-plugin`) becomes one as a *plugin
//! node* (`sluice_image::open_plugin_node`) over the graph node's plugin — the plugin with
//! the node's bitmap filter, so that what a job writes through it marks the node's dirty
//! bitmaps. The plugin node has the graph node's name, which is how a job finds it again in
//! a chain ([`layer_in_chain`]): each overlay opened over a device has its own plugin node,
//! and the one that counts is the one in the chain the job walks.
//!
//! Writing into a base (a commit) needs the base writable, which qsd gets by reopening the
//! base read-write for the job. [`open_writer`] does the same: an image base through
//! `sluice_image::Node::open_writer`, an rbd base by opening the image again read-write
//! (taking its exclusive lock) for as long as the writer lives, so the lock goes with the
//! job, as a file base's write permission does.

use std::any::Any;
use std::sync::Arc;

use sluice_block::{Filtered, Plugin};
use sluice_image::Driver;

use super::bitmaps::MarkBitmaps;
use super::image::{image_node, qmp_error};
use super::Node;
use crate::generated::BlockdevDriver;
use crate::QmpError;

/// True for the drivers whose nodes can be a layer as plugin nodes: devices, not filters
/// (a filter's child is its layer in qemu's chains).
fn is_device(driver: BlockdevDriver) -> bool {
    matches!(
        driver,
        BlockdevDriver::Rbd
            | BlockdevDriver::NullCo
            | BlockdevDriver::NullAio
            | BlockdevDriver::SluicePlugin
    )
}

/// The layer a new qcow2 node `parent` gets for graph node `n` as its backing: `n`'s image
/// node, or a read-only plugin node over `n`'s device.
pub fn backing_layer(n: &Node, parent: &str) -> Result<Arc<sluice_image::Node>, QmpError> {
    if let Some(img) = image_node(&n.opened) {
        return Ok(img);
    }
    if !is_device(n.driver) {
        return Err(QmpError::generic(format!(
            "Node '{}' (driver {}) cannot be the backing child of '{parent}': sluice's qcow2 \
             driver stands on image nodes and on devices (rbd, null-co, sluice-plugin)",
            n.name,
            n.driver.as_str()
        )));
    }
    device_layer(n, true)
}

/// A plugin node over graph node `n`'s plugin (bitmap filter included), named as `n`.
fn device_layer(n: &Node, read_only: bool) -> Result<Arc<sluice_image::Node>, QmpError> {
    sluice_image::open_plugin_node(
        n.name.clone(),
        n.plugin().clone(),
        read_only,
        &n.opened.info.filename,
    )
    .map_err(qmp_error)
}

/// The layer of graph node `n` in the chain below `top`: `n`'s image node, or the plugin
/// node over `n`'s device that the chain reads through. None if `n` is a device that is
/// not in that chain.
pub fn layer_in_chain(n: &Node, top: &Arc<sluice_image::Node>) -> Option<Arc<sluice_image::Node>> {
    if let Some(img) = image_node(&n.opened) {
        return Some(img);
    }
    let mut next = top.backing();
    while let Some(b) = next {
        if b.driver() == Driver::Plugin && b.name() == n.name {
            return Some(b);
        }
        next = b.backing();
    }
    None
}

/// A layer for graph node `n` as the base of a new chain (`blockdev-snapshot` onto an
/// overlay): its image node, or a read-only plugin node over its device.
pub fn snapshot_base(n: &Node) -> Option<Arc<sluice_image::Node>> {
    match image_node(&n.opened) {
        Some(img) => Some(img),
        None if is_device(n.driver) => device_layer(n, true).ok(),
        None => None,
    }
}

/// A writable node over a base, for a job that writes into it (see [`open_writer`]).
pub struct Writer {
    pub node: Arc<sluice_image::Node>,
    /// For a device base, what its graph node's driver keeps for a writable node (an rbd
    /// node's writable plugin, whose lock the daemon lets go of at exit): what the graph
    /// node gets if the job makes the writer the base for good (an active commit's pivot).
    pub payload: Option<Arc<dyn Any + Send + Sync>>,
}

/// A writable node over `base`'s image or device, for a job that writes into it (a
/// commit); `layer` is `base`'s layer in the job's chain. See the module doc. The writer
/// marks `base`'s dirty bitmaps; dropping it gives the write access back (an rbd image's
/// exclusive lock with it).
pub fn open_writer(base: &Node, layer: &Arc<sluice_image::Node>) -> Result<Writer, QmpError> {
    let reopen_failed = |desc: String| {
        QmpError::generic(format!(
            "Could not reopen '{}' read-write: {desc}",
            base.name
        ))
    };
    if layer.driver() != Driver::Plugin {
        let node = layer
            .open_writer()
            .map_err(|e| reopen_failed(qmp_error(e).desc))?;
        return Ok(Writer {
            node,
            payload: None,
        });
    }
    if !base.read_only {
        // Already writable (its image's lock held by the node): write through its plugin.
        let node = device_layer(base, false).map_err(|e| reopen_failed(e.desc))?;
        return Ok(Writer {
            node,
            payload: base.opened.payload.clone(),
        });
    }
    let device = match base.driver {
        BlockdevDriver::Rbd => super::rbd::reopen_writable(&base.opened).map_err(reopen_failed)?,
        _ => {
            return Err(reopen_failed(format!(
                "sluice cannot reopen a {} node read-write",
                base.driver.as_str()
            )))
        }
    };
    let marked = MarkBitmaps(base.bitmaps.clone(), base.threshold.clone());
    let plugin: Arc<dyn Plugin> =
        Arc::new(Filtered::new(marked, device.clone() as Arc<dyn Plugin>));
    let node = sluice_image::open_plugin_node(
        base.name.clone(),
        plugin,
        false,
        &base.opened.info.filename,
    )
    .map_err(|e| reopen_failed(qmp_error(e).desc))?;
    Ok(Writer {
        node,
        payload: Some(device),
    })
}
