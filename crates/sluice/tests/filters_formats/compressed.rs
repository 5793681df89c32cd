//! Tests of the gzip and xz filters (filled in by their change).
