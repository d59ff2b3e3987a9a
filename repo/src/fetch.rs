//! Fetching many chunk slots of a point with few requests, for `repo restore` and
//! `repo export`'s read-ahead.
//!
//! A backup writes a point's chunks into its packs in slot order, so neighbouring slots'
//! chunks usually lie back to back in one pack. [`plan_runs`] groups such slots into runs;
//! [`fetch_run`] reads a run's bytes with one ranged GET of its pack (fewer round trips to
//! an S3 store, fewer opens and reads on a directory), then checks and inflates every
//! chunk of the run on the blocking pool at once, so both CPUs verify while the next run is
//! on the wire. Each blob is still checked on its own (CRC, inflate, SHA-256) before a byte
//! of it is used: reading through a neighbour's bytes trusts nothing.
//!
//! Memory: a run holds at most [`RunLimits::bytes`] stored bytes and, inflated, its slots.
//! A caller that keeps chunks (`repo export`'s cache) hands evicted chunks' memory back
//! through [`SpareBuffer`], so inflating does not fault in fresh pages for every chunk.

use std::collections::HashMap;
use std::ops::Range;

use bytes::Bytes;

use crate::format::{ChunkId, ChunkRef, PointIndex};
use crate::{compose_slot, point_path, Location, RepoError, Repository, Result};

/// How large a run may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunLimits {
    /// Most stored bytes one ranged GET reads (a single chunk larger than this is its own run).
    pub bytes: u64,
    /// Most slots in one run.
    pub slots: usize,
}

impl Default for RunLimits {
    fn default() -> Self {
        RunLimits {
            bytes: 16 << 20,
            slots: 8,
        }
    }
}

/// Largest gap between two blobs of a run that is read through (and dropped) rather than
/// split into two GETs: about what one more request costs on S3.
const MAX_GAP: u64 = 256 << 10;

/// Runs a slot may still join (see [`plan_runs`]): more than a backup's pack workers.
const OPEN_RUNS: usize = 8;

/// Slots fetched together: `span` is the pack and byte range read with one GET (`None`
/// when the slot has no chunk of its own, only pieces over zeros).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub span: Option<([u8; 32], Range<u64>)>,
    pub slots: Vec<u64>,
}

/// Slot `index` as a run of its own: its chunk's blob (none for a zero chunk).
pub fn slot_run(point: &PointIndex, map: &HashMap<ChunkId, Location>, index: u64) -> Result<Run> {
    let corrupt = |why: String| RepoError::Corrupt {
        object: point_path(&point.volume, &point.checkpoint).to_string(),
        why,
    };
    let span = match point.chunks.get(index as usize) {
        Some(ChunkRef::Data(id)) => {
            let at = map.get(id).ok_or_else(|| {
                corrupt(format!(
                    "its chunk {index} ({}) is in no pack index; run `tidemark repo verify`",
                    id.hex()
                ))
            })?;
            let start = at.entry.offset;
            Some((at.pack, start..start + u64::from(at.entry.stored_len)))
        }
        Some(ChunkRef::Zero) => None,
        None => return Err(corrupt(format!("it has no chunk slot {index}"))),
    };
    Ok(Run {
        span,
        slots: vec![index],
    })
}

/// Group `slots` (ascending) into runs, in the order of their first slots: a slot joins one
/// of the last [`OPEN_RUNS`] runs when its chunk is in the same pack, at most [`MAX_GAP`]
/// after the run's end (or inside it: the same chunk again), and the run stays within
/// `limits`. Several runs stay open because a backup's pack workers each fill a pack of
/// their own: neighbouring slots alternate between packs, each pack in slot order.
pub fn plan_runs(
    point: &PointIndex,
    map: &HashMap<ChunkId, Location>,
    slots: impl IntoIterator<Item = u64>,
    limits: RunLimits,
) -> Result<Vec<Run>> {
    let mut runs: Vec<Run> = Vec::new();
    for index in slots {
        let run = slot_run(point, map, index)?;
        if let Some((pack, blob)) = &run.span {
            let open = runs.len().saturating_sub(OPEN_RUNS);
            let joined = runs[open..].iter_mut().rev().find_map(|last| {
                let (last_pack, range) = last.span.as_mut()?;
                let joins = last_pack == pack
                    && blob.start >= range.start
                    && blob.start <= range.end + MAX_GAP
                    && blob.end.max(range.end) - range.start <= limits.bytes
                    && last.slots.len() < limits.slots;
                joins.then(|| {
                    range.end = range.end.max(blob.end);
                    last.slots.push(index);
                })
            });
            if joined.is_some() {
                continue;
            }
        }
        runs.push(run);
    }
    Ok(runs)
}

/// Memory for a whole chunk of plaintext, recycled from an earlier one (`None`: allocate).
pub type SpareBuffer<'a> = &'a (dyn Fn() -> Option<Vec<u8>> + Sync);

/// The slots of `run`, in its order: one ranged GET of the run's span, then each slot
/// composed from its chunk and pieces (a piece's chunk outside the span is read on its
/// own), every chunk checked and inflated on the blocking pool, all slots at once. Whole
/// chunks inflate into memory from `spare` when it has some.
pub async fn fetch_run(
    repo: &Repository,
    point: &PointIndex,
    map: &HashMap<ChunkId, Location>,
    run: &Run,
    spare: SpareBuffer<'_>,
) -> Result<Vec<Vec<u8>>> {
    let span = match &run.span {
        Some((pack, range)) => Some((*pack, range.clone(), repo.read_range(pack, range).await?)),
        None => None,
    };
    let span = &span;
    let slots = run.slots.iter().map(|&index| {
        compose_slot(point, index, map, move |id, at| async move {
            let blob: Bytes = match span {
                Some((pack, range, bytes))
                    if at.pack == *pack
                        && at.entry.offset >= range.start
                        && at.entry.offset + u64::from(at.entry.stored_len) <= range.end =>
                {
                    let from = (at.entry.offset - range.start) as usize;
                    bytes.slice(from..from + at.entry.stored_len as usize)
                }
                _ => repo.read_blob(&id, &at).await?,
            };
            let out = match at.entry.raw_len == point.chunk_size {
                true => spare().unwrap_or_default(),
                false => Vec::new(),
            };
            // Inflating and hashing 4 MiB takes milliseconds: off the runtime's worker threads.
            let repo = repo.clone();
            tokio::task::spawn_blocking(move || repo.inflate_chunk_into(&blob, &id, &at, out))
                .await
                .map_err(|e| RepoError::Invalid(format!("checking chunk {}: {e}", id.hex())))?
        })
    });
    futures::future::try_join_all(slots).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::PackEntry;

    fn location(pack: u8, offset: u64, stored_len: u32) -> Location {
        Location {
            pack: [pack; 32],
            entry: PackEntry {
                id: ChunkId([0; 32]),
                offset,
                stored_len,
                raw_len: 1 << 16,
                crc: 0,
            },
        }
    }

    /// A point of `chunks` (data chunk `k` is `ChunkId([k; 32])`) and the map placing them.
    fn point(chunks: &[Option<(u8, u64, u32)>]) -> (PointIndex, HashMap<ChunkId, Location>) {
        let mut map = HashMap::new();
        let refs = chunks
            .iter()
            .enumerate()
            .map(|(k, c)| match c {
                Some((pack, offset, len)) => {
                    let id = ChunkId([k as u8 + 1; 32]);
                    map.insert(id, location(*pack, *offset, *len));
                    ChunkRef::Data(id)
                }
                None => ChunkRef::Zero,
            })
            .collect::<Vec<_>>();
        let point = PointIndex {
            volume: "vm".into(),
            volume_uuid: [1; 16],
            checkpoint: "a".into(),
            parent: String::new(),
            created_unix: 1,
            size: refs.len() as u64 * (1 << 16),
            chunk_size: 1 << 16,
            granularity: 1 << 16,
            new_bytes: 0,
            chunks: refs,
            pieces: Vec::new(),
        };
        (point, map)
    }

    #[test]
    fn neighbours_in_one_pack_share_a_run_within_the_limits() {
        let (point, map) = point(&[
            Some((1, 8, 100)),
            Some((1, 108, 100)),
            Some((1, 208 + MAX_GAP, 100)),
            Some((2, 8, 100)),
            None,
            Some((2, 108, 100)),
            Some((2, 408 + MAX_GAP, 100)),
            Some((2, 8, 100)),
        ]);
        let limits = RunLimits {
            bytes: 1 << 20,
            slots: 8,
        };
        let runs = plan_runs(&point, &map, 0..8, limits).unwrap();
        let shape: Vec<_> = runs
            .iter()
            .map(|r| {
                (
                    r.span.as_ref().map(|(p, range)| (p[0], range.clone())),
                    r.slots.clone(),
                )
            })
            .collect();
        assert_eq!(
            shape,
            [
                (Some((1, 8..308 + MAX_GAP)), vec![0, 1, 2]),
                (Some((2, 8..208)), vec![3, 5, 7]),
                (None, vec![4]),
                (Some((2, 408 + MAX_GAP..508 + MAX_GAP)), vec![6]),
            ]
        );
        let few = RunLimits {
            bytes: 1 << 20,
            slots: 2,
        };
        assert_eq!(plan_runs(&point, &map, 0..3, few).unwrap().len(), 2);
        let small = RunLimits {
            bytes: 150,
            slots: 8,
        };
        assert_eq!(plan_runs(&point, &map, 0..2, small).unwrap().len(), 2);
    }

    #[test]
    fn slots_alternating_between_two_packs_make_one_run_per_pack() {
        let chunks: Vec<_> = (0..8u64)
            .map(|k| Some((1 + (k % 2) as u8, 8 + (k / 2) * 100, 100)))
            .collect();
        let (point, map) = point(&chunks);
        let runs = plan_runs(&point, &map, 0..8, RunLimits::default()).unwrap();
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].span, Some(([1; 32], 8..408)));
        assert_eq!(runs[0].slots, [0, 2, 4, 6]);
        assert_eq!(runs[1].slots, [1, 3, 5, 7]);
    }

    #[test]
    fn the_same_chunk_twice_is_read_once() {
        let (mut point, map) = point(&[Some((1, 8, 100)), Some((1, 108, 100))]);
        point.chunks.push(point.chunks[0]);
        point.size += 1 << 16;
        let runs = plan_runs(&point, &map, 0..3, RunLimits::default()).unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].span, Some(([1; 32], 8..208)));
    }

    #[test]
    fn a_chunk_in_no_pack_index_is_named() {
        let (point, mut map) = point(&[Some((1, 8, 100))]);
        map.clear();
        let err = plan_runs(&point, &map, 0..1, RunLimits::default()).unwrap_err();
        assert!(err.to_string().contains("no pack index"), "{err}");
    }
}
