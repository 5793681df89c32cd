//! A node as an NBD export: [`Node`] implements [`Plugin`], and each connection gets a
//! [`NodeHandle`] that shares the node.
//!
//! All connections share one node, so they see one image and one metadata cache; that is why
//! multi-conn is advertised (see `node/io.rs` on durability). Everything the export policy
//! can take natively is native: FUA (write, then the node's flush), zero (qcow2 zero
//! clusters, unmapped unless NO_HOLE), trim (qcow2 discard), cache (read-ahead of the mapped
//! ranges), block status and allocation depth.

use std::sync::Arc;

use sluice_block::extents::Extents;
use sluice_block::{BlockSize, Flags, Handle, OpenContext, Plugin, Result, Support};

use crate::node::Node;
use crate::options::Driver;

impl Plugin for Node {
    fn name(&self) -> &str {
        "image"
    }

    fn version(&self) -> Option<&str> {
        Some(env!("CARGO_PKG_VERSION"))
    }

    fn open(&self, ctx: &OpenContext<'_>) -> Result<Box<dyn Handle>> {
        Ok(Box::new(NodeHandle {
            // The node that serves the requests decides: after a snapshot this node is
            // read-only and forwards to its writable overlay.
            writable: !ctx.readonly && !self.active().is_read_only(),
            node: self.arc(),
        }))
    }

    fn has_allocation_depth(&self) -> bool {
        true
    }

    fn dump(&self) -> Vec<String> {
        vec![
            format!("image_driver={}", self.driver().as_str()),
            format!("image_file={}", self.filename().display()),
        ]
    }
}

/// One connection's view of a node.
pub struct NodeHandle {
    node: Arc<Node>,
    writable: bool,
}

impl Handle for NodeHandle {
    // After an active commit, the node serving the export is the base it was pivoted to.
    fn get_size(&self) -> Result<u64> {
        Ok(self.node.active().size())
    }
    fn export_description(&self) -> Result<Option<String>> {
        let node = self.node.active();
        Ok(Some(format!(
            "{} {}",
            node.driver().as_str(),
            node.filename().display()
        )))
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        Ok(Some(BlockSize {
            minimum: 1,
            preferred: self.node.active().cluster_size().clamp(4096, 2 << 20) as u32,
            maximum: u32::MAX,
        }))
    }
    fn can_write(&self) -> Result<bool> {
        Ok(self.writable)
    }
    fn can_flush(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_trim(&self) -> Result<bool> {
        Ok(self.writable)
    }
    fn can_zero(&self) -> Result<Support> {
        Ok(Support::Native)
    }
    fn can_fast_zero(&self) -> Result<bool> {
        Ok(match self.node.driver() {
            Driver::Qcow2 => self.node.qcow2().is_some_and(|q| q.header.version >= 3),
            // imago's file driver may fall back to writing zeroes: no promise to make.
            Driver::Raw | Driver::File | Driver::Blkdebug | Driver::Plugin => false,
        })
    }
    fn can_fua(&self) -> Result<Support> {
        Ok(Support::Native)
    }
    fn can_multi_conn(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_cache(&self) -> Result<Support> {
        Ok(Support::Native)
    }
    fn can_extents(&self) -> Result<bool> {
        Ok(true)
    }

    fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        self.node.read(buf, offset)
    }

    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.node.write(buf, offset)?;
        if flags.contains(Flags::FUA) {
            self.node.flush()?;
        }
        Ok(())
    }

    fn flush(&self, _flags: Flags) -> Result<()> {
        self.node.flush()
    }

    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.node.trim(count, offset)?;
        if flags.contains(Flags::FUA) {
            self.node.flush()?;
        }
        Ok(())
    }

    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.node.zero(
            count,
            offset,
            flags.contains(Flags::MAY_TRIM),
            flags.contains(Flags::FAST_ZERO),
        )?;
        if flags.contains(Flags::FUA) {
            self.node.flush()?;
        }
        Ok(())
    }

    fn cache(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        self.node.cache(count, offset)
    }

    fn extents(&self, count: u64, offset: u64, flags: Flags, extents: &mut Extents) -> Result<()> {
        self.node
            .block_status(count, offset, flags.contains(Flags::REQ_ONE), extents)
    }

    fn allocation_depth(&self, count: u64, offset: u64, out: &mut Extents) -> Result<()> {
        self.node.allocation_depth(count, offset, out)
    }
}
