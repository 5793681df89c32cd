//! Fuzzes the decoder of raw images' sidecar bitmap files (`sluice_image::sidecar`) with
//! untrusted bytes, as read and again with the checksum made right (so that mutations reach
//! the fields behind it).
//!
//! Properties: no panic; a file that decodes encodes back to the same bytes (the format has
//! one encoding); what decodes is also what [`salvage`] reads from it.

use sluice_image::sidecar::{crc32, decode, encode, salvage};

fn check(data: &[u8]) {
    let salvaged = salvage(data);
    if let Ok(s) = decode(data) {
        assert_eq!(encode(&s), data);
        let names: Vec<(String, u64, bool)> = s
            .bitmaps
            .iter()
            .map(|e| (e.name.clone(), e.granularity, e.enabled))
            .collect();
        assert_eq!(salvaged, Some(names));
    }
}

/// Runs the target's checks on one input (a fuzz input or a committed seed).
pub fn run(data: &[u8]) {
    check(data);
    if data.len() >= 4 {
        let mut fixed = data.to_vec();
        let n = fixed.len() - 4;
        let crc = crc32(&fixed[..n]);
        fixed[n..].copy_from_slice(&crc.to_be_bytes());
        check(&fixed);
    }
}
