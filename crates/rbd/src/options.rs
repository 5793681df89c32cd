//! What to open: the typed options of an RBD export, and their parsing from nbdkit-style
//! `key=value` parameters.
//!
//! [`RbdOptions`] is the one description of "which image, on which cluster, as whom" that
//! every front end fills in: `sluice serve rbd ...` through [`RbdOptions::from_args`], and a
//! daemon driver (qemu's `blockdev-add driver=rbd` options map one to one: pool, namespace,
//! image, snapshot, conf, user, key) by setting the fields. Parsing is pure apart from
//! resolving the paths it is given (so a typo in `conf=` fails at startup, before any
//! connection), and the secret `key` never appears in `Debug` output.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sluice_block::plugins::{ConfigArg, ConfigError};

/// The key a bare value on the command line stands for: an image spec.
pub const MAGIC_KEY: &str = "image";

/// Parameter help for `--help`.
pub const HELP: &str = "\
[image=][POOL/[NAMESPACE/]]IMAGE[@SNAP]  The RBD image to serve (a snapshot is read-only).
pool=<POOL>             The pool holding the image (default: from the image spec).
namespace=<NS>          The RADOS namespace of the image inside the pool.
snapshot=<SNAP>         Serve this snapshot of the image, read-only.
conf=<CEPH.CONF>        Ceph configuration file (default: Ceph's search path).
id=<ID>                 Connect as client.ID (default admin; user= is a synonym).
keyring=<FILE>          Keyring holding client.ID's key.
key=<BASE64>|+<FILE>    client.ID's key itself, or a file holding it.
timeout=<SECS>          Give up connecting after SECS (default: conf's, else 30).
break-lock=on           Take the image's exclusive lock over from its holder (blocklisting
                        it), e.g. after the host serving it died (default off).
ceph.<OPTION>=<VALUE>   Set any Ceph client option (e.g. ceph.rbd_cache=false).";

const PLUGIN: &str = "rbd";

/// Ceph's defaults for the options [`RbdOptions::timeout`] sets; a value still at its
/// default was not set by the configuration file, so ours applies.
pub(crate) const CEPH_TIMEOUT_DEFAULTS: [(&str, f64); 3] = [
    ("client_mount_timeout", 300.0),
    ("rados_mon_op_timeout", 0.0),
    ("rados_osd_op_timeout", 0.0),
];

/// How long to wait for the monitors (connecting, and every monitor operation) when neither
/// `timeout=` nor the configuration file says: a cluster that is down fails instead of
/// hanging (Ceph's own default is 300 s for the mount and forever for the operations).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The same for a single OSD operation (reading the image header at open, and I/O).
pub const DEFAULT_OSD_TIMEOUT: Duration = Duration::from_secs(60);

/// Which image to open and how to reach its cluster.
#[derive(Clone, PartialEq, Eq)]
pub struct RbdOptions {
    /// The pool holding the image.
    pub pool: String,
    /// The RADOS namespace inside the pool ("" or None: the default namespace).
    pub namespace: Option<String>,
    /// The image name.
    pub image: String,
    /// A snapshot to serve instead of the image head (always read-only).
    pub snapshot: Option<String>,
    /// The Ceph configuration file; None searches Ceph's default locations
    /// (`$CEPH_CONF`, `/etc/ceph/ceph.conf`, `~/.ceph/config`, `./ceph.conf`).
    pub conf: Option<PathBuf>,
    /// The client id: `admin` for `client.admin` (qemu's `user`). None: `admin`.
    pub id: Option<String>,
    /// A keyring file holding the client's key.
    pub keyring: Option<PathBuf>,
    /// The client's key itself (base64), e.g. from a QMP `secret` object.
    pub key: Option<String>,
    /// Timeout for connecting and for monitor operations; OSD operations get twice as long.
    /// None: the configuration file's values, else [`DEFAULT_TIMEOUT`] and
    /// [`DEFAULT_OSD_TIMEOUT`].
    pub timeout: Option<Duration>,
    /// Further Ceph client options, applied last (`ceph.rbd_cache=false`).
    pub ceph: Vec<(String, String)>,
    /// Writable opens of an image with the exclusive-lock feature take its lock and refuse
    /// to start while another client holds it; with `break_lock` the holder's lock is broken
    /// (and the holder blocklisted) first. See [`crate::image`].
    pub break_lock: bool,
}

impl std::fmt::Debug for RbdOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbdOptions")
            .field("pool", &self.pool)
            .field("namespace", &self.namespace)
            .field("image", &self.image)
            .field("snapshot", &self.snapshot)
            .field("conf", &self.conf)
            .field("id", &self.id)
            .field("keyring", &self.keyring)
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("ceph", &self.ceph)
            .field("break_lock", &self.break_lock)
            .finish()
    }
}

/// An image spec split into its parts: `[pool/[namespace/]]image[@snap]`.
#[derive(Debug, Default, PartialEq, Eq)]
struct Spec<'a> {
    pool: Option<&'a str>,
    namespace: Option<&'a str>,
    image: &'a str,
    snapshot: Option<&'a str>,
}

fn parse_spec(spec: &str) -> Option<Spec<'_>> {
    let (path, snapshot) = match spec.split_once('@') {
        Some((p, s)) => (p, Some(s)),
        None => (spec, None),
    };
    let parts: Vec<&str> = path.split('/').collect();
    let (pool, namespace, image) = match parts[..] {
        [image] => (None, None, image),
        [pool, image] => (Some(pool), None, image),
        [pool, ns, image] => (Some(pool), Some(ns), image),
        _ => return None,
    };
    let empty = |s: Option<&str>| s.is_some_and(str::is_empty);
    if image.is_empty() || empty(pool) || empty(snapshot) {
        return None;
    }
    Some(Spec {
        pool,
        namespace,
        image,
        snapshot,
    })
}

impl RbdOptions {
    /// Options for `pool/image` with everything else at its default.
    pub fn new(pool: impl Into<String>, image: impl Into<String>) -> RbdOptions {
        RbdOptions {
            pool: pool.into(),
            namespace: None,
            image: image.into(),
            snapshot: None,
            conf: None,
            id: None,
            keyring: None,
            key: None,
            timeout: None,
            ceph: Vec::new(),
            break_lock: false,
        }
    }

    /// The client id in use (`admin` unless set).
    pub fn client_id(&self) -> &str {
        self.id.as_deref().unwrap_or("admin")
    }

    /// `pool/[namespace/]image[@snap]`, as the `rbd` tool spells it.
    pub fn spec(&self) -> String {
        let mut s = self.pool.clone();
        s.push('/');
        if let Some(ns) = self.namespace.as_deref().filter(|n| !n.is_empty()) {
            s.push_str(ns);
            s.push('/');
        }
        s.push_str(&self.image);
        if let Some(snap) = &self.snapshot {
            s.push('@');
            s.push_str(snap);
        }
        s
    }

    /// Parses nbdkit-style parameters (see [`HELP`]). A bare value is an image spec.
    pub fn from_args(args: &[ConfigArg]) -> Result<RbdOptions, ConfigError> {
        let mut spec = None;
        let mut pool = None;
        let mut namespace = None;
        let mut snapshot = None;
        let mut o = RbdOptions::new("", "");
        for arg in args {
            let key = arg.key.as_deref().unwrap_or(MAGIC_KEY);
            let value = arg.value.as_str();
            if value.contains('\0') {
                return Err(invalid("parameter values cannot contain NUL bytes"));
            }
            match key {
                "image" => {
                    let s = parse_spec(value).ok_or_else(|| {
                        bad_value("image", value, "[POOL/[NAMESPACE/]]IMAGE[@SNAP]")
                    })?;
                    spec = Some(s);
                }
                "pool" => pool = Some(non_empty("pool", value)?),
                "namespace" => namespace = Some(value),
                "snapshot" | "snap" => snapshot = Some(non_empty("snapshot", value)?),
                "conf" => o.conf = Some(resolve(value)?),
                "id" | "user" => {
                    let id = value.strip_prefix("client.").unwrap_or(value);
                    o.id = Some(non_empty("id", id)?.to_owned());
                }
                "keyring" => o.keyring = Some(resolve(value)?),
                "key" => o.key = Some(read_key(value)?),
                "timeout" => o.timeout = Some(parse_timeout(value)?),
                "break-lock" | "break_lock" => o.break_lock = parse_bool("break-lock", value)?,
                _ => match key.strip_prefix("ceph.") {
                    Some(option) if is_ceph_option(option) => {
                        o.ceph.push((option.replace('-', "_"), value.to_owned()))
                    }
                    _ => {
                        return Err(ConfigError::UnknownParameter {
                            plugin: PLUGIN,
                            key: key.to_owned(),
                        })
                    }
                },
            }
        }
        let Some(spec) = spec else {
            return Err(ConfigError::MissingParameter {
                plugin: PLUGIN,
                what: "the image: [image=][POOL/[NAMESPACE/]]IMAGE[@SNAP]",
            });
        };
        o.image = spec.image.to_owned();
        o.pool = one_of("pool", spec.pool, pool)?.ok_or(ConfigError::MissingParameter {
            plugin: PLUGIN,
            what: "the pool: pool=<POOL> or image=POOL/IMAGE",
        })?;
        o.namespace = one_of("namespace", spec.namespace, namespace)?;
        o.snapshot = one_of("snapshot", spec.snapshot, snapshot)?;
        if o.keyring.is_some() && o.key.is_some() {
            return Err(invalid("keyring= and key= cannot be used at the same time"));
        }
        Ok(o)
    }
}

/// A value given both in the image spec and as its own parameter must agree.
fn one_of(
    key: &'static str,
    from_spec: Option<&str>,
    given: Option<&str>,
) -> Result<Option<String>, ConfigError> {
    match (from_spec, given) {
        (Some(a), Some(b)) if a != b => Err(ConfigError::BadValue {
            plugin: PLUGIN,
            key,
            value: b.to_owned(),
            expected: "the same value as in the image spec",
        }),
        (a, b) => Ok(a.or(b).map(str::to_owned)),
    }
}

fn invalid(message: &'static str) -> ConfigError {
    ConfigError::Invalid {
        plugin: PLUGIN,
        message,
    }
}

fn bad_value(key: &'static str, value: &str, expected: &'static str) -> ConfigError {
    ConfigError::BadValue {
        plugin: PLUGIN,
        key,
        value: value.to_owned(),
        expected,
    }
}

fn non_empty<'a>(key: &'static str, value: &'a str) -> Result<&'a str, ConfigError> {
    if value.is_empty() {
        return Err(bad_value(key, value, "a non-empty name"));
    }
    Ok(value)
}

/// The absolute path of an existing file.
fn resolve(value: &str) -> Result<PathBuf, ConfigError> {
    let not_found = |reason| ConfigError::FileNotFound {
        plugin: PLUGIN,
        path: value.to_owned(),
        reason,
    };
    let path = std::fs::canonicalize(value).map_err(not_found)?;
    if !path.is_file() {
        return Err(ConfigError::BadFile {
            plugin: PLUGIN,
            path: value.to_owned(),
            problem: "is not a regular file",
        });
    }
    Ok(path)
}

/// `key=BASE64`, or `key=+FILE` (nbdkit's spelling for "read the secret from FILE", which
/// keeps it out of the process list).
fn read_key(value: &str) -> Result<String, ConfigError> {
    let key = match value.strip_prefix('+') {
        Some(file) => {
            let path = resolve(file)?;
            std::fs::read_to_string(&path)
                .map_err(|reason| ConfigError::FileNotFound {
                    plugin: PLUGIN,
                    path: file.to_owned(),
                    reason,
                })?
                .trim()
                .to_owned()
        }
        None => value.to_owned(),
    };
    let is_base64 = |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=');
    if key.is_empty() || !key.chars().all(is_base64) {
        return Err(invalid(
            "key= is not a base64 Ceph key (as in `ceph auth get-key`)",
        ));
    }
    Ok(key)
}

/// nbdkit's boolean spellings (on/off, true/false, yes/no, 1/0).
fn parse_bool(key: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(bad_value(key, value, "on or off")),
    }
}

fn parse_timeout(value: &str) -> Result<Duration, ConfigError> {
    value
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0 && *s <= 86400.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| bad_value("timeout", value, "seconds, more than 0"))
}

/// Ceph option names: lower-case letters, digits, `_` (or `-` or space, which Ceph treats
/// as `_`).
fn is_ceph_option(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-'))
}

/// The configuration file as given, for messages.
pub(crate) fn conf_display(conf: Option<&Path>) -> String {
    match conf {
        Some(p) => p.display().to_string(),
        None => "Ceph's default configuration".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(words: &[&str]) -> Result<RbdOptions, ConfigError> {
        let args: Vec<ConfigArg> = words.iter().map(|w| ConfigArg::parse(w)).collect();
        RbdOptions::from_args(&args)
    }

    #[test]
    fn parse_spec_splits_pool_namespace_image_snapshot() {
        assert_eq!(
            parse_spec("p/ns/img@s"),
            Some(Spec {
                pool: Some("p"),
                namespace: Some("ns"),
                image: "img",
                snapshot: Some("s")
            })
        );
        assert_eq!(parse_spec("img").unwrap().image, "img");
        assert_eq!(parse_spec("p/img").unwrap().pool, Some("p"));
        for bad in ["", "p/", "/img", "img@", "a/b/c/d", "p/ns/"] {
            assert_eq!(parse_spec(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn from_args_bare_spec_and_keys_agree() {
        let o = parse(&["rbd/disk1@s1", "id=client.alice", "timeout=2.5"]).unwrap();
        assert_eq!(o.pool, "rbd");
        assert_eq!(o.image, "disk1");
        assert_eq!(o.snapshot.as_deref(), Some("s1"));
        assert_eq!(o.client_id(), "alice");
        assert_eq!(o.timeout, Some(Duration::from_millis(2500)));
        assert_eq!(o.spec(), "rbd/disk1@s1");

        let o = parse(&["pool=p", "image=img", "namespace=ns", "snapshot=s"]).unwrap();
        assert_eq!(o.spec(), "p/ns/img@s");
        assert_eq!(o.client_id(), "admin");
        assert!(!o.break_lock);
        assert!(parse(&["p/i", "break-lock=on"]).unwrap().break_lock);
        assert!(matches!(
            parse(&["p/i", "break-lock=maybe"]),
            Err(ConfigError::BadValue {
                key: "break-lock",
                ..
            })
        ));
    }

    #[test]
    fn from_args_missing_or_conflicting_parts_are_errors() {
        assert!(matches!(
            parse(&["pool=p"]),
            Err(ConfigError::MissingParameter { .. })
        ));
        assert!(matches!(
            parse(&["img"]),
            Err(ConfigError::MissingParameter { .. })
        ));
        assert!(matches!(
            parse(&["a/img", "pool=b"]),
            Err(ConfigError::BadValue { key: "pool", .. })
        ));
        assert!(parse(&["a/img", "pool=a"]).is_ok());
        assert!(matches!(
            parse(&["a/img", "bogus=1"]),
            Err(ConfigError::UnknownParameter { .. })
        ));
        assert!(matches!(
            parse(&["a/img", "timeout=0"]),
            Err(ConfigError::BadValue { key: "timeout", .. })
        ));
        assert!(matches!(
            parse(&["a/img", "key=not base64!"]),
            Err(ConfigError::Invalid { .. })
        ));
    }

    #[test]
    fn from_args_resolves_files_and_reads_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("ceph.conf");
        std::fs::write(&conf, "[global]\n").unwrap();
        let keyfile = dir.path().join("key");
        std::fs::write(&keyfile, "QUJDRA==\n").unwrap();
        let o = parse(&[
            "p/i",
            &format!("conf={}", conf.display()),
            &format!("key=+{}", keyfile.display()),
            "ceph.rbd_cache=false",
            "ceph.rados-osd-op-timeout=5",
        ])
        .unwrap();
        assert_eq!(
            o.conf.as_deref(),
            Some(conf.canonicalize().unwrap().as_path())
        );
        assert_eq!(o.key.as_deref(), Some("QUJDRA=="));
        assert_eq!(
            o.ceph,
            [
                ("rbd_cache".to_owned(), "false".to_owned()),
                ("rados_osd_op_timeout".to_owned(), "5".to_owned())
            ]
        );
        let missing = parse(&["p/i", "conf=/no/such/ceph.conf"]).unwrap_err();
        assert!(matches!(missing, ConfigError::FileNotFound { .. }));
        assert!(
            missing.to_string().contains("/no/such/ceph.conf"),
            "{missing}"
        );
        let both = parse(&[
            "p/i",
            "key=QUJDRA==",
            &format!("keyring={}", keyfile.display()),
        ]);
        assert!(matches!(both, Err(ConfigError::Invalid { .. })));
    }

    #[test]
    fn debug_never_shows_the_key() {
        let mut o = RbdOptions::new("p", "i");
        o.key = Some("c2VjcmV0".into());
        let text = format!("{o:?}");
        assert!(!text.contains("c2VjcmV0"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
    }
}
