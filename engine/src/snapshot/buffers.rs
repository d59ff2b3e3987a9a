//! The copy buffers of one snapshot: old contents on their way to the COW store, in
//! aligned, huge-page-backed memory kept for reuse.

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
    bufs: Vec<IoBuf>,
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
        self.bufs.push(buf);
        true
    }
}

impl BufPool {
    /// A buffer of at least `len` aligned bytes (the smallest fitting one kept), its range
    /// set to `len` bytes.
    pub(super) fn take(&self, len: usize) -> io::Result<IoBuf> {
        let mut free = lock(&self.free);
        let best = free
            .bufs
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        let mut buf = match best {
            Some(i) => {
                let buf = free.bufs.swap_remove(i);
                free.bytes -= buf.capacity();
                buf
            }
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
