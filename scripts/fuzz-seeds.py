#!/usr/bin/env python3
"""Makes the seed corpora of sluice's fuzz targets (crates/*/fuzz/seeds/TARGET/).

The seeds are real where a peer can make them: NBD handshakes and requests are the bytes
nbdinfo, qemu-img, qemu-io and nbdcopy send to nbdkit (captured by a relay on a Unix socket),
replies are what nbdkit sends back, qcow2 images are made by qemu-img and qemu-io, LUKS
headers by qemu-img, tar archives by GNU tar, xz files by xz. Where no peer speaks the input
(QMP lines, keyval, size strings, plugin and filter words) the seeds are written here from the
documented syntax. The output is committed; rerun this script after a target or a peer
changes. Needs nbdkit, nbdinfo, nbdcopy, qemu-img, qemu-io, GNU tar and xz on PATH.

Usage: scripts/fuzz-seeds.py
"""

import hashlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def seed_dir(crate, target):
    d = os.path.join(ROOT, "crates", crate, "fuzz", "seeds", target)
    os.makedirs(d, exist_ok=True)
    return d


def put(crate, target, data, name=None):
    if isinstance(data, str):
        data = data.encode()
    name = name or hashlib.sha1(data).hexdigest()[:16]
    with open(os.path.join(seed_dir(crate, target), name), "wb") as f:
        f.write(data)


def clear(crate, target):
    d = os.path.join(ROOT, "crates", crate, "fuzz", "seeds", target)
    shutil.rmtree(d, ignore_errors=True)


# --- NBD: capture real client and server bytes through a relay ------------------------------

def relay_once(listen_path, server_path, log):
    """Accepts one client on listen_path, relays to server_path, records both directions."""
    ls = socket.socket(socket.AF_UNIX)
    ls.bind(listen_path)
    ls.listen(1)

    def run():
        c, _ = ls.accept()
        s = socket.socket(socket.AF_UNIX)
        s.connect(server_path)

        def pump(src, dst, key):
            while True:
                try:
                    b = src.recv(65536)
                except OSError:
                    b = b""
                if not b:
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                log[key] += b
                try:
                    dst.sendall(b)
                except OSError:
                    return

        t = threading.Thread(target=pump, args=(s, c, "server"))
        t.start()
        pump(c, s, "client")
        t.join()
        c.close()
        s.close()
        ls.close()

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def handshake_end(client):
    """Offset in the client's bytes just after its last option (GO or EXPORT_NAME)."""
    i = 4  # client flags
    while i + 16 <= len(client) and client[i:i + 8] == b"IHAVEOPT":
        opt, length = struct.unpack(">II", client[i + 8:i + 16])
        i += 16 + length
        if opt in (1, 7):  # EXPORT_NAME, GO
            return i
    return i


def capture_nbd(tmp):
    server_sock = os.path.join(tmp, "nbdkit.sock")
    data = os.path.join(tmp, "disk.img")
    with open(data, "wb") as f:
        f.truncate(1 << 20)
    nbdkit = subprocess.Popen(["nbdkit", "-f", "-U", server_sock, "file", data])
    for _ in range(100):
        if os.path.exists(server_sock):
            break
        time.sleep(0.05)
    relay = os.path.join(tmp, "relay.sock")
    uri = "nbd+unix:///?socket=" + relay
    clients = [
        ["nbdinfo", uri],
        ["nbdinfo", "--list", uri],
        ["nbdinfo", "--map", uri],
        ["qemu-img", "info", "-f", "raw", uri],
        ["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4k", "-c", "read 0 4k",
         "-c", "write -z 64k 64k", "-c", "discard 128k 4k", "-c", "flush", uri],
        ["nbdcopy", "--connections=1", "--", "[", "nbdkit", "pattern", "64k", "]", uri],
        ["nbdcopy", "--connections=1", uri, os.path.join(tmp, "out.img")],
    ]
    captured = []
    try:
        for argv in clients:
            if os.path.exists(relay):
                os.unlink(relay)
            log = {"client": b"", "server": b""}
            th = relay_once(relay, server_sock, log)
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, timeout=30)
            th.join(10)
            captured.append((argv[0], log["client"], log["server"]))
    finally:
        nbdkit.terminate()
        nbdkit.wait()
    return captured


def nbd_seeds(tmp):
    for t in ("handshake", "request", "reply"):
        clear("proto", t)
    for name, client, server in capture_nbd(tmp):
        end = handshake_end(client)
        # The handshake target's first byte picks the split and the TLS mode (top bits 0: off).
        put("proto", "handshake", b"\x01" + client)
        put("proto", "handshake", b"\x2a" + client[:end])
        # TLS required: the options before STARTTLS are refused.
        put("proto", "handshake", b"\x81" + client[:end])
        requests = client[end:]
        for i in range(0, min(len(requests), 28 * 8), 28):
            put("proto", "request", requests[i:i + 28])
        if requests:
            put("proto", "request", requests[:4096])
        # What nbdkit sent after the handshake: replies in the negotiated form.
        greeting = server.find(b"IHAVEOPT")
        if len(server) > 200:
            put("proto", "reply", server[-min(len(server), 4096):])
        del greeting
    # Extended-header requests (no peer here sends them yet): read, write, block status.
    for kind, flags, length in ((0, 0, 4096), (1, 1, 512), (7, 8, 1 << 20)):
        put("proto", "request",
            struct.pack(">IHHQQQ", 0x21e41c71, flags, kind, 0x1234, 0, length))


# --- QMP, keyval, sizes, plugin and filter words ---------------------------------------------

QMP_LINES = [
    '{"execute": "qmp_capabilities"}',
    '{"execute": "query-version", "id": 1}',
    '{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "f",'
    ' "filename": "/tmp/x.img"}}',
    '{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "q",'
    ' "file": "f", "backing": null}}',
    '{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix",'
    ' "data": {"path": "/tmp/n.sock"}}, "max-connections": 4, "handshake-max-seconds": 5}}',
    '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e",'
    ' "node-name": "q", "writable": true}}',
    '{"execute": "block-stream", "arguments": {"job-id": "j", "device": "q", "speed": 1e6}}',
    '{"execute": "job-cancel", "arguments": {"id": "j"}}',
    '{"exec-oob": "x", "id": ["a", {"b": -1.5e-3}]}',
    '{"execute": "x", "arguments": "\\u00e9\\ud83d\\ude00"}',
    '[1, 2, {"a": [true, false, null]}]',
    '{"execute": "query-block-exports"}\n{"execute": "quit"}',
]

KEYVAL = [
    "driver=file,filename=/tmp/a.img,node-name=f,locking=off",
    "driver=qcow2,node-name=q,file.driver=file,file.filename=x.qcow2,backing=null",
    "nbd,id=e0,node-name=q,writable=on,name=disk",
    "type=unix,path=/tmp/s,,with,,commas",
    "addr.type=inet,addr.host=::1,addr.port=10809,max-connections=2",
    "a.0=x,a.1=y,a.2.b=z",
    "list.0=null,list.2=zwei,list.1=eins",
    "0=1",
    "0.b=1",
    "a..b=1",
    "a.b=1,a=2",
    '{"driver": "file", "filename": "x"}',
]

# Real commands (from qemu-storage-daemon 10.0.2 sessions, paths made neutral) and a few
# more for the commands those sessions do not reach: the qmp_dispatch target's seeds.
DISPATCH = [
    '{"execute": "qmp_capabilities"}',
    '{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "disk-f", "filename": "/tmp/w/disk.qcow2"}}',
    '{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "disk", "file": "disk-f"}}',
    '{"execute": "block-dirty-bitmap-add", "arguments": {"node": "disk", "name": "b0", "persistent": true, "granularity": 65536}}',
    '{"execute": "block-dirty-bitmap-add", "arguments": {"node": "disk", "name": "b0"}}',
    '{"execute": "blockdev-backup", "arguments": {"job-id": "full", "device": "disk", "target": "full", "sync": "full"}}',
    '{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "/tmp/w/nbd.sock"}}}}',
    '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "disk", "name": "disk", "writable": true, "bitmaps": ["b0"]}}',
    '{"execute": "query-named-block-nodes"}',
    '{"execute": "block-export-del", "arguments": {"id": "e0"}}',
    '{"execute": "blockdev-backup", "arguments": {"job-id": "inc", "device": "disk", "target": "inc", "sync": "incremental", "bitmap": "b0"}}',
    '{"execute": "quit"}',
    '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "vm", "node-name": "disk", "name": "vm", "writable": true}}',
    '{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "scratch", "file": "scratch-f", "backing": "disk"}}',
    '{"execute": "transaction", "arguments": {"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "scratch", "name": "backup-vm", "disabled": true}}, {"type": "block-dirty-bitmap-merge", "data": {"node": "scratch", "target": "backup-vm", "bitmaps": [{"node": "disk", "name": "b0"}]}}, {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "b1", "persistent": true}}, {"type": "block-dirty-bitmap-disable", "data": {"node": "disk", "name": "b0"}}, {"type": "blockdev-backup", "data": {"device": "disk", "job-id": "backup-vm", "target": "scratch", "sync": "none"}}]}}',
    '{"execute": "job-cancel", "arguments": {"id": "backup-vm"}}',
    '{"execute": "blockdev-del", "arguments": {"node-name": "scratch"}}',
    '{"execute": "blockdev-mirror", "arguments": {"job-id": "m0", "device": "src", "target": "dst", "sync": "full"}}',
    '{"execute": "job-complete", "arguments": {"id": "m0"}}',
    '{"execute": "query-block-exports"}',
    '{"execute": "blockdev-create", "arguments": {"job-id": "c0", "options": {"driver": "qcow2", "file": "new-f", "size": 33554432}}}',
    '{"execute": "query-jobs"}',
    '{"execute": "job-dismiss", "arguments": {"id": "c0"}}',
    '{"execute": "blockdev-snapshot", "arguments": {"node": "dst", "overlay": "snap"}}',
    '{"execute": "block_resize", "arguments": {"node-name": "snap", "size": 134217728}}',
    '{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "disk", "file": "disk-f", "read-only": true}, {"driver": "file", "node-name": "disk-f", "filename": "/tmp/w/disk.qcow2", "read-only": true}]}}',
    '{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "snap", "file": {"driver": "file", "filename": "/tmp/w/snap.qcow2"}, "backing": null}]}}',
    '{"execute": "blockdev-reopen", "arguments": {"options": []}}',
    '{"execute": "query-version"}',
    '{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}',
    '{"execute": "query-commands"}',
    '{"execute": "query-qmp-schema"}',
    '{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "base-file", "filename": "img/base.qcow2", "read-only": true}}',
    '{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "base", "file": "base-file", "read-only": true}}',
    '{"execute": "query-named-block-nodes", "arguments": {"flat": true}}',
    '{"execute": "block-stream", "arguments": {"job-id": "stream0", "device": "top", "auto-dismiss": false}}',
    '{"execute": "query-block-jobs"}',
    '{"execute": "frobnicate"}',
    '{"execute": "block-stream", "arguments": {"job-id": "x"}}',
    '{"execute": "query-version", "arguments": {"bogus": 1}}',
    '{"execute": "block-stream", "arguments": {"device": 5}}',
    '{"execute": "block-job-set-speed", "arguments": {"device": "nope", "speed": 1}}',
    '{"execute": "block-export-add", "arguments": {"type": "bogus", "id": "x", "node-name": "top"}}',
    '{"execute": 1}',
    '{"execute": "block-stream", "arguments": {"job-id": "big0", "device": "bigtop", "speed": 8388608, "auto-finalize": false, "auto-dismiss": false}}',
    '{"execute": "block-stream", "arguments": {"job-id": "big0b", "device": "bigtop"}}',
    '{"execute": "job-finalize", "arguments": {"id": "big0"}}',
    '{"execute": "job-resume", "arguments": {"id": "big0"}}',
    '{"execute": "job-pause", "arguments": {"id": "big0"}}',
    '{"execute": "block-job-pause", "arguments": {"device": "big0"}}',
    '{"execute": "block-job-resume", "arguments": {"device": "big0"}}',
    '{"execute": "block-job-cancel", "arguments": {"device": "big0"}}',
    '{"execute": "block-stream", "arguments": {"job-id": "big1", "device": "bigtop", "auto-finalize": false, "auto-dismiss": false}}',
    '{"execute": "block-stream", "arguments": {"job-id": "e0", "device": "etop", "on-error": "stop"}}',
    '{"execute": "block-job-cancel", "arguments": {"device": "e0", "force": true}}',
    '{"execute": "block-stream", "arguments": {"job-id": "s1", "device": "c1top", "base-node": "c1base", "backing-file": "c1base.qcow2", "filter-node-name": "cor1"}}',
    '{"execute": "block-stream", "arguments": {"job-id": "s2", "device": "c2top", "bottom": "c2mid"}}',
    '{"execute": "block-stream", "arguments": {"device": "c2top", "base": "x", "base-node": "c2base"}}',
    '{"execute": "block-stream", "arguments": {"device": "c2top", "bottom": "c2base", "base-node": "c2base"}}',
    '{"execute": "block-stream", "arguments": {"device": "c2top", "backing-file": "foo"}}',
    '{"execute": "block-dirty-bitmap-remove", "arguments": {"node": "bm", "name": "b1"}}',
    '{"execute": "block_resize", "arguments": {"device": "nope", "size": 1048576}}',
    '{"execute": "blockdev-snapshot-sync", "arguments": {"device": "nope", "snapshot-file": "x.qcow2"}}',
    '{"execute": "blockdev-snapshot-internal-sync", "arguments": {"device": "nope", "name": "s"}}',
    '{"execute": "change-backing-file", "arguments": {"device": "nope", "image-node-name": "n", "backing-file": "b"}}',
    '{"execute": "block-set-write-threshold", "arguments": {"node-name": "nope", "write-threshold": 1}}',
    '{"execute": "block-commit", "arguments": {"device": "nope"}}',
    '{"execute": "blockdev-mirror", "arguments": {"device": "nope", "target": "t", "sync": "full"}}',
    '{"execute": "blockdev-backup", "arguments": {"device": "nope", "target": "t", "sync": "full"}}',
    '{"execute": "block-job-complete", "arguments": {"device": "nope"}}',
    '{"execute": "object-del", "arguments": {"id": "nope"}}',
    '{"execute": "chardev-remove", "arguments": {"id": "nope"}}',
    '{"execute": "nbd-server-stop"}',
    '{"execute": "query-blockstats", "arguments": {"query-nodes": true}}',
    '{"execute": "query-block"}',
    '{"execute": "object-add", "arguments": {"qom-type": "secret", "id": "s0", "data": "cGFzcw==", "format": "base64"}}',
    '{"execute": "object-add", "arguments": {"qom-type": "tls-creds-psk", "id": "t0", "endpoint": "server", "dir": "/tmp/w"}}',
    '{"execute": "object-add", "arguments": {"qom-type": "authz-list", "id": "a0", "policy": "deny", "rules": [{"match": "CN=*", "policy": "allow", "format": "glob"}]}}',
    '{"execute": "nbd-server-start", "arguments": {"addr": {"type": "inet", "data": {"host": "::1", "port": "10809"}}, "tls-creds": "t0", "tls-authz": "a0"}}',
    '{"execute": "blockdev-add", "arguments": {"driver": "rbd", "node-name": "r", "pool": "rbd", "image": "i", "user": "admin", "key-secret": "s0", "auth-client-required": ["cephx"]}}',
    '{"execute": "block-latency-histogram-set", "arguments": {"id": "e0", "boundaries": [10000, 50000]}}',
    '{"execute": "nbd-server-add", "arguments": {"device": "disk", "writable": true}}',
    '{"execute": "block-dirty-bitmap-merge", "arguments": {"node": "disk", "target": "b1", "bitmaps": ["b0", {"node": "other", "name": "b2"}]}}',
]

# Command-line options for qmp_dispatch's keyval mode: (option kind, text). Kinds as
# checks/qmp_dispatch.rs picks them: 0 --blockdev, 1 --export, 2 --nbd-server, 3 --object.
OPTIONS = [
    (0, "driver=file,filename=/tmp/a.img,node-name=f,locking=off"),
    (0, "driver=qcow2,node-name=q,file.driver=file,file.filename=x.qcow2,backing=null"),
    (0, "driver=null-co,node-name=n,size=1G,read-only=on"),
    (0, "driver=rbd,node-name=r,pool=rbd,image=i,conf=/etc/ceph/ceph.conf"),
    (1, "nbd,id=e0,node-name=q,writable=on,name=disk,bitmaps.0=b0"),
    (2, "addr.type=unix,addr.path=/tmp/n.sock,max-connections=4"),
    (2, "addr.type=inet,addr.host=::1,addr.port=10809,tls-creds=t0"),
    (3, "secret,id=s0,data=x,format=raw"),
    (3, "tls-creds-x509,id=t0,endpoint=server,dir=/tmp/pki,verify-peer=on"),
    (3, "authz-simple,id=a0,identity=CN=client"),
]

SIZES = ["1G", "512s", "0", "-0", "+7", "  10k", "9223372036854775807", "9223372036854775808",
         "8E", "7E", "1e", "100M", "0x10", "1 ", "", "k", "-", "00012T", "1Kb"]

CONFIG = [
    "memory\nsize=1M",
    "memory\n64M\nallocator=sparse",
    "null\nsize=1G",
    "pattern\nsize=4096",
    "offset\noffset=512\nrange=1K",
    "partition\npartition=1",
    "truncate\ntruncate=1M\nround-up=4096\nround-down=512",
    "blocksize\nminblock=512\nmaxdata=64K\nmaxlen=1M",
    "blocksize-policy\nblocksize-preferred=4096\nblocksize-error-policy=error",
    "error\nerror=EIO\nerror-rate=10%\nerror-pwrite-rate=1/4",
    "delay\nrdelay=10ms\nwdelay=1",
    "rate\nrate=1M\nburstiness=2",
    "cow\ncow-block-size=64K\ncow-on-read=true",
    "cache\ncache=writeback\ncache-max-size=1M",
    "readahead",
    "fua\nfuamode=force",
    "retry\nretries=3\nretry-delay=1\nretry-exponential=no",
    "swab\nswab-bits=32",
    "protect\nprotect=0-1023\nprotect=~4096-8191",
    "multi-conn\nmulti-conn-mode=emulate\nmulti-conn-track-dirty=conn",
    "checkwrite",
    "noextents",
]


def text_seeds():
    for crate, target, items in (("qapi", "keyval", None), ("block", "size", SIZES),
                                 ("block", "config", CONFIG)):
        clear(crate, target)
        if items is not None:
            for s in items:
                put(crate, target, s)
    for s in KEYVAL:
        put("qapi", "keyval", b"\x00" + s.encode())
        put("qapi", "keyval", b"\x01" + s.encode())
    clear("proto", "qmp_json")
    for line in QMP_LINES:
        b = line.encode()
        put("proto", "qmp_json", bytes([len(b) // 2 % 256]) + b)
    # qmp_dispatch: the first byte's bit 0 picks JSON (0) or keyval (1), bit 1 the -compat
    # policy (accept or reject), bits 2-3 the keyval option kind.
    clear("daemon", "qmp_dispatch")
    for line in QMP_LINES + DISPATCH:
        put("daemon", "qmp_dispatch", b"\x00" + line.encode())
    for line in DISPATCH[:8]:
        put("daemon", "qmp_dispatch", b"\x02" + line.encode())
    for kind, text in OPTIONS:
        put("daemon", "qmp_dispatch", bytes([1 | kind << 2]) + text.encode())


# --- xz files made by xz (the xz filter's container parser) ---------------------------------

def xz_seeds(tmp):
    clear("block", "xz_index")
    noise = b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(150))
    data = b"".join(b"line %d of a seed\n" % i for i in range(600)) + noise

    def xz(args, payload):
        return subprocess.run(["xz", "-c", "-z"] + args, input=payload, check=True,
                              stdout=subprocess.PIPE).stdout

    one = xz([], data)
    many = xz(["-0", "--block-size=2048"], data)
    put("block", "xz_index", xz([], b""))
    put("block", "xz_index", one)
    put("block", "xz_index", many)
    put("block", "xz_index", xz(["--check=sha256", "--x86", "--lzma2=preset=1",
                                 "--block-size=5000"], data))
    put("block", "xz_index", xz(["--check=none"], data[:100]) + one + bytes(8))
    # A block header alone (the file's bytes after the stream header).
    put("block", "xz_index", one[12:12 + (one[12] + 1) * 4])


# --- qcow2 images made by qemu-img -----------------------------------------------------------

def run(*argv):
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def bitmaps_seed(path, cluster):
    """A qcow2_bitmaps input from a real image: the bitmaps extension's 24 bytes with its first
    three bytes replaced by what the target derives its parameters from (bitmap count, cluster
    size as 512 << n, a shift of the disk size), then the bitmap directory."""
    with open(path, "rb") as f:
        data = f.read()
    ext_off = 104 if struct.unpack(">I", data[4:8])[0] >= 3 else 72
    if ext_off == 104:
        ext_off = struct.unpack(">I", data[100:104])[0]
    while True:
        kind, length = struct.unpack(">II", data[ext_off:ext_off + 8])
        if kind == 0x23852875:
            break
        if kind == 0:
            raise SystemExit(f"{path}: no bitmaps extension")
        ext_off += 8 + (length + 7) // 8 * 8
    ext = bytearray(data[ext_off + 8:ext_off + 32])
    nb, _, dir_size, dir_off = struct.unpack(">IIQQ", bytes(ext))
    ext[0:3] = bytes([nb, cluster.bit_length() - 10, 40])
    ext[8:16] = struct.pack(">Q", (1 << 20) << 40)
    return bytes(ext) + data[dir_off:dir_off + dir_size]


def qcow2_seeds(tmp):
    clear("image", "qcow2_open")
    clear("image", "qcow2_header")
    base = os.path.join(tmp, "base.raw")
    run("qemu-img", "create", "-q", "-f", "raw", base, "64k")
    images = []

    def make(name, opts, size="64k", io=()):
        p = os.path.join(tmp, name)
        run("qemu-img", "create", "-q", "-f", "qcow2", *opts, p, *([size] if size else []))
        for c in io:
            run("qemu-io", "-f", "qcow2", "-c", c, p)
        images.append(p)

    # Small clusters keep the files a few KiB, so the fuzzer's mutations reach the tables.
    make("empty.qcow2", ["-o", "cluster_size=512"])
    make("data.qcow2", ["-o", "cluster_size=512"],
         io=["write -P 0x11 0 1k", "write -z 4k 1k", "discard 0 512"])
    make("v2.qcow2", ["-o", "cluster_size=512,compat=0.10"], io=["write 8k 512"])
    make("refcount1.qcow2", ["-o", "cluster_size=512,refcount_bits=1"], io=["write 0 2k"])
    make("refcount64.qcow2", ["-o", "cluster_size=512,refcount_bits=64"], io=["write 0 2k"])
    make("lazy.qcow2", ["-o", "cluster_size=512,lazy_refcounts=on"], io=["write 0 512"])
    make("extl2.qcow2", ["-o", "cluster_size=16k,extended_l2=on"], size="64k",
         io=["write 0 2k"])
    make("backing.qcow2", ["-o", "cluster_size=512", "-b", base, "-F", "raw"], size=None,
         io=["write 1k 512"])
    snap = os.path.join(tmp, "data.qcow2")
    run("qemu-img", "snapshot", "-c", "s1", snap)
    bitmap = os.path.join(tmp, "bitmap.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", bitmap, "64k")
    run("qemu-img", "bitmap", "--add", bitmap, "b0")
    images.append(bitmap)
    clear("image", "qcow2_bitmaps")
    for name, bitmaps, cluster in (("one", ["b0"], 512), ("three", ["a", "bb", "c" * 40], 65536)):
        p = os.path.join(tmp, f"bitmaps-{name}.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", p, "1M")
        for i, b in enumerate(bitmaps):
            run("qemu-img", "bitmap", "--add", "-g", str(512 << i), p, b)
        run("qemu-io", "-f", "qcow2", "-c", "write 0 64k", p)
        put("image", "qcow2_bitmaps", bitmaps_seed(p, cluster), name)
        if name == "one":
            images.append(p)
    for p in images:
        with open(p, "rb") as f:
            data = f.read()
        name = os.path.basename(p)
        if len(data) <= 256 * 1024:
            put("image", "qcow2_open", data, name)
        put("image", "qcow2_header", data[:4096], name)


# --- raw images' sidecar bitmap files (crates/image/src/sidecar.rs) ---------------------------

def sidecar_file(in_use, size, bitmaps):
    """A sidecar file, encoded here from the format's table in sidecar.rs (an encoder of its
    own, so the seeds also check that the documentation and the code agree). `bitmaps`:
    (name, granularity_bits, enabled, inconsistent, bits)."""
    import zlib
    out = b"SLUICEBM" + struct.pack(">II", 1, 1 if in_use else 0)
    out += struct.pack(">QqII", size, 1700000000, 123456789, len(bitmaps))
    out += struct.pack(">QQQ", 0x803, 4242, 0)
    for name, gbits, enabled, inconsistent, bits in bitmaps:
        flags = (1 if enabled else 0) | (2 if inconsistent else 0)
        name = name.encode()
        out += struct.pack(">HHB3xQ", len(name), flags, gbits, len(bits)) + name + bits
    return out + struct.pack(">I", zlib.crc32(out))


def sidecar_device_file(in_use, size, bitmaps):
    """A version-2 sidecar file (a block device's identity), from the same table."""
    import zlib
    out = b"SLUICEBM" + struct.pack(">II", 2, 1 if in_use else 0)
    out += struct.pack(">QQ4xI", size, (7 << 8) | 3, len(bitmaps))
    out += struct.pack(">Q", 13) + bytes.fromhex("7e69070c61b443c8b4029f377cfa3da7")
    out += struct.pack(">QQQQ", 3, 2056, 1, 128) + bytes(32)
    for name, gbits, enabled, inconsistent, bits in bitmaps:
        flags = (1 if enabled else 0) | (2 if inconsistent else 0)
        name = name.encode()
        out += struct.pack(">HHB3xQ", len(name), flags, gbits, len(bits)) + name + bits
    return out + struct.pack(">I", zlib.crc32(out))


def sidecar_seeds():
    clear("image", "sidecar")
    size = 1 << 20  # 16 bits at 64 KiB: 2 bytes
    put("image", "sidecar", sidecar_file(False, size, []), "empty")
    put("image", "sidecar", sidecar_file(False, size, [
        ("daily", 16, True, False, bytes([0b101, 0x80])),
        ("old", 9, True, True, b""),
    ]), "two")
    put("image", "sidecar", sidecar_file(True, size, [
        ("daily", 16, True, False, b""),
        ("old", 9, False, True, b""),
    ]), "in-use")
    put("image", "sidecar", sidecar_device_file(False, size, [
        ("daily", 16, True, False, bytes([0b101, 0x80])),
        ("old", 9, True, True, b""),
    ]), "device")


# --- tar archives made by GNU tar, ddrescue map files ----------------------------------------

# Map files as GNU ddrescue writes them, and the odd forms nbdkit's parser also reads.
MAPFILES = [
    "# Mapfile. Created by GNU ddrescue version 1.27\n"
    "# current_pos  current_status  current_pass\n0x00008000     +               1\n"
    "#      pos        size  status\n0x00000000  0x00004000  +\n0x00004000  0x00001000  -\n"
    "0x00005000  0x00001000  /\n0x00006000  0x00001000  *\n0x00007000  0x00009000  +\n",
    "0 + 1\n0 512 +\n512 512 +\n01000 0x200 +\n",
    "\n\n0x10 ?\n-1 5 +\n",
    "0 + 1\n99999999999999999999999 1 +\n",
]


def archive_seeds(tmp):
    """block/archive: 'T' + a tar archive (GNU tar's gnu, pax, ustar and v7 formats, with a
    directory, an entry that is not the first and a name longer than 100 bytes where the
    format allows one), or 'M' + a ddrescue map file."""
    clear("block", "archive")
    src = os.path.join(tmp, "archive-src")
    long = "sub/" + "n" * 120
    os.makedirs(os.path.join(src, "sub"), exist_ok=True)
    for name, size in (("first.txt", 700), ("disk.img", 1500), (long, 300)):
        with open(os.path.join(src, name), "wb") as f:
            f.write(bytes(i % 251 for i in range(size)))
    for fmt in ("gnu", "pax", "ustar", "v7"):
        out = os.path.join(tmp, fmt + ".tar")
        names = ["first.txt", "sub", "disk.img"] + ([long] if fmt in ("gnu", "pax") else [])
        run("tar", f"--format={fmt}", "--no-recursion", "-C", src, "-cf", out, *names)
        with open(out, "rb") as f:
            put("block", "archive", b"T" + f.read(), "tar-" + fmt)
    for text in MAPFILES:
        put("block", "archive", "M" + text)


# --- LUKSv1 headers made by qemu-img ---------------------------------------------------------

def luks_seeds(tmp):
    """The luks filter's header parser: an 8-byte big-endian disk size, then the first 592
    bytes of a LUKSv1 image made by qemu-img with each cipher layout the filter knows."""
    clear("block", "luks_header")
    for name, opts in (("xts-plain64", ""),
                       ("xts128-sha1", ",cipher-alg=aes-128,hash-alg=sha1"),
                       ("cbc-plain64", ",cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=plain64"),
                       ("cbc-essiv", ",cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,"
                                     "ivgen-hash-alg=sha256")):
        p = os.path.join(tmp, f"luks-{name}.img")
        run("qemu-img", "create", "-q", "-f", "luks", "--object", "secret,id=s,data=x",
            "-o", f"key-secret=s,iter-time=10{opts}", p, "1M")
        with open(p, "rb") as f:
            header = f.read(592)
        size = os.path.getsize(p)
        put("block", "luks_header", struct.pack(">Q", size) + header, name)
        if name == "xts-plain64":
            v2 = header[:6] + struct.pack(">H", 2) + header[8:]
            put("block", "luks_header", struct.pack(">Q", size) + v2, "version-2")


def main():
    for tool in ("nbdkit", "nbdinfo", "nbdcopy", "qemu-img", "qemu-io", "xz"):
        if shutil.which(tool) is None:
            sys.exit(f"fuzz-seeds.py: {tool} is not on PATH (run scripts/test.sh's installs)")
    with tempfile.TemporaryDirectory() as tmp:
        text_seeds()
        nbd_seeds(tmp)
        qcow2_seeds(tmp)
        sidecar_seeds()
        archive_seeds(tmp)
        luks_seeds(tmp)
        xz_seeds(tmp)
    for crate in ("proto", "image", "block", "qapi", "daemon"):
        d = os.path.join(ROOT, "crates", crate, "fuzz", "seeds")
        for t in sorted(os.listdir(d)):
            print(f"{crate}/{t}: {len(os.listdir(os.path.join(d, t)))} seeds")


if __name__ == "__main__":
    main()
