# Capability answers that test nbdkit's rules: only the True object is true.
import nbdkit

API_VERSION = 2


def open(readonly):
    return None


def get_size(h):
    return 4096


def pread(h, buf, offset, flags):
    buf[:] = bytes(len(buf))


def pwrite(h, buf, offset, flags):
    pass


def flush(h, flags):
    pass


def can_write(h):
    return 1            # not True: read-only


def can_flush(h):
    return True


def is_rotational(h):
    return True


def can_trim(h):
    return "yes"        # not True


def can_zero(h):
    return False        # emulate with writes; can_fast_zero then defaults to True


def can_cache(h):
    return nbdkit.CACHE_EMULATE


def can_multi_conn(h):
    return False
