//! `sluice serve image file=PATH [format=raw|qcow2] [backing=...]`: the command-line front
//! end, turning `key=value` words into [`BlockdevOptions`] for [`crate::open_node`].
//!
//! The command line is stricter than `blockdev-add` about what it opens implicitly, because
//! an image given on a command line is often not trusted: a backing chain is only followed
//! from the image headers with `backing=auto`; otherwise every backing file is named
//! (`backing=PATH`, repeated for each layer down) or refused (`backing=none` serves the top
//! layer alone). An image whose header names a backing file the user did not account for is
//! refused with a message saying so. A format that is not given is probed, with qemu's
//! warning that probing is unsafe for untrusted images.
//!
//! `bitmap=NAME` (qemu-nbd's `-B NAME`, repeatable) names a persistent bitmap of the image to
//! offer as the meta context `qemu:dirty-bitmap:NAME`: a qcow2 image's own, or one a raw
//! image keeps in its sidecar file (`crate::sidecar`; qemu-nbd has none for raw images). The
//! bitmap is looked up in the top image, then down its backing chain (as qemu-nbd does; a
//! backing layer's bitmaps are loaded then, read-only), and checked as qemu-nbd checks it:
//! an unknown name or an inconsistent bitmap refuses the start. [`open_image_export`] returns
//! the bitmaps held busy; the server wraps them as contexts (it owns the NBD side).
//! `bitmap-file=PATH` is the raw driver's `bitmap-file` option: where a raw image keeps its
//! bitmaps instead of `IMAGE.bitmaps`, and the only place a raw block device can keep them.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sluice_block::plugins::ConfigArg;

use crate::bitmaps::{Bitmap, BusyGuard, Use};
use crate::error::ImageError;
use crate::header::{Format, HeaderError, Qcow2Header};
use crate::lock::Locking;
use crate::node::{open_node, probe_file, Node};
use crate::options::{BackingRef, BlockdevOptions, ChildRef, Driver};

/// The key a bare value on the command line stands for.
pub const MAGIC_KEY: &str = "file";

/// Parameter help for `--help`.
pub const HELP: &str = "[file=]<FILENAME>     The disk image to serve.\n\
                        format=raw|qcow2      Its format (probed when not given: unsafe for untrusted images).\n\
                        backing=auto          Open the backing chain the image headers name.\n\
                        backing=<FILENAME>    Name the next backing file down (repeat for each layer).\n\
                        backing=none          Serve the top layer alone (no backing).\n\
                        readonly=true         Open the image read-only.\n\
                        locking=auto|on|off   qemu-compatible image locking (default auto).\n\
                        bitmap=<NAME>         Offer its persistent bitmap NAME (or its backing chain's) as qemu:dirty-bitmap:NAME (qemu-nbd's -B; repeatable).\n\
                        bitmap-file=<FILE>    Where a raw image keeps its persistent bitmaps (default IMAGE.bitmaps; needed for a block device).";

/// What the user said about backing files.
#[derive(Debug, Clone, PartialEq, Eq)]
enum BackingArg {
    Path(PathBuf),
    Auto,
    None,
}

/// Parsed command-line parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ImageArgs {
    file: PathBuf,
    format: Option<Format>,
    backing: Vec<BackingArg>,
    readonly: Option<bool>,
    locking: Locking,
    /// `bitmap=`: persistent bitmaps to serve, in command-line order, without repeats.
    bitmaps: Vec<String>,
    /// `bitmap-file=`: the raw image's sidecar file.
    bitmap_file: Option<PathBuf>,
}

fn invalid(msg: impl Into<String>) -> ImageError {
    ImageError::InvalidOption(format!("image: {}", msg.into()))
}

fn parse_args(args: &[ConfigArg]) -> Result<ImageArgs, ImageError> {
    let mut file = None;
    let mut format = None;
    let mut backing = Vec::new();
    let mut readonly = None;
    let mut locking = Locking::Auto;
    let mut bitmaps: Vec<String> = Vec::new();
    let mut bitmap_file = None;
    for arg in args {
        let key = arg.key.as_deref().unwrap_or(MAGIC_KEY);
        let value = arg.value.as_str();
        match key {
            "file" => {
                if file.replace(PathBuf::from(value)).is_some() {
                    return Err(invalid("file= given twice"));
                }
            }
            "format" => {
                format = Some(
                    Format::from_name(value)
                        .filter(|_| value != "file")
                        .ok_or_else(|| {
                            invalid(format!("unknown format '{value}' (expected raw or qcow2)"))
                        })?,
                )
            }
            "backing" => {
                if matches!(backing.last(), Some(BackingArg::Auto | BackingArg::None)) {
                    return Err(invalid(
                        "backing=auto and backing=none must come last (after any backing=PATH)",
                    ));
                }
                backing.push(match value {
                    "auto" => BackingArg::Auto,
                    "none" => BackingArg::None,
                    "" => return Err(invalid("backing= needs auto, none or a file name")),
                    p => BackingArg::Path(PathBuf::from(p)),
                });
            }
            "readonly" | "read-only" => {
                readonly = Some(match value {
                    "true" | "on" | "yes" | "1" => true,
                    "false" | "off" | "no" | "0" => false,
                    _ => return Err(invalid(format!("readonly={value}: expected true or false"))),
                })
            }
            "locking" => {
                locking = Locking::from_name(value).ok_or_else(|| {
                    invalid(format!(
                        "unknown locking '{value}' (expected auto, on or off)"
                    ))
                })?
            }
            "bitmap" => {
                if value.is_empty() {
                    return Err(invalid("bitmap= needs the name of a persistent bitmap"));
                }
                // qemu-nbd accepts `-B b -B b`; the context is offered once.
                if !bitmaps.iter().any(|b| b == value) {
                    bitmaps.push(value.to_string());
                }
            }
            "bitmap-file" => {
                if value.is_empty() {
                    return Err(invalid("bitmap-file= needs a file name"));
                }
                if bitmap_file.replace(PathBuf::from(value)).is_some() {
                    return Err(invalid("bitmap-file= given twice"));
                }
            }
            _ => {
                return Err(invalid(format!(
                    "unknown parameter '{key}' (see `--help` for this plugin's parameters)"
                )))
            }
        }
    }
    let file =
        file.ok_or_else(|| invalid("you must specify [file=]<FILENAME> on the command line"))?;
    Ok(ImageArgs {
        file,
        format,
        backing,
        readonly,
        locking,
        bitmaps,
        bitmap_file,
    })
}

fn driver_of(f: Format) -> Driver {
    match f {
        Format::Raw => Driver::Raw,
        Format::Qcow2 => Driver::Qcow2,
    }
}

fn probe_with_warning(path: &Path, what: &str) -> Result<Format, ImageError> {
    let f = probe_file(path)?;
    tracing::warn!(
        "{}: no format given for {what}; probed {f}. Probing is unsafe for untrusted images \
         (a guest can write a qcow2 header into a raw image): give format={f}",
        path.display()
    );
    Ok(f)
}

/// The qcow2 header of `path`, read directly (to learn a backing format before opening).
fn header_of(path: &Path) -> Result<Qcow2Header, ImageError> {
    let f = std::fs::File::open(path).map_err(|e| ImageError::open(path, e))?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = f
            .read_at(&mut buf, 0)
            .map_err(|e| ImageError::open(path, e))?;
        match Qcow2Header::parse(&buf[..n]) {
            Err(HeaderError::Incomplete { needed }) if n == buf.len() && needed <= 1 << 21 => {
                buf.resize(needed, 0)
            }
            r => return r.map_err(|e| ImageError::bad_image(path, e)),
        }
    }
}

fn image_options(
    format: Format,
    path: &Path,
    read_only: bool,
    locking: Locking,
) -> BlockdevOptions {
    let mut o = BlockdevOptions::image(driver_of(format), path, read_only);
    o.locking = locking;
    if let Some(ChildRef::Options(f)) = &mut o.file {
        f.locking = locking;
    }
    o.backing = BackingRef::Deny;
    o
}

/// Builds the options of the image and the backing chain the user named.
fn build_options(a: &ImageArgs, read_only: bool) -> Result<BlockdevOptions, ImageError> {
    let top_format = match a.format {
        Some(f) => f,
        None => probe_with_warning(&a.file, "the image")?,
    };
    if top_format == Format::Raw && a.backing.iter().any(|b| *b != BackingArg::None) {
        return Err(invalid("backing= only applies to qcow2 images"));
    }
    if top_format != Format::Raw && a.bitmap_file.is_some() {
        return Err(invalid(
            "bitmap-file= only applies to raw images (a qcow2 image keeps its bitmaps inside)",
        ));
    }
    // Layers from the top: (format, path); then what the bottom does with its header.
    let mut layers = vec![(top_format, a.file.clone())];
    let mut seen = vec![file_id(&a.file)?];
    let mut bottom = BackingRef::Deny;
    for b in &a.backing {
        match b {
            BackingArg::Auto => bottom = BackingRef::FromHeader,
            BackingArg::None => bottom = BackingRef::None,
            BackingArg::Path(p) => {
                let (above_format, above) = layers.last().expect("top layer");
                if *above_format != Format::Qcow2 {
                    return Err(invalid(format!(
                        "backing={}: {} is raw and cannot have a backing file",
                        p.display(),
                        above.display()
                    )));
                }
                let id = file_id(p)?;
                if seen.contains(&id) {
                    let mut names: Vec<String> = layers
                        .iter()
                        .map(|(_, p)| p.display().to_string())
                        .collect();
                    names.push(p.display().to_string());
                    return Err(ImageError::BackingLoop {
                        chain: names.join(" -> "),
                    });
                }
                seen.push(id);
                let hint = header_of(above)?
                    .backing_format()
                    .and_then(Format::from_name);
                let format = match hint {
                    Some(f) => f,
                    None => probe_with_warning(p, "this backing file")?,
                };
                layers.push((format, p.clone()));
            }
        }
    }
    // Nest from the bottom up: every backing layer is read-only.
    let mut below: Option<BlockdevOptions> = None;
    for (i, (format, path)) in layers.iter().enumerate().rev() {
        let mut o = image_options(*format, path, i > 0 || read_only, a.locking);
        if *format == Format::Qcow2 {
            o.backing = match below.take() {
                Some(b) => BackingRef::Child(ChildRef::Options(Box::new(b))),
                None => bottom.clone(),
            };
        }
        below = Some(o);
    }
    let mut top = below.expect("at least the top layer");
    top.bitmap_file.clone_from(&a.bitmap_file);
    Ok(top)
}

fn file_id(path: &Path) -> Result<(u64, u64), ImageError> {
    let m = std::fs::metadata(path).map_err(|e| ImageError::open(path, e))?;
    Ok((m.dev(), m.ino()))
}

/// What `sluice serve image` serves: the node, and the bitmaps `bitmap=` named, held busy
/// (in command-line order) for as long as the server keeps them.
pub struct ImageExport {
    pub node: Arc<Node>,
    pub bitmaps: Vec<BusyGuard>,
}

/// Opens the image the command line names (see the module doc) as one shared node.
/// `bitmap=` names are checked (as by [`open_image_export`]) but not held.
pub fn open_image_node(args: &[ConfigArg]) -> Result<Arc<Node>, ImageError> {
    open_image_export(args).map(|e| e.node)
}

/// Opens the image the command line names and the bitmaps it asks to serve.
pub fn open_image_export(args: &[ConfigArg]) -> Result<ImageExport, ImageError> {
    let a = parse_args(args)?;
    let no_nodes = |_: &str| None;
    let read_only = a.readonly.unwrap_or(false);
    let node = match open_node(&build_options(&a, read_only)?, &no_nodes) {
        // Like the file plugin: an image we may not write is served read-only.
        Err(ImageError::Open { source, path })
            if a.readonly.is_none()
                && path == a.file
                && matches!(source.raw_os_error(), Some(libc::EACCES | libc::EROFS)) =>
        {
            tracing::info!("{}: {source}; serving read-only", path.display());
            open_node(&build_options(&a, true)?, &no_nodes)
        }
        r => r,
    }?;
    // Persistent bitmaps: loaded and marked in use while served; saved when the server
    // drops the node at exit (see `node/persist.rs`).
    node.load_bitmaps()?;
    let bitmaps = hold_bitmaps(&node, &a.file, &a.bitmaps)?;
    Ok(ImageExport { node, bitmaps })
}

/// The bitmaps `bitmap=` named, checked as qemu-nbd's `-B` checks them (`nbd_export_create`:
/// found, then not busy and not inconsistent), held busy.
fn hold_bitmaps(node: &Node, file: &Path, names: &[String]) -> Result<Vec<BusyGuard>, ImageError> {
    let mut held = Vec::with_capacity(names.len());
    for name in names {
        let Some((owner, b)) = find_in_chain(node, name)? else {
            let have: Vec<String> = node
                .bitmaps()
                .list()
                .iter()
                .rev()
                .map(|b| b.name().to_string())
                .collect();
            let have = match have.is_empty() {
                true => format!("{} has no persistent bitmaps", file.display()),
                false => format!("{} has: {}", file.display(), have.join(", ")),
            };
            // qemu-nbd's words, and what there is instead.
            return Err(invalid(format!("Bitmap '{name}' is not found ({have})")));
        };
        b.check(Use::Read)
            .map_err(|why| ImageError::BitmapUnusable {
                path: owner.filename().to_owned(),
                name: name.clone(),
                why,
                sidecar: owner.sidecar_path(),
            })?;
        held.push(b.hold());
    }
    Ok(held)
}

/// A bitmap found in a chain, and the layer that has it.
type Found = (Arc<Node>, Arc<Bitmap>);

/// The bitmap `name` of `node` or, failing that, of the first layer down its backing chain
/// that has one, with that layer: qemu-nbd's `-B` looks down the chain the same way. A
/// backing layer's persistent bitmaps are loaded when it is first looked at; backing layers
/// are read-only, so loading them writes nothing.
fn find_in_chain(node: &Node, name: &str) -> Result<Option<Found>, ImageError> {
    let mut at = Some(node.arc());
    while let Some(n) = at {
        n.load_bitmaps()?;
        if let Some(b) = n.bitmaps().get(name) {
            return Ok(Some((n, b)));
        }
        at = n.backing();
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<ConfigArg> {
        words.iter().map(|w| ConfigArg::parse(w)).collect()
    }

    #[test]
    fn parse_args_bare_value_is_file_and_backings_keep_order() {
        let a = parse_args(&args(&[
            "/x/top.qcow2",
            "format=qcow2",
            "backing=/x/b",
            "backing=auto",
        ]))
        .unwrap();
        assert_eq!(a.file, PathBuf::from("/x/top.qcow2"));
        assert_eq!(a.format, Some(Format::Qcow2));
        assert_eq!(
            a.backing,
            [BackingArg::Path("/x/b".into()), BackingArg::Auto]
        );
    }

    #[test]
    fn parse_args_bitmaps_keep_order_once_each() {
        let a = parse_args(&args(&["a", "bitmap=b1", "bitmap=b0", "bitmap=b1"])).unwrap();
        assert_eq!(a.bitmaps, ["b1", "b0"]);
        assert_eq!(
            parse_args(&args(&["a", "bitmap="]))
                .unwrap_err()
                .to_string(),
            "image: bitmap= needs the name of a persistent bitmap"
        );
    }

    #[test]
    fn bitmap_file_is_the_raw_top_layers_and_refused_for_qcow2() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.raw");
        std::fs::write(&img, [0u8; 4096]).unwrap();
        let img = img.to_str().unwrap();
        let a = parse_args(&args(&[img, "format=raw", "bitmap-file=/var/lib/b"])).unwrap();
        assert_eq!(a.bitmap_file.as_deref(), Some(Path::new("/var/lib/b")));
        let o = build_options(&a, false).unwrap();
        assert_eq!(o.bitmap_file.as_deref(), Some(Path::new("/var/lib/b")));
        let err = |w: &[&str]| parse_args(&args(w)).unwrap_err().to_string();
        assert_eq!(
            err(&[img, "bitmap-file="]),
            "image: bitmap-file= needs a file name"
        );
        assert_eq!(
            err(&[img, "bitmap-file=a", "bitmap-file=b"]),
            "image: bitmap-file= given twice"
        );
        let q = parse_args(&args(&[img, "format=qcow2", "bitmap-file=/b"])).unwrap();
        assert_eq!(
            build_options(&q, false).unwrap_err().to_string(),
            "image: bitmap-file= only applies to raw images (a qcow2 image keeps its bitmaps \
             inside)"
        );
    }

    #[test]
    fn parse_args_rejects_bad_values() {
        let err = |w: &[&str]| parse_args(&args(w)).unwrap_err().to_string();
        assert_eq!(
            err(&["format=vmdk", "file=a"]),
            "image: unknown format 'vmdk' (expected raw or qcow2)"
        );
        assert_eq!(
            err(&["format=raw"]),
            "image: you must specify [file=]<FILENAME> on the command line"
        );
        assert_eq!(
            err(&["a", "backing=none", "backing=b"]),
            "image: backing=auto and backing=none must come last (after any backing=PATH)"
        );
        assert_eq!(
            err(&["a", "size=1"]),
            "image: unknown parameter 'size' (see `--help` for this plugin's parameters)"
        );
    }
}
