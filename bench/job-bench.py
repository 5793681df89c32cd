#!/usr/bin/python3
"""Block-job benchmark: sluice daemon vs qemu-storage-daemon, interleaved in one run.

Each row builds a qcow2 chain once (a template), then, for every round and every
daemon (order rotated each round), copies the chain into a fresh directory,
starts the daemon with a QMP socket, adds the chain with blockdev-add, starts the
job and times it from the command to BLOCK_JOB_COMPLETED.  Server CPU is
utime+stime of the daemon from /proc/PID/stat over the same span.  Tables report
medians over rounds and the ratio sluice/qsd.

The mirror, backup and pull-mode rows (issues #15 and #16) have flows of their own:
mirror-idle and mirror-busy time blockdev-mirror to BLOCK_JOB_READY and, after
job-complete, to BLOCK_JOB_COMPLETED (mirror-busy with fio writing 4 KiB at random through
the source's NBD export meanwhile); backup-full and backup-incr time blockdev-backup
(sync=full, and sync=incremental on a persistent bitmap with 5% dirty); pull-read times
libvirt's pull-mode setup and a libnbd client reading only the dirty extents from the
scratch export.  Both daemons get the same QMP commands (qsd's, from its transcripts).

Standard library only (QMP is spoken as raw JSON lines).  See bench/README.md.
"""

import argparse
import ctypes
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A measurement or setup step failed (reported as a cell, never a crash)."""


# ---------------------------------------------------------------------------
# Process bookkeeping (as in nbd-bench.py): every child is ended by pid.
# ---------------------------------------------------------------------------

_children = []

try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover
    _libc = None


def _child_setup():
    if _libc is not None:
        _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with this script


def spawn(argv, **kw):
    p = subprocess.Popen(argv, start_new_session=True, preexec_fn=_child_setup, **kw)
    _children.append(p)
    return p


def stop(p, grace=5.0):
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
    for p in list(_children):
        try:
            stop(p, grace=3.0)
        except Exception:
            pass


def tail(text, n=3):
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return " | ".join(lines[-n:]) if lines else "(no output)"


def run(argv, timeout=600):
    """Run a tool to completion; return stdout."""
    p = spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
              stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(p, grace=1.0)
        raise BenchError(f"timeout after {timeout:.0f}s: {' '.join(argv)}")
    finally:
        stop(p)
    out, err = out.decode(errors="replace"), err.decode(errors="replace")
    if p.returncode != 0:
        raise BenchError(f"{' '.join(argv[:2])} exited {p.returncode}: {tail(err or out)}")
    return out


def cpu_ticks(pid):
    """utime+stime (clock ticks) of a process (all threads) and its descendants."""
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
        total += int(fields[11]) + int(fields[12])
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return total


def note(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# A minimal QMP client: JSON lines over a Unix socket.
# ---------------------------------------------------------------------------


class Qmp:
    def __init__(self, path, timeout):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.events = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise BenchError(f"no QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self, deadline=None):
        while b"\n" not in self.buf:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError("QMP: timed out waiting for a message")
                self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise BenchError("QMP: timed out waiting for a message")
            if not chunk:
                raise BenchError("QMP: connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def send(self, cmd, args=None):
        msg = {"execute": cmd}
        if args is not None:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")

    def execute(self, cmd, args=None):
        """Send a command; return its reply's "return" (events are queued)."""
        self.send(cmd, args)
        while True:
            v = self._read()
            if "event" in v:
                self.events.append(v)
                continue
            if "error" in v:
                raise BenchError(f"{cmd}: {v['error'].get('class')}: {v['error'].get('desc')}")
            return v.get("return")

    def wait_event(self, names, timeout):
        """The first queued or coming event whose name is in `names`."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev["event"] in names:
                    return self.events.pop(i)
            self.events.append(self._read(deadline))

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------------------
# Daemons
# ---------------------------------------------------------------------------

# The pseudo-daemon that measures a row's Floor (floor_copy), in the rotation with the
# daemons of the rows that have one.
FLOOR = "floor"

DAEMONS = {
    "sluice": lambda ctx, sock: [ctx.sluice, "daemon", "--qmp", sock],
    # Another sluice build (--sluice-base), for A/B runs of a change.
    "base": lambda ctx, sock: [ctx.sluice_base, "daemon", "--qmp", sock],
    "qsd": lambda ctx, sock: ["qemu-storage-daemon", "--chardev",
                              f"socket,id=m,path={sock},server=on,wait=off",
                              "--monitor", "chardev=m"],
}


def start_daemon(ctx, name, rundir):
    sock = os.path.join(rundir, "qmp.sock")
    log = os.path.join(rundir, "daemon.log")
    argv = DAEMONS[name](ctx, sock)
    with open(log, "wb") as f:
        proc = spawn(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                     cwd=rundir)
    deadline = time.monotonic() + ctx.start_timeout
    last = None
    while True:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited {proc.returncode}: {tail(read_log(log))}")
        if os.path.exists(sock):
            try:
                return proc, Qmp(sock, ctx.job_timeout), log
            except (OSError, BenchError) as e:
                last = e
        if time.monotonic() > deadline:
            stop(proc)
            raise BenchError(f"{name}: no QMP after {ctx.start_timeout}s: {last}")
        time.sleep(0.05)


def read_log(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-4000:]
    except OSError:
        return ""


# ---------------------------------------------------------------------------
# Chains.  Templates are built once in the work dir; each run gets a copy.
# Backing names in the headers are relative, so a copied chain is self-contained.
# ---------------------------------------------------------------------------


def qemu_img_create(path, size, backing=None):
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        argv += ["-b", backing, "-F", "qcow2"]
    run(argv + [path, str(size)])


def qemu_io_write(path, cmds):
    argv = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        argv += ["-c", c]
    run(argv + [path], timeout=1800)


def writes(pattern, offset, length):
    """qemu-io write commands for a range (qemu-io takes at most 2 GiB - 512 per write)."""
    return [f"write -P {pattern} {o} {min(GiB, offset + length - o)}"
            for o in range(offset, offset + length, GiB)]


def stripes(size, parity, pattern):
    """qemu-io writes of every other 1/16th of the image (parity 0 or 1)."""
    n = 16
    step = size // n
    return [w for i in range(parity, n, 2) for w in writes(pattern, i * step, step)]


def build_chain2(ctx, d):
    """base (fully allocated, 0x5a) <- top (empty)."""
    base, top = os.path.join(d, "base.qcow2"), os.path.join(d, "top.qcow2")
    qemu_img_create(base, ctx.size)
    qemu_io_write(base, writes("0x5a", 0, ctx.size))
    qemu_img_create(top, ctx.size, "base.qcow2")
    return ["base.qcow2", "top.qcow2"]


def build_chain3(ctx, d):
    """base (even 1/16th stripes, 0x11) <- mid (odd stripes, 0x22) <- top (empty)."""
    base, mid, top = (os.path.join(d, n) for n in ("base.qcow2", "mid.qcow2", "top.qcow2"))
    qemu_img_create(base, ctx.size)
    qemu_io_write(base, stripes(ctx.size, 0, "0x11"))
    qemu_img_create(mid, ctx.size, "base.qcow2")
    qemu_io_write(mid, stripes(ctx.size, 1, "0x22"))
    qemu_img_create(top, ctx.size, "mid.qcow2")
    return ["base.qcow2", "mid.qcow2", "top.qcow2"]


def dirty_stride():
    """The dirtied fraction of the `dirty2` chain: 64 KiB (one bitmap granule) in every
    20 * 64 KiB, i.e. 5% of the image."""
    return 64 * KiB, 20 * 64 * KiB


def build_dirty2(ctx, d):
    """The chain2 chain, with a persistent bitmap b0 (64 KiB granules) on top and 5% of
    the image then written through qemu-io (0x77, 64 KiB at a fixed stride): b0 marks
    exactly those ranges, so both daemons load the same dirty bitmap from the image."""
    names = build_chain2(ctx, d)
    top = os.path.join(d, "top.qcow2")
    run(["qemu-img", "bitmap", "--add", "-g", str(64 * KiB), top, "b0"])
    n, stride = dirty_stride()
    qemu_io_write(top, [f"write -P 0x77 {o} {n}" for o in range(0, ctx.size, stride)])
    return names


CHAINS = {"chain2": build_chain2, "chain3": build_chain3, "dirty2": build_dirty2}


def qcow2(name, path, backing=None, read_only=False):
    """blockdev-add arguments; backing=None: from the image header."""
    a = {"driver": "qcow2", "node-name": name,
         "file": {"driver": "file", "filename": path}}
    if read_only:
        a["read-only"] = True  # the file child inherits it; qsd reopens both for a commit
    if backing is not None:
        a["backing"] = backing
    return a


def img_info(path):
    return json.loads(run(["qemu-img", "info", "--output=json", path]))


# ---------------------------------------------------------------------------
# Rows: chain, nodes to add, the job command, bytes copied, post-run check.
# ---------------------------------------------------------------------------


def stream_setup(d):
    return [qcow2("top", os.path.join(d, "top.qcow2"))]


def commit_setup(d):
    p = lambda n: os.path.join(d, n + ".qcow2")
    return [qcow2("base", p("base"), read_only=True),
            qcow2("mid", p("mid"), backing="base", read_only=True),
            qcow2("top", p("top"), backing="mid")]


def check_no_backing(d):
    info = img_info(os.path.join(d, "top.qcow2"))
    if "backing-filename" in info:
        raise BenchError(f"top still has a backing file: {info['backing-filename']}")


def check_backing_base(d):
    info = img_info(os.path.join(d, "top.qcow2"))
    if os.path.basename(info.get("backing-filename", "")) != "base.qcow2":
        raise BenchError(f"top's backing is {info.get('backing-filename')!r}, not base.qcow2")


class Row:
    """A benchmark row. Without `flow`, the timed part is the job command up to
    BLOCK_JOB_COMPLETED; a `flow(ctx, rt)` does its own timed part (see the flows below) and
    returns the record's figures. `metrics` are the table's lines for the row."""

    def __init__(self, name, chain, setup, job, copied, check, what, flow=None,
                 metrics=None, floor=False):
        self.name, self.chain, self.setup, self.job = name, chain, setup, job
        self.copied, self.check, self.what = copied, check, what
        self.flow = flow
        self.metrics = metrics or ["MiB/s", "CPU s"]
        # Measure the Floor (see floor_copy) for this row: a job that leaves what it
        # copied durable (mirror flushes its target before it completes, sluice's commit
        # its base).
        self.floor = floor


ROWS = [
    Row("stream-2", "chain2", stream_setup,
        ("block-stream", {"job-id": "s0", "device": "top"}),
        lambda size: size, check_no_backing,
        "block-stream of top, base (fully allocated) <- top (empty)"),
    Row("stream-3", "chain3", stream_setup,
        ("block-stream", {"job-id": "s0", "device": "top"}),
        lambda size: size, check_no_backing,
        "block-stream of top, base (even stripes) <- mid (odd stripes) <- top (empty)"),
    Row("commit-3", "chain3", commit_setup,
        ("block-commit", {"job-id": "c0", "device": "top", "top-node": "mid",
                          "base-node": "base"}),
        lambda size: size // 2, check_backing_base,
        "block-commit of mid into base, same chain as stream-3 (moves half the size)",
        floor=True),
]


# ---------------------------------------------------------------------------
# Flows of the mirror, backup and pull-mode rows (issues #15 and #16).  `rt` is the run:
# the daemon (rt.proc), its QMP connection (rt.qmp) and the run's directory (rt.dir).
# Everything before the timed part (target images, exports, fio's connection) is
# untimed; each flow returns the record's figures.
# ---------------------------------------------------------------------------


class RunCtx:
    def __init__(self, proc, qmp, rundir):
        self.proc, self.qmp, self.dir = proc, qmp, rundir

    def path(self, name):
        return os.path.join(self.dir, name)


def add_top_and_target(ctx, rt, target="dst"):
    """Node top (its backing from the header) and a new empty qcow2 node `target`."""
    qemu_img_create(rt.path(target + ".qcow2"), ctx.size)
    rt.qmp.execute("blockdev-add", qcow2("top", rt.path("top.qcow2")))
    rt.qmp.execute("blockdev-add", qcow2(target, rt.path(target + ".qcow2")))


def export_top(rt):
    """The NBD server on DIR/nbd.sock with top exported writable as `vm`; its URI."""
    sock = rt.path("nbd.sock")
    rt.qmp.execute("nbd-server-start",
                   {"addr": {"type": "unix", "data": {"path": sock}}})
    rt.qmp.execute("block-export-add", {"type": "nbd", "id": "vm", "node-name": "top",
                                        "name": "vm", "writable": True})
    return f"nbd+unix:///vm?socket={sock}"


def wait_job_event(ctx, rt, names):
    ev = rt.qmp.wait_event(set(names) | {"BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR"},
                           ctx.job_timeout)
    if ev["event"] not in names:
        raise BenchError(f"job ended with {ev['event']}: {ev['data']}")
    if ev["data"].get("error"):
        raise BenchError(f"job failed: {ev['data']['error']}")
    return ev


def start_fio(ctx, rt, uri):
    """fio (nbd engine) writing 4 KiB at random offsets, 8 in flight, until stopped."""
    out = rt.path("fio.json")
    argv = ["fio", "--name=busy", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
            "--bs=4k", "--iodepth=8", f"--size={ctx.size}", "--time_based",
            "--runtime=3600", "--output-format=json", f"--output={out}"]
    if ctx.busy_iops:
        argv.append(f"--rate_iops={ctx.busy_iops}")
    p = spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
              stderr=subprocess.PIPE)
    time.sleep(1.0)  # untimed: connected and writing before the job starts
    if p.poll() is not None:
        raise BenchError(f"fio exited {p.returncode}: {tail(p.stderr.read().decode())}")
    return p, out


def stop_fio(p, out):
    """Stops fio (SIGTERM: it writes its report); its write IOPS, or None."""
    stop(p, grace=10.0)
    try:
        with open(out) as f:
            text = f.read()
        return json.loads(text[text.index("{"):])["jobs"][0]["write"]["iops"]
    except (OSError, ValueError, KeyError, IndexError):
        return None


def mirror_flow(busy):
    """blockdev-mirror sync=full of top (over its backing) into a new qcow2: the time to
    BLOCK_JOB_READY, then job-complete and the time to BLOCK_JOB_COMPLETED; with `busy`,
    fio writes through top's export all along."""

    def flow(ctx, rt):
        add_top_and_target(ctx, rt)
        fio = None
        if busy:
            fio = start_fio(ctx, rt, export_top(rt))
        c0, t0 = cpu_ticks(rt.proc.pid), time.perf_counter()
        rt.qmp.execute("blockdev-mirror", {"job-id": "m0", "device": "top",
                                           "target": "dst", "sync": "full",
                                           "copy-mode": ctx.copy_mode})
        wait_job_event(ctx, rt, {"BLOCK_JOB_READY"})
        ready = time.perf_counter() - t0
        rt.qmp.execute("job-complete", {"id": "m0"})
        wait_job_event(ctx, rt, {"BLOCK_JOB_COMPLETED"})
        secs, c1 = time.perf_counter() - t0, cpu_ticks(rt.proc.pid)
        rec = {"READY s": ready, "done s": secs, "secs": secs,
               "MiB/s": ctx.size / MiB / secs, "CPU s": (c1 - c0) / CLK_TCK}
        if fio:
            iops = stop_fio(*fio)
            if iops is not None:
                rec["fio IOPS"] = iops
        return rec
    return flow


def backup_flow(incremental):
    """blockdev-backup of top (dirty2 chain) into a new qcow2: sync=full, or
    sync=incremental with the image's bitmap b0 (5% dirty)."""

    def flow(ctx, rt):
        add_top_and_target(ctx, rt)
        args = {"job-id": "b0", "device": "top", "target": "dst", "sync": "full"}
        if incremental:
            args.update(sync="incremental", bitmap="b0")
        c0, t0 = cpu_ticks(rt.proc.pid), time.perf_counter()
        rt.qmp.execute("blockdev-backup", args)
        wait_job_event(ctx, rt, {"BLOCK_JOB_COMPLETED"})
        secs, c1 = time.perf_counter() - t0, cpu_ticks(rt.proc.pid)
        copied = dirty_bytes(ctx.size) if incremental else ctx.size
        return {"secs": secs, "MiB/s": copied / MiB / secs, "CPU s": (c1 - c0) / CLK_TCK}
    return flow


def dirty_bytes(size):
    """The bytes bitmap b0 of the dirty2 chain marks."""
    n, stride = dirty_stride()
    return len(range(0, size, stride)) * n


# The pull-mode client: the dirty extents from block status on the bitmap's context,
# then aio reads of them (8 in flight, at most 4 MiB each); checks they read 0x77 and
# prints what it read and how long it took (from connect to the last read).
PULL_READER = r"""
import json, nbd, sys, time
uri, context = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
h = nbd.NBD()
h.add_meta_context(context)
h.connect_uri(uri)
size = h.get_size()
dirty, pos = [], [0]
def extent(ctx, offset, entries, err):
    if ctx != context:
        return 0
    o = offset
    for i in range(0, len(entries), 2):
        if entries[i + 1] & 1:
            if dirty and dirty[-1][0] + dirty[-1][1] == o:
                dirty[-1][1] += entries[i]
            else:
                dirty.append([o, entries[i]])
        o += entries[i]
    pos[0] = max(pos[0], o)
    return 0
while pos[0] < size:
    start = pos[0]
    h.block_status(min(size - start, 1 << 30), start, extent)
    if pos[0] <= start:
        sys.exit("block status made no progress")
reqs = []
for o, n in dirty:
    while n > 0:
        k = min(n, 4 << 20)
        reqs.append((o, k))
        o, n = o + k, n - k
inflight, bad, total = [], 0, 0
def reap():
    global bad
    for c, b in list(inflight):
        if h.aio_command_completed(c):
            inflight.remove((c, b))
            data = b.to_bytearray()
            bad += len(data) - data.count(0x77)
for o, n in reqs:
    while len(inflight) >= 8:
        h.poll(-1)
        reap()
    b = nbd.Buffer(n)
    inflight.append((h.aio_pread(b, o), b))
    total += n
while inflight:
    h.poll(-1)
    reap()
secs = time.perf_counter() - t0
h.shutdown()
print(json.dumps({"extents": len(dirty), "bytes": total, "bad": bad, "secs": secs}))
"""


def pull_flow(ctx, rt):
    """Pull-mode backup as libvirt does it (see the transcript): top exported as `vm`, a
    scratch qcow2 whose backing is the live node, one transaction (backup bitmap on the
    scratch merged from b0, new checkpoint b1, b0 disabled, blockdev-backup sync=none into
    the scratch), the scratch exported read-only with the bitmap; then a libnbd client
    reads only the dirty extents. Timed: the setup (from blockdev-add of the scratch to
    the export) and the read."""
    rt.qmp.execute("blockdev-add", qcow2("top", rt.path("top.qcow2")))
    export_top(rt)
    scratch = rt.path("scratch.qcow2")
    qemu_img_create(scratch, ctx.size)
    c0, t0 = cpu_ticks(rt.proc.pid), time.perf_counter()
    rt.qmp.execute("blockdev-add", {"driver": "file", "node-name": "scratch-f",
                                    "filename": scratch})
    rt.qmp.execute("blockdev-add", {"driver": "qcow2", "node-name": "scratch",
                                    "file": "scratch-f", "backing": "top"})
    rt.qmp.execute("transaction", {"actions": [
        {"type": "block-dirty-bitmap-add",
         "data": {"node": "scratch", "name": "backup-vm", "disabled": True}},
        {"type": "block-dirty-bitmap-merge",
         "data": {"node": "scratch", "target": "backup-vm",
                  "bitmaps": [{"node": "top", "name": "b0"}]}},
        {"type": "block-dirty-bitmap-add",
         "data": {"node": "top", "name": "b1", "persistent": True}},
        {"type": "block-dirty-bitmap-disable", "data": {"node": "top", "name": "b0"}},
        {"type": "blockdev-backup",
         "data": {"device": "top", "job-id": "backup-vm", "target": "scratch",
                  "sync": "none"}}]})
    rt.qmp.execute("block-export-add", {"type": "nbd", "id": "backup",
                                        "node-name": "scratch", "name": "backup-vm",
                                        "writable": False, "bitmaps": ["backup-vm"]})
    setup = time.perf_counter() - t0
    sock = rt.path("nbd.sock")
    k0 = os.times()
    uri = f"nbd+unix:///backup-vm?socket={sock}"
    reader = ([ctx.pull_reader_bin] if ctx.pull_reader_bin
              else [ctx.libnbd_python, "-c", PULL_READER])
    out = run(reader + [uri, "qemu:dirty-bitmap:backup-vm"])
    secs, c1, k1 = time.perf_counter() - t0, cpu_ticks(rt.proc.pid), os.times()
    # The reader's own CPU: where it is close to `read s`, the row is bound by the client
    # and says little about the daemon (as with the Python reader).
    client = (k1.children_user + k1.children_system) - (k0.children_user + k0.children_system)
    got = json.loads(out)
    if got["bad"] or got["bytes"] != dirty_bytes(ctx.size):
        raise BenchError(f"pull read {got}, expected {dirty_bytes(ctx.size)} bytes of 0x77")
    rt.qmp.execute("job-cancel", {"id": "backup-vm"})
    wait_job_event(ctx, rt, {"BLOCK_JOB_CANCELLED"})
    extra = {"status s": got["status_secs"]} if "status_secs" in got else {}
    return {**extra, "setup s": setup, "read s": got["secs"], "secs": secs,
            "MiB/s": got["bytes"] / MiB / got["secs"], "CPU s": (c1 - c0) / CLK_TCK,
            "client CPU s": client}


def check_target_equals_top(rundir, tdir):
    run(["qemu-img", "check", "-q", os.path.join(rundir, "dst.qcow2")])
    run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2",
         os.path.join(rundir, "dst.qcow2"), os.path.join(tdir, "top.qcow2")], timeout=1800)


def check_target_clean(rundir, tdir):
    run(["qemu-img", "check", "-q", os.path.join(rundir, "dst.qcow2")])


def check_incremental(rundir, tdir):
    """The target holds the dirty ranges (0x77) and nothing else."""
    check_target_clean(rundir, tdir)
    data = sum(e["length"] for e in json.loads(run(
        ["qemu-img", "map", "--output=json", os.path.join(rundir, "dst.qcow2")]))
        if e["data"])
    size = img_info(os.path.join(rundir, "dst.qcow2"))["virtual-size"]
    if data != dirty_bytes(size):
        raise BenchError(f"incremental target holds {data} bytes of data")


def no_check(rundir, tdir):
    pass


ROWS += [
    Row("mirror-idle", "chain2", None, None, lambda size: size, check_target_equals_top,
        "blockdev-mirror sync=full of top (chain2) into a new qcow2: READY, job-complete, "
        "COMPLETED", flow=mirror_flow(False),
        metrics=["READY s", "done s", "MiB/s", "CPU s"], floor=True),
    Row("mirror-busy", "chain2", None, None, lambda size: size, check_target_clean,
        "the same while fio (nbd engine, 4K randwrite, QD8) writes through top's export",
        flow=mirror_flow(True), metrics=["READY s", "done s", "MiB/s", "CPU s", "fio IOPS"]),
    Row("backup-full", "dirty2", None, None, lambda size: size, check_target_equals_top,
        "blockdev-backup sync=full of top (dirty2) into a new qcow2", flow=backup_flow(False)),
    Row("backup-incr", "dirty2", None, None, dirty_bytes, check_incremental,
        "blockdev-backup sync=incremental bitmap=b0 (5% dirty: 64 KiB every 1.25 MiB)",
        flow=backup_flow(True)),
    Row("pull-read", "dirty2", None, None, dirty_bytes, no_check,
        "pull mode: scratch over the live node, transaction with blockdev-backup sync=none, "
        "export with the bitmap; a libnbd client reads the dirty extents (QD8)", flow=pull_flow,
        metrics=["setup s", "read s", "status s", "MiB/s", "CPU s", "client CPU s"]),
]


def fresh_copy(ctx, row, rundir):
    os.makedirs(rundir)
    tdir = ctx.templates[row.chain][0]
    for n in ctx.templates[row.chain][1]:
        subprocess.run(["cp", "--sparse=always", os.path.join(tdir, n),
                        os.path.join(rundir, n)], check=True)
    os.sync()  # untimed: the copy's dirty pages are written back before the job
    # The copy stays in the page cache (warm, as the job's input); the templates leave it,
    # so that the job's writes need not evict pages (reclaim is charged to the writer).
    for n in ctx.templates[row.chain][1]:
        drop_cache(os.path.join(tdir, n))
        if ctx.cold:
            drop_cache(os.path.join(rundir, n))


def drop_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def job_flow(ctx, row, proc, qmp, rundir):
    """The stream and commit rows: the job command to BLOCK_JOB_COMPLETED."""
    for args in row.setup(rundir):
        qmp.execute("blockdev-add", args)
    cmd, args = row.job
    c0, t0 = cpu_ticks(proc.pid), time.perf_counter()
    qmp.execute(cmd, args)
    ev = qmp.wait_event({"BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"}, ctx.job_timeout)
    secs, c1 = time.perf_counter() - t0, cpu_ticks(proc.pid)
    if ev["event"] != "BLOCK_JOB_COMPLETED":
        raise BenchError(f"job ended with {ev['event']}: {ev['data']}")
    if ev["data"].get("error"):
        raise BenchError(f"job failed: {ev['data']['error']}")
    return {"MiB/s": row.copied(ctx.size) / MiB / secs, "CPU s": (c1 - c0) / CLK_TCK,
            "secs": secs}


SYNC_FILE_RANGE_WRITE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                  ctypes.c_uint]


def sync_file_range(fd, offset, nbytes, flags):
    """sync_file_range(2) (Python's os module has no binding)."""
    if _libc.sync_file_range(fd, offset, nbytes, flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def floor_copy(ctx, row, rundir):
    """The Floor of a row: this machine copying the bytes the job copies from a warm file
    (the run's fresh base.qcow2) into a new file in the same directory with
    copy_file_range(2) (no trip through user space) in 16 MiB pieces, starting the
    writeback of each (sync_file_range SYNC_FILE_RANGE_WRITE, so the disk writes while the
    copy goes on), then fdatasync: what any daemon's job that leaves its copy durable must
    pay for the page cache and the disk. "copy s" is the copy alone."""
    n = row.copied(ctx.size)
    src = os.open(os.path.join(rundir, "base.qcow2"), os.O_RDONLY)
    dst = os.open(os.path.join(rundir, "floor.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                  0o644)
    try:
        have = os.fstat(src).st_size
        t0 = time.perf_counter()
        done = 0
        while done < n:
            got = os.copy_file_range(src, dst, min(n - done, 16 * MiB), done % have, done)
            if got <= 0:
                raise BenchError(f"copy_file_range returned {got} at {done}")
            done += got
            sync_file_range(dst, 0, 0, SYNC_FILE_RANGE_WRITE)
        copied = time.perf_counter() - t0
        os.fdatasync(dst)
        secs = time.perf_counter() - t0
    finally:
        os.close(src)
        os.close(dst)
    return {"copy s": copied, "done s": secs, "secs": secs, "MiB/s": n / MiB / secs,
            "CPU s": 0.0}


def measure(ctx, row, name, rnd):
    rundir = os.path.join(ctx.work, f"run-{row.name}-{name}-{rnd}")
    fresh_copy(ctx, row, rundir)
    if name == FLOOR:
        try:
            return floor_copy(ctx, row, rundir)
        finally:
            shutil.rmtree(rundir, ignore_errors=True)
            os.sync()
    proc = qmp = None
    try:
        proc, qmp, log = start_daemon(ctx, name, rundir)
        if row.flow:
            rec = row.flow(ctx, RunCtx(proc, qmp, rundir))
        else:
            rec = job_flow(ctx, row, proc, qmp, rundir)
        try:
            qmp.execute("quit")
        except BenchError:
            pass  # the daemon may close the socket before or after its reply
        qmp.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{name} did not exit after quit")
        if proc.returncode != 0:
            raise BenchError(f"{name} exited {proc.returncode} after quit: "
                             f"{tail(read_log(log))}")
        rec.update(cpu_s=rec["CPU s"], copied=row.copied(ctx.size))
        if rnd == 0 or ctx.check_all:
            tdir = ctx.templates[row.chain][0]
            if row.flow:
                row.check(rundir, tdir)
                run(["qemu-img", "check", "-q", os.path.join(rundir, "top.qcow2")])
            else:
                row.check(rundir)
                run(["qemu-img", "check", "-q", os.path.join(rundir, "top.qcow2")])
                run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2",
                     os.path.join(rundir, "top.qcow2"), os.path.join(tdir, "top.qcow2")],
                    timeout=1800)
            rec["checked"] = True
        return rec
    finally:
        if qmp:
            qmp.close()
        if proc:
            stop(proc)
        shutil.rmtree(rundir, ignore_errors=True)
        os.sync()


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------

# Each metric: higher is better?, format.
METRICS = {
    "MiB/s": (True, lambda v: f"{v:.0f}"),
    "CPU s": (False, lambda v: f"{v:.2f}"),
    "READY s": (False, lambda v: f"{v:.2f}"),
    "done s": (False, lambda v: f"{v:.2f}"),
    "setup s": (False, lambda v: f"{v:.3f}"),
    "read s": (False, lambda v: f"{v:.3f}"),
    "status s": (False, lambda v: f"{v:.3f}"),
    "client CPU s": (False, lambda v: f"{v:.3f}"),
    "fio IOPS": (True, lambda v: f"{v:.0f}"),
}


def report(ctx, results):
    names = ctx.daemons
    # Ratio columns: sluice against each other daemon that ran.
    peers = [n for n in ("qsd", "base") if "sluice" in names and n in names]
    lines = [f"# sluice job bench: {human(ctx.size)} chains, {ctx.rounds} rounds"
             + (", cold source" if ctx.cold else ""),
             "",
             f"{ctx.started} · {platform.node()} · {os.cpu_count()} CPUs · kernel "
             f"{platform.release()} · load {ctx.load0} -> {ctx.load1}"]
    if ctx.interrupted:
        lines.append("**INTERRUPTED: partial results.**")
    lines += ["Medians over rounds; MiB/s = bytes the job copies / seconds from the "
              "command to BLOCK_JOB_COMPLETED (mirror: to COMPLETED after job-complete; "
              "pull-read: bytes read / read s); CPU s = daemon utime+stime over that span "
              "(pull-read: setup and read; client CPU s = the libnbd reader's own, "
              "from its start to its exit). sluice/X above 1 is better for MiB/s and "
              "IOPS, below 1 for seconds."
              + (" pull-read's reader: "
                 + ("C (bench/pull-reader.c)." if getattr(ctx, "pull_reader_bin", None)
                    else "Python (python3-libnbd).")
                 if any(r.name == "pull-read" for r in ctx.rows) else ""),
              "", "| row | metric | " + " | ".join(names + [f"sluice/{p}" for p in peers])
              + " |",
              "|---|---|" + "---:|" * (len(names) + len(peers))]
    errs = []
    for row in ctx.rows:
        for key in row.metrics:
            higher, fmt = METRICS[key]
            cells = [row.name, key + ("" if higher else " (lower better)")]
            med = {}
            for n in names:
                rs = results.get(row.name, {}).get(n, [])
                vals = [r[key] for r in rs if key in r]
                med[n] = statistics.median(vals) if vals else None
                if med[n] is None:
                    cells.append("err" if rs else "-")
                else:
                    cells.append(fmt(med[n]) + ("" if len(vals) == len(rs)
                                                else f" ({len(vals)}/{len(rs)})"))
            for p in peers:
                a, b = med["sluice"], med[p]
                cells.append(f"{a / b:.2f}" if a is not None and b else "-")
            lines.append("| " + " | ".join(cells) + " |")
        for n in names + [FLOOR]:
            for r in results.get(row.name, {}).get(n, []):
                if "error" in r:
                    errs.append(f"- {row.name} / {n} round {r['round'] + 1}: {r['error']}")
    floors = [r for r in ctx.rows if results.get(r.name, {}).get(FLOOR)]
    if floors:
        lines += ["", "## Floor", "",
                  "The same bytes copied by this machine from a warm file into a new one "
                  "(copy_file_range in 16 MiB pieces, no user-space copy, the writeback of "
                  "each started at once with sync_file_range), then fdatasync: about the "
                  "best a job that leaves its copy durable can do. Medians; each daemon's `done s` as a "
                  "multiple of the floor's (commit: its seconds to COMPLETED).", "",
                  "| row | copy s | copy + fdatasync s | "
                  + " | ".join(f"{n} / floor" for n in names) + " |",
                  "|---|---:|---:|" + "---:|" * len(names)]
        for row in floors:
            def med(n, key):
                vals = [r[key] for r in results[row.name].get(n, []) if key in r]
                return statistics.median(vals) if vals else None
            f = med(FLOOR, "secs")
            cells = [row.name, f"{med(FLOOR, 'copy s'):.2f}", f"{f:.2f}"]
            for n in names:
                d = med(n, "secs")
                cells.append(f"{d / f:.2f}" if d is not None and f else "-")
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Rows:"] + [f"- {r.name}: {r.what}" for r in ctx.rows]
    if errs:
        lines += ["", "Errors:"] + errs
    return "\n".join(lines) + "\n"


def parse_size(s):
    mult = {"K": KiB, "M": MiB, "G": GiB, "T": 1 << 40}
    s = s.strip()
    n = int(float(s[:-1]) * mult[s[-1].upper()]) if s[-1:].upper() in mult else int(s)
    if n <= 0 or n % (16 * MiB):
        raise argparse.ArgumentTypeError("size must be a positive multiple of 16 MiB")
    return n


def human(n):
    for unit, m in (("T", 1 << 40), ("G", GiB), ("M", MiB)):
        if n % m == 0:
            return f"{n // m}{unit}"
    return str(n)


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="Block-job benchmark: sluice daemon vs qemu-storage-daemon.")
    ap.add_argument("--sluice", default="target/release/sluice", help="sluice binary")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=parse_size, default=GiB, help="virtual size (1G)")
    ap.add_argument("--only", help="comma-separated rows: "
                    + ",".join(r.name for r in ROWS))
    ap.add_argument("--daemons", default="sluice,qsd",
                    help="sluice,qsd (and base: the --sluice-base build)")
    ap.add_argument("--sluice-base", help="another sluice binary, the `base` daemon")
    ap.add_argument("--workdir", help="work dir (kept; templates reused). Default: temp")
    ap.add_argument("--out", help="write results.json and results.md here")
    ap.add_argument("--check-all", action="store_true",
                    help="check every run's result (default: round 1 only)")
    ap.add_argument("--job-timeout", type=float, default=600.0)
    ap.add_argument("--busy-iops", type=int, default=8000,
                    help="cap fio's writes in mirror-busy at this many IOPS (default 8000; "
                    "0: no cap), so that both daemons get the same write load (uncapped, "
                    "a daemon that serves writes faster gets more to copy again: on a fast "
                    "machine sluice then served ~40k IOPS and its background mirror never "
                    "got to READY)")
    ap.add_argument("--copy-mode", default="background",
                    choices=["background", "write-blocking"],
                    help="blockdev-mirror's copy-mode in the mirror rows (default background)")
    ap.add_argument("--libnbd-python", default="/usr/bin/python3",
                    help="a python that imports libnbd (pull-read row)")
    ap.add_argument("--pull-reader", default="auto", choices=["auto", "c", "python"],
                    help="the pull-read row's client: c (bench/pull-reader.c, built with cc "
                    "and libnbd-dev), python (python3-libnbd; its interpreter is as busy as "
                    "the whole read, so the row then measures the client), auto (c when it "
                    "builds, else python; the default)")
    ap.add_argument("--cold", action="store_true",
                    help="drop each run's copy of the chain from the page cache too, so the "
                    "job reads its source from the disk (default: the copy stays warm)")
    ap.add_argument("--start-timeout", type=float, default=30.0)
    ap.add_argument("--no-floor", action="store_true",
                    help="leave out the Floor (the same bytes copied with copy_file_range "
                    "and fdatasync) of the rows that have one")
    a = ap.parse_args(argv)
    if a.rounds < 1:
        ap.error("--rounds must be >= 1")
    a.rows = ROWS
    if a.only:
        want = [x.strip() for x in a.only.split(",") if x.strip()]
        bad = [x for x in want if x not in {r.name for r in ROWS}]
        if bad:
            ap.error(f"unknown rows {bad}")
        a.rows = [r for r in ROWS if r.name in want]
    a.daemons = [x.strip() for x in a.daemons.split(",") if x.strip()]
    if any(d not in DAEMONS for d in a.daemons):
        ap.error(f"daemons: {', '.join(DAEMONS)}")
    a.sluice = os.path.abspath(a.sluice)
    if "sluice" in a.daemons and not os.access(a.sluice, os.X_OK):
        ap.error(f"{a.sluice} is not an executable file (build it or pass --sluice)")
    if "base" in a.daemons:
        if not a.sluice_base or not os.access(a.sluice_base, os.X_OK):
            ap.error("the base daemon needs --sluice-base PATH (an executable)")
        a.sluice_base = os.path.abspath(a.sluice_base)
    return a


def build_pull_reader(ctx):
    """Sets ctx.pull_reader_bin: the C reader built into the work dir, or None for the
    Python one (--pull-reader python, or auto when cc or libnbd-dev is missing)."""
    ctx.pull_reader_bin = None
    if ctx.pull_reader == "python" or not any(r.name == "pull-read" for r in ctx.rows):
        return
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pull-reader.c")
    out = os.path.join(ctx.work, "pull-reader")
    try:
        p = subprocess.run(["cc", "-O2", "-o", out, src, "-lnbd"], capture_output=True,
                           text=True)
        why = p.stderr.strip() if p.returncode else None
    except OSError as e:  # no cc at all
        why = str(e)
    if why is None:
        ctx.pull_reader_bin = out
    elif ctx.pull_reader == "c":
        raise BenchError(f"cannot build {src} (needs cc and libnbd-dev): {why}")
    else:
        note("pull-read: the C reader did not build (cc, libnbd-dev?); using Python")


def bench(ctx):
    build_pull_reader(ctx)
    ctx.templates = {}
    for chain in dict.fromkeys(r.chain for r in ctx.rows):
        d = os.path.join(ctx.work, f"template-{chain}-{human(ctx.size)}")
        if os.path.exists(os.path.join(d, "done")):
            note(f"reusing {d}")
            names = json.load(open(os.path.join(d, "done")))
        else:
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
            note(f"building {chain} in {d}")
            names = CHAINS[chain](ctx, d)
            with open(os.path.join(d, "done"), "w") as f:
                json.dump(names, f)
        ctx.templates[chain] = (d, names)
    os.sync()
    results = ctx.results
    for rnd in range(ctx.rounds):
        for row in ctx.rows:
            sides = ctx.daemons + ([FLOOR] if row.floor and not ctx.no_floor else [])
            k = rnd % len(sides)
            for n in sides[k:] + sides[:k]:
                rec = {"round": rnd}
                try:
                    rec.update(measure(ctx, row, n, rnd))
                    extra = "".join(f", {k} {METRICS[k][1](rec[k])}" for k in row.metrics
                                    if k not in ("MiB/s", "CPU s") and k in rec)
                    shown = (f"{rec['secs']:.2f} s, {rec['MiB/s']:.0f} MiB/s, "
                             f"CPU {rec['CPU s']:.2f} s{extra}"
                             + (", checked" if rec.get("checked") else ""))
                except BenchError as e:
                    rec["error"] = str(e)
                    shown = f"ERROR {e}"
                results.setdefault(row.name, {}).setdefault(n, []).append(rec)
                note(f"round {rnd + 1}/{ctx.rounds} {row.name:9} {n:7} {shown}")


def main(argv=None):
    ctx = parse_args(argv if argv is not None else sys.argv[1:])

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    temp = ctx.workdir is None
    ctx.work = tempfile.mkdtemp(prefix="job-bench-") if temp else os.path.abspath(ctx.workdir)
    os.makedirs(ctx.work, exist_ok=True)
    ctx.started = datetime.datetime.now().isoformat(timespec="seconds")
    ctx.load0 = "%.2f" % os.getloadavg()[0]
    ctx.results, ctx.interrupted, rc = {}, False, 0
    try:
        bench(ctx)
    except KeyboardInterrupt as e:
        note(f"interrupted ({str(e) or 'SIGINT'}); cleaning up")
        ctx.interrupted, rc = True, 130
    except (BenchError, subprocess.CalledProcessError) as e:
        note(f"ERROR: {e}")
        rc = 1
    finally:
        stop_all()
        ctx.load1 = "%.2f" % os.getloadavg()[0]
        if temp:
            shutil.rmtree(ctx.work, ignore_errors=True)
    if ctx.results:
        md = report(ctx, ctx.results)
        print(md)
        if ctx.out:
            os.makedirs(ctx.out, exist_ok=True)
            with open(os.path.join(ctx.out, "results.md"), "w") as f:
                f.write(md)
            with open(os.path.join(ctx.out, "results.json"), "w") as f:
                json.dump({"started": ctx.started, "host": platform.node(),
                           "cpus": os.cpu_count(), "load": [ctx.load0, ctx.load1],
                           "size": ctx.size, "rounds": ctx.rounds,
                           "daemons": ctx.daemons, "results": ctx.results}, f, indent=1)
    return rc


if __name__ == "__main__":
    sys.exit(main())
