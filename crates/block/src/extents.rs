//! The extent list a plugin fills in answer to a block-status request.
//!
//! The rules are nbdkit's `nbdkit_add_extent` (server/extents.c), because C plugins call
//! straight into this type and were written against them: extents ascend and are contiguous
//! (otherwise ERANGE), zero-length ones are ignored, anything past the end of the requested
//! range is clipped or dropped, the first extent may begin before the range but not after
//! its start, adjacent extents of the same type are coalesced, and the list is capped.

use crate::error::{BlockError, Errno, Result};

/// Extent type bits (NBD_STATE_* of `base:allocation`).
pub const EXTENT_HOLE: u32 = 1 << 0;
pub const EXTENT_ZERO: u32 = 1 << 1;

/// nbdkit's cap on the number of extents in one answer.
pub const MAX_EXTENTS: usize = 1024 * 1024;

/// One extent: `length` bytes at `offset` with `kind` bits ([`EXTENT_HOLE`] | [`EXTENT_ZERO`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub kind: u32,
}

/// Extents describing `[start, end)`, built by successive [`Extents::add`] calls.
#[derive(Debug, Clone)]
pub struct Extents {
    start: u64,
    end: u64,
    next: Option<u64>,
    list: Vec<Extent>,
}

impl Extents {
    /// An empty list for the range `[start, end)`.
    pub fn new(start: u64, end: u64) -> Extents {
        Extents {
            start,
            end,
            next: None,
            list: Vec::new(),
        }
    }

    pub fn start(&self) -> u64 {
        self.start
    }
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Adds the next extent, following nbdkit's rules (see the module doc).
    pub fn add(&mut self, offset: u64, length: u64, kind: u32) -> Result<()> {
        if let Some(next) = self.next {
            if offset != next {
                return Err(BlockError::new(
                    Errno::ERANGE,
                    "add_extent: extents must be added in ascending order and must be contiguous",
                ));
            }
        }
        let mut offset = offset;
        let mut length = length;
        self.next = Some(offset.saturating_add(length));
        if length == 0 || offset >= self.end || self.list.len() >= MAX_EXTENTS {
            return Ok(());
        }
        if offset.saturating_add(length) > self.end {
            length = self.end - offset;
        }
        if self.list.is_empty() {
            if offset + length <= self.start {
                return Ok(());
            }
            if offset > self.start {
                return Err(BlockError::new(
                    Errno::ERANGE,
                    format!(
                        "add_extent: first extent must not be > start ({})",
                        self.start
                    ),
                ));
            }
            let overlap = self.start - offset;
            length -= overlap;
            offset += overlap;
        }
        match self.list.last_mut() {
            Some(last) if last.kind == kind => last.length += length,
            _ => self.list.push(Extent {
                offset,
                length,
                kind,
            }),
        }
        Ok(())
    }

    /// The extents added so far, clipped to the range and coalesced.
    pub fn as_slice(&self) -> &[Extent] {
        &self.list
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Keeps only the first extent (for NBD_CMD_FLAG_REQ_ONE).
    pub fn truncate_to_one(&mut self) {
        self.list.truncate(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_coalesces_same_type() {
        let mut e = Extents::new(0, 100);
        e.add(0, 10, 0).unwrap();
        e.add(10, 10, 0).unwrap();
        e.add(20, 10, 3).unwrap();
        assert_eq!(
            e.as_slice(),
            &[
                Extent {
                    offset: 0,
                    length: 20,
                    kind: 0
                },
                Extent {
                    offset: 20,
                    length: 10,
                    kind: 3
                }
            ]
        );
    }

    #[test]
    fn add_non_contiguous_is_erange() {
        let mut e = Extents::new(0, 100);
        e.add(0, 10, 0).unwrap();
        assert_eq!(e.add(20, 10, 0).unwrap_err().errno, Errno::ERANGE);
    }

    #[test]
    fn add_first_after_start_is_erange() {
        let mut e = Extents::new(10, 100);
        assert_eq!(e.add(20, 10, 0).unwrap_err().errno, Errno::ERANGE);
    }

    #[test]
    fn add_clips_to_range() {
        let mut e = Extents::new(10, 50);
        e.add(0, 5, 1).unwrap(); // entirely before start: ignored
        e.add(5, 20, 0).unwrap(); // trimmed to [10, 25)
        e.add(25, 100, 3).unwrap(); // clipped to [25, 50)
        e.add(125, 10, 0).unwrap(); // beyond end: ignored
        assert_eq!(
            e.as_slice(),
            &[
                Extent {
                    offset: 10,
                    length: 15,
                    kind: 0
                },
                Extent {
                    offset: 25,
                    length: 25,
                    kind: 3
                }
            ]
        );
    }

    #[test]
    fn add_zero_length_ignored() {
        let mut e = Extents::new(0, 10);
        e.add(0, 0, 1).unwrap();
        assert!(e.is_empty());
        e.add(0, 10, 0).unwrap();
        assert_eq!(e.as_slice().len(), 1);
    }
}
