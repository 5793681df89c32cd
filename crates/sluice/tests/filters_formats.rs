//! nbdkit 1.32's format filters (scan, tar, ddrescue, luks, gzip, xz, ext2) through the `sluice`
//! binary, each compared with Debian's nbdkit running the same filter over the same plugin
//! and input: the same size, bytes, `nbdinfo --json` capabilities and errors.
//!
//! Each group of filters has its own file under `filters_formats/`.

mod archive;
mod compressed;
mod ext2;
mod luks;
