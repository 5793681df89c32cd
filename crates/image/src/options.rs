//! What a node is opened with: qemu's `blockdev-add` options, as a typed value.
//!
//! The QMP daemon receives `blockdev-add` arguments as JSON; [`BlockdevOptions::from_json`]
//! turns them into a [`BlockdevOptions`] with qemu's spellings and defaults (`read-only`
//! false, `backing` absent meaning "the one the header names", `null` meaning none) and qemu's
//! error wording for missing or unexpected parameters. The CLI builds the same value from
//! `key=value` words (see `cli.rs`), so both front ends open nodes through one path.

use std::path::PathBuf;

use serde_json::Value;

use crate::error::ImageError;
use crate::lock::Locking;

/// The drivers sluice implements (qemu's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Driver {
    /// A regular file or block device (qemu's `file` / `host_device` protocol drivers).
    File,
    /// The raw format over a `file` child.
    Raw,
    /// The qcow2 format over a `file` child, with an optional backing node.
    Qcow2,
    /// Error injection over a `file` child (qemu's blkdebug; see [`crate::blkdebug`]).
    /// Opened by [`crate::open_blkdebug_node`] only.
    Blkdebug,
    /// Any block device of the block layer (an RBD image, a plugin) as a node, so that a
    /// qcow2 node can stand on it. Opened by [`crate::open_plugin_node`] only.
    Plugin,
}

impl Driver {
    pub fn as_str(self) -> &'static str {
        match self {
            Driver::File => "file",
            Driver::Raw => "raw",
            Driver::Qcow2 => "qcow2",
            Driver::Blkdebug => "blkdebug",
            Driver::Plugin => "plugin",
        }
    }

    pub fn from_name(name: &str) -> Option<Driver> {
        match name {
            "file" | "host_device" => Some(Driver::File),
            "raw" => Some(Driver::Raw),
            "qcow2" => Some(Driver::Qcow2),
            _ => None,
        }
    }
}

/// A child given by node name or by inline options (qemu's `BlockdevRef`).
#[derive(Debug, Clone, PartialEq)]
pub enum ChildRef {
    Node(String),
    Options(Box<BlockdevOptions>),
}

/// The `backing` option of a qcow2 node.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum BackingRef {
    /// Absent: open the chain the image headers name (qemu's default for `blockdev-add`).
    /// Backing files without a format in the header are probed, with a warning.
    #[default]
    FromHeader,
    /// `null`: no backing node; unallocated clusters read as zeroes.
    None,
    /// Refuse to open an image whose header names a backing file (the CLI's default, so
    /// that a chain is only followed when the user asked for it).
    Deny,
    /// This node (read-only).
    Child(ChildRef),
}

/// Options of one node (a subset of qemu's `BlockdevOptions`).
#[derive(Debug, Clone, PartialEq)]
pub struct BlockdevOptions {
    pub driver: Driver,
    /// `node-name`; generated (`#blockN`, as qemu does) when absent.
    pub node_name: Option<String>,
    /// `read-only`.
    pub read_only: bool,
    /// `filename` (driver `file`).
    pub filename: Option<PathBuf>,
    /// `locking` (driver `file`).
    pub locking: Locking,
    /// `file` (drivers `raw` and `qcow2`).
    pub file: Option<ChildRef>,
    /// `backing` (driver `qcow2`).
    pub backing: BackingRef,
    /// `bitmap-file` (driver `raw`, a sluice extension): the sidecar file that keeps the
    /// node's persistent bitmaps, instead of `IMAGE.bitmaps`; a raw node over a block
    /// device keeps them only with one (see `crate::sidecar`).
    pub bitmap_file: Option<PathBuf>,
}

impl BlockdevOptions {
    /// A `file` node for `path`.
    pub fn file(path: impl Into<PathBuf>, read_only: bool) -> BlockdevOptions {
        BlockdevOptions {
            driver: Driver::File,
            node_name: None,
            read_only,
            filename: Some(path.into()),
            locking: Locking::Auto,
            file: None,
            backing: BackingRef::None,
            bitmap_file: None,
        }
    }

    /// A format node (`raw` or `qcow2`) over an inline `file` node for `path`.
    pub fn image(driver: Driver, path: impl Into<PathBuf>, read_only: bool) -> BlockdevOptions {
        BlockdevOptions {
            driver,
            node_name: None,
            read_only,
            filename: None,
            locking: Locking::Auto,
            file: Some(ChildRef::Options(Box::new(BlockdevOptions::file(
                path, read_only,
            )))),
            backing: BackingRef::FromHeader,
            bitmap_file: None,
        }
    }

    /// Parses `blockdev-add` arguments.
    pub fn from_json(v: &Value) -> Result<BlockdevOptions, ImageError> {
        let obj = v
            .as_object()
            .ok_or_else(|| invalid("Invalid parameter type, expected 'object'"))?;
        let driver_name = match obj.get("driver") {
            Some(Value::String(s)) => s.as_str(),
            Some(_) => {
                return Err(invalid(
                    "Invalid parameter type for 'driver', expected: string",
                ))
            }
            None => return Err(invalid("Parameter 'driver' is missing")),
        };
        let driver = Driver::from_name(driver_name).ok_or_else(|| {
            invalid(format!(
                "Parameter 'driver' does not accept value '{driver_name}' (sluice has file, raw, qcow2)"
            ))
        })?;
        let mut o = BlockdevOptions {
            driver,
            node_name: None,
            read_only: false,
            filename: None,
            locking: Locking::Auto,
            file: None,
            backing: BackingRef::FromHeader,
            bitmap_file: None,
        };
        for (key, value) in obj {
            match (key.as_str(), driver) {
                ("driver", _) => {}
                ("node-name", _) => o.node_name = Some(string(key, value)?.to_owned()),
                ("read-only", _) => o.read_only = boolean(key, value)?,
                // Accepted for compatibility; sluice's behaviour is fixed.
                ("auto-read-only" | "discard" | "cache" | "aio", _) => {}
                ("filename", Driver::File) => o.filename = Some(string(key, value)?.into()),
                ("locking", Driver::File) => {
                    let s = string(key, value)?;
                    o.locking = Locking::from_name(s).ok_or_else(|| {
                        invalid(format!(
                            "Parameter 'locking' does not accept value '{s}' (auto, on, off)"
                        ))
                    })?;
                }
                ("file", Driver::Raw | Driver::Qcow2) => o.file = Some(child(key, value)?),
                ("bitmap-file", Driver::Raw) => o.bitmap_file = Some(string(key, value)?.into()),
                ("backing", Driver::Qcow2) => {
                    o.backing = match value {
                        Value::Null => BackingRef::None,
                        v => BackingRef::Child(child(key, v)?),
                    }
                }
                _ => return Err(invalid(format!("Parameter '{key}' is unexpected"))),
            }
        }
        match driver {
            Driver::File if o.filename.is_none() => Err(invalid("Parameter 'filename' is missing")),
            Driver::Raw | Driver::Qcow2 if o.file.is_none() => {
                Err(invalid("A block device must be specified for \"file\""))
            }
            _ => Ok(o),
        }
    }
}

fn invalid(msg: impl Into<String>) -> ImageError {
    ImageError::InvalidOption(msg.into())
}

fn string<'a>(key: &str, v: &'a Value) -> Result<&'a str, ImageError> {
    v.as_str().ok_or_else(|| {
        invalid(format!(
            "Invalid parameter type for '{key}', expected: string"
        ))
    })
}

fn boolean(key: &str, v: &Value) -> Result<bool, ImageError> {
    v.as_bool().ok_or_else(|| {
        invalid(format!(
            "Invalid parameter type for '{key}', expected: boolean"
        ))
    })
}

fn child(key: &str, v: &Value) -> Result<ChildRef, ImageError> {
    match v {
        Value::String(s) => Ok(ChildRef::Node(s.clone())),
        Value::Object(_) => Ok(ChildRef::Options(Box::new(BlockdevOptions::from_json(v)?))),
        _ => Err(invalid(format!(
            "Invalid parameter type for '{key}', expected: string or object"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn from_json_qcow2_with_inline_file_and_backing_name() {
        let o = BlockdevOptions::from_json(&json!({
            "driver": "qcow2", "node-name": "top",
            "file": {"driver": "file", "filename": "/i/top.qcow2", "locking": "on"},
            "backing": "base"
        }))
        .unwrap();
        assert_eq!(o.driver, Driver::Qcow2);
        assert_eq!(o.node_name.as_deref(), Some("top"));
        assert!(!o.read_only);
        assert_eq!(o.backing, BackingRef::Child(ChildRef::Node("base".into())));
        let Some(ChildRef::Options(file)) = &o.file else {
            panic!("{o:?}")
        };
        assert_eq!(file.filename.as_deref(), Some("/i/top.qcow2".as_ref()));
        assert_eq!(file.locking, Locking::On);
    }

    #[test]
    fn from_json_backing_absent_or_null() {
        let absent = BlockdevOptions::from_json(&json!({"driver": "qcow2", "file": "f"})).unwrap();
        assert_eq!(absent.backing, BackingRef::FromHeader);
        let null =
            BlockdevOptions::from_json(&json!({"driver": "qcow2", "file": "f", "backing": null}))
                .unwrap();
        assert_eq!(null.backing, BackingRef::None);
    }

    #[test]
    fn from_json_bitmap_file_is_a_raw_option() {
        let o = BlockdevOptions::from_json(
            &json!({"driver": "raw", "file": "f", "bitmap-file": "/var/lib/d.bitmaps"}),
        )
        .unwrap();
        assert_eq!(
            o.bitmap_file.as_deref(),
            Some("/var/lib/d.bitmaps".as_ref())
        );
        let msg = |v: Value| BlockdevOptions::from_json(&v).unwrap_err().to_string();
        assert_eq!(
            msg(json!({"driver": "qcow2", "file": "f", "bitmap-file": "/b"})),
            "Parameter 'bitmap-file' is unexpected"
        );
        assert_eq!(
            msg(json!({"driver": "raw", "file": "f", "bitmap-file": 1})),
            "Invalid parameter type for 'bitmap-file', expected: string"
        );
    }

    #[test]
    fn from_json_errors_use_qemu_wording() {
        let msg = |v: Value| BlockdevOptions::from_json(&v).unwrap_err().to_string();
        assert_eq!(msg(json!({})), "Parameter 'driver' is missing");
        assert_eq!(
            msg(json!({"driver": "file"})),
            "Parameter 'filename' is missing"
        );
        assert_eq!(
            msg(json!({"driver": "raw"})),
            "A block device must be specified for \"file\""
        );
        assert_eq!(
            msg(json!({"driver": "raw", "file": "f", "backing": "b"})),
            "Parameter 'backing' is unexpected"
        );
        assert_eq!(
            msg(json!({"driver": "file", "filename": "x", "read-only": "yes"})),
            "Invalid parameter type for 'read-only', expected: boolean"
        );
        assert!(msg(json!({"driver": "vmdk"})).contains("'vmdk'"));
    }
}
