//! The transmission phase on blocking threads: workers take turns reading a request
//! (bounding every length before the payload is read), run it, and write its reply; a
//! request alone on the wire is run by the worker that read it without passing the turn.

use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::command::{error_reply, execute, validate, Reply};
use super::connection::ConnError;
use super::listener::NbdStream;
use super::registry::ExportCounters;
use super::starttls::{Established, TlsReader, TlsWriter};
use crate::export::{Errno, PayloadBuf, PayloadPool};
use crate::negotiate::Session;
use crate::proto::{self, cflags, Command, HeaderMode, Request};
use crate::record::Pending;

/// Recycled payload buffers: every pooled buffer is fully initialised (len == capacity),
/// so handing one out costs neither an allocation nor a memset.
#[derive(Default)]
pub(super) struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
}

const POOL_BUFFERS: usize = 64;

const MIN_BUFFER: usize = 256 * 1024;

impl BufferPool {
    pub(super) fn get(&self, len: usize) -> Vec<u8> {
        let pooled = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match pooled {
            Some(buf) if buf.len() >= len => buf,
            _ => vec![0u8; len.max(MIN_BUFFER)],
        }
    }

    pub(super) fn put(&self, buf: Vec<u8>) {
        if buf.len() < MIN_BUFFER {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < POOL_BUFFERS {
            free.push(buf);
        }
    }
}

/// A WRITE payload: in memory the export lent, or in a buffer of the connection's pool.
pub(super) struct Payload {
    len: usize,
    memory: PayloadMemory,
}

enum PayloadMemory {
    Lent(Box<dyn PayloadBuf>),
    Own(Vec<u8>),
}

impl Payload {
    /// The payload's bytes.
    pub(super) fn bytes(&self) -> &[u8] {
        match &self.memory {
            PayloadMemory::Lent(buf) => &buf.as_slice()[..self.len],
            PayloadMemory::Own(buf) => &buf[..self.len],
        }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        match &mut self.memory {
            PayloadMemory::Lent(buf) => &mut buf.as_mut_slice()[..self.len],
            PayloadMemory::Own(buf) => &mut buf[..self.len],
        }
    }
}

/// Per-connection state shared with the blocking workers.
pub(super) struct Conn {
    pub(super) session: Session,
    pub(super) pool: BufferPool,
    /// The export's memory for WRITE payloads, if it lends any.
    pub(super) payloads: Option<Box<dyn PayloadPool>>,
    /// Where successful READs and WRITEs are counted.
    pub(super) counters: Arc<ExportCounters>,
}

impl Conn {
    /// A buffer for a `len`-byte WRITE payload: the export's if it lends one of that
    /// size, else one of the connection's own.
    fn payload(&self, len: usize) -> Payload {
        let lent = self
            .payloads
            .as_ref()
            .and_then(|payloads| payloads.take(len))
            .filter(|buf| buf.as_slice().len() >= len);
        let memory = match lent {
            Some(buf) => PayloadMemory::Lent(buf),
            None => PayloadMemory::Own(self.pool.get(len)),
        };
        Payload { len, memory }
    }

    /// Give a payload's memory back: to the connection's pool, or to the export that lent it.
    pub(super) fn recycle(&self, payload: Payload) {
        if let PayloadMemory::Own(buf) = payload.memory {
            self.pool.put(buf);
        }
    }
}

/// A connected socket in blocking mode, for the transmission workers.
pub(super) enum SyncSocket {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl SyncSocket {
    pub(super) fn from_tokio(stream: NbdStream) -> io::Result<SyncSocket> {
        let socket = match stream {
            NbdStream::Unix(s) => SyncSocket::Unix(s.into_std()?),
            NbdStream::Tcp(s) => SyncSocket::Tcp(s.into_std()?),
        };
        match &socket {
            SyncSocket::Unix(s) => s.set_nonblocking(false)?,
            SyncSocket::Tcp(s) => s.set_nonblocking(false)?,
        }
        Ok(socket)
    }

    pub(super) fn try_clone(&self) -> io::Result<SyncSocket> {
        Ok(match self {
            SyncSocket::Unix(s) => SyncSocket::Unix(s.try_clone()?),
            SyncSocket::Tcp(s) => SyncSocket::Tcp(s.try_clone()?),
        })
    }

    pub(super) fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        match self {
            SyncSocket::Unix(s) => s.shutdown(how),
            SyncSocket::Tcp(s) => s.shutdown(how),
        }
    }
}

impl AsFd for SyncSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            SyncSocket::Unix(s) => s.as_fd(),
            SyncSocket::Tcp(s) => s.as_fd(),
        }
    }
}

impl io::Read for SyncSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            SyncSocket::Unix(s) => s.read(buf),
            SyncSocket::Tcp(s) => s.read(buf),
        }
    }
}

impl io::Write for SyncSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SyncSocket::Unix(s) => s.write(buf),
            SyncSocket::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How often a stopping connection checks whether it can close.
pub(super) const STOP_POLL: Duration = Duration::from_millis(10);

/// A connection's view of a shutdown, shared by the async monitor and the workers.
#[derive(Default)]
pub(super) struct Stopping {
    /// Set once when the server stops serving the connection: new requests get ESHUTDOWN.
    pub(super) requested: AtomicBool,
    /// An ESHUTDOWN went out: the client must now send NBD_CMD_DISC; wait for it.
    told: AtomicBool,
    /// Workers between taking a request off the wire and finishing its reply.
    busy: AtomicUsize,
    /// The reader waits for a request header with nothing buffered.
    reader_idle: AtomicBool,
    /// Requests taken off the wire so far (the monitor's idle timeout watches it).
    pub(super) requests: AtomicU64,
}

impl Stopping {
    /// Nothing in flight, nothing half-read, and no ESHUTDOWN awaiting the client's DISC.
    pub(super) fn idle(&self) -> bool {
        self.busy.load(Ordering::SeqCst) == 0
            && self.reader_idle.load(Ordering::SeqCst)
            && !self.told.load(Ordering::SeqCst)
    }
}

/// Threads per connection, the connection's own included (nbdkit uses 16; requests are
/// short here).
const WORKERS: usize = 8;

/// Bytes of payload in flight on a connection, bounded.
struct Budget {
    used: Mutex<usize>,
    freed: Condvar,
    limit: usize,
}

impl Budget {
    fn acquire(&self, cost: usize) -> usize {
        let cost = cost.min(self.limit);
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used + cost > self.limit {
            used = self.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += cost;
        cost
    }

    fn release(&self, cost: usize) {
        *self.used.lock().unwrap_or_else(|e| e.into_inner()) -= cost;
        self.freed.notify_all();
    }
}

/// Where requests come from: the socket, or the TLS session running on it.
enum Source {
    Plain(SyncSocket),
    Tls(Box<TlsReader>),
}

impl Read for Source {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Source::Plain(socket) => socket.read(buf),
            Source::Tls(tls) => tls.read(buf),
        }
    }
}

/// Where replies go: the socket, or the TLS session running on it.
enum Sink {
    Plain(SyncSocket),
    Tls(Box<TlsWriter>),
}

impl Sink {
    fn send(&mut self, reply: &Reply, file: Option<&File>) -> io::Result<()> {
        match (self, reply) {
            (Sink::Plain(socket), reply) => send_reply(socket, reply, file),
            (Sink::Tls(tls), Reply::Bytes(buf, len)) => tls.write_all(&buf[..*len]),
            (
                Sink::Tls(tls),
                Reply::File {
                    head,
                    offset,
                    len,
                    tail,
                    failed,
                },
            ) => {
                let file = file
                    .ok_or_else(|| io::Error::other("a file reply for an export without a file"))?;
                tls.write_file(head, (file, *offset, *len), tail, failed.as_deref())
            }
        }
    }
}

/// The request side of a connection: one worker at a time reads a request and its payload.
struct Requests {
    reader: io::BufReader<io::Chain<io::Cursor<Vec<u8>>, Source>>,
    /// Set when the stream ended, failed, or must not be read further.
    closed: bool,
}

impl Requests {
    /// Whether more of the stream is already here: bytes buffered (plain or TLS, or left
    /// over from the negotiation) or waiting on `socket`, checked without blocking.
    fn pending(&self, socket: &SyncSocket) -> bool {
        if !self.reader.buffer().is_empty() {
            return true;
        }
        let (leftover, source) = self.reader.get_ref().get_ref();
        if leftover.position() < leftover.get_ref().len() as u64 {
            return true;
        }
        if let Source::Tls(tls) = source {
            if tls.buffered() {
                return true;
            }
        }
        let mut byte = [0u8; 1];
        let flags = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
        matches!(rustix::net::recv(socket, &mut byte[..], flags), Ok((_, n)) if n > 0)
    }
}

/// A request a worker took off the wire, with the payload budget it holds: to run, or
/// already answered (refused before it ran).
enum Taken {
    Run(Request, Option<Payload>, usize),
    Reply(Vec<u8>, usize),
}

/// The stream a connection transmits on.
pub(super) struct Wire {
    pub(super) socket: SyncSocket,
    /// Plaintext read past the negotiation.
    pub(super) leftover: Vec<u8>,
    /// After STARTTLS: the TLS session whose record layer the workers run on `socket`.
    pub(super) tls: Option<Established>,
}

/// Serve connection `id` until its client disconnects or the stream fails, on the
/// calling thread and `WORKERS - 1` more of its own.
pub(super) fn transmission(
    id: u64,
    session: Session,
    wire: Wire,
    counters: Arc<ExportCounters>,
    budget_bytes: u32,
    stop: &Stopping,
) -> Result<(), ConnError> {
    let Wire {
        socket,
        leftover,
        tls,
    } = wire;
    let control = socket.try_clone()?;
    let (source, sink) = match tls {
        None => (Source::Plain(socket.try_clone()?), Sink::Plain(socket)),
        Some(tls) => {
            let pending = Arc::new(Pending::default());
            (
                Source::Tls(Box::new(TlsReader::new(
                    socket.try_clone()?,
                    tls.secrets.opener,
                    pending.clone(),
                    tls.ciphertext,
                ))),
                Sink::Tls(Box::new(TlsWriter::new(
                    socket,
                    tls.secrets.sealer,
                    pending,
                ))),
            )
        }
    };
    let writer = Mutex::new(sink);
    let payloads = session.export.payload_pool(WORKERS);
    let conn = Conn {
        session,
        pool: BufferPool::default(),
        payloads,
        counters,
    };
    let requests = Mutex::new(Requests {
        reader: io::BufReader::with_capacity(
            64 * 1024,
            Read::chain(io::Cursor::new(leftover), source),
        ),
        closed: false,
    });
    let budget = Budget {
        used: Mutex::new(0),
        freed: Condvar::new(),
        limit: budget_bytes as usize,
    };
    let failure: Mutex<Option<ConnError>> = Mutex::new(None);
    let fail = |err: ConnError| {
        failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(err);
    };
    // Run a request taken off the wire and write its reply.
    let serve = |taken: Taken| -> io::Result<()> {
        let (reply, cost) = match taken {
            Taken::Reply(reply, cost) => (Reply::bytes(reply), cost),
            Taken::Run(req, payload, cost) => {
                let reply = match catch_unwind(AssertUnwindSafe(|| execute(&conn, &req, payload))) {
                    Ok(reply) => reply,
                    Err(_) => {
                        tracing::error!(
                            "the export panicked serving {} at {}",
                            req.command,
                            req.offset
                        );
                        Reply::bytes(error_reply(
                            conn.session.mode,
                            &req,
                            Errno::Io,
                            "internal error in the export",
                        ))
                    }
                };
                (reply, cost)
            }
        };
        let written = writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(&reply, conn.session.export.backing_file());
        if let Reply::Bytes(buf, _) = reply {
            conn.pool.put(buf);
        }
        budget.release(cost);
        stop.busy.fetch_sub(1, Ordering::SeqCst);
        written
    };
    // The client is gone: stop everyone (the reader is woken by the shutdown).
    let client_gone = |requests: &mut Requests, err: io::Error| {
        requests.closed = true;
        let _ = control.shutdown(std::net::Shutdown::Both);
        fail(err.into());
    };
    // Every worker reads a request, runs it and writes its reply; this thread is one of
    // them. A request that is the only one in flight, with no other waiting to be read,
    // is served inline: the worker keeps the request lock and reads the next request
    // itself, so a client that sends one request at a time (nbdinfo --map, a QD1 reader)
    // never wakes a second thread. Otherwise the lock passes to the next worker first,
    // so a pipelining client's requests run side by side.
    let worker = || {
        let mut held = requests.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if held.closed {
                return;
            }
            let taken = match next_request(&conn, &mut held, &budget, stop) {
                Ok(None) => return,
                Ok(Some(taken)) => {
                    stop.busy.fetch_add(1, Ordering::SeqCst);
                    stop.requests.fetch_add(1, Ordering::Relaxed);
                    taken
                }
                Err(err) => {
                    held.closed = true;
                    fail(err);
                    return;
                }
            };
            if stop.busy.load(Ordering::SeqCst) == 1 && !held.pending(&control) {
                if let Err(err) = serve(taken) {
                    client_gone(&mut held, err);
                    return;
                }
                continue;
            }
            drop(held);
            if let Err(err) = serve(taken) {
                // Shut the socket before taking the lock: it wakes the reader holding it.
                let _ = control.shutdown(std::net::Shutdown::Both);
                client_gone(&mut requests.lock().unwrap_or_else(|e| e.into_inner()), err);
                return;
            }
            held = requests.lock().unwrap_or_else(|e| e.into_inner());
        }
    };
    std::thread::scope(|scope| {
        for k in 1..WORKERS {
            let spawned = std::thread::Builder::new()
                .name(format!("nbd-conn-{id}.{k}"))
                .spawn_scoped(scope, worker);
            if let Err(err) = spawned {
                // Workers already started see the closed stream and exit.
                requests.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
                let _ = control.shutdown(std::net::Shutdown::Both);
                fail(ConnError::Thread(err));
                break;
            }
        }
        worker();
    });
    if let Sink::Tls(tls) = &mut *writer.lock().unwrap_or_else(|e| e.into_inner()) {
        tls.close();
    }
    let _ = control.shutdown(std::net::Shutdown::Both);
    match failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

/// Read the next request (and its payload) with the request lock held.
fn next_request(
    conn: &Conn,
    requests: &mut Requests,
    budget: &Budget,
    stop: &Stopping,
) -> Result<Option<Taken>, ConnError> {
    let mode = conn.session.mode;
    let header_len = mode.request_len();
    let mut header = [0u8; proto::EXTENDED_REQUEST_LEN];
    let buffered = !requests.reader.buffer().is_empty()
        || match requests.reader.get_ref().get_ref().1 {
            Source::Plain(_) => false,
            Source::Tls(tls) => tls.buffered(),
        };
    stop.reader_idle.store(!buffered, Ordering::SeqCst);
    let read = requests.reader.read_exact(&mut header[..header_len]);
    stop.reader_idle.store(false, Ordering::SeqCst);
    match read {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            requests.closed = true;
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    }
    let req = proto::parse_request(&header[..header_len], mode == HeaderMode::Extended)
        .map_err(|e| ConnError::Protocol(e.to_string()))?;
    if req.command == Command::Disc {
        // Requests already taken still complete and reply.
        requests.closed = true;
        return Ok(None);
    }
    if req.flags & cflags::PAYLOAD_LEN != 0 && req.command != Command::Write {
        // We never advertise payloads on other commands: the stream cannot be resynced.
        requests.closed = true;
        return Ok(Some(Taken::Reply(
            error_reply(
                mode,
                &req,
                Errno::Inval,
                "payload on a command that takes none",
            ),
            0,
        )));
    }
    let payload = if req.command == Command::Write {
        req.length
    } else {
        0
    };
    if payload > u64::from(proto::MAX_PAYLOAD) {
        requests.closed = true;
        let message = format!(
            "write of {payload} bytes exceeds the {} byte maximum; closing",
            proto::MAX_PAYLOAD
        );
        tracing::info!("{message}");
        return Ok(Some(Taken::Reply(
            error_reply(mode, &req, Errno::Inval, message),
            0,
        )));
    }
    let data_len = match req.command {
        Command::Read | Command::Write if req.length <= u64::from(proto::MAX_PAYLOAD) => {
            req.length as usize
        }
        _ => 0,
    };
    let cost = budget.acquire(data_len + 4096);
    let mut payload_buf = None;
    if payload > 0 {
        let mut buf = conn.payload(payload as usize);
        if let Err(e) = read_payload(&mut requests.reader, buf.bytes_mut()) {
            conn.recycle(buf);
            budget.release(cost);
            return Err(e.into());
        }
        payload_buf = Some(buf);
    }
    if stop.requested.load(Ordering::SeqCst) {
        if let Some(buf) = payload_buf {
            conn.recycle(buf);
        }
        stop.told.store(true, Ordering::SeqCst);
        return Ok(Some(Taken::Reply(
            error_reply(mode, &req, Errno::Shutdown, "the server is shutting down"),
            cost,
        )));
    }
    if let Err((errno, message)) = validate(&conn.session, &req) {
        tracing::debug!(
            "rejecting {} at {} len {}: {message}",
            req.command,
            req.offset,
            req.length
        );
        if let Some(buf) = payload_buf {
            conn.recycle(buf);
        }
        return Ok(Some(Taken::Reply(
            error_reply(mode, &req, errno, &message),
            cost,
        )));
    }
    Ok(Some(Taken::Run(req, payload_buf, cost)))
}

/// Fill `dst` with a write payload: what the request reader has buffered, then the rest
/// straight from the socket (one copy, never through the read buffer).
fn read_payload<R: Read>(reader: &mut io::BufReader<R>, dst: &mut [u8]) -> io::Result<()> {
    let buffered = reader.buffer().len().min(dst.len());
    dst[..buffered].copy_from_slice(&reader.buffer()[..buffered]);
    reader.consume(buffered);
    reader.get_mut().read_exact(&mut dst[buffered..])
}

/// Write `reply` to the client (the caller holds the write lock).
fn send_reply(socket: &mut SyncSocket, reply: &Reply, file: Option<&File>) -> io::Result<()> {
    let (head, mut offset, len, tail, failed) = match reply {
        Reply::Bytes(buf, len) => return socket.write_all(&buf[..*len]),
        Reply::File {
            head,
            offset,
            len,
            tail,
            failed,
        } => (head, *offset, *len, tail, failed),
    };
    let Some(file) = file else {
        return Err(io::Error::other(
            "a file reply for an export without a file",
        ));
    };
    socket.write_all(head)?;
    let mut left = len;
    let mut error = None;
    while left > 0 {
        match rustix::fs::sendfile(&*socket, file, Some(&mut offset), left) {
            Ok(0) => {
                error = Some(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the file ended before offset {}", offset + left as u64),
                ));
                break;
            }
            Ok(n) => left -= n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                error = Some(io::Error::from(e));
                break;
            }
        }
    }
    let Some(error) = error else {
        return socket.write_all(tail);
    };
    tracing::debug!("sending READ data from the file failed: {error}");
    // Keep the stream in step: the chunk header promised `len` bytes.
    let zeroes = [0u8; 64 * 1024];
    while left > 0 {
        let n = left.min(zeroes.len());
        socket.write_all(&zeroes[..n])?;
        left -= n;
    }
    match failed {
        Some(failed) => socket.write_all(failed),
        None => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::{Duration, Instant};

    use crate::export::{
        Capabilities, Errno, Export, ExportError, ExportResult, Extent, MetaContext, PayloadBuf,
        PayloadPool, ZeroFlags,
    };
    use crate::proto::{self, Command, Request};
    use crate::server::{serve_transmission, ServerConfig};

    /// Lends payload buffers of up to `largest` bytes and counts those out.
    struct Lender {
        largest: usize,
        out: AtomicUsize,
        in_flight: AtomicUsize,
    }

    struct Lent {
        bytes: Vec<u8>,
        lender: Arc<Lender>,
    }

    impl Drop for Lent {
        fn drop(&mut self) {
            self.lender.out.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl PayloadBuf for Lent {
        fn as_slice(&self) -> &[u8] {
            &self.bytes
        }
        fn as_mut_slice(&mut self) -> &mut [u8] {
            &mut self.bytes
        }
    }

    struct Pool(Arc<Lender>);

    impl PayloadPool for Pool {
        fn take(&self, len: usize) -> Option<Box<dyn PayloadBuf>> {
            if len > self.0.largest {
                return None;
            }
            self.0.out.fetch_add(1, Ordering::SeqCst);
            Some(Box::new(Lent {
                bytes: vec![0; len],
                lender: self.0.clone(),
            }))
        }
    }

    /// A writable disk in memory whose writes record how many lent buffers were out.
    struct Memory {
        disk: Mutex<Vec<u8>>,
        lender: Arc<Lender>,
        lent_at_write: Mutex<Vec<usize>>,
    }

    impl Export for Memory {
        fn size(&self) -> u64 {
            self.disk.lock().unwrap().len() as u64
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities {
                read_only: false,
                flush: true,
                trim: false,
                write_zeroes: false,
                fast_zero: false,
                cache: false,
                multi_conn: true,
                knows_holes: false,
            }
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> ExportResult<()> {
            let disk = self.disk.lock().unwrap();
            buf.copy_from_slice(&disk[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write(&self, offset: u64, data: &[u8], _: bool) -> ExportResult<()> {
            let lent = self.lender.out.load(Ordering::SeqCst);
            self.lent_at_write.lock().unwrap().push(lent);
            self.disk.lock().unwrap()[offset as usize..offset as usize + data.len()]
                .copy_from_slice(data);
            Ok(())
        }
        fn payload_pool(&self, in_flight: usize) -> Option<Box<dyn PayloadPool>> {
            self.lender.in_flight.store(in_flight, Ordering::SeqCst);
            Some(Box::new(Pool(self.lender.clone())))
        }
        fn flush(&self) -> ExportResult<()> {
            Ok(())
        }
        fn trim(&self, offset: u64, len: u64, _: bool) -> ExportResult<()> {
            self.write_zeroes(offset, len, ZeroFlags::default())
        }
        fn write_zeroes(&self, offset: u64, len: u64, _: ZeroFlags) -> ExportResult<()> {
            let range = offset as usize..(offset + len) as usize;
            self.disk.lock().unwrap()[range].fill(0);
            Ok(())
        }
        fn block_status(&self, _: &MetaContext, _: u64, len: u64) -> ExportResult<Vec<Extent>> {
            let data = Extent {
                length: len,
                flags: 0,
            };
            Ok(vec![data])
        }
    }

    /// Serve a `size`-byte [`Memory`] export lending payloads of up to `largest` bytes on
    /// a socket pair: the export, the client's end, and the serving thread.
    fn serve_memory(
        largest: usize,
        size: usize,
    ) -> (
        Arc<Memory>,
        UnixStream,
        std::thread::JoinHandle<std::io::Result<()>>,
    ) {
        let export = Arc::new(Memory {
            disk: Mutex::new(vec![0; size]),
            lender: Arc::new(Lender {
                largest,
                out: AtomicUsize::new(0),
                in_flight: AtomicUsize::new(0),
            }),
            lent_at_write: Mutex::new(Vec::new()),
        });
        let (client, server_end) = UnixStream::pair().unwrap();
        let serving = std::thread::spawn({
            let export: Arc<dyn Export> = export.clone();
            move || serve_transmission("mem", export, server_end, &ServerConfig::default())
        });
        (export, client, serving)
    }

    /// Send a WRITE of `data` at `offset` and wait for its simple reply's error code.
    fn write(client: &mut UnixStream, cookie: u64, offset: u64, data: &[u8]) -> u32 {
        let mut out = Vec::new();
        let request = Request {
            flags: 0,
            command: Command::Write,
            cookie,
            offset,
            length: data.len() as u64,
        };
        proto::encode_request(&mut out, &request, false);
        client.write_all(&out).unwrap();
        client.write_all(data).unwrap();
        let mut header = [0u8; proto::SIMPLE_REPLY_LEN];
        client.read_exact(&mut header).unwrap();
        match proto::parse_reply_header(&header).unwrap() {
            proto::ReplyHeader::Simple { error, cookie: c } => {
                assert_eq!(c, cookie);
                error
            }
            other => panic!("expected a simple reply, got {other:?}"),
        }
    }

    #[test]
    fn write_payloads_are_read_into_memory_the_export_lends_and_given_back() {
        let max = proto::MAX_PAYLOAD as usize;
        let (export, mut client, serving) = serve_memory(max, max + (1 << 20));
        let lender = &export.lender;
        let small: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        assert_eq!(write(&mut client, 1, 8192, &small), 0);
        // The largest payload the protocol allows is lent too.
        let huge: Vec<u8> = (0..max).map(|i| (i / 4096) as u8).collect();
        assert_eq!(write(&mut client, 2, 1 << 20, &huge), 0);
        // Every payload was back with its lender before its reply went out.
        assert_eq!(lender.out.load(Ordering::SeqCst), 0);
        assert_eq!(lender.in_flight.load(Ordering::SeqCst), super::WORKERS);
        drop(client);
        serving.join().unwrap().unwrap();
        assert_eq!(*export.lent_at_write.lock().unwrap(), vec![1, 1]);
        let disk = export.disk.lock().unwrap();
        assert_eq!(&disk[8192..8192 + 4096], &small[..]);
        assert!(disk[(1 << 20)..(1 << 20) + max] == huge[..]);
    }

    #[test]
    fn payloads_the_export_does_not_lend_use_the_servers_own_buffers() {
        let (export, mut client, serving) = serve_memory(4096, 1 << 20);
        assert_eq!(write(&mut client, 1, 0, &[7u8; 65536]), 0);
        assert_eq!(write(&mut client, 2, 65536, &[8u8; 4096]), 0);
        drop(client);
        serving.join().unwrap().unwrap();
        assert_eq!(*export.lent_at_write.lock().unwrap(), vec![0, 1]);
        let disk = export.disk.lock().unwrap();
        assert!(disk[..65536].iter().all(|&b| b == 7));
        assert!(disk[65536..65536 + 4096].iter().all(|&b| b == 8));
    }

    /// READs at or past this offset of a [`Threads`] export meet each other there.
    const RENDEZVOUS: u64 = 1 << 19;

    /// A 1 MiB disk in memory that records the thread running each request; a READ at
    /// or past [`RENDEZVOUS`] waits (up to 10 s) until another one is in the export too,
    /// and fails if none comes, so it succeeds only when two run side by side.
    struct Threads {
        disk: Mutex<Vec<u8>>,
        ran_on: Mutex<Vec<String>>,
        met: Mutex<usize>,
        arrived: Condvar,
    }

    impl Threads {
        fn record(&self) {
            let name = std::thread::current().name().unwrap_or("?").to_string();
            self.ran_on.lock().unwrap().push(name);
        }
    }

    impl Export for Threads {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities {
                read_only: false,
                flush: true,
                trim: false,
                write_zeroes: false,
                fast_zero: false,
                cache: false,
                multi_conn: true,
                knows_holes: false,
            }
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> ExportResult<()> {
            self.record();
            if offset >= RENDEZVOUS {
                let deadline = Instant::now() + Duration::from_secs(10);
                let mut met = self.met.lock().unwrap();
                *met += 1;
                self.arrived.notify_all();
                while *met < 2 {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(ExportError::new(Errno::Io, "no other READ ran beside it"));
                    }
                    met = self.arrived.wait_timeout(met, left).unwrap().0;
                }
            }
            let disk = self.disk.lock().unwrap();
            buf.copy_from_slice(&disk[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write(&self, offset: u64, data: &[u8], _: bool) -> ExportResult<()> {
            self.record();
            self.disk.lock().unwrap()[offset as usize..offset as usize + data.len()]
                .copy_from_slice(data);
            Ok(())
        }
        fn flush(&self) -> ExportResult<()> {
            self.record();
            Ok(())
        }
        fn trim(&self, _: u64, _: u64, _: bool) -> ExportResult<()> {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> ExportResult<()> {
            Ok(())
        }
        fn block_status(&self, _: &MetaContext, _: u64, len: u64) -> ExportResult<Vec<Extent>> {
            Ok(vec![Extent {
                length: len,
                flags: 0,
            }])
        }
    }

    /// Serve a 1 MiB [`Threads`] export on a socket pair: the export, the client's end
    /// (reads time out after 30 s), and the serving thread.
    fn serve_threads() -> (
        Arc<Threads>,
        UnixStream,
        std::thread::JoinHandle<std::io::Result<()>>,
    ) {
        let export = Arc::new(Threads {
            disk: Mutex::new(vec![0; 1 << 20]),
            ran_on: Mutex::new(Vec::new()),
            met: Mutex::new(0),
            arrived: Condvar::new(),
        });
        let (client, server_end) = UnixStream::pair().unwrap();
        let serving = std::thread::spawn({
            let export: Arc<dyn Export> = export.clone();
            move || serve_transmission("threads", export, server_end, &ServerConfig::default())
        });
        client
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        (export, client, serving)
    }

    /// Encode a request (a WRITE carries `data`).
    fn request(out: &mut Vec<u8>, command: Command, cookie: u64, offset: u64, length: u64) {
        let request = Request {
            flags: 0,
            command,
            cookie,
            offset,
            length,
        };
        proto::encode_request(out, &request, false);
    }

    /// Read one simple reply: its cookie, error and (for a successful READ of
    /// `read_len[cookie]` bytes) its data.
    fn reply(client: &mut UnixStream, read_len: &HashMap<u64, usize>) -> (u64, u32, Vec<u8>) {
        let mut header = [0u8; proto::SIMPLE_REPLY_LEN];
        client.read_exact(&mut header).unwrap();
        let (error, cookie) = match proto::parse_reply_header(&header).unwrap() {
            proto::ReplyHeader::Simple { error, cookie } => (error, cookie),
            other => panic!("expected a simple reply, got {other:?}"),
        };
        let mut data = Vec::new();
        if error == 0 {
            data.resize(read_len.get(&cookie).copied().unwrap_or(0), 0);
            client.read_exact(&mut data).unwrap();
        }
        (cookie, error, data)
    }

    #[test]
    fn requests_sent_one_at_a_time_run_on_the_thread_that_read_them() {
        let (export, mut client, serving) = serve_threads();
        let mut lens = HashMap::new();
        for k in 0..16u64 {
            let mut out = Vec::new();
            request(&mut out, Command::Write, 2 * k, k * 4096, 4096);
            out.extend_from_slice(&[k as u8 + 1; 4096]);
            client.write_all(&out).unwrap();
            assert_eq!(reply(&mut client, &lens), (2 * k, 0, Vec::new()));
            out.clear();
            request(&mut out, Command::Read, 2 * k + 1, k * 4096, 4096);
            lens.insert(2 * k + 1, 4096);
            client.write_all(&out).unwrap();
            assert_eq!(
                reply(&mut client, &lens),
                (2 * k + 1, 0, vec![k as u8 + 1; 4096])
            );
        }
        let ran_on = export.ran_on.lock().unwrap().clone();
        assert_eq!(ran_on.len(), 32);
        assert!(
            ran_on.iter().all(|name| *name == ran_on[0]),
            "one request at a time should stay on one thread, ran on {ran_on:?}"
        );
        drop(client);
        serving.join().unwrap().unwrap();
    }

    #[test]
    fn a_pipelined_burst_between_single_requests_runs_side_by_side_matched_by_cookie() {
        let (export, mut client, serving) = serve_threads();
        let mut lens = HashMap::new();
        let mut out = Vec::new();
        // One at a time first: served inline.
        request(&mut out, Command::Write, 1, RENDEZVOUS, 8192);
        out.extend_from_slice(&[0x5a; 8192]);
        client.write_all(&out).unwrap();
        assert_eq!(reply(&mut client, &lens), (1, 0, Vec::new()));
        // A burst in one send: two READs that each wait for the other (they fail unless
        // two workers run them at once), with WRITEs, a READ and a FLUSH between them.
        out.clear();
        request(&mut out, Command::Read, 10, RENDEZVOUS, 4096);
        for k in 0..4u64 {
            request(&mut out, Command::Write, 20 + k, k * 4096, 4096);
            out.extend_from_slice(&[0x10 + k as u8; 4096]);
        }
        request(&mut out, Command::Read, 30, 0, 512);
        request(&mut out, Command::Flush, 40, 0, 0);
        request(&mut out, Command::Read, 11, RENDEZVOUS + 4096, 4096);
        for (cookie, len) in [(10, 4096), (11, 4096), (30, 512)] {
            lens.insert(cookie, len);
        }
        client.write_all(&out).unwrap();
        let mut replies = HashMap::new();
        for _ in 0..8 {
            let (cookie, error, data) = reply(&mut client, &lens);
            assert_eq!(error, 0, "request {cookie} failed");
            assert!(
                replies.insert(cookie, data).is_none(),
                "two replies to {cookie}"
            );
        }
        let cookies: Vec<u64> = {
            let mut c: Vec<u64> = replies.keys().copied().collect();
            c.sort_unstable();
            c
        };
        assert_eq!(cookies, vec![10, 11, 20, 21, 22, 23, 30, 40]);
        assert_eq!(replies[&10], vec![0x5a; 4096]);
        assert_eq!(replies[&11], vec![0x5a; 4096]);
        // The READ of block 0 raced its WRITE: either contents, never a mix.
        assert!(
            replies[&30] == vec![0; 512] || replies[&30] == vec![0x10; 512],
            "a torn read"
        );
        // One at a time again: every write of the burst is in place.
        out.clear();
        request(&mut out, Command::Read, 50, 0, 16384);
        lens.insert(50, 16384);
        client.write_all(&out).unwrap();
        let (cookie, error, data) = reply(&mut client, &lens);
        assert_eq!((cookie, error), (50, 0));
        for k in 0..4usize {
            assert!(data[k * 4096..(k + 1) * 4096]
                .iter()
                .all(|&b| b == 0x10 + k as u8));
        }
        let threads: std::collections::HashSet<String> =
            export.ran_on.lock().unwrap().iter().cloned().collect();
        assert!(threads.len() >= 2, "the burst ran on {threads:?}");
        drop(client);
        serving.join().unwrap().unwrap();
    }
}
