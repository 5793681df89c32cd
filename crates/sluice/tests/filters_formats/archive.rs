//! Tests of the scan, tar and ddrescue format filters (filled in by their change).
