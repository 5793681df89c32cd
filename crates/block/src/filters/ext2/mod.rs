//! The ext2 filter (nbdkit-ext2-filter): serves one regular file inside an ext2, ext3 or
//! ext4 filesystem that the layer below holds, reading and writing it through libext2fs.
//!
//! `ext2file=/PATH` names the file (an absolute path inside the filesystem);
//! `ext2file=exportname` serves the file the client names as its export name (with or
//! without the leading `/`), and then the client's export name is not passed down: the layer
//! below is opened with the default export `""`. In that mode no exports are listed and the
//! default export `""` is refused, as in nbdkit. The path must name a regular file: a
//! directory, device or symbolic link (links are not followed, as in nbdkit) is refused when
//! the client connects.
//!
//! **How.** libext2fs (e2fsprogs' library, the code behind debugfs and fuse2fs) does the
//! filesystem work: finding the file, mapping its blocks (extents or block maps, inline
//! data), allocating blocks when a write fills a hole, checksums. It reaches the layer below
//! through a custom I/O manager (`io.rs`) whose callbacks read and write through the filter's
//! handle of the layer below. The library is loaded at run time (`sys.rs`) the first time an
//! ext2 filter is configured, so building sluice needs none of its headers; a machine without
//! `libext2fs.so.2` gets one error at start naming it.
//!
//! **Per connection, one filesystem handle; one connection at a time.** As in nbdkit 1.32.5,
//! each connection opens the filesystem itself (`ext2fs_open`, read-write unless the export
//! or the layer below is read-only: the mode is only known when the client connects), looks
//! the file up, opens it, and closes both when the client goes (`ext2fs_close` writes back
//! the superblock, group descriptors and bitmaps that changed, then flushes the layer below).
//! Two handles on one filesystem would corrupt it (as two machines mounting one disk), and
//! libext2fs is not thread-safe, so the filter's thread model is `serialize_connections`:
//! a second client waits until the first disconnects, and requests of a connection run one
//! at a time (the connection's filesystem handle is also behind a mutex, so that holding it
//! is what makes a call into libext2fs sound, whatever the server's scheduling). The size is
//! the file's size when the connection opened it; writes stay inside it. Different exports
//! (a daemon can serve several) have handles of their own that may run at once on different
//! threads: libext2fs keeps its state in the handle, and com_err's error table is set up
//! once, before any handle exists (`sys::api`).
//!
//! **Durability.** A flush (and FUA) writes libext2fs' buffered block of the file to the
//! layer below and flushes that, so overwritten data is durable. A write into a hole of a
//! sparse file also allocates blocks: the inode and extent tree are written at once, the
//! block bitmaps and free counts when the connection closes (as in nbdkit), so a server
//! killed in between leaves an image that `e2fsck` must repair.
//!
//! **Capabilities (nbdkit's).** Writes go through `ext2fs_file_write`; FUA is native (the
//! write is followed by a flush); flush is always offered; zero is emulated by writes of
//! zeroes; trim is not offered; cache is emulated by reads; multi-conn is not offered.
//!
//! Deliberate differences from nbdkit 1.32.5:
//! - extents: nbdkit's filter leaves `can_extents` and `extents` to the plugin below, so a
//!   client sees the allocation map of the *filesystem image* at the file's offsets (holes
//!   where the file has data). Here the file is reported as all data (and no
//!   `qemu:allocation-depth`), which is true to within the file's own holes;
//! - flush and FUA also flush the layer below (when it can), so that the data is durable
//!   when the client is told so; nbdkit's flush only writes libext2fs' buffered block to the
//!   layer below;
//! - the layer below is opened read-only when the export is (`-r`); nbdkit opens it
//!   writable "for journal replay", which libext2fs does not do, so `-r` here can never
//!   write to the image;
//! - errors: an errno from the layer below reaches the client as it was (nbdkit passes on
//!   whatever `errno` held after the libext2fs call), a libext2fs code becomes the nearest
//!   errno (ENOENT, ENOSPC, EROFS, ...), and the messages name the filter, the path and what
//!   failed (`ext2: /dir: is a directory, not a regular file`).

mod io;
mod sys;

use std::ffi::{c_uint, CString};
use std::sync::{Arc, Mutex, PoisonError};

use crate::error::{BlockError, Errno, Result};
use crate::extents::Extents;
use crate::filter::{Filter, Next};
use crate::plugin::{ExportEntry, Flags, Handle, OpenContext, Plugin, Support, ThreadModel};
use crate::plugins::ConfigArg;

use super::{bad, each_param, over, FilterEnv, FilterSpec};
use io::Below;
use sys::{Api, Errcode};

pub const SPEC: FilterSpec = FilterSpec {
    name: "ext2",
    keys: &["ext2file"],
    help: concat!(
        "ext2file=<PATH>      (required) Absolute path of the file to serve inside the\n",
        "                     filesystem, or 'exportname' for the client's choice."
    ),
    open,
};

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut file: Option<String> = None;
    each_param(&SPEC, params, |k, v| {
        if file.is_some() {
            return Err(bad("ext2", k, "only one ext2file parameter can be given"));
        }
        file = Some(v.to_string());
        Ok(())
    })?;
    let file =
        match file.as_deref() {
            None => return Err(bad(
                "ext2",
                "ext2file",
                "required: the absolute path of the file inside the filesystem, or 'exportname'",
            )),
            Some("exportname") => None,
            Some(f) if f.starts_with('/') => Some(f.to_string()),
            Some(f) => {
                return Err(bad(
                    "ext2",
                    "ext2file",
                    format!("{f:?} must be an absolute path (starting with /) or 'exportname'"),
                ))
            }
        };
    // Loaded now, so that a machine without libext2fs fails at start, not at each client.
    let api = api()?;
    tracing::debug!("ext2: using libext2fs {}", api.version());
    Ok(over(Ext2 { file }, inner))
}

/// The filter: which file (`None`: the client's export name).
pub struct Ext2 {
    file: Option<String>,
}

/// Per connection: the open filesystem and file, and what was learnt at open.
pub struct Conn {
    fs: Mutex<Fs>,
    below: Arc<Below>,
    /// The file's absolute path inside the filesystem, for messages.
    path: String,
    size: u64,
    writable: bool,
}

impl Conn {
    /// The filesystem handle, with any error the layer below kept from an earlier call
    /// forgotten (so that an error reported is this call's).
    fn fs(&self) -> std::sync::MutexGuard<'_, Fs> {
        let fs = self.fs.lock().unwrap_or_else(PoisonError::into_inner);
        self.below.take_error();
        fs
    }
}

/// libext2fs, loaded on first use; a machine without it gets ELIBACC and why.
fn api() -> Result<&'static Api> {
    sys::api().map_err(|e| BlockError::new(Errno(libc::ELIBACC), format!("ext2: {e}")))
}

impl Filter for Ext2 {
    type Conn = Conn;
    fn name(&self) -> &str {
        "ext2"
    }
    fn thread_model(&self) -> ThreadModel {
        ThreadModel::SerializeConnections
    }
    fn default_export(&self, _: &dyn Plugin, _: bool, _: bool) -> Result<String> {
        match self.file {
            // Whatever the plugin's default, the file is the same.
            Some(_) => Ok(String::new()),
            None => Err(BlockError::new(
                Errno(libc::ENOENT),
                "ext2: the default export (\"\") is not permitted with ext2file=exportname: \
                 name the file inside the filesystem as the export name",
            )),
        }
    }
    fn list_exports(
        &self,
        next: &dyn Plugin,
        readonly: bool,
        is_tls: bool,
    ) -> Result<Vec<ExportEntry>> {
        match self.file {
            Some(_) => next.list_exports(readonly, is_tls),
            // Listing every file of the filesystem is not what a client wants; nbdkit lists
            // nothing too (the exportname filter can list chosen names).
            None => Ok(Vec::new()),
        }
    }
    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<(Conn, Next)> {
        let api = api()?;
        let below_ctx = OpenContext {
            export_name: if self.file.is_some() {
                ctx.export_name
            } else {
                ""
            },
            ..*ctx
        };
        let next = Next::open(next, &below_ctx)?;
        let path = absolute(self.file.as_deref().unwrap_or(ctx.export_name));
        let below = Arc::new(Below::new(next.handle()?)?);
        let writable = !ctx.readonly && below.writable();
        let fs = Fs::open(api, below.clone(), &path, writable)?;
        let size = fs.size(&below, &path)?;
        tracing::debug!("ext2: {path}: opened, {size} bytes, writable: {writable}");
        Ok((
            Conn {
                fs: Mutex::new(fs),
                below,
                path,
                size,
                writable,
            },
            next,
        ))
    }
    fn close(&self, c: &mut Conn, _: &Next) {
        let mut fs = c.fs();
        if let Err(e) = fs.close(&c.below) {
            tracing::warn!("ext2: {}: closing: {e}", c.path);
        }
    }
    fn export_description(&self, c: &Conn, next: &Next) -> Result<Option<String>> {
        Ok(next
            .export_description()?
            .map(|base| format!("embedded '{}' from within ext2 image: {base}", c.path)))
    }
    fn get_size(&self, c: &Conn, _: &Next) -> Result<u64> {
        Ok(c.size)
    }
    fn can_write(&self, c: &Conn, _: &Next) -> Result<bool> {
        Ok(c.writable)
    }
    fn can_flush(&self, _: &Conn, _: &Next) -> Result<bool> {
        Ok(true)
    }
    fn can_trim(&self, _: &Conn, _: &Next) -> Result<bool> {
        Ok(false)
    }
    fn can_zero(&self, _: &Conn, _: &Next) -> Result<Support> {
        Ok(Support::Emulate)
    }
    fn can_fast_zero(&self, _: &Conn, _: &Next) -> Result<bool> {
        Ok(false)
    }
    fn can_fua(&self, _: &Conn, _: &Next) -> Result<Support> {
        Ok(Support::Native)
    }
    fn can_multi_conn(&self, _: &Conn, _: &Next) -> Result<bool> {
        Ok(false)
    }
    fn can_cache(&self, _: &Conn, _: &Next) -> Result<Support> {
        Ok(Support::Emulate)
    }
    fn can_extents(&self, _: &Conn, _: &Next) -> Result<bool> {
        Ok(false)
    }
    fn has_allocation_depth(&self, _: &dyn Plugin) -> bool {
        false
    }
    fn pread(&self, c: &Conn, _: &Next, buf: &mut [u8], off: u64, _: Flags) -> Result<()> {
        c.fs().read(&c.below, &c.path, buf, off)
    }
    fn pwrite(&self, c: &Conn, _: &Next, buf: &[u8], off: u64, f: Flags) -> Result<()> {
        let fs = c.fs();
        fs.write(&c.below, &c.path, buf, off)?;
        if f.contains(Flags::FUA) {
            fs.flush(&c.below, &c.path)?;
        }
        Ok(())
    }
    fn flush(&self, c: &Conn, _: &Next, _: Flags) -> Result<()> {
        c.fs().flush(&c.below, &c.path)
    }
    // Not offered (trim) or emulated by the export policy (zero, cache): never called, and
    // never passed to the layer below, whose offsets are the filesystem's, not the file's.
    fn trim(&self, _: &Conn, _: &Next, _: u64, _: u64, _: Flags) -> Result<()> {
        Err(BlockError::new(
            Errno::EINVAL,
            "ext2: trim is not supported",
        ))
    }
    fn zero(&self, _: &Conn, _: &Next, _: u64, _: u64, _: Flags) -> Result<()> {
        Err(BlockError::errno(Errno::ENOTSUP))
    }
    fn cache(&self, _: &Conn, _: &Next, _: u64, _: u64, _: Flags) -> Result<()> {
        Ok(())
    }
    fn extents(
        &self,
        _: &Conn,
        _: &Next,
        n: u64,
        off: u64,
        _: Flags,
        out: &mut Extents,
    ) -> Result<()> {
        out.add(off, n, 0)
    }
    fn allocation_depth(
        &self,
        _: &Conn,
        _: &Next,
        n: u64,
        off: u64,
        out: &mut Extents,
    ) -> Result<()> {
        out.add(off, n, 1)
    }
}

/// An open filesystem and file (null once closed).
struct Fs {
    api: &'static Api,
    fs: sys::Filsys,
    file: sys::File,
}

// SAFETY: the handles are plain heap objects of libext2fs with no thread affinity; they are
// only used by one thread at a time, under the connection's mutex.
unsafe impl Send for Fs {}

impl Fs {
    /// Opens the filesystem on `below` and the regular file at `path` (absolute).
    fn open(api: &'static Api, below: Arc<Below>, path: &str, writable: bool) -> Result<Fs> {
        let mut flags = sys::FLAG_64BITS;
        if writable {
            flags |= sys::FLAG_RW;
        }
        let fs = io::open_fs(api, below.clone(), flags)
            .map_err(|code| error(api, &below, code, "opening the filesystem"))?;
        // From here on, dropping `this` closes the filesystem.
        let mut this = Fs {
            api,
            fs,
            file: std::ptr::null_mut(),
        };
        let ino = if path == "/" {
            sys::ROOT_INO
        } else {
            let name = CString::new(&path[1..]).map_err(|_| {
                BlockError::new(
                    Errno::EINVAL,
                    format!("ext2: {path:?}: contains a NUL byte"),
                )
            })?;
            let mut ino: sys::Ino = 0;
            // SAFETY: a live filesystem, a NUL-terminated name and a valid out-pointer.
            let code = unsafe {
                (api.ext2fs_namei)(fs, sys::ROOT_INO, sys::ROOT_INO, name.as_ptr(), &mut ino)
            };
            this.check(&below, code, path)?;
            ino
        };
        let mut inode = sys::Inode::default();
        // SAFETY: a live filesystem and a 128-byte `struct ext2_inode` to fill.
        let code = unsafe { (api.ext2fs_read_inode)(fs, ino, &mut inode) };
        this.check(&below, code, format_args!("{path}: reading the inode"))?;
        if let Some(kind) = not_regular(inode.i_mode) {
            return Err(BlockError::new(
                Errno::EINVAL,
                format!("ext2: {path}: is {kind}, not a regular file"),
            ));
        }
        let mut file: sys::File = std::ptr::null_mut();
        let file_flags = if writable { sys::FILE_WRITE } else { 0 };
        // SAFETY: a live filesystem, an inode number it gave, and a valid out-pointer.
        let code = unsafe {
            (api.ext2fs_file_open2)(fs, ino, std::ptr::null_mut(), file_flags, &mut file)
        };
        this.check(&below, code, format_args!("{path}: opening"))?;
        this.file = file;
        Ok(this)
    }

    /// `Ok` for 0, else the error for `code` while doing `what`.
    fn check(&self, below: &Below, code: Errcode, what: impl std::fmt::Display) -> Result<()> {
        if code == 0 {
            Ok(())
        } else {
            Err(error(self.api, below, code, what))
        }
    }

    fn size(&self, below: &Below, path: &str) -> Result<u64> {
        let mut size = 0u64;
        // SAFETY: a live file and a valid out-pointer.
        let code = unsafe { (self.api.ext2fs_file_get_lsize)(self.file, &mut size) };
        self.check(below, code, format_args!("{path}: size"))?;
        Ok(size)
    }

    fn seek(&self, below: &Below, path: &str, off: u64) -> Result<()> {
        // SAFETY: a live file; the new position is not wanted back.
        let code = unsafe {
            (self.api.ext2fs_file_llseek)(self.file, off, sys::SEEK_SET, std::ptr::null_mut())
        };
        self.check(below, code, format_args!("{path}: seeking to {off}"))
    }

    fn read(&self, below: &Below, path: &str, buf: &mut [u8], off: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = off + done as u64;
            self.seek(below, path, at)?;
            let want = (buf.len() - done).min(c_uint::MAX as usize) as c_uint;
            let mut got: c_uint = 0;
            // SAFETY: a live file and `want` bytes of `buf` to fill.
            let code = unsafe {
                (self.api.ext2fs_file_read)(
                    self.file,
                    buf[done..].as_mut_ptr().cast(),
                    want,
                    &mut got,
                )
            };
            self.check(below, code, format_args!("{path}: reading at {at}"))?;
            if got == 0 {
                return Err(BlockError::new(
                    Errno::EIO,
                    format!("ext2: {path}: reading at {at}: unexpected end of file"),
                ));
            }
            done += got as usize;
        }
        Ok(())
    }

    fn write(&self, below: &Below, path: &str, buf: &[u8], off: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = off + done as u64;
            self.seek(below, path, at)?;
            let want = (buf.len() - done).min(c_uint::MAX as usize) as c_uint;
            let mut wrote: c_uint = 0;
            // SAFETY: a live file and `want` bytes of `buf` to write.
            let code = unsafe {
                (self.api.ext2fs_file_write)(
                    self.file,
                    buf[done..].as_ptr().cast(),
                    want,
                    &mut wrote,
                )
            };
            self.check(below, code, format_args!("{path}: writing at {at}"))?;
            if wrote == 0 {
                return Err(BlockError::new(
                    Errno::EIO,
                    format!("ext2: {path}: writing at {at}: nothing was written"),
                ));
            }
            done += wrote as usize;
        }
        Ok(())
    }

    /// Writes libext2fs' buffered block of the file to the layer below, then flushes it.
    fn flush(&self, below: &Below, path: &str) -> Result<()> {
        // SAFETY: a live file.
        let code = unsafe { (self.api.ext2fs_file_flush)(self.file) };
        self.check(below, code, format_args!("{path}: flushing"))?;
        if below.can_flush() {
            below
                .handle()
                .flush(Flags::NONE)
                .map_err(|e| BlockError::new(e.errno, format!("ext2: {path}: flushing: {e}")))?;
        }
        Ok(())
    }

    /// Closes the file and the filesystem (writing back what changed); idempotent.
    fn close(&mut self, below: &Below) -> Result<()> {
        let mut first = Ok(());
        if !self.file.is_null() {
            // SAFETY: a live file, closed once (the pointer is cleared).
            let code = unsafe { (self.api.ext2fs_file_close)(self.file) };
            self.file = std::ptr::null_mut();
            first = self.check(below, code, "closing the file");
        }
        if !self.fs.is_null() {
            // SAFETY: a live filesystem, closed once; its channel is freed by io_close.
            let code = unsafe { (self.api.ext2fs_close)(self.fs) };
            self.fs = std::ptr::null_mut();
            first = first.and(self.check(below, code, "closing the filesystem"));
        }
        first
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        // Only a failed open or a connection dropped without `close` gets here with handles.
        if !self.fs.is_null() {
            let api = self.api;
            // SAFETY: as in `close`.
            unsafe {
                if !self.file.is_null() {
                    (api.ext2fs_file_close)(self.file);
                }
                (api.ext2fs_close)(self.fs);
            }
        }
    }
}

/// The error for libext2fs' `code` while doing `what`: the layer below's own error if it
/// caused it, else libext2fs' message with the nearest errno.
fn error(api: &Api, below: &Below, code: Errcode, what: impl std::fmt::Display) -> BlockError {
    if let Some(e) = below.take_error() {
        if code == e.errno.0 as Errcode {
            return BlockError::new(e.errno, format!("ext2: {what}: {}", e.message));
        }
    }
    BlockError::new(
        errno_of(code),
        format!("ext2: {what}: {}", api.message(code)),
    )
}

/// The errno a client gets for libext2fs' error `code`.
pub fn errno_of(code: Errcode) -> Errno {
    match code {
        // ET_BASE < i32::MAX: every errno value fits.
        c if c > 0 && c < sys::ET_BASE => Errno(c as i32),
        sys::ET_FILE_NOT_FOUND => Errno(libc::ENOENT),
        sys::ET_RO_FILSYS | sys::ET_FILE_RO => Errno::EROFS,
        sys::ET_NO_MEMORY => Errno::ENOMEM,
        sys::ET_BLOCK_ALLOC_FAIL | sys::ET_INODE_ALLOC_FAIL | sys::ET_DIR_NO_SPACE => Errno::ENOSPC,
        sys::ET_FILE_TOO_BIG => Errno(libc::EFBIG),
        sys::ET_INVALID_ARGUMENT | sys::ET_BAD_MAGIC => Errno::EINVAL,
        _ => Errno::EIO,
    }
}

/// The path inside the filesystem for `name`: absolute, as nbdkit makes it (`disk.raw` and
/// `/disk.raw` are the same file).
pub fn absolute(name: &str) -> String {
    if name.starts_with('/') {
        name.to_string()
    } else {
        format!("/{name}")
    }
}

/// What an inode of mode `mode` is, if it is not a regular file (`LINUX_S_IFMT` bits).
pub fn not_regular(mode: u16) -> Option<&'static str> {
    match mode & 0o170000 {
        0o100000 => None,
        0o040000 => Some("a directory"),
        0o120000 => Some("a symbolic link (links are not followed)"),
        0o020000 => Some("a character device"),
        0o060000 => Some("a block device"),
        0o010000 => Some("a FIFO"),
        0o140000 => Some("a socket"),
        _ => Some("of an unknown type"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn errno_of_keeps_errno_values_and_maps_libext2fs_codes() {
        assert_eq!(errno_of(libc::EIO as Errcode), Errno::EIO);
        assert_eq!(errno_of(libc::ENOSPC as Errcode), Errno::ENOSPC);
        assert_eq!(errno_of(sys::ET_FILE_NOT_FOUND), Errno(libc::ENOENT));
        assert_eq!(errno_of(sys::ET_BLOCK_ALLOC_FAIL), Errno::ENOSPC);
        assert_eq!(errno_of(sys::ET_RO_FILSYS), Errno::EROFS);
        assert_eq!(errno_of(sys::ET_BAD_MAGIC), Errno::EINVAL);
        assert_eq!(errno_of(sys::ET_SHORT_READ), Errno::EIO);
        assert_eq!(errno_of(-1), Errno::EIO);
    }

    #[test]
    fn absolute_adds_the_leading_slash_once() {
        assert_eq!(absolute("disk.raw"), "/disk.raw");
        assert_eq!(absolute("/d/disk.raw"), "/d/disk.raw");
        assert_eq!(absolute(""), "/");
    }

    #[test]
    fn not_regular_names_each_file_type() {
        assert_eq!(not_regular(0o100644), None);
        assert_eq!(not_regular(0o040755), Some("a directory"));
        assert!(not_regular(0o120777)
            .unwrap()
            .starts_with("a symbolic link"));
        assert_eq!(not_regular(0o010644), Some("a FIFO"));
    }

    #[test]
    fn ext2_bad_parameters_name_the_key() {
        assert!(config_error("ext2", &[]).starts_with("ext2: ext2file: required"));
        let msg = config_error("ext2", &[("ext2file", "disk.raw")]);
        assert!(msg.contains("must be an absolute path"), "{msg}");
        let msg = config_error("ext2", &[("ext2file", "/a"), ("ext2file", "/b")]);
        assert!(msg.starts_with("ext2: ext2file: only one"), "{msg}");
    }

    /// An ext4 image of 8 MiB made by mke2fs from a directory holding `disk.raw` (`data`)
    /// and `dir/`, loaded into a memory plugin.
    fn image(data: &[u8]) -> Arc<dyn Plugin> {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("dir")).unwrap();
        std::fs::write(src.join("disk.raw"), data).unwrap();
        let img = dir.path().join("fs.img");
        let mke2fs = ["/usr/sbin/mke2fs", "/sbin/mke2fs"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("mke2fs");
        let out = std::process::Command::new(mke2fs)
            .args(["-q", "-F", "-t", "ext4", "-d"])
            .arg(&src)
            .arg(&img)
            .arg("8M")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let bytes = std::fs::read(&img).unwrap();
        let mem = memory(bytes.len() as u64);
        export(mem.clone(), false)
            .write(&bytes, 0, Flags::NONE)
            .unwrap();
        mem
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn ext2_reads_and_writes_the_file_and_keeps_writes_across_connections() {
        let data = pattern(100_000);
        let mem = image(&data);
        let top = filter("ext2", &[("ext2file", "/disk.raw")], mem);
        {
            let e = export(top.clone(), false);
            assert_eq!(e.size(), 100_000);
            let mut buf = vec![0u8; 100_000];
            e.read(&mut buf, 0).unwrap();
            assert!(buf == data, "the file's bytes");
            e.write(b"hello, ext2", 4090, Flags::FUA).unwrap();
            e.flush().unwrap();
        }
        let e = export(top, true);
        let mut buf = [0u8; 11];
        e.read(&mut buf, 4090).unwrap();
        assert_eq!(&buf, b"hello, ext2");
        assert!(!e.caps().writable);
    }

    #[test]
    fn ext2_refuses_a_missing_file_a_directory_and_a_non_filesystem() {
        let mem = image(&pattern(5000));
        let open = |plugin: Arc<dyn Plugin>| {
            crate::Export::open(&crate::Backend::new(plugin), &ctx(true))
                .err()
                .unwrap()
        };
        let e = open(filter("ext2", &[("ext2file", "/nope")], mem.clone()));
        assert_eq!(e.errno, Errno(libc::ENOENT));
        assert_eq!(e.message, "ext2: /nope: File not found by ext2_lookup");
        let e = open(filter("ext2", &[("ext2file", "/dir")], mem));
        assert_eq!(e.message, "ext2: /dir: is a directory, not a regular file");
        let e = open(filter("ext2", &[("ext2file", "/x")], memory(1 << 20)));
        assert_eq!(
            e.message,
            "ext2: opening the filesystem: Bad magic number in super-block"
        );
    }

    /// The layer below, whose reads can be made to fail (1) or panic (2).
    struct Switch {
        inner: Arc<dyn Plugin>,
        mode: Arc<std::sync::atomic::AtomicU8>,
    }

    struct SwitchHandle {
        inner: Box<dyn crate::plugin::Handle>,
        mode: Arc<std::sync::atomic::AtomicU8>,
    }

    impl Plugin for Switch {
        fn name(&self) -> &str {
            "switch"
        }
        fn open(&self, ctx: &OpenContext<'_>) -> Result<Box<dyn crate::plugin::Handle>> {
            Ok(Box::new(SwitchHandle {
                inner: self.inner.open(ctx)?,
                mode: self.mode.clone(),
            }))
        }
    }

    impl crate::plugin::Handle for SwitchHandle {
        fn get_size(&self) -> Result<u64> {
            self.inner.get_size()
        }
        fn can_write(&self) -> Result<bool> {
            self.inner.can_write()
        }
        fn pread(&self, buf: &mut [u8], off: u64, f: Flags) -> Result<()> {
            match self.mode.load(std::sync::atomic::Ordering::SeqCst) {
                0 => self.inner.pread(buf, off, f),
                1 => Err(BlockError::new(Errno(libc::ENODATA), "switch: injected")),
                _ => panic!("switch: injected panic"),
            }
        }
        fn pwrite(&self, buf: &[u8], off: u64, f: Flags) -> Result<()> {
            self.inner.pwrite(buf, off, f)
        }
    }

    #[test]
    fn ext2_errors_and_panics_below_reach_the_client_as_errors() {
        let mode = Arc::new(std::sync::atomic::AtomicU8::new(0));
        let below = Arc::new(Switch {
            inner: image(&pattern(200_000)),
            mode: mode.clone(),
        });
        let e = export(filter("ext2", &[("ext2file", "/disk.raw")], below), true);
        let mut buf = [0u8; 10];
        e.read(&mut buf, 0).unwrap();
        // The layer below's errno and message, through libext2fs.
        mode.store(1, std::sync::atomic::Ordering::SeqCst);
        let err = e.read(&mut buf, 100_000).unwrap_err();
        assert_eq!(err.errno, Errno(libc::ENODATA));
        assert_eq!(
            err.message,
            "ext2: /disk.raw: reading at 100000: switch: injected"
        );
        // A panic below is caught in the callback, not unwound through C.
        mode.store(2, std::sync::atomic::Ordering::SeqCst);
        let err = e.read(&mut buf, 150_000).unwrap_err();
        assert_eq!(err.errno, Errno::EIO);
        assert!(err.message.contains("read callback panicked"), "{err}");
        mode.store(0, std::sync::atomic::Ordering::SeqCst);
        e.read(&mut buf, 150_000).unwrap();
        assert_eq!(buf[..], pattern(150_010)[150_000..]);
    }

    #[test]
    fn ext2_exportname_mode_refuses_the_default_export() {
        let top = filter("ext2", &[("ext2file", "exportname")], memory(1 << 20));
        let e = top.default_export(false, false).unwrap_err();
        assert!(e.message.contains("not permitted"), "{e}");
        assert!(top.list_exports(false, false).unwrap().is_empty());
        assert_eq!(top.thread_model(), ThreadModel::SerializeConnections);
    }
}
