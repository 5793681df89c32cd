# A RAM disk for sluice's Python host tests in the legacy API (no API_VERSION: version 1).
#
# Parameters:
#   size=SIZE           disk size (default 1M)
#   fua=none|emulate|native   define can_fua answering this (default: no can_fua at all)
#   log=FILE            every data call and flush is appended to FILE, one line each

import builtins

import nbdkit

size = 1024 * 1024
fua = None
log_path = None
disk = None


def log(line):
    if log_path:
        with builtins.open(log_path, "a") as f:
            f.write(line + "\n")


def config(key, value):
    global size, fua, log_path
    if key == "size":
        size = nbdkit.parse_size(value)
    elif key == "fua":
        fua = {"none": nbdkit.FUA_NONE, "emulate": nbdkit.FUA_EMULATE,
               "native": nbdkit.FUA_NATIVE}[value]
    elif key == "log":
        log_path = value
    else:
        raise RuntimeError("unknown parameter %s" % key)


def config_complete():
    global disk
    disk = bytearray(size)
    if fua is not None:
        # Callbacks are looked up by name at each call, so one can be added late.
        globals()["can_fua"] = lambda h: fua


def open(readonly):
    return object()


def get_size(h):
    return len(disk)


def pread(h, count, offset):
    return disk[offset:offset + count]


def pwrite(h, buf, offset):
    log("pwrite %d %d" % (len(buf), offset))
    disk[offset:offset + len(buf)] = buf


def flush(h):
    log("flush")


def trim(h, count, offset):
    log("trim %d %d" % (count, offset))
    disk[offset:offset + count] = bytearray(count)


def zero(h, count, offset, may_trim):
    log("zero %d %d may_trim=%s" % (count, offset, may_trim))
    disk[offset:offset + count] = bytearray(count)
