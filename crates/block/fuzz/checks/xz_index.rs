//! Fuzzes the xz container parser ([`XzMap::build`], [`parse_block_header`]) that the xz
//! filter runs on whatever file the layer below serves.
//!
//! The input is the whole file. Properties: no panic; the parser never reads outside the
//! file; an accepted map places its blocks one after another in the uncompressed data
//! (ending at its size), inside the file, and finds each block by its first and last byte.

use sluice_block::filters::xz::format::{parse_block_header, XzError, XzMap};

/// Runs the target's checks on one input (a fuzz input or a committed seed).
pub fn run(data: &[u8]) {
    let len = data.len() as u64;
    let built = XzMap::build(len, |buf: &mut [u8], off| {
        let start = usize::try_from(off).expect("offset fits");
        let end = start.checked_add(buf.len()).expect("no overflow");
        assert!(
            end <= data.len(),
            "read {start}..{end} of a {len}-byte file"
        );
        buf.copy_from_slice(&data[start..end]);
        Ok::<(), XzError>(())
    });
    if let Ok(map) = built {
        let mut at = 0;
        for b in &map.blocks {
            assert_eq!(b.start, at, "{map:?}");
            assert!(b.record.uncompressed > 0 && b.record.uncompressed <= map.max_block);
            assert!(b.file_offset + b.record.padded() <= len, "{map:?}");
            assert_eq!(map.locate(b.start), Some(b));
            assert_eq!(map.locate(b.end() - 1), Some(b));
            at = b.end();
        }
        assert_eq!(at, map.size);
        assert!(map.locate(map.size).is_none());
    }
    if let Ok(h) = parse_block_header(data, 0) {
        assert_eq!(h.size, len);
    }
}
