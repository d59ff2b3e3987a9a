//! The io_uring engine: requests go through a [`Ring`] with the engine's buffer pool
//! registered, many in flight, submitted in batches when the caller reaps.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use super::ring::{Reaped, Ring, RingOp};
use super::{BufPool, Completion, Engine, EngineKind, FileId, IoError, Op, Request};

struct Tag {
    user_data: u64,
    op: Op,
    file: FileId,
    offset: u64,
    submitted: Instant,
}

/// The io_uring engine. Create it with [`super::open_engine`] (or [`UringEngine::new`]).
#[derive(Debug)]
pub struct UringEngine {
    ring: Ring<Tag>,
    pool: BufPool,
    files: Vec<Arc<File>>,
}

impl std::fmt::Debug for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}@{}", self.op, self.offset)
    }
}

impl UringEngine {
    /// An engine with `depth` requests in flight, drawing buffers from `pool` (registered
    /// as fixed buffers when the kernel allows it).
    pub fn new(depth: usize, pool: BufPool) -> Result<UringEngine, IoError> {
        UringEngine::with_options(depth, pool, false)
    }

    /// Like [`UringEngine::new`]; `single_thread` promises that only one thread will use
    /// the engine (the first to submit), which lets the kernel defer completion work
    /// until that thread waits (see [`super::EngineConfig::single_thread`]).
    pub fn with_options(
        depth: usize,
        pool: BufPool,
        single_thread: bool,
    ) -> Result<UringEngine, IoError> {
        let ring = Ring::new(depth, &pool, single_thread).map_err(IoError::Uring)?;
        tracing::debug!(?ring, "io_uring engine ready");
        Ok(UringEngine {
            ring,
            pool,
            files: Vec::new(),
        })
    }

    /// Whether the pool is registered with the kernel (fixed-buffer reads and writes).
    pub fn fixed_buffers(&self) -> bool {
        self.ring.fixed_buffers()
    }

    /// Whether completions are posted only when the owning thread waits
    /// (`IORING_SETUP_DEFER_TASKRUN`, for single-thread engines).
    pub fn deferred_taskrun(&self) -> bool {
        self.ring.deferred_taskrun()
    }

    /// Whether the kernel refuses every opcode but the four this engine uses.
    pub fn restricted(&self) -> bool {
        self.ring.restricted()
    }
}

impl Engine for UringEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Uring
    }

    fn pool(&self) -> &BufPool {
        &self.pool
    }

    fn add_file(&mut self, file: Arc<File>) -> FileId {
        self.files.push(file);
        FileId(self.files.len() as u32 - 1)
    }

    fn file(&self, id: FileId) -> Option<&Arc<File>> {
        self.files.get(id.0 as usize)
    }

    fn queue_depth(&self) -> usize {
        self.ring.capacity()
    }

    fn in_flight(&self) -> usize {
        self.ring.in_flight()
    }

    fn submit(&mut self, request: Request) -> Result<(), IoError> {
        let Some(file) = self.files.get(request.file.0 as usize) else {
            return Err(IoError::UnknownFile(request.file));
        };
        if u32::try_from(request.buf.len()).is_err() {
            return Err(IoError::Config(
                "a request must be smaller than 4 GiB".into(),
            ));
        }
        let fd = file.as_raw_fd();
        let op = match request.op {
            Op::Read => RingOp::Read,
            Op::Write => RingOp::Write,
        };
        let tag = Tag {
            user_data: request.user_data,
            op: request.op,
            file: request.file,
            offset: request.offset,
            submitted: Instant::now(),
        };
        self.ring
            .push(op, fd, request.offset, request.buf, tag)
            .map_err(|(err, _buf, _tag)| {
                if err.kind() == io::ErrorKind::WouldBlock {
                    IoError::QueueFull(self.ring.capacity())
                } else {
                    IoError::Uring(err)
                }
            })
    }

    fn reap(&mut self, min: usize, out: &mut Vec<Completion>) -> Result<usize, IoError> {
        self.ring.submit_and_wait(min).map_err(IoError::Uring)?;
        let before = out.len();
        loop {
            let now = Instant::now();
            self.ring.reap(|Reaped { tag, result, buf }| {
                out.push(Completion {
                    user_data: tag.user_data,
                    op: tag.op,
                    file: tag.file,
                    offset: tag.offset,
                    result: if result < 0 {
                        Err(io::Error::from_raw_os_error(-result))
                    } else {
                        Ok(result as usize)
                    },
                    buf,
                    latency: now.saturating_duration_since(tag.submitted),
                });
            });
            // submit_and_wait(min) can return before `min` CQEs are visible when a wait
            // is interrupted; wait again for the rest.
            let got = out.len() - before;
            if got >= min.min(got + self.ring.in_flight()) {
                return Ok(got);
            }
            self.ring.submit_and_wait(1).map_err(IoError::Uring)?;
        }
    }
}
