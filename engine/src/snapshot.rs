//! Copy-on-write snapshots of a live volume and their COW store.
//!
//! A snapshot divides the volume into chunks (the volume's granularity, capped at
//! 64 KiB by default). Before a write, trim or write-zeroes touches a chunk that is not
//! yet preserved, the writer copies the chunk's current contents into the snapshot's COW
//! store (copy-before-write) and records `chunk -> slot` in the in-memory index; then the
//! write goes to the volume. So the snapshot reads a preserved chunk from its slot and any
//! other chunk from the volume itself.
//!
//! # Concurrency
//!
//! A chunk's state only moves forward: absent -> copying -> preserved (or released by a
//! TRIM on the snapshot export). A writer that finds a chunk `copying` waits for it; the
//! volume write for a chunk is issued only after the chunk is preserved. A snapshot reader
//! therefore reads absent chunks from the volume *optimistically* and re-checks the index
//! afterwards: a chunk still absent or copying was not written during the read (its origin
//! write would have needed it preserved first); a chunk that became preserved is read again
//! from its slot, which holds the data as of the snapshot.
//!
//! # COW store
//!
//! A file, by default in the volume's state directory, preallocated in steps of
//! [`PREALLOC_STEP`] up to an optional limit. COW data need no fsync: after a crash the
//! snapshot is gone anyway (a snapshot is a view for one backup). When the store is full or
//! fails, the snapshot fails (its reads return an error naming the cause, an event is
//! logged) and writes to the volume go on untouched: a backup problem never becomes a
//! volume problem. A TRIM on the snapshot export releases whole chunks: their slots are
//! punched out and reused, and later volume writes to them skip the copy (the pattern a
//! backup client uses to say "done with this range").

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use crate::status::{unix_now, EventLevel, EventLog, SnapshotState, SnapshotStatus};
use crate::tracking::DirtyBitmap;
use crate::volume::backing::{with_bounce, BackingFile};

/// How much COW store space is reserved at a time.
pub const PREALLOC_STEP: u64 = 64 << 20;
/// The largest default chunk: bigger granularities still copy in 64 KiB chunks so a
/// small random write does not copy a megabyte.
pub const MAX_DEFAULT_CHUNK: u32 = 64 << 10;

/// Errors of snapshot operations.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The snapshot failed earlier (COW store full or failing) and can no longer be read.
    #[error("snapshot {name}: failed: {reason}")]
    Failed {
        /// The snapshot.
        name: String,
        /// Why.
        reason: String,
    },
    /// The snapshot was dropped.
    #[error("snapshot {name} was dropped")]
    Dropped {
        /// The snapshot.
        name: String,
    },
    /// Creating or reading the COW store or the volume failed.
    #[error("snapshot {name}: {action} {}: {source}", path.display())]
    Io {
        /// The snapshot.
        name: String,
        /// What was being done.
        action: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A request outside the snapshot.
    #[error("snapshot {name}: range {offset}+{len} is outside the snapshot ({size} bytes)")]
    OutOfRange {
        /// The snapshot.
        name: String,
        /// Start of the request.
        offset: u64,
        /// Its length.
        len: u64,
        /// The snapshot's size.
        size: u64,
    },
}

/// Where a snapshot keeps its COW store and how big it may grow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CowOptions {
    /// The COW store file; default `<volume dir>/snapshots/<snapshot>.cow`.
    pub path: Option<PathBuf>,
    /// Largest COW store in bytes; `None` = until the filesystem is full.
    pub limit: Option<u64>,
    /// Bytes per chunk (power of two, 4 KiB..1 MiB); default the volume's granularity
    /// capped at [`MAX_DEFAULT_CHUNK`].
    pub chunk_size: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Copying,
    Preserved(u64),
    /// The chunk was a hole in the volume: nothing to copy, it reads as zeroes.
    Zero,
    Released,
}

#[derive(Debug, Default)]
struct Index {
    chunks: BTreeMap<u64, Chunk>,
    free_slots: Vec<u64>,
    next_slot: u64,
    reserved: u64,
    used_slots: u64,
    failed: Option<String>,
    dropped: bool,
}

/// What [`SnapshotInner::create`] needs.
#[derive(Debug)]
pub(crate) struct SnapshotParams {
    pub(crate) name: String,
    pub(crate) volume: String,
    pub(crate) size: u64,
    pub(crate) chunk: u32,
    pub(crate) origin: Arc<BackingFile>,
    pub(crate) store_path: PathBuf,
    pub(crate) limit: Option<u64>,
    pub(crate) bitmap: Option<DirtyBitmap>,
    pub(crate) events: Arc<EventLog>,
}

/// The shared state of one snapshot (held by the volume's write path and by handles).
#[derive(Debug)]
pub(crate) struct SnapshotInner {
    name: String,
    volume: String,
    created_unix: u64,
    size: u64,
    chunk: u64,
    origin: Arc<BackingFile>,
    store: BackingFile,
    store_path: PathBuf,
    limit: Option<u64>,
    bitmap: Option<DirtyBitmap>,
    index: Mutex<Index>,
    copied: Condvar,
    events: Arc<EventLog>,
    copies: AtomicU64,
}

/// A read-only point-in-time view of a volume. Cheap to clone; reading stays valid until
/// the snapshot is dropped through its volume ([`crate::volume::Volume::drop_snapshot`]).
#[derive(Debug, Clone)]
pub struct Snapshot {
    inner: Arc<SnapshotInner>,
}

fn lock(m: &Mutex<Index>) -> MutexGuard<'_, Index> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SnapshotInner {
    /// Create the COW store. Called with the volume's writes paused.
    pub(crate) fn create(p: SnapshotParams) -> Result<SnapshotInner, SnapshotError> {
        let io_err = |action, source| SnapshotError::Io {
            name: p.name.clone(),
            action,
            path: p.store_path.clone(),
            source,
        };
        if let Some(dir) = p.store_path.parent() {
            fs::create_dir_all(dir).map_err(|e| io_err("create the directory of", e))?;
        }
        let store =
            BackingFile::create(&p.store_path).map_err(|e| io_err("create COW store", e))?;
        store
            .set_len(0)
            .map_err(|e| io_err("truncate COW store", e))?;
        Ok(SnapshotInner {
            name: p.name,
            volume: p.volume,
            created_unix: unix_now(),
            size: p.size,
            chunk: u64::from(p.chunk),
            origin: p.origin,
            store,
            store_path: p.store_path,
            limit: p.limit,
            bitmap: p.bitmap,
            index: Mutex::new(Index::default()),
            copied: Condvar::new(),
            events: p.events,
            copies: AtomicU64::new(0),
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    fn fail(&self, idx: &mut Index, reason: String) {
        if idx.failed.is_none() {
            self.events.push(
                EventLevel::Error,
                format!(
                    "volume {}: snapshot {} failed: {reason}; the volume is unaffected, the backup using this snapshot must be retried",
                    self.volume, self.name
                ),
            );
            idx.failed = Some(reason);
        }
        // Wake writers waiting for copies that will never complete.
        self.copied.notify_all();
    }

    /// Reserve a slot for one chunk, growing the COW store in steps.
    fn alloc_slot(&self, idx: &mut Index) -> Result<u64, String> {
        if let Some(slot) = idx.free_slots.pop() {
            idx.used_slots += 1;
            return Ok(slot);
        }
        let slot = idx.next_slot;
        let end = (slot + 1) * self.chunk;
        if let Some(limit) = self.limit {
            if end > limit {
                return Err(format!(
                    "COW store {} reached its limit of {limit} bytes; give the snapshot a larger COW limit",
                    self.store_path.display()
                ));
            }
        }
        if end > idx.reserved {
            let mut step = PREALLOC_STEP.max(self.chunk);
            if let Some(limit) = self.limit {
                step = step.min(limit - idx.reserved).max(end - idx.reserved);
            }
            match self.store.preallocate(idx.reserved, step) {
                Ok(()) => idx.reserved += step,
                Err(err) if idx.reserved < end => {
                    // A big step may not fit; try just what this chunk needs.
                    self.store
                        .preallocate(idx.reserved, end - idx.reserved)
                        .map_err(|_| {
                            format!(
                                "COW store {} is full: {err}; put it on a larger filesystem",
                                self.store_path.display()
                            )
                        })?;
                    idx.reserved = end;
                }
                Err(_) => {}
            }
        }
        idx.next_slot += 1;
        idx.used_slots += 1;
        Ok(slot)
    }

    /// Copy-before-write: preserve every chunk touched by `[offset, offset + len)`.
    /// Returns once all of them are preserved (or the snapshot failed). Never fails the
    /// caller: a COW store problem fails the snapshot, not the volume write.
    pub(crate) fn preserve(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = (offset + len).min(self.size);
        let chunks = offset / self.chunk..end.div_ceil(self.chunk);
        let mut claimed: Vec<(u64, u64)> = Vec::new();
        let mut waiting: Vec<u64> = Vec::new();
        {
            let mut idx = lock(&self.index);
            if idx.failed.is_some() || idx.dropped {
                return;
            }
            for c in chunks {
                match idx.chunks.get(&c) {
                    None => match self.alloc_slot(&mut idx) {
                        Ok(slot) => {
                            idx.chunks.insert(c, Chunk::Copying);
                            claimed.push((c, slot));
                        }
                        Err(reason) => {
                            self.fail(&mut idx, reason);
                            return;
                        }
                    },
                    Some(Chunk::Copying) => waiting.push(c),
                    Some(_) => {}
                }
            }
        }
        if !claimed.is_empty() {
            let result = self.copy_chunks(&claimed);
            let mut idx = lock(&self.index);
            match result {
                Ok(holes) => {
                    for &(c, slot) in &claimed {
                        if holes.contains(&c) {
                            idx.chunks.insert(c, Chunk::Zero);
                            idx.free_slots.push(slot);
                            idx.used_slots -= 1;
                        } else {
                            idx.chunks.insert(c, Chunk::Preserved(slot));
                        }
                    }
                    self.copies
                        .fetch_add(claimed.len() as u64, Ordering::Relaxed);
                    self.copied.notify_all();
                }
                Err(err) => self.fail(
                    &mut idx,
                    format!(
                        "copy to COW store {} failed: {err}",
                        self.store_path.display()
                    ),
                ),
            }
        }
        if !waiting.is_empty() {
            let mut idx = lock(&self.index);
            while idx.failed.is_none()
                && !idx.dropped
                && waiting
                    .iter()
                    .any(|c| idx.chunks.get(c) == Some(&Chunk::Copying))
            {
                idx = self
                    .copied
                    .wait(idx)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
    }

    /// Copy claimed chunks; runs adjacent in both the volume and the store move in one
    /// read and one write. Runs that are holes in the volume are not copied: their chunks
    /// are returned, to be recorded as zero.
    fn copy_chunks(&self, claimed: &[(u64, u64)]) -> io::Result<Vec<u64>> {
        let mut holes = Vec::new();
        let mut i = 0;
        while i < claimed.len() {
            let mut j = i + 1;
            while j < claimed.len()
                && claimed[j].0 == claimed[j - 1].0 + 1
                && claimed[j].1 == claimed[j - 1].1 + 1
            {
                j += 1;
            }
            let (first_chunk, first_slot) = claimed[i];
            let start = first_chunk * self.chunk;
            let end = ((claimed[j - 1].0 + 1) * self.chunk).min(self.size);
            let len = (end - start) as usize;
            if let Some(runs) = self.origin.allocation(start, end - start) {
                if runs.iter().all(|&(_, _, data)| !data) {
                    holes.extend(claimed[i..j].iter().map(|&(c, _)| c));
                    i = j;
                    continue;
                }
            }
            with_bounce(len, |buf| {
                self.origin.read_at(start, buf)?;
                self.store.write_at(first_slot * self.chunk, buf)
            })?;
            i = j;
        }
        Ok(holes)
    }

    fn check_readable(&self, idx: &Index) -> Result<(), SnapshotError> {
        if idx.dropped {
            return Err(SnapshotError::Dropped {
                name: self.name.clone(),
            });
        }
        if let Some(reason) = &idx.failed {
            return Err(SnapshotError::Failed {
                name: self.name.clone(),
                reason: reason.clone(),
            });
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), SnapshotError> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(SnapshotError::OutOfRange {
                name: self.name.clone(),
                offset,
                len,
                size: self.size,
            });
        }
        Ok(())
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), SnapshotError> {
        self.check_range(offset, buf.len() as u64)?;
        let io_err = |action, path: &Path, source| SnapshotError::Io {
            name: self.name.clone(),
            action,
            path: path.to_path_buf(),
            source,
        };
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let c = pos / self.chunk;
            let state = {
                let idx = lock(&self.index);
                self.check_readable(&idx)?;
                idx.chunks.get(&c).copied()
            };
            let at = (pos - offset) as usize;
            if let Some(Chunk::Zero) = state {
                let chunk_end = ((c + 1) * self.chunk).min(end);
                buf[at..at + (chunk_end - pos) as usize].fill(0);
                pos = chunk_end;
                continue;
            }
            if let Some(Chunk::Preserved(slot)) = state {
                let chunk_end = ((c + 1) * self.chunk).min(end);
                let part = &mut buf[at..at + (chunk_end - pos) as usize];
                self.store
                    .read_at(slot * self.chunk + (pos - c * self.chunk), part)
                    .map_err(|e| io_err("read COW store", &self.store_path, e))?;
                pos = chunk_end;
                continue;
            }
            // A run of chunks not preserved: read them from the volume in one go.
            let run_end = {
                let idx = lock(&self.index);
                let next_preserved = idx
                    .chunks
                    .range(c + 1..)
                    .find(|(_, s)| matches!(s, Chunk::Preserved(_) | Chunk::Zero))
                    .map_or(u64::MAX, |(k, _)| *k);
                (next_preserved.saturating_mul(self.chunk)).min(end)
            };
            let part = &mut buf[at..at + (run_end - pos) as usize];
            self.origin
                .read_at(pos, part)
                .map_err(|e| io_err("read volume", self.origin.path(), e))?;
            // Validate: chunks preserved meanwhile may have been overwritten under us.
            let changed: Vec<(u64, Chunk)> = {
                let idx = lock(&self.index);
                self.check_readable(&idx)?;
                idx.chunks
                    .range(c..run_end.div_ceil(self.chunk))
                    .filter(|(_, s)| matches!(s, Chunk::Preserved(_) | Chunk::Zero))
                    .map(|(&k, &s)| (k, s))
                    .collect()
            };
            for (k, state) in changed {
                let from = (k * self.chunk).max(pos);
                let to = ((k + 1) * self.chunk).min(run_end);
                let sub = &mut buf[(from - offset) as usize..(to - offset) as usize];
                match state {
                    Chunk::Preserved(slot) => self
                        .store
                        .read_at(slot * self.chunk + (from - k * self.chunk), sub)
                        .map_err(|e| io_err("read COW store", &self.store_path, e))?,
                    _ => sub.fill(0),
                }
            }
            pos = run_end;
        }
        Ok(())
    }

    /// TRIM on the snapshot: release whole chunks inside the range.
    fn release(&self, offset: u64, len: u64) -> Result<(), SnapshotError> {
        self.check_range(offset, len)?;
        let first = offset.div_ceil(self.chunk);
        let end = offset + len;
        // The last chunk may be partial at the end of the volume.
        let last = if end == self.size {
            end.div_ceil(self.chunk)
        } else {
            end / self.chunk
        };
        let mut idx = lock(&self.index);
        self.check_readable(&idx)?;
        let mut punch = Vec::new();
        for c in first..last {
            match idx.chunks.get(&c).copied() {
                Some(Chunk::Preserved(slot)) => {
                    idx.chunks.insert(c, Chunk::Released);
                    idx.free_slots.push(slot);
                    idx.used_slots -= 1;
                    punch.push(slot);
                }
                None => {
                    idx.chunks.insert(c, Chunk::Released);
                }
                Some(Chunk::Zero) => {
                    idx.chunks.insert(c, Chunk::Released);
                }
                Some(Chunk::Copying) | Some(Chunk::Released) => {}
            }
        }
        // Punching under the lock keeps a freed slot from being reused before it is
        // punched (a reuse would otherwise lose its fresh copy to our punch).
        for slot in punch {
            if let Err(err) = self.store.discard(slot * self.chunk, self.chunk) {
                // Space is not returned, but the data is still correct.
                tracing::debug!("snapshot {}: punching COW slot {slot}: {err}", self.name);
            }
        }
        Ok(())
    }

    /// Allocation of `[offset, offset + len)` as `(length, is_hole)` runs.
    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, SnapshotError> {
        let end = offset.saturating_add(len).min(self.size);
        let Some(runs) = self.origin.allocation(offset, end - offset) else {
            return Ok(vec![(end - offset, false)]);
        };
        let idx = lock(&self.index);
        self.check_readable(&idx)?;
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut push = |len: u64, hole: bool| match out.last_mut() {
            Some((l, h)) if *h == hole => *l += len,
            _ if len > 0 => out.push((len, hole)),
            _ => {}
        };
        // The volume's allocation now, overlaid with what the snapshot knows better:
        // chunks copied before being overwritten are data, chunks that were holes when
        // first written are holes.
        for (start, stop, data) in runs {
            let mut pos = start;
            for (&k, s) in idx
                .chunks
                .range(start / self.chunk..stop.div_ceil(self.chunk))
            {
                let hole = match s {
                    Chunk::Preserved(_) | Chunk::Copying => false,
                    Chunk::Zero => true,
                    Chunk::Released => continue,
                };
                let from = (k * self.chunk).max(pos);
                let to = ((k + 1) * self.chunk).min(stop);
                push(from - pos, !data);
                push(to - from, hole);
                pos = to;
            }
            push(stop - pos, !data);
        }
        Ok(out)
    }

    /// Mark dropped and delete the COW store. Called with the volume's writes paused.
    pub(crate) fn drop_store(&self) {
        lock(&self.index).dropped = true;
        self.copied.notify_all();
        if let Err(err) = fs::remove_file(&self.store_path) {
            if err.kind() != io::ErrorKind::NotFound {
                self.events.push(
                    EventLevel::Warning,
                    format!(
                        "snapshot {}: cannot delete COW store {}: {err}",
                        self.name,
                        self.store_path.display()
                    ),
                );
            }
        }
    }

    pub(crate) fn status(&self) -> SnapshotStatus {
        let idx = lock(&self.index);
        let state = if idx.dropped {
            SnapshotState::Dropped
        } else if idx.failed.is_some() {
            SnapshotState::Failed
        } else {
            SnapshotState::Active
        };
        SnapshotStatus {
            name: self.name.clone(),
            created_unix: self.created_unix,
            state,
            cow_path: self.store_path.clone(),
            cow_bytes_used: idx.used_slots * self.chunk,
            cow_limit: self.limit,
            chunk_size: self.chunk as u32,
            dirty_bitmap: self.bitmap.as_ref().map(|b| b.name().to_string()),
            error: idx.failed.clone(),
        }
    }
}

impl Snapshot {
    pub(crate) fn new(inner: Arc<SnapshotInner>) -> Snapshot {
        Snapshot { inner }
    }

    /// The snapshot's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The volume it was taken of.
    pub fn volume(&self) -> &str {
        &self.inner.volume
    }

    /// Size in bytes (the volume's size).
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// Bytes per COW chunk.
    pub fn chunk_size(&self) -> u32 {
        self.inner.chunk as u32
    }

    /// The dirty bitmap frozen with the snapshot, if the backup asked for one.
    pub fn dirty_bitmap(&self) -> Option<&DirtyBitmap> {
        self.inner.bitmap.as_ref()
    }

    /// Fill `buf` with the snapshot's bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), SnapshotError> {
        self.inner.read(offset, buf)
    }

    /// Release the COW space of whole chunks in `[offset, offset + len)`: the backup
    /// client is done with them (their contents become unspecified).
    pub fn release(&self, offset: u64, len: u64) -> Result<(), SnapshotError> {
        self.inner.release(offset, len)
    }

    /// `(length, is_hole)` runs describing `[offset, offset + len)`.
    pub fn allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, SnapshotError> {
        self.inner.allocation(offset, len)
    }

    /// Chunks copied into the COW store so far.
    pub fn copies(&self) -> u64 {
        self.inner.copies.load(Ordering::Relaxed)
    }

    /// The snapshot's state, COW usage and error.
    pub fn status(&self) -> SnapshotStatus {
        self.inner.status()
    }
}
