//! `tidemark delta create` and `tidemark delta info`.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use tidemark_engine::copy::delta::{self, open_delta};
use tidemark_engine::copy::{extents, FileSource, Source};
use tidemark_formats::delta::{CheckpointRef, DeltaHeader, MAGIC};
use uuid::Uuid;

use super::copy::{failed_exit, human, IoArgs};
use super::update_img::read_changed;
use crate::ui;

/// Create and inspect delta files (self-describing files of changed extents between two
/// checkpoints, zstd-compressed per record, restorable with `tidemark restore`).
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    Create(CreateArgs),
    Info(InfoArgs),
}

/// Write the changed extents of a snapshot (or all of it) into a delta file.
///
/// The delta names its volume (uuid) and the checkpoints it goes from and to, so
/// `tidemark restore` can refuse a chain with a missing or foreign link. With a tidemark
/// bitmap as CHANGED they come from the bitmap (the "from" checkpoint is the bitmap's;
/// give --to-checkpoint). With a text list give --volume-uuid, --from-checkpoint and
/// --to-checkpoint. Without --changed (or with --full) the delta is a full backup.
/// Holes and all-zero blocks are stored as zero extents (no payload). The file appears
/// under its name only when complete and fsynced.
///
/// Examples:
///   tidemark delta create --from /dev/vg0/snap --full --volume-uuid 0d5c... --to-checkpoint mon --out mon.delta
///   tidemark delta create --from snap.img --changed mon.bitmap --to-checkpoint tue --out tue.delta
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The snapshot to read (file or block device).
    #[arg(long = "from", value_name = "SNAPSHOT")]
    pub snapshot: PathBuf,
    /// Changed extents: a bitmap file, a delta file, a text list of `OFFSET LENGTH` lines,
    /// or `-` for stdin. Omit for a full backup.
    #[arg(long, conflicts_with = "full")]
    pub changed: Option<String>,
    /// Make a full backup: every extent of the snapshot, from no checkpoint.
    #[arg(long)]
    pub full: bool,
    /// The delta file to write (staged as OUT.partial, created 0640 at most, never
    /// through a symlink, then renamed to OUT).
    #[arg(long)]
    pub out: PathBuf,
    /// The volume's uuid (default: the bitmap's; a new random one for a full backup).
    #[arg(long)]
    pub volume_uuid: Option<Uuid>,
    /// The checkpoint the changes are relative to, as NAME or NAME:GENERATION
    /// (default: the bitmap's).
    #[arg(long, value_name = "NAME[:GEN]")]
    pub from_checkpoint: Option<String>,
    /// The checkpoint the delta brings the volume to, as NAME or NAME:GENERATION
    /// (generation default: the from generation + 1, or 1).
    #[arg(long, value_name = "NAME[:GEN]")]
    pub to_checkpoint: Option<String>,
    /// Tracking granularity recorded in the header (default: the bitmap's, else 64K).
    #[arg(long, value_parser = ui::parse_size)]
    pub granularity: Option<u64>,
    /// zstd level for data records (1 is fastest; 3 compresses better).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub zstd_level: i32,
    #[command(flatten)]
    pub io: IoArgs,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Show a delta file's header and extent counts (the whole file's checksums are checked).
///
/// Example:
///   tidemark delta info --json tue.delta
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// The delta file.
    pub file: PathBuf,
    /// Print JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// The extents listed by the delta file at `path` (whose first bytes are `magic`), or
/// `None` when it is not a delta file.
pub fn delta_extents(path: &Path, magic: &[u8]) -> anyhow::Result<Option<Vec<Range<u64>>>> {
    if magic != MAGIC {
        return Ok(None);
    }
    let reader = open_delta(path)?;
    Ok(Some(reader.extents().iter().map(|e| e.range()).collect()))
}

fn parse_checkpoint(text: &str, default_generation: u64) -> anyhow::Result<CheckpointRef> {
    let (name, generation) = match text.rsplit_once(':') {
        Some((name, generation)) => {
            let generation = generation.parse().with_context(|| {
                format!("checkpoint {text:?}: the generation after ':' must be a number")
            })?;
            (name, generation)
        }
        None => (text, default_generation),
    };
    if name.is_empty() || name.len() > 255 {
        bail!("checkpoint name {name:?} must be 1 to 255 bytes");
    }
    Ok(CheckpointRef {
        name: name.to_string(),
        generation,
    })
}

fn create(args: CreateArgs) -> anyhow::Result<ExitCode> {
    let mut source = FileSource::open(&args.snapshot, !args.io.buffered)?;
    let size = source.size();
    let changed = args
        .changed
        .as_deref()
        .map(|arg| read_changed(arg, size))
        .transpose()?;
    let mut from_header = None;
    if let Some(arg) = args
        .changed
        .as_deref()
        .filter(|a| *a != "-" && delta::is_delta(Path::new(a)))
    {
        from_header = Some(open_delta(Path::new(arg))?.header().clone());
    }
    let bitmap = changed.as_ref().and_then(|c| c.bitmap.clone());
    let volume_uuid = args
        .volume_uuid
        .or(bitmap.as_ref().map(|b| b.volume_uuid))
        .or(from_header.as_ref().map(|h| h.volume_uuid));
    let volume_uuid = match (volume_uuid, &changed) {
        (Some(uuid), _) => uuid,
        (None, None) => Uuid::new_v4(),
        (None, Some(_)) => bail!(
            "--volume-uuid is needed: a text list of extents does not say which volume it is of"
        ),
    };
    let from = match (&args.from_checkpoint, &bitmap, &from_header, &changed) {
        (Some(text), ..) => Some(parse_checkpoint(text, 1)?),
        (None, Some(b), ..) => Some(CheckpointRef { name: b.checkpoint.clone(), generation: b.generation }),
        (None, None, Some(h), _) => h.from.clone(),
        (None, None, None, None) => None,
        (None, None, None, Some(_)) => bail!("--from-checkpoint is needed: a text list of extents does not say since when they changed"),
    };
    let to = match (&args.to_checkpoint, &from_header) {
        (Some(text), _) => parse_checkpoint(text, from.as_ref().map_or(1, |f| f.generation + 1))?,
        (None, Some(h)) => h.to.clone(),
        (None, None) => bail!(
            "--to-checkpoint is needed: name the point in time this delta brings the volume to"
        ),
    };
    let granularity = match args.granularity {
        Some(g) => u32::try_from(g).context("--granularity is too large")?,
        None => bitmap.as_ref().map_or(64 << 10, |b| b.granularity),
    };
    let header = DeltaHeader {
        volume_uuid,
        volume_size: size,
        granularity,
        from,
        to,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let extents = changed.map(|c| c.extents);
    let total = match &extents {
        Some(list) => extents::normalize(list.clone(), size)
            .iter()
            .map(|r| r.end - r.start)
            .sum(),
        None => size,
    };
    let (options, bar) = args.io.job_options(total, "delta");
    let report = delta::create_delta(
        &mut source,
        extents,
        &header,
        &args.out,
        args.zstd_level,
        &options,
    )
    .with_context(|| {
        format!(
            "creating {} from {}",
            args.out.display(),
            args.snapshot.display()
        )
    })?;
    bar.finish_and_clear();
    if args.json {
        ui::print_json(&report)?;
    } else {
        println!(
            "delta {}: volume {}, {} -> {:?}: {} extents, {} data, {} zero, {} file, in {:.2} s ({:.0} MB/s)",
            report.delta,
            report.volume_uuid,
            report.from.as_deref().map_or("full".to_string(), |f| format!("{f:?}")),
            report.to,
            report.extents,
            human(report.bytes_data),
            human(report.bytes_zero),
            human(report.file_bytes),
            report.seconds,
            report.mb_per_sec
        );
    }
    if !report.failed_extents.is_empty() {
        eprintln!(
            "tidemark: the delta was left as {} and is NOT usable for a restore",
            report.delta
        );
    }
    Ok(failed_exit(&report.failed_extents))
}

#[derive(Debug, serde::Serialize)]
struct Info {
    file: String,
    volume_uuid: String,
    volume_size: u64,
    granularity: u32,
    from: Option<String>,
    from_generation: Option<u64>,
    to: String,
    to_generation: u64,
    created_unix: u64,
    extents: usize,
    data_extents: usize,
    bytes_data: u64,
    bytes_zero: u64,
    file_bytes: u64,
}

fn info(args: InfoArgs) -> anyhow::Result<ExitCode> {
    let reader = open_delta(&args.file)?;
    let header = reader.header();
    let data_extents = reader
        .extents()
        .iter()
        .filter(|e| e.kind == tidemark_formats::delta::ExtentKind::Data)
        .count();
    let total: u64 = reader.extents().iter().map(|e| e.length).sum();
    let info = Info {
        file: args.file.display().to_string(),
        volume_uuid: header.volume_uuid.to_string(),
        volume_size: header.volume_size,
        granularity: header.granularity,
        from: header.from.as_ref().map(|c| c.name.clone()),
        from_generation: header.from.as_ref().map(|c| c.generation),
        to: header.to.name.clone(),
        to_generation: header.to.generation,
        created_unix: header.created_unix,
        extents: reader.extents().len(),
        data_extents,
        bytes_data: reader.data_bytes(),
        bytes_zero: total - reader.data_bytes(),
        file_bytes: std::fs::metadata(&args.file).map(|m| m.len()).unwrap_or(0),
    };
    if args.json {
        ui::print_json(&info)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("file:         {}", info.file);
    println!(
        "volume:       {} ({})",
        info.volume_uuid,
        human(info.volume_size)
    );
    match (&info.from, info.from_generation) {
        (Some(name), Some(generation)) => {
            println!("from:         {name:?} (generation {generation})")
        }
        _ => println!("from:         nothing (full backup)"),
    }
    println!(
        "to:           {:?} (generation {})",
        info.to, info.to_generation
    );
    println!("granularity:  {}", human(u64::from(info.granularity)));
    println!(
        "extents:      {} ({} data, {} zero)",
        info.extents,
        info.data_extents,
        info.extents - info.data_extents
    );
    println!(
        "data:         {} in {} of file",
        human(info.bytes_data),
        human(info.file_bytes)
    );
    println!("zeros:        {}", human(info.bytes_zero));
    Ok(ExitCode::SUCCESS)
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Create(args) => create(args),
        Command::Info(args) => info(args),
    }
}
