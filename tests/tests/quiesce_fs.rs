//! Host filesystem freezing (FIFREEZE/FITHAW) on a loop-mounted ext4, driven through the
//! quiesce library with the real tidemark binary as watchdog. Needs root (losetup, mount).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use rand::RngCore;
use serde_json::json;
use tidemark_tests::quiesce::{gaps, ms, LoopFs, Probe, Writer};
use tidemark_tests::run_ok;

/// The quiesce driver built from tests/src/bin/quiesce-probe.rs.
const PROBE: &str = env!("CARGO_BIN_EXE_quiesce-probe");

#[test]
fn freezing_blocks_writers_only_inside_the_window_and_a_copy_taken_then_is_consistent() -> Result<()>
{
    let fs = LoopFs::new(64)?;
    let mut payload = vec![0u8; 1 << 20];
    rand::thread_rng().fill_bytes(&mut payload);
    fs.write_synced("synced-before.bin", &payload)?;
    let writer = Writer::start(&fs.mountpoint)?;
    std::thread::sleep(Duration::from_millis(200));

    let before = Instant::now();
    let (probe, first) = Probe::start(PROBE, json!({ "mountpoints": [fs.mountpoint] }))?;
    let frozen_at = Instant::now();
    let canonical = fs.mountpoint.canonicalize()?;
    ensure!(
        first["quiesced"]["filesystems"] == json!([canonical]),
        "unexpected: {first}"
    );
    ensure!(
        !fs.writable_within(Duration::from_millis(200))?,
        "a write went through while frozen"
    );
    // The snapshot-like step: copy the image while its filesystem is frozen.
    let snapshot = fs.dir.path().join("snapshot.img");
    std::fs::copy(&fs.image, &snapshot)?;
    let hold = Duration::from_millis(500);
    std::thread::sleep(hold.saturating_sub(frozen_at.elapsed()));
    let thaw_sent = Instant::now();
    let report = probe.thaw()?;
    let thawed_at = Instant::now();

    writer.wait_for_writes(20, Duration::from_secs(5))?;
    ensure!(
        fs.writable_within(Duration::from_secs(5))?,
        "still frozen after thaw"
    );
    ensure!(report["errors"] == json!([]), "thaw errors: {report}");
    let window = ms(&report["freeze_to_thaw_ms"]);
    let fs_window = ms(&report["filesystems_frozen_ms"]);
    ensure!(
        (500.0..10_000.0).contains(&window),
        "freeze-to-thaw {window} ms"
    );
    ensure!(
        fs_window <= window,
        "filesystems frozen {fs_window} ms > window {window} ms"
    );

    // The writer was blocked exactly once, across the window, and ran freely otherwise.
    let stamps: Vec<Instant> = writer.stamps();
    let gaps = gaps(&stamps);
    let (blocked, blocked_from) = gaps[0];
    let blocked_until = blocked_from + blocked;
    ensure!(
        blocked >= hold - Duration::from_millis(50),
        "longest writer gap only {blocked:?}"
    );
    ensure!(
        blocked_from + Duration::from_millis(500) >= before && blocked_until >= thaw_sent,
        "the writer's longest gap is not the freeze window"
    );
    ensure!(
        blocked_until <= thawed_at + Duration::from_millis(500),
        "the writer resumed late"
    );
    let next = gaps.get(1).map(|g| g.0).unwrap_or_default();
    ensure!(
        next < Duration::from_millis(500),
        "the writer was also blocked {next:?} outside the window"
    );
    eprintln!(
        "freeze-to-thaw {window:.1} ms (FIFREEZE..FITHAW {fs_window:.1} ms), writer blocked {:.1} ms, \
         next longest writer gap {:.1} ms",
        blocked.as_secs_f64() * 1e3,
        next.as_secs_f64() * 1e3
    );

    // The copy is a clean filesystem holding the file synced before the freeze.
    run_ok(Command::new("fsck.ext4").arg("-fn").arg(&snapshot))?;
    let dumped = fs.dir.path().join("dumped.bin");
    run_ok(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("dump /synced-before.bin {}", dumped.display()))
            .arg(&snapshot),
    )?;
    ensure!(
        std::fs::read(&dumped)? == payload,
        "the synced file differs in the copy"
    );
    Ok(())
}

#[test]
fn the_root_filesystem_and_the_one_holding_our_state_are_refused() -> Result<()> {
    let (_probe, reply) = Probe::start(PROBE, json!({ "mountpoints": ["/"] }))?;
    let error = reply["error"].as_str().unwrap_or_default();
    ensure!(error.contains("root filesystem"), "unexpected: {reply}");

    let fs = LoopFs::new(32)?;
    let cow = fs.mountpoint.join("state/cow-store");
    let (_probe, reply) = Probe::start(
        PROBE,
        json!({ "mountpoints": [fs.mountpoint], "protected_paths": [cow] }),
    )?;
    let error = reply["error"].as_str().unwrap_or_default();
    ensure!(
        error.contains("deadlock") && error.contains("cow-store"),
        "unexpected: {reply}"
    );
    ensure!(
        fs.writable_within(Duration::from_secs(5))?,
        "frozen after a refusal"
    );

    let plain = fs.dir.path().join("not-a-mount");
    std::fs::create_dir(&plain)?;
    let (_probe, reply) = Probe::start(PROBE, json!({ "mountpoints": [plain] }))?;
    ensure!(
        reply["error"]
            .as_str()
            .unwrap_or_default()
            .contains("not a mount point"),
        "{reply}"
    );
    Ok(())
}

#[test]
fn a_filesystem_already_frozen_by_fsfreeze_is_an_error_and_stays_frozen_for_its_owner() -> Result<()>
{
    let fs = LoopFs::new(32)?;
    run_ok(Command::new("fsfreeze").arg("-f").arg(&fs.mountpoint))?;
    let (_probe, reply) = Probe::start(PROBE, json!({ "mountpoints": [fs.mountpoint] }))?;
    let error = reply["error"].as_str().unwrap_or_default();
    ensure!(
        error.contains("already frozen") && error.contains("fsfreeze -u"),
        "unexpected: {reply}"
    );
    // We did not thaw someone else's freeze: fsfreeze -u still has something to thaw.
    run_ok(Command::new("fsfreeze").arg("-u").arg(&fs.mountpoint))?;
    ensure!(fs.writable_within(Duration::from_secs(5))?, "still frozen");
    Ok(())
}
