# Exercises the nbdkit module's functions from inside callbacks.
#
#   pread at 0      fills the buffer with a JSON report of what the module says, padded
#   pread at 4096   nbdkit.nanosleep(30, 0): ends early when the client goes
#   pwrite at 0     nbdkit.disconnect(True)
#   pwrite at 4096  nbdkit.shutdown()

import json

import nbdkit

API_VERSION = 2


def open(readonly):
    nbdkit.debug("api.py: open")
    return {}


def get_size(h):
    return 8192


def can_write(h):
    return True


def peer(f):
    try:
        return f()
    except RuntimeError as e:
        return str(e)


def pread(h, buf, offset, flags):
    if offset == 4096:
        nbdkit.nanosleep(30, 0)
        return
    report = {
        "export": nbdkit.export_name(),
        "tls": nbdkit.is_tls(),
        "pid": peer(nbdkit.peer_pid),
        "uid": peer(nbdkit.peer_uid),
        "gid": peer(nbdkit.peer_gid),
        "size": nbdkit.parse_size("1M"),
        "consts": [nbdkit.FLAG_MAY_TRIM, nbdkit.FLAG_FUA, nbdkit.FLAG_REQ_ONE,
                   nbdkit.FLAG_FAST_ZERO, nbdkit.FUA_NATIVE, nbdkit.CACHE_EMULATE,
                   nbdkit.EXTENT_HOLE, nbdkit.EXTENT_ZERO,
                   nbdkit.THREAD_MODEL_PARALLEL],
    }
    data = json.dumps(report).encode()
    buf[:] = data.ljust(len(buf))


def pwrite(h, buf, offset, flags):
    if offset == 0:
        nbdkit.disconnect(True)
    else:
        nbdkit.shutdown()
