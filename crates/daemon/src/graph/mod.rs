//! The block-node graph: named nodes, their drivers, their children, who may delete them.
//!
//! A node is what `blockdev-add` creates: a driver's [`OpenedNode`] (a sluice
//! [`Plugin`] — what an export serves and what a format node reads its child through —
//! plus what `query-named-block-nodes` reports), its name, its read-only flag and its edges
//! to child nodes. Nodes given inline (`"file": {"driver": "file", ...}`) become children
//! named `#blockNNN` unless they carry a `node-name`; nodes given by name are shared.
//!
//! Drivers are looked up in a [`DriverRegistry`] by `BlockdevDriver`: `file`, `raw` and
//! `qcow2` come from `crates/image` ([`image`]), the others from [`drivers`].
//! A driver opens children through [`OpenCtx::child`] (which records edges and undoes
//! everything if the parent then fails, so a failed `blockdev-add` leaves no trace) or
//! returns nodes it made itself in [`OpenedNode::implicit_children`] (a qcow2 backing chain
//! opened from the image headers), which may have implicit children of their own. Nodes are
//! inserted in qemu's order (file child, node, then its backing), so that
//! `query-named-block-nodes` lists them as qemu-storage-daemon does.
//!
//! The rules and messages for deleting are qemu-storage-daemon's: a node must exist, must not
//! be exported (`Node x is in use`), must not be another node's backing (`Node 'x' is busy:
//! node is used as backing hd of 'y'`), must have been added by the monitor (`... is not owned
//! by the monitor`), and must not be a child of another node (`Block device x is in use`).
//! Deleting a node deletes its inline children. `blockdev-reopen` is [`reopen`]: it compares
//! new options with the ones each node keeps ([`Node::options`]) and reopens the children a
//! node created itself ([`Node::inherits_from`]) with it.
//!
//! The graph is plain data behind the daemon's state lock; nothing here blocks except the
//! drivers' opens, which the daemon runs off its async threads.

pub mod bitmaps;
pub mod drivers;
pub mod filters;
pub mod image;
pub mod layers;
pub mod rbd;
pub mod reopen;
pub mod xdbg;

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;
use sluice_block::plugins::ConfigArg;
use sluice_block::{Handle, OpenContext, Plugin};

use crate::generated::{
    BlockDeviceInfo, BlockdevCacheInfo, BlockdevDetectZeroesOptions, BlockdevDriver,
    BlockdevOptions, BlockdevRef, BlockdevRefOrNull, ImageInfo, ImageInfoSpecific,
};
use crate::QmpError;
use sluice_qapi::runtime::{Output, ToQapi};

/// Longest node name (QEMU's limit: the name must fit 32 bytes with its NUL).
pub const MAX_NODE_NAME: usize = 31;

/// What `query-named-block-nodes` says about a node's image.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeInfo {
    /// The `file` member and `image.filename` (a path, or `null-co://`).
    pub filename: String,
    /// `image.format` (the driver name as QEMU reports it).
    pub format: String,
    pub actual_size: Option<i64>,
    pub dirty_flag: Option<bool>,
    pub format_specific: Option<ImageInfoSpecific>,
    /// `image.cluster-size` (qcow2).
    pub cluster_size: Option<i64>,
    /// `image.backing-filename`: the backing file name the image header records.
    pub backing_filename: Option<String>,
    /// `image.full-backing-filename`: that name resolved against the image's directory.
    pub full_backing_filename: Option<String>,
    /// `image.backing-filename-format`: the format the image header records for it.
    pub backing_filename_format: Option<String>,
}

/// A node as a driver opened it.
pub struct OpenedNode {
    /// What exports serve and parents read.
    pub plugin: Arc<dyn Plugin>,
    pub info: NodeInfo,
    /// Driver data other drivers may downcast (crates/image keeps its own node here so that a
    /// qcow2 node can use a child it opened earlier).
    pub payload: Option<Arc<dyn Any + Send + Sync>>,
    /// Children the driver created itself: role, name (None for a generated `#blockNNN`),
    /// driver, node.
    pub implicit_children: Vec<(String, Option<String>, BlockdevDriver, OpenedNode)>,
}

impl std::fmt::Debug for OpenedNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedNode")
            .field("plugin", &self.plugin.name())
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl OpenedNode {
    pub fn new(plugin: Arc<dyn Plugin>, info: NodeInfo) -> OpenedNode {
        OpenedNode {
            plugin,
            info,
            payload: None,
            implicit_children: Vec::new(),
        }
    }
}

/// Opens nodes of one driver.
pub trait NodeDriver: Send + Sync {
    /// Opens a node from its checked options. `json` is the same options in canonical JSON
    /// (for drivers that read their own option types). The node is read-only if
    /// `ctx.read_only()`.
    fn open(
        &self,
        opts: &BlockdevOptions,
        json: &Value,
        ctx: &mut OpenCtx<'_>,
    ) -> Result<OpenedNode, QmpError>;
}

/// How `sluice-plugin` nodes load plugins: built-in ones, nbdkit C plugins, Python scripts.
/// The binary provides the full loader; [`BuiltinLoader`] knows the built-in plugins only.
pub trait PluginLoader: Send + Sync {
    fn load(&self, name: &str, params: &[ConfigArg]) -> Result<Arc<dyn Plugin>, String>;
}

/// Loads sluice's built-in plugins (memory, file, null, pattern).
#[derive(Debug, Default)]
pub struct BuiltinLoader;

impl PluginLoader for BuiltinLoader {
    fn load(&self, name: &str, params: &[ConfigArg]) -> Result<Arc<dyn Plugin>, String> {
        match sluice_block::plugins::open_builtin(name, params) {
            Some(r) => r.map_err(|e| e.to_string()),
            None => Err(format!(
                "unknown plugin '{name}' (built-in plugins: {})",
                sluice_block::plugins::builtin_names().join(", ")
            )),
        }
    }
}

/// The drivers `blockdev-add` can use.
#[derive(Clone)]
pub struct DriverRegistry {
    drivers: HashMap<BlockdevDriver, Arc<dyn NodeDriver>>,
}

impl std::fmt::Debug for DriverRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<_> = self.drivers.keys().map(|d| d.as_str()).collect();
        names.sort_unstable();
        f.debug_struct("DriverRegistry")
            .field("drivers", &names)
            .finish()
    }
}

impl DriverRegistry {
    /// The drivers sluice has: file, raw, qcow2 (images), null-co, null-aio, rbd (without
    /// secret objects: register an [`rbd::RbdDriver`] with a lookup to have them),
    /// sluice-plugin.
    pub fn builtin(loader: Arc<dyn PluginLoader>) -> DriverRegistry {
        let mut r = DriverRegistry {
            drivers: HashMap::new(),
        };
        let images: Arc<dyn NodeDriver> = Arc::new(image::ImageDriver);
        r.register(BlockdevDriver::File, images.clone());
        r.register(BlockdevDriver::Raw, images.clone());
        r.register(BlockdevDriver::Qcow2, images.clone());
        r.register(BlockdevDriver::Blkdebug, images);
        r.register(
            BlockdevDriver::CopyOnRead,
            Arc::new(filters::CopyOnReadDriver),
        );
        r.register(BlockdevDriver::NullCo, Arc::new(drivers::NullDriver));
        r.register(BlockdevDriver::NullAio, Arc::new(drivers::NullDriver));
        r.register(
            BlockdevDriver::Rbd,
            Arc::new(rbd::RbdDriver::new(Arc::new(rbd::NoSecrets))),
        );
        r.register(
            BlockdevDriver::SluicePlugin,
            Arc::new(drivers::PluginDriver { loader }),
        );
        r
    }

    /// Adds or replaces the driver for `driver`.
    pub fn register(&mut self, driver: BlockdevDriver, imp: Arc<dyn NodeDriver>) {
        self.drivers.insert(driver, imp);
    }

    pub fn get(&self, driver: BlockdevDriver) -> Option<&Arc<dyn NodeDriver>> {
        self.drivers.get(&driver)
    }
}

/// A node in the graph.
pub struct Node {
    pub name: String,
    pub driver: BlockdevDriver,
    pub read_only: bool,
    /// Added by `blockdev-add`/`--blockdev` at the top level (may be deleted by the user).
    pub monitor_owned: bool,
    /// Edges to children: (role, child name).
    pub children: Vec<(String, String)>,
    /// The options the node was opened (or last reopened) with, as given (canonical JSON;
    /// children given inline are objects, children by name strings); for a node opened
    /// from an image header, its driver and file name. `blockdev-reopen` compares against
    /// them.
    pub options: Value,
    /// The parent this node was created for (inline in its options, or from its image
    /// header): such a child is reopened with its parent, as in qemu.
    pub inherits_from: Option<String>,
    pub opened: OpenedNode,
    pub cache: BlockdevCacheInfo,
    pub detect_zeroes: BlockdevDetectZeroesOptions,
    /// Number of exports of this node.
    pub exports: usize,
    /// The node's dirty bitmaps (see [`bitmaps`]).
    pub bitmaps: Arc<sluice_image::Bitmaps>,
    /// The requests of every export of this node, added up (`query-blockstats` with
    /// `query-nodes`); each export's backend counts into it besides its own.
    pub stats: Arc<sluice_block::BlockStats>,
    /// `block-set-write-threshold`: an image node's own (checked in its gate or storage),
    /// any other node's checked by the filter over its plugin ([`bitmaps::MarkBitmaps`]).
    pub threshold: Arc<sluice_block::WriteThreshold>,
    /// A handle kept open for size queries (opening it also proved the node works).
    probe: Box<dyn Handle>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("driver", &self.driver)
            .field("read_only", &self.read_only)
            .field("children", &self.children)
            .finish_non_exhaustive()
    }
}

impl Node {
    pub fn plugin(&self) -> &Arc<dyn Plugin> {
        &self.opened.plugin
    }

    /// The node's current size in bytes.
    pub fn size(&self) -> Result<u64, QmpError> {
        self.probe
            .get_size()
            .map_err(|e| QmpError::generic(format!("Cannot get size of node '{}': {e}", self.name)))
    }
}

/// All nodes, by name, in the order they were added.
pub struct Graph {
    nodes: Vec<Node>,
    drivers: DriverRegistry,
    next_auto: u32,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Graph").field("nodes", &self.nodes).finish()
    }
}

/// QEMU's `id_wellformed`: a letter, then letters, digits, `-`, `.`, `_`.
pub fn id_wellformed(id: &str) -> bool {
    let mut c = id.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic())
        && c.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// The message for a node name that is not found where a node or device was expected.
pub fn not_found(device: &str, node: &str) -> QmpError {
    QmpError::generic(format!(
        "Cannot find device='{device}' nor node-name='{node}'"
    ))
}

impl Graph {
    pub fn new(drivers: DriverRegistry) -> Graph {
        Graph {
            nodes: Vec::new(),
            drivers,
            next_auto: 0,
        }
    }

    pub fn drivers_mut(&mut self) -> &mut DriverRegistry {
        &mut self.drivers
    }

    pub fn get(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Node> {
        self.nodes.iter_mut().find(|n| n.name == name)
    }

    /// Nodes, newest first (qemu-storage-daemon's order).
    pub fn iter(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().rev()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// `blockdev-add`: creates a node and its inline children, or nothing at all.
    pub fn add(&mut self, opts: &BlockdevOptions) -> Result<(), QmpError> {
        let Some(name) = &opts.node_name else {
            return Err(QmpError::generic(
                "'node-name' must be specified for the root node",
            ));
        };
        let name = name.clone();
        let mut created = Vec::new();
        let r = self.open_node(opts, Some(name), None, &mut created);
        match r {
            Ok(top) => {
                if let Some(n) = self.get_mut(&top) {
                    n.monitor_owned = true;
                }
                Ok(())
            }
            Err(e) => {
                // Undo: children made for this node, newest first.
                for n in created.iter().rev() {
                    self.nodes.retain(|x| &x.name != n);
                }
                Err(e)
            }
        }
    }

    /// Opens a node the monitor does not own (a `blockdev-snapshot-sync` overlay): named
    /// by its options or `#blockNNN`; returns its name. Nothing is left on failure.
    pub fn add_unowned(&mut self, opts: &BlockdevOptions) -> Result<String, QmpError> {
        let mut created = Vec::new();
        let r = self.open_node(opts, None, None, &mut created);
        if r.is_err() {
            for n in created.iter().rev() {
                self.nodes.retain(|x| &x.name != n);
            }
        }
        r
    }

    /// True if node `name` exists and nothing in the graph holds it: no parent, no export,
    /// and not the monitor's (jobs are the caller's to check).
    pub fn unheld(&self, name: &str) -> bool {
        !self.has_parent(name)
            && self
                .get(name)
                .is_some_and(|n| !n.monitor_owned && n.exports == 0)
    }

    /// Removes a node [`Graph::add_unowned`] made, with its children no one else holds.
    pub fn drop_unowned(&mut self, name: &str) {
        self.remove_tree(name);
    }

    fn check_new_name(&self, name: &str) -> Result<(), QmpError> {
        if !id_wellformed(name) {
            return Err(QmpError::generic(format!("Invalid node-name: '{name}'")));
        }
        if self.get(name).is_some() {
            return Err(QmpError::generic(format!(
                "Duplicate nodes with node-name='{name}'"
            )));
        }
        if name.len() > MAX_NODE_NAME {
            return Err(QmpError::generic("Node name too long"));
        }
        Ok(())
    }

    fn auto_name(&mut self) -> String {
        loop {
            let n = format!("#block{:03}", self.next_auto);
            self.next_auto = self.next_auto.wrapping_add(1);
            if self.get(&n).is_none() {
                return n;
            }
        }
    }

    /// Opens one node (children first, through the driver) and inserts it. `inherit_ro` is the
    /// parent's read-only flag for inline children. Names of inserted nodes go to `created`.
    fn open_node(
        &mut self,
        opts: &BlockdevOptions,
        name: Option<String>,
        inherit_ro: Option<bool>,
        created: &mut Vec<String>,
    ) -> Result<String, QmpError> {
        let name = match name.or_else(|| opts.node_name.clone()) {
            Some(n) => {
                self.check_new_name(&n)?;
                n
            }
            None => self.auto_name(),
        };
        let read_only = opts.read_only.or(inherit_ro).unwrap_or(false);
        if opts.force_share == Some(true) && !read_only {
            return Err(QmpError::generic(
                "force-share=on can only be used with read-only images",
            ));
        }
        if opts
            .detect_zeroes
            .is_some_and(|d| d != BlockdevDetectZeroesOptions::Off)
        {
            return Err(QmpError::generic(
                "detect-zeroes is not supported by sluice yet (only 'off')",
            ));
        }
        let direct = opts.cache.as_ref().and_then(|c| c.direct).unwrap_or(false);
        if direct {
            return Err(QmpError::generic(
                "cache.direct=on is not supported by sluice yet",
            ));
        }
        let no_flush = opts
            .cache
            .as_ref()
            .and_then(|c| c.no_flush)
            .unwrap_or(false);
        let driver_kind = opts.u.tag();
        let Some(driver) = self.drivers.get(driver_kind).cloned() else {
            return Err(QmpError::generic(format!(
                "Driver '{driver_kind}' is not supported by this build of sluice yet"
            )));
        };
        let json = opts.to_qapi(&Output::default());
        let mut ctx = OpenCtx {
            graph: self,
            node: name.clone(),
            read_only,
            edges: Vec::new(),
            after: Vec::new(),
            created: &mut *created,
        };
        let opened = driver.open(opts, &json, &mut ctx)?;
        let edges = std::mem::take(&mut ctx.edges);
        let after = std::mem::take(&mut ctx.after);
        self.insert_tree(
            name.clone(),
            driver_kind,
            read_only,
            opened,
            edges,
            no_flush,
            created,
        )?;
        if let Some(n) = self.get_mut(&name) {
            n.options = json;
        }
        // Inline backing nodes were opened first (the driver needed them) but go after
        // their parent, as in qemu.
        if !after.is_empty() {
            let (moved, kept): (Vec<Node>, Vec<Node>) = std::mem::take(&mut self.nodes)
                .into_iter()
                .partition(|n| after.contains(&n.name));
            self.nodes = kept;
            self.nodes.extend(moved);
        }
        Ok(name)
    }

    /// Inserts a node with its implicit children, recursively: children in role `backing`
    /// after the node (they are read-only), the others before it (with its read-only flag).
    #[allow(clippy::too_many_arguments)]
    fn insert_tree(
        &mut self,
        name: String,
        driver: BlockdevDriver,
        read_only: bool,
        mut opened: OpenedNode,
        mut edges: Vec<(String, String)>,
        no_flush: bool,
        created: &mut Vec<String>,
    ) -> Result<(), QmpError> {
        let mut after = Vec::new();
        for (role, child_name, child_driver, child) in std::mem::take(&mut opened.implicit_children)
        {
            let child_name = match child_name {
                Some(n) => {
                    self.check_new_name(&n)?;
                    n
                }
                None => self.auto_name(),
            };
            edges.push((role.clone(), child_name.clone()));
            if role == "backing" {
                after.push((child_name, child_driver, child));
            } else {
                self.insert_tree(
                    child_name.clone(),
                    child_driver,
                    read_only,
                    child,
                    Vec::new(),
                    no_flush,
                    created,
                )?;
                if let Some(c) = self.get_mut(&child_name) {
                    c.inherits_from = Some(name.clone());
                }
            }
        }
        self.insert(name.clone(), driver, read_only, opened, no_flush, created)?;
        if let Some(n) = self.get_mut(&name) {
            n.children = edges;
        }
        for (child_name, child_driver, child) in after {
            self.insert_tree(
                child_name.clone(),
                child_driver,
                true,
                child,
                Vec::new(),
                no_flush,
                created,
            )?;
            if let Some(c) = self.get_mut(&child_name) {
                c.inherits_from = Some(name.clone());
            }
        }
        Ok(())
    }

    fn insert(
        &mut self,
        name: String,
        driver: BlockdevDriver,
        read_only: bool,
        mut opened: OpenedNode,
        no_flush: bool,
        created: &mut Vec<String>,
    ) -> Result<(), QmpError> {
        // Image nodes mark their bitmaps in their own gate; any other node through a filter
        // over its plugin, which every export and job reaches. A qcow2 node brings the
        // persistent bitmaps of its image (marked in use while it is writable).
        let (node_bitmaps, threshold) = match image::image_node(&opened) {
            Some(img) => {
                img.load_bitmaps()
                    .map_err(|e| QmpError::generic(format!("Could not open node '{name}': {e}")))?;
                (img.bitmaps().clone(), img.write_threshold().clone())
            }
            None => {
                let set = Arc::<sluice_image::Bitmaps>::default();
                let threshold = Arc::<sluice_block::WriteThreshold>::default();
                let filter = bitmaps::MarkBitmaps(set.clone(), threshold.clone());
                opened.plugin = Arc::new(sluice_block::Filtered::new(filter, opened.plugin));
                (set, threshold)
            }
        };
        let probe = opened
            .plugin
            .open(&OpenContext {
                readonly: read_only,
                export_name: "",
                is_tls: false,
            })
            .map_err(|e| QmpError::generic(format!("Could not open node '{name}': {e}")))?;
        created.push(name.clone());
        self.nodes.push(Node {
            name,
            driver,
            read_only,
            monitor_owned: false,
            children: Vec::new(),
            options: implicit_options(driver, &opened.info),
            inherits_from: None,
            opened,
            cache: BlockdevCacheInfo {
                writeback: true,
                direct: false,
                no_flush,
            },
            detect_zeroes: BlockdevDetectZeroesOptions::Off,
            exports: 0,
            bitmaps: node_bitmaps,
            stats: Arc::new(sluice_block::BlockStats::new()),
            threshold,
            probe,
        });
        Ok(())
    }

    /// True if some node has `name` as a child.
    pub fn has_parent(&self, name: &str) -> bool {
        self.nodes
            .iter()
            .any(|n| n.children.iter().any(|(_, c)| c == name))
    }

    /// The nodes that have `name` as a child in role `role`, oldest first.
    pub fn parents(&self, name: &str, role: &str) -> impl Iterator<Item = &Node> {
        let (name, role) = (name.to_string(), role.to_string());
        self.nodes
            .iter()
            .filter(move |n| n.children.iter().any(|(r, c)| *r == role && *c == name))
    }

    /// The child of `node` in role `role`.
    pub fn child(&self, node: &Node, role: &str) -> Option<&Node> {
        let (_, c) = node.children.iter().find(|(r, _)| r == role)?;
        self.get(c)
    }

    /// Writes back what the writable nodes cache and saves image nodes' persistent bitmaps
    /// (at daemon exit): image nodes their metadata caches, other nodes through a flush
    /// request (an rbd node: librbd's write-back window; it also lets go of the image's
    /// exclusive lock, see [`rbd`]). Errors are logged: there is no one left to report them to.
    pub fn flush_all(&self) {
        for n in self.nodes.iter().filter(|n| !n.read_only) {
            let r = match image::image_node(&n.opened) {
                Some(img) => img.flush().map_err(|e| e.to_string()),
                None if n.probe.can_flush().unwrap_or(false) => n
                    .probe
                    .flush(sluice_block::Flags::NONE)
                    .map_err(|e| e.to_string()),
                None => Ok(()),
            };
            if let Err(e) = r {
                tracing::error!("flushing node '{}' at exit: {e}", n.name);
            }
            if let Some(img) = image::image_node(&n.opened) {
                if let Err(e) = img.store_bitmaps() {
                    tracing::error!("saving the bitmaps of node '{}' at exit: {e}", n.name);
                }
            }
        }
        // Once every node is written back: a node flushed after an rbd node let go of its
        // lock could write into it (a qcow2 node whose requests an active commit sent to
        // it), which librbd refuses, or takes the lock again for.
        for n in self.nodes.iter().filter(|n| !n.read_only) {
            if let Some(img) = rbd::rbd_plugin(&n.opened).and_then(|p| p.image().cloned()) {
                if let Err(e) = img.release_lock() {
                    tracing::error!("node '{}' at exit: {e}", n.name);
                }
            }
        }
    }

    /// `blockdev-del`, with qemu-storage-daemon's checks in its order.
    pub fn del(&mut self, name: &str) -> Result<(), QmpError> {
        let Some(node) = self.get(name) else {
            return Err(QmpError::generic(format!(
                "Failed to find node with node-name='{name}'"
            )));
        };
        if node.exports > 0 {
            return Err(QmpError::generic(format!("Node {name} is in use")));
        }
        if let Some(p) = self.parents(name, "backing").next() {
            return Err(QmpError::generic(format!(
                "Node '{name}' is busy: node is used as backing hd of '{}'",
                p.name
            )));
        }
        if !node.monitor_owned {
            return Err(QmpError::generic(format!(
                "Node {name} is not owned by the monitor"
            )));
        }
        if self.has_parent(name) {
            return Err(QmpError::generic(format!("Block device {name} is in use")));
        }
        self.remove_tree(name);
        Ok(())
    }

    /// `block_resize` of node `name` (found, size checked non-negative, no job on it),
    /// with qsd's refusals: an export or a format parent holds the node (qemu's permission
    /// conflict, in its words), the node is read-only, the size does not suit the format.
    ///
    /// Differs from qsd: a node that is another node's backing is refused too (qsd allows
    /// it), because the nodes above read it through the image object the resize replaces.
    pub fn resize(&mut self, name: &str, size: u64) -> Result<(), QmpError> {
        let Some(node) = self.get(name) else {
            return Err(not_found("", name));
        };
        let unnamed =
            |role: &str| format!("an unnamed block device (uses node '{name}' as '{role}' child)");
        let unsharer = if node.exports > 0 {
            Some(unnamed("root"))
        } else {
            self.nodes
                .iter()
                .find(|p| p.children.iter().any(|(r, c)| r == "file" && c == name))
                .map(|p| format!("node '{}' (uses node '{name}' as 'file' child)", p.name))
        };
        if let Some(u) = unsharer {
            return Err(QmpError::generic(format!(
                "Permission conflict on node '{name}': permissions 'resize' are both required \
                 by {} and unshared by {u}.",
                unnamed("root")
            )));
        }
        if let Some(p) = self.parents(name, "backing").next() {
            return Err(QmpError::generic(format!(
                "Node '{name}' is the backing of '{}': sluice cannot resize a backing node",
                p.name
            )));
        }
        let Some(img) = image::image_node(&node.opened) else {
            return Err(QmpError::generic(format!(
                "Node '{name}' (driver {}) cannot be resized: sluice resizes file, raw and \
                 qcow2 nodes",
                node.driver.as_str()
            )));
        };
        if node.read_only {
            return Err(QmpError::generic("Image is read-only"));
        }
        // qsd rounds a raw or file size up to whole 512-byte sectors (qcow2 refuses it).
        let size = match node.driver {
            BlockdevDriver::Qcow2 => size,
            _ => size.next_multiple_of(512),
        };
        img.resize(size).map_err(|e| match e {
            sluice_image::ImageError::Permission(m)
            | sluice_image::ImageError::InvalidOption(m) => QmpError::generic(m),
            e => image::qmp_error(e),
        })?;
        let children: Vec<String> = node.children.iter().map(|(_, c)| c.clone()).collect();
        for n in std::iter::once(name.to_string()).chain(children) {
            if let Some(n) = self.get_mut(&n) {
                image::refresh_info(&mut n.opened);
            }
        }
        Ok(())
    }

    /// `change-backing-file`, with qemu-storage-daemon's checks in its order: `device` is
    /// a node no other node uses, `image` a node with a backing, in `device`'s backing
    /// chain; the name fits qemu's 1023 bytes. As qsd, the format written beside the name
    /// is the image's own format (`qcow2`), whatever the backing's. A read-only image is
    /// rewritten too (qsd reopens it read-write for the moment). Callers check jobs.
    pub fn change_backing_file(
        &mut self,
        device: &str,
        image: &str,
        backing_file: &str,
    ) -> Result<(), QmpError> {
        if self.get(device).is_none() {
            return Err(not_found(device, device));
        }
        if self.has_parent(device) {
            return Err(QmpError::generic("Need a root block node"));
        }
        let Some(img) = self.get(image) else {
            return Err(not_found("", image));
        };
        if self.child(img, "backing").is_none() {
            return Err(QmpError::generic(
                "not allowing backing file change on an image without a backing file",
            ));
        }
        let mut at = self.get(device);
        let mut contains = false;
        while let Some(n) = at {
            if n.name == image {
                contains = true;
                break;
            }
            at = self.child(n, "backing");
        }
        if !contains {
            return Err(QmpError::generic(format!(
                "'{device}' and image file are not in the same chain"
            )));
        }
        // qsd reopens a read-only image read-write for the rewrite, which another node's
        // hold on the same file (its unshared write) refuses; sluice writes through a
        // descriptor of its own, so it asks the graph. (Other processes' holds are not seen.)
        if let (true, Some(f)) = (img.read_only, self.child(img, "file")) {
            let shared = self.nodes.iter().any(|n| {
                n.name != f.name
                    && n.driver == BlockdevDriver::File
                    && n.opened.info.filename == f.opened.info.filename
            });
            if shared {
                return Err(QmpError::generic("Failed to get \"write\" lock"));
            }
        }
        let failed = |why: &str| {
            QmpError::generic(format!(
                "Could not change backing file to '{backing_file}': {why}"
            ))
        };
        if backing_file.len() > 1023 {
            return Err(failed("Invalid argument"));
        }
        let Some(node) = image::image_node(&img.opened) else {
            return Err(failed("Operation not supported"));
        };
        node.change_backing_file(backing_file, Some(sluice_image::header::Format::Qcow2))
            .map_err(|e| failed(&e.to_string()))?;
        if let Some(n) = self.get_mut(image) {
            image::refresh_info(&mut n.opened);
        }
        Ok(())
    }

    /// Points `parent`'s `role` edge at `child` (None: drops the edge), refreshes the
    /// parent's image info, and removes the old child, recursively, if nothing else holds
    /// it (the layers a `block-stream` dropped from a chain opened from image headers).
    pub fn replace_child(&mut self, parent: &str, role: &str, child: Option<&str>) {
        let Some(p) = self.get_mut(parent) else {
            return;
        };
        let old = p
            .children
            .iter()
            .position(|(r, _)| r == role)
            .map(|i| p.children.remove(i).1);
        if let Some(c) = child {
            p.children.push((role.to_string(), c.to_string()));
        }
        image::refresh_info(&mut p.opened);
        if let Some(old) = old {
            let orphan = Some(old.as_str()) != child && self.unheld(&old);
            if orphan {
                self.remove_tree(&old);
            }
        }
    }

    /// Removes `name` and, recursively, children no one else holds that the monitor does not own.
    fn remove_tree(&mut self, name: &str) {
        let Some(i) = self.nodes.iter().position(|n| n.name == name) else {
            return;
        };
        let node = self.nodes.remove(i);
        // qemu saves persistent bitmaps when the node closes; here, so that an error is
        // logged now (dropping the last reference would save them too, see
        // `sluice_image::node::persist`).
        if let Some(img) = image::image_node(&node.opened) {
            if let Err(e) = img.store_bitmaps() {
                tracing::error!("saving the bitmaps of node '{name}': {e}");
            }
            // A snapshot's overlay (a `sync: none` mirror's target) and the node below it
            // that forwards to it hold each other: let go, so both close when unused.
            img.release_backing_forwards();
        }
        for (_, child) in &node.children {
            let orphan = self.unheld(child);
            if orphan {
                self.remove_tree(child);
            }
        }
    }

    /// `query-named-block-nodes`, newest first.
    /// `flat`: without each node's backing chain (`backing-image`, and a depth of 0, as
    /// QEMU does).
    pub fn query(&self, flat: bool) -> Result<Vec<BlockDeviceInfo>, QmpError> {
        self.iter().map(|n| self.info(n, flat)).collect()
    }

    /// The child qemu shows as a node's `backing-image` (and counts in its backing depth):
    /// its backing, or the child a filter node filters (qemu's `bdrv_filter_or_cow_bs`).
    fn filtered_or_backing(&self, n: &Node) -> Option<&Node> {
        match n.driver {
            BlockdevDriver::Blkdebug => self.child(n, "image"),
            BlockdevDriver::CopyOnRead | BlockdevDriver::Throttle => self.child(n, "file"),
            _ => self.child(n, "backing"),
        }
    }

    fn info(&self, n: &Node, flat: bool) -> Result<BlockDeviceInfo, QmpError> {
        let i = &n.opened.info;
        let backing = self.child(n, "backing");
        let mut depth = 0;
        if !flat {
            let mut b = self.filtered_or_backing(n);
            while let Some(node) = b {
                depth += 1;
                b = self.filtered_or_backing(node);
            }
        }
        Ok(BlockDeviceInfo {
            file: i.filename.clone(),
            node_name: Some(n.name.clone()),
            ro: n.read_only,
            drv: n.driver.as_str().to_string(),
            backing_file: backing.map(|b| b.opened.info.filename.clone()),
            backing_file_depth: depth,
            active: true,
            encrypted: false,
            detect_zeroes: n.detect_zeroes,
            bps: 0,
            bps_rd: 0,
            bps_wr: 0,
            iops: 0,
            iops_rd: 0,
            iops_wr: 0,
            image: self.image_info(n, flat)?,
            cache: n.cache.clone(),
            write_threshold: n.threshold.get() as i64,
            dirty_bitmaps: bitmaps::dirty_info(&n.bitmaps),
        })
    }

    /// A node's `ImageInfo`, with its backing chain's unless `flat`.
    fn image_info(&self, n: &Node, flat: bool) -> Result<ImageInfo, QmpError> {
        let i = &n.opened.info;
        let backing_image = match self.filtered_or_backing(n) {
            Some(b) if !flat => Some(Box::new(self.image_info(b, false)?)),
            _ => None,
        };
        Ok(ImageInfo {
            filename: i.filename.clone(),
            format: i.format.clone(),
            dirty_flag: i.dirty_flag,
            actual_size: i.actual_size,
            virtual_size: n.size()? as i64,
            cluster_size: i.cluster_size,
            encrypted: None,
            backing_filename: i.backing_filename.clone(),
            full_backing_filename: i.full_backing_filename.clone(),
            backing_filename_format: i.backing_filename_format.clone(),
            format_specific: i.format_specific.clone(),
            backing_image,
        })
    }
}

/// The options qemu keeps for a node it opened from an image header (its driver, and a
/// file node's file name): what `blockdev-reopen` compares a child's inline options with.
/// Nodes opened from options get those instead ([`Graph::open_node`]).
fn implicit_options(driver: BlockdevDriver, info: &NodeInfo) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("driver".into(), driver.as_str().into());
    if driver == BlockdevDriver::File {
        m.insert("filename".into(), info.filename.clone().into());
    }
    Value::Object(m)
}

/// What a driver may do while opening a node.
pub struct OpenCtx<'g> {
    graph: &'g mut Graph,
    node: String,
    read_only: bool,
    edges: Vec<(String, String)>,
    /// Nodes opened inline as a backing: listed after the node being opened.
    after: Vec<String>,
    created: &'g mut Vec<String>,
}

impl std::fmt::Debug for OpenCtx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenCtx")
            .field("node", &self.node)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl OpenCtx<'_> {
    /// The name the node being opened will have.
    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// True if the node being opened is read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Opens (inline options) or looks up (a name) the child in role `role`, records the edge,
    /// and returns its name. A writable node needs a writable child, except in role
    /// `backing`, which is only read (inline backing nodes are read-only unless they say
    /// otherwise).
    pub fn child(&mut self, role: &str, r: &BlockdevRef) -> Result<String, QmpError> {
        let backing = role == "backing";
        let name = match r {
            BlockdevRef::Reference(n) => {
                let Some(c) = self.graph.get(n) else {
                    return Err(not_found(n, n));
                };
                if c.read_only && !self.read_only && !backing {
                    // qemu-storage-daemon's words.
                    return Err(QmpError::generic("Block node is read-only"));
                }
                n.clone()
            }
            BlockdevRef::Definition(opts) => {
                let inherit = self.read_only || backing;
                let start = self.graph.nodes.len();
                let n = self
                    .graph
                    .open_node(opts, None, Some(inherit), self.created)?;
                if let Some(c) = self.graph.get_mut(&n) {
                    c.inherits_from = Some(self.node.clone());
                }
                if backing {
                    let new = self.graph.nodes[start..].iter().map(|n| n.name.clone());
                    self.after.extend(new);
                }
                n
            }
        };
        self.edges.push((role.to_string(), name.clone()));
        Ok(name)
    }

    /// Like [`OpenCtx::child`] for `backing`-style references that may be null.
    pub fn child_or_null(
        &mut self,
        role: &str,
        r: &BlockdevRefOrNull,
    ) -> Result<Option<String>, QmpError> {
        match r {
            BlockdevRefOrNull::Null => Ok(None),
            BlockdevRefOrNull::Reference(n) => self
                .child(role, &BlockdevRef::Reference(n.clone()))
                .map(Some),
            BlockdevRefOrNull::Definition(o) => self
                .child(role, &BlockdevRef::Definition(o.clone()))
                .map(Some),
        }
    }

    /// An existing node (for drivers that reach their children by name).
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.graph.get(name)
    }

    /// The nodes using `name` in role `role`: (name, read-only, driver) each.
    pub fn parents_by_role(&self, name: &str, role: &str) -> Vec<(String, bool, BlockdevDriver)> {
        self.graph
            .parents(name, role)
            .map(|p| (p.name.clone(), p.read_only, p.driver))
            .collect()
    }
}

#[cfg(test)]
mod tests;
