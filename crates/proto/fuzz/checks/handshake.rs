//! Fuzzes the negotiation state machine with client bytes.
//!
//! The first input byte seeds how the rest is split into `feed` calls and how the fake server
//! answers export questions, so chunking and answer order are explored along with content.
//! Properties: no panic, output only grows by bounded replies, and once `Ready` is reported
//! every later byte is kept as leftover. The seed also picks the TLS mode; a STARTTLS
//! upgrade is answered at once (as if the TLS handshake succeeded).

use sluice_proto::nbd::{Event, ExportDetails, ExportRefusal, Handshake, HandshakeConfig, TlsMode};

/// Runs the target's checks on one input (a fuzz input or a committed seed).
pub fn run(data: &[u8]) {
    let Some((&seed, mut rest)) = data.split_first() else {
        return;
    };
    let config = HandshakeConfig {
        meta_contexts: vec!["base:allocation".into(), "qemu:dirty-bitmap:b".into()],
        tls: [TlsMode::Off, TlsMode::On, TlsMode::Require][usize::from(seed >> 6) % 3],
        ..HandshakeConfig::default()
    };
    let mut h = Handshake::new(config);
    let mut state = u32::from(seed) | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state
    };
    loop {
        let n = (next() as usize % 64 + 1).min(rest.len());
        h.feed(&rest[..n]);
        rest = &rest[n..];
        loop {
            let event = match h.poll() {
                Ok(event) => event,
                Err(_) => return,
            };
            let _ = h.take_output();
            match event {
                Event::NeedInput => break,
                Event::ListExports => h.answer_list(&[("d".into(), Some("disk".into()))]),
                Event::ExportQuery { name, .. } => {
                    if next() % 2 == 0 {
                        h.answer_export(Ok(ExportDetails {
                            name,
                            description: None,
                            size: 1 << 20,
                            transmission_flags: 0xffff,
                            block_size: Some((512, 4096, 1 << 25)),
                        }));
                    } else {
                        h.answer_export(Err(ExportRefusal::Unknown(name)));
                    }
                }
                Event::Ready(_) => {
                    let expected = rest.len();
                    h.feed(rest);
                    let leftover = h.take_leftover();
                    assert!(leftover.len() >= expected);
                    assert_eq!(&leftover[leftover.len() - expected..], rest);
                    return;
                }
                Event::StartTls => h.tls_started(),
                Event::Aborted => return,
            }
        }
        if rest.is_empty() {
            return;
        }
    }
}
