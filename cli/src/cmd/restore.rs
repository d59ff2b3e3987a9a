//! `tidemark restore`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use tidemark_engine::copy::delta::{open_delta, restore_chain, ChainBase};
use tidemark_engine::copy::{FileSource, Source};

use super::copy::{finish_report, IoArgs};

/// Restore an image from a base and a chain of deltas, applied in order.
///
/// BASE is a full image (file or device) or a full-backup delta file; each DELTA must
/// start from the checkpoint the previous link ends at, and all must be of the same
/// volume: a chain that does not follow on is refused before anything is written, naming
/// the break. DEST is created (or overwritten) and fsynced. An interrupted restore can
/// simply be run again.
///
/// Examples:
///   tidemark restore --into vol.img mon.delta tue.delta wed.delta
///   tidemark restore --into /dev/vg0/vol monday.img tue.delta
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The image to write (file, created or truncated; or a block device).
    #[arg(long, value_name = "DEST")]
    pub into: PathBuf,
    /// The full backup to start from: an image or a full delta file.
    pub base: PathBuf,
    /// Incremental deltas, oldest first.
    pub deltas: Vec<PathBuf>,
    #[command(flatten)]
    pub io: IoArgs,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let base = ChainBase::detect(&args.base);
    // Progress counts the base (its size) and every extent of every delta.
    let mut total = match &base {
        ChainBase::Image(path) => Source::size(&FileSource::open(path, false)?),
        ChainBase::Delta(_) => 0,
    };
    let chain = matches!(base, ChainBase::Delta(_))
        .then_some(&args.base)
        .into_iter()
        .chain(&args.deltas);
    for path in chain {
        total += open_delta(path)?
            .extents()
            .iter()
            .map(|e| e.length)
            .sum::<u64>();
    }
    let (options, bar) = args.io.job_options(total, "restore");
    let report = restore_chain(&base, &args.deltas, &args.into, &options)
        .with_context(|| format!("restoring {}", args.into.display()))?;
    bar.finish_and_clear();
    finish_report(&report, args.json)
}
