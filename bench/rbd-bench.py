#!/usr/bin/python3
"""RBD benchmark: sluice serving an RBD image over NBD vs librbd's own `rbd bench`.

Both run against the same image on the same cluster, row by row in one run, so
that the machine's drift hits both alike; `rbd bench` (librbd in-process, no
NBD hop) is the ceiling, and the target is sluice >= 80% of it on every row.
By default a throw-away cluster is started with scripts/ceph-cluster.sh (the
OSD keeps data in RAM: keep --size well under its capacity) and torn down at
exit; --conf uses an existing one instead.

Rows: sequential read/write in 4 MiB requests (16 in flight, rbd bench's
default threads), random 4 KiB read/write at queue depth 1 and 32. sluice's
side is driven by fio's nbd engine with the same request size, depth and
total bytes.  Both use librbd's cache in the same mode: the rbd tool turns
off rbd_cache_writethrough_until_flush (write-around from the first write),
and fio sends no flush before writing, so sluice is given the same setting
(ceph.rbd_cache_writethrough_until_flush=false); sluice's own default keeps
Ceph's (write-through until the client's first flush).  Standard library only.

CPU: for each row and side the script also counts the CPU seconds of the
cluster's daemons (/proc/PID/stat of the PIDs scripts/ceph-cluster.sh
recorded; not with --conf), of the client (rbd bench, or fio: the children's
rusage) and of the sluice server (its /proc/PID/stat), per request.  On this
machine's two cores every process shares the same CPUs, so where a row is CPU
bound its ratio is at most (rbd bench side CPU per request) / (sluice side CPU
per request); the "bound" column is that ratio with sluice's own share taken
out (the server charged only what librbd costs rbd bench): the best any server
could reach there, given librbd, the cluster and an NBD client.

--sluice-base PATH runs a second sluice binary (an older build) on every row
too, so that new and base are measured interleaved in one run; the tables
then get a "base" column (and base CPU per request).

qemu-nbd with QEMU's rbd driver is the peer (issue #17: sluice at 1.3x it).
By default (--qemu-nbd auto) scripts/qemu-rbd.sh unpacks one into
~/.cache/sluice/qemu-rbd (Debian's qemu-block-extra and the qemu-utils of the
same version: the machine's own qemu-nbd is a newer build that cannot load
that module); when that fails the run goes on without it.  qemu-nbd serves
the image with the legacy `rbd:POOL/IMAGE:conf=...` name, its default cache
mode (writeback: librbd's cache on, as sluice has it) and the same
rbd_cache_writethrough_until_flush=false.

The sides' order changes every round (a balanced Latin square: over one cycle
every side runs once in every position and right after every other side; a
cycle is 2 rounds for rbd bench and sluice, 6 with one more side, 4 with two
more), and each side starts once the cluster's daemons are nearly idle.
"""

import argparse
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import plot  # bench/plot.py: --plot

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
HERE = os.path.dirname(os.path.abspath(__file__))
CLUSTER = os.path.join(HERE, "..", "scripts", "ceph-cluster.sh")

# name, rbd bench io-type, pattern, io-size, depth, fio rw
ROWS = [
    ("seq-write", "write", "seq", 4 * MiB, 16, "write"),
    ("seq-read", "read", "seq", 4 * MiB, 16, "read"),
    ("randread-qd1", "read", "rand", 4 * KiB, 1, "randread"),
    ("randread-qd32", "read", "rand", 4 * KiB, 32, "randread"),
    ("randwrite-qd1", "write", "rand", 4 * KiB, 1, "randwrite"),
    ("randwrite-qd32", "write", "rand", 4 * KiB, 32, "randwrite"),
]


def proc_cpu(pid):
    """CPU seconds (user + system, all threads) a live process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class CpuMeter:
    """CPU seconds of the cluster's daemons and of the waited-for children."""

    def __init__(self, cluster_dir):
        self.pids = []
        if cluster_dir:
            with open(os.path.join(cluster_dir, "pids")) as f:
                self.pids = [int(line.split()[0]) for line in f if line.strip()]

    def cluster(self):
        return sum(proc_cpu(p) for p in self.pids)


def run(argv, timeout=600, env=None):
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=timeout, env=env)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return p.stdout


def rbd_bench(conf, spec, io_type, pattern, size, depth, total):
    """librbd's figure, in requests per second."""
    out = run(["rbd", "-c", conf, "bench", "--io-type", io_type, "--io-pattern", pattern,
               "--io-size", str(size), "--io-threads", str(depth),
               "--io-total", str(total), spec])
    m = re.search(r"elapsed:\s*([\d.]+)\s+ops:\s*(\d+)\s+ops/sec:\s*([\d.]+)", out)
    if not m:
        raise SystemExit(f"cannot parse rbd bench output:\n{out[-1000:]}")
    return float(m.group(3))


def fio(uri, rw, size, depth, total, image_size):
    """sluice's figure through NBD, in requests per second."""
    import json
    out = run(["fio", "--name=rbd", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
               f"--bs={size}", f"--iodepth={depth}", f"--size={image_size}",
               f"--io_size={total}", "--output-format=json", "--randrepeat=0"])
    out = out[out.index("{"):]
    job = json.loads(out)["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return side["iops"]


class Server:
    """An NBD server process serving the image on a Unix socket, stopped with SIGTERM (the
    image is closed, which flushes and releases its exclusive lock)."""

    def __init__(self, argv, workdir, name, env=None):
        self.sock = os.path.join(workdir, f"{name}.sock")
        self.log = open(os.path.join(workdir, f"{name}.log"), "w")
        argv = [a.replace("@SOCK@", self.sock) for a in argv]
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=self.log, start_new_session=True, env=env)
        self.uri = f"nbd+unix:///?socket={self.sock}"
        deadline = time.time() + 60
        while not os.path.exists(self.sock):
            if self.p.poll() is not None or time.time() > deadline:
                raise SystemExit(f"{name} did not start: see {self.log.name}")
            time.sleep(0.05)

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        self.p.wait(timeout=60)


def sluice_argv(binary, conf, spec, threads):
    return [binary, "serve", "-f", "-t", str(threads), "-U", "@SOCK@", "rbd", spec,
            f"conf={conf}", "ceph.rbd_cache_writethrough_until_flush=false"]


def qemu_nbd_argv(binary, conf, spec):
    # -t: persistent (qemu-nbd otherwise exits when its first client leaves).
    return [binary, "-t", "-f", "raw", "-k", "@SOCK@",
            f"rbd:{spec}:conf={conf}:rbd_cache_writethrough_until_flush=false"]


def find_qemu_nbd(choice):
    """The qemu-nbd to run (a path), or None: --qemu-nbd none, or auto and it cannot be had."""
    if choice == "none":
        return None
    if choice != "auto":
        return choice
    cache = os.path.join(os.path.expanduser("~"), ".cache", "sluice", "qemu-rbd")
    p = subprocess.run(["bash", os.path.join(HERE, "..", "scripts", "qemu-rbd.sh"), cache],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if p.returncode != 0:
        print(f"no qemu-nbd with the rbd driver (scripts/qemu-rbd.sh: {p.stderr.strip()}); "
              "going on without it", file=sys.stderr)
        return None
    return p.stdout.strip()


def balanced_orders(n):
    """A balanced Latin square of n sides (Williams' design): each order is a round's;
    over the whole list every side takes every position once and follows every other side
    once (for odd n the list is doubled with its rows reversed)."""
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    orders = [[(x + r) % n for x in first] for r in range(n)]
    if n % 2:
        orders += [list(reversed(o)) for o in orders]
    return orders


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sluice", required=True, help="sluice binary")
    ap.add_argument("--sluice-base", metavar="PATH",
                    help="a second sluice binary (e.g. a build of main), run on every row "
                         "in the same rounds as --sluice, reported beside it")
    ap.add_argument("--qemu-nbd", default="auto", metavar="auto|none|PATH",
                    help="the peer: a qemu-nbd with the rbd driver (default auto: unpacked by "
                         "scripts/qemu-rbd.sh, skipped when that fails)")
    ap.add_argument("--conf", help="ceph.conf of an existing cluster (default: start one)")
    ap.add_argument("--pool", default="rbd")
    ap.add_argument("--size", default="512M", help="image size (default 512M)")
    ap.add_argument("--rand-total", default="64M",
                    help="bytes per random row at QD32 (QD1 does a quarter)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--only", help="comma-separated rows")
    ap.add_argument("--plot", metavar="FILE.png",
                    help="also draw the ratio table as a bar chart (bench/plot.py, matplotlib)")
    ap.add_argument("--threads", type=int, default=16,
                    help="sluice serve -t: worker threads per connection (default 16)")
    args = ap.parse_args()

    def parse_size(s):
        mult = {"K": KiB, "M": MiB, "G": GiB}.get(s[-1].upper(), 1)
        return int(s[:-1] if s[-1].isalpha() else s) * mult

    size = parse_size(args.size)
    rand_total = parse_size(args.rand_total)
    rows = [r for r in ROWS if not args.only or r[0] in args.only.split(",")]
    qemu_nbd = find_qemu_nbd(args.qemu_nbd)
    workdir = tempfile.mkdtemp(prefix="rbd-bench-")
    cluster_dir = None
    try:
        conf = args.conf
        if conf is None:
            cluster_dir = os.path.join(workdir, "cluster")
            env = dict(os.environ, CEPH_MEMSTORE_BYTES=str(max(2 * GiB, 3 * size)))
            conf = run(["bash", CLUSTER, "up", cluster_dir], env=env).strip()
        image = f"bench-{os.getpid()}"
        spec = f"{args.pool}/{image}"
        run(["rbd", "-c", conf, "create", "--size", f"{size // MiB}M", spec])
        # Fill the image once, so that reads read data rather than holes.
        rbd_bench(conf, spec, "write", "seq", 4 * MiB, 16, size)
        # The NBD servers, each driven by fio: (name, argv).
        servers = [("sluice", sluice_argv(args.sluice, conf, spec, args.threads))]
        if args.sluice_base:
            servers.append(("base", sluice_argv(args.sluice_base, conf, spec, args.threads)))
        if qemu_nbd:
            servers.append(("qemu-nbd", qemu_nbd_argv(qemu_nbd, conf, spec)))
        names = ["rbd bench"] + [n for n, _ in servers]
        # Per row and side: requests per second, one per round.
        results = {r[0]: {n: [] for n in names} for r in rows}
        # Per row and (side, part): CPU µs per request, one per round.
        cpu = {r[0]: {} for r in rows}
        meter = CpuMeter(cluster_dir)

        def note(row, side, part, seconds, ops):
            cpu[row].setdefault((side, part), []).append(seconds / ops * 1e6)

        def settle():
            """Waits (up to 5 s) until the cluster's daemons are nearly idle: the OSD goes on
            working for a while after a write-heavy side ends, and that tail would otherwise
            be charged to whichever side runs next."""
            if not meter.pids:
                time.sleep(0.5)
                return
            deadline = time.monotonic() + 5
            last = meter.cluster()
            while time.monotonic() < deadline:
                time.sleep(0.2)
                now = meter.cluster()
                if now - last < 0.2 * 0.1:  # under a tenth of a core over 0.2 s
                    return
                last = now

        def measure_rbd(name, io_type, pattern, bsize, depth, total, ops):
            c0, k0 = children_cpu(), meter.cluster()
            ours = rbd_bench(conf, spec, io_type, pattern, bsize, depth, total)
            c1, k1 = children_cpu(), meter.cluster()
            results[name]["rbd bench"].append(ours)
            note(name, "rbd bench", "client", c1 - c0, ops)
            if meter.pids:
                note(name, "rbd bench", "cluster", k1 - k0, ops)
            return f"rbd bench {ours:.0f}/s"

        def measure_server(side, argv, name, rw, bsize, depth, total, ops):
            c1 = children_cpu()
            srv = Server(argv, workdir, side.replace(" ", "-"))
            try:
                s0, k2 = proc_cpu(srv.p.pid), meter.cluster()
                theirs = fio(srv.uri, rw, bsize, depth, total, size)
                s1, c2, k3 = proc_cpu(srv.p.pid), children_cpu(), meter.cluster()
            finally:
                srv.stop()
            results[name][side].append(theirs)
            note(name, side, "client", c2 - c1, ops)
            note(name, side, "server", s1 - s0, ops)
            if meter.pids:
                note(name, side, "cluster", k3 - k2, ops)
            return f"{side} {theirs:.0f}/s"

        # Within a row the sides run one after the other, in an order that changes each
        # round: with a fixed order, the side that came right after `rbd bench` was measured
        # 10-40% lower on the write rows than the same binary in the next position.
        orders = balanced_orders(len(names))
        for rnd in range(args.rounds):
            for name, io_type, pattern, bsize, depth, rw in rows:
                total = size if pattern == "seq" else rand_total // (4 if depth == 1 else 1)
                ops = total // bsize
                said = []
                for j in orders[rnd % len(orders)]:
                    settle()
                    if j == 0:
                        said.append(measure_rbd(name, io_type, pattern, bsize, depth,
                                                total, ops))
                    else:
                        side, argv = servers[j - 1]
                        said.append(measure_server(side, argv, name, rw, bsize, depth,
                                                   total, ops))
                print(f"round {rnd + 1} {name}: " + ", ".join(said), file=sys.stderr)
        others = names[1:]
        peer = "qemu-nbd" if qemu_nbd else None
        head = "| row | metric | rbd bench |" + "".join(f" {n} | {n}/rbd |" for n in others)
        head += " sluice/qemu-nbd |" if peer else ""
        lines = ["# sluice rbd bench: NBD servers of an RBD image (fio) vs rbd bench on it", "",
                 head, "|---|---|---:|" + "---:|---:|" * len(others) + ("---:|" if peer else "")]
        for name, io_type, pattern, bsize, depth, rw in rows:
            med = {n: statistics.median(results[name][n]) for n in names}
            unit = "MiB/s" if bsize >= MiB else "IOPS"
            scale = bsize / MiB if bsize >= MiB else 1
            a = med["rbd bench"]
            line = f"| {name} | {unit} | {a * scale:.0f} |"
            for n in others:
                line += f" {med[n] * scale:.0f} | {med[n] / a:.2f} |"
            if peer:
                line += f" {med['sluice'] / med[peer]:.2f} |"
            lines.append(line)
        md = "\n".join(lines) + "\n"
        print("\n" + md)
        lines = ["CPU µs per request (medians): the cluster's daemons while the side ran, its "
                 "client (rbd bench, or fio) and its NBD server; load = CPU seconds per second "
                 f"of wall time, out of {os.cpu_count()} cores; CPU ratio = rbd bench's CPU per "
                 "request / the side's; bound = that ratio with the server charged only what "
                 "librbd costs rbd bench (the most any server could reach on a CPU-bound row).",
                 "", "| row | side | cluster | client | server | load | CPU ratio | bound |",
                 "|---|---|---:|---:|---:|---:|---:|---:|"]
        for name, io_type, pattern, bsize, depth, rw in rows:
            m = {k: statistics.median(v) for k, v in cpu[name].items()}
            rbd_client = m[("rbd bench", "client")]
            side_a = m.get(("rbd bench", "cluster"), 0.0) + rbd_client
            for n in names:
                k = m.get((n, "cluster"), 0.0)
                client = m[(n, "client")]
                srv = m.get((n, "server"))
                total = k + client + (srv or 0.0)
                load = total * statistics.median(results[name][n]) / 1e6
                if srv is None:
                    lines.append(f"| {name} | {n} | {k:.0f} | {client:.0f} | - | {load:.2f} "
                                 "| 1.00 | 1.00 |")
                    continue
                best = k + client + min(srv, rbd_client)
                lines.append(f"| {name} | {n} | {k:.0f} | {client:.0f} | {srv:.0f} "
                             f"| {load:.2f} | {side_a / total:.2f} | {side_a / best:.2f} |")
        print("\n".join(lines) + "\n")
        if args.plot:
            plot.save(md, args.plot)
        run(["rbd", "-c", conf, "rm", "--no-progress", spec])
    finally:
        if cluster_dir:
            subprocess.run(["bash", CLUSTER, "down", cluster_dir])
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
