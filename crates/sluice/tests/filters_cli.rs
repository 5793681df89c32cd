//! The server-level filters and the `nbdkit` drop-in, each against Debian's nbdkit 1.32.5:
//! the same plugin, parameters and client requests under nbdkit with its C filter and under
//! sluice (run through an `nbdkit` symlink first on PATH) with its own must give the same
//! data, the same `nbdinfo --json`, the same errors, and for log and stats the same lines
//! apart from timestamps and timings. Then what tools that exec `nbdkit` rely on: `-s` under
//! libnbd's `connect_command`, `nbdcopy -- [ nbdkit ... ]`, `--run` variables, `-o`, `--no-sr`,
//! `--mask-handshake`, `-u`/`-g`; and virt-v2v's filter stack over C, Python and file plugins.

use crate::support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use support::captive::{
    log_lines, nbdkit_link_dir, nbdkit_plugin, path_for, same_output, without_uris, Peer, BOTH,
};
use support::{path_str, random_file, sluice_bin, wait_timeout, PYTHON};

/// Writes a Python client script (`uri` is its first argument) and returns its path.
fn script(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    let text = format!("import nbd, sys, os, socket, threading, time\nuri = sys.argv[1]\n{body}\n");
    std::fs::write(&path, text).unwrap();
    path_str(&path).to_string()
}

fn memory() -> String {
    nbdkit_plugin("memory")
}

/// Stats lines with the times and rates (which differ from run to run) masked.
fn stats_shape(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| {
            let Some((head, rest)) = l.split_once(": ") else {
                return l.to_string();
            };
            if !rest.contains(" ops, ") {
                return l.to_string();
            }
            let parts: Vec<String> = rest
                .split(", ")
                .map(|p| {
                    if p.ends_with(" s") {
                        "T s".to_string()
                    } else if let Some(i) = p.find("/s") {
                        format!("R{}", &p[i..])
                    } else {
                        p.to_string()
                    }
                })
                .collect();
            format!("{head}: {}", parts.join(", "))
        })
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A foreground server of `peer` on a Unix socket in `dir`, once it greets clients.
fn start_foreground(peer: Peer, dir: &Path, args: &[&str]) -> (Child, String) {
    let sock = dir.join(format!("{peer:?}.sock"));
    let mut all = vec!["-f", "-U", path_str(&sock)];
    all.extend_from_slice(args);
    let mut child = peer
        .command(&all)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut s) = UnixStream::connect(&sock) {
            let mut magic = [0u8; 8];
            if s.read_exact(&mut magic).is_ok() && &magic == b"NBDMAGIC" {
                break;
            }
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "{peer:?} {args:?} exited early"
        );
        assert!(
            Instant::now() < deadline,
            "{peer:?} {args:?} never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, format!("nbd+unix:///?socket={}", sock.display()))
}

fn nbdinfo_ok(peer: Peer, args: &[&str]) -> bool {
    std::process::Command::new("nbdinfo")
        .args(args)
        .env("PATH", path_for(peer))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

// ---------------------------------------------------------------------------------------
// log and stats: the same lines

#[test]
fn log_lines_match_nbdkit_apart_from_timestamps() {
    let dir = tempfile::tempdir().unwrap();
    let session = script(
        dir.path(),
        "session.py",
        r#"
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(uri)
h.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_FUA)
h.pread(512, 0)
h.flush()
h.zero(512, 4096)
h.zero(512, 8192, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
h.trim(512, 512)
h.cache(512, 0)
h.block_status(65536, 0, lambda *a: 0)
h.block_status(65536, 0, lambda *a: 0, nbd.CMD_FLAG_REQ_ONE)
h.shutdown()
"#,
    );
    let run = format!(
        "{PYTHON} {session} \"$uri\" && nbdinfo --json \"$uri\" >/dev/null && \
         nbdinfo --list \"$uri\" >/dev/null"
    );
    let mem = memory();
    for (i, extra) in [&[][..], &["-r", "-e", "disk one"][..]]
        .into_iter()
        .enumerate()
    {
        let mut logs = Vec::new();
        for peer in BOTH {
            let log = dir.path().join(format!("{peer:?}.log"));
            let logfile = format!("logfile={}", log.display());
            let mut args = extra.to_vec();
            args.extend(["--filter=log", &mem, "size=1M", &logfile]);
            let script = if extra.is_empty() {
                run.clone()
            } else {
                "nbdinfo --json \"$uri\" >/dev/null".to_string()
            };
            peer.captive_ok(&args, &script);
            logs.push(log_lines(&std::fs::read_to_string(&log).unwrap()));
        }
        assert_eq!(
            logs[1], logs[0],
            "sluice (left) and nbdkit (right), {extra:?}"
        );
        let shows = |what: &str| logs[0].iter().any(|l| l.contains(what));
        assert!(shows(if i == 0 {
            " Extents id="
        } else {
            "export=\"disk one\""
        }));
    }
}

#[test]
fn log_lines_show_errors_from_the_layer_below_as_nbdkit() {
    let dir = tempfile::tempdir().unwrap();
    let read = script(
        dir.path(),
        "read.py",
        r#"
h = nbd.NBD()
h.connect_uri(uri)
try:
    h.pread(512, 0)
except nbd.Error as e:
    print("pread", e.errno)
h.pwrite(b"y" * 512, 0)
"#,
    );
    let mem = memory();
    let mut logs = Vec::new();
    for peer in BOTH {
        let log = dir.path().join(format!("{peer:?}.log"));
        let logfile = format!("logfile={}", log.display());
        let args = [
            "--filter=log",
            "--filter=error",
            &mem,
            "size=1M",
            &logfile,
            "error=ENOSPC",
            "error-pread-rate=100%",
        ];
        let out = peer.captive_ok(&args, &format!("{PYTHON} {read} \"$uri\""));
        assert_eq!(out, "pread ENOSPC\n", "{peer:?}");
        logs.push(log_lines(&std::fs::read_to_string(&log).unwrap()));
    }
    assert_eq!(logs[1], logs[0]);
    assert!(logs[0].contains(&"connection=1 ...Read id=1 return=-1 error=ENOSPC".to_string()));
}

#[test]
fn logscript_gets_the_same_variables_as_with_nbdkit() {
    let dir = tempfile::tempdir().unwrap();
    let mem = memory();
    let mut outs = Vec::new();
    for peer in BOTH {
        let out = dir.path().join(format!("{peer:?}.txt"));
        let logscript = format!(
            "logscript=echo \"$type $act ${{connection-}} ${{id-}} ${{offset-}} ${{count-}} \
             ${{return-}}\" >> {}",
            out.display()
        );
        peer.captive_ok(
            &["--filter=log", &mem, "size=1M", &logscript],
            "nbdsh -u \"$uri\" -c 'h.pwrite(b\"z\" * 4096, 4096); h.pread(4096, 4096)'",
        );
        // Every line once; nbdkit's own order varies from run to run.
        let mut lines: Vec<String> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        lines.sort();
        outs.push(lines.join("\n"));
    }
    assert_eq!(outs[1], outs[0]);
    assert!(
        outs[0].contains("ENTER Write 1 1 0x1000 0x1000"),
        "{}",
        outs[0]
    );
}

#[test]
fn stats_match_nbdkit_apart_from_timings() {
    let dir = tempfile::tempdir().unwrap();
    let session = script(
        dir.path(),
        "session.py",
        r#"
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(uri)
for off in (0, 4096, 8192):
    h.pwrite(b"w" * 4096, off)
h.pwrite(b"w" * 512, 512)
h.pread(512, 0)
h.pread(512, 1024)
h.pread(32768, 65536)
h.trim(4096, 4096)
h.zero(8192, 16384)
h.flush()
h.cache(4096, 0)
h.block_status(65536, 0, lambda *a: 0)
"#,
    );
    let mem = memory();
    let mut stats = Vec::new();
    for peer in BOTH {
        let file = dir.path().join(format!("{peer:?}.stats"));
        let statsfile = format!("statsfile={}", file.display());
        peer.captive_ok(
            &["--filter=stats", &mem, "size=1M", &statsfile],
            &format!("{PYTHON} {session} \"$uri\""),
        );
        stats.push(stats_shape(&std::fs::read_to_string(&file).unwrap()));
    }
    assert_eq!(stats[1], stats[0], "sluice (left) and nbdkit (right)");
    assert!(
        stats[0][0].starts_with("total: 11 ops, T s, "),
        "{:?}",
        stats[0]
    );
    // statsappend and statsthreshold=0 (no histogram), against the same file.
    let mut stats = Vec::new();
    for peer in BOTH {
        let file = dir.path().join(format!("{peer:?}.stats"));
        let statsfile = format!("statsfile={}", file.display());
        peer.captive_ok(
            &[
                "--filter=stats",
                &mem,
                "size=1M",
                &statsfile,
                "statsappend=true",
                "statsthreshold=0",
            ],
            "nbdsh -u \"$uri\" -c 'h.pread(512, 0)'",
        );
        stats.push(stats_shape(&std::fs::read_to_string(&file).unwrap()));
    }
    assert_eq!(stats[1], stats[0]);
}

/// sluice's server answers a large read of a hole from block status without a pread; a layer
/// that logs or counts reads turns that off, so over the built-in (sparse) memory plugin the
/// log and stats filters see every read, as under nbdkit (which never takes that shortcut).
#[test]
fn log_and_stats_see_large_reads_of_holes_as_nbdkit() {
    let dir = tempfile::tempdir().unwrap();
    let session = script(
        dir.path(),
        "holes.py",
        r#"
h = nbd.NBD()
h.connect_uri(uri)
assert h.pread(1 << 20, 0) == bytes(1 << 20)
h.pread(65536, 1 << 20)
h.pread(2 << 20, 2 << 20)
"#,
    );
    let (mut logs, mut stats) = (Vec::new(), Vec::new());
    for peer in BOTH {
        let log = dir.path().join(format!("{peer:?}.holes.log"));
        let file = dir.path().join(format!("{peer:?}.holes.stats"));
        let logfile = format!("logfile={}", log.display());
        let statsfile = format!("statsfile={}", file.display());
        peer.captive_ok(
            &[
                "--filter=log",
                "--filter=stats",
                "memory",
                "size=4M",
                &logfile,
                &statsfile,
                "statsthreshold=0",
            ],
            &format!("{PYTHON} {session} \"$uri\""),
        );
        logs.push(log_lines(&std::fs::read_to_string(&log).unwrap()));
        stats.push(stats_shape(&std::fs::read_to_string(&file).unwrap()));
    }
    assert_eq!(logs[1], logs[0], "log: sluice (left) and nbdkit (right)");
    assert_eq!(
        stats[1], stats[0],
        "stats: sluice (left) and nbdkit (right)"
    );
    let reads = logs[0].iter().filter(|l| l.contains("Read id=")).count();
    assert_eq!(
        reads, 6,
        "a request and a reply line per read: {:?}",
        logs[0]
    );
    assert!(
        stats[0].iter().any(|l| l.starts_with("read: 3 ops")),
        "{:?}",
        stats[0]
    );
}

/// A Python plugin that writes each callback it gets to the file named by `log=`.
const COUNTING_PLUGIN: &str = r#"
import builtins
API_VERSION = 2
LOG = None
disk = bytearray(1 << 20)
def config(key, value):
    global LOG
    LOG = value
def log(what):
    with builtins.open(LOG, "a") as f:
        f.write(what + "\n")
def open(readonly): log("open"); return 1
def get_size(h): log("get_size"); return len(disk)
def can_write(h): log("can_write"); return True
def can_flush(h): log("can_flush"); return True
def is_rotational(h): log("is_rotational"); return False
def can_trim(h): log("can_trim"); return True
def can_zero(h): log("can_zero"); return True
def can_fast_zero(h): log("can_fast_zero"); return False
def can_fua(h): log("can_fua"); return 2
def can_multi_conn(h): log("can_multi_conn"); return True
def can_cache(h): log("can_cache"); return 2
def can_extents(h): log("can_extents"); return True
def pread(h, buf, offset, flags): buf[:] = disk[offset:offset + len(buf)]
def pwrite(h, buf, offset, flags): disk[offset:offset + len(buf)] = buf
def flush(h, flags): pass
def trim(h, count, offset, flags): pass
def zero(h, count, offset, flags): disk[offset:offset + count] = bytes(count)
def cache(h, count, offset, flags): pass
def extents(h, count, offset, flags): return [(offset, count, 0)]
"#;

/// nbdkit asks each `can_*` (and `get_size`) of a plugin at most once per connection and keeps
/// the answer, whatever the filters above ask; a plugin that counts its calls sees the same
/// counts under sluice. One deliberate difference: the filters that do the layer below's
/// emulation themselves (cache, nozero, fua, blocksize: `Lower` in `filters/lower.rs`) ask
/// its capabilities when the connection opens, where nbdkit asks when first needed, so the
/// plugin sees a few more callbacks, still each once; those extras are listed exactly.
#[test]
fn each_can_callback_reaches_the_plugin_as_often_as_under_nbdkit() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("counting.py");
    std::fs::write(&plugin, COUNTING_PLUGIN).unwrap();
    let stacks: [(&[&str], &[&str]); 6] = [
        (&[], &[]),
        (&["-r"], &[]),
        (&["--filter=cow"], &[]),
        (&["--filter=cache"], &["can_cache", "can_fast_zero"]),
        (&["--filter=nozero"], &["can_fast_zero", "can_zero"]),
        (
            &["--filter=cow", "--filter=cache", "--filter=nozero"],
            &["can_cache", "can_extents", "can_flush"],
        ),
    ];
    for (stack, extra) in stacks {
        let mut counts = Vec::new();
        for peer in BOTH {
            let log = dir.path().join(format!("{peer:?}.calls"));
            let _ = std::fs::remove_file(&log);
            let logarg = format!("log={}", log.display());
            let mut args = stack.to_vec();
            args.extend(["python", path_str(&plugin), &logarg]);
            peer.captive_ok(&args, "nbdsh -u \"$uri\" -c 'h.pread(512, 0)'");
            let mut calls = std::collections::BTreeMap::<String, u32>::new();
            for l in std::fs::read_to_string(&log).unwrap().lines() {
                *calls.entry(l.to_string()).or_default() += 1;
            }
            counts.push(calls);
        }
        let (nbdkit, sluice) = (&counts[0], &counts[1]);
        assert!(
            sluice.values().all(|n| *n == 1),
            "{stack:?}: a callback asked twice: {sluice:?}"
        );
        let mut expected = nbdkit.clone();
        for e in extra {
            assert_eq!(expected.insert(e.to_string(), 1), None, "{stack:?}: {e}");
        }
        assert_eq!(
            sluice, &expected,
            "{stack:?}: sluice (left), nbdkit's plus {extra:?} (right)"
        );
    }
}

/// tls-fallback under `--tls=on`: a plaintext client gets one read-only 512-byte export
/// holding the message (the export name it asked for is ignored, the list shows only ""),
/// a TLS client gets the plugin; the same `nbdinfo --json`, bytes and sizes as nbdkit.
#[test]
fn tls_fallback_serves_the_readme_to_plaintext_clients_as_nbdkit() {
    let psk = support::tls::Pki::get().psk();
    let tls_psk = format!("--tls-psk={}", psk.display());
    let check = format!(
        "nbdinfo --json \"$uri\" && nbdinfo --list --json \"$uri\" && \
         nbdsh -u \"nbd+unix:///other?socket=$unixsocket\" \
           -c 'print(h.get_size(), h.is_read_only(), bytes(h.pread(512, 0)))' && \
         nbdinfo --size \"nbds+unix://{user}@/?socket=$unixsocket&tls-psk-file={psk}\"",
        user = support::tls::PSK_USER,
        psk = psk.display()
    );
    for readme in [None, Some("tlsreadme=read the manual")] {
        let mut args = vec![
            "--tls=on",
            &tls_psk,
            "--filter=tls-fallback",
            "memory",
            "1M",
        ];
        args.extend(readme);
        let outs: Vec<String> = BOTH
            .iter()
            .map(|peer| {
                let out = peer.captive_ok(&args, &check);
                // The JSON documents, without socket paths; the rest as printed.
                let mut text = String::new();
                let mut de =
                    serde_json::Deserializer::from_str(&out).into_iter::<serde_json::Value>();
                for v in de.by_ref() {
                    match v {
                        Ok(v) => text.push_str(&format!("{}\n", without_uris(v))),
                        Err(_) => break,
                    }
                }
                let rest = out.split("}\n").last().unwrap_or_default().to_string();
                text + &rest
            })
            .collect();
        assert_eq!(
            outs[1], outs[0],
            "{readme:?}: sluice (left) and nbdkit (right)"
        );
        let want = readme.map_or("This NBD server requires TLS", |r| &r[10..]);
        assert!(
            outs[0].contains(&format!("512 True b'{want}")),
            "{}",
            outs[0]
        );
        assert!(outs[0].ends_with("1048576\n"), "{}", outs[0]);
    }
}

// ---------------------------------------------------------------------------------------
// ip, limit, exportname: who may connect and what they see

#[test]
fn ip_refuses_unix_clients_by_uid_and_gid_as_nbdkit() {
    // SAFETY: getuid and getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mem = memory();
    for (rules, admitted) in [
        (vec![format!("allow=uid:{uid}"), "deny=all".into()], true),
        (
            vec![format!("allow=uid:{}", uid + 1), "deny=all".into()],
            false,
        ),
        (vec![format!("deny=gid:{gid}")], false),
        (vec!["allow=anyunix".into(), "deny=all".into()], true),
        (vec!["deny=allipv4,allipv6".into()], true),
    ] {
        for peer in BOTH {
            let mut args = vec!["--filter=ip", &mem, "size=1M"];
            args.extend(rules.iter().map(String::as_str));
            let out = peer.captive(&args, "nbdinfo --size \"$uri\"");
            assert_eq!(
                out.status.success(),
                admitted,
                "{peer:?} {rules:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Debian's nbdkit 1.32.5 ip filter cannot parse addresses at all (its build lacks
/// inet_pton: `allow=127.0.0.1` is "don't know how to parse rule"), so it is the reference
/// for the address-family keywords only; address and CIDR rules are checked on sluice alone.
#[test]
fn ip_refuses_tcp_clients_by_address_as_nbdkit() {
    let mem = memory();
    let keyword_rules: [(&[&str], bool); 4] = [
        (&["deny=allipv4"], false),
        (&["allow=anyipv4", "deny=all"], true),
        (&["deny=anyipv6"], true),
        (&["allow=allunix", "deny=all"], false),
    ];
    let address_rules: [(&[&str], bool); 4] = [
        (&["deny=127.0.0.0/8"], false),
        (&["allow=127.0.0.1", "deny=all"], true),
        (&["allow=::1,10.0.0.0/8", "deny=all"], false),
        (&["deny=10.0.0.0/8,192.168.0.0/16"], true),
    ];
    let cases = keyword_rules
        .iter()
        .flat_map(|c| BOTH.map(|p| (p, c)))
        .chain(address_rules.iter().map(|c| (Peer::Sluice, c)));
    for (peer, (rules, admitted)) in cases {
        {
            let port = free_port().to_string();
            let mut args = vec![
                "-i",
                "127.0.0.1",
                "-p",
                &port,
                "--filter=ip",
                &mem,
                "size=1M",
            ];
            args.extend_from_slice(rules);
            let run = format!("nbdinfo --size nbd://127.0.0.1:{port}/");
            args.extend(["--run", &run]);
            let out = peer.command(&args).output().unwrap();
            assert_eq!(out.status.success(), *admitted, "{peer:?} {rules:?}");
        }
    }
}

#[test]
fn limit_refuses_the_client_over_the_limit_as_nbdkit() {
    let dir = tempfile::tempdir().unwrap();
    let clients = script(
        dir.path(),
        "clients.py",
        r#"
def connect():
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
        return h
    except nbd.Error:
        return None
a = connect()
b = connect()
print("first", a is not None, "second", b is not None)
a.shutdown()
del a
for i in range(100):
    c = connect()
    if c is not None:
        break
    time.sleep(0.05)
print("after the first left", c is not None)
"#,
    );
    let mem = memory();
    same_output(
        &["--filter=limit", &mem, "size=1M"],
        &format!("{PYTHON} {clients} \"$uri\""),
    );
    let out = same_output(
        &["--filter=limit", &mem, "size=1M", "limit=2"],
        &format!("{PYTHON} {clients} \"$uri\""),
    );
    assert!(out.starts_with("first True second True"), "{out}");
}

#[test]
fn exportname_lists_describes_and_restricts_as_nbdkit() {
    let mem = memory();
    for params in [
        &[
            "exportname-list=explicit",
            "exportname=a",
            "exportname=b c",
            "exportdesc=fixed:hi",
        ][..],
        &["exportname-list=defaultonly", "default-export=d"][..],
        &["exportname-list=empty"][..],
        &["exportname=x", "exportdesc=script:echo \"<$name>\""][..],
    ] {
        let mut args = vec!["--filter=exportname", &mem, "size=1M"];
        args.extend_from_slice(params);
        let mut lists = Vec::new();
        for peer in BOTH {
            let out = peer.captive_ok(&args, "nbdinfo --list --json \"$uri\"");
            lists.push(without_uris(serde_json::from_str(&out).unwrap()));
        }
        assert_eq!(lists[1], lists[0], "{params:?}");
    }
    // Refused list, and a strict server: only the listed name may be asked for.
    for (params, script, ok) in [
        (
            &["exportname-list=error"][..],
            "nbdinfo --list \"$uri\"",
            false,
        ),
        (
            &["exportname-strict=true", "exportname=a"][..],
            "nbdinfo \"$uri\"",
            false,
        ),
        (
            &["exportname-strict=true", "exportname=a"][..],
            "nbdinfo \"nbd+unix:///a?socket=$unixsocket\"",
            true,
        ),
    ] {
        let mut args = vec!["--filter=exportname", &mem, "size=1M"];
        args.extend_from_slice(params);
        for peer in BOTH {
            let out = peer.captive(&args, script);
            assert_eq!(out.status.success(), ok, "{peer:?} {params:?} {script}");
        }
    }
}

#[test]
fn filters_leave_nbdinfo_json_as_nbdkit_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    let mem = memory();
    let stats = format!("statsfile={}", dir.path().join("s").display());
    let log = format!("logfile={}", dir.path().join("l").display());
    let ctl = format!("pause-control={}", dir.path().join("ctl").display());
    for (filter, params) in [
        ("--filter=ip", &["allow=all"][..]),
        ("--filter=limit", &["limit=3"][..]),
        (
            "--filter=exportname",
            &["default-export=e", "exportdesc=fixed:d"][..],
        ),
        ("--filter=log", &[log.as_str()][..]),
        ("--filter=stats", &[stats.as_str()][..]),
        ("--filter=exitwhen", &["exit-when-script=exit 0"][..]),
        ("--filter=pause", &[ctl.as_str()][..]),
        // Not exitlast: nbdkit counts nbdinfo's NBD_OPT_INFO handle as a client and begins
        // to exit when it closes, so its nbdinfo finds no content (see exitlast.rs).
    ] {
        let mut args = vec!["-r", filter, mem.as_str(), "size=1M"];
        args.extend_from_slice(params);
        let filter_args = &args;
        let mut infos = Vec::new();
        for peer in BOTH {
            let out = peer.captive_ok(&args, "nbdinfo --json \"$uri\"");
            infos.push(without_uris(serde_json::from_str(&out).unwrap()));
        }
        assert_eq!(infos[1], infos[0], "{filter_args:?}");
    }
}

// ---------------------------------------------------------------------------------------
// exitlast, exitwhen, pause: the process and the control socket

#[test]
fn exitlast_exits_0_after_the_last_client_as_nbdkit() {
    let dir = tempfile::tempdir().unwrap();
    let mem = memory();
    for peer in BOTH {
        let (mut child, uri) =
            start_foreground(peer, dir.path(), &["--filter=exitlast", &mem, "size=1M"]);
        // The greeting probe above did not open the export: still serving.
        std::thread::sleep(Duration::from_millis(200));
        assert!(child.try_wait().unwrap().is_none(), "{peer:?} exited early");
        assert!(nbdinfo_ok(peer, &["--json", &uri]));
        let st = wait_timeout(&mut child, Duration::from_secs(10)).expect("did not exit");
        assert_eq!(st.code(), Some(0), "{peer:?}");
    }
}

#[test]
fn exitwhen_exits_once_the_file_appears_or_at_once_if_it_exists() {
    let dir = tempfile::tempdir().unwrap();
    let mem = memory();
    for peer in BOTH {
        let stop = dir.path().join(format!("{peer:?}.stop"));
        let event = format!("exit-when-file-created={}", stop.display());
        let (mut child, uri) = start_foreground(
            peer,
            dir.path(),
            &[
                "--filter=exitwhen",
                &mem,
                "size=1M",
                &event,
                "exit-when-poll=1",
            ],
        );
        assert!(nbdinfo_ok(peer, &["--size", &uri]));
        std::fs::write(&stop, "").unwrap();
        let st = wait_timeout(&mut child, Duration::from_secs(15)).expect("did not exit");
        assert_eq!(st.code(), Some(0), "{peer:?}");
        // Already there at startup: exit 0 before running anything.
        let out = peer.captive(&["--filter=exitwhen", &mem, "size=1M", &event], "echo ran");
        assert_eq!(out.status.code(), Some(0), "{peer:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "", "{peer:?}");
    }
}

#[test]
fn pause_control_socket_speaks_nbdkits_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let client = script(
        dir.path(),
        "pause.py",
        r#"
h = nbd.NBD()
h.connect_uri(uri)
c = socket.socket(socket.AF_UNIX)
c.connect(sys.argv[2])
c.sendall(b"p")
print("pause ->", c.recv(1))
done = []
t = threading.Thread(target=lambda: done.append(h.pread(512, 0)))
t.start()
time.sleep(0.5)
print("read while paused finished:", bool(done))
c.sendall(b" q")
print("unknown ->", c.recv(1))
c.sendall(b"r")
print("resume ->", c.recv(1))
t.join(10)
print("read after resume finished:", bool(done))
"#,
    );
    let mem = memory();
    let ctl = dir.path().join("ctl");
    let out = same_output(
        &[
            "--filter=pause",
            &mem,
            "size=1M",
            &format!("pause-control={}", ctl.display()),
        ],
        &format!("{PYTHON} {client} \"$uri\" {}", ctl.display()),
    );
    assert!(out.contains("read while paused finished: False"), "{out}");
    assert!(out.contains("read after resume finished: True"), "{out}");
}

// ---------------------------------------------------------------------------------------
// The command line: help, dump-plugin, errors

/// The `--help` lines a filter adds, without nbdkit's line naming the .so file.
fn help_section(peer: Peer, filter: &str) -> Vec<String> {
    let out = peer
        .command(&[&format!("--filter={filter}"), "null", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{peer:?} --filter={filter} --help");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let start = text
        .find(&format!("filter: {filter} ("))
        .unwrap_or_else(|| panic!("{peer:?}: no section for {filter} in:\n{text}"));
    text[start..]
        .lines()
        .skip(1)
        .filter(|l| !(l.starts_with('(') && l.ends_with(".so)")))
        .take_while(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn help_lists_what_each_filter_adds_as_nbdkit() {
    for filter in [
        "exitlast",
        "exitwhen",
        "exportname",
        "ip",
        "limit",
        "log",
        "pause",
        "stats",
    ] {
        assert_eq!(
            help_section(Peer::Sluice, filter),
            help_section(Peer::Nbdkit, filter),
            "{filter}"
        );
    }
}

#[test]
fn dump_plugin_with_filters_shows_the_stacks_thread_model() {
    let data = nbdkit_plugin("data");
    for filters in [
        &["--filter=log", "--filter=ip"][..],
        &["--filter=exitlast", "--filter=noparallel"][..],
    ] {
        let mut lines = Vec::new();
        for peer in BOTH {
            let mut args = filters.to_vec();
            args.extend([data.as_str(), "1 2 3", "--dump-plugin"]);
            let out = peer.command(&args).output().unwrap();
            assert!(out.status.success(), "{peer:?} {filters:?}");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let models: Vec<String> = text
                .lines()
                .filter(|l| l.contains("thread_model="))
                .map(str::to_string)
                .collect();
            lines.push(models);
        }
        assert_eq!(lines[1], lines[0], "{filters:?}");
    }
    // Parameters are checked (nbdkit's .config), though nothing is opened.
    for peer in BOTH {
        let out = peer
            .command(&["--filter=limit", "null", "limit=many", "--dump-plugin"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{peer:?}");
    }
}

/// `sluice serve ARGS` (or `nbdkit ARGS` through the link) must fail with exit status
/// `code` and one `sluice:` line on stderr containing `says`.
fn assert_one_line_error(nbdkit_name: bool, args: &[&str], code: i32, says: &str) {
    let mut c = if nbdkit_name {
        Peer::Sluice.command(args)
    } else {
        let mut c = std::process::Command::new(sluice_bin());
        c.arg("serve").args(args);
        c
    };
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    assert!(
        stderr.starts_with("sluice: ") && stderr.contains(says),
        "{stderr}"
    );
}

#[test]
fn bad_filter_parameters_are_one_line_naming_filter_and_key_exit_2() {
    for nbdkit_name in [false, true] {
        for (args, says) in [
            (
                &["--filter=log", "memory", "1M", "logappend=maybe"][..],
                "log: logappend: ",
            ),
            (
                &["--filter=ip", "memory", "1M", "allow=nowhere"][..],
                "ip: allow: ",
            ),
            (
                &["--filter=limit", "memory", "1M", "limit=-3"][..],
                "limit: limit: ",
            ),
            (
                &["--filter=stats", "memory", "1M"][..],
                "stats: statsfile: ",
            ),
            (
                &[
                    "--filter=stats",
                    "memory",
                    "1M",
                    "statsfile=/x",
                    "statsthreshold=200",
                ][..],
                "stats: statsthreshold: ",
            ),
            (
                &[
                    "--filter=exportname",
                    "memory",
                    "1M",
                    "exportname-list=some",
                ][..],
                "exportname: exportname-list: ",
            ),
            (
                &["--filter=exitwhen", "memory", "1M", "exit-when-poll=soon"][..],
                "exitwhen: exit-when-poll: ",
            ),
            (
                &["--filter=pause", "memory", "1M"][..],
                "pause: pause-control: ",
            ),
        ] {
            let mut all = vec!["-U", "-"];
            all.extend_from_slice(args);
            all.extend(["--run", "true"]);
            assert_one_line_error(nbdkit_name, &all, 2, says);
        }
    }
}

#[test]
fn unknown_filter_exits_1_as_nbdkit() {
    for peer in BOTH {
        let out = peer
            .command(&["-U", "-", "--filter=nosuch", "null", "--run", "true"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{peer:?}");
    }
    assert_one_line_error(
        false,
        &["--filter=nosuch", "null"],
        1,
        "unknown filter 'nosuch'",
    );
    assert_one_line_error(false, &["--filter=/x/y.so", "null"], 1, "C filters");
}

// ---------------------------------------------------------------------------------------
// The `nbdkit` name: what tools that exec nbdkit rely on

#[test]
fn single_connection_on_stdin_under_libnbd_connect_command() {
    let dir = tempfile::tempdir().unwrap();
    let mem = memory();
    let mut logs = Vec::new();
    for peer in BOTH {
        let log = dir.path().join(format!("{peer:?}.log"));
        let body = format!(
            r#"
h = nbd.NBD()
h.connect_command(["nbdkit", "-s", "--exit-with-parent", "--filter=log", {mem:?},
                   "size=1M", "logfile={}"])
h.pwrite(b"hello", 0)
print(h.pread(5, 0), h.get_size(), h.get_protocol())
h.shutdown()
"#,
            log.display()
        );
        let path = script(dir.path(), &format!("{peer:?}.py"), &body);
        let out = std::process::Command::new(PYTHON)
            .args([path.as_str(), "unused"])
            .env("PATH", path_for(peer))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{peer:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "bytearray(b'hello') 1048576 newstyle-fixed\n",
            "{peer:?}"
        );
        // The server exits when the connection closes, then the log is complete.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("Disconnect")
        {
            assert!(Instant::now() < deadline, "{peer:?}: no Disconnect logged");
            std::thread::sleep(Duration::from_millis(20));
        }
        logs.push(log_lines(&std::fs::read_to_string(&log).unwrap()));
    }
    assert_eq!(logs[1], logs[0]);
}

/// `-s` with standard input and output on two pipes (not a socket): a parent speaking raw
/// NBD over `subprocess` pipes gets the same handshake, data and exit status as from nbdkit.
#[test]
fn single_connection_on_a_pair_of_pipes() {
    let dir = tempfile::tempdir().unwrap();
    let client = script(
        dir.path(),
        "pipes.py",
        r#"
import hashlib, struct, subprocess
p = subprocess.Popen(["nbdkit", "-s", "pattern", "1M"], stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE)
r, w = p.stdout, p.stdin
def rd(n):
    b = b""
    while len(b) < n:
        c = r.read(n - len(b))
        assert c, "server closed after %d of %d bytes" % (len(b), n)
        b += c
    return b
assert rd(18)[:16] == b"NBDMAGICIHAVEOPT"
w.write(struct.pack(">I", 1))
go = struct.pack(">IH", 0, 0)
w.write(struct.pack(">QII", 0x49484156454f5054, 7, len(go)) + go)
w.flush()
size = None
while True:
    magic, opt, kind, ln = struct.unpack(">QIII", rd(20))
    payload = rd(ln)
    assert not kind & 0x80000000, (kind, payload)
    if kind == 3 and struct.unpack(">H", payload[:2])[0] == 0:
        size, flags = struct.unpack(">QH", payload[2:12])
    if kind == 1:
        break
w.write(struct.pack(">IHHQQI", 0x25609513, 0, 0, 7, 65536, 4096))
w.flush()
magic, err, handle = struct.unpack(">IIQ", rd(16))
data = rd(4096)
w.write(struct.pack(">IHHQQI", 0x25609513, 0, 2, 8, 0, 0))
w.close()
print(size, hex(magic), err, handle, hashlib.sha256(data).hexdigest()[:16], data[:8].hex())
print("exit", p.wait(timeout=20))
"#,
    );
    let outs: Vec<String> = BOTH
        .iter()
        .map(|peer| {
            let out = std::process::Command::new(PYTHON)
                .args([client.as_str(), "unused"])
                .env("PATH", path_for(*peer))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{peer:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .collect();
    assert_eq!(outs[1], outs[0], "sluice (left) and nbdkit (right)");
    assert!(
        outs[0].starts_with("1048576 0x67446698 0 7 ") && outs[0].ends_with("exit 0\n"),
        "{}",
        outs[0]
    );
}

#[test]
fn nbdcopy_runs_nbdkit_from_path_with_socket_activation() {
    let dir = tempfile::tempdir().unwrap();
    let data = nbdkit_plugin("data");
    let mut copies = Vec::new();
    for peer in BOTH {
        let out = dir.path().join(format!("{peer:?}.img"));
        let st = std::process::Command::new("nbdcopy")
            .args([
                "--",
                "[",
                "nbdkit",
                "--filter=exportname",
                &data,
                "1 2 3 @0x10000 4 5",
                "size=1M",
                "default-export=x",
                "]",
                "-",
            ])
            .env("PATH", path_for(peer))
            .stdout(std::fs::File::create(&out).unwrap())
            .status()
            .unwrap();
        assert!(st.success(), "{peer:?}");
        copies.push(std::fs::read(&out).unwrap());
    }
    assert_eq!(copies[0].len(), 0x100000);
    assert!(copies[1] == copies[0], "the copies differ");
}

#[test]
fn version_and_dump_config_under_the_nbdkit_name() {
    let out = Peer::Sluice.command(&["--version"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.starts_with(&format!(
            "nbdkit 1.32.5 (sluice {})",
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    let out = Peer::Sluice.command(&["--dump-config"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for key in [
        "version=1.32.5",
        "version_major=1",
        "version_minor=32",
        "exit_with_parent=yes",
        &format!("binary={}/nbdkit", nbdkit_link_dir().display()),
    ] {
        assert!(text.lines().any(|l| l == key), "{key} not in:\n{text}");
    }
}

#[test]
fn run_sets_nbdkits_variables() {
    let show = "echo \"port=[$port] socket=${unixsocket:+set} export=[$exportname] \
                tls=${tls-unset}\"; nbdinfo --size \"$uri\"; nbdinfo --size \"$nbd\"";
    same_output(&["-e", "disk", "null", "size=512"], show);
    for peer in BOTH {
        let port = free_port().to_string();
        let out = peer
            .command(&[
                "-i",
                "localhost",
                "-4",
                "-p",
                &port,
                "null",
                "size=1K",
                "--run",
                show,
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{peer:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("port=[{port}] socket= export=[] tls=unset\n1024\n1024\n"),
            "{peer:?}"
        );
    }
}

#[test]
fn oldstyle_no_sr_and_masked_handshakes_look_the_same_to_nbdinfo() {
    let mem = memory();
    for opts in [
        &["-o"][..],
        &["--no-sr"][..],
        &["--mask-handshake=0"][..],
        &["-n"][..],
    ] {
        let mut args = opts.to_vec();
        args.extend([mem.as_str(), "size=1M"]);
        let mut infos = Vec::new();
        for peer in BOTH {
            let out = peer.captive_ok(&args, "nbdinfo --json \"$uri\"");
            infos.push(without_uris(serde_json::from_str(&out).unwrap()));
        }
        assert_eq!(infos[1], infos[0], "{opts:?}");
    }
    // And data still flows over the oldstyle protocol.
    same_output(
        &["-o", &mem, "size=1M"],
        "nbdsh -u \"$uri\" -c 'h.pwrite(b\"old\", 7); print(h.pread(3, 7))'",
    );
}

#[test]
fn user_and_group_are_dropped_after_binding_as_nbdkit() {
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("skipped: changing user needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut ids = Vec::new();
    for peer in BOTH {
        let (mut child, uri) = start_foreground(
            peer,
            dir.path(),
            &["-u", "nobody", "-g", "nogroup", "null", "size=1M"],
        );
        assert!(nbdinfo_ok(peer, &["--size", &uri]));
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
        let mine: Vec<String> = status
            .lines()
            .filter(|l| l.starts_with("Uid:") || l.starts_with("Gid:") || l.starts_with("Groups:"))
            .map(str::to_string)
            .collect();
        ids.push(mine);
        let _ = child.kill();
        let _ = child.wait();
    }
    assert_eq!(ids[1], ids[0]);
    assert!(!ids[0][0].contains("\t0\t"), "{:?}", ids[0]);
}

#[test]
fn vsock_and_selinux_label_fail_with_a_clear_message() {
    let out = Peer::Sluice
        .command(&["--vsock", "-p", "10809", "null"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--vsock"), "{err}");
    if !Path::new("/sys/fs/selinux").exists() {
        let out = Peer::Sluice
            .command(&[
                "-U",
                "-",
                "--selinux-label=system_u:object_r:svirt_t:s0",
                "null",
            ])
            .args(["--run", "true"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("SELinux is not enabled"), "{err}");
    }
}

// ---------------------------------------------------------------------------------------
// virt-v2v's stack over C, Python and file plugins

const STACK: [&str; 6] = [
    "--filter=cow",
    "--filter=retry",
    "--filter=blocksize",
    "--filter=multi-conn",
    "maxdata=2M",
    "multi-conn-mode=disable",
];

/// Copies the export out with qemu-img convert and with nbdcopy under both servers; all four
/// copies must be `expected`.
fn stack_copies_are(plugin_args: &[&str], dir: &Path, expected: &[u8]) {
    for peer in BOTH {
        let qemu = dir.join(format!("{peer:?}-qemu.img"));
        let copy = dir.join(format!("{peer:?}-nbdcopy.img"));
        let mut args: Vec<&str> = STACK[..4].to_vec();
        args.extend_from_slice(plugin_args);
        args.extend_from_slice(&STACK[4..]);
        let run = format!(
            "qemu-img convert -f raw -O raw \"$uri\" {} && nbdcopy \"$uri\" {}",
            qemu.display(),
            copy.display()
        );
        peer.captive_ok(&args, &run);
        for f in [&qemu, &copy] {
            let got = std::fs::read(f).unwrap();
            assert!(got == expected, "{peer:?} {}: wrong data", f.display());
        }
    }
}

#[test]
fn v2v_stack_over_the_c_data_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let data = nbdkit_plugin("data");
    let mut expected = vec![0u8; 8 << 20];
    expected[..3].copy_from_slice(&[1, 2, 3]);
    expected[5 << 20] = 9;
    stack_copies_are(
        &[&data, "1 2 3 @0x500000 9", "size=8M"],
        dir.path(),
        &expected,
    );
}

#[test]
fn v2v_stack_over_a_python_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("pattern.py");
    std::fs::write(
        &plugin,
        "API_VERSION = 2\n\
         disk = bytearray(bytes(range(251)) * (6 * 1024 * 1024 // 251 + 1))[:6 * 1024 * 1024]\n\
         def open(readonly): return 1\n\
         def get_size(h): return len(disk)\n\
         def pread(h, buf, offset, flags): buf[:] = disk[offset:offset + len(buf)]\n",
    )
    .unwrap();
    let expected: Vec<u8> = (0..6 << 20).map(|i| (i % 251) as u8).collect();
    stack_copies_are(&["python", path_str(&plugin)], dir.path(), &expected);
}

#[test]
fn v2v_stack_over_the_file_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    random_file(&file, 5 << 20, 13);
    let expected = std::fs::read(&file).unwrap();
    stack_copies_are(&["file", path_str(&file)], dir.path(), &expected);
    // The cow layer kept the file as it was.
    let mut f = std::fs::File::open(&file).unwrap();
    let mut now = Vec::new();
    f.read_to_end(&mut now).unwrap();
    assert!(now == expected);
    let _ = std::io::stdout().flush();
}
