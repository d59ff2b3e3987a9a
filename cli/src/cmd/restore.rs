//! `tidemark restore`.

use std::process::ExitCode;

/// Restore an image from a base image and a chain of deltas.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`tidemark restore` is not built yet")
}
