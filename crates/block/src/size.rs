//! Size strings with nbdkit syntax (being written).
