//! The overlay of a writable restore point: `FILE`, a sparse file as large as the point
//! holding the blocks written since, and `FILE.map`, a tidemark bitmap file (the format of
//! checkpoint bitmaps, `formats::bitmap`) with one bit per 4 KiB block: set when the
//! overlay holds that block.
//!
//! Why our own overlay rather than a tidemark volume over it: a volume's backing is one
//! file or device holding every byte, while here unwritten blocks must keep reading from
//! the chain; the bitmap format already gives the map a checked header, the point's
//! identity (volume uuid, checkpoint, generation) and a clean/in-use state.
//!
//! Write order (crash consistency): a write goes to `FILE` and sets its bits in memory;
//! a FLUSH (or FUA) first syncs `FILE`, then writes the words whose bits were set before
//! that sync into `FILE.map` in place and syncs it. So a bit on disk always covers data on
//! disk: after a crash, a block reads its last flushed overlay data or, if its bit did not
//! reach the disk, the chain's bytes (its content before the unflushed write), never zeros
//! nobody wrote. Bits only ever go from 0 to 1, so a torn map write loses only bits of
//! unflushed writes. While open the map's header says `InUse` (its payload crc is stale);
//! a clean close syncs everything and writes a `Clean` header with the payload crc.
//!
//! A write that covers only part of a block not yet in the overlay reads the rest of the
//! block from the chain first (under an exclusive lock, so two partial writes to one block
//! cannot lose each other's bytes); whole-block writes run concurrently.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use rustix::fs::FallocateFlags;
use tidemark_formats::bitmap::{
    is_dirty, read_bitmap_file, set_dirty, words_crc, write_bitmap_file, BitmapHeader, BitmapState,
    HEADER_LEN,
};
use tidemark_nbd::export::{ExportError, ExportResult, Extent};

use super::{ChainError, PointId};

/// Bytes per overlay block (the bitmap format's smallest granularity).
pub const BLOCK: u64 = 4096;
/// Most bytes one `allocation` call describes.
const ALLOCATION_SPAN: u64 = 256 << 20;
/// The checkpoint name an overlay over a plain image (no deltas) records.
const IMAGE_POINT: &str = "image";

/// Reads the point's own bytes: `(offset, buffer)`.
pub type PointRead<'a> = &'a dyn Fn(u64, &mut [u8]) -> ExportResult<()>;
/// The point's own `base:allocation`: `(offset, length)`.
pub type PointAllocation<'a> = &'a dyn Fn(u64, u64) -> ExportResult<Vec<Extent>>;

struct Bits {
    words: Vec<u64>,
    /// Words with bits set since the last flush wrote them.
    pending: BTreeSet<usize>,
}

/// The writable layer over a restore point; see the module doc.
pub struct Overlay {
    path: PathBuf,
    map_path: PathBuf,
    data: File,
    map: File,
    header: BitmapHeader,
    size: u64,
    bits: Mutex<Bits>,
    /// Shared by whole-block writes, exclusive for read-modify-write of partial blocks.
    rmw: RwLock<()>,
    /// One flush at a time, so map words reach the disk in order.
    flushing: Mutex<()>,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("path", &self.path)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// `FILE.map` beside `FILE`.
pub fn map_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".map");
    PathBuf::from(name)
}

fn io_error(what: String) -> impl FnOnce(io::Error) -> ChainError {
    move |source| ChainError::Io { what, source }
}

impl Overlay {
    /// Open the overlay `path` of a `size`-byte point ending at `point`, creating `path`
    /// and `path.map` when neither exists. An overlay made for another point (or size) is
    /// refused, as is a file that is not an overlay.
    pub fn open(path: &Path, size: u64, point: &PointId) -> Result<Overlay, ChainError> {
        let map_path = map_path(path);
        let refuse = |why: String| ChainError::Overlay {
            path: path.to_path_buf(),
            why,
        };
        let (uuid, checkpoint, generation) = match point {
            Some((uuid, name, generation)) => (*uuid, name.as_str(), *generation),
            None => (uuid::Uuid::nil(), IMAGE_POINT, 0),
        };
        let (mut header, words) = if map_path.exists() {
            let (header, words) = read_bitmap_file(&map_path)?;
            if header.state == BitmapState::Inconsistent {
                return Err(refuse(format!(
                    "{} is marked inconsistent; start over with a new overlay file",
                    map_path.display()
                )));
            }
            if header.volume_uuid != uuid
                || header.checkpoint != checkpoint
                || header.generation != generation
                || header.volume_size != size
                || u64::from(header.granularity) != BLOCK
            {
                return Err(refuse(format!(
                    "it was made over volume {} checkpoint {:?} (generation {}, {} bytes), \
                     not over this point (volume {uuid} checkpoint {checkpoint:?}, generation \
                     {generation}, {size} bytes); serve it with the point it was made for, or \
                     give a new overlay file",
                    header.volume_uuid, header.checkpoint, header.generation, header.volume_size
                )));
            }
            (header, words)
        } else {
            if std::fs::metadata(path).is_ok_and(|m| m.len() > 0) {
                return Err(refuse(format!(
                    "the file exists but {} does not, so it is not an overlay; give a new \
                     file name (it is created) or remove the file",
                    map_path.display()
                )));
            }
            let header = BitmapHeader::new(uuid, checkpoint, BLOCK as u32, size, generation)
                .map_err(|field| refuse(format!("cannot describe this point: {field}")))?;
            let words = vec![0u64; header.word_count()];
            // The map first: a crash before the data file exists leaves a map with no
            // bits set, from which the data file is simply made again.
            write_bitmap_file(&map_path, &header, &words)?;
            (header, words)
        };
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_error(format!("opening the overlay {}", path.display())))?;
        let len = data
            .metadata()
            .map_err(io_error(format!("reading {}", path.display())))?
            .len();
        if len != size {
            if len == 0 && words.iter().all(|w| *w == 0) {
                data.set_len(size)
                    .map_err(io_error(format!("sizing the overlay {}", path.display())))?;
                data.sync_all()
                    .map_err(io_error(format!("syncing {}", path.display())))?;
            } else {
                return Err(refuse(format!(
                    "it holds {len} bytes but the point is {size} bytes; it belongs to \
                     another point"
                )));
            }
        }
        let map = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&map_path)
            .map_err(io_error(format!("opening {}", map_path.display())))?;
        // In use from now on: the payload crc goes stale as bits are set in place.
        header.state = BitmapState::InUse;
        map.write_all_at(&header.encode(), 0)
            .and_then(|()| map.sync_data())
            .map_err(io_error(format!("marking {} in use", map_path.display())))?;
        Ok(Overlay {
            path: path.to_path_buf(),
            map_path,
            data,
            map,
            header,
            size,
            bits: Mutex::new(Bits {
                words,
                pending: BTreeSet::new(),
            }),
            rmw: RwLock::new(()),
            flushing: Mutex::new(()),
        })
    }

    /// The overlay's data file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs of `offset..end` that are (true) or are not (false) in the overlay.
    fn runs(&self, offset: u64, end: u64) -> Vec<(u64, u64, bool)> {
        let bits = self.bits.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let mut at = offset;
        while at < end {
            let block = at / BLOCK;
            let stop = ((block + 1) * BLOCK).min(end);
            let written = is_dirty(&bits.words, block);
            match out.last_mut() {
                Some(last) if last.2 == written => last.1 = stop,
                _ => out.push((at, stop, written)),
            }
            at = stop;
        }
        out
    }

    /// Fill `buf` with the bytes at `offset`: the overlay's where written, else the point's.
    pub fn read(&self, offset: u64, buf: &mut [u8], point: PointRead<'_>) -> ExportResult<()> {
        let end = offset + buf.len() as u64;
        for (start, stop, written) in self.runs(offset, end) {
            let dst = &mut buf[(start - offset) as usize..(stop - offset) as usize];
            if written {
                self.data.read_exact_at(dst, start)?;
            } else {
                point(start, dst)?;
            }
        }
        Ok(())
    }

    /// The block range `start..stop` of a partial block at `block`, clipped to the size.
    fn block_range(&self, block: u64) -> (u64, u64) {
        (block * BLOCK, ((block + 1) * BLOCK).min(self.size))
    }

    /// Write `data` at `offset` into the overlay (durable at the next flush).
    pub fn write(&self, offset: u64, data: &[u8], point: PointRead<'_>) -> ExportResult<()> {
        if data.is_empty() {
            return Ok(());
        }
        let end = offset + data.len() as u64;
        let (first, last) = (offset / BLOCK, (end - 1) / BLOCK);
        let partial: Vec<u64> = [first, last]
            .into_iter()
            .filter(|&b| {
                let (start, stop) = self.block_range(b);
                offset > start || end < stop
            })
            .collect();
        let needs_rmw = {
            let bits = self.bits.lock().unwrap_or_else(|e| e.into_inner());
            partial.iter().any(|&b| !is_dirty(&bits.words, b))
        };
        if needs_rmw {
            let _exclusive = self.rmw.write().unwrap_or_else(|e| e.into_inner());
            for block in partial {
                let unwritten = {
                    let bits = self.bits.lock().unwrap_or_else(|e| e.into_inner());
                    !is_dirty(&bits.words, block)
                };
                if !unwritten {
                    continue;
                }
                let (start, stop) = self.block_range(block);
                let mut whole = vec![0u8; (stop - start) as usize];
                point(start, &mut whole)?;
                let (lo, hi) = (start.max(offset), stop.min(end));
                whole[(lo - start) as usize..(hi - start) as usize]
                    .copy_from_slice(&data[(lo - offset) as usize..(hi - offset) as usize]);
                self.data.write_all_at(&whole, start)?;
            }
            self.data.write_all_at(data, offset)?;
            self.mark(first..=last);
        } else {
            let _shared = self.rmw.read().unwrap_or_else(|e| e.into_inner());
            self.data.write_all_at(data, offset)?;
            self.mark(first..=last);
        }
        Ok(())
    }

    /// Make `len` bytes at `offset` read as zeros: whole blocks are punched out of the
    /// overlay file (it stays sparse), partial ones written.
    pub fn zero(&self, offset: u64, len: u64, point: PointRead<'_>) -> ExportResult<()> {
        let end = offset + len;
        let inner_start = offset.next_multiple_of(BLOCK);
        let inner_end = if end == self.size {
            end
        } else {
            end / BLOCK * BLOCK
        };
        if inner_start >= inner_end {
            return self.write_zero_bytes(offset, end, point);
        }
        self.write_zero_bytes(offset, inner_start, point)?;
        let punched = {
            let _shared = self.rmw.read().unwrap_or_else(|e| e.into_inner());
            let punched = rustix::fs::fallocate(
                &self.data,
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                inner_start,
                inner_end - inner_start,
            )
            .is_ok();
            if punched {
                self.mark(inner_start / BLOCK..=(inner_end - 1) / BLOCK);
            }
            punched
        };
        if !punched {
            // No hole punching on this filesystem: write the zeros.
            self.write_zero_bytes(inner_start, inner_end, point)?;
        }
        self.write_zero_bytes(inner_end, end, point)
    }

    fn write_zero_bytes(&self, start: u64, end: u64, point: PointRead<'_>) -> ExportResult<()> {
        let mut at = start;
        while at < end {
            let n = (end - at).min(1 << 20);
            self.write(at, &vec![0u8; n as usize], point)?;
            at += n;
        }
        Ok(())
    }

    fn mark(&self, blocks: std::ops::RangeInclusive<u64>) {
        let mut bits = self.bits.lock().unwrap_or_else(|e| e.into_inner());
        for block in blocks {
            if !is_dirty(&bits.words, block) {
                set_dirty(&mut bits.words, block);
                bits.pending.insert((block / 64) as usize);
            }
        }
    }

    /// Make every completed write durable: sync the data, then the map words set before.
    pub fn flush(&self) -> ExportResult<()> {
        let _one = self.flushing.lock().unwrap_or_else(|e| e.into_inner());
        let words: Vec<(usize, u64)> = {
            let mut bits = self.bits.lock().unwrap_or_else(|e| e.into_inner());
            let pending = std::mem::take(&mut bits.pending);
            pending.into_iter().map(|i| (i, bits.words[i])).collect()
        };
        let result = self.write_words(&words);
        if result.is_err() {
            // Written again by the next flush.
            let mut bits = self.bits.lock().unwrap_or_else(|e| e.into_inner());
            bits.pending.extend(words.iter().map(|(i, _)| *i));
        }
        result
    }

    fn write_words(&self, words: &[(usize, u64)]) -> ExportResult<()> {
        self.data
            .sync_data()
            .map_err(|err| context(err, format!("syncing the overlay {}", self.path.display())))?;
        if words.is_empty() {
            return Ok(());
        }
        // Consecutive words in one write.
        let mut run: Vec<u8> = Vec::new();
        let mut run_start = words[0].0;
        for (n, &(index, value)) in words.iter().enumerate() {
            if n > 0 && index != run_start + run.len() / 8 {
                self.write_run(run_start, &run)?;
                run.clear();
                run_start = index;
            }
            run.extend_from_slice(&value.to_le_bytes());
        }
        self.write_run(run_start, &run)?;
        self.map
            .sync_data()
            .map_err(|err| context(err, format!("syncing {}", self.map_path.display())))
    }

    fn write_run(&self, first_word: usize, bytes: &[u8]) -> ExportResult<()> {
        self.map
            .write_all_at(bytes, HEADER_LEN as u64 + first_word as u64 * 8)
            .map_err(|err| context(err, format!("writing {}", self.map_path.display())))
    }

    /// Flush, then mark the map cleanly closed (a Clean header with the payload crc).
    pub fn close(&self) -> ExportResult<()> {
        self.flush()?;
        let mut header = self.header.clone();
        header.state = BitmapState::Clean;
        header.payload_crc = {
            let bits = self.bits.lock().unwrap_or_else(|e| e.into_inner());
            words_crc(&bits.words)
        };
        self.map
            .write_all_at(&header.encode(), 0)
            .and_then(|()| self.map.sync_data())
            .map_err(|err| context(err, format!("closing {}", self.map_path.display())))
    }

    /// `base:allocation`: overlay blocks are data, the rest is the point's.
    pub fn allocation(
        &self,
        offset: u64,
        len: u64,
        point: PointAllocation<'_>,
    ) -> ExportResult<Vec<Extent>> {
        // Bounded, so one call walks at most 64 Ki bits; the server asks again for more.
        let end = offset
            .saturating_add(len)
            .min(self.size)
            .min(offset.saturating_add(ALLOCATION_SPAN));
        let mut out = Vec::new();
        for (start, stop, written) in self.runs(offset, end) {
            if written {
                out.push(Extent {
                    length: stop - start,
                    flags: 0,
                });
                continue;
            }
            let mut covered = 0;
            for extent in point(start, stop - start)? {
                let length = extent.length.min(stop - start - covered);
                if length == 0 {
                    break;
                }
                out.push(Extent {
                    length,
                    flags: extent.flags,
                });
                covered += length;
            }
            if start + covered < stop || out.len() >= 1024 {
                break;
            }
        }
        Ok(out)
    }
}

fn context(err: io::Error, what: String) -> ExportError {
    let mut err = ExportError::from(err);
    err.message = format!("{what}: {}", err.message);
    err
}
