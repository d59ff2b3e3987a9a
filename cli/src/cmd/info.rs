//! `tidemark info`.

use std::process::ExitCode;

/// Status of every volume, like /proc/elastio-info.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`tidemark info` is not built yet")
}
