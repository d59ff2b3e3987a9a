//! The NBD protocol (NetworkBlockDevice/nbd doc/proto.md): wire codecs without I/O,
//! a negotiation state machine, a tokio server for any [`export::Export`], and a client.
//!
//! - [`proto`]: every message as bytes <-> types, no I/O, total parsers (fuzzed);
//! - [`negotiate`]: the server's option haggling as a state machine;
//! - [`server`]: the tokio server with a registry of named exports;
//! - [`file`](mod@file): a plain file or block device as an export (`tidemark export`);
//! - [`client`]: an async client (`tidemark pull`, `tidemark bench`) and [`uri`] parsing.
//!
//! This crate knows nothing of the engine: it serves whatever implements the export trait.
#![forbid(unsafe_code)]

pub mod client;
pub mod export;
pub mod file;
pub mod negotiate;
pub mod proto;
mod record;
pub mod server;
pub mod tls;
pub mod uri;
