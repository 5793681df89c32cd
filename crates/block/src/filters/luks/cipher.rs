//! The payload cipher: the header's cipher strings decoded ([`CipherSpec`]), and
//! [`Worker`], which encrypts and decrypts runs of 512-byte sectors with it.
//!
//! LUKSv1 encrypts each 512-byte sector on its own, with an IV made from the sector number:
//! `plain` (the low 32 bits, little-endian), `plain64` (64 bits) or `essiv:HASH` (the 64-bit
//! number encrypted with AES-ECB under `HASH(master key)`, which hides the IV pattern from
//! CBC's watermarking attack). The block cipher itself is OpenSSL's AES in XTS or CBC mode;
//! the IV generators are ours, being a few lines each.
//!
//! A [`Worker`] holds OpenSSL cipher contexts keyed once, so that a sector costs only an IV
//! change and the cipher: building a context expands the key, which is worth doing once per
//! worker, not once per sector. A context is not shareable between threads, so each request
//! takes a worker from its connection's pool (see the filter module).

#[cfg(feature = "luks")]
use openssl::cipher::{Cipher, CipherRef};
#[cfg(feature = "luks")]
use openssl::cipher_ctx::CipherCtx;
#[cfg(feature = "luks")]
use openssl::error::ErrorStack;
#[cfg(feature = "luks")]
use openssl::hash::{hash, MessageDigest};

#[cfg(feature = "luks")]
use super::header::SECTOR;

/// A block cipher mode LUKSv1 disks use and OpenSSL provides for AES.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Xts,
    Cbc,
}

/// How a sector's IV is made from its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IvGen {
    /// The low 32 bits of the sector number, little-endian, zero-padded.
    Plain,
    /// The 64-bit sector number, little-endian, zero-padded.
    Plain64,
    /// The `plain64` block encrypted with AES-ECB keyed by the hash of the key.
    Essiv(Hash),
}

/// A hash for PBKDF2, the AF diffuser and ESSIV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    Md5,
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
    Ripemd160,
}

impl Hash {
    /// The header's spelling (`sha256`).
    pub fn parse(s: &str) -> Result<Hash, String> {
        Ok(match s {
            "md5" => Hash::Md5,
            "sha1" => Hash::Sha1,
            "sha224" => Hash::Sha224,
            "sha256" => Hash::Sha256,
            "sha384" => Hash::Sha384,
            "sha512" => Hash::Sha512,
            "ripemd160" => Hash::Ripemd160,
            _ => {
                return Err(format!(
                    "unknown hash algorithm: {s} (expecting \"sha1\", \"sha256\", \"sha512\", \
                     \"md5\", \"sha224\", \"sha384\" or \"ripemd160\")"
                ))
            }
        })
    }

    /// OpenSSL's digest.
    #[cfg(feature = "luks")]
    pub fn digest(self) -> MessageDigest {
        match self {
            Hash::Md5 => MessageDigest::md5(),
            Hash::Sha1 => MessageDigest::sha1(),
            Hash::Sha224 => MessageDigest::sha224(),
            Hash::Sha256 => MessageDigest::sha256(),
            Hash::Sha384 => MessageDigest::sha384(),
            Hash::Sha512 => MessageDigest::sha512(),
            Hash::Ripemd160 => MessageDigest::ripemd160(),
        }
    }

    /// Digest length in bytes (a unit test checks it against OpenSSL's).
    pub fn size(self) -> usize {
        match self {
            Hash::Md5 => 16,
            Hash::Sha1 | Hash::Ripemd160 => 20,
            Hash::Sha224 => 28,
            Hash::Sha256 => 32,
            Hash::Sha384 => 48,
            Hash::Sha512 => 64,
        }
    }

    /// The header's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Hash::Md5 => "md5",
            Hash::Sha1 => "sha1",
            Hash::Sha224 => "sha224",
            Hash::Sha256 => "sha256",
            Hash::Sha384 => "sha384",
            Hash::Sha512 => "sha512",
            Hash::Ripemd160 => "ripemd160",
        }
    }
}

/// The header's cipher name, mode and hash, decoded and checked against the key length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CipherSpec {
    pub mode: Mode,
    pub ivgen: IvGen,
    /// The hash for PBKDF2 and the AF diffuser (the header's hash spec).
    pub hash: Hash,
    /// Master key length in bytes (both XTS halves).
    pub key_len: usize,
}

impl CipherSpec {
    /// Decodes `cipher_name` (`aes`), `cipher_mode` (`MODE-IVGEN[:HASH]`) and `hash_spec`
    /// for a master key of `key_len` bytes. Only AES exists here: it is the only cipher
    /// qemu (with GnuTLS) and nbdkit offer for LUKSv1.
    pub fn parse(
        cipher_name: &str,
        cipher_mode: &str,
        hash_spec: &str,
        key_len: usize,
    ) -> Result<CipherSpec, String> {
        if cipher_name != "aes" {
            return Err(format!(
                "unknown cipher algorithm: {cipher_name} (expecting \"aes\")"
            ));
        }
        let Some((mode, ivgen)) = cipher_mode.split_once('-') else {
            return Err(format!(
                "incorrect cipher_mode header, expecting mode-ivgenerator but got \
                 \"{cipher_mode}\""
            ));
        };
        let mode = match mode {
            "xts" => Mode::Xts,
            "cbc" => Mode::Cbc,
            _ => {
                return Err(format!(
                    "unsupported cipher mode: {mode} (expecting \"xts\" or \"cbc\")"
                ))
            }
        };
        let ivgen = match ivgen.split_once(':') {
            None if ivgen == "plain" => IvGen::Plain,
            None if ivgen == "plain64" => IvGen::Plain64,
            Some(("essiv", h)) => IvGen::Essiv(Hash::parse(h)?),
            _ => {
                return Err(format!(
                    "unknown IV generation algorithm: {ivgen} (expecting \"plain\", \
                     \"plain64\" or \"essiv:HASH\")"
                ))
            }
        };
        let spec = CipherSpec {
            mode,
            ivgen,
            hash: Hash::parse(hash_spec)?,
            key_len,
        };
        if !key_fits(mode, key_len) {
            return Err(format!(
                "cipher aes in mode {} does not take a {}-bit key",
                mode_name(mode),
                key_len * 8
            ));
        }
        if let IvGen::Essiv(h) = ivgen {
            if !AES_KEY_LENS.contains(&h.size()) {
                return Err(format!(
                    "ESSIV hash {} gives a {}-byte key, which is no AES key size",
                    h.name(),
                    h.size()
                ));
            }
        }
        Ok(spec)
    }

    /// OpenSSL's cipher for this mode and key length (`Some` for every key length
    /// [`key_fits`] accepts).
    #[cfg(feature = "luks")]
    fn cipher(&self) -> Option<&'static CipherRef> {
        Some(match (self.mode, self.key_len) {
            (Mode::Xts, 32) => Cipher::aes_128_xts(),
            (Mode::Xts, 64) => Cipher::aes_256_xts(),
            (Mode::Cbc, 16) => Cipher::aes_128_cbc(),
            (Mode::Cbc, 24) => Cipher::aes_192_cbc(),
            (Mode::Cbc, 32) => Cipher::aes_256_cbc(),
            _ => return None,
        })
    }
}

/// AES's key lengths in bytes.
const AES_KEY_LENS: [usize; 3] = [16, 24, 32];

/// Whether AES in `mode` takes a master key of `key_len` bytes (XTS's is two AES keys; the
/// 192-bit XTS OpenSSL lacks, as do qemu and nbdkit).
fn key_fits(mode: Mode, key_len: usize) -> bool {
    match mode {
        Mode::Xts => key_len == 32 || key_len == 64,
        Mode::Cbc => AES_KEY_LENS.contains(&key_len),
    }
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Xts => "xts",
        Mode::Cbc => "cbc",
    }
}

/// AES-ECB with a key of `len` bytes (ESSIV's IV cipher).
#[cfg(feature = "luks")]
fn aes_ecb(len: usize) -> Option<&'static CipherRef> {
    Some(match len {
        16 => Cipher::aes_128_ecb(),
        24 => Cipher::aes_192_ecb(),
        32 => Cipher::aes_256_ecb(),
        _ => return None,
    })
}

/// AES's block (and IV) length.
#[cfg(feature = "luks")]
const IV_LEN: usize = 16;

/// Encrypts and decrypts sectors under one key. Not `Sync`: one per request in flight.
#[cfg(feature = "luks")]
pub struct Worker {
    enc: CipherCtx,
    dec: CipherCtx,
    /// ESSIV's IV cipher, keyed with the hash of the key.
    essiv: Option<CipherCtx>,
    ivgen: IvGen,
    /// Scratch space a request may use for ciphertext (kept to spare an allocation).
    pub scratch: Vec<u8>,
}

#[cfg(feature = "luks")]
impl Worker {
    /// Contexts for `spec` keyed with `key` (the master key, or a candidate slot key).
    pub fn new(spec: &CipherSpec, key: &[u8]) -> Result<Worker, ErrorStack> {
        let cipher = spec.cipher().expect("checked by CipherSpec::parse");
        let mut enc = CipherCtx::new()?;
        enc.encrypt_init(Some(cipher), Some(key), None)?;
        enc.set_padding(false);
        let mut dec = CipherCtx::new()?;
        dec.decrypt_init(Some(cipher), Some(key), None)?;
        dec.set_padding(false);
        let essiv = match spec.ivgen {
            IvGen::Essiv(h) => {
                let salt = hash(h.digest(), key)?;
                let mut ctx = CipherCtx::new()?;
                let ecb = aes_ecb(salt.len()).expect("checked by CipherSpec::parse");
                ctx.encrypt_init(Some(ecb), Some(&salt), None)?;
                ctx.set_padding(false);
                Some(ctx)
            }
            _ => None,
        };
        Ok(Worker {
            enc,
            dec,
            essiv,
            ivgen: spec.ivgen,
            scratch: Vec::new(),
        })
    }

    /// The IV of `sector`.
    fn iv(&mut self, sector: u64) -> Result<[u8; IV_LEN], ErrorStack> {
        let mut iv = [0u8; IV_LEN];
        match self.ivgen {
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            IvGen::Essiv(_) => {
                let ctx = self.essiv.as_mut().expect("built for ESSIV");
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                // OpenSSL wants room for one more block than it writes.
                let mut out = [0u8; 2 * IV_LEN];
                ctx.cipher_update(&iv, Some(&mut out))?;
                iv.copy_from_slice(&out[..IV_LEN]);
            }
        }
        Ok(iv)
    }

    /// Encrypts `buf` in place, its first 512 bytes being sector `sector`. The length
    /// must be a multiple of 16 (a short last sector is allowed, as in key material).
    pub fn encrypt(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), ErrorStack> {
        self.run(true, sector, buf)
    }

    /// Decrypts `buf` in place; see [`Worker::encrypt`].
    pub fn decrypt(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), ErrorStack> {
        self.run(false, sector, buf)
    }

    fn run(&mut self, encrypt: bool, first: u64, buf: &mut [u8]) -> Result<(), ErrorStack> {
        debug_assert!(buf.len().is_multiple_of(IV_LEN));
        // OpenSSL's API takes distinct input and output slices; a sector goes through this
        // buffer (with the extra block its length check wants) and is copied back.
        let mut out = [0u8; SECTOR as usize + IV_LEN];
        for (i, chunk) in buf.chunks_mut(SECTOR as usize).enumerate() {
            let iv = self.iv(first + i as u64)?;
            let ctx = if encrypt {
                self.enc.encrypt_init(None, None, Some(&iv))?;
                &mut self.enc
            } else {
                self.dec.decrypt_init(None, None, Some(&iv))?;
                &mut self.dec
            };
            let n = ctx.cipher_update(chunk, Some(&mut out))?;
            debug_assert_eq!(n, chunk.len());
            chunk.copy_from_slice(&out[..chunk.len()]);
        }
        Ok(())
    }
}

#[cfg(all(test, feature = "luks"))]
mod tests {
    use super::*;

    /// The pure checks that `CipherSpec::parse` makes agree with OpenSSL's tables.
    #[test]
    fn pure_key_and_digest_sizes_match_openssl() {
        for mode in [Mode::Xts, Mode::Cbc] {
            for key_len in 0..=128 {
                let spec = CipherSpec {
                    mode,
                    ivgen: IvGen::Plain64,
                    hash: Hash::Sha256,
                    key_len,
                };
                assert_eq!(key_fits(mode, key_len), spec.cipher().is_some(), "{spec:?}");
            }
        }
        for h in [
            Hash::Md5,
            Hash::Sha1,
            Hash::Sha224,
            Hash::Sha256,
            Hash::Sha384,
            Hash::Sha512,
            Hash::Ripemd160,
        ] {
            assert_eq!(h.size(), h.digest().size(), "{h:?}");
        }
        for len in 0..=128 {
            assert_eq!(AES_KEY_LENS.contains(&len), aes_ecb(len).is_some(), "{len}");
        }
    }

    /// The plaintext of the vectors: byte `i % 251`.
    fn plain() -> Vec<u8> {
        (0..512).map(|i| (i % 251) as u8).collect()
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn spec(mode: &str, key_len: usize) -> CipherSpec {
        CipherSpec::parse("aes", mode, "sha256", key_len).unwrap()
    }

    /// Checks the first and last block of `encrypt(sector)` and that decrypt undoes it.
    fn check(spec: CipherSpec, key: &[u8], sector: u64, first: &str, last: &str) {
        let mut w = Worker::new(&spec, key).unwrap();
        let mut buf = plain();
        w.encrypt(sector, &mut buf).unwrap();
        assert_eq!(hex(&buf[..16]), first, "{spec:?} first block");
        assert_eq!(hex(&buf[496..]), last, "{spec:?} last block");
        w.decrypt(sector, &mut buf).unwrap();
        assert_eq!(buf, plain());
    }

    // Vectors: XTS from Python's `cryptography` (modes.XTS with the plain64 IV), CBC and
    // ESSIV from `openssl enc -aes-*-cbc|-ecb -nopad` and `openssl dgst -sha256`.
    // Keys: byte `3*i` for XTS and CBC-plain64, byte `i` (16 bytes) for ESSIV.

    #[test]
    fn xts_plain64_256_matches_python_cryptography() {
        let key: Vec<u8> = (0..64).map(|i| (i * 3) as u8).collect();
        check(
            spec("xts-plain64", 64),
            &key,
            5,
            "2eb0bae74626885c733b13e40755cc2b",
            "a76c13a894c4eca2965760d9e9365545",
        );
    }

    #[test]
    fn xts_plain64_128_matches_python_cryptography() {
        let key: Vec<u8> = (0..32).map(|i| (i * 3) as u8).collect();
        check(
            spec("xts-plain64", 32),
            &key,
            7,
            "59b0486573bf42894065b930d31f8ab8",
            "bbb018eeda97232d622542fab7eb7dad",
        );
    }

    #[test]
    fn cbc_plain64_matches_openssl_enc() {
        let key: Vec<u8> = (0..32).map(|i| (i * 3) as u8).collect();
        check(
            spec("cbc-plain64", 32),
            &key,
            9,
            "aade174824495bff911c271ca7bf0e6d",
            "26ab6d7c1a163f855c14f7a9d54efa26",
        );
    }

    #[test]
    fn essiv_iv_matches_openssl_ecb_of_the_key_hash() {
        let key: Vec<u8> = (0..16).collect();
        let mut w = Worker::new(&spec("cbc-essiv:sha256", 16), &key).unwrap();
        assert_eq!(hex(&w.iv(0).unwrap()), "ae0e4eeac063684505721b0643b24ae3");
        assert_eq!(hex(&w.iv(1).unwrap()), "c10509c8cf7d6eee55d7205db7845a6f");
        assert_eq!(
            hex(&w.iv(0x01_2345_6789).unwrap()),
            "8b3c29773c87b8ae7f9595d2c3a67e9d"
        );
        check(
            spec("cbc-essiv:sha256", 16),
            &key,
            1,
            "21d59e1aee84de0421acfbcf68113a8c",
            "61d80a8ccde071f933473cb19d04d5c4",
        );
    }

    #[test]
    fn plain_iv_keeps_only_the_low_32_bits() {
        // (OpenSSL refuses an XTS key whose two halves are equal.)
        let key: Vec<u8> = (0..32).collect();
        let mut w = Worker::new(&spec("xts-plain", 32), &key).unwrap();
        assert_eq!(w.iv(0x1_0000_0002).unwrap(), w.iv(2).unwrap());
        let mut w = Worker::new(&spec("xts-plain64", 32), &key).unwrap();
        assert_ne!(w.iv(0x1_0000_0002).unwrap(), w.iv(2).unwrap());
    }

    #[test]
    fn runs_of_sectors_number_each_sector() {
        let key: Vec<u8> = (0..64).map(|i| (i * 3) as u8).collect();
        let mut w = Worker::new(&spec("xts-plain64", 64), &key).unwrap();
        let mut two = [plain(), plain()].concat();
        w.encrypt(4, &mut two).unwrap();
        let mut one = plain();
        w.encrypt(5, &mut one).unwrap();
        assert_eq!(&two[512..], &one[..]);
        assert_ne!(&two[..512], &one[..]);
    }

    #[test]
    fn parse_refuses_what_openssl_or_luks_lacks() {
        let e = |n, m, h, k| CipherSpec::parse(n, m, h, k).unwrap_err();
        assert!(e("twofish", "xts-plain64", "sha256", 64).contains("twofish"));
        assert!(e("aes", "xts", "sha256", 64).contains("mode-ivgenerator"));
        assert!(e("aes", "ecb-plain64", "sha256", 64).contains("ecb"));
        assert!(e("aes", "xts-benbi", "sha256", 64).contains("benbi"));
        assert!(e("aes", "xts-plain64", "sha256", 48).contains("384-bit"));
        assert!(e("aes", "cbc-essiv:sha1", "sha256", 16).contains("20-byte"));
        assert!(e("aes", "cbc-plain64", "tiger", 16).contains("tiger"));
    }
}
