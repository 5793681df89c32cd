//! Events: encoded once, delivered to every negotiated monitor.
//!
//! An event is turned into its wire line (with the output policy and a wall-clock timestamp)
//! when it is emitted, and the same bytes go to every monitor through a bounded broadcast
//! channel. A monitor subscribes when its capabilities negotiation completes, so monitors in
//! negotiation mode get no events, as the QMP spec requires. Events a command causes are
//! written by the issuing monitor before that command's reply (the monitor drains its
//! subscription first), matching what qemu-storage-daemon does for `block-export-del`.
//!
//! Every event gets a sequence number, assigned in channel order. A command records the last
//! number when it finishes (still holding the daemon's lock), and its monitor writes only
//! events up to that number before the reply: so events a background job emits after the
//! command (a fast stream's `waiting`, `pending`, ...) come after the `return`, as in qsd,
//! even when they are already queued when the monitor writes.
//!
//! The channel holds [`CAPACITY`] events; a monitor whose client stops reading for that long
//! loses the oldest ones (and the daemon logs it) rather than making the daemon buffer without
//! limit.

use std::sync::{Arc, Mutex};

use sluice_proto::qmp::{encode_event, Timestamp};
use tokio::sync::broadcast;

use crate::generated::EVENTS;
use sluice_qapi::runtime::{Output, QapiEvent};

/// Events buffered per monitor before the oldest are dropped.
pub const CAPACITY: usize = 1024;

/// One emitted event, ready to write.
#[derive(Debug)]
pub struct EventMsg {
    pub name: &'static str,
    /// Position in the daemon's event order (the first event is 1).
    pub seq: u64,
    /// The whole line, CRLF included.
    pub bytes: Vec<u8>,
}

/// The daemon's event channel.
#[derive(Debug)]
pub struct EventBus {
    tx: broadcast::Sender<Arc<EventMsg>>,
    output: Output,
    /// The last sequence number given; held while sending, so channel order is seq order.
    seq: Mutex<u64>,
}

impl EventBus {
    pub fn new(output: Output) -> EventBus {
        let (tx, _) = broadcast::channel(CAPACITY);
        EventBus {
            tx,
            output,
            seq: Mutex::new(0),
        }
    }

    /// Sends `event` to every subscribed monitor (none is an error: events are not queued for
    /// monitors that do not exist yet). Events marked deprecated or unstable are dropped when
    /// the output policy hides them.
    pub fn emit<E: QapiEvent>(&self, event: &E) {
        let features = EVENTS
            .iter()
            .find(|d| d.name == E::NAME)
            .map(|d| d.features)
            .unwrap_or_default();
        if self.output.hides(features) {
            return;
        }
        let data = event.data(&self.output);
        let mut bytes = Vec::new();
        encode_event(E::NAME, data.as_ref(), now(), &mut bytes);
        tracing::debug!(event = E::NAME, "event");
        let mut seq = self.seq.lock().unwrap_or_else(|e| e.into_inner());
        *seq += 1;
        let _ = self.tx.send(Arc::new(EventMsg {
            name: E::NAME,
            seq: *seq,
            bytes,
        }));
    }

    /// The sequence number of the last event emitted (0 if none).
    pub fn last_seq(&self) -> u64 {
        *self.seq.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<EventMsg>> {
        self.tx.subscribe()
    }
}

/// Wall-clock time as QMP timestamps it.
pub fn now() -> Timestamp {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => Timestamp {
            seconds: d.as_secs() as i64,
            microseconds: d.subsec_micros() as i64,
        },
        Err(_) => Timestamp::UNKNOWN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generated::BlockExportDeletedEvent;

    #[test]
    fn emit_reaches_subscribers_as_one_crlf_line() {
        let bus = EventBus::new(Output::default());
        let mut rx = bus.subscribe();
        bus.emit(&BlockExportDeletedEvent { id: "e0".into() });
        let m = rx.try_recv().unwrap();
        assert_eq!(m.name, "BLOCK_EXPORT_DELETED");
        let line = String::from_utf8(m.bytes.clone()).unwrap();
        assert!(
            line.starts_with("{\"event\": \"BLOCK_EXPORT_DELETED\", \"data\": {\"id\": \"e0\"}, \"timestamp\": {\"seconds\": "),
            "{line}"
        );
        assert!(line.ends_with("}}\r\n"), "{line}");
    }

    #[test]
    fn emit_without_subscribers_is_dropped() {
        let bus = EventBus::new(Output::default());
        bus.emit(&BlockExportDeletedEvent { id: "e0".into() });
        let mut rx = bus.subscribe();
        assert!(rx.try_recv().is_err());
    }
}
