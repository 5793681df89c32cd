//! Persistent dirty bitmaps of raw images, kept in a sidecar file next to the image.
//!
//! A raw image has no room for metadata, so qemu refuses persistent bitmaps on it and an
//! incremental backup of a raw (or LVM-backed) disk has nowhere to keep its checkpoint across
//! a restart. sluice keeps them in `IMAGE.bitmaps`, beside the image (`IMAGE` with symlinks
//! resolved). The hard part is not the bits but trust: qemu, `dd` and every other tool write
//! raw images without knowing of that file, so a bitmap that looks valid may describe a disk
//! that has changed since. The file therefore records, besides the bitmaps, the image's
//! *identity* when it was saved (size, modification time to the nanosecond, device and
//! inode), and a loader that finds any of them changed loads every bitmap *inconsistent*
//! (shown, refused for use, removable or replaceable; see [`crate::bitmaps`]), never stale.
//! The ctime is not recorded: libvirt and backup tools chown, chmod and set xattrs on
//! images, and that must not cost a full backup. A tool that writes the image and then puts
//! its mtime back (`touch -r`, a restore that keeps times) defeats the check; nothing short
//! of reading the whole disk could catch it.
//!
//! A raw node over a **block device** (an LVM volume, a loop device) has no mtime that writes
//! keep and no directory that survives a reboot (`/dev` is a tmpfs), so it keeps its bitmaps
//! only in a file its `bitmap-file` option names, and its identity is the kernel's account
//! of the device instead (`sidecar/device.rs` has what it is made of, and what it does and
//! does not catch): the device number, size, `diskseq`, the boot id, and the device's write
//! and discard counters. That identity is stored in format version 2; regular files keep
//! version 1, so an older sluice still reads their files.
//!
//! **Format.** Big-endian integers, no padding. The header, version 1 (a regular file's
//! identity) in the first columns, version 2 (a block device's) in the last:
//!
//! | offset | size | version 1 | version 2 |
//! |---|---|---|---|
//! | 0 | 8 | magic `SLUICEBM` | the same |
//! | 8 | 4 | version, 1 | version, 2 |
//! | 12 | 4 | flags: bit 0 [`FLAG_IN_USE`] (a writer has the image open); other bits 0 | the same |
//! | 16 | 8 | image size in bytes at save | device size in bytes at save |
//! | 24 | 8 | image mtime, seconds (signed) | device number (`st_rdev`) |
//! | 32 | 4 | image mtime, nanoseconds (below 10^9) | reserved, 0 |
//! | 36 | 4 | number of bitmaps (at most [`MAX_BITMAPS`]) | the same |
//! | 40 | 8 | image `st_dev` | the disk's `diskseq` (0: the kernel has none) |
//! | 48 | 8 | image `st_ino` | boot id, first 8 of its 16 bytes |
//! | 56 | 8 | reserved, 0 | boot id, last 8 bytes |
//! | 64 | 8 | (the bitmaps start here) | write I/Os (field 5 of the device's `stat`) |
//! | 72 | 8 | | write sectors (field 7) |
//! | 80 | 8 | | discard I/Os (field 12; 0 on kernels before 4.18) |
//! | 88 | 8 | | discard sectors (field 14; likewise) |
//! | 96 | 32 | | reserved, 0 |
//!
//! Then, from offset 64 (version 1) or 128 (version 2), the same in both versions:
//!
//! | offset | size | field |
//! |---|---|---|
//! | +0 | 2 | name length, 1..=1023 bytes |
//! | +2 | 2 | flags: bit 0 [`ENTRY_ENABLED`] (records writes, qcow2's `auto`), bit 1 [`ENTRY_INCONSISTENT`]; other bits 0 |
//! | +4 | 1 | log2 of the granularity, 9..=31 |
//! | +5 | 3 | reserved, 0 |
//! | +8 | 8 | length of the bits in bytes: 0 for an inconsistent bitmap or in an in-use file, else `ceil(ceil(size / granularity) / 8)` |
//! | +16 | | the name (UTF-8), then the bits (qemu's serialization: bit `i` is bit `i % 8` of byte `i / 8`) |
//! | end | 4 | CRC-32 (zlib's, as `python3 -c 'import zlib'` computes it) of every byte before it |
//!
//! A file is one encoding with nothing after the checksum, so [`decode`] then [`encode`]
//! gives the same bytes. A file that does not parse (bad magic, unknown version, truncated)
//! is an error that names what is wrong; one that parses but fails its checksum is
//! [`SidecarError::Checksum`], and [`salvage`] still reads the names from it, so that the
//! node can show them inconsistent. The decoder never allocates more than the file's size.
//!
//! The version says which identity a file holds; a file of a version this code does not know
//! is refused ([`SidecarError::Version`]).
//!
//! **Writing** ([`write()`]) is atomic: a temporary file beside it (`IMAGE.bitmaps.tmp`, or
//! `PATH.tmp` for `bitmap-file=PATH`),
//! written, fsynced, renamed over the old one, and the directory fsynced, so a crash leaves
//! the old file or the new one. When and what is written is `node/persist.rs`'s.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub mod device;

pub use device::{DeviceIdentity, WriteCounters};

/// The file's first 8 bytes.
pub const MAGIC: [u8; 8] = *b"SLUICEBM";
/// The newest version this code reads and writes.
pub const VERSION: u32 = VERSION_DEVICE;
/// The version of a file that records a regular file's identity.
pub const VERSION_FILE: u32 = 1;
/// The version of a file that records a block device's identity.
pub const VERSION_DEVICE: u32 = 2;
/// Header flag: a writer had the image open (every bitmap is inconsistent).
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Entry flag: the bitmap records writes.
pub const ENTRY_ENABLED: u16 = 1 << 0;
/// Entry flag: the bitmap was inconsistent when saved (it has no bits).
pub const ENTRY_INCONSISTENT: u16 = 1 << 1;
/// Bitmaps per file (qcow2's limit).
pub const MAX_BITMAPS: usize = 65535;
/// Longest name in bytes (qemu's).
pub const MAX_NAME: usize = 1023;
/// Granularity limits in bits (512 B .. 2 GiB, qemu's).
pub const MIN_GRANULARITY_BITS: u8 = 9;
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// The most bytes of bits one bitmap may take (qcow2's `BME_MAX_PHYS_SIZE`).
pub const MAX_BITS_LEN: u64 = 0x2000_0000;

const HEADER_LEN_FILE: usize = 64;
const HEADER_LEN_DEVICE: usize = 128;
const ENTRY_LEN: usize = 16;
const CHECKSUM_LEN: usize = 4;

/// Why a sidecar file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SidecarError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not a sluice bitmap file (bad magic)")]
    BadMagic,
    #[error("version {0} (this sluice reads versions 1 to {VERSION}; a newer sluice wrote it?)")]
    Version(u32),
    #[error("truncated: the file has {len} bytes, its contents need {needed}")]
    Truncated { len: usize, needed: usize },
    #[error("corrupt: {0}")]
    Corrupt(String),
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
}

/// What identifies a regular image file (format version 1; see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FileIdentity {
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub dev: u64,
    pub ino: u64,
}

impl FileIdentity {
    /// Which part of `now` differs from `self` (the saved identity), or None.
    fn differs(&self, now: &FileIdentity) -> Option<&'static str> {
        if self.dev != now.dev || self.ino != now.ino {
            Some("its device or inode differs: it is another file")
        } else if self.size != now.size {
            Some("its size differs")
        } else if (self.mtime_sec, self.mtime_nsec) != (now.mtime_sec, now.mtime_nsec) {
            Some("its modification time differs")
        } else {
            None
        }
    }
}

/// What identifies the image a sidecar describes: a regular file's or a block device's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// A regular file (format version 1).
    File(FileIdentity),
    /// A block device (format version 2; see [`device`]).
    Device(DeviceIdentity),
}

impl Default for Identity {
    fn default() -> Identity {
        Identity::File(FileIdentity::default())
    }
}

impl Identity {
    /// The identity of an open image: a regular file's from its metadata, a block device's
    /// from the kernel (see [`device`]; fails if the kernel does not account its I/O).
    pub fn of(file: &File) -> std::io::Result<Identity> {
        let m = file.metadata()?;
        if m.file_type().is_block_device() {
            return Ok(Identity::Device(DeviceIdentity::of(file, m.rdev())?));
        }
        Ok(Identity::File(FileIdentity {
            size: m.size(),
            mtime_sec: m.mtime(),
            mtime_nsec: m.mtime_nsec() as u32,
            dev: m.dev(),
            ino: m.ino(),
        }))
    }

    /// The image's size when the identity was taken.
    pub fn size(&self) -> u64 {
        match self {
            Identity::File(f) => f.size,
            Identity::Device(d) => d.size,
        }
    }

    /// Why `now` is not the image `self` (a saved identity) describes, or None when it is:
    /// one line naming the part that differs, for the log.
    pub fn differs(&self, now: &Identity) -> Option<String> {
        match (self, now) {
            (Identity::File(a), Identity::File(b)) => a.differs(b).map(|part| {
                format!(
                    "the image was written, resized or replaced since sluice saved its \
                     bitmaps ({part})"
                )
            }),
            (Identity::Device(a), Identity::Device(b)) => a.differs(b),
            (Identity::File(_), Identity::Device(_)) => Some(
                "the bitmap file was saved for a regular image file, and the image is a \
                 block device now"
                    .into(),
            ),
            (Identity::Device(_), Identity::File(_)) => Some(
                "the bitmap file was saved for a block device, and the image is a regular \
                 file now"
                    .into(),
            ),
        }
    }

    fn version(&self) -> u32 {
        match self {
            Identity::File(_) => VERSION_FILE,
            Identity::Device(_) => VERSION_DEVICE,
        }
    }
}

/// One bitmap in a sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub granularity: u64,
    /// Records writes (qemu's "enabled", qcow2's `auto`).
    pub enabled: bool,
    /// Saved inconsistent: `bits` is empty.
    pub inconsistent: bool,
    /// The bits, in [`crate::DirtyMap::to_bytes`]'s layout; empty when inconsistent or in
    /// an in-use file.
    pub bits: Vec<u8>,
}

/// A sidecar file's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sidecar {
    /// A writer had the image open: every bitmap is inconsistent, none has bits.
    pub in_use: bool,
    pub identity: Identity,
    pub bitmaps: Vec<Entry>,
}

/// Bytes of bits a bitmap of `granularity` over `size` bytes takes.
pub fn bits_len(size: u64, granularity: u64) -> u64 {
    size.div_ceil(granularity).div_ceil(8)
}

/// Where the sidecar of the image at `image` lives: beside the file `image` resolves to.
pub fn path_for(image: &Path) -> std::io::Result<PathBuf> {
    let mut p = std::fs::canonicalize(image)?.into_os_string();
    p.push(".bitmaps");
    Ok(PathBuf::from(p))
}

fn tmp_path(sidecar: &Path) -> PathBuf {
    let mut p = sidecar.as_os_str().to_owned();
    p.push(".tmp");
    PathBuf::from(p)
}

const fn crc_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static CRC_TABLE: [u32; 256] = crc_table();

/// CRC-32 (IEEE 802.3, zlib's `crc32`).
pub fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// Encodes a sidecar (see the module doc for the layout).
pub fn encode(s: &Sidecar) -> Vec<u8> {
    let header_len = match s.identity {
        Identity::File(_) => HEADER_LEN_FILE,
        Identity::Device(_) => HEADER_LEN_DEVICE,
    };
    let len = header_len
        + s.bitmaps
            .iter()
            .map(|e| ENTRY_LEN + e.name.len() + e.bits.len())
            .sum::<usize>()
        + CHECKSUM_LEN;
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&s.identity.version().to_be_bytes());
    b.extend_from_slice(&(if s.in_use { FLAG_IN_USE } else { 0 }).to_be_bytes());
    let count = (s.bitmaps.len() as u32).to_be_bytes();
    match &s.identity {
        Identity::File(id) => {
            b.extend_from_slice(&id.size.to_be_bytes());
            b.extend_from_slice(&id.mtime_sec.to_be_bytes());
            b.extend_from_slice(&id.mtime_nsec.to_be_bytes());
            b.extend_from_slice(&count);
            b.extend_from_slice(&id.dev.to_be_bytes());
            b.extend_from_slice(&id.ino.to_be_bytes());
            b.extend_from_slice(&[0; 8]);
        }
        Identity::Device(id) => {
            b.extend_from_slice(&id.size.to_be_bytes());
            b.extend_from_slice(&id.rdev.to_be_bytes());
            b.extend_from_slice(&[0; 4]);
            b.extend_from_slice(&count);
            b.extend_from_slice(&id.diskseq.to_be_bytes());
            b.extend_from_slice(&id.boot_id);
            let c = &id.counters;
            for v in [
                c.write_ios,
                c.write_sectors,
                c.discard_ios,
                c.discard_sectors,
            ] {
                b.extend_from_slice(&v.to_be_bytes());
            }
            b.extend_from_slice(&[0; 32]);
        }
    }
    for e in &s.bitmaps {
        let mut flags: u16 = 0;
        if e.enabled {
            flags |= ENTRY_ENABLED;
        }
        if e.inconsistent {
            flags |= ENTRY_INCONSISTENT;
        }
        b.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.push(e.granularity.trailing_zeros() as u8);
        b.extend_from_slice(&[0; 3]);
        b.extend_from_slice(&(e.bits.len() as u64).to_be_bytes());
        b.extend_from_slice(e.name.as_bytes());
        b.extend_from_slice(&e.bits);
    }
    let crc = crc32(&b);
    b.extend_from_slice(&crc.to_be_bytes());
    b
}

fn corrupt<T>(msg: impl Into<String>) -> Result<T, SidecarError> {
    Err(SidecarError::Corrupt(msg.into()))
}

fn be<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    b[at..at + N].try_into().expect("length checked")
}

/// The structure of a file, checksum not checked: the sidecar and the offset its checksum
/// is at.
fn parse(data: &[u8]) -> Result<(Sidecar, usize), SidecarError> {
    let need = |needed: usize| -> Result<(), SidecarError> {
        if data.len() < needed {
            return Err(SidecarError::Truncated {
                len: data.len(),
                needed,
            });
        }
        Ok(())
    };
    if data.len() < MAGIC.len() || data[..MAGIC.len()] != MAGIC {
        return Err(SidecarError::BadMagic);
    }
    need(12)?;
    let version = u32::from_be_bytes(be(data, 8));
    let header_len = match version {
        VERSION_FILE => HEADER_LEN_FILE,
        VERSION_DEVICE => HEADER_LEN_DEVICE,
        v => return Err(SidecarError::Version(v)),
    };
    need(header_len)?;
    let flags = u32::from_be_bytes(be(data, 12));
    if flags & !FLAG_IN_USE != 0 {
        return corrupt(format!("unknown header flags {flags:#x}"));
    }
    let in_use = flags & FLAG_IN_USE != 0;
    let u64_at = |at: usize| u64::from_be_bytes(be(data, at));
    let identity = if version == VERSION_FILE {
        let id = FileIdentity {
            size: u64_at(16),
            mtime_sec: i64::from_be_bytes(be(data, 24)),
            mtime_nsec: u32::from_be_bytes(be(data, 32)),
            dev: u64_at(40),
            ino: u64_at(48),
        };
        if id.mtime_nsec >= 1_000_000_000 {
            return corrupt(format!("mtime nanoseconds {}", id.mtime_nsec));
        }
        if data[56..64] != [0; 8] {
            return corrupt("the header's reserved field is not zero");
        }
        Identity::File(id)
    } else {
        if data[32..36] != [0; 4] || data[96..128] != [0; 32] {
            return corrupt("the header's reserved field is not zero");
        }
        Identity::Device(DeviceIdentity {
            size: u64_at(16),
            rdev: u64_at(24),
            diskseq: u64_at(40),
            boot_id: be(data, 48),
            counters: WriteCounters {
                write_ios: u64_at(64),
                write_sectors: u64_at(72),
                discard_ios: u64_at(80),
                discard_sectors: u64_at(88),
            },
        })
    };
    let count = u32::from_be_bytes(be(data, 36)) as usize;
    if count > MAX_BITMAPS {
        return corrupt(format!("{count} bitmaps (the limit is {MAX_BITMAPS})"));
    }
    let mut at = header_len;
    let mut bitmaps: Vec<Entry> = Vec::new();
    for i in 0..count {
        need(at + ENTRY_LEN)?;
        let name_len = usize::from(u16::from_be_bytes(be(data, at)));
        let eflags = u16::from_be_bytes(be(data, at + 2));
        let gbits = data[at + 4];
        let bits_at = at + ENTRY_LEN + name_len;
        let stored_len = u64::from_be_bytes(be(data, at + 8));
        if data[at + 5..at + 8] != [0; 3] {
            return corrupt(format!("bitmap {i}: reserved bytes are not zero"));
        }
        if name_len == 0 || name_len > MAX_NAME {
            return corrupt(format!("bitmap {i}: name length {name_len}"));
        }
        if eflags & !(ENTRY_ENABLED | ENTRY_INCONSISTENT) != 0 {
            return corrupt(format!("bitmap {i}: unknown flags {eflags:#x}"));
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&gbits) {
            return corrupt(format!("bitmap {i}: granularity 2^{gbits}"));
        }
        let granularity = 1u64 << gbits;
        let inconsistent = eflags & ENTRY_INCONSISTENT != 0;
        let want = if in_use || inconsistent {
            0
        } else {
            bits_len(identity.size(), granularity)
        };
        if stored_len != want {
            return corrupt(format!(
                "bitmap {i}: {stored_len} bytes of bits, {want} expected"
            ));
        }
        need(bits_at)?;
        let name = std::str::from_utf8(&data[at + ENTRY_LEN..bits_at])
            .map_err(|_| SidecarError::Corrupt(format!("bitmap {i}: the name is not UTF-8")))?;
        if bitmaps.iter().any(|b| b.name == name) {
            return corrupt(format!("bitmap '{name}' is listed twice"));
        }
        // `want` is bounded by the file's length before anything is allocated for it.
        let end = usize::try_from(want)
            .ok()
            .and_then(|w| bits_at.checked_add(w))
            .filter(|&end| end <= data.len())
            .ok_or(SidecarError::Truncated {
                len: data.len(),
                needed: bits_at.saturating_add(want.try_into().unwrap_or(usize::MAX)),
            })?;
        bitmaps.push(Entry {
            name: name.to_owned(),
            granularity,
            enabled: eflags & ENTRY_ENABLED != 0,
            inconsistent,
            bits: data[bits_at..end].to_vec(),
        });
        at = end;
    }
    need(at + CHECKSUM_LEN)?;
    if data.len() > at + CHECKSUM_LEN {
        return corrupt(format!(
            "{} bytes after the checksum",
            data.len() - at - CHECKSUM_LEN
        ));
    }
    Ok((
        Sidecar {
            in_use,
            identity,
            bitmaps,
        },
        at,
    ))
}

/// Decodes a sidecar file's bytes, checking every field and the checksum.
pub fn decode(data: &[u8]) -> Result<Sidecar, SidecarError> {
    let (s, at) = parse(data)?;
    let stored = u32::from_be_bytes(be(data, at));
    let computed = crc32(&data[..at]);
    if stored != computed {
        return Err(SidecarError::Checksum { stored, computed });
    }
    Ok(s)
}

/// What can still be read of a file whose checksum fails: each bitmap's name, granularity
/// and enabled flag (the bits are not trusted). None if it does not parse either.
pub fn salvage(data: &[u8]) -> Option<Vec<(String, u64, bool)>> {
    let (s, _) = parse(data).ok()?;
    Some(
        s.bitmaps
            .into_iter()
            .map(|e| (e.name, e.granularity, e.enabled))
            .collect(),
    )
}

/// Reads the sidecar at `path`: None if there is none, else its bytes.
pub fn read(path: &Path) -> Result<Option<Vec<u8>>, SidecarError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// Writes `s` to `path` atomically and durably (see the module doc), with the permission
/// bits `mode` (the image's, so whoever may read the image may read its bitmaps).
pub fn write(path: &Path, s: &Sidecar, mode: u32) -> Result<(), SidecarError> {
    let tmp = tmp_path(path);
    let r = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode & 0o666)
            .open(&tmp)?;
        f.write_all(&encode(s))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(path)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r.map_err(SidecarError::from)
}

/// Removes the sidecar at `path` (and a temporary one a crash left), durably; nothing to do
/// if there is none.
pub fn remove(path: &Path) -> Result<(), SidecarError> {
    let _ = std::fs::remove_file(tmp_path(path));
    match std::fs::remove_file(path) {
        Ok(()) => Ok(sync_dir(path)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Checks that a sidecar can be created at `path` (its directory is writable): creates and
/// removes the temporary file.
pub fn check_writable(path: &Path) -> std::io::Result<()> {
    let tmp = tmp_path(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    std::fs::remove_file(&tmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Sidecar {
        Sidecar {
            in_use: false,
            identity: Identity::File(FileIdentity {
                size: 1 << 20,
                mtime_sec: 1_700_000_000,
                mtime_nsec: 123_456_789,
                dev: 0x803,
                ino: 42,
            }),
            bitmaps: vec![
                Entry {
                    name: "daily".into(),
                    granularity: 65536,
                    enabled: true,
                    inconsistent: false,
                    bits: vec![0b101, 0x80],
                },
                Entry {
                    name: "old".into(),
                    granularity: 512,
                    enabled: true,
                    inconsistent: true,
                    bits: vec![],
                },
                Entry {
                    name: "off".into(),
                    granularity: 1 << 20,
                    enabled: false,
                    inconsistent: false,
                    bits: vec![1],
                },
            ],
        }
    }

    #[test]
    fn crc32_is_zlibs() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn encode_decode_round_trip_is_exact() {
        let s = sample();
        let b = encode(&s);
        assert_eq!(&b[..8], b"SLUICEBM");
        assert_eq!(b.len(), 64 + (16 + 5 + 2) + (16 + 3) + (16 + 3 + 1) + 4);
        assert_eq!(decode(&b).unwrap(), s);
        assert_eq!(encode(&decode(&b).unwrap()), b);
        let in_use = Sidecar {
            in_use: true,
            bitmaps: s
                .bitmaps
                .iter()
                .map(|e| Entry {
                    bits: vec![],
                    ..e.clone()
                })
                .collect(),
            ..s
        };
        assert_eq!(decode(&encode(&in_use)).unwrap(), in_use);
        let empty = Sidecar {
            in_use: false,
            identity: Identity::default(),
            bitmaps: vec![],
        };
        assert_eq!(decode(&encode(&empty)).unwrap(), empty);
    }

    /// The [`sample`]'s bitmaps over a block device's identity.
    fn device_sample() -> Sidecar {
        Sidecar {
            identity: Identity::Device(DeviceIdentity {
                size: 1 << 20,
                rdev: 0x700 + 3,
                diskseq: 13,
                boot_id: *b"0123456789abcdef",
                counters: WriteCounters {
                    write_ios: 3,
                    write_sectors: 2056,
                    discard_ios: 1,
                    discard_sectors: 128,
                },
            }),
            ..sample()
        }
    }

    #[test]
    fn version_2_holds_a_block_devices_identity_and_round_trips() {
        let s = device_sample();
        let b = encode(&s);
        assert_eq!(&b[8..12], &2u32.to_be_bytes());
        assert_eq!(b.len(), 128 + (16 + 5 + 2) + (16 + 3) + (16 + 3 + 1) + 4);
        assert_eq!(&b[24..32], &0x703u64.to_be_bytes());
        assert_eq!(&b[48..64], b"0123456789abcdef");
        assert_eq!(&b[72..80], &2056u64.to_be_bytes());
        assert_eq!(&b[88..96], &128u64.to_be_bytes());
        assert_eq!(decode(&b).unwrap(), s);
        assert_eq!(encode(&decode(&b).unwrap()), b);
        // A regular file's identity stays version 1, as older sluices wrote and read it.
        assert_eq!(&encode(&sample())[8..12], &1u32.to_be_bytes());
        // Reserved header bytes of version 2.
        for at in [32, 100, 127] {
            let mut b = encode(&s);
            b[at] = 1;
            let n = b.len() - 4;
            let c = crc32(&b[..n]);
            b[n..].copy_from_slice(&c.to_be_bytes());
            assert_eq!(
                decode(&b).unwrap_err().to_string(),
                "corrupt: the header's reserved field is not zero"
            );
        }
        // Truncated in the longer header.
        assert_eq!(
            decode(&b[..100]).unwrap_err().to_string(),
            "truncated: the file has 100 bytes, its contents need 128"
        );
    }

    /// A version-1 file written byte by byte from the table of the format before version 2
    /// existed: this sluice still reads it, with the identity it recorded.
    #[test]
    fn version_1_file_from_before_version_2_still_loads() {
        let mut b = Vec::new();
        b.extend_from_slice(b"SLUICEBM");
        b.extend_from_slice(&1u32.to_be_bytes()); // version
        b.extend_from_slice(&0u32.to_be_bytes()); // flags
        b.extend_from_slice(&(1u64 << 20).to_be_bytes()); // size
        b.extend_from_slice(&1_700_000_000i64.to_be_bytes()); // mtime s
        b.extend_from_slice(&5u32.to_be_bytes()); // mtime ns
        b.extend_from_slice(&1u32.to_be_bytes()); // bitmaps
        b.extend_from_slice(&0x803u64.to_be_bytes()); // st_dev
        b.extend_from_slice(&42u64.to_be_bytes()); // st_ino
        b.extend_from_slice(&[0; 8]);
        b.extend_from_slice(&1u16.to_be_bytes()); // name length
        b.extend_from_slice(&1u16.to_be_bytes()); // enabled
        b.extend_from_slice(&[16, 0, 0, 0]); // 64 KiB
        b.extend_from_slice(&2u64.to_be_bytes());
        b.extend_from_slice(b"b");
        b.extend_from_slice(&[0x02, 0x00]);
        let crc = crc32(&b);
        b.extend_from_slice(&crc.to_be_bytes());
        let s = decode(&b).unwrap();
        assert_eq!(
            s.identity,
            Identity::File(FileIdentity {
                size: 1 << 20,
                mtime_sec: 1_700_000_000,
                mtime_nsec: 5,
                dev: 0x803,
                ino: 42
            })
        );
        assert_eq!(s.bitmaps.len(), 1);
        assert_eq!(s.bitmaps[0].bits, [2, 0]);
        assert_eq!(encode(&s), b);
    }

    #[test]
    fn identity_differs_names_the_part() {
        let Identity::File(f) = sample().identity else {
            unreachable!()
        };
        let file = Identity::File(f);
        assert_eq!(file.differs(&file), None);
        let later = Identity::File(FileIdentity { mtime_nsec: 6, ..f });
        assert_eq!(
            file.differs(&later).unwrap(),
            "the image was written, resized or replaced since sluice saved its bitmaps (its \
             modification time differs)"
        );
        let other = Identity::File(FileIdentity { ino: 43, ..f });
        assert!(file
            .differs(&other)
            .unwrap()
            .ends_with("(its device or inode differs: it is another file)"));
        let dev = device_sample().identity;
        assert!(file
            .differs(&dev)
            .unwrap()
            .starts_with("the bitmap file was saved for a regular image file"));
        assert!(dev
            .differs(&file)
            .unwrap()
            .starts_with("the bitmap file was saved for a block device"));
    }

    #[test]
    fn decode_bad_magic_or_version_is_refused() {
        let mut b = encode(&sample());
        b[8..12].copy_from_slice(&3u32.to_be_bytes());
        assert_eq!(
            decode(&b).unwrap_err().to_string(),
            "version 3 (this sluice reads versions 1 to 2; a newer sluice wrote it?)"
        );
        b[8..12].copy_from_slice(&0u32.to_be_bytes());
        assert!(matches!(decode(&b), Err(SidecarError::Version(0))));
        b[0] = b'X';
        assert!(matches!(decode(&b), Err(SidecarError::BadMagic)));
        assert!(matches!(decode(b"SLUI"), Err(SidecarError::BadMagic)));
        assert!(matches!(decode(b""), Err(SidecarError::BadMagic)));
    }

    #[test]
    fn decode_flipped_bit_fails_checksum_but_names_are_salvaged() {
        let mut b = encode(&sample());
        let last_bits = b.len() - 5;
        b[last_bits] ^= 0x10;
        let e = decode(&b).unwrap_err();
        assert!(matches!(e, SidecarError::Checksum { .. }), "{e}");
        assert!(e.to_string().starts_with("checksum mismatch"), "{e}");
        let names = salvage(&b).unwrap();
        assert_eq!(
            names,
            [
                ("daily".to_string(), 65536, true),
                ("old".to_string(), 512, true),
                ("off".to_string(), 1 << 20, false)
            ]
        );
    }

    #[test]
    fn decode_truncated_file_at_every_length_is_an_error_not_a_panic() {
        let b = encode(&sample());
        for len in 0..b.len() {
            let e = decode(&b[..len]).unwrap_err();
            assert!(
                matches!(e, SidecarError::Truncated { .. } | SidecarError::BadMagic),
                "{len}: {e}"
            );
            assert!(salvage(&b[..len]).is_none());
        }
        assert_eq!(
            decode(&b[..70]).unwrap_err().to_string(),
            "truncated: the file has 70 bytes, its contents need 80"
        );
        let mut longer = b.clone();
        longer.push(0);
        assert_eq!(
            decode(&longer).unwrap_err().to_string(),
            "corrupt: 1 bytes after the checksum"
        );
    }

    #[test]
    fn decode_refuses_bad_fields() {
        let fix = |b: &mut Vec<u8>| {
            let n = b.len() - 4;
            let c = crc32(&b[..n]);
            b[n..].copy_from_slice(&c.to_be_bytes());
        };
        let cases: [(usize, &[u8], &str); 6] = [
            (12, &[0, 0, 0, 2], "unknown header flags 0x2"),
            (56, &[1], "the header's reserved field is not zero"),
            (64, &[0, 0], "bitmap 0: name length 0"),
            (66, &[0, 4], "bitmap 0: unknown flags 0x4"),
            (68, &[8], "bitmap 0: granularity 2^8"),
            (78, &[0, 3], "bitmap 0: 3 bytes of bits, 2 expected"),
        ];
        for (at, bytes, want) in cases {
            let mut b = encode(&sample());
            b[at..at + bytes.len()].copy_from_slice(bytes);
            fix(&mut b);
            assert_eq!(
                decode(&b).unwrap_err().to_string(),
                format!("corrupt: {want}")
            );
        }
        // The same name twice.
        let mut s = sample();
        s.bitmaps[1].name = "daily".into();
        assert_eq!(
            decode(&encode(&s)).unwrap_err().to_string(),
            "corrupt: bitmap 'daily' is listed twice"
        );
        // A huge size makes a huge bits length: refused as truncated, nothing allocated.
        let mut b = encode(&sample());
        b[16..24].copy_from_slice(&u64::MAX.to_be_bytes());
        b[72..80].copy_from_slice(&bits_len(u64::MAX, 65536).to_be_bytes());
        fix(&mut b);
        assert!(matches!(decode(&b), Err(SidecarError::Truncated { .. })));
    }

    #[test]
    fn write_is_atomic_and_remove_takes_it_away() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.raw");
        std::fs::write(&img, [0u8; 512]).unwrap();
        let p = path_for(&img).unwrap();
        assert_eq!(p.file_name().unwrap(), "disk.raw.bitmaps");
        assert!(read(&p).unwrap().is_none());
        check_writable(&p).unwrap();
        write(&p, &sample(), 0o640).unwrap();
        assert_eq!(decode(&read(&p).unwrap().unwrap()).unwrap(), sample());
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o640);
        assert!(!tmp_path(&p).exists());
        remove(&p).unwrap();
        assert!(!p.exists());
        remove(&p).unwrap();
    }
}
