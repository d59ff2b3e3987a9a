//! The few file syscalls std does not wrap: SEEK_DATA/SEEK_HOLE and fallocate(2) modes.
//!
//! Each call passes a borrowed, open file descriptor and integers; only `is_cached` hands
//! the kernel a pointer, to a buffer it owns for the duration of the call.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// The first offset at or after `offset` that holds data, or `None` when only a hole
/// (or the end of the file) follows.
pub fn seek_data(file: &File, offset: u64) -> io::Result<Option<u64>> {
    let offset = to_off(offset)?;
    // SAFETY: lseek takes an fd we borrow for the duration of the call and two integers.
    let found = unsafe { libc::lseek(file.as_raw_fd(), offset, libc::SEEK_DATA) };
    if found < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(err),
        };
    }
    Ok(Some(found as u64))
}

/// The first offset at or after `offset` that starts a hole (the end of the file counts
/// as a hole).
pub fn seek_hole(file: &File, offset: u64) -> io::Result<u64> {
    let offset = to_off(offset)?;
    // SAFETY: as in `seek_data`.
    let found = unsafe { libc::lseek(file.as_raw_fd(), offset, libc::SEEK_HOLE) };
    if found < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(found as u64)
}

/// Deallocate `len` bytes at `offset`, keeping the file size: reads then return zeros.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// Make `len` bytes at `offset` read as zeros without writing them (ext4, xfs, block
/// devices), keeping the file size.
pub fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// Whether the `len` bytes at `offset` are in the page cache: a non-blocking read
/// (`preadv2` with `RWF_NOWAIT`) succeeds only when no disk I/O is needed. Any error,
/// including a kernel or file system without RWF_NOWAIT, counts as not cached.
pub fn is_cached(file: &File, offset: u64, len: usize) -> bool {
    let Ok(offset) = to_off(offset) else {
        return false;
    };
    let mut buf = vec![0u8; len];
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: `iov` describes `buf`, which is alive and exclusively ours until the call
    // returns; preadv2 writes at most iov_len bytes into it and keeps no reference.
    let read = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset, libc::RWF_NOWAIT) };
    read > 0
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (offset, len) = (to_off(offset)?, to_off(len)?);
    // SAFETY: fallocate takes a borrowed fd and integers; it touches no user memory.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn to_off(value: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(value)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset beyond off_t"))
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
        let hole = seek_hole(&file, 4 << 20).unwrap();
        assert!(hole >= (4 << 20) + 4096);
        assert_eq!(seek_data(&file, 6 << 20).unwrap(), None);
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
}
