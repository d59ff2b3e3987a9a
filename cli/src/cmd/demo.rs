//! `tidemark demo`.

use std::process::ExitCode;

/// Run the whole job (volume, live writes, full and incremental pull backups, restore, verify) in a temporary directory.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`tidemark demo` is not built yet")
}
