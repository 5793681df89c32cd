//! The luks filter (nbdkit-luks-filter): serves the decrypted payload of a LUKSv1 disk
//! (made by `cryptsetup --type luks1` or `qemu-img create -f luks`), decrypting reads and
//! encrypting writes. `passphrase=SECRET` (required) unlocks it, with nbdkit's secret
//! spellings (`+FILE`, `-`, `-FD`: [`crate::password`]).
//!
//! The export is the payload: its size is the disk's less the payload offset, and the header
//! and key material are out of reach. As in nbdkit: trim and extents are off (a hole below
//! is not a hole of plaintext, and a trimmed sector would decrypt to garbage), zero is
//! emulated by the server as writes of zeroes that this filter encrypts, fast zero is off,
//! cache is emulated by reads, and the minimum and preferred block size are at least 512
//! (requests of any alignment still work, through read-modify-write of partial sectors).
//!
//! Each connection opens the layer below, reads and checks the header ([`header`]) and
//! unlocks the master key ([`keyslot`]), as nbdkit does in `.prepare`: a missing or wrong
//! passphrase therefore refuses the client (`LUKS passphrase is not correct, ...`), not the
//! server's start. The master key is then cached per export against the exact header bytes,
//! so later connections skip the PBKDF2 work (seconds with cryptsetup's default iteration
//! times); a header that changed is unlocked afresh.
//!
//! Crypto comes from the `openssl` crate (vendored OpenSSL, which the server already builds
//! for TLS): PBKDF2, AES in XTS and CBC modes and the hashes from one audited library,
//! nothing hand-rolled but the two small LUKS-specific pieces (AF merge, ESSIV IVs), which
//! have known-answer tests. Each request takes a [`cipher::Worker`] (keyed OpenSSL contexts
//! and a scratch buffer) from a per-connection pool and gives it back, so no key schedule is
//! computed per request and no lock is held across I/O.
//!
//! Differences from nbdkit 1.32.5, all deliberate:
//! - `cbc-essiv:HASH` disks work (nbdkit 1.32 refuses them: "unknown IV generation
//!   algorithm: essiv"); qemu-img makes them with `ivgen-alg=essiv`.
//! - A write that covers part of a sector decrypts the sector before patching it (nbdkit
//!   1.32.5 patches the ciphertext, which garbles the rest of the sector).
//! - A connection refused for a wrong passphrase leaves the server running (nbdkit 1.32.5
//!   crashes in `.close` after its failed `.prepare`).
//! - Key material that is not a whole number of sectors (aes-192: 24 × 4000 bytes) is
//!   decrypted to its end, so cryptsetup's aes-192 disks unlock (nbdkit 1.32.5 stops at the
//!   last whole sector and calls the passphrase wrong; qemu-img cannot make such disks).
//! - Aligned runs of sectors are read and written below in one call, not one per sector.
//!
//! The header parser and the cipher names ([`header`], [`cipher::CipherSpec`]) are plain
//! code and always built; the filter (`filter`), the key slots and the cipher contexts need
//! OpenSSL and come with the crate's `luks` feature (default), so the fuzz build, which
//! turns default features off, compiles no OpenSSL.

pub mod cipher;
#[cfg(feature = "luks")]
mod filter;
pub mod header;
#[cfg(feature = "luks")]
mod keyslot;

#[cfg(feature = "luks")]
pub use filter::SPEC;
