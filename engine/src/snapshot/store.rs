//! The COW store: placing log runs and slots (preallocated in steps, up to the limit)
//! and the background writer that stores old contents at their places.

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Weak};

use super::buffers::CopyBuf;
use super::{
    lock, mask_of, Index, Pos, SnapshotError, SnapshotInner, NO_SLOT, PREALLOC_STEP, RELEASED,
};
use crate::io::IoBuf;

/// A run of blocks of one chunk, on its way to the chunk's log run or its slot.
#[derive(Debug, Clone, Copy)]
pub(super) struct Piece {
    pub(super) chunk: u64,
    pub(super) first: u32,
    pub(super) count: u32,
    /// The chunk's slot the run goes to, or [`NO_SLOT`]: it is the chunk's log run.
    pub(super) slot: Pos,
    /// Where its first block goes in the store, in blocks.
    pub(super) pos: u64,
}

/// One background store write: pieces read together, back to back in the volume and in
/// the store.
#[derive(Debug)]
pub(super) struct StoreJob {
    pub(super) data: Arc<CopyBuf>,
    /// Where `data` goes in the store.
    pub(super) offset: u64,
    pub(super) pieces: Vec<Piece>,
}

/// Jobs the background writer takes at once...
const MAX_BATCH_JOBS: usize = 1024;
/// ...and the most bytes it writes in one call.
const MAX_STORE_WRITE: u64 = 8 << 20;
/// Store writes of one batch in flight at once (random 4 KiB copies need depth).
const MAX_PARALLEL_WRITES: usize = 8;
/// The longest gap between two copies that is written over with zeroes to make one write
/// of two: a few blocks (copies of neighbouring small writes) are cheaper written than
/// split into another request, while the gaps 4 KiB random first writes leave between
/// slots (up to 124 KiB) are not; on the bench's disk filling those cost about a quarter
/// of the first-write throughput (0.47x against 0.62x of a plain write, one run).
pub(super) const MAX_FILL: usize = 16 << 10;

impl SnapshotInner {
    /// Reserve `blocks` store blocks (a slot, or a log run: one no longer than a chunk
    /// may reuse a place a TRIM gave back), growing the COW store in steps.
    pub(super) fn alloc(&self, idx: &mut Index, blocks: u32) -> Result<Pos, String> {
        if let Some(pos) = idx.reuse(blocks) {
            idx.used_blocks += u64::from(blocks);
            return Ok(pos);
        }
        let pos = idx.next;
        if pos + u64::from(blocks) > u64::from(RELEASED) {
            return Err(format!(
                "COW store {} reached the {} bytes its index can address; give the snapshot larger chunks",
                self.store_path.display(),
                u64::from(RELEASED) * self.block
            ));
        }
        let end = (pos + u64::from(blocks)) * self.block;
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
        idx.next += u64::from(blocks);
        idx.used_blocks += u64::from(blocks);
        // Checked above: below `RELEASED`.
        Ok(pos as Pos)
    }

    /// Start the background writer that moves old contents from memory to the store;
    /// `zeros` ([`MAX_FILL`] zero bytes, from [`super::open_store`]) fill its gaps.
    pub(crate) fn start(self: &Arc<Self>, zeros: IoBuf) -> Result<(), SnapshotError> {
        let start_err = |source| SnapshotError::Io {
            name: self.name.clone(),
            action: "start the COW writer for",
            path: self.store_path.clone(),
            source,
        };
        let (tx, rx) = mpsc::channel::<StoreJob>();
        let weak: Weak<SnapshotInner> = Arc::downgrade(self);
        let handle = std::thread::Builder::new()
            .name(format!("cow-{}", self.name))
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    // Everything queued meanwhile goes out together: slots are handed out
                    // in order, so concurrent copies usually land close together.
                    let mut jobs = vec![first];
                    while jobs.len() < MAX_BATCH_JOBS {
                        match rx.try_recv() {
                            Ok(job) => jobs.push(job),
                            Err(_) => break,
                        }
                    }
                    let Some(inner) = weak.upgrade() else { return };
                    inner.finish_jobs(jobs, zeros.as_slice());
                }
            })
            .map_err(start_err)?;
        *lock(&self.jobs) = Some(tx);
        *lock(&self.writer) = Some(handle);
        Ok(())
    }

    /// The background writer's work: store a batch in runs of jobs, each run one vectored
    /// write (jobs back to back in the store, or apart by a gap of at most [`MAX_FILL`]
    /// bytes that no preserved block lies in, written with `zeros`), then record them.
    pub(super) fn finish_jobs(&self, mut jobs: Vec<StoreJob>, zeros: &[u8]) {
        jobs.sort_by_key(|j| j.offset);
        // gaps[j]: zeroes written between job j - 1 and job j of one run.
        let mut gaps = vec![0u64; jobs.len()];
        let mut runs = Vec::new();
        {
            let idx = lock(&self.index);
            let mut i = 0;
            while i < jobs.len() {
                let mut j = i + 1;
                let mut bytes = jobs[i].data.len();
                while j < jobs.len() {
                    let (a, b) = (&jobs[j - 1], &jobs[j]);
                    let a_end = a.offset + a.data.len();
                    let Some(gap) = b.offset.checked_sub(a_end) else {
                        break;
                    };
                    if bytes + gap + b.data.len() > MAX_STORE_WRITE {
                        break;
                    }
                    if gap > 0
                        && (gap > zeros.len() as u64
                            || a_end % self.block != 0
                            || !self.fillable(
                                &idx,
                                a_end..b.offset,
                                [a.pieces.last(), b.pieces.first()],
                            ))
                    {
                        break;
                    }
                    gaps[j] = gap;
                    bytes += gap + b.data.len();
                    j += 1;
                }
                runs.push(i..j);
                i = j;
            }
        }
        // The runs of a batch are disjoint, so they go out in parallel; the next batch
        // waits for all of them, which keeps the fill safe (a copy claimed after a fill
        // is in a later batch).
        let next = AtomicUsize::new(0);
        let work = || loop {
            let k = next.fetch_add(1, Ordering::Relaxed);
            let Some(run) = runs.get(k) else { break };
            let mut bufs: Vec<&[u8]> = Vec::with_capacity(2 * run.len());
            for j in run.clone() {
                if gaps[j] > 0 {
                    bufs.push(&zeros[..gaps[j] as usize]);
                }
                bufs.push(jobs[j].data.bytes());
            }
            let result = self.store.write_vectored_at(jobs[run.start].offset, &bufs);
            self.finish_group(&jobs[run.clone()], result);
        };
        std::thread::scope(|scope| {
            for _ in 1..runs.len().min(MAX_PARALLEL_WRITES) {
                // Without another thread the writes still go out, one at a time.
                if std::thread::Builder::new()
                    .name(format!("cow-{}", self.name))
                    .spawn_scoped(scope, work)
                    .is_err()
                {
                    break;
                }
            }
            work();
        });
    }

    /// Whether the store bytes `gap` may be written over: they lie in the slots of
    /// `owners` (the pieces on either side, whose copies are still in memory, so their
    /// slots cannot be freed and reused meanwhile) and none of their blocks is stored in
    /// the slot. A block claimed later is stored by this same thread after the fill. Log
    /// runs are never written over.
    fn fillable(&self, idx: &Index, gap: Range<u64>, owners: [Option<&Piece>; 2]) -> bool {
        let mut pos = gap.start;
        while pos < gap.end {
            let Some(owner) = owners.iter().flatten().find(|p| {
                let base = u64::from(p.slot) * self.block;
                p.slot != NO_SLOT && (base..base + self.chunk).contains(&pos)
            }) else {
                return false;
            };
            let base = u64::from(owner.slot) * self.block;
            let to = (base + self.chunk).min(gap.end);
            let st = idx.chunks.get(&owner.chunk).copied().unwrap_or_default();
            // A chunk released meanwhile keeps its slot until its copies are written, and
            // nothing in the slot is read any more.
            if st.slot == owner.slot {
                let first = (pos - base) / self.block;
                let blocks = mask_of(
                    first as u32,
                    ((to - base).div_ceil(self.block) - first) as u32,
                );
                if st.in_slot & !st.logged & blocks != 0 {
                    return false;
                }
            }
            pos = to;
        }
        true
    }

    /// Give back a log run of `blocks` from `pos` whose chunk was released, for reuse; a
    /// shorter one than a chunk is punched out now (its space goes back to the filesystem
    /// until then). Called under the index lock, so nothing is placed there before the
    /// punch.
    pub(super) fn free_log_run(&self, idx: &mut Index, pos: Pos, blocks: u32) {
        idx.free_area(pos, blocks);
        if blocks != idx.chunk_blocks {
            let (at, len) = (u64::from(pos) * self.block, u64::from(blocks) * self.block);
            if let Err(err) = self.store.discard(at, len) {
                // Space is not returned, but the data is still correct.
                tracing::debug!(
                    "snapshot {}: punching COW log run at {at}: {err}",
                    self.name
                );
            }
        }
    }

    /// Record the outcome of one store write covering `group`.
    pub(super) fn finish_group(&self, group: &[StoreJob], result: io::Result<()>) {
        let mut idx = lock(&self.index);
        for job in group {
            idx.in_flight -= job.data.len();
        }
        match result {
            Ok(()) => {
                for job in group {
                    for p in &job.pieces {
                        idx.pending.remove(&(p.chunk, p.first));
                        // Released by a TRIM meanwhile: its slot is free once the last of
                        // its copies is written, its log run (this piece) now.
                        let st = idx.chunks.get(&p.chunk).copied().unwrap_or_default();
                        if !st.released() {
                            continue;
                        }
                        let chunk_blocks = idx.chunk_blocks;
                        if p.slot == NO_SLOT {
                            // Placed below `RELEASED` by `alloc`.
                            self.free_log_run(&mut idx, p.pos as Pos, p.count);
                        } else if !idx.pending_in(p.chunk, p.slot, chunk_blocks) {
                            idx.free_area(p.slot, chunk_blocks);
                        }
                    }
                    self.copies
                        .fetch_add(job.pieces.len() as u64, Ordering::Relaxed);
                    self.copied_bytes
                        .fetch_add(job.data.len(), Ordering::Relaxed);
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
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::sync::Arc;

    use super::super::{lock, open_store, SnapshotInner, SnapshotParams};
    use super::*;
    use crate::status::EventLog;
    use crate::volume::backing::BackingFile;

    const CHUNK: u64 = 64 << 10;
    const BLOCK: u64 = 4096;

    fn original(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i / 4096 * 7 + i % 251) as u8).collect()
    }

    /// A snapshot of a 1 MiB origin in a temporary directory (removed when the first
    /// value is dropped) whose store jobs the test takes and hands to `finish_jobs`
    /// itself, so it decides which copies share a batch.
    fn snapshot() -> (
        tempfile::TempDir,
        Arc<SnapshotInner>,
        mpsc::Receiver<StoreJob>,
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let origin_path = dir.join("origin");
        std::fs::write(&origin_path, original(1 << 20)).unwrap();
        let origin = Arc::new(BackingFile::open(&origin_path).unwrap());
        let inner = Arc::new(
            SnapshotInner::create(SnapshotParams {
                name: "s".into(),
                volume: "v".into(),
                size: 1 << 20,
                chunk: CHUNK as u32,
                origin,
                store: open_store("s", &dir.join("s.cow"), false).unwrap(),
                store_path: dir.join("s.cow"),
                limit: None,
                bitmap: None,
                events: Arc::new(EventLog::default()),
            })
            .unwrap()
            .0,
        );
        let (tx, rx) = mpsc::channel();
        *lock(&inner.jobs) = Some(tx);
        (tmp, inner, rx)
    }

    /// Overwrite `[offset, offset + len)` of the origin as a volume write would, after
    /// preserving it.
    fn volume_write(inner: &SnapshotInner, offset: u64, len: usize) {
        inner.preserve(offset, len as u64);
        inner.origin.write_at(offset, &vec![0xee; len]).unwrap();
    }

    /// Copies with a block already stored in the slot between them: the gap is not
    /// written over (it would destroy that block's old contents), and every block reads
    /// back as it was.
    #[test]
    fn a_gap_with_a_stored_block_is_never_written_over() {
        let (_dir, inner, rx) = snapshot();
        let zeros = vec![0u8; MAX_FILL];
        // Chunk 0: block 0 goes to the log, then block 7 to the chunk's slot, stored on
        // its own.
        volume_write(&inner, 0, 4096);
        volume_write(&inner, 7 * BLOCK, 4096);
        inner.finish_jobs(rx.try_iter().collect(), &zeros);
        // Chunk 0 blocks 5 and 9 in one batch: the gap between them holds block 7.
        volume_write(&inner, 5 * BLOCK, 4096);
        volume_write(&inner, 9 * BLOCK, 100);
        // Chunk 1 block 14 and chunk 2 blocks 1 and 2: first claims, to the log.
        volume_write(&inner, CHUNK + 14 * BLOCK, 4096);
        volume_write(&inner, 2 * CHUNK + BLOCK + 10, 5000);
        let jobs: Vec<StoreJob> = rx.try_iter().collect();
        assert_eq!(jobs.len(), 4);
        inner.finish_jobs(jobs, &zeros);
        let idx = lock(&inner.index);
        assert!(idx.pending.is_empty() && idx.in_flight == 0 && idx.failed.is_none());
        drop(idx);
        let mut back = vec![0u8; 3 * CHUNK as usize];
        inner.read(0, &mut back).unwrap();
        assert!(back == original(1 << 20)[..back.len()], "old contents lost");
        // Blocks 1 and 2 of chunk 2 were preserved: 7 blocks in all.
        assert_eq!(inner.copied_bytes.load(Ordering::Relaxed), 7 * BLOCK);
        // Log runs of 1, 1 and 2 blocks and chunk 0's slot.
        assert_eq!(lock(&inner.index).used_blocks, 4 + CHUNK / BLOCK);
    }

    /// First writes to scattered chunks land back to back in the store, in the order
    /// their reads complete, whatever their places in their chunks; each chunk's later
    /// blocks go to its slot; every block reads back as it was, from memory and from the
    /// store.
    #[test]
    fn first_writes_to_scattered_chunks_are_stored_back_to_back() {
        let (_dir, inner, rx) = snapshot();
        let zeros = vec![0u8; MAX_FILL];
        let writes = [(9, 3), (2, 15), (14, 0), (5, 7)];
        for (chunk, block) in writes {
            volume_write(&inner, chunk * CHUNK + block * BLOCK, 4096);
        }
        let jobs: Vec<StoreJob> = rx.try_iter().collect();
        let offsets: Vec<u64> = jobs.iter().map(|j| j.offset).collect();
        assert_eq!(offsets, vec![0, BLOCK, 2 * BLOCK, 3 * BLOCK]);
        let mut back = vec![0u8; 1 << 20];
        inner.read(0, &mut back).unwrap();
        assert!(back == original(1 << 20), "old contents from memory");
        inner.finish_jobs(jobs, &zeros);
        // A later block of chunk 2 goes to the chunk's slot, after the log.
        volume_write(&inner, 2 * CHUNK + 4 * BLOCK, 8192);
        let jobs: Vec<StoreJob> = rx.try_iter().collect();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].offset, 4 * BLOCK + 4 * BLOCK);
        inner.finish_jobs(jobs, &zeros);
        assert!(lock(&inner.index).pending.is_empty());
        inner.read(0, &mut back).unwrap();
        assert!(back == original(1 << 20), "old contents from the store");
        assert_eq!(lock(&inner.index).used_blocks, 4 + CHUNK / BLOCK);
    }

    /// Releasing chunks gives back their log runs and slots, whether their copies are
    /// still in memory (freed once written) or stored; a chunk-long place is reused.
    #[test]
    fn released_log_runs_and_slots_are_given_back() {
        let (_dir, inner, rx) = snapshot();
        let zeros = vec![0u8; MAX_FILL];
        // Chunk 0: a one-block log run and a slot, stored.
        volume_write(&inner, 0, 4096);
        volume_write(&inner, 3 * BLOCK, 4096);
        inner.finish_jobs(rx.try_iter().collect(), &zeros);
        // Chunk 1: a whole-chunk log run, still in memory when released.
        volume_write(&inner, CHUNK, CHUNK as usize);
        assert_eq!(lock(&inner.index).used_blocks, 1 + 2 * CHUNK / BLOCK);
        inner.release(0, 2 * CHUNK).unwrap();
        assert_eq!(
            lock(&inner.index).used_blocks,
            CHUNK / BLOCK,
            "chunk 1 in memory"
        );
        inner.finish_jobs(rx.try_iter().collect(), &zeros);
        let idx = lock(&inner.index);
        assert_eq!(idx.used_blocks, 0);
        // Chunk 0's slot and chunk 1's log run are chunk-long: both reusable.
        assert_eq!(idx.free_slots.len(), 2);
        drop(idx);
        // A whole-chunk first write reuses one; a later block of it is still right.
        volume_write(&inner, 4 * CHUNK, CHUNK as usize);
        let jobs: Vec<StoreJob> = rx.try_iter().collect();
        assert!(jobs[0].offset < 2 * CHUNK + BLOCK, "a reused place");
        inner.finish_jobs(jobs, &zeros);
        let mut back = vec![0u8; CHUNK as usize];
        inner.read(4 * CHUNK, &mut back).unwrap();
        assert!(back == original(1 << 20)[4 * CHUNK as usize..5 * CHUNK as usize]);
    }

    /// A backup that trims as it reads while 4 KiB first writes go on: the short log runs
    /// it releases are taken again by later first writes (a longer place split, its rest
    /// kept for the next), so the store's end stays put; every block reads back as it was.
    #[test]
    fn released_short_log_runs_are_reused() {
        let (_dir, inner, rx) = snapshot();
        let zeros = vec![0u8; MAX_FILL];
        // Log runs of 1 block (chunk 0), 3 blocks (chunk 1) and 1 block (chunk 2).
        volume_write(&inner, 0, 4096);
        volume_write(&inner, CHUNK + 4 * BLOCK, 3 * 4096);
        volume_write(&inner, 2 * CHUNK, 4096);
        inner.finish_jobs(rx.try_iter().collect(), &zeros);
        assert_eq!(lock(&inner.index).next, 5);
        inner.release(0, 2 * CHUNK).unwrap();
        assert_eq!(lock(&inner.index).used_blocks, 1);
        // One block each into chunks 5, 6 and 7: chunk 0's place, then the front of chunk
        // 1's, then the next block of it; a 2-block run finds no place left (one block of
        // chunk 1's) and goes to the end.
        let mut offsets = Vec::new();
        for (chunk, blocks) in [(5, 1), (6, 1), (7, 1), (8, 2)] {
            volume_write(&inner, chunk * CHUNK + 9 * BLOCK, blocks * 4096);
            let jobs: Vec<StoreJob> = rx.try_iter().collect();
            offsets.extend(jobs.iter().map(|j| j.offset / BLOCK));
            inner.finish_jobs(jobs, &zeros);
        }
        assert_eq!(offsets, vec![0, 1, 2, 5]);
        let idx = lock(&inner.index);
        assert_eq!(idx.next, 7, "only the 2-block run grew the store");
        assert_eq!(idx.used_blocks, 1 + 3 + 2);
        assert_eq!(idx.free_runs.iter().map(Vec::len).sum::<usize>(), 1);
        drop(idx);
        let mut back = vec![0u8; 1 << 20];
        inner
            .read(2 * CHUNK, &mut back[2 * CHUNK as usize..])
            .unwrap();
        assert!(back[2 * CHUNK as usize..] == original(1 << 20)[2 * CHUNK as usize..]);
    }
}
