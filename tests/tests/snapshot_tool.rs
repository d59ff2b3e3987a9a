//! `tidemark snapshot -t TARGET DIR...` on this machine's kernel (root: FUSE, loop, mount):
//! ext4 and xfs on volumes attached through the FUSE front end, a database-like writer
//! that keeps file pairs equal (a freeze hook pauses it between pairs, as a database's
//! hook would), one group snapshot of both in one write pause, mounted read-only under
//! TARGET; the caller's kill -9 cleans up by itself, tidemark's own kill -9 is cleaned up
//! by `tidemark snapshot --cleanup`; the bind-mount fallback warns and `--strict` refuses.
//!
//! Every mount, loop device and FUSE mount under the test's directory is undone by a
//! guard, also when a test fails.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tidemark_tests::daemon::Daemon;
use tidemark_tests::{run_ok_within, tidemark_bin, ChildGuard, MIB};

const LIMIT: Duration = Duration::from_secs(60);

/// File pairs the writer keeps equal.
const PAIRS: u64 = 40;

fn sh(program: &str, args: &[&str]) -> String {
    run_ok_within(Command::new(program).args(args), LIMIT)
        .unwrap_or_else(|err| panic!("{program} {args:?}: {err:#}"))
}

/// Mount points under `root` in /proc/self/mountinfo, deepest first, with their fstype.
fn mounts_under(root: &Path) -> Vec<(PathBuf, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mut found: Vec<(PathBuf, String)> = text
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let point = before.split(' ').nth(4)?.replace("\\040", " ");
            let fstype = after.split(' ').next()?.to_string();
            Some((PathBuf::from(point), fstype))
        })
        .filter(|(point, _)| point.starts_with(root))
        .collect();
    found.sort_by_key(|(point, _)| std::cmp::Reverse(point.components().count()));
    found
}

/// Loop devices whose backing file lies under `root`.
fn loops_under(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/sys/block").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) {
            if Path::new(backing.trim_end()).starts_with(root) {
                found.push(format!("/dev/{name}"));
            }
        }
    }
    found
}

/// Undoes every mount and loop device under a test's directory when dropped: the
/// filesystems first, then the loop devices, then the FUSE mounts under them.
struct Sweep(PathBuf);

impl Drop for Sweep {
    fn drop(&mut self) {
        for (point, fstype) in mounts_under(&self.0) {
            if !fstype.starts_with("fuse") {
                let _ = Command::new("fsfreeze").arg("-u").arg(&point).output();
                let _ = Command::new("umount").arg("-l").arg(&point).output();
            }
        }
        for device in loops_under(&self.0) {
            let _ = Command::new("losetup").args(["-d", &device]).output();
        }
        for (point, _) in mounts_under(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&point).output();
        }
    }
}

/// A daemon with one volume per filesystem type, each attached through FUSE, formatted
/// and mounted under `<dir>/mnt/<fstype>`.
struct Setup {
    daemon: Daemon,
    mounts: Vec<PathBuf>,
}

impl Setup {
    fn new(fstypes: &[&str]) -> (Setup, Sweep) {
        let daemon = Daemon::start();
        let sweep = Sweep(daemon.dir.path().to_path_buf());
        let mut mounts = Vec::new();
        for fstype in fstypes {
            let name = format!("vol-{fstype}");
            daemon.create_volume(&name, 320 * MIB);
            let attached = daemon.cli_json(&["volume", "attach", &name, "--via", "fuse"]);
            let device = attached["device"].as_str().expect("device").to_string();
            sh(&format!("mkfs.{fstype}"), &["-q", &device]);
            let point = daemon.dir.path().join("mnt").join(fstype);
            std::fs::create_dir_all(&point).unwrap();
            sh("mount", &[&device, point.to_str().unwrap()]);
            mounts.push(point);
        }
        (Setup { daemon, mounts }, sweep)
    }

    fn target(&self) -> PathBuf {
        self.daemon.dir.path().join("snap")
    }

    /// `tidemark snapshot` with `args`, stdout and stderr piped, stdin from `stdin`.
    fn snapshot(&self, args: &[&str], stdin: Stdio) -> ChildGuard {
        let child = Command::new(tidemark_bin())
            .arg("snapshot")
            .args(args)
            .arg("--state-dir")
            .arg(&self.daemon.state_dir)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning tidemark snapshot");
        ChildGuard::new(child)
    }

    /// Snapshot attachments (NAME@...) the daemon holds.
    fn snapshot_attachments(&self) -> Vec<Value> {
        let info = self.daemon.cli_json(&["info"]);
        info["attachments"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["name"].as_str().is_some_and(|n| n.contains('@')))
            .cloned()
            .collect()
    }

    /// Nothing of a snapshot lease is left: no mount under the target, no snapshot
    /// attachment, no running backup, no lease record.
    fn assert_released(&self, what: &str) {
        let left = mounts_under(&self.target());
        assert!(left.is_empty(), "{what}: still mounted: {left:?}");
        let attached = self.snapshot_attachments();
        assert!(attached.is_empty(), "{what}: still attached: {attached:?}");
        let status = self.daemon.cli_json(&["backup", "status"]);
        assert_eq!(status["running"], json!([]), "{what}: {status}");
        let records = self.daemon.state_dir.join("snapshot-leases");
        let left: Vec<_> = std::fs::read_dir(&records)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{what}: lease records left: {left:?}");
    }
}

/// Everything `child` writes on stdout until it closes it, within `limit`.
fn read_until_closed(child: &mut Child, limit: Duration) -> String {
    let mut stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        let _ = tx.send(text);
    });
    match rx.recv_timeout(limit) {
        Ok(text) => text,
        Err(_) => {
            let _ = child.kill();
            panic!(
                "tidemark snapshot did not close stdout within {limit:?}: {}",
                stderr_of(child)
            );
        }
    }
}

fn stderr_of(child: &mut Child) -> String {
    let mut text = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        let _ = child.kill();
        let _ = stderr.read_to_string(&mut text);
    }
    text
}

/// Wait (bounded) for `child` to exit; its status and stderr.
fn wait_exit(child: &mut Child, limit: Duration) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut text = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                stderr.read_to_string(&mut text).unwrap();
            }
            return (status, text);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("tidemark snapshot did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The content of pair file `i` at generation `generation`: a header, then 24 KiB that
/// depend on both.
fn pair_content(i: u64, generation: u64) -> Vec<u8> {
    let mut data = format!("pair {i} generation {generation}\n").into_bytes();
    data.extend((0..24 * 1024u64).map(|o| (o.wrapping_mul(31) ^ generation ^ (i << 3)) as u8));
    data
}

fn generation_of(data: &[u8]) -> Option<u64> {
    let line = data.split(|&b| b == b'\n').next()?;
    std::str::from_utf8(line)
        .ok()?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

/// A database-like writer: generation g rewrites pair g % PAIRS, first `a`, fsync, then
/// `b`, fsync. Between two generations it honours the freeze hook's pause: when
/// `<control>/pause` exists it writes the last finished generation to `<control>/ack-NAME`
/// and waits for the pause to go.
struct PairWriter {
    stop: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
    /// The last finished generation at each pause.
    pauses: Arc<Mutex<Vec<u64>>>,
    thread: Option<JoinHandle<()>>,
}

impl PairWriter {
    fn start(dir: PathBuf, control: PathBuf, name: &str) -> PairWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(AtomicU64::new(0));
        let pauses = Arc::new(Mutex::new(Vec::new()));
        let ack = control.join(format!("ack-{name}"));
        let ack_temp = control.join(format!("ack-{name}.tmp"));
        let thread = {
            let (stop, generation) = (Arc::clone(&stop), Arc::clone(&generation));
            let pauses = Arc::clone(&pauses);
            std::thread::spawn(move || {
                let write = |path: PathBuf, data: &[u8]| {
                    let mut file = std::fs::File::create(path).unwrap();
                    file.write_all(data).unwrap();
                    file.sync_all().unwrap();
                };
                for i in 0..PAIRS {
                    write(dir.join(format!("a{i}")), &pair_content(i, i));
                    write(dir.join(format!("b{i}")), &pair_content(i, i));
                }
                generation.store(PAIRS - 1, Ordering::SeqCst);
                let mut g = PAIRS;
                while !stop.load(Ordering::SeqCst) {
                    if control.join("pause").exists() {
                        pauses.lock().unwrap().push(g - 1);
                        std::fs::write(&ack_temp, (g - 1).to_string()).unwrap();
                        std::fs::rename(&ack_temp, &ack).unwrap();
                        while control.join("pause").exists() && !stop.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        continue;
                    }
                    let i = g % PAIRS;
                    let data = pair_content(i, g);
                    write(dir.join(format!("a{i}")), &data);
                    write(dir.join(format!("b{i}")), &data);
                    generation.store(g, Ordering::SeqCst);
                    g += 1;
                }
            })
        };
        PairWriter {
            stop,
            generation,
            pauses,
            thread: Some(thread),
        }
    }

    fn last_pause(&self) -> u64 {
        let pauses = self.pauses.lock().unwrap();
        assert_eq!(pauses.len(), 1, "the writer paused {} times", pauses.len());
        pauses[0]
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    fn wait_past(&self, generation: u64) {
        let deadline = Instant::now() + LIMIT;
        while self.generation() < generation {
            assert!(
                Instant::now() < deadline,
                "the writer stalled at {}",
                self.generation()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for PairWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The writer's freeze hook: pause the writers named in `names`, wait until each has
/// acknowledged (at a pair boundary); thaw lets them go. Every call is logged.
fn pause_hook(control: &Path, names: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("tidemark-hooks-")
        .tempdir()
        .unwrap();
    let c = control.display();
    let acks: Vec<String> = names.iter().map(|n| format!("{c}/ack-{n}")).collect();
    let script = format!(
        "#!/bin/sh\n\
         echo \"$*\" >> {c}/hook.log\n\
         case \"$1\" in\n\
         freeze)\n\
           touch {c}/pause\n\
           for ack in {acks}; do\n\
             i=0; while [ ! -e $ack ]; do sleep 0.01; i=$((i+1)); [ $i -gt 400 ] && exit 1; done\n\
           done ;;\n\
         thaw) rm -f {c}/pause {acks} ;;\n\
         esac\n\
         exit 0\n",
        acks = acks.join(" ")
    );
    let hook = dir.path().join("10-pairs");
    std::fs::write(&hook, script).unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Every pair under `root` matches, and holds the last generation the writer finished
/// before it paused at `paused`.
fn assert_pairs(root: &Path, paused: u64, what: &str) {
    for i in 0..PAIRS {
        let a = std::fs::read(root.join(format!("a{i}")))
            .unwrap_or_else(|e| panic!("{what}: a{i}: {e}"));
        let b = std::fs::read(root.join(format!("b{i}")))
            .unwrap_or_else(|e| panic!("{what}: b{i}: {e}"));
        assert!(
            a == b,
            "{what}: pair {i} differs: a is {:?}, b is {:?}",
            generation_of(&a),
            generation_of(&b)
        );
        let expected = if paused >= i {
            paused - (paused - i) % PAIRS
        } else {
            i
        };
        assert_eq!(generation_of(&a), Some(expected), "{what}: pair {i}");
        assert!(a == pair_content(i, expected), "{what}: pair {i} content");
    }
}

#[test]
fn a_writer_on_ext4_and_xfs_is_captured_consistently_in_one_pause_and_released_at_stdin_eof() {
    let (setup, _sweep) = Setup::new(&["ext4", "xfs"]);
    let control = setup.daemon.dir.path().join("writer-control");
    std::fs::create_dir_all(&control).unwrap();
    let dirs: Vec<PathBuf> = setup.mounts.iter().map(|m| m.join("db")).collect();
    for dir in &dirs {
        std::fs::create_dir_all(dir).unwrap();
    }
    let writers = [
        PairWriter::start(dirs[0].clone(), control.clone(), "ext4"),
        PairWriter::start(dirs[1].clone(), control.clone(), "xfs"),
    ];
    for writer in &writers {
        writer.wait_past(PAIRS + 20);
    }
    let hooks = pause_hook(&control, &["ext4", "xfs"]);
    let target = setup.target();
    let mut child = setup.snapshot(
        &[
            "-t",
            target.to_str().unwrap(),
            "--json",
            "--hooks",
            hooks.path().to_str().unwrap(),
            dirs[0].to_str().unwrap(),
            dirs[1].to_str().unwrap(),
        ],
        Stdio::piped(),
    );
    let stdin = child.stdin.take();
    let stdout = read_until_closed(&mut child, LIMIT);
    let report: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("one JSON line expected ({e}): {stdout:?}"));
    let hook_log = std::fs::read_to_string(control.join("hook.log")).unwrap();
    assert!(hook_log.starts_with("freeze "), "{hook_log}");
    assert_eq!(hook_log.lines().count(), 2, "{hook_log}");
    assert!(
        hook_log.lines().nth(1).unwrap().starts_with("thaw "),
        "{hook_log}"
    );
    for mount in &setup.mounts {
        assert!(hook_log.contains(mount.to_str().unwrap()), "{hook_log}");
    }

    // One backup, one write pause, both volumes; each view where the report says.
    assert!(report["backup"].is_string(), "{report}");
    assert!(report["write_pause_us"].as_u64().is_some(), "{report}");
    let views = report["mounts"].as_array().unwrap();
    assert_eq!(views.len(), 2, "{report}");
    let status = setup.daemon.cli_json(&["backup", "status"]);
    let running = &status["running"][0];
    assert_eq!(running["id"], report["backup"], "{status}");
    assert_eq!(running["volumes"].as_array().unwrap().len(), 2, "{status}");
    assert_eq!(
        running["quiesce"]["summary"]["filesystems"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let live = mounts_under(&target);
    for (view, fstype, options) in [
        (&views[0], "ext4", "ro,noload"),
        (&views[1], "xfs", "ro,norecovery,nouuid"),
    ] {
        assert_eq!(view["kind"], json!("snapshot"), "{view}");
        assert_eq!(view["consistent"], json!(true), "{view}");
        assert_eq!(view["fstype"], json!(fstype), "{view}");
        assert_eq!(view["options"], json!(options), "{view}");
        let path = PathBuf::from(view["path"].as_str().unwrap());
        assert!(
            live.iter().any(|(p, t)| *p == path && t == fstype),
            "{live:?}"
        );
        let mountpoint = Path::new(view["mountpoint"].as_str().unwrap());
        assert_eq!(path, target.join(mountpoint.strip_prefix("/").unwrap()));
    }

    // Every pair in the views matches and is the writer's state at the pause.
    let acks = [writers[0].last_pause(), writers[1].last_pause()];
    for ((dir, ack), name) in dirs.iter().zip(acks).zip(["ext4", "xfs"]) {
        let view = target.join(dir.strip_prefix("/").unwrap());
        assert_pairs(&view, ack, &format!("{name} snapshot"));
        let err = std::fs::write(view.join("new"), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(EROFS), "{name}: {err}");
    }
    // The writers go on; the views do not change.
    for (writer, ack) in writers.iter().zip(acks) {
        writer.wait_past(ack + 2 * PAIRS);
    }
    for ((dir, ack), name) in dirs.iter().zip(acks).zip(["ext4", "xfs"]) {
        assert_pairs(
            &target.join(dir.strip_prefix("/").unwrap()),
            ack,
            &format!("{name} later"),
        );
    }
    drop(writers);

    drop(stdin);
    let (status, stderr) = wait_exit(&mut child, LIMIT);
    assert!(status.success(), "{stderr}");
    setup.assert_released("after stdin closed");
    assert!(
        !target.exists(),
        "the target it made stays: {}",
        target.display()
    );
    // The live filesystems still hold every pair.
    for dir in &dirs {
        for i in 0..PAIRS {
            assert_eq!(
                std::fs::read(dir.join(format!("a{i}"))).unwrap(),
                std::fs::read(dir.join(format!("b{i}"))).unwrap()
            );
        }
    }
}

/// The errno of a write to a read-only filesystem.
const EROFS: i32 = 30;

#[test]
fn the_callers_kill_leaves_nothing_mounted_or_attached_a_second_later() {
    let (setup, _sweep) = Setup::new(&["ext4"]);
    std::fs::write(setup.mounts[0].join("file"), b"before").unwrap();
    let target = setup.target();
    // The caller: a process whose stdout is tidemark snapshot's stdin.
    let mut caller = Command::new("sleep")
        .arg("600")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pipe = caller.stdout.take().unwrap();
    let mut caller = ChildGuard::new(caller);
    let mut child = setup.snapshot(
        &[
            "-t",
            target.to_str().unwrap(),
            setup.mounts[0].to_str().unwrap(),
        ],
        Stdio::from(pipe),
    );
    let stdout = read_until_closed(&mut child, LIMIT);
    let view = target.join(setup.mounts[0].strip_prefix("/").unwrap());
    assert!(stdout.contains(view.to_str().unwrap()), "{stdout}");
    assert_eq!(std::fs::read(view.join("file")).unwrap(), b"before");
    assert_eq!(setup.snapshot_attachments().len(), 1);

    caller.kill().unwrap();
    let killed = Instant::now();
    let (status, stderr) = wait_exit(&mut child, LIMIT);
    let took = killed.elapsed();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("stdin closed"), "{stderr}");
    setup.assert_released("after the caller's kill -9");
    assert!(took < Duration::from_secs(1), "cleanup took {took:?}");
    eprintln!("caller killed -> released in {took:?}");
}

#[test]
fn tidemarks_own_kill_is_cleaned_up_by_snapshot_cleanup() {
    let (setup, _sweep) = Setup::new(&["xfs"]);
    let target = setup.target();
    let mut child = setup.snapshot(
        &[
            "-t",
            target.to_str().unwrap(),
            setup.mounts[0].to_str().unwrap(),
        ],
        Stdio::piped(),
    );
    let _stdin = child.stdin.take();
    read_until_closed(&mut child, LIMIT);
    assert_eq!(mounts_under(&target).len(), 1);
    child.kill().unwrap();
    child.wait().unwrap();
    // Mounted and attached still: the daemon ended the backup (the lease's connection
    // closed), the snapshot device stays until someone unmounts it.
    assert_eq!(mounts_under(&target).len(), 1);

    let out = setup.daemon.cli(&["snapshot", "--cleanup", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let cleaned = report["cleaned"].as_array().unwrap();
    assert_eq!(cleaned.len(), 1, "{report}");
    assert_eq!(cleaned[0]["pid"], json!(child.id()), "{report}");
    assert_eq!(cleaned[0]["error"], Value::Null, "{report}");
    setup.assert_released("after --cleanup");
    let again = setup.daemon.cli(&["snapshot", "--cleanup"]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to clean up"));
}

#[test]
fn a_dir_off_tidemark_volumes_is_bind_mounted_with_a_warning_and_strict_refuses_it() {
    let (setup, _sweep) = Setup::new(&[]);
    let plain = setup.daemon.dir.path().join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    std::fs::write(plain.join("file"), b"live data").unwrap();
    let target = setup.target();

    let strict = setup.snapshot(
        &[
            "-t",
            target.to_str().unwrap(),
            "--strict",
            plain.to_str().unwrap(),
        ],
        Stdio::null(),
    );
    let mut strict = strict;
    let (status, stderr) = wait_exit(&mut strict, LIMIT);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("not an attached tidemark volume"),
        "{stderr}"
    );
    assert!(mounts_under(&target).is_empty());

    let mut child = setup.snapshot(
        &[
            "-t",
            target.to_str().unwrap(),
            "--json",
            plain.to_str().unwrap(),
        ],
        Stdio::piped(),
    );
    let stdin = child.stdin.take();
    let report: Value = serde_json::from_str(read_until_closed(&mut child, LIMIT).trim()).unwrap();
    let view = &report["mounts"][0];
    assert_eq!(view["kind"], json!("bind"), "{report}");
    assert_eq!(view["consistent"], json!(false), "{report}");
    assert_eq!(report["backup"], Value::Null, "{report}");
    let path = target.join(plain.strip_prefix("/").unwrap());
    assert_eq!(view["path"], json!(path), "{report}");
    assert_eq!(std::fs::read(path.join("file")).unwrap(), b"live data");
    let err = std::fs::write(path.join("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(EROFS), "{err}");
    drop(stdin);
    let (status, stderr) = wait_exit(&mut child, LIMIT);
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("NOT a consistent snapshot"), "{stderr}");
    setup.assert_released("after the bind view");
}

#[test]
fn two_idle_filesystems_are_ready_in_seconds_with_a_write_pause_of_milliseconds() {
    let (setup, _sweep) = Setup::new(&["ext4", "xfs"]);
    let target = setup.target();
    let mut ready = Vec::new();
    let mut pauses = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let mut args = vec!["-t", target.to_str().unwrap(), "--json", "--no-hooks"];
        args.extend(setup.mounts.iter().map(|m| m.to_str().unwrap()));
        let mut child = setup.snapshot(&args, Stdio::piped());
        let stdin = child.stdin.take();
        let report: Value =
            serde_json::from_str(read_until_closed(&mut child, LIMIT).trim()).unwrap();
        ready.push(started.elapsed());
        pauses.push(report["write_pause_us"].as_u64().unwrap());
        eprintln!(
            "round: ready {:.0} ms, freeze-to-thaw {:.1} ms, steps {}",
            report["ready_ms"].as_f64().unwrap(),
            report["freeze_to_thaw_ms"].as_f64().unwrap(),
            report["steps_ms"]
        );
        drop(stdin);
        let (status, stderr) = wait_exit(&mut child, LIMIT);
        assert!(status.success(), "{stderr}");
        setup.assert_released("after an idle round");
    }
    ready.sort();
    pauses.sort();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!(
        "tidemark snapshot of two idle filesystems: start to closed stdout {:?} (median of 3: \
         {:?}), write pause {} us (median; all {pauses:?}), load {}",
        ready,
        ready[1],
        pauses[1],
        load.trim()
    );
    assert!(ready[1] < Duration::from_secs(15), "{ready:?}");
    assert!(pauses[1] < 1_000_000, "{pauses:?}");
}
