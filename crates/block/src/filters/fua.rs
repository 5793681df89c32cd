//! The fua filter (nbdkit-fua-filter): changes how Forced Unit Access reaches the plugin.
//!
//! `fuamode=none` (the default) hides FUA; `emulate` advertises it and turns it into a flush
//! after the write; `native` advertises native FUA and passes the flag down; `force` sets FUA
//! on every write and makes flush a no-op; `pass` changes nothing; `discard` accepts FUA and
//! flush and drops both (unsafe). The flag is sent down through [`Lower`], so a plugin that
//! only emulates FUA still gets its flush, as nbdkit's plugin layer guarantees.
//!
//! nbdkit 1.32.5 rejects `fuamode=none` although its manual documents it (a parsing slip);
//! sluice accepts it, since it is the default the manual promises.

use std::sync::Arc;

use crate::error::{BlockError, Errno, Result};
use crate::filter::{Filter, Next};
use crate::plugin::{Flags, Handle, OpenContext, Plugin, Support};
use crate::plugins::ConfigArg;

use super::lower::Lower;
use super::{bad, each_param, over, FilterEnv, FilterSpec};

pub const SPEC: FilterSpec = FilterSpec {
    name: "fua",
    keys: &["fuamode"],
    help: "fuamode=<MODE>       One of 'none' (default), 'emulate', 'native',\n\
           \x20                      'force', 'pass'.",
    open,
};

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut mode = Mode::None;
    each_param(&SPEC, params, |k, v| {
        mode = match v {
            "none" => Mode::None,
            "emulate" => Mode::Emulate,
            "native" => Mode::Native,
            "force" => Mode::Force,
            "pass" => Mode::Pass,
            "discard" => Mode::Discard,
            _ => return Err(bad("fua", k, format!("unknown fuamode '{v}'"))),
        };
        Ok(())
    })?;
    Ok(over(Fua { mode }, inner))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    None,
    Emulate,
    Native,
    Force,
    Pass,
    Discard,
}

pub struct Fua {
    pub mode: Mode,
}

impl Fua {
    /// The flags for the layer below, and whether a flush must follow.
    fn flags(&self, f: Flags) -> (Flags, bool) {
        match self.mode {
            Mode::None | Mode::Native | Mode::Pass => (f, false),
            Mode::Emulate => (f.without(Flags::FUA), f.contains(Flags::FUA)),
            Mode::Force => (f | Flags::FUA, false),
            Mode::Discard => (f.without(Flags::FUA), false),
        }
    }

    /// fuamode=emulate: the flush that replaces the FUA flag.
    fn then_flush(next: &Next, flush: bool) -> Result<()> {
        if flush {
            next.flush(Flags::NONE)?;
        }
        Ok(())
    }
}

impl Filter for Fua {
    type Conn = Lower;
    fn name(&self) -> &str {
        "fua"
    }
    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<(Lower, Next)> {
        let next = Next::open(next, ctx)?;
        let lower = Lower::query(&next, ctx.readonly)?;
        if !ctx.readonly {
            let fail = |m: &str| Err(BlockError::new(Errno::EINVAL, format!("fua: {m}")));
            match self.mode {
                Mode::Emulate if !next.can_flush()? => {
                    return fail("fuamode 'emulate' requires plugin flush support")
                }
                Mode::Native | Mode::Force if next.can_fua()? == Support::None => {
                    let m = if self.mode == Mode::Native {
                        "native"
                    } else {
                        "force"
                    };
                    return fail(&format!("fuamode '{m}' requires plugin fua support"));
                }
                _ => {}
            }
        }
        Ok((lower, next))
    }
    fn can_flush(&self, _: &Lower, next: &Next) -> Result<bool> {
        match self.mode {
            Mode::Force | Mode::Discard => Ok(true),
            _ => next.can_flush(),
        }
    }
    fn can_fua(&self, _: &Lower, next: &Next) -> Result<Support> {
        match self.mode {
            Mode::None => Ok(Support::None),
            Mode::Emulate => Ok(Support::Emulate),
            Mode::Native | Mode::Force | Mode::Discard => Ok(Support::Native),
            Mode::Pass => next.can_fua(),
        }
    }
    fn pwrite(&self, l: &Lower, next: &Next, buf: &[u8], off: u64, f: Flags) -> Result<()> {
        let (f, flush) = self.flags(f);
        l.pwrite(next, buf, off, f)?;
        Self::then_flush(next, flush)
    }
    fn flush(&self, _: &Lower, next: &Next, f: Flags) -> Result<()> {
        match self.mode {
            Mode::Force | Mode::Discard => Ok(()),
            _ => next.flush(f),
        }
    }
    fn trim(&self, l: &Lower, next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        let (f, flush) = self.flags(f);
        l.trim(next, n, off, f)?;
        Self::then_flush(next, flush)
    }
    fn zero(&self, l: &Lower, next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        let (f, flush) = self.flags(f);
        l.zero(next, n, off, f)?;
        Self::then_flush(next, flush)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::super::test_support::*;
    use crate::error::Result;
    use crate::plugin::{Flags, Handle, OpenContext, Plugin, Support};

    /// A RAM-less plugin that logs writes and flushes, with FUA emulated (flush only).
    #[derive(Default)]
    struct Log(Arc<Mutex<Vec<String>>>);
    struct LogHandle(Arc<Mutex<Vec<String>>>);
    impl Plugin for Log {
        fn name(&self) -> &str {
            "log"
        }
        fn open(&self, _: &OpenContext<'_>) -> Result<Box<dyn Handle>> {
            Ok(Box::new(LogHandle(self.0.clone())))
        }
    }
    impl Handle for LogHandle {
        fn get_size(&self) -> Result<u64> {
            Ok(1 << 20)
        }
        fn can_write(&self) -> Result<bool> {
            Ok(true)
        }
        fn can_flush(&self) -> Result<bool> {
            Ok(true)
        }
        fn pread(&self, buf: &mut [u8], _: u64, _: Flags) -> Result<()> {
            buf.fill(0);
            Ok(())
        }
        fn pwrite(&self, _: &[u8], off: u64, f: Flags) -> Result<()> {
            self.0
                .lock()
                .unwrap()
                .push(format!("pwrite {off} {:#x}", f.0));
            Ok(())
        }
        fn flush(&self, _: Flags) -> Result<()> {
            self.0.lock().unwrap().push("flush".into());
            Ok(())
        }
    }

    fn run(mode: &str, flags: Flags) -> (crate::Caps, Vec<String>) {
        let log = Log::default();
        let calls = log.0.clone();
        let e = export(filter("fua", &[("fuamode", mode)], Arc::new(log)), false);
        e.write(&[1; 512], 0, flags).unwrap();
        e.flush().unwrap();
        let v = std::mem::take(&mut *calls.lock().unwrap());
        (e.caps().clone(), v)
    }

    #[test]
    fn fua_none_hides_fua() {
        let (caps, calls) = run("none", Flags::NONE);
        assert_eq!(caps.fua, Support::None);
        assert_eq!(calls, ["pwrite 0 0x0", "flush"]);
    }

    #[test]
    fn fua_emulate_flushes_after_the_write() {
        let (caps, calls) = run("emulate", Flags::FUA);
        assert_eq!(caps.fua, Support::Emulate);
        assert_eq!(calls, ["pwrite 0 0x0", "flush", "flush"]);
    }

    #[test]
    fn fua_native_over_an_emulating_plugin_still_flushes() {
        let (caps, calls) = run("native", Flags::FUA);
        assert_eq!(caps.fua, Support::Native);
        assert_eq!(calls, ["pwrite 0 0x0", "flush", "flush"]);
    }

    #[test]
    fn fua_force_writes_with_fua_and_drops_flush() {
        let (_, calls) = run("force", Flags::NONE);
        assert_eq!(calls, ["pwrite 0 0x0", "flush"]);
        let e = export(
            filter("fua", &[("fuamode", "force")], memory(1 << 20)),
            false,
        );
        assert_eq!(e.caps().fua, Support::Native);
    }

    #[test]
    fn fua_discard_drops_fua_and_flush() {
        let (caps, calls) = run("discard", Flags::FUA);
        assert_eq!(caps.fua, Support::Native);
        assert_eq!(calls, ["pwrite 0 0x0"]);
    }

    #[test]
    fn fua_pass_keeps_the_plugins_answer() {
        let (caps, calls) = run("pass", Flags::FUA);
        assert_eq!(caps.fua, Support::Emulate);
        assert_eq!(calls, ["pwrite 0 0x0", "flush", "flush"]);
    }

    #[test]
    fn fua_unknown_mode_is_refused() {
        assert_eq!(
            config_error("fua", &[("fuamode", "bogus")]),
            "fua: fuamode: unknown fuamode 'bogus'"
        );
    }
}
