//! Debian's unmodified nbdkit plugins, loaded through `load()` and driven through the traits.
//!
//! Each test loads a private copy of the `.so` (see tests/support) and skips if the plugin
//! is not installed.

mod support;

use std::sync::Arc;

use sluice_block::extents::{EXTENT_HOLE, EXTENT_ZERO};
use sluice_block::{Errno, Extents, Flags, Handle, OpenContext, Plugin, Support};
use sluice_nbdkit::{load, LoadError};
use support::{bare, debian_plugin, kv, scratch_path};

fn open(plugin: &Arc<dyn Plugin>, export_name: &str) -> Box<dyn Handle> {
    plugin
        .open(&OpenContext {
            readonly: false,
            export_name,
            is_tls: false,
        })
        .unwrap()
}

fn read(h: &dyn Handle, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    h.pread(&mut buf, offset, Flags::NONE).unwrap();
    buf
}

#[test]
fn memory_plugin_round_trips_and_reports_extents() {
    let Some(path) = debian_plugin("memory") else {
        return;
    };
    let plugin = load(&path, &[bare("1M")]).unwrap();
    assert_eq!(plugin.name(), "memory");
    assert_eq!(plugin.version(), Some("1.32.5"));
    let h = open(&plugin, "");
    assert_eq!(h.get_size().unwrap(), 1 << 20);
    assert!(h.can_write().unwrap());
    assert!(h.can_flush().unwrap());
    assert!(h.can_trim().unwrap());
    assert_eq!(h.can_zero().unwrap(), Support::Native);
    assert_eq!(h.can_fua().unwrap(), Support::Native);
    assert!(h.can_multi_conn().unwrap());
    assert!(h.can_extents().unwrap());

    h.pwrite(b"hello, sluice", 40000, Flags::FUA).unwrap();
    assert_eq!(read(&*h, 40000, 13), b"hello, sluice");
    h.flush(Flags::NONE).unwrap();

    // One 32K page allocated, the rest sparse; the plugin adds one extent per page and the
    // host coalesces neighbours.
    let mut e = Extents::new(0, 1 << 20);
    h.extents(1 << 20, 0, Flags::NONE, &mut e).unwrap();
    let kinds: Vec<(u64, u64, u32)> = e
        .as_slice()
        .iter()
        .map(|x| (x.offset, x.length, x.kind))
        .collect();
    let hz = EXTENT_HOLE | EXTENT_ZERO;
    assert_eq!(
        kinds,
        [
            (0, 32768, hz),
            (32768, 32768, 0),
            (65536, (1 << 20) - 65536, hz)
        ]
    );

    h.zero(32768, 32768, Flags::MAY_TRIM).unwrap();
    assert_eq!(read(&*h, 40000, 13), [0u8; 13]);
}

#[test]
fn memory_plugin_bad_size_is_config_error() {
    let Some(path) = debian_plugin("memory") else {
        return;
    };
    let err = load(&path, &[bare("lots")]).err().unwrap();
    assert!(matches!(
        err,
        LoadError::Callback {
            callback: "config",
            ..
        }
    ));
    assert!(
        err.to_string()
            .ends_with(": config: could not parse size string (lots)"),
        "{err}"
    );
}

#[test]
fn file_plugin_writes_through_to_file() {
    let Some(path) = debian_plugin("file") else {
        return;
    };
    let disk = scratch_path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let plugin = load(&path, &[kv("file", disk.to_str().unwrap())]).unwrap();
    let h = open(&plugin, "");
    assert_eq!(h.get_size().unwrap(), 1 << 20);
    h.pwrite(&[0x5a; 4096], 8192, Flags::NONE).unwrap();
    h.flush(Flags::NONE).unwrap();
    let on_disk = std::fs::read(&disk).unwrap();
    assert!(on_disk[8192..12288].iter().all(|&b| b == 0x5a));
    assert!(on_disk[..8192].iter().all(|&b| b == 0));
    assert_eq!(read(&*h, 8190, 4), [0, 0, 0x5a, 0x5a]);
    h.trim(4096, 8192, Flags::NONE).unwrap();
}

#[test]
fn file_plugin_dir_lists_exports_and_opens_by_export_name() {
    let Some(path) = debian_plugin("file") else {
        return;
    };
    let dir = scratch_path("exports");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("one"), vec![1u8; 512]).unwrap();
    std::fs::write(dir.join("two"), vec![2u8; 1024]).unwrap();
    let plugin = load(&path, &[kv("dir", dir.to_str().unwrap())]).unwrap();
    let mut names: Vec<String> = plugin
        .list_exports(false, false)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    names.sort();
    assert_eq!(names, ["one", "two"]);
    let h = open(&plugin, "two");
    assert_eq!(h.get_size().unwrap(), 1024);
    assert_eq!(read(&*h, 0, 2), [2, 2]);
}

#[test]
fn null_plugin_reads_zeroes() {
    let Some(path) = debian_plugin("null") else {
        return;
    };
    let plugin = load(&path, &[kv("size", "1M")]).unwrap();
    let h = open(&plugin, "");
    assert_eq!(h.get_size().unwrap(), 1 << 20);
    assert_eq!(read(&*h, 4096, 4096), vec![0u8; 4096]);
    h.pwrite(&[9u8; 512], 0, Flags::NONE).unwrap();
    assert_eq!(read(&*h, 0, 512), vec![0u8; 512]);
}

#[test]
fn pattern_plugin_reads_offsets() {
    let Some(path) = debian_plugin("pattern") else {
        return;
    };
    let plugin = load(&path, &[bare("1M")]).unwrap();
    let h = open(&plugin, "");
    assert!(!h.can_write().unwrap());
    let buf = read(&*h, 8, 16);
    assert_eq!(&buf[..8], &8u64.to_be_bytes());
    assert_eq!(&buf[8..], &16u64.to_be_bytes());
}

#[test]
fn data_plugin_serves_inline_data() {
    let Some(path) = debian_plugin("data") else {
        return;
    };
    let plugin = load(&path, &[bare("1 2 3 @512 0x55 0xaa")]).unwrap();
    let h = open(&plugin, "");
    assert_eq!(h.get_size().unwrap(), 514);
    assert_eq!(read(&*h, 0, 4), [1, 2, 3, 0]);
    assert_eq!(read(&*h, 512, 2), [0x55, 0xaa]);
}

#[test]
fn full_plugin_fails_writes_with_enospc() {
    let Some(path) = debian_plugin("full") else {
        return;
    };
    let plugin = load(&path, &[bare("64K")]).unwrap();
    let h = open(&plugin, "");
    let err = h.pwrite(&[1u8; 512], 0, Flags::NONE).unwrap_err();
    assert_eq!(err.errno, Errno::ENOSPC);
    assert_eq!(read(&*h, 0, 512), vec![0u8; 512]);
}

#[test]
fn zero_plugin_is_empty_and_refuses_parameters() {
    let Some(path) = debian_plugin("zero") else {
        return;
    };
    let plugin = load(&path, &[]).unwrap();
    assert_eq!(open(&plugin, "").get_size().unwrap(), 0);
    let err = load(&path, &[kv("size", "1M")]).err().unwrap();
    assert!(matches!(err, LoadError::NoConfig { .. }), "{err}");
}

#[test]
fn random_plugin_is_deterministic_per_seed() {
    let Some(path) = debian_plugin("random") else {
        return;
    };
    let plugin = load(&path, &[bare("1M"), kv("seed", "42")]).unwrap();
    let h = open(&plugin, "");
    let a = read(&*h, 4096, 4096);
    assert_eq!(read(&*h, 4096, 4096), a);
    assert!(a.iter().any(|&b| b != 0));
}

#[test]
fn sparse_random_plugin_verifies_writes() {
    let Some(path) = debian_plugin("sparse-random") else {
        return;
    };
    let plugin = load(&path, &[bare("16M"), kv("seed", "1")]).unwrap();
    assert_eq!(plugin.name(), "sparse-random");
    let h = open(&plugin, "");
    let mut e = Extents::new(0, 16 << 20);
    h.extents(16 << 20, 0, Flags::NONE, &mut e).unwrap();
    assert!(!e.is_empty());
    // Writing back what was read succeeds; writing something else is EIO.
    let block = read(&*h, 0, 65536);
    h.pwrite(&block, 0, Flags::NONE).unwrap();
    let changed: Vec<u8> = block.iter().map(|b| !b).collect();
    assert_eq!(
        h.pwrite(&changed, 0, Flags::NONE).unwrap_err().errno,
        Errno::EIO
    );
}

#[test]
fn info_plugin_serves_export_name() {
    let Some(path) = debian_plugin("info") else {
        return;
    };
    let plugin = load(&path, &[bare("exportname")]).unwrap();
    let h = open(&plugin, "hello-sluice");
    assert_eq!(h.get_size().unwrap(), 12);
    assert_eq!(read(&*h, 0, 12), b"hello-sluice");
}

#[test]
fn sh_plugin_runs_script() {
    let Some(path) = debian_plugin("sh") else {
        return;
    };
    let script = scratch_path("plugin.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n\
         case \"$1\" in\n\
           get_size) echo 1M ;;\n\
           pread) head -c \"$3\" /dev/zero | tr '\\0' 'x' ;;\n\
           can_write) exit 3 ;;\n\
           *) exit 2 ;;\n\
         esac\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let plugin = load(&path, &[bare(script.to_str().unwrap())]).unwrap();
    let h = open(&plugin, "");
    assert_eq!(h.get_size().unwrap(), 1 << 20);
    assert!(!h.can_write().unwrap());
    assert_eq!(read(&*h, 100, 8), b"xxxxxxxx");
}

#[test]
fn eval_plugin_runs_inline_scripts() {
    let Some(path) = debian_plugin("eval") else {
        return;
    };
    let plugin = load(
        &path,
        &[
            kv("get_size", "echo 65536"),
            kv("pread", "head -c \"$3\" /dev/zero | tr '\\0' 'y'"),
        ],
    )
    .unwrap();
    let h = open(&plugin, "");
    assert_eq!(h.get_size().unwrap(), 65536);
    assert_eq!(read(&*h, 0, 4), b"yyyy");
}

#[test]
fn python_plugin_runs_script_given_as_first_bare_parameter() {
    let Some(path) = debian_plugin("python") else {
        return;
    };
    let script = scratch_path("plugin.py");
    std::fs::write(
        &script,
        "import errno\n\
         import nbdkit\n\
         API_VERSION = 2\n\
         disk = bytearray(1024 * 1024)\n\
         def open(readonly):\n    return 1\n\
         def get_size(h):\n    return len(disk)\n\
         def pread(h, buf, offset, flags):\n    buf[:] = disk[offset:offset + len(buf)]\n\
         def pwrite(h, buf, offset, flags):\n\
         \x20   if offset >= 512 * 1024:\n\
         \x20       nbdkit.set_error(errno.ENOSPC)\n\
         \x20       raise Exception('upper half is full')\n\
         \x20   disk[offset:offset + len(buf)] = buf\n",
    )
    .unwrap();
    // No magic_config_key: the first bare parameter is config("script", ...).
    let plugin = load(&path, &[bare(script.to_str().unwrap())]).unwrap();
    let h = open(&plugin, "");
    assert_eq!(h.get_size().unwrap(), 1 << 20);
    h.pwrite(b"from python", 100, Flags::NONE).unwrap();
    assert_eq!(read(&*h, 100, 11), b"from python");
    let err = h.pwrite(&[1u8; 512], 600 * 1024, Flags::NONE).unwrap_err();
    assert_eq!(err.errno, Errno::ENOSPC);
    assert!(
        err.message.contains("upper half is full"),
        "{}",
        err.message
    );
}
