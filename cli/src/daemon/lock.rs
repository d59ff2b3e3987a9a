//! One daemon per state dir: an exclusive `flock` on `<state-dir>/daemon.lock`.
//!
//! The kernel drops the lock when the process dies, kill -9 included, so a crashed daemon
//! never blocks its successor, and two daemons can never own the same volumes.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use nix::fcntl::FlockArg;

/// Held for the daemon's whole life.
#[derive(Debug)]
pub struct DaemonLock {
    _file: nix::fcntl::Flock<File>,
}

impl DaemonLock {
    /// Take the lock, or explain who holds it.
    pub fn acquire(state_dir: &Path) -> anyhow::Result<DaemonLock> {
        let path = state_dir.join("daemon.lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening the daemon lock {}", path.display()))?;
        let mut file = match nix::fcntl::Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                anyhow::bail!(
                    "another `tidemark serve` (pid {}) owns the state dir {}; stop it first or \
                     pass another --state-dir",
                    holder.trim(),
                    state_dir.display()
                );
            }
            Err((_, errno)) => {
                return Err(std::io::Error::from(errno))
                    .with_context(|| format!("locking {}", path.display()))
            }
        };
        file.set_len(0).context("recording the daemon's pid")?;
        writeln!(file, "{}", std::process::id()).context("recording the daemon's pid")?;
        Ok(DaemonLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_daemon_is_refused_while_the_first_holds_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let first = DaemonLock::acquire(dir.path()).unwrap();
        let err = DaemonLock::acquire(dir.path()).unwrap_err();
        assert!(
            format!("{err:#}").contains(&std::process::id().to_string()),
            "{err:#}"
        );
        drop(first);
        DaemonLock::acquire(dir.path()).unwrap();
    }
}
