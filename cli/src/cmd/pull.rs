//! `tidemark pull`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::ArgGroup;

use crate::pull::{self, Mode, PullRequest, Targets};
use crate::ui;

/// Pull a full or incremental backup from an NBD export into an image and/or a delta file.
///
/// A full pull (`--full`) copies every byte the export's `base:allocation` map says holds
/// data; ranges that read as zero are not transferred and stay holes in the image. An
/// incremental pull (`--bitmap NAME`) asks the export's `qemu:dirty-bitmap:NAME` map which
/// ranges changed and copies only those into an existing image (yesterday's backup),
/// punching the changed ranges that now read as zero. If the export has no such bitmap the
/// pull stops with an error; it never falls back to a full copy on its own.
///
/// Works against tidemark's exports (`backup begin`, `tidemark export --bitmap`) and against
/// qemu's (`qemu-nbd -B BITMAP`, a VM's pull-mode backup export). Reads are pipelined
/// (`--queue-depth`) over several connections when the server allows it (`--connections`).
///
/// Examples:
///
///   tidemark pull --full 'nbd+unix:///vm1@backup?socket=/var/lib/tidemark/nbd.sock' --into vm1.img
///
///   tidemark pull --bitmap mon 'nbd+unix:///vm1@backup?socket=/var/lib/tidemark/nbd.sock' \
///       --into vm1.img --delta vm1-tue.delta
///
///   qemu-nbd -r -B b0 -f qcow2 --socket=/tmp/vm.sock disk.qcow2 &
///   tidemark pull --bitmap b0 'nbd+unix:///?socket=/tmp/vm.sock' --into disk.img --json
#[derive(Debug, clap::Args)]
#[command(group(ArgGroup::new("mode").required(true).args(["bitmap", "full"])))]
#[command(group(ArgGroup::new("target").required(true).multiple(true).args(["into", "delta", "repo"])))]
#[command(group(ArgGroup::new("recorded").multiple(true).args(["delta", "repo"])))]
pub struct Args {
    /// The export, as an NBD URI: `nbd://HOST[:PORT]/EXPORT` or
    /// `nbd+unix:///EXPORT?socket=PATH` (as qemu-img and libnbd write them).
    #[arg(value_name = "NBD-URI")]
    uri: String,

    /// The image to write. A full pull creates it (or replaces its contents), sparse; an
    /// incremental pull updates an existing image of the export's size in place.
    #[arg(long, value_name = "IMAGE")]
    into: Option<PathBuf>,

    /// Incremental: copy only the ranges the export's `qemu:dirty-bitmap:NAME` context
    /// reports as changed. An export without that bitmap is an error.
    #[arg(long, value_name = "NAME")]
    bitmap: Option<String>,

    /// Full: copy the whole export (holes stay holes).
    #[arg(long)]
    full: bool,

    /// Also (or instead of `--into`) write the pulled ranges as a delta file, which
    /// `tidemark restore` applies on top of the previous point.
    #[arg(long, value_name = "FILE")]
    delta: Option<PathBuf>,

    /// Name of the point this pull captures, recorded in the delta file's header
    /// (default: the current time, e.g. `pull-1732245600`).
    #[arg(long, value_name = "NAME", requires = "recorded")]
    checkpoint: Option<String>,

    /// The volume's uuid, recorded in the delta file's header. A tidemark backup export
    /// names it (in its NBD description); for any other export (qemu-nbd, nbdkit) it is
    /// required with --delta: use one uuid per disk, the same for all its deltas.
    #[arg(long, value_name = "UUID", requires = "recorded")]
    volume_uuid: Option<uuid::Uuid>,

    /// Also (or instead) store the pull as the point VOLUME@CHECKPOINT in this repository
    /// (a directory or s3://BUCKET/PREFIX, made by `tidemark repo init`). With --bitmap C
    /// the point is incremental on the repository's point VOLUME@C: only dirty ranges are
    /// read, every clean chunk is reused.
    #[arg(long, value_name = "URL")]
    repo: Option<String>,

    /// The volume's name in the repository (default: the tidemark export's volume).
    #[arg(long, value_name = "NAME", requires = "repo")]
    volume: Option<String>,

    /// The S3 endpoint of an s3:// repository (default: AWS_ENDPOINT_URL, else AWS).
    #[arg(long, value_name = "URL", requires = "repo")]
    s3_endpoint: Option<String>,

    /// Break the repository's lock even if its owner may be alive (prints a warning).
    #[arg(long, requires = "repo")]
    break_lock: bool,

    /// The key file of an encrypted repository (default: $TIDEMARK_REPO_KEY).
    #[arg(long, value_name = "FILE", requires = "repo")]
    repo_key: Option<PathBuf>,

    /// The bitmap's tracking granularity, recorded in the delta file's header (default:
    /// the tidemark export's, else 64K).
    #[arg(long, value_name = "SIZE", value_parser = parse_granularity)]
    granularity: Option<u32>,

    /// Connections to open when the export allows several (NBD_FLAG_CAN_MULTI_CONN).
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    connections: u16,

    /// Reads in flight on each connection.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    queue_depth: u16,

    /// Largest single read, e.g. `1M` or `256K` (at most 32M).
    #[arg(long, value_name = "SIZE", default_value = "2M", value_parser = parse_request_size)]
    request_size: u64,

    /// Print a one-line JSON report (bytes pulled, skipped, seconds, MB/s) on stdout.
    #[arg(long)]
    json: bool,
}

fn parse_request_size(text: &str) -> Result<u64, String> {
    let size = ui::parse_size(text).map_err(|e| e.to_string())?;
    if !(4096..=32 << 20).contains(&size) {
        return Err(format!("{text} is out of range: use 4K to 32M"));
    }
    Ok(size)
}

fn parse_granularity(text: &str) -> Result<u32, String> {
    let size = ui::parse_size(text).map_err(|e| e.to_string())?;
    if !size.is_power_of_two() || !(4096..=1 << 20).contains(&size) {
        return Err(format!(
            "{text}: a granularity is a power of two from 4K to 1M"
        ));
    }
    Ok(size as u32)
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mode = match args.bitmap {
        Some(bitmap) => Mode::Incremental { bitmap },
        None => Mode::Full,
    };
    let request = PullRequest {
        uri: args.uri,
        mode,
        connections: usize::from(args.connections),
        queue_depth: usize::from(args.queue_depth),
        request_size: args.request_size,
    };
    let targets = Targets {
        image: args.into,
        delta: args.delta,
        checkpoint: args.checkpoint,
        volume_uuid: args.volume_uuid,
        granularity: args.granularity,
        repo: args.repo.map(|url| pull::repo::RepoTarget {
            url,
            store: tidemark_repo::StoreOptions {
                s3_endpoint: args.s3_endpoint,
                key: args.repo_key,
            },
            volume: args.volume,
            break_lock: args.break_lock,
            workers: 3,
        }),
        ..Targets::default()
    };
    let report = pull::pull(&request, &targets, !args.json)?;
    if args.json {
        ui::print_json(&report)?;
    } else {
        println!("{}", report.summary());
    }
    Ok(ExitCode::SUCCESS)
}
