//! `tidemark demo`: the whole job on an embedded default, end to end, in a temporary
//! directory.
//!
//! 1. create a sparse backing file and start a daemon (`tidemark serve`, this binary) on a
//!    state dir of its own;
//! 2. `volume-create` over the control socket, then fill half the volume through its live
//!    NBD export;
//! 3. start a writer that keeps writing through the live export for the rest of the demo
//!    (random offsets, mostly in a hot region, some all-zero writes), one write at a time,
//!    recording every acknowledged write in an in-memory model ([`truth`]);
//! 4. three backups: `backup-begin` (full, then incremental from the previous checkpoint),
//!    `tidemark pull` of the exported snapshot while the writer goes on (full into an
//!    image, incrementals into delta files), `backup-end`;
//! 5. restore every point (the image, then the image plus each delta) and compare it byte
//!    for byte with the model; finally compare the live volume with the model;
//! 6. print the report: bytes written, bytes pulled per backup, throughput, the write pause
//!    of each snapshot (the daemon's and the one the writer saw).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;
use serde_json::Value;
use tidemark_daemon::client::Client as ControlClient;
use tidemark_daemon::protocol::{
    BackupBeginArgs, BackupEndArgs, Command as Request, VolumeCreateArgs,
};

use crate::pull::{self, human_bytes, Mode, PullRequest, Targets};
use crate::ui;

use tidemark_engine::copy::delta::{restore_chain, ChainBase};
use tidemark_engine::copy::JobOptions;
use tidemark_nbd::client::{Client, ClientOptions};
use tidemark_nbd::uri::NbdUri;

use self::truth::Truth;

/// Run the whole job in a temporary directory: a volume, live writes, a full and two
/// incremental pull backups, every point restored and verified byte for byte.
///
/// The demo starts its own daemon (`tidemark serve`) on a fresh state dir, creates a
/// volume on a sparse file, and keeps writing to it through its live NBD export while it
/// takes three backups in libvirt's pull style (`backup begin`, `tidemark pull` of the
/// exported snapshot, `backup end`): one full, then two incrementals from the previous
/// checkpoint's dirty bitmap. It restores each point (the full image, then the image plus
/// each delta), compares it with the writes it made, and reports bytes written, bytes
/// pulled per backup, throughput and the write pause of each snapshot.
///
/// Needs no root and no network; everything lives in a temporary directory that is
/// removed at the end (keep it with --keep).
///
/// Examples:
///
///   tidemark demo
///
///   tidemark demo --size 1G --json
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Size of the demo volume, e.g. 64M or 1G.
    #[arg(long, value_name = "SIZE", default_value = "128M", value_parser = parse_volume_size)]
    size: u64,

    /// The volume's change-tracking granularity (a power of two, 4K to 1M).
    #[arg(long, value_name = "SIZE", default_value = "64K", value_parser = parse_granularity)]
    granularity: u64,

    /// How fast the live writer writes during the backups, in MB/s.
    #[arg(long, value_name = "MB/S", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1000))]
    write_rate: u32,

    /// Keep the temporary directory (images, deltas, the daemon's log) and print its path.
    #[arg(long)]
    keep: bool,

    /// Print the report as one line of JSON on stdout.
    #[arg(long)]
    json: bool,
}

fn parse_volume_size(text: &str) -> Result<u64, String> {
    let size = ui::parse_size(text).map_err(|e| e.to_string())?;
    if !(4 << 20..=64 << 30).contains(&size) || size % (1 << 20) != 0 {
        return Err(format!("{text}: use a whole number of MiB from 4M to 64G"));
    }
    Ok(size)
}

fn parse_granularity(text: &str) -> Result<u64, String> {
    let size = ui::parse_size(text).map_err(|e| e.to_string())?;
    if !size.is_power_of_two() || !(4096..=1 << 20).contains(&size) {
        return Err(format!(
            "{text}: the granularity is a power of two from 4K to 1M"
        ));
    }
    Ok(size)
}

/// The whole demo's report.
#[derive(Debug, Serialize)]
struct Report {
    volume_size: u64,
    granularity: u64,
    /// The kept directory (with --keep).
    directory: Option<PathBuf>,
    /// Bytes and writes acknowledged by the live export over the whole demo.
    bytes_written: u64,
    writes: u64,
    /// Throughput of the initial fill through the live export.
    fill_mb_per_sec: f64,
    backups: Vec<BackupReport>,
    /// The live volume read back at the end equals every write made.
    live_volume_verified: bool,
    /// Every restored point and the live volume verified.
    verified: bool,
    seconds: f64,
}

#[derive(Debug, Serialize)]
struct BackupReport {
    /// `full` or `incremental`.
    kind: &'static str,
    checkpoint: String,
    /// The checkpoint whose dirty bitmap was pulled (incremental).
    bitmap: Option<String>,
    /// The write pause the daemon measured around the snapshot (drain, snapshot, resume).
    write_pause_us: u64,
    /// The longest write latency the live writer saw while the backup began.
    writer_pause_us: u64,
    /// Time of the whole `backup-begin` command.
    begin_ms: f64,
    /// From the first freeze step to the last thaw step: the demo quiesces with a freeze
    /// hook (an application's flush-and-pause), no root needed.
    freeze_to_thaw_ms: Option<f64>,
    bytes_pulled: u64,
    bytes_skipped: u64,
    bytes_zeroed: u64,
    pull_seconds: f64,
    pull_mb_per_sec: f64,
    /// Bytes the writer wrote to the live volume while this backup was pulled.
    written_during_pull: u64,
    /// The pull's target: the image (full) or the delta file (incremental).
    target: PathBuf,
    restore_seconds: f64,
    /// The restored point equals the volume at the snapshot.
    verified: bool,
    /// Writes in flight while the backup began (the snapshot may hold any prefix of them).
    ambiguous_writes: usize,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let report = demo(&args)?;
    if args.json {
        ui::print_json(&report)?;
    } else {
        print_report(&report);
    }
    Ok(if report.verified {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(ui::EXIT_DIFFERENT)
    })
}

fn say(args: &Args, text: impl AsRef<str>) {
    if !args.json {
        println!("{}", text.as_ref());
    }
}

fn demo(args: &Args) -> anyhow::Result<Report> {
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("tidemark-demo-")
        .tempdir()
        .context("creating the demo's temporary directory (set TMPDIR to a writable directory)")?;
    let root = dir.path().to_path_buf();
    say(
        args,
        format!(
            "tidemark demo: a {} volume with {} tracking granularity, in {}",
            human_bytes(args.size),
            human_bytes(args.granularity),
            root.display()
        ),
    );

    let backing = root.join("volume.raw");
    File::create(&backing)
        .and_then(|f| f.set_len(args.size))
        .with_context(|| format!("creating the backing file {}", backing.display()))?;
    let daemon = DaemonProcess::start(&root)?;
    let mut control = daemon.connect()?;
    let volume = "demo";
    let created = control
        .execute(&Request::VolumeCreate(VolumeCreateArgs {
            name: volume.into(),
            backing: backing.clone(),
            size: Some(args.size),
            granularity: Some(args.granularity),
            tracking: None,
        }))
        .context("creating the demo volume")?;
    let hooks = write_freeze_hook(&root)?;
    let live_uri = format!(
        "nbd+unix:///{volume}?socket={}",
        daemon.nbd_socket.display()
    );

    // Fill half of the volume through the live export: every other 2 MiB.
    let truth = Truth::new(args.size as usize);
    let mut disk = LiveDisk::connect(&live_uri)?;
    let fill_started = Instant::now();
    let mut rng = SmallRng::seed_from_u64(0x7469_6465_6d61_726b);
    let fill_chunk = 1u64 << 20;
    let mut filled = 0;
    for offset in (0..args.size)
        .step_by(fill_chunk as usize)
        .filter(|o| (o >> 21) % 2 == 0)
    {
        let mut data = vec![0u8; fill_chunk as usize];
        rng.fill_bytes(&mut data);
        let write = truth.sending(offset, Arc::new(data));
        let sent = Instant::now();
        disk.write(offset, &write.data)?;
        truth.acked(&write, sent.elapsed());
        filled += fill_chunk;
    }
    let fill_mb_per_sec = ui::mb_per_sec(filled, fill_started.elapsed().as_secs_f64());
    say(
        args,
        format!(
            "  filled {} through the live export ({fill_mb_per_sec:.0} MB/s)",
            human_bytes(filled)
        ),
    );

    let writer = Writer::start(disk, truth.clone(), args.size, args.write_rate)?;
    let mut backups = Vec::new();
    let mut chain: Vec<PathBuf> = Vec::new();
    let between = (args.size / 16).max(1 << 20);
    for index in 0..3 {
        if index > 0 {
            // Let the writer change a sixteenth of the volume's size between backups.
            writer.wait_for(&truth, between)?;
        }
        let checkpoint = format!("c{}", index + 1);
        let bitmap = (index > 0).then(|| format!("c{index}"));
        let arguments = BackupBeginArgs {
            volumes: vec![volume.into()],
            checkpoint: Some(checkpoint.clone()),
            incremental: bitmap.clone(),
            hooks: Some(vec![hooks.clone()]),
            ..BackupBeginArgs::default()
        };
        truth.open();
        let begin_started = Instant::now();
        let begun = control.execute(&Request::BackupBegin(arguments));
        let begin_ms = begin_started.elapsed().as_secs_f64() * 1e3;
        let point = truth.close();
        let begun = begun.with_context(|| format!("beginning backup {}", index + 1))?;
        let uri = begun["volumes"][0]["uri"]["unix"]
            .as_str()
            .context("backup-begin did not report the snapshot's NBD URI")?
            .to_string();

        let (target, targets, mode) = match &bitmap {
            None => {
                let image = root.join("full.img");
                (
                    image.clone(),
                    Targets {
                        image: Some(image),
                        ..Targets::default()
                    },
                    Mode::Full,
                )
            }
            Some(bitmap) => {
                let delta = root.join(format!("incremental-{index}.delta"));
                let targets = Targets {
                    delta: Some(delta.clone()),
                    checkpoint: Some(checkpoint.clone()),
                    volume_uuid: created["uuid"].as_str().and_then(|u| u.parse().ok()),
                    granularity: Some(args.granularity as u32),
                    ..Targets::default()
                };
                (
                    delta,
                    targets,
                    Mode::Incremental {
                        bitmap: bitmap.clone(),
                    },
                )
            }
        };
        let request = PullRequest {
            uri,
            mode,
            connections: 4,
            queue_depth: 8,
            request_size: 1 << 20,
        };
        let written_before = truth.written().0;
        let pulled = pull::pull(&request, &targets, false)
            .with_context(|| format!("pulling backup {}", index + 1));
        let written_during_pull = truth.written().0 - written_before;
        let ended = control.execute(&Request::BackupEnd(BackupEndArgs {
            volume: Some(volume.into()),
            id: None,
            failed: pulled.is_err(),
        }));
        let pulled = pulled?;
        ended.with_context(|| format!("ending backup {}", index + 1))?;
        chain.push(target.clone());

        let restored_path = root.join(format!("restored-{}.img", index + 1));
        let restore_started = Instant::now();
        restore(&chain, &restored_path)?;
        let restore_seconds = restore_started.elapsed().as_secs_f64();
        let restored = std::fs::read(&restored_path)
            .with_context(|| format!("reading {}", restored_path.display()))?;
        let verified = point.matching_prefix(&restored).is_some();
        drop(restored);
        std::fs::remove_file(&restored_path).ok();

        let report = BackupReport {
            kind: if bitmap.is_some() {
                "incremental"
            } else {
                "full"
            },
            checkpoint,
            bitmap,
            write_pause_us: begun["write_pause_us"].as_u64().unwrap_or(0),
            writer_pause_us: truth.window_pause().as_micros() as u64,
            begin_ms,
            freeze_to_thaw_ms: find_number(&begun["quiesce"], "freeze_to_thaw_ms"),
            bytes_pulled: pulled.bytes_pulled,
            bytes_skipped: pulled.bytes_skipped,
            bytes_zeroed: pulled.bytes_zeroed,
            pull_seconds: pulled.seconds,
            pull_mb_per_sec: pulled.mb_per_sec,
            written_during_pull,
            target,
            restore_seconds,
            verified,
            ambiguous_writes: point.ambiguous.len(),
        };
        say(args, backup_line(index, &report));
        backups.push(report);
    }

    let mut disk = writer.stop()?;
    let live_volume_verified = disk.read_all(args.size)? == truth.mirror();
    drop(disk);
    daemon.stop();
    let (bytes_written, writes) = truth.written();
    let verified = live_volume_verified && backups.iter().all(|b| b.verified);
    let directory = if args.keep { Some(dir.keep()) } else { None };
    Ok(Report {
        volume_size: args.size,
        granularity: args.granularity,
        directory,
        bytes_written,
        writes,
        fill_mb_per_sec,
        backups,
        live_volume_verified,
        verified,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A hook directory with one freeze hook, the kind an application ships to flush and pause
/// around a snapshot; this one only logs each call to `hooks.log`.
fn write_freeze_hook(root: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dir = root.join("hooks");
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Hook directories writable by group or others are refused, whatever the umask.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("setting the mode of {}", dir.display()))?;
    let hook = dir.join("10-demo-app");
    let log = root.join("hooks.log");
    let script = format!("#!/bin/sh\necho \"$1\" >> '{}'\n", log.display());
    std::fs::write(&hook, script).with_context(|| format!("writing {}", hook.display()))?;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("making {} executable", hook.display()))?;
    Ok(dir)
}

/// The first number stored under `key` anywhere in `value`.
fn find_number(value: &Value, key: &str) -> Option<f64> {
    match value {
        Value::Object(map) => map
            .get(key)
            .and_then(Value::as_f64)
            .or_else(|| map.values().find_map(|v| find_number(v, key))),
        Value::Array(items) => items.iter().find_map(|v| find_number(v, key)),
        _ => None,
    }
}

fn backup_line(index: usize, b: &BackupReport) -> String {
    format!(
        "  backup {} ({}{}): pulled {} in {:.2} s ({:.0} MB/s), skipped {}; write pause {:.2} ms \
         (the writer saw {:.2} ms){}; {} written meanwhile; restored and {}",
        index + 1,
        b.kind,
        b.bitmap
            .as_ref()
            .map(|m| format!(" since {m}"))
            .unwrap_or_default(),
        human_bytes(b.bytes_pulled),
        b.pull_seconds,
        b.pull_mb_per_sec,
        human_bytes(b.bytes_skipped),
        b.write_pause_us as f64 / 1e3,
        b.writer_pause_us as f64 / 1e3,
        b.freeze_to_thaw_ms
            .map(|ms| format!(", freeze to thaw {ms:.1} ms"))
            .unwrap_or_default(),
        human_bytes(b.written_during_pull),
        if b.verified {
            "verified byte for byte"
        } else {
            "DIFFERENT from the volume at the snapshot"
        },
    )
}

fn print_report(report: &Report) {
    println!(
        "  live volume {} every write ({} in {} writes)",
        if report.live_volume_verified {
            "holds"
        } else {
            "DOES NOT hold"
        },
        human_bytes(report.bytes_written),
        report.writes
    );
    if let Some(dir) = &report.directory {
        println!("  kept {}", dir.display());
    }
    println!(
        "{} in {:.1} s",
        if report.verified {
            "demo passed"
        } else {
            "demo FAILED"
        },
        report.seconds
    );
}

/// The daemon the demo runs: this binary's `serve` on the demo's state dir, stopped (and
/// killed if need be) when dropped.
struct DaemonProcess {
    child: Child,
    control_socket: PathBuf,
    nbd_socket: PathBuf,
    log: PathBuf,
}

impl DaemonProcess {
    fn start(root: &Path) -> anyhow::Result<DaemonProcess> {
        let state_dir = root.join("state");
        let log = root.join("daemon.log");
        let exe = std::env::current_exe().context("finding the tidemark binary")?;
        let log_file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(exe)
            .arg("serve")
            .arg("--state-dir")
            .arg(&state_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("starting the daemon (tidemark serve)")?;
        let mut daemon = DaemonProcess {
            child,
            control_socket: state_dir.join("control.sock"),
            nbd_socket: state_dir.join("nbd.sock"),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !(daemon.control_socket.exists() && daemon.nbd_socket.exists()) {
            if let Some(status) = daemon.child.try_wait()? {
                bail!(
                    "the daemon exited ({status}) while starting: {}",
                    daemon.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the daemon did not open its sockets within 15 s: {}",
                    daemon.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(daemon)
    }

    fn connect(&self) -> anyhow::Result<ControlClient> {
        ControlClient::connect(&self.control_socket)
            .with_context(|| format!("connecting to the daemon: {}", self.log_tail()))
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(5).collect();
        if lines.is_empty() {
            "its log is empty".to_string()
        } else {
            format!(
                "its log ends with:\n{}",
                lines.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        }
    }

    /// SIGTERM (a clean stop: bitmaps closed clean), then SIGKILL after 10 s.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill")
            .args(["-TERM", &pid])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The live writer: one write at a time through the live export at a steady rate, most of
/// them in a hot region (a tenth of the volume), one in ten all zero.
struct Writer {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<anyhow::Result<LiveDisk>>,
}

impl Writer {
    fn start(mut disk: LiveDisk, truth: Truth, size: u64, rate_mb: u32) -> anyhow::Result<Writer> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name("demo-writer".into())
            .spawn(move || {
                let mut rng = SmallRng::seed_from_u64(0x6c69_7665);
                let block = 4096u64;
                let blocks = size / block;
                let hot_start = rng.gen_range(0..blocks - blocks / 10);
                let rate = f64::from(rate_mb) * 1e6;
                let started = Instant::now();
                let mut sent = 0u64;
                while !flag.load(Ordering::Relaxed) {
                    let len_blocks = rng.gen_range(1..=32u64).min(blocks);
                    let first = if rng.gen_bool(0.8) {
                        hot_start + rng.gen_range(0..(blocks / 10).max(1))
                    } else {
                        rng.gen_range(0..blocks)
                    }
                    .min(blocks - len_blocks);
                    let mut data = vec![0u8; (len_blocks * block) as usize];
                    if !rng.gen_bool(0.1) {
                        rng.fill_bytes(&mut data);
                    }
                    let write = truth.sending(first * block, Arc::new(data));
                    let at = Instant::now();
                    disk.write(write.offset, &write.data)?;
                    truth.acked(&write, at.elapsed());
                    sent += write.data.len() as u64;
                    let due = Duration::from_secs_f64(sent as f64 / rate);
                    if let Some(ahead) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(ahead.min(Duration::from_millis(100)));
                    }
                }
                Ok(disk)
            })
            .context("starting the demo's writer thread")?;
        Ok(Writer { stop, handle })
    }

    /// Wait until `bytes` more have been written, or the writer failed.
    fn wait_for(&self, truth: &Truth, bytes: u64) -> anyhow::Result<()> {
        let target = truth.written().0 + bytes;
        while truth.written().0 < target {
            if self.handle.is_finished() {
                bail!("the live writer stopped early");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn stop(self) -> anyhow::Result<LiveDisk> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.join() {
            Ok(result) => result.context("writing through the live export"),
            Err(_) => bail!("the live writer panicked"),
        }
    }
}

/// The demo's model of the volume: what every acknowledged write put where, and which
/// writes were in flight while a backup began.
///
/// A backup's snapshot is one instant. Writes acknowledged before `backup begin` was sent
/// are in it; writes sent after its reply are not; the writer's few writes sent in
/// between (the demo never stops writing) landed before or after the snapshot instant.
/// The writer issues one write at a time, so the snapshot holds exactly some prefix of
/// those in-between writes, and a restored point is correct when it equals the volume
/// before the window plus one such prefix (see [`Point::matching_prefix`]).
mod truth {
    use std::sync::{Arc, Mutex, MutexGuard};
    use std::time::Duration;

    /// One write the demo sent through the live export.
    #[derive(Debug, Clone)]
    pub struct Write {
        pub seq: u64,
        pub offset: u64,
        pub data: Arc<Vec<u8>>,
    }

    impl Write {
        fn apply(&self, disk: &mut [u8]) {
            let start = self.offset as usize;
            disk[start..start + self.data.len()].copy_from_slice(&self.data);
        }
    }

    #[derive(Debug)]
    struct State {
        mirror: Vec<u8>,
        in_flight: Option<Write>,
        /// While a window is open: the base and the writes sent since.
        window: Option<(Vec<u8>, Vec<Write>)>,
        /// Latencies of writes that were logged in a window, by seq.
        window_latencies: Vec<(u64, Duration)>,
        next_seq: u64,
        bytes_written: u64,
        writes: u64,
    }

    /// The truth the writer keeps and the backups are checked against.
    #[derive(Debug, Clone)]
    pub struct Truth(Arc<Mutex<State>>);

    /// What a backup point must equal.
    #[derive(Debug)]
    pub struct Point {
        /// The volume with every write acknowledged before the window opened.
        pub base: Vec<u8>,
        /// The writes in flight or sent while the window was open, in order.
        pub ambiguous: Vec<Write>,
    }

    impl Truth {
        /// A volume of `size` zero bytes.
        pub fn new(size: usize) -> Truth {
            Truth(Arc::new(Mutex::new(State {
                mirror: vec![0; size],
                in_flight: None,
                window: None,
                window_latencies: Vec::new(),
                next_seq: 0,
                bytes_written: 0,
                writes: 0,
            })))
        }

        fn lock(&self) -> MutexGuard<'_, State> {
            // A writer that panicked leaves a consistent mirror: every step under the lock
            // is a plain assignment.
            self.0
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        }

        /// Call before sending `data` at `offset`; hand the result to [`Truth::acked`].
        pub fn sending(&self, offset: u64, data: Arc<Vec<u8>>) -> Write {
            let mut guard = self.lock();
            let state = &mut *guard;
            let write = Write {
                seq: state.next_seq,
                offset,
                data,
            };
            state.next_seq += 1;
            if let Some((_, window)) = state.window.as_mut() {
                window.push(write.clone());
                state.window_latencies.push((write.seq, Duration::ZERO));
            }
            state.in_flight = Some(write.clone());
            write
        }

        /// The write was acknowledged after `latency`.
        pub fn acked(&self, write: &Write, latency: Duration) {
            let mut state = self.lock();
            write.apply(&mut state.mirror);
            state.in_flight = None;
            state.bytes_written += write.data.len() as u64;
            state.writes += 1;
            if let Some(watched) = state
                .window_latencies
                .iter_mut()
                .find(|(seq, _)| *seq == write.seq)
            {
                watched.1 = latency;
            }
        }

        /// Open a window: the volume as acknowledged so far is the base; from now on every
        /// write sent (and the one in flight) is ambiguous until [`Truth::close`].
        pub fn open(&self) {
            let mut state = self.lock();
            let pending: Vec<Write> = state.in_flight.iter().cloned().collect();
            // The write in flight is watched too: its latency spans the pause.
            state.window_latencies = pending.iter().map(|w| (w.seq, Duration::ZERO)).collect();
            let base = state.mirror.clone();
            state.window = Some((base, pending));
        }

        /// Close the window opened by [`Truth::open`]: the point's truth.
        pub fn close(&self) -> Point {
            let mut state = self.lock();
            match state.window.take() {
                Some((base, ambiguous)) => Point { base, ambiguous },
                None => Point {
                    base: state.mirror.clone(),
                    ambiguous: Vec::new(),
                },
            }
        }

        /// Bytes and writes acknowledged so far.
        pub fn written(&self) -> (u64, u64) {
            let state = self.lock();
            (state.bytes_written, state.writes)
        }

        /// The longest latency of a write watched by the last window (in flight or sent
        /// while it was open), once they are all acknowledged.
        pub fn window_pause(&self) -> Duration {
            self.lock()
                .window_latencies
                .iter()
                .map(|(_, l)| *l)
                .max()
                .unwrap_or_default()
        }

        /// A copy of the volume as every acknowledged write left it.
        pub fn mirror(&self) -> Vec<u8> {
            self.lock().mirror.clone()
        }
    }

    impl Point {
        /// How many of the ambiguous writes the restored point holds, or `None` when it
        /// equals no possible state of the volume.
        pub fn matching_prefix(&self, restored: &[u8]) -> Option<usize> {
            if restored.len() != self.base.len() {
                return None;
            }
            let mut candidate = self.base.clone();
            for p in 0..=self.ambiguous.len() {
                if p > 0 {
                    self.ambiguous[p - 1].apply(&mut candidate);
                }
                if candidate == restored {
                    return Some(p);
                }
            }
            None
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::Instant;

        fn xorshift(state: &mut u64) -> u64 {
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            *state
        }

        #[test]
        fn snapshots_taken_while_writing_match_a_prefix_of_the_window() {
            const SIZE: usize = 8192;
            let truth = Truth::new(SIZE);
            let disk = Arc::new(Mutex::new(vec![0u8; SIZE]));
            let stop = Arc::new(AtomicBool::new(false));
            let writer = {
                let (truth, disk, stop) = (truth.clone(), Arc::clone(&disk), Arc::clone(&stop));
                std::thread::spawn(move || {
                    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
                    while !stop.load(Ordering::Relaxed) {
                        let len = (xorshift(&mut rng) % 512 + 1) as usize;
                        let offset = (xorshift(&mut rng) as usize) % (SIZE - len);
                        let data: Vec<u8> = (0..len).map(|_| xorshift(&mut rng) as u8).collect();
                        let write = truth.sending(offset as u64, Arc::new(data));
                        let started = Instant::now();
                        disk.lock().unwrap()[offset..offset + len].copy_from_slice(&write.data);
                        truth.acked(&write, started.elapsed());
                    }
                })
            };
            for _ in 0..50 {
                std::thread::sleep(Duration::from_micros(300));
                truth.open();
                let snapshot = disk.lock().unwrap().clone();
                let point = truth.close();
                assert!(point.matching_prefix(&snapshot).is_some());
            }
            stop.store(true, Ordering::Relaxed);
            writer.join().unwrap();
            assert_eq!(*disk.lock().unwrap(), truth.mirror());
        }

        #[test]
        fn a_point_missing_a_write_matches_nothing() {
            let truth = Truth::new(64);
            let w = truth.sending(0, Arc::new(vec![1; 8]));
            truth.acked(&w, Duration::ZERO);
            truth.open();
            let point = truth.close();
            assert_eq!(point.matching_prefix(&[0; 64]), None);
            let mut good = vec![0; 64];
            good[..8].fill(1);
            assert_eq!(point.matching_prefix(&good), Some(0));
        }

        #[test]
        fn the_write_in_flight_when_the_window_opens_is_ambiguous() {
            let truth = Truth::new(64);
            let w = truth.sending(8, Arc::new(vec![2; 8]));
            truth.open();
            truth.acked(&w, Duration::from_millis(5));
            let point = truth.close();
            assert_eq!(point.matching_prefix(&[0; 64]), Some(0));
            let mut after = vec![0; 64];
            after[8..16].fill(2);
            assert_eq!(point.matching_prefix(&after), Some(1));
            assert_eq!(truth.window_pause(), Duration::from_millis(5));
        }
    }
}

/// The writer's connection to the live export, with a runtime of its own so the writer
/// thread can use the async client synchronously.
struct LiveDisk {
    runtime: tokio::runtime::Runtime,
    client: Client,
}

impl LiveDisk {
    fn connect(uri: &str) -> anyhow::Result<LiveDisk> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the writer's async runtime")?;
        let parsed: NbdUri = uri.parse()?;
        let options = ClientOptions {
            meta_contexts: Vec::new(),
            ..ClientOptions::default()
        };
        let client = runtime
            .block_on(Client::connect(&parsed, options))
            .with_context(|| format!("connecting to the live export {uri}"))?;
        Ok(LiveDisk { runtime, client })
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> anyhow::Result<()> {
        self.runtime
            .block_on(self.client.write(offset, data, false))
            .with_context(|| {
                format!(
                    "writing {} bytes at {offset} through the live export",
                    data.len()
                )
            })
    }

    /// The whole volume as the live export serves it now.
    fn read_all(&mut self, size: u64) -> anyhow::Result<Vec<u8>> {
        let mut data = vec![0u8; size as usize];
        let step = self.client.max_request().min(4 << 20) as usize;
        for (i, chunk) in data.chunks_mut(step).enumerate() {
            let offset = (i * step) as u64;
            self.runtime
                .block_on(self.client.read(offset, chunk))
                .with_context(|| format!("reading the live export at {offset}"))?;
        }
        Ok(data)
    }
}

impl Drop for LiveDisk {
    fn drop(&mut self) {
        self.runtime.block_on(self.client.disconnect());
    }
}

/// Restore a point with the copy engine's restore job: the full image, then each delta
/// applied in order (the chain's from/to checkpoints checked first).
fn restore(chain: &[PathBuf], dest: &Path) -> anyhow::Result<()> {
    let (base, deltas) = chain
        .split_first()
        .context("a restore needs a full image")?;
    let options = JobOptions {
        direct: true,
        ..JobOptions::default()
    };
    let report = restore_chain(&ChainBase::Image(base.clone()), deltas, dest, &options)
        .with_context(|| format!("restoring {}", dest.display()))?;
    if let Some(failed) = report.failed_extents.first() {
        bail!("restoring {}: {failed}", dest.display());
    }
    Ok(())
}
