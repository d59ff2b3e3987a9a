//! The thaw watchdog: a quiescing process killed with -9 inside the window, and one that
//! never thaws, both leave the filesystem thawed (and the hooks thawed) within the window
//! limit. Needs root (loop mount).

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use serde_json::{json, Value};
use tidemark_tests::quiesce::{hooks_dir, ms, LoopFs, Probe, Writer};

/// The quiesce driver built from tests/src/bin/quiesce-probe.rs.
const PROBE: &str = env!("CARGO_BIN_EXE_quiesce-probe");

fn wait_for_line(path: &std::path::Path, needle: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with(needle))
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn kill_9_inside_the_window_leaves_everything_thawed_within_the_limit() -> Result<()> {
    let fs = LoopFs::new(32)?;
    let record = tempfile::tempdir()?;
    let log = record.path().join("hooks.log");
    let hooks = hooks_dir(&[("10-app", &format!("echo \"app $1\" >> '{}'", log.display()))])?;
    let writer = Writer::start(&fs.mountpoint)?;
    let limit = Duration::from_secs(10);
    let (mut probe, first) = Probe::start(
        PROBE,
        json!({
            "mountpoints": [fs.mountpoint],
            "hooks_dirs": [hooks.path()],
            "window_limit_ms": limit.as_millis() as u64,
        }),
    )?;
    ensure!(first.get("quiesced").is_some(), "{first}");
    ensure!(
        !fs.writable_within(Duration::from_millis(200))?,
        "not frozen"
    );
    let writes_before = writer.count();
    let killed = Instant::now();
    probe.kill9()?;
    writer.wait_for_writes(5, limit)?;
    let resumed = killed.elapsed();
    ensure!(writer.count() > writes_before, "no writes after the kill");
    ensure!(resumed < limit, "writes resumed only after {resumed:?}");
    ensure!(
        wait_for_line(&log, "app thaw", limit),
        "the hook's thaw did not run"
    );
    eprintln!(
        "kill -9 inside the window: writer resumed {:.1} ms after the kill",
        resumed.as_secs_f64() * 1e3
    );
    Ok(())
}

#[test]
fn a_caller_that_never_thaws_is_thawed_at_the_window_limit() -> Result<()> {
    let fs = LoopFs::new(32)?;
    let limit = Duration::from_millis(1500);
    let (probe, first) = Probe::start(
        PROBE,
        json!({
            "mountpoints": [fs.mountpoint],
            "window_limit_ms": limit.as_millis() as u64,
        }),
    )?;
    let frozen = Instant::now();
    ensure!(first.get("quiesced").is_some(), "{first}");
    ensure!(
        !fs.writable_within(Duration::from_millis(200))?,
        "not frozen"
    );
    // The caller hangs (sends nothing); the watchdog must thaw at the limit.
    ensure!(
        fs.writable_within(limit * 3)?,
        "still frozen at three times the limit"
    );
    let thawed = frozen.elapsed();
    ensure!(
        thawed <= limit + Duration::from_millis(700),
        "thawed after {thawed:?}"
    );
    let report = probe.thaw()?;
    ensure!(report["thawed_by_watchdog"].is_string(), "{report}");
    let errors = report["errors"].as_array().cloned().unwrap_or_default();
    ensure!(
        errors
            .iter()
            .filter_map(Value::as_str)
            .any(|e| e.contains("window limit")),
        "{report}"
    );
    let window = ms(&report["freeze_to_thaw_ms"]);
    ensure!(
        (1490.0..2500.0).contains(&window),
        "freeze-to-thaw {window} ms for a 1500 ms limit"
    );
    eprintln!("hung caller: the watchdog thawed at {window:.1} ms (limit 1500 ms)");
    Ok(())
}
