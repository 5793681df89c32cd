//! nbdkit C plugins through the `sluice` binary and real NBD clients: what the plugin saw
//! (flags, flushes), what the client got (errors, capabilities), and how sluice refuses
//! plugins it cannot host.
//!
//! The plugins are sluice-nbdkit's test plugins (crates/nbdkit/tests/plugins: a recorder
//! with selectable `can_fua` that logs every call with its flags, an API 1 RAM disk, an
//! `_api_version = 3` plugin, a short `_struct_size`, one without `.open`) plus this crate's
//! `tests/plugins/quirks.c` (fast zero, plugin errors, invalid extents), compiled here with
//! the system `cc` against Debian's nbdkit headers. Where nbdkit is the reference, the same
//! `.so` is also run under nbdkit and the outputs compared.

use crate::support;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{c_plugin, nbdsh, path_str, run, wait_timeout, Server};

/// A sluice server of a logging test plugin, with the path of the plugin's call log.
struct Logged {
    server: Server,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Logged {
    /// `sluice serve [LEADING...] PLUGIN.so log=LOG ARGS...`.
    fn start(leading: &[&str], name: &str, args: &[&str]) -> Logged {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("calls.log");
        let so = c_plugin(name);
        let log_arg = format!("log={}", log.display());
        let mut all: Vec<&str> = leading.to_vec();
        all.push(path_str(&so));
        all.push(&log_arg);
        all.extend_from_slice(args);
        Logged {
            server: Server::start(&all),
            log,
            _dir: dir,
        }
    }

    /// The logged calls that start with one of `prefixes`, in order.
    fn calls(&self, prefixes: &[&str]) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| prefixes.iter().any(|p| l.starts_with(p)))
            .map(str::to_string)
            .collect()
    }

    /// The data-path calls: reads, writes, zeroes, trims, flushes.
    fn data_calls(&self) -> Vec<String> {
        self.calls(&["pread", "pwrite", "zero", "trim", "flush"])
    }
}

/// A Python snippet that runs `expr` and prints "ok" or the errno name it failed with (libnbd's
/// `nbd.Error.errno` is the name, e.g. "EINVAL").
fn attempt(label: &str, expr: &str) -> String {
    format!(
        "try:\n    {expr}\n    print({label:?}, 'ok')\nexcept nbd.Error as e:\n    \
         print({label:?}, e.errno)\n"
    )
}

/// A libnbd handle connected to `uri`, checking nothing on the client side (strict mode 0),
/// so that requests the server did not advertise reach it.
const RAW_CONNECT: &str = "h = nbd.NBD()\nh.set_strict_mode(0)\nh.connect_uri(uri)\n";
const CONNECT: &str = "h = nbd.NBD()\nh.connect_uri(uri)\n";

fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(uri);
    run("qemu-io", &args)
}

/// `PROGRAM ARGS...` that must exit by itself; returns (exit code, stderr).
fn exits(program: &str, args: &[&str]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let err_path = dir.path().join("stderr");
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let st = wait_timeout(&mut child, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("{program} {args:?} kept running"));
    (
        st.code().expect("exited normally"),
        std::fs::read_to_string(&err_path).unwrap(),
    )
}

fn sluice_dump(args: &[&str]) -> String {
    let mut all = vec!["serve", "--dump-plugin"];
    all.extend_from_slice(args);
    run(support::sluice_bin(), &all)
}

fn nbdkit_dump(args: &[&str]) -> String {
    let mut all = vec!["--dump-plugin"];
    all.extend_from_slice(args);
    run("nbdkit", &all)
}

// ---- FUA: native, emulated, none -------------------------------------------------------

#[test]
fn native_fua_qemu_io_write_reaches_plugin_with_fua_flag() {
    let s = Logged::start(&[], "recorder", &["fua=native"]);
    qemu_io(&s.server.qemu_uri(), &["write -f -P 0x5a 0 4096"]);
    // The flush is qemu-io's own, when it closes the image.
    assert_eq!(
        s.data_calls(),
        ["pwrite 4096 0 flags=0x2", "flush flags=0x0"]
    );
}

#[test]
fn native_fua_nbdsh_write_zero_trim_pass_fua_to_plugin() {
    let s = Logged::start(&[], "recorder", &["fua=native"]);
    let out = nbdsh(
        &s.server.uri(),
        &format!(
            "{CONNECT}print(h.can_fua())\n\
             h.pwrite(b'x' * 512, 0, nbd.CMD_FLAG_FUA)\n\
             h.zero(512, 4096, nbd.CMD_FLAG_FUA)\n\
             h.trim(512, 8192, nbd.CMD_FLAG_FUA)\n\
             h.shutdown()"
        ),
    );
    assert_eq!(out, "True\n");
    assert_eq!(
        s.data_calls(),
        [
            "pwrite 512 0 flags=0x2",
            "zero 512 4096 flags=0x3",
            "trim 512 8192 flags=0x2"
        ]
    );
}

#[test]
fn emulated_fua_qemu_io_write_gets_no_flag_then_flush() {
    let s = Logged::start(&[], "recorder", &["fua=emulate"]);
    qemu_io(&s.server.qemu_uri(), &["write -f -P 0x5a 0 4096"]);
    // The emulation's flush, then qemu-io's own on close.
    assert_eq!(
        s.data_calls(),
        [
            "pwrite 4096 0 flags=0x0",
            "flush flags=0x0",
            "flush flags=0x0"
        ]
    );
}

#[test]
fn emulated_fua_nbdsh_each_write_is_followed_by_flush() {
    let s = Logged::start(&[], "recorder", &["fua=emulate"]);
    let out = nbdsh(
        &s.server.uri(),
        &format!(
            "{CONNECT}print(h.can_fua())\n\
             h.pwrite(b'x' * 512, 0, nbd.CMD_FLAG_FUA)\n\
             h.zero(512, 4096, nbd.CMD_FLAG_FUA)\n\
             h.trim(512, 8192, nbd.CMD_FLAG_FUA)\n\
             h.pwrite(b'y' * 512, 0)\n\
             h.shutdown()"
        ),
    );
    assert_eq!(out, "True\n");
    assert_eq!(
        s.data_calls(),
        [
            "pwrite 512 0 flags=0x0",
            "flush flags=0x0",
            "zero 512 4096 flags=0x1",
            "flush flags=0x0",
            "trim 512 8192 flags=0x0",
            "flush flags=0x0",
            "pwrite 512 0 flags=0x0"
        ]
    );
}

#[test]
fn no_fua_is_not_advertised_and_libnbd_refuses_client_side() {
    let s = Logged::start(&[], "recorder", &["fua=none"]);
    let out = nbdsh(
        &s.server.uri(),
        &format!(
            "{CONNECT}print(h.can_fua())\n\
             try:\n    h.pwrite(b'x' * 512, 0, nbd.CMD_FLAG_FUA)\n\
             except nbd.Error as e:\n    print(e.string)\n\
             h.shutdown()"
        ),
    );
    assert_eq!(
        out,
        "False\nnbd_pwrite: server does not support the FUA flag: Invalid argument\n"
    );
    assert!(s.data_calls().is_empty(), "{:?}", s.data_calls());
}

#[test]
fn no_fua_raw_fua_request_gets_einval_and_plugin_sees_nothing() {
    let mut s = Logged::start(&[], "recorder", &["fua=none"]);
    let out = nbdsh(
        &s.server.uri(),
        &format!(
            "{RAW_CONNECT}{}{}h.shutdown()",
            attempt("fua", "h.pwrite(b'x' * 512, 0, nbd.CMD_FLAG_FUA)"),
            attempt("plain", "h.pwrite(b'y' * 512, 0)"),
        ),
    );
    assert_eq!(out, "fua EINVAL\nplain ok\n");
    assert_eq!(s.data_calls(), ["pwrite 512 0 flags=0x0"]);
    s.server.assert_alive();
}

// ---- fast zero ------------------------------------------------------------------------

#[test]
fn fast_zero_reaches_plugin_as_0x9_and_its_enotsup_comes_back() {
    let s = Logged::start(&[], "quirks", &[]);
    let out = nbdsh(
        &s.server.uri(),
        &format!(
            "{CONNECT}print(h.can_fast_zero())\n{}{}h.shutdown()",
            attempt("fast", "h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)"),
            attempt(
                "fast+fua",
                "h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_FUA)"
            ),
        ),
    );
    assert_eq!(out, "True\nfast ENOTSUP\nfast+fua ENOTSUP\n");
    assert_eq!(
        s.data_calls(),
        ["zero 4096 0 flags=0x9", "zero 4096 0 flags=0xb"]
    );
}

/// (nbdkit 1.32.5 aborts on this request: `backend_zero: Assertion c->can_fast_zero == 1`.)
#[test]
fn unadvertised_fast_zero_gets_einval_without_plugin_call() {
    let mut s = Logged::start(&[], "recorder", &["fua=native"]);
    let out = nbdsh(
        &s.server.uri(),
        &format!(
            "{RAW_CONNECT}print(h.can_fast_zero())\n{}{}h.shutdown()",
            attempt("fast", "h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)"),
            attempt("plain", "h.zero(4096, 0)"),
        ),
    );
    assert_eq!(out, "False\nfast EINVAL\nplain ok\n");
    assert_eq!(s.data_calls(), ["zero 4096 0 flags=0x1"]);
    s.server.assert_alive();
}

// ---- an old plugin (API 1) on this server ------------------------------------------------

#[test]
fn api1_plugin_native_fua_is_emulated_with_flush() {
    let s = Logged::start(&[], "ramdisk_v1", &["fua=native"]);
    let out = nbdsh(
        &s.server.uri(),
        &format!(
            "{CONNECT}print(h.can_fua())\n\
             h.pwrite(b'x' * 512, 0, nbd.CMD_FLAG_FUA)\n\
             h.zero(512, 4096, nbd.CMD_FLAG_FUA)\n\
             h.zero(512, 8192, nbd.CMD_FLAG_NO_HOLE)\n\
             h.shutdown()"
        ),
    );
    assert_eq!(out, "True\n");
    assert_eq!(
        s.data_calls(),
        [
            "pwrite 512 0",
            "flush",
            "zero 512 4096 may_trim=1",
            "flush",
            "zero 512 8192 may_trim=0"
        ]
    );
}

#[test]
fn api1_plugin_fast_zero_fails_enotsup_without_plugin_call() {
    let s = Logged::start(&[], "ramdisk_v1", &[]);
    let out = nbdsh(
        &s.server.uri(),
        &format!(
            "{CONNECT}print(h.can_fast_zero())\n{}h.shutdown()",
            attempt("fast", "h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)"),
        ),
    );
    assert_eq!(out, "True\nfast ENOTSUP\n");
    assert!(s.calls(&["zero"]).is_empty());
}

#[test]
fn api1_plugin_round_trips_data_through_qemu_io() {
    let s = Logged::start(&[], "ramdisk_v1", &["size=64K"]);
    let uri = s.server.qemu_uri();
    qemu_io(&uri, &["write -P 0xa5 4096 8192"]);
    let out = qemu_io(
        &uri,
        &[
            "read -P 0 0 4096",
            "read -P 0xa5 4096 8192",
            "read -P 0 12288 53248",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(out.matches("read ").count(), 3, "{out}");
}

#[test]
fn short_struct_plugin_serves_and_round_trips() {
    // The bare value goes to config("script", ...): the plugin's magic_config_key lies past
    // its 192-byte _struct_size.
    let so = c_plugin("small_struct");
    let s = Server::start(&[path_str(&so), "foo"]);
    let uri = s.qemu_uri();
    qemu_io(&uri, &["write -P 0x3c 512 1024"]);
    let out = qemu_io(&uri, &["read -P 0x3c 512 1024", "read -P 0 1536 512"]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(run("nbdinfo", &["--size", &s.uri()]), "65536\n");
}

// ---- plugins sluice refuses ------------------------------------------------------------

/// `sluice serve -f -U SOCK PLUGIN` must exit 1 with `message` and never create SOCK.
fn assert_refused(name: &str, message: &str) {
    let so = c_plugin(name);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let (code, stderr) = exits(
        support::sluice_bin(),
        &["serve", "-f", "-U", path_str(&sock), path_str(&so)],
    );
    assert_eq!(code, 1);
    assert_eq!(stderr, format!("sluice: {}: {message}\n", so.display()));
    assert!(!sock.exists(), "nothing may be served");
}

#[test]
fn api3_plugin_is_refused_with_exit_1_and_nothing_served() {
    assert_refused(
        "api3",
        "plugin is incompatible with this version of sluice (_api_version = 3)",
    );
}

#[test]
fn plugin_without_open_is_refused_with_exit_1_and_nothing_served() {
    assert_refused("no_open", "plugin must have a .open callback");
}

#[test]
fn refusal_messages_match_nbdkit_wording() {
    for name in ["api3", "no_open"] {
        let so = c_plugin(name);
        let (ours_code, ours) = exits(
            support::sluice_bin(),
            &["serve", "--dump-plugin", path_str(&so)],
        );
        let (theirs_code, theirs) = exits("nbdkit", &["--dump-plugin", path_str(&so)]);
        assert_eq!((ours_code, theirs_code), (1, 1), "{name}");
        assert_eq!(
            ours.replace("sluice", "nbdkit"),
            theirs,
            "{name}: sluice and nbdkit differ"
        );
    }
}

// ---- --dump-plugin, -D and --plugin-dir through the command line ----------------------------

#[test]
fn dump_plugin_of_test_plugins_equals_nbdkit() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("dump.log");
    let log_arg = format!("log={}", log.display());
    for (name, args) in [
        ("recorder", vec![log_arg.as_str(), "2M"]),
        ("ramdisk_v1", vec![log_arg.as_str()]),
        ("small_struct", vec!["foo"]),
        ("quirks", vec![log_arg.as_str(), "extents=none"]),
    ] {
        let so = c_plugin(name);
        let mut all = vec![path_str(&so)];
        all.extend_from_slice(&args);
        assert_eq!(sluice_dump(&all), nbdkit_dump(&all), "{name}");
    }
}

#[test]
fn debug_flag_reaches_plugin_in_dump_plugin() {
    let so = c_plugin("recorder");
    let args = ["-D", "recorder.verbose=1", path_str(&so), "log=/dev/null"];
    let ours = sluice_dump(&args);
    assert!(ours.ends_with("\nrecorder_verbose=1\n"), "{ours}");
    assert_eq!(ours, nbdkit_dump(&args));
}

#[test]
fn debug_flag_reaches_plugin_when_serving() {
    let s = Logged::start(&["-D", "quirks.tag=7"], "quirks", &[]);
    let out = nbdsh(
        &s.server.uri(),
        "h = nbd.NBD()\nh.set_full_info(True)\nh.connect_uri(uri)\n\
         print(h.get_export_description())\nh.shutdown()",
    );
    assert_eq!(out, "tag=7\n");
}

#[test]
fn short_name_resolves_in_plugin_dir() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        c_plugin("quirks"),
        dir.path().join("nbdkit-quirks-plugin.so"),
    )
    .unwrap();
    let s = Server::start(&["--plugin-dir", path_str(dir.path()), "quirks", "size=128K"]);
    assert_eq!(run("nbdinfo", &["--size", &s.uri()]), "131072\n");
}

// ---- plugin errors reach the client ------------------------------------------------------

/// Runs `op` (a Python expression) against a plugin that fails it and returns the errno name
/// the client got.
fn failing_request(s: &Logged, op: &str) -> String {
    nbdsh(
        &s.server.uri(),
        &format!("{CONNECT}{}h.shutdown()", attempt("op", op)),
    )
}

#[test]
fn set_error_enospc_reaches_client_and_message_is_logged_once() {
    let mut s = Logged::start(&[], "recorder", &["fail=28"]);
    let out = failing_request(&s, "h.pwrite(b'x' * 512, 1024)");
    assert_eq!(out, "op ENOSPC\n");
    let stderr = s.server.stderr();
    assert_eq!(
        stderr.matches("injected pwrite failure at 1024").count(),
        1,
        "{stderr}"
    );
    s.server.assert_alive();
}

#[test]
fn set_error_eio_reaches_client_as_eio() {
    let s = Logged::start(&[], "recorder", &["fail=5"]);
    assert_eq!(
        failing_request(&s, "h.pwrite(b'x' * 512, 1024)"),
        "op EIO\n"
    );
}

#[test]
fn preserved_errno_eperm_reaches_client_as_eperm() {
    let s = Logged::start(&[], "recorder", &["errno_fail=1"]);
    assert_eq!(failing_request(&s, "h.pread(512, 0)"), "op EPERM\n");
}

#[test]
fn error_without_errno_is_eio_and_message_is_logged_once() {
    let mut s = Logged::start(&[], "quirks", &["fail_pread=1"]);
    assert_eq!(failing_request(&s, "h.pread(512, 4096)"), "op EIO\n");
    let stderr = s.server.stderr();
    assert_eq!(
        stderr.matches("pread refused at 4096").count(),
        1,
        "{stderr}"
    );
    s.server.assert_alive();
}

// ---- invalid extents ---------------------------------------------------------------------

/// Block status against the quirks plugin in `mode`, then a read on the same connection.
fn block_status_then_read(mode: &str) -> (String, Logged) {
    let s = Logged::start(&[], "quirks", &[&format!("extents={mode}")]);
    let out = nbdsh(
        &s.server.uri(),
        &format!(
            "h = nbd.NBD()\nh.add_meta_context('base:allocation')\nh.connect_uri(uri)\n{}{}\
             h.shutdown()",
            attempt("status", "h.block_status(65536, 0, lambda *a: 0)"),
            attempt("read", "h.pread(512, 0)"),
        ),
    );
    (out, s)
}

#[test]
fn no_extents_gets_einval_and_connection_keeps_working() {
    let (out, mut s) = block_status_then_read("none");
    assert_eq!(out, "status EINVAL\nread ok\n");
    assert_eq!(
        s.calls(&["extents", "pread"]),
        ["extents 65536 0 flags=0x0", "pread 512 0 flags=0x0"]
    );
    s.server.assert_serving("");
}

#[test]
fn first_extent_past_offset_gets_einval_and_connection_keeps_working() {
    let (out, mut s) = block_status_then_read("gap");
    assert_eq!(out, "status EINVAL\nread ok\n");
    let stderr = s.server.stderr();
    assert_eq!(
        stderr
            .matches("nbdkit_add_extent: first extent must not be > start (0)")
            .count(),
        1,
        "{stderr}"
    );
    s.server.assert_serving("");
}

#[test]
fn good_extents_are_reported() {
    let (out, _s) = block_status_then_read("good");
    assert_eq!(out, "status ok\nread ok\n");
}
