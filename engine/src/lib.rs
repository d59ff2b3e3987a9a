//! tidemark's engine: volumes under management, the write path (dirty tracking and
//! copy-before-write), checkpoints, snapshots, the copy engine and quiescing.
//!
//! `unsafe` is confined to the low-level modules that need it (io_uring, ioctls,
//! aligned buffers, mmap); each unsafe block argues its invariant in a `SAFETY:` comment.

pub mod checkpoint;
pub mod copy;
pub mod io;
pub mod quiesce;
pub mod snapshot;
pub mod status;
pub mod tracking;
pub mod volume;
