//! Corner cases of the transmission and negotiation phases seen through a real client:
//! Debian's python3-libnbd (1.14), driven by short Python scripts.
//!
//! libnbd checks bounds, flags and sizes itself in its default strict mode; scripts that test
//! the server's own checks turn that off with `h.set_strict_mode(0)` so the bad request
//! really goes on the wire. Errors are asserted by number (`nbd.Error.errnum`).
//!
//! libnbd 1.14 cannot negotiate extended headers (no `set_request_extended_headers`), and
//! cannot send options it does not know; both are covered with raw bytes in
//! `raw_protocol.rs`.

use crate::support;

use support::Server;

/// Helpers every script gets: `expect_errno(code, fn, *args)`, and `connect(uri)` for a
/// handle that asked for `base:allocation`.
const PRELUDE: &str = r#"
def expect_errno(code, f, *args, **kwargs):
    try:
        f(*args, **kwargs)
    except nbd.Error as e:
        assert e.errnum == code, "%s: errno %r (%s), expected %d" % (f.__name__, e.errnum, e.string, code)
        return
    raise AssertionError("%s succeeded, expected errno %d" % (f.__name__, code))

def connect(u, strict=True):
    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(u)
    return h
"#;

/// Runs `body` (with [`PRELUDE`]) against `server`'s default export, then checks the server
/// survived without a panic.
fn script(server: &mut Server, body: &str) -> String {
    let out = support::nbdsh(&server.uri(), &format!("{PRELUDE}\n{body}"));
    server.assert_alive();
    server.assert_no_panic();
    out
}

#[test]
fn block_status_req_one_returns_exactly_one_extent() {
    let mut server = Server::start(&["memory", "size=8M"]);
    script(
        &mut server,
        r#"
h = connect(uri)
h.pwrite(b"\xaa" * 4096, 1 << 20)
got = []
def cb(ctx, offset, entries, err):
    assert ctx == "base:allocation", ctx
    got.append((offset, list(entries)))
    return 0
h.block_status(8 << 20, 0, cb, nbd.CMD_FLAG_REQ_ONE)
assert got == [(0, [1 << 20, nbd.STATE_HOLE | nbd.STATE_ZERO])], got
# From inside the data: one extent, data, ending at the end of the 32 KiB page.
got.clear()
h.block_status(1 << 20, (1 << 20) + 100, cb, nbd.CMD_FLAG_REQ_ONE)
assert got == [((1 << 20) + 100, [32768 - 100, 0])], got
"#,
    );
}

#[test]
fn block_status_sparse_memory_after_writes_reports_written_pages_as_data() {
    let mut server = Server::start(&["memory", "size=8M"]);
    script(
        &mut server,
        r#"
h = connect(uri)
M = 1 << 20
P = 32768
HOLE = nbd.STATE_HOLE | nbd.STATE_ZERO
def extents(count, offset):
    got = []
    def cb(ctx, off, entries, err):
        got.extend(entries)
        return 0
    h.block_status(count, offset, cb)
    return [(got[i], got[i + 1]) for i in range(0, len(got), 2)]

assert extents(8 * M, 0) == [(8 * M, HOLE)], extents(8 * M, 0)
h.pwrite(b"\xaa" * 4096, M)
h.pwrite(b"\x01" * 10, 3 * M + 100)
h.pwrite(b"\x02" * 65536, 5 * M)
h.trim(65536, 5 * M)
# An all-zero write allocates nothing.
h.pwrite(bytes(4096), 6 * M)
want = [(M, HOLE), (P, 0), (2 * M - P, HOLE), (P, 0), (5 * M - P, HOLE)]
assert extents(8 * M, 0) == want, extents(8 * M, 0)
# Zeroing a whole written page makes it a hole again.
h.zero(P, M)
want = [(3 * M, HOLE), (P, 0), (5 * M - P, HOLE)]
assert extents(8 * M, 0) == want, extents(8 * M, 0)
"#,
    );
}

#[test]
fn fast_zero_memory_advertised_and_succeeds() {
    let mut server = Server::start(&["memory", "size=1M"]);
    script(
        &mut server,
        r#"
h = connect(uri)
assert h.can_fast_zero()
h.pwrite(b"\xff" * 8192, 4096)
h.zero(8192, 4096, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(16384, 0) == bytes(16384)
h.pwrite(b"\xff" * 8192, 4096)
h.zero(8192, 4096, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
assert h.pread(16384, 0) == bytes(16384)
"#,
    );
}

/// An nbdkit `eval` plugin (loaded by sluice as a C plugin) over a 1 MiB file in a temporary
/// directory, whose `zero` always fails with ENOTSUP and which answers `can_fast_zero` with
/// `fast_zero` (a shell exit code: 0 true, 3 false).
fn eval_server_without_fast_zero(fast_zero: &str) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk = disk.display();
    let args = [
        "get_size=echo 1048576".to_string(),
        format!("pread=dd if={disk} skip=$4 count=$3 iflag=count_bytes,skip_bytes status=none"),
        format!("pwrite=dd of={disk} seek=$4 conv=notrunc oflag=seek_bytes status=none"),
        "can_write=exit 0".to_string(),
        "can_flush=exit 0".to_string(),
        "flush=exit 0".to_string(),
        "can_zero=exit 0".to_string(),
        format!("can_fast_zero=exit {fast_zero}"),
        "zero=echo ENOTSUP cannot zero without writing >&2; exit 1".to_string(),
    ];
    let mut argv = vec!["eval"];
    argv.extend(args.iter().map(String::as_str));
    (Server::start(&argv), dir)
}

#[test]
fn fast_zero_plugin_cannot_zero_fast_refused_enotsup_data_untouched() {
    // No built-in writable plugin lacks fast zero, so this uses nbdkit's eval plugin.
    let (mut server, _dir) = eval_server_without_fast_zero("0");
    script(
        &mut server,
        r#"
h = connect(uri)
assert h.can_fast_zero()
h.pwrite(b"\xff" * 4096, 0)
expect_errno(errno.ENOTSUP, h.zero, 4096, 0, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(4096, 0) == b"\xff" * 4096
# Without FAST_ZERO the server falls back to writing zeroes.
h.zero(4096, 0)
assert h.pread(4096, 0) == bytes(4096)
"#,
    );
}

#[test]
fn fast_zero_not_advertised_strict_off_einval() {
    let (mut server, _dir) = eval_server_without_fast_zero("3");
    script(
        &mut server,
        r#"
h = connect(uri, strict=False)
assert h.can_zero() and not h.can_fast_zero()
h.pwrite(b"\xff" * 4096, 0)
expect_errno(errno.EINVAL, h.zero, 4096, 0, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(4096, 0) == b"\xff" * 4096
"#,
    );
}

#[test]
fn fast_zero_null_advertised_and_succeeds() {
    let mut server = Server::start(&["null", "size=1M"]);
    script(
        &mut server,
        r#"
h = connect(uri)
assert h.can_fast_zero()
h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)
"#,
    );
}

#[test]
fn read_past_end_strict_off_einval() {
    let mut server = Server::start(&["memory", "size=1M"]);
    script(
        &mut server,
        r#"
h = connect(uri, strict=False)
size = h.get_size()
assert size == 1 << 20
expect_errno(errno.EINVAL, h.pread, 512, size - 256)
expect_errno(errno.EINVAL, h.pread, 512, size)
expect_errno(errno.EINVAL, h.pread, 1, 1 << 62)
expect_errno(errno.EINVAL, h.pwrite, b"x" * 512, size - 256)
expect_errno(errno.EINVAL, h.zero, 512, size - 256)
expect_errno(errno.EINVAL, h.trim, 512, size - 256)
# The connection survives its errors.
assert h.pread(256, size - 256) == bytes(256)
"#,
    );
}

#[test]
fn write_zero_length_strict_off_einval() {
    let mut server = Server::start(&["memory", "size=1M"]);
    script(
        &mut server,
        r#"
h = connect(uri, strict=False)
expect_errno(errno.EINVAL, h.pwrite, b"", 0)
expect_errno(errno.EINVAL, h.pread, 0, 0)
h.pwrite(b"ok", 0)
assert h.pread(2, 0) == b"ok"
"#,
    );
}

#[test]
fn write_unaligned_reads_back() {
    let mut server = Server::start(&["memory", "size=1M"]);
    script(
        &mut server,
        r#"
h = connect(uri)
assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
h.pwrite(b"xyz", 1)
assert h.pread(8, 0) == b"\0xyz\0\0\0\0"
# Across a 32 KiB page boundary of the memory plugin.
h.pwrite(b"0123456789", 32768 - 5)
assert h.pread(12, 32768 - 6) == b"\x000123456789\x00"
"#,
    );
}

#[test]
fn list_dir_callback_gets_every_file() {
    let dir = tempfile::tempdir().unwrap();
    for (name, len) in [("disk1", 1 << 20), ("disk2", 4096), ("zeta.img", 512)] {
        std::fs::write(dir.path().join(name), vec![0u8; len]).unwrap();
    }
    std::fs::create_dir(dir.path().join("subdir")).unwrap();
    let arg = format!("dir={}", dir.path().display());
    let mut server = Server::start(&["file", &arg]);
    let out = script(
        &mut server,
        r#"
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(uri)
names = []
def cb(name, description):
    names.append(name)
    return 0
n = h.opt_list(cb)
assert n == 3, n
print(",".join(names))
h.opt_abort()
"#,
    );
    assert_eq!(out.trim(), "disk1,disk2,zeta.img");
}

#[test]
fn opt_info_dir_missing_export_fails_then_go_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("disk1"), vec![0u8; 1 << 20]).unwrap();
    let arg = format!("dir={}", dir.path().display());
    let mut server = Server::start(&["file", &arg]);
    script(
        &mut server,
        r#"
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(uri)
h.set_export_name("missing")
try:
    h.opt_info()
    raise AssertionError("opt_info on a missing export succeeded")
except nbd.Error:
    pass
h.set_export_name("disk1")
h.opt_info()
assert h.get_size() == 1 << 20
h.opt_go()
assert h.aio_is_ready()
assert h.pread(512, 0) == bytes(512)
"#,
    );
}

#[test]
fn readonly_writes_trims_zeroes_refused_eperm() {
    let mut server = Server::start(&["-r", "memory", "size=1M"]);
    script(
        &mut server,
        r#"
h = connect(uri, strict=False)
assert h.is_read_only()
assert not h.can_trim() and not h.can_zero() and not h.can_fast_zero() and not h.can_fua()
expect_errno(errno.EPERM, h.pwrite, b"x" * 512, 0)
expect_errno(errno.EPERM, h.trim, 512, 0)
expect_errno(errno.EPERM, h.zero, 512, 0)
expect_errno(errno.EPERM, h.zero, 512, 0, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(512, 0) == bytes(512)
"#,
    );
}

#[test]
fn readonly_plugin_pattern_writes_refused_eperm() {
    let mut server = Server::start(&["pattern", "size=1M"]);
    script(
        &mut server,
        r#"
h = connect(uri, strict=False)
assert h.is_read_only()
before = h.pread(512, 4096)
expect_errno(errno.EPERM, h.pwrite, b"x" * 512, 4096)
assert h.pread(512, 4096) == before
"#,
    );
}

#[test]
fn trim_zero_flush_cache_memory_read_back_zeroes() {
    let mut server = Server::start(&["memory", "size=4M"]);
    script(
        &mut server,
        r#"
h = connect(uri)
assert h.can_trim() and h.can_zero() and h.can_flush() and h.can_cache()
data = bytes(range(256)) * 1024            # 256 KiB
h.pwrite(data, 0)
# Trim a range that covers whole pages and parts of others.
h.trim(100000, 1000)
got = h.pread(len(data), 0)
assert got[:1000] == data[:1000]
assert got[1000:101000] == bytes(100000)
assert got[101000:] == data[101000:]
h.pwrite(data, 0)
h.zero(100000, 1000)
got = h.pread(len(data), 0)
assert got[1000:101000] == bytes(100000) and got[101000:] == data[101000:]
h.pwrite(data, 0)
h.zero(100000, 1000, nbd.CMD_FLAG_NO_HOLE)
got = h.pread(len(data), 0)
assert got[1000:101000] == bytes(100000) and got[:1000] == data[:1000]
h.flush()
h.cache(len(data), 0)
assert h.pread(len(data), 0) == got
"#,
    );
}

#[test]
fn fua_write_zero_trim_memory_succeed() {
    let mut server = Server::start(&["memory", "size=1M"]);
    script(
        &mut server,
        r#"
h = connect(uri)
assert h.can_fua()
h.pwrite(b"\x5a" * 4096, 8192, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 8192) == b"\x5a" * 4096
h.zero(1024, 8192, nbd.CMD_FLAG_FUA)
h.trim(1024, 9216, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 8192) == bytes(2048) + b"\x5a" * 2048
"#,
    );
}

#[test]
fn aio_64_requests_in_flight_all_complete_correctly() {
    let mut server = Server::start(&["memory", "size=64M"]);
    script(
        &mut server,
        r#"
h = connect(uri)
N = 64
B = 65536

def wait_all(cookies):
    pending = set(cookies)
    stalls = 0
    while True:
        # aio_command_completed raises if the server failed the command.
        for c in list(pending):
            if h.aio_command_completed(c):
                pending.discard(c)
        if not pending:
            return
        if h.poll(10000) == 0:
            stalls += 1
            assert stalls < 3, "%d commands never completed" % len(pending)

def pattern(i):
    return bytes([(i * 7 + j) % 251 for j in range(256)]) * (B // 256)

# 64 writes in flight.
wbufs = [nbd.Buffer.from_bytearray(bytearray(pattern(i))) for i in range(N)]
wait_all([h.aio_pwrite(wbufs[i], i * B) for i in range(N)])

# 64 reads in flight: small requests, so nothing blocks and none can have completed
# before we poll.
rbufs = [nbd.Buffer(B) for _ in range(N)]
cookies = [h.aio_pread(rbufs[i], i * B) for i in range(N)]
assert h.aio_in_flight() == N, h.aio_in_flight()
wait_all(cookies)
for i in range(N):
    assert rbufs[i].to_bytearray() == pattern(i), "read %d returned the wrong data" % i

# 32 writes to fresh space and 32 reads of the old, all in flight together.
wbufs2 = [nbd.Buffer.from_bytearray(bytearray(pattern(N + i))) for i in range(N // 2)]
rbufs2 = [nbd.Buffer(B) for _ in range(N // 2)]
cookies = []
for i in range(N // 2):
    cookies.append(h.aio_pwrite(wbufs2[i], (N + i) * B))
    cookies.append(h.aio_pread(rbufs2[i], i * B))
wait_all(cookies)
for i in range(N // 2):
    assert rbufs2[i].to_bytearray() == pattern(i)
assert h.pread(N // 2 * B, N * B) == b"".join(pattern(N + i) for i in range(N // 2))
"#,
    );
}

#[test]
fn structured_replies_off_reads_writes_work_block_status_unavailable() {
    let mut server = Server::start(&["memory", "size=1M"]);
    script(
        &mut server,
        r#"
h = nbd.NBD()
h.set_request_structured_replies(False)
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)
assert not h.get_structured_replies_negotiated()
assert not h.can_df()
assert not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.pwrite(b"simple" * 1000, 100)
assert h.pread(6000, 100) == b"simple" * 1000
# Reads of holes and big reads come back whole as simple replies too.
assert h.pread(256 * 1024, 512 * 1024) == bytes(256 * 1024)
h.zero(6, 100)
assert h.pread(12, 100) == bytes(6) + b"simple"
try:
    h.block_status(4096, 0, lambda *a: 0)
    raise AssertionError("block status without structured replies succeeded")
except nbd.Error:
    pass
# Server-side errors still arrive (as simple replies) and the connection survives.
h.set_strict_mode(0)
expect_errno(errno.EINVAL, h.pread, 512, 1 << 20)
assert h.pread(6, 106) == b"simple"
"#,
    );
}

#[test]
fn structured_replies_on_reads_writes_block_status_work() {
    let mut server = Server::start(&["memory", "size=1M"]);
    script(
        &mut server,
        r#"
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)
assert h.get_structured_replies_negotiated()
assert h.can_df()
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.pwrite(b"structured" * 100, 100)
assert h.pread(1000, 100) == b"structured" * 100
# A big read of a hole (answered with an OFFSET_HOLE chunk).
assert h.pread(512 * 1024, 512 * 1024) == bytes(512 * 1024)
chunks = []
def chunk(buf, offset, status, err):
    chunks.append((offset, len(buf), status))
    return 0
buf = h.pread_structured(512 * 1024, 512 * 1024, chunk)
assert buf == bytes(512 * 1024)
assert chunks == [(512 * 1024, 512 * 1024, nbd.READ_HOLE)], chunks
# DF (don't fragment) is offered with structured replies; data comes back as one chunk.
chunks.clear()
buf = h.pread_structured(1000, 100, chunk, nbd.CMD_FLAG_DF)
assert buf == b"structured" * 100
assert chunks == [(100, 1000, nbd.READ_DATA)], chunks
got = []
h.block_status(1 << 20, 0, lambda ctx, off, e, err: got.extend(e) or 0)
assert got == [32768, 0, (1 << 20) - 32768, nbd.STATE_HOLE | nbd.STATE_ZERO], got
h.set_strict_mode(0)
expect_errno(errno.EINVAL, h.pread, 512, 1 << 20)
assert h.pread(10, 100) == b"structured"
"#,
    );
}

#[test]
fn export_name_dir_named_export_connects_empty_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("disk1"), vec![7u8; 1 << 20]).unwrap();
    std::fs::write(dir.path().join("disk2"), vec![9u8; 4096]).unwrap();
    let arg = format!("dir={}", dir.path().display());
    let mut server = Server::start(&["file", &arg]);
    let base = server.uri_for("");
    let base = base.replace("nbd+unix:///?", "nbd+unix:///{}?");
    script(
        &mut server,
        &format!(
            r#"
base = {base:?}
h = connect(base.format("disk1"))
assert h.get_export_name() == "disk1"
assert h.get_size() == 1 << 20
assert h.pread(4, 0) == b"\x07" * 4
h2 = connect(base.format("disk2"))
assert h2.get_size() == 4096
assert h2.pread(4, 0) == b"\x09" * 4
for name in ["", "missing", "..", "disk1/x"]:
    try:
        connect(base.format(name))
        raise AssertionError("export %r was served" % name)
    except nbd.Error:
        pass
"#
        ),
    );
}

#[test]
fn export_info_memory_flags_visible_through_get_functions() {
    let mut server = Server::start(&["memory", "size=3M"]);
    script(
        &mut server,
        r#"
h = nbd.NBD()
h.set_full_info(True)
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)
assert h.get_size() == 3 << 20
assert not h.is_read_only()
assert not h.is_rotational()
for f in ["can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_multi_conn",
          "can_cache", "can_df"]:
    assert getattr(h, f)(), f
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
assert h.get_canonical_export_name() == ""
assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20
# No built-in plugin has a description, so none is sent even when asked for.
try:
    d = h.get_export_description()
    raise AssertionError("unexpected description %r" % d)
except nbd.Error:
    pass
"#,
    );
}

#[test]
fn export_info_pattern_flags_visible_through_get_functions() {
    let mut server = Server::start(&["pattern", "size=1M"]);
    script(
        &mut server,
        r#"
h = connect(uri)
assert h.get_size() == 1 << 20
assert h.is_read_only()
for f in ["can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero"]:
    assert not getattr(h, f)(), f
assert h.can_cache() and h.can_multi_conn()
h.cache(4096, 0)
# The pattern: each 8-byte word holds its own offset, big-endian.
assert h.pread(16, 8) == (8).to_bytes(8, "big") + (16).to_bytes(8, "big")
"#,
    );
}

#[test]
fn multi_conn_write_flush_read_other_connection() {
    let mut server = Server::start(&["memory", "size=1M"]);
    script(
        &mut server,
        r#"
a = connect(uri)
b = connect(uri)
assert a.can_multi_conn() and b.can_multi_conn()
assert b.pread(4096, 0) == bytes(4096)
a.pwrite(b"\x42" * 4096, 0)
a.flush()
assert b.pread(4096, 0) == b"\x42" * 4096
b.zero(2048, 1024)
b.flush()
assert a.pread(4096, 0) == b"\x42" * 1024 + bytes(2048) + b"\x42" * 1024
"#,
    );
}
