//! The tar filter (nbdkit-tar-filter): serves one file inside an uncompressed tar archive
//! that the layer below holds, reading and writing it in place.
//!
//! nbdkit pipes the archive into GNU `tar -tv --block-number` and reads back where the entry
//! starts. Here the archive's headers are parsed directly, through the layer below: the
//! parser ([`locate`]) is pure code over a read callback, so it is unit tested and fuzzed,
//! needs no external program, and says exactly what went wrong (the entry is missing, it is
//! sparse or not a regular file, a header does not parse). It understands the formats GNU
//! tar writes: v7 and POSIX ustar headers (with the `prefix` field), GNU long names
//! (`././@LongLink`, type `L`, and long link names `K`, skipped), GNU sparse entries (type
//! `S`, with their extension blocks), and pax extended headers (`x`, whose `path=` and
//! `size=` records override the next header's; global `g` headers are checked and skipped).
//! Sizes may be octal or GNU base-256. The walk stops at the first all-zero block (the end
//! of the archive), at the end of the layer below, or after `tar-limit` bytes.
//!
//! The entry is found once per export, by the first connection that succeeds (nbdkit's
//! `tar_prepare` under its lock), and kept: the archive's layout is not expected to change
//! under the server. Each connection copies the offset and size into its own state, so
//! requests take no lock. Every ranged call is moved up by the entry's offset; the size is
//! the entry's. Writes, trims and zeroes land in the archive, as in nbdkit (`-r` keeps the
//! archive unchanged); the entry cannot grow.
//!
//! Deliberate differences from nbdkit 1.32.5:
//! - a GNU long-name entry is served from its data; nbdkit takes the block number `tar`
//!   prints, which is the `././@LongLink` header's, and so serves the name block and the
//!   real header first (the wrong bytes);
//! - the name must match exactly (`tar` would also match a directory prefix or a name
//!   differing in a leading `./`), and a directory, link, device or sparse entry is refused
//!   by name instead of being served as whatever `tar` printed for it;
//! - an entry whose data runs past the end of the archive is refused at open, as a truncated
//!   archive ([`TarError::Truncated`]), rather than served short;
//! - `tar-limit=SIZE` (the most bytes of the archive read looking for the entry, 0 for no
//!   limit, the default) is not in nbdkit 1.32.5, where the key would go to the plugin; it is
//!   meant as later nbdkit's guard, whose exact semantics could not be checked here (no newer
//!   nbdkit on these machines), so this reading of it is our own. `tar=PROGRAM`
//!   is accepted for compatibility and unused, since no program runs.

use std::sync::{Arc, Mutex, PoisonError};

use crate::error::{BlockError, Errno, Result};
use crate::extents::Extents;
use crate::filter::{Filter, Next};
use crate::plugin::{Flags, Handle, OpenContext, Plugin};
use crate::plugins::ConfigArg;

use super::offset::shifted;
use super::{bad, each_param, over, parse_size, FilterEnv, FilterSpec};

pub const SPEC: FilterSpec = FilterSpec {
    name: "tar",
    keys: &["tar-entry", "tar-limit", "tar"],
    help: "tar-entry=<FILENAME> (required) The path inside the tar file to serve.\n\
           tar-limit=<SIZE>     Read at most SIZE bytes looking for the entry (0: no limit).",
    open,
};

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut entry: Option<String> = None;
    let mut limit = 0;
    each_param(&SPEC, params, |k, v| {
        match k {
            "tar-entry" if entry.is_some() => {
                return Err(bad("tar", k, "only one tar-entry parameter can be given"))
            }
            "tar-entry" if v.is_empty() => return Err(bad("tar", k, "the name is empty")),
            "tar-entry" => entry = Some(v.to_string()),
            "tar-limit" => limit = parse_size("tar", k, v)?,
            // The tar program: nothing runs here, so it is accepted and unused.
            _ => {}
        }
        Ok(())
    })?;
    let Some(entry) = entry else {
        return Err(bad(
            "tar",
            "tar-entry",
            "required: the path of the file inside the tar archive",
        ));
    };
    Ok(over(
        Tar {
            entry,
            limit,
            found: Mutex::new(None),
        },
        inner,
    ))
}

/// The filter: which entry, how far to look, and where it was found.
pub struct Tar {
    entry: String,
    limit: u64,
    found: Mutex<Option<Entry>>,
}

/// Per connection: where the entry's data lies in the archive.
pub struct Conn {
    entry: Entry,
}

impl Tar {
    /// The entry's place, found by the first connection that succeeds.
    fn entry(&self, next: &Next) -> Result<Entry> {
        let mut found = self.found.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = *found {
            return Ok(e);
        }
        let archive_size = next.get_size()?;
        let e = locate(
            self.entry.as_bytes(),
            archive_size,
            self.limit,
            |off, buf| next.pread(buf, off, Flags::NONE),
        )
        .map_err(|e| e.into_block_error(&self.entry))?;
        tracing::debug!(
            "tar: {} found at offset {}, size {}",
            self.entry,
            e.offset,
            e.size
        );
        *found = Some(e);
        Ok(e)
    }
}

impl Filter for Tar {
    type Conn = Conn;
    fn name(&self) -> &str {
        "tar"
    }
    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<(Conn, Next)> {
        let next = Next::open(next, ctx)?;
        let entry = self.entry(&next)?;
        Ok((Conn { entry }, next))
    }
    fn get_size(&self, c: &Conn, _: &Next) -> Result<u64> {
        Ok(c.entry.size)
    }
    fn pread(&self, c: &Conn, next: &Next, buf: &mut [u8], off: u64, f: Flags) -> Result<()> {
        next.pread(buf, off + c.entry.offset, f)
    }
    fn pwrite(&self, c: &Conn, next: &Next, buf: &[u8], off: u64, f: Flags) -> Result<()> {
        next.pwrite(buf, off + c.entry.offset, f)
    }
    fn trim(&self, c: &Conn, next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        next.trim(n, off + c.entry.offset, f)
    }
    fn zero(&self, c: &Conn, next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        next.zero(n, off + c.entry.offset, f)
    }
    fn cache(&self, c: &Conn, next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        next.cache(n, off + c.entry.offset, f)
    }
    fn extents(
        &self,
        c: &Conn,
        next: &Next,
        n: u64,
        off: u64,
        f: Flags,
        out: &mut Extents,
    ) -> Result<()> {
        shifted(c.entry.offset, c.entry.size, out, |below| {
            next.extents(n, off + c.entry.offset, f, below)
        })
    }
    fn allocation_depth(
        &self,
        c: &Conn,
        next: &Next,
        n: u64,
        off: u64,
        out: &mut Extents,
    ) -> Result<()> {
        shifted(c.entry.offset, c.entry.size, out, |below| {
            next.allocation_depth(n, off + c.entry.offset, below)
        })
    }
}

/// Where an entry's data lies in the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Byte offset of the first data byte (just after the entry's header block).
    pub offset: u64,
    /// The entry's size in bytes.
    pub size: u64,
}

/// Why an entry could not be located. Offsets are of the header block concerned.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum TarError {
    /// The archive ended (an all-zero block, or the end of the data) without the entry.
    #[error("not found in the tar archive (check the name with `tar tf`)")]
    NotFound,
    /// `tar-limit` bytes were read without finding the entry.
    #[error("not found in the first {limit} bytes of the tar archive (tar-limit)")]
    LimitReached { limit: u64 },
    /// A header block that is not a tar header.
    #[error("bad tar header at offset {offset}: {problem}")]
    BadHeader { offset: u64, problem: String },
    /// A pax extended header whose records do not parse.
    #[error("bad pax extended header at offset {offset}: {problem}")]
    BadPax { offset: u64, problem: String },
    /// The archive stops inside a header or inside the entry.
    #[error("the tar archive is truncated at offset {offset}")]
    Truncated { offset: u64 },
    /// The entry is a sparse file, whose data is not stored contiguously.
    #[error("is a sparse file in the tar archive, which cannot be served in place")]
    Sparse,
    /// The entry is a directory, link, device or other non-regular file.
    #[error("is not a regular file in the tar archive (type '{}')", char::from(*kind))]
    NotRegular { kind: u8 },
    /// The layer below failed a read.
    #[error("reading the tar archive: {0}")]
    Read(BlockError),
}

impl TarError {
    /// The error a client's open gets, naming the entry.
    pub fn into_block_error(self, entry: &str) -> BlockError {
        let errno = match &self {
            TarError::Read(e) => e.errno,
            TarError::NotFound | TarError::LimitReached { .. } => Errno(libc::ENOENT),
            _ => Errno::EINVAL,
        };
        BlockError::new(errno, format!("tar: {entry}: {self}"))
    }
}

/// One tar block.
pub const BLOCK: u64 = 512;

/// The largest GNU long name or pax header read into memory; real ones are a few KiB.
const MAX_META: u64 = 1 << 20;

/// The fields of one header block that locating an entry needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The name from the header alone (ustar `prefix/name`, or `name`).
    pub name: Vec<u8>,
    /// The size field.
    pub size: u64,
    /// The type flag (`0`, `5`, `L`, `x`, ...).
    pub kind: u8,
    /// GNU sparse headers: how many extension blocks of sparse map follow the header.
    pub sparse_extended: bool,
}

/// True for a block of zeroes, which ends the archive.
pub fn is_end(block: &[u8; 512]) -> bool {
    block.iter().all(|&b| b == 0)
}

/// Parses one header block: checks its checksum, reads the name, size and type.
pub fn parse_header(block: &[u8; 512]) -> std::result::Result<Header, String> {
    let stored = parse_number(&block[148..156]).map_err(|e| format!("checksum field: {e}"))?;
    // The checksum counts its own field as spaces; old tars summed signed bytes.
    let unsigned: u64 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                b as u64
            }
        })
        .sum();
    let signed: i64 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                b as i8 as i64
            }
        })
        .sum();
    if stored != unsigned && stored as i64 != signed {
        return Err(format!(
            "checksum {stored} does not match the block's {unsigned} (not a tar archive?)"
        ));
    }
    let size = parse_number(&block[124..136]).map_err(|e| format!("size field: {e}"))?;
    let mut name = cstr(&block[0..100]).to_vec();
    // POSIX ustar (magic "ustar\0"): a non-empty prefix goes before the name. GNU's old
    // format ("ustar  \0") keeps other fields there.
    if &block[257..263] == b"ustar\0" {
        let prefix = cstr(&block[345..500]);
        if !prefix.is_empty() {
            let mut full = prefix.to_vec();
            full.push(b'/');
            full.extend_from_slice(&name);
            name = full;
        }
    }
    let kind = block[156];
    Ok(Header {
        name,
        size,
        kind,
        sparse_extended: kind == b'S' && block[482] != 0,
    })
}

/// The bytes of a NUL-terminated (or full-width) field.
fn cstr(field: &[u8]) -> &[u8] {
    match field.iter().position(|&b| b == 0) {
        Some(n) => &field[..n],
        None => field,
    }
}

/// A numeric header field: octal digits between optional spaces, ended by a space or NUL,
/// or GNU's base-256 (the first byte's high bit set). An empty field is 0.
pub fn parse_number(field: &[u8]) -> std::result::Result<u64, String> {
    if let Some((&first, rest)) = field.split_first() {
        if first & 0x80 != 0 {
            if first != 0x80 {
                return Err("negative or oversized base-256 number".into());
            }
            let mut v: u64 = 0;
            for &b in rest {
                v = v
                    .checked_mul(256)
                    .and_then(|v| v.checked_add(b as u64))
                    .ok_or("base-256 number out of range")?;
            }
            return Ok(v);
        }
    }
    let start = field.iter().position(|&b| b != b' ').unwrap_or(field.len());
    let mut v: u64 = 0;
    for &b in &field[start..] {
        match b {
            b'0'..=b'7' => {
                v = v
                    .checked_mul(8)
                    .and_then(|v| v.checked_add((b - b'0') as u64))
                    .ok_or("octal number out of range")?
            }
            b' ' | 0 => break,
            _ => return Err(format!("{:?} is not octal", String::from_utf8_lossy(field))),
        }
    }
    Ok(v)
}

/// What a pax extended header says about the next entry.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pax {
    /// `path=`: the entry's name.
    pub path: Option<Vec<u8>>,
    /// `size=`: the entry's size (for sizes the header cannot hold).
    pub size: Option<u64>,
    /// `GNU.sparse.*` records: the entry is a GNU sparse file in pax form.
    pub sparse: bool,
}

/// Parses pax records (`LEN key=value\n`, LEN counting the whole record).
pub fn parse_pax(mut data: &[u8]) -> std::result::Result<Pax, String> {
    let mut pax = Pax::default();
    while !data.is_empty() {
        // Trailing NULs pad some writers' headers.
        if data.iter().all(|&b| b == 0) {
            break;
        }
        let sp = data
            .iter()
            .position(|&b| b == b' ')
            .ok_or("a record without a length")?;
        let len: usize = std::str::from_utf8(&data[..sp])
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse().ok())
            .ok_or("a record length that is not a number")?;
        if len <= sp + 1 || len > data.len() {
            return Err(format!("a record length {len} out of range"));
        }
        let record = &data[sp + 1..len];
        let Some((b'\n', record)) = record.split_last() else {
            return Err("a record not ended by a newline".into());
        };
        let eq = record
            .iter()
            .position(|&b| b == b'=')
            .ok_or("a record without '='")?;
        let (key, value) = (&record[..eq], &record[eq + 1..]);
        match key {
            b"path" => pax.path = Some(value.to_vec()),
            b"size" => {
                let s = std::str::from_utf8(value)
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse().ok())
                    .ok_or("a size that is not a decimal number")?;
                pax.size = Some(s);
            }
            k if k.starts_with(b"GNU.sparse.") => {
                pax.sparse = true;
                if k == b"GNU.sparse.name" {
                    pax.path = Some(value.to_vec());
                }
            }
            _ => {}
        }
        data = &data[len..];
    }
    Ok(pax)
}

/// Walks the archive (`size` bytes, read through `read`) to the header of `entry` and
/// returns where its data lies. Reads no further than `limit` bytes unless it is 0.
pub fn locate(
    entry: &[u8],
    size: u64,
    limit: u64,
    mut read: impl FnMut(u64, &mut [u8]) -> Result<()>,
) -> std::result::Result<Entry, TarError> {
    let end = if limit == 0 { size } else { size.min(limit) };
    let mut pos = 0u64;
    let mut long_name: Option<Vec<u8>> = None;
    let mut pax = Pax::default();
    let mut block = [0u8; 512];
    // Reads `len` bytes of metadata (a long name, pax records) after the header at `at`.
    let meta = |at: u64, len: u64, read: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>| {
        if len > MAX_META {
            return Err(TarError::BadHeader {
                offset: at,
                problem: format!("{len} bytes of metadata (more than {MAX_META})"),
            });
        }
        let data_end = at + BLOCK + len;
        if data_end > size {
            return Err(TarError::Truncated { offset: at });
        }
        if data_end > end {
            return Err(TarError::LimitReached { limit });
        }
        let mut buf = vec![0u8; len as usize];
        read(at + BLOCK, &mut buf).map_err(TarError::Read)?;
        Ok(buf)
    };
    loop {
        if pos >= size {
            // Data that runs past the end leaves `pos` beyond it.
            return Err(if pos > size {
                TarError::Truncated { offset: size }
            } else {
                TarError::NotFound
            });
        }
        if pos + BLOCK > size {
            return Err(TarError::Truncated { offset: pos });
        }
        if pos + BLOCK > end {
            return Err(TarError::LimitReached { limit });
        }
        read(pos, &mut block).map_err(TarError::Read)?;
        if is_end(&block) {
            return Err(TarError::NotFound);
        }
        let h = parse_header(&block).map_err(|problem| TarError::BadHeader {
            offset: pos,
            problem,
        })?;
        match h.kind {
            b'L' => {
                let name = meta(pos, h.size, &mut read)?;
                long_name = Some(cstr(&name).to_vec());
            }
            b'K' => {}
            b'x' | b'g' => {
                let data = meta(pos, h.size, &mut read)?;
                let parsed = parse_pax(&data).map_err(|problem| TarError::BadPax {
                    offset: pos,
                    problem,
                })?;
                // A global header sets defaults that no one uses for a path or a size.
                if h.kind == b'x' {
                    pax = parsed;
                }
            }
            kind => {
                let name = pax.path.take().or(long_name.take()).unwrap_or(h.name);
                let entry_size = pax.size.take().unwrap_or(h.size);
                let sparse = std::mem::take(&mut pax.sparse) || kind == b'S';
                // GNU sparse maps that overflow the header take extension blocks.
                let mut data = pos + BLOCK;
                if h.sparse_extended {
                    loop {
                        if data + BLOCK > size {
                            return Err(TarError::Truncated { offset: data });
                        }
                        if data + BLOCK > end {
                            return Err(TarError::LimitReached { limit });
                        }
                        read(data, &mut block).map_err(TarError::Read)?;
                        data += BLOCK;
                        if block[504] == 0 {
                            break;
                        }
                    }
                }
                if name == entry {
                    if sparse {
                        return Err(TarError::Sparse);
                    }
                    if !matches!(kind, b'0' | 0 | b'7') {
                        return Err(TarError::NotRegular { kind });
                    }
                    match data.checked_add(entry_size) {
                        Some(e) if e <= size => {}
                        _ => return Err(TarError::Truncated { offset: pos }),
                    }
                    return Ok(Entry {
                        offset: data,
                        size: entry_size,
                    });
                }
                // Links, devices, directories and FIFOs store no data, whatever the size
                // field says.
                let stored = if matches!(kind, b'1'..=b'6') {
                    0
                } else {
                    entry_size
                };
                pos = skip(pos, data, stored)?;
                continue;
            }
        }
        pos = skip(pos, pos + BLOCK, h.size)?;
    }
}

/// The offset after `len` bytes of data starting at `data`, padded to a block; an error
/// naming the header at `header` if that is beyond 2^64.
fn skip(header: u64, data: u64, len: u64) -> std::result::Result<u64, TarError> {
    len.div_ceil(BLOCK)
        .checked_mul(BLOCK)
        .and_then(|padded| data.checked_add(padded))
        .ok_or_else(|| TarError::BadHeader {
            offset: header,
            problem: format!("size {len} out of range"),
        })
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    /// A header block: `name`, `size`, `kind`, ustar `magic`, with a valid checksum.
    fn header(name: &[u8], size: u64, kind: u8, posix: bool) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[..name.len().min(100)].copy_from_slice(&name[..name.len().min(100)]);
        b[100..107].copy_from_slice(b"0000644");
        b[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        b[156] = kind;
        b[257..265].copy_from_slice(if posix { b"ustar\x0000" } else { b"ustar  \0" });
        seal(&mut b);
        b
    }

    fn seal(b: &mut [u8; 512]) {
        b[148..156].fill(b' ');
        let sum: u64 = b.iter().map(|&x| x as u64).sum();
        b[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    }

    /// Appends a header and `data` padded to blocks.
    fn push(ar: &mut Vec<u8>, h: [u8; 512], data: &[u8]) {
        ar.extend_from_slice(&h);
        ar.extend_from_slice(data);
        ar.resize(ar.len().div_ceil(512) * 512, 0);
    }

    fn finish(mut ar: Vec<u8>) -> Vec<u8> {
        ar.extend_from_slice(&[0u8; 1024]);
        ar
    }

    fn find(ar: &[u8], name: &str, limit: u64) -> std::result::Result<Entry, TarError> {
        locate(name.as_bytes(), ar.len() as u64, limit, |off, buf| {
            buf.copy_from_slice(&ar[off as usize..off as usize + buf.len()]);
            Ok(())
        })
    }

    fn pax_record(key: &str, value: &str) -> String {
        let body = format!(" {key}={value}\n");
        // The length counts its own digits.
        let mut len = body.len() + 1;
        while len != body.len() + len.to_string().len() {
            len = body.len() + len.to_string().len();
        }
        format!("{len}{body}")
    }

    fn two_files() -> Vec<u8> {
        let mut ar = Vec::new();
        push(&mut ar, header(b"a.txt", 600, b'0', true), &[1u8; 600]);
        push(&mut ar, header(b"disk.img", 5, b'0', true), b"hello");
        finish(ar)
    }

    #[test]
    fn locate_an_entry_that_is_not_the_first() {
        let ar = two_files();
        let e = find(&ar, "disk.img", 0).unwrap();
        assert_eq!(
            e,
            Entry {
                offset: 2048,
                size: 5
            }
        );
        assert_eq!(&ar[2048..2053], b"hello");
        assert_eq!(
            find(&ar, "a.txt", 0).unwrap(),
            Entry {
                offset: 512,
                size: 600
            }
        );
    }

    #[test]
    fn locate_a_missing_entry_is_not_found() {
        let ar = two_files();
        assert!(matches!(find(&ar, "nope", 0), Err(TarError::NotFound)));
        // A prefix of a name is not the name.
        assert!(matches!(find(&ar, "disk", 0), Err(TarError::NotFound)));
    }

    #[test]
    fn locate_stops_at_tar_limit() {
        let ar = two_files();
        assert!(matches!(
            find(&ar, "disk.img", 1536),
            Err(TarError::LimitReached { limit: 1536 })
        ));
        // The limit needs to take in the entry's header, not its data.
        assert!(find(&ar, "disk.img", 2048).is_ok());
    }

    #[test]
    fn locate_uses_the_ustar_prefix() {
        let mut h = header(b"file", 3, b'0', true);
        h[345..348].copy_from_slice(b"dir");
        seal(&mut h);
        let mut ar = Vec::new();
        push(&mut ar, h, b"abc");
        let ar = finish(ar);
        assert_eq!(find(&ar, "dir/file", 0).unwrap().offset, 512);
        assert!(matches!(find(&ar, "file", 0), Err(TarError::NotFound)));
    }

    #[test]
    fn locate_gnu_long_name_serves_the_data_after_the_real_header() {
        let long = "d/".to_string() + &"x".repeat(150);
        let mut ar = Vec::new();
        let mut name = long.as_bytes().to_vec();
        name.push(0);
        push(
            &mut ar,
            header(b"././@LongLink", name.len() as u64, b'L', false),
            &name,
        );
        push(
            &mut ar,
            header(&long.as_bytes()[..100], 4, b'0', false),
            b"data",
        );
        let ar = finish(ar);
        let e = find(&ar, &long, 0).unwrap();
        assert_eq!(
            e,
            Entry {
                offset: 1536,
                size: 4
            }
        );
        assert_eq!(&ar[1536..1540], b"data");
        // The long name applies to one entry only.
        assert!(matches!(
            find(&ar, &long[..100], 0),
            Err(TarError::NotFound)
        ));
    }

    #[test]
    fn locate_pax_path_and_size_override_the_header() {
        let records = pax_record("path", "very/long/name") + &pax_record("size", "7");
        let mut ar = Vec::new();
        push(
            &mut ar,
            header(b"PaxHeaders/x", records.len() as u64, b'x', true),
            records.as_bytes(),
        );
        push(&mut ar, header(b"short", 0o777, b'0', true), b"pax-big");
        let ar = finish(ar);
        let e = find(&ar, "very/long/name", 0).unwrap();
        assert_eq!(
            e,
            Entry {
                offset: 1536,
                size: 7
            }
        );
    }

    #[test]
    fn parse_pax_rejects_malformed_records() {
        assert!(parse_pax(b"12 path=abc\n").is_ok());
        assert!(parse_pax(b"99 path=abc\n").is_err());
        assert!(parse_pax(b"12 path=abcX").is_err());
        assert!(parse_pax(b"x path=abc\n").is_err());
        assert!(parse_pax(b"11 pathabc\n").is_err());
        assert!(parse_pax(b"9 size=z\n").is_err());
        assert_eq!(parse_pax(b"9 size=5\n").unwrap().size, Some(5));
    }

    #[test]
    fn locate_refuses_sparse_and_non_regular_entries() {
        let mut ar = Vec::new();
        push(&mut ar, header(b"dir/", 0, b'5', true), &[]);
        push(&mut ar, header(b"sparse", 0, b'S', false), &[]);
        push(&mut ar, header(b"link", 0, b'2', true), &[]);
        let records = pax_record("GNU.sparse.name", "psparse");
        push(
            &mut ar,
            header(b"PaxHeaders/p", records.len() as u64, b'x', true),
            records.as_bytes(),
        );
        push(&mut ar, header(b"GNUSparseFile.0/p", 0, b'0', true), &[]);
        let ar = finish(ar);
        assert!(matches!(
            find(&ar, "dir/", 0),
            Err(TarError::NotRegular { kind: b'5' })
        ));
        assert!(matches!(find(&ar, "sparse", 0), Err(TarError::Sparse)));
        assert!(matches!(
            find(&ar, "link", 0),
            Err(TarError::NotRegular { kind: b'2' })
        ));
        assert!(matches!(find(&ar, "psparse", 0), Err(TarError::Sparse)));
    }

    #[test]
    fn locate_a_bad_checksum_is_a_bad_header() {
        let mut ar = two_files();
        ar[512 + 1024] ^= 1; // the second header's name
        let e = find(&ar, "disk.img", 0).unwrap_err();
        assert!(matches!(e, TarError::BadHeader { offset: 1536, .. }), "{e}");
        let msg = e.into_block_error("disk.img").message;
        assert!(msg.starts_with("tar: disk.img: bad tar header at offset 1536: checksum"));
    }

    #[test]
    fn locate_an_entry_past_the_end_is_truncated() {
        let ar = two_files();
        let cut = &ar[..2048 + 2];
        assert!(matches!(
            find(cut, "disk.img", 0),
            Err(TarError::Truncated { .. })
        ));
        assert!(matches!(
            find(&ar[..700], "x", 0),
            Err(TarError::Truncated { .. })
        ));
    }

    #[test]
    fn parse_number_takes_octal_and_base256() {
        assert_eq!(parse_number(b"00000001750\0").unwrap(), 1000);
        assert_eq!(parse_number(b"  1750 \0\0\0\0\0").unwrap(), 1000);
        assert_eq!(parse_number(b"\0\0\0\0").unwrap(), 0);
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[7] = 2; // 2 << 32
        assert_eq!(parse_number(&big).unwrap(), 2 << 32);
        assert!(parse_number(b"0009").is_err());
        assert!(parse_number(&[0xffu8; 12]).is_err());
    }

    #[test]
    fn tar_filter_reads_and_writes_inside_the_entry() {
        let ar = two_files();
        let mem = memory(ar.len() as u64);
        export(mem.clone(), false)
            .write(&ar, 0, Flags::NONE)
            .unwrap();
        let e = export(
            filter("tar", &[("tar-entry", "disk.img")], mem.clone()),
            false,
        );
        assert_eq!(e.size(), 5);
        let mut buf = [0u8; 5];
        e.read(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"hello");
        e.write(b"J", 0, Flags::NONE).unwrap();
        let mut below = [0u8; 5];
        export(mem, true).read(&mut below, 2048).unwrap();
        assert_eq!(&below, b"Jello");
    }

    #[test]
    fn tar_missing_entry_refuses_the_connection() {
        let ar = two_files();
        let mem = memory(ar.len() as u64);
        export(mem.clone(), false)
            .write(&ar, 0, Flags::NONE)
            .unwrap();
        let top = filter("tar", &[("tar-entry", "nope")], mem);
        let err = crate::Export::open(&crate::Backend::new(top), &ctx(true))
            .err()
            .unwrap();
        assert_eq!(err.errno, Errno(libc::ENOENT));
        assert!(err.message.starts_with("tar: nope: not found"), "{err}");
    }

    #[test]
    fn tar_without_entry_or_with_two_names_the_key() {
        assert!(config_error("tar", &[]).starts_with("tar: tar-entry: required"));
        let msg = config_error("tar", &[("tar-entry", "a"), ("tar-entry", "b")]);
        assert!(msg.starts_with("tar: tar-entry: only one"), "{msg}");
        let msg = config_error("tar", &[("tar-entry", "a"), ("tar-limit", "1Q")]);
        assert!(msg.starts_with("tar: tar-limit: "), "{msg}");
    }
}
