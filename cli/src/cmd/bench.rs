//! `tidemark bench`.

use std::process::ExitCode;

/// Measure block throughput and latency of a file, device or NBD export.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`tidemark bench` is not built yet")
}
