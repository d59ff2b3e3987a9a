//! `tidemark serve`.

use std::process::ExitCode;

/// Run the daemon: own the volumes of a state dir, serve their live disks over NBD.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`tidemark serve` is not built yet")
}
