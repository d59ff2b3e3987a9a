//! A directory repository's ranged reads (the pack reads of `repo restore`, `repo export` and
//! `repo verify --read-data`) with O_DIRECT into reused buffers.
//!
//! object_store's LocalFileSystem reads a range through the page cache into a fresh buffer.
//! For pack reads both are wasted work: a pack's bytes are read once, checked, inflated and
//! dropped, yet each read fills page-cache pages and then copies them into a buffer whose
//! pages fault in again (on a VM that hands free memory back to its host, fresh pages cost
//! about a second of CPU per GiB). [`DirectRanges`] wraps LocalFileSystem: writes, listings,
//! deletes and whole-object reads (config, indexes) go to it unchanged; a ranged read opens
//! the file with O_DIRECT, reads the range rounded out to [`ALIGN`] into an aligned buffer
//! from a small pool, and hands out the requested bytes as a [`Bytes`] view whose drop gives
//! the buffer back to the pool. Where the filesystem refuses O_DIRECT (tmpfs, some FUSE and
//! network filesystems: EINVAL at open or read) the read is done again buffered, into a
//! pooled buffer as well, and the store reads buffered from then on.
//!
//! O_DIRECT reads see what buffered writes wrote: the kernel writes back dirty pages of the
//! range before reading it, and a pack is whole before it is renamed into place.

use std::fmt;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

/// Alignment of an O_DIRECT read's file offset, length and memory: the page size, a multiple
/// of every logical block size in use.
pub const ALIGN: u64 = 4096;

/// Pooled buffers are multiples of this, so one buffer serves reads of similar sizes.
const GRAIN: usize = 1 << 20;

/// Most bytes of idle buffers the pool keeps: a restore's runs in flight (4 of up to 16 MiB).
const POOL_BYTES: usize = 64 << 20;

/// Memory for reads, handed back when the last view of a read is dropped.
#[derive(Default)]
struct Pool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pool({} idle bytes)", self.idle_bytes())
    }
}

impl Pool {
    /// A buffer of at least `len` bytes: the smallest idle one that fits, else a new one.
    fn take(&self, len: usize) -> Vec<u8> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let fits = free
            .iter()
            .enumerate()
            .filter(|(_, buf)| buf.len() >= len)
            .min_by_key(|(_, buf)| buf.len())
            .map(|(at, _)| at);
        match fits {
            Some(at) => free.swap_remove(at),
            None => {
                drop(free);
                vec![0; len.div_ceil(GRAIN).max(1) * GRAIN]
            }
        }
    }

    /// Keep `buf` for a later read; past [`POOL_BYTES`] the smallest idle buffers go.
    fn give(&self, buf: Vec<u8>) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.push(buf);
        let mut held: usize = free.iter().map(Vec::len).sum();
        while held > POOL_BYTES {
            let Some(smallest) = free
                .iter()
                .enumerate()
                .min_by_key(|(_, buf)| buf.len())
                .map(|(at, _)| at)
            else {
                break;
            };
            held -= free.swap_remove(smallest).len();
        }
    }

    fn idle_bytes(&self) -> usize {
        let free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.iter().map(Vec::len).sum()
    }
}

/// A pooled buffer behind a [`Bytes`]: back to the pool when the last view is dropped.
struct Pooled {
    buf: Vec<u8>,
    pool: Arc<Pool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

/// LocalFileSystem with ranged reads by O_DIRECT into pooled buffers (see the module doc).
#[derive(Debug)]
pub struct DirectRanges {
    fs: Arc<LocalFileSystem>,
    pool: Arc<Pool>,
    /// Cleared once the filesystem refuses O_DIRECT: buffered reads from then on.
    direct: Arc<AtomicBool>,
}

impl fmt::Display for DirectRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DirectRanges({})", self.fs)
    }
}

impl DirectRanges {
    pub fn new(fs: LocalFileSystem) -> DirectRanges {
        DirectRanges {
            fs: Arc::new(fs),
            pool: Arc::default(),
            direct: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Whether ranged reads still use O_DIRECT (false once the filesystem refused it).
    pub fn reads_direct(&self) -> bool {
        self.direct.load(Ordering::Relaxed)
    }

    /// Bytes of idle read buffers kept for reuse.
    pub fn idle_buffer_bytes(&self) -> usize {
        self.pool.idle_bytes()
    }

    /// Read `ranges` of the object at `location` on the blocking pool, opening it once.
    async fn read_ranges(
        &self,
        location: &Path,
        ranges: Vec<Range<u64>>,
    ) -> object_store::Result<Vec<Bytes>> {
        let path = self.fs.path_to_filesystem(location)?;
        let (pool, direct) = (Arc::clone(&self.pool), Arc::clone(&self.direct));
        let location = location.to_string();
        tokio::task::spawn_blocking(move || -> object_store::Result<Vec<Bytes>> {
            let mut file = open(&path, &direct).map_err(|e| store_error(&location, e))?;
            let len = file
                .metadata()
                .map_err(|e| store_error(&location, e))?
                .len();
            ranges
                .into_iter()
                .map(|range| {
                    read_range(&mut file, &path, len, range.clone(), &pool, &direct).map_err(|e| {
                        let what = format!("bytes {}..{} of {location}", range.start, range.end);
                        store_error(&what, e)
                    })
                })
                .collect()
        })
        .await?
    }
}

/// The file at `path`, with O_DIRECT while `direct` holds and the filesystem allows it.
fn open(path: &std::path::Path, direct: &AtomicBool) -> io::Result<File> {
    if direct.load(Ordering::Relaxed) {
        match File::options()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::debug!(
                    "{}: O_DIRECT refused ({e}); reading buffered",
                    path.display()
                );
                direct.store(false, Ordering::Relaxed);
            }
            opened => return opened,
        }
    }
    File::open(path)
}

/// Bytes `range` of `file` (`len` bytes long; a range past its end is cut at the end, as
/// LocalFileSystem does; one starting at or past the end is an error).
fn read_range(
    file: &mut File,
    path: &std::path::Path,
    len: u64,
    range: Range<u64>,
    pool: &Arc<Pool>,
    direct: &AtomicBool,
) -> io::Result<Bytes> {
    if range.start > range.end || range.start >= len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the range does not lie in the file's {len} bytes"),
        ));
    }
    let range = range.start..range.end.min(len);
    if direct.load(Ordering::Relaxed) {
        match read_aligned(file, &range, pool) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::debug!(
                    "{}: O_DIRECT read refused ({e}); reading buffered",
                    path.display()
                );
                direct.store(false, Ordering::Relaxed);
                *file = File::open(path)?;
            }
            read => return read,
        }
    }
    let want = (range.end - range.start) as usize;
    let mut buf = pool.take(want);
    file.read_exact_at(&mut buf[..want], range.start)?;
    Ok(Bytes::from_owner(Pooled {
        buf,
        pool: Arc::clone(pool),
    })
    .slice(..want))
}

/// `range` read with O_DIRECT: the aligned span around it into an aligned part of a pooled
/// buffer, then a view of the bytes asked for.
fn read_aligned(file: &File, range: &Range<u64>, pool: &Arc<Pool>) -> io::Result<Bytes> {
    let from = range.start / ALIGN * ALIGN;
    let to = range.end.div_ceil(ALIGN) * ALIGN;
    let span = (to - from) as usize;
    let mut buf = pool.take(span + ALIGN as usize);
    let skew = buf.as_ptr().align_offset(ALIGN as usize);
    if skew >= ALIGN as usize {
        return Err(io::Error::other("no aligned address in the read buffer"));
    }
    // The last block may end past the file's end: reads stop there, short of `span`.
    let needed = (range.end - from) as usize;
    let mut done = 0;
    while done < needed {
        let got = file.read_at(&mut buf[skew + done..skew + span], from + done as u64)?;
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the file ended {done} bytes after offset {from}"),
            ));
        }
        done += got;
    }
    let at = skew + (range.start - from) as usize;
    Ok(Bytes::from_owner(Pooled {
        buf,
        pool: Arc::clone(pool),
    })
    .slice(at..at + (range.end - range.start) as usize))
}

fn store_error(what: &str, e: io::Error) -> object_store::Error {
    match e.kind() {
        io::ErrorKind::NotFound => object_store::Error::NotFound {
            path: what.to_string(),
            source: Box::new(e),
        },
        _ => object_store::Error::Generic {
            store: "LocalFileSystem",
            source: format!("reading {what}: {e}").into(),
        },
    }
}

#[async_trait]
impl ObjectStore for DirectRanges {
    async fn get_range(&self, location: &Path, range: Range<u64>) -> object_store::Result<Bytes> {
        let mut read = self.read_ranges(location, vec![range]).await?;
        Ok(read.pop().unwrap_or_default())
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        self.read_ranges(location, ranges.to_vec()).await
    }

    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.fs.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.fs.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.fs.get_opts(location, options).await
    }

    async fn head(&self, location: &Path) -> object_store::Result<ObjectMeta> {
        self.fs.head(location).await
    }

    async fn delete(&self, location: &Path) -> object_store::Result<()> {
        self.fs.delete(location).await
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.fs.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.fs.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.fs.list_with_delimiter(prefix).await
    }

    async fn copy(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.fs.copy(from, to).await
    }

    async fn rename(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.fs.rename(from, to).await
    }

    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.fs.copy_if_not_exists(from, to).await
    }

    async fn rename_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.fs.rename_if_not_exists(from, to).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `len` patterned bytes at `dir/data/f` and both stores over `dir`.
    fn stores(dir: &std::path::Path, len: usize) -> (Vec<u8>, DirectRanges, LocalFileSystem) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        std::fs::create_dir_all(dir.join("data")).unwrap();
        std::fs::write(dir.join("data/f"), &data).unwrap();
        let direct = DirectRanges::new(LocalFileSystem::new_with_prefix(dir).unwrap());
        (data, direct, LocalFileSystem::new_with_prefix(dir).unwrap())
    }

    /// Whether `dir`'s filesystem opens files with O_DIRECT (tmpfs does not).
    fn takes_o_direct(dir: &std::path::Path) -> bool {
        File::options()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(dir.join("data/f"))
            .is_ok()
    }

    /// Ranges at and off block boundaries, inside one block, across many, at the file's end
    /// and past it: each equals LocalFileSystem's read (the oracle) and the file's bytes.
    fn check_ranges(dir: &std::path::Path) -> DirectRanges {
        let len = 3 * (1 << 20) + 12_345;
        let (data, direct, buffered) = stores(dir, len);
        let rt = crate::test_runtime();
        let path = Path::from("data/f");
        let len = len as u64;
        let ranges = [
            0..1,
            0..4096,
            1..4095,
            4095..4097,
            8192..(2 << 20) + 5,
            100_000..100_001,
            len - 1..len,
            len - 5000..len,
            len - 10..len + 1000,
            0..len,
        ];
        for range in ranges {
            let got = rt.block_on(direct.get_range(&path, range.clone())).unwrap();
            let want = rt
                .block_on(buffered.get_range(&path, range.clone()))
                .unwrap();
            assert_eq!(got, want, "{range:?}");
            let end = (range.end as usize).min(data.len());
            assert_eq!(got, data[range.start as usize..end], "{range:?}");
        }
        let several = rt
            .block_on(direct.get_ranges(&path, &[5..10, 4096..9000, 0..3]))
            .unwrap();
        assert_eq!(several, [&data[5..10], &data[4096..9000], &data[0..3]]);
        for past in [len..len + 1, len + 4096..len + 8192] {
            let err = rt
                .block_on(direct.get_range(&path, past.clone()))
                .unwrap_err();
            assert!(
                err.to_string().contains("does not lie in the file"),
                "{err}"
            );
        }
        let missing = rt
            .block_on(direct.get_range(&Path::from("data/nothing"), 0..10))
            .unwrap_err();
        assert!(
            matches!(missing, object_store::Error::NotFound { .. }),
            "{missing}"
        );
        direct
    }

    #[test]
    fn unaligned_ranges_read_with_o_direct_equal_buffered_reads() {
        let dir = tempfile::tempdir().unwrap();
        let direct = check_ranges(dir.path());
        assert_eq!(direct.reads_direct(), takes_o_direct(dir.path()));
    }

    #[test]
    fn a_file_that_refuses_o_direct_is_opened_buffered_and_later_reads_stay_buffered() {
        // procfs refuses O_DIRECT at open with EINVAL, as tmpfs did before Linux 6.6.
        let direct = AtomicBool::new(true);
        let mut file = open(std::path::Path::new("/proc/self/status"), &direct).unwrap();
        assert!(!direct.load(Ordering::Relaxed));
        let mut text = String::new();
        io::Read::read_to_string(&mut file, &mut text).unwrap();
        assert!(text.contains("Pid:"), "{text}");
        // Once refused, every ranged read is buffered, with the same results.
        let dir = tempfile::tempdir().unwrap();
        let (data, store, _) = stores(dir.path(), 100_000);
        store.direct.store(false, Ordering::Relaxed);
        let rt = crate::test_runtime();
        let got = rt
            .block_on(store.get_range(&Path::from("data/f"), 4095..99_999))
            .unwrap();
        assert_eq!(got, data[4095..99_999]);
        assert!(!store.reads_direct());
    }

    #[test]
    fn a_repository_on_tmpfs_reads_equal() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        check_ranges(dir.path());
    }

    #[test]
    fn read_buffers_go_back_to_the_pool_and_are_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (data, direct, _) = stores(dir.path(), 5 << 20);
        let rt = crate::test_runtime();
        let path = Path::from("data/f");
        let first = rt.block_on(direct.get_range(&path, 10..(2 << 20))).unwrap();
        let view = first.slice(100..200);
        drop(first);
        assert_eq!(
            direct.idle_buffer_bytes(),
            0,
            "a view still holds the buffer"
        );
        assert_eq!(view, data[110..210]);
        drop(view);
        let idle = direct.idle_buffer_bytes();
        assert!(idle >= 2 << 20, "{idle}");
        let again = rt
            .block_on(direct.get_range(&path, 4096..(1 << 20)))
            .unwrap();
        assert_eq!(
            direct.idle_buffer_bytes(),
            0,
            "the idle buffer was not reused"
        );
        assert_eq!(again, data[4096..1 << 20]);
    }

    #[test]
    fn the_pool_keeps_at_most_its_bound() {
        let pool = Pool::default();
        for _ in 0..10 {
            pool.give(vec![0; 16 << 20]);
        }
        assert!(pool.idle_bytes() <= POOL_BYTES, "{}", pool.idle_bytes());
        assert_eq!(pool.take(1 << 20).len(), 16 << 20);
        assert_eq!(pool.take(100 << 20).len(), 100 << 20);
    }
}
