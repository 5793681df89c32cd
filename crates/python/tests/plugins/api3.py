# A script asking for an API version that does not exist.
API_VERSION = 3


def open(readonly):
    return 1


def get_size(h):
    return 1


def pread(h, buf, offset, flags):
    pass
