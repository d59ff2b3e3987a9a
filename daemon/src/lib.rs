//! tidemark-daemon: what `tidemark serve` runs, as a library the CLI calls and tests start
//! in process.
//!
//! - [`protocol`]: the control protocol's wire types; [`protocol::Command`] is the one typed
//!   list of commands, shared by the server's dispatch and the [`client`];
//! - [`server`]: the control socket (JSON lines, events);
//! - [`Daemon`]: the volume registry and command dispatch; `backup` and `push` run backup
//!   jobs, `volumes` is the facade over engine volumes, snapshots, quiescing and the NBD
//!   server;
//! - [`export`]: the adapters that make engine volumes and snapshots NBD exports;
//! - [`client`]: a blocking client of the control socket.
//!
//! Dependencies point one way: this crate joins the engine and the NBD server, neither
//! knows the other.
#![forbid(unsafe_code)]

mod backup;
pub mod client;
mod config;
mod daemon;
pub mod export;
mod lock;
pub mod protocol;
mod push;
pub mod server;
mod volumes;

pub use config::{default_state_dir, Config, NoStateDir, CONTROL_SOCKET};
pub use daemon::{run, Daemon, DaemonError};

/// `err` and its causes as one line, each cause once: for a control reply's `desc` or an
/// NBD error message, which carry text, not an error chain. A cause whose text the line
/// holds already is not repeated.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
