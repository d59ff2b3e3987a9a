//! Copy-on-write snapshots of a live volume and their COW store.
//!
//! A snapshot divides the volume into chunks (the volume's granularity, capped at
//! 64 KiB by default). Before a write, trim or write-zeroes touches a chunk that is not
//! yet preserved, the writer copies the chunk's current contents for the snapshot's COW
//! store (copy-before-write) and records `chunk -> slot` in the in-memory index; then the
//! write goes to the volume. So the snapshot reads a preserved chunk from its slot and any
//! other chunk from the volume itself. Only the copy's *read* precedes the volume write;
//! a write covering whole chunks needs no merge, and chunks that are holes in the volume
//! are recorded as zero without reading or copying anything.
//!
//! # Concurrency
//!
//! A chunk's state only moves forward: absent -> reading -> in memory -> preserved (or
//! zero when it was a hole in the volume; or released by a TRIM on the snapshot export).
//! The writer that claims an absent chunk reads its old contents into memory; from then
//! on the old contents are safe and the volume may be overwritten, while a background
//! writer moves them to the chunk's slot in the COW store (so the store write is off the
//! volume write's critical path; at most 64 MiB wait in memory or are being read, a large
//! write, TRIM or WRITE_ZEROES being preserved 1 MiB at a time; copies queued meanwhile
//! whose slots follow each other go out in one vectored O_DIRECT write). Writers that find a
//! chunk `reading` wait for it. Readers take in-memory and preserved chunks from memory or
//! the store, and read every other chunk from the volume *optimistically*, checking the
//! index afterwards: a chunk still absent or reading was not overwritten during the read
//! (the volume write for a chunk waits until its old contents are in memory); a chunk
//! whose old contents moved out meanwhile is taken again from memory or the store.
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
//!
//! # Files
//!
//! This file holds the types, creation, status and dropping; `cow` is copy-before-write
//! (the volume's side), `store` the COW store and its background writer, `read` the
//! snapshot's read path, `buffers` the copy buffers.

mod buffers;
mod cow;
mod read;
mod store;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};

use buffers::{BufPool, CopyBuf};
use store::StoreJob;

use crate::status::{unix_now, EventLevel, EventLog, SnapshotState, SnapshotStatus};
use crate::tracking::DirtyBitmap;
use crate::volume::backing::BackingFile;

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
    #[error("snapshot {name}: {action} {}", path.display())]
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

#[derive(Debug, Clone)]
enum Chunk {
    /// Claimed by a writer that is reading its old contents; other writers wait.
    Reading,
    /// Old contents are in memory at `data[at..]`, being written to `slot`; the volume
    /// may already be overwritten, so readers take the data from memory.
    InMemory {
        data: Arc<CopyBuf>,
        at: usize,
        slot: u64,
    },
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
    /// Bytes of old contents held in memory, waiting for the store.
    in_flight: u64,
    /// Bytes of chunks claimed by writers that are reading their old contents (they
    /// join `in_flight` once read): with it, the memory budget counts reads under way.
    reading: u64,
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
    jobs: Mutex<Option<mpsc::Sender<StoreJob>>>,
    pool: Arc<BufPool>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A read-only point-in-time view of a volume. Cheap to clone; reading stays valid until
/// the snapshot is dropped through its volume ([`crate::volume::Volume::drop_snapshot`]).
#[derive(Debug, Clone)]
pub struct Snapshot {
    inner: Arc<SnapshotInner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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
            jobs: Mutex::new(None),
            pool: Arc::default(),
            writer: Mutex::new(None),
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

    /// Wait until every old content in memory has reached the store.
    pub(crate) fn wait_idle(&self) {
        let mut idx = lock(&self.index);
        while idx.in_flight > 0 && idx.failed.is_none() && !idx.dropped {
            idx = self
                .copied
                .wait(idx)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Mark dropped, stop the background writer and delete the COW store. Called with
    /// the volume's writes paused.
    pub(crate) fn drop_store(&self) {
        lock(&self.index).dropped = true;
        self.copied.notify_all();
        drop(lock(&self.jobs).take());
        if let Some(writer) = lock(&self.writer).take() {
            if writer.thread().id() != std::thread::current().id() {
                let _ = writer.join();
            }
        }
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
        self.inner.allocation(offset, len, usize::MAX)
    }

    /// At most `max_runs` `(length, is_hole)` runs from `offset` on, within
    /// `[offset, offset + len)`: the work stops at the cap (what NBD BLOCK_STATUS needs),
    /// and the COW index lock is held only to copy a window of entries.
    pub fn allocation_capped(
        &self,
        offset: u64,
        len: u64,
        max_runs: usize,
    ) -> Result<Vec<(u64, bool)>, SnapshotError> {
        self.inner.allocation(offset, len, max_runs)
    }

    /// Wait until the old contents copied so far are all in the COW store (they are
    /// readable before that, from memory).
    pub fn wait_idle(&self) {
        self.inner.wait_idle()
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
