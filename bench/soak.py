#!/usr/bin/python3
"""Soak test: many clients of every kind against four sluice servers at once.

Servers: `sluice serve memory`, `sluice serve file`, `sluice serve image` (qcow2) and
`sluice daemon` (a qcow2 chain exported over NBD, with a QMP monitor). Clients, spread over
the servers, each in a loop until the time is up:

  fio       fio's nbd engine, random 4k writes then a crc32c verify of its own region
  nbdcopy   a random file copied in and back out, compared (one per server: it owns 0..2M)
  churn     libnbd connect, read 512 bytes, close
  vanish    raw NBD: negotiate, send a write request with half its payload (or a read
            request), then close the socket without waiting
  jobs      (daemon) per round a fresh QMP monitor: blockdev-add a copied chain, block-stream
            or block-commit (active, then job-complete), half the streams cancelled,
            blockdev-del; the monitor closes
  monitors  (daemon) a QMP monitor connects, negotiates, queries, and hangs up

It reports per kind the rounds run and failed, fio verify failures, and each server's RSS,
open fds and threads when idle before the clients start, at the start (after a warm-up) and
at the end (after the clients stop and a settle; fds and threads new since idle are
listed), and exits
non-zero on any error, verify failure, or a server that died or panicked.

Run with Debian's python3 (libnbd's Python module lives there):
  /usr/bin/python3 bench/soak.py --minutes 10
  /usr/bin/python3 bench/soak.py --seconds 30 --clients 12   (the CI version, tests/soak.rs)
Standard library and python3-libnbd only; QMP is spoken as raw JSON lines.
"""

import argparse
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import nbd

MiB = 1 << 20
SIZE = 256 * MiB
REGION = 8 * MiB  # each fio client owns one region; nbdcopy owns region 0
POOL_IDLE_S = 10  # how long an idle connection thread waits for the next (IDLE_TIMEOUT)


def wait_for_socket(path, proc, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{path}: no server")


def proc_stats(pid):
    with open(f"/proc/{pid}/status") as f:
        st = dict(line.split(":", 1) for line in f if ":" in line)
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    names = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return {
        "thread_names": sorted(names),
        "rss_kib": int(st["VmRSS"].split()[0]),
        "threads": int(st["Threads"]),
        "fds": len(targets),
        "fd_targets": sorted(targets),
    }


# --- QMP as raw JSON lines -------------------------------------------------------------------

class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(60)
        self.s.connect(path)
        self.f = self.s.makefile("rb")
        self.events = []
        json.loads(self.f.readline())  # greeting

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.s.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            line = self.f.readline()
            if not line:
                raise RuntimeError(f"monitor closed during {name}")
            v = json.loads(line)
            if "event" in v:
                self.events.append(v)
                continue
            if "error" in v:
                raise RuntimeError(f"{name}: {v['error']['desc']}")
            return v["return"]

    def wait_event(self, names, job):
        while True:
            for i, e in enumerate(self.events):
                if e["event"] in names and e.get("data", {}).get("device") == job:
                    return self.events.pop(i)
            line = self.f.readline()
            if not line:
                raise RuntimeError("monitor closed while waiting for an event")
            v = json.loads(line)
            if "event" in v:
                self.events.append(v)

    def close(self):
        self.s.close()


# --- raw NBD for clients that vanish ---------------------------------------------------------

NBD_OPT_GO = 7
NBD_REP_ACK = 1
REPLY_MAGIC = 0x3e889045565A9


def raw_negotiate(path, export):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(path)
    greet = b""
    while len(greet) < 18:
        b = s.recv(18 - len(greet))
        if not b:
            raise RuntimeError("closed during greeting")
        greet += b
    s.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
    name = export.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(b"IHAVEOPT" + struct.pack(">II", NBD_OPT_GO, len(data)) + data)
    buf = b""
    while True:
        while len(buf) < 20:
            b = s.recv(4096)
            if not b:
                raise RuntimeError("closed during GO")
            buf += b
        _magic, _opt, kind, length = struct.unpack(">QIII", buf[:20])
        while len(buf) < 20 + length:
            b = s.recv(4096)
            if not b:
                raise RuntimeError("closed during GO")
            buf += b
        buf = buf[20 + length:]
        if kind == NBD_REP_ACK:
            return s
        if kind & 0x80000000:
            raise RuntimeError(f"GO refused: {kind:#x}")


# --- the soak --------------------------------------------------------------------------------

class Soak:
    def __init__(self, args):
        self.args = args
        self.dir = tempfile.mkdtemp(prefix="sluice-soak-")
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counts = {}
        self.errors = []
        self.verify_failures = 0
        self.procs = {}
        self.targets = {}  # name -> (socket path, export name)

    def p(self, name):
        return os.path.join(self.dir, name)

    def count(self, kind, ok, what=""):
        with self.lock:
            c = self.counts.setdefault(kind, [0, 0])
            c[0] += 1
            if not ok:
                c[1] += 1
                if len(self.errors) < 50:
                    self.errors.append(f"{kind}: {what}")

    # servers

    def start_servers(self):
        b = self.args.sluice
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", self.p("file.img"),
                        str(SIZE)], check=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", self.p("image.qcow2"),
                        str(SIZE)], check=True)
        for name, argv in (("memory", ["memory", str(SIZE)]),
                           ("file", ["file", self.p("file.img")]),
                           ("image", ["image", self.p("image.qcow2")])):
            sock = self.p(f"{name}.sock")
            log = open(self.p(f"{name}.log"), "w")
            proc = subprocess.Popen([b, "serve", "-f", "-U", sock, *argv],
                                    stdout=log, stderr=log)
            self.procs[name] = proc
            wait_for_socket(sock, proc)
            self.targets[name] = (sock, "")
        # The daemon: a two-layer chain exported as "e", plus job templates.
        self.make_chain("tmpl")
        shutil.copy(self.p("tmpl-base.qcow2"), self.p("d-base.qcow2"))
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", self.p("d-base.qcow2"),
                        "-F", "qcow2", self.p("d-top.qcow2"), str(SIZE)], check=True)
        qmp, nbd_sock = self.p("qmp.sock"), self.p("daemon.sock")
        log = open(self.p("daemon.log"), "w")
        proc = subprocess.Popen([
            b, "daemon", "--qmp", qmp,
            "--blockdev", f"driver=qcow2,node-name=top,file.driver=file,"
                          f"file.filename={self.p('d-top.qcow2')}",
            "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
            "--export", "nbd,id=e,node-name=top,name=e,writable=on",
        ], stdout=log, stderr=log)
        self.procs["daemon"] = proc
        wait_for_socket(nbd_sock, proc)
        wait_for_socket(qmp, proc)
        self.targets["daemon"] = (nbd_sock, "e")
        self.qmp_path = qmp

    def make_chain(self, prefix):
        base, top = self.p(f"{prefix}-base.qcow2"), self.p(f"{prefix}-top.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "16M"], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 4M", base],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2",
                        top], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1M 2M", top],
                       check=True, stdout=subprocess.DEVNULL)

    def uri(self, target):
        sock, export = self.targets[target]
        return f"nbd+unix:///{export}?socket={sock}"

    # clients

    def fio(self, target, region):
        offset = region * REGION
        while not self.stop.is_set():
            r = subprocess.run(
                ["fio", "--name=soak", "--ioengine=nbd", f"--uri={self.uri(target)}",
                 "--rw=randwrite", "--bs=4k", "--iodepth=8", f"--offset={offset}",
                 f"--size={REGION}", "--verify=crc32c", "--do_verify=1",
                 "--verify_fatal=1", "--verify_state_save=0", f"--randseed={random.randrange(1 << 30)}",
                 "--output-format=json"],
                capture_output=True, text=True)
            ok = r.returncode == 0
            if not ok and "verify" in (r.stdout + r.stderr).lower():
                with self.lock:
                    self.verify_failures += 1
            self.count("fio", ok, f"{target}: {r.stderr.strip()[-300:]}")

    def nbdcopy(self, target):
        src, back = self.p(f"copy-{target}.src"), self.p(f"copy-{target}.back")
        while not self.stop.is_set():
            data = os.urandom(2 * MiB)
            with open(src, "wb") as f:
                f.write(data)
            r1 = subprocess.run(["nbdcopy", "--allocated", src, self.uri(target)],
                                capture_output=True, text=True)
            # Read back only the region written (nbdcopy copies whole sources).
            ok = r1.returncode == 0
            if ok:
                h = nbd.NBD()
                try:
                    h.connect_uri(self.uri(target))
                    got = h.pread(2 * MiB, 0)
                    h.shutdown()
                    ok = got == data
                    if not ok:
                        with self.lock:
                            self.verify_failures += 1
                except nbd.Error as e:
                    ok = False
                    r1 = e
            self.count("nbdcopy", ok, f"{target}: {getattr(r1, 'stderr', r1)}")
        for p in (src, back):
            if os.path.exists(p):
                os.unlink(p)

    def churn(self, target):
        while not self.stop.is_set():
            try:
                h = nbd.NBD()
                h.connect_uri(self.uri(target))
                h.pread(512, random.randrange(0, SIZE // 512) * 512)
                h.shutdown()
                self.count("churn", True)
            except nbd.Error as e:
                self.count("churn", False, f"{target}: {e}")

    def vanish(self, target):
        sock, export = self.targets[target]
        while not self.stop.is_set():
            try:
                s = raw_negotiate(sock, export)
                # The last 32 MiB, which no fio client owns.
                off = random.randrange(SIZE - 32 * MiB, SIZE - 65536) // 512 * 512
                if random.random() < 0.5:
                    # A write of 64k with half its payload, then gone.
                    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 7, off, 65536))
                    s.sendall(b"\0" * 32768)
                else:
                    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 8, off, 65536))
                s.close()
                self.count("vanish", True)
            except (OSError, RuntimeError) as e:
                self.count("vanish", False, f"{target}: {e}")

    def jobs(self):
        n = 0
        while not self.stop.is_set():
            n += 1
            prefix = f"j{n}"
            for part in ("base", "top"):
                shutil.copy(self.p(f"tmpl-{part}.qcow2"), self.p(f"{prefix}-{part}.qcow2"))
            # The copied top names the template's base; point it at the copy.
            subprocess.run(["qemu-img", "rebase", "-u", "-F", "qcow2",
                            "-b", self.p(f"{prefix}-base.qcow2"),
                            self.p(f"{prefix}-top.qcow2")], check=True)
            kind = ("stream", "stream-cancel", "commit")[n % 3]
            try:
                q = Qmp(self.qmp_path)
                q.cmd("qmp_capabilities")
                q.cmd("blockdev-add", driver="qcow2", **{"node-name": prefix},
                      file={"driver": "file", "filename": self.p(f"{prefix}-top.qcow2")})
                if kind.startswith("stream"):
                    # A throttled stream is still running when the cancel comes.
                    speed = {"speed": 1 << 16} if kind == "stream-cancel" else {}
                    q.cmd("block-stream", **{"job-id": prefix}, device=prefix, **speed)
                    if kind == "stream-cancel":
                        q.cmd("block-job-cancel", device=prefix)
                    q.wait_event(("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"), prefix)
                else:
                    q.cmd("block-commit", **{"job-id": prefix}, device=prefix)
                    q.wait_event(("BLOCK_JOB_READY",), prefix)
                    q.cmd("job-complete", id=prefix)
                    q.wait_event(("BLOCK_JOB_COMPLETED",), prefix)
                q.cmd("blockdev-del", **{"node-name": prefix})
                q.close()
                self.count("jobs", True)
            except (OSError, RuntimeError, ValueError) as e:
                self.count("jobs", False, f"{kind}: {e}")
            for part in ("base", "top"):
                try:
                    os.unlink(self.p(f"{prefix}-{part}.qcow2"))
                except OSError:
                    pass

    def monitors(self):
        while not self.stop.is_set():
            try:
                q = Qmp(self.qmp_path)
                if random.random() < 0.5:
                    q.cmd("qmp_capabilities")
                    q.cmd("query-block-jobs")
                    q.cmd("query-named-block-nodes")
                q.close()
                self.count("monitors", True)
            except (OSError, RuntimeError, ValueError) as e:
                self.count("monitors", False, str(e))
            time.sleep(0.05)

    # the run

    def stats(self):
        return {name: proc_stats(p.pid) for name, p in self.procs.items()
                if p.poll() is None}

    def run(self):
        self.start_servers()
        idle = self.stats()
        names = list(self.targets)
        threads = []

        def spawn(fn, *a):
            t = threading.Thread(target=fn, args=a, daemon=True)
            t.start()
            threads.append(t)

        for t in names:
            spawn(self.nbdcopy, t)
        spawn(self.jobs)
        spawn(self.monitors)
        kinds = ("fio", "churn", "vanish")
        regions = {t: 1 for t in names}  # region 0: nbdcopy; the last 32 MiB: vanish
        for i in range(max(0, self.args.clients - len(names) - 2)):
            target = names[i % len(names)]
            kind = kinds[i % len(kinds)]
            if kind == "fio":
                if (regions[target] + 1) * REGION > SIZE - 32 * MiB:
                    spawn(self.churn, target)
                    continue
                spawn(self.fio, target, regions[target])
                regions[target] += 1
            elif kind == "churn":
                spawn(self.churn, target)
            else:
                spawn(self.vanish, target)
        warm = min(10.0, self.args.seconds / 5)
        time.sleep(warm)
        start = self.stats()
        # RSS ten times over the run: a leak climbs to the end, a working set levels off.
        series = {name: [st["rss_kib"]] for name, st in start.items()}
        end_at = time.time() + max(0.0, self.args.seconds - warm)
        for k in range(1, 11):
            time.sleep(max(0.0, end_at - time.time()) / (11 - k))
            for name, st in self.stats().items():
                series.setdefault(name, []).append(st["rss_kib"])
        self.stop.set()
        for t in threads:
            t.join(120)
        # Let connection and job threads end; the connection thread pool keeps idle
        # threads for POOL_IDLE_S (crates/server/src/nbd/pool.rs), so wait that out too.
        time.sleep(POOL_IDLE_S + 2)
        end = self.stats()
        dead = [n for n, p in self.procs.items() if p.poll() is not None]
        return {"clients": len(threads), "seconds": self.args.seconds,
                "counts": self.counts, "errors": self.errors,
                "verify_failures": self.verify_failures, "dead_servers": dead,
                "idle": idle, "start": start, "end": end, "rss_series": series}

    def cleanup(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        panics = [n for n in self.procs
                  if "panicked" in open(self.p(f"{n}.log")).read()]
        if not self.args.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
        return panics


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, help="how long (default 10)")
    ap.add_argument("--seconds", type=float, help="how long, in seconds")
    ap.add_argument("--clients", type=int, default=64, help="concurrent clients (64)")
    ap.add_argument("--sluice", default="target/release/sluice", help="sluice binary")
    ap.add_argument("--json", help="also write the report here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    if args.seconds is None:
        args.seconds = 60 * (args.minutes if args.minutes is not None else 10)
    args.sluice = os.path.abspath(args.sluice)
    soak = Soak(args)
    try:
        report = soak.run()
    finally:
        report_panics = soak.cleanup()
    report["panicked"] = report_panics
    report["loadavg"] = open("/proc/loadavg").read().split()[:3]
    print(f"soak: {report['clients']} clients, {args.seconds:.0f} s, "
          f"load average {' '.join(report['loadavg'])}")
    for kind, (runs, failed) in sorted(report["counts"].items()):
        print(f"  {kind:9} {runs:7} rounds {failed:5} failed")
    print(f"  verify failures: {report['verify_failures']}")
    print("  server  RSS MiB idle/start/end, fds idle/start/end, threads idle/start/end")
    for name in report["start"]:
        i = report["idle"][name]
        s, e = report["start"][name], report["end"].get(name, {})
        print(f"  {name:7} {i['rss_kib'] // 1024}/{s['rss_kib'] // 1024}/"
              f"{e.get('rss_kib', 0) // 1024}, {i['fds']}/{s['fds']}/{e.get('fds')}, "
              f"{i['threads']}/{s['threads']}/{e.get('threads')}")
        rss = report["rss_series"].get(name, [])
        print(f"          RSS MiB over the run: {' '.join(str(k // 1024) for k in rss)}")
        s = i
        for key in ("fd_targets", "thread_names"):
            grown = list(e.get(key, []))
            for t in s[key]:
                if t in grown:
                    grown.remove(t)
            if grown:
                print(f"          {key} new since idle: {grown[:10]}")
    for e in report["errors"][:20]:
        print(f"  error: {e}")
    if report["dead_servers"] or report["panicked"]:
        print(f"  dead: {report['dead_servers']}, panicked: {report['panicked']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    failed = sum(c[1] for c in report["counts"].values())
    bad = failed or report["verify_failures"] or report["dead_servers"] or report["panicked"]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
