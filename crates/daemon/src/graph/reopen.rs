//! `blockdev-reopen`: new options for a list of nodes, applied to all of them or to none.
//!
//! What can change is what qemu-storage-daemon 10.0.2 lets change and sluice can do: a
//! node's `read-only` (file, raw, qcow2 and blkdebug nodes through
//! [`sluice_image::Node::reopen`], which reopens descriptors and imago objects in place;
//! null and filter nodes by their flag alone), a qcow2 node's `backing` (another node, or
//! none; in memory, the header keeps its name), and `cache.no-flush`, `discard`,
//! `auto-read-only`. Every other option must keep its value: `Cannot change the option 'x'`,
//! compared leaf by leaf as qemu does (an option left out is not compared; `cache.direct`
//! and a `file` given inline to a node that did not create it are leaves too).
//!
//! The steps are qsd's, so its errors come in its order:
//! 1. every entry names an existing node (`node-name not specified`, `Failed to find node
//!    with node-name='x'`), before anything else is looked at;
//! 2. the queue: each entry's node, then, recursively, the children that *inherit from* it
//!    (created inline in its options or from its image header, [`super::Node::inherits_from`])
//!    unless the options point the child's role elsewhere. A child given inline gets those
//!    options; a child given by its own name, or not mentioned, keeps its own. Its
//!    `read-only` is its own option if set, else its parent's `read-only` if the parent's
//!    options set it, else (`backing` role) read-only, else what it was (kept options) or
//!    writable. A node listed twice is read-only if any entry says so (as qsd does);
//! 3. each queued node's options are checked against its current ones;
//! 4. permissions, with every node's new `read-only`: a node going read-only must have no
//!    writer (an export added writable, a job writing it, a writable parent that uses it
//!    as `file`): `Read-only block node 'x' cannot support read-write users`; a writable
//!    node's `file` child must be writable (`Block node is read-only` if it stays so); two
//!    format nodes over one file conflict as at `blockdev-add`;
//! 5. the changes, in an order that never has a writable node over a read-only child:
//!    nodes going read-write (and backing changes) children first, then nodes going
//!    read-only parents first. Each image node that changed makes the nodes using it as
//!    their backing read through its new imago object ([`sluice_image::Node::rebind_backing`]).
//!    If one fails (a lock another process holds, a file that cannot be opened), those
//!    already done are undone, and the graph (flags, edges, options) is only changed once
//!    all succeeded.
//!
//! Differs from qsd, on purpose:
//! - an empty list returns `{}` (qsd 10.0.2 aborts on an assertion, `bs_queue != NULL`);
//! - a `file` (or blkdebug `image`) naming another node is refused; qsd swaps the child,
//!   and a qcow2 node then reads its cached metadata against another file;
//! - nothing changes on a node a block job uses (qsd allows some of it, such as making a
//!   mirror's source read-only), except that a job's writer made read-only gets qsd's
//!   error, and a backing link a commit or stream froze gets qsd's;
//! - `throttle-group` of a throttle node cannot change; rbd and sluice-plugin nodes cannot
//!   change `read-only`; a qcow2 image with persistent bitmaps, and a node a snapshot or an
//!   active commit forwards elsewhere, are not reopened (see `sluice_image`'s reopen);
//! - values sluice refuses at `blockdev-add` (`cache.direct=on`, `detect-zeroes` other than
//!   off, a raw `offset` or `size`) are refused here with the same words.

use std::collections::HashMap;

use serde_json::Value;
use sluice_qapi::runtime::{Output, ToQapi};

use super::{image, not_found, Graph};
use crate::generated::{BlockdevDriver, BlockdevOptions};
use crate::QmpError;

/// What uses nodes from outside the graph: the daemon's exports and jobs.
#[derive(Debug, Default, Clone)]
pub struct Users {
    /// The node of each export added with `writable: true`.
    pub writable_exports: Vec<String>,
    /// The jobs not yet concluded.
    pub jobs: Vec<JobUse>,
}

/// A job, as reopen sees it.
#[derive(Debug, Clone)]
pub struct JobUse {
    /// QEMU's job type name (`mirror`, `commit`...).
    pub kind: String,
    /// The nodes it uses.
    pub nodes: Vec<String>,
    /// Those it writes.
    pub writes: Vec<String>,
}

impl JobUse {
    /// Commit and stream freeze the backing links of the chain they work on.
    fn freezes(&self, node: &str, backing: &str) -> bool {
        matches!(self.kind.as_str(), "commit" | "stream")
            && self.nodes.iter().any(|n| n == node)
            && self.nodes.iter().any(|n| n == backing)
    }
}

/// One node in the queue.
#[derive(Debug)]
struct Queued {
    name: String,
    /// New options; None: the node keeps its own (a child given by name or not mentioned).
    opts: Option<Value>,
    read_only: bool,
    /// `Some`: the backing changes to this node (None: none).
    backing: Option<Option<String>>,
}

/// A node whose image (or flag) changes in step 5.
#[derive(Debug, Clone)]
struct Change {
    name: String,
    old_ro: bool,
    new_ro: bool,
    old_backing: Option<String>,
    backing: Option<Option<String>>,
}

/// Options every driver lets change (or that sluice checks itself).
const GENERIC: [&str; 6] = [
    "driver",
    "read-only",
    "auto-read-only",
    "discard",
    "cache",
    "detect-zeroes",
];

/// The child roles a driver's options name, other than `backing`.
fn child_roles(driver: BlockdevDriver) -> &'static [&'static str] {
    match driver {
        BlockdevDriver::Raw
        | BlockdevDriver::Qcow2
        | BlockdevDriver::CopyOnRead
        | BlockdevDriver::Throttle => &["file"],
        BlockdevDriver::Blkdebug => &["image"],
        _ => &[],
    }
}

/// The first leaf of `new` (dotted, as qemu flattens options; `driver` first in each
/// object) whose value differs from `old`'s, if any.
fn first_difference(prefix: &str, new: &Value, old: Option<&Value>) -> Option<String> {
    match new {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort_by_key(|k| *k != "driver");
            keys.into_iter().find_map(|k| {
                let sub = old.and_then(|o| o.get(k));
                first_difference(&format!("{prefix}.{k}"), &m[k], sub)
            })
        }
        v => (Some(v) != old).then(|| prefix.to_string()),
    }
}

fn cannot_change(key: &str) -> QmpError {
    QmpError::generic(format!("Cannot change the option '{key}'"))
}

impl Graph {
    /// `blockdev-reopen` (see the module doc).
    pub fn reopen(&mut self, list: &[BlockdevOptions], users: &Users) -> Result<(), QmpError> {
        let mut entries = Vec::with_capacity(list.len());
        for o in list {
            let Some(name) = &o.node_name else {
                return Err(QmpError::generic("node-name not specified"));
            };
            if self.get(name).is_none() {
                return Err(QmpError::generic(format!(
                    "Failed to find node with node-name='{name}'"
                )));
            }
            entries.push((name.clone(), o.to_qapi(&Output::default())));
        }
        let mut queue = Vec::new();
        for (name, opts) in entries {
            self.enqueue(&mut queue, &name, Some(opts), None, None);
        }
        // Backing changes already checked, seen by the cycle check of the later ones (qsd
        // changes the links one by one in its transaction).
        let mut relinked = HashMap::new();
        for q in queue.iter_mut() {
            q.backing = self.check_options(q, users, &relinked)?;
            if let Some(b) = &q.backing {
                relinked.insert(q.name.clone(), b.clone());
            }
        }
        let ro: HashMap<&str, bool> = queue
            .iter()
            .map(|q| (q.name.as_str(), q.read_only))
            .collect();
        let final_ro = |n: &str| {
            ro.get(n)
                .copied()
                .unwrap_or_else(|| self.get(n).is_some_and(|n| n.read_only))
        };
        for q in &queue {
            self.check_permissions(q, &final_ro, users)?;
        }
        let changes = self.changes(&queue);
        self.check_jobs_and_images(&changes, users)?;
        self.apply(&changes)?;
        for q in queue {
            self.commit(q);
        }
        Ok(())
    }

    /// Step 2: queues `name` (merging with an earlier entry for it), then its inheriting
    /// children. `parent_ro`: the parent's `read-only` option, if its options set it;
    /// `role`: the role under the parent (None for a list entry).
    fn enqueue(
        &self,
        queue: &mut Vec<Queued>,
        name: &str,
        opts: Option<Value>,
        parent_ro: Option<bool>,
        role: Option<&str>,
    ) {
        let Some(node) = self.get(name) else { return };
        let own = opts.as_ref().unwrap_or(&node.options);
        let explicit = own.get("read-only").and_then(Value::as_bool);
        let read_only = match role {
            None => explicit.unwrap_or(false),
            Some("backing") => explicit.unwrap_or(true),
            Some(_) => explicit.or(parent_ro).unwrap_or(if opts.is_some() {
                false
            } else {
                node.read_only
            }),
        };
        let keeps_own = opts.is_none();
        // (role, child, its new options) of the inheriting children to reopen too.
        let children: Vec<(String, String, Option<Value>)> = node
            .children
            .iter()
            .filter(|(_, c)| self.get(c).and_then(|c| c.inherits_from.as_deref()) == Some(name))
            .filter_map(|(role, c)| {
                let child_opts = match own.get(role) {
                    _ if keeps_own => None,
                    None => None,
                    Some(Value::String(s)) if s == c => None,
                    Some(v @ Value::Object(_)) => Some(v.clone()),
                    // Another node, or null: this child is not reopened.
                    Some(_) => return None,
                };
                Some((role.clone(), c.clone(), child_opts))
            })
            .collect();
        match queue.iter_mut().find(|q| q.name == name) {
            Some(q) => {
                q.read_only |= read_only;
                if opts.is_some() {
                    q.opts = opts;
                }
            }
            None => queue.push(Queued {
                name: name.to_string(),
                opts,
                read_only,
                backing: None,
            }),
        }
        for (role, child, child_opts) in children {
            self.enqueue(queue, &child, child_opts, explicit, Some(&role));
        }
    }

    /// Step 3: the new options of one queued node against its current ones. Returns the
    /// backing change, if any.
    fn check_options(
        &self,
        q: &Queued,
        users: &Users,
        relinked: &HashMap<String, Option<String>>,
    ) -> Result<Option<Option<String>>, QmpError> {
        let Some(opts) = &q.opts else {
            return Ok(None);
        };
        let node = self.get(&q.name).expect("queued nodes exist");
        let name = &q.name;
        let map = opts.as_object().expect("options are an object");
        // qsd asks this of the node's current driver, before anything else.
        let backing_missing = node.driver == BlockdevDriver::Qcow2
            && !map.contains_key("backing")
            && (self.child(node, "backing").is_some()
                || node.opened.info.backing_filename.is_some());
        if backing_missing {
            return Err(QmpError::generic(format!(
                "backing is missing for '{name}'"
            )));
        }
        if opts.get("driver").and_then(Value::as_str) != Some(node.driver.as_str()) {
            return Err(cannot_change("driver"));
        }
        let roles = child_roles(node.driver);
        let own_keys: &[&str] = match node.driver {
            BlockdevDriver::Raw => &["offset", "size"],
            BlockdevDriver::Qcow2 => &["backing"],
            _ => &[],
        };
        for (key, v) in map {
            let k = key.as_str();
            if GENERIC.contains(&k) || roles.contains(&k) || own_keys.contains(&k) {
                continue;
            }
            if let Some(leaf) = first_difference(k, v, node.options.get(k)) {
                return Err(cannot_change(&leaf));
            }
        }
        // What sluice refuses at blockdev-add, refused here in the same words.
        if opts.pointer("/cache/direct") == Some(&Value::Bool(true)) {
            return Err(QmpError::generic(
                "cache.direct=on is not supported by sluice yet",
            ));
        }
        if opts
            .get("detect-zeroes")
            .is_some_and(|d| d != &Value::from("off"))
        {
            return Err(QmpError::generic(
                "detect-zeroes is not supported by sluice yet (only 'off')",
            ));
        }
        if node.driver == BlockdevDriver::Raw
            && (opts.get("offset").is_some_and(|o| o != &Value::from(0))
                || opts.get("size").is_some())
        {
            return Err(QmpError::generic(
                "offset and size are not supported by sluice's raw driver yet",
            ));
        }
        for role in roles {
            let current = node
                .children
                .iter()
                .find(|(r, _)| r == role)
                .map(|(_, c)| c.as_str());
            match map.get(*role) {
                Some(Value::String(s)) if Some(s.as_str()) == current => {}
                Some(Value::String(s)) if self.get(s).is_none() => return Err(not_found("", s)),
                Some(Value::String(s)) => {
                    return Err(QmpError::generic(format!(
                        "Cannot change the option '{role}': sluice does not replace the \
                         {role} child of a node ('{name}' keeps '{}', not '{s}')",
                        current.unwrap_or_default()
                    )))
                }
                Some(v @ Value::Object(_)) => {
                    let inherits = current
                        .and_then(|c| self.get(c))
                        .is_some_and(|c| c.inherits_from.as_deref() == Some(name));
                    if !inherits {
                        let leaf = first_difference(role, v, node.options.get(*role))
                            .unwrap_or_else(|| format!("{role}.driver"));
                        return Err(cannot_change(&leaf));
                    }
                }
                _ => {}
            }
        }
        if node.driver != BlockdevDriver::Qcow2 {
            return Ok(None);
        }
        let current = self.child(node, "backing").map(|b| b.name.clone());
        let new = match map.get("backing") {
            None => return Ok(None),
            Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(v) => {
                let inherits = current
                    .as_deref()
                    .and_then(|c| self.get(c))
                    .is_some_and(|c| c.inherits_from.as_deref() == Some(name));
                if inherits {
                    return Ok(None);
                }
                let leaf = first_difference("backing", v, node.options.get("backing"))
                    .unwrap_or_else(|| "backing.driver".into());
                return Err(cannot_change(&leaf));
            }
        };
        if new == current {
            return Ok(None);
        }
        if let Some(cur) = &current {
            if users.jobs.iter().any(|j| j.freezes(name, cur)) {
                return Err(QmpError::generic(format!(
                    "Cannot change frozen 'backing' link from '{name}' to '{cur}'"
                )));
            }
        }
        if let Some(b) = &new {
            let Some(bn) = self.get(b) else {
                return Err(not_found("", b));
            };
            if self.reaches(b, name, relinked) {
                return Err(QmpError::generic(format!(
                    "Making '{b}' a backing child of '{name}' would create a cycle"
                )));
            }
            if image::image_node(&bn.opened).is_none() {
                return Err(QmpError::generic(format!(
                    "Node '{b}' (driver {}) cannot be the backing child of '{name}': sluice's \
                     raw and qcow2 drivers read file, raw and qcow2 nodes only",
                    bn.driver.as_str()
                )));
            }
        }
        Ok(Some(new))
    }

    /// True if `to` is `from` or below it, through any child edge, with the backing links
    /// of `relinked` changed.
    fn reaches(&self, from: &str, to: &str, relinked: &HashMap<String, Option<String>>) -> bool {
        if from == to {
            return true;
        }
        let Some(n) = self.get(from) else {
            return false;
        };
        let backing = match relinked.get(from) {
            Some(b) => b.clone(),
            None => self.child(n, "backing").map(|b| b.name.clone()),
        };
        n.children
            .iter()
            .filter(|(r, _)| r != "backing")
            .map(|(_, c)| c.clone())
            .chain(backing)
            .any(|c| self.reaches(&c, to, relinked))
    }

    /// Step 4 for one queued node, with `final_ro` the new read-only flag of any node.
    fn check_permissions(
        &self,
        q: &Queued,
        final_ro: &dyn Fn(&str) -> bool,
        users: &Users,
    ) -> Result<(), QmpError> {
        let node = self.get(&q.name).expect("queued nodes exist");
        let name = &q.name;
        let uses_as_file =
            |p: &super::Node| p.children.iter().any(|(r, c)| r != "backing" && c == name);
        if !q.read_only {
            for (role, c) in &node.children {
                if role == "backing" || !final_ro(c) {
                    continue;
                }
                let was_ro = self.get(c).is_some_and(|c| c.read_only);
                return Err(if was_ro {
                    QmpError::generic("Block node is read-only")
                } else {
                    read_write_users(c)
                });
            }
            if !node.read_only {
                return Ok(());
            }
            // Format nodes over one file: qcow2 lets no one else write it, as at blockdev-add.
            if let Some((_, file)) = node.children.iter().find(|(r, _)| r == "file") {
                for p in self.parents(file, "file").filter(|p| p.name != *name) {
                    let qcow2 =
                        node.driver == BlockdevDriver::Qcow2 || p.driver == BlockdevDriver::Qcow2;
                    if !qcow2 {
                        continue;
                    }
                    let (requires, unshares) = if final_ro(&p.name) {
                        (name.as_str(), p.name.as_str())
                    } else {
                        (p.name.as_str(), name.as_str())
                    };
                    return Err(QmpError::generic(format!(
                        "Permission conflict on node '{file}': permissions 'write, resize' are \
                         both required by node '{requires}' (uses node '{file}' as 'file' \
                         child) and unshared by node '{unshares}' (uses node '{file}' as \
                         'file' child)."
                    )));
                }
            }
        } else if !node.read_only {
            let written = users.writable_exports.iter().any(|n| n == name)
                || users
                    .jobs
                    .iter()
                    .any(|j| j.writes.iter().any(|n| n == name))
                || self
                    .nodes
                    .iter()
                    .any(|p| uses_as_file(p) && !final_ro(&p.name));
            if written {
                return Err(read_write_users(name));
            }
        }
        Ok(())
    }

    /// The queued nodes whose flag or backing changes.
    fn changes(&self, queue: &[Queued]) -> Vec<Change> {
        queue
            .iter()
            .filter_map(|q| {
                let node = self.get(&q.name)?;
                let old_backing = self.child(node, "backing").map(|b| b.name.clone());
                (q.read_only != node.read_only || q.backing.is_some()).then(|| Change {
                    name: q.name.clone(),
                    old_ro: node.read_only,
                    new_ro: q.read_only,
                    old_backing,
                    backing: q.backing.clone(),
                })
            })
            .collect()
    }

    /// Step 4, last part: what sluice cannot do (see the module doc), asked before
    /// anything changes.
    fn check_jobs_and_images(&self, changes: &[Change], users: &Users) -> Result<(), QmpError> {
        for c in changes {
            let node = self.get(&c.name).expect("changed nodes exist");
            if let Some(j) = users.jobs.iter().find(|j| j.nodes.contains(&c.name)) {
                return Err(QmpError::generic(format!(
                    "Node '{}' is busy: block device is in use by block job: {}",
                    c.name, j.kind
                )));
            }
            match image::image_node(&node.opened) {
                Some(img) => {
                    img.check_reopen(c.new_ro).map_err(image::qmp_error)?;
                    for p in self.backing_users(&c.name) {
                        let pn = self.get(&p).expect("listed nodes exist");
                        if let Some(pi) = image::image_node(&pn.opened) {
                            pi.check_reopen(pn.read_only).map_err(image::qmp_error)?;
                        }
                    }
                }
                None if c.old_ro == c.new_ro => {}
                None => {
                    let flag_only = matches!(
                        node.driver,
                        BlockdevDriver::NullCo
                            | BlockdevDriver::NullAio
                            | BlockdevDriver::CopyOnRead
                            | BlockdevDriver::Throttle
                    );
                    if !flag_only {
                        return Err(QmpError::generic(format!(
                            "Node '{}' (driver {}) cannot be reopened read-only or \
                             read-write by sluice",
                            c.name,
                            node.driver.as_str()
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// The nodes that read `name` as their backing, directly or through other backings.
    fn backing_users(&self, name: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut todo = vec![name.to_string()];
        while let Some(n) = todo.pop() {
            for p in self.parents(&n, "backing") {
                if !out.contains(&p.name) {
                    out.push(p.name.clone());
                    todo.push(p.name.clone());
                }
            }
        }
        out
    }

    /// The height of the tree under a node (1 for a leaf): children sort before their
    /// parents by it.
    fn height(&self, name: &str) -> usize {
        self.get(name).map_or(0, |n| {
            1 + n
                .children
                .iter()
                .map(|(_, c)| self.height(c))
                .max()
                .unwrap_or(0)
        })
    }

    /// Step 5 for the images: every change in a safe order; on an error, those done are
    /// undone and the error returned.
    fn apply(&self, changes: &[Change]) -> Result<(), QmpError> {
        let mut up: Vec<&Change> = changes.iter().filter(|c| !c.new_ro || c.old_ro).collect();
        let mut down: Vec<&Change> = changes.iter().filter(|c| c.new_ro && !c.old_ro).collect();
        up.sort_by_key(|c| self.height(&c.name));
        down.sort_by_key(|c| std::cmp::Reverse(self.height(&c.name)));
        let order: Vec<&Change> = up.into_iter().chain(down).collect();
        for (i, c) in order.iter().enumerate() {
            if let Err(e) = self.apply_one(c.new_ro, c.backing.clone(), &c.name) {
                for done in order[..i].iter().rev() {
                    let back = done.backing.as_ref().map(|_| done.old_backing.clone());
                    if let Err(undo) = self.apply_one(done.old_ro, back, &done.name) {
                        tracing::error!(
                            "blockdev-reopen: undoing node '{}': {}",
                            done.name,
                            undo.desc
                        );
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// One node's image reopened, and the nodes above that read it as their backing
    /// rebound to its new imago object.
    fn apply_one(
        &self,
        read_only: bool,
        backing: Option<Option<String>>,
        name: &str,
    ) -> Result<(), QmpError> {
        let node = self.get(name).expect("changed nodes exist");
        let Some(img) = image::image_node(&node.opened) else {
            return Ok(());
        };
        let backing = backing.map(|b| {
            b.and_then(|b| self.get(&b))
                .and_then(|b| image::image_node(&b.opened))
        });
        img.reopen(read_only, backing).map_err(image::qmp_error)?;
        for p in self.backing_users(name) {
            if let Some(pi) = self.get(&p).and_then(|p| image::image_node(&p.opened)) {
                pi.rebind_backing().map_err(image::qmp_error)?;
            }
        }
        Ok(())
    }

    /// Step 5 for the graph, once every image changed: flags, options, backing edges and
    /// what `query-named-block-nodes` shows.
    fn commit(&mut self, q: Queued) {
        if let Some(n) = self.get_mut(&q.name) {
            n.read_only = q.read_only;
            if let Some(opts) = q.opts {
                n.cache.no_flush = opts
                    .pointer("/cache/no-flush")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                n.options = opts;
            }
        }
        if let Some(b) = q.backing {
            self.replace_child(&q.name, "backing", b.as_deref());
            if let Some(n) = self.get_mut(&q.name) {
                image::refresh_info_after_backing_change(&mut n.opened);
            }
        }
    }
}

/// qsd's refusal of a node made read-only under a writer.
fn read_write_users(name: &str) -> QmpError {
    QmpError::generic(format!(
        "Read-only block node '{name}' cannot support read-write users"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{BuiltinLoader, DriverRegistry};
    use serde_json::json;
    use sluice_qapi::runtime::{CompatPolicy, Input};

    fn opts(v: Value) -> BlockdevOptions {
        let p = CompatPolicy::default();
        BlockdevOptions::from_args(&mut Input::json(&p), v.as_object().unwrap()).unwrap()
    }

    fn reopen(g: &mut Graph, list: Value, users: &Users) -> Result<(), String> {
        let list: Vec<BlockdevOptions> =
            list.as_array().unwrap().iter().cloned().map(opts).collect();
        g.reopen(&list, users).map_err(|e| e.desc)
    }

    /// A graph with a raw node `r` over an inline file node, and a null node `n`.
    fn graph_with_raw(dir: &std::path::Path) -> (Graph, String) {
        let mut g = Graph::new(DriverRegistry::builtin(std::sync::Arc::new(BuiltinLoader)));
        let path = dir.join("r.raw");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let path = path.to_str().unwrap().to_string();
        g.add(&opts(json!({"driver": "raw", "node-name": "r",
                           "file": {"driver": "file", "filename": path}})))
            .unwrap();
        g.add(&opts(json!({"driver": "null-co", "node-name": "n"})))
            .unwrap();
        (g, path)
    }

    fn ro(g: &Graph, name: &str) -> bool {
        g.get(name).unwrap().read_only
    }

    #[test]
    fn reopen_read_only_takes_the_inline_child_along_and_back() {
        let dir = tempfile::tempdir().unwrap();
        let (mut g, path) = graph_with_raw(dir.path());
        let file = g.get("r").unwrap().children[0].1.clone();
        let users = Users::default();
        let r = |ro: bool| {
            json!([{"driver": "raw", "node-name": "r", "read-only": ro,
                                   "file": {"driver": "file", "filename": path}}])
        };
        reopen(&mut g, r(true), &users).unwrap();
        assert!(ro(&g, "r") && ro(&g, &file));
        reopen(&mut g, r(false), &users).unwrap();
        assert!(!ro(&g, "r") && !ro(&g, &file));
    }

    #[test]
    fn reopen_list_with_one_bad_entry_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut g, path) = graph_with_raw(dir.path());
        let users = Users::default();
        let err = reopen(
            &mut g,
            json!([{"driver": "null-co", "node-name": "n", "read-only": true},
                   {"driver": "raw", "node-name": "r", "read-only": true,
                    "file": {"driver": "file", "filename": path, "locking": "off"}}]),
            &users,
        )
        .unwrap_err();
        assert_eq!(err, "Cannot change the option 'locking'");
        assert!(!ro(&g, "n") && !ro(&g, "r"));
    }

    #[test]
    fn reopen_writer_read_only_is_refused_with_qsd_words() {
        let dir = tempfile::tempdir().unwrap();
        let (mut g, _) = graph_with_raw(dir.path());
        let users = Users {
            writable_exports: vec!["n".into()],
            jobs: Vec::new(),
        };
        let err = reopen(
            &mut g,
            json!([{"driver": "null-co", "node-name": "n", "read-only": true}]),
            &users,
        )
        .unwrap_err();
        assert_eq!(
            err,
            "Read-only block node 'n' cannot support read-write users"
        );
        assert!(!ro(&g, "n"));
    }

    #[test]
    fn reopen_names_missing_nodes_before_checking_options() {
        let dir = tempfile::tempdir().unwrap();
        let (mut g, _) = graph_with_raw(dir.path());
        let users = Users::default();
        let err = reopen(
            &mut g,
            json!([{"driver": "raw", "node-name": "n", "file": "x"},
                   {"driver": "null-co", "node-name": "nosuch"}]),
            &users,
        )
        .unwrap_err();
        assert_eq!(err, "Failed to find node with node-name='nosuch'");
        assert_eq!(reopen(&mut g, json!([]), &users), Ok(()));
    }

    #[test]
    fn first_difference_names_the_leaf_qemu_would() {
        let old = json!({"driver": "file", "filename": "/a"});
        assert_eq!(
            first_difference(
                "file",
                &json!({"driver": "file", "filename": "/b"}),
                Some(&old)
            ),
            Some("file.filename".into())
        );
        assert_eq!(
            first_difference(
                "file",
                &json!({"filename": "/a", "driver": "raw"}),
                Some(&old)
            ),
            Some("file.driver".into())
        );
        assert_eq!(
            first_difference("file", &json!({"driver": "file"}), Some(&old)),
            None
        );
        assert_eq!(
            first_difference("backing", &json!({"driver": "qcow2"}), Some(&json!("b"))),
            Some("backing.driver".into())
        );
        assert_eq!(
            first_difference("locking", &json!("off"), None),
            Some("locking".into())
        );
        assert_eq!(
            first_difference("locking", &json!("off"), Some(&json!("off"))),
            None
        );
    }
}
