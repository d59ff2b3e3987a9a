//! FUSE + loop against the real kernel: a file-backed export attached as /dev/loopN, read
//! and written with O_DIRECT, carrying ext4, trimmed, attached read-only, detached while
//! busy. Needs root and /dev/fuse (they fail otherwise, saying so); every external command
//! runs under a time limit. The cleanup after a killed server is tested end to end, with a
//! real daemon killed by -9, in tests/tests/attach_fuse.rs.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use tidemark_daemon::attach::fuse::{cleanup_stale, loop_backing_file, FuseLoop};
use tidemark_daemon::attach::{AttachError, Attached, FrontEnd, Via};
use tidemark_nbd::file::FileExport;

const MIB: u64 = 1 << 20;

/// These tests drive the real kernel: they need root, /dev/fuse and the loop driver.
fn require_kernel() {
    let root = fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let fuse = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .is_ok();
    assert!(
        root && fuse && Path::new("/dev/loop-control").exists(),
        "these tests need root, /dev/fuse (modprobe fuse) and /dev/loop-control (modprobe loop)"
    );
}

/// Run a command with a time limit; its output, or a panic naming it.
fn run(args: &[&str]) -> String {
    let out = Command::new("timeout")
        .arg("120")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A sparse backing file, an export of it and a place for FUSE mounts.
struct Setup {
    dir: tempfile::TempDir,
    backing: PathBuf,
}

impl Setup {
    fn new(size: u64) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing.img");
        File::create(&backing).unwrap().set_len(size).unwrap();
        Setup { dir, backing }
    }

    fn front_end(&self) -> FuseLoop {
        FuseLoop::new(self.dir.path().join("attach"))
    }

    fn attach(&self, read_only: bool) -> Guard {
        let export = Arc::new(FileExport::open(&self.backing, false).unwrap());
        let attached = self.front_end().attach("vol", export, read_only).unwrap();
        Guard {
            attached,
            mounted: Vec::new(),
        }
    }
}

/// Detaches (and unmounts what a test mounted) however the test ends.
struct Guard {
    attached: Box<dyn Attached>,
    mounted: Vec<PathBuf>,
}

impl Guard {
    fn device(&self) -> PathBuf {
        self.attached.record().device
    }

    fn mount(&mut self, at: &Path) {
        fs::create_dir_all(at).unwrap();
        run(&[
            "mount",
            self.device().to_str().unwrap(),
            at.to_str().unwrap(),
        ]);
        self.mounted.push(at.to_path_buf());
    }

    fn umount(&mut self) {
        for at in self.mounted.drain(..) {
            run(&["umount", at.to_str().unwrap()]);
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        for at in self.mounted.drain(..) {
            let _ = Command::new("umount").arg("-l").arg(&at).status();
        }
        if let Err(err) = self.attached.detach() {
            eprintln!("detach in cleanup: {err}");
            let _ = cleanup_stale(&self.attached.record());
        }
    }
}

/// A 4 KiB-aligned buffer of `len` bytes inside `storage`, for O_DIRECT.
fn aligned(storage: &mut Vec<u8>, len: usize) -> &mut [u8] {
    storage.resize(len + 4096, 0);
    let at = storage.as_ptr().align_offset(4096);
    &mut storage[at..at + len]
}

fn open_direct(device: &Path, write: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(device)
}

/// Allocated bytes of a file.
fn allocated(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn direct_io_through_the_loop_device_reaches_the_backing_file() {
    require_kernel();
    let setup = Setup::new(64 * MIB);
    let guard = setup.attach(false);
    let record = guard.attached.record();
    assert_eq!(record.via(), Via::Fuse);
    assert!(loop_backing_file(&record.device).is_some());
    let name = record.device.file_name().unwrap().to_str().unwrap();
    let sysfs = |file: &str| fs::read_to_string(format!("/sys/block/{name}/{file}")).unwrap();
    assert_eq!(
        sysfs("loop/dio").trim(),
        "1",
        "the loop device uses direct I/O"
    );
    assert_eq!(sysfs("queue/logical_block_size").trim(), "4096");

    let device = open_direct(&guard.device(), true).unwrap();
    let mut storage = Vec::new();
    let buf = aligned(&mut storage, MIB as usize);
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    device.write_all_at(buf, 3 * MIB).unwrap();
    device.sync_all().unwrap();
    let mut back = vec![0u8; MIB as usize];
    File::open(&setup.backing)
        .unwrap()
        .read_exact_at(&mut back, 3 * MIB)
        .unwrap();
    assert!(back == *buf, "the backing file holds what was written");

    let mut storage2 = Vec::new();
    let read = aligned(&mut storage2, MIB as usize);
    device.read_exact_at(read, 3 * MIB).unwrap();
    assert!(read == &back[..], "the device reads back what it wrote");

    let io = guard.attached.record().io;
    assert!(
        io.write_bytes >= MIB && io.read_bytes >= MIB && io.flushes >= 1,
        "{io:?}"
    );
    // Big requests reach the export whole, not in 4 KiB or 128 KiB pieces.
    assert!(io.writes <= 4 && io.reads <= 4, "{io:?}");
}

#[test]
fn ext4_lives_on_the_device_and_fstrim_punches_the_backing() {
    require_kernel();
    let setup = Setup::new(256 * MIB);
    let mut guard = setup.attach(false);
    let device = guard.device();
    run(&["mkfs.ext4", "-q", "-F", device.to_str().unwrap()]);
    let mnt = setup.dir.path().join("mnt");
    guard.mount(&mnt);
    for i in 0..200 {
        fs::write(mnt.join(format!("small-{i}")), format!("file {i}\n")).unwrap();
    }
    let big: Vec<u8> = (0..64 * MIB as usize)
        .map(|i| (i * 7 % 256) as u8)
        .collect();
    let mut file = File::create(mnt.join("big")).unwrap();
    file.write_all(&big).unwrap();
    file.sync_all().unwrap();
    drop(file);
    run(&["sync", "-f", mnt.to_str().unwrap()]);
    let before = allocated(&setup.backing);
    assert!(
        before >= 64 * MIB,
        "the big file is in the backing ({before})"
    );

    let err = guard.attached.detach().unwrap_err();
    assert!(matches!(err, AttachError::Busy { .. }), "{err}");
    assert!(err.to_string().contains("unmount it first"), "{err}");

    fs::remove_file(mnt.join("big")).unwrap();
    // ext4 trims only blocks whose freeing is committed.
    run(&["sync", "-f", mnt.to_str().unwrap()]);
    run(&["fstrim", mnt.to_str().unwrap()]);
    let after = allocated(&setup.backing);
    assert!(
        after + 60 * MIB <= before,
        "fstrim released the big file's blocks in the backing ({before} -> {after})"
    );
    assert!(guard.attached.record().io.discards > 0);

    guard.umount();
    guard.attached.detach().unwrap();
    assert!(!mnt.join("small-0").exists());
    // The filesystem is whole in the backing file itself.
    run(&["e2fsck", "-fn", setup.backing.to_str().unwrap()]);
    let text = run(&[
        "debugfs",
        "-R",
        "cat /small-137",
        setup.backing.to_str().unwrap(),
    ]);
    assert_eq!(text, "file 137\n");
}

#[test]
fn a_read_only_attachment_refuses_writes() {
    require_kernel();
    let setup = Setup::new(16 * MIB);
    fs::write(&setup.backing, vec![5u8; 16 * MIB as usize]).unwrap();
    let guard = setup.attach(true);
    let record = guard.attached.record();
    assert!(record.read_only);
    let device = guard.device();
    let ro = run(&["blockdev", "--getro", device.to_str().unwrap()]);
    assert_eq!(ro.trim(), "1");
    let err = open_direct(&device, true)
        .and_then(|f| f.write_all_at(&[0u8; 4096], 0))
        .unwrap_err();
    let code = err.raw_os_error();
    assert!(
        matches!(
            code,
            Some(libc::EROFS) | Some(libc::EPERM) | Some(libc::EACCES)
        ),
        "{err}"
    );
    let mut storage = Vec::new();
    let buf = aligned(&mut storage, 4096);
    open_direct(&device, false)
        .unwrap()
        .read_exact_at(buf, 8192)
        .unwrap();
    assert!(buf.iter().all(|&b| b == 5));
    let mut backing = File::open(&setup.backing).unwrap();
    backing.seek(SeekFrom::Start(0)).unwrap();
    let mut first = [0u8; 4096];
    backing.read_exact(&mut first).unwrap();
    assert!(first.iter().all(|&b| b == 5), "the backing is untouched");
}
