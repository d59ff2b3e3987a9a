//! `tidemark export --chain`: a restore point (base + 3 deltas) served without copying it
//! reads exactly as the image `tidemark restore` writes (qemu-img compare, nbdcopy,
//! nbdinfo's base:allocation), a broken chain is refused naming the break, and with
//! `--overlay` writes (qemu-io) land in the overlay, survive a restart of the export and
//! leave every backup file untouched. A repository point (`--chain repo:URL VOLUME@C`, in a
//! directory and in SeaweedFS's S3) reads as `tidemark repo restore` of it (nbdcopy, cmp).

#![allow(clippy::single_range_in_vec_init)] // extents really are lists of ranges

use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tidemark_tests::export::{export_args, export_args_env, Exported};
use tidemark_tests::image::{cmp_equal, random_extents, random_image, scribble, Image, MIB};
use tidemark_tests::paths::{arg, scratch};
use tidemark_tests::peers::{nbdinfo_map, qemu_io};
use tidemark_tests::point::{full_delta, incremental_delta, repo_point_at};
use tidemark_tests::seaweed::Seaweed;
use tidemark_tests::{run, tidemark, tidemark_env, COMMAND_LIMIT};

const SIZE: u64 = 64 * MIB;
/// Zeroed on Thursday: a zero extent of the newest delta, over Monday's data.
const ZEROED: Range<u64> = 4 * MIB..6 * MIB;

/// A volume backed up on Monday (image and full delta) and after Tuesday, Wednesday and
/// Thursday (incremental deltas); `vol` ends as Thursday's image.
struct Point {
    dir: tempfile::TempDir,
}

impl Point {
    fn new() -> Point {
        let dir = scratch();
        let point = Point { dir };
        let vol = point.path("vol");
        random_image(
            &arg(&vol),
            SIZE,
            &[0..20 * MIB, 40 * MIB..48 * MIB],
            &[],
            100,
        );
        std::fs::copy(&vol, point.path("mon.img")).unwrap();
        full_delta(&vol, "mon", &point.path("mon.delta"));
        let days = [
            ("tue", "mon", 1, 200),
            ("wed", "tue", 2, 300),
            ("thu", "wed", 3, 400),
        ];
        for (day, from, generation, seed) in days {
            let mut changed = random_extents(SIZE, 30, seed);
            scribble(&arg(&vol), &changed, seed + 1);
            if day == "thu" {
                Image::open(&vol).unwrap().zeros(&[ZEROED]).unwrap();
                changed.push(ZEROED);
            }
            let out = point.path(&format!("{day}.delta"));
            incremental_delta(&vol, &changed, from, generation, day, &out);
        }
        point
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn p(&self, name: &str) -> String {
        arg(&self.path(name))
    }

    /// `--chain BASE tue.delta wed.delta thu.delta`.
    fn chain(&self, base: &str) -> Vec<String> {
        let mut args = vec!["--chain".to_string(), self.p(base)];
        args.extend(["tue", "wed", "thu"].map(|d| self.p(&format!("{d}.delta"))));
        args
    }

    fn export(&self, base: &str, extra: &[&str]) -> Exported {
        let chain = self.chain(base);
        let chain: Vec<&str> = chain.iter().map(String::as_str).collect();
        export_args(self.dir.path(), &chain, extra).expect("tidemark export --chain starts")
    }

    /// `nbdcopy URI FILE` of the whole export.
    fn copy_out(&self, uri: &str, name: &str) -> PathBuf {
        let out = self.path(name);
        run(
            Command::new("nbdcopy").arg(uri).arg(&out),
            Duration::from_secs(60),
        )
        .unwrap()
        .ok();
        out
    }

    /// Every backup file's bytes.
    fn backups(&self) -> Vec<(String, Vec<u8>)> {
        [
            "mon.img",
            "mon.delta",
            "tue.delta",
            "wed.delta",
            "thu.delta",
        ]
        .iter()
        .map(|name| (name.to_string(), std::fs::read(self.path(name)).unwrap()))
        .collect()
    }
}

#[test]
fn a_served_chain_reads_as_the_restored_image() {
    let point = Point::new();
    let flat = point.p("flat.img");
    let mut restore = vec!["restore", "--into", &flat];
    let chain = point.chain("mon.img");
    restore.extend(chain[1..].iter().map(String::as_str));
    tidemark(&restore, COMMAND_LIMIT).ok();
    assert!(cmp_equal(&flat, point.path("vol"), None).unwrap());

    let served = point.export("mon.img", &[]);
    let compare = run(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&served.uri)
            .arg(&flat),
        Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(compare.code(), 0, "qemu-img compare: {compare:?}");
    let copied = point.copy_out(&served.uri, "copied.img");
    assert!(cmp_equal(&copied, &flat, None).unwrap());

    // base:allocation: what it calls zero reads as zero, and Thursday's zero extent is one.
    let map = nbdinfo_map(&served.uri, "base:allocation").unwrap();
    let image = std::fs::File::open(&flat).unwrap();
    let mut zeroed = 0;
    for &(offset, length, flags) in &map {
        if flags & 2 == 0 {
            continue;
        }
        let mut bytes = vec![0u8; length as usize];
        image.read_exact_at(&mut bytes, offset).unwrap();
        assert!(
            bytes.iter().all(|b| *b == 0),
            "{offset}+{length} is reported zero but holds data"
        );
        let start = offset.max(ZEROED.start);
        let end = (offset + length).min(ZEROED.end);
        zeroed += end.saturating_sub(start);
    }
    assert_eq!(zeroed, ZEROED.end - ZEROED.start, "map: {map:?}");
    assert_eq!(map.iter().map(|r| r.1).sum::<u64>(), SIZE);

    // Read-only: a write is refused.
    let write = run(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write 0 4096"])
            .arg(&served.uri),
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(
        !write.status.success() || write.stdout.contains("failed"),
        "{write:?}"
    );
    served.terminate().unwrap();
}

/// Thursday's image stored as the point vol@thu of the repository at `url` (a directory or
/// s3://, every command run with `env`), served with `export --chain repo:URL vol@thu`:
/// it reads as `repo restore` of the point (nbdcopy, cmp), its zeroed range is a hole, and
/// an overlay over it is refused saying what to do.
fn a_served_repository_point_reads_as_repo_restore(
    point: &Point,
    url: &str,
    env: &[(&str, String)],
) {
    let repo = repo_point_at(&point.path("vol"), point.dir.path(), url, "vol@thu", env);
    let restored = point.p("restored.img");
    tidemark_env(
        &["repo", "restore", url, "vol@thu", "--into", &restored],
        env,
        COMMAND_LIMIT,
    )
    .ok();
    let served = export_args_env(point.dir.path(), &["--chain", &repo, "vol@thu"], &[], env)
        .expect("tidemark export --chain repo:URL POINT starts");
    let copied = point.copy_out(&served.uri, "copied.img");
    assert!(cmp_equal(&copied, point.path("restored.img"), None).unwrap());
    assert!(cmp_equal(&copied, point.path("vol"), None).unwrap());
    // Thursday's zeroed range is a hole of the point.
    let map = nbdinfo_map(&served.uri, "base:allocation").unwrap();
    let zeroed: u64 = map
        .iter()
        .filter(|&&(_, _, flags)| flags & 2 != 0)
        .map(|&(o, l, _)| (o + l).min(ZEROED.end).saturating_sub(o.max(ZEROED.start)))
        .sum();
    assert_eq!(zeroed, ZEROED.end - ZEROED.start, "{map:?}");
    served.terminate().unwrap();
    // No overlay over a repository point: it says what to do instead.
    let overlay = tidemark_env(
        &[
            "export",
            "--chain",
            &repo,
            "vol@thu",
            "--overlay",
            &point.p("o.overlay"),
            "--socket",
            &point.p("o.sock"),
        ],
        env,
        COMMAND_LIMIT,
    );
    assert_eq!(overlay.code(), 2, "{overlay:?}");
    assert!(overlay.stderr.contains("repo restore"), "{overlay:?}");
}

#[test]
fn a_served_repository_point_reads_as_repo_restore_of_it() {
    let point = Point::new();
    let url = point.p("repo");
    a_served_repository_point_reads_as_repo_restore(&point, &url, &[]);
}

#[test]
fn a_served_s3_repository_point_reads_as_repo_restore_of_it() {
    let seaweed = Seaweed::start();
    let point = Point::new();
    a_served_repository_point_reads_as_repo_restore(&point, "s3://bkt/chain", &seaweed.env());
}

#[test]
fn a_chain_from_a_full_delta_reads_as_the_volume() {
    let point = Point::new();
    let served = point.export("mon.delta", &[]);
    let copied = point.copy_out(&served.uri, "copied.img");
    assert!(cmp_equal(&copied, point.path("vol"), None).unwrap());
    served.terminate().unwrap();
}

#[test]
fn a_broken_chain_is_refused_naming_the_link() {
    let point = Point::new();
    let socket = point.path("broken.sock");
    let out = tidemark(
        &[
            "export",
            "--chain",
            &point.p("mon.img"),
            &point.p("tue.delta"),
            &point.p("thu.delta"),
            "--socket",
            &arg(&socket),
        ],
        COMMAND_LIMIT,
    );
    assert_eq!(out.code(), 2, "{out:?}");
    assert!(
        out.stderr.contains("chain break")
            && out.stderr.contains("tue.delta")
            && out.stderr.contains("thu.delta"),
        "{out:?}"
    );
    assert!(!socket.exists(), "nothing listens for a refused chain");
}

#[test]
fn overlay_writes_persist_and_leave_the_backup_files_untouched() {
    let point = Point::new();
    let before = point.backups();
    let overlay = point.p("vm1.overlay");
    let served = point.export("mon.img", &["--overlay", &overlay]);
    let writes = [
        "write -P 0xa5 1048576 65536".to_string(),
        // Partial blocks: the rest of each block keeps the point's bytes.
        "write -P 0x5a 3000 1000".to_string(),
        "write -P 0x3c 21000000 70000".to_string(),
        "write -z 8388608 1048576".to_string(),
    ];
    qemu_io(&served.uri, &writes);
    qemu_io(
        &served.uri,
        &[
            "read -P 0xa5 1048576 65536".to_string(),
            "read -P 0x5a 3000 1000".to_string(),
            "read -P 0x3c 21000000 70000".to_string(),
            "read -P 0 8388608 1048576".to_string(),
        ],
    );
    // The model: Thursday's volume with the same writes.
    let model = point.path("model.img");
    std::fs::copy(point.path("vol"), &model).unwrap();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&model)
        .unwrap();
    for (byte, offset, len) in [
        (0xa5u8, 1048576u64, 65536usize),
        (0x5a, 3000, 1000),
        (0x3c, 21000000, 70000),
        (0, 8388608, 1048576),
    ] {
        file.write_all_at(&vec![byte; len], offset).unwrap();
    }
    let copied = point.copy_out(&served.uri, "copied.img");
    assert!(cmp_equal(&copied, &model, None).unwrap());
    served.terminate().unwrap();

    // Served again over the same overlay: the writes are still there.
    let again = point.export("mon.img", &["--overlay", &overlay]);
    let copied = point.copy_out(&again.uri, "copied2.img");
    assert!(cmp_equal(&copied, &model, None).unwrap());
    again.terminate().unwrap();
    for ((name, bytes), (_, now)) in before.iter().zip(point.backups()) {
        assert!(*bytes == now, "{name} changed");
    }

    // The overlay belongs to Thursday's point: not to Tuesday's.
    let socket = point.path("other.sock");
    let out = tidemark(
        &[
            "export",
            "--chain",
            &point.p("mon.img"),
            &point.p("tue.delta"),
            "--overlay",
            &overlay,
            "--socket",
            &arg(&socket),
        ],
        COMMAND_LIMIT,
    );
    assert_eq!(out.code(), 2, "{out:?}");
    assert!(
        out.stderr.contains("overlay") && out.stderr.contains("\"thu\""),
        "{out:?}"
    );
}

/// The guest: mount the restored disk, check Monday's file, write a new one, unmount,
/// check the filesystem and report.
const GUEST_SCRIPT: &str = r#"
set -e
mount -t ext4 /dev/vda /mnt
echo "MONDAY $(cat /mnt/a.txt)"
echo "written in the vm" > /mnt/vm.txt
sync
umount /mnt
fsck.ext4 -fn /dev/vda >/dev/null
echo "FSCK OK"
"#;

#[test]
fn a_vm_runs_on_an_overlay_export_of_a_backup_and_the_backup_stays_untouched() {
    use tidemark_tests::vm::{harness, vm_build};
    let harness = harness().expect("the VM harness");
    let build = vm_build(&harness).expect("the VM build");
    let dir = scratch();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("a.txt"), "monday\n").unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&src)
            .arg(&disk),
        Duration::from_secs(60),
    )
    .unwrap()
    .ok();
    let backup = dir.path().join("mon.delta");
    full_delta(&disk, "mon", &backup);
    std::fs::remove_file(&disk).unwrap();
    let before = std::fs::read(&backup).unwrap();

    let overlay = arg(&dir.path().join("disk.overlay"));
    let served = export_args(
        dir.path(),
        &["--chain", &arg(&backup)],
        &["--overlay", &overlay],
    )
    .unwrap();
    let vm = run(
        Command::new(harness.join("run-vm.sh"))
            .args(["-q", "-a", "no_timer_check", "-t", "300", "-b"])
            .arg(&build)
            .arg("-d")
            .arg(&served.uri)
            .arg("-e")
            .arg(GUEST_SCRIPT),
        Duration::from_secs(330),
    )
    .unwrap();
    assert!(
        vm.status.success() && vm.stdout.contains("MONDAY monday") && vm.stdout.contains("FSCK OK"),
        "the guest: {vm:?}"
    );
    served.terminate().unwrap();
    assert!(
        std::fs::read(&backup).unwrap() == before,
        "the backup changed"
    );

    // The guest's file is in the overlay: served again, a copy of the disk holds it.
    let again = export_args(
        dir.path(),
        &["--chain", &arg(&backup)],
        &["--overlay", &overlay],
    )
    .unwrap();
    let copy = dir.path().join("after.img");
    run(
        Command::new("nbdcopy").arg(&again.uri).arg(&copy),
        Duration::from_secs(60),
    )
    .unwrap()
    .ok();
    again.terminate().unwrap();
    let cat = run(
        Command::new("debugfs")
            .args(["-R", "cat /vm.txt"])
            .arg(&copy),
        Duration::from_secs(30),
    )
    .unwrap()
    .ok();
    assert!(cat.stdout.contains("written in the vm"), "{cat:?}");
}
