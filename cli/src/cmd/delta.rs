//! `tidemark delta`.

use std::process::ExitCode;

/// Create and inspect delta files.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Not built yet.
    List,
}

pub fn run(_command: Command) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`tidemark delta` is not built yet")
}
