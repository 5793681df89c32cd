#!/usr/bin/env -S sluice serve python
# A 64 MiB RAM disk: an nbdkit Python plugin (API 2) that sluice runs unmodified.
# Run it: ./ramdisk.py -U - --run 'nbdinfo "$uri"'   (or: nbdkit python ramdisk.py)
API_VERSION = 2
disk = bytearray(64 * 1024 * 1024)
def open(readonly): return 1
def get_size(h): return len(disk)
def pread(h, buf, offset, flags): buf[:] = disk[offset:offset + len(buf)]
def pwrite(h, buf, offset, flags): disk[offset:offset + len(buf)] = buf
def zero(h, count, offset, flags): disk[offset:offset + count] = bytes(count)
