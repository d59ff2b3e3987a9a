//! The backing store of a volume (a raw image file or a block device) and the COW store
//! file: positional I/O that goes through O_DIRECT whenever the request is aligned, so
//! the engine neither pollutes nor pays for the page cache, and falls back to buffered
//! I/O for the odd unaligned request (the kernel keeps both views coherent).

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::sys;

/// Alignment of O_DIRECT requests: offsets, lengths and buffer addresses. 4 KiB covers
/// every logical block size in use (512-byte and 4K-native devices).
pub(crate) const DIRECT_ALIGN: usize = 4096;

/// A heap buffer whose usable part starts on a [`DIRECT_ALIGN`] boundary, built from a
/// plain `Vec` (no allocator tricks, no `unsafe`).
#[derive(Debug, Default)]
pub(crate) struct AlignedBuf {
    raw: Vec<u8>,
}

impl AlignedBuf {
    /// The first `len` bytes of the aligned area, growing it when needed.
    pub(crate) fn get(&mut self, len: usize) -> &mut [u8] {
        let need = len + DIRECT_ALIGN;
        if self.raw.len() < need {
            self.raw = vec![0u8; need.next_power_of_two()];
        }
        let start = self.raw.as_ptr().align_offset(DIRECT_ALIGN);
        &mut self.raw[start..start + len]
    }
}

thread_local! {
    /// One bounce buffer per thread, reused across requests.
    static BOUNCE: RefCell<AlignedBuf> = RefCell::new(AlignedBuf::default());
}

/// Run `f` with this thread's bounce buffer of `len` bytes.
pub(crate) fn with_bounce<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    BOUNCE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => f(buf.get(len)),
        // Re-entered (a copy-before-write inside a bounced request): use a fresh buffer.
        Err(_) => f(AlignedBuf::default().get(len)),
    })
}

fn is_aligned(offset: u64, len: usize) -> bool {
    offset % DIRECT_ALIGN as u64 == 0 && len % DIRECT_ALIGN == 0
}

fn ptr_aligned(buf: &[u8]) -> bool {
    buf.as_ptr().align_offset(DIRECT_ALIGN) == 0
}

/// A file or block device opened twice: once with O_DIRECT (when the filesystem allows
/// it) and once buffered.
#[derive(Debug)]
pub(crate) struct BackingFile {
    path: PathBuf,
    buffered: File,
    direct: Option<File>,
    is_device: bool,
}

impl BackingFile {
    /// Open `path` read-write.
    pub(crate) fn open(path: &Path) -> io::Result<BackingFile> {
        Self::open_with(path, false)
    }

    /// Open or create `path` read-write (for COW store files).
    pub(crate) fn create(path: &Path) -> io::Result<BackingFile> {
        Self::open_with(path, true)
    }

    fn open_with(path: &Path, create: bool) -> io::Result<BackingFile> {
        let buffered = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .mode(0o600)
            .open(path)?;
        let is_device = buffered.metadata()?.file_type().is_block_device();
        // tmpfs and some FUSE filesystems refuse O_DIRECT: buffered I/O still works there.
        let direct = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        Ok(BackingFile {
            path: path.to_path_buf(),
            buffered,
            direct,
            is_device,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn is_device(&self) -> bool {
        self.is_device
    }

    /// Size in bytes: the file length, or BLKGETSIZE64 for a block device.
    pub(crate) fn len(&self) -> io::Result<u64> {
        if self.is_device {
            sys::block_device_size(&self.buffered)
        } else {
            Ok(self.buffered.metadata()?.len())
        }
    }

    pub(crate) fn set_len(&self, len: u64) -> io::Result<()> {
        self.buffered.set_len(len)
    }

    /// Fill `buf` from `offset`; reading past the end of a file yields zeroes.
    pub(crate) fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match &self.direct {
            Some(direct) if is_aligned(offset, buf.len()) => {
                if ptr_aligned(buf) {
                    read_full(direct, offset, buf)
                } else {
                    with_bounce(buf.len(), |bounce| {
                        read_full(direct, offset, bounce)?;
                        buf.copy_from_slice(bounce);
                        Ok(())
                    })
                }
            }
            _ => read_full(&self.buffered, offset, buf),
        }
    }

    /// Write all of `data` at `offset`.
    pub(crate) fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        match &self.direct {
            Some(direct) if is_aligned(offset, data.len()) => {
                if ptr_aligned(data) {
                    direct.write_all_at(data, offset)
                } else {
                    with_bounce(data.len(), |bounce| {
                        bounce.copy_from_slice(data);
                        direct.write_all_at(bounce, offset)
                    })
                }
            }
            _ => self.buffered.write_all_at(data, offset),
        }
    }

    /// Write `bufs` back to back starting at `offset`: one `pwritev` (through O_DIRECT
    /// when everything is aligned) instead of one write per buffer.
    pub(crate) fn write_vectored_at(&self, offset: u64, bufs: &[&[u8]]) -> io::Result<()> {
        let aligned = offset % DIRECT_ALIGN as u64 == 0
            && bufs
                .iter()
                .all(|b| b.len() % DIRECT_ALIGN == 0 && ptr_aligned(b));
        let file = match &self.direct {
            Some(direct) if aligned => direct,
            _ => &self.buffered,
        };
        let mut offset = offset;
        for group in bufs.chunks(sys::IOV_MAX) {
            let mut slices: Vec<io::IoSlice<'_>> =
                group.iter().map(|b| io::IoSlice::new(b)).collect();
            let mut rest = &mut slices[..];
            while !rest.is_empty() {
                match sys::pwritev(file, rest, offset) {
                    Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                    Ok(n) => {
                        offset += n as u64;
                        io::IoSlice::advance_slices(&mut rest, n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Make every completed write durable (both descriptors share one inode, so one
    /// fdatasync covers O_DIRECT and buffered writes alike).
    pub(crate) fn sync_data(&self) -> io::Result<()> {
        self.buffered.sync_data()
    }

    /// Discard a range: punch a hole in a file, BLKDISCARD on a device.
    pub(crate) fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if self.is_device {
            sys::block_discard(&self.buffered, offset, len)
        } else {
            sys::punch_hole(&self.buffered, offset, len)
        }
    }

    /// Make a range read as zeroes: punch a hole (`may_unmap`) or zero it in place, and
    /// fall back to writing zeroes when the filesystem or device cannot.
    pub(crate) fn zero(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let fast = if self.is_device {
            sys::block_zeroout(&self.buffered, offset, len)
        } else if may_unmap {
            sys::punch_hole(&self.buffered, offset, len)
        } else {
            sys::zero_range(&self.buffered, offset, len)
        };
        match fast {
            Ok(()) => Ok(()),
            Err(err) if is_unsupported(&err) => self.write_zeroes_slow(offset, len),
            Err(err) => Err(err),
        }
    }

    /// Write real zeroes over a range, a megabyte at a time.
    pub(crate) fn write_zeroes_slow(&self, offset: u64, len: u64) -> io::Result<()> {
        const STEP: u64 = 1 << 20;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(STEP) as usize;
            with_bounce(n, |buf| {
                buf.fill(0);
                self.write_at(offset + done, buf)
            })?;
            done += n as u64;
        }
        Ok(())
    }

    /// Reserve space for `[offset, offset + len)`, extending the file.
    pub(crate) fn preallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        match sys::preallocate(&self.buffered, offset, len) {
            Err(err) if is_unsupported(&err) => {
                let end = offset + len;
                if self.len()? < end {
                    self.set_len(end)?;
                }
                Ok(())
            }
            other => other,
        }
    }

    /// The allocation of `[offset, offset + len)` as runs of `(start, end, is_data)`,
    /// or `None` when the store cannot tell (a device, or no SEEK_DATA support).
    pub(crate) fn allocation(&self, offset: u64, len: u64) -> Option<Vec<(u64, u64, bool)>> {
        self.allocation_capped(offset, len, usize::MAX)
    }

    /// [`BackingFile::allocation`] that stops after `max_runs` runs (at least one): the
    /// runs then end before `offset + len`, and a caller asks again from where they end.
    /// Each run costs one or two lseek calls, so a fragmented terabyte costs the cap.
    pub(crate) fn allocation_capped(
        &self,
        offset: u64,
        len: u64,
        max_runs: usize,
    ) -> Option<Vec<(u64, u64, bool)>> {
        if self.is_device {
            return None;
        }
        let end = offset + len;
        let mut runs = Vec::new();
        let mut pos = offset;
        while pos < end && runs.len() < max_runs.max(1) {
            let data = match sys::seek_data(&self.buffered, pos) {
                Ok(data) => data.unwrap_or(end).min(end),
                Err(_) => return None,
            };
            if data > pos {
                runs.push((pos, data, false));
                pos = data;
                continue;
            }
            let hole = match sys::seek_hole(&self.buffered, pos) {
                Ok(hole) => hole.unwrap_or(end).min(end),
                Err(_) => return None,
            };
            if hole <= pos {
                // A racing truncate or a filesystem quirk: report the rest as data.
                runs.push((pos, end, true));
                break;
            }
            runs.push((pos, hole, true));
            pos = hole;
        }
        Some(runs)
    }
}

fn is_unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL)
    )
}

/// `read_exact_at` that treats end-of-file as zeroes (a sparse image shorter than the
/// volume, or the tail of a COW store that was never written).
fn read_full(file: &File, mut offset: u64, mut buf: &mut [u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, offset) {
            Ok(0) => {
                buf.fill(0);
                return Ok(());
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_aligned_and_sized() {
        let mut buf = AlignedBuf::default();
        for len in [1usize, 4096, 65536, 3 << 20] {
            let slice = buf.get(len);
            assert_eq!(slice.len(), len);
            assert!(ptr_aligned(slice));
        }
    }

    #[test]
    fn unaligned_and_aligned_io_see_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let file = BackingFile::create(&path).unwrap();
        file.set_len(1 << 20).unwrap();
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        file.write_at(4096, &data).unwrap();
        file.write_at(100, &[7u8; 10]).unwrap();
        let mut back = vec![0u8; 8192];
        file.read_at(4096, &mut back).unwrap();
        assert_eq!(back, data);
        let mut small = [0u8; 12];
        file.read_at(99, &mut small).unwrap();
        assert_eq!(small, [0, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 0]);
    }

    #[test]
    fn vectored_writes_land_back_to_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let file = BackingFile::create(&path).unwrap();
        file.set_len(1 << 20).unwrap();
        let pool = crate::io::BufPool::new(8192, 2).unwrap();
        let mut a = pool.take().unwrap();
        a.as_mut_slice().fill(1);
        let mut b = pool.take().unwrap();
        b.set_len(4096);
        b.as_mut_slice().fill(2);
        // Aligned: one O_DIRECT pwritev.
        file.write_vectored_at(4096, &[a.as_slice(), b.as_slice()])
            .unwrap();
        // Unaligned: the buffered fallback.
        file.write_vectored_at(3, &[&[3u8; 5][..], &[4u8; 2][..]])
            .unwrap();
        let mut back = vec![0u8; 16384];
        file.read_at(0, &mut back).unwrap();
        assert_eq!(&back[..3], &[0, 0, 0]);
        assert_eq!(&back[3..10], &[3, 3, 3, 3, 3, 4, 4]);
        assert!(back[10..4096].iter().all(|&x| x == 0));
        assert!(back[4096..12288].iter().all(|&x| x == 1));
        assert!(back[12288..16384].iter().all(|&x| x == 2));
    }

    #[test]
    fn zero_and_discard_read_back_as_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let file = BackingFile::create(&dir.path().join("img")).unwrap();
        file.write_at(0, &vec![0xaa; 1 << 20]).unwrap();
        file.zero(4096, 8192, false).unwrap();
        file.discard(65536, 65536).unwrap();
        let mut back = vec![0u8; 1 << 20];
        file.read_at(0, &mut back).unwrap();
        assert!(back[4096..12288].iter().all(|&b| b == 0));
        assert!(back[65536..131072].iter().all(|&b| b == 0));
        assert!(back[..4096].iter().all(|&b| b == 0xaa));
        let runs = file.allocation(0, 1 << 20).unwrap();
        assert!(runs.contains(&(65536, 131072, false)), "{runs:?}");
    }
}
