//! `tidemark serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use tidemark_daemon::{Config, TlsConfig};

/// Run the daemon: own the volumes of a state dir, serve their live disks over NBD.
///
/// One daemon per state dir. Every volume is exported read-write under its name on the
/// NBD socket (nbd+unix:///NAME?socket=<state-dir>/nbd.sock), and backups export their
/// snapshots read-only (default name NAME@backup). The control socket speaks QMP-style
/// JSON lines (docs/CONTROL.md); the other commands (volume, checkpoint, backup, info)
/// are its clients. Both sockets are mode 0600; TCP is used only with --listen.
///
/// SIGTERM or SIGINT stops it cleanly: running backups fail and drop their snapshots,
/// volumes close with their bitmaps marked clean. Logs go to stderr; TIDEMARK_LOG=info
/// (or debug) shows more.
///
/// Examples:
///   tidemark serve
///   tidemark serve --state-dir /srv/tidemark --listen 127.0.0.1:10809
///   socat - UNIX-CONNECT:/var/lib/tidemark/control.sock
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The state directory (volumes, checkpoints, COW stores, sockets); created mode 0700.
    ///
    /// Default: $TIDEMARK_STATE_DIR, else /var/lib/tidemark as root, else
    /// $XDG_STATE_HOME/tidemark.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// The NBD Unix socket. Default: <state-dir>/nbd.sock.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Also serve NBD over TCP on this address, e.g. 127.0.0.1:10809. Needs --tls-creds,
    /// or --listen-insecure to serve in the clear.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<SocketAddr>,

    #[command(flatten)]
    pub tls: TlsArgs,

    /// The control socket. Default: <state-dir>/control.sock.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let state_dir = match args.state_dir {
        Some(dir) => dir,
        None => tidemark_daemon::default_state_dir()?,
    };
    let state_dir = std::path::absolute(&state_dir).unwrap_or(state_dir);
    let config = Config {
        nbd_socket: args.socket.unwrap_or_else(|| state_dir.join("nbd.sock")),
        control_socket: args
            .control
            .unwrap_or_else(|| state_dir.join("control.sock")),
        listen: args.listen,
        tls: args.tls.config(),
        listen_insecure: args.tls.listen_insecure,
        state_dir,
    };
    tidemark_daemon::run(config)?;
    Ok(ExitCode::SUCCESS)
}

/// NBD over TLS, shared by `serve` and `export`.
#[derive(Debug, Clone, clap::Args)]
pub struct TlsArgs {
    /// Require TLS (NBD STARTTLS, X.509) on NBD over TCP (`export`: on its Unix socket
    /// too; `serve` keeps its 0600 Unix socket plain), with QEMU's credential layout in
    /// DIR: ca-cert.pem, server-cert.pem, server-key.pem, optional ca-crl.pem. Clients
    /// connect with nbds://HOST:PORT/EXPORT?tls-certificates=DIR.
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,

    /// Require a client certificate signed by ca-cert.pem (default on; qemu's verify-peer).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set, requires = "tls_creds")]
    pub tls_verify_peer: bool,

    /// Allow in only the client identities (certificate subject DNs) this JSON file lists,
    /// in qemu's authz-list-file layout, each optionally scoped to export globs (README).
    #[arg(long, value_name = "FILE", requires = "tls_creds")]
    pub tls_authz: Option<PathBuf>,

    /// Serve NBD over TCP without TLS (anyone who reaches the port can use every export).
    #[arg(long, conflicts_with = "tls_creds")]
    pub listen_insecure: bool,
}

impl TlsArgs {
    /// The daemon's TLS settings.
    pub fn config(&self) -> Option<TlsConfig> {
        self.tls_creds.as_ref().map(|creds| TlsConfig {
            creds: creds.clone(),
            verify_peer: self.tls_verify_peer,
            authz: self.tls_authz.clone(),
        })
    }
}
