# A RAM disk for sluice's Python host tests, API_VERSION 2.
#
# Parameters:
#   size=SIZE           disk size (default 1M)
#   fua=none|emulate|native   what can_fua answers (default native)
#   log=FILE            every data call and flush is appended to FILE, one line each
#   fastzero=fail       a zero with FLAG_FAST_ZERO fails with EOPNOTSUPP
#   pattern=1           the disk starts filled with a byte pattern instead of zeroes
#
# It runs unchanged under `nbdkit python ram_v2.py`.

import builtins
import errno

import nbdkit

API_VERSION = 2

size = 1024 * 1024
fua = nbdkit.FUA_NATIVE
log_path = None
fast_zero_fails = False
pattern = False
disk = None


def log(line):
    if log_path:
        with builtins.open(log_path, "a") as f:
            f.write(line + "\n")


def config(key, value):
    global size, fua, log_path, fast_zero_fails, pattern
    if key == "size":
        size = nbdkit.parse_size(value)
    elif key == "fua":
        fua = {"none": nbdkit.FUA_NONE, "emulate": nbdkit.FUA_EMULATE,
               "native": nbdkit.FUA_NATIVE}[value]
    elif key == "log":
        log_path = value
    elif key == "fastzero":
        fast_zero_fails = value == "fail"
    elif key == "pattern":
        pattern = value == "1"
    else:
        raise RuntimeError("unknown parameter %s" % key)


def config_complete():
    global disk
    log("config_complete")
    if pattern:
        disk = bytearray((i * 7 + i // 4096) % 251 for i in range(size))
    else:
        disk = bytearray(size)


def get_ready():
    log("get_ready")


def after_fork():
    log("after_fork")


def cleanup():
    log("cleanup")


def dump_plugin():
    print("ram_v2_size=%d" % size)


def open(readonly):
    log("open readonly=%s export=%s" % (readonly, nbdkit.export_name()))
    return {"readonly": readonly}


def close(h):
    log("close")


def get_size(h):
    return len(disk)


def block_size(h):
    return (1, 4096, 0xffffffff)


def can_fua(h):
    return fua


def can_fast_zero(h):
    return True


def can_multi_conn(h):
    return True


def export_description(h):
    return "ram disk " + nbdkit.export_name()


def list_exports(readonly, is_tls):
    return [("a", "first"), "b"]


def default_export(readonly, is_tls):
    return "a"


def pread(h, buf, offset, flags):
    buf[:] = disk[offset:offset + len(buf)]


def pwrite(h, buf, offset, flags):
    log("pwrite %d %d flags=0x%x" % (len(buf), offset, flags))
    disk[offset:offset + len(buf)] = buf


def flush(h, flags):
    log("flush flags=0x%x" % flags)


def trim(h, count, offset, flags):
    log("trim %d %d flags=0x%x" % (count, offset, flags))
    disk[offset:offset + count] = bytearray(count)


def zero(h, count, offset, flags):
    log("zero %d %d flags=0x%x" % (count, offset, flags))
    if flags & nbdkit.FLAG_FAST_ZERO and fast_zero_fails:
        nbdkit.set_error(errno.EOPNOTSUPP)
        raise RuntimeError("fast zero is not possible here")
    disk[offset:offset + count] = bytearray(count)


def cache(h, count, offset, flags):
    log("cache %d %d flags=0x%x" % (count, offset, flags))
