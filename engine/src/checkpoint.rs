//! Checkpoints: the named chain of dirty bitmaps of a volume (libvirt semantics).
//!
//! Checkpoint `i`'s bitmap records the blocks written between checkpoint `i` and
//! checkpoint `i + 1`; the latest checkpoint's bitmap is the active one
//! ([`crate::tracking`]). The changes since checkpoint `i` are therefore the OR of the
//! bitmaps `i..=latest`. Deleting a checkpoint merges its bits into its predecessor, so no
//! change is ever lost (deleting the oldest simply forgets changes before it).
//!
//! On disk, in the volume's directory: `checkpoints.json` (the chain,
//! `tidemark_formats::manifest::CheckpointChain`, replaced atomically) and
//! `<chain uuid>-<generation>.bitmap` (`tidemark_formats::bitmap`).
//!
//! # Write order (writes to the volume are paused by the caller, except where noted)
//!
//! - create: write the new, empty bitmap file (InUse) *before* the pause (only the chain
//!   lock is held: the file is a stray nothing names yet), and, when the caller stages
//!   it ([`Chain::stage`]), the next chain file too (`.checkpoints.json.staged`, written
//!   and fsynced: a stray until renamed). Then, paused: in fast mode freeze the active
//!   bitmap (payload, fdatasync, Clean header, fdatasync); replace the chain (rename the
//!   staged file, fsync the directory; unstaged: the whole atomic replace). In durable
//!   mode the old active bitmap is frozen only *after* the pause
//!   ([`Chain::finish_freezes`], with the chain lock still held): its file already holds
//!   every bit it reports, synced before each data write (a superset: blocks marked
//!   ahead of sequential streams), and no write marks it once the pause ends, so the
//!   freeze afterwards writes exactly the bits frozen in the pause. A crash before the
//!   chain is replaced leaves the old chain, whose latest bitmap is either still InUse
//!   (judged as after any crash) or Clean and complete (writes were paused), and stray
//!   new files that the next open deletes. A crash after the replace but before the late
//!   freeze leaves a durable InUse bitmap that is not the latest: trusted (a superset of
//!   the checkpoint's changes, never a missed one) and made Clean by the next open.
//!   In durable mode the pause does not sync the directory either: the rename is all it
//!   does to the chain. The new active bitmap owes the directory sync
//!   ([`ActiveBitmap::owe_dir_sync`]): [`Chain::finish_freezes`] pays it right after the
//!   pause, and every bit sync of the new bitmap (the group commit each write waits for
//!   before its data write, since a new bitmap has no durable bit) pays it, if still
//!   owed, before its bits count as durable. So no data write after the pause is issued before the chain naming the
//!   new bitmap is on stable storage; a crash before that sync may leave the old chain,
//!   whose latest bitmap holds every change up to the pause (InUse, or Clean and
//!   complete), and no later write reached the volume.
//! - delete: prepare, switch, commit. Prepare: write the merged predecessor (its bits OR
//!   the deleted checkpoint's) to a new file, `<chain uuid>-<generation>.merged.bitmap` or
//!   back to `<chain uuid>-<generation>.bitmap` (the name the chain does not use now);
//!   if it becomes the latest, open it for writing and mark it InUse. Switch: replace the
//!   chain, naming the new file and no longer the deleted checkpoint. Commit: in memory
//!   only (nothing can fail), then remove the two files the chain no longer names. A crash
//!   or an error before the switch leaves the old chain with every file it names untouched
//!   (the new file is a stray the next open deletes); after it, the new chain with a
//!   complete merged file. Failpoints (tests only, [`crate::failpoint`]) sit at each step.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tidemark_formats::bitmap::{self, BitmapHeader, BitmapState, PagedBits, PAGE_WORDS};
use tidemark_formats::manifest::{CheckpointChain, CheckpointEntry};
use tidemark_formats::FormatError;
use uuid::Uuid;

use crate::status::{unix_now, CheckpointStatus, EventLevel, EventLog};
use crate::tracking::{ActiveBitmap, DirtyBitmap, TrackingError};

/// A checkpoint prepared by [`Chain::prepare`]: its empty bitmap file is written, the
/// chain does not name it yet.
#[derive(Debug)]
pub(crate) struct NewCheckpoint {
    name: String,
    generation: u64,
    file_name: String,
    bitmap: ActiveBitmap,
    confirmed: bool,
    created_unix: u64,
    /// The chain naming this checkpoint, written and synced by [`Chain::stage`] to
    /// [`STAGED_CHAIN`] (the pause then only renames it into place).
    staged: Option<CheckpointChain>,
}

impl NewCheckpoint {
    /// The checkpoint is created unconfirmed: a backup takes it, and [`Chain::confirm`]
    /// records that the data at it was stored. Call before [`Chain::stage`].
    pub(crate) fn unconfirmed(mut self) -> NewCheckpoint {
        self.confirmed = false;
        self
    }
}

/// The next chain file, written before a pause by [`Chain::stage`] beside
/// `checkpoints.json`; a stray after a crash (the next open deletes it).
const STAGED_CHAIN: &str = ".checkpoints.json.staged";

/// A predecessor's merged bitmap, written by [`Chain::prepare_merge`] to a file the chain
/// does not name yet.
#[derive(Debug)]
struct MergedPredecessor {
    file_name: String,
    words: PagedBits,
    problem: Option<String>,
    /// The opened bitmap, when the predecessor becomes the latest checkpoint.
    active: Option<ActiveBitmap>,
}

/// Longest checkpoint name (it travels in NBD context names and bitmap headers).
pub const MAX_NAME_LEN: usize = 255;

/// Errors of checkpoint operations.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// No checkpoint has this name.
    #[error("volume {volume}: no checkpoint named {name:?} (list them with `tidemark checkpoint list {volume}`)")]
    NotFound {
        /// The volume.
        volume: String,
        /// The name asked for.
        name: String,
    },
    /// The name is taken.
    #[error(
        "volume {volume}: checkpoint {name:?} already exists; pick another name or delete it first"
    )]
    Exists {
        /// The volume.
        volume: String,
        /// The name asked for.
        name: String,
    },
    /// The name is not acceptable.
    #[error(
        "invalid checkpoint name {name:?}: use 1 to 255 of the characters A-Z a-z 0-9 . _ - + @ :"
    )]
    InvalidName {
        /// The name given.
        name: String,
    },
    /// The bitmaps since this checkpoint missed changes.
    #[error("volume {volume}: changes since checkpoint {name:?} are unknown ({reason}); take a full backup with a new checkpoint")]
    Inconsistent {
        /// The volume.
        volume: String,
        /// The checkpoint asked for.
        name: String,
        /// Why.
        reason: String,
    },
    /// Reading or writing a bitmap failed.
    #[error(transparent)]
    Tracking(#[from] TrackingError),
    /// Reading or writing the chain file failed.
    #[error("checkpoint chain {}", path.display())]
    Io {
        /// The chain file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The chain file is damaged.
    #[error("checkpoint chain {}: {reason}; move it away to start a new chain (the next backup is then full)", path.display())]
    BadChain {
        /// The chain file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// A checkpoint as the API reports it.
pub type CheckpointInfo = CheckpointStatus;

#[derive(Debug)]
struct Entry {
    file: CheckpointEntry,
    /// The bits of a frozen bitmap; `None` for the latest (read from the active bitmap).
    frozen: Option<PagedBits>,
    problem: Option<String>,
}

/// What a chain needs to know about its volume.
#[derive(Debug, Clone)]
pub(crate) struct ChainParams {
    pub(crate) volume: String,
    pub(crate) volume_uuid: Uuid,
    pub(crate) granularity: u32,
    pub(crate) size: u64,
    pub(crate) durable: bool,
}

/// The checkpoint chain of one volume. The active bitmap itself is held by the volume
/// (writers reach it without this lock); operations that change it receive it.
#[derive(Debug)]
pub(crate) struct Chain {
    params: ChainParams,
    path: PathBuf,
    bitmap_dir: PathBuf,
    chain_uuid: Uuid,
    next_generation: u64,
    entries: Vec<Entry>,
    /// Durable mode: bitmaps that stopped being active in a pause and are still InUse on
    /// disk; [`Chain::finish_freezes`] freezes them once writes resume.
    unfrozen: Vec<Arc<ActiveBitmap>>,
    /// Durable mode: the active bitmap whose chain was renamed into place in a pause and
    /// whose directory sync it still owes ([`ActiveBitmap::owe_dir_sync`]);
    /// [`Chain::finish_freezes`] syncs it once writes resume, unless a write did first.
    owed_dir_sync: Option<Arc<ActiveBitmap>>,
}

/// Whether `name` is acceptable as a checkpoint (or snapshot) name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+@:".contains(&b))
}

impl Chain {
    /// Load the chain from `dir` (a new, empty one when none exists) and activate the
    /// latest bitmap, judging each bitmap as the module docs of `tracking` describe.
    pub(crate) fn load(
        dir: &Path,
        params: ChainParams,
        events: &EventLog,
    ) -> Result<(Chain, Option<Arc<ActiveBitmap>>), CheckpointError> {
        let path = dir.join("checkpoints.json");
        let file = match CheckpointChain::read(&path) {
            Ok(chain) => chain,
            Err(_) if !path.exists() => CheckpointChain::new(),
            Err(e) => {
                return Err(CheckpointError::BadChain {
                    path,
                    reason: e.to_string(),
                })
            }
        };
        if let Some(e) = file.checkpoints.iter().find(|e| !valid_name(&e.name)) {
            return Err(CheckpointError::BadChain {
                path,
                reason: format!("checkpoint name {:?} is not one tidemark creates", e.name),
            });
        }
        let next_generation = file
            .checkpoints
            .iter()
            .map(|e| e.generation + 1)
            .max()
            .unwrap_or(1)
            .max(file.next_generation.unwrap_or(0));
        let mut chain = Chain {
            params,
            path,
            bitmap_dir: dir.to_path_buf(),
            chain_uuid: file.chain_uuid,
            next_generation,
            entries: Vec::new(),
            unfrozen: Vec::new(),
            owed_dir_sync: None,
        };
        let count = file.checkpoints.len();
        let mut active = None;
        for (i, entry) in file.checkpoints.into_iter().enumerate() {
            let latest = i + 1 == count;
            let (header, words, problem) = chain.judge(&entry, latest, events);
            if latest {
                let bitmap_path = chain.bitmap_dir.join(&entry.bitmap_file);
                let bitmap = match header {
                    Some(header) => {
                        ActiveBitmap::activate(&bitmap_path, header, &words, chain.params.durable)?
                    }
                    None => {
                        // Unreadable: start a fresh file so tracking goes on, but keep it
                        // Inconsistent on disk so nothing ever trusts it.
                        let header = chain.header(&entry.name, entry.generation)?;
                        let active =
                            ActiveBitmap::create(&bitmap_path, header, chain.params.durable)?;
                        active.mark_inconsistent()?;
                        active
                    }
                };
                active = Some(Arc::new(bitmap));
                chain.entries.push(Entry {
                    file: entry,
                    frozen: None,
                    problem,
                });
            } else {
                chain.entries.push(Entry {
                    file: entry,
                    frozen: Some(words),
                    problem,
                });
            }
        }
        chain.remove_strays();
        Ok((chain, active))
    }

    /// Read one bitmap file and decide whether it can be trusted.
    fn judge(
        &self,
        entry: &CheckpointEntry,
        latest: bool,
        events: &EventLog,
    ) -> (Option<BitmapHeader>, PagedBits, Option<String>) {
        let path = self.bitmap_dir.join(&entry.bitmap_file);
        let blank = PagedBits::new(
            self.params
                .size
                .div_ceil(u64::from(self.params.granularity)),
        );
        let volume = &self.params.volume;
        let (header, words) = match bitmap::read_bitmap_pages(&path) {
            Ok(read) => read,
            Err(err) => {
                let problem = format!("bitmap file unreadable: {err}");
                events.push(
                    EventLevel::Error,
                    format!(
                        "volume {volume}: checkpoint {:?}: {problem}; the next backup must be full",
                        entry.name
                    ),
                );
                return (None, blank, Some(problem));
            }
        };
        if header.volume_uuid != self.params.volume_uuid
            || header.granularity != self.params.granularity
            || header.volume_size != self.params.size
        {
            let problem = format!(
                "bitmap file {} belongs to another volume or geometry",
                path.display()
            );
            events.push(
                EventLevel::Error,
                format!("volume {volume}: {problem}; the next backup must be full"),
            );
            return (None, blank, Some(problem));
        }
        let problem = match header.state {
            BitmapState::Clean => None,
            BitmapState::Inconsistent => Some("marked inconsistent".to_string()),
            BitmapState::InUse if self.params.durable => {
                if latest {
                    events.push(
                        EventLevel::Warning,
                        format!("volume {volume}: unclean stop detected; durable dirty bitmaps are intact"),
                    );
                }
                None
            }
            BitmapState::InUse => {
                events.push(
                    EventLevel::Warning,
                    format!(
                        "volume {volume}: unclean stop in fast tracking mode: changes since checkpoint {:?} are unknown; the next backup must be full",
                        entry.name
                    ),
                );
                Some("unclean stop in fast tracking mode".to_string())
            }
        };
        let mut header = header;
        if problem.is_some() && header.state != BitmapState::Inconsistent {
            header.state = BitmapState::Inconsistent;
            // Record the verdict on disk so a later clean stop cannot launder it.
            match bitmap::write_bitmap_pages(&path, &header, &words) {
                Ok(written) => header = written,
                Err(err) => events.push(
                    EventLevel::Error,
                    format!(
                        "volume {volume}: cannot mark {} inconsistent: {err}",
                        path.display()
                    ),
                ),
            }
        } else if header.state == BitmapState::InUse && !latest {
            // Durable and trusted: a crash during a checkpoint operation. Make it Clean.
            if let Err(err) = bitmap::write_bitmap_pages(
                &path,
                &{
                    let mut h = header.clone();
                    h.state = BitmapState::Clean;
                    h
                },
                &words,
            ) {
                events.push(
                    EventLevel::Error,
                    format!("volume {volume}: cannot repair {}: {err}", path.display()),
                );
            }
        }
        (Some(header), words, problem)
    }

    fn header(&self, name: &str, generation: u64) -> Result<BitmapHeader, CheckpointError> {
        BitmapHeader::new(
            self.params.volume_uuid,
            name,
            self.params.granularity,
            self.params.size,
            generation,
        )
        .map_err(|e| {
            CheckpointError::Tracking(TrackingError::Format(FormatError::invalid(
                &self.bitmap_dir,
                0,
                e,
            )))
        })
    }

    /// Delete bitmap files no chain entry names and a staged chain file (left by an
    /// interrupted operation).
    fn remove_strays(&self) {
        let _ = fs::remove_file(self.bitmap_dir.join(STAGED_CHAIN));
        let keep: HashSet<&str> = self
            .entries
            .iter()
            .map(|e| e.file.bitmap_file.as_str())
            .collect();
        let Ok(dir) = fs::read_dir(&self.bitmap_dir) else {
            return;
        };
        for item in dir.flatten() {
            let name = item.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".bitmap") && !keep.contains(name) {
                let _ = fs::remove_file(item.path());
            }
        }
    }

    fn persist(&self) -> Result<(), CheckpointError> {
        let chain = CheckpointChain {
            chain_uuid: self.chain_uuid,
            checkpoints: self.entries.iter().map(|e| e.file.clone()).collect(),
            next_generation: Some(self.next_generation),
        };
        chain
            .write(&self.path)
            .map_err(|e| CheckpointError::BadChain {
                path: self.path.clone(),
                reason: e.to_string(),
            })
    }

    pub(crate) fn chain_uuid(&self) -> Uuid {
        self.chain_uuid
    }

    /// Generation of the latest checkpoint, 0 when there is none.
    pub(crate) fn generation(&self) -> u64 {
        self.entries.last().map_or(0, |e| e.file.generation)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn find(&self, name: &str) -> Result<usize, CheckpointError> {
        self.entries
            .iter()
            .position(|e| e.file.name == name)
            .ok_or_else(|| CheckpointError::NotFound {
                volume: self.params.volume.clone(),
                name: name.to_string(),
            })
    }

    /// Create checkpoint `name`. Writes must be paused; `active` is replaced by the new
    /// checkpoint's bitmap.
    #[cfg(test)]
    pub(crate) fn create(
        &mut self,
        name: &str,
        active: &mut Option<Arc<ActiveBitmap>>,
    ) -> Result<CheckpointInfo, CheckpointError> {
        let mut new = self.prepare(name)?;
        self.stage(&mut new)?;
        let info = self.install(new, active)?;
        self.finish_freezes()?;
        Ok(info)
    }

    /// First half of a create, done before writes are paused: check the name and write
    /// the new checkpoint's empty bitmap file (InUse). The file is a stray until
    /// [`Chain::install`] names it in the chain (the next open deletes strays). The chain
    /// must stay locked until `install` or [`Chain::discard`].
    pub(crate) fn prepare(&self, name: &str) -> Result<NewCheckpoint, CheckpointError> {
        if !valid_name(name) {
            return Err(CheckpointError::InvalidName {
                name: name.to_string(),
            });
        }
        if self.entries.iter().any(|e| e.file.name == name) {
            return Err(CheckpointError::Exists {
                volume: self.params.volume.clone(),
                name: name.to_string(),
            });
        }
        let generation = self.next_generation;
        let header = self.header(name, generation)?;
        let file_name = format!("{}-{generation}.bitmap", self.chain_uuid);
        let path = self.bitmap_dir.join(&file_name);
        let bitmap = ActiveBitmap::create(&path, header, self.params.durable)?;
        Ok(NewCheckpoint {
            name: name.to_string(),
            generation,
            file_name,
            bitmap,
            confirmed: true,
            created_unix: unix_now(),
            staged: None,
        })
    }

    /// The chain as it is once `new` is installed.
    fn chain_with(&self, new: &NewCheckpoint) -> CheckpointChain {
        let mut checkpoints: Vec<CheckpointEntry> =
            self.entries.iter().map(|e| e.file.clone()).collect();
        checkpoints.push(CheckpointEntry {
            name: new.name.clone(),
            generation: new.generation,
            created_unix: new.created_unix,
            bitmap_file: new.file_name.clone(),
            confirmed: new.confirmed,
        });
        CheckpointChain {
            chain_uuid: self.chain_uuid,
            checkpoints,
            next_generation: Some(new.generation + 1),
        }
    }

    /// Before the pause: write the chain that names `new` to [`STAGED_CHAIN`] and fsync
    /// it, so [`Chain::install`] only renames it into place (one sync fewer while writes
    /// are held). The chain must stay locked until `install` or [`Chain::discard`].
    pub(crate) fn stage(&self, new: &mut NewCheckpoint) -> Result<(), CheckpointError> {
        let chain = self.chain_with(new);
        let path = self.bitmap_dir.join(STAGED_CHAIN);
        chain.validate().map_err(|e| CheckpointError::BadChain {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let written = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .and_then(|mut f| {
                f.write_all(&chain.to_json())?;
                f.sync_all()
            });
        if let Err(source) = written {
            let _ = fs::remove_file(&path);
            return Err(CheckpointError::Io { path, source });
        }
        new.staged = Some(chain);
        Ok(())
    }

    /// Give up a prepared checkpoint: delete its files.
    pub(crate) fn discard(&self, new: NewCheckpoint) {
        let path = new.bitmap.path().to_path_buf();
        let staged = new.staged.is_some();
        drop(new);
        let _ = fs::remove_file(path);
        if staged {
            let _ = fs::remove_file(self.bitmap_dir.join(STAGED_CHAIN));
        }
    }

    /// Replace the chain file with the one [`Chain::stage`] wrote: rename, then (unless
    /// `sync_dir` is false: durable mode, where the new bitmap owes it instead) fsync the
    /// directory. Once the rename is done the new chain is what the next open reads, so a
    /// failing directory sync counts as done, as in [`Chain::replace_chain`].
    fn install_staged(&self, sync_dir: bool) -> Result<(), CheckpointError> {
        let staged = self.bitmap_dir.join(STAGED_CHAIN);
        fs::rename(&staged, &self.path).map_err(|source| CheckpointError::Io {
            path: self.path.clone(),
            source,
        })?;
        if sync_dir {
            let _ = fs::File::open(&self.bitmap_dir).and_then(|dir| dir.sync_all());
        }
        Ok(())
    }

    /// Durable mode, after the pause (chain still locked): sync the directory of the chain
    /// that [`Chain::install`] renamed into place, then freeze the bitmaps it left InUse
    /// (see the module doc). A bitmap whose freeze fails stays listed for the next try;
    /// its file stays InUse, which the next open trusts. A failed directory sync stays
    /// owed: writes keep failing their bit syncs until it succeeds.
    pub(crate) fn finish_freezes(&mut self) -> Result<(), CheckpointError> {
        if let Some(active) = &self.owed_dir_sync {
            active.sync_owed_dir()?;
            self.owed_dir_sync = None;
        }
        while let Some(old) = self.unfrozen.last() {
            old.freeze()?;
            self.unfrozen.pop();
        }
        Ok(())
    }

    /// Second half of a create, with writes paused: freeze the active bitmap, replace the
    /// chain, and make the prepared bitmap the active one.
    pub(crate) fn install(
        &mut self,
        new: NewCheckpoint,
        active: &mut Option<Arc<ActiveBitmap>>,
    ) -> Result<CheckpointInfo, CheckpointError> {
        if let Err(e) = self.finish_freezes() {
            self.discard(new);
            return Err(e);
        }
        if new.generation != self.next_generation
            || self.entries.iter().any(|e| e.file.name == new.name)
        {
            // The chain changed since prepare (a caller bug): start over.
            let name = new.name.clone();
            self.discard(new);
            return Err(CheckpointError::Exists {
                volume: self.params.volume.clone(),
                name,
            });
        }
        // Durable mode freezes the old bitmap after the pause (finish_freezes).
        let durable = self.params.durable;
        let frozen_words = match active.as_deref() {
            Some(old) => {
                if !durable {
                    if let Err(e) = old.freeze() {
                        self.discard(new);
                        return Err(e.into());
                    }
                }
                Some(old.bits())
            }
            None => None,
        };
        let staged = new
            .staged
            .as_ref()
            .is_some_and(|chain| *chain == self.chain_with(&new));
        let entry = CheckpointEntry {
            name: new.name.clone(),
            generation: new.generation,
            created_unix: new.created_unix,
            bitmap_file: new.file_name.clone(),
            confirmed: new.confirmed,
        };
        self.entries.push(Entry {
            file: entry,
            frozen: None,
            problem: None,
        });
        self.next_generation += 1;
        let persisted = if staged {
            self.install_staged(!durable)
        } else {
            self.persist()
        };
        if let Err(err) = persisted {
            self.entries.pop();
            self.next_generation -= 1;
            self.discard(new);
            if let (false, Some(old)) = (durable, active.as_deref()) {
                // Reopen the previous bitmap for writing; it stays the latest. (A durable
                // one was never frozen: it is still active as it was.)
                let reactivated = ActiveBitmap::activate(
                    old.path(),
                    old.header(),
                    &old.bits(),
                    self.params.durable,
                )?;
                *active = Some(Arc::new(reactivated));
            }
            return Err(err);
        }
        if !staged && new.staged.is_some() {
            // Staged for another chain (the chain changed since): not needed.
            let _ = fs::remove_file(self.bitmap_dir.join(STAGED_CHAIN));
        }
        let n = self.entries.len();
        if let (Some(words), Some(prev)) = (frozen_words, self.entries.get_mut(n.wrapping_sub(2))) {
            prev.frozen = Some(words);
        }
        if let (true, Some(old)) = (durable, active.take()) {
            self.unfrozen.push(old);
        }
        let new_active = Arc::new(new.bitmap);
        if durable && staged {
            new_active.owe_dir_sync(self.bitmap_dir.clone());
            self.owed_dir_sync = Some(Arc::clone(&new_active));
        }
        *active = Some(new_active);
        Ok(self.info(n - 1, active.as_deref()))
    }

    /// Delete checkpoint `name`, merging its bits into its predecessor. Writes must be
    /// paused; `active` changes when the latest checkpoint is deleted.
    ///
    /// Crash- and error-atomic (see the module doc): everything that can fail is prepared
    /// in files the chain does not name yet, the chain replace is the one switch, and
    /// nothing after it can fail. A failure before the switch leaves the chain, its files
    /// and `active` as they were, so writes go on being tracked and a retry starts over.
    pub(crate) fn delete(
        &mut self,
        name: &str,
        active: &mut Option<Arc<ActiveBitmap>>,
    ) -> Result<(), CheckpointError> {
        self.finish_freezes()?;
        let idx = self.find(name)?;
        let latest = idx + 1 == self.entries.len();
        // Prepare: the merged predecessor goes to a new file; when it becomes the latest,
        // it is opened for writing (header InUse) here, before the switch.
        let merged = match idx {
            0 => None,
            _ => Some(self.prepare_merge(idx, latest, active.as_deref())?),
        };
        let mut next: Vec<CheckpointEntry> = self.entries.iter().map(|e| e.file.clone()).collect();
        next.remove(idx);
        if let Some(m) = &merged {
            next[idx - 1].bitmap_file = m.file_name.clone();
        }
        // Switch.
        if let Err(err) = self.replace_chain(next) {
            if let Some(m) = merged {
                let path = self.bitmap_dir.join(&m.file_name);
                drop(m);
                let _ = fs::remove_file(path);
            }
            return Err(err);
        }
        // Commit: memory only, nothing can fail from here on.
        let removed = self.entries.remove(idx);
        let mut old_files = vec![removed.file.bitmap_file];
        match merged {
            Some(m) => {
                let pred = &mut self.entries[idx - 1];
                old_files.push(std::mem::replace(&mut pred.file.bitmap_file, m.file_name));
                pred.problem = m.problem;
                match m.active {
                    Some(bitmap) => {
                        pred.frozen = None;
                        *active = Some(Arc::new(bitmap));
                    }
                    None => pred.frozen = Some(m.words),
                }
            }
            None if latest => *active = None,
            None => {}
        }
        for file in old_files {
            let _ = fs::remove_file(self.bitmap_dir.join(file));
        }
        Ok(())
    }

    /// The first half of deleting entry `idx` (> 0): write its predecessor's merged
    /// bitmap to a file of its own (the chain names it only once the delete switches) and,
    /// when the deleted entry is the latest, activate it.
    fn prepare_merge(
        &self,
        idx: usize,
        latest: bool,
        active: Option<&ActiveBitmap>,
    ) -> Result<MergedPredecessor, CheckpointError> {
        let pred = &self.entries[idx - 1];
        let blocks = self
            .params
            .size
            .div_ceil(u64::from(self.params.granularity));
        let mut words = pred
            .frozen
            .clone()
            .unwrap_or_else(|| PagedBits::new(blocks));
        match (&self.entries[idx].frozen, active) {
            (Some(deleted), _) => words.or_assign(deleted),
            (None, Some(a)) => words.or_assign(&a.bits()),
            (None, None) => {}
        }
        let problem = pred
            .problem
            .clone()
            .or_else(|| self.entries[idx].problem.clone());
        let mut header = self.header(&pred.file.name, pred.file.generation)?;
        if problem.is_some() {
            header.state = BitmapState::Inconsistent;
        }
        // Two names per checkpoint, used in turn: the new file never overwrites the one
        // the chain names.
        let base = format!("{}-{}.bitmap", self.chain_uuid, pred.file.generation);
        let file_name = if pred.file.bitmap_file == base {
            format!("{}-{}.merged.bitmap", self.chain_uuid, pred.file.generation)
        } else {
            base
        };
        let path = self.bitmap_dir.join(&file_name);
        let fail = |step| {
            crate::failpoint::check(step).map_err(|source| CheckpointError::Io {
                path: path.clone(),
                source,
            })
        };
        let prepared = fail("checkpoint.delete.merge")
            .and_then(|()| {
                bitmap::write_bitmap_pages(&path, &header, &words)
                    .map_err(|e| TrackingError::from(e).into())
            })
            .and_then(|header| match latest {
                true => fail("checkpoint.delete.activate").and_then(|()| {
                    Ok(Some(ActiveBitmap::activate(
                        &path,
                        header,
                        &words,
                        self.params.durable,
                    )?))
                }),
                false => Ok(None),
            });
        let active = match prepared {
            Ok(active) => active,
            Err(err) => {
                // Not named by the chain: a stray either way, removed now.
                let _ = fs::remove_file(&path);
                return Err(err);
            }
        };
        Ok(MergedPredecessor {
            file_name,
            words,
            problem,
            active,
        })
    }

    /// Replace the chain file with `entries`: the switch of a delete. When the replace
    /// reports an error after its rename (the directory sync failed), the new chain is
    /// what the next open reads, so it counts as done; a replace that never reached the
    /// file is an error.
    fn replace_chain(&self, entries: Vec<CheckpointEntry>) -> Result<(), CheckpointError> {
        let chain = CheckpointChain {
            chain_uuid: self.chain_uuid,
            checkpoints: entries,
            next_generation: Some(self.next_generation),
        };
        let written = crate::failpoint::check("checkpoint.delete.persist")
            .map_err(|source| CheckpointError::Io {
                path: self.path.clone(),
                source,
            })
            .and_then(|()| {
                chain
                    .write(&self.path)
                    .map_err(|e| CheckpointError::BadChain {
                        path: self.path.clone(),
                        reason: e.to_string(),
                    })
            })
            .and_then(|()| {
                crate::failpoint::check("checkpoint.delete.persisted").map_err(|source| {
                    CheckpointError::Io {
                        path: self.path.clone(),
                        source,
                    }
                })
            });
        match written {
            Err(_) if CheckpointChain::read(&self.path).is_ok_and(|on_disk| on_disk == chain) => {
                Ok(())
            }
            other => other,
        }
    }

    /// Record that the data at checkpoint `name` was stored (its backup was seen
    /// through): incremental backups from it are no longer refused.
    pub(crate) fn confirm(&mut self, name: &str) -> Result<(), CheckpointError> {
        let idx = self.find(name)?;
        if self.entries[idx].file.confirmed {
            return Ok(());
        }
        self.entries[idx].file.confirmed = true;
        let persisted = self.persist();
        if persisted.is_err() {
            self.entries[idx].file.confirmed = false;
        }
        persisted
    }

    /// The switch of a rollback: the volume's data is back at checkpoint `name`, so every
    /// later checkpoint is dropped and `name` starts afresh with an empty bitmap, the
    /// active one (the next incremental from it copies only what is written from now on).
    /// Writes must be paused. Crash-atomic as a delete: the empty bitmap goes to a file the
    /// chain does not name yet, the chain replace is the one switch, and only then are the
    /// files the chain no longer names removed. The dropped checkpoints' generations are
    /// never handed out again (the chain file records the next one). Returns the names of
    /// the dropped checkpoints, oldest first.
    pub(crate) fn rollback_to(
        &mut self,
        name: &str,
        active: &mut Option<Arc<ActiveBitmap>>,
    ) -> Result<Vec<String>, CheckpointError> {
        self.finish_freezes()?;
        let idx = self.find(name)?;
        let target = &self.entries[idx].file;
        let header = self.header(&target.name, target.generation)?;
        // Two names per checkpoint, used in turn, as a delete's merge does.
        let base = format!("{}-{}.bitmap", self.chain_uuid, target.generation);
        let file_name = if target.bitmap_file == base {
            format!("{}-{}.merged.bitmap", self.chain_uuid, target.generation)
        } else {
            base
        };
        let path = self.bitmap_dir.join(&file_name);
        let bitmap = ActiveBitmap::create(&path, header, self.params.durable)?;
        let mut next: Vec<CheckpointEntry> = self.entries[..=idx]
            .iter()
            .map(|e| e.file.clone())
            .collect();
        next[idx].bitmap_file = file_name.clone();
        if let Err(err) = self.replace_chain(next) {
            drop(bitmap);
            let _ = fs::remove_file(&path);
            return Err(err);
        }
        // Commit: memory only, nothing can fail from here on.
        let dropped: Vec<Entry> = self.entries.drain(idx + 1..).collect();
        let target = &mut self.entries[idx];
        let mut old_files = vec![std::mem::replace(&mut target.file.bitmap_file, file_name)];
        target.frozen = None;
        target.problem = None;
        *active = Some(Arc::new(bitmap));
        old_files.extend(dropped.iter().map(|e| e.file.bitmap_file.clone()));
        for file in old_files {
            let _ = fs::remove_file(self.bitmap_dir.join(file));
        }
        Ok(dropped.into_iter().map(|e| e.file.name).collect())
    }

    /// The generation of checkpoint `name`.
    pub(crate) fn generation_of(&self, name: &str) -> Result<u64, CheckpointError> {
        Ok(self.entries[self.find(name)?].file.generation)
    }

    /// The changes since checkpoint `name` (OR of its bitmap and every later one),
    /// frozen now, named `name`.
    pub(crate) fn bitmap_since(
        &self,
        name: &str,
        active: Option<&ActiveBitmap>,
    ) -> Result<DirtyBitmap, CheckpointError> {
        let idx = self.find(name)?;
        if let Some(reason) = self.problem_since(idx, active) {
            return Err(CheckpointError::Inconsistent {
                volume: self.params.volume.clone(),
                name: name.to_string(),
                reason,
            });
        }
        Ok(self.merged_since(idx, name, active))
    }

    /// OR into `out` the words `first..first + out.len()` of the changes since checkpoint
    /// `name`: what [`Chain::bitmap_since`] gives, for a window of words only.
    pub(crate) fn or_words_since(
        &self,
        name: &str,
        active: Option<&ActiveBitmap>,
        first: usize,
        out: &mut [u64],
    ) -> Result<(), CheckpointError> {
        let idx = self.find(name)?;
        if let Some(reason) = self.problem_since(idx, active) {
            return Err(CheckpointError::Inconsistent {
                volume: self.params.volume.clone(),
                name: name.to_string(),
                reason,
            });
        }
        for entry in &self.entries[idx..] {
            match (&entry.frozen, active) {
                (Some(words), _) => words.or_words_into(first, out),
                (None, Some(a)) => a.or_words_into(first, out),
                (None, None) => {}
            }
        }
        Ok(())
    }

    /// The first word at or after `from` that lies in a page allocated in any bitmap since
    /// checkpoint `name` (words before it are clean along the chain); `None` if there is
    /// none.
    pub(crate) fn next_dirty_word_since(
        &self,
        name: &str,
        active: Option<&ActiveBitmap>,
        from: usize,
    ) -> Result<Option<usize>, CheckpointError> {
        let idx = self.find(name)?;
        let page = (from / PAGE_WORDS) as u64;
        let next = self.entries[idx..]
            .iter()
            .filter_map(|entry| match (&entry.frozen, active) {
                (Some(bits), _) => bits.pages_in(page..u64::MAX).next().map(|(p, _)| p),
                (None, Some(a)) => a.next_page_from(page),
                (None, None) => None,
            })
            .min();
        Ok(next.map(|p| (p as usize * PAGE_WORDS).max(from)))
    }

    fn merged_since(&self, idx: usize, name: &str, active: Option<&ActiveBitmap>) -> DirtyBitmap {
        let mut out = DirtyBitmap::new(name, self.params.granularity, self.params.size);
        for entry in &self.entries[idx..] {
            match (&entry.frozen, active) {
                (Some(words), _) => out.merge(words),
                (None, Some(a)) => out.merge(&a.bits()),
                (None, None) => {}
            }
        }
        out
    }

    fn problem_since(&self, idx: usize, active: Option<&ActiveBitmap>) -> Option<String> {
        if let Some(p) = self.entries[idx..].iter().find_map(|e| e.problem.clone()) {
            return Some(p);
        }
        match active {
            Some(a) if a.state() == BitmapState::Inconsistent => {
                Some("the active bitmap is inconsistent".into())
            }
            _ => None,
        }
    }

    fn info(&self, idx: usize, active: Option<&ActiveBitmap>) -> CheckpointInfo {
        let e = &self.entries[idx];
        let problem = self.problem_since(idx, active);
        CheckpointInfo {
            name: e.file.name.clone(),
            generation: e.file.generation,
            created_unix: e.file.created_unix,
            changed_blocks: self.merged_since(idx, &e.file.name, active).dirty_blocks(),
            consistent: problem.is_none(),
            problem,
            confirmed: e.file.confirmed,
        }
    }

    /// The checkpoints' names, oldest first (no bitmap is merged).
    pub(crate) fn names(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.file.name.clone()).collect()
    }

    /// Every checkpoint, oldest first.
    pub(crate) fn list(&self, active: Option<&ActiveBitmap>) -> Vec<CheckpointInfo> {
        (0..self.entries.len())
            .map(|i| self.info(i, active))
            .collect()
    }

    /// Whether the latest bitmap can be trusted.
    pub(crate) fn consistent(&self, active: Option<&ActiveBitmap>) -> bool {
        self.entries.is_empty() || self.problem_since(self.entries.len() - 1, active).is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(durable: bool) -> ChainParams {
        ChainParams {
            volume: "v".into(),
            volume_uuid: Uuid::new_v4(),
            granularity: 4096,
            size: 1 << 20,
            durable,
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_name("daily-2024.01.01"));
        assert!(valid_name("a:b@c+d_e"));
        assert!(!valid_name(""));
        assert!(!valid_name("a/b"));
        assert!(!valid_name("a b"));
        assert!(!valid_name(&"x".repeat(256)));
    }

    #[test]
    fn changes_are_the_or_along_the_chain_and_survive_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let events = EventLog::default();
        let (mut chain, mut active) = Chain::load(dir.path(), params(true), &events).unwrap();
        chain.create("a", &mut active).unwrap();
        active.as_ref().unwrap().mark(0, 4096).unwrap();
        chain.create("b", &mut active).unwrap();
        active.as_ref().unwrap().mark(8192, 4096).unwrap();
        chain.create("c", &mut active).unwrap();
        active.as_ref().unwrap().mark(16384, 4096).unwrap();
        let since = |chain: &Chain, active: &Option<Arc<ActiveBitmap>>, n| {
            chain
                .bitmap_since(n, active.as_deref())
                .unwrap()
                .changed_extents()
        };
        assert_eq!(
            since(&chain, &active, "a"),
            vec![0..4096, 8192..12288, 16384..20480]
        );
        assert_eq!(since(&chain, &active, "b"), vec![8192..12288, 16384..20480]);
        chain.delete("b", &mut active).unwrap();
        assert_eq!(
            since(&chain, &active, "a"),
            vec![0..4096, 8192..12288, 16384..20480]
        );
        chain.delete("c", &mut active).unwrap();
        assert_eq!(
            since(&chain, &active, "a"),
            vec![0..4096, 8192..12288, 16384..20480]
        );
        // "a" is the active bitmap again: new writes land in it.
        active.as_ref().unwrap().mark(40960, 1).unwrap();
        assert_eq!(chain.list(active.as_deref())[0].changed_blocks, 4);
        assert!(matches!(
            chain.bitmap_since("b", active.as_deref()),
            Err(CheckpointError::NotFound { .. })
        ));
    }

    #[test]
    fn chain_reloads_with_the_same_bits_and_generations() {
        let dir = tempfile::tempdir().unwrap();
        let events = EventLog::default();
        let p = params(true);
        let (mut chain, mut active) = Chain::load(dir.path(), p.clone(), &events).unwrap();
        chain.create("a", &mut active).unwrap();
        active.as_ref().unwrap().mark(4096, 4096).unwrap();
        chain.create("b", &mut active).unwrap();
        active.as_ref().unwrap().mark(0, 1).unwrap();
        let uuid = chain.chain_uuid();
        drop((chain, active));
        let (chain, active) = Chain::load(dir.path(), p, &events).unwrap();
        assert_eq!(chain.chain_uuid(), uuid);
        assert_eq!(chain.generation(), 2);
        let list = chain.list(active.as_deref());
        assert_eq!(
            list.iter().map(|c| c.changed_blocks).collect::<Vec<_>>(),
            vec![2, 1]
        );
        assert!(list.iter().all(|c| c.consistent));
    }

    #[test]
    fn a_chain_of_flat_bitmap_files_loads_and_its_latest_turns_paged() {
        let dir = tempfile::tempdir().unwrap();
        let events = EventLog::default();
        let p = params(true);
        let (mut chain, mut active) = Chain::load(dir.path(), p.clone(), &events).unwrap();
        chain.create("a", &mut active).unwrap();
        active.as_ref().unwrap().mark(4096, 4096).unwrap();
        chain.create("b", &mut active).unwrap();
        active.as_ref().unwrap().mark(0, 1).unwrap();
        active.as_ref().unwrap().freeze().unwrap();
        drop((chain, active));
        // Rewrite every bitmap in the flat layout earlier builds wrote.
        let mut files = Vec::new();
        for entry in fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "bitmap") {
                let (header, words) = bitmap::read_bitmap_file(&path).unwrap();
                assert!(header.is_paged());
                bitmap::write_bitmap_file(&path, &header, &words).unwrap();
                assert!(!bitmap::read_bitmap_file(&path).unwrap().0.is_paged());
                files.push(path);
            }
        }
        assert_eq!(files.len(), 2);
        let (chain, active) = Chain::load(dir.path(), p, &events).unwrap();
        let list = chain.list(active.as_deref());
        assert_eq!(
            list.iter().map(|c| c.changed_blocks).collect::<Vec<_>>(),
            vec![2, 1]
        );
        assert!(list.iter().all(|c| c.consistent));
        let latest = active.as_ref().unwrap();
        assert!(bitmap::read_bitmap_file(latest.path())
            .unwrap()
            .0
            .is_paged());
        latest.mark(8192, 1).unwrap();
        assert_eq!(chain.list(Some(latest))[1].changed_blocks, 2);
    }

    /// Durable mode freezes the replaced bitmap after the pause. A crash in between
    /// leaves it InUse on disk, not the latest: the next open trusts it (every written
    /// block is in it, plus blocks marked ahead of a stream) and makes it Clean; without
    /// the crash, the late freeze writes exactly the written blocks.
    #[test]
    fn a_crash_before_the_late_freeze_keeps_every_change_of_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let events = EventLog::default();
        let p = params(true);
        let (mut chain, mut active) = Chain::load(dir.path(), p.clone(), &events).unwrap();
        chain.create("a", &mut active).unwrap();
        // A sequential stream (marks ahead on disk) and a scattered block.
        for block in 0..4 {
            active.as_ref().unwrap().mark(block * 4096, 4096).unwrap();
        }
        active.as_ref().unwrap().mark(200 * 4096, 1).unwrap();
        let written = active.as_ref().unwrap().bits().to_words();
        let mut new = chain.prepare("b").unwrap();
        chain.stage(&mut new).unwrap();
        chain.install(new, &mut active).unwrap();
        let a_file = dir.path().join(&chain.entries[0].file.bitmap_file);
        let (header, on_disk) = bitmap::read_bitmap_file(&a_file).unwrap();
        assert_eq!(
            header.state,
            BitmapState::InUse,
            "frozen only after the pause"
        );
        assert!(on_disk.iter().zip(&written).all(|(d, w)| d & w == *w));
        assert_ne!(on_disk, written, "the stream's marks ahead are on disk");
        // Crash: no late freeze.
        drop((chain, active));
        let (chain, active) = Chain::load(dir.path(), p.clone(), &events).unwrap();
        assert_eq!(chain.names(), vec!["a".to_string(), "b".to_string()]);
        let list = chain.list(active.as_deref());
        assert!(list.iter().all(|c| c.consistent));
        let since_a = chain.bitmap_since("a", active.as_deref()).unwrap();
        for block in [0u64, 1, 2, 3, 200] {
            assert!(since_a.is_dirty(block), "block {block} lost");
        }
        assert_eq!(
            bitmap::read_bitmap_file(&a_file).unwrap().0.state,
            BitmapState::Clean
        );
        // No crash: the late freeze writes exactly the written blocks, Clean.
        drop((chain, active));
        let dir = tempfile::tempdir().unwrap();
        let (mut chain, mut active) = Chain::load(dir.path(), p, &events).unwrap();
        chain.create("a", &mut active).unwrap();
        for block in 0..4 {
            active.as_ref().unwrap().mark(block * 4096, 4096).unwrap();
        }
        let written = active.as_ref().unwrap().bits().to_words();
        chain.create("b", &mut active).unwrap();
        let a_file = dir.path().join(&chain.entries[0].file.bitmap_file);
        let (header, on_disk) = bitmap::read_bitmap_file(&a_file).unwrap();
        assert_eq!(header.state, BitmapState::Clean);
        assert_eq!(on_disk, written);
    }

    /// A crash after the next chain was staged but before the pause renamed it: the old
    /// chain is what the next open reads, and the staged file and the new bitmap go.
    #[test]
    fn a_staged_chain_that_was_never_installed_is_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let events = EventLog::default();
        let p = params(true);
        let (mut chain, mut active) = Chain::load(dir.path(), p.clone(), &events).unwrap();
        chain.create("a", &mut active).unwrap();
        active.as_ref().unwrap().mark(8192, 1).unwrap();
        let mut new = chain.prepare("b").unwrap();
        chain.stage(&mut new).unwrap();
        let staged = dir.path().join(STAGED_CHAIN);
        assert!(staged.exists());
        drop((chain, active, new));
        let (chain, active) = Chain::load(dir.path(), p, &events).unwrap();
        assert_eq!(chain.names(), vec!["a".to_string()]);
        assert_eq!(chain.list(active.as_deref())[0].changed_blocks, 1);
        assert!(!staged.exists());
        let bitmaps = fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "bitmap")
            })
            .count();
        assert_eq!(bitmaps, 1, "the new checkpoint's bitmap is a stray");
    }

    #[test]
    fn fast_mode_unclean_stop_makes_the_chain_inconsistent() {
        let dir = tempfile::tempdir().unwrap();
        let events = EventLog::default();
        let p = params(false);
        let (mut chain, mut active) = Chain::load(dir.path(), p.clone(), &events).unwrap();
        chain.create("a", &mut active).unwrap();
        active.as_ref().unwrap().mark(4096, 4096).unwrap();
        // No freeze: an unclean stop.
        drop((chain, active));
        let (chain, active) = Chain::load(dir.path(), p.clone(), &events).unwrap();
        assert!(matches!(
            chain.bitmap_since("a", active.as_deref()),
            Err(CheckpointError::Inconsistent { .. })
        ));
        // And it stays so after a clean stop.
        active.as_ref().unwrap().freeze().unwrap();
        let (chain, active) = Chain::load(dir.path(), p, &events).unwrap();
        assert!(!chain.consistent(active.as_deref()));
    }
    #[test]
    fn unconfirmed_checkpoints_stay_so_across_a_reload_until_confirmed() {
        let dir = tempfile::tempdir().unwrap();
        let events = EventLog::default();
        let p = params(true);
        let (mut chain, mut active) = Chain::load(dir.path(), p.clone(), &events).unwrap();
        chain.create("a", &mut active).unwrap();
        let new = chain.prepare("b").unwrap().unconfirmed();
        assert!(!chain.install(new, &mut active).unwrap().confirmed);
        let confirmed = |chain: &Chain, active: &Option<Arc<ActiveBitmap>>| {
            chain
                .list(active.as_deref())
                .iter()
                .map(|c| c.confirmed)
                .collect::<Vec<_>>()
        };
        assert_eq!(confirmed(&chain, &active), [true, false]);
        drop((chain, active));
        let (mut chain, active) = Chain::load(dir.path(), p.clone(), &events).unwrap();
        assert_eq!(
            confirmed(&chain, &active),
            [true, false],
            "kill -9 keeps it"
        );
        chain.confirm("b").unwrap();
        drop((chain, active));
        let (chain, active) = Chain::load(dir.path(), p, &events).unwrap();
        assert_eq!(confirmed(&chain, &active), [true, true]);
    }

    #[test]
    fn a_rollback_drops_the_later_checkpoints_and_never_reuses_their_generations() {
        let dir = tempfile::tempdir().unwrap();
        let events = EventLog::default();
        let p = params(true);
        let (mut chain, mut active) = Chain::load(dir.path(), p.clone(), &events).unwrap();
        chain.create("a", &mut active).unwrap();
        active.as_ref().unwrap().mark(0, 4096).unwrap();
        chain.create("b", &mut active).unwrap();
        active.as_ref().unwrap().mark(8192, 4096).unwrap();
        chain.create("c", &mut active).unwrap();
        assert_eq!(chain.rollback_to("a", &mut active).unwrap(), ["b", "c"]);
        assert_eq!(chain.names(), ["a"]);
        assert!(chain
            .bitmap_since("a", active.as_deref())
            .unwrap()
            .changed_extents()
            .is_empty());
        // "a" is the active bitmap: new writes land in it.
        active.as_ref().unwrap().mark(16384, 1).unwrap();
        drop((chain, active));
        let (mut chain, mut active) = Chain::load(dir.path(), p, &events).unwrap();
        assert_eq!(
            chain
                .bitmap_since("a", active.as_deref())
                .unwrap()
                .changed_extents(),
            vec![16384..20480]
        );
        assert_eq!(chain.create("b", &mut active).unwrap().generation, 4);
        let bitmaps = fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".bitmap")
            })
            .count();
        assert_eq!(bitmaps, 2, "the dropped checkpoints' files are gone");
    }

    /// Every step of a delete at which an injected failure can strike.
    const DELETE_STEPS: &[&str] = &[
        "checkpoint.delete.merge",
        "checkpoint.delete.activate",
        "checkpoint.delete.persist",
        "checkpoint.delete.persisted",
    ];

    #[test]
    fn a_delete_failing_at_any_step_loses_no_change_and_can_be_retried() {
        let since = |chain: &Chain, active: &Option<Arc<ActiveBitmap>>| {
            chain
                .bitmap_since("a", active.as_deref())
                .unwrap()
                .changed_extents()
        };
        let expected = vec![0..4096, 8192..12288, 16384..20480, 32768..36864];
        for durable in [true, false] {
            for &step in DELETE_STEPS {
                for victim in ["b", "c"] {
                    let what = format!("durable={durable} step={step} victim={victim}");
                    let dir = tempfile::tempdir().unwrap();
                    let events = EventLog::default();
                    let p = params(durable);
                    let (mut chain, mut active) =
                        Chain::load(dir.path(), p.clone(), &events).unwrap();
                    chain.create("a", &mut active).unwrap();
                    active.as_ref().unwrap().mark(0, 4096).unwrap();
                    chain.create("b", &mut active).unwrap();
                    active.as_ref().unwrap().mark(8192, 4096).unwrap();
                    chain.create("c", &mut active).unwrap();
                    active.as_ref().unwrap().mark(16384, 4096).unwrap();
                    let result = {
                        let _armed = crate::failpoint::arm(step);
                        chain.delete(victim, &mut active)
                    };
                    // Writes go on after the failed (or finished) delete: they must land
                    // in a bitmap the chain names.
                    active.as_ref().unwrap().mark(32768, 4096).unwrap();
                    assert_eq!(since(&chain, &active), expected, "{what}: in process");
                    if durable {
                        // kill -9: no freeze.
                        drop((chain, active));
                    } else {
                        active.as_ref().unwrap().freeze().unwrap();
                        drop((chain, active));
                    }
                    let (mut chain, mut active) =
                        Chain::load(dir.path(), p.clone(), &events).unwrap();
                    assert!(chain.consistent(active.as_deref()), "{what}: consistent");
                    assert_eq!(since(&chain, &active), expected, "{what}: reopened");
                    match result {
                        Err(_) => chain.delete(victim, &mut active).unwrap(),
                        Ok(()) => assert!(
                            matches!(
                                chain.delete(victim, &mut active),
                                Err(CheckpointError::NotFound { .. })
                            ),
                            "{what}: deleted"
                        ),
                    }
                    active.as_ref().unwrap().mark(40960, 4096).unwrap();
                    let mut more = expected.clone();
                    more.push(40960..45056);
                    assert_eq!(since(&chain, &active), more, "{what}: after the retry");
                    assert_eq!(chain.list(active.as_deref()).len(), 2, "{what}");
                    active.as_ref().unwrap().freeze().unwrap();
                    drop((chain, active));
                    let (chain, active) = Chain::load(dir.path(), p, &events).unwrap();
                    assert_eq!(since(&chain, &active), more, "{what}: reopened after retry");
                    let bitmaps = fs::read_dir(dir.path())
                        .unwrap()
                        .filter(|e| {
                            e.as_ref()
                                .unwrap()
                                .file_name()
                                .to_string_lossy()
                                .ends_with(".bitmap")
                        })
                        .count();
                    assert_eq!(bitmaps, 2, "{what}: no stray bitmap file left");
                }
            }
        }
    }
}
