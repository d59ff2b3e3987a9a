//! TRIM against backups, end to end with python3-libnbd (/usr/bin/python3): a backup
//! export advertises TRIM and a trim there frees COW space without touching the volume;
//! a whole-volume trim of the live volume during a backup is preserved in bounded pieces
//! (the daemon's peak memory stays under its budget) and the snapshot keeps the old data.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tidemark_tests::daemon::Daemon;
use tidemark_tests::run::run;

const MIB: u64 = 1 << 20;

fn export_uri(backup: &Value) -> String {
    backup["volumes"][0]["uri"]["unix"]
        .as_str()
        .expect("backup export uri")
        .to_string()
}

/// Run a python3-libnbd script (`import nbd` is done) with `args` as `sys.argv[1:]`; its
/// stdout. Fails the test with its stderr.
fn libnbd(script: &str, args: &[&str], limit: Duration) -> String {
    let program = format!("import hashlib, sys, nbd\n{script}");
    let out = run(
        Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(program)
            .args(args),
        limit,
    )
    .expect("running /usr/bin/python3");
    assert_eq!(
        out.code(),
        0,
        "python3-libnbd script failed: {}",
        out.stderr
    );
    out.stdout
}

/// COW bytes in use by the snapshots of `volume`, as `tidemark info --json` reports them.
fn cow_used(daemon: &Daemon, volume: &str) -> u64 {
    let info = daemon.cli_json(&["info"]);
    let text = info.to_string();
    let volumes = info["volumes"]
        .as_array()
        .unwrap_or_else(|| panic!("{text}"));
    let vol = volumes
        .iter()
        .find(|v| v["name"] == volume)
        .unwrap_or_else(|| panic!("no volume {volume} in {text}"));
    vol["snapshots"]
        .as_array()
        .unwrap_or_else(|| panic!("{text}"))
        .iter()
        .map(|s| {
            s["cow_bytes_used"]
                .as_u64()
                .unwrap_or_else(|| panic!("{text}"))
        })
        .sum()
}

/// The peak resident memory of a process (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kib * 1024
}

#[test]
fn a_backup_export_takes_trim_after_reading_and_frees_cow_space_without_touching_the_volume() {
    let daemon = Daemon::start();
    let backing = daemon.create_volume("vm1", 64 * MIB);
    let live = daemon.uri("vm1");
    let fill = "h = nbd.NBD(); h.connect_uri(sys.argv[1])\n\
                h.pwrite(bytes([int(sys.argv[2])]) * (32 << 20), 0); h.flush()\n";
    libnbd(fill, &[&live, "17"], Duration::from_secs(60));
    let backup = daemon.cli_json(&["backup", "begin", "vm1"]);
    let uri = export_uri(&backup);
    // The guest overwrites what the backup has not read yet: 32 MiB go to the COW store.
    libnbd(fill, &[&live, "34"], Duration::from_secs(60));
    let before = cow_used(&daemon, "vm1");
    assert_eq!(before, 32 * MIB, "the overwritten range is preserved");
    let volume_before = std::fs::read(&backing).expect("backing file");

    // The backup client reads the first 16 MiB, then says it is done with them. libnbd
    // refuses every write-type command, TRIM too, on a read-only export unless its strict
    // command checks are off; the server advertises TRIM and takes it.
    let pull = "h = nbd.NBD(); h.connect_uri(sys.argv[1])\n\
                assert h.is_read_only(), 'a backup export is read-only'\n\
                assert h.can_trim(), 'a backup export advertises TRIM'\n\
                assert h.pread(16 << 20, 0) == bytes([17]) * (16 << 20)\n\
                h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_COMMANDS)\n\
                h.trim(16 << 20, 0)\n\
                try:\n    h.pwrite(b'x', 0)\n    sys.exit('a write to a backup export succeeded')\n\
                except nbd.Error as e:\n    print('write refused:', e)\n\
                print(h.pread(16 << 20, 16 << 20) == bytes([17]) * (16 << 20))\n\
                print(h.pread(16 << 20, 0) == bytes([34]) * (16 << 20))\n";
    let out = libnbd(pull, &[&uri], Duration::from_secs(60));
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("write refused:"), "{out}");
    // The range not trimmed still reads the snapshot's data.
    assert_eq!(lines[1], "True", "untrimmed snapshot range: {out}");
    // A trimmed range no longer belongs to the snapshot: it reads what the volume holds
    // now (documented in the README), here the guest's new data.
    assert_eq!(lines[2], "True", "trimmed snapshot range: {out}");
    assert_eq!(
        cow_used(&daemon, "vm1"),
        before - 16 * MIB,
        "COW space freed"
    );
    let volume_after = std::fs::read(&backing).expect("backing file");
    assert!(
        volume_before == volume_after,
        "a trim on the backup export changed the volume"
    );
    daemon.cli_json(&["backup", "end", "vm1"]);
}

/// The daemon's memory budget for a backup's copy-before-write, with its own baseline:
/// 64 MiB of old contents in memory, 16 MiB of pooled copy buffers, the rest headroom.
const RSS_BUDGET: u64 = 256 * MIB;

#[test]
fn trimming_a_whole_4_gib_volume_during_a_backup_stays_under_the_memory_budget() {
    let daemon = Daemon::start();
    let size = 4u64 << 30;
    daemon.create_volume("big", size);
    let live = daemon.uri("big");
    // Sparse, with 1 MiB of data every 64 MiB: a 2 GiB range has data to preserve.
    let sample = "h = nbd.NBD(); h.connect_uri(sys.argv[1])\n\
                  d = hashlib.sha256()\n\
                  for i in range(64):\n\
                  \x20   if sys.argv[2] == 'fill':\n\
                  \x20       h.pwrite(bytes([i + 1]) * (1 << 20), i << 26)\n\
                  \x20   d.update(h.pread(1 << 20, i << 26))\n\
                  print(d.hexdigest())\n";
    let before = libnbd(sample, &[&live, "fill"], Duration::from_secs(120));
    let backup = daemon.cli_json(&["backup", "begin", "big"]);
    let uri = export_uri(&backup);
    // The guest discards the whole disk, in the two largest requests NBD allows.
    let trim = "h = nbd.NBD(); h.connect_uri(sys.argv[1])\n\
                h.trim(2 << 30, 0); h.trim(2 << 30, 2 << 30); h.flush()\n";
    libnbd(trim, &[&live], Duration::from_secs(300));
    let peak = peak_rss(daemon.pid());
    eprintln!(
        "daemon peak RSS after trimming 4 GiB during a backup: {} MiB (budget {} MiB)",
        peak / MIB,
        RSS_BUDGET / MIB
    );
    assert!(
        peak < RSS_BUDGET,
        "the daemon reached {} MiB preserving a 4 GiB trim (budget {} MiB)",
        peak / MIB,
        RSS_BUDGET / MIB
    );
    // The snapshot still reads the old data; the live volume reads zeroes.
    let snapshot = libnbd(sample, &[&uri, "check"], Duration::from_secs(120));
    assert_eq!(snapshot, before, "the snapshot's data after the trim");
    let zeroes = "h = nbd.NBD(); h.connect_uri(sys.argv[1])\n\
                  print(all(h.pread(1 << 20, i << 26) == bytes(1 << 20) for i in range(64)))\n";
    assert_eq!(
        libnbd(zeroes, &[&live], Duration::from_secs(120)).trim(),
        "True"
    );
    assert_eq!(
        cow_used(&daemon, "big"),
        64 * MIB,
        "exactly the data was preserved"
    );
    daemon.cli_json(&["backup", "end", "big"]);
}
