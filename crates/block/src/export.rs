//! Export policy (being written).
