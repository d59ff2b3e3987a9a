//! Lock files: one owner per volume or state dir, held with an exclusive `flock` that the
//! kernel drops when the owner dies (kill -9 included), the owner's pid recorded in the file
//! for the error message of whoever comes second.
//!
//! One subtlety of `flock` in a multithreaded process: the lock belongs to the open file
//! description, and a child that any thread forks (to run a freeze hook, say) holds a copy
//! of every descriptor until its exec closes the close-on-exec ones. A lock released and
//! taken again inside that window meets the child's copy. So the lock files this process
//! holds are registered: a conflict that names our own pid but is not held here is such a
//! transient copy and is waited out, briefly; a lock held here is refused at once.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::sys;

/// The lock files this process holds.
static HELD_HERE: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// How long a conflict with a lock that names this process, but is not held here, may
/// last before it is reported: far longer than any fork-to-exec window, even under load.
const FORKED_COPY_WAIT: Duration = Duration::from_secs(5);

/// Why a lock file could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another owner holds it.
    #[error("locked by {holder}")]
    Held {
        /// "pid N" as the lock file records it, or "unknown pid".
        holder: String,
    },
    /// The lock file could not be opened, locked or written.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What failed.
        action: &'static str,
        /// The lock file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// An exclusive lock file, held for as long as this value lives.
#[derive(Debug)]
pub struct LockFile {
    _file: File,
    path: PathBuf,
}

impl LockFile {
    /// Take the lock at `path` (created if missing) without blocking on another owner,
    /// and record our pid in it.
    pub fn acquire(path: &Path) -> Result<LockFile, LockError> {
        let io_err = |action, source| LockError::Io {
            action,
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| io_err("opening the lock", e))?;
        let started = Instant::now();
        while !sys::try_lock_exclusive(&file).map_err(|e| io_err("locking", e))? {
            let mut holder = String::new();
            file.rewind().map_err(|e| io_err("reading the lock", e))?;
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let forked_copy =
                holder == std::process::id().to_string() && !held_here().contains(path);
            if forked_copy && started.elapsed() < FORKED_COPY_WAIT {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            let holder = if holder.is_empty() {
                "unknown pid".to_string()
            } else {
                format!("pid {holder}")
            };
            return Err(LockError::Held { holder });
        }
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|_| write!(file, "{}", std::process::id()))
            .map_err(|e| io_err("recording our pid in the lock", e))?;
        held_here().insert(path.to_path_buf());
        Ok(LockFile {
            _file: file,
            path: path.to_path_buf(),
        })
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        // The file closes after this, releasing the flock; an `acquire` that meets the
        // lock in between waits, as for a forked copy.
        held_here().remove(&self.path);
    }
}

fn held_here() -> MutexGuard<'static, BTreeSet<PathBuf>> {
    HELD_HERE.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_held_here_is_refused_at_once_and_free_after_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let first = LockFile::acquire(&path).unwrap();
        let started = Instant::now();
        match LockFile::acquire(&path) {
            Err(LockError::Held { holder }) => {
                assert_eq!(holder, format!("pid {}", std::process::id()))
            }
            other => panic!("a second acquire must fail as Held, got {other:?}"),
        }
        assert!(started.elapsed() < FORKED_COPY_WAIT);
        drop(first);
        LockFile::acquire(&path).unwrap();
    }

    /// A child forked by another thread holds a copy of the lock's descriptor until its
    /// exec: an acquire right after a release must wait for it, not fail.
    #[test]
    fn an_acquire_waits_out_a_forked_copy_of_a_released_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        drop(LockFile::acquire(&path).unwrap());
        // The forked copy: another open file description holds the flock, and the file
        // still names this process.
        let copy = File::open(&path).unwrap();
        assert!(sys::try_lock_exclusive(&copy).unwrap());
        let exec = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(copy);
        });
        let lock = LockFile::acquire(&path).unwrap();
        exec.join().unwrap();
        drop(lock);
    }

    #[test]
    fn another_processs_lock_names_its_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        std::fs::write(&path, "4242").unwrap();
        let other = File::open(&path).unwrap();
        assert!(sys::try_lock_exclusive(&other).unwrap());
        match LockFile::acquire(&path) {
            Err(LockError::Held { holder }) => assert_eq!(holder, "pid 4242"),
            other => panic!("expected Held, got {other:?}"),
        }
    }
}
