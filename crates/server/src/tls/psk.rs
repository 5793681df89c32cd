//! Pre-shared key files in psktool's format: one `username:hexkey` line per client, as
//! nbdkit's `--tls-psk` and qemu's `tls-creds-psk` (`keys.psk`) read them.
//!
//! The file is parsed strictly when the server starts, so a malformed line stops it with the
//! line number rather than failing every handshake later. At handshake time the file is read
//! again (GnuTLS does the same for nbdkit and qemu, so keys can be rotated without a
//! restart); if it has become unreadable or malformed meanwhile, the handshake fails and the
//! reason is logged.

use std::path::{Path, PathBuf};

use super::TlsError;

/// Longest key OpenSSL accepts from a PSK callback (`PSK_MAX_PSK_LEN`).
const MAX_KEY_LEN: usize = 512;
/// Longest identity OpenSSL accepts (`PSK_MAX_IDENTITY_LEN`).
const MAX_USERNAME_LEN: usize = 256;

/// A PSK file, identified by its path.
#[derive(Debug)]
pub struct PskFile {
    path: PathBuf,
}

impl PskFile {
    /// Checks that `path` is a readable, well-formed PSK file with at least one key.
    pub fn open(path: &Path) -> Result<PskFile, TlsError> {
        let keys = read(path)?;
        if keys.is_empty() {
            return Err(TlsError::File {
                path: path.to_path_buf(),
                problem: "no `username:hexkey` line in it".into(),
            });
        }
        Ok(PskFile {
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Copies the key of `username` into `out` (OpenSSL's PSK buffer) and returns its length;
    /// None (the handshake fails) for an unknown user or a file that went bad.
    pub(crate) fn key_into(&self, username: &[u8], out: &mut [u8]) -> Option<usize> {
        let keys = match read(&self.path) {
            Ok(keys) => keys,
            Err(e) => {
                tracing::warn!("TLS PSK: {e}");
                return None;
            }
        };
        let Some((_, key)) = keys.iter().find(|(u, _)| u.as_bytes() == username) else {
            tracing::info!(
                "TLS PSK: unknown username {:?}",
                String::from_utf8_lossy(username)
            );
            return None;
        };
        let dst = out.get_mut(..key.len())?;
        dst.copy_from_slice(key);
        Some(key.len())
    }
}

/// `(username, key)` per line of a PSK file.
type Keys = Vec<(String, Vec<u8>)>;

/// Reads and parses the file; blank lines are skipped.
fn read(path: &Path) -> Result<Keys, TlsError> {
    let text = std::fs::read(path).map_err(|e| TlsError::File {
        path: path.to_path_buf(),
        problem: format!("cannot read: {}", super::io_reason(&e)),
    })?;
    let text = String::from_utf8(text).map_err(|_| TlsError::File {
        path: path.to_path_buf(),
        problem: "not a text file of `username:hexkey` lines".into(),
    })?;
    parse(&text).map_err(|(line, problem)| TlsError::File {
        path: path.to_path_buf(),
        problem: format!("line {line}: {problem}"),
    })
}

/// Parses psktool's format; an error is (line number, problem).
fn parse(text: &str) -> Result<Keys, (usize, String)> {
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let Some((user, hex)) = line.split_once(':') else {
            return Err((n, "expected `username:hexkey`, found no `:`".into()));
        };
        if user.is_empty() {
            return Err((n, "empty username".into()));
        }
        if user.len() > MAX_USERNAME_LEN {
            return Err((n, format!("username longer than {MAX_USERNAME_LEN} bytes")));
        }
        let key = decode_hex(hex).ok_or_else(|| {
            (
                n,
                format!("key of {user:?} is not an even number of hexadecimal digits"),
            )
        })?;
        if key.is_empty() {
            return Err((n, format!("empty key for {user:?}")));
        }
        if key.len() > MAX_KEY_LEN {
            return Err((
                n,
                format!("key of {user:?} is longer than {MAX_KEY_LEN} bytes"),
            ));
        }
        if keys.iter().any(|(u, _)| u == user) {
            return Err((n, format!("username {user:?} appears twice")));
        }
        keys.push((user.to_string(), key));
    }
    Ok(keys)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_psktool_lines() {
        let keys = parse("alice:00ff10\n\nbob:ABCD\r\n").unwrap();
        assert_eq!(
            keys,
            vec![
                ("alice".to_string(), vec![0, 0xff, 0x10]),
                ("bob".to_string(), vec![0xab, 0xcd])
            ]
        );
    }

    #[test]
    fn parse_missing_colon_names_line() {
        assert_eq!(parse("alice:00\nbob\n").unwrap_err().0, 2);
    }

    #[test]
    fn parse_bad_hex_refused() {
        let (line, msg) = parse("alice:zz12\n").unwrap_err();
        assert_eq!(line, 1);
        assert!(msg.contains("hexadecimal"), "{msg}");
        assert!(parse("alice:abc\n").is_err());
    }

    #[test]
    fn parse_empty_user_or_key_refused() {
        assert!(parse(":00\n").is_err());
        assert!(parse("alice:\n").is_err());
    }

    #[test]
    fn parse_duplicate_user_refused() {
        assert_eq!(parse("a:00\na:01\n").unwrap_err().0, 2);
    }

    #[test]
    fn parse_oversized_key_refused() {
        let line = format!("a:{}\n", "00".repeat(MAX_KEY_LEN + 1));
        assert!(parse(&line).is_err());
    }

    #[test]
    fn key_into_unknown_user_is_none() {
        let dir = std::env::temp_dir().join(format!("sluice-psk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.psk");
        std::fs::write(&path, "alice:0102\n").unwrap();
        let f = PskFile::open(&path).unwrap();
        let mut out = [0u8; 64];
        assert_eq!(f.key_into(b"alice", &mut out), Some(2));
        assert_eq!(&out[..2], &[1, 2]);
        assert_eq!(f.key_into(b"bob", &mut out), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
