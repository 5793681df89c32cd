//! Loading scripts: nbdkit's startup sequence, and a clear one-line error for every way a
//! script can fail to start.

mod support;

use sluice_block::plugins::ConfigArg;
use sluice_block::ThreadModel;
use sluice_python::{dump_plugin, load, LoadError};
use support::{kv, log_calls, open, read, scratch_path, script};

fn load_err(name: &str, args: &[ConfigArg]) -> LoadError {
    match load(&script(name), args) {
        Ok(_) => panic!("{name} loaded but should not have"),
        Err(e) => e,
    }
}

#[test]
fn syntax_error_names_file_and_line() {
    let err = load_err("syntax_error.py", &[]);
    assert!(matches!(err, LoadError::Syntax { line: 7, .. }), "{err:?}");
    let msg = err.to_string();
    let path = script("syntax_error.py");
    assert!(
        msg.starts_with(&format!("{}:7:26: SyntaxError: ", path.display())),
        "{msg}"
    );
    assert!(msg.contains("SyntaxError"), "{msg}");
}

#[test]
fn import_error_names_line_and_module() {
    let err = load_err("import_error.py", &[]);
    assert!(
        matches!(err, LoadError::Run { line: Some(4), .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("import_error.py:4: error running this script"),
        "{msg}"
    );
    assert!(
        msg.contains("ModuleNotFoundError: No module named 'no_such_module_for_sluice_tests'"),
        "{msg}"
    );
}

#[test]
fn missing_pread_is_refused_naming_the_callback() {
    let err = load_err("no_pread.py", &[]);
    assert!(
        matches!(
            err,
            LoadError::MissingCallback {
                callback: "pread",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("does not define 'pread'"), "{err}");
}

#[test]
fn api_version_3_is_refused_like_c_plugins() {
    let err = load_err("api3.py", &[]);
    let path = script("api3.py");
    assert!(
        err.to_string().starts_with(&format!(
            "{}: plugin is incompatible with this version of sluice (API_VERSION = 3)",
            path.display()
        )),
        "{err}"
    );
}

#[test]
fn missing_script_is_cannot_open() {
    let err = load_err("no-such-script.py", &[]);
    assert!(matches!(err, LoadError::Open { .. }), "{err:?}");
    assert!(err.to_string().contains("cannot open file"), "{err}");
}

#[test]
fn config_exception_names_callback_line_and_message() {
    let err = load_err("ram_v2.py", &[kv("colour", "blue")]);
    assert!(
        matches!(
            err,
            LoadError::Callback {
                callback: "config",
                line: Some(_),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains(": config: RuntimeError: unknown parameter colour"),
        "{err}"
    );
}

#[test]
fn bare_parameter_after_script_is_refused() {
    let err = load_err("ram_v2.py", &[ConfigArg::bare("1M")]);
    assert!(matches!(err, LoadError::BareParameter { .. }), "{err:?}");
}

#[test]
fn parameter_for_script_without_config_is_refused() {
    let err = load_err("no_pread.py", &[]);
    assert!(matches!(err, LoadError::MissingCallback { .. }));
    let err = load_err("bools.py", &[kv("a", "b")]);
    assert!(matches!(err, LoadError::NoConfig { .. }), "{err:?}");
}

#[test]
fn default_thread_model_is_serialize_all_requests() {
    let p = support::load("ram_v2.py", &[]);
    assert_eq!(p.thread_model(), ThreadModel::SerializeAllRequests);
    assert_eq!(p.name(), "python");
    let p = support::load("parallel.py", &[]);
    assert_eq!(p.thread_model(), ThreadModel::Parallel);
}

#[test]
fn each_load_gets_its_own_main_module() {
    let small = support::load("ram_v2.py", &[kv("size", "4K")]);
    let big = support::load("ram_v2.py", &[kv("size", "8K")]);
    let (hs, hb) = (open(&small), open(&big));
    assert_eq!(hs.get_size().unwrap(), 4096);
    assert_eq!(hb.get_size().unwrap(), 8192);
    hs.pwrite(b"small", 0, sluice_block::Flags::NONE).unwrap();
    assert_eq!(read(&*hb, 0, 5), [0u8; 5]);
    assert_eq!(read(&*hs, 0, 5), b"small");
}

#[test]
fn dump_plugin_without_script_prints_python_lines() {
    let text = dump_plugin(None, &[]).unwrap();
    assert!(text.contains("name=python\n"), "{text}");
    assert!(
        text.contains("thread_model=serialize_all_requests\n"),
        "{text}"
    );
    assert!(text.contains("python_version=3."), "{text}");
    assert!(text.contains("python_pep_384_abi_version=3\n"), "{text}");
    assert!(
        text.contains("nbdkit_python_maximum_api_version=2\n"),
        "{text}"
    );
}

#[test]
fn dump_plugin_with_script_configures_and_appends_its_output() {
    let path = script("parallel.py");
    let text = dump_plugin(Some(&path), &[kv("model", "serialize")]).unwrap();
    assert!(text.starts_with("path=/"), "{text}");
    assert!(
        text.contains("thread_model=serialize_all_requests\n"),
        "{text}"
    );
    let path = script("ram_v2.py");
    let text = dump_plugin(Some(&path), &[kv("size", "64K")]).unwrap();
    assert!(text.ends_with("ram_v2_size=65536\n"), "{text}");
    let plugin = support::load("ram_v2.py", &[kv("size", "8K")]);
    let lines = plugin.dump();
    assert!(lines.iter().any(|l| l == "ram_v2_size=8192"), "{lines:?}");
    assert!(lines
        .iter()
        .any(|l| l == "nbdkit_python_maximum_api_version=2"));
}

#[test]
fn lifecycle_runs_in_nbdkit_order_and_cleanup_after_last_handle() {
    const STEPS: &[&str] = &[
        "config_complete",
        "get_ready",
        "after_fork",
        "open",
        "close",
        "cleanup",
    ];
    let log = scratch_path("lifecycle.log");
    let args = [kv("log", log.to_str().unwrap())];
    let plugin = sluice_python::load_before_fork(&script("ram_v2.py"), &args).unwrap();
    assert_eq!(plugin.api_version(), 2);
    assert_eq!(log_calls(&log, STEPS), ["config_complete", "get_ready"]);
    plugin.after_fork().unwrap();
    plugin.after_fork().unwrap();
    let plugin: std::sync::Arc<dyn sluice_block::Plugin> = plugin;
    let h = open(&plugin);
    drop(plugin);
    assert_eq!(
        log_calls(&log, STEPS).last().unwrap(),
        "open readonly=False export="
    );
    drop(h);
    assert_eq!(
        log_calls(&log, STEPS),
        [
            "config_complete",
            "get_ready",
            "after_fork",
            "open readonly=False export=",
            "close",
            "cleanup"
        ]
    );
}
