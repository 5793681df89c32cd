//! Fuzzes the transmission request decoder in both header styles.
//!
//! Properties: no panic, a decoded header uses exactly one header's worth of bytes, and
//! encoding it again gives back those bytes.

use sluice_proto::nbd::request::{decode_request, encode_request};
use sluice_proto::nbd::{EXTENDED_REQUEST_LEN, REQUEST_LEN};

/// Runs the target's checks on one input (a fuzz input or a committed seed).
pub fn run(data: &[u8]) {
    for extended in [false, true] {
        if let Ok(Some((header, used))) = decode_request(data, extended) {
            let expected = if extended {
                EXTENDED_REQUEST_LEN
            } else {
                REQUEST_LEN
            };
            assert_eq!(used, expected);
            let mut again = Vec::new();
            encode_request(&mut again, &header, extended);
            assert_eq!(again, &data[..used]);
        }
    }
}
