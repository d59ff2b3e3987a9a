//! Delta jobs: create a delta file from a snapshot and its changed extents, restore an
//! image from a base and a chain of deltas, and read a chain as one virtual image (for
//! `verify`, through the chain's [`PointMap`]).
//!
//! A chain follows on when every delta is of the same volume (uuid and size) and starts
//! from the checkpoint the previous one ends at (name and generation). A chain that does
//! not is refused before anything is written, naming the two files at the break.
//!
//! Creation writes `FILE.partial`, fsyncs it and renames it to `FILE` only when every
//! extent was read: a delta with a hole in it never appears under its real name. The
//! partial file is created O_EXCL|O_NOFOLLOW, 0640 at most ([`super::target`]); one left
//! by an interrupted run is replaced, a symlink there or at `FILE` is refused.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use tidemark_formats::delta::{
    CheckpointRef, DeltaHeader, DeltaReader, DeltaWriter, ExtentKind, IndexEntry,
};
use tidemark_formats::FormatError;

use super::extents::{check_within, chunks, gaps, normalize, zero_runs};
use super::{target, CopyError, FailedExtent, ImageWriter, JobOptions, JobReport, Source};
use crate::io::{open_engine, Completion, Engine, FileId, IoBuf, Op, Request, ALIGN};
use crate::point_map::{Origin, PointMap};

impl From<FormatError> for CopyError {
    fn from(err: FormatError) -> CopyError {
        CopyError::Input(crate::error::chain(&err))
    }
}

/// An open delta file.
pub type DeltaFile = DeltaReader<BufReader<File>>;

/// Open and validate the delta at `path` (header, index and trailer).
pub fn open_delta(path: &Path) -> Result<DeltaFile, CopyError> {
    let file = File::open(path).map_err(|err| CopyError::file(path, "opening", err))?;
    Ok(DeltaReader::open(
        BufReader::with_capacity(1 << 20, file),
        path,
    )?)
}

/// Whether `path` starts with the delta magic.
pub fn is_delta(path: &Path) -> bool {
    let mut magic = [0u8; 8];
    File::open(path)
        .and_then(|mut f| io::Read::read_exact(&mut f, &mut magic))
        .is_ok_and(|()| magic == tidemark_formats::delta::MAGIC)
}

fn describe_checkpoint(checkpoint: Option<&CheckpointRef>) -> String {
    match checkpoint {
        Some(c) => format!("checkpoint {:?} (generation {})", c.name, c.generation),
        None => "nothing (a full backup)".into(),
    }
}

/// Check that `links` (path, header) follow on, in order. `base_is_image` says the first
/// link is applied on top of a plain image, whose checkpoint cannot be checked.
pub fn check_chain(links: &[(PathBuf, DeltaHeader)], base_is_image: bool) -> Result<(), CopyError> {
    let Some((first_path, first)) = links.first() else {
        return Ok(());
    };
    if !base_is_image && first.from.is_some() {
        return Err(CopyError::Input(format!(
            "{} is an incremental delta (from {}); a chain must start with a full backup \
             (a full delta or an image)",
            first_path.display(),
            describe_checkpoint(first.from.as_ref())
        )));
    }
    for pair in links.windows(2) {
        let ((prev_path, prev), (path, next)) = (&pair[0], &pair[1]);
        if next.volume_uuid != prev.volume_uuid {
            return Err(CopyError::Input(format!(
                "chain break: {} is of volume {} but {} is of volume {}",
                prev_path.display(),
                prev.volume_uuid,
                path.display(),
                next.volume_uuid
            )));
        }
        if next.volume_size != prev.volume_size {
            return Err(CopyError::Input(format!(
                "chain break: {} describes {} bytes but {} describes {}",
                prev_path.display(),
                prev.volume_size,
                path.display(),
                next.volume_size
            )));
        }
        if next.from.as_ref() != Some(&prev.to) {
            return Err(CopyError::Input(format!(
                "chain break: {} ends at {} but {} starts from {}; give the deltas in \
                 order, with none missing",
                prev_path.display(),
                describe_checkpoint(Some(&prev.to)),
                path.display(),
                describe_checkpoint(next.from.as_ref())
            )));
        }
    }
    Ok(())
}

/// Reads pieces of a source in order, many in flight through an engine when the source
/// is a file (sequentially through `read_at` otherwise).
struct OrderedReader {
    engine: Box<dyn Engine>,
    file: Option<(FileId, bool)>,
    pieces: Vec<Range<u64>>,
    next_submit: usize,
    next_yield: usize,
    ready: BTreeMap<usize, Completion>,
}

impl OrderedReader {
    fn new(
        source: &dyn Source,
        pieces: Vec<Range<u64>>,
        options: &JobOptions,
    ) -> Result<OrderedReader, CopyError> {
        let mut config = options.engine.clone();
        config.buf_count = config.queue_depth.max(1) + 2;
        // Created and used inside one delta job call, on one thread.
        config.single_thread = true;
        let mut engine = open_engine(&config)?;
        let file = source
            .engine_file()
            .map(|(file, direct)| (engine.add_file(file), direct));
        Ok(OrderedReader {
            engine,
            file,
            pieces,
            next_submit: 0,
            next_yield: 0,
            ready: BTreeMap::new(),
        })
    }

    /// The next piece in order with its bytes, or the error reading it.
    #[allow(clippy::type_complexity)]
    fn next(
        &mut self,
        source: &mut dyn Source,
    ) -> Result<Option<(Range<u64>, Result<IoBuf, io::Error>)>, CopyError> {
        let Some(piece) = self.pieces.get(self.next_yield).cloned() else {
            return Ok(None);
        };
        let len = (piece.end - piece.start) as usize;
        let Some((id, direct)) = self.file else {
            let mut buf = self
                .engine
                .pool()
                .take()
                .ok_or_else(|| CopyError::Internal("delta reader out of buffers".into()))?;
            buf.set_len(len);
            self.next_yield += 1;
            return Ok(Some((
                piece.clone(),
                source
                    .read_at(piece.start, buf.as_mut_slice())
                    .map(|()| buf),
            )));
        };
        while self.next_submit < self.pieces.len()
            && self.engine.in_flight() < self.engine.queue_depth()
        {
            let Some(mut buf) = self.engine.pool().take() else {
                break;
            };
            let at = &self.pieces[self.next_submit];
            let want = (at.end - at.start) as usize;
            buf.set_len(if direct {
                want.next_multiple_of(ALIGN)
            } else {
                want
            });
            let request = Request {
                op: Op::Read,
                file: id,
                offset: at.start,
                buf,
                user_data: self.next_submit as u64,
            };
            self.engine.submit(request)?;
            self.next_submit += 1;
        }
        let completion = loop {
            if let Some(done) = self.ready.remove(&self.next_yield) {
                break done;
            }
            let mut done = Vec::new();
            self.engine.reap(1, &mut done)?;
            for completion in done {
                self.ready.insert(completion.user_data as usize, completion);
            }
        };
        self.next_yield += 1;
        let mut buf = completion.buf;
        let result = match completion.result {
            Ok(n) if n >= len => {
                buf.set_len(len);
                Ok(buf)
            }
            Ok(n) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("short read: {n} of {len} bytes"),
            )),
            Err(err) => Err(err),
        };
        Ok(Some((piece, result)))
    }
}

impl Drop for OrderedReader {
    fn drop(&mut self) {
        let mut done = Vec::new();
        while self.engine.in_flight() > 0 && self.engine.reap(1, &mut done).is_ok() {
            done.clear();
        }
    }
}

/// What `create_delta` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeltaReport {
    pub source: String,
    pub delta: String,
    pub volume_uuid: String,
    pub from: Option<String>,
    pub to: String,
    pub size: u64,
    /// Extents written to the delta, data and zero.
    pub extents: usize,
    /// Volume bytes stored as data (before compression).
    pub bytes_data: u64,
    /// Volume bytes stored as zero extents (holes and all-zero blocks).
    pub bytes_zero: u64,
    /// Volume bytes outside the changed extents.
    pub bytes_unchanged: u64,
    /// Size of the delta file.
    pub file_bytes: u64,
    pub seconds: f64,
    pub mb_per_sec: f64,
    pub failed_extents: Vec<FailedExtent>,
}

/// Write a delta of `source` to `out`: the `changed` extents (widened to 4 KiB), or the
/// whole volume when `None` (a full backup; `header.from` should then be `None`).
/// Holes and all-zero blocks become zero extents.
pub fn create_delta(
    source: &mut dyn Source,
    changed: Option<Vec<Range<u64>>>,
    header: &DeltaHeader,
    out: &Path,
    zstd_level: i32,
    options: &JobOptions,
) -> Result<DeltaReport, CopyError> {
    let started = Instant::now();
    let size = source.size();
    if header.volume_size != size {
        return Err(CopyError::Input(format!(
            "the delta header says the volume holds {} bytes but {} holds {size}",
            header.volume_size,
            source.describe()
        )));
    }
    if let Some(changed) = &changed {
        check_within(changed, size, &source.describe())?;
    }
    let extents = normalize(
        changed.unwrap_or_else(|| std::iter::once(0..size).collect()),
        size,
    );
    let changed_bytes: u64 = extents.iter().map(|r| r.end - r.start).sum();
    // Every piece in volume order, data or hole, each at most one buffer long.
    let buf_size = options.engine.buf_size.next_multiple_of(ALIGN) as u64;
    let mut holes = Vec::new();
    let mut data = Vec::new();
    for extent in &extents {
        let in_extent = normalize(source.data_extents(extent.clone())?, size);
        holes.extend(gaps(extent.clone(), &in_extent));
        data.extend(in_extent.into_iter().flat_map(|r| chunks(r, buf_size)));
    }
    let partial = partial_path(out);
    let file = create_partial(&partial, out)?;
    let mut writer = DeltaWriter::new(BufWriter::with_capacity(1 << 20, file), header, zstd_level)
        .map_err(|err| CopyError::Input(format!("{}: {err}", partial.display())))?;
    let write_err = |err| CopyError::Input(format!("writing {}: {err}", partial.display()));
    let mut report = DeltaReport {
        source: source.describe(),
        delta: out.display().to_string(),
        volume_uuid: header.volume_uuid.to_string(),
        from: header.from.as_ref().map(|c| c.name.clone()),
        to: header.to.name.clone(),
        size,
        extents: 0,
        bytes_data: 0,
        bytes_zero: 0,
        bytes_unchanged: size - changed_bytes,
        file_bytes: 0,
        seconds: 0.0,
        mb_per_sec: 0.0,
        failed_extents: Vec::new(),
    };
    let mut reader = OrderedReader::new(source, data, options)?;
    let mut holes = holes.into_iter().peekable();
    let mut pending_zero: Option<Range<u64>> = None;
    // Zero ranges are merged until the next data record so the delta stays compact.
    let flush_zero =
        |writer: &mut DeltaWriter<_>, zero: &mut Option<Range<u64>>, report: &mut DeltaReport| {
            if let Some(range) = zero.take() {
                writer
                    .write_zero(range.start, range.end - range.start)
                    .map_err(write_err)?;
                report.bytes_zero += range.end - range.start;
            }
            Ok::<(), CopyError>(())
        };
    let add_zero = |zero: &mut Option<Range<u64>>, range: Range<u64>| match zero {
        Some(open) if open.end == range.start => open.end = range.end,
        _ => *zero = Some(range),
    };
    loop {
        let next = reader.next(source)?;
        // Holes that come before the next data piece (or all that remain at the end).
        let limit = next.as_ref().map_or(u64::MAX, |(piece, _)| piece.start);
        while let Some(hole) = holes.next_if(|h| h.start < limit) {
            if pending_zero.as_ref().is_some_and(|z| z.end != hole.start) {
                flush_zero(&mut writer, &mut pending_zero, &mut report)?;
            }
            add_zero(&mut pending_zero, hole.clone());
            options.progress(hole.end - hole.start);
        }
        let Some((piece, result)) = next else { break };
        let len = piece.end - piece.start;
        match result {
            Ok(buf) => {
                for (range, zero) in zero_runs(buf.as_slice()) {
                    let at = piece.start + range.start as u64;
                    if zero {
                        if pending_zero.as_ref().is_some_and(|z| z.end != at) {
                            flush_zero(&mut writer, &mut pending_zero, &mut report)?;
                        }
                        add_zero(&mut pending_zero, at..at + range.len() as u64);
                    } else {
                        flush_zero(&mut writer, &mut pending_zero, &mut report)?;
                        writer
                            .write_data(at, &buf.as_slice()[range.clone()])
                            .map_err(write_err)?;
                        report.bytes_data += range.len() as u64;
                    }
                }
            }
            Err(err) => {
                flush_zero(&mut writer, &mut pending_zero, &mut report)?;
                report
                    .failed_extents
                    .push(FailedExtent::new(piece.start, len, "reading", &err));
            }
        }
        options.progress(len);
    }
    flush_zero(&mut writer, &mut pending_zero, &mut report)?;
    drop(reader);
    report.extents = writer.extents().len();
    let file = writer
        .finish()
        .map_err(write_err)?
        .into_inner()
        .map_err(|err| CopyError::file(&partial, "writing", err.into_error()))?;
    file.sync_all()
        .map_err(|err| CopyError::file(&partial, "syncing", err))?;
    report.file_bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
    if report.failed_extents.is_empty() {
        std::fs::rename(&partial, out)
            .map_err(|err| CopyError::file(out, "renaming the finished delta to", err))?;
        sync_parent(out)?;
    } else {
        report.delta = partial.display().to_string();
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.mb_per_sec = if report.seconds > 0.0 {
        changed_bytes as f64 / report.seconds / 1e6
    } else {
        0.0
    };
    Ok(report)
}

/// Create `partial` for the delta `out` with [`target::create_new`]. A regular file there
/// is what an interrupted run left: it is replaced. Anything else there, or a symlink at
/// `out` (the rename would replace the link, not write where it points), is refused.
fn create_partial(partial: &Path, out: &Path) -> Result<File, CopyError> {
    if std::fs::symlink_metadata(out).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(CopyError::Input(format!(
            "{} is a symlink: a delta is written under its own name and renamed into place, \
             which would replace the link; name the file itself",
            out.display()
        )));
    }
    match target::create_new(partial) {
        Err(target::TargetError::Exists { .. }) => {
            let meta = std::fs::symlink_metadata(partial)
                .map_err(|err| CopyError::file(partial, "reading metadata of", err))?;
            if !meta.file_type().is_file() {
                return Err(CopyError::Input(format!(
                    "{} {}: the delta is staged there before it is renamed to {}; remove it",
                    partial.display(),
                    if meta.file_type().is_symlink() {
                        "is a symlink"
                    } else {
                        "exists and is not a regular file"
                    },
                    out.display()
                )));
            }
            std::fs::remove_file(partial)
                .map_err(|err| CopyError::file(partial, "removing the leftover", err))?;
            Ok(target::create_new(partial)?)
        }
        other => Ok(other?),
    }
}

fn partial_path(out: &Path) -> PathBuf {
    let mut name = out
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".partial");
    out.with_file_name(name)
}

fn sync_parent(path: &Path) -> Result<(), CopyError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|dir| dir.sync_all())
        .map_err(|err| CopyError::file(parent, "syncing directory", err))
}

/// The first link of a restore or verify chain.
#[derive(Debug, Clone)]
pub enum ChainBase {
    /// A plain image file or device.
    Image(PathBuf),
    /// A full-backup delta.
    Delta(PathBuf),
}

impl ChainBase {
    /// A delta file when `path` starts with the delta magic, an image otherwise.
    pub fn detect(path: &Path) -> ChainBase {
        if is_delta(path) {
            ChainBase::Delta(path.to_path_buf())
        } else {
            ChainBase::Image(path.to_path_buf())
        }
    }
}

/// Open every delta of a chain and check that it follows on.
fn open_chain(
    base: &ChainBase,
    deltas: &[PathBuf],
) -> Result<Vec<(PathBuf, DeltaFile)>, CopyError> {
    let mut paths = Vec::new();
    if let ChainBase::Delta(path) = base {
        paths.push(path.clone());
    }
    paths.extend(deltas.iter().cloned());
    let mut opened = Vec::new();
    for path in paths {
        let reader = open_delta(&path)?;
        opened.push((path, reader));
    }
    let headers: Vec<(PathBuf, DeltaHeader)> = opened
        .iter()
        .map(|(p, r)| (p.clone(), r.header().clone()))
        .collect();
    check_chain(&headers, matches!(base, ChainBase::Image(_)))?;
    Ok(opened)
}

/// Restore `dest` from `base` and `deltas` applied in order. An image base is copied
/// first (as `copy_image`); a full-delta base creates `dest` from nothing. The chain is
/// checked before anything is written.
pub fn restore_chain(
    base: &ChainBase,
    deltas: &[PathBuf],
    dest: &Path,
    options: &JobOptions,
) -> Result<JobReport, CopyError> {
    let started = Instant::now();
    let mut chain = open_chain(base, deltas)?;
    let (mut writer, mut report) = match base {
        ChainBase::Image(image) => {
            let mut source = super::FileSource::open(image, options.direct)?;
            if let Some((path, first)) = chain.first() {
                if first.header().volume_size != source.size() {
                    return Err(CopyError::Input(format!(
                        "{} holds {} bytes but {} describes a volume of {} bytes",
                        image.display(),
                        source.size(),
                        path.display(),
                        first.header().volume_size
                    )));
                }
            }
            let base_report = super::copy_image(&mut source, dest, options)?;
            let writer = ImageWriter::open(dest, source.size(), &options.writer_options())?;
            (writer, base_report)
        }
        ChainBase::Delta(path) => {
            let size = chain
                .first()
                .map(|(_, r)| r.header().volume_size)
                .unwrap_or(0);
            let writer = ImageWriter::create(dest, size, &options.writer_options())?;
            let mut report =
                JobReport::new_for("restore", path.display().to_string(), dest, &writer, size);
            report.bytes_skipped_holes = 0;
            (writer, report)
        }
    };
    report.job = "restore";
    let copied_by_base = report.bytes_copied;
    let mut data = Vec::new();
    for (path, reader) in &mut chain {
        let entries = reader.extents().to_vec();
        for entry in entries {
            match entry.kind {
                ExtentKind::Zero => writer.zero(entry.offset, entry.length)?,
                ExtentKind::Data => {
                    if let Err(err) = reader.read_extent(&entry, &mut data) {
                        let err = io::Error::other(format!("{}: {err}", path.display()));
                        report.failed_extents.push(FailedExtent::new(
                            entry.offset,
                            entry.length,
                            "reading",
                            &err,
                        ));
                        continue;
                    }
                    report.bytes_read += entry.length;
                    let mut at = 0;
                    while at < data.len() {
                        let mut buf = writer.buffer()?;
                        let piece = (data.len() - at).min(buf.capacity());
                        buf.set_len(piece);
                        buf.as_mut_slice().copy_from_slice(&data[at..at + piece]);
                        writer.write(entry.offset + at as u64, buf)?;
                        at += piece;
                    }
                }
            }
            options.progress(entry.length);
        }
        // The next delta may rewrite these ranges: let this one land first.
        writer.drain()?;
        writer.no_longer_fresh();
    }
    let base_failed = std::mem::take(&mut report.failed_extents);
    let (stats, failed) = writer.finish()?;
    report.bytes_copied = copied_by_base + stats.bytes_written;
    report.bytes_skipped_zero += stats.bytes_skipped_zero;
    report.bytes_zeroed += stats.bytes_zeroed;
    report.failed_extents = base_failed;
    report.failed_extents.extend(failed);
    report.failed_extents.sort_by_key(|f| f.offset);
    report.seconds = started.elapsed().as_secs_f64();
    report.mb_per_sec = if report.seconds > 0.0 {
        report.size as f64 / report.seconds / 1e6
    } else {
        0.0
    };
    Ok(report)
}

/// A base and a chain of deltas read as the one image a restore would produce.
pub struct ChainSource {
    describe: String,
    base: Option<File>,
    deltas: Vec<DeltaFile>,
    map: PointMap,
    size: u64,
}

impl std::fmt::Debug for ChainSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainSource")
            .field("describe", &self.describe)
            .field("size", &self.size)
            .finish()
    }
}

impl ChainSource {
    /// Open and check the chain.
    pub fn open(base: &ChainBase, deltas: &[PathBuf]) -> Result<ChainSource, CopyError> {
        let chain = open_chain(base, deltas)?;
        let mut describe = String::new();
        let (base_file, size) = match base {
            ChainBase::Image(path) => {
                describe.push_str(&path.display().to_string());
                let source = super::FileSource::open(path, false)?;
                let size = source.size();
                (
                    Some(File::open(path).map_err(|err| CopyError::file(path, "opening", err))?),
                    size,
                )
            }
            ChainBase::Delta(_) => (
                None,
                chain
                    .first()
                    .map(|(_, r)| r.header().volume_size)
                    .unwrap_or(0),
            ),
        };
        for (path, reader) in &chain {
            if reader.header().volume_size != size {
                return Err(CopyError::Input(format!(
                    "the chain's base holds {size} bytes but {} describes {} bytes",
                    path.display(),
                    reader.header().volume_size
                )));
            }
            if !describe.is_empty() {
                describe.push_str(" + ");
            }
            describe.push_str(&path.display().to_string());
        }
        let base_origin = if base_file.is_some() {
            Origin::Base
        } else {
            Origin::Zero
        };
        let layers: Vec<&[IndexEntry]> = chain.iter().map(|(_, r)| r.extents()).collect();
        let map = PointMap::new(size, &layers, base_origin);
        Ok(ChainSource {
            describe,
            base: base_file,
            deltas: chain.into_iter().map(|(_, r)| r).collect(),
            map,
            size,
        })
    }
}

impl Source for ChainSource {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn data_extents(&mut self, range: Range<u64>) -> Result<Vec<Range<u64>>, CopyError> {
        Ok(std::iter::once(range.start.min(self.size)..range.end.min(self.size)).collect())
    }

    fn engine_file(&self) -> Option<(std::sync::Arc<File>, bool)> {
        None
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset.saturating_add(buf.len() as u64);
        if end > self.size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{}: reading {offset}..{end} past the point's {} bytes",
                    self.describe, self.size
                ),
            ));
        }
        let ChainSource {
            base, deltas, map, ..
        } = self;
        for (range, origin) in map.pieces(offset..end) {
            let dst = &mut buf[(range.start - offset) as usize..(range.end - offset) as usize];
            match (origin, &*base) {
                (Origin::Base, Some(file)) => {
                    std::os::unix::fs::FileExt::read_exact_at(file, dst, range.start)?
                }
                (Origin::Base, None) | (Origin::Zero, _) => dst.fill(0),
                (Origin::Record { layer, .. }, _) => {
                    deltas[layer]
                        .read_at(range.start, dst)
                        .map_err(io::Error::other)?;
                }
            }
        }
        Ok(())
    }
}
