//! The one `/dev/fuse` ioctl the daemon's FUSE front end needs and rustix does not wrap:
//! `FUSE_DEV_IOC_CLONE`, which gives a FUSE connection another device descriptor with a
//! request queue of its own, so several threads each read requests from, and answer
//! them on, their own descriptor without sharing the kernel's processing-list lock.
//! One of the engine's `unsafe` modules.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

/// `_IOR(229, 0, uint32_t)` from `<linux/fuse.h>`.
const FUSE_DEV_IOC_CLONE: libc::Ioctl = 0x8004_E500;

/// A new `/dev/fuse` descriptor on the connection of `session` (a mounted FUSE
/// filesystem's device descriptor). Requests the kernel queues are read from whichever
/// descriptor asks first; a reply must go to the descriptor its request was read from.
pub fn clone_fuse_device(session: &File) -> io::Result<File> {
    let clone = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/fuse")?;
    let source: u32 = session
        .as_raw_fd()
        .try_into()
        .map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: FUSE_DEV_IOC_CLONE reads exactly one u32 (the source descriptor) through the
    // pointer; `source` is a live, aligned u32 on this frame for the whole call and the
    // kernel only reads it. `clone` and `session` are open descriptors borrowed for the call.
    let rc = unsafe { libc::ioctl(clone.as_raw_fd(), FUSE_DEV_IOC_CLONE, &source as *const u32) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(clone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clone_request_number_is_the_kernels() {
        // _IOC(dir = read (2), type = 229, nr = 0, size = 4)
        let expected = (2u32 << 30) | (4 << 16) | (229 << 8);
        assert_eq!(FUSE_DEV_IOC_CLONE as u32, expected);
    }
}
