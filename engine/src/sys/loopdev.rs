//! The loop-device ioctls for the daemon's FUSE + loop front end (rustix wraps none of
//! them), one of the engine's `unsafe` modules.
//!
//! Layouts follow `<linux/loop.h>` (stable UAPI since Linux 5.8 for `LOOP_CONFIGURE`):
//!
//! ```text
//! struct loop_config {            // 304 bytes
//!     u32 fd;                     //   0: backing file descriptor
//!     u32 block_size;             //   4: logical block size, 0 = 512
//!     struct loop_info64 info;    //   8: 232 bytes, lo_flags at 8 + 52
//!     u64 reserved[8];            // 240: must be zero
//! };
//! ```
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;

/// The loop device refuses writes.
pub const LO_FLAGS_READ_ONLY: u32 = 1;
/// The loop device reads and writes its backing file with O_DIRECT.
pub const LO_FLAGS_DIRECT_IO: u32 = 16;

/// `struct loop_info64`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A free loop device's path, from `/dev/loop-control` (LOOP_CTL_GET_FREE).
pub fn free_loop_device() -> io::Result<PathBuf> {
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    // SAFETY: LOOP_CTL_GET_FREE takes no argument and only returns an index; `control` is
    // an open descriptor of /dev/loop-control for the whole call.
    let index = check(unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) })?;
    Ok(PathBuf::from(format!("/dev/loop{index}")))
}

/// Bind `backing` to the free loop device `device` in one step (LOOP_CONFIGURE), with the
/// given logical block size, `LO_FLAGS_*` and a name shown by `losetup`.
pub fn configure_loop(
    device: &File,
    backing: &File,
    block_size: u32,
    flags: u32,
    name: &str,
) -> io::Result<()> {
    let mut info = LoopInfo64 {
        lo_device: 0,
        lo_inode: 0,
        lo_rdevice: 0,
        lo_offset: 0,
        lo_sizelimit: 0,
        lo_number: 0,
        lo_encrypt_type: 0,
        lo_encrypt_key_size: 0,
        lo_flags: flags,
        lo_file_name: [0; 64],
        lo_crypt_name: [0; 64],
        lo_encrypt_key: [0; 32],
        lo_init: [0; 2],
    };
    // Keep the terminating NUL: at most 63 name bytes.
    let name = &name.as_bytes()[..name.len().min(63)];
    info.lo_file_name[..name.len()].copy_from_slice(name);
    let config = LoopConfig {
        fd: backing.as_raw_fd() as u32,
        block_size,
        info,
        reserved: [0; 8],
    };
    // SAFETY: LOOP_CONFIGURE reads exactly one `struct loop_config`, whose layout
    // `LoopConfig` reproduces (size asserted above); the pointer is to a live local that
    // outlives the call, and the kernel only reads it. `config.fd` is an open descriptor
    // borrowed from `backing` for the duration of the call (the kernel takes its own
    // reference to the file).
    check(unsafe {
        libc::ioctl(
            device.as_raw_fd(),
            LOOP_CONFIGURE,
            &config as *const LoopConfig,
        )
    })?;
    Ok(())
}

/// Unbind a loop device from its backing file (LOOP_CLR_FD). When others still hold the
/// device open the kernel only marks it to clear on their last close; call it on a
/// descriptor from [`open_exclusive`] to be sure it is not in use.
pub fn clear_loop(device: &File) -> io::Result<()> {
    // SAFETY: LOOP_CLR_FD takes no argument; `device` is an open loop device descriptor.
    check(unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CLR_FD) })?;
    Ok(())
}

/// Open a block device with O_EXCL: fails with EBUSY while a filesystem is mounted on it
/// or another exclusive opener holds it.
pub fn open_exclusive(device: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
        .open(device)
}
