//! `nbdkit_parse_*`: the number, size and boolean parsers plugins use for their parameters.
//!
//! Plugins' users write these strings on sluice's command line exactly as they did on
//! nbdkit's, so the grammar and the error messages are nbdkit 1.32's (server/public.c):
//! integers through C's `strtoll`/`strtoull` with base 0 (decimal, `0x` hex, `0` octal,
//! leading blanks allowed), unsigned ones refusing a minus sign, sizes as a decimal number
//! with an optional single-letter suffix (`b`, `k`..`e` powers of 1024, `s` = 512).

use std::ffi::{c_char, c_int, c_uint, CStr};
use std::ptr;

use sluice_block::Errno;

use crate::api::log::report_error;
use crate::context::{errno, set_errno};

/// Text of a C string for messages ("" for NULL).
fn text(s: *const c_char) -> String {
    if s.is_null() {
        return String::new();
    }
    // SAFETY: callers pass NUL-terminated strings (checked non-NULL above).
    unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
}

/// The shared tail of nbdkit's integer parsers: error checks in nbdkit's order, then the
/// store through `rp` (which may be NULL).
///
/// # Safety
/// `s` and `end` point into the same NUL-terminated string; `rp` is NULL or writable.
unsafe fn finish<T>(
    what: *const c_char,
    s: *const c_char,
    end: *const c_char,
    err: i32,
    value: Option<T>,
    rp: *mut T,
) -> c_int {
    let what = text(what);
    if err != 0 || value.is_none() {
        let err = if err != 0 { err } else { libc::ERANGE };
        report_error(format!(
            "{what}: could not parse number: \"{}\": {}",
            text(s),
            Errno(err).describe()
        ));
        return -1;
    }
    if end == s {
        report_error(format!("{what}: empty string where we expected a number"));
        return -1;
    }
    // SAFETY: `end` points at or before the string's terminating NUL.
    if unsafe { *end } != 0 {
        report_error(format!(
            "{what}: could not parse number: \"{}\": trailing garbage",
            text(s)
        ));
        return -1;
    }
    if !rp.is_null() {
        if let Some(v) = value {
            // SAFETY: the caller's out-pointer, documented as writable when non-NULL.
            unsafe { rp.write(v) };
        }
    }
    0
}

/// # Safety
/// `s` is a NUL-terminated string, `rp` NULL or writable.
unsafe fn parse_signed<T: TryFrom<i64>>(
    what: *const c_char,
    s: *const c_char,
    rp: *mut T,
) -> c_int {
    if s.is_null() {
        report_error(format!(
            "{}: empty string where we expected a number",
            text(what)
        ));
        return -1;
    }
    let mut end: *mut c_char = ptr::null_mut();
    set_errno(0);
    // SAFETY: `s` is NUL-terminated; `end` is a valid out-pointer.
    let r = unsafe { libc::strtoll(s, &mut end, 0) };
    let err = errno();
    // SAFETY: forwarded from our caller; `end` points into `s`.
    unsafe { finish(what, s, end, err, T::try_from(r).ok(), rp) }
}

/// # Safety
/// As [`parse_signed`].
unsafe fn parse_unsigned<T: TryFrom<u64>>(
    what: *const c_char,
    s: *const c_char,
    rp: *mut T,
) -> c_int {
    if s.is_null() {
        report_error(format!(
            "{}: empty string where we expected a number",
            text(what)
        ));
        return -1;
    }
    let mut s = s;
    loop {
        // SAFETY: `s` points into the string, at most at its NUL (where the loop stops:
        // NUL is not a space).
        let c = unsafe { *s } as u8;
        if !matches!(c, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r') {
            break;
        }
        // SAFETY: the current byte is not the NUL, so the next one is still in the string.
        s = unsafe { s.add(1) };
    }
    // SAFETY: `s` points into the string.
    if unsafe { *s } as u8 == b'-' {
        report_error(format!("{}: negative numbers are not allowed", text(what)));
        return -1;
    }
    let mut end: *mut c_char = ptr::null_mut();
    set_errno(0);
    // SAFETY: `s` is NUL-terminated; `end` is a valid out-pointer.
    let r = unsafe { libc::strtoull(s, &mut end, 0) };
    let err = errno();
    // SAFETY: forwarded from our caller; `end` points into `s`.
    unsafe { finish(what, s, end, err, T::try_from(r).ok(), rp) }
}

macro_rules! parse_fn {
    ($name:ident, $ty:ty, $how:ident) => {
        #[doc = concat!("`", stringify!($name), "`: parses into `", stringify!($ty), "`.")]
        ///
        /// # Safety
        /// `what` and `str` are NUL-terminated strings; `r` is NULL or writable.
        #[no_mangle]
        pub unsafe extern "C" fn $name(
            what: *const c_char,
            s: *const c_char,
            r: *mut $ty,
        ) -> c_int {
            // SAFETY: our caller's contract is the helper's.
            unsafe { $how::<$ty>(what, s, r) }
        }
    };
}

parse_fn!(nbdkit_parse_int, c_int, parse_signed);
parse_fn!(nbdkit_parse_int8_t, i8, parse_signed);
parse_fn!(nbdkit_parse_int16_t, i16, parse_signed);
parse_fn!(nbdkit_parse_int32_t, i32, parse_signed);
parse_fn!(nbdkit_parse_int64_t, i64, parse_signed);
parse_fn!(nbdkit_parse_unsigned, c_uint, parse_unsigned);
parse_fn!(nbdkit_parse_uint8_t, u8, parse_unsigned);
parse_fn!(nbdkit_parse_uint16_t, u16, parse_unsigned);
parse_fn!(nbdkit_parse_uint32_t, u32, parse_unsigned);
parse_fn!(nbdkit_parse_uint64_t, u64, parse_unsigned);

/// `int64_t nbdkit_parse_size (const char *str)`: "100M" → 104857600; -1 after
/// `nbdkit_error` on failure.
///
/// # Safety
/// `s` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn nbdkit_parse_size(s: *const c_char) -> i64 {
    if s.is_null() {
        report_error("could not parse size string ()".to_string());
        return -1;
    }
    let shown = text(s);
    let mut end: *mut c_char = ptr::null_mut();
    set_errno(0);
    // SAFETY: `s` is NUL-terminated; `end` is a valid out-pointer.
    let size = unsafe { libc::strtoll(s, &mut end, 10) };
    let err = errno();
    if end.cast_const() == s {
        report_error(format!("could not parse size string ({shown})"));
        return -1;
    }
    if size < 0 {
        report_error(format!("size cannot be negative ({shown})"));
        return -1;
    }
    if err != 0 {
        report_error(format!("size ({shown}) exceeds maximum value"));
        return -1;
    }
    // SAFETY: `end` points into the string, at most at its NUL.
    let suffix = unsafe { CStr::from_ptr(end) }.to_bytes();
    let scale: i64 = match suffix.first().map(u8::to_ascii_lowercase) {
        None => 1,
        Some(c @ (b'b' | b'k' | b'm' | b'g' | b't' | b'p' | b'e')) => {
            let power = b"bkmgtpe".iter().position(|&x| x == c).expect("listed") as u32;
            1i64 << (10 * power)
        }
        Some(b's') => 512,
        Some(_) => {
            report_error(format!(
                "could not parse size: unknown suffix '{}'",
                String::from_utf8_lossy(suffix)
            ));
            return -1;
        }
    };
    if suffix.len() > 1 {
        report_error(format!(
            "could not parse size: unknown suffix '{}'",
            String::from_utf8_lossy(suffix)
        ));
        return -1;
    }
    match size.checked_mul(scale) {
        Some(v) => v,
        None => {
            report_error(format!("overflow computing size ({shown})"));
            -1
        }
    }
}

/// `int nbdkit_parse_bool (const char *str)`: 1, 0, or -1 after `nbdkit_error`.
///
/// # Safety
/// `s` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn nbdkit_parse_bool(s: *const c_char) -> c_int {
    let t = text(s);
    let is = |words: &[&str]| words.iter().any(|w| t.eq_ignore_ascii_case(w));
    if t == "1" || is(&["true", "t", "yes", "y", "on"]) {
        return 1;
    }
    if t == "0" || is(&["false", "f", "no", "n", "off"]) {
        return 0;
    }
    report_error(format!("could not decipher boolean ({t})"));
    -1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::{take_last_error, Frame, PluginScope, Scope};
    use std::ffi::CString;

    fn scoped<R>(f: impl FnOnce() -> R) -> R {
        let p = PluginScope::new("test".into());
        let _s = Scope::enter(Frame::for_plugin(&p));
        f()
    }

    fn size(s: &str) -> Result<i64, String> {
        scoped(|| {
            let c = CString::new(s).unwrap();
            // SAFETY: a valid C string.
            let r = unsafe { nbdkit_parse_size(c.as_ptr()) };
            if r == -1 {
                Err(take_last_error().unwrap())
            } else {
                Ok(r)
            }
        })
    }

    #[test]
    fn parse_size_suffixes() {
        assert_eq!(size("100"), Ok(100));
        assert_eq!(size("1b"), Ok(1));
        assert_eq!(size("1k"), Ok(1024));
        assert_eq!(size("1M"), Ok(1 << 20));
        assert_eq!(size("2G"), Ok(2 << 30));
        assert_eq!(size("1T"), Ok(1 << 40));
        assert_eq!(size("1P"), Ok(1 << 50));
        assert_eq!(size("1E"), Ok(1 << 60));
        assert_eq!(size("3s"), Ok(1536));
        assert_eq!(size(" 5"), Ok(5));
    }

    #[test]
    fn parse_size_errors_match_nbdkit() {
        assert_eq!(size("abc"), Err("could not parse size string (abc)".into()));
        assert_eq!(size(""), Err("could not parse size string ()".into()));
        assert_eq!(size("-1"), Err("size cannot be negative (-1)".into()));
        assert_eq!(
            size("1.5M"),
            Err("could not parse size: unknown suffix '.5M'".into())
        );
        assert_eq!(
            size("1MiB"),
            Err("could not parse size: unknown suffix 'MiB'".into())
        );
        assert_eq!(
            size("0x10"),
            Err("could not parse size: unknown suffix 'x10'".into())
        );
        assert_eq!(size("8E"), Err("overflow computing size (8E)".into()));
        assert_eq!(
            size("99999999999999999999"),
            Err("size (99999999999999999999) exceeds maximum value".into())
        );
    }

    fn int<T: Copy + Default>(
        f: unsafe extern "C" fn(*const c_char, *const c_char, *mut T) -> c_int,
        s: &str,
    ) -> Result<T, String> {
        scoped(|| {
            let c = CString::new(s).unwrap();
            let mut v = T::default();
            // SAFETY: valid C strings and a valid out-pointer.
            let r = unsafe { f(c"number".as_ptr(), c.as_ptr(), &mut v) };
            if r == -1 {
                Err(take_last_error().unwrap())
            } else {
                Ok(v)
            }
        })
    }

    #[test]
    fn parse_int_bases() {
        assert_eq!(int(nbdkit_parse_int, "42"), Ok(42));
        assert_eq!(int(nbdkit_parse_int, "-42"), Ok(-42));
        assert_eq!(int(nbdkit_parse_int, "0x1f"), Ok(31));
        assert_eq!(int(nbdkit_parse_int, "010"), Ok(8));
        assert_eq!(
            int(nbdkit_parse_uint64_t, "18446744073709551615"),
            Ok(u64::MAX)
        );
        assert_eq!(int(nbdkit_parse_int8_t, "-128"), Ok(-128i8));
    }

    #[test]
    fn parse_int_errors_match_nbdkit() {
        assert_eq!(
            int(nbdkit_parse_int, "lalala"),
            Err("number: empty string where we expected a number".into())
        );
        assert_eq!(
            int(nbdkit_parse_int, "12x"),
            Err("number: could not parse number: \"12x\": trailing garbage".into())
        );
        assert_eq!(
            int(nbdkit_parse_uint8_t, "256"),
            Err("number: could not parse number: \"256\": Numerical result out of range".into())
        );
        assert_eq!(
            int(nbdkit_parse_unsigned, " -1"),
            Err("number: negative numbers are not allowed".into())
        );
        assert_eq!(
            int(nbdkit_parse_int, "99999999999"),
            Err(
                "number: could not parse number: \"99999999999\": Numerical result out of range"
                    .into()
            )
        );
    }

    #[test]
    fn parse_int_null_result_pointer_discards() {
        scoped(|| {
            // SAFETY: valid C strings; NULL result pointer is allowed.
            let r = unsafe { nbdkit_parse_int(c"x".as_ptr(), c"7".as_ptr(), ptr::null_mut()) };
            assert_eq!(r, 0);
        });
    }

    #[test]
    fn parse_bool_words() {
        scoped(|| {
            for (s, v) in [
                (c"on", 1),
                (c"YES", 1),
                (c"t", 1),
                (c"1", 1),
                (c"Off", 0),
                (c"n", 0),
                (c"false", 0),
                (c"0", 0),
                (c"maybe", -1),
            ] {
                // SAFETY: valid C string.
                assert_eq!(unsafe { nbdkit_parse_bool(s.as_ptr()) }, v, "{s:?}");
            }
            assert_eq!(
                take_last_error().unwrap(),
                "could not decipher boolean (maybe)"
            );
        });
    }
}
