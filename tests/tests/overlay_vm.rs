//! A VM on an `--overlay` export of a backup (issue 17's instant recovery): the backup is
//! a small root filesystem (the VM harness's own initramfs tree, busybox and its
//! libraries, on ext4) as Monday's image plus Tuesday's incremental delta. The guest
//! (../shared/vm) gets `tidemark export --chain mon.img tue.delta --overlay OVL` as its
//! disk, mounts it, chroots into it and lets the backup's own busybox check every file of
//! the point against its sums, writes new files (one from inside the chroot), syncs and
//! powers off. Afterwards the backup files are byte-for-byte unchanged, a second export
//! over the same overlay shows the guest's files, and the chain without the overlay does
//! not.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tidemark_tests::export::export_args;
use tidemark_tests::paths::{arg, scratch};
use tidemark_tests::point::{changed_blocks, incremental_delta};
use tidemark_tests::vm::{harness, vm_build};
use tidemark_tests::{run, run_ok_within, MIB};

const LIMIT: Duration = Duration::from_secs(60);

/// The guest: mount the point, check it with its own tools in a chroot, write, sync,
/// check the filesystem, report.
const GUEST_SCRIPT: &str = r#"
set -eu
fail() { echo "FAIL: $*"; dmesg | tail -20; exit 1; }
mount -t ext4 /dev/vda /mnt
echo "TUESDAY $(cat /mnt/etc/tuesday)"
# The backup's own busybox and libraries check every file the point lists.
chroot /mnt /bin/sh -c 'cd / && sha256sum -c -s /etc/backup.sums' \
  || fail "files of the point do not match their sums"
echo "CHROOT-OK $(chroot /mnt /bin/sh -c 'wc -l < /etc/backup.sums') files checked by the point's own sha256sum"
mkdir -p /mnt/root
head -c 1048576 /dev/urandom > /mnt/root/guest.bin
chroot /mnt /bin/sh -c 'echo "made by $(readlink -f /bin/sh) in the chroot" > /root/chroot.txt'
echo "GUEST-SUM $(sha256sum < /mnt/root/guest.bin | cut -d' ' -f1)"
sync
umount /mnt
fsck.ext4 -fn /dev/vda >/dev/null || fail "fsck.ext4 -fn /dev/vda"
echo "FSCK-OK"
"#;

fn sh(command: &mut Command) -> String {
    run_ok_within(command, LIMIT).unwrap_or_else(|err| panic!("{command:?}: {err:#}"))
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
    sh(Command::new("sh")
        .arg("-c")
        .arg(format!(
            "zcat '{}' | cpio -idm --quiet",
            initramfs.display()
        ))
        .current_dir(&tree));
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

    std::fs::write(tree.join("etc/tuesday"), "tuesday\n").unwrap();
    let sums = dir.join("backup.sums");
    let list = sh(Command::new("sh")
        .arg("-c")
        .arg("find . -type f -print0 | sort -z | xargs -0 sha256sum")
        .current_dir(&tree));
    std::fs::write(&sums, &list).unwrap();
    assert!(list.lines().count() > 20, "a small tree: {list}");
    let tue = dir.join("tue.img");
    std::fs::copy(&mon, &tue).unwrap();
    let commands = dir.join("debugfs.cmd");
    std::fs::write(
        &commands,
        format!(
            "cd /etc\nwrite {} tuesday\nwrite {} backup.sums\n",
            tree.join("etc/tuesday").display(),
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

#[test]
fn a_vm_mounts_and_chroots_into_an_overlay_export_of_a_backup_which_stays_untouched() {
    let harness = harness().expect("the VM harness");
    let build = vm_build(&harness).expect("the VM build");
    let dir = scratch();
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
            .args(["-q", "-t", "300", "-a", "no_timer_check", "-b"])
            .arg(&build)
            .arg("-d")
            .arg(&served.uri)
            .arg("-e")
            .arg(GUEST_SCRIPT),
        Duration::from_secs(330),
    )
    .unwrap();
    assert!(
        vm.status.success()
            && vm.stdout.contains("TUESDAY tuesday")
            && vm.stdout.contains("CHROOT-OK")
            && vm.stdout.contains("FSCK-OK"),
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
    let chrooted = dump(&after, "/root/chroot.txt", &out).expect("the chroot's file");
    assert_eq!(
        String::from_utf8_lossy(&chrooted),
        "made by /bin/busybox in the chroot\n"
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
        "a TCG guest on the overlay export of mon.img + tue.delta ({} changed extents): {}",
        changed.len(),
        vm.stdout
            .lines()
            .filter(|l| l.starts_with("CHROOT-OK") || l.starts_with("GUEST-SUM"))
            .collect::<Vec<_>>()
            .join("; ")
    );
}
