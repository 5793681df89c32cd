//! Fuzzes the QMP JSON stream reader and the command check: arbitrary bytes, fed in two
//! pieces split at an arbitrary point, must never panic, and every value it yields must
//! survive the command check and re-encoding.

use sluice_proto::qmp::{parse_request, write_value, JsonStream, Limits};

/// Runs the target's checks on one input (a fuzz input or a committed seed).
pub fn run(data: &[u8]) {
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let cut = (cut as usize).min(rest.len());
    let limits = Limits {
        max_bytes: 4096,
        max_tokens: 512,
        max_depth: 64,
    };
    let mut stream = JsonStream::new(limits);
    let mut out = Vec::new();
    stream.feed(&rest[..cut], &mut out);
    stream.feed(&rest[cut..], &mut out);
    stream.finish(&mut out);
    let mut buf = Vec::new();
    for v in out.into_iter().flatten() {
        write_value(&v, &mut buf);
        let _ = parse_request(v, true);
    }
}
