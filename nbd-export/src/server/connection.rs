//! One connection on tokio: the handshake under its time limit, then the monitor that
//! starts the transmission thread and turns a shutdown or an export's removal into a soft
//! disconnect (see the module doc of [`server`](super)).

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;

use super::listener::NbdStream;
use super::starttls;
use super::transmission::{transmission, Stopping, SyncSocket, Wire, STOP_POLL};
use super::{Inner, Server};
use crate::negotiate::{Negotiation, Session, Step};
use crate::proto;

/// A negotiated connection: the session, any plaintext read past the negotiation, the
/// stream to transmit on and, after STARTTLS, the TLS session that runs on it.
pub(super) type Handshaken = (Session, Vec<u8>, NbdStream, Option<starttls::Established>);

impl Server {
    /// Negotiate (with the TLS handshake, when required) under the time limit.
    pub(super) async fn handshake(
        &self,
        stream: NbdStream,
    ) -> Result<Option<Handshaken>, ConnError> {
        let limit = self.inner.config.handshake_timeout;
        match tokio::time::timeout(limit, self.greet_and_negotiate(stream)).await {
            Ok(result) => result,
            Err(_) => Err(ConnError::Protocol(format!(
                "handshake not finished within {limit:?}"
            ))),
        }
    }

    async fn greet_and_negotiate(
        &self,
        stream: NbdStream,
    ) -> Result<Option<Handshaken>, ConnError> {
        let tls = match &*self.inner.tls.read().unwrap_or_else(|e| e.into_inner()) {
            Some((tls, unix)) if *unix || matches!(stream, NbdStream::Tcp(_)) => Some(tls.clone()),
            _ => None,
        };
        let mut io = BufReader::with_capacity(64 * 1024, stream);
        io.write_all(&Negotiation::greeting()).await?;
        io.flush().await?;
        let client_flags = io.read_u32().await?;
        let mut negotiation =
            Negotiation::start(client_flags).map_err(|e| ConnError::Protocol(e.to_string()))?;
        if tls.is_some() {
            negotiation = negotiation.require_tls();
        }
        match self.negotiate(&mut io, negotiation).await? {
            Step::Transmit(session) => {
                Ok(Some((session, io.buffer().to_vec(), io.into_inner(), None)))
            }
            Step::StartTls(negotiation) => {
                let Some(tls) = tls else {
                    return Err(ConnError::Protocol("STARTTLS without TLS settings".into()));
                };
                let buffered = io.buffer().to_vec();
                let (secured, scope, capture) =
                    starttls::accept(&tls, buffered, io.into_inner()).await?;
                let mut io = BufReader::with_capacity(64 * 1024, secured);
                match self
                    .negotiate(&mut io, negotiation.tls_established(scope))
                    .await?
                {
                    Step::Transmit(session) => {
                        let mut leftover = io.buffer().to_vec();
                        let (stream, tls) =
                            starttls::establish(io.into_inner(), &capture, &mut leftover)?;
                        Ok(Some((session, leftover, stream, Some(tls))))
                    }
                    _ => Ok(None),
                }
            }
            Step::Options(_) | Step::Close => Ok(None),
        }
    }

    pub(super) async fn connection(&self, stream: NbdStream) -> Result<(), ConnError> {
        let Some((session, leftover, stream, tls)) = self.handshake(stream).await? else {
            return Ok(());
        };
        let (mut removed, counters) = match self
            .inner
            .exports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&session.name)
        {
            Some(entry) => (entry.removed.subscribe(), entry.counters.clone()),
            // Removed during the handshake.
            None => return Ok(()),
        };
        tracing::debug!("NBD transmission: {session:?}");
        // Transmission runs on threads of its own with blocking socket I/O, as each request
        // does blocking export I/O anyway: a worker reads a request, runs it and writes
        // the reply itself, with no hand-off between threads on the hot path. Not on
        // tokio's blocking pool: a connection holds its threads for its whole life.
        let socket = SyncSocket::from_tokio(stream)?;
        let control = socket.try_clone()?;
        let budget = self.inner.config.max_in_flight_bytes;
        let stop = Arc::new(Stopping::default());
        let id = self.inner.next_connection.fetch_add(1, Ordering::Relaxed);
        let (done, mut work) = oneshot::channel();
        std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn({
                let stop = stop.clone();
                move || {
                    let _counted = counters.transmitting();
                    // The monitor may be gone (runtime shutting down); nobody to tell.
                    let _ = done.send(transmission(
                        id,
                        session,
                        Wire {
                            socket,
                            leftover,
                            tls,
                        },
                        counters,
                        budget,
                        &stop,
                    ));
                }
            })
            .map_err(ConnError::Thread)?;
        let mut shutdown = self.inner.shutdown.subscribe();
        let grace = self.inner.config.shutdown_grace;
        // Set when the server stops serving this connection; cleared once it is closed.
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut closed = false;
        // The idle timeout: the request count and when it last moved (or work was seen).
        let idle_timeout = self.inner.config.idle_timeout;
        let idle_check = (idle_timeout / 4).clamp(STOP_POLL, std::time::Duration::from_secs(30));
        let mut seen_requests = 0;
        let mut active_at = tokio::time::Instant::now();
        loop {
            if deadline.is_none() && !closed {
                let requests = stop.requests.load(Ordering::Relaxed);
                if requests != seen_requests || !stop.idle() {
                    seen_requests = requests;
                    active_at = tokio::time::Instant::now();
                } else if active_at.elapsed() >= idle_timeout {
                    tracing::info!(
                        "NBD connection {id}: no request for {idle_timeout:?} \
                         (--idle-timeout); closing it"
                    );
                    let _ = control.shutdown(std::net::Shutdown::Both);
                    closed = true;
                }
            }
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
                done = &mut work => return done.unwrap_or(Err(ConnError::Panicked)),
                _ = shutdown.changed(), if deadline.is_none() => {}
                _ = removed.changed(), if deadline.is_none() => {}
                _ = tokio::time::sleep(STOP_POLL), if polling => {}
                _ = tokio::time::sleep(idle_check), if !polling && !closed => {}
            }
        }
    }

    /// Haggle until transmission, a close, or STARTTLS (never [`Step::Options`]).
    pub(super) async fn negotiate<S>(
        &self,
        io: &mut S,
        mut negotiation: Negotiation,
    ) -> Result<Step, ConnError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (mut rd, mut wr) = tokio::io::split(io);
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
                () = gone => return Ok(Step::Close),
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
                tokio::io::copy(&mut (&mut rd).take(h.length.into()), &mut tokio::io::sink())
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
                done => return Ok(done),
            }
        }
    }
}

pub(super) struct ConnectionGuard(Arc<Inner>);

impl ConnectionGuard {
    /// Count a new connection, unless [`ServerConfig::max_connections`](super::ServerConfig)
    /// are open already.
    pub(super) fn try_new(inner: Arc<Inner>) -> Option<Self> {
        let max = inner.config.max_connections;
        inner
            .active
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(ConnectionGuard(inner))
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
pub(super) enum ConnError {
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The cause is in the message: the error is logged, not chained.
    #[error("cannot start a transmission thread: {0}")]
    Thread(io::Error),
    #[error("the transmission thread panicked")]
    Panicked,
    #[error("protocol error: {0}")]
    Protocol(String),
}
