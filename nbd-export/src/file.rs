//! [`FileExport`]: a plain file or block device served as an export, as qemu-nbd does,
//! with optional dirty bitmaps (`qemu:dirty-bitmap:NAME`).
//!
//! - `base:allocation` comes from SEEK_DATA/SEEK_HOLE on regular files (block devices
//!   report everything allocated);
//! - TRIM punches holes (FALLOC_FL_PUNCH_HOLE | KEEP_SIZE); where the filesystem cannot,
//!   it is a no-op, which the protocol allows;
//! - WRITE_ZEROES punches (or, with NO_HOLE, FALLOC_FL_ZERO_RANGE) and falls back to
//!   writing zeroes, except with FAST_ZERO, which then fails with ENOTSUP;
//! - FLUSH and FUA are fdatasync; one file descriptor serves every connection, so a flush
//!   covers writes completed on all of them (CAN_MULTI_CONN is safe);
//! - large writes (at least [`WRITE_BEHIND_MIN`]) start their own writeback at once
//!   (`posix_fadvise(DONTNEED)` on the range: asynchronous writeback, then only clean pages
//!   are dropped), so the disk works while the client is still sending and a later FLUSH
//!   has little left to do; the kernel would otherwise hold gigabytes of dirty pages until
//!   its background threshold. Small writes stay in the page cache, where rewrites are cheap;
//! - [`Export::backing_file`] is the file itself, so the server sends READ data from the
//!   page cache with sendfile(2) instead of copying it through a buffer.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::sync::Mutex;

use rustix::fs::{FallocateFlags, SeekFrom as DataSeek};
use tidemark_formats::bitmap::dirty_runs;

use crate::export::{
    Capabilities, Errno, Export, ExportError, ExportResult, Extent, MetaContext, ZeroFlags,
    STATE_DIRTY, STATE_HOLE, STATE_ZERO,
};

/// Most extents one block-status call computes; the server re-queries for more.
const EXTENTS_PER_CALL: usize = 1024;

/// Writes of at least this many bytes start their writeback at once (see the module doc).
pub const WRITE_BEHIND_MIN: usize = 128 * 1024;

/// A dirty bitmap over an export: bit `i` (bit `i % 64` of word `i / 64`) covers bytes
/// `[i * granularity, (i + 1) * granularity)`; a set bit means changed (STATE_DIRTY).
#[derive(Debug, Clone)]
pub struct DirtyBitmap {
    name: String,
    granularity: u64,
    words: Vec<u64>,
    blocks: u64,
}

/// A bitmap that does not fit the export.
#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    /// Granularity must be a nonzero power of two.
    #[error("bitmap {name:?}: granularity {granularity} is not a power of two")]
    Granularity {
        /// The bitmap.
        name: String,
        /// The granularity.
        granularity: u64,
    },
    /// The bitmap has fewer words than the export needs.
    #[error("bitmap {name:?} has {words} words but a {size}-byte export at granularity {granularity} needs {needed}")]
    TooShort {
        /// The bitmap.
        name: String,
        /// Words present.
        words: usize,
        /// Words needed.
        needed: u64,
        /// The export size.
        size: u64,
        /// The granularity.
        granularity: u64,
    },
    /// The name is not usable in a context name.
    #[error("bitmap name {0:?} is empty or too long for an NBD context name")]
    Name(String),
}

impl DirtyBitmap {
    /// A bitmap over an export of `export_size` bytes.
    pub fn new(
        name: &str,
        granularity: u64,
        words: Vec<u64>,
        export_size: u64,
    ) -> Result<DirtyBitmap, BitmapError> {
        if name.is_empty() || name.len() > 4000 || name.contains('\0') {
            return Err(BitmapError::Name(name.to_string()));
        }
        if granularity == 0 || !granularity.is_power_of_two() {
            return Err(BitmapError::Granularity {
                name: name.to_string(),
                granularity,
            });
        }
        let blocks = export_size.div_ceil(granularity);
        let needed = blocks.div_ceil(64);
        if (words.len() as u64) < needed {
            return Err(BitmapError::TooShort {
                name: name.to_string(),
                words: words.len(),
                needed,
                size: export_size,
                granularity,
            });
        }
        Ok(DirtyBitmap {
            name: name.to_string(),
            granularity,
            words,
            blocks,
        })
    }

    /// The bitmap's name (the context is `qemu:dirty-bitmap:NAME`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Extents over `[offset, offset + len)` of an export of `size` bytes: the dirty runs
    /// of [`dirty_runs`] and the clean gaps between them, at most `EXTENTS_PER_CALL`.
    pub fn extents(&self, offset: u64, len: u64, size: u64) -> Vec<Extent> {
        let gran = self.granularity;
        let end = offset.saturating_add(len).min(size);
        let first = offset / gran;
        let last = end.div_ceil(gran).min(self.blocks);
        let end = end.min(last * gran);
        let mut out = Vec::new();
        if offset >= end {
            return out;
        }
        // Scan from the word holding `first`; runs come back relative to its first block.
        let base = first / 64 * 64;
        let runs = dirty_runs(&self.words[(base / 64) as usize..], last - base);
        let mut cursor = offset;
        for run in runs {
            let run_start = ((run.start + base) * gran).max(cursor);
            let run_end = ((run.end + base) * gran).min(end);
            if run_end <= cursor {
                continue;
            }
            if run_start > cursor {
                out.push(Extent {
                    length: run_start - cursor,
                    flags: 0,
                });
                if out.len() == EXTENTS_PER_CALL {
                    return out;
                }
            }
            out.push(Extent {
                length: run_end - run_start,
                flags: STATE_DIRTY,
            });
            cursor = run_end;
            if out.len() == EXTENTS_PER_CALL {
                return out;
            }
        }
        if cursor < end {
            out.push(Extent {
                length: end - cursor,
                flags: 0,
            });
        }
        out
    }
}

/// A plain file or block device as an export.
#[derive(Debug)]
pub struct FileExport {
    file: File,
    size: u64,
    read_only: bool,
    regular: bool,
    description: String,
    bitmaps: Vec<DirtyBitmap>,
    /// The last data extent SEEK_DATA/SEEK_HOLE found, `[start, end)`: reads inside it
    /// skip the two lseeks. Reporting data where a hole was punched since is always
    /// correct (only less precise), so trims and write-zeroes merely forget it.
    known_data: Mutex<(u64, u64)>,
}

impl FileExport {
    /// Open `path` (read-write unless `read_only`).
    pub fn open(path: &Path, read_only: bool) -> io::Result<FileExport> {
        let mut file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let meta = file.metadata()?;
        let kind = meta.file_type();
        let size = if kind.is_block_device() {
            file.seek(SeekFrom::End(0))?
        } else if kind.is_file() {
            meta.len()
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is neither a regular file nor a block device",
                    path.display()
                ),
            ));
        };
        Ok(FileExport {
            file,
            size,
            read_only,
            regular: kind.is_file(),
            description: path.display().to_string(),
            bitmaps: Vec::new(),
            known_data: Mutex::new((0, 0)),
        })
    }

    /// Offer `bitmap` as `qemu:dirty-bitmap:NAME`.
    pub fn add_bitmap(&mut self, bitmap: DirtyBitmap) {
        self.bitmaps.retain(|b| b.name != bitmap.name);
        self.bitmaps.push(bitmap);
    }

    /// Set the description sent in NBD_INFO_DESCRIPTION and NBD_OPT_LIST.
    pub fn set_description(&mut self, description: String) {
        self.description = description;
    }

    fn allocation(&self, offset: u64, len: u64) -> ExportResult<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.size);
        if !self.regular {
            return Ok(vec![Extent {
                length: end - offset,
                flags: 0,
            }]);
        }
        let mut out = Vec::new();
        let mut cursor = offset;
        while cursor < end && out.len() < EXTENTS_PER_CALL {
            let (known_start, known_end) =
                *self.known_data.lock().unwrap_or_else(|e| e.into_inner());
            if known_start <= cursor && cursor < known_end {
                let stop = known_end.min(end);
                out.push(Extent {
                    length: stop - cursor,
                    flags: 0,
                });
                cursor = stop;
                continue;
            }
            let data = match rustix::fs::seek(&self.file, DataSeek::Data(cursor)) {
                Ok(data) => data.min(end),
                // No data after the cursor: the rest is a hole.
                Err(rustix::io::Errno::NXIO) => end,
                Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => {
                    // No SEEK_DATA on this filesystem: all data.
                    out.push(Extent {
                        length: end - cursor,
                        flags: 0,
                    });
                    break;
                }
                Err(e) => return Err(io::Error::from(e).into()),
            };
            if data > cursor {
                out.push(Extent {
                    length: data - cursor,
                    flags: STATE_HOLE | STATE_ZERO,
                });
                cursor = data;
                continue;
            }
            let hole = match rustix::fs::seek(&self.file, DataSeek::Hole(cursor)) {
                Ok(hole) => {
                    *self.known_data.lock().unwrap_or_else(|e| e.into_inner()) = (cursor, hole);
                    hole.min(end)
                }
                Err(rustix::io::Errno::NXIO) => end,
                Err(e) => return Err(io::Error::from(e).into()),
            };
            // A hole at the cursor while SEEK_DATA said data: the file changed; report data.
            let stop = if hole > cursor { hole } else { end };
            out.push(Extent {
                length: stop - cursor,
                flags: 0,
            });
            cursor = stop;
        }
        Ok(out)
    }

    fn forget_known_data(&self) {
        *self.known_data.lock().unwrap_or_else(|e| e.into_inner()) = (0, 0);
    }

    fn write_zero_bytes(&self, offset: u64, len: u64) -> ExportResult<()> {
        let chunk = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.file.write_all_at(&chunk[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

fn unsupported(e: rustix::io::Errno) -> bool {
    matches!(
        e,
        rustix::io::Errno::OPNOTSUPP
            | rustix::io::Errno::INVAL
            | rustix::io::Errno::NOSYS
            | rustix::io::Errno::NODEV
    )
}

impl Export for FileExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: self.read_only,
            flush: true,
            // A read-only file is never punched.
            trim: !self.read_only,
            write_zeroes: true,
            fast_zero: true,
            cache: true,
            multi_conn: true,
            knows_holes: self.regular,
        }
    }

    fn description(&self) -> String {
        self.description.clone()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> ExportResult<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                ExportError::new(
                    Errno::Io,
                    format!(
                        "the file ended before offset {} (was it truncated?)",
                        offset + buf.len() as u64
                    ),
                )
            } else {
                e.into()
            }
        })
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> ExportResult<()> {
        if self.read_only {
            return Err(ExportError::new(Errno::Perm, "the export is read-only"));
        }
        self.file.write_all_at(data, offset)?;
        if fua {
            self.file.sync_data()?;
        } else if data.len() >= WRITE_BEHIND_MIN {
            // A hint: the data is already written, so failing to start writeback early
            // only leaves it for the next flush.
            let len = std::num::NonZeroU64::new(data.len() as u64);
            let _ = rustix::fs::fadvise(&self.file, offset, len, rustix::fs::Advice::DontNeed);
        }
        Ok(())
    }

    fn flush(&self) -> ExportResult<()> {
        if self.read_only {
            return Ok(());
        }
        Ok(self.file.sync_data()?)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> ExportResult<()> {
        if self.read_only {
            return Err(ExportError::new(Errno::Perm, "the export is read-only"));
        }
        self.forget_known_data();
        match rustix::fs::fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => {}
            // TRIM is advisory: not discarding is a valid implementation.
            Err(e) if unsupported(e) => return Ok(()),
            Err(e) => return Err(io::Error::from(e).into()),
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> ExportResult<()> {
        if self.read_only {
            return Err(ExportError::new(Errno::Perm, "the export is read-only"));
        }
        self.forget_known_data();
        let mode = if flags.no_hole {
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE
        } else {
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE
        };
        let mut result = rustix::fs::fallocate(&self.file, mode, offset, len);
        if flags.no_hole && result.is_err_and(unsupported) {
            // Some filesystems lack ZERO_RANGE: punch, then allocate the range again.
            result = rustix::fs::fallocate(
                &self.file,
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                offset,
                len,
            )
            .and_then(|()| {
                rustix::fs::fallocate(&self.file, FallocateFlags::KEEP_SIZE, offset, len)
            });
        }
        match result {
            Ok(()) => {}
            Err(e) if unsupported(e) => {
                if flags.fast {
                    return Err(ExportError::new(
                        Errno::NotSup,
                        "zeroing this range would need slow writes",
                    ));
                }
                self.write_zero_bytes(offset, len)?;
            }
            Err(e) => return Err(io::Error::from(e).into()),
        }
        if flags.fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn cache(&self, offset: u64, len: u64) -> ExportResult<()> {
        let len = std::num::NonZeroU64::new(len);
        // Advice is a hint; failure to prefetch is not an error for the client.
        let _ = rustix::fs::fadvise(&self.file, offset, len, rustix::fs::Advice::WillNeed);
        Ok(())
    }

    fn backing_file(&self) -> Option<&File> {
        Some(&self.file)
    }

    fn dirty_bitmaps(&self) -> Vec<String> {
        self.bitmaps.iter().map(|b| b.name.clone()).collect()
    }

    fn block_status(
        &self,
        context: &MetaContext,
        offset: u64,
        len: u64,
    ) -> ExportResult<Vec<Extent>> {
        match context {
            MetaContext::BaseAllocation => self.allocation(offset, len),
            MetaContext::DirtyBitmap(name) => match self.bitmaps.iter().find(|b| &b.name == name) {
                Some(bitmap) => Ok(bitmap.extents(offset, len, self.size)),
                None => Err(ExportError::new(
                    Errno::Inval,
                    format!("no dirty bitmap named {name:?}"),
                )),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sparse_file(len: u64) -> (tempfile::NamedTempFile, FileExport) {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(len).unwrap();
        let export = FileExport::open(tmp.path(), false).unwrap();
        (tmp, export)
    }

    #[test]
    fn allocation_reports_holes_and_data_from_the_filesystem() {
        let (_tmp, export) = sparse_file(4 << 20);
        export.write(1 << 20, &vec![7u8; 1 << 20], false).unwrap();
        let extents = export.allocation(0, 4 << 20).unwrap();
        let total: u64 = extents.iter().map(|e| e.length).sum();
        assert_eq!(total, 4 << 20);
        // The written MiB is data; the first MiB is a hole (filesystems that cannot
        // report holes say all data, which is also correct).
        let mut pos = 0;
        for e in &extents {
            if pos < 2 << 20 && pos + e.length > 1 << 20 {
                assert_eq!(e.flags, 0, "written range reported as hole: {extents:?}");
            }
            pos += e.length;
        }
    }

    #[test]
    fn a_trim_is_seen_by_block_status_despite_the_data_cache() {
        let (_tmp, export) = sparse_file(4 << 20);
        export.write(0, &vec![7u8; 4 << 20], false).unwrap();
        let all = export.allocation(0, 4 << 20).unwrap();
        assert_eq!(
            all,
            vec![Extent {
                length: 4 << 20,
                flags: 0
            }]
        );
        export.trim(1 << 20, 1 << 20, false).unwrap();
        let after = export.allocation(0, 4 << 20).unwrap();
        assert_eq!(after.iter().map(|e| e.length).sum::<u64>(), 4 << 20);
        // Filesystems that punch report the hole; all must still cover the range.
        if after.len() > 1 {
            assert_eq!(
                after[1],
                Extent {
                    length: 1 << 20,
                    flags: STATE_HOLE | STATE_ZERO
                }
            );
        }
    }

    #[test]
    fn write_zeroes_and_trim_read_back_as_zeroes() {
        let (_tmp, export) = sparse_file(1 << 20);
        export.write(0, &vec![9u8; 1 << 20], false).unwrap();
        export
            .write_zeroes(
                4096,
                8192,
                ZeroFlags {
                    fua: true,
                    no_hole: false,
                    fast: false,
                },
            )
            .unwrap();
        export
            .write_zeroes(
                65536,
                4096,
                ZeroFlags {
                    fua: false,
                    no_hole: true,
                    fast: false,
                },
            )
            .unwrap();
        let mut buf = vec![1u8; 1 << 20];
        export.read(0, &mut buf).unwrap();
        assert!(buf[4096..12288].iter().all(|&b| b == 0));
        assert!(buf[65536..69632].iter().all(|&b| b == 0));
        assert!(buf[..4096].iter().all(|&b| b == 9));
        assert!(buf[12288..65536].iter().all(|&b| b == 9));
        export.trim(0, 1 << 20, false).unwrap();
    }

    #[test]
    fn read_only_exports_refuse_writes() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(4096).unwrap();
        let export = FileExport::open(tmp.path(), true).unwrap();
        assert_eq!(export.write(0, b"x", false).unwrap_err().errno, Errno::Perm);
        assert!(export.capabilities().read_only);
    }

    #[test]
    fn bitmap_must_cover_the_export() {
        assert!(DirtyBitmap::new("a", 65536, vec![0; 1], 64 * 65536 + 1).is_err());
        assert!(DirtyBitmap::new("a", 65536, vec![0; 2], 64 * 65536 + 1).is_ok());
        assert!(DirtyBitmap::new("a", 3, vec![0; 2], 10).is_err());
    }

    proptest! {
        /// The extents match a plain Vec<bool> model, cover the range, and alternate.
        #[test]
        fn bitmap_extents_match_a_model(bits in proptest::collection::vec(any::<bool>(), 1..300), off in 0u64..300 * 512, len in 1u64..300 * 512) {
            let gran = 512u64;
            let size = bits.len() as u64 * gran - 100;
            let mut words = vec![0u64; bits.len().div_ceil(64)];
            for (i, &b) in bits.iter().enumerate() {
                if b { words[i / 64] |= 1 << (i % 64); }
            }
            let bitmap = DirtyBitmap::new("m", gran, words, size).unwrap();
            let extents = bitmap.extents(off, len, size);
            let end = (off + len).min(size);
            let mut pos = off;
            for (i, e) in extents.iter().enumerate() {
                prop_assert!(e.length > 0);
                if i > 0 { prop_assert_ne!(e.flags, extents[i - 1].flags); }
                let mut p = pos;
                while p < pos + e.length {
                    let dirty = bits[(p / gran) as usize];
                    prop_assert_eq!(e.flags, if dirty { STATE_DIRTY } else { 0 });
                    p = (p / gran + 1) * gran;
                }
                pos += e.length;
            }
            prop_assert_eq!(pos, end.max(off));
        }
    }
}
