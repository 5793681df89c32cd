//! `sluice daemon` driven by QEMU's own Python client library, `qemu.qmp` (from pip): the
//! client negotiates, runs every command, gets QEMU's error classes and messages, and
//! receives events — what a management tool written against qemu-storage-daemon would do.

use crate::support;

use serde_json::{json, Value};
use support::path_str;
use support::qmp::{run_qmp_python, QmpDaemon};

/// Runs every command through qemu.qmp and prints one JSON object of what it saw.
const SCENARIO: &str = r#"
import asyncio, json, sys
from qemu.qmp import QMPClient, ExecuteError

qmp_path, nbd_path, img = sys.argv[1:4]
out = {}

async def main():
    q = QMPClient('sluice-test')
    await q.connect(qmp_path)
    out['capabilities'] = list(q.greeting.QMP.capabilities)
    out['package'] = q.greeting.QMP.version['package']

    async def ok(cmd, args=None):
        return await q.execute(cmd, args)

    async def err(cmd, args=None):
        try:
            await q.execute(cmd, args)
        except ExecuteError as e:
            return [e.error_class, str(e)]
        return 'no error'

    async def event():
        e = await asyncio.wait_for(q.events.get(), 10)
        return [e['event'], e.get('data')]

    out['version'] = (await ok('query-version'))['package']
    out['commands'] = sorted(c['name'] for c in await ok('query-commands'))
    schema = await ok('query-qmp-schema')
    out['schema_commands'] = sorted(e['name'] for e in schema if e['meta-type'] == 'command')
    out['schema_events'] = sorted(e['name'] for e in schema if e['meta-type'] == 'event')

    out['add_file'] = await ok('blockdev-add', {'driver': 'file', 'node-name': 'f0', 'filename': img})
    out['add_null'] = await ok('blockdev-add', {'driver': 'null-co', 'node-name': 'n0', 'size': 4096})
    out['add_dup'] = await err('blockdev-add', {'driver': 'null-co', 'node-name': 'n0'})
    out['add_missing'] = await err('blockdev-add', {'driver': 'file', 'node-name': 'x', 'filename': img + '.nope'})
    out['add_bad_arg'] = await err('blockdev-add', {'driver': 'null-co', 'node-name': 'x', 'size': 'big'})
    nodes = await ok('query-named-block-nodes', {'flat': True})
    out['nodes'] = [[n['node-name'], n['drv'], n['ro'], n['image']['virtual-size']] for n in nodes]

    out['nbd_start'] = await ok('nbd-server-start', {'addr': {'type': 'unix', 'data': {'path': nbd_path}}})
    out['nbd_start_again'] = await err('nbd-server-start', {'addr': {'type': 'unix', 'data': {'path': nbd_path}}})
    out['export_add'] = await ok('block-export-add', {'type': 'nbd', 'id': 'e0', 'node-name': 'f0', 'writable': True})
    out['export_add_named'] = await ok('block-export-add', {'type': 'nbd', 'id': 'e1', 'node-name': 'n0', 'name': 'nul', 'description': 'zeroes'})
    out['export_dup_id'] = await err('block-export-add', {'type': 'nbd', 'id': 'e0', 'node-name': 'n0'})
    out['export_dup_name'] = await err('block-export-add', {'type': 'nbd', 'id': 'e2', 'node-name': 'n0', 'name': 'nul'})
    out['export_no_node'] = await err('block-export-add', {'type': 'nbd', 'id': 'e3', 'node-name': 'nope'})
    out['exports'] = await ok('query-block-exports')
    out['del_exported'] = await err('blockdev-del', {'node-name': 'f0'})
    out['export_del'] = await ok('block-export-del', {'id': 'e1'})
    out['event_export_del'] = await event()
    out['export_del_again'] = await err('block-export-del', {'id': 'e1'})
    out['nbd_stop'] = await ok('nbd-server-stop')
    out['event_nbd_stop'] = await event()
    out['nbd_stop_again'] = await err('nbd-server-stop')
    out['export_no_server'] = await err('block-export-add', {'type': 'nbd', 'id': 'e4', 'node-name': 'n0'})
    out['nbd_start_flat'] = await ok('nbd-server-start', {'addr': {'type': 'unix', 'path': nbd_path}})
    out['nbd_stop_flat'] = await ok('nbd-server-stop')
    out['del_file'] = await ok('blockdev-del', {'node-name': 'f0'})
    out['del_missing'] = await err('blockdev-del', {'node-name': 'f0'})
    out['unknown'] = await err('frobnicate')
    out['quit'] = await ok('quit')
    out['event_quit'] = await event()
    try:
        await q.disconnect()
    except EOFError:
        pass  # the daemon closed first, as QEMU does after quit


asyncio.run(main())
print(json.dumps(out))
"#;

#[test]
fn qemu_qmp_client_runs_every_command_and_sees_qemu_errors_and_events() {
    let mut d = QmpDaemon::sluice(&[]);
    let img = d.path("disk.img");
    std::fs::write(&img, vec![0u8; 65536]).unwrap();
    let nbd = d.path("nbd.sock");
    let out = run_qmp_python(
        SCENARIO,
        &[path_str(&d.qmp), path_str(&nbd), path_str(&img)],
    );
    let got: Value = serde_json::from_str(out.trim()).unwrap();
    let generic = |e: &str| json!(["GenericError", e]);
    let commands = json!([
        "block-commit",
        "block-dirty-bitmap-add",
        "block-dirty-bitmap-clear",
        "block-dirty-bitmap-disable",
        "block-dirty-bitmap-enable",
        "block-dirty-bitmap-merge",
        "block-dirty-bitmap-remove",
        "block-export-add",
        "block-export-del",
        "block-job-cancel",
        "block-job-change",
        "block-job-complete",
        "block-job-dismiss",
        "block-job-finalize",
        "block-job-pause",
        "block-job-resume",
        "block-job-set-speed",
        "block-latency-histogram-set",
        "block-set-write-threshold",
        "block-stream",
        "block_resize",
        "blockdev-add",
        "blockdev-backup",
        "blockdev-create",
        "blockdev-del",
        "blockdev-mirror",
        "blockdev-reopen",
        "blockdev-snapshot",
        "blockdev-snapshot-sync",
        "change-backing-file",
        "drive-mirror",
        "job-cancel",
        "job-complete",
        "job-dismiss",
        "job-finalize",
        "job-pause",
        "job-resume",
        "nbd-server-add",
        "nbd-server-remove",
        "nbd-server-start",
        "nbd-server-stop",
        "object-add",
        "object-del",
        "qmp_capabilities",
        "qom-get",
        "qom-set",
        "query-block",
        "query-block-exports",
        "query-block-jobs",
        "query-blockstats",
        "query-commands",
        "query-jobs",
        "query-named-block-nodes",
        "query-qmp-schema",
        "query-version",
        "quit",
        "transaction",
        "x-debug-query-block-graph",
    ]);
    let img_s = path_str(&img);
    let expected = json!({
        "capabilities": ["oob"],
        "package": "sluice 0.1.0",
        "version": "sluice 0.1.0",
        "commands": commands,
        "schema_commands": commands,
        "schema_events": [
            "BLOCK_EXPORT_DELETED",
            "BLOCK_JOB_CANCELLED",
            "BLOCK_JOB_COMPLETED",
            "BLOCK_JOB_ERROR",
            "BLOCK_JOB_PENDING",
            "BLOCK_JOB_READY",
            "BLOCK_WRITE_THRESHOLD",
            "JOB_STATUS_CHANGE",
            "SHUTDOWN"
        ],
        "add_file": {},
        "add_null": {},
        "add_dup": generic("Duplicate nodes with node-name='n0'"),
        "add_missing": generic(&format!("Could not open '{img_s}.nope': No such file or directory")),
        "add_bad_arg": generic("Invalid parameter type for 'size', expected: integer"),
        "nodes": [["n0", "null-co", false, 4096], ["f0", "file", false, 65536]],
        "nbd_start": {},
        "nbd_start_again": generic("NBD server already running"),
        "export_add": {},
        "export_add_named": {},
        "export_dup_id": generic("Block export id 'e0' is already in use"),
        "export_dup_name": generic("NBD server already has export named 'nul'"),
        "export_no_node": generic("Cannot find device='' nor node-name='nope'"),
        "exports": [
            {"id": "e1", "type": "nbd", "node-name": "n0", "shutting-down": false},
            {"id": "e0", "type": "nbd", "node-name": "f0", "shutting-down": false}
        ],
        "del_exported": generic("Node f0 is in use"),
        "export_del": {},
        "event_export_del": ["BLOCK_EXPORT_DELETED", {"id": "e1"}],
        "export_del_again": generic("Export 'e1' is not found"),
        "nbd_stop": {},
        "event_nbd_stop": ["BLOCK_EXPORT_DELETED", {"id": "e0"}],
        "nbd_stop_again": generic("NBD server not running"),
        "export_no_server": generic("NBD server not running"),
        "nbd_start_flat": {},
        "nbd_stop_flat": {},
        "del_file": {},
        "del_missing": generic("Failed to find node with node-name='f0'"),
        "unknown": ["CommandNotFound", "The command frobnicate has not been found"],
        "quit": {},
        "event_quit": ["SHUTDOWN", {"guest": false, "reason": "host-qmp-quit"}],
    });
    assert_eq!(got, expected);
    assert_eq!(d.wait().code(), Some(0));
}

/// Two clients at once: both negotiate on their own, both get the events.
const TWO_CLIENTS: &str = r#"
import asyncio, json, sys
from qemu.qmp import QMPClient

async def main(path):
    a, b = QMPClient('a'), QMPClient('b')
    await a.connect(path)
    await b.connect(path)
    await a.execute('blockdev-add', {'driver': 'null-co', 'node-name': 'n'})
    await b.execute('nbd-server-start', {'addr': {'type': 'unix', 'data': {'path': sys.argv[2]}}})
    await a.execute('block-export-add', {'type': 'nbd', 'id': 'x', 'node-name': 'n'})
    await b.execute('block-export-del', {'id': 'x'})
    ea = await asyncio.wait_for(a.events.get(), 10)
    eb = await asyncio.wait_for(b.events.get(), 10)
    print(json.dumps([ea['event'], ea['data'], eb['event'], eb['data']]))
    await a.disconnect()
    await b.disconnect()

asyncio.run(main(sys.argv[1]))
"#;

#[test]
fn qemu_qmp_two_clients_share_state_and_events() {
    let d = QmpDaemon::sluice(&[]);
    let out = run_qmp_python(
        TWO_CLIENTS,
        &[path_str(&d.qmp), path_str(&d.path("nbd.sock"))],
    );
    let got: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        got,
        json!(["BLOCK_EXPORT_DELETED", {"id": "x"}, "BLOCK_EXPORT_DELETED", {"id": "x"}])
    );
}
