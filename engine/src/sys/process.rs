//! What quiescing needs of processes and clocks: the monotonic clock (shared with the
//! watchdog process), the effective uid (who may own hooks), killing a hook's process
//! group, and ignoring stop signals. The first three go through rustix; the signal
//! disposition is the one libc call left.

use std::io;
use std::time::Duration;

use rustix::process::{Pid, Signal};
use rustix::time::ClockId;

/// `CLOCK_MONOTONIC` as a duration since boot. Unlike `Instant`, the value means the same
/// in every process of the machine, so the parent can hand the watchdog an absolute
/// deadline through a pipe.
pub(crate) fn monotonic_now() -> Duration {
    let ts = rustix::time::clock_gettime(ClockId::Monotonic);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// This process's effective user id (the owner hooks may have besides root).
pub(crate) fn effective_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Sends SIGKILL to every process of the process group `pgid`.
///
/// Callers pass the pid of a child they started as a group leader and have not reaped
/// yet, so the group id cannot have been recycled for someone else's processes.
pub(crate) fn kill_process_group(pgid: u32) -> io::Result<()> {
    let pgid = i32::try_from(pgid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "process id out of range"))?;
    Ok(rustix::process::kill_process_group(pgid, Signal::KILL)?)
}

/// Raises this process's soft limit on open files to its hard limit, returning both
/// values before and after. A daemon holds a descriptor per volume (its backing), and the
/// soft limit (often 1024) is a historical default for `select`, which nothing here uses.
pub fn raise_open_file_limit() -> io::Result<(u64, u64)> {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let (Some(soft), hard) = (limit.current, limit.maximum) else {
        return Ok((u64::MAX, u64::MAX));
    };
    let wanted = hard.unwrap_or(u64::MAX);
    if soft >= wanted {
        return Ok((soft, soft));
    }
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(wanted),
            maximum: hard,
        },
    )?;
    Ok((soft, wanted))
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
