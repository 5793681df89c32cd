//! Asynchronous requests: an optional capability of a [`Handle`] whose backend completes
//! requests by callback (librbd's `rbd_aio_*`), so that the server's thread submits a request
//! and goes on reading the next one instead of waiting for it.
//!
//! The synchronous methods of [`Handle`] stay the contract every backend fulfils; this is an
//! addition beside them, asked per request. A handle offers it through [`Handle::aio`]; the
//! export policy ([`crate::export::Export::submit`]) decides per request whether it may be
//! used: only when the request passes every check of the synchronous path, the thread model
//! is parallel (no lock of the export held around the call), and nothing the policy adds
//! after the plugin's call is needed (FUA emulated by a flush, zero emulated by writes). Any
//! other request is declined and runs synchronously, exactly as before. A filter is a layer
//! that sees every call, so a filtered stack offers no asynchronous path (its handle answers
//! `None`): filters keep the synchronous path unchanged.
//!
//! **Ownership instead of borrowing.** The data buffer of a request is moved into the
//! submission and handed back, with the request's tag and result, to the [`AioSink`] when the
//! request finishes. While in flight the caller cannot touch it, so a buffer can never be
//! reused or freed under the backend; moving a `Vec` allocates nothing, and the caller
//! recycles the buffer it gets back.

use std::sync::Arc;

use crate::error::{BlockError, Result};
use crate::plugin::Flags;

/// What an asynchronous request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AioKind {
    /// Fill `count` bytes of the buffer at `at` from `offset`.
    Read,
    /// Write `count` bytes of the buffer from `at` to `offset`; flags may hold FUA.
    Write,
    /// Make every completed write durable.
    Flush,
    /// Discard `[offset, offset+count)`; flags may hold FUA.
    Trim,
    /// Zero `[offset, offset+count)`; flags may hold MAY_TRIM, FUA and FAST_ZERO.
    Zero,
}

/// One asynchronous request, as the plugin sees it (the export's checks already done).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AioRequest {
    pub kind: AioKind,
    pub offset: u64,
    pub count: u64,
    /// Where in the buffer the data starts (read and write).
    pub at: usize,
    pub flags: Flags,
}

/// Where finished asynchronous requests are reported.
pub trait AioSink: Send + Sync + 'static {
    /// Called exactly once for every request that was submitted, with the tag it was
    /// submitted with, its buffer and its result (an error keeps the errno and message the
    /// synchronous call would have given). Called on any thread, often the backend's own
    /// callback thread: it must not block for long, and must not call into the backend.
    fn complete(&self, tag: usize, buf: Vec<u8>, result: Result<()>);
}

/// Why a submission did not happen; the buffer comes back in either case.
#[derive(Debug)]
pub enum Declined {
    /// This request is not taken asynchronously: run it with the synchronous methods.
    Sync(Vec<u8>),
    /// The backend refused it at submission (the sink will not be called): this is the
    /// request's result.
    Failed(Vec<u8>, BlockError),
}

/// The asynchronous capability of a handle.
pub trait AioHandle: Send + Sync {
    /// True if `req` can be submitted as one asynchronous request whose completion is its
    /// whole result. A request that needs more (a flush after it, a split, a check that
    /// fails) answers false and runs synchronously.
    fn can_submit(&self, req: &AioRequest) -> bool;

    /// Submits `req` with `buf` (at least `req.at + req.count` bytes for read and write).
    /// On `Ok` the request is in flight and `sink.complete(tag, buf, result)` will be called
    /// once; on `Err` nothing was submitted.
    fn submit(
        &self,
        req: &AioRequest,
        buf: Vec<u8>,
        sink: &Arc<dyn AioSink>,
        tag: usize,
    ) -> std::result::Result<(), Declined>;
}
