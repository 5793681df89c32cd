//! User-creatable objects (`--object`, `object-add`, `object-del`): TLS credentials
//! (`tls-creds-x509`, `tls-creds-psk`), authorization (`authz-simple`, `authz-list`) and
//! secrets, as qemu-storage-daemon 10.0 has them.
//!
//! **What is checked when.** An object is checked completely when it is added, in qsd's order
//! (arguments by the generated parser, then the id, then a duplicate id, then the kind's own
//! checks: files, mutually exclusive members), and qsd's messages are used. Server TLS
//! credentials are loaded into a [`TlsConfig`] at once, so a bad certificate is reported by
//! `object-add`, not by the first client.
//!
//! **Why the table is shared and locked on its own.** Credentials are taken by value
//! (an `Arc`) when `nbd-server-start` names them, so deleting the object does not disturb the
//! running server, as in qsd, which holds a reference. Authorization objects, on the other
//! hand, are looked up by id at every TLS handshake (qsd's `qauthz_is_allowed_by_id`):
//! deleting one refuses every new client, adding it again takes effect at once. Handshakes
//! run on connection threads, which must not wait for the daemon's state lock (a command may
//! hold it while it opens files), so the table is an `Arc` with its own `RwLock`, written
//! only by commands (which also hold the state lock) and read by handshakes.
//!
//! **Deliberate differences from qsd** (each tested in `tests/daemon_tls.rs`):
//! - `tls-authz` also applies to PSK clients, whose identity is their username; qsd ignores
//!   authorization for PSK. A configured check that silently lets everyone in is a trap.
//! - With `tls-authz`, a client that proved no identity (X.509 with `verify-peer=off`) is
//!   refused; qsd skips the check then.
//! - A malformed `keys.psk` is refused by `object-add` (qsd accepts it and fails every
//!   handshake), as `sluice serve --tls-psk` refuses it at start-up.
//! - Malformed certificate files are reported with OpenSSL's reason, not GnuTLS's words.
//! - `priority` (a GnuTLS priority string) and encrypted secrets or keys (`keyid`,
//!   `passwordid` naming an existing secret) are refused rather than ignored.
//! - `object-del` is never refused, as in qsd (which refuses only objects like memory
//!   backends in use, none of which sluice has).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use sluice_block::error::strerror;
use sluice_server::{PeerIdentity, TlsConfig, TlsMode, X509Files};

use serde_json::{json, Value};
use sluice_proto::qmp::ErrorClass;
use sluice_qapi::runtime::FromQapi;

use crate::generated::{
    AuthZListProperties, ObjectOptions, ObjectOptionsBranch, QAuthZListFormat, QAuthZListPolicy,
    QCryptoSecretFormat, QCryptoTLSCredsEndpoint, SecretProperties, ThrottleGroupProperties,
    ThrottleLimits, TlsCredsPskProperties, TlsCredsX509Properties,
};
use crate::throttle::{Limits, ThrottleGroup};
use crate::QmpError;

/// TLS credentials: what `nbd-server-start tls-creds=ID` takes.
#[derive(Clone)]
pub struct TlsCreds {
    /// The loaded server configuration; `None` for client credentials.
    pub server: Option<TlsConfig>,
}

impl std::fmt::Debug for TlsCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsCreds")
            .field("server", &self.server.as_ref().map(TlsConfig::describe))
            .finish()
    }
}

/// One rule of an `authz-list`.
#[derive(Debug, Clone)]
pub struct Rule {
    pub pattern: String,
    pub allow: bool,
    pub glob: bool,
}

/// An object.
#[derive(Debug, Clone)]
pub enum Object {
    TlsCreds(TlsCreds),
    /// `authz-simple`: the one identity allowed.
    AuthzSimple(String),
    /// `authz-list`: rules in order, then the default.
    AuthzList {
        rules: Vec<Rule>,
        allow: bool,
    },
    /// A secret's bytes.
    Secret(Vec<u8>),
    /// A throttle group, shared with the `throttle` nodes that name it.
    ThrottleGroup(Arc<ThrottleGroup>),
}

impl Object {
    /// Whether `identity` passes this object, or `None` if it is not an authorization object.
    fn allows(&self, identity: &str) -> Option<bool> {
        match self {
            Object::AuthzSimple(id) => Some(id == identity),
            Object::AuthzList { rules, allow } => Some(
                rules
                    .iter()
                    .find(|r| {
                        if r.glob {
                            glob_match(r.pattern.as_bytes(), identity.as_bytes())
                        } else {
                            r.pattern == identity
                        }
                    })
                    .map_or(*allow, |r| r.allow),
            ),
            Object::TlsCreds(_) | Object::Secret(_) | Object::ThrottleGroup(_) => None,
        }
    }

    /// The object's QOM type name, as qemu's property errors show it.
    fn type_name(&self) -> &'static str {
        match self {
            Object::TlsCreds(c) if c.server.is_none() => "tls-creds",
            Object::TlsCreds(_) => "tls-creds",
            Object::AuthzSimple(_) => "authz-simple",
            Object::AuthzList { .. } => "authz-list",
            Object::Secret(_) => "secret",
            Object::ThrottleGroup(_) => "throttle-group",
        }
    }
}

/// The daemon's objects, by id, in the order they were added (see the module doc for the
/// lock).
#[derive(Debug, Default)]
pub struct Objects {
    table: RwLock<Vec<(String, Object)>>,
}

impl Objects {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<(String, Object)>> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<(String, Object)>> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The object `id`, if there is one.
    pub fn get(&self, id: &str) -> Option<Object> {
        self.read()
            .iter()
            .find(|(i, _)| i == id)
            .map(|(_, o)| o.clone())
    }

    /// `object-add` / `--object`.
    pub fn add(&self, opts: &ObjectOptions) -> Result<(), QmpError> {
        if !id_wellformed(&opts.id) {
            return Err(QmpError::generic("Parameter 'id' expects an identifier"));
        }
        if self.get(&opts.id).is_some() {
            return Err(QmpError::generic(format!(
                "attempt to add duplicate property '{}' to object (type 'container')",
                opts.id
            )));
        }
        let object = match &opts.u {
            ObjectOptionsBranch::TlsCredsX509(p) => Object::TlsCreds(self.x509(p)?),
            ObjectOptionsBranch::TlsCredsPsk(p) => Object::TlsCreds(psk(p)?),
            ObjectOptionsBranch::AuthzSimple(p) => Object::AuthzSimple(p.identity.clone()),
            ObjectOptionsBranch::AuthzList(p) => authz_list(p),
            ObjectOptionsBranch::Secret(p) => Object::Secret(self.secret(p)?),
            ObjectOptionsBranch::ThrottleGroup(p) => {
                Object::ThrottleGroup(Arc::new(ThrottleGroup::new(throttle_limits(p)?)))
            }
        };
        self.write().push((opts.id.clone(), object));
        Ok(())
    }

    /// The throttle group `id`, for a `throttle` node (qsd's message otherwise).
    pub fn throttle_group(&self, id: &str) -> Result<Arc<ThrottleGroup>, QmpError> {
        match self.get(id) {
            Some(Object::ThrottleGroup(g)) => Ok(g),
            _ => Err(QmpError::generic(format!(
                "Throttle group '{id}' does not exist"
            ))),
        }
    }

    /// The object a QOM path names: its id, or `/objects/ID`.
    fn by_path(&self, path: &str) -> Result<Object, QmpError> {
        let id = path.strip_prefix("/objects/").unwrap_or(path);
        self.get(id).ok_or_else(|| {
            QmpError::new(
                ErrorClass::DeviceNotFound,
                format!("Device '{path}' not found"),
            )
        })
    }

    /// `qom-get`: a throttle group's `limits` or one of its `x-` members.
    pub fn qom_get(&self, path: &str, property: &str) -> Result<Value, QmpError> {
        let object = self.by_path(path)?;
        if let Object::ThrottleGroup(g) = &object {
            let limits = g.limits().to_json();
            if property == "limits" {
                return Ok(limits);
            }
            if let Some(v) = property.strip_prefix("x-").and_then(|k| limits.get(k)) {
                return Ok(v.clone());
            }
        }
        Err(no_property(&object, property))
    }

    /// `qom-set`: a throttle group's `limits` (members not given keep their value); its `x-`
    /// members can only be given at creation, as in qemu.
    pub fn qom_set(&self, path: &str, property: &str, value: &Value) -> Result<(), QmpError> {
        let object = self.by_path(path)?;
        let Object::ThrottleGroup(g) = &object else {
            return Err(no_property(&object, property));
        };
        if property.starts_with("x-") && g.limits().to_json().get(&property[2..]).is_some() {
            return Err(QmpError::generic(
                "Property cannot be set after initialization",
            ));
        }
        if property != "limits" {
            return Err(no_property(&object, property));
        }
        // Read as the group's properties, so that errors name `limits.MEMBER` as qemu's do.
        let policy = sluice_qapi::runtime::CompatPolicy::default();
        let mut inp = sluice_qapi::runtime::Input::json(&policy);
        let props = ThrottleGroupProperties::from_qapi(&mut inp, &json!({"limits": value}))?;
        let limits = match &props.limits {
            Some(l) => g.limits().merge(l)?,
            None => g.limits(),
        };
        g.set_limits(limits);
        Ok(())
    }

    /// `object-del`.
    pub fn del(&self, id: &str) -> Result<(), QmpError> {
        let mut t = self.write();
        let Some(i) = t.iter().position(|(o, _)| o == id) else {
            return Err(QmpError::generic(format!("object '{id}' not found")));
        };
        if let Object::ThrottleGroup(g) = &t[i].1 {
            if Arc::strong_count(g) > 1 {
                return Err(QmpError::generic(format!(
                    "object '{id}' is in use, can not be deleted"
                )));
            }
        }
        t.remove(i);
        Ok(())
    }

    /// The server TLS configuration of credentials `id`, for `nbd-server-start`, with qsd's
    /// messages for an id that names nothing, something else, or client credentials.
    pub fn server_tls(&self, id: &str) -> Result<TlsConfig, QmpError> {
        match self.get(id) {
            None => Err(QmpError::generic(format!(
                "No TLS credentials with id '{id}'"
            ))),
            Some(Object::TlsCreds(c)) => c
                .server
                .ok_or_else(|| QmpError::generic("Expected TLS credentials for a server endpoint")),
            Some(_) => Err(QmpError::generic(format!(
                "Object with id '{id}' is not TLS credentials"
            ))),
        }
    }

    /// The bytes of secret `id` (for nodes that name a key secret).
    pub fn secret_bytes(&self, id: &str) -> Result<Vec<u8>, QmpError> {
        match self.get(id) {
            Some(Object::Secret(b)) => Ok(b),
            _ => Err(QmpError::generic(format!("No secret with id '{id}'"))),
        }
    }

    /// Whether `peer` passes the authorization object `id`, looked up now (see the module
    /// doc). A missing id or an object that is not an authorization object refuses, as in
    /// qsd; so does a peer without an identity.
    pub fn authorize(&self, id: &str, peer: &PeerIdentity) -> bool {
        let identity = match peer {
            PeerIdentity::X509(dn) => dn.as_str(),
            PeerIdentity::Psk(user) => user.as_str(),
            PeerIdentity::Anonymous => {
                tracing::warn!("TLS authz {id}: client has no identity (no certificate)");
                return false;
            }
        };
        let verdict = match self.read().iter().find(|(i, _)| i == id) {
            None => {
                tracing::warn!("Cannot find QAuthZ object ID {id}");
                return false;
            }
            Some((_, o)) => o.allows(identity),
        };
        match verdict {
            None => {
                tracing::warn!("Object '{id}' is not a QAuthZ subclass");
                false
            }
            Some(ok) => {
                if !ok {
                    tracing::warn!("TLS authz check for {identity} is denied");
                }
                ok
            }
        }
    }

    fn x509(&self, p: &TlsCredsX509Properties) -> Result<TlsCreds, QmpError> {
        check_priority(p.priority.as_deref())?;
        if let Some(id) = &p.passwordid {
            self.secret_bytes(id)?;
            return Err(QmpError::generic(
                "Encrypted private keys (passwordid) are not supported: decrypt server-key.pem",
            ));
        }
        let dir = need_dir(p.dir.as_deref())?;
        require(&dir, "ca-cert.pem")?;
        if p.endpoint != Some(QCryptoTLSCredsEndpoint::Server) {
            return Ok(TlsCreds { server: None });
        }
        require(&dir, "server-cert.pem")?;
        require(&dir, "server-key.pem")?;
        let files = X509Files::in_dir(&dir);
        let config = TlsConfig::x509(TlsMode::Require, &files, p.verify_peer.unwrap_or(true))
            .map_err(|e| QmpError::generic(format!("Unable to load TLS credentials: {e}")))?;
        Ok(TlsCreds {
            server: Some(config),
        })
    }

    fn secret(&self, p: &SecretProperties) -> Result<Vec<u8>, QmpError> {
        let text = match (&p.data, &p.file) {
            (Some(_), Some(_)) => {
                return Err(QmpError::generic(
                    "'file' and 'data' are mutually exclusive",
                ))
            }
            (None, None) => {
                return Err(QmpError::generic(
                    "Either 'file' or 'data' must be provided",
                ))
            }
            (Some(d), None) => d.as_bytes().to_vec(),
            (None, Some(f)) => std::fs::read(f).map_err(|e| {
                QmpError::generic(format!(
                    "Unable to read {f}: Failed to open file \u{201c}{f}\u{201d}: {}",
                    strerror(&e)
                ))
            })?,
        };
        let bytes = match p.format {
            None | Some(QCryptoSecretFormat::Raw) => text,
            Some(QCryptoSecretFormat::Base64) => base64_decode(&text)?,
        };
        if let Some(id) = &p.keyid {
            self.secret_bytes(id)?;
            return Err(QmpError::generic(
                "Encrypted secrets (keyid) are not supported: give the secret in clear",
            ));
        }
        Ok(bytes)
    }
}

/// qemu's message for a property an object does not have.
fn no_property(object: &Object, property: &str) -> QmpError {
    QmpError::generic(format!(
        "Property '{}.{property}' not found",
        object.type_name()
    ))
}

/// A throttle group's limits from its properties: `limits`, then the `x-` members.
fn throttle_limits(p: &ThrottleGroupProperties) -> Result<Limits, QmpError> {
    let mut limits = Limits::default();
    if let Some(l) = &p.limits {
        limits = limits.merge(l)?;
    }
    let x = json!({
        "iops-total": p.x_iops_total, "iops-total-max": p.x_iops_total_max,
        "iops-total-max-length": p.x_iops_total_max_length,
        "iops-read": p.x_iops_read, "iops-read-max": p.x_iops_read_max,
        "iops-read-max-length": p.x_iops_read_max_length,
        "iops-write": p.x_iops_write, "iops-write-max": p.x_iops_write_max,
        "iops-write-max-length": p.x_iops_write_max_length,
        "bps-total": p.x_bps_total, "bps-total-max": p.x_bps_total_max,
        "bps-total-max-length": p.x_bps_total_max_length,
        "bps-read": p.x_bps_read, "bps-read-max": p.x_bps_read_max,
        "bps-read-max-length": p.x_bps_read_max_length,
        "bps-write": p.x_bps_write, "bps-write-max": p.x_bps_write_max,
        "bps-write-max-length": p.x_bps_write_max_length,
        "iops-size": p.x_iops_size,
    });
    let given: serde_json::Map<String, Value> = x
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if given.is_empty() {
        return Ok(limits);
    }
    let policy = sluice_qapi::runtime::CompatPolicy::default();
    let mut inp = sluice_qapi::runtime::Input::json(&policy);
    let l = ThrottleLimits::from_qapi(&mut inp, &Value::Object(given))?;
    limits.merge(&l)
}

/// A well-formed object id: QEMU's `id_wellformed` (a letter, then letters, digits, `-`,
/// `.`, `_`).
pub fn id_wellformed(id: &str) -> bool {
    let mut c = id.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic())
        && c.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

fn psk(p: &TlsCredsPskProperties) -> Result<TlsCreds, QmpError> {
    check_priority(p.priority.as_deref())?;
    let server = p.endpoint == Some(QCryptoTLSCredsEndpoint::Server);
    if server && p.username.is_some() {
        return Err(QmpError::generic(
            "username should not be set when endpoint=server",
        ));
    }
    let dir = need_dir(p.dir.as_deref())?;
    let keys = require(&dir, "keys.psk")?;
    if !server {
        return Ok(TlsCreds { server: None });
    }
    let config = TlsConfig::psk(TlsMode::Require, &keys)
        .map_err(|e| QmpError::generic(format!("Unable to load TLS credentials: {e}")))?;
    Ok(TlsCreds {
        server: Some(config),
    })
}

fn authz_list(p: &AuthZListProperties) -> Object {
    Object::AuthzList {
        rules: p
            .rules
            .iter()
            .flatten()
            .map(|r| Rule {
                pattern: r.r#match.clone(),
                allow: r.policy == QAuthZListPolicy::Allow,
                glob: r.format == Some(QAuthZListFormat::Glob),
            })
            .collect(),
        allow: p.policy == Some(QAuthZListPolicy::Allow),
    }
}

fn check_priority(priority: Option<&str>) -> Result<(), QmpError> {
    match priority {
        None => Ok(()),
        Some(p) => Err(QmpError::generic(format!(
            "TLS priority '{p}' is a GnuTLS priority string; sluice's TLS is OpenSSL and does \
             not take one (omit 'priority')"
        ))),
    }
}

fn need_dir(dir: Option<&str>) -> Result<PathBuf, QmpError> {
    dir.map(PathBuf::from)
        .ok_or_else(|| QmpError::generic("Missing 'dir' property value"))
}

/// `dir/name`, which must be accessible (qemu's `qcrypto_tls_creds_get_path` message).
fn require(dir: &Path, name: &str) -> Result<PathBuf, QmpError> {
    let path = dir.join(name);
    match std::fs::metadata(&path) {
        Ok(_) => Ok(path),
        Err(e) => Err(QmpError::generic(format!(
            "Unable to access credentials {}: {}",
            path.display(),
            strerror(&e)
        ))),
    }
}

/// QEMU's `qbase64_decode`: characters outside the Base64 alphabet (newlines aside) are an
/// error; the rest is decoded as GLib does, leniently (padding optional, a trailing partial
/// group ignored).
fn base64_decode(text: &[u8]) -> Result<Vec<u8>, QmpError> {
    fn value(c: u8) -> Option<u8> {
        match c {
            b'A'..=b'Z' => Some(c - b'A'),
            b'a'..=b'z' => Some(c - b'a' + 26),
            b'0'..=b'9' => Some(c - b'0' + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    if text
        .iter()
        .any(|&c| value(c).is_none() && !matches!(c, b'=' | b'\n'))
    {
        return Err(QmpError::generic("Base64 data contains invalid characters"));
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for v in text.iter().filter_map(|&c| value(c)) {
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

/// `fnmatch(pattern, text, 0)`: `*` and `?` match any bytes (`/` included), `[...]` a set
/// (`!` or `^` negates, `a-z` ranges), `\` quotes the next byte.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // Where to resume after the last `*`: (pattern index after it, text index it took up to).
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        let step = match pattern.get(p) {
            Some(b'*') => {
                star = Some((p + 1, t));
                p += 1;
                continue;
            }
            Some(b'?') => Some(1),
            Some(b'[') => match match_set(&pattern[p..], text[t]) {
                Some((matched, len)) => matched.then_some(len),
                None => (text[t] == b'[').then_some(1),
            },
            Some(b'\\') if p + 1 < pattern.len() => (pattern[p + 1] == text[t]).then_some(2),
            Some(&c) => (c == text[t]).then_some(1),
            None => None,
        };
        match step {
            Some(n) => {
                p += n;
                t += 1;
            }
            None => match star {
                Some((sp, st)) => {
                    p = sp;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Whether the set `pattern` starts with matches `c`, and the set's length in the pattern;
/// `None` if the set is unterminated (then `[` is a literal, as in fnmatch).
fn match_set(pattern: &[u8], c: u8) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(pattern.get(i), Some(b'!' | b'^'));
    if negate {
        i += 1;
    }
    let mut found = false;
    let mut first = true;
    loop {
        let &lo = pattern.get(i)?;
        if lo == b']' && !first {
            break;
        }
        first = false;
        if pattern.get(i + 1) == Some(&b'-') && pattern.get(i + 2).is_some_and(|&h| h != b']') {
            let hi = pattern[i + 2];
            found |= (lo..=hi).contains(&c);
            i += 3;
        } else {
            found |= lo == c;
            i += 1;
        }
    }
    Some((found != negate, i + 1))
}

/// The `tls-authz` hook of the NBD server: `id` in `objects`, looked up per handshake.
pub fn authz_hook(objects: &Arc<Objects>, id: &str) -> sluice_server::tls::Authz {
    let objects = objects.clone();
    let id = id.to_string();
    Arc::new(move |peer: &PeerIdentity| objects.authorize(&id, peer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_match_follows_fnmatch() {
        let m = |p: &str, t: &str| glob_match(p.as_bytes(), t.as_bytes());
        assert!(m("*", ""));
        assert!(m("CN=client*", "CN=client1,O=Test"));
        assert!(m("*,CN=client1", "C=GB,O=Test,CN=client1"));
        assert!(!m("*,CN=client1", "C=GB,O=Test,CN=client12"));
        assert!(m("a?c", "abc"));
        assert!(!m("a?c", "ac"));
        assert!(m("[a-c]x", "bx"));
        assert!(!m("[!a-c]x", "bx"));
        assert!(m("[]]", "]"));
        assert!(m("a\\*", "a*"));
        assert!(!m("a\\*", "ab"));
        assert!(m("a*b*c", "a/xx/b/c"));
        assert!(m("[unterminated", "[unterminated"));
    }

    #[test]
    fn authz_list_first_match_decides_else_default() {
        let list = Object::AuthzList {
            rules: vec![
                Rule {
                    pattern: "bob".into(),
                    allow: false,
                    glob: false,
                },
                Rule {
                    pattern: "b*".into(),
                    allow: true,
                    glob: true,
                },
            ],
            allow: false,
        };
        assert_eq!(list.allows("bob"), Some(false));
        assert_eq!(list.allows("bill"), Some(true));
        assert_eq!(list.allows("alice"), Some(false));
        assert_eq!(Object::Secret(vec![]).allows("x"), None);
    }

    #[test]
    fn base64_decode_is_strict_on_characters_lenient_on_length() {
        assert_eq!(base64_decode(b"aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode(b"aGVs\nbG8").unwrap(), b"hello");
        assert_eq!(base64_decode(b"abc").unwrap(), b"i\xb7");
        assert_eq!(
            base64_decode(b"!!!").unwrap_err().desc,
            "Base64 data contains invalid characters"
        );
    }

    #[test]
    fn authorize_unknown_id_or_wrong_kind_refuses() {
        let o = Objects::default();
        o.write().push(("s".into(), Object::Secret(b"k".to_vec())));
        o.write()
            .push(("a".into(), Object::AuthzSimple("alice".into())));
        let alice = PeerIdentity::Psk("alice".into());
        assert!(o.authorize("a", &alice));
        assert!(!o.authorize("a", &PeerIdentity::Psk("bob".into())));
        assert!(!o.authorize("a", &PeerIdentity::Anonymous));
        assert!(!o.authorize("s", &alice));
        assert!(!o.authorize("nosuch", &alice));
        o.del("a").unwrap();
        assert!(!o.authorize("a", &alice));
        assert_eq!(o.del("a").unwrap_err().desc, "object 'a' not found");
    }

    #[test]
    fn server_tls_names_the_problem() {
        let o = Objects::default();
        o.write()
            .push(("a".into(), Object::AuthzSimple("alice".into())));
        o.write()
            .push(("c".into(), Object::TlsCreds(TlsCreds { server: None })));
        assert_eq!(
            o.server_tls("x").unwrap_err().desc,
            "No TLS credentials with id 'x'"
        );
        assert_eq!(
            o.server_tls("a").unwrap_err().desc,
            "Object with id 'a' is not TLS credentials"
        );
        assert_eq!(
            o.server_tls("c").unwrap_err().desc,
            "Expected TLS credentials for a server endpoint"
        );
    }
}
