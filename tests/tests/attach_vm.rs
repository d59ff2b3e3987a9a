//! `tidemark volume attach --via nbd` against a real kernel's nbd.ko, in a guest booted by
//! the VM harness (../shared/vm; this machine has no nbd.ko). Inside the guest the daemon
//! attaches a volume as /dev/nbdN over generic netlink; ext4 goes on it; a full backup is
//! pulled and restored; the daemon is killed with -9 while a writer fsyncs numbered files,
//! and the restarted daemon hands the device new sockets (NBD_CMD_RECONFIGURE): the writer
//! resumes without an error and every file it had fsynced reads back intact after a
//! remount; an incremental backup restores, on top of the full one, to exactly the bytes
//! of the volume.
//!
//! The guest is thrown away at the end; its disk is a sparse file in a temp dir.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tidemark_tests::vm::{console, harness, vm_build_with, Console};
use tidemark_tests::{run_ok_within, tidemark_bin, ChildGuard};

/// The guest's work; prints `ATTACH-VM-OK` when every check passed.
const GUEST_SCRIPT: &str = r#"
set -eu
fail() { echo "FAIL: $*"; dmesg | tail -40; echo "--- daemon log"; tail -60 /data/daemon.log || true; exit 1; }
# /dev/vdb holds the tidemark binary and the libraries the initramfs lacks (libgcc_s).
mkdir -p /opt/tidemark
mount -o ro /dev/vdb /opt/tidemark
for f in /opt/tidemark/lib/*; do
  [ -e "/lib/x86_64-linux-gnu/${f##*/}" ] || cp "$f" /lib/x86_64-linux-gnu/
done
T=/opt/tidemark/tidemark
S=/data/state
tm() { "$T" "$@" --state-dir "$S"; }
start_daemon() {
  TIDEMARK_LOG=info "$T" serve --state-dir "$S" >>/data/daemon.log 2>&1 &
  DPID=$!
  i=0
  until tm volume list >/dev/null 2>&1; do
    i=$((i+1)); [ $i -lt 300 ] || fail "the daemon did not come up"
    kill -0 $DPID 2>/dev/null || fail "the daemon exited"
    sleep 0.1
  done
}
# Each file in the list is "name sha256"; all must read back intact under $1.
check_files() {
  while read -r name sum; do
    [ -f "$1/$name" ] || fail "$name is missing under $1"
    [ "$(sha256sum < "$1/$name" | cut -d' ' -f1)" = "$sum" ] || fail "$name differs under $1"
  done < "$2"
}
# backup CHECKPOINT DELTA SINCE|- FREEZE|-: backup begin (frozen if FREEZE names a mount
# point), tidemark pull, backup end.
backup() {
  if [ "$3" != - ]; then inc="--incremental $3"; how="--bitmap $3"; else inc=""; how="--full"; fi
  if [ "$4" != - ]; then freeze="--freeze $4"; else freeze=""; fi
  uri=$(tm backup begin vol --no-hooks --checkpoint "$1" $inc $freeze --json | jq -r '.volumes[0].uri.unix')
  "$T" pull $how --checkpoint "$1" "$uri" --delta "$2" >/run/pull.log 2>&1 \
    || { tail -c 2000 /run/pull.log; fail "pull $1"; }
  [ "$(tm backup end vol --json | jq -r .state)" = completed ] || fail "backup end $1"
}

mkfs.ext4 -q -F /dev/vda
mkdir -p /data /mnt/vol /mnt/restored
mount /dev/vda /data
mkdir -p "$S"
truncate -s 64M /data/vol.raw
start_daemon
tm volume create vol --backing /data/vol.raw >/dev/null
dev=$(tm volume attach vol --via nbd --json | jq -r .device)
case "$dev" in /dev/nbd*) ;; *) fail "attach printed '$dev'" ;; esac
echo "ATTACHED $dev"
mkfs.ext4 -q -F "$dev"
mount "$dev" /mnt/vol
mkdir /mnt/vol/files /mnt/vol/w
: > /run/before-full
for i in $(seq 1 20); do
  dd if=/dev/urandom of=/mnt/vol/files/f$i bs=32k count=1 conv=fsync 2>/dev/null
  echo "files/f$i $(sha256sum < /mnt/vol/files/f$i | cut -d' ' -f1)" >> /run/before-full
done

# Full backup (frozen by the daemon), restored and compared file by file; the restored
# journal is not replayed (noload): a read-only loop device cannot take the replay.
backup c1 /data/full.delta - /mnt/vol
"$T" restore --into /data/full.img /data/full.delta >/run/restore.log 2>&1 \
  || { tail -c 2000 /run/restore.log; fail "restore full"; }
mount -o loop,ro,noload /data/full.img /mnt/restored
check_files /mnt/restored /run/before-full
umount /mnt/restored
rm /data/full.img
echo "FULL-RESTORE-OK $(wc -l < /run/before-full) files"

# More files, then the writer: each line of /run/synced names a file whose fsync returned.
for i in $(seq 21 30); do
  dd if=/dev/urandom of=/mnt/vol/files/f$i bs=32k count=1 conv=fsync 2>/dev/null
  echo "files/f$i $(sha256sum < /mnt/vol/files/f$i | cut -d' ' -f1)" >> /run/synced
done
( i=0
  while [ ! -e /run/stop ]; do
    i=$((i+1))
    dd if=/dev/urandom of=/mnt/vol/w/s$i bs=16k count=1 conv=fsync 2>/dev/null \
      || { echo "WRITER-ERROR s$i"; exit 1; }
    echo "w/s$i $(sha256sum < /mnt/vol/w/s$i | cut -d' ' -f1)" >> /run/synced
  done ) &
WPID=$!
until [ "$(grep -c '^w/' /run/synced)" -ge 5 ]; do sleep 0.1; done
kill -9 $DPID
wait $DPID 2>/dev/null || true
killed=$(wc -l < /run/synced)
echo "KILLED the daemon after $killed synced files"
sleep 2
stalled=$(wc -l < /run/synced)
# A file whose fsync returned as the kill landed may be counted late; more cannot be.
[ $((stalled - killed)) -le 1 ] || fail "$((stalled - killed)) files synced with no daemon"
start_daemon
grep -q "reconnected" /data/daemon.log || fail "the restarted daemon did not reconnect $dev"
tm volume list --json | grep -q "$dev" || fail "volume list does not show $dev"
echo "RESTARTED the daemon, which reconnected $dev ($((stalled - killed)) files synced while it was down)"
waited=0
until [ "$(wc -l < /run/synced)" -ge $((stalled + 5)) ]; do
  kill -0 $WPID 2>/dev/null || fail "the writer stopped"
  waited=$((waited+1)); [ $waited -lt 900 ] || fail "the writer did not resume"
  sleep 0.1
done
echo "RESUMED after $((waited / 10)) s: $(wc -l < /run/synced) synced files"
touch /run/stop
wait $WPID || fail "the writer failed"
umount /mnt/vol
mount "$dev" /mnt/vol
check_files /mnt/vol /run/synced
check_files /mnt/vol /run/before-full
echo "SYNCED-FILES-OK $(wc -l < /run/synced) files after a remount"
umount /mnt/vol

# Incremental backup of the quiet volume: full + incremental restore to its exact bytes.
backup c2 /data/inc.delta c1 -
"$T" restore --into /data/restored.img /data/full.delta /data/inc.delta >/run/restore.log 2>&1 \
  || { tail -c 2000 /run/restore.log; fail "restore incremental"; }
cmp /data/restored.img /data/vol.raw || fail "the restored image differs from the volume"
mount -o loop,ro,noload /data/restored.img /mnt/restored
check_files /mnt/restored /run/synced
umount /mnt/restored
echo "INCREMENTAL-RESTORE-OK: equals the volume byte for byte"
# The request in flight at the kill is resent after the block layer's 30 s timeout
# ("Possible stuck request"), never failed.
dmesg | grep -E "I/O error|EXT4-fs error|EXT4-fs warning" && fail "the kernel reported errors"
dmesg | grep -i "nbd0" | tail -5
tm volume detach vol >/dev/null
kill $DPID
wait $DPID 2>/dev/null || true
umount /data
umount /opt/tidemark
echo ATTACH-VM-OK
"#;

/// An ext4 image holding the tidemark binary and, under lib/, its libraries: a disk
/// reads fast where fw_cfg (run-vm.sh -F) takes minutes for a binary this big under TCG.
fn tools_disk(dir: &Path) -> PathBuf {
    let tree = dir.join("tools");
    std::fs::create_dir_all(tree.join("lib")).unwrap();
    std::fs::copy(tidemark_bin(), tree.join("tidemark")).unwrap();
    for library in libraries(&tidemark_bin()) {
        std::fs::copy(
            &library,
            tree.join("lib").join(library.file_name().unwrap()),
        )
        .unwrap();
    }
    let image = dir.join("tools.img");
    run_ok_within(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&tree)
            .arg(&image)
            .arg("256M"),
        Duration::from_secs(60),
    )
    .expect("mkfs.ext4 -d of the tools disk");
    std::fs::remove_dir_all(&tree).unwrap();
    image
}

/// The shared libraries `binary` loads (ldd), besides libc and the dynamic loader.
fn libraries(binary: &Path) -> Vec<PathBuf> {
    let ldd = run_ok_within(Command::new("ldd").arg(binary), Duration::from_secs(30))
        .expect("ldd of the tidemark binary");
    ldd.lines()
        .filter_map(|line| line.split("=> ").nth(1)?.split(' ').next())
        .filter(|path| path.starts_with('/') && !path.contains("/libc.so"))
        .map(PathBuf::from)
        .collect()
}

fn console_text(console: &Console) -> String {
    let lines = console.lock().unwrap();
    lines
        .iter()
        .map(|l| l.1.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_kernel_nbd_attachment_rides_out_a_daemon_kill_and_restores_to_the_truth() {
    let harness = harness().expect("the VM harness");
    let build = vm_build_with(&harness, "nbd", "nbd loop", "jq").expect("the VM build");
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("data.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let tools = tools_disk(dir.path());
    let started = Instant::now();
    let mut vm = Command::new(harness.join("run-vm.sh"));
    vm.args(["-q", "-t", "240", "-m", "1024M", "-b"])
        .arg(&build)
        .arg("-d")
        .arg(&disk)
        .arg("-d")
        .arg(format!("file={},format=raw,readonly=on", tools.display()));
    let mut vm = vm
        .arg("-e")
        .arg(GUEST_SCRIPT)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run-vm.sh");
    let out = vm.stdout.take().unwrap();
    let mut vm = ChildGuard::terminating(vm);
    let console = console(out);
    // run-vm.sh ends the guest after its own 240 s; this only catches a hung run-vm.sh.
    let deadline = started + Duration::from_secs(270);
    let status = loop {
        if let Some(status) = vm.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "run-vm.sh did not end; guest console:\n{}",
            console_text(&console)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // The console reader may still hold the last lines.
    std::thread::sleep(Duration::from_millis(200));
    let text = console_text(&console);
    assert!(
        status.success() && text.lines().any(|l| l == "ATTACH-VM-OK"),
        "the guest failed ({status}); its console:\n{text}"
    );
    let report: Vec<&str> = text
        .lines()
        .filter(|l| {
            [
                "ATTACHED",
                "FULL-",
                "KILLED",
                "RESTARTED",
                "RESUMED",
                "SYNCED-",
                "INCREMENTAL-",
            ]
            .iter()
            .any(|p| l.starts_with(p))
        })
        .collect();
    eprintln!(
        "kernel NBD in a TCG guest, {:.0} s in all:\n  {}",
        started.elapsed().as_secs_f64(),
        report.join("\n  ")
    );
}
