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
//! - [`chain_export`]: a restore point (base + deltas) served without copying it;
//!   [`point_mount`] mounts its filesystems (`tidemark mount`);
//! - [`client`]: a blocking client of the control socket;
//! - `metrics`: `serve --metrics`, the Prometheus endpoint.
//!
//! Dependencies point one way: this crate joins the engine and the NBD server, neither
//! knows the other.
#![forbid(unsafe_code)]

pub mod attach;
mod attachments;
mod backup;
pub mod chain_export;
pub mod client;
mod config;
mod daemon;
pub mod export;
mod lock;
mod metrics;
pub mod point_mount;
pub mod protocol;
mod push;
mod rollback;
pub mod server;
mod volumes;

pub use config::{
    default_state_dir, Config, NoStateDir, TlsConfig, TlsConfigError, CONTROL_SOCKET,
};
pub use daemon::{run, Daemon, DaemonError};
pub use metrics::MetricsAddr;

pub(crate) use tidemark_engine::error::chain as error_chain;
