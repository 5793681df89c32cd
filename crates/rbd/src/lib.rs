//! sluice's Ceph RBD backend: serves an image of a Ceph cluster through librbd's C API.
//!
//! The crate is layered so that each front end takes the piece it needs:
//! - [`options`]: which image and how to reach its cluster ([`RbdOptions`]), typed, and
//!   parsed from `sluice serve rbd` parameters;
//! - [`image`]: the connection sequence and one open [`Image`] with the requests a block
//!   server makes (asynchronous librbd requests, answered by callback or waited for);
//! - [`plugin`]: [`RbdPlugin`], the image as a `sluice_block` [`Plugin`] with NBD's
//!   semantics mapped once (FUA, zero, trim, block status, multi-conn); a daemon driver
//!   wraps it by building [`RbdOptions`] from its own options and calling
//!   [`RbdPlugin::connect`];
//! - [`error`]: librbd's negative errno turned into one clear line per failure;
//! - [`sys`]: the C functions, loaded at run time from `librbd.so.1` and `librados.so.2`
//!   (why loaded and hand-declared rather than linked or generated is written there).
//!
//! [`Plugin`]: sluice_block::Plugin

pub mod error;
pub mod image;
pub mod options;
pub mod plugin;
pub mod sys;

pub use error::RbdError;
pub use image::Image;
pub use options::{RbdOptions, HELP, MAGIC_KEY};
pub use plugin::{RbdPlugin, NAME};

/// nbdkit's `--dump-plugin` text for the `rbd` plugin. It needs no parameters and does not
/// connect to a cluster; it says which librbd would be used.
pub fn dump_plugin() -> String {
    let mut t = format!(
        "name={NAME}\nversion={}\napi_version=2\nmax_thread_model=parallel\n\
         thread_model=parallel\nmagic_config_key={MAGIC_KEY}\n",
        env!("CARGO_PKG_VERSION")
    );
    for line in plugin::dump_lines() {
        t.push_str(&line);
        t.push('\n');
    }
    t
}

#[cfg(test)]
mod tests {
    #[test]
    fn dump_plugin_names_plugin_and_librbd() {
        let t = super::dump_plugin();
        assert!(t.starts_with("name=rbd\n"), "{t}");
        assert!(t.contains("\nmagic_config_key=image\n"), "{t}");
        assert!(t.contains("\nrbd_librbd_version=1."), "{t}");
    }
}
