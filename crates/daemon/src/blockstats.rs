//! `query-blockstats` and `block-latency-histogram-set`: the statistics the NBD server
//! counts ([`sluice_block::stats`]) in QEMU's `BlockStats` shape.
//!
//! Where the figures come from: every export's backend counts its requests twice, in its own
//! [`BlockStats`] and in its node's (so a node's figures add up every export that was ever on
//! it). Nodes below an export (a qcow2 node's `file`, its `backing`) are reached through the
//! format layer, not through an export, and report zeros, as qemu-storage-daemon's nodes do.
//! Jobs' copies (stream, commit, mirror, backup) are not counted either: QEMU keeps these
//! counters per BlockBackend, and a job's I/O goes through an anonymous BlockBackend of its
//! own that `query-blockstats` does not list, so its figures are the clients' I/O alone.
//!
//! Deliberate differences from qemu-storage-daemon 10.0, whose NBD server does no accounting:
//! its `query-blockstats` lists no devices (`[]`) and its nodes' counters stay zero except
//! `wr_highest_offset`. Here, without `query-nodes`, each export is a device (`device` is the
//! export id, with its node's `parent`/`backing` children); with `query-nodes`, each node
//! carries its exports' figures. `driver-specific` (the file driver's discard counts) is not
//! reported. `timed_stats` is always empty (QEMU fills it from a device's `stats-intervals`,
//! which qsd cannot set), `*_merged` always 0
//! (requests are never merged), and failed and invalid requests are not in the time or idle
//! figures (`account_failed`/`account_invalid` false, qsd's values). qsd has no
//! `block-latency-histogram-set` at all; QEMU's system emulator does, and its rules are
//! followed: only the kinds named change, no boundaries at all removes every histogram, and
//! boundaries must be strictly increasing and above zero.

use sluice_block::stats::{HistKind, Op, Snapshot};
use sluice_block::BlockStats;

use crate::generated::{
    BlockDeviceStats, BlockLatencyHistogramInfo, BlockLatencyHistogramSetArgs,
    BlockStats as QmpBlockStats,
};
use crate::graph::{Graph, Node};
use crate::state::{Daemon, State};
use crate::QmpError;
use sluice_proto::qmp::ErrorClass;
use sluice_server::metrics::{Collected, JobMetric, MetricsSource};

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn histogram(s: &Snapshot, kind: HistKind) -> Option<BlockLatencyHistogramInfo> {
    s.histogram(kind).map(|h| BlockLatencyHistogramInfo {
        boundaries: h.boundaries.clone(),
        bins: h.bins.clone(),
    })
}

/// QEMU's figures from a snapshot: reads are rd, writes and write zeroes wr (virtio-blk's
/// accounting), trims unmap.
pub fn device_stats(s: &Snapshot) -> BlockDeviceStats {
    let (r, w, z, t, f) = (
        s.op(Op::Read),
        s.op(Op::Write),
        s.op(Op::Zero),
        s.op(Op::Trim),
        s.op(Op::Flush),
    );
    BlockDeviceStats {
        rd_bytes: int(r.bytes),
        wr_bytes: int(w.bytes + z.bytes),
        zone_append_bytes: 0,
        unmap_bytes: int(t.bytes),
        rd_operations: int(r.ok),
        wr_operations: int(w.ok + z.ok),
        zone_append_operations: 0,
        flush_operations: int(f.ok),
        unmap_operations: int(t.ok),
        rd_total_time_ns: int(r.time_ns),
        wr_total_time_ns: int(w.time_ns + z.time_ns),
        zone_append_total_time_ns: 0,
        flush_total_time_ns: int(f.time_ns),
        unmap_total_time_ns: int(t.time_ns),
        wr_highest_offset: int(s.wr_highest_offset),
        rd_merged: 0,
        wr_merged: 0,
        zone_append_merged: 0,
        unmap_merged: 0,
        idle_time_ns: s.idle_time_ns.map(int),
        failed_rd_operations: int(r.failed),
        failed_wr_operations: int(w.failed + z.failed),
        failed_zone_append_operations: 0,
        failed_flush_operations: int(f.failed),
        failed_unmap_operations: int(t.failed),
        invalid_rd_operations: int(r.invalid),
        invalid_wr_operations: int(w.invalid + z.invalid),
        invalid_zone_append_operations: 0,
        invalid_flush_operations: int(f.invalid),
        invalid_unmap_operations: int(t.invalid),
        account_invalid: false,
        account_failed: false,
        timed_stats: Vec::new(),
        rd_latency_histogram: histogram(s, HistKind::Read),
        wr_latency_histogram: histogram(s, HistKind::Write),
        zone_append_latency_histogram: histogram(s, HistKind::ZoneAppend),
        flush_latency_histogram: histogram(s, HistKind::Flush),
    }
}

/// A node's entry: its `file` child as `parent` and, if `backing`, its backing chain.
fn node_entry(graph: &Graph, node: &Node, backing: bool, depth: usize) -> QmpBlockStats {
    // The graph has no cycles; the bound only guards against a corrupted one.
    let child = |role: &str| {
        (depth < 64)
            .then(|| graph.child(node, role))
            .flatten()
            .map(|c| Box::new(node_entry(graph, c, backing, depth + 1)))
    };
    QmpBlockStats {
        device: None,
        qdev: None,
        node_name: Some(node.name.clone()),
        stats: device_stats(&node.stats.snapshot()),
        parent: child("file"),
        backing: if backing { child("backing") } else { None },
    }
}

/// `query-blockstats`.
pub fn query(st: &State, query_nodes: bool) -> Vec<QmpBlockStats> {
    if query_nodes {
        return st
            .graph
            .iter()
            .map(|n| node_entry(&st.graph, n, false, 0))
            .collect();
    }
    st.exports
        .iter()
        .filter(|e| !e.shutting_down)
        .map(|e| {
            let node = st.graph.get(&e.node);
            let below = node.map(|n| node_entry(&st.graph, n, true, 0));
            QmpBlockStats {
                device: Some(e.id.clone()),
                qdev: None,
                node_name: Some(e.node.clone()),
                stats: device_stats(&e.named.backend.stats().snapshot()),
                parent: below.as_ref().and_then(|b| b.parent.clone()),
                backing: below.and_then(|b| b.backing),
            }
        })
        .collect()
}

/// The statistics `id` names: an export's id first, then a node's name.
fn find<'s>(st: &'s State, id: &str) -> Option<&'s BlockStats> {
    if let Some(e) = st.exports.iter().find(|e| e.id == id && !e.shutting_down) {
        return Some(e.named.backend.stats());
    }
    st.graph.get(id).map(|n| &*n.stats)
}

/// `block-latency-histogram-set`.
pub fn histogram_set(st: &State, args: BlockLatencyHistogramSetArgs) -> Result<(), QmpError> {
    let id = &args.id;
    let Some(stats) = find(st, id) else {
        return Err(QmpError::new(
            ErrorClass::DeviceNotFound,
            format!("Device '{id}' not found"),
        ));
    };
    let kinds = [
        (HistKind::Read, args.boundaries_read, "read"),
        (HistKind::Write, args.boundaries_write, "write"),
        (
            HistKind::ZoneAppend,
            args.boundaries_zap,
            "zone append write",
        ),
        (HistKind::Flush, args.boundaries_flush, "flush"),
    ];
    if args.boundaries.is_none() && kinds.iter().all(|k| k.1.is_none()) {
        for (kind, _, _) in kinds {
            stats.set_histogram(kind, None);
        }
        return Ok(());
    }
    // Checked before anything changes, so a bad list leaves every histogram as it was.
    let mut plan = Vec::new();
    for (kind, specific, what) in kinds {
        let Some(b) = specific.or_else(|| args.boundaries.clone()) else {
            continue;
        };
        if !strictly_increasing_above_zero(&b) {
            return Err(QmpError::generic(format!(
                "Device '{id}' set {what} boundaries fail"
            )));
        }
        plan.push((kind, b));
    }
    for (kind, b) in plan {
        stats.set_histogram(kind, Some(b));
    }
    Ok(())
}

/// What `/metrics` shows of a daemon: every export (by id) and node, the NBD server's
/// connections, and every job's progress. The state lock is held only to copy the figures.
impl MetricsSource for Daemon {
    fn collect(&self) -> Collected {
        let st = self.lock();
        Collected {
            exports: st
                .exports
                .iter()
                .map(|e| (e.id.clone(), e.named.backend.stats().snapshot()))
                .collect(),
            nodes: st
                .graph
                .iter()
                .map(|n| (n.name.clone(), n.stats.snapshot()))
                .collect(),
            connections: st.nbd.as_ref().map(|n| n.server.connection_stats()),
            jobs: st
                .jobs
                .iter()
                .map(|j| {
                    let i = j.info();
                    JobMetric {
                        id: i.id,
                        kind: i.r#type.as_str().to_string(),
                        status: i.status.as_str().to_string(),
                        done: i.current_progress.max(0) as u64,
                        total: i.total_progress.max(0) as u64,
                    }
                })
                .collect(),
        }
    }
}

fn strictly_increasing_above_zero(b: &[u64]) -> bool {
    let mut prev = 0;
    b.iter().all(|&x| {
        let ok = x > prev;
        prev = x;
        ok
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_block::stats::Outcome;

    #[test]
    fn zero_writes_count_as_writes_and_trims_as_unmap() {
        let s = BlockStats::new();
        s.record(Op::Write, 100, 100, 0, 10, Outcome::Ok);
        s.record(Op::Zero, 50, 1000, 0, 10, Outcome::Ok);
        s.record(Op::Trim, 7, 7, 0, 10, Outcome::Ok);
        let d = device_stats(&s.snapshot());
        assert_eq!(
            (d.wr_bytes, d.wr_operations, d.wr_total_time_ns),
            (150, 2, 20)
        );
        assert_eq!((d.unmap_bytes, d.unmap_operations), (7, 1));
        assert_eq!(d.wr_highest_offset, 1000);
        assert!(d.idle_time_ns.is_some());
    }

    #[test]
    fn boundaries_must_increase_from_above_zero() {
        assert!(strictly_increasing_above_zero(&[1, 2, 30]));
        assert!(strictly_increasing_above_zero(&[]));
        assert!(!strictly_increasing_above_zero(&[0, 5]));
        assert!(!strictly_increasing_above_zero(&[5, 5]));
        assert!(!strictly_increasing_above_zero(&[9, 3]));
    }
}
