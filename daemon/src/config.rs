//! Where a daemon keeps its state and listens: the [`Config`] and the default state dir.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How the daemon was asked to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// The state dir: volumes, checkpoints, COW stores, sockets, the daemon lock.
    pub state_dir: PathBuf,
    /// The NBD Unix socket.
    pub nbd_socket: PathBuf,
    /// The control Unix socket.
    pub control_socket: PathBuf,
    /// Also serve NBD over TCP on this address.
    pub listen: Option<SocketAddr>,
    /// NBD connections served at once (`--max-connections`); clients past it are refused.
    pub max_connections: usize,
    /// An NBD connection that sends no request for this long is closed (`--idle-timeout`).
    pub idle_timeout: Duration,
    /// Require TLS on NBD connections over TCP (the Unix socket stays plain).
    pub tls: Option<TlsConfig>,
    /// Allow TCP without TLS (`--listen-insecure`).
    pub listen_insecure: bool,
    /// Serve Prometheus metrics over HTTP here (`--metrics`).
    pub metrics: Option<crate::metrics::MetricsAddr>,
}

/// NBD over TLS: QEMU's x509 credential directory and the authorization list.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// ca-cert.pem, server-cert.pem, server-key.pem, optional ca-crl.pem.
    pub creds: PathBuf,
    /// Require a client certificate signed by the CA.
    pub verify_peer: bool,
    /// The authz-list-file JSON of client identities allowed in (see the README).
    pub authz: Option<PathBuf>,
}

/// The NBD network settings are unsafe or unusable.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// TCP without TLS, not explicitly allowed.
    #[error(
        "refusing to serve NBD on {0} without TLS: anyone who reaches the port could read and \
         write every volume; pass --tls-creds DIR (QEMU's x509 layout), or --listen-insecure \
         on a trusted network"
    )]
    InsecureTcp(SocketAddr),
    /// The credentials or the authz file cannot be used.
    #[error(transparent)]
    Tls(#[from] tidemark_nbd::tls::TlsError),
}

impl Config {
    /// The NBD server's TLS settings, after refusing plain TCP unless it was asked for.
    pub fn nbd_tls(&self) -> Result<Option<tidemark_nbd::tls::TlsServer>, TlsConfigError> {
        let Some(tls) = &self.tls else {
            return match self.listen {
                Some(addr) if !self.listen_insecure => Err(TlsConfigError::InsecureTcp(addr)),
                _ => Ok(None),
            };
        };
        let authz = tls
            .authz
            .as_deref()
            .map(tidemark_nbd::tls::Authz::load)
            .transpose()?;
        Ok(Some(tidemark_nbd::tls::TlsServer::from_dir(
            &tls.creds,
            tls.verify_peer,
            authz,
        )?))
    }
}

impl Config {
    /// The defaults for `state_dir`: both sockets inside it, no TCP.
    pub fn new(state_dir: PathBuf) -> Config {
        Config {
            nbd_socket: state_dir.join("nbd.sock"),
            control_socket: state_dir.join(CONTROL_SOCKET),
            listen: None,
            max_connections: tidemark_nbd::server::DEFAULT_MAX_CONNECTIONS,
            idle_timeout: tidemark_nbd::server::DEFAULT_IDLE_TIMEOUT,
            tls: None,
            listen_insecure: false,
            metrics: None,
            state_dir,
        }
    }
}

/// The control socket's file name in the state dir.
pub const CONTROL_SOCKET: &str = "control.sock";

/// No default state dir can be chosen.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot choose a state dir: neither TIDEMARK_STATE_DIR, XDG_STATE_HOME nor HOME is set; \
     pass --state-dir DIR"
)]
pub struct NoStateDir;

/// The default state dir (DESIGN.md): `$TIDEMARK_STATE_DIR`, else `/var/lib/tidemark` as
/// root, else `$XDG_STATE_HOME/tidemark` (`~/.local/state/tidemark` when unset).
pub fn default_state_dir() -> Result<PathBuf, NoStateDir> {
    state_dir_from(
        std::env::var_os("TIDEMARK_STATE_DIR"),
        is_root(),
        std::env::var_os("XDG_STATE_HOME"),
        std::env::var_os("HOME"),
    )
}

fn state_dir_from(
    explicit: Option<std::ffi::OsString>,
    root: bool,
    xdg_state_home: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> Result<PathBuf, NoStateDir> {
    if let Some(dir) = explicit.filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    if root {
        return Ok(PathBuf::from("/var/lib/tidemark"));
    }
    // The XDG spec says relative values are invalid and must be ignored.
    if let Some(dir) = xdg_state_home
        .map(PathBuf::from)
        .filter(|d| d.is_absolute())
    {
        return Ok(dir.join("tidemark"));
    }
    match home.map(PathBuf::from).filter(|d| d.is_absolute()) {
        Some(home) => Ok(home.join(".local/state/tidemark")),
        None => Err(NoStateDir),
    }
}

/// Whether this process runs as root (the effective uid owns `/proc/self`).
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_dir_follows_design_precedence() {
        let os = |s: &str| Some(std::ffi::OsString::from(s));
        assert_eq!(
            state_dir_from(os("/x"), true, os("/s"), os("/h")).unwrap(),
            PathBuf::from("/x")
        );
        assert_eq!(
            state_dir_from(None, true, os("/s"), os("/h")).unwrap(),
            PathBuf::from("/var/lib/tidemark")
        );
        assert_eq!(
            state_dir_from(None, false, os("/s"), os("/h")).unwrap(),
            PathBuf::from("/s/tidemark")
        );
        assert_eq!(
            state_dir_from(None, false, os("rel"), os("/h")).unwrap(),
            PathBuf::from("/h/.local/state/tidemark")
        );
        assert!(state_dir_from(None, false, None, None).is_err());
    }
}
