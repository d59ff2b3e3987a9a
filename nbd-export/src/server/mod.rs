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
//! a time limit; the transmission phase then runs on eight OS threads of its own
//! (`nbd-conn-N`, which serves requests too, and helpers `nbd-conn-N.K`), never on
//! tokio's blocking pool, so open connections cannot delay the blocking work of whoever
//! embeds the server (the daemon's control commands). A thread that cannot be started
//! fails its connection with an error, not the server.
//! The threads use blocking socket I/O, the way nbdkit serves: a worker takes the request
//! lock, reads one request header, bounds every length and reads the payload, releases
//! the lock, runs the (blocking) export method, and writes its reply under the write
//! lock. Replies go out in completion order (out of order, as the protocol allows) and up
//! to eight requests run at once, with no thread hand-off on the hot path, which matters
//! on small, busy machines. A request that is the only one in flight, with nothing more
//! buffered or waiting on the socket (a non-blocking peek), is run by the worker holding
//! the lock, which then reads the next request itself: a client that waits for each
//! reply before it sends the next request (nbdinfo --map walking a dirty bitmap in 4 GiB
//! steps, a QD1 reader) is served by one thread that never wakes another, while a
//! pipelining client still gets its requests run side by side. A per-connection budget of in-flight bytes bounds memory: the
//! reader waits for budget before it allocates or reads a payload. Buffers are recycled
//! through a per-connection pool so steady-state reads and writes allocate nothing. Large
//! READs of an export with a backing file (see
//! [`Export::backing_file`](crate::export::Export::backing_file)) are sent with
//! sendfile(2) straight from the page cache, as an OFFSET_DATA chunk followed by a final
//! NONE chunk (so an error found while sending can still be reported); a write payload is
//! copied once, from the socket into its buffer: one the export lends when it has memory
//! of its own for them ([`Export::payload_pool`](crate::export::Export::payload_pool):
//! the daemon's volumes lend aligned buffers in huge pages to their O_DIRECT writes),
//! else one of the connection's pool.
//!
//! After STARTTLS the same threads run the TLS record layer themselves on the plain
//! socket: rustls runs the handshake, then its keys are taken out and each direction runs
//! on its own (`crate::record`, see `starttls`): the request reader opens records with no
//! lock shared with the writers, and a reply writer seals records in place under the reply
//! lock. Large READs with a backing file are read (preadv) straight into the records'
//! plaintext slots, so the data is copied once before it is encrypted.
//!
//! Resources are bounded against many or careless clients: at most
//! [`ServerConfig::max_connections`] connections are served at once. A client past the
//! cap gets the greeting and then NBD_REP_ERR_POLICY, with a message saying the server is
//! full, to each option it sends (an NBD_OPT_EXPORT_NAME, which cannot carry an error, or
//! an ABORT is simply closed); the refusal is logged and bounded in time, and no more
//! refusals than that cap run at once (beyond them a client is closed at once). A
//! transmitting connection with nothing in flight that sends no request for
//! [`ServerConfig::idle_timeout`] is closed, and accepted TCP sockets use keepalive so a
//! vanished peer is noticed.
//!
//! Removing an export ends the connections that serve it, and [`Server::shutdown`] every
//! connection, with the soft disconnect doc/proto.md asks for: requests already taken
//! complete and reply normally, requests that arrive afterwards are answered with
//! ESHUTDOWN (after which the client must send NBD_CMD_DISC), and the server closes a
//! connection when its client disconnects, when it sits idle with nothing in flight and
//! was never told ESHUTDOWN, or at the latest [`ServerConfig::shutdown_grace`] later.
//! Options that arrive during a handshake get NBD_REP_ERR_SHUTDOWN; a handshake that sends
//! nothing more is dropped after the grace period.
//!
//! The parts, by job: `registry` (named exports, and the
//! [`ExportDirectory`](crate::negotiate::ExportDirectory) negotiation looks them up in),
//! `listener` (binding and accepting), `connection` (handshake, then the async monitor
//! that turns shutdowns into soft disconnects), `transmission` (the worker threads: read
//! and bound a request, reply) and `command` (validate and run one request, encode its
//! reply).

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{watch, Notify};

mod command;
mod connection;
mod listener;
mod registry;
mod starttls;
mod transmission;

pub use listener::{bind_private, NbdListener, NbdStream};
use registry::Entry;
pub use registry::ExportStats;

/// The default of [`ServerConfig::max_connections`] (`--max-connections`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;

/// The default of [`ServerConfig::idle_timeout`] (`--idle-timeout`): 15 minutes.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(15 * 60);

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
    /// Connections served at once (negotiating or transmitting); a client past it is
    /// refused with NBD_REP_ERR_POLICY on its options (see the module doc).
    pub max_connections: usize,
    /// A transmitting connection with nothing in flight that sends no request for this
    /// long is closed.
    pub idle_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake_timeout: Duration::from_secs(10),
            max_in_flight_bytes: 64 << 20,
            shutdown_grace: Duration::from_secs(2),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
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
    #[error("cannot listen on {what}")]
    Listen {
        /// The address or path.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

struct Inner {
    config: ServerConfig,
    exports: RwLock<BTreeMap<String, Entry>>,
    shutdown: watch::Sender<bool>,
    active: AtomicUsize,
    /// Clients past [`ServerConfig::max_connections`] being told so (bounded by it too).
    refusing: AtomicUsize,
    idle: Notify,
    /// Numbers connections for their thread names.
    next_connection: AtomicU64,
    /// With TLS, connections are in FORCEDTLS mode: TCP ones, and Unix ones too when
    /// the flag is set.
    tls: RwLock<Option<(crate::tls::TlsServer, bool)>>,
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
                refusing: AtomicUsize::new(0),
                idle: Notify::new(),
                next_connection: AtomicU64::new(0),
                tls: RwLock::new(None),
            }),
        }
    }

    /// Require TLS (FORCEDTLS) on every TCP connection accepted from now on, and on
    /// Unix socket connections too when `unix` is set (a Unix socket of mode 0600 is
    /// private to its owner already, and local tools such as the kernel NBD client
    /// speak no TLS).
    pub fn set_tls(&self, tls: crate::tls::TlsServer, unix: bool) {
        *self.inner.tls.write().unwrap_or_else(|e| e.into_inner()) = Some((tls, unix));
    }

    /// Whether connections must use TLS.
    pub fn tls_required(&self) -> bool {
        self.inner
            .tls
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
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
}

/// Connection ids of [`serve_transmission`] streams, counted apart from a [`Server`]'s.
static NEXT_BARE_CONNECTION: AtomicU64 = AtomicU64::new(1 << 32);

/// Serve the transmission phase of `export` on a Unix stream whose peer negotiated
/// nothing: the kernel's nbd driver, handed the other end of a socketpair over netlink,
/// sends simple-reply requests at once. The peer must have been told the flags
/// [`transmission_flags`](crate::negotiate::transmission_flags) gives for
/// [`HeaderMode::Simple`](crate::proto::HeaderMode::Simple). Blocks until the peer
/// disconnects (NBD_CMD_DISC or end of stream); shutting the stream down from another
/// handle ends it too. Requests run on the same worker threads a [`Server`] connection
/// uses.
pub fn serve_transmission(
    name: &str,
    export: Arc<dyn crate::export::Export>,
    stream: std::os::unix::net::UnixStream,
    config: &ServerConfig,
) -> io::Result<()> {
    use crate::proto::HeaderMode;
    stream.set_nonblocking(false)?;
    let session = crate::negotiate::Session {
        name: name.to_string(),
        flags: crate::negotiate::transmission_flags(export.as_ref(), HeaderMode::Simple),
        size: export.size(),
        export,
        mode: HeaderMode::Simple,
        contexts: Vec::new(),
    };
    let id = NEXT_BARE_CONNECTION.fetch_add(1, Ordering::Relaxed);
    let stop = transmission::Stopping::default();
    let socket = transmission::SyncSocket::Unix(stream);
    match transmission::transmission(
        id,
        session,
        transmission::Wire {
            socket,
            leftover: Vec::new(),
            tls: None,
        },
        std::sync::Arc::default(),
        config.max_in_flight_bytes,
        &stop,
    ) {
        Ok(()) => Ok(()),
        Err(connection::ConnError::Io(err)) => Err(err),
        Err(other) => Err(io::Error::other(other.to_string())),
    }
}

#[cfg(test)]
mod bare_tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::export::Errno;
    use crate::proto::{self, Command, Request};

    fn simple_reply(stream: &mut UnixStream) -> (u32, u64) {
        let mut header = [0u8; proto::SIMPLE_REPLY_LEN];
        stream.read_exact(&mut header).unwrap();
        match proto::parse_reply_header(&header).unwrap() {
            proto::ReplyHeader::Simple { error, cookie } => (error, cookie),
            other => panic!("expected a simple reply, got {other:?}"),
        }
    }

    #[test]
    fn transmission_without_negotiation_serves_simple_replies_until_disc() {
        let (mut client, server_end) = UnixStream::pair().unwrap();
        let serving = std::thread::spawn(move || {
            serve_transmission(
                "kernel",
                Arc::new(command::tests::Striped),
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
}
