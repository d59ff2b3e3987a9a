//! Quiescing wired into `backup begin`, end to end: FIFREEZE of a loop-mounted ext4 around
//! a backup with a writer on it, freeze hooks that print, fail or hang, and the daemon
//! killed with -9 inside the freeze window. Needs root (loop mounts), as the suite does.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tidemark_tests::daemon::Daemon;
use tidemark_tests::quiesce::{hooks_dir, LoopFs};
use tidemark_tests::{tidemark_bin, ChildGuard};

/// Writes and fsyncs a small file on `dir` in a loop, recording when each write finished.
struct FsWriter {
    stop: Arc<AtomicBool>,
    done: Arc<Mutex<Vec<Instant>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FsWriter {
    fn start(dir: &Path) -> FsWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(Mutex::new(Vec::new()));
        let path = dir.join("writer.dat");
        let thread = {
            let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut file = std::fs::File::create(&path).unwrap();
                    file.write_all(&n.to_le_bytes().repeat(512)).unwrap();
                    file.sync_all().unwrap();
                    done.lock().unwrap().push(Instant::now());
                    n += 1;
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        FsWriter {
            stop,
            done,
            thread: Some(thread),
        }
    }

    fn count(&self) -> usize {
        self.done.lock().unwrap().len()
    }

    fn wait_for(&self, writes: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.count() < writes {
            assert!(
                Instant::now() < deadline,
                "the writer is stuck: is the filesystem frozen?"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The longest time between two completed writes.
    fn longest_stall(&self) -> Duration {
        let done = self.done.lock().unwrap();
        done.windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    }
}

impl Drop for FsWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn freeze_blocks_a_writer_only_during_the_window_and_reports_it() {
    let daemon = Daemon::start();
    daemon.create_volume("v", 4 << 20);
    let fs = LoopFs::new(32).expect("a loop-mounted ext4");
    let writer = FsWriter::start(&fs.mountpoint);
    writer.wait_for(20, Duration::from_secs(10));
    let mountpoint = fs.mountpoint.to_str().unwrap();
    let backup = daemon.cli_json(&["backup", "begin", "v", "--no-hooks", "--freeze", mountpoint]);
    let quiesce = &backup["quiesce"];
    let window = quiesce["freeze_to_thaw_ms"]
        .as_f64()
        .expect("freeze_to_thaw_ms");
    assert!(window > 0.0 && window < 10_000.0, "{quiesce}");
    assert_eq!(quiesce["summary"]["filesystems"], json!([mountpoint]));
    assert_eq!(quiesce["thaw"]["errors"], json!([]));
    // Thawed when backup begin returns: the writer goes on at once.
    let before = writer.count();
    writer.wait_for(before + 5, Duration::from_secs(5));
    let stall = writer.longest_stall();
    assert!(
        stall < Duration::from_millis(window as u64 + 2000),
        "the writer stalled {stall:?}, the window was {window} ms"
    );
    let status = daemon.cli_json(&["backup", "status"]);
    assert_eq!(
        status["running"][0]["quiesce"]["freeze_to_thaw_ms"],
        json!(window)
    );
    eprintln!("freeze-to-thaw window of a backup with FIFREEZE: {window:.2} ms");
    daemon.cli_json(&["backup", "end", "v"]);
}

#[test]
fn a_mountpoint_holding_the_state_dir_or_root_is_refused() {
    let daemon = Daemon::start();
    daemon.create_volume("v", 1 << 20);
    let out = daemon.cli(&[
        "backup",
        "begin",
        "v",
        "--no-hooks",
        "--freeze",
        "/",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["error"]["class"],
        json!("InvalidParameter"),
        "{report}"
    );
    assert_eq!(daemon.cli_json(&["backup", "status"])["running"], json!([]));
}

#[test]
fn hooks_that_print_have_their_output_in_the_backup_status() {
    let daemon = Daemon::start();
    daemon.create_volume("v", 1 << 20);
    let hooks = hooks_dir(&[("10-print", "echo \"print $1\"; echo \"to stderr\" >&2")])
        .expect("a hooks dir");
    let backup = daemon.cli_json(&[
        "backup",
        "begin",
        "v",
        "--hooks",
        hooks.path().to_str().unwrap(),
    ]);
    let runs = backup["quiesce"]["thaw"]["hook_runs"]
        .as_array()
        .expect("hook runs")
        .clone();
    let text = serde_json::to_string(&runs).unwrap();
    assert_eq!(runs.len(), 2, "{text}");
    assert!(
        text.contains("print freeze") && text.contains("print thaw"),
        "{text}"
    );
    assert!(text.contains("to stderr"), "{text}");
    daemon.cli_json(&["backup", "end", "v"]);
}

/// `backup begin v --checkpoint c1 --hooks DIR`.
fn begin_with_hooks(daemon: &Daemon, hooks: &Path) -> std::process::Output {
    daemon.cli(&[
        "backup",
        "begin",
        "v",
        "--checkpoint",
        "c1",
        "--hooks",
        hooks.to_str().unwrap(),
    ])
}

#[test]
fn a_failing_hook_aborts_the_backup_and_thaws_what_was_frozen() {
    let daemon = Daemon::start();
    daemon.create_volume("v", 1 << 20);
    let record = daemon.dir.path().join("record");
    let hooks = hooks_dir(&[
        (
            "10-record",
            &format!("echo \"$1\" >> '{}'", record.display()),
        ),
        ("20-fail", "[ \"$1\" = freeze ] && exit 3; exit 0"),
    ])
    .expect("a hooks dir");
    let out = begin_with_hooks(&daemon, hooks.path());
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("20-fail"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&record).unwrap(), "freeze\nthaw\n");
    assert_eq!(daemon.cli_json(&["backup", "status"])["running"], json!([]));
    let info = daemon.cli_json(&["volume", "info", "v"]);
    assert_eq!(info["snapshots"], json!([]), "no snapshot was kept");
    assert_eq!(info["checkpoints"], json!([]), "no checkpoint was created");
}

#[test]
fn a_hanging_hook_is_cut_off_at_the_quiesce_limit() {
    let daemon = Daemon::start();
    daemon.create_volume("v", 1 << 20);
    let hooks =
        hooks_dir(&[("10-hang", "[ \"$1\" = freeze ] && sleep 60; exit 0")]).expect("a hooks dir");
    let started = Instant::now();
    let out = daemon.cli(&[
        "backup",
        "begin",
        "v",
        "--hooks",
        hooks.path().to_str().unwrap(),
        "--quiesce-timeout",
        "1",
    ]);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(2));
    assert!(took < Duration::from_secs(8), "took {took:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("10-hang"));
    assert_eq!(daemon.cli_json(&["backup", "status"])["running"], json!([]));
}

#[test]
fn kill_9_of_the_daemon_inside_the_freeze_window_still_thaws_within_the_limit() {
    let mut daemon = Daemon::start();
    daemon.create_volume("v", 1 << 20);
    let record = daemon.dir.path().join("record");
    let inside = daemon.dir.path().join("inside");
    // 10-app "freezes" the application; 20-slow keeps the window open.
    let hooks = hooks_dir(&[
        (
            "10-app",
            &format!("echo \"app $1\" >> '{}'", record.display()),
        ),
        (
            "20-slow",
            &format!(
                "[ \"$1\" = freeze ] && touch '{}' && sleep 30; exit 0",
                inside.display()
            ),
        ),
    ])
    .expect("a hooks dir");
    let limit = Duration::from_secs(8);
    let mut begin = ChildGuard::new(
        Command::new(tidemark_bin())
            .args(["backup", "begin", "v", "--quiesce-timeout", "8", "--hooks"])
            .arg(hooks.path())
            .arg("--state-dir")
            .arg(&daemon.state_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !inside.exists() {
        assert!(
            Instant::now() < deadline,
            "the freeze window never opened: {}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let killed = Instant::now();
    daemon.kill();
    loop {
        let text = std::fs::read_to_string(&record).unwrap_or_default();
        if text.lines().any(|l| l == "app thaw") {
            break;
        }
        assert!(
            killed.elapsed() < limit,
            "the application was not thawed within {limit:?}: {text:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "kill -9 inside the window: thawed {:?} after the kill",
        killed.elapsed()
    );
    let status = begin.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(2),
        "backup begin must fail when the daemon dies"
    );
    daemon.restart();
    assert_eq!(daemon.cli_json(&["backup", "status"])["running"], json!([]));
    daemon.cli_json(&["backup", "begin", "v", "--no-hooks"]);
}

#[test]
fn a_hook_writable_by_others_is_refused_before_anything_runs() {
    use std::os::unix::fs::PermissionsExt;
    let daemon = Daemon::start();
    daemon.create_volume("v", 1 << 20);
    let record = daemon.dir.path().join("record");
    let hooks = hooks_dir(&[(
        "10-record",
        &format!("echo \"$1\" >> '{}'", record.display()),
    )])
    .expect("a hooks dir");
    let hook = hooks.path().join("10-record");
    // Anyone could put their own commands in it, to be run as the daemon.
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o757)).unwrap();
    let out = begin_with_hooks(&daemon, hooks.path());
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(hook.to_str().unwrap()) && stderr.contains("0757"),
        "names the hook and why: {stderr}"
    );
    assert!(!record.exists(), "the hook never ran");
    let info = daemon.cli_json(&["volume", "info", "v"]);
    assert_eq!(info["checkpoints"], json!([]), "no checkpoint was created");
}
