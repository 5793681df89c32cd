//! Fuzzes the luks filter's LUKSv1 header parser, which reads the first bytes of whatever
//! disk it is put over.
//!
//! The input is an 8-byte big-endian disk size followed by the header bytes. Properties: no
//! panic; an accepted header keeps everything it points at inside the disk (the payload and
//! each enabled slot's key material) and a master key of 1 to 1024 bytes, so unlocking
//! never reads or allocates beyond those bounds.

use sluice_block::filters::luks::header::{Header, SECTOR};

/// Runs the target's checks on one input (a fuzz input or a committed seed).
pub fn run(data: &[u8]) {
    if data.len() < 8 {
        return;
    }
    let size = u64::from_be_bytes(data[..8].try_into().unwrap());
    let Ok(h) = Header::parse(&data[8..], size) else {
        return;
    };
    assert!(h.payload_bytes() < size);
    assert!((1..=1024).contains(&h.key_len));
    assert!(h.slots.len() <= 8);
    for (_, slot) in &h.slots {
        let end = u64::from(slot.material_offset) * SECTOR + slot.material_len(h.key_len) as u64;
        assert!(end <= size, "slot material ends at {end}, disk is {size}");
        assert!(slot.material_len(h.key_len) <= 4096 * SECTOR as usize);
    }
}
