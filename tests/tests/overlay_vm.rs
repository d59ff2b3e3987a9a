//! A VM boots from an `--overlay` export of a backup (issue 17's instant recovery): the
//! backup is a small root filesystem (the VM harness's own initramfs tree, busybox and its
//! libraries, on ext4) as Monday's image plus Tuesday's incremental delta, which adds a
//! busybox-init boot (/etc/inittab, /etc/init.d/rcS). The guest's disk is `tidemark export
//! --chain mon.img tue.delta --overlay OVL`, given to QEMU as `-drive
//! file=nbd+unix:///...`. The harness boots the host's kernel with its initramfs plus an
//! initramfs stage appended here that does what a distribution's initramfs does: load what
//! the disk needs (virtio_pci, virtio_blk; ext4 is built in), mount the export-backed disk
//! read-only as the new root, `switch_root` into it and exec its own /sbin/init. The
//! backup's init remounts / read-write and runs the job the host passed (fw_cfg, as
//! cloud-init runs user data): it checks that it runs on the disk (PID 1 is the disk's
//! busybox, / is /dev/vda), lets the backup's own sha256sum check every file of the point,
//! writes files, syncs; then init powers off, remounting / read-only. Afterwards the backup
//! files are byte-for-byte unchanged, a second export over the same overlay shows the
//! guest's files on a clean filesystem, and the chain without the overlay does not.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tidemark_tests::export::export_args;
use tidemark_tests::paths::{arg, scratch};
use tidemark_tests::point::{changed_blocks, incremental_delta};
use tidemark_tests::vm::{harness, vm_build};
use tidemark_tests::{run, run_ok_within, MIB};

const LIMIT: Duration = Duration::from_secs(60);

/// The initramfs stage of a disk boot, appended to the harness's initramfs and run as
/// `rdinit=/boot-disk`: what a distribution's initramfs does before the root's own init.
const BOOT_STAGE: &str = r#"#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec 0<>/dev/console 1>&0 2>&0
panic() { echo "boot-disk: $*"; exec poweroff -f; }
root= fstype=ext4 init=/sbin/init
for a in $(cat /proc/cmdline); do
  case "$a" in
    root=*) root=${a#root=} ;;
    rootfstype=*) fstype=${a#rootfstype=} ;;
    init=*) init=${a#init=} ;;
  esac
done
[ -n "$root" ] || panic "no root= on the kernel command line"
for m in virtio_pci virtio_blk; do modprobe "$m" || panic "modprobe $m failed"; done
grep -qw "$fstype" /proc/filesystems || modprobe "$fstype" || panic "no $fstype in this kernel"
i=0
while [ ! -b "$root" ]; do
  i=$((i + 1)); [ $i -le 100 ] || panic "the root device $root did not appear"
  sleep 0.1
done
mkdir -p /newroot
mount -t "$fstype" -o ro "$root" /newroot || panic "mount -t $fstype -o ro $root failed"
[ -x "/newroot$init" ] || panic "the root filesystem on $root has no $init"
echo "boot-disk: $root ($fstype) mounted read-only; switch_root to its $init"
for fs in dev proc sys; do mount --move "/$fs" "/newroot/$fs" || panic "mount --move /$fs"; done
exec switch_root /newroot "$init"
"#;

/// The backup's busybox init table (Tuesday's image).
const BACKUP_INITTAB: &str = "::sysinit:/etc/init.d/rcS
::shutdown:/bin/sync
::shutdown:/bin/umount -a -r
";

/// The backup's boot script (Tuesday's image): remount / read-write, load the modules the
/// initramfs did not, run the job the host passed through fw_cfg, report its status on the
/// harness's port, power off through init (which remounts / read-only).
const BACKUP_RCS: &str = r#"#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -o remount,rw / || echo "rcS: cannot remount / read-write"
mount -t tmpfs -o mode=0755 tmpfs /run
. /etc/vmharness/lib.sh
for m in virtio_console qemu_fw_cfg; do modprobe "$m" || echo "rcS: modprobe $m failed"; done
vm_name_ports vmharness.status 50 || echo "rcS: no vmharness.status port"
job=/sys/firmware/qemu_fw_cfg/by_name/opt/vm/script/raw
i=0
while [ ! -r "$job" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
cat "$job" >/run/job || echo 'echo "rcS: no job in fw_cfg"; exit 3' >/run/job
cd /root && sh /run/job </dev/null
rc=$?
accel=tcg
grep -q kvm-clock /sys/devices/system/clocksource/clocksource0/available_clocksource && accel=kvm
read -r up _ </proc/uptime
echo "rc=$rc uptime=$up accel=$accel" >/dev/virtio-ports/vmharness.status
echo "rcS: job exit status $rc"
poweroff
"#;

/// The job the backup's init runs on the booted disk: prove it is the disk, check the
/// point's files with its own tools, write, sync.
const GUEST_JOB: &str = r#"
set -eu
fail() { echo "FAIL: $*"; dmesg | tail -20; exit 1; }
grep -q '^/dev/vda / ext4 rw' /proc/mounts || fail "/ is not /dev/vda read-write: $(cat /proc/mounts)"
[ ! -e /boot-disk ] || fail "still on the initramfs"
[ "$(stat -L -c %d:%i /proc/1/exe)" = "$(stat -c %d:%i /bin/busybox)" ]   || fail "PID 1 is not the disk's busybox"
echo "BOOTED pid1=$(tr '\0' ' ' </proc/1/cmdline | awk '{print $1}') exe=$(readlink /proc/1/exe) root=$(awk '$2 == "/" {print $1 "," $3}' /proc/mounts)"
echo "TUESDAY $(cat /etc/tuesday)"
cd / && sha256sum -c -s /etc/backup.sums || fail "files of the point do not match their sums"
echo "SUMS-OK $(wc -l </etc/backup.sums) files checked by the point's own sha256sum"
head -c 1048576 /dev/urandom >/root/guest.bin
echo "made by $(readlink -f /bin/sh) on the booted backup" >/root/booted.txt
echo "GUEST-SUM $(sha256sum </root/guest.bin | cut -d' ' -f1)"
sync
"#;

fn sh(command: &mut Command) -> String {
    run_ok_within(command, LIMIT).unwrap_or_else(|err| panic!("{command:?}: {err:#}"))
}

/// `sh -c SCRIPT` run in `dir`; its stdout.
fn shell_in(dir: &Path, script: &str) -> String {
    sh(Command::new("sh").arg("-c").arg(script).current_dir(dir))
}

/// `debugfs -R "dump PATH OUT"` from the ext4 image `image`; the file's bytes, or None
/// when the filesystem has no such file.
fn dump(image: &Path, path: &str, out: &Path) -> Option<Vec<u8>> {
    let _ = std::fs::remove_file(out);
    sh(Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump {path} {}", out.display()))
        .arg(image));
    std::fs::read(out).ok()
}

/// The whole disk behind an NBD `uri` copied to `out` with nbdcopy.
fn copy_out(uri: &str, out: &Path) {
    sh(Command::new("nbdcopy").arg(uri).arg(out));
}

/// Monday's image: the harness's initramfs tree on ext4. Tuesday's: the same with
/// /etc/tuesday and /etc/backup.sums (a sha256 line for every file of the point). Returns
/// (mon.img, tue.img).
fn root_images(build: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    let tree = dir.join("tree");
    std::fs::create_dir(&tree).unwrap();
    let initramfs = build.join("initramfs.cpio.gz");
    shell_in(
        &tree,
        &format!("zcat '{}' | cpio -idm --quiet", initramfs.display()),
    );
    assert!(
        tree.join("bin/busybox").exists(),
        "the initramfs has no bin/busybox"
    );
    let mon = dir.join("mon.img");
    std::fs::File::create(&mon)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    sh(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&mon));

    // Tuesday: a marker and the busybox-init boot; its sums cover every file but themselves.
    std::fs::write(tree.join("etc/tuesday"), "tuesday\n").unwrap();
    std::fs::write(tree.join("etc/inittab"), BACKUP_INITTAB).unwrap();
    std::fs::create_dir_all(tree.join("etc/init.d")).unwrap();
    let rcs = tree.join("etc/init.d/rcS");
    std::fs::write(&rcs, BACKUP_RCS).unwrap();
    std::fs::set_permissions(&rcs, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sums = dir.join("backup.sums");
    let list = shell_in(
        &tree,
        "find . -type f -print0 | sort -z | xargs -0 sha256sum",
    );
    std::fs::write(&sums, &list).unwrap();
    assert!(list.lines().count() > 20, "a small tree: {list}");
    let tue = dir.join("tue.img");
    std::fs::copy(&mon, &tue).unwrap();
    let commands = dir.join("debugfs.cmd");
    std::fs::write(
        &commands,
        format!(
            "cd /etc\nwrite {} tuesday\nwrite {} inittab\nmkdir init.d\n\
             write {} init.d/rcS\nwrite {} backup.sums\n",
            tree.join("etc/tuesday").display(),
            tree.join("etc/inittab").display(),
            rcs.display(),
            sums.display()
        ),
    )
    .unwrap();
    sh(Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&commands)
        .arg(&tue));
    std::fs::remove_dir_all(&tree).unwrap();
    (mon, tue)
}

/// A boot build in `dir/boot`: the harness's kernel, and its initramfs with the disk-boot
/// stage ([`BOOT_STAGE`] as /boot-disk) appended as a second cpio archive (the kernel
/// unpacks concatenated archives in order).
fn boot_build(build: &Path, dir: &Path) -> PathBuf {
    let stage = dir.join("stage");
    std::fs::create_dir(&stage).unwrap();
    let script = stage.join("boot-disk");
    std::fs::write(&script, BOOT_STAGE).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let archive = dir.join("stage.cpio.gz");
    shell_in(
        &stage,
        &format!(
            "find . -mindepth 1 | cpio -o -H newc -R 0:0 --quiet | gzip -n >'{}'",
            archive.display()
        ),
    );
    let boot = dir.join("boot");
    std::fs::create_dir(&boot).unwrap();
    std::os::unix::fs::symlink(build.join("vmlinuz"), boot.join("vmlinuz")).unwrap();
    let mut initramfs = std::fs::read(build.join("initramfs.cpio.gz")).unwrap();
    initramfs.extend(std::fs::read(&archive).unwrap());
    std::fs::write(boot.join("initramfs.cpio.gz"), initramfs).unwrap();
    boot
}

#[test]
fn a_vm_boots_from_an_overlay_export_of_a_backup_which_stays_untouched() {
    let harness = harness().expect("the VM harness");
    let build = vm_build(&harness).expect("the VM build");
    let dir = scratch();
    let boot = boot_build(&build, dir.path());
    let (mon, tue) = root_images(&build, dir.path());
    // The point: Monday's image (the base) and Tuesday's incremental delta from it.
    let delta = dir.path().join("tue.delta");
    let changed = changed_blocks(&mon, &tue);
    assert!(!changed.is_empty(), "Tuesday changed nothing");
    incremental_delta(&tue, &changed, "mon", 1, "tue", &delta);
    let backup = [mon.clone(), delta.clone()];
    let before: Vec<Vec<u8>> = backup.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let chain = ["--chain".to_string(), arg(&mon), arg(&delta)];
    let chain: Vec<&str> = chain.iter().map(String::as_str).collect();
    let overlay = arg(&dir.path().join("vm.overlay"));

    let served = export_args(dir.path(), &chain, &["--overlay", &overlay]).unwrap();
    let vm = run(
        Command::new(harness.join("run-vm.sh"))
            // no_timer_check: a TCG guest on a loaded host can fail the kernel's IO-APIC
            // timer check and panic at boot.
            // rdinit: the disk-boot stage instead of the harness's /init; root: the
            // export, which run-vm.sh gives QEMU as -drive file=nbd+unix:///...
            .args(["-q", "-t", "300", "-a"])
            .arg("no_timer_check rdinit=/boot-disk root=/dev/vda rootfstype=ext4")
            .arg("-b")
            .arg(&boot)
            .arg("-d")
            .arg(&served.uri)
            .arg("-e")
            .arg(GUEST_JOB),
        Duration::from_secs(330),
    )
    .unwrap();
    assert!(
        vm.status.success()
            && vm.stdout.contains("switch_root to its /sbin/init")
            && vm
                .stdout
                .contains("BOOTED pid1=init exe=/bin/busybox root=/dev/vda,ext4")
            && vm.stdout.contains("TUESDAY tuesday")
            && vm.stdout.contains("SUMS-OK")
            && vm.stdout.contains("Requesting system poweroff"),
        "the guest: {vm:?}"
    );
    let guest_sum = vm
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("GUEST-SUM "))
        .expect("the guest's checksum line")
        .trim()
        .to_string();
    served.terminate().unwrap();
    for (file, bytes) in backup.iter().zip(&before) {
        assert!(
            std::fs::read(file).unwrap() == *bytes,
            "{} changed",
            file.display()
        );
    }

    // Served again over the same overlay: the guest's files are there, and the filesystem
    // is clean.
    let again = export_args(dir.path(), &chain, &["--overlay", &overlay]).unwrap();
    let after = dir.path().join("after.img");
    copy_out(&again.uri, &after);
    again.terminate().unwrap();
    sh(Command::new("e2fsck").arg("-fn").arg(&after));
    let out = dir.path().join("dumped");
    let written = dump(&after, "/root/guest.bin", &out).expect("the guest's file");
    assert_eq!(written.len(), 1 << 20, "the guest wrote 1 MiB");
    let sum = sh(Command::new("sha256sum").arg(&out));
    assert!(
        sum.starts_with(&guest_sum),
        "the guest wrote {guest_sum}, the overlay holds {sum}"
    );
    let booted = dump(&after, "/root/booted.txt", &out).expect("the booted guest's file");
    assert_eq!(
        String::from_utf8_lossy(&booted),
        "made by /bin/busybox on the booted backup\n"
    );
    // The point itself, without the overlay: Tuesday's files, none of the guest's.
    let plain = export_args(dir.path(), &chain, &[]).unwrap();
    let point = dir.path().join("point.img");
    copy_out(&plain.uri, &point);
    plain.terminate().unwrap();
    assert!(
        std::fs::read(&point).unwrap() == std::fs::read(&tue).unwrap(),
        "the chain without the overlay no longer reads as Tuesday's image"
    );
    assert_eq!(dump(&point, "/root/guest.bin", &out), None);
    eprintln!(
        "a TCG guest booted from the overlay export of mon.img + tue.delta ({} changed \
         extents): {}",
        changed.len(),
        vm.stdout
            .lines()
            .filter(|l| ["BOOTED", "SUMS-OK", "GUEST-SUM"]
                .iter()
                .any(|p| l.starts_with(p)))
            .collect::<Vec<_>>()
            .join("; ")
    );
}
