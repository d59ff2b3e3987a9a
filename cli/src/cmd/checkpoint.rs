//! `tidemark checkpoint`.

use std::process::ExitCode;

/// Create, list and delete checkpoints of a volume.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Not built yet.
    List,
}

pub fn run(_command: Command) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`tidemark checkpoint` is not built yet")
}
