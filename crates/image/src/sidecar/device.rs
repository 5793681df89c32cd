//! The identity of a block device whose bitmaps a sidecar file keeps (format version 2).
//!
//! A regular file's identity is its metadata: any write moves its mtime. A block device has
//! none that writes keep (the inode in `/dev` is a tmpfs node, its mtime is not the
//! contents'), so sluice asks the kernel instead, which accounts every request a device
//! completes in `/sys/dev/block/MAJ:MIN/stat` (the kernel's
//! `Documentation/block/stat.rst`). The identity is:
//! - the **device number** (`st_rdev`) and the **size**: another device, or this one resized;
//! - the disk's **`diskseq`** (`/sys/dev/block/MAJ:MIN/diskseq`, Linux 5.15 and later; 0
//!   before): a per-boot sequence number the kernel gives a disk anew whenever its media
//!   changes or a loop device is attached again, so the same number over other contents
//!   is caught even if the counters happen to match;
//! - the **boot id** (`/proc/sys/kernel/random/boot_id`): the counters start from 0 at every
//!   boot, so they only mean something within one;
//! - the device's **content counters**, fields 5, 7, 12 and 14 of its `stat`: write I/Os,
//!   write sectors, discard I/Os and discard sectors (write-zeroes requests count as
//!   writes; flushes and reads are counted elsewhere and left out, so reading the device
//!   or flushing it costs nothing). Kernels before 4.18 have 11 fields and count discards
//!   as writes; the missing ones read as 0.
//!
//! Taken after sluice's final flush at save, as a file's, any request that changes the
//! contents afterwards, by anyone, through this device moves the counters, and the bitmaps
//! load inconsistent, and so do writes through a device stacked on top of it (a device-mapper
//! or loop device over it), which reach it as requests of their own. What it does **not**
//! see: writes that reach the same storage beside or below it, through another device (a
//! partition's parent disk, the physical volume under an LVM volume, another device-mapper
//! mapping of the same extents, the file behind a loop device, another host on shared
//! storage), are counted on that device only. After a reboot, clean or not, the boot id differs and the bitmaps load
//! inconsistent: a reboot costs a full backup, never a stale incremental one.
//!
//! If the kernel does not account the device's I/O (its queue's `iostats` is 0), the
//! counters would not move and the identity would prove nothing: [`DeviceIdentity::of`]
//! fails with a message that says how to turn it on.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// The content counters of a block device's `stat` file (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriteCounters {
    /// Field 5: write requests completed.
    pub write_ios: u64,
    /// Field 7: sectors (512 bytes) written.
    pub write_sectors: u64,
    /// Field 12: discard requests completed (0 on kernels before 4.18).
    pub discard_ios: u64,
    /// Field 14: sectors discarded.
    pub discard_sectors: u64,
}

/// What identifies a block device's contents (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceIdentity {
    pub size: u64,
    /// The device number (`st_rdev`).
    pub rdev: u64,
    /// The disk's `diskseq` (0: the kernel has none).
    pub diskseq: u64,
    /// `/proc/sys/kernel/random/boot_id`, as its 16 bytes.
    pub boot_id: [u8; 16],
    pub counters: WriteCounters,
}

/// Parses a block device's `stat` file (`Documentation/block/stat.rst`): its content
/// counters, or what is wrong with it.
pub fn parse_stat(text: &str) -> Result<WriteCounters, String> {
    let fields: Vec<u64> = text
        .split_whitespace()
        .map(|f| {
            f.parse::<u64>()
                .map_err(|_| format!("field '{f}' is not a number"))
        })
        .collect::<Result<_, _>>()?;
    if fields.len() < 11 {
        return Err(format!("{} fields, at least 11 expected", fields.len()));
    }
    let field = |n: usize| fields.get(n - 1).copied().unwrap_or(0);
    Ok(WriteCounters {
        write_ios: field(5),
        write_sectors: field(7),
        discard_ios: field(12),
        discard_sectors: field(14),
    })
}

/// Parses `boot_id` (a UUID in its text form) into its 16 bytes.
pub fn parse_boot_id(text: &str) -> Result<[u8; 16], String> {
    let hex: String = text.trim().chars().filter(|c| *c != '-').collect();
    let mut id = [0u8; 16];
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("'{}' is not a UUID", text.trim()));
    }
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("checked hex digits");
    }
    Ok(id)
}

fn read_sys(path: &Path) -> std::io::Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("reading {}: {e}", path.display())))
}

fn invalid(path: &Path, why: String) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("{}: {why}", path.display()),
    )
}

/// The sysfs directory of device `rdev`, and the disk's own one (a partition's parent; the
/// same for a whole disk), which holds `diskseq` and `queue/`.
fn sys_dirs(rdev: u64) -> (PathBuf, PathBuf) {
    let dir = PathBuf::from(format!(
        "/sys/dev/block/{}:{}",
        libc::major(rdev),
        libc::minor(rdev)
    ));
    let disk = if dir.join("partition").exists() {
        dir.join("..")
    } else {
        dir.clone()
    };
    (dir, disk)
}

impl DeviceIdentity {
    /// The identity of the open block device `file`, whose device number is `rdev`: taken
    /// now, so after the caller's flush (see the module doc).
    pub fn of(file: &File, rdev: u64) -> std::io::Result<DeviceIdentity> {
        let (dir, disk) = sys_dirs(rdev);
        let iostats = disk.join("queue/iostats");
        if read_sys(&iostats).is_ok_and(|v| v.trim() == "0") {
            return Err(std::io::Error::other(format!(
                "the kernel does not count this device's writes ({} is 0), so sluice could \
                 not tell whether another program wrote it: turn it on with \
                 `echo 1 > {}`",
                iostats.display(),
                iostats.display()
            )));
        }
        let diskseq = match read_sys(&disk.join("diskseq")) {
            Ok(s) => s
                .trim()
                .parse()
                .map_err(|_| invalid(&disk.join("diskseq"), format!("'{}'", s.trim())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        let boot = Path::new("/proc/sys/kernel/random/boot_id");
        let boot_id = parse_boot_id(&read_sys(boot)?).map_err(|e| invalid(boot, e))?;
        let stat = dir.join("stat");
        let counters = parse_stat(&read_sys(&stat)?).map_err(|e| invalid(&stat, e))?;
        let size = (&*file).seek(SeekFrom::End(0))?;
        Ok(DeviceIdentity {
            size,
            rdev,
            diskseq,
            boot_id,
            counters,
        })
    }

    /// Why `now` is not the device contents `self` (the saved identity) describes, or
    /// None: one line naming what differs.
    pub(super) fn differs(&self, now: &DeviceIdentity) -> Option<String> {
        let dev = format!("{}:{}", libc::major(now.rdev), libc::minor(now.rdev));
        let why = if self.rdev != now.rdev {
            format!(
                "the bitmap file was saved for device {}:{}, the image is device {dev}",
                libc::major(self.rdev),
                libc::minor(self.rdev)
            )
        } else if self.boot_id != now.boot_id {
            "the host rebooted since sluice saved the device's bitmaps (the boot id differs, \
             and the kernel's write counters started anew)"
                .to_string()
        } else if self.diskseq != now.diskseq {
            format!(
                "the device was attached again or its media changed since sluice saved its \
                 bitmaps (its diskseq was {}, is {})",
                self.diskseq, now.diskseq
            )
        } else if self.size != now.size {
            format!(
                "the device was resized since sluice saved its bitmaps ({} bytes, now {})",
                self.size, now.size
            )
        } else if self.counters != now.counters {
            let (a, b) = (&self.counters, &now.counters);
            let what = match (
                (a.write_ios, a.write_sectors) != (b.write_ios, b.write_sectors),
                (a.discard_ios, a.discard_sectors) != (b.discard_ios, b.discard_sectors),
            ) {
                (true, true) => "written and discarded",
                (false, true) => "discarded",
                _ => "written",
            };
            format!(
                "the device was {what} by another program since sluice saved its bitmaps \
                 (its counters in /sys/dev/block/{dev}/stat moved)"
            )
        } else {
            return None;
        };
        Some(why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_stat_takes_fields_5_7_12_14() {
        // Linux 5.5 and later: 17 fields.
        let now = "      34        0      672        2        3        0     2056        0 \
                   0        0        3        1        0      128        0        9        4\n";
        assert_eq!(
            parse_stat(now).unwrap(),
            WriteCounters {
                write_ios: 3,
                write_sectors: 2056,
                discard_ios: 1,
                discard_sectors: 128
            }
        );
        // Before 4.18: 11 fields, discards counted as writes.
        let old = "1 2 3 4 5 6 7 8 9 10 11";
        assert_eq!(
            parse_stat(old).unwrap(),
            WriteCounters {
                write_ios: 5,
                write_sectors: 7,
                discard_ios: 0,
                discard_sectors: 0
            }
        );
        // Counters past 2^32 (64-bit kernels keep unsigned longs).
        let big = format!("0 0 0 0 {} 0 {} 0 0 0 0 0 0 0 0", 1u64 << 40, u64::MAX);
        let c = parse_stat(&big).unwrap();
        assert_eq!((c.write_ios, c.write_sectors), (1 << 40, u64::MAX));
    }

    #[test]
    fn parse_stat_refuses_short_or_garbled_files() {
        assert_eq!(
            parse_stat("1 2 3 4 5").unwrap_err(),
            "5 fields, at least 11 expected"
        );
        assert_eq!(
            parse_stat("").unwrap_err(),
            "0 fields, at least 11 expected"
        );
        assert_eq!(
            parse_stat("1 2 3 4 x 6 7 8 9 10 11").unwrap_err(),
            "field 'x' is not a number"
        );
        assert_eq!(
            parse_stat("1 2 3 4 -5 6 7 8 9 10 11").unwrap_err(),
            "field '-5' is not a number"
        );
    }

    #[test]
    fn parse_boot_id_reads_the_uuid_bytes() {
        let id = parse_boot_id("7e69070c-61b4-43c8-b402-9f377cfa3da7\n").unwrap();
        assert_eq!(
            id,
            [
                0x7e, 0x69, 0x07, 0x0c, 0x61, 0xb4, 0x43, 0xc8, 0xb4, 0x02, 0x9f, 0x37, 0x7c, 0xfa,
                0x3d, 0xa7
            ]
        );
        assert!(parse_boot_id("7e69070c-61b4").is_err());
        assert!(parse_boot_id("7e69070c-61b4-43c8-b402-9f377cfa3dzz").is_err());
    }

    #[test]
    fn differs_names_the_part_that_changed() {
        let saved = DeviceIdentity {
            size: 1 << 20,
            rdev: libc::makedev(7, 3),
            diskseq: 13,
            boot_id: [1; 16],
            counters: WriteCounters {
                write_ios: 3,
                write_sectors: 24,
                discard_ios: 0,
                discard_sectors: 0,
            },
        };
        assert_eq!(saved.differs(&saved), None);
        let why = |now: DeviceIdentity| saved.differs(&now).unwrap();
        let mut now = saved;
        now.counters.write_sectors += 8;
        assert_eq!(
            why(now),
            "the device was written by another program since sluice saved its bitmaps (its \
             counters in /sys/dev/block/7:3/stat moved)"
        );
        now.counters.discard_ios += 1;
        assert!(why(now).starts_with("the device was written and discarded by another"));
        let mut now = saved;
        now.counters.discard_sectors += 8;
        assert!(why(now).starts_with("the device was discarded by another"));
        let mut now = saved;
        now.diskseq = 15;
        assert!(why(now).ends_with("(its diskseq was 13, is 15)"));
        let mut now = saved;
        now.boot_id = [2; 16];
        now.counters = WriteCounters::default();
        assert!(why(now).starts_with("the host rebooted since"));
        let mut now = saved;
        now.rdev = libc::makedev(7, 4);
        assert_eq!(
            why(now),
            "the bitmap file was saved for device 7:3, the image is device 7:4"
        );
        let mut now = saved;
        now.size *= 2;
        assert!(why(now).starts_with("the device was resized"));
    }
}
