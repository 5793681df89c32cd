//! The parts of the .xz container format (xz-file-format 1.1.0) that the xz filter reads to
//! seek: stream headers and footers, stream padding, indexes and block headers, and the map
//! from uncompressed offsets to blocks that they give.
//!
//! This is pure code: [`XzMap::build`] reads through a callback (the filter passes the layer
//! below, the tests a byte vector), and every parser takes bytes and the file offset they
//! came from, and returns a typed value or an [`XzError`] that says what was wrong and where.
//! Nothing here decompresses; liblzma does that, one block at a time, fed the framing
//! [`Block::framing`] builds around the block's bytes (see the filter's module doc).
//!
//! All integers are little-endian; sizes in indexes and block headers are xz's variable-length
//! integers (7 bits a byte, at most 9 bytes, no needless trailing zero byte).

/// The 6 bytes that open every stream.
pub const HEADER_MAGIC: [u8; 6] = [0xFD, b'7', b'z', b'X', b'Z', 0x00];
/// The 2 bytes that close every stream.
pub const FOOTER_MAGIC: [u8; 2] = *b"YZ";
/// Size of a stream header, and of a stream footer.
pub const STREAM_HEADER_SIZE: u64 = 12;
/// Largest value of an xz variable-length integer (2^63 - 1).
const VLI_MAX: u64 = u64::MAX / 2;

/// Why an xz file cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XzError {
    /// The file does not start with the xz magic.
    #[error("not an xz file")]
    NotXz,
    /// xz files are made of 4-byte units, so the size must be a multiple of 4.
    #[error("not an xz file: size is not a multiple of 4 bytes")]
    BadSize,
    /// A structure is malformed or does not agree with another.
    #[error("corrupt xz file: {what} at offset {offset}")]
    Corrupt { what: String, offset: u64 },
    /// A structure's CRC32 does not match its bytes.
    #[error("corrupt xz file: bad CRC32 of the {what} at offset {offset}")]
    BadCrc { what: &'static str, offset: u64 },
    /// A well-formed file using something this reader does not know (reserved flags).
    #[error("unsupported xz file: {what} at offset {offset}")]
    Unsupported { what: String, offset: u64 },
}

fn corrupt(what: impl Into<String>, offset: u64) -> XzError {
    XzError::Corrupt {
        what: what.into(),
        offset,
    }
}

/// A stream's flags: which integrity check its blocks carry (the second flags byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamFlags {
    pub check: u8,
}

impl StreamFlags {
    /// Size in bytes of the check field after each block's data (by check ID, as the spec's
    /// table: 0, 4, 8, 16, 32 or 64 bytes).
    pub fn check_size(self) -> u64 {
        match self.check {
            0 => 0,
            1..=3 => 4,
            4..=6 => 8,
            7..=9 => 16,
            10..=12 => 32,
            _ => 64,
        }
    }

    fn parse(b: [u8; 2], offset: u64) -> Result<StreamFlags, XzError> {
        if b[0] != 0 || b[1] & 0xF0 != 0 {
            return Err(XzError::Unsupported {
                what: format!("reserved stream flags {:02x}{:02x}", b[0], b[1]),
                offset,
            });
        }
        Ok(StreamFlags { check: b[1] })
    }

    fn bytes(self) -> [u8; 2] {
        [0, self.check]
    }
}

fn crc32(b: &[u8]) -> u32 {
    crc32fast::hash(b)
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Reads one variable-length integer from `b[*pos..]`, moving `pos` past it.
fn read_vli(b: &[u8], pos: &mut usize, what: &str, base: u64) -> Result<u64, XzError> {
    let mut value = 0u64;
    for i in 0..9 {
        let Some(&byte) = b.get(*pos) else {
            return Err(corrupt(format!("{what} runs past its end"), base));
        };
        *pos += 1;
        value |= u64::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            // A last byte of 0 (other than for the value 0) is a non-minimal encoding.
            if byte == 0 && i > 0 {
                return Err(corrupt(format!("{what}: badly encoded integer"), base));
            }
            return Ok(value);
        }
    }
    Err(corrupt(
        format!("{what}: integer longer than 9 bytes"),
        base,
    ))
}

fn push_vli(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Parses a stream header (12 bytes at `offset`).
pub fn parse_stream_header(b: &[u8; 12], offset: u64) -> Result<StreamFlags, XzError> {
    if b[..6] != HEADER_MAGIC {
        return Err(if offset == 0 {
            XzError::NotXz
        } else {
            corrupt("missing stream header magic", offset)
        });
    }
    if crc32(&b[6..8]) != le32(&b[8..12]) {
        return Err(XzError::BadCrc {
            what: "stream header",
            offset,
        });
    }
    StreamFlags::parse([b[6], b[7]], offset)
}

/// A parsed stream footer: the stream's flags and the size of its index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    pub flags: StreamFlags,
    /// Size of the index in bytes ("backward size").
    pub index_size: u64,
}

/// Parses a stream footer (12 bytes at `offset`).
pub fn parse_stream_footer(b: &[u8; 12], offset: u64) -> Result<Footer, XzError> {
    if b[10..12] != FOOTER_MAGIC {
        return Err(corrupt("missing stream footer magic", offset));
    }
    if crc32(&b[4..10]) != le32(&b[0..4]) {
        return Err(XzError::BadCrc {
            what: "stream footer",
            offset,
        });
    }
    Ok(Footer {
        flags: StreamFlags::parse([b[8], b[9]], offset)?,
        index_size: (u64::from(le32(&b[4..8])) + 1) * 4,
    })
}

/// One index record: a block's sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Block header + compressed data + check, without the block padding.
    pub unpadded: u64,
    pub uncompressed: u64,
}

impl Record {
    /// The bytes the block takes in the file, padding included.
    pub fn padded(self) -> u64 {
        self.unpadded.next_multiple_of(4)
    }
}

/// Parses a whole index (`b` is exactly the index, read from `offset`).
pub fn parse_index(b: &[u8], offset: u64) -> Result<Vec<Record>, XzError> {
    if b.len() < 8 || !b.len().is_multiple_of(4) {
        return Err(corrupt("index has an impossible size", offset));
    }
    if b[0] != 0 {
        return Err(corrupt("missing index indicator", offset));
    }
    let body = b.len() - 4;
    if crc32(&b[..body]) != le32(&b[body..]) {
        return Err(XzError::BadCrc {
            what: "index",
            offset,
        });
    }
    let b = &b[..body];
    let mut pos = 1;
    let count = read_vli(b, &mut pos, "index", offset)?;
    // Each record takes at least 2 bytes: a count beyond that cannot fit.
    if count > (b.len() / 2) as u64 {
        return Err(corrupt("index counts more records than it holds", offset));
    }
    let mut records = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let unpadded = read_vli(b, &mut pos, "index record", offset)?;
        let uncompressed = read_vli(b, &mut pos, "index record", offset)?;
        if !(5..=VLI_MAX & !3).contains(&unpadded) || uncompressed > VLI_MAX {
            return Err(corrupt("index record with an impossible size", offset));
        }
        records.push(Record {
            unpadded,
            uncompressed,
        });
    }
    if b.len() - pos > 3 || b[pos..].iter().any(|&x| x != 0) {
        return Err(corrupt("index padding is not 0-3 zero bytes", offset));
    }
    Ok(records)
}

/// The size an index of `records` takes: what the stream footer must say.
fn index_size(records: &[Record]) -> u64 {
    let mut v = Vec::new();
    push_vli(&mut v, records.len() as u64);
    for r in records {
        push_vli(&mut v, r.unpadded);
        push_vli(&mut v, r.uncompressed);
    }
    (1 + v.len() as u64).next_multiple_of(4) + 4
}

/// A parsed block header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockHeader {
    /// Size of the header itself, 8 to 1024 bytes.
    pub size: u64,
    pub compressed: Option<u64>,
    pub uncompressed: Option<u64>,
    /// The filter chain: (filter ID, properties), last one the compressor (LZMA2).
    pub filters: Vec<(u64, Vec<u8>)>,
}

/// The size of a block header, from its first byte (0 is an index indicator, not a block).
pub fn block_header_size(first: u8, offset: u64) -> Result<u64, XzError> {
    if first == 0 {
        return Err(corrupt(
            "index indicator where a block header was expected",
            offset,
        ));
    }
    Ok((u64::from(first) + 1) * 4)
}

/// Parses a whole block header (`b` is exactly the header, read from `offset`).
pub fn parse_block_header(b: &[u8], offset: u64) -> Result<BlockHeader, XzError> {
    let size = block_header_size(*b.first().unwrap_or(&0), offset)?;
    if b.len() as u64 != size {
        return Err(corrupt("block header of the wrong size", offset));
    }
    let body = b.len() - 4;
    if crc32(&b[..body]) != le32(&b[body..]) {
        return Err(XzError::BadCrc {
            what: "block header",
            offset,
        });
    }
    let b = &b[..body];
    let flags = b[1];
    if flags & 0x3C != 0 {
        return Err(XzError::Unsupported {
            what: format!("reserved block flags {flags:02x}"),
            offset,
        });
    }
    let mut pos = 2;
    let mut optional = |present: bool| -> Result<Option<u64>, XzError> {
        if present {
            read_vli(b, &mut pos, "block header", offset).map(Some)
        } else {
            Ok(None)
        }
    };
    let compressed = optional(flags & 0x40 != 0)?;
    let uncompressed = optional(flags & 0x80 != 0)?;
    if compressed == Some(0) {
        return Err(corrupt("block header says 0 compressed bytes", offset));
    }
    let mut filters = Vec::new();
    for _ in 0..=(flags & 3) {
        let id = read_vli(b, &mut pos, "block filter flags", offset)?;
        let n = read_vli(b, &mut pos, "block filter flags", offset)?;
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| pos.checked_add(n))
            .filter(|&e| e <= b.len())
            .ok_or_else(|| corrupt("block filter properties run past the header", offset))?;
        filters.push((id, b[pos..end].to_vec()));
        pos = end;
    }
    if b[pos..].iter().any(|&x| x != 0) {
        return Err(corrupt("block header padding is not zero", offset));
    }
    Ok(BlockHeader {
        size,
        compressed,
        uncompressed,
        filters,
    })
}

impl BlockHeader {
    /// Checks the header against the block's index record (what liblzma's
    /// `lzma_block_compressed_size` checks): sizes the header states must agree.
    pub fn check_against(
        &self,
        rec: Record,
        flags: StreamFlags,
        offset: u64,
    ) -> Result<(), XzError> {
        let room = rec
            .unpadded
            .checked_sub(self.size + flags.check_size())
            .filter(|&c| c > 0)
            .ok_or_else(|| corrupt("block header larger than the index says", offset))?;
        if self.compressed.is_some_and(|c| c != room) {
            return Err(corrupt(
                "block header and index disagree on the compressed size",
                offset,
            ));
        }
        if self.uncompressed.is_some_and(|u| u != rec.uncompressed) {
            return Err(corrupt(
                "block header and index disagree on the uncompressed size",
                offset,
            ));
        }
        Ok(())
    }
}

/// One non-empty block, placed in the file and in the uncompressed data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// Offset of its first byte in the uncompressed data.
    pub start: u64,
    /// File offset of its block header.
    pub file_offset: u64,
    pub record: Record,
    /// Flags of the stream it is in (its check).
    pub flags: StreamFlags,
}

impl Block {
    /// One past its last uncompressed byte.
    pub fn end(&self) -> u64 {
        self.start + self.record.uncompressed
    }

    /// A stream header and an index + stream footer that make this block, put between them,
    /// a complete one-block xz stream. A stream decoder fed that checks all a stream
    /// decoder checks (block header CRC, the block's check, the sizes against the index).
    pub fn framing(&self) -> ([u8; 12], Vec<u8>) {
        let flags = self.flags.bytes();
        let mut head = [0u8; 12];
        head[..6].copy_from_slice(&HEADER_MAGIC);
        head[6..8].copy_from_slice(&flags);
        head[8..].copy_from_slice(&crc32(&flags).to_le_bytes());

        let mut tail = vec![0u8];
        push_vli(&mut tail, 1);
        push_vli(&mut tail, self.record.unpadded);
        push_vli(&mut tail, self.record.uncompressed);
        tail.resize(tail.len().next_multiple_of(4), 0);
        tail.extend_from_slice(&crc32(&tail).to_le_bytes());
        let backward = (tail.len() as u32 / 4 - 1).to_le_bytes();
        let mut footer = [0u8; 12];
        footer[4..8].copy_from_slice(&backward);
        footer[8..10].copy_from_slice(&flags);
        footer[10..].copy_from_slice(&FOOTER_MAGIC);
        let crc = crc32(&footer[4..10]).to_le_bytes();
        footer[..4].copy_from_slice(&crc);
        tail.extend_from_slice(&footer);
        (head, tail)
    }
}

/// Where every non-empty block of an xz file lies, from its indexes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XzMap {
    /// Non-empty blocks in file order (so in uncompressed order).
    pub blocks: Vec<Block>,
    /// Size of the uncompressed data.
    pub size: u64,
    pub streams: usize,
    /// Uncompressed size of the largest block.
    pub max_block: u64,
}

impl XzMap {
    /// Reads the map of a `len`-byte xz file through `read(buf, offset)` (which fills `buf`
    /// from that file offset): checks the magic, then walks the streams from the end of the
    /// file backwards (footer, index, header; skipping stream padding), as `xz --list` does.
    pub fn build<E: From<XzError>>(
        len: u64,
        mut read: impl FnMut(&mut [u8], u64) -> Result<(), E>,
    ) -> Result<XzMap, E> {
        if len < 2 * STREAM_HEADER_SIZE {
            return Err(XzError::NotXz.into());
        }
        let mut magic = [0u8; 6];
        read(&mut magic, 0)?;
        if magic != HEADER_MAGIC {
            return Err(XzError::NotXz.into());
        }
        if !len.is_multiple_of(4) {
            return Err(XzError::BadSize.into());
        }

        // (stream start, flags, records), last stream first.
        let mut streams = Vec::new();
        let mut pos = len;
        while pos > 0 {
            if pos < STREAM_HEADER_SIZE {
                return Err(corrupt("data before the first stream", pos).into());
            }
            let mut footer = [0u8; 12];
            let at = pos - STREAM_HEADER_SIZE;
            read(&mut footer, at)?;
            if footer[8..] == [0; 4] {
                pos -= 4; // stream padding
                continue;
            }
            let f = parse_stream_footer(&footer, at)?;
            if at < f.index_size + STREAM_HEADER_SIZE {
                return Err(
                    corrupt("stream footer gives an index larger than the file", at).into(),
                );
            }
            let index_at = at - f.index_size;
            let mut index = vec![0u8; f.index_size as usize];
            read(&mut index, index_at)?;
            let records = parse_index(&index, index_at)?;
            if index_size(&records) != f.index_size {
                return Err(
                    corrupt("index size differs from the stream footer's", index_at).into(),
                );
            }
            let blocks = records
                .iter()
                .try_fold(0u64, |sum, r| sum.checked_add(r.padded()))
                .filter(|&b| b + STREAM_HEADER_SIZE <= index_at)
                .ok_or_else(|| corrupt("index gives blocks larger than the file", index_at))?;
            let start = index_at - blocks - STREAM_HEADER_SIZE;
            let mut header = [0u8; 12];
            read(&mut header, start)?;
            let flags = parse_stream_header(&header, start)?;
            if flags != f.flags {
                return Err(corrupt("stream header and footer flags differ", start).into());
            }
            streams.push((start, flags, records));
            pos = start;
        }

        let mut map = XzMap {
            blocks: Vec::new(),
            size: 0,
            streams: streams.len(),
            max_block: 0,
        };
        for (start, flags, records) in streams.into_iter().rev() {
            let mut file_offset = start + STREAM_HEADER_SIZE;
            for record in records {
                if record.uncompressed > 0 {
                    map.blocks.push(Block {
                        start: map.size,
                        file_offset,
                        record,
                        flags,
                    });
                    map.max_block = map.max_block.max(record.uncompressed);
                }
                map.size = map
                    .size
                    .checked_add(record.uncompressed)
                    .filter(|&s| s <= VLI_MAX)
                    .ok_or_else(|| corrupt("uncompressed size overflows", file_offset))?;
                file_offset += record.padded();
            }
        }
        Ok(map)
    }

    /// The block holding uncompressed byte `offset`, if `offset` is inside the data.
    pub fn locate(&self, offset: u64) -> Option<&Block> {
        let i = self.blocks.partition_point(|b| b.end() <= offset);
        self.blocks.get(i).filter(|b| b.start <= offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds an xz-shaped file from streams of fake blocks (`(unpadded, uncompressed)`),
    /// with valid headers, indexes and footers; block contents are filler bytes.
    fn fake_file(streams: &[&[(u64, u64)]], padding: usize) -> Vec<u8> {
        let mut f = Vec::new();
        for recs in streams {
            let records: Vec<Record> = recs
                .iter()
                .map(|&(unpadded, uncompressed)| Record {
                    unpadded,
                    uncompressed,
                })
                .collect();
            let block = Block {
                start: 0,
                file_offset: 0,
                record: records[0],
                flags: StreamFlags { check: 4 },
            };
            let (head, _) = block.framing();
            f.extend_from_slice(&head);
            for r in &records {
                f.resize(f.len() + r.padded() as usize, 0xAA);
            }
            let mut idx = vec![0u8];
            push_vli(&mut idx, records.len() as u64);
            for r in &records {
                push_vli(&mut idx, r.unpadded);
                push_vli(&mut idx, r.uncompressed);
            }
            idx.resize(idx.len().next_multiple_of(4), 0);
            idx.extend_from_slice(&crc32(&idx).to_le_bytes());
            let mut footer = [0u8; 12];
            footer[4..8].copy_from_slice(&(idx.len() as u32 / 4 - 1).to_le_bytes());
            footer[8..10].copy_from_slice(&[0, 4]);
            footer[10..].copy_from_slice(b"YZ");
            let crc = crc32(&footer[4..10]).to_le_bytes();
            footer[..4].copy_from_slice(&crc);
            f.extend_from_slice(&idx);
            f.extend_from_slice(&footer);
            f.resize(f.len() + padding, 0);
        }
        f
    }

    fn build(f: &[u8]) -> Result<XzMap, XzError> {
        XzMap::build(f.len() as u64, |buf: &mut [u8], off| {
            let off = off as usize;
            buf.copy_from_slice(&f[off..off + buf.len()]);
            Ok::<(), XzError>(())
        })
    }

    #[test]
    fn vli_round_trips_and_rejects_bad_encodings() {
        for v in [0, 1, 127, 128, 300, 1 << 40, VLI_MAX] {
            let mut b = Vec::new();
            push_vli(&mut b, v);
            let mut pos = 0;
            assert_eq!(read_vli(&b, &mut pos, "t", 0).unwrap(), v);
            assert_eq!(pos, b.len());
        }
        let mut pos = 0;
        assert!(read_vli(&[0x80, 0x00], &mut pos, "t", 0).is_err());
        let mut pos = 0;
        assert!(read_vli(&[0xFF; 10], &mut pos, "t", 0).is_err());
        let mut pos = 0;
        assert!(read_vli(&[0x80], &mut pos, "t", 0).is_err());
    }

    #[test]
    fn map_multi_stream_with_padding_places_blocks() {
        let f = fake_file(&[&[(21, 100), (9, 0), (13, 50)], &[(6, 7)]], 8);
        let m = build(&f).unwrap();
        assert_eq!(m.streams, 2);
        assert_eq!(m.size, 157);
        assert_eq!(m.max_block, 100);
        // The empty block is skipped but its bytes still move the next block along.
        let offsets: Vec<_> = m.blocks.iter().map(|b| (b.start, b.file_offset)).collect();
        let second_stream = 12 + 24 + 12 + 16 + 12 + 12 + 8;
        assert_eq!(
            offsets,
            [(0, 12), (100, 12 + 24 + 12), (150, second_stream + 12)]
        );
        assert_eq!(m.locate(0).unwrap().start, 0);
        assert_eq!(m.locate(99).unwrap().start, 0);
        assert_eq!(m.locate(100).unwrap().start, 100);
        assert_eq!(m.locate(156).unwrap().start, 150);
        assert!(m.locate(157).is_none());
    }

    #[test]
    fn map_not_xz_is_refused_first() {
        assert_eq!(build(&[0u8; 64]), Err(XzError::NotXz));
        assert_eq!(build(&HEADER_MAGIC), Err(XzError::NotXz));
        let mut f = fake_file(&[&[(8, 8)]], 0);
        f.push(0);
        assert_eq!(build(&f), Err(XzError::BadSize));
    }

    #[test]
    fn map_bad_index_crc_is_reported_with_its_offset() {
        let mut f = fake_file(&[&[(8, 8)]], 0);
        let index_at = 12 + 8;
        f[index_at + 2] ^= 1;
        assert_eq!(
            build(&f),
            Err(XzError::BadCrc {
                what: "index",
                offset: index_at as u64
            })
        );
    }

    #[test]
    fn map_bad_footer_and_header_are_corrupt() {
        let good = fake_file(&[&[(8, 8)]], 0);
        let mut f = good.clone();
        let n = f.len();
        f[n - 1] = b'X';
        assert!(matches!(build(&f), Err(XzError::Corrupt { .. })), "{f:?}");
        let mut f = good.clone();
        f[n - 8] ^= 1; // backward size, under the footer CRC
        assert!(matches!(
            build(&f),
            Err(XzError::BadCrc {
                what: "stream footer",
                ..
            })
        ));
        let mut f = good;
        f[8] ^= 1; // stream header CRC
        assert!(matches!(
            build(&f),
            Err(XzError::BadCrc {
                what: "stream header",
                ..
            })
        ));
    }

    #[test]
    fn map_blocks_larger_than_file_are_corrupt() {
        let f = fake_file(&[&[(8, 8)]], 0);
        // Rewrite the index to claim a much bigger block, with a valid CRC.
        let mut idx = vec![0u8, 1];
        push_vli(&mut idx, 1 << 20);
        push_vli(&mut idx, 8);
        idx.resize(idx.len().next_multiple_of(4), 0);
        idx.extend_from_slice(&crc32(&idx).to_le_bytes());
        let mut g = f[..20].to_vec();
        g.extend_from_slice(&idx);
        let mut footer = [0u8; 12];
        footer[4..8].copy_from_slice(&(idx.len() as u32 / 4 - 1).to_le_bytes());
        footer[8..10].copy_from_slice(&[0, 4]);
        footer[10..].copy_from_slice(b"YZ");
        let crc = crc32(&footer[4..10]).to_le_bytes();
        footer[..4].copy_from_slice(&crc);
        g.extend_from_slice(&footer);
        match build(&g) {
            Err(XzError::Corrupt { what, .. }) => assert!(what.contains("larger"), "{what}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn index_padding_must_be_zero() {
        let mut idx = vec![0u8, 1, 8, 8, 1, 0, 0, 0];
        let crc = crc32(&idx[..4]).to_le_bytes();
        idx[4..].copy_from_slice(&crc);
        assert_eq!(parse_index(&idx, 0).unwrap().len(), 1);
        let mut bad = vec![0u8, 0, 0, 7];
        bad.extend_from_slice(&crc32(&bad).to_le_bytes());
        assert!(matches!(parse_index(&bad, 0), Err(XzError::Corrupt { .. })));
    }

    fn header(body: &[u8]) -> Vec<u8> {
        let mut h = body.to_vec();
        let size = (h.len() + 4).next_multiple_of(4);
        h[0] = (size / 4 - 1) as u8;
        h.resize(size - 4, 0);
        h.extend_from_slice(&crc32(&h).to_le_bytes());
        h
    }

    #[test]
    fn block_header_parses_sizes_and_filters() {
        // Both sizes present, one filter: LZMA2 with a dictionary byte.
        let h = header(&[0, 0xC0, 0x10, 0x80, 0x01, 0x21, 0x01, 0x16]);
        let p = parse_block_header(&h, 40).unwrap();
        assert_eq!(p.size, 12);
        assert_eq!(p.compressed, Some(16));
        assert_eq!(p.uncompressed, Some(128));
        assert_eq!(p.filters, vec![(0x21, vec![0x16])]);
        let flags = StreamFlags { check: 4 };
        let rec = Record {
            unpadded: 12 + 16 + 8,
            uncompressed: 128,
        };
        p.check_against(rec, flags, 40).unwrap();
        let wrong = Record {
            uncompressed: 127,
            ..rec
        };
        assert!(p.check_against(wrong, flags, 40).is_err());
        let short = Record {
            unpadded: 30,
            ..rec
        };
        assert!(p.check_against(short, flags, 40).is_err());
    }

    #[test]
    fn block_header_bad_crc_and_reserved_bits() {
        let mut h = header(&[0, 0x00, 0x21, 0x01, 0x16]);
        parse_block_header(&h, 0).unwrap();
        h[2] = 0x03;
        assert_eq!(
            parse_block_header(&h, 7),
            Err(XzError::BadCrc {
                what: "block header",
                offset: 7
            })
        );
        let h = header(&[0, 0x04, 0x21, 0x01, 0x16]);
        assert!(matches!(
            parse_block_header(&h, 0),
            Err(XzError::Unsupported { .. })
        ));
        let h = header(&[0, 0x00, 0x21, 0x09, 0x16]);
        assert!(matches!(
            parse_block_header(&h, 0),
            Err(XzError::Corrupt { .. })
        ));
        assert!(block_header_size(0, 0).is_err());
    }

    #[test]
    fn framing_parses_back_as_a_one_block_stream() {
        let b = Block {
            start: 0,
            file_offset: 0,
            record: Record {
                unpadded: 1000,
                uncompressed: 1 << 20,
            },
            flags: StreamFlags { check: 10 },
        };
        let (head, tail) = b.framing();
        assert_eq!(parse_stream_header(&head, 0).unwrap(), b.flags);
        let (index, footer) = tail.split_at(tail.len() - 12);
        let f = parse_stream_footer(footer.try_into().unwrap(), 0).unwrap();
        assert_eq!(f.flags, b.flags);
        assert_eq!(f.index_size, index.len() as u64);
        assert_eq!(parse_index(index, 0).unwrap(), vec![b.record]);
    }
}
