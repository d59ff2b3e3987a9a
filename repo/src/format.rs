//! The repository's binary objects as pure codecs (bytes <-> types): pack indexes and point
//! indexes. Every parser is total: a corrupt or truncated object is an error naming what is
//! wrong, never a panic, and lengths are checked against the object's size before anything
//! is allocated. The layouts are documented byte by byte in docs/FORMATS.md ("Repository").

use std::fmt;
use std::ops::Range;

/// Magic of a pack object (its first 8 bytes).
pub const PACK_MAGIC: &[u8; 8] = b"TMPACK01";
/// Magic of a pack index object.
pub const PACK_INDEX_MAGIC: &[u8; 8] = b"TMPKIDX1";
/// Magic of a point index object.
pub const POINT_MAGIC: &[u8; 8] = b"TMPOINT1";

/// Bytes of one pack index entry.
pub const PACK_ENTRY_LEN: usize = 32 + 8 + 4 + 4 + 4;
/// Longest volume or checkpoint name.
pub const MAX_NAME: usize = 128;
/// Largest chunk a repository may use (and so the largest blob a reader inflates).
pub const MAX_CHUNK: u32 = 64 << 20;
/// Smallest chunk.
pub const MIN_CHUNK: u32 = 64 << 10;

/// A chunk's id: the hash of its plaintext ([`crate::Repository::chunk_id`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    pub fn hex(&self) -> String {
        hex(&self.0)
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.hex())
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parse 64 hex digits.
pub fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Why an object could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FormatError(pub String);

fn bad(what: impl Into<String>) -> FormatError {
    FormatError(what.into())
}

/// Where one chunk lives inside a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    pub id: ChunkId,
    /// Byte offset of the compressed blob in the pack.
    pub offset: u64,
    /// Length of the compressed blob.
    pub stored_len: u32,
    /// Length of the plaintext.
    pub raw_len: u32,
    /// CRC-32 (IEEE) of the compressed blob.
    pub crc: u32,
}

/// The index of one pack: which chunks it holds and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackIndex {
    /// The hash of the whole pack object, its name ([`crate::Repository::pack_id`]).
    pub pack_id: [u8; 32],
    pub pack_len: u64,
    pub entries: Vec<PackEntry>,
}

impl PackIndex {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(56 + self.entries.len() * PACK_ENTRY_LEN);
        out.extend_from_slice(PACK_INDEX_MAGIC);
        out.extend_from_slice(&self.pack_id);
        out.extend_from_slice(&self.pack_len.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&e.id.0);
            out.extend_from_slice(&e.offset.to_le_bytes());
            out.extend_from_slice(&e.stored_len.to_le_bytes());
            out.extend_from_slice(&e.raw_len.to_le_bytes());
            out.extend_from_slice(&e.crc.to_le_bytes());
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<PackIndex, FormatError> {
        let mut r = Reader::new(bytes);
        check_crc(bytes)?;
        if r.take(8)? != PACK_INDEX_MAGIC {
            return Err(bad("not a pack index (bad magic)"));
        }
        let pack_id = r.array32()?;
        let pack_len = r.u64()?;
        let count = r.u32()? as usize;
        if bytes.len() != 8 + 32 + 8 + 4 + count.saturating_mul(PACK_ENTRY_LEN) + 4 {
            return Err(bad(format!(
                "pack index says {count} entries but is {} bytes long",
                bytes.len()
            )));
        }
        let mut entries = Vec::with_capacity(count);
        for i in 0..count {
            let entry = PackEntry {
                id: ChunkId(r.array32()?),
                offset: r.u64()?,
                stored_len: r.u32()?,
                raw_len: r.u32()?,
                crc: r.u32()?,
            };
            let end = entry.offset.checked_add(u64::from(entry.stored_len));
            if entry.offset < PACK_MAGIC.len() as u64
                || end.is_none_or(|end| end > pack_len)
                || entry.raw_len > MAX_CHUNK
                || entry.raw_len == 0
            {
                return Err(bad(format!("pack index entry {i} is out of bounds")));
            }
            entries.push(entry);
        }
        Ok(PackIndex {
            pack_id,
            pack_len,
            entries,
        })
    }
}

/// Most pieces one chunk slot of a point may carry; a backup that would leave more merges
/// the slot into one whole chunk instead (see [`crate::builder`]), so a read of a slot costs
/// at most this many extra chunk fetches.
pub const MAX_SLOT_PIECES: usize = 16;
/// The point index version this build writes; it reads 1 (no pieces), 2 (no zero runs)
/// and 3.
pub const POINT_VERSION: u32 = 3;
/// Grid of a chunk's zero runs: a run starts on it and ends on it or at the chunk's end,
/// so a run is made of whole blocks of this size that are all zero (the last block of a
/// short last chunk may be shorter).
pub const ZERO_GRID: u32 = 64 << 10;
/// Most zero runs recorded for one chunk slot; a backup that finds more keeps the longest
/// (runs are a hint that bytes are zero, never a claim that the others are data).
pub const MAX_SLOT_ZERO_RUNS: usize = 64;
/// Bytes of one piece record without its chunk id: tag, offset, length, offset in the chunk.
const PIECE_HEAD_LEN: usize = 1 + 8 + 4 + 4;

/// One chunk of a point: all zero (not stored) or the id of its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkRef {
    Zero,
    Data(ChunkId),
}

/// A byte range of a point laid over its chunk slot: the bytes `[within, within + len)` of
/// the chunk `chunk` (or zeros) are the point's bytes `[offset, offset + len)`. An
/// incremental point stores what changed as pieces over the previous point's chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Offset in the volume of the piece's first byte.
    pub offset: u64,
    pub len: u32,
    pub chunk: ChunkRef,
    /// Offset inside `chunk` of the piece's first byte (0 for a zero piece).
    pub within: u32,
}

/// Bytes `[offset, offset + len)` of the chunk of slot `slot` are all zero: recorded at
/// backup time so that `repo export` reports them as a hole and answers reads of them
/// without fetching the chunk. Every reader that inflates the chunk checks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroRun {
    pub slot: u64,
    /// Offset inside the slot's chunk.
    pub offset: u32,
    pub len: u32,
}

impl ZeroRun {
    /// Offset inside the chunk just past the run.
    pub fn end(&self) -> u64 {
        u64::from(self.offset) + u64::from(self.len)
    }
}

/// Whether every byte of `bytes` is zero: OR-folded a page at a time (the compiler
/// vectorises the fold), stopping at the first page with data.
pub fn is_zero(bytes: &[u8]) -> bool {
    bytes
        .chunks(4096)
        .all(|page| page.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// The zero runs of `chunk`, the chunk of slot `slot`: its [`ZERO_GRID`] blocks that are
/// all zero, neighbours joined; when there are more than [`MAX_SLOT_ZERO_RUNS`], the
/// longest. A chunk that is all zero is one run over all of it (the caller stores no chunk
/// for it then).
pub fn find_zero_runs(slot: u64, chunk: &[u8]) -> Vec<ZeroRun> {
    let mut runs: Vec<ZeroRun> = Vec::new();
    for (k, block) in chunk.chunks(ZERO_GRID as usize).enumerate() {
        if !is_zero(block) {
            continue;
        }
        let offset = k as u32 * ZERO_GRID;
        match runs.last_mut() {
            Some(last) if last.end() == u64::from(offset) => last.len += block.len() as u32,
            _ => runs.push(ZeroRun {
                slot,
                offset,
                len: block.len() as u32,
            }),
        }
    }
    if runs.len() > MAX_SLOT_ZERO_RUNS {
        runs.sort_by_key(|r| std::cmp::Reverse(r.len));
        runs.truncate(MAX_SLOT_ZERO_RUNS);
        runs.sort_by_key(|r| r.offset);
    }
    runs
}

/// The first of `runs` (of the chunk `chunk`) that is not all zero in it, or that lies
/// past its end: a point index that says so must not be trusted.
pub fn wrong_zero_run<'a>(runs: &'a [ZeroRun], chunk: &[u8]) -> Option<&'a ZeroRun> {
    runs.iter().find(|run| {
        chunk
            .get(run.offset as usize..run.end() as usize)
            .is_none_or(|bytes| !is_zero(bytes))
    })
}

impl Piece {
    /// Offset in the volume just past the piece.
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }
}

/// The index of one point: which chunks make up the volume at a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointIndex {
    pub volume: String,
    pub volume_uuid: [u8; 16],
    pub checkpoint: String,
    /// The checkpoint of the point this one was taken incrementally from ("" for a full one).
    pub parent: String,
    pub created_unix: u64,
    pub size: u64,
    pub chunk_size: u32,
    pub granularity: u32,
    /// Compressed bytes this point added to the repository (new chunks only).
    pub new_bytes: u64,
    /// One entry per chunk slot: the slot's whole chunk (for a slot with pieces, the chunk
    /// under them).
    pub chunks: Vec<ChunkRef>,
    /// Pieces over the slots, ascending and disjoint, each inside one slot, at most
    /// [`MAX_SLOT_PIECES`] per slot (empty in a version 1 index).
    pub pieces: Vec<Piece>,
    /// Zero runs of the slots' data chunks, by slot then offset, disjoint and not touching,
    /// on the [`ZERO_GRID`], at most [`MAX_SLOT_ZERO_RUNS`] per slot (empty before version
    /// 3). Runs of a slot whose chunk is [`ChunkRef::Zero`] are not written.
    pub zero_runs: Vec<ZeroRun>,
}

/// Number of chunks of a volume of `size` bytes.
pub fn chunk_count(size: u64, chunk_size: u32) -> u64 {
    size.div_ceil(u64::from(chunk_size.max(1)))
}

/// A volume or checkpoint name is 1..=128 of `A-Z a-z 0-9 . _ - +`, not starting with `.`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b))
}

impl PointIndex {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            136 + self.chunks.len() * 35
                + self.zero_runs.len() * 8
                + self.pieces.len() * (PIECE_HEAD_LEN + 32),
        );
        out.extend_from_slice(POINT_MAGIC);
        out.extend_from_slice(&POINT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.volume_uuid);
        out.extend_from_slice(&self.created_unix.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&self.granularity.to_le_bytes());
        out.extend_from_slice(&self.new_bytes.to_le_bytes());
        for name in [&self.volume, &self.checkpoint, &self.parent] {
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        }
        out.extend_from_slice(&0u16.to_le_bytes());
        for name in [&self.volume, &self.checkpoint, &self.parent] {
            out.extend_from_slice(name.as_bytes());
        }
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        for (index, chunk) in self.chunks.iter().enumerate() {
            let runs = self.slot_zero_runs(index as u64);
            match chunk {
                ChunkRef::Zero => out.push(0),
                ChunkRef::Data(id) if runs.is_empty() => {
                    out.push(1);
                    out.extend_from_slice(&id.0);
                }
                ChunkRef::Data(id) => {
                    out.push(2);
                    out.extend_from_slice(&id.0);
                    out.extend_from_slice(&(runs.len() as u16).to_le_bytes());
                    for run in runs {
                        out.extend_from_slice(&run.offset.to_le_bytes());
                        out.extend_from_slice(&run.len.to_le_bytes());
                    }
                }
            }
        }
        out.extend_from_slice(&(self.pieces.len() as u64).to_le_bytes());
        for piece in &self.pieces {
            out.push(match piece.chunk {
                ChunkRef::Zero => 0,
                ChunkRef::Data(_) => 1,
            });
            out.extend_from_slice(&piece.offset.to_le_bytes());
            out.extend_from_slice(&piece.len.to_le_bytes());
            out.extend_from_slice(&piece.within.to_le_bytes());
            if let ChunkRef::Data(id) = piece.chunk {
                out.extend_from_slice(&id.0);
            }
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<PointIndex, FormatError> {
        check_crc(bytes)?;
        let body = &bytes[..bytes.len() - 4];
        let mut r = Reader::new(body);
        if r.take(8)? != POINT_MAGIC {
            return Err(bad("not a point index (bad magic)"));
        }
        let version = r.u32()?;
        if !(1..=POINT_VERSION).contains(&version) {
            return Err(bad(format!(
                "point index version {version} is not supported (this tidemark reads 1 to \
                 {POINT_VERSION}); use a newer tidemark"
            )));
        }
        let _flags = r.u32()?;
        let mut volume_uuid = [0u8; 16];
        volume_uuid.copy_from_slice(r.take(16)?);
        let created_unix = r.u64()?;
        let size = r.u64()?;
        let chunk_size = r.u32()?;
        let granularity = r.u32()?;
        let new_bytes = r.u64()?;
        let lens = [r.u16()?, r.u16()?, r.u16()?];
        let _reserved = r.u16()?;
        let mut names = Vec::with_capacity(3);
        for len in lens {
            let raw = r.take(usize::from(len))?;
            let name = std::str::from_utf8(raw)
                .map_err(|_| bad("a name in the point index is not UTF-8"))?;
            names.push(name.to_string());
        }
        let parent = names.pop().unwrap_or_default();
        let checkpoint = names.pop().unwrap_or_default();
        let volume = names.pop().unwrap_or_default();
        if !valid_name(&volume)
            || !valid_name(&checkpoint)
            || !(parent.is_empty() || valid_name(&parent))
        {
            return Err(bad("a name in the point index is not a valid name"));
        }
        if !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size) || !chunk_size.is_power_of_two() {
            return Err(bad(format!("chunk size {chunk_size} is out of range")));
        }
        let count = r.u64()?;
        if count != chunk_count(size, chunk_size) {
            return Err(bad(format!(
                "{count} chunks do not cover a volume of {size} bytes in {chunk_size}-byte chunks"
            )));
        }
        if count > r.remaining() as u64 {
            return Err(bad("the chunk list is longer than the object"));
        }
        let mut chunks = Vec::with_capacity(count as usize);
        let mut zero_runs = Vec::new();
        for i in 0..count {
            match r.u8()? {
                0 => chunks.push(ChunkRef::Zero),
                1 => chunks.push(ChunkRef::Data(ChunkId(r.array32()?))),
                2 if version >= 3 => {
                    chunks.push(ChunkRef::Data(ChunkId(r.array32()?)));
                    let slot_len = size.saturating_sub(i * u64::from(chunk_size));
                    decode_zero_runs(
                        &mut r,
                        i,
                        slot_len.min(u64::from(chunk_size)),
                        &mut zero_runs,
                    )?;
                }
                tag => return Err(bad(format!("chunk {i} has an unknown tag {tag}"))),
            }
        }
        let pieces = if version == 1 {
            Vec::new()
        } else {
            decode_pieces(&mut r, size, chunk_size)?
        };
        if r.remaining() != 0 {
            return Err(bad("trailing bytes after the chunk list"));
        }
        Ok(PointIndex {
            volume,
            volume_uuid,
            checkpoint,
            parent,
            created_unix,
            size,
            chunk_size,
            granularity,
            new_bytes,
            chunks,
            pieces,
            zero_runs,
        })
    }

    /// `VOLUME@CHECKPOINT`.
    pub fn name(&self) -> String {
        format!("{}@{}", self.volume, self.checkpoint)
    }

    /// Bytes of chunk slot `index` (the last one may be short).
    pub fn slot_len(&self, index: u64) -> u64 {
        let chunk = u64::from(self.chunk_size);
        self.size.saturating_sub(index * chunk).min(chunk)
    }

    /// The pieces over chunk slot `index`, ascending.
    pub fn slot_pieces(&self, index: u64) -> &[Piece] {
        let chunk = u64::from(self.chunk_size);
        let start = index * chunk;
        let end = start + chunk;
        let first = self.pieces.partition_point(|p| p.offset < start);
        let last = self.pieces.partition_point(|p| p.offset < end);
        &self.pieces[first..last]
    }

    /// The zero runs of slot `index`'s chunk, ascending.
    pub fn slot_zero_runs(&self, index: u64) -> &[ZeroRun] {
        let first = self.zero_runs.partition_point(|r| r.slot < index);
        let last = self.zero_runs.partition_point(|r| r.slot <= index);
        &self.zero_runs[first..last]
    }

    /// The volume ranges of slot `index` that read as zeros by the index alone, ascending,
    /// disjoint and not touching: its chunk's zero runs (all of it for a zero chunk) minus
    /// what its pieces cover, plus its zero pieces. Everything else of the slot is data.
    pub fn slot_zero_extents(&self, index: u64) -> Vec<Range<u64>> {
        let start = index * u64::from(self.chunk_size);
        let base: Vec<Range<u64>> = match self.chunks.get(index as usize) {
            Some(ChunkRef::Zero) => std::iter::once(start..start + self.slot_len(index)).collect(),
            Some(ChunkRef::Data(_)) => self
                .slot_zero_runs(index)
                .iter()
                .map(|r| start + u64::from(r.offset)..start + r.end())
                .collect(),
            None => Vec::new(),
        };
        let pieces = self.slot_pieces(index);
        let mut extents: Vec<Range<u64>> = Vec::with_capacity(base.len() + pieces.len());
        for range in base {
            let mut from = range.start;
            for piece in pieces {
                if piece.end() <= from || piece.offset >= range.end {
                    continue;
                }
                if piece.offset > from {
                    extents.push(from..piece.offset);
                }
                from = piece.end().min(range.end);
            }
            if from < range.end {
                extents.push(from..range.end);
            }
        }
        extents.extend(
            pieces
                .iter()
                .filter(|p| p.chunk == ChunkRef::Zero)
                .map(|p| p.offset..p.end()),
        );
        extents.sort_by_key(|r| r.start);
        let mut joined: Vec<Range<u64>> = Vec::with_capacity(extents.len());
        for range in extents {
            match joined.last_mut() {
                Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
                _ => joined.push(range),
            }
        }
        joined
    }

    /// Whether slot `index` reads as all zeros without reading any chunk: its chunk is
    /// zero and so is every piece over it.
    pub fn slot_is_zero(&self, index: u64) -> bool {
        self.chunks.get(index as usize) == Some(&ChunkRef::Zero)
            && self
                .slot_pieces(index)
                .iter()
                .all(|p| p.chunk == ChunkRef::Zero)
    }

    /// Every data chunk the point reads: its slots' chunks and its pieces' chunks.
    pub fn data_chunks(&self) -> impl Iterator<Item = ChunkId> + '_ {
        self.chunks
            .iter()
            .chain(self.pieces.iter().map(|p| &p.chunk))
            .filter_map(|c| match c {
                ChunkRef::Data(id) => Some(*id),
                ChunkRef::Zero => None,
            })
    }
}

/// The zero runs of a tag 2 slot `slot` whose chunk is `chunk_len` bytes, appended to
/// `runs`: 1 to [`MAX_SLOT_ZERO_RUNS`] of them, each non-empty, starting on the
/// [`ZERO_GRID`] and ending on it or at the chunk's end, ascending with a gap between
/// neighbours (a writer joins touching runs), and not the whole chunk (an all-zero chunk is
/// tag 0).
fn decode_zero_runs(
    r: &mut Reader<'_>,
    slot: u64,
    chunk_len: u64,
    runs: &mut Vec<ZeroRun>,
) -> Result<(), FormatError> {
    let count = usize::from(r.u16()?);
    if count == 0 || count > MAX_SLOT_ZERO_RUNS {
        return Err(bad(format!(
            "chunk {slot} has {count} zero runs (1 to {MAX_SLOT_ZERO_RUNS} after tag 2)"
        )));
    }
    let grid = u64::from(ZERO_GRID);
    let mut previous_end = None;
    for k in 0..count {
        let offset = r.u32()?;
        let len = r.u32()?;
        let (start, end) = (u64::from(offset), u64::from(offset) + u64::from(len));
        let why = if len == 0 {
            Some("is empty")
        } else if end > chunk_len {
            Some("ends past the end of its chunk")
        } else if start % grid != 0 || (end % grid != 0 && end != chunk_len) {
            Some("is not on the 64 KiB grid")
        } else if previous_end.is_some_and(|p| start < p) {
            Some("overlaps or precedes the run before it")
        } else if previous_end == Some(start) {
            Some("touches the run before it (they should be one run)")
        } else if start == 0 && end == chunk_len {
            Some("covers the whole chunk (an all-zero chunk has tag 0)")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(bad(format!(
                "zero run {k} of chunk {slot} ({len} bytes at {offset}) {why}"
            )));
        }
        previous_end = Some(end);
        runs.push(ZeroRun { slot, offset, len });
    }
    Ok(())
}

/// The piece list of a version 2 point index, every piece checked: inside the volume and
/// inside one slot, ascending and disjoint, at most [`MAX_SLOT_PIECES`] per slot.
fn decode_pieces(
    r: &mut Reader<'_>,
    size: u64,
    chunk_size: u32,
) -> Result<Vec<Piece>, FormatError> {
    let count = r.u64()?;
    if count > (r.remaining() / PIECE_HEAD_LEN) as u64 {
        return Err(bad("the piece list is longer than the object"));
    }
    let chunk = u64::from(chunk_size);
    let mut pieces: Vec<Piece> = Vec::with_capacity(count as usize);
    let mut in_slot = 0usize;
    for i in 0..count {
        let tag = r.u8()?;
        let offset = r.u64()?;
        let len = r.u32()?;
        let within = r.u32()?;
        let chunk_ref = match tag {
            0 => ChunkRef::Zero,
            1 => ChunkRef::Data(ChunkId(r.array32()?)),
            tag => return Err(bad(format!("piece {i} has an unknown tag {tag}"))),
        };
        let piece = Piece {
            offset,
            len,
            chunk: chunk_ref,
            within,
        };
        let end = offset.checked_add(u64::from(len));
        if len == 0
            || end.is_none_or(|end| end > size || (end - 1) / chunk != offset / chunk)
            || u64::from(within) + u64::from(len) > u64::from(MAX_CHUNK)
            || (chunk_ref == ChunkRef::Zero && within != 0)
        {
            return Err(bad(format!(
                "piece {i} ({len} bytes at {offset}, {within} into its chunk) is empty, past \
                 the end of the volume or of its chunk, or across a chunk boundary"
            )));
        }
        match pieces.last() {
            Some(last) if last.end() > offset => {
                return Err(bad(format!(
                    "piece {i} at {offset} overlaps or precedes the piece before it"
                )))
            }
            Some(last) if last.offset / chunk == offset / chunk => in_slot += 1,
            _ => in_slot = 1,
        }
        if in_slot > MAX_SLOT_PIECES {
            return Err(bad(format!(
                "chunk slot {} has more than {MAX_SLOT_PIECES} pieces",
                offset / chunk
            )));
        }
        pieces.push(piece);
    }
    Ok(pieces)
}

fn check_crc(bytes: &[u8]) -> Result<(), FormatError> {
    if bytes.len() < 12 {
        return Err(bad(format!("object too short ({} bytes)", bytes.len())));
    }
    let (body, tail) = bytes.split_at(bytes.len() - 4);
    let want = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
    if crc32fast::hash(body) != want {
        return Err(bad("checksum mismatch (the object is corrupt)"));
    }
    Ok(())
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, at: 0 }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if n > self.remaining() {
            return Err(bad("object truncated"));
        }
        let out = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, FormatError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, FormatError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, FormatError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    fn array32(&mut self) -> Result<[u8; 32], FormatError> {
        let mut a = [0u8; 32];
        a.copy_from_slice(self.take(32)?);
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point() -> PointIndex {
        PointIndex {
            volume: "vm1".into(),
            volume_uuid: [7; 16],
            checkpoint: "c2".into(),
            parent: "c1".into(),
            created_unix: 1_700_000_000,
            size: (4 << 20) * 2 + 5,
            chunk_size: 4 << 20,
            granularity: 65536,
            new_bytes: 1234,
            chunks: vec![
                ChunkRef::Zero,
                ChunkRef::Data(ChunkId([1; 32])),
                ChunkRef::Data(ChunkId([2; 32])),
            ],
            pieces: vec![
                Piece {
                    offset: 65536,
                    len: 65536,
                    chunk: ChunkRef::Data(ChunkId([3; 32])),
                    within: 0,
                },
                Piece {
                    offset: (4 << 20) + 131072,
                    len: 4096,
                    chunk: ChunkRef::Zero,
                    within: 0,
                },
                Piece {
                    offset: (4 << 20) + 196608,
                    len: 65536,
                    chunk: ChunkRef::Data(ChunkId([4; 32])),
                    within: 65536,
                },
            ],
            zero_runs: vec![
                ZeroRun {
                    slot: 1,
                    offset: 0,
                    len: 65536,
                },
                ZeroRun {
                    slot: 1,
                    offset: 3 << 20,
                    len: 1 << 20,
                },
            ],
        }
    }

    /// `point`'s bytes as a version 1 index (no piece list): what earlier builds wrote.
    fn encode_v1(point: &PointIndex) -> Vec<u8> {
        assert!(point.pieces.is_empty());
        let mut bytes = encode_v2(point);
        bytes.truncate(bytes.len() - 4 - 8);
        bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// `point`'s bytes as a version 2 index (no zero runs: the layout of version 3 without
    /// tag 2).
    fn encode_v2(point: &PointIndex) -> Vec<u8> {
        assert!(point.zero_runs.is_empty());
        with_version(point.encode(), 2)
    }

    /// `bytes` with the version field set to `version` and the CRC fixed up.
    fn with_version(mut bytes: Vec<u8>, version: u32) -> Vec<u8> {
        bytes[8..12].copy_from_slice(&version.to_le_bytes());
        recrc(bytes)
    }

    fn recrc(mut bytes: Vec<u8>) -> Vec<u8> {
        let len = bytes.len();
        let crc = crc32fast::hash(&bytes[..len - 4]);
        bytes[len - 4..].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// `point` encoded with a valid CRC however wrong its pieces are.
    fn decode_pieces_of(pieces: Vec<Piece>) -> Result<PointIndex, FormatError> {
        let p = PointIndex { pieces, ..point() };
        PointIndex::decode(&p.encode())
    }

    #[test]
    fn point_index_round_trips_and_every_corruption_is_an_error() {
        let p = point();
        let bytes = p.encode();
        assert_eq!(PointIndex::decode(&bytes).unwrap(), p);
        for len in 0..bytes.len() {
            assert!(PointIndex::decode(&bytes[..len]).is_err(), "{len}");
        }
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(PointIndex::decode(&bad).is_err(), "{i}");
        }
    }

    #[test]
    fn a_version_1_index_without_pieces_still_decodes() {
        let p = PointIndex {
            pieces: Vec::new(),
            zero_runs: Vec::new(),
            ..point()
        };
        let v1 = encode_v1(&p);
        assert_eq!(&v1[8..12], &1u32.to_le_bytes());
        assert_eq!(PointIndex::decode(&v1).unwrap(), p);
        let v4 = with_version(p.encode(), 4);
        let err = PointIndex::decode(&v4).unwrap_err();
        assert!(err.0.contains("version 4"), "{err}");
    }

    #[test]
    fn a_version_2_index_still_decodes_and_may_not_hold_zero_runs() {
        let p = PointIndex {
            zero_runs: Vec::new(),
            ..point()
        };
        let v2 = encode_v2(&p);
        assert_eq!(PointIndex::decode(&v2).unwrap(), p);
        let err = PointIndex::decode(&with_version(point().encode(), 2)).unwrap_err();
        assert!(err.0.contains("chunk 1 has an unknown tag 2"), "{err}");
    }

    #[test]
    fn a_version_3_index_round_trips_its_zero_runs() {
        let p = point();
        let bytes = p.encode();
        assert_eq!(&bytes[8..12], &3u32.to_le_bytes());
        let back = PointIndex::decode(&bytes).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.slot_zero_runs(1), &p.zero_runs[..]);
        assert!(back.slot_zero_runs(0).is_empty() && back.slot_zero_runs(2).is_empty());
    }

    /// `point` with `runs` over its slot 1 (4 MiB) or 2 (5 bytes), encoded with a valid CRC
    /// however wrong the runs are.
    fn decode_runs_of(runs: Vec<ZeroRun>) -> Result<PointIndex, FormatError> {
        let p = PointIndex {
            zero_runs: runs,
            ..point()
        };
        PointIndex::decode(&p.encode())
    }

    #[test]
    fn zero_runs_off_the_grid_empty_past_the_chunk_unordered_touching_or_too_many_are_refused() {
        let run = |slot: u64, offset: u32, len: u32| ZeroRun { slot, offset, len };
        let grid = ZERO_GRID;
        let chunk = 4u32 << 20;
        let cases: Vec<(Vec<ZeroRun>, &str)> = vec![
            (vec![run(1, 0, 0)], "is empty"),
            (vec![run(1, 4096, grid)], "not on the 64 KiB grid"),
            (vec![run(1, 0, grid + 1)], "not on the 64 KiB grid"),
            (
                vec![run(1, chunk - grid, 2 * grid)],
                "past the end of its chunk",
            ),
            (vec![run(1, u32::MAX - 5, 100)], "past the end of its chunk"),
            (vec![run(2, 0, grid)], "past the end of its chunk"),
            (vec![run(1, 0, chunk)], "covers the whole chunk"),
            (vec![run(2, 0, 5)], "covers the whole chunk"),
            (vec![run(1, 0, 2 * grid), run(1, grid, grid)], "overlaps"),
            (vec![run(1, 4 * grid, grid), run(1, 0, grid)], "precedes"),
            (vec![run(1, 0, grid), run(1, grid, grid)], "touches"),
            (
                (0..=MAX_SLOT_ZERO_RUNS as u32)
                    .map(|k| run(1, 2 * k * grid, grid))
                    .collect(),
                "zero runs (1 to 64",
            ),
        ];
        for (runs, why) in cases {
            let err = decode_runs_of(runs.clone()).unwrap_err();
            assert!(err.0.contains(why), "{runs:?}: {err}");
        }
    }

    #[test]
    fn zero_runs_are_whole_zero_blocks_joined_and_the_longest_kept() {
        let grid = ZERO_GRID as usize;
        // 67 one-block runs and one of three blocks, data between them, then a short tail
        // of zeros after data.
        let mut chunk = vec![1u8; 140 * grid + 100];
        let mut model = Vec::new();
        for k in 0..68 {
            let len = if k == 10 { 3 * grid } else { grid };
            let offset = if k <= 10 {
                2 * k * grid
            } else {
                (2 * k + 2) * grid
            };
            chunk[offset..offset + len].fill(0);
            model.push((offset as u32, len as u32));
        }
        chunk[140 * grid..].fill(0);
        chunk[3 * grid + 17] = 0;
        let runs: Vec<(u32, u32)> = find_zero_runs(5, &chunk)
            .iter()
            .map(|r| (r.offset, r.len))
            .collect();
        // 69 runs with the tail: the three-block run and the first 63 of the others stay.
        assert_eq!(model[10].1, 3 * ZERO_GRID);
        assert_eq!(runs, model[..64]);
        assert!(find_zero_runs(0, &chunk).iter().all(|r| r.slot == 0));
        assert!(find_zero_runs(0, &chunk[grid..2 * grid]).is_empty());
        let tail = find_zero_runs(0, &chunk[139 * grid..]);
        assert_eq!(
            tail.iter().map(|r| (r.offset, r.len)).collect::<Vec<_>>(),
            [(ZERO_GRID, 100)]
        );
        let whole = find_zero_runs(0, &vec![0; 3 * grid + 1]);
        assert_eq!((whole.len(), whole[0].len as usize), (1, 3 * grid + 1));
    }

    #[test]
    fn a_run_with_data_in_it_or_past_the_chunk_is_wrong() {
        let grid = ZERO_GRID as usize;
        let mut chunk = vec![0u8; 4 * grid];
        chunk[3 * grid - 1] = 9;
        let run = |offset: usize, len: usize| ZeroRun {
            slot: 0,
            offset: offset as u32,
            len: len as u32,
        };
        let runs = [
            run(0, 2 * grid),
            run(2 * grid, grid),
            run(3 * grid, 2 * grid),
        ];
        assert_eq!(wrong_zero_run(&runs[..1], &chunk), None);
        assert_eq!(wrong_zero_run(&runs, &chunk), Some(&runs[1]));
        assert_eq!(wrong_zero_run(&runs[2..], &chunk), Some(&runs[2]));
    }

    #[test]
    fn the_version_3_fuzz_seed_decodes_with_its_zero_runs() {
        let seed = include_bytes!("../../fuzz/corpus/repo_point_index/v3_zero_runs");
        let p = PointIndex::decode(seed).unwrap();
        let runs: Vec<(u64, u32, u32)> = p
            .zero_runs
            .iter()
            .map(|r| (r.slot, r.offset, r.len))
            .collect();
        let grid = ZERO_GRID;
        assert_eq!(runs, [(0, grid, grid), (0, 3 * grid, grid), (2, grid, 5)]);
        assert_eq!(p.pieces.len(), 2);
        assert_eq!(p.encode(), seed);
    }

    #[test]
    fn the_most_zero_runs_and_a_run_to_a_short_chunks_end_decode() {
        let grid = ZERO_GRID;
        let most: Vec<ZeroRun> = (0..MAX_SLOT_ZERO_RUNS as u32 / 2)
            .map(|k| ZeroRun {
                slot: 1,
                offset: 2 * k * grid,
                len: grid,
            })
            .collect();
        assert_eq!(decode_runs_of(most.clone()).unwrap().zero_runs, most);
        let mut p = point();
        p.size = (4 << 20) * 2 + grid as u64 + 5;
        p.zero_runs = vec![ZeroRun {
            slot: 2,
            offset: grid,
            len: 5,
        }];
        assert_eq!(PointIndex::decode(&p.encode()).unwrap(), p);
    }

    #[test]
    fn a_zero_run_count_of_zero_or_over_the_bound_is_refused_without_allocating() {
        let bytes = point().encode();
        // Slot 1's tag 2 sits after the header, names and chunk count, and slot 0's tag 0.
        let tag_at = 72 + 3 + 2 + 2 + 8 + 1;
        assert_eq!(bytes[tag_at], 2);
        let count_at = tag_at + 1 + 32;
        assert_eq!(&bytes[count_at..count_at + 2], &2u16.to_le_bytes());
        for count in [0u16, 65, u16::MAX] {
            let mut lying = bytes.clone();
            lying[count_at..count_at + 2].copy_from_slice(&count.to_le_bytes());
            let err = PointIndex::decode(&recrc(lying)).unwrap_err();
            assert!(err.0.contains(&format!("{count} zero runs")), "{err}");
        }
    }

    #[test]
    fn slot_zero_extents_are_the_runs_minus_data_pieces_plus_zero_pieces() {
        let p = point();
        let slot = 4u64 << 20;
        let grid = u64::from(ZERO_GRID);
        // Slot 1: runs [0, 64K) and [3M, 4M); a zero piece at 128K..132K, a data piece at
        // 192K..256K.
        assert_eq!(
            p.slot_zero_extents(1),
            [
                slot..slot + grid,
                slot + 2 * grid..slot + 2 * grid + 4096,
                slot + (3 << 20)..2 * slot
            ]
        );
        // Slot 0: a zero chunk under a data piece at 64K..128K.
        assert_eq!(p.slot_zero_extents(0), [0..grid, 2 * grid..slot]);
        assert!(p.slot_zero_extents(2).is_empty());
        let over = PointIndex {
            pieces: vec![Piece {
                offset: slot + (3 << 20) + grid,
                len: 4096,
                chunk: ChunkRef::Data(ChunkId([6; 32])),
                within: 0,
            }],
            ..point()
        };
        assert_eq!(
            over.slot_zero_extents(1),
            [
                slot..slot + grid,
                slot + (3 << 20)..slot + (3 << 20) + grid,
                slot + (3 << 20) + grid + 4096..2 * slot
            ],
            "a data piece laid over a zero run is data"
        );
    }

    #[test]
    fn pieces_out_of_bounds_overlapping_or_across_a_slot_are_refused() {
        let good = point().pieces;
        let data = |offset: u64, len: u32, within: u32| Piece {
            offset,
            len,
            chunk: ChunkRef::Data(ChunkId([5; 32])),
            within,
        };
        let chunk = 4u64 << 20;
        let cases: Vec<(Vec<Piece>, &str)> = vec![
            (vec![data(0, 0, 0)], "empty"),
            (vec![data(chunk - 4096, 8192, 0)], "across a chunk boundary"),
            (vec![data(2 * chunk, 8, 0)], "past the end"),
            (vec![data(u64::MAX - 10, 100, 0)], "past the end"),
            (vec![data(0, 4096, MAX_CHUNK)], "past the end"),
            (vec![good[0], good[0]], "overlaps"),
            (vec![good[1], good[0]], "precedes"),
            (
                vec![Piece {
                    within: 7,
                    ..good[1]
                }],
                "empty",
            ),
            (
                (0..=MAX_SLOT_PIECES as u64)
                    .map(|i| data(i * 8192, 4096, 0))
                    .collect(),
                "more than 16 pieces",
            ),
        ];
        for (pieces, why) in cases {
            let err = decode_pieces_of(pieces.clone()).unwrap_err();
            assert!(err.0.contains(why), "{pieces:?}: {err}");
        }
        let most: Vec<Piece> = (0..MAX_SLOT_PIECES as u64)
            .map(|i| data(i * 8192, 4096, 0))
            .collect();
        assert_eq!(decode_pieces_of(most.clone()).unwrap().pieces, most);
    }

    #[test]
    fn a_lying_piece_count_or_tag_is_refused_without_allocating() {
        let bytes = point().encode();
        // The piece count sits 8 bytes before the first piece record; the records take
        // 17 + 32, 17 and 17 + 32 bytes, then the CRC.
        let count_at = bytes.len() - 4 - (17 + 32) * 2 - 17 - 8;
        assert_eq!(&bytes[count_at..count_at + 8], &3u64.to_le_bytes());
        let mut lying = bytes.clone();
        lying[count_at..count_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = PointIndex::decode(&recrc(lying)).unwrap_err();
        assert!(err.0.contains("longer than the object"), "{err}");
        let mut tag = bytes.clone();
        tag[count_at + 8] = 9;
        let err = PointIndex::decode(&recrc(tag)).unwrap_err();
        assert!(err.0.contains("unknown tag 9"), "{err}");
    }

    #[test]
    fn slot_pieces_and_zero_slots() {
        let p = point();
        assert_eq!(p.slot_pieces(0), &p.pieces[..1]);
        assert_eq!(p.slot_pieces(1), &p.pieces[1..]);
        assert!(p.slot_pieces(2).is_empty());
        assert!(!p.slot_is_zero(0), "a data piece over a zero chunk");
        let zero_over_zero = PointIndex {
            pieces: vec![p.pieces[1]],
            chunks: vec![ChunkRef::Zero, ChunkRef::Zero, ChunkRef::Zero],
            ..point()
        };
        assert!(zero_over_zero.slot_is_zero(1));
        assert_eq!(p.slot_len(2), 5);
        assert_eq!(p.data_chunks().count(), 4);
    }

    #[test]
    fn a_valid_crc_over_a_lying_count_is_refused_without_allocating() {
        let mut p = point();
        p.size = u64::MAX / 2;
        let mut bytes = p.encode();
        bytes.truncate(bytes.len() - 4);
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        let err = PointIndex::decode(&bytes).unwrap_err();
        assert!(err.0.contains("do not cover"), "{err}");
    }

    #[test]
    fn pack_index_round_trips_and_bounds_are_checked() {
        let idx = PackIndex {
            pack_id: [9; 32],
            pack_len: 100,
            entries: vec![PackEntry {
                id: ChunkId([3; 32]),
                offset: 8,
                stored_len: 50,
                raw_len: 4096,
                crc: 77,
            }],
        };
        let bytes = idx.encode();
        assert_eq!(PackIndex::decode(&bytes).unwrap(), idx);
        for len in 0..bytes.len() {
            assert!(PackIndex::decode(&bytes[..len]).is_err(), "{len}");
        }
        let mut out_of_pack = idx.clone();
        out_of_pack.entries[0].stored_len = 93;
        assert!(PackIndex::decode(&out_of_pack.encode()).is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_name("vm-1.disk_0+x"));
        for bad in ["", ".x", "a/b", "a@b", "a b", &"x".repeat(129)] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert_eq!(parse_hex32(&ChunkId([0xab; 32]).hex()), Some([0xab; 32]));
        assert_eq!(parse_hex32("zz"), None);
    }
}
