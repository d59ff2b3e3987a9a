//! The snapshot's read path: old contents from memory, the COW store or the volume, and
//! releasing and describing ranges.

use std::sync::Arc;

use super::buffers::CopyBuf;
use super::{
    lock, mask_of, runs_of, ChunkState, Index, Mask, SnapshotError, SnapshotInner, NO_SLOT,
    RELEASED,
};

/// Where old contents of a range come from.
#[derive(Debug, Clone)]
enum Source {
    /// The block was a hole in the volume.
    Zero,
    /// In memory on its way to the store, from this offset of the buffer.
    Memory(Arc<CopyBuf>, usize),
    /// In the COW store at this offset.
    Store(u64),
}

/// Append `[s, e)` from `source` to `out`, extending the last run when it continues it.
fn push_source(out: &mut Vec<(u64, u64, Source)>, s: u64, e: u64, source: Source) {
    if let Some((last_start, last_end, last)) = out.last_mut() {
        let len = *last_end - *last_start;
        let continues = *last_end == s
            && match (&*last, &source) {
                (Source::Zero, Source::Zero) => true,
                (Source::Store(a), Source::Store(b)) => a + len == *b,
                (Source::Memory(d, a), Source::Memory(d2, b)) => {
                    Arc::ptr_eq(d, d2) && a + len as usize == *b
                }
                _ => false,
            };
        if continues {
            *last_end = e;
            return;
        }
    }
    out.push((s, e, source));
}

/// COW index entries looked at per hold of the index lock while describing allocation.
const WINDOW_CHUNKS: usize = 4096;

impl SnapshotInner {
    pub(super) fn check_readable(&self, idx: &Index) -> Result<(), SnapshotError> {
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

    pub(super) fn check_range(&self, offset: u64, len: u64) -> Result<(), SnapshotError> {
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

    /// Where the old contents of the held blocks (in the store or zero) of `[from, to)`
    /// come from, as runs `(start, end, source)` in order; the other bytes are the
    /// volume's.
    fn held_sources(&self, idx: &Index, from: u64, to: u64) -> Vec<(u64, u64, Source)> {
        let mut out: Vec<(u64, u64, Source)> = Vec::new();
        for (&c, st) in idx.chunks.range(from / self.chunk..to.div_ceil(self.chunk)) {
            let base = c * self.chunk;
            for (first, count) in runs_of(st.held()) {
                for b in first..first + count {
                    let block_start = base + u64::from(b) * self.block;
                    let s = block_start.max(from);
                    let e = (block_start + self.block).min(to);
                    if e <= s {
                        continue;
                    }
                    let source = if st.zero & mask_of(b, 1) != 0 {
                        Source::Zero
                    } else {
                        let pos = st.store_pos(b);
                        match idx.pending.range(..=(c, b)).next_back() {
                            Some((&(pc, pf), p))
                                if pc == c
                                    && b < pf + p.count
                                    && p.pos + u64::from(b - pf) == pos =>
                            {
                                let piece_start = base + u64::from(pf) * self.block;
                                Source::Memory(p.data.clone(), p.at + (s - piece_start) as usize)
                            }
                            _ => Source::Store(pos * self.block + (s - block_start)),
                        }
                    };
                    push_source(&mut out, s, e, source);
                }
            }
        }
        out
    }

    /// Where the first held block at or after `pos` (whose own block is not held)
    /// starts, or `u64::MAX`.
    fn next_held(&self, idx: &Index, pos: u64) -> u64 {
        let c = pos / self.chunk;
        let b = ((pos - c * self.chunk) / self.block) as u32;
        let above = idx
            .chunks
            .get(&c)
            .map_or(0, |st| st.held() & !mask_of(0, b + 1));
        if above != 0 {
            return c * self.chunk + u64::from(above.trailing_zeros()) * self.block;
        }
        idx.chunks
            .range(c + 1..)
            .find(|(_, st)| st.held() != 0)
            .map_or(u64::MAX, |(&k, st)| {
                k * self.chunk + u64::from(st.held().trailing_zeros()) * self.block
            })
    }

    /// Copy `sources` into `buf`, which holds the bytes from `offset`.
    fn fill(
        &self,
        offset: u64,
        buf: &mut [u8],
        sources: &[(u64, u64, Source)],
    ) -> Result<(), SnapshotError> {
        for (s, e, source) in sources {
            let out = &mut buf[(s - offset) as usize..(e - offset) as usize];
            match source {
                Source::Zero => out.fill(0),
                Source::Memory(data, at) => out.copy_from_slice(&data.bytes()[*at..at + out.len()]),
                Source::Store(at) => {
                    self.store
                        .read_at(*at, out)
                        .map_err(|source| SnapshotError::Io {
                            name: self.name.clone(),
                            action: "read COW store",
                            path: self.store_path.clone(),
                            source,
                        })?
                }
            }
        }
        Ok(())
    }

    pub(super) fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), SnapshotError> {
        self.check_range(offset, buf.len() as u64)?;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let (run_end, held) = {
                let idx = lock(&self.index);
                self.check_readable(&idx)?;
                let c = pos / self.chunk;
                let b = ((pos - c * self.chunk) / self.block) as u32;
                let held = idx.chunks.get(&c).map_or(0, |st| st.held());
                if held & mask_of(b, 1) != 0 {
                    let blocks = (held >> b).trailing_ones();
                    let run_end = (c * self.chunk + u64::from(b + blocks) * self.block).min(end);
                    (run_end, Some(self.held_sources(&idx, pos, run_end)))
                } else {
                    (self.next_held(&idx, pos).min(end), None)
                }
            };
            if let Some(sources) = held {
                self.fill(offset, buf, &sources)?;
                pos = run_end;
                continue;
            }
            // A run of blocks whose old contents are still in the volume: read them in one
            // go, then take again from the index any block whose old contents moved out
            // meanwhile (the volume may have been overwritten under our read).
            let at = (pos - offset) as usize;
            self.origin
                .read_at(pos, &mut buf[at..at + (run_end - pos) as usize])
                .map_err(|source| SnapshotError::Io {
                    name: self.name.clone(),
                    action: "read volume",
                    path: self.origin.path().to_path_buf(),
                    source,
                })?;
            let moved = {
                let idx = lock(&self.index);
                self.check_readable(&idx)?;
                self.held_sources(&idx, pos, run_end)
            };
            self.fill(offset, buf, &moved)?;
            pos = run_end;
        }
        Ok(())
    }

    /// TRIM on the snapshot: release whole chunks inside the range.
    pub(super) fn release(&self, offset: u64, len: u64) -> Result<(), SnapshotError> {
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
        let chunk_blocks = idx.chunk_blocks;
        for c in first..last {
            let st = idx.chunks.get(&c).copied().unwrap_or_default();
            // A chunk a writer is still reading is left alone.
            if st.released() || st.reading() != 0 {
                continue;
            }
            // Copies still in memory free their place when they are written.
            if st.has_slot() && !idx.pending_in(c, st.slot, chunk_blocks) {
                idx.free_area(st.slot, chunk_blocks);
                punch.push(st.slot);
            }
            let log_blocks = (st.logged & st.in_slot).count_ones();
            if st.log != NO_SLOT && !idx.pending_in(c, st.log, log_blocks) {
                if log_blocks == chunk_blocks {
                    idx.free_area(st.log, log_blocks);
                    punch.push(st.log);
                } else {
                    self.free_log_run(&mut idx, st.log, log_blocks);
                }
            }
            idx.chunks.insert(
                c,
                ChunkState {
                    slot: RELEASED,
                    claimed: Mask::MAX,
                    ..ChunkState::default()
                },
            );
        }
        // Punching under the lock keeps a freed place from being reused before it is
        // punched (a reuse would otherwise lose its fresh copy to our punch).
        for pos in punch {
            if let Err(err) = self.store.discard(u64::from(pos) * self.block, self.chunk) {
                // Space is not returned, but the data is still correct.
                tracing::debug!(
                    "snapshot {}: punching COW slot at block {pos}: {err}",
                    self.name
                );
            }
        }
        Ok(())
    }

    /// Allocation of `[offset, offset + len)` as at most `max_runs` `(length, is_hole)`
    /// runs (they end before the range does when there are more).
    ///
    /// The volume's allocation now, overlaid with what the snapshot knows better: blocks
    /// copied before being overwritten are data, blocks that were holes when first written
    /// are holes. Built a window at a time: the volume's runs for the window (one or two
    /// lseek calls each, as many as still fit under the cap), then the COW index entries
    /// of the window copied under the index lock (at most [`WINDOW_CHUNKS`] per hold, so a
    /// writer's copy-before-write never waits behind a long walk), then the runs built
    /// with the lock released. The work stops once the cap is reached: a huge range over a
    /// fragmented snapshot costs the cap (plus the index entries of the ranges those runs
    /// cover), not the range.
    pub(super) fn allocation(
        &self,
        offset: u64,
        len: u64,
        max_runs: usize,
    ) -> Result<Vec<(u64, bool)>, SnapshotError> {
        let end = offset.saturating_add(len).min(self.size);
        let max_runs = max_runs.max(1);
        let mut out: Vec<(u64, bool)> = Vec::new();
        let push = |out: &mut Vec<(u64, bool)>, len: u64, hole: bool| match out.last_mut() {
            Some((l, h)) if *h == hole => *l += len,
            _ if len > 0 => out.push((len, hole)),
            _ => {}
        };
        // `[start, end, is_hole)` of the window's claimed blocks, which override the volume:
        // blocks copied (or being copied) before being overwritten are data, blocks that
        // were holes when first written are holes. Sorted, disjoint.
        let mut states: Vec<(u64, u64, bool)> = Vec::new();
        let mut pos = offset;
        // One run past the cap proves the first `max_runs` complete.
        while pos < end && out.len() <= max_runs {
            let want = (max_runs - out.len()).saturating_add(1);
            let Some(runs) = self.origin.allocation_capped(pos, end - pos, want) else {
                // The volume cannot tell (a device): all data.
                push(&mut out, end - pos, false);
                break;
            };
            let mut stop = runs.last().map_or(end, |r| r.1);
            states.clear();
            {
                let idx = lock(&self.index);
                self.check_readable(&idx)?;
                for (seen, (&k, st)) in idx
                    .chunks
                    .range(pos / self.chunk..stop.div_ceil(self.chunk))
                    .enumerate()
                {
                    if seen == WINDOW_CHUNKS {
                        // The window ends before this chunk (past `pos`: the chunks seen
                        // so far are all after pos's).
                        stop = stop.min(k * self.chunk);
                        break;
                    }
                    if st.released() {
                        continue;
                    }
                    for (first, count) in runs_of(st.claimed) {
                        for b in first..first + count {
                            let start = k * self.chunk + u64::from(b) * self.block;
                            let hole = st.zero & mask_of(b, 1) != 0;
                            match states.last_mut() {
                                Some((_, e, h)) if *e == start && *h == hole => {
                                    *e = start + self.block
                                }
                                _ => states.push((start, start + self.block, hole)),
                            }
                        }
                    }
                }
            }
            let mut next = 0;
            for (start, run_stop, data) in runs {
                if start >= stop {
                    break;
                }
                let run_stop = run_stop.min(stop);
                let mut at = start;
                while let Some(&(s_start, s_end, hole)) = states.get(next) {
                    if s_start >= run_stop {
                        break;
                    }
                    let from = s_start.max(at);
                    let to = s_end.min(run_stop);
                    if to > from {
                        push(&mut out, from - at, !data);
                        push(&mut out, to - from, hole);
                        at = to;
                    }
                    if s_end > run_stop {
                        // The blocks go on in the next run.
                        break;
                    }
                    next += 1;
                }
                push(&mut out, run_stop - at, !data);
            }
            pos = stop;
        }
        out.truncate(max_runs);
        Ok(out)
    }
}
