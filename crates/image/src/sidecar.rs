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
//! **Format, version 1.** Big-endian integers, no padding:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `SLUICEBM` |
//! | 8 | 4 | version, 1 |
//! | 12 | 4 | flags: bit 0 [`FLAG_IN_USE`] (a writer has the image open); other bits 0 |
//! | 16 | 8 | image size in bytes at save |
//! | 24 | 8 | image mtime, seconds (signed) |
//! | 32 | 4 | image mtime, nanoseconds (below 10^9) |
//! | 36 | 4 | number of bitmaps (at most [`MAX_BITMAPS`]) |
//! | 40 | 8 | image `st_dev` |
//! | 48 | 8 | image `st_ino` |
//! | 56 | 8 | reserved, 0 |
//! | 64 | | the bitmaps, each: |
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
//! **Writing** ([`write`]) is atomic: a temporary file beside it (`IMAGE.bitmaps.tmp`),
//! written, fsynced, renamed over the old one, and the directory fsynced, so a crash leaves
//! the old file or the new one. When and what is written is `node/persist.rs`'s.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The file's first 8 bytes.
pub const MAGIC: [u8; 8] = *b"SLUICEBM";
/// The version this code reads and writes.
pub const VERSION: u32 = 1;
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

const HEADER_LEN: usize = 64;
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
    #[error("version {0} (this sluice reads version {VERSION}; a newer sluice wrote it?)")]
    Version(u32),
    #[error("truncated: the file has {len} bytes, its contents need {needed}")]
    Truncated { len: usize, needed: usize },
    #[error("corrupt: {0}")]
    Corrupt(String),
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
}

/// What identifies the image a sidecar describes (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Identity {
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub dev: u64,
    pub ino: u64,
}

impl Identity {
    /// The identity of an open image file.
    pub fn of(file: &File) -> std::io::Result<Identity> {
        let m = file.metadata()?;
        Ok(Identity {
            size: m.size(),
            mtime_sec: m.mtime(),
            mtime_nsec: m.mtime_nsec() as u32,
            dev: m.dev(),
            ino: m.ino(),
        })
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
    let len = HEADER_LEN
        + s.bitmaps
            .iter()
            .map(|e| ENTRY_LEN + e.name.len() + e.bits.len())
            .sum::<usize>()
        + CHECKSUM_LEN;
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&VERSION.to_be_bytes());
    b.extend_from_slice(&(if s.in_use { FLAG_IN_USE } else { 0 }).to_be_bytes());
    let id = &s.identity;
    b.extend_from_slice(&id.size.to_be_bytes());
    b.extend_from_slice(&id.mtime_sec.to_be_bytes());
    b.extend_from_slice(&id.mtime_nsec.to_be_bytes());
    b.extend_from_slice(&(s.bitmaps.len() as u32).to_be_bytes());
    b.extend_from_slice(&id.dev.to_be_bytes());
    b.extend_from_slice(&id.ino.to_be_bytes());
    b.extend_from_slice(&[0; 8]);
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
    if version != VERSION {
        return Err(SidecarError::Version(version));
    }
    need(HEADER_LEN)?;
    let flags = u32::from_be_bytes(be(data, 12));
    if flags & !FLAG_IN_USE != 0 {
        return corrupt(format!("unknown header flags {flags:#x}"));
    }
    let in_use = flags & FLAG_IN_USE != 0;
    let identity = Identity {
        size: u64::from_be_bytes(be(data, 16)),
        mtime_sec: i64::from_be_bytes(be(data, 24)),
        mtime_nsec: u32::from_be_bytes(be(data, 32)),
        dev: u64::from_be_bytes(be(data, 40)),
        ino: u64::from_be_bytes(be(data, 48)),
    };
    if identity.mtime_nsec >= 1_000_000_000 {
        return corrupt(format!("mtime nanoseconds {}", identity.mtime_nsec));
    }
    let count = u32::from_be_bytes(be(data, 36)) as usize;
    if count > MAX_BITMAPS {
        return corrupt(format!("{count} bitmaps (the limit is {MAX_BITMAPS})"));
    }
    if data[56..64] != [0; 8] {
        return corrupt("the header's reserved field is not zero");
    }
    let mut at = HEADER_LEN;
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
            bits_len(identity.size, granularity)
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
            identity: Identity {
                size: 1 << 20,
                mtime_sec: 1_700_000_000,
                mtime_nsec: 123_456_789,
                dev: 0x803,
                ino: 42,
            },
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

    #[test]
    fn decode_bad_magic_or_version_is_refused() {
        let mut b = encode(&sample());
        b[8..12].copy_from_slice(&2u32.to_be_bytes());
        assert_eq!(
            decode(&b).unwrap_err().to_string(),
            "version 2 (this sluice reads version 1; a newer sluice wrote it?)"
        );
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
