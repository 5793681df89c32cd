//! The LUKSv1 header (the "phdr", 592 bytes at offset 0 of the disk): parsing and checking.
//!
//! Pure code over a byte slice, so that every refusal (not LUKS, LUKSv2, a corrupt key slot,
//! an unknown cipher) is a unit test. The checks are nbdkit 1.32's, with its bounds: they
//! keep a hostile header from making the filter allocate or read without limit (the key
//! material of one slot is at most 4096 sectors, the master key at most 1024 bytes).
//!
//! Layout (big-endian, from the LUKS On-Disk Format Specification 1.2.3):
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0   | 6  | magic `LUKS\xba\xbe` |
//! | 6   | 2  | version |
//! | 8   | 32 | cipher name (`aes`) |
//! | 40  | 32 | cipher mode (`xts-plain64`, `cbc-essiv:sha256`) |
//! | 72  | 32 | hash spec (`sha256`), for PBKDF2 and the AF diffuser |
//! | 104 | 4  | payload offset, in 512-byte sectors |
//! | 108 | 4  | master key length, bytes |
//! | 112 | 20 | master key digest (PBKDF2 of the master key) |
//! | 132 | 32 | master key digest salt |
//! | 164 | 4  | master key digest iterations |
//! | 168 | 40 | UUID |
//! | 208 | 8 × 48 | key slots: active, iterations, salt\[32\], key material offset (sectors), stripes |

use thiserror::Error;

use super::cipher::CipherSpec;

/// Size of the LUKSv1 header on disk.
pub const HEADER_LEN: usize = 592;
/// LUKS counts offsets in 512-byte sectors, whatever the disk's own sector size.
pub const SECTOR: u64 = 512;
/// Length of the master key digest.
pub const DIGEST_LEN: usize = 20;
/// Length of every salt.
pub const SALT_LEN: usize = 32;
/// Number of key slots.
pub const KEY_SLOTS: usize = 8;

const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
const SLOT_DISABLED: u32 = 0x0000_DEAD;
const SLOT_ENABLED: u32 = 0x00AC_71F3;
/// Key material is padded to this alignment (cryptsetup and qemu both do).
const KEY_SLOT_ALIGN: u64 = 4096;
/// nbdkit refuses smaller disks: the header and one slot's material cannot fit.
const MIN_DISK: u64 = 16384;

/// Why a header was refused. Every message is one line naming what is wrong.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeaderError {
    #[error("disk is too small to be LUKS-encrypted")]
    TooSmall,
    #[error("this disk does not contain a LUKS header")]
    BadMagic,
    #[error(
        "this disk has a LUKS version {0} header: LUKSv2 is not supported, only LUKSv1 \
         (cryptsetup convert --type luks1 can convert it)"
    )]
    Version2(u16),
    #[error("this disk has a LUKS version {0} header, but only LUKSv1 is supported")]
    Version(u16),
    #[error("bad LUKSv1 header: {0}")]
    Bad(String),
    #[error("{0}")]
    Cipher(String),
}

/// One key slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySlot {
    /// PBKDF2 iterations for the passphrase.
    pub iterations: u32,
    /// PBKDF2 salt for the passphrase.
    pub salt: [u8; SALT_LEN],
    /// Where the AF-split, encrypted master key is, in sectors from the start of the disk.
    pub material_offset: u32,
    /// Number of AF stripes.
    pub stripes: u32,
}

/// A checked LUKSv1 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The cipher, mode, IV generator and hash, decoded.
    pub spec: CipherSpec,
    /// Where the encrypted payload starts, in sectors.
    pub payload_offset: u32,
    /// Master key length in bytes.
    pub key_len: usize,
    pub mk_digest: [u8; DIGEST_LEN],
    pub mk_salt: [u8; SALT_LEN],
    pub mk_iterations: u32,
    /// The enabled key slots, with their slot numbers.
    pub slots: Vec<(usize, KeySlot)>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// A NUL-padded string field.
fn text(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

impl KeySlot {
    /// Length of the slot's key material in bytes (`key_len * stripes`).
    pub fn material_len(&self, key_len: usize) -> usize {
        key_len * self.stripes as usize
    }

    /// The sectors the material occupies, rounded up to the 4 KiB slot alignment.
    fn material_sectors(&self, key_len: usize) -> u64 {
        let sectors = (self.material_len(key_len) as u64).div_ceil(SECTOR);
        sectors.next_multiple_of(KEY_SLOT_ALIGN / SECTOR)
    }
}

impl Header {
    /// Parses and checks the first [`HEADER_LEN`] bytes of a disk of `disk_size` bytes.
    pub fn parse(b: &[u8], disk_size: u64) -> Result<Header, HeaderError> {
        if disk_size < MIN_DISK || b.len() < HEADER_LEN {
            return Err(HeaderError::TooSmall);
        }
        if &b[..6] != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        match u16::from_be_bytes([b[6], b[7]]) {
            1 => {}
            2 => return Err(HeaderError::Version2(2)),
            v => return Err(HeaderError::Version(v)),
        }
        let bad = HeaderError::Bad;
        let payload_offset = be32(b, 104);
        let key_len = be32(b, 108) as usize;
        let mk_iterations = be32(b, 164);
        if u64::from(payload_offset) >= disk_size / SECTOR {
            return Err(bad(
                "payload offset points beyond the end of the disk".into()
            ));
        }
        if mk_iterations == 0 {
            return Err(bad("master key iterations is 0".into()));
        }
        if key_len == 0 || key_len > 1024 {
            return Err(bad(format!("master key length {key_len} is not sane")));
        }

        let mut slots = Vec::new();
        for i in 0..KEY_SLOTS {
            let s = &b[208 + i * 48..208 + (i + 1) * 48];
            match be32(s, 0) {
                SLOT_DISABLED => continue,
                SLOT_ENABLED => {}
                _ => return Err(bad(format!("key slot {i} has an invalid active flag"))),
            }
            let slot = KeySlot {
                iterations: be32(s, 4),
                salt: s[8..40].try_into().expect("32 bytes"),
                material_offset: be32(s, 40),
                stripes: be32(s, 44),
            };
            if slot.stripes == 0 {
                return Err(bad(format!("key slot {i} is corrupted")));
            }
            if slot.stripes >= 10000 {
                return Err(bad(format!("key slot {i} stripes too large")));
            }
            if slot.iterations == 0 {
                return Err(bad(format!("key slot {i} iterations is 0")));
            }
            let len = slot.material_sectors(key_len);
            if len > 4096 {
                return Err(bad(format!(
                    "key slot {i} key material length is too large"
                )));
            }
            let start = u64::from(slot.material_offset);
            if (start + len) * SECTOR >= disk_size {
                return Err(bad(format!(
                    "key slot {i} key material offset points beyond the end of the disk"
                )));
            }
            slots.push((i, slot));
        }

        let spec = CipherSpec::parse(
            &text(&b[8..40]),
            &text(&b[40..72]),
            &text(&b[72..104]),
            key_len,
        )
        .map_err(HeaderError::Cipher)?;
        Ok(Header {
            spec,
            payload_offset,
            key_len,
            mk_digest: b[112..132].try_into().expect("20 bytes"),
            mk_salt: b[132..164].try_into().expect("32 bytes"),
            mk_iterations,
            slots,
        })
    }

    /// Where the payload starts, in bytes.
    pub fn payload_bytes(&self) -> u64 {
        u64::from(self.payload_offset) * SECTOR
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::filters::luks::cipher::{Hash, IvGen, Mode};

    /// A header as qemu-img writes it by default (aes xts-plain64 sha256, 512-bit key),
    /// one slot enabled.
    pub(crate) fn sample() -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[..6].copy_from_slice(MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        b[8..11].copy_from_slice(b"aes");
        b[40..51].copy_from_slice(b"xts-plain64");
        b[72..78].copy_from_slice(b"sha256");
        b[104..108].copy_from_slice(&4096u32.to_be_bytes());
        b[108..112].copy_from_slice(&64u32.to_be_bytes());
        b[164..168].copy_from_slice(&1000u32.to_be_bytes());
        for i in 0..KEY_SLOTS {
            let s = 208 + i * 48;
            let active = if i == 0 { SLOT_ENABLED } else { SLOT_DISABLED };
            b[s..s + 4].copy_from_slice(&active.to_be_bytes());
            b[s + 4..s + 8].copy_from_slice(&2000u32.to_be_bytes());
            b[s + 40..s + 44].copy_from_slice(&(8 + 512 * i as u32).to_be_bytes());
            b[s + 44..s + 48].copy_from_slice(&4000u32.to_be_bytes());
        }
        b
    }

    const DISK: u64 = 16 << 20;

    fn set_text(b: &mut [u8], at: usize, s: &str) {
        b[at..at + 32].fill(0);
        b[at..at + s.len()].copy_from_slice(s.as_bytes());
    }

    #[test]
    fn parse_qemu_default_header_decodes_every_field() {
        let h = Header::parse(&sample(), DISK).unwrap();
        assert_eq!(h.spec.mode, Mode::Xts);
        assert_eq!(h.spec.ivgen, IvGen::Plain64);
        assert_eq!(h.spec.hash, Hash::Sha256);
        assert_eq!(h.key_len, 64);
        assert_eq!(h.payload_bytes(), 4096 * 512);
        assert_eq!(h.mk_iterations, 1000);
        assert_eq!(h.slots.len(), 1);
        assert_eq!(h.slots[0].0, 0);
        assert_eq!(h.slots[0].1.stripes, 4000);
        assert_eq!(h.slots[0].1.material_offset, 8);
    }

    #[test]
    fn parse_bad_magic_is_not_luks() {
        let mut b = sample();
        b[4] = 0;
        assert_eq!(Header::parse(&b, DISK), Err(HeaderError::BadMagic));
    }

    #[test]
    fn parse_version_2_says_luks2_is_not_supported() {
        let mut b = sample();
        b[6..8].copy_from_slice(&2u16.to_be_bytes());
        let e = Header::parse(&b, DISK).unwrap_err();
        assert_eq!(e, HeaderError::Version2(2));
        assert!(e.to_string().contains("LUKSv2 is not supported"), "{e}");
        b[6..8].copy_from_slice(&7u16.to_be_bytes());
        assert_eq!(Header::parse(&b, DISK), Err(HeaderError::Version(7)));
    }

    #[test]
    fn parse_small_disk_is_refused() {
        assert_eq!(Header::parse(&sample(), 16383), Err(HeaderError::TooSmall));
    }

    #[test]
    fn parse_unknown_cipher_is_refused_by_name() {
        let mut b = sample();
        set_text(&mut b, 8, "serpent");
        let e = Header::parse(&b, DISK).unwrap_err().to_string();
        assert!(e.contains("serpent"), "{e}");
        let mut b = sample();
        set_text(&mut b, 40, "ctr-plain64");
        let e = Header::parse(&b, DISK).unwrap_err().to_string();
        assert!(e.contains("ctr"), "{e}");
        let mut b = sample();
        set_text(&mut b, 72, "whirlpool");
        let e = Header::parse(&b, DISK).unwrap_err().to_string();
        assert!(e.contains("whirlpool"), "{e}");
    }

    #[test]
    fn parse_payload_beyond_the_disk_is_refused() {
        let b = sample();
        let e = Header::parse(&b, 4096 * 512).unwrap_err().to_string();
        assert!(e.contains("payload offset"), "{e}");
    }

    #[test]
    fn parse_corrupt_key_slots_are_refused() {
        let slot0 = 208;
        let mut b = sample();
        b[slot0..slot0 + 4].copy_from_slice(&0x1234u32.to_be_bytes());
        assert!(Header::parse(&b, DISK)
            .unwrap_err()
            .to_string()
            .contains("key slot 0 has an invalid active flag"));
        let mut b = sample();
        b[slot0 + 44..slot0 + 48].copy_from_slice(&0u32.to_be_bytes());
        assert!(Header::parse(&b, DISK)
            .unwrap_err()
            .to_string()
            .contains("key slot 0 is corrupted"));
        let mut b = sample();
        b[slot0 + 40..slot0 + 44].copy_from_slice(&32760u32.to_be_bytes());
        assert!(Header::parse(&b, DISK)
            .unwrap_err()
            .to_string()
            .contains("beyond the end of the disk"));
        let mut b = sample();
        b[108..112].copy_from_slice(&2000u32.to_be_bytes());
        assert!(Header::parse(&b, DISK)
            .unwrap_err()
            .to_string()
            .contains("master key length"));
    }

    #[test]
    fn material_sectors_round_up_to_4k() {
        let slot = Header::parse(&sample(), DISK).unwrap().slots[0].1.clone();
        // 64 * 4000 = 256000 bytes = 500 sectors, aligned up to 504.
        assert_eq!(slot.material_sectors(64), 504);
        // 24 * 4000 = 96000 bytes = 187.5 sectors -> 188 -> 192.
        assert_eq!(slot.material_sectors(24), 192);
    }
}
