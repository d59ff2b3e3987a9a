//! The COW store: slot allocation (preallocated in steps, up to the limit) and the
//! background writer that stores old contents and marks their chunks preserved.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Weak};

use super::buffers::CopyBuf;
use super::{lock, Chunk, Index, SnapshotError, SnapshotInner, PREALLOC_STEP};

/// One background store write: a run of chunks read together.
#[derive(Debug)]
pub(super) struct StoreJob {
    pub(super) data: Arc<CopyBuf>,
    pub(super) first_slot: u64,
    pub(super) chunks: Vec<u64>,
}

/// Jobs the background writer takes at once...
const MAX_BATCH_JOBS: usize = 1024;
/// ...and the most bytes it writes in one call.
const MAX_STORE_WRITE: u64 = 8 << 20;

impl SnapshotInner {
    /// Reserve a slot for one chunk, growing the COW store in steps.
    pub(super) fn alloc_slot(&self, idx: &mut Index) -> Result<u64, String> {
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
    pub(super) fn finish_jobs(&self, mut jobs: Vec<StoreJob>) {
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
    pub(super) fn finish_group(&self, group: &[StoreJob], result: io::Result<()>) {
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
}
