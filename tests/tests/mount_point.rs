//! `tidemark mount POINT DIR` / `tidemark umount DIR` through the FUSE + loop front end:
//! the files of a restore point (ext4 made with mkfs.ext4 -d, changed with debugfs, backed
//! up as a full delta and an incremental one) show at DIR, a partitioned disk image gets
//! each partition at DIR/pN, a busy mount is not pulled away, and nothing stays mounted or
//! attached afterwards, also when the serving process was killed. A point in a repository
//! (`repo:URL VOLUME@CHECKPOINT`, a directory or SeaweedFS's S3) mounts the same way.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tidemark_tests::image::MIB;
use tidemark_tests::paths::{arg, scratch};
use tidemark_tests::point::{changed_blocks, full_delta, incremental_delta, repo_point_at};
use tidemark_tests::seaweed::Seaweed;
use tidemark_tests::{run, tidemark, tidemark_env, Output, COMMAND_LIMIT};

fn mounted(dir: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let dir = dir.display().to_string();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(dir.as_str()))
}

/// Whether process `pid` runs (not gone, not a zombie waiting for its reaper).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, rest) = stat.rsplit_once(')')?;
            rest.trim_start().chars().next()
        })
        .is_some_and(|state| state != 'Z' && state != 'X')
}

/// `mkfs.ext4 -d SRC IMAGE` of `size` bytes holding `files` (name, contents).
fn ext4_image(image: &Path, size: u64, files: &[(&str, &str)]) {
    let src = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(src.path().join(name), text).unwrap();
    }
    std::fs::File::create(image).unwrap().set_len(size).unwrap();
    run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096", "-d"])
            .arg(src.path())
            .arg(image),
        Duration::from_secs(60),
    )
    .unwrap()
    .ok();
}

/// Run debugfs -w commands on `image` (files from `dir` are written by name).
fn debugfs(image: &Path, dir: &Path, commands: &[&str]) {
    let script = dir.join("debugfs.cmds");
    std::fs::write(&script, commands.join("\n") + "\n").unwrap();
    run(
        Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(&script)
            .arg(image)
            .current_dir(dir),
        Duration::from_secs(60),
    )
    .unwrap()
    .ok();
}

/// A mount made by a test, unmounted when dropped (if the test did not).
struct Mount {
    state: PathBuf,
    dir: PathBuf,
    record: Value,
}

impl Mount {
    fn new(state: &Path, point: &[&Path], dir: &Path) -> Mount {
        Mount::with_env(state, point, dir, &[])
    }

    /// `tidemark mount` run with the extra environment `env` (a `repo:s3://` point's server).
    fn with_env(state: &Path, point: &[&Path], dir: &Path, env: &[(&str, String)]) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        let mut args = vec![
            "mount".to_string(),
            "--json".into(),
            "--state-dir".into(),
            arg(state),
        ];
        args.extend(point.iter().map(|p| arg(p)));
        args.push(arg(dir));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let record = tidemark_env(&args, env, COMMAND_LIMIT).ok().json();
        Mount {
            state: state.to_path_buf(),
            dir: dir.to_path_buf(),
            record,
        }
    }

    fn umount(&self) -> Output {
        tidemark(
            &["umount", "--state-dir", &arg(&self.state), &arg(&self.dir)],
            COMMAND_LIMIT,
        )
    }

    fn device(&self) -> String {
        self.record["attachment"]["device"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn pid(&self) -> i32 {
        self.record["pid"].as_i64().unwrap() as i32
    }

    /// Nothing of the mount is left: no filesystem, no loop binding, no record, no process.
    fn assert_gone(&self) {
        assert!(
            !mounted(&self.dir),
            "{} is still mounted",
            self.dir.display()
        );
        let device = self.device();
        let name = device.trim_start_matches("/dev/");
        let backing = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
            .unwrap_or_default();
        // Another test may have bound the device since: only this mount's file counts.
        let fuse = self.record["attachment"]["resources"]["mount"]
            .as_str()
            .unwrap();
        assert!(
            !backing.starts_with(fuse),
            "{device} is still bound to {backing}"
        );
        assert!(!Path::new(fuse).exists(), "{fuse} is left");
        let records: Vec<_> = std::fs::read_dir(self.state.join("mounts"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(records.is_empty(), "left in the state dir: {records:?}");
        assert!(!running(self.pid()), "the serving process is still running");
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if mounted(&self.dir)
            || self
                .state
                .join("mounts")
                .read_dir()
                .is_ok_and(|mut d| d.next().is_some())
        {
            let _ = self.umount();
        }
    }
}

#[test]
fn a_mounted_point_shows_the_files_of_that_point() {
    let dir = scratch();
    let state = dir.path().join("state");
    let mon = dir.path().join("mon.img");
    ext4_image(
        &mon,
        32 * MIB,
        &[("a.txt", "monday\n"), ("keep.txt", "kept all week\n")],
    );
    let tue = dir.path().join("tue.img");
    std::fs::copy(&mon, &tue).unwrap();
    std::fs::write(dir.path().join("a.new"), "tuesday\n").unwrap();
    std::fs::write(dir.path().join("b.new"), "made on tuesday\n").unwrap();
    debugfs(
        &tue,
        dir.path(),
        &["rm a.txt", "write a.new a.txt", "write b.new b.txt"],
    );
    full_delta(&mon, "mon", &dir.path().join("mon.delta"));
    let changed = changed_blocks(&mon, &tue);
    assert!(!changed.is_empty());
    incremental_delta(
        &tue,
        &changed,
        "mon",
        1,
        "tue",
        &dir.path().join("tue.delta"),
    );

    let at_tue = dir.path().join("at-tue");
    let tuesday = Mount::new(
        &state,
        &[&dir.path().join("mon.delta"), &dir.path().join("tue.delta")],
        &at_tue,
    );
    let at_mon = dir.path().join("at-mon");
    let monday = Mount::new(&state, &[&mon], &at_mon);
    assert_eq!(tuesday.record["mounts"][0]["fstype"], "ext4");
    let read = |d: &Path, f: &str| std::fs::read_to_string(d.join(f)).ok();
    assert_eq!(read(&at_tue, "a.txt").as_deref(), Some("tuesday\n"));
    assert_eq!(read(&at_tue, "b.txt").as_deref(), Some("made on tuesday\n"));
    assert_eq!(
        read(&at_tue, "keep.txt").as_deref(),
        Some("kept all week\n")
    );
    assert_eq!(read(&at_mon, "a.txt").as_deref(), Some("monday\n"));
    assert_eq!(read(&at_mon, "b.txt"), None);
    // Read-only.
    assert!(std::fs::write(at_tue.join("c.txt"), "no").is_err());

    // Busy: a file open under the mount keeps it (and the point) in place.
    let open = std::fs::File::open(at_tue.join("keep.txt")).unwrap();
    let busy = tuesday.umount();
    assert_eq!(busy.code(), 2, "{busy:?}");
    assert!(busy.stderr.contains("busy"), "{busy:?}");
    assert!(mounted(&at_tue));
    drop(open);

    tuesday.umount().ok();
    monday.umount().ok();
    tuesday.assert_gone();
    monday.assert_gone();
    assert!(std::fs::read_dir(&at_tue).unwrap().next().is_none());
}

/// An ext4 image stored as the point disk@mon of the repository at `url` (a directory or
/// s3://, every command run with `env`) mounts read-only with its files; a point the
/// repository does not hold is refused, naming it.
fn a_repository_point_mounts(url: &str, env: &[(&str, String)]) {
    let dir = scratch();
    let state = dir.path().join("state");
    let image = dir.path().join("disk.img");
    ext4_image(&image, 32 * MIB, &[("a.txt", "in the repository\n")]);
    let repo = repo_point_at(&image, dir.path(), url, "disk@mon", env);
    let at = dir.path().join("at");
    let mount = Mount::with_env(&state, &[Path::new(&repo), Path::new("disk@mon")], &at, env);
    assert_eq!(mount.record["mounts"][0]["fstype"], "ext4");
    assert_eq!(mount.record["point"][1], "disk@mon");
    assert_eq!(
        std::fs::read_to_string(at.join("a.txt")).ok().as_deref(),
        Some("in the repository\n")
    );
    assert!(std::fs::write(at.join("b.txt"), "no").is_err());
    std::fs::create_dir_all(dir.path().join("none")).unwrap();
    let missing = tidemark_env(
        &[
            "mount",
            "--state-dir",
            &arg(&state),
            &repo,
            "disk@tue",
            &arg(&dir.path().join("none")),
        ],
        env,
        COMMAND_LIMIT,
    );
    assert_eq!(missing.code(), 2, "{missing:?}");
    assert!(missing.stderr.contains("disk@tue"), "{missing:?}");
    mount.umount().ok();
    mount.assert_gone();
}

#[test]
fn a_repository_point_mounts_with_its_files() {
    let dir = scratch();
    a_repository_point_mounts(&arg(&dir.path().join("repo")), &[]);
}

#[test]
fn an_s3_repository_point_mounts_with_its_files() {
    let seaweed = Seaweed::start();
    a_repository_point_mounts("s3://bkt/mount", &seaweed.env());
}

/// An MBR partition entry: type 0x83 (Linux) at `start` sectors, `sectors` long.
fn mbr_entry(start: u32, sectors: u32) -> [u8; 16] {
    let mut entry = [0u8; 16];
    entry[4] = 0x83;
    entry[8..12].copy_from_slice(&start.to_le_bytes());
    entry[12..16].copy_from_slice(&sectors.to_le_bytes());
    entry
}

#[test]
fn a_partitioned_image_mounts_each_partition_under_pn() {
    let dir = scratch();
    let state = dir.path().join("state");
    let (p1, p2) = (dir.path().join("p1.img"), dir.path().join("p2.img"));
    ext4_image(&p1, 16 * MIB, &[("one.txt", "first partition\n")]);
    ext4_image(&p2, 16 * MIB, &[("two.txt", "second partition\n")]);
    let disk = dir.path().join("disk.img");
    let file = std::fs::File::create(&disk).unwrap();
    file.set_len(40 * MIB).unwrap();
    let mut mbr = [0u8; 512];
    mbr[446..462].copy_from_slice(&mbr_entry(2048, 32768));
    mbr[462..478].copy_from_slice(&mbr_entry(34816, 32768));
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    file.write_all_at(&mbr, 0).unwrap();
    file.write_all_at(&std::fs::read(&p1).unwrap(), MIB)
        .unwrap();
    file.write_all_at(&std::fs::read(&p2).unwrap(), 17 * MIB)
        .unwrap();
    drop(file);
    full_delta(&disk, "mon", &dir.path().join("disk.delta"));

    let at = dir.path().join("disk");
    let mount = Mount::new(&state, &[&dir.path().join("disk.delta")], &at);
    assert_eq!(
        std::fs::read_to_string(at.join("p1/one.txt")).unwrap(),
        "first partition\n"
    );
    assert_eq!(
        std::fs::read_to_string(at.join("p2/two.txt")).unwrap(),
        "second partition\n"
    );
    mount.umount().ok();
    mount.assert_gone();
    assert!(!at.join("p1").exists() && !at.join("p2").exists());
}

#[test]
fn umount_cleans_up_after_a_killed_server() {
    let dir = scratch();
    let state = dir.path().join("state");
    let image = dir.path().join("fs.img");
    ext4_image(&image, 16 * MIB, &[("x.txt", "x\n")]);
    let at = dir.path().join("at");
    let mount = Mount::new(&state, &[&image], &at);
    assert!(at.join("x.txt").exists());
    let pid = mount.pid();
    run(
        Command::new("kill").args(["-KILL", &pid.to_string()]),
        Duration::from_secs(10),
    )
    .unwrap()
    .ok();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while running(pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    mount.umount().ok();
    mount.assert_gone();
}
