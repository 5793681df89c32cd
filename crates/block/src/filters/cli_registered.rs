//! The filters written by the command-line helper (exitlast, ip, log, ...), listed here so
//! that the registry in [`super`] picks them up without that file changing hands.

/// Filters registered by this file, merged into [`super::all`].
pub const CLI_FILTERS: &[super::FilterSpec] = &[];
