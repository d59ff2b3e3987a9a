//! The NBD protocol (NetworkBlockDevice/nbd doc/proto.md): wire codecs without I/O,
//! a negotiation state machine, a tokio server for any [`export::Export`], and a client.
//!
//! This crate knows nothing of the engine: it serves whatever implements the export trait.
#![forbid(unsafe_code)]

pub mod export;
