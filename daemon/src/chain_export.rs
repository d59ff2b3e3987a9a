//! A restore point served without copying it: [`ChainExport`] reads a base (an image or a
//! full delta) and a chain of deltas as the one image `tidemark restore` would write.
//!
//! It lives here, beside the volume adapters of [`crate::export`], because it is an NBD
//! export adapter: it implements [`Export`] for `tidemark export --chain` and the attach
//! front ends (`tidemark mount`), and the engine neither knows nor needs the NBD traits.
//!
//! How a read resolves: at open, the chain is validated exactly as restore validates it
//! ([`check_chain`]: same volume, each delta starting from the checkpoint the previous one
//! ends at; the image as large as the deltas' volume), then the deltas' indexes are
//! resolved over the base, newest first, into the engine's [`PointMap`] (the one reader of
//! a point's layout, shared with `verify` and `volume rollback`): sorted pieces, each naming
//! where its bytes live: the base image, zeros, or a record of one delta. A read
//! binary-searches the map and copies from the base file (pread), zeros, or the decoded
//! record. Records are decompressed once into a small shared cache (concurrent readers of
//! one record wait for the first decoder instead of decoding it again) and every record's
//! checksums are checked when it is decoded, as restore checks them. `base:allocation` comes from the same map:
//! delta zero extents (and a full delta's gaps) are holes that read as zeros, the base
//! image's holes come from SEEK_DATA/SEEK_HOLE.
//!
//! With an [`Overlay`] the export is writable: written blocks go to the overlay's sparse
//! file and its durable block map; reads take overlay blocks where written, else the chain.
//! The backup files are only ever opened read-only.

mod overlay;

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use tidemark_engine::copy::delta::{check_chain, ChainBase};
use tidemark_engine::point_map::{Origin, PointMap};
use tidemark_formats::delta::{DeltaHeader, DeltaReader, IndexEntry};
use tidemark_formats::FormatError;
use tidemark_nbd::export::{
    Capabilities, Errno, Export, ExportError, ExportResult, Extent, MetaContext, ZeroFlags,
    STATE_HOLE, STATE_ZERO,
};
use tidemark_nbd::file::FileExport;

pub use overlay::Overlay;

/// Decoded records kept for readers (each at most 4 MiB, so at most 128 MiB).
const CACHED_RECORDS: usize = 32;
/// Most extents one block-status call returns; the server asks again for more.
const EXTENTS_PER_CALL: usize = 1024;

/// Why a chain cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The chain does not follow on, or a file is not what it should be (the message names
    /// the files at the break).
    #[error("{0}")]
    Chain(String),
    /// A delta file is damaged or not a delta.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// A file could not be opened or read.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The overlay cannot be used with this point.
    #[error("overlay {path}: {why}")]
    Overlay {
        /// The overlay file.
        path: PathBuf,
        /// What is wrong and what to do.
        why: String,
    },
}

impl ChainError {
    fn io(what: impl Into<String>, source: io::Error) -> ChainError {
        ChainError::Io {
            what: what.into(),
            source,
        }
    }
}

/// `Read + Seek` over a shared file with pread: each reader keeps its own position, and a
/// record read costs two preads (header, payload), never a buffer refill.
struct PreadFile {
    file: Arc<File>,
    pos: u64,
}

impl Read for PreadFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for PreadFile {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(at) => Some(at),
            SeekFrom::End(delta) => self.file.metadata()?.len().checked_add_signed(delta),
            SeekFrom::Current(delta) => self.pos.checked_add_signed(delta),
        };
        self.pos = pos.ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        Ok(self.pos)
    }
}

type LayerReader = DeltaReader<PreadFile>;

/// One delta of the chain: its index, and readers to decode its records (one per thread
/// decoding at once; more are opened as needed).
struct Layer {
    path: PathBuf,
    file: Arc<File>,
    header: DeltaHeader,
    entries: Vec<IndexEntry>,
    readers: Mutex<Vec<LayerReader>>,
}

impl Layer {
    fn open(path: &Path) -> Result<Layer, ChainError> {
        let file = File::open(path)
            .map_err(|err| ChainError::io(format!("opening {}", path.display()), err))?;
        let file = Arc::new(file);
        let reader = DeltaReader::open(
            PreadFile {
                file: file.clone(),
                pos: 0,
            },
            path,
        )?;
        Ok(Layer {
            path: path.to_path_buf(),
            file,
            header: reader.header().clone(),
            entries: reader.extents().to_vec(),
            readers: Mutex::new(vec![reader]),
        })
    }

    /// The uncompressed bytes of data extent `entry`, checksums verified.
    fn decode(&self, entry: usize) -> Result<Vec<u8>, String> {
        let taken = self.readers.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut reader = match taken {
            Some(reader) => reader,
            None => DeltaReader::open(
                PreadFile {
                    file: self.file.clone(),
                    pos: 0,
                },
                &self.path,
            )
            .map_err(|err| err.to_string())?,
        };
        let mut out = Vec::new();
        let result = reader.read_extent(&self.entries[entry], &mut out);
        self.readers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(reader);
        result.map_err(|err| err.to_string())?;
        Ok(out)
    }
}

type Decoded = Arc<OnceLock<Result<Arc<Vec<u8>>, String>>>;

/// Decoded records, shared by every reader; the oldest are dropped past
/// [`CACHED_RECORDS`] (a reader still holding one keeps it alive).
#[derive(Default)]
struct RecordCache {
    slots: Mutex<Slots>,
}

/// The cached records by (layer, entry), and their keys oldest first.
#[derive(Default)]
struct Slots {
    map: HashMap<(usize, usize), Decoded>,
    order: VecDeque<(usize, usize)>,
}

impl RecordCache {
    fn get(
        &self,
        key: (usize, usize),
        decode: impl FnOnce() -> Result<Vec<u8>, String>,
    ) -> Decoded {
        let slot = {
            let mut guard = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            let Slots { map, order } = &mut *guard;
            match map.get(&key) {
                Some(slot) => slot.clone(),
                None => {
                    let slot = Decoded::default();
                    map.insert(key, slot.clone());
                    order.push_back(key);
                    while order.len() > CACHED_RECORDS {
                        if let Some(old) = order.pop_front() {
                            map.remove(&old);
                        }
                    }
                    slot
                }
            }
        };
        // Outside the lock: other records decode meanwhile, readers of this one wait.
        let result = slot.get_or_init(|| decode().map(Arc::new));
        if result.is_err() {
            // Let a later read try again (the error may have been transient).
            let mut guard = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            let Slots { map, order } = &mut *guard;
            map.remove(&key);
            order.retain(|k| *k != key);
        }
        slot
    }
}

/// A restore point (base + deltas) as a read-only export, or a writable one over an
/// [`Overlay`].
pub struct ChainExport {
    describe: String,
    size: u64,
    base: Option<FileExport>,
    layers: Vec<Layer>,
    map: PointMap,
    cache: RecordCache,
    overlay: Option<Overlay>,
}

impl std::fmt::Debug for ChainExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainExport")
            .field("describe", &self.describe)
            .field("size", &self.size)
            .field("pieces", &self.map.len())
            .finish_non_exhaustive()
    }
}

/// The checkpoint a point ends at, as an overlay records it: (volume uuid, name,
/// generation). A plain image has none.
pub type PointId = Option<(uuid::Uuid, String, u64)>;

impl ChainExport {
    /// Open `base` (an image or a full delta) and `deltas` (oldest first) and check that
    /// they follow on, as `tidemark restore` checks them.
    pub fn open(base: &Path, deltas: &[PathBuf]) -> Result<ChainExport, ChainError> {
        let base_kind = ChainBase::detect(base);
        let mut paths = Vec::new();
        if let ChainBase::Delta(path) = &base_kind {
            paths.push(path.clone());
        }
        paths.extend(deltas.iter().cloned());
        let layers = paths
            .iter()
            .map(|path| Layer::open(path))
            .collect::<Result<Vec<_>, _>>()?;
        let headers: Vec<(PathBuf, DeltaHeader)> = layers
            .iter()
            .map(|l| (l.path.clone(), l.header.clone()))
            .collect();
        let base_is_image = matches!(base_kind, ChainBase::Image(_));
        check_chain(&headers, base_is_image).map_err(|err| ChainError::Chain(err.to_string()))?;
        let (base_export, size, base_origin) = match &base_kind {
            ChainBase::Image(path) => {
                let export = FileExport::open(path, true).map_err(|err| {
                    ChainError::io(format!("opening the base image {}", path.display()), err)
                })?;
                let size = export.size();
                if let Some(first) = layers.first() {
                    if first.header.volume_size != size {
                        return Err(ChainError::Chain(format!(
                            "{} holds {size} bytes but {} describes a volume of {} bytes",
                            path.display(),
                            first.path.display(),
                            first.header.volume_size
                        )));
                    }
                }
                (Some(export), size, Origin::Base)
            }
            ChainBase::Delta(_) => {
                let size = layers.first().map_or(0, |l| l.header.volume_size);
                (None, size, Origin::Zero)
            }
        };
        let indexes: Vec<&[IndexEntry]> = layers.iter().map(|l| l.entries.as_slice()).collect();
        let map = PointMap::new(size, &indexes, base_origin);
        let describe = std::iter::once(base)
            .chain(deltas.iter().map(PathBuf::as_path))
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" + ");
        Ok(ChainExport {
            describe,
            size,
            base: base_export,
            layers,
            map,
            cache: RecordCache::default(),
            overlay: None,
        })
    }

    /// The checkpoint the point ends at (the newest delta's), for an overlay to record.
    pub fn point(&self) -> PointId {
        self.layers.last().map(|l| {
            (
                l.header.volume_uuid,
                l.header.to.name.clone(),
                l.header.to.generation,
            )
        })
    }

    /// Make the export writable over `overlay` (see [`Overlay::open`]).
    pub fn with_overlay(mut self, overlay: Overlay) -> ChainExport {
        self.describe = format!("{} (overlay {})", self.describe, overlay.path().display());
        self.overlay = Some(overlay);
        self
    }

    /// Flush the overlay and mark its map cleanly closed; a no-op without one.
    pub fn close(&self) -> ExportResult<()> {
        match &self.overlay {
            Some(overlay) => overlay.close(),
            None => Ok(()),
        }
    }

    /// The bytes of the point itself (without the overlay) at `offset`.
    fn read_point(&self, offset: u64, buf: &mut [u8]) -> ExportResult<()> {
        let end = offset + buf.len() as u64;
        for (range, origin) in self.map.pieces(offset..end) {
            let lo = range.start;
            let dst = &mut buf[(lo - offset) as usize..(range.end - offset) as usize];
            match origin {
                Origin::Zero => dst.fill(0),
                Origin::Base => match &self.base {
                    Some(base) => base.read(lo, dst)?,
                    None => dst.fill(0),
                },
                Origin::Record { layer, entry } => {
                    let delta = &self.layers[layer];
                    let extent = &delta.entries[entry];
                    let slot = self.cache.get((layer, entry), || delta.decode(entry));
                    match slot.get() {
                        Some(Ok(data)) => {
                            let from = (lo - extent.offset) as usize;
                            let Some(src) = data.get(from..from + dst.len()) else {
                                return Err(ExportError::new(
                                    Errno::Io,
                                    format!(
                                        "{}: the record at volume offset {} decoded to {} bytes, not {}",
                                        delta.path.display(),
                                        extent.offset,
                                        data.len(),
                                        extent.length
                                    ),
                                ));
                            };
                            dst.copy_from_slice(src);
                        }
                        Some(Err(message)) => {
                            return Err(ExportError::new(Errno::Io, message.clone()));
                        }
                        None => {
                            return Err(ExportError::new(
                                Errno::Io,
                                format!("{}: record not decoded", delta.path.display()),
                            ))
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// `base:allocation` of the point itself from `offset`: at most [`EXTENTS_PER_CALL`]
    /// extents covering up to `len` bytes.
    fn allocation_of_point(&self, offset: u64, len: u64) -> ExportResult<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out = Vec::new();
        for (range, origin) in self.map.pieces(offset..end) {
            if out.len() >= EXTENTS_PER_CALL {
                break;
            }
            let (lo, hi) = (range.start, range.end);
            match (origin, &self.base) {
                (Origin::Base, Some(base)) => {
                    let mut at = lo;
                    while at < hi && out.len() < EXTENTS_PER_CALL {
                        let extents =
                            base.block_status(&MetaContext::BaseAllocation, at, hi - at)?;
                        if extents.is_empty() {
                            break;
                        }
                        for extent in extents {
                            let length = extent.length.min(hi - at);
                            if length == 0 {
                                break;
                            }
                            out.push(Extent {
                                length,
                                flags: extent.flags,
                            });
                            at += length;
                        }
                    }
                    if at < hi {
                        break;
                    }
                }
                (Origin::Record { .. }, _) => out.push(Extent {
                    length: hi - lo,
                    flags: 0,
                }),
                _ => out.push(Extent {
                    length: hi - lo,
                    flags: STATE_HOLE | STATE_ZERO,
                }),
            }
        }
        Ok(out)
    }
}

impl Export for ChainExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        let writable = self.overlay.is_some();
        Capabilities {
            read_only: !writable,
            flush: writable,
            trim: writable,
            write_zeroes: writable,
            fast_zero: false,
            cache: false,
            multi_conn: true,
            knows_holes: true,
        }
    }

    fn description(&self) -> String {
        self.describe.clone()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> ExportResult<()> {
        match &self.overlay {
            Some(overlay) => overlay.read(offset, buf, &|at, dst| self.read_point(at, dst)),
            None => self.read_point(offset, buf),
        }
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> ExportResult<()> {
        let overlay = self.writable()?;
        overlay.write(offset, data, &|at, dst| self.read_point(at, dst))?;
        if fua {
            overlay.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> ExportResult<()> {
        self.writable()?.flush()
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> ExportResult<()> {
        // A trimmed range reads as zeros: that frees the overlay's space and hides the
        // chain's bytes, both of which a discard allows.
        self.write_zeroes(
            offset,
            len,
            ZeroFlags {
                fua,
                ..ZeroFlags::default()
            },
        )
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> ExportResult<()> {
        let overlay = self.writable()?;
        if flags.fast {
            return Err(ExportError::new(
                Errno::NotSup,
                "zeroing the overlay is not guaranteed to be fast",
            ));
        }
        overlay.zero(offset, len, &|at, dst| self.read_point(at, dst))?;
        if flags.fua {
            overlay.flush()?;
        }
        Ok(())
    }

    fn block_status(
        &self,
        context: &MetaContext,
        offset: u64,
        len: u64,
    ) -> ExportResult<Vec<Extent>> {
        if *context != MetaContext::BaseAllocation {
            return Err(ExportError::new(
                Errno::Inval,
                format!("a restore point offers no context {}", context.wire_name()),
            ));
        }
        match &self.overlay {
            Some(overlay) => {
                overlay.allocation(offset, len, &|at, n| self.allocation_of_point(at, n))
            }
            None => self.allocation_of_point(offset, len),
        }
    }
}

impl ChainExport {
    fn writable(&self) -> ExportResult<&Overlay> {
        self.overlay.as_ref().ok_or_else(|| {
            ExportError::new(
                Errno::Perm,
                "the restore point is served read-only (serve it with --overlay FILE to write)",
            )
        })
    }
}

#[cfg(test)]
mod tests;
