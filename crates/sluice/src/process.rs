//! Process plumbing shared by `sluice serve` and `sluice daemon`: logging (to stderr, the
//! system log or nowhere), the pidfile, going into the background, and what nbdkit's
//! command line asks of the process (serving standard input, dropping privileges, locking
//! memory, labelling sockets).
//!
//! Daemonizing forks before any thread exists; the parent then waits on a pipe for the
//! child's verdict, so its exit status tells the caller whether the server really started:
//! `1` means ready (the parent prints an optional line, e.g. the NBD URI, and exits 0), any
//! other text is the child's startup error (printed, exit 1), and a closed pipe means the
//! child died during startup.

use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};

use anyhow::{bail, Context};

use crate::compat::LogTo;

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event (the default).
    #[default]
    Text,
    /// One JSON object per line (tracing-subscriber's JSON layer), for log collectors. The
    /// operator events (connection open/close/refused, failed requests, job state changes,
    /// QMP commands with their outcome) are on by default in this format.
    Json,
}

/// Logs to stderr: info by default, debug with `-v`, or as `SLUICE_LOG` says (tracing's
/// env-filter syntax). Colours only on a terminal.
pub fn init_logging(verbose: bool, format: LogFormat) {
    use std::io::IsTerminal;
    init_logging_to(
        verbose,
        LogTo::Stderr,
        std::io::stderr().is_terminal(),
        format,
    );
}

/// Logs to `dest` (see [`set_log_destination`]), with colours only if `ansi` (a terminal
/// that stays the destination). The operator events (target `sluice::events`) are structured
/// records meant for `--log-format=json`; the text log shows them only with `-v`, so its
/// default lines stay nbdkit's.
pub fn init_logging_to(verbose: bool, dest: LogTo, ansi: bool, format: LogFormat) {
    let default = match (verbose, format) {
        (true, _) => "debug",
        (false, LogFormat::Json) => "info",
        (false, LogFormat::Text) => "info,sluice::events=off",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    set_log_destination(dest);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(LogWriters);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(ansi && dest == LogTo::Stderr)
            .with_target(false)
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_ansi(false)
            .with_target(true)
            .with_current_span(false)
            .try_init(),
    };
}

/// Where log lines go now: 0 stderr, 1 syslog, 2 nowhere.
static LOG_TO: AtomicU8 = AtomicU8::new(0);

/// Sends log lines to `dest` from now on (nbdkit's `--log`; the background switches to the
/// system log, as nbdkit does).
pub fn set_log_destination(dest: LogTo) {
    if dest == LogTo::Syslog {
        // SAFETY: openlog keeps the identity pointer, which is a static C string.
        unsafe { libc::openlog(c"sluice".as_ptr(), libc::LOG_PID, libc::LOG_DAEMON) };
    }
    LOG_TO.store(dest as u8, Ordering::SeqCst);
}

/// Makes the writer for each log line, for the destination at that moment.
struct LogWriters;

/// One log line's writer.
enum LogWriter {
    Stderr(std::io::Stderr),
    /// The line, sent to syslog(3) with this priority when the writer is dropped.
    Syslog(Vec<u8>, libc::c_int),
    Null,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriters {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        self.writer(libc::LOG_INFO)
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> LogWriter {
        let priority = match *meta.level() {
            tracing::Level::ERROR => libc::LOG_ERR,
            tracing::Level::WARN => libc::LOG_WARNING,
            tracing::Level::INFO => libc::LOG_INFO,
            _ => libc::LOG_DEBUG,
        };
        self.writer(priority)
    }
}

impl LogWriters {
    fn writer(&self, priority: libc::c_int) -> LogWriter {
        match LOG_TO.load(Ordering::SeqCst) {
            0 => LogWriter::Stderr(std::io::stderr()),
            1 => LogWriter::Syslog(Vec::new(), priority),
            _ => LogWriter::Null,
        }
    }
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            LogWriter::Stderr(e) => e.write(buf),
            LogWriter::Syslog(line, _) => {
                line.extend_from_slice(buf);
                Ok(buf.len())
            }
            LogWriter::Null => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            LogWriter::Stderr(e) => e.flush(),
            _ => Ok(()),
        }
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        if let LogWriter::Syslog(line, priority) = self {
            let text: Vec<u8> = line
                .iter()
                .copied()
                .filter(|&b| b != 0 && b != b'\n')
                .collect();
            if let Ok(c) = std::ffi::CString::new(text) {
                // SAFETY: a "%s" format with one NUL-terminated string argument.
                unsafe { libc::syslog(*priority, c"%s".as_ptr(), c.as_ptr()) };
            }
        }
    }
}

/// Writes our pid to `path` atomically (a temporary file renamed into place).
pub fn write_pidfile(path: &Path) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{}\n", std::process::id()))
        .and_then(|_| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write pidfile {}", path.display()))
}

/// The child's end of the pipe its waiting parent reads.
#[derive(Debug)]
pub struct Readiness(RawFd);

impl Readiness {
    /// Startup succeeded: the parent exits 0. Standard input, output and error go to
    /// /dev/null from now on (so `$(sluice ...)` in a shell does not wait for the server).
    pub fn ready(self) {
        // SAFETY: writing one byte to our pipe and closing it, then pointing fds 0..2, which
        // we own, at /dev/null.
        unsafe {
            libc::write(self.0, b"1".as_ptr() as *const libc::c_void, 1);
            libc::close(self.0);
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
            if null >= 0 {
                libc::dup2(null, 0);
                libc::dup2(null, 1);
                libc::dup2(null, 2);
                if null > 2 {
                    libc::close(null);
                }
            }
        }
    }

    /// Startup failed: the parent prints `msg` and exits 1.
    pub fn failed(self, msg: &str) {
        // SAFETY: writing the message to our pipe, then closing it.
        unsafe {
            libc::write(self.0, msg.as_ptr() as *const libc::c_void, msg.len());
            libc::close(self.0);
        }
        let _ = std::io::stderr().flush();
    }
}

/// Forks into the background. Returns in the child; the parent waits for the child's
/// [`Readiness`] verdict and exits, printing `on_ready` (if not empty) when it succeeded.
/// Must be called before any thread exists.
pub fn daemonize(on_ready: &str) -> anyhow::Result<Readiness> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills the two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error()).context("pipe");
    }
    // SAFETY: no threads exist yet (the caller guarantees it), so fork is safe.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()).context("fork"),
        0 => {
            // SAFETY: closing our copy of the read end; setsid detaches from the terminal.
            unsafe {
                libc::close(fds[0]);
                libc::setsid();
            }
            Ok(Readiness(fds[1]))
        }
        _ => {
            // SAFETY: closing our copy of the write end.
            unsafe { libc::close(fds[1]) };
            let mut msg = Vec::new();
            let mut b = [0u8; 4096];
            loop {
                // SAFETY: reading into a buffer of the given length.
                let n = unsafe { libc::read(fds[0], b.as_mut_ptr() as *mut libc::c_void, b.len()) };
                if n <= 0 {
                    break;
                }
                msg.extend_from_slice(&b[..n as usize]);
            }
            if msg == b"1" {
                if !on_ready.is_empty() {
                    println!("{on_ready}");
                }
                std::process::exit(0);
            }
            let text = String::from_utf8_lossy(&msg);
            if text.is_empty() {
                eprintln!("sluice: the server exited during startup");
            } else {
                eprintln!("{text}");
            }
            std::process::exit(1);
        }
    }
}

/// `-s`: the client on standard input/output, as a stream of its own. Standard input and
/// output are pointed at /dev/null afterwards, so that the connection closes when the
/// server is done with it (libnbd's `connect_command` waits for that). A socket on standard
/// input (inetd, `connect_command`'s socketpair) is one two-way stream; anything else (two
/// pipes, as nbdkit also accepts) is read from standard input and written to standard output.
pub fn stdio_stream() -> anyhow::Result<sluice_server::Stream> {
    // SAFETY: sockaddr_storage is plain old data.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: fd 0 is ours to query; ss/len describe a writable buffer.
    let socket =
        unsafe { libc::getsockname(0, &mut ss as *mut _ as *mut libc::sockaddr, &mut len) } == 0;
    if !socket {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOTSOCK) {
            bail!("-s: standard input must be open (a socket or a pipe): {e}");
        }
    }
    let dup = |from: i32, what: &str| -> anyhow::Result<std::os::fd::OwnedFd> {
        // SAFETY: duplicating an fd of ours to a new descriptor we then own.
        let fd = unsafe { libc::fcntl(from, libc::F_DUPFD_CLOEXEC, 3) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("-s: dup of {what}"));
        }
        // SAFETY: fd was just created by F_DUPFD and is owned by nobody else.
        Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
    };
    let input = dup(0, "standard input")?;
    let output = if socket {
        None
    } else {
        Some(dup(1, "standard output")?)
    };
    // SAFETY: pointing fds 0 and 1, which we own, at /dev/null.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            if null > 2 {
                libc::close(null);
            }
        }
    }
    Ok(match output {
        Some(output) => sluice_server::Stream::pipe(input.into(), output.into()),
        None if i32::from(ss.ss_family) == libc::AF_UNIX => {
            sluice_server::Stream::unix(std::os::unix::net::UnixStream::from(input))
        }
        None => sluice_server::Stream::tcp(std::net::TcpStream::from(input)),
    })
}

/// `-g GROUP` and `-u USER`, after the sockets are bound: the group first (with the
/// supplementary groups dropped), then the user, as nbdkit does. Names or numbers.
pub fn change_user(user: Option<&str>, group: Option<&str>) -> anyhow::Result<()> {
    if let Some(g) = group {
        let gid = lookup_id(g, false)?;
        // SAFETY: plain system calls with a gid value and a one-element array.
        unsafe {
            if libc::setgid(gid) != 0 {
                return Err(std::io::Error::last_os_error()).context(format!("setgid {g}"));
            }
            if libc::setgroups(1, &gid) != 0 {
                return Err(std::io::Error::last_os_error()).context("setgroups");
            }
        }
        tracing::debug!("changed group to {g}");
    }
    if let Some(u) = user {
        let uid = lookup_id(u, true)?;
        // SAFETY: a plain system call with a uid value.
        if unsafe { libc::setuid(uid) } != 0 {
            return Err(std::io::Error::last_os_error()).context(format!("setuid {u}"));
        }
        tracing::debug!("changed user to {u}");
    }
    Ok(())
}

/// A user (`user`) or group id from a number or a name.
fn lookup_id(name: &str, user: bool) -> anyhow::Result<u32> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(n);
    }
    let c = std::ffi::CString::new(name).context("a user or group name has no NUL byte")?;
    let mut buf = vec![0 as libc::c_char; 16384];
    let id = if user {
        // SAFETY: passwd is plain old data filled by getpwnam_r within `buf`.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut out = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; buf's length is passed.
        unsafe { libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
        (!out.is_null()).then_some(pw.pw_uid)
    } else {
        // SAFETY: group is plain old data filled by getgrnam_r within `buf`.
        let mut gr: libc::group = unsafe { std::mem::zeroed() };
        let mut out = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; buf's length is passed.
        unsafe { libc::getgrnam_r(c.as_ptr(), &mut gr, buf.as_mut_ptr(), buf.len(), &mut out) };
        (!out.is_null()).then_some(gr.gr_gid)
    };
    id.ok_or_else(|| {
        anyhow::anyhow!(
            "{} '{name}' not found",
            if user { "-u: user" } else { "-g: group" }
        )
    })
}

/// `--swap`: keep every page of the server in memory, so that serving a swap device never
/// waits for swap.
pub fn lock_memory() -> anyhow::Result<()> {
    // SAFETY: mlockall only changes this process's memory locking.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } != 0 {
        let e = std::io::Error::last_os_error();
        bail!("--swap: mlockall: {e} (raise RLIMIT_MEMLOCK, `ulimit -l`, or run as root)");
    }
    Ok(())
}

/// The size from which glibc's malloc serves a block with a mapping of its own, which goes
/// back to the kernel when freed: 4 MiB and two pages, so request buffers up to 4 MiB
/// (nbdcopy's 256 KiB, qemu's 2 MiB, fio's 4 MiB, with the worker's headroom) still come
/// from the arenas and are reused, and so do page-aligned 4 MiB blocks: librbd's messenger
/// receives each object it reads into `posix_memalign(4096, 4 MiB)`, which glibc serves
/// from a block of 4 MiB + 4 KiB + 32 bytes. At 4 MiB and one page that block was a fresh
/// mapping per read, faulted in page by page and given back: `sluice serve rbd` under fio
/// (4 MiB sequential reads, 16 in flight, 6 GiB) took 1.6 million page faults and 7.8 s of
/// CPU; at two pages 0.11 million and 4.2 s, and read 1.5x faster (`bench/rbd-bench.py`).
/// 8 MiB requests are still mapped and given back (`tests/limits.rs`).
pub const MMAP_THRESHOLD: usize = (4 << 20) + 8192;

/// How much free memory at the top of an arena glibc keeps instead of giving it back: 1 MiB,
/// so one connection's buffers (a 256 KiB read buffer, a 64 KiB worker buffer) stay for the
/// next connection, while the free tops of sixteen idle arenas come to 16 MiB at most.
pub const TRIM_THRESHOLD: usize = 1 << 20;

/// Fixes glibc's mmap threshold at [`MMAP_THRESHOLD`] and its trim threshold at
/// [`TRIM_THRESHOLD`]. By default glibc raises the mmap threshold to the size of each mapped
/// block freed (up to 32 MiB) and the trim threshold to twice that, so after a few large
/// requests its arenas (one per busy thread, up to 16 here) keep up to tens of MiB each once
/// freed. A server whose connections come and go on many threads kept more memory after
/// every busy spell: with `bench/soak.py`'s fio and nbdcopy clients against the daemon, its
/// idle RSS after five 40-second spells was 29, 34, 38, 43, 43 MiB; with the mmap threshold
/// fixed, 16 to 17 MiB after each. Fixing the mmap threshold alone also pins the trim
/// threshold at glibc's 128 KiB, so every connection's buffers went back to the kernel when
/// it closed and were faulted in again by the next: in `bench/nbd-bench.py`'s `connections`
/// row a file export spent 128 µs of CPU per connection (6100 a second) where it had spent
/// 76; with the trim threshold at 1 MiB, 72 µs (8900 a second). A memory export's figures
/// moved with neither change. `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_` in the
/// environment are glibc's own settings and each wins over ours. Does nothing on other C
/// libraries.
pub fn fix_malloc_thresholds() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let settings = [
            (
                "MALLOC_MMAP_THRESHOLD_",
                libc::M_MMAP_THRESHOLD,
                MMAP_THRESHOLD,
            ),
            (
                "MALLOC_TRIM_THRESHOLD_",
                libc::M_TRIM_THRESHOLD,
                TRIM_THRESHOLD,
            ),
        ];
        for (env, param, value) in settings {
            if std::env::var_os(env).is_none() {
                // SAFETY: mallopt only changes malloc's parameters; main calls this before
                // any thread exists.
                unsafe { libc::mallopt(param, value as libc::c_int) };
            }
        }
    }
}

/// `--selinux-label`: sockets this thread creates while the guard lives get `label`
/// (setsockcreatecon(3), written straight to the kernel's attribute file).
pub struct SocketLabel(bool);

impl SocketLabel {
    pub fn set(label: Option<&str>) -> anyhow::Result<SocketLabel> {
        let Some(label) = label else {
            return Ok(SocketLabel(false));
        };
        std::fs::write("/proc/thread-self/attr/sockcreate", label).map_err(|e| {
            let why = if Path::new("/sys/fs/selinux").exists() {
                String::new()
            } else {
                " (SELinux is not enabled on this system)".to_string()
            };
            anyhow::anyhow!("--selinux-label: cannot label the listening sockets: {e}{why}")
        })?;
        Ok(SocketLabel(true))
    }
}

impl Drop for SocketLabel {
    fn drop(&mut self) {
        if self.0 {
            let _ = std::fs::write("/proc/thread-self/attr/sockcreate", "");
        }
    }
}
