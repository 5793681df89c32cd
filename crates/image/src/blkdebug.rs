//! qemu's `blkdebug` driver: error injection between a format node and its file.
//!
//! In qemu, blkdebug is a protocol-level node (`raw`/`qcow2` → `blkdebug` → `file`) with
//! rules: an `inject-error` rule becomes *active* when its event happens (an event is raised
//! by the format node above, `read_aio` before each data read, `write_aio` before each data
//! write, `flush_to_disk` before a flush), and an active rule fails every later request on
//! the node that touches its sector (`-1`: any) and is of one of its I/O types, until the next
//! event that has inject rules replaces the active set. `once` removes the rule after its
//! first failure. `set-state` rules move a state number (1 at the start) on events, and a rule
//! with a `state` only acts in that state. [`Blkdebug`] is that state machine, a pure value
//! behind one mutex, decided in one place so that it can be unit-tested without files.
//!
//! It sits in the image crate, as a storage object ([`DebugStorage`]) wrapped around the
//! file node's, because sluice's format nodes read their file through imago's storage: a
//! `raw` or `qcow2` node over a blkdebug node reads through the wrapper, and so does every
//! job that reads such a node (stream, commit, mirror, backup), which is what job error tests
//! need. A format node's data reads and writes raise `read_aio` / `write_aio` ([`raise`],
//! called from the node's data path) and its flushes `flush_to_disk`; its metadata I/O raises
//! nothing (qemu raises other events there, such as `l2_load`, which sluice does not have)
//! but, as in qemu, fails while a matching rule is active. The blkdebug node's own requests
//! (an export of the blkdebug node itself) raise nothing, as in qemu, where no format node
//! above means no events.

use std::path::{Path, PathBuf};

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::storage::drivers::CommonStorageHelper;
use imago::storage::PreallocateMode;
use parking_lot::Mutex;

use crate::node::Storage;

/// The blkdebug events sluice raises (qemu's `BlkdebugEvent` members of the same name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebugEvent {
    ReadAio,
    WriteAio,
    FlushToDisk,
}

/// The kinds of request a rule applies to (qemu's `BlkdebugIOType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoType {
    Read,
    Write,
    WriteZeroes,
    Discard,
    Flush,
}

impl IoType {
    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A set of [`IoType`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoTypes(u8);

impl IoTypes {
    /// Every type (qemu's default when `iotype` is not given).
    pub const ALL: IoTypes = IoTypes(0x1f);

    pub fn only(t: IoType) -> IoTypes {
        IoTypes(t.bit())
    }

    fn contains(self, t: IoType) -> bool {
        self.0 & t.bit() != 0
    }
}

/// One `inject-error` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectRule {
    pub event: DebugEvent,
    /// Acts only in this state (None: any).
    pub state: Option<i64>,
    /// The errno the failed request gets (qemu's default EIO).
    pub errno: i32,
    /// The byte offset whose requests fail (`sector * 512`); None for any request.
    pub offset: Option<u64>,
    /// Removed after its first failure.
    pub once: bool,
    pub iotypes: IoTypes,
}

impl InjectRule {
    /// A rule with qemu's defaults: EIO, any sector, every I/O type, not once, any state.
    pub fn new(event: DebugEvent) -> InjectRule {
        InjectRule {
            event,
            state: None,
            errno: libc::EIO,
            offset: None,
            once: false,
            iotypes: IoTypes::ALL,
        }
    }
}

/// One `set-state` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetStateRule {
    pub event: DebugEvent,
    /// Acts only in this state (None: any).
    pub state: Option<i64>,
    pub new_state: i64,
}

/// The rules of one blkdebug node and where they stand (see the module doc).
#[derive(Debug)]
pub struct Blkdebug {
    inner: Mutex<Rules>,
}

#[derive(Debug)]
struct Rules {
    state: i64,
    /// Rules by id (a removed `once` rule leaves `None`), in the order given.
    inject: Vec<Option<InjectRule>>,
    set_state: Vec<SetStateRule>,
    /// Ids of the active inject rules, the one checked first at the front.
    active: Vec<usize>,
}

impl Blkdebug {
    pub fn new(inject: Vec<InjectRule>, set_state: Vec<SetStateRule>) -> Blkdebug {
        Blkdebug {
            inner: Mutex::new(Rules {
                state: 1,
                inject: inject.into_iter().map(Some).collect(),
                set_state,
                active: Vec::new(),
            }),
        }
    }

    /// The current state number.
    pub fn state(&self) -> i64 {
        self.inner.lock().state
    }

    /// An event happened: as qemu's `blkdebug_debug_event`, rules of the event in the current
    /// state act, in the reverse order of their definition (qemu keeps each event's rules in
    /// a list it inserts at the head of); the first inject rule that acts replaces the active
    /// set, each one is put at its front; a set-state rule sets the state the event leaves.
    pub fn event(&self, event: DebugEvent) {
        let mut r = self.inner.lock();
        let state = r.state;
        let in_state = |s: Option<i64>| s.is_none_or(|s| s == state);
        let mut new_state = state;
        let mut injected = false;
        let mut active = std::mem::take(&mut r.active);
        for id in (0..r.inject.len()).rev() {
            let Some(rule) = &r.inject[id] else { continue };
            if rule.event == event && in_state(rule.state) {
                if !injected {
                    active.clear();
                    injected = true;
                }
                active.insert(0, id);
            }
        }
        for rule in r.set_state.iter().rev() {
            if rule.event == event && in_state(rule.state) {
                new_state = rule.new_state;
            }
        }
        r.active = active;
        r.state = new_state;
    }

    /// A request of type `t` on `[offset, offset+len)`: the errno it fails with, if an active
    /// rule matches (qemu's `rule_check`; `len` 0, a flush, only matches rules of any sector).
    pub fn check(&self, t: IoType, offset: u64, len: u64) -> Option<i32> {
        let mut r = self.inner.lock();
        let Rules { inject, active, .. } = &mut *r;
        let pos = active.iter().position(|&id| {
            inject[id].as_ref().is_some_and(|rule| {
                let hit = match rule.offset {
                    None => true,
                    Some(o) => len > 0 && o >= offset && o < offset + len,
                };
                hit && rule.iotypes.contains(t)
            })
        })?;
        let id = active[pos];
        let rule = inject[id].as_ref()?;
        let errno = rule.errno;
        if errno == 0 {
            return None;
        }
        if rule.once {
            active.remove(pos);
            inject[id] = None;
        }
        Some(errno)
    }
}

/// Raises `event` on the blkdebug node behind `storage`, if it is one seen from a format
/// node above: the node's data path calls this before a data read (`read_aio`) or write
/// (`write_aio`), so that metadata I/O, as in qemu, only meets rules already active.
pub(crate) fn raise(storage: &Storage, event: DebugEvent) {
    let any: &dyn std::any::Any = &**storage;
    if let Some(d) = any.downcast_ref::<DebugStorage>() {
        if d.raises {
            d.rules.event(event);
        }
    }
}

/// A file's storage seen through a blkdebug node: requests are checked against the active
/// rules; `raises` says whether they also raise the events a format node above raises.
#[derive(Debug)]
pub(crate) struct DebugStorage {
    inner: Storage,
    rules: std::sync::Arc<Blkdebug>,
    raises: bool,
}

impl DebugStorage {
    pub(crate) fn new(inner: Storage, rules: std::sync::Arc<Blkdebug>, raises: bool) -> Self {
        DebugStorage {
            inner,
            rules,
            raises,
        }
    }

    fn gate(
        &self,
        event: Option<DebugEvent>,
        t: IoType,
        offset: u64,
        len: u64,
    ) -> std::io::Result<()> {
        if let (true, Some(e)) = (self.raises, event) {
            self.rules.event(e);
        }
        match self.rules.check(t, offset, len) {
            Some(errno) => Err(std::io::Error::from_raw_os_error(errno)),
            None => Ok(()),
        }
    }
}

impl std::fmt::Display for DebugStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "blkdebug:{}", self.inner)
    }
}

impl imago::Storage for DebugStorage {
    crate::storage::forward_storage_geometry!();

    unsafe fn pure_readv(&self, bufv: IoVectorMut<'_>, offset: u64) -> std::io::Result<()> {
        self.gate(None, IoType::Read, offset, bufv.len())?;
        // SAFETY: the caller's alignment guarantee is passed on unchanged.
        unsafe { self.inner.pure_readv(bufv, offset) }
    }

    unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> std::io::Result<()> {
        self.gate(None, IoType::Write, offset, bufv.len())?;
        // SAFETY: the caller's alignment guarantee is passed on unchanged.
        unsafe { self.inner.pure_writev(bufv, offset) }
    }

    unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> std::io::Result<()> {
        self.gate(None, IoType::WriteZeroes, offset, length)?;
        // SAFETY: the caller's alignment guarantee is passed on unchanged.
        unsafe { self.inner.pure_write_zeroes(offset, length) }
    }

    unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> std::io::Result<()> {
        self.gate(None, IoType::WriteZeroes, offset, length)?;
        // SAFETY: the caller's alignment guarantee is passed on unchanged.
        unsafe { self.inner.pure_write_allocated_zeroes(offset, length) }
    }

    unsafe fn pure_discard(&self, offset: u64, length: u64) -> std::io::Result<()> {
        self.gate(None, IoType::Discard, offset, length)?;
        // SAFETY: the caller's alignment guarantee is passed on unchanged.
        unsafe { self.inner.pure_discard(offset, length) }
    }

    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }

    fn sync(&self) -> std::io::Result<()> {
        // qemu: the format node's flush raises flush_to_disk, then flushes the blkdebug node.
        self.gate(Some(DebugEvent::FlushToDisk), IoType::Flush, 0, 0)?;
        self.inner.sync()
    }

    fn settle_writes(&self) -> std::io::Result<()> {
        self.inner.settle_writes()
    }

    unsafe fn invalidate_cache(&self) -> std::io::Result<()> {
        // SAFETY: the caller's guarantee (on-disk state consistent) is passed on.
        unsafe { self.inner.invalidate_cache() }
    }

    fn get_storage_helper(&self) -> &CommonStorageHelper {
        self.inner.get_storage_helper()
    }

    fn resize(&self, new_size: u64, prealloc_mode: PreallocateMode) -> std::io::Result<()> {
        self.inner.resize(new_size, prealloc_mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(event: DebugEvent) -> InjectRule {
        InjectRule::new(event)
    }

    #[test]
    fn rule_is_inactive_until_its_event() {
        let b = Blkdebug::new(vec![rule(DebugEvent::ReadAio)], vec![]);
        assert_eq!(b.check(IoType::Read, 0, 512), None);
        b.event(DebugEvent::WriteAio);
        assert_eq!(b.check(IoType::Read, 0, 512), None);
        b.event(DebugEvent::ReadAio);
        assert_eq!(b.check(IoType::Read, 0, 512), Some(libc::EIO));
        // Active rules apply to every I/O type unless iotype says otherwise.
        assert_eq!(b.check(IoType::Write, 0, 512), Some(libc::EIO));
    }

    #[test]
    fn sector_rule_fails_only_requests_touching_it() {
        let mut r = rule(DebugEvent::ReadAio);
        r.offset = Some(8 * 512);
        r.errno = libc::ENOSPC;
        let b = Blkdebug::new(vec![r], vec![]);
        b.event(DebugEvent::ReadAio);
        assert_eq!(b.check(IoType::Read, 0, 4096), None);
        assert_eq!(b.check(IoType::Read, 4096, 1), Some(libc::ENOSPC));
        assert_eq!(b.check(IoType::Read, 0, 8192), Some(libc::ENOSPC));
        assert_eq!(b.check(IoType::Read, 4097, 10), None);
        // A flush has no range: only any-sector rules match it.
        assert_eq!(b.check(IoType::Flush, 0, 0), None);
    }

    #[test]
    fn once_rule_fails_one_request_then_is_gone() {
        let mut r = rule(DebugEvent::ReadAio);
        r.once = true;
        let b = Blkdebug::new(vec![r], vec![]);
        b.event(DebugEvent::ReadAio);
        assert_eq!(b.check(IoType::Read, 0, 512), Some(libc::EIO));
        assert_eq!(b.check(IoType::Read, 0, 512), None);
        b.event(DebugEvent::ReadAio);
        assert_eq!(b.check(IoType::Read, 0, 512), None);
    }

    #[test]
    fn iotype_limits_the_rule() {
        let mut r = rule(DebugEvent::ReadAio);
        r.iotypes = IoTypes::only(IoType::Write);
        let b = Blkdebug::new(vec![r], vec![]);
        b.event(DebugEvent::ReadAio);
        assert_eq!(b.check(IoType::Read, 0, 512), None);
        assert_eq!(b.check(IoType::Write, 0, 512), Some(libc::EIO));
    }

    #[test]
    fn next_event_with_rules_replaces_active_set() {
        let mut w = rule(DebugEvent::WriteAio);
        w.errno = libc::ENOSPC;
        let b = Blkdebug::new(vec![rule(DebugEvent::ReadAio), w], vec![]);
        b.event(DebugEvent::ReadAio);
        assert_eq!(b.check(IoType::Read, 0, 512), Some(libc::EIO));
        b.event(DebugEvent::WriteAio);
        assert_eq!(b.check(IoType::Read, 0, 512), Some(libc::ENOSPC));
        // An event without inject rules leaves the active set alone.
        b.event(DebugEvent::FlushToDisk);
        assert_eq!(b.check(IoType::Read, 0, 512), Some(libc::ENOSPC));
    }

    #[test]
    fn set_state_gates_rules_by_state() {
        let mut r = rule(DebugEvent::ReadAio);
        r.state = Some(2);
        let b = Blkdebug::new(
            vec![r],
            vec![SetStateRule {
                event: DebugEvent::WriteAio,
                state: Some(1),
                new_state: 2,
            }],
        );
        b.event(DebugEvent::ReadAio);
        assert_eq!(b.check(IoType::Read, 0, 512), None);
        b.event(DebugEvent::WriteAio);
        assert_eq!(b.state(), 2);
        b.event(DebugEvent::ReadAio);
        assert_eq!(b.check(IoType::Read, 0, 512), Some(libc::EIO));
    }

    #[test]
    fn first_defined_rule_is_checked_first() {
        let mut a = rule(DebugEvent::ReadAio);
        a.errno = libc::ENOSPC;
        let b = Blkdebug::new(vec![a, rule(DebugEvent::ReadAio)], vec![]);
        b.event(DebugEvent::ReadAio);
        assert_eq!(b.check(IoType::Read, 0, 512), Some(libc::ENOSPC));
    }
}
