//! Unlocking: from a passphrase to the master key, through the key slots.
//!
//! For each enabled slot, LUKSv1 stores the master key AF-split into `stripes` stripes (the
//! anti-forensic splitter: losing any stripe loses the key, so wiping a few sectors wipes
//! it), encrypted with a key that PBKDF2 derives from the passphrase and the slot's salt.
//! [`unlock`] derives that key, decrypts the stripes, merges them ([`af_merge`]) and accepts
//! the result only if its PBKDF2 digest matches the header's: a wrong passphrase gives a
//! random "key" that fails the digest, never garbage served as data.
//!
//! PBKDF2 and the hashes are OpenSSL's; the AF merge is a few lines and ours.

use openssl::error::ErrorStack;
use openssl::hash::Hasher;
use openssl::memcmp;
use openssl::pkcs5::pbkdf2_hmac;

use super::cipher::{Hash, Worker};
use super::header::{Header, DIGEST_LEN, SECTOR};

/// Key bytes that are wiped when dropped (the master key, a candidate slot key).
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(bytes)
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // SAFETY: `b` is a valid, aligned, exclusive reference into our own buffer; the
            // volatile write only keeps the compiler from eliding a wipe it sees as dead.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

/// One round of the AF diffuser: each digest-sized block `i` of `block` becomes
/// `HASH(be32(i) || block_i)`, the last (short) block truncated.
fn diffuse(hash: Hash, block: &mut [u8]) -> Result<(), ErrorStack> {
    let dlen = hash.size();
    for (i, chunk) in block.chunks_mut(dlen).enumerate() {
        let mut h = Hasher::new(hash.digest())?;
        h.update(&(i as u32).to_be_bytes())?;
        h.update(chunk)?;
        let d = h.finish()?;
        let n = chunk.len();
        chunk.copy_from_slice(&d[..n]);
    }
    Ok(())
}

/// Merges `stripes` AF stripes of `key_len` bytes each (`material`) into the key: XOR each
/// of the first `stripes - 1` into an accumulator and diffuse it, then XOR in the last.
pub fn af_merge(
    hash: Hash,
    stripes: usize,
    material: &[u8],
    key_len: usize,
) -> Result<Secret, ErrorStack> {
    assert!(stripes >= 1 && material.len() >= stripes * key_len);
    let mut acc = Secret::new(vec![0u8; key_len]);
    let mut stripe = material.chunks_exact(key_len);
    for s in stripe.by_ref().take(stripes - 1) {
        acc.0.iter_mut().zip(s).for_each(|(a, b)| *a ^= b);
        diffuse(hash, &mut acc.0)?;
    }
    let last = stripe.next().expect("stripes * key_len bytes");
    acc.0.iter_mut().zip(last).for_each(|(a, b)| *a ^= b);
    Ok(acc)
}

/// Why unlocking failed.
#[derive(Debug)]
pub enum UnlockError {
    /// Reading key material from the layer below failed.
    Read(crate::BlockError),
    /// OpenSSL failed (an unavailable digest, out of memory).
    Crypto(ErrorStack),
}

impl From<ErrorStack> for UnlockError {
    fn from(e: ErrorStack) -> Self {
        UnlockError::Crypto(e)
    }
}

/// Tries `passphrase` on every enabled key slot of `h`, reading key material with
/// `read(offset, buf)`. The master key, or `None` if no slot opens with it.
pub fn unlock(
    h: &Header,
    passphrase: &[u8],
    mut read: impl FnMut(u64, &mut [u8]) -> crate::Result<()>,
) -> Result<Option<Secret>, UnlockError> {
    for (_, slot) in &h.slots {
        let mut slot_key = Secret::new(vec![0u8; h.key_len]);
        pbkdf2_hmac(
            passphrase,
            &slot.salt,
            slot.iterations as usize,
            h.spec.hash.digest(),
            &mut slot_key.0,
        )?;
        let mut material = Secret::new(vec![0u8; slot.material_len(h.key_len)]);
        read(u64::from(slot.material_offset) * SECTOR, &mut material.0)
            .map_err(UnlockError::Read)?;
        // The material is encrypted as sectors numbered from 0 at its start, with the
        // payload's cipher and IV scheme under the slot key.
        Worker::new(&h.spec, slot_key.bytes())?.decrypt(0, &mut material.0)?;
        let key = af_merge(
            h.spec.hash,
            slot.stripes as usize,
            material.bytes(),
            h.key_len,
        )?;
        if digest_matches(h, key.bytes())? {
            return Ok(Some(key));
        }
    }
    Ok(None)
}

/// Whether `key`'s PBKDF2 digest is the header's master key digest.
pub fn digest_matches(h: &Header, key: &[u8]) -> Result<bool, ErrorStack> {
    let mut digest = [0u8; DIGEST_LEN];
    pbkdf2_hmac(
        key,
        &h.mk_salt,
        h.mk_iterations as usize,
        h.spec.hash.digest(),
        &mut digest,
    )?;
    Ok(memcmp::eq(&digest, &h.mk_digest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filters::luks::header::{tests::sample, Header};

    /// Stripe `st` of the vectors: byte `i*7 + st*13`.
    fn stripes(n: usize, count: usize) -> Vec<u8> {
        (0..count)
            .flat_map(|st| (0..n).map(move |i| (i * 7 + st * 13) as u8))
            .collect()
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    // Expected keys computed with `openssl dgst -sha1|-sha256 -binary` over be32(i) || block
    // for each diffuser block, XOR done outside (see the module doc for the algorithm).

    #[test]
    fn af_merge_sha256_with_a_short_last_block() {
        // 40 bytes: one 32-byte digest block and one of 8 bytes.
        let key = af_merge(Hash::Sha256, 3, &stripes(40, 3), 40).unwrap();
        assert_eq!(
            hex(key.bytes()),
            "832c67eb9e6ee4fe2a47d8208306e95869702fa69b347ef325a1ad12414231858a07d3be847c7a42"
        );
    }

    #[test]
    fn af_merge_sha1_two_and_four_stripes() {
        let key = af_merge(Hash::Sha1, 2, &stripes(32, 2), 32).unwrap();
        assert_eq!(
            hex(key.bytes()),
            "33027d29fd7b63d3bc320461a4bcc47c8b303dfc19d6067c9640d22b8dcaea03"
        );
        let key = af_merge(Hash::Sha1, 4, &stripes(64, 4), 64).unwrap();
        assert_eq!(
            hex(key.bytes()),
            "099676937ec148df985a696efef6ac583689b1d5fd83aa822a5d78a2123a3dd4\
             add53e09366921f80fcd679c325e15e86c5b1cd30b939e940370df95bf3de334"
        );
    }

    #[test]
    fn af_merge_one_stripe_is_the_stripe() {
        let key = af_merge(Hash::Sha256, 1, &[9u8; 16], 16).unwrap();
        assert_eq!(key.bytes(), &[9u8; 16]);
    }

    #[test]
    fn unlock_with_no_matching_slot_is_none_and_reads_each_slot() {
        let h = Header::parse(&sample(), 16 << 20).unwrap();
        let mut reads = Vec::new();
        let r = unlock(&h, b"secret", |off, buf| {
            reads.push((off, buf.len()));
            buf.fill(0x5a);
            Ok(())
        })
        .unwrap();
        assert!(r.is_none());
        assert_eq!(reads, [(8 * 512, 64 * 4000)]);
    }

    #[test]
    fn unlock_passes_read_errors_up() {
        let h = Header::parse(&sample(), 16 << 20).unwrap();
        let r = unlock(&h, b"secret", |_, _| {
            Err(crate::BlockError::new(crate::Errno::EIO, "boom"))
        });
        assert!(matches!(r, Err(UnlockError::Read(e)) if e.message == "boom"));
    }
}
