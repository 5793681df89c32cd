//! Fuzzes nbdkit's size syntax (`1G`, `512s`, ...).
//!
//! Properties: no panic; an accepted size is at most `MAX_SIZE`; and the size written back
//! in plain decimal parses to the same number (so the parser and the limit agree).

use sluice_block::size::{parse_size, MAX_SIZE};

/// Runs the target's checks on one input (a fuzz input or a committed seed).
pub fn run(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(n) = parse_size(s) {
        assert!(n <= MAX_SIZE, "{s:?} gave {n}");
        assert_eq!(parse_size(&n.to_string()), Ok(n));
    }
}
