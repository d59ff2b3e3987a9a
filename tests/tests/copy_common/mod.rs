//! Shared by the copy_* end-to-end tests: run the real binary with a time limit, make
//! sparse images with known contents, compare with `cmp`, attach loop devices.
#![allow(dead_code)]

use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};

pub const MIB: u64 = 1 << 20;

/// The tidemark binary: `TIDEMARK_BIN`, else the debug build of this workspace.
pub fn bin() -> PathBuf {
    let path = std::env::var_os("TIDEMARK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/tidemark"));
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p tidemark` first",
        path.display()
    );
    path
}

/// What a finished command said.
#[derive(Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|err| panic!("stdout is not one JSON line ({err}): {self:?}"))
    }

    pub fn ok(self) -> Output {
        assert_eq!(self.code, 0, "command failed: {self:?}");
        self
    }
}

/// A child that is killed when dropped, so a failing test never leaves it running.
pub struct Guard(pub Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Run `tidemark ARGS` (stdin from `input` when given), at most 120 s.
pub fn tidemark(args: &[&str], input: Option<&[u8]>) -> Output {
    let mut command = Command::new(bin());
    command
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = command.spawn().expect("tidemark starts");
    if let Some(input) = input {
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(input)
            .expect("stdin accepts the list");
    }
    let mut guard = Guard(Some(child));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let child = guard.0.as_mut().expect("child present");
        if child.try_wait().expect("wait works").is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tidemark {args:?} ran for more than 120 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = guard
        .0
        .take()
        .expect("child present")
        .wait_with_output()
        .expect("output");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A scratch directory on the main disk (O_DIRECT, SEEK_HOLE and punching work there).
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tidemark-copy-")
        .tempdir_in("/var/tmp")
        .expect("scratch dir")
}

pub fn p(dir: &tempfile::TempDir, name: &str) -> String {
    dir.path().join(name).display().to_string()
}

/// A sparse image of `size` bytes: random data in `data`, written zeros in `zeros`,
/// holes elsewhere.
pub fn make_image(path: &str, size: u64, data: &[Range<u64>], zeros: &[Range<u64>], seed: u64) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let file = std::fs::File::create(path).expect("create image");
    file.set_len(size).expect("size image");
    for range in data {
        let mut bytes = vec![0u8; (range.end - range.start) as usize];
        rng.fill_bytes(&mut bytes);
        file.write_all_at(&bytes, range.start).expect("write data");
    }
    for range in zeros {
        file.write_all_at(&vec![0u8; (range.end - range.start) as usize], range.start)
            .expect("write zeros");
    }
}

/// Overwrite `ranges` of the file with new random bytes.
pub fn scribble(path: &str, ranges: &[Range<u64>], seed: u64) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for scribbling");
    for range in ranges {
        let mut bytes = vec![0u8; (range.end - range.start) as usize];
        rng.fill_bytes(&mut bytes);
        file.write_all_at(&bytes, range.start).expect("scribble");
    }
}

/// Whether `cmp` finds the files identical (optionally only the first `limit` bytes).
pub fn same(a: &str, b: &str, limit: Option<u64>) -> bool {
    let mut command = Command::new("cmp");
    if let Some(limit) = limit {
        command.arg("-n").arg(limit.to_string());
    }
    let out = command.arg(a).arg(b).output().expect("cmp runs");
    if !out.status.success() {
        eprintln!(
            "cmp: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out.status.success()
}

/// Bytes allocated on disk.
pub fn allocated(path: &str) -> u64 {
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// A loop device over a backing file, detached on drop.
pub struct LoopDevice {
    pub device: String,
}

impl LoopDevice {
    pub fn attach(backing: &str) -> LoopDevice {
        let out = Command::new("losetup")
            .args(["--find", "--show", backing])
            .output()
            .expect("losetup runs");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDevice {
            device: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// 64 KiB-aligned random extents of 1..=4 blocks inside `size`, `count` of them.
pub fn random_extents(size: u64, count: usize, seed: u64) -> Vec<Range<u64>> {
    use rand::Rng;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let blocks = size / 65536;
    (0..count)
        .map(|_| {
            let start = rng.gen_range(0..blocks) * 65536;
            let len = (rng.gen_range(1..=4u64) * 65536).min(size - start);
            start..start + len
        })
        .collect()
}

/// The text-list form of `extents`.
pub fn text_list(extents: &[Range<u64>]) -> String {
    extents
        .iter()
        .map(|r| format!("{} {}\n", r.start, r.end - r.start))
        .collect()
}
