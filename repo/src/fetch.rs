//! Fetching many chunk slots of a point with few requests, for `repo restore` and
//! `repo export`'s read-ahead.
//!
//! A backup writes a point's chunks into its packs in slot order, so neighbouring slots'
//! chunks usually lie back to back in one pack, and an incremental backup's pieces lie in
//! slot order in its own packs. [`plan_runs`] groups such slots into runs, and a run's
//! pieces' chunks into ranges of neighbours; [`fetch_run`] reads the run's span and each
//! piece range with one ranged GET each, all at once (fewer requests: each costs an S3
//! server CPU of its own; fewer opens and reads on a directory), streams the bodies and
//! checks and inflates every chunk on the blocking pool as soon as its bytes are in, so
//! both CPUs verify while the rest is on the wire. Each blob is still checked on its own
//! (CRC, inflate, id hash) before a byte of it is used: reading through a neighbour's bytes
//! trusts nothing, and a body shorter or longer than asked for is refused.
//!
//! Memory: a run holds at most [`RunLimits::bytes`] stored bytes of its span, its pieces'
//! ranges (the pieces of a slot cover at most the slot, plus gaps of at most [`MAX_GAP`])
//! and, inflated, its slots. A caller that keeps chunks (`repo export`'s cache) hands
//! evicted chunks' memory back through [`SpareBuffer`], so inflating does not fault in
//! fresh pages for every chunk.

use std::collections::HashMap;
use std::ops::Range;

use bytes::Bytes;
use futures::StreamExt;
use object_store::{GetOptions, GetResultPayload};

use crate::format::{ChunkId, ChunkRef, PointIndex};
use crate::{compose_slot, pack_path, point_path, Location, RepoError, Repository, Result};

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

/// Slots fetched together: `span` is the pack and byte range of the slots' chunks, read
/// with one GET (`None` when the slot has no chunk of its own, only pieces over zeros);
/// `pieces` are the ranges of other packs holding the chunks of the slots' pieces (an
/// incremental point's writes), neighbours again read with one GET each, all at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub span: Option<([u8; 32], Range<u64>)>,
    pub slots: Vec<u64>,
    pub pieces: Vec<([u8; 32], Range<u64>)>,
}

/// Whether `blob` of `pack` lies inside `span`.
fn inside(span: &([u8; 32], Range<u64>), pack: &[u8; 32], blob: &Range<u64>) -> bool {
    span.0 == *pack && blob.start >= span.1.start && blob.end <= span.1.end
}

/// Fill `run.pieces`: the blobs of its slots' pieces outside its span, sorted by pack and
/// offset, neighbours (at most [`MAX_GAP`] apart) merged into one range of at most
/// `limits.bytes` (a larger blob is a range of its own). A piece whose chunk is in no pack
/// index is left to [`compose_slot`], which names it.
fn plan_pieces(
    point: &PointIndex,
    map: &HashMap<ChunkId, Location>,
    run: &mut Run,
    limits: RunLimits,
) {
    let mut blobs: Vec<([u8; 32], Range<u64>)> = run
        .slots
        .iter()
        .flat_map(|&index| point.slot_pieces(index))
        .filter_map(|piece| match piece.chunk {
            ChunkRef::Data(id) => map.get(&id),
            ChunkRef::Zero => None,
        })
        .map(|at| {
            let start = at.entry.offset;
            (at.pack, start..start + u64::from(at.entry.stored_len))
        })
        .filter(|(pack, blob)| !run.span.as_ref().is_some_and(|s| inside(s, pack, blob)))
        .collect();
    blobs.sort_by_key(|(pack, blob)| (*pack, blob.start));
    run.pieces.clear();
    for (pack, blob) in blobs {
        if let Some((last_pack, range)) = run.pieces.last_mut() {
            if *last_pack == pack
                && blob.start <= range.end + MAX_GAP
                && blob.end.max(range.end) - range.start <= limits.bytes
            {
                range.end = range.end.max(blob.end);
                continue;
            }
        }
        run.pieces.push((pack, blob));
    }
}

/// Slot `index` as a run of its own: its chunk's blob (none for a zero chunk) and its
/// pieces' blobs.
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
    let mut run = Run {
        span,
        slots: vec![index],
        pieces: Vec::new(),
    };
    plan_pieces(point, map, &mut run, RunLimits::default());
    Ok(run)
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
    for run in &mut runs {
        plan_pieces(point, map, run, limits);
    }
    Ok(runs)
}

/// Memory for a whole chunk of plaintext, recycled from an earlier one (`None`: allocate).
pub type SpareBuffer<'a> = &'a (dyn Fn() -> Option<Vec<u8>> + Sync);

/// The bytes of a run's span as they arrive from the store: the parts received so far, in
/// order from the span's start, and how many bytes that is. A slot's chunk is checked as soon
/// as its bytes are in, while the rest of the span is still on the wire.
struct Arrivals {
    parts: std::sync::Mutex<Vec<(u64, Bytes)>>,
    received: tokio::sync::watch::Sender<u64>,
}

impl Arrivals {
    fn new(start: u64) -> Arrivals {
        Arrivals {
            parts: std::sync::Mutex::new(Vec::new()),
            received: tokio::sync::watch::Sender::new(start),
        }
    }

    /// Read `range` of `pack` into `self`, part by part as the store sends it; an error when
    /// the store sends fewer or more bytes than asked for.
    async fn feed(&self, repo: &Repository, pack: &[u8; 32], range: &Range<u64>) -> Result<()> {
        let path = pack_path(pack);
        let what = || format!("reading bytes {}..{} of {path}", range.start, range.end);
        let options = GetOptions {
            range: Some(range.clone().into()),
            ..GetOptions::default()
        };
        let got = repo
            .store()
            .get_opts(&path, options)
            .await
            .map_err(|source| RepoError::Store {
                what: what(),
                source,
            })?;
        let mut at = range.start;
        let mut add = |part: Bytes| -> Result<()> {
            let end = at + part.len() as u64;
            if end > range.end {
                return Err(RepoError::Invalid(format!(
                    "{}: the store sent more bytes than asked for",
                    what()
                )));
            }
            self.parts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((at, part));
            at = end;
            self.received.send_replace(end);
            Ok(())
        };
        if matches!(got.payload, GetResultPayload::File(..)) {
            // A local file: one read of the whole span (its stream reads 8 KiB at a time).
            add(got.bytes().await.map_err(|source| RepoError::Store {
                what: what(),
                source,
            })?)?;
        } else {
            let mut stream = got.into_stream();
            while let Some(part) = stream.next().await {
                add(part.map_err(|source| RepoError::Store {
                    what: what(),
                    source,
                })?)?;
            }
        }
        if at != range.end {
            return Err(RepoError::Corrupt {
                object: path.to_string(),
                why: format!(
                    "it ends at byte {at}, before byte {} that its pack index names",
                    range.end
                ),
            });
        }
        Ok(())
    }

    /// Bytes `range` (inside the span) once they have arrived, as the parts that hold them.
    async fn wait(&self, range: &Range<u64>) -> Vec<Bytes> {
        let mut received = self.received.subscribe();
        // The sender lives as long as `self`; `feed` ends with every byte in or an error,
        // which drops the waiting slots.
        let _ = received.wait_for(|&end| end >= range.end).await;
        let parts = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        let first = parts.partition_point(|(at, part)| at + part.len() as u64 <= range.start);
        parts[first..]
            .iter()
            .take_while(|(at, _)| *at < range.end)
            .map(|(at, part)| {
                let from = range.start.saturating_sub(*at) as usize;
                let to = (range.end.min(at + part.len() as u64) - at) as usize;
                part.slice(from..to)
            })
            .collect()
    }
}

/// One blob from the parts that hold it (no copy when one part holds it all).
fn join_parts(mut parts: Vec<Bytes>) -> Bytes {
    if parts.len() == 1 {
        return parts.pop().unwrap_or_default();
    }
    let mut out = Vec::with_capacity(parts.iter().map(Bytes::len).sum());
    for part in &parts {
        out.extend_from_slice(part);
    }
    out.into()
}

/// The slots of `run`, in its order: one ranged GET of the run's span and one of each of
/// its pieces' ranges, all at once, then each slot composed from its chunk and pieces,
/// every chunk checked and inflated on the blocking pool as soon as its bytes have arrived,
/// while the rest is still on the wire. Whole chunks inflate into memory from `spare` when
/// it has some.
pub async fn fetch_run(
    repo: &Repository,
    point: &PointIndex,
    map: &HashMap<ChunkId, Location>,
    run: &Run,
    spare: SpareBuffer<'_>,
) -> Result<Vec<Vec<u8>>> {
    let spans: Vec<_> = run
        .span
        .iter()
        .chain(&run.pieces)
        .map(|(pack, range)| ((*pack, range.clone()), Arrivals::new(range.start)))
        .collect();
    let spans = &spans;
    let feeds = spans
        .iter()
        .map(|((pack, range), arrivals)| async move { arrivals.feed(repo, pack, range).await });
    let slots = run.slots.iter().map(|&index| {
        compose_slot(point, index, map, move |id, at| async move {
            let blob = at.entry.offset..at.entry.offset + u64::from(at.entry.stored_len);
            let parts = match spans.iter().find(|(span, _)| inside(span, &at.pack, &blob)) {
                Some((_, arrivals)) => arrivals.wait(&blob).await,
                None => vec![repo.read_blob(&id, &at).await?],
            };
            let out = match at.entry.raw_len == point.chunk_size {
                true => spare().unwrap_or_default(),
                false => Vec::new(),
            };
            // Inflating and hashing 4 MiB takes milliseconds: off the runtime's worker threads.
            let repo = repo.clone();
            tokio::task::spawn_blocking(move || {
                repo.inflate_chunk_into(&join_parts(parts), &id, &at, out)
            })
            .await
            .map_err(|e| RepoError::Invalid(format!("checking chunk {}: {e}", id.hex())))?
        })
    });
    let feeds = futures::future::try_join_all(feeds);
    let (_, slots) = futures::future::try_join(feeds, futures::future::try_join_all(slots)).await?;
    Ok(slots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::PackEntry;
    use crate::writer::PointWriter;
    use futures::stream::BoxStream;
    use object_store::path::Path;
    use object_store::{
        GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions,
        PutOptions, PutPayload, PutResult,
    };
    use std::sync::Arc;

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
            zero_runs: Vec::new(),
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

    /// A store that sends every GET's body as a stream of `part`-byte pieces, as an S3
    /// client receives it, with byte `flip` of an object inverted and the last `short` bytes
    /// of the body left out.
    #[derive(Debug)]
    struct Chopped {
        inner: Arc<dyn ObjectStore>,
        part: usize,
        flip: Option<(Path, u64)>,
        short: usize,
    }

    impl std::fmt::Display for Chopped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "chopped {}", self.inner)
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for Chopped {
        async fn put_opts(
            &self,
            location: &Path,
            payload: PutPayload,
            opts: PutOptions,
        ) -> object_store::Result<PutResult> {
            self.inner.put_opts(location, payload, opts).await
        }

        async fn put_multipart_opts(
            &self,
            location: &Path,
            opts: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }

        async fn get_opts(
            &self,
            location: &Path,
            options: GetOptions,
        ) -> object_store::Result<GetResult> {
            let got = self.inner.get_opts(location, options).await?;
            let (meta, range, attributes) =
                (got.meta.clone(), got.range.clone(), got.attributes.clone());
            let mut body = got.bytes().await?.to_vec();
            if let Some((path, at)) = &self.flip {
                if path == location && range.contains(at) {
                    body[(at - range.start) as usize] ^= 0x40;
                }
            }
            body.truncate(body.len().saturating_sub(self.short));
            let parts: Vec<object_store::Result<Bytes>> = body
                .chunks(self.part)
                .map(|p| Ok(Bytes::copy_from_slice(p)))
                .collect();
            Ok(GetResult {
                payload: GetResultPayload::Stream(futures::stream::iter(parts).boxed()),
                meta,
                range,
                attributes,
            })
        }

        async fn delete(&self, location: &Path) -> object_store::Result<()> {
            self.inner.delete(location).await
        }

        fn list(
            &self,
            prefix: Option<&Path>,
        ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            self.inner.list(prefix)
        }

        async fn list_with_delimiter(
            &self,
            prefix: Option<&Path>,
        ) -> object_store::Result<ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }

        async fn copy(&self, from: &Path, to: &Path) -> object_store::Result<()> {
            self.inner.copy(from, to).await
        }

        async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
            self.inner.copy_if_not_exists(from, to).await
        }
    }

    /// `repo` read through a [`Chopped`] store.
    fn chopped(
        repo: &Repository,
        part: usize,
        flip: Option<(Path, u64)>,
        short: usize,
    ) -> Repository {
        Repository {
            store: Arc::new(Chopped {
                inner: Arc::clone(repo.store()),
                part,
                flip,
                short,
            }),
            url: repo.url.clone(),
            config: repo.config.clone(),
            hash: repo.hash,
            crypto: repo.crypto.clone(),
        }
    }

    /// A directory repository holding `vm@a`: 24 slots of 64 KiB of incompressible bytes
    /// (slots 4 and 5 zero), stored by two writers, so the point lies in two packs.
    fn random_point(
        rt: &tokio::runtime::Runtime,
        dir: &std::path::Path,
    ) -> (Repository, PointIndex, Vec<u8>) {
        const CHUNK: usize = 64 << 10;
        let repo = crate::test_repository(rt, dir, CHUNK as u32);
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut disk: Vec<u8> = (0..24 * CHUNK)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        disk[4 * CHUNK..6 * CHUNK].fill(0);
        let mut chunks = Vec::new();
        for half in disk.chunks(12 * CHUNK) {
            let writer = PointWriter::start(&repo, rt.handle().clone(), Default::default(), 12, 1);
            for (i, data) in half.chunks(CHUNK).enumerate() {
                writer.put(i as u64, data.to_vec()).unwrap();
            }
            chunks.extend(writer.finish().unwrap().chunks);
        }
        let point = PointIndex {
            volume: "vm".into(),
            volume_uuid: [3; 16],
            checkpoint: "a".into(),
            parent: String::new(),
            created_unix: 1,
            size: disk.len() as u64,
            chunk_size: CHUNK as u32,
            granularity: CHUNK as u32,
            new_bytes: 0,
            chunks,
            pieces: Vec::new(),
            zero_runs: Vec::new(),
        };
        (repo, point, disk)
    }

    #[test]
    fn a_span_streamed_in_small_parts_gives_every_slot_and_a_flipped_or_short_body_is_refused() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (repo, point, disk) = random_point(&rt, dir.path());
        let (map, _, _) = rt.block_on(repo.chunk_map()).unwrap();
        let wanted = (0..24).filter(|&i| !point.slot_is_zero(i));
        let runs = plan_runs(&point, &map, wanted, RunLimits::default()).unwrap();
        let packs: std::collections::HashSet<_> = runs
            .iter()
            .filter_map(|r| r.span.as_ref().map(|s| s.0))
            .collect();
        assert_eq!(packs.len(), 2, "{runs:?}");
        assert!(runs.iter().all(|r| r.span.is_some()) && runs.iter().any(|r| r.slots.len() > 4));
        let slot = |i: u64| &disk[i as usize * (64 << 10)..(i as usize + 1) * (64 << 10)];

        // Parts of 1000 bytes: every blob is joined from many, its ends inside parts; parts
        // of 1 MiB: a whole span in one part, each blob a slice of it.
        for part in [1000, 1 << 20] {
            let streamed = chopped(&repo, part, None, 0);
            for run in &runs {
                let got = rt
                    .block_on(fetch_run(&streamed, &point, &map, run, &|| None))
                    .unwrap();
                assert_eq!(got.len(), run.slots.len());
                for (&i, data) in run.slots.iter().zip(&got) {
                    assert!(
                        data.as_slice() == slot(i),
                        "slot {i} with parts of {part} bytes"
                    );
                }
            }
        }

        // One byte flipped inside slot 7's blob: its run is refused, naming the pack and the
        // chunk; every other run still reads.
        let ChunkRef::Data(id) = point.chunks[7] else {
            panic!("slot 7 holds data")
        };
        let at = map[&id];
        let flip = Some((pack_path(&at.pack), at.entry.offset + 100));
        let flipped = chopped(&repo, 1000, flip, 0);
        for run in &runs {
            let got = rt.block_on(fetch_run(&flipped, &point, &map, run, &|| None));
            if run.slots.contains(&7) {
                let err = got.unwrap_err().to_string();
                let pack = pack_path(&at.pack).to_string();
                assert!(err.contains(&pack) && err.contains(&id.hex()), "{err}");
            } else {
                got.unwrap();
            }
        }

        // A body that ends 10 bytes early.
        let short = chopped(&repo, 1000, None, 10);
        let err = rt
            .block_on(fetch_run(&short, &point, &map, &runs[0], &|| None))
            .unwrap_err()
            .to_string();
        assert!(err.contains("ends at byte"), "{err}");
    }

    #[test]
    fn the_chunks_of_a_runs_pieces_are_read_in_ranges_of_neighbours() {
        let (mut point, mut map) = point(&[Some((1, 8, 100)), Some((1, 108, 100))]);
        let far = 108 + MAX_GAP + 1;
        let mut piece = |offset: u64, id: u8, at: Option<(u8, u64)>| {
            let chunk = ChunkId([id; 32]);
            if let Some((pack, start)) = at {
                map.insert(chunk, location(pack, start, 50));
            }
            crate::format::Piece {
                offset,
                len: 10,
                chunk: ChunkRef::Data(chunk),
                within: 0,
            }
        };
        // Slot 0: a piece in pack 2; slot 1: its neighbour there, one past the gap, one
        // whose chunk is slot 0's (inside the span: not read twice), one in no pack index.
        point.pieces = vec![
            piece(0, 100, Some((2, 8))),
            piece(1 << 16, 101, Some((2, 58))),
            piece((1 << 16) + 20, 102, Some((2, far))),
            piece((1 << 16) + 40, 1, None),
            piece((1 << 16) + 60, 103, None),
        ];
        let runs = plan_runs(&point, &map, 0..2, RunLimits::default()).unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].span, Some(([1; 32], 8..208)));
        assert_eq!(
            runs[0].pieces,
            [([2; 32], 8..108), ([2; 32], far..far + 50)]
        );
        let alone = slot_run(&point, &map, 0).unwrap();
        assert_eq!(alone.pieces, [([2; 32], 8..58)]);
    }

    #[test]
    fn a_chunk_in_no_pack_index_is_named() {
        let (point, mut map) = point(&[Some((1, 8, 100))]);
        map.clear();
        let err = plan_runs(&point, &map, 0..1, RunLimits::default()).unwrap_err();
        assert!(err.to_string().contains("no pack index"), "{err}");
    }
}
