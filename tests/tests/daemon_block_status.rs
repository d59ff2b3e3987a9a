//! BLOCK_STATUS of a dirty bitmap on a huge, fragmented live volume: `nbdinfo --map`
//! walks it in bounded time and daemon memory while a concurrent writer's latency stays
//! bounded. libnbd 1.14 here speaks structured replies; extended headers are not
//! available, so every request covers at most 4 GiB and a 1 TiB map is hundreds of them.

use std::io::{BufRead, BufReader, Read};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tidemark_tests::daemon::Daemon;

const TIB: u64 = 1 << 40;
const BLOCK: u64 = 65536;
/// Dirty blocks, each followed by a clean one: 2 * DIRTY extents.
const DIRTY: u64 = 8192;
/// Checkpoints after the one mapped: the chain OR'ed for every request.
const LATER_CHECKPOINTS: usize = 12;

/// The daemon's peak resident memory (VmHWM) in KiB.
fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

#[test]
fn a_fragmented_dirty_bitmap_of_1tib_maps_quickly_beside_a_writer() {
    let daemon = Daemon::start();
    let backing = daemon.dir.path().join("v.raw");
    daemon.control().ok(
        "volume-create",
        json!({"name": "v", "backing": backing, "size": TIB, "granularity": BLOCK}),
    );
    let uri = daemon.uri("v");
    daemon.cli_json(&["checkpoint", "create", "v", "c"]);
    daemon.nbd_tool(&["fragment", &uri, &BLOCK.to_string(), &DIRTY.to_string()]);
    for i in 0..LATER_CHECKPOINTS {
        daemon.cli_json(&["checkpoint", "create", "v", &format!("later{i}")]);
    }

    // A writer all through the map: random 4 KiB writes, each to a new block (a bitmap
    // sync), their latency measured.
    let mut writer = daemon.nbd_tool_spawn(&["latency", &uri, "8"]);
    let mut lines = BufReader::new(writer.stdout.take().expect("writer stdout")).lines();
    assert_eq!(lines.next().expect("writer output").unwrap(), "running");
    let hwm_before = vm_hwm_kib(daemon.pid());

    let start = Instant::now();
    let map = std::process::Command::new("nbdinfo")
        .arg("--map=qemu:dirty-bitmap:c")
        .arg(&uri)
        .output()
        .expect("running nbdinfo");
    let took = start.elapsed();
    assert!(
        map.status.success(),
        "nbdinfo --map: {}",
        String::from_utf8_lossy(&map.stderr)
    );
    let hwm_after = vm_hwm_kib(daemon.pid());

    // nbdinfo merges equal neighbours: every dirty block is its own extent, then one
    // clean extent to the end of the volume (the writer's changes came after "later*"
    // were created, but "c" counts them too: its bitmap is live).
    let text = String::from_utf8_lossy(&map.stdout);
    let mut dirty = 0u64;
    let mut total = 0u64;
    let mut fragmented = 0u64;
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (offset, length, kind): (u64, u64, u64) = (
            fields[0].parse().unwrap(),
            fields[1].parse().unwrap(),
            fields[2].parse().unwrap(),
        );
        assert_eq!(offset, total, "extents are contiguous: {line}");
        total += length;
        if kind & 1 == 1 {
            dirty += length;
            if offset < 2 * DIRTY * BLOCK {
                assert_eq!((offset / BLOCK % 2, length), (0, BLOCK), "{line}");
                fragmented += 1;
            }
        }
    }
    assert_eq!(total, TIB, "the map covers the volume");
    assert_eq!(
        fragmented, DIRTY,
        "every other block of the region is dirty"
    );
    assert!(dirty >= DIRTY * BLOCK);

    let mut report = String::new();
    for line in lines {
        report = line.unwrap();
    }
    let mut stderr = String::new();
    if let Some(mut e) = writer.stderr.take() {
        e.read_to_string(&mut stderr).unwrap();
    }
    let report: Value = serde_json::from_str(&report)
        .unwrap_or_else(|e| panic!("writer report {report:?}: {e}; {stderr}"));
    let p99 = Duration::from_secs_f64(report["p99"].as_f64().unwrap());
    eprintln!(
        "nbdinfo --map of 1 TiB, {} dirty extents, {LATER_CHECKPOINTS} later checkpoints: \
         {took:?}; daemon VmHWM {hwm_before} -> {hwm_after} KiB; writer {} writes, p99 {p99:?}",
        DIRTY, report["writes"]
    );
    assert!(took < Duration::from_secs(1), "nbdinfo --map took {took:?}");
    assert!(
        hwm_after - hwm_before < 32 << 10,
        "daemon peak memory grew from {hwm_before} to {hwm_after} KiB during the map"
    );
    assert!(p99 < Duration::from_millis(500), "writer p99 {p99:?}");
}
