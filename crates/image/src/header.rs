//! The qcow2 header: pure parsing, probing, validation and re-encoding of an image's first
//! cluster.
//!
//! imago parses the header too, but keeps it private and cannot change the backing file name,
//! which image streaming needs (it rewrites the top image's header to name the new base). So
//! sluice reads the header itself, from bytes, with no I/O: [`Qcow2Header::parse`] takes the
//! start of the file and returns a typed header or a [`HeaderError`], including the "read more
//! bytes" case ([`HeaderError::Incomplete`]). Every field is kept, including unknown header
//! extensions and unknown bytes at the end of a v3 header, so that [`Qcow2Header::encode`]
//! writes back an equivalent first cluster; [`Qcow2Header::set_backing`] changes the backing
//! name and format and re-encodes. Applying such a rewrite to an image imago has open must be
//! done with the node quiesced and imago's instance re-opened afterwards, because imago keeps
//! its own copy of the first 72 bytes and writes them back when it grows the L1 or refcount
//! table (see `node/jobs.rs`).
//!
//! Offsets are the qcow2 specification's (docs/interop/qcow2.txt in qemu); all integers are
//! big-endian. [`check_supported`](Qcow2Header::check_supported) refuses, with a message, what
//! sluice cannot serve safely (encryption, external data files, dirty or corrupt images,
//! compression types other than deflate, extended L2 entries).

use std::fmt;

/// `QFI\xfb`.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Size of the version 2 header (and of the fixed part every version starts with).
pub const V2_HEADER_LEN: usize = 72;
/// Size of the version 3 header up to and including `header_length`.
pub const V3_HEADER_LEN: usize = 104;
/// qemu's limit on the backing file name.
pub const MAX_BACKING_NAME: usize = 1023;

/// Header extension types (qcow2.txt "Header extensions").
pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const EXT_ENCRYPTION: u32 = 0x0537_be77;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;

/// Smallest and largest cluster sizes qemu accepts (2^9 .. 2^21).
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;

/// Image formats sluice opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    /// qemu's name for the format.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }

    /// Parses qemu's name (`raw`, `qcow2`); `file` is raw too, as in a backing-format field.
    pub fn from_name(name: &str) -> Option<Format> {
        match name {
            "raw" | "file" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            _ => None,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// qemu's probe: qcow2 magic and version 2 or 3 means qcow2, anything else raw.
pub fn probe(start: &[u8]) -> Format {
    if start.len() >= 8 && start[..4] == QCOW2_MAGIC {
        let version = be32(start, 4);
        if version == 2 || version == 3 {
            return Format::Qcow2;
        }
    }
    Format::Raw
}

/// What is wrong with a header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// The header continues past the bytes given: parse again with at least `needed` bytes.
    #[error("header is truncated (needs {needed} bytes)")]
    Incomplete { needed: usize },
    #[error("not a qcow2 image (bad magic)")]
    BadMagic,
    #[error("qcow2 version {0} is not supported (only 2 and 3)")]
    UnsupportedVersion(u32),
    /// A field has a value the specification forbids.
    #[error("corrupt header: {0}")]
    Corrupt(String),
    /// A valid image that uses something sluice does not implement.
    #[error("{0}")]
    Unsupported(String),
    /// A rewritten header would not fit in the first cluster.
    #[error("header does not fit in the first cluster ({len} > {cluster_size} bytes)")]
    TooLarge { len: usize, cluster_size: usize },
}

fn corrupt(msg: impl Into<String>) -> HeaderError {
    HeaderError::Corrupt(msg.into())
}

/// One header extension, kept as bytes so that unknown ones survive a rewrite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    pub kind: u32,
    pub data: Vec<u8>,
}

/// A parsed qcow2 header (every field of the first cluster that qcow2.txt defines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Header {
    pub version: u32,
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (4 = 16-bit, the v2 value).
    pub refcount_order: u32,
    /// `header_length` as stored (72 for v2).
    pub header_length: u32,
    /// 0 = deflate (also when the field is absent).
    pub compression_type: u8,
    /// v3 header bytes after `compression_type` up to `header_length` (padding or fields
    /// this parser does not know), kept verbatim.
    pub header_tail: Vec<u8>,
    pub backing_file: Option<String>,
    /// All extensions in file order, the end marker excluded.
    pub extensions: Vec<Extension>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn need(buf: &[u8], end: usize) -> Result<(), HeaderError> {
    if buf.len() < end {
        Err(HeaderError::Incomplete { needed: end })
    } else {
        Ok(())
    }
}

impl Qcow2Header {
    /// Parses the header from the start of the image. Everything the header refers to lies in
    /// the first cluster, so `buf` never needs to be longer than that; a shorter `buf` gives
    /// [`HeaderError::Incomplete`] with the length to read.
    pub fn parse(buf: &[u8]) -> Result<Qcow2Header, HeaderError> {
        need(buf, 8)?;
        if buf[..4] != QCOW2_MAGIC {
            return Err(HeaderError::BadMagic);
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(HeaderError::UnsupportedVersion(version));
        }
        need(buf, V2_HEADER_LEN)?;
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(corrupt(format!(
                "cluster_bits {cluster_bits} is outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
            )));
        }
        let cluster_size = 1usize << cluster_bits;
        let mut h = Qcow2Header {
            version,
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN as u32,
            compression_type: 0,
            header_tail: Vec::new(),
            backing_file: None,
            extensions: Vec::new(),
        };
        if version == 3 {
            need(buf, V3_HEADER_LEN)?;
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            let len = h.header_length as usize;
            if len < V3_HEADER_LEN || !len.is_multiple_of(8) {
                return Err(corrupt(format!(
                    "header_length {len} is not a multiple of 8 of at least {V3_HEADER_LEN}"
                )));
            }
            if len > cluster_size {
                return Err(corrupt(format!(
                    "header_length {len} is larger than a cluster ({cluster_size})"
                )));
            }
            need(buf, len)?;
            if len > V3_HEADER_LEN {
                h.compression_type = buf[V3_HEADER_LEN];
                h.header_tail = buf[V3_HEADER_LEN + 1..len].to_vec();
            }
        }
        if h.refcount_order > 6 {
            return Err(corrupt(format!(
                "refcount_order {} is larger than 6",
                h.refcount_order
            )));
        }

        // Extensions: qemu reads them in v2 images too.
        let mut at = h.header_length as usize;
        loop {
            if at + 8 > cluster_size {
                return Err(corrupt("header extensions run past the first cluster"));
            }
            need(buf, at + 8)?;
            let kind = be32(buf, at);
            let len = be32(buf, at + 4) as usize;
            at += 8;
            if kind == EXT_END {
                break;
            }
            let end = at
                .checked_add(len)
                .filter(|&e| e <= cluster_size)
                .ok_or_else(|| corrupt("a header extension runs past the first cluster"))?;
            need(buf, end)?;
            h.extensions.push(Extension {
                kind,
                data: buf[at..end].to_vec(),
            });
            at = end.next_multiple_of(8);
        }

        let backing_offset = be64(buf, 8);
        let backing_len = be32(buf, 16) as usize;
        if backing_offset != 0 {
            if backing_len > MAX_BACKING_NAME {
                return Err(corrupt(format!(
                    "backing file name is {backing_len} bytes (the limit is {MAX_BACKING_NAME})"
                )));
            }
            let start = usize::try_from(backing_offset)
                .ok()
                .filter(|&s| {
                    s.checked_add(backing_len)
                        .is_some_and(|e| e <= cluster_size)
                })
                .ok_or_else(|| corrupt("backing file name lies past the first cluster"))?;
            need(buf, start + backing_len)?;
            let name = std::str::from_utf8(&buf[start..start + backing_len])
                .map_err(|_| corrupt("backing file name is not UTF-8"))?;
            h.backing_file = Some(name.to_owned());
        }
        Ok(h)
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The L1 table's bytes in the file (its `l1_size` entries of 8 bytes).
    pub fn l1_range(&self) -> std::ops::Range<u64> {
        self.l1_table_offset..self.l1_table_offset + u64::from(self.l1_size) * 8
    }

    /// The backing format from its header extension, if present.
    pub fn backing_format(&self) -> Option<&str> {
        self.extensions
            .iter()
            .find(|e| e.kind == EXT_BACKING_FORMAT)
            .and_then(|e| std::str::from_utf8(&e.data).ok())
    }

    /// Refuses, with a message for the user, images sluice cannot serve correctly.
    pub fn check_supported(&self) -> Result<(), HeaderError> {
        let unsupported = |m: &str| Err(HeaderError::Unsupported(m.to_owned()));
        if self.crypt_method != 0 {
            return unsupported("encrypted qcow2 images are not supported");
        }
        let f = self.incompatible_features;
        if f & INCOMPAT_CORRUPT != 0 {
            return unsupported(
                "the image is marked corrupt; check it with `qemu-img check -r all`",
            );
        }
        if f & INCOMPAT_DIRTY != 0 {
            return unsupported(
                "the image is marked dirty (lazy refcounts); repair it with `qemu-img check -r all`",
            );
        }
        if f & INCOMPAT_DATA_FILE != 0 {
            return unsupported("qcow2 images with an external data file are not supported");
        }
        if f & INCOMPAT_EXTL2 != 0 {
            return unsupported("qcow2 images with subclusters (extended_l2) are not supported");
        }
        if f & INCOMPAT_COMPRESSION != 0 && self.compression_type != 0 {
            return unsupported("only deflate-compressed qcow2 images are supported (not zstd)");
        }
        let unknown = f & !(INCOMPAT_DIRTY
            | INCOMPAT_CORRUPT
            | INCOMPAT_DATA_FILE
            | INCOMPAT_COMPRESSION
            | INCOMPAT_EXTL2);
        if unknown != 0 {
            return Err(HeaderError::Unsupported(format!(
                "the image uses unknown incompatible features {unknown:#x}"
            )));
        }
        Ok(())
    }

    /// Checks the tables the header points to against the file length: aligned, and inside
    /// the file, so that a truncated image is refused at open rather than read as zeroes.
    pub fn check_layout(&self, file_len: u64) -> Result<(), HeaderError> {
        let cs = self.cluster_size();
        let check = |what: &str, offset: u64, len: u64| {
            if !offset.is_multiple_of(cs) {
                return Err(corrupt(format!(
                    "{what} at {offset:#x} is not cluster-aligned"
                )));
            }
            match offset.checked_add(len) {
                Some(end) if end <= file_len => Ok(()),
                _ => Err(corrupt(format!(
                    "{what} at {offset:#x} (+{len} bytes) lies past the end of the file ({file_len} bytes)"
                ))),
            }
        };
        let l1_bytes = u64::from(self.l1_size) * 8;
        // The L1 table must cover the disk (qemu's check).
        let l2_covers = cs * (cs / 8);
        if u64::from(self.l1_size) < self.size.div_ceil(l2_covers) {
            return Err(corrupt(format!(
                "L1 table has {} entries, too few for a disk of {} bytes",
                self.l1_size, self.size
            )));
        }
        if self.l1_size > 0 {
            check("the L1 table", self.l1_table_offset, l1_bytes)?;
        }
        if self.refcount_table_clusters == 0 {
            return Err(corrupt("the refcount table is empty"));
        }
        check(
            "the refcount table",
            self.refcount_table_offset,
            u64::from(self.refcount_table_clusters) * cs,
        )
    }

    /// Changes the backing file name and format (None removes them). The result is checked
    /// by [`Qcow2Header::encode`], which refuses a header that no longer fits a cluster.
    pub fn set_backing(&mut self, name: Option<&str>, format: Option<Format>) {
        self.backing_file = name.map(str::to_owned);
        self.extensions.retain(|e| e.kind != EXT_BACKING_FORMAT);
        if let (Some(_), Some(fmt)) = (name, format) {
            // qemu writes the backing format first.
            self.extensions.insert(
                0,
                Extension {
                    kind: EXT_BACKING_FORMAT,
                    data: fmt.as_str().as_bytes().to_vec(),
                },
            );
        }
    }

    /// Encodes the first cluster's header part: header, extensions, end marker and backing
    /// name, with `backing_file_offset`/`size` recomputed. Bytes after the returned length up
    /// to the cluster end are unused and should be written as zeroes (qemu does).
    pub fn encode(&self) -> Result<Vec<u8>, HeaderError> {
        let mut b = Vec::with_capacity(512);
        b.extend_from_slice(&QCOW2_MAGIC);
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes()); // backing_file_offset, patched below
        b.extend_from_slice(&0u32.to_be_bytes()); // backing_file_size, patched below
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&self.crypt_method.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        b.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        debug_assert_eq!(b.len(), V2_HEADER_LEN);
        if self.version >= 3 {
            b.extend_from_slice(&self.incompatible_features.to_be_bytes());
            b.extend_from_slice(&self.compatible_features.to_be_bytes());
            b.extend_from_slice(&self.autoclear_features.to_be_bytes());
            b.extend_from_slice(&self.refcount_order.to_be_bytes());
            b.extend_from_slice(&self.header_length.to_be_bytes());
            if self.header_length as usize > V3_HEADER_LEN {
                b.push(self.compression_type);
                b.extend_from_slice(&self.header_tail);
            }
            if b.len() != self.header_length as usize {
                return Err(corrupt(format!(
                    "header_length {} does not match the encoded header ({} bytes)",
                    self.header_length,
                    b.len()
                )));
            }
        }
        for e in &self.extensions {
            b.extend_from_slice(&e.kind.to_be_bytes());
            b.extend_from_slice(&(e.data.len() as u32).to_be_bytes());
            b.extend_from_slice(&e.data);
            b.resize(b.len().next_multiple_of(8), 0);
        }
        b.extend_from_slice(&[0; 8]); // end of extensions
        if let Some(name) = &self.backing_file {
            if name.len() > MAX_BACKING_NAME {
                return Err(corrupt(format!(
                    "backing file name is {} bytes (the limit is {MAX_BACKING_NAME})",
                    name.len()
                )));
            }
            let offset = b.len() as u64;
            b[8..16].copy_from_slice(&offset.to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            b.extend_from_slice(name.as_bytes());
        }
        let cluster_size = 1usize << self.cluster_bits;
        if b.len() > cluster_size {
            return Err(HeaderError::TooLarge {
                len: b.len(),
                cluster_size,
            });
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v3 header as `qemu-img create -f qcow2 -b base.raw -F raw top.qcow2 1M` writes it:
    /// 64K clusters, L1 at 0x30000, refcount table at 0x10000.
    fn v3_with_backing() -> Vec<u8> {
        let mut h = Qcow2Header {
            version: 3,
            cluster_bits: 16,
            size: 1 << 20,
            crypt_method: 0,
            l1_size: 1,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 112,
            compression_type: 0,
            header_tail: vec![0; 7],
            backing_file: None,
            extensions: vec![Extension {
                kind: EXT_FEATURE_NAMES,
                data: b"\x00\x00dirty bit".to_vec(),
            }],
        };
        h.set_backing(Some("base.raw"), Some(Format::Raw));
        h.encode().unwrap()
    }

    #[test]
    fn parse_encoded_header_round_trips() {
        let bytes = v3_with_backing();
        let h = Qcow2Header::parse(&bytes).unwrap();
        assert_eq!(h.backing_file.as_deref(), Some("base.raw"));
        assert_eq!(h.backing_format(), Some("raw"));
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.extensions.len(), 2);
        assert_eq!(h.encode().unwrap(), bytes);
    }

    #[test]
    fn parse_short_input_asks_for_more() {
        let bytes = v3_with_backing();
        for cut in [0, 7, 71, 103, 111, 120, bytes.len() - 1] {
            match Qcow2Header::parse(&bytes[..cut]) {
                Err(HeaderError::Incomplete { needed }) => {
                    assert!(needed > cut && needed <= bytes.len(), "cut {cut}: {needed}")
                }
                other => panic!("cut {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn parse_bad_magic_and_version_are_refused() {
        let mut bytes = v3_with_backing();
        bytes[4..8].copy_from_slice(&4u32.to_be_bytes());
        assert_eq!(
            Qcow2Header::parse(&bytes),
            Err(HeaderError::UnsupportedVersion(4))
        );
        bytes[0] = b'X';
        assert_eq!(Qcow2Header::parse(&bytes), Err(HeaderError::BadMagic));
    }

    #[test]
    fn parse_bad_cluster_bits_is_corrupt() {
        let mut bytes = v3_with_backing();
        bytes[20..24].copy_from_slice(&40u32.to_be_bytes());
        assert!(matches!(
            Qcow2Header::parse(&bytes),
            Err(HeaderError::Corrupt(m)) if m.contains("cluster_bits 40")
        ));
    }

    #[test]
    fn parse_backing_name_past_cluster_is_corrupt() {
        let mut bytes = v3_with_backing();
        bytes[8..16].copy_from_slice(&70000u64.to_be_bytes());
        assert!(matches!(
            Qcow2Header::parse(&bytes),
            Err(HeaderError::Corrupt(m)) if m.contains("past the first cluster")
        ));
    }

    #[test]
    fn probe_recognises_qcow2_versions_only() {
        let bytes = v3_with_backing();
        assert_eq!(probe(&bytes), Format::Qcow2);
        assert_eq!(probe(&bytes[..7]), Format::Raw);
        assert_eq!(probe(b"QFI\xfb\0\0\0\x04"), Format::Raw);
        assert_eq!(probe(&[0; 512]), Format::Raw);
    }

    #[test]
    fn check_supported_refuses_dirty_and_encrypted() {
        let mut h = Qcow2Header::parse(&v3_with_backing()).unwrap();
        assert_eq!(h.check_supported(), Ok(()));
        h.incompatible_features = INCOMPAT_DIRTY;
        assert!(
            matches!(h.check_supported(), Err(HeaderError::Unsupported(m)) if m.contains("dirty"))
        );
        h.incompatible_features = 0;
        h.crypt_method = 1;
        assert!(
            matches!(h.check_supported(), Err(HeaderError::Unsupported(m)) if m.contains("encrypted"))
        );
    }

    #[test]
    fn check_layout_refuses_tables_past_eof() {
        let h = Qcow2Header::parse(&v3_with_backing()).unwrap();
        assert_eq!(h.check_layout(0x40000), Ok(()));
        assert!(matches!(
            h.check_layout(0x30004),
            Err(HeaderError::Corrupt(m)) if m.contains("L1 table")
        ));
    }

    #[test]
    fn set_backing_none_removes_name_and_format() {
        let mut h = Qcow2Header::parse(&v3_with_backing()).unwrap();
        h.set_backing(None, None);
        let again = Qcow2Header::parse(&h.encode().unwrap()).unwrap();
        assert_eq!(again.backing_file, None);
        assert_eq!(again.backing_format(), None);
        assert_eq!(again.extensions.len(), 1);
    }

    /// The fuzz target's property on a deterministic sample: every single-byte change of a
    /// valid header parses or fails cleanly, and what parses re-encodes to a header that
    /// parses back the same.
    #[test]
    fn parse_mutated_headers_never_panics_and_round_trips() {
        let good = v3_with_backing();
        for at in 0..good.len() {
            for v in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut b = good.clone();
                b[at] = v;
                if let Ok(h) = Qcow2Header::parse(&b) {
                    let _ = h.check_supported();
                    let _ = h.check_layout(at as u64 * 4096);
                    if let Ok(again) = h.encode() {
                        assert_eq!(Qcow2Header::parse(&again).as_ref(), Ok(&h), "byte {at}={v}");
                    }
                }
            }
        }
    }

    #[test]
    fn encode_too_long_for_cluster_is_refused() {
        let mut h = Qcow2Header::parse(&v3_with_backing()).unwrap();
        h.cluster_bits = 9;
        h.extensions.push(Extension {
            kind: 0x1234,
            data: vec![0; 400],
        });
        assert!(matches!(h.encode(), Err(HeaderError::TooLarge { .. })));
    }
}
