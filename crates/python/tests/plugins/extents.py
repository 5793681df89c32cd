# A 1 MiB disk with a fixed allocation map, for block-status tests.
#
#   [0, 64K)        data (bytes 0x61)
#   [64K, 192K)     hole, reads as zeroes
#   [192K, 256K)    zero but allocated
#   [256K, 1M)      data (bytes 0x62)
#
# mode=empty|unordered|notuple makes extents() answer wrongly, to test the checks.

import nbdkit

API_VERSION = 2

K = 1024
MAP = [
    (0, 64 * K, 0),
    (64 * K, 128 * K, nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO),
    (192 * K, 64 * K, nbdkit.EXTENT_ZERO),
    (256 * K, 768 * K, 0),
]
mode = "ok"


def config(key, value):
    global mode
    if key == "mode":
        mode = value
    else:
        raise RuntimeError("unknown parameter %s" % key)


def open(readonly):
    return None


def get_size(h):
    return 1024 * K


def byte_at(i):
    if i < 64 * K:
        return 0x61
    if i < 256 * K:
        return 0
    return 0x62


def pread(h, buf, offset, flags):
    buf[:] = bytes(byte_at(i) for i in range(offset, offset + len(buf)))


def extents(h, count, offset, flags):
    if mode == "empty":
        return []
    if mode == "unordered":
        return [(offset, 4096, 0), (offset + 8192, 4096, 0)]
    if mode == "notuple":
        return [offset, count]
    end = offset + count
    out = []
    for (o, l, t) in MAP:
        if o + l > offset and o < end:
            out.append((o, l, t))
            if flags & nbdkit.FLAG_REQ_ONE:
                break
    return out
