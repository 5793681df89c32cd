//! kill -9 of `sluice daemon` during a `blockdev-mirror` or a `drive-mirror` of an exported,
//! written qcow2 (over a qcow2 backing) into a new qcow2, and during a
//! `blockdev-snapshot-sync` of it (issue #16, item 4), as `daemon_stream_crash` does for
//! stream.
//!
//! A python3-libnbd client writes through the export all along: write `i` puts byte
//! `i % 255 + 1` over the 4 KiB slot `i` (its own 64 KiB cluster, see [`slot`]), one write
//! at a time, with a flush after every [`FLUSH_EVERY`] writes; it reports each write and
//! each flush the daemon acknowledged. A write is *durable* once a flush after it was
//! acknowledged: writes without FUA and not flushed may be lost in a crash (their L2
//! entries can still sit in the metadata cache), in sluice as in qemu. After each kill:
//! `qemu-img check` of the source chain, the target or overlay finds no errors (leaks are
//! allowed), and every slot of every image reads as either its pristine content or as the
//! write the client made there — never anything else, never a write the client had not sent
//! yet — and outside the slots the source is the pristine image.
//!
//! The mirrors are `blockdev-mirror` (sync `full`) onto a qcow2 made beforehand, and
//! `drive-mirror` (format qcow2, mode `absolute-paths`), which creates the target itself:
//! with sync `full`, and with sync `top`, whose target's backing is the source's backing,
//! `base.qcow2` (the created target's header is checked, and it is read through that
//! backing). Then, by kill point:
//! - **before READY** (a throttled mirror) and **in READY**: the source holds every durable
//!   write.
//! - **after `job-complete`** (a random few µs after it, after `pending`, or at
//!   BLOCK_JOB_COMPLETED): the source holds every write that was durable when
//!   `job-complete` was sent; every durable write is in the source or in the target (after
//!   the pivot the export writes the target); once BLOCK_JOB_COMPLETED was seen the pivot had
//!   flushed the target, so the target is the pristine image plus every write durable before
//!   `job-complete`.
//! - **while `drive-mirror` creates its target** (a random few µs after the command): the
//!   source holds every durable write, and the target is what its creation left (see
//!   below), with no backing (sync `full`).
//! - **during `blockdev-snapshot-sync`** (a random few µs after it, or after its reply):
//!   the overlay is what its creation left (see below); once it is complete, its backing is
//!   the source; the chain (the overlay if complete, else the source) holds every durable
//!   write; and no write is on the wrong layer: every write in the source came before every
//!   write found only in the overlay (the switch flushes the source with the client's
//!   requests held off, so everything before it is in the source and nothing after).
//!
//! An image file the daemon creates (drive-mirror's target, the snapshot's overlay) passes
//! through these states, in the order of the daemon's `create_image`: no file, an empty
//! file, a file of at most three clusters without a qcow2 header (imago writes the refcount
//! block and table first), a qcow2 image of virtual size 0 (the header, written when imago
//! opens what it made), the complete image (grown, the header's new size and L1 table
//! written only after the refcounts that count them, see `HeaderLast` in
//! `crates/image/src/storage.rs`). A kill may leave any of them before the command's
//! reply, only the last after it; every qcow2 image among them is clean for `qemu-img
//! check` (leaks allowed) and names the right backing ([`created`]). No one opened such a
//! leftover, and the next command that creates the file clears it. (qemu-storage-daemon
//! 10.0.2 writes the header before the refcount structures: killed in between, it leaves a
//! qcow2 image whose first three clusters have refcount 0, three `qemu-img check` errors.)
//!
//! Kill point `i % KINDS` runs in iteration `i`, on a fresh copy of the pristine images; by
//! default each kind runs once and the first [`TWICE`] (before READY, the snapshot's, and
//! blockdev-mirror's in the pivot) twice. Delays come from a seeded PRNG
//! (`SLUICE_MIRROR_CRASH_SEED` overrides the seed, `SLUICE_MIRROR_CRASH_ITERS` the number of
//! iterations; every line printed names both).

use crate::support;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::crash::{check_leaks_only, env_u64, kill_9, Rng};
use support::image::{image_info, qcow2_over, qemu_img, qemu_io};
use support::qmp::{daemon_with_top, ok, short, start_nbd, wait_for, Qmp, QmpDaemon};
use support::{path_str, random_bytes, PYTHON};

const MIB: u64 = 1024 * 1024;
/// The images' virtual size: one slot per 64 KiB cluster.
const SIZE: u64 = 64 * MIB;
/// The bytes of a slot (one write).
const SLOT: u64 = 4096;
/// Slots, and the most writes the client makes.
const SLOTS: u64 = SIZE / 65536;
/// The client flushes after this many writes.
const FLUSH_EVERY: u64 = 8;
/// The default seed of the kill points.
const SEED: u64 = 0x3a1e_c0de_5eed_0016;
/// The kinds of kill points run twice by default (the first ones of [`kill_point`]): those
/// before READY, the snapshot's and blockdev-mirror's in the pivot. The other kinds after
/// `job-complete` run once with blockdev-mirror and once with drive-mirror, whose pivot is
/// the same engine's: every kind twice would make the test 40% slower than with the seven
/// kinds it had before, this 15%.
const TWICE: u64 = 5;
/// Iterations by default: every kind of kill point once, the first [`TWICE`] twice
/// (`2 * KINDS` runs every kind twice).
const ITERS: u64 = KINDS + TWICE;
/// The longest delay of [`Kill::Creating`]: a little more than the drive-mirror command
/// takes in a debug build (its target's creation, the first few ms, then opening it and
/// starting the job), so that kills land in every step of the creation and some after the
/// reply.
const CREATING_US: u64 = 8_000;
/// The throttled mirror's speed: 64 MiB take a second, so kills before READY land in the
/// copy.
const SPEED: u64 = 64 * MIB;

/// Where write `i` goes: 4 KiB at a different 4 KiB of each 64 KiB cluster.
fn slot(i: u64) -> u64 {
    i * 65536 + (i * 7 % 16) * SLOT
}

/// The byte write `i` writes.
fn byte(i: u64) -> u8 {
    (i % 255 + 1) as u8
}

/// The mirror command a kill point runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mirror {
    /// `blockdev-mirror` (sync `full`) onto the node `dst`, an empty qcow2 made and added
    /// beforehand.
    Blockdev,
    /// `drive-mirror` with sync `full`, format qcow2, mode `absolute-paths`: the daemon
    /// creates `target.qcow2` itself, without a backing.
    DriveFull,
    /// The same with sync `top`: the created target's backing is `base.qcow2` (the source's
    /// backing) and the job copies only what the source's own layer holds.
    DriveTop,
}

impl Mirror {
    /// The daemon creates the target file (drive-mirror).
    fn creates_target(self) -> bool {
        self != Mirror::Blockdev
    }

    /// The command that starts the job `m` of `top` into `target` at `speed` (0: unlimited).
    fn command(self, target: &Path, speed: u64) -> Value {
        let (name, args) = match self {
            Mirror::Blockdev => (
                "blockdev-mirror",
                json!({"job-id": "m", "device": "top", "target": "dst", "sync": "full",
                       "speed": speed}),
            ),
            Mirror::DriveFull | Mirror::DriveTop => (
                "drive-mirror",
                json!({"job-id": "m", "device": "top", "target": path_str(target),
                       "format": "qcow2", "mode": "absolute-paths",
                       "sync": if self == Mirror::DriveTop { "top" } else { "full" },
                       "speed": speed}),
            ),
        };
        json!({"execute": name, "arguments": args})
    }
}

/// Where a kill lands.
#[derive(Debug, Clone, Copy)]
enum Kill {
    /// A throttled blockdev-mirror, this many ms after the command was sent (before READY).
    Copying(u64),
    /// This many ms after BLOCK_JOB_READY of a blockdev-mirror, with the client writing.
    Ready(u64),
    /// This many µs after a [`Mirror::DriveFull`] was sent: while the daemon creates the
    /// target file, or soon after.
    Creating(u64),
    /// This many µs after `job-complete` was sent.
    Completing(Mirror, u64),
    /// This many µs after `pending` arrived (in the pivot, or just after).
    Pivoting(Mirror, u64),
    /// As BLOCK_JOB_COMPLETED arrives (the pivot done).
    Completed(Mirror),
    /// This many µs after `blockdev-snapshot-sync` was sent.
    Snapshotting(u64),
    /// This many ms after the `blockdev-snapshot-sync` reply.
    Snapshotted(u64),
}

impl Kill {
    /// The mirror the kill point runs (None: a snapshot).
    fn mirror(self) -> Option<Mirror> {
        match self {
            Kill::Copying(_) | Kill::Ready(_) => Some(Mirror::Blockdev),
            Kill::Creating(_) => Some(Mirror::DriveFull),
            Kill::Completing(m, _) | Kill::Pivoting(m, _) | Kill::Completed(m) => Some(m),
            Kill::Snapshotting(_) | Kill::Snapshotted(_) => None,
        }
    }
}

/// The kinds of [`Kill`] points, as [`kill_point`] numbers them.
const KINDS: u64 = 12;

fn kill_point(kind: u64, rng: &mut Rng) -> Kill {
    match kind % KINDS {
        0 => Kill::Copying(rng.below(800)),
        1 => Kill::Ready(rng.below(200)),
        2 => Kill::Snapshotting(rng.below(4000)),
        3 => Kill::Snapshotted(rng.below(20)),
        4 => Kill::Pivoting(Mirror::Blockdev, rng.below(1500)),
        5 => Kill::Completing(Mirror::Blockdev, rng.below(1500)),
        6 => Kill::Completed(Mirror::Blockdev),
        7 => Kill::Creating(rng.below(CREATING_US)),
        8 => Kill::Completing(Mirror::DriveFull, rng.below(1500)),
        9 => Kill::Pivoting(Mirror::DriveFull, rng.below(1500)),
        10 => Kill::Completed(Mirror::DriveFull),
        _ => Kill::Pivoting(Mirror::DriveTop, rng.below(1500)),
    }
}

/// The pristine images in `dir`: `base.qcow2` (random data in regions all over it) under
/// `src.qcow2` (other data, zeroes over base data, a relative backing name); returns the
/// flattened content of `src.qcow2`. No constant range holds the byte a client write puts
/// on a slot inside it (0xa1 is write 160's, at 10 MiB), so every write can be told from
/// what was there.
fn build_pristine(dir: &Path) -> Vec<u8> {
    let raw = dir.join("base.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(SIZE).unwrap();
    for (i, (off, len)) in [
        (0, 3 * MIB),
        (10 * MIB + 12_345, 7 * MIB),
        (30 * MIB + 4095, 5 * MIB),
        (SIZE - 2 * MIB - 3, 2 * MIB),
    ]
    .into_iter()
    .enumerate()
    {
        f.write_all_at(&random_bytes(len as usize, 0x3a5e + i as u64), off)
            .unwrap();
    }
    drop(f);
    let base = dir.join("base.qcow2");
    qemu_img(&["convert", "-O", "qcow2", path_str(&raw), path_str(&base)]);
    std::fs::remove_file(&raw).unwrap();
    let src = dir.join("src.qcow2");
    qcow2_over(&src, "base.qcow2", &[], None);
    qemu_io(
        "qcow2",
        path_str(&src),
        &[
            "write -P 0xa1 1M 4M",
            "write -z 11M 1M",
            "write -P 0x42 40000001 3000000",
            "write -P 0x43 60M 64k",
        ],
    );
    read_flat(&src, &dir.join("flat.raw"))
}

/// The guest-visible content of `img` (with its chain).
fn read_flat(img: &Path, scratch: &Path) -> Vec<u8> {
    qemu_img(&["convert", "-O", "raw", path_str(img), path_str(scratch)]);
    let v = std::fs::read(scratch).unwrap();
    std::fs::remove_file(scratch).unwrap();
    assert_eq!(v.len() as u64, SIZE);
    v
}

/// What the client reported: writes and flushes the daemon acknowledged.
#[derive(Debug, Default, Clone, Copy)]
struct Acks {
    /// Writes acknowledged (writes `0..written`).
    written: u64,
    /// Writes acknowledged before the last acknowledged flush: durable.
    durable: u64,
}

/// The python3-libnbd client (see the module doc): one write at a time, `pause` seconds
/// apart, until its connection fails or all slots are written.
const WRITER: &str = r#"
import nbd, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
slots, every, pause = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
print("connected", flush=True)
try:
    for i in range(slots):
        h.pwrite(bytes([i % 255 + 1]) * 4096, i * 65536 + (i * 7 % 16) * 4096)
        print("w", i + 1, flush=True)
        if (i + 1) % every == 0:
            h.flush()
            print("f", i + 1, flush=True)
        time.sleep(pause)
    h.flush()
    print("f", slots, flush=True)
except nbd.Error as e:
    print("error", e.errno, flush=True)
"#;

/// The client in its own process, its reports gathered by a thread.
struct Writer {
    child: Child,
    acks: Arc<Mutex<Acks>>,
    reader: std::thread::JoinHandle<()>,
}

impl Writer {
    fn start(uri: &str) -> Writer {
        let mut child = Command::new(PYTHON)
            .args(["-c", WRITER, uri, &SLOTS.to_string()])
            .arg(FLUSH_EVERY.to_string())
            .arg("0.0005")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3-libnbd");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "connected");
        let acks = Arc::new(Mutex::new(Acks::default()));
        let a = acks.clone();
        let reader = std::thread::spawn(move || {
            for line in out.lines() {
                let line = line.unwrap();
                let mut w = line.split_whitespace();
                let (what, n) = (w.next(), w.next().and_then(|n| n.parse::<u64>().ok()));
                let mut acks = a.lock().unwrap();
                match (what, n) {
                    (Some("w"), Some(n)) => acks.written = n,
                    (Some("f"), Some(n)) => acks.durable = n,
                    _ => {}
                }
            }
        });
        Writer {
            child,
            acks,
            reader,
        }
    }

    fn now(&self) -> Acks {
        *self.acks.lock().unwrap()
    }

    /// Waits until `n` writes were acknowledged (or all were made).
    fn wait_written(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.now().written < n.min(SLOTS) {
            assert!(Instant::now() < deadline, "the client is stuck");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// What the client got acknowledged in all (after the daemon died).
    fn finish(mut self) -> Acks {
        self.child.wait().unwrap();
        self.reader.join().unwrap();
        let acks = *self.acks.lock().unwrap();
        acks
    }
}

/// What a slot of an image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Pristine,
    Written,
    /// Zeroes: in a target the mirror had not flushed yet, what a lost copy leaves.
    Zero,
}

/// The slots of image content `img`: each pristine or the client's write (panics on
/// anything else or on a write not yet sent), and everything outside the slots pristine.
/// A `partial` image (a target before the pivot flushed it) may also hold zeroes, where
/// a copy was lost, and is not checked outside the slots.
fn slots(img: &[u8], pristine: &[u8], acks: Acks, partial: bool, ctx: &str) -> Vec<Slot> {
    let mut out = Vec::with_capacity(SLOTS as usize);
    let mut at = 0;
    for i in 0..SLOTS {
        let (s, e) = (slot(i) as usize, (slot(i) + SLOT) as usize);
        if !partial && img[at..s] != pristine[at..s] {
            let d = at + (at..s).position(|k| img[k] != pristine[k]).unwrap();
            panic!("{ctx}: byte {d} (outside the slots) changed");
        }
        at = e;
        let got = &img[s..e];
        let state = if got.iter().all(|&b| b == byte(i)) {
            Slot::Written
        } else if got == &pristine[s..e] {
            Slot::Pristine
        } else if partial && got.iter().all(|&b| b == 0) {
            Slot::Zero
        } else {
            panic!(
                "{ctx}: slot {i} is neither pristine nor write {i}: {:?}",
                &got[..16]
            );
        };
        // The write in flight at the kill is write `written`.
        assert!(
            state != Slot::Written || i <= acks.written,
            "{ctx}: slot {i} holds a write the client never sent (acks {acks:?})"
        );
        out.push(state);
    }
    if !partial {
        assert!(img[at..] == pristine[at..], "{ctx}: the end changed");
    }
    out
}

/// Panics unless writes `0..n` are all in `s`.
fn holds_all(s: &[Slot], n: u64, what: &str, ctx: &str) {
    if let Some(i) = s[..n as usize].iter().position(|&x| x != Slot::Written) {
        panic!("{ctx}: durable write {i} (of {n}) is not in the {what}");
    }
}

/// The images of one iteration.
struct Work {
    dir: PathBuf,
    src: PathBuf,
    target: PathBuf,
    /// The target was made beforehand and is added as node `dst` (blockdev-mirror's, and
    /// the snapshot's unused one); drive-mirror creates it.
    dst: bool,
    overlay: PathBuf,
}

impl Work {
    /// Fresh copies of the pristine images in `dir`, for the scenario of `kill`.
    fn new(pristine: &Path, dir: PathBuf, kill: Kill) -> Work {
        std::fs::create_dir_all(&dir).unwrap();
        for n in ["base.qcow2", "src.qcow2"] {
            std::fs::copy(pristine.join(n), dir.join(n)).unwrap();
        }
        let target = dir.join("target.qcow2");
        let dst = !kill.mirror().is_some_and(Mirror::creates_target);
        if dst {
            qemu_img(&["create", "-q", "-f", "qcow2", path_str(&target), "64M"]);
        }
        Work {
            src: dir.join("src.qcow2"),
            overlay: dir.join("overlay.qcow2"),
            dir,
            target,
            dst,
        }
    }

    fn flat(&self, img: &Path) -> Vec<u8> {
        read_flat(img, &self.dir.join("scratch.raw"))
    }
}

/// A daemon with the source as node `top` (its backing from the header), the target as
/// node `dst` if [`Work::dst`], and `top` exported writable as `vm`; the client connected
/// to it.
fn setup(w: &Work) -> (QmpDaemon, Qmp, Writer) {
    let (d, mut c) = daemon_with_top(&w.src);
    if w.dst {
        ok(
            &mut c,
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "dst",
                   "file": {"driver": "file", "filename": path_str(&w.target)}}),
        );
    }
    start_nbd(&mut c, &d);
    ok(
        &mut c,
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "top", "name": "vm", "writable": true}),
    );
    let writer = Writer::start(&d.nbd_uri("vm"));
    (d, c, writer)
}

/// Starts the job `m` of `mirror` (see [`Mirror::command`]).
fn mirror(c: &mut Qmp, w: &Work, mirror: Mirror, speed: u64) {
    let r = c.cmd(mirror.command(&w.target, speed));
    assert_eq!(r, json!({"return": {}}), "{mirror:?}");
}

/// What happened before the kill, for the verdict.
#[derive(Debug, Default)]
struct Before {
    /// Durable writes when `job-complete` or `blockdev-snapshot-sync` was sent.
    durable_at_command: u64,
    /// The command's reply had arrived.
    replied: bool,
    /// BLOCK_JOB_COMPLETED had arrived.
    completed: bool,
}

/// Runs the scenario of `kill` up to the kill; returns what the client got acknowledged.
fn run_and_kill(w: &Work, kill: Kill, rng: &mut Rng) -> (Acks, Before, String) {
    let (mut d, mut c, writer) = setup(w);
    let mut before = Before::default();
    let t0 = Instant::now();
    match kill {
        Kill::Copying(ms) => {
            writer.wait_written(10);
            mirror(&mut c, w, Mirror::Blockdev, SPEED);
            std::thread::sleep(Duration::from_millis(ms));
        }
        Kill::Ready(ms) => {
            mirror(&mut c, w, Mirror::Blockdev, 0);
            wait_for(&mut c, "BLOCK_JOB_READY", Duration::from_secs(30));
            let n = writer.now().written;
            writer.wait_written(n + 10);
            std::thread::sleep(Duration::from_millis(ms));
        }
        Kill::Creating(us) => {
            writer.wait_written(10);
            c.send(&Mirror::DriveFull.command(&w.target, 0));
            std::thread::sleep(Duration::from_micros(us));
        }
        Kill::Completing(m, _) | Kill::Pivoting(m, _) | Kill::Completed(m) => {
            mirror(&mut c, w, m, 0);
            wait_for(&mut c, "BLOCK_JOB_READY", Duration::from_secs(30));
            let n = writer.now().written;
            writer.wait_written(n + 20 + rng.below(40));
            before.durable_at_command = writer.now().durable;
            c.send(&json!({"execute": "job-complete", "arguments": {"id": "m"}}));
            let until = match kill {
                Kill::Completing(_, us) => {
                    std::thread::sleep(Duration::from_micros(us));
                    None
                }
                Kill::Pivoting(_, us) => Some(("pending", us)),
                _ => Some(("BLOCK_JOB_COMPLETED", 0)),
            };
            if let Some((name, us)) = until {
                // The reply comes first: kept in the events, as what the kill left.
                loop {
                    let v = c.read_value().expect("the daemon closed the monitor");
                    let done = short(&v) == name;
                    c.events.push(v);
                    if done {
                        break;
                    }
                }
                std::thread::sleep(Duration::from_micros(us));
            }
        }
        Kill::Snapshotting(_) | Kill::Snapshotted(_) => {
            writer.wait_written(20 + rng.below(40));
            before.durable_at_command = writer.now().durable;
            c.send(&json!({"execute": "blockdev-snapshot-sync",
                           "arguments": {"node-name": "top", "snapshot-node-name": "ov",
                                         "snapshot-file": path_str(&w.overlay)}}));
            if let Kill::Snapshotting(us) = kill {
                std::thread::sleep(Duration::from_micros(us));
            } else {
                assert_eq!(c.reply(), json!({"return": {}}));
                before.replied = true;
                let n = writer.now().written;
                writer.wait_written(n + 5);
                std::thread::sleep(Duration::from_millis(kill_ms(kill)));
            }
        }
    }
    let elapsed = t0.elapsed();
    kill_9(&mut d, &mut c);
    for e in &c.events {
        assert!(e.get("error").is_none(), "the command failed: {e}");
        assert!(e["data"].get("error").is_none(), "the job reported {e}");
        before.replied |= e.get("return").is_some();
        before.completed |= short(e) == "BLOCK_JOB_COMPLETED";
    }
    let acks = writer.finish();
    let last = c.events.last().map(short).unwrap_or_default();
    let at = format!(
        "{} ms in, last message {last:?}, acks {acks:?}",
        elapsed.as_millis()
    );
    (acks, before, at)
}

fn kill_ms(kill: Kill) -> u64 {
    match kill {
        Kill::Snapshotted(ms) => ms,
        _ => 0,
    }
}

/// The writes an image holds.
fn count(s: &[Slot]) -> usize {
    s.iter().filter(|&&x| x == Slot::Written).count()
}

/// What a kill left of an image file the daemon creates as qemu's `bdrv_img_create` does
/// (`create_image` in the daemon: the snapshot's overlay, drive-mirror's target).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Created {
    /// No file.
    Absent,
    /// A file of this many bytes without a qcow2 header.
    Unformatted(u64),
    /// A qcow2 image of virtual size 0: not grown to its size yet.
    Empty,
    /// The qcow2 image of [`SIZE`].
    Complete,
}

/// What is left of `path` after a kill while the daemon created it (see the module doc),
/// checked: the steps of the creation are no file, an empty file, imago's refcount block
/// and table (at most three clusters, the header not written yet), a qcow2 image of size 0
/// (then grown); every qcow2 image among them is clean for `qemu-img check` and names
/// `backing`. Once the command `replied`, only the complete image.
fn created(path: &Path, backing: Option<&Path>, replied: bool, ctx: &str) -> Created {
    let f = match std::fs::File::open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                !replied,
                "{ctx}: the command replied, and there is no {path:?}"
            );
            return Created::Absent;
        }
        r => r.unwrap(),
    };
    let len = f.metadata().unwrap().len();
    let mut magic = [0; 4];
    if len < 4 || f.read_exact_at(&mut magic, 0).is_err() || magic != *b"QFI\xfb" {
        assert!(
            !replied,
            "{ctx}: the command replied, and {path:?} is no qcow2"
        );
        assert!(
            len <= 3 * 65536,
            "{ctx}: {path:?} has {len} bytes, and no qcow2 header"
        );
        return Created::Unformatted(len);
    }
    check_leaks_only(path, ctx);
    let info = image_info(path);
    assert_eq!(
        info["backing-filename"],
        json!(backing.map(path_str)),
        "{ctx}: {info}"
    );
    let size = info["virtual-size"].as_u64().unwrap();
    match size {
        SIZE => Created::Complete,
        0 if !replied => Created::Empty,
        _ => panic!("{ctx}: {path:?} is of virtual size {size}: {info}"),
    }
}

/// Judges the images after a kill (see the module doc); says what it found.
fn verify(w: &Work, pristine: &[u8], kill: Kill, acks: Acks, before: &Before, ctx: &str) -> String {
    check_leaks_only(&w.src, ctx);
    assert_eq!(
        check_leaks_only(&w.dir.join("base.qcow2"), ctx),
        0,
        "{ctx}: the backing (never written) leaks"
    );
    let src = slots(
        &w.flat(&w.src),
        pristine,
        acks,
        false,
        &format!("{ctx}: source"),
    );
    match kill {
        Kill::Copying(_) | Kill::Ready(_) => {
            check_leaks_only(&w.target, ctx);
            holds_all(&src, acks.durable, "source", ctx);
            let tctx = format!("{ctx}: target");
            let dst = slots(&w.flat(&w.target), pristine, acks, true, &tctx);
            format!(
                "{} writes in the source, {} in the target",
                count(&src),
                count(&dst)
            )
        }
        Kill::Creating(_) => {
            holds_all(&src, acks.durable, "source", ctx);
            let target = created(&w.target, None, before.replied, ctx);
            let in_target = if target == Created::Complete {
                let tctx = format!("{ctx}: target");
                count(&slots(&w.flat(&w.target), pristine, acks, true, &tctx))
            } else {
                0
            };
            format!(
                "target {target:?}, {} writes in the source, {in_target} in the target",
                count(&src)
            )
        }
        Kill::Completing(m, _) | Kill::Pivoting(m, _) | Kill::Completed(m) => {
            check_leaks_only(&w.target, ctx);
            if m.creates_target() {
                let info = image_info(&w.target);
                assert_eq!(info["virtual-size"], SIZE, "{ctx}: the target: {info}");
                // Read below through this backing (sync top): the target holds only what
                // the source's own layer did.
                let backing = w.dir.join("base.qcow2");
                let backing = (m == Mirror::DriveTop).then(|| path_str(&backing));
                assert_eq!(
                    info["backing-filename"],
                    json!(backing),
                    "{ctx}: the target: {info}"
                );
            }
            holds_all(&src, before.durable_at_command, "source", ctx);
            let partial = !before.completed;
            let tctx = format!("{ctx}: target");
            let dst = slots(&w.flat(&w.target), pristine, acks, partial, &tctx);
            if before.completed {
                holds_all(&dst, before.durable_at_command, "target", ctx);
            }
            for i in 0..acks.durable as usize {
                assert!(
                    src[i] == Slot::Written || dst[i] == Slot::Written,
                    "{ctx}: durable write {i} is neither in the source nor in the target"
                );
            }
            let only = (0..SLOTS as usize)
                .filter(|&i| dst[i] == Slot::Written && src[i] != Slot::Written)
                .count();
            format!(
                "{} writes in the source, {} in the target ({only} only there)",
                count(&src),
                count(&dst)
            )
        }
        Kill::Snapshotting(_) | Kill::Snapshotted(_) => {
            holds_all(&src, before.durable_at_command, "source", ctx);
            let overlay = created(&w.overlay, Some(&w.src), before.replied, ctx);
            let complete = overlay == Created::Complete;
            let chain = if complete {
                let octx = format!("{ctx}: overlay");
                slots(&w.flat(&w.overlay), pristine, acks, false, &octx)
            } else {
                src.clone()
            };
            holds_all(&chain, acks.durable, "chain", ctx);
            // No write on the wrong layer: the source's writes all came first.
            let last_in_src = src.iter().rposition(|&s| s == Slot::Written);
            let first_in_overlay =
                (0..SLOTS as usize).find(|&i| chain[i] == Slot::Written && src[i] != chain[i]);
            if let (Some(l), Some(f)) = (last_in_src, first_in_overlay) {
                assert!(
                    l < f,
                    "{ctx}: write {l} is in the source, but write {f} before it only in the \
                     overlay"
                );
            }
            format!(
                "overlay {overlay:?}, {} writes in the source, {} in the chain",
                count(&src),
                count(&chain)
            )
        }
    }
}

#[test]
fn kill_9_during_mirror_and_snapshot_keeps_every_durable_write_and_clean_images() {
    let seed = env_u64("SLUICE_MIRROR_CRASH_SEED").unwrap_or(SEED);
    let iters = env_u64("SLUICE_MIRROR_CRASH_ITERS").unwrap_or(ITERS);
    let t_all = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let pristine_dir = dir.path().join("pristine");
    std::fs::create_dir_all(&pristine_dir).unwrap();
    let pristine = build_pristine(&pristine_dir);
    let mut rng = Rng(seed | 1);
    for iter in 0..iters {
        let t = Instant::now();
        let kill = kill_point(iter, &mut rng);
        let ctx = format!("seed {seed:#x} iteration {iter} ({kill:?})");
        let w = Work::new(&pristine_dir, dir.path().join(format!("it{iter}")), kill);
        let (acks, before, at) = run_and_kill(&w, kill, &mut rng);
        let found = verify(&w, &pristine, kill, acks, &before, &ctx);
        eprintln!(
            "{ctx}: killed {at} ({before:?}); images clean, every durable write kept: {found}; \
             {} ms",
            t.elapsed().as_millis()
        );
        std::fs::remove_dir_all(&w.dir).unwrap();
    }
    eprintln!(
        "seed {seed:#x}: {iters} kills in {} s",
        t_all.elapsed().as_secs()
    );
}
