//! `tidemark delta`.

use std::ops::Range;
use std::path::Path;
use std::process::ExitCode;

/// Create and inspect delta files.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Not built yet: waits for the delta format.
    Create,
}

/// The extents listed by the delta file at `path` (whose first bytes are `magic`), or
/// `None` when it is not a delta file.
pub fn delta_extents(_path: &Path, _magic: &[u8]) -> anyhow::Result<Option<Vec<Range<u64>>>> {
    Ok(None)
}

pub fn run(_command: Command) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`tidemark delta` is not built yet")
}
