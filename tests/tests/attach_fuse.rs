//! `tidemark volume attach --via fuse` on this machine's kernel (root: FUSE, loop, mount):
//! ext4 and xfs on the attached device, full and incremental backups frozen with
//! `--freeze` while a writer runs, pulled with `tidemark pull`, restored with `tidemark
//! restore` and compared file by file; fstrim, the refusals, and a daemon killed with -9.
//! A pull backup's snapshot (`VOLUME@backup`) attached read-only and mounted beside the
//! live filesystem keeps the backup's files while the volume changes.
//!
//! Every mount, loop device and FUSE mount is undone by a guard, also when a test fails.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rand::{Rng, RngCore, SeedableRng};
use serde_json::{json, Value};
use tidemark_tests::daemon::Daemon;
use tidemark_tests::{run, run_ok_within, tidemark_bin, MIB};

const LIMIT: Duration = Duration::from_secs(120);

fn sh(program: &str, args: &[&str]) -> String {
    run_ok_within(Command::new(program).args(args), LIMIT)
        .unwrap_or_else(|err| panic!("{program} {args:?}: {err:#}"))
}

/// A filesystem mounted at `dir`, unmounted (lazily if it must) when dropped.
struct Mounted {
    dir: PathBuf,
}

impl Mounted {
    fn new(source: &Path, dir: PathBuf, options: &str) -> Mounted {
        std::fs::create_dir_all(&dir).unwrap();
        let mut args = vec![];
        if !options.is_empty() {
            args.extend(["-o", options]);
        }
        let source = source.to_str().unwrap();
        let target = dir.to_str().unwrap();
        args.extend([source, target]);
        sh("mount", &args);
        Mounted { dir }
    }

    fn unmount(self) {
        sh("umount", &[self.dir.to_str().unwrap()]);
        std::mem::forget(self);
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let dir = self.dir.to_str().unwrap();
        let _ = Command::new("fsfreeze").args(["-u", dir]).output();
        if !Command::new("umount")
            .arg(dir)
            .output()
            .is_ok_and(|o| o.status.success())
        {
            let _ = Command::new("umount").args(["-l", dir]).output();
        }
    }
}

/// An attachment made by the daemon under test: whatever is left of it (the loop device
/// and the FUSE mount) is removed when dropped, whether or not the daemon still runs.
struct Attachment {
    device: PathBuf,
    fuse_mount: PathBuf,
}

impl Attachment {
    fn new(daemon: &Daemon, name: &str) -> Attachment {
        Attachment::made(daemon, name, false)
    }

    /// Attach `name` over FUSE and check that it is `read_only` as expected.
    fn made(daemon: &Daemon, name: &str, read_only: bool) -> Attachment {
        let attached = daemon.cli_json(&["volume", "attach", name, "--via", "fuse"]);
        assert_eq!(attached["via"], json!("fuse"), "{attached}");
        assert_eq!(attached["read_only"], json!(read_only), "{attached}");
        let device = PathBuf::from(attached["device"].as_str().expect("device"));
        assert!(
            device.to_str().unwrap().starts_with("/dev/loop"),
            "{attached}"
        );
        Attachment {
            device,
            fuse_mount: PathBuf::from(attached["fuse_mount"].as_str().expect("fuse_mount")),
        }
    }

    fn backing_file(&self) -> Option<String> {
        let name = self.device.file_name()?.to_str()?;
        std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if self
            .backing_file()
            .is_some_and(|f| f.starts_with(self.fuse_mount.to_str().unwrap()) || f == "/volume\n")
        {
            let _ = Command::new("losetup").arg("-d").arg(&self.device).output();
        }
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.fuse_mount)
            .output();
    }
}

/// The files of a tree (relative path -> contents).
type Tree = BTreeMap<PathBuf, Vec<u8>>;

/// Write `count` small files (1-12 KiB) in 20 directories and `big` files of 8 MiB
/// under `root/tree`, into `tree`.
fn write_files(
    root: &Path,
    tree: &mut Tree,
    rng: &mut impl RngCore,
    prefix: &str,
    count: usize,
    big: usize,
) {
    for i in 0..count {
        let rel = PathBuf::from(format!("tree/d{:02}/{prefix}{i}", i % 20));
        let mut data = vec![0u8; rng.gen_range(1024..12 * 1024)];
        rng.fill_bytes(&mut data);
        std::fs::create_dir_all(root.join(&rel).parent().unwrap()).unwrap();
        std::fs::write(root.join(&rel), &data).unwrap();
        tree.insert(rel, data);
    }
    for i in 0..big {
        let rel = PathBuf::from(format!("tree/{prefix}big{i}"));
        let mut data = vec![0u8; 8 * MIB as usize];
        rng.fill_bytes(&mut data);
        std::fs::write(root.join(&rel), &data).unwrap();
        tree.insert(rel, data);
    }
}

/// Rewrite some files and delete others.
fn change_files(root: &Path, tree: &mut Tree, rng: &mut impl RngCore) {
    let paths: Vec<PathBuf> = tree.keys().cloned().collect();
    for (i, rel) in paths.iter().enumerate() {
        match i % 10 {
            0 => {
                let len = tree[rel].len();
                let mut data = vec![0u8; len];
                rng.fill_bytes(&mut data);
                std::fs::write(root.join(rel), &data).unwrap();
                tree.insert(rel.clone(), data);
            }
            1 => {
                std::fs::remove_file(root.join(rel)).unwrap();
                tree.remove(rel);
            }
            _ => {}
        }
    }
}

/// fsync every file of the filesystem at `root` (syncfs).
fn sync_fs(root: &Path) {
    sh("sync", &["-f", root.to_str().unwrap()]);
}

/// Every file of `tree` reads back identically under `root`.
fn assert_tree(root: &Path, tree: &Tree, what: &str) {
    for (rel, data) in tree {
        let read = std::fs::read(root.join(rel))
            .unwrap_or_else(|err| panic!("{what}: reading {}: {err}", rel.display()));
        assert!(read == *data, "{what}: {} differs", rel.display());
    }
}

/// Writes files into `root/writer` until stopped, fsyncing every fourth.
struct Writer {
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    fn start(root: &Path) -> Writer {
        let dir = root.join("writer");
        std::fs::create_dir_all(&dir).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, written) = (Arc::clone(&stop), Arc::clone(&written));
            std::thread::spawn(move || {
                let block = vec![0x5au8; 64 * 1024];
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut file =
                        std::fs::File::create(dir.join(format!("w{}", n % 200))).unwrap();
                    file.write_all(&block).unwrap();
                    if n.is_multiple_of(4) {
                        file.sync_all().unwrap();
                    }
                    n += 1;
                    written.store(n, Ordering::Relaxed);
                }
            })
        };
        Writer {
            stop,
            written,
            thread: Some(thread),
        }
    }

    fn wait_for(&self, files: u64) {
        let target = self.written.load(Ordering::Relaxed) + files;
        for _ in 0..1000 {
            if self.written.load(Ordering::Relaxed) >= target {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the writer made no progress");
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("writer");
        self.written.load(Ordering::Relaxed)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// `backup begin NAME --freeze MOUNTPOINT`, pull it into `delta`, `backup end`.
fn backup(
    daemon: &Daemon,
    name: &str,
    mountpoint: &Path,
    checkpoint: &str,
    since: Option<&str>,
    delta: &Path,
) {
    let mut args = vec!["backup", "begin", name, "--checkpoint", checkpoint];
    args.extend(["--freeze", mountpoint.to_str().unwrap()]);
    if let Some(since) = since {
        args.extend(["--incremental", since]);
    }
    let begun = daemon.cli_json(&args);
    let uri = begun["volumes"][0]["uri"]["unix"]
        .as_str()
        .expect("uri")
        .to_string();
    let mut pull = Command::new(tidemark_bin());
    pull.arg("pull");
    match since {
        None => pull.arg("--full"),
        Some(since) => pull.args(["--bitmap", since]),
    };
    pull.args(["--checkpoint", checkpoint])
        .arg(&uri)
        .arg("--delta")
        .arg(delta);
    let out = run(&mut pull, LIMIT).expect("pull");
    assert_eq!(out.code(), 0, "pull {uri}: {}", out.stderr);
    let ended = daemon.cli_json(&["backup", "end", name]);
    assert_eq!(ended["state"], json!("completed"), "{ended}");
}

/// Restore `deltas` into an image, loop-mount it read-only and check `tree` in it.
fn restore_and_compare(daemon: &Daemon, deltas: &[&Path], options: &str, tree: &Tree, what: &str) {
    let image = daemon.dir.path().join(format!("{what}.img"));
    let mut restore = Command::new(tidemark_bin());
    restore.args(["restore", "--into"]).arg(&image).args(deltas);
    let out = run(&mut restore, LIMIT).expect("restore");
    assert_eq!(out.code(), 0, "restore {what}: {}", out.stderr);
    let mounted = Mounted::new(
        &image,
        daemon.dir.path().join(format!("{what}-mnt")),
        &format!("loop,ro,{options}"),
    );
    assert_tree(&mounted.dir, tree, what);
    mounted.unmount();
    std::fs::remove_file(&image).unwrap();
}

/// Allocated bytes of a file.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn refused(daemon: &Daemon, args: &[&str], needle: &str) {
    let out = daemon.cli(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(stderr.contains(needle), "{args:?}: {stderr}");
}

/// The whole flow on one filesystem type.
fn backups_of_a_mounted_filesystem(mkfs: &[&str], restore_options: &str, small: usize) {
    let daemon = Daemon::start();
    let backing = daemon.create_volume("fs", 384 * MIB);
    let attachment = Attachment::new(&daemon, "fs");
    let device = attachment.device.to_str().unwrap().to_string();
    let mut args = mkfs.to_vec();
    args.push(&device);
    sh(args[0], &args[1..]);
    let mounted = Mounted::new(&attachment.device, daemon.dir.path().join("mnt"), "");
    let root = mounted.dir.clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(16);

    let mut tree = Tree::new();
    write_files(&root, &mut tree, &mut rng, "a", small, 3);
    sync_fs(&root);
    let writer = Writer::start(&root);
    writer.wait_for(20);
    let full = daemon.dir.path().join("full.delta");
    backup(&daemon, "fs", &root, "c0", None, &full);
    let at_full = tree.clone();

    writer.wait_for(20);
    change_files(&root, &mut tree, &mut rng);
    write_files(&root, &mut tree, &mut rng, "b", small / 4, 1);
    sync_fs(&root);
    let incremental = daemon.dir.path().join("inc.delta");
    backup(&daemon, "fs", &root, "c1", Some("c0"), &incremental);
    let written = writer.stop();
    assert!(written > 40, "the writer wrote only {written} files");

    restore_and_compare(&daemon, &[&full], restore_options, &at_full, "full");
    restore_and_compare(
        &daemon,
        &[&full, &incremental],
        restore_options,
        &tree,
        "incremental",
    );

    // The attachment is listed with its counters.
    let info = daemon.cli_json(&["volume", "info", "fs"]);
    assert_eq!(info["attachment"]["device"], json!(device), "{info}");
    assert!(
        info["attachment"]["io"]["writes"].as_u64().unwrap() > 0,
        "{info}"
    );
    assert!(
        info["attachment"]["io"]["flushes"].as_u64().unwrap() > 0,
        "{info}"
    );
    let status = daemon.cli_json(&["info"]);
    assert_eq!(status["attachments"][0]["name"], json!("fs"), "{status}");

    // fstrim hands the freed blocks back: the backing file shrinks.
    let before = allocated(&backing);
    for rel in tree.keys().filter(|p| p.to_str().unwrap().contains("big")) {
        std::fs::remove_file(root.join(rel)).unwrap();
    }
    std::fs::remove_dir_all(root.join("writer")).unwrap();
    sync_fs(&root);
    // XFS keeps freed extents "busy" (skipped by fstrim) until the log that frees them is
    // on disk, which a loaded machine may not have finished right after syncfs: trim again
    // until the space comes back, for at most 10 s. The bound below is unchanged.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let after = loop {
        sh("fstrim", &[root.to_str().unwrap()]);
        let after = allocated(&backing);
        if after + 16 * MIB <= before || std::time::Instant::now() > deadline {
            break after;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        sync_fs(&root);
    };
    assert!(
        after + 16 * MIB <= before,
        "fstrim released only {} bytes of the backing ({before} -> {after})",
        before.saturating_sub(after)
    );

    // The refusals, while mounted.
    refused(&daemon, &["volume", "detach", "fs"], "unmount it first");
    refused(
        &daemon,
        &["volume", "attach", "fs", "--via", "fuse"],
        "already attached",
    );
    refused(&daemon, &["volume", "remove", "fs"], "volume detach fs");

    mounted.unmount();
    let detached = daemon.cli_json(&["volume", "detach", "fs"]);
    assert_eq!(detached["detached"], json!(true), "{detached}");
    assert_eq!(
        attachment.backing_file(),
        None,
        "the loop device is still bound"
    );
    assert!(!daemon.state_dir.join("attachments/fs.json").exists());
    let info = daemon.cli_json(&["volume", "info", "fs"]);
    assert_eq!(info["attachment"], Value::Null, "{info}");
}

#[test]
fn ext4_on_a_fuse_attachment_backs_up_and_restores_while_a_writer_runs() {
    backups_of_a_mounted_filesystem(&["mkfs.ext4", "-q", "-F"], "noload", 3000);
}

#[test]
fn xfs_on_a_fuse_attachment_backs_up_and_restores_while_a_writer_runs() {
    backups_of_a_mounted_filesystem(&["mkfs.xfs", "-q", "-f"], "norecovery,nouuid", 2000);
}

#[test]
fn a_daemon_killed_under_a_fuse_attachment_is_cleaned_up_by_the_next_start() {
    let mut daemon = Daemon::start();
    daemon.create_volume("k", 64 * MIB);
    let attachment = Attachment::new(&daemon, "k");
    sh(
        "mkfs.ext4",
        &["-q", "-F", attachment.device.to_str().unwrap()],
    );
    let mounted = Mounted::new(&attachment.device, daemon.dir.path().join("mnt"), "");
    let file = mounted.dir.join("f");
    std::fs::write(&file, vec![7u8; MIB as usize]).unwrap();
    sync_fs(&mounted.dir);
    let record = daemon.state_dir.join("attachments/k.json");
    assert!(record.exists());

    daemon.kill();
    // Reads that reach the device fail: EIO, never wrong data.
    let read = Command::new("dd")
        .arg(format!("if={}", file.display()))
        .args(["of=/dev/null", "iflag=direct", "bs=1M"])
        .output()
        .unwrap();
    assert!(
        !read.status.success(),
        "a read through a dead FUSE server succeeded"
    );

    daemon.restart();
    assert!(!record.exists(), "the stale record is still there");
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        !mounts.contains(attachment.fuse_mount.to_str().unwrap()),
        "the FUSE mount is still there: {mounts}"
    );
    let status = daemon.cli_json(&["info"]);
    assert_eq!(status["attachments"], json!([]), "{status}");
    assert!(daemon.log().contains("ATTACHMENT_LOST"), "{}", daemon.log());
    // The loop device goes once the filesystem above is unmounted.
    mounted.unmount();
    for _ in 0..100 {
        if attachment.backing_file().is_none() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        attachment.backing_file(),
        None,
        "the loop device is still bound"
    );
    // The volume attaches again.
    drop(attachment);
    let again = Attachment::new(&daemon, "k");
    assert!(again.backing_file().is_some());
    daemon.cli_json(&["volume", "detach", "k"]);
}

#[test]
fn a_backups_snapshot_attaches_read_only_and_keeps_its_files_while_the_volume_changes() {
    let daemon = Daemon::start();
    daemon.create_volume("live", 128 * MIB);
    let live = Attachment::new(&daemon, "live");
    sh("mkfs.ext4", &["-q", "-F", live.device.to_str().unwrap()]);
    let mounted = Mounted::new(&live.device, daemon.dir.path().join("mnt"), "");
    let root = mounted.dir.clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(18);
    let mut tree = Tree::new();
    write_files(&root, &mut tree, &mut rng, "a", 600, 2);
    sync_fs(&root);
    let writer = Writer::start(&root);
    writer.wait_for(10);
    let begun = daemon.cli_json(&[
        "backup",
        "begin",
        "live",
        "--checkpoint",
        "c0",
        "--freeze",
        root.to_str().unwrap(),
    ]);
    assert_eq!(
        begun["volumes"][0]["export"],
        json!("live@backup"),
        "{begun}"
    );
    let at_backup = tree.clone();

    // The volume changes before and while the snapshot is attached and mounted.
    change_files(&root, &mut tree, &mut rng);
    sync_fs(&root);
    let snapshot = Attachment::made(&daemon, "live@backup", true);
    assert_ne!(snapshot.device, live.device);
    let ro = sh("blockdev", &["--getro", snapshot.device.to_str().unwrap()]);
    assert_eq!(ro.trim(), "1", "the snapshot's device is read-only");
    let snap_dir = daemon.dir.path().join("snap");
    let snap = Mounted::new(&snapshot.device, snap_dir.clone(), "ro,noload");
    write_files(&root, &mut tree, &mut rng, "b", 200, 1);
    change_files(&root, &mut tree, &mut rng);
    sync_fs(&root);
    assert_tree(&snap.dir, &at_backup, "the snapshot");
    assert_tree(&root, &tree, "the live volume");
    let rewritten = at_backup
        .keys()
        .filter(|rel| tree.get(*rel).is_some_and(|now| *now != at_backup[*rel]))
        .count();
    let removed = at_backup
        .keys()
        .filter(|rel| !tree.contains_key(*rel))
        .count();
    assert!(
        rewritten > 10 && removed > 10,
        "{rewritten} rewritten, {removed} removed"
    );
    assert!(
        !snap.dir.join("tree/bbig0").exists(),
        "a file made after the backup"
    );

    // Past the page cache: mounted afresh after more changes, the device reads the same.
    snap.unmount();
    change_files(&root, &mut tree, &mut rng);
    sync_fs(&root);
    let snap = Mounted::new(&snapshot.device, snap_dir, "ro,noload");
    assert_tree(&snap.dir, &at_backup, "the snapshot, mounted again");

    // The device refuses writes; the backup cannot end under it.
    let write = Command::new("dd")
        .args([
            "if=/dev/zero",
            "bs=4096",
            "count=1",
            "oflag=direct",
            "conv=notrunc",
        ])
        .arg(format!("of={}", snapshot.device.display()))
        .output()
        .unwrap();
    assert!(
        !write.status.success(),
        "a write to the snapshot's device succeeded"
    );
    refused(
        &daemon,
        &["backup", "end", "live"],
        "is attached as a block device",
    );
    let info = daemon.cli_json(&["info"]);
    let names: Vec<&str> = info["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["name"].as_str())
        .collect();
    assert!(
        names.contains(&"live@backup") && names.contains(&"live"),
        "{info}"
    );

    snap.unmount();
    let detached = daemon.cli_json(&["volume", "detach", "live@backup"]);
    assert_eq!(detached["detached"], json!(true), "{detached}");
    assert_eq!(
        snapshot.backing_file(),
        None,
        "the loop device is still bound"
    );
    let ended = daemon.cli_json(&["backup", "end", "live"]);
    assert_eq!(ended["state"], json!("completed"), "{ended}");
    let written = writer.stop();
    assert!(written > 10, "the writer wrote only {written} files");
    assert_tree(&root, &tree, "the live volume at the end");
    mounted.unmount();
    daemon.cli_json(&["volume", "detach", "live"]);
}
