//! The NBD server: a registry of named exports served over Unix sockets or TCP.
//!
//! ```no_run
//! # async fn example(export: std::sync::Arc<dyn tidemark_nbd::export::Export>) -> Result<(), tidemark_nbd::server::ServerError> {
//! use tidemark_nbd::server::Server;
//! let server = Server::new();
//! server.add_export("vm1", export)?;
//! let listener = server.bind_unix(std::path::Path::new("/run/tidemark/nbd.sock"))?;
//! let serving = tokio::spawn({ let server = server.clone(); async move { server.serve(listener).await } });
//! // ... later: stop accepting, let in-flight requests finish, close every connection.
//! server.shutdown();
//! server.wait_idle(std::time::Duration::from_secs(5)).await;
//! # drop(serving); Ok(()) }
//! ```
//!
//! Each connection runs the [`negotiate`](crate::negotiate) state machine on tokio under
//! a time limit; the transmission phase then runs on a small pool of worker threads per
//! connection with blocking socket I/O, the way nbdkit serves: a worker takes the request
//! lock, reads one request header, bounds every length and reads the payload, releases
//! the lock, runs the (blocking) export method, and writes its reply under the write
//! lock. Replies go out in completion order (out of order, as the protocol allows) and up
//! to eight requests run at once, with no thread hand-off on the hot path,
//! which matters on small, busy machines. A per-connection budget of in-flight bytes
//! bounds memory: the reader waits for budget before it allocates or reads a payload.
//! Buffers are recycled through a per-connection pool so steady-state reads and writes
//! allocate nothing. Large READs of an export with a backing file (see
//! [`Export::backing_file`]) are sent with sendfile(2) straight from the page cache, as an
//! OFFSET_DATA chunk followed by a final NONE chunk (so an error found while sending can
//! still be reported); a write payload is copied once, from the socket into its buffer.
//!
//! Removing an export ends the connections that serve it, and [`Server::shutdown`] every
//! connection, with the soft disconnect doc/proto.md asks for: requests already taken
//! complete and reply normally, requests that arrive afterwards are answered with
//! ESHUTDOWN (after which the client must send NBD_CMD_DISC), and the server closes a
//! connection when its client disconnects, when it sits idle with nothing in flight and
//! was never told ESHUTDOWN, or at the latest [`ServerConfig::shutdown_grace`] later.
//! Options that arrive during a handshake get NBD_REP_ERR_SHUTDOWN; a handshake that sends
//! nothing more is dropped after the grace period.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use std::fs::File;
use std::io::{BufRead, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Condvar;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{watch, Notify};

use crate::export::{Errno, Export, ExportError, MetaContext, ZeroFlags, STATE_ZERO};
use crate::negotiate::{ExportDirectory, Negotiation, Session, Step};
use crate::proto::{self, cflags, chunk, tflags, Command, HeaderMode, Request};

/// Server tuning.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// A client must finish option haggling within this time.
    pub handshake_timeout: Duration,
    /// Bytes of request and reply payload one connection may have in flight.
    pub max_in_flight_bytes: u32,
    /// After a shutdown (or the removal of its export), the longest a connection stays
    /// open waiting for its client to disconnect (see the module doc).
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake_timeout: Duration::from_secs(10),
            max_in_flight_bytes: 64 << 20,
            shutdown_grace: Duration::from_secs(2),
        }
    }
}

/// A server-level failure (binding, registry); protocol problems are per connection and
/// only logged.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// An export with this name is already served.
    #[error("an export named {0:?} is already served; remove it first or pick another name")]
    DuplicateExport(String),
    /// An export name that the protocol cannot carry.
    #[error("export name {0:?} is invalid: names are at most 4096 bytes of UTF-8 without NUL")]
    InvalidName(String),
    /// The socket path is in use by a live server.
    #[error("{0} is in use by another running server; stop it or choose another --socket")]
    SocketInUse(PathBuf),
    /// The socket path exists and is not a socket.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Binding or configuring a listener failed.
    #[error("cannot listen on {what}: {source}")]
    Listen {
        /// The address or path.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

struct Entry {
    export: Arc<dyn Export>,
    /// Flipped to true when the export is removed: its connections close.
    removed: watch::Sender<bool>,
}

struct Inner {
    config: ServerConfig,
    exports: RwLock<BTreeMap<String, Entry>>,
    shutdown: watch::Sender<bool>,
    active: AtomicUsize,
    idle: Notify,
}

/// An NBD server; cheap to clone (all clones share the registry and shutdown state).
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("exports", &self.export_names())
            .field("connections", &self.connections())
            .finish()
    }
}

impl Default for Server {
    fn default() -> Self {
        Server::new()
    }
}

/// An accepted connection.
#[derive(Debug)]
pub enum NbdStream {
    /// A Unix socket connection.
    Unix(UnixStream),
    /// A TCP connection (TCP_NODELAY set by the caller).
    Tcp(TcpStream),
}

/// A bound listener, ready for [`Server::serve`].
#[derive(Debug)]
pub enum NbdListener {
    /// A Unix socket; the socket file is removed when serving ends.
    Unix(UnixListener, PathBuf),
    /// A TCP socket.
    Tcp(TcpListener),
}

impl NbdListener {
    /// The local TCP address, if this is a TCP listener (useful after binding port 0).
    pub fn tcp_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            NbdListener::Tcp(l) => l.local_addr().ok(),
            NbdListener::Unix(..) => None,
        }
    }
}

impl Server {
    /// A server with no exports and the default configuration.
    pub fn new() -> Server {
        Server::with_config(ServerConfig::default())
    }

    /// A server with no exports.
    pub fn with_config(config: ServerConfig) -> Server {
        let (shutdown, _) = watch::channel(false);
        Server {
            inner: Arc::new(Inner {
                config,
                exports: RwLock::new(BTreeMap::new()),
                shutdown,
                active: AtomicUsize::new(0),
                idle: Notify::new(),
            }),
        }
    }

    /// Serve `export` under `name` to new connections from now on.
    pub fn add_export(&self, name: &str, export: Arc<dyn Export>) -> Result<(), ServerError> {
        if name.len() > proto::MAX_STRING || name.contains('\0') {
            return Err(ServerError::InvalidName(name.to_string()));
        }
        let mut exports = self
            .inner
            .exports
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if exports.contains_key(name) {
            return Err(ServerError::DuplicateExport(name.to_string()));
        }
        let (removed, _) = watch::channel(false);
        exports.insert(name.to_string(), Entry { export, removed });
        Ok(())
    }

    /// Stop serving `name`: new connections cannot select it and connections that use it
    /// close once their in-flight requests complete. Returns the export, if it existed.
    pub fn remove_export(&self, name: &str) -> Option<Arc<dyn Export>> {
        let entry = self
            .inner
            .exports
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)?;
        entry.removed.send_replace(true);
        Some(entry.export)
    }

    /// Names of the exports served, sorted.
    pub fn export_names(&self) -> Vec<String> {
        self.inner
            .exports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Connections currently open (negotiating or transmitting).
    pub fn connections(&self) -> usize {
        self.inner.active.load(Ordering::SeqCst)
    }

    /// Stop accepting and end every connection with a soft disconnect: in-flight requests
    /// complete, new ones get ESHUTDOWN (see the module doc).
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }

    /// Wait until no connection is open, at most `limit`; true when idle.
    pub async fn wait_idle(&self, limit: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.inner.idle.notified();
                if self.connections() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }

    /// Bind a Unix socket at `path` with mode 0600, replacing a stale socket file.
    /// Must be called inside a tokio runtime.
    pub fn bind_unix(&self, path: &Path) -> Result<NbdListener, ServerError> {
        let listen_err = |source| ServerError::Listen {
            what: path.display().to_string(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(ServerError::NotASocket(path.to_path_buf()));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServerError::SocketInUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(listen_err)?;
        }
        let listener = UnixListener::bind(path).map_err(listen_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(listen_err)?;
        Ok(NbdListener::Unix(listener, path.to_path_buf()))
    }

    /// Bind a TCP socket. Must be called inside a tokio runtime.
    pub async fn bind_tcp(&self, addr: &str) -> Result<NbdListener, ServerError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Listen {
                what: addr.to_string(),
                source,
            })?;
        Ok(NbdListener::Tcp(listener))
    }

    /// Bind `path` and serve until [`Server::shutdown`].
    pub async fn serve_unix(&self, path: &Path) -> Result<(), ServerError> {
        let listener = self.bind_unix(path)?;
        self.serve(listener).await
    }

    /// Bind `addr` and serve until [`Server::shutdown`].
    pub async fn serve_tcp(&self, addr: &str) -> Result<(), ServerError> {
        let listener = self.bind_tcp(addr).await?;
        self.serve(listener).await
    }

    /// Accept connections until [`Server::shutdown`]; each runs in its own task.
    pub async fn serve(&self, listener: NbdListener) -> Result<(), ServerError> {
        let mut shutdown = self.inner.shutdown.subscribe();
        loop {
            if *shutdown.borrow_and_update() {
                break;
            }
            let accepted = match &listener {
                NbdListener::Unix(l, _) => tokio::select! {
                    _ = shutdown.changed() => continue,
                    r = l.accept() => r.map(|(s, _)| {
                        self.spawn_connection(NbdStream::Unix(s), "unix".to_string());
                    }),
                },
                NbdListener::Tcp(l) => tokio::select! {
                    _ = shutdown.changed() => continue,
                    r = l.accept() => r.map(|(s, peer)| {
                        if let Err(err) = s.set_nodelay(true) {
                            tracing::warn!("TCP_NODELAY on {peer}: {err}");
                        }
                        self.spawn_connection(NbdStream::Tcp(s), peer.to_string());
                    }),
                },
            };
            if let Err(err) = accepted {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accepting an NBD connection failed: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if let NbdListener::Unix(_, path) = &listener {
            let _ = std::fs::remove_file(path);
        }
        Ok(())
    }

    /// Serve one accepted stream.
    pub fn spawn_connection(&self, stream: NbdStream, peer: String) {
        let guard = ConnectionGuard::new(self.inner.clone());
        let server = self.clone();
        tokio::spawn(async move {
            let _guard = guard;
            match server.connection(stream).await {
                Ok(()) => tracing::debug!("NBD client {peer} disconnected"),
                Err(err) => tracing::info!("NBD client {peer}: {err}"),
            }
        });
    }

    /// Negotiate under the time limit; the session and any bytes read past it.
    async fn handshake<R, W>(
        &self,
        rd: R,
        mut wr: W,
    ) -> Result<(Option<Session>, Vec<u8>), ConnError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut rd = BufReader::with_capacity(64 * 1024, rd);
        let limit = self.inner.config.handshake_timeout;
        match tokio::time::timeout(limit, self.negotiate(&mut rd, &mut wr)).await {
            Ok(result) => Ok((result?, rd.buffer().to_vec())),
            Err(_) => Err(ConnError::Protocol(format!(
                "handshake not finished within {limit:?}"
            ))),
        }
    }

    async fn connection(&self, mut stream: NbdStream) -> Result<(), ConnError> {
        let (session, leftover) = match &mut stream {
            NbdStream::Unix(s) => {
                let (r, w) = s.split();
                self.handshake(r, w).await?
            }
            NbdStream::Tcp(s) => {
                let (r, w) = s.split();
                self.handshake(r, w).await?
            }
        };
        let Some(session) = session else {
            return Ok(());
        };
        let mut removed = match self
            .inner
            .exports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&session.name)
        {
            Some(entry) => entry.removed.subscribe(),
            // Removed during the handshake.
            None => return Ok(()),
        };
        tracing::debug!("NBD transmission: {session:?}");
        // Transmission runs on worker threads with blocking socket I/O, as each request
        // does blocking export I/O anyway: a worker reads a request, runs it and writes
        // the reply itself, with no hand-off between threads on the hot path.
        let socket = SyncSocket::from_tokio(stream)?;
        let control = socket.try_clone()?;
        let budget = self.inner.config.max_in_flight_bytes;
        let stop = Arc::new(Stopping::default());
        let mut work = tokio::task::spawn_blocking({
            let stop = stop.clone();
            move || transmission(session, socket, leftover, budget, &stop)
        });
        let mut shutdown = self.inner.shutdown.subscribe();
        let grace = self.inner.config.shutdown_grace;
        // Set when the server stops serving this connection; cleared once it is closed.
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut closed = false;
        loop {
            if deadline.is_none() && (*shutdown.borrow_and_update() || *removed.borrow_and_update())
            {
                stop.requested.store(true, Ordering::SeqCst);
                deadline = Some(tokio::time::Instant::now() + grace);
            }
            if let (Some(at), false) = (deadline, closed) {
                if tokio::time::Instant::now() >= at {
                    // The client ignored ESHUTDOWN or requests hang: a hard disconnect.
                    let _ = control.shutdown(std::net::Shutdown::Both);
                    closed = true;
                } else if stop.idle() {
                    // Nothing in flight and nothing to tell: the reader sees end-of-file
                    // (after any request already queued on the socket) and the workers exit.
                    let _ = control.shutdown(std::net::Shutdown::Read);
                    closed = true;
                }
            }
            let polling = deadline.is_some() && !closed;
            tokio::select! {
                done = &mut work => {
                    return match done {
                        Ok(result) => result,
                        Err(join) => Err(ConnError::Protocol(format!("transmission failed: {join}"))),
                    };
                }
                _ = shutdown.changed(), if deadline.is_none() => {}
                _ = removed.changed(), if deadline.is_none() => {}
                _ = tokio::time::sleep(STOP_POLL), if polling => {}
            }
        }
    }

    async fn negotiate<R, W>(&self, rd: &mut R, wr: &mut W) -> Result<Option<Session>, ConnError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        wr.write_all(&Negotiation::greeting()).await?;
        wr.flush().await?;
        let client_flags = rd.read_u32().await?;
        let mut negotiation =
            Negotiation::start(client_flags).map_err(|e| ConnError::Protocol(e.to_string()))?;
        let mut out = Vec::new();
        let mut header = [0u8; proto::OPTION_HEADER_LEN];
        let mut shutdown = self.inner.shutdown.subscribe();
        let grace = self.inner.config.shutdown_grace;
        loop {
            // Once the server shuts down, a client that sends no further option within
            // the grace period is dropped (it has nothing in flight).
            let gone = async {
                let _ = shutdown.wait_for(|stopping| *stopping).await;
                tokio::time::sleep(grace).await;
            };
            tokio::select! {
                read = rd.read_exact(&mut header) => { read?; }
                () = gone => return Ok(None),
            }
            let stopping = *self.inner.shutdown.borrow();
            let h = proto::parse_option_header(&header)
                .map_err(|e| ConnError::Protocol(e.to_string()))?;
            out.clear();
            let step = if h.length > proto::MAX_OPTION_LENGTH {
                // Resynchronise by discarding the payload, within reason.
                if h.length > 16 << 20 {
                    return Err(ConnError::Protocol(format!(
                        "option {} announces a {}-byte payload",
                        h.option, h.length
                    )));
                }
                tokio::io::copy(
                    &mut (&mut *rd).take(h.length.into()),
                    &mut tokio::io::sink(),
                )
                .await?;
                if stopping {
                    negotiation.refuse_shutting_down(h.option, &mut out)
                } else {
                    negotiation.refuse_too_big(h.option, &mut out)
                }
            } else {
                let mut data = vec![0u8; h.length as usize];
                rd.read_exact(&mut data).await?;
                if stopping {
                    negotiation.refuse_shutting_down(h.option, &mut out)
                } else {
                    negotiation.handle(h.option, &data, self, &mut out)
                }
            };
            if !out.is_empty() {
                // After ABORT the client may already be gone: its ACK is best effort.
                let written = async {
                    wr.write_all(&out).await?;
                    wr.flush().await
                }
                .await;
                if let Err(err) = written {
                    if !matches!(step, Step::Close) {
                        return Err(err.into());
                    }
                }
            }
            match step {
                Step::Options(next) => negotiation = next,
                Step::Transmit(session) => return Ok(Some(session)),
                Step::Close => return Ok(None),
            }
        }
    }
}

impl ExportDirectory for Server {
    fn lookup(&self, name: &str) -> Option<(String, Arc<dyn Export>)> {
        let exports = self.inner.exports.read().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = exports.get(name) {
            return Some((name.to_string(), entry.export.clone()));
        }
        if name.is_empty() && exports.len() == 1 {
            return exports
                .iter()
                .next()
                .map(|(n, e)| (n.clone(), e.export.clone()));
        }
        None
    }

    fn list(&self) -> Vec<(String, String)> {
        let exports = self.inner.exports.read().unwrap_or_else(|e| e.into_inner());
        exports
            .iter()
            .map(|(n, e)| (n.clone(), e.export.description()))
            .collect()
    }
}

struct ConnectionGuard(Arc<Inner>);

impl ConnectionGuard {
    fn new(inner: Arc<Inner>) -> Self {
        inner.active.fetch_add(1, Ordering::SeqCst);
        ConnectionGuard(inner)
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
}

// ---------------------------------------------------------------------------------------
// Transmission

/// Recycled payload buffers: every pooled buffer is fully initialised (len == capacity),
/// so handing one out costs neither an allocation nor a memset.
#[derive(Default)]
struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
}

const POOL_BUFFERS: usize = 64;
const MIN_BUFFER: usize = 256 * 1024;

impl BufferPool {
    fn get(&self, len: usize) -> Vec<u8> {
        let pooled = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match pooled {
            Some(buf) if buf.len() >= len => buf,
            _ => vec![0u8; len.max(MIN_BUFFER)],
        }
    }

    fn put(&self, buf: Vec<u8>) {
        if buf.len() < MIN_BUFFER {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < POOL_BUFFERS {
            free.push(buf);
        }
    }
}

/// Per-connection state shared with the blocking workers.
struct Conn {
    session: Session,
    pool: BufferPool,
}

/// A command error: errno and a message for the client and the log.
type CmdError = (Errno, String);

fn cmd_err(errno: Errno, message: impl Into<String>) -> CmdError {
    (errno, message.into())
}

/// A connected socket in blocking mode, for the transmission workers.
enum SyncSocket {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl SyncSocket {
    fn from_tokio(stream: NbdStream) -> io::Result<SyncSocket> {
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

    fn try_clone(&self) -> io::Result<SyncSocket> {
        Ok(match self {
            SyncSocket::Unix(s) => SyncSocket::Unix(s.try_clone()?),
            SyncSocket::Tcp(s) => SyncSocket::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
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
const STOP_POLL: Duration = Duration::from_millis(10);

/// A connection's view of a shutdown, shared by the async monitor and the workers.
#[derive(Default)]
struct Stopping {
    /// Set once when the server stops serving the connection: new requests get ESHUTDOWN.
    requested: AtomicBool,
    /// An ESHUTDOWN went out: the client must now send NBD_CMD_DISC; wait for it.
    told: AtomicBool,
    /// Workers between taking a request off the wire and finishing its reply.
    busy: AtomicUsize,
    /// The reader waits for a request header with nothing buffered.
    reader_idle: AtomicBool,
}

impl Stopping {
    /// Nothing in flight, nothing half-read, and no ESHUTDOWN awaiting the client's DISC.
    fn idle(&self) -> bool {
        self.busy.load(Ordering::SeqCst) == 0
            && self.reader_idle.load(Ordering::SeqCst)
            && !self.told.load(Ordering::SeqCst)
    }
}

/// Worker threads per connection (nbdkit uses 16; requests are short here).
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

/// The request side of a connection: one worker at a time reads a request and its payload.
struct Requests {
    reader: io::BufReader<io::Chain<io::Cursor<Vec<u8>>, SyncSocket>>,
    /// Set when the stream ended, failed, or must not be read further.
    closed: bool,
}

/// What a worker took off the wire.
enum Next {
    Run(Request, Option<Vec<u8>>, usize),
    Reply(Vec<u8>, usize),
    Stop,
}

fn transmission(
    session: Session,
    socket: SyncSocket,
    leftover: Vec<u8>,
    budget_bytes: u32,
    stop: &Stopping,
) -> Result<(), ConnError> {
    let writer = Mutex::new(socket.try_clone()?);
    let control = socket.try_clone()?;
    let conn = Conn {
        session,
        pool: BufferPool::default(),
    };
    let requests = Mutex::new(Requests {
        reader: io::BufReader::with_capacity(
            64 * 1024,
            Read::chain(io::Cursor::new(leftover), socket),
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
    std::thread::scope(|scope| {
        for _ in 0..WORKERS {
            scope.spawn(|| loop {
                let next = {
                    let mut requests = requests.lock().unwrap_or_else(|e| e.into_inner());
                    if requests.closed {
                        return;
                    }
                    match next_request(&conn, &mut requests, &budget, stop) {
                        Ok(Next::Stop) => Next::Stop,
                        Ok(next) => {
                            stop.busy.fetch_add(1, Ordering::SeqCst);
                            next
                        }
                        Err(err) => {
                            requests.closed = true;
                            fail(err);
                            Next::Stop
                        }
                    }
                };
                let (reply, cost) = match next {
                    Next::Stop => return,
                    Next::Reply(reply, cost) => (Reply::bytes(reply), cost),
                    Next::Run(req, payload, cost) => {
                        let reply = match catch_unwind(AssertUnwindSafe(|| {
                            execute(&conn, &req, payload)
                        })) {
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
                let written = send_reply(
                    &mut writer.lock().unwrap_or_else(|e| e.into_inner()),
                    &reply,
                    conn.session.export.backing_file(),
                );
                if let Reply::Bytes(buf, _) = reply {
                    conn.pool.put(buf);
                }
                budget.release(cost);
                stop.busy.fetch_sub(1, Ordering::SeqCst);
                if let Err(err) = written {
                    // The client is gone: wake the reader and stop everyone.
                    requests.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
                    let _ = control.shutdown(std::net::Shutdown::Both);
                    fail(err.into());
                    return;
                }
            });
        }
    });
    let _ = control.shutdown(std::net::Shutdown::Both);
    match failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

/// Serve the transmission phase of `export` on a Unix stream whose peer negotiated
/// nothing: the kernel's nbd driver, handed the other end of a socketpair over netlink,
/// sends simple-reply requests at once. The peer must have been told the flags
/// [`transmission_flags`](crate::negotiate::transmission_flags) gives for
/// [`HeaderMode::Simple`]. Blocks until the peer disconnects (NBD_CMD_DISC or end of
/// stream); shutting the stream down from another handle ends it too.
pub fn serve_transmission(
    name: &str,
    export: Arc<dyn Export>,
    stream: std::os::unix::net::UnixStream,
    config: &ServerConfig,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    let session = Session {
        name: name.to_string(),
        flags: crate::negotiate::transmission_flags(export.as_ref(), HeaderMode::Simple),
        size: export.size(),
        export,
        mode: HeaderMode::Simple,
        contexts: Vec::new(),
    };
    let stop = Stopping::default();
    let socket = SyncSocket::Unix(stream);
    match transmission(
        session,
        socket,
        Vec::new(),
        config.max_in_flight_bytes,
        &stop,
    ) {
        Ok(()) => Ok(()),
        Err(ConnError::Io(err)) => Err(err),
        Err(ConnError::Protocol(message)) => {
            Err(io::Error::new(io::ErrorKind::InvalidData, message))
        }
    }
}

/// Read the next request (and its payload) with the request lock held.
fn next_request(
    conn: &Conn,
    requests: &mut Requests,
    budget: &Budget,
    stop: &Stopping,
) -> Result<Next, ConnError> {
    let mode = conn.session.mode;
    let header_len = mode.request_len();
    let mut header = [0u8; proto::EXTENDED_REQUEST_LEN];
    stop.reader_idle
        .store(requests.reader.buffer().is_empty(), Ordering::SeqCst);
    let read = requests.reader.read_exact(&mut header[..header_len]);
    stop.reader_idle.store(false, Ordering::SeqCst);
    match read {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            requests.closed = true;
            return Ok(Next::Stop);
        }
        Err(e) => return Err(e.into()),
    }
    let req = proto::parse_request(&header[..header_len], mode == HeaderMode::Extended)
        .map_err(|e| ConnError::Protocol(e.to_string()))?;
    if req.command == Command::Disc {
        // Requests already taken still complete and reply.
        requests.closed = true;
        return Ok(Next::Stop);
    }
    if req.flags & cflags::PAYLOAD_LEN != 0 && req.command != Command::Write {
        // We never advertise payloads on other commands: the stream cannot be resynced.
        requests.closed = true;
        return Ok(Next::Reply(
            error_reply(
                mode,
                &req,
                Errno::Inval,
                "payload on a command that takes none",
            ),
            0,
        ));
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
        return Ok(Next::Reply(
            error_reply(mode, &req, Errno::Inval, message),
            0,
        ));
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
        let mut buf = conn.pool.get(payload as usize);
        if let Err(e) = read_payload(&mut requests.reader, &mut buf[..payload as usize]) {
            budget.release(cost);
            return Err(e.into());
        }
        payload_buf = Some(buf);
    }
    if stop.requested.load(Ordering::SeqCst) {
        if let Some(buf) = payload_buf {
            conn.pool.put(buf);
        }
        stop.told.store(true, Ordering::SeqCst);
        return Ok(Next::Reply(
            error_reply(mode, &req, Errno::Shutdown, "the server is shutting down"),
            cost,
        ));
    }
    if let Err((errno, message)) = validate(&conn.session, &req) {
        tracing::debug!(
            "rejecting {} at {} len {}: {message}",
            req.command,
            req.offset,
            req.length
        );
        if let Some(buf) = payload_buf {
            conn.pool.put(buf);
        }
        return Ok(Next::Reply(error_reply(mode, &req, errno, &message), cost));
    }
    Ok(Next::Run(req, payload_buf, cost))
}

/// Fill `dst` with a write payload: what the request reader has buffered, then the rest
/// straight from the socket (one copy, never through the read buffer).
fn read_payload<R: Read>(reader: &mut io::BufReader<R>, dst: &mut [u8]) -> io::Result<()> {
    let buffered = reader.buffer().len().min(dst.len());
    dst[..buffered].copy_from_slice(&reader.buffer()[..buffered]);
    reader.consume(buffered);
    reader.get_mut().read_exact(&mut dst[buffered..])
}

/// Check a request against the negotiated session, as doc/proto.md lists the errors.
fn validate(session: &Session, req: &Request) -> Result<(), CmdError> {
    let caps = session.export.capabilities();
    let structured = session.mode >= HeaderMode::Structured;
    let mut allowed = cflags::FUA;
    match req.command {
        Command::Read if structured => allowed |= cflags::DF,
        Command::WriteZeroes => {
            allowed |= cflags::NO_HOLE;
            if session.flags & tflags::SEND_FAST_ZERO != 0 {
                allowed |= cflags::FAST_ZERO;
            }
        }
        Command::BlockStatus => allowed |= cflags::REQ_ONE,
        Command::Write if session.mode == HeaderMode::Extended => allowed |= cflags::PAYLOAD_LEN,
        _ => {}
    }
    if req.flags & !allowed != 0 {
        return Err(cmd_err(
            Errno::Inval,
            format!(
                "flags {:#x} are not valid on {}",
                req.flags & !allowed,
                req.command
            ),
        ));
    }
    let writes = matches!(
        req.command,
        Command::Write | Command::Trim | Command::WriteZeroes
    );
    match req.command {
        Command::Unknown(code) => {
            return Err(cmd_err(Errno::Inval, format!("unknown command {code}")))
        }
        Command::Flush if !caps.flush => {
            return Err(cmd_err(Errno::Inval, "FLUSH was not advertised"))
        }
        Command::Flush => return Ok(()),
        Command::Trim if session.flags & tflags::SEND_TRIM == 0 && !caps.read_only => {
            return Err(cmd_err(Errno::Inval, "TRIM was not advertised"))
        }
        Command::WriteZeroes
            if session.flags & tflags::SEND_WRITE_ZEROES == 0 && !caps.read_only =>
        {
            return Err(cmd_err(Errno::Inval, "WRITE_ZEROES was not advertised"))
        }
        Command::Cache if !caps.cache => {
            return Err(cmd_err(Errno::Inval, "CACHE was not advertised"))
        }
        Command::BlockStatus if session.contexts.is_empty() => {
            return Err(cmd_err(
                Errno::Inval,
                "BLOCK_STATUS needs metadata contexts chosen with NBD_OPT_SET_META_CONTEXT",
            ))
        }
        _ => {}
    }
    if writes && caps.read_only {
        return Err(cmd_err(
            Errno::Perm,
            format!("{} on the read-only export {:?}", req.command, session.name),
        ));
    }
    if req.length == 0 {
        return Err(cmd_err(
            Errno::Inval,
            format!("{} of zero length", req.command),
        ));
    }
    if matches!(req.command, Command::Read | Command::Write)
        && req.length > u64::from(proto::MAX_PAYLOAD)
    {
        return Err(cmd_err(
            Errno::Inval,
            format!(
                "{} of {} bytes exceeds the {} byte maximum block size",
                req.command,
                req.length,
                proto::MAX_PAYLOAD
            ),
        ));
    }
    let size = session.export.size();
    let past_end = req
        .offset
        .checked_add(req.length)
        .is_none_or(|end| end > size);
    if past_end {
        let errno = if matches!(req.command, Command::Write | Command::WriteZeroes) {
            Errno::NoSpc
        } else {
            Errno::Inval
        };
        return Err(cmd_err(
            errno,
            format!(
                "{} of {} bytes at {} runs past the end of the {size}-byte export",
                req.command, req.length, req.offset
            ),
        ));
    }
    Ok(())
}

/// The success reply of a command without data.
fn ok_reply(mode: HeaderMode, req: &Request) -> Vec<u8> {
    let mut out = Vec::with_capacity(proto::EXTENDED_REPLY_LEN);
    if mode == HeaderMode::Extended {
        proto::encode_none_chunk(&mut out, mode, req.cookie, req.offset);
    } else {
        proto::encode_simple_reply(&mut out, req.cookie, 0);
    }
    out
}

/// The error reply: an error chunk with the message when structured replies are on.
fn error_reply(mode: HeaderMode, req: &Request, errno: Errno, message: impl AsRef<str>) -> Vec<u8> {
    let mut out = Vec::new();
    if mode == HeaderMode::Simple {
        proto::encode_simple_reply(&mut out, req.cookie, errno.code());
    } else {
        proto::encode_error_chunk(
            &mut out,
            mode,
            req.cookie,
            req.offset,
            errno.code(),
            message.as_ref(),
        );
    }
    out
}

/// A reply ready to send.
enum Reply {
    /// The first `len` bytes of the buffer (which may be a pooled one, longer).
    Bytes(Vec<u8>, usize),
    /// `head`, then `len` bytes of the export's backing file at `offset` (sent with
    /// sendfile(2)), then `tail`. If the file cannot supply them, the data is padded with
    /// zeroes and `failed` is sent instead of `tail`; without `failed` (a simple reply,
    /// whose header already promised the data) the connection is closed.
    File {
        head: Vec<u8>,
        offset: u64,
        len: usize,
        tail: Vec<u8>,
        failed: Option<Vec<u8>>,
    },
}

impl Reply {
    fn bytes(buf: Vec<u8>) -> Reply {
        let len = buf.len();
        Reply::Bytes(buf, len)
    }
}

/// Reads of at least this many bytes go out with sendfile(2) when the export has a
/// backing file; for smaller ones the copy is cheaper than the extra system calls.
const SENDFILE_MIN: usize = 64 * 1024;

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

/// Run a validated request on a blocking thread.
fn execute(conn: &Conn, req: &Request, payload: Option<Vec<u8>>) -> Reply {
    let session = &conn.session;
    let export = session.export.as_ref();
    let mode = session.mode;
    let fua = req.flags & cflags::FUA != 0;
    let done = |r: Result<(), ExportError>| -> Reply {
        Reply::bytes(match r {
            Ok(()) => ok_reply(mode, req),
            Err(e) => {
                tracing::debug!("{} at {} failed: {e}", req.command, req.offset);
                error_reply(mode, req, e.errno, &e.message)
            }
        })
    };
    match req.command {
        Command::Read => read_reply(conn, req),
        Command::Write => {
            let data = payload.unwrap_or_default();
            let result = export.write(req.offset, &data[..req.length as usize], fua);
            conn.pool.put(data);
            done(result)
        }
        Command::Flush => done(export.flush()),
        Command::Trim => done(export.trim(req.offset, req.length, fua)),
        Command::WriteZeroes => done(export.write_zeroes(
            req.offset,
            req.length,
            ZeroFlags {
                fua,
                no_hole: req.flags & cflags::NO_HOLE != 0,
                fast: req.flags & cflags::FAST_ZERO != 0,
            },
        )),
        Command::Cache => done(export.cache(req.offset, req.length)),
        Command::BlockStatus => match block_status_reply(session, req) {
            Ok(reply) => Reply::bytes(reply),
            Err(e) => Reply::bytes(error_reply(mode, req, e.errno, &e.message)),
        },
        Command::Disc | Command::Unknown(_) => {
            done(Err(ExportError::new(Errno::Inval, "not a command")))
        }
    }
}

/// READ: a simple reply, one OFFSET_DATA chunk, or data and hole chunks where the export
/// knows its holes (never with DF); large data straight from the backing file if any.
fn read_reply(conn: &Conn, req: &Request) -> Reply {
    let session = &conn.session;
    let mode = session.mode;
    let len = req.length as usize;
    let fail = |e: ExportError| {
        tracing::debug!("READ at {} failed: {e}", req.offset);
        Reply::bytes(error_reply(mode, req, e.errno, &e.message))
    };
    let from_file = len >= SENDFILE_MIN && session.export.backing_file().is_some();
    if mode == HeaderMode::Simple && from_file {
        let mut head = Vec::with_capacity(proto::SIMPLE_REPLY_LEN);
        proto::encode_simple_reply(&mut head, req.cookie, 0);
        return Reply::File {
            head,
            offset: req.offset,
            len,
            tail: Vec::new(),
            failed: None,
        };
    }
    if mode == HeaderMode::Simple {
        let mut buf = conn.pool.get(proto::SIMPLE_REPLY_LEN + len);
        if let Err(e) = session.export.read(
            req.offset,
            &mut buf[proto::SIMPLE_REPLY_LEN..proto::SIMPLE_REPLY_LEN + len],
        ) {
            conn.pool.put(buf);
            return fail(e);
        }
        let mut header = Vec::with_capacity(proto::SIMPLE_REPLY_LEN);
        proto::encode_simple_reply(&mut header, req.cookie, 0);
        buf[..proto::SIMPLE_REPLY_LEN].copy_from_slice(&header);
        return Reply::Bytes(buf, proto::SIMPLE_REPLY_LEN + len);
    }
    let caps = session.export.capabilities();
    if caps.knows_holes && req.flags & cflags::DF == 0 {
        match allocation_map(session.export.as_ref(), req.offset, req.length) {
            Ok(map) if map.len() > 1 || map.first().is_some_and(|&(_, zero)| zero) => {
                return match sparse_read_reply(conn, req, &map) {
                    Ok(reply) => Reply::bytes(reply),
                    Err(e) => fail(e),
                };
            }
            Ok(_) => {}
            // Not knowing is no reason to fail a read.
            Err(e) => tracing::debug!("allocation lookup for READ at {} failed: {e}", req.offset),
        }
    }
    if from_file {
        // The data chunk is not the last: an error found while sending can still follow.
        let mut head = Vec::with_capacity(mode.chunk_header_len() + 8);
        proto::encode_chunk_header(
            &mut head,
            mode,
            0,
            chunk::OFFSET_DATA,
            req.cookie,
            req.offset,
            8 + len as u64,
        );
        head.extend_from_slice(&req.offset.to_be_bytes());
        let mut tail = Vec::with_capacity(mode.chunk_header_len());
        proto::encode_none_chunk(&mut tail, mode, req.cookie, req.offset);
        return Reply::File {
            head,
            offset: req.offset,
            len,
            tail,
            failed: Some(error_reply(
                mode,
                req,
                Errno::Io,
                format!("reading {len} bytes at {} failed", req.offset),
            )),
        };
    }
    let hlen = mode.chunk_header_len() + 8;
    let mut buf = conn.pool.get(hlen + len);
    if let Err(e) = session.export.read(req.offset, &mut buf[hlen..hlen + len]) {
        conn.pool.put(buf);
        return fail(e);
    }
    proto::write_chunk_header(
        &mut buf,
        mode,
        chunk::FLAG_DONE,
        chunk::OFFSET_DATA,
        req.cookie,
        req.offset,
        8 + len as u64,
    );
    buf[hlen - 8..hlen].copy_from_slice(&req.offset.to_be_bytes());
    Reply::Bytes(buf, hlen + len)
}

/// The range as (length, reads-as-zero) runs, merged, covering it exactly.
fn allocation_map(
    export: &dyn Export,
    offset: u64,
    length: u64,
) -> Result<Vec<(u64, bool)>, ExportError> {
    let extents = collect_extents(
        export,
        &MetaContext::BaseAllocation,
        offset,
        length,
        false,
        u64::MAX,
    )?;
    let mut map: Vec<(u64, bool)> = Vec::new();
    let mut covered = 0;
    for (len, flags) in extents {
        let zero = flags & STATE_ZERO != 0;
        covered += len;
        match map.last_mut() {
            Some(last) if last.1 == zero => last.0 += len,
            _ => map.push((len, zero)),
        }
    }
    if covered < length {
        // The export described less than asked: read the rest as data.
        match map.last_mut() {
            Some(last) if !last.1 => last.0 += length - covered,
            _ => map.push((length - covered, false)),
        }
    }
    Ok(map)
}

fn sparse_read_reply(
    conn: &Conn,
    req: &Request,
    map: &[(u64, bool)],
) -> Result<Vec<u8>, ExportError> {
    let mode = conn.session.mode;
    let hlen = mode.chunk_header_len();
    let data_bytes: u64 = map
        .iter()
        .filter(|(_, zero)| !zero)
        .map(|(len, _)| len)
        .sum();
    let mut out = Vec::with_capacity(data_bytes as usize + map.len() * (hlen + 12) + hlen);
    let mut offset = req.offset;
    for &(len, zero) in map {
        if zero {
            proto::encode_hole_chunk(
                &mut out, mode, 0, req.cookie, req.offset, offset, len as u32,
            );
        } else {
            proto::encode_chunk_header(
                &mut out,
                mode,
                0,
                chunk::OFFSET_DATA,
                req.cookie,
                req.offset,
                8 + len,
            );
            out.extend_from_slice(&offset.to_be_bytes());
            let start = out.len();
            out.resize(start + len as usize, 0);
            conn.session.export.read(offset, &mut out[start..])?;
        }
        offset += len;
    }
    proto::encode_none_chunk(&mut out, mode, req.cookie, req.offset);
    Ok(out)
}

/// Up to [`proto::MAX_EXTENTS`] extents of `context` over `[offset, offset + length)`:
/// re-queried while the export answers short, neighbours with equal flags merged, the
/// last one trimmed to the range, each at most `max_extent` long.
fn collect_extents(
    export: &dyn Export,
    context: &MetaContext,
    offset: u64,
    length: u64,
    req_one: bool,
    max_extent: u64,
) -> Result<Vec<(u64, u32)>, ExportError> {
    let end = offset + length;
    let mut out: Vec<(u64, u32)> = Vec::new();
    let mut cursor = offset;
    let mut calls = 0;
    'query: while cursor < end && calls < 65_536 {
        calls += 1;
        let extents = export.block_status(context, cursor, end - cursor)?;
        if extents.is_empty() {
            break;
        }
        for extent in extents {
            if extent.length == 0 {
                return Err(ExportError::new(
                    Errno::Io,
                    format!("the export reported a zero-length extent at {cursor}"),
                ));
            }
            let mut len = extent.length.min(end - cursor);
            while len > 0 {
                let count = out.len();
                match out.last_mut() {
                    Some(last) if last.1 == extent.flags && last.0 < max_extent => {
                        let add = len.min(max_extent - last.0);
                        last.0 += add;
                        len -= add;
                        cursor += add;
                    }
                    Some(_) if req_one => break 'query,
                    _ if count >= proto::MAX_EXTENTS => break 'query,
                    _ => {
                        let add = len.min(max_extent);
                        out.push((add, extent.flags));
                        len -= add;
                        cursor += add;
                    }
                }
            }
            if cursor >= end {
                break 'query;
            }
        }
    }
    if out.is_empty() {
        return Err(ExportError::new(
            Errno::Io,
            format!(
                "the export reported no extents at {offset} for {}",
                context.wire_name()
            ),
        ));
    }
    Ok(out)
}

fn block_status_reply(session: &Session, req: &Request) -> Result<Vec<u8>, ExportError> {
    let mode = session.mode;
    let req_one = req.flags & cflags::REQ_ONE != 0;
    // 32-bit descriptors: keep each under 4 GiB and 4 KiB aligned.
    let max_extent = if mode == HeaderMode::Extended {
        u64::MAX
    } else {
        u64::from(u32::MAX) & !4095
    };
    let mut out = Vec::new();
    let count = session.contexts.len();
    for (i, (id, context)) in session.contexts.iter().enumerate() {
        let extents = collect_extents(
            session.export.as_ref(),
            context,
            req.offset,
            req.length,
            req_one,
            max_extent,
        )?;
        let flags = if i + 1 == count { chunk::FLAG_DONE } else { 0 };
        proto::encode_block_status_chunk(
            &mut out, mode, flags, req.cookie, req.offset, *id, &extents,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::{Capabilities, ExportResult, Extent};

    struct Striped;
    impl Export for Striped {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities {
                read_only: true,
                flush: false,
                trim: false,
                write_zeroes: false,
                fast_zero: false,
                cache: false,
                multi_conn: true,
                knows_holes: true,
            }
        }
        fn read(&self, _: u64, buf: &mut [u8]) -> ExportResult<()> {
            buf.fill(1);
            Ok(())
        }
        fn write(&self, _: u64, _: &[u8], _: bool) -> ExportResult<()> {
            Ok(())
        }
        fn flush(&self) -> ExportResult<()> {
            Ok(())
        }
        fn trim(&self, _: u64, _: u64, _: bool) -> ExportResult<()> {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> ExportResult<()> {
            Ok(())
        }
        /// 4 KiB stripes, alternating data and hole, answered one stripe per call.
        fn block_status(&self, _: &MetaContext, offset: u64, _: u64) -> ExportResult<Vec<Extent>> {
            let stripe = offset / 4096;
            let flags = if stripe % 2 == 0 { 0 } else { 3 };
            Ok(vec![Extent {
                length: 4096 - offset % 4096,
                flags,
            }])
        }
    }

    fn simple_reply(stream: &mut std::os::unix::net::UnixStream) -> (u32, u64) {
        let mut header = [0u8; proto::SIMPLE_REPLY_LEN];
        stream.read_exact(&mut header).unwrap();
        match proto::parse_reply_header(&header).unwrap() {
            proto::ReplyHeader::Simple { error, cookie } => (error, cookie),
            other => panic!("expected a simple reply, got {other:?}"),
        }
    }

    #[test]
    fn transmission_without_negotiation_serves_simple_replies_until_disc() {
        let (mut client, server_end) = std::os::unix::net::UnixStream::pair().unwrap();
        let serving = std::thread::spawn(move || {
            serve_transmission(
                "kernel",
                Arc::new(Striped),
                server_end,
                &ServerConfig::default(),
            )
        });
        let mut out = Vec::new();
        let request = |command, cookie, length| Request {
            flags: 0,
            command,
            cookie,
            offset: 8192,
            length,
        };
        proto::encode_request(&mut out, &request(Command::Read, 7, 4096), false);
        client.write_all(&out).unwrap();
        assert_eq!(simple_reply(&mut client), (0, 7));
        let mut data = vec![0u8; 4096];
        client.read_exact(&mut data).unwrap();
        assert!(data.iter().all(|&b| b == 1));

        out.clear();
        proto::encode_request(&mut out, &request(Command::Write, 8, 512), false);
        out.extend_from_slice(&[9u8; 512]);
        client.write_all(&out).unwrap();
        assert_eq!(simple_reply(&mut client), (Errno::Perm.code(), 8));

        out.clear();
        proto::encode_request(&mut out, &request(Command::Disc, 9, 0), false);
        client.write_all(&out).unwrap();
        serving.join().unwrap().unwrap();
    }

    #[test]
    fn short_answers_are_requeried_and_trimmed_to_the_range() {
        let e = collect_extents(
            &Striped,
            &MetaContext::BaseAllocation,
            1024,
            10_000,
            false,
            u64::MAX,
        )
        .unwrap();
        assert_eq!(e, vec![(3072, 0), (4096, 3), (2832, 0)]);
        assert_eq!(e.iter().map(|x| x.0).sum::<u64>(), 10_000);
    }

    #[test]
    fn req_one_returns_a_single_extent() {
        let e = collect_extents(
            &Striped,
            &MetaContext::BaseAllocation,
            0,
            1 << 20,
            true,
            u64::MAX,
        )
        .unwrap();
        assert_eq!(e, vec![(4096, 0)]);
    }

    #[test]
    fn extents_are_capped_per_chunk() {
        let e = collect_extents(
            &Striped,
            &MetaContext::BaseAllocation,
            0,
            1 << 20,
            false,
            u64::MAX,
        )
        .unwrap();
        assert_eq!(e.len(), 256);
        let capped = collect_extents(
            &Striped,
            &MetaContext::BaseAllocation,
            0,
            1 << 20,
            false,
            1000,
        )
        .unwrap();
        assert!(capped.iter().all(|&(len, _)| len <= 1000));
        assert_eq!(capped.iter().map(|x| x.0).sum::<u64>(), 1 << 20);
    }

    #[test]
    fn allocation_map_merges_into_runs() {
        let map = allocation_map(&Striped, 0, 16384).unwrap();
        assert_eq!(
            map,
            vec![(4096, false), (4096, true), (4096, false), (4096, true)]
        );
    }
}
