//! Data and capability callbacks of v1 and v2 scripts, driven through the `Handle` trait
//! and through the block layer's `Export` policy (FUA and zero emulation, extents checks).

mod support;

use sluice_block::extents::{EXTENT_HOLE, EXTENT_ZERO};
use sluice_block::{BlockSize, Errno, ExportEntry, Extents, Flags, Support};
use support::{export, kv, load, load_logged, log_calls, open, read};

const DATA_CALLS: &[&str] = &["pwrite", "flush", "zero", "trim", "cache"];

#[test]
fn v2_ram_disk_round_trips_through_handle() {
    let p = load("ram_v2.py", &[kv("size", "64K")]);
    let h = open(&p);
    assert_eq!(h.get_size().unwrap(), 65536);
    h.pwrite(b"hello, sluice", 40000, Flags::NONE).unwrap();
    assert_eq!(read(&*h, 40000, 13), b"hello, sluice");
    h.trim(13, 40000, Flags::NONE).unwrap();
    assert_eq!(read(&*h, 40000, 13), [0u8; 13]);
}

#[test]
fn v2_capabilities_and_metadata() {
    let p = load("ram_v2.py", &[]);
    let h = open(&p);
    assert!(h.can_write().unwrap());
    assert!(h.can_flush().unwrap());
    assert!(h.can_trim().unwrap());
    assert_eq!(h.can_zero().unwrap(), Support::Native);
    assert!(h.can_fast_zero().unwrap());
    assert_eq!(h.can_fua().unwrap(), Support::Native);
    assert!(h.can_multi_conn().unwrap());
    assert!(!h.is_rotational().unwrap());
    assert_eq!(h.can_cache().unwrap(), Support::Native);
    assert!(!h.can_extents().unwrap());
    assert_eq!(
        h.block_size().unwrap(),
        Some(BlockSize {
            minimum: 1,
            preferred: 4096,
            maximum: u32::MAX
        })
    );
    assert_eq!(p.default_export(false, false).unwrap(), "a");
    assert_eq!(
        p.list_exports(false, false).unwrap(),
        [
            ExportEntry {
                name: "a".into(),
                description: Some("first".into())
            },
            ExportEntry {
                name: "b".into(),
                description: None
            }
        ]
    );
    let h = p.open(&support::ctx("b")).unwrap();
    assert_eq!(
        h.export_description().unwrap().as_deref(),
        Some("ram disk b")
    );
}

#[test]
fn v2_native_fua_passes_flags_exactly() {
    let (p, log) = load_logged("ram_v2.py", &[kv("fua", "native")]);
    let e = export(&p);
    assert_eq!(e.caps().fua, Support::Native);
    e.write(&[1u8; 512], 0, Flags::FUA).unwrap();
    e.zero(4096, 4096, Flags::MAY_TRIM | Flags::FUA).unwrap();
    e.zero(4096, 8192, Flags::MAY_TRIM | Flags::FAST_ZERO)
        .unwrap();
    e.trim(4096, 0, Flags::FUA).unwrap();
    assert_eq!(
        log_calls(&log, DATA_CALLS),
        [
            "pwrite 512 0 flags=0x2",
            "zero 4096 4096 flags=0x3",
            "zero 4096 8192 flags=0x9",
            "trim 4096 0 flags=0x2",
        ]
    );
}

#[test]
fn v2_emulated_fua_clears_flag_and_flushes() {
    let (p, log) = load_logged("ram_v2.py", &[kv("fua", "emulate")]);
    let e = export(&p);
    assert_eq!(e.caps().fua, Support::Emulate);
    e.write(&[1u8; 512], 0, Flags::FUA).unwrap();
    e.zero(4096, 4096, Flags::MAY_TRIM | Flags::FUA).unwrap();
    e.trim(4096, 0, Flags::FUA).unwrap();
    e.write(&[2u8; 512], 0, Flags::NONE).unwrap();
    assert_eq!(
        log_calls(&log, DATA_CALLS),
        [
            "pwrite 512 0 flags=0x0",
            "flush flags=0x0",
            "zero 4096 4096 flags=0x1",
            "flush flags=0x0",
            "trim 4096 0 flags=0x0",
            "flush flags=0x0",
            "pwrite 512 0 flags=0x0",
        ]
    );
}

#[test]
fn v2_fua_none_is_not_offered() {
    let p = load("ram_v2.py", &[kv("fua", "none")]);
    let e = export(&p);
    assert_eq!(e.caps().fua, Support::None);
    let err = e.write(&[1u8; 512], 0, Flags::FUA).unwrap_err();
    assert_eq!(err.errno, Errno::EINVAL);
}

#[test]
fn v2_fast_zero_eopnotsupp_comes_back_without_fallback() {
    let (p, log) = load_logged("ram_v2.py", &[kv("fastzero", "fail")]);
    let e = export(&p);
    let err = e.zero(4096, 0, Flags::FAST_ZERO).unwrap_err();
    assert!(
        err.errno.0 == libc::EOPNOTSUPP || err.errno == Errno::ENOTSUP,
        "{err:?}"
    );
    assert_eq!(log_calls(&log, DATA_CALLS), ["zero 4096 0 flags=0x8"]);
}

#[test]
fn v2_cache_reaches_script() {
    let (p, log) = load_logged("ram_v2.py", &[]);
    let e = export(&p);
    e.cache(4096, 8192).unwrap();
    assert_eq!(log_calls(&log, DATA_CALLS), ["cache 4096 8192 flags=0x0"]);
}

#[test]
fn v1_ram_disk_round_trips_and_zero_gets_may_trim() {
    let (p, log) = load_logged("ram_v1.py", &[kv("size", "64K")]);
    let h = open(&p);
    h.pwrite(b"legacy", 100, Flags::NONE).unwrap();
    assert_eq!(read(&*h, 100, 6), b"legacy");
    h.zero(6, 100, Flags::MAY_TRIM).unwrap();
    h.zero(6, 200, Flags::NONE).unwrap();
    h.trim(10, 300, Flags::NONE).unwrap();
    h.flush(Flags::NONE).unwrap();
    assert_eq!(read(&*h, 100, 6), [0u8; 6]);
    assert_eq!(
        log_calls(&log, DATA_CALLS),
        [
            "pwrite 6 100",
            "zero 6 100 may_trim=True",
            "zero 6 200 may_trim=False",
            "trim 10 300",
            "flush",
        ]
    );
}

#[test]
fn v1_capability_defaults_follow_functions_present() {
    let p = load("ram_v1.py", &[]);
    let h = open(&p);
    assert!(h.can_write().unwrap());
    assert!(h.can_flush().unwrap());
    assert!(h.can_trim().unwrap());
    assert_eq!(h.can_zero().unwrap(), Support::Native);
    assert!(!h.can_fast_zero().unwrap(), "not can_zero");
    assert_eq!(h.can_fua().unwrap(), Support::Emulate, "flush exists");
    assert_eq!(h.can_cache().unwrap(), Support::None);
    assert!(!h.can_extents().unwrap());
    assert_eq!(h.block_size().unwrap(), None);
}

#[test]
fn v1_fua_native_is_capped_at_emulate_and_flushed() {
    let (p, log) = load_logged("ram_v1.py", &[kv("fua", "native")]);
    let e = export(&p);
    assert_eq!(e.caps().fua, Support::Emulate);
    e.write(&[7u8; 512], 0, Flags::FUA).unwrap();
    assert_eq!(log_calls(&log, DATA_CALLS), ["pwrite 512 0", "flush"]);
    let p = load("ram_v1.py", &[kv("fua", "none")]);
    assert_eq!(open(&p).can_fua().unwrap(), Support::None);
}

#[test]
fn v1_fast_zero_fails_at_once_with_enotsup() {
    let p = load("ram_v1.py", &[]);
    let err = open(&p).zero(4096, 0, Flags::FAST_ZERO).unwrap_err();
    assert_eq!(err.errno, Errno::ENOTSUP);
}

#[test]
fn pread_exception_without_set_error_is_eio() {
    let p = load("pread_raises.py", &[]);
    let h = open(&p);
    let mut buf = [0u8; 512];
    let err = h.pread(&mut buf, 0, Flags::NONE).unwrap_err();
    assert_eq!(err.errno, Errno::EIO);
    assert!(
        err.message
            .ends_with("pread_raises.py: pread: RuntimeError: pread failed on purpose"),
        "{}",
        err.message
    );
    // The server survives and the handle still answers.
    assert_eq!(h.get_size().unwrap(), 4096);
    assert_eq!(
        h.pread(&mut buf, 0, Flags::NONE).unwrap_err().errno,
        Errno::EIO
    );
}

#[test]
fn pread_exception_after_set_error_uses_that_errno() {
    let p = load("pread_raises.py", &[kv("errno", "ENOSPC")]);
    let e = export(&p);
    let mut buf = [0u8; 512];
    let err = e.read(&mut buf, 0).unwrap_err();
    assert_eq!(err.errno, Errno::ENOSPC);
    // set_error is per call: the next failure of another kind is EIO again.
    let p = load("pread_raises.py", &[]);
    assert_eq!(
        open(&p).pread(&mut buf, 0, Flags::NONE).unwrap_err().errno,
        Errno::EIO
    );
}

#[test]
fn boolean_capabilities_must_be_the_true_object() {
    let p = load("bools.py", &[]);
    let h = open(&p);
    assert!(!h.can_write().unwrap(), "1 is not True");
    assert!(h.can_flush().unwrap());
    assert!(h.is_rotational().unwrap());
    assert!(!h.can_trim().unwrap(), "'yes' is not True");
    assert_eq!(h.can_zero().unwrap(), Support::Emulate);
    assert!(h.can_fast_zero().unwrap(), "not can_zero");
    assert_eq!(h.can_cache().unwrap(), Support::Emulate);
    assert!(!h.can_multi_conn().unwrap());
    let e = export(&p);
    assert!(!e.caps().writable);
}

fn kinds(e: &Extents) -> Vec<(u64, u64, u32)> {
    e.as_slice()
        .iter()
        .map(|x| (x.offset, x.length, x.kind))
        .collect()
}

#[test]
fn extents_tuples_become_extents() {
    const K: u64 = 1024;
    let p = load("extents.py", &[]);
    let h = open(&p);
    assert!(h.can_extents().unwrap());
    let mut e = Extents::new(0, 1024 * K);
    h.extents(1024 * K, 0, Flags::NONE, &mut e).unwrap();
    let hz = EXTENT_HOLE | EXTENT_ZERO;
    assert_eq!(
        kinds(&e),
        [
            (0, 64 * K, 0),
            (64 * K, 128 * K, hz),
            (192 * K, 64 * K, EXTENT_ZERO),
            (256 * K, 768 * K, 0)
        ]
    );
    // Through the export: clipped to the request, REQ_ONE keeps one.
    let ex = export(&p);
    let got = ex.extents(100 * K, 60 * K, Flags::NONE).unwrap();
    assert_eq!(kinds(&got), [(60 * K, 4 * K, 0), (64 * K, 96 * K, hz)]);
    let got = ex.extents(100 * K, 60 * K, Flags::REQ_ONE).unwrap();
    assert_eq!(kinds(&got), [(60 * K, 4 * K, 0)]);
    assert_eq!(read(&*h, 64 * K - 2, 4), [0x61, 0x61, 0, 0]);
}

#[test]
fn bad_extents_answers_fail_the_request_with_einval() {
    for mode in ["empty", "unordered"] {
        let p = load("extents.py", &[kv("mode", mode)]);
        let err = export(&p).extents(65536, 0, Flags::NONE).unwrap_err();
        assert_eq!(err.errno, Errno::EINVAL, "{mode}: {err:?}");
    }
    let p = load("extents.py", &[kv("mode", "notuple")]);
    let err = export(&p).extents(65536, 0, Flags::NONE).unwrap_err();
    assert_eq!(err.errno, Errno::EIO, "{err:?}");
    assert!(err.message.contains("3-tuples"), "{}", err.message);
}

#[test]
fn script_without_extents_reports_all_data() {
    let p = load("ram_v2.py", &[]);
    let got = export(&p).extents(8192, 0, Flags::NONE).unwrap();
    assert_eq!(kinds(&got), [(0, 8192, 0)]);
}
