//! A real guest: qemu-ga inside a VM (the harness in ../shared/vm) freezes the guest's
//! ext4 through our guest-agent client while the guest writes continuously; the disk is
//! served by `tidemark export`; a copy of the disk taken inside the window passes
//! `fsck.ext4 -fn` and holds, byte for byte, every file the guest had synced before the
//! freeze. qemu-ga runs only inside the guest, never on this machine.
//!
//! Environment: `TIDEMARK_VM_HARNESS` (default `<workspace>/../shared/vm`, or
//! /work/shared/vm), `TIDEMARK_VM_BUILD` (default /var/tmp/tidemark-vm-build; built with
//! the harness's make-vm.sh when missing).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::json;
use tidemark_engine::quiesce::{self, agent::AgentClient, QuiesceSpec};
use tidemark_tests::vm::{console, harness, vm_build, wait_for};
use tidemark_tests::{run_ok, tidemark_bin, ChildGuard};

/// The quiesce driver built from tests/src/bin/quiesce-probe.rs.
const PROBE: &str = env!("CARGO_BIN_EXE_quiesce-probe");

/// The guest: mounts the disk, writes files continuously (unsynced small files, a ticker
/// whose longest pause shows the freeze, fsynced 64 KiB files reported on the console with
/// their sha256 once the fsync returned), starts qemu-ga, and stops when the host creates
/// /run/host-done through guest-exec.
const GUEST_SCRIPT: &str = r#"
set -e
mount -t ext4 /dev/vda /mnt
mkdir -p /mnt/synced /mnt/stream
( i=0; while [ ! -e /run/stop ]; do i=$((i+1)); head -c 4096 /dev/urandom > /mnt/stream/f$i; done ) &
W1=$!
( while [ ! -e /run/stop ]; do read up _ < /proc/uptime; echo $up >> /mnt/stream/ticks; sleep 0.05; done ) &
W2=$!
( i=0; while [ ! -e /run/stop ]; do
    i=$((i+1))
    dd if=/dev/urandom of=/mnt/synced/s$i bs=65536 count=1 conv=fsync 2>/dev/null
    echo "SYNCED s$i $(sha256sum < /mnt/synced/s$i | cut -d' ' -f1)"
    sleep 0.1
  done ) &
W3=$!
start-qga
echo READY
while [ ! -e /run/host-done ]; do sleep 0.1; done
touch /run/stop
wait $W1 $W2 $W3 || true
awk 'NR > 1 && $1 - prev > max { max = $1 - prev } { prev = $1 } END { printf "TICKGAP %.2f\n", max }' /mnt/stream/ticks
umount /mnt
echo GUEST-DONE
"#;

#[test]
fn a_guest_agent_freeze_gives_a_consistent_copy_of_a_live_guest_disk() -> Result<()> {
    let harness = harness()?;
    let build = vm_build(&harness)?;
    let dir = tempfile::Builder::new()
        .prefix("tidemark-quiesce-vm-")
        .tempdir()?;
    let disk = dir.path().join("disk.raw");
    std::fs::File::create(&disk)?.set_len(128 << 20)?;
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&disk))?;

    // The guest's disk: tidemark's NBD export of the raw file.
    let nbd_sock = dir.path().join("nbd.sock");
    let mut export = Command::new(tidemark_bin())
        .arg("export")
        .arg(&disk)
        .arg("--socket")
        .arg(&nbd_sock)
        .arg("--json")
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start tidemark export")?;
    let export_out = export.stdout.take().context("export stdout")?;
    let export = ChildGuard::terminating(export);
    let mut ready = String::new();
    BufReader::new(export_out).read_line(&mut ready)?;
    let ready: serde_json::Value = serde_json::from_str(&ready)
        .with_context(|| format!("tidemark export printed {ready:?}"))?;
    let uri = ready["uri"]
        .as_str()
        .context("no uri in the export's ready line")?
        .to_string();

    let qga_sock = dir.path().join("qga.sock");
    let mut vm = Command::new(harness.join("run-vm.sh"))
        .args(["-a", "no_timer_check", "-t", "240", "-b"])
        .arg(&build)
        .arg("-d")
        .arg(&uri)
        .arg("-g")
        .arg(&qga_sock)
        .arg("-e")
        .arg(GUEST_SCRIPT)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start run-vm.sh")?;
    let vm_out = vm.stdout.take().context("vm stdout")?;
    let mut vm = ChildGuard::terminating(vm);
    let console = console(vm_out);

    // Wait for the agent, then for a few synced files.
    wait_for(
        &console,
        Duration::from_secs(180),
        "the guest to start qemu-ga",
        |lines| lines.iter().any(|l| l.1 == "READY"),
    )?;
    let mut probe = AgentClient::connect(&qga_sock, Duration::from_secs(60))?;
    ensure!(
        probe.fsfreeze_status(Duration::from_secs(30))? == "thawed",
        "the guest starts frozen"
    );
    drop(probe);
    wait_for(
        &console,
        Duration::from_secs(120),
        "5 synced files",
        |lines| lines.iter().filter(|l| l.1.starts_with("SYNCED ")).count() >= 5,
    )?;

    // Freeze through the guest agent, copy the disk inside the window, thaw.
    let spec = QuiesceSpec {
        guest_agent: Some(qga_sock.clone()),
        agent_timeout: Duration::from_secs(30),
        window_limit: Duration::from_secs(30),
        watchdog_exe: Some(tidemark_bin()),
        ..QuiesceSpec::default()
    };
    let freeze_sent = Instant::now();
    let quiesced = quiesce::quiesce(&spec)?;
    let froze_in = freeze_sent.elapsed();
    let agent = quiesced
        .agent()
        .context("no agent freeze reported")?
        .clone();
    ensure!(
        agent.frozen >= 1,
        "the agent froze {} filesystems",
        agent.frozen
    );
    let copy = dir.path().join("copy.raw");
    let copy_start = Instant::now();
    std::fs::copy(&disk, &copy)?;
    let copy_took = copy_start.elapsed();
    let report = quiesced.thaw();
    ensure!(
        report.is_clean(),
        "thaw problems: {:?}\nlog: {:#?}",
        report.errors,
        report.log
    );

    let mut client = AgentClient::connect(&qga_sock, Duration::from_secs(30))?;
    ensure!(
        client.fsfreeze_status(Duration::from_secs(30))? == "thawed",
        "still frozen"
    );
    // The guest keeps writing after the thaw.
    let synced_at_thaw = console
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.1.starts_with("SYNCED "))
        .count();
    wait_for(
        &console,
        Duration::from_secs(60),
        "writes after the thaw",
        |lines| lines.iter().filter(|l| l.1.starts_with("SYNCED ")).count() >= synced_at_thaw + 3,
    )?;
    drop(client);

    // kill -9 of the quiescing process while the guest is frozen (this time with
    // guest-fsfreeze-freeze-list): the watchdog (the tidemark binary) connects to the
    // agent itself and thaws the guest.
    let (mut holder, first) = tidemark_tests::quiesce::Probe::start(
        PROBE,
        json!({
            "guest_agent": qga_sock,
            "guest_mountpoints": ["/mnt"],
            "agent_timeout_ms": 30_000,
            "window_limit_ms": 60_000,
        }),
    )?;
    ensure!(
        first["quiesced"]["agent"]["frozen"].as_u64() >= Some(1),
        "{first}"
    );
    let killed = Instant::now();
    holder.kill9()?;
    let thawed_after = loop {
        // One short session at a time: the agent channel serves one client, and the
        // watchdog needs it too.
        let status = AgentClient::connect(&qga_sock, Duration::from_secs(30))?
            .fsfreeze_status(Duration::from_secs(30))?;
        if status == "thawed" {
            break killed.elapsed();
        }
        ensure!(
            killed.elapsed() < Duration::from_secs(60),
            "the guest is still frozen"
        );
        thread::sleep(Duration::from_millis(100));
    };

    let mut client = AgentClient::connect(&qga_sock, Duration::from_secs(30))?;
    client.execute(
        "guest-exec",
        Some(json!({"path": "/bin/touch", "arg": ["/run/host-done"]})),
        Duration::from_secs(30),
    )?;
    drop(client);
    let status = {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = vm.try_wait()? {
                break status;
            }
            ensure!(Instant::now() < deadline, "the guest did not finish");
            thread::sleep(Duration::from_millis(50));
        }
    };
    let lines = console.lock().unwrap().clone();
    ensure!(
        status.success(),
        "the guest failed ({status}); console: {:#?}",
        lines.iter().map(|l| &l.1).collect::<Vec<_>>()
    );
    drop(export);

    // The copy is a clean ext4 holding every file whose fsync had returned (its console
    // line had reached us) before we asked the agent to freeze.
    run_ok(Command::new("fsck.ext4").arg("-fn").arg(&copy))?;
    let synced_before: BTreeMap<String, String> = lines
        .iter()
        .filter(|(at, _)| *at < freeze_sent)
        .filter_map(|(_, line)| {
            let mut fields = line.strip_prefix("SYNCED ")?.split(' ');
            Some((fields.next()?.to_string(), fields.next()?.to_string()))
        })
        .collect();
    ensure!(
        synced_before.len() >= 5,
        "only {} files synced before the freeze",
        synced_before.len()
    );
    let dumped = dir.path().join("dumped");
    std::fs::create_dir(&dumped)?;
    run_ok(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("rdump /synced {}", dumped.display()))
            .arg(&copy),
    )?;
    for (name, sha) in &synced_before {
        let path = dumped.join("synced").join(name);
        ensure!(
            path.exists(),
            "{name} (synced before the freeze) is missing from the copy"
        );
        let sum = run_ok(Command::new("sha256sum").arg(&path))?;
        ensure!(
            sum.split(' ').next() == Some(sha.as_str()),
            "{name} differs in the copy"
        );
    }
    let tick_gap = lines
        .iter()
        .find_map(|l| l.1.strip_prefix("TICKGAP ").map(str::to_string));
    eprintln!(
        "guest agent froze {} filesystem(s) ({:?}) in {:.1} ms; disk copied in {:.1} ms; \
         freeze-to-thaw {:.1} ms; guest writer's longest pause {} s; {} synced files verified; \
         after kill -9 inside the window the watchdog had the guest thawed {:.1} ms later",
        agent.frozen,
        agent.mountpoints,
        froze_in.as_secs_f64() * 1e3,
        copy_took.as_secs_f64() * 1e3,
        report.freeze_to_thaw.as_secs_f64() * 1e3,
        tick_gap.unwrap_or_else(|| "?".into()),
        synced_before.len(),
        thawed_after.as_secs_f64() * 1e3
    );
    Ok(())
}
