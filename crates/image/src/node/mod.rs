//! Nodes: opened files and images, their children, and the I/O every export does on them.
//!
//! A [`Node`] is qemu's block node: a `file` node owns a descriptor, a `raw` or `qcow2` node
//! reads its format from a `file` child, and a qcow2 node may have a read-only `backing`
//! node. Nodes are shared (`Arc`): every NBD connection to an image, and every node that
//! uses another as its backing, holds the same node, so they all see one image through one
//! set of metadata caches.
//!
//! **I/O model.** imago is built in its `sync` mode: every call is a plain blocking function
//! and its locks are parking_lot locks, so a request runs start to finish on the thread that
//! asked (the server's per-connection worker threads, which already form the pool that
//! overlaps requests). The async mode was the alternative: its futures are not `Send` and its
//! file driver blocks inside them anyway, so it would have needed a current-thread runtime
//! per I/O thread and a hand-off per request (two thread switches and a channel) for no gain
//! in overlap. Callers in async code (the QMP daemon) must call node methods from blocking
//! threads (`spawn_blocking`).
//!
//! **Where things are.** This file holds the node itself: its parts, the `View` that a
//! backing switch replaces, and the accessors. The rest is split by concern, each file
//! with the part of the design it decides:
//! - `open.rs`: opening and probing, qemu's lock permissions, backing chains from image
//!   headers, and the checks that refuse a bad image at open.
//! - `gate.rs`: the one gate every request passes, which an active commit uses to track
//!   writes and, at its pivot, to move every request to the base.
//! - `io.rs`: the requests (read, write, zero, trim, flush, cache): the locking inside a
//!   node, durability, and the checks on the request path.
//! - `status.rs`: block status and allocation depth as qemu-nbd reports them, with qemu's
//!   guess of metadata preallocation.
//! - `persist.rs`: a qcow2 node's persistent bitmaps: loaded at open, in use while
//!   writable, saved at close; `raw_bitmaps.rs`: the same for a raw node, in a sidecar file.
//! - `jobs.rs`: what block jobs build on: stream copy-on-read, the backing switch, a
//!   writer into a read-only base, and reloading a node another writer changed.
//! - `reopen.rs`: `blockdev-reopen` in place: a file node's descriptor and lock bytes, a
//!   node's imago object, a qcow2 node's backing in memory.
//! - `plugin.rs`: plugin nodes: any block device of the block layer (an RBD image) as a
//!   node, so that a qcow2 node's backing can be one.
//!
//! **Locks**, each held for one request or one job step, taken in this order: the gate
//! (shared by requests, exclusive for tracking changes and the pivot), then `io` (shared by
//! requests, exclusive for discards, partial-cluster zeroes and job steps, see `io.rs`),
//! then, for a moment, `view` (to clone the current `View`).

use std::fs::File;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use imago::{DynStorage, FormatAccess};
use parking_lot::{Mutex, RwLock};
use sluice_block::{BlockError, Errno, Result};

use crate::bitmaps::Bitmaps;
use crate::blkdebug::Blkdebug;
use crate::header::Qcow2Header;
use crate::lock::ImageLock;
use crate::options::Driver;
use crate::storage::OrderedFile;

mod create;
mod gate;
mod io;
mod jobs;
mod open;
mod persist;
mod plugin;
mod raw_bitmaps;
mod reopen;
mod status;
#[cfg(test)]
mod test_support;

pub use create::{create_file, Prealloc, Qcow2Create};
use gate::Tracking;
pub use gate::{AfterWrite, BeforeWrite};
pub use open::{open_blkdebug_node, open_node, probe_file, Resolve, MAX_CHAIN};
pub use plugin::open_plugin_node;

/// imago's storage object for every node: shared, so a file node and the format node above
/// it use one descriptor.
pub(crate) type Storage = Arc<dyn DynStorage>;
/// imago's view of one node.
pub(crate) type Layer = FormatAccess<Storage>;

/// The descriptor of a `file` node.
struct FileState {
    /// Used for locks, `lseek` (block status) and `posix_fadvise` (both through
    /// [`sluice_block::fileio`]); imago's storage object holds a duplicate of it (same open
    /// file description, so the same locks). A reopen (`reopen.rs`) replaces the open file
    /// description behind both descriptor numbers.
    os: File,
    /// The number of imago's duplicate of `os` (owned by the imago object in `ordered`).
    storage_fd: RawFd,
    ordered: Arc<OrderedFile>,
    storage: Storage,
    lock: Mutex<ImageLock>,
    /// The descriptors are open for writing (changed by a reopen, under the node's
    /// exclusive `io` lock).
    writable: AtomicBool,
}

/// What a qcow2 node remembers of its header.
#[derive(Debug, Clone)]
pub struct Qcow2Info {
    pub header: Qcow2Header,
}

/// The part of a node that a backing switch replaces.
struct View {
    backing: Option<Arc<Node>>,
    qcow2: Option<Qcow2Info>,
    layer: Arc<Layer>,
}

impl View {
    fn new(backing: Option<Arc<Node>>, qcow2: Option<Qcow2Info>, layer: Layer) -> View {
        View {
            backing,
            qcow2,
            layer: Arc::new(layer),
        }
    }
}

/// What a node stands on.
enum Base {
    /// A `file` node: the path it opened and its descriptor.
    Own(PathBuf, FileState),
    /// A format node: its `file` child.
    Child(Arc<Node>),
    /// A blkdebug node: its `image` child, seen through the rules.
    Debug(Arc<Node>, DebugParts),
    /// A plugin node: the name it reports as its file, and its device (see `plugin.rs`).
    Device(PathBuf, plugin::DeviceParts),
}

/// What a blkdebug node adds to its file child (see [`crate::blkdebug`]).
struct DebugParts {
    rules: Arc<Blkdebug>,
    /// The storage of the node's own requests: checks the rules, raises no event.
    own_storage: Storage,
    /// The storage format nodes above read: raises events and checks the rules.
    parent_storage: Storage,
    /// The node's options as qemu shows them in a `json:` filename.
    spec: serde_json::Value,
}

/// One node of the block graph (see the module doc).
pub struct Node {
    name: String,
    driver: Driver,
    /// Changed only by a reopen (`reopen.rs`), under the exclusive `io` lock.
    read_only: AtomicBool,
    /// The image file's path (for a format node, its file child's).
    filename: PathBuf,
    file: Option<Arc<Node>>,
    file_state: Option<FileState>,
    /// Set for blkdebug nodes.
    debug: Option<DebugParts>,
    /// Set for plugin nodes.
    device: Option<plugin::DeviceParts>,
    /// The backing, header and imago instance: replaced together by
    /// [`Node::switch_backing`], under the exclusive `io` lock, so a request that holds
    /// `io` sees one view from start to end.
    view: RwLock<Arc<View>>,
    /// The format was probed and found raw: like qemu, refuse writes that would make block 0
    /// probe as qcow2.
    probed_raw: bool,
    /// A raw node's `bitmap-file` (absolute): where its sidecar is, instead of beside the
    /// image (see `raw_bitmaps.rs`).
    bitmap_file: Option<PathBuf>,
    /// qemu's `metadata_preallocation` guess for this qcow2 node, made at the first block
    /// status (see [`Node::metadata_preallocated`]).
    prealloc_guess: std::sync::OnceLock<bool>,
    /// Shared by every request, exclusive for discards (see `io.rs`).
    io: RwLock<()>,
    /// The gate every request passes: write tracking and the pivot of an active commit
    /// (see `gate.rs`).
    tracking: Tracking,
    /// The node's named dirty bitmaps, made at first use (or shared from the node an active
    /// commit writes into, see [`Node::open_writer`]); the gate marks them.
    bitmaps: std::sync::OnceLock<Arc<Bitmaps>>,
    /// Where the persistent bitmaps are in their life cycle (see `persist.rs`).
    persist: Mutex<persist::Persist>,
    /// A format node's write threshold, checked in the gate on guest offsets (a file
    /// node's is its storage's, which sees the writes of the format node above too).
    threshold: Arc<sluice_block::WriteThreshold>,
    weak_self: Weak<Node>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("driver", &self.driver)
            .field("read_only", &self.is_read_only())
            .field("filename", &self.filename)
            .field("file", &self.file.as_ref().map(|n| n.name()))
            .field("backing", &self.backing().map(|n| n.name().to_string()))
            .finish()
    }
}

impl Node {
    /// A new node, with what every node starts with: no preallocation guess yet, a free
    /// `io` lock, and a gate that nobody tracks or redirects.
    fn new_arc(
        name: String,
        driver: Driver,
        read_only: bool,
        base: Base,
        view: View,
        probed_raw: bool,
        bitmap_file: Option<PathBuf>,
    ) -> Arc<Node> {
        let (filename, file, file_state, debug, device) = match base {
            Base::Own(path, state) => (path, None, Some(state), None, None),
            Base::Child(file) => (file.filename.clone(), Some(file), None, None, None),
            Base::Debug(file, d) => (file.filename.clone(), Some(file), None, Some(d), None),
            Base::Device(name, d) => (name, None, None, None, Some(d)),
        };
        Arc::new_cyclic(|weak_self| Node {
            name,
            driver,
            read_only: AtomicBool::new(read_only),
            filename,
            file,
            file_state,
            debug,
            device,
            view: RwLock::new(Arc::new(view)),
            probed_raw,
            bitmap_file,
            prealloc_guess: std::sync::OnceLock::new(),
            io: RwLock::new(()),
            tracking: Tracking::default(),
            bitmaps: std::sync::OnceLock::new(),
            persist: Mutex::default(),
            threshold: Arc::default(),
            weak_self: weak_self.clone(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn driver(&self) -> Driver {
        self.driver
    }
    pub fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }
    /// The image file (for format nodes, their file child's; for plugin nodes, the name
    /// they were opened with).
    pub fn filename(&self) -> &Path {
        &self.filename
    }
    /// The `file` child (raw and qcow2 nodes).
    pub fn file_child(&self) -> Option<&Arc<Node>> {
        self.file.as_ref()
    }
    /// The `backing` child (qcow2 nodes with a backing); it changes at a backing switch.
    pub fn backing(&self) -> Option<Arc<Node>> {
        self.view().backing.clone()
    }
    /// Children by role (`file`, `backing`), as qemu's `query-named-block-nodes` lists them.
    pub fn children(&self) -> Vec<(&'static str, Arc<Node>)> {
        let mut v = Vec::new();
        if let Some(f) = &self.file {
            v.push(("file", f.clone()));
        }
        if let Some(b) = self.backing() {
            v.push(("backing", b));
        }
        v
    }
    /// The parsed qcow2 header (qcow2 nodes).
    pub fn qcow2(&self) -> Option<Qcow2Info> {
        self.view().qcow2.clone()
    }
    /// The virtual disk size.
    pub fn size(&self) -> u64 {
        self.view().layer.size()
    }
    /// This node as a shared pointer (it always lives in one).
    pub fn arc(&self) -> Arc<Node> {
        self.weak_self.upgrade().expect("nodes live in an Arc")
    }
    /// The qcow2 cluster size, or 4096 for raw data.
    pub fn cluster_size(&self) -> u64 {
        self.view()
            .qcow2
            .as_ref()
            .map_or(4096, |q| q.header.cluster_size())
    }

    /// The node's named dirty bitmaps (see [`crate::bitmaps`]).
    pub fn bitmaps(&self) -> &Arc<Bitmaps> {
        self.bitmaps.get_or_init(Arc::default)
    }

    /// The node's write threshold (`block-set-write-threshold`): a file node's is checked
    /// by its storage on every write of the file, a format node's in its gate.
    pub fn write_threshold(&self) -> &Arc<sluice_block::WriteThreshold> {
        match &self.file_state {
            Some(fs) => fs.ordered.write_threshold(),
            None => &self.threshold,
        }
    }

    /// The current view (see [`View`]); stable while the caller holds `io`.
    fn view(&self) -> Arc<View> {
        self.view.read().clone()
    }

    /// The descriptor of the image file. Plugin nodes have none: callers reach this only
    /// for file, raw, blkdebug and qcow2 nodes.
    fn file_state(&self) -> &FileState {
        self.file_state_if_any()
            .expect("every node but a plugin node has a file node at its bottom")
    }

    fn file_state_if_any(&self) -> Option<&FileState> {
        match (&self.file_state, &self.file) {
            (Some(fs), _) => Some(fs),
            (None, Some(f)) => f.file_state_if_any(),
            (None, None) => None,
        }
    }

    /// The storage a node above reads this node's file through (the image file's, or for a
    /// blkdebug node, the file's seen through its rules).
    fn storage(&self) -> &Storage {
        match (&self.debug, &self.file_state, &self.file, &self.device) {
            (Some(d), ..) => &d.parent_storage,
            (None, Some(fs), ..) => &fs.storage,
            (None, None, Some(f), _) => f.storage(),
            (None, None, None, Some(d)) => &d.dyn_storage,
            (None, None, None, None) => unreachable!("every node has a file or a device"),
        }
    }

    /// The storage this node's own imago object reads (see [`crate::blkdebug`]).
    fn layer_storage(&self) -> &Storage {
        match &self.debug {
            Some(d) => &d.own_storage,
            None => self.storage(),
        }
    }

    /// A blkdebug node's rules.
    pub fn blkdebug(&self) -> Option<&Arc<Blkdebug>> {
        self.debug.as_ref().map(|d| &d.rules)
    }

    /// A blkdebug node's options, as qemu shows them in a `json:` filename.
    pub fn blkdebug_spec(&self) -> Option<&serde_json::Value> {
        self.debug.as_ref().map(|d| &d.spec)
    }

    fn check_writable(&self, what: &str) -> Result<()> {
        let file_read_only = self
            .file_state_if_any()
            .is_some_and(|fs| !fs.writable.load(Ordering::Acquire));
        if self.is_read_only() || file_read_only {
            return Err(BlockError::new(
                Errno::EROFS,
                format!("{what}: node '{}' is read-only", self.name),
            ));
        }
        Ok(())
    }
}
