# A script whose import fails, on line 4.
import errno

import no_such_module_for_sluice_tests


def open(readonly):
    return 1


def get_size(h):
    return 1


def pread(h, buf, offset, flags):
    pass
