//! The STARTTLS upgrade of a connection: the TLS handshake on the bytes the plain
//! handshake reader may already hold, the authorization check, and the pump that hands
//! the decrypted stream to the blocking transmission threads over a socket pair.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio_rustls::server::TlsStream;

use super::connection::ConnError;
use super::listener::NbdStream;
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

/// Bytes each direction of the pump moves at once.
const PUMP_BUFFER: usize = 256 * 1024;

/// Move the decrypted stream onto one end of a socket pair, pumped by a task, and return
/// the other end for the transmission threads (which need a socket they can block on).
pub(super) fn pump(secured: Secured) -> io::Result<NbdStream> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    ours.set_nonblocking(true)?;
    theirs.set_nonblocking(true)?;
    let mut ours = UnixStream::from_std(ours)?;
    let mut secured = secured;
    tokio::spawn(async move {
        let moved = tokio::io::copy_bidirectional_with_sizes(
            &mut secured,
            &mut ours,
            PUMP_BUFFER,
            PUMP_BUFFER,
        )
        .await;
        if let Err(err) = moved {
            tracing::debug!("NBD TLS connection ended: {err}");
        }
    });
    Ok(NbdStream::Unix(UnixStream::from_std(theirs)?))
}
