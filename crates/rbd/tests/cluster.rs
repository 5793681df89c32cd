//! The `rbd` plugin's API (what a daemon driver builds on) against a real cluster: many
//! threads on one shared image, a clone reading through to its parent, zero and discard
//! semantics, typed errors. The cluster comes from the same fixture the `sluice` binary's
//! tests use (`scripts/ceph-cluster.sh`, torn down at exit).

#[path = "../../sluice/tests/support/ceph.rs"]
mod ceph;

use std::sync::Arc;

use sluice_block::extents::{EXTENT_HOLE, EXTENT_ZERO};
use sluice_block::{Errno, Extents, Flags, Handle, OpenContext, Plugin};
use sluice_rbd::{RbdError, RbdOptions, RbdPlugin};

const MIB: u64 = 1 << 20;

fn options(cluster: &ceph::Cluster, image: &str) -> RbdOptions {
    let mut o = RbdOptions::new("rbd", image);
    o.conf = Some(cluster.conf.clone());
    o
}

fn open(plugin: &RbdPlugin, readonly: bool) -> Box<dyn Handle> {
    plugin
        .open(&OpenContext {
            readonly,
            export_name: "",
            is_tls: false,
        })
        .unwrap()
}

fn read(h: &dyn Handle, len: usize, offset: u64) -> Vec<u8> {
    let mut buf = vec![0xee; len];
    h.pread(&mut buf, offset, Flags::NONE).unwrap();
    buf
}

fn extents(h: &dyn Handle, len: u64, offset: u64) -> Vec<(u64, u64, u32)> {
    let mut e = Extents::new(offset, offset + len);
    h.extents(len, offset, Flags::NONE, &mut e).unwrap();
    e.as_slice()
        .iter()
        .map(|x| (x.offset, x.length, x.kind))
        .collect()
}

#[test]
fn connect_twice_shares_one_image_and_handles_see_each_others_writes() {
    let c = ceph::shared();
    c.create_image("shared", 4 * MIB);
    let plugin = RbdPlugin::new(options(c, "shared"), false);
    let a = plugin.connect().unwrap().clone();
    let b = plugin.connect().unwrap().clone();
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(a.object_size(), 4 * MIB);
    assert!(a.writable());
    let (h1, h2) = (open(&plugin, false), open(&plugin, false));
    assert!(h1.can_multi_conn().unwrap());
    h1.pwrite(&[7; 4096], 8192, Flags::NONE).unwrap();
    assert_eq!(read(&*h2, 4096, 8192), vec![7; 4096]);
    let ro = open(&plugin, true);
    assert!(!ro.can_write().unwrap());
}

#[test]
fn parallel_requests_from_eight_threads_land_exactly() {
    let c = ceph::shared();
    c.create_image("parallel", 8 * MIB);
    let plugin = RbdPlugin::new(options(c, "parallel"), false);
    let h: Arc<dyn Handle> = Arc::from(open(&plugin, false));
    const BLOCK: usize = 8192;
    let threads: Vec<_> = (0..8u8)
        .map(|t| {
            let h = h.clone();
            std::thread::spawn(move || {
                for i in 0..64usize {
                    let block = i * 8 + t as usize;
                    let flags = if i % 4 == 0 { Flags::FUA } else { Flags::NONE };
                    let fill = t.wrapping_mul(31).wrapping_add(i as u8) | 1;
                    h.pwrite(&[fill; BLOCK], (block * BLOCK) as u64, flags)
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    h.flush(Flags::NONE).unwrap();
    let all = read(&*h, 512 * BLOCK, 0);
    for block in 0..512usize {
        let (i, t) = (block / 8, (block % 8) as u8);
        let fill = t.wrapping_mul(31).wrapping_add(i as u8) | 1;
        assert!(
            all[block * BLOCK..(block + 1) * BLOCK]
                .iter()
                .all(|&b| b == fill),
            "block {block}"
        );
    }
    assert_eq!(&c.read_image("rbd/parallel")[..512 * BLOCK], &all[..]);
}

#[test]
fn zero_is_exact_discard_is_advisory_and_fast_zero_needs_may_trim() {
    let c = ceph::shared();
    c.create_image("zero", 8 * MIB);
    let plugin = RbdPlugin::new(options(c, "zero"), false);
    let h = open(&plugin, false);
    h.pwrite(&vec![0xaa; 8 * MIB as usize], 0, Flags::NONE)
        .unwrap();
    // Exact at any alignment, thick (no MAY_TRIM) or not.
    h.zero(1000, 3, Flags::NONE).unwrap();
    h.zero(777, 100_000, Flags::MAY_TRIM | Flags::FUA).unwrap();
    let got = read(&*h, 200_000, 0);
    assert_eq!(&got[..3], &[0xaa; 3]);
    assert!(got[3..1003].iter().all(|&b| b == 0));
    assert_eq!(got[1003], 0xaa);
    assert!(got[100_000..100_777].iter().all(|&b| b == 0));
    assert_eq!(got[100_777], 0xaa);
    // FAST_ZERO: refused when the range must stay allocated, done when holes are allowed.
    let e = h.zero(4096, 0, Flags::FAST_ZERO).unwrap_err();
    assert_eq!(e.errno, Errno::ENOTSUP);
    h.zero(4 * MIB, 4 * MIB, Flags::FAST_ZERO | Flags::MAY_TRIM)
        .unwrap();
    assert!(read(&*h, 4 * MIB as usize, 4 * MIB).iter().all(|&b| b == 0));
    assert_eq!(
        extents(&*h, 4 * MIB, 4 * MIB),
        [(4 * MIB, 4 * MIB, EXTENT_HOLE | EXTENT_ZERO)],
        "a whole object zeroed with MAY_TRIM is deallocated"
    );
    // Discard below librbd's 64 KiB granularity does nothing; reads stay as they were.
    h.trim(100, 2 * MIB, Flags::NONE).unwrap();
    assert_eq!(read(&*h, 100, 2 * MIB), vec![0xaa; 100]);
}

#[test]
fn clone_reads_and_maps_its_parent_data() {
    let c = ceph::shared();
    c.create_image("parent", 12 * MIB);
    {
        let p = RbdPlugin::new(options(c, "parent"), false);
        let h = open(&p, false);
        h.pwrite(&[0x5a; 65536], 4 * MIB + 4096, Flags::NONE)
            .unwrap();
        h.flush(Flags::NONE).unwrap();
    }
    c.rbd(&["snap", "create", "rbd/parent@base"]);
    c.rbd(&["snap", "protect", "rbd/parent@base"]);
    c.rbd(&["clone", "rbd/parent@base", "rbd/child"]);
    let child = RbdPlugin::new(options(c, "child"), false);
    let h = open(&child, false);
    // The parent's data shows through, and block status says so (include_parent).
    assert_eq!(read(&*h, 65536, 4 * MIB + 4096), vec![0x5a; 65536]);
    let map = extents(&*h, 12 * MIB, 0);
    let kind_at = |off: u64| {
        map.iter()
            .find(|(o, l, _)| (*o..o + l).contains(&off))
            .unwrap()
            .2
    };
    assert_eq!(kind_at(4 * MIB + 4096), 0, "{map:?}");
    assert_eq!(kind_at(0), EXTENT_HOLE | EXTENT_ZERO, "{map:?}");
    assert_eq!(kind_at(9 * MIB), EXTENT_HOLE | EXTENT_ZERO, "{map:?}");
    // Writing the child leaves the parent's snapshot alone.
    h.pwrite(&[1; 4096], 4 * MIB + 4096, Flags::FUA).unwrap();
    assert_eq!(read(&*h, 4096, 4 * MIB + 4096), vec![1; 4096]);
    let snap = RbdPlugin::new(
        {
            let mut o = options(c, "parent");
            o.snapshot = Some("base".into());
            o
        },
        false,
    );
    let s = open(&snap, false);
    assert!(!s.can_write().unwrap(), "snapshots are read-only");
    assert_eq!(read(&*s, 4096, 4 * MIB + 4096), vec![0x5a; 4096]);
}

#[test]
fn missing_image_and_pool_are_typed_errors_with_enoent() {
    let c = ceph::shared();
    let e = RbdPlugin::new(options(c, "no-such-image"), false)
        .connect()
        .unwrap_err();
    assert!(matches!(e, RbdError::Image { .. }), "{e:?}");
    assert_eq!(e.errno(), Errno(libc::ENOENT));
    let mut o = options(c, "x");
    o.pool = "no-such-pool".into();
    let e = RbdPlugin::new(o, false).connect().unwrap_err();
    assert!(matches!(e, RbdError::Pool { .. }), "{e:?}");
    // A configuration without monitors is refused before librados goes looking for them.
    let empty = c.dir.join("empty.conf");
    std::fs::write(&empty, "[global]\n").unwrap();
    let mut o = options(c, "x");
    o.conf = Some(empty);
    let e = RbdPlugin::new(o, false).connect().unwrap_err();
    assert!(e.to_string().contains("no monitor address"), "{e}");
    // The first open connects when nobody called connect(), and fails the same way.
    let p = RbdPlugin::new(options(c, "no-such-image"), false);
    let err = p
        .open(&OpenContext {
            readonly: false,
            export_name: "",
            is_tls: false,
        })
        .err()
        .unwrap();
    assert_eq!(err.errno, Errno(libc::ENOENT));
    assert!(err.message.contains("no such image"), "{}", err.message);
}
