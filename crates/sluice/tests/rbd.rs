//! `sluice serve rbd` against a real Ceph cluster (started by `scripts/ceph-cluster.sh`,
//! shared by the tests of this file, torn down at exit).
//!
//! The NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy, python3-libnbd) drive the export;
//! librbd's own view of the image (python3-rbd, `rbd export`) is the oracle: what the
//! clients wrote must be what any other RBD client reads. Every test uses its own image.

use crate::support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::ceph::{self, Cluster};
use support::{
    assert_same_bytes, export_bytes, output, path_str, qemu_io, qemu_io_with, random_bytes, run,
    Server,
};

const MIB: u64 = 1 << 20;

/// Serves `spec` of `cluster` (`sluice serve -f -U SOCK rbd SPEC conf=... EXTRA...`).
fn serve(cluster: &Cluster, spec: &str, extra: &[&str]) -> Server {
    let conf = cluster.conf_param();
    let mut args = vec!["rbd", spec, conf.as_str()];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// Runs a python3-libnbd script (with `uri` set and `nbd`, `errno`, `os`, `sys` imported)
/// under a time limit, with `env` added; returns its stdout, or panics with its output and
/// the server's log.
fn python(server: &Server, script: &str, env: &[(&str, String)]) -> String {
    let full = format!(
        "import nbd, errno, os, sys\nuri = {:?}\n{script}",
        server.uri()
    );
    let out = Command::new("timeout")
        .args(["120", support::PYTHON, "-c", &full])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python script failed ({}): {}{}\nserver: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        server.stderr()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `nbdinfo --map` as (offset, length, type).
fn map(uri: &str) -> Vec<(u64, u64, u32)> {
    run("nbdinfo", &["--map", uri])
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect()
}

/// The map's type at `offset`.
fn type_at(map: &[(u64, u64, u32)], offset: u64) -> u32 {
    map.iter()
        .find(|(o, l, _)| (*o..o + l).contains(&offset))
        .unwrap_or_else(|| panic!("offset {offset} not in map {map:?}"))
        .2
}

#[test]
fn rbd_qemu_io_patterns_zeroes_discard_fua_read_back_the_same_through_librbd() {
    let c = ceph::shared();
    c.create_image("qio", 32 * MIB);
    let server = serve(c, "rbd/qio", &[]);
    let uri = server.uri();

    // (offset, len, byte): writes, exact zeroes (thick and may-unmap), FUA, across the
    // 4 MiB object boundary and at unaligned offsets.
    let mut model = vec![0u8; 32 * MIB as usize];
    let mut put = |off: u64, len: u64, b: u8| {
        model[off as usize..(off + len) as usize].fill(b);
    };
    let cmds = [
        ("write -P 0x11 0 1M", (0, MIB, 0x11)),
        ("write -P 0x22 1000 5000", (1000, 5000, 0x22)),
        ("write -P 0x33 4190000 20000", (4_190_000, 20000, 0x33)),
        ("write -z 500000 1000", (500_000, 1000, 0)),
        ("write -P 0x44 8M 5M", (8 * MIB, 5 * MIB, 0x44)),
        ("write -z -u 8M 4M", (8 * MIB, 4 * MIB, 0)),
        ("write -z -u 12582999 1001", (12_582_999, 1001, 0)),
        ("write -f -P 0x66 20M 64K", (20 * MIB, 64 * 1024, 0x66)),
        ("write -P 0x77 24M 100", (24 * MIB, 100, 0x77)),
    ];
    for (_, (off, len, b)) in cmds {
        put(off, len, b);
    }
    let mut all: Vec<&str> = cmds.iter().map(|(c, _)| *c).collect();
    all.push("flush");
    qemu_io(&uri, &all);
    qemu_io(
        &uri,
        &[
            "read -P 0x11 0 1000",
            "read -P 0x22 1000 5000",
            "read -P 0 500000 1000",
            "read -P 0x33 4190000 20000",
            "read -P 0 8M 4M",
            "read -P 0x44 12M 87",
            "read -P 0 12582999 1001",
            "read -P 0x44 12584000 1047488",
            "read -P 0 13M 3M",
            "read -P 0x66 20M 64K",
        ],
    );
    // Whole objects discarded read back as zeroes; a small discard may be ignored (it is
    // advisory), so it is checked against librbd's view below, not the model.
    qemu_io(
        &uri,
        &[
            "write -P 0x55 16M 4M",
            "discard 16M 4M",
            "discard 24M 10",
            "flush",
        ],
    );
    put(16 * MIB, 4 * MIB, 0);

    let nbd = export_bytes(&uri, server.dir.path());
    let librbd = c.read_image("rbd/qio");
    assert_same_bytes(&nbd, &librbd, "NBD view vs python3-rbd");
    let small_discard = &nbd[24 * MIB as usize..24 * MIB as usize + 10];
    assert!(
        small_discard.iter().all(|&b| b == 0x77) || small_discard.iter().all(|&b| b == 0),
        "{small_discard:?}"
    );
    model[24 * MIB as usize..24 * MIB as usize + 10].copy_from_slice(small_discard);
    assert_same_bytes(&nbd, &model, "NBD view vs the writes made");
    drop(server);
    assert_same_bytes(&c.export_image("rbd/qio"), &model, "rbd export");
}

#[test]
fn rbd_map_reports_written_objects_as_data_and_untouched_ones_as_holes() {
    let c = ceph::shared();
    c.create_image("map", 32 * MIB);
    let server = serve(c, "rbd/map", &[]);
    let uri = server.uri();
    qemu_io(
        &uri,
        &[
            "write -P 1 0 4K",
            "write -P 2 9M 4K",
            "write -P 3 30M 100",
            "write -P 4 20M 4M",
            "write -z -u 20M 4M",
            "write -P 5 16M 4M",
            "discard 16M 4M",
        ],
    );
    let m = map(&uri);
    assert_eq!(m.first().unwrap().0, 0);
    assert_eq!(m.iter().map(|e| e.1).sum::<u64>(), 32 * MIB, "{m:?}");
    // Every written byte is in a data extent: never data reported as a hole.
    for off in [0, 4095, 9 * MIB, 9 * MIB + 4095, 30 * MIB, 30 * MIB + 99] {
        assert_eq!(type_at(&m, off), 0, "offset {off}: {m:?}");
    }
    // Objects never written, and whole objects zeroed with unmap or discarded, are holes.
    // (librbd reports an object's data from its start: 28M-30M, before the 100 bytes at
    // 30M, is data too, which is coarse but never wrong.)
    for off in [
        4 * MIB,
        13 * MIB,
        16 * MIB,
        20 * MIB,
        23 * MIB,
        24 * MIB,
        27 * MIB,
    ] {
        assert_eq!(type_at(&m, off), 3, "offset {off}: {m:?}");
    }
    assert_eq!(
        type_at(&m, 31 * MIB),
        3,
        "past the object's written end: {m:?}"
    );
    // qemu-img sees the same allocation.
    let qmap = run(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &server.qemu_uri()],
    );
    let qmap: serde_json::Value = serde_json::from_str(&qmap).unwrap();
    for e in qmap.as_array().unwrap() {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let data = e["data"].as_bool().unwrap();
        assert_eq!(type_at(&m, start) == 0, data, "qemu-img map {e} vs {m:?}");
        assert!(len > 0);
    }
    // The information is as librbd has it: same bytes either way.
    assert_same_bytes(
        &export_bytes(&uri, server.dir.path()),
        &c.read_image("rbd/map"),
        "NBD view vs python3-rbd",
    );
}

#[test]
fn rbd_nbdcopy_in_and_out_over_four_connections_matches_rbd_export() {
    let c = ceph::shared();
    c.create_image("copy", 12 * MIB);
    let server = serve(c, "rbd/copy", &[]);
    let uri = server.uri();
    let info = run("nbdinfo", &[&uri]);
    for flag in [
        "can_multi_conn: true",
        "can_fua: true",
        "can_fast_zero: true",
        "can_trim: true",
        "can_zero: true",
        "can_cache: false",
        "is_read_only: false",
    ] {
        assert!(info.contains(flag), "{flag} missing:\n{info}");
    }
    let mut src = random_bytes(12 * MIB as usize, 17);
    src[4 * MIB as usize..7 * MIB as usize].fill(0);
    let src_path = server.dir.path().join("src.img");
    std::fs::write(&src_path, &src).unwrap();
    run(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=16",
            path_str(&src_path),
            &uri,
        ],
    );
    assert_same_bytes(&export_bytes(&uri, server.dir.path()), &src, "nbdcopy out");
    drop(server);
    assert_same_bytes(&c.export_image("rbd/copy"), &src, "rbd export");
}

/// A few thousand random writes, zeroes, trims, flushes and reads over two connections,
/// with many requests in flight, checked against a model of the disk kept in Python. Trims
/// are advisory: a trimmed byte may read as before or as zero, and keeps what it read.
const RANDOM_OPS: &str = r#"
import nbd, os, random, sys

SIZE = int(os.environ["SIZE"])
OPS = int(os.environ["OPS"])
rnd = random.Random(int(os.environ["SEED"]))
hs = []
for _ in range(2):
    h = nbd.NBD()
    h.connect_uri(uri)
    assert h.can_multi_conn() and h.can_fua() and h.can_fast_zero() and h.can_zero()
    hs.append(h)
model = bytearray(SIZE)
maybe = bytearray(SIZE)   # 1: trimmed, reads as the model's byte or as zero
counts = {}

def check(off, got):
    want = model[off:off + len(got)]
    if got != want:
        for i, b in enumerate(got):
            j = off + i
            if b != model[j]:
                if maybe[j] and b == 0:
                    model[j] = 0
                else:
                    sys.exit("byte %d: read %d, expected %d (trimmed: %d)" % (j, b, model[j], maybe[j]))
    maybe[off:off + len(got)] = bytes(len(got))

def rand_range(busy):
    for _ in range(50):
        kind = rnd.random()
        n = rnd.randint(1, 4096) if kind < 0.5 else rnd.randint(4096, 65536) if kind < 0.85 else rnd.randint(65536, 1 << 20)
        off = rnd.randrange(0, SIZE)
        n = min(n, SIZE - off)
        if all(off + n <= a or b <= off for a, b in busy):
            busy.append((off, off + n))
            return off, n
    return None

def wait(h, cookies):
    while cookies:
        for c in list(cookies):
            if h.aio_command_completed(c):
                cookies.remove(c)
        if cookies:
            h.poll(10000)

done = 0
while done < OPS:
    busy, batch = [], []
    for _ in range(rnd.randint(1, 12)):
        r = rand_range(busy)
        if r is None:
            break
        off, n = r
        h = rnd.randrange(2)
        op = rnd.choices(["write", "read", "zero", "trim"], [4, 4, 2, 1])[0]
        batch.append((h, op, off, n))
    pending = [[], []]
    reads = []
    for h, op, off, n in batch:
        counts[op] = counts.get(op, 0) + 1
        if op == "write":
            data = bytes([rnd.randrange(1, 256)]) * n if rnd.random() < 0.5 else os.urandom(n)
            flags = nbd.CMD_FLAG_FUA if rnd.random() < 0.2 else 0
            pending[h].append(hs[h].aio_pwrite(data, off, flags=flags))
            model[off:off + n] = data
            maybe[off:off + n] = bytes(n)
        elif op == "read":
            buf = nbd.Buffer(n)
            pending[h].append(hs[h].aio_pread(buf, off))
            reads.append((off, buf))
        elif op == "zero":
            flags = nbd.CMD_FLAG_NO_HOLE if rnd.random() < 0.5 else 0
            pending[h].append(hs[h].aio_zero(n, off, flags=flags))
            model[off:off + n] = bytes(n)
            maybe[off:off + n] = bytes(n)
        else:
            pending[h].append(hs[h].aio_trim(n, off))
            maybe[off:off + n] = b"\x01" * n
    for h in range(2):
        wait(hs[h], pending[h])
    for off, buf in reads:
        check(off, buf.to_bytearray())
    done += len(batch)
    if rnd.random() < 0.05:
        hs[rnd.randrange(2)].flush()
        counts["flush"] = counts.get("flush", 0) + 1

# Fast zero that would have to write (no hole allowed) is refused at once; with holes
# allowed it is done.
try:
    hs[0].zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    sys.exit("fast zero without holes should fail")
except nbd.Error as e:
    assert e.errno == "ENOTSUP", e
hs[0].zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)
model[0:65536] = bytes(65536)
maybe[0:65536] = bytes(65536)
hs[1].flush()

for off in range(0, SIZE, 1 << 20):
    check(off, hs[rnd.randrange(2)].pread(min(1 << 20, SIZE - off), off))
open(os.environ["MODEL"], "wb").write(model)
print(" ".join("%s=%d" % kv for kv in sorted(counts.items())))
"#;

/// Runs `script` (python3-libnbd, with SIZE, OPS, SEED and MODEL in its environment)
/// against `sluice serve rbd` on a new 16 MiB image `rbd/NAME` of 1 MiB objects; the image
/// must then hold what the script's model holds, as python3-rbd reads it. Returns the
/// script's output (its operation counts).
fn run_model(c: &Cluster, name: &str, script: &str, ops: u32, seed: u32) -> String {
    let spec = format!("rbd/{name}");
    c.rbd(&["create", "--size", "16M", "--object-size", "1M", &spec]);
    let server = serve(c, &spec, &[]);
    let model_path = server.dir.path().join("model.bin");
    let counts = python(
        &server,
        script,
        &[
            ("SIZE", (16 * MIB).to_string()),
            ("OPS", ops.to_string()),
            ("SEED", seed.to_string()),
            ("MODEL", path_str(&model_path).to_string()),
        ],
    );
    let model = std::fs::read(&model_path).unwrap();
    server.assert_no_panic();
    drop(server);
    assert_same_bytes(&c.read_image(&spec), &model, "python3-rbd vs model");
    counts
}

#[test]
fn rbd_random_ops_on_two_connections_match_a_model_and_librbd() {
    let counts = run_model(ceph::shared(), "random", RANDOM_OPS, 3000, 1717);
    for op in ["read", "write", "zero", "trim", "flush"] {
        assert!(counts.contains(&format!("{op}=")), "no {op} in {counts}");
    }
}

#[test]
fn rbd_fua_writes_acknowledged_before_kill_9_are_in_the_image() {
    let c = ceph::shared();
    c.create_image("fua", 16 * MIB);
    let server = serve(c, "rbd/fua", &[]);
    // 256 writes of 16 KiB, all FUA, 64 in flight at a time and no flush; the server is
    // killed the moment the last one is acknowledged. librbd's default write-around cache
    // acknowledges plain writes before the OSD has them, so only honoured FUA makes all of
    // them durable. (The cache writes through until the first flush, hence the flush.)
    let script = "\
h = nbd.NBD()
h.connect_uri(uri)
assert h.can_fua()
h.flush()
B = 16384
for base in range(0, 256, 64):
    pending = {h.aio_pwrite(bytes([i % 251 + 1]) * B, i * B * 4, flags=nbd.CMD_FLAG_FUA)
               for i in range(base, base + 64)}
    while pending:
        pending = {c for c in pending if not h.aio_command_completed(c)}
        if pending:
            h.poll(10000)
os.kill(int(os.environ['PID']), 9)
";
    python(&server, script, &[("PID", server.pid().to_string())]);
    drop(server);
    let image = c.read_image("rbd/fua");
    for i in 0..256usize {
        let at = i * 16384 * 4;
        assert!(
            image[at..at + 16384]
                .iter()
                .all(|&b| b == (i % 251 + 1) as u8),
            "FUA write {i} at {at} is not in the image after kill -9"
        );
    }
}

#[test]
fn rbd_snapshot_is_served_read_only_with_the_snapshot_bytes() {
    let c = ceph::shared();
    c.create_image("snap", 8 * MIB);
    // Servers stop with SIGTERM, which closes the image and so releases its exclusive lock
    // at once (after SIGKILL, `rbd snap create` would wait ~30 s for the dead owner).
    let mut server = serve(c, "rbd/snap", &[]);
    qemu_io(&server.uri(), &["write -P 0xa1 0 8M"]);
    assert!(server.stop().success());
    c.rbd(&["snap", "create", "rbd/snap@s1"]);
    let mut server = serve(c, "rbd/snap", &[]);
    qemu_io(&server.uri(), &["write -P 0xb2 1M 2M"]);
    assert!(server.stop().success());
    let server = serve(c, "rbd/snap@s1", &[]);
    let uri = server.uri();
    assert!(run("nbdinfo", &[&uri]).contains("is_read_only: true"));
    qemu_io_with(&["-r"], &uri, &["read -P 0xa1 0 8M"]);
    // A client that insists on writing is refused by the server.
    let script = "h = nbd.NBD()\nh.connect_uri(uri)\nassert h.is_read_only()\n\
                  try:\n    h.pwrite(b'x', 0)\nexcept nbd.Error as e:\n    print(e.errno)\n";
    assert_eq!(support::nbdsh(&uri, script).trim(), "EPERM");
    assert_same_bytes(
        &export_bytes(&uri, server.dir.path()),
        &c.read_image("rbd/snap@s1"),
        "snapshot via NBD vs python3-rbd",
    );
    // The same snapshot with the snapshot= spelling, and the head with -r.
    drop(server);
    let conf = c.conf_param();
    let server = Server::start(&["rbd", "image=snap", "pool=rbd", "snapshot=s1", &conf]);
    qemu_io_with(&["-r"], &server.uri(), &["read -P 0xa1 1M 2M"]);
    let server = Server::start(&["-r", "rbd", "rbd/snap", &conf]);
    assert!(run("nbdinfo", &[&server.uri()]).contains("is_read_only: true"));
    qemu_io_with(&["-r"], &server.uri(), &["read -P 0xb2 1M 2M"]);
}

#[test]
fn rbd_client_with_read_only_caps_and_own_keyring_is_served_read_only() {
    let c = ceph::shared();
    c.create_image("caps", 4 * MIB);
    let keyring = c.dir.join("reader.keyring");
    c.ceph(&[
        "auth",
        "get-or-create",
        "client.reader",
        "mon",
        "profile rbd",
        "osd",
        "profile rbd-read-only pool=rbd",
        "-o",
        path_str(&keyring),
    ]);
    let keyring_param = format!("keyring={}", keyring.display());
    let server = serve(c, "rbd/caps", &["id=reader", &keyring_param]);
    assert!(run("nbdinfo", &[&server.uri()]).contains("is_read_only: true"));
    qemu_io_with(&["-r"], &server.uri(), &["read -P 0 0 4M"]);
    // The same client with its key given directly, from a file (key=+FILE).
    let key = c.ceph(&["auth", "get-key", "client.reader"]);
    let key_file = c.dir.join("reader.key");
    std::fs::write(&key_file, key.trim()).unwrap();
    let key_param = format!("key=+{}", key_file.display());
    let server = serve(c, "rbd/caps", &["user=client.reader", &key_param]);
    qemu_io_with(&["-r"], &server.uri(), &["read -P 0 0 4K"]);
}

/// Runs `sluice serve` expecting it to fail: returns (exit code, stderr, seconds taken).
fn serve_fails(args: &[&str], foreground: bool) -> (i32, String, f64) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let mut cmd = Command::new(support::sluice_bin());
    cmd.arg("serve");
    if foreground {
        cmd.arg("-f");
    }
    cmd.arg("-U").arg(&sock).args(args).stdin(Stdio::null());
    let start = Instant::now();
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert!(!sock.exists(), "the socket was left behind");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        secs,
    )
}

#[track_caller]
fn assert_one_line(stderr: &str, expect: &str) {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected:\n{stderr}");
    assert!(lines[0].starts_with("sluice: rbd: "), "{stderr}");
    assert!(lines[0].contains(expect), "{expect:?} not in {stderr}");
}

#[test]
fn rbd_wrong_pool_image_snapshot_user_key_each_fail_with_one_clear_line() {
    let c = ceph::shared();
    c.create_image("errs", 4 * MIB);
    let conf = c.conf_param();
    let wrong_key = run("ceph-authtool", &["--gen-print-key"]);
    let wrong_key = format!("key={}", wrong_key.trim());
    let cases: [(&[&str], &str); 6] = [
        (&["rbd", "nopool/errs"], "pool 'nopool': no such pool"),
        (
            &["rbd", "rbd/nope"],
            "image rbd/nope: no such image in pool 'rbd'",
        ),
        (&["rbd", "rbd/errs@nosnap"], "no such snapshot"),
        (
            &["rbd", "rbd/errs", "id=nobody"],
            "as client.nobody: authentication failed",
        ),
        (
            &["rbd", "rbd/errs", &wrong_key],
            "as client.admin: authentication failed",
        ),
        (
            &["rbd", "rbd/errs", "key=QUJD"],
            "key= is not a valid Ceph key",
        ),
    ];
    for (args, expect) in cases {
        let mut all = args.to_vec();
        all.push(&conf);
        let (code, stderr, secs) = serve_fails(&all, true);
        assert_eq!(code, 1, "{all:?}: {stderr}");
        assert_one_line(&stderr, expect);
        assert!(secs < 10.0, "{all:?} took {secs} s");
    }
    // Configuration mistakes are usage errors (exit 2), caught before connecting.
    let (code, stderr, _) = serve_fails(&["rbd", "rbd/errs", "conf=/no/such.conf"], true);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("/no/such.conf"), "{stderr}");
    let (code, stderr, _) = serve_fails(&["rbd", "pool=rbd"], true);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("you must specify the image"), "{stderr}");
}

#[test]
fn rbd_cluster_down_fails_within_the_timeout_with_one_line() {
    let c = ceph::shared();
    // The shared cluster's conf and keys, pointed at a monitor port nobody listens on.
    let dead = c.dir.join("dead.conf");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let text = std::fs::read_to_string(&c.conf).unwrap();
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("mon host") {
                format!("mon host = [v2:127.0.0.1:{port}]\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&dead, text).unwrap();
    let conf = format!("conf={}", dead.display());
    for foreground in [true, false] {
        let (code, stderr, secs) =
            serve_fails(&["rbd", "rbd/anything", &conf, "timeout=2"], foreground);
        assert_eq!(code, 1, "{stderr}");
        assert_one_line(&stderr, "no monitor answered within 2 s");
        assert!((1.5..12.0).contains(&secs), "took {secs} s");
    }
}

#[test]
fn rbd_dump_plugin_and_help_mention_rbd() {
    let dump = run(support::sluice_bin(), &["serve", "--dump-plugin", "rbd"]);
    for line in [
        "name=rbd",
        "thread_model=parallel",
        "magic_config_key=image",
        "rbd_librbd_version=1.",
    ] {
        assert!(dump.contains(line), "{line} missing:\n{dump}");
    }
    let help = output(support::sluice_bin(), &["serve", "--help"]);
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("rbd rbd/disk1 conf="), "{help}");
    assert!(help.contains("keyring="), "{help}");
}

#[test]
fn rbd_daemonized_server_serves_and_stops_on_sigterm() {
    let c = ceph::shared();
    c.create_image("bg", 4 * MIB);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let pidfile = dir.path().join("pid");
    let conf = c.conf_param();
    // Without -f: connects after forking into the background, then reports ready.
    run(
        support::sluice_bin(),
        &[
            "serve",
            "-U",
            path_str(&sock),
            "-P",
            path_str(&pidfile),
            "rbd",
            "rbd/bg",
            &conf,
        ],
    );
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    qemu_io(&uri, &["write -P 0x5a 0 64K", "read -P 0x5a 0 64K"]);
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: signalling the server this test started (its pid from its pidfile).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "server did not exit"
    );
    assert_eq!(&c.read_image("rbd/bg")[..65536], &[0x5a; 65536][..]);
}

/// Threads of process `pid` whose name starts with `prefix`.
fn threads_named(pid: i32, prefix: &str) -> usize {
    tasks_named(pid, prefix).len()
}

/// The `/proc` directories of the threads of `pid` whose name starts with `prefix`.
fn tasks_named(pid: i32, prefix: &str) -> Vec<std::path::PathBuf> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(Result::ok)
        .map(|t| t.path())
        .filter(|t| std::fs::read_to_string(t.join("comm")).is_ok_and(|c| c.starts_with(prefix)))
        .collect()
}

/// Runs `script` (as [`python`]) while sampling `sample` every 10 ms: its output, and the
/// largest sample seen while it ran.
fn python_sampling(
    server: &Server,
    script: &str,
    env: &[(&str, String)],
    sample: impl Fn() -> u64,
) -> (String, u64) {
    std::thread::scope(|s| {
        let client = s.spawn(|| python(server, script, env));
        let mut most = 0;
        while !client.is_finished() {
            most = most.max(sample());
            std::thread::sleep(Duration::from_millis(10));
        }
        (client.join().unwrap(), most)
    })
}

/// 32 random 4 KiB requests always in flight on one connection, reads for a while and then
/// writes; prints how many of each completed.
const QUEUE_DEPTH_32: &str = r#"
import random, time
h = nbd.NBD()
h.connect_uri(uri)
SIZE = h.get_size()
QD, B = 32, 4096
SECS = float(os.environ["SECS"])
rnd = random.Random(32)
data = os.urandom(B)

def drive(kind):
    n = 0
    inflight = set()
    end = time.time() + SECS
    while inflight or time.time() < end:
        while len(inflight) < QD and time.time() < end:
            off = rnd.randrange(SIZE // B) * B
            if kind == "read":
                inflight.add(h.aio_pread(nbd.Buffer(B), off))
            else:
                inflight.add(h.aio_pwrite(data, off))
        h.poll(1000)
        done = {c for c in inflight if h.aio_command_completed(c)}
        inflight -= done
        n += len(done)
    return n

print("reads=%d writes=%d" % (drive("read"), drive("write")))
"#;

#[test]
fn rbd_qd32_reads_and_writes_park_no_worker_thread_per_request() {
    let c = ceph::shared();
    c.create_image("qd32", 32 * MIB);
    let server = serve(c, "rbd/qd32", &[]);
    let pid = server.pid();
    // The connection's thread and any worker it starts are named nbd-conn-ID. A worker that
    // waited for each request's completion needed one thread per request in flight, up to
    // the 16 of `-t`; submitting asynchronously needs the connection's thread alone.
    let idle = threads_named(pid, "nbd-conn");
    let (counts, most) = python_sampling(&server, QUEUE_DEPTH_32, &[("SECS", "3".into())], || {
        threads_named(pid, "nbd-conn") as u64
    });
    let most = most as usize;
    let n: Vec<u64> = counts
        .split_whitespace()
        .map(|kv| kv.split('=').nth(1).unwrap().parse().unwrap())
        .collect();
    eprintln!("nbd-conn threads: {idle} before the client, at most {most} at depth 32; {counts}");
    assert!(n[0] > 200 && n[1] > 200, "too few requests ran: {counts}");
    assert!(
        most <= idle + 3,
        "{most} nbd-conn threads at queue depth 32 ({idle} before the client; {counts}): \
         a thread is parked per request in flight"
    );
    server.assert_no_panic();
}

/// One 4 KiB request at a time, writes and reads of what was written (checked), for SECS;
/// prints how many ran, then stays connected a second so that the server's threads of this
/// connection can still be looked at.
const QUEUE_DEPTH_1: &str = r#"
import random, time
h = nbd.NBD()
h.connect_uri(uri)
SIZE = h.get_size()
B = 4096
rnd = random.Random(1)
written = {}
n = 0
end = time.time() + float(os.environ["SECS"])
while time.time() < end:
    off = rnd.randrange(SIZE // B) * B
    data = rnd.randbytes(B)
    h.pwrite(data, off)
    written[off] = data
    back = rnd.choice(list(written)) if len(written) < 64 else off
    if h.pread(B, back) != written[back]:
        sys.exit("read at %d differs from what was written" % back)
    n += 2
print("requests=%d" % n, flush=True)
time.sleep(1)
"#;

/// Context switches so far of the threads whose name starts with `prefix`.
fn thread_switches(pid: i32, prefix: &str) -> u64 {
    tasks_named(pid, prefix)
        .into_iter()
        .filter_map(|t| std::fs::read_to_string(t.join("status")).ok())
        .flat_map(|st| {
            st.lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// At queue depth 1 librbd's callback answers each request itself (the reply sender thread
/// is not woken per request): the reply sender of the connection (nbd-reply-ID) switches
/// far fewer times than requests ran, where handing every completion to it costs at least one
/// switch per request. The data read back is checked.
#[test]
fn rbd_qd1_replies_are_sent_by_the_completion_without_waking_the_reply_thread() {
    let c = ceph::shared();
    c.create_image("qd1", 16 * MIB);
    let server = serve(c, "rbd/qd1", &[]);
    let pid = server.pid();
    // The thread goes with the connection: the largest count seen is its last.
    let (out, switches) = python_sampling(&server, QUEUE_DEPTH_1, &[("SECS", "2".into())], || {
        thread_switches(pid, "nbd-reply")
    });
    let n: u64 = out.trim().trim_start_matches("requests=").parse().unwrap();
    eprintln!("{n} requests at depth 1; the reply thread switched {switches} times");
    assert!(n > 500, "too few requests ran: {out}");
    assert!(
        switches < n / 4,
        "the reply thread switched {switches} times for {n} requests: completions are \
         handed to it instead of answered by the callback"
    );
    server.assert_no_panic();
}

/// Up to 48 requests in flight at all times on one connection (reads, writes with and
/// without FUA, zeroes with and without holes, fast zeroes, trims, flushes), on ranges that
/// do not overlap while in flight, checked against a model as each read completes. Prints
/// how many of each ran and how many completed before one submitted earlier.
const SLIDING_WINDOW: &str = r#"
import random
SIZE = int(os.environ["SIZE"])
OPS = int(os.environ["OPS"])
rnd = random.Random(int(os.environ["SEED"]))
h = nbd.NBD()
h.connect_uri(uri)
model = bytearray(SIZE)
maybe = bytearray(SIZE)   # 1: trimmed, reads as the model's byte or as zero
counts = {}
inflight = {}   # cookie -> (seq, op, off, n, buf)
order = []

def check(off, got):
    for i in range(len(got)):
        j = off + i
        if got[i] != model[j]:
            if maybe[j] and got[i] == 0:
                model[j] = 0
            else:
                sys.exit("byte %d: read %d, expected %d (trimmed: %d)" % (j, got[i], model[j], maybe[j]))
    maybe[off:off + len(got)] = bytes(len(got))

def free(off, n):
    return all(off + n <= o or o + m <= off for (_, op, o, m, _) in inflight.values() if op != "flush")

seq = 0
while seq < OPS or inflight:
    while seq < OPS and len(inflight) < 48:
        k = rnd.random()
        n = rnd.randint(1, 4096) if k < 0.5 else rnd.randint(4096, 65536) if k < 0.9 else rnd.randint(65536, 1 << 20)
        off = rnd.randrange(0, SIZE - n)
        if not free(off, n):
            continue
        op = rnd.choices(["write", "read", "zero", "trim", "flush"], [8, 8, 3, 2, 1])[0]
        buf = None
        if op == "write":
            data = bytes([rnd.randrange(1, 256)]) * n if rnd.random() < 0.5 else os.urandom(n)
            fua = rnd.random() < 0.25
            c = h.aio_pwrite(data, off, flags=nbd.CMD_FLAG_FUA if fua else 0)
            model[off:off + n] = data
            maybe[off:off + n] = bytes(n)
            if fua:
                op = "write_fua"
        elif op == "read":
            buf = nbd.Buffer(n)
            c = h.aio_pread(buf, off)
        elif op == "zero":
            f = rnd.choice([0, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FAST_ZERO])
            c = h.aio_zero(n, off, flags=f)
            model[off:off + n] = bytes(n)
            maybe[off:off + n] = bytes(n)
        elif op == "trim":
            c = h.aio_trim(n, off)
            maybe[off:off + n] = b"\x01" * n
        else:
            c = h.aio_flush()
        counts[op] = counts.get(op, 0) + 1
        inflight[c] = (seq, op, off, n, buf)
        seq += 1
    h.poll(10000)
    for c in list(inflight):
        if h.aio_command_completed(c):
            s, op, off, n, buf = inflight.pop(c)
            order.append(s)
            if op == "read":
                check(off, buf.to_bytearray())

late = sum(1 for i in range(1, len(order)) if order[i] < order[i - 1])
h.flush()
for off in range(0, SIZE, 1 << 20):
    check(off, h.pread(min(1 << 20, SIZE - off), off))
open(os.environ["MODEL"], "wb").write(model)
print(" ".join("%s=%d" % kv for kv in sorted(counts.items())), "out_of_order=%d" % late)
"#;

#[test]
fn rbd_48_requests_in_flight_complete_out_of_order_and_match_a_model_and_librbd() {
    let counts = run_model(ceph::shared(), "window", SLIDING_WINDOW, 4000, 4848);
    for op in ["read", "write", "write_fua", "zero", "trim", "flush"] {
        assert!(counts.contains(&format!("{op}=")), "no {op} in {counts}");
    }
    assert!(
        !counts.contains("out_of_order=0"),
        "every reply came in submission order: {counts}"
    );
}

/// Clients that vanish with reads and writes in flight, one after another, while another
/// client keeps writing and reading back its own range.
const VANISHING_CLIENTS: &str = r#"
import subprocess
CHILD = '''
import nbd, os, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for i in range(32):
    h.aio_pread(nbd.Buffer(1 << 20), (i % 8) << 20)
    h.aio_pwrite(os.urandom(65536), (8 << 20) + i * 65536)
time.sleep(0.002 * int(sys.argv[2]))
os._exit(0)
'''
h = nbd.NBD()
h.connect_uri(uri)
for round in range(12):
    child = subprocess.Popen([sys.executable, "-c", CHILD, uri, str(round % 4)])
    data = os.urandom(65536)
    off = (12 << 20) + round * 65536
    h.pwrite(data, off, flags=nbd.CMD_FLAG_FUA)
    assert h.pread(65536, off) == data, "round %d" % round
    assert child.wait() == 0
h.flush()
print("ok")
"#;

#[test]
fn rbd_clients_vanishing_with_requests_in_flight_leave_the_server_serving_others() {
    let c = ceph::shared();
    c.create_image("vanish", 16 * MIB);
    let mut server = serve(c, "rbd/vanish", &[]);
    let out = python(&server, VANISHING_CLIENTS, &[]);
    assert_eq!(out.trim(), "ok");
    server.assert_serving("");
    qemu_io(
        &server.uri(),
        &["write -P 0x3c 0 64K", "read -P 0x3c 0 64K"],
    );
    server.assert_no_panic();
}
