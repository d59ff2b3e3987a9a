//! `tidemark export`.

use std::process::ExitCode;

/// Serve a plain file or block device over NBD, as qemu-nbd does.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`tidemark export` is not built yet")
}
