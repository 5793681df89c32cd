//! The luks filter itself: opening, unlocking and the sector I/O (see the parent module for
//! what it does). Built with the `luks` feature (on by default), which brings in OpenSSL;
//! without it only the header and cipher-name parsers exist, for the fuzz targets.
use std::sync::{Arc, Mutex, PoisonError};

use crate::error::{BlockError, Errno, Result};
use crate::extents::Extents;
use crate::filter::{Filter, Next};
use crate::plugin::{BlockSize, Flags, Handle, OpenContext, Plugin, Support};
use crate::plugins::ConfigArg;

use super::cipher::Worker;
use super::header::{Header, HEADER_LEN, SECTOR};
use super::keyslot::{Secret, UnlockError};
use crate::filters::{bad, each_param, over, FilterEnv, FilterSpec};

pub const SPEC: FilterSpec = FilterSpec {
    name: "luks",
    keys: &["passphrase"],
    help: "passphrase=<SECRET>      Secret passphrase.",
    open,
};

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut passphrase = None;
    each_param(&SPEC, params, |k, v| {
        let pw =
            crate::password::read_password(v.as_bytes(), true).map_err(|e| bad("luks", k, e))?;
        passphrase = Some(Secret::new(pw));
        Ok(())
    })?;
    let Some(passphrase) = passphrase else {
        return Err(BlockError::new(
            Errno::EINVAL,
            "luks: LUKS \"passphrase\" parameter is missing",
        ));
    };
    Ok(over(
        Luks {
            passphrase,
            unlocked: Mutex::new(None),
            rmw: Mutex::new(()),
        },
        inner,
    ))
}

/// The filter: the passphrase, the last unlocked master key, and the lock that keeps
/// read-modify-write cycles of partial sectors from interleaving (per export, since every
/// connection writes the same disk).
pub struct Luks {
    passphrase: Secret,
    unlocked: Mutex<Option<(Vec<u8>, Arc<Secret>)>>,
    rmw: Mutex<()>,
}

/// Per connection: the header and a pool of workers keyed with the master key.
pub struct Conn {
    header: Header,
    key: Arc<Secret>,
    payload: u64,
    workers: Mutex<Vec<Worker>>,
}

/// Scratch for the ciphertext of one write is capped at this; longer writes go in pieces.
const MAX_SCRATCH: usize = 1 << 20;

fn crypto_error(e: openssl::error::ErrorStack) -> BlockError {
    BlockError::new(Errno::EIO, format!("luks: OpenSSL: {e}"))
}

impl Luks {
    /// Reads the header of the layer below and unlocks its master key.
    fn unlock(&self, next: &Next) -> Result<(Header, Arc<Secret>)> {
        let size = next.get_size()?;
        let mut raw = vec![0u8; HEADER_LEN];
        if size >= HEADER_LEN as u64 {
            next.pread(&mut raw, 0, Flags::NONE)?;
        }
        let header = Header::parse(&raw, size)
            .map_err(|e| BlockError::new(Errno::EINVAL, format!("luks: {e}")))?;
        let cached = self
            .lock_cache()
            .as_ref()
            .and_then(|(bytes, key)| (bytes[..] == raw[..]).then(|| key.clone()));
        if let Some(key) = cached {
            return Ok((header, key));
        }
        let key = match super::keyslot::unlock(&header, self.passphrase.bytes(), |off, buf| {
            next.pread(buf, off, Flags::NONE)
        }) {
            Ok(Some(key)) => Arc::new(key),
            Ok(None) => {
                return Err(BlockError::new(
                    Errno::EPERM,
                    "luks: LUKS passphrase is not correct, no key slot could be unlocked",
                ))
            }
            Err(UnlockError::Read(e)) => return Err(e),
            Err(UnlockError::Crypto(e)) => return Err(crypto_error(e)),
        };
        *self.lock_cache() = Some((raw, key.clone()));
        Ok((header, key))
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, Option<(Vec<u8>, Arc<Secret>)>> {
        self.unlocked.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Conn {
    /// Runs `f` with a worker from the pool (a new one if all are busy).
    fn with_worker<T>(&self, f: impl FnOnce(&mut Worker) -> Result<T>) -> Result<T> {
        let taken = self
            .workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut w = match taken {
            Some(w) => w,
            None => Worker::new(&self.header.spec, self.key.bytes()).map_err(crypto_error)?,
        };
        let r = f(&mut w);
        if w.scratch.capacity() > MAX_SCRATCH {
            w.scratch = Vec::new();
        }
        self.workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(w);
        r
    }

    /// Reads and decrypts the whole sector `sector` into `out`.
    fn read_sector(&self, w: &mut Worker, next: &Next, sector: u64, out: &mut [u8]) -> Result<()> {
        next.pread(out, self.payload + sector * SECTOR, Flags::NONE)?;
        w.decrypt(sector, out).map_err(crypto_error)
    }

    /// Writes `data` at `off`, within one sector: decrypt the sector, patch, encrypt,
    /// write, under the filter's read-modify-write lock.
    fn patch_sector(
        &self,
        luks: &Luks,
        w: &mut Worker,
        next: &Next,
        off: u64,
        data: &[u8],
        flags: Flags,
    ) -> Result<()> {
        let (sector, within) = (off / SECTOR, (off % SECTOR) as usize);
        let _g = luks.rmw.lock().unwrap_or_else(PoisonError::into_inner);
        let mut s = [0u8; SECTOR as usize];
        self.read_sector(w, next, sector, &mut s)?;
        s[within..within + data.len()].copy_from_slice(data);
        w.encrypt(sector, &mut s).map_err(crypto_error)?;
        next.pwrite(&s, self.payload + sector * SECTOR, flags)
    }
}

/// Splits `[offset, offset+len)` into a partial head sector, whole sectors, a partial tail:
/// `(head, body_len)` where `head` is the byte count of the first partial sector (0 if
/// aligned) and `body_len` the bytes of whole sectors after it; the rest is the tail.
fn split(offset: u64, len: usize) -> (usize, usize) {
    let within = (offset % SECTOR) as usize;
    let head = if within == 0 {
        0
    } else {
        len.min(SECTOR as usize - within)
    };
    let rest = len - head;
    (head, rest - rest % SECTOR as usize)
}

impl Filter for Luks {
    type Conn = Conn;

    fn name(&self) -> &str {
        "luks"
    }

    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<(Conn, Next)> {
        let next = Next::open(next, ctx)?;
        let (header, key) = self.unlock(&next)?;
        let payload = header.payload_bytes();
        let conn = Conn {
            header,
            key,
            payload,
            workers: Mutex::new(Vec::new()),
        };
        Ok((conn, next))
    }

    fn has_allocation_depth(&self, _: &dyn Plugin) -> bool {
        false
    }

    fn get_size(&self, c: &Conn, next: &Next) -> Result<u64> {
        next.get_size()?.checked_sub(c.payload).ok_or_else(|| {
            BlockError::new(
                Errno::EIO,
                "luks: disk too small, or contains an incomplete LUKS partition",
            )
        })
    }

    fn block_size(&self, _: &Conn, next: &Next) -> Result<Option<BlockSize>> {
        let s = SECTOR as u32;
        Ok(Some(match next.block_size()? {
            None => BlockSize {
                minimum: s,
                preferred: s,
                maximum: u32::MAX,
            },
            Some(b) => {
                let minimum = b.minimum.max(s);
                BlockSize {
                    minimum,
                    preferred: b.preferred.max(s).max(minimum),
                    ..b
                }
            }
        }))
    }

    fn can_trim(&self, _: &Conn, _: &Next) -> Result<bool> {
        Ok(false)
    }
    fn can_zero(&self, _: &Conn, _: &Next) -> Result<Support> {
        Ok(Support::Emulate)
    }
    fn can_fast_zero(&self, _: &Conn, _: &Next) -> Result<bool> {
        Ok(false)
    }
    fn can_cache(&self, _: &Conn, _: &Next) -> Result<Support> {
        Ok(Support::Emulate)
    }
    fn can_extents(&self, _: &Conn, _: &Next) -> Result<bool> {
        Ok(false)
    }

    fn pread(&self, c: &Conn, next: &Next, buf: &mut [u8], off: u64, _: Flags) -> Result<()> {
        c.with_worker(|w| {
            let (head, body) = split(off, buf.len());
            let mut sector = off / SECTOR;
            let mut s = [0u8; SECTOR as usize];
            let (head_buf, rest) = buf.split_at_mut(head);
            if head > 0 {
                c.read_sector(w, next, sector, &mut s)?;
                let within = (off % SECTOR) as usize;
                head_buf.copy_from_slice(&s[within..within + head]);
                sector += 1;
            }
            let (body_buf, tail_buf) = rest.split_at_mut(body);
            if body > 0 {
                next.pread(body_buf, c.payload + sector * SECTOR, Flags::NONE)?;
                w.decrypt(sector, body_buf).map_err(crypto_error)?;
                sector += (body as u64) / SECTOR;
            }
            if !tail_buf.is_empty() {
                c.read_sector(w, next, sector, &mut s)?;
                let n = tail_buf.len();
                tail_buf.copy_from_slice(&s[..n]);
            }
            Ok(())
        })
    }

    fn pwrite(&self, c: &Conn, next: &Next, buf: &[u8], off: u64, f: Flags) -> Result<()> {
        c.with_worker(|w| {
            let (head, body) = split(off, buf.len());
            let mut sector = off / SECTOR;
            let (head_buf, rest) = buf.split_at(head);
            if head > 0 {
                c.patch_sector(self, w, next, off, head_buf, f)?;
                sector += 1;
            }
            let (body_buf, tail_buf) = rest.split_at(body);
            let mut scratch = std::mem::take(&mut w.scratch);
            let written = body_buf
                .chunks(MAX_SCRATCH)
                .try_for_each(|piece| -> Result<()> {
                    scratch.clear();
                    scratch.extend_from_slice(piece);
                    w.encrypt(sector, &mut scratch).map_err(crypto_error)?;
                    next.pwrite(&scratch, c.payload + sector * SECTOR, f)?;
                    sector += piece.len() as u64 / SECTOR;
                    Ok(())
                });
            w.scratch = scratch;
            written?;
            if !tail_buf.is_empty() {
                c.patch_sector(self, w, next, sector * SECTOR, tail_buf, f)?;
            }
            Ok(())
        })
    }

    fn zero(&self, c: &Conn, next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        // Only reached if a layer above calls it directly (the server emulates zero with
        // pwrite, as can_zero says): encrypted zeroes, in bounded pieces.
        let zeroes = vec![0u8; n.min(MAX_SCRATCH as u64) as usize];
        let flags = f.without(Flags::MAY_TRIM).without(Flags::FAST_ZERO);
        let mut done = 0;
        while done < n {
            let len = (n - done).min(zeroes.len() as u64) as usize;
            self.pwrite(c, next, &zeroes[..len], off + done, flags)?;
            done += len as u64;
        }
        Ok(())
    }

    fn trim(&self, _: &Conn, _: &Next, _: u64, _: u64, _: Flags) -> Result<()> {
        Err(BlockError::new(
            Errno::EINVAL,
            "luks: trim is not supported: a trimmed sector would decrypt to garbage",
        ))
    }

    fn cache(&self, c: &Conn, next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        // Only reached if a layer above calls it directly (the server emulates cache with
        // pread, as can_cache says): read and decrypt, as the emulation would.
        let mut buf = vec![0u8; n.min(MAX_SCRATCH as u64) as usize];
        let mut done = 0;
        while done < n {
            let len = (n - done).min(buf.len() as u64) as usize;
            self.pread(c, next, &mut buf[..len], off + done, f)?;
            done += len as u64;
        }
        Ok(())
    }

    fn extents(
        &self,
        _: &Conn,
        _: &Next,
        n: u64,
        off: u64,
        _: Flags,
        out: &mut Extents,
    ) -> Result<()> {
        out.add(off, n, 0)
    }

    fn allocation_depth(
        &self,
        _: &Conn,
        _: &Next,
        n: u64,
        off: u64,
        out: &mut Extents,
    ) -> Result<()> {
        out.add(off, n, 1)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use openssl::hash::MessageDigest;
    use openssl::pkcs5::pbkdf2_hmac;

    use super::super::cipher::{CipherSpec, Worker};
    use super::super::header::tests::sample;
    use crate::export::{Backend, Export};
    use crate::filters::test_support::*;
    use crate::plugin::{Flags, Plugin, Support};

    const PAYLOAD_SECTORS: u32 = 40;
    const PAYLOAD: usize = 64 * 1024;

    /// A tiny LUKSv1 disk in memory, encrypted here with our own cipher (the reference
    /// checks against qemu and cryptsetup images are the integration tests): AES-128-XTS,
    /// sha256, one key slot with a single AF stripe (so the stripe is the master key).
    /// Returns the plugin and a handle on the raw disk.
    fn luks_disk(passphrase: &[u8]) -> (Arc<dyn Plugin>, Box<dyn crate::Handle>) {
        let mut h = sample();
        let slot = 208;
        h[104..108].copy_from_slice(&PAYLOAD_SECTORS.to_be_bytes());
        h[108..112].copy_from_slice(&32u32.to_be_bytes());
        h[132..164].fill(5);
        h[slot + 4..slot + 8].copy_from_slice(&1000u32.to_be_bytes());
        h[slot + 8..slot + 40].fill(3);
        h[slot + 44..slot + 48].copy_from_slice(&1u32.to_be_bytes());
        let master: Vec<u8> = (0..32u8).map(|i| i ^ 0x5c).collect();
        let md = MessageDigest::sha256();
        pbkdf2_hmac(&master, &[5; 32], 1000, md, &mut h[112..132]).unwrap();
        let mut slot_key = [0u8; 32];
        pbkdf2_hmac(passphrase, &[3; 32], 1000, md, &mut slot_key).unwrap();
        let spec = CipherSpec::parse("aes", "xts-plain64", "sha256", 32).unwrap();
        let mut material = master.clone();
        Worker::new(&spec, &slot_key)
            .unwrap()
            .encrypt(0, &mut material)
            .unwrap();

        let disk = memory(u64::from(PAYLOAD_SECTORS) * 512 + PAYLOAD as u64);
        let raw = disk.open(&ctx(false)).unwrap();
        raw.pwrite(&h, 0, Flags::NONE).unwrap();
        raw.pwrite(&material, 8 * 512, Flags::NONE).unwrap();
        (disk, raw)
    }

    fn luks(disk: Arc<dyn Plugin>, pass: &str) -> Export {
        export(filter("luks", &[("passphrase", pass)], disk), false)
    }

    #[test]
    fn luks_exports_the_payload_and_reads_back_writes_of_any_alignment() {
        let (disk, raw) = luks_disk(b"pw");
        let e = luks(disk, "pw");
        assert_eq!(e.size(), PAYLOAD as u64);
        let data: Vec<u8> = (0..8192).map(|i| (i % 253) as u8).collect();
        e.write(&data, 4096, Flags::NONE).unwrap();
        e.write(b"0123456789", 1005, Flags::NONE).unwrap();
        e.write(&[0xee; 700], 8000, Flags::NONE).unwrap();
        let mut got = vec![0u8; 12288];
        e.read(&mut got, 0).unwrap();
        assert_eq!(&got[1005..1015], b"0123456789");
        assert_eq!(&got[4096..8000], &data[..3904]);
        assert_eq!(&got[8000..8700], &[0xee; 700][..]);
        assert_eq!(&got[8700..12288], &data[4604..]);
        // Reads that start and end inside sectors give the same bytes.
        let mut part = vec![0u8; 1001];
        e.read(&mut part, 7999).unwrap();
        assert_eq!(&part[..], &got[7999..9000]);
        // The disk below holds ciphertext.
        let mut below = vec![0u8; 8192];
        raw.pread(
            &mut below,
            u64::from(PAYLOAD_SECTORS) * 512 + 4096,
            Flags::NONE,
        )
        .unwrap();
        assert_ne!(below[..3904], data[..3904]);
    }

    #[test]
    fn luks_second_connection_sees_the_first_ones_writes() {
        let (disk, _raw) = luks_disk(b"pw");
        let top = filter("luks", &[("passphrase", "pw")], disk);
        let a = export(top.clone(), false);
        a.write(&[7u8; 512], 512, Flags::NONE).unwrap();
        let b = export(top, false);
        let mut got = [0u8; 512];
        b.read(&mut got, 512).unwrap();
        assert_eq!(got, [7u8; 512]);
    }

    #[test]
    fn luks_wrong_passphrase_refuses_the_connection() {
        let (disk, _raw) = luks_disk(b"pw");
        let top = filter("luks", &[("passphrase", "nope")], disk);
        let Err(e) = Export::open(&Backend::new(top), &ctx(true)) else {
            panic!("the connection was accepted");
        };
        assert_eq!(
            e.message,
            "luks: LUKS passphrase is not correct, no key slot could be unlocked"
        );
    }

    #[test]
    fn luks_over_a_plain_disk_says_it_is_not_luks() {
        let top = filter("luks", &[("passphrase", "pw")], memory(1 << 20));
        let Err(e) = Export::open(&Backend::new(top), &ctx(true)) else {
            panic!("the connection was accepted");
        };
        assert_eq!(e.message, "luks: this disk does not contain a LUKS header");
    }

    #[test]
    fn luks_without_passphrase_is_a_config_error() {
        assert_eq!(
            config_error("luks", &[]),
            "luks: LUKS \"passphrase\" parameter is missing"
        );
        assert!(config_error("luks", &[("passphrase", "+/nonexistent/pw")])
            .starts_with("luks: passphrase: open /nonexistent/pw: "));
    }

    #[test]
    fn luks_caps_hide_trim_and_extents_and_emulate_zero_and_cache() {
        let (disk, _raw) = luks_disk(b"pw");
        let e = luks(disk, "pw");
        let c = e.caps();
        assert!(!c.trim);
        assert!(!c.extents);
        assert!(!c.fast_zero);
        assert_eq!(c.zero, Support::Emulate);
        assert_eq!(c.cache, Support::Emulate);
        assert_eq!(c.block_size.unwrap().minimum, 512);
        assert_eq!(c.block_size.unwrap().preferred, 512);
    }

    #[test]
    fn luks_zero_writes_encrypted_zeroes() {
        let (disk, raw) = luks_disk(b"pw");
        let e = luks(disk, "pw");
        e.write(&[9u8; 4096], 0, Flags::NONE).unwrap();
        e.zero(3000, 100, Flags::MAY_TRIM).unwrap();
        let mut got = [0u8; 4096];
        e.read(&mut got, 0).unwrap();
        assert_eq!(&got[..100], &[9u8; 100][..]);
        assert!(got[100..3100].iter().all(|&b| b == 0));
        assert_eq!(&got[3100..], &[9u8; 996][..]);
        let mut below = [0u8; 512];
        raw.pread(
            &mut below,
            u64::from(PAYLOAD_SECTORS) * 512 + 1024,
            Flags::NONE,
        )
        .unwrap();
        assert!(below.iter().any(|&b| b != 0));
    }
}
