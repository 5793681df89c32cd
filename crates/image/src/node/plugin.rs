//! Plugin nodes: any block device of the block layer (an RBD image, a built-in or foreign
//! plugin) as a node of this crate, so that a qcow2 node can stand on it as its backing,
//! and block jobs can stream from it and commit into it.
//!
//! A qcow2 node reads its backing through imago (a `FormatAccess` over a storage object),
//! and everything that walks a chain — block status, allocation depth, stream's
//! copy-on-read, commit's depths — walks [`Node`]s. Rather than teach each of those a
//! second kind of layer, a device becomes a node like a raw image: imago's raw format over
//! a storage object ([`DeviceStorage`]) that forwards to one [`Export`] of the plugin. The
//! export is the block layer's own policy over a handle (request checks, zero emulated by
//! writes when the plugin cannot zero, flush only when offered, extents checked, the
//! plugin's thread model), so no capability ladder is written again here. What differs
//! from a raw image is only what a file would answer: block status comes from the
//! plugin's extents (holes read as zeroes, as qemu reports a protocol node's), there is no
//! lock of ours (the device has its own, an RBD image its exclusive lock), no bitmaps of
//! ours (the daemon's node keeps them) and no reopen (the daemon opens a second, writable
//! device for a commit and makes it a node here, see [`open_plugin_node`]).
//!
//! Requests are synchronous calls on the export, from the thread that asked, as for image
//! files (see the `node` module doc): the plugins that may block (rbd) wait there for
//! their own completions.

use std::path::PathBuf;
use std::sync::Arc;

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::raw::Raw;
use imago::storage::drivers::CommonStorageHelper;
use imago::storage::PreallocateMode;
use imago::FormatAccess;
use sluice_block::extents::Extents;
use sluice_block::{Backend, BlockError, Export, Flags, OpenContext, Plugin, Result};

use super::{Base, Node, Storage, View};
use crate::error::ImageError;
use crate::options::Driver;

/// What a plugin node stands on: the plugin, and the storage imago reads it through.
pub(super) struct DeviceParts {
    /// Kept so that the device lives as long as the node (handles may rely on it).
    plugin: Arc<dyn Plugin>,
    storage: Arc<DeviceStorage>,
    /// The same storage, as imago's object.
    pub(super) dyn_storage: Storage,
}

/// imago's storage over one export of a plugin (see the module doc).
pub(crate) struct DeviceStorage {
    /// What the storage shows in imago's messages (the node's file name).
    name: String,
    export: Export,
    helper: CommonStorageHelper,
}

impl std::fmt::Debug for DeviceStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceStorage")
            .field("name", &self.name)
            .field("size", &self.export.size())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Display for DeviceStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

/// A block-layer error inside an imago I/O error: [`crate::error::io_error`] takes its
/// errno back out, so the client sees the device's errno.
fn to_io(e: BlockError) -> std::io::Error {
    std::io::Error::other(e)
}

impl imago::Storage for DeviceStorage {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.export.size())
    }

    unsafe fn pure_readv(&self, bufv: IoVectorMut<'_>, offset: u64) -> std::io::Result<()> {
        let mut at = offset;
        for mut slice in bufv.into_inner() {
            let buf: &mut [u8] = &mut slice;
            if !buf.is_empty() {
                self.export.read(buf, at).map_err(to_io)?;
            }
            at += buf.len() as u64;
        }
        Ok(())
    }

    unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> std::io::Result<()> {
        let mut at = offset;
        for slice in bufv.into_inner() {
            let buf: &[u8] = &slice;
            if !buf.is_empty() {
                self.export.write(buf, at, Flags::NONE).map_err(to_io)?;
            }
            at += buf.len() as u64;
        }
        Ok(())
    }

    unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> std::io::Result<()> {
        if length == 0 {
            return Ok(());
        }
        self.export
            .zero(length, offset, Flags::MAY_TRIM)
            .map_err(to_io)
    }

    unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> std::io::Result<()> {
        if length == 0 {
            return Ok(());
        }
        self.export.zero(length, offset, Flags::NONE).map_err(to_io)
    }

    unsafe fn pure_discard(&self, offset: u64, length: u64) -> std::io::Result<()> {
        // Advisory, as NBD's trim: a device that cannot discard keeps the data.
        if length == 0 || !self.export.caps().trim {
            return Ok(());
        }
        self.export.trim(length, offset, Flags::NONE).map_err(to_io)
    }

    fn flush(&self) -> std::io::Result<()> {
        // Nothing is cached on this side: `sync` asks the device.
        Ok(())
    }

    fn sync(&self) -> std::io::Result<()> {
        if !self.export.caps().flush {
            return Ok(());
        }
        self.export.flush().map_err(to_io)
    }

    unsafe fn invalidate_cache(&self) -> std::io::Result<()> {
        Ok(())
    }

    fn get_storage_helper(&self) -> &CommonStorageHelper {
        &self.helper
    }

    fn resize(&self, _new_size: u64, _prealloc_mode: PreallocateMode) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

/// Opens `plugin` as a node named `name` (see the module doc): read-only, or writable if
/// the plugin's handle can write. `filename` is what the node reports as its file name
/// (for an RBD image, qemu's `json:{...}` of the options that select it).
pub fn open_plugin_node(
    name: String,
    plugin: Arc<dyn Plugin>,
    read_only: bool,
    filename: &str,
) -> std::result::Result<Arc<Node>, ImageError> {
    let path = PathBuf::from(filename);
    let failed = |e: BlockError| ImageError::open(&path, to_io(e));
    let backend = Backend::new(plugin.clone());
    let export = Export::open(
        &backend,
        &OpenContext {
            readonly: read_only,
            export_name: "",
            is_tls: false,
        },
    )
    .map_err(failed)?;
    if !read_only && !export.caps().writable {
        return Err(ImageError::Permission(format!(
            "node '{name}' cannot be writable: its device ({}) is read-only",
            plugin.name()
        )));
    }
    let storage = Arc::new(DeviceStorage {
        name: filename.to_string(),
        export,
        helper: CommonStorageHelper::default(),
    });
    let dyn_storage: Storage = storage.clone();
    let raw =
        Raw::open_image(dyn_storage.clone(), !read_only).map_err(|e| ImageError::open(&path, e))?;
    let parts = DeviceParts {
        plugin,
        storage,
        dyn_storage,
    };
    Ok(Node::new_arc(
        name,
        Driver::Plugin,
        read_only,
        Base::Device(path, parts),
        View::new(None, None, FormatAccess::new(raw)),
        false,
        None,
    ))
}

impl Node {
    /// The plugin under a plugin node (see [`open_plugin_node`]).
    pub fn device(&self) -> Option<&Arc<dyn Plugin>> {
        self.device.as_ref().map(|d| &d.plugin)
    }

    /// The device's block status of `[host, host+len)`, added to `out` at `guest`: its
    /// extents as they are (holes read as zeroes), asked again until the range is covered
    /// (a plugin may answer for less than was asked).
    pub(super) fn device_extents(
        &self,
        guest: u64,
        host: u64,
        len: u64,
        out: &mut Extents,
    ) -> Result<()> {
        let d = self.device.as_ref().expect("plugin nodes have a device");
        let end = host + len;
        let mut at = host;
        while at < end {
            let ext = d.storage.export.extents(end - at, at, Flags::NONE)?;
            let before = at;
            for e in ext.as_slice() {
                let stop = (e.offset + e.length).min(end);
                if stop <= at {
                    continue;
                }
                out.add(guest + (at - host), stop - at, e.kind)?;
                at = stop;
            }
            if at == before {
                // Checked by the export (at least one extent, from `at` on); never loop.
                return Err(BlockError::new(
                    sluice_block::Errno::EIO,
                    format!("block status at {at}: the device answered no extent"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::test_support::*;
    use serde_json::json;
    use sluice_block::extents::{EXTENT_HOLE, EXTENT_ZERO};
    use sluice_block::plugins::ConfigArg;

    fn memory(size: &str) -> Arc<dyn Plugin> {
        let args = [ConfigArg::parse(&format!("size={size}"))];
        sluice_block::plugins::open_builtin("memory", &args)
            .expect("memory is built in")
            .unwrap()
    }

    /// A qcow2 overlay (no backing in its header) over `device`, named by reference.
    fn overlay_over(
        dir: &std::path::Path,
        device: Arc<Node>,
        size: &str,
    ) -> (std::path::PathBuf, Arc<Node>) {
        let top = create(dir, "top.qcow2", &["-f", "qcow2"], Some(size));
        let mut v = qcow2_opts(&top, false);
        v["backing"] = json!("dev");
        let resolve = |n: &str| (n == "dev").then(|| device.clone());
        let opts = crate::BlockdevOptions::from_json(&v).unwrap();
        (top, crate::open_node(&opts, &resolve).unwrap())
    }

    #[test]
    fn plugin_node_reads_writes_and_reports_holes() {
        let dev = open_plugin_node("dev".into(), memory("1M"), false, "memory:").unwrap();
        assert_eq!(dev.size(), 1 << 20);
        // The memory plugin allocates 32 KiB pages.
        dev.write(&[7; 4096], 65536).unwrap();
        dev.flush().unwrap();
        assert_eq!(read(&dev, 2, 65535), [0, 7]);
        let kinds: Vec<_> = extents(&dev, 1 << 20, 0, false)
            .into_iter()
            .map(|(offset, _, kind)| (offset, kind))
            .collect();
        assert_eq!(kinds[0], (0, EXTENT_HOLE | EXTENT_ZERO));
        assert!(kinds.contains(&(65536, 0)), "{kinds:?}");
    }

    #[test]
    fn plugin_node_read_only_refuses_writes() {
        let dev = open_plugin_node("dev".into(), memory("1M"), true, "memory:").unwrap();
        assert_eq!(
            dev.write(&[1], 0).unwrap_err().errno,
            sluice_block::Errno::EROFS
        );
    }

    #[test]
    fn qcow2_over_plugin_node_reads_through_and_copies_up() {
        let dir = tempfile::tempdir().unwrap();
        let plugin = memory("1M");
        let writer = open_plugin_node("w".into(), plugin.clone(), false, "memory:").unwrap();
        writer.write(&[0x11; 65536], 0).unwrap();
        let dev = open_plugin_node("dev".into(), plugin, true, "memory:").unwrap();
        let (_top, top) = overlay_over(dir.path(), dev.clone(), "1M");
        assert_eq!(read(&top, 2, 65535), [0x11, 0]);
        // A partial-cluster write fills the rest of the cluster from the device.
        top.write(&[0x22; 10], 100).unwrap();
        assert_eq!(read(&top, 3, 99), [0x11, 0x22, 0x22]);
        let d: Vec<_> = extents(&top, 1 << 20, 0, true)
            .into_iter()
            .map(|(offset, _, kind)| (offset, kind))
            .collect();
        assert_eq!(d, [(0, 1), (65536, 2)]);
        // Stream the device up, then drop it: the overlay alone reads the same.
        let before = read(&top, 1 << 20, 0);
        assert!(top.stream_range(0, 1 << 20, None).unwrap() > 0);
        top.switch_backing(None, None, None).unwrap();
        assert!(top.backing().is_none());
        assert_eq!(read(&top, 1 << 20, 0), before);
    }

    #[test]
    fn writable_plugin_node_as_commit_target_sees_top_data() {
        let dir = tempfile::tempdir().unwrap();
        let plugin = memory("1M");
        let dev = open_plugin_node("dev".into(), plugin.clone(), true, "memory:").unwrap();
        let (_top, top) = overlay_over(dir.path(), dev.clone(), "1M");
        top.write(&[0x33; 4096], 4096).unwrap();
        let writer = open_plugin_node("dev".into(), plugin, false, "memory:").unwrap();
        let mut depth = Extents::new(0, 1 << 20);
        top.allocation_depth(1 << 20, 0, &mut depth).unwrap();
        for e in depth.as_slice().iter().filter(|e| e.kind == 1) {
            let mut buf = vec![0; e.length as usize];
            top.read(&mut buf, e.offset).unwrap();
            writer.write(&buf, e.offset).unwrap();
        }
        writer.flush().unwrap();
        assert_eq!(read(&dev, 2, 4095), [0, 0x33]);
    }
}
