# pread always raises; with errno=NAME it first calls nbdkit.set_error(errno.NAME).
import errno

import nbdkit

API_VERSION = 2

err = None


def config(key, value):
    global err
    if key == "errno":
        err = getattr(errno, value)
    else:
        raise RuntimeError("unknown parameter %s" % key)


def open(readonly):
    return 1


def get_size(h):
    return 4096


def pread(h, buf, offset, flags):
    if err is not None:
        nbdkit.set_error(err)
    raise RuntimeError("pread failed on purpose")
