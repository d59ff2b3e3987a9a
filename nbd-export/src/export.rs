//! The export trait: what the server needs of a disk to serve it.
//!
//! Methods are synchronous and may block (a file read, an fsync, a copy-before-write);
//! the server calls them from blocking worker threads, never from the async reactor.
//! Offsets and lengths are already bounds-checked by the server against [`Export::size`]
//! when a method is called; implementations may still refuse with an [`ExportError`].

use std::fmt;
use std::io;

/// The NBD errno values a command may fail with (doc/proto.md, "Error values").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Errno {
    /// EPERM: the operation is not permitted (a write to a read-only export).
    Perm,
    /// EIO: an I/O error on the backing store.
    Io,
    /// ENOMEM: the server ran out of memory for this request.
    NoMem,
    /// EINVAL: the request is invalid (bad flags, bad alignment, bad context).
    Inval,
    /// ENOSPC: the backing store is out of space.
    NoSpc,
    /// EOVERFLOW: the reply would be too large (a DF read over a hole boundary).
    Overflow,
    /// ENOTSUP: the export does not support this operation (a FAST_ZERO that is not fast).
    NotSup,
    /// ESHUTDOWN: the server is shutting down.
    Shutdown,
}

impl Errno {
    /// The value sent on the wire.
    pub fn code(self) -> u32 {
        match self {
            Errno::Perm => 1,
            Errno::Io => 5,
            Errno::NoMem => 12,
            Errno::Inval => 22,
            Errno::NoSpc => 28,
            Errno::Overflow => 75,
            Errno::NotSup => 95,
            Errno::Shutdown => 108,
        }
    }
}

/// A failed export operation: the errno the client sees and a message for the log.
#[derive(Debug)]
pub struct ExportError {
    /// What the client is told.
    pub errno: Errno,
    /// What the server logs (and sends as structured error text when it can).
    pub message: String,
}

impl ExportError {
    /// An error with the given errno and message.
    pub fn new(errno: Errno, message: impl Into<String>) -> Self {
        ExportError {
            errno,
            message: message.into(),
        }
    }
}

impl fmt::Display for ExportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:?})", self.message, self.errno)
    }
}

impl std::error::Error for ExportError {}

impl From<io::Error> for ExportError {
    fn from(err: io::Error) -> Self {
        let errno = match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => Errno::NoSpc,
            Some(libc::EPERM) | Some(libc::EROFS) | Some(libc::EACCES) => Errno::Perm,
            Some(libc::ENOMEM) => Errno::NoMem,
            Some(libc::EOPNOTSUPP) => Errno::NotSup,
            _ => Errno::Io,
        };
        ExportError {
            errno,
            message: err.to_string(),
        }
    }
}

/// Result of an export operation.
pub type ExportResult<T> = Result<T, ExportError>;

/// Which optional operations an export supports; the server derives the transmission
/// flags it advertises from this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Writes, trims and write-zeroes are refused with EPERM.
    pub read_only: bool,
    /// FLUSH and FUA are meaningful (advertise SEND_FLUSH and SEND_FUA).
    pub flush: bool,
    /// TRIM is supported. On a read-only export too it is then advertised and accepted:
    /// there it may only release resources, never change what reads return until then
    /// (a backup's snapshot frees the COW space of ranges its client is done with).
    pub trim: bool,
    /// WRITE_ZEROES is supported.
    pub write_zeroes: bool,
    /// WRITE_ZEROES with FAST_ZERO can be honoured (fail with ENOTSUP when not fast).
    pub fast_zero: bool,
    /// CACHE (prefetch) is supported.
    pub cache: bool,
    /// Several connections may share the export safely (a flush on one connection
    /// covers writes completed on all of them). Always true for read-only exports.
    pub multi_conn: bool,
    /// The export knows where its holes are (reads may reply OFFSET_HOLE).
    pub knows_holes: bool,
}

/// Flags of a WRITE_ZEROES request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Force unit access: the zeroes are durable before the reply.
    pub fua: bool,
    /// NO_HOLE: the range must stay allocated (write real zeroes, do not punch).
    pub no_hole: bool,
    /// FAST_ZERO: fail with ENOTSUP rather than fall back to slow writes.
    pub fast: bool,
}

/// A metadata context an export offers for BLOCK_STATUS.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MetaContext {
    /// `base:allocation`: flags [`STATE_HOLE`] and [`STATE_ZERO`].
    BaseAllocation,
    /// `qemu:dirty-bitmap:NAME`: flag [`STATE_DIRTY`] for blocks changed since NAME.
    DirtyBitmap(String),
}

impl MetaContext {
    /// The context's full name as negotiated on the wire.
    pub fn wire_name(&self) -> String {
        match self {
            MetaContext::BaseAllocation => "base:allocation".to_string(),
            MetaContext::DirtyBitmap(name) => format!("qemu:dirty-bitmap:{name}"),
        }
    }
}

/// `base:allocation`: the range is a hole (reads as zero unless STATE_ZERO is clear).
pub const STATE_HOLE: u32 = 1;
/// `base:allocation`: the range reads as zeroes.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:*`: the range changed since the checkpoint.
pub const STATE_DIRTY: u32 = 1;

/// One run of a block-status reply: `length` bytes with the same `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes, never zero.
    pub length: u64,
    /// Context-specific flags (see the `STATE_*` constants).
    pub flags: u32,
}

/// Memory a WRITE payload is read into, lent by the export (see [`Export::payload_pool`]).
/// The server reads the payload from the socket straight into [`PayloadBuf::as_mut_slice`]
/// and passes [`PayloadBuf::as_slice`] to [`Export::write`]; dropping the buffer gives
/// it back to its lender.
pub trait PayloadBuf: Send {
    /// The buffer's bytes (exactly the length asked of [`PayloadPool::take`]).
    fn as_slice(&self) -> &[u8];

    /// The buffer's bytes, writable.
    fn as_mut_slice(&mut self) -> &mut [u8];
}

/// Where one connection's WRITE payload buffers come from.
pub trait PayloadPool: Send + Sync {
    /// A buffer of exactly `len` bytes (1 to [`MAX_PAYLOAD`](crate::proto::MAX_PAYLOAD)),
    /// or `None` to let the server read this payload into memory of its own.
    fn take(&self, len: usize) -> Option<Box<dyn PayloadBuf>>;
}

/// A disk the NBD server can serve.
pub trait Export: Send + Sync + 'static {
    /// Size in bytes; fixed for the life of the export.
    fn size(&self) -> u64;

    /// The optional operations this export supports.
    fn capabilities(&self) -> Capabilities;

    /// A one-line description for NBD_INFO_DESCRIPTION (empty to send none).
    fn description(&self) -> String {
        String::new()
    }

    /// Fill `buf` with the bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> ExportResult<()>;

    /// A file (or block device) holding exactly the export's bytes at the same offsets,
    /// if there is one: the server then sends READ data straight from it with
    /// sendfile(2) (no copy through a buffer) instead of calling [`Export::read`].
    /// Exports that translate offsets, decrypt or assemble data return `None`.
    fn backing_file(&self) -> Option<&std::fs::File> {
        None
    }

    /// Write `data` at `offset`; with `fua` it is durable before this returns.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> ExportResult<()>;

    /// Buffers for the WRITE payloads of one connection, which holds at most `in_flight`
    /// of them at once; asked once per connection. An export whose writes go to O_DIRECT
    /// lends aligned memory (in huge pages, so a large write reaches the device in few
    /// segments and needs no bounce copy). `None` (the default): the server's own buffers.
    fn payload_pool(&self, _in_flight: usize) -> Option<Box<dyn PayloadPool>> {
        None
    }

    /// Make every completed write durable.
    fn flush(&self) -> ExportResult<()>;

    /// Discard `len` bytes at `offset` (contents afterwards are unspecified).
    fn trim(&self, offset: u64, len: u64, fua: bool) -> ExportResult<()>;

    /// Make `len` bytes at `offset` read as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> ExportResult<()>;

    /// Prefetch `len` bytes at `offset` into a cache; a no-op is a valid implementation.
    fn cache(&self, _offset: u64, _len: u64) -> ExportResult<()> {
        Ok(())
    }

    /// The contexts this export offers besides `base:allocation`, which every export has.
    fn dirty_bitmaps(&self) -> Vec<String> {
        Vec::new()
    }

    /// Extents describing `[offset, offset + len)` in `context`, in order, starting at
    /// `offset`. They may cover less than `len` (never zero bytes) or run past it; the
    /// server trims, merges neighbours and re-queries as the protocol requires.
    fn block_status(
        &self,
        context: &MetaContext,
        offset: u64,
        len: u64,
    ) -> ExportResult<Vec<Extent>>;
}
