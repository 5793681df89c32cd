//! The `file` plugin: serves a regular file or block device, or every file of a directory
//! chosen by export name, like nbdkit-file-plugin.
//!
//! It accepts nbdkit's parameters: `[file=]FILENAME` or `dir=DIRECTORY` (exactly one),
//! `cache=default|none` and `fadvise=normal|random|sequential`. Paths are resolved and
//! checked when the plugin is configured, so a typo fails at startup and later `chdir`s do
//! not matter. Each connection opens its own descriptor (read-write unless the connection is
//! read-only, falling back to read-only if the file refuses writes), and all data I/O is
//! positional (`pread`/`pwrite`), so requests of one connection run in parallel without
//! sharing a file offset; `lseek` is only used for its return value (size of a block device,
//! `SEEK_DATA`/`SEEK_HOLE` for block status, walked by [`crate::fileio`], which image nodes
//! share), which is atomic per call, so unlike nbdkit no lock is needed around it.
//!
//! Zeroing follows nbdkit's ladder: punch a hole when the client allows it, else
//! `FALLOC_FL_ZERO_RANGE`, else punch-then-reallocate, and when none works return ENOTSUP so
//! the server writes zeroes. A method the file system refuses with ENOTSUP is remembered per
//! handle and not tried again. With FAST_ZERO only methods that are known not to write
//! zeroes are tried: on a block device `ZERO_RANGE` may make the kernel write them, so it is
//! skipped.
//!
//! Deliberate difference: this plugin advertises fast zero (`can_fast_zero`), where nbdkit
//! 1.32.5's file plugin has no such callback and so tells clients it cannot (`nbdinfo`
//! shows `can_fast_zero: false` for it). The contract of a fast zero is to fail with
//! ENOTSUP rather than write zeroes, and that is what the ladder above does with FAST_ZERO,
//! so the promise holds; a client such as `qemu-img convert` then learns cheaply whether it
//! can skip pre-zeroing the target.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{BlockError, Errno, Result};
use crate::extents::{Extents, EXTENT_HOLE, EXTENT_ZERO};
use crate::fileio::{data_runs, fadvise, lseek};
use crate::plugin::{ExportEntry, FileRange, Flags, Handle, OpenContext, Plugin, Support};

use super::{for_each_arg, ConfigArg, ConfigError};

/// The key a bare value on the command line stands for.
pub const MAGIC_KEY: &str = "file";

/// Parameter help for `--help`.
pub const HELP: &str = "[file=]<FILENAME>     The filename to serve.\n\
                        dir=<DIRNAME>         A directory containing files to serve.\n\
                        cache=<MODE>          Set use of caching (default, none).\n\
                        fadvise=<LEVEL>       Set fadvise hint (normal, random, sequential).";

const PLUGIN: &str = "file";

/// What the plugin serves.
#[derive(Debug, Clone)]
enum Source {
    /// One file or block device; the export name is ignored.
    File(PathBuf),
    /// The regular files and block devices directly inside a directory, by export name.
    Dir(PathBuf),
}

/// The `cache=` parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// Use the page cache normally.
    Default,
    /// Evict what was read or written from the page cache (writes are made durable first).
    None,
}

/// The file plugin, configured.
#[derive(Debug, Clone)]
pub struct FilePlugin {
    source: Source,
    cache: CacheMode,
    /// `posix_fadvise` advice applied to every new descriptor.
    fadvise: libc::c_int,
}

impl FilePlugin {
    /// Serves one file or block device (which must exist).
    pub fn for_file(path: impl AsRef<Path>) -> Result<FilePlugin, ConfigError> {
        FilePlugin::from_args(&[ConfigArg::kv("file", &path.as_ref().to_string_lossy())])
    }

    /// Serves the files of a directory (which must exist).
    pub fn for_dir(path: impl AsRef<Path>) -> Result<FilePlugin, ConfigError> {
        FilePlugin::from_args(&[ConfigArg::kv("dir", &path.as_ref().to_string_lossy())])
    }

    /// Configures from nbdkit's parameters (see the module doc).
    pub fn from_args(args: &[ConfigArg]) -> Result<FilePlugin, ConfigError> {
        let mut file = None;
        let mut dir = None;
        let mut cache = CacheMode::Default;
        let mut fadvise = libc::POSIX_FADV_NORMAL;
        for_each_arg(args, MAGIC_KEY, |key, value| {
            match key {
                "file" => file = Some(resolve(value)?),
                "dir" | "directory" => dir = Some(resolve(value)?),
                "cache" => {
                    cache = match value {
                        "default" => CacheMode::Default,
                        "none" => CacheMode::None,
                        _ => return Err(bad_value("cache", value, "default or none")),
                    }
                }
                "fadvise" => {
                    fadvise = match value {
                        "normal" => libc::POSIX_FADV_NORMAL,
                        "random" => libc::POSIX_FADV_RANDOM,
                        "sequential" => libc::POSIX_FADV_SEQUENTIAL,
                        _ => {
                            return Err(bad_value("fadvise", value, "normal, random or sequential"))
                        }
                    }
                }
                "rdelay" | "wdelay" => {
                    return Err(ConfigError::Invalid {
                        plugin: PLUGIN,
                        message: "rdelay and wdelay belong to the delay filter: add --filter=delay",
                    })
                }
                _ => {
                    return Err(ConfigError::UnknownParameter {
                        plugin: PLUGIN,
                        key: key.to_owned(),
                    })
                }
            }
            Ok(())
        })?;
        let source = match (file, dir) {
            (Some((path, meta)), None) => {
                let ft = meta.file_type();
                if ft.is_dir() {
                    return Err(bad_file(
                        &path,
                        "is a directory: use dir= to serve the files in it",
                    ));
                }
                if !(ft.is_file() || ft.is_block_device()) {
                    return Err(bad_file(&path, "is not a regular file or block device"));
                }
                Source::File(path)
            }
            (None, Some((path, meta))) => {
                if !meta.is_dir() {
                    return Err(bad_file(&path, "is not a directory"));
                }
                Source::Dir(path)
            }
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid {
                    plugin: PLUGIN,
                    message: "file= and dir= cannot be used at the same time",
                })
            }
            (None, None) => {
                return Err(ConfigError::MissingParameter {
                    plugin: PLUGIN,
                    what: "either [file=]<FILENAME> or dir=<DIRNAME>",
                })
            }
        };
        Ok(FilePlugin {
            source,
            cache,
            fadvise,
        })
    }

    /// Opens `path` for a connection: read-write unless `readonly`, falling back to read-only
    /// when the file or its file system refuses writing.
    fn open_path(&self, path: &Path, readonly: bool) -> Result<FileHandle> {
        // Checked before opening too, because opening a fifo read-only would block.
        let meta = std::fs::metadata(path).map_err(|e| open_error(path, e))?;
        if !is_servable(&meta) {
            return Err(not_servable(path));
        }
        let open = |write: bool| {
            OpenOptions::new()
                .read(true)
                .write(write)
                .custom_flags(libc::O_NOCTTY)
                .open(path)
        };
        let (file, writable) = match open(!readonly) {
            Ok(f) => (f, !readonly),
            Err(e) if !readonly && matches!(e.raw_os_error(), Some(libc::EROFS | libc::EACCES)) => {
                tracing::debug!("{}: {e}; serving read-only", path.display());
                (open(false).map_err(|e| open_error(path, e))?, false)
            }
            Err(e) => return Err(open_error(path, e)),
        };
        let meta = file
            .metadata()
            .map_err(|e| BlockError::io(format_args!("fstat: {}", path.display()), e))?;
        if !is_servable(&meta) {
            return Err(not_servable(path));
        }
        if self.fadvise != libc::POSIX_FADV_NORMAL {
            // A hint: failure changes nothing that matters.
            let _ = fadvise(&file, 0, 0, self.fadvise);
        }
        Ok(FileHandle {
            file,
            path: path.to_owned(),
            is_block_device: meta.file_type().is_block_device(),
            writable,
            cache: self.cache,
            can_punch_hole: AtomicBool::new(true),
            can_zero_range: AtomicBool::new(true),
            can_fallocate: AtomicBool::new(true),
        })
    }
}

fn bad_value(key: &'static str, value: &str, expected: &'static str) -> ConfigError {
    ConfigError::BadValue {
        plugin: PLUGIN,
        key,
        value: value.to_owned(),
        expected,
    }
}

fn bad_file(path: &Path, problem: &'static str) -> ConfigError {
    ConfigError::BadFile {
        plugin: PLUGIN,
        path: path.display().to_string(),
        problem,
    }
}

/// nbdkit_realpath: the absolute, symlink-free path, which must exist, and what it is.
fn resolve(value: &str) -> Result<(PathBuf, std::fs::Metadata), ConfigError> {
    let not_found = |reason| ConfigError::FileNotFound {
        plugin: PLUGIN,
        path: value.to_owned(),
        reason,
    };
    let path = std::fs::canonicalize(value).map_err(not_found)?;
    let meta = std::fs::metadata(&path).map_err(not_found)?;
    Ok((path, meta))
}

fn is_servable(meta: &std::fs::Metadata) -> bool {
    meta.is_file() || meta.file_type().is_block_device()
}

fn not_servable(path: &Path) -> BlockError {
    BlockError::new(
        Errno(libc::ENOENT),
        format!("{}: is not a regular file or block device", path.display()),
    )
}

fn open_error(path: &Path, e: std::io::Error) -> BlockError {
    BlockError::io(format_args!("open: {}", path.display()), e)
}

/// An export name that names a file directly inside the directory, or None.
fn dir_entry_name(name: &str) -> Option<&str> {
    let ok = !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0']);
    ok.then_some(name)
}

impl Plugin for FilePlugin {
    fn name(&self) -> &str {
        PLUGIN
    }
    fn version(&self) -> Option<&str> {
        Some(env!("CARGO_PKG_VERSION"))
    }

    fn list_exports(&self, readonly: bool, is_tls: bool) -> Result<Vec<ExportEntry>> {
        let dir = match &self.source {
            Source::File(_) => {
                return Ok(vec![ExportEntry::default_export(self, readonly, is_tls)?])
            }
            Source::Dir(dir) => dir,
        };
        let context = || format!("readdir: {}", dir.display());
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| BlockError::io(context(), e))? {
            let entry = entry.map_err(|e| BlockError::io(context(), e))?;
            // NBD export names are UTF-8; other names cannot be asked for anyway.
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            // Follows symlinks, as nbdkit does; dangling ones and other kinds are skipped.
            let Ok(meta) = std::fs::metadata(entry.path()) else {
                continue;
            };
            if is_servable(&meta) {
                names.push(name);
            }
        }
        names.sort();
        Ok(names
            .into_iter()
            .map(|name| ExportEntry {
                name,
                description: None,
            })
            .collect())
    }

    fn open(&self, ctx: &OpenContext<'_>) -> Result<Box<dyn Handle>> {
        let path = match &self.source {
            Source::File(path) => path.clone(),
            Source::Dir(dir) => {
                let name = dir_entry_name(ctx.export_name).ok_or_else(|| {
                    BlockError::new(
                        Errno(libc::ENOENT),
                        format!("no export named {:?} in {}", ctx.export_name, dir.display()),
                    )
                })?;
                dir.join(name)
            }
        };
        let handle = self
            .open_path(&path, ctx.readonly)
            .map_err(|e| match self.source {
                // In dir= mode every failure to find a servable file means "no such export".
                Source::Dir(_) if e.errno != Errno(libc::EACCES) => {
                    BlockError::new(Errno(libc::ENOENT), e.message)
                }
                _ => e,
            })?;
        Ok(Box::new(handle))
    }

    fn dump(&self) -> Vec<String> {
        vec![
            "file_falloc_fl_punch_hole=yes".to_owned(),
            "file_falloc_fl_zero_range=yes".to_owned(),
        ]
    }
}

/// One connection's descriptor and what its file system has been found to support.
struct FileHandle {
    file: File,
    path: PathBuf,
    is_block_device: bool,
    writable: bool,
    cache: CacheMode,
    can_punch_hole: AtomicBool,
    can_zero_range: AtomicBool,
    can_fallocate: AtomicBool,
}

/// Outcome of one fallocate attempt during zero.
enum Try {
    Done,
    /// This method does not work here; try the next one.
    Unsupported,
}

fn is_enotsup(errno: i32) -> bool {
    // ENODEV: old kernels' answer for fallocate on a block device.
    errno == libc::EOPNOTSUPP || errno == libc::ENOTSUP || errno == libc::ENODEV
}

fn to_off(v: u64, what: &str) -> Result<libc::off_t> {
    libc::off_t::try_from(v)
        .map_err(|_| BlockError::new(Errno::EINVAL, format!("{what} {v} beyond off_t")))
}

impl FileHandle {
    fn fallocate(&self, mode: libc::c_int, offset: u64, count: u64) -> std::io::Result<()> {
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(count))
        else {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: plain syscall on a descriptor owned by `self.file`, which outlives the
        // call; no memory is passed.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    fn punch_hole(&self, offset: u64, count: u64) -> std::io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            count,
        )
    }

    /// Runs one zeroing method guarded by `flag`: an ENOTSUP answer clears the flag, other
    /// errors fail the request. Block devices answer EINVAL for ranges not aligned to their
    /// sector size; that only skips the method for this request.
    fn try_zero(
        &self,
        flag: &AtomicBool,
        what: &str,
        op: impl FnOnce() -> std::io::Result<()>,
    ) -> Result<Try> {
        if !flag.load(Ordering::Relaxed) {
            return Ok(Try::Unsupported);
        }
        match op() {
            Ok(()) => Ok(Try::Done),
            Err(e) => match e.raw_os_error() {
                Some(errno) if is_enotsup(errno) => {
                    flag.store(false, Ordering::Relaxed);
                    Ok(Try::Unsupported)
                }
                Some(libc::EINVAL) if self.is_block_device => Ok(Try::Unsupported),
                _ => Err(BlockError::io(format_args!("zero: {what}"), e)),
            },
        }
    }

    fn zero_inner(&self, count: u64, offset: u64, flags: Flags) -> Result<Try> {
        if flags.contains(Flags::MAY_TRIM) {
            if let Try::Done = self.try_zero(&self.can_punch_hole, "punch hole", || {
                self.punch_hole(offset, count)
            })? {
                return Ok(Try::Done);
            }
        }
        // On a block device the kernel may implement ZERO_RANGE by writing zeroes.
        if !(self.is_block_device && flags.contains(Flags::FAST_ZERO)) {
            if let Try::Done = self.try_zero(&self.can_zero_range, "zero range", || {
                self.fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, count)
            })? {
                return Ok(Try::Done);
            }
        }
        // Punching then reallocating zeroes a regular file without leaving a hole. (A block
        // device cannot reallocate, and would be left "trimmed" against the client's wish.)
        if !self.is_block_device && self.can_fallocate.load(Ordering::Relaxed) {
            if let Try::Unsupported = self.try_zero(&self.can_punch_hole, "punch hole", || {
                self.punch_hole(offset, count)
            })? {
                return Ok(Try::Unsupported);
            }
            return self.try_zero(&self.can_fallocate, "allocate", || {
                self.fallocate(0, offset, count)
            });
        }
        Ok(Try::Unsupported)
    }

    fn evict(&self, offset: u64, count: u64) {
        if self.cache == CacheMode::None {
            // A hint: failure changes nothing that matters.
            let _ = fadvise(&self.file, offset, count, libc::POSIX_FADV_DONTNEED);
        }
    }

    fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| BlockError::io(format_args!("fdatasync: {}", self.path.display()), e))
    }
}

impl Handle for FileHandle {
    fn get_size(&self) -> Result<u64> {
        if self.is_block_device {
            // st_size of a device node is 0; its end is its size.
            (&self.file)
                .seek(SeekFrom::End(0))
                .map_err(|e| BlockError::io("lseek (to find device size)", e))
        } else {
            self.file
                .metadata()
                .map(|m| m.len())
                .map_err(|e| BlockError::io(format_args!("fstat: {}", self.path.display()), e))
        }
    }
    fn can_write(&self) -> Result<bool> {
        Ok(self.writable)
    }
    fn can_flush(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_trim(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_zero(&self) -> Result<Support> {
        Ok(Support::Native)
    }
    fn can_fast_zero(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_fua(&self) -> Result<Support> {
        Ok(Support::Native)
    }
    fn can_multi_conn(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_cache(&self) -> Result<Support> {
        Ok(Support::Native)
    }
    fn can_extents(&self) -> Result<bool> {
        // Whether SEEK_HOLE works on this file system at all.
        match lseek(&self.file, 0, libc::SEEK_HOLE) {
            Ok(_) => Ok(true),
            Err(e) => {
                tracing::debug!("{}: extents disabled: SEEK_HOLE: {e}", self.path.display());
                Ok(false)
            }
        }
    }

    fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| BlockError::io(format_args!("pread at {offset}"), e))?;
        self.evict(offset, buf.len() as u64);
        Ok(())
    }

    /// A regular file's bytes are its own. Not offered for a block device (splicing one
    /// works, but it has not been measured or tested here), nor with `cache=none`, whose
    /// reads must evict what they read.
    fn file_range(&self, _count: u64, offset: u64) -> Option<FileRange<'_>> {
        (!self.is_block_device && self.cache == CacheMode::Default).then(|| FileRange {
            fd: self.file.as_fd(),
            offset,
        })
    }

    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| BlockError::io(format_args!("pwrite at {offset}"), e))?;
        // cache=none must make the pages clean before it can evict them.
        if flags.contains(Flags::FUA) || self.cache == CacheMode::None {
            self.sync()?;
        }
        self.evict(offset, buf.len() as u64);
        Ok(())
    }

    fn flush(&self, _flags: Flags) -> Result<()> {
        self.sync()
    }

    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        if self.can_punch_hole.load(Ordering::Relaxed) {
            if let Err(e) = self.punch_hole(offset, count) {
                match e.raw_os_error() {
                    // Trim is advisory: only a real failure of the device matters.
                    Some(libc::EPERM | libc::EIO) => {
                        return Err(BlockError::io(format_args!("trim at {offset}"), e))
                    }
                    Some(errno) if is_enotsup(errno) => {
                        self.can_punch_hole.store(false, Ordering::Relaxed)
                    }
                    _ => tracing::debug!("ignoring failed punch hole during trim: {e}"),
                }
            }
        }
        if flags.contains(Flags::FUA) {
            self.sync()?;
        }
        Ok(())
    }

    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        match self.zero_inner(count, offset, flags)? {
            Try::Done if flags.contains(Flags::FUA) => self.sync(),
            Try::Done => Ok(()),
            Try::Unsupported => Err(BlockError::new(
                Errno::ENOTSUP,
                format!("zero at {offset}: no fast way to zero on this file"),
            )),
        }
    }

    fn cache(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        fadvise(&self.file, offset, count, libc::POSIX_FADV_WILLNEED)
            .map_err(|e| BlockError::io(format_args!("posix_fadvise at {offset}"), e))
    }

    fn extents(&self, count: u64, offset: u64, flags: Flags, extents: &mut Extents) -> Result<()> {
        let req_one = flags.contains(Flags::REQ_ONE);
        let end = offset.saturating_add(count);
        to_off(end, "extents end")?;
        for run in data_runs(&self.file, offset, end) {
            let run = run.map_err(|e| BlockError::io(e.to_string(), e.source))?;
            let kind = if run.data {
                0
            } else {
                EXTENT_HOLE | EXTENT_ZERO
            };
            extents.add(run.offset, run.length, kind)?;
            if req_one {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extents::Extent;
    use std::io::Write;

    const HOLE: u32 = EXTENT_HOLE | EXTENT_ZERO;

    fn ctx(export_name: &str, readonly: bool) -> OpenContext<'_> {
        OpenContext {
            readonly,
            export_name,
            is_tls: false,
        }
    }

    /// A temporary file of `len` bytes of 0xAA.
    fn data_file(len: usize) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![0xaa; len]).unwrap();
        f.flush().unwrap();
        f
    }

    fn open_file(path: &Path) -> Box<dyn Handle> {
        FilePlugin::for_file(path)
            .unwrap()
            .open(&ctx("", false))
            .unwrap()
    }

    fn extents_of(h: &dyn Handle, count: u64, offset: u64) -> Vec<Extent> {
        let mut e = Extents::new(offset, offset + count);
        h.extents(count, offset, Flags::NONE, &mut e).unwrap();
        e.as_slice().to_vec()
    }

    fn covered_by_hole(extents: &[Extent], start: u64, end: u64) -> bool {
        extents
            .iter()
            .any(|e| e.kind == HOLE && e.offset <= start && e.offset + e.length >= end)
    }

    fn read(h: &dyn Handle, len: usize, offset: u64) -> Vec<u8> {
        let mut buf = vec![0x55; len];
        h.pread(&mut buf, offset, Flags::NONE).unwrap();
        buf
    }

    #[test]
    fn pwrite_then_pread_round_trips_and_size_is_file_length() {
        let f = data_file(1 << 20);
        let h = open_file(f.path());
        assert_eq!(h.get_size().unwrap(), 1 << 20);
        assert!(h.can_write().unwrap());
        h.pwrite(&[1, 2, 3], 4095, Flags::FUA).unwrap();
        assert_eq!(read(&*h, 5, 4094), [0xaa, 1, 2, 3, 0xaa]);
    }

    #[test]
    fn pread_past_eof_is_error() {
        let f = data_file(100);
        let h = open_file(f.path());
        let mut buf = [0u8; 10];
        assert_eq!(
            h.pread(&mut buf, 95, Flags::NONE).unwrap_err().errno,
            Errno::EIO
        );
    }

    #[test]
    fn trim_punches_hole_shown_in_extents() {
        let f = data_file(1 << 20);
        let h = open_file(f.path());
        assert!(h.can_extents().unwrap());
        assert_eq!(
            extents_of(&*h, 1 << 20, 0),
            [Extent {
                offset: 0,
                length: 1 << 20,
                kind: 0
            }]
        );
        h.trim(64 << 10, 256 << 10, Flags::NONE).unwrap();
        let got = extents_of(&*h, 1 << 20, 0);
        assert!(covered_by_hole(&got, 256 << 10, 320 << 10), "{got:?}");
        assert!(read(&*h, 64 << 10, 256 << 10).iter().all(|&b| b == 0));
        assert_eq!(read(&*h, 1, (256 << 10) - 1), [0xaa]);
    }

    #[test]
    fn zero_with_may_trim_leaves_hole() {
        let f = data_file(1 << 20);
        let h = open_file(f.path());
        h.zero(128 << 10, 512 << 10, Flags::MAY_TRIM | Flags::FUA)
            .unwrap();
        assert!(read(&*h, 128 << 10, 512 << 10).iter().all(|&b| b == 0));
        let got = extents_of(&*h, 1 << 20, 0);
        assert!(covered_by_hole(&got, 512 << 10, 640 << 10), "{got:?}");
    }

    #[test]
    fn zero_without_may_trim_reads_zeroes() {
        let f = data_file(1 << 20);
        let h = open_file(f.path());
        h.zero(100_000, 3, Flags::NONE).unwrap();
        let got = read(&*h, 100_010, 0);
        assert_eq!(&got[..3], &[0xaa; 3]);
        assert!(got[3..100_003].iter().all(|&b| b == 0));
        assert_eq!(&got[100_003..], &[0xaa; 7]);
    }

    #[test]
    fn zero_fast_on_regular_file_succeeds() {
        let f = data_file(1 << 20);
        let h = open_file(f.path());
        h.zero(4096, 8192, Flags::FAST_ZERO).unwrap();
        assert!(read(&*h, 4096, 8192).iter().all(|&b| b == 0));
    }

    #[test]
    fn extents_sparse_file_is_hole_then_data() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        f.as_file().write_all_at(&[1; 4096], 512 << 10).unwrap();
        let h = open_file(f.path());
        let got = extents_of(&*h, 1 << 20, 0);
        assert_eq!(got.first().unwrap().kind, HOLE);
        assert!(got.iter().any(|e| e.kind == 0 && e.offset <= 512 << 10));
        assert_eq!(got.iter().map(|e| e.length).sum::<u64>(), 1 << 20);
        let mut one = Extents::new(0, 1 << 20);
        h.extents(1 << 20, 0, Flags::REQ_ONE, &mut one).unwrap();
        assert_eq!(one.as_slice(), &got[..1]);
    }

    #[test]
    fn open_readonly_context_cannot_write() {
        let f = data_file(4096);
        let h = FilePlugin::for_file(f.path())
            .unwrap()
            .open(&ctx("", true))
            .unwrap();
        assert!(!h.can_write().unwrap());
        assert_eq!(read(&*h, 2, 0), [0xaa, 0xaa]);
    }

    #[test]
    fn open_unwritable_file_falls_back_to_read_only() {
        use std::os::unix::fs::PermissionsExt;
        let f = data_file(4096);
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o444)).unwrap();
        // root ignores permissions; then there is nothing to fall back from.
        let refused = OpenOptions::new().write(true).open(f.path()).is_err();
        let h = open_file(f.path());
        assert_eq!(h.can_write().unwrap(), !refused);
    }

    #[test]
    fn from_args_missing_file_names_path() {
        let err = FilePlugin::from_args(&[ConfigArg::bare("/no/such/file")]).unwrap_err();
        assert!(matches!(err, ConfigError::FileNotFound { .. }));
        assert!(err.to_string().contains("/no/such/file"), "{err}");
    }

    #[test]
    fn from_args_rejects_bad_combinations_and_values() {
        let f = data_file(1);
        let dir = tempfile::tempdir().unwrap();
        let file = f.path().to_str().unwrap();
        let both = [
            ConfigArg::bare(file),
            ConfigArg::kv("dir", dir.path().to_str().unwrap()),
        ];
        assert!(matches!(
            FilePlugin::from_args(&both),
            Err(ConfigError::Invalid { .. })
        ));
        assert!(matches!(
            FilePlugin::from_args(&[]),
            Err(ConfigError::MissingParameter { .. })
        ));
        let bad_cache = [ConfigArg::bare(file), ConfigArg::kv("cache", "bogus")];
        assert!(matches!(
            FilePlugin::from_args(&bad_cache),
            Err(ConfigError::BadValue { .. })
        ));
        let unknown = [ConfigArg::bare(file), ConfigArg::kv("foo", "1")];
        assert!(matches!(
            FilePlugin::from_args(&unknown),
            Err(ConfigError::UnknownParameter { .. })
        ));
        assert!(matches!(
            FilePlugin::for_file(dir.path()),
            Err(ConfigError::BadFile { .. })
        ));
        assert!(matches!(
            FilePlugin::for_dir(f.path()),
            Err(ConfigError::BadFile { .. })
        ));
        let ok = [
            ConfigArg::bare(file),
            ConfigArg::kv("cache", "none"),
            ConfigArg::kv("fadvise", "sequential"),
        ];
        let h = FilePlugin::from_args(&ok)
            .unwrap()
            .open(&ctx("", false))
            .unwrap();
        h.pwrite(&[7], 0, Flags::NONE).unwrap();
        assert_eq!(read(&*h, 1, 0), [7]);
    }

    /// A directory with files `b` (1 MiB) and `a` (2 MiB), a symlink to `a`, a dangling
    /// symlink, a subdirectory and a fifo.
    fn export_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        File::create(p.join("b")).unwrap().set_len(1 << 20).unwrap();
        File::create(p.join("a")).unwrap().set_len(2 << 20).unwrap();
        std::os::unix::fs::symlink("a", p.join("link")).unwrap();
        std::os::unix::fs::symlink("/no/such/file", p.join("dangling")).unwrap();
        std::fs::create_dir(p.join("sub")).unwrap();
        let fifo = std::ffi::CString::new(p.join("fifo").to_str().unwrap()).unwrap();
        // SAFETY: `fifo` is a valid NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        dir
    }

    #[test]
    fn list_exports_dir_lists_servable_files_sorted() {
        let dir = export_dir();
        let plugin = FilePlugin::for_dir(dir.path()).unwrap();
        let names: Vec<_> = plugin
            .list_exports(false, false)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["a", "b", "link"]);
    }

    #[test]
    fn open_dir_serves_file_by_export_name() {
        let dir = export_dir();
        let plugin = FilePlugin::for_dir(dir.path()).unwrap();
        let h = plugin.open(&ctx("a", false)).unwrap();
        assert_eq!(h.get_size().unwrap(), 2 << 20);
        let h = plugin.open(&ctx("link", true)).unwrap();
        assert_eq!(h.get_size().unwrap(), 2 << 20);
    }

    #[test]
    fn open_dir_refuses_bad_names_with_enoent() {
        let dir = export_dir();
        let plugin = FilePlugin::for_dir(dir.path()).unwrap();
        for name in [
            "",
            ".",
            "..",
            "../b",
            "sub/x",
            "/etc/passwd",
            "sub",
            "fifo",
            "dangling",
            "nope",
        ] {
            let err = plugin.open(&ctx(name, false)).err().unwrap();
            assert_eq!(err.errno, Errno(libc::ENOENT), "{name:?}: {err}");
        }
    }

    #[test]
    fn list_exports_single_file_is_default_export() {
        let f = data_file(1);
        let plugin = FilePlugin::for_file(f.path()).unwrap();
        let list = plugin.list_exports(false, false).unwrap();
        assert_eq!(
            list,
            [ExportEntry {
                name: String::new(),
                description: None
            }]
        );
    }
}
