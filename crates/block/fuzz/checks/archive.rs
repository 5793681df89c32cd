//! Fuzzes the parsers of the tar and ddrescue filters, which read bytes the server's user
//! does not write: a tar archive from any plugin (a web server, a remote file) and a GNU
//! ddrescue map file.
//!
//! The first byte picks the parser: `T` walks the rest as a tar archive looking for
//! `disk.img` (and each 512-byte block through the header and pax parsers), `M` reads the
//! rest as a map file. Properties: no panic; an entry found starts on a block boundary after
//! its header and ends inside the archive, and a `tar-limit` of half the archive finds it
//! only if its header lies in that half; the finished ranges of a map file are sorted,
//! non-empty and neither overlap nor touch.

use sluice_block::filters::{ddrescue, tar};

/// Runs the target's checks on one input (a fuzz input or a committed seed).
pub fn run(data: &[u8]) {
    match data.split_first() {
        Some((b'T', archive)) => tar_checks(archive),
        Some((b'M', map)) => map_checks(map),
        _ => {}
    }
}

fn tar_checks(archive: &[u8]) {
    let len = archive.len() as u64;
    let read = |off: u64, buf: &mut [u8]| {
        buf.copy_from_slice(&archive[off as usize..off as usize + buf.len()]);
        Ok(())
    };
    if let Ok(e) = tar::locate(b"disk.img", len, 0, read) {
        assert!(
            e.offset >= tar::BLOCK && e.offset % tar::BLOCK == 0,
            "{e:?}"
        );
        assert!(e.offset + e.size <= len, "{e:?} past {len}");
        let half = len / 2;
        if half > 0 {
            if let Ok(h) = tar::locate(b"disk.img", len, half, read) {
                assert_eq!(h, e);
                assert!(e.offset <= half, "{e:?} found within {half}");
            }
        }
    }
    for block in archive.chunks_exact(512) {
        let block: &[u8; 512] = block.try_into().unwrap();
        let _ = tar::parse_header(block);
        let _ = tar::parse_pax(block);
    }
}

fn map_checks(map: &[u8]) {
    let Ok(blocks) = ddrescue::parse_mapfile(&String::from_utf8_lossy(map)) else {
        return;
    };
    let ranges = ddrescue::merge(blocks);
    for w in ranges.windows(2) {
        assert!(w[0].1 < w[1].0, "{ranges:?}");
    }
    assert!(ranges.iter().all(|r| r.0 < r.1), "{ranges:?}");
}
