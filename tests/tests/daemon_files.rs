//! What the daemon creates is private whatever the umask (state files, COW stores,
//! sockets 0600; pushed images and deltas 0640 at most), it refuses a state dir others
//! may write to, and a push never writes through a symlink planted at its target.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::json;
use tidemark_tests::daemon::Daemon;
use tidemark_tests::tidemark_bin;

/// The README's `tidemark serve &` from a shell with the usual umask.
fn usual_umask() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o777
}

/// Every file under `dir`, recursively, with its mode.
fn modes(dir: &Path, out: &mut Vec<(String, u32)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        out.push((path.display().to_string(), mode(&path)));
        if path.is_dir() {
            modes(&path, out);
        }
    }
}

#[test]
fn files_the_daemon_creates_are_private_under_umask_022() {
    usual_umask();
    let daemon = Daemon::start();
    daemon.create_volume("v", 4 << 20);
    daemon.cli_json(&["checkpoint", "create", "v", "c1"]);
    // A pull backup holds a snapshot with its COW store.
    daemon.cli_json(&["backup", "begin", "v", "--checkpoint", "c2"]);
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 9 0 1M"])
        .arg(daemon.uri("v"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut all = Vec::new();
    modes(&daemon.state_dir, &mut all);
    assert!(all.len() > 5, "{all:?}");
    let open: Vec<_> = all.iter().filter(|(_, m)| m & 0o077 != 0).collect();
    assert!(open.is_empty(), "group/other can access: {open:?}");
    daemon.cli_json(&["backup", "end", "v"]);

    let image = daemon.dir.path().join("full.raw");
    let done = daemon.cli_json(&["backup", "begin", "v", "--push", image.to_str().unwrap()]);
    assert_eq!(done["state"], json!("completed"), "{done}");
    let delta = daemon.dir.path().join("c2.delta");
    let done = daemon.cli_json(&[
        "backup",
        "begin",
        "v",
        "--incremental",
        "c2",
        "--push",
        delta.to_str().unwrap(),
        "--push-format",
        "delta",
    ]);
    assert_eq!(done["state"], json!("completed"), "{done}");
    for pushed in [&image, &delta] {
        let m = mode(pushed);
        assert_eq!(m & 0o037, 0, "{} has mode {m:o}", pushed.display());
    }
}

#[test]
fn a_state_dir_others_may_write_is_refused_with_the_chmod_to_run() {
    let mut daemon = Daemon::start();
    daemon.stop();
    let state = daemon.state_dir.clone();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    // Bounded: a daemon that wrongly starts is killed by timeout(1).
    let out = Command::new("timeout")
        .arg("20")
        .arg(tidemark_bin())
        .args(["serve", "--state-dir"])
        .arg(&state)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        !out.status.success() && out.status.code() != Some(124),
        "{out:?}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("chmod go-w"), "{stderr}");
    assert!(!state.join("control.sock").exists());

    // Readable by the group: served, with a warning that says how to close it.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o750)).unwrap();
    daemon.restart();
    assert!(daemon.log().contains("chmod 700"), "{}", daemon.log());
    assert_eq!(mode(&daemon.control_socket()), 0o600);
    assert_eq!(mode(&daemon.nbd_socket()), 0o600);
    daemon.stop();
}

#[test]
fn an_incremental_push_does_not_write_through_a_planted_symlink() {
    let daemon = Daemon::start();
    daemon.create_volume("v", 1 << 20);
    let image = daemon.dir.path().join("base.raw");
    let done = daemon.cli_json(&[
        "backup",
        "begin",
        "v",
        "--checkpoint",
        "c1",
        "--push",
        image.to_str().unwrap(),
    ]);
    assert_eq!(done["state"], json!("completed"), "{done}");
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 5 0 64k"])
        .arg(daemon.uri("v"))
        .output()
        .unwrap();
    assert!(out.status.success());
    // Someone swaps the image for a link to a file of theirs... or of the daemon's user.
    let victim = daemon.dir.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::fs::remove_file(&image).unwrap();
    std::os::unix::fs::symlink(&victim, &image).unwrap();
    let out = daemon.cli(&[
        "backup",
        "begin",
        "v",
        "--incremental",
        "c1",
        "--push",
        image.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is a symlink"), "{stderr}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
}
