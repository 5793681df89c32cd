//! nbdkit 1.32's format filters (scan, tar, ddrescue, luks, gzip, xz, ext2) through the `sluice`
//! binary, each compared with Debian's nbdkit running the same filter over the same plugin
//! and input: the same size, bytes, `nbdinfo --json` capabilities and errors.
//!
//! One test binary for all of them (one link in CI); each group of filters has its own file
//! under `filters_formats/`.

mod support;

#[path = "filters_formats/archive.rs"]
mod archive;
#[path = "filters_formats/compressed.rs"]
mod compressed;
#[path = "filters_formats/ext2.rs"]
mod ext2;
#[path = "filters_formats/luks.rs"]
mod luks;
