//! The offset filter (nbdkit-offset-filter): serves `range` bytes of the layer below starting
//! at `offset` (by default everything after `offset`).
//!
//! Every ranged call is shifted by `offset`; the size is checked against the layer below once
//! per connection, when it opens, as nbdkit's `get_size` is asked once and cached.

use std::sync::Arc;

use crate::error::{BlockError, Errno, Result};
use crate::extents::Extents;
use crate::filter::{Filter, Next};
use crate::plugin::{Flags, Handle, OpenContext, Plugin};
use crate::plugins::ConfigArg;

use super::{each_param, over, parse_size, FilterEnv, FilterSpec};

pub const SPEC: FilterSpec = FilterSpec {
    name: "offset",
    keys: &["offset", "range"],
    help: "offset=<OFFSET>            The start offset to serve (default 0).\n\
           range=<LENGTH>             The total size to serve (default rest of file).",
    open,
};

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut f = Offset {
        offset: 0,
        range: None,
    };
    each_param(&SPEC, params, |k, v| {
        match k {
            "offset" => f.offset = parse_size("offset", k, v)?,
            _ => f.range = Some(parse_size("offset", k, v)?),
        }
        Ok(())
    })?;
    Ok(over(f, inner))
}

/// The window `[offset, offset + range)` of the layer below.
pub struct Offset {
    pub offset: u64,
    pub range: Option<u64>,
}

/// Per connection: the size served.
pub struct Conn {
    size: u64,
}

impl Offset {
    fn size(&self, real: u64) -> Result<u64> {
        let too_big = |what: String| {
            BlockError::new(
                Errno::EINVAL,
                format!(
                    "offset: {what} is larger than the real size ({real}) \
                     of the underlying file or device"
                ),
            )
        };
        match self.range {
            Some(range) => match self.offset.checked_add(range) {
                Some(end) if end <= real => Ok(range),
                _ => Err(too_big(format!("offset+range ({}+{range})", self.offset))),
            },
            None => real
                .checked_sub(self.offset)
                .ok_or_else(|| too_big(format!("offset ({})", self.offset))),
        }
    }
}

impl Filter for Offset {
    type Conn = Conn;
    fn name(&self) -> &str {
        "offset"
    }
    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<(Conn, Next)> {
        let next = Next::open(next, ctx)?;
        let size = self.size(next.get_size()?)?;
        Ok((Conn { size }, next))
    }
    fn get_size(&self, c: &Conn, _: &Next) -> Result<u64> {
        Ok(c.size)
    }
    fn pread(&self, _: &Conn, next: &Next, buf: &mut [u8], off: u64, f: Flags) -> Result<()> {
        next.pread(buf, off + self.offset, f)
    }
    fn pwrite(&self, _: &Conn, next: &Next, buf: &[u8], off: u64, f: Flags) -> Result<()> {
        next.pwrite(buf, off + self.offset, f)
    }
    fn trim(&self, _: &Conn, next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        next.trim(n, off + self.offset, f)
    }
    fn zero(&self, _: &Conn, next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        next.zero(n, off + self.offset, f)
    }
    fn cache(&self, _: &Conn, next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        next.cache(n, off + self.offset, f)
    }
    fn extents(
        &self,
        c: &Conn,
        next: &Next,
        n: u64,
        off: u64,
        f: Flags,
        out: &mut Extents,
    ) -> Result<()> {
        shifted(self.offset, c.size, out, |below| {
            next.extents(n, off + self.offset, f, below)
        })
    }
    fn allocation_depth(
        &self,
        c: &Conn,
        next: &Next,
        n: u64,
        off: u64,
        out: &mut Extents,
    ) -> Result<()> {
        shifted(self.offset, c.size, out, |below| {
            next.allocation_depth(n, off + self.offset, below)
        })
    }
}

/// Asks `ask` for extents of the layer below over `out`'s range moved up by `shift` (and
/// clipped to the window of `size` bytes), and adds them to `out` moved back down.
pub(crate) fn shifted(
    shift: u64,
    size: u64,
    out: &mut Extents,
    ask: impl FnOnce(&mut Extents) -> Result<()>,
) -> Result<()> {
    let end = out.end().min(size);
    let mut below = Extents::new(out.start() + shift, end + shift);
    ask(&mut below)?;
    for e in below.as_slice() {
        out.add(e.offset - shift, e.length, e.kind)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use crate::extents::{EXTENT_HOLE, EXTENT_ZERO};
    use crate::plugin::Flags;

    #[test]
    fn offset_range_window_reads_and_writes_shifted() {
        let mem = memory(1 << 20);
        let top = filter(
            "offset",
            &[("offset", "1024"), ("range", "4096")],
            mem.clone(),
        );
        let e = export(top, false);
        assert_eq!(e.size(), 4096);
        e.write(&[9u8; 512], 512, Flags::NONE).unwrap();
        let below = export(mem, true);
        let mut buf = [0u8; 512];
        below.read(&mut buf, 1536).unwrap();
        assert_eq!(buf, [9u8; 512]);
        let ext = e.extents(4096, 0, Flags::NONE).unwrap();
        assert_eq!(ext.as_slice()[0].offset, 0);
        assert_eq!(ext.as_slice().iter().map(|x| x.length).sum::<u64>(), 4096);
    }

    #[test]
    fn offset_without_range_serves_the_rest() {
        let e = export(filter("offset", &[("offset", "1M")], memory(3 << 20)), true);
        assert_eq!(e.size(), 2 << 20);
        let ext = e.extents(2 << 20, 0, Flags::NONE).unwrap();
        assert_eq!(ext.as_slice()[0].kind, EXTENT_HOLE | EXTENT_ZERO);
    }

    #[test]
    fn offset_beyond_the_plugin_refuses_the_connection() {
        let top = filter("offset", &[("offset", "2M")], memory(1 << 20));
        let err = crate::Export::open(&crate::Backend::new(top), &ctx(true))
            .err()
            .unwrap();
        assert!(
            err.message.contains("is larger than the real size"),
            "{err}"
        );
        let top = filter(
            "offset",
            &[("offset", "1024"), ("range", "1M")],
            memory(1 << 20),
        );
        assert!(crate::Export::open(&crate::Backend::new(top), &ctx(true)).is_err());
    }

    #[test]
    fn offset_bad_size_names_the_key() {
        let msg = config_error("offset", &[("offset", "12Q")]);
        assert!(msg.starts_with("offset: offset: "), "{msg}");
    }
}
