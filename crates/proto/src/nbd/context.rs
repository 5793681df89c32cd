//! Metadata contexts: the names sluice offers for `NBD_CMD_BLOCK_STATUS`, spelled once.
//!
//! A context is negotiated by name (`NBD_OPT_SET_META_CONTEXT`) and then referred to by the id
//! the server gave it, so the name only matters twice: when the server lists what it offers and
//! when a connection learns which answer each negotiated id wants. Both go through the
//! constants here, and [`MetaContext`] is the closed set of contexts the server can answer;
//! a name the handshake accepted but this enum does not know is simply never reported on.

/// `base:allocation`, the spec's context: extents flagged `NBD_STATE_HOLE` / `NBD_STATE_ZERO`.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// `qemu:allocation-depth`, qemu's context: each extent's status is the depth of the backing
/// layer that holds it (0 = unallocated in the whole chain), as `qemu-nbd -A` reports it.
pub const CONTEXT_QEMU_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// The namespace of qemu's dirty-bitmap contexts: `qemu:dirty-bitmap:NAME` reports the
/// export's bitmap NAME, each extent [`NBD_STATE_DIRTY`](super::consts::NBD_STATE_DIRTY) or
/// clean. Unlike the two fixed contexts above, these exist per export (qsd's
/// `block-export-add bitmaps: [...]`, qemu-nbd's `-B`).
pub const CONTEXT_QEMU_DIRTY_BITMAP: &str = "qemu:dirty-bitmap:";

/// The context name under which an export offers its dirty bitmap `bitmap`.
pub fn dirty_bitmap_context(bitmap: &str) -> String {
    format!("{CONTEXT_QEMU_DIRTY_BITMAP}{bitmap}")
}

/// The bitmap a `qemu:dirty-bitmap:NAME` context names (None for any other name, and for
/// the bare namespace, which a client may list but not select).
pub fn dirty_bitmap_name(context: &str) -> Option<&str> {
    context
        .strip_prefix(CONTEXT_QEMU_DIRTY_BITMAP)
        .filter(|n| !n.is_empty())
}

/// A metadata context sluice can answer block status for.
///
/// Deliberately exhaustive: a context added here must fail to compile in the server until it
/// says how to answer it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetaContext {
    /// [`CONTEXT_BASE_ALLOCATION`].
    BaseAllocation,
    /// [`CONTEXT_QEMU_ALLOCATION_DEPTH`].
    AllocationDepth,
}

impl MetaContext {
    /// The context with this exact name, if sluice knows it.
    pub fn from_name(name: &str) -> Option<MetaContext> {
        match name {
            CONTEXT_BASE_ALLOCATION => Some(MetaContext::BaseAllocation),
            CONTEXT_QEMU_ALLOCATION_DEPTH => Some(MetaContext::AllocationDepth),
            _ => None,
        }
    }

    /// The context's name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            MetaContext::BaseAllocation => CONTEXT_BASE_ALLOCATION,
            MetaContext::AllocationDepth => CONTEXT_QEMU_ALLOCATION_DEPTH,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_name_known_names_round_trip() {
        for ctx in [MetaContext::BaseAllocation, MetaContext::AllocationDepth] {
            assert_eq!(MetaContext::from_name(ctx.name()), Some(ctx));
        }
        assert_eq!(CONTEXT_BASE_ALLOCATION, "base:allocation");
        assert_eq!(CONTEXT_QEMU_ALLOCATION_DEPTH, "qemu:allocation-depth");
    }

    #[test]
    fn dirty_bitmap_name_round_trips_and_refuses_the_namespace() {
        assert_eq!(dirty_bitmap_context("b0"), "qemu:dirty-bitmap:b0");
        assert_eq!(dirty_bitmap_name("qemu:dirty-bitmap:b0"), Some("b0"));
        assert_eq!(dirty_bitmap_name("qemu:dirty-bitmap:"), None);
        assert_eq!(dirty_bitmap_name("qemu:allocation-depth"), None);
    }

    #[test]
    fn from_name_namespace_or_unknown_is_none() {
        for name in [
            "base:",
            "qemu:",
            "qemu:dirty-bitmap:b",
            "BASE:ALLOCATION",
            "",
        ] {
            assert_eq!(MetaContext::from_name(name), None, "{name:?}");
        }
    }
}
