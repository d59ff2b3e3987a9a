//! `tidemark demo`, the README's first command: it runs end to end (daemon, live writes,
//! a full and two incremental pull backups, restore, verify) and its verification passes.

use std::process::Command;
use std::time::Duration;

use tidemark_tests::{run, tidemark_bin};

#[test]
fn demo_runs_and_verifies_every_point() -> anyhow::Result<()> {
    let out = run(
        Command::new(tidemark_bin()).args(["demo", "--size", "64M", "--json"]),
        Duration::from_secs(180),
    )?;
    assert_eq!(
        out.code(),
        0,
        "the demo failed:\nstdout: {}\nstderr: {}",
        out.stdout,
        out.stderr
    );
    let report = out.json();
    assert_eq!(report["verified"], true, "{report}");
    assert_eq!(report["live_volume_verified"], true, "{report}");
    assert_eq!(report["volume_size"], 64u64 << 20);
    let backups = report["backups"].as_array().expect("backups is an array");
    assert_eq!(backups.len(), 3, "{report}");
    let kinds: Vec<&str> = backups.iter().filter_map(|b| b["kind"].as_str()).collect();
    assert_eq!(kinds, ["full", "incremental", "incremental"]);
    for backup in backups {
        assert_eq!(backup["verified"], true, "{backup}");
        assert!(backup["bytes_pulled"].as_u64().unwrap_or(0) > 0, "{backup}");
        assert!(
            backup["pull_seconds"].as_f64().unwrap_or(0.0) > 0.0,
            "{backup}"
        );
    }
    // The full backup holds the half of the volume that was filled; an incremental pulls
    // only what changed since, far less.
    let full = backups[0]["bytes_pulled"].as_u64().unwrap_or(0);
    assert!(full >= 32 << 20, "{report}");
    for incremental in &backups[1..] {
        assert!(
            incremental["bytes_pulled"].as_u64().unwrap_or(u64::MAX) < full / 2,
            "{report}"
        );
    }
    assert!(
        report["bytes_written"].as_u64().unwrap_or(0) > full,
        "{report}"
    );
    Ok(())
}

#[test]
fn demo_human_report_names_each_backup() -> anyhow::Result<()> {
    let out = run(
        Command::new(tidemark_bin()).args(["demo", "--size", "16M"]),
        Duration::from_secs(180),
    )?
    .ok();
    assert!(out.stdout.contains("backup 1 (full)"), "{}", out.stdout);
    assert!(
        out.stdout.contains("backup 3 (incremental since c2)"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("demo passed"), "{}", out.stdout);
    Ok(())
}
