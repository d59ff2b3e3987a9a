//! The whole product with a real guest: a VM (the harness in ../shared/vm) boots with its
//! disk on a `tidemark serve` volume's live export and writes files continuously, some of
//! them fsynced; `tidemark backup begin --guest-agent` freezes the guest through qemu-ga,
//! snapshots the volume and thaws; qemu-img pulls the backup export while the guest keeps
//! writing. The pulled image passes `fsck.ext4 -fn` and holds, byte for byte, every file the
//! guest had synced before the freeze; an incremental taken the same way and applied on top
//! does too. qemu-ga runs only inside the guest, never on this machine.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tidemark_engine::quiesce::agent::AgentClient;
use tidemark_tests::daemon::Daemon;
use tidemark_tests::peers::qemu_img_convert;
use tidemark_tests::vm::{console, harness, vm_build, wait_for, Console};
use tidemark_tests::ChildGuard;

/// The guest: mounts its disk, writes unsynced files, and fsyncs a 64 KiB file every 0.1 s,
/// printing its sha256 once the fsync returned; starts qemu-ga; stops when the host
/// creates /run/host-done.
const GUEST_SCRIPT: &str = r#"
set -e
mount -t ext4 /dev/vda /mnt
mkdir -p /mnt/synced /mnt/stream
( i=0; while [ ! -e /run/stop ]; do i=$((i+1)); head -c 4096 /dev/urandom > /mnt/stream/f$i; done ) &
W1=$!
( i=0; while [ ! -e /run/stop ]; do
    i=$((i+1))
    dd if=/dev/urandom of=/mnt/synced/s$i bs=65536 count=1 conv=fsync 2>/dev/null
    echo "SYNCED s$i $(sha256sum < /mnt/synced/s$i | cut -d' ' -f1)"
    sleep 0.1
  done ) &
W2=$!
start-qga
echo READY
while [ ! -e /run/host-done ]; do sleep 0.1; done
touch /run/stop
wait $W1 $W2 || true
umount /mnt
echo GUEST-DONE
"#;

fn synced_in(lines: &[(Instant, String)]) -> usize {
    lines.iter().filter(|l| l.1.starts_with("SYNCED ")).count()
}

fn synced_count(console: &Console) -> usize {
    synced_in(&console.lock().unwrap())
}

/// Files whose fsync had returned (their line reached us) before `instant`.
fn synced_before(console: &Console, instant: Instant) -> BTreeMap<String, String> {
    console
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, _)| *at < instant)
        .filter_map(|(_, line)| {
            let mut fields = line.strip_prefix("SYNCED ")?.split(' ');
            Some((fields.next()?.to_string(), fields.next()?.to_string()))
        })
        .collect()
}

/// `fsck.ext4 -fn` the image, then check that every file in `synced` is in it, intact.
fn check_image(image: &Path, synced: &BTreeMap<String, String>, scratch: &Path, label: &str) {
    let fsck = Command::new("fsck.ext4")
        .arg("-fn")
        .arg(image)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "fsck.ext4 -fn: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let dumped = scratch.join(format!("dump-{label}"));
    std::fs::create_dir(&dumped).unwrap();
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump /synced {}", dumped.display()))
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "debugfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (name, sha) in synced {
        let path = dumped.join("synced").join(name);
        assert!(
            path.exists(),
            "{name} (synced before the freeze) is missing"
        );
        let sum = Command::new("sha256sum").arg(&path).output().unwrap();
        let sum = String::from_utf8_lossy(&sum.stdout);
        assert_eq!(sum.split(' ').next(), Some(sha.as_str()), "{name} differs");
    }
}

/// A guest-agent-frozen backup; returns the report and when the freeze was asked for.
fn frozen_backup(daemon: &Daemon, qga: &Path, extra: &[&str]) -> (Value, Instant) {
    let mut args = vec![
        "backup",
        "begin",
        "vm",
        "--no-hooks",
        "--guest-agent",
        qga.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let asked = Instant::now();
    let backup = daemon.cli_json(&args);
    let agent = &backup["quiesce"]["summary"]["agent"];
    assert!(
        agent["frozen"].as_u64() >= Some(1),
        "the agent froze nothing: {backup}"
    );
    assert_eq!(backup["quiesce"]["thaw"]["errors"], json!([]), "{backup}");
    (backup, asked)
}

#[test]
fn a_guest_agent_frozen_backup_of_a_live_vm_disk_restores_to_a_clean_filesystem() {
    let harness = harness().expect("the VM harness");
    let build = vm_build(&harness).expect("the VM build");
    let daemon = Daemon::start();
    let disk = daemon.dir.path().join("vm.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&disk)
        .status()
        .unwrap();
    assert!(mkfs.success());
    daemon.cli_json(&[
        "volume",
        "create",
        "vm",
        "--backing",
        disk.to_str().unwrap(),
    ]);

    let qga = daemon.dir.path().join("qga.sock");
    let mut vm = Command::new(harness.join("run-vm.sh"))
        .args(["-q", "-a", "no_timer_check", "-t", "600", "-b"])
        .arg(&build)
        .arg("-d")
        .arg(daemon.uri("vm"))
        .arg("-g")
        .arg(&qga)
        .arg("-e")
        .arg(GUEST_SCRIPT)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run-vm.sh");
    let out = vm.stdout.take().unwrap();
    let mut vm = ChildGuard::terminating(vm);
    let console = console(out);
    wait_for(
        &console,
        Duration::from_secs(300),
        "qemu-ga in the guest",
        |l| l.iter().any(|l| l.1 == "READY"),
    )
    .expect("the guest console");
    wait_for(&console, Duration::from_secs(300), "5 synced files", |l| {
        synced_in(l) >= 5
    })
    .expect("the guest console");

    // Full backup: frozen by the agent, pulled while the guest keeps writing.
    let (full, asked) = frozen_backup(&daemon, &qga, &["--checkpoint", "c1"]);
    let window = full["quiesce"]["freeze_to_thaw_ms"].as_f64().unwrap();
    let synced_full = synced_before(&console, asked);
    let at_thaw = synced_count(&console);
    let image = daemon.dir.path().join("restored.raw");
    let uri = full["volumes"][0]["uri"]["unix"]
        .as_str()
        .unwrap()
        .to_string();
    qemu_img_convert(&uri, &image);
    wait_for(
        &console,
        Duration::from_secs(120),
        "guest writes during the pull",
        |l| synced_in(l) >= at_thaw + 3,
    )
    .expect("the guest console");
    daemon.cli_json(&["backup", "end", "vm"]);
    check_image(&image, &synced_full, daemon.dir.path(), "full");

    // Incremental: the changes since c1, applied onto the full image.
    wait_for(
        &console,
        Duration::from_secs(120),
        "more synced files",
        |l| synced_in(l) >= at_thaw + 6,
    )
    .expect("the guest console");
    let (incremental, asked) = frozen_backup(
        &daemon,
        &qga,
        &["--incremental", "c1", "--checkpoint", "c2"],
    );
    let synced_incremental = synced_before(&console, asked);
    assert!(synced_incremental.len() > synced_full.len());
    let uri = incremental["volumes"][0]["uri"]["unix"]
        .as_str()
        .unwrap()
        .to_string();
    daemon.nbd_tool(&["apply", &uri, "c1", image.to_str().unwrap()]);
    daemon.cli_json(&["backup", "end", "vm"]);
    check_image(
        &image,
        &synced_incremental,
        daemon.dir.path(),
        "incremental",
    );

    let mut agent = AgentClient::connect(&qga, Duration::from_secs(30)).unwrap();
    assert_eq!(
        agent.fsfreeze_status(Duration::from_secs(30)).unwrap(),
        "thawed"
    );
    agent
        .execute(
            "guest-exec",
            Some(json!({"path": "/bin/touch", "arg": ["/run/host-done"]})),
            Duration::from_secs(30),
        )
        .unwrap();
    drop(agent);
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = vm.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the guest did not finish");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "the guest failed: {:?}",
        console
            .lock()
            .unwrap()
            .iter()
            .map(|l| &l.1)
            .collect::<Vec<_>>()
    );
    eprintln!(
        "guest-agent backup of a live VM: freeze-to-thaw {window:.1} ms, write pause {} us; \
         {} + {} synced files verified in the full and incremental restores",
        full["write_pause_us"],
        synced_full.len(),
        synced_incremental.len()
    );
}
