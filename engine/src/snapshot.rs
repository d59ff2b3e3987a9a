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
//! volume write's critical path; at most 64 MiB wait in memory; copies queued meanwhile
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

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};

use crate::io::{BufPool as PagePool, IoBuf};
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

/// Old contents of a run of chunks, read from the volume, on their way to the store.
/// Its buffer goes back to the snapshot's pool when the last reference is dropped.
#[derive(Debug)]
struct CopyBuf {
    /// Always `Some` until dropped (then back to the pool); its range is the copied bytes.
    buf: Option<IoBuf>,
    pool: Arc<BufPool>,
}

impl CopyBuf {
    fn bytes(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], IoBuf::as_slice)
    }

    fn len(&self) -> u64 {
        self.bytes().len() as u64
    }
}

impl Drop for CopyBuf {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.pool.put(buf);
        }
    }
}

/// Copy buffers kept for reuse: fresh memory costs a page fault per page, which a
/// stream of 64 KiB copies pays over and over. Buffers are the I/O engine's aligned,
/// mmap'd memory, made [`SLAB`] bytes at a time (one buffer of a larger size), so that
/// they sit in transparent huge pages: a run of old chunks then reaches the disk as one
/// segment instead of one per 4 KiB page (on a virtio disk without indirect descriptors a
/// 1 MiB read in 4 KiB pages fills the whole queue; see `io::Pages`).
#[derive(Debug, Default)]
struct BufPool {
    free: Mutex<FreeBufs>,
}

#[derive(Debug, Default)]
struct FreeBufs {
    bufs: Vec<IoBuf>,
    /// Capacity of `bufs`, summed (kept here: `put` runs for every copy).
    bytes: usize,
}

impl FreeBufs {
    /// Keep `buf` unless that would hold more than [`MAX_POOLED`] bytes; say whether it did.
    fn keep(&mut self, buf: IoBuf) -> bool {
        if self.bytes + buf.capacity() > MAX_POOLED {
            return false;
        }
        self.bytes += buf.capacity();
        self.bufs.push(buf);
        true
    }
}

impl BufPool {
    /// A buffer of at least `len` aligned bytes (the smallest fitting one kept), its range
    /// set to `len` bytes.
    fn take(&self, len: usize) -> io::Result<IoBuf> {
        let mut free = lock(&self.free);
        let best = free
            .bufs
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        let mut buf = match best {
            Some(i) => {
                let buf = free.bufs.swap_remove(i);
                free.bytes -= buf.capacity();
                buf
            }
            None => {
                let size = len.next_power_of_two();
                let slab = PagePool::new(size, (SLAB / size).max(1))
                    .map_err(|err| io::Error::other(err.to_string()))?;
                let buf = slab
                    .take()
                    .ok_or_else(|| io::Error::other("a new buffer slab had no buffer"))?;
                // The rest of the slab waits in the free list (or, above MAX_POOLED, unused
                // in the slab until its last buffer is dropped).
                while let Some(spare) = slab.take() {
                    if !free.keep(spare) {
                        break;
                    }
                }
                buf
            }
        };
        buf.set_len(len);
        Ok(buf)
    }

    fn put(&self, buf: IoBuf) {
        lock(&self.free).keep(buf);
    }
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
}

/// One background store write: a run of chunks read together.
#[derive(Debug)]
struct StoreJob {
    data: Arc<CopyBuf>,
    first_slot: u64,
    chunks: Vec<u64>,
}

/// Old contents held in memory at most (writers wait above this).
const MAX_IN_FLIGHT: u64 = 64 << 20;
/// Bytes of copy buffers kept for reuse per snapshot.
const MAX_POOLED: usize = 16 << 20;
/// Copy buffers are made this many bytes at a time: one transparent huge page.
const SLAB: usize = 2 << 20;
/// Jobs the background writer takes at once...
const MAX_BATCH_JOBS: usize = 1024;
/// ...and the most bytes it writes in one call.
const MAX_STORE_WRITE: u64 = 8 << 20;

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

    /// Start the background writer that moves old contents from memory to the store.
    pub(crate) fn start(self: &Arc<Self>) -> Result<(), SnapshotError> {
        let (tx, rx) = mpsc::channel::<StoreJob>();
        let weak: Weak<SnapshotInner> = Arc::downgrade(self);
        let handle = std::thread::Builder::new()
            .name(format!("cow-{}", self.name))
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    // Everything queued meanwhile goes out together: slots are handed out
                    // in order, so concurrent copies usually land back to back.
                    let mut jobs = vec![first];
                    while jobs.len() < MAX_BATCH_JOBS {
                        match rx.try_recv() {
                            Ok(job) => jobs.push(job),
                            Err(_) => break,
                        }
                    }
                    let Some(inner) = weak.upgrade() else { return };
                    inner.finish_jobs(jobs);
                }
            })
            .map_err(|source| SnapshotError::Io {
                name: self.name.clone(),
                action: "start the COW writer for",
                path: self.store_path.clone(),
                source,
            })?;
        *lock(&self.jobs) = Some(tx);
        *lock(&self.writer) = Some(handle);
        Ok(())
    }

    /// The background writer's work: store the runs of a batch (jobs whose slots follow
    /// each other go out in one vectored write), then mark their chunks preserved.
    fn finish_jobs(&self, mut jobs: Vec<StoreJob>) {
        jobs.sort_by_key(|j| j.first_slot);
        let mut i = 0;
        while i < jobs.len() {
            let mut j = i + 1;
            let mut bytes = jobs[i].data.len();
            while j < jobs.len()
                && jobs[j].first_slot == jobs[j - 1].first_slot + jobs[j - 1].chunks.len() as u64
                && bytes + jobs[j].data.len() <= MAX_STORE_WRITE
            {
                bytes += jobs[j].data.len();
                j += 1;
            }
            let group = &jobs[i..j];
            let bufs: Vec<&[u8]> = group.iter().map(|job| job.data.bytes()).collect();
            let result = self
                .store
                .write_vectored_at(group[0].first_slot * self.chunk, &bufs);
            self.finish_group(group, result);
            i = j;
        }
    }

    /// Record the outcome of one store write covering `group`.
    fn finish_group(&self, group: &[StoreJob], result: io::Result<()>) {
        let mut idx = lock(&self.index);
        for job in group {
            idx.in_flight -= job.data.len();
        }
        match result {
            Ok(()) => {
                for job in group {
                    for (i, &c) in job.chunks.iter().enumerate() {
                        let slot = job.first_slot + i as u64;
                        match idx.chunks.get(&c) {
                            Some(Chunk::InMemory { slot: s, .. }) if *s == slot => {
                                idx.chunks.insert(c, Chunk::Preserved(slot));
                            }
                            // Released by a TRIM meanwhile: its slot is free again.
                            _ => {
                                idx.free_slots.push(slot);
                                idx.used_slots -= 1;
                            }
                        }
                    }
                    self.copies
                        .fetch_add(job.chunks.len() as u64, Ordering::Relaxed);
                }
            }
            Err(err) => {
                let reason = format!(
                    "write to COW store {} failed: {err}",
                    self.store_path.display()
                );
                self.fail(&mut idx, reason);
            }
        }
        self.copied.notify_all();
    }

    /// Copy-before-write: preserve every chunk touched by `[offset, offset + len)`.
    /// Returns once the old contents of all of them are safe (in memory on their way to
    /// the store, or in the store), or the snapshot failed. Never fails the caller: a COW
    /// store problem fails the snapshot, not the volume write.
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
            // Bound the memory held by old contents in flight.
            while idx.in_flight > MAX_IN_FLIGHT && idx.failed.is_none() && !idx.dropped {
                idx = self
                    .copied
                    .wait(idx)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if idx.failed.is_some() || idx.dropped {
                return;
            }
            for c in chunks {
                match idx.chunks.get(&c) {
                    None => match self.alloc_slot(&mut idx) {
                        Ok(slot) => {
                            idx.chunks.insert(c, Chunk::Reading);
                            claimed.push((c, slot));
                        }
                        Err(reason) => {
                            // Undo this call's claims so nobody waits for them.
                            for (c, _) in claimed {
                                idx.chunks.remove(&c);
                            }
                            self.fail(&mut idx, reason);
                            return;
                        }
                    },
                    Some(Chunk::Reading) => waiting.push(c),
                    Some(_) => {}
                }
            }
        }
        if !claimed.is_empty() {
            self.copy_chunks(&claimed);
        }
        if !waiting.is_empty() {
            let mut idx = lock(&self.index);
            while idx.failed.is_none()
                && !idx.dropped
                && waiting
                    .iter()
                    .any(|c| matches!(idx.chunks.get(c), Some(Chunk::Reading)))
            {
                idx = self
                    .copied
                    .wait(idx)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
    }

    /// Read the old contents of claimed chunks and hand them to the background writer;
    /// runs adjacent in both the volume and the store move in one read and one write.
    /// Runs that are holes in the volume are recorded as zero, not copied.
    fn copy_chunks(&self, claimed: &[(u64, u64)]) {
        let mut i = 0;
        while i < claimed.len() {
            let mut j = i + 1;
            while j < claimed.len()
                && claimed[j].0 == claimed[j - 1].0 + 1
                && claimed[j].1 == claimed[j - 1].1 + 1
            {
                j += 1;
            }
            let run = &claimed[i..j];
            i = j;
            let (first_chunk, first_slot) = run[0];
            let start = first_chunk * self.chunk;
            let end = ((run[run.len() - 1].0 + 1) * self.chunk).min(self.size);
            let len = (end - start) as usize;
            let hole = self
                .origin
                .allocation(start, end - start)
                .is_some_and(|runs| runs.iter().all(|&(_, _, data)| !data));
            if hole {
                let mut idx = lock(&self.index);
                for &(c, slot) in run {
                    idx.chunks.insert(c, Chunk::Zero);
                    idx.free_slots.push(slot);
                    idx.used_slots -= 1;
                }
                self.copied.notify_all();
                continue;
            }
            let read = self
                .pool
                .take(len)
                .and_then(|mut buf| self.origin.read_at(start, buf.as_mut_slice()).map(|()| buf));
            let mut idx = lock(&self.index);
            let buf = match read {
                Ok(buf) => buf,
                Err(err) => {
                    for &(c, _) in run {
                        idx.chunks.remove(&c);
                    }
                    let reason = format!("reading the volume for copy-before-write failed: {err}");
                    self.fail(&mut idx, reason);
                    return;
                }
            };
            let data = Arc::new(CopyBuf {
                buf: Some(buf),
                pool: self.pool.clone(),
            });
            for (k, &(c, slot)) in run.iter().enumerate() {
                let at = k * self.chunk as usize;
                idx.chunks.insert(
                    c,
                    Chunk::InMemory {
                        data: data.clone(),
                        at,
                        slot,
                    },
                );
            }
            idx.in_flight += len as u64;
            self.copied.notify_all();
            let job = StoreJob {
                data,
                first_slot,
                chunks: run.iter().map(|&(c, _)| c).collect(),
            };
            let sent = lock(&self.jobs)
                .as_ref()
                .is_some_and(|tx| tx.send(job).is_ok());
            if !sent {
                self.fail(&mut idx, "the COW writer stopped".to_string());
                return;
            }
        }
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

    /// Fill `out`, the bytes at `pos` inside chunk `c`, from a state that holds the
    /// chunk's old contents; `false` when the state says "read the volume".
    fn fill_from(
        &self,
        c: u64,
        pos: u64,
        state: &Chunk,
        out: &mut [u8],
    ) -> Result<bool, SnapshotError> {
        let within = (pos - c * self.chunk) as usize;
        match state {
            Chunk::Zero => out.fill(0),
            Chunk::Preserved(slot) => self
                .store
                .read_at(slot * self.chunk + within as u64, out)
                .map_err(|source| SnapshotError::Io {
                    name: self.name.clone(),
                    action: "read COW store",
                    path: self.store_path.clone(),
                    source,
                })?,
            Chunk::InMemory { data, at, .. } => {
                out.copy_from_slice(&data.bytes()[at + within..at + within + out.len()])
            }
            Chunk::Reading | Chunk::Released => return Ok(false),
        }
        Ok(true)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), SnapshotError> {
        self.check_range(offset, buf.len() as u64)?;
        let holds_old = |s: &Chunk| {
            matches!(
                s,
                Chunk::Preserved(_) | Chunk::Zero | Chunk::InMemory { .. }
            )
        };
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let c = pos / self.chunk;
            let chunk_end = ((c + 1) * self.chunk).min(end);
            let (state, run_end) = {
                let idx = lock(&self.index);
                self.check_readable(&idx)?;
                let next_old = idx
                    .chunks
                    .range(c + 1..)
                    .find(|(_, s)| holds_old(s))
                    .map_or(u64::MAX, |(k, _)| *k);
                (
                    idx.chunks.get(&c).cloned(),
                    next_old.saturating_mul(self.chunk).min(end),
                )
            };
            let at = (pos - offset) as usize;
            if let Some(state) = state {
                if self.fill_from(
                    c,
                    pos,
                    &state,
                    &mut buf[at..at + (chunk_end - pos) as usize],
                )? {
                    pos = chunk_end;
                    continue;
                }
            }
            // A run of chunks whose old contents are still in the volume: read them in one
            // go, then take again from the index any chunk whose old contents moved out
            // meanwhile (the volume may have been overwritten under our read).
            self.origin
                .read_at(pos, &mut buf[at..at + (run_end - pos) as usize])
                .map_err(|source| SnapshotError::Io {
                    name: self.name.clone(),
                    action: "read volume",
                    path: self.origin.path().to_path_buf(),
                    source,
                })?;
            let moved: Vec<(u64, Chunk)> = {
                let idx = lock(&self.index);
                self.check_readable(&idx)?;
                idx.chunks
                    .range(c..run_end.div_ceil(self.chunk))
                    .filter(|(_, s)| holds_old(s))
                    .map(|(&k, s)| (k, s.clone()))
                    .collect()
            };
            for (k, state) in moved {
                let from = (k * self.chunk).max(pos);
                let to = ((k + 1) * self.chunk).min(run_end);
                self.fill_from(
                    k,
                    from,
                    &state,
                    &mut buf[(from - offset) as usize..(to - offset) as usize],
                )?;
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
            match idx.chunks.get(&c).cloned() {
                Some(Chunk::Preserved(slot)) => {
                    idx.chunks.insert(c, Chunk::Released);
                    idx.free_slots.push(slot);
                    idx.used_slots -= 1;
                    punch.push(slot);
                }
                None => {
                    idx.chunks.insert(c, Chunk::Released);
                }
                // Its slot is freed when the background write completes.
                Some(Chunk::Zero) | Some(Chunk::InMemory { .. }) => {
                    idx.chunks.insert(c, Chunk::Released);
                }
                Some(Chunk::Reading) | Some(Chunk::Released) => {}
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
                    Chunk::Preserved(_) | Chunk::Reading | Chunk::InMemory { .. } => false,
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
        self.inner.allocation(offset, len)
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
