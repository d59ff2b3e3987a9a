//! Copy-on-write snapshots of a live volume and their COW store.
//!
//! A snapshot divides the volume into chunks (the volume's granularity, capped at
//! 64 KiB by default) and each chunk into blocks ([`MIN_BLOCK`], or a 32nd of a larger
//! chunk). Before a write, trim or write-zeroes touches a block whose old contents are
//! not yet preserved, the writer copies that block's current contents for the snapshot's
//! COW store (copy-before-write), then the write goes to the volume. Copies are made at
//! the write's own size: a per-chunk mask says which blocks are preserved, so a 4 KiB
//! first write reads and stores 4 KiB, not the chunk, and later writes to other blocks
//! of the chunk preserve theirs. The snapshot reads a preserved block from the store and
//! any other block from the volume itself. Only the copy's *read* precedes the volume
//! write; blocks that are holes in the volume are recorded as zero without reading or
//! copying anything.
//!
//! Where copies land in the store: the blocks of a chunk's *first* claim (one run, often
//! the only one a chunk ever gets) are appended to the store in the order their reads
//! complete, back to back (the chunk's log run), so concurrent first writes to scattered
//! chunks become one sequential store write instead of one scattered 4 KiB write each
//! (on the bench's disk those cost as much as the data writes). Blocks a chunk's later
//! claims preserve go to the chunk's slot, one chunk long, each block at its fixed place.
//!
//! The index is one [`ChunkState`] per touched chunk (24 bytes: the log run's and the
//! slot's positions and four block masks, no larger than the state of one slot and three
//! masks before it), so it grows with the chunks written, not with the blocks; old
//! contents still in memory are listed apart, only while they wait for the store.
//!
//! # Concurrency
//!
//! A block's state only moves forward: absent -> reading -> in the slot (in memory, then
//! stored) or zero (a hole in the volume); a TRIM on the snapshot export releases whole
//! chunks. The writer that claims an absent block reads its old contents into memory;
//! from then on the old contents are safe and the volume may be overwritten, while a
//! background writer moves them to the block's place in the chunk's slot (so the store
//! write is off the volume write's critical path; at most 64 MiB wait in memory or are
//! being read, a large write, TRIM or WRITE_ZEROES being preserved 1 MiB at a time).
//! Writers that find a block `reading` wait for it. Readers take blocks in the slot from
//! memory or the store, and read every other block from the volume *optimistically*,
//! checking the index afterwards: a block still absent or reading was not overwritten
//! during the read (the volume write for a block waits until its old contents are in
//! memory); a block whose old contents moved out meanwhile is taken again from memory or
//! the store.
//!
//! # COW store
//!
//! A file, by default in the volume's state directory, preallocated in steps of
//! [`PREALLOC_STEP`] up to an optional limit. Positions in it are counted in blocks
//! (32-bit: 16 TiB of store at 4 KiB blocks; past that the snapshot fails with a clear
//! error). COW data and the index need no fsync: the
//! index lives in memory and after a crash the snapshot is gone anyway (a snapshot is a
//! view for one backup, its marker turns into a "snapshot lost" event at the next open);
//! what must hold before a volume write is issued is only that the old contents of every
//! block it touches are in memory or in the store and marked so in the index. When the
//! store is full or fails, the snapshot fails (its reads return an error naming the
//! cause, an event is logged) and writes to the volume go on untouched: a backup problem
//! never becomes a volume problem. A TRIM on the snapshot export releases whole chunks:
//! their slots and log runs are punched out and their places reused, and later volume
//! writes to them skip the copy (the pattern a backup client uses to say "done with this
//! range"). A place shorter than a chunk (a log run) is reused by a log run of its length
//! or shorter (the rest stays free), so a backup that trims as it reads keeps the store's
//! end, which the COW limit bounds, where it was rather than growing it with every
//! first write.
//!
//! The background writer sorts what it has queued by store offset and writes runs in
//! one vectored O_DIRECT write each, the runs of one batch in parallel (log runs follow
//! each other, so first writes usually make one run per batch). A short gap between two
//! copies inside one slot (see `store::MAX_FILL`) is written over with zeroes when none
//! of its blocks is stored, to make one write of two. A gap block is never
//! preserved data: the runs of a batch are disjoint and a block copied later goes out in
//! a later batch, after the fill.
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
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};

use buffers::{BufPool, CopyBuf};
use store::{StoreJob, MAX_FILL};

use crate::io::IoBuf;
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

/// One bit per block of a chunk.
type Mask = u32;
/// A position in the COW store, in blocks.
type Pos = u32;
/// The smallest block preserved on its own (also the O_DIRECT alignment of the store).
pub const MIN_BLOCK: u32 = 4096;
/// `ChunkState::slot` of a chunk that has no slot yet (or no more: none of its blocks
/// is in it), and `ChunkState::log` of a chunk whose log run has no place yet.
const NO_SLOT: Pos = Pos::MAX;
/// `ChunkState::slot` of a chunk released by a TRIM on the snapshot.
const RELEASED: Pos = Pos::MAX - 1;

/// What the snapshot knows about one chunk: where its log run and its slot are and, per
/// block, whether its old contents were claimed by a writer, are in the store, or were a
/// hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ChunkState {
    /// The chunk's slot in the COW store, [`NO_SLOT`] or [`RELEASED`]: block `b` of the
    /// chunk at `slot + b`.
    slot: Pos,
    /// Where the blocks of `logged` lie in the COW store, back to back in block order, or
    /// [`NO_SLOT`] while they are read (or were holes).
    log: Pos,
    /// The blocks of the chunk's first claim: they go to the log run, every later claim
    /// to the slot.
    logged: Mask,
    /// Blocks a writer took care of: being read, in the store, or zero.
    claimed: Mask,
    /// Blocks whose old contents belong in the store (the log run or the slot): in memory
    /// (listed in `Index::pending`) on their way to the store, or stored.
    in_slot: Mask,
    /// Blocks that were holes in the volume: they read as zeroes.
    zero: Mask,
}

impl Default for ChunkState {
    fn default() -> Self {
        ChunkState {
            slot: NO_SLOT,
            log: NO_SLOT,
            logged: 0,
            claimed: 0,
            in_slot: 0,
            zero: 0,
        }
    }
}

impl ChunkState {
    fn released(&self) -> bool {
        self.slot == RELEASED
    }

    fn has_slot(&self) -> bool {
        self.slot < RELEASED
    }

    /// Blocks whose old contents are on the snapshot's side (slot or zero).
    fn held(&self) -> Mask {
        if self.released() {
            0
        } else {
            self.in_slot | self.zero
        }
    }

    /// Blocks claimed by a writer that is still reading their old contents.
    fn reading(&self) -> Mask {
        if self.released() {
            0
        } else {
            self.claimed & !(self.in_slot | self.zero)
        }
    }

    /// Where block `b`'s old contents lie in the store (it is in `in_slot`).
    fn store_pos(&self, b: u32) -> u64 {
        if self.logged & mask_of(b, 1) != 0 {
            u64::from(self.log) + u64::from((self.logged & mask_of(0, b)).count_ones())
        } else {
            u64::from(self.slot) + u64::from(b)
        }
    }
}

/// Old contents of a run of blocks of one chunk, in memory on their way to its slot.
#[derive(Debug, Clone)]
struct Pending {
    data: Arc<CopyBuf>,
    /// Where the run's first block starts in `data`.
    at: usize,
    /// Blocks in the run.
    count: u32,
    /// Where in the store (in blocks) the run's first block is being written.
    pos: u64,
}

#[derive(Debug, Default)]
struct Index {
    chunks: BTreeMap<u64, ChunkState>,
    /// Runs of old contents in memory, by (chunk, first block).
    pending: BTreeMap<(u64, u32), Pending>,
    /// Blocks per chunk.
    chunk_blocks: u32,
    /// Chunk-long places in the store given back by a TRIM, for slots and log runs.
    free_slots: Vec<Pos>,
    /// Shorter places given back (log runs), by length: `free_runs[n]` holds places of
    /// `n` blocks, for log runs of `n` blocks or fewer.
    free_runs: Vec<Vec<Pos>>,
    /// The first store block never handed out.
    next: u64,
    /// Store bytes preallocated.
    reserved: u64,
    /// Store blocks in slots and log runs.
    used_blocks: u64,
    failed: Option<String>,
    dropped: bool,
    /// Bytes of old contents held in memory, waiting for the store.
    in_flight: u64,
    /// Bytes of blocks claimed by writers that are reading their old contents (they
    /// join `in_flight` once read): with it, the memory budget counts reads under way.
    reading: u64,
}

impl Index {
    /// Whether chunk `c` still has old contents in memory for the store blocks
    /// `[pos, pos + blocks)`.
    fn pending_in(&self, c: u64, pos: Pos, blocks: u32) -> bool {
        let area = u64::from(pos)..u64::from(pos) + u64::from(blocks);
        self.pending
            .range((c, 0)..(c + 1, 0))
            .any(|(_, p)| area.contains(&p.pos))
    }

    /// Give back `blocks` store blocks from `pos` (their old contents are no longer
    /// needed, and the caller punches them out before it lets go of the index), for
    /// [`Index::reuse`].
    fn free_area(&mut self, pos: Pos, blocks: u32) {
        self.add_free(pos, blocks);
        self.used_blocks -= u64::from(blocks);
    }

    fn add_free(&mut self, pos: Pos, blocks: u32) {
        if blocks == self.chunk_blocks {
            self.free_slots.push(pos);
        } else if blocks > 0 && blocks < self.chunk_blocks {
            let n = blocks as usize;
            if self.free_runs.len() <= n {
                self.free_runs.resize_with(n + 1, Vec::new);
            }
            self.free_runs[n].push(pos);
        }
    }

    /// A place given back earlier for `blocks` store blocks: a chunk-long one for a slot
    /// or a chunk-long log run; for a shorter log run the shortest free place that holds
    /// it (a chunk-long one last), whose rest stays free.
    fn reuse(&mut self, blocks: u32) -> Option<Pos> {
        if blocks == self.chunk_blocks {
            return self.free_slots.pop();
        }
        if blocks == 0 || blocks > self.chunk_blocks {
            return None;
        }
        let from = (blocks as usize..self.free_runs.len()).find(|&n| !self.free_runs[n].is_empty());
        let (pos, len) = match from {
            Some(n) => (self.free_runs[n].pop()?, n as u32),
            None => (self.free_slots.pop()?, self.chunk_blocks),
        };
        self.add_free(pos + blocks, len - blocks);
        Some(pos)
    }

    /// After claims were undone or found holes: give chunk `c`'s slot back when none of
    /// its blocks is in it or on its way to it, and forget a chunk nobody touched.
    fn settle(&mut self, c: u64) {
        let Some(st) = self.chunks.get_mut(&c) else {
            return;
        };
        if st.has_slot() && (st.in_slot | st.reading()) & !st.logged == 0 {
            let slot = st.slot;
            st.slot = NO_SLOT;
            let blocks = self.chunk_blocks;
            self.free_area(slot, blocks);
        }
        if self.chunks.get(&c) == Some(&ChunkState::default()) {
            self.chunks.remove(&c);
        }
    }
}

/// The mask of `count` blocks from block `first`.
fn mask_of(first: u32, count: u32) -> Mask {
    let ones = Mask::MAX
        .checked_shr(Mask::BITS.saturating_sub(count))
        .unwrap_or(0);
    ones.checked_shl(first).unwrap_or(0)
}

/// The runs `(first, count)` of set bits in `mask`, lowest first.
fn runs_of(mut mask: Mask) -> impl Iterator<Item = (u32, u32)> {
    std::iter::from_fn(move || {
        if mask == 0 {
            return None;
        }
        let first = mask.trailing_zeros();
        let count = (mask >> first).trailing_ones();
        mask &= !mask_of(first, count);
        Some((first, count))
    })
}

/// What [`SnapshotInner::create`] needs.
#[derive(Debug)]
pub(crate) struct SnapshotParams {
    pub(crate) name: String,
    pub(crate) volume: String,
    pub(crate) size: u64,
    pub(crate) chunk: u32,
    pub(crate) origin: Arc<BackingFile>,
    /// The COW store and its buffers, made before the pause by [`open_store`].
    pub(crate) store: PreparedStore,
    pub(crate) store_path: PathBuf,
    pub(crate) limit: Option<u64>,
    pub(crate) bitmap: Option<DirtyBitmap>,
    pub(crate) events: Arc<EventLog>,
}

/// A new snapshot's COW store, opened empty, and its copy buffers with the background
/// writer's zeros, made before the write pause ([`open_store`]).
#[derive(Debug)]
pub(crate) struct PreparedStore {
    file: BackingFile,
    pool: Arc<BufPool>,
    zeros: IoBuf,
}

/// Open the COW store at `path` for a new snapshot, empty, and make its first buffers:
/// before the write pause, since opening and truncating a file wait for the filesystem's
/// journal, which a busy volume's writes can hold for tens of milliseconds, and a fresh
/// huge page costs milliseconds to fault in on a VM that hands free memory back to its
/// host. `fresh`: the file was just made empty, so there is nothing to truncate (a
/// truncate to the same size still changes the inode).
pub(crate) fn open_store(
    name: &str,
    path: &Path,
    fresh: bool,
) -> Result<PreparedStore, SnapshotError> {
    let io_err = |action, source| SnapshotError::Io {
        name: name.to_string(),
        action,
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| io_err("create the directory of", e))?;
    }
    let store = BackingFile::create(path).map_err(|e| io_err("create COW store", e))?;
    if !fresh {
        store
            .set_len(0)
            .map_err(|e| io_err("truncate COW store", e))?;
    }
    let pool = Arc::<BufPool>::default();
    let mut zeros = pool
        .take(MAX_FILL)
        .map_err(|e| io_err("allocate the COW buffers for", e))?;
    zeros.as_mut_slice().fill(0);
    Ok(PreparedStore {
        file: store,
        pool,
        zeros,
    })
}

/// The shared state of one snapshot (held by the volume's write path and by handles).
#[derive(Debug)]
pub(crate) struct SnapshotInner {
    name: String,
    volume: String,
    created_unix: u64,
    size: u64,
    chunk: u64,
    /// Bytes per block: [`MIN_BLOCK`], or a 32nd of a chunk larger than 32 of them.
    block: u64,
    origin: Arc<BackingFile>,
    store: BackingFile,
    store_path: PathBuf,
    limit: Option<u64>,
    bitmap: Option<DirtyBitmap>,
    index: Mutex<Index>,
    copied: Condvar,
    events: Arc<EventLog>,
    copies: AtomicU64,
    copied_bytes: AtomicU64,
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
    /// The snapshot over the store [`open_store`] opened. Called with the volume's writes
    /// paused: it touches no file.
    pub(crate) fn create(p: SnapshotParams) -> Result<(SnapshotInner, IoBuf), SnapshotError> {
        let PreparedStore {
            file: store,
            pool,
            zeros,
        } = p.store;
        let block = u64::from(p.chunk)
            .div_ceil(u64::from(Mask::BITS))
            .max(u64::from(MIN_BLOCK))
            .min(u64::from(p.chunk));
        let inner = SnapshotInner {
            name: p.name,
            volume: p.volume,
            created_unix: unix_now(),
            size: p.size,
            chunk: u64::from(p.chunk),
            block,
            origin: p.origin,
            store,
            store_path: p.store_path,
            limit: p.limit,
            bitmap: p.bitmap,
            index: Mutex::new(Index {
                chunk_blocks: (u64::from(p.chunk) / block) as u32,
                ..Index::default()
            }),
            copied: Condvar::new(),
            events: p.events,
            copies: AtomicU64::new(0),
            copied_bytes: AtomicU64::new(0),
            jobs: Mutex::new(None),
            pool,
            writer: Mutex::new(None),
        };
        Ok((inner, zeros))
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
            cow_bytes_used: idx.used_blocks * self.block,
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

    /// Runs of blocks copied into the COW store so far (a run lies in one chunk).
    pub fn copies(&self) -> u64 {
        self.inner.copies.load(Ordering::Relaxed)
    }

    /// Bytes of old contents copied into the COW store so far (what copy-before-write
    /// read and stored; the zeroes written over gaps between copies are not counted).
    pub fn copied_bytes(&self) -> u64 {
        self.inner.copied_bytes.load(Ordering::Relaxed)
    }

    /// The snapshot's state, COW usage and error.
    pub fn status(&self) -> SnapshotStatus {
        self.inner.status()
    }
}
