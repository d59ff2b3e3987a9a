//! Pull backups end to end against the real daemon and real NBD clients: qemu-io writing
//! through the live export, qemu-img and a libnbd script pulling the backup exports,
//! nbdinfo reading the dirty bitmap.

use std::io::{BufRead, BufReader};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tidemark_tests::daemon::{granular, Daemon, Model};
use tidemark_tests::peers::{qemu_img_convert, qemu_io};

const MIB: usize = 1 << 20;
const GRANULARITY: u64 = 64 << 10;

/// Random writes into `model`, as qemu-io commands; returns the written ranges too.
fn random_writes(
    model: &mut Model,
    rng: &mut impl Rng,
    count: usize,
) -> (Vec<String>, Vec<(u64, u64)>) {
    let size = model.0.len();
    let mut commands = Vec::new();
    let mut ranges = Vec::new();
    for _ in 0..count {
        let len = rng.gen_range(1..=48) * 4096;
        let offset = rng.gen_range(0..(size - len) / 512) * 512;
        let byte = rng.gen_range(1..=255u8);
        commands.push(model.write(offset, len, byte));
        ranges.push((offset as u64, len as u64));
    }
    (commands, ranges)
}

fn export_uri(backup: &Value, index: usize) -> String {
    backup["volumes"][index]["uri"]["unix"]
        .as_str()
        .expect("backup export uri")
        .to_string()
}

#[test]
fn a_full_and_three_incrementals_restore_each_snapshot_while_qemu_io_writes() {
    let daemon = Daemon::start();
    let size = 16 * MIB;
    daemon.create_volume("disk", size as u64);
    let live = daemon.uri("disk");
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let mut model = Model::new(size);
    let image = daemon.dir.path().join("restored.raw");

    let (writes, _) = random_writes(&mut model, &mut rng, 40);
    qemu_io(&live, &writes);

    for round in 0..4 {
        let mut args = vec!["backup", "begin", "disk", "--checkpoint"];
        let checkpoint = format!("c{round}");
        args.push(&checkpoint);
        let previous = format!("c{}", round.max(1) - 1);
        if round > 0 {
            args.extend(["--incremental", &previous]);
        }
        let backup = daemon.cli_json(&args);
        let uri = export_uri(&backup, 0);
        let snapshot = model.clone();

        // The live volume keeps changing while the backup is pulled.
        let (during, _) = random_writes(&mut model, &mut rng, 30);
        qemu_io(&live, &during[..15]);
        if round == 0 {
            assert_eq!(backup["volumes"][0]["bitmap"], Value::Null);
            qemu_img_convert(&uri, &image);
        } else {
            assert_eq!(backup["volumes"][0]["bitmap"], json!(previous));
            daemon.nbd_tool(&["apply", &uri, &previous, image.to_str().unwrap()]);
        }
        qemu_io(&live, &during[15..]);
        snapshot.assert_equals_file(&image, &format!("restore of backup round {round}"));
        let ended = daemon.cli_json(&["backup", "end", "disk"]);
        assert_eq!(ended["state"], json!("completed"));

        let (more, _) = random_writes(&mut model, &mut rng, 25);
        qemu_io(&live, &more);
    }
    // The live volume itself holds the model.
    let last = daemon.dir.path().join("live.raw");
    qemu_img_convert(&live, &last);
    model.assert_equals_file(&last, "live volume");
}

#[test]
fn the_dirty_bitmap_of_a_backup_export_lists_exactly_the_written_ranges() {
    let daemon = Daemon::start();
    let size = 32u64 << 20;
    daemon.create_volume("vol", size);
    let live = daemon.uri("vol");
    daemon.cli_json(&["checkpoint", "create", "vol", "base"]);
    let ranges: Vec<(u64, u64)> = vec![
        (0, 512),
        (70_000, 10),
        (1 << 20, 3 << 20),
        ((5 << 20) - 1, 2),
        (size - 4096, 4096),
    ];
    let commands: Vec<String> = ranges
        .iter()
        .map(|(o, l)| format!("write -P 7 {o} {l}"))
        .collect();
    qemu_io(&live, &commands);

    let backup = daemon.cli_json(&["backup", "begin", "vol", "--incremental", "base"]);
    let uri = export_uri(&backup, 0);
    // Writes after backup begin do not show up: the bitmap is frozen at backup start.
    qemu_io(&live, &["write -P 9 20M 1M".to_string()]);

    let expected = granular(&ranges, GRANULARITY, size);
    let listed: Vec<[u64; 2]> =
        serde_json::from_str(&daemon.nbd_tool(&["dirty", &uri, "base"])).unwrap();
    assert_eq!(listed, expected);

    // nbdinfo agrees, and the export offers exactly one dirty bitmap context.
    let out = std::process::Command::new("nbdinfo")
        .arg("--map=qemu:dirty-bitmap:base")
        .arg(&uri)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut dirty = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (offset, length, kind): (u64, u64, u32) = (
            fields[0].parse().unwrap(),
            fields[1].parse().unwrap(),
            fields[2].parse().unwrap(),
        );
        if kind & 1 == 1 {
            dirty.push([offset, length]);
        }
    }
    assert_eq!(dirty, expected, "nbdinfo --map");
    let contexts: Vec<String> =
        serde_json::from_str(&daemon.nbd_tool(&["contexts", &uri])).unwrap();
    let bitmaps: Vec<&String> = contexts
        .iter()
        .filter(|c| c.starts_with("qemu:dirty-bitmap:"))
        .collect();
    assert_eq!(bitmaps, vec!["qemu:dirty-bitmap:base"], "{contexts:?}");
    assert!(
        contexts.contains(&"base:allocation".to_string()),
        "{contexts:?}"
    );
    daemon.cli_json(&["backup", "end", "vol"]);
}

#[test]
fn two_volumes_backed_up_together_are_consistent_with_each_other() {
    let daemon = Daemon::start();
    daemon.create_volume("a", 4 << 20);
    daemon.create_volume("b", 4 << 20);
    // A writer bumps a counter on a, then on b, forever: at any single instant a == b or
    // a == b + 1. Snapshots taken at different instants would soon break that.
    let mut writer = daemon.nbd_tool_spawn(&["counter", &daemon.uri("a"), &daemon.uri("b")]);
    let mut line = String::new();
    BufReader::new(writer.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "running");
    for round in 0..5 {
        let backup = daemon.cli_json(&["backup", "begin", "a", "b"]);
        assert_eq!(backup["volumes"].as_array().unwrap().len(), 2);
        assert!(backup["write_pause_us"].as_u64().is_some());
        let a: u64 = daemon
            .nbd_tool(&["read8", &export_uri(&backup, 0), "0"])
            .trim()
            .parse()
            .unwrap();
        let b: u64 = daemon
            .nbd_tool(&["read8", &export_uri(&backup, 1), "0"])
            .trim()
            .parse()
            .unwrap();
        assert!(a == b || a == b + 1, "round {round}: a = {a}, b = {b}");
        assert!(a > 0);
        daemon.cli_json(&["backup", "end", "a"]);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        writer.try_wait().unwrap().is_none(),
        "the writer kept running throughout"
    );
}

#[test]
fn a_second_backup_of_a_busy_volume_is_refused_and_backup_end_frees_it() {
    let daemon = Daemon::start();
    daemon.create_volume("v", 1 << 20);
    daemon.cli_json(&["backup", "begin", "v"]);
    let again = daemon.cli(&["backup", "begin", "v", "--json"]);
    assert_eq!(again.status.code(), Some(2));
    let report: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(report["error"]["class"], json!("Conflict"));
    let removed = daemon.cli(&["volume", "remove", "v"]);
    assert_eq!(
        removed.status.code(),
        Some(2),
        "a volume in a backup cannot be removed"
    );
    daemon.cli_json(&["backup", "end", "v"]);
    let ended_twice = daemon.cli(&["backup", "end", "v"]);
    assert_eq!(ended_twice.status.code(), Some(2));
    daemon.cli_json(&["backup", "begin", "v"]);
    let status = daemon.cli_json(&["backup", "status"]);
    assert_eq!(status["running"].as_array().unwrap().len(), 1);
    assert_eq!(status["finished"][0]["state"], json!("completed"));
}

#[test]
fn an_unknown_incremental_checkpoint_is_an_error_not_a_full_backup() {
    let daemon = Daemon::start();
    daemon.create_volume("v", 1 << 20);
    let out = daemon.cli(&["backup", "begin", "v", "--incremental", "never", "--json"]);
    assert_eq!(out.status.code(), Some(2));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["error"]["class"], json!("NotFound"), "{report}");
    assert_eq!(daemon.cli_json(&["backup", "status"])["running"], json!([]));
}

/// `tidemark pull --delta` from a daemon's backup export records the volume's uuid and
/// granularity without being told (the export's description names them).
#[test]
fn a_pulled_delta_records_the_volume_uuid_and_granularity_of_the_export() {
    let daemon = Daemon::start();
    let backing = daemon.dir.path().join("g.raw");
    let created = daemon.cli_json(&[
        "volume",
        "create",
        "g",
        "--backing",
        backing.to_str().unwrap(),
        "--size",
        "4M",
        "--granularity",
        "4K",
    ]);
    let uuid = created["uuid"].as_str().unwrap().to_string();
    qemu_io(&daemon.uri("g"), &["write -P 7 64k 8k".to_string()]);
    let backup = daemon.cli_json(&["backup", "begin", "g", "--checkpoint", "c1"]);
    let uri = backup["volumes"][0]["uri"]["unix"].as_str().unwrap();
    let delta = daemon.dir.path().join("g-full.delta");
    let out = std::process::Command::new(tidemark_tests::tidemark_bin())
        .args(["pull", "--full", uri, "--delta"])
        .arg(&delta)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = std::fs::File::open(&delta).unwrap();
    let reader = tidemark_formats::delta::DeltaReader::open(file, &delta).unwrap();
    let header = reader.header();
    assert_eq!(header.volume_uuid.to_string(), uuid);
    assert_eq!(header.granularity, 4096);
    daemon.cli_json(&["backup", "end", "g"]);
}
