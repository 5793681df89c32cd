//! sluice's protocol crate: wire formats as pure code.
//!
//! Bytes go in, typed values come out; typed values go in, bytes come out. Nothing here owns
//! a socket, a thread or a clock, so every parser can be unit-tested with byte strings and
//! fuzzed (see `fuzz/`). The server crate moves the bytes.

pub mod nbd;
