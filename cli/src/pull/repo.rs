//! `tidemark pull --repo URL`: the pulled ranges become a point in a repository.
//!
//! A full pull stores every chunk (chunks nothing was written to are zero markers). An
//! incremental pull (`--bitmap C`) starts from the point `VOLUME@C` of the repository:
//! chunks the bitmap left clean are that point's chunks, reused without reading anything;
//! a chunk partly dirty is the base chunk (read back from the repository) with the dirty
//! ranges laid over it, so the export is never asked for a byte the bitmap says is clean.
//! The repository lock is held from the start until the point index is written, last.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{bail, Context};
use tidemark_repo::format::{chunk_count, valid_name};
use tidemark_repo::lock::RepoLock;
use tidemark_repo::writer::PointWriter;
use tidemark_repo::{ChunkId, ChunkRef, Location, PointIndex, Repository, StoreOptions};
use uuid::Uuid;

use super::sink::Sink;

/// What `--repo` needs besides the export.
#[derive(Debug, Clone, Default)]
pub struct RepoTarget {
    pub url: String,
    pub store: StoreOptions,
    /// `--volume` (default: the tidemark export's volume name).
    pub volume: Option<String>,
    pub break_lock: bool,
    /// Pack worker threads.
    pub workers: usize,
}

/// The volume name a tidemark export's description names (`... of volume NAME (volume uuid`).
pub fn described_volume(description: &str) -> Option<String> {
    if !description.starts_with("tidemark ") {
        return None;
    }
    let start = description.find(" of volume ")? + " of volume ".len();
    let end = description.rfind(" (volume uuid ")?;
    let name = description.get(start..end)?;
    valid_name(name).then(|| name.to_string())
}

struct Pending {
    index: u64,
    buf: Vec<u8>,
    /// Written ranges of `buf`, ascending and disjoint.
    covered: Vec<(usize, usize)>,
}

/// A sink that stores a point.
pub struct RepoSink {
    repo: Repository,
    handle: tokio::runtime::Handle,
    writer: Option<PointWriter>,
    map: Arc<HashMap<ChunkId, Location>>,
    base: Option<PointIndex>,
    template: PointIndex,
    count: u64,
    next: u64,
    current: Option<Pending>,
    lock: Option<RepoLock>,
}

impl std::fmt::Debug for RepoSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RepoSink({} {})", self.repo.url(), self.template.name())
    }
}

/// Who the point is of.
#[derive(Debug, Clone)]
pub struct PointNames {
    pub volume: String,
    pub uuid: Uuid,
    pub checkpoint: String,
    /// The bitmap of an incremental pull: the checkpoint of the base point.
    pub parent: Option<String>,
    pub granularity: u32,
}

impl RepoSink {
    /// Open the repository, take its lock, load its chunk index and (incremental) the base.
    pub async fn open(
        target: &RepoTarget,
        names: &PointNames,
        size: u64,
    ) -> anyhow::Result<RepoSink> {
        let repo = Repository::open(&target.url, &target.store).await?;
        let chunk_size = repo.config().chunk_size;
        if chunk_size % names.granularity != 0 {
            bail!(
                "the repository's chunk size {chunk_size} is not a multiple of the volume's \
                 tracking granularity {}",
                names.granularity
            );
        }
        let lock = RepoLock::acquire(
            &repo,
            &format!("backup of {}", names.volume),
            target.break_lock,
        )
        .await?;
        let prepared = prepare(&repo, names, size).await;
        let (map, base) = match prepared {
            Ok(ready) => ready,
            Err(err) => {
                lock.release().await?;
                return Err(err);
            }
        };
        let count = chunk_count(size, chunk_size);
        let handle = tokio::runtime::Handle::current();
        let writer = PointWriter::start(
            &repo,
            handle.clone(),
            map.keys().copied().collect(),
            count,
            target.workers,
        );
        Ok(RepoSink {
            template: PointIndex {
                volume: names.volume.clone(),
                volume_uuid: *names.uuid.as_bytes(),
                checkpoint: names.checkpoint.clone(),
                parent: names.parent.clone().unwrap_or_default(),
                created_unix: 0,
                size,
                chunk_size,
                granularity: names.granularity,
                new_bytes: 0,
                chunks: Vec::new(),
            },
            repo,
            handle,
            writer: Some(writer),
            map: Arc::new(map),
            base,
            count,
            next: 0,
            current: None,
            lock: Some(lock),
        })
    }

    fn chunk_len(&self, index: u64) -> usize {
        let chunk = u64::from(self.template.chunk_size);
        (self.template.size - index * chunk).min(chunk) as usize
    }

    fn writer(&self) -> anyhow::Result<&PointWriter> {
        self.writer
            .as_ref()
            .context("the repository point is already finished")
    }

    /// Decide every chunk before `index` that was never touched.
    fn skip_to(&mut self, index: u64) -> anyhow::Result<()> {
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

    fn emit(&mut self) -> anyhow::Result<()> {
        let Some(mut pending) = self.current.take() else {
            return Ok(());
        };
        let covered: usize = pending.covered.iter().map(|(a, b)| b - a).sum();
        if covered < pending.buf.len() {
            if let Some(ChunkRef::Data(id)) =
                self.base.as_ref().map(|b| b.chunks[pending.index as usize])
            {
                let at = *self.map.get(&id).with_context(|| {
                    format!(
                        "the base point's chunk {} is in no pack index: run `tidemark repo \
                         verify {}`",
                        id.hex(),
                        self.repo.url()
                    )
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
    fn touch(&mut self, mut offset: u64, length: u64, data: Option<&[u8]>) -> anyhow::Result<()> {
        let chunk = u64::from(self.template.chunk_size);
        let end = offset + length;
        while offset < end {
            let index = offset / chunk;
            if self.current.as_ref().map(|p| p.index) != Some(index) {
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
            let pending = self.current.as_mut().context("no pending chunk")?;
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
}

async fn prepare(
    repo: &Repository,
    names: &PointNames,
    size: u64,
) -> anyhow::Result<(HashMap<ChunkId, Location>, Option<PointIndex>)> {
    let (map, _, broken) = repo.chunk_map().await?;
    if let Some((object, why)) = broken.first() {
        bail!(
            "the repository has an unreadable pack index {object} ({why}); run `tidemark repo \
             verify {}` and `repo gc` first",
            repo.url()
        );
    }
    let base = match &names.parent {
        None => None,
        Some(parent) => {
            let name = format!("{}@{parent}", names.volume);
            let base = repo.point(&name).await.with_context(|| {
                format!(
                    "an incremental pull into a repository starts from the point of its bitmap's \
                     checkpoint, {name}; store that point first (a --full pull of it)"
                )
            })?;
            if base.volume_uuid != *names.uuid.as_bytes() {
                bail!(
                    "the point {name} is of another volume (uuid {})",
                    Uuid::from_bytes(base.volume_uuid)
                );
            }
            if base.size != size {
                bail!(
                    "the point {name} is {} bytes but the export is {size}: take a --full pull",
                    base.size
                );
            }
            if base.chunk_size != repo.config().chunk_size {
                bail!("the point {name} has another chunk size than the repository");
            }
            Some(base)
        }
    };
    Ok((map, base))
}

impl Sink for RepoSink {
    fn write(&mut self, offset: u64, data: &[u8]) -> anyhow::Result<()> {
        self.touch(offset, data.len() as u64, Some(data))
    }

    fn zero(&mut self, offset: u64, length: u64) -> anyhow::Result<()> {
        self.touch(offset, length, None)
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        self.emit()?;
        self.skip_to(self.count)?;
        let writer = self
            .writer
            .take()
            .context("the repository point is already finished")?;
        let written = writer.finish().context("storing the point's chunks")?;
        let mut point = self.template.clone();
        point.chunks = written.chunks;
        point.new_bytes = written.new_bytes;
        point.created_unix = tidemark_repo::now_unix();
        let repo = self.repo.clone();
        let lock = self.lock.take();
        self.handle.block_on(async move {
            let stored = repo.put_point(&point).await;
            if let Some(lock) = lock {
                lock.release().await?;
            }
            stored
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_volume_name_comes_from_a_tidemark_description() {
        let text = tidemark_daemon::export::describe_origin(
            "tidemark snapshot backup-3 of volume vm1",
            Uuid::new_v4(),
            65536,
        );
        assert_eq!(described_volume(&text).as_deref(), Some("vm1"));
        assert_eq!(described_volume("qemu disk"), None);
        assert_eq!(
            described_volume("tidemark snapshot of volume a/b (volume uuid x)"),
            None
        );
    }
}
