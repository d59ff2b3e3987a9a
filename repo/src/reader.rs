//! Reading a point straight from the repository, for `tidemark repo export` (instant restore:
//! a client reads or boots the point while nothing has been restored).
//!
//! A read in a data chunk fetches that chunk's blob with one ranged GET of its pack, checks
//! its CRC, inflates it and checks its hash against its id before any byte of it is used; a slot with
//! pieces (an incremental point) is its chunk with each piece's chunk, fetched the same way,
//! laid over it. What the point index alone says is zero (zero slots, the zero runs recorded
//! for a slot's chunk, zero pieces; minus what data pieces cover) reads as zeros without a
//! request and is a hole in [`PointReader::allocation`]; fetching a chunk checks its recorded
//! zero runs (see [`crate::compose_slot`]). Inflated
//! chunks stay in a cache bounded by [`ReaderOptions::cache_bytes`] (least recently used
//! chunks go first), and readers of one chunk share one fetch. A read that lands in the chunk
//! of the previous read or the next one, or just after a cached chunk, counts as sequential
//! and starts fetching the following [`ReaderOptions::readahead`] chunks in the background,
//! so a streaming client (nbdcopy, qemu-img convert; several connections each reading its
//! own region) overlaps the object store's latency with its own work. Read-ahead chunks that
//! lie near each other in one pack come with one ranged GET ([`crate::fetch`]) and are
//! checked and inflated on all CPUs at once; a reader that wants one of them meanwhile waits
//! for that fetch. A failed read-ahead run caches nothing: each reader then fetches its
//! chunk alone, so one corrupt chunk fails only the reads of that chunk.
//! Failed fetches are not cached: a corrupt chunk is an error naming its pack and offset on
//! every read of it, and a store that was briefly unreachable is asked again.
//!
//! A chunk whose every byte a streaming reader has been served leaves the cache at once
//! (use-once, as the kernel treats streamed pages): a streaming client (nbdcopy, qemu-img
//! convert) reads each byte once, so its memory is worth more as the buffer of the next
//! fetch than as cache, and a long copy does not fill the whole cache with fresh pages
//! (faulting in fresh memory costs as much CPU as checking the chunk on some VMs).
//!
//! Memory: the cache, plus the chunks being fetched (at most one per concurrent reader and
//! `readahead` more), plus up to [`SPARE_BUFFERS`] evicted chunks' buffers kept for reuse.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::runtime::Handle;
use tokio::sync::OnceCell;

use futures::FutureExt;

use crate::fetch::{fetch_run, plan_runs, slot_run, RunLimits};
use crate::format::{chunk_count, ChunkId, PointIndex};
use crate::{point_path, Location, RepoError, Repository, Result};

/// How much a reader caches and prefetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReaderOptions {
    /// Bytes of inflated chunks kept in memory (at least two chunks).
    pub cache_bytes: u64,
    /// Chunks fetched ahead of a sequential reader (capped at half the cache).
    pub readahead: u64,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        ReaderOptions {
            cache_bytes: 256 << 20,
            readahead: 8,
        }
    }
}

/// Most runs one [`PointReader::allocation`] call returns; callers ask again for more.
const RUNS_PER_CALL: usize = 1024;

type Cell = Arc<OnceCell<Arc<Vec<u8>>>>;

struct Slot {
    cell: Cell,
    /// Tick of the last use (least recently used goes first).
    used: u64,
    /// The chunk is loaded and its bytes are counted in [`Cache::bytes`].
    counted: bool,
    /// Bytes of it served to streaming reads (see [`Cache::served`]).
    served: u64,
}

struct Cache {
    slots: HashMap<u64, Slot>,
    tick: u64,
    bytes: u64,
    limit: u64,
    /// Memory of evicted chunks no reader holds, for the next fetches (at most
    /// [`SPARE_BUFFERS`]).
    spare: Vec<Vec<u8>>,
    /// One bit per chunk slot: a streaming reader was served all of it and the cache
    /// dropped it. A read just after such a chunk still counts as sequential.
    consumed: Vec<u64>,
}

/// Evicted chunks' buffers kept for reuse: about one read-ahead's worth.
const SPARE_BUFFERS: usize = 8;

impl Cache {
    /// The cell of chunk `index` (new and empty if it is not cached), marked as used now.
    fn slot(&mut self, index: u64) -> Cell {
        self.tick += 1;
        let tick = self.tick;
        let slot = self.slots.entry(index).or_insert_with(|| Slot {
            cell: Arc::default(),
            used: tick,
            counted: false,
            served: 0,
        });
        slot.used = tick;
        let cell = Arc::clone(&slot.cell);
        self.mark_consumed(index, false);
        cell
    }

    fn mark_consumed(&mut self, index: u64, consumed: bool) {
        if let Some(word) = self.consumed.get_mut((index / 64) as usize) {
            let bit = 1 << (index % 64);
            match consumed {
                true => *word |= bit,
                false => *word &= !bit,
            }
        }
    }

    fn is_consumed(&self, index: u64) -> bool {
        self.consumed
            .get((index / 64) as usize)
            .is_some_and(|word| word & (1 << (index % 64)) != 0)
    }

    /// Count `bytes` of loaded chunk `index` served to a streaming read; once `data` bytes
    /// are served (the slot's bytes outside its zero extents, which reads get without the
    /// chunk and a sparse copy never asks for), drop it (its memory goes to the spare
    /// buffers) and mark it consumed.
    fn served(&mut self, index: u64, bytes: u64, data: u64) {
        let Some(slot) = self.slots.get_mut(&index) else {
            return;
        };
        let Some(len) = slot.cell.get().map(|data| data.len() as u64) else {
            return;
        };
        slot.served += bytes;
        if !slot.counted || slot.served < data {
            return;
        }
        if let Some(slot) = self.slots.remove(&index) {
            self.bytes -= len;
            self.recycle(slot.cell);
            self.mark_consumed(index, true);
        }
    }

    /// Count chunk `index`, just loaded into `cell`, then drop the least recently used
    /// loaded chunks (never `index` itself) until the cache fits its limit again.
    fn settle(&mut self, index: u64, cell: &Cell) {
        if let Some(slot) = self.slots.get_mut(&index) {
            if Arc::ptr_eq(&slot.cell, cell) && !slot.counted {
                if let Some(data) = cell.get() {
                    slot.counted = true;
                    self.bytes += data.len() as u64;
                }
            }
        }
        while self.bytes > self.limit {
            let victim = self
                .slots
                .iter()
                .filter(|(i, slot)| slot.counted && **i != index)
                .min_by_key(|(_, slot)| slot.used)
                .map(|(i, _)| *i);
            let Some(victim) = victim else { break };
            if let Some(slot) = self.slots.remove(&victim) {
                self.bytes -= slot.cell.get().map_or(0, |data| data.len() as u64);
                self.recycle(slot.cell);
            }
        }
    }

    /// Keep the memory of an evicted chunk for a later fetch, if no reader holds it.
    fn recycle(&mut self, cell: Cell) {
        if self.spare.len() >= SPARE_BUFFERS {
            return;
        }
        let data = Arc::into_inner(cell).and_then(|cell| cell.into_inner());
        if let Some(buf) = data.and_then(Arc::into_inner) {
            self.spare.push(buf);
        }
    }

    /// Forget the empty cell of a failed fetch, so the next read fetches again.
    fn forget(&mut self, index: u64, cell: &Cell) {
        if self
            .slots
            .get(&index)
            .is_some_and(|slot| Arc::ptr_eq(&slot.cell, cell) && !slot.counted)
        {
            self.slots.remove(&index);
        }
    }
}

struct Inner {
    repo: Repository,
    point: PointIndex,
    locations: HashMap<ChunkId, Location>,
    handle: Handle,
    cache: Mutex<Cache>,
    readahead: u64,
    /// Chunk of the last read, for the sequential-read test (u64::MAX: none yet).
    last_chunk: AtomicU64,
    fetched: AtomicU64,
}

/// A point of a repository, readable at any offset.
#[derive(Clone)]
pub struct PointReader {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PointReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PointReader({} in {})",
            self.inner.point.name(),
            self.inner.repo.url()
        )
    }
}

impl PointReader {
    /// Open the point `name` (`VOLUME@CHECKPOINT` or `VOLUME@latest`) of `repo`. Every data
    /// chunk the point names must be in a pack index. Reads block on `handle`'s runtime:
    /// call them from threads that are not the runtime's own (NBD transmission threads).
    pub async fn open(
        repo: &Repository,
        name: &str,
        handle: Handle,
        options: ReaderOptions,
    ) -> Result<PointReader> {
        let point = repo.point(name).await?;
        let object = point_path(&point.volume, &point.checkpoint).to_string();
        if point.chunks.len() as u64 != chunk_count(point.size, point.chunk_size) {
            return Err(RepoError::Corrupt {
                object,
                why: format!(
                    "{} chunks of {} bytes do not make {} bytes",
                    point.chunks.len(),
                    point.chunk_size,
                    point.size
                ),
            });
        }
        let chunk = u64::from(point.chunk_size);
        if options.cache_bytes < 2 * chunk {
            return Err(RepoError::Invalid(format!(
                "a cache of {} bytes is too small: it must hold two chunks of {chunk} bytes",
                options.cache_bytes
            )));
        }
        let (map, _, _) = repo.chunk_map().await?;
        let mut locations = HashMap::new();
        for id in point.data_chunks() {
            let Some(at) = map.get(&id) else {
                return Err(RepoError::Corrupt {
                    object,
                    why: format!(
                        "its chunk {} is in no pack index; run `tidemark repo verify {}`",
                        id.hex(),
                        repo.url()
                    ),
                });
            };
            locations.insert(id, *at);
        }
        Ok(PointReader {
            inner: Arc::new(Inner {
                repo: repo.clone(),
                locations,
                handle,
                cache: Mutex::new(Cache {
                    slots: HashMap::new(),
                    tick: 0,
                    bytes: 0,
                    limit: options.cache_bytes,
                    spare: Vec::new(),
                    consumed: vec![0; point.chunks.len().div_ceil(64)],
                }),
                readahead: options.readahead.min(options.cache_bytes / chunk / 2),
                last_chunk: AtomicU64::new(u64::MAX),
                fetched: AtomicU64::new(0),
                point,
            }),
        })
    }

    /// The point's index.
    pub fn point(&self) -> &PointIndex {
        &self.inner.point
    }

    /// The volume's size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.point.size
    }

    /// Chunks fetched from the store so far (cache misses and readahead).
    pub fn fetched_chunks(&self) -> u64 {
        self.inner.fetched.load(Ordering::Relaxed)
    }

    /// Bytes of inflated chunks the cache holds now.
    pub fn cached_bytes(&self) -> u64 {
        self.inner.cache().bytes
    }

    /// Fill `buf` with the point's bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let inner = &self.inner;
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= inner.point.size)
            .ok_or_else(|| {
                RepoError::Invalid(format!(
                    "a read of {} bytes at {offset} is past the end of {} ({} bytes)",
                    buf.len(),
                    inner.point.name(),
                    inner.point.size
                ))
            })?;
        if buf.is_empty() {
            return Ok(());
        }
        let chunk = u64::from(inner.point.chunk_size);
        let (first, last) = (offset / chunk, (end - 1) / chunk);
        let previous = inner.last_chunk.swap(last, Ordering::Relaxed);
        let streaming = (previous != u64::MAX && first.abs_diff(previous) <= 1)
            || (first > 0 && {
                let cache = inner.cache();
                cache.slots.contains_key(&(first - 1)) || cache.is_consumed(first - 1)
            });
        if streaming {
            Inner::read_ahead(inner, last);
        }
        let mut at = offset;
        while at < end {
            let index = at / chunk;
            let within = (at - index * chunk) as usize;
            let piece = ((index + 1) * chunk).min(end) - at;
            let out = &mut buf[(at - offset) as usize..(at - offset + piece) as usize];
            let zeros = inner.point.slot_zero_extents(index);
            let data_bytes = outside(&zeros, at..at + piece);
            if data_bytes == 0 {
                out.fill(0);
            } else {
                let data = Inner::chunk(inner, index)?;
                out.copy_from_slice(&data[within..within + piece as usize]);
                drop(data);
                if streaming {
                    let slot = index * chunk..index * chunk + inner.point.slot_len(index);
                    let slot_data = outside(&zeros, slot);
                    inner.cache().served(index, data_bytes, slot_data);
                }
            }
            at += piece;
        }
        Ok(())
    }

    /// Load the data chunks of `[offset, offset + len)` into the cache (as many as it holds).
    pub fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
        let inner = &self.inner;
        let chunk = u64::from(inner.point.chunk_size);
        let end = offset.saturating_add(len).min(inner.point.size);
        if offset >= end {
            return Ok(());
        }
        let most = inner.cache().limit / chunk;
        for index in (offset / chunk..=(end - 1) / chunk).take(most as usize) {
            let wanted = offset.max(index * chunk)..end.min((index + 1) * chunk);
            if outside(&inner.point.slot_zero_extents(index), wanted) > 0 {
                Inner::chunk(inner, index)?;
            }
        }
        Ok(())
    }

    /// Runs of `(length, zero)` from `offset` on: `zero` for what reads as zeros by the
    /// point index alone (zero slots, the zero runs of slots' chunks, zero pieces; not what
    /// a data piece covers), not for the rest. They cover at least one byte and at most the
    /// rest of the point, and may end before `offset + len` (at most [`RUNS_PER_CALL`] runs).
    pub fn allocation(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        let point = &self.inner.point;
        let chunk = u64::from(point.chunk_size);
        let end = offset.saturating_add(len.max(1)).min(point.size);
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let mut at = offset;
        while at < end {
            let index = at / chunk;
            let slot_end = ((index + 1) * chunk).min(point.size);
            for (range, zero) in segments(point.slot_zero_extents(index), at..slot_end) {
                let length = range.end - range.start;
                let full = runs.len() == RUNS_PER_CALL;
                match runs.last_mut() {
                    Some((run, was_zero)) if *was_zero == zero => *run += length,
                    _ if full => return runs,
                    _ => runs.push((length, zero)),
                }
            }
            at = slot_end;
        }
        runs
    }
}

/// Bytes of `range` outside `zeros` (ascending, disjoint).
fn outside(zeros: &[Range<u64>], range: Range<u64>) -> u64 {
    let inside: u64 = zeros
        .iter()
        .map(|z| {
            z.end
                .min(range.end)
                .saturating_sub(z.start.max(range.start))
        })
        .sum();
    range.end - range.start - inside
}

/// `range` cut into its parts inside `zeros` (ascending, disjoint) and outside them, in
/// order, each with whether it is zero.
fn segments(zeros: Vec<Range<u64>>, range: Range<u64>) -> Vec<(Range<u64>, bool)> {
    let mut out = Vec::with_capacity(2 * zeros.len() + 1);
    let mut at = range.start;
    for zero in zeros {
        let (start, end) = (zero.start.max(at), zero.end.min(range.end));
        if start >= end {
            continue;
        }
        if start > at {
            out.push((at..start, false));
        }
        out.push((start..end, true));
        at = end;
    }
    if at < range.end {
        out.push((at..range.end, false));
    }
    out
}

impl Inner {
    fn cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The bytes of chunk slot `index` (not a zero slot), from the cache or fetched now.
    fn chunk(this: &Arc<Inner>, index: u64) -> Result<Arc<Vec<u8>>> {
        let cell = this.cache().slot(index);
        if let Some(data) = cell.get() {
            return Ok(Arc::clone(data));
        }
        this.handle.block_on(Inner::load(this, index, &cell, || {
            Inner::fetch(this, index)
        }))
    }

    /// Fill `cell` with slot `index` unless another reader does (then wait for it); `fetch`
    /// gets the bytes when this call is the one that fills the cell.
    async fn load<F, Fut>(
        this: &Arc<Inner>,
        index: u64,
        cell: &Cell,
        fetch: F,
    ) -> Result<Arc<Vec<u8>>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Arc<Vec<u8>>>>,
    {
        let got = cell.get_or_try_init(fetch).await.cloned();
        let mut cache = this.cache();
        match &got {
            Ok(_) => cache.settle(index, cell),
            Err(_) => cache.forget(index, cell),
        }
        got
    }

    /// Slot `index` alone: its chunk (or zeros) with its pieces' chunks laid over it.
    async fn fetch(this: &Arc<Inner>, index: u64) -> Result<Arc<Vec<u8>>> {
        let run = slot_run(&this.point, &this.locations, index)?;
        let mut slots = fetch_run(&this.repo, &this.point, &this.locations, &run, &|| {
            this.cache().spare.pop()
        })
        .await?;
        this.fetched.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(slots.pop().unwrap_or_default()))
    }

    /// Start fetching the data chunks after `last` that are not cached or on their way,
    /// neighbours in one pack with one request: every slot of a run waits on the run's one
    /// shared fetch, so a reader that arrives meanwhile waits for it instead of asking again.
    fn read_ahead(this: &Arc<Inner>, last: u64) {
        let count = this.point.chunks.len() as u64;
        let mut wanted = Vec::new();
        {
            let mut cache = this.cache();
            for index in (last + 1..count).take(this.readahead as usize) {
                if !this.point.slot_is_zero(index) && !cache.slots.contains_key(&index) {
                    wanted.push((index, cache.slot(index)));
                }
            }
        }
        let runs = match plan_runs(
            &this.point,
            &this.locations,
            wanted.iter().map(|(index, _)| *index),
            RunLimits::default(),
        ) {
            Ok(runs) => runs,
            Err(err) => {
                // The reads themselves report it; forget the empty cells.
                tracing::debug!("planning read-ahead after chunk {last}: {err}");
                let mut cache = this.cache();
                for (index, cell) in &wanted {
                    cache.forget(*index, cell);
                }
                return;
            }
        };
        let mut cells: HashMap<u64, Cell> = wanted.into_iter().collect();
        for run in runs {
            let (inner, slots) = (Arc::clone(this), run.slots.clone());
            let shared = async move {
                let spare = || inner.cache().spare.pop();
                let slots =
                    fetch_run(&inner.repo, &inner.point, &inner.locations, &run, &spare).await;
                slots
                    .map(|slots| Arc::new(slots.into_iter().map(Arc::new).collect::<Vec<_>>()))
                    .map_err(|err| err.to_string())
            }
            .boxed()
            .shared();
            for (position, index) in slots.into_iter().enumerate() {
                let Some(cell) = cells.remove(&index) else {
                    continue;
                };
                let (inner, shared) = (Arc::clone(this), shared.clone());
                this.handle.spawn(async move {
                    let fetch = || async {
                        let slots = shared.await.map_err(|why| {
                            RepoError::Invalid(format!("reading ahead chunk {index}: {why}"))
                        })?;
                        inner.fetched.fetch_add(1, Ordering::Relaxed);
                        Ok(Arc::clone(&slots[position]))
                    };
                    if let Err(err) = Inner::load(&inner, index, &cell, fetch).await {
                        tracing::debug!("{err}");
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ChunkRef;
    use crate::writer::PointWriter;
    use crate::StoreOptions;

    const CHUNK: u32 = 64 << 10;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    /// A repository holding `disk` as the point `vm@a` (64 KiB chunks), written in three
    /// parts by writers of their own, so the point's chunks lie in at least three packs
    /// (boundaries after chunks 6 and 13).
    fn stored(rt: &tokio::runtime::Runtime, dir: &std::path::Path, disk: &[u8]) -> Repository {
        stored_with_key(rt, dir, disk, None)
    }

    /// [`stored`] in a repository encrypted with the key file `key`, if given.
    fn stored_with_key(
        rt: &tokio::runtime::Runtime,
        dir: &std::path::Path,
        disk: &[u8],
        key: Option<&std::path::Path>,
    ) -> Repository {
        let url = dir.join("repo");
        let url = url.to_str().unwrap();
        let repo = rt
            .block_on(Repository::init_with_key(
                url,
                &StoreOptions::default(),
                CHUNK,
                key,
                crate::ChunkHash::Blake3,
            ))
            .unwrap();
        let blocks: Vec<&[u8]> = disk.chunks(CHUNK as usize).collect();
        let (mut chunks, mut new_bytes) = (Vec::new(), 0);
        for part in [&blocks[..7], &blocks[7..14], &blocks[14..]] {
            let writer = PointWriter::start(
                &repo,
                rt.handle().clone(),
                Default::default(),
                part.len() as u64,
                1,
            );
            for (i, data) in part.iter().enumerate() {
                writer.put(i as u64, data.to_vec()).unwrap();
            }
            let written = writer.finish().unwrap();
            chunks.extend(written.chunks);
            new_bytes += written.new_bytes;
        }
        let point = PointIndex {
            volume: "vm".into(),
            volume_uuid: [7; 16],
            checkpoint: "a".into(),
            parent: String::new(),
            created_unix: 1,
            size: disk.len() as u64,
            chunk_size: CHUNK,
            granularity: 65536,
            new_bytes,
            chunks,
            pieces: Vec::new(),
            zero_runs: Vec::new(),
        };
        rt.block_on(repo.put_point(&point)).unwrap();
        repo
    }

    /// 20 chunks and a half: data, then zero chunks 5..10, a data tail.
    fn disk() -> Vec<u8> {
        let chunk = CHUNK as usize;
        let mut disk: Vec<u8> = (0..20 * chunk + chunk / 2)
            .map(|i| (i % 251) as u8 ^ (i / chunk) as u8)
            .collect();
        disk[5 * chunk..10 * chunk].fill(0);
        disk
    }

    /// Flip the bits `flip` of byte `byte` of chunk `index`'s stored blob in its pack;
    /// the chunk's location.
    fn corrupt_chunk(
        rt: &tokio::runtime::Runtime,
        dir: &std::path::Path,
        repo: &Repository,
        reader: &PointReader,
        index: usize,
        byte: usize,
        flip: u8,
    ) -> Location {
        let (map, _, _) = rt.block_on(repo.chunk_map()).unwrap();
        let ChunkRef::Data(id) = reader.point().chunks[index] else {
            panic!("chunk {index} holds data")
        };
        let at = map[&id];
        let pack = dir
            .join("repo")
            .join(crate::pack_path(&at.pack).to_string());
        let mut bytes = std::fs::read(&pack).unwrap();
        bytes[at.entry.offset as usize + byte] ^= flip;
        std::fs::write(&pack, bytes).unwrap();
        at
    }

    fn open(
        rt: &tokio::runtime::Runtime,
        repo: &Repository,
        options: ReaderOptions,
    ) -> PointReader {
        open_point(rt, repo, "vm@latest", options)
    }

    fn open_point(
        rt: &tokio::runtime::Runtime,
        repo: &Repository,
        name: &str,
        options: ReaderOptions,
    ) -> PointReader {
        rt.block_on(PointReader::open(repo, name, rt.handle().clone(), options))
            .unwrap()
    }

    #[test]
    fn latest_is_refused_while_a_point_index_of_the_volume_cannot_be_read() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let repo = stored(&rt, dir.path(), &disk());
        let points = dir.path().join("repo/points");
        // Another volume's unreadable index does not matter to vm@latest.
        std::fs::create_dir_all(points.join("other")).unwrap();
        std::fs::write(points.join("other/x"), b"not a point index").unwrap();
        assert_eq!(
            rt.block_on(repo.point("vm@latest")).unwrap().checkpoint,
            "a"
        );
        // One of vm's own may be the newest (a newer tidemark's, or damaged): latest is
        // refused naming it, and the point named outright still opens.
        std::fs::write(points.join("vm/b"), b"TMPOINT1 from the future").unwrap();
        let err = rt
            .block_on(repo.point("vm@latest"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("points/vm/b cannot be read"), "{err}");
        assert!(err.contains("name the checkpoint"), "{err}");
        assert_eq!(rt.block_on(repo.point("vm@a")).unwrap().checkpoint, "a");
    }

    #[test]
    fn reads_at_any_offset_equal_the_stored_disk() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let disk = disk();
        let repo = stored(&rt, dir.path(), &disk);
        let reader = open(&rt, &repo, ReaderOptions::default());
        assert_eq!(reader.size(), disk.len() as u64);
        for (offset, len) in [(0, 1), (1000, 200_000), (65_535, 2), (300_000, 1_000_000)] {
            let mut buf = vec![0xaa; len];
            reader.read(offset as u64, &mut buf).unwrap();
            assert_eq!(buf, disk[offset..offset + len], "{offset}+{len}");
        }
        let mut whole = vec![0; disk.len()];
        reader.read(0, &mut whole).unwrap();
        assert_eq!(whole, disk);
        let mut past = vec![0; 2];
        assert!(reader.read(disk.len() as u64 - 1, &mut past).is_err());
    }

    #[test]
    fn zero_chunks_are_holes_and_are_never_fetched() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let disk = disk();
        let repo = stored(&rt, dir.path(), &disk);
        let reader = open(&rt, &repo, ReaderOptions::default());
        let chunk = u64::from(CHUNK);
        let size = disk.len() as u64;
        assert_eq!(
            reader.allocation(0, size),
            [
                (5 * chunk, false),
                (5 * chunk, true),
                (size - 10 * chunk, false)
            ]
        );
        assert_eq!(reader.allocation(6 * chunk + 3, 10), [(chunk - 3, true)]);
        let mut buf = vec![1; 5 * chunk as usize];
        reader.read(5 * chunk, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(reader.fetched_chunks(), 0);
    }

    #[test]
    fn the_cache_stays_within_its_bound_and_serves_repeated_reads() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let disk = disk();
        let repo = stored(&rt, dir.path(), &disk);
        let options = ReaderOptions {
            cache_bytes: 4 * u64::from(CHUNK),
            readahead: 0,
        };
        let reader = open(&rt, &repo, options);
        let mut buf = vec![0; 100];
        reader.read(10, &mut buf).unwrap();
        reader.read(20_000, &mut buf).unwrap();
        assert_eq!(
            reader.fetched_chunks(),
            1,
            "a cached chunk was fetched again"
        );
        let mut whole = vec![0; disk.len()];
        reader.read(0, &mut whole).unwrap();
        assert_eq!(whole, disk);
        assert!(reader.cached_bytes() <= options.cache_bytes);
        assert_eq!(reader.fetched_chunks(), 1 + 15);
    }

    #[test]
    fn sequential_reads_fetch_ahead() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let disk = disk();
        let repo = stored(&rt, dir.path(), &disk);
        let reader = open(&rt, &repo, ReaderOptions::default());
        let mut buf = vec![0; 4096];
        reader.read(0, &mut buf).unwrap();
        reader.read(4096, &mut buf).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while reader.fetched_chunks() < 5 {
            assert!(std::time::Instant::now() < deadline, "no readahead");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Read the whole point in 128 KiB requests from `threads` threads, each its own
    /// region in order (as nbdcopy's connections do); the results, in offset order.
    fn stream(reader: &PointReader, threads: u64) -> Vec<Result<Vec<u8>>> {
        let size = reader.size();
        let step = 128 << 10;
        let region = size.div_ceil(threads).div_ceil(step) * step;
        std::thread::scope(|s| {
            let spawned: Vec<_> = (0..threads)
                .map(|t| {
                    s.spawn(move || {
                        let mut got = Vec::new();
                        let mut at = t * region;
                        while at < size.min((t + 1) * region) {
                            let mut buf = vec![0; step.min(size - at) as usize];
                            got.push(reader.read(at, &mut buf).map(|()| buf));
                            at += step;
                        }
                        got
                    })
                })
                .collect();
            spawned
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        })
    }

    /// [`stream`]'s bytes, every read succeeded.
    fn streamed(reader: &PointReader, threads: u64) -> Vec<u8> {
        stream(reader, threads)
            .into_iter()
            .flat_map(|r| r.unwrap())
            .collect()
    }

    #[test]
    fn streaming_readers_read_ahead_across_pack_boundaries() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let disk = disk();
        let repo = stored(&rt, dir.path(), &disk);
        let (_, indexes, _) = rt.block_on(repo.chunk_map()).unwrap();
        assert!(indexes.len() >= 3, "{} packs", indexes.len());
        let options = ReaderOptions {
            cache_bytes: 8 * u64::from(CHUNK),
            readahead: 6,
        };
        for threads in [1, 3] {
            let reader = open(&rt, &repo, options);
            let got = streamed(&reader, threads);
            assert_eq!(got, disk, "{threads} readers");
            assert!(reader.cached_bytes() <= options.cache_bytes);
            // 16 data chunks; a chunk evicted before its reader came is fetched again.
            assert!(reader.fetched_chunks() >= 16, "{}", reader.fetched_chunks());
        }
    }

    #[test]
    fn chunks_a_streaming_reader_was_served_whole_leave_the_cache_and_read_again() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let disk = disk();
        let repo = stored(&rt, dir.path(), &disk);
        let options = ReaderOptions {
            cache_bytes: 64 * u64::from(CHUNK),
            readahead: 4,
        };
        let reader = open(&rt, &repo, options);
        let got = streamed(&reader, 1);
        assert_eq!(got, disk);
        // Each data chunk fetched once; only chunks 0 and 1 stay (the first read, which
        // did not yet count as streaming).
        assert_eq!(reader.fetched_chunks(), 16);
        assert_eq!(reader.cached_bytes(), 2 * u64::from(CHUNK));
        let again = streamed(&reader, 1);
        assert_eq!(again, disk);
        assert_eq!(reader.fetched_chunks(), 16 + 14);
        // Several streaming readers, each its own region: every byte still right. (What
        // stays cached then depends on how the readers interleave: each one's first read,
        // chunks split between two regions and read-ahead past a region's end can stay, up
        // to every data chunk of this disk, so no size is asserted here; the single reader
        // above pins the mechanism down.)
        let reader = open(&rt, &repo, options);
        let got = streamed(&reader, 3);
        assert_eq!(got, disk);
    }

    #[test]
    fn a_corrupt_chunk_inside_a_read_ahead_run_is_refused_and_its_neighbours_read() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let disk = disk();
        let repo = stored(&rt, dir.path(), &disk);
        let reader = open(&rt, &repo, ReaderOptions::default());
        let at = corrupt_chunk(&rt, dir.path(), &repo, &reader, 2, 9, 0x01);
        let chunk = u64::from(CHUNK) as usize;
        for _ in 0..2 {
            // Chunk 0 starts read-ahead of 1..5, one run of the first pack holding chunk 2.
            for (k, got) in stream(&reader, 1).into_iter().enumerate() {
                let offset = k * (128 << 10);
                if offset / chunk == 2 || (offset + (128 << 10) - 1) / chunk == 2 {
                    let text = got.unwrap_err().to_string();
                    assert!(
                        text.contains(&crate::format::hex(&at.pack)) && text.contains("corrupt"),
                        "{text}"
                    );
                } else {
                    let end = (offset + (128 << 10)).min(disk.len());
                    assert_eq!(got.unwrap(), disk[offset..end], "read at {offset}");
                }
            }
        }
    }

    #[test]
    fn an_encrypted_point_reads_back_and_a_corrupt_chunk_of_it_is_refused() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        crate::crypto::generate_key_file(&key).unwrap();
        let disk = disk();
        let repo = stored_with_key(&rt, dir.path(), &disk, Some(&key));
        assert!(repo.crypto().is_some());
        let reader = open(&rt, &repo, ReaderOptions::default());
        let got = streamed(&reader, 2);
        assert_eq!(got, disk);
        let reader = open(&rt, &repo, ReaderOptions::default());
        let at = corrupt_chunk(&rt, dir.path(), &repo, &reader, 12, 30, 0x04);
        let mut buf = vec![0; 1000];
        let err = reader
            .read(12 * u64::from(CHUNK) + 7, &mut buf)
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&crate::format::hex(&at.pack)) && text.contains("corrupt"),
            "{text}"
        );
        reader.read(11 * u64::from(CHUNK), &mut buf).unwrap();
        assert_eq!(buf, disk[11 * CHUNK as usize..11 * CHUNK as usize + 1000]);
    }

    #[test]
    fn concurrent_readers_of_one_chunk_share_one_fetch() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let disk = disk();
        let repo = stored(&rt, dir.path(), &disk);
        let options = ReaderOptions {
            readahead: 0,
            ..ReaderOptions::default()
        };
        let reader = open(&rt, &repo, options);
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let reader = reader.clone();
                let disk = &disk;
                s.spawn(move || {
                    let mut buf = vec![0; 512];
                    let offset = 12 * u64::from(CHUNK) + t * 512;
                    reader.read(offset, &mut buf).unwrap();
                    assert_eq!(buf, disk[offset as usize..offset as usize + 512]);
                });
            }
        });
        assert_eq!(reader.fetched_chunks(), 1);
    }

    #[test]
    fn a_corrupt_chunk_is_an_error_naming_its_pack_on_every_read() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let disk = disk();
        let repo = stored(&rt, dir.path(), &disk);
        let reader = open(&rt, &repo, ReaderOptions::default());
        let at = corrupt_chunk(&rt, dir.path(), &repo, &reader, 3, 5, 0x40);
        let mut buf = vec![0; 10];
        for _ in 0..2 {
            let err = reader.read(3 * u64::from(CHUNK), &mut buf).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains(&crate::format::hex(&at.pack)) && text.contains("corrupt"),
                "{text}"
            );
        }
        reader.read(0, &mut buf).unwrap();
        assert_eq!(buf, disk[..10]);
    }

    const GRID: u64 = crate::format::ZERO_GRID as u64;

    /// A repository of 256 KiB chunks holding `vm@c0`, two slots by 64 KiB block: data,
    /// zeros, zeros, data; zeros, data, data, data; and `vm@c1`, which lays a 4 KiB data
    /// piece at 72 KiB, inside slot 0's zero run. The disk as of `vm@c1`.
    fn mixed(rt: &tokio::runtime::Runtime, dir: &std::path::Path) -> (Repository, Vec<u8>) {
        use crate::builder::{PointBuilder, PointNames};
        let repo = crate::test_repository(rt, dir, 4 * GRID as u32);
        let grid = GRID as usize;
        let mut disk = vec![0u8; 8 * grid];
        for block in [0, 3, 5, 6, 7] {
            for (i, b) in disk[block * grid..(block + 1) * grid]
                .iter_mut()
                .enumerate()
            {
                *b = (i % 251) as u8 ^ block as u8 | 1;
            }
        }
        let store = |disk: &[u8], checkpoint: &str, parent: Option<&str>, at: usize, len| {
            let names = PointNames {
                volume: "vm".into(),
                uuid: [3; 16],
                checkpoint: checkpoint.into(),
                parent: parent.map(String::from),
                granularity: 4096,
            };
            rt.block_on(async {
                let mut builder = PointBuilder::open(&repo, &names, disk.len() as u64, false, 2)
                    .await
                    .unwrap();
                tokio::task::block_in_place(|| {
                    builder.write(at as u64, &disk[at..at + len]).unwrap();
                    builder.finish().unwrap()
                })
            })
        };
        let c0 = store(&disk, "c0", None, 0, disk.len());
        assert_eq!(c0.zero_runs.len(), 2);
        disk[grid + 8192..grid + 12288].fill(7);
        let c1 = store(&disk, "c1", Some("c0"), grid + 8192, 4096);
        assert_eq!(c1.pieces.len(), 1);
        (repo, disk)
    }

    #[test]
    fn zero_runs_are_holes_except_where_a_data_piece_lies_over_them() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let (repo, disk) = mixed(&rt, dir.path());
        let reader = open_point(&rt, &repo, "vm@c1", ReaderOptions::default());
        assert_eq!(
            reader.allocation(0, disk.len() as u64),
            [
                (GRID, false),
                (8192, true),
                (4096, false),
                (GRID - 12288 + GRID, true),
                (GRID, false),
                (GRID, true),
                (3 * GRID, false)
            ]
        );
        assert_eq!(
            reader.allocation(GRID + 100, 10),
            [
                (8092, true),
                (4096, false),
                (2 * GRID - 12288, true),
                (GRID, false)
            ],
            "from inside a slot on, to its end"
        );
        let mut whole = vec![0; disk.len()];
        reader.read(0, &mut whole).unwrap();
        assert_eq!(whole, disk);
    }

    #[test]
    fn reads_wholly_inside_zero_runs_fetch_nothing() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let (repo, _) = mixed(&rt, dir.path());
        // No read-ahead: the data read at the end would start fetching slot 1 behind it.
        let options = ReaderOptions {
            readahead: 0,
            ..ReaderOptions::default()
        };
        let reader = open_point(&rt, &repo, "vm@c1", options);
        for (offset, len) in [(GRID, 8192), (GRID + 12288, 20_000), (4 * GRID, GRID)] {
            let mut buf = vec![1; len as usize];
            reader.read(offset, &mut buf).unwrap();
            assert!(buf.iter().all(|&b| b == 0), "{offset}+{len}");
        }
        assert_eq!(reader.fetched_chunks(), 0);
        let mut buf = vec![0; 4096];
        reader.read(GRID + 8192, &mut buf).unwrap();
        assert_eq!(buf, vec![7; 4096]);
        assert_eq!(reader.fetched_chunks(), 1);
    }

    #[test]
    fn a_streaming_reader_of_only_the_data_drops_each_chunk_once_its_data_is_served() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let (repo, disk) = mixed(&rt, dir.path());
        let reader = open_point(&rt, &repo, "vm@c0", ReaderOptions::default());
        // What a sparse copy reads: the data extents only, 16 KiB at a time.
        let mut at = 0;
        for (len, zero) in reader.allocation(0, disk.len() as u64) {
            if !zero {
                for offset in (at..at + len).step_by(16384) {
                    let mut buf = vec![0; 16384];
                    reader.read(offset, &mut buf).unwrap();
                    assert_eq!(buf, disk[offset as usize..offset as usize + 16384]);
                }
            }
            at += len;
        }
        assert_eq!(
            reader.cached_bytes(),
            4 * GRID,
            "slot 1 served whole left the cache; slot 0 (the first read) stays"
        );
    }

    /// `vm@c0` of [`mixed`] stored again as `vm@bad`, whose index says slot 1's first two
    /// blocks are zero: the second holds data.
    fn with_wrong_run(rt: &tokio::runtime::Runtime, repo: &Repository) {
        let mut bad = rt.block_on(repo.point("vm@c0")).unwrap();
        bad.checkpoint = "bad".into();
        bad.zero_runs[1].len = 2 * GRID as u32;
        assert_eq!((bad.zero_runs[1].slot, bad.zero_runs[1].offset), (1, 0));
        rt.block_on(repo.put_point(&bad)).unwrap();
    }

    #[test]
    fn a_zero_run_over_data_is_refused_when_the_chunk_is_read() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let (repo, _) = mixed(&rt, dir.path());
        with_wrong_run(&rt, &repo);
        let reader = open_point(&rt, &repo, "vm@bad", ReaderOptions::default());
        let mut buf = vec![0; 4096];
        let err = reader.read(7 * GRID, &mut buf).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("points/vm/bad")
                && text.contains("bytes 0..131072 of its chunk 1")
                && text.contains("has data there"),
            "{text}"
        );
        reader.read(0, &mut buf).unwrap();
    }

    #[test]
    fn verify_read_data_reports_a_zero_run_over_data() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let (repo, _) = mixed(&rt, dir.path());
        let clean = rt.block_on(crate::maint::verify(&repo, true)).unwrap();
        assert!(clean.problems.is_empty(), "{:?}", clean.problems);
        with_wrong_run(&rt, &repo);
        let report = rt.block_on(crate::maint::verify(&repo, true)).unwrap();
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        let problem = &report.problems[0];
        assert_eq!(problem.object, "points/vm/bad");
        assert!(
            problem.problem.contains("bytes 0..131072 of its chunk 1"),
            "{}",
            problem.problem
        );
    }

    #[test]
    fn a_cache_smaller_than_two_chunks_is_refused() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let repo = stored(&rt, dir.path(), &disk());
        let options = ReaderOptions {
            cache_bytes: u64::from(CHUNK),
            readahead: 1,
        };
        let err = rt
            .block_on(PointReader::open(
                &repo,
                "vm@a",
                rt.handle().clone(),
                options,
            ))
            .unwrap_err();
        assert!(err.to_string().contains("two chunks"), "{err}");
    }
}
