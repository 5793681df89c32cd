//! nbdkit's `-D NAME.FLAG=N` debug flags.
//!
//! A plugin exports `int NAME_debug_FLAG` (for example `memory_debug_dir`) and nbdkit stores
//! N into it after dlopen and before `.load`, so the flag already holds when the plugin
//! starts. The server's own flags (`-D nbdkit.backend.datapath=0`) are the
//! `nbdkit_debug_*` data symbols below, exported with the rest of the server API so that
//! plugins can read them too.

#![allow(non_upper_case_globals)]

use std::ffi::c_int;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicI32, Ordering};

use libloading::os::unix::Library;

use crate::error::LoadError;

/// `-D nbdkit.backend.controlpath=N`: log control-path calls (nbdkit's default 1).
#[no_mangle]
pub static nbdkit_debug_backend_controlpath: AtomicI32 = AtomicI32::new(1);
/// `-D nbdkit.backend.datapath=N`: log data-path calls (nbdkit's default 1).
#[no_mangle]
pub static nbdkit_debug_backend_datapath: AtomicI32 = AtomicI32::new(1);
/// `-D nbdkit.tls.log=N`: GnuTLS log level.
#[no_mangle]
pub static nbdkit_debug_tls_log: AtomicI32 = AtomicI32::new(0);
/// `-D nbdkit.tls.session=N`: log TLS session details.
#[no_mangle]
pub static nbdkit_debug_tls_session: AtomicI32 = AtomicI32::new(0);

/// One `-D NAME.FLAG=N` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebugFlag {
    /// Plugin name (`memory`), or `nbdkit` for the server's own flags.
    pub name: String,
    /// Flag, possibly dotted (`backend.datapath`).
    pub flag: String,
    pub value: i32,
}

impl DebugFlag {
    /// The C variable that holds the flag: `NAME_debug_FLAG` with `.` and `-` as `_`.
    pub fn symbol(&self) -> String {
        format!("{}_debug_{}", self.name, self.flag).replace(['.', '-'], "_")
    }
}

impl FromStr for DebugFlag {
    type Err = String;

    /// Parses `NAME.FLAG=N` (N as for `nbdkit_parse_int`: decimal, 0x hex or 0 octal).
    fn from_str(s: &str) -> Result<DebugFlag, String> {
        let bad = || format!("-D {s}: expected NAME.FLAG=N");
        let (lhs, value) = s.split_once('=').ok_or_else(bad)?;
        let (name, flag) = lhs.split_once('.').ok_or_else(bad)?;
        if name.is_empty() || flag.is_empty() {
            return Err(bad());
        }
        let value =
            parse_c_int(value).ok_or_else(|| format!("-D {s}: {value:?} is not a number"))?;
        Ok(DebugFlag {
            name: name.to_string(),
            flag: flag.to_string(),
            value,
        })
    }
}

fn parse_c_int(s: &str) -> Option<i32> {
    let (neg, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let v = if let Some(hex) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        i64::from_str_radix(hex, 16).ok()?
    } else if digits.len() > 1 && digits.starts_with('0') {
        i64::from_str_radix(&digits[1..], 8).ok()?
    } else {
        digits.parse::<i64>().ok()?
    };
    i32::try_from(if neg { -v } else { v }).ok()
}

/// Stores `value` into the plugin's `int NAME_debug_FLAG` (looked up in `lib`), as nbdkit
/// does for `-D NAME.FLAG=N`. `path` is only for the error message.
pub fn set_debug_flag(
    path: &Path,
    lib: &Library,
    name: &str,
    flag: &str,
    value: i32,
) -> Result<(), LoadError> {
    let f = DebugFlag {
        name: name.to_string(),
        flag: flag.to_string(),
        value,
    };
    let symbol = f.symbol();
    let missing = || LoadError::DebugFlag {
        path: path.to_path_buf(),
        name: name.to_string(),
        flag: flag.to_string(),
        symbol: symbol.clone(),
    };
    let mut cname = symbol.clone().into_bytes();
    cname.push(0);
    // SAFETY: we look up a data symbol and only use its address as an `int *`, which is what
    // nbdkit's convention promises the variable is.
    let sym = unsafe { lib.get::<*mut c_int>(&cname) }.map_err(|_| missing())?;
    let ptr: *mut c_int = *sym;
    if ptr.is_null() {
        return Err(missing());
    }
    // SAFETY: the symbol names a writable global `int` of the loaded plugin; the library stays
    // loaded while `lib` is borrowed, and no plugin code runs concurrently during loading.
    unsafe { ptr.write_volatile(value) };
    tracing::debug!("debug flag {} = {value}", f.symbol());
    Ok(())
}

/// Applies a server flag (`-D nbdkit.FLAG=N`); false if sluice has no such flag.
pub fn set_server_debug_flag(flag: &str, value: i32) -> bool {
    let var = match flag.replace(['.', '-'], "_").as_str() {
        "backend_controlpath" => &nbdkit_debug_backend_controlpath,
        "backend_datapath" => &nbdkit_debug_backend_datapath,
        "tls_log" => &nbdkit_debug_tls_log,
        "tls_session" => &nbdkit_debug_tls_session,
        _ => return false,
    };
    var.store(value, Ordering::Relaxed);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_flag_dotted() {
        let f: DebugFlag = "nbdkit.backend.datapath=0".parse().unwrap();
        assert_eq!(f.name, "nbdkit");
        assert_eq!(f.flag, "backend.datapath");
        assert_eq!(f.value, 0);
        assert_eq!(f.symbol(), "nbdkit_debug_backend_datapath");
    }

    #[test]
    fn parse_flag_hex_and_negative() {
        assert_eq!("memory.dir=0x10".parse::<DebugFlag>().unwrap().value, 16);
        assert_eq!("memory.dir=-3".parse::<DebugFlag>().unwrap().value, -3);
        assert_eq!("memory.dir=010".parse::<DebugFlag>().unwrap().value, 8);
    }

    #[test]
    fn parse_flag_malformed_is_error() {
        assert!("memory=1".parse::<DebugFlag>().is_err());
        assert!("memory.dir".parse::<DebugFlag>().is_err());
        assert!("memory.dir=x".parse::<DebugFlag>().is_err());
    }

    #[test]
    fn server_flag_sets_static() {
        assert!(set_server_debug_flag("tls.session", 5));
        assert_eq!(nbdkit_debug_tls_session.load(Ordering::Relaxed), 5);
        assert!(!set_server_debug_flag("nope", 1));
    }
}
