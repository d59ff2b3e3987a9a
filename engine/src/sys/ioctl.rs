//! The ioctls rustix does not wrap: the size of a block device, discarding and zeroing
//! its ranges (`BLKGETSIZE64`, `BLKDISCARD`, `BLKZEROOUT`), and freezing and thawing a
//! filesystem (`FIFREEZE`, `FITHAW`). Each wrapper is one libc call whose `unsafe` block
//! argues why the argument memory is sound.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `BLKGETSIZE64` from `<linux/fs.h>`: `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::Ioctl = 0x8008_1272;
/// `BLKDISCARD` from `<linux/fs.h>`: `_IO(0x12, 119)`.
const BLKDISCARD: libc::Ioctl = 0x1277;
/// `BLKZEROOUT` from `<linux/fs.h>`: `_IO(0x12, 127)`.
const BLKZEROOUT: libc::Ioctl = 0x127f;
/// `_IOWR('X', 119, int)` from `<linux/fs.h>`: freeze the filesystem the fd lives on.
const FIFREEZE: libc::Ioctl = 0xC004_5877;
/// `_IOWR('X', 120, int)` from `<linux/fs.h>`: thaw it.
const FITHAW: libc::Ioctl = 0xC004_5878;

/// The size in bytes of the block device open as `file`.
pub(crate) fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes exactly one u64 through the pointer it is given; `size`
    // is a live, aligned, writable u64 for the duration of the call, and `file` keeps the
    // descriptor open.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    check(rc)?;
    Ok(size)
}

/// Discard `len` bytes at `offset` of a block device.
pub(crate) fn block_discard(file: &File, offset: u64, len: u64) -> io::Result<()> {
    block_range_ioctl(file, BLKDISCARD, offset, len)
}

/// Zero `len` bytes at `offset` of a block device (the kernel picks the fastest way).
pub(crate) fn block_zeroout(file: &File, offset: u64, len: u64) -> io::Result<()> {
    block_range_ioctl(file, BLKZEROOUT, offset, len)
}

/// Issue a range ioctl (`BLKDISCARD`, `BLKZEROOUT`) whose argument is `[offset, len]`.
fn block_range_ioctl(file: &File, request: libc::Ioctl, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: both ioctls read exactly two u64 (start, length) through the pointer; `range`
    // lives on this stack frame for the whole call and is only read by the kernel.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request, range.as_ptr()) };
    check(rc)
}

/// Freezes the filesystem that `dir` (an open directory on it) belongs to: the kernel
/// syncs it and then blocks every new write until [`fithaw`].
pub(crate) fn fifreeze(dir: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: FIFREEZE reads no argument memory (the kernel's ioctl_fsfreeze ignores `arg`,
    // we pass 0 as fsfreeze(8) does), and `dir` is a live descriptor borrowed for the call.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE, 0) };
    check(rc)
}

/// Thaws the filesystem `dir` belongs to. `EINVAL` means it was not frozen.
pub(crate) fn fithaw(dir: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: as for FIFREEZE: no argument memory is read, `dir` is live for the call.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), FITHAW, 0) };
    check(rc)
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
