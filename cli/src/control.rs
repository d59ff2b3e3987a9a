//! The CLI side of the daemon's control socket: where the daemon is ([`ClientArgs`]) and
//! how a failed call becomes output and an exit code scripts can trust. The protocol and
//! the client are `tidemark_daemon`'s (docs/CONTROL.md).

use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::json;
use tidemark_daemon::client::{Client, ClientError};

/// Exit code when the daemon cannot be reached (not running, wrong `--state-dir`).
pub const EXIT_NO_DAEMON: u8 = 3;

/// What every client command of the daemon takes: where the daemon is, and `--json`.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// The daemon's state directory (volumes, checkpoints, sockets).
    ///
    /// Default: $TIDEMARK_STATE_DIR, else /var/lib/tidemark as root, else
    /// $XDG_STATE_HOME/tidemark (~/.local/state/tidemark).
    #[arg(long, value_name = "DIR", global = true)]
    pub state_dir: Option<PathBuf>,

    /// The daemon's control socket. Default: <state-dir>/control.sock.
    #[arg(long, value_name = "PATH", global = true)]
    pub control: Option<PathBuf>,

    /// Print the report as one line of JSON on stdout (errors too, as
    /// {"error": {"class": ..., "desc": ...}}).
    #[arg(long, global = true)]
    pub json: bool,
}

impl ClientArgs {
    /// The state dir these arguments name, or the default.
    pub fn state_dir(&self) -> anyhow::Result<PathBuf> {
        match &self.state_dir {
            Some(dir) => Ok(dir.clone()),
            None => Ok(tidemark_daemon::default_state_dir()?),
        }
    }

    /// The control socket path these arguments name.
    pub fn control_path(&self) -> anyhow::Result<PathBuf> {
        match &self.control {
            Some(path) => Ok(path.clone()),
            None => Ok(self.state_dir()?.join(tidemark_daemon::CONTROL_SOCKET)),
        }
    }

    /// Connect to the daemon.
    pub fn connect(&self) -> anyhow::Result<Client> {
        Ok(Client::connect(&self.control_path()?)?)
    }
}

/// Finish a client command: on error, say what failed (on stderr, and as JSON on stdout
/// with `--json`) and exit with a code scripts can trust: 0 success, 2 failure,
/// [`EXIT_NO_DAEMON`] (3) when the daemon cannot be reached.
pub fn finish(json: bool, result: anyhow::Result<ExitCode>) -> anyhow::Result<ExitCode> {
    let err = match result {
        Ok(code) => return Ok(code),
        Err(err) => err,
    };
    if json {
        let class = match err.downcast_ref::<ClientError>() {
            Some(ClientError::Command(command)) => command.class.as_str(),
            Some(ClientError::Connect { .. }) => "DaemonUnreachable",
            _ => "GenericError",
        };
        let _ =
            crate::ui::print_json(&json!({"error": {"class": class, "desc": format!("{err:#}")}}));
    }
    eprintln!("tidemark: error: {err:#}");
    Ok(ExitCode::from(exit_code_for(&err)))
}

/// Turn a failed control call into the process exit code scripts can trust:
/// [`EXIT_NO_DAEMON`] when the daemon cannot be reached, `ui::EXIT_FAILURE` otherwise.
pub fn exit_code_for(err: &anyhow::Error) -> u8 {
    match err.downcast_ref::<ClientError>() {
        Some(ClientError::Connect { .. }) => EXIT_NO_DAEMON,
        _ => crate::ui::EXIT_FAILURE,
    }
}
