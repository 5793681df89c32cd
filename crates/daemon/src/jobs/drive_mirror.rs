//! `drive-mirror`: `blockdev-mirror` onto an image file the command creates (or opens)
//! itself, qsd's older form of live storage migration.
//!
//! The command makes the target in qsd 10.0.2's order, with its messages: the device (a
//! root node), `replaces` only with a `node-name`, then the file. With `mode:
//! absolute-paths` (the default) the file is created ([`create_image`], the function
//! `blockdev-snapshot-sync` uses too) in the source's format unless `format` says
//! otherwise, with the source's size and a backing file that follows `sync`: `top` the
//! source's backing (none: the mirror is a `full` one), `none` the source itself, `full`
//! none. With `mode: existing` the file is opened as it is, its format probed when
//! `format` is absent. The target becomes a node named `node-name` or `#blockNNN`; then the
//! job is blockdev-mirror's ([`super::mirror::start`], the same checks and messages), which
//! drops the node again if the job ends without the pivot and gives it its `backing` edge
//! at the pivot ([`super::mirror::OwnedTarget`]). A refusal after the file was created
//! leaves the file, as qsd does.
//!
//! Where sluice differs, on purpose (see `docs/compat/drive-mirror.md`): qsd opens a new
//! target without its backing until the pivot, so that a write-blocking mirror with sync
//! `none` writes whole clusters into the target from a few changed bytes and zeroes (not the
//! source's data) around them: the guest's data is lost after the pivot. sluice gives the
//! target image its backing (the source's backing, or the source) before the job starts,
//! so every partial-cluster write into it fills in from the right data; the graph shows the
//! edge from the pivot on, as qsd's does. With `mode: existing`, sluice opens the target's
//! backing chain from its header at once (qsd at `job-complete`). sluice creates raw and
//! qcow2 images only.

use std::path::Path;
use std::sync::Arc;

use serde_json::json;
use sluice_qapi::runtime::{FromQapi, Input};

use crate::generated::NewImageMode;
use crate::generated::{BlockdevMirrorArgs, BlockdevOptions, DriveMirror, MirrorSyncMode};
use crate::graph::image::{image_node, qmp_error};
use crate::graph::not_found;
use crate::jobs::create::{check_format, create_image};
use crate::jobs::mirror::{self, root_device, OwnedTarget};
use crate::state::{Daemon, State};
use crate::QmpError;

/// The `drive-mirror` command.
pub(crate) fn drive_mirror(
    daemon: &Arc<Daemon>,
    st: &mut State,
    args: DriveMirror,
) -> Result<(), QmpError> {
    let Some(device) = st.graph.get(&args.device) else {
        return Err(not_found(&args.device, &args.device));
    };
    root_device(st, &device.name)?;
    let create = args.mode != Some(NewImageMode::Existing);
    if args.replaces.is_some() && args.node_name.is_none() {
        return Err(QmpError::generic(
            "a node-name must be provided when replacing a named node of the graph",
        ));
    }
    let path = Path::new(&args.target);
    let format = match &args.format {
        Some(f) => f.clone(),
        None if create => device.driver.as_str().to_string(),
        None => sluice_image::node::probe_file(path)
            .map_err(qmp_error)?
            .as_str()
            .to_string(),
    };
    check_format(&format)?;
    // What the new image's header names as its backing (qsd's `target_backing_bs`).
    let mut sync = args.sync;
    let chain_below = st.graph.child(device, "backing").map(|b| b.name.clone());
    if chain_below.is_none() && sync == MirrorSyncMode::Top {
        sync = MirrorSyncMode::Full;
    }
    let backing = match sync {
        MirrorSyncMode::Full => None,
        MirrorSyncMode::None => Some(device.name.clone()),
        _ => chain_below,
    };
    let backing = backing.filter(|_| create);
    if create {
        let named = backing.as_deref().and_then(|b| st.graph.get(b));
        let header = named.map(|b| (b.opened.info.filename.as_str(), b.driver.as_str()));
        create_image(path, &format, device.size()?, header)?;
    }
    let mut opts = json!({
        "driver": format,
        "file": {"driver": "file", "filename": args.target},
    });
    if format == "file" {
        opts = json!({"driver": "file", "filename": args.target});
    }
    if backing.is_some() {
        // qsd opens it without its backing until the pivot; so does the graph (see the
        // module doc for the image itself).
        opts["backing"] = json!(null);
    }
    if let Some(n) = &args.node_name {
        opts["node-name"] = json!(n);
    }
    let opts = BlockdevOptions::from_qapi(&mut Input::json(daemon.policy()), &opts)?;
    let target = st.graph.add_unowned(&opts)?;
    let r = attach_backing(st, &target, backing.as_deref()).and_then(|()| {
        let margs = BlockdevMirrorArgs {
            job_id: args.job_id,
            device: args.device,
            target: target.clone(),
            replaces: args.replaces,
            sync,
            speed: args.speed,
            granularity: args.granularity,
            buf_size: args.buf_size,
            on_source_error: args.on_source_error,
            on_target_error: args.on_target_error,
            filter_node_name: None,
            copy_mode: args.copy_mode,
            auto_finalize: args.auto_finalize,
            auto_dismiss: args.auto_dismiss,
        };
        mirror::start(daemon, st, margs, Some(OwnedTarget { backing }))
    });
    if r.is_err() {
        st.graph.drop_unowned(&target);
    }
    r
}

/// Makes the image of `backing` the target image's backing now (see the module doc).
fn attach_backing(st: &State, target: &str, backing: Option<&str>) -> Result<(), QmpError> {
    let Some(b) = backing else { return Ok(()) };
    let image = |name: &str| {
        st.graph
            .get(name)
            .and_then(|n| image_node(&n.opened))
            .ok_or_else(|| {
                QmpError::generic(format!(
                    "drive-mirror: node '{name}' is not an image node (sluice mirrors between \
                     file, raw and qcow2 nodes)"
                ))
            })
    };
    image(target)?.attach_backing(image(b)?).map_err(qmp_error)
}
