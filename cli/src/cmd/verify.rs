//! `tidemark verify`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use tidemark_engine::copy::delta::{ChainBase, ChainSource};
use tidemark_engine::copy::{self, FileSource, Source};

use super::copy::{human, IoArgs};
use crate::ui;

/// Compare two images byte for byte and report the first differing offset.
///
/// B may be followed by deltas (or be a delta itself): A is then compared with the image
/// that restoring B and the deltas would produce, without writing it.
///
/// Exit status: 0 when they are equal, 1 when they differ (in content or size), 2 when
/// the comparison could not be made (a read error, a missing file).
///
/// Examples:
///   tidemark verify /dev/vg0/snap /backup/vol.img
///   tidemark verify --json restored.img original.img
///   tidemark verify /dev/vg0/snap mon.delta tue.delta wed.delta
#[derive(Debug, clap::Args)]
pub struct Args {
    /// First image (file or block device).
    pub a: PathBuf,
    /// Second image (file or block device), or the base of a delta chain.
    pub b: PathBuf,
    /// Deltas applied on top of B, oldest first.
    pub deltas: Vec<PathBuf>,
    #[command(flatten)]
    pub io: IoArgs,
    /// Print a JSON report on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut a = FileSource::open(&args.a, !args.io.buffered)?;
    let base = ChainBase::detect(&args.b);
    let mut b: Box<dyn Source> = match (&base, args.deltas.is_empty()) {
        (ChainBase::Image(_), true) => Box::new(FileSource::open(&args.b, !args.io.buffered)?),
        _ => Box::new(ChainSource::open(&base, &args.deltas)?),
    };
    let (options, bar) = args.io.job_options(a.size().min(b.size()), "verify");
    let report = copy::verify_images(&mut a, b.as_mut(), &options)
        .with_context(|| format!("comparing {} with {}", args.a.display(), args.b.display()))?;
    bar.finish_and_clear();
    if args.json {
        ui::print_json(&report)?;
    } else if report.equal {
        println!(
            "{} and {} are identical ({})",
            report.a,
            report.b,
            human(report.size_a)
        );
    } else {
        match report.first_difference {
            Some(at)
                if report.size_a != report.size_b && at == report.size_a.min(report.size_b) =>
            {
                println!(
                    "{} ({} bytes) and {} ({} bytes) differ in size; equal up to offset {at}",
                    report.a, report.size_a, report.b, report.size_b
                )
            }
            Some(at) => println!(
                "{} and {} differ: first difference at offset {at} (0x{at:x})",
                report.a, report.b
            ),
            None => println!("{} and {} differ", report.a, report.b),
        }
    }
    Ok(if report.equal {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(ui::EXIT_DIFFERENT)
    })
}
