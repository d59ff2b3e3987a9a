//! The machinery behind `tidemark bench`.
//!
//! - [`workload`]: which request comes next (sequential, random permutation, mixed);
//! - [`driver`]: the loop that keeps `qd` requests in flight on a [`driver::Backend`] and
//!   times each from submission to completion;
//! - [`file`] and [`nbd`]: the backends, over the engine's I/O engines and the NBD client;
//! - [`stats`], [`report`]: histograms, CPU time, the text and JSON report;
//! - [`pattern`]: the data `--verify` writes and checks;
//! - [`target`]: what TARGET names, and the guard against overwriting data.

pub mod driver;
pub mod file;
pub mod nbd;
pub mod pattern;
pub mod report;
pub mod stats;
pub mod target;
pub mod workload;

use std::fs::File;
use std::io::{IsTerminal, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use tidemark_engine::io::{open_file, EngineChoice, OpenOptions, Pages};

use crate::ui;
use driver::{Backend, Limit, Phase, PhaseResult, Verify};
use report::{CpuReport, Report, VerifyReport};
use stats::CpuTime;
use target::FileContents;
pub use target::Target;
pub use workload::Pattern;
use workload::{Direction, Op, Workload};

/// The default seed of random offsets and of the verify pattern.
pub const DEFAULT_SEED: u64 = 0x7469_6465;

/// Everything a run needs, from the command line.
#[derive(Debug, Clone)]
pub struct Settings {
    pub target: Target,
    /// TARGET as the user wrote it, for the report.
    pub target_text: String,
    pub pattern: Pattern,
    pub bs: u64,
    pub qd: usize,
    /// Requests sent to the target together (1: each as soon as its slot frees).
    pub submit_batch: usize,
    pub conns: usize,
    pub size: Option<u64>,
    pub time: Option<Duration>,
    pub direct: bool,
    pub verify: bool,
    pub seed: u64,
    pub rwmixread: u8,
    pub engine: EngineChoice,
    /// The pages behind the I/O buffers of files and devices.
    pub pages: Pages,
    pub force: bool,
}

/// An opened target: the backend, its size, and how it is driven.
struct Opened {
    backend: Box<dyn Backend>,
    size: u64,
    engine: String,
    /// Bytes of the I/O buffers in huge pages (files and devices, where /proc says).
    huge_page_bytes: Option<u64>,
    direct: bool,
    /// Connections really open (NBD; 1 otherwise).
    conns: usize,
}

/// Run the benchmark `settings` describe and report what it measured.
pub fn run(settings: &Settings) -> anyhow::Result<Report> {
    if settings.conns > 1 && !matches!(settings.target, Target::Nbd(_)) {
        bail!("--conns is for NBD targets; files and devices use --qd for parallelism");
    }
    let mut opened = match &settings.target {
        Target::File(path) => open_regular_file(path, settings)?,
        Target::Device(path) => open_device(path, settings)?,
        Target::Nbd(uri) => open_nbd(uri, settings)?,
    };
    let region = settings.size.unwrap_or(opened.size);
    if region > opened.size {
        bail!(
            "--size {region} is larger than the target ({} bytes)",
            opened.size
        );
    }
    let blocks = region / settings.bs;
    if blocks == 0 {
        bail!(
            "the region to measure ({region} bytes) is smaller than one --bs block ({} bytes)",
            settings.bs
        );
    }
    let region = blocks * settings.bs;
    let limit = match settings.time {
        Some(time) => Limit::Time(time),
        None => Limit::Ops(blocks),
    };
    let verify = match (settings.verify, settings.pattern.writes()) {
        (false, _) => Verify::Off,
        (true, true) => Verify::WriteAndCheck {
            seed: settings.seed,
        },
        (true, false) => Verify::CheckAll {
            seed: settings.seed,
        },
    };

    let progress = Progress::new(settings.pattern, region, settings.time);
    let mut workload = Workload::new(
        settings.pattern,
        settings.bs,
        blocks,
        settings.rwmixread,
        settings.seed,
    );
    let mut next_op = || Some(workload.next_op());
    let cpu_before = CpuTime::now()?;
    let phase = Phase {
        bs: settings.bs,
        qd: settings.qd,
        submit_batch: settings.submit_batch,
        limit,
        verify,
        region_blocks: blocks,
    };
    let main = driver::run_phase(
        opened.backend.as_mut(),
        &mut next_op,
        &phase,
        &mut |bytes, elapsed| progress.update(bytes, elapsed),
    )?;
    let cpu = CpuTime::now()?.since(cpu_before);
    progress.finish();

    let readback = match (&verify, &main.written) {
        (Verify::WriteAndCheck { seed }, Some(written)) => {
            let mut blocks_written = written.iter();
            let mut next_op = || {
                blocks_written.next().map(|block| Op {
                    direction: Direction::Read,
                    offset: block * settings.bs,
                })
            };
            let readback = Phase {
                limit: Limit::Ops(u64::MAX),
                verify: Verify::CheckAll { seed: *seed },
                ..phase
            };
            let check = driver::run_phase(
                opened.backend.as_mut(),
                &mut next_op,
                &readback,
                &mut |_, _| {},
            )
            .context("reading back the written pattern failed")?;
            Some(check)
        }
        _ => None,
    };
    Ok(build_report(
        settings,
        &opened,
        region,
        &main,
        cpu,
        readback.as_ref(),
    ))
}

fn build_report(
    settings: &Settings,
    opened: &Opened,
    region: u64,
    main: &PhaseResult,
    cpu: CpuTime,
    readback: Option<&PhaseResult>,
) -> Report {
    let elapsed = main.elapsed;
    let seconds = elapsed.as_secs_f64();
    let bytes = main.read.bytes() + main.write.bytes();
    let ops = main.read.ops() + main.write.ops();
    let verify = settings.verify.then(|| {
        let mut checked_blocks = main.checked_blocks;
        let mut mismatched_blocks = main.mismatched_blocks;
        let mut mismatches = main.mismatches.clone();
        if let Some(readback) = readback {
            checked_blocks += readback.checked_blocks;
            mismatched_blocks += readback.mismatched_blocks;
            mismatches.extend(readback.mismatches.iter().cloned());
            mismatches.truncate(driver::MISMATCHES_LISTED);
        }
        VerifyReport {
            seed: settings.seed,
            checked_blocks,
            mismatched_blocks,
            readback_secs: readback.map(|phase| phase.elapsed.as_secs_f64()),
            mismatches,
        }
    });
    Report {
        schema: report::SCHEMA,
        target: settings.target_text.clone(),
        target_kind: settings.target.kind(),
        engine: opened.engine.clone(),
        huge_page_bytes: opened.huge_page_bytes,
        rw: settings.pattern,
        bs: settings.bs,
        qd: settings.qd,
        submit_batch: settings.submit_batch,
        conns: opened.conns,
        direct: opened.direct,
        region_bytes: region,
        time_limit_secs: settings.time.map(|time| time.as_secs_f64()),
        seed: settings.seed,
        elapsed_secs: seconds,
        bytes,
        ops,
        mb_per_sec: ui::mb_per_sec(bytes, seconds),
        iops: if seconds > 0.0 {
            ops as f64 / seconds
        } else {
            0.0
        },
        read: main.read.summary(elapsed),
        write: main.write.summary(elapsed),
        flush_secs: main.flush.map(|flush| flush.as_secs_f64()),
        cpu: CpuReport::new(cpu, seconds),
        verify,
    }
}

/// Open (and, for a write workload, maybe create or extend) a regular file.
fn open_regular_file(path: &Path, settings: &Settings) -> anyhow::Result<Opened> {
    let writes = settings.pattern.writes();
    if writes {
        let contents = target::check_file_write(path, settings.force)?;
        let wanted = match (contents, settings.size) {
            (FileContents::Missing | FileContents::Empty, None) => bail!(
                "{} is {}: give --size to say how large a file to write",
                path.display(),
                if contents == FileContents::Missing {
                    "missing"
                } else {
                    "empty"
                }
            ),
            (_, size) => size,
        };
        let file = File::options()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let len = file.metadata()?.len();
        if let Some(wanted) = wanted {
            if wanted > len {
                file.set_len(wanted).with_context(|| {
                    format!("cannot extend {} to {wanted} bytes", path.display())
                })?;
            }
        }
    } else {
        let metadata = std::fs::metadata(path).with_context(|| {
            format!(
                "cannot read {}: a read benchmark needs existing data (run a write benchmark \
                 first to create it)",
                path.display()
            )
        })?;
        if metadata.blocks() * 512 < metadata.len().min(settings.size.unwrap_or(u64::MAX)) / 2 {
            eprintln!(
                "tidemark: note: {} is mostly holes; reading holes does not touch the disk, \
                 so the figures flatter it",
                path.display()
            );
        }
    }
    let options = OpenOptions {
        write: writes,
        ..OpenOptions::default()
    }
    .direct(settings.direct);
    let (file, direct) = open_file(path, &options)?;
    if settings.direct && !direct {
        eprintln!(
            "tidemark: note: {} does not allow O_DIRECT; measuring buffered I/O",
            path.display()
        );
    }
    let size = file.metadata()?.len();
    open_backend(file, size, direct, settings)
}

fn open_device(path: &Path, settings: &Settings) -> anyhow::Result<Opened> {
    let writes = settings.pattern.writes();
    if writes {
        let metadata = std::fs::metadata(path)?;
        target::check_device_write(path, &metadata, settings.force)?;
    }
    let options = OpenOptions {
        write: writes,
        ..OpenOptions::default()
    }
    .direct(settings.direct);
    let (mut file, direct) = open_file(path, &options)?;
    let size = file
        .seek(SeekFrom::End(0))
        .with_context(|| format!("cannot find the size of {}", path.display()))?;
    open_backend(file, size, direct, settings)
}

fn open_backend(
    file: File,
    size: u64,
    direct: bool,
    settings: &Settings,
) -> anyhow::Result<Opened> {
    let backend = file::FileBackend::new(
        file,
        settings.engine,
        settings.pages,
        settings.bs,
        settings.qd,
    )?;
    Ok(Opened {
        engine: backend.engine_name(),
        huge_page_bytes: backend.huge_page_bytes(),
        backend: Box::new(backend),
        size,
        direct,
        conns: 1,
    })
}

/// Connect to an NBD export; a write workload needs an export that is writable and, unless
/// `--force`, reports (base:allocation) nothing but holes where it will write.
fn open_nbd(uri: &str, settings: &Settings) -> anyhow::Result<Opened> {
    let backend = nbd::NbdBackend::connect(uri, settings.bs, settings.qd, settings.conns)?;
    let size = backend.size();
    if settings.conns > backend.connections() {
        eprintln!(
            "tidemark: note: {uri} does not advertise multi-conn; measuring over {} connection(s)",
            backend.connections()
        );
    }
    if settings.pattern.writes() {
        if backend.is_read_only() {
            bail!(
                "{uri} is a read-only export; a write benchmark cannot run on it (use --rw read \
                 or randread)"
            );
        }
        if !settings.force {
            let region = settings.size.unwrap_or(size).min(size);
            match backend.first_data(region) {
                Ok(None) => {}
                Ok(Some(offset)) => bail!(
                    "refusing to write to {uri}: the export holds data (the server reports data \
                     at offset {offset}) and a write benchmark overwrites it; pass --force to \
                     overwrite it"
                ),
                Err(err) => bail!(
                    "refusing to write to {uri}: {err:#}, so it may hold data that a write \
                     benchmark would overwrite; pass --force to overwrite it"
                ),
            }
        }
    }
    Ok(Opened {
        engine: "nbd".to_string(),
        huge_page_bytes: None,
        conns: backend.connections(),
        backend: Box::new(backend),
        size,
        direct: false,
    })
}

/// The live progress line: on a terminal only, quiet when stderr is piped.
struct Progress {
    bar: ProgressBar,
    total: Option<u64>,
    time: Option<Duration>,
}

impl Progress {
    fn new(pattern: Pattern, region: u64, time: Option<Duration>) -> Progress {
        if !std::io::stderr().is_terminal() {
            return Progress {
                bar: ProgressBar::hidden(),
                total: None,
                time,
            };
        }
        let bar = ProgressBar::new(1000);
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {elapsed} {msg}")
                .expect("the progress template is valid")
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("bench {}", report_pattern(pattern)));
        Progress {
            bar,
            total: time.is_none().then_some(region),
            time,
        }
    }

    fn update(&self, bytes: u64, elapsed: Duration) {
        if self.bar.is_hidden() {
            return;
        }
        let fraction = match (self.total, self.time) {
            (_, Some(time)) => elapsed.as_secs_f64() / time.as_secs_f64(),
            (Some(total), None) => bytes as f64 / total.max(1) as f64,
            (None, None) => 0.0,
        };
        self.bar
            .set_position((fraction.clamp(0.0, 1.0) * 1000.0) as u64);
        self.bar.set_message(format!(
            "{} {:.1} MB/s",
            report::human_bytes(bytes),
            ui::mb_per_sec(bytes, elapsed.as_secs_f64())
        ));
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

fn report_pattern(pattern: Pattern) -> String {
    serde_json::to_value(pattern)
        .ok()
        .and_then(|value| value.as_str().map(str::to_string))
        .unwrap_or_default()
}
