//! Block I/O engines: io_uring, and a pread/pwrite thread pool used where io_uring is
//! unavailable and as the io_uring engine's oracle in tests.
//!
//! # Using an engine
//!
//! ```no_run
//! use std::sync::Arc;
//! use tidemark_engine::io::{open_engine, open_file, EngineConfig, Op, OpenOptions, Request};
//!
//! # fn main() -> Result<(), tidemark_engine::io::IoError> {
//! let mut engine = open_engine(&EngineConfig { queue_depth: 32, buf_size: 1 << 20, ..Default::default() })?;
//! let (file, _direct) = open_file("disk.img".as_ref(), &OpenOptions::read_only().direct(true))?;
//! let id = engine.add_file(Arc::new(file));
//! let buf = engine.pool().take().expect("a fresh pool has free buffers");
//! engine.submit(Request { op: Op::Read, file: id, offset: 0, buf, user_data: 7 })?;
//! let mut done = Vec::new();
//! engine.reap(1, &mut done)?;
//! let completion = done.pop().expect("reap(1) returns at least one completion");
//! assert_eq!(completion.user_data, 7);
//! println!("read {:?} bytes in {:?}", completion.result, completion.latency);
//! // Dropping `completion.buf` returns the buffer to the pool.
//! # Ok(()) }
//! ```
//!
//! - An engine owns a [`BufPool`] of aligned buffers ([`ALIGN`] bytes, fit for O_DIRECT).
//!   Take an [`IoBuf`] from `engine.pool()`, narrow its range if needed, and move it into
//!   a [`Request`]. The engine owns it while the request is in flight and hands it back in
//!   the [`Completion`]; dropping the `IoBuf` returns it to the pool.
//! - `submit` only queues (at most [`Engine::queue_depth`] requests in flight); `reap(min)`
//!   sends everything queued to the kernel in one batch and waits for at least `min`
//!   completions. Completions arrive in any order; `user_data` is yours to match them.
//!   `latency` is the time from `submit` to the moment the completion was seen.
//! - Reads are complete except at end of file (the threads engine loops; io_uring does
//!   for regular files); a short result means end of file or a short device.
//! - `fsync` is not an engine operation: call `File::sync_all` on the file once the
//!   writes are reaped.
//!
//! [`open_engine`] picks io_uring and falls back to the thread pool (with one warning)
//! when the kernel refuses io_uring; `TIDEMARK_IO_ENGINE=threads|uring` forces a choice.
//!
//! # Where the unsafe is
//!
//! `buf` (the aligned allocation and its slices) and `ring` (registering buffers and
//! pushing SQEs that point into them); plain file syscalls live in [`crate::sys`]. The
//! rule that makes them sound:
//! a buffer in flight is owned by the ring's in-flight table, keyed by the SQE's
//! `user_data`, until its completion is reaped.

#[allow(unsafe_code)]
mod buf;
#[allow(unsafe_code)]
mod ring;
mod threads;
mod uring;

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The file syscalls the copy engine uses; kept here so `io::sys` paths stay valid.
pub use crate::sys::file as sys;
pub use buf::{BufPool, IoBuf, Pages, ALIGN, MAX_POOL_BYTES};
pub use threads::ThreadEngine;
pub use uring::UringEngine;

/// What went wrong in the I/O engine itself (request errors come back in
/// [`Completion::result`]).
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("io_uring: {0}")]
    Uring(io::Error),
    #[error("I/O engine configuration: {0}")]
    Config(String),
    #[error("the engine already has {0} requests in flight; reap before submitting more")]
    QueueFull(usize),
    #[error("file {0:?} was never added to this engine")]
    UnknownFile(FileId),
    #[error("cannot open {path}: {error}")]
    Open { path: String, error: io::Error },
}

/// A file added to an engine with [`Engine::add_file`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId(pub u32);

/// The direction of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Fill the buffer's range from the file at `offset`.
    Read,
    /// Write the buffer's range to the file at `offset`.
    Write,
}

/// One read or write. The buffer's range (see [`IoBuf::set_range`]) is what moves.
#[derive(Debug)]
pub struct Request {
    pub op: Op,
    pub file: FileId,
    pub offset: u64,
    pub buf: IoBuf,
    /// Yours: returned unchanged in the completion.
    pub user_data: u64,
}

/// A finished request, with its buffer given back.
#[derive(Debug)]
pub struct Completion {
    pub user_data: u64,
    pub op: Op,
    pub file: FileId,
    pub offset: u64,
    /// Bytes transferred, or the error the kernel returned.
    pub result: io::Result<usize>,
    pub buf: IoBuf,
    /// From `submit` to the moment the completion was reaped.
    pub latency: Duration,
}

/// Which engine is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    Uring,
    Threads,
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineKind::Uring => "io_uring",
            EngineKind::Threads => "threads",
        })
    }
}

/// Which engine to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    /// io_uring when the kernel allows it, else threads (or `TIDEMARK_IO_ENGINE`).
    #[default]
    Auto,
    Uring,
    Threads,
}

impl std::str::FromStr for EngineChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(EngineChoice::Auto),
            "uring" | "io_uring" | "io-uring" => Ok(EngineChoice::Uring),
            "threads" | "sync" | "pread" => Ok(EngineChoice::Threads),
            other => Err(format!(
                "unknown I/O engine {other:?} (use auto, uring or threads)"
            )),
        }
    }
}

/// How to build an engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub choice: EngineChoice,
    /// Requests in flight at most.
    pub queue_depth: usize,
    /// Size of each pool buffer (rounded up to [`ALIGN`]).
    pub buf_size: usize,
    /// Buffers in the pool; 0 means one per queue slot.
    pub buf_count: usize,
    /// Worker threads of the thread-pool engine; 0 means `min(queue_depth, 16)`.
    pub threads: usize,
    /// The engine will be used from one thread only (the first that submits): a job run
    /// inside one function call, a benchmark loop. io_uring then defers completion work
    /// until that thread waits (`IORING_SETUP_SINGLE_ISSUER | DEFER_TASKRUN`, kernel
    /// 6.1+), which saves a task-work wakeup per completion; using the engine from
    /// another thread is refused with an error. Leave it off for an engine that may move
    /// between threads (one held across `await`s).
    pub single_thread: bool,
    /// The pages behind the buffer pool (huge where the kernel gives them, by default).
    pub pages: Pages,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            choice: EngineChoice::Auto,
            queue_depth: 32,
            buf_size: 1 << 20,
            buf_count: 0,
            threads: 0,
            single_thread: false,
            pages: Pages::Huge,
        }
    }
}

/// The interface both engines implement. See the module docs for the protocol.
pub trait Engine: Send + fmt::Debug {
    fn kind(&self) -> EngineKind;
    /// The engine's buffers; take them from here for the fastest (registered) path.
    fn pool(&self) -> &BufPool;
    /// Make `file` addressable by requests. The engine keeps it open while it lives.
    fn add_file(&mut self, file: Arc<File>) -> FileId;
    /// A file added earlier.
    fn file(&self, id: FileId) -> Option<&Arc<File>>;
    /// Requests that may be in flight at once.
    fn queue_depth(&self) -> usize;
    /// Requests submitted and not yet reaped.
    fn in_flight(&self) -> usize;
    /// Queue a request; fails with [`IoError::QueueFull`] when `queue_depth` requests are
    /// already in flight (the request's buffer then returns to its pool).
    fn submit(&mut self, request: Request) -> Result<(), IoError>;
    /// Start everything queued and append at least `min` completions (fewer only when
    /// fewer are in flight) to `out`, plus any others already finished. Returns how many
    /// were appended.
    fn reap(&mut self, min: usize, out: &mut Vec<Completion>) -> Result<usize, IoError>;
}

static FALLBACK_SAID: AtomicBool = AtomicBool::new(false);

/// Build the engine `config` asks for. With [`EngineChoice::Auto`], io_uring is tried
/// first and the thread pool is used (said once, as a warning) when it is unavailable.
pub fn open_engine(config: &EngineConfig) -> Result<Box<dyn Engine>, IoError> {
    let depth = config.queue_depth.clamp(1, 4096);
    let count = if config.buf_count == 0 {
        depth
    } else {
        config.buf_count
    };
    let pool = BufPool::with_pages(config.buf_size, count, config.pages)?;
    let threads = if config.threads == 0 {
        depth.min(16)
    } else {
        config.threads
    };
    let choice = match (config.choice, std::env::var("TIDEMARK_IO_ENGINE")) {
        (EngineChoice::Auto, Ok(forced)) => forced.parse().map_err(IoError::Config)?,
        (choice, _) => choice,
    };
    match choice {
        EngineChoice::Uring => Ok(Box::new(UringEngine::with_options(
            depth,
            pool,
            config.single_thread,
        )?)),
        EngineChoice::Threads => Ok(Box::new(ThreadEngine::new(depth, threads, pool)?)),
        EngineChoice::Auto => {
            match UringEngine::with_options(depth, pool.clone(), config.single_thread) {
                Ok(engine) => Ok(Box::new(engine)),
                Err(err) => {
                    if !FALLBACK_SAID.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            "io_uring is unavailable ({err}); using the pread/pwrite thread pool"
                        );
                    }
                    Ok(Box::new(ThreadEngine::new(depth, threads, pool)?))
                }
            }
        }
    }
}

/// How to open a file for an engine.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    pub write: bool,
    pub create: bool,
    pub truncate: bool,
    /// Ask for O_DIRECT; falls back to buffered I/O when the file system refuses it.
    pub direct: bool,
}

impl OpenOptions {
    pub fn read_only() -> Self {
        OpenOptions::default()
    }

    pub fn read_write() -> Self {
        OpenOptions {
            write: true,
            ..OpenOptions::default()
        }
    }

    pub fn direct(mut self, direct: bool) -> Self {
        self.direct = direct;
        self
    }
}

static BUFFERED_SAID: AtomicBool = AtomicBool::new(false);

/// Open `path` as `options` asks. Returns the file and whether it really is O_DIRECT: a
/// file system that refuses O_DIRECT (tmpfs, some FUSE) gets buffered I/O, said once.
pub fn open_file(path: &Path, options: &OpenOptions) -> Result<(File, bool), IoError> {
    let open = |direct: bool| {
        let mut std_options = std::fs::OpenOptions::new();
        std_options
            .read(true)
            .write(options.write)
            .create(options.create)
            .truncate(options.truncate);
        if direct {
            std_options.custom_flags(libc::O_DIRECT);
        }
        std_options.open(path)
    };
    let failed = |error| IoError::Open {
        path: path.display().to_string(),
        error,
    };
    if options.direct {
        match open(true) {
            Ok(file) => return Ok((file, true)),
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
                if !BUFFERED_SAID.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "{} does not allow O_DIRECT; using buffered I/O for it",
                        path.display()
                    );
                }
            }
            Err(err) => return Err(failed(err)),
        }
    }
    open(false).map(|file| (file, false)).map_err(failed)
}

#[cfg(test)]
mod tests;
