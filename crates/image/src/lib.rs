//! sluice's disk images: `file`, `raw` and `qcow2` nodes, backing chains and image locking.
//!
//! This crate turns image files into [`Node`]s that the NBD server exports (each node is a
//! [`sluice_block::Plugin`]) and that the QMP daemon manages by name. qcow2 is read and
//! written through the `imago` crate; what imago does not do (header parsing for probing,
//! validation and, later, backing-name rewrites; qemu's lock convention; qemu's block-status
//! semantics; the checks that keep a corrupt image from being corrupted further) lives here.
//!
//! # Node API (for `blockdev-add`)
//!
//! ```no_run
//! use std::sync::Arc;
//! use sluice_image::{open_node, BlockdevOptions, Node};
//!
//! # fn table_lookup(_: &str) -> Option<Arc<Node>> { None }
//! let args = serde_json::json!({
//!     "driver": "qcow2", "node-name": "top",
//!     "file": {"driver": "file", "filename": "/images/top.qcow2"},
//!     "backing": "base",            // a node added before; null = none; absent = from header
//! });
//! let opts = BlockdevOptions::from_json(&args)?;          // qemu's wording on bad input
//! let node: Arc<Node> = open_node(&opts, &|name| table_lookup(name))?;
//! // node.name() == "top"; node.children() gives the inline `file` node (named "#blockNNN")
//! // and the backing; `node.clone() as Arc<dyn sluice_block::Plugin>` exports it.
//! # Ok::<(), sluice_image::ImageError>(())
//! ```
//!
//! Rules, the same as qemu's where qemu has one:
//! - `driver`: `file` (`filename`, `locking=auto|on|off`), `raw` (`file`), `qcow2` (`file`,
//!   `backing`). `file` and `backing` take a node name or inline options.
//! - Permissions: a node is opened read-only or read-write (`read-only`) and may be
//!   reopened the other way ([`Node::reopen`], the daemon's `blockdev-reopen`). A writable
//!   format node needs a writable file node; backing nodes must be read-only, except a node
//!   named by reference (a pull-mode backup's scratch over the live disk).
//! - Exclusion: every file node takes qemu's OFD lock bytes (see [`lock`]), so one image cannot
//!   be opened writable twice — not by two nodes of one process, not by two sluice processes,
//!   not by sluice and qemu-img/qemu-io/QEMU — and a qcow2 image in use cannot be written by
//!   anyone else. The locks go with the last reference to the node (and with the process).
//! - Sharing: nodes are `Arc`s; export one node on many connections and they see one image.
//! - Errors: [`ImageError`], with [`ImageError::qmp_class`] for the QMP reply.
//! - Threads: node methods block (see [`node`]); call them from blocking threads.
//!
//! # Command line
//!
//! [`open_image_export`] serves `sluice serve image file=PATH [format=] [backing=]
//! [bitmap=]` (see [`cli`] for the backing policy and the bitmaps).

pub mod bitmaps;
pub mod blkdebug;
pub mod cli;
pub mod dirty;
pub mod error;
pub mod handle;
pub mod header;
pub mod lock;
pub mod node;
pub mod options;
pub mod qcow2_bitmaps;
pub mod refcounts;
pub mod sidecar;
pub mod storage;

pub use bitmaps::{Bitmap, BitmapError, Bitmaps};
pub use cli::{open_image_export, open_image_node, ImageExport};
pub use dirty::DirtyMap;
pub use error::ImageError;
pub use handle::NodeHandle;
pub use header::{Format, Qcow2Header};
pub use lock::Locking;
pub use node::{
    create_file, open_blkdebug_node, open_node, open_plugin_node, AfterWrite, BeforeWrite, Node,
    Prealloc, Qcow2Create, Resolve,
};
pub use options::{BackingRef, BlockdevOptions, ChildRef, Driver};
