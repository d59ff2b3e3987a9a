//! The few system calls the volume layer needs that std does not wrap: the size of a
//! block device, discarding and zeroing ranges, and finding holes.
//!
//! This is one of the engine's small `unsafe` modules: every function is a thin, safe
//! wrapper around one libc call, and each `unsafe` block argues why the call is sound.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// `BLKGETSIZE64` from `<linux/fs.h>`: `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `BLKDISCARD` from `<linux/fs.h>`: `_IO(0x12, 119)`.
const BLKDISCARD: libc::c_ulong = 0x1277;
/// `BLKZEROOUT` from `<linux/fs.h>`: `_IO(0x12, 127)`.
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// The size in bytes of the block device open as `file`.
pub(crate) fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes exactly one u64 through the pointer it is given; `size`
    // is a live, aligned, writable u64 for the duration of the call, and `file` keeps the
    // descriptor open.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// Issue a range ioctl (`BLKDISCARD`, `BLKZEROOUT`) whose argument is `[offset, len]`.
fn block_range_ioctl(file: &File, request: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: both ioctls read exactly two u64 (start, length) through the pointer; `range`
    // lives on this stack frame for the whole call and is only read by the kernel.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request, range.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Discard `len` bytes at `offset` of a block device.
pub(crate) fn block_discard(file: &File, offset: u64, len: u64) -> io::Result<()> {
    block_range_ioctl(file, BLKDISCARD, offset, len)
}

/// Zero `len` bytes at `offset` of a block device (the kernel picks the fastest way).
pub(crate) fn block_zeroout(file: &File, offset: u64, len: u64) -> io::Result<()> {
    block_range_ioctl(file, BLKZEROOUT, offset, len)
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate takes no pointers; it only needs a valid descriptor, which `file`
    // keeps open for the duration of the call.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Deallocate a range of a regular file; it reads as zeroes afterwards, size unchanged.
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// Make a range of a regular file read as zeroes while keeping it allocated.
pub(crate) fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// Allocate a range of a regular file (extending it), so later writes cannot hit ENOSPC.
pub(crate) fn preallocate(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(file, 0, offset, len)
}

/// `lseek(SEEK_DATA)` / `lseek(SEEK_HOLE)`: the next data or hole at or after `offset`.
/// `Ok(None)` when there is no data at or after `offset` (ENXIO).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let Ok(offset) = libc::off_t::try_from(offset) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: lseek takes no pointers. It moves the shared file offset, which nothing in
    // the engine relies on: all data I/O is positional (pread/pwrite).
    let rc = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(err);
    }
    Ok(Some(rc as u64))
}

/// The next byte at or after `offset` that holds data, `None` when only holes follow.
pub(crate) fn seek_data(file: &File, offset: u64) -> io::Result<Option<u64>> {
    seek(file, offset, libc::SEEK_DATA)
}

/// The next hole at or after `offset` (the end of the file counts as a hole).
pub(crate) fn seek_hole(file: &File, offset: u64) -> io::Result<Option<u64>> {
    seek(file, offset, libc::SEEK_HOLE)
}

/// Largest number of buffers one `pwritev` takes (`IOV_MAX` on Linux).
pub(crate) const IOV_MAX: usize = 1024;

/// `pwritev`: write `bufs` in order, contiguously, at `offset`; returns the bytes written
/// (possibly fewer than asked, like `pwrite`). At most [`IOV_MAX`] buffers are passed.
pub(crate) fn pwritev(file: &File, bufs: &[io::IoSlice<'_>], offset: u64) -> io::Result<usize> {
    let Ok(offset) = libc::off_t::try_from(offset) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    let count = bufs.len().min(IOV_MAX) as libc::c_int;
    // SAFETY: `IoSlice` is guaranteed ABI-compatible with `struct iovec` on Unix, so the
    // pointer is a valid array of `count` iovecs whose buffers are borrowed (readable)
    // for the whole call; the kernel only reads them. `file` keeps the descriptor open.
    let rc = unsafe {
        libc::pwritev(
            file.as_raw_fd(),
            bufs.as_ptr().cast::<libc::iovec>(),
            count,
            offset,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as usize)
}

/// Try to take an exclusive `flock` on `file` without blocking: `Ok(false)` when another
/// open file description holds it. Released when the descriptor is closed.
pub(crate) fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    // SAFETY: flock takes no pointers; `file` keeps the descriptor open for the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(false);
    }
    Err(err)
}
