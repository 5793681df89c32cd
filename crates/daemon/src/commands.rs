//! The commands: one method of the generated [`Handlers`] trait each.
//!
//! Arguments arrive checked and typed (the generated dispatcher has already produced QEMU's
//! errors for missing, unexpected and mistyped members), so each method is the command's
//! meaning only: it runs with the daemon's state locked, changes it, and returns the typed
//! result. `nbd-server-start` and `query-qmp-schema` are `'gen': false` in the schema and read
//! their arguments here: the first to accept both address forms, the second to serve the
//! prebuilt introspection table.

use std::sync::{Arc, OnceLock};

use serde_json::{Map, Value};

use crate::generated::{
    dispatch, BlockCommitArgs, BlockDeviceInfo, BlockDirtyBitmap, BlockDirtyBitmapAdd,
    BlockDirtyBitmapMerge, BlockDirtyBitmapOrStr, BlockExportDelArgs, BlockExportInfo,
    BlockExportOptions, BlockExportOptionsBranch, BlockExportOptionsNbd, BlockExportRemoveMode,
    BlockExportType, BlockJobCancelArgs, BlockJobCompleteArgs, BlockJobDismissArgs,
    BlockJobFinalizeArgs, BlockJobInfo, BlockJobPauseArgs, BlockJobResumeArgs,
    BlockJobSetSpeedArgs, BlockLatencyHistogramSetArgs, BlockResizeArgs, BlockStats,
    BlockStreamArgs, BlockdevCreateArgs, BlockdevDelArgs, BlockdevOptions, CommandInfo, Handlers,
    JobCancelArgs, JobCompleteArgs, JobDismissArgs, JobFinalizeArgs, JobInfo, JobPauseArgs,
    JobResumeArgs, JobStatus, NbdServerAddOptions, NbdServerOptions, NbdServerOptionsLegacy,
    NbdServerRemoveArgs, ObjectDelArgs, ObjectOptions, QMPCapability, QmpCapabilitiesArgs,
    QomGetArgs, QomSetArgs, QueryBlockstatsArgs, QueryNamedBlockNodesArgs, ShutdownCause,
    SocketAddress, SocketAddressBranch, SocketAddressLegacyBranch, VersionInfo, COMMANDS,
    INTROSPECTION,
};
use crate::generated::{BlockdevSnapshotArgs, BlockdevSnapshotSyncArgs};
use crate::jobs::commands as jobs;
use crate::jobs::{commit, create, stream};
use crate::state::{version, Daemon, State};
use crate::QmpError;
use sluice_proto::qmp::{ErrorClass, Request};
use sluice_qapi::runtime::Input;

/// Per-monitor protocol state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MonitorState {
    /// `qmp_capabilities` succeeded: command mode.
    pub negotiated: bool,
    /// Out-of-band execution was enabled.
    pub oob: bool,
    /// The last event the last command caused: events up to it go before its reply.
    pub events_before_reply: u64,
}

impl Daemon {
    /// Runs one command for a monitor: QEMU's checks (negotiation mode, unknown command,
    /// compatibility policy, out-of-band), then the typed handler with the state locked.
    pub fn execute(
        self: &Arc<Self>,
        req: &Request,
        mon: &mut MonitorState,
    ) -> Result<Value, QmpError> {
        let r = self.execute_checked(req, mon);
        log_command(req, &r);
        r
    }

    fn execute_checked(
        self: &Arc<Self>,
        req: &Request,
        mon: &mut MonitorState,
    ) -> Result<Value, QmpError> {
        if !mon.negotiated && req.command != "qmp_capabilities" {
            return Err(QmpError::command_not_found(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ));
        }
        let Some(def) = COMMANDS.iter().find(|c| c.name == req.command) else {
            return Err(QmpError::command_not_found(format!(
                "The command {} has not been found",
                req.command
            )));
        };
        self.policy().check_input(
            def.features,
            "command",
            def.name,
            ErrorClass::CommandNotFound,
        )?;
        if req.oob && !def.allow_oob {
            return Err(QmpError::generic(format!(
                "The command {} does not support OOB",
                req.command
            )));
        }
        let mut st = self.lock();
        let mut inp = Input::json(self.policy());
        let mut session = Session {
            daemon: self,
            state: &mut st,
            mon,
        };
        let r = dispatch(
            &mut session,
            def.name,
            &req.arguments,
            &mut inp,
            self.output(),
        )
        .expect("every command in COMMANDS has a dispatch arm");
        // Still locked: a job this command started has not emitted anything yet (job threads
        // take the lock before they begin), so this is exactly the command's own events.
        mon.events_before_reply = self.events().last_seq();
        r
    }
}

/// Argument names whose values are secrets, left out of the log: QEMU's `password` and
/// `*-secret` members, and `data` of a `secret` object.
fn is_secret_key(key: &str, parent: &Map<String, Value>) -> bool {
    key == "password"
        || key == "passphrase"
        || key.ends_with("-secret")
        || key.ends_with("_secret")
        || (key == "data" && parent.get("qom-type").and_then(Value::as_str) == Some("secret"))
}

/// `args` with every secret value replaced by `"<redacted>"`, at any depth.
pub fn redact(args: &Value) -> Value {
    match args {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| {
                    let v = if is_secret_key(k, m) {
                        Value::String("<redacted>".into())
                    } else {
                        redact(v)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(redact).collect()),
        v => v.clone(),
    }
}

/// One `qmp_command` operator event per command: its name, its arguments with secrets
/// redacted, and its outcome (`ok`, or the error class and text).
fn log_command(req: &Request, r: &Result<Value, QmpError>) {
    if !tracing::enabled!(target: sluice_server::nbd::EVENTS, tracing::Level::INFO) {
        return;
    }
    let args = redact(&Value::Object(req.arguments.clone())).to_string();
    match r {
        Ok(_) => tracing::info!(
            target: sluice_server::nbd::EVENTS,
            event = "qmp_command",
            command = %req.command,
            arguments = %args,
            outcome = "ok"
        ),
        Err(e) => tracing::info!(
            target: sluice_server::nbd::EVENTS,
            event = "qmp_command",
            command = %req.command,
            arguments = %args,
            outcome = "error",
            class = e.class.as_str(),
            error = %e.desc
        ),
    }
}

/// One command's view of the daemon: its state (locked) and the issuing monitor.
pub(crate) struct Session<'a> {
    pub daemon: &'a Arc<Daemon>,
    pub state: &'a mut State,
    pub mon: &'a mut MonitorState,
}

/// The introspection table, parsed once.
pub fn introspection() -> &'static Value {
    static V: OnceLock<Value> = OnceLock::new();
    V.get_or_init(|| serde_json::from_str(INTROSPECTION).expect("build.rs writes valid JSON"))
}

/// Converts `nbd-server-start`'s legacy address to the flat one.
pub fn from_legacy(opts: NbdServerOptionsLegacy) -> NbdServerOptions {
    let addr = SocketAddress {
        u: match opts.addr.u {
            SocketAddressLegacyBranch::Inet(w) => SocketAddressBranch::Inet(w.data),
            SocketAddressLegacyBranch::Unix(w) => SocketAddressBranch::Unix(w.data),
        },
    };
    NbdServerOptions {
        handshake_max_seconds: opts.handshake_max_seconds,
        tls_creds: opts.tls_creds,
        tls_authz: opts.tls_authz,
        max_connections: opts.max_connections,
        addr,
    }
}

/// True if `args.addr` is the flat form: no `data`, and some member besides `type`.
fn is_flat_address(args: &Map<String, Value>) -> bool {
    match args.get("addr") {
        Some(Value::Object(a)) => !a.contains_key("data") && a.keys().any(|k| k != "type"),
        _ => false,
    }
}

impl Handlers for Session<'_> {
    fn qmp_capabilities(&mut self, args: QmpCapabilitiesArgs) -> Result<(), QmpError> {
        if self.mon.negotiated {
            return Err(QmpError::command_not_found(
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        for cap in args.enable.unwrap_or_default() {
            match cap {
                QMPCapability::Oob => self.mon.oob = true,
            }
        }
        self.mon.negotiated = true;
        Ok(())
    }

    fn query_version(&mut self) -> Result<VersionInfo, QmpError> {
        Ok(version())
    }

    fn query_commands(&mut self) -> Result<Vec<CommandInfo>, QmpError> {
        Ok(COMMANDS
            .iter()
            .map(|c| CommandInfo {
                name: c.name.to_string(),
            })
            .collect())
    }

    fn quit(&mut self) -> Result<(), QmpError> {
        self.daemon
            .shutdown_locked(self.state, ShutdownCause::HostQmpQuit);
        Ok(())
    }

    fn query_qmp_schema(
        &mut self,
        args: &Map<String, Value>,
        inp: &mut Input<'_>,
    ) -> Result<Value, QmpError> {
        inp.check_unexpected(args, |_| false)?;
        let mut v = introspection().clone();
        if self.daemon.output().hide_deprecated {
            // SchemaInfoEnum.values is a deprecated member of this command's output.
            if let Value::Array(entries) = &mut v {
                for e in entries {
                    if e.get("meta-type").and_then(Value::as_str) == Some("enum") {
                        if let Some(o) = e.as_object_mut() {
                            o.shift_remove("values");
                        }
                    }
                }
            }
        }
        Ok(v)
    }

    fn blockdev_add(&mut self, args: BlockdevOptions) -> Result<(), QmpError> {
        self.state.graph.add(&args)
    }

    fn blockdev_del(&mut self, args: BlockdevDelArgs) -> Result<(), QmpError> {
        let name = &args.node_name;
        if let (Some(_), Some(j)) = (self.state.graph.get(name), self.state.jobs.using_node(name)) {
            return Err(QmpError::generic(format!(
                "Node '{name}' is busy: block device is in use by block job: {}",
                j.job_type
            )));
        }
        self.state.graph.del(name)
    }

    fn blockdev_reopen(
        &mut self,
        args: crate::generated::BlockdevReopenArgs,
    ) -> Result<(), QmpError> {
        use crate::graph::reopen::{JobUse, Users};
        let users = Users {
            writable_exports: self
                .state
                .exports
                .iter()
                .filter(|e| e.named.writable && !e.shutting_down)
                .map(|e| e.node.clone())
                .collect(),
            jobs: self
                .state
                .jobs
                .iter()
                .filter(|j| !matches!(j.status(), JobStatus::Concluded | JobStatus::Null))
                .map(|j| JobUse {
                    kind: j.job_type.to_string(),
                    nodes: j.nodes().to_vec(),
                    writes: j.writes().to_vec(),
                })
                .collect(),
        };
        self.state.graph.reopen(&args.options, &users)
    }

    fn block_dirty_bitmap_add(&mut self, args: BlockDirtyBitmapAdd) -> Result<(), QmpError> {
        self.state.graph.bitmap_add(&args).map(|_| ())
    }

    fn block_dirty_bitmap_remove(&mut self, args: BlockDirtyBitmap) -> Result<(), QmpError> {
        self.state.graph.bitmap_remove(&args)
    }

    fn block_dirty_bitmap_clear(&mut self, args: BlockDirtyBitmap) -> Result<(), QmpError> {
        self.state.graph.bitmap_clear(&args)
    }

    fn block_dirty_bitmap_enable(&mut self, args: BlockDirtyBitmap) -> Result<(), QmpError> {
        self.state.graph.bitmap_set_recording(&args, true)
    }

    fn block_dirty_bitmap_disable(&mut self, args: BlockDirtyBitmap) -> Result<(), QmpError> {
        self.state.graph.bitmap_set_recording(&args, false)
    }

    fn block_dirty_bitmap_merge(&mut self, args: BlockDirtyBitmapMerge) -> Result<(), QmpError> {
        self.state.graph.bitmap_merge(&args)
    }

    fn query_blockstats(&mut self, args: QueryBlockstatsArgs) -> Result<Vec<BlockStats>, QmpError> {
        Ok(crate::blockstats::query(
            self.state,
            args.query_nodes.unwrap_or(false),
        ))
    }

    fn block_latency_histogram_set(
        &mut self,
        args: BlockLatencyHistogramSetArgs,
    ) -> Result<(), QmpError> {
        crate::blockstats::histogram_set(self.state, args)
    }

    fn query_named_block_nodes(
        &mut self,
        args: QueryNamedBlockNodesArgs,
    ) -> Result<Vec<BlockDeviceInfo>, QmpError> {
        self.state.graph.query(args.flat.unwrap_or(false))
    }

    fn nbd_server_start(
        &mut self,
        args: &Map<String, Value>,
        inp: &mut Input<'_>,
    ) -> Result<Value, QmpError> {
        let opts = if is_flat_address(args) {
            NbdServerOptions::from_args(inp, args)?
        } else {
            from_legacy(NbdServerOptionsLegacy::from_args(inp, args)?)
        };
        self.daemon.nbd_start_locked(self.state, &opts)?;
        Ok(Value::Object(Map::new()))
    }

    fn object_add(&mut self, args: ObjectOptions) -> Result<(), QmpError> {
        self.daemon.objects().add(&args)
    }

    fn object_del(&mut self, args: ObjectDelArgs) -> Result<(), QmpError> {
        self.daemon.objects().del(&args.id)
    }

    fn qom_get(&mut self, args: QomGetArgs) -> Result<serde_json::Value, QmpError> {
        self.daemon.objects().qom_get(&args.path, &args.property)
    }

    fn qom_set(&mut self, args: QomSetArgs) -> Result<(), QmpError> {
        self.daemon
            .objects()
            .qom_set(&args.path, &args.property, &args.value)
    }

    fn nbd_server_stop(&mut self) -> Result<(), QmpError> {
        self.daemon.nbd_stop_locked(self.state)
    }

    fn block_export_add(&mut self, args: BlockExportOptions) -> Result<(), QmpError> {
        self.daemon.export_add_locked(self.state, &args)
    }

    fn block_export_del(&mut self, args: BlockExportDelArgs) -> Result<(), QmpError> {
        self.daemon.export_del_locked(
            self.state,
            &args.id,
            args.mode.unwrap_or(BlockExportRemoveMode::Safe),
        )
    }

    fn query_block_exports(&mut self) -> Result<Vec<BlockExportInfo>, QmpError> {
        Ok(self
            .state
            .exports
            .iter()
            .rev()
            .map(|e| BlockExportInfo {
                id: e.id.clone(),
                r#type: BlockExportType::Nbd,
                node_name: e.node.clone(),
                shutting_down: e.shutting_down,
            })
            .collect())
    }

    fn nbd_server_add(&mut self, args: NbdServerAddOptions) -> Result<(), QmpError> {
        // As QEMU: the export name defaults to the device, and is also the export's id.
        let name = args.name.unwrap_or_else(|| args.device.clone());
        let opts = BlockExportOptions {
            id: name.clone(),
            node_name: args.device,
            writable: args.writable,
            u: BlockExportOptionsBranch::Nbd(BlockExportOptionsNbd {
                name: Some(name),
                description: args.description,
                bitmaps: args.bitmap.map(|b| vec![BlockDirtyBitmapOrStr::Local(b)]),
                allocation_depth: None,
            }),
        };
        self.daemon.export_add_locked(self.state, &opts)
    }

    fn nbd_server_remove(&mut self, args: NbdServerRemoveArgs) -> Result<(), QmpError> {
        let Some(id) = self
            .state
            .exports
            .iter()
            .find(|e| e.name == args.name && !e.shutting_down)
            .map(|e| e.id.clone())
        else {
            return Err(QmpError::generic(format!(
                "Export '{}' is not found",
                args.name
            )));
        };
        self.daemon.export_del_locked(
            self.state,
            &id,
            args.mode.unwrap_or(BlockExportRemoveMode::Safe),
        )
    }

    // Jobs (crates/daemon/src/jobs): `true` selects the block-job-* flavour of errors.

    fn query_jobs(&mut self) -> Result<Vec<JobInfo>, QmpError> {
        Ok(jobs::query_jobs(self.state))
    }

    fn job_pause(&mut self, args: JobPauseArgs) -> Result<(), QmpError> {
        jobs::pause(self.state, &args.id, false)
    }

    fn job_resume(&mut self, args: JobResumeArgs) -> Result<(), QmpError> {
        jobs::resume(self.state, &args.id, false)
    }

    fn job_cancel(&mut self, args: JobCancelArgs) -> Result<(), QmpError> {
        jobs::cancel(self.state, &args.id, false, true)
    }

    fn job_complete(&mut self, args: JobCompleteArgs) -> Result<(), QmpError> {
        jobs::complete(self.state, &args.id, false)
    }

    fn job_dismiss(&mut self, args: JobDismissArgs) -> Result<(), QmpError> {
        jobs::dismiss(self.state, &args.id, false)
    }

    fn job_finalize(&mut self, args: JobFinalizeArgs) -> Result<(), QmpError> {
        jobs::finalize(self.state, &args.id, false)
    }

    fn query_block_jobs(&mut self) -> Result<Vec<BlockJobInfo>, QmpError> {
        Ok(jobs::query_block_jobs(self.state))
    }

    fn block_job_set_speed(&mut self, args: BlockJobSetSpeedArgs) -> Result<(), QmpError> {
        jobs::set_speed(self.state, &args.device, args.speed)
    }

    fn block_job_cancel(&mut self, args: BlockJobCancelArgs) -> Result<(), QmpError> {
        jobs::cancel(self.state, &args.device, true, args.force.unwrap_or(false))
    }

    fn block_job_pause(&mut self, args: BlockJobPauseArgs) -> Result<(), QmpError> {
        jobs::pause(self.state, &args.device, true)
    }

    fn block_job_resume(&mut self, args: BlockJobResumeArgs) -> Result<(), QmpError> {
        jobs::resume(self.state, &args.device, true)
    }

    fn block_job_complete(&mut self, args: BlockJobCompleteArgs) -> Result<(), QmpError> {
        jobs::complete(self.state, &args.device, true)
    }

    fn block_job_finalize(&mut self, args: BlockJobFinalizeArgs) -> Result<(), QmpError> {
        jobs::finalize(self.state, &args.id, true)
    }

    fn block_job_dismiss(&mut self, args: BlockJobDismissArgs) -> Result<(), QmpError> {
        jobs::dismiss(self.state, &args.id, true)
    }

    fn block_job_change(
        &mut self,
        args: crate::generated::BlockJobChangeOptions,
    ) -> Result<(), QmpError> {
        jobs::change(self.state, &args)
    }

    fn block_stream(&mut self, args: BlockStreamArgs) -> Result<(), QmpError> {
        stream::block_stream(self.daemon, self.state, args)
    }

    fn block_commit(&mut self, args: BlockCommitArgs) -> Result<(), QmpError> {
        commit::block_commit(self.daemon, self.state, args)
    }

    fn blockdev_create(&mut self, args: BlockdevCreateArgs) -> Result<(), QmpError> {
        create::blockdev_create(self.daemon, self.state, args)
    }

    fn block_resize(&mut self, args: BlockResizeArgs) -> Result<(), QmpError> {
        let device = args.device.as_deref().unwrap_or("");
        let node = args.node_name.as_deref().unwrap_or("");
        // qsd has no devices: only a node name finds something.
        if self.state.graph.get(node).is_none() {
            return Err(crate::graph::not_found(device, node));
        }
        if args.size < 0 {
            return Err(QmpError::generic("Parameter 'size' expects a >0 size"));
        }
        if let Some(j) = self.state.jobs.using_node(node) {
            return Err(QmpError::generic(format!(
                "Node '{node}' is busy: block device is in use by block job: {}",
                j.job_type
            )));
        }
        self.state.graph.resize(node, args.size as u64)
    }

    fn blockdev_snapshot(&mut self, args: BlockdevSnapshotArgs) -> Result<(), QmpError> {
        crate::snapshot::blockdev_snapshot(self.state, args)
    }

    fn blockdev_snapshot_sync(&mut self, args: BlockdevSnapshotSyncArgs) -> Result<(), QmpError> {
        crate::snapshot::blockdev_snapshot_sync(self.state, self.daemon.policy(), args)
    }

    fn blockdev_mirror(
        &mut self,
        args: crate::generated::BlockdevMirrorArgs,
    ) -> Result<(), QmpError> {
        crate::jobs::mirror::blockdev_mirror(self.daemon, self.state, args)
    }

    fn drive_mirror(&mut self, args: crate::generated::DriveMirror) -> Result<(), QmpError> {
        crate::jobs::drive_mirror::drive_mirror(self.daemon, self.state, args)
    }

    fn blockdev_backup(&mut self, args: crate::generated::BlockdevBackup) -> Result<(), QmpError> {
        crate::jobs::backup::blockdev_backup(self.daemon, self.state, args)
    }

    fn block_set_write_threshold(
        &mut self,
        args: crate::generated::BlockSetWriteThresholdArgs,
    ) -> Result<(), QmpError> {
        let name = args.node_name;
        let Some(node) = self.state.graph.get(&name) else {
            return Err(QmpError::generic(format!("Device '{name}' not found")));
        };
        // The event goes out from whichever I/O thread crosses; it holds the daemon weakly
        // so that an armed threshold does not keep a stopped daemon alive.
        let daemon = Arc::downgrade(self.daemon);
        let node_name = name.clone();
        let hook: sluice_block::threshold::OnExceeded = Arc::new(move |amount, threshold| {
            if let Some(d) = daemon.upgrade() {
                d.emit(&crate::generated::BlockWriteThresholdEvent {
                    node_name: node_name.clone(),
                    amount_exceeded: amount,
                    write_threshold: threshold,
                });
            }
        });
        node.threshold.set(args.write_threshold, Some(hook));
        Ok(())
    }

    fn change_backing_file(
        &mut self,
        args: crate::generated::ChangeBackingFileArgs,
    ) -> Result<(), QmpError> {
        let g = &self.state.graph;
        if g.get(&args.device).is_some() && !g.has_parent(&args.device) {
            if let Some(j) = self.state.jobs.using_node(&args.device) {
                return Err(QmpError::generic(format!(
                    "Node '{}' is busy: block device is in use by block job: {}",
                    args.device, j.job_type
                )));
            }
        }
        self.state.graph.change_backing_file(
            &args.device,
            &args.image_node_name,
            &args.backing_file,
        )
    }

    fn x_debug_query_block_graph(&mut self) -> Result<crate::generated::XDbgBlockGraph, QmpError> {
        let exports: Vec<(String, bool)> = self
            .state
            .exports
            .iter()
            .map(|e| (e.node.clone(), e.named.writable))
            .collect();
        Ok(self.state.graph.debug_graph(&exports))
    }

    fn query_block(&mut self) -> Result<Vec<crate::generated::BlockInfo>, QmpError> {
        // qsd's exports are not guest devices: it lists none, export or not.
        Ok(Vec::new())
    }

    fn transaction(&mut self, args: crate::generated::TransactionArgs) -> Result<(), QmpError> {
        crate::transaction::transaction(self.daemon, self.state, args.actions, args.properties)
    }
}
