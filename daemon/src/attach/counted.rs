//! The export a front end serves: the attached export with I/O counters, and read-only
//! enforced when the attachment asks for it even if the export itself is writable.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tidemark_nbd::export::{
    Capabilities, Errno, Export, ExportError, ExportResult, Extent, MetaContext, PayloadPool,
    ZeroFlags,
};

use super::IoStats;

/// Live counters behind [`IoStats`].
#[derive(Debug, Default)]
pub struct IoCounters {
    reads: AtomicU64,
    read_bytes: AtomicU64,
    writes: AtomicU64,
    write_bytes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    discard_bytes: AtomicU64,
    errors: AtomicU64,
}

impl IoCounters {
    /// The counters now.
    pub fn snapshot(&self) -> IoStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        IoStats {
            reads: get(&self.reads),
            read_bytes: get(&self.read_bytes),
            writes: get(&self.writes),
            write_bytes: get(&self.write_bytes),
            flushes: get(&self.flushes),
            discards: get(&self.discards),
            discard_bytes: get(&self.discard_bytes),
            errors: get(&self.errors),
        }
    }

    fn count<T>(
        &self,
        ops: &AtomicU64,
        bytes: Option<(&AtomicU64, u64)>,
        r: ExportResult<T>,
    ) -> ExportResult<T> {
        ops.fetch_add(1, Ordering::Relaxed);
        match &r {
            Ok(_) => {
                if let Some((counter, n)) = bytes {
                    counter.fetch_add(n, Ordering::Relaxed);
                }
            }
            Err(_) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }
}

/// An export as a front end serves it: counted, and read-only if the attachment is.
pub struct Counted {
    inner: Arc<dyn Export>,
    read_only: bool,
    counters: Arc<IoCounters>,
}

impl std::fmt::Debug for Counted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counted")
            .field("size", &self.inner.size())
            .field("read_only", &self.read_only)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl Counted {
    /// Wrap `inner`; with `read_only` every write, trim and write-zeroes gets EPERM.
    pub fn new(inner: Arc<dyn Export>, read_only: bool) -> Counted {
        let read_only = read_only || inner.capabilities().read_only;
        Counted {
            inner,
            read_only,
            counters: Arc::default(),
        }
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The counters, shared.
    pub fn counters(&self) -> Arc<IoCounters> {
        self.counters.clone()
    }

    fn writable(&self) -> ExportResult<()> {
        if self.read_only {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            return Err(ExportError::new(Errno::Perm, "the attachment is read-only"));
        }
        Ok(())
    }
}

impl Export for Counted {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn capabilities(&self) -> Capabilities {
        let caps = self.inner.capabilities();
        Capabilities {
            read_only: self.read_only,
            multi_conn: caps.multi_conn || self.read_only,
            ..caps
        }
    }

    fn description(&self) -> String {
        self.inner.description()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> ExportResult<()> {
        let c = &self.counters;
        let len = buf.len() as u64;
        c.count(
            &c.reads,
            Some((&c.read_bytes, len)),
            self.inner.read(offset, buf),
        )
    }

    fn backing_file(&self) -> Option<&File> {
        self.inner.backing_file()
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> ExportResult<()> {
        self.writable()?;
        let c = &self.counters;
        let len = data.len() as u64;
        c.count(
            &c.writes,
            Some((&c.write_bytes, len)),
            self.inner.write(offset, data, fua),
        )
    }

    fn payload_pool(&self, in_flight: usize) -> Option<Box<dyn PayloadPool>> {
        self.inner.payload_pool(in_flight)
    }

    fn flush(&self) -> ExportResult<()> {
        let c = &self.counters;
        c.count(&c.flushes, None, self.inner.flush())
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> ExportResult<()> {
        self.writable()?;
        let c = &self.counters;
        c.count(
            &c.discards,
            Some((&c.discard_bytes, len)),
            self.inner.trim(offset, len, fua),
        )
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> ExportResult<()> {
        self.writable()?;
        let c = &self.counters;
        let done = self.inner.write_zeroes(offset, len, flags);
        c.count(&c.discards, Some((&c.discard_bytes, len)), done)
    }

    fn cache(&self, offset: u64, len: u64) -> ExportResult<()> {
        self.inner.cache(offset, len)
    }

    fn dirty_bitmaps(&self) -> Vec<String> {
        self.inner.dirty_bitmaps()
    }

    fn block_status(
        &self,
        context: &MetaContext,
        offset: u64,
        len: u64,
    ) -> ExportResult<Vec<Extent>> {
        self.inner.block_status(context, offset, len)
    }
}
