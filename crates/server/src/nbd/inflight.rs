//! Requests of one connection in flight in an asynchronous backend, between the worker that
//! submitted them and the reply sender that answers them (see [`super::transmit`]).
//!
//! A connection to an export that submits asynchronously ([`sluice_block::Export::submit`])
//! has a fixed number of slots, the same N that bounds its worker threads. A worker reserves a
//! slot *before* it reads a request, so a connection never has more than N requests in
//! flight and a worker that must wait does so without a request in its hands. A slot holds
//! the request's header and start time while the backend runs it, and a spare buffer while it
//! is free: the worker swaps the slot's spare for the buffer holding its request, the
//! buffer travels with the request and comes back with the completion, and becomes the slot's
//! spare again once the reply is sent. Buffers therefore rotate between slots and workers,
//! and in steady state nothing is allocated.
//!
//! The backend's callback ([`AioSink::complete`]) runs on the backend's own thread (librbd's),
//! which must never wait for a client's socket, or one slow reader would stall every image
//! request of the process. It answers a successful request itself when that costs no waiting
//! ([`Direct`]: the writer lock is free and the socket takes the whole reply at once), which
//! saves a thread wake-up per request; otherwise it queues the completion and wakes the
//! sender if it sleeps. One lock guards the slots and the queue; it is held for a few
//! instructions at a time, never across I/O.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};

use sluice_block::{AioSink, BlockError};
use sluice_proto::nbd::RequestHeader;

/// A slot taken by a worker: its index (the request's tag) and its spare buffer.
pub(super) struct Reservation {
    pub slot: usize,
    pub buf: Vec<u8>,
}

/// A finished request, handed to the reply sender.
pub(super) struct Finished {
    pub slot: usize,
    pub req: RequestHeader,
    /// When it began (`now_ns`), for the statistics.
    pub begun: u64,
    /// Its buffer, back from the backend (a read's data after the header room).
    pub buf: Vec<u8>,
    pub result: Result<(), BlockError>,
}

struct Slot {
    /// The request in flight in this slot, and when it began.
    request: Option<(RequestHeader, u64)>,
    /// The spare buffer, while the slot is free.
    buf: Vec<u8>,
}

struct State {
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Completions not yet answered: (slot, buffer, result).
    done: VecDeque<(usize, Vec<u8>, Result<(), BlockError>)>,
    sender_waiting: bool,
    /// Requests armed and not yet answered (submitted, or about to be).
    in_flight: usize,
    /// No request will be submitted any more: the workers are gone.
    input_over: bool,
    /// Asynchronous submission is off (the reply sender could not be started).
    disabled: bool,
}

/// A way to answer a finished request on the backend's thread without waiting.
pub(super) trait Direct: Send + Sync {
    /// Sends the successful reply of `req` (begun at `begun`; a read's data in `buf` after
    /// the header room) and counts it, if that can be done at once without waiting for
    /// anyone. True if it was sent; false if nothing was sent (the sender will answer it).
    fn try_reply(&self, req: &RequestHeader, begun: u64, buf: &mut [u8]) -> bool;
}

/// The in-flight requests of one connection; the backend's completion sink.
pub(super) struct Flight {
    state: Mutex<State>,
    /// Set once, before the first submission, if replies may be sent by the callback.
    direct: OnceLock<Box<dyn Direct>>,
    /// The reply sender waits here for completions and for the end of input.
    done_cv: Condvar,
    /// Workers wait here for a free slot.
    free_cv: Condvar,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Flight {
    /// `limit` slots (at least one).
    pub fn new(limit: usize) -> Flight {
        let limit = limit.max(1);
        Flight {
            state: Mutex::new(State {
                slots: (0..limit)
                    .map(|_| Slot {
                        request: None,
                        buf: Vec::new(),
                    })
                    .collect(),
                free: (0..limit).rev().collect(),
                done: VecDeque::with_capacity(limit),
                sender_waiting: false,
                in_flight: 0,
                input_over: false,
                disabled: false,
            }),
            direct: OnceLock::new(),
            done_cv: Condvar::new(),
            free_cv: Condvar::new(),
        }
    }

    /// Lets the backend's callback answer successful requests itself through `d` (call
    /// before the first submission; a second call is ignored).
    pub fn set_direct(&self, d: Box<dyn Direct>) {
        let _ = self.direct.set(d);
    }

    /// Waits for a free slot and takes it; None if asynchronous submission is off.
    pub fn reserve(&self) -> Option<Reservation> {
        let mut s = lock(&self.state);
        loop {
            if s.disabled {
                return None;
            }
            if let Some(slot) = s.free.pop() {
                let buf = std::mem::take(&mut s.slots[slot].buf);
                return Some(Reservation { slot, buf });
            }
            s = self.free_cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Gives back a slot whose request was not submitted.
    pub fn release(&self, r: Reservation) {
        let mut s = lock(&self.state);
        s.slots[r.slot] = Slot {
            request: None,
            buf: r.buf,
        };
        s.free.push(r.slot);
        drop(s);
        self.free_cv.notify_one();
    }

    /// Records the request about to be submitted in `slot` (before submitting: its
    /// completion may come before the submission returns).
    pub fn arm(&self, slot: usize, req: RequestHeader, begun: u64) {
        let mut s = lock(&self.state);
        s.slots[slot].request = Some((req, begun));
        s.in_flight += 1;
    }

    /// The request of `slot` was not submitted after all.
    pub fn disarm(&self, slot: usize) {
        let mut s = lock(&self.state);
        s.slots[slot].request = None;
        s.in_flight -= 1;
    }

    /// The next finished request, waiting for one; None once input is over and nothing is in
    /// flight.
    pub fn next_finished(&self) -> Option<Finished> {
        let mut s = lock(&self.state);
        loop {
            if let Some((slot, buf, result)) = s.done.pop_front() {
                let (req, begun) = s.slots[slot]
                    .request
                    .take()
                    .expect("a completed slot holds its request");
                return Some(Finished {
                    slot,
                    req,
                    begun,
                    buf,
                    result,
                });
            }
            if s.input_over && s.in_flight == 0 {
                return None;
            }
            s.sender_waiting = true;
            s = self.done_cv.wait(s).unwrap_or_else(|e| e.into_inner());
            s.sender_waiting = false;
        }
    }

    /// The reply of `slot` is sent: its buffer becomes the slot's spare and the slot is free.
    pub fn finish(&self, slot: usize, buf: Vec<u8>) {
        let mut s = lock(&self.state);
        s.slots[slot] = Slot { request: None, buf };
        s.free.push(slot);
        s.in_flight -= 1;
        // The last request may be answered by the callback, not the sender: wake the sender
        // if it waits for the end.
        let last = s.input_over && s.in_flight == 0 && s.sender_waiting;
        drop(s);
        self.free_cv.notify_one();
        if last {
            self.done_cv.notify_one();
        }
    }

    /// No request will be submitted any more: the sender ends once the last is answered.
    pub fn end_of_input(&self) {
        lock(&self.state).input_over = true;
        self.done_cv.notify_one();
    }

    /// Turns asynchronous submission off: every request runs synchronously.
    pub fn disable(&self) {
        lock(&self.state).disabled = true;
        self.free_cv.notify_all();
    }

    /// The spare buffers, for the connection thread to keep (call when nothing is in flight).
    pub fn take_buffers(&self) -> Vec<Vec<u8>> {
        let mut s = lock(&self.state);
        s.slots
            .iter_mut()
            .map(|slot| std::mem::take(&mut slot.buf))
            .filter(|b| !b.is_empty())
            .collect()
    }
}

impl AioSink for Flight {
    fn complete(&self, tag: usize, mut buf: Vec<u8>, result: Result<(), BlockError>) {
        if let (Ok(()), Some(d)) = (&result, self.direct.get()) {
            // Only when the sender has nothing queued: it stays the one that answers a burst.
            let s = lock(&self.state);
            let ready = s.done.is_empty().then(|| s.slots[tag].request).flatten();
            drop(s);
            if let Some((req, begun)) = ready {
                if d.try_reply(&req, begun, &mut buf) {
                    self.finish(tag, buf);
                    return;
                }
            }
        }
        let mut s = lock(&self.state);
        // At most one completion per slot is queued, and the queue has room for every slot.
        s.done.push_back((tag, buf, result));
        let wake = s.sender_waiting;
        drop(s);
        if wake {
            self.done_cv.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_block::Errno;
    use std::sync::Arc;

    fn req(cookie: u64) -> RequestHeader {
        RequestHeader {
            flags: 0,
            kind: 0,
            cookie,
            offset: 0,
            length: 4096,
        }
    }

    #[test]
    fn completions_come_back_with_their_request_and_buffer() {
        let f = Flight::new(2);
        let a = f.reserve().unwrap();
        let b = f.reserve().unwrap();
        assert_ne!(a.slot, b.slot);
        f.arm(a.slot, req(1), 10);
        f.arm(b.slot, req(2), 20);
        // Out of order.
        f.complete(b.slot, vec![2; 8], Err(BlockError::errno(Errno::EIO)));
        f.complete(a.slot, vec![1; 8], Ok(()));
        let x = f.next_finished().unwrap();
        assert_eq!((x.req.cookie, x.begun, x.buf[0]), (2, 20, 2));
        assert!(x.result.is_err());
        f.finish(x.slot, x.buf);
        let y = f.next_finished().unwrap();
        assert_eq!((y.req.cookie, y.begun, y.buf[0]), (1, 10, 1));
        f.finish(y.slot, y.buf);
        f.end_of_input();
        assert!(f.next_finished().is_none());
        assert_eq!(f.take_buffers().len(), 2);
    }

    #[test]
    fn a_full_connection_waits_for_a_slot() {
        let f = Arc::new(Flight::new(1));
        let a = f.reserve().unwrap();
        f.arm(a.slot, req(1), 0);
        let f2 = f.clone();
        let waiter = std::thread::spawn(move || f2.reserve().map(|r| r.slot));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            !waiter.is_finished(),
            "a second request must wait for the slot"
        );
        f.complete(a.slot, Vec::new(), Ok(()));
        let done = f.next_finished().unwrap();
        f.finish(done.slot, done.buf);
        assert_eq!(waiter.join().unwrap(), Some(a.slot));
    }

    #[test]
    fn the_sender_ends_only_after_the_last_completion() {
        let f = Arc::new(Flight::new(2));
        let a = f.reserve().unwrap();
        f.arm(a.slot, req(7), 0);
        f.end_of_input();
        let f2 = f.clone();
        let sender = std::thread::spawn(move || {
            let mut n = 0;
            while let Some(d) = f2.next_finished() {
                f2.finish(d.slot, d.buf);
                n += 1;
            }
            n
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!sender.is_finished(), "a request is still in flight");
        f.complete(a.slot, Vec::new(), Ok(()));
        assert_eq!(sender.join().unwrap(), 1);
    }

    #[test]
    fn a_slot_reserved_but_never_submitted_does_not_hold_the_sender() {
        let f = Flight::new(2);
        let _kept = f.reserve().unwrap();
        f.end_of_input();
        assert!(f.next_finished().is_none());
    }

    /// Answers (counting what it sent) while `accept` is true.
    struct Replies {
        accept: std::sync::atomic::AtomicBool,
        sent: Mutex<Vec<u64>>,
    }

    impl Direct for Arc<Replies> {
        fn try_reply(&self, req: &RequestHeader, _begun: u64, _buf: &mut [u8]) -> bool {
            let ok = self.accept.load(std::sync::atomic::Ordering::SeqCst);
            if ok {
                self.sent.lock().unwrap().push(req.cookie);
            }
            ok
        }
    }

    fn with_direct(limit: usize, accept: bool) -> (Arc<Flight>, Arc<Replies>) {
        let f = Arc::new(Flight::new(limit));
        let r = Arc::new(Replies {
            accept: accept.into(),
            sent: Mutex::new(Vec::new()),
        });
        f.set_direct(Box::new(r.clone()));
        (f, r)
    }

    #[test]
    fn a_reply_sent_by_the_callback_frees_its_slot_and_queues_nothing() {
        let (f, r) = with_direct(1, true);
        let a = f.reserve().unwrap();
        f.arm(a.slot, req(5), 0);
        f.complete(a.slot, vec![9; 8], Ok(()));
        assert_eq!(*r.sent.lock().unwrap(), vec![5]);
        // The slot is free again, with the request's buffer as its spare.
        let b = f.reserve().unwrap();
        assert_eq!((b.slot, b.buf[0]), (a.slot, 9));
        f.release(b);
        f.end_of_input();
        assert!(f.next_finished().is_none(), "nothing was queued");
    }

    #[test]
    fn declined_replies_and_failures_go_to_the_sender() {
        let (f, r) = with_direct(2, false);
        let a = f.reserve().unwrap();
        let b = f.reserve().unwrap();
        f.arm(a.slot, req(1), 0);
        f.arm(b.slot, req(2), 0);
        f.complete(a.slot, Vec::new(), Ok(()));
        r.accept.store(true, std::sync::atomic::Ordering::SeqCst);
        f.complete(b.slot, Vec::new(), Err(BlockError::errno(Errno::EIO)));
        assert!(r.sent.lock().unwrap().is_empty());
        let x = f.next_finished().unwrap();
        let y = f.next_finished().unwrap();
        assert_eq!((x.req.cookie, y.req.cookie), (1, 2));
        assert!(y.result.is_err());
    }

    #[test]
    fn the_sender_ends_when_the_callback_answers_the_last_request() {
        let (f, _r) = with_direct(1, true);
        let a = f.reserve().unwrap();
        f.arm(a.slot, req(3), 0);
        f.end_of_input();
        let f2 = f.clone();
        let sender = std::thread::spawn(move || f2.next_finished().is_none());
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!sender.is_finished(), "a request is still in flight");
        f.complete(a.slot, Vec::new(), Ok(()));
        assert!(
            sender.join().unwrap(),
            "the sender ends, having answered nothing"
        );
    }

    #[test]
    fn disabled_reserves_nothing() {
        let f = Flight::new(1);
        let _held = f.reserve().unwrap();
        f.disable();
        assert!(f.reserve().is_none());
    }
}
