//! The file syscalls std does not wrap, through rustix: SEEK_DATA/SEEK_HOLE, fallocate(2)
//! modes, `pwritev`, a non-blocking read that tells whether a range is cached, `syncfs`
//! and `flock`. Every call borrows an open descriptor; none needs `unsafe`.

use std::fs::File;
use std::io;
use std::os::fd::BorrowedFd;

use rustix::fs::{FallocateFlags, FlockOperation, SeekFrom};
use rustix::io::{Errno, ReadWriteFlags};

/// The first offset at or after `offset` that holds data, `None` when only holes (or
/// the end of the file) follow.
pub fn seek_data(file: &File, offset: u64) -> io::Result<Option<u64>> {
    seek(file, SeekFrom::Data(offset))
}

/// The first offset at or after `offset` that starts a hole (the end of the file counts
/// as a hole), `None` when `offset` is at or past the end of the file.
pub fn seek_hole(file: &File, offset: u64) -> io::Result<Option<u64>> {
    seek(file, SeekFrom::Hole(offset))
}

/// `lseek` moves the shared file offset, which nothing in the engine relies on: all data
/// I/O is positional (pread/pwrite). ENXIO means there is nothing at or after `offset`.
fn seek(file: &File, whence: SeekFrom) -> io::Result<Option<u64>> {
    match rustix::fs::seek(file, whence) {
        Ok(found) => Ok(Some(found)),
        Err(Errno::NXIO) => Ok(None),
        Err(err) => Err(err.into()),
    }
}

/// Deallocate `len` bytes at `offset`, keeping the file size: reads then return zeros.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
}

/// Make `len` bytes at `offset` read as zeros without writing them (ext4, xfs, block
/// devices), keeping the file size and the allocation.
pub fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
}

/// Allocate a range of a regular file (extending it), so later writes cannot hit ENOSPC.
pub(crate) fn preallocate(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(file, FallocateFlags::empty(), offset, len)
}

fn fallocate(file: &File, mode: FallocateFlags, offset: u64, len: u64) -> io::Result<()> {
    // The kernel takes signed offsets; refuse what would turn negative instead of
    // letting it reinterpret the bits.
    if i64::try_from(offset).is_err() || i64::try_from(len).is_err() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(rustix::fs::fallocate(file, mode, offset, len)?)
}

/// Whether the `len` bytes at `offset` are in the page cache: a non-blocking read
/// (`preadv2` with `RWF_NOWAIT`) succeeds only when no disk I/O is needed. Any error,
/// including a kernel or file system without RWF_NOWAIT, counts as not cached.
pub fn is_cached(file: &File, offset: u64, len: usize) -> bool {
    if i64::try_from(offset).is_err() {
        return false;
    }
    let mut buf = vec![0u8; len];
    let mut iov = [io::IoSliceMut::new(&mut buf)];
    matches!(
        rustix::io::preadv2(file, &mut iov, offset, ReadWriteFlags::NOWAIT),
        Ok(read) if read > 0
    )
}

/// Largest number of buffers one `pwritev` takes (`IOV_MAX` on Linux).
pub(crate) const IOV_MAX: usize = 1024;

/// `pwritev`: write `bufs` in order, contiguously, at `offset`; returns the bytes written
/// (possibly fewer than asked, like `pwrite`). At most [`IOV_MAX`] buffers are passed.
pub(crate) fn pwritev(file: &File, bufs: &[io::IoSlice<'_>], offset: u64) -> io::Result<usize> {
    if i64::try_from(offset).is_err() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let bufs = &bufs[..bufs.len().min(IOV_MAX)];
    Ok(rustix::io::pwritev(file, bufs, offset)?)
}

/// Writes back the dirty data of the filesystem `fd` lives on.
pub(crate) fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::fs::syncfs(fd)?)
}

/// Try to take an exclusive `flock` on `file` without blocking: `Ok(false)` when another
/// open file description holds it. Released when the descriptor is closed.
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    match rustix::fs::flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(Errno::WOULDBLOCK) => Ok(false),
        Err(err) => Err(err.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn seek_data_and_hole_find_the_written_block() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(8 << 20).unwrap();
        file.write_all_at(&[1u8; 4096], 4 << 20).unwrap();
        let data = seek_data(&file, 0).unwrap().unwrap();
        assert!(data <= 4 << 20);
        let hole = seek_hole(&file, 4 << 20).unwrap().unwrap();
        assert!(hole >= (4 << 20) + 4096);
        assert_eq!(seek_data(&file, 6 << 20).unwrap(), None);
    }

    #[test]
    fn seeking_past_the_end_finds_nothing() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(1 << 20).unwrap();
        assert_eq!(seek_hole(&file, 2 << 20).unwrap(), None);
        assert_eq!(seek_data(&file, 2 << 20).unwrap(), None);
    }

    #[test]
    fn page_cache_residency_is_seen() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let file = File::open(&path).unwrap();
        // Just written through the page cache: resident.
        assert!(is_cached(&file, 4096, 4096));
    }

    #[test]
    fn punched_ranges_read_as_zero() {
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(&[9u8; 65536], 0).unwrap();
        punch_hole(&file, 4096, 8192).unwrap();
        let mut back = vec![0u8; 65536];
        file.read_exact_at(&mut back, 0).unwrap();
        assert!(back[4096..12288].iter().all(|&b| b == 0));
        assert!(back[..4096].iter().all(|&b| b == 9));
        assert_eq!(file.metadata().unwrap().len(), 65536);
    }

    #[test]
    fn a_second_exclusive_lock_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let first = File::create(&path).unwrap();
        let second = File::open(&path).unwrap();
        assert!(try_lock_exclusive(&first).unwrap());
        assert!(!try_lock_exclusive(&second).unwrap());
        drop(first);
        assert!(try_lock_exclusive(&second).unwrap());
    }
}
