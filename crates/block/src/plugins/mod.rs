//! Built-in plugins (being written).
