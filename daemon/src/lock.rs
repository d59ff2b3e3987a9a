//! One daemon per state dir: an exclusive `flock` on `<state-dir>/daemon.lock`.
//!
//! The kernel drops the lock when the process dies, kill -9 included, so a crashed daemon
//! never blocks its successor, and two daemons can never own the same volumes.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::daemon::DaemonError;

/// Held for the daemon's whole life.
#[derive(Debug)]
pub struct DaemonLock {
    _file: File,
}

impl DaemonLock {
    /// Take the lock, or explain who holds it.
    pub fn acquire(state_dir: &Path) -> Result<DaemonLock, DaemonError> {
        let path = state_dir.join("daemon.lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| DaemonError::Io {
                what: format!("opening the daemon lock {}", path.display()),
                source,
            })?;
        let locked =
            tidemark_engine::sys::try_lock_exclusive(&file).map_err(|source| DaemonError::Io {
                what: format!("locking {}", path.display()),
                source,
            })?;
        if !locked {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(DaemonError::Locked {
                pid: holder.trim().to_string(),
                state_dir: state_dir.to_path_buf(),
            });
        }
        let mut file = file;
        let recorded = file
            .set_len(0)
            .and_then(|()| writeln!(file, "{}", std::process::id()));
        recorded.map_err(|source| DaemonError::Io {
            what: "recording the daemon's pid".into(),
            source,
        })?;
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
            err.to_string().contains(&std::process::id().to_string()),
            "{err}"
        );
        drop(first);
        DaemonLock::acquire(dir.path()).unwrap();
    }
}
