//! Write throughput through the engine's volume write path, by tracking mode, side by
//! side in one run, as ratios against tracking off.
//!
//! Modes: `raw` (O_DIRECT pwrite on the image, no engine), `off` (a volume with no
//! checkpoint), `durable` (one durable checkpoint, created fresh before each run so
//! blocks turn dirty during the run), `fast` (one fast-mode checkpoint, fresh), `snap-first`
//! (durable checkpoint plus a snapshot taken right before the run: every first write to a
//! chunk copies it) and `snap-rewrite` (the same writes again under the same snapshot);
//! for 4 KiB random writes also `snap-first-4k` (first writes under a snapshot taken with
//! 4 KiB COW chunks instead of the default 64 KiB: each first write copies 4 KiB).
//! Snapshot modes wait for the COW store to take in every copy inside the timing, so
//! copies still queued in memory at the end are paid for.
//! With `snap-first` the bench also runs fio each round on files beside the image, at the
//! pattern's request size and concurrency, and prints the disk's copy-before-write limit
//! 1 / (W/R + 2) beside the measured snap-first ratio: a first write is one read of the
//! old contents (R per second), one write of them into the COW store and the data write
//! (W per second each), so it can reach at most (1/W) / (1/R + 2/W) of a plain write. For
//! 1 MiB sequential writes: sequential O_DIRECT reads R and writes W, 1 MiB at depth 4.
//! For 4 KiB random writes: O_DIRECT 4 KiB random reads R and writes W into a 1 GiB file
//! that is written, from as many threads as the bench's writers (psync), and writes Wf
//! into a freshly fallocated (unwritten) 1 GiB file, the store's case: the limit with
//! store writes as costly as those is 1 / (W/R + 1 + W/Wf), and with store writes that
//! cost nothing (sequential, merged) 1 / (W/R + 1).
//! Patterns: 4 KiB random writes from 8 threads, 1 MiB sequential writes from 4 threads,
//! and 4 KiB random writes from 32 threads (raw, off and durable only: how the durable
//! group commit scales with more writers sharing each sync).
//!
//! The image lives on the main disk (`TIDEMARK_BENCH_DIR`, default /var/tmp; never a
//! tmpfs), is filled with data first, and is written with O_DIRECT (the engine uses it
//! for aligned requests); every run ends with a flush (fdatasync) inside the timing.
//! Each figure is the median of `TIDEMARK_BENCH_RUNS` runs (default 5).
//!
//! Run: `cargo bench -p tidemark-benches --bench engine_write`; to run fewer, set
//! `TIDEMARK_BENCH_PATTERNS` and/or `TIDEMARK_BENCH_MODES` to comma-separated names
//! (`off` always runs: it is the ratios' base; `snap-rewrite` runs with `snap-first`).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use tidemark_engine::snapshot::CowOptions;
use tidemark_engine::volume::{SnapshotSpec, TrackingMode, Volume, VolumeOptions};

const VOLUME_SIZE: u64 = 1 << 30;
const GRANULARITY: u32 = 64 << 10;

#[derive(Clone, Copy, Debug)]
struct Pattern {
    name: &'static str,
    block: usize,
    threads: usize,
    total: u64,
    random: bool,
    /// The modes run for this pattern.
    modes: &'static [&'static str],
}

/// Every mode, in run order; `snap-first-4k` (last) only for 4 KiB random writes.
const MODES: [&str; 7] = [
    "raw",
    "off",
    "durable",
    "fast",
    "snap-first",
    "snap-rewrite",
    "snap-first-4k",
];

const PATTERNS: [Pattern; 3] = [
    Pattern {
        name: "4k-random",
        block: 4096,
        threads: 8,
        total: 64 << 20,
        random: true,
        modes: &MODES,
    },
    Pattern {
        name: "1m-seq",
        block: 1 << 20,
        threads: 4,
        total: 512 << 20,
        random: false,
        modes: MODES.split_at(6).0,
    },
    // More writers share each durable sync: how the group commit scales.
    Pattern {
        name: "4k-rand-32t",
        block: 4096,
        threads: 32,
        total: 64 << 20,
        random: true,
        modes: &["raw", "off", "durable"],
    },
];

/// A page-aligned buffer for O_DIRECT, carved out of a plain Vec.
fn aligned(len: usize, seed: u8) -> (Vec<u8>, usize) {
    let mut raw = vec![seed; len + 4096];
    let start = raw.as_ptr().align_offset(4096);
    raw[start..start + len]
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i as u8) ^ seed);
    (raw, start)
}

/// The offsets of one run: the same for every mode (seeded), split across threads.
fn offsets(p: Pattern, run: usize) -> Vec<Vec<u64>> {
    let count = p.total / p.block as u64;
    let mut rng = rand::rngs::StdRng::seed_from_u64(run as u64);
    let all: Vec<u64> = (0..count)
        .map(|i| {
            if p.random {
                rng.gen_range(0..VOLUME_SIZE / p.block as u64) * p.block as u64
            } else {
                // Each run writes a different stretch so "first writes" stay first.
                (i * p.block as u64 + run as u64 * p.total) % VOLUME_SIZE
            }
        })
        .collect();
    let mut per: Vec<Vec<u64>> = vec![Vec::new(); p.threads];
    for (i, o) in all.into_iter().enumerate() {
        per[i % p.threads].push(o);
    }
    per
}

trait Target: Sync {
    fn write(&self, offset: u64, data: &[u8]);
    fn flush(&self);
}

struct Raw(File);

impl Target for Raw {
    fn write(&self, offset: u64, data: &[u8]) {
        self.0.write_all_at(data, offset).expect("raw write");
    }
    fn flush(&self) {
        self.0.sync_data().expect("raw fdatasync");
    }
}

/// A volume under a snapshot: flushing also waits until the COW store has every copy.
struct Snapshotted<'a> {
    volume: &'a Volume,
    snapshot: tidemark_engine::snapshot::Snapshot,
}

impl Target for Snapshotted<'_> {
    fn write(&self, offset: u64, data: &[u8]) {
        Volume::write(self.volume, offset, data, false).expect("volume write");
    }
    fn flush(&self) {
        self.snapshot.wait_idle();
        Volume::flush(self.volume).expect("volume flush");
    }
}

/// Run `snap-first`-style writes on `vol` under its snapshot `name`.
fn run_snapshotted(vol: &Volume, name: &str, p: Pattern, per_thread: &[Vec<u64>]) -> f64 {
    let snapshot = vol
        .snapshots()
        .into_iter()
        .find(|s| s.name() == name)
        .expect("the bench's snapshot");
    run(
        &Snapshotted {
            volume: vol,
            snapshot,
        },
        p,
        per_thread,
    )
}

/// Run fio once on `file` and return the figure at terse v3 field `field` (0-based):
/// bandwidth in KiB/s or IOPS.
fn fio(file: &Path, args: &[&str], field: usize) -> Result<f64, String> {
    let out = std::process::Command::new("fio")
        .args([
            "--name=cow-limit",
            &format!("--filename={}", file.display()),
            "--direct=1",
            "--output-format=terse",
            "--terse-version=3",
        ])
        .args(args)
        .output()
        .map_err(|e| format!("cannot run fio ({e}); install it (scripts/install-deps.sh)"))?;
    if !out.status.success() {
        return Err(format!(
            "fio failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = text.lines().last().unwrap_or("").split(';').collect();
    fields
        .get(field)
        .and_then(|f| f.parse::<f64>().ok())
        .ok_or_else(|| format!("unexpected fio output: {text}"))
}

/// fio's sequential O_DIRECT bandwidth in MB/s (`rw` is `read` or `write`) on `file`,
/// 1 MiB requests at depth 4, as the 1 MiB pattern writes.
fn fio_sequential(file: &Path, rw: &str) -> Result<f64, String> {
    // Terse v3: field 7 is the read bandwidth, field 48 the write bandwidth, in KiB/s.
    let field = if rw == "read" { 6 } else { 47 };
    let kib = fio(
        file,
        &[
            &format!("--rw={rw}"),
            "--bs=1m",
            "--size=512m",
            "--ioengine=libaio",
            "--iodepth=4",
        ],
        field,
    )?;
    Ok(kib * 1024.0 / 1e6)
}

/// fio's 4 KiB random O_DIRECT IOPS (`rw` is `randread` or `randwrite`) on a 1 GiB
/// `file` from `threads` synchronous writers, as the 4 KiB pattern writes, for 5 s.
fn fio_random(file: &Path, rw: &str, threads: usize) -> Result<f64, String> {
    // Terse v3: field 8 is the read IOPS, field 49 the write IOPS.
    let field = if rw == "randread" { 7 } else { 48 };
    fio(
        file,
        &[
            &format!("--rw={rw}"),
            "--bs=4k",
            "--size=1g",
            "--ioengine=psync",
            &format!("--numjobs={threads}"),
            "--group_reporting",
            "--time_based",
            "--runtime=5",
        ],
        field,
    )
}

/// The disk's figures for a first write's three requests, one round: (R, W, Wf) with Wf
/// = W for the sequential pattern (the copy lands in order there).
fn fio_round(dir: &Path, p: Pattern) -> Result<(f64, f64, f64), String> {
    let file = dir.join("fio.img");
    if !p.random {
        let w = fio_sequential(&file, "write")?;
        let r = fio_sequential(&file, "read")?;
        return Ok((r, w, w));
    }
    // fio writes the whole file before reading it: the read and the first write job
    // see written blocks; the last job writes into unwritten extents, as the store does.
    let r = fio_random(&file, "randread", p.threads)?;
    let w = fio_random(&file, "randwrite", p.threads)?;
    let fresh = dir.join("fio-fallocated.img");
    let wf = fio_random(&fresh, "randwrite", p.threads);
    let _ = std::fs::remove_file(&fresh);
    Ok((r, w, wf?))
}

/// The load average, as `uptime` prints it.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

impl Target for Volume {
    fn write(&self, offset: u64, data: &[u8]) {
        Volume::write(self, offset, data, false).expect("volume write");
    }
    fn flush(&self) {
        Volume::flush(self).expect("volume flush");
    }
}

/// MB/s of one run of `p` against `target`, after letting earlier runs' writeback settle.
fn run(target: &dyn Target, p: Pattern, per_thread: &[Vec<u64>]) -> f64 {
    let _ = std::process::Command::new("sync").status();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let done = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        for (t, offsets) in per_thread.iter().enumerate() {
            let done = &done;
            s.spawn(move || {
                let (buf, start) = aligned(p.block, t as u8);
                let data = &buf[start..start + p.block];
                for &o in offsets {
                    target.write(o, data);
                    done.fetch_add(p.block as u64, Ordering::Relaxed);
                }
            });
        }
    });
    target.flush();
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64() / 1e6
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn fill(path: &Path) {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .expect("create image");
    let (buf, start) = aligned(8 << 20, 0x5a);
    for i in 0..VOLUME_SIZE / (8 << 20) {
        file.write_all_at(&buf[start..start + (8 << 20)], i * (8 << 20))
            .expect("fill image");
    }
    file.sync_all().expect("sync image");
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runs: usize = std::env::var("TIDEMARK_BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let base =
        PathBuf::from(std::env::var("TIDEMARK_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()));
    let dir = tempfile::Builder::new()
        .prefix("tidemark-bench-")
        .tempdir_in(&base)
        .expect("bench dir");
    let state = dir.path().join("state");
    let image = dir.path().join("vol.img");
    let fast_image = dir.path().join("fast.img");
    eprintln!(
        "filling two {} MiB images in {} ...",
        VOLUME_SIZE >> 20,
        dir.path().display()
    );
    fill(&image);
    fill(&fast_image);
    let options = |tracking| VolumeOptions {
        granularity: GRANULARITY,
        tracking,
        ..VolumeOptions::default()
    };
    let vol = Arc::new(
        Volume::create(&state, "bench", &image, options(TrackingMode::Durable)).expect("volume"),
    );
    let fast = Volume::create(&state, "fast", &fast_image, options(TrackingMode::Fast))
        .expect("fast volume");
    let raw = Raw(OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&image)
        .expect("open image O_DIRECT"));

    println!("engine write throughput: {} MiB volume, granularity {} KiB, median of {runs} runs, O_DIRECT, fdatasync at the end of each run", VOLUME_SIZE >> 20, GRANULARITY >> 10);
    println!(
        "{:<10} {:<13} {:>10} {:>10}",
        "pattern", "mode", "MB/s", "vs off"
    );
    let wanted = |var: &str, name: &str| {
        std::env::var(var)
            .map(|list| list.split(',').any(|w| w.trim() == name))
            .unwrap_or(true)
    };
    let mut checkpoint = 0;
    for p in PATTERNS {
        if !wanted("TIDEMARK_BENCH_PATTERNS", p.name) {
            continue;
        }
        let mut results: Vec<(&str, Vec<f64>)> = p
            .modes
            .iter()
            .filter(|m| match **m {
                "off" => true,
                // It drops the snapshot snap-first took.
                "snap-rewrite" => wanted("TIDEMARK_BENCH_MODES", "snap-first"),
                m => wanted("TIDEMARK_BENCH_MODES", m),
            })
            .map(|m| (*m, Vec::new()))
            .collect();
        let cow_limit =
            p.modes.contains(&"snap-first") && wanted("TIDEMARK_BENCH_MODES", "snap-first");
        let mut fio_read = Vec::new();
        let mut fio_write = Vec::new();
        let mut fio_fresh = Vec::new();
        let mut fio_error = None;
        let mut loads = Vec::new();
        // Seconds `drop_snapshot` took after snap-rewrite (it deletes the COW store).
        let mut drops = Vec::new();
        for r in 0..runs {
            let offs = offsets(p, r);
            if cow_limit && fio_error.is_none() {
                match fio_round(dir.path(), p) {
                    Ok((rd, w, wf)) => {
                        fio_read.push(rd);
                        fio_write.push(w);
                        fio_fresh.push(wf);
                    }
                    Err(e) => fio_error = Some(e),
                }
                let _ = std::fs::remove_file(dir.path().join("fio.img"));
            }
            // Interleave the modes within each round so drift on a noisy machine hits all alike.
            for (mode, samples) in results.iter_mut() {
                let mbps = match *mode {
                    "raw" => run(&raw, p, &offs),
                    "off" => {
                        for c in vol.checkpoints() {
                            vol.checkpoint_delete(&c.name).expect("delete checkpoint");
                        }
                        run(vol.as_ref(), p, &offs)
                    }
                    "durable" => {
                        checkpoint += 1;
                        vol.checkpoint_create(&format!("c{checkpoint}"))
                            .expect("checkpoint");
                        let mbps = run(vol.as_ref(), p, &offs);
                        eprintln!(
                            "  {} durable run {r}: {} bitmap syncs for {} writes",
                            p.name,
                            vol.tracking_syncs(),
                            p.total / p.block as u64
                        );
                        mbps
                    }
                    "fast" => {
                        checkpoint += 1;
                        fast.checkpoint_create(&format!("f{checkpoint}"))
                            .expect("checkpoint");
                        run(&fast, p, &offs)
                    }
                    "snap-first" => {
                        checkpoint += 1;
                        vol.checkpoint_create(&format!("c{checkpoint}"))
                            .expect("checkpoint");
                        let spec = SnapshotSpec {
                            name: "bench".into(),
                            ..SnapshotSpec::default()
                        };
                        vol.snapshot(spec).expect("snapshot");
                        run_snapshotted(&vol, "bench", p, &offs)
                    }
                    "snap-rewrite" => {
                        let mbps = run_snapshotted(&vol, "bench", p, &offs);
                        let started = Instant::now();
                        vol.drop_snapshot("bench").expect("drop snapshot");
                        drops.push(started.elapsed().as_secs_f64());
                        mbps
                    }
                    "snap-first-4k" => {
                        checkpoint += 1;
                        vol.checkpoint_create(&format!("c{checkpoint}"))
                            .expect("checkpoint");
                        let spec = SnapshotSpec {
                            name: "bench4k".into(),
                            cow: CowOptions {
                                chunk_size: Some(4096),
                                ..CowOptions::default()
                            },
                            ..SnapshotSpec::default()
                        };
                        vol.snapshot(spec).expect("snapshot");
                        let mbps = run_snapshotted(&vol, "bench4k", p, &offs);
                        vol.drop_snapshot("bench4k").expect("drop snapshot");
                        mbps
                    }
                    _ => unreachable!("unknown mode"),
                };
                samples.push(mbps);
            }
            for c in fast.checkpoints() {
                fast.checkpoint_delete(&c.name).expect("delete checkpoint");
            }
            loads.push(load());
        }
        let off = results
            .iter()
            .find(|(m, _)| *m == "off")
            .map_or(f64::NAN, |(_, s)| median(s.clone()));
        let mut snap_first = None;
        let mut durable = None;
        for (mode, samples) in results {
            let m = median(samples);
            if mode == "snap-first" {
                snap_first = Some(m / off);
            }
            if mode == "durable" {
                durable = Some(m / off);
            }
            println!("{:<10} {:<13} {:>10.1} {:>9.2}x", p.name, mode, m, m / off);
        }
        if let (Some(first), Some(durable)) = (snap_first, durable) {
            // snap-first runs under a durable checkpoint too: this is the snapshot's own cost.
            println!(
                "{:<10} snap-first / durable {:.2}x (the copy-before-write cost on top of durable tracking)",
                p.name,
                first / durable
            );
        }
        if !drops.is_empty() {
            println!(
                "{:<10} drop_snapshot (deletes the COW store) median {:.2} s",
                p.name,
                median(drops)
            );
        }
        println!(
            "{:<10} load after each round: {}",
            p.name,
            loads.join(" | ")
        );
        if let Some(err) = fio_error {
            println!("{:<10} copy-before-write limit not measured: {err}", p.name);
        } else if cow_limit {
            let (w, rd, wf) = (median(fio_write), median(fio_read), median(fio_fresh));
            let limit = 1.0 / (w / rd + 2.0);
            let of_limit = |l: f64| {
                snap_first.map_or(String::new(), |ratio| {
                    format!(" (snap-first {ratio:.2}x = {:.2} of it)", ratio / l)
                })
            };
            if p.random {
                println!(
                    "{:<10} fio 4 KiB random, {} threads: read R {rd:.0} IOPS, write W {w:.0} IOPS, write into fallocated Wf {wf:.0} IOPS",
                    p.name, p.threads
                );
                let fresh = 1.0 / (w / rd + 1.0 + w / wf);
                let free = 1.0 / (w / rd + 1.0);
                println!(
                    "{:<10} copy-before-write limit 1/(W/R+2) = {limit:.2}x{}; with store writes into fallocated 1/(W/R+1+W/Wf) = {fresh:.2}x{}; with store writes free 1/(W/R+1) = {free:.2}x{}",
                    p.name,
                    of_limit(limit),
                    of_limit(fresh),
                    of_limit(free)
                );
            } else {
                println!(
                    "{:<10} fio sequential read R {rd:.0} MB/s, write W {w:.0} MB/s: copy-before-write limit 1/(W/R+2) = {limit:.2}x{}",
                    p.name,
                    of_limit(limit)
                );
            }
        }
    }
}
