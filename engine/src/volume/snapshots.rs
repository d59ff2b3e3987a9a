//! Snapshots of a live volume: one or a group taken under one write pause, with the
//! optional new checkpoint and frozen dirty bitmap per volume; their markers, and
//! reporting the snapshots a crash lost.

use std::fs::{self};
use std::path::{Path, PathBuf};
use std::sync::{Arc, MutexGuard, PoisonError, RwLockWriteGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{
    lock_mutex, GroupSnapshot, SnapshotSpec, Volume, VolumeError, WriteState, MAX_GRANULARITY,
    MIN_GRANULARITY,
};
use crate::checkpoint::{valid_name, Chain, NewCheckpoint};
use crate::error;
use crate::snapshot::{Snapshot, SnapshotInner, SnapshotParams, MAX_DEFAULT_CHUNK};
use crate::status::{unix_now, EventLevel};

impl Volume {
    /// Take a snapshot of this volume alone (see [`Volume::snapshot_group`]).
    pub fn snapshot(&self, spec: SnapshotSpec) -> Result<(Snapshot, Duration), VolumeError> {
        let mut group = Volume::snapshot_group(&[(self, spec)])?;
        let snapshot = group
            .snapshots
            .pop()
            .ok_or_else(|| VolumeError::Invalid("no snapshot taken".into()))?;
        Ok((snapshot, group.pause))
    }

    /// Snapshot several volumes at one instant: pause new writes on all of them, drain
    /// in-flight ones, then per volume freeze the changes since `spec.since`, create the
    /// snapshot and the checkpoint `spec.checkpoint`, and resume. All or nothing: on error
    /// every volume is left as it was.
    pub fn snapshot_group(
        requests: &[(&Volume, SnapshotSpec)],
    ) -> Result<GroupSnapshot, VolumeError> {
        // Validate and prepare outside the pause.
        let mut order: Vec<usize> = (0..requests.len()).collect();
        order.sort_by_key(|&i| requests[i].0.uuid());
        for w in order.windows(2) {
            if requests[w[0]].0.uuid() == requests[w[1]].0.uuid() {
                return Err(VolumeError::Invalid(format!(
                    "volume {} appears twice in one snapshot group",
                    requests[w[0]].0.name()
                )));
            }
        }
        let mut cow_paths = Vec::with_capacity(requests.len());
        for (volume, spec) in requests {
            cow_paths.push(volume.prepare_snapshot(spec)?);
        }
        let markers_done = |upto: usize| {
            for (volume, spec) in &requests[..upto] {
                volume.remove_marker(&spec.name);
            }
        };
        // Lock order: every chain, then every gate, both by volume uuid.
        let mut chains: Vec<Option<MutexGuard<'_, Chain>>> =
            requests.iter().map(|_| None).collect();
        for &i in &order {
            chains[i] = Some(lock_mutex(&requests[i].0.chain));
        }
        // New checkpoints' bitmap files are written before the pause.
        let mut prepared: Vec<Option<NewCheckpoint>> = requests.iter().map(|_| None).collect();
        let discard_prepared =
            |chains: &[Option<MutexGuard<'_, Chain>>], prepared: &mut [Option<NewCheckpoint>]| {
                for (chain, new) in chains.iter().zip(prepared.iter_mut()) {
                    if let (Some(chain), Some(new)) = (chain, new.take()) {
                        chain.discard(new);
                    }
                }
            };
        for (i, (_, spec)) in requests.iter().enumerate() {
            let (Some(chain), Some(name)) = (chains[i].as_deref(), &spec.checkpoint) else {
                continue;
            };
            let staged = chain.prepare(name).and_then(|new| {
                let mut new = new.unconfirmed();
                match chain.stage(&mut new) {
                    Ok(()) => Ok(new),
                    Err(e) => {
                        chain.discard(new);
                        Err(e)
                    }
                }
            });
            match staged {
                Ok(new) => prepared[i] = Some(new),
                Err(e) => {
                    discard_prepared(&chains, &mut prepared);
                    markers_done(requests.len());
                    return Err(e.into());
                }
            }
        }
        let started = Instant::now();
        let mut gates: Vec<Option<RwLockWriteGuard<'_, WriteState>>> =
            requests.iter().map(|_| None).collect();
        for &i in &order {
            match requests[i].0.gate_write() {
                Ok(g) => gates[i] = Some(g),
                Err(e) => {
                    drop(gates);
                    discard_prepared(&chains, &mut prepared);
                    markers_done(requests.len());
                    return Err(e);
                }
            }
        }
        let jobs = requests
            .iter()
            .zip(chains.iter_mut())
            .zip(gates.iter_mut())
            .zip(&cow_paths)
            .zip(prepared.iter_mut())
            .enumerate()
            .filter_map(|(i, ((((request, chain), gate), cow_path), new))| {
                Some(PausedJob {
                    index: i,
                    volume: request.0,
                    spec: &request.1,
                    chain: chain.as_deref_mut()?,
                    st: gate.as_deref_mut()?,
                    cow_path,
                    new_checkpoint: new.take(),
                })
            })
            .collect();
        let mut taken: Vec<Option<(Arc<SnapshotInner>, bool)>> =
            requests.iter().map(|_| None).collect();
        let mut failure = None;
        for (i, result) in take_in_parallel(jobs) {
            match result {
                Ok(inner) => taken[i] = Some((inner, requests[i].1.checkpoint.is_some())),
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        if let Some(err) = failure {
            // Undo in reverse: deleting the new checkpoint merges its (empty, since
            // writes are paused) bitmap back, leaving the chain as it was.
            for (i, taken) in taken.into_iter().enumerate().rev() {
                let Some((inner, made_checkpoint)) = taken else {
                    continue;
                };
                let (volume, spec) = &requests[i];
                if let (Some(chain), Some(st)) = (chains[i].as_deref_mut(), gates[i].as_deref_mut())
                {
                    st.snapshots.retain(|s| !Arc::ptr_eq(s, &inner));
                    inner.drop_store();
                    if let (true, Some(name)) = (made_checkpoint, &spec.checkpoint) {
                        if let Err(e) = chain.delete(name, &mut st.active) {
                            volume.events.push(
                                EventLevel::Error,
                                format!(
                                    "volume {}: undoing checkpoint {name}: {}",
                                    volume.name(),
                                    error::chain(&e)
                                ),
                            );
                        }
                    }
                }
            }
            drop(gates);
            discard_prepared(&chains, &mut prepared);
            markers_done(requests.len());
            return Err(err);
        }
        drop(gates);
        let pause = started.elapsed();
        finish_freezes_in_parallel(
            requests
                .iter()
                .zip(chains.iter_mut())
                .filter_map(|((volume, _), chain)| Some((*volume, chain.as_deref_mut()?)))
                .collect(),
        );
        drop(chains);
        Ok(GroupSnapshot {
            snapshots: taken
                .into_iter()
                .flatten()
                .map(|(inner, _)| Snapshot::new(inner))
                .collect(),
            pause,
        })
    }

    /// Checks done before the pause; writes the snapshot's marker. Returns the COW path.
    pub(super) fn prepare_snapshot(&self, spec: &SnapshotSpec) -> Result<PathBuf, VolumeError> {
        if !valid_name(&spec.name) {
            return Err(VolumeError::Invalid(format!(
                "invalid snapshot name {:?}: use 1 to 255 of the characters A-Z a-z 0-9 . _ - + @ :",
                spec.name
            )));
        }
        if let Some(c) = spec.cow.chunk_size {
            if !c.is_power_of_two() || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&c) {
                return Err(VolumeError::Invalid(format!(
                    "COW chunk size {c} must be a power of two from 4 KiB to 1 MiB"
                )));
            }
        }
        {
            let st = self.gate_read()?;
            if st.snapshots.iter().any(|s| s.name() == spec.name) {
                return Err(VolumeError::SnapshotExists {
                    volume: self.name().to_string(),
                    name: spec.name.clone(),
                });
            }
        }
        let snap_dir = self.dir.join("snapshots");
        let cow_path = match (&spec.cow.path, &self.cow_defaults.cow_dir) {
            (Some(p), _) => p.clone(),
            (None, Some(dir)) => dir.join(format!("{}-{}.cow", self.name(), spec.name)),
            (None, None) => snap_dir.join(format!("{}.cow", spec.name)),
        };
        fs::create_dir_all(&snap_dir).map_err(|e| self.io_err("create", &snap_dir, e))?;
        let marker = SnapshotMarker {
            name: spec.name.clone(),
            cow_path: cow_path.clone(),
            created_unix: unix_now(),
        };
        let path = snap_dir.join(format!("{}.json", spec.name));
        let bytes = serde_json::to_vec(&marker).map_err(|e| VolumeError::Invalid(e.to_string()))?;
        tidemark_formats::atomic_replace(&path, &bytes)
            .map_err(|e| self.io_err("write", &path, e))?;
        Ok(cow_path)
    }

    pub(super) fn remove_marker(&self, name: &str) {
        let _ = fs::remove_file(self.dir.join("snapshots").join(format!("{name}.json")));
    }

    /// The paused part of a snapshot on one volume.
    pub(super) fn take_snapshot(
        &self,
        chain: &mut Chain,
        st: &mut WriteState,
        spec: &SnapshotSpec,
        cow_path: &Path,
        new_checkpoint: Option<NewCheckpoint>,
    ) -> Result<Arc<SnapshotInner>, VolumeError> {
        let give_up = |chain: &Chain, new: Option<NewCheckpoint>| {
            if let Some(new) = new {
                chain.discard(new);
            }
        };
        if st.snapshots.iter().any(|s| s.name() == spec.name) {
            give_up(chain, new_checkpoint);
            return Err(VolumeError::SnapshotExists {
                volume: self.name().to_string(),
                name: spec.name.clone(),
            });
        }
        let bitmap = match &spec.since {
            Some(since) => match chain.bitmap_since(since, st.active.as_deref()) {
                Ok(b) => Some(b),
                Err(e) => {
                    give_up(chain, new_checkpoint);
                    return Err(e.into());
                }
            },
            None => None,
        };
        let chunk = spec
            .cow
            .chunk_size
            .unwrap_or(self.granularity().min(MAX_DEFAULT_CHUNK));
        let inner = match SnapshotInner::create(SnapshotParams {
            name: spec.name.clone(),
            volume: self.name().to_string(),
            size: self.size(),
            chunk,
            origin: self.backing.clone(),
            store_path: cow_path.to_path_buf(),
            limit: spec.cow.limit.or(self.cow_defaults.cow_limit),
            bitmap,
            events: self.events.clone(),
        }) {
            Ok(inner) => Arc::new(inner),
            Err(e) => {
                give_up(chain, new_checkpoint);
                return Err(e.into());
            }
        };
        if let Err(e) = inner.start() {
            inner.drop_store();
            give_up(chain, new_checkpoint);
            return Err(e.into());
        }
        if let Some(name) = &spec.checkpoint {
            let installed = match new_checkpoint {
                Some(new) => chain.install(new, &mut st.active),
                // Not prepared before the pause: prepare now.
                None => chain
                    .prepare(name)
                    .and_then(|new| chain.install(new, &mut st.active)),
            };
            if let Err(e) = installed {
                inner.drop_store();
                return Err(e.into());
            }
        } else {
            give_up(chain, new_checkpoint);
        }
        st.snapshots.push(inner.clone());
        Ok(inner)
    }

    /// The live snapshots of this volume.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        let st = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        st.snapshots.iter().cloned().map(Snapshot::new).collect()
    }

    /// Drop snapshot `name`: writes stop preserving its chunks and its COW store is
    /// deleted; handles still held read as "dropped".
    pub fn drop_snapshot(&self, name: &str) -> Result<(), VolumeError> {
        let inner = {
            let mut st = self.gate_write()?;
            let Some(pos) = st.snapshots.iter().position(|s| s.name() == name) else {
                return Err(VolumeError::SnapshotNotFound {
                    volume: self.name().to_string(),
                    name: name.to_string(),
                });
            };
            st.snapshots.remove(pos)
        };
        inner.drop_store();
        self.remove_marker(name);
        Ok(())
    }

    /// Snapshots whose markers survived a previous process: it stopped without dropping
    /// them (a crash, or a clean stop while a backup was running). Report and clean up.
    pub(super) fn reap_lost_snapshots(&self) {
        let snap_dir = self.dir.join("snapshots");
        let Ok(entries) = fs::read_dir(&snap_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json")
                || entry.file_name().to_string_lossy().starts_with('.')
            {
                // No snapshot is alive at open: COW stores and half-written markers
                // left in the default place are garbage.
                let _ = fs::remove_file(&path);
                continue;
            }
            if let Ok(bytes) = fs::read(&path) {
                if let Ok(marker) = serde_json::from_slice::<SnapshotMarker>(&bytes) {
                    let _ = fs::remove_file(&marker.cow_path);
                    self.events.push(
                        EventLevel::Warning,
                        format!(
                            "volume {}: snapshot {} did not survive the previous stop and is gone; its backup must be run again",
                            self.name(),
                            marker.name
                        ),
                    );
                }
            }
            let _ = fs::remove_file(&path);
        }
    }
}

/// Most threads one group snapshot uses for its volumes' paused work.
const MAX_PAUSED_THREADS: usize = 16;

/// The paused part of one volume's snapshot, handed to a thread of [`take_in_parallel`].
struct PausedJob<'a> {
    index: usize,
    volume: &'a Volume,
    spec: &'a SnapshotSpec,
    chain: &'a mut Chain,
    st: &'a mut WriteState,
    cow_path: &'a Path,
    new_checkpoint: Option<NewCheckpoint>,
}

/// Run the paused part of every volume of a group at once. Each volume's part waits for
/// its own syncs (the old bitmap frozen, the chain replaced: about four per volume), and
/// the volumes are independent of each other, so running them one after another would
/// hold the writes of all of them for the sum of every volume's sync latency: 16 volumes
/// under write load paused for hundreds of milliseconds. Every gate stays held by the
/// caller until all have finished, so the group is still one instant for every volume.
/// Returns each job's index with its result. A thread that cannot be started leaves its
/// share to the others; the calling thread always works too.
fn take_in_parallel(
    jobs: Vec<PausedJob<'_>>,
) -> Vec<(usize, Result<Arc<SnapshotInner>, VolumeError>)> {
    let results = std::sync::Mutex::new(Vec::new());
    for_each_in_parallel(jobs, |job| {
        let result = job.volume.take_snapshot(
            job.chain,
            job.st,
            job.spec,
            job.cow_path,
            job.new_checkpoint,
        );
        lock_mutex(&results).push((job.index, result));
    });
    let mut results = results.into_inner().unwrap_or_else(PoisonError::into_inner);
    results.sort_by_key(|(index, _)| *index);
    results
}

/// Run `work` on every item, on up to [`MAX_PAUSED_THREADS`] threads (this one among
/// them; with no other thread, one item after another).
fn for_each_in_parallel<T: Send>(items: Vec<T>, work: impl Fn(T) + Sync) {
    let helpers = items.len().saturating_sub(1).min(MAX_PAUSED_THREADS - 1);
    let queue = std::sync::Mutex::new(items);
    let run = || loop {
        let Some(item) = lock_mutex(&queue).pop() else {
            return;
        };
        work(item);
    };
    std::thread::scope(|scope| {
        for n in 0..helpers {
            let started = std::thread::Builder::new()
                .name(format!("snapshot-{n}"))
                .spawn_scoped(scope, run);
            if started.is_err() {
                break;
            }
        }
        run();
    });
}

/// After the pause, chains still locked: freeze the durable bitmaps the new checkpoints
/// replaced ([`Volume::finish_freezes`]), the volumes at once.
fn finish_freezes_in_parallel(chains: Vec<(&Volume, &mut Chain)>) {
    for_each_in_parallel(chains, |(volume, chain)| volume.finish_freezes(chain));
}

/// Marker of a live snapshot (`snapshots/<name>.json`): present while it exists, so a
/// crash is noticed and reported at the next open.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotMarker {
    name: String,
    cow_path: PathBuf,
    created_unix: u64,
}
