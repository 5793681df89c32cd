//! The multi-conn filter (nbdkit-multi-conn-filter): decides whether NBD_FLAG_CAN_MULTI_CONN
//! is advertised, and can emulate it by replicating a flush on one connection to every
//! connection of the plugin.
//!
//! `multi-conn-mode`: `auto` (default: `plugin` if the plugin has multi-conn, `disable`
//! under the serialize-connections model, else `emulate`), `emulate`, `plugin`, `disable`,
//! `unsafe`. `multi-conn-track-dirty` (`conn`, `fast`, `off`) skips flushes that cannot
//! matter; `multi-conn-exportname=true` groups connections by export name. In emulate mode
//! native FUA is advertised as emulated (one flush of every connection beats a FUA that
//! only one connection would honour).
//!
//! The connections of a group are kept in a per-export list behind a mutex, each with the
//! handle of the layer below ([`Next::handle`]); a replicated flush takes a snapshot of the
//! list and flushes outside the lock. Dirty flags are atomics: as nbdkit notes, the NBD spec
//! makes a client wait for a flush before relying on it, so no ordering beyond that is owed.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::error::{BlockError, Errno, Result};
use crate::filter::{Filter, Next};
use crate::plugin::{Flags, Handle, OpenContext, Plugin, Support, ThreadModel};
use crate::plugins::ConfigArg;

use super::{bad, each_param, over, parse_bool, FilterEnv, FilterSpec};

pub const SPEC: FilterSpec = FilterSpec {
    name: "multi-conn",
    keys: &[
        "multi-conn-mode",
        "multi-conn-track-dirty",
        "multi-conn-exportname",
        "multi-conn-export-name",
    ],
    help: "multi-conn-mode=<MODE>          'auto' (default), 'emulate', 'plugin',\n\
           \x20                               'disable', or 'unsafe'.\n\
           multi-conn-track-dirty=<LEVEL>  'conn' (default), 'fast', or 'off'.\n\
           multi-conn-exportname=<BOOL>    true to limit emulation by export name.",
    open,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Auto,
    Emulate,
    Plugin,
    Disable,
    Unsafe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Track {
    Conn,
    Fast,
    Off,
}

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut mode = Mode::Auto;
    let mut track = Track::Conn;
    let mut byname = false;
    each_param(&SPEC, params, |k, v| {
        match k {
            "multi-conn-mode" => {
                mode = match v {
                    "auto" => Mode::Auto,
                    "emulate" => Mode::Emulate,
                    "plugin" => Mode::Plugin,
                    "disable" => Mode::Disable,
                    "unsafe" => Mode::Unsafe,
                    _ => {
                        return Err(bad(
                            "multi-conn",
                            k,
                            format!("unknown multi-conn mode '{v}'"),
                        ))
                    }
                }
            }
            "multi-conn-track-dirty" => {
                track = match v {
                    "connection" | "conn" => Track::Conn,
                    "fast" => Track::Fast,
                    "off" => Track::Off,
                    _ => {
                        return Err(bad(
                            "multi-conn",
                            k,
                            format!("unknown multi-conn track-dirty setting '{v}'"),
                        ))
                    }
                }
            }
            _ => byname = parse_bool("multi-conn", k, v)?,
        }
        Ok(())
    })?;
    Ok(over(
        MultiConn {
            mode,
            track,
            byname,
            groups: Mutex::default(),
        },
        inner,
    ))
}

const WRITE: u8 = 1;
const READ: u8 = 2;

/// One connection as its group sees it.
struct Member {
    handle: Arc<dyn Handle>,
    dirty: AtomicU8,
}

/// Connections that flush together.
#[derive(Default)]
struct Group {
    name: Option<String>,
    members: Mutex<Vec<Arc<Member>>>,
    dirty: AtomicBool,
}

pub struct MultiConn {
    mode: Mode,
    track: Track,
    byname: bool,
    groups: Mutex<Vec<Arc<Group>>>,
}

/// Per connection: its resolved mode, its membership, and its group.
pub struct Conn {
    mode: Mode,
    me: Arc<Member>,
    group: Arc<Group>,
}

impl MultiConn {
    fn mark(&self, c: &Conn, write: bool) {
        match self.track {
            Track::Conn => {
                c.me.dirty
                    .fetch_or(if write { WRITE } else { READ }, Ordering::Relaxed);
                if write {
                    c.group.dirty.store(true, Ordering::Relaxed);
                }
            }
            Track::Fast if write => c.group.dirty.store(true, Ordering::Relaxed),
            _ => {}
        }
    }

    /// Marks a write, or (emulate + FUA) strips FUA and says a flush must follow.
    fn before_write(&self, c: &Conn, f: Flags) -> (Flags, bool) {
        if f.contains(Flags::FUA) {
            if c.mode == Mode::Emulate {
                self.mark(c, true);
                return (f.without(Flags::FUA), true);
            }
            (f, false)
        } else {
            self.mark(c, true);
            (f, false)
        }
    }

    fn do_flush(&self, c: &Conn, next: &Next, f: Flags) -> Result<()> {
        let group_dirty = c.group.dirty.load(Ordering::Relaxed);
        if c.mode == Mode::Emulate {
            let members = c
                .group
                .members
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            for m in members {
                let d = m.dirty.load(Ordering::Relaxed);
                if self.track == Track::Off
                    || (group_dirty && (self.track == Track::Fast || d & READ != 0))
                    || d & WRITE != 0
                {
                    m.handle.flush(f)?;
                    m.dirty.store(0, Ordering::Relaxed);
                }
            }
            c.group.dirty.store(false, Ordering::Relaxed);
            return Ok(());
        }
        if self.track != Track::Off && !group_dirty {
            return Ok(());
        }
        next.flush(f)?;
        match self.track {
            Track::Conn => {
                if next.can_multi_conn()? {
                    let members = c
                        .group
                        .members
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    members
                        .iter()
                        .for_each(|m| m.dirty.store(0, Ordering::Relaxed));
                    c.group.dirty.store(false, Ordering::Relaxed);
                } else {
                    c.me.dirty.store(0, Ordering::Relaxed);
                }
            }
            Track::Fast => c.group.dirty.store(false, Ordering::Relaxed),
            Track::Off => {}
        }
        Ok(())
    }
}

impl Filter for MultiConn {
    type Conn = Conn;
    fn name(&self) -> &str {
        "multi-conn"
    }
    fn open(&self, plugin: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<(Conn, Next)> {
        let next = Next::open(plugin, ctx)?;
        let mode = match self.mode {
            Mode::Auto if plugin.thread_model() == ThreadModel::SerializeConnections => {
                Mode::Disable
            }
            Mode::Auto if next.can_multi_conn()? => Mode::Plugin,
            Mode::Auto => Mode::Emulate,
            m => m,
        };
        if mode == Mode::Emulate && !next.can_flush()? {
            return Err(BlockError::new(
                Errno::EINVAL,
                "multi-conn: emulating multi-conn requires working flush",
            ));
        }
        let me = Arc::new(Member {
            handle: next.handle()?,
            dirty: AtomicU8::new(0),
        });
        let name = self.byname.then(|| ctx.export_name.to_owned());
        let group = {
            let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
            let found = groups
                .iter()
                .find(|g| !self.byname || g.name == name)
                .cloned();
            found.unwrap_or_else(|| {
                let g = Arc::new(Group {
                    name,
                    ..Group::default()
                });
                groups.push(g.clone());
                g
            })
        };
        group
            .members
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(me.clone());
        Ok((Conn { mode, me, group }, next))
    }
    fn close(&self, c: &mut Conn, _: &Next) {
        let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        let mut members = c
            .group
            .members
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        members.retain(|m| !Arc::ptr_eq(m, &c.me));
        if members.is_empty() {
            groups.retain(|g| !Arc::ptr_eq(g, &c.group));
        }
    }
    fn can_fua(&self, c: &Conn, next: &Next) -> Result<Support> {
        let fua = next.can_fua()?;
        Ok(if fua == Support::Native && c.mode == Mode::Emulate {
            Support::Emulate
        } else {
            fua
        })
    }
    fn can_multi_conn(&self, c: &Conn, next: &Next) -> Result<bool> {
        match c.mode {
            Mode::Emulate | Mode::Unsafe => Ok(true),
            Mode::Disable => Ok(false),
            _ => next.can_multi_conn(),
        }
    }
    fn pread(&self, c: &Conn, next: &Next, buf: &mut [u8], off: u64, f: Flags) -> Result<()> {
        self.mark(c, false);
        next.pread(buf, off, f)
    }
    fn pwrite(&self, c: &Conn, next: &Next, buf: &[u8], off: u64, f: Flags) -> Result<()> {
        let (f, flush) = self.before_write(c, f);
        next.pwrite(buf, off, f)?;
        if flush {
            self.do_flush(c, next, Flags::NONE)?;
        }
        Ok(())
    }
    fn zero(&self, c: &Conn, next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        let (f, flush) = self.before_write(c, f);
        next.zero(n, off, f)?;
        if flush {
            self.do_flush(c, next, Flags::NONE)?;
        }
        Ok(())
    }
    fn trim(&self, c: &Conn, next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        let (f, flush) = self.before_write(c, f);
        next.trim(n, off, f)?;
        if flush {
            self.do_flush(c, next, Flags::NONE)?;
        }
        Ok(())
    }
    fn cache(&self, c: &Conn, next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        self.mark(c, false);
        next.cache(n, off, f)
    }
    fn flush(&self, c: &Conn, next: &Next, f: Flags) -> Result<()> {
        self.do_flush(c, next, f)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::super::test_support::*;
    use super::*;

    fn flushes(kv: &[(&str, &str)], multi: bool) -> (bool, Support, usize) {
        let flaky = Arc::new(Flaky {
            multi_conn: multi,
            ..Flaky::new()
        });
        let counter: Arc<AtomicUsize> = flaky.flushes.clone();
        let top = filter("multi-conn", kv, flaky);
        let a = export(top.clone(), false);
        let b = export(top.clone(), false);
        let _c = export(top, false);
        a.write(&[1; 512], 0, Flags::NONE).unwrap();
        b.write(&[1; 512], 0, Flags::NONE).unwrap();
        a.flush().unwrap();
        (
            a.caps().multi_conn,
            a.caps().fua,
            counter.load(Ordering::SeqCst),
        )
    }

    #[test]
    fn multi_conn_emulate_flushes_every_dirty_connection() {
        // Auto over a plugin without multi-conn emulates: a and b are dirty, c is not.
        assert_eq!(flushes(&[], false), (true, Support::Emulate, 2));
        assert_eq!(
            flushes(&[("multi-conn-track-dirty", "off")], false),
            (true, Support::Emulate, 3)
        );
    }

    #[test]
    fn multi_conn_plugin_and_disable_pass_one_flush() {
        assert_eq!(flushes(&[], true), (true, Support::Native, 1));
        assert_eq!(
            flushes(&[("multi-conn-mode", "disable")], true),
            (false, Support::Native, 1)
        );
        assert_eq!(
            flushes(&[("multi-conn-mode", "unsafe")], false),
            (true, Support::Native, 1)
        );
    }

    #[test]
    fn multi_conn_clean_connection_skips_flush() {
        let flaky = Arc::new(Flaky::new());
        let counter = flaky.flushes.clone();
        let e = export(
            filter("multi-conn", &[("multi-conn-mode", "plugin")], flaky),
            false,
        );
        e.flush().unwrap();
        assert_eq!(counter.load(Ordering::SeqCst), 0);
        assert!(config_error("multi-conn", &[("multi-conn-mode", "x")]).contains("unknown"));
    }
}
