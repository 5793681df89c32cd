//! The gzip filter (nbdkit-gzip-filter): serves, read-only, the uncompressed content of the
//! gzip file the layer below holds.
//!
//! gzip cannot seek: the size is only known at the end and reaching an offset means inflating
//! everything before it. So, as nbdkit 1.32 does, the first connection to open inflates the
//! whole file once into an unnamed temporary file in `$TMPDIR` (default `/var/tmp`, which is
//! meant for large files, unlike a RAM-backed `/tmp`), and every connection then reads from
//! it. The result lives in the export (`&self`: one per `sluice serve`, like nbdkit's
//! per-process static), behind a mutex that the first opener holds while it inflates, so
//! connections arriving meanwhile wait for that one decompression instead of starting their
//! own. Reads use `pread` on the shared file and take no lock. A failed decompression is not
//! remembered: the next connection tries again, as in nbdkit. Each connection checks that the
//! layer below still has the size that was inflated (nbdkit's "plugin size changed" error).
//!
//! Like zlib's `inflate` in nbdkit, only the **first gzip member** is served: a file made by
//! `cat a.gz b.gz` serves `a`, and bytes after the first member are ignored.
//!
//! **Inflating: `flate2` with its default backend, `miniz_oxide`**, the de-facto Rust deflate
//! crate, pure Rust: no C zlib to build or to install. The header and trailer (CRC-32 and
//! length) are checked by its `GzDecoder`; errors are turned into our own one-line messages
//! (not a gzip file, truncated, corrupt), where nbdkit prints zlib's terse text (`incorrect
//! header check`, `unknown error: -5`).
//!
//! As in nbdkit: parallel thread model, the layer below opened read-only, no writes, no
//! extents, cache requests emulated with reads.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use flate2::bufread::GzDecoder;

use crate::error::{BlockError, Errno, Result};
use crate::filter::{Filter, Next};
use crate::plugin::{Flags, Handle, OpenContext, Plugin, Support};
use crate::plugins::ConfigArg;

use super::{each_param, over, FilterEnv, FilterSpec};

pub const SPEC: FilterSpec = FilterSpec {
    name: "gzip",
    keys: &[],
    help: "",
    open,
};

/// How much compressed data one read of the layer below fetches (nbdkit's 4 MiB, generous
/// for remote plugins), and the size of the write buffer to the temporary file.
const CHUNK: usize = 4 << 20;

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    each_param(&SPEC, params, |_, _| Ok(()))?;
    Ok(over(Gzip::default(), inner))
}

/// The export's decompressed data, once the first connection made it.
#[derive(Default)]
pub struct Gzip {
    inflated: Mutex<Option<Arc<Inflated>>>,
}

/// The uncompressed data in an unlinked temporary file.
pub struct Inflated {
    file: File,
    /// Size of the gzip file it came from.
    compressed: u64,
    size: u64,
}

/// The directory for the temporary file: `$TMPDIR`, else `/var/tmp` (nbdkit's LARGE_TMPDIR).
fn tmpdir() -> PathBuf {
    std::env::var_os("TMPDIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from)
}

/// Reads the layer below sequentially, for the decoder, remembering a read failure so that
/// its errno reaches the client rather than an I/O error made up by the decoder.
struct Source<'a> {
    next: &'a Next,
    pos: u64,
    len: u64,
    failed: Option<BlockError>,
}

impl Read for Source<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.len - self.pos).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        if let Err(e) = self.next.pread(&mut buf[..n], self.pos, Flags::NONE) {
            self.failed = Some(e);
            return Err(std::io::Error::other("read from the layer below failed"));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// Inflates the first gzip member of the layer below into a new temporary file.
fn inflate(next: &Next) -> Result<Inflated> {
    let compressed = next.get_size()?;
    let mut source = BufReader::with_capacity(
        CHUNK,
        Source {
            next,
            pos: 0,
            len: compressed,
            failed: None,
        },
    );
    let is_gzip = match source.fill_buf() {
        Ok(head) => head.starts_with(&[0x1f, 0x8b, 8]),
        Err(_) => return Err(source.get_mut().failed.take().expect("only reads fail")),
    };
    if !is_gzip {
        return Err(BlockError::new(
            Errno::EINVAL,
            "gzip: not a gzip file (no gzip header at the start)",
        ));
    }
    let dir = tmpdir();
    let mut file = tempfile::tempfile_in(&dir).map_err(|e| {
        BlockError::io(
            format!("gzip: cannot create a temporary file in {}", dir.display()),
            e,
        )
    })?;
    let mut decoder = GzDecoder::new(source);
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = match decoder.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if let Some(failed) = decoder.get_mut().get_mut().failed.take() {
                    return Err(failed);
                }
                return Err(decode_error(&e, size));
            }
        };
        file.write_all(&buf[..n]).map_err(|e| {
            BlockError::io(
                format!("gzip: write to the temporary file in {}", dir.display()),
                e,
            )
        })?;
        size += n as u64;
    }
    tracing::debug!("gzip: uncompressed size: {size}");
    Ok(Inflated {
        file,
        compressed,
        size,
    })
}

/// A one-line message for a decoder failure after `done` bytes of output.
fn decode_error(e: &std::io::Error, done: u64) -> BlockError {
    let why = if e.kind() == std::io::ErrorKind::UnexpectedEof {
        "truncated gzip file: it ends before the end of the compressed data".to_string()
    } else {
        format!("corrupt gzip file: {e}")
    };
    BlockError::new(
        Errno::EIO,
        format!("gzip: {why} (after {done} uncompressed bytes)"),
    )
}

impl Filter for Gzip {
    type Conn = Arc<Inflated>;
    fn name(&self) -> &str {
        "gzip"
    }
    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<(Arc<Inflated>, Next)> {
        let next = Next::open(
            next,
            &OpenContext {
                readonly: true,
                ..*ctx
            },
        )?;
        // Held while inflating, on purpose: see the module doc.
        let mut slot = self.inflated.lock().unwrap_or_else(PoisonError::into_inner);
        let inflated = match &*slot {
            Some(i) => Arc::clone(i),
            None => Arc::clone(slot.insert(Arc::new(inflate(&next)?))),
        };
        drop(slot);
        Ok((inflated, next))
    }
    fn get_size(&self, c: &Arc<Inflated>, next: &Next) -> Result<u64> {
        if next.get_size()? != c.compressed {
            return Err(BlockError::new(
                Errno::EIO,
                "gzip: plugin size changed unexpectedly: restart the server so that the gzip \
                 filter can decompress the data again",
            ));
        }
        Ok(c.size)
    }
    fn can_write(&self, _: &Arc<Inflated>, _: &Next) -> Result<bool> {
        Ok(false)
    }
    fn can_extents(&self, _: &Arc<Inflated>, _: &Next) -> Result<bool> {
        Ok(false)
    }
    fn can_cache(&self, _: &Arc<Inflated>, _: &Next) -> Result<Support> {
        Ok(Support::Emulate)
    }
    fn pread(&self, c: &Arc<Inflated>, _: &Next, buf: &mut [u8], off: u64, _: Flags) -> Result<()> {
        c.file
            .read_exact_at(buf, off)
            .map_err(|e| BlockError::io(format!("gzip: pread of the temporary file at {off}"), e))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use flate2::write::GzEncoder;
    use flate2::Compression;

    use super::super::test_support::*;
    use super::*;
    use crate::plugins::MemoryPlugin;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| ((i / 777) ^ (i % 253)) as u8).collect()
    }

    /// A memory plugin holding `file`, counting its opens.
    fn holding(file: &[u8]) -> Arc<dyn Plugin> {
        let mem = MemoryPlugin::new(file.len() as u64);
        let h = mem.open(&ctx(false)).unwrap();
        h.pwrite(file, 0, Flags::NONE).unwrap();
        drop(h);
        Arc::new(mem)
    }

    fn read_all(p: &Arc<dyn Plugin>) -> crate::Result<Vec<u8>> {
        let h = p.open(&ctx(true))?;
        let mut buf = vec![0u8; h.get_size()? as usize];
        h.pread(&mut buf, 0, Flags::NONE)?;
        Ok(buf)
    }

    #[test]
    fn gzip_serves_the_uncompressed_bytes_read_only() {
        let data = sample(5 << 20);
        let p = filter("gzip", &[], holding(&gz(&data)));
        let h = p.open(&ctx(false)).unwrap();
        assert!(!h.can_write().unwrap());
        assert!(!h.can_extents().unwrap());
        assert_eq!(h.can_cache().unwrap(), Support::Emulate);
        drop(h);
        assert_eq!(read_all(&p).unwrap(), data);
    }

    #[test]
    fn gzip_multi_member_serves_only_the_first_member() {
        let mut file = gz(b"first member");
        file.extend_from_slice(&gz(b"second"));
        let p = filter("gzip", &[], holding(&file));
        assert_eq!(read_all(&p).unwrap(), b"first member");
    }

    #[test]
    fn gzip_not_gzip_is_refused_at_open() {
        let p = filter("gzip", &[], holding(b"plain text, not gzip"));
        let e = read_all(&p).unwrap_err();
        assert!(e.message.starts_with("gzip: not a gzip file"), "{e}");
        let p = filter("gzip", &[], holding(b""));
        assert!(read_all(&p).is_err());
    }

    #[test]
    fn gzip_truncated_or_corrupt_says_so() {
        let file = gz(&sample(1 << 20));
        let p = filter("gzip", &[], holding(&file[..file.len() / 2]));
        let e = read_all(&p).unwrap_err();
        assert!(e.message.contains("truncated gzip file"), "{e}");
        let mut bad = file.clone();
        let n = bad.len();
        bad[n - 6] ^= 1; // the CRC-32 in the trailer
        let p = filter("gzip", &[], holding(&bad));
        let e = read_all(&p).unwrap_err();
        assert!(e.message.contains("corrupt gzip file"), "{e}");
    }

    /// A plugin that counts the reads reaching it.
    struct Counting(Arc<dyn Plugin>, Arc<AtomicUsize>);
    struct CountingHandle(Box<dyn Handle>, Arc<AtomicUsize>);
    impl Plugin for Counting {
        fn name(&self) -> &str {
            "counting"
        }
        fn open(&self, ctx: &OpenContext<'_>) -> Result<Box<dyn Handle>> {
            Ok(Box::new(CountingHandle(self.0.open(ctx)?, self.1.clone())))
        }
    }
    impl Handle for CountingHandle {
        fn get_size(&self) -> Result<u64> {
            self.0.get_size()
        }
        fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
            self.1.fetch_add(1, Ordering::Relaxed);
            self.0.pread(buf, offset, flags)
        }
    }

    #[test]
    fn gzip_concurrent_opens_inflate_once() {
        let data = sample(3 << 20);
        let reads = Arc::new(AtomicUsize::new(0));
        let inner = Arc::new(Counting(holding(&gz(&data)), reads.clone()));
        let p = filter("gzip", &[], inner);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| assert_eq!(read_all(&p).unwrap(), data));
            }
        });
        let once = reads.load(Ordering::Relaxed);
        assert!(once > 0);
        assert_eq!(read_all(&p).unwrap(), data);
        assert_eq!(
            reads.load(Ordering::Relaxed),
            once,
            "inflated a second time"
        );
    }
}
