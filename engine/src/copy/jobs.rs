//! Full copy, update-img and verify.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::time::Instant;

use super::extents::{check_within, chunks, gaps, normalize};
use super::{CopyError, FailedExtent, ImageWriter, Progress, Source, WriterOptions};
use crate::io::{open_engine, Completion, EngineConfig, EngineKind, IoBuf, Op, Request, ALIGN};

/// How to run a job.
#[derive(Clone, Default)]
pub struct JobOptions {
    /// Ask for O_DIRECT on source and destination (each falls back to buffered I/O when
    /// its file system refuses).
    pub direct: bool,
    pub engine: EngineConfig,
    pub progress: Option<Progress>,
}

impl std::fmt::Debug for JobOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobOptions")
            .field("direct", &self.direct)
            .field("engine", &self.engine)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

impl JobOptions {
    pub(crate) fn progress(&self, bytes: u64) {
        if let Some(progress) = &self.progress {
            progress(bytes);
        }
    }

    /// The engine settings jobs use: twice as many buffers as queue slots, so reads can
    /// be refilled while writes drain; single-thread, as a job creates, uses and drops
    /// its writer inside one call.
    pub(crate) fn writer_options(&self) -> WriterOptions {
        let mut engine = self.engine.clone();
        if engine.buf_count == 0 {
            engine.buf_count = engine.queue_depth.max(1) * 2;
        }
        engine.single_thread = true;
        WriterOptions {
            direct: self.direct,
            engine,
        }
    }
}

/// What a copy job did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobReport {
    pub job: &'static str,
    pub source: String,
    pub destination: String,
    pub engine: EngineKind,
    /// Whether the destination was written with O_DIRECT.
    pub direct: bool,
    /// Size of the image.
    pub size: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes written with data.
    pub bytes_copied: u64,
    /// Bytes the source reports as holes, never read.
    pub bytes_skipped_holes: u64,
    /// All-zero bytes read but not written (the destination already reads zero there).
    pub bytes_skipped_zero: u64,
    /// Bytes made to read as zero in the destination by punching holes.
    pub bytes_zeroed: u64,
    /// Bytes outside the changed extents, left alone (update-img).
    pub bytes_unchanged: u64,
    pub seconds: f64,
    /// Image bytes dealt with (copied, skipped or zeroed) per second, in MB/s (10^6).
    pub mb_per_sec: f64,
    pub failed_extents: Vec<FailedExtent>,
}

impl JobReport {
    fn new(
        job: &'static str,
        source: &dyn Source,
        destination: &Path,
        writer: &ImageWriter,
    ) -> JobReport {
        JobReport::new_for(job, source.describe(), destination, writer, source.size())
    }

    pub(crate) fn new_for(
        job: &'static str,
        source: String,
        destination: &Path,
        writer: &ImageWriter,
        size: u64,
    ) -> JobReport {
        JobReport {
            job,
            source,
            destination: destination.display().to_string(),
            engine: writer.engine_kind(),
            direct: writer.direct(),
            size,
            bytes_read: 0,
            bytes_copied: 0,
            bytes_skipped_holes: 0,
            bytes_skipped_zero: 0,
            bytes_zeroed: 0,
            bytes_unchanged: 0,
            seconds: 0.0,
            mb_per_sec: 0.0,
            failed_extents: Vec::new(),
        }
    }

    fn finish(&mut self, writer: ImageWriter, started: Instant) -> Result<(), CopyError> {
        let (stats, failed) = writer.finish()?;
        self.bytes_copied = stats.bytes_written;
        self.bytes_skipped_zero = stats.bytes_skipped_zero;
        self.bytes_zeroed = stats.bytes_zeroed;
        self.failed_extents.extend(failed);
        self.failed_extents.sort_by_key(|f| f.offset);
        self.seconds = started.elapsed().as_secs_f64();
        let handled = self.size - self.bytes_unchanged;
        self.mb_per_sec = if self.seconds > 0.0 {
            handled as f64 / self.seconds / 1e6
        } else {
            0.0
        };
        Ok(())
    }
}

/// Copy the whole of `source` into `destination` (created or truncated; a block device
/// is overwritten). Holes in the source stay holes; all-zero blocks become holes.
pub fn copy_image(
    source: &mut dyn Source,
    destination: &Path,
    options: &JobOptions,
) -> Result<JobReport, CopyError> {
    let started = Instant::now();
    let size = source.size();
    let mut writer = ImageWriter::create(destination, size, &options.writer_options())?;
    let mut report = JobReport::new("copy", source, destination, &writer);
    let data = normalize(source.data_extents(0..size)?, size);
    for hole in gaps(0..size, &data) {
        let len = hole.end - hole.start;
        writer.zero_hole(hole.start, len)?;
        report.bytes_skipped_holes += len;
        options.progress(len);
    }
    pump(source, &mut writer, &data, options, &mut report)?;
    report.finish(writer, started)?;
    Ok(report)
}

/// Copy only `changed` extents of `source` (a snapshot) into the existing `image`.
/// Extents are widened to 4 KiB boundaries; an extent past the end of the source is refused
/// before anything is written (see [`check_within`]). The image is
/// resized to the source size when it is a regular file.
pub fn update_image(
    source: &mut dyn Source,
    changed: Vec<Range<u64>>,
    image: &Path,
    options: &JobOptions,
) -> Result<JobReport, CopyError> {
    let started = Instant::now();
    let size = source.size();
    check_within(&changed, size, &source.describe())?;
    let changed = normalize(changed, size);
    let mut writer_options = options.writer_options();
    // Small scattered extents need small buffers: a pool of 1 MiB buffers for 64 KiB
    // extents would map, pin (register) and unmap 16 times the memory the job uses.
    let largest = changed.iter().map(|r| r.end - r.start).max().unwrap_or(0);
    let configured = writer_options.engine.buf_size;
    writer_options.engine.buf_size = usize::try_from(largest)
        .map_or(configured, |largest| largest.min(configured))
        .next_multiple_of(ALIGN)
        .max(ALIGN);
    let mut writer = ImageWriter::open(image, size, &writer_options)?;
    let mut report = JobReport::new("update-img", source, image, &writer);
    let changed_bytes: u64 = changed.iter().map(|r| r.end - r.start).sum();
    report.bytes_unchanged = size - changed_bytes;
    let mut data = Vec::new();
    for extent in &changed {
        let in_extent = normalize(source.data_extents(extent.clone())?, size);
        for hole in gaps(extent.clone(), &in_extent) {
            let len = hole.end - hole.start;
            writer.zero_hole(hole.start, len)?;
            report.bytes_skipped_holes += len;
            options.progress(len);
        }
        data.extend(in_extent);
    }
    pump(source, &mut writer, &data, options, &mut report)?;
    report.finish(writer, started)?;
    Ok(report)
}

/// Read `extents` of `source` and write them through `writer`, with many requests in
/// flight when the source is a file the engine can read.
fn pump(
    source: &mut dyn Source,
    writer: &mut ImageWriter,
    extents: &[Range<u64>],
    options: &JobOptions,
    report: &mut JobReport,
) -> Result<(), CopyError> {
    let chunk = writer.buf_size() as u64;
    let mut pieces = extents
        .iter()
        .flat_map(|e| chunks(e.clone(), chunk))
        .peekable();
    let Some((file, direct)) = source.engine_file() else {
        for piece in pieces {
            let len = piece.end - piece.start;
            let mut buf = writer.buffer()?;
            buf.set_len(len as usize);
            match source.read_at(piece.start, buf.as_mut_slice()) {
                Ok(()) => {
                    report.bytes_read += len;
                    writer.write(piece.start, buf)?;
                }
                Err(err) => salvage(source, writer, piece.start, buf, &err, report)?,
            }
            options.progress(len);
        }
        return Ok(());
    };
    let id = writer.add_source(file);
    // Keep half the queue for writes so reads never starve them.
    let read_limit = (writer.queue_depth() / 2).max(1);
    loop {
        while writer.reads_in_flight() < read_limit
            && writer.buffers_available() > 1
            && writer.has_slot()
        {
            let Some(piece) = pieces.next() else { break };
            let len = piece.end - piece.start;
            let mut buf = writer.buffer()?;
            // O_DIRECT reads whole blocks; at the end of the file the read comes back short.
            let want = if direct {
                (len as usize).next_multiple_of(ALIGN)
            } else {
                len as usize
            };
            buf.set_len(want);
            writer.submit_read(id, piece.start, buf, len)?;
        }
        if writer.reads_in_flight() == 0 && pieces.peek().is_none() {
            return Ok(());
        }
        for completion in writer.poll(true)? {
            let Completion {
                offset,
                mut buf,
                result,
                user_data: len,
                ..
            } = completion;
            match result {
                Ok(n) if n as u64 >= len => {
                    buf.set_len(len as usize);
                    report.bytes_read += len;
                    writer.write(offset, buf)?;
                }
                Ok(n) => {
                    let err = std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("short read: {n} of {len} bytes (did the source shrink?)"),
                    );
                    report
                        .failed_extents
                        .push(FailedExtent::new(offset, len, "reading", &err));
                }
                Err(err) => {
                    buf.set_len(len as usize);
                    salvage(source, writer, offset, buf, &err, report)?;
                }
            }
            options.progress(len);
        }
    }
}

/// A chunk failed to read as a whole: read it again one [`ALIGN`] block at a time, write
/// the blocks that read, and record the ones that do not (coalesced), so one bad sector
/// costs 4 KiB of the copy rather than a whole chunk. Unreadable blocks are left as they
/// are in the destination.
fn salvage(
    source: &mut dyn Source,
    writer: &mut ImageWriter,
    offset: u64,
    mut buf: IoBuf,
    first_error: &std::io::Error,
    report: &mut JobReport,
) -> Result<(), CopyError> {
    tracing::warn!(
        offset,
        len = buf.len(),
        "read failed ({first_error}); retrying block by block"
    );
    let len = buf.len();
    let mut good: Vec<Range<usize>> = Vec::new();
    let mut at = 0;
    while at < len {
        let end = (at + ALIGN).min(len);
        match source.read_at(offset + at as u64, &mut buf.as_mut_slice()[at..end]) {
            Ok(()) => match good.last_mut() {
                Some(run) if run.end == at => run.end = end,
                _ => good.push(at..end),
            },
            Err(err) => {
                let block = offset + at as u64;
                match report.failed_extents.last_mut() {
                    Some(last)
                        if last.offset + last.length == block && last.error == err.to_string() =>
                    {
                        last.length += (end - at) as u64;
                    }
                    _ => report.failed_extents.push(FailedExtent::new(
                        block,
                        (end - at) as u64,
                        "reading",
                        &err,
                    )),
                }
            }
        }
        at = end;
    }
    report.bytes_read += good.iter().map(|r| r.len() as u64).sum::<u64>();
    let Some((first, rest)) = good.split_first() else {
        return Ok(());
    };
    for run in rest {
        let mut extra = writer.buffer()?;
        extra.set_len(run.len());
        extra
            .as_mut_slice()
            .copy_from_slice(&buf.as_slice()[run.clone()]);
        writer.write(offset + run.start as u64, extra)?;
    }
    let base = buf.range().start;
    buf.set_range(base + first.start..base + first.end);
    writer.write(offset + first.start as u64, buf)
}

/// The answer of `verify`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub a: String,
    pub b: String,
    pub size_a: u64,
    pub size_b: u64,
    pub equal: bool,
    /// The lowest offset at which the contents differ (or the end of the shorter one
    /// when only the sizes differ).
    pub first_difference: Option<u64>,
    /// Bytes compared (both sides holes counts as compared).
    pub bytes_compared: u64,
    pub seconds: f64,
    pub mb_per_sec: f64,
}

/// Compare two images byte for byte. Ranges that are holes on both sides are equal
/// without reading. Stops at the first difference.
pub fn verify_images(
    a: &mut dyn Source,
    b: &mut dyn Source,
    options: &JobOptions,
) -> Result<VerifyReport, CopyError> {
    let started = Instant::now();
    let size = a.size().min(b.size());
    let data_a = normalize(a.data_extents(0..size)?, size);
    let data_b = normalize(b.data_extents(0..size)?, size);
    let mut report = VerifyReport {
        a: a.describe(),
        b: b.describe(),
        size_a: a.size(),
        size_b: b.size(),
        equal: true,
        first_difference: None,
        bytes_compared: 0,
        seconds: 0.0,
        mb_per_sec: 0.0,
    };
    let mut config = options.engine.clone();
    config.buf_count = config.queue_depth.max(2) * 2;
    config.single_thread = true;
    let mut engine = open_engine(&config)?;
    let chunk = engine.pool().buf_size() as u64;
    let overlaps = |data: &[Range<u64>], piece: &Range<u64>| {
        let index = data.partition_point(|r| r.end <= piece.start);
        data.get(index).is_some_and(|r| r.start < piece.end)
    };
    let pieces: Vec<Range<u64>> = chunks(0..size, chunk).collect();
    let files = [a.engine_file(), b.engine_file()];
    let ids: Vec<_> = match files {
        [Some((fa, _)), Some((fb, _))] => vec![engine.add_file(fa), engine.add_file(fb)],
        _ => Vec::new(),
    };
    let sources: [&mut dyn Source; 2] = [a, b];
    let mut pending: BTreeMap<usize, [Option<IoBuf>; 2]> = BTreeMap::new();
    let (mut next_submit, mut next_check) = (0usize, 0usize);
    let mut done = Vec::new();
    while next_check < pieces.len() {
        // Submit pairs of reads ahead of the comparison point.
        while next_submit < pieces.len()
            && engine.pool().available() >= 2
            && engine.in_flight() + 2 <= engine.queue_depth()
        {
            let piece = pieces[next_submit].clone();
            if !overlaps(&data_a, &piece) && !overlaps(&data_b, &piece) {
                pending.insert(next_submit, [None, None]);
                next_submit += 1;
                continue;
            }
            let len = (piece.end - piece.start) as usize;
            for side in 0..2 {
                let mut buf = engine
                    .pool()
                    .take()
                    .ok_or_else(|| CopyError::Internal("verify ran out of buffers".into()))?;
                buf.set_len(len.next_multiple_of(ALIGN));
                if ids.is_empty() {
                    buf.set_len(len);
                    sources[side]
                        .read_at(piece.start, buf.as_mut_slice())
                        .map_err(|err| {
                            CopyError::Input(format!(
                                "reading {} at offset {}: {err}",
                                sources[side].describe(),
                                piece.start
                            ))
                        })?;
                    pending.entry(next_submit).or_insert([None, None])[side] = Some(buf);
                } else {
                    let user_data = (next_submit as u64) << 1 | side as u64;
                    engine.submit(Request {
                        op: Op::Read,
                        file: ids[side],
                        offset: piece.start,
                        buf,
                        user_data,
                    })?;
                }
            }
            if ids.is_empty() {
                next_submit += 1;
                break;
            }
            pending.entry(next_submit).or_insert([None, None]);
            next_submit += 1;
        }
        if engine.in_flight() > 0 {
            engine.reap(1, &mut done)?;
        }
        for completion in done.drain(..) {
            let index = (completion.user_data >> 1) as usize;
            let side = (completion.user_data & 1) as usize;
            let piece = &pieces[index];
            let len = (piece.end - piece.start) as usize;
            let mut buf = completion.buf;
            match completion.result {
                Ok(n) if n >= len => buf.set_len(len),
                Ok(n) => {
                    return Err(CopyError::Input(format!(
                        "reading {} at offset {}: got {n} of {len} bytes (did it shrink?)",
                        sources[side].describe(),
                        piece.start
                    )))
                }
                Err(err) => {
                    return Err(CopyError::Input(format!(
                        "reading {} at offset {}: {err}",
                        sources[side].describe(),
                        piece.start
                    )))
                }
            }
            pending.entry(index).or_insert([None, None])[side] = Some(buf);
        }
        // Compare in offset order so the first difference reported is the lowest.
        while let Some(entry) = pending.first_entry() {
            if *entry.key() != next_check {
                break;
            }
            let piece = pieces[next_check].clone();
            let both_holes = !overlaps(&data_a, &piece) && !overlaps(&data_b, &piece);
            if !both_holes {
                let [Some(left), Some(right)] = entry.get() else {
                    break;
                };
                if let Some(at) = left
                    .as_slice()
                    .iter()
                    .zip(right.as_slice())
                    .position(|(x, y)| x != y)
                {
                    report.equal = false;
                    report.first_difference = Some(piece.start + at as u64);
                    break;
                }
            }
            entry.remove();
            report.bytes_compared += piece.end - piece.start;
            options.progress(piece.end - piece.start);
            next_check += 1;
        }
        if !report.equal {
            break;
        }
    }
    // Let in-flight reads finish before their buffers' engine goes away.
    while engine.in_flight() > 0 {
        engine.reap(1, &mut done)?;
        done.clear();
    }
    if report.equal && report.size_a != report.size_b {
        report.equal = false;
        report.first_difference = Some(size);
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.mb_per_sec = if report.seconds > 0.0 {
        report.bytes_compared as f64 / report.seconds / 1e6
    } else {
        0.0
    };
    Ok(report)
}
