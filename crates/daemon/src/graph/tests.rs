//! The node graph: names, drivers, children, deletion rules, rollback, query output.

use std::sync::Arc;

use serde_json::{json, Value};

use super::*;
use sluice_qapi::runtime::{CompatPolicy, Input};

fn graph() -> Graph {
    Graph::new(DriverRegistry::builtin(Arc::new(BuiltinLoader)))
}

fn opts(v: Value) -> BlockdevOptions {
    let p = CompatPolicy::default();
    BlockdevOptions::from_args(&mut Input::json(&p), v.as_object().unwrap()).unwrap()
}

fn add(g: &mut Graph, v: Value) -> Result<(), String> {
    g.add(&opts(v)).map_err(|e| e.desc)
}

fn names(g: &Graph) -> Vec<String> {
    g.iter().map(|n| n.name.clone()).collect()
}

/// A file driver stand-in that opens an inline `file` child, like a format driver would.
struct ChildDriver;

impl NodeDriver for ChildDriver {
    fn open(
        &self,
        opts: &BlockdevOptions,
        _json: &Value,
        ctx: &mut OpenCtx<'_>,
    ) -> Result<OpenedNode, QmpError> {
        let crate::generated::BlockdevOptionsBranch::Raw(r) = &opts.u else {
            unreachable!()
        };
        let child = ctx.child("file", &r.file)?;
        if r.size == Some(-1) {
            return Err(QmpError::generic(
                "raw stand-in failed after opening its child",
            ));
        }
        let plugin = ctx.node(&child).unwrap().plugin().clone();
        Ok(OpenedNode::new(
            plugin,
            NodeInfo {
                filename: child,
                format: "raw".into(),
                ..NodeInfo::default()
            },
        ))
    }
}

fn graph_with_raw() -> Graph {
    let mut g = graph();
    g.drivers_mut()
        .register(BlockdevDriver::Raw, Arc::new(ChildDriver));
    g
}

#[test]
fn add_null_node_is_listed_with_qemu_shape() {
    let mut g = graph();
    add(
        &mut g,
        json!({"driver": "null-co", "node-name": "n0", "size": 4096}),
    )
    .unwrap();
    let info = g.query(true).unwrap();
    let v = info[0].to_qapi(&Output::default());
    assert_eq!(
        v,
        json!({
            "file": "null-co://", "node-name": "n0", "ro": false, "drv": "null-co",
            "backing_file_depth": 0, "active": true, "encrypted": false, "detect_zeroes": "off",
            "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
            "image": {"filename": "null-co://", "format": "null-co", "actual-size": 0, "virtual-size": 4096},
            "cache": {"writeback": true, "direct": false, "no-flush": false},
            "write_threshold": 0
        })
    );
}

#[test]
fn add_without_node_name_is_refused() {
    let mut g = graph();
    assert_eq!(
        add(&mut g, json!({"driver": "null-co"})).unwrap_err(),
        "'node-name' must be specified for the root node"
    );
}

#[test]
fn add_bad_or_duplicate_names_give_qemu_messages() {
    let mut g = graph();
    add(&mut g, json!({"driver": "null-co", "node-name": "n0"})).unwrap();
    let cases = [
        ("n0", "Duplicate nodes with node-name='n0'"),
        ("#x", "Invalid node-name: '#x'"),
        ("", "Invalid node-name: ''"),
        (
            "a-very-long-node-name-that-exceeds-31",
            "Node name too long",
        ),
    ];
    for (name, want) in cases {
        assert_eq!(
            add(&mut g, json!({"driver": "null-co", "node-name": name})).unwrap_err(),
            want
        );
    }
    assert_eq!(names(&g), vec!["n0"]);
}

#[test]
fn add_file_that_cannot_be_opened_names_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.img");
    let m = missing.to_str().unwrap();
    let mut g = graph();
    assert_eq!(
        add(
            &mut g,
            json!({"driver": "file", "node-name": "f", "filename": m})
        )
        .unwrap_err(),
        format!("Could not open '{m}': No such file or directory")
    );
    let d = dir.path().to_str().unwrap();
    assert_eq!(
        add(
            &mut g,
            json!({"driver": "file", "node-name": "f", "filename": d})
        )
        .unwrap_err(),
        format!("Could not open '{d}': Is a directory")
    );
    assert!(g.is_empty());
}

#[test]
fn add_file_node_reports_size_and_file_specific_info() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.img");
    std::fs::write(&p, vec![0u8; 65536]).unwrap();
    let mut g = graph();
    add(
        &mut g,
        json!({"driver": "file", "node-name": "f", "filename": p.to_str().unwrap(), "read-only": true}),
    )
    .unwrap();
    let v = g.query(false).unwrap()[0].to_qapi(&Output::default());
    assert_eq!(v["ro"], json!(true));
    assert_eq!(v["image"]["virtual-size"], json!(65536));
    assert_eq!(
        v["image"]["format-specific"],
        json!({"type": "file", "data": {}})
    );
    assert_eq!(v["image"]["dirty-flag"], json!(false));
}

#[test]
fn add_driver_not_registered_is_refused() {
    let mut g = Graph::new(DriverRegistry {
        drivers: HashMap::new(),
    });
    assert_eq!(
        add(
            &mut g,
            json!({"driver": "qcow2", "node-name": "q", "file": "x"})
        )
        .unwrap_err(),
        "Driver 'qcow2' is not supported by this build of sluice yet"
    );
}

#[test]
fn add_unsupported_options_are_refused_not_ignored() {
    let mut g = graph();
    let cases = [
        (
            json!({"driver": "null-co", "node-name": "a", "cache": {"direct": true}}),
            "cache.direct=on is not supported by sluice yet",
        ),
        (
            json!({"driver": "null-co", "node-name": "a", "detect-zeroes": "on"}),
            "detect-zeroes is not supported by sluice yet (only 'off')",
        ),
        (
            json!({"driver": "null-co", "node-name": "a", "force-share": true}),
            "force-share=on can only be used with read-only images",
        ),
        (
            json!({"driver": "null-co", "node-name": "a", "latency-ns": -1}),
            "latency-ns is invalid",
        ),
        (
            json!({"driver": "raw", "node-name": "a", "offset": 512, "file": "x"}),
            "offset and size are not supported by sluice's raw driver yet",
        ),
    ];
    for (v, want) in cases {
        assert_eq!(add(&mut g, v).unwrap_err(), want);
    }
}

#[test]
fn add_inline_child_gets_generated_name_and_is_deleted_with_parent() {
    let mut g = graph_with_raw();
    add(
        &mut g,
        json!({"driver": "raw", "node-name": "r0", "file": {"driver": "null-co"}}),
    )
    .unwrap();
    assert_eq!(names(&g), vec!["r0", "#block000"]);
    assert_eq!(
        g.get("r0").unwrap().children,
        vec![("file".to_string(), "#block000".to_string())]
    );
    assert_eq!(
        g.del("#block000").unwrap_err().desc,
        "Node #block000 is not owned by the monitor"
    );
    g.del("r0").unwrap();
    assert!(g.is_empty());
}

#[test]
fn add_child_by_reference_is_shared_and_protected() {
    let mut g = graph_with_raw();
    add(&mut g, json!({"driver": "null-co", "node-name": "n0"})).unwrap();
    add(
        &mut g,
        json!({"driver": "raw", "node-name": "r1", "file": "n0"}),
    )
    .unwrap();
    assert_eq!(g.del("n0").unwrap_err().desc, "Block device n0 is in use");
    g.del("r1").unwrap();
    assert_eq!(names(&g), vec!["n0"]);
    g.del("n0").unwrap();
}

#[test]
fn add_child_reference_to_missing_node_is_not_found() {
    let mut g = graph_with_raw();
    assert_eq!(
        add(
            &mut g,
            json!({"driver": "raw", "node-name": "r", "file": "nope"})
        )
        .unwrap_err(),
        "Cannot find device='nope' nor node-name='nope'"
    );
}

#[test]
fn add_failure_after_children_leaves_no_trace() {
    let mut g = graph_with_raw();
    assert_eq!(
        add(
            &mut g,
            json!({"driver": "raw", "node-name": "r", "size": -1, "file": {"driver": "null-co", "node-name": "inner"}})
        )
        .unwrap_err(),
        "raw stand-in failed after opening its child"
    );
    assert!(g.is_empty());
    // The name is free again.
    add(&mut g, json!({"driver": "null-co", "node-name": "inner"})).unwrap();
}

#[test]
fn add_writable_parent_refuses_read_only_child() {
    let mut g = graph_with_raw();
    add(
        &mut g,
        json!({"driver": "null-co", "node-name": "ro", "read-only": true}),
    )
    .unwrap();
    assert_eq!(
        add(
            &mut g,
            json!({"driver": "raw", "node-name": "r", "file": "ro"})
        )
        .unwrap_err(),
        "Block node is read-only"
    );
    add(
        &mut g,
        json!({"driver": "raw", "node-name": "r", "file": "ro", "read-only": true}),
    )
    .unwrap();
}

#[test]
fn inline_child_inherits_read_only() {
    let mut g = graph_with_raw();
    add(&mut g, json!({"driver": "raw", "node-name": "r", "read-only": true, "file": {"driver": "null-co"}})).unwrap();
    assert!(g.get("#block000").unwrap().read_only);
}

#[test]
fn del_missing_or_exported_node_is_refused() {
    let mut g = graph();
    assert_eq!(
        g.del("nope").unwrap_err().desc,
        "Failed to find node with node-name='nope'"
    );
    add(&mut g, json!({"driver": "null-co", "node-name": "n0"})).unwrap();
    g.get_mut("n0").unwrap().exports = 1;
    assert_eq!(g.del("n0").unwrap_err().desc, "Node n0 is in use");
}

#[test]
fn sluice_plugin_node_loads_builtin_plugins() {
    let mut g = graph();
    add(
        &mut g,
        json!({"driver": "sluice-plugin", "node-name": "m", "plugin": "memory", "params": ["size=1M"]}),
    )
    .unwrap();
    assert_eq!(g.get("m").unwrap().size().unwrap(), 1 << 20);
    assert_eq!(
        add(&mut g, json!({"driver": "sluice-plugin", "node-name": "x", "plugin": "nope"})).unwrap_err(),
        "Could not load plugin 'nope': unknown plugin 'nope' (built-in plugins: memory, file, null, pattern)"
    );
}
