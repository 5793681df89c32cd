//! Tests of the luks filter (filled in by their change).
