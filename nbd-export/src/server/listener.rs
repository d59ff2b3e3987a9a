//! Binding Unix and TCP sockets and accepting connections.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::negotiate::Negotiation;
use crate::proto;

use super::connection::ConnectionGuard;
use super::{Server, ServerError};

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
    /// Bind a Unix socket at `path` with mode 0600, replacing a stale socket file.
    /// Must be called inside a tokio runtime.
    ///
    /// The socket is never reachable with a wider mode: it is bound inside a fresh 0700
    /// directory next to `path`, made 0600 there, and renamed into place.
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
        let listener = bind_private(path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let listener = UnixListener::from_std(listener).map_err(listen_err)?;
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
                        if let Err(err) = keepalive(&s) {
                            tracing::warn!("TCP keepalive on {peer}: {err}");
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

    /// Serve one accepted stream, or refuse it when the server is full.
    pub fn spawn_connection(&self, stream: NbdStream, peer: String) {
        let Some(guard) = ConnectionGuard::try_new(self.inner.clone()) else {
            self.refuse(stream, peer);
            return;
        };
        let server = self.clone();
        tokio::spawn(async move {
            let _guard = guard;
            match server.connection(stream).await {
                Ok(()) => tracing::debug!("NBD client {peer} disconnected"),
                Err(err) => tracing::info!("NBD client {peer}: {err}"),
            }
        });
    }

    /// Tell a client past [`ServerConfig::max_connections`](super::ServerConfig) that the
    /// server is full: NBD_REP_ERR_POLICY on its options, within a short time limit.
    fn refuse(&self, stream: NbdStream, peer: String) {
        let max = self.inner.config.max_connections;
        let inner = self.inner.clone();
        if inner.refusing.fetch_add(1, Ordering::SeqCst) >= max {
            // So many refusals at once: close without a word rather than queue them.
            inner.refusing.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(
                "NBD client {peer} closed: {max} connections (--max-connections) are served \
                 and {max} more are being refused"
            );
            return;
        }
        tracing::warn!(
            "NBD client {peer} refused: the server already serves its maximum of {max} \
             connections (--max-connections)"
        );
        tokio::spawn(async move {
            let message = format!(
                "the server already serves its maximum of {max} connections \
                 (--max-connections); try again later"
            );
            let _ = tokio::time::timeout(REFUSAL_TIME, refuse_stream(stream, &message)).await;
            inner.refusing.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// How long a refused client has to send its first option.
const REFUSAL_TIME: Duration = Duration::from_secs(2);

/// Options a refused client may send before it is closed.
const REFUSED_OPTIONS: usize = 16;

/// The refusal: the greeting, the client's flags, then every option answered with
/// NBD_REP_ERR_POLICY and `message` until the client gives up (clients such as libnbd
/// try other options after an error, and fail on the error to NBD_OPT_GO). EXPORT_NAME
/// cannot carry an error and ABORT asks to leave: both are closed.
async fn refuse_stream(mut stream: NbdStream, message: &str) -> std::io::Result<()> {
    match &mut stream {
        NbdStream::Unix(s) => refuse_io(s, message).await,
        NbdStream::Tcp(s) => refuse_io(s, message).await,
    }
}

async fn refuse_io<S>(s: &mut S, message: &str) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    s.write_all(&Negotiation::greeting()).await?;
    let _client_flags = s.read_u32().await?;
    for _ in 0..REFUSED_OPTIONS {
        let mut header = [0u8; proto::OPTION_HEADER_LEN];
        s.read_exact(&mut header).await?;
        let option = proto::parse_option_header(&header)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
        if option.length > proto::MAX_OPTION_LENGTH
            || matches!(option.option, proto::opt::EXPORT_NAME | proto::opt::ABORT)
        {
            break;
        }
        tokio::io::copy(
            &mut (&mut *s).take(option.length.into()),
            &mut tokio::io::sink(),
        )
        .await?;
        let mut out = Vec::new();
        proto::encode_option_reply(
            &mut out,
            option.option,
            proto::rep::ERR_POLICY,
            message.as_bytes(),
        );
        s.write_all(&out).await?;
        s.flush().await?;
    }
    Ok(())
}

/// Keepalive on an accepted TCP socket, so a peer that vanished (host down, cable cut)
/// is noticed within minutes rather than hours.
fn keepalive(stream: &TcpStream) -> std::io::Result<()> {
    use rustix::net::sockopt;
    sockopt::set_socket_keepalive(stream, true)?;
    sockopt::set_tcp_keepidle(stream, Duration::from_secs(60))?;
    sockopt::set_tcp_keepintvl(stream, Duration::from_secs(10))?;
    sockopt::set_tcp_keepcnt(stream, 6)?;
    Ok(())
}

/// Bind a Unix socket at `path` without a window in which it has a wider mode than 0600:
/// bind inside a fresh 0700 directory next to it, chmod, then rename into place.
pub fn bind_private(path: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a socket path must end in a file name",
        )
    })?;
    let mut staging = None;
    for attempt in 0..16u32 {
        let dir = parent.join(format!(
            ".{}.bind-{}-{attempt}",
            name.to_string_lossy(),
            std::process::id()
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {
                staging = Some(dir);
                break;
            }
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(err) => return Err(err),
        }
    }
    let staging = staging.ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!(
                "cannot create a private directory next to {}",
                path.display()
            ),
        )
    })?;
    let bound = (|| {
        let inside = staging.join("s");
        let listener = std::os::unix::net::UnixListener::bind(&inside)?;
        std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&inside, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(staging.join("s"));
    let _ = std::fs::remove_dir(&staging);
    bound
}
