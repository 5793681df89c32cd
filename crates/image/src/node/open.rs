//! Opening nodes: `blockdev-add` options (and the backing names in image headers) become a
//! graph of [`Node`]s.
//!
//! A `file` node checks what it opens first (a fifo would block the open; only regular files
//! and block devices are served), then takes qemu's OFD lock bytes as a raw user would (see
//! `lock.rs` for the permissions); a qcow2 node on top adds its own needs to the same lock.
//! A format node's children come inline (opened here, recursively) or by name from the
//! daemon's node table (`resolve`). A backing file named in a qcow2 header is opened
//! read-only, in the format the header names, else probed (with a warning, and with qemu's
//! protection of probed raw images, see `io.rs`). The chain is followed by (device, inode),
//! so a loop, or a chain longer than [`MAX_CHAIN`], is refused with the paths that make it.
//!
//! **Bad images.** The header and the L1 table are checked at open (see [`crate::header`]
//! and `check_l1`): a truncated or corrupt image fails here instead of reading zeroes from,
//! or allocating over, a table that is not there. Images with internal snapshots are only
//! opened read-only (see [`crate::storage`] for why). What can only be checked on the request
//! path is checked there (see `io.rs`). Nothing panics on image content.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{FormatAccess, Storage as _, StorageExt, StorageOpenOptions};
use parking_lot::Mutex;
use sluice_block::Result;

use super::{Base, DebugParts, FileState, Layer, Node, Qcow2Info, Storage, View};
use crate::blkdebug::{Blkdebug, DebugStorage};
use crate::error::ImageError;
use crate::header::{self, Format, HeaderError, Qcow2Header};
use crate::lock::{ImageLock, Locking, Perms};
use crate::options::{BackingRef, BlockdevOptions, ChildRef, Driver};
use crate::storage::OrderedFile;

/// How long a chain of backing files sluice follows from image headers.
pub const MAX_CHAIN: usize = 64;

/// Finds an existing node by name (the daemon's node table); None if there is none.
pub type Resolve<'a> = &'a dyn Fn(&str) -> Option<Arc<Node>>;

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
        Driver::Blkdebug => Err(ImageError::InvalidOption(
            "blkdebug nodes are opened with their rules (open_blkdebug_node)".into(),
        )),
        Driver::Plugin => Err(ImageError::InvalidOption(
            "plugin nodes are opened over their device (open_plugin_node)".into(),
        )),
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
            if !matches!(file.driver, Driver::File | Driver::Blkdebug) {
                return Err(ImageError::Permission(format!(
                    "node '{}': the file child of a {} node must be a 'file' node, not '{}'",
                    file.name,
                    opts.driver.as_str(),
                    file.driver.as_str()
                )));
            }
            if !opts.read_only && file.is_read_only() {
                return Err(ImageError::Permission(format!(
                    "node '{name}' cannot be writable: its file node '{}' is read-only",
                    file.name
                )));
            }
            if opts.driver == Driver::Raw {
                let bitmap_file = match &opts.bitmap_file {
                    // Absolute, so that the log and errors name the file a later open
                    // (from another directory) would take.
                    Some(p) => Some(std::path::absolute(p).map_err(|e| ImageError::open(p, e))?),
                    None => None,
                };
                open_raw_node(name, file, opts.read_only, probed, bitmap_file)
            } else {
                open_qcow2_node(name, file, opts.read_only, &opts.backing, resolve, chain)
            }
        }
    }
}

pub(super) fn open_file_node(
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
    lock.add(&os, &name, raw_perms(read_only).0, raw_perms(read_only).1)?;
    let dup = os.try_clone().map_err(|e| ImageError::open(path, e))?;
    let storage_fd = dup.as_raw_fd();
    let st_opts = StorageOpenOptions::new().write(!read_only).filename(path);
    let ordered = Arc::new(OrderedFile::new(
        imago::file::File::from_open_file(dup, st_opts).map_err(|e| ImageError::open(path, e))?,
    ));
    let storage: Storage = ordered.clone();
    let raw =
        Raw::open_image(storage.clone(), !read_only).map_err(|e| ImageError::open(path, e))?;
    let state = FileState {
        os,
        storage_fd,
        ordered,
        storage,
        lock: Mutex::new(lock),
        writable: AtomicBool::new(!read_only),
    };
    Ok(Node::new_arc(
        name,
        Driver::File,
        read_only,
        Base::Own(path.to_owned(), state),
        View::new(None, None, FormatAccess::new(raw)),
        false,
        None,
    ))
}

/// Opens a blkdebug node over `file` (a `file` node) with `rules`; `spec` is the node's
/// options as qemu shows them in a `json:` filename (see [`crate::blkdebug`]). The node
/// takes no lock of its own: the file node has taken the image's, and a format node above
/// adds its own needs to it.
pub fn open_blkdebug_node(
    name: String,
    file: Arc<Node>,
    read_only: bool,
    rules: Arc<Blkdebug>,
    spec: serde_json::Value,
) -> Result<Arc<Node>, ImageError> {
    if file.driver != Driver::File {
        return Err(ImageError::Permission(format!(
            "node '{name}': the image child of a blkdebug node must be a 'file' node, not '{}'",
            file.driver.as_str()
        )));
    }
    if !read_only && file.is_read_only() {
        return Err(ImageError::Permission(format!(
            "node '{name}' cannot be writable: its file node '{}' is read-only",
            file.name
        )));
    }
    let inner = file.storage().clone();
    let own_storage: Storage = Arc::new(DebugStorage::new(inner.clone(), rules.clone(), false));
    let parent_storage: Storage = Arc::new(DebugStorage::new(inner, rules.clone(), true));
    let raw = Raw::open_image(own_storage.clone(), !read_only)
        .map_err(|e| ImageError::open(&file.filename, e))?;
    let parts = DebugParts {
        rules,
        own_storage,
        parent_storage,
        spec,
    };
    Ok(Node::new_arc(
        name,
        Driver::Blkdebug,
        read_only,
        Base::Debug(file, parts),
        View::new(None, None, FormatAccess::new(raw)),
        false,
        None,
    ))
}

/// (used, unshared) permissions of a raw user (see `lock.rs` for why).
pub(super) fn raw_perms(read_only: bool) -> (Perms, Perms) {
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
pub(super) fn qcow2_perms(read_only: bool) -> (Perms, Perms) {
    let used = if read_only {
        Perms::CONSISTENT_READ
    } else {
        Perms::CONSISTENT_READ | Perms::WRITE | Perms::RESIZE
    };
    (used, Perms::WRITE | Perms::RESIZE)
}

pub(super) fn open_raw_node(
    name: String,
    file: Arc<Node>,
    read_only: bool,
    probed: bool,
    bitmap_file: Option<PathBuf>,
) -> Result<Arc<Node>, ImageError> {
    let raw = Raw::open_image(file.storage().clone(), !read_only)
        .map_err(|e| ImageError::open(&file.filename, e))?;
    Ok(Node::new_arc(
        name,
        Driver::Raw,
        read_only,
        Base::Child(file),
        View::new(None, None, FormatAccess::new(raw)),
        probed,
        bitmap_file,
    ))
}

/// Reads and checks a qcow2 header from a file node.
pub(super) fn read_header(file: &Node) -> Result<Qcow2Header, ImageError> {
    let path = &file.filename;
    let file_len = file
        .storage()
        .size()
        .map_err(|e| ImageError::open(path, e))?;
    let mut want = 4096usize;
    loop {
        let len = want.min(file_len as usize);
        let mut buf = vec![0u8; len];
        file.storage()
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
    let path = &file.filename;
    let file_len = file
        .storage()
        .size()
        .map_err(|e| ImageError::open(path, e))?;
    h.check_layout(file_len)
        .map_err(|e| ImageError::bad_image(path, e))?;
    let mut l1 = vec![0u8; h.l1_size as usize * 8];
    file.storage()
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

/// Writable opens only: the refcounts imago allocates from must cover the metadata it must
/// never allocate over. imago 0.2.6 trusts them: with no refcount block for the header's
/// cluster it puts a new one over the header, and with refcount blocks outside the file or
/// over other metadata its allocator recurses without end (a stack overflow, which no
/// error handling can catch; found by the `qcow2_open` fuzz target). So every refcount
/// table entry in use must be an aligned cluster inside the file that is not the header,
/// L1 or refcount table, nor another entry's; and the header, L1 and refcount table
/// clusters must have a non-zero refcount. qemu opens such an image and refuses the first
/// write that would overlap metadata (marking the image corrupt); sluice refuses the
/// writable open instead, with qemu-img check's advice. Reads never allocate, so read-only
/// opens are not checked.
pub(super) fn check_refcounts(file: &Node, h: &Qcow2Header) -> Result<(), ImageError> {
    let path = &file.filename;
    let bad = |why: String| {
        ImageError::bad_image(
            path,
            HeaderError::Corrupt(format!(
                "{why}; it cannot be written safely (run 'qemu-img check -r all', or open it \
                 read-only)"
            )),
        )
    };
    let file_len = file
        .storage()
        .size()
        .map_err(|e| ImageError::open(path, e))?;
    let cs = h.cluster_size();
    if h.refcount_order > 6 {
        return Err(bad(format!(
            "refcount_order {} is over 6",
            h.refcount_order
        )));
    }
    let rt_len = u64::from(h.refcount_table_clusters) * cs;
    let rt_range = h.refcount_table_offset..h.refcount_table_offset.saturating_add(rt_len);
    if rt_range.end > file_len {
        return Err(bad(format!(
            "the refcount table ({rt_len} bytes at {:#x}) is past the end of the file",
            h.refcount_table_offset
        )));
    }
    let l1_range = h.l1_range();
    let mut rt = vec![0u8; rt_len as usize];
    file.storage()
        .read(&mut rt[..], h.refcount_table_offset)
        .map_err(|e| ImageError::open(path, e))?;
    let rt: Vec<u64> = rt
        .chunks_exact(8)
        .map(|e| u64::from_be_bytes(e.try_into().expect("8 bytes")) & !0x1ff)
        .collect();
    let mut seen = std::collections::HashSet::new();
    for (i, &rb) in rt.iter().enumerate() {
        if rb == 0 {
            continue;
        }
        let overlaps = |r: &std::ops::Range<u64>| rb < r.end && r.start < rb + cs;
        let why = if rb % cs != 0 {
            "is not cluster-aligned"
        } else if rb.checked_add(cs).is_none_or(|end| end > file_len) {
            "is past the end of the file"
        } else if rb < cs || overlaps(&l1_range) || overlaps(&rt_range) {
            "overlaps the header, L1 or refcount table"
        } else if !seen.insert(rb) {
            "is also another entry's"
        } else {
            continue;
        };
        return Err(bad(format!(
            "refcount table entry {i} points to a refcount block at {rb:#x} that {why}"
        )));
    }
    // Entries per refcount block: cluster_size * 8 / refcount_bits.
    let bits = 1u32 << h.refcount_order;
    let rb_bits = h.cluster_bits + 3 - h.refcount_order;
    let mut blocks: std::collections::HashMap<usize, Vec<u8>> = std::collections::HashMap::new();
    let metadata = std::iter::once((0u64, "header"))
        .chain((l1_range.start / cs..l1_range.end.div_ceil(cs)).map(|c| (c, "L1 table")))
        .chain((rt_range.start / cs..rt_range.end / cs).map(|c| (c, "refcount table")));
    for (cluster, what) in metadata {
        let index = (cluster >> rb_bits) as usize;
        let Some(&rb) = rt.get(index).filter(|&&rb| rb != 0) else {
            return Err(bad(format!(
                "the {what} (cluster {cluster}) has no refcount block"
            )));
        };
        if let std::collections::hash_map::Entry::Vacant(slot) = blocks.entry(index) {
            let mut b = vec![0u8; cs as usize];
            file.storage()
                .read(&mut b[..], rb)
                .map_err(|e| ImageError::open(path, e))?;
            slot.insert(b);
        }
        let block = &blocks[&index];
        let i = (cluster & ((1 << rb_bits) - 1)) as usize;
        let refcount = if bits >= 8 {
            let n = (bits / 8) as usize;
            block[i * n..(i + 1) * n]
                .iter()
                .fold(0u64, |v, &b| (v << 8) | u64::from(b))
        } else {
            // Sub-byte refcounts are packed from the low bits up, as qemu writes them.
            let per_byte = (8 / bits) as usize;
            u64::from((block[i / per_byte] >> ((i % per_byte) as u32 * bits)) & ((1 << bits) - 1))
        };
        if refcount == 0 {
            return Err(bad(format!(
                "the {what} (cluster {cluster}) has refcount 0"
            )));
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
    if !read_only {
        check_refcounts(&file, &header)?;
    }
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
        fs.lock.lock().add(&fs.os, &name, used, unshared)?;
    }

    // A node named by reference may be writable: that is libvirt's pull-mode backup, a
    // scratch qcow2 over the live disk, which a backup's copy-before-write fills with the
    // disk's old data before the disk changes (see the daemon's `jobs/backup.rs`). What
    // this node reads through it is then the live disk, as with qemu.
    let by_reference = matches!(backing, BackingRef::Child(ChildRef::Node(_)));
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
        if !b.is_read_only() && !by_reference {
            return Err(ImageError::Permission(format!(
                "node '{}' cannot be the backing of '{name}': backing nodes must be read-only",
                b.name
            )));
        }
    }

    let fs = file.file_state();
    if !read_only {
        // See storage.rs: L1 entries reach the file only after the refcounts they rely on.
        fs.ordered
            .defer_l1_writes(header.l1_range())
            .map_err(|e| ImageError::open(&path, e))?;
    }
    let mut q = Qcow2::<Storage, Arc<Layer>>::open_image(file.storage().clone(), !read_only)
        .map_err(|e| ImageError::open(&path, e))?;
    q.set_data_file(None);
    q.set_backing(backing.as_ref().map(|b| b.view().layer.clone()));
    Ok(Node::new_arc(
        name,
        Driver::Qcow2,
        read_only,
        Base::Child(file),
        View::new(backing, Some(Qcow2Info { header }), FormatAccess::new(q)),
        false,
        None,
    ))
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
        bitmap_file: None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::test_support::*;
    use serde_json::json;

    #[test]
    fn check_refcounts_accepts_qemu_images_of_every_refcount_width() {
        let dir = tempfile::tempdir().unwrap();
        for bits in ["1", "2", "4", "8", "16", "32", "64"] {
            let opts = format!("cluster_size=512,refcount_bits={bits}");
            let p = create(
                dir.path(),
                &format!("r{bits}.qcow2"),
                &["-f", "qcow2", "-o", &opts],
                Some("1M"),
            );
            qemu_io("qcow2", &p, &["write -P 0x33 0 64k"]);
            let node = open_json(qcow2_opts(&p, false)).unwrap();
            node.write(&[0x44; 512], 512 * 1024).unwrap();
            node.flush().unwrap();
            assert_eq!(read(&node, 1, 512 * 1024), [0x44], "refcount_bits={bits}");
        }
    }

    #[test]
    fn check_refcounts_refuses_writable_open_without_header_refcount() {
        // The qcow2_open fuzz target's crash: no refcount block covers the header, one entry
        // points far past the end of the file; imago's allocator recursed until the stack
        // overflowed. Writable: refused with a clear error. Read-only: opens and reads.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("crash.qcow2");
        let seed = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fuzz/seeds/qcow2_open/crash-refcount-9fa64112"
        );
        std::fs::copy(seed, &p).unwrap();
        let e = open_json(qcow2_opts(&p, false)).unwrap_err().to_string();
        assert!(
            e.contains("refcount table entry 20") && e.contains("past the end of the file"),
            "{e}"
        );
        assert!(e.contains("qemu-img check -r all"), "{e}");
        let node = open_json(qcow2_opts(&p, true)).unwrap();
        assert_eq!(read(&node, 2, 0), [0, 0]);
        drop(node);
        // With that entry cleared, the header itself has no refcount block.
        let mut d = std::fs::read(&p).unwrap();
        d[0x200 + 20 * 8..0x200 + 21 * 8].fill(0);
        std::fs::write(&p, &d).unwrap();
        let e = open_json(qcow2_opts(&p, false)).unwrap_err().to_string();
        assert!(
            e.contains("the header (cluster 0) has no refcount block"),
            "{e}"
        );
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
        // Another image: the dropped node's lock can outlive it for as long as a process
        // another test spawns at that moment holds its descriptor (between fork and exec).
        let other = dir.path().join("other.qcow2");
        std::fs::copy(&top, &other).unwrap();
        let mut v = qcow2_opts(&other, false);
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
    fn open_node_writable_with_internal_snapshot_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let img = create(dir.path(), "a.qcow2", &["-f", "qcow2"], Some("1M"));
        run("qemu-img", &["snapshot", "-c", "s1", img.to_str().unwrap()]);
        let err = open_json(qcow2_opts(&img, false)).unwrap_err();
        assert!(err.to_string().contains("internal snapshots"), "{err}");
        open_json(qcow2_opts(&img, true)).unwrap();
    }
}
