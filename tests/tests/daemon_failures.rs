//! What goes wrong around a backup, end to end: the daemon killed mid-write, stopped
//! mid-backup, a lease holder that dies, a client that vanishes, a COW store that fills.
//! In every case the backup fails cleanly and the live volume never notices.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tidemark_tests::daemon::{Daemon, Model};
use tidemark_tests::peers::{qemu_img_convert, qemu_io};
use tidemark_tests::{tidemark_bin, ChildGuard};

fn export_uri(backup: &Value) -> String {
    backup["volumes"][0]["uri"]["unix"]
        .as_str()
        .expect("backup export uri")
        .to_string()
}

fn files_equal(a: &std::path::Path, b: &std::path::Path, what: &str) {
    let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(a.len(), b.len(), "{what}: sizes");
    if let Some(at) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!("{what}: first difference at offset {at}");
    }
}

/// Poll `backup-status` until the last finished backup is `state`; return it.
fn wait_finished(daemon: &Daemon, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = daemon.cli_json(&["backup", "status"]);
        if status["running"] == json!([]) {
            if let Some(last) = status["finished"].as_array().and_then(|f| f.last()) {
                assert_eq!(last["state"], json!(state), "{last}");
                return last.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "the backup did not end: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn export_exists(uri: &str) -> bool {
    Command::new("nbdinfo")
        .arg("--size")
        .arg(uri)
        .output()
        .unwrap()
        .status
        .success()
}

/// A daemon with volume `v` (16 MiB, 8 MiB written) and `full.raw`, the full backup of it
/// that started checkpoint c1 and ended well.
fn with_a_full_backup() -> (Daemon, std::path::PathBuf, std::path::PathBuf) {
    let daemon = Daemon::start();
    let backing = daemon.create_volume("v", 16 << 20);
    qemu_io(&daemon.uri("v"), &["write -P 1 0 8M".to_string()]);
    let full = daemon.dir.path().join("full.raw");
    let backup = daemon.cli_json(&["backup", "begin", "v", "--checkpoint", "c1"]);
    qemu_img_convert(&export_uri(&backup), &full);
    daemon.cli_json(&["backup", "end", "v"]);
    (daemon, backing, full)
}

#[test]
fn kill_9_mid_write_then_restart_and_the_next_incremental_restores_the_truth() {
    let (mut daemon, backing, full) = with_a_full_backup();

    let mut writer = daemon.nbd_tool_spawn(&["pattern", &daemon.uri("v"), "9"]);
    let mut acked = BufReader::new(writer.stdout.take().unwrap());
    let mut line = String::new();
    for _ in 0..20 {
        line.clear();
        acked.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "the writer stopped early");
    }
    daemon.kill();
    let _ = writer.wait();
    let mut rest = String::new();
    let _ = acked.read_to_string(&mut rest);

    daemon.restart();
    // What the volume holds now is the truth: every acknowledged write, and maybe the one
    // that was in flight. The incremental since c1 must carry all of it.
    let backup = daemon.cli_json(&[
        "backup",
        "begin",
        "v",
        "--incremental",
        "c1",
        "--checkpoint",
        "c2",
    ]);
    daemon.nbd_tool(&["apply", &export_uri(&backup), "c1", full.to_str().unwrap()]);
    daemon.cli_json(&["backup", "end", "v"]);
    files_equal(&full, &backing, "full + incremental after kill -9");
}

#[test]
fn sigterm_during_a_backup_fails_it_and_tracking_survives_the_restart() {
    let mut daemon = Daemon::start();
    let backing = daemon.create_volume("v", 8 << 20);
    let full = daemon.dir.path().join("full.raw");
    let backup = daemon.cli_json(&["backup", "begin", "v", "--checkpoint", "c1"]);
    qemu_img_convert(&export_uri(&backup), &full);
    qemu_io(&daemon.uri("v"), &["write -P 5 1M 1M".to_string()]);
    let mut watcher = daemon.control();
    assert!(daemon.stop().success(), "{}", daemon.log());
    let failed = watcher
        .wait_event("BACKUP_FAILED", Duration::from_secs(5))
        .unwrap();
    assert!(
        failed["data"]["error"]
            .as_str()
            .unwrap()
            .contains("shutting down"),
        "{failed}"
    );
    assert!(daemon.log().contains("closed cleanly"), "{}", daemon.log());

    daemon.restart();
    let info = daemon.cli_json(&["volume", "info", "v"]);
    assert_eq!(info["tracking"], json!("durable"), "{info}");
    // The stop failed the backup that made c1, so c1 is unconfirmed: this client knows it
    // pulled the whole image before the stop, and says so with --force.
    assert_eq!(info["checkpoints"][0]["confirmed"], json!(false), "{info}");
    let backup = daemon.cli_json(&["backup", "begin", "v", "--incremental", "c1", "--force"]);
    let extents = daemon.nbd_tool(&["apply", &export_uri(&backup), "c1", full.to_str().unwrap()]);
    assert_eq!(extents.trim(), "[[1048576, 1048576]]");
    files_equal(&full, &backing, "full + incremental after SIGTERM");
}

#[test]
fn a_lease_ends_the_backup_when_its_control_connection_closes() {
    let daemon = Daemon::start();
    daemon.create_volume("v", 4 << 20);
    let mut watcher = daemon.control();
    let uri = {
        let mut holder = daemon.control();
        let backup = holder.ok("backup-begin", json!({"volumes": ["v"], "lease": true}));
        let uri = export_uri(&backup);
        assert!(export_exists(&uri));
        uri
    };
    let failed = watcher
        .wait_event("BACKUP_FAILED", Duration::from_secs(10))
        .unwrap();
    assert!(
        failed["data"]["error"].as_str().unwrap().contains("lease"),
        "{failed}"
    );
    assert!(!export_exists(&uri), "the export must be gone");
    qemu_io(&daemon.uri("v"), &["write -P 3 0 64k".to_string()]);
}

fn spawn_hold(daemon: &Daemon, volume: &str) -> (ChildGuard, String) {
    let mut child = ChildGuard::new(
        Command::new(tidemark_bin())
            .args(["backup", "begin", volume, "--hold", "--state-dir"])
            .arg(&daemon.state_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Reading to EOF returns only because --hold closes its stdout once ready.
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    (child, out)
}

#[test]
fn hold_prints_the_uri_closes_stdout_and_ends_the_backup_when_stdin_closes() {
    let daemon = Daemon::start();
    daemon.create_volume("v", 4 << 20);
    let (mut hold, out) = spawn_hold(&daemon, "v");
    let uri = out.trim();
    assert_eq!(uri, daemon.uri("v@backup"));
    assert!(export_exists(uri));
    assert!(
        hold.try_wait().unwrap().is_none(),
        "--hold keeps running while stdin is open"
    );
    drop(hold.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = hold.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "--hold did not exit after stdin closed"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    wait_finished(&daemon, "completed");
    assert!(!export_exists(uri));
}

#[test]
fn a_hold_whose_holder_is_killed_leaves_nothing_behind() {
    let daemon = Daemon::start();
    daemon.create_volume("v", 4 << 20);
    let (mut hold, out) = spawn_hold(&daemon, "v");
    assert!(export_exists(out.trim()));
    hold.kill().unwrap();
    let _ = hold.wait();
    let last = wait_finished(&daemon, "failed");
    assert!(last["error"].as_str().unwrap().contains("lease"), "{last}");
    assert!(!export_exists(out.trim()));
    // The volume can be backed up again at once.
    daemon.cli_json(&["backup", "begin", "v"]);
}

#[test]
fn a_full_cow_store_fails_the_backup_and_the_live_volume_never_notices() {
    let daemon = Daemon::start();
    let size = 16usize << 20;
    daemon.create_volume("v", size as u64);
    let live = daemon.uri("v");
    let mut model = Model::new(size);
    qemu_io(&live, &[model.write(0, 8 << 20, 1)]);
    let mut watcher = daemon.control();
    let backup = daemon.cli_json(&["backup", "begin", "v", "--cow-limit", "1M"]);
    let uri = export_uri(&backup);
    // 6 MiB of overwrites need 6 MiB of COW space: the snapshot fails, the writes do not.
    let writes: Vec<String> = (0..6)
        .map(|i| model.write(i << 20, 1 << 20, 2 + i as u8))
        .collect();
    qemu_io(&live, &writes);
    let snapshot_failed = watcher
        .wait_event("SNAPSHOT_FAILED", Duration::from_secs(10))
        .unwrap();
    assert_eq!(snapshot_failed["data"]["volume"], json!("v"));
    let failed = watcher
        .wait_event("BACKUP_FAILED", Duration::from_secs(10))
        .unwrap();
    assert_eq!(failed["data"]["id"], backup["id"]);
    assert!(!export_exists(&uri));
    let copy = daemon.dir.path().join("live.raw");
    qemu_img_convert(&live, &copy);
    model.assert_equals_file(&copy, "live volume after the COW store filled");
    let last = wait_finished(&daemon, "failed");
    assert!(
        last["error"].as_str().unwrap().contains("snapshot"),
        "{last}"
    );
}

#[test]
fn a_pull_client_that_vanishes_mid_read_does_not_end_the_backup() {
    let daemon = Daemon::start();
    let size = 64usize << 20;
    daemon.create_volume("v", size as u64);
    let live = daemon.uri("v");
    let mut model = Model::new(size);
    qemu_io(&live, &[model.write(0, size, 0x5a)]);
    let backup = daemon.cli_json(&["backup", "begin", "v"]);
    let uri = export_uri(&backup);
    let mut reader = ChildGuard::new(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &uri])
            .arg(daemon.dir.path().join("partial.raw"))
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(100));
    reader.kill().unwrap();
    let _ = reader.wait();
    qemu_io(&live, &["write -P 1 0 1M".to_string()]);
    let image = daemon.dir.path().join("full.raw");
    qemu_img_convert(&uri, &image);
    model.assert_equals_file(&image, "a second pull after the first client vanished");
    assert_eq!(
        daemon.cli_json(&["backup", "end", "v"])["state"],
        json!("completed")
    );
}

#[test]
fn fast_tracking_after_kill_9_refuses_an_incremental_instead_of_a_silent_full() {
    let mut daemon = Daemon::start();
    let backing = daemon.dir.path().join("fast.raw");
    daemon.cli_json(&[
        "volume",
        "create",
        "v",
        "--backing",
        backing.to_str().unwrap(),
        "--size",
        "4M",
        "--tracking",
        "fast",
    ]);
    daemon.cli_json(&["checkpoint", "create", "v", "c1"]);
    qemu_io(&daemon.uri("v"), &["write -P 1 0 64k".to_string()]);
    daemon.kill();
    daemon.restart();
    let info = daemon.cli_json(&["volume", "info", "v"]);
    assert_eq!(info["tracking"], json!("inconsistent"), "{info}");
    let out = daemon.cli(&["backup", "begin", "v", "--incremental", "c1", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "an incremental from a stale bitmap must fail"
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["error"]["desc"].as_str().unwrap().contains("full"),
        "{report}"
    );
    assert_eq!(daemon.cli_json(&["backup", "status"])["running"], json!([]));
    // A full backup is allowed and starts a chain that can be trusted again.
    daemon.cli_json(&["backup", "begin", "v", "--checkpoint", "c2"]);
    daemon.cli_json(&["backup", "end", "v"]);
    qemu_io(&daemon.uri("v"), &["write -P 2 1M 4k".to_string()]);
    let backup = daemon.cli_json(&["backup", "begin", "v", "--incremental", "c2"]);
    let dirty = daemon.nbd_tool(&["dirty", &export_uri(&backup), "c2"]);
    assert_eq!(dirty.trim(), "[[1048576, 65536]]");
}

/// The COW store fills with the very last write before `backup-end`, faster than the
/// daemon's periodic check (rounds 0 and 2) or just after it (round 1): either way the
/// backup ends as failed (never "completed"), with SNAPSHOT_FAILED then BACKUP_FAILED,
/// `backup-end` gives the same GenericError, and the live volume keeps every write.
#[test]
fn a_cow_store_that_fills_just_before_backup_end_fails_the_backup() {
    let daemon = Daemon::start();
    let size = 8usize << 20;
    daemon.create_volume("v", size as u64);
    let live = daemon.uri("v");
    let mut model = Model::new(size);
    qemu_io(&live, &[model.write(0, size, 1)]);
    let mut control = daemon.control();
    for round in 0..3u8 {
        let backup = control.ok(
            "backup-begin",
            json!({"volumes": ["v"], "cow_limit": 1 << 20}),
        );
        let id = backup["id"].clone();
        // 1 MiB of overwrites fill the store exactly; the last 4 KiB need one chunk more.
        let base = (round as usize) * (2 << 20);
        qemu_io(
            &live,
            &[
                model.write(base, 1 << 20, 10 + round),
                model.write(base + (1 << 20), 4096, 20 + round),
            ],
        );
        if round == 1 {
            // Let the daemon's own check (every 200 ms) fail the backup first: backup-end
            // must answer exactly as when it notices the failure itself.
            std::thread::sleep(Duration::from_millis(800));
        }
        let ended = control.execute("backup-end", json!({"volume": "v"}));
        let error = &ended["error"];
        assert_eq!(
            error["class"],
            json!("GenericError"),
            "round {round}: {ended}"
        );
        assert!(
            error["desc"].as_str().unwrap().contains("snapshot"),
            "round {round}: {ended}"
        );
        let snapshot_failed = control
            .wait_event("SNAPSHOT_FAILED", Duration::from_secs(10))
            .unwrap();
        assert_eq!(snapshot_failed["data"]["id"], id);
        assert_eq!(snapshot_failed["data"]["volume"], json!("v"));
        let backup_failed = control
            .wait_event("BACKUP_FAILED", Duration::from_secs(10))
            .unwrap();
        assert_eq!(backup_failed["data"]["id"], id);
        assert!(
            !control
                .events
                .iter()
                .any(|e| e["event"] == json!("BACKUP_COMPLETED")),
            "round {round}: {:?}",
            control.events
        );
        let last = wait_finished(&daemon, "failed");
        assert_eq!(last["id"], id);
        assert!(
            last["error"].as_str().unwrap().contains("snapshot"),
            "{last}"
        );
        assert!(!export_exists(&export_uri(&backup)));
        let copy = daemon.dir.path().join(format!("live-{round}.raw"));
        qemu_img_convert(&live, &copy);
        model.assert_equals_file(&copy, "live volume after the COW store filled");
    }
}

/// A backup id names one backup only, across clean restarts and kill -9: the events and
/// logs of a backup before a restart can never be taken for one after it.
#[test]
fn backup_ids_stay_unique_across_restarts_and_kill_9() {
    let mut daemon = Daemon::start();
    daemon.create_volume("v", 4 << 20);
    let mut seen: Vec<String> = Vec::new();
    let begin_end = |daemon: &Daemon, seen: &mut Vec<String>| {
        let backup = daemon.cli_json(&["backup", "begin", "v"]);
        let id = backup["id"].as_str().unwrap().to_string();
        assert!(!seen.contains(&id), "id {id} handed out twice: {seen:?}");
        seen.push(id);
        daemon.cli_json(&["backup", "end", "v"]);
    };
    begin_end(&daemon, &mut seen);
    begin_end(&daemon, &mut seen);
    assert!(daemon.stop().success(), "{}", daemon.log());
    daemon.restart();
    begin_end(&daemon, &mut seen);
    // A running backup when the daemon dies: its id is not reused either.
    let running = daemon.cli_json(&["backup", "begin", "v"]);
    seen.push(running["id"].as_str().unwrap().to_string());
    daemon.kill();
    daemon.restart();
    begin_end(&daemon, &mut seen);
    assert_eq!(seen.len(), 5);
}

#[test]
fn kill_9_mid_backup_leaves_its_checkpoint_unconfirmed_and_an_incremental_from_it_needs_force() {
    let (mut daemon, backing, full) = with_a_full_backup();
    qemu_io(&daemon.uri("v"), &["write -P 2 1M 1M".to_string()]);
    // The next backup starts c2, and the daemon dies before anyone read it.
    let args: Vec<&str> = "backup begin v --incremental c1 --checkpoint c2"
        .split(' ')
        .collect();
    daemon.cli_json(&args);
    daemon.kill();
    restart_after_kill(&mut daemon);

    let list = daemon.cli_json(&["checkpoint", "list", "v"]);
    let flags: Vec<(String, bool)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().into(),
                c["confirmed"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(flags, [("c1".into(), true), ("c2".into(), false)], "{list}");
    let info = daemon.cli_json(&["info"]);
    assert_eq!(
        info["volumes"][0]["checkpoints"][1]["confirmed"],
        json!(false),
        "{info}"
    );
    let text =
        String::from_utf8_lossy(&daemon.cli(&["checkpoint", "list", "v"]).stdout).into_owned();
    assert!(text.contains("CONFIRMED") && text.contains("NO"), "{text}");

    // "Always --incremental from the latest" would skip the interval c1..c2 that no
    // backup stored: refused, saying so.
    let refused = daemon.cli(&["backup", "begin", "v", "--incremental", "c2"]);
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("unconfirmed") && why.contains("missing") && why.contains("--force"),
        "{why}"
    );
    // From c1 (confirmed) the incremental carries everything since the stored full.
    let args: Vec<&str> = "backup begin v --incremental c1 --checkpoint c3"
        .split(' ')
        .collect();
    let backup = daemon.cli_json(&args);
    daemon.nbd_tool(&["apply", &export_uri(&backup), "c1", full.to_str().unwrap()]);
    // A client that knows its pull failed ends it so: c3 stays unconfirmed.
    let ended = daemon.cli_json(&["backup", "end", "v", "--failed"]);
    assert_eq!(ended["state"], json!("failed"), "{ended}");
    let list = daemon.cli_json(&["checkpoint", "list", "v"]);
    assert_eq!(list[2]["confirmed"], json!(false), "{list}");
    files_equal(
        &full,
        &backing,
        "full + incremental from the confirmed checkpoint",
    );
}

/// Restart after a kill -9 (the volume's tracking must be intact: durable mode).
fn restart_after_kill(daemon: &mut Daemon) {
    daemon.restart();
    let info = daemon.cli_json(&["volume", "info", "v"]);
    assert_eq!(info["tracking"], json!("durable"), "{info}");
}
