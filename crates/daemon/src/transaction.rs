//! `transaction`: several bitmap commands and backups as one, all or nothing.
//!
//! Each action runs in order with the same checks and messages as its command; the first
//! that fails undoes, newest first, what the ones before it did, and its error is the
//! transaction's. Every action that changes something records how to undo it ([`Undo`]):
//! an added bitmap is removed (or the inconsistent one it replaced put back), a cleared or merged one gets its old bits back, an enabled
//! or disabled one its old state. Two kinds wait for the end instead, as QEMU's commit
//! phase: bitmap removals (so nothing has to be brought back; a later action of the same
//! transaction still sees the bitmap, where QEMU would say it is gone) and backups, whose
//! jobs start only once every action passed (their checks, job id included, run in order
//! with the others).
//!
//! `completion-mode: grouped` is refused: with QEMU's message for actions other than
//! backups, with sluice's own otherwise (jobs that fail or end as a group are not there).

use std::sync::Arc;

use sluice_image::bitmaps::{Bitmap, Use};
use sluice_image::DirtyMap;

use crate::generated::{
    ActionCompletionMode, BlockDirtyBitmap, TransactionAction, TransactionActionBranch,
    TransactionActionKind, TransactionProperties,
};
use crate::jobs::backup::{self, PreparedBackup};
use crate::state::{Daemon, State};
use crate::QmpError;

/// How to take back what one action did.
enum Undo {
    /// Remove the bitmap the action added.
    Added { node: String, name: String },
    /// Put back the inconsistent bitmap the action's add replaced.
    Replaced { node: String, old: Arc<Bitmap> },
    /// Give the bitmap these bits back.
    Bits(Arc<Bitmap>, DirtyMap),
    /// Give the bitmap this recording state back.
    Recording(Arc<Bitmap>, bool),
}

impl Undo {
    fn apply(self, st: &mut State) {
        match self {
            Undo::Added { node, name } => {
                if let Some(n) = st.graph.get(&node) {
                    n.bitmaps.remove(&name);
                }
            }
            Undo::Replaced { node, old } => {
                if let Some(n) = st.graph.get(&node) {
                    if let Some(new) = n.bitmaps.get(old.name()) {
                        n.bitmaps.replace(&new, old);
                    }
                }
            }
            Undo::Bits(b, before) => {
                b.map().clear();
                b.map().merge_from(&before);
            }
            Undo::Recording(b, on) => b.set_recording(on),
        }
    }
}

/// What the end of a transaction does once every action passed.
#[derive(Default)]
struct Commit {
    removals: Vec<BlockDirtyBitmap>,
    backups: Vec<PreparedBackup>,
}

/// A copy of a bitmap's bits.
fn copy_bits(b: &Bitmap) -> DirtyMap {
    let m = DirtyMap::new(b.map().size(), b.granularity());
    m.merge_from(b.map());
    m
}

fn action_kind(a: &TransactionAction) -> TransactionActionKind {
    a.u.tag()
}

/// The `transaction` command.
pub(crate) fn transaction(
    daemon: &Arc<Daemon>,
    st: &mut State,
    actions: Vec<TransactionAction>,
    properties: Option<TransactionProperties>,
) -> Result<(), QmpError> {
    let mode = properties
        .and_then(|p| p.completion_mode)
        .unwrap_or(ActionCompletionMode::Individual);
    if mode == ActionCompletionMode::Grouped {
        if let Some(a) = actions
            .iter()
            .find(|a| action_kind(a) != TransactionActionKind::BlockdevBackup)
        {
            return Err(QmpError::generic(format!(
                "Action '{}' does not support transaction property completion-mode = {mode}",
                action_kind(a)
            )));
        }
        return Err(QmpError::generic(
            "transaction: completion-mode 'grouped' is not supported by sluice yet (use \
             'individual', the default)",
        ));
    }
    let mut undo = Vec::new();
    let mut commit = Commit::default();
    for a in actions {
        if let Err(e) = run_action(st, a, &mut undo, &mut commit) {
            while let Some(u) = undo.pop() {
                u.apply(st);
            }
            return Err(e);
        }
    }
    for r in commit.removals {
        // Checked when the action ran; nothing since could make it busy.
        if let Err(e) = st.graph.bitmap_remove(&r) {
            tracing::warn!("transaction: removing bitmap '{}': {}", r.name, e.desc);
        }
    }
    for b in commit.backups {
        backup::start(daemon, st, b)?;
    }
    Ok(())
}

/// Runs one action: changes it makes go with their undo into `undo`, what waits for the
/// end into `commit`.
fn run_action(
    st: &mut State,
    a: TransactionAction,
    undo: &mut Vec<Undo>,
    commit: &mut Commit,
) -> Result<(), QmpError> {
    let graph = &st.graph;
    match a.u {
        TransactionActionBranch::Abort(_) => {
            Err(QmpError::generic("Transaction aborted using Abort action"))
        }
        TransactionActionBranch::BlockDirtyBitmapAdd(w) => {
            undo.push(match graph.bitmap_add(&w.data)? {
                None => Undo::Added {
                    node: w.data.node,
                    name: w.data.name,
                },
                Some(old) => Undo::Replaced {
                    node: w.data.node,
                    old,
                },
            });
            Ok(())
        }
        TransactionActionBranch::BlockDirtyBitmapRemove(w) => {
            let (_, b) = graph.bitmap(&w.data.node, &w.data.name)?;
            b.check(Use::Remove)
                .map_err(|e| QmpError::generic(e.to_string()))?;
            commit.removals.push(w.data);
            Ok(())
        }
        TransactionActionBranch::BlockDirtyBitmapClear(w) => {
            let before = graph.bitmap(&w.data.node, &w.data.name)?.1;
            let bits = copy_bits(&before);
            graph.bitmap_clear(&w.data)?;
            undo.push(Undo::Bits(before, bits));
            Ok(())
        }
        TransactionActionBranch::BlockDirtyBitmapEnable(w) => {
            let b = graph.bitmap(&w.data.node, &w.data.name)?.1;
            let was = b.is_recording();
            graph.bitmap_set_recording(&w.data, true)?;
            undo.push(Undo::Recording(b, was));
            Ok(())
        }
        TransactionActionBranch::BlockDirtyBitmapDisable(w) => {
            let b = graph.bitmap(&w.data.node, &w.data.name)?.1;
            let was = b.is_recording();
            graph.bitmap_set_recording(&w.data, false)?;
            undo.push(Undo::Recording(b, was));
            Ok(())
        }
        TransactionActionBranch::BlockDirtyBitmapMerge(w) => {
            let target = graph.bitmap(&w.data.node, &w.data.target)?.1;
            let bits = copy_bits(&target);
            graph.bitmap_merge(&w.data)?;
            undo.push(Undo::Bits(target, bits));
            Ok(())
        }
        TransactionActionBranch::BlockdevBackup(w) => {
            let p = backup::prepare(st, w.data)?;
            if commit.backups.iter().any(|b| b.id() == p.id()) {
                return Err(QmpError::generic(format!(
                    "Job ID '{}' already in use",
                    p.id()
                )));
            }
            commit.backups.push(p);
            Ok(())
        }
    }
}
