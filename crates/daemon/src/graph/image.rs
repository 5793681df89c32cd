//! The image drivers: `file`, `raw` and `qcow2` nodes from `sluice-image`.
//!
//! All three come from one crate on purpose: a format node reads its `file` child through
//! that crate's own node type (its descriptor, its image lock, its metadata caches), so a
//! `"file": "name"` reference only resolves to a node opened by the same crate. Each opened
//! node keeps its `sluice_image::Node` in [`OpenedNode::payload`], where [`image_node`] finds
//! it again when a later node names it as `file` or `backing`.
//!
//! Children are opened through the graph ([`OpenCtx::child`]) so that they get the graph's
//! names, edges and rollback; the image crate then receives them by name. The one exception
//! is a `backing` left out of the options: as qemu does, the chain the image headers name is
//! opened (by the image crate, read-only) and its nodes come back as implicit children named
//! `#blockNNN`.
//!
//! Errors are qemu-storage-daemon's words where it has the same case (`Could not open 'x':
//! No such file or directory`, `Image is not in qcow2 format`, `Failed to get "write" lock`,
//! `Block node is read-only`, its permission conflict); the rest are sluice-image's own
//! one-line messages.

use std::any::Any;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value};
use sluice_block::error::strerror;
use sluice_image::blkdebug::{Blkdebug, DebugEvent, InjectRule, IoType, IoTypes, SetStateRule};
use sluice_image::header::HeaderError;
use sluice_image::{BackingRef, ChildRef, Driver, ImageError, Locking};

use super::{layers, not_found, NodeDriver, NodeInfo, OpenCtx, OpenedNode};
use crate::generated::{
    BlkdebugEvent, BlkdebugIOType, BlockdevDriver, BlockdevOptions, BlockdevOptionsBlkdebug,
    BlockdevOptionsBranch, BlockdevRefOrNull, ImageInfoSpecific, ImageInfoSpecificBranch,
    ImageInfoSpecificFile, ImageInfoSpecificFileWrapper, ImageInfoSpecificQCow2,
    ImageInfoSpecificQCow2Wrapper, OnOffAuto, Qcow2CompressionType,
};
use crate::QmpError;

/// `file`, `raw` and `qcow2` (register it for each of the three).
#[derive(Debug, Default)]
pub struct ImageDriver;

/// The image node behind a graph node, if an image driver opened it.
pub fn image_node(opened: &OpenedNode) -> Option<Arc<sluice_image::Node>> {
    let payload: Arc<dyn Any + Send + Sync> = opened.payload.clone()?;
    payload.downcast::<sluice_image::Node>().ok()
}

impl NodeDriver for ImageDriver {
    fn open(
        &self,
        opts: &BlockdevOptions,
        json: &Value,
        ctx: &mut OpenCtx<'_>,
    ) -> Result<OpenedNode, QmpError> {
        let read_only = ctx.read_only();
        let name = ctx.node_name().to_string();
        match &opts.u {
            BlockdevOptionsBranch::File(f) => {
                let path = Path::new(&f.filename);
                // Checked here for qemu's wording: the image crate calls it "not a regular file".
                if path.is_dir() {
                    return Err(QmpError::generic(format!(
                        "Could not open '{}': {}",
                        f.filename,
                        strerror(&std::io::Error::from_raw_os_error(libc::EISDIR))
                    )));
                }
                let mut o = sluice_image::BlockdevOptions::file(path, read_only);
                o.node_name = Some(name);
                o.locking = match f.locking {
                    None | Some(OnOffAuto::Auto) => Locking::Auto,
                    Some(OnOffAuto::On) => Locking::On,
                    Some(OnOffAuto::Off) => Locking::Off,
                };
                let node = sluice_image::open_node(&o, &|_| None).map_err(qmp_error)?;
                Ok(opened(node, None))
            }
            BlockdevOptionsBranch::Raw(r) => {
                if r.offset.unwrap_or(0) != 0 || r.size.is_some() {
                    return Err(QmpError::generic(
                        "offset and size are not supported by sluice's raw driver yet",
                    ));
                }
                let file = self.file_child(ctx, &r.file, Driver::Raw)?;
                let mut o = format_options(Driver::Raw, name, read_only, file, BackingRef::None);
                o.bitmap_file = r.bitmap_file.as_ref().map(PathBuf::from);
                let node = open_with_graph(ctx, &o, None)?;
                Ok(opened(node, None))
            }
            BlockdevOptionsBranch::Qcow2(q) => {
                let file = self.file_child(ctx, &q.file, Driver::Qcow2)?;
                // The backing's layer: its image node, or a plugin node over its device.
                let mut layer = None;
                let backing = match &q.backing {
                    None => BackingRef::FromHeader,
                    Some(BlockdevRefOrNull::Null) => BackingRef::None,
                    Some(r) => {
                        if let BlockdevRefOrNull::Reference(n) = r {
                            if ctx.node(n).is_none() {
                                return Err(QmpError::generic(format!(
                                    "Could not open backing file: {}",
                                    not_found(n, n).desc
                                )));
                            }
                        }
                        let b = ctx
                            .child_or_null("backing", r)?
                            .expect("not null: matched above");
                        let node = ctx.node(&b).ok_or_else(|| not_found(&b, &b))?;
                        layer = Some(layers::backing_layer(node, &name)?);
                        BackingRef::Child(ChildRef::Node(b))
                    }
                };
                let explicit_backing = !matches!(backing, BackingRef::FromHeader);
                let o = format_options(Driver::Qcow2, name, read_only, file, backing);
                let node = open_with_graph(ctx, &o, layer)?;
                Ok(opened(node, Some(explicit_backing)))
            }
            BlockdevOptionsBranch::Blkdebug(b) => {
                let rules = blkdebug_rules(b)?;
                let file = ctx.child("image", &b.image)?;
                let child = check_image_child(ctx, &file, "image", &name)?;
                if child.driver() != Driver::File {
                    return Err(QmpError::generic(format!(
                        "Node '{file}' cannot be the image child of '{name}': sluice's \
                         blkdebug driver reads 'file' nodes only, not '{}'",
                        child.driver().as_str()
                    )));
                }
                let spec = blkdebug_spec(json, spec(&child));
                let node =
                    sluice_image::open_blkdebug_node(name, child, read_only, Arc::new(rules), spec)
                        .map_err(qmp_error)?;
                Ok(opened(node, None))
            }
            _ => unreachable!("registered for file, raw, qcow2 and blkdebug only"),
        }
    }
}

impl ImageDriver {
    /// Opens or finds the `file` child and checks that it can serve a `driver` node: an
    /// image `file` node, writable if the new node is, and not used by another format
    /// node in a way qemu's permission system would refuse.
    fn file_child(
        &self,
        ctx: &mut OpenCtx<'_>,
        r: &crate::generated::BlockdevRef,
        driver: Driver,
    ) -> Result<String, QmpError> {
        let file = ctx.child("file", r)?;
        let me = ctx.node_name().to_string();
        let node = check_image_child(ctx, &file, "file", &me)?;
        if !matches!(node.driver(), Driver::File | Driver::Blkdebug) {
            return Err(QmpError::generic(format!(
                "Node '{file}' cannot be the file child of '{me}': sluice's {} driver reads \
                 'file' and 'blkdebug' nodes only, not '{}'",
                driver.as_str(),
                node.driver().as_str()
            )));
        }
        // qcow2 needs to write and resize its file and lets no one else do either: a second
        // format node over the same file node conflicts unless both only read.
        for (parent, parent_ro, parent_driver) in ctx.parents_by_role(&file, "file") {
            let qcow2_involved = driver == Driver::Qcow2 || parent_driver == BlockdevDriver::Qcow2;
            if !qcow2_involved || (parent_ro && ctx.read_only()) {
                continue;
            }
            let (requires, unshares) = if parent_ro {
                (me.as_str(), parent.as_str())
            } else {
                (parent.as_str(), me.as_str())
            };
            return Err(QmpError::generic(format!(
                "Permission conflict on node '{file}': permissions 'write, resize' are both \
                 required by node '{requires}' (uses node '{file}' as 'file' child) and \
                 unshared by node '{unshares}' (uses node '{file}' as 'file' child)."
            )));
        }
        Ok(file)
    }
}

/// The image node of graph node `name`, or an error naming the role it was wanted for.
fn check_image_child(
    ctx: &OpenCtx<'_>,
    name: &str,
    role: &str,
    parent: &str,
) -> Result<Arc<sluice_image::Node>, QmpError> {
    let node = ctx.node(name).ok_or_else(|| not_found(name, name))?;
    image_node(&node.opened).ok_or_else(|| {
        QmpError::generic(format!(
            "Node '{name}' (driver {}) cannot be the {role} child of '{parent}': sluice's raw and \
             qcow2 drivers read file, raw and qcow2 nodes only",
            node.driver.as_str()
        ))
    })
}

/// blkdebug's options as the rules of [`sluice_image::blkdebug`], refusing what sluice
/// does not do (a config file, alignment and limits, events it does not raise).
fn blkdebug_rules(b: &BlockdevOptionsBlkdebug) -> Result<Blkdebug, QmpError> {
    let unsupported = |what: &str| {
        QmpError::generic(format!(
            "blkdebug: {what} is not supported by sluice (give the rules as inject-error and \
             set-state)"
        ))
    };
    if b.config.is_some() {
        return Err(unsupported("a config file"));
    }
    if b.align.is_some_and(|a| a != 1) {
        return Err(unsupported("align other than 1"));
    }
    let limits = [
        ("max-transfer", b.max_transfer),
        ("opt-write-zero", b.opt_write_zero),
        ("max-write-zero", b.max_write_zero),
        ("opt-discard", b.opt_discard),
        ("max-discard", b.max_discard),
    ];
    if let Some((key, _)) = limits.iter().find(|(_, v)| v.is_some_and(|v| v != 0)) {
        return Err(unsupported(key));
    }
    if b.take_child_perms.as_ref().is_some_and(|p| !p.is_empty())
        || b.unshare_child_perms
            .as_ref()
            .is_some_and(|p| !p.is_empty())
    {
        return Err(unsupported("take-child-perms / unshare-child-perms"));
    }
    let event = |e: BlkdebugEvent| match e {
        BlkdebugEvent::ReadAio => Ok(DebugEvent::ReadAio),
        BlkdebugEvent::WriteAio => Ok(DebugEvent::WriteAio),
        BlkdebugEvent::FlushToDisk => Ok(DebugEvent::FlushToDisk),
        e => Err(QmpError::generic(format!(
            "blkdebug: event '{}' is never raised by sluice (it raises read_aio, write_aio and \
             flush_to_disk)",
            e.as_str()
        ))),
    };
    // qemu: state 0 (the default) means any state.
    let state = |s: Option<i64>| s.filter(|&s| s != 0);
    let mut inject = Vec::new();
    for r in b.inject_error.iter().flatten() {
        let mut rule = InjectRule::new(event(r.event)?);
        rule.state = state(r.state);
        if let Some(e) = r.errno {
            rule.errno = i32::try_from(e)
                .ok()
                .filter(|e| (0..4096).contains(e))
                .ok_or_else(|| {
                    QmpError::generic(format!("blkdebug: errno {e} is not an errno (0 to 4095)"))
                })?;
        }
        rule.offset = match r.sector {
            None | Some(-1) => None,
            Some(s) if (0..=i64::MAX / 512).contains(&s) => Some(s as u64 * 512),
            Some(s) => {
                return Err(QmpError::generic(format!(
                    "blkdebug: sector {s} is neither -1 (any) nor a sector number"
                )))
            }
        };
        rule.once = r.once.unwrap_or(false);
        rule.iotypes = match r.iotype {
            None => IoTypes::ALL,
            Some(BlkdebugIOType::Read) => IoTypes::only(IoType::Read),
            Some(BlkdebugIOType::Write) => IoTypes::only(IoType::Write),
            Some(BlkdebugIOType::WriteZeroes) => IoTypes::only(IoType::WriteZeroes),
            Some(BlkdebugIOType::Discard) => IoTypes::only(IoType::Discard),
            Some(BlkdebugIOType::Flush) => IoTypes::only(IoType::Flush),
            Some(BlkdebugIOType::BlockStatus) => {
                return Err(unsupported("iotype block-status"));
            }
        };
        inject.push(rule);
    }
    let mut set_state = Vec::new();
    for r in b.set_state.iter().flatten() {
        set_state.push(SetStateRule {
            event: event(r.event)?,
            state: state(r.state),
            new_state: r.new_state,
        });
    }
    Ok(Blkdebug::new(inject, set_state))
}

/// A blkdebug node's options as qemu shows them in a `json:` filename: the driver, the
/// image's options, and the rules flattened (`inject-error.0.event`), as given.
fn blkdebug_spec(json: &Value, image: Value) -> Value {
    let mut m = Map::new();
    m.insert("driver".into(), "blkdebug".into());
    m.insert("image".into(), image);
    for key in ["inject-error", "set-state"] {
        for (i, rule) in json[key].as_array().into_iter().flatten().enumerate() {
            for (k, v) in rule.as_object().into_iter().flatten() {
                m.insert(format!("{key}.{i}.{k}"), v.clone());
            }
        }
    }
    if let Some(a) = json.get("align") {
        m.insert("align".into(), a.clone());
    }
    Value::Object(m)
}

fn format_options(
    driver: Driver,
    name: String,
    read_only: bool,
    file: String,
    backing: BackingRef,
) -> sluice_image::BlockdevOptions {
    sluice_image::BlockdevOptions {
        driver,
        node_name: Some(name),
        read_only,
        filename: None,
        locking: Locking::Auto,
        file: Some(ChildRef::Node(file)),
        backing,
        bitmap_file: None,
    }
}

/// Opens a format node whose named children are graph nodes; `backing` is the layer
/// found for its backing (see [`layers::backing_layer`]).
fn open_with_graph(
    ctx: &OpenCtx<'_>,
    o: &sluice_image::BlockdevOptions,
    backing: Option<Arc<sluice_image::Node>>,
) -> Result<Arc<sluice_image::Node>, QmpError> {
    let resolve = |n: &str| match &backing {
        Some(b) if b.name() == n => Some(b.clone()),
        _ => ctx.node(n).and_then(|n| image_node(&n.opened)),
    };
    sluice_image::open_node(o, &resolve).map_err(qmp_error)
}

/// A graph node for `node`. `explicit_backing`: for qcow2, whether the options chose the
/// backing (Some(false): the header's chain, whose nodes become implicit children); it is
/// named by its options when they chose another backing than its header's.
fn opened(node: Arc<sluice_image::Node>, explicit_backing: Option<bool>) -> OpenedNode {
    let named_by_options = explicit_backing == Some(true) && backing_overridden(&node);
    let info = node_info(&node, named_by_options);
    let mut o = OpenedNode::new(node.clone(), info);
    if explicit_backing == Some(false) {
        if let Some(b) = node.backing() {
            o.implicit_children
                .push(("backing".into(), None, driver_of(&b), implicit(&b)));
        }
    }
    o.payload = Some(node);
    o
}

/// Recomputes what `query-named-block-nodes` says of an image node (after its backing
/// changed); other nodes are left alone.
pub fn refresh_info(opened: &mut OpenedNode) {
    if let Some(node) = image_node(opened) {
        let explicit_backing = opened.info.filename.starts_with("json:");
        opened.info = node_info(&node, explicit_backing);
    }
}

/// Recomputes what `query-named-block-nodes` says of an image node whose backing a reopen
/// chose (see [`backing_overridden`]).
pub fn refresh_info_after_backing_change(opened: &mut OpenedNode) {
    if let Some(node) = image_node(opened) {
        opened.info = node_info(&node, backing_overridden(&node));
    }
}

/// Recomputes what `query-named-block-nodes` says of an image node whose backing is now
/// the node its header names (drive-mirror's target after the pivot: the header was
/// written with the backing node's own name, `json:{...}` included, which qemu's
/// `bdrv_backing_overridden` compares with, so the node is named by its file again).
pub fn refresh_info_backing_from_header(opened: &mut OpenedNode) {
    if let Some(node) = image_node(opened) {
        opened.info = node_info(&node, false);
    }
}

/// True if a qcow2 node's backing is not, to the letter, the file its header names (or it
/// has none while the header names one): qemu then names the node by its options
/// (`json:{...}`), since its file name alone would not give it back. qemu compares the
/// header's string as written (`bdrv_backing_overridden`: `auto_backing_file` against the
/// backing's file name), so a relative name in the header counts as overridden when the
/// backing was chosen by the options, as qsd shows it.
fn backing_overridden(node: &sluice_image::Node) -> bool {
    let header = node.qcow2().and_then(|q| q.header.backing_file);
    match node.backing() {
        None => header.is_some(),
        Some(b) => header.as_deref().map(Path::new) != Some(b.filename()),
    }
}

/// A node of a chain opened from image headers, with its own file child and backing.
fn implicit(node: &Arc<sluice_image::Node>) -> OpenedNode {
    let mut o = OpenedNode::new(node.clone(), node_info(node, false));
    for (role, child) in node.children() {
        o.implicit_children
            .push((role.into(), None, driver_of(&child), implicit(&child)));
    }
    o.payload = Some(node.clone());
    o
}

fn driver_of(node: &sluice_image::Node) -> BlockdevDriver {
    match node.driver() {
        Driver::File => BlockdevDriver::File,
        Driver::Raw => BlockdevDriver::Raw,
        Driver::Qcow2 => BlockdevDriver::Qcow2,
        Driver::Blkdebug => BlockdevDriver::Blkdebug,
        // Never opened from a header: plugin nodes stand for graph nodes of their own.
        Driver::Plugin => BlockdevDriver::SluicePlugin,
    }
}

/// What `query-named-block-nodes` reports, as qemu-storage-daemon does.
fn node_info(node: &sluice_image::Node, explicit_backing: bool) -> NodeInfo {
    let path = node.filename().display().to_string();
    let actual_size = std::fs::metadata(node.filename())
        .ok()
        .map(|m| (m.blocks() * 512) as i64);
    let mut info = NodeInfo {
        filename: path.clone(),
        format: node.driver().as_str().to_string(),
        actual_size,
        dirty_flag: Some(false),
        ..NodeInfo::default()
    };
    match node.driver() {
        Driver::File => {
            info.format_specific = Some(ImageInfoSpecific {
                u: ImageInfoSpecificBranch::File(ImageInfoSpecificFileWrapper {
                    data: ImageInfoSpecificFile {
                        extent_size_hint: None,
                    },
                }),
            });
        }
        Driver::Blkdebug => {
            info.actual_size = None;
            let spec = spec(node);
            // qemu names the node `blkdebug::FILE` while its options hold nothing but the
            // image, and by its options once they hold rules.
            let only_image = spec
                .as_object()
                .is_some_and(|m| m.keys().all(|k| k == "driver" || k == "image"));
            info.filename = if only_image {
                format!("blkdebug::{path}")
            } else {
                format!("json:{}", qemu_json(&spec))
            };
        }
        Driver::Raw | Driver::Plugin => {}
        Driver::Qcow2 => {
            let Some(q) = node.qcow2() else { return info };
            let h = &q.header;
            let v3 = h.version >= 3;
            let incompat = |bit: u64| h.incompatible_features & bit != 0;
            info.cluster_size = Some(h.cluster_size() as i64);
            info.dirty_flag = Some(incompat(sluice_image::header::INCOMPAT_DIRTY));
            info.format_specific = Some(ImageInfoSpecific {
                u: ImageInfoSpecificBranch::Qcow2(ImageInfoSpecificQCow2Wrapper {
                    data: ImageInfoSpecificQCow2 {
                        compat: if v3 { "1.1" } else { "0.10" }.to_string(),
                        lazy_refcounts: v3.then_some(h.compatible_features & 1 != 0),
                        corrupt: v3.then_some(incompat(sluice_image::header::INCOMPAT_CORRUPT)),
                        refcount_bits: 1i64 << h.refcount_order,
                        extended_l2: v3.then_some(incompat(sluice_image::header::INCOMPAT_EXTL2)),
                        compression_type: Some(if h.compression_type == 1 {
                            Qcow2CompressionType::Zstd
                        } else {
                            Qcow2CompressionType::Zlib
                        }),
                    },
                }),
            });
            if let Some(b) = &h.backing_file {
                info.backing_filename = Some(b.clone());
                let full = match Path::new(b) {
                    p if p.is_absolute() => p.to_owned(),
                    p => node.filename().parent().unwrap_or(Path::new(".")).join(p),
                };
                info.full_backing_filename = Some(full.display().to_string());
                info.backing_filename_format = h.backing_format().map(str::to_string);
            }
            if explicit_backing {
                // The file name alone would not give this node back (its header decides the
                // backing otherwise), so qemu names it by its options, as `json:{...}`.
                info.filename = format!("json:{}", qemu_json(&spec(node)));
            }
        }
    }
    let over_debug = node
        .file_child()
        .is_some_and(|f| f.driver() == Driver::Blkdebug);
    if over_debug {
        // qemu: blkdebug is a protocol driver without an allocated size, and a format node
        // over it is named as its file node is (`blkdebug::FILE`) or by its options.
        info.actual_size = None;
        if over_rules(node) || explicit_backing {
            info.filename = format!("json:{}", qemu_json(&spec(node)));
        } else {
            info.filename = format!("blkdebug::{path}");
        }
    }
    info
}

/// True if `node` reads its file through a blkdebug node with rules: its file name alone
/// would not give it back, so qemu names it by its options.
fn over_rules(node: &sluice_image::Node) -> bool {
    node.file_child()
        .and_then(|f| f.blkdebug_spec())
        .and_then(Value::as_object)
        .is_some_and(|m| m.keys().any(|k| k != "driver" && k != "image"))
}

/// A node's options as qemu rebuilds them for a `json:` filename (keys sorted).
pub(super) fn spec(node: &sluice_image::Node) -> Value {
    let mut m = Map::new();
    match node.driver() {
        Driver::Blkdebug => return node.blkdebug_spec().cloned().unwrap_or(Value::Null),
        // A device's node is named by its options (an rbd node's `json:{...}`).
        Driver::Plugin => {
            let name = node.filename().display().to_string();
            let options = name.strip_prefix("json:").map(serde_json::from_str);
            return match options {
                Some(Ok(v)) => v,
                _ => Value::String(name),
            };
        }
        Driver::File => {
            m.insert("driver".into(), "file".into());
            m.insert(
                "filename".into(),
                node.filename().display().to_string().into(),
            );
        }
        Driver::Raw | Driver::Qcow2 => {
            if node.driver() == Driver::Qcow2 {
                let header_names_one = node
                    .qcow2()
                    .is_some_and(|q| q.header.backing_file.is_some());
                match node.backing() {
                    Some(b) => {
                        m.insert("backing".into(), spec(&b));
                    }
                    None if header_names_one => {
                        m.insert("backing".into(), Value::Null);
                    }
                    None => {}
                }
            }
            m.insert("driver".into(), node.driver().as_str().into());
            if let Some(f) = node.file_child() {
                m.insert("file".into(), spec(f));
            }
        }
    }
    Value::Object(m)
}

/// JSON as QEMU prints it: `", "` and `": "` between items.
pub(super) fn qemu_json(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let items: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{}: {}", Value::String(k.clone()), qemu_json(v)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        Value::Array(a) => {
            let items: Vec<String> = a.iter().map(qemu_json).collect();
            format!("[{}]", items.join(", "))
        }
        v => v.to_string(),
    }
}

/// An image error as qemu-storage-daemon words the same failure.
pub fn qmp_error(e: ImageError) -> QmpError {
    QmpError::generic(describe(&e))
}

fn describe(e: &ImageError) -> String {
    match e {
        ImageError::Open { path, source } => {
            format!("Could not open '{}': {}", path.display(), strerror(source))
        }
        ImageError::BadImage {
            source: HeaderError::BadMagic,
            ..
        } => "Image is not in qcow2 format".to_string(),
        ImageError::Locked { perm, shared, .. } => format!(
            "Failed to get {}\"{perm}\" lock",
            if *shared { "shared " } else { "" }
        ),
        ImageError::NodeNotFound(n) => not_found(n, n).desc,
        ImageError::Backing { source, .. } => {
            format!("Could not open backing file: {}", describe(source))
        }
        e => e.to_string(),
    }
}

/// The end of a commit's writes into a read-only base: flushes the writer (if still
/// open), then makes the base node drop the caches the writer made stale.
pub fn close_writer(
    writer: Option<&Arc<sluice_image::Node>>,
    base: &sluice_image::Node,
) -> Result<(), String> {
    let flushed = writer.map_or(Ok(()), |w| w.flush().map_err(|e| e.errno.describe()));
    let reloaded = base.reload().map_err(|e| qmp_error(e).desc);
    flushed.and(reloaded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn qemu_json_uses_qemu_separators() {
        let v = json!({"backing": null, "driver": "qcow2", "file": {"driver": "file", "filename": "/a \"b\""}});
        assert_eq!(
            qemu_json(&v),
            r#"{"backing": null, "driver": "qcow2", "file": {"driver": "file", "filename": "/a \"b\""}}"#
        );
    }

    #[test]
    fn image_errors_map_to_qsd_messages() {
        let desc = |e: ImageError| qmp_error(e).desc;
        assert_eq!(
            desc(ImageError::Open {
                path: "/x/y.qcow2".into(),
                source: std::io::Error::from_raw_os_error(libc::ENOENT),
            }),
            "Could not open '/x/y.qcow2': No such file or directory"
        );
        assert_eq!(
            desc(ImageError::BadImage {
                path: "/x".into(),
                source: HeaderError::BadMagic,
            }),
            "Image is not in qcow2 format"
        );
        assert_eq!(
            desc(ImageError::Locked {
                path: "/x".into(),
                perm: "write",
                shared: true,
            }),
            "Failed to get shared \"write\" lock"
        );
        assert_eq!(
            desc(ImageError::Backing {
                image: "/x/top".into(),
                backing: "/x/base".into(),
                source: Box::new(ImageError::Open {
                    path: "/x/base".into(),
                    source: std::io::Error::from_raw_os_error(libc::ENOENT),
                }),
            }),
            "Could not open backing file: Could not open '/x/base': No such file or directory"
        );
    }
}
