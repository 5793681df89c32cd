//! The C test plugins of tests/plugins/, driven through the Plugin/Handle traits: ABI edge
//! cases (API 1, API 3, short structs, missing callbacks) and exactly what reaches C (flags,
//! errors, export names, extents).

mod support;

use std::sync::Arc;

use sluice_block::extents::{EXTENT_HOLE, EXTENT_ZERO};
use sluice_block::{
    BlockSize, Errno, ExportEntry, Extent, Extents, Flags, OpenContext, Plugin, Support,
    ThreadModel,
};
use sluice_nbdkit::{
    load, load_with, with_conn, ConnInfo, Connection, DebugFlag, LoadError, PeerCreds,
};
use support::{bare, kv, log_calls, log_lines, scratch_path, test_plugin};

fn ctx(export_name: &str) -> OpenContext<'_> {
    OpenContext {
        readonly: false,
        export_name,
        is_tls: false,
    }
}

/// Loads the recorder with a log file and extra parameters; returns the plugin and the log.
fn recorder(extra: &[sluice_block::plugins::ConfigArg]) -> (Arc<dyn Plugin>, std::path::PathBuf) {
    let log = scratch_path("recorder.log");
    let mut args = vec![kv("log", log.to_str().unwrap())];
    args.extend_from_slice(extra);
    let plugin = load(&test_plugin("recorder"), &args).unwrap();
    (plugin, log)
}

fn ramdisk_v1(extra: &[sluice_block::plugins::ConfigArg]) -> (Arc<dyn Plugin>, std::path::PathBuf) {
    let log = scratch_path("v1.log");
    let mut args = vec![kv("log", log.to_str().unwrap())];
    args.extend_from_slice(extra);
    let plugin = load(&test_plugin("ramdisk_v1"), &args).unwrap();
    (plugin, log)
}

#[test]
fn api3_plugin_is_refused_with_exact_message() {
    let path = test_plugin("api3");
    let err = load(&path, &[]).err().expect("must refuse");
    assert_eq!(
        err.to_string(),
        format!(
            "{}: plugin is incompatible with this version of sluice (_api_version = 3)",
            path.display()
        )
    );
    assert!(matches!(
        err,
        LoadError::Incompatible { api_version: 3, .. }
    ));
}

#[test]
fn plugin_without_open_is_refused_naming_the_callback() {
    let path = test_plugin("no_open");
    let err = load(&path, &[]).err().expect("must refuse");
    assert!(matches!(
        err,
        LoadError::MissingCallback {
            callback: "open",
            ..
        }
    ));
    assert_eq!(
        err.to_string(),
        format!("{}: plugin must have a .open callback", path.display())
    );
}

#[test]
fn missing_file_is_a_cannot_open_error() {
    let err = load(std::path::Path::new("/nonexistent/plugin.so"), &[])
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .starts_with("/nonexistent/plugin.so: cannot open plugin: "),
        "{err}"
    );
}

#[test]
fn short_struct_ignores_fields_past_struct_size() {
    // The bare value must go to config("script", ...): the plugin's magic_config_key lies
    // past _struct_size and its config refuses any other key.
    let plugin = load(&test_plugin("small_struct"), &[bare("foo")]).unwrap();
    // .thread_model (offset 304) would have said serialize_connections.
    assert_eq!(plugin.thread_model(), ThreadModel::Parallel);
    let h = plugin.open(&ctx("")).unwrap();
    // .can_zero (offset 200) would have said false; without it, _zero_v1 means native.
    assert_eq!(h.can_zero().unwrap(), Support::Native);
    h.pwrite(&[7u8; 512], 0, Flags::NONE).unwrap();
    let mut buf = [0u8; 512];
    h.pread(&mut buf, 0, Flags::NONE).unwrap();
    assert_eq!(buf, [7u8; 512]);
}

#[test]
fn v1_can_fua_native_is_capped_at_emulate() {
    let (plugin, _log) = ramdisk_v1(&[kv("fua", "native")]);
    let h = plugin.open(&ctx("")).unwrap();
    assert_eq!(h.can_fua().unwrap(), Support::Emulate);
}

#[test]
fn v1_can_fua_none_passes_through() {
    let (plugin, _log) = ramdisk_v1(&[kv("fua", "none")]);
    let h = plugin.open(&ctx("")).unwrap();
    assert_eq!(h.can_fua().unwrap(), Support::None);
}

#[test]
fn v1_data_callbacks_get_no_flags_and_zero_gets_may_trim() {
    let (plugin, log) = ramdisk_v1(&[]);
    let h = plugin.open(&ctx("")).unwrap();
    h.pwrite(&[1u8; 4096], 0, Flags::FUA).unwrap();
    h.zero(4096, 0, Flags::MAY_TRIM | Flags::FUA).unwrap();
    h.zero(512, 4096, Flags::NONE).unwrap();
    h.trim(512, 0, Flags::FUA).unwrap();
    h.flush(Flags::NONE).unwrap();
    assert_eq!(
        log_calls(&log, &["pwrite", "zero", "trim", "flush"]),
        [
            "pwrite 4096 0",
            "zero 4096 0 may_trim=1",
            "zero 512 4096 may_trim=0",
            "trim 512 0",
            "flush"
        ]
    );
}

#[test]
fn v1_fast_zero_fails_at_once_with_enotsup() {
    let (plugin, log) = ramdisk_v1(&[]);
    let h = plugin.open(&ctx("")).unwrap();
    assert!(h.can_fast_zero().unwrap());
    let err = h.zero(4096, 0, Flags::FAST_ZERO).unwrap_err();
    assert_eq!(err.errno, Errno::ENOTSUP);
    assert!(log_calls(&log, &["zero"]).is_empty());
}

#[test]
fn v1_capability_defaults_follow_callbacks_present() {
    let (plugin, _log) = ramdisk_v1(&[]);
    let h = plugin.open(&ctx("")).unwrap();
    assert!(h.can_write().unwrap());
    assert!(h.can_flush().unwrap());
    assert!(h.can_trim().unwrap());
    assert_eq!(h.can_zero().unwrap(), Support::Native);
    assert!(!h.can_extents().unwrap());
    assert_eq!(h.can_cache().unwrap(), Support::None);
    assert!(!h.can_multi_conn().unwrap());
    assert!(!h.is_rotational().unwrap());
    assert_eq!(h.block_size().unwrap(), None);
    assert_eq!(h.export_description().unwrap(), None);
}

#[test]
fn v2_native_fua_passes_flags_to_plugin() {
    let (plugin, log) = recorder(&[kv("fua", "native")]);
    let h = plugin.open(&ctx("")).unwrap();
    assert_eq!(h.can_fua().unwrap(), Support::Native);
    h.pwrite(&[1u8; 4096], 0, Flags::FUA).unwrap();
    h.zero(4096, 4096, Flags::MAY_TRIM | Flags::FUA).unwrap();
    h.trim(4096, 8192, Flags::FUA).unwrap();
    assert_eq!(
        log_calls(&log, &["pwrite", "zero", "trim"]),
        [
            "pwrite 4096 0 flags=0x2",
            "zero 4096 4096 flags=0x3",
            "trim 4096 8192 flags=0x2"
        ]
    );
}

#[test]
fn v2_can_fua_is_selectable() {
    for (value, want) in [
        ("none", Support::None),
        ("emulate", Support::Emulate),
        ("native", Support::Native),
    ] {
        let (plugin, _log) = recorder(&[kv("fua", value)]);
        let h = plugin.open(&ctx("")).unwrap();
        assert_eq!(h.can_fua().unwrap(), want, "fua={value}");
    }
}

#[test]
fn v2_fast_zero_reaches_plugin_and_its_enotsup_comes_back() {
    let (plugin, log) = recorder(&[]);
    let h = plugin.open(&ctx("")).unwrap();
    // .zero exists and the export is writable: nbdkit's default is "no fast zero".
    assert!(!h.can_fast_zero().unwrap());
    let err = h
        .zero(4096, 0, Flags::FAST_ZERO | Flags::MAY_TRIM)
        .unwrap_err();
    assert_eq!(err.errno, Errno::ENOTSUP);
    assert_eq!(log_calls(&log, &["zero"]), ["zero 4096 0 flags=0x9"]);
}

#[test]
fn v2_zero_of_nothing_does_not_call_plugin() {
    let (plugin, log) = recorder(&[]);
    let h = plugin.open(&ctx("")).unwrap();
    h.zero(0, 0, Flags::NONE).unwrap();
    assert!(log_calls(&log, &["zero"]).is_empty());
}

#[test]
fn set_error_errno_wins_and_message_is_plugins() {
    let (plugin, _log) = recorder(&[kv("fail", &libc::ENOSPC.to_string())]);
    let h = plugin.open(&ctx("")).unwrap();
    let err = h.pwrite(&[0u8; 512], 1024, Flags::NONE).unwrap_err();
    assert_eq!(err.errno, Errno::ENOSPC);
    assert_eq!(err.message, "injected pwrite failure at 1024");
}

#[test]
fn errno_is_used_when_plugin_preserves_it() {
    let (plugin, _log) = recorder(&[kv("errno_fail", &libc::EPERM.to_string())]);
    let h = plugin.open(&ctx("")).unwrap();
    let mut buf = [0u8; 512];
    let err = h.pread(&mut buf, 0, Flags::NONE).unwrap_err();
    assert_eq!(err.errno, Errno::EPERM);
    assert_eq!(err.message, "pread: Operation not permitted");
}

#[test]
fn extents_are_coalesced_through_add_extent() {
    let (plugin, log) = recorder(&[]);
    let h = plugin.open(&ctx("")).unwrap();
    assert!(h.can_extents().unwrap());
    h.pwrite(&[0xaa; 8192], 8192, Flags::NONE).unwrap();
    let mut e = Extents::new(0, 65536);
    h.extents(65536, 0, Flags::NONE, &mut e).unwrap();
    let hz = EXTENT_HOLE | EXTENT_ZERO;
    assert_eq!(
        e.as_slice(),
        &[
            Extent {
                offset: 0,
                length: 8192,
                kind: hz
            },
            Extent {
                offset: 8192,
                length: 8192,
                kind: 0
            },
            Extent {
                offset: 16384,
                length: 65536 - 16384,
                kind: hz
            },
        ]
    );
    assert_eq!(log_calls(&log, &["extents"]), ["extents 65536 0 flags=0x0"]);
}

#[test]
fn extents_request_one_passes_flag() {
    let (plugin, log) = recorder(&[]);
    let h = plugin.open(&ctx("")).unwrap();
    let mut e = Extents::new(4096, 8192);
    h.extents(4096, 4096, Flags::REQ_ONE, &mut e).unwrap();
    assert_eq!(e.as_slice().len(), 1);
    assert_eq!(
        log_calls(&log, &["extents"]),
        ["extents 4096 4096 flags=0x4"]
    );
}

#[test]
fn large_cache_request_is_split_under_4g() {
    let (plugin, log) = recorder(&[]);
    let h = plugin.open(&ctx("")).unwrap();
    assert_eq!(h.can_cache().unwrap(), Support::Native);
    h.cache(5 << 30, 0, Flags::NONE).unwrap();
    assert_eq!(
        log_calls(&log, &["cache"]),
        [
            "cache 2147483648 0 flags=0x0",
            "cache 2147483648 2147483648 flags=0x0",
            "cache 1073741824 4294967296 flags=0x0"
        ]
    );
}

#[test]
fn lifecycle_runs_in_nbdkit_order() {
    let (plugin, log) = recorder(&[kv("fua", "native")]);
    assert_eq!(
        log_lines(&log),
        [
            "config fua=native",
            "config_complete",
            "thread_model",
            "get_ready",
            "after_fork"
        ]
    );
    // .thread_model may only tighten _thread_model (parallel).
    assert_eq!(plugin.thread_model(), ThreadModel::SerializeRequests);
    let h = plugin.open(&ctx("x")).unwrap();
    drop(plugin);
    // The handle keeps the plugin loaded.
    assert!(!log_lines(&log).contains(&"unload".to_string()));
    drop(h);
    let lines = log_lines(&log);
    assert_eq!(
        &lines[lines.len() - 3..],
        ["close export=x", "cleanup", "unload"]
    );
}

#[test]
fn config_error_carries_plugin_message() {
    let log = scratch_path("bad.log");
    let err = load(
        &test_plugin("recorder"),
        &[kv("log", log.to_str().unwrap()), kv("fua", "bogus")],
    )
    .err()
    .unwrap();
    assert!(matches!(
        err,
        LoadError::Callback {
            callback: "config",
            ..
        }
    ));
    assert!(
        err.to_string().ends_with(": config: bad fua: bogus"),
        "{err}"
    );
    // .load ran, so .unload must have run too (without .cleanup: never got ready).
    assert_eq!(log_lines(&log).last().map(String::as_str), Some("unload"));
    assert!(!log_lines(&log).contains(&"cleanup".to_string()));
}

#[test]
fn bare_parameter_goes_to_magic_config_key() {
    let (plugin, _log) = recorder(&[bare("2M")]);
    let h = plugin.open(&ctx("")).unwrap();
    assert_eq!(h.get_size().unwrap(), 2 << 20);
}

#[test]
fn export_list_includes_default_export() {
    let (plugin, log) = recorder(&[]);
    assert_eq!(plugin.default_export(false, false).unwrap(), "def");
    assert_eq!(
        plugin.list_exports(true, true).unwrap(),
        [
            ExportEntry {
                name: "a".into(),
                description: None
            },
            ExportEntry {
                name: "b".into(),
                description: Some("bee".into())
            },
            ExportEntry {
                name: "def".into(),
                description: None
            },
        ]
    );
    assert!(log_lines(&log).contains(&"list_exports readonly=1 is_tls=1".to_string()));
}

#[test]
fn open_sees_export_name_and_tls() {
    let (plugin, log) = recorder(&[]);
    let h = plugin
        .open(&OpenContext {
            readonly: true,
            export_name: "disk1",
            is_tls: true,
        })
        .unwrap();
    assert_eq!(
        log_calls(&log, &["open"]),
        ["open readonly=1 export=disk1 tls=1"]
    );
    // Later calls, on another thread, still see this handle's connection.
    let desc = std::thread::scope(|s| s.spawn(|| h.export_description()).join().unwrap());
    assert_eq!(desc.unwrap().as_deref(), Some("export disk1 tls=1 pid=-1"));
}

#[test]
fn connection_info_reaches_plugin_through_with_conn() {
    let (plugin, log) = recorder(&[]);
    let conn = Connection::new(ConnInfo {
        peer_creds: Some(PeerCreds {
            pid: 4242,
            uid: 1000,
            gid: 1000,
        }),
        ..ConnInfo::default()
    });
    with_conn(&conn, || plugin.preconnect(true)).unwrap();
    let h = with_conn(&conn, || plugin.open(&ctx("e"))).unwrap();
    assert_eq!(
        h.export_description().unwrap().as_deref(),
        Some("export e tls=0 pid=4242")
    );
    assert!(log_lines(&log).contains(&"preconnect readonly=1".to_string()));
}

#[test]
fn open_failure_returns_plugin_message() {
    let (plugin, _log) = recorder(&[]);
    let err = plugin.open(&ctx("refuse")).err().unwrap();
    assert_eq!(err.message, "export refuse is refused");
    assert_eq!(err.errno, Errno::EIO);
}

#[test]
fn block_size_is_validated() {
    let (plugin, _log) = recorder(&[kv("block", "512")]);
    let h = plugin.open(&ctx("")).unwrap();
    assert_eq!(
        h.block_size().unwrap(),
        Some(BlockSize {
            minimum: 512,
            preferred: 4096,
            maximum: u32::MAX
        })
    );
    let (plugin, _log) = recorder(&[kv("block", "3")]);
    let h = plugin.open(&ctx("")).unwrap();
    assert_eq!(h.block_size().unwrap_err().errno, Errno::EINVAL);
    let (plugin, _log) = recorder(&[]);
    let h = plugin.open(&ctx("")).unwrap();
    assert_eq!(h.block_size().unwrap(), None);
}

#[test]
fn unknown_debug_flag_is_an_error() {
    let flag: DebugFlag = "recorder.nonesuch=1".parse().unwrap();
    let err = load_with(&test_plugin("recorder"), &[], &[flag])
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .ends_with("-D recorder.nonesuch: plugin does not contain a global variable called recorder_debug_nonesuch"),
        "{err}"
    );
}

#[test]
fn plugin_reports_name_version_and_usage() {
    let path = test_plugin("recorder");
    let plugin = load_with(&path, &[], &[]).unwrap();
    assert_eq!(plugin.name(), "recorder");
    assert_eq!(plugin.version(), Some("2.0"));
    assert_eq!(plugin.api_version(), 2);
    assert_eq!(plugin.magic_config_key().as_deref(), Some("size"));
    assert_eq!(
        plugin.usage(),
        format!(
            "plugin: recorder (sluice test recorder)\n({})\nRecords every call.\n\
             log=PATH size=SIZE fua=none|emulate|native\n",
            path.display()
        )
    );
}

#[test]
fn parallel_requests_on_one_handle() {
    let (plugin, _log) = recorder(&[]);
    let h = plugin.open(&ctx("")).unwrap();
    std::thread::scope(|s| {
        for i in 0..4u8 {
            let h = &h;
            s.spawn(move || {
                let off = u64::from(i) * 4096;
                h.pwrite(&[i + 1; 4096], off, Flags::NONE).unwrap();
                let mut buf = [0u8; 4096];
                h.pread(&mut buf, off, Flags::NONE).unwrap();
                assert!(buf.iter().all(|&b| b == i + 1));
            });
        }
    });
}
