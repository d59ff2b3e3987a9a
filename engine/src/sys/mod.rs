//! The engine's one system-call layer.
//!
//! - [`file`]: SEEK_DATA/SEEK_HOLE, fallocate modes, `pwritev`, page-cache probes,
//!   `syncfs` and `flock`, all through rustix, so no `unsafe` is needed;
//! - `ioctl`: the block-device and filesystem ioctls rustix does not wrap
//!   (`BLKGETSIZE64`, `BLKDISCARD`, `BLKZEROOUT`, `FIFREEZE`, `FITHAW`), one of the
//!   engine's `unsafe` modules;
//! - [`loopdev`]: the loop-device ioctls (`LOOP_CTL_GET_FREE`, `LOOP_CONFIGURE`,
//!   `LOOP_CLR_FD`) and exclusive opens the daemon's FUSE + loop front end uses, `unsafe`;
//! - [`fusedev`]: `FUSE_DEV_IOC_CLONE`, one `/dev/fuse` descriptor per request-serving
//!   thread of that front end, `unsafe`;
//! - `process`: the monotonic clock, the open-file limit, killing a process group
//!   (rustix) and ignoring stop signals (the one libc call left, `unsafe`).
//!
//! The io_uring ring and its aligned buffers keep their `unsafe` in [`crate::io`]'s `ring`
//! and `buf` modules, which own the memory the kernel is handed.

pub mod file;
#[allow(unsafe_code)]
pub mod fusedev;
#[allow(unsafe_code)]
pub(crate) mod ioctl;
#[allow(unsafe_code)]
pub mod loopdev;
#[allow(unsafe_code)]
pub(crate) mod process;

pub use file::{is_cached, punch_hole, seek_data, seek_hole, try_lock_exclusive, zero_range};
pub(crate) use file::{preallocate, pwritev, syncfs, IOV_MAX};
pub(crate) use ioctl::{block_device_size, block_discard, block_zeroout, fifreeze, fithaw};
pub use process::raise_open_file_limit;
pub(crate) use process::{ignore_stop_signals, kill_process_group, monotonic_now};
