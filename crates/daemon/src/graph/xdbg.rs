//! `x-debug-query-block-graph`: the graph as qemu-storage-daemon draws it.
//!
//! The shape is qsd's, exactly: every export is a `block-backend` node named `""` with a
//! `root` edge to its node; every graph node is a `block-driver` node; ids are handed out
//! in the order qemu first meets each one (exports oldest first, each with its root, then
//! the nodes oldest first, each with its children newest edge first), and both lists come
//! out reversed, because qemu prepends to them.
//!
//! The permissions are computed with qemu's default rules for the children sluice has
//! (exports take `consistent-read` and, when writable, `write`, and share all but
//! `resize`; a qcow2 node takes `consistent-read`, plus `write` and `resize` when
//! writable, of its file and shares neither; a raw node passes its parents' through; a
//! backing is read only if the parent reads, and shares writes when the parents do).
//! Block jobs are not drawn (qsd adds a `block-job` node per job with edges to the nodes
//! the job holds; sluice's jobs do not hold nodes through edges).

use std::collections::HashMap;

use super::Graph;
use crate::generated::{
    BlockPermission, BlockdevDriver, XDbgBlockGraph, XDbgBlockGraphEdge, XDbgBlockGraphNode,
    XDbgBlockGraphNodeType,
};

const CONSISTENT_READ: u8 = 1;
const WRITE: u8 = 2;
const WRITE_UNCHANGED: u8 = 4;
const RESIZE: u8 = 8;
const ALL: u8 = 15;

/// A permission set as qemu lists it: highest bit first.
fn perm_list(p: u8) -> Vec<BlockPermission> {
    [
        (RESIZE, BlockPermission::Resize),
        (WRITE_UNCHANGED, BlockPermission::WriteUnchanged),
        (WRITE, BlockPermission::Write),
        (CONSISTENT_READ, BlockPermission::ConsistentRead),
    ]
    .into_iter()
    .filter(|(bit, _)| p & bit != 0)
    .map(|(_, v)| v)
    .collect()
}

/// Numbers things in the order they are first met.
#[derive(Default)]
struct Ids {
    map: HashMap<String, u64>,
}

impl Ids {
    fn get(&mut self, key: String) -> u64 {
        let next = self.map.len() as u64 + 1;
        *self.map.entry(key).or_insert(next)
    }
}

impl Graph {
    /// The (perm, shared) a node's parents take of it, added up (all shared, nothing
    /// taken, when it has none). `exports`: (node, writable) of each export.
    fn cumulative(
        &self,
        name: &str,
        exports: &[(String, bool)],
        memo: &mut HashMap<String, (u8, u8)>,
    ) -> (u8, u8) {
        if let Some(v) = memo.get(name) {
            return *v;
        }
        let mut perm = 0;
        let mut shared = ALL;
        for (_, writable) in exports.iter().filter(|(n, _)| n == name) {
            let (p, s) = root_edge(*writable);
            perm |= p;
            shared &= s;
        }
        let parents: Vec<(String, String)> = self
            .nodes
            .iter()
            .flat_map(|p| {
                p.children
                    .iter()
                    .filter(|(_, c)| c == name)
                    .map(|(role, _)| (p.name.clone(), role.clone()))
            })
            .collect();
        for (parent, role) in parents {
            let (p, s) = self.edge(&parent, &role, exports, memo);
            perm |= p;
            shared &= s;
        }
        memo.insert(name.to_string(), (perm, shared));
        (perm, shared)
    }

    /// What `parent` takes and shares of its child in `role`.
    fn edge(
        &self,
        parent: &str,
        role: &str,
        exports: &[(String, bool)],
        memo: &mut HashMap<String, (u8, u8)>,
    ) -> (u8, u8) {
        let (perm, shared) = self.cumulative(parent, exports, memo);
        let Some(p) = self.get(parent) else {
            return (0, ALL);
        };
        match (role, p.driver) {
            ("backing", _) => {
                let s = if shared & WRITE != 0 {
                    WRITE | RESIZE
                } else {
                    0
                };
                (
                    perm & CONSISTENT_READ,
                    s | CONSISTENT_READ | WRITE_UNCHANGED,
                )
            }
            ("file", BlockdevDriver::Qcow2) => {
                let w = if p.read_only { 0 } else { WRITE | RESIZE };
                (perm | w | CONSISTENT_READ, shared & !(WRITE | RESIZE))
            }
            _ => (perm, shared),
        }
    }

    /// `x-debug-query-block-graph` (see the module doc). `exports`: (node, writable) of
    /// each export, oldest first.
    pub fn debug_graph(&self, exports: &[(String, bool)]) -> XDbgBlockGraph {
        let mut ids = Ids::default();
        let mut memo = HashMap::new();
        let mut nodes = Vec::new();
        let mut edges = Vec::new();
        for (i, (node, writable)) in exports.iter().enumerate() {
            let id = ids.get(format!("export {i}"));
            nodes.push(XDbgBlockGraphNode {
                id,
                r#type: XDbgBlockGraphNodeType::BlockBackend,
                name: String::new(),
            });
            let (perm, shared) = root_edge(*writable);
            edges.push(XDbgBlockGraphEdge {
                parent: id,
                child: ids.get(format!("node {node}")),
                name: "root".into(),
                perm: perm_list(perm),
                shared_perm: perm_list(shared),
            });
        }
        for n in &self.nodes {
            let id = ids.get(format!("node {}", n.name));
            nodes.push(XDbgBlockGraphNode {
                id,
                r#type: XDbgBlockGraphNodeType::BlockDriver,
                name: n.name.clone(),
            });
            for (role, child) in n.children.iter().rev() {
                let (perm, shared) = self.edge(&n.name, role, exports, &mut memo);
                edges.push(XDbgBlockGraphEdge {
                    parent: id,
                    child: ids.get(format!("node {child}")),
                    name: role.clone(),
                    perm: perm_list(perm),
                    shared_perm: perm_list(shared),
                });
            }
        }
        nodes.reverse();
        edges.reverse();
        XDbgBlockGraph { nodes, edges }
    }
}

/// An export's root edge.
fn root_edge(writable: bool) -> (u8, u8) {
    let w = if writable { WRITE } else { 0 };
    (
        CONSISTENT_READ | w,
        CONSISTENT_READ | WRITE | WRITE_UNCHANGED,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perm_list_is_highest_bit_first() {
        assert_eq!(
            perm_list(ALL),
            vec![
                BlockPermission::Resize,
                BlockPermission::WriteUnchanged,
                BlockPermission::Write,
                BlockPermission::ConsistentRead
            ]
        );
        assert!(perm_list(0).is_empty());
    }

    #[test]
    fn ids_count_from_one_in_first_met_order() {
        let mut ids = Ids::default();
        assert_eq!(ids.get("a".into()), 1);
        assert_eq!(ids.get("b".into()), 2);
        assert_eq!(ids.get("a".into()), 1);
    }
}
