//! Fuzzes the qcow2 header parser with the first bytes of an image file.
//!
//! Properties: no panic (parse, the support and layout checks, encode), and a header that
//! parses and encodes parses back to the same value.

use sluice_image::header::{probe, Qcow2Header};

/// Runs the target's checks on one input (a fuzz input or a committed seed).
pub fn run(data: &[u8]) {
    let _ = probe(data);
    if let Ok(h) = Qcow2Header::parse(data) {
        let _ = h.check_supported();
        let _ = h.check_layout(data.len() as u64);
        if let Ok(bytes) = h.encode() {
            assert_eq!(Qcow2Header::parse(&bytes).as_ref(), Ok(&h));
        }
    }
}
