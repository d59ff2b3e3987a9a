//! [`ImageWriter`]: the sink every copy job writes through. It accepts `(offset, buffer)`
//! writes with many in flight, turns all-zero blocks into holes (skipped on a fresh
//! destination, punched on an existing one), records failed extents instead of stopping,
//! and fsyncs at the end.
//!
//! Write order: data writes and hole punches for disjoint ranges go out in any order; the
//! caller calls [`ImageWriter::drain`] before touching a range again (restore does so
//! between deltas). [`ImageWriter::finish`] reaps everything, then `fsync`s: the image is
//! durable when it returns `Ok`.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::extents::zero_runs;
use super::{CopyError, FailedExtent};
use crate::io::{
    open_engine, open_file, Completion, Engine, EngineConfig, EngineKind, FileId, IoBuf, Op,
    OpenOptions, Request, ALIGN,
};
use crate::sys;

/// `user_data` bit that marks the writer's own requests; readers sharing the engine use
/// values below it.
pub const WRITE_TAG: u64 = 1 << 63;

/// How to open the destination.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Use O_DIRECT when the destination allows it.
    pub direct: bool,
    /// The engine to write with (its pool also serves readers sharing it).
    pub engine: EngineConfig,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            direct: true,
            engine: EngineConfig::default(),
        }
    }
}

/// Byte counts of what a writer did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct WriteStats {
    /// Bytes written with data.
    pub bytes_written: u64,
    /// All-zero bytes not written because the destination already reads as zero there.
    pub bytes_skipped_zero: u64,
    /// Bytes made to read as zero by punching a hole (or zeroing a device range).
    pub bytes_zeroed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ZeroMode {
    Punch,
    ZeroRange,
    WriteZeros,
}

/// The destination image of a copy job; see the module docs.
#[derive(Debug)]
pub struct ImageWriter {
    engine: Box<dyn Engine>,
    path: PathBuf,
    file: Arc<File>,
    direct_id: Option<FileId>,
    buffered_id: FileId,
    fresh: bool,
    zero_mode: ZeroMode,
    stats: WriteStats,
    failed: Vec<FailedExtent>,
    reads_done: Vec<Completion>,
    reads_in_flight: usize,
    /// Scratch list `reap` fills, kept so reaping does not allocate.
    completions: Vec<Completion>,
}

impl ImageWriter {
    /// Create (or truncate) a regular file of `size` bytes, or open a block device of at
    /// least `size` bytes, to be filled from scratch.
    pub fn create(
        path: &Path,
        size: u64,
        options: &WriterOptions,
    ) -> Result<ImageWriter, CopyError> {
        if is_block_device(path) {
            return ImageWriter::open_with(path, size, options, false, false);
        }
        ImageWriter::open_with(path, size, options, true, true)
    }

    /// Open an existing image (file or device) to update in place. A regular file is set
    /// to `size` bytes; a device must hold at least `size` bytes.
    pub fn open(path: &Path, size: u64, options: &WriterOptions) -> Result<ImageWriter, CopyError> {
        if !path.exists() {
            return Err(CopyError::Input(format!(
                "{} does not exist; update-img and restore write into an existing image \
                 (create it with `tidemark copy` first)",
                path.display()
            )));
        }
        ImageWriter::open_with(path, size, options, false, false)
    }

    fn open_with(
        path: &Path,
        size: u64,
        options: &WriterOptions,
        create: bool,
        fresh: bool,
    ) -> Result<ImageWriter, CopyError> {
        let open = |direct| OpenOptions {
            write: true,
            create,
            truncate: create,
            direct,
        };
        let (buffered, _) = open_file(path, &open(false))?;
        let buffered = Arc::new(buffered);
        let meta = buffered
            .metadata()
            .map_err(|err| CopyError::file(path, "reading metadata of", err))?;
        if meta.file_type().is_block_device() {
            use std::io::Seek;
            let device_size = (&*buffered)
                .seek(io::SeekFrom::End(0))
                .map_err(|err| CopyError::file(path, "sizing", err))?;
            if device_size < size {
                return Err(CopyError::Input(format!(
                    "{} holds {device_size} bytes but the image needs {size}",
                    path.display()
                )));
            }
        } else if meta.len() != size {
            buffered
                .set_len(size)
                .map_err(|err| CopyError::file(path, "resizing", err))?;
        }
        let mut engine = open_engine(&options.engine)?;
        let direct_id = if options.direct {
            let (file, direct) = open_file(
                path,
                &OpenOptions {
                    create: false,
                    truncate: false,
                    ..open(true)
                },
            )?;
            direct.then(|| engine.add_file(Arc::new(file)))
        } else {
            None
        };
        let buffered_id = engine.add_file(Arc::clone(&buffered));
        Ok(ImageWriter {
            engine,
            path: path.to_path_buf(),
            file: buffered,
            direct_id,
            buffered_id,
            fresh,
            zero_mode: ZeroMode::Punch,
            stats: WriteStats::default(),
            failed: Vec::new(),
            reads_done: Vec::new(),
            reads_in_flight: 0,
            completions: Vec::new(),
        })
    }

    /// The engine in use.
    pub fn engine_kind(&self) -> EngineKind {
        self.engine.kind()
    }

    /// Whether the destination is written with O_DIRECT.
    pub fn direct(&self) -> bool {
        self.direct_id.is_some()
    }

    /// The destination path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the buffers [`ImageWriter::buffer`] returns.
    pub fn buf_size(&self) -> usize {
        self.engine.pool().buf_size()
    }

    /// Free buffers right now.
    pub fn buffers_available(&self) -> usize {
        self.engine.pool().available()
    }

    /// Requests in flight (reads and writes).
    pub fn in_flight(&self) -> usize {
        self.engine.in_flight()
    }

    /// Requests the engine can hold in flight.
    pub fn queue_depth(&self) -> usize {
        self.engine.queue_depth()
    }

    /// Whether another request can be submitted without waiting.
    pub fn has_slot(&self) -> bool {
        self.engine.in_flight() < self.engine.queue_depth()
    }

    /// A buffer from the engine's pool, waiting for writes to finish when all are busy.
    pub fn buffer(&mut self) -> Result<IoBuf, CopyError> {
        loop {
            if let Some(buf) = self.engine.pool().take() {
                return Ok(buf);
            }
            if self.engine.in_flight() == 0 {
                return Err(CopyError::Internal(
                    "every I/O buffer is held outside the writer; return buffers before asking for more".into(),
                ));
            }
            self.reap(1)?;
        }
    }

    /// Write `buf`'s range at `offset`. All-zero blocks in it become holes; the rest is
    /// written asynchronously. Failures are recorded, reported by `finish`.
    pub fn write(&mut self, offset: u64, mut buf: IoBuf) -> Result<(), CopyError> {
        let runs = zero_runs(buf.as_slice());
        if let [(_, false)] = runs.as_slice() {
            return self.submit_write(offset, buf);
        }
        let base = buf.range().start;
        let mut first_data: Option<Range<usize>> = None;
        for (range, zero) in runs {
            let at = offset + range.start as u64;
            if zero {
                self.zero(at, range.len() as u64)?;
            } else if first_data.is_none() {
                first_data = Some(range);
            } else {
                let mut extra = self.buffer()?;
                extra.set_len(range.len());
                extra.as_mut_slice().copy_from_slice(&buf.as_slice()[range]);
                self.submit_write(at, extra)?;
            }
        }
        if let Some(range) = first_data {
            let at = offset + range.start as u64;
            buf.set_range(base + range.start..base + range.end);
            self.submit_write(at, buf)?;
        }
        Ok(())
    }

    /// Make `len` bytes at `offset` read as zeros: skipped on a fresh destination,
    /// punched (or zeroed, or written with zeros) on an existing one.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<(), CopyError> {
        if self.fresh {
            self.stats.bytes_skipped_zero += len;
        }
        self.zero_range(offset, len)
    }

    /// Like [`ImageWriter::zero`] for a range the source reported as a hole: the caller
    /// counts it, so a fresh destination's skip is not counted as skipped zeros.
    pub fn zero_hole(&mut self, offset: u64, len: u64) -> Result<(), CopyError> {
        self.zero_range(offset, len)
    }

    fn zero_range(&mut self, offset: u64, len: u64) -> Result<(), CopyError> {
        if len == 0 || self.fresh {
            return Ok(());
        }
        loop {
            let result = match self.zero_mode {
                ZeroMode::Punch => sys::punch_hole(&self.file, offset, len),
                ZeroMode::ZeroRange => sys::zero_range(&self.file, offset, len),
                ZeroMode::WriteZeros => return self.write_zeros(offset, len),
            };
            match result {
                Ok(()) => {
                    self.stats.bytes_zeroed += len;
                    return Ok(());
                }
                Err(err)
                    if matches!(
                        err.raw_os_error(),
                        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
                    ) =>
                {
                    self.zero_mode = match self.zero_mode {
                        ZeroMode::Punch => ZeroMode::ZeroRange,
                        _ => ZeroMode::WriteZeros,
                    };
                }
                Err(err) => {
                    self.failed
                        .push(FailedExtent::new(offset, len, "zeroing", &err));
                    return Ok(());
                }
            }
        }
    }

    fn write_zeros(&mut self, offset: u64, len: u64) -> Result<(), CopyError> {
        let mut at = offset;
        while at < offset + len {
            let mut buf = self.buffer()?;
            let piece = (offset + len - at).min(buf.capacity() as u64) as usize;
            buf.set_len(piece);
            buf.as_mut_slice().fill(0);
            self.submit_write(at, buf)?;
            at += piece as u64;
        }
        Ok(())
    }

    fn submit_write(&mut self, offset: u64, buf: IoBuf) -> Result<(), CopyError> {
        let aligned = offset % ALIGN as u64 == 0 && buf.len() % ALIGN == 0;
        let file = match self.direct_id {
            Some(direct) if aligned => direct,
            _ => self.buffered_id,
        };
        self.submit(Request {
            op: Op::Write,
            file,
            offset,
            buf,
            user_data: WRITE_TAG,
        })
    }

    fn submit(&mut self, request: Request) -> Result<(), CopyError> {
        while !self.has_slot() {
            self.reap(1)?;
        }
        self.engine.submit(request)?;
        Ok(())
    }

    /// Add a file to read from through the writer's engine (same ring, same buffers).
    pub fn add_source(&mut self, file: Arc<File>) -> FileId {
        self.engine.add_file(file)
    }

    /// Read into `buf`'s range from a source added with [`ImageWriter::add_source`];
    /// `user_data` must be below [`WRITE_TAG`]. The completion comes back from `poll`.
    pub fn submit_read(
        &mut self,
        file: FileId,
        offset: u64,
        buf: IoBuf,
        user_data: u64,
    ) -> Result<(), CopyError> {
        if user_data & WRITE_TAG != 0 {
            return Err(CopyError::Internal(
                "read user_data collides with the writer's tag".into(),
            ));
        }
        self.submit(Request {
            op: Op::Read,
            file,
            offset,
            buf,
            user_data,
        })?;
        self.reads_in_flight += 1;
        Ok(())
    }

    /// Reads submitted and not yet returned by `poll`.
    pub fn reads_in_flight(&self) -> usize {
        self.reads_in_flight
    }

    /// Finished reads (in any order), after handling finished writes. With `wait`, blocks
    /// until something completes when anything is in flight.
    pub fn poll(&mut self, wait: bool) -> Result<Vec<Completion>, CopyError> {
        if self.reads_done.is_empty() {
            self.reap(usize::from(wait))?;
        }
        self.reads_in_flight -= self.reads_done.len();
        Ok(std::mem::take(&mut self.reads_done))
    }

    fn reap(&mut self, min: usize) -> Result<(), CopyError> {
        let mut done = std::mem::take(&mut self.completions);
        let reaped = self.engine.reap(min, &mut done);
        let mut result = reaped.map(|_| ()).map_err(CopyError::from);
        for completion in done.drain(..) {
            if completion.user_data & WRITE_TAG == 0 {
                self.reads_done.push(completion);
            } else if result.is_ok() {
                result = self.finished_write(completion);
            }
        }
        self.completions = done;
        result
    }

    fn finished_write(&mut self, completion: Completion) -> Result<(), CopyError> {
        let Completion {
            offset,
            mut buf,
            result,
            ..
        } = completion;
        let len = buf.len();
        match result {
            Ok(n) if n == len => self.stats.bytes_written += n as u64,
            Ok(n) if n > 0 && n < len => {
                // A short write (rare: a signal, a nearly full disk): send the rest again.
                self.stats.bytes_written += n as u64;
                let range = buf.range();
                buf.set_range(range.start + n..range.end);
                let request = Request {
                    op: Op::Write,
                    file: self.buffered_id,
                    offset: offset + n as u64,
                    buf,
                    user_data: WRITE_TAG,
                };
                self.submit(request)?;
            }
            Ok(_) => {
                let err = io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the destination accepted no bytes",
                );
                self.failed
                    .push(FailedExtent::new(offset, len as u64, "writing", &err));
            }
            Err(err) => self
                .failed
                .push(FailedExtent::new(offset, len as u64, "writing", &err)),
        }
        Ok(())
    }

    /// From now on, treat the destination as holding data everywhere: zeros are punched,
    /// not skipped. Call it (after [`ImageWriter::drain`]) before writing a range again,
    /// as restore does before each delta after the first.
    pub fn no_longer_fresh(&mut self) {
        self.fresh = false;
    }

    /// Wait until every write submitted so far has finished.
    pub fn drain(&mut self) -> Result<(), CopyError> {
        loop {
            let reads_in_engine = self.reads_in_flight - self.reads_done.len();
            if self.engine.in_flight() <= reads_in_engine {
                return Ok(());
            }
            self.reap(1)?;
        }
    }

    /// What has been done so far.
    pub fn stats(&self) -> &WriteStats {
        &self.stats
    }

    /// Wait for everything in flight, fsync the destination and report. Reads still in
    /// flight are waited for and dropped.
    pub fn finish(mut self) -> Result<(WriteStats, Vec<FailedExtent>), CopyError> {
        while self.engine.in_flight() > 0 {
            self.reap(1)?;
        }
        self.reads_done.clear();
        self.file
            .sync_all()
            .map_err(|err| CopyError::file(&self.path, "syncing", err))?;
        Ok((self.stats, self.failed))
    }
}

fn is_block_device(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
}
