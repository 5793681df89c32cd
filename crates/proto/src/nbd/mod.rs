//! NBD protocol: constants, negotiation and transmission codecs.
pub mod consts;
