//! `tidemark bench` on a block device (a loop device over a temp file): reads, the --force
//! guard, and the refusal to write to a mounted device even with --force.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tidemark_tests::run::{number, tidemark};

const LIMIT: Duration = Duration::from_secs(120);

/// A loop device over a temp file, detached (and unmounted) on drop.
struct LoopDevice {
    device: PathBuf,
    mount: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

impl LoopDevice {
    fn new(size: u64) -> LoopDevice {
        let dir = tempfile::tempdir_in("/var/tmp").expect("a temp dir");
        let backing = dir.path().join("backing.img");
        std::fs::File::create(&backing)
            .and_then(|file| file.set_len(size))
            .expect("the backing file");
        let output = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&backing)
            .output()
            .expect("losetup runs (util-linux)");
        assert!(
            output.status.success(),
            "losetup failed (these tests need root): {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let device = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        LoopDevice {
            device,
            mount: None,
            _dir: dir,
        }
    }

    fn path(&self) -> &str {
        self.device.to_str().expect("device paths are UTF-8")
    }

    fn mount_ext4(&mut self, at: &Path) {
        run("mkfs.ext4", &["-q", "-F", self.path()]);
        run("mount", &[self.path(), at.to_str().expect("UTF-8 path")]);
        self.mount = Some(at.to_path_buf());
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if let Some(mount) = &self.mount {
            let _ = Command::new("umount").arg(mount).status();
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .status()
        .unwrap_or_else(|err| panic!("cannot run {program}: {err}"));
    assert!(status.success(), "{program} {args:?} failed: {status}");
}

#[test]
fn reads_a_device_and_writes_only_with_force() {
    let device = LoopDevice::new(32 << 20);
    let report = tidemark(
        &[
            "bench",
            "--rw",
            "randread",
            "--bs",
            "4K",
            "--qd",
            "8",
            "--direct",
            "--json",
            device.path(),
        ],
        LIMIT,
    )
    .ok()
    .json();
    assert_eq!(report["target_kind"], "device");
    assert_eq!(report["region_bytes"], 32 << 20, "the device size is found");
    assert_eq!(number(&report, "/read/ops"), 8192.0);

    let refused = tidemark(
        &["bench", "--rw", "write", "--bs", "1M", device.path()],
        LIMIT,
    );
    assert_eq!(refused.code(), 2, "{refused:#?}");
    assert!(
        refused.stderr.contains("block device"),
        "{}",
        refused.stderr
    );
    assert!(refused.stderr.contains("--force"), "{}", refused.stderr);

    let report = tidemark(
        &[
            "bench",
            "--rw",
            "write",
            "--bs",
            "1M",
            "--direct",
            "--force",
            "--verify",
            "--json",
            device.path(),
        ],
        LIMIT,
    )
    .ok()
    .json();
    assert_eq!(report["write"]["ops"], 32);
    assert_eq!(report["verify"]["checked_blocks"], 32);
    assert_eq!(report["verify"]["mismatched_blocks"], 0);
}

#[test]
fn a_mounted_device_is_refused_even_with_force() {
    let mut device = LoopDevice::new(64 << 20);
    let mount_point = tempfile::tempdir().expect("a mount point");
    device.mount_ext4(mount_point.path());
    let run = tidemark(
        &["bench", "--rw", "randwrite", "--force", device.path()],
        LIMIT,
    );
    assert_eq!(run.code(), 2, "{run:#?}");
    assert!(run.stderr.contains("is mounted at"), "{}", run.stderr);
    assert!(
        run.stderr.contains(mount_point.path().to_str().unwrap()),
        "{}",
        run.stderr
    );
    // Reading a mounted device is harmless and allowed.
    tidemark(
        &["bench", "--rw", "read", "--bs", "1M", device.path()],
        LIMIT,
    )
    .ok();
}
