//! Connection buffers kept by their thread for its next connection.
//!
//! A connection needs a 256 KiB input buffer, a 64 KiB request buffer and a handshake buffer
//! before it serves its first request. Fresh ones are zeroed (`vec![0; n]`, a `memset` of
//! every byte, since glibc serves them from an arena it reuses): about a tenth of the
//! server's CPU for a client that only connects, negotiates and disconnects (`perf record`
//! of `serve memory` under a python3-libnbd connect loop). Connection threads are pooled
//! (see `pool`), so the thread that ran one connection usually runs the next: a buffer the
//! last one gave back here is taken again as it is. Its old bytes are never sent: every user
//! fills a range (from the socket, or by a plugin's pread, which must fill the whole buffer
//! or fail) before using it, as nbdkit's `malloc`ed request buffers are filled before use.
//!
//! A thread keeps at most [`KEEP`] bytes; pooled threads are few (`pool::MAX_IDLE`) and exit
//! after a while idle, and their spare buffers go with them.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Most bytes of spare buffers one thread keeps.
pub(crate) const KEEP: usize = 1 << 20;

thread_local! {
    static SPARE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer that goes back to its thread's spares when dropped.
pub(crate) struct Recycled(Vec<u8>);

/// A buffer of `len` bytes: the smallest spare of this thread that is large enough (its
/// contents are whatever they were), else a new zeroed one. The smallest, so a handshake's
/// 16 KiB does not cut down the 256 KiB input buffer the next `take` wants (a spare keeps
/// only the length its last user left it).
pub(crate) fn take(len: usize) -> Recycled {
    let spare = SPARE
        .try_with(|s| {
            let mut s = s.borrow_mut();
            let (i, _) = s
                .iter()
                .enumerate()
                .filter(|(_, b)| b.len() >= len)
                .min_by_key(|(_, b)| b.len())?;
            Some(s.swap_remove(i))
        })
        .ok()
        .flatten();
    Recycled(match spare {
        Some(mut b) => {
            b.truncate(len);
            b
        }
        None => vec![0u8; len],
    })
}

impl Drop for Recycled {
    fn drop(&mut self) {
        // The buffer keeps its length (all of it initialised), so a later `take` of up to
        // that length needs no zeroing.
        let b = std::mem::take(&mut self.0);
        if b.is_empty() || b.capacity() > KEEP {
            return;
        }
        // At thread exit the spares are gone already; the buffer is then just freed.
        let _ = SPARE.try_with(|s| {
            let mut s = s.borrow_mut();
            let held: usize = s.iter().map(Vec::capacity).sum();
            if held + b.capacity() <= KEEP {
                s.push(b);
            }
        });
    }
}

impl From<Vec<u8>> for Recycled {
    /// A buffer that goes to this thread's spares when dropped.
    fn from(b: Vec<u8>) -> Recycled {
        Recycled(b)
    }
}

impl Default for Recycled {
    /// No buffer yet (nothing to give back).
    fn default() -> Recycled {
        Recycled(Vec::new())
    }
}

impl Deref for Recycled {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl DerefMut for Recycled {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on a thread of its own, so other tests' spares do not interfere.
    fn on_new_thread(f: impl FnOnce() + Send + 'static) {
        std::thread::spawn(f).join().unwrap();
    }

    #[test]
    fn a_given_back_buffer_is_taken_again_with_its_bytes() {
        on_new_thread(|| {
            let mut a = take(4096);
            assert_eq!(a.len(), 4096);
            assert!(a.iter().all(|&b| b == 0), "a new buffer is zeroed");
            a[100] = 7;
            let ptr = a.as_ptr();
            drop(a);
            // Smaller fits: the same memory, not zeroed again.
            let b = take(1024);
            assert_eq!((b.as_ptr(), b.len(), b[100]), (ptr, 1024, 7));
            drop(b);
            // Given back with the length its user left it (1024): a larger take is new.
            let c = take(4096);
            assert_ne!(c.as_ptr(), ptr);
            assert!(c.iter().all(|&b| b == 0));
        });
    }

    #[test]
    fn a_thread_keeps_at_most_keep_bytes() {
        on_new_thread(|| {
            // Larger than KEEP: never kept.
            let big = take(KEEP + 1);
            let ptr = big.as_ptr();
            drop(big);
            assert_ne!(take(KEEP + 1).as_ptr(), ptr);
            // Four of KEEP / 2: two are kept, the rest freed.
            let bufs: Vec<Recycled> = (0..4).map(|_| take(KEEP / 2)).collect();
            drop(bufs);
            let held: usize = SPARE.with(|s| s.borrow().iter().map(Vec::capacity).sum());
            assert!(held <= KEEP, "{held}");
            assert_eq!(SPARE.with(|s| s.borrow().len()), 2);
        });
    }

    #[test]
    fn the_smallest_spare_that_fits_is_taken() {
        on_new_thread(|| {
            // A connection's buffers, given back in any order.
            let big = take(256 << 10);
            let small = take(16 << 10);
            let (big_ptr, small_ptr) = (big.as_ptr(), small.as_ptr());
            drop(big);
            drop(small);
            // The handshake's take gets the small one; the input buffer's the big one, whole.
            let hs = take(16 << 10);
            let input = take(256 << 10);
            assert_eq!((hs.as_ptr(), input.as_ptr()), (small_ptr, big_ptr));
        });
    }

    #[test]
    fn spares_are_per_thread() {
        on_new_thread(|| {
            drop(take(8192));
            on_new_thread(|| assert!(SPARE.with(|s| s.borrow().is_empty())));
        });
    }
}
