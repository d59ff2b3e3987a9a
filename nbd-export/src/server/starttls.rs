//! The STARTTLS upgrade of a connection: the TLS handshake on the bytes the plain
//! handshake reader may already hold, the authorization check, and the record layer of
//! the transmission phase, run by the blocking transmission threads themselves on the
//! rustls session (see [`SharedSession`] for how its one owner is shared).

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use rustls::ServerConnection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::server::TlsStream;

use super::connection::ConnError;
use super::listener::NbdStream;
use super::transmission::SyncSocket;
use crate::tls::{Scope, TlsServer};

/// A stream that first yields bytes already read from it (the start of the client's TLS
/// ClientHello may sit in the plain handshake's read buffer).
pub(super) struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub(super) fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = buf.remaining().min(self.prefix.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl AsyncRead for NbdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            NbdStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            NbdStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for NbdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            NbdStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            NbdStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            NbdStream::Unix(s) => Pin::new(s).poll_flush(cx),
            NbdStream::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            NbdStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            NbdStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A connection after STARTTLS.
pub(super) type Secured = TlsStream<Prefixed<NbdStream>>;

/// Run the server side of the TLS handshake and authorize the client.
pub(super) async fn accept(
    tls: &TlsServer,
    buffered: Vec<u8>,
    stream: NbdStream,
) -> Result<(Secured, Scope), ConnError> {
    let secured = tls
        .acceptor()
        .accept(Prefixed::new(buffered, stream))
        .await
        .map_err(|e| ConnError::Protocol(format!("TLS handshake failed: {e}")))?;
    let scope = tls
        .authorize(secured.get_ref().1.peer_certificates())
        .map_err(|e| ConnError::Protocol(format!("TLS client refused: {e}")))?;
    Ok((secured, scope))
}

/// A connection after STARTTLS and negotiation, ready for the transmission threads: the
/// rustls session (which holds any plaintext it decrypted already) and the ciphertext the
/// handshake's reader holds unconsumed.
pub(super) struct Established {
    pub(super) session: ServerConnection,
    pub(super) ciphertext: Vec<u8>,
}

/// Take the rustls session out of tokio-rustls, so the blocking transmission threads run
/// the record layer themselves on the plain socket (no relay, no thread hop).
pub(super) fn establish(secured: Secured) -> (NbdStream, Established) {
    let (prefixed, mut session) = secured.into_inner();
    // Unlimited: a writer encrypts a whole chunk at once and takes the records out itself.
    session.set_buffer_limit(None);
    let ciphertext = prefixed.prefix[prefixed.at..].to_vec();
    (
        prefixed.inner,
        Established {
            session,
            ciphertext,
        },
    )
}

/// The rustls session of a transmitting connection, shared by its request reader and its
/// reply writers.
///
/// rustls keeps both directions in one state machine, so it has one owner at a time: this
/// lock. It is held only for CPU work (feeding ciphertext in, decrypting, encrypting,
/// taking records out), never across a blocking socket call: the reader blocks on the
/// socket without it, and a writer sends the records it took out under the connection's
/// reply lock (held for the whole reply, so records reach the socket in the order they
/// were sealed, as their sequence numbers demand). So a client that stops reading replies
/// while it sends requests stalls the writers, never the reader: the same behaviour as
/// the plain path, and no deadlock between the two directions.
pub(super) type SharedSession = Arc<Mutex<ServerConnection>>;

fn lock(session: &SharedSession) -> MutexGuard<'_, ServerConnection> {
    session.lock().unwrap_or_else(|e| e.into_inner())
}

/// Ciphertext read from the socket at once.
const CIPHERTEXT_BUFFER: usize = 256 * 1024;

/// The request side of a TLS connection: reads ciphertext from the socket and yields
/// plaintext.
///
/// Records the session must send in response (a TLS 1.3 KeyUpdate answer) are queued in
/// it and go out ahead of the next reply's records; alerts go out when the connection
/// closes ([`TlsWriter::close`]).
pub(super) struct TlsReader {
    socket: SyncSocket,
    session: SharedSession,
    ciphertext: Vec<u8>,
    start: usize,
    end: usize,
}

impl TlsReader {
    pub(super) fn new(socket: SyncSocket, session: SharedSession, leftover: Vec<u8>) -> Self {
        let end = leftover.len();
        let mut ciphertext = leftover;
        ciphertext.resize(end.max(CIPHERTEXT_BUFFER), 0);
        TlsReader {
            socket,
            session,
            ciphertext,
            start: 0,
            end,
        }
    }

    /// Whether bytes of the stream wait here (ciphertext not yet fed to the session, or
    /// plaintext decrypted and not yet read).
    pub(super) fn buffered(&self) -> bool {
        self.start < self.end
            || lock(&self.session)
                .process_new_packets()
                .is_ok_and(|state| state.plaintext_bytes_to_read() > 0)
    }
}

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            {
                let mut session = lock(&self.session);
                loop {
                    match session.reader().read(buf) {
                        // Zero: the client sent close_notify.
                        Ok(n) => return Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                    if self.start == self.end {
                        break;
                    }
                    let fed = session.read_tls(&mut &self.ciphertext[self.start..self.end])?;
                    if fed == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "the TLS session takes no more records from the client",
                        ));
                    }
                    self.start += fed;
                    if let Err(err) = session.process_new_packets() {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("TLS record from the client refused: {err}"),
                        ));
                    }
                }
            }
            self.start = 0;
            self.end = loop {
                match self.socket.read(&mut self.ciphertext) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    read => break read?,
                }
            };
            if self.end == 0 {
                // The socket ended without close_notify: for NBD, whose requests carry
                // their own lengths, a truncation shows as a short request or payload.
                return Ok(0);
            }
        }
    }
}

/// Plaintext a writer seals at once before sending it (bounds the time the session lock
/// is held and the staging buffer).
const SEAL_CHUNK: usize = 256 * 1024;

/// The reply side of a TLS connection; used under the connection's reply lock.
pub(super) struct TlsWriter {
    socket: SyncSocket,
    session: SharedSession,
    staging: Vec<u8>,
}

impl TlsWriter {
    pub(super) fn new(socket: SyncSocket, session: SharedSession) -> Self {
        TlsWriter {
            socket,
            session,
            staging: Vec::with_capacity(SEAL_CHUNK + 16 * 1024),
        }
    }

    /// Seal `data` chunk by chunk and send the records (with anything the session queued
    /// before them).
    pub(super) fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        for chunk in data.chunks(SEAL_CHUNK) {
            self.staging.clear();
            {
                let mut session = lock(&self.session);
                let mut written = 0;
                while written < chunk.len() {
                    match session.writer().write(&chunk[written..])? {
                        0 => return Err(io::Error::other("the TLS session accepts no more data")),
                        n => written += n,
                    }
                }
                while session.wants_write() {
                    session.write_tls(&mut self.staging)?;
                }
            }
            self.socket.write_all(&self.staging)?;
        }
        Ok(())
    }

    /// End the session: close_notify (after any queued records, alerts included), best
    /// effort, as the client may be gone.
    pub(super) fn close(&mut self) {
        self.staging.clear();
        {
            let mut session = lock(&self.session);
            session.send_close_notify();
            while session.wants_write() {
                if session.write_tls(&mut self.staging).is_err() {
                    break;
                }
            }
        }
        let _ = self.socket.write_all(&self.staging);
    }
}
