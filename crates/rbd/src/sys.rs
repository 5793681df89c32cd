//! The part of librados' and librbd's C API this crate uses, loaded at run time.
//!
//! **Why loaded, not linked.** Linking `-lrbd -lrados` into the `sluice` binary makes every
//! start of it load ~30 C++ libraries and run their static constructors: measured here, an
//! empty C program took 35 ms to start with them linked against 2 ms without. sluice is
//! started for every `--run` command, every test and every daemon, and most of them never
//! touch Ceph; qemu makes the same choice (its rbd driver is a module loaded on first use).
//! So the two libraries are opened with `dlopen` by their stable sonames (`librados.so.2`,
//! `librbd.so.1`, whose C ABI Ceph keeps compatible) when an `rbd` export is first
//! configured, and a machine without Ceph's libraries gets one clear error instead of a
//! binary that does not start. It also means building needs neither librbd-dev nor libclang.
//!
//! **Why hand-written, not a `-sys` crate or bindgen.** On crates.io, `ceph` (3.2) binds
//! librados only, `librbd-sys` (0.1.0) is an unmaintained 2016 bindgen dump, and `rbd-sys`
//! (0.1.0) needs Rust 1.88 (the workspace supports 1.80) and links at build time. bindgen
//! would need libclang at build time for the ~25 functions used here. The declarations below
//! are copied from `rados/librados.h` and `rbd/librbd.h` (Ceph 16, pacific); every one of
//! these functions has kept its signature since Ceph 13.
//!
//! Each library is opened once per process and never closed (unloading C++ libraries with
//! static state and threads is not safe).

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

/// `rados_t`: a cluster handle.
pub type RadosT = *mut c_void;
/// `rados_ioctx_t`: a pool (and namespace) context.
pub type IoCtxT = *mut c_void;
/// `rbd_image_t`: an open image.
pub type ImageT = *mut c_void;
/// `rbd_completion_t`: one asynchronous request's completion.
pub type CompletionT = *mut c_void;
/// `rbd_callback_t`.
pub type CallbackT = Option<unsafe extern "C" fn(CompletionT, *mut c_void)>;
/// The callback of `rbd_diff_iterate2`: (offset, length, exists, arg).
pub type DiffCallbackT = unsafe extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int;

/// `LIBRADOS_OP_FLAG_FADVISE_FUA`: the write is durable before it completes.
pub const OP_FLAG_FADVISE_FUA: c_int = 0x80;
/// `RBD_WRITE_ZEROES_FLAG_THICK_PROVISION`: zero by writing, leaving the range allocated.
pub const WRITE_ZEROES_FLAG_THICK_PROVISION: c_int = 1;

/// `RBD_FEATURE_*` bits reported by `rbd_get_features`.
pub const FEATURE_LAYERING: u64 = 1 << 0;
pub const FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;
pub const FEATURE_OBJECT_MAP: u64 = 1 << 3;
pub const FEATURE_FAST_DIFF: u64 = 1 << 4;
pub const FEATURE_JOURNALING: u64 = 1 << 6;

/// `rbd_lock_mode_t`: `RBD_LOCK_MODE_EXCLUSIVE` (the only mode used here).
pub const LOCK_MODE_EXCLUSIVE: c_int = 0;

/// `rbd_image_info_t` (the deprecated name fields are kept for the layout only).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ImageInfo {
    pub size: u64,
    pub obj_size: u64,
    pub num_objs: u64,
    pub order: c_int,
    pub block_name_prefix: [c_char; 24],
    pub parent_pool: i64,
    pub parent_name: [c_char; 96],
}

/// `rbd_config_option_t`.
#[repr(C)]
#[derive(Debug)]
pub struct ConfigOption {
    pub name: *mut c_char,
    pub value: *mut c_char,
    /// `rbd_config_source_t`: 0 client config, 1 pool, 2 image.
    pub source: c_int,
}

macro_rules! api {
    ($( $lib:ident: fn $name:ident($($arg:ident: $t:ty),* $(,)?) $(-> $ret:ty)?; )*) => {
        /// The functions, resolved from the two libraries.
        #[allow(non_snake_case)]
        pub struct Api {
            $( pub $name: unsafe extern "C" fn($($t),*) $(-> $ret)?, )*
        }

        impl Api {
            /// Resolves every symbol.
            ///
            /// # Safety
            /// `rados` and `rbd` must be live handles from `dlopen` of librados and librbd,
            /// whose symbols have the C signatures declared here.
            unsafe fn resolve(rados: *mut c_void, rbd: *mut c_void) -> Result<Api, String> {
                Ok(Api {
                    $( $name: {
                        let lib = match stringify!($lib) { "rados" => rados, _ => rbd };
                        let name = concat!(stringify!($name), "\0");
                        // SAFETY: `lib` is a live dlopen handle and `name` is NUL-terminated.
                        let p = unsafe { libc::dlsym(lib, name.as_ptr().cast()) };
                        if p.is_null() {
                            return Err(format!("symbol {} not found", stringify!($name)));
                        }
                        // SAFETY: the symbol is the C function of this name, whose signature
                        // is the one declared (copied from Ceph's headers).
                        unsafe {
                            std::mem::transmute::<*mut c_void,
                                unsafe extern "C" fn($($t),*) $(-> $ret)?>(p)
                        }
                    }, )*
                })
            }
        }
    };
}

api! {
    rados: fn rados_version(major: *mut c_int, minor: *mut c_int, extra: *mut c_int);
    rados: fn rados_create2(cluster: *mut RadosT, cluster_name: *const c_char,
                            name: *const c_char, flags: u64) -> c_int;
    rados: fn rados_conf_read_file(cluster: RadosT, path: *const c_char) -> c_int;
    rados: fn rados_conf_set(cluster: RadosT, option: *const c_char,
                             value: *const c_char) -> c_int;
    rados: fn rados_conf_get(cluster: RadosT, option: *const c_char, buf: *mut c_char,
                             len: usize) -> c_int;
    rados: fn rados_connect(cluster: RadosT) -> c_int;
    rados: fn rados_shutdown(cluster: RadosT);
    rados: fn rados_ioctx_create(cluster: RadosT, pool: *const c_char,
                                 io: *mut IoCtxT) -> c_int;
    rados: fn rados_ioctx_destroy(io: IoCtxT);
    rados: fn rados_ioctx_set_namespace(io: IoCtxT, nspace: *const c_char);

    rbd: fn rbd_version(major: *mut c_int, minor: *mut c_int, extra: *mut c_int);
    rbd: fn rbd_open(io: IoCtxT, name: *const c_char, image: *mut ImageT,
                     snap_name: *const c_char) -> c_int;
    rbd: fn rbd_open_read_only(io: IoCtxT, name: *const c_char, image: *mut ImageT,
                               snap_name: *const c_char) -> c_int;
    rbd: fn rbd_close(image: ImageT) -> c_int;
    rbd: fn rbd_get_size(image: ImageT, size: *mut u64) -> c_int;
    rbd: fn rbd_stat(image: ImageT, info: *mut ImageInfo, info_size: usize) -> c_int;
    rbd: fn rbd_get_features(image: ImageT, features: *mut u64) -> c_int;
    rbd: fn rbd_config_image_list(image: ImageT, options: *mut ConfigOption,
                                  max_options: *mut c_int) -> c_int;
    rbd: fn rbd_config_image_list_cleanup(options: *mut ConfigOption, max_options: c_int);
    rbd: fn rbd_aio_create_completion(cb_arg: *mut c_void, complete_cb: CallbackT,
                                      c: *mut CompletionT) -> c_int;
    rbd: fn rbd_aio_wait_for_complete(c: CompletionT) -> c_int;
    rbd: fn rbd_aio_get_return_value(c: CompletionT) -> isize;
    rbd: fn rbd_aio_release(c: CompletionT);
    rbd: fn rbd_aio_read2(image: ImageT, off: u64, len: usize, buf: *mut c_char,
                          c: CompletionT, op_flags: c_int) -> c_int;
    rbd: fn rbd_aio_write2(image: ImageT, off: u64, len: usize, buf: *const c_char,
                           c: CompletionT, op_flags: c_int) -> c_int;
    rbd: fn rbd_aio_discard(image: ImageT, off: u64, len: u64, c: CompletionT) -> c_int;
    rbd: fn rbd_aio_write_zeroes(image: ImageT, off: u64, len: usize, c: CompletionT,
                                 zero_flags: c_int, op_flags: c_int) -> c_int;
    rbd: fn rbd_aio_flush(image: ImageT, c: CompletionT) -> c_int;
    rbd: fn rbd_lock_acquire(image: ImageT, lock_mode: c_int) -> c_int;
    rbd: fn rbd_lock_release(image: ImageT) -> c_int;
    rbd: fn rbd_is_exclusive_lock_owner(image: ImageT, is_owner: *mut c_int) -> c_int;
    rbd: fn rbd_lock_get_owners(image: ImageT, lock_mode: *mut c_int,
                                lock_owners: *mut *mut c_char,
                                max_lock_owners: *mut usize) -> c_int;
    rbd: fn rbd_lock_get_owners_cleanup(lock_owners: *mut *mut c_char, count: usize);
    rbd: fn rbd_lock_break(image: ImageT, lock_mode: c_int, lock_owner: *const c_char) -> c_int;
    rbd: fn rbd_diff_iterate2(image: ImageT, from_snap: *const c_char, ofs: u64, len: u64,
                              include_parent: u8, whole_object: u8, cb: DiffCallbackT,
                              arg: *mut c_void) -> c_int;
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").finish_non_exhaustive()
    }
}

/// The sonames opened (the C ABI versions this code is written against).
pub const LIBRADOS: &str = "librados.so.2";
pub const LIBRBD: &str = "librbd.so.1";

/// The loaded API, or why it could not be loaded (the same answer for the whole process).
pub fn api() -> Result<&'static Api, String> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| {
        let rados = open(c"librados.so.2", LIBRADOS)?;
        let rbd = open(c"librbd.so.1", LIBRBD)?;
        // SAFETY: both handles come from dlopen of the libraries the declarations are for,
        // and are never closed.
        unsafe { Api::resolve(rados, rbd) }.map_err(|e| format!("{LIBRBD}: {e}"))
    })
    .as_ref()
    .map_err(Clone::clone)
}

fn open(soname: &CStr, name: &str) -> Result<*mut c_void, String> {
    // SAFETY: `soname` is NUL-terminated; RTLD_NOW resolves everything up front so a broken
    // installation fails here rather than at the first call.
    let h = unsafe { libc::dlopen(soname.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if h.is_null() {
        // SAFETY: dlerror returns a thread-local string describing the last dlopen failure
        // (or null), valid until the next dl* call on this thread.
        let why = unsafe {
            let e = libc::dlerror();
            if e.is_null() {
                "dlopen failed".to_string()
            } else {
                CStr::from_ptr(e).to_string_lossy().into_owned()
            }
        };
        return Err(format!("cannot load {name} ({why})"));
    }
    Ok(h)
}

/// librbd's version as `major.minor.extra` (the C API's version, 1.16.0 for Ceph 16).
pub fn librbd_version(api: &Api) -> String {
    let (mut a, mut b, mut c) = (0, 0, 0);
    // SAFETY: rbd_version writes three ints through valid pointers.
    unsafe { (api.rbd_version)(&mut a, &mut b, &mut c) };
    format!("{a}.{b}.{c}")
}

/// librados' version as `major.minor.extra`.
pub fn librados_version(api: &Api) -> String {
    let (mut a, mut b, mut c) = (0, 0, 0);
    // SAFETY: rados_version writes three ints through valid pointers.
    unsafe { (api.rados_version)(&mut a, &mut b, &mut c) };
    format!("{a}.{b}.{c}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_info_layout_matches_the_c_struct() {
        // As gcc lays it out on LP64 (checked against <rbd/librbd.h>): 3 * u64, an int, 24
        // chars, 4 bytes of padding, an i64, 96 chars.
        assert_eq!(std::mem::size_of::<ImageInfo>(), 160);
        assert_eq!(std::mem::offset_of!(ImageInfo, parent_pool), 56);
        assert_eq!(std::mem::size_of::<ConfigOption>(), 24);
    }

    #[test]
    fn api_resolves_every_symbol_of_the_installed_librbd() {
        // librbd1 is a test dependency (scripts/test.sh installs it).
        let api = api().unwrap();
        assert!(
            librbd_version(api).starts_with("1."),
            "{}",
            librbd_version(api)
        );
        assert!(!librados_version(api).is_empty());
    }

    #[test]
    fn open_missing_library_names_it() {
        let err = open(c"libno-such-rbd.so.9", "libno-such-rbd.so.9").unwrap_err();
        assert!(
            err.starts_with("cannot load libno-such-rbd.so.9 ("),
            "{err}"
        );
    }
}
