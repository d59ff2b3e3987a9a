//! `tidemark volume`.

use std::process::ExitCode;

/// Create, list, inspect and remove volumes.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Not built yet.
    List,
}

pub fn run(_command: Command) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`tidemark volume` is not built yet")
}
