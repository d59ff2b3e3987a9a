//! `tidemark copy`, and what the copy-engine commands share: I/O options, progress and
//! reports.

use std::ops::Range;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use tidemark_engine::copy::{
    self, target, CopyError, FailedExtent, FileSource, JobOptions, JobReport, Progress,
};
use tidemark_engine::io::{EngineChoice, EngineConfig};
use tidemark_nbd::client::{Client, ClientOptions};
use tidemark_nbd::export::STATE_ZERO;
use tidemark_nbd::uri::NbdUri;

use crate::ui;

/// Copy a whole image (file, block device or NBD export) with the io_uring copy engine.
///
/// Many reads and writes are in flight at once, with O_DIRECT where the file systems
/// allow it. Holes in the source are not read, all-zero blocks are not written, so a thin
/// image stays thin. The destination is fsynced before the command returns. An
/// interrupted copy can simply be run again.
///
/// Examples:
///   tidemark copy /var/lib/vm/disk.img /backup/disk.img
///   tidemark copy --json /dev/vg0/snap /backup/vol.img
///   tidemark copy 'nbd+unix:///vm1@backup?socket=/run/tidemark/nbd.sock' /backup/vm1.img
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Source: a raw image file, a block device, or an NBD URI (nbd://HOST[:PORT]/EXPORT,
    /// nbd+unix:///EXPORT?socket=PATH); holes the server reports are not read.
    pub src: PathBuf,
    /// Destination: a file (created 0640 at most, or truncated) or a block device
    /// (overwritten). A symlink is followed only to a block device.
    pub dst: PathBuf,
    #[command(flatten)]
    pub io: IoArgs,
    /// Print a JSON summary on stdout (bytes copied, skipped, seconds, MB/s, failed extents).
    #[arg(long)]
    pub json: bool,
}

/// I/O options of the copy-engine commands.
#[derive(Debug, Clone, clap::Args)]
pub struct IoArgs {
    /// Requests in flight at once.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub queue_depth: u16,
    /// Size of each read and write, e.g. 256K or 1M (4 KiB .. 64 MiB).
    #[arg(long, default_value = "1M", value_parser = parse_block_size)]
    pub block_size: u64,
    /// I/O engine: auto (io_uring, or a pread/pwrite thread pool where io_uring is not
    /// allowed), uring or threads. Also settable with TIDEMARK_IO_ENGINE.
    #[arg(long, default_value = "auto")]
    pub engine: EngineChoice,
    /// Go through the page cache instead of using O_DIRECT.
    #[arg(long)]
    pub buffered: bool,
}

fn parse_block_size(text: &str) -> anyhow::Result<u64> {
    let size = ui::parse_size(text)?;
    if !(4096..=64 << 20).contains(&size) || size % 4096 != 0 {
        anyhow::bail!("block size {text:?} must be a multiple of 4K between 4K and 64M");
    }
    Ok(size)
}

impl IoArgs {
    /// Job options with a progress bar over `total` bytes labelled `what`.
    pub fn job_options(&self, total: u64, what: &str) -> (JobOptions, indicatif::ProgressBar) {
        let bar = ui::byte_progress(total, what);
        let progress_bar = bar.clone();
        let progress: Progress = Arc::new(move |bytes| progress_bar.inc(bytes));
        let options = JobOptions {
            direct: !self.buffered,
            engine: EngineConfig {
                choice: self.engine,
                queue_depth: usize::from(self.queue_depth),
                buf_size: self.block_size as usize,
                ..EngineConfig::default()
            },
            progress: Some(progress),
        };
        (options, bar)
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut source: Box<dyn copy::Source> = match args.src.to_str().filter(|s| s.starts_with("nbd"))
    {
        Some(uri) => Box::new(NbdSource::connect(uri)?),
        None => Box::new(FileSource::open(&args.src, !args.io.buffered)?),
    };
    let context = || format!("copying {} to {}", args.src.display(), args.dst.display());
    // Created O_EXCL|O_NOFOLLOW, or opened in place O_NOFOLLOW; the engine writes the handle.
    let dst = target::create_or_open(&args.dst).with_context(context)?;
    let (options, bar) = args.io.job_options(source.size(), "copy");
    let mut report = copy::copy_image(source.as_mut(), &target::handle_path(&dst), &options)
        .with_context(context)?;
    report.destination = args.dst.display().to_string();
    bar.finish_and_clear();
    finish_report(&report, args.json)
}

/// An NBD export as a copy source: reads are split into 64 KiB requests sent together
/// (pipelined over the client's connections); `base:allocation` says what to skip.
struct NbdSource {
    uri: String,
    runtime: tokio::runtime::Runtime,
    client: Client,
}

impl NbdSource {
    fn connect(uri: &str) -> anyhow::Result<NbdSource> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the NBD client runtime")?;
        let parsed: NbdUri = uri
            .parse()
            .with_context(|| format!("bad NBD URI {uri:?}"))?;
        let options = ClientOptions {
            connections: 4,
            ..ClientOptions::default()
        };
        let client = runtime
            .block_on(Client::connect(&parsed, options))
            .with_context(|| format!("connecting to {uri}"))?;
        Ok(NbdSource {
            uri: uri.to_string(),
            runtime,
            client,
        })
    }
}

impl copy::Source for NbdSource {
    fn describe(&self) -> String {
        self.uri.clone()
    }

    fn size(&self) -> u64 {
        self.client.size()
    }

    fn data_extents(&mut self, range: Range<u64>) -> Result<Vec<Range<u64>>, CopyError> {
        let whole = || {
            Ok(std::iter::once(range.clone())
                .filter(|r| !r.is_empty())
                .collect())
        };
        let status = self.runtime.block_on(self.client.block_status(
            "base:allocation",
            range.start,
            range.end - range.start,
        ));
        // A server without block status: read everything.
        let Ok(extents) = status else { return whole() };
        let mut data = Vec::new();
        let mut at = range.start;
        for extent in extents {
            if extent.flags & STATE_ZERO == 0 {
                data.push(at..at + extent.length);
            }
            at += extent.length;
        }
        Ok(data)
    }

    fn engine_file(&self) -> Option<(Arc<std::fs::File>, bool)> {
        None
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        const PIECE: usize = 64 << 10;
        let client = &self.client;
        self.runtime.block_on(async {
            let mut reads = tokio::task::JoinSet::new();
            for (index, part) in buf.chunks(PIECE).enumerate() {
                let (client, len) = (client.clone(), part.len());
                let at = offset + (index * PIECE) as u64;
                reads.spawn(async move { (index, client.read_vec(at, len).await) });
            }
            while let Some(done) = reads.join_next().await {
                let (index, data) = done.map_err(std::io::Error::other)?;
                let data = data.map_err(std::io::Error::other)?;
                buf[index * PIECE..index * PIECE + data.len()].copy_from_slice(&data);
            }
            Ok(())
        })
    }
}

/// Print `report` (JSON or one human line) and list failed extents; the exit code says
/// whether every extent made it.
pub fn finish_report(report: &JobReport, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        ui::print_json(report)?;
    } else {
        println!(
            "{}: {} -> {}: {} copied, {} holes skipped, {} zeros skipped, {} zeroed{} in {:.2} s, {:.0} MB/s ({}{})",
            report.job,
            report.source,
            report.destination,
            human(report.bytes_copied),
            human(report.bytes_skipped_holes),
            human(report.bytes_skipped_zero),
            human(report.bytes_zeroed),
            if report.bytes_unchanged > 0 { format!(", {} unchanged", human(report.bytes_unchanged)) } else { String::new() },
            report.seconds,
            report.mb_per_sec,
            report.engine,
            if report.direct { ", O_DIRECT" } else { ", buffered" },
        );
    }
    Ok(failed_exit(&report.failed_extents))
}

/// List failed extents on stderr; `EXIT_FAILURE` when there are any.
pub fn failed_exit(failed: &[FailedExtent]) -> ExitCode {
    if failed.is_empty() {
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "tidemark: error: {} extent(s) failed; the destination is incomplete there:",
        failed.len()
    );
    for extent in failed {
        eprintln!("  {extent}");
    }
    eprintln!("Fix or replace the failing device and run the same command again.");
    ExitCode::from(ui::EXIT_FAILURE)
}

/// Bytes in binary units, e.g. "1.50 GiB".
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}
