#!/usr/bin/python3
"""Interleaved NBD server benchmark: sluice vs nbdkit vs qemu-nbd.

All selected servers run at once, on Unix sockets in one work directory.
Every round runs every row against every server, the server order rotated
by one each round, so that the machine's drift (up to 2x over minutes) hits
all servers alike.  Tables report medians and ratios sluice/peer.

Standard library only.  Runs under any python3 >= 3.7; the `connections`
row spawns /usr/bin/python3 (the only interpreter with python3-libnbd).
See bench/README.md.
"""

import argparse
import ctypes
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import plot  # bench/plot.py: --plot

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")
LIBNBD_PYTHON = "/usr/bin/python3"
RAMDISK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ramdisk.py")


class BenchError(Exception):
    """A measurement or setup step failed (reported, never a crash)."""


# ---------------------------------------------------------------------------
# Process bookkeeping: every child is tracked so cleanup can end it by pid.
# ---------------------------------------------------------------------------

_children = []  # Popen objects started by this script (servers and tools)
_stopping = threading.Event()  # set once the run ends: servers go away from then on

try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover
    _libc = None


def _child_setup():
    # Kill the child if this script dies without cleaning up (e.g. SIGKILL).
    if _libc is not None:
        _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn(argv, **kw):
    """Start a child in its own session (no stray SIGINT from the tty; we
    end it ourselves) and remember it for cleanup."""
    p = subprocess.Popen(argv, start_new_session=True, preexec_fn=_child_setup,
                         **kw)
    _children.append(p)
    return p


def stop(p, grace=5.0):
    """End one child we started (and its process group, which it leads)."""
    if p.poll() is None:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                break
            try:
                p.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    if p in _children:
        _children.remove(p)


def stop_all():
    _stopping.set()
    for p in list(_children):
        try:
            stop(p, grace=3.0)
        except Exception:  # keep cleaning up
            pass


def run(argv, timeout, stdin=subprocess.DEVNULL):
    """Run a tool to completion; return (stdout, stderr, wall seconds)."""
    t0 = time.perf_counter()
    p = spawn(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(p, grace=1.0)
        raise BenchError(f"timeout after {timeout:.0f}s: {' '.join(argv)}")
    finally:
        stop(p)
    secs = time.perf_counter() - t0
    out, err = out.decode(errors="replace"), err.decode(errors="replace")
    if p.returncode != 0:
        raise BenchError(f"{os.path.basename(argv[0])} exited {p.returncode}: "
                         f"{tail(err or out)}")
    return out, err, secs


def tail(text, n=3):
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return " | ".join(lines[-n:]) if lines else "(no output)"


def cpu_ticks(pid):
    """utime+stime (clock ticks) of a process, all its threads (the
    thread-group line in /proc/PID/stat is already the sum) and any
    descendant processes."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(fields[11]) + int(fields[12])  # fields 14, 15: utime stime
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return total


def settle():
    """Untimed, between measurements: write back dirty page cache left by a
    write row so the next measurement (often another server) starts clean."""
    os.sync()


# ---------------------------------------------------------------------------
# Server definitions.  cmd(ctx, sock, export_path) -> argv.
#   backing: None (memory export, filled from data.raw after start),
#            "raw" or "qcow2" (served from a copy of data.raw / data.qcow2).
#   sluice:  needs --sluice.   default: part of the default --servers list.
# To add a server: add an entry here (and a RATIOS pair if it is compared).
# ---------------------------------------------------------------------------

SERVERS = {
    "sluice-memory": dict(
        cmd=lambda c, s, f: [c.sluice, "serve", "-f", "-U", s, "memory", str(c.size)],
        backing=None, sluice=True, default=True),
    "nbdkit-memory": dict(
        cmd=lambda c, s, f: ["nbdkit", "-f", "-U", s, "memory", str(c.size)],
        backing=None, default=True),
    "sluice-file": dict(
        cmd=lambda c, s, f: [c.sluice, "serve", "-f", "-U", s, "file", f],
        backing="raw", sluice=True, default=True),
    "nbdkit-file": dict(
        cmd=lambda c, s, f: ["nbdkit", "-f", "-U", s, "file", f],
        backing="raw", default=True),
    "qemu-nbd-raw": dict(
        cmd=lambda c, s, f: ["qemu-nbd", "-t", "-e", "8", "-f", "raw", "-k", s, f],
        backing="raw", default=True),
    # qcow2 (not in the default set: two more private copies of the export; --qcow2 selects
    # them with the qcow2 rows):
    "sluice-qcow2": dict(
        cmd=lambda c, s, f: [c.sluice, "serve", "-f", "-U", s, "image", "file=" + f,
                             "format=qcow2"],
        backing="qcow2", sluice=True, default=False),
    "qemu-nbd-qcow2": dict(
        cmd=lambda c, s, f: ["qemu-nbd", "-t", "-e", "8", "-f", "qcow2", "-k", s, f],
        backing="qcow2", default=False),
    # An earlier sluice build (--sluice-base), to check a change for regressions in the same
    # interleaved run: added to the servers when --sluice-base is given.
    "base-memory": dict(
        cmd=lambda c, s, f: [c.sluice_base, "serve", "-f", "-U", s, "memory", str(c.size)],
        backing=None, base=True, default=False),
    "base-file": dict(
        cmd=lambda c, s, f: [c.sluice_base, "serve", "-f", "-U", s, "file", f],
        backing="raw", base=True, default=False),
    # TLS (not in the default set; --tls selects them with the TLS rows): TLS required, PSK
    # credentials (psktool's file; qemu's tls-creds-psk reads keys.psk from a directory),
    # clients connect with nbds+unix://USER@/?...&tls-psk-file= (see tls_uri).
    "sluice-file-tls": dict(
        cmd=lambda c, s, f: [c.sluice, "serve", "-f", "-U", s, "--tls=require",
                             "--tls-psk=" + c.psk_file, "file", f],
        backing="raw", sluice=True, default=False, tls=True),
    "nbdkit-file-tls": dict(
        cmd=lambda c, s, f: ["nbdkit", "-f", "-U", s, "--tls=require",
                             "--tls-psk=" + c.psk_file, "file", f],
        backing="raw", default=False, tls=True),
    "qemu-nbd-raw-tls": dict(
        cmd=lambda c, s, f: ["qemu-nbd", "-t", "-e", "8", "-f", "raw",
                             "--object", "tls-creds-psk,id=t0,endpoint=server,dir="
                             + os.path.dirname(c.psk_file),
                             "--tls-creds", "t0", "-k", s, f],
        backing="raw", default=False, tls=True),
    # Filters (not in the default set; --filters selects them with their rows): three
    # pass-through layers over memory must cost nothing against bare memory, and the cow
    # and cache filters over a file are compared with nbdkit's.
    "sluice-nofilter3": dict(
        cmd=lambda c, s, f: [c.sluice, "serve", "-f", "-U", s] + ["--filter=nofilter"] * 3
        + ["memory", str(c.size)],
        backing=None, sluice=True, default=False),
    # --metrics: the same memory export with the Prometheus endpoint on (a Unix socket,
    # scraped once a second while measuring): counting must not slow the request path.
    "sluice-memory-metrics": dict(
        cmd=lambda c, s, f: [c.sluice, "serve", "-f", "-U", s, "--metrics",
                             "unix:" + s + ".metrics", "memory", str(c.size)],
        backing=None, sluice=True, default=False, metrics=True),
    "sluice-cow": dict(
        cmd=lambda c, s, f: [c.sluice, "serve", "-f", "-U", s, "--filter=cow", "file", f],
        backing="raw", sluice=True, default=False),
    "nbdkit-cow": dict(
        cmd=lambda c, s, f: ["nbdkit", "-f", "-U", s, "--filter=cow", "file", f],
        backing="raw", default=False),
    "sluice-cache": dict(
        cmd=lambda c, s, f: [c.sluice, "serve", "-f", "-U", s, "--filter=cache", "file", f],
        backing="raw", sluice=True, default=False),
    "nbdkit-cache": dict(
        cmd=lambda c, s, f: ["nbdkit", "-f", "-U", s, "--filter=cache", "file", f],
        backing="raw", default=False),
    # The same filters in the --sluice-base build (a regression check of the filter rows).
    "base-cow": dict(
        cmd=lambda c, s, f: [c.sluice_base, "serve", "-f", "-U", s, "--filter=cow", "file", f],
        backing="raw", base=True, default=False),
    "base-cache": dict(
        cmd=lambda c, s, f: [c.sluice_base, "serve", "-f", "-U", s, "--filter=cache", "file",
                             f],
        backing="raw", base=True, default=False),
    # --hosted: nbdkit's own plugins run by sluice and by nbdkit, on the same request path
    # as the built-ins: nbdkit's C memory plugin (the .so nbdkit-memory is) and a Python
    # RAM disk (bench/ramdisk.py, what nbdkit's Python example does).
    "sluice-memory-so": dict(
        cmd=lambda c, s, f: [c.sluice, "serve", "-f", "-U", s, nbdkit_plugin("memory"),
                             str(c.size)],
        backing=None, sluice=True, default=False),
    "sluice-python": dict(
        cmd=lambda c, s, f: [c.sluice, "serve", "-f", "-U", s, "python", RAMDISK,
                             f"size={c.size}"],
        backing=None, sluice=True, default=False),
    "base-python": dict(
        cmd=lambda c, s, f: [c.sluice_base, "serve", "-f", "-U", s, "python", RAMDISK,
                             f"size={c.size}"],
        backing=None, base=True, default=False),
    "nbdkit-python": dict(
        cmd=lambda c, s, f: ["nbdkit", "-f", "-U", s, "python", RAMDISK, f"size={c.size}"],
        backing=None, default=False),
    # --tcp: the file servers on TCP loopback (127.0.0.1) instead of a Unix socket; for
    # these, cmd's second argument is the port.
    "sluice-file-tcp": dict(
        cmd=lambda c, s, f: [c.sluice, "serve", "-f", "-i", "127.0.0.1", "-p", s, "file", f],
        backing="raw", sluice=True, default=False, tcp=True),
    "nbdkit-file-tcp": dict(
        cmd=lambda c, s, f: ["nbdkit", "-f", "-i", "127.0.0.1", "-p", s, "file", f],
        backing="raw", default=False, tcp=True),
    "base-file-tcp": dict(
        cmd=lambda c, s, f: [c.sluice_base, "serve", "-f", "-i", "127.0.0.1", "-p", s, "file",
                             f],
        backing="raw", base=True, default=False, tcp=True),
    "qemu-nbd-raw-tcp": dict(
        cmd=lambda c, s, f: ["qemu-nbd", "-t", "-e", "8", "-f", "raw", "-b", "127.0.0.1",
                             "-p", s, f],
        backing="raw", default=False, tcp=True),
}

# Ratio columns (numerator, denominator), shown when both are selected.
RATIOS = [
    ("sluice-memory", "nbdkit-memory"),
    ("sluice-file", "nbdkit-file"),
    ("sluice-file", "qemu-nbd-raw"),
    ("sluice-qcow2", "qemu-nbd-qcow2"),
    ("sluice-memory", "base-memory"),
    ("sluice-file", "base-file"),
    ("sluice-file-tls", "nbdkit-file-tls"),
    ("sluice-file-tls", "qemu-nbd-raw-tls"),
    ("sluice-file-tls", "sluice-file"),
    ("sluice-nofilter3", "sluice-memory"),
    ("sluice-memory-metrics", "sluice-memory"),
    ("sluice-cow", "nbdkit-cow"),
    ("sluice-cache", "nbdkit-cache"),
    ("sluice-cow", "base-cow"),
    ("sluice-cache", "base-cache"),
    ("sluice-memory-so", "nbdkit-memory"),
    ("sluice-memory-so", "sluice-memory"),
    ("sluice-python", "nbdkit-python"),
    ("sluice-python", "base-python"),
    ("sluice-file-tcp", "nbdkit-file-tcp"),
    ("sluice-file-tcp", "qemu-nbd-raw-tcp"),
    ("sluice-file-tcp", "base-file-tcp"),
]

BACKING_EXT = {"raw": "raw", "qcow2": "qcow2"}

# --qcow2: the image comparison, sluice vs qemu-nbd on a qcow2 export, in one run.
QCOW2_SERVERS = ["sluice-qcow2", "qemu-nbd-qcow2"]
QCOW2_ROWS = ["seq-read", "seq-write", "randread-qd1", "randread-qd32",
              "randwrite-qd1", "randwrite-qd32"]
# --tls: TLS servers (and sluice's plaintext file server, to see what TLS costs it), with
# the rows that can use TLS (fio's nbd engine cannot: randread-qd32-libnbd stands in).
TLS_SERVERS = ["sluice-file-tls", "nbdkit-file-tls", "qemu-nbd-raw-tls", "sluice-file"]
TLS_ROWS = ["seq-read", "seq-write", "randread-qd32-libnbd", "connections"]
TLS_PSK_USER = "bench"
# --filters: the filter comparison (nofilter x3 vs bare memory, cow and cache vs nbdkit's).
FILTER_SERVERS = ["sluice-memory", "sluice-nofilter3", "sluice-cow", "nbdkit-cow",
                  "sluice-cache", "nbdkit-cache"]
FILTER_ROWS = ["seq-read", "randread-qd32", "randwrite-qd32"]
# --metrics: metrics on vs off (#18's target: within 3% on these rows).
METRICS_SERVERS = ["sluice-memory", "sluice-memory-metrics"]
METRICS_ROWS = ["seq-read", "randread-qd32"]
# --hosted: nbdkit's plugins hosted by sluice against nbdkit (issue #14's rows).
HOSTED_SERVERS = ["sluice-memory-so", "nbdkit-memory", "sluice-memory", "sluice-python",
                  "nbdkit-python"]
HOSTED_ROWS = ["randread-qd1", "randread-qd32", "randwrite-qd1", "randwrite-qd32"]
# --tcp: the file servers over TCP loopback.
TCP_SERVERS = ["sluice-file-tcp", "nbdkit-file-tcp", "qemu-nbd-raw-tcp"]
TCP_ROWS = ["randread-qd1", "randread-qd32", "randwrite-qd1", "randwrite-qd32", "seq-read",
            "seq-write"]
# The flags that select a comparison: --FLAG -> (what it is, its servers, its rows).
PRESETS = {
    "qcow2": ("qcow2 comparison", QCOW2_SERVERS, QCOW2_ROWS),
    "tls": ("TLS comparison (PSK, TLS required)", TLS_SERVERS, TLS_ROWS),
    "metrics": ("metrics on vs off", METRICS_SERVERS, METRICS_ROWS),
    "filters": ("filter comparison", FILTER_SERVERS, FILTER_ROWS),
    "hosted": ("nbdkit's plugins hosted by sluice vs run by nbdkit", HOSTED_SERVERS,
               HOSTED_ROWS),
    "tcp": ("the file servers over TCP loopback", TCP_SERVERS, TCP_ROWS),
}
# Backings that may be shared by several concurrently running servers.
# A qcow2 file open read-write in two servers at once is not safe.
SHAREABLE = {"raw"}


class Server:
    def __init__(self, name, spec):
        self.name, self.spec = name, spec
        self.proc = None
        self.sock = None
        self.uri = None
        self.export = None  # backing file path, if any
        self.skip = None  # reason, once the server is unusable
        self.log = None

    @property
    def alive(self):
        return self.skip is None and self.proc is not None and self.proc.poll() is None

    def check_alive(self):
        if self.skip is None and (self.proc is None or self.proc.poll() is not None):
            rc = None if self.proc is None else self.proc.returncode
            self.skip = f"server exited (status {rc}): {tail(read_log(self.log))}"
        return self.skip is None

    def cpu(self):
        return cpu_ticks(self.proc.pid)


def read_log(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-4000:]
    except (OSError, TypeError):
        return ""


def unix_uri(sock):
    return f"nbd+unix:///?socket={sock}"


def nbdkit_plugin(name):
    """The path of nbdkit's plugin NAME (nbdkit-NAME-plugin.so in nbdkit's plugindir)."""
    try:
        out = subprocess.run(["nbdkit", "--dump-config"], capture_output=True, text=True,
                             check=True).stdout
        d = next(x.split("=", 1)[1] for x in out.splitlines() if x.startswith("plugindir="))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        d = "/usr/lib/x86_64-linux-gnu/nbdkit/plugins"
    return os.path.join(d, f"nbdkit-{name}-plugin.so")


def free_tcp_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tls_uri(ctx, sock):
    return f"nbds+unix://{TLS_PSK_USER}@/?socket={sock}&tls-psk-file={ctx.psk_file}"


# ---------------------------------------------------------------------------
# Rows.  A row function takes (ctx, server) and returns a dict of metrics
# (keys as declared in Row.metrics); extra keys are kept in the JSON only.
# To add a row: write the function and append a Row to ROWS.
# ---------------------------------------------------------------------------


class Metric:
    def __init__(self, key, higher_better, fmt):
        self.key, self.higher_better, self.fmt = key, higher_better, fmt


class Row:
    def __init__(self, name, group, func, metrics, writes=False):
        self.name, self.group, self.func = name, group, func
        self.metrics, self.writes = metrics, writes


def fmt_int(v):
    return f"{v:.0f}"


def fmt_k(v):
    return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"


def fmt_2(v):
    return f"{v:.2f}"


def copy_timeout(ctx):
    return max(120.0, ctx.size / (20 * MiB))  # generous: 20 MiB/s floor


def children_cpu():
    """User+system CPU seconds of this process's reaped children so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def nbdcopy_row(ctx, srv, args, src_dst):
    """Time one nbdcopy run: MiB/s, server and client (nbdcopy) CPU seconds per GiB moved,
    and the CPU-bound ceiling: the MiB/s this server and client could reach if every core
    of the machine did nothing but their work (cores / CPU seconds per MiB). A row well under
    its ceiling waits on something other than CPU; a ratio of two ceilings (TLS and plaintext,
    say) is the most the ratio of the two rows can be on this machine."""
    c0, k0 = srv.cpu(), children_cpu()
    _, _, secs = run(["nbdcopy", *args, *src_dst], timeout=copy_timeout(ctx))
    c1, k1 = srv.cpu(), children_cpu()
    cpu_s, client_s = (c1 - c0) / CLK_TCK, k1 - k0
    gib = ctx.size / GiB
    both = cpu_s + client_s
    return {"MiB/s": ctx.size / MiB / secs,
            "CPU s/GiB": cpu_s / gib,
            "client CPU s/GiB": client_s / gib,
            "CPU ceiling MiB/s": (os.cpu_count() * ctx.size / MiB / both) if both else 0.0,
            "secs": secs, "cpu_s": cpu_s, "client_cpu_s": client_s}


def seq_read(ctx, srv):
    return nbdcopy_row(ctx, srv, [], [srv.uri, "null:"])


def seq_read_1(ctx, srv):
    return nbdcopy_row(ctx, srv, ["-C", "1", "-T", "1", "-R", "1"], [srv.uri, "null:"])


def seq_write(ctx, srv):
    return nbdcopy_row(ctx, srv, [], [ctx.data_raw, srv.uri])


def seq_write_1(ctx, srv):
    return nbdcopy_row(ctx, srv, ["-C", "1", "-T", "1"], [ctx.data_raw, srv.uri])


def parse_fio_json(text):
    """fio prints e.g. 'fio: connected to NBD server' before the JSON."""
    dec, pos = json.JSONDecoder(), 0
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("{"):
            try:
                return dec.raw_decode(text[pos:].lstrip())[0]
            except ValueError:
                pass
        pos += len(line)
    raise BenchError(f"no JSON in fio output: {tail(text)}")


def fio_row(rw, depth):
    def row(ctx, srv):
        if srv.spec.get("tls"):
            raise BenchError("fio's nbd engine cannot do TLS (use randread-qd32-libnbd)")
        argv = ["fio", f"--name={rw}-qd{depth}", "--ioengine=nbd", f"--uri={srv.uri}",
                f"--rw={rw}", "--bs=4k", f"--iodepth={depth}", "--numjobs=1",
                "--norandommap", "--randrepeat=0", "--time_based",
                f"--runtime={ctx.runtime}", "--ramp_time=1", "--output-format=json"]
        c0 = srv.cpu()
        out, err, _ = run(argv, timeout=ctx.runtime + 60)
        c1 = srv.cpu()
        j = parse_fio_json(out)
        job = j["jobs"][0]
        if job.get("error"):
            raise BenchError(f"fio job error {job['error']}: {tail(err)}")
        d = job["read" if "read" in rw else "write"]
        if not d.get("total_ios"):
            raise BenchError(f"fio did no I/O: {tail(err or out)}")
        clat = d.get("clat_ns", {})
        cpu_s = (c1 - c0) / CLK_TCK
        # The CPU sample spans the 1 s ramp too; IOPS x (runtime + ramp) estimates the
        # operations it covers. Server CPU per operation is steadier than IOPS on a noisy
        # machine (IOPS also depends on how the server paces the client).
        ops = d["iops"] * (ctx.runtime + 1)
        return {"IOPS": d["iops"],
                "CPU us/op": cpu_s / ops * 1e6 if ops else 0.0,
                "clat_mean_us": clat.get("mean", 0) / 1000,
                "clat_p99_us": clat.get("percentile", {}).get("99.000000", 0) / 1000,
                "total_ios": d["total_ios"],
                "cpu_s_incl_ramp": (c1 - c0) / CLK_TCK}
    row.__name__ = f"fio_{rw}_qd{depth}"
    return row


CONN_SCRIPT = r"""
import json, sys, time
import nbd
uri, dur = sys.argv[1], float(sys.argv[2])
def once():
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)  # tls-psk-file= in TLS URIs
    h.connect_uri(uri)
    h.shutdown()
    del h
for _ in range(20):  # warm-up: imports, allocator, server thread pools
    once()
print("ready", flush=True)
sys.stdin.readline()
n, t0 = 0, time.perf_counter()
deadline = t0 + dur
while True:
    once()
    n += 1
    if n % 16 == 0 and time.perf_counter() >= deadline:
        break
print(json.dumps({"n": n, "secs": time.perf_counter() - t0}), flush=True)
"""


def connections(ctx, srv):
    """connect + handshake + NBD_CMD_DISC + close, in a loop, from one
    persistent libnbd client process, for --runtime seconds."""
    p = spawn([ctx.libnbd_python, "-c", CONN_SCRIPT, srv.uri, str(ctx.runtime)],
              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
              text=True)
    try:
        line = p.stdout.readline()
        if line.strip() != "ready":
            p.wait(timeout=10)
            raise BenchError(f"libnbd client failed: {tail(line + p.stderr.read())}")
        c0 = srv.cpu()
        p.stdin.write("go\n")
        p.stdin.flush()
        out, err = p.communicate(timeout=ctx.runtime + 60)
        time.sleep(0.05)  # let the server finish tearing down the last one
        c1 = srv.cpu()
        if p.returncode != 0:
            raise BenchError(f"libnbd client exited {p.returncode}: {tail(err)}")
        r = json.loads(out.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        raise BenchError("libnbd connection loop timed out")
    finally:
        stop(p, grace=1.0)
    return {"conn/s": r["n"] / r["secs"],
            "CPU us/conn": (c1 - c0) / CLK_TCK / r["n"] * 1e6,
            "n": r["n"], "secs": r["secs"]}


RANDREAD_SCRIPT = r"""
import json, random, sys, time
import nbd
uri, dur, depth = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(uri)
blocks = h.get_size() // 4096
rng = random.Random(1)
done = [0]
def completed(err):
    done[0] += 1
    return 1  # retire the command
bufs = [nbd.Buffer(4096) for _ in range(depth)]
def run(seconds):
    start, submitted = done[0], 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        while h.aio_in_flight() < depth:
            h.aio_pread(bufs[submitted % depth], rng.randrange(blocks) * 4096,
                        completion=completed)
            submitted += 1
        h.poll(-1)
        if done[0] % 64 == 0 and time.perf_counter() >= deadline:
            break
    while h.aio_in_flight() > 0:
        h.poll(-1)
    return done[0] - start, time.perf_counter() - t0
run(0.5)  # warm-up
print("ready", flush=True)
sys.stdin.readline()
n, secs = run(dur)
h.shutdown()
print(json.dumps({"n": n, "secs": secs}), flush=True)
"""


def randread_libnbd(ctx, srv):
    """4 KiB random reads, 32 in flight, from one python3-libnbd client (aio): works over
    TLS, unlike fio's nbd engine.  The client's Python costs a few us per request, the same
    for every server."""
    p = spawn([ctx.libnbd_python, "-c", RANDREAD_SCRIPT, srv.uri, str(ctx.runtime), "32"],
              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
              text=True)
    try:
        line = p.stdout.readline()
        if line.strip() != "ready":
            p.wait(timeout=10)
            raise BenchError(f"libnbd client failed: {tail(line + p.stderr.read())}")
        c0 = srv.cpu()
        p.stdin.write("go\n")
        p.stdin.flush()
        out, err = p.communicate(timeout=ctx.runtime + 60)
        c1 = srv.cpu()
        if p.returncode != 0:
            raise BenchError(f"libnbd client exited {p.returncode}: {tail(err)}")
        r = json.loads(out.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        raise BenchError("libnbd random read loop timed out")
    finally:
        stop(p, grace=1.0)
    return {"IOPS": r["n"] / r["secs"],
            "CPU us/op": (c1 - c0) / CLK_TCK / r["n"] * 1e6 if r["n"] else 0.0,
            "n": r["n"], "secs": r["secs"]}


SEQ = [Metric("MiB/s", True, fmt_int), Metric("CPU s/GiB", False, fmt_2),
       Metric("client CPU s/GiB", False, fmt_2), Metric("CPU ceiling MiB/s", True, fmt_int)]
IOPS = [Metric("IOPS", True, fmt_k), Metric("CPU us/op", False, fmt_2)]

ROWS = [
    Row("seq-read", "Sequential", seq_read, SEQ),
    Row("seq-read-1", "Sequential", seq_read_1, SEQ),
    Row("seq-write", "Sequential", seq_write, SEQ, writes=True),
    Row("seq-write-1", "Sequential", seq_write_1, SEQ, writes=True),
    Row("randread-qd1", "Random 4 KiB (fio nbd engine)", fio_row("randread", 1), IOPS),
    Row("randread-qd32", "Random 4 KiB (fio nbd engine)", fio_row("randread", 32), IOPS),
    Row("randwrite-qd1", "Random 4 KiB (fio nbd engine)", fio_row("randwrite", 1), IOPS,
        writes=True),
    Row("randwrite-qd32", "Random 4 KiB (fio nbd engine)", fio_row("randwrite", 32), IOPS,
        writes=True),
    Row("randread-qd32-libnbd", "Random 4 KiB (python3-libnbd aio, QD32)", randread_libnbd,
        IOPS),
    Row("connections", "Connections (python3-libnbd connect+handshake+disconnect)",
        connections, [Metric("conn/s", True, fmt_int),
                      Metric("CPU us/conn", False, fmt_int)]),
]


# ---------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------


def parse_size(s):
    s = s.strip()
    mult = {"K": KiB, "M": MiB, "G": GiB, "T": 1 << 40}
    if s[-1:].upper() in mult:
        n = float(s[:-1]) * mult[s[-1].upper()]
    else:
        n = float(s)
    n = int(n)
    if n <= 0 or n % MiB:
        raise argparse.ArgumentTypeError("size must be a positive multiple of 1 MiB")
    return n


def human(n):
    for unit, m in (("T", 1 << 40), ("G", GiB), ("M", MiB)):
        if n % m == 0:
            return f"{n // m}{unit}"
    return str(n)


def meminfo(key):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * KiB
    return 0


def note(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_data(ctx):
    path = ctx.data_raw
    if os.path.exists(path) and os.path.getsize(path) == ctx.size:
        note(f"reusing {path}")
        return
    note(f"writing {human(ctx.size)} of /dev/urandom to {path}")
    chunk = 16 * MiB
    buf = bytearray(chunk)
    with open("/dev/urandom", "rb", buffering=0) as src, open(path + ".tmp", "wb") as dst:
        left = ctx.size
        while left:
            n = src.readinto(memoryview(buf)[:min(chunk, left)])
            dst.write(memoryview(buf)[:n])
            left -= n
    os.replace(path + ".tmp", path)


def make_psk(ctx):
    """A psktool key file for the TLS servers, named keys.psk (qemu's name) in its own dir."""
    d = os.path.join(ctx.work, "psk")
    os.makedirs(d, exist_ok=True)
    ctx.psk_file = os.path.join(d, "keys.psk")
    if not os.path.exists(ctx.psk_file):
        run(["psktool", "-u", TLS_PSK_USER, "-p", ctx.psk_file], timeout=30)


def make_qcow2(ctx):
    path = ctx.data_qcow2
    if os.path.exists(path) and os.path.getmtime(path) >= os.path.getmtime(ctx.data_raw):
        note(f"reusing {path}")
        return
    note(f"qemu-img convert -O qcow2 -> {path}")
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", ctx.data_raw, path + ".tmp"],
        timeout=copy_timeout(ctx) * 2)
    os.replace(path + ".tmp", path)


def warm(path):
    """Read a file once so the page cache holds it; return bytes read."""
    n = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 * MiB)
        while True:
            k = f.readinto(buf)
            if not k:
                return n
            n += k


def drop_cache(path):
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    except OSError:
        pass


def plan_copies(ctx, servers):
    """Decide which export file each file-backed server gets.

    separate: one private copy per server.  shared: all servers of one
    shareable backing format (raw) serve the same copy (never data.raw
    itself, which is the seq-write source).  auto: separate if everything
    fits in RAM, else shared -- a page-cache miss would be far less fair
    than sharing warm pages."""
    servers = [s for s in servers if not s.skip]
    fmts = [s.spec["backing"] for s in servers if s.spec["backing"]]
    n_mem = sum(1 for s in servers if not s.spec["backing"])
    n_fmt = {f: fmts.count(f) for f in set(fmts)}
    sep_files = sum(n_fmt.values())
    shared_files = sum(1 if f in SHAREABLE else n for f, n in n_fmt.items())
    template = 1 if "qcow2" in n_fmt else 0  # data.qcow2, dropped from cache
    need = lambda files: ctx.size * (1 + n_mem + files) + 2 * GiB
    avail = meminfo("MemAvailable")
    mode = ctx.copies
    if mode == "auto":
        mode = "separate" if need(sep_files) <= avail else "shared"
    files = sep_files if mode == "separate" else shared_files
    if need(files) > avail:
        note(f"WARNING: about {need(files) / GiB:.1f} GiB of exports + page cache "
             f"needed, {avail / GiB:.1f} GiB available: expect page-cache misses")
    ctx.copies_used = mode
    made = {}
    for s in servers:
        fmt = s.spec["backing"]
        if not fmt:
            continue
        ext = BACKING_EXT[fmt]
        if mode == "shared" and fmt in SHAREABLE:
            s.export = os.path.join(ctx.work, f"export-shared.{ext}")
        else:
            s.export = os.path.join(ctx.work, f"export-{s.name}.{ext}")
        made.setdefault(s.export, fmt)
    for path, fmt in made.items():
        src = ctx.data_raw if fmt == "raw" else ctx.data_qcow2
        note(f"copying {os.path.basename(src)} -> {os.path.basename(path)}")
        shutil.copyfile(src, path)
    if template:
        os.sync()
        drop_cache(ctx.data_qcow2)
    return list(made)


VERIFY_SCRIPT = r"""
import hashlib, json, sys
import nbd
uri, offsets, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(uri)
print(json.dumps([hashlib.sha256(h.pread(n, o)).hexdigest() for o in offsets]))
h.shutdown()
"""


def verify_content(ctx, srv):
    """Spot-check that the export serves data.raw's bytes (a server that
    returns wrong data must not win a benchmark).  Returns an error or None."""
    import hashlib
    import random
    blk = 64 * KiB
    rng = random.Random(ctx.size)
    offs = sorted({0, ctx.size - blk} | {rng.randrange(ctx.size // blk) * blk
                                         for _ in range(30)})
    try:
        out, _, _ = run([ctx.libnbd_python, "-c", VERIFY_SCRIPT, srv.uri,
                         json.dumps(offs), str(blk)], timeout=60)
        got = json.loads(out.strip().splitlines()[-1])
    except (BenchError, ValueError, IndexError) as e:
        note(f"WARNING: cannot verify {srv.name} content: {e}")
        return None
    with open(ctx.data_raw, "rb") as f:
        for o, g in zip(offs, got):
            f.seek(o)
            if hashlib.sha256(f.read(blk)).hexdigest() != g:
                return f"content differs from data.raw at offset {o}"
    return None


def start_server(ctx, srv):
    srv.sock = os.path.join(ctx.work, f"{srv.name}.sock")
    srv.uri = tls_uri(ctx, srv.sock) if srv.spec.get("tls") else unix_uri(srv.sock)
    srv.log = os.path.join(ctx.work, f"{srv.name}.log")
    if srv.skip:
        return
    try:
        os.unlink(srv.sock)
    except FileNotFoundError:
        pass
    listen = srv.sock
    if srv.spec.get("tcp"):
        listen = str(free_tcp_port())
        srv.uri = f"nbd://127.0.0.1:{listen}/"
    argv = srv.spec["cmd"](ctx, listen, srv.export)
    srv.argv = argv
    note(f"starting {srv.name}: {' '.join(argv)}")
    try:
        with open(srv.log, "wb") as log:
            srv.proc = spawn(argv, stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT, cwd=ctx.work)
    except OSError as e:
        srv.skip = f"cannot start: {e}"
        return
    deadline = time.monotonic() + ctx.start_timeout
    last = ""
    while True:
        if not srv.check_alive():
            return
        if srv.spec.get("tcp") or os.path.exists(srv.sock):
            try:
                out, _, _ = run(["nbdinfo", "--size", srv.uri], timeout=10)
                got = int(out.strip())
                if got != ctx.size:
                    srv.skip = f"export size {got} != {ctx.size}"
                    stop(srv.proc)
                    return
                break
            except (BenchError, ValueError) as e:
                last = str(e)
        if time.monotonic() > deadline:
            srv.skip = f"not ready after {ctx.start_timeout}s: {last or 'no socket'}"
            stop(srv.proc)
            return
        time.sleep(0.1)
    if not srv.spec["backing"]:
        note(f"filling {srv.name}: nbdcopy data.raw {srv.uri}")
        try:
            run(["nbdcopy", ctx.data_raw, srv.uri], timeout=copy_timeout(ctx) * 4)
        except BenchError as e:
            srv.skip = f"fill failed: {e}"
            stop(srv.proc)
            return
    if srv.check_alive():
        bad = verify_content(ctx, srv)
        if bad:
            srv.skip = bad
            stop(srv.proc)
    if srv.check_alive() and srv.spec.get("metrics"):
        threading.Thread(target=scrape_metrics, args=(srv,), daemon=True).start()


def scrape_metrics(srv):
    """GET /metrics once a second while `srv` runs, as a Prometheus would (more often than its
    default 15 s); counts scrapes in srv.scrapes, a failed one ends the server's row. Once
    the run ends the servers are stopped, and a server removes its socket before it exits: a
    scrape failing then is not the server's fault (it was reported as one)."""
    path = srv.sock + ".metrics"
    srv.scrapes = 0
    while srv.alive and not _stopping.is_set():
        try:
            with socket.socket(socket.AF_UNIX) as c:
                c.settimeout(5)
                c.connect(path)
                c.sendall(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                reply = b""
                while chunk := c.recv(65536):
                    reply += chunk
            if not reply.startswith(b"HTTP/1.1 200") or b"sluice_" not in reply:
                raise OSError(f"bad reply {reply[:80]!r}")
            srv.scrapes += 1
        except OSError as e:
            if not _stopping.is_set():
                srv.skip = f"metrics scrape failed: {e}"
            return
        time.sleep(1)


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------


def medians(results, row, metric, servers):
    """{server: (median, n_ok, n_total)} for one row/metric."""
    out = {}
    for s in servers:
        rs = results.get(row.name, {}).get(s.name, [])
        vals = [r[metric.key] for r in rs if metric.key in r]
        out[s.name] = (statistics.median(vals) if vals else None, len(vals), len(rs))
    return out


def report(ctx, servers, rows, results):
    names = [s.name for s in servers]
    ratios = [(a, b) for a, b in RATIOS if a in names and b in names]
    lines = []
    lines.append(f"# sluice NBD bench: {human(ctx.size)} exports, {ctx.rounds} rounds, "
                 f"fio runtime {ctx.runtime}s, copies={ctx.copies_used}")
    lines.append("")
    lines.append(f"{ctx.started} · {platform.node()} · {os.cpu_count()} CPUs · "
                 f"kernel {platform.release()} · load {ctx.load0} -> {ctx.load1}"
                 + (" · with a spinner (one core kept busy)" if ctx.spinner else ""))
    if getattr(ctx, "interrupted", False):
        lines.append("**INTERRUPTED: partial results.**")
    lines.append("Medians over rounds; ratio = sluice/peer (throughput, IOPS, conn/s: "
                 "higher is better; CPU rows: lower is better).")
    groups = []
    for r in rows:
        if r.group not in groups:
            groups.append(r.group)
    for g in groups:
        lines.append("")
        lines.append(f"## {g}")
        lines.append("")
        hdr = ["row", "metric"] + names + [f"{a}/{b}" for a, b in ratios]
        lines.append("| " + " | ".join(hdr) + " |")
        lines.append("|" + "---|" * 2 + "---:|" * (len(hdr) - 2))
        for r in (r for r in rows if r.group == g):
            for m in r.metrics:
                med = medians(results, r, m, servers)
                cells = [r.name, m.key + ("" if m.higher_better else " (lower better)")]
                for s in servers:
                    v, ok, tot = med[s.name]
                    if s.skip and tot == 0:
                        cells.append("skip")
                    elif v is None:
                        cells.append("err" if tot else "-")
                    else:
                        cells.append(m.fmt(v) + ("" if ok == tot else f" ({ok}/{tot})"))
                for a, b in ratios:
                    va, vb = med[a][0], med[b][0]
                    cells.append(f"{va / vb:.2f}" if va is not None and vb else "-")
                lines.append("| " + " | ".join(cells) + " |")
    lines.extend(floor_report(ctx, servers, results))

    def measured(s):
        return any(results.get(r.name, {}).get(s.name) for r in rows)
    notes = [f"- {s.name}: {'stopped mid-run' if measured(s) else 'skipped'}: {s.skip}"
             for s in servers if s.skip]
    notes += [f"- {s.name}: /metrics scraped {s.scrapes} times (once a second) while measuring"
              for s in servers if hasattr(s, "scrapes")]
    errs = []
    for r in rows:
        for s in servers:
            for x in results.get(r.name, {}).get(s.name, []):
                if "error" in x:
                    errs.append(f"- {r.name} / {s.name} round {x['round'] + 1}: {x['error']}")
    if notes or errs:
        lines.append("")
        lines.append("Notes:")
        lines.extend(notes)
        lines.extend(errs[:30])
        if len(errs) > 30:
            lines.append(f"- ... {len(errs) - 30} more errors in the JSON")
    return "\n".join(lines) + "\n"


def versions(ctx):
    v = {}
    tools = [("sluice", [ctx.sluice, "--version"])] if ctx.sluice else []
    for name, argv in tools + [("nbdkit", ["nbdkit", "--version"]),
                       ("qemu-nbd", ["qemu-nbd", "--version"]),
                       ("nbdcopy", ["nbdcopy", "--version"]),
                       ("fio", ["fio", "--version"])]:
        try:
            v[name] = subprocess.run(argv, capture_output=True, text=True,
                                     timeout=10).stdout.strip().splitlines()[0]
        except Exception as e:
            v[name] = f"unavailable: {e}"
    return v


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="Interleaved NBD benchmark: sluice vs nbdkit vs qemu-nbd.")
    ap.add_argument("--sluice", help="path to the sluice binary")
    ap.add_argument("--sluice-base", help="an earlier sluice binary: adds the servers "
                    "base-memory and base-file and the ratios sluice/base (regression check)")
    ap.add_argument("--size", type=parse_size, default=None, help="export size (4G)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (3)")
    ap.add_argument("--runtime", type=int, default=None,
                    help="seconds per fio / connections measurement (5)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: --size 512M --rounds 1 --runtime 2 unless given")
    ap.add_argument("--only", help="comma-separated rows (default: all)")
    ap.add_argument("--servers", help="comma-separated servers (default: "
                    + ",".join(n for n, s in SERVERS.items() if s["default"]) + ")")
    ap.add_argument("--out", help="directory for results.json, results.md and logs")
    ap.add_argument("--plot", metavar="FILE.png",
                    help="also draw the ratio tables as a bar chart (bench/plot.py, matplotlib)")
    ap.add_argument("--workdir", help="use (and keep) this work dir; reuses data.raw "
                    "of the right size.  Default: a temp dir, removed at exit")
    ap.add_argument("--copies", choices=("auto", "separate", "shared"), default="auto",
                    help="file-backed exports: one copy per server, or one shared "
                    "copy (raw only); auto = separate if it fits in RAM")
    ap.add_argument("--start-timeout", type=float, default=30.0)
    ap.add_argument("--libnbd-python", default=LIBNBD_PYTHON,
                    help="python with the nbd module (connections row)")
    for flag, (what, servers, rows) in PRESETS.items():
        ap.add_argument(f"--{flag}", action="store_true",
                        help=f"{what}: servers {','.join(servers)}, rows {','.join(rows)} "
                        "(unless --servers / --only say otherwise)")
    ap.add_argument("--spinner", action="store_true",
                    help="keep one core busy (a busy loop) while measuring: the loaded case")
    ap.add_argument("--no-floor", action="store_true",
                    help="skip the Floor section (the machine's own 4 KiB round trip over a "
                         "Unix socket pair, bench/floor.c, measured every round)")
    ap.add_argument("--list", action="store_true", help="list rows and servers")
    a = ap.parse_args(argv)
    for flag, (_, servers, rows) in PRESETS.items():
        if getattr(a, flag):
            a.servers = a.servers or ",".join(servers)
            a.only = a.only or ",".join(rows)
    dflt = (512 * MiB, 1, 2) if a.quick else (4 * GiB, 3, 5)
    a.size = a.size if a.size is not None else dflt[0]
    a.rounds = a.rounds if a.rounds is not None else dflt[1]
    a.runtime = a.runtime if a.runtime is not None else dflt[2]
    if a.rounds < 1 or a.runtime < 1:
        ap.error("--rounds and --runtime must be >= 1")
    row_names = [r.name for r in ROWS]
    a.rows = ROWS
    if a.only:
        want = [x.strip() for x in a.only.split(",") if x.strip()]
        bad = [x for x in want if x not in row_names]
        if bad:
            ap.error(f"unknown rows {bad}; rows: {', '.join(row_names)}")
        a.rows = [r for r in ROWS if r.name in want]
    if a.servers:
        want = [x.strip() for x in a.servers.split(",") if x.strip()]
        bad = [x for x in want if x not in SERVERS]
        if bad:
            ap.error(f"unknown servers {bad}; servers: {', '.join(SERVERS)}")
        a.server_names = want
    else:
        a.server_names = [n for n, s in SERVERS.items() if s["default"]]
    if a.sluice:
        a.sluice = os.path.abspath(a.sluice)
    if a.sluice_base:
        a.sluice_base = os.path.abspath(a.sluice_base)
        if not a.servers:
            # The base build of each sluice server in the run.
            a.server_names += [n for n, s in SERVERS.items() if s.get("base")
                               and "sluice-" + n[len("base-"):] in a.server_names]
    return a


def build_floor(ctx):
    """Compiles bench/floor.c (the Floor section's ping-pong) into the work dir."""
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "floor.c")
    out = os.path.join(ctx.work, "floor")
    try:
        run(["cc", "-O2", "-o", out, src], timeout=60)
    except BenchError as e:
        note(f"no Floor section: cannot compile {src}: {e}")
        return None
    return out


def floor_report(ctx, servers, results):
    """The Floor section: the machine's round trip, and each server's QD1 latency over it."""
    if not ctx.floor:
        return []
    fl = statistics.median(ctx.floor)
    lines = ["", "## Floor", "",
             f"4 KiB request/reply over a Unix socket pair between two processes "
             f"(bench/floor.c), median of {len(ctx.floor)}: **{fl:.1f} us** round trip.",
             "QD1 mean completion latency (fio clat) as a multiple of it:", "",
             "| row | " + " | ".join(s.name for s in servers) + " |",
             "|---|" + "---:|" * len(servers)]
    for row in ("randread-qd1", "randwrite-qd1"):
        if row not in results:
            continue
        cells = []
        for s in servers:
            vals = [r["clat_mean_us"] for r in results[row].get(s.name, [])
                    if "clat_mean_us" in r]
            cells.append(f"{statistics.median(vals) / fl:.2f}" if vals else "-")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def bench(ctx):
    servers = ctx.servers_run = [Server(n, SERVERS[n]) for n in ctx.server_names]
    for s in servers:
        if s.spec.get("sluice"):
            if not ctx.sluice:
                s.skip = "--sluice not given"
            elif not os.access(ctx.sluice, os.X_OK):
                s.skip = f"{ctx.sluice} is not an executable file"
        if s.spec.get("base") and not (ctx.sluice_base and os.access(ctx.sluice_base, os.X_OK)):
            s.skip = "--sluice-base not given or not executable"
    make_data(ctx)
    if any(s.spec.get("tls") and not s.skip for s in servers):
        make_psk(ctx)
    if any(s.spec["backing"] == "qcow2" and not s.skip for s in servers):
        make_qcow2(ctx)
    exports = plan_copies(ctx, servers)
    note("sync + warming the page cache")
    os.sync()
    for path in [ctx.data_raw] + exports:
        warm(path)
    for s in servers:
        start_server(ctx, s)
        if s.skip:
            note(f"SKIP {s.name}: {s.skip}")
    in_use = {s.export for s in servers if not s.skip and s.export}
    for path in set(exports) - in_use:  # free the page cache of unused copies
        os.unlink(path)
    os.sync()

    live = [s for s in servers if not s.skip]
    if not live:
        raise BenchError("no server could be started")
    results = ctx.results = {r.name: {s.name: [] for s in servers} for r in ctx.rows}
    floor_bin = None if ctx.no_floor else build_floor(ctx)
    if ctx.spinner:
        note("spinner: one busy loop runs while measuring")
        spawn([sys.executable, "-c", "while True: pass"])
    t_start = time.monotonic()
    for rnd in range(ctx.rounds):
        if floor_bin:
            out, _, _ = run([floor_bin, str(ctx.runtime)], timeout=ctx.runtime + 30)
            ctx.floor.append(float(out.split()[0]))
            note(f"round {rnd + 1}/{ctx.rounds} floor: {ctx.floor[-1]:.1f} us round trip")
        for row in ctx.rows:
            k = rnd % len(servers)
            order = servers[k:] + servers[:k]
            for s in order:
                if not s.check_alive():
                    continue
                rec = {"round": rnd, "order": order.index(s)}
                try:
                    rec.update(row.func(ctx, s))
                    shown = ", ".join(f"{m.key} {m.fmt(rec[m.key])}" for m in row.metrics)
                except Exception as e:  # a failed measurement is a cell, not a crash
                    rec["error"] = str(e)
                    shown = f"ERROR {e}"
                    if not s.check_alive():
                        rec["error"] += f" ({s.skip})"
                results[row.name][s.name].append(rec)
                note(f"round {rnd + 1}/{ctx.rounds} {row.name:15} {s.name:15} {shown}")
                settle()
    note(f"measurements took {time.monotonic() - t_start:.0f}s")


def main(argv=None):
    ctx = parse_args(argv if argv is not None else sys.argv[1:])
    if ctx.list:
        print("rows:    " + ", ".join(r.name for r in ROWS))
        print("servers: " + ", ".join(f"{n}{'' if s['default'] else ' (not default)'}"
                                      for n, s in SERVERS.items()))
        return 0

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    temp = ctx.workdir is None
    ctx.work = tempfile.mkdtemp(prefix="nbd-bench-") if temp else os.path.abspath(ctx.workdir)
    os.makedirs(ctx.work, exist_ok=True)
    ctx.data_raw = os.path.join(ctx.work, "data.raw")
    ctx.data_qcow2 = os.path.join(ctx.work, "data.qcow2")
    ctx.copies_used = ctx.copies
    ctx.started = datetime.datetime.now().isoformat(timespec="seconds")
    ctx.load0 = "%.2f" % os.getloadavg()[0]
    ctx.servers_run, ctx.results, rc = [], {}, 0
    ctx.interrupted = False
    ctx.floor = []
    try:
        bench(ctx)
    except KeyboardInterrupt as e:
        note(f"interrupted ({str(e) or 'SIGINT'}); cleaning up")
        rc = 130
        ctx.interrupted = True
    except BenchError as e:
        note(f"ERROR: {e}")
        rc = 1
    finally:
        if _children:
            note("stopping servers")
        stop_all()
        servers, results = ctx.servers_run, ctx.results
        ctx.load1 = "%.2f" % os.getloadavg()[0]
        if ctx.out and servers:
            os.makedirs(os.path.join(ctx.out, "logs"), exist_ok=True)
            for s in servers:
                if s.log and os.path.exists(s.log):
                    shutil.copy(s.log, os.path.join(ctx.out, "logs"))
        if temp:
            note(f"removing {ctx.work}")
            shutil.rmtree(ctx.work, ignore_errors=True)
            note("removed")
    if servers and results:
        md = report(ctx, servers, ctx.rows, results)
        print(md)
        if ctx.plot:
            plot.save(md, ctx.plot)
        if ctx.out:
            os.makedirs(ctx.out, exist_ok=True)
            with open(os.path.join(ctx.out, "results.md"), "w") as f:
                f.write(md)
            raw = {
                "started": ctx.started, "host": platform.node(),
                "kernel": platform.release(), "cpus": os.cpu_count(),
                "load": [ctx.load0, ctx.load1],
                "size": ctx.size, "rounds": ctx.rounds, "runtime": ctx.runtime,
                "copies": ctx.copies_used, "versions": versions(ctx),
                "servers": {s.name: {"argv": getattr(s, "argv", None),
                                     "export": s.export, "skip": s.skip}
                            for s in servers},
                "rows": [r.name for r in ctx.rows],
                "ratios": [f"{a}/{b}" for a, b in RATIOS],
                "results": results,
            }
            with open(os.path.join(ctx.out, "results.json"), "w") as f:
                json.dump(raw, f, indent=1)
            note(f"wrote {ctx.out}/results.json and results.md")
    return rc


if __name__ == "__main__":
    sys.exit(main())
