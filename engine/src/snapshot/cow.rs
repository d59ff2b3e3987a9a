//! Copy-before-write: claim the chunks a volume write touches, read their old contents
//! and hand them to the store writer, holding writers while too much waits in memory.

use std::sync::{Arc, PoisonError};

use super::buffers::CopyBuf;
use super::store::StoreJob;
use super::{lock, Chunk, SnapshotInner};

/// Old contents held in memory at most, read or being read (writers wait above this).
const MAX_IN_FLIGHT: u64 = 64 << 20;
/// A large write, TRIM or WRITE_ZEROES is preserved this many bytes at a time (at least
/// one chunk), each piece under [`MAX_IN_FLIGHT`]: a 2 GiB discard never reads 2 GiB
/// into one buffer.
const MAX_PIECE: u64 = 1 << 20;

impl SnapshotInner {
    /// Copy-before-write: preserve every chunk touched by `[offset, offset + len)`.
    /// Returns once the old contents of all of them are safe (in memory on their way to
    /// the store, or in the store), or the snapshot failed. Never fails the caller: a COW
    /// store problem fails the snapshot, not the volume write.
    pub(crate) fn preserve(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = offset.saturating_add(len).min(self.size);
        let last = end.div_ceil(self.chunk);
        let per_piece = (MAX_PIECE / self.chunk).max(1);
        let mut waiting: Vec<u64> = Vec::new();
        let mut first = offset / self.chunk;
        while first < last {
            let piece = first..(first + per_piece).min(last);
            first = piece.end;
            let Some(claimed) = self.claim(piece, &mut waiting) else {
                return;
            };
            if !claimed.is_empty() {
                self.copy_chunks(&claimed);
            }
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

    /// Claim the absent chunks of `chunks` (a piece of at most [`MAX_PIECE`] bytes) once the
    /// memory budget has room for them, giving them with their new slots; chunks another
    /// writer is reading go to `waiting`. `None`: the snapshot failed or was dropped.
    fn claim(
        &self,
        chunks: std::ops::Range<u64>,
        waiting: &mut Vec<u64>,
    ) -> Option<Vec<(u64, u64)>> {
        let mut idx = lock(&self.index);
        // Bound the memory held by old contents: wait until what this piece still has to
        // read fits (a piece always goes when nothing else is in memory). A rewrite of
        // chunks already preserved needs no room and never waits.
        let needed = |idx: &super::Index| {
            chunks
                .clone()
                .filter(|c| !idx.chunks.contains_key(c))
                .count() as u64
                * self.chunk
        };
        while idx.in_flight + idx.reading > 0
            && idx.in_flight + idx.reading + needed(&idx) > MAX_IN_FLIGHT
            && idx.failed.is_none()
            && !idx.dropped
        {
            idx = self
                .copied
                .wait(idx)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if idx.failed.is_some() || idx.dropped {
            return None;
        }
        let mut claimed: Vec<(u64, u64)> = Vec::new();
        for c in chunks {
            match idx.chunks.get(&c) {
                None => match self.alloc_slot(&mut idx) {
                    Ok(slot) => {
                        idx.chunks.insert(c, Chunk::Reading);
                        claimed.push((c, slot));
                    }
                    Err(reason) => {
                        // Undo this piece's claims so nobody waits for them.
                        for (c, _) in claimed {
                            idx.chunks.remove(&c);
                        }
                        self.fail(&mut idx, reason);
                        return None;
                    }
                },
                Some(Chunk::Reading) => waiting.push(c),
                Some(_) => {}
            }
        }
        idx.reading += claimed.len() as u64 * self.chunk;
        Some(claimed)
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
                idx.reading -= run.len() as u64 * self.chunk;
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
            idx.reading -= run.len() as u64 * self.chunk;
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
}
