//! `tidemark restore`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use tidemark_engine::copy::delta::{check_chain, open_delta, restore_chain, ChainBase};
use tidemark_engine::copy::{target, FileSource, Source};

use super::copy::{finish_report, IoArgs};

/// Restore an image from a base and a chain of deltas, applied in order.
///
/// BASE is a full image (file or device) or a full-backup delta file; each DELTA must
/// start from the checkpoint the previous link ends at, and all must be of the same
/// volume: a chain that does not follow on is refused before anything is written, naming
/// the break. DEST is created (0640 at most) or overwritten, and fsynced; a symlink at
/// DEST is followed only to a block device. An interrupted restore can simply be run
/// again.
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
    let total_of_image = match &base {
        ChainBase::Image(path) => Source::size(&FileSource::open(path, false)?),
        ChainBase::Delta(_) => 0,
    };
    let mut total = total_of_image;
    let chain = matches!(base, ChainBase::Delta(_))
        .then_some(&args.base)
        .into_iter()
        .chain(&args.deltas);
    let mut headers = Vec::new();
    for path in chain {
        let delta = open_delta(path)?;
        total += delta.extents().iter().map(|e| e.length).sum::<u64>();
        headers.push((path.clone(), delta.header().clone()));
    }
    // A chain that does not follow on is refused before DEST is created.
    check_chain(&headers, matches!(base, ChainBase::Image(_)))?;
    if let (ChainBase::Image(image), Some((path, first))) = (&base, headers.first()) {
        if first.volume_size != total_of_image {
            bail!(
                "{} holds {total_of_image} bytes but {} describes a volume of {} bytes",
                image.display(),
                path.display(),
                first.volume_size
            );
        }
    }
    let context = || format!("restoring {}", args.into.display());
    // Created O_EXCL|O_NOFOLLOW, or opened in place O_NOFOLLOW; the engine writes the handle.
    let dest = target::create_or_open(&args.into).with_context(context)?;
    let (options, bar) = args.io.job_options(total, "restore");
    let mut report = restore_chain(&base, &args.deltas, &target::handle_path(&dest), &options)
        .with_context(context)?;
    report.destination = args.into.display().to_string();
    bar.finish_and_clear();
    finish_report(&report, args.json)
}
