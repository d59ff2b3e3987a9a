//! Freeze hooks around a FIFREEZE: order, arguments, captured output, a failing hook, a
//! hanging hook. Needs root (loop mount).

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use serde_json::{json, Value};
use tidemark_tests::quiesce::{hooks_dir, LoopFs, Probe};

/// The quiesce driver built from tests/src/bin/quiesce-probe.rs.
const PROBE: &str = env!("CARGO_BIN_EXE_quiesce-probe");

fn log_hook(log: &std::path::Path, tag: &str) -> String {
    format!("echo \"{tag} $*\" >> '{}'", log.display())
}

fn lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

fn log_text(report: &Value) -> String {
    report["log"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn hooks_from_both_directories_run_in_name_order_and_their_output_is_captured() -> Result<()> {
    let fs = LoopFs::new(32)?;
    let record = tempfile::tempdir()?;
    let log = record.path().join("hooks.log");
    let writers = hooks_dir(&[(
        "20-app",
        &format!("{}\necho flushed app", log_hook(&log, "app")),
    )])?;
    let qemu = hooks_dir(&[(
        "10-db",
        &format!("{}\necho db warning >&2", log_hook(&log, "db")),
    )])?;
    let mp = fs.mountpoint.canonicalize()?;
    let (probe, first) = Probe::start(
        PROBE,
        json!({
            "mountpoints": [fs.mountpoint],
            "hooks_dirs": [writers.path(), qemu.path()],
        }),
    )?;
    ensure!(
        first["quiesced"]["hooks"].as_array().map(Vec::len) == Some(2),
        "{first}"
    );
    let inside = lines(&log);
    ensure!(
        inside
            == [
                format!("db freeze {}", mp.display()),
                format!("app freeze {}", mp.display())
            ],
        "{inside:?}"
    );
    ensure!(
        !fs.writable_within(Duration::from_millis(200))?,
        "not frozen"
    );
    let report = probe.thaw()?;
    let all = lines(&log);
    ensure!(
        all[2..]
            == [
                format!("app thaw {}", mp.display()),
                format!("db thaw {}", mp.display())
            ],
        "thaw order: {all:?}"
    );
    let text = log_text(&report);
    ensure!(
        text.contains("stdout: flushed app") && text.contains("stderr: db warning"),
        "log: {text}"
    );
    ensure!(
        report["hook_runs"].as_array().map(Vec::len) == Some(4),
        "{report}"
    );
    ensure!(report["errors"] == json!([]), "{report}");
    ensure!(fs.writable_within(Duration::from_secs(5))?, "still frozen");
    Ok(())
}

#[test]
fn a_failing_freeze_hook_aborts_and_thaws_everything_already_frozen() -> Result<()> {
    let fs = LoopFs::new(32)?;
    let record = tempfile::tempdir()?;
    let log = record.path().join("hooks.log");
    let hooks = hooks_dir(&[
        ("10-ok", &log_hook(&log, "ok")),
        (
            "20-fail",
            &format!(
                "{}\n[ \"$1\" = freeze ] && {{ echo cannot lock >&2; exit 7; }}\nexit 0",
                log_hook(&log, "fail")
            ),
        ),
        ("30-never", &log_hook(&log, "never")),
    ])?;
    let (_probe, reply) = Probe::start(
        PROBE,
        json!({ "mountpoints": [fs.mountpoint], "hooks_dirs": [hooks.path()] }),
    )?;
    let error = reply["error"].as_str().unwrap_or_default();
    ensure!(
        error.contains("20-fail") && error.contains("status 7"),
        "unexpected: {reply}"
    );
    let tags: Vec<String> = lines(&log)
        .iter()
        .map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" "))
        .collect();
    ensure!(
        tags == ["ok freeze", "fail freeze", "fail thaw", "ok thaw"],
        "{tags:?}"
    );
    ensure!(
        log_text(&reply["report"]).contains("stderr: cannot lock"),
        "{reply}"
    );
    ensure!(
        fs.writable_within(Duration::from_secs(5))?,
        "frozen after an aborted quiesce"
    );
    Ok(())
}

#[test]
fn a_hanging_freeze_hook_is_killed_at_its_limit_and_everything_thaws() -> Result<()> {
    let fs = LoopFs::new(32)?;
    let record = tempfile::tempdir()?;
    let log = record.path().join("hooks.log");
    let hooks = hooks_dir(&[
        ("10-ok", &log_hook(&log, "ok")),
        (
            "20-hang",
            &format!(
                "{}\n[ \"$1\" = freeze ] && sleep 60\nexit 0",
                log_hook(&log, "hang")
            ),
        ),
    ])?;
    let start = Instant::now();
    let (_probe, reply) = Probe::start(
        PROBE,
        json!({
            "mountpoints": [fs.mountpoint],
            "hooks_dirs": [hooks.path()],
            "hook_timeout_ms": 500,
        }),
    )?;
    let took = start.elapsed();
    let error = reply["error"].as_str().unwrap_or_default();
    ensure!(
        error.contains("20-hang") && error.contains("time limit"),
        "unexpected: {reply}"
    );
    ensure!(took < Duration::from_secs(5), "aborting took {took:?}");
    let tags: Vec<String> = lines(&log)
        .iter()
        .map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" "))
        .collect();
    ensure!(
        tags == ["ok freeze", "hang freeze", "hang thaw", "ok thaw"],
        "{tags:?}"
    );
    ensure!(
        fs.writable_within(Duration::from_secs(5))?,
        "frozen after a hook timeout"
    );
    Ok(())
}
