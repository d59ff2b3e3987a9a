//! The repository lock: one object, `lock`, created with a create-only put, holding its
//! owner (host, pid, operation) and a lease. A writer (backup, prune, gc) holds it for the
//! whole operation and deletes it at the end. A lock whose lease ran out, or whose owner is a
//! process of this host that no longer exists (a kill -9), is stale and broken with a
//! warning; any other lock is broken only with `--break-lock`.

use object_store::path::Path;
use serde::{Deserialize, Serialize};

use crate::{now_unix, RepoError, Repository, Result};

/// How long a lock is honoured without its owner.
pub const LEASE_SECS: u64 = 6 * 3600;

/// The `lock` object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LockInfo {
    pub host: String,
    pub pid: u32,
    pub operation: String,
    pub created_unix: u64,
    pub expires_unix: u64,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

impl LockInfo {
    fn stale_reason(&self) -> Option<String> {
        if self.expires_unix < now_unix() {
            return Some("its lease ran out".into());
        }
        if self.host == hostname() && !std::path::Path::new(&format!("/proc/{}", self.pid)).exists()
        {
            return Some(format!("its process {} on this host is gone", self.pid));
        }
        None
    }
}

/// A held lock; [`RepoLock::release`] deletes it.
#[derive(Debug)]
pub struct RepoLock {
    repo: Repository,
    released: bool,
}

fn lock_path() -> Path {
    Path::from("lock")
}

impl RepoLock {
    /// Take the lock for `operation`. `break_lock` removes a live lock held by another.
    pub async fn acquire(repo: &Repository, operation: &str, break_lock: bool) -> Result<RepoLock> {
        for _ in 0..3 {
            let now = now_unix();
            let info = LockInfo {
                host: hostname(),
                pid: std::process::id(),
                operation: operation.to_string(),
                created_unix: now,
                expires_unix: now + LEASE_SECS,
            };
            let body = serde_json::to_vec(&info).unwrap_or_default();
            if repo.put_create(&lock_path(), body.into()).await? {
                return Ok(RepoLock {
                    repo: repo.clone(),
                    released: false,
                });
            }
            let held = match repo.get_small(&lock_path()).await {
                Ok(bytes) => serde_json::from_slice::<LockInfo>(&bytes).ok(),
                Err(_) => continue,
            };
            let reason = match &held {
                None => Some("it is unreadable".to_string()),
                Some(held) => held.stale_reason(),
            };
            match (reason, break_lock, held.as_ref()) {
                (Some(reason), _, _) => {
                    tracing::warn!(
                        "breaking the stale lock of {} ({reason}): {held:?}",
                        repo.url()
                    );
                    eprintln!(
                        "warning: breaking the stale lock of {} ({reason})",
                        repo.url()
                    );
                }
                (None, true, _) => {
                    tracing::warn!(
                        "--break-lock: removing the lock of {}: {held:?}",
                        repo.url()
                    );
                    eprintln!(
                        "warning: --break-lock: removing a live lock of {} held by {held:?}; if \
                         that operation is still running the repository may need `repo verify`",
                        repo.url()
                    );
                }
                (None, false, None) => {}
                (None, false, Some(held)) => {
                    return Err(RepoError::Invalid(format!(
                        "{} is locked by {} (pid {} on {}, since unix time {}, lease until {}); \
                         wait for it, or if that process is gone rerun with --break-lock",
                        repo.url(),
                        held.operation,
                        held.pid,
                        held.host,
                        held.created_unix,
                        held.expires_unix
                    )));
                }
            }
            match repo.store().delete(&lock_path()).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(source) => {
                    return Err(RepoError::Store {
                        what: "removing a stale lock".into(),
                        source,
                    })
                }
            }
        }
        Err(RepoError::Invalid(format!(
            "could not take the lock of {}: another process keeps taking it",
            repo.url()
        )))
    }

    /// Delete the lock.
    pub async fn release(mut self) -> Result<()> {
        self.released = true;
        match self.repo.store().delete(&lock_path()).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(RepoError::Store {
                what: format!("releasing the lock of {}", self.repo.url()),
                source,
            }),
        }
    }
}

impl Drop for RepoLock {
    fn drop(&mut self) {
        if !self.released {
            tracing::warn!(
                "the lock of {} was not released; the next writer breaks it as stale once this \
                 process is gone",
                self.repo.url()
            );
        }
    }
}
