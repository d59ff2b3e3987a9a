//! `tidemark verify`.

use std::process::ExitCode;

/// Compare two images, or a delta chain against an image.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`tidemark verify` is not built yet")
}
