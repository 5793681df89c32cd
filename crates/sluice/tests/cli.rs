//! The `sluice` command line as a user meets it: help and version, one-line errors with exit
//! status 2, captive mode (`--run`), pidfiles, signals, daemonizing, TCP, systemd socket
//! activation and `--exit-with-parent`.
//!
//! Processes that outlive their parent (the daemon, the server under `--exit-with-parent`)
//! are reparented to this test process, which makes itself a child subreaper, so that they
//! can be waited for and their exit status checked instead of leaving zombies behind.

mod support;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::raw::RawClient;
use support::{path_str, run, sluice_bin, wait_timeout, Server};

const TIMEOUT: Duration = Duration::from_secs(30);

/// What a finished `sluice` run printed.
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `sluice ARGS...` to completion (killing it after [`TIMEOUT`] so that a server
/// started by mistake fails the test instead of hanging it).
fn sluice(args: &[&str]) -> Finished {
    let dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = Command::new(sluice_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let status = wait_timeout(&mut child, TIMEOUT);
    let stdout = std::fs::read_to_string(&out_path).unwrap();
    let stderr = std::fs::read_to_string(&err_path).unwrap();
    let status = status.unwrap_or_else(|| {
        panic!("sluice {args:?} did not exit; stdout: {stdout}\nstderr: {stderr}")
    });
    Finished {
        status,
        stdout,
        stderr,
    }
}

/// Asserts that `sluice serve -f -U SOCKET ARGS...` refuses to start: exit status 2, nothing
/// on stdout, and exactly one line on stderr that starts `sluice: ` and contains `names`.
fn assert_usage_error(args: &[&str], names: &str) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbd.sock");
    let mut all = vec!["serve", "-f", "-U", path_str(&socket)];
    all.extend_from_slice(args);
    assert_fails_with_one_line(&all, names);
    assert!(!socket.exists(), "{args:?}: socket left behind");
}

/// Asserts that `sluice ARGS...` exits 2 with nothing on stdout and exactly one line on
/// stderr that starts `sluice: ` and contains `names`.
fn assert_fails_with_one_line(args: &[&str], names: &str) {
    let f = sluice(args);
    assert_eq!(f.status.code(), Some(2), "{args:?}: stderr: {}", f.stderr);
    assert_eq!(f.stdout, "", "{args:?}");
    let lines: Vec<&str> = f.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: stderr is not one line:\n{}",
        f.stderr
    );
    assert!(lines[0].starts_with("sluice: "), "{args:?}: {}", lines[0]);
    assert!(
        lines[0].contains(names),
        "{args:?}: {} lacks {names:?}",
        lines[0]
    );
}

/// A running `sluice` whose stdout lines are collected as they come.
struct Running {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    stderr_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Running {
    fn start(args: &[&str]) -> Running {
        Self::start_command(Command::new(sluice_bin()).args(args))
    }

    fn start_command(cmd: &mut Command) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let stderr_path = dir.path().join("stderr");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running {
            child: Some(child),
            lines,
            stderr_path,
            _dir: dir,
        }
    }

    /// The next line sluice prints on stdout.
    fn next_line(&self) -> String {
        self.lines
            .recv_timeout(TIMEOUT)
            .unwrap_or_else(|e| panic!("no line on stdout ({e}); stderr: {}", self.stderr()))
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Sends `signal` and returns the exit status.
    fn signal_and_wait(&mut self, signal: i32) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(child.id() as i32, signal) };
        wait_timeout(&mut child, TIMEOUT).expect("sluice did not exit on the signal")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A TCP port that was free a moment ago on 127.0.0.1.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Makes this process the reaper of orphaned descendants (daemons, servers whose parent was
/// killed), so that tests can wait for them.
fn become_subreaper() {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) only sets a flag on this process.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(r, 0, "PR_SET_CHILD_SUBREAPER");
}

/// Waits for process `pid` (a child, or an orphan reparented to us) and returns its exit
/// code, panicking if it does not exit normally within [`TIMEOUT`].
fn wait_pid_exit_code(pid: i32) -> i32 {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into our local.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        assert!(
            r >= 0,
            "waitpid({pid}): {}",
            std::io::Error::last_os_error()
        );
        if r == pid {
            assert!(
                libc::WIFEXITED(status),
                "process {pid} did not exit normally (wait status {status:#x})"
            );
            return libc::WEXITSTATUS(status);
        }
        if Instant::now() > deadline {
            // SAFETY: killing and reaping the process this test started and still owns.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            panic!("process {pid} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until something on `socket` sends the NBD greeting.
fn wait_for_greeting(socket: &Path) {
    use std::io::Read;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Ok(mut s) = UnixStream::connect(socket) {
            let mut magic = [0u8; 8];
            if s.read_exact(&mut magic).is_ok() && &magic == b"NBDMAGIC" {
                return;
            }
        }
        assert!(Instant::now() < deadline, "no NBD server on {socket:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn unix_uri(socket: &Path) -> String {
    format!("nbd+unix:///?socket={}", socket.display())
}

#[test]
fn help_top_level_mentions_serve_options_and_an_example() {
    let f = sluice(&["--help"]);
    assert_eq!(f.status.code(), Some(0));
    assert!(f.stdout.contains("Usage: sluice "), "{}", f.stdout);
    assert!(f.stdout.contains("serve"), "{}", f.stdout);
    for opt in ["--dump-config", "-h, --help", "-V, --version"] {
        assert!(f.stdout.contains(opt), "{opt} missing from:\n{}", f.stdout);
    }
    assert!(
        f.stdout.contains("sluice serve -U sock memory 1G"),
        "no example in:\n{}",
        f.stdout
    );
}

#[test]
fn help_serve_mentions_every_option_and_an_example() {
    let f = sluice(&["serve", "--help"]);
    assert_eq!(f.status.code(), Some(0), "{}", f.stderr);
    let help = &f.stdout;
    for opt in [
        "-U, --unix",
        "-p, --port",
        "-i, --ipaddr",
        "-r, --readonly",
        "-e, --exportname",
        "-f, --foreground",
        "-P, --pidfile",
        "--exit-with-parent",
        "--run",
        "-t, --threads",
        "-v, --verbose",
        "-h, --help",
        "-V, --version",
    ] {
        assert!(help.contains(opt), "{opt} missing from:\n{help}");
    }
    for word in ["$uri", "$unixsocket", "$port", "$exportname", "PLUGIN"] {
        assert!(help.contains(word), "{word} missing from:\n{help}");
    }
    for plugin in ["memory", "file", "null", "pattern"] {
        assert!(help.contains(plugin), "{plugin} missing from:\n{help}");
    }
    assert!(
        help.contains("sluice serve -U - memory 1G --run"),
        "no example in:\n{help}"
    );
}

#[test]
fn version_prints_name_and_package_version() {
    let f = sluice(&["--version"]);
    assert_eq!(f.status.code(), Some(0));
    assert_eq!(f.stdout, format!("sluice {}\n", env!("CARGO_PKG_VERSION")));
}

#[test]
fn unknown_plugin_exits_2_one_line_naming_it() {
    assert_usage_error(&["bogus", "1M"], "'bogus'");
}

#[test]
fn bad_memory_size_exits_2_one_line_naming_it() {
    assert_usage_error(&["memory", "size=1Q"], "1Q");
}

#[test]
fn missing_memory_size_exits_2_one_line() {
    assert_usage_error(&["memory"], "size");
}

#[test]
fn nonexistent_file_exits_2_one_line_naming_it() {
    assert_usage_error(&["file", "/nonexistent"], "/nonexistent");
}

#[test]
fn unix_and_port_together_exit_2_one_line() {
    assert_usage_error(&["-p", "10809", "memory", "1M"], "-p");
}

#[test]
fn bad_port_exits_2_one_line_naming_it() {
    assert_usage_error(&["-p", "notaport", "memory", "1M"], "notaport");
}

#[test]
fn unknown_option_exits_2_one_line_naming_it() {
    assert_usage_error(&["--bogus", "memory", "1M"], "--bogus");
}

#[test]
fn unix_socket_path_is_regular_file_exits_2_and_keeps_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not-a-socket");
    std::fs::write(&path, "precious").unwrap();
    assert_fails_with_one_line(
        &["serve", "-f", "-U", path_str(&path), "memory", "1M"],
        path_str(&path),
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
}

#[test]
fn tcp_port_in_use_exits_2_one_line_naming_it() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    assert_fails_with_one_line(
        &[
            "serve",
            "-f",
            "-p",
            &port,
            "-i",
            "127.0.0.1",
            "memory",
            "1M",
        ],
        &format!("127.0.0.1:{port}"),
    );
}

#[test]
fn verbose_log_to_file_has_no_terminal_escapes() {
    let mut s = Server::start(&["-v", "memory", "1M"]);
    run("nbdinfo", &["--size", &s.uri()]);
    assert_eq!(s.stop().code(), Some(0));
    let log = s.stderr();
    assert!(!log.is_empty(), "-v logged nothing");
    assert!(!log.contains('\x1b'), "escape codes in the log:\n{log:?}");
}

#[test]
fn foreground_prints_uri_on_stdout_when_ready() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbd.sock");
    let mut r = Running::start(&["serve", "-f", "-U", path_str(&socket), "memory", "1M"]);
    let uri = r.next_line();
    assert_eq!(uri, unix_uri(&socket));
    assert_eq!(run("nbdinfo", &["--size", &uri]), "1048576\n");
    assert!(r.signal_and_wait(libc::SIGTERM).success());
}

#[test]
fn foreground_with_exportname_prints_uri_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbd.sock");
    let r = Running::start(&[
        "serve",
        "-f",
        "-U",
        path_str(&socket),
        "-e",
        "disk1",
        "memory",
        "1M",
    ]);
    assert_eq!(
        r.next_line(),
        format!("nbd+unix:///disk1?socket={}", socket.display())
    );
}

#[test]
fn run_private_socket_nbdinfo_prints_size_exit_0() {
    let f = sluice(&[
        "serve",
        "-U",
        "-",
        "memory",
        "1M",
        "--run",
        "nbdinfo --size \"$uri\"",
    ]);
    assert_eq!(f.status.code(), Some(0), "{}", f.stderr);
    assert_eq!(f.stdout, "1048576\n");
}

#[test]
fn run_private_socket_removed_with_its_directory_at_exit() {
    let f = sluice(&[
        "serve",
        "-U",
        "-",
        "memory",
        "1M",
        "--run",
        "test -S \"$unixsocket\" && echo \"$unixsocket\"",
    ]);
    assert_eq!(f.status.code(), Some(0), "{}", f.stderr);
    let socket = PathBuf::from(f.stdout.trim_end());
    assert!(socket.is_absolute(), "{:?}", f.stdout);
    assert!(!socket.exists(), "{socket:?} left behind");
    assert!(
        !socket.parent().unwrap().exists(),
        "private directory left behind"
    );
}

#[test]
fn run_command_exit_status_3_is_sluice_exit_status() {
    let f = sluice(&["serve", "-U", "-", "memory", "1M", "--run", "exit 3"]);
    assert_eq!(f.status.code(), Some(3), "{}", f.stderr);
}

#[test]
fn run_sees_unixsocket_exportname_uri_and_empty_port() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbd.sock");
    let socket = path_str(&socket);
    let f = sluice(&[
        "serve",
        "-U",
        socket,
        "-e",
        "foo",
        "memory",
        "1M",
        "--run",
        "echo \"$unixsocket|$exportname|$uri|$port\"",
    ]);
    assert_eq!(f.status.code(), Some(0), "{}", f.stderr);
    assert_eq!(
        f.stdout,
        format!("{socket}|foo|nbd+unix:///foo?socket={socket}|\n")
    );
}

#[test]
fn run_exportname_with_space_uri_reaches_that_export() {
    let f = sluice(&[
        "serve",
        "-U",
        "-",
        "-e",
        "my disk",
        "memory",
        "1M",
        "--run",
        "nbdinfo --json \"$uri\"",
    ]);
    assert_eq!(f.status.code(), Some(0), "{}", f.stderr);
    let v: serde_json::Value = serde_json::from_str(&f.stdout).unwrap();
    assert_eq!(v["exports"][0]["export-name"], "my disk", "{}", f.stdout);
}

#[test]
fn run_tcp_sees_port_and_uri() {
    let port = free_port().to_string();
    let f = sluice(&[
        "serve",
        "-p",
        &port,
        "-i",
        "127.0.0.1",
        "memory",
        "1M",
        "--run",
        "echo \"$port|$uri|$unixsocket\"; nbdinfo --size \"$uri\"",
    ]);
    assert_eq!(f.status.code(), Some(0), "{}", f.stderr);
    assert_eq!(
        f.stdout,
        format!("{port}|nbd://127.0.0.1:{port}/|\n1048576\n")
    );
}

#[test]
fn pidfile_holds_server_pid_once_ready() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("sluice.pid");
    let s = Server::start(&["-P", path_str(&pidfile), "memory", "1M"]);
    // Server::start returned after the NBD greeting, so the server is ready.
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap(),
        format!("{}\n", s.pid())
    );
}

#[test]
fn sigterm_exits_0_and_removes_socket() {
    let mut s = Server::start(&["memory", "1M"]);
    assert_eq!(run("nbdinfo", &["--size", &s.uri()]), "1048576\n");
    let status = s.stop();
    assert_eq!(status.code(), Some(0), "{}", s.stderr());
    assert!(!s.socket.exists(), "socket left behind");
}

#[test]
fn sigint_exits_0_and_removes_socket() {
    let mut s = Server::start(&["memory", "1M"]);
    let mut child = s.child.take().unwrap();
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = wait_timeout(&mut child, TIMEOUT).expect("no exit on SIGINT");
    assert_eq!(status.code(), Some(0), "{}", s.stderr());
    assert!(!s.socket.exists(), "socket left behind");
}

#[test]
fn sigterm_with_idle_connected_clients_exits_0() {
    let mut s = Server::start(&["memory", "1M"]);
    // One client idle in the transmission phase, one idle in negotiation.
    let (mut transmitting, _) = RawClient::handshake(&s, true, false);
    let _negotiating = UnixStream::connect(&s.socket).unwrap();
    let status = s.stop();
    assert_eq!(status.code(), Some(0), "{}", s.stderr());
    transmitting.expect_closed();
}

#[test]
fn sigterm_during_nbdcopy_exits_0_without_panic() {
    // Big enough that no machine copies it all before the freeze below; only what is
    // copied takes memory.
    let source = Server::start(&["pattern", "8G"]);
    let mut target = Server::start(&["memory", "8G"]);
    let mut copy = Command::new("nbdcopy")
        .args([&source.uri(), &target.uri()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until data is arriving, then freeze nbdcopy mid-copy so that the server is
    // shut down with requests in flight however fast this machine is.
    let deadline = Instant::now() + TIMEOUT;
    while !run("nbdinfo", &["--map", &target.uri()]).contains("data") {
        assert!(Instant::now() < deadline, "nbdcopy wrote nothing");
        assert!(copy.try_wait().unwrap().is_none(), "nbdcopy ended early");
    }
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(copy.id() as i32, libc::SIGSTOP) };
    assert!(copy.try_wait().unwrap().is_none(), "nbdcopy ended early");

    let status = target.stop();

    let _ = copy.kill();
    let _ = copy.wait();
    assert_eq!(status.code(), Some(0), "{}", target.stderr());
    target.assert_no_panic();
}

#[test]
fn daemon_with_pidfile_parent_exits_0_server_answers_until_killed() {
    become_subreaper();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbd.sock");
    let pidfile = dir.path().join("sluice.pid");
    let f = sluice(&[
        "serve",
        "-U",
        path_str(&socket),
        "-P",
        path_str(&pidfile),
        "memory",
        "1M",
    ]);
    assert_eq!(f.status.code(), Some(0), "{}", f.stderr);

    let pid: i32 = std::fs::read_to_string(&pidfile)
        .expect("pidfile written before the parent exits")
        .trim_end()
        .parse()
        .unwrap();
    let answer = std::panic::catch_unwind(|| run("nbdinfo", &["--size", &unix_uri(&socket)]));
    // SAFETY: signalling the daemon named by its pidfile.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let code = wait_pid_exit_code(pid);
    assert_eq!(answer.expect("daemon answers"), "1048576\n");
    assert_eq!(code, 0);
    assert!(!socket.exists(), "socket left behind");
}

#[test]
fn tcp_port_and_ipaddr_prints_uri_and_serves() {
    let port = free_port();
    let mut r = Running::start(&[
        "serve",
        "-f",
        "-p",
        &port.to_string(),
        "-i",
        "127.0.0.1",
        "memory",
        "1M",
    ]);
    let uri = format!("nbd://127.0.0.1:{port}/");
    assert_eq!(r.next_line(), uri, "{}", r.stderr());
    assert_eq!(run("nbdinfo", &["--size", &uri]), "1048576\n");
    assert_eq!(r.signal_and_wait(libc::SIGTERM).code(), Some(0));
}

#[test]
fn tcp_port_0_ipv6_loopback_uri_has_brackets_and_real_port() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 loopback on this machine");
        return;
    }
    let f = sluice(&[
        "serve",
        "-p",
        "0",
        "-i",
        "::1",
        "memory",
        "1M",
        "--run",
        "echo \"$uri\"; nbdinfo --size \"$uri\"",
    ]);
    assert_eq!(f.status.code(), Some(0), "{}", f.stderr);
    let (uri, size) = f.stdout.split_once('\n').unwrap();
    let port: u16 = uri
        .strip_prefix("nbd://[::1]:")
        .and_then(|p| p.strip_suffix('/'))
        .unwrap_or_else(|| panic!("URI {uri:?}"))
        .parse()
        .unwrap();
    assert_ne!(port, 0);
    assert_eq!(size, "1048576\n");
}

#[test]
fn daemon_prints_uri_on_stdout_before_parent_exits() {
    become_subreaper();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbd.sock");
    let pidfile = dir.path().join("sluice.pid");
    let f = sluice(&[
        "serve",
        "-U",
        path_str(&socket),
        "-P",
        path_str(&pidfile),
        "memory",
        "1M",
    ]);
    if let Ok(pid) = std::fs::read_to_string(&pidfile) {
        let pid: i32 = pid.trim_end().parse().unwrap();
        // SAFETY: signalling the daemon named by its pidfile.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        wait_pid_exit_code(pid);
    }
    assert_eq!(f.status.code(), Some(0), "{}", f.stderr);
    assert_eq!(f.stdout, format!("{}\n", unix_uri(&socket)));
}

/// Runs sluice under systemd-style socket activation: a python3 wrapper binds and listens
/// on `socket`, puts it on fd 3, sets LISTEN_PID to its own pid (which the exec keeps) and
/// LISTEN_FDS=1, and execs `sluice ARGS...`.
fn socket_activated(socket: &Path, args: &[&str]) -> Running {
    const WRAPPER: &str = r#"
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1])
s.listen(16)
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
    s.close()
else:
    s.detach()
os.set_inheritable(3, True)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = "1"
os.execv(sys.argv[2], sys.argv[2:])
"#;
    Running::start_command(
        Command::new(support::PYTHON)
            .args(["-c", WRAPPER, path_str(socket), sluice_bin()])
            .args(args),
    )
}

#[test]
fn socket_activation_serves_on_inherited_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("activated.sock");
    let mut r = socket_activated(&socket, &["serve", "memory", "1M"]);
    wait_for_greeting(&socket);
    assert_eq!(
        run("nbdinfo", &["--size", &unix_uri(&socket)]),
        "1048576\n",
        "{}",
        r.stderr()
    );
    assert_eq!(
        r.signal_and_wait(libc::SIGTERM).code(),
        Some(0),
        "{}",
        r.stderr()
    );
}

#[test]
fn socket_activation_stays_in_foreground() {
    // Socket activation implies -f: the process systemd started is the server.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("activated.sock");
    let mut r = socket_activated(&socket, &["serve", "memory", "1M"]);
    wait_for_greeting(&socket);
    let child = r.child.as_mut().unwrap();
    assert!(child.try_wait().unwrap().is_none(), "{}", r.stderr());
}

#[test]
fn socket_activation_prints_inherited_socket_uri() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("activated.sock");
    let r = socket_activated(&socket, &["serve", "memory", "1M"]);
    assert_eq!(r.next_line(), unix_uri(&socket));
}

#[test]
fn exit_with_parent_parent_killed_server_exits_0() {
    become_subreaper();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbd.sock");
    // The parent: a shell that starts sluice, prints its pid and waits on stdin.
    let mut parent = Command::new("/bin/sh")
        .args([
            "-c",
            "\"$0\" \"$@\" >/dev/null 2>&1 & echo $!; read _",
            sluice_bin(),
            "serve",
            "-U",
            path_str(&socket),
            "--exit-with-parent",
            "memory",
            "1M",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(parent.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let pid: i32 = line.trim_end().parse().unwrap();
    // Once it greets clients, sluice has asked to be told of its parent's death.
    wait_for_greeting(&socket);

    parent.kill().unwrap();
    parent.wait().unwrap();

    assert_eq!(wait_pid_exit_code(pid), 0);
    assert!(!socket.exists(), "socket left behind");
}
