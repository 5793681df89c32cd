//! sluice's protocol crate: wire formats as pure code.
//!
//! Bytes go in, typed values come out; typed values go in, bytes come out. Nothing here owns
//! a socket, a thread or a clock, so every parser can be unit-tested with byte strings and
//! fuzzed (see `fuzz/`). The server crate moves the bytes. [`nbd`] is the Network Block
//! Device protocol; [`qmp`] is the QEMU Machine Protocol the management daemon speaks.

pub mod nbd;
pub mod qmp;
