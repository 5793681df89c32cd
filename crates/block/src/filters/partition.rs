//! The partition filter (nbdkit-partition-filter): serves one partition of a disk with an
//! MBR (primary 1-4, logical 5 and up through the EBR chain) or GPT partition table.
//!
//! The table is read when each connection opens (nbdkit's `.prepare`), so a connection sees
//! the partition as it was then; the rest is the offset filter's shift. The parsers are pure
//! functions over the sectors read, so they are tested without a disk. As in nbdkit, sectors
//! are 512 bytes, GPT entries are read from LBA 2, and a logical partition must sit after its
//! EBR and inside the extended partition.

use std::sync::Arc;

use crate::error::{BlockError, Errno, Result};
use crate::extents::Extents;
use crate::filter::{Filter, Next};
use crate::plugin::{Flags, Handle, OpenContext, Plugin};
use crate::plugins::ConfigArg;

use super::offset::shifted;
use super::{bad, each_param, over, parse_u32, FilterEnv, FilterSpec};

pub const SPEC: FilterSpec = FilterSpec {
    name: "partition",
    keys: &["partition"],
    help: "partition=<PART>    (required) The partition number (counting from 1).",
    open,
};

const SECTOR: u64 = 512;

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut partnum = 0;
    each_param(&SPEC, params, |k, v| {
        partnum = parse_u32("partition", k, v)?;
        if partnum == 0 {
            return Err(bad("partition", k, "invalid partition number"));
        }
        Ok(())
    })?;
    if partnum == 0 {
        return Err(bad(
            "partition",
            "partition",
            "you must supply the partition parameter on the command line",
        ));
    }
    Ok(over(Partition { partnum }, inner))
}

pub struct Partition {
    pub partnum: u32,
}

/// Per connection: where the partition is.
pub struct Conn {
    offset: u64,
    range: u64,
}

fn fail(msg: impl Into<String>) -> BlockError {
    BlockError::new(Errno::EIO, format!("partition: {}", msg.into()))
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

/// One MBR/EBR table entry: (type byte, start sector, sector count).
fn mbr_entry(sector: &[u8], i: usize) -> (u8, u32, u32) {
    let at = 0x1be + i * 16;
    (sector[at + 4], le32(sector, at + 8), le32(sector, at + 12))
}

fn is_extended(t: u8) -> bool {
    matches!(t, 0x05 | 0x0f | 0x85)
}

/// Finds partition `partnum` of an MBR disk of `size` bytes whose first sector is `mbr`;
/// `read` reads a sector (EBRs) at a byte offset. Returns (offset, range) in bytes.
pub fn find_mbr(
    partnum: u32,
    size: u64,
    mbr: &[u8],
    mut read: impl FnMut(u64) -> Result<[u8; 512]>,
) -> Result<(u64, u64)> {
    if partnum <= 4 {
        let (t, start, n) = mbr_entry(mbr, partnum as usize - 1);
        if n > 0 && t != 0 && !is_extended(t) {
            return Ok((u64::from(start) * SECTOR, u64::from(n) * SECTOR));
        }
        return Err(fail(format!("MBR partition {partnum} not found")));
    }
    let Some((_, ep_start, ep_n)) = (0..4)
        .map(|i| mbr_entry(mbr, i))
        .find(|&(t, _, n)| n > 0 && is_extended(t))
    else {
        return Err(fail(
            "MBR logical partition selected, but there is no extended partition in the \
             partition table",
        ));
    };
    let ep_end = (u64::from(ep_start) + u64::from(ep_n)) * SECTOR;
    let mut ebr = u64::from(ep_start) * SECTOR;
    for i in 5.. {
        if !ebr.is_multiple_of(SECTOR) || ebr < SECTOR || ebr >= size.saturating_sub(SECTOR) {
            return Err(fail(
                "invalid EBR chain: next EBR boot sector is located outside disk boundary",
            ));
        }
        let sector = read(ebr)?;
        if partnum == i {
            let (_, start, n) = mbr_entry(&sector, 0);
            let offset = ebr + u64::from(start) * SECTOR;
            let range = u64::from(n) * SECTOR;
            if offset <= ebr || offset + range > ep_end {
                return Err(fail(format!(
                    "logical partition start or size out of range (offset={offset}, \
                     range={range}, ep:startsect={ep_start}, ep:nrsects={ep_n})"
                )));
            }
            return Ok((offset, range));
        }
        let (_, start, n) = mbr_entry(&sector, 1);
        if start == 0 && n == 0 {
            break;
        }
        let next = (u64::from(ep_start) + u64::from(start)) * SECTOR;
        if next <= ebr {
            return Err(fail(format!(
                "invalid EBR chain: next EBR {next} <= current EBR {ebr}"
            )));
        }
        ebr = next;
    }
    Err(fail(format!("MBR partition {partnum} not found")))
}

/// Finds partition `partnum` of a GPT disk of `size` bytes whose header (LBA 1) is
/// `header`; `read` reads `len` bytes at a byte offset (entries). Returns (offset, range).
pub fn find_gpt(
    partnum: u32,
    size: u64,
    header: &[u8],
    mut read: impl FnMut(u64, usize) -> Result<Vec<u8>>,
) -> Result<(u64, u64)> {
    let entries = le32(header, 80);
    let entry_size = le32(header, 84);
    if partnum > entries {
        return Err(fail("GPT partition number out of range"));
    }
    if entry_size < 128 {
        return Err(fail("GPT partition entry size is < 128 bytes"));
    }
    if size < 3 * SECTOR + 2 * u64::from(entries) * u64::from(entry_size) {
        return Err(fail("GPT partition table is too large for this disk"));
    }
    let at = 2 * SECTOR + u64::from(partnum - 1) * u64::from(entry_size);
    let e = read(at, 128)?;
    if e[..16].iter().any(|&b| b != 0) {
        let (first, last) = (le64(&e, 32), le64(&e, 40));
        let range = last
            .checked_add(1)
            .and_then(|l| l.checked_sub(first))
            .and_then(|n| n.checked_mul(SECTOR));
        return match (first.checked_mul(SECTOR), range) {
            (Some(o), Some(r)) => Ok((o, r)),
            _ => Err(fail("partition is outside the disk")),
        };
    }
    Err(fail(format!("GPT partition {partnum} not found")))
}

impl Partition {
    fn locate(&self, next: &Next) -> Result<(u64, u64)> {
        let size = next.get_size()?;
        if size < 2 * SECTOR {
            return Err(fail("disk is too small to be a partitioned disk"));
        }
        let mut lba01 = [0u8; 1024];
        next.pread(&mut lba01, 0, Flags::NONE)?;
        let (offset, range) = if size >= 2 * 34 * SECTOR && &lba01[512..520] == b"EFI PART" {
            find_gpt(self.partnum, size, &lba01[512..], |at, len| {
                let mut v = vec![0u8; len];
                next.pread(&mut v, at, Flags::NONE)?;
                Ok(v)
            })?
        } else if lba01[0x1fe] == 0x55 && lba01[0x1ff] == 0xaa {
            find_mbr(self.partnum, size, &lba01[..512], |at| {
                let mut s = [0u8; 512];
                next.pread(&mut s, at, Flags::NONE)?;
                Ok(s)
            })?
        } else {
            return Err(fail(
                "disk does not contain MBR or GPT partition table signature",
            ));
        };
        match offset.checked_add(range) {
            Some(end) if end <= size && offset <= i64::MAX as u64 => Ok((offset, range)),
            _ => Err(fail("partition is outside the disk")),
        }
    }
}

impl Filter for Partition {
    type Conn = Conn;
    fn name(&self) -> &str {
        "partition"
    }
    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<(Conn, Next)> {
        let next = Next::open(next, ctx)?;
        let (offset, range) = self.locate(&next)?;
        Ok((Conn { offset, range }, next))
    }
    fn get_size(&self, c: &Conn, _: &Next) -> Result<u64> {
        Ok(c.range)
    }
    fn pread(&self, c: &Conn, next: &Next, buf: &mut [u8], off: u64, f: Flags) -> Result<()> {
        next.pread(buf, off + c.offset, f)
    }
    fn pwrite(&self, c: &Conn, next: &Next, buf: &[u8], off: u64, f: Flags) -> Result<()> {
        next.pwrite(buf, off + c.offset, f)
    }
    fn trim(&self, c: &Conn, next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        next.trim(n, off + c.offset, f)
    }
    fn zero(&self, c: &Conn, next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        next.zero(n, off + c.offset, f)
    }
    fn cache(&self, c: &Conn, next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        next.cache(n, off + c.offset, f)
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
        shifted(c.offset, c.range, out, |below| {
            next.extents(n, off + c.offset, f, below)
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
        shifted(c.offset, c.range, out, |below| {
            next.allocation_depth(n, off + c.offset, below)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    /// An MBR with entries (type, start sector, sectors).
    fn mbr(entries: &[(u8, u32, u32)]) -> [u8; 512] {
        let mut s = [0u8; 512];
        for (i, &(t, start, n)) in entries.iter().enumerate() {
            let at = 0x1be + i * 16;
            s[at + 4] = t;
            s[at + 8..at + 12].copy_from_slice(&start.to_le_bytes());
            s[at + 12..at + 16].copy_from_slice(&n.to_le_bytes());
        }
        s[0x1fe] = 0x55;
        s[0x1ff] = 0xaa;
        s
    }

    #[test]
    fn mbr_primary_partitions_are_found_and_empty_ones_are_not() {
        let m = mbr(&[(0x83, 2048, 100), (0, 0, 0), (0x07, 4096, 8)]);
        let none = |_| unreachable!();
        assert_eq!(
            find_mbr(1, 1 << 30, &m, none).unwrap(),
            (2048 * 512, 100 * 512)
        );
        assert_eq!(find_mbr(3, 1 << 30, &m, none).unwrap(), (4096 * 512, 4096));
        let e = find_mbr(2, 1 << 30, &m, none).unwrap_err();
        assert_eq!(e.message, "partition: MBR partition 2 not found");
    }

    #[test]
    fn mbr_logical_partitions_follow_the_ebr_chain() {
        // Extended partition at sector 100, 1000 sectors; EBRs at 100 and 300.
        let m = mbr(&[(0x83, 1, 50), (0x05, 100, 1000)]);
        let ebr1 = mbr(&[(0x83, 2, 100), (0x05, 200, 300)]);
        let ebr2 = mbr(&[(0x83, 4, 10)]);
        let read = |at: u64| match at {
            51200 => Ok(ebr1),
            153600 => Ok(ebr2),
            _ => panic!("read at {at}"),
        };
        assert_eq!(
            find_mbr(5, 1 << 30, &m, read).unwrap(),
            (102 * 512, 100 * 512)
        );
        assert_eq!(
            find_mbr(6, 1 << 30, &m, read).unwrap(),
            (304 * 512, 10 * 512)
        );
        assert!(find_mbr(7, 1 << 30, &m, read)
            .unwrap_err()
            .message
            .contains("MBR partition 7 not found"));
        let no_ext = mbr(&[(0x83, 1, 50)]);
        assert!(find_mbr(5, 1 << 30, &no_ext, read)
            .unwrap_err()
            .message
            .contains("no extended partition"));
    }

    #[test]
    fn mbr_ebr_chain_that_goes_backwards_is_refused() {
        let m = mbr(&[(0x05, 100, 1000)]);
        let ebr = mbr(&[(0x83, 2, 10), (0x05, 0, 10)]);
        let e = find_mbr(6, 1 << 30, &m, |_| Ok(ebr)).unwrap_err();
        assert!(e.message.contains("invalid EBR chain"), "{}", e.message);
    }

    fn gpt_disk(parts: &[(u64, u64)]) -> Vec<u8> {
        let mut d = vec![0u8; 1 << 20];
        d[512..520].copy_from_slice(b"EFI PART");
        d[512 + 80..512 + 84].copy_from_slice(&128u32.to_le_bytes());
        d[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        for (i, &(first, last)) in parts.iter().enumerate() {
            let at = 1024 + i * 128;
            d[at] = 0xaf;
            d[at + 32..at + 40].copy_from_slice(&first.to_le_bytes());
            d[at + 40..at + 48].copy_from_slice(&last.to_le_bytes());
        }
        d
    }

    #[test]
    fn gpt_partition_is_served_through_the_filter() {
        let d = gpt_disk(&[(34, 99), (100, 1999)]);
        let mem = memory(1 << 20);
        let raw = export(mem.clone(), false);
        raw.write(&d, 0, Flags::NONE).unwrap();
        raw.write(&[7u8; 512], 100 * 512, Flags::NONE).unwrap();
        let e = export(
            filter("partition", &[("partition", "2")], mem.clone()),
            false,
        );
        assert_eq!(e.size(), 1900 * 512);
        let mut buf = [0u8; 512];
        e.read(&mut buf, 0).unwrap();
        assert_eq!(buf, [7u8; 512]);
        let top = filter("partition", &[("partition", "3")], mem);
        let err = crate::Export::open(&crate::Backend::new(top), &ctx(true))
            .err()
            .unwrap();
        assert_eq!(err.message, "partition: GPT partition 3 not found");
    }

    #[test]
    fn partition_without_a_table_refuses_the_connection() {
        let top = filter("partition", &[("partition", "1")], memory(1 << 20));
        let err = crate::Export::open(&crate::Backend::new(top), &ctx(true))
            .err()
            .unwrap();
        assert!(err.message.contains("does not contain MBR or GPT"), "{err}");
    }

    #[test]
    fn partition_parameter_is_required_and_nonzero() {
        assert!(config_error("partition", &[]).contains("you must supply the partition"));
        assert!(config_error("partition", &[("partition", "0")]).contains("invalid partition"));
    }
}
