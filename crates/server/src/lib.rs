//! sluice servers (being written).
