//! Storing a point's chunks: a few worker threads hash, deduplicate (against every chunk
//! the repository holds and every chunk of this run), compress and pack chunks, each worker
//! filling its own pack and uploading it (pack, then its index, both create-only) when it
//! reaches [`PACK_TARGET`]. Memory stays bounded: a queue of `workers` chunks plus one pack
//! per worker. The caller writes the point index only after [`PointWriter::finish`].

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::format::{
    find_zero_runs, is_zero, ChunkId, ChunkRef, PackEntry, PackIndex, ZeroRun, PACK_MAGIC,
};
use crate::{pack_path, RepoError, Repository, Result, PACK_TARGET};

/// zstd level of chunks: level 1 keeps up with a disk on two cores.
pub const ZSTD_LEVEL: i32 = 1;

/// What a queued chunk becomes: a point's chunk slot, or the piece with a caller's number.
#[derive(Debug, Clone, Copy)]
enum Target {
    Slot(u64),
    Piece(usize),
}

struct Job {
    target: Target,
    data: Vec<u8>,
}

struct Shared {
    repo: Repository,
    handle: tokio::runtime::Handle,
    known: Mutex<HashSet<ChunkId>>,
    results: Mutex<Vec<Option<ChunkRef>>>,
    /// Zero runs of the slots' data chunks, in no order.
    zero_runs: Mutex<Vec<ZeroRun>>,
    pieces: Mutex<HashMap<usize, ChunkRef>>,
    new_bytes: AtomicU64,
    new_chunks: AtomicU64,
    failure: Mutex<Option<String>>,
}

/// The chunk list a finished writer produced.
#[derive(Debug, Clone)]
pub struct Written {
    pub chunks: Vec<ChunkRef>,
    /// The zero runs of the slots' data chunks (found in the bytes queued with
    /// [`PointWriter::put`], or given to [`PointWriter::set`]), by slot and offset.
    pub zero_runs: Vec<ZeroRun>,
    /// The chunk of each piece queued with [`PointWriter::put_piece`], by its number.
    pub pieces: HashMap<usize, ChunkRef>,
    /// Compressed bytes of new chunks (pack bytes uploaded).
    pub new_bytes: u64,
    pub new_chunks: u64,
}

/// Stores chunks of one point in parallel.
pub struct PointWriter {
    tx: Option<SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for PointWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PointWriter({} workers)", self.workers.len())
    }
}

impl PointWriter {
    /// A writer for a point of `chunk_count` chunks; `known` holds every chunk already in
    /// the repository. Uploads run on `handle`'s runtime, driven from the worker threads.
    pub fn start(
        repo: &Repository,
        handle: tokio::runtime::Handle,
        known: HashSet<ChunkId>,
        chunk_count: u64,
        workers: usize,
    ) -> PointWriter {
        let workers = workers.max(1);
        let shared = Arc::new(Shared {
            repo: repo.clone(),
            handle,
            known: Mutex::new(known),
            results: Mutex::new(vec![None; chunk_count as usize]),
            zero_runs: Mutex::default(),
            pieces: Mutex::default(),
            new_bytes: AtomicU64::new(0),
            new_chunks: AtomicU64::new(0),
            failure: Mutex::new(None),
        });
        let (tx, rx) = sync_channel::<Job>(workers);
        let rx = Arc::new(Mutex::new(rx));
        let handles = (0..workers)
            .map(|i| {
                let shared = Arc::clone(&shared);
                let rx = Arc::clone(&rx);
                std::thread::Builder::new()
                    .name(format!("repo-pack-{i}"))
                    .spawn(move || worker(&shared, &rx))
                    .expect("spawning a pack worker thread")
            })
            .collect();
        PointWriter {
            tx: Some(tx),
            workers: handles,
            shared,
        }
    }

    fn failure(&self) -> Option<String> {
        self.shared.failure.lock().ok().and_then(|f| f.clone())
    }

    /// Queue chunk `index` with its plaintext (blocks while the queue is full).
    pub fn put(&self, index: u64, data: Vec<u8>) -> Result<()> {
        self.send(Target::Slot(index), data)
    }

    /// Queue the plaintext of a piece, numbered `number` by the caller (its chunk is
    /// [`Written::pieces`]`[number]`).
    pub fn put_piece(&self, number: usize, data: Vec<u8>) -> Result<()> {
        self.send(Target::Piece(number), data)
    }

    fn send(&self, target: Target, data: Vec<u8>) -> Result<()> {
        if let Some(why) = self.failure() {
            return Err(RepoError::Invalid(why));
        }
        let sent = self.tx.as_ref().map(|tx| tx.send(Job { target, data }));
        match sent {
            Some(Ok(())) => Ok(()),
            _ => Err(RepoError::Invalid(
                self.failure()
                    .unwrap_or_else(|| "the pack workers stopped".into()),
            )),
        }
    }

    /// Record chunk `index` without storing anything (a zero chunk, or a reused one with
    /// the zero runs its point recorded).
    pub fn set(&self, index: u64, chunk: ChunkRef, zero_runs: &[ZeroRun]) {
        let runs = zero_runs.iter().map(|run| ZeroRun {
            slot: index,
            ..*run
        });
        record_slot(&self.shared, index, chunk, runs);
    }

    /// Wait for every upload; the chunk list, in order.
    pub fn finish(mut self) -> Result<Written> {
        self.tx = None;
        for handle in self.workers.drain(..) {
            if handle.join().is_err() {
                return Err(RepoError::Invalid("a pack worker panicked".into()));
            }
        }
        if let Some(why) = self.failure() {
            return Err(RepoError::Invalid(why));
        }
        let results =
            std::mem::take(
                &mut *self.shared.results.lock().map_err(|_| {
                    RepoError::Invalid("pack workers poisoned the result list".into())
                })?,
            );
        let mut chunks = Vec::with_capacity(results.len());
        for (i, chunk) in results.into_iter().enumerate() {
            chunks.push(chunk.ok_or_else(|| {
                RepoError::Invalid(format!("chunk {i} of the point was never written"))
            })?);
        }
        let mut zero_runs =
            std::mem::take(&mut *self.shared.zero_runs.lock().map_err(|_| {
                RepoError::Invalid("pack workers poisoned the zero run list".into())
            })?);
        zero_runs.sort_by_key(|run| (run.slot, run.offset));
        let pieces =
            std::mem::take(
                &mut *self.shared.pieces.lock().map_err(|_| {
                    RepoError::Invalid("pack workers poisoned the piece list".into())
                })?,
            );
        Ok(Written {
            chunks,
            zero_runs,
            pieces,
            new_bytes: self.shared.new_bytes.load(Ordering::Relaxed),
            new_chunks: self.shared.new_chunks.load(Ordering::Relaxed),
        })
    }
}

impl Drop for PointWriter {
    fn drop(&mut self) {
        self.tx = None;
        for handle in self.workers.drain(..) {
            let _ = handle.join();
        }
    }
}

#[derive(Default)]
struct Pack {
    bytes: Vec<u8>,
    entries: Vec<PackEntry>,
}

fn worker(shared: &Shared, rx: &Mutex<Receiver<Job>>) {
    let mut pack = Pack::default();
    loop {
        let job = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { break };
        if shared.failure.lock().map(|f| f.is_some()).unwrap_or(true) {
            continue;
        }
        if let Err(err) = store_chunk(shared, &mut pack, job) {
            fail(shared, err);
        }
    }
    if !pack.entries.is_empty() {
        if let Err(err) = flush(shared, &mut pack) {
            fail(shared, err);
        }
    }
}

fn fail(shared: &Shared, err: RepoError) {
    if let Ok(mut failure) = shared.failure.lock() {
        failure.get_or_insert_with(|| err.to_string());
    }
}

/// Slot `index` is `chunk`, with `zero_runs` if it is a data chunk (a zero chunk is all
/// zero and records none).
fn record_slot(
    shared: &Shared,
    index: u64,
    chunk: ChunkRef,
    zero_runs: impl IntoIterator<Item = ZeroRun>,
) {
    if let Ok(mut results) = shared.results.lock() {
        if let Some(slot) = results.get_mut(index as usize) {
            *slot = Some(chunk);
        }
    }
    if let (ChunkRef::Data(_), Ok(mut runs)) = (chunk, shared.zero_runs.lock()) {
        runs.extend(zero_runs);
    }
}

fn store_chunk(shared: &Shared, pack: &mut Pack, job: Job) -> Result<()> {
    // One scan finds a slot chunk's zero runs and whether it is all zero (one run over all
    // of it); a piece records no runs (its bytes are what was written).
    let (zero_runs, all_zero) = match job.target {
        Target::Slot(index) => {
            let runs = find_zero_runs(index, &job.data);
            let whole = runs
                .first()
                .is_some_and(|run| run.len as usize == job.data.len());
            (runs, whole)
        }
        Target::Piece(_) => (Vec::new(), is_zero(&job.data)),
    };
    let chunk = if all_zero {
        ChunkRef::Zero
    } else {
        let id = shared.repo.chunk_id(&job.data);
        let fresh = shared
            .known
            .lock()
            .map(|mut known| known.insert(id))
            .unwrap_or(false);
        if fresh {
            let blob = zstd::bulk::compress(&job.data, ZSTD_LEVEL)
                .map_err(|e| RepoError::Invalid(format!("compressing a chunk: {e}")))?;
            let blob = shared.repo.seal_blob(&id, blob)?;
            if pack.bytes.is_empty() {
                pack.bytes.extend_from_slice(PACK_MAGIC);
            }
            pack.entries.push(PackEntry {
                id,
                offset: pack.bytes.len() as u64,
                stored_len: blob.len() as u32,
                raw_len: job.data.len() as u32,
                crc: crc32fast::hash(&blob),
            });
            pack.bytes.extend_from_slice(&blob);
            shared.new_chunks.fetch_add(1, Ordering::Relaxed);
            if pack.bytes.len() >= PACK_TARGET {
                flush(shared, pack)?;
            }
        }
        ChunkRef::Data(id)
    };
    match job.target {
        Target::Slot(index) => record_slot(shared, index, chunk, zero_runs),
        Target::Piece(number) => {
            if let Ok(mut pieces) = shared.pieces.lock() {
                pieces.insert(number, chunk);
            }
        }
    }
    Ok(())
}

fn flush(shared: &Shared, pack: &mut Pack) -> Result<()> {
    let pack = std::mem::take(pack);
    let pack_id = shared.repo.pack_id(&pack.bytes);
    let index = PackIndex {
        pack_id,
        pack_len: pack.bytes.len() as u64,
        entries: pack.entries,
    };
    let len = pack.bytes.len() as u64;
    let repo = &shared.repo;
    shared.handle.block_on(async {
        repo.put_create(&pack_path(&pack_id), pack.bytes.into())
            .await?;
        repo.put_pack_index(&index).await
    })?;
    shared.new_bytes.fetch_add(len, Ordering::Relaxed);
    Ok(())
}
