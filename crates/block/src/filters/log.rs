//! nbdkit's log filter: every call through the filter, one line each, to a file
//! (`logfile=`, truncated unless `logappend=true`) and/or to a shell script (`logscript=`).
//!
//! The lines are nbdkit 1.32's, byte for byte apart from the timestamps: `Ready`, `Fork`,
//! `Preconnect`, `ListExports`, then per connection `Connect` (the export and every
//! capability the layer below answers), one `ENTER`/`LEAVE` pair per request with a
//! per-connection id, and `Disconnect` with the number of requests. A script gets the same
//! fields as shell variables (`$act`, `$type`, `$connection`, `$id`, `$offset`, ...), run
//! with `/bin/sh` once per line, its exit status ignored, as nbdkit's `system(3)` does.
//!
//! The capabilities in `Connect` are nbdkit's view of the layer below: a read-only connection
//! (server `-r`, or a plugin that cannot write) shows `write=0` and no trim, zero, FUA or
//! fast zero, because nbdkit's backend answers those for the plugin. Block status lines list
//! the extents the layer below gave up to the end of the export, as nbdkit's server asks for
//! them, even where the client asked about less.
//!
//! The file is opened in the ready stage (nbdkit's `.get_ready`), so `--dump-plugin` does not
//! create it. Lines are written whole under a lock, so concurrent requests interleave by line.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{BlockError, Errno, Result};
use crate::extents::{Extents, EXTENT_HOLE, EXTENT_ZERO};
use crate::filter::{Filter, Next};
use crate::filters::{each_param, over, parse_bool, FilterEnv, FilterSpec};
use crate::plugin::{ExportEntry, Flags, Handle, OpenContext, Plugin, Support};
use crate::plugins::ConfigArg;

use super::lifecycle::Serving;
use super::{run_shell, shell_quote};

pub const SPEC: FilterSpec = FilterSpec {
    name: "log",
    keys: &["logfile", "logappend", "logscript"],
    help: "logfile=<FILE>               The file to place the log in.\n\
           logappend=<BOOL>             True to append to the log (default false).\n\
           logscript=<SCRIPT>           Script to run for logging.",
    open,
};

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, env: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut logfile = None;
    let mut append = false;
    let mut script = None;
    each_param(&SPEC, params, |k, v| {
        match k {
            "logfile" => logfile = Some(v.to_string()),
            "logappend" => append = parse_bool("log", k, v)?,
            _ => script = Some(v.to_string()),
        }
        Ok(())
    })?;
    let sink = Arc::new(Sink {
        file: Mutex::new(None),
        script,
    });
    let ready = sink.clone();
    env.lifecycle.on_ready(move |thread_model| {
        if let Some(path) = &logfile {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .append(append)
                .truncate(!append)
                .open(path)
                .map_err(|e| {
                    BlockError::new(
                        Errno(e.raw_os_error().unwrap_or(libc::EIO)),
                        format!("log: open: {path}: {e}"),
                    )
                })?;
            *ready.file.lock().unwrap_or_else(PoisonError::into_inner) = Some(file);
        }
        ready.line(
            None,
            0,
            "Ready",
            Kind::Print,
            &format!("thread_model={}", thread_model as i32),
        );
        Ok(())
    });
    let fork = sink.clone();
    env.lifecycle.on_serving(move |serving: Serving| {
        if serving.forked {
            fork.line(None, 0, "Fork", Kind::Print, "");
        }
        Ok(())
    });
    Ok(over(
        Log {
            sink,
            connections: AtomicU64::new(0),
            preconnects: AtomicU64::new(0),
            lists: AtomicU64::new(0),
        },
        inner,
    ))
}

/// Where lines go.
struct Sink {
    file: Mutex<Option<std::fs::File>>,
    script: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Enter,
    Leave,
    Print,
}

impl Sink {
    /// nbdkit's `output`: one line for connection `conn` (None for server-wide calls) and
    /// request `id` (0: none).
    fn line(&self, conn: Option<u64>, id: u64, act: &str, kind: Kind, text: &str) {
        if let Some(file) = &mut *self.file.lock().unwrap_or_else(PoisonError::into_inner) {
            let mut l = timestamp(SystemTime::now());
            if let Some(c) = conn {
                l.push_str(&format!(" connection={c}"));
            }
            l.push(' ');
            if kind == Kind::Leave {
                l.push_str("...");
            }
            l.push_str(act);
            if id != 0 {
                l.push_str(&format!(" id={id}"));
            }
            if !text.is_empty() {
                l.push(' ');
                l.push_str(text);
            }
            if kind == Kind::Enter {
                l.push_str(" ...");
            }
            l.push('\n');
            // Logging is best effort, as in nbdkit.
            let _ = file.write_all(l.as_bytes());
        }
        if let Some(script) = &self.script {
            let mut s = format!("act={act}\n");
            if let Some(c) = conn {
                s.push_str(&format!("connection={c}\n"));
            }
            s.push_str(match kind {
                Kind::Enter => "type=ENTER\n",
                Kind::Leave => "type=LEAVE\n",
                Kind::Print => "type=PRINT\n",
            });
            if id != 0 {
                s.push_str(&format!("id={id}\n"));
            }
            s.push_str(text);
            s.push('\n');
            s.push_str(script);
            match run_shell(&s) {
                Some(0) | None => {}
                Some(n) => tracing::debug!("logscript: exited with status {n}"),
            }
        }
    }

    /// nbdkit's `leave_simple`: `return=0`, or `return=-1 error=E` with the errno the client
    /// will see.
    fn leave<T>(&self, conn: Option<u64>, id: u64, act: &str, r: &Result<T>) {
        let text = match r {
            Ok(_) => "return=0".to_string(),
            Err(e) => format!("return=-1 error={}", wire_errno(e.errno)),
        };
        self.line(conn, id, act, Kind::Leave, &text);
    }
}

/// The name of the NBD error an errno becomes (server/protocol.c `nbd_errno`).
fn wire_errno(e: Errno) -> &'static str {
    match e.0 {
        libc::EROFS | libc::EPERM => "EPERM",
        libc::EIO => "EIO",
        libc::ENOMEM => "ENOMEM",
        libc::EDQUOT | libc::EFBIG | libc::ENOSPC => "ENOSPC",
        libc::ESHUTDOWN => "ESHUTDOWN",
        libc::ENOTSUP => "ENOTSUP",
        libc::EOVERFLOW => "EOVERFLOW",
        _ => "EINVAL",
    }
}

/// `YYYY-MM-DD HH:MM:SS.uuuuuu` in UTC, nbdkit's timestamp.
fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86400, secs % 86400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:06}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_micros()
    )
}

struct Log {
    sink: Arc<Sink>,
    connections: AtomicU64,
    preconnects: AtomicU64,
    lists: AtomicU64,
}

/// One connection: its number, its request counter, and the export size (for block status).
struct Conn {
    number: u64,
    ids: AtomicU64,
    size: u64,
}

impl Conn {
    fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed) + 1
    }
}

fn flag(flags: Flags, f: Flags) -> u8 {
    u8::from(flags.contains(f))
}

impl Log {
    /// Logs a request: ENTER with `text`, runs it, LEAVE with its result.
    fn request<T>(
        &self,
        c: &Conn,
        act: &str,
        text: &str,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let id = c.next_id();
        self.sink.line(Some(c.number), id, act, Kind::Enter, text);
        let r = f();
        self.sink.leave(Some(c.number), id, act, &r);
        r
    }

    /// nbdkit's `log_prepare` line, from the layer below's answers.
    fn connect_line(&self, ctx: &OpenContext<'_>, next: &Next) -> Result<(String, u64)> {
        let size = next.get_size()?;
        let bs = next.block_size()?;
        let (min, pref, max) = bs.map_or((0, 0, 0), |b| (b.minimum, b.preferred, b.maximum));
        let write = !ctx.readonly && next.can_write()?;
        let flush = next.can_flush()?;
        let rotational = next.is_rotational()?;
        let trim = write && next.can_trim()?;
        let zero = if write {
            next.can_zero()?
        } else {
            Support::None
        };
        let fua = if write {
            next.can_fua()?
        } else {
            Support::None
        };
        let extents = next.can_extents()?;
        let cache = next.can_cache()?;
        let fast_zero = zero != Support::None && next.can_fast_zero()?;
        let line = format!(
            "export={} tls={} size={size:#x} minsize={min:#x} prefsize={pref:#x} \
             maxsize={max:#x} write={} flush={} rotational={} trim={} zero={} fua={} \
             extents={} cache={} fast_zero={}",
            shell_quote(ctx.export_name),
            u8::from(ctx.is_tls),
            u8::from(write),
            u8::from(flush),
            u8::from(rotational),
            u8::from(trim),
            zero as i32,
            fua as i32,
            u8::from(extents),
            cache as i32,
            u8::from(fast_zero),
        );
        // nbdkit prints 0x0, where Rust's {:#x} of 0 is also "0x0".
        Ok((line, size))
    }
}

impl Filter for Log {
    type Conn = Conn;

    fn name(&self) -> &str {
        "log"
    }

    /// It logs reads: each must reach it.
    fn must_see_every_read(&self) -> bool {
        true
    }

    fn preconnect(&self, next: &dyn Plugin, readonly: bool) -> Result<()> {
        let id = self.preconnects.fetch_add(1, Ordering::Relaxed) + 1;
        let text = format!("readonly={}", u8::from(readonly));
        self.sink.line(None, id, "Preconnect", Kind::Enter, &text);
        let r = next.preconnect(readonly);
        self.sink.leave(None, id, "Preconnect", &r);
        r
    }

    fn list_exports(
        &self,
        next: &dyn Plugin,
        readonly: bool,
        is_tls: bool,
    ) -> Result<Vec<ExportEntry>> {
        let id = self.lists.fetch_add(1, Ordering::Relaxed) + 1;
        let text = format!("readonly={} tls={}", u8::from(readonly), u8::from(is_tls));
        self.sink.line(None, id, "ListExports", Kind::Enter, &text);
        let r = next.list_exports(readonly, is_tls);
        match &r {
            Ok(list) => {
                let names: Vec<String> = list.iter().map(|e| shell_quote(&e.name)).collect();
                let text = format!("exports=({}) return=0", names.join(" "));
                self.sink.line(None, id, "ListExports", Kind::Leave, &text);
            }
            Err(_) => self.sink.leave(None, id, "ListExports", &r),
        }
        r
    }

    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<(Conn, Next)> {
        let next = Next::open(next, ctx)?;
        let (line, size) = self.connect_line(ctx, &next)?;
        let number = self.connections.fetch_add(1, Ordering::Relaxed) + 1;
        self.sink
            .line(Some(number), 0, "Connect", Kind::Print, &line);
        let conn = Conn {
            number,
            ids: AtomicU64::new(0),
            size,
        };
        Ok((conn, next))
    }

    fn close(&self, c: &mut Conn, _next: &Next) {
        let text = format!("transactions={}", c.ids.load(Ordering::Relaxed));
        self.sink
            .line(Some(c.number), 0, "Disconnect", Kind::Print, &text);
    }

    fn pread(&self, c: &Conn, next: &Next, buf: &mut [u8], off: u64, f: Flags) -> Result<()> {
        let text = format!("offset={off:#x} count={:#x}", buf.len());
        self.request(c, "Read", &text, || next.pread(buf, off, f))
    }

    fn pwrite(&self, c: &Conn, next: &Next, buf: &[u8], off: u64, f: Flags) -> Result<()> {
        let text = format!(
            "offset={off:#x} count={:#x} fua={}",
            buf.len(),
            flag(f, Flags::FUA)
        );
        self.request(c, "Write", &text, || next.pwrite(buf, off, f))
    }

    fn flush(&self, c: &Conn, next: &Next, f: Flags) -> Result<()> {
        self.request(c, "Flush", "", || next.flush(f))
    }

    fn trim(&self, c: &Conn, next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        let text = format!("offset={off:#x} count={n:#x} fua={}", flag(f, Flags::FUA));
        self.request(c, "Trim", &text, || next.trim(n, off, f))
    }

    fn zero(&self, c: &Conn, next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        let text = format!(
            "offset={off:#x} count={n:#x} trim={} fua={} fast={}",
            flag(f, Flags::MAY_TRIM),
            flag(f, Flags::FUA),
            flag(f, Flags::FAST_ZERO)
        );
        self.request(c, "Zero", &text, || next.zero(n, off, f))
    }

    fn cache(&self, c: &Conn, next: &Next, n: u64, off: u64, f: Flags) -> Result<()> {
        let text = format!("offset={off:#x} count={n:#x}");
        self.request(c, "Cache", &text, || next.cache(n, off, f))
    }

    fn extents(
        &self,
        c: &Conn,
        next: &Next,
        n: u64,
        off: u64,
        f: Flags,
        out: &mut Extents,
    ) -> Result<()> {
        let id = c.next_id();
        let text = format!(
            "offset={off:#x} count={n:#x} req_one={}",
            flag(f, Flags::REQ_ONE)
        );
        self.sink
            .line(Some(c.number), id, "Extents", Kind::Enter, &text);
        // What the layer below says up to the end of the export, as nbdkit's server asks.
        let mut below = Extents::new(off, c.size.max(out.end()));
        let r = next.extents(n, off, f, &mut below);
        if r.is_err() {
            self.sink.leave(Some(c.number), id, "Extents", &r);
            return r;
        }
        let list: Vec<String> = below
            .as_slice()
            .iter()
            .map(|e| {
                let hole = e.kind & EXTENT_HOLE != 0;
                let zero = e.kind & EXTENT_ZERO != 0;
                let kind = match (hole, zero) {
                    (true, true) => "hole,zero",
                    (true, false) => "hole",
                    (false, true) => "zero",
                    (false, false) => "",
                };
                format!("{:#x} {:#x} \"{kind}\"", e.offset, e.length)
            })
            .collect();
        let text = format!("extents=({}) return=0", list.join(" "));
        self.sink
            .line(Some(c.number), id, "Extents", Kind::Leave, &text);
        for e in below.as_slice() {
            out.add(e.offset, e.length, e.kind)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_with_microseconds() {
        let t = UNIX_EPOCH + std::time::Duration::from_micros(1_596_679_643_080_415);
        assert_eq!(timestamp(t), "2020-08-06 02:07:23.080415");
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01 00:00:00.000000");
        let leap = UNIX_EPOCH + std::time::Duration::from_secs(951_782_400);
        assert_eq!(timestamp(leap), "2000-02-29 00:00:00.000000");
    }

    #[test]
    fn errors_are_named_as_the_client_sees_them() {
        assert_eq!(wire_errno(Errno::EROFS), "EPERM");
        assert_eq!(wire_errno(Errno(libc::EFBIG)), "ENOSPC");
        assert_eq!(wire_errno(Errno(libc::ENOENT)), "EINVAL");
        assert_eq!(wire_errno(Errno::ENOTSUP), "ENOTSUP");
    }

    fn strip_times(text: &str) -> Vec<String> {
        text.lines().map(|l| l[27..].to_string()).collect()
    }

    /// A 1 MiB disk of zeroes whose reads past 64 KiB fail with EIO.
    struct Failing;
    struct FailingHandle;

    impl Plugin for Failing {
        fn name(&self) -> &str {
            "failing"
        }
        fn open(&self, _: &OpenContext<'_>) -> Result<Box<dyn Handle>> {
            Ok(Box::new(FailingHandle))
        }
    }

    impl Handle for FailingHandle {
        fn get_size(&self) -> Result<u64> {
            Ok(1 << 20)
        }
        fn can_write(&self) -> Result<bool> {
            Ok(true)
        }
        fn pread(&self, buf: &mut [u8], offset: u64, _: Flags) -> Result<()> {
            if offset >= 65536 {
                return Err(BlockError::errno(Errno::EIO));
            }
            buf.fill(0);
            Ok(())
        }
    }

    #[test]
    fn a_session_logs_nbdkit_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let env = FilterEnv::default();
        let params = [ConfigArg::kv("logfile", path.to_str().unwrap())];
        let top = (SPEC.open)(&params, Arc::new(Failing), &env).unwrap();
        assert!(!path.exists(), "opened before the ready stage");
        env.lifecycle.ready(top.thread_model()).unwrap();
        env.lifecycle.serving(Serving { forked: false }).unwrap();
        top.preconnect(true).unwrap();
        let h = top
            .open(&OpenContext {
                readonly: true,
                export_name: "a b",
                is_tls: false,
            })
            .unwrap();
        let mut buf = [0u8; 512];
        h.pread(&mut buf, 4096, Flags::NONE).unwrap();
        assert_eq!(
            h.pread(&mut buf, 65536, Flags::NONE).unwrap_err().errno,
            Errno::EIO
        );
        drop(h);
        let lines = strip_times(&std::fs::read_to_string(&path).unwrap());
        assert_eq!(
            lines,
            [
                "Ready thread_model=3",
                "Preconnect id=1 readonly=1 ...",
                "...Preconnect id=1 return=0",
                "connection=1 Connect export=\"a b\" tls=0 size=0x100000 minsize=0x0 \
                 prefsize=0x0 maxsize=0x0 write=0 flush=0 rotational=0 trim=0 zero=0 fua=0 \
                 extents=0 cache=0 fast_zero=0",
                "connection=1 Read id=1 offset=0x1000 count=0x200 ...",
                "connection=1 ...Read id=1 return=0",
                "connection=1 Read id=2 offset=0x10000 count=0x200 ...",
                "connection=1 ...Read id=2 return=-1 error=EIO",
                "connection=1 Disconnect transactions=2",
            ]
        );
    }
}
