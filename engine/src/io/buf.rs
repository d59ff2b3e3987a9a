//! Aligned I/O buffers: one anonymous mapping carved into equal buffers, handed out as owned
//! [`IoBuf`] handles and returned to the pool when dropped.
//!
//! Every buffer starts on an [`ALIGN`]-byte boundary and its size is a multiple of
//! [`ALIGN`], so it satisfies O_DIRECT on every device tidemark meets (512-byte and
//! 4 KiB logical sectors). The io_uring engine registers the whole pool once
//! (`IORING_REGISTER_BUFFERS`), so a buffer's pool index is also its fixed-buffer index.
//!
//! `unsafe` here: mapping and unmapping the region (mmap: page-aligned and zero-filled
//! lazily by the kernel, so a large pool costs nothing until used), and turning a buffer's part of it
//! into slices. The invariant that makes the slices sound is that an index is owned by at
//! most one live `IoBuf` at a time (the free list hands each index out once and takes it
//! back only in `IoBuf::drop`), so no two handles ever alias the same bytes.

use std::fmt;
use std::ops::Range;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::IoError;

/// Alignment of every buffer and of every O_DIRECT offset and length tidemark issues.
pub const ALIGN: usize = 4096;

/// The most memory one pool may hold; a larger request is a configuration mistake.
pub const MAX_POOL_BYTES: usize = 4 << 30;

/// Size of a transparent huge page on x86-64 and most arm64 kernels; pools of at least
/// half this size are rounded up to it and aligned to it, so that the kernel can back them
/// with huge pages (a 1 MiB buffer maps a whole huge page: memory for speed).
const HUGE_PAGE: usize = 2 << 20;

/// Which pages back a pool's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pages {
    /// Transparent huge pages where the kernel gives them (`MADV_HUGEPAGE` on a 2 MiB
    /// aligned mapping; pools smaller than 1 MiB and kernels without THP get base pages).
    /// A buffer inside one huge page is physically contiguous, so a 1 MiB request reaches
    /// the device as one segment instead of 256: on a virtio disk without indirect
    /// descriptors (this project's CI machine), 256-segment requests fill the whole
    /// virtqueue one at a time and large-block throughput halves.
    #[default]
    Huge,
    /// Base (4 KiB) pages, as fio's and most tools' malloc'd buffers are
    /// (`MADV_NOHUGEPAGE`, so that holds where THP is "always" too).
    Small,
}

static NEXT_POOL_ID: AtomicU64 = AtomicU64::new(1);

/// A fixed set of aligned buffers of one size. Cloning shares the pool.
#[derive(Clone)]
pub struct BufPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    id: u64,
    base: NonNull<u8>,
    /// Bytes mapped at `base`.
    len: usize,
    buf_size: usize,
    count: usize,
    free: Mutex<Vec<u32>>,
}

// SAFETY: `base` points to a heap region owned by this struct alone. The bytes of buffer i
// are only touched through the one `IoBuf` that currently owns index i (or by the kernel
// while that `IoBuf` is parked in an engine's in-flight table), so sharing the pool
// between threads cannot create a data race; the free list itself is behind a Mutex.
unsafe impl Send for PoolInner {}
// SAFETY: as above; `&PoolInner` only gives access to the Mutex-protected free list and
// to immutable metadata.
unsafe impl Sync for PoolInner {}

impl Drop for PoolInner {
    fn drop(&mut self) {
        // SAFETY: `base` and `len` describe the mapping made by `mmap` in `BufPool::new`; it
        // is unmapped only here, when the last handle (pool, IoBuf or registered ring) is
        // gone, so no slice into it and no kernel registration outlives it.
        let rc = unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
        debug_assert_eq!(rc, 0, "munmap of a buffer pool failed");
    }
}

impl BufPool {
    /// A pool of `count` buffers of `buf_size` bytes (rounded up to a multiple of
    /// [`ALIGN`]), zero-filled, in transparent huge pages where the kernel gives them
    /// ([`Pages::Huge`]).
    pub fn new(buf_size: usize, count: usize) -> Result<BufPool, IoError> {
        BufPool::with_pages(buf_size, count, Pages::Huge)
    }

    /// A pool as [`BufPool::new`] makes it, backed by the pages `pages` asks for.
    pub fn with_pages(buf_size: usize, count: usize, pages: Pages) -> Result<BufPool, IoError> {
        if buf_size == 0 || count == 0 || count > u32::MAX as usize {
            return Err(IoError::Config(format!(
                "a buffer pool needs a non-zero buffer size and count (got {buf_size} x {count})"
            )));
        }
        let buf_size = buf_size
            .checked_next_multiple_of(ALIGN)
            .ok_or_else(|| IoError::Config(format!("buffer size {buf_size} is too large")))?;
        let total = buf_size
            .checked_mul(count)
            .filter(|total| *total <= MAX_POOL_BYTES)
            .ok_or_else(|| {
                IoError::Config(format!(
                    "{count} buffers of {buf_size} bytes exceed the {} GiB pool limit; \
                     use a smaller block size or queue depth",
                    MAX_POOL_BYTES >> 30
                ))
            })?;
        let (base, len) = map_pool(total, pages)?;
        debug_assert_eq!(base.as_ptr() as usize % ALIGN, 0);
        let free = (0..count as u32).rev().collect();
        Ok(BufPool {
            inner: Arc::new(PoolInner {
                id: NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed),
                base,
                len,
                buf_size,
                count,
                free: Mutex::new(free),
            }),
        })
    }

    /// Take a free buffer, or `None` when all are in use. Its range is the whole buffer.
    pub fn take(&self) -> Option<IoBuf> {
        let index = self.inner.free_list().pop()?;
        Some(IoBuf {
            pool: Arc::clone(&self.inner),
            index,
            range: 0..self.inner.buf_size,
        })
    }

    /// Size of every buffer in bytes (a multiple of [`ALIGN`]).
    pub fn buf_size(&self) -> usize {
        self.inner.buf_size
    }

    /// Number of buffers in the pool.
    pub fn count(&self) -> usize {
        self.inner.count
    }

    /// Number of buffers not currently taken.
    pub fn available(&self) -> usize {
        self.inner.free_list().len()
    }

    /// A number that identifies this pool (and every clone of it).
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// Bytes of the pool that sit in transparent huge pages right now, from
    /// `/proc/self/smaps` (`None` where that cannot be read). Pages are given on first
    /// touch, so a pool reports 0 until its buffers have been used. Where the kernel has
    /// merged the pool's mapping with a neighbouring one, the figure is capped at the pool's
    /// size but may count the neighbour's huge pages.
    pub fn huge_page_bytes(&self) -> Option<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let base = self.inner.base.as_ptr() as usize;
        // A mapping's header line ("start-end perms ...") is followed by its fields.
        let lines = smaps
            .lines()
            .skip_while(|line| !smaps_range(line).is_some_and(|r| r.contains(&base)))
            .skip(1);
        let kib: u64 = lines
            .take_while(|line| smaps_range(line).is_none())
            .find_map(|line| line.strip_prefix("AnonHugePages:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some((kib * 1024).min(self.inner.len as u64))
    }

    /// Start address and length of buffer `index`, for registering the pool with a ring.
    pub(crate) fn region(&self, index: usize) -> (*mut u8, usize) {
        debug_assert!(index < self.inner.count);
        // SAFETY: index < count, so the offset stays inside the allocation.
        let start = unsafe { self.inner.base.as_ptr().add(index * self.inner.buf_size) };
        (start, self.inner.buf_size)
    }
}

/// The address range of an smaps header line ("7f00-7f80 rw-p ..."), `None` for a field.
fn smaps_range(line: &str) -> Option<Range<usize>> {
    let (start, end) = line.split_once(' ')?.0.split_once('-')?;
    Some(usize::from_str_radix(start, 16).ok()?..usize::from_str_radix(end, 16).ok()?)
}

/// Map `total` bytes of zero-filled anonymous memory for a pool: the start address and the
/// length mapped (what `munmap` takes back).
///
/// Anonymous memory from mmap is page-aligned (ALIGN is one page) and zero-filled by the
/// kernel on first touch. `alloc_zeroed` with a 4 KiB alignment would memset the whole pool
/// in user space instead, touching every page up front (tens of milliseconds for a 64 MiB
/// pool, paid by every short job). For huge pages the mapping is made one huge page larger,
/// trimmed to a huge-page-aligned start, and marked `MADV_HUGEPAGE`; small pages are
/// marked `MADV_NOHUGEPAGE`.
fn map_pool(total: usize, pages: Pages) -> Result<(NonNull<u8>, usize), IoError> {
    let huge = pages == Pages::Huge && total >= HUGE_PAGE / 2;
    let len = if huge {
        total.next_multiple_of(HUGE_PAGE)
    } else {
        total
    };
    let reserve = if huge { len + HUGE_PAGE } else { len };
    // SAFETY: a fresh private anonymous mapping of `reserve` (> 0) bytes at an address the
    // kernel chooses; it aliases no existing memory.
    let mapped = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserve,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if mapped == libc::MAP_FAILED {
        return Err(IoError::Config(format!(
            "cannot allocate a {total}-byte buffer pool: {}",
            std::io::Error::last_os_error()
        )));
    }
    let mapped = mapped.cast::<u8>();
    let mut start = mapped;
    if pages == Pages::Small {
        // SAFETY: advice on the whole mapping just made; it changes no memory contents.
        // Refused only by kernels without THP, which have no huge pages to avoid.
        unsafe { libc::madvise(mapped.cast(), len, libc::MADV_NOHUGEPAGE) };
    }
    if huge {
        let head = (mapped as usize).next_multiple_of(HUGE_PAGE) - mapped as usize;
        let tail = reserve - head - len;
        // SAFETY: `head + len + tail == reserve`, so both ranges lie inside the mapping just
        // made, page-aligned (mmap's start and HUGE_PAGE multiples), and nothing refers to
        // them yet. Trimming, then advising, a private mapping of our own.
        unsafe {
            start = mapped.add(head);
            if head > 0 {
                libc::munmap(mapped.cast(), head);
            }
            if tail > 0 {
                libc::munmap(start.add(len).cast(), tail);
            }
            // Advice only: a kernel without THP refuses it (EINVAL) and the pool keeps base
            // pages, which work the same, more slowly on some devices.
            libc::madvise(start.cast(), len, libc::MADV_HUGEPAGE);
        }
    }
    let base = NonNull::new(start)
        .ok_or_else(|| IoError::Config(format!("cannot allocate a {total}-byte buffer pool")))?;
    Ok((base, len))
}

impl PoolInner {
    fn free_list(&self) -> MutexGuard<'_, Vec<u32>> {
        // A panic while holding this lock cannot leave the Vec half-updated (push and pop
        // are the only operations), so a poisoned lock is still usable.
        self.free
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl fmt::Debug for BufPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufPool")
            .field("id", &self.inner.id)
            .field("buf_size", &self.inner.buf_size)
            .field("count", &self.inner.count)
            .field("available", &self.available())
            .finish()
    }
}

/// One buffer of a [`BufPool`], owned exclusively. Reads fill and writes send the bytes in
/// its *range* (the whole buffer unless narrowed with [`IoBuf::set_range`]). Dropping it
/// returns it to the pool.
pub struct IoBuf {
    pool: Arc<PoolInner>,
    index: u32,
    range: Range<usize>,
}

impl IoBuf {
    /// The buffer's index in its pool (its fixed-buffer index in a registered ring).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The id of the pool this buffer belongs to.
    pub fn pool_id(&self) -> u64 {
        self.pool.id
    }

    /// Full size of the buffer.
    pub fn capacity(&self) -> usize {
        self.pool.buf_size
    }

    /// The part of the buffer that I/O uses.
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// Length of the range.
    pub fn len(&self) -> usize {
        self.range.len()
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }

    /// Narrow (or widen) the part of the buffer that I/O uses. Panics when `range` is
    /// reversed or exceeds the capacity: that is a bug in the caller, not an input error.
    pub fn set_range(&mut self, range: Range<usize>) {
        assert!(
            range.start <= range.end && range.end <= self.pool.buf_size,
            "IoBuf range {range:?} outside the {}-byte buffer",
            self.pool.buf_size
        );
        self.range = range;
    }

    /// Use the first `len` bytes (`set_range(0..len)`).
    pub fn set_len(&mut self, len: usize) {
        self.set_range(0..len);
    }

    /// The bytes in the range.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the range lies inside buffer `index` (checked by set_range), the buffer
        // lies inside the live allocation (kept alive by our Arc), and this handle is the
        // only owner of index `index`, so no mutable alias exists while `&self` is held.
        unsafe { std::slice::from_raw_parts(self.start_ptr(), self.range.len()) }
    }

    /// The bytes in the range, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` guarantees no other reference into this
        // buffer exists for the lifetime of the returned slice.
        unsafe { std::slice::from_raw_parts_mut(self.start_ptr(), self.range.len()) }
    }

    /// Address of the first byte of the range, for handing the buffer to the kernel.
    pub(crate) fn start_ptr(&self) -> *mut u8 {
        let offset = self.index as usize * self.pool.buf_size + self.range.start;
        // SAFETY: index < count and range.start <= buf_size, so the offset is at most the
        // end of the allocation (one-past-the-end is allowed for an empty range).
        unsafe { self.pool.base.as_ptr().add(offset) }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        self.pool.free_list().push(self.index);
    }
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuf")
            .field("pool", &self.pool.id)
            .field("index", &self.index)
            .field("range", &self.range)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_of_a_huge_page_or_more_start_on_one_and_work_either_way() {
        for pages in [Pages::Huge, Pages::Small] {
            let pool = BufPool::with_pages(1 << 20, 3, pages).unwrap();
            if pages == Pages::Huge {
                assert_eq!(pool.region(0).0 as usize % HUGE_PAGE, 0);
            }
            let mut bufs: Vec<IoBuf> = (0..3).map(|_| pool.take().unwrap()).collect();
            for (i, buf) in bufs.iter_mut().enumerate() {
                assert!(buf.as_slice().iter().all(|&byte| byte == 0));
                buf.as_mut_slice().fill(i as u8 + 1);
            }
            for (i, buf) in bufs.iter().enumerate() {
                assert!(buf.as_slice().iter().all(|&byte| byte == i as u8 + 1));
            }
            // Whether the kernel gave huge pages depends on its THP setting and free
            // memory; the figure is read from /proc and never exceeds the pool. Small
            // pages are never huge.
            let huge = pool
                .huge_page_bytes()
                .expect("/proc/self/smaps is readable");
            assert!(
                huge <= 4 << 20,
                "{huge} bytes in huge pages in a 4 MiB mapping"
            );
            if pages == Pages::Small {
                assert_eq!(huge, 0);
            }
        }
    }

    #[test]
    fn buffers_are_aligned_and_disjoint() {
        let pool = BufPool::new(5000, 3).unwrap();
        assert_eq!(pool.buf_size(), 8192);
        let mut bufs: Vec<IoBuf> = std::iter::from_fn(|| pool.take()).collect();
        assert_eq!(bufs.len(), 3);
        assert_eq!(pool.available(), 0);
        for (i, buf) in bufs.iter_mut().enumerate() {
            assert_eq!(buf.start_ptr() as usize % ALIGN, 0);
            buf.as_mut_slice().fill(i as u8 + 1);
        }
        for (i, buf) in bufs.iter().enumerate() {
            assert!(buf.as_slice().iter().all(|&b| b == i as u8 + 1));
        }
    }

    #[test]
    fn dropped_buffers_return_to_the_pool() {
        let pool = BufPool::new(ALIGN, 2).unwrap();
        let a = pool.take().unwrap();
        let _b = pool.take().unwrap();
        assert!(pool.take().is_none());
        drop(a);
        assert_eq!(pool.available(), 1);
        assert!(pool.take().is_some());
    }

    #[test]
    fn ranges_select_part_of_the_buffer() {
        let pool = BufPool::new(ALIGN * 2, 1).unwrap();
        let mut buf = pool.take().unwrap();
        buf.set_range(ALIGN..ALIGN + 10);
        buf.as_mut_slice().fill(7);
        assert_eq!(buf.len(), 10);
        buf.set_len(ALIGN * 2);
        assert_eq!(buf.as_slice()[ALIGN - 1], 0);
        assert_eq!(buf.as_slice()[ALIGN], 7);
    }

    #[test]
    fn absurd_pools_are_refused() {
        assert!(BufPool::new(0, 1).is_err());
        assert!(BufPool::new(1 << 30, 16).is_err());
    }
}
