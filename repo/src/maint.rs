//! Verify, prune (with repacking) and gc.
//!
//! Crash safety: prune deletes point indexes first, then repacks, then gc deletes what no
//! remaining point references, each pack's index before the pack itself. Repacking copies
//! the live chunks of packs whose live fraction is below the threshold into new packs (each
//! pack, then its index, create-only) and only after every new index is written deletes the
//! old packs (index first). Readers find chunks through pack indexes, so a chunk present in
//! an old and a new pack during that window is harmless. A crash at any moment leaves:
//! a new pack without an index (gc removes it), a chunk in two indexed packs (the rerun
//! deletes the old one), or an old pack whose index is gone (gc removes it); a kept point
//! never loses a chunk, because a pack is deleted only when each of its live chunks is in
//! another indexed pack or none of its chunks is live.

use std::collections::{HashMap, HashSet};

use futures::StreamExt;
use serde::Serialize;

use crate::format::{self, ChunkId, ChunkRef, PackEntry, PackIndex};
use crate::lock::{LockKind, RepoLock, LEASE_SECS};
use crate::{
    check_blob, pack_index_path, pack_path, point_path, select_kept, Keep, Location, RepoError,
    Repository, Result, PACK_MAGIC_LEN, PACK_TARGET,
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
/// (its hash against its name, every blob's CRC, inflated length and id hash, and that the zero
/// runs points record for a chunk are zero in it).
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
        let object = point_path(&point.volume, &point.checkpoint).to_string();
        let missing = point
            .data_chunks()
            .filter(|id| !map.contains_key(id))
            .count();
        if missing > 0 {
            report.problems.push(Problem {
                object: object.clone(),
                problem: format!("{missing} of its chunks are in no pack index"),
            });
        }
        for piece in &point.pieces {
            let ChunkRef::Data(id) = piece.chunk else {
                continue;
            };
            let held = map.get(&id).map_or(u32::MAX, |at| at.entry.raw_len);
            if u64::from(piece.within) + u64::from(piece.len) > u64::from(held) {
                report.problems.push(Problem {
                    object: object.clone(),
                    problem: format!(
                        "its piece at byte {} wants bytes past the end of chunk {} ({held} bytes)",
                        piece.offset,
                        id.hex()
                    ),
                });
            }
        }
    }
    if read_data {
        let users = chunk_users(&points);
        let users = &users;
        let zero_claims = zero_claims(&points);
        let zero_claims = &zero_claims;
        let results: Vec<(u64, Vec<Problem>)> = futures::stream::iter(indexes.iter())
            .map(|index| check_pack(repo, index, users, zero_claims))
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

/// For each chunk some point reads, one user in words ("vm1@c3's piece at byte 65536"), so a
/// corrupt chunk is named with what it breaks.
fn chunk_users(points: &[format::PointIndex]) -> HashMap<ChunkId, String> {
    let mut users = HashMap::new();
    for point in points {
        for (i, chunk) in point.chunks.iter().enumerate() {
            if let ChunkRef::Data(id) = chunk {
                users
                    .entry(*id)
                    .or_insert_with(|| format!("{}'s chunk {i}", point.name()));
            }
        }
        for piece in &point.pieces {
            if let ChunkRef::Data(id) = piece.chunk {
                users.entry(id).or_insert_with(|| {
                    format!("{}'s piece at byte {}", point.name(), piece.offset)
                });
            }
        }
    }
    users
}

/// A point's claim that bytes of a chunk are zero: the point index object, the slot, and
/// the zero runs it records for the chunk there.
struct ZeroClaim {
    object: String,
    slot: u64,
    runs: Vec<format::ZeroRun>,
}

/// For each chunk some slot records zero runs of, each distinct set of runs once (with the
/// first point that records it), so `verify --read-data` checks them against the chunk.
fn zero_claims(points: &[format::PointIndex]) -> HashMap<ChunkId, Vec<ZeroClaim>> {
    let mut claims: HashMap<ChunkId, Vec<ZeroClaim>> = HashMap::new();
    let same = |a: &[format::ZeroRun], b: &[format::ZeroRun]| {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| (x.offset, x.len) == (y.offset, y.len))
    };
    for point in points {
        for (slot, chunk) in point.chunks.iter().enumerate() {
            let runs = point.slot_zero_runs(slot as u64);
            let ChunkRef::Data(id) = chunk else { continue };
            if runs.is_empty() {
                continue;
            }
            let known = claims.entry(*id).or_default();
            if !known.iter().any(|claim| same(&claim.runs, runs)) {
                known.push(ZeroClaim {
                    object: point_path(&point.volume, &point.checkpoint).to_string(),
                    slot: slot as u64,
                    runs: runs.to_vec(),
                });
            }
        }
    }
    claims
}

async fn check_pack(
    repo: &Repository,
    index: &PackIndex,
    users: &HashMap<ChunkId, String>,
    zero_claims: &HashMap<ChunkId, Vec<ZeroClaim>>,
) -> (u64, Vec<Problem>) {
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
    if repo.pack_id(&bytes) != index.pack_id {
        problems.push(Problem {
            object: object.clone(),
            problem: format!(
                "its {} does not match its name (the pack is corrupt)",
                repo.hash()
            ),
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
        match check_blob(blob, &entry.id, entry, repo.chunk_keys()) {
            Ok(data) => {
                for claim in zero_claims.get(&entry.id).into_iter().flatten() {
                    if let Some(run) = format::wrong_zero_run(&claim.runs, &data) {
                        problems.push(Problem {
                            object: claim.object.clone(),
                            problem: format!(
                                "it records bytes {}..{} of its chunk {} ({}) as zero, but \
                                 the chunk has data there: its holes are wrong",
                                run.offset,
                                run.end(),
                                claim.slot,
                                entry.id.hex()
                            ),
                        });
                    }
                }
            }
            Err(why) => {
                let user = users
                    .get(&entry.id)
                    .map_or_else(|| " (no point reads it)".to_string(), |u| format!(" ({u})"));
                problems.push(Problem {
                    object: object.clone(),
                    problem: format!("chunk {} at offset {start}{user}: {why}", entry.id.hex()),
                });
            }
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
    /// Packs deleted: unreferenced ones and repacked ones.
    pub removed_packs: usize,
    pub removed_bytes: u64,
    /// Partly live packs whose live chunks were copied into new packs (then deleted).
    pub repacked_packs: usize,
    pub repacked_chunks: u64,
    /// New packs written by repacking, and their bytes.
    pub written_packs: usize,
    pub written_bytes: u64,
    /// Packs left whole because a live chunk failed its checks (run `repo verify`).
    pub repack_skipped: Vec<Problem>,
    /// Staging files (`NAME#N`, left by a writer killed inside a put on a directory
    /// repository) older than the lock lease that gc deleted, and their bytes.
    pub removed_staging_files: usize,
    pub removed_staging_bytes: u64,
    /// Staging files younger than the lease, left alone: a live writer may still own them.
    pub young_staging_files: usize,
}

/// Default of `--repack-below`: packs less than half live are repacked.
pub const DEFAULT_REPACK_BELOW: u32 = 50;

/// Tests only: pause this many milliseconds after each object prune's repacking writes or
/// deletes, so that a test can kill the process in each intermediate state.
const DELAY_ENV: &str = "TIDEMARK_TEST_REPACK_DELAY_MS";

async fn test_pause() {
    let delay = std::env::var(DELAY_ENV)
        .ok()
        .and_then(|ms| ms.parse::<u64>().ok());
    if let Some(ms) = delay {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}

/// Drop the points `keep` does not keep, repack the packs less than `repack_below` percent
/// live (0: never), then gc.
pub async fn prune(
    repo: &Repository,
    keep: Keep,
    repack_below: u32,
    break_lock: bool,
) -> Result<PruneReport> {
    if repack_below > 100 {
        return Err(RepoError::Invalid(format!(
            "--repack-below {repack_below}: a percentage is 0..=100"
        )));
    }
    let lock = RepoLock::acquire(repo, "prune", LockKind::Exclusive, break_lock).await?;
    let result = prune_locked(repo, keep, repack_below).await;
    lock.release().await?;
    result
}

async fn prune_locked(repo: &Repository, keep: Keep, repack_below: u32) -> Result<PruneReport> {
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
    if repack_below > 0 {
        repack_locked(repo, repack_below, &mut report).await?;
    }
    let swept = gc_locked(repo).await?;
    report.removed_packs += swept.removed_packs;
    report.removed_bytes += swept.removed_bytes;
    report.removed_staging_files = swept.removed_staging_files;
    report.removed_staging_bytes = swept.removed_staging_bytes;
    report.young_staging_files = swept.young_staging_files;
    Ok(report)
}

/// Delete every pack no point references (its index first) and packs without an index.
pub async fn gc(repo: &Repository, break_lock: bool) -> Result<PruneReport> {
    let lock = RepoLock::acquire(repo, "gc", LockKind::Exclusive, break_lock).await?;
    let result = gc_locked(repo).await;
    lock.release().await?;
    result
}

/// Every chunk a point references, and every pack index; refuses when an index is unreadable
/// (deleting on a partial view could delete a live chunk).
async fn live_view(repo: &Repository, what: &str) -> Result<(HashSet<ChunkId>, Vec<PackIndex>)> {
    let (points, broken) = repo.points().await?;
    let (_, indexes, broken_indexes) = repo.chunk_map().await?;
    if !broken.is_empty() || !broken_indexes.is_empty() {
        return Err(RepoError::Invalid(format!(
            "not {what}: some indexes are unreadable ({}); run `tidemark repo verify`",
            broken
                .iter()
                .chain(&broken_indexes)
                .map(|b| b.0.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let live = points.iter().flat_map(|p| p.data_chunks()).collect();
    Ok((live, indexes))
}

/// Delete `path` (already gone is fine).
async fn delete(repo: &Repository, path: &object_store::path::Path) -> Result<()> {
    match repo.store().delete(path).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(source) => Err(RepoError::Store {
            what: format!("deleting {path}"),
            source,
        }),
    }
}

/// Bytes of `index`'s pack that hold live chunks.
fn live_bytes(index: &PackIndex, live: &HashSet<ChunkId>) -> u64 {
    index
        .entries
        .iter()
        .filter(|e| live.contains(&e.id))
        .map(|e| u64::from(e.stored_len))
        .sum()
}

/// Whether a pack with some live chunks is below the repack threshold (`below` percent).
fn wants_repack(index: &PackIndex, live: &HashSet<ChunkId>, below: u32) -> bool {
    let live = live_bytes(index, live);
    live > 0 && u128::from(live) * 100 < u128::from(index.pack_len) * u128::from(below)
}

/// A pack being filled by repacking: stored blobs copied as they are (their CRC and
/// lengths do not change, only their offsets).
#[derive(Default)]
struct NewPack {
    bytes: Vec<u8>,
    entries: Vec<PackEntry>,
}

impl NewPack {
    fn add(&mut self, entry: &PackEntry, blob: &[u8]) {
        if self.bytes.is_empty() {
            self.bytes.extend_from_slice(format::PACK_MAGIC);
        }
        self.entries.push(PackEntry {
            offset: self.bytes.len() as u64,
            ..*entry
        });
        self.bytes.extend_from_slice(blob);
    }

    /// Write the pack, then its index (both create-only: a rerun that builds the same pack
    /// finds it there).
    async fn flush(&mut self, repo: &Repository, report: &mut PruneReport) -> Result<()> {
        if self.entries.is_empty() {
            return Ok(());
        }
        let pack = std::mem::take(self);
        let index = PackIndex {
            pack_id: repo.pack_id(&pack.bytes),
            pack_len: pack.bytes.len() as u64,
            entries: pack.entries,
        };
        repo.put_create(&pack_path(&index.pack_id), pack.bytes.into())
            .await?;
        test_pause().await;
        repo.put_pack_index(&index).await?;
        test_pause().await;
        report.written_packs += 1;
        report.written_bytes += index.pack_len;
        Ok(())
    }
}

/// Copy the live chunks of every pack less than `below` percent live into new packs, then
/// delete those packs. Every live chunk is read and checked (CRC, inflated length, id hash)
/// before it is copied; a pack with a chunk that fails is left whole and reported.
async fn repack_locked(repo: &Repository, below: u32, report: &mut PruneReport) -> Result<()> {
    let (live, indexes) = live_view(repo, "repacking").await?;
    let (mut candidates, staying): (Vec<&PackIndex>, Vec<&PackIndex>) = indexes
        .iter()
        .partition(|index| wants_repack(index, &live, below));
    if candidates.is_empty() {
        return Ok(());
    }
    // Same order on a rerun, so that it rebuilds the same packs.
    candidates.sort_by_key(|index| index.pack_id);
    // Chunks that stay where they are, or are already copied: not copied (again).
    let mut placed: HashSet<ChunkId> = staying
        .iter()
        .flat_map(|index| index.entries.iter().map(|e| e.id))
        .collect();
    let mut out = NewPack::default();
    let mut emptied = Vec::new();
    for index in candidates {
        let mut blobs = Vec::new();
        let mut failed = None;
        for entry in &index.entries {
            if !live.contains(&entry.id) || placed.contains(&entry.id) {
                continue;
            }
            let at = Location {
                pack: index.pack_id,
                entry: *entry,
            };
            let checked = match repo.read_blob(&entry.id, &at).await {
                Ok(blob) => check_blob(&blob, &entry.id, entry, repo.chunk_keys()).map(|_| blob),
                Err(err) => Err(err.to_string()),
            };
            match checked {
                Ok(blob) => blobs.push((entry, blob)),
                Err(why) => {
                    failed = Some(format!(
                        "not repacked: live chunk {} at offset {}: {why}",
                        entry.id.hex(),
                        entry.offset
                    ));
                    break;
                }
            }
        }
        if let Some(problem) = failed {
            tracing::warn!("{}: {problem}", pack_path(&index.pack_id));
            report.repack_skipped.push(Problem {
                object: pack_path(&index.pack_id).to_string(),
                problem,
            });
            continue;
        }
        for (entry, blob) in blobs {
            placed.insert(entry.id);
            out.add(entry, &blob);
            report.repacked_chunks += 1;
            if out.bytes.len() >= PACK_TARGET {
                out.flush(repo, report).await?;
            }
        }
        emptied.push(index);
    }
    out.flush(repo, report).await?;
    // Every live chunk of `emptied` is now in an indexed pack that stays.
    for index in emptied {
        delete(repo, &pack_index_path(&index.pack_id)).await?;
        test_pause().await;
        delete(repo, &pack_path(&index.pack_id)).await?;
        test_pause().await;
        report.repacked_packs += 1;
        report.removed_packs += 1;
        report.removed_bytes += index.pack_len;
    }
    Ok(())
}

async fn gc_locked(repo: &Repository) -> Result<PruneReport> {
    let (live, indexes) = live_view(repo, "collecting garbage").await?;
    let mut report = PruneReport::default();
    let mut indexed = HashSet::new();
    for index in &indexes {
        indexed.insert(pack_path(&index.pack_id).to_string());
        if index.entries.iter().any(|e| live.contains(&e.id)) {
            continue;
        }
        delete(repo, &pack_index_path(&index.pack_id)).await?;
        delete(repo, &pack_path(&index.pack_id)).await?;
        report.removed_packs += 1;
        report.removed_bytes += index.pack_len;
    }
    for (path, size) in repo.list_objects("data").await? {
        if indexed.contains(&path.to_string()) {
            continue;
        }
        delete(repo, &path).await?;
        report.removed_packs += 1;
        report.removed_bytes += size;
    }
    if let Some(dir) = repo.local_dir() {
        let older_than = std::time::Duration::from_secs(LEASE_SECS);
        let swept = tokio::task::spawn_blocking(move || sweep_staging(&dir, older_than))
            .await
            .map_err(|e| RepoError::Invalid(format!("the staging file sweep failed: {e}")))??;
        report.removed_staging_files = swept.removed;
        report.removed_staging_bytes = swept.bytes;
        report.young_staging_files = swept.young;
    }
    Ok(report)
}

/// What [`sweep_staging`] found.
#[derive(Debug, Default, PartialEq, Eq)]
struct Swept {
    removed: usize,
    bytes: u64,
    young: usize,
}

/// Whether `name` is one of object_store's LocalFileSystem staging files: it writes an
/// object `NAME` as `NAME#N` (N a decimal number) and then links or renames it to `NAME`,
/// and its listing hides such names, so a writer killed in between leaves a file that no
/// listing, and so no other gc pass, ever sees.
fn is_staging_name(name: &str) -> bool {
    matches!(name.rsplit_once('#'), Some((base, n))
        if !base.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Delete the staging files under the repository directory `root` last modified more than
/// `older_than` ago. A younger one may belong to a writer that is still uploading (one that
/// broke a lock, or a put still in flight), so it is only counted. Symbolic links are never
/// followed.
fn sweep_staging(root: &std::path::Path, older_than: std::time::Duration) -> Result<Swept> {
    let io_err = |what: String| move |e: std::io::Error| RepoError::Invalid(format!("{what}: {e}"));
    let mut swept = Swept::default();
    let mut dirs = vec![root.to_path_buf()];
    let now = std::time::SystemTime::now();
    while let Some(dir) = dirs.pop() {
        let entries = std::fs::read_dir(&dir).map_err(io_err(format!(
            "listing {} for staging files",
            dir.display()
        )))?;
        for entry in entries {
            let entry = entry.map_err(io_err(format!(
                "listing {} for staging files",
                dir.display()
            )))?;
            let path = entry.path();
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(meta) => meta,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
            };
            if meta.is_dir() {
                dirs.push(path);
                continue;
            }
            if !meta.is_file() || !is_staging_name(&entry.file_name().to_string_lossy()) {
                continue;
            }
            let age = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or_default();
            if age <= older_than {
                swept.young += 1;
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(
                        "removed the staging file {} left by a killed writer",
                        path.display()
                    );
                    swept.removed += 1;
                    swept.bytes += meta.len();
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(format!("deleting {}", path.display()))(e)),
            }
        }
    }
    Ok(swept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{chunk_count, PointIndex};
    use crate::writer::PointWriter;
    use crate::{test_runtime as runtime, StoreOptions};

    const CHUNK: u32 = 64 << 10;

    /// Chunk `i` of generation `g`: incompressible enough that packs are of similar sizes.
    fn chunk(g: u8, i: usize) -> Vec<u8> {
        let mut state = (u64::from(g) << 32 | i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..CHUNK as usize)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    /// Store `chunks` as the point `vm@NAME` created at `time` (one worker: one pack).
    fn store(
        rt: &tokio::runtime::Runtime,
        repo: &Repository,
        name: &str,
        time: u64,
        chunks: &[Vec<u8>],
    ) {
        let (map, _, _) = rt.block_on(repo.chunk_map()).unwrap();
        let size = chunks.len() as u64 * u64::from(CHUNK);
        let count = chunk_count(size, CHUNK);
        let writer = PointWriter::start(
            repo,
            rt.handle().clone(),
            map.into_keys().collect(),
            count,
            1,
        );
        for (i, data) in chunks.iter().enumerate() {
            writer.put(i as u64, data.clone()).unwrap();
        }
        let written = writer.finish().unwrap();
        let point = PointIndex {
            volume: "vm".into(),
            volume_uuid: [7; 16],
            checkpoint: name.into(),
            parent: String::new(),
            created_unix: time,
            size,
            chunk_size: CHUNK,
            granularity: 65536,
            new_bytes: written.new_bytes,
            chunks: written.chunks,
            pieces: Vec::new(),
            zero_runs: written.zero_runs,
        };
        rt.block_on(repo.put_point(&point)).unwrap();
    }

    /// A repository with `vm@a` (20 chunks) and `vm@b` (4 of a's chunks and 16 new ones):
    /// once `a` is dropped, a's pack is 20% live.
    fn two_points(
        rt: &tokio::runtime::Runtime,
        dir: &std::path::Path,
    ) -> (Repository, Vec<Vec<u8>>) {
        let repo = crate::test_repository(rt, dir, CHUNK);
        let b = store_two_points(rt, &repo);
        (repo, b)
    }

    /// Store `vm@a` (20 chunks) and `vm@b` (4 of a's chunks and 16 new ones) in `repo`;
    /// b's chunks.
    fn store_two_points(rt: &tokio::runtime::Runtime, repo: &Repository) -> Vec<Vec<u8>> {
        let a: Vec<_> = (0..20).map(|i| chunk(1, i)).collect();
        store(rt, repo, "a", 1, &a);
        let b: Vec<_> = (0..20)
            .map(|i| {
                if i % 5 == 0 {
                    a[i].clone()
                } else {
                    chunk(2, i)
                }
            })
            .collect();
        store(rt, repo, "b", 2, &b);
        b
    }

    /// `prune --keep-last 1 --repack-below BELOW`.
    fn prune_to_one(
        rt: &tokio::runtime::Runtime,
        repo: &Repository,
        below: u32,
    ) -> Result<PruneReport> {
        let keep = Keep {
            last: 1,
            ..Keep::default()
        };
        rt.block_on(prune(repo, keep, below, false))
    }

    fn restores(rt: &tokio::runtime::Runtime, repo: &Repository, expected: &[Vec<u8>]) {
        let point = rt.block_on(repo.point("vm@b")).unwrap();
        let (map, _, _) = rt.block_on(repo.chunk_map()).unwrap();
        for (i, c) in point.chunks.iter().enumerate() {
            let ChunkRef::Data(id) = c else {
                panic!("chunk {i} is data")
            };
            assert_eq!(
                rt.block_on(repo.read_chunk(id, &map[id])).unwrap(),
                expected[i]
            );
        }
    }

    fn data_bytes(rt: &tokio::runtime::Runtime, repo: &Repository) -> (usize, u64) {
        let packs = rt.block_on(repo.list_objects("data")).unwrap();
        (packs.len(), packs.iter().map(|p| p.1).sum())
    }

    #[test]
    fn prune_repacks_a_partly_live_pack_and_the_repository_shrinks() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let (repo, b) = two_points(&rt, dir.path());
        let (packs_before, bytes_before) = data_bytes(&rt, &repo);
        assert_eq!(packs_before, 2);
        let report = prune_to_one(&rt, &repo, DEFAULT_REPACK_BELOW).unwrap();
        assert_eq!(report.removed_points, ["vm@a"]);
        assert_eq!((report.repacked_packs, report.repacked_chunks), (1, 4));
        assert_eq!(report.written_packs, 1);
        let (packs_after, bytes_after) = data_bytes(&rt, &repo);
        assert_eq!(packs_after, 2);
        // a's 16 dead chunks are gone: about 16 of the 40 chunks' bytes.
        assert!(
            bytes_after * 10 < bytes_before * 7,
            "{bytes_before} -> {bytes_after}"
        );
        restores(&rt, &repo, &b);
        let verified = rt.block_on(verify(&repo, true)).unwrap();
        assert!(verified.problems.is_empty(), "{:?}", verified.problems);
        // A rerun has nothing left to repack.
        let again = prune_to_one(&rt, &repo, DEFAULT_REPACK_BELOW).unwrap();
        assert_eq!((again.repacked_packs, again.removed_packs), (0, 0));
    }

    #[test]
    fn packs_at_or_above_the_threshold_are_kept_whole() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let (repo, b) = two_points(&rt, dir.path());
        let (_, bytes_before) = data_bytes(&rt, &repo);
        let report = prune_to_one(&rt, &repo, 15).unwrap();
        assert_eq!((report.repacked_packs, report.removed_packs), (0, 0));
        assert_eq!(data_bytes(&rt, &repo), (2, bytes_before));
        let report = prune_to_one(&rt, &repo, 0).unwrap();
        assert_eq!(report.repacked_packs, 0);
        restores(&rt, &repo, &b);
        assert!(prune_to_one(&rt, &repo, 101).is_err());
    }

    #[test]
    fn a_pack_with_a_corrupt_live_chunk_is_left_whole_and_reported() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let (repo, _) = two_points(&rt, dir.path());
        let (map, _, _) = rt.block_on(repo.chunk_map()).unwrap();
        let live = repo.chunk_id(&chunk(1, 5));
        let at = map[&live];
        let pack = dir
            .path()
            .join("repo")
            .join(pack_path(&at.pack).to_string());
        let mut bytes = std::fs::read(&pack).unwrap();
        bytes[at.entry.offset as usize + 100] ^= 0x10;
        std::fs::write(&pack, bytes).unwrap();
        let report = prune_to_one(&rt, &repo, DEFAULT_REPACK_BELOW).unwrap();
        assert_eq!(report.repacked_packs, 0);
        assert_eq!(report.repack_skipped.len(), 1, "{report:?}");
        assert!(report.repack_skipped[0].problem.contains(&live.hex()));
        assert!(
            pack.exists(),
            "the pack holding a corrupt live chunk was deleted"
        );
    }

    #[test]
    fn staging_names_are_object_store_temp_files_only() {
        for name in ["abc#1", "0a1b#42", "config#7"] {
            assert!(is_staging_name(name), "{name}");
        }
        for name in ["abc", "#1", "abc#", "abc#1x", "a#b", "lock"] {
            assert!(!is_staging_name(name), "{name}");
        }
    }

    #[test]
    fn gc_deletes_staging_files_older_than_the_lease_and_leaves_young_ones() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let (repo, b) = two_points(&rt, dir.path());
        let root = dir.path().join("repo");
        let (map, _, _) = rt.block_on(repo.chunk_map()).unwrap();
        let pack = root.join(pack_path(&map.values().next().unwrap().pack).to_string());
        let old = std::path::PathBuf::from(format!("{}#1", pack.display()));
        let young = root.join("index").join(format!("{}#2", "ab".repeat(32)));
        std::fs::write(&old, vec![1u8; 1000]).unwrap();
        std::fs::write(&young, b"x").unwrap();
        let seven_hours_ago =
            std::time::SystemTime::now() - std::time::Duration::from_secs(LEASE_SECS + 3600);
        std::fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(seven_hours_ago)
            .unwrap();
        let report = rt.block_on(gc(&repo, false)).unwrap();
        assert_eq!(
            (
                report.removed_staging_files,
                report.removed_staging_bytes,
                report.young_staging_files
            ),
            (1, 1000, 1)
        );
        assert!(!old.exists() && young.exists() && pack.exists());
        assert_eq!(report.removed_packs, 0, "{report:?}");
        restores(&rt, &repo, &b);
    }

    #[test]
    fn the_live_fraction_counts_stored_bytes() {
        let entry = |n: u8, len: u32| PackEntry {
            id: ChunkId([n; 32]),
            offset: 8,
            stored_len: len,
            raw_len: len,
            crc: 0,
        };
        let index = PackIndex {
            pack_id: [0; 32],
            pack_len: 1008,
            entries: vec![entry(1, 300), entry(2, 700)],
        };
        let live = |ids: &[u8]| {
            ids.iter()
                .map(|&n| ChunkId([n; 32]))
                .collect::<HashSet<_>>()
        };
        assert!(wants_repack(&index, &live(&[1]), 50));
        assert!(!wants_repack(&index, &live(&[2]), 50));
        assert!(!wants_repack(&index, &live(&[]), 50), "dead packs are gc's");
        assert!(!wants_repack(&index, &live(&[1]), 0));
    }

    /// How a test repository is made: its hash, encrypted or not, and whether its config is
    /// written by hand as a tidemark before BLAKE3 wrote it.
    #[derive(Debug, Clone, Copy)]
    struct Made {
        hash: crate::ChunkHash,
        encrypted: bool,
        old_config: bool,
    }

    /// A repository at `dir/repo` made as `made` says (its key file `dir/key`), opened again
    /// as a later command would.
    fn make(rt: &tokio::runtime::Runtime, dir: &std::path::Path, made: Made) -> Repository {
        let url = dir.join("repo");
        let key = dir.join("key");
        let options = StoreOptions {
            key: made.encrypted.then(|| key.clone()),
            ..StoreOptions::default()
        };
        if made.encrypted {
            crate::crypto::generate_key_file(&key).unwrap();
        }
        if made.old_config {
            assert_eq!(
                made.hash,
                crate::ChunkHash::Sha256,
                "old configs are SHA-256"
            );
            // What `serde_json::to_vec_pretty` of the config wrote before BLAKE3 (the
            // unencrypted one is tests/fixtures/repo-v1/config with another id).
            let id = "75d178c3-12c2-4a72-a0cd-83079ed98700";
            let text = if made.encrypted {
                let master = crate::crypto::load_key_file(&key).unwrap();
                let c = crate::crypto::RepoCrypto::new(&master, crate::ChunkHash::Sha256);
                format!(
                    "{{\n  \"kind\": \"tidemark-repo\",\n  \"version\": 2,\n  \"chunk_size\": \
                     {CHUNK},\n  \"id\": \"{id}\",\n  \"encryption\": {{\n    \"cipher\": \
                     \"aes-256-gcm\",\n    \"chunk_id\": \"hmac-sha256\",\n    \"key_id\": \
                     \"{}\",\n    \"key_check\": \"{}\"\n  }}\n}}",
                    c.key_id(),
                    c.key_check(id)
                )
            } else {
                format!(
                    "{{\n  \"kind\": \"tidemark-repo\",\n  \"version\": 1,\n  \"chunk_size\": \
                     {CHUNK},\n  \"id\": \"{id}\"\n}}"
                )
            };
            std::fs::create_dir_all(&url).unwrap();
            std::fs::write(url.join("config"), text).unwrap();
        } else {
            let key = made.encrypted.then_some(key.as_path());
            rt.block_on(Repository::init_with_key(
                url.to_str().unwrap(),
                &options,
                CHUNK,
                key,
                made.hash,
            ))
            .unwrap();
        }
        rt.block_on(Repository::open(url.to_str().unwrap(), &options))
            .unwrap()
    }

    /// A full backup and an incremental one sharing a fifth of its chunks, in a repository
    /// made as `made` says: ids and pack names are its hash, the second backup deduplicates
    /// against the first, both verify and restore, and a corrupt chunk is refused.
    fn backs_up_restores_verifies_and_refuses_a_corrupt_chunk(made: Made) {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let repo = make(&rt, dir.path(), made);
        assert_eq!(repo.hash(), made.hash, "{made:?}");
        assert_eq!(
            repo.config().version,
            made.hash.config_version(made.encrypted)
        );
        let b = store_two_points(&rt, &repo);
        let point = rt.block_on(repo.point("vm@b")).unwrap();
        let (map, indexes, broken) = rt.block_on(repo.chunk_map()).unwrap();
        assert!(broken.is_empty(), "{broken:?}");
        assert_eq!(
            map.len(),
            36,
            "{made:?}: the second backup stored a's chunks again"
        );
        for (i, c) in point.chunks.iter().enumerate() {
            let ChunkRef::Data(id) = c else {
                panic!("chunk {i} is data")
            };
            let expected = match (made.encrypted, made.hash) {
                (false, hash) => hash.digest(&b[i]),
                (true, hash) => {
                    let master = crate::crypto::load_key_file(&dir.path().join("key")).unwrap();
                    crate::crypto::RepoCrypto::new(&master, hash)
                        .chunk_id(&b[i])
                        .0
                }
            };
            assert_eq!(id.0, expected, "{made:?}: chunk {i}");
        }
        for index in &indexes {
            let path = dir
                .path()
                .join("repo")
                .join(pack_path(&index.pack_id).to_string());
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(
                index.pack_id,
                made.hash.digest(&bytes),
                "{made:?}: pack name"
            );
        }
        restores(&rt, &repo, &b);
        let report = rt.block_on(verify(&repo, true)).unwrap();
        assert!(report.problems.is_empty(), "{made:?}: {report:?}");
        assert_eq!(report.chunks_checked, 36);

        let ChunkRef::Data(bad) = point.chunks[3] else {
            panic!("chunk 3 is data")
        };
        let at = map[&bad];
        let path = dir
            .path()
            .join("repo")
            .join(pack_path(&at.pack).to_string());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[at.entry.offset as usize + 100] ^= 0x10;
        std::fs::write(&path, bytes).unwrap();
        assert!(rt.block_on(repo.read_chunk(&bad, &at)).is_err(), "{made:?}");
        let report = rt.block_on(verify(&repo, true)).unwrap();
        let named: Vec<_> = report.problems.iter().map(|p| &p.problem).collect();
        assert!(
            named.iter().any(|p| p.contains(&bad.hex())),
            "{made:?}: {named:?}"
        );
        let hash_name = made.hash.to_string();
        assert!(
            named.iter().any(|p| p.contains(&hash_name)),
            "{made:?}: the pack's hash is named: {named:?}"
        );
    }

    #[test]
    fn a_blake3_repository_backs_up_restores_verifies_and_refuses_a_corrupt_chunk() {
        for encrypted in [false, true] {
            backs_up_restores_verifies_and_refuses_a_corrupt_chunk(Made {
                hash: crate::ChunkHash::Blake3,
                encrypted,
                old_config: false,
            });
        }
    }

    #[test]
    fn a_sha256_repository_made_with_hash_sha256_backs_up_restores_verifies_and_refuses_a_corrupt_chunk(
    ) {
        for encrypted in [false, true] {
            backs_up_restores_verifies_and_refuses_a_corrupt_chunk(Made {
                hash: crate::ChunkHash::Sha256,
                encrypted,
                old_config: false,
            });
        }
    }

    #[test]
    fn a_repository_whose_config_an_older_tidemark_wrote_backs_up_restores_verifies_and_refuses_a_corrupt_chunk(
    ) {
        for encrypted in [false, true] {
            backs_up_restores_verifies_and_refuses_a_corrupt_chunk(Made {
                hash: crate::ChunkHash::Sha256,
                encrypted,
                old_config: true,
            });
        }
    }

    #[test]
    fn a_plain_and_an_encrypted_blake3_repository_give_the_same_bytes_unrelated_ids() {
        let rt = runtime();
        let ids: Vec<ChunkId> = [false, true]
            .into_iter()
            .map(|encrypted| {
                let dir = tempfile::tempdir().unwrap();
                let made = Made {
                    hash: crate::ChunkHash::Blake3,
                    encrypted,
                    old_config: false,
                };
                make(&rt, dir.path(), made).chunk_id(&chunk(3, 0))
            })
            .collect();
        assert_eq!(ids[0].0, crate::ChunkHash::Blake3.digest(&chunk(3, 0)));
        assert_ne!(ids[0], ids[1]);
    }
}
