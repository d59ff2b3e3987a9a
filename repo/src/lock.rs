//! The repository locks.
//!
//! The writer lock is one object, `lock`, created with a create-only put, holding its owner
//! (host, pid, operation), a lease and a kind: `append` for a backup (it only adds objects)
//! or `exclusive` for prune and gc (they delete objects). One writer at a time holds it for
//! the whole operation and deletes it at the end.
//!
//! Readers that keep a point open for a long time (`repo export`) take a shared lock: an
//! object `locks/<random id>` of kind `shared` with a short lease ([`SHARED_LEASE_SECS`])
//! that its owner refreshes while it serves. Backups ignore shared locks; prune and gc
//! refuse to run while one is live, naming its owner, because they delete packs a reader may
//! be about to read. Each side writes its own lock first and looks for the other's second,
//! so of a reader and a pruner that start together at least one sees the other and backs off.
//!
//! A lock whose lease ran out, or whose owner is a process of this host that no longer
//! exists (a kill -9), is stale and broken with a warning; any other lock is broken only
//! with `--break-lock`.

use object_store::path::Path;
use object_store::PutPayload;
use serde::{Deserialize, Serialize};

use crate::{now_unix, RepoError, Repository, Result};

/// How long a writer lock is honoured without its owner.
pub const LEASE_SECS: u64 = 6 * 3600;
/// How long a shared lock is honoured without a refresh; its owner refreshes it every
/// quarter of this.
pub const SHARED_LEASE_SECS: u64 = 120;

/// What a lock's owner does.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LockKind {
    /// Reads points (`repo export`): excludes prune and gc.
    Shared,
    /// Adds objects (a backup): excludes other writers, not readers.
    Append,
    /// Deletes objects (prune, gc): excludes writers and readers. Locks written before
    /// kinds existed are taken as this.
    #[default]
    Exclusive,
}

/// A lock object (`lock` or `locks/<id>`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LockInfo {
    pub host: String,
    pub pid: u32,
    pub operation: String,
    pub created_unix: u64,
    pub expires_unix: u64,
    #[serde(default)]
    pub kind: LockKind,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

impl LockInfo {
    fn mine(operation: &str, kind: LockKind, lease: u64) -> LockInfo {
        let now = now_unix();
        LockInfo {
            host: hostname(),
            pid: std::process::id(),
            operation: operation.to_string(),
            created_unix: now,
            expires_unix: now + lease,
            kind,
        }
    }

    /// "OPERATION (pid P on HOST, since unix time T, lease until U)".
    fn owner(&self) -> String {
        format!(
            "{} (pid {} on {}, since unix time {}, lease until {})",
            self.operation, self.pid, self.host, self.created_unix, self.expires_unix
        )
    }

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
    /// Take the writer lock for `operation` (`kind` Append or Exclusive). `break_lock`
    /// removes a live lock held by another; an Exclusive lock is refused while a shared
    /// lock is live (also broken by `break_lock`).
    pub async fn acquire(
        repo: &Repository,
        operation: &str,
        kind: LockKind,
        break_lock: bool,
    ) -> Result<RepoLock> {
        let lock = RepoLock::take(repo, operation, kind, break_lock).await?;
        if kind == LockKind::Exclusive {
            if let Err(err) = check_readers(repo, break_lock).await {
                lock.release().await?;
                return Err(err);
            }
        }
        Ok(lock)
    }

    async fn take(
        repo: &Repository,
        operation: &str,
        kind: LockKind,
        break_lock: bool,
    ) -> Result<RepoLock> {
        for _ in 0..3 {
            let info = LockInfo::mine(operation, kind, LEASE_SECS);
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
                        "{} is locked by {}; wait for it, or if that process is gone rerun with \
                         --break-lock",
                        repo.url(),
                        held.owner()
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

fn shared_prefix() -> Path {
    Path::from("locks")
}

/// Refuse while a shared lock is live; break stale ones (and with `break_lock` live ones)
/// with a warning.
async fn check_readers(repo: &Repository, break_lock: bool) -> Result<()> {
    for (path, _) in repo.list_objects(shared_prefix().as_ref()).await? {
        let held = match repo.get_small(&path).await {
            Ok(bytes) => serde_json::from_slice::<LockInfo>(&bytes).ok(),
            // Released while we listed.
            Err(RepoError::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => continue,
            Err(err) => return Err(err),
        };
        let reason = match &held {
            None => Some("it is unreadable".to_string()),
            Some(held) => held.stale_reason(),
        };
        match (reason, held) {
            (Some(reason), _) => eprintln!(
                "warning: breaking the stale shared lock {path} of {} ({reason})",
                repo.url()
            ),
            (None, Some(held)) if break_lock => eprintln!(
                "warning: --break-lock: removing the live shared lock {path} of {} held by {}; \
                 its reads of removed packs will fail",
                repo.url(),
                held.owner()
            ),
            (None, Some(held)) => {
                return Err(RepoError::Invalid(format!(
                    "{} is being read by {}: pruning now could remove packs it reads; stop it \
                     and rerun, or if that process is gone rerun with --break-lock",
                    repo.url(),
                    held.owner()
                )))
            }
            (None, None) => continue,
        }
        match repo.store().delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(source) => {
                return Err(RepoError::Store {
                    what: format!("removing the stale shared lock {path}"),
                    source,
                })
            }
        }
    }
    Ok(())
}

/// A held shared lock, refreshed in the background until [`SharedLock::release`].
#[derive(Debug)]
pub struct SharedLock {
    repo: Repository,
    path: Path,
    refresher: tokio::task::JoinHandle<()>,
}

impl SharedLock {
    /// Take a shared lock for `operation` (a reader of points); refused while prune or gc
    /// holds the writer lock. Call inside a tokio runtime: it spawns the refresher.
    pub async fn acquire(repo: &Repository, operation: &str) -> Result<SharedLock> {
        let path = Path::from(format!("{}/{}", shared_prefix(), uuid::Uuid::new_v4()));
        let info = LockInfo::mine(operation, LockKind::Shared, SHARED_LEASE_SECS);
        let body = serde_json::to_vec(&info).unwrap_or_default();
        if !repo.put_create(&path, body.into()).await? {
            return Err(RepoError::Invalid(format!(
                "the shared lock {path} of {} exists already",
                repo.url()
            )));
        }
        let writer = match repo.get_small(&lock_path()).await {
            Ok(bytes) => serde_json::from_slice::<LockInfo>(&bytes).ok(),
            Err(RepoError::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => None,
            Err(err) => {
                let _ = repo.store().delete(&path).await;
                return Err(err);
            }
        };
        if let Some(writer) = writer {
            if writer.kind == LockKind::Exclusive && writer.stale_reason().is_none() {
                let _ = repo.store().delete(&path).await;
                return Err(RepoError::Invalid(format!(
                    "{} is locked by {}, which deletes packs; rerun when it has finished",
                    repo.url(),
                    writer.owner()
                )));
            }
        }
        let refresher = tokio::spawn(refresh(repo.clone(), path.clone(), info));
        Ok(SharedLock {
            repo: repo.clone(),
            path,
            refresher,
        })
    }

    /// Stop refreshing and delete the lock.
    pub async fn release(self) -> Result<()> {
        self.refresher.abort();
        match self.repo.store().delete(&self.path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(RepoError::Store {
                what: format!(
                    "releasing the shared lock {} of {}",
                    self.path,
                    self.repo.url()
                ),
                source,
            }),
        }
    }
}

impl Drop for SharedLock {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

/// Rewrite the shared lock with a fresh lease every quarter lease (the one object the
/// repository overwrites besides `lock`'s re-creation).
async fn refresh(repo: Repository, path: Path, mut info: LockInfo) {
    let period = std::time::Duration::from_secs(SHARED_LEASE_SECS / 4);
    loop {
        tokio::time::sleep(period).await;
        info.expires_unix = now_unix() + SHARED_LEASE_SECS;
        let body = serde_json::to_vec(&info).unwrap_or_default();
        if let Err(err) = repo.store().put(&path, PutPayload::from(body)).await {
            tracing::warn!(
                "refreshing the shared lock {path} of {} failed (a prune may start once it \
                 runs out): {err}",
                repo.url()
            );
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_runtime as runtime;

    fn repo(rt: &tokio::runtime::Runtime, dir: &std::path::Path) -> Repository {
        crate::test_repository(rt, dir, crate::DEFAULT_CHUNK_SIZE)
    }

    fn writer(
        rt: &tokio::runtime::Runtime,
        repo: &Repository,
        kind: LockKind,
        break_lock: bool,
    ) -> Result<RepoLock> {
        let operation = match kind {
            LockKind::Exclusive => "prune",
            _ => "backup",
        };
        rt.block_on(RepoLock::acquire(repo, operation, kind, break_lock))
    }

    fn reader(rt: &tokio::runtime::Runtime, repo: &Repository, point: &str) -> Result<SharedLock> {
        rt.block_on(SharedLock::acquire(
            repo,
            &format!("repo export of {point}"),
        ))
    }

    #[test]
    fn a_shared_lock_refuses_prune_and_gc_but_not_a_backup() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(&rt, dir.path());
        let shared = reader(&rt, &repo, "vm@a").unwrap();
        let err = writer(&rt, &repo, LockKind::Exclusive, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("being read by repo export of vm@a")
                && err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        // The refused prune left no writer lock behind.
        let backup = writer(&rt, &repo, LockKind::Append, false).unwrap();
        rt.block_on(backup.release()).unwrap();
        rt.block_on(shared.release()).unwrap();
        let prune = writer(&rt, &repo, LockKind::Exclusive, false).unwrap();
        rt.block_on(prune.release()).unwrap();
    }

    #[test]
    fn a_running_prune_refuses_a_shared_lock_and_a_backup_does_not() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(&rt, dir.path());
        let prune = writer(&rt, &repo, LockKind::Exclusive, false).unwrap();
        let err = reader(&rt, &repo, "vm@a").unwrap_err();
        assert!(err.to_string().contains("locked by prune"), "{err}");
        rt.block_on(prune.release()).unwrap();
        let listed = rt.block_on(repo.list_objects("locks")).unwrap();
        assert!(listed.is_empty(), "a refused reader left {listed:?}");
        let backup = writer(&rt, &repo, LockKind::Append, false).unwrap();
        let shared = reader(&rt, &repo, "vm@a").unwrap();
        rt.block_on(shared.release()).unwrap();
        rt.block_on(backup.release()).unwrap();
    }

    #[test]
    fn stale_shared_locks_are_broken_and_live_ones_only_with_break_lock() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(&rt, dir.path());
        let mut dead = LockInfo::mine("repo export of vm@a", LockKind::Shared, SHARED_LEASE_SECS);
        dead.pid = u32::MAX;
        let mut expired = LockInfo::mine("repo export of vm@b", LockKind::Shared, 0);
        expired.host = "elsewhere".into();
        expired.expires_unix = 1;
        for (name, info) in [("dead", &dead), ("expired", &expired)] {
            let body = serde_json::to_vec(info).unwrap();
            rt.block_on(repo.put_create(&Path::from(format!("locks/{name}")), body.into()))
                .unwrap();
        }
        let prune = writer(&rt, &repo, LockKind::Exclusive, false).unwrap();
        rt.block_on(prune.release()).unwrap();
        assert!(rt.block_on(repo.list_objects("locks")).unwrap().is_empty());

        let live = reader(&rt, &repo, "vm@c").unwrap();
        let prune = writer(&rt, &repo, LockKind::Exclusive, true).unwrap();
        assert!(rt.block_on(repo.list_objects("locks")).unwrap().is_empty());
        rt.block_on(prune.release()).unwrap();
        rt.block_on(live.release()).unwrap();
    }

    #[test]
    fn a_lock_without_a_kind_is_exclusive() {
        let old = r#"{"host":"h","pid":1,"operation":"prune","created_unix":1,"expires_unix":2}"#;
        let info: LockInfo = serde_json::from_str(old).unwrap();
        assert_eq!(info.kind, LockKind::Exclusive);
    }
}
