//! Persistent dirty bitmaps in qcow2 images, byte-compatible with qemu
//! (`docs/interop/qcow2.txt`, "Bitmaps extension"; qemu's `block/qcow2-bitmap.c`).
//!
//! On disk a qcow2 v3 image holds its bitmaps behind the header extension `0x23852875`
//! ([`BitmapsExt`]: count, directory size and offset), which is only valid while autoclear
//! feature bit 0 is set: a program that does not know bitmaps clears every autoclear bit
//! when it opens the image writable, and that tells the next reader the bitmaps may be stale.
//! The directory is a list of [`DirEntry`] (name, granularity, flags `in_use` and `auto`,
//! and the offset of a one-level bitmap table); each table entry points to a cluster of
//! bitmap data (bit `i` of the bitmap is bit `i % 8` of byte `i / 8`), or is 0 for a clean
//! cluster (with bit 0 set: an all-dirty one).
//!
//! The life cycle is qemu's, so that qemu and sluice can hand an image back and forth:
//! - [`load`] reads every bitmap at open. An entry with `in_use` set was being changed by a
//!   program that did not close the image (a crash, kill -9): it is loaded *inconsistent*,
//!   with no bits, and refuses every use but removal, never silently wrong.
//! - [`mark_in_use`], for a writable open: sets `in_use` on every entry, in place, and sets
//!   autoclear bit 0 again (imago, like any bitmap-unaware opener, cleared it). From here
//!   until the image is closed, a crash leaves the bitmaps detectably inconsistent.
//! - [`store`] at close: writes every consistent persistent bitmap into newly allocated
//!   clusters (through [`crate::refcounts`], so `qemu-img check` stays clean), a new
//!   directory without `in_use`, the header, then frees the old clusters.
//!
//! The parsers are pure (bytes in, typed values or a typed error out); the I/O functions go
//! through [`Io`] so the unit tests run on a byte vector. The limits and the checks on what
//! is read are qemu's (`check_dir_entry`, `check_table_entry`, `bitmap_list_load`).

use std::collections::HashSet;

use crate::dirty::DirtyMap;
use crate::header::{Extension, Qcow2Header, EXT_BITMAPS};
use crate::refcounts::{Io, RefcountError, Refcounts};

/// Autoclear feature bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1;
/// Byte offset of `autoclear_features` in a v3 header.
pub const AUTOCLEAR_OFFSET: u64 = 88;
/// Directory entry flag: the bitmap is being changed (by an open writer).
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Directory entry flag: the bitmap records writes (qemu's "enabled").
pub const FLAG_AUTO: u32 = 1 << 1;
/// Directory entry flag: unknown extra data may be ignored.
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
const KNOWN_FLAGS: u32 = FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE;
/// The only bitmap type: dirty tracking.
pub const TYPE_DIRTY_TRACKING: u8 = 1;
/// Granularity limits in bits (512 B .. 2 GiB).
pub const MIN_GRANULARITY_BITS: u8 = 9;
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// qemu's limits: bitmaps per image, directory bytes, entries per bitmap table, name bytes.
pub const MAX_BITMAPS: usize = 65535;
pub const MAX_DIRECTORY_SIZE: u64 = 64 << 20;
pub const MAX_TABLE_SIZE: u64 = 0x800_0000;
/// qemu's limit on a bitmap's data (`BME_MAX_PHYS_SIZE`, bounds the memory it takes).
pub const MAX_PHYS_SIZE: u64 = 0x2000_0000;
pub const MAX_NAME: usize = 1023;
/// Bitmap table entry: bits 9..55 are the data cluster's offset.
pub const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bitmap table entry: with offset 0, the cluster is all ones.
pub const TABLE_ALL_ONES: u64 = 1;
const TABLE_RESERVED: u64 = 0xff00_0000_0000_01fe;

/// What is wrong with an image's bitmaps, or why they could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Qcow2BitmapError {
    #[error("I/O error on the bitmaps: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Refcount(#[from] RefcountError),
    /// A field breaks the specification (or qemu's limits).
    #[error("corrupt bitmaps extension: {0}; `qemu-img check -r all` can repair the image")]
    Corrupt(String),
    /// Valid, but not something sluice (or qemu) can load or store.
    #[error("{0}")]
    Unsupported(String),
}

type Res<T> = Result<T, Qcow2BitmapError>;

fn corrupt<T>(msg: impl Into<String>) -> Res<T> {
    Err(Qcow2BitmapError::Corrupt(msg.into()))
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The bitmaps header extension (24 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Bytes 0..4.
    pub nb_bitmaps: u32,
    // Bytes 4..8: reserved, zero.
    /// Bytes 8..16.
    pub directory_size: u64,
    /// Bytes 16..24 (cluster-aligned).
    pub directory_offset: u64,
}

impl BitmapsExt {
    pub const LEN: usize = 24;

    pub fn parse(data: &[u8]) -> Res<BitmapsExt> {
        if data.len() != Self::LEN {
            return corrupt(format!(
                "the extension is {} bytes, not {}",
                data.len(),
                Self::LEN
            ));
        }
        if be32(data, 4) != 0 {
            return corrupt("the extension's reserved field is not zero");
        }
        let ext = BitmapsExt {
            nb_bitmaps: be32(data, 0),
            directory_size: be64(data, 8),
            directory_offset: be64(data, 16),
        };
        if ext.nb_bitmaps == 0 {
            return corrupt("the extension lists no bitmaps");
        }
        if ext.nb_bitmaps as usize > MAX_BITMAPS {
            return corrupt(format!(
                "{} bitmaps (qemu's limit: {MAX_BITMAPS})",
                ext.nb_bitmaps
            ));
        }
        if ext.directory_size == 0 || ext.directory_size > MAX_DIRECTORY_SIZE {
            return corrupt(format!("directory size {}", ext.directory_size));
        }
        Ok(ext)
    }

    pub fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..4].copy_from_slice(&self.nb_bitmaps.to_be_bytes());
        b[8..16].copy_from_slice(&self.directory_size.to_be_bytes());
        b[16..24].copy_from_slice(&self.directory_offset.to_be_bytes());
        b
    }
}

/// One bitmap directory entry: 24 fixed bytes, extra data, the name, padding to 8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Bytes 0..8: the bitmap table's offset (cluster-aligned).
    pub table_offset: u64,
    /// Bytes 8..12: entries in the bitmap table.
    pub table_size: u32,
    /// Bytes 12..16: [`FLAG_IN_USE`], [`FLAG_AUTO`], [`FLAG_EXTRA_DATA_COMPATIBLE`].
    pub flags: u32,
    /// Byte 16: [`TYPE_DIRTY_TRACKING`].
    pub kind: u8,
    /// Byte 17: log2 of the granularity.
    pub granularity_bits: u8,
    // Bytes 18..20: name size; 20..24: extra data size.
    /// Bytes 24..24+extra.
    pub extra_data: Vec<u8>,
    /// After the extra data.
    pub name: String,
}

impl DirEntry {
    pub const FIXED_LEN: usize = 24;

    /// Bytes this entry takes in the directory (padded to 8).
    pub fn encoded_len(&self) -> usize {
        (Self::FIXED_LEN + self.extra_data.len() + self.name.len()).next_multiple_of(8)
    }

    /// Parses the entry at the start of `buf`; returns it and its padded length.
    pub fn parse(buf: &[u8]) -> Res<(DirEntry, usize)> {
        if buf.len() < Self::FIXED_LEN {
            return corrupt("a directory entry runs past the end of the directory");
        }
        let name_size = u16::from_be_bytes([buf[18], buf[19]]) as usize;
        let extra_size = be32(buf, 20) as usize;
        let len = (Self::FIXED_LEN + extra_size + name_size).next_multiple_of(8);
        if buf.len() < len {
            return corrupt("a directory entry runs past the end of the directory");
        }
        let name_at = Self::FIXED_LEN + extra_size;
        let name = std::str::from_utf8(&buf[name_at..name_at + name_size])
            .map_err(|_| Qcow2BitmapError::Corrupt("a bitmap name is not UTF-8".into()))?;
        Ok((
            DirEntry {
                table_offset: be64(buf, 0),
                table_size: be32(buf, 8),
                flags: be32(buf, 12),
                kind: buf[16],
                granularity_bits: buf[17],
                extra_data: buf[Self::FIXED_LEN..name_at].to_vec(),
                name: name.to_owned(),
            },
            len,
        ))
    }

    /// Appends the entry, padded, to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.table_offset.to_be_bytes());
        out.extend_from_slice(&self.table_size.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.push(self.kind);
        out.push(self.granularity_bits);
        out.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&(self.extra_data.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.extra_data);
        out.extend_from_slice(self.name.as_bytes());
        out.resize(start + self.encoded_len(), 0);
    }

    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }

    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }

    /// qemu's `check_dir_entry` and the table size of the image's current disk size.
    fn check(&self, cluster_size: u64, disk_size: u64) -> Res<()> {
        let name = &self.name;
        if self.name.is_empty() || self.name.len() > MAX_NAME {
            return corrupt(format!("bitmap name of {} bytes", self.name.len()));
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&self.granularity_bits) {
            return corrupt(format!(
                "bitmap '{name}' has granularity bits {}",
                self.granularity_bits
            ));
        }
        if self.flags & !KNOWN_FLAGS != 0 {
            return corrupt(format!(
                "bitmap '{name}' has unknown flags {:#x}",
                self.flags
            ));
        }
        if self.kind != TYPE_DIRTY_TRACKING {
            return Err(Qcow2BitmapError::Unsupported(format!(
                "bitmap '{name}' has type {}, not a dirty tracking bitmap",
                self.kind
            )));
        }
        if !self.extra_data.is_empty() && self.flags & FLAG_EXTRA_DATA_COMPATIBLE == 0 {
            return Err(Qcow2BitmapError::Unsupported(format!(
                "bitmap '{name}' has extra data that cannot be ignored"
            )));
        }
        if u64::from(self.table_size) > MAX_TABLE_SIZE
            || u64::from(self.table_size) * cluster_size > MAX_PHYS_SIZE
        {
            return corrupt(format!(
                "bitmap '{name}' has a table of {}",
                self.table_size
            ));
        }
        if self.table_offset == 0 || !self.table_offset.is_multiple_of(cluster_size) {
            return corrupt(format!(
                "bitmap '{name}' has its table at {:#x}",
                self.table_offset
            ));
        }
        let want = table_size(disk_size, self.granularity(), cluster_size);
        if u64::from(self.table_size) != want {
            return corrupt(format!(
                "bitmap '{name}' has a table of {} entries, the disk size needs {want}",
                self.table_size
            ));
        }
        Ok(())
    }
}

/// Bitmap table entries (data clusters) a bitmap of `granularity` over `disk_size` needs.
pub fn table_size(disk_size: u64, granularity: u64, cluster_size: u64) -> u64 {
    disk_size
        .div_ceil(granularity)
        .div_ceil(8)
        .div_ceil(cluster_size)
}

/// Parses `nb` entries filling exactly `buf` (the directory), with qemu's checks.
pub fn parse_directory(
    buf: &[u8],
    nb: u32,
    cluster_size: u64,
    disk_size: u64,
) -> Res<Vec<DirEntry>> {
    let mut entries = Vec::with_capacity(nb as usize);
    let mut names = HashSet::new();
    let mut at = 0;
    for _ in 0..nb {
        let (e, len) = DirEntry::parse(&buf[at..])?;
        e.check(cluster_size, disk_size)?;
        if !names.insert(e.name.clone()) {
            return corrupt(format!("bitmap '{}' is listed twice", e.name));
        }
        entries.push(e);
        at += len;
    }
    if at != buf.len() {
        return corrupt(format!(
            "the directory is {} bytes, its {nb} entries take {at}",
            buf.len()
        ));
    }
    Ok(entries)
}

/// Encodes a directory.
pub fn encode_directory(entries: &[DirEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.iter().map(DirEntry::encoded_len).sum());
    for e in entries {
        e.encode_into(&mut out);
    }
    out
}

/// The bitmaps extension of a header, if it has one.
pub fn extension(h: &Qcow2Header) -> Res<Option<BitmapsExt>> {
    h.extensions
        .iter()
        .find(|e| e.kind == EXT_BITMAPS)
        .map(|e| BitmapsExt::parse(&e.data))
        .transpose()
}

/// Reads the directory the header's extension names (None: no extension).
pub fn read_directory(io: &dyn Io, h: &Qcow2Header) -> Res<Option<(BitmapsExt, Vec<DirEntry>)>> {
    let Some(ext) = extension(h)? else {
        return Ok(None);
    };
    let cs = h.cluster_size();
    if !ext.directory_offset.is_multiple_of(cs) || ext.directory_offset == 0 {
        return corrupt(format!(
            "the directory is at {:#x}, not a cluster boundary",
            ext.directory_offset
        ));
    }
    let mut buf = vec![0u8; ext.directory_size as usize];
    io.read_at(&mut buf, ext.directory_offset)?;
    let entries = parse_directory(&buf, ext.nb_bitmaps, cs, h.size)?;
    Ok(Some((ext, entries)))
}

/// One bitmap as [`load`] found it.
#[derive(Debug)]
pub struct LoadedBitmap {
    pub name: String,
    pub granularity: u64,
    /// The `auto` flag: records writes.
    pub recording: bool,
    /// `in_use` was set: the bits are unknown (and `map` is clean).
    pub inconsistent: bool,
    pub map: DirtyMap,
}

/// Reads a bitmap table, checking each entry (qemu's `check_table_entry`).
fn read_table(io: &dyn Io, e: &DirEntry, cs: u64) -> Res<Vec<u64>> {
    let mut raw = vec![0u8; e.table_size as usize * 8];
    io.read_at(&mut raw, e.table_offset)?;
    let table: Vec<u64> = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
    for (i, &t) in table.iter().enumerate() {
        let offset = t & TABLE_OFFSET_MASK;
        let bad = t & TABLE_RESERVED != 0
            || (offset != 0 && (t & TABLE_ALL_ONES != 0 || !offset.is_multiple_of(cs)));
        if bad {
            return corrupt(format!("bitmap '{}' table entry {i} is {t:#x}", e.name));
        }
    }
    Ok(table)
}

/// Reads every bitmap of the image (see the module doc). `disk_size` is the node's size.
/// An image whose extension is present but autoclear bit 0 is not set gives no bitmaps
/// (qemu drops them with a warning: a bitmap-unaware program wrote the image after them).
pub fn load(io: &dyn Io, h: &Qcow2Header) -> Res<Vec<LoadedBitmap>> {
    if h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
        return Ok(Vec::new());
    }
    let Some((_, entries)) = read_directory(io, h)? else {
        return Ok(Vec::new());
    };
    let cs = h.cluster_size();
    let mut out = Vec::with_capacity(entries.len());
    for e in &entries {
        let map = DirtyMap::new(h.size, e.granularity());
        if !e.in_use() {
            let table = read_table(io, e, cs)?;
            let mut bytes = vec![0u8; (table.len() as u64 * cs) as usize];
            for (i, &t) in table.iter().enumerate() {
                let chunk = &mut bytes[i * cs as usize..(i + 1) * cs as usize];
                let offset = t & TABLE_OFFSET_MASK;
                if offset != 0 {
                    io.read_at(chunk, offset)?;
                } else if t & TABLE_ALL_ONES != 0 {
                    chunk.fill(0xff);
                }
            }
            map.load_bytes(&bytes);
        }
        out.push(LoadedBitmap {
            name: e.name.clone(),
            granularity: e.granularity(),
            recording: e.flags & FLAG_AUTO != 0,
            inconsistent: e.in_use(),
            map,
        });
    }
    Ok(out)
}

/// For a writable open: sets `in_use` on every entry, in place, then autoclear bit 0 (see
/// the module doc). Does nothing without a (consistent) extension.
pub fn mark_in_use(io: &dyn Io, h: &Qcow2Header) -> Res<()> {
    if h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
        return Ok(());
    }
    let Some((ext, mut entries)) = read_directory(io, h)? else {
        return Ok(());
    };
    for e in &mut entries {
        e.flags |= FLAG_IN_USE;
    }
    io.write_at(&encode_directory(&entries), ext.directory_offset)?;
    io.sync()?;
    // Only bit 0: the other autoclear bits stay as the opener left them (cleared), since
    // nothing here keeps what they promise.
    set_autoclear(io, AUTOCLEAR_BITMAPS)
}

/// Writes the header's `autoclear_features` field alone.
pub fn set_autoclear(io: &dyn Io, value: u64) -> Res<()> {
    io.write_at(&value.to_be_bytes(), AUTOCLEAR_OFFSET)?;
    io.sync()?;
    Ok(())
}

/// A bitmap for [`store`].
#[derive(Debug)]
pub struct ToStore<'a> {
    pub name: &'a str,
    pub recording: bool,
    pub map: &'a DirtyMap,
}

/// Checks that a new persistent bitmap could be stored in an image with header `h` (qemu's
/// `qcow2_co_can_store_new_dirty_bitmap`, at `block-dirty-bitmap-add`).
pub fn can_store(h: &Qcow2Header, count: usize, granularity: u64) -> Result<(), String> {
    if h.version < 3 {
        return Err("Cannot store dirty bitmaps in qcow2 v2 files".into());
    }
    if count >= MAX_BITMAPS {
        return Err("Maximum number of persistent bitmaps is already reached".into());
    }
    let clusters = table_size(h.size, granularity, h.cluster_size());
    if clusters > MAX_TABLE_SIZE || clusters * h.cluster_size() > MAX_PHYS_SIZE {
        return Err("Too much space will be occupied by the bitmap. Use larger granularity".into());
    }
    Ok(())
}

/// Reads the header from the start of an image file.
pub fn read_header(io: &dyn Io) -> Res<Qcow2Header> {
    let mut len = 4096;
    loop {
        let mut buf = vec![0u8; len];
        io.read_at(&mut buf, 0)?;
        match Qcow2Header::parse(&buf) {
            Ok(h) => return Ok(h),
            Err(crate::header::HeaderError::Incomplete { needed }) if needed > len => len = needed,
            Err(e) => return corrupt(e.to_string()),
        }
    }
}

/// Writes `bitmaps` (consistent, persistent) as the image's bitmaps at close (see the
/// module doc). Entries of the current directory named in `keep` (inconsistent bitmaps
/// still open) stay as they are; the others are freed. `trusted`: the current directory
/// was loaded (autoclear bit 0 was set at open), so its clusters may be freed; if not, it
/// is dropped and its clusters leak, as qemu does. Returns the new header.
pub fn store(
    io: &dyn Io,
    trusted: bool,
    keep: &[&str],
    bitmaps: &[ToStore<'_>],
) -> Res<Qcow2Header> {
    let h = read_header(io)?;
    let cs = h.cluster_size();
    let old = if trusted {
        read_directory(io, &h)?
    } else {
        None
    };
    let old_entries = old.as_ref().map_or(&[][..], |(_, e)| &e[..]);
    let kept: Vec<&DirEntry> = old_entries
        .iter()
        .filter(|e| keep.contains(&e.name.as_str()))
        .collect();
    if !bitmaps.is_empty() || !kept.is_empty() {
        if h.version < 3 {
            return Err(Qcow2BitmapError::Unsupported(
                "Cannot store dirty bitmaps in qcow2 v2 files".into(),
            ));
        }
        if bitmaps.len() + kept.len() > MAX_BITMAPS {
            return Err(Qcow2BitmapError::Unsupported(format!(
                "more than {MAX_BITMAPS} bitmaps"
            )));
        }
    }
    let mut rc = Refcounts::load(
        io,
        h.cluster_bits,
        h.refcount_order,
        h.refcount_table_offset,
        h.refcount_table_clusters,
    )?;

    // 1. New data clusters and tables.
    let mut new = Vec::with_capacity(bitmaps.len());
    for b in bitmaps {
        let g = b.map.granularity();
        let size = table_size(h.size, g, cs);
        if size > MAX_TABLE_SIZE {
            return Err(Qcow2BitmapError::Unsupported(format!(
                "bitmap '{}' needs a table of {size} entries (limit {MAX_TABLE_SIZE})",
                b.name
            )));
        }
        let bytes = b.map.to_bytes();
        let mut table = Vec::with_capacity(size as usize * 8);
        let mut cluster = vec![0u8; cs as usize];
        for i in 0..size as usize {
            let from = (i * cs as usize).min(bytes.len());
            let to = ((i + 1) * cs as usize).min(bytes.len());
            let chunk = &bytes[from..to];
            let entry = if chunk.iter().all(|&x| x == 0) {
                0
            } else {
                cluster.fill(0);
                cluster[..chunk.len()].copy_from_slice(chunk);
                let at = rc.alloc(io, 1)?;
                io.write_at(&cluster, at)?;
                at
            };
            table.extend_from_slice(&entry.to_be_bytes());
        }
        let table_offset = rc.alloc(io, (table.len() as u64).div_ceil(cs))?;
        io.write_at(&table, table_offset)?;
        new.push(DirEntry {
            table_offset,
            table_size: size as u32,
            flags: if b.recording { FLAG_AUTO } else { 0 },
            kind: TYPE_DIRTY_TRACKING,
            granularity_bits: g.trailing_zeros() as u8,
            extra_data: Vec::new(),
            name: b.name.to_owned(),
        });
    }
    // Order: the directory's order for bitmaps already there, new ones after.
    let mut entries: Vec<DirEntry> = Vec::new();
    for e in old_entries {
        if kept.iter().any(|k| k.name == e.name) {
            entries.push(e.clone());
        } else if let Some(i) = new.iter().position(|n| n.name == e.name) {
            entries.push(new.remove(i));
        }
    }
    entries.extend(new);

    // 2. The directory.
    let dir = encode_directory(&entries);
    if dir.len() as u64 > MAX_DIRECTORY_SIZE {
        return Err(Qcow2BitmapError::Unsupported(
            "the bitmap directory would exceed 64 MiB".into(),
        ));
    }
    let dir_offset = if entries.is_empty() {
        0
    } else {
        let at = rc.alloc(io, (dir.len() as u64).div_ceil(cs))?;
        io.write_at(&dir, at)?;
        at
    };
    // Refcounts before anything points at the new clusters.
    rc.commit(io)?;

    // 3. The header.
    let mut nh = h.clone();
    let pos = nh.extensions.iter().position(|e| e.kind == EXT_BITMAPS);
    if entries.is_empty() {
        if let Some(i) = pos {
            nh.extensions.remove(i);
        }
        nh.autoclear_features &= !AUTOCLEAR_BITMAPS;
    } else {
        let ext = Extension {
            kind: EXT_BITMAPS,
            data: BitmapsExt {
                nb_bitmaps: entries.len() as u32,
                directory_size: dir.len() as u64,
                directory_offset: dir_offset,
            }
            .encode()
            .to_vec(),
        };
        match pos {
            Some(i) => nh.extensions[i] = ext,
            None => nh.extensions.push(ext),
        }
        nh.autoclear_features |= AUTOCLEAR_BITMAPS;
    }
    let mut first = nh
        .encode()
        .map_err(|e| Qcow2BitmapError::Unsupported(e.to_string()))?;
    first.resize(cs as usize, 0);
    io.write_at(&first, 0)?;
    io.sync()?;

    // 4. Free what the old directory used (but what it keeps).
    if let Some((ext, old_entries)) = &old {
        for e in old_entries
            .iter()
            .filter(|e| !keep.contains(&e.name.as_str()))
        {
            for t in read_table(io, e, cs)? {
                let offset = t & TABLE_OFFSET_MASK;
                if offset != 0 {
                    rc.free(io, offset..offset + cs)?;
                }
            }
            let end = e.table_offset + u64::from(e.table_size) * 8;
            rc.free(io, e.table_offset..end)?;
        }
        rc.free(
            io,
            ext.directory_offset..ext.directory_offset + ext.directory_size,
        )?;
        rc.commit(io)?;
    }
    Ok(nh)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::refcounts::MemIo;

    #[test]
    fn extension_bytes_are_at_their_offsets() {
        let ext = BitmapsExt {
            nb_bitmaps: 2,
            directory_size: 0x48,
            directory_offset: 0x30000,
        };
        let b = ext.encode();
        assert_eq!(&b[0..4], &[0, 0, 0, 2]);
        assert_eq!(&b[4..8], &[0; 4]);
        assert_eq!(&b[8..16], &0x48u64.to_be_bytes());
        assert_eq!(&b[16..24], &0x30000u64.to_be_bytes());
        assert_eq!(BitmapsExt::parse(&b).unwrap(), ext);
        let mut bad = b;
        bad[5] = 1;
        assert!(matches!(
            BitmapsExt::parse(&bad),
            Err(Qcow2BitmapError::Corrupt(_))
        ));
        assert!(BitmapsExt::parse(&b[..20]).is_err());
    }

    fn entry(name: &str, flags: u32) -> DirEntry {
        DirEntry {
            table_offset: 0x50000,
            table_size: 1,
            flags,
            kind: TYPE_DIRTY_TRACKING,
            granularity_bits: 16,
            extra_data: Vec::new(),
            name: name.into(),
        }
    }

    #[test]
    fn dir_entry_bytes_are_at_their_offsets_and_padded() {
        let e = entry("b0", FLAG_AUTO | FLAG_IN_USE);
        let mut out = Vec::new();
        e.encode_into(&mut out);
        assert_eq!(out.len(), 32);
        assert_eq!(&out[0..8], &0x50000u64.to_be_bytes());
        assert_eq!(&out[8..12], &1u32.to_be_bytes());
        assert_eq!(&out[12..16], &3u32.to_be_bytes());
        assert_eq!((out[16], out[17]), (1, 16));
        assert_eq!(&out[18..20], &2u16.to_be_bytes());
        assert_eq!(&out[20..24], &0u32.to_be_bytes());
        assert_eq!(&out[24..26], b"b0");
        assert_eq!(&out[26..32], &[0; 6]);
        let (back, len) = DirEntry::parse(&out).unwrap();
        assert_eq!((back, len), (e, 32));
    }

    #[test]
    fn directory_checks_are_qemus() {
        let cs = 65536;
        let disk = 1 << 30; // 16384 bits at 64 KiB: one cluster of table
        let ok = encode_directory(&[entry("a", FLAG_AUTO), entry("b", 0)]);
        assert_eq!(parse_directory(&ok, 2, cs, disk).unwrap().len(), 2);
        let dup = encode_directory(&[entry("a", 0), entry("a", 0)]);
        assert!(parse_directory(&dup, 2, cs, disk).is_err());
        let mut flags = entry("a", 0);
        flags.flags = 8;
        assert!(parse_directory(&encode_directory(&[flags]), 1, cs, disk).is_err());
        let mut gran = entry("a", 0);
        gran.granularity_bits = 8;
        assert!(parse_directory(&encode_directory(&[gran]), 1, cs, disk).is_err());
        let mut kind = entry("a", 0);
        kind.kind = 2;
        assert!(matches!(
            parse_directory(&encode_directory(&[kind]), 1, cs, disk),
            Err(Qcow2BitmapError::Unsupported(_))
        ));
        // Table size must match the disk size.
        assert!(parse_directory(&ok, 2, cs, 1 << 40).is_err());
        // Trailing bytes.
        let mut long = ok.clone();
        long.extend_from_slice(&[0; 8]);
        assert!(parse_directory(&long, 2, cs, disk).is_err());
    }

    #[test]
    fn table_size_of_1_tib_at_64k_is_32_clusters() {
        // 2^24 bits = 2 MiB of bitmap = 32 clusters of 64 KiB.
        assert_eq!(table_size(1 << 40, 65536, 65536), 32);
        assert_eq!(table_size(1, 512, 512), 1);
        assert_eq!(table_size(512 * 4096 + 1, 512, 512), 2);
    }

    /// A v3 image of `disk` bytes with 512-byte clusters: header (cluster 0), refcount
    /// table (1), refcount block (2), L1 table (3).
    fn image(disk: u64) -> MemIo {
        let io = MemIo::default();
        let mut h = vec![0u8; 512];
        h[0..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&9u32.to_be_bytes());
        h[24..32].copy_from_slice(&disk.to_be_bytes());
        h[36..40].copy_from_slice(&1u32.to_be_bytes());
        h[40..48].copy_from_slice(&(3u64 * 512).to_be_bytes());
        h[48..56].copy_from_slice(&512u64.to_be_bytes());
        h[56..60].copy_from_slice(&1u32.to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        io.write_at(&h, 0).unwrap();
        io.write_at(&1024u64.to_be_bytes(), 512).unwrap();
        io.write_at(&[0, 1, 0, 1, 0, 1, 0, 1], 1024).unwrap();
        io.write_at(&[0u8; 512], 1536).unwrap();
        io
    }

    fn refcount_sum(io: &MemIo) -> Vec<u64> {
        let mut rc = Refcounts::load(io, 9, 4, 512, 1).unwrap();
        let n = io.file_len().unwrap().div_ceil(512);
        (0..n).map(|c| rc.get(io, c).unwrap()).collect()
    }

    #[test]
    fn store_then_load_round_trips_and_frees_the_old_clusters() {
        let io = image(1 << 20);
        let a = DirtyMap::new(1 << 20, 512); // 2048 bits: 256 bytes, one cluster
        a.mark(0, 1);
        a.mark((1 << 20) - 1, 1);
        let b = DirtyMap::new(1 << 20, 65536);
        let h = store(
            &io,
            true,
            &[],
            &[
                ToStore {
                    name: "a",
                    recording: true,
                    map: &a,
                },
                ToStore {
                    name: "b",
                    recording: false,
                    map: &b,
                },
            ],
        )
        .unwrap();
        assert_eq!(h.autoclear_features, AUTOCLEAR_BITMAPS);
        let loaded = load(&io, &read_header(&io).unwrap()).unwrap();
        assert_eq!(loaded.len(), 2);
        assert_eq!((loaded[0].name.as_str(), loaded[0].recording), ("a", true));
        assert_eq!(loaded[0].map.runs(), a.runs());
        assert_eq!((loaded[1].granularity, loaded[1].map.count()), (65536, 0));
        // Every allocated cluster is referenced once; b's clean table entry needs no data.
        let before = refcount_sum(&io);
        assert_eq!(before.iter().filter(|&&r| r == 1).count(), 4 + 1 + 2 + 1);

        // Open read-write: in_use everywhere, then a store of `a` only, kept `b`.
        mark_in_use(&io, &read_header(&io).unwrap()).unwrap();
        let loaded = load(&io, &read_header(&io).unwrap()).unwrap();
        assert!(loaded.iter().all(|l| l.inconsistent && l.map.count() == 0));
        store(
            &io,
            true,
            &["b"],
            &[ToStore {
                name: "a",
                recording: true,
                map: &a,
            }],
        )
        .unwrap();
        let loaded = load(&io, &read_header(&io).unwrap()).unwrap();
        assert_eq!(loaded.len(), 2);
        assert!(!loaded[0].inconsistent && loaded[1].inconsistent);
        assert_eq!(loaded[0].map.runs(), a.runs());
        // Old a's data and table and the old directory were freed, as many allocated.
        assert_eq!(
            refcount_sum(&io).iter().filter(|&&r| r == 1).count(),
            before.iter().filter(|&&r| r == 1).count()
        );

        // Nothing left: extension and autoclear bit gone, everything freed.
        let h = store(&io, true, &[], &[]).unwrap();
        assert_eq!(h.autoclear_features, 0);
        assert!(extension(&h).unwrap().is_none());
        assert_eq!(refcount_sum(&io).iter().filter(|&&r| r == 1).count(), 4);
    }

    #[test]
    fn load_without_autoclear_bit_drops_the_bitmaps() {
        let io = image(1 << 20);
        let a = DirtyMap::new(1 << 20, 65536);
        store(
            &io,
            true,
            &[],
            &[ToStore {
                name: "a",
                recording: true,
                map: &a,
            }],
        )
        .unwrap();
        set_autoclear(&io, 0).unwrap();
        assert!(load(&io, &read_header(&io).unwrap()).unwrap().is_empty());
    }
}
