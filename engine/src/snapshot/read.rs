//! The snapshot's read path: old contents from memory, the COW store or the volume, and
//! releasing and describing ranges.

use super::{lock, Chunk, Index, SnapshotError, SnapshotInner};

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

    /// Fill `out`, the bytes at `pos` inside chunk `c`, from a state that holds the
    /// chunk's old contents; `false` when the state says "read the volume".
    pub(super) fn fill_from(
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

    pub(super) fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), SnapshotError> {
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

    /// Allocation of `[offset, offset + len)` as at most `max_runs` `(length, is_hole)`
    /// runs (they end before the range does when there are more).
    ///
    /// The volume's allocation now, overlaid with what the snapshot knows better: chunks
    /// copied before being overwritten are data, chunks that were holes when first written
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
        // `(chunk, is_hole)` of the window's index entries that override the volume.
        let mut states: Vec<(u64, bool)> = Vec::new();
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
                for (seen, (&k, s)) in idx
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
                    let hole = match s {
                        Chunk::Preserved(_) | Chunk::Reading | Chunk::InMemory { .. } => false,
                        Chunk::Zero => true,
                        Chunk::Released => continue,
                    };
                    states.push((k, hole));
                }
            }
            let mut next = 0;
            for (start, run_stop, data) in runs {
                if start >= stop {
                    break;
                }
                let run_stop = run_stop.min(stop);
                let mut at = start;
                while let Some(&(k, hole)) = states.get(next) {
                    if k * self.chunk >= run_stop {
                        break;
                    }
                    let from = (k * self.chunk).max(at);
                    let to = ((k + 1) * self.chunk).min(run_stop);
                    push(&mut out, from - at, !data);
                    push(&mut out, to - from, hole);
                    at = to;
                    if (k + 1) * self.chunk > run_stop {
                        // The chunk goes on in the next run.
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
