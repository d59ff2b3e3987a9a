//! `tidemark serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

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

    /// NBD connections served at once; a client past it is refused (NBD_REP_ERR_POLICY on
    /// its first option) and the refusal is logged.
    #[arg(long, value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_connections: u32,

    /// Close an NBD connection that sends no request for this long (nothing in flight):
    /// seconds, or with a unit: 90s, 15m, 1h.
    #[arg(long, value_name = "DURATION", default_value = "15m", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Serve Prometheus metrics (OpenMetrics text over HTTP, at /metrics) on HOST:PORT,
    /// e.g. 127.0.0.1:9470, or on a Unix socket PATH (mode 0600): per volume dirty
    /// blocks, COW store use and last backup; NBD bytes and connections per export;
    /// backup jobs by state.
    #[arg(long, value_name = "HOST:PORT|PATH")]
    pub metrics: Option<tidemark_daemon::MetricsAddr>,
}

/// `90`, `90s`, `15m`, `1h`: a whole number of seconds, minutes or hours, at least 1 s.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("unknown unit {unit:?}: use s, m or h (e.g. 15m)")),
    };
    let count: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: use e.g. 90s, 15m or 1h"))?;
    match count.checked_mul(scale) {
        Some(secs) if secs > 0 => Ok(Duration::from_secs(secs)),
        _ => Err(format!("{text:?} is out of range: use 1s to a few days")),
    }
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
        max_connections: args.max_connections as usize,
        idle_timeout: args.idle_timeout,
        tls: args.tls.config(),
        listen_insecure: args.tls.listen_insecure,
        metrics: args.metrics,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_seconds_minutes_and_hours() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        for bad in ["", "0", "m", "5d", "-1s", "99999999999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
