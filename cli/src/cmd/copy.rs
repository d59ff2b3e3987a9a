//! `tidemark copy`.

use std::process::ExitCode;

/// Copy a whole image (file, device or NBD URI) with the io_uring copy engine.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`tidemark copy` is not built yet")
}
