//! `tidemark backup`.

use std::process::ExitCode;

/// Begin, end and inspect backup jobs.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Not built yet.
    List,
}

pub fn run(_command: Command) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`tidemark backup` is not built yet")
}
