//! Fuzzes transmission reply encoding and decoding in all three reply forms.
//!
//! Round trip: the input picks a form and then a run of requests and outcomes; each reply is
//! written with `ReplyForm` and read back with `decode_reply`, and what comes back must be
//! what the spec says that reply is, restated here rather than asked of the writer: a simple
//! reply or the right chunk type, the request's cookie, the request offset in extended headers
//! only, `NBD_REPLY_FLAG_DONE` on exactly the final chunk, and the fields (data length, hole
//! ranges, extents after the compact 32-bit cap, error code, message cut at 4096 bytes).
//!
//! Raw decoding: the same input is also decoded as a reply stream in every form. Properties:
//! no panic, and a decoded reply never claims more bytes than it was given.
#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use sluice_proto::nbd::consts::*;
use sluice_proto::nbd::reply::{
    decode_reply, Chunk, ChunkPayload, Reply, ReplyForm, MAX_COMPACT_EXTENT,
};
use sluice_proto::nbd::RequestHeader;

const FORMS: [ReplyForm; 3] = [
    ReplyForm::Simple,
    ReplyForm::Structured,
    ReplyForm::Extended,
];

fuzz_target!(|data: &[u8]| {
    for form in FORMS {
        decode_raw(data, form);
    }
    let _ = round_trips(&mut Unstructured::new(data));
});

fn decode_raw(mut buf: &[u8], form: ReplyForm) {
    while let Ok(Some((reply, used))) = decode_reply(buf, form) {
        assert!(used > 0 && used <= buf.len());
        buf = &buf[used..];
        if let Reply::Chunk(Chunk { payload, .. }) = reply {
            match payload {
                ChunkPayload::OffsetData { data_len, .. } => {
                    let skip = data_len.min(buf.len() as u64) as usize;
                    buf = &buf[skip..];
                }
                ChunkPayload::BlockStatus(p) => assert_eq!(p.extents().count(), p.len()),
                _ => {}
            }
        }
    }
}

fn round_trips(u: &mut Unstructured) -> Result<()> {
    let form = *u.choose(&FORMS)?;
    while !u.is_empty() {
        round_trip(u, form)?;
    }
    Ok(())
}

fn round_trip(u: &mut Unstructured, form: ReplyForm) -> Result<()> {
    let mut req = RequestHeader {
        flags: u.arbitrary()?,
        kind: u.arbitrary()?,
        cookie: u.arbitrary()?,
        offset: u.arbitrary()?,
        length: u.arbitrary()?,
    };
    if !form.is_extended() {
        // A compact chunk's 32-bit length must hold the data and its offset field.
        req.length %= u64::from(u32::MAX - 8) + 1;
    }
    let mut out = Vec::new();
    match u.int_in_range(0..=4u8)? {
        0 => {
            form.success(&mut out, &req);
            let expected = if form.is_extended() {
                vec![Expected::Final(Want::None)]
            } else {
                vec![Expected::Simple(NBD_OK)]
            };
            check(&out, form, &req, &expected);
        }
        1 => {
            req.length = req.length.min(u64::MAX - 8);
            form.read_data(&mut out, &req);
            assert_eq!(out.len(), form.read_header_len());
            let expected = if form.is_structured() {
                Expected::Final(Want::Data {
                    offset: req.offset,
                    data_len: req.length,
                })
            } else {
                Expected::Simple(NBD_OK)
            };
            check(&out, form, &req, &[expected]);
        }
        2 if form.can_reply_hole() => {
            // At most 16 chunks: a longer hole is only more of the same.
            req.length = 1 + req.length % (16 * u64::from(MAX_COMPACT_EXTENT));
            form.read_hole(&mut out, &req);
            check_hole(&out, form, &req);
        }
        3 if form.is_structured() => {
            let context_id: u32 = u.arbitrary()?;
            let count = u.int_in_range(1..=64usize)?;
            let mut extents = Vec::with_capacity(count);
            for _ in 0..count {
                let len: u64 = u.arbitrary()?;
                extents.push((len.max(1), u.arbitrary::<u32>()?));
            }
            let last: bool = u.arbitrary()?;
            form.block_status(&mut out, &req, context_id, extents.iter().copied(), last);
            let wanted: Vec<(u64, u64)> = if form.is_extended() {
                extents.iter().map(|&(l, s)| (l, u64::from(s))).collect()
            } else {
                // Capped at the first extent over 32 bits, which becomes the last.
                let n = extents
                    .iter()
                    .position(|&(l, _)| l > u64::from(u32::MAX))
                    .map_or(extents.len(), |i| i + 1);
                extents[..n]
                    .iter()
                    .map(|&(l, s)| {
                        let l = if l > u64::from(u32::MAX) {
                            u64::from(MAX_COMPACT_EXTENT)
                        } else {
                            l
                        };
                        (l, u64::from(s))
                    })
                    .collect()
            };
            let want = Want::BlockStatus {
                context_id,
                extended: form.is_extended(),
                extents: wanted,
            };
            let expected = if last {
                Expected::Final(want)
            } else {
                Expected::More(want)
            };
            check(&out, form, &req, &[expected]);
        }
        _ => {
            let error = u.int_in_range(1..=u32::MAX)?;
            let message: &str = u.arbitrary()?;
            form.error(&mut out, &req, error, message);
            // The spec's rule, restated: a chunk under extended headers, and with structured
            // replies for a read or block status; otherwise a simple reply with the code.
            let chunk = form.is_extended()
                || (form.is_structured()
                    && matches!(req.kind, NBD_CMD_READ | NBD_CMD_BLOCK_STATUS));
            let expected = if chunk {
                Expected::Final(Want::Error {
                    error,
                    message: truncated(message, NBD_MAX_STRING).to_owned(),
                })
            } else {
                Expected::Simple(error)
            };
            check(&out, form, &req, &[expected]);
        }
    }
    Ok(())
}

/// One reply message as the spec says it must decode.
#[derive(Debug)]
enum Expected {
    Simple(u32),
    /// A chunk with `NBD_REPLY_FLAG_DONE`.
    Final(Want),
    /// A chunk without it.
    More(Want),
}

#[derive(Debug, PartialEq)]
enum Want {
    None,
    Data {
        offset: u64,
        data_len: u64,
    },
    Hole {
        offset: u64,
        length: u32,
    },
    BlockStatus {
        context_id: u32,
        extended: bool,
        extents: Vec<(u64, u64)>,
    },
    Error {
        error: u32,
        message: String,
    },
}

fn check(mut out: &[u8], form: ReplyForm, req: &RequestHeader, expected: &[Expected]) {
    for e in expected {
        let (reply, used) = decode_reply(out, form)
            .expect("the writer's output decodes")
            .expect("the writer's output is complete");
        out = &out[used..];
        match (e, reply) {
            (Expected::Simple(error), Reply::Simple { cookie, error: got }) => {
                assert_eq!(cookie, req.cookie);
                assert_eq!(got, *error);
            }
            (Expected::Final(want) | Expected::More(want), Reply::Chunk(chunk)) => {
                assert_eq!(chunk.cookie, req.cookie);
                assert_eq!(
                    chunk.request_offset,
                    form.is_extended().then_some(req.offset)
                );
                assert_eq!(chunk.is_done(), matches!(e, Expected::Final(_)));
                assert_eq!(chunk.flags & !NBD_REPLY_FLAG_DONE, 0);
                assert_eq!(&got(chunk.payload), want);
            }
            (e, reply) => panic!("expected {e:?}, decoded {reply:?}"),
        }
    }
    assert!(out.is_empty(), "{} bytes written past the reply", out.len());
}

fn check_hole(mut out: &[u8], form: ReplyForm, req: &RequestHeader) {
    let mut covered = 0u64;
    while covered < req.length {
        let (reply, used) = decode_reply(out, form).unwrap().unwrap();
        out = &out[used..];
        let Reply::Chunk(chunk) = reply else {
            panic!("hole as simple reply");
        };
        let Want::Hole { offset, length } = got(chunk.payload) else {
            panic!("hole chunk decoded as {:?}", chunk.payload);
        };
        assert_eq!(chunk.cookie, req.cookie);
        assert_eq!(offset, req.offset.wrapping_add(covered));
        assert!(length > 0);
        covered += u64::from(length);
        assert_eq!(chunk.is_done(), covered == req.length);
    }
    assert_eq!(covered, req.length);
    assert!(out.is_empty());
}

fn got(payload: ChunkPayload) -> Want {
    match payload {
        ChunkPayload::None => Want::None,
        ChunkPayload::OffsetData { offset, data_len } => Want::Data { offset, data_len },
        ChunkPayload::OffsetHole { offset, length } => Want::Hole { offset, length },
        ChunkPayload::BlockStatus(p) => Want::BlockStatus {
            context_id: p.context_id,
            extended: p.extended,
            extents: p.extents().collect(),
        },
        ChunkPayload::Error { error, message } => Want::Error {
            error,
            message: message.to_owned(),
        },
        other => panic!("the writer never sends {other:?}"),
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
fn truncated(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
