# Every pread sleeps for a while (GIL released), to show requests running concurrently.
#
#   model=parallel|serialize   thread_model() answer (default parallel)
#   sleep=time|nbdkit          time.sleep or nbdkit.nanosleep (default nbdkit)
#   ms=N                       how long (default 400)

import time

import nbdkit

API_VERSION = 2

model = nbdkit.THREAD_MODEL_PARALLEL
use_nbdkit = True
ms = 400


def config(key, value):
    global model, use_nbdkit, ms
    if key == "model":
        model = {"parallel": nbdkit.THREAD_MODEL_PARALLEL,
                 "serialize": nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS}[value]
    elif key == "sleep":
        use_nbdkit = value == "nbdkit"
    elif key == "ms":
        ms = int(value)
    else:
        raise RuntimeError("unknown parameter %s" % key)


def thread_model():
    return model


def open(readonly):
    return None


def get_size(h):
    return 1024 * 1024


def pread(h, buf, offset, flags):
    if use_nbdkit:
        nbdkit.nanosleep(ms // 1000, (ms % 1000) * 1000000)
    else:
        time.sleep(ms / 1000)
    buf[:] = bytes(len(buf))
