//! Building a point from the ranges a backup reads, in ascending order: what `tidemark pull
//! --repo` and the daemon's `backup begin --push repo:URL` both store.
//!
//! A full point stores every chunk (chunks nothing was written to are zero markers). An
//! incremental point (`parent`) starts from the point `VOLUME@PARENT` of the repository:
//! chunk slots no range touched are that point's slots (chunk and pieces), reused without
//! reading anything. In a slot partly touched, each run of written bytes (the dirty extents,
//! aligned to the tracking granularity, split at slot boundaries) becomes a piece: a chunk of
//! its own size laid over the base point's slot, so a 64 KiB write stores 64 KiB, not the
//! slot's 4 MiB. Fragmentation is bounded: when a slot would carry more than
//! [`MAX_SLOT_PIECES`] pieces, or its pieces would cover more than half of it, the slot is
//! merged into one whole new chunk from the repository (the base slot's chunk and pieces are
//! read back from the packs and the new runs laid over them), never by reading clean bytes
//! from the source: the source is never asked for a byte its dirty bitmap says is clean.
//! The repository lock is held from [`PointBuilder::open`] until the point index is written,
//! last, by [`PointBuilder::finish`].

use std::collections::HashMap;

use tokio::runtime::Handle;

use crate::format::{chunk_count, ChunkId, ChunkRef, Piece, PointIndex, MAX_SLOT_PIECES};
use crate::lock::{LockKind, RepoLock};
use crate::writer::PointWriter;
use crate::{Location, RepoError, Repository, Result};

/// Who a point is of.
#[derive(Debug, Clone)]
pub struct PointNames {
    pub volume: String,
    pub uuid: [u8; 16],
    pub checkpoint: String,
    /// The checkpoint of the point an incremental starts from (its dirty bitmap's).
    pub parent: Option<String>,
    pub granularity: u32,
}

struct Pending {
    index: u64,
    buf: Vec<u8>,
    /// Written ranges of `buf`, ascending and disjoint.
    covered: Vec<(usize, usize)>,
}

/// A point being stored.
pub struct PointBuilder {
    repo: Repository,
    handle: Handle,
    writer: Option<PointWriter>,
    map: HashMap<ChunkId, Location>,
    base: Option<PointIndex>,
    template: PointIndex,
    count: u64,
    next: u64,
    current: Option<Pending>,
    /// The point's pieces so far, ascending; new ones hold [`ChunkRef::Zero`] until the
    /// writer says what their chunk is (their position is their number in the writer).
    pieces: Vec<Piece>,
    lock: Option<RepoLock>,
}

impl std::fmt::Debug for PointBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PointBuilder({} {})",
            self.repo.url(),
            self.template.name()
        )
    }
}

impl PointBuilder {
    /// Take the repository's lock, load its chunk index and (incremental) the base point.
    /// `workers` threads compress and upload. The other methods block on `handle`: call
    /// them from threads that are not its runtime's workers (or inside `block_in_place`).
    pub async fn open(
        repo: &Repository,
        names: &PointNames,
        size: u64,
        break_lock: bool,
        workers: usize,
    ) -> Result<PointBuilder> {
        let chunk_size = repo.config().chunk_size;
        if names.granularity == 0 || chunk_size % names.granularity != 0 {
            return Err(RepoError::Invalid(format!(
                "the repository's chunk size {chunk_size} is not a multiple of the volume's \
                 tracking granularity {}",
                names.granularity
            )));
        }
        let lock = RepoLock::acquire(
            repo,
            &format!("backup of {}", names.volume),
            LockKind::Append,
            break_lock,
        )
        .await?;
        let (map, base) = match prepare(repo, names, size).await {
            Ok(ready) => ready,
            Err(err) => {
                lock.release().await?;
                return Err(err);
            }
        };
        let count = chunk_count(size, chunk_size);
        let handle = Handle::current();
        let writer = PointWriter::start(
            repo,
            handle.clone(),
            map.keys().copied().collect(),
            count,
            workers,
        );
        Ok(PointBuilder {
            template: PointIndex {
                volume: names.volume.clone(),
                volume_uuid: names.uuid,
                checkpoint: names.checkpoint.clone(),
                parent: names.parent.clone().unwrap_or_default(),
                created_unix: 0,
                size,
                chunk_size,
                granularity: names.granularity,
                new_bytes: 0,
                chunks: Vec::new(),
                pieces: Vec::new(),
                zero_runs: Vec::new(),
            },
            repo: repo.clone(),
            handle,
            writer: Some(writer),
            map,
            base,
            count,
            next: 0,
            current: None,
            pieces: Vec::new(),
            lock: Some(lock),
        })
    }

    /// `VOLUME@CHECKPOINT` of the point being stored.
    pub fn name(&self) -> String {
        self.template.name()
    }

    fn chunk_len(&self, index: u64) -> usize {
        let chunk = u64::from(self.template.chunk_size);
        (self.template.size - index * chunk).min(chunk) as usize
    }

    fn writer(&self) -> Result<&PointWriter> {
        self.writer
            .as_ref()
            .ok_or_else(|| RepoError::Invalid("the repository point is already finished".into()))
    }

    /// Decide every chunk slot before `index` that was never touched: the base point's
    /// chunk and pieces, or zeros.
    fn skip_to(&mut self, index: u64) -> Result<()> {
        while self.next < index {
            match &self.base {
                Some(base) => {
                    self.pieces.extend_from_slice(base.slot_pieces(self.next));
                    let chunk = base.chunks[self.next as usize];
                    self.writer()?
                        .set(self.next, chunk, base.slot_zero_runs(self.next));
                }
                None => self.writer()?.set(self.next, ChunkRef::Zero, &[]),
            }
            self.next += 1;
        }
        Ok(())
    }

    /// Slot `index` of the base point read back from the repository (chunk and pieces).
    fn read_base_slot(&self, index: u64) -> Result<Vec<u8>> {
        let base = self
            .base
            .as_ref()
            .ok_or_else(|| RepoError::Invalid("a full point has no base to merge".into()))?;
        let repo = self.repo.clone();
        let handle = self.handle.clone();
        tokio::task::block_in_place(|| handle.block_on(repo.read_slot(base, index, &self.map)))
            .map_err(|err| {
                RepoError::Invalid(format!(
                    "reading chunk slot {index} of the base point {} back to merge it: {err}",
                    base.name()
                ))
            })
    }

    /// Store slot `pending.index` of an incremental point, partly written, as pieces over
    /// the base slot (`true`); past the fragmentation bound, lay the base slot under the
    /// written runs of `pending.buf` instead so the caller stores one merged chunk (`false`).
    fn emit_pieces(&mut self, pending: &mut Pending) -> Result<bool> {
        let Some(base) = self.base.as_ref() else {
            return Ok(false);
        };
        let index = pending.index;
        let start = index * u64::from(self.template.chunk_size);
        let base_chunk = base.chunks[index as usize];
        let runs = coalesce(&pending.covered);
        // Old pieces cut around the new runs (false), then the runs (true), by offset.
        let mut pieces: Vec<(Piece, bool)> = cut(base.slot_pieces(index), &runs, start)
            .into_iter()
            .map(|p| (p, false))
            .chain(runs.iter().map(|&(a, b)| {
                let piece = Piece {
                    offset: start + a as u64,
                    len: (b - a) as u32,
                    chunk: ChunkRef::Zero,
                    within: 0,
                };
                (piece, true)
            }))
            .collect();
        pieces.sort_by_key(|(p, _)| p.offset);
        let covered: u64 = pieces.iter().map(|(p, _)| u64::from(p.len)).sum();
        if pieces.len() > MAX_SLOT_PIECES || covered * 2 > pending.buf.len() as u64 {
            let old = self.read_base_slot(index)?;
            let mut at = 0;
            for &(a, b) in runs.iter().chain([&(pending.buf.len(), pending.buf.len())]) {
                pending.buf[at..a].copy_from_slice(&old[at..a]);
                at = b;
            }
            return Ok(false);
        }
        self.writer()?
            .set(index, base_chunk, base.slot_zero_runs(index));
        for (piece, new) in pieces {
            if new {
                let at = (piece.offset - start) as usize;
                let data = pending.buf[at..at + piece.len as usize].to_vec();
                let number = self.pieces.len();
                let writer = self.writer()?;
                tokio::task::block_in_place(|| writer.put_piece(number, data))?;
            }
            self.pieces.push(piece);
        }
        Ok(true)
    }

    fn emit(&mut self) -> Result<()> {
        let Some(mut pending) = self.current.take() else {
            return Ok(());
        };
        let covered: usize = coalesce(&pending.covered).iter().map(|(a, b)| b - a).sum();
        if covered < pending.buf.len() && self.emit_pieces(&mut pending)? {
            self.next = pending.index + 1;
            return Ok(());
        }
        let index = pending.index;
        let buf = pending.buf;
        let writer = self.writer()?;
        tokio::task::block_in_place(|| writer.put(index, buf))?;
        self.next = index + 1;
        Ok(())
    }

    /// Lay `data` (or zeros) at `offset`.
    fn touch(&mut self, mut offset: u64, length: u64, data: Option<&[u8]>) -> Result<()> {
        let chunk = u64::from(self.template.chunk_size);
        let end = offset
            .checked_add(length)
            .filter(|&end| end <= self.template.size)
            .ok_or_else(|| {
                RepoError::Invalid(format!(
                    "{length} bytes at {offset} lie past the end of {} ({} bytes)",
                    self.template.name(),
                    self.template.size
                ))
            })?;
        while offset < end {
            let index = offset / chunk;
            if self.current.as_ref().map(|p| p.index) != Some(index) {
                if index < self.next {
                    return Err(RepoError::Invalid(format!(
                        "ranges of a point must come in ascending order: chunk {index} again"
                    )));
                }
                self.emit()?;
                self.skip_to(index)?;
                self.current = Some(Pending {
                    index,
                    buf: vec![0; self.chunk_len(index)],
                    covered: Vec::new(),
                });
            }
            let within = (offset - index * chunk) as usize;
            let piece = ((index + 1) * chunk).min(end) - offset;
            let Some(pending) = self.current.as_mut() else {
                return Err(RepoError::Invalid("no pending chunk".into()));
            };
            let range = within..within + piece as usize;
            match data {
                Some(data) => {
                    let at = (length - (end - offset)) as usize;
                    pending.buf[range.clone()].copy_from_slice(&data[at..at + piece as usize]);
                }
                None => pending.buf[range.clone()].fill(0),
            }
            pending.covered.push((range.start, range.end));
            offset += piece;
        }
        Ok(())
    }

    /// Store `data` at `offset` (ranges ascending).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.touch(offset, data.len() as u64, Some(data))
    }

    /// Record `length` zero bytes at `offset` (ranges ascending).
    pub fn zero(&mut self, offset: u64, length: u64) -> Result<()> {
        self.touch(offset, length, None)
    }

    /// Wait for every upload, write the point index (last), release the lock. Blocks on the
    /// runtime: call it outside it (or inside `block_in_place`).
    pub fn finish(&mut self) -> Result<PointIndex> {
        self.emit()?;
        self.skip_to(self.count)?;
        let writer = self
            .writer
            .take()
            .ok_or_else(|| RepoError::Invalid("the repository point is already finished".into()))?;
        let written = writer.finish()?;
        let mut point = self.template.clone();
        point.chunks = written.chunks;
        point.zero_runs = written.zero_runs;
        point.pieces = std::mem::take(&mut self.pieces);
        for (number, chunk) in written.pieces {
            let piece = point.pieces.get_mut(number).ok_or_else(|| {
                RepoError::Invalid(format!("the pack workers stored an unknown piece {number}"))
            })?;
            piece.chunk = chunk;
        }
        point.new_bytes = written.new_bytes;
        point.created_unix = crate::now_unix();
        let repo = self.repo.clone();
        let lock = self.lock.take();
        let stored = point.clone();
        self.handle.block_on(async move {
            let put = repo.put_point(&stored).await;
            if let Some(lock) = lock {
                lock.release().await?;
            }
            put
        })?;
        Ok(point)
    }
}

/// Ranges (ascending, possibly touching or overlapping) joined into disjoint runs.
fn coalesce(ranges: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
    for &(a, b) in ranges {
        match runs.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => runs.push((a, b)),
        }
    }
    runs
}

/// What is left of `pieces` (of the slot starting at volume offset `start`) outside `runs`
/// (offsets inside the slot, ascending and disjoint): a piece cut in two keeps pointing into
/// its chunk, at a later `within`.
fn cut(pieces: &[Piece], runs: &[(usize, usize)], start: u64) -> Vec<Piece> {
    let mut left = Vec::new();
    for piece in pieces {
        let mut from = piece.offset;
        let end = piece.end();
        for &(a, b) in runs {
            let (a, b) = (start + a as u64, start + b as u64);
            if b <= from || a >= end {
                continue;
            }
            if a > from {
                left.push(part(piece, from, a));
            }
            from = b.min(end);
        }
        if from < end {
            left.push(part(piece, from, end));
        }
    }
    left
}

/// The bytes `[from, to)` of `piece`, as a piece.
fn part(piece: &Piece, from: u64, to: u64) -> Piece {
    let skip = (from - piece.offset) as u32;
    Piece {
        offset: from,
        len: (to - from) as u32,
        chunk: piece.chunk,
        within: match piece.chunk {
            ChunkRef::Zero => 0,
            ChunkRef::Data(_) => piece.within + skip,
        },
    }
}

async fn prepare(
    repo: &Repository,
    names: &PointNames,
    size: u64,
) -> Result<(HashMap<ChunkId, Location>, Option<PointIndex>)> {
    let (map, _, broken) = repo.chunk_map().await?;
    if let Some((object, why)) = broken.first() {
        return Err(RepoError::Invalid(format!(
            "the repository has an unreadable pack index {object} ({why}); run `tidemark repo \
             verify {}` and `repo gc` first",
            repo.url()
        )));
    }
    let Some(parent) = &names.parent else {
        return Ok((map, None));
    };
    let name = format!("{}@{parent}", names.volume);
    let base = repo.point(&name).await.map_err(|err| {
        RepoError::Invalid(format!(
            "an incremental backup into a repository starts from the point of its bitmap's \
             checkpoint, {name}; store that point first (a full backup of it): {err}"
        ))
    })?;
    let refuse = |why: String| Err(RepoError::Invalid(format!("the point {name} {why}")));
    if base.volume_uuid != names.uuid {
        return refuse(format!(
            "is of another volume (uuid {})",
            uuid::Uuid::from_bytes(base.volume_uuid)
        ));
    }
    if base.size != size {
        return refuse(format!(
            "is {} bytes but the volume is {size}: take a full backup",
            base.size
        ));
    }
    if base.chunk_size != repo.config().chunk_size {
        return refuse("has another chunk size than the repository".into());
    }
    Ok((map, Some(base)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ZeroRun;
    use crate::test_runtime;

    const CHUNK: u32 = 64 << 10;
    const SIZE: usize = 16 * CHUNK as usize + 4096;

    fn names(checkpoint: &str, parent: Option<&str>) -> PointNames {
        PointNames {
            volume: "vm".into(),
            uuid: [3; 16],
            checkpoint: checkpoint.into(),
            parent: parent.map(String::from),
            granularity: 4096,
        }
    }

    /// Store the ranges `writes` of `disk` (already written into it) as a point.
    fn store(
        rt: &tokio::runtime::Runtime,
        repo: &Repository,
        names: &PointNames,
        disk: &[u8],
        writes: &[(usize, usize)],
    ) -> PointIndex {
        rt.block_on(async {
            let mut builder = PointBuilder::open(repo, names, disk.len() as u64, false, 2)
                .await
                .unwrap();
            tokio::task::block_in_place(|| {
                for &(offset, len) in writes {
                    builder
                        .write(offset as u64, &disk[offset..offset + len])
                        .unwrap();
                }
                builder.finish().unwrap()
            })
        })
    }

    fn read_all(rt: &tokio::runtime::Runtime, repo: &Repository, point: &PointIndex) -> Vec<u8> {
        rt.block_on(async {
            let (map, _, _) = repo.chunk_map().await.unwrap();
            let mut out = Vec::new();
            for i in 0..point.chunks.len() as u64 {
                out.extend(repo.read_slot(point, i, &map).await.unwrap());
            }
            out
        })
    }

    fn scribble(disk: &mut [u8], offset: usize, len: usize, seed: u8) -> (usize, usize) {
        for (i, b) in disk[offset..offset + len].iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31) ^ seed;
        }
        (offset, len)
    }

    fn setup(rt: &tokio::runtime::Runtime, dir: &std::path::Path) -> (Repository, Vec<u8>) {
        let repo = crate::test_repository(rt, dir, CHUNK);
        let mut disk = vec![0u8; SIZE];
        let full = scribble(&mut disk, 0, SIZE, 1);
        let point = store(rt, &repo, &names("c0", None), &disk, &[full]);
        assert!(point.pieces.is_empty());
        (repo, disk)
    }

    #[test]
    fn an_incremental_stores_its_dirty_extents_as_pieces_over_the_base_chunks() {
        let rt = test_runtime();
        let dir = tempfile::tempdir().unwrap();
        let (repo, mut disk) = setup(&rt, dir.path());
        let c = CHUNK as usize;
        let writes = [
            scribble(&mut disk, c + 8192, 4096, 2),
            scribble(&mut disk, c + 12288, 4096, 3),
            scribble(&mut disk, 5 * c, 8192, 4),
            scribble(&mut disk, 16 * c, 4096, 5),
        ];
        let c1 = store(&rt, &repo, &names("c1", Some("c0")), &disk, &writes);
        let spans: Vec<(u64, u32)> = c1.pieces.iter().map(|p| (p.offset, p.len)).collect();
        let c = c as u64;
        assert_eq!(
            spans,
            [(c + 8192, 8192), (5 * c, 8192)],
            "the touching runs join; the short last slot was covered whole"
        );
        assert!(c1.new_bytes < c, "{} new bytes", c1.new_bytes);
        assert_eq!(read_all(&rt, &repo, &c1), disk);

        // A write over half of a piece and past it cuts the old piece: its rest keeps
        // pointing into its chunk further on.
        let c = c as usize;
        let writes = [scribble(&mut disk, c + 12288, 8192, 6)];
        let c2 = store(&rt, &repo, &names("c2", Some("c1")), &disk, &writes);
        let pieces: Vec<(u64, u32, u32)> = c2
            .pieces
            .iter()
            .map(|p| (p.offset, p.len, p.within))
            .collect();
        let cu = c as u64;
        assert_eq!(
            pieces,
            [
                (cu + 8192, 4096, 0),
                (cu + 12288, 8192, 0),
                (5 * cu, 8192, 0)
            ]
        );
        assert_eq!(
            c2.pieces[2], c1.pieces[1],
            "untouched slots reuse their pieces"
        );
        assert_eq!(read_all(&rt, &repo, &c2), disk);
        let reader = rt
            .block_on(crate::reader::PointReader::open(
                &repo,
                "vm@c2",
                rt.handle().clone(),
                crate::reader::ReaderOptions::default(),
            ))
            .unwrap();
        let mut through_reader = vec![0; SIZE];
        reader.read(0, &mut through_reader).unwrap();
        assert_eq!(
            through_reader, disk,
            "repo export's reader lays the pieces over"
        );
        let mut from_front = disk.clone();
        let writes = [scribble(&mut from_front, c + 8192, 2048, 7)];
        let c3 = store(&rt, &repo, &names("c3", Some("c2")), &from_front, &writes);
        assert_eq!(
            (c3.pieces[1].offset, c3.pieces[1].within),
            (cu + 8192 + 2048, 2048)
        );
        assert_eq!(read_all(&rt, &repo, &c3), from_front);
    }

    #[test]
    fn a_slot_past_the_fragmentation_bound_is_merged_into_one_chunk_from_the_repository() {
        let rt = test_runtime();
        let dir = tempfile::tempdir().unwrap();
        let (repo, mut disk) = setup(&rt, dir.path());
        let c = CHUNK as usize;
        // 17 separate runs in slot 2; 9 blocks of 4 KiB and one of 32 KiB (over half) in slot 3.
        let mut writes: Vec<(usize, usize)> = (0..=MAX_SLOT_PIECES)
            .map(|i| scribble(&mut disk, 2 * c + i * 3 * 1024, 1024, i as u8))
            .collect();
        writes.push(scribble(&mut disk, 3 * c, 4096, 9));
        writes.push(scribble(&mut disk, 3 * c + 8192, 32 << 10, 10));
        let c0 = rt.block_on(repo.point("vm@c0")).unwrap();
        let c1 = store(&rt, &repo, &names("c1", Some("c0")), &disk, &writes);
        assert!(c1.pieces.is_empty(), "{:?}", c1.pieces);
        for slot in [2, 3] {
            assert_ne!(
                c1.chunks[slot], c0.chunks[slot],
                "slot {slot} was not merged"
            );
        }
        assert_eq!(c1.chunks[4], c0.chunks[4]);
        assert_eq!(read_all(&rt, &repo, &c1), disk);
    }

    /// A repository of 256 KiB chunks (four zero-run grid blocks each) holding `vm@c0`, a
    /// full point of a disk of four slots and a short fifth one (64 KiB and 5 bytes):
    /// slot 0 is data, zeros, data, zeros by 64 KiB block; slot 1 all data; slot 2 all
    /// zero; slot 3 zeros then data; slot 4 data then 5 zero bytes.
    fn mixed_setup(
        rt: &tokio::runtime::Runtime,
        dir: &std::path::Path,
    ) -> (Repository, Vec<u8>, PointIndex) {
        let repo = crate::test_repository(rt, dir, 4 * GRID as u32);
        let mut disk = vec![0u8; 17 * GRID + 5];
        for block in [0, 2, 4, 5, 6, 7, 14, 15, 16] {
            scribble(&mut disk, block * GRID, GRID, block as u8 + 1);
        }
        let c0 = store(rt, &repo, &names("c0", None), &disk, &[(0, disk.len())]);
        (repo, disk, c0)
    }

    const GRID: usize = crate::format::ZERO_GRID as usize;

    fn run(slot: u64, offset: usize, len: usize) -> ZeroRun {
        ZeroRun {
            slot,
            offset: offset as u32,
            len: len as u32,
        }
    }

    #[test]
    fn a_full_point_records_the_zero_runs_of_its_mixed_chunks() {
        let rt = test_runtime();
        let dir = tempfile::tempdir().unwrap();
        let (repo, disk, c0) = mixed_setup(&rt, dir.path());
        assert_eq!(c0.chunks[2], ChunkRef::Zero);
        assert_eq!(
            c0.zero_runs,
            [
                run(0, GRID, GRID),
                run(0, 3 * GRID, GRID),
                run(3, 0, 2 * GRID),
                run(4, GRID, 5)
            ]
        );
        let stored = rt.block_on(repo.point("vm@c0")).unwrap();
        assert_eq!(stored.zero_runs, c0.zero_runs);
        assert_eq!(read_all(&rt, &repo, &c0), disk);
    }

    #[test]
    fn an_incremental_keeps_the_runs_of_kept_chunks_and_finds_those_of_merged_ones() {
        let rt = test_runtime();
        let dir = tempfile::tempdir().unwrap();
        let (repo, mut disk, c0) = mixed_setup(&rt, dir.path());
        let slot = 4 * GRID;
        // Slot 0: a piece over its chunk, which it keeps. Slot 1: three quarters zeroed,
        // merged into a new chunk. Slot 3: untouched.
        disk[slot + GRID..2 * slot].fill(0);
        let writes = [scribble(&mut disk, 8192, 4096, 9), (slot + GRID, 3 * GRID)];
        let c1 = store(&rt, &repo, &names("c1", Some("c0")), &disk, &writes);
        assert_eq!(c1.chunks[0], c0.chunks[0]);
        assert_ne!(c1.chunks[1], c0.chunks[1], "slot 1 was not merged");
        assert_eq!(c1.chunks[3], c0.chunks[3]);
        assert_eq!(c1.pieces.len(), 1);
        assert_eq!(
            c1.zero_runs,
            [
                run(0, GRID, GRID),
                run(0, 3 * GRID, GRID),
                run(1, GRID, 3 * GRID),
                run(3, 0, 2 * GRID),
                run(4, GRID, 5)
            ]
        );
        assert_eq!(read_all(&rt, &repo, &c1), disk);
    }

    #[test]
    fn runs_coalesce_and_pieces_are_cut_around_new_runs() {
        assert_eq!(
            coalesce(&[(0, 4), (4, 8), (10, 12), (11, 20)]),
            [(0, 8), (10, 20)]
        );
        let piece = Piece {
            offset: 1000,
            len: 100,
            chunk: ChunkRef::Data(ChunkId([1; 32])),
            within: 50,
        };
        let left: Vec<(u64, u32, u32)> = cut(&[piece], &[(10, 20), (30, 40), (90, 200)], 1000)
            .iter()
            .map(|p| (p.offset, p.len, p.within))
            .collect();
        assert_eq!(left, [(1000, 10, 50), (1020, 10, 70), (1040, 50, 90)]);
        assert!(cut(&[piece], &[(0, 100)], 1000).is_empty());
    }
}
