# A script that does not compile: line 7 lacks a comma.
API_VERSION = 2

def open(readonly):
    return 1

def pread(h, buf, offset flags):
    pass
