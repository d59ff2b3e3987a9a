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
//! vol.close()                                                clean stop (also on drop)
//! ```
//! Exports: [`crate::export::VolumeExport`] (live, read-write) and
//! [`crate::export::SnapshotExport`] (read-only).
//!
//! # State directory
//!
//! ```text
//! <state_dir>/volumes/<name>/volume.json        manifest (tidemark_formats::manifest)
//!                           /cow.json           COW store defaults, when set
//!                           /lock               flock: one process per volume
//!                           /checkpoints.json   the chain (crate::checkpoint)
//!                           /<chain>-<gen>.bitmap  dirty bitmaps (crate::tracking)
//!                           /snapshots/<s>.json marker of a live snapshot
//!                           /snapshots/<s>.cow  default COW store
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
//! Why this is safe: a crash after 1 leaves a dirty bit for data that may not have been
//! written, which only costs a block in the next incremental backup. A crash after 3
//! leaves the data and its bit. Snapshots never outlive the process (markers turn into
//! "snapshot lost" events at the next open), so step 2 needs no sync. A FLUSH fdatasyncs
//! the backing store; in durable mode bits are already stable, in fast mode they are
//! persisted at clean stops only.

pub(crate) mod backing;
#[cfg(test)]
mod tests;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tidemark_formats::manifest::{validate_volume_name, VolumeManifest};
use uuid::Uuid;

use crate::checkpoint::{
    valid_name, Chain, ChainParams, CheckpointError, CheckpointInfo, NewCheckpoint,
};
use crate::snapshot::{
    CowOptions, Snapshot, SnapshotError, SnapshotInner, SnapshotParams, MAX_DEFAULT_CHUNK,
};
use crate::status::{unix_now, EventLevel, EventLog, TrackingStatus, VolumeState, VolumeStatus};
use crate::tracking::{ActiveBitmap, DirtyBitmap, TrackingError};
use crate::{error, sys};
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
}

/// What writers need, behind the write gate.
#[derive(Debug, Default)]
struct WriteState {
    closed: bool,
    active: Option<Arc<ActiveBitmap>>,
    snapshots: Vec<Arc<SnapshotInner>>,
}

/// A volume under management. `Send + Sync`: share it as `Arc<Volume>`; every method
/// takes `&self`. Dropping it stops it cleanly (as [`Volume::close`]).
#[derive(Debug)]
pub struct Volume {
    dir: PathBuf,
    manifest: VolumeManifest,
    cow_defaults: CowDefaults,
    backing: Arc<BackingFile>,
    _lock: File,
    chain: Mutex<Chain>,
    gate: RwLock<WriteState>,
    events: Arc<EventLog>,
}

/// Marker of a live snapshot (`snapshots/<name>.json`): present while it exists, so a
/// crash is noticed and reported at the next open.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotMarker {
    name: String,
    cow_path: PathBuf,
    created_unix: u64,
}

fn lock_mutex<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn volumes_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("volumes")
}

impl Volume {
    /// Register `backing` (a raw image file or block device) as volume `name`.
    pub fn create(
        state_dir: &Path,
        name: &str,
        backing: &Path,
        options: VolumeOptions,
    ) -> Result<Volume, VolumeError> {
        if let Err(e) = validate_volume_name(name) {
            return Err(VolumeError::Invalid(format!(
                "invalid volume name: {}",
                e.reason
            )));
        }
        let g = options.granularity;
        if !g.is_power_of_two() || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&g) {
            return Err(VolumeError::Invalid(format!(
                "granularity {g} must be a power of two from 4 KiB to 1 MiB (for example 65536)"
            )));
        }
        let io_err = |action, path: &Path, source| VolumeError::Io {
            volume: name.to_string(),
            action,
            path: path.to_path_buf(),
            source,
        };
        let backing = backing
            .canonicalize()
            .map_err(|e| io_err("find backing", backing, e))?;
        let file = BackingFile::open(&backing).map_err(|e| io_err("open backing", &backing, e))?;
        let current = file
            .len()
            .map_err(|e| io_err("size backing", &backing, e))?;
        let size = match options.size {
            None => current,
            Some(size) if size <= current => {
                if size < current && !file.is_device() {
                    return Err(VolumeError::Invalid(format!(
                        "{} is {current} bytes, larger than the requested size {size}; omit the size or resize the file",
                        backing.display()
                    )));
                }
                size
            }
            Some(size) if file.is_device() => {
                return Err(VolumeError::Invalid(format!(
                    "device {} has {current} bytes, less than the requested size {size}",
                    backing.display()
                )));
            }
            Some(size) => {
                file.set_len(size)
                    .map_err(|e| io_err("extend backing", &backing, e))?;
                size
            }
        };
        if size == 0 || size % 512 != 0 {
            return Err(VolumeError::Invalid(format!(
                "volume size {size} must be a non-zero multiple of 512 bytes"
            )));
        }
        let dir = volumes_dir(state_dir).join(name);
        fs::create_dir_all(volumes_dir(state_dir))
            .map_err(|e| io_err("create state directory", state_dir, e))?;
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(VolumeError::Exists {
                    name: name.to_string(),
                    state_dir: state_dir.to_path_buf(),
                });
            }
            Err(e) => return Err(io_err("create", &dir, e)),
        }
        let manifest = VolumeManifest {
            name: name.to_string(),
            uuid: Uuid::new_v4(),
            backing,
            size,
            granularity: g,
            tracking: options.tracking,
            created_unix: unix_now(),
        };
        let path = dir.join("volume.json");
        let cow = CowDefaults {
            cow_dir: options.cow_dir,
            cow_limit: options.cow_limit,
        };
        let written = manifest
            .write(&path)
            .map_err(|e| VolumeError::BadManifest {
                path: path.clone(),
                reason: e.to_string(),
            })
            .and_then(|()| {
                if cow == CowDefaults::default() {
                    return Ok(());
                }
                let cow_path = dir.join("cow.json");
                let bytes = serde_json::to_vec_pretty(&cow)
                    .map_err(|e| VolumeError::Invalid(e.to_string()))?;
                tidemark_formats::atomic_replace(&cow_path, &bytes)
                    .map_err(|e| io_err("write", &cow_path, e))
            });
        if let Err(e) = written {
            let _ = fs::remove_dir_all(&dir);
            return Err(e);
        }
        Volume::open(state_dir, name)
    }

    /// Open volume `name` for I/O, taking its lock. Tracking comes back as the last stop
    /// left it (see the module docs of `checkpoint` and `tracking`); snapshots alive at an
    /// unclean stop are reported lost in the events and their COW stores deleted.
    pub fn open(state_dir: &Path, name: &str) -> Result<Volume, VolumeError> {
        if validate_volume_name(name).is_err() {
            return Err(VolumeError::NotFound {
                name: name.to_string(),
                state_dir: state_dir.to_path_buf(),
            });
        }
        let dir = volumes_dir(state_dir).join(name);
        let manifest_path = dir.join("volume.json");
        let io_err = |action, path: &Path, source| VolumeError::Io {
            volume: name.to_string(),
            action,
            path: path.to_path_buf(),
            source,
        };
        if !manifest_path.exists() {
            return Err(VolumeError::NotFound {
                name: name.to_string(),
                state_dir: state_dir.to_path_buf(),
            });
        }
        let lock = take_lock(name, &dir.join("lock"))?;
        let manifest =
            VolumeManifest::read(&manifest_path).map_err(|e| VolumeError::BadManifest {
                path: manifest_path.clone(),
                reason: e.to_string(),
            })?;
        if manifest.name != name {
            return Err(VolumeError::BadManifest {
                path: manifest_path,
                reason: format!("it names volume {:?}, not {name:?}", manifest.name),
            });
        }
        let cow_path = dir.join("cow.json");
        let cow_defaults = match fs::read(&cow_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| VolumeError::BadManifest {
                path: cow_path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => CowDefaults::default(),
            Err(e) => return Err(io_err("read", &cow_path, e)),
        };
        let backing = BackingFile::open(&manifest.backing)
            .map_err(|e| io_err("open backing", &manifest.backing, e))?;
        let current = backing
            .len()
            .map_err(|e| io_err("size backing", &manifest.backing, e))?;
        if current < manifest.size {
            return Err(VolumeError::Invalid(format!(
                "volume {name}: backing {} shrank to {current} bytes, the volume has {}; restore its size",
                manifest.backing.display(),
                manifest.size
            )));
        }
        let events = Arc::new(EventLog::default());
        let params = ChainParams {
            volume: name.to_string(),
            volume_uuid: manifest.uuid,
            granularity: manifest.granularity,
            size: manifest.size,
            durable: manifest.tracking == TrackingMode::Durable,
        };
        let (chain, active) = Chain::load(&dir, params, &events)?;
        let volume = Volume {
            dir,
            backing: Arc::new(backing),
            _lock: lock,
            chain: Mutex::new(chain),
            gate: RwLock::new(WriteState {
                closed: false,
                active,
                snapshots: Vec::new(),
            }),
            events,
            manifest,
            cow_defaults,
        };
        volume.reap_lost_snapshots();
        remove_temp_files(&volume.dir);
        Ok(volume)
    }

    /// Names of the volumes in `state_dir`, sorted.
    pub fn list(state_dir: &Path) -> Result<Vec<String>, VolumeError> {
        let dir = volumes_dir(state_dir);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(VolumeError::Io {
                    volume: String::new(),
                    action: "list",
                    path: dir,
                    source,
                })
            }
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter(|e| e.path().join("volume.json").is_file())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        Ok(names)
    }

    /// Forget volume `name` (its state: manifest, bitmaps, COW stores; never the
    /// backing's data). Fails while another process has it open.
    pub fn remove(state_dir: &Path, name: &str) -> Result<(), VolumeError> {
        let volume = Volume::open(state_dir, name)?;
        let dir = volume.dir.clone();
        volume.close()?;
        fs::remove_dir_all(&dir).map_err(|source| VolumeError::Io {
            volume: name.to_string(),
            action: "remove",
            path: dir,
            source,
        })
    }

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

    fn check_range(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.manifest.size)
        {
            return Err(VolumeError::OutOfRange {
                volume: self.manifest.name.clone(),
                offset,
                len,
                size: self.manifest.size,
            });
        }
        Ok(())
    }

    fn gate_read(&self) -> Result<RwLockReadGuard<'_, WriteState>, VolumeError> {
        let st = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        if st.closed {
            return Err(VolumeError::Closed(self.manifest.name.clone()));
        }
        Ok(st)
    }

    fn gate_write(&self) -> Result<RwLockWriteGuard<'_, WriteState>, VolumeError> {
        let st = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        if st.closed {
            return Err(VolumeError::Closed(self.manifest.name.clone()));
        }
        Ok(st)
    }

    /// Steps 1 and 2 of the write order (module docs).
    /// The snapshot copies only read the volume, so they run while the bitmap sync is in
    /// flight; the data write still waits for both.
    fn before_change(&self, st: &WriteState, offset: u64, len: u64) -> Result<(), VolumeError> {
        let pending = match &st.active {
            Some(active) => active.begin_mark(offset, len)?,
            None => None,
        };
        for snapshot in &st.snapshots {
            snapshot.preserve(offset, len);
        }
        if let Some(pending) = pending {
            pending.finish()?;
        }
        Ok(())
    }

    /// Fill `buf` with the bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        self.check_range(offset, buf.len() as u64)?;
        self.backing
            .read_at(offset, buf)
            .map_err(|e| self.io_err("read", self.backing.path(), e))
    }

    /// Write `data` at `offset`; with `fua` it is durable before this returns.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), VolumeError> {
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let st = self.gate_read()?;
        self.before_change(&st, offset, data.len() as u64)?;
        self.backing
            .write_at(offset, data)
            .map_err(|e| self.io_err("write", self.backing.path(), e))?;
        if fua {
            self.flush_backing()?;
        }
        Ok(())
    }

    fn flush_backing(&self) -> Result<(), VolumeError> {
        self.backing
            .sync_data()
            .map_err(|e| self.io_err("fdatasync", self.backing.path(), e))
    }

    /// Make every completed write durable.
    pub fn flush(&self) -> Result<(), VolumeError> {
        let _st = self.gate_read()?;
        self.flush_backing()
    }

    /// Discard `len` bytes at `offset` (a hole in a file, BLKDISCARD on a device).
    /// Counts as a change for tracking and snapshots.
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), VolumeError> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let st = self.gate_read()?;
        self.before_change(&st, offset, len)?;
        match self.backing.discard(offset, len) {
            Ok(()) => {}
            // Discard is advisory: a store that cannot discard keeps the old bytes.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY)
                ) => {}
            Err(e) => return Err(self.io_err("discard", self.backing.path(), e)),
        }
        if fua {
            self.flush_backing()?;
        }
        Ok(())
    }

    /// Make `len` bytes at `offset` read as zeroes; `may_unmap` lets a file punch a hole.
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> Result<(), VolumeError> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let st = self.gate_read()?;
        self.before_change(&st, offset, len)?;
        self.backing
            .zero(offset, len, may_unmap)
            .map_err(|e| self.io_err("write zeroes", self.backing.path(), e))?;
        if fua {
            self.flush_backing()?;
        }
        Ok(())
    }

    /// Allocation of `[offset, offset + len)` as `(length, is_hole)` runs, or `None` when
    /// the backing cannot tell (a device).
    pub fn allocation(&self, offset: u64, len: u64) -> Option<Vec<(u64, bool)>> {
        let end = offset.saturating_add(len).min(self.manifest.size);
        let runs = self
            .backing
            .allocation(offset, end.saturating_sub(offset))?;
        Some(
            runs.into_iter()
                .map(|(s, e, data)| (e - s, !data))
                .collect(),
        )
    }

    /// Create checkpoint `name`: changes are tracked from now on in its bitmap.
    pub fn checkpoint_create(&self, name: &str) -> Result<CheckpointInfo, VolumeError> {
        let mut chain = lock_mutex(&self.chain);
        // The new bitmap file is written before the pause (see crate::checkpoint).
        let new = chain.prepare(name)?;
        let mut st = match self.gate_write() {
            Ok(st) => st,
            Err(e) => {
                chain.discard(new);
                return Err(e);
            }
        };
        Ok(chain.install(new, &mut st.active)?)
    }

    /// Delete checkpoint `name`; its changes merge into its predecessor.
    pub fn checkpoint_delete(&self, name: &str) -> Result<(), VolumeError> {
        let mut chain = lock_mutex(&self.chain);
        let mut st = self.gate_write()?;
        Ok(chain.delete(name, &mut st.active)?)
    }

    /// The checkpoint chain, oldest first.
    pub fn checkpoints(&self) -> Vec<CheckpointInfo> {
        let chain = lock_mutex(&self.chain);
        let st = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        chain.list(st.active.as_deref())
    }

    /// The changes since checkpoint `since`, as of now (a live view: writes racing with
    /// this call may or may not be included; a snapshot freezes it exactly).
    pub fn dirty_bitmap(&self, since: &str) -> Result<DirtyBitmap, VolumeError> {
        let chain = lock_mutex(&self.chain);
        let st = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        Ok(chain.bitmap_since(since, st.active.as_deref())?)
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
            match chain.prepare(name) {
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
        let mut taken: Vec<(Arc<SnapshotInner>, bool)> = Vec::new();
        let mut failure = None;
        for (i, (volume, spec)) in requests.iter().enumerate() {
            let (Some(chain), Some(st)) = (chains[i].as_deref_mut(), gates[i].as_deref_mut())
            else {
                continue;
            };
            match volume.take_snapshot(chain, st, spec, &cow_paths[i], prepared[i].take()) {
                Ok(inner) => taken.push((inner, spec.checkpoint.is_some())),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if let Some(err) = failure {
            // Undo in reverse: deleting the new checkpoint merges its (empty, since
            // writes are paused) bitmap back, leaving the chain as it was.
            for (i, (inner, made_checkpoint)) in taken.into_iter().enumerate().rev() {
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
        drop(chains);
        Ok(GroupSnapshot {
            snapshots: taken
                .into_iter()
                .map(|(inner, _)| Snapshot::new(inner))
                .collect(),
            pause,
        })
    }

    /// Checks done before the pause; writes the snapshot's marker. Returns the COW path.
    fn prepare_snapshot(&self, spec: &SnapshotSpec) -> Result<PathBuf, VolumeError> {
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

    fn remove_marker(&self, name: &str) {
        let _ = fs::remove_file(self.dir.join("snapshots").join(format!("{name}.json")));
    }

    /// The paused part of a snapshot on one volume.
    fn take_snapshot(
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
    fn reap_lost_snapshots(&self) {
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
        let _chain = lock_mutex(&self.chain);
        let mut st = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        if st.closed {
            return Ok(());
        }
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

/// Delete `.NAME.tmp-*` files an interrupted atomic replace left in `dir`.
fn remove_temp_files(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.contains(".tmp-") {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Take the volume's lock file (flock, non-blocking) and record our pid in it.
fn take_lock(name: &str, path: &Path) -> Result<File, VolumeError> {
    let io_err = |action, source| VolumeError::Io {
        volume: name.to_string(),
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
        .map_err(|e| io_err("open lock", e))?;
    match sys::try_lock_exclusive(&file) {
        Ok(true) => {}
        Ok(false) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let holder = if holder.is_empty() {
                "unknown pid".to_string()
            } else {
                format!("pid {holder}")
            };
            return Err(VolumeError::Locked {
                name: name.to_string(),
                holder,
            });
        }
        Err(e) => return Err(io_err("lock", e)),
    }
    file.set_len(0).map_err(|e| io_err("write lock", e))?;
    file.rewind().map_err(|e| io_err("write lock", e))?;
    write!(file, "{}", std::process::id()).map_err(|e| io_err("write lock", e))?;
    Ok(file)
}
