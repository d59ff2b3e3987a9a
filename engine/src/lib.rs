//! tidemark's engine: volumes under management, the write path (dirty tracking and
//! copy-before-write), checkpoints, snapshots, the copy engine and quiescing.
//!
//! `unsafe` is denied crate-wide and allowed only in the low-level modules that need it,
//! each unsafe block arguing its invariant in a `SAFETY:` comment:
//! - `io::buf`: the aligned, mmap'ed I/O buffers (mmap, munmap, madvise) and their slices;
//! - `io::ring`: the io_uring ring, registering those buffers and pushing SQEs into them;
//! - `sys::ioctl`: block-device and filesystem ioctls (BLKGETSIZE64, BLKDISCARD,
//!   BLKZEROOUT, FIFREEZE, FITHAW);
//! - `sys::process`: ignoring stop signals in the quiesce watchdog.
//!
//! Every other system call goes through rustix in [`sys`], without `unsafe`.

#![deny(unsafe_code)]

pub mod checkpoint;
pub mod copy;
pub mod error;
mod failpoint;
pub mod io;
pub mod lockfile;
pub mod point_map;
pub mod quiesce;
pub mod rollback;
pub mod snapshot;
pub mod status;
pub mod sys;
pub mod tracking;
pub mod volume;
