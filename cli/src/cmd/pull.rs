//! `tidemark pull`.

use std::process::ExitCode;

/// Pull a full or incremental backup from an NBD export into an image or delta file.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`tidemark pull` is not built yet")
}
