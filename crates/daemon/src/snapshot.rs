//! External snapshots: `blockdev-snapshot` (onto an overlay node that exists) and
//! `blockdev-snapshot-sync` (which creates the overlay file first).
//!
//! A snapshot freezes a node's image: a qcow2 overlay gets the node as its backing, and
//! everything that used the node uses the overlay from then on. With NBD clients writing
//! at that moment, the switch must lose no write and put none on the wrong layer; that is
//! [`sluice_image::Node::snapshot_onto`], which holds the node's requests off at its gate,
//! writes the node back, attaches it under the overlay and forwards the node's requests to
//! the overlay — so connections opened before keep working, now on the overlay. The graph
//! then follows as qsd's: the overlay's `backing` edge, the node and its file node reopened
//! read-only ([`sluice_image::Node::freeze`], which lets go of the image's write lock, as
//! qemu's snapshot does), its exports moved to the overlay ([`move_exports`]). Once the
//! overlay leaves the graph (`blockdev-del`), the old node stops forwarding and serves its
//! own image again (the snapshot's point in time), so the two, which hold each other, both
//! close when unused, as in qsd ([`sluice_image::Node::release_backing_forwards`]). The
//! overlay `blockdev-snapshot-sync` makes is the monitor's only through the export that moved
//! onto it: deleting that export frees it, as qsd does (`Daemon::finish_export`).
//!
//! Checks and messages are qsd 10.0.2's (`Cannot find device=... nor node-name=...`,
//! `Making 'x' a backing child of 'y' would create a cycle`, `The overlay is already in
//! use`, `The overlay already has a backing image`, `Node 'x' is busy: node is used as
//! backing hd of 'y'`, `New overlay node-name already in use`, `Backing file not supported
//! for file format 'raw'`). As in qsd, `blockdev-snapshot` leaves the overlay's header as
//! it is, and `blockdev-snapshot-sync` writes the node's file name (qemu's `json:` name
//! when the node's options chose its backing) and format into the new overlay's header.
//!
//! A device node (`rbd`) can be the node snapshotted: the overlay then reads it through a
//! plugin node (see [`crate::graph::layers`]); since no gate of ours sits in front of a
//! device's open connections, that is refused while the device is exported.
//!
//! Differs from qsd: sluice refuses nodes that are another node's child in a role other
//! than `backing` (a `file` child), non-image nodes other than devices, and exported
//! devices. When `blockdev-snapshot-sync`
//! snapshots a node nothing uses, qsd creates the file, opens the overlay and drops it
//! again at once (nothing holds it) and leaves the node read-only; sluice creates the file
//! and leaves the node as it was.

use std::path::Path;

use serde_json::json;
use sluice_qapi::runtime::{CompatPolicy, FromQapi, Input};

use crate::generated::{
    BlockdevOptions, BlockdevSnapshotArgs, BlockdevSnapshotSyncArgs, NewImageMode,
};
use crate::graph::image::{image_node, refresh_info};
use crate::graph::layers::snapshot_base;
use crate::graph::not_found;
use crate::jobs::create::create_image;
use crate::jobs::mirror_engine::move_exports;
use crate::state::State;
use crate::QmpError;

/// `blockdev-snapshot`.
pub(crate) fn blockdev_snapshot(
    st: &mut State,
    args: BlockdevSnapshotArgs,
) -> Result<(), QmpError> {
    snapshot(st, &args.node, &args.overlay)
}

/// Checks, then the switch (see the module doc).
fn snapshot(st: &mut State, node: &str, overlay: &str) -> Result<(), QmpError> {
    let Some(n) = st.graph.get(node) else {
        return Err(not_found(node, node));
    };
    let Some(o) = st.graph.get(overlay) else {
        return Err(not_found(overlay, overlay));
    };
    // The overlay must not be the node or below it.
    let mut below = Some(n);
    while let Some(b) = below {
        if b.name == overlay {
            return Err(QmpError::generic(format!(
                "Making '{node}' a backing child of '{overlay}' would create a cycle"
            )));
        }
        below = st.graph.child(b, "backing");
    }
    if let Some(j) = st.jobs.using_node(node) {
        return Err(QmpError::generic(format!(
            "Node '{node}' is busy: block device is in use by block job: {}",
            j.job_type
        )));
    }
    if o.exports > 0 || st.graph.has_parent(overlay) || st.jobs.using_node(overlay).is_some() {
        return Err(QmpError::generic("The overlay is already in use"));
    }
    if st.graph.child(o, "backing").is_some() {
        return Err(QmpError::generic("The overlay already has a backing image"));
    }
    // A device (an rbd node) has no gate of ours that could move the requests of its
    // open connections to the overlay: it is only snapshotted while nothing exports it.
    if image_node(&n.opened).is_none() && n.exports > 0 {
        return Err(QmpError::generic(format!(
            "Node '{node}' is exported: sluice snapshots a {} node only while no export \
             uses it",
            n.driver.as_str()
        )));
    }
    let (Some(old), Some(new)) = (snapshot_base(n), image_node(&o.opened)) else {
        return Err(QmpError::generic(
            "sluice takes snapshots of file, raw, qcow2 and device (rbd) nodes onto qcow2 \
             nodes only",
        ));
    };
    if new.driver() != sluice_image::Driver::Qcow2 {
        return Err(QmpError::generic(
            "The overlay does not support backing images",
        ));
    }
    if o.read_only {
        return Err(QmpError::generic("Block node is read-only"));
    }
    if let Some(p) = st.graph.parents(node, "backing").last() {
        return Err(QmpError::generic(format!(
            "Node '{node}' is busy: node is used as backing hd of '{}'",
            p.name
        )));
    }
    if st.graph.has_parent(node) {
        return Err(QmpError::generic(format!(
            "Node '{node}' is a child of another node: sluice snapshots root nodes only"
        )));
    }
    old.snapshot_onto(new)
        .map_err(crate::graph::image::qmp_error)?;
    if let Some(o) = st.graph.get_mut(overlay) {
        o.children.push(("backing".to_string(), node.to_string()));
        refresh_info(&mut o.opened);
    }
    if let Some(n) = st.graph.get_mut(node) {
        n.read_only = true;
    }
    // qemu's external_snapshot_commit reopens the old node read-only (its file node too),
    // which lets go of its image's write lock; an error there leaves the snapshot standing.
    match old.freeze() {
        Ok(()) => {
            let files: Vec<String> = (st.graph.get(node).into_iter())
                .flat_map(|n| &n.children)
                .filter(|(role, _)| role == "file")
                .map(|(_, child)| child.clone())
                .collect();
            for f in files {
                if let Some(f) = st.graph.get_mut(&f) {
                    f.read_only = true;
                    refresh_info(&mut f.opened);
                }
            }
        }
        Err(e) => tracing::warn!("blockdev-snapshot: reopening '{node}' read-only: {e}"),
    }
    move_exports(st, node, overlay);
    Ok(())
}

/// `blockdev-snapshot-sync`.
pub(crate) fn blockdev_snapshot_sync(
    st: &mut State,
    policy: &CompatPolicy,
    args: BlockdevSnapshotSyncArgs,
) -> Result<(), QmpError> {
    let device = args.device.as_deref().unwrap_or("");
    let name = args.node_name.as_deref().unwrap_or("");
    let Some(n) = st.graph.get(name) else {
        return Err(not_found(device, name));
    };
    if let Some(s) = &args.snapshot_node_name {
        if st.graph.get(s).is_some() {
            return Err(QmpError::generic("New overlay node-name already in use"));
        }
    }
    let format = args.format.as_deref().unwrap_or("qcow2");
    if format != "qcow2" {
        return Err(QmpError::generic(format!(
            "Backing file not supported for file format '{format}'"
        )));
    }
    let Some(old) = image_node(&n.opened) else {
        return Err(QmpError::generic(
            "sluice takes snapshots of file, raw and qcow2 nodes only",
        ));
    };
    if args.mode != Some(NewImageMode::Existing) {
        let backing = (n.opened.info.filename.as_str(), n.driver.as_str());
        create_image(
            Path::new(&args.snapshot_file),
            "qcow2",
            old.size(),
            Some(backing),
        )?;
    }
    let exported = n.exports > 0;
    let mut opts = json!({
        "driver": "qcow2",
        "file": {"driver": "file", "filename": args.snapshot_file},
        "backing": null,
    });
    if let Some(s) = &args.snapshot_node_name {
        opts["node-name"] = s.clone().into();
    }
    let mut inp = Input::json(policy);
    let opts = BlockdevOptions::from_qapi(&mut inp, &opts)?;
    let overlay = st.graph.add_unowned(&opts)?;
    if !exported {
        // Nothing would hold the overlay (see the module doc).
        st.graph.drop_unowned(&overlay);
        return Ok(());
    }
    let r = snapshot(st, name, &overlay);
    if r.is_err() {
        st.graph.drop_unowned(&overlay);
    }
    r
}
