//! `tidemark update-img`.

use std::process::ExitCode;

/// Copy only the changed extents of a snapshot into an existing image.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`tidemark update-img` is not built yet")
}
