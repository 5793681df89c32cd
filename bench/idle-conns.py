#!/usr/bin/python3
"""Memory of many idle NBD connections: opens N negotiated, idle clients to a server and
reports its RSS, threads and fds before and with them, and per connection.

Each client negotiates (NBD_OPT_GO) and then sends nothing, as an idle qemu would. Servers:
`sluice serve memory` and, for comparison, `nbdkit memory` (both a thread per connection).

  /usr/bin/python3 bench/idle-conns.py --connections 10000
The server needs a file descriptor for each (sluice's reader, writer and shutdown handle share
the one socket) and one thread each: mind `kernel.pid_max` on a shared machine (10,000 idle
connections to sluice and nbdkit at once exhaust a 32,768 pid_max together with a build). The script raises the fd limit for
both ends where it may (root, outside a container that caps it).
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from soak import proc_stats, raw_negotiate, wait_for_socket  # noqa: E402


def measure(name, argv, sock, n):
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_socket(sock, proc)
        time.sleep(0.5)
        before = proc_stats(proc.pid)
        socks = []
        t0 = time.time()
        for i in range(n):
            try:
                socks.append(raw_negotiate(sock, ""))
            except (OSError, RuntimeError) as e:
                raise RuntimeError(f"{name}: connection {i + 1} failed: {e}") from e
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited after {i} connections")
        took = time.time() - t0
        time.sleep(2)
        after = proc_stats(proc.pid)
        alive = proc.poll() is None
        for s in socks:
            s.close()
        per = (after["rss_kib"] - before["rss_kib"]) / n
        print(f"{name}: {n} idle connections in {took:.1f} s; RSS {before['rss_kib'] // 1024} "
              f"-> {after['rss_kib'] // 1024} MiB ({per:.1f} KiB per connection), threads "
              f"{before['threads']} -> {after['threads']}, fds {before['fds']} -> "
              f"{after['fds']}, alive {alive}")
    finally:
        proc.terminate()
        proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=10000)
    ap.add_argument("--sluice", default="target/release/sluice")
    ap.add_argument("--servers", default="sluice,nbdkit")
    args = ap.parse_args()
    # Room for both ends (the server inherits the limit); only root may raise the hard one.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        want = max(hard, 4 * args.connections + 1024)
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        print(f"file descriptor limit {hard} (cannot raise it here)")
    d = tempfile.mkdtemp(prefix="idle-conns-")
    for server in args.servers.split(","):
        sock = os.path.join(d, f"{server}.sock")
        argv = {"sluice": [os.path.abspath(args.sluice), "serve", "-f", "-U", sock],
                "nbdkit": ["nbdkit", "-f", "-U", sock]}[server] + ["memory", "1G"]
        measure(server, argv, sock, args.connections)
    print(f"load average: {' '.join(open('/proc/loadavg').read().split()[:3])}")


if __name__ == "__main__":
    main()
