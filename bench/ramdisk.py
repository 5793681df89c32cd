# A RAM disk as an nbdkit Python plugin (API 2), for nbd-bench.py's --hosted rows: the same
# script run by sluice (`sluice serve python bench/ramdisk.py size=N`) and by nbdkit
# (`nbdkit python bench/ramdisk.py size=N`). It does what nbdkit's own example
# (plugins/python/examples/ramdisk.py) does, one bytearray and slices of it, with its size
# given as a parameter; like that example it names no thread model, so both servers run it
# with the Python plugin's default (requests serialized).
import errno

import nbdkit

API_VERSION = 2
disk = bytearray()


def config(key, value):
    global disk
    if key != "size":
        raise RuntimeError(f"unknown parameter {key}")
    disk = bytearray(int(value))


def open(readonly):
    return 1


def get_size(h):
    return len(disk)


def pread(h, buf, offset, flags):
    buf[:] = disk[offset:offset + len(buf)]


def pwrite(h, buf, offset, flags):
    disk[offset:offset + len(buf)] = buf


def zero(h, count, offset, flags):
    if not flags & nbdkit.FLAG_MAY_TRIM:
        nbdkit.set_error(errno.EOPNOTSUPP)
        raise RuntimeError("zero without may-trim")
    disk[offset:offset + count] = bytes(count)
