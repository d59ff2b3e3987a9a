//! Verify, prune and gc.
//!
//! Crash safety: prune deletes point indexes first, then gc deletes what no remaining point
//! references, each pack's index before the pack itself. A crash at any moment leaves
//! either a pack no index names (gc removes it) or a pack that still has its index; a kept
//! point never loses a chunk, because only packs none of whose chunks any point references
//! are deleted (packs with some live chunks are kept whole: no repacking yet).

use std::collections::{HashMap, HashSet};

use futures::StreamExt;
use serde::Serialize;

use crate::format::{self, ChunkRef, PackIndex};
use crate::lock::RepoLock;
use crate::{
    check_blob, pack_index_path, pack_path, point_path, select_kept, Keep, RepoError, Repository,
    Result, PACK_MAGIC_LEN,
};

/// One broken object and why.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Problem {
    pub object: String,
    pub problem: String,
}

/// What `verify` found.
#[derive(Debug, Clone, Serialize, Default)]
pub struct VerifyReport {
    pub points: usize,
    pub packs: usize,
    pub chunks_checked: u64,
    pub problems: Vec<Problem>,
}

/// Check every point index and pack index, that every chunk a point names is in a pack
/// index whose pack exists with the right length, and with `read_data` every pack's bytes
/// (its SHA-256 name, every blob's CRC, inflated length and SHA-256).
pub async fn verify(repo: &Repository, read_data: bool) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let (points, broken_points) = repo.points().await?;
    let (map, indexes, broken_indexes) = repo.chunk_map().await?;
    for (object, problem) in broken_points.into_iter().chain(broken_indexes) {
        report.problems.push(Problem { object, problem });
    }
    let packs: HashMap<String, u64> = repo
        .list_objects("data")
        .await?
        .into_iter()
        .map(|(path, size)| (path.to_string(), size))
        .collect();
    report.points = points.len();
    report.packs = packs.len();
    for index in &indexes {
        let path = pack_path(&index.pack_id).to_string();
        match packs.get(&path) {
            None => report.problems.push(Problem {
                object: path,
                problem: "missing (its index names it)".into(),
            }),
            Some(&size) if size != index.pack_len => report.problems.push(Problem {
                object: path,
                problem: format!("{size} bytes, its index says {}", index.pack_len),
            }),
            Some(_) => {}
        }
    }
    for point in &points {
        let missing = point
            .chunks
            .iter()
            .filter(|c| matches!(c, ChunkRef::Data(id) if !map.contains_key(id)))
            .count();
        if missing > 0 {
            report.problems.push(Problem {
                object: point_path(&point.volume, &point.checkpoint).to_string(),
                problem: format!("{missing} of its chunks are in no pack index"),
            });
        }
    }
    if read_data {
        let results: Vec<(u64, Vec<Problem>)> = futures::stream::iter(indexes.iter())
            .map(|index| check_pack(repo, index))
            .buffer_unordered(4)
            .collect()
            .await;
        for (checked, problems) in results {
            report.chunks_checked += checked;
            report.problems.extend(problems);
        }
    }
    report.problems.sort_by(|a, b| a.object.cmp(&b.object));
    Ok(report)
}

async fn check_pack(repo: &Repository, index: &PackIndex) -> (u64, Vec<Problem>) {
    let path = pack_path(&index.pack_id);
    let object = path.to_string();
    let bytes = match repo.store().get(&path).await {
        Ok(got) => match got.bytes().await {
            Ok(bytes) => bytes,
            Err(e) => {
                return (
                    0,
                    vec![Problem {
                        object,
                        problem: format!("unreadable: {e}"),
                    }],
                )
            }
        },
        Err(e) => {
            return (
                0,
                vec![Problem {
                    object,
                    problem: format!("unreadable: {e}"),
                }],
            )
        }
    };
    let mut problems = Vec::new();
    if crate::sha256(&bytes) != index.pack_id {
        problems.push(Problem {
            object: object.clone(),
            problem: "its SHA-256 does not match its name (the pack is corrupt)".into(),
        });
    }
    let mut checked = 0;
    for entry in &index.entries {
        let start = entry.offset as usize;
        let end = start + entry.stored_len as usize;
        let Some(blob) = bytes.get(start..end) else {
            problems.push(Problem {
                object: object.clone(),
                problem: format!("chunk {} lies past the end of the pack", entry.id.hex()),
            });
            continue;
        };
        checked += 1;
        if let Err(why) = check_blob(blob, &entry.id, entry) {
            problems.push(Problem {
                object: object.clone(),
                problem: format!("chunk {} at offset {start}: {why}", entry.id.hex()),
            });
        }
    }
    if bytes.len() < PACK_MAGIC_LEN || &bytes[..PACK_MAGIC_LEN] != format::PACK_MAGIC {
        problems.push(Problem {
            object,
            problem: "does not start with the pack magic".into(),
        });
    }
    (checked, problems)
}

/// What `prune` and `gc` did.
#[derive(Debug, Clone, Serialize, Default)]
pub struct PruneReport {
    pub kept: Vec<String>,
    pub removed_points: Vec<String>,
    pub removed_packs: usize,
    pub removed_bytes: u64,
}

/// Drop the points `keep` does not keep, then gc.
pub async fn prune(repo: &Repository, keep: Keep, break_lock: bool) -> Result<PruneReport> {
    let lock = RepoLock::acquire(repo, "prune", break_lock).await?;
    let result = prune_locked(repo, keep).await;
    lock.release().await?;
    result
}

async fn prune_locked(repo: &Repository, keep: Keep) -> Result<PruneReport> {
    let (points, broken) = repo.points().await?;
    if !broken.is_empty() {
        return Err(RepoError::Invalid(format!(
            "not pruning: {} point indexes are unreadable ({}); run `tidemark repo verify`",
            broken.len(),
            broken[0].0
        )));
    }
    let kept = select_kept(&points, keep);
    let mut report = PruneReport::default();
    for point in &points {
        let name = point.name();
        if kept.contains(&name) {
            report.kept.push(name);
            continue;
        }
        let path = point_path(&point.volume, &point.checkpoint);
        repo.store()
            .delete(&path)
            .await
            .map_err(|source| RepoError::Store {
                what: format!("deleting the point {name}"),
                source,
            })?;
        report.removed_points.push(name);
    }
    let swept = gc_locked(repo).await?;
    report.removed_packs = swept.removed_packs;
    report.removed_bytes = swept.removed_bytes;
    Ok(report)
}

/// Delete every pack no point references (its index first) and packs without an index.
pub async fn gc(repo: &Repository, break_lock: bool) -> Result<PruneReport> {
    let lock = RepoLock::acquire(repo, "gc", break_lock).await?;
    let result = gc_locked(repo).await;
    lock.release().await?;
    result
}

async fn gc_locked(repo: &Repository) -> Result<PruneReport> {
    let (points, broken) = repo.points().await?;
    let (_, indexes, broken_indexes) = repo.chunk_map().await?;
    if !broken.is_empty() || !broken_indexes.is_empty() {
        return Err(RepoError::Invalid(format!(
            "not collecting garbage: some indexes are unreadable ({}); run `tidemark repo verify`",
            broken
                .iter()
                .chain(&broken_indexes)
                .map(|b| b.0.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let live: HashSet<_> = points
        .iter()
        .flat_map(|p| p.chunks.iter())
        .filter_map(|c| match c {
            ChunkRef::Data(id) => Some(*id),
            ChunkRef::Zero => None,
        })
        .collect();
    let mut report = PruneReport::default();
    let mut indexed = HashSet::new();
    for index in &indexes {
        indexed.insert(pack_path(&index.pack_id).to_string());
        if index.entries.iter().any(|e| live.contains(&e.id)) {
            continue;
        }
        for path in [pack_index_path(&index.pack_id), pack_path(&index.pack_id)] {
            match repo.store().delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(source) => {
                    return Err(RepoError::Store {
                        what: format!("deleting {path}"),
                        source,
                    })
                }
            }
        }
        report.removed_packs += 1;
        report.removed_bytes += index.pack_len;
    }
    for (path, size) in repo.list_objects("data").await? {
        if indexed.contains(&path.to_string()) {
            continue;
        }
        match repo.store().delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(source) => {
                return Err(RepoError::Store {
                    what: format!("deleting {path}"),
                    source,
                })
            }
        }
        report.removed_packs += 1;
        report.removed_bytes += size;
    }
    Ok(report)
}
