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
//! **Concurrency inside a node.** Reads, writes and zero-writes run in parallel (imago locks
//! its L2 tables, allocator and refcount blocks itself, and orders its metadata writeback so
//! that refcounts reach the file before the L2 entries that use them). Discards invalidate
//! mappings that a concurrent request could hold, which imago only allows with exclusive
//! access, so each node has an `io` read-write lock: every request holds it shared; TRIM,
//! WRITE_ZEROES with unmap, and a zero request with partial clusters (whose rest is checked
//! for zeroes and then zeroed whole, as qemu does) hold it exclusively. No sluice lock is held across anything but
//! the request's own I/O.
//!
//! **Durability.** Flush writes imago's dirty L2 and refcount blocks (in dependency order),
//! then the L1 entries held back until then (see [`crate::storage`]: a crash never leaves an
//! L1 entry pointing at an unreferenced table, only leaked clusters), and then `fdatasync`s
//! the image file; FUA is a write followed by that flush, so data and
//! metadata are durable before the reply. Because one node (and one cache) serves every
//! connection, a flush on any connection covers writes completed on all of them, which is
//! what NBD multi-conn requires.
//!
//! **Bad images.** The header and the L1 table are checked at open (see [`crate::header`]);
//! on the request path a data cluster that starts past the end of the file, or a write that
//! would land in the header cluster, fails with EIO instead of reading zeroes or growing the
//! file into space the allocator considers free. imago's own consistency errors surface as
//! EIO. Nothing panics on image content.
//!
//! **Streaming and backing switches** ([`Node::stream_range`], [`Node::switch_backing`]).
//! The copy-on-read of a stream checks the allocation depth and copies under the exclusive
//! `io` lock, so a client write can never be overwritten by older backing data. A backing
//! switch also takes `io` exclusively: imago keeps its own copy of the header, so the node
//! flushes, writes the first cluster encoded by [`crate::header::Qcow2Header::encode`] in
//! one `pwrite` + `fdatasync`, reopens imago over the same file node with the new chain and
//! swaps that view (backing, header, imago instance) in. Requests take the view after
//! their `io` guard, so each sees one chain from start to end.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{
    DynStorage, FormatAccess, Mapping, ShallowMapping, Storage as _, StorageExt, StorageOpenOptions,
};
use parking_lot::{Mutex, RwLock};
use sluice_block::extents::{Extents, EXTENT_HOLE, EXTENT_ZERO};
use sluice_block::{BlockError, Errno, Result};

use crate::dirty::DirtyMap;
use crate::error::{io_error, ImageError};
use crate::header::{self, Format, HeaderError, Qcow2Header};
use crate::lock::{ImageLock, Locking, Perms};
use crate::options::{BackingRef, BlockdevOptions, ChildRef, Driver};
use crate::storage::OrderedFile;

/// imago's storage object for every node: shared, so a file node and the format node above
/// it use one descriptor.
pub(crate) type Storage = Arc<dyn DynStorage>;
/// imago's view of one node.
pub(crate) type Layer = FormatAccess<Storage>;

/// How long a chain of backing files sluice follows from image headers.
pub const MAX_CHAIN: usize = 64;

/// Finds an existing node by name (the daemon's node table); None if there is none.
pub type Resolve<'a> = &'a dyn Fn(&str) -> Option<Arc<Node>>;

/// The descriptor of a `file` node.
struct FileState {
    /// Used for locks, `lseek` (block status) and `posix_fadvise`; imago's storage object
    /// holds a duplicate of it (same open file description, so the same locks).
    os: File,
    ordered: Arc<OrderedFile>,
    storage: Storage,
    lock: Mutex<ImageLock>,
    writable: bool,
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
    fn new(
        backing: Option<Arc<Node>>,
        qcow2: Option<Qcow2Info>,
        layer: Layer,
    ) -> RwLock<Arc<View>> {
        RwLock::new(Arc::new(View {
            backing,
            qcow2,
            layer: Arc::new(layer),
        }))
    }
}

/// One node of the block graph (see the module doc).
pub struct Node {
    name: String,
    driver: Driver,
    read_only: bool,
    /// The image file's path (for a format node, its file child's).
    filename: PathBuf,
    file: Option<Arc<Node>>,
    file_state: Option<FileState>,
    /// The backing, header and imago instance: replaced together by
    /// [`Node::switch_backing`], under the exclusive `io` lock, so a request that holds
    /// `io` sees one view from start to end.
    view: RwLock<Arc<View>>,
    /// The format was probed and found raw: like qemu, refuse writes that would make block 0
    /// probe as qcow2.
    probed_raw: bool,
    /// qemu's `metadata_preallocation` guess for this qcow2 node, made at the first block
    /// status (see [`Node::metadata_preallocated`]).
    prealloc_guess: std::sync::OnceLock<bool>,
    /// Shared by every request, exclusive for discards (see the module doc).
    io: RwLock<()>,
    /// Write tracking and the pivot of an active commit (see [`Node::track_writes`]).
    tracking: RwLock<Tracking>,
    weak_self: Weak<Node>,
}

/// What an active commit installs on its node: every public I/O method holds this shared
/// for its whole run (marking what it changed before it lets go), and [`Node::pivot`] holds
/// it exclusively, so the pivot sees every completed write and no request straddles it.
#[derive(Debug, Default)]
struct Tracking {
    /// Ranges written since tracking began.
    dirty: Option<Arc<DirtyMap>>,
    /// Set by the pivot: this node's requests go to that node from now on.
    redirect: Option<Arc<Node>>,
}

/// The shared hold of a node's [`Tracking`] during one request.
struct Gate<'a>(parking_lot::RwLockReadGuard<'a, Tracking>);

impl Gate<'_> {
    /// Records that `[offset, offset+len)` changed (if someone is tracking).
    fn mark(&self, offset: u64, len: u64) {
        if let Some(d) = &self.0.dirty {
            d.mark(offset, len);
        }
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("driver", &self.driver)
            .field("read_only", &self.read_only)
            .field("filename", &self.filename)
            .field("file", &self.file.as_ref().map(|n| n.name()))
            .field("backing", &self.backing().map(|n| n.name().to_string()))
            .finish()
    }
}

fn generated_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("#block{:03}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Opens a node and, recursively, the children its options give inline; children given by
/// name are looked up with `resolve`. See the crate doc for the rules.
pub fn open_node(opts: &BlockdevOptions, resolve: Resolve<'_>) -> Result<Arc<Node>, ImageError> {
    open_with_chain(opts, resolve, &mut Vec::new(), false)
}

/// An image already on the way down a chain: (device, inode, path).
type Chain = Vec<(u64, u64, PathBuf)>;

fn open_with_chain(
    opts: &BlockdevOptions,
    resolve: Resolve<'_>,
    chain: &mut Chain,
    probed: bool,
) -> Result<Arc<Node>, ImageError> {
    let name = opts.node_name.clone().unwrap_or_else(generated_name);
    match opts.driver {
        Driver::File => {
            let path = opts.filename.as_deref().ok_or_else(|| {
                ImageError::InvalidOption("Parameter 'filename' is missing".into())
            })?;
            open_file_node(name, path, opts.read_only, opts.locking)
        }
        Driver::Raw | Driver::Qcow2 => {
            let file = match &opts.file {
                Some(ChildRef::Node(n)) => {
                    resolve(n).ok_or_else(|| ImageError::NodeNotFound(n.clone()))?
                }
                Some(ChildRef::Options(o)) => open_with_chain(o, resolve, chain, false)?,
                None => {
                    return Err(ImageError::InvalidOption(
                        "A block device must be specified for \"file\"".into(),
                    ))
                }
            };
            if file.driver != Driver::File {
                return Err(ImageError::Permission(format!(
                    "node '{}': the file child of a {} node must be a 'file' node, not '{}'",
                    file.name,
                    opts.driver.as_str(),
                    file.driver.as_str()
                )));
            }
            if !opts.read_only && file.read_only {
                return Err(ImageError::Permission(format!(
                    "node '{name}' cannot be writable: its file node '{}' is read-only",
                    file.name
                )));
            }
            if opts.driver == Driver::Raw {
                open_raw_node(name, file, opts.read_only, probed)
            } else {
                open_qcow2_node(name, file, opts.read_only, &opts.backing, resolve, chain)
            }
        }
    }
}

fn open_file_node(
    name: String,
    path: &Path,
    read_only: bool,
    locking: Locking,
) -> Result<Arc<Node>, ImageError> {
    // Checked first: opening a fifo would block.
    let meta = std::fs::metadata(path).map_err(|e| ImageError::open(path, e))?;
    if !(meta.is_file() || meta.file_type().is_block_device()) {
        return Err(ImageError::open(
            path,
            std::io::Error::other("not a regular file or block device"),
        ));
    }
    let os = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_NOCTTY)
        .open(path)
        .map_err(|e| ImageError::open(path, e))?;
    let mut lock = ImageLock::new(path, locking);
    // A file node alone is used like a raw image; a qcow2 node on top adds its own needs.
    lock.add(&os, raw_perms(read_only).0, raw_perms(read_only).1)?;
    let dup = os.try_clone().map_err(|e| ImageError::open(path, e))?;
    let st_opts = StorageOpenOptions::new().write(!read_only).filename(path);
    let ordered = Arc::new(OrderedFile::new(
        imago::file::File::from_open_file(dup, st_opts).map_err(|e| ImageError::open(path, e))?,
    ));
    let storage: Storage = ordered.clone();
    let raw =
        Raw::open_image(storage.clone(), !read_only).map_err(|e| ImageError::open(path, e))?;
    Ok(Arc::new_cyclic(|weak_self| Node {
        name,
        driver: Driver::File,
        read_only,
        filename: path.to_owned(),
        file: None,
        file_state: Some(FileState {
            os,
            ordered,
            storage,
            lock: Mutex::new(lock),
            writable: !read_only,
        }),
        view: View::new(None, None, FormatAccess::new(raw)),
        probed_raw: false,
        prealloc_guess: std::sync::OnceLock::new(),
        io: RwLock::new(()),
        tracking: RwLock::new(Tracking::default()),
        weak_self: weak_self.clone(),
    }))
}

/// (used, unshared) permissions of a raw user (see `lock.rs` for why).
fn raw_perms(read_only: bool) -> (Perms, Perms) {
    if read_only {
        (Perms::CONSISTENT_READ, Perms::NONE)
    } else {
        (
            Perms::CONSISTENT_READ | Perms::WRITE,
            Perms::WRITE | Perms::RESIZE,
        )
    }
}

/// (used, unshared) permissions of a qcow2 user.
fn qcow2_perms(read_only: bool) -> (Perms, Perms) {
    let used = if read_only {
        Perms::CONSISTENT_READ
    } else {
        Perms::CONSISTENT_READ | Perms::WRITE | Perms::RESIZE
    };
    (used, Perms::WRITE | Perms::RESIZE)
}

fn open_raw_node(
    name: String,
    file: Arc<Node>,
    read_only: bool,
    probed: bool,
) -> Result<Arc<Node>, ImageError> {
    let fs = file.file_state();
    let raw = Raw::open_image(fs.storage.clone(), !read_only)
        .map_err(|e| ImageError::open(&file.filename, e))?;
    let filename = file.filename.clone();
    Ok(Arc::new_cyclic(|weak_self| Node {
        name,
        driver: Driver::Raw,
        read_only,
        filename,
        file: Some(file),
        file_state: None,
        view: View::new(None, None, FormatAccess::new(raw)),
        probed_raw: probed,
        prealloc_guess: std::sync::OnceLock::new(),
        io: RwLock::new(()),
        tracking: RwLock::new(Tracking::default()),
        weak_self: weak_self.clone(),
    }))
}

/// Reads and checks a qcow2 header from a file node.
fn read_header(file: &Node) -> Result<Qcow2Header, ImageError> {
    let fs = file.file_state();
    let path = &file.filename;
    let file_len = fs.storage.size().map_err(|e| ImageError::open(path, e))?;
    let mut want = 4096usize;
    loop {
        let len = want.min(file_len as usize);
        let mut buf = vec![0u8; len];
        fs.storage
            .read(&mut buf[..], 0)
            .map_err(|e| ImageError::open(path, e))?;
        match Qcow2Header::parse(&buf) {
            Ok(h) => return Ok(h),
            Err(HeaderError::Incomplete { needed })
                if needed > len && (len as u64) < file_len && needed <= 1 << 21 =>
            {
                want = needed;
            }
            Err(HeaderError::Incomplete { needed }) => {
                return Err(ImageError::bad_image(
                    path,
                    HeaderError::Corrupt(format!(
                        "the file is truncated: its header needs {needed} bytes, the file has {file_len}"
                    )),
                ))
            }
            Err(e) => return Err(ImageError::bad_image(path, e)),
        }
    }
}

/// Checks the L1 table: every L2 table aligned, inside the file and clear of the header,
/// L1 and refcount tables, so that a truncated or corrupt image fails at open instead of
/// reading zeroes from (or allocating over) a table that is not there.
fn check_l1(file: &Node, h: &Qcow2Header) -> Result<(), ImageError> {
    let fs = file.file_state();
    let path = &file.filename;
    let file_len = fs.storage.size().map_err(|e| ImageError::open(path, e))?;
    h.check_layout(file_len)
        .map_err(|e| ImageError::bad_image(path, e))?;
    let mut l1 = vec![0u8; h.l1_size as usize * 8];
    fs.storage
        .read(&mut l1[..], h.l1_table_offset)
        .map_err(|e| ImageError::open(path, e))?;
    let cs = h.cluster_size();
    let l1_range = h.l1_table_offset..h.l1_table_offset + l1.len() as u64;
    let rt_range = h.refcount_table_offset
        ..h.refcount_table_offset + u64::from(h.refcount_table_clusters) * cs;
    for (i, e) in l1.chunks_exact(8).enumerate() {
        let entry = u64::from_be_bytes(e.try_into().expect("8 bytes"));
        let l2 = entry & 0x00ff_ffff_ffff_fe00;
        if l2 == 0 {
            continue;
        }
        let bad = |why: &str| {
            ImageError::bad_image(
                path,
                HeaderError::Corrupt(format!(
                    "L1 entry {i} points to an L2 table at {l2:#x} {why}"
                )),
            )
        };
        if l2 % cs != 0 {
            return Err(bad("that is not cluster-aligned"));
        }
        if l2.checked_add(cs).is_none_or(|end| end > file_len) {
            return Err(bad(&format!("past the end of the file ({file_len} bytes)")));
        }
        let overlaps = |r: &std::ops::Range<u64>| l2 < r.end && r.start < l2 + cs;
        if l2 < cs || overlaps(&l1_range) || overlaps(&rt_range) {
            return Err(bad("that overlaps the header, L1 or refcount table"));
        }
    }
    Ok(())
}

fn open_qcow2_node(
    name: String,
    file: Arc<Node>,
    read_only: bool,
    backing: &BackingRef,
    resolve: Resolve<'_>,
    chain: &mut Chain,
) -> Result<Arc<Node>, ImageError> {
    let path = file.filename.clone();
    let header = read_header(&file)?;
    header
        .check_supported()
        .map_err(|e| ImageError::bad_image(&path, e))?;
    check_l1(&file, &header)?;
    if !read_only && header.nb_snapshots > 0 {
        return Err(ImageError::bad_image(
            &path,
            HeaderError::Unsupported(format!(
                "the image has {} internal snapshots; sluice serves such images read-only \
                 (readonly=true)",
                header.nb_snapshots
            )),
        ));
    }
    {
        let fs = file.file_state();
        let (used, unshared) = qcow2_perms(read_only);
        fs.lock.lock().add(&fs.os, used, unshared)?;
    }

    let backing = match backing {
        BackingRef::None => None,
        BackingRef::Deny => match &header.backing_file {
            Some(b) => {
                return Err(ImageError::BackingNotAllowed {
                    path,
                    backing: b.clone(),
                })
            }
            None => None,
        },
        BackingRef::Child(ChildRef::Node(n)) => {
            Some(resolve(n).ok_or_else(|| ImageError::NodeNotFound(n.clone()))?)
        }
        BackingRef::Child(ChildRef::Options(o)) => Some(open_with_chain(o, resolve, chain, false)?),
        BackingRef::FromHeader => match &header.backing_file {
            None => None,
            Some(b) => Some(open_backing_from_header(&file, &header, b, chain)?),
        },
    };
    if let Some(b) = &backing {
        if !b.read_only {
            return Err(ImageError::Permission(format!(
                "node '{}' cannot be the backing of '{name}': backing nodes must be read-only",
                b.name
            )));
        }
    }

    let fs = file.file_state();
    if !read_only {
        // See storage.rs: L1 entries reach the file only after the refcounts they rely on.
        let l1 = header.l1_table_offset..header.l1_table_offset + u64::from(header.l1_size) * 8;
        fs.ordered.defer_l1_writes(l1);
    }
    let mut q = Qcow2::<Storage, Arc<Layer>>::open_image(fs.storage.clone(), !read_only)
        .map_err(|e| ImageError::open(&path, e))?;
    q.set_data_file(None);
    q.set_backing(backing.as_ref().map(|b| b.view().layer.clone()));
    Ok(Arc::new_cyclic(|weak_self| Node {
        name,
        driver: Driver::Qcow2,
        read_only,
        filename: path,
        file: Some(file),
        file_state: None,
        view: View::new(backing, Some(Qcow2Info { header }), FormatAccess::new(q)),
        probed_raw: false,
        prealloc_guess: std::sync::OnceLock::new(),
        io: RwLock::new(()),
        tracking: RwLock::new(Tracking::default()),
        weak_self: weak_self.clone(),
    }))
}

/// Opens the backing file `name` of the image in `file` as its header says (read-only; the
/// format from the header, else probed), following its own header in turn.
fn open_backing_from_header(
    file: &Node,
    header: &Qcow2Header,
    name: &str,
    chain: &mut Chain,
) -> Result<Arc<Node>, ImageError> {
    let top = file.filename.clone();
    if chain.is_empty() {
        push_chain(chain, &top)?;
    }
    let backing_path = match Path::new(name) {
        p if p.is_absolute() => p.to_owned(),
        p => top.parent().unwrap_or(Path::new(".")).join(p),
    };
    let wrap = |e: ImageError| ImageError::Backing {
        image: top.clone(),
        backing: backing_path.clone(),
        source: Box::new(e),
    };
    push_chain(chain, &backing_path).map_err(|e| match e {
        loop_err @ ImageError::BackingLoop { .. } => loop_err,
        e => wrap(e),
    })?;
    let locking = file.file_state().lock.lock().locking();
    let (format, probed) = match header.backing_format() {
        Some(f) => (
            Format::from_name(f).ok_or_else(|| {
                wrap(ImageError::InvalidOption(format!(
                    "unknown backing format '{f}' (sluice opens raw and qcow2)"
                )))
            })?,
            false,
        ),
        None => (probe_file(&backing_path).map_err(wrap)?, true),
    };
    if probed {
        tracing::warn!(
            "{}: the header of {} does not name the format of its backing file; probed {format}. \
             Probing is unsafe for untrusted images: set it with `qemu-img rebase -u -F {format}`",
            backing_path.display(),
            top.display()
        );
    }
    let opts = BlockdevOptions {
        driver: match format {
            Format::Raw => Driver::Raw,
            Format::Qcow2 => Driver::Qcow2,
        },
        node_name: None,
        read_only: true,
        filename: None,
        locking,
        file: Some(ChildRef::Options(Box::new(BlockdevOptions {
            locking,
            ..BlockdevOptions::file(&backing_path, true)
        }))),
        backing: BackingRef::FromHeader,
    };
    let no_nodes = |_: &str| None;
    let r = open_with_chain(&opts, &no_nodes, chain, probed && format == Format::Raw);
    r.map_err(|e| match e {
        e @ (ImageError::BackingLoop { .. } | ImageError::Backing { .. }) => e,
        e => wrap(e),
    })
}

/// Adds `path` to the chain being opened, refusing a loop or a chain too long.
fn push_chain(chain: &mut Chain, path: &Path) -> Result<(), ImageError> {
    let meta = std::fs::metadata(path).map_err(|e| ImageError::open(path, e))?;
    let key = (meta.dev(), meta.ino());
    if chain.iter().any(|(d, i, _)| (*d, *i) == key) {
        let mut names: Vec<String> = chain
            .iter()
            .map(|(_, _, p)| p.display().to_string())
            .collect();
        names.push(path.display().to_string());
        return Err(ImageError::BackingLoop {
            chain: names.join(" -> "),
        });
    }
    if chain.len() >= MAX_CHAIN {
        return Err(ImageError::ChainTooLong {
            path: path.to_owned(),
            max: MAX_CHAIN,
        });
    }
    chain.push((key.0, key.1, path.to_owned()));
    Ok(())
}

/// Reads the start of `path` and guesses its format as qemu does.
pub fn probe_file(path: &Path) -> Result<Format, ImageError> {
    use std::io::Read;
    let mut f = File::open(path).map_err(|e| ImageError::open(path, e))?;
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ImageError::open(path, e)),
        }
    }
    Ok(header::probe(&buf[..got]))
}

/// One stretch of the image as the chain resolves it (block status, depth, cache).
#[derive(Debug, Clone)]
pub(crate) struct Segment {
    pub len: u64,
    /// 0: unallocated in every layer; 1: the node itself; 2: its backing; ... (the range past
    /// the end of a shorter backing counts as allocated in it, as in qemu).
    pub depth: u32,
    pub kind: SegmentKind,
}

#[derive(Debug, Clone)]
pub(crate) enum SegmentKind {
    /// Stored in a data cluster of the qcow2 node `layer`, at `host` in its file: data (or,
    /// when qemu would guess the image metadata-preallocated, what the file says).
    Cluster { host: u64, layer: Arc<Node> },
    /// Stored 1:1 in the file of a raw (or file) layer at `host`; the file's holes tell data
    /// from zeroes. `layer` is the node whose file holds it.
    RawFile { host: u64, layer: Arc<Node> },
    /// Reads as zeroes (zero clusters, unallocated to the bottom, past a shorter backing).
    Zero,
    /// A compressed cluster: data.
    Compressed,
}

impl Node {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn driver(&self) -> Driver {
        self.driver
    }
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }
    /// The image file (for format nodes, their file child's).
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

    /// The current view (see [`View`]); stable while the caller holds `io`.
    fn view(&self) -> Arc<View> {
        self.view.read().clone()
    }

    fn file_state(&self) -> &FileState {
        match (&self.file_state, &self.file) {
            (Some(fs), _) => fs,
            (None, Some(f)) => f.file_state(),
            (None, None) => unreachable!("every node has a file node at its bottom"),
        }
    }

    fn check_writable(&self, what: &str) -> Result<()> {
        if self.read_only || !self.file_state().writable {
            return Err(BlockError::new(
                Errno::EROFS,
                format!("{what}: node '{}' is read-only", self.name),
            ));
        }
        Ok(())
    }

    /// The node of this chain whose file is `storage` (self if none matches).
    fn owner_of(&self, storage: &Storage) -> Arc<Node> {
        if Arc::ptr_eq(&self.file_state().storage, storage) {
            return self.arc();
        }
        let mut next = self.backing();
        while let Some(node) = next {
            if Arc::ptr_eq(&node.file_state().storage, storage) {
                return node;
            }
            next = node.backing();
        }
        self.arc()
    }

    /// A qcow2 data cluster must begin inside the file and never in the header cluster.
    /// `len`: the bytes used from `host` on (a run of clusters): every cluster of the run
    /// is checked, so a run that starts inside the file and runs past its end fails too.
    fn check_host(
        &self,
        storage: &Storage,
        host: u64,
        len: u64,
        existing: bool,
        what: &str,
    ) -> Result<()> {
        let owner = self.owner_of(storage);
        if owner.driver != Driver::Qcow2 {
            return Ok(());
        }
        let eio = |why: String| {
            BlockError::new(
                Errno::EIO,
                format!("{what}: {}: corrupt image: {why}", owner.filename.display()),
            )
        };
        if host < owner.cluster_size() {
            return Err(eio(format!(
                "data mapped into the header cluster (offset {host:#x})"
            )));
        }
        if existing {
            let cs = owner.cluster_size();
            let last = (host + len.max(1) - 1) / cs * cs;
            let mut size = storage.size().map_err(|e| io_error(what, e))?;
            if last >= size && owner.read_only {
                // imago remembers the size from open; a read-only node's image may have
                // grown since (a writer of the daemon's own, see `open_writer`, or the file
                // was restored).
                size = owner.file_state().os.metadata().map_or(size, |m| m.len());
            }
            if last >= size {
                return Err(eio(format!(
                    "data cluster at {last:#x} lies past the end of the file ({size} bytes)"
                )));
            }
        }
        Ok(())
    }

    /// Holds this node's [`Tracking`] shared for one request; Err(node) if the node was
    /// pivoted away (an active commit completed): the request goes to that node.
    fn gate(&self) -> std::result::Result<Gate<'_>, Arc<Node>> {
        let t = self.tracking.read();
        match &t.redirect {
            Some(n) => Err(n.clone()),
            None => Ok(Gate(t)),
        }
    }

    /// The node that serves this node's requests now: itself, or the one an active commit
    /// pivoted it to.
    pub fn active(&self) -> Arc<Node> {
        match &self.tracking.read_recursive().redirect {
            Some(n) => n.active(),
            None => self.arc(),
        }
    }

    /// Reads `buf.len()` bytes at `offset` through the chain.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let _t = match self.gate() {
            Ok(t) => t,
            Err(n) => return n.read(buf, offset),
        };
        self.read_ungated(buf, offset)
    }

    fn read_ungated(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let _g = self.io.read();
        self.read_locked(buf, offset)
    }

    /// [`Node::read`] for a caller that holds the `io` lock.
    fn read_locked(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let v = self.view();
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let want = (buf.len() - done) as u64;
            let (mapping, len) = v
                .layer
                .get_mapping(at, want)
                .map_err(|e| io_error(format_args!("read at {at}"), e))?;
            let len = len.min(want) as usize;
            let chunk = &mut buf[done..done + len];
            match mapping {
                Mapping::Raw {
                    storage, offset, ..
                } => {
                    self.check_host(storage, offset, len as u64, true, "read")?;
                    storage
                        .readv(IoVectorMut::from(chunk), offset)
                        .map_err(|e| io_error(format_args!("read at {at}"), e))?;
                }
                Mapping::Zero { .. } => chunk.fill(0),
                Mapping::Eof { .. } => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Mapping::Special { layer, offset, .. } => layer
                    .readv(IoVectorMut::from(chunk), offset)
                    .map_err(|e| io_error(format_args!("read (compressed) at {at}"), e))?,
                _ => {
                    return Err(BlockError::new(
                        Errno::EIO,
                        format!("read at {at}: unknown mapping"),
                    ))
                }
            }
            done += len;
        }
        Ok(())
    }

    /// Writes `buf` at `offset`, allocating (with copy-on-write from the backing for partial
    /// clusters) as needed.
    pub fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        let t = match self.gate() {
            Ok(t) => t,
            Err(n) => return n.write(buf, offset),
        };
        let r = self.write_ungated(buf, offset);
        t.mark(offset, buf.len() as u64);
        r
    }

    fn write_ungated(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable("write")?;
        if self.probed_raw && offset < 8 {
            self.check_block0(buf, offset)?;
        }
        let _g = self.io.read();
        self.write_locked(buf, offset)
    }

    /// [`Node::write`] for a caller that holds the `io` lock (and has checked the write).
    fn write_locked(&self, buf: &[u8], offset: u64) -> Result<()> {
        let v = self.view();
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let rest = &buf[done..];
            let mapping = v
                .layer
                .prepare_data_mapping(at, rest.len() as u64, true)
                .map_err(|e| io_error(format_args!("write at {at}"), e))?;
            let storage = mapping.storage();
            let host = mapping.offset();
            let len = (mapping.length() as usize).min(rest.len());
            self.check_host(storage, host, len as u64, mapping.is_nonblocking(), "write")?;
            storage
                .writev(IoVector::from(&rest[..len]), host)
                .map_err(|e| io_error(format_args!("write at {at}"), e))?;
            v.layer
                .commit_data_mapping(mapping)
                .map_err(|e| io_error(format_args!("write at {at}"), e))?;
            done += len;
        }
        Ok(())
    }

    /// qemu's protection of probed raw images: block 0 must not start to look like qcow2.
    fn check_block0(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut first = [0u8; 8];
        self.read_ungated(&mut first, 0)?;
        let start = offset as usize;
        let n = buf.len().min(8 - start);
        first[start..start + n].copy_from_slice(&buf[..n]);
        if header::probe(&first) != Format::Raw {
            return Err(BlockError::new(
                Errno::EPERM,
                format!(
                    "write at {offset}: refusing to write a qcow2 header into {}, whose format \
                     was probed as raw (give format=raw to allow it)",
                    self.filename.display()
                ),
            ));
        }
        Ok(())
    }

    /// Makes `[offset, offset+count)` read as zeroes. `may_unmap`: clusters may be
    /// deallocated (NBD without NO_HOLE); `fast`: fail with ENOTSUP rather than write data.
    pub fn zero(&self, count: u64, offset: u64, may_unmap: bool, fast: bool) -> Result<()> {
        let t = match self.gate() {
            Ok(t) => t,
            Err(n) => return n.zero(count, offset, may_unmap, fast),
        };
        let r = self.zero_ungated(count, offset, may_unmap, fast);
        t.mark(offset, count);
        r
    }

    fn zero_ungated(&self, count: u64, offset: u64, may_unmap: bool, fast: bool) -> Result<()> {
        self.check_writable("zero")?;
        let ctx = || format!("zero at {offset} (+{count})");
        match self.driver {
            Driver::Qcow2 => self.zero_qcow2(count, offset, may_unmap, fast),
            Driver::Raw | Driver::File => {
                let _g = self.io.read();
                let st = &self.file_state().storage;
                let r = if may_unmap {
                    st.write_zeroes(offset, count)
                } else {
                    st.write_allocated_zeroes(offset, count)
                };
                r.map_err(|e| io_error(ctx(), e))
            }
        }
    }

    /// Zero for qcow2, following qemu: v3 marks zero clusters (unmapping them if allowed);
    /// v2 without a backing file unmaps whole clusters, since they then read as zeroes, and
    /// v2 with one cannot do better than zero data (ENOTSUP: the server writes it). A
    /// partial cluster whose rest already reads as zeroes is zeroed whole.
    fn zero_qcow2(&self, count: u64, offset: u64, may_unmap: bool, fast: bool) -> Result<()> {
        let ctx = || format!("zero at {offset} (+{count})");
        let view = self.view();
        let h = &view.qcow2.as_ref().expect("qcow2 node").header;
        let v2 = h.version < 3;
        if v2 && view.backing.is_some() {
            return Err(BlockError::new(
                Errno::ENOTSUP,
                format!("{}: a qcow2 v2 image cannot mark zero clusters", ctx()),
            ));
        }
        let cs = h.cluster_size();
        let size = self.size();
        let end = offset + count;
        let head = offset % cs;
        let tail = if end.is_multiple_of(cs) || end == size {
            0
        } else {
            end.next_multiple_of(cs).min(size) - end
        };
        if !v2 && head == 0 && tail == 0 {
            return if may_unmap {
                let _g = self.io.write();
                // SAFETY: the exclusive `io` lock keeps every other request of this node
                // (and so every mapping) out, as imago requires; backing nodes are
                // read-only and never discarded.
                unsafe { self.view().layer.discard_to_zero_unsafe(offset, count) }
                    .map_err(|e| io_error(ctx(), e))
            } else {
                let _g = self.io.read();
                self.view()
                    .layer
                    .write_zeroes(offset, count)
                    .map_err(|e| io_error(ctx(), e))
            };
        }
        // Partial clusters (or v2): checked and done under the exclusive lock, so that no
        // write lands in the rest of a cluster between the check and the zeroing.
        let g = self.io.write();
        let start = if head != 0 && self.reads_zero(offset - head, head)? {
            offset - head
        } else {
            offset
        };
        let end = if tail != 0 && self.reads_zero(end, tail)? {
            end + tail
        } else {
            end
        };
        // The whole clusters of [start, end); the rest needs zero data.
        let a = start.next_multiple_of(cs);
        let b = if end == size { end } else { end / cs * cs };
        let (a, b) = if a < b { (a, b) } else { (start, start) };
        if fast && (a != start || b != end) {
            return Err(BlockError::new(
                Errno::ENOTSUP,
                format!("{}: partial clusters, zeroing would write data", ctx()),
            ));
        }
        if !v2 {
            let r = if may_unmap {
                // SAFETY: as above, under the exclusive `io` lock.
                unsafe { self.view().layer.discard_to_zero_unsafe(start, end - start) }
            } else {
                self.view().layer.write_zeroes(start, end - start)
            };
            return r.map_err(|e| io_error(ctx(), e));
        }
        if a < b {
            // SAFETY: as above, under the exclusive `io` lock.
            unsafe { self.discard_clusters(a, b - a, true) }.map_err(|e| io_error(ctx(), e))?;
        }
        drop(g);
        self.write_zero_data(start, a.max(start).min(end))?;
        self.write_zero_data(b.max(start), end)
    }

    /// Discards whole clusters: unmapped (reading from the backing, or zeroes without one)
    /// when `full`, else turned into zero clusters.
    ///
    /// # Safety
    /// The caller holds the `io` lock exclusively (no request of this node holds a mapping).
    unsafe fn discard_clusters(&self, offset: u64, len: u64, full: bool) -> std::io::Result<()> {
        if full {
            // SAFETY: the caller's guarantee is imago's condition.
            unsafe { self.view().layer.discard_to_backing_unsafe(offset, len) }
        } else {
            // SAFETY: the caller's guarantee is imago's condition.
            unsafe { self.view().layer.discard_to_zero_unsafe(offset, len) }
        }
    }

    /// Writes zero bytes over `[from, to)` (nothing if empty).
    fn write_zero_data(&self, from: u64, to: u64) -> Result<()> {
        static ZEROES: [u8; 65536] = [0; 65536];
        let mut at = from;
        while at < to {
            let n = (to - at).min(ZEROES.len() as u64) as usize;
            self.write_ungated(&ZEROES[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    /// Discards `[offset, offset+count)` as qemu's qcow2 driver does for NBD TRIM: only
    /// whole clusters, which then read as zeroes (v3) or are left alone (v2); unallocated
    /// clusters of an image without backing stay unallocated. Raw files get a hole punched.
    pub fn trim(&self, count: u64, offset: u64) -> Result<()> {
        let t = match self.gate() {
            Ok(t) => t,
            Err(n) => return n.trim(count, offset),
        };
        let r = self.trim_ungated(count, offset);
        t.mark(offset, count);
        r
    }

    fn trim_ungated(&self, count: u64, offset: u64) -> Result<()> {
        self.check_writable("trim")?;
        let ctx = || format!("trim at {offset} (+{count})");
        match self.driver {
            Driver::Qcow2 => {
                let view = self.view();
                let h = &view.qcow2.as_ref().expect("qcow2 node").header;
                // qemu: v2 images unmap when nothing can show through, else ignore it.
                let full = h.version < 3;
                if full && view.backing.is_some() {
                    return Ok(());
                }
                let cs = h.cluster_size();
                let size = self.size();
                let start = offset.next_multiple_of(cs);
                let end = if offset + count == size {
                    size
                } else {
                    (offset + count) / cs * cs
                };
                if start >= end {
                    return Ok(());
                }
                let _g = self.io.write();
                let layer = self.view().layer.clone();
                let mut at = start;
                while at < end {
                    let (m, len) = layer
                        .get_shallow_mapping(at, end - at)
                        .map_err(|e| io_error(ctx(), e))?;
                    let len = len.min(end - at);
                    let unallocated = matches!(
                        m,
                        ShallowMapping::Zero {
                            explicit: false,
                            ..
                        }
                    );
                    if len == 0 {
                        break;
                    }
                    if !unallocated {
                        // SAFETY: the exclusive `io` lock keeps every other request of this
                        // node (and so every mapping) out, as imago requires.
                        unsafe { self.discard_clusters(at, len, full) }
                            .map_err(|e| io_error(ctx(), e))?;
                    }
                    at += len;
                }
                Ok(())
            }
            Driver::Raw | Driver::File => {
                let _g = self.io.read();
                self.file_state()
                    .storage
                    .discard(offset, count)
                    .map_err(|e| io_error(ctx(), e))
            }
        }
    }

    /// Writes back imago's metadata caches and syncs the image file.
    pub fn flush(&self) -> Result<()> {
        let _t = match self.gate() {
            Ok(t) => t,
            Err(n) => return n.flush(),
        };
        let _g = self.io.read();
        self.flush_locked()
    }

    /// [`Node::flush`] for a caller that holds the `io` lock.
    fn flush_locked(&self) -> Result<()> {
        let v = self.view();
        v.layer.flush().map_err(|e| io_error("flush", e))?;
        v.layer.sync().map_err(|e| io_error("sync", e))
    }

    /// True if `[offset, offset+len)` reads as zeroes by block status (qemu's `is_zero`).
    /// The caller holds the `io` lock.
    fn reads_zero(&self, offset: u64, len: u64) -> Result<bool> {
        let mut ext = Extents::new(offset, offset + len);
        self.block_status_locked(len, offset, false, &mut ext)?;
        Ok(ext.as_slice().iter().all(|e| e.kind & EXTENT_ZERO != 0))
    }

    /// qemu's `qcow2_detect_metadata_preallocation`, which decides whether block status
    /// looks through data clusters at the file's holes: true when the clusters with a
    /// nonzero refcount outnumber the file's allocated blocks (by 10%, at least 2). qemu
    /// guesses once, at the first block status, and so does sluice.
    fn metadata_preallocated(&self) -> bool {
        *self.prealloc_guess.get_or_init(|| {
            self.detect_metadata_preallocation().unwrap_or_else(|e| {
                tracing::debug!("{}: preallocation guess: {e}", self.filename.display());
                false
            })
        })
    }

    fn detect_metadata_preallocation(&self) -> std::io::Result<bool> {
        let view = self.view();
        let Some(q) = &view.qcow2 else {
            return Ok(false);
        };
        let h = &q.header;
        let fs = self.file_state();
        if !self.read_only {
            // The refcounts must be read from the file: write back imago's cache first.
            view.layer.flush()?;
        }
        let meta = fs.os.metadata()?;
        let cs = h.cluster_size();
        let real_clusters = meta.blocks() * 512 / cs;
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let end_cluster = meta.len().div_ceil(cs);
        let mut table = vec![0u8; (u64::from(h.refcount_table_clusters) * cs) as usize];
        fs.storage.read(&mut table[..], h.refcount_table_offset)?;
        let bits = 1u64 << h.refcount_order;
        let per_block = cs * 8 / bits;
        let mut block = vec![0u8; cs as usize];
        let mut loaded = None;
        let mut count = 0u64;
        let mut i = 0u64;
        while i < end_cluster && count < threshold {
            let rb = (i / per_block) as usize;
            let Some(entry) = table.get(rb * 8..rb * 8 + 8) else {
                break;
            };
            let rb_offset = u64::from_be_bytes(entry.try_into().expect("8 bytes")) & !(cs - 1);
            if rb_offset == 0 {
                i = (i / per_block + 1) * per_block;
                continue;
            }
            if loaded != Some(rb_offset) {
                fs.storage.read(&mut block[..], rb_offset)?;
                loaded = Some(rb_offset);
            }
            let bit = (i % per_block) * bits;
            let nonzero = if bits >= 8 {
                let at = (bit / 8) as usize;
                block[at..at + (bits / 8) as usize].iter().any(|&b| b != 0)
            } else {
                // Sub-byte refcounts are stored least significant bits first.
                (block[(bit / 8) as usize] >> (bit % 8)) & ((1u8 << bits) - 1) != 0
            };
            count += u64::from(nonzero);
            i += 1;
        }
        Ok(count >= threshold)
    }

    /// Resolves the stretch starting at `offset` (at most `max` bytes) through the chain.
    pub(crate) fn segment(&self, offset: u64, max: u64) -> Result<Segment> {
        let ctx = || format!("block status at {offset}");
        let mut node = self.arc();
        let mut depth = 1u32;
        let mut at = offset;
        let mut max = max;
        loop {
            let view = node.view();
            let (m, len) = view
                .layer
                .get_shallow_mapping(at, max)
                .map_err(|e| io_error(ctx(), e))?;
            let len = len.min(max);
            let seg = |len, depth, kind| Segment { len, depth, kind };
            match m {
                ShallowMapping::Raw { offset: host, .. } => {
                    let kind = if node.driver == Driver::Qcow2 {
                        SegmentKind::Cluster { host, layer: node }
                    } else {
                        SegmentKind::RawFile { host, layer: node }
                    };
                    return Ok(seg(len, depth, kind));
                }
                ShallowMapping::Indirect { layer, offset, .. } => {
                    let b = view
                        .backing
                        .clone()
                        .filter(|b| std::ptr::eq(&*b.view().layer, layer))
                        .ok_or_else(|| {
                            BlockError::new(Errno::EIO, format!("{}: unknown backing layer", ctx()))
                        })?;
                    node = b;
                    at = offset;
                    max = len;
                    depth += 1;
                }
                ShallowMapping::Zero { explicit, .. } => {
                    return Ok(seg(
                        len,
                        if explicit { depth } else { 0 },
                        SegmentKind::Zero,
                    ))
                }
                // Past the end of a shorter backing: zeroes that qemu counts as allocated in
                // the short layer.
                ShallowMapping::Eof { .. } if depth > 1 => {
                    return Ok(seg(max, depth, SegmentKind::Zero))
                }
                ShallowMapping::Special { .. } => {
                    return Ok(seg(len, depth, SegmentKind::Compressed))
                }
                _ => {
                    return Err(BlockError::new(
                        Errno::EIO,
                        format!("{}: no mapping (past the end?)", ctx()),
                    ))
                }
            }
        }
    }

    /// `base:allocation` of `[offset, offset+count)`, as qemu-nbd reports it: qcow2 data
    /// and compressed clusters are data; zero clusters, unallocated ranges and the ranges
    /// past a shorter backing are holes reading as zeroes; raw layers report their file's
    /// holes. `one` (REQ_ONE): stop once the first extent is complete.
    pub fn block_status(
        &self,
        count: u64,
        offset: u64,
        one: bool,
        out: &mut Extents,
    ) -> Result<()> {
        let _t = match self.gate() {
            Ok(t) => t,
            Err(n) => return n.block_status(count, offset, one, out),
        };
        let _g = self.io.read();
        self.block_status_locked(count, offset, one, out)
    }

    /// [`Node::block_status`] for a caller that holds the `io` lock.
    fn block_status_locked(
        &self,
        count: u64,
        offset: u64,
        one: bool,
        out: &mut Extents,
    ) -> Result<()> {
        let end = offset + count;
        let mut at = offset;
        while at < end {
            let seg = self.segment(at, end - at)?;
            if seg.len == 0 {
                return Err(BlockError::new(
                    Errno::EIO,
                    format!("block status at {at}: empty mapping"),
                ));
            }
            match seg.kind {
                SegmentKind::Cluster { host, ref layer } if layer.metadata_preallocated() => {
                    // Holes in the file under a data cluster read as zeroes: data + zero.
                    raw_file_extents(layer.file_state(), at, host, seg.len, EXTENT_ZERO, out)?
                }
                SegmentKind::Cluster { .. } | SegmentKind::Compressed => out.add(at, seg.len, 0)?,
                SegmentKind::Zero => out.add(at, seg.len, EXTENT_HOLE | EXTENT_ZERO)?,
                SegmentKind::RawFile { host, ref layer } => {
                    let hole = EXTENT_HOLE | EXTENT_ZERO;
                    raw_file_extents(layer.file_state(), at, host, seg.len, hole, out)?;
                }
            }
            // REQ_ONE: like qemu, the first extent runs on while the kind stays the same.
            if one && out.as_slice().len() > 1 {
                break;
            }
            at += seg.len;
        }
        Ok(())
    }

    /// `qemu:allocation-depth` of `[offset, offset+count)`: each extent's kind is the layer
    /// that holds it (1 = this node, 2 = its backing, ...; 0 = unallocated).
    pub fn allocation_depth(&self, count: u64, offset: u64, out: &mut Extents) -> Result<()> {
        let _t = match self.gate() {
            Ok(t) => t,
            Err(n) => return n.allocation_depth(count, offset, out),
        };
        let _g = self.io.read();
        let end = offset + count;
        let mut at = offset;
        while at < end {
            let seg = self.segment(at, end - at)?;
            if seg.len == 0 {
                return Err(BlockError::new(
                    Errno::EIO,
                    format!("allocation depth at {at}: empty mapping"),
                ));
            }
            out.add(at, seg.len, seg.depth)?;
            at += seg.len;
        }
        Ok(())
    }

    /// Copy-on-read for `block-stream`: copies into this node the data of
    /// `[offset, offset+count)` that this node does not hold and that a layer above `base`
    /// holds (every layer below this node when `base` is None). Returns the bytes copied.
    ///
    /// The check and the copy happen under the exclusive `io` lock, so a client write
    /// (which holds it shared) lands either before the check (and is then kept: the range is
    /// allocated here) or after the copy (and overwrites it): older backing data never
    /// overwrites a newer write.
    pub fn stream_range(&self, offset: u64, count: u64, base: Option<&Node>) -> Result<u64> {
        self.check_writable("stream")?;
        let end = offset.saturating_add(count).min(self.size());
        // Depth of the first layer not to copy from (qemu's base): 1 = self, 2 = backing...
        let mut base_depth = u32::MAX;
        if let Some(base) = base {
            let mut depth = 1u32;
            let mut next = self.backing();
            while let Some(n) = next {
                depth += 1;
                if std::ptr::eq(&*n, base) {
                    base_depth = depth;
                    break;
                }
                next = n.backing();
            }
            if base_depth == u32::MAX {
                return Err(BlockError::new(
                    Errno::EINVAL,
                    format!(
                        "stream: '{}' is not a backing node of '{}'",
                        base.name, self.name
                    ),
                ));
            }
        }
        let _g = self.io.write();
        let mut copied = 0u64;
        let mut buf = Vec::new();
        let mut at = offset;
        while at < end {
            let seg = self.segment(at, end - at)?;
            if seg.len == 0 {
                return Err(BlockError::new(
                    Errno::EIO,
                    format!("stream at {at}: empty mapping"),
                ));
            }
            if seg.depth >= 2 && seg.depth < base_depth {
                buf.resize(seg.len as usize, 0);
                self.read_locked(&mut buf, at)?;
                self.write_locked(&buf, at)?;
                copied += seg.len;
            }
            at += seg.len;
        }
        Ok(copied)
    }

    /// Makes `backing` this qcow2 node's backing, durably: writes back everything, writes
    /// the first cluster with the new backing file `name` and `format` (None: no backing)
    /// in one write and `fdatasync`s it, then reopens imago over the same file with the new
    /// chain and swaps that in. All under the exclusive `io` lock: no request sees a mix.
    /// The data the dropped layers held must already be in this node (see
    /// [`Node::stream_range`]).
    pub fn switch_backing(
        &self,
        backing: Option<Arc<Node>>,
        name: Option<&str>,
        format: Option<Format>,
    ) -> std::result::Result<(), ImageError> {
        use std::os::unix::fs::FileExt;
        let path = self.filename.clone();
        let unsupported = |why: String| ImageError::bad_image(&path, HeaderError::Unsupported(why));
        if self.driver != Driver::Qcow2 {
            return Err(unsupported(format!(
                "node '{}' is not qcow2: only qcow2 images have a backing file",
                self.name
            )));
        }
        self.check_writable("switch backing")
            .map_err(|e| unsupported(e.to_string()))?;
        if let Some(b) = &backing {
            if !b.read_only {
                return Err(ImageError::Permission(format!(
                    "node '{}' cannot be the backing of '{}': backing nodes must be read-only",
                    b.name, self.name
                )));
            }
        }
        let _g = self.io.write();
        self.flush_locked()
            .map_err(|e| unsupported(e.to_string()))?;
        // Read back, not the copy from open: imago may have moved the refcount table since.
        let file = self.file.as_ref().expect("format nodes have a file child");
        let mut header = read_header(file)?;
        header.set_backing(name, format);
        let mut cluster = header
            .encode()
            .map_err(|e| ImageError::bad_image(&path, e))?;
        cluster.resize(header.cluster_size() as usize, 0);
        let fs = self.file_state();
        fs.os
            .write_all_at(&cluster, 0)
            .and_then(|()| fs.os.sync_data())
            .map_err(|e| ImageError::open(&path, e))?;
        let mut q = Qcow2::<Storage, Arc<Layer>>::open_image(fs.storage.clone(), true)
            .map_err(|e| ImageError::open(&path, e))?;
        q.set_data_file(None);
        q.set_backing(backing.as_ref().map(|b| b.view().layer.clone()));
        *self.view.write() = Arc::new(View {
            backing,
            qcow2: Some(Qcow2Info { header }),
            layer: Arc::new(FormatAccess::new(q)),
        });
        Ok(())
    }

    /// Starts (Some) or stops (None) recording in `map` the ranges that writes, zeroes and
    /// trims of this node change (see [`crate::dirty`]). Waits for the requests in flight,
    /// so every request that completes after this returns is recorded.
    pub fn track_writes(&self, map: Option<Arc<DirtyMap>>) {
        self.tracking.write().dirty = map;
    }

    /// The end of an active commit: with every request of this node held off, copies what
    /// `dirty` still marks from this node into `target`, flushes `target`, and from then on
    /// sends every request of this node to `target` (which holds the same data, and whose
    /// backing must be what remains of this node's chain below it). Returns the bytes
    /// copied. On error nothing is redirected and this node is unchanged.
    pub fn pivot(&self, dirty: &DirtyMap, target: Arc<Node>) -> Result<u64> {
        let mut t = self.tracking.write();
        let mut copied = 0;
        let mut buf = Vec::new();
        while let Some((offset, len)) = dirty.take(0, 4 << 20) {
            buf.resize(len as usize, 0);
            let r = self
                .read_ungated(&mut buf, offset)
                .and_then(|()| target.write(&buf, offset));
            if let Err(e) = r {
                dirty.mark(offset, len);
                return Err(e);
            }
            copied += len;
        }
        target.flush()?;
        t.dirty = None;
        t.redirect = Some(target);
        Ok(copied)
    }

    /// A writable node over this (read-only) node's image, for `block-commit`, which writes
    /// into a read-only base. It has this node's backing as its backing (so partial-cluster
    /// writes fill in from the same chain) and takes no image locks: the locks this node
    /// already holds keep other processes out, and the writer is the daemon's own. While
    /// the writer lives, this node must not read the ranges written through it; once done,
    /// flush and drop the writer, then [`Node::reload`] this node.
    pub fn open_writer(&self) -> std::result::Result<Arc<Node>, ImageError> {
        let backing = self.backing();
        let mut opts = BlockdevOptions::image(self.driver_of_image(), &self.filename, false);
        opts.locking = Locking::Off;
        if let Some(ChildRef::Options(f)) = &mut opts.file {
            f.locking = Locking::Off;
        }
        opts.backing = match &backing {
            Some(b) => BackingRef::Child(ChildRef::Node(b.name.clone())),
            None => BackingRef::None,
        };
        let resolve = |n: &str| backing.clone().filter(|b| b.name == n);
        open_node(&opts, &resolve)
    }

    /// The format driver of this node's image (a `file` node is a raw image).
    fn driver_of_image(&self) -> Driver {
        match self.driver {
            Driver::Qcow2 => Driver::Qcow2,
            Driver::Raw | Driver::File => Driver::Raw,
        }
    }

    /// Drops what this qcow2 node cached of its image (header, L1/L2 tables, refcounts)
    /// after another writer (see [`Node::open_writer`]) changed the image: imago reloads
    /// them from the file on the next access. The imago instance itself stays, because the
    /// nodes above this one read through it as their backing (and find this node by it).
    /// Nothing to do for raw and file nodes.
    pub fn reload(&self) -> std::result::Result<(), ImageError> {
        if self.driver != Driver::Qcow2 {
            return Ok(());
        }
        let path = self.filename.clone();
        let _g = self.io.write();
        if !self.read_only {
            self.flush_locked()
                .map_err(|e| ImageError::open(&path, std::io::Error::other(e.to_string())))?;
        }
        let file = self.file.as_ref().expect("format nodes have a file child");
        let header = read_header(file)?;
        let old = self.view();
        // SAFETY: the exclusive `io` lock keeps this node's requests out, what this node had
        // to write back was flushed above (a read-only node has nothing), and the other
        // writer flushed before this is called, so the file is consistent.
        unsafe { old.layer.invalidate_cache() }.map_err(|e| ImageError::open(&path, e))?;
        *self.view.write() = Arc::new(View {
            backing: old.backing.clone(),
            qcow2: Some(Qcow2Info { header }),
            layer: old.layer.clone(),
        });
        Ok(())
    }

    /// NBD_CMD_CACHE: asks the kernel to read ahead the file ranges that hold the data.
    pub fn cache(&self, count: u64, offset: u64) -> Result<()> {
        let _t = match self.gate() {
            Ok(t) => t,
            Err(n) => return n.cache(count, offset),
        };
        let _g = self.io.read();
        let end = offset + count;
        let mut at = offset;
        while at < end {
            let seg = self.segment(at, end - at)?;
            if seg.len == 0 {
                break;
            }
            if let SegmentKind::RawFile { host, ref layer } = seg.kind {
                fadvise_willneed(&layer.file_state().os, host, seg.len);
            }
            at += seg.len;
        }
        Ok(())
    }
}

/// Adds the extents of a file range (data, or holes of kind `hole_kind`), found with
/// SEEK_DATA/SEEK_HOLE as qemu's file driver does.
fn raw_file_extents(
    fs: &FileState,
    guest: u64,
    host: u64,
    len: u64,
    hole_kind: u32,
    out: &mut Extents,
) -> Result<()> {
    let fd = fs.os.as_raw_fd();
    let end = host + len;
    let mut at = host;
    while at < end {
        let data = match lseek(fd, at, libc::SEEK_DATA) {
            Ok(d) => d.min(end),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
            // No information: everything is data (qemu does the same).
            Err(_) => {
                out.add(guest + (at - host), end - at, 0)?;
                return Ok(());
            }
        };
        if data > at {
            out.add(guest + (at - host), data - at, hole_kind)?;
            at = data;
            continue;
        }
        let hole = match lseek(fd, at, libc::SEEK_HOLE) {
            Ok(h) => h.clamp(at + 1, end),
            Err(_) => end,
        };
        out.add(guest + (at - host), hole - at, 0)?;
        at = hole;
    }
    Ok(())
}

fn lseek(fd: i32, offset: u64, whence: libc::c_int) -> std::io::Result<u64> {
    let off = libc::off_t::try_from(offset)
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: lseek on a descriptor the caller keeps open; no memory is passed.
    let r = unsafe { libc::lseek(fd, off, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

fn fadvise_willneed(file: &File, offset: u64, len: u64) {
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return;
    };
    // SAFETY: posix_fadvise on a descriptor owned by `file`, which outlives the call; no
    // memory is passed. A hint: its failure changes nothing.
    let _ = unsafe { libc::posix_fadvise(file.as_raw_fd(), off, len, libc::POSIX_FADV_WILLNEED) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::BlockdevOptions;
    use serde_json::json;
    use std::process::Command;

    fn run(cmd: &str, args: &[&str]) -> String {
        let out = Command::new(cmd)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd}: {e} (run scripts/test.sh)"));
        assert!(
            out.status.success(),
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn qemu_io(format: &str, path: &Path, cmds: &[&str]) {
        let mut args = vec!["-f", format];
        for c in cmds {
            args.extend(["-c", c]);
        }
        args.push(path.to_str().unwrap());
        run("qemu-io", &args);
    }

    /// `qemu-img create -q OPTS DIR/NAME [SIZE]`.
    fn create(dir: &Path, name: &str, opts: &[&str], size: Option<&str>) -> PathBuf {
        let p = dir.join(name);
        let mut a = vec!["create", "-q"];
        a.extend_from_slice(opts);
        a.push(p.to_str().unwrap());
        a.extend(size);
        run("qemu-img", &a);
        p
    }

    fn no_nodes(_: &str) -> Option<Arc<Node>> {
        None
    }

    fn open_json(v: serde_json::Value) -> Result<Arc<Node>, ImageError> {
        open_node(&BlockdevOptions::from_json(&v).unwrap(), &no_nodes)
    }

    fn qcow2_opts(path: &Path, read_only: bool) -> serde_json::Value {
        json!({"driver": "qcow2", "read-only": read_only,
               "file": {"driver": "file", "filename": path, "read-only": read_only}})
    }

    fn read(node: &Node, len: usize, offset: u64) -> Vec<u8> {
        let mut buf = vec![0xee; len];
        node.read(&mut buf, offset).unwrap();
        buf
    }

    fn extents(node: &Node, count: u64, offset: u64, depth: bool) -> Vec<(u64, u64, u32)> {
        let mut e = Extents::new(offset, offset + count);
        if depth {
            node.allocation_depth(count, offset, &mut e).unwrap();
        } else {
            node.block_status(count, offset, false, &mut e).unwrap();
        }
        e.as_slice()
            .iter()
            .map(|e| (e.offset, e.length, e.kind))
            .collect()
    }

    /// base.raw (2 MiB: 0x11 in the first 64 KiB) under top.qcow2 (0x22 at 1 MiB, 64 KiB).
    fn chain() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let base = create(dir.path(), "base.raw", &["-f", "raw"], Some("2M"));
        qemu_io("raw", &base, &["write -P 0x11 0 64k"]);
        let top = create(
            dir.path(),
            "top.qcow2",
            &["-f", "qcow2", "-b", "base.raw", "-F", "raw"],
            None,
        );
        qemu_io("qcow2", &top, &["write -P 0x22 1M 64k"]);
        (dir, top)
    }

    #[test]
    fn open_node_from_header_reads_through_chain() {
        let (_dir, top) = chain();
        let node = open_json(qcow2_opts(&top, true)).unwrap();
        assert_eq!(node.size(), 2 << 20);
        assert_eq!(read(&node, 2, 65535), [0x11, 0]);
        assert_eq!(read(&node, 2, (1 << 20) - 1), [0, 0x22]);
        let backing = node.backing().unwrap();
        assert_eq!(backing.driver(), Driver::Raw);
        assert!(backing.is_read_only());
        assert_eq!(
            node.children().iter().map(|(r, _)| *r).collect::<Vec<_>>(),
            ["file", "backing"]
        );
    }

    #[test]
    fn open_node_backing_by_name_uses_that_node() {
        let (dir, top) = chain();
        let base = open_json(json!({"driver": "raw", "node-name": "base", "read-only": true,
            "file": {"driver": "file", "filename": dir.path().join("base.raw"), "read-only": true}}))
        .unwrap();
        let resolve = |n: &str| (n == "base").then(|| base.clone());
        let mut v = qcow2_opts(&top, false);
        v["backing"] = json!("base");
        let node = open_node(&BlockdevOptions::from_json(&v).unwrap(), &resolve).unwrap();
        assert!(Arc::ptr_eq(&node.backing().unwrap(), &base));
        assert_eq!(read(&node, 1, 0), [0x11]);
        drop(node);
        v["backing"] = json!("nope");
        let err = open_node(&BlockdevOptions::from_json(&v).unwrap(), &resolve).unwrap_err();
        assert_eq!(err.to_string(), "cannot find node 'nope'");
    }

    #[test]
    fn open_node_writable_backing_is_refused() {
        let (dir, top) = chain();
        let mut v = qcow2_opts(&top, false);
        v["backing"] = json!({"driver": "raw",
            "file": {"driver": "file", "filename": dir.path().join("base.raw")}});
        let err = open_json(v).unwrap_err();
        assert!(matches!(err, ImageError::Permission(_)), "{err}");
    }

    #[test]
    fn open_node_writable_twice_is_locked() {
        let (_dir, top) = chain();
        let _first = open_json(qcow2_opts(&top, false)).unwrap();
        let err = open_json(qcow2_opts(&top, false)).unwrap_err();
        assert!(
            matches!(err, ImageError::Locked { perm: "write", .. }),
            "{err}"
        );
        // A reader is refused too: a qcow2 user needs the image not to change under it.
        let err = open_json(qcow2_opts(&top, true)).unwrap_err();
        assert!(matches!(err, ImageError::Locked { .. }), "{err}");
    }

    #[test]
    fn write_copies_partial_cluster_from_backing_and_status_follows() {
        let (_dir, top) = chain();
        let node = open_json(qcow2_opts(&top, false)).unwrap();
        node.write(&[0x33; 100], 1000).unwrap();
        node.flush().unwrap();
        assert_eq!(read(&node, 3, 999), [0x11, 0x33, 0x33]);
        assert_eq!(read(&node, 2, 1099), [0x33, 0x11]);
        const HZ: u32 = EXTENT_HOLE | EXTENT_ZERO;
        assert_eq!(
            extents(&node, 2 << 20, 0, false),
            [
                (0, 65536, 0),
                (65536, 983040, HZ),
                (1 << 20, 65536, 0),
                ((1 << 20) + 65536, (1 << 20) - 65536, HZ)
            ]
        );
        assert_eq!(
            extents(&node, 2 << 20, 0, true),
            [
                (0, 65536, 1),
                (65536, 983040, 2),
                (1 << 20, 65536, 1),
                ((1 << 20) + 65536, (1 << 20) - 65536, 2)
            ]
        );
    }

    #[test]
    fn zero_and_trim_make_zero_clusters() {
        let (_dir, top) = chain();
        let node = open_json(qcow2_opts(&top, false)).unwrap();
        node.zero(65536, 0, true, true).unwrap();
        node.trim(65536, 1 << 20).unwrap();
        assert_eq!(read(&node, 2, 0), [0, 0]);
        assert_eq!(read(&node, 2, 1 << 20), [0, 0]);
        let depth = extents(&node, 2 << 20, 0, true);
        assert_eq!(depth[0], (0, 65536, 1));
        assert!(depth.contains(&(1 << 20, 65536, 1)), "{depth:?}");
        // FAST_ZERO of a partial cluster whose rest holds data cannot be done without data.
        node.write(&[1; 10], 200_000).unwrap();
        let err = node.zero(100, 200_100, false, true).unwrap_err();
        assert_eq!(err.errno, Errno::ENOTSUP);
    }

    #[test]
    fn open_node_backing_loop_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = create(dir.path(), "a.qcow2", &["-f", "qcow2"], Some("1M"));
        create(
            dir.path(),
            "b.qcow2",
            &["-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2"],
            None,
        );
        run(
            "qemu-img",
            &[
                "rebase",
                "-u",
                "-b",
                "b.qcow2",
                "-F",
                "qcow2",
                a.to_str().unwrap(),
            ],
        );
        let err = open_json(qcow2_opts(&a, true)).unwrap_err();
        assert!(matches!(err, ImageError::BackingLoop { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.ends_with("a.qcow2 -> b.qcow2 -> a.qcow2") || msg.contains("a.qcow2 ->"),
            "{msg}"
        );
    }

    #[test]
    fn open_node_missing_backing_names_it() {
        let (dir, top) = chain();
        std::fs::remove_file(dir.path().join("base.raw")).unwrap();
        let err = open_json(qcow2_opts(&top, true)).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ImageError::Backing { .. }), "{msg}");
        assert!(
            msg.contains("base.raw") && msg.contains("No such file"),
            "{msg}"
        );
    }

    fn patch(path: &Path, offset: u64, bytes: &[u8]) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(bytes, offset).unwrap();
    }

    #[test]
    fn open_node_truncated_or_corrupt_header_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let img = create(dir.path(), "a.qcow2", &["-f", "qcow2"], Some("1M"));
        patch(&img, 20, &40u32.to_be_bytes());
        let err = open_json(qcow2_opts(&img, true)).unwrap_err();
        assert!(err.to_string().contains("cluster_bits 40"), "{err}");
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.set_len(50).unwrap();
        let err = open_json(qcow2_opts(&img, true)).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn open_node_l1_entry_past_eof_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let img = create(dir.path(), "a.qcow2", &["-f", "qcow2"], Some("1M"));
        let h = Qcow2Header::parse(&std::fs::read(&img).unwrap()[..4096]).unwrap();
        patch(
            &img,
            h.l1_table_offset,
            &(0x8000_0000_0100_0000u64).to_be_bytes(),
        );
        let err = open_json(qcow2_opts(&img, false)).unwrap_err();
        assert!(
            err.to_string().contains("past the end of the file"),
            "{err}"
        );
    }

    #[test]
    fn read_of_l2_entry_past_eof_is_eio_and_write_does_not_grow_file() {
        let dir = tempfile::tempdir().unwrap();
        let img = create(dir.path(), "a.qcow2", &["-f", "qcow2"], Some("1M"));
        qemu_io("qcow2", &img, &["write -P 7 0 64k"]);
        let bytes = std::fs::read(&img).unwrap();
        let h = Qcow2Header::parse(&bytes[..4096]).unwrap();
        let l1 = h.l1_table_offset as usize;
        let l2 = u64::from_be_bytes(bytes[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00;
        // Point the first data cluster far past the end of the file.
        patch(&img, l2, &(0x8000_0000_4000_0000u64).to_be_bytes());
        let len = std::fs::metadata(&img).unwrap().len();
        let node = open_json(qcow2_opts(&img, false)).unwrap();
        let mut buf = [0u8; 512];
        assert_eq!(node.read(&mut buf, 0).unwrap_err().errno, Errno::EIO);
        assert_eq!(node.write(&buf, 0).unwrap_err().errno, Errno::EIO);
        drop(node);
        assert_eq!(std::fs::metadata(&img).unwrap().len(), len);
    }

    #[test]
    fn open_node_writable_with_internal_snapshot_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let img = create(dir.path(), "a.qcow2", &["-f", "qcow2"], Some("1M"));
        run("qemu-img", &["snapshot", "-c", "s1", img.to_str().unwrap()]);
        let err = open_json(qcow2_opts(&img, false)).unwrap_err();
        assert!(err.to_string().contains("internal snapshots"), "{err}");
        open_json(qcow2_opts(&img, true)).unwrap();
    }

    #[test]
    fn write_to_probed_raw_cannot_plant_qcow2_header() {
        let dir = tempfile::tempdir().unwrap();
        let raw = create(dir.path(), "r.raw", &["-f", "raw"], Some("1M"));
        let file = open_file_node("f".into(), &raw, false, Locking::Auto).unwrap();
        let node = open_raw_node("r".into(), file, false, true).unwrap();
        let err = node.write(b"QFI\xfb\0\0\0\x03", 0).unwrap_err();
        assert_eq!(err.errno, Errno::EPERM);
        node.write(b"QFI", 0).unwrap();
        assert_eq!(read(&node, 3, 0), b"QFI");
    }

    /// a.qcow2 <- b.qcow2 <- c.qcow2 (1 MiB, 64 KiB clusters), data at unaligned offsets in
    /// every layer; returns the dir and c.
    fn chain3() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let a = create(dir.path(), "a.qcow2", &["-f", "qcow2"], Some("1M"));
        qemu_io("qcow2", &a, &["write -P 0x11 1000 300k"]);
        let b = create(
            dir.path(),
            "b.qcow2",
            &["-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2"],
            None,
        );
        qemu_io(
            "qcow2",
            &b,
            &["write -P 0x22 200k 5000", "write -z 600k 64k"],
        );
        let c = create(
            dir.path(),
            "c.qcow2",
            &["-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2"],
            None,
        );
        qemu_io("qcow2", &c, &["write -P 0x33 70000 1234"]);
        (dir, c)
    }

    fn stream_all(node: &Node, base: Option<&Node>) -> u64 {
        let mut copied = 0;
        let mut at = 0;
        while at < node.size() {
            copied += node.stream_range(at, 256 << 10, base).unwrap();
            at += 256 << 10;
        }
        copied
    }

    #[test]
    fn stream_range_then_switch_backing_to_none_flattens() {
        let (dir, c) = chain3();
        let node = open_json(qcow2_opts(&c, false)).unwrap();
        let before = read(&node, 1 << 20, 0);
        assert!(stream_all(&node, None) > 0);
        // Everything is in the top now: a second pass copies nothing.
        assert_eq!(stream_all(&node, None), 0);
        node.switch_backing(None, None, None).unwrap();
        assert!(node.backing().is_none());
        assert_eq!(read(&node, 1 << 20, 0), before);
        node.write(&[0x44; 10], 5).unwrap();
        node.flush().unwrap();
        drop(node);
        run("qemu-img", &["check", "-q", c.to_str().unwrap()]);
        let info = run("qemu-img", &["info", "--output=json", c.to_str().unwrap()]);
        assert!(!info.contains("backing-filename"), "{info}");
        let mut want = before;
        want[5..15].fill(0x44);
        let flat = dir.path().join("flat.raw");
        std::fs::write(&flat, &want).unwrap();
        run(
            "qemu-img",
            &[
                "compare",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                c.to_str().unwrap(),
                flat.to_str().unwrap(),
            ],
        );
    }

    #[test]
    fn stream_range_with_base_keeps_base_and_switches_to_it() {
        let (dir, c) = chain3();
        let node = open_json(qcow2_opts(&c, false)).unwrap();
        let before = read(&node, 1 << 20, 0);
        let b = node.backing().unwrap();
        let a = b.backing().unwrap();
        let copied = stream_all(&node, Some(&a));
        // Only b's clusters: 200k+5000 spans 2 clusters of 64 KiB, the zero write one.
        assert_eq!(copied, 3 * 65536);
        node.switch_backing(Some(a.clone()), Some("a.qcow2"), Some(Format::Qcow2))
            .unwrap();
        assert!(Arc::ptr_eq(&node.backing().unwrap(), &a));
        assert_eq!(read(&node, 1 << 20, 0), before);
        drop((node, b, a));
        run("qemu-img", &["check", "-q", c.to_str().unwrap()]);
        let info = run("qemu-img", &["info", "--output=json", c.to_str().unwrap()]);
        assert!(info.contains("\"backing-filename\": \"a.qcow2\""), "{info}");
        assert!(
            info.contains("\"backing-filename-format\": \"qcow2\""),
            "{info}"
        );
        let flat = dir.path().join("flat.raw");
        std::fs::write(&flat, &before).unwrap();
        run(
            "qemu-img",
            &[
                "compare",
                "-q",
                "-F",
                "raw",
                c.to_str().unwrap(),
                flat.to_str().unwrap(),
            ],
        );
    }

    #[test]
    fn stream_range_does_not_overwrite_top_data() {
        let (_dir, c) = chain3();
        let node = open_json(qcow2_opts(&c, false)).unwrap();
        node.write(&[0x55; 100], 1100).unwrap();
        stream_all(&node, None);
        let got = read(&node, 2000, 0);
        assert!(got[1100..1200].iter().all(|&x| x == 0x55));
        assert!(got[1000..1100].iter().all(|&x| x == 0x11));
    }

    /// Active commit at the node level: writes during tracking are marked (also those
    /// between the copy and the pivot), the pivot copies what is left and redirects.
    #[test]
    fn track_writes_then_pivot_moves_every_write_to_the_target() {
        let (dir, c) = chain3();
        let top = open_json(qcow2_opts(&c, false)).unwrap();
        let a = top.backing().unwrap().backing().unwrap();
        let size = top.size();
        let dirty = Arc::new(DirtyMap::new(size, 65536));
        top.track_writes(Some(dirty.clone()));
        // What an active commit copies first: everything above a.
        let mut depth = Extents::new(0, size);
        top.allocation_depth(size, 0, &mut depth).unwrap();
        for e in depth.as_slice() {
            if e.kind == 1 || e.kind == 2 {
                dirty.mark(e.offset, e.length);
            }
        }
        let writer = a.open_writer().unwrap();
        while let Some((o, l)) = dirty.take(0, 1 << 20) {
            let mut buf = vec![0; l as usize];
            top.read(&mut buf, o).unwrap();
            writer.write(&buf, o).unwrap();
        }
        assert!(dirty.is_clean());
        // Client I/O after the copy: marked, so the pivot copies it.
        top.write(&[0x44; 3000], 500_000).unwrap();
        top.zero(65536, 0, true, false).unwrap();
        assert_eq!(dirty.dirty_bytes(), 2 * 65536);
        let before = read(&top, 1 << 20, 0);
        let copied = top.pivot(&dirty, writer.clone()).unwrap();
        assert_eq!(copied, 2 * 65536);
        assert!(Arc::ptr_eq(&top.active(), &writer));
        assert_eq!(read(&top, 1 << 20, 0), before);
        // From now on the top's requests land in a.
        top.write(&[0x66; 100], 900_000).unwrap();
        top.flush().unwrap();
        let mut want = before;
        want[900_000..900_100].fill(0x66);
        drop((top, writer, a));
        run(
            "qemu-img",
            &["check", "-q", dir.path().join("a.qcow2").to_str().unwrap()],
        );
        let flat = dir.path().join("flat.raw");
        std::fs::write(&flat, &want).unwrap();
        let a = dir.path().join("a.qcow2");
        run(
            "qemu-img",
            &[
                "compare",
                "-q",
                "-F",
                "raw",
                a.to_str().unwrap(),
                flat.to_str().unwrap(),
            ],
        );
    }
}
