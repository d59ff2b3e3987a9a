//! The few system calls quiescing needs that std does not wrap: `FIFREEZE`/`FITHAW`,
//! `syncfs`, the monotonic clock (shared with the watchdog process) and killing a hook's
//! process group. Each wrapper is one libc call; this is the only `unsafe` of `quiesce`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

/// `_IOWR('X', 119, int)` from `<linux/fs.h>`: freeze the filesystem the fd lives on.
const FIFREEZE: libc::Ioctl = 0xC004_5877;
/// `_IOWR('X', 120, int)` from `<linux/fs.h>`: thaw it.
const FITHAW: libc::Ioctl = 0xC004_5878;

/// Freezes the filesystem that `dir` (an open directory on it) belongs to: the kernel
/// syncs it and then blocks every new write until [`fithaw`].
pub(crate) fn fifreeze(dir: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: FIFREEZE reads no argument memory (the kernel's ioctl_fsfreeze ignores `arg`,
    // we pass 0 as fsfreeze(8) does), and `dir` is a live descriptor borrowed for the call.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Thaws the filesystem `dir` belongs to. `EINVAL` means it was not frozen.
pub(crate) fn fithaw(dir: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: as for FIFREEZE: no argument memory is read, `dir` is live for the call.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), FITHAW, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Writes back the dirty data of the filesystem `fd` lives on.
pub(crate) fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: syncfs takes only a descriptor, and `fd` is live for the call.
    let rc = unsafe { libc::syncfs(fd.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `CLOCK_MONOTONIC` as a duration since boot. Unlike `Instant`, the value means the same
/// in every process of the machine, so the parent can hand the watchdog an absolute
/// deadline through a pipe.
pub(crate) fn monotonic_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec owned by this frame for the whole call;
    // CLOCK_MONOTONIC always exists on Linux, so the call cannot fail.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Sends SIGKILL to every process of the process group `pgid`.
///
/// Callers pass the pid of a child they started as a group leader and have not reaped
/// yet, so the group id cannot have been recycled for someone else's processes.
pub(crate) fn kill_process_group(pgid: u32) -> io::Result<()> {
    let pgid = libc::pid_t::try_from(pgid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "process id out of range"))?;
    // SAFETY: kill(2) touches no memory of ours; a negative pid addresses the group, and
    // the group is our unreaped child's (see above), so only the hook's processes die.
    let rc = unsafe { libc::kill(-pgid, libc::SIGKILL) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Ignores SIGTERM, SIGINT and SIGHUP for the rest of this process's life (the watchdog:
/// a service manager stopping the daemon's whole cgroup must not kill the watchdog before
/// the daemon's death lets it thaw; it always ends by itself).
pub(crate) fn ignore_stop_signals() -> io::Result<()> {
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: SIG_IGN installs no handler code, so no async-signal-safety question
        // arises; `signal` is a valid signal number and no other thread of the watchdog
        // has started yet to race on the disposition.
        if unsafe { libc::signal(signal, libc::SIG_IGN) } == libc::SIG_ERR {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
