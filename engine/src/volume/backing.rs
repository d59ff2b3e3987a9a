//! The backing store of a volume (a raw image file or a block device) and the COW store
//! file: positional I/O that goes through O_DIRECT whenever the request is aligned, so
//! the engine neither pollutes nor pays for the page cache, and falls back to buffered
//! I/O for the odd unaligned request (the kernel keeps both views coherent).

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

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

/// A file or block device, opened with O_DIRECT when the filesystem allows it. Its
/// buffered twin, for the odd unaligned request, is opened on first need: most volumes
/// never see one, and a host with ten thousand volumes then holds one descriptor per
/// volume, not two.
#[derive(Debug)]
pub(crate) struct BackingFile {
    path: PathBuf,
    /// O_DIRECT when `direct`, else buffered; every metadata call goes here.
    file: File,
    direct: bool,
    /// A buffered descriptor of the same inode, when `direct` (reopened through
    /// /proc/self/fd, so a rename or replacement of `path` cannot swap the file).
    buffered: OnceLock<File>,
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
            .open(reopen_path(&buffered))
            .ok();
        let (file, direct) = match direct {
            Some(direct) => (direct, true),
            None => (buffered, false),
        };
        Ok(BackingFile {
            path: path.to_path_buf(),
            file,
            direct,
            buffered: OnceLock::new(),
            is_device,
        })
    }

    /// The descriptor for `aligned` I/O: O_DIRECT if there is one, else buffered.
    fn io_file(&self, aligned: bool) -> io::Result<&File> {
        if aligned || !self.direct {
            return Ok(&self.file);
        }
        if let Some(buffered) = self.buffered.get() {
            return Ok(buffered);
        }
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .open(reopen_path(&self.file))?;
        // Two first unaligned requests may race here: one descriptor wins, the other closes.
        Ok(self.buffered.get_or_init(|| opened))
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
            sys::block_device_size(&self.file)
        } else {
            Ok(self.file.metadata()?.len())
        }
    }

    pub(crate) fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    /// Fill `buf` from `offset`; reading past the end of a file yields zeroes.
    pub(crate) fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let aligned = is_aligned(offset, buf.len());
        let file = self.io_file(aligned)?;
        if !self.direct || !aligned || ptr_aligned(buf) {
            return read_full(file, offset, buf);
        }
        with_bounce(buf.len(), |bounce| {
            read_full(file, offset, bounce)?;
            buf.copy_from_slice(bounce);
            Ok(())
        })
    }

    /// Write all of `data` at `offset`.
    pub(crate) fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let aligned = is_aligned(offset, data.len());
        let file = self.io_file(aligned)?;
        if !self.direct || !aligned || ptr_aligned(data) {
            return file.write_all_at(data, offset);
        }
        with_bounce(data.len(), |bounce| {
            bounce.copy_from_slice(data);
            file.write_all_at(bounce, offset)
        })
    }

    /// Write `bufs` back to back starting at `offset`: one `pwritev` (through O_DIRECT
    /// when everything is aligned) instead of one write per buffer.
    pub(crate) fn write_vectored_at(&self, offset: u64, bufs: &[&[u8]]) -> io::Result<()> {
        let aligned = offset % DIRECT_ALIGN as u64 == 0
            && bufs
                .iter()
                .all(|b| b.len() % DIRECT_ALIGN == 0 && ptr_aligned(b));
        let file = self.io_file(aligned)?;
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
        self.file.sync_data()
    }

    /// Discard a range: punch a hole in a file, BLKDISCARD on a device.
    pub(crate) fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if self.is_device {
            sys::block_discard(&self.file, offset, len)
        } else {
            sys::punch_hole(&self.file, offset, len)
        }
    }

    /// Make a range read as zeroes: punch a hole (`may_unmap`) or zero it in place, and
    /// fall back to writing zeroes when the filesystem or device cannot.
    pub(crate) fn zero(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let fast = if self.is_device {
            sys::block_zeroout(&self.file, offset, len)
        } else if may_unmap {
            sys::punch_hole(&self.file, offset, len)
        } else {
            sys::zero_range(&self.file, offset, len)
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
        match sys::preallocate(&self.file, offset, len) {
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
            let data = match sys::seek_data(&self.file, pos) {
                Ok(data) => data.unwrap_or(end).min(end),
                Err(_) => return None,
            };
            if data > pos {
                runs.push((pos, data, false));
                pos = data;
                continue;
            }
            let hole = match sys::seek_hole(&self.file, pos) {
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

/// A path that opens the inode `file` has open, whatever has become of its name since.
fn reopen_path(file: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
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

    /// Descriptors of this process open on `path`.
    fn open_descriptors(path: &Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == path))
            .count()
    }

    #[test]
    fn one_descriptor_until_an_unaligned_request_needs_the_buffered_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let file = BackingFile::create(&path).unwrap();
        file.set_len(1 << 20).unwrap();
        file.write_at(0, &[1u8; 4096]).unwrap();
        assert_eq!(open_descriptors(&path), 1);
        // The buffered descriptor opens the same inode, even after the name moved away.
        let moved = dir.path().join("moved");
        std::fs::rename(&path, &moved).unwrap();
        std::fs::write(&path, b"a stranger").unwrap();
        file.write_at(1, &[2u8; 3]).unwrap();
        let expected = if file.direct { 2 } else { 1 };
        assert_eq!(open_descriptors(&moved), expected);
        let mut back = [0u8; 5];
        file.read_at(0, &mut back).unwrap();
        assert_eq!(back, [1, 2, 2, 2, 1]);
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
