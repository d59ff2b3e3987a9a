//! Fault injection with a real unreadable range: nbdkit's sh plugin serves an 8 MiB disk
//! whose reads fail with EIO in one 4 KiB block, and nbdfuse (FUSE) shows it as a plain
//! file, so pread on that block returns EIO like a bad sector. `tidemark copy` must copy
//! everything else, exit non-zero and name exactly the failed range.

#![allow(clippy::single_range_in_vec_init)] // extents really are lists of ranges

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tidemark_tests::image::MIB;
use tidemark_tests::paths::{p, scratch};
use tidemark_tests::{tidemark, ChildGuard, COMMAND_LIMIT};

const BAD: u64 = 3 * MIB + 8192;

const PLUGIN: &str = r#"#!/bin/bash
# 8 MiB of 'Z'; any read touching [BAD, BAD + 4096) fails with EIO.
case "$1" in
  get_size) echo 8388608 ;;
  pread)
    count=$3; offset=$4
    if [ $((offset + count)) -gt BAD ] && [ $offset -lt $((BAD + 4096)) ]; then
      echo "EIO injected bad sector" >&2; exit 1
    fi
    head -c "$count" /dev/zero | tr '\0' 'Z' ;;
  can_write) exit 3 ;;
  *) exit 2 ;;
esac
"#;

/// The FUSE mount; unmounted and its server stopped on drop.
struct Mount {
    dir: std::path::PathBuf,
    _server: ChildGuard,
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn an_unreadable_range_fails_the_copy_and_is_named_exactly() {
    // nbdfuse and nbdkit come from scripts/install-deps.sh; /dev/fuse from the kernel.
    assert!(
        have("nbdfuse") && have("nbdkit"),
        "install nbdfuse and nbdkit (scripts/install-deps.sh)"
    );
    assert!(Path::new("/dev/fuse").exists(), "this test needs /dev/fuse");
    let dir = scratch();
    let script = dir.path().join("bad-sector.sh");
    std::fs::write(&script, PLUGIN.replace("BAD", &BAD.to_string())).unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let server = Command::new("nbdfuse")
        .arg("-r")
        .arg(&mnt)
        .args(["--command", "nbdkit", "-s", "sh"])
        .arg(&script)
        .stderr(Stdio::null())
        .spawn()
        .expect("nbdfuse starts");
    let mount = Mount {
        dir: mnt.clone(),
        _server: ChildGuard::new(server),
    };
    let disk = mnt.join("nbd");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(&disk).map(|m| m.len()).unwrap_or(0) != 8 * MIB {
        assert!(Instant::now() < deadline, "nbdfuse did not show the disk");
        std::thread::sleep(Duration::from_millis(50));
    }
    let dst = p(&dir, "dst");
    let out = tidemark(
        &["copy", "--json", disk.to_str().unwrap(), &dst],
        COMMAND_LIMIT,
    );
    assert_eq!(out.code(), 2, "a failed extent must fail the copy: {out:?}");
    let expected = format!(
        "bytes {}..{} (offset {}, length 4096): reading failed",
        BAD,
        BAD + 4096,
        BAD
    );
    assert!(
        out.stderr.contains(&expected),
        "stderr must name the range {expected:?}: {}",
        out.stderr
    );
    let report = out.json();
    let failed = report["failed_extents"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{report}");
    assert_eq!(
        (failed[0]["offset"].as_u64(), failed[0]["length"].as_u64()),
        (Some(BAD), Some(4096))
    );
    // Everything else was copied.
    let copied = std::fs::read(&dst).unwrap();
    let bad = BAD as usize..BAD as usize + 4096;
    assert!(copied
        .iter()
        .enumerate()
        .all(|(i, &b)| if bad.contains(&i) { b == 0 } else { b == b'Z' }));
    drop(mount);
}
