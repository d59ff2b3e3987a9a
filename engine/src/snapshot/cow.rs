//! Copy-before-write: claim the blocks a volume write touches, read their old contents
//! and hand them to the store writer, holding writers while too much waits in memory.

use std::ops::Range;
use std::sync::{Arc, PoisonError};

use super::buffers::CopyBuf;
use super::store::{Piece, StoreJob};
use super::{lock, mask_of, runs_of, Index, Mask, Pending, Pos, SnapshotInner, NO_SLOT};

/// Old contents held in memory at most, read or being read (writers wait above this).
const MAX_IN_FLIGHT: u64 = 64 << 20;
/// A large write, TRIM or WRITE_ZEROES is preserved this many bytes at a time (at least
/// one chunk), each piece under [`MAX_IN_FLIGHT`]: a 2 GiB discard never reads 2 GiB
/// into one buffer.
const MAX_PIECE: u64 = 1 << 20;

/// Blocks of one chunk that a writer claimed, and the chunk's slot they go to
/// ([`NO_SLOT`]: the chunk's first claim, for its log run).
#[derive(Debug, Clone, Copy)]
struct Claim {
    chunk: u64,
    blocks: Mask,
    slot: Pos,
}

impl SnapshotInner {
    /// The blocks of chunk `c` that bytes `[start, end)` touch.
    fn blocks_touched(&self, c: u64, start: u64, end: u64) -> Mask {
        let base = c * self.chunk;
        let from = start.max(base) - base;
        let to = end.min(base + self.chunk).saturating_sub(base);
        if to <= from {
            return 0;
        }
        let first = from / self.block;
        mask_of(first as u32, (to.div_ceil(self.block) - first) as u32)
    }

    /// Copy-before-write: preserve every block touched by `[offset, offset + len)`.
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
        let mut waiting: Vec<(u64, Mask)> = Vec::new();
        let mut first = offset / self.chunk;
        while first < last {
            let piece = first..(first + per_piece).min(last);
            first = piece.end;
            let Some(claimed) = self.claim(piece, offset..end, &mut waiting) else {
                return;
            };
            if !claimed.is_empty() {
                self.copy_blocks(&claimed);
            }
        }
        if !waiting.is_empty() {
            let mut idx = lock(&self.index);
            while idx.failed.is_none()
                && !idx.dropped
                && waiting.iter().any(|&(c, blocks)| {
                    idx.chunks
                        .get(&c)
                        .is_some_and(|st| st.reading() & blocks != 0)
                })
            {
                idx = self
                    .copied
                    .wait(idx)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
    }

    /// Claim the blocks of `chunks` (a piece of at most [`MAX_PIECE`] bytes) that `bytes`
    /// touch and nobody preserved yet, once the memory budget has room for them; blocks
    /// another writer is reading go to `waiting`. A chunk's first claim goes to its log
    /// run (placed once read), a later one to its slot, which it gets then. `None`: the
    /// snapshot failed or was dropped.
    fn claim(
        &self,
        chunks: Range<u64>,
        bytes: Range<u64>,
        waiting: &mut Vec<(u64, Mask)>,
    ) -> Option<Vec<Claim>> {
        let fresh = |idx: &Index, c: u64| {
            let st = idx.chunks.get(&c).copied().unwrap_or_default();
            if st.released() {
                (st, 0)
            } else {
                (
                    st,
                    self.blocks_touched(c, bytes.start, bytes.end) & !st.claimed,
                )
            }
        };
        let mut idx = lock(&self.index);
        // Bound the memory held by old contents: wait until what this piece still has to
        // read fits (a piece always goes when nothing else is in memory). A rewrite of
        // blocks already preserved needs no room and never waits.
        let needed = |idx: &Index| {
            chunks
                .clone()
                .map(|c| u64::from(fresh(idx, c).1.count_ones()))
                .sum::<u64>()
                * self.block
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
        let mut claimed: Vec<Claim> = Vec::new();
        for c in chunks {
            let (mut st, blocks) = fresh(&idx, c);
            let busy = self.blocks_touched(c, bytes.start, bytes.end) & st.reading();
            if busy != 0 {
                waiting.push((c, busy));
            }
            if blocks == 0 {
                continue;
            }
            let slot = if st.claimed == 0 {
                // Nothing of the chunk claimed before: one run, for the log.
                st.logged = blocks;
                NO_SLOT
            } else if st.has_slot() {
                st.slot
            } else {
                let chunk_blocks = idx.chunk_blocks;
                match self.alloc(&mut idx, chunk_blocks) {
                    Ok(slot) => {
                        st.slot = slot;
                        slot
                    }
                    Err(reason) => {
                        // Undo this piece's claims so nobody waits for them.
                        for claim in &claimed {
                            unclaim(&mut idx, claim.chunk, claim.blocks);
                        }
                        self.fail(&mut idx, reason);
                        return None;
                    }
                }
            };
            st.claimed |= blocks;
            idx.chunks.insert(c, st);
            claimed.push(Claim {
                chunk: c,
                blocks,
                slot,
            });
        }
        idx.reading += claimed
            .iter()
            .map(|c| u64::from(c.blocks.count_ones()))
            .sum::<u64>()
            * self.block;
        Some(claimed)
    }

    /// Read the old contents of claimed blocks and hand them to the background writer;
    /// runs adjacent in the volume and bound for the log, or for slots that follow
    /// each other) move in one read and one write. Runs that are holes in the volume are
    /// recorded as zero, not copied.
    fn copy_blocks(&self, claimed: &[Claim]) {
        let per_chunk = (self.chunk / self.block) as u32;
        let pieces: Vec<Piece> = claimed
            .iter()
            .flat_map(|claim| {
                runs_of(claim.blocks).map(move |(first, count)| Piece {
                    chunk: claim.chunk,
                    first,
                    count,
                    slot: claim.slot,
                    // A log run's place is taken once it is read.
                    pos: if claim.slot == NO_SLOT {
                        0
                    } else {
                        u64::from(claim.slot) + u64::from(first)
                    },
                })
            })
            .collect();
        let mut i = 0;
        while i < pieces.len() {
            let mut j = i + 1;
            while j < pieces.len() {
                let (a, b) = (&pieces[j - 1], &pieces[j]);
                let logged = a.slot == NO_SLOT && b.slot == NO_SLOT;
                let slots_follow = a.slot != NO_SLOT
                    && b.slot != NO_SLOT
                    && u64::from(b.slot) == u64::from(a.slot) + u64::from(per_chunk);
                if b.chunk != a.chunk + 1
                    || a.first + a.count != per_chunk
                    || b.first != 0
                    || !(logged || slots_follow)
                {
                    break;
                }
                j += 1;
            }
            let mut run = pieces[i..j].to_vec();
            i = j;
            let start = self.piece_start(&run[0]);
            let last = &run[run.len() - 1];
            let end = (self.piece_start(last) + u64::from(last.count) * self.block).min(self.size);
            let blocks: u64 = run.iter().map(|p| u64::from(p.count)).sum();
            let hole = self
                .origin
                .allocation(start, end - start)
                .is_some_and(|runs| runs.iter().all(|&(_, _, data)| !data));
            if hole {
                let mut idx = lock(&self.index);
                idx.reading -= blocks * self.block;
                for p in &run {
                    if let Some(st) = idx.chunks.get_mut(&p.chunk) {
                        st.zero |= mask_of(p.first, p.count);
                    }
                    idx.settle(p.chunk);
                }
                self.copied.notify_all();
                continue;
            }
            let read = self
                .pool
                .take((end - start) as usize)
                .and_then(|mut buf| self.origin.read_at(start, buf.as_mut_slice()).map(|()| buf));
            let mut idx = lock(&self.index);
            idx.reading -= blocks * self.block;
            // A log run takes the store's next blocks now, in the order reads complete,
            // so the copies of concurrent first writes follow each other in the store.
            let placed = read
                .map_err(|err| format!("reading the volume for copy-before-write failed: {err}"))
                .and_then(|buf| {
                    if run[0].slot == NO_SLOT {
                        let pos = self.alloc(&mut idx, blocks as u32)?;
                        self.place_log_run(&mut idx, &mut run, pos);
                    }
                    Ok(buf)
                });
            let buf = match placed {
                Ok(buf) => buf,
                Err(reason) => {
                    for p in &run {
                        unclaim(&mut idx, p.chunk, mask_of(p.first, p.count));
                    }
                    self.fail(&mut idx, reason);
                    return;
                }
            };
            let data = Arc::new(CopyBuf {
                buf: Some(buf),
                pool: self.pool.clone(),
            });
            for p in &run {
                if let Some(st) = idx.chunks.get_mut(&p.chunk) {
                    st.in_slot |= mask_of(p.first, p.count);
                }
                idx.pending.insert(
                    (p.chunk, p.first),
                    Pending {
                        data: data.clone(),
                        at: (self.piece_start(p) - start) as usize,
                        count: p.count,
                        pos: p.pos,
                    },
                );
            }
            idx.in_flight += data.len();
            self.copied.notify_all();
            let job = StoreJob {
                offset: run[0].pos * self.block,
                data,
                pieces: run,
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

    /// Where a piece's first block lies in the volume.
    pub(super) fn piece_start(&self, p: &Piece) -> u64 {
        p.chunk * self.chunk + u64::from(p.first) * self.block
    }

    /// Give the log run `run` (one piece per chunk, each its chunk's first claim) the
    /// store blocks from `pos`, back to back.
    fn place_log_run(&self, idx: &mut Index, run: &mut [Piece], pos: Pos) {
        let mut at = u64::from(pos);
        for p in run {
            p.pos = at;
            if let Some(st) = idx.chunks.get_mut(&p.chunk) {
                // `alloc` keeps every position below `RELEASED`.
                st.log = at as Pos;
            }
            at += u64::from(p.count);
        }
    }
}

/// Undo the claim of `blocks` of chunk `c` (their old contents were never read).
fn unclaim(idx: &mut Index, c: u64, blocks: Mask) {
    if let Some(st) = idx.chunks.get_mut(&c) {
        st.claimed &= !blocks;
        st.logged &= !blocks;
    }
    idx.settle(c);
}

#[cfg(test)]
mod tests {
    use super::super::ChunkState;
    use super::*;

    #[test]
    fn masks_and_runs_cover_exactly_the_blocks_asked_for() {
        assert_eq!(mask_of(0, 0), 0);
        assert_eq!(mask_of(3, 2), 0b11000);
        assert_eq!(mask_of(0, 32), Mask::MAX);
        assert_eq!(mask_of(31, 1), 1 << 31);
        let runs: Vec<_> = runs_of(0b1110_0110 | 1 << 31).collect();
        assert_eq!(runs, vec![(1, 2), (5, 3), (31, 1)]);
        assert_eq!(runs_of(Mask::MAX).collect::<Vec<_>>(), vec![(0, 32)]);
    }

    /// The index holds one state per touched chunk, as before, and each is smaller than
    /// the 32-byte chunk state it replaced (an enum holding an `Arc`, an offset and a slot).
    #[test]
    fn the_index_entry_is_no_larger_than_before() {
        assert!(std::mem::size_of::<ChunkState>() <= 24);
    }
}
