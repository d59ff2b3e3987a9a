//! tidemark's on-disk formats as pure code: bytes in, validated types out, and back.
//!
//! No threads, no sockets, no `unsafe`. Every parser is total: any input, however
//! truncated or hostile, yields a value or an error naming the file and byte offset.
//! docs/FORMATS.md is the byte-level specification of every file defined here.
#![forbid(unsafe_code)]

mod atomic;
pub mod bitmap;
pub mod cow;
pub mod delta;
pub mod error;
mod header;
pub mod manifest;

pub use atomic::{atomic_replace, atomic_replace_with};
pub use error::{FormatError, FormatErrorKind, InvalidField};
/// The uuid type every header here uses, re-exported so users need no uuid dependency.
pub use uuid::Uuid;
