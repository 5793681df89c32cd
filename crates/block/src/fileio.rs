//! File-descriptor helpers shared by everything that serves a file: `lseek` with
//! `SEEK_DATA`/`SEEK_HOLE` and the walk over a range's data and holes built on it, and
//! `posix_fadvise`.
//!
//! The `file` plugin and the image crate's `file`/`raw` nodes both report a file's holes as
//! qemu's and nbdkit's file drivers do, and both pass page-cache hints; they differ only in
//! what they do with a failed probe (the plugin fails the request; an image node, like qemu,
//! reports the rest as data). So the walk is an iterator that yields the failure and lets
//! the caller decide, and the syscalls, their `off_t` conversions and their `// SAFETY:`
//! arguments are written once, here.
//!
//! `lseek` moves the descriptor's file offset (shared with every duplicate of it); callers
//! must do their data I/O positionally (`pread`/`pwrite`), as sluice does everywhere, so
//! that moving it changes nothing. One `lseek` call is atomic, so no lock is needed around
//! a walk: a file that changes under it yields runs that were each true when probed.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};

/// `lseek(2)`: the new offset. An offset beyond `off_t` is EINVAL.
pub fn lseek(file: impl AsFd, offset: u64, whence: libc::c_int) -> std::io::Result<u64> {
    let Ok(off) = libc::off_t::try_from(offset) else {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: plain syscall on a descriptor borrowed for the whole call (`AsFd` guarantees it
    // is open); no memory is passed. It moves the file offset, which no caller relies on
    // (see the module doc).
    let r = unsafe { libc::lseek(file.as_fd().as_raw_fd(), off, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// `posix_fadvise(2)`, which returns its error instead of setting errno. A range beyond
/// `off_t` is EINVAL.
pub fn fadvise(file: &File, offset: u64, len: u64, advice: libc::c_int) -> std::io::Result<()> {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: plain syscall on a descriptor owned by `file`, which outlives the call; no
    // memory is passed.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), offset, len, advice) };
    match r {
        0 => Ok(()),
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}

/// One stretch of a file: all data or all hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub offset: u64,
    pub length: u64,
    /// False for a hole (reads as zeroes).
    pub data: bool,
}

/// A probe that failed during [`data_runs`]: the walk stops there. Its message is the
/// context (`lseek SEEK_DATA 4096`); the system's error is the source.
#[derive(Debug, thiserror::Error)]
#[error("lseek {whence} {offset}")]
pub struct SeekError {
    /// `"SEEK_DATA"` or `"SEEK_HOLE"`.
    pub whence: &'static str,
    /// Where the walk stood: the runs before it were yielded, nothing from it on.
    pub offset: u64,
    #[source]
    pub source: std::io::Error,
}

/// The data and holes of `[start, end)` of `file`, in order and covering it, found with
/// `SEEK_DATA`/`SEEK_HOLE` as qemu's and nbdkit's file drivers do; each `lseek` is made
/// only when the walk reaches it. After an `Err` the iterator ends.
pub fn data_runs(file: &File, start: u64, end: u64) -> DataRuns<'_> {
    DataRuns {
        file,
        at: start,
        end,
    }
}

/// The iterator of [`data_runs`].
#[derive(Debug)]
pub struct DataRuns<'a> {
    file: &'a File,
    at: u64,
    end: u64,
}

impl DataRuns<'_> {
    fn fail(&mut self, whence: &'static str, source: std::io::Error) -> SeekError {
        let offset = self.at;
        self.at = self.end;
        SeekError {
            whence,
            offset,
            source,
        }
    }
}

impl Iterator for DataRuns<'_> {
    type Item = Result<Run, SeekError>;

    fn next(&mut self) -> Option<Self::Item> {
        let (at, end) = (self.at, self.end);
        if at >= end {
            return None;
        }
        let data = match lseek(self.file, at, libc::SEEK_DATA) {
            Ok(pos) => pos.min(end),
            // ENXIO: `at` is in the final hole.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
            Err(e) => return Some(Err(self.fail("SEEK_DATA", e))),
        };
        let run = if data > at {
            Run {
                offset: at,
                length: data - at,
                data: false,
            }
        } else {
            let hole = match lseek(self.file, at, libc::SEEK_HOLE) {
                Ok(pos) => pos,
                Err(e) => return Some(Err(self.fail("SEEK_HOLE", e))),
            };
            // A file that grew past `end` meanwhile could answer hole == at; never loop.
            let hole = hole.clamp(at + 1, end);
            Run {
                offset: at,
                length: hole - at,
                data: true,
            }
        };
        self.at = run.offset + run.length;
        Some(Ok(run))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn runs(file: &File, start: u64, end: u64) -> Vec<(u64, u64, bool)> {
        data_runs(file, start, end)
            .map(|r| r.unwrap())
            .map(|r| (r.offset, r.length, r.data))
            .collect()
    }

    #[test]
    fn data_runs_sparse_file_alternates_and_covers_range() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(&[1; 4096], 512 << 10).unwrap();
        let got = runs(&f, 0, 1 << 20);
        // The file system's allocation unit may widen the data run, never move it.
        assert!(!got[0].2, "{got:?}");
        assert!(got
            .iter()
            .any(|r| r.2 && r.0 <= 512 << 10 && r.0 + r.1 >= 516 << 10));
        assert_eq!(got.iter().map(|r| r.1).sum::<u64>(), 1 << 20);
        for w in got.windows(2) {
            assert_eq!(w[0].0 + w[0].1, w[1].0, "{got:?}");
            assert_ne!(w[0].2, w[1].2, "{got:?}");
        }
    }

    #[test]
    fn data_runs_past_eof_is_one_hole() {
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(&[1; 10], 0).unwrap();
        assert_eq!(runs(&f, 1 << 20, 2 << 20), [(1 << 20, 1 << 20, false)]);
    }

    #[test]
    fn data_runs_offset_beyond_off_t_fails_once_then_ends() {
        let f = tempfile::tempfile().unwrap();
        let mut it = data_runs(&f, u64::MAX - 10, u64::MAX);
        let err = it.next().unwrap().unwrap_err();
        assert_eq!(err.source.raw_os_error(), Some(libc::EINVAL));
        assert_eq!(
            err.to_string(),
            format!("lseek SEEK_DATA {}", u64::MAX - 10)
        );
        assert!(it.next().is_none());
    }

    #[test]
    fn fadvise_range_beyond_off_t_is_einval() {
        let f = tempfile::tempfile().unwrap();
        fadvise(&f, 0, 0, libc::POSIX_FADV_WILLNEED).unwrap();
        let err = fadvise(&f, u64::MAX, 1, libc::POSIX_FADV_WILLNEED).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    }
}
