//! A volume's life on disk: registering it (`create`), opening it under its lock
//! (`open`, which reloads tracking and reports snapshots lost at the last stop), listing
//! and removing volumes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};

use tidemark_formats::manifest::{validate_volume_name, VolumeManifest};
use uuid::Uuid;

use super::backing::BackingFile;
use super::{
    lock_mutex, volumes_dir, CowDefaults, TrackingMode, Volume, VolumeError, VolumeOptions,
    WriteState, MAX_GRANULARITY, MIN_GRANULARITY,
};
use crate::checkpoint::{Chain, ChainParams};
use crate::lockfile::{LockError, LockFile};
use crate::status::{unix_now, EventLog};

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
    ///
    /// A volume whose rollback was interrupted is refused
    /// ([`VolumeError::RollbackIncomplete`]): only [`Volume::open_for_rollback`] opens it.
    pub fn open(state_dir: &Path, name: &str) -> Result<Volume, VolumeError> {
        Volume::open_checked(state_dir, name, true)
    }

    /// Open volume `name` as [`Volume::open`] does, also when a rollback of it was
    /// interrupted: for the rollback that finishes it ([`Volume::rollback`]) and for
    /// `remove`, nothing else.
    pub fn open_for_rollback(state_dir: &Path, name: &str) -> Result<Volume, VolumeError> {
        Volume::open_checked(state_dir, name, false)
    }

    fn open_checked(
        state_dir: &Path,
        name: &str,
        refuse_incomplete_rollback: bool,
    ) -> Result<Volume, VolumeError> {
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
        let lock = take_lock(name, state_dir, &dir)?;
        if refuse_incomplete_rollback {
            crate::rollback::refuse_if_incomplete(name, &dir)?;
        }
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
                epoch: 0,
            }),
            events,
            manifest,
            cow_defaults,
        };
        volume.reap_lost_snapshots();
        remove_temp_files(&volume.dir);
        Ok(volume)
    }

    /// The marker of an interrupted rollback of volume `name`, if there is one (see
    /// [`crate::rollback::marker`]).
    pub fn incomplete_rollback(
        state_dir: &Path,
        name: &str,
    ) -> Option<Result<crate::rollback::RollbackMarker, String>> {
        validate_volume_name(name).ok()?;
        crate::rollback::marker(&volumes_dir(state_dir).join(name))
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
        let volume = Volume::open_for_rollback(state_dir, name)?;
        let dir = volume.dir.clone();
        volume.close()?;
        fs::remove_dir_all(&dir).map_err(|source| VolumeError::Io {
            volume: name.to_string(),
            action: "remove",
            path: dir,
            source,
        })
    }
}

/// Delete `.NAME.tmp-*` files an interrupted atomic replace left in `dir`.
pub(super) fn remove_temp_files(dir: &Path) {
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

/// The process-wide owner locks of the state dirs with a volume open here, by the
/// state dir's volumes directory: every volume of a state dir shares one (one descriptor
/// however many volumes are open; the last volume closed releases it).
static OWNERS: Mutex<BTreeMap<PathBuf, Weak<LockFile>>> = Mutex::new(BTreeMap::new());

/// The volume directories open in this process: a volume is open once at a time.
static OPEN_HERE: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// A volume's claim: its state dir's owner lock (shared) and its place in [`OPEN_HERE`].
#[derive(Debug)]
pub(super) struct VolumeLock {
    _owner: Arc<LockFile>,
    dir: PathBuf,
}

impl Drop for VolumeLock {
    fn drop(&mut self) {
        lock_mutex(&OPEN_HERE).remove(&self.dir);
    }
}

/// Claim volume `name` (directory `dir`) of `state_dir` for this process: take or share
/// the state dir's owner lock (`volumes/.lock`, which records our pid), then make sure
/// the volume is not open here already.
pub(super) fn take_lock(
    name: &str,
    state_dir: &Path,
    dir: &Path,
) -> Result<VolumeLock, VolumeError> {
    let volumes = volumes_dir(state_dir);
    let volumes = fs::canonicalize(&volumes).unwrap_or(volumes);
    let owner = {
        let mut owners = lock_mutex(&OWNERS);
        match owners.get(&volumes).and_then(Weak::upgrade) {
            Some(owner) => owner,
            None => {
                let path = volumes.join(".lock");
                let owner = Arc::new(LockFile::acquire(&path).map_err(|err| match err {
                    LockError::Held { holder } => VolumeError::Locked {
                        name: name.to_string(),
                        holder,
                    },
                    LockError::Io {
                        action,
                        path,
                        source,
                    } => VolumeError::Io {
                        volume: name.to_string(),
                        action,
                        path,
                        source,
                    },
                })?);
                owners.retain(|_, owner| owner.strong_count() > 0);
                owners.insert(volumes, Arc::downgrade(&owner));
                owner
            }
        }
    };
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    if !lock_mutex(&OPEN_HERE).insert(dir.clone()) {
        return Err(VolumeError::Locked {
            name: name.to_string(),
            holder: format!("pid {}", std::process::id()),
        });
    }
    Ok(VolumeLock { _owner: owner, dir })
}
