//! `sluice daemon --object secret,...`: qemu's `secret` objects, the minimum the `rbd`
//! driver's `key-secret` needs.
//!
//! Only `--object secret,id=ID,data=TEXT|file=PATH[,format=raw|base64]` on the command line
//! (qemu-storage-daemon's spelling), held in a table the rbd driver reads through
//! [`SecretLookup`]. Encrypted secrets (`keyid=`, `iv=`), other object types and QMP's
//! `object-add` are refused with a message saying so. It is its own file on purpose: the
//! daemon's general object table (secrets for TLS too, `object-add`/`object-del`) is being
//! built elsewhere, and when it lands this table is replaced by a lookup into it; nothing
//! else here depends on how secrets are stored.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context};
use serde_json::Value;
use sluice_daemon::graph::rbd::SecretLookup;

/// The secrets given on the command line, by id.
#[derive(Default)]
pub struct CliSecrets {
    by_id: HashMap<String, Vec<u8>>,
}

impl std::fmt::Debug for CliSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ids: Vec<&String> = self.by_id.keys().collect();
        ids.sort();
        f.debug_struct("CliSecrets").field("ids", &ids).finish()
    }
}

impl SecretLookup for CliSecrets {
    fn secret(&self, id: &str) -> Result<Vec<u8>, String> {
        self.by_id
            .get(id)
            .cloned()
            .ok_or_else(|| format!("No secret with id '{id}'"))
    }
}

impl CliSecrets {
    /// Adds one `--object` option's secret.
    pub fn add(&mut self, text: &str) -> anyhow::Result<()> {
        let v = sluice_qapi::keyval::parse(text, Some("qom-type"))
            .map_err(|e| anyhow!("--object {text}: {e}"))?;
        let fail = |why: &str| anyhow!("--object {text}: {why}");
        let Value::Object(m) = v else {
            bail!(fail("expected key=value options"));
        };
        let get = |k: &str| m.get(k).and_then(Value::as_str);
        match get("qom-type") {
            Some("secret") => {}
            Some(t) => bail!(fail(&format!(
                "object type '{t}' is not supported by sluice yet (only 'secret')"
            ))),
            None => bail!(fail("Parameter 'qom-type' is missing")),
        }
        for k in m.keys() {
            match k.as_str() {
                "qom-type" | "id" | "data" | "file" | "format" => {}
                "keyid" | "iv" => bail!(fail(
                    "encrypted secrets (keyid=, iv=) are not supported by sluice yet"
                )),
                k => bail!(fail(&format!("Property '{k}' not found"))),
            }
        }
        let id = get("id").ok_or_else(|| fail("Parameter 'id' is missing"))?;
        if !sluice_daemon::graph::id_wellformed(id) {
            bail!(fail(&format!("Invalid object id '{id}'")));
        }
        if self.by_id.contains_key(id) {
            bail!(fail(&format!("attempt to add duplicate property '{id}'")));
        }
        let raw = match (get("data"), get("file")) {
            (Some(d), None) => d.as_bytes().to_vec(),
            (None, Some(f)) => {
                std::fs::read(f).with_context(|| format!("--object {text}: Unable to read {f}"))?
            }
            _ => bail!(fail("Either 'file' or 'data' must be provided")),
        };
        let data = match get("format").unwrap_or("raw") {
            "raw" => raw,
            "base64" => decode_base64(&raw).ok_or_else(|| fail("data is not valid base64"))?,
            f => bail!(fail(&format!("format '{f}' is not raw or base64"))),
        };
        self.by_id.insert(id.to_string(), data);
        Ok(())
    }
}

/// Standard base64 (padding optional, surrounding whitespace ignored).
fn decode_base64(text: &[u8]) -> Option<Vec<u8>> {
    let text = text.trim_ascii();
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    let body = text.strip_suffix(b"==").or_else(|| text.strip_suffix(b"="));
    for &c in body.unwrap_or(text) {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = acc << 6 | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_base64_round_trips_ceph_keys() {
        assert_eq!(decode_base64(b"Zm9vYg==").unwrap(), b"foob");
        assert_eq!(decode_base64(b"Zm9v\n").unwrap(), b"foo");
        assert_eq!(decode_base64(b"Zm8=").unwrap(), b"fo");
        assert!(decode_base64(b"Zm9v!").is_none());
    }

    #[test]
    fn add_reads_data_file_and_format() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key");
        std::fs::write(&f, "QUJDRA==\n").unwrap();
        let mut s = CliSecrets::default();
        s.add("secret,id=a,data=hello").unwrap();
        s.add(&format!("secret,id=b,format=base64,file={}", f.display()))
            .unwrap();
        assert_eq!(s.secret("a").unwrap(), b"hello");
        assert_eq!(s.secret("b").unwrap(), b"ABCD");
        assert_eq!(s.secret("c").unwrap_err(), "No secret with id 'c'");
    }

    #[test]
    fn add_refuses_what_it_does_not_do_in_one_line() {
        let mut s = CliSecrets::default();
        s.add("secret,id=a,data=x").unwrap();
        for (text, want) in [
            ("secret,id=a,data=y", "duplicate"),
            ("secret,id=b", "Either 'file' or 'data'"),
            ("secret,id=b,data=x,file=/y", "Either 'file' or 'data'"),
            ("tls-creds-x509,id=t,dir=/x", "only 'secret'"),
            ("secret,id=b,data=x,keyid=k", "encrypted secrets"),
            ("secret,data=x", "'id' is missing"),
            ("secret,id=b,data=!!,format=base64", "not valid base64"),
            ("secret,id=b,data=x,bogus=1", "Property 'bogus' not found"),
        ] {
            let e = s.add(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
            assert!(e.starts_with("--object "), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
