//! Snapshots of a live volume: one or a group taken under one write pause, with the
//! optional new checkpoint and frozen dirty bitmap per volume; their markers, and
//! reporting the snapshots a crash lost.

use std::fs::{self};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, MutexGuard, PoisonError, RwLockWriteGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{
    lock_mutex, GroupSnapshot, PausePhases, SnapshotSpec, Volume, VolumeError, WriteState,
    MAX_GRANULARITY, MIN_GRANULARITY,
};
use crate::checkpoint::{valid_name, Chain, NewCheckpoint};
use crate::error;
use crate::snapshot::{
    open_store, PreparedStore, Snapshot, SnapshotInner, SnapshotParams, MAX_DEFAULT_CHUNK,
};
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
        let mut made_stores = Vec::with_capacity(requests.len());
        let mut stores = Vec::with_capacity(requests.len());
        // Undo the preparation of the first `upto` requests: markers, and COW store files
        // made before the pause that no snapshot took.
        let undo_prepared = |upto: usize, cow_paths: &[PathBuf], made_stores: &[bool]| {
            for (i, (volume, spec)) in requests[..upto].iter().enumerate() {
                volume.remove_marker(&spec.name);
                if made_stores[i] {
                    let _ = fs::remove_file(&cow_paths[i]);
                }
            }
        };
        for (volume, spec) in requests {
            match volume.prepare_snapshot(spec) {
                Ok((path, made, store)) => {
                    cow_paths.push(path);
                    made_stores.push(made);
                    stores.push(store);
                }
                Err(e) => {
                    undo_prepared(cow_paths.len(), &cow_paths, &made_stores);
                    return Err(e);
                }
            }
        }
        let markers_done = |upto: usize| undo_prepared(upto, &cow_paths, &made_stores);
        // Lock order: every chain by volume uuid, then the gates, which the pause's threads
        // close at once (nothing holds a gate while waiting for another lock).
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
        let jobs: Vec<PausedJob<'_>> = requests
            .iter()
            .zip(chains.iter_mut())
            .zip(&cow_paths)
            .zip(stores)
            .zip(prepared.iter_mut())
            .enumerate()
            .filter_map(|(i, ((((request, chain), cow_path), store), new))| {
                Some(PausedJob {
                    index: i,
                    volume: request.0,
                    spec: &request.1,
                    chain: chain.as_deref_mut()?,
                    store: OpenedStore {
                        path: cow_path,
                        file: store,
                    },
                    new_checkpoint: new.take(),
                })
            })
            .collect();
        let paused = pause_in_parallel(jobs);
        drop(chains);
        if let Some(err) = paused.failure {
            markers_done(requests.len());
            return Err(err);
        }
        Ok(GroupSnapshot {
            snapshots: paused.taken.into_iter().map(Snapshot::new).collect(),
            pause: paused.pause,
            phases: paused.phases,
        })
    }

    /// Checks done before the pause; writes the snapshot's marker and makes and opens the
    /// COW store file. Returns the COW path, whether its file was made here (not there
    /// before) and the store, opened empty.
    pub(super) fn prepare_snapshot(
        &self,
        spec: &SnapshotSpec,
    ) -> Result<(PathBuf, bool, PreparedStore), VolumeError> {
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
        // Made and opened now, not in the pause: a new inode and directory entry, and the
        // truncate of a reused file, wait for the filesystem's journal, and 16 of them at
        // once made the tail of a group's pause (benches/results/group-pause.md).
        let made = cow_path
            .parent()
            .map_or(Ok(()), fs::create_dir_all)
            .and_then(|()| {
                fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&cow_path)
            });
        let fresh = match made {
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => {
                self.remove_marker(&spec.name);
                return Err(self.io_err("create the COW store", &cow_path, e));
            }
        };
        match open_store(&spec.name, &cow_path, fresh) {
            Ok(store) => Ok((cow_path, fresh, store)),
            Err(e) => {
                self.remove_marker(&spec.name);
                if fresh {
                    let _ = fs::remove_file(&cow_path);
                }
                Err(e.into())
            }
        }
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
        store: OpenedStore<'_>,
        new_checkpoint: Option<NewCheckpoint>,
        phases: &mut PausePhases,
    ) -> Result<Arc<SnapshotInner>, VolumeError> {
        let phase_start = Instant::now();
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
        phases.bitmaps = phase_start.elapsed();
        let phase_start = Instant::now();
        let chunk = spec
            .cow
            .chunk_size
            .unwrap_or(self.granularity().min(MAX_DEFAULT_CHUNK));
        let (inner, zeros) = match SnapshotInner::create(SnapshotParams {
            name: spec.name.clone(),
            volume: self.name().to_string(),
            size: self.size(),
            chunk,
            origin: self.backing.clone(),
            store: store.file,
            store_path: store.path.to_path_buf(),
            limit: spec.cow.limit.or(self.cow_defaults.cow_limit),
            bitmap,
            events: self.events.clone(),
        }) {
            Ok((inner, zeros)) => (Arc::new(inner), zeros),
            Err(e) => {
                give_up(chain, new_checkpoint);
                return Err(e.into());
            }
        };
        if let Err(e) = inner.start(zeros) {
            inner.drop_store();
            give_up(chain, new_checkpoint);
            return Err(e.into());
        }
        phases.cow_stores = phase_start.elapsed();
        let phase_start = Instant::now();
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
        phases.checkpoints = phase_start.elapsed();
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

/// The paused part of one volume's snapshot, handed to a thread of [`pause_in_parallel`].
struct PausedJob<'a> {
    index: usize,
    volume: &'a Volume,
    spec: &'a SnapshotSpec,
    chain: &'a mut Chain,
    store: OpenedStore<'a>,
    new_checkpoint: Option<NewCheckpoint>,
}

/// A snapshot's COW store, opened (empty) before the pause.
pub(super) struct OpenedStore<'a> {
    path: &'a Path,
    file: PreparedStore,
}

/// What [`pause_in_parallel`] gives back.
struct Paused {
    /// The snapshots in request order (empty after a failure).
    taken: Vec<Arc<SnapshotInner>>,
    /// The first error; every volume was then left as it was.
    failure: Option<VolumeError>,
    pause: Duration,
    phases: PausePhases,
}

/// One job's outcome, reported by its thread while it still holds the volume's gate.
struct JobReport {
    index: usize,
    taken: Option<Arc<SnapshotInner>>,
    error: Option<VolumeError>,
    /// When the gate was held (the volume's writes drained).
    closed: Instant,
    /// When the volume's part was done.
    done: Instant,
    phases: PausePhases,
}

/// Where the threads of one pause meet: the pause starts when `started` is set; once
/// every job reported, the thread of the last report sets `keep` (whether every job
/// succeeded), and each thread keeps or undoes its own jobs and opens their gates.
#[derive(Default)]
struct Meeting {
    started: Option<Instant>,
    reports: Vec<JobReport>,
    keep: Option<bool>,
    /// When the last gate opened again.
    released: Option<Instant>,
}

/// A job whose gate a thread holds until the verdict.
struct HeldJob<'a, 'g> {
    volume: &'a Volume,
    spec: &'a SnapshotSpec,
    chain: &'a mut Chain,
    gate: Option<RwLockWriteGuard<'g, WriteState>>,
    taken: Option<Arc<SnapshotInner>>,
}

/// Run the paused part of a group snapshot: close every volume's write gate and do its
/// part ([`Volume::take_snapshot`]) on threads started before the pause, the volumes at
/// once, holding every gate until all are done; then keep (or, when any failed, undo)
/// every volume's part, open the gates, and freeze the durable bitmaps the new
/// checkpoints replaced ([`Volume::finish_freezes`], after the pause, chains still
/// locked).
///
/// Why at once: closing a gate waits for the writes in flight on its volume, each of them
/// waiting for its bitmap sync and its data write, and each volume's part waits for its
/// own syncs (the chain file's directory). One gate after another would hold the first
/// volume's writes for the sum of every volume's drain and work. The group is still one
/// instant for every volume: no gate opens before every gate was held, so a write
/// acknowledged before the pause is in every snapshot and one started after a gate opened
/// is in none. A thread that cannot be started leaves its share to the others; the
/// calling thread works too, so at worst the jobs run one after another.
fn pause_in_parallel(jobs: Vec<PausedJob<'_>>) -> Paused {
    let count = jobs.len();
    let helpers = count.saturating_sub(1).min(MAX_PAUSED_THREADS - 1);
    let queue = std::sync::Mutex::new(jobs);
    let meeting = std::sync::Mutex::new(Meeting {
        reports: Vec::with_capacity(count),
        ..Meeting::default()
    });
    let changed = std::sync::Condvar::new();
    let run = || {
        let mut m = lock_mutex(&meeting);
        while m.started.is_none() {
            m = changed.wait(m).unwrap_or_else(PoisonError::into_inner);
        }
        drop(m);
        // A panic in a job must not leave the other threads holding their gates: the
        // verdict becomes "undo" and the scope re-raises the panic once all are done.
        let _undo_on_panic = UndoOnPanic {
            meeting: &meeting,
            changed: &changed,
        };
        let mut held: Vec<HeldJob<'_, '_>> = Vec::with_capacity(count);
        loop {
            // Not `while let`: its lock on the queue would last the whole job.
            let Some(job) = lock_mutex(&queue).pop() else {
                break;
            };
            let PausedJob {
                index,
                volume,
                spec,
                chain,
                store,
                new_checkpoint,
            } = job;
            let mut phases = PausePhases::default();
            let (gate, result, closed) = match volume.gate_write() {
                Ok(mut gate) => {
                    let closed = Instant::now();
                    let result = volume.take_snapshot(
                        chain,
                        &mut gate,
                        spec,
                        store,
                        new_checkpoint,
                        &mut phases,
                    );
                    (Some(gate), result, closed)
                }
                Err(e) => {
                    if let Some(new) = new_checkpoint {
                        chain.discard(new);
                    }
                    (None, Err(e), Instant::now())
                }
            };
            let (taken, error) = match result {
                Ok(inner) => (Some(inner), None),
                Err(e) => (None, Some(e)),
            };
            let mut m = lock_mutex(&meeting);
            m.reports.push(JobReport {
                index,
                taken: taken.clone(),
                error,
                closed,
                done: Instant::now(),
                phases,
            });
            if m.reports.len() == count {
                m.keep = Some(m.reports.iter().all(|r| r.error.is_none()));
                changed.notify_all();
            }
            drop(m);
            held.push(HeldJob {
                volume,
                spec,
                chain,
                gate,
                taken,
            });
        }
        let mut m = lock_mutex(&meeting);
        let keep = loop {
            match m.keep {
                Some(keep) => break keep,
                None => m = changed.wait(m).unwrap_or_else(PoisonError::into_inner),
            }
        };
        drop(m);
        for job in held.iter_mut().rev() {
            if !keep {
                job.undo();
            }
            job.gate = None;
        }
        let released = Instant::now();
        let mut m = lock_mutex(&meeting);
        m.released = Some(m.released.map_or(released, |r| r.max(released)));
        drop(m);
        if keep {
            for job in held {
                job.volume.finish_freezes(job.chain);
            }
        }
    };
    if count > 0 {
        std::thread::scope(|scope| {
            for n in 0..helpers {
                let spawned = std::thread::Builder::new()
                    .name(format!("snapshot-{n}"))
                    .spawn_scoped(scope, run);
                if spawned.is_err() {
                    break;
                }
            }
            lock_mutex(&meeting).started = Some(Instant::now());
            changed.notify_all();
            run();
        });
    }
    let meeting = meeting.into_inner().unwrap_or_else(PoisonError::into_inner);
    let started = meeting.started.unwrap_or_else(Instant::now);
    let mut reports = meeting.reports;
    reports.sort_by_key(|r| r.index);
    let all_closed = reports.iter().map(|r| r.closed).max().unwrap_or(started);
    let all_done = reports.iter().map(|r| r.done).max().unwrap_or(all_closed);
    let mut phases = PausePhases {
        drain: all_closed.saturating_duration_since(started),
        volumes: all_done.saturating_duration_since(all_closed),
        ..PausePhases::default()
    };
    let mut taken = Vec::with_capacity(reports.len());
    let mut failure = None;
    for report in reports {
        phases.longest(&report.phases);
        match (report.taken, report.error) {
            (_, Some(e)) => {
                failure.get_or_insert(e);
            }
            (Some(inner), None) => taken.push(inner),
            (None, None) => {}
        }
    }
    if failure.is_some() {
        taken.clear();
    }
    Paused {
        taken,
        failure,
        pause: meeting
            .released
            .unwrap_or(started)
            .saturating_duration_since(started),
        phases,
    }
}

impl HeldJob<'_, '_> {
    /// Undo this volume's part of a group that failed elsewhere, its gate still held:
    /// drop the snapshot, and delete the new checkpoint, which merges its bitmap (empty,
    /// since writes are paused) back, leaving the chain as it was.
    fn undo(&mut self) {
        let (Some(inner), Some(st)) = (self.taken.take(), self.gate.as_deref_mut()) else {
            return;
        };
        st.snapshots.retain(|s| !Arc::ptr_eq(s, &inner));
        inner.drop_store();
        if let Some(name) = &self.spec.checkpoint {
            if let Err(e) = self.chain.delete(name, &mut st.active) {
                self.volume.events.push(
                    EventLevel::Error,
                    format!(
                        "volume {}: undoing checkpoint {name}: {}",
                        self.volume.name(),
                        error::chain(&e)
                    ),
                );
            }
        }
    }
}

/// Held by each thread of [`pause_in_parallel`] while it works: if the thread panics,
/// the verdict becomes "undo" at once so the others open their gates.
struct UndoOnPanic<'m> {
    meeting: &'m std::sync::Mutex<Meeting>,
    changed: &'m std::sync::Condvar,
}

impl Drop for UndoOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut m = lock_mutex(self.meeting);
            m.keep.get_or_insert(false);
            self.changed.notify_all();
        }
    }
}

/// Marker of a live snapshot (`snapshots/<name>.json`): present while it exists, so a
/// crash is noticed and reported at the next open.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotMarker {
    name: String,
    cow_path: PathBuf,
    created_unix: u64,
}
