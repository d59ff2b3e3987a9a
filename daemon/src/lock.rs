//! One daemon per state dir: an exclusive `flock` on `<state-dir>/daemon.lock`.
//!
//! The kernel drops the lock when the process dies, kill -9 included, so a crashed daemon
//! never blocks its successor, and two daemons can never own the same volumes.

use std::path::Path;

use tidemark_engine::lockfile::{LockError, LockFile};

use crate::daemon::DaemonError;

/// Held for the daemon's whole life.
#[derive(Debug)]
pub struct DaemonLock {
    _file: LockFile,
}

impl DaemonLock {
    /// Take the lock, or explain who holds it.
    pub fn acquire(state_dir: &Path) -> Result<DaemonLock, DaemonError> {
        let path = state_dir.join("daemon.lock");
        match LockFile::acquire(&path) {
            Ok(file) => Ok(DaemonLock { _file: file }),
            Err(LockError::Held { holder }) => Err(DaemonError::Locked {
                holder,
                state_dir: state_dir.to_path_buf(),
            }),
            Err(LockError::Io {
                action,
                path,
                source,
            }) => Err(DaemonError::Io {
                what: format!("{action} {}", path.display()),
                source,
            }),
        }
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
            err.to_string().contains(&std::process::id().to_string()),
            "{err}"
        );
        drop(first);
        DaemonLock::acquire(dir.path()).unwrap();
    }
}
