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
use std::process::Command;
use std::time::{Duration, Instant};

use tidemark_tests::vm::{harness, spawn_with_console, vm_build_with, Console};
use tidemark_tests::{run_ok_within, tidemark_bin};

/// What every guest does first: the tidemark binary from the tools disk (/dev/vdb), ext4
/// on the data disk (/dev/vda) at /data, the daemon started with its state in /data/state;
/// and the shell functions the checks share.
const PRELUDE: &str = r#"
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
# backup VOLUME CHECKPOINT DELTA SINCE|- FREEZE|-: backup begin (frozen if FREEZE names a
# mount point), tidemark pull, backup end.
backup() {
  if [ "$4" != - ]; then inc="--incremental $4"; how="--bitmap $4"; else inc=""; how="--full"; fi
  if [ "$5" != - ]; then freeze="--freeze $5"; else freeze=""; fi
  uri=$(tm backup begin "$1" --no-hooks --checkpoint "$2" $inc $freeze --json | jq -r '.volumes[0].uri.unix')
  "$T" pull $how --checkpoint "$2" "$uri" --delta "$3" >/run/pull.log 2>&1 \
    || { tail -c 2000 /run/pull.log; fail "pull $2"; }
  [ "$(tm backup end "$1" --json | jq -r .state)" = completed ] || fail "backup end $2"
}

mkfs.ext4 -q -F /dev/vda
mkdir -p /data /mnt/vol /mnt/restored
mount /dev/vda /data
mkdir -p "$S"
start_daemon
"#;

/// The first guest's work; prints `ATTACH-VM-OK` when every check passed.
const RIDE_OUT_SCRIPT: &str = r#"
truncate -s 64M /data/vol.raw
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
backup vol c1 /data/full.delta - /mnt/vol
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
backup vol c2 /data/inc.delta c1 -
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

/// The second guest's work (2 vCPUs): xfs on a 2-queue attachment, backed up and restored;
/// the volume attached read-only; its backup's snapshot (`x@backup`) attached read-only
/// beside the written live volume; and `tidemark snapshot` of an ext4 on an attached
/// volume under a database-like writer. Prints `XFS-SNAPSHOT-VM-OK` when all passed.
const XFS_SNAPSHOT_SCRIPT: &str = r#"
mkdir -p /mnt/x /mnt/snap /mnt/e
# files DIR LIST: "name sha256" of every regular file under DIR, sorted.
files() { ( cd "$1" && find . -type f | sort | while read -r f; do echo "${f#./} $(sha256sum < "$f" | cut -d' ' -f1)"; done ) > "$2"; }
# hw_runs DEV: how often each hardware queue of DEV was run to dispatch (blk-mq debugfs).
hw_runs() { for q in /sys/kernel/debug/block/${1#/dev/}/hctx*; do cat "$q/run"; done | tr '\n' ' '; }
mount -t debugfs none /sys/kernel/debug

# 1a. xfs on a volume attached with 2 queues, written from both CPUs, backed up frozen,
# restored and compared file by file.
[ "$(nproc)" = 2 ] || fail "the guest has $(nproc) CPUs, not 2"
truncate -s 320M /data/x.raw
tm volume create x --backing /data/x.raw >/dev/null
tm volume attach x --via nbd --queues 2 --json > /run/attach.json
dx=$(jq -r .device /run/attach.json)
case "$dx" in /dev/nbd*) ;; *) fail "attach printed '$dx'" ;; esac
[ "$(jq .queues /run/attach.json)" = 2 ] || fail "attach: $(cat /run/attach.json)"
[ "$(ls -d /sys/block/${dx#/dev/}/mq/* | wc -l)" = 2 ] || fail "$dx has not 2 hardware queues"
mkfs.xfs -q -f "$dx"
mount "$dx" /mnt/x
mkdir /mnt/x/a /mnt/x/b
writers=""
for d in a b; do
  ( for i in $(seq 1 40); do
      dd if=/dev/urandom of=/mnt/x/$d/f$i bs=16k count=$((i % 7 + 1)) conv=fsync 2>/dev/null \
        || { echo "WRITER-ERROR $d/f$i"; exit 1; }
    done ) &
  writers="$writers $!"
done
for w in $writers; do wait $w || fail "a writer failed"; done
dd if=/dev/urandom of=/mnt/x/big bs=1M count=8 conv=fsync 2>/dev/null
files /mnt/x /run/x-files
runs=$(hw_runs "$dx")
for n in $runs; do [ "$n" -gt 0 ] || fail "a hardware queue of $dx was never run: $runs"; done
echo "XFS-QUEUES $dx: $(nproc) CPUs, dispatch runs per hardware queue: $runs"
backup x c1 /data/x.delta - /mnt/x
"$T" restore --into /data/x.img /data/x.delta >/run/restore.log 2>&1 \
  || { tail -c 2000 /run/restore.log; fail "restore x"; }
mount -o loop,ro,norecovery,nouuid /data/x.img /mnt/restored
check_files /mnt/restored /run/x-files
umount /mnt/restored
rm /data/x.img
echo "XFS-RESTORE-OK $(wc -l < /run/x-files) files on xfs over 2 queues"

# 1b. Read-only: writes to the device fail, blockdev --getro says 1, a ro mount works.
umount /mnt/x
tm volume detach x >/dev/null
dro=$(tm volume attach x --via nbd --read-only --json | jq -r .device)
[ "$(blockdev --getro "$dro")" = 1 ] || fail "blockdev --getro $dro is not 1"
if dd if=/dev/zero of="$dro" bs=4k count=1 conv=fsync 2>/run/dd.err; then
  fail "a write to the read-only $dro succeeded"
fi
grep -q "not permitted" /run/dd.err || fail "the write to $dro failed otherwise than EPERM: $(cat /run/dd.err)"
mount -o ro "$dro" /mnt/x
check_files /mnt/x /run/x-files
if touch /mnt/x/new 2>/dev/null; then fail "a file was made on the read-only mount"; fi
umount /mnt/x
tm volume detach x >/dev/null
echo "READ-ONLY-OK $dro: getro 1, write refused ($(head -1 /run/dd.err)), mount -o ro reads every file"

# 1c. x@backup attached read-only beside the live volume, mounted and written meanwhile:
# the snapshot keeps the backup's files, also after a remount past the page cache.
dx=$(tm volume attach x --via nbd --json | jq -r .device)
mount "$dx" /mnt/x
tm backup begin x --no-hooks --checkpoint c2 --incremental c1 --freeze /mnt/x --json >/run/begin.json
[ "$(jq -r '.volumes[0].export' /run/begin.json)" = x@backup ] || fail "backup begin: $(cat /run/begin.json)"
files /mnt/x /run/at-backup
ds=$(tm volume attach x@backup --via nbd --json | jq -r .device)
[ "$ds" != "$dx" ] || fail "the snapshot got the live device"
[ "$(blockdev --getro "$ds")" = 1 ] || fail "the snapshot's $ds is writable"
( i=0
  while [ ! -e /run/xstop ]; do
    i=$((i+1))
    dd if=/dev/urandom of=/mnt/x/a/f$((i % 40 + 1)) bs=16k count=2 conv=fsync 2>/dev/null \
      || { echo "WRITER-ERROR a/f$i"; exit 1; }
    dd if=/dev/urandom of=/mnt/x/new$i bs=16k count=1 conv=fsync 2>/dev/null \
      || { echo "WRITER-ERROR new$i"; exit 1; }
  done ) &
XW=$!
rm /mnt/x/b/f1 /mnt/x/b/f2 /mnt/x/big
sync
mount -o ro,norecovery,nouuid "$ds" /mnt/snap
check_files /mnt/snap /run/at-backup
until [ -e /mnt/x/new20 ]; do kill -0 $XW 2>/dev/null || fail "the live writer stopped"; sleep 0.1; done
umount /mnt/snap
echo 3 > /proc/sys/vm/drop_caches
mount -o ro,norecovery,nouuid "$ds" /mnt/snap
files /mnt/snap /run/snap-now
cmp -s /run/snap-now /run/at-backup || { diff /run/at-backup /run/snap-now | head; fail "the snapshot changed"; }
touch /run/xstop
wait $XW || fail "the live writer failed"
files /mnt/x /run/live-now
cmp -s /run/live-now /run/at-backup && fail "the live volume did not change"
umount /mnt/snap
tm volume detach x@backup >/dev/null
[ "$(tm backup end x --json | jq -r .state)" = completed ] || fail "backup end c2"
umount /mnt/x
tm volume detach x >/dev/null
echo "BACKUP-SNAPSHOT-OK $ds beside the live $dx: $(wc -l < /run/at-backup) files as at the backup, the live volume $(wc -l < /run/live-now) files"

# 2. tidemark snapshot -t /snap of an ext4 on an attached volume while a database-like
# writer keeps file pairs equal (its freeze hook pauses it between pairs); every pair
# under /snap matches and holds the generation of the pause; stdin EOF releases it all.
N=20
truncate -s 128M /data/e.raw
tm volume create e --backing /data/e.raw >/dev/null
de=$(tm volume attach e --via nbd --json | jq -r .device)
mkfs.ext4 -q -F "$de"
mount "$de" /mnt/e
mkdir /mnt/e/db
( g=0
  while [ ! -e /run/wstop ]; do
    if [ -e /run/pause ]; then
      echo $((g - 1)) > /run/ack.tmp; mv /run/ack.tmp /run/ack
      while [ -e /run/pause ] && [ ! -e /run/wstop ]; do sleep 0.01; done
      continue
    fi
    i=$((g % N))
    { echo "pair $i generation $g"; head -c 12288 /dev/urandom; } > /run/gen
    for p in a b; do
      dd if=/run/gen of=/mnt/e/db/$p$i conv=fsync 2>/dev/null || { echo "WRITER-ERROR $p$i"; exit 1; }
    done
    echo $g > /run/gdone.tmp; mv /run/gdone.tmp /run/gdone
    g=$((g + 1))
  done ) &
WP=$!
generation() { cat /run/gdone 2>/dev/null || echo -1; }
until [ "$(generation)" -ge $((N + 10)) ]; do kill -0 $WP 2>/dev/null || fail "the pair writer stopped"; sleep 0.1; done
mkdir -p /run/hooks
cat > /run/hooks/10-pairs <<'HOOK'
#!/bin/sh
echo "$*" >> /run/hook.log
case "$1" in
freeze) rm -f /run/ack; touch /run/pause
  i=0; while [ ! -e /run/ack ]; do sleep 0.01; i=$((i+1)); [ $i -lt 2000 ] || exit 1; done ;;
thaw) rm -f /run/pause ;;
esac
HOOK
chmod 755 /run/hooks/10-pairs
mkfifo /run/snap.in /run/snap.out
sleep 600 > /run/snap.in &
HOLD=$!
"$T" snapshot -t /snap --json --hooks /run/hooks /mnt/e/db --state-dir "$S" \
  < /run/snap.in > /run/snap.out 2>/run/snap.err &
SP=$!
cat /run/snap.out > /run/snap.json
kill -0 $SP 2>/dev/null || { cat /run/snap.err; fail "tidemark snapshot exited before the lease"; }
paused=$(cat /run/ack)
[ "$(jq -r '.mounts[0].kind' /run/snap.json)" = snapshot ] || fail "snapshot report: $(cat /run/snap.json)"
view=/snap/mnt/e/db
sd=$(jq -r '.mounts[0].device' /run/snap.json)
case "$sd" in /dev/nbd*) ;; *) fail "the view is on '$sd', not kernel NBD" ;; esac
[ "$(blockdev --getro "$sd")" = 1 ] || fail "the view's $sd is writable"
# check_pairs DIR: every pair equal, each at the last generation before the pause.
check_pairs() {
  for i in $(seq 0 $((N - 1))); do
    cmp -s "$1/a$i" "$1/b$i" || fail "pair $i differs under $1"
    want=$((paused - (paused - i) % N))
    [ "$(head -1 "$1/a$i")" = "pair $i generation $want" ] \
      || fail "pair $i under $1: '$(head -1 "$1/a$i")', not generation $want"
  done
}
check_pairs $view
until [ "$(generation)" -ge $((paused + N + 5)) ]; do kill -0 $WP 2>/dev/null || fail "the pair writer stopped after the snapshot"; sleep 0.1; done
check_pairs $view
echo "SNAPSHOT-TOOL-OK $N pairs under $view (on $sd) match at generation $paused; the writer went on to $(generation); pause $(jq -r .write_pause_us /run/snap.json) us, ready in $(jq -r .ready_ms /run/snap.json) ms"
[ "$(head -1 /run/hook.log | cut -d' ' -f1)" = freeze ] || fail "hook log: $(cat /run/hook.log)"
kill $HOLD
i=0
while kill -0 $SP 2>/dev/null; do i=$((i+1)); [ $i -lt 300 ] || fail "tidemark snapshot did not end at stdin EOF"; sleep 0.1; done
wait $SP || { cat /run/snap.err; fail "tidemark snapshot failed"; }
grep -q " /snap" /proc/mounts && fail "still mounted after the lease: $(grep ' /snap' /proc/mounts)"
[ "$(tm info --json | jq '[.attachments[]? | select(.name | contains("@"))] | length')" = 0 ] \
  || fail "a snapshot is still attached: $(tm info --json | jq -c .attachments)"
[ "$(tm backup status --json | jq '.running | length')" = 0 ] || fail "a backup still runs"
live=0
for b in /sys/block/nbd*; do [ -e "$b/pid" ] && live=$((live + 1)); done
[ $live = 1 ] || fail "$live nbd devices are connected, not only the live $de"
touch /run/wstop
wait $WP || fail "the pair writer failed"
echo "SNAPSHOT-RELEASED-OK at stdin EOF in $((i / 10)).$((i % 10)) s: nothing under /snap, no snapshot attached, no backup, only $de connected"
umount /mnt/e
tm volume detach e >/dev/null
dmesg | grep -E "I/O error|XFS.*(error|corrupt)|EXT4-fs error" && fail "the kernel reported errors"
kill $DPID
wait $DPID 2>/dev/null || true
umount /data
umount /opt/tidemark
echo XFS-SNAPSHOT-VM-OK
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

/// One guest run: the harness build `variant` (with `modules` and `bins`), `cpus` vCPUs, a
/// sparse 1 GiB data disk and the tools disk; PRELUDE then `script`, which must print `ok`
/// within `limit`. The console lines starting with one of `report` are printed.
struct Guest<'a> {
    variant: &'a str,
    modules: &'a str,
    bins: &'a str,
    cpus: u32,
    limit: Duration,
    script: &'a str,
    ok: &'a str,
    report: &'a [&'a str],
    title: &'a str,
}

impl Guest<'_> {
    fn run(&self) {
        let harness = harness().expect("the VM harness");
        let build =
            vm_build_with(&harness, self.variant, self.modules, self.bins).expect("the VM build");
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("data.raw");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        let tools = tools_disk(dir.path());
        let started = Instant::now();
        let mut vm = Command::new(harness.join("run-vm.sh"));
        // no_timer_check: a TCG guest on a loaded host can fail the kernel's IO-APIC timer
        // check and panic at boot.
        vm.args(["-q", "-m", "1024M", "-a", "no_timer_check", "-t"])
            .arg(self.limit.as_secs().to_string())
            .arg("-c")
            .arg(self.cpus.to_string())
            .arg("-b")
            .arg(&build)
            .arg("-d")
            .arg(&disk)
            .arg("-d")
            .arg(format!("file={},format=raw,readonly=on", tools.display()));
        let (mut vm, console) =
            spawn_with_console(vm.arg("-e").arg(format!("{PRELUDE}{}", self.script)));
        // run-vm.sh ends the guest after its own limit; this only catches a hung run-vm.sh.
        let deadline = started + self.limit + Duration::from_secs(30);
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
            status.success() && text.lines().any(|l| l == self.ok),
            "the guest failed ({status}); its console:\n{text}"
        );
        let report: Vec<&str> = text
            .lines()
            .filter(|l| self.report.iter().any(|p| l.starts_with(p)))
            .collect();
        eprintln!(
            "{} in a TCG guest, {:.0} s in all:\n  {}",
            self.title,
            started.elapsed().as_secs_f64(),
            report.join("\n  ")
        );
    }
}

#[test]
fn a_kernel_nbd_attachment_rides_out_a_daemon_kill_and_restores_to_the_truth() {
    Guest {
        variant: "nbd",
        modules: "nbd loop",
        bins: "jq",
        cpus: 1,
        limit: Duration::from_secs(240),
        script: RIDE_OUT_SCRIPT,
        ok: "ATTACH-VM-OK",
        report: &[
            "ATTACHED",
            "FULL-",
            "KILLED",
            "RESTARTED",
            "RESUMED",
            "SYNCED-",
            "INCREMENTAL-",
        ],
        title: "kernel NBD",
    }
    .run();
}

#[test]
fn xfs_over_two_queues_read_only_and_backup_attachments_and_the_snapshot_tool_over_kernel_nbd() {
    Guest {
        variant: "nbdxfs",
        modules: "nbd loop xfs",
        bins: "jq mkfs.xfs",
        cpus: 2,
        limit: Duration::from_secs(600),
        script: XFS_SNAPSHOT_SCRIPT,
        ok: "XFS-SNAPSHOT-VM-OK",
        report: &["XFS-", "READ-ONLY-", "BACKUP-SNAPSHOT-", "SNAPSHOT-"],
        title: "kernel NBD: xfs, 2 queues, read-only, @backup, the snapshot tool",
    }
    .run();
}
