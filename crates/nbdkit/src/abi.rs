//! The C data types of nbdkit's plugin ABI, byte for byte.
//!
//! `struct nbdkit_plugin` is the one contract between a plugin `.so` and its host. Fields are
//! only ever appended (the header promises it), so a host keeps one struct with the newest
//! layout it knows, zeroes it, and copies `min(_struct_size, ours)` bytes of the plugin's:
//! an older plugin then reads as NULL in the slots it lacks. The names here are the API v2
//! ones (nbdkit's own server compiles with v2); v1 plugins put their flag-less data callbacks
//! in the `_*_v1` slots at offsets 144..176. Offsets were measured with gcc on x86_64 and are
//! asserted below, so a change of this file that moves a field fails to compile.

use std::ffi::{c_char, c_int, c_void};
use std::mem::offset_of;

/// `void *` per-connection handle returned by `open`.
pub type CHandle = *mut c_void;

/// Opaque to plugins; on our side a pointer to [`sluice_block::Extents`].
#[repr(C)]
pub struct NbdkitExtentsOpaque {
    _private: [u8; 0],
}

/// Opaque to plugins; on our side a pointer to `ExportList` (api::lists).
#[repr(C)]
pub struct NbdkitExportsOpaque {
    _private: [u8; 0],
}

/// `struct nbdkit_plugin` (nbdkit 1.32 `nbdkit-plugin.h`), with API v2 names.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NbdkitPlugin {
    /// offset 0
    pub _struct_size: u64,
    /// offset 8
    pub _api_version: c_int,
    /// offset 12
    pub _thread_model: c_int,
    /// offset 16
    pub name: *const c_char,
    /// offset 24
    pub longname: *const c_char,
    /// offset 32
    pub version: *const c_char,
    /// offset 40
    pub description: *const c_char,
    /// offset 48
    pub load: Option<unsafe extern "C" fn()>,
    /// offset 56
    pub unload: Option<unsafe extern "C" fn()>,
    /// offset 64
    pub config: Option<unsafe extern "C" fn(*const c_char, *const c_char) -> c_int>,
    /// offset 72
    pub config_complete: Option<unsafe extern "C" fn() -> c_int>,
    /// offset 80
    pub config_help: *const c_char,
    /// offset 88
    pub open: Option<unsafe extern "C" fn(c_int) -> CHandle>,
    /// offset 96
    pub close: Option<unsafe extern "C" fn(CHandle)>,
    /// offset 104
    pub get_size: Option<unsafe extern "C" fn(CHandle) -> i64>,
    /// offset 112
    pub can_write: Option<unsafe extern "C" fn(CHandle) -> c_int>,
    /// offset 120
    pub can_flush: Option<unsafe extern "C" fn(CHandle) -> c_int>,
    /// offset 128
    pub is_rotational: Option<unsafe extern "C" fn(CHandle) -> c_int>,
    /// offset 136
    pub can_trim: Option<unsafe extern "C" fn(CHandle) -> c_int>,
    /// offset 144: v1 `pread`
    pub _pread_v1: Option<unsafe extern "C" fn(CHandle, *mut c_void, u32, u64) -> c_int>,
    /// offset 152: v1 `pwrite`
    pub _pwrite_v1: Option<unsafe extern "C" fn(CHandle, *const c_void, u32, u64) -> c_int>,
    /// offset 160: v1 `flush`
    pub _flush_v1: Option<unsafe extern "C" fn(CHandle) -> c_int>,
    /// offset 168: v1 `trim`
    pub _trim_v1: Option<unsafe extern "C" fn(CHandle, u32, u64) -> c_int>,
    /// offset 176: v1 `zero(h, count, offset, may_trim)`
    pub _zero_v1: Option<unsafe extern "C" fn(CHandle, u32, u64, c_int) -> c_int>,
    /// offset 184 (+4 bytes padding)
    pub errno_is_preserved: c_int,
    /// offset 192
    pub dump_plugin: Option<unsafe extern "C" fn()>,
    /// offset 200
    pub can_zero: Option<unsafe extern "C" fn(CHandle) -> c_int>,
    /// offset 208
    pub can_fua: Option<unsafe extern "C" fn(CHandle) -> c_int>,
    /// offset 216: v2 only (`_unused1` in v1)
    pub pread: Option<unsafe extern "C" fn(CHandle, *mut c_void, u32, u64, u32) -> c_int>,
    /// offset 224
    pub pwrite: Option<unsafe extern "C" fn(CHandle, *const c_void, u32, u64, u32) -> c_int>,
    /// offset 232
    pub flush: Option<unsafe extern "C" fn(CHandle, u32) -> c_int>,
    /// offset 240
    pub trim: Option<unsafe extern "C" fn(CHandle, u32, u64, u32) -> c_int>,
    /// offset 248
    pub zero: Option<unsafe extern "C" fn(CHandle, u32, u64, u32) -> c_int>,
    /// offset 256
    pub magic_config_key: *const c_char,
    /// offset 264
    pub can_multi_conn: Option<unsafe extern "C" fn(CHandle) -> c_int>,
    /// offset 272
    pub can_extents: Option<unsafe extern "C" fn(CHandle) -> c_int>,
    /// offset 280
    pub extents:
        Option<unsafe extern "C" fn(CHandle, u32, u64, u32, *mut NbdkitExtentsOpaque) -> c_int>,
    /// offset 288
    pub can_cache: Option<unsafe extern "C" fn(CHandle) -> c_int>,
    /// offset 296
    pub cache: Option<unsafe extern "C" fn(CHandle, u32, u64, u32) -> c_int>,
    /// offset 304
    pub thread_model: Option<unsafe extern "C" fn() -> c_int>,
    /// offset 312
    pub can_fast_zero: Option<unsafe extern "C" fn(CHandle) -> c_int>,
    /// offset 320
    pub preconnect: Option<unsafe extern "C" fn(c_int) -> c_int>,
    /// offset 328
    pub get_ready: Option<unsafe extern "C" fn() -> c_int>,
    /// offset 336
    pub after_fork: Option<unsafe extern "C" fn() -> c_int>,
    /// offset 344
    pub list_exports: Option<unsafe extern "C" fn(c_int, c_int, *mut NbdkitExportsOpaque) -> c_int>,
    /// offset 352
    pub default_export: Option<unsafe extern "C" fn(c_int, c_int) -> *const c_char>,
    /// offset 360
    pub export_description: Option<unsafe extern "C" fn(CHandle) -> *const c_char>,
    /// offset 368
    pub cleanup: Option<unsafe extern "C" fn()>,
    /// offset 376
    pub block_size: Option<unsafe extern "C" fn(CHandle, *mut u32, *mut u32, *mut u32) -> c_int>,
}

/// `sizeof (struct nbdkit_plugin)` in nbdkit 1.32 on x86_64.
pub const PLUGIN_STRUCT_SIZE: usize = 384;

const _: () = assert!(std::mem::size_of::<NbdkitPlugin>() == PLUGIN_STRUCT_SIZE);
const _: () = assert!(offset_of!(NbdkitPlugin, name) == 16);
const _: () = assert!(offset_of!(NbdkitPlugin, open) == 88);
const _: () = assert!(offset_of!(NbdkitPlugin, _pread_v1) == 144);
const _: () = assert!(offset_of!(NbdkitPlugin, _zero_v1) == 176);
const _: () = assert!(offset_of!(NbdkitPlugin, errno_is_preserved) == 184);
const _: () = assert!(offset_of!(NbdkitPlugin, dump_plugin) == 192);
const _: () = assert!(offset_of!(NbdkitPlugin, pread) == 216);
const _: () = assert!(offset_of!(NbdkitPlugin, zero) == 248);
const _: () = assert!(offset_of!(NbdkitPlugin, magic_config_key) == 256);
const _: () = assert!(offset_of!(NbdkitPlugin, extents) == 280);
const _: () = assert!(offset_of!(NbdkitPlugin, thread_model) == 304);
const _: () = assert!(offset_of!(NbdkitPlugin, list_exports) == 344);
const _: () = assert!(offset_of!(NbdkitPlugin, cleanup) == 368);
const _: () = assert!(offset_of!(NbdkitPlugin, block_size) == 376);

impl NbdkitPlugin {
    /// An all-NULL struct, the starting point of the `_struct_size` copy.
    pub fn zeroed() -> NbdkitPlugin {
        // SAFETY: every field is an integer, a raw pointer or an `Option` of a function
        // pointer, for all of which the all-zero bit pattern is valid (0 / NULL / None).
        unsafe { std::mem::zeroed() }
    }

    /// The `has_FIELD=1` lines of `--dump-plugin`, in nbdkit's order.
    pub fn present_fields(&self) -> Vec<&'static str> {
        let p = self;
        let fields: &[(&'static str, bool)] = &[
            ("longname", !p.longname.is_null()),
            ("description", !p.description.is_null()),
            ("load", p.load.is_some()),
            ("unload", p.unload.is_some()),
            ("dump_plugin", p.dump_plugin.is_some()),
            ("config", p.config.is_some()),
            ("config_complete", p.config_complete.is_some()),
            ("config_help", !p.config_help.is_null()),
            ("thread_model", p.thread_model.is_some()),
            ("get_ready", p.get_ready.is_some()),
            ("after_fork", p.after_fork.is_some()),
            ("cleanup", p.cleanup.is_some()),
            ("preconnect", p.preconnect.is_some()),
            ("list_exports", p.list_exports.is_some()),
            ("default_export", p.default_export.is_some()),
            ("open", p.open.is_some()),
            ("close", p.close.is_some()),
            ("export_description", p.export_description.is_some()),
            ("get_size", p.get_size.is_some()),
            ("block_size", p.block_size.is_some()),
            ("can_write", p.can_write.is_some()),
            ("can_flush", p.can_flush.is_some()),
            ("is_rotational", p.is_rotational.is_some()),
            ("can_trim", p.can_trim.is_some()),
            ("can_zero", p.can_zero.is_some()),
            ("can_fast_zero", p.can_fast_zero.is_some()),
            ("can_extents", p.can_extents.is_some()),
            ("can_fua", p.can_fua.is_some()),
            ("can_multi_conn", p.can_multi_conn.is_some()),
            ("can_cache", p.can_cache.is_some()),
            ("pread", p.pread.is_some()),
            ("pwrite", p.pwrite.is_some()),
            ("flush", p.flush.is_some()),
            ("trim", p.trim.is_some()),
            ("zero", p.zero.is_some()),
            ("extents", p.extents.is_some()),
            ("cache", p.cache.is_some()),
            ("_pread_v1", p._pread_v1.is_some()),
            ("_pwrite_v1", p._pwrite_v1.is_some()),
            ("_flush_v1", p._flush_v1.is_some()),
            ("_trim_v1", p._trim_v1.is_some()),
            ("_zero_v1", p._zero_v1.is_some()),
        ];
        fields
            .iter()
            .filter(|(_, present)| *present)
            .map(|(name, _)| *name)
            .collect()
    }
}

/// `struct nbdkit_extent` (filter API), returned by value from `nbdkit_get_extent`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct NbdkitExtent {
    pub offset: u64,
    pub length: u64,
    pub r#type: u32,
}

/// `struct nbdkit_export` (filter API), returned by value from `nbdkit_get_export`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct NbdkitExport {
    pub name: *mut c_char,
    pub description: *mut c_char,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_struct_has_no_fields() {
        assert!(NbdkitPlugin::zeroed().present_fields().is_empty());
    }
}
