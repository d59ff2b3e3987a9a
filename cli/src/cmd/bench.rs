//! `tidemark bench`: measure block throughput and latency of a file, device or NBD export.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use tidemark_engine::io::{EngineChoice, Pages};

use crate::bench::{self, Pattern, Settings};
use crate::ui;

const EXAMPLES: &str = "\
Examples:
  # Random 4 KiB reads, 32 in flight, for 10 seconds, bypassing the page cache:
  tidemark bench --rw randread --bs 4K --qd 32 --time 10 --direct /var/tmp/disk.img

  # Sequential 1 MiB writes into a new 4 GiB file (created sparse; fsync included):
  tidemark bench --rw write --bs 1M --size 4G --direct /var/tmp/new.img

  # An NBD export served by tidemark, qemu-nbd, nbdkit or nbd-server, over 4 connections:
  tidemark bench --rw read --bs 256K --conns 4 'nbd+unix:///vm1?socket=/run/tidemark/nbd.sock'

  # Write a checkable pattern, read it back and report any block that differs:
  tidemark bench --rw randwrite --size 1G --verify /var/tmp/check.img
  # ... and check it again later (same --seed) after a copy, a restore or a reboot:
  tidemark bench --rw read --size 1G --verify /var/tmp/check.img

Writes to a file or device that holds data are refused unless --force; a new file, an
empty one or a sparse file with no data may be written freely. Exit status: 0 on success,
1 when --verify found mismatches, 2 on errors.";

/// Measure block throughput and latency of a file, block device or NBD export.
///
/// Keeps --qd requests of --bs bytes in flight (files and devices through io_uring, or a
/// pread/pwrite thread pool where io_uring is unavailable; NBD exports through tidemark's NBD
/// client) and reports MB/s, IOPS, completion-latency percentiles (p50, p99, p99.9, max) and
/// the CPU time it used. Runs one pass over --size bytes of the target (default: all of it),
/// or repeats passes for --time seconds. Writes end with an fsync (NBD: flush), included in
/// the time.
#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct Args {
    /// What to measure: a file (created when missing; needs --size), a block device, or an
    /// NBD URI such as nbd://HOST:PORT/EXPORT or 'nbd+unix:///EXPORT?socket=PATH'.
    pub target: String,

    /// Access pattern: read, write, randread, randwrite, rw or randrw (mixed, see
    /// --rwmixread).
    #[arg(long, value_enum, default_value = "read")]
    pub rw: Pattern,

    /// Size of each request, e.g. 4K, 64K, 1M.
    #[arg(long, default_value = "4K", value_parser = parse_size_arg)]
    pub bs: u64,

    /// Requests in flight at once (the queue depth).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub qd: u32,

    /// Requests sent to a file or device together, as fio's iodepth_batch_submit. The
    /// default, 1, sends each request as soon as its slot frees, which keeps the device's
    /// queue full; larger batches cost fewer system calls but let the queue run short.
    /// (NBD requests queued together always go out together.)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub submit_batch: u32,

    /// NBD connections to spread the requests over (needs a server that advertises
    /// multi-conn for writes).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub conns: u32,

    /// Bytes of the target to use, from offset 0, e.g. 1G (default: the whole target).
    /// Without --time the run is one pass over them.
    #[arg(long, value_parser = parse_size_arg)]
    pub size: Option<u64>,

    /// Run for this many seconds (repeating passes over --size), e.g. 10 or 2.5.
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub time: Option<Duration>,

    /// Bypass the page cache (O_DIRECT) for files and devices: what the disk does, not the
    /// cache. --bs must then be a multiple of 512 (4K for most devices).
    #[arg(long)]
    pub direct: bool,

    /// Write a checkable pattern (every 8 bytes derived from --seed and the offset) and read
    /// all written blocks back; with a read pattern, check every block read against what an
    /// earlier --verify run with the same --seed wrote. Mismatches are listed with offsets.
    #[arg(long)]
    pub verify: bool,

    /// Seed of the random offsets and of the --verify pattern.
    #[arg(long, default_value_t = bench::DEFAULT_SEED)]
    pub seed: u64,

    /// Percentage of reads in the mixed patterns (rw, randrw).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub rwmixread: u8,

    /// I/O engine for files and devices: auto (io_uring, else threads), uring or threads.
    #[arg(long, default_value = "auto", value_parser = parse_engine)]
    pub engine: EngineChoice,

    /// Back the I/O buffers of files and devices with 4 KiB pages, as fio's default buffers
    /// are, instead of transparent huge pages. A 1 MiB buffer in 4 KiB pages reaches the
    /// device as up to 256 segments; some devices (virtio disks without indirect
    /// descriptors) then take one large request at a time. Use it to compare with a tool
    /// whose buffers are small pages.
    #[arg(long)]
    pub small_pages: bool,

    /// Allow writing to a file or device that holds data (it will be overwritten).
    #[arg(long)]
    pub force: bool,

    /// Print the report as one JSON object (schema "tidemark-bench/1") instead of text.
    #[arg(long)]
    pub json: bool,
}

fn parse_size_arg(text: &str) -> Result<u64, String> {
    ui::parse_size(text).map_err(|err| err.to_string())
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim().trim_end_matches('s');
    let seconds: f64 = trimmed
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: expected seconds, e.g. 10 or 2.5"))?;
    if !(seconds.is_finite() && seconds > 0.0 && seconds <= 1e7) {
        return Err(format!(
            "invalid duration {text:?}: must be more than 0 seconds"
        ));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn parse_engine(text: &str) -> Result<EngineChoice, String> {
    text.parse()
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.bs == 0 {
        bail!("--bs must be more than 0 bytes");
    }
    if args.direct && args.bs % 512 != 0 {
        bail!(
            "--direct needs --bs to be a multiple of 512 bytes (the smallest sector size); got {}",
            args.bs
        );
    }
    let settings = Settings {
        target: bench::Target::parse(&args.target)?,
        target_text: args.target.clone(),
        pattern: args.rw,
        bs: args.bs,
        qd: args.qd as usize,
        submit_batch: args.submit_batch as usize,
        conns: args.conns as usize,
        size: args.size,
        time: args.time,
        direct: args.direct,
        verify: args.verify,
        seed: args.seed,
        rwmixread: args.rwmixread,
        engine: args.engine,
        pages: if args.small_pages {
            Pages::Small
        } else {
            Pages::Huge
        },
        force: args.force,
    };
    let report = bench::run(&settings).context("the benchmark failed")?;
    if args.json {
        ui::print_json(&report)?;
    } else {
        print!("{}", report.to_text());
    }
    match &report.verify {
        Some(verify) if verify.mismatched_blocks > 0 => {
            eprintln!(
                "tidemark: verify: {} of {} blocks checked do not hold the pattern of seed {}",
                verify.mismatched_blocks, verify.checked_blocks, verify.seed
            );
            Ok(ExitCode::from(ui::EXIT_DIFFERENT))
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}
