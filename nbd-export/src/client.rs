//! An async NBD client: negotiation in libnbd's order with its fallbacks, pipelined
//! requests, structured replies, block status, several connections when allowed.
//!
//! ```no_run
//! # async fn example() -> Result<(), tidemark_nbd::client::ClientError> {
//! use tidemark_nbd::client::{Client, ClientOptions};
//! let uri = "nbd+unix:///vm1@backup?socket=/run/tidemark/nbd.sock".parse()?;
//! let options = ClientOptions {
//!     meta_contexts: vec!["base:allocation".into(), "qemu:dirty-bitmap:ckpt1".into()],
//!     connections: 4,
//!     ..ClientOptions::default()
//! };
//! let client = Client::connect(&uri, options).await?;
//! // The whole export's dirty extents (short replies are re-queried until covered).
//! let dirty = client.block_status("qemu:dirty-bitmap:ckpt1", 0, client.size()).await?;
//! // Many requests at once: the client is a cheap handle, clone it into tasks.
//! let mut tasks = tokio::task::JoinSet::new();
//! for i in 0..16u64 {
//!     let c = client.clone();
//!     tasks.spawn(async move { c.read_vec(i << 20, 1 << 20).await });
//! }
//! while let Some(done) = tasks.join_next().await { let _data = done.expect("task")?; }
//! client.disconnect().await;
//! # drop(dirty); Ok(()) }
//! ```
//!
//! Negotiation: the greeting must offer fixed newstyle; then NBD_OPT_EXTENDED_HEADERS,
//! falling back to NBD_OPT_STRUCTURED_REPLY, falling back to simple replies; then
//! NBD_OPT_SET_META_CONTEXT for the requested contexts (when replies are structured);
//! then NBD_OPT_GO, falling back to NBD_OPT_EXPORT_NAME on servers without GO.
//!
//! Each connection has a writer (requests are written whole under a lock) and a reader
//! task that matches replies to requests by cookie, so up to
//! [`ClientOptions::depth`] requests per connection are in flight and may complete in
//! any order. Requests are spread over the connections round-robin; with several
//! connections, [`Client::flush`] flushes all of them.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{oneshot, Semaphore};

use crate::export::Extent;
use crate::proto::{
    self, cflags, chunk, info, opt, rep, tflags, ChunkPayload, Command, HeaderMode, InfoReply,
    InfoRequest, MetaRequest, ReplyHeader, Request,
};
use crate::uri::{NbdUri, Transport, UriError};

/// What a client asks for.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Try NBD_OPT_EXTENDED_HEADERS first.
    pub extended_headers: bool,
    /// Try NBD_OPT_STRUCTURED_REPLY (needed for block status).
    pub structured_replies: bool,
    /// Metadata contexts to select, e.g. `base:allocation`, `qemu:dirty-bitmap:NAME`.
    pub meta_contexts: Vec<String>,
    /// Most requests in flight per connection.
    pub depth: usize,
    /// Connections to open when the server advertises CAN_MULTI_CONN (else one).
    pub connections: usize,
    /// Time limit for connecting and negotiating.
    pub connect_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            extended_headers: true,
            structured_replies: true,
            meta_contexts: vec!["base:allocation".to_string()],
            depth: 64,
            connections: 1,
            connect_timeout: Duration::from_secs(30),
        }
    }
}

/// A client failure.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URI is not usable.
    #[error(transparent)]
    Uri(#[from] UriError),
    /// Connecting or talking to the server failed.
    #[error("NBD connection to {uri} failed")]
    Io {
        /// The server.
        uri: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The server broke the protocol.
    #[error("NBD server {uri} broke the protocol: {reason}")]
    Protocol {
        /// The server.
        uri: String,
        /// What it did.
        reason: String,
    },
    /// The server refused during negotiation.
    #[error("NBD server {uri} refused {what}: {message} (reply {code:#x})")]
    Refused {
        /// The server.
        uri: String,
        /// What was refused.
        what: String,
        /// NBD_REP_ERR_* code.
        code: u32,
        /// The server's message.
        message: String,
    },
    /// A command failed with an errno.
    #[error("NBD {command} at offset {offset} failed: errno {errno}{}", if message.is_empty() { String::new() } else { format!(" ({message})") })]
    Command {
        /// The command.
        command: String,
        /// Its offset.
        offset: u64,
        /// The NBD errno.
        errno: u32,
        /// The server's message, if any.
        message: String,
    },
    /// The request cannot be sent (bad range, missing feature).
    #[error("invalid NBD request: {0}")]
    Invalid(String),
    /// The connection is gone.
    #[error("NBD connection closed: {0}")]
    Closed(String),
    /// Connecting or negotiating took too long.
    #[error("NBD server {0} did not finish the handshake in time")]
    Timeout(String),
    /// TLS could not be set up or the TLS handshake failed.
    #[error("TLS with NBD server {uri} failed: {reason}")]
    Tls {
        /// The server.
        uri: String,
        /// What failed (bad credentials, an untrusted or expired certificate, a refusal).
        reason: String,
    },
}

/// What negotiation established about the export.
#[derive(Debug, Clone)]
pub struct ExportInfo {
    /// Export name as the client asked for it.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Header style in use.
    pub mode: HeaderMode,
    /// (minimum, preferred, maximum) block sizes.
    pub block_size: (u32, u32, u32),
    /// The description, if the server sent one.
    pub description: String,
    /// Selected contexts with their server ids.
    pub contexts: Vec<(u32, String)>,
}

type Stream = (
    Box<dyn AsyncRead + Unpin + Send>,
    Box<dyn AsyncWrite + Unpin + Send>,
);

async fn open_stream(uri: &NbdUri) -> io::Result<Stream> {
    Ok(match &uri.transport {
        Transport::Tcp { host, port } => {
            let s = TcpStream::connect((host.as_str(), *port)).await?;
            s.set_nodelay(true)?;
            let (r, w) = s.into_split();
            (Box::new(r), Box::new(w))
        }
        Transport::Unix(path) => {
            let (r, w) = UnixStream::connect(path).await?.into_split();
            (Box::new(r), Box::new(w))
        }
    })
}

/// Connect, greet, send NBD_OPT_STARTTLS and run the TLS handshake; the encrypted
/// halves and whether the server offered NO_ZEROES.
async fn open_tls(
    uri: &NbdUri,
    params: &crate::tls::TlsParams,
    shown: &str,
) -> Result<(Stream, bool), ClientError> {
    let tls_err = |reason: String| ClientError::Tls {
        uri: shown.to_string(),
        reason,
    };
    let io_err = |source| ClientError::Io {
        uri: shown.to_string(),
        source,
    };
    let default_host = match &uri.transport {
        Transport::Tcp { host, .. } => host.as_str(),
        Transport::Unix(_) => "localhost",
    };
    let (connector, name) =
        crate::tls::client_connector(params, default_host).map_err(|e| tls_err(e.to_string()))?;
    let handshake_err = |e: io::Error| {
        tls_err(format!(
            "TLS handshake: {e} (check the certificates and tls-hostname)"
        ))
    };
    Ok(match &uri.transport {
        Transport::Tcp { host, port } => {
            let mut s = TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(io_err)?;
            s.set_nodelay(true).map_err(io_err)?;
            let no_zeroes = starttls(&mut s, shown).await?;
            let secured = connector.connect(name, s).await.map_err(handshake_err)?;
            let (r, w) = tokio::io::split(secured);
            ((Box::new(r), Box::new(w)), no_zeroes)
        }
        Transport::Unix(path) => {
            let mut s = UnixStream::connect(path).await.map_err(io_err)?;
            let no_zeroes = starttls(&mut s, shown).await?;
            let secured = connector.connect(name, s).await.map_err(handshake_err)?;
            let (r, w) = tokio::io::split(secured);
            ((Box::new(r), Box::new(w)), no_zeroes)
        }
    })
}

/// The plain part of a TLS connection, unbuffered so no TLS byte is read early: the
/// greeting, the client flags, STARTTLS and its ACK. Whether the server offered NO_ZEROES.
async fn starttls<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    shown: &str,
) -> Result<bool, ClientError> {
    let io_err = |source| ClientError::Io {
        uri: shown.to_string(),
        source,
    };
    let protocol = |reason: String| ClientError::Protocol {
        uri: shown.to_string(),
        reason,
    };
    let mut greeting = [0u8; proto::GREETING_LEN];
    s.read_exact(&mut greeting).await.map_err(io_err)?;
    let server_flags = proto::parse_greeting(&greeting).map_err(|e| protocol(e.to_string()))?;
    if server_flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(protocol(
            "the server does not offer fixed newstyle negotiation, so no TLS".into(),
        ));
    }
    let no_zeroes = server_flags & proto::FLAG_NO_ZEROES != 0;
    let client_flags = proto::FLAG_C_FIXED_NEWSTYLE
        | if no_zeroes {
            proto::FLAG_C_NO_ZEROES
        } else {
            0
        };
    let mut out = client_flags.to_be_bytes().to_vec();
    out.extend_from_slice(&proto::encode_option(opt::STARTTLS, &[]));
    s.write_all(&out).await.map_err(io_err)?;
    s.flush().await.map_err(io_err)?;
    let mut header = [0u8; proto::OPTION_REPLY_HEADER_LEN];
    s.read_exact(&mut header).await.map_err(io_err)?;
    let h = proto::parse_option_reply_header(&header).map_err(|e| protocol(e.to_string()))?;
    if h.option != opt::STARTTLS || h.length > 64 * 1024 {
        return Err(protocol(format!(
            "unexpected reply to STARTTLS (option {}, {} bytes)",
            h.option, h.length
        )));
    }
    let mut data = vec![0u8; h.length as usize];
    s.read_exact(&mut data).await.map_err(io_err)?;
    if h.reply != rep::ACK {
        return Err(ClientError::Refused {
            uri: shown.to_string(),
            what: "STARTTLS".into(),
            code: h.reply,
            message: String::from_utf8_lossy(&data).into_owned(),
        });
    }
    Ok(no_zeroes)
}

/// What a request's reply carried.
#[derive(Debug)]
struct Outcome {
    command: Command,
    offset: u64,
    length: u64,
    /// READ: the destination buffer (`length` bytes).
    buf: Vec<u8>,
    /// BLOCK_STATUS: descriptors per context id.
    extents: Vec<(u32, Vec<(u64, u64)>)>,
    error: Option<(u32, String)>,
}

/// A request waiting for its reply.
struct Pending {
    out: Outcome,
    done: oneshot::Sender<Result<Outcome, ClientError>>,
}

struct Connection {
    uri: String,
    mode: HeaderMode,
    writer: tokio::sync::Mutex<Box<dyn AsyncWrite + Unpin + Send>>,
    pending: Mutex<HashMap<u64, Pending>>,
    /// Why the connection died, once it has.
    dead: Mutex<Option<String>>,
    cookie: AtomicU64,
    depth: Semaphore,
    /// Context ids negotiated by SET_META_CONTEXT: a block status chunk may name only
    /// these, each once per request (which bounds the extents one reply can bring).
    contexts: Vec<u32>,
}

struct Inner {
    info: ExportInfo,
    conns: Vec<Arc<Connection>>,
    next: AtomicUsize,
}

/// A connected NBD client; clones share the connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("info", &self.inner.info)
            .field("connections", &self.inner.conns.len())
            .finish()
    }
}

impl Client {
    /// Connect, negotiate, and open more connections if asked and allowed.
    pub async fn connect(uri: &NbdUri, options: ClientOptions) -> Result<Client, ClientError> {
        let shown = uri.to_string();
        let limit = options.connect_timeout;
        let first = tokio::time::timeout(limit, connect_one(uri, &options))
            .await
            .map_err(|_| ClientError::Timeout(shown.clone()))??;
        let (info, conn) = first;
        let mut conns = vec![conn];
        if options.connections > 1 && info.flags & tflags::CAN_MULTI_CONN != 0 {
            for _ in 1..options.connections {
                let (_, conn) = tokio::time::timeout(limit, connect_one(uri, &options))
                    .await
                    .map_err(|_| ClientError::Timeout(shown.clone()))??;
                conns.push(conn);
            }
        }
        Ok(Client {
            inner: Arc::new(Inner {
                info,
                conns,
                next: AtomicUsize::new(0),
            }),
        })
    }

    /// What negotiation established.
    pub fn info(&self) -> &ExportInfo {
        &self.inner.info
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.info.size
    }

    /// Whether the server allows several connections to one export.
    pub fn can_multi_conn(&self) -> bool {
        self.inner.info.flags & tflags::CAN_MULTI_CONN != 0
    }

    /// Whether the export is read-only.
    pub fn is_read_only(&self) -> bool {
        self.inner.info.flags & tflags::READ_ONLY != 0
    }

    /// Connections open.
    pub fn connections(&self) -> usize {
        self.inner.conns.len()
    }

    /// The largest READ/WRITE the server accepts.
    pub fn max_request(&self) -> u64 {
        u64::from(self.inner.info.block_size.2.clamp(512, proto::MAX_PAYLOAD))
    }

    fn conn(&self) -> &Arc<Connection> {
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.conns.len();
        &self.inner.conns[i]
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        if offset.checked_add(len).is_none_or(|end| end > self.size()) {
            return Err(ClientError::Invalid(format!(
                "{len} bytes at {offset} run past the end of the {}-byte export",
                self.size()
            )));
        }
        Ok(())
    }

    /// Read `buf.len()` bytes at `offset` (split into requests of at most
    /// [`Client::max_request`] bytes).
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        self.check_range(offset, buf.len() as u64)?;
        let max = self.max_request() as usize;
        for (i, part) in buf.chunks_mut(max).enumerate() {
            let data = self.read_vec(offset + (i * max) as u64, part.len()).await?;
            part.copy_from_slice(&data);
        }
        Ok(())
    }

    /// Read `len` bytes at `offset` into a new buffer (one request; `len` at most
    /// [`Client::max_request`]).
    pub async fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>, ClientError> {
        self.read_into(offset, vec![0u8; len]).await
    }

    /// Fill `buf` from `offset` and give it back: lets callers recycle buffers.
    pub async fn read_into(&self, offset: u64, buf: Vec<u8>) -> Result<Vec<u8>, ClientError> {
        let len = buf.len() as u64;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(buf);
        }
        if len > self.max_request() {
            return Err(ClientError::Invalid(format!(
                "a {len}-byte read exceeds the server's {}-byte maximum",
                self.max_request()
            )));
        }
        let req = Request {
            flags: 0,
            command: Command::Read,
            cookie: 0,
            offset,
            length: len,
        };
        let done = self.conn().call(req, None, buf).await?;
        Ok(done.buf)
    }

    /// Write `data` at `offset`; with `fua` it is durable when this returns.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        self.check_range(offset, data.len() as u64)?;
        if self.is_read_only() {
            return Err(ClientError::Invalid("the export is read-only".into()));
        }
        let flags = if fua { cflags::FUA } else { 0 };
        let max = self.max_request() as usize;
        for (i, part) in data.chunks(max).enumerate() {
            let req = Request {
                flags,
                command: Command::Write,
                cookie: 0,
                offset: offset + (i * max) as u64,
                length: part.len() as u64,
            };
            self.conn().call(req, Some(part), Vec::new()).await?;
        }
        Ok(())
    }

    async fn simple_command(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u64,
        needs: u16,
    ) -> Result<(), ClientError> {
        if self.inner.info.flags & needs != needs {
            return Err(ClientError::Invalid(format!(
                "the server does not support {command}"
            )));
        }
        self.check_range(offset, length)?;
        // 32-bit requests: split long ranges.
        let max = if self.inner.info.mode == HeaderMode::Extended {
            u64::MAX
        } else {
            u64::from(u32::MAX) & !4095
        };
        let mut done = 0;
        while done < length {
            let n = (length - done).min(max);
            let req = Request {
                flags,
                command,
                cookie: 0,
                offset: offset + done,
                length: n,
            };
            self.conn().call(req, None, Vec::new()).await?;
            done += n;
        }
        Ok(())
    }

    /// Make every completed write durable (on every connection).
    pub async fn flush(&self) -> Result<(), ClientError> {
        if self.inner.info.flags & tflags::SEND_FLUSH == 0 {
            return Ok(());
        }
        for conn in &self.inner.conns {
            let req = Request {
                flags: 0,
                command: Command::Flush,
                cookie: 0,
                offset: 0,
                length: 0,
            };
            conn.call(req, None, Vec::new()).await?;
        }
        Ok(())
    }

    /// Discard a range.
    pub async fn trim(&self, offset: u64, length: u64) -> Result<(), ClientError> {
        self.simple_command(Command::Trim, 0, offset, length, tflags::SEND_TRIM)
            .await
    }

    /// Make a range read as zeroes; `no_hole` keeps it allocated, `fast` fails with
    /// ENOTSUP rather than writing zeroes slowly.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        no_hole: bool,
        fast: bool,
    ) -> Result<(), ClientError> {
        let mut flags = 0;
        let mut needs = tflags::SEND_WRITE_ZEROES;
        if no_hole {
            flags |= cflags::NO_HOLE;
        }
        if fast {
            flags |= cflags::FAST_ZERO;
            needs |= tflags::SEND_FAST_ZERO;
        }
        self.simple_command(Command::WriteZeroes, flags, offset, length, needs)
            .await
    }

    /// Ask the server to prefetch a range.
    pub async fn cache(&self, offset: u64, length: u64) -> Result<(), ClientError> {
        self.simple_command(Command::Cache, 0, offset, length, tflags::SEND_CACHE)
            .await
    }

    /// The longest range one BLOCK_STATUS request may ask about: 4 GiB less a page with
    /// compact (32-bit) headers, practically unbounded with extended headers.
    fn max_status_request(&self) -> u64 {
        if self.inner.info.mode == HeaderMode::Extended {
            1u64 << 62
        } else {
            u64::from(u32::MAX) & !4095
        }
    }

    /// Send one BLOCK_STATUS request from `offset` for up to `length` bytes (cut to
    /// [`Client::max_status_request`]) and wait for its reply.
    async fn block_status_request(&self, offset: u64, length: u64) -> Result<Outcome, ClientError> {
        let req = Request {
            flags: 0,
            command: Command::BlockStatus,
            cookie: 0,
            offset,
            length: length.min(self.max_status_request()),
        };
        self.conn().call(req, None, Vec::new()).await
    }

    /// One BLOCK_STATUS request from `offset` for up to `length` bytes (as much as one
    /// request may ask): the extents of every negotiated context, by name in negotiation
    /// order, as the server sent them. Each context's extents may cover less than the
    /// range (the server's choice, different per context) and the last one may run past
    /// it; a caller that needs whole maps asks again from where the shortest one stopped.
    /// One request answers for all contexts, so maps wanted together cost one round trip.
    pub async fn block_status_contexts(
        &self,
        offset: u64,
        length: u64,
    ) -> Result<Vec<(String, Vec<Extent>)>, ClientError> {
        self.check_range(offset, length)?;
        let mut done = self.block_status_request(offset, length).await?;
        let mut out = Vec::with_capacity(self.inner.info.contexts.len());
        for (id, name) in &self.inner.info.contexts {
            let Some(i) = done.extents.iter().position(|(cid, _)| cid == id) else {
                return Err(ClientError::Protocol {
                    uri: self.inner.conns[0].uri.clone(),
                    reason: format!("no block status for context {name:?} (id {id})"),
                });
            };
            let (_, descriptors) = done.extents.swap_remove(i);
            let extents = descriptors
                .into_iter()
                .map(|(length, flags)| Extent {
                    length,
                    flags: flags as u32,
                })
                .collect();
            out.push((name.clone(), extents));
        }
        Ok(out)
    }

    /// Extents of `context` over `[offset, offset + length)`, covering the whole range:
    /// short replies are re-queried from where they stopped; neighbours are merged.
    pub async fn block_status(
        &self,
        context: &str,
        offset: u64,
        length: u64,
    ) -> Result<Vec<Extent>, ClientError> {
        self.check_range(offset, length)?;
        let id = self
            .inner
            .info
            .contexts
            .iter()
            .find(|(_, name)| name == context)
            .map(|(id, _)| *id)
            .ok_or_else(|| {
                ClientError::Invalid(format!(
                    "context {context:?} was not negotiated (the server offers: {:?})",
                    self.inner.info.contexts
                ))
            })?;
        let end = offset + length;
        let mut out: Vec<Extent> = Vec::new();
        let mut cursor = offset;
        while cursor < end {
            let done = self.block_status_request(cursor, end - cursor).await?;
            let extents = done
                .extents
                .into_iter()
                .find(|(cid, _)| *cid == id)
                .map(|(_, e)| e)
                .ok_or_else(|| ClientError::Protocol {
                    uri: self.inner.conns[0].uri.clone(),
                    reason: format!("no block status for context id {id}"),
                })?;
            let before = cursor;
            for (len, flags) in extents {
                let len = len.min(end - cursor);
                if len == 0 {
                    break;
                }
                let flags = flags as u32;
                match out.last_mut() {
                    Some(last) if last.flags == flags => last.length += len,
                    _ => out.push(Extent { length: len, flags }),
                }
                cursor += len;
            }
            if cursor == before {
                return Err(ClientError::Protocol {
                    uri: self.inner.conns[0].uri.clone(),
                    reason: "block status made no progress".into(),
                });
            }
        }
        Ok(out)
    }

    /// Send NBD_CMD_DISC on every connection (in-flight requests still complete).
    pub async fn disconnect(&self) {
        for conn in &self.inner.conns {
            let mut header = Vec::new();
            let req = Request {
                flags: 0,
                command: Command::Disc,
                cookie: 0,
                offset: 0,
                length: 0,
            };
            proto::encode_request(&mut header, &req, conn.mode == HeaderMode::Extended);
            let mut w = conn.writer.lock().await;
            let _ = w.write_all(&header).await;
            let _ = w.flush().await;
            let _ = w.shutdown().await;
        }
    }
}

impl Connection {
    fn closed(&self) -> ClientError {
        let why = self.dead.lock().unwrap_or_else(|e| e.into_inner()).clone();
        ClientError::Closed(why.unwrap_or_else(|| "the server closed the connection".into()))
    }

    async fn call(
        &self,
        mut req: Request,
        payload: Option<&[u8]>,
        buf: Vec<u8>,
    ) -> Result<Outcome, ClientError> {
        let _permit = self.depth.acquire().await.map_err(|_| self.closed())?;
        req.cookie = self.cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            if self
                .dead
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
            {
                return Err(self.closed());
            }
            let out = Outcome {
                command: req.command,
                offset: req.offset,
                length: req.length,
                buf,
                extents: Vec::new(),
                error: None,
            };
            let pending = Pending { out, done: tx };
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(req.cookie, pending);
        }
        let mut header = Vec::with_capacity(proto::EXTENDED_REQUEST_LEN);
        proto::encode_request(&mut header, &req, self.mode == HeaderMode::Extended);
        {
            let mut w = self.writer.lock().await;
            let written = async {
                w.write_all(&header).await?;
                if let Some(data) = payload {
                    w.write_all(data).await?;
                }
                w.flush().await
            }
            .await;
            if let Err(e) = written {
                self.pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&req.cookie);
                return Err(ClientError::Io {
                    uri: self.uri.clone(),
                    source: e,
                });
            }
        }
        let done = rx.await.map_err(|_| self.closed())??;
        if let Some((errno, message)) = &done.error {
            return Err(ClientError::Command {
                command: req.command.to_string(),
                offset: req.offset,
                errno: *errno,
                message: message.clone(),
            });
        }
        Ok(done)
    }

    /// Fail every waiting request and refuse new ones.
    fn die(&self, why: String) {
        *self.dead.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.clone());
        let drained: Vec<Pending> = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, p)| p)
            .collect();
        for p in drained {
            let _ = p.done.send(Err(ClientError::Closed(why.clone())));
        }
    }
}

/// Fails the connection's waiting requests when the reader task ends in any way, also
/// by a panic: a reader that vanished silently would leave every request hanging.
struct DieOnDrop(Arc<Connection>);

impl Drop for DieOnDrop {
    fn drop(&mut self) {
        let dead = self
            .0
            .dead
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        if !dead {
            self.0
                .die("the client's reply reader stopped unexpectedly".to_string());
        }
    }
}

/// The reply reader of one connection.
async fn reader(conn: Arc<Connection>, mut rd: BufReader<Box<dyn AsyncRead + Unpin + Send>>) {
    let guard = DieOnDrop(conn);
    let why = match read_replies(&guard.0, &mut rd).await {
        Ok(()) => "the server closed the connection".to_string(),
        Err(e) => with_causes(&e),
    };
    guard.0.die(why);
}

/// Feed `replies`, as the bytes a server sent, to the reply reader of a connection in
/// `mode` on which `requests` wait (their cookies are 1, 2, ... in order; `contexts` are
/// the negotiated context ids), and give each request's outcome. For the fuzz target:
/// whatever the bytes, the reader returns an error or EOF, never panics, and every request
/// gets an answer.
#[doc(hidden)]
pub async fn replay_replies(
    mode: HeaderMode,
    contexts: &[u32],
    requests: &[Request],
    replies: Vec<u8>,
) -> Vec<Result<(), ClientError>> {
    let conn = Connection {
        uri: "nbd+unix:///replay".into(),
        mode,
        writer: tokio::sync::Mutex::new(Box::new(tokio::io::sink())),
        pending: Mutex::new(HashMap::new()),
        dead: Mutex::new(None),
        cookie: AtomicU64::new(1),
        depth: Semaphore::new(1),
        contexts: contexts.to_vec(),
    };
    let mut answers = Vec::new();
    for (i, req) in requests.iter().enumerate() {
        let (done, answer) = oneshot::channel();
        let buf = if req.command == Command::Read {
            vec![0u8; req.length as usize]
        } else {
            Vec::new()
        };
        let out = Outcome {
            command: req.command,
            offset: req.offset,
            length: req.length,
            buf,
            extents: Vec::new(),
            error: None,
        };
        conn.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(i as u64 + 1, Pending { out, done });
        answers.push(answer);
    }
    let source: Box<dyn AsyncRead + Unpin + Send> = Box::new(io::Cursor::new(replies));
    let why = match read_replies(&conn, &mut BufReader::new(source)).await {
        Ok(()) => "the server closed the connection".to_string(),
        Err(e) => with_causes(&e),
    };
    conn.die(why);
    let mut outcomes = Vec::new();
    for answer in answers {
        outcomes.push(match answer.await {
            Ok(Ok(Outcome {
                error: Some((errno, message)),
                command,
                offset,
                ..
            })) => Err(ClientError::Command {
                command: command.to_string(),
                offset,
                errno,
                message,
            }),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(conn.closed()),
        });
    }
    outcomes
}

/// `error` and its causes, as anyhow's `{:#}` prints them: the reason a connection died
/// reaches later requests as text, so its chain must be spelled out here.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        text.push_str(": ");
        text.push_str(&next.to_string());
        cause = next.source();
    }
    text
}

async fn read_replies(
    conn: &Connection,
    rd: &mut BufReader<Box<dyn AsyncRead + Unpin + Send>>,
) -> Result<(), ClientError> {
    let io = |source| ClientError::Io {
        uri: conn.uri.clone(),
        source,
    };
    let protocol = |reason: String| ClientError::Protocol {
        uri: conn.uri.clone(),
        reason,
    };
    let mut header = [0u8; proto::EXTENDED_REPLY_LEN];
    loop {
        match rd.read_exact(&mut header[..4]).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(io(e)),
        }
        let magic = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        let rest = proto::reply_header_rest(magic).map_err(|e| protocol(e.to_string()))?;
        rd.read_exact(&mut header[4..4 + rest]).await.map_err(io)?;
        let parsed =
            proto::parse_reply_header(&header[..4 + rest]).map_err(|e| protocol(e.to_string()))?;
        let cookie = match parsed {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. } => cookie,
        };
        let mut pending = conn
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&cookie)
            .ok_or_else(|| protocol(format!("reply for unknown cookie {cookie}")))?;
        let finished = match parsed {
            ReplyHeader::Simple { error, .. } => {
                if error != 0 {
                    pending.out.error = Some((error, String::new()));
                } else if pending.out.command == Command::Read {
                    rd.read_exact(&mut pending.out.buf).await.map_err(io)?;
                }
                true
            }
            ReplyHeader::Chunk {
                flags,
                kind,
                length,
                ..
            } => {
                read_chunk(conn, rd, &mut pending.out, kind, length).await?;
                flags & chunk::FLAG_DONE != 0
            }
        };
        if finished {
            let _ = pending.done.send(Ok(pending.out));
        } else {
            conn.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(cookie, pending);
        }
    }
}

async fn read_chunk(
    conn: &Connection,
    rd: &mut BufReader<Box<dyn AsyncRead + Unpin + Send>>,
    pending: &mut Outcome,
    kind: u16,
    length: u64,
) -> Result<(), ClientError> {
    let io = |source| ClientError::Io {
        uri: conn.uri.clone(),
        source,
    };
    let protocol = |reason: String| ClientError::Protocol {
        uri: conn.uri.clone(),
        reason,
    };
    if kind == chunk::OFFSET_DATA {
        if pending.command != Command::Read || length < 9 {
            return Err(protocol(format!(
                "OFFSET_DATA of {length} bytes for {}",
                pending.command
            )));
        }
        let offset = rd.read_u64().await.map_err(io)?;
        let len = length - 8;
        let start = offset
            .checked_sub(pending.offset)
            .filter(|s| s.checked_add(len).is_some_and(|e| e <= pending.length));
        let Some(start) = start else {
            return Err(protocol(format!(
                "OFFSET_DATA at {offset}+{len} outside the request {}+{}",
                pending.offset, pending.length
            )));
        };
        let start = start as usize;
        rd.read_exact(&mut pending.buf[start..start + len as usize])
            .await
            .map_err(io)?;
        return Ok(());
    }
    // Everything else is small: bound it before allocating.
    let limit = 16 + 16 * proto::MAX_EXTENTS as u64 + proto::MAX_STRING as u64;
    if length > limit {
        return Err(protocol(format!(
            "a {length}-byte reply chunk of type {kind}"
        )));
    }
    let mut data = vec![0u8; length as usize];
    rd.read_exact(&mut data).await.map_err(io)?;
    match proto::parse_chunk_payload(kind, &data) {
        Ok(ChunkPayload::None) => {}
        Ok(ChunkPayload::Hole {
            offset,
            length: len,
        }) => {
            let start = offset.checked_sub(pending.offset).filter(|s| {
                s.checked_add(u64::from(len))
                    .is_some_and(|e| e <= pending.length)
            });
            match start {
                Some(start) if pending.command == Command::Read => {
                    pending.buf[start as usize..start as usize + len as usize].fill(0);
                }
                _ => {
                    return Err(protocol(format!(
                        "OFFSET_HOLE at {offset}+{len} outside the {} request {}+{}",
                        pending.command, pending.offset, pending.length
                    )))
                }
            }
        }
        Ok(ChunkPayload::BlockStatus {
            context_id,
            extents,
        }) => {
            if pending.command != Command::BlockStatus {
                return Err(protocol("block status chunk for another command".into()));
            }
            if !conn.contexts.contains(&context_id) {
                return Err(protocol(format!(
                    "block status for context id {context_id}, which was not negotiated"
                )));
            }
            if pending.extents.iter().any(|(id, _)| *id == context_id) {
                return Err(protocol(format!(
                    "a second block status chunk for context id {context_id} in one reply"
                )));
            }
            pending.extents.push((context_id, extents));
        }
        Ok(ChunkPayload::Error { error, message, .. }) => {
            pending.error.get_or_insert((error, message));
        }
        Err(e) => return Err(protocol(e.to_string())),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Negotiation

struct Handshake<'a> {
    uri: &'a str,
    rd: BufReader<Box<dyn AsyncRead + Unpin + Send>>,
    wr: Box<dyn AsyncWrite + Unpin + Send>,
}

/// One option reply: (reply type, payload).
type OptReply = (u32, Vec<u8>);

impl Handshake<'_> {
    fn io(&self, source: io::Error) -> ClientError {
        ClientError::Io {
            uri: self.uri.to_string(),
            source,
        }
    }

    fn protocol(&self, reason: impl Into<String>) -> ClientError {
        ClientError::Protocol {
            uri: self.uri.to_string(),
            reason: reason.into(),
        }
    }

    async fn send(&mut self, option: u32, data: &[u8]) -> Result<(), ClientError> {
        let bytes = proto::encode_option(option, data);
        self.wr.write_all(&bytes).await.map_err(|e| self.io(e))?;
        self.wr.flush().await.map_err(|e| self.io(e))
    }

    async fn reply(&mut self, option: u32) -> Result<OptReply, ClientError> {
        let mut header = [0u8; proto::OPTION_REPLY_HEADER_LEN];
        if let Err(e) = self.rd.read_exact(&mut header).await {
            return Err(self.io(e));
        }
        let h =
            proto::parse_option_reply_header(&header).map_err(|e| self.protocol(e.to_string()))?;
        if h.option != option {
            return Err(self.protocol(format!(
                "reply to option {} while waiting for {option}",
                h.option
            )));
        }
        if h.length > 1 << 20 {
            return Err(self.protocol(format!("a {}-byte option reply", h.length)));
        }
        let mut data = vec![0u8; h.length as usize];
        if let Err(e) = self.rd.read_exact(&mut data).await {
            return Err(self.io(e));
        }
        Ok((h.reply, data))
    }

    fn refused(&self, what: &str, code: u32, data: &[u8]) -> ClientError {
        ClientError::Refused {
            uri: self.uri.to_string(),
            what: what.to_string(),
            code,
            message: String::from_utf8_lossy(data).into_owned(),
        }
    }

    /// Send an option that answers with a single ACK; Ok(false) on an error reply.
    async fn simple_option(&mut self, option: u32) -> Result<bool, ClientError> {
        self.send(option, &[]).await?;
        let (reply, _) = self.reply(option).await?;
        Ok(reply == rep::ACK)
    }
}

/// The plain greeting: the server's flags, then ours; whether NO_ZEROES was agreed.
async fn greet(hs: &mut Handshake<'_>) -> Result<bool, ClientError> {
    let mut greeting = [0u8; proto::GREETING_LEN];
    if let Err(e) = hs.rd.read_exact(&mut greeting).await {
        return Err(hs.io(e));
    }
    let server_flags = proto::parse_greeting(&greeting).map_err(|e| hs.protocol(e.to_string()))?;
    if server_flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(hs.protocol("the server does not offer fixed newstyle negotiation"));
    }
    let no_zeroes = server_flags & proto::FLAG_NO_ZEROES != 0;
    let client_flags = proto::FLAG_C_FIXED_NEWSTYLE
        | if no_zeroes {
            proto::FLAG_C_NO_ZEROES
        } else {
            0
        };
    hs.wr
        .write_all(&client_flags.to_be_bytes())
        .await
        .map_err(|e| hs.io(e))?;
    Ok(no_zeroes)
}

async fn connect_one(
    uri: &NbdUri,
    options: &ClientOptions,
) -> Result<(ExportInfo, Arc<Connection>), ClientError> {
    let shown = uri.to_string();
    let ((rd, wr), greeted) = match &uri.tls {
        Some(params) => {
            let (stream, no_zeroes) = open_tls(uri, params, &shown).await?;
            (stream, Some(no_zeroes))
        }
        None => {
            let stream = open_stream(uri).await.map_err(|source| ClientError::Io {
                uri: shown.clone(),
                source,
            })?;
            (stream, None)
        }
    };
    let mut hs = Handshake {
        uri: &shown,
        rd: BufReader::with_capacity(256 * 1024, rd),
        wr,
    };
    let no_zeroes = match greeted {
        Some(no_zeroes) => no_zeroes,
        None => greet(&mut hs).await?,
    };

    let mut mode = HeaderMode::Simple;
    if options.extended_headers && hs.simple_option(opt::EXTENDED_HEADERS).await? {
        mode = HeaderMode::Extended;
    }
    if mode == HeaderMode::Simple
        && options.structured_replies
        && hs.simple_option(opt::STRUCTURED_REPLY).await?
    {
        mode = HeaderMode::Structured;
    }

    let mut contexts = Vec::new();
    if mode >= HeaderMode::Structured && !options.meta_contexts.is_empty() {
        let request = MetaRequest {
            name: uri.export.clone(),
            queries: options.meta_contexts.clone(),
        };
        hs.send(opt::SET_META_CONTEXT, &proto::encode_meta_request(&request))
            .await?;
        loop {
            let (reply, data) = hs.reply(opt::SET_META_CONTEXT).await?;
            match reply {
                rep::META_CONTEXT => {
                    contexts.push(
                        proto::parse_rep_meta_context(&data)
                            .map_err(|e| hs.protocol(e.to_string()))?,
                    );
                }
                rep::ACK => break,
                // Unsupported or refused: carry on without contexts, as libnbd does.
                r if rep::is_error(r) => break,
                r => {
                    return Err(hs.protocol(format!("unexpected reply {r:#x} to SET_META_CONTEXT")))
                }
            }
        }
    }

    let mut info = ExportInfo {
        name: uri.export.clone(),
        size: 0,
        flags: 0,
        mode,
        block_size: (1, 4096, proto::MAX_PAYLOAD),
        description: String::new(),
        contexts,
    };
    let go = InfoRequest {
        name: uri.export.clone(),
        items: vec![info::BLOCK_SIZE, info::DESCRIPTION],
    };
    hs.send(opt::GO, &proto::encode_info_request(&go)).await?;
    let mut got_export = false;
    loop {
        let (reply, data) = hs.reply(opt::GO).await?;
        match reply {
            rep::INFO => {
                match proto::parse_info_reply(&data).map_err(|e| hs.protocol(e.to_string()))? {
                    InfoReply::Export { size, flags } => {
                        info.size = size;
                        info.flags = flags;
                        got_export = true;
                    }
                    InfoReply::BlockSize {
                        minimum,
                        preferred,
                        maximum,
                    } => info.block_size = (minimum, preferred, maximum),
                    InfoReply::Description(text) => info.description = text,
                    InfoReply::Name(_) | InfoReply::Unknown(_) => {}
                }
            }
            rep::ACK => {
                if !got_export {
                    return Err(hs.protocol("GO succeeded without NBD_INFO_EXPORT"));
                }
                break;
            }
            rep::ERR_UNSUP => {
                // An old server without GO: EXPORT_NAME cannot fail softly.
                hs.send(opt::EXPORT_NAME, uri.export.as_bytes()).await?;
                let mut buf = [0u8; 10];
                if let Err(e) = hs.rd.read_exact(&mut buf).await {
                    return Err(ClientError::Refused {
                        uri: shown.clone(),
                        what: format!("export {:?}", uri.export),
                        code: 0,
                        message: format!("the server closed the connection ({e})"),
                    });
                }
                info.size = u64::from_be_bytes([
                    buf[0], buf[1], buf[2], buf[3], buf[4], buf[5], buf[6], buf[7],
                ]);
                info.flags = u16::from_be_bytes([buf[8], buf[9]]);
                if !no_zeroes {
                    let mut zeroes = [0u8; 124];
                    if let Err(e) = hs.rd.read_exact(&mut zeroes).await {
                        return Err(hs.io(e));
                    }
                }
                break;
            }
            r if rep::is_error(r) => {
                return Err(hs.refused(&format!("export {:?}", uri.export), r, &data))
            }
            r => return Err(hs.protocol(format!("unexpected reply {r:#x} to GO"))),
        }
    }
    let conn = Arc::new(Connection {
        uri: shown.clone(),
        mode,
        writer: tokio::sync::Mutex::new(hs.wr),
        pending: Mutex::new(HashMap::new()),
        dead: Mutex::new(None),
        cookie: AtomicU64::new(1),
        depth: Semaphore::new(options.depth.max(1)),
        contexts: info.contexts.iter().map(|(id, _)| *id).collect(),
    });
    tokio::spawn(reader(conn.clone(), hs.rd));
    Ok((info, conn))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::{Export, STATE_DIRTY};
    use crate::file::{DirtyBitmap, FileExport};
    use crate::server::Server;

    async fn serve(read_only: bool, bitmap: bool) -> (tempfile::TempDir, Server, NbdUri) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let export = FileExport::open(&path, false).unwrap();
        export.write(1 << 20, &vec![0x5a; 1 << 20], false).unwrap();
        let mut export = if read_only {
            FileExport::open(&path, true).unwrap()
        } else {
            export
        };
        if bitmap {
            // 64 KiB granularity, 128 blocks: blocks 3..5 dirty.
            let words = vec![0b11000u64, 0];
            export.add_bitmap(DirtyBitmap::new("ck", 65536, words, 8 << 20).unwrap());
        }
        let server = Server::new();
        server.add_export("disk", Arc::new(export)).unwrap();
        let sock = dir.path().join("s.sock");
        let listener = server.bind_unix(&sock).unwrap();
        tokio::spawn({
            let server = server.clone();
            async move { server.serve(listener).await }
        });
        let uri = NbdUri {
            transport: Transport::Unix(sock),
            export: "disk".into(),
            tls: None,
        };
        (dir, server, uri)
    }

    #[tokio::test]
    async fn every_header_mode_reads_writes_and_flushes() {
        let (_dir, server, uri) = serve(false, false).await;
        for (ext, st) in [(true, true), (false, true), (false, false)] {
            let options = ClientOptions {
                extended_headers: ext,
                structured_replies: st,
                ..ClientOptions::default()
            };
            let client = Client::connect(&uri, options).await.unwrap();
            let expected = if ext {
                HeaderMode::Extended
            } else if st {
                HeaderMode::Structured
            } else {
                HeaderMode::Simple
            };
            assert_eq!(client.info().mode, expected);
            assert_eq!(client.size(), 8 << 20);
            // Data, a hole, and a read spanning both.
            let mut buf = vec![0u8; 2 << 20];
            client.read(512 << 10, &mut buf).await.unwrap();
            assert!(buf[..512 << 10].iter().all(|&b| b == 0));
            assert!(buf[512 << 10..1536 << 10].iter().all(|&b| b == 0x5a));
            client.write(4096, b"hello", true).await.unwrap();
            client.flush().await.unwrap();
            assert_eq!(client.read_vec(4096, 5).await.unwrap(), b"hello");
            client.write_zeroes(4096, 5, false, false).await.unwrap();
            assert_eq!(client.read_vec(4096, 5).await.unwrap(), vec![0; 5]);
            client.trim(6 << 20, 1 << 20).await.unwrap();
            client.disconnect().await;
        }
        server.shutdown();
        assert!(server.wait_idle(Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn block_status_covers_the_range_in_both_contexts() {
        let (_dir, _server, uri) = serve(true, true).await;
        let options = ClientOptions {
            meta_contexts: vec!["base:allocation".into(), "qemu:dirty-bitmap:ck".into()],
            connections: 3,
            ..ClientOptions::default()
        };
        let client = Client::connect(&uri, options).await.unwrap();
        assert!(client.is_read_only() && client.can_multi_conn());
        assert_eq!(client.connections(), 3);
        let dirty = client
            .block_status("qemu:dirty-bitmap:ck", 0, 8 << 20)
            .await
            .unwrap();
        assert_eq!(
            dirty,
            vec![
                Extent {
                    length: 3 << 16,
                    flags: 0
                },
                Extent {
                    length: 2 << 16,
                    flags: STATE_DIRTY
                },
                Extent {
                    length: (8 << 20) - (5 << 16),
                    flags: 0
                }
            ]
        );
        let alloc = client
            .block_status("base:allocation", 0, 8 << 20)
            .await
            .unwrap();
        assert_eq!(alloc.iter().map(|e| e.length).sum::<u64>(), 8 << 20);
        assert!(alloc.iter().any(|e| e.flags == 0));
        // One request answers both contexts, by name in negotiation order; the dirty
        // bitmap's first extents are the ones the whole-range call merged.
        let both = client.block_status_contexts(0, 8 << 20).await.unwrap();
        let names: Vec<&str> = both.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["base:allocation", "qemu:dirty-bitmap:ck"]);
        assert_eq!(both[1].1[..2], dirty[..2]);
        assert!(both.iter().all(|(_, extents)| !extents.is_empty()));
        let past_end = client.block_status_contexts(8 << 20, 1).await.unwrap_err();
        assert!(matches!(past_end, ClientError::Invalid(_)), "{past_end}");
        let err = client.write(0, b"x", false).await.unwrap_err();
        assert!(matches!(err, ClientError::Invalid(_)));
    }

    #[tokio::test]
    async fn many_concurrent_reads_complete_out_of_order() {
        let (_dir, _server, uri) = serve(true, false).await;
        let client = Client::connect(
            &uri,
            ClientOptions {
                depth: 8,
                ..ClientOptions::default()
            },
        )
        .await
        .unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..128u64 {
            let c = client.clone();
            tasks.spawn(async move { (i, c.read_vec(i * 65536, 65536).await) });
        }
        while let Some(done) = tasks.join_next().await {
            let (i, data) = done.unwrap();
            let data = data.unwrap();
            let expect = if (16..32).contains(&i) { 0x5a } else { 0 };
            assert!(data.iter().all(|&b| b == expect), "block {i}");
        }
    }

    #[tokio::test]
    async fn server_errors_come_back_as_command_errors() {
        let (_dir, _server, uri) = serve(true, false).await;
        let client = Client::connect(&uri, ClientOptions::default())
            .await
            .unwrap();
        // Bypass the client's own checks to see the server's answer.
        let req = Request {
            flags: 0,
            command: Command::Write,
            cookie: 0,
            offset: 0,
            length: 1,
        };
        let err = client
            .conn()
            .call(req, Some(b"x"), Vec::new())
            .await
            .unwrap_err();
        assert!(
            matches!(err, ClientError::Command { errno: 1, .. }),
            "{err}"
        );
        let req = Request {
            flags: 0,
            command: Command::Read,
            cookie: 0,
            offset: 8 << 20,
            length: 1,
        };
        let err = client.conn().call(req, None, vec![0]).await.unwrap_err();
        assert!(
            matches!(err, ClientError::Command { errno: 22, .. }),
            "{err}"
        );
        // The connection still works.
        assert_eq!(client.read_vec(1 << 20, 1).await.unwrap(), vec![0x5a]);
    }

    #[test]
    fn a_dead_connection_names_its_cause_once() {
        let err = ClientError::Io {
            uri: "nbd://host/disk".into(),
            source: io::Error::new(io::ErrorKind::ConnectionReset, "reset by peer"),
        };
        assert_eq!(
            with_causes(&err),
            "NBD connection to nbd://host/disk failed: reset by peer"
        );
    }

    /// A scripted server on a Unix socket: a correct handshake (structured replies, context
    /// id 1 for the first meta context asked for, a 1 GiB read-only export), then for each
    /// request the bytes `script` crafts (nothing: the request is left unanswered).
    async fn scripted(
        script: fn(&Request) -> Vec<u8>,
    ) -> (tempfile::TempDir, NbdUri, tokio::task::JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(&proto::encode_greeting(
                proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES,
            ))
            .await
            .unwrap();
            s.read_u32().await.unwrap();
            loop {
                let mut header = [0u8; proto::OPTION_HEADER_LEN];
                s.read_exact(&mut header).await.unwrap();
                let header = proto::parse_option_header(&header).unwrap();
                let mut data = vec![0u8; header.length as usize];
                s.read_exact(&mut data).await.unwrap();
                let mut out = Vec::new();
                let option = header.option;
                match option {
                    opt::STRUCTURED_REPLY => {
                        proto::encode_option_reply(&mut out, option, rep::ACK, &[])
                    }
                    opt::SET_META_CONTEXT => {
                        let ctx = proto::encode_rep_meta_context(1, "base:allocation");
                        proto::encode_option_reply(&mut out, option, rep::META_CONTEXT, &ctx);
                        proto::encode_option_reply(&mut out, option, rep::ACK, &[]);
                    }
                    opt::GO => {
                        let flags = tflags::HAS_FLAGS | tflags::READ_ONLY;
                        let export = proto::encode_info_export(1 << 30, flags);
                        proto::encode_option_reply(&mut out, option, rep::INFO, &export);
                        proto::encode_option_reply(&mut out, option, rep::ACK, &[]);
                    }
                    _ => proto::encode_option_reply(&mut out, option, rep::ERR_UNSUP, &[]),
                }
                s.write_all(&out).await.unwrap();
                if option == opt::GO {
                    break;
                }
            }
            let mut header = [0u8; proto::REQUEST_LEN];
            while s.read_exact(&mut header).await.is_ok() {
                let req = proto::parse_request(&header, false).unwrap();
                if s.write_all(&script(&req)).await.is_err() {
                    break;
                }
            }
        });
        let uri = NbdUri {
            transport: Transport::Unix(sock),
            export: "disk".into(),
            tls: None,
        };
        (dir, uri, server)
    }

    /// Run `f` with a time limit: a client that hangs fails the test instead of the suite.
    async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), f)
            .await
            .expect("the client answered within 10 s")
    }

    #[tokio::test]
    async fn a_hole_chunk_past_the_request_is_a_clean_error_not_a_hang() {
        let (_dir, uri, _server) = scripted(|req| {
            // Its offset plus length wraps around 2^64.
            let mut out = Vec::new();
            let (mode, done) = (HeaderMode::Structured, chunk::FLAG_DONE);
            proto::encode_hole_chunk(
                &mut out,
                mode,
                done,
                req.cookie,
                req.offset,
                u64::MAX - 100,
                4096,
            );
            out
        })
        .await;
        let client = bounded(Client::connect(&uri, ClientOptions::default()))
            .await
            .unwrap();
        let err = bounded(client.read_vec(0, 4096)).await.unwrap_err();
        assert!(
            matches!(&err, ClientError::Closed(why) if why.contains("broke the protocol: OFFSET_HOLE")),
            "{err}"
        );
        // The connection is dead, and says why, to every later request.
        let err = bounded(client.read_vec(0, 4096)).await.unwrap_err();
        assert!(
            matches!(&err, ClientError::Closed(why) if why.contains("OFFSET_HOLE")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_second_block_status_chunk_for_one_context_is_refused() {
        let (_dir, uri, _server) = scripted(|req| {
            // The same context twice: a server could repeat it forever, growing the client.
            let mut out = Vec::new();
            let mode = HeaderMode::Structured;
            let extents = [(4096, 0)];
            let bs = proto::encode_block_status_chunk;
            bs(&mut out, mode, 0, req.cookie, 0, 1, &extents);
            bs(&mut out, mode, chunk::FLAG_DONE, req.cookie, 0, 1, &extents);
            out
        })
        .await;
        let client = bounded(Client::connect(&uri, ClientOptions::default()))
            .await
            .unwrap();
        let err = bounded(client.block_status("base:allocation", 0, 4096))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ClientError::Closed(why) if why.contains("a second block status chunk")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_block_status_chunk_for_an_unnegotiated_context_is_refused() {
        let (_dir, uri, _server) = scripted(|req| {
            let mut out = Vec::new();
            let extents = [(4096, 0)];
            let (mode, done) = (HeaderMode::Structured, chunk::FLAG_DONE);
            proto::encode_block_status_chunk(&mut out, mode, done, req.cookie, 0, 7, &extents);
            out
        })
        .await;
        let client = bounded(Client::connect(&uri, ClientOptions::default()))
            .await
            .unwrap();
        let err = bounded(client.block_status("base:allocation", 0, 4096))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ClientError::Closed(why) if why.contains("context id 7, which was not negotiated")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_reader_task_that_panics_fails_every_waiting_request() {
        let replies: Vec<u8> = Vec::new();
        // A request waits on a connection whose reader then panics.
        let conn = Arc::new(Connection {
            uri: "nbd+unix:///panic".into(),
            mode: HeaderMode::Structured,
            writer: tokio::sync::Mutex::new(Box::new(tokio::io::sink())),
            pending: Mutex::new(HashMap::new()),
            dead: Mutex::new(None),
            cookie: AtomicU64::new(1),
            depth: Semaphore::new(1),
            contexts: Vec::new(),
        });
        let (done, answer) = oneshot::channel();
        let out = Outcome {
            command: Command::Flush,
            offset: 0,
            length: 0,
            buf: replies,
            extents: Vec::new(),
            error: None,
        };
        conn.pending
            .lock()
            .unwrap()
            .insert(1, Pending { out, done });
        let task = tokio::spawn({
            let guard = DieOnDrop(conn.clone());
            async move {
                let _guard = guard;
                panic!("a reader bug");
            }
        });
        assert!(task.await.unwrap_err().is_panic());
        let got = bounded(answer).await.unwrap();
        assert!(matches!(got, Err(ClientError::Closed(_))), "{got:?}");
        assert!(matches!(conn.closed(), ClientError::Closed(why) if why.contains("reader")));
    }

    #[tokio::test]
    async fn replayed_garbage_answers_every_request() {
        let read = |cookie, offset, length| Request {
            flags: 0,
            command: Command::Read,
            cookie,
            offset,
            length,
        };
        let requests = [read(1, 0, 4096), read(2, 8192, 512)];
        let mut replies = Vec::new();
        proto::encode_simple_reply(&mut replies, 2, 0);
        replies.extend_from_slice(&[7; 512]);
        replies.extend_from_slice(b"garbage");
        let outcomes = replay_replies(HeaderMode::Structured, &[1], &requests, replies).await;
        assert!(outcomes[1].is_ok(), "{:?}", outcomes[1]);
        assert!(
            matches!(&outcomes[0], Err(ClientError::Closed(_))),
            "{:?}",
            outcomes[0]
        );
    }

    #[tokio::test]
    async fn unknown_export_is_refused() {
        let (_dir, _server, mut uri) = serve(true, false).await;
        uri.export = "nope".into();
        let err = Client::connect(&uri, ClientOptions::default())
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Refused {
                    code: rep::ERR_UNKNOWN,
                    ..
                }
            ),
            "{err}"
        );
    }
}
