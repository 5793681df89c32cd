//! Size strings with nbdkit's syntax (`1G`, `512s`, `100M`).
//!
//! Users switch between nbdkit and sluice by changing one word on the command line, so
//! [`parse_size`] accepts exactly what nbdkit 1.32's `nbdkit_parse_size` accepts, rejects what
//! it rejects and words its errors the same way. That C function is `strtoimax(str, 10)`
//! followed by one optional suffix, and its quirks are kept on purpose: leading whitespace and
//! a `+` or `-` sign are allowed (so `-0` is 0), the number is decimal even with leading
//! zeroes, trailing whitespace is an "unknown suffix", and the result must fit in `i64`
//! because disk sizes are `off_t`.

/// Why a size string was refused. The text is nbdkit's, with the offending string in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SizeError {
    /// No digits where the number should be (empty string, `k`, `+`).
    #[error("could not parse size string ({0})")]
    NotANumber(String),
    /// A number below zero.
    #[error("size cannot be negative ({0})")]
    Negative(String),
    /// The number itself does not fit in an `i64`.
    #[error("size ({0}) exceeds maximum value")]
    TooLarge(String),
    /// Something other than one of `bBkKmMgGtTpPeEsS` after the number; holds the rest of
    /// the string from the first unknown character.
    #[error("could not parse size: unknown suffix '{0}'")]
    UnknownSuffix(String),
    /// The number is fine but times its suffix it exceeds `i64::MAX`.
    #[error("overflow computing size ({0})")]
    Overflow(String),
}

/// The largest size nbdkit (and so sluice) accepts: `off_t` is signed.
pub const MAX_SIZE: u64 = i64::MAX as u64;

/// Parses a size such as `1G` into bytes, with nbdkit's syntax and limits.
///
/// A decimal number, optionally signed and preceded by whitespace, then at most one suffix:
/// `b`/`B` bytes, `s`/`S` 512-byte sectors, or `k`, `m`, `g`, `t`, `p`, `e` (either case)
/// for powers of 1024. The result is at most `i64::MAX`.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let bytes = s.as_bytes();
    // C isspace() in the "C" locale: space, \t, \n, \v, \f, \r.
    let mut i = bytes
        .iter()
        .position(|&b| !matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r'))
        .unwrap_or(bytes.len());
    let negative = match bytes.get(i) {
        Some(b'-') => {
            i += 1;
            true
        }
        Some(b'+') => {
            i += 1;
            false
        }
        _ => false,
    };
    let digits_start = i;
    // Accumulate as strtoimax does: saturate, and remember that it did (ERANGE).
    let mut value: u64 = 0;
    let mut out_of_range = false;
    while let Some(d) = bytes.get(i).filter(|b| b.is_ascii_digit()) {
        let digit = u64::from(d - b'0');
        match value.checked_mul(10).and_then(|v| v.checked_add(digit)) {
            Some(v) => value = v,
            None => out_of_range = true,
        }
        i += 1;
    }
    if i == digits_start {
        return Err(SizeError::NotANumber(s.to_owned()));
    }
    // strtoimax clamps to INT64_MIN / INT64_MAX; nbdkit tests the sign before errno.
    let limit = if negative { MAX_SIZE + 1 } else { MAX_SIZE };
    if value > limit {
        out_of_range = true;
    }
    if negative && (value != 0 || out_of_range) {
        return Err(SizeError::Negative(s.to_owned()));
    }
    if out_of_range {
        return Err(SizeError::TooLarge(s.to_owned()));
    }

    let rest = &s[i..];
    let scale: u64 = match rest.as_bytes().first() {
        None => return Ok(value),
        Some(b'b' | b'B') => 1,
        Some(b's' | b'S') => 512,
        Some(b'k' | b'K') => 1 << 10,
        Some(b'm' | b'M') => 1 << 20,
        Some(b'g' | b'G') => 1 << 30,
        Some(b't' | b'T') => 1 << 40,
        Some(b'p' | b'P') => 1 << 50,
        Some(b'e' | b'E') => 1 << 60,
        Some(_) => return Err(SizeError::UnknownSuffix(rest.to_owned())),
    };
    if rest.len() > 1 {
        return Err(SizeError::UnknownSuffix(rest.to_owned()));
    }
    if MAX_SIZE / scale < value {
        return Err(SizeError::Overflow(s.to_owned()));
    }
    Ok(value * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_size_plain_number_is_bytes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("12345"), Ok(12345));
        assert_eq!(parse_size("010"), Ok(10));
    }

    #[test]
    fn parse_size_suffixes_are_powers_of_1024_either_case() {
        let cases = [
            ("1b", 1),
            ("1B", 1),
            ("1s", 512),
            ("3S", 1536),
            ("1k", 1 << 10),
            ("1K", 1 << 10),
            ("2m", 2 << 20),
            ("2M", 2 << 20),
            ("1g", 1 << 30),
            ("1G", 1 << 30),
            ("1t", 1 << 40),
            ("1T", 1 << 40),
            ("1p", 1 << 50),
            ("1P", 1 << 50),
            ("1e", 1 << 60),
            ("7E", 7 << 60),
        ];
        for (s, want) in cases {
            assert_eq!(parse_size(s), Ok(want), "{s}");
        }
    }

    #[test]
    fn parse_size_leading_space_and_sign_accepted_like_strtoimax() {
        assert_eq!(parse_size(" 12"), Ok(12));
        assert_eq!(parse_size("\t5"), Ok(5));
        assert_eq!(parse_size("+1"), Ok(1));
        assert_eq!(parse_size(" +1k"), Ok(1024));
        assert_eq!(parse_size("-0"), Ok(0));
        assert_eq!(parse_size("-00k"), Ok(0));
    }

    #[test]
    fn parse_size_max_is_i64_max() {
        assert_eq!(parse_size("9223372036854775807"), Ok(MAX_SIZE));
        assert_eq!(parse_size("8191P"), Ok(8191 << 50));
        assert_eq!(
            parse_size("9223372036854775808"),
            Err(SizeError::TooLarge("9223372036854775808".into()))
        );
        assert_eq!(
            parse_size("99999999999999999999k"),
            Err(SizeError::TooLarge("99999999999999999999k".into()))
        );
    }

    #[test]
    fn parse_size_suffix_overflow_rejected() {
        assert_eq!(parse_size("8E"), Err(SizeError::Overflow("8E".into())));
        assert_eq!(
            parse_size("8192P"),
            Err(SizeError::Overflow("8192P".into()))
        );
    }

    #[test]
    fn parse_size_negative_rejected() {
        assert_eq!(parse_size("-1"), Err(SizeError::Negative("-1".into())));
        assert_eq!(parse_size(" -1k"), Err(SizeError::Negative(" -1k".into())));
        let huge = "-99999999999999999999";
        assert_eq!(parse_size(huge), Err(SizeError::Negative(huge.into())));
    }

    #[test]
    fn parse_size_no_digits_rejected() {
        for s in ["", " ", "k", "+", "-", "+-1", "x1"] {
            assert_eq!(parse_size(s), Err(SizeError::NotANumber(s.into())), "{s:?}");
        }
    }

    #[test]
    fn parse_size_unknown_or_long_suffix_rejected() {
        let cases = [
            ("1Q", "Q"),
            ("1 ", " "),
            ("1 M", " M"),
            ("1\n", "\n"),
            ("0x10", "x10"),
            ("1.5M", ".5M"),
            ("1kB", "kB"),
            ("1KiB", "KiB"),
            ("1M1", "M1"),
            ("1mb", "mb"),
            ("1é", "é"),
        ];
        for (s, rest) in cases {
            assert_eq!(
                parse_size(s),
                Err(SizeError::UnknownSuffix(rest.into())),
                "{s:?}"
            );
        }
    }

    #[test]
    fn size_error_display_matches_nbdkit() {
        assert_eq!(
            parse_size("1Q").unwrap_err().to_string(),
            "could not parse size: unknown suffix 'Q'"
        );
        assert_eq!(
            parse_size("").unwrap_err().to_string(),
            "could not parse size string ()"
        );
        assert_eq!(
            parse_size("9223372036854775808").unwrap_err().to_string(),
            "size (9223372036854775808) exceeds maximum value"
        );
        assert_eq!(
            parse_size("-1").unwrap_err().to_string(),
            "size cannot be negative (-1)"
        );
        assert_eq!(
            parse_size("8E").unwrap_err().to_string(),
            "overflow computing size (8E)"
        );
    }
}
