//! Building a point from the ranges a backup reads, in ascending order: what `tidemark pull
//! --repo` and the daemon's `backup begin --push repo:URL` both store.
//!
//! A full point stores every chunk (chunks nothing was written to are zero markers). An
//! incremental point (`parent`) starts from the point `VOLUME@PARENT` of the repository:
//! chunks no range touched are that point's chunks, reused without reading anything; a chunk
//! partly touched is the base chunk (read back from the repository) with the new ranges laid
//! over it, so the source is never asked for a byte its dirty bitmap says is clean. The
//! repository lock is held from [`PointBuilder::open`] until the point index is written, last,
//! by [`PointBuilder::finish`].

use std::collections::HashMap;

use tokio::runtime::Handle;

use crate::format::{chunk_count, ChunkId, ChunkRef, PointIndex};
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
            },
            repo: repo.clone(),
            handle,
            writer: Some(writer),
            map,
            base,
            count,
            next: 0,
            current: None,
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

    /// Decide every chunk before `index` that was never touched.
    fn skip_to(&mut self, index: u64) -> Result<()> {
        while self.next < index {
            let chunk = match &self.base {
                Some(base) => base.chunks[self.next as usize],
                None => ChunkRef::Zero,
            };
            self.writer()?.set(self.next, chunk);
            self.next += 1;
        }
        Ok(())
    }

    fn emit(&mut self) -> Result<()> {
        let Some(mut pending) = self.current.take() else {
            return Ok(());
        };
        let covered: usize = pending.covered.iter().map(|(a, b)| b - a).sum();
        if covered < pending.buf.len() {
            if let Some(ChunkRef::Data(id)) =
                self.base.as_ref().map(|b| b.chunks[pending.index as usize])
            {
                let at = *self.map.get(&id).ok_or_else(|| {
                    RepoError::Invalid(format!(
                        "the base point's chunk {} is in no pack index: run `tidemark repo \
                         verify {}`",
                        id.hex(),
                        self.repo.url()
                    ))
                })?;
                let repo = self.repo.clone();
                let handle = self.handle.clone();
                let old =
                    tokio::task::block_in_place(|| handle.block_on(repo.read_chunk(&id, &at)))?;
                let mut at = 0;
                for &(start, end) in pending
                    .covered
                    .iter()
                    .chain([&(pending.buf.len(), pending.buf.len())])
                {
                    if at < start {
                        pending.buf[at..start].copy_from_slice(&old[at..start]);
                    }
                    at = end;
                }
            }
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
