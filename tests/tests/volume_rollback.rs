//! `tidemark volume rollback` end to end: a 1 GiB sparse volume written through its live
//! export with qemu-io, backed up with push deltas, changed by about 1%, rolled back to a
//! checkpoint from the point taken there (compared byte for byte with `cmp` against that
//! point restored by `tidemark restore`); refused while held (a python3-libnbd connection,
//! a FUSE attachment) or given the wrong point or unknown changes; killed mid-way (kill -9
//! of the daemon), listed as "rollback incomplete" and refused until rerun, finished by the
//! rerun or removed; and rolled back from a repository point, in a directory and in
//! SeaweedFS's S3 (equal to `repo restore` of it).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tidemark_tests::daemon::Daemon;
use tidemark_tests::peers::qemu_io;
use tidemark_tests::seaweed::Seaweed;
use tidemark_tests::{tidemark_bin, tidemark_env, ChildGuard};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 1 << 30;

/// The point taken at checkpoint c1: a full delta at c0, the delta c0 -> c1, and both
/// restored into a flat image (the reference).
struct Point {
    full: PathBuf,
    c1: PathBuf,
    restored: PathBuf,
}

impl Point {
    fn chain_args(&self) -> Vec<String> {
        vec![s(&self.full), s(&self.c1)]
    }
}

fn s(path: &Path) -> String {
    path.to_str().expect("utf-8 path").to_string()
}

fn qemu_write(byte: u8, offset: u64, len: u64) -> String {
    format!("write -P {byte} {offset} {len}")
}

/// Run `tidemark ARGS --state-dir ...`, which must fail with `needle` on stderr.
fn refused(daemon: &Daemon, args: &[&str], needle: &str) -> String {
    let out = daemon.cli(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success() && stderr.contains(needle),
        "tidemark {args:?} should fail with {needle:?}: {stderr}"
    );
    stderr
}

fn same(a: &Path, b: &Path) -> bool {
    Command::new("cmp")
        .arg("--silent")
        .arg(a)
        .arg(b)
        .status()
        .expect("running cmp")
        .success()
}

fn push(daemon: &Daemon, incremental: Option<&str>, checkpoint: &str, target: &Path) {
    let mut args = vec!["backup", "begin", "v", "--checkpoint", checkpoint];
    if let Some(from) = incremental {
        args.extend(["--incremental", from]);
    }
    let target = s(target);
    args.extend(["--push", &target, "--push-format", "delta"]);
    let done = daemon.cli_json(&args);
    assert_eq!(done["state"], json!("completed"), "{done}");
}

fn restore(into: &Path, chain: &[&Path]) {
    let out = Command::new(tidemark_bin())
        .arg("restore")
        .arg("--into")
        .arg(into)
        .args(chain)
        .output()
        .expect("running tidemark restore");
    assert!(
        out.status.success(),
        "restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Volume `v` (1 GiB, sparse) with data, checkpoints c0 and c1 and the point at c1.
fn prepare(daemon: &Daemon) -> Point {
    daemon.create_volume("v", SIZE);
    let live = daemon.uri("v");
    qemu_io(
        &live,
        &[
            qemu_write(0x11, 0, 8 * MIB),
            qemu_write(0x22, 300 * MIB, 16 * MIB),
            qemu_write(0x33, 900 * MIB, 8 * MIB),
        ],
    );
    let dir = daemon.dir.path();
    let point = Point {
        full: dir.join("c0.delta"),
        c1: dir.join("c0-c1.delta"),
        restored: dir.join("point-c1.raw"),
    };
    push(daemon, None, "c0", &point.full);
    qemu_io(
        &live,
        &[
            qemu_write(0x44, 4 * MIB, 8 * MIB),
            qemu_write(0x55, 512 * MIB, 4 * MIB),
        ],
    );
    push(daemon, Some("c0"), "c1", &point.c1);
    restore(&point.restored, &[&point.full, &point.c1]);
    point
}

/// `count` writes of `len` bytes spread over the volume (`phase` of the way into each
/// 1/count of it), 4 KiB off the 64 KiB tracking blocks: each touches len / 64 KiB + 1.
fn scatter(count: u64, len: u64, byte_base: u8, phase: f64) -> Vec<String> {
    let stride = SIZE / count;
    (0..count)
        .map(|i| {
            let base = (i * stride + (stride as f64 * phase) as u64) & !(64 * 1024 - 1);
            let offset = base + 64 * 1024 * ((i * 37) % 13) + 4096;
            qemu_write(byte_base.wrapping_add(i as u8), offset, len)
        })
        .collect()
}

fn rollback_args(point: &Point) -> Vec<String> {
    let mut args: Vec<String> = ["volume", "rollback", "v", "--checkpoint", "c1", "--from"]
        .iter()
        .map(|a| a.to_string())
        .collect();
    args.extend(point.chain_args());
    args
}

fn checkpoints(daemon: &Daemon) -> Vec<(String, u64)> {
    let list: Value = daemon.cli_json(&["checkpoint", "list", "v"]);
    list.as_array()
        .expect("checkpoint list")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["generation"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn rollback_after_a_one_percent_change_equals_the_point_and_the_next_incremental_follows_on() {
    let daemon = Daemon::start();
    let point = prepare(&daemon);
    let backing = daemon.dir.path().join("v.raw");
    let live = daemon.uri("v");
    // 1% of the volume, on both sides of a later checkpoint c2, with zeroes and a discard.
    qemu_io(&live, &scatter(20, 256 * 1024, 0x60, 0.0));
    daemon.cli_json(&["checkpoint", "create", "v", "c2"]);
    let mut more = scatter(20, 256 * 1024, 0x80, 0.5);
    more.push(format!("write -z {} {}", 700 * MIB, MIB));
    more.push(format!("discard {} {}", 300 * MIB, MIB));
    qemu_io(&live, &more);
    assert!(!same(&backing, &point.restored), "the volume changed");
    let generation_c2 = checkpoints(&daemon)[2].1;

    let args = rollback_args(&point);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let report = daemon.cli_json(&args);
    assert!(same(&backing, &point.restored), "rolled back: {report}");
    assert_eq!(report["dropped_checkpoints"], json!(["c2"]), "{report}");
    assert_eq!(report["resumed"], json!(false), "{report}");
    let rolled_back = report["bytes_rolled_back"].as_u64().unwrap();
    // 40 writes of 256 KiB touch 5 blocks of 64 KiB each, the zeroes and the discard 16.
    assert_eq!(rolled_back, (40 * 5 + 2 * 16) * 64 * 1024, "{report}");
    assert!(
        rolled_back < SIZE / 50,
        "only the changes were written back"
    );

    // Served again; c2 is gone and c1 starts afresh.
    qemu_io(&live, &["read -P 0x11 0 1M".to_string()]);
    let after = checkpoints(&daemon);
    assert_eq!(
        after.iter().map(|c| c.0.as_str()).collect::<Vec<_>>(),
        ["c0", "c1"]
    );
    let dirty = daemon.cli_json(&["volume", "info", "v"]);
    assert_eq!(
        dirty["checkpoints"][1]["changed_blocks"],
        json!(0),
        "{dirty}"
    );

    // The next incremental from c1 carries what is written now, and restores correctly.
    qemu_io(
        &live,
        &[
            qemu_write(0x99, 123 * MIB, 3 * MIB),
            qemu_write(0x9a, 4 * MIB, 4096),
        ],
    );
    let c3 = daemon.dir.path().join("c1-c3.delta");
    push(&daemon, Some("c1"), "c3", &c3);
    let generation_c3 = checkpoints(&daemon)[2].1;
    assert!(
        generation_c3 > generation_c2,
        "c3 gets a new generation ({generation_c3}), not the dropped c2's ({generation_c2})"
    );
    let restored = daemon.dir.path().join("restored-c3.raw");
    restore(&restored, &[&point.full, &point.c1, &c3]);
    assert!(
        same(&backing, &restored),
        "full + c1 + c3 equals the volume"
    );
}

#[test]
fn a_rollback_is_refused_while_the_volume_is_held_or_the_point_does_not_match() {
    let daemon = Daemon::start();
    let point = prepare(&daemon);
    let backing = daemon.dir.path().join("v.raw");
    let live = daemon.uri("v");
    qemu_io(&live, &scatter(10, 64 * 1024, 0x70, 0.0));
    let args = rollback_args(&point);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    // A client connected to the live export (python3-libnbd).
    let mut holder = ChildGuard::new(
        Command::new("/usr/bin/python3")
            .args([
                "-c",
                "import nbd, sys, time\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
                 print('up', flush=True)\ntime.sleep(120)",
                &live,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("running /usr/bin/python3"),
    );
    let mut line = String::new();
    BufReader::new(holder.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("reading the holder");
    assert_eq!(line.trim(), "up");
    refused(
        &daemon,
        &args,
        "1 open NBD connection(s) to its live export",
    );
    drop(holder);
    // The refusal left the export alone: it serves, and the holder's connection closed.
    qemu_io(&live, &["read -P 0x11 1M 64k".to_string()]);

    // A FUSE attachment.
    let attached = daemon.cli_json(&["volume", "attach", "v", "--via", "fuse"]);
    let device = attached["device"].as_str().expect("device").to_string();
    let stderr = refused(&daemon, &args, "is attached as");
    assert!(stderr.contains(&device), "{stderr}");
    daemon.cli_json(&["volume", "detach", "v"]);

    // A point of another checkpoint: named, nothing written.
    let wrong = [
        "volume",
        "rollback",
        "v",
        "--checkpoint",
        "c0",
        "--from",
        &s(&point.full),
        &s(&point.c1),
    ];
    let stderr = refused(&daemon, &wrong, "the point ends at checkpoint \"c1\"");
    assert!(stderr.contains("checkpoint \"c0\""), "{stderr}");
    let short = [
        "volume",
        "rollback",
        "v",
        "--checkpoint",
        "c1",
        "--from",
        &s(&point.full),
    ];
    refused(&daemon, &short, "the point ends at checkpoint \"c0\"");
    let swapped = [
        "volume",
        "rollback",
        "v",
        "--checkpoint",
        "c1",
        "--from",
        &s(&point.c1),
        &s(&point.full),
    ];
    refused(&daemon, &swapped, "a chain must start with a full backup");
    assert!(!same(&backing, &point.restored), "nothing was rolled back");

    // Now nothing holds it: the rollback runs.
    daemon.cli_json(&args);
    assert!(same(&backing, &point.restored), "rolled back");

    // Unknown changes (fast tracking after kill -9): only a full restore can do it.
    let mut daemon = daemon;
    let fast = daemon.dir.path().join("f.raw");
    daemon.cli_json(&[
        "volume",
        "create",
        "f",
        "--backing",
        &s(&fast),
        "--size",
        "64M",
        "--tracking",
        "fast",
    ]);
    let f_point = daemon.dir.path().join("f0.delta");
    let target = s(&f_point);
    let done = daemon.cli_json(&[
        "backup",
        "begin",
        "f",
        "--checkpoint",
        "f0",
        "--push",
        &target,
        "--push-format",
        "delta",
    ]);
    assert_eq!(done["state"], json!("completed"), "{done}");
    qemu_io(&daemon.uri("f"), &[qemu_write(0x12, 0, MIB)]);
    daemon.kill();
    daemon.restart();
    refused(
        &daemon,
        &[
            "volume",
            "rollback",
            "f",
            "--checkpoint",
            "f0",
            "--from",
            &target,
        ],
        "do a full restore instead",
    );
}

#[test]
fn a_rollback_killed_midway_leaves_the_volume_refused_until_a_rerun_finishes_it() {
    let mut daemon = Daemon::start_with_env(&[("TIDEMARK_TEST_ROLLBACK_DELAY_MS", "250")]);
    let point = prepare(&daemon);
    let backing = daemon.dir.path().join("v.raw");
    let live = daemon.uri("v");
    // Ten runs of 17 tracking blocks: 20 pieces, 5 s at the test's pace.
    qemu_io(&live, &scatter(10, MIB, 0x40, 0.0));
    let args = rollback_args(&point);
    let mut cli = ChildGuard::new(
        Command::new(tidemark_bin())
            .args(&args)
            .arg("--state-dir")
            .arg(&daemon.state_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("running tidemark volume rollback"),
    );
    let marker = daemon.state_dir.join("volumes/v/rollback.json");
    wait_for(&daemon, &marker);
    daemon.kill();
    let _ = cli.wait();
    assert!(marker.exists(), "kill -9 mid-rollback leaves the marker");
    assert!(
        !same(&backing, &point.restored),
        "the rollback was cut short"
    );

    daemon.restart();
    let command = format!(
        "tidemark volume rollback v --checkpoint c1 --from {} {}",
        s(&point.full),
        s(&point.c1)
    );
    let rerun = format!("rollback incomplete, rerun `{command}`");
    let entry = listed(&daemon, "v");
    assert_eq!(entry["state"], json!("rollback incomplete"), "{entry}");
    assert_eq!(entry["rerun"], json!(command), "{entry}");
    let table = daemon.cli(&["volume", "list"]);
    assert!(
        String::from_utf8_lossy(&table.stdout).contains("v: rollback incomplete; rerun `"),
        "{table:?}"
    );
    refused(&daemon, &["volume", "info", "v"], &rerun);
    refused(&daemon, &["volume", "attach", "v", "--via", "fuse"], &rerun);
    let read = Command::new("qemu-img")
        .args(["info", "-f", "raw", &live])
        .output()
        .expect("running qemu-img");
    assert!(
        !read.status.success(),
        "reading a volume whose rollback is incomplete is refused"
    );

    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let report = daemon.cli_json(&args);
    assert_eq!(report["resumed"], json!(true), "{report}");
    assert!(!marker.exists());
    assert!(same(&backing, &point.restored), "the rerun finished it");
    qemu_io(&live, &["read -P 0x44 4M 1M".to_string()]);
    assert_eq!(listed(&daemon, "v")["state"], json!("online"));

    // Cut short again, then removed instead of rerun: the volume goes, its backing stays.
    qemu_io(&live, &scatter(10, MIB, 0x60, 0.5));
    let mut cli = ChildGuard::new(
        Command::new(tidemark_bin())
            .args(&args)
            .arg("--state-dir")
            .arg(&daemon.state_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("running tidemark volume rollback"),
    );
    wait_for(&daemon, &marker);
    daemon.kill();
    let _ = cli.wait();
    daemon.restart();
    assert_eq!(listed(&daemon, "v")["state"], json!("rollback incomplete"));
    let removed = daemon.cli_json(&["volume", "remove", "v"]);
    assert_eq!(removed["rollback_incomplete"], json!(true), "{removed}");
    let list = daemon.cli_json(&["volume", "list"]);
    assert_eq!(list, json!([]), "removed: {list}");
    assert!(!marker.exists() && backing.exists());
    refused(&daemon, &["volume", "info", "v"], "no volume named");
}

/// The `volume list --json` entry of volume `name`.
fn listed(daemon: &Daemon, name: &str) -> Value {
    let list = daemon.cli_json(&["volume", "list"]);
    list.as_array()
        .expect("volume list")
        .iter()
        .find(|v| v["name"] == json!(name))
        .cloned()
        .unwrap_or_else(|| panic!("volume {name} is not listed: {list}"))
}

/// Wait until the rollback marker `marker` exists, then a second more (mid-rollback).
fn wait_for(daemon: &Daemon, marker: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !marker.exists() {
        assert!(
            Instant::now() < deadline,
            "no rollback marker: {}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(1));
}

/// `tidemark ARGS` (no daemon) with `env`, which must succeed.
fn run_ok(args: &[&str], env: &[(&str, String)]) {
    tidemark_env(args, env, Duration::from_secs(300)).ok();
}

/// A daemon with `env` pushes v@c0 and v@c1 into the repository at `url` (a directory or
/// s3://): a rollback to v@c1 equals `repo restore` of it, and a point of another checkpoint
/// or volume is refused naming both sides.
fn a_rollback_from_a_repository_point(url: &str, env: &[(&str, String)]) {
    let daemon_env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let daemon = Daemon::start_with_env(&daemon_env);
    run_ok(&["repo", "init", url, "--chunk-size", "1M"], env);
    let target = format!("repo:{url}");
    let backing = daemon.create_volume("v", SIZE);
    let live = daemon.uri("v");
    qemu_io(
        &live,
        &[
            qemu_write(0x11, 0, 8 * MIB),
            qemu_write(0x22, 300 * MIB, 16 * MIB),
        ],
    );
    let begin = |checkpoint: &str, incremental: Option<&str>| {
        let mut args = vec!["backup", "begin", "v", "--checkpoint", checkpoint];
        if let Some(from) = incremental {
            args.extend(["--incremental", from]);
        }
        args.extend(["--push", &target]);
        let done = daemon.cli_json(&args);
        assert_eq!(done["state"], json!("completed"), "{done}");
    };
    begin("c0", None);
    qemu_io(&live, &[qemu_write(0x44, 4 * MIB, 8 * MIB)]);
    begin("c1", Some("c0"));
    let restored = daemon.dir.path().join("repo-c1.raw");
    run_ok(
        &["repo", "restore", url, "v@c1", "--into", &s(&restored)],
        env,
    );

    // About 1% changed, on both sides of a later checkpoint c2.
    qemu_io(&live, &scatter(20, 256 * 1024, 0x60, 0.0));
    daemon.cli_json(&["checkpoint", "create", "v", "c2"]);
    qemu_io(&live, &scatter(20, 256 * 1024, 0x80, 0.5));
    assert!(!same(&backing, &restored), "the volume changed");

    // The point's own metadata must agree: another checkpoint, another volume.
    let rollback = |checkpoint: &'static str, point: &'static str| {
        [
            "volume",
            "rollback",
            "v",
            "--checkpoint",
            checkpoint,
            "--from",
            target.as_str(),
            point,
        ]
        .map(String::from)
    };
    let wrong = rollback("c0", "v@c1");
    let wrong: Vec<&str> = wrong.iter().map(String::as_str).collect();
    let stderr = refused(&daemon, &wrong, "was taken at checkpoint \"c1\"");
    assert!(stderr.contains("checkpoint \"c0\""), "{stderr}");
    daemon.create_volume("w", SIZE);
    qemu_io(&daemon.uri("w"), &[qemu_write(0x77, 0, MIB)]);
    let other = [
        "backup",
        "begin",
        "w",
        "--checkpoint",
        "c9",
        "--push",
        target.as_str(),
    ];
    assert_eq!(daemon.cli_json(&other)["state"], json!("completed"));
    let foreign = rollback("c1", "w@c9");
    let foreign: Vec<&str> = foreign.iter().map(String::as_str).collect();
    let stderr = refused(&daemon, &foreign, "is of volume uuid");
    assert!(stderr.contains("w@c9"), "{stderr}");
    assert!(!same(&backing, &restored), "nothing was written");

    let args = rollback("c1", "v@c1");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let report = daemon.cli_json(&args);
    assert!(same(&backing, &restored), "rolled back: {report}");
    assert_eq!(report["dropped_checkpoints"], json!(["c2"]), "{report}");
    // 40 writes of 256 KiB touch 5 blocks of 64 KiB each.
    assert_eq!(report["bytes_rolled_back"], json!(40 * 5 * 64 * 1024));
    qemu_io(&live, &["read -P 0x44 4M 1M".to_string()]);
}

#[test]
fn a_rollback_from_a_repository_point_equals_repo_restore_of_it() {
    let repo = tempfile::tempdir().expect("temp dir");
    a_rollback_from_a_repository_point(&s(&repo.path().join("repo")), &[]);
}

#[test]
fn a_rollback_from_an_s3_repository_point_equals_repo_restore_of_it() {
    let seaweed = Seaweed::start();
    a_rollback_from_a_repository_point("s3://bkt/rollback", &seaweed.env());
}
