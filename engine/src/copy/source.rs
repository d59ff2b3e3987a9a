//! Where a copy job reads from. A file or block device is read through the I/O engine
//! directly (many requests in flight, O_DIRECT when allowed); any other source (an NBD
//! export, a test double) implements [`Source::read_at`] and is read synchronously.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::CopyError;
use crate::io::{open_file, OpenOptions};
use crate::sys;

/// Something a copy job can read a volume image from.
pub trait Source: Send {
    /// A name for messages ("disk.img", "nbd://host/export").
    fn describe(&self) -> String;
    /// Size of the image in bytes.
    fn size(&self) -> u64;
    /// The parts of `range` that may hold data, sorted and disjoint; everything else
    /// reads as zeros. A source that cannot tell returns the whole range.
    fn data_extents(&mut self, range: Range<u64>) -> Result<Vec<Range<u64>>, CopyError>;
    /// The open file behind this source, for the engine's fast path, and whether it is
    /// open with O_DIRECT. `None` makes jobs call [`Source::read_at`].
    fn engine_file(&self) -> Option<(Arc<File>, bool)>;
    /// Fill `buf` from `offset` (used when `engine_file` is `None`). Reading past the end
    /// of the image is an error.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// A regular file or a block device.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    file: Arc<File>,
    direct: bool,
    size: u64,
    seekable_holes: bool,
    /// The last SEEK_DATA/SEEK_HOLE answer: from `.0` on, the first data is at `.1` and
    /// the hole after it at `.2`. update-img asks about many small extents in order, and
    /// most fall into a run already found, which then costs no system call.
    last_seek: Option<(u64, u64, u64)>,
}

impl FileSource {
    /// Open `path` read-only, with O_DIRECT when `direct` and the file system allow it.
    ///
    /// A regular file whose data is already in the page cache is read through the cache
    /// even when `direct` is asked for: copying from memory beats reading the disk again.
    pub fn open(path: &Path, direct: bool) -> Result<FileSource, CopyError> {
        let direct = direct && !mostly_cached(path);
        let (file, direct) = open_file(path, &OpenOptions::read_only().direct(direct))?;
        let meta = file
            .metadata()
            .map_err(|err| CopyError::file(path, "reading metadata of", err))?;
        let kind = meta.file_type();
        let size = if kind.is_block_device() {
            use std::io::Seek;
            (&file)
                .seek(io::SeekFrom::End(0))
                .map_err(|err| CopyError::file(path, "sizing", err))?
        } else if kind.is_file() {
            meta.len()
        } else {
            return Err(CopyError::Input(format!(
                "{} is neither a regular file nor a block device",
                path.display()
            )));
        };
        Ok(FileSource {
            path: path.to_path_buf(),
            file: Arc::new(file),
            direct,
            size,
            seekable_holes: kind.is_file(),
            last_seek: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &Arc<File> {
        &self.file
    }
}

/// Whether 16 probes spread over the data of the regular file at `path` all find their
/// block in the page cache.
fn mostly_cached(path: &Path) -> bool {
    const PROBES: u64 = 16;
    let Ok(file) = File::open(path) else {
        return false;
    };
    let Ok(meta) = file.metadata() else {
        return false;
    };
    if !meta.file_type().is_file() || meta.len() == 0 {
        return false;
    }
    let size = meta.len();
    let stride = size.div_ceil(PROBES).max(4096);
    let mut probed = 0;
    let mut at = 0;
    while at < size {
        // Probe data, not holes: a hole is never "cached" and costs nothing to read.
        let Ok(Some(data)) = sys::seek_data(&file, at) else {
            break;
        };
        if data >= at + stride {
            at = data / stride * stride;
            continue;
        }
        if !sys::is_cached(&file, data / 4096 * 4096, 4096) {
            return false;
        }
        probed += 1;
        at += stride;
    }
    let cached = probed > 0;
    if cached {
        tracing::info!(
            "{} is in the page cache; reading it through the cache",
            path.display()
        );
    }
    cached
}

impl Source for FileSource {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn data_extents(&mut self, range: Range<u64>) -> Result<Vec<Range<u64>>, CopyError> {
        let range = range.start.min(self.size)..range.end.min(self.size);
        if !self.seekable_holes || range.is_empty() {
            return Ok(vec![range].into_iter().filter(|r| !r.is_empty()).collect());
        }
        let mut extents = Vec::new();
        let mut at = range.start;
        while at < range.end {
            let (data, hole) = match self.last_seek {
                Some((from, data, hole)) if from <= at && at < hole => (data.max(at), hole),
                _ => {
                    let data = match sys::seek_data(&self.file, at) {
                        Ok(Some(data)) => data,
                        Ok(None) => break,
                        // A file system without SEEK_DATA: everything is data.
                        Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
                            extents.push(at..range.end);
                            break;
                        }
                        Err(err) => {
                            return Err(CopyError::file(&self.path, "finding data in", err))
                        }
                    };
                    // No hole after data found a moment ago: a racing truncate; the
                    // rest of the range reads as data (zeros past the new end).
                    let hole = sys::seek_hole(&self.file, data)
                        .map_err(|err| CopyError::file(&self.path, "finding holes in", err))?
                        .unwrap_or(range.end);
                    self.last_seek = Some((at, data, hole));
                    (data, hole)
                }
            };
            if data >= range.end {
                break;
            }
            extents.push(data..hole.min(range.end));
            at = hole;
        }
        Ok(extents)
    }

    fn engine_file(&self) -> Option<(Arc<File>, bool)> {
        Some((Arc::clone(&self.file), self.direct))
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_extents_follow_the_allocation() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("thin");
        let file = File::create(&path).unwrap();
        file.set_len(16 << 20).unwrap();
        file.write_all_at(&[1u8; 65536], 4 << 20).unwrap();
        file.write_all_at(&[2u8; 4096], 10 << 20).unwrap();
        drop(file);
        let mut source = FileSource::open(&path, true).unwrap();
        let extents = source.data_extents(0..16 << 20).unwrap();
        let total: u64 = extents.iter().map(|r| r.end - r.start).sum();
        assert!(total < 1 << 20, "{extents:?}");
        assert!(extents.iter().any(|r| r.contains(&(4 << 20))));
        assert!(extents.iter().any(|r| r.contains(&(10 << 20))));
        assert_eq!(source.data_extents(11 << 20..16 << 20).unwrap(), vec![]);
    }

    #[test]
    fn remembered_seeks_answer_like_fresh_ones() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("thin");
        let file = File::create(&path).unwrap();
        file.set_len(32 << 20).unwrap();
        for at in [1u64 << 20, 3 << 20, (3 << 20) + 65536, 9 << 20, 30 << 20] {
            file.write_all_at(&[3u8; 65536], at).unwrap();
        }
        drop(file);
        let mut reused = FileSource::open(&path, false).unwrap();
        let step = 192 << 10;
        let ranges: Vec<Range<u64>> = (0..(32u64 << 20) / step)
            .map(|i| i * step..i * step + 100_000)
            .chain([
                5 << 20..31 << 20,
                0..1 << 20,
                (1 << 20) + 4096..(3 << 20) + 8192,
            ])
            .collect();
        for range in ranges {
            let fresh = FileSource::open(&path, false)
                .unwrap()
                .data_extents(range.clone())
                .unwrap();
            assert_eq!(
                reused.data_extents(range.clone()).unwrap(),
                fresh,
                "{range:?}"
            );
        }
    }
}
