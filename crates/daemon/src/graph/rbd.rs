//! The `rbd` driver: an image of a Ceph cluster as a block node, with qemu's options.
//!
//! The node is `sluice-rbd`'s [`RbdPlugin`] (one open image shared by every export and
//! job of the node); this file only maps qemu's `BlockdevOptionsRbd` onto [`RbdOptions`]
//! and connects at `blockdev-add`, so that a wrong pool, image or key, or a cluster that is
//! down, fails the command with one line (the rbd crate's, which names the parameter to
//! check) instead of failing the first export later. The mapping is qemu's
//! (`block/rbd.c`): `user` is the client id, `key-secret` names a `secret` object whose data
//! becomes librados' `key`, `auth-client-required` becomes `auth_client_required` (joined by
//! `;`), `server` becomes `mon_host`, and options given here override the configuration
//! file's. A snapshot is read-only, as in qemu ("rbd snapshots are read-only").
//!
//! **Secrets.** `key-secret` is resolved through a [`SecretLookup`] the daemon is built
//! with, not through an object table of this crate: the `secret` objects (`--object`,
//! `object-add`) belong to the daemon's object layer, and a lookup by id is all this driver
//! needs of it: the daemon's [`Objects`] table implements it, and [`NoSecrets`] answers as
//! qemu does for an unknown id.
//! As in qemu, the secret's bytes are the key's raw bytes and are passed to librados in
//! base64 (`qcrypto_secret_lookup_as_base64`), so the object is written
//! `secret,id=ID,format=base64,data=$(ceph auth get-key client.ID)`, as libvirt does.
//!
//! **Exclusive lock.** A writable node of an image with the exclusive-lock feature holds the
//! image's lock for as long as it is open, and `blockdev-add` fails while another client
//! holds it; `break-lock: true` (a sluice extension: qemu has no such option, and leaves
//! two qemus to hand the lock back and forth) breaks the holder's lock and blocklists it
//! first. The reasoning is in `sluice_rbd::image`. The daemon exits without closing its
//! nodes, so at exit ([`super::Graph::flush_all`]) an rbd node flushes and lets go of the
//! lock explicitly: a restarted daemon (or another host) then takes it at once instead of
//! waiting ~30 s for the exited client's watch to time out.
//!
//! What `query-named-block-nodes` shows follows qemu's rbd driver: format `rbd`, no
//! `actual-size` (qemu's rbd driver reports none), `format-specific` of type `rbd` with no
//! encryption format, and the filename `json:{...}` of the options that select the image
//! (qemu's strong runtime options of rbd: pool, namespace, image, conf, snapshot, user,
//! server), because no file name gives the node back.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Map, Value};
use sluice_rbd::{RbdOptions, RbdPlugin};

use super::{NodeDriver, NodeInfo, OpenCtx, OpenedNode};
use crate::generated::{
    BlockdevOptions, BlockdevOptionsBranch, BlockdevOptionsRbd, ImageInfoSpecific,
    ImageInfoSpecificBranch, ImageInfoSpecificRbd, ImageInfoSpecificRbdWrapper, RbdAuthMode,
};
use crate::objects::Objects;
use crate::QmpError;

/// Finds the data of a `secret` object by its id.
pub trait SecretLookup: Send + Sync {
    /// The secret's bytes (decoded from the object's `format`), or qemu's error message
    /// for the id.
    fn secret(&self, id: &str) -> Result<Vec<u8>, String>;
}

/// A daemon without secret objects: every id is unknown.
#[derive(Debug, Default)]
pub struct NoSecrets;

impl SecretLookup for NoSecrets {
    fn secret(&self, id: &str) -> Result<Vec<u8>, String> {
        Err(format!("No secret with id '{id}'"))
    }
}

/// The daemon's object table: `--object secret,...` and `object-add` secrets.
impl SecretLookup for Objects {
    fn secret(&self, id: &str) -> Result<Vec<u8>, String> {
        self.secret_bytes(id).map_err(|e| e.desc)
    }
}

/// `rbd` nodes.
pub struct RbdDriver {
    secrets: Arc<dyn SecretLookup>,
}

impl std::fmt::Debug for RbdDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbdDriver").finish_non_exhaustive()
    }
}

impl RbdDriver {
    pub fn new(secrets: Arc<dyn SecretLookup>) -> RbdDriver {
        RbdDriver { secrets }
    }

    /// qemu's options as the rbd crate's.
    fn options(&self, r: &BlockdevOptionsRbd) -> Result<RbdOptions, QmpError> {
        let mut o = RbdOptions::new(r.pool.clone(), r.image.clone());
        o.namespace = r.namespace.clone().filter(|n| !n.is_empty());
        o.snapshot = r.snapshot.clone();
        o.conf = r.conf.as_ref().map(PathBuf::from);
        o.id = r.user.clone();
        if let Some(id) = &r.key_secret {
            let key = self.secrets.secret(id).map_err(QmpError::generic)?;
            o.key = Some(base64(&key));
        }
        if let Some(modes) = &r.auth_client_required {
            let modes: Vec<&str> = modes
                .iter()
                .map(|m| match m {
                    RbdAuthMode::Cephx => "cephx",
                    RbdAuthMode::None => "none",
                })
                .collect();
            o.ceph
                .push(("auth_client_required".into(), modes.join(";")));
        }
        if let Some(servers) = &r.server {
            o.ceph.push(("mon_host".into(), mon_host(servers)));
        }
        o.break_lock = r.break_lock.unwrap_or(false);
        Ok(o)
    }
}

/// Standard base64 with padding (what librados' `key` option takes).
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `server` as librados' `mon_host` (qemu's spelling: `host:port` joined by `;`, IPv6
/// addresses in brackets).
fn mon_host(servers: &[crate::generated::InetSocketAddressBase]) -> String {
    servers
        .iter()
        .map(|s| {
            if s.host.contains(':') && !s.host.starts_with('[') {
                format!("[{}]:{}", s.host, s.port)
            } else {
                format!("{}:{}", s.host, s.port)
            }
        })
        .collect::<Vec<_>>()
        .join(";")
}

impl NodeDriver for RbdDriver {
    fn open(
        &self,
        opts: &BlockdevOptions,
        json: &Value,
        ctx: &mut OpenCtx<'_>,
    ) -> Result<OpenedNode, QmpError> {
        let BlockdevOptionsBranch::Rbd(r) = &opts.u else {
            unreachable!("registered for driver rbd only");
        };
        let read_only = ctx.read_only();
        if r.snapshot.is_some() && !read_only {
            return Err(QmpError::generic("rbd snapshots are read-only"));
        }
        let o = self.options(r)?;
        let plugin = RbdPlugin::new(o, read_only);
        let image = plugin
            .connect()
            .map_err(|e| QmpError::generic(e.to_string()))?;
        if !read_only && !image.writable() {
            return Err(QmpError::generic(format!(
                "rbd: client.{} may only read {}: add the node with read-only=true",
                plugin.options().client_id(),
                image.spec()
            )));
        }
        let plugin = Arc::new(plugin);
        let mut opened = OpenedNode::new(
            plugin.clone(),
            NodeInfo {
                filename: format!("json:{}", super::image::qemu_json(&filename_spec(json))),
                format: "rbd".to_string(),
                actual_size: None,
                dirty_flag: None,
                format_specific: Some(ImageInfoSpecific {
                    u: ImageInfoSpecificBranch::Rbd(ImageInfoSpecificRbdWrapper {
                        data: ImageInfoSpecificRbd {
                            encryption_format: None,
                        },
                    }),
                }),
                ..NodeInfo::default()
            },
        );
        opened.payload = Some(plugin);
        Ok(opened)
    }
}

/// The rbd plugin behind a graph node, if the rbd driver opened it.
pub fn rbd_plugin(opened: &OpenedNode) -> Option<Arc<RbdPlugin>> {
    opened.payload.clone()?.downcast::<RbdPlugin>().ok()
}

/// The image of a read-only rbd node opened again, read-write, for a job that writes into
/// it (a commit into an rbd base, see [`super::layers`]): a second connection that takes
/// the image's exclusive lock now and lets go of it when the last reference goes. Fails
/// as `blockdev-add` would (a snapshot, a client that may only read, another writer
/// holding the lock), with the rbd crate's message.
pub fn reopen_writable(opened: &OpenedNode) -> Result<Arc<RbdPlugin>, String> {
    let Some(node) = rbd_plugin(opened) else {
        return Err("not an rbd node".to_string());
    };
    let o = node.options().clone();
    if o.snapshot.is_some() {
        return Err("rbd snapshots are read-only".to_string());
    }
    let plugin = RbdPlugin::new(o, false);
    let image = plugin.connect().map_err(|e| e.to_string())?;
    if !image.writable() {
        return Err(format!(
            "rbd: client.{} may only read {}",
            plugin.options().client_id(),
            image.spec()
        ));
    }
    Ok(Arc::new(plugin))
}

/// The options that select the image (qemu's strong runtime options of rbd), keys sorted
/// as the image driver's `json:` names are.
fn filename_spec(json: &Value) -> Value {
    const STRONG: [&str; 8] = [
        "conf",
        "driver",
        "image",
        "namespace",
        "pool",
        "server",
        "snapshot",
        "user",
    ];
    let mut m = Map::new();
    for key in STRONG {
        if let Some(v) = json.get(key) {
            m.insert(key.to_string(), v.clone());
        }
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use sluice_qapi::runtime::{CompatPolicy, Input};

    fn rbd(extra: Value) -> BlockdevOptionsRbd {
        let mut v = json!({"driver": "rbd", "node-name": "n", "pool": "rbd", "image": "disk"});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let p = CompatPolicy::default();
        let o = BlockdevOptions::from_args(&mut Input::json(&p), v.as_object().unwrap()).unwrap();
        match o.u {
            BlockdevOptionsBranch::Rbd(r) => r,
            _ => unreachable!(),
        }
    }

    struct OneSecret;
    impl SecretLookup for OneSecret {
        fn secret(&self, id: &str) -> Result<Vec<u8>, String> {
            match id {
                "sec0" => Ok(b"ABCD".to_vec()),
                _ => NoSecrets.secret(id),
            }
        }
    }

    #[test]
    fn options_map_qemu_names_onto_rbd_options() {
        let d = RbdDriver::new(Arc::new(OneSecret));
        let o = d
            .options(&rbd(json!({
                "namespace": "ns", "snapshot": "s1", "conf": "/x/ceph.conf", "user": "alice",
                "key-secret": "sec0", "auth-client-required": ["cephx", "none"],
                "server": [{"host": "127.0.0.1", "port": "3300"}, {"host": "::1", "port": "6789"}],
                "break-lock": true
            })))
            .unwrap();
        assert_eq!(o.spec(), "rbd/ns/disk@s1");
        assert_eq!(o.client_id(), "alice");
        assert_eq!(o.key.as_deref(), Some("QUJDRA=="));
        assert_eq!(
            o.conf.as_deref(),
            Some(std::path::Path::new("/x/ceph.conf"))
        );
        assert!(o.break_lock);
        assert_eq!(
            o.ceph,
            [
                ("auth_client_required".to_string(), "cephx;none".to_string()),
                (
                    "mon_host".to_string(),
                    "127.0.0.1:3300;[::1]:6789".to_string()
                )
            ]
        );
    }

    #[test]
    fn base64_pads_like_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foob"), "Zm9vYg==");
        assert_eq!(base64(&[0xff, 0xfe, 0x00]), "//4A");
    }

    #[test]
    fn unknown_key_secret_is_qemus_error() {
        let d = RbdDriver::new(Arc::new(NoSecrets));
        let e = d.options(&rbd(json!({"key-secret": "nope"}))).unwrap_err();
        assert_eq!(e.desc, "No secret with id 'nope'");
    }

    #[test]
    fn filename_keeps_the_strong_options_sorted() {
        let v = json!({"driver": "rbd", "pool": "rbd", "image": "d", "node-name": "n",
                       "break-lock": true, "user": "admin", "read-only": false});
        assert_eq!(
            super::super::image::qemu_json(&filename_spec(&v)),
            r#"{"driver": "rbd", "image": "d", "pool": "rbd", "user": "admin"}"#
        );
    }
}
