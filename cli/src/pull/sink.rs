//! Where pulled bytes go: an image (through the copy engine) and/or a delta file.
//!
//! The transfer calls a sink from one thread, in ascending offset order, with ranges that
//! never overlap. [`Sink::finish`] makes everything durable; a sink dropped without it may
//! have written any prefix.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use tidemark_engine::copy::{ImageWriter, WriterOptions};
use tidemark_formats::delta::{DeltaHeader, DeltaWriter};

use super::{Mode, Targets};

/// zstd level of delta records: level 1 keeps up with the network on two cores.
const DELTA_ZSTD_LEVEL: i32 = 1;

/// A target of a pull.
pub trait Sink {
    /// Store `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]) -> anyhow::Result<()>;

    /// Make `length` bytes at `offset` read as zero (a hole where the target can hold one).
    fn zero(&mut self, offset: u64, length: u64) -> anyhow::Result<()>;

    /// Flush and sync everything written.
    fn finish(&mut self) -> anyhow::Result<()>;
}

/// Several sinks fed the same ranges (`--into IMAGE --delta FILE`).
pub struct Tee(pub Vec<Box<dyn Sink + Send>>);

impl std::fmt::Debug for Tee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tee({} sinks)", self.0.len())
    }
}

impl Sink for Tee {
    fn write(&mut self, offset: u64, data: &[u8]) -> anyhow::Result<()> {
        self.0
            .iter_mut()
            .try_for_each(|sink| sink.write(offset, data))
    }

    fn zero(&mut self, offset: u64, length: u64) -> anyhow::Result<()> {
        self.0
            .iter_mut()
            .try_for_each(|sink| sink.zero(offset, length))
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        self.0.iter_mut().try_for_each(|sink| sink.finish())
    }
}

/// The sinks `targets` ask for, ready for an export of `size` bytes.
pub fn open(
    targets: &Targets,
    mode: &Mode,
    size: u64,
    request_size: u64,
) -> anyhow::Result<Box<dyn Sink + Send>> {
    let mut sinks: Vec<Box<dyn Sink + Send>> = Vec::new();
    if let Some(image) = &targets.image {
        sinks.push(Box::new(ImageSink::open(image, mode, size, request_size)?));
    }
    if let Some(delta) = &targets.delta {
        sinks.push(Box::new(DeltaSink::create(
            delta,
            &targets.delta_header(mode, size),
        )?));
    }
    Ok(match sinks.len() {
        1 => sinks.remove(0),
        _ => Box::new(Tee(sinks)),
    })
}

/// An image written through the copy engine's [`ImageWriter`]: created sparse for a full
/// pull, updated in place for an incremental one (zero ranges punched).
pub struct ImageSink {
    path: PathBuf,
    writer: Option<ImageWriter>,
}

impl std::fmt::Debug for ImageSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ImageSink({})", self.path.display())
    }
}

impl ImageSink {
    /// Open `path` for a pull of `mode` from an export of `size` bytes; `request_size` is
    /// the largest write the sink will be given.
    pub fn open(
        path: &Path,
        mode: &Mode,
        size: u64,
        request_size: u64,
    ) -> anyhow::Result<ImageSink> {
        let mut options = WriterOptions::default();
        options.engine.buf_size = request_size.max(options.engine.buf_size as u64) as usize;
        options.engine.queue_depth = 16;
        let writer = match mode {
            Mode::Full => ImageWriter::create(path, size, &options)
                .with_context(|| format!("creating the image {}", path.display()))?,
            Mode::Incremental { .. } => {
                let len = std::fs::metadata(path)
                    .with_context(|| {
                        format!(
                            "opening the image {} to update it: an incremental pull writes into \
                             the previous backup's image; pull it with --full first",
                            path.display()
                        )
                    })?
                    .len();
                if len != size {
                    bail!(
                        "the image {} is {len} bytes but the export is {size} bytes: it is not \
                         a backup of this export",
                        path.display()
                    );
                }
                ImageWriter::open(path, size, &options)
                    .with_context(|| format!("opening the image {}", path.display()))?
            }
        };
        Ok(ImageSink {
            path: path.to_path_buf(),
            writer: Some(writer),
        })
    }

    fn writer(&mut self) -> anyhow::Result<&mut ImageWriter> {
        self.writer
            .as_mut()
            .with_context(|| format!("the image {} is already finished", self.path.display()))
    }
}

impl Sink for ImageSink {
    fn write(&mut self, offset: u64, data: &[u8]) -> anyhow::Result<()> {
        let writer = self.writer()?;
        let mut done = 0;
        while done < data.len() {
            let mut buf = writer.buffer()?;
            let piece = (data.len() - done).min(buf.capacity());
            buf.set_len(piece);
            buf.as_mut_slice()
                .copy_from_slice(&data[done..done + piece]);
            writer.write(offset + done as u64, buf)?;
            done += piece;
        }
        Ok(())
    }

    fn zero(&mut self, offset: u64, length: u64) -> anyhow::Result<()> {
        Ok(self.writer()?.zero(offset, length)?)
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        let writer = self
            .writer
            .take()
            .with_context(|| format!("the image {} is already finished", self.path.display()))?;
        let (_, failed) = writer.finish()?;
        if let Some(first) = failed.first() {
            bail!(
                "{} ranges of the image {} could not be written, the first: {first}",
                failed.len(),
                self.path.display()
            );
        }
        Ok(())
    }
}

/// A delta file written through `tidemark_formats::delta::DeltaWriter`, under a temporary
/// name renamed into place once complete and synced, so the name only ever shows a whole
/// delta. Neighbouring zero ranges are merged into one record.
pub struct DeltaSink {
    path: PathBuf,
    partial: PathBuf,
    writer: Option<DeltaWriter<BufWriter<File>>>,
    pending_zero: Option<(u64, u64)>,
}

impl DeltaSink {
    pub fn create(path: &Path, header: &DeltaHeader) -> anyhow::Result<DeltaSink> {
        let mut name = path
            .file_name()
            .with_context(|| format!("{} is not a file name", path.display()))?
            .to_os_string();
        name.push(".partial");
        let partial = path.with_file_name(name);
        let file = File::create(&partial)
            .with_context(|| format!("creating the delta file {}", partial.display()))?;
        let writer = DeltaWriter::new(
            BufWriter::with_capacity(1 << 20, file),
            header,
            DELTA_ZSTD_LEVEL,
        )
        .with_context(|| format!("starting the delta file {}", path.display()))?;
        Ok(DeltaSink {
            path: path.to_path_buf(),
            partial,
            writer: Some(writer),
            pending_zero: None,
        })
    }

    fn writer(&mut self) -> anyhow::Result<&mut DeltaWriter<BufWriter<File>>> {
        self.writer
            .as_mut()
            .with_context(|| format!("the delta {} is already finished", self.path.display()))
    }

    fn flush_zero(&mut self) -> anyhow::Result<()> {
        if let Some((offset, length)) = self.pending_zero.take() {
            let path = self.path.clone();
            self.writer()?
                .write_zero(offset, length)
                .with_context(|| format!("writing the delta {}", path.display()))?;
        }
        Ok(())
    }
}

impl Sink for DeltaSink {
    fn write(&mut self, offset: u64, data: &[u8]) -> anyhow::Result<()> {
        self.flush_zero()?;
        let path = self.path.clone();
        self.writer()?
            .write_data(offset, data)
            .with_context(|| format!("writing the delta {}", path.display()))
    }

    fn zero(&mut self, offset: u64, length: u64) -> anyhow::Result<()> {
        match &mut self.pending_zero {
            Some((start, len)) if *start + *len == offset => *len += length,
            _ => {
                self.flush_zero()?;
                self.pending_zero = Some((offset, length));
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        self.flush_zero()?;
        let writer = self
            .writer
            .take()
            .with_context(|| format!("the delta {} is already finished", self.path.display()))?;
        let out = writer
            .finish()
            .with_context(|| format!("finishing the delta {}", self.path.display()))?;
        let file = out
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("flushing {}", self.partial.display()))?;
        file.sync_all()
            .with_context(|| format!("syncing {}", self.partial.display()))?;
        std::fs::rename(&self.partial, &self.path).with_context(|| {
            format!(
                "renaming {} to {}",
                self.partial.display(),
                self.path.display()
            )
        })?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .with_context(|| format!("syncing the directory {}", dir.display()))?;
        }
        Ok(())
    }
}

impl Drop for DeltaSink {
    fn drop(&mut self) {
        // An unfinished delta is useless: leave no partial file behind.
        if self.writer.is_some() {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

/// A sink over a plain `Vec<u8>`, the model the transfer is tested against.
#[cfg(test)]
#[derive(Debug)]
pub struct MemorySink {
    pub data: Vec<u8>,
    /// Written ranges, in order.
    pub writes: Vec<(u64, u64)>,
    /// Zeroed ranges, in order.
    pub zeroed: Vec<(u64, u64)>,
    /// Whether every call started at or after the end of the previous one.
    pub in_order: bool,
    end: u64,
}

#[cfg(test)]
impl MemorySink {
    pub fn new(data: Vec<u8>) -> Self {
        MemorySink {
            data,
            writes: Vec::new(),
            zeroed: Vec::new(),
            in_order: true,
            end: 0,
        }
    }

    fn track(&mut self, offset: u64, length: u64) {
        self.in_order &= offset >= self.end;
        self.end = offset + length;
    }
}

#[cfg(test)]
impl Sink for MemorySink {
    fn write(&mut self, offset: u64, data: &[u8]) -> anyhow::Result<()> {
        self.track(offset, data.len() as u64);
        self.writes.push((offset, data.len() as u64));
        self.data[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn zero(&mut self, offset: u64, length: u64) -> anyhow::Result<()> {
        self.track(offset, length);
        self.zeroed.push((offset, length));
        self.data[offset as usize..(offset + length) as usize].fill(0);
        Ok(())
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_formats::delta::{DeltaReader, ExtentKind};

    fn header(size: u64) -> DeltaHeader {
        let targets = Targets {
            checkpoint: Some("tue".into()),
            ..Targets::default()
        };
        targets.delta_header(
            &Mode::Incremental {
                bitmap: "mon".into(),
            },
            size,
        )
    }

    #[test]
    fn delta_sink_writes_a_readable_delta_and_merges_neighbouring_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.delta");
        let mut sink = DeltaSink::create(&path, &header(1 << 20)).unwrap();
        sink.write(0, &[7; 4096]).unwrap();
        sink.zero(4096, 4096).unwrap();
        sink.zero(8192, 4096).unwrap();
        sink.write(65536, &[9; 100]).unwrap();
        sink.finish().unwrap();
        assert!(!dir.path().join("d.delta.partial").exists());

        let mut reader = DeltaReader::open(File::open(&path).unwrap(), &path).unwrap();
        let kinds: Vec<(u64, u64, ExtentKind)> = reader
            .extents()
            .iter()
            .map(|e| (e.offset, e.length, e.kind))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (0, 4096, ExtentKind::Data),
                (4096, 8192, ExtentKind::Zero),
                (65536, 100, ExtentKind::Data)
            ]
        );
        assert_eq!(
            reader.header().from.as_ref().map(|f| f.name.as_str()),
            Some("mon")
        );
        assert_eq!(reader.header().to.name, "tue");
        let mut buf = vec![0u8; 100];
        reader.read_at(65536, &mut buf).unwrap();
        assert_eq!(buf, vec![9; 100]);
    }

    #[test]
    fn an_unfinished_delta_leaves_no_file_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.delta");
        let mut sink = DeltaSink::create(&path, &header(1 << 20)).unwrap();
        sink.write(0, &[1; 512]).unwrap();
        drop(sink);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn image_sink_fills_a_fresh_image_sparsely() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let mut sink = ImageSink::open(&path, &Mode::Full, 8 << 20, 1 << 20).unwrap();
        sink.zero(0, 4 << 20).unwrap();
        sink.write(4 << 20, &[5; 8192]).unwrap();
        sink.zero((4 << 20) + 8192, (4 << 20) - 8192).unwrap();
        sink.finish().unwrap();
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len(), 8 << 20);
        assert!(data[..4 << 20].iter().all(|&b| b == 0));
        assert!(data[4 << 20..(4 << 20) + 8192].iter().all(|&b| b == 5));
        assert!(data[(4 << 20) + 8192..].iter().all(|&b| b == 0));
        let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(allocated <= 64 << 10, "{allocated} bytes allocated");
    }

    #[test]
    fn image_sink_updates_in_place_and_punches_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![0xffu8; 1 << 20]).unwrap();
        let mode = Mode::Incremental { bitmap: "b".into() };
        let mut sink = ImageSink::open(&path, &mode, 1 << 20, 1 << 20).unwrap();
        sink.zero(0, 65536).unwrap();
        sink.write(131072, &[3; 4096]).unwrap();
        sink.finish().unwrap();
        let data = std::fs::read(&path).unwrap();
        assert!(data[..65536].iter().all(|&b| b == 0));
        assert!(data[65536..131072].iter().all(|&b| b == 0xff));
        assert!(data[131072..135168].iter().all(|&b| b == 3));
        assert!(data[135168..].iter().all(|&b| b == 0xff));
    }

    #[test]
    fn incremental_image_must_exist_with_the_export_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let mode = Mode::Incremental { bitmap: "b".into() };
        let err = ImageSink::open(&path, &mode, 4096, 1 << 20).unwrap_err();
        assert!(format!("{err:#}").contains("--full first"), "{err:#}");
        std::fs::write(&path, [0u8; 100]).unwrap();
        let err = ImageSink::open(&path, &mode, 4096, 1 << 20).unwrap_err();
        assert!(
            format!("{err:#}").contains("is 100 bytes but the export is 4096"),
            "{err:#}"
        );
    }
}
