//! QMP, the QEMU Machine Protocol: its wire format as pure code.
//!
//! [`json`] turns a byte stream into JSON values the way QEMU's JSON streamer does (objects
//! split across reads, several per line, single-quoted strings, per-message size, token and
//! nesting limits, recovery after garbage). [`wire`] checks a parsed value as a command
//! (`execute`/`exec-oob`, `arguments`, `id`) and encodes what a server sends: the greeting,
//! `return` and `error` replies, events, each one line of ASCII ending in CRLF.
//!
//! Nothing here knows about commands or schemas (the QMP crate does) or sockets (the daemon
//! does), so a monitor connection is: bytes in, [`json::JsonStream::feed`], for each value
//! [`wire::parse_request`], run it, [`wire::encode_return`] or [`wire::encode_error`], bytes out.

pub mod json;
pub mod wire;

pub use json::{JsonError, JsonStream, Limits};
pub use wire::{
    encode_error, encode_event, encode_greeting, encode_return, parse_request, write_value,
    BadRequest, ErrorClass, QmpError, Request, Timestamp,
};
