//! The copy buffers of one snapshot: old contents on their way to the COW store, in
//! aligned, huge-page-backed memory kept for reuse.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use super::lock;
use crate::io::{BufPool as PagePool, IoBuf};

/// Old contents of a run of chunks, read from the volume, on their way to the store.
/// Its buffer goes back to the snapshot's pool when the last reference is dropped.
#[derive(Debug)]
pub(super) struct CopyBuf {
    /// Always `Some` until dropped (then back to the pool); its range is the copied bytes.
    pub(super) buf: Option<IoBuf>,
    pub(super) pool: Arc<BufPool>,
}

impl CopyBuf {
    pub(super) fn bytes(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], IoBuf::as_slice)
    }

    pub(super) fn len(&self) -> u64 {
        self.bytes().len() as u64
    }
}

impl Drop for CopyBuf {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.pool.put(buf);
        }
    }
}

/// Copy buffers kept for reuse: fresh memory costs a page fault per page, which a
/// stream of 64 KiB copies pays over and over. Buffers are the I/O engine's aligned,
/// mmap'd memory, made [`SLAB`] bytes at a time (one buffer of a larger size), so that
/// they sit in transparent huge pages: a run of old chunks then reaches the disk as one
/// segment instead of one per 4 KiB page (on a virtio disk without indirect descriptors a
/// 1 MiB read in 4 KiB pages fills the whole queue; see `io::Pages`).
#[derive(Debug, Default)]
pub(super) struct BufPool {
    free: Mutex<FreeBufs>,
}

#[derive(Debug, Default)]
struct FreeBufs {
    /// Kept buffers by capacity: `take` finds the smallest fitting one without walking
    /// thousands of 4 KiB buffers (the pool holds up to [`MAX_POOLED`] bytes of them).
    bufs: BTreeMap<usize, Vec<IoBuf>>,
    /// Capacity of `bufs`, summed (kept here: `put` runs for every copy).
    bytes: usize,
}

impl FreeBufs {
    /// Keep `buf` unless that would hold more than [`MAX_POOLED`] bytes; say whether it did.
    fn keep(&mut self, buf: IoBuf) -> bool {
        if self.bytes + buf.capacity() > MAX_POOLED {
            return false;
        }
        self.bytes += buf.capacity();
        self.bufs.entry(buf.capacity()).or_default().push(buf);
        true
    }

    /// The smallest kept buffer of at least `len` bytes.
    fn take(&mut self, len: usize) -> Option<IoBuf> {
        let mut sizes = self.bufs.range_mut(len..);
        let (&capacity, list) = sizes.next()?;
        let buf = list.pop();
        if list.is_empty() {
            self.bufs.remove(&capacity);
        }
        let buf = buf?;
        self.bytes -= buf.capacity();
        Some(buf)
    }
}

impl BufPool {
    /// A buffer of at least `len` aligned bytes (the smallest fitting one kept), its range
    /// set to `len` bytes.
    pub(super) fn take(&self, len: usize) -> io::Result<IoBuf> {
        let mut free = lock(&self.free);
        let mut buf = match free.take(len) {
            Some(buf) => buf,
            None => {
                let size = len.next_power_of_two();
                let slab = PagePool::new(size, (SLAB / size).max(1))
                    .map_err(|err| io::Error::other(err.to_string()))?;
                let buf = slab
                    .take()
                    .ok_or_else(|| io::Error::other("a new buffer slab had no buffer"))?;
                // The rest of the slab waits in the free list (or, above MAX_POOLED, unused
                // in the slab until its last buffer is dropped).
                while let Some(spare) = slab.take() {
                    if !free.keep(spare) {
                        break;
                    }
                }
                buf
            }
        };
        buf.set_len(len);
        Ok(buf)
    }

    pub(super) fn put(&self, buf: IoBuf) {
        lock(&self.free).keep(buf);
    }
}

/// Bytes of copy buffers kept for reuse per snapshot.
const MAX_POOLED: usize = 16 << 20;
/// Copy buffers are made this many bytes at a time: one transparent huge page.
const SLAB: usize = 2 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    fn kept_bytes(pool: &BufPool) -> usize {
        let free = lock(&pool.free);
        let counted: usize = free.bufs.values().flatten().map(IoBuf::capacity).sum();
        assert_eq!(counted, free.bytes, "the kept bytes are counted exactly");
        counted
    }

    /// `take` hands out the smallest kept buffer that fits, whatever order they were
    /// kept in, and the pool's byte count follows every take and put.
    #[test]
    fn take_hands_out_the_smallest_kept_buffer_that_fits() {
        let pool = BufPool::default();
        let small = pool.take(4096).unwrap();
        let big = pool.take(64 << 10).unwrap();
        assert_eq!((big.capacity(), small.capacity()), (64 << 10, 4096));
        // Both slabs' spares are kept: 31 of 64 KiB and 511 of 4 KiB.
        assert_eq!(kept_bytes(&pool), 31 * (64 << 10) + 511 * 4096);
        pool.put(small);
        pool.put(big);
        let again = pool.take(3000).unwrap();
        assert_eq!(again.capacity(), 4096);
        assert_eq!(again.as_slice().len(), 3000);
        let mid = pool.take(5000).unwrap();
        assert_eq!(mid.capacity(), 64 << 10, "no 8 KiB buffer is kept");
        assert_eq!(kept_bytes(&pool), 31 * (64 << 10) + 511 * 4096);
    }
}
