//! What the quiesce_* end-to-end tests share: a loop-mounted ext4 filesystem, a writer
//! that timestamps its writes, hook directories, and the quiesce-probe driver with the
//! real tidemark binary as its watchdog. Everything is torn down on drop, also when a
//! test fails half way.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use crate::{run_ok, tidemark_bin, ChildGuard};

/// An ext4 image in a temp dir, attached to a loop device and mounted.
#[derive(Debug)]
pub struct LoopFs {
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
    pub mountpoint: PathBuf,
    device: Option<String>,
    mounted: bool,
}

impl LoopFs {
    pub fn new(size_mib: u64) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tidemark-quiesce-")
            .tempdir()?;
        let image = dir.path().join("fs.img");
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint)?;
        std::fs::File::create(&image)?.set_len(size_mib << 20)?;
        run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image))?;
        let mut fs = LoopFs {
            dir,
            image,
            mountpoint,
            device: None,
            mounted: false,
        };
        let device = run_ok(
            Command::new("losetup")
                .args(["--find", "--show"])
                .arg(&fs.image),
        )?;
        fs.device = Some(device.trim().to_string());
        run_ok(
            Command::new("mount")
                .args(["-t", "ext4"])
                .arg(device.trim())
                .arg(&fs.mountpoint),
        )?;
        fs.mounted = true;
        Ok(fs)
    }

    /// Writes `name` with `data` and makes it durable (fsync), before any freeze.
    pub fn write_synced(&self, name: &str, data: &[u8]) -> Result<()> {
        let mut file = std::fs::File::create(self.mountpoint.join(name))?;
        file.write_all(data)?;
        file.sync_all()?;
        Ok(())
    }

    /// Whether a write to the filesystem completes within `limit` (a frozen filesystem
    /// blocks it). The probe runs in a child, so a blocked write never blocks the test.
    pub fn writable_within(&self, limit: Duration) -> Result<bool> {
        let target = self
            .mountpoint
            .join(format!("probe-{}", std::process::id()));
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("echo probe > '{}'", target.display()))
            .spawn()?;
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait()? {
                ensure!(status.success(), "probe write failed: {status}");
                return Ok(true);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                // A writer blocked on a frozen filesystem sleeps uninterruptibly until the
                // thaw; it is reaped by the thread so the test never waits on it.
                thread::spawn(move || child.wait());
                return Ok(false);
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        // Thaw first in case a test failed inside a freeze (EINVAL when not frozen).
        let _ = Command::new("fsfreeze")
            .arg("-u")
            .arg(&self.mountpoint)
            .stderr(Stdio::null())
            .status();
        // A filesystem just thawed (or a daemon just gone) can be busy for a moment:
        // retry for 5 s before a lazy unmount.
        if self.mounted {
            let unmounted = (0..50).any(|attempt| {
                if attempt > 0 {
                    thread::sleep(Duration::from_millis(100));
                }
                Command::new("umount")
                    .arg(&self.mountpoint)
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            });
            if !unmounted {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(&self.mountpoint)
                    .status();
            }
        }
        if let Some(device) = &self.device {
            let _ = Command::new("losetup").arg("-d").arg(device).status();
        }
    }
}

/// A process appending to a file on the filesystem every ~2 ms, recording when each
/// write returned, so the test can see exactly when writes were blocked.
#[derive(Debug)]
pub struct Writer {
    _child: ChildGuard,
    stamps: Arc<Mutex<Vec<Instant>>>,
}

impl Writer {
    pub fn start(dir: &Path) -> Result<Self> {
        let target = dir.join("writer.log");
        let script = format!(
            "import os, sys, time\n\
             fd = os.open('{}', os.O_WRONLY | os.O_CREAT | os.O_APPEND)\n\
             while True:\n\
             \x20   os.write(fd, b'x' * 4096)\n\
             \x20   sys.stdout.write('w\\n'); sys.stdout.flush()\n\
             \x20   time.sleep(0.002)\n",
            target.display()
        );
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(script)
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start python3 for the writer")?;
        let stdout = child.stdout.take().context("writer stdout")?;
        let stamps = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&stamps);
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if line.is_err() {
                    break;
                }
                sink.lock().unwrap().push(Instant::now());
            }
        });
        let writer = Writer {
            _child: ChildGuard::new(child),
            stamps,
        };
        writer.wait_for_writes(10, Duration::from_secs(10))?;
        Ok(writer)
    }

    pub fn count(&self) -> usize {
        self.stamps.lock().unwrap().len()
    }

    pub fn wait_for_writes(&self, more: usize, limit: Duration) -> Result<()> {
        let target = self.count() + more;
        let deadline = Instant::now() + limit;
        while self.count() < target {
            ensure!(
                Instant::now() < deadline,
                "the writer made no progress for {limit:?}"
            );
            thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Write completion times between `from` and `to`.
    pub fn stamps(&self) -> Vec<Instant> {
        self.stamps.lock().unwrap().clone()
    }
}

/// The gaps between consecutive write completions, longest first, with when they began.
pub fn gaps(stamps: &[Instant]) -> Vec<(Duration, Instant)> {
    let mut gaps: Vec<_> = stamps.windows(2).map(|w| (w[1] - w[0], w[0])).collect();
    gaps.sort_by_key(|g| std::cmp::Reverse(g.0));
    gaps
}

/// The quiesce-probe driver (tests/src/bin/quiesce-probe.rs) in a child process.
#[derive(Debug)]
pub struct Probe {
    child: ChildGuard,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Probe {
    /// Starts the driver at `exe` (a test's `env!("CARGO_BIN_EXE_quiesce-probe")`) with
    /// `spec` (the watchdog is the tidemark binary) and returns it with its first line:
    /// `{"quiesced": ..}` or `{"error": ..}`.
    pub fn start(exe: &str, mut spec: Value) -> Result<(Self, Value)> {
        spec["watchdog_exe"] = json!(tidemark_bin());
        let mut child = Command::new(exe)
            .arg(spec.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start quiesce-probe")?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("probe stdout")?);
        let mut probe = Probe {
            child: ChildGuard::new(child),
            stdin,
            stdout,
        };
        let first = probe.read_line()?;
        Ok((probe, first))
    }

    fn read_line(&mut self) -> Result<Value> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        if line.is_empty() {
            bail!("quiesce-probe exited without a report");
        }
        serde_json::from_str(&line).with_context(|| format!("probe printed {line:?}"))
    }

    /// Asks it to thaw and returns the thaw report.
    pub fn thaw(mut self) -> Result<Value> {
        if let Some(stdin) = self.stdin.as_mut() {
            writeln!(stdin, "thaw")?;
        }
        let report = self.read_line()?;
        Ok(report["thawed"].clone())
    }

    /// kill -9, as if the daemon crashed inside the window.
    pub fn kill9(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

/// A hooks directory with executables `NAME` whose body is `script`.
pub fn hooks_dir(hooks: &[(&str, &str)]) -> Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("tidemark-hooks-")
        .tempdir()?;
    for (name, script) in hooks {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{script}\n"))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(dir)
}

pub fn ms(value: &Value) -> f64 {
    value.as_f64().unwrap_or(f64::NAN)
}
