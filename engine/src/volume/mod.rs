//! Volumes under management: manifest, lock, the write path, checkpoints and snapshots.
//!
//! # API (what the daemon uses)
//!
//! ```text
//! Volume::create(state_dir, name, backing, VolumeOptions)   register a file or device
//! Volume::open(state_dir, name)                              exclusive; reloads tracking
//! Volume::list(state_dir) / Volume::remove(state_dir, name)
//! vol.read / write(fua) / flush / trim / write_zeroes         the live I/O path
//! vol.checkpoint_create / checkpoints / checkpoint_delete
//! vol.changed_extents(since) / dirty_bitmap(since)           OR along the chain
//! vol.chain_uuid() / generation()
//! Volume::snapshot_group(&[(&vol, SnapshotSpec)])            one write pause for all:
//!     snapshot + optional new checkpoint + frozen dirty bitmap per volume
//! vol.snapshot(spec) / snapshots() / drop_snapshot(name)
//! vol.status()                                               JSON-able status
//! vol.rollback(request)                                      back to a checkpoint from
//!     its point, writing only the changes since it (crate::rollback)
//! vol.close()                                                clean stop (also on drop)
//! ```
//! Exports: `tidemark_daemon::export::VolumeExport` (live, read-write) and
//! `tidemark_daemon::export::SnapshotExport` (read-only).
//!
//! # State directory
//!
//! ```text
//! <state_dir>/volumes/.lock                      flock: one process owns the volumes
//! <state_dir>/volumes/<name>/volume.json        manifest (tidemark_formats::manifest)
//!                           /cow.json           COW store defaults, when set
//!                           /checkpoints.json   the chain (crate::checkpoint)
//!                           /<chain>-<gen>.bitmap  dirty bitmaps (crate::tracking)
//!                           /snapshots/<s>.json marker of a live snapshot
//!                           /snapshots/<s>.cow  default COW store
//!                           /rollback.json      an unfinished rollback (crate::rollback)
//! ```
//!
//! # Write order of one write (also trim and write-zeroes)
//!
//! Under a shared "write gate" (a reader-writer lock that snapshot and checkpoint
//! operations take exclusively to pause new writes and drain in-flight ones):
//!
//! 1. mark the touched tracking blocks in the active bitmap; in durable mode a block that
//!    was not yet durably dirty is on stable storage before step 3 is issued (group
//!    commit, see [`crate::tracking`]);
//! 2. for every active snapshot, preserve the touched chunks (copy-before-write; see
//!    [`crate::snapshot`]); a COW failure fails that snapshot, never this write. Step 2
//!    only reads the volume, so it runs while step 1's sync is in flight (the bits are
//!    set and queued first, then the copy, then the wait for the sync);
//! 3. write to the backing store (O_DIRECT when aligned); with FUA, fdatasync.
//!
//! A write whose bits need a sync (step 1) waits for it with the gate released, so a
//! pause (snapshot, checkpoint) waits only for the data writes in flight, not for bit
//! syncs: the pause's drain is one data write, not a bitmap sync plus a data write. Once
//! synced, the write takes the gate again; if a pause ran meanwhile (counted in the
//! gate's state), steps 1 and 2 are done again under the gate against what is current
//! (a new active bitmap, new snapshots) before step 3. The bits the write set in the
//! bitmap that stopped being active stay there: a block reported changed whose data
//! came later, never a missed one. A bitmap being frozen waits for a sync in progress
//! on it ([`crate::tracking`]).
//!
//! Why this is safe: a crash after 1 leaves a dirty bit for data that may not have been
//! written, which only costs a block in the next incremental backup. A crash after 3
//! leaves the data and its bit. Snapshots never outlive the process (markers turn into
//! "snapshot lost" events at the next open), so step 2 needs no sync. A FLUSH fdatasyncs
//! the backing store; in durable mode bits are already stable, in fast mode they are
//! persisted at clean stops only.
//!
//! # Files
//!
//! This file holds the types, checkpoints, status and the clean stop; `lifecycle`
//! creates, opens, lists and removes volumes; `data` is the read and write path;
//! `snapshots` takes (group) snapshots and tracks their markers; `backing` is the
//! backing store.

pub(crate) mod backing;
mod data;
mod lifecycle;
mod snapshots;
#[cfg(test)]
mod tests;

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockWriteGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidemark_formats::manifest::VolumeManifest;
use uuid::Uuid;

use crate::checkpoint::{Chain, CheckpointError, CheckpointInfo};
use crate::error;
use crate::snapshot::{CowOptions, Snapshot, SnapshotError, SnapshotInner};
use crate::status::{EventLevel, EventLog, TrackingStatus, VolumeState, VolumeStatus};
use crate::tracking::{ActiveBitmap, DirtyBitmap, RunBuilder, TrackingError};
use backing::BackingFile;

/// Default tracking granularity.
pub const DEFAULT_GRANULARITY: u32 = 64 << 10;
/// Smallest tracking granularity.
pub const MIN_GRANULARITY: u32 = 4 << 10;
/// Largest tracking granularity.
pub const MAX_GRANULARITY: u32 = 1 << 20;

/// How a volume's dirty bitmaps are persisted: `Durable` (default: every newly dirtied
/// block is on stable storage before its data write) or `Fast` (persisted at clean stops
/// only; after an unclean stop the bitmaps are inconsistent and the next backup is full).
pub use tidemark_formats::manifest::TrackingMode;

/// Options of [`Volume::create`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeOptions {
    /// Size in bytes; default the backing's size. A shorter regular file is extended.
    pub size: Option<u64>,
    /// Bytes per tracking block: a power of two, 4 KiB..1 MiB.
    pub granularity: u32,
    /// Durable (default) or fast tracking.
    pub tracking: TrackingMode,
    /// Directory for COW stores; default `<volume dir>/snapshots`.
    pub cow_dir: Option<PathBuf>,
    /// Default size limit of a snapshot's COW store in bytes (none = the filesystem's).
    pub cow_limit: Option<u64>,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        VolumeOptions {
            size: None,
            granularity: DEFAULT_GRANULARITY,
            tracking: TrackingMode::Durable,
            cow_dir: None,
            cow_limit: None,
        }
    }
}

/// `cow.json`: the volume's COW store defaults (only written when one is set).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct CowDefaults {
    #[serde(default)]
    cow_dir: Option<PathBuf>,
    #[serde(default)]
    cow_limit: Option<u64>,
}

/// Errors of volume operations.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// No such volume.
    #[error("no volume named {name:?} in {} (create it with `tidemark volume create`)", state_dir.display())]
    NotFound {
        /// The name asked for.
        name: String,
        /// Where it was looked for.
        state_dir: PathBuf,
    },
    /// The name is taken.
    #[error("volume {name:?} already exists in {}", state_dir.display())]
    Exists {
        /// The name.
        name: String,
        /// The state directory.
        state_dir: PathBuf,
    },
    /// Another process manages the volume.
    #[error("volume {name:?} is in use by another process ({holder}); stop it first")]
    Locked {
        /// The volume.
        name: String,
        /// What the lock file says about its holder.
        holder: String,
    },
    /// Bad arguments.
    #[error("{0}")]
    Invalid(String),
    /// A file operation failed.
    #[error("volume {volume}: {action} {}", path.display())]
    Io {
        /// The volume.
        volume: String,
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The manifest is damaged.
    #[error("volume manifest {}: {reason}", path.display())]
    BadManifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An I/O request outside the volume.
    #[error("volume {volume}: range {offset}+{len} is outside the volume ({size} bytes)")]
    OutOfRange {
        /// The volume.
        volume: String,
        /// Start of the request.
        offset: u64,
        /// Its length.
        len: u64,
        /// The volume's size.
        size: u64,
    },
    /// The volume was closed.
    #[error("volume {0} is closed")]
    Closed(String),
    /// No snapshot of that name.
    #[error("volume {volume}: no snapshot named {name:?}")]
    SnapshotNotFound {
        /// The volume.
        volume: String,
        /// The snapshot asked for.
        name: String,
    },
    /// The snapshot name is taken.
    #[error("volume {volume}: a snapshot named {name:?} already exists; drop it first")]
    SnapshotExists {
        /// The volume.
        volume: String,
        /// The name.
        name: String,
    },
    /// A checkpoint operation failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A snapshot operation failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// Dirty tracking failed (the write was not done).
    #[error(transparent)]
    Tracking(#[from] TrackingError),
    /// A rollback of the volume was interrupted: its data is part old, part rolled back.
    #[error(
        "volume {name}: rollback incomplete, rerun `{rerun}` to finish it (reading and \
         exporting the volume are refused until then)"
    )]
    RollbackIncomplete {
        /// The volume.
        name: String,
        /// The command that finishes it.
        rerun: String,
    },
}

impl VolumeError {
    /// The underlying I/O error, if this is one (to pick an errno).
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            VolumeError::Io { source, .. } => Some(source),
            VolumeError::Tracking(TrackingError::Io { source, .. }) => Some(source),
            _ => None,
        }
    }
}

/// What a snapshot operation creates on one volume.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotSpec {
    /// The snapshot's name (unique per volume).
    pub name: String,
    /// Create this checkpoint at the snapshot instant (the next incremental starts here).
    /// It starts unconfirmed; [`Volume::checkpoint_confirm`] once its backup is stored.
    pub checkpoint: Option<String>,
    /// Freeze the changes since this checkpoint with the snapshot (what an incremental
    /// backup copies); exported as `qemu:dirty-bitmap:<since>`.
    pub since: Option<String>,
    /// COW store location and limits (defaults from the volume's options).
    pub cow: CowOptions,
}

/// The result of [`Volume::snapshot_group`].
#[derive(Debug)]
pub struct GroupSnapshot {
    /// One snapshot per request, in request order.
    pub snapshots: Vec<Snapshot>,
    /// How long writes were held (the "write pause" a backup reports).
    pub pause: Duration,
    /// Where that time went.
    pub phases: PausePhases,
}

/// Where the time of one write pause went. The volumes of a group do their part at
/// once, each on a thread of its own, so each per-volume phase is the longest one over
/// the group (the group waits for its slowest volume).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PausePhases {
    /// From asking for the first write gate to holding all of them: the writes in
    /// flight finishing (each one after its bitmap sync and its data write).
    pub drain: Duration,
    /// Freezing the changes since the incremental backup's checkpoint.
    pub bitmaps: Duration,
    /// Creating the COW stores and starting their writers.
    pub cow_stores: Duration,
    /// Installing the new checkpoints: the chain file's rename and directory sync (and
    /// in fast tracking mode the old bitmap's freeze).
    pub checkpoints: Duration,
    /// From holding every gate to the last volume's part done: the phases above plus
    /// handing the work to the threads.
    pub volumes: Duration,
}

impl PausePhases {
    /// The longest of each per-volume phase.
    fn longest(&mut self, volume: &PausePhases) {
        self.bitmaps = self.bitmaps.max(volume.bitmaps);
        self.cow_stores = self.cow_stores.max(volume.cow_stores);
        self.checkpoints = self.checkpoints.max(volume.checkpoints);
    }
}

/// What [`Volume::exclusive`] hands to a rollback ([`crate::rollback`]): the chain, the
/// active bitmap and the backing store, with writes paused and checkpoint operations
/// locked out.
pub(crate) struct Exclusive<'a> {
    pub(crate) chain: &'a mut Chain,
    pub(crate) active: &'a mut Option<Arc<ActiveBitmap>>,
    /// How many snapshots are alive.
    pub(crate) snapshots: usize,
    pub(crate) backing: &'a BackingFile,
}

/// What writers need, behind the write gate.
#[derive(Debug, Default)]
struct WriteState {
    closed: bool,
    active: Option<Arc<ActiveBitmap>>,
    snapshots: Vec<Arc<SnapshotInner>>,
    /// Counts the times the gate was held exclusively (a pause): a writer that waited for
    /// its bit sync with the gate open redoes steps 1 and 2 when it changed meanwhile.
    epoch: u64,
}

/// A volume under management. `Send + Sync`: share it as `Arc<Volume>`; every method
/// takes `&self`. Dropping it stops it cleanly (as [`Volume::close`]).
#[derive(Debug)]
pub struct Volume {
    dir: PathBuf,
    manifest: VolumeManifest,
    cow_defaults: CowDefaults,
    backing: Arc<BackingFile>,
    _lock: lifecycle::VolumeLock,
    chain: Mutex<Chain>,
    gate: RwLock<WriteState>,
    events: Arc<EventLog>,
}

fn lock_mutex<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn volumes_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("volumes")
}

impl Volume {
    /// The volume's name.
    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    /// The volume's uuid.
    pub fn uuid(&self) -> Uuid {
        self.manifest.uuid
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.manifest.size
    }

    /// Bytes per tracking block.
    pub fn granularity(&self) -> u32 {
        self.manifest.granularity
    }

    /// The backing file or device.
    pub fn backing(&self) -> &Path {
        &self.manifest.backing
    }

    /// Durable or fast tracking.
    pub fn tracking_mode(&self) -> TrackingMode {
        self.manifest.tracking
    }

    /// Whether the backing is a block device (no hole information).
    pub fn backing_is_device(&self) -> bool {
        self.backing.is_device()
    }

    /// The volume's directory in the state dir.
    pub fn state_path(&self) -> &Path {
        &self.dir
    }

    fn io_err(&self, action: &'static str, path: &Path, source: io::Error) -> VolumeError {
        VolumeError::Io {
            volume: self.manifest.name.clone(),
            action,
            path: path.to_path_buf(),
            source,
        }
    }

    fn gate_write(&self) -> Result<RwLockWriteGuard<'_, WriteState>, VolumeError> {
        let mut st = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        if st.closed {
            return Err(VolumeError::Closed(self.manifest.name.clone()));
        }
        st.epoch = st.epoch.wrapping_add(1);
        Ok(st)
    }

    /// Run `f` with writes paused (the write gate held) and the chain locked, for the
    /// length of a rollback ([`crate::rollback`]).
    pub(crate) fn exclusive<R>(
        &self,
        f: impl FnOnce(Exclusive<'_>) -> R,
    ) -> Result<R, VolumeError> {
        let mut chain = lock_mutex(&self.chain);
        let mut st = self.gate_write()?;
        let st = &mut *st;
        Ok(f(Exclusive {
            chain: &mut chain,
            active: &mut st.active,
            snapshots: st.snapshots.len(),
            backing: &self.backing,
        }))
    }

    /// Create checkpoint `name`: changes are tracked from now on in its bitmap.
    pub fn checkpoint_create(&self, name: &str) -> Result<CheckpointInfo, VolumeError> {
        let mut chain = lock_mutex(&self.chain);
        // The new bitmap file is written before the pause (see crate::checkpoint).
        let mut new = chain.prepare(name)?;
        if let Err(e) = chain.stage(&mut new) {
            chain.discard(new);
            return Err(e.into());
        }
        let mut st = match self.gate_write() {
            Ok(st) => st,
            Err(e) => {
                chain.discard(new);
                return Err(e);
            }
        };
        let info = chain.install(new, &mut st.active)?;
        drop(st);
        self.finish_freezes(&mut chain);
        Ok(info)
    }

    /// After a pause that installed a checkpoint, the chain still locked: sync the
    /// directory of the chain renamed in the pause and freeze the durable bitmap it
    /// replaced (see crate::checkpoint). A failure is logged: a failed directory sync
    /// stays owed (writes fail their bit syncs until it succeeds), a bitmap left InUse on
    /// disk is trusted by the next open.
    pub(super) fn finish_freezes(&self, chain: &mut Chain) {
        if let Err(e) = chain.finish_freezes() {
            self.events.push(
                EventLevel::Warning,
                format!(
                    "volume {}: finishing the new checkpoint after the write pause (syncing its chain, freezing the previous checkpoint's bitmap): {}; the chain's sync is retried by the next write, the freeze by the next checkpoint operation (the bitmap is trusted as it is on disk meanwhile)",
                    self.name(),
                    error::chain(&e)
                ),
            );
        }
    }

    /// Delete checkpoint `name`; its changes merge into its predecessor.
    pub fn checkpoint_delete(&self, name: &str) -> Result<(), VolumeError> {
        let mut chain = lock_mutex(&self.chain);
        let mut st = self.gate_write()?;
        Ok(chain.delete(name, &mut st.active)?)
    }

    /// Record that the data at checkpoint `name` was stored: a checkpoint created with a
    /// snapshot starts unconfirmed (a backup made it), and incremental backups from it are
    /// refused by the daemon until the backup is seen through.
    pub fn checkpoint_confirm(&self, name: &str) -> Result<(), VolumeError> {
        Ok(lock_mutex(&self.chain).confirm(name)?)
    }

    /// The checkpoint chain, oldest first.
    pub fn checkpoints(&self) -> Vec<CheckpointInfo> {
        let chain = lock_mutex(&self.chain);
        let st = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        chain.list(st.active.as_deref())
    }

    /// The checkpoints' names, oldest first: what [`Volume::checkpoints`] lists, without
    /// merging any bitmap (cheap enough for every NBD negotiation).
    pub fn checkpoint_names(&self) -> Vec<String> {
        lock_mutex(&self.chain).names()
    }

    /// The changes since checkpoint `since`, as of now (a live view: writes racing with
    /// this call may or may not be included; a snapshot freezes it exactly).
    pub fn dirty_bitmap(&self, since: &str) -> Result<DirtyBitmap, VolumeError> {
        let chain = lock_mutex(&self.chain);
        let st = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        Ok(chain.bitmap_since(since, st.active.as_deref())?)
    }

    /// At most `max_runs` runs `(length, dirty)` of `[offset, offset + len)` (clipped to
    /// the volume) of the changes since checkpoint `since`, as of now (live, like
    /// [`Volume::dirty_bitmap`]). Only the words of the range's dirty pages are OR'ed along the chain, a
    /// window at a time: the chain lock and the write gate's read lock are held while a
    /// window is copied, never while runs are built, and the work stops at the cap.
    pub fn dirty_runs(
        &self,
        since: &str,
        offset: u64,
        len: u64,
        max_runs: usize,
    ) -> Result<Vec<(u64, bool)>, VolumeError> {
        /// Words copied per lock hold: 32 KiB, 16 GiB of volume at 64 KiB granularity.
        const WINDOW_WORDS: usize = 4096;
        let mut runs = RunBuilder::new(
            self.manifest.granularity,
            self.manifest.size,
            offset,
            len,
            max_runs,
        );
        let mut window = Vec::new();
        loop {
            let first = runs.first_word();
            let end_word = runs.end_word();
            // Clean pages of every bitmap in the chain are skipped, not copied.
            let start = {
                let chain = lock_mutex(&self.chain);
                let st = self.gate.read().unwrap_or_else(PoisonError::into_inner);
                let start = chain
                    .next_dirty_word_since(since, st.active.as_deref(), first)?
                    .unwrap_or(end_word)
                    .clamp(first, end_word.max(first));
                window.clear();
                window.resize(end_word.min(start + WINDOW_WORDS) - start, 0);
                chain.or_words_since(since, st.active.as_deref(), start, &mut window)?;
                start
            };
            runs.clean_to_word(start);
            if runs.done() || window.is_empty() {
                return Ok(runs.finish());
            }
            runs.feed(start, &window);
            if runs.done() {
                return Ok(runs.finish());
            }
        }
    }

    /// Byte ranges changed since checkpoint `since` (at tracking granularity).
    pub fn changed_extents(&self, since: &str) -> Result<Vec<Range<u64>>, VolumeError> {
        Ok(self.dirty_bitmap(since)?.changed_extents())
    }

    /// The chain's uuid: a consumer that recorded another one must start over (full).
    pub fn chain_uuid(&self) -> Uuid {
        lock_mutex(&self.chain).chain_uuid()
    }

    /// Generation of the latest checkpoint (0 when there is none).
    pub fn generation(&self) -> u64 {
        lock_mutex(&self.chain).generation()
    }

    /// How many bitmap syncs durable tracking has issued since the latest checkpoint
    /// (for tests and benchmarks).
    pub fn tracking_syncs(&self) -> u64 {
        let st = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        st.active.as_ref().map_or(0, |a| a.sync_count())
    }

    /// The volume's status (what `tidemark info --json` shows).
    pub fn status(&self) -> VolumeStatus {
        let chain = lock_mutex(&self.chain);
        let st = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        let tracking = if chain.is_empty() {
            TrackingStatus::Off
        } else if !chain.consistent(st.active.as_deref()) {
            TrackingStatus::Inconsistent
        } else if self.manifest.tracking == TrackingMode::Durable {
            TrackingStatus::Durable
        } else {
            TrackingStatus::Fast
        };
        VolumeStatus {
            name: self.manifest.name.clone(),
            uuid: self.manifest.uuid,
            backing: self.manifest.backing.clone(),
            size: self.manifest.size,
            granularity: self.manifest.granularity,
            state: if st.closed {
                VolumeState::Closed
            } else {
                VolumeState::Online
            },
            tracking,
            chain_uuid: chain.chain_uuid(),
            generation: chain.generation(),
            checkpoints: chain.list(st.active.as_deref()),
            snapshots: st.snapshots.iter().map(|s| s.status()).collect(),
            events: self.events.list(),
        }
    }

    /// Stop cleanly: drain writes, drop snapshots, persist the active bitmap as Clean.
    pub fn close(self) -> Result<(), VolumeError> {
        self.shutdown()
    }

    fn shutdown(&self) -> Result<(), VolumeError> {
        let mut chain = lock_mutex(&self.chain);
        let mut st = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        if st.closed {
            return Ok(());
        }
        chain.finish_freezes()?;
        st.closed = true;
        for snapshot in st.snapshots.drain(..) {
            self.events.push(
                EventLevel::Info,
                format!(
                    "volume {}: snapshot {} dropped at stop",
                    self.manifest.name,
                    snapshot.name()
                ),
            );
            snapshot.drop_store();
            self.remove_marker(snapshot.name());
        }
        if let Some(active) = st.active.take() {
            active.freeze()?;
        }
        self.backing
            .sync_data()
            .map_err(|e| self.io_err("fdatasync", self.backing.path(), e))
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        if let Err(err) = self.shutdown() {
            tracing::error!(
                "volume {}: clean stop failed: {}",
                self.manifest.name,
                error::chain(&err)
            );
        }
    }
}
