//! Binding Unix and TCP sockets and accepting connections.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

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
}
