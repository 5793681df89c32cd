//! The part of libext2fs' C API the ext2 filter uses, loaded at run time, and the C structs
//! it shares with the library.
//!
//! **Why loaded, not linked.** `cargo run` must build on a Debian machine with nothing extra
//! installed, and libext2fs' headers (libext2fs-dev, comerr-dev) are not there by default,
//! while its runtime library (`libext2fs.so.2`, package libext2fs2, which e2fsprogs needs and
//! Debian never leaves out) always is. So nothing here is generated from headers: the few
//! functions are declared by hand, exactly as e2fsprogs 1.47's `ext2fs/ext2fs.h` declares
//! them, and the library is opened with `dlopen` (libloading) by its soname the first time an
//! ext2 filter is configured. A machine without it gets one error naming the library and
//! the package, not a binary that does not start. `libcom_err.so.2` (a dependency of
//! libext2fs, so always present with it) is opened the same way for `error_message`, which
//! turns libext2fs' error codes into the texts e2fsprogs' tools print.
//!
//! **The structs.** An I/O manager is a `struct struct_io_manager` of callbacks that the
//! library calls with a `struct struct_io_channel` the manager allocated; both are declared
//! below as `#[repr(C)]` types with the field order, types and padding of e2fsprogs 1.47's
//! `ext2fs/ext2_io.h` (libext2fs.so.2's ABI, which e2fsprogs extends only by using the
//! `reserved` words at the end). `struct ext2_inode` (the 128-byte on-disk inode of
//! `ext2fs/ext2_fs.h`) is read to check that a path is a regular file. The layout test at
//! the end checks every size and offset against numbers taken from gcc.
//!
//! The libraries are opened once per process and never closed.

use std::ffi::{c_char, c_int, c_long, c_uint, c_ulong, c_ulonglong, c_void, CStr};
use std::sync::{Mutex, OnceLock, PoisonError};

use libloading::Library;

/// `errcode_t` (com_err's `long`): 0, an errno value, or an error table's code.
pub type Errcode = c_long;
/// `ext2_ino_t`: an inode number.
pub type Ino = u32;
/// `ext2_filsys`: an open filesystem (opaque here).
pub type Filsys = *mut c_void;
/// `ext2_file_t`: an open file (opaque).
pub type File = *mut c_void;
/// `io_channel`.
pub type Channel = *mut IoChannel;

/// `EXT2_ET_BASE`: the first code of libext2fs' error table; codes below it are errno values.
pub const ET_BASE: Errcode = 2133571328;
/// `EXT2_ET_MAGIC_IO_CHANNEL`: the magic of a `struct_io_channel`.
pub const ET_MAGIC_IO_CHANNEL: Errcode = 2133571333;
/// `EXT2_ET_MAGIC_IO_MANAGER`: the magic of a `struct_io_manager`.
pub const ET_MAGIC_IO_MANAGER: Errcode = 2133571335;
/// `EXT2_ET_BAD_MAGIC`: "Bad magic number in super-block" (not an ext2/3/4 filesystem).
pub const ET_BAD_MAGIC: Errcode = 2133571347;
/// `EXT2_ET_RO_FILSYS`: "Attempt to write to filesystem opened read-only".
pub const ET_RO_FILSYS: Errcode = 2133571349;
/// `EXT2_ET_SHORT_READ`: "Attempt to read block from filesystem resulted in short read".
pub const ET_SHORT_READ: Errcode = 2133571364;
/// `EXT2_ET_SHORT_WRITE`: "Attempt to write block to filesystem resulted in short write".
pub const ET_SHORT_WRITE: Errcode = 2133571365;
/// `EXT2_ET_DIR_NO_SPACE`: "No free space in the directory".
pub const ET_DIR_NO_SPACE: Errcode = 2133571366;
/// `EXT2_ET_BAD_DEVICE_NAME`: "Illegal or malformed device name".
pub const ET_BAD_DEVICE_NAME: Errcode = 2133571386;
/// `EXT2_ET_NO_MEMORY`: "Memory allocation failed".
pub const ET_NO_MEMORY: Errcode = 2133571398;
/// `EXT2_ET_INVALID_ARGUMENT`: "Invalid argument passed to ext2 library".
pub const ET_INVALID_ARGUMENT: Errcode = 2133571399;
/// `EXT2_ET_BLOCK_ALLOC_FAIL`: "Could not allocate block in ext2 filesystem".
pub const ET_BLOCK_ALLOC_FAIL: Errcode = 2133571400;
/// `EXT2_ET_INODE_ALLOC_FAIL`: "Could not allocate inode in ext2 filesystem".
pub const ET_INODE_ALLOC_FAIL: Errcode = 2133571401;
/// `EXT2_ET_FILE_NOT_FOUND`: "File not found by ext2_lookup".
pub const ET_FILE_NOT_FOUND: Errcode = 2133571404;
/// `EXT2_ET_FILE_RO`: "File open read-only".
pub const ET_FILE_RO: Errcode = 2133571405;
/// `EXT2_ET_UNIMPLEMENTED`: "Unimplemented ext2 library function" (what an I/O manager
/// answers for an optional operation it cannot do, so the library falls back).
pub const ET_UNIMPLEMENTED: Errcode = 2133571408;
/// `EXT2_ET_FILE_TOO_BIG`: "File too big".
pub const ET_FILE_TOO_BIG: Errcode = 2133571410;
/// `EXT2_ET_OP_NOT_SUPPORTED`: "Operation not supported for inodes containing extents".
pub const ET_OP_NOT_SUPPORTED: Errcode = 2133571457;

/// `EXT2_FLAG_RW`: open the filesystem for writing.
pub const FLAG_RW: c_int = 0x01;
/// `EXT2_FLAG_64BITS`: use 64-bit bitmaps (needed for filesystems with the 64bit feature,
/// which mke2fs sets for ext4 by default).
pub const FLAG_64BITS: c_int = 0x20000;
/// `IO_FLAG_RW`: the channel is opened for writing.
pub const IO_FLAG_RW: c_int = 0x0001;
/// `EXT2_FILE_WRITE`: open a file for writing.
pub const FILE_WRITE: c_int = 0x0001;
/// `EXT2_SEEK_SET`.
pub const SEEK_SET: c_int = 0;
/// `EXT2_ROOT_INO`.
pub const ROOT_INO: Ino = 2;

/// `struct struct_io_channel`.
#[repr(C)]
// Every field is declared so that the struct has the C layout, whether Rust reads it or not.
#[allow(dead_code)]
pub struct IoChannel {
    pub magic: Errcode,
    pub manager: *mut IoManager,
    pub name: *mut c_char,
    pub block_size: c_int,
    pub read_error: Option<
        unsafe extern "C" fn(
            Channel,
            c_ulong,
            c_int,
            *mut c_void,
            usize,
            c_int,
            Errcode,
        ) -> Errcode,
    >,
    pub write_error: Option<
        unsafe extern "C" fn(
            Channel,
            c_ulong,
            c_int,
            *const c_void,
            usize,
            c_int,
            Errcode,
        ) -> Errcode,
    >,
    pub refcount: c_int,
    pub flags: c_int,
    pub reserved: [c_long; 14],
    pub private_data: *mut c_void,
    pub app_data: *mut c_void,
    pub align: c_int,
}

/// `struct struct_io_stats` (`num_fields` says how many of the counters are valid: 2).
#[repr(C)]
#[derive(Debug, Default)]
pub struct IoStats {
    pub num_fields: c_int,
    pub reserved: c_int,
    pub bytes_read: c_ulonglong,
    pub bytes_written: c_ulonglong,
}

/// `struct struct_io_manager`: the callbacks libext2fs calls to do I/O.
#[repr(C)]
// Every field is declared so that the struct has the C layout, whether Rust reads it or not.
#[allow(dead_code)]
pub struct IoManager {
    pub magic: Errcode,
    pub name: *const c_char,
    pub open: Option<unsafe extern "C" fn(*const c_char, c_int, *mut Channel) -> Errcode>,
    pub close: Option<unsafe extern "C" fn(Channel) -> Errcode>,
    pub set_blksize: Option<unsafe extern "C" fn(Channel, c_int) -> Errcode>,
    pub read_blk: Option<unsafe extern "C" fn(Channel, c_ulong, c_int, *mut c_void) -> Errcode>,
    pub write_blk: Option<unsafe extern "C" fn(Channel, c_ulong, c_int, *const c_void) -> Errcode>,
    pub flush: Option<unsafe extern "C" fn(Channel) -> Errcode>,
    pub write_byte: Option<unsafe extern "C" fn(Channel, c_ulong, c_int, *const c_void) -> Errcode>,
    pub set_option: Option<unsafe extern "C" fn(Channel, *const c_char, *const c_char) -> Errcode>,
    pub get_stats: Option<unsafe extern "C" fn(Channel, *mut *mut IoStats) -> Errcode>,
    pub read_blk64:
        Option<unsafe extern "C" fn(Channel, c_ulonglong, c_int, *mut c_void) -> Errcode>,
    pub write_blk64:
        Option<unsafe extern "C" fn(Channel, c_ulonglong, c_int, *const c_void) -> Errcode>,
    pub discard: Option<unsafe extern "C" fn(Channel, c_ulonglong, c_ulonglong) -> Errcode>,
    pub cache_readahead: Option<unsafe extern "C" fn(Channel, c_ulonglong, c_ulonglong) -> Errcode>,
    pub zeroout: Option<unsafe extern "C" fn(Channel, c_ulonglong, c_ulonglong) -> Errcode>,
    pub reserved: [c_long; 14],
}

/// `struct ext2_inode`: the 128-byte on-disk inode (only `i_mode` is used).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
// Every field is declared so that the struct has the C layout, whether Rust reads it or not.
#[allow(dead_code)]
pub struct Inode {
    pub i_mode: u16,
    pub i_uid: u16,
    pub i_size: u32,
    pub i_atime: u32,
    pub i_ctime: u32,
    pub i_mtime: u32,
    pub i_dtime: u32,
    pub i_gid: u16,
    pub i_links_count: u16,
    pub i_blocks: u32,
    pub i_flags: u32,
    pub osd1: u32,
    pub i_block: [u32; 15],
    pub i_generation: u32,
    pub i_file_acl: u32,
    pub i_size_high: u32,
    pub i_faddr: u32,
    /// The `osd2` union (Linux: blocks_hi, file_acl_high, uid_high, gid_high, checksum_lo,
    /// reserved).
    pub osd2: [u32; 3],
}

/// The functions used, resolved from libext2fs.so.2 and libcom_err.so.2.
pub struct Api {
    pub ext2fs_open: unsafe extern "C" fn(
        name: *const c_char,
        flags: c_int,
        superblock: c_int,
        block_size: c_uint,
        manager: *mut IoManager,
        ret_fs: *mut Filsys,
    ) -> Errcode,
    pub ext2fs_close: unsafe extern "C" fn(fs: Filsys) -> Errcode,
    pub ext2fs_namei: unsafe extern "C" fn(
        fs: Filsys,
        root: Ino,
        cwd: Ino,
        name: *const c_char,
        inode: *mut Ino,
    ) -> Errcode,
    pub ext2fs_read_inode: unsafe extern "C" fn(fs: Filsys, ino: Ino, inode: *mut Inode) -> Errcode,
    pub ext2fs_file_open2: unsafe extern "C" fn(
        fs: Filsys,
        ino: Ino,
        inode: *mut Inode,
        flags: c_int,
        ret: *mut File,
    ) -> Errcode,
    pub ext2fs_file_close: unsafe extern "C" fn(file: File) -> Errcode,
    pub ext2fs_file_flush: unsafe extern "C" fn(file: File) -> Errcode,
    pub ext2fs_file_get_lsize: unsafe extern "C" fn(file: File, ret_size: *mut u64) -> Errcode,
    pub ext2fs_file_llseek:
        unsafe extern "C" fn(file: File, offset: u64, whence: c_int, ret_pos: *mut u64) -> Errcode,
    pub ext2fs_file_read: unsafe extern "C" fn(
        file: File,
        buf: *mut c_void,
        wanted: c_uint,
        got: *mut c_uint,
    ) -> Errcode,
    pub ext2fs_file_write: unsafe extern "C" fn(
        file: File,
        buf: *const c_void,
        nbytes: c_uint,
        written: *mut c_uint,
    ) -> Errcode,
    pub ext2fs_get_library_version:
        unsafe extern "C" fn(ver: *mut *const c_char, date: *mut *const c_char) -> c_int,
    initialize_ext2_error_table: unsafe extern "C" fn(),
    error_message: unsafe extern "C" fn(code: Errcode) -> *const c_char,
    /// Serialises `error_message`, whose answer for an unknown code is a static buffer.
    messages: Mutex<()>,
    _libs: (Library, Library),
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").finish_non_exhaustive()
    }
}

/// The sonames opened (the C ABI versions this code is written against).
pub const LIBEXT2FS: &str = "libext2fs.so.2";
pub const LIBCOM_ERR: &str = "libcom_err.so.2";

/// The loaded API, or why it could not be loaded (the same answer for the whole process).
pub fn api() -> Result<&'static Api, String> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| load(LIBEXT2FS, LIBCOM_ERR))
        .as_ref()
        .map_err(Clone::clone)
}

/// Opens the two libraries by these sonames and resolves every function.
fn load(libext2fs: &str, libcom_err: &str) -> Result<Api, String> {
    let open = |soname: &str| {
        // SAFETY: both libraries are plain C libraries whose initialisers only register
        // error tables; loading them has no other side effect.
        unsafe { Library::new(soname) }.map_err(|e| {
            format!(
                "cannot load {soname} ({}): install e2fsprogs' runtime library \
                 (Debian: libext2fs2)",
                dl_reason(e)
            )
        })
    };
    let ext2fs = open(libext2fs)?;
    let com_err = open(libcom_err)?;
    // SAFETY: each symbol is the C function of its name in these libraries, whose signature
    // is the one declared in `Api` (copied from e2fsprogs 1.47's headers); the libraries are
    // moved into the `Api`, so they stay loaded as long as the pointers.
    let api = unsafe {
        Api {
            ext2fs_open: sym(&ext2fs, "ext2fs_open\0")?,
            ext2fs_close: sym(&ext2fs, "ext2fs_close\0")?,
            ext2fs_namei: sym(&ext2fs, "ext2fs_namei\0")?,
            ext2fs_read_inode: sym(&ext2fs, "ext2fs_read_inode\0")?,
            ext2fs_file_open2: sym(&ext2fs, "ext2fs_file_open2\0")?,
            ext2fs_file_close: sym(&ext2fs, "ext2fs_file_close\0")?,
            ext2fs_file_flush: sym(&ext2fs, "ext2fs_file_flush\0")?,
            ext2fs_file_get_lsize: sym(&ext2fs, "ext2fs_file_get_lsize\0")?,
            ext2fs_file_llseek: sym(&ext2fs, "ext2fs_file_llseek\0")?,
            ext2fs_file_read: sym(&ext2fs, "ext2fs_file_read\0")?,
            ext2fs_file_write: sym(&ext2fs, "ext2fs_file_write\0")?,
            ext2fs_get_library_version: sym(&ext2fs, "ext2fs_get_library_version\0")?,
            initialize_ext2_error_table: sym(&ext2fs, "initialize_ext2_error_table\0")?,
            error_message: sym(&com_err, "error_message\0")?,
            messages: Mutex::new(()),
            _libs: (ext2fs, com_err),
        }
    };
    // SAFETY: registers libext2fs' error table with com_err, as e2fsprogs' tools do at
    // start; only `api()` gets this far, once per process (inside its OnceLock).
    unsafe { (api.initialize_ext2_error_table)() };
    Ok(api)
}

/// The function `name` (NUL-terminated) of `lib`, as a function pointer of type `T`.
///
/// # Safety
/// `T` must be the symbol's C signature, and `lib` must outlive every use of the pointer.
unsafe fn sym<T: Copy>(lib: &Library, name: &str) -> Result<T, String> {
    // SAFETY: the caller vouches for the type; `name` ends with a NUL.
    let s = unsafe { lib.get::<T>(name.as_bytes()) };
    s.map(|s| *s)
        .map_err(|e| format!("{}: {}", name.trim_end_matches('\0'), dl_reason(e)))
}

/// libloading's error without its "(dlopen failed)" wrapping: dlerror's text.
fn dl_reason(e: libloading::Error) -> String {
    match e {
        libloading::Error::DlOpen { desc } | libloading::Error::DlSym { desc } => {
            format!("{desc:?}").trim_matches('"').to_string()
        }
        other => other.to_string(),
    }
}

impl Api {
    /// The text e2fsprogs prints for `code` ("Bad magic number in super-block", or the
    /// system's text for an errno value).
    pub fn message(&self, code: Errcode) -> String {
        let _g = self.messages.lock().unwrap_or_else(PoisonError::into_inner);
        // SAFETY: error_message returns a NUL-terminated string, static or in a static
        // buffer that the lock keeps from being rewritten while it is copied.
        unsafe {
            let p = (self.error_message)(code);
            if p.is_null() {
                format!("unknown error {code}")
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        }
    }

    /// libext2fs' version (`1.47.0`).
    pub fn version(&self) -> String {
        let mut v: *const c_char = std::ptr::null();
        let mut d: *const c_char = std::ptr::null();
        // SAFETY: writes two pointers to static strings through valid pointers.
        unsafe { (self.ext2fs_get_library_version)(&mut v, &mut d) };
        if v.is_null() {
            return String::new();
        }
        // SAFETY: a static NUL-terminated string inside the library, which stays loaded.
        unsafe { CStr::from_ptr(v) }.to_string_lossy().into_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::mem::{align_of, offset_of, size_of};

    use super::*;

    /// The numbers are gcc's (Debian 12, x86_64), printed once by a small C program built
    /// against e2fsprogs 1.47.0's headers (`apt-get download libext2fs-dev comerr-dev`,
    /// `dpkg -x` both, then `gcc -I.../usr/include` a file printing `sizeof`, `_Alignof` and
    /// `offsetof` of each field of `struct struct_io_manager`, `struct struct_io_channel`,
    /// `struct struct_io_stats` and `struct ext2_inode`).
    #[test]
    fn io_manager_layout_matches_e2fsprogs_1_47() {
        assert_eq!(size_of::<IoManager>(), 240);
        assert_eq!(align_of::<IoManager>(), 8);
        let want = [
            (offset_of!(IoManager, magic), 0),
            (offset_of!(IoManager, name), 8),
            (offset_of!(IoManager, open), 16),
            (offset_of!(IoManager, close), 24),
            (offset_of!(IoManager, set_blksize), 32),
            (offset_of!(IoManager, read_blk), 40),
            (offset_of!(IoManager, write_blk), 48),
            (offset_of!(IoManager, flush), 56),
            (offset_of!(IoManager, write_byte), 64),
            (offset_of!(IoManager, set_option), 72),
            (offset_of!(IoManager, get_stats), 80),
            (offset_of!(IoManager, read_blk64), 88),
            (offset_of!(IoManager, write_blk64), 96),
            (offset_of!(IoManager, discard), 104),
            (offset_of!(IoManager, cache_readahead), 112),
            (offset_of!(IoManager, zeroout), 120),
            (offset_of!(IoManager, reserved), 128),
        ];
        for (i, (got, want)) in want.iter().enumerate() {
            assert_eq!(got, want, "field {i}");
        }
    }

    #[test]
    fn io_channel_layout_matches_e2fsprogs_1_47() {
        assert_eq!(size_of::<IoChannel>(), 192);
        assert_eq!(align_of::<IoChannel>(), 8);
        assert_eq!(offset_of!(IoChannel, magic), 0);
        assert_eq!(offset_of!(IoChannel, manager), 8);
        assert_eq!(offset_of!(IoChannel, name), 16);
        assert_eq!(offset_of!(IoChannel, block_size), 24);
        assert_eq!(offset_of!(IoChannel, read_error), 32);
        assert_eq!(offset_of!(IoChannel, write_error), 40);
        assert_eq!(offset_of!(IoChannel, refcount), 48);
        assert_eq!(offset_of!(IoChannel, flags), 52);
        assert_eq!(offset_of!(IoChannel, reserved), 56);
        assert_eq!(offset_of!(IoChannel, private_data), 168);
        assert_eq!(offset_of!(IoChannel, app_data), 176);
        assert_eq!(offset_of!(IoChannel, align), 184);
    }

    #[test]
    fn io_stats_and_inode_layouts_match_e2fsprogs_1_47() {
        assert_eq!(size_of::<IoStats>(), 24);
        assert_eq!(offset_of!(IoStats, bytes_read), 8);
        assert_eq!(offset_of!(IoStats, bytes_written), 16);
        assert_eq!(size_of::<Inode>(), 128);
        assert_eq!(align_of::<Inode>(), 4);
        assert_eq!(offset_of!(Inode, i_mode), 0);
        assert_eq!(offset_of!(Inode, i_size), 4);
        assert_eq!(offset_of!(Inode, i_links_count), 26);
        assert_eq!(offset_of!(Inode, i_block), 40);
        assert_eq!(offset_of!(Inode, i_size_high), 108);
        assert_eq!(size_of::<Errcode>(), 8);
    }

    #[test]
    fn load_without_the_library_says_which_and_what_to_install() {
        let e = load("libext2fs.so.999", LIBCOM_ERR).err().unwrap();
        assert!(e.starts_with("cannot load libext2fs.so.999 ("), "{e}");
        assert!(
            e.ends_with("install e2fsprogs' runtime library (Debian: libext2fs2)"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn api_loads_the_installed_libext2fs_and_names_its_errors() {
        // libext2fs2 is on every Debian system (e2fsprogs depends on it).
        let api = api().unwrap();
        assert!(api.version().starts_with("1."), "{}", api.version());
        assert_eq!(api.message(ET_BAD_MAGIC), "Bad magic number in super-block");
        assert_eq!(
            api.message(ET_FILE_NOT_FOUND),
            "File not found by ext2_lookup"
        );
        assert_eq!(api.message(libc::EIO as Errcode), "Input/output error");
    }
}
