//! Crash test: a child process writes at random through the engine (and creates and
//! deletes checkpoints and snapshots meanwhile) and is killed with SIGKILL at a random
//! moment, many times. After each kill the volume is reopened and:
//!
//! - durable mode: every block of every acknowledged write is dirty since the base
//!   checkpoint; every other dirty block was written, or lies in the window that durable
//!   tracking marks ahead of a sequential stream (crate::tracking, step 5); and a snapshot
//!   alive at the kill is reported gone with its COW store deleted;
//! - fast mode: the changes since the base checkpoint are refused as inconsistent (never
//!   silently clean).
//!
//! The test re-executes its own binary as the child (`TIDEMARK_CRASH_CHILD=<dir>`), so it
//! runs without the libtest harness (`harness = false` in Cargo.toml). Bounded: at most
//! [`ROUNDS`] rounds and [`TIME_BUDGET`]; each child also exits on its own after 20 s.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tidemark_engine::status::TrackingStatus;
use tidemark_engine::volume::{SnapshotSpec, TrackingMode, Volume, VolumeError, VolumeOptions};

const SIZE: u64 = 1 << 30;
const GRANULARITY: u32 = 64 << 10;
const WRITERS: usize = 4;
const ROUNDS: usize = 30;
const TIME_BUDGET: Duration = Duration::from_secs(60);
const CHILD_ENV: &str = "TIDEMARK_CRASH_CHILD";

fn main() -> ExitCode {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(Path::new(&dir));
        return ExitCode::SUCCESS;
    }
    let started = Instant::now();
    let result = std::panic::catch_unwind(|| {
        durable_tracking_survives_kill_9();
        fast_tracking_after_kill_9_forces_a_full_backup();
    });
    match result {
        Ok(()) => {
            println!("crash test: ok ({:.1} s)", started.elapsed().as_secs_f64());
            ExitCode::SUCCESS
        }
        Err(_) => ExitCode::FAILURE,
    }
}

/// Kills the child when dropped (a failing assertion must not leave it running).
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn setup(tracking: TrackingMode) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let image = dir.path().join("disk.img");
    File::create(&image)
        .and_then(|f| f.set_len(SIZE))
        .expect("image");
    let options = VolumeOptions {
        granularity: GRANULARITY,
        tracking,
        ..VolumeOptions::default()
    };
    let vol = Volume::create(&state, "vol", &image, options).expect("create volume");
    vol.checkpoint_create("base").expect("base checkpoint");
    vol.close().expect("close");
    (dir, state)
}

fn spawn_child(dir: &Path, state: &Path, round: usize) -> ChildGuard {
    let exe = std::env::current_exe().expect("current exe");
    let child = Command::new(exe)
        .env(CHILD_ENV, dir)
        .env("TIDEMARK_CRASH_STATE", state)
        .env("TIDEMARK_CRASH_ROUND", round.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn child");
    ChildGuard(child)
}

/// Byte ranges from the log lines starting with `tag` in every `log-*` file of `dir`.
fn logged(dir: &Path, tag: &str) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).expect("read dir").flatten() {
        if !entry.file_name().to_string_lossy().starts_with("log-") {
            continue;
        }
        let text = fs::read_to_string(entry.path()).expect("read log");
        for line in text.lines() {
            let mut parts = line.split(' ');
            if parts.next() != Some(tag) {
                continue;
            }
            // A line cut by the kill has no terminating field; skip it.
            let (Some(o), Some(l), Some("end")) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            if let (Ok(o), Ok(l)) = (o.parse(), l.parse()) {
                out.push((o, l));
            }
        }
    }
    out
}

fn blocks(ranges: &[(u64, u64)]) -> BTreeSet<u64> {
    let g = u64::from(GRANULARITY);
    ranges
        .iter()
        .flat_map(|&(o, l)| o / g..(o + l).div_ceil(g))
        .collect()
}

/// Blocks durable tracking may mark ahead of the issued writes: up to 32 times a write's
/// own blocks (at least 16, at most 64 MiB) after it.
fn ahead_windows(ranges: &[(u64, u64)]) -> BTreeSet<u64> {
    let g = u64::from(GRANULARITY);
    let blocks = SIZE / g;
    ranges
        .iter()
        .flat_map(|&(o, l)| {
            let (first, end) = (o / g, (o + l).div_ceil(g));
            let ahead = ((end - first) * 32).clamp(16, (64 << 20) / g);
            end..(end + ahead).min(blocks)
        })
        .collect()
}

fn durable_tracking_survives_kill_9() {
    let (dir, state) = setup(TrackingMode::Durable);
    let started = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7465_6d6b);
    let mut rounds = 0;
    let mut lost_snapshots = 0;
    while rounds < ROUNDS && started.elapsed() < TIME_BUDGET {
        let mut child = spawn_child(dir.path(), &state, rounds);
        // Wait until the child has the volume open, then let it run a random while.
        let ready = dir.path().join(format!("ready-{rounds}"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready.exists() {
            assert!(Instant::now() < deadline, "child did not start");
            if let Ok(Some(status)) = child.0.try_wait() {
                panic!("child exited early: {status}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(5..400)));
        child.0.kill().expect("kill -9");
        child.0.wait().expect("wait");
        drop(child);

        let vol = Volume::open(&state, "vol").expect("reopen after kill -9");
        let acked = blocks(&logged(dir.path(), "A"));
        let issued = blocks(&logged(dir.path(), "I"));
        let g = u64::from(GRANULARITY);
        let reported: BTreeSet<u64> = vol
            .changed_extents("base")
            .expect("durable bitmaps must be consistent after kill -9")
            .into_iter()
            .flat_map(|r| r.start / g..r.end.div_ceil(g))
            .collect();
        let missing: Vec<_> = acked.difference(&reported).collect();
        assert!(
            missing.is_empty(),
            "round {rounds}: acknowledged blocks not dirty: {missing:?}"
        );
        let ahead = ahead_windows(&logged(dir.path(), "I"));
        let phantom: Vec<_> = reported
            .difference(&issued)
            .filter(|b| !ahead.contains(b))
            .collect();
        assert!(
            phantom.is_empty(),
            "round {rounds}: dirty blocks never written: {phantom:?}"
        );
        let status = vol.status();
        assert_eq!(status.tracking, TrackingStatus::Durable, "round {rounds}");
        assert!(status.snapshots.is_empty());
        lost_snapshots += status
            .events
            .iter()
            .filter(|e| e.message.contains("did not survive"))
            .count();
        let leftovers: Vec<_> = fs::read_dir(vol.state_path().join("snapshots"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(
            leftovers.is_empty(),
            "round {rounds}: snapshot files left: {leftovers:?}"
        );
        vol.close().expect("close");
        rounds += 1;
    }
    assert!(
        rounds >= 5,
        "only {rounds} rounds ran within the time budget"
    );
    assert!(
        lost_snapshots > 0,
        "no round killed the child while a snapshot was alive"
    );
    println!("durable: {rounds} kill -9 rounds, {lost_snapshots} lost snapshots reported");
}

fn fast_tracking_after_kill_9_forces_a_full_backup() {
    let (dir, state) = setup(TrackingMode::Fast);
    let mut child = spawn_child(dir.path(), &state, 0);
    let ready = dir.path().join("ready-0");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready.exists() {
        assert!(Instant::now() < deadline, "child did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(200));
    child.0.kill().expect("kill -9");
    child.0.wait().expect("wait");
    drop(child);
    let vol = Volume::open(&state, "vol").expect("reopen");
    assert!(matches!(
        vol.changed_extents("base"),
        Err(VolumeError::Checkpoint(
            tidemark_engine::checkpoint::CheckpointError::Inconsistent { .. }
        ))
    ));
    assert_eq!(vol.status().tracking, TrackingStatus::Inconsistent);
    // A full backup with a new checkpoint starts a consistent chain again.
    vol.checkpoint_create("full").expect("checkpoint");
    vol.write(0, &[1; 4096], false).expect("write");
    assert_eq!(
        vol.changed_extents("full").expect("consistent"),
        vec![0..u64::from(GRANULARITY)]
    );
    vol.close().expect("close");
    println!("fast: unclean stop reported as inconsistent");
}

/// The child: open the volume, write at random from several threads, logging each
/// write's intent ("I") before issuing it and its acknowledgement ("A") after, while the
/// main thread creates and deletes checkpoints and snapshots.
fn child(dir: &Path) {
    let state = PathBuf::from(std::env::var("TIDEMARK_CRASH_STATE").expect("state env"));
    let round: usize = std::env::var("TIDEMARK_CRASH_ROUND")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    // Never outlive a parent that failed to kill us.
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(20));
        std::process::exit(3);
    });
    let vol = Arc::new(Volume::open(&state, "vol").expect("child: open"));
    File::create(dir.join(format!("ready-{round}"))).expect("ready file");
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|t| {
            let vol = vol.clone();
            let stop = stop.clone();
            let path = dir.join(format!("log-{round}-{t}"));
            std::thread::spawn(move || {
                let mut log = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .expect("log");
                let mut rng = rand::rngs::StdRng::seed_from_u64((round * WRITERS + t) as u64);
                let mut data = vec![0u8; 1 << 20];
                while !stop.load(Ordering::Relaxed) {
                    let len = [4096u64, 512, 65536, 300_000, 1 << 20][rng.gen_range(0..5)];
                    let offset = rng.gen_range(0..(SIZE - len) / 512) * 512;
                    rng.fill(&mut data[..len as usize]);
                    writeln!(log, "I {offset} {len} end").expect("log intent");
                    vol.write(offset, &data[..len as usize], rng.gen_bool(0.1))
                        .expect("child: write");
                    writeln!(log, "A {offset} {len} end").expect("log ack");
                }
            })
        })
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(round as u64 + 1000);
    let mut n = 0;
    let mut extra: Vec<String> = Vec::new();
    loop {
        std::thread::sleep(Duration::from_millis(rng.gen_range(1..30)));
        n += 1;
        match rng.gen_range(0..4) {
            0 => {
                let name = format!("r{round}-c{n}");
                vol.checkpoint_create(&name).expect("child: checkpoint");
                extra.push(name);
            }
            1 if !extra.is_empty() => {
                let name = extra.remove(rng.gen_range(0..extra.len()));
                vol.checkpoint_delete(&name)
                    .expect("child: delete checkpoint");
            }
            _ => {
                let name = format!("s{n}");
                let since = if rng.gen_bool(0.5) {
                    Some("base".to_string())
                } else {
                    None
                };
                let spec = SnapshotSpec {
                    name: name.clone(),
                    since,
                    ..SnapshotSpec::default()
                };
                let (snap, _) = vol.snapshot(spec).expect("child: snapshot");
                let mut buf = vec![0u8; 65536];
                snap.read(rng.gen_range(0..SIZE / 65536) * 65536, &mut buf)
                    .expect("child: snapshot read");
                std::thread::sleep(Duration::from_millis(rng.gen_range(1..40)));
                vol.drop_snapshot(&name).expect("child: drop snapshot");
            }
        }
        if n > 10_000 {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = w.join();
    }
}
