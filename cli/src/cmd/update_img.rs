//! `tidemark update-img`, and reading a CHANGED argument (bitmap file, delta file, text
//! list or stdin) into byte extents.

use std::io::{BufReader, Read};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use tidemark_engine::copy::{self, extents, target, FileSource, Source};
use tidemark_formats::bitmap::{self, BitmapState};

use super::copy::{finish_report, IoArgs};

/// Copy only the changed extents of a snapshot into an existing image (dattobd's
/// update-img, with many requests in flight instead of 4 KiB at a time).
///
/// CHANGED says which extents changed since the image was made. It is one of:
///   - a tidemark dirty bitmap file (its granularity and volume size are checked);
///   - a tidemark delta file (its extents are taken; the data comes from SNAPSHOT);
///   - a text file of `OFFSET LENGTH` lines in bytes (`#` starts a comment);
///   - `-` to read that text list from stdin.
///
/// Extents are widened to 4 KiB boundaries. Zero blocks in the snapshot are punched as
/// holes in the image. The image is fsynced before the command returns; an interrupted
/// run can simply be run again.
///
/// Examples:
///   tidemark update-img /dev/vg0/snap changed.bitmap /backup/vol.img
///   printf '0 65536\n1048576 65536\n' | tidemark update-img snap.img - vol.img
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The snapshot to copy from (file or block device).
    pub snapshot: PathBuf,
    /// The changed extents: a bitmap file, a delta file, a text list, or `-` for stdin.
    pub changed: String,
    /// The image to update in place (file or block device); it must already exist. A
    /// symlink is followed only to a block device.
    pub image: PathBuf,
    #[command(flatten)]
    pub io: IoArgs,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
}

/// The changed extents and, when the input says, which volume and checkpoint they
/// belong to.
#[derive(Debug)]
pub struct Changed {
    pub extents: Vec<Range<u64>>,
    pub bitmap: Option<bitmap::BitmapHeader>,
}

/// Read CHANGED for a volume of `size` bytes.
pub fn read_changed(arg: &str, size: u64) -> anyhow::Result<Changed> {
    if arg == "-" {
        let stdin = std::io::stdin().lock();
        let extents = extents::parse_text_list(BufReader::new(stdin), "stdin")?;
        return Ok(Changed {
            extents,
            bitmap: None,
        });
    }
    let path = Path::new(arg);
    let mut magic = [0u8; 8];
    let mut file = std::fs::File::open(path)
        .with_context(|| format!("opening the changed-extent list {arg}"))?;
    let got = file
        .read(&mut magic)
        .with_context(|| format!("reading {arg}"))?;
    if got == 8 && magic == bitmap::MAGIC {
        let (header, words) = bitmap::read_bitmap_file(path)?;
        if header.state == BitmapState::Inconsistent {
            bail!(
                "{arg}: bitmap of checkpoint {:?} is marked inconsistent (changes were lost in an \
                 unclean stop); make a full copy with `tidemark copy` instead",
                header.checkpoint
            );
        }
        if header.volume_size != size {
            bail!(
                "{arg}: the bitmap describes a volume of {} bytes but the snapshot holds {size}; \
                 is it the bitmap of this volume?",
                header.volume_size
            );
        }
        let granularity = u64::from(header.granularity);
        let extents = bitmap::dirty_runs(&words, header.block_count())
            .map(|blocks| blocks.start * granularity..(blocks.end * granularity).min(size))
            .collect();
        return Ok(Changed {
            extents,
            bitmap: Some(header),
        });
    }
    if let Some(extents) = super::delta::delta_extents(path, &magic[..got])? {
        return Ok(Changed {
            extents,
            bitmap: None,
        });
    }
    let reader =
        BufReader::new(std::fs::File::open(path).with_context(|| format!("opening {arg}"))?);
    let extents = extents::parse_text_list(reader, arg)?;
    Ok(Changed {
        extents,
        bitmap: None,
    })
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut source = FileSource::open(&args.snapshot, !args.io.buffered)?;
    let size = source.size();
    let changed = read_changed(&args.changed, size)?;
    if let Some(header) = &changed.bitmap {
        tracing::info!(
            checkpoint = %header.checkpoint,
            generation = header.generation,
            volume = %header.volume_uuid,
            "changed extents come from the dirty bitmap"
        );
    }
    let total: u64 = extents::normalize(changed.extents.clone(), size)
        .iter()
        .map(|r| r.end - r.start)
        .sum();
    let context = || {
        format!(
            "updating {} from {}",
            args.image.display(),
            args.snapshot.display()
        )
    };
    // Opened O_NOFOLLOW (a symlink only to a block device); the engine writes the handle.
    let image = match target::open_in_place(&args.image) {
        Err(target::TargetError::NotFound { .. }) => bail!(
            "{} does not exist; update-img writes into an existing image (create it with \
             `tidemark copy` first)",
            args.image.display()
        ),
        opened => opened.with_context(context)?,
    };
    let (options, bar) = args.io.job_options(total, "update-img");
    let mut report = copy::update_image(
        &mut source,
        changed.extents,
        &target::handle_path(&image),
        &options,
    )
    .with_context(context)?;
    report.destination = args.image.display().to_string();
    bar.finish_and_clear();
    finish_report(&report, args.json)
}
