//! Helpers for the NBD end-to-end tests: run `tidemark export` and the peer tools with
//! time limits, kill what was started on drop, build test images.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The tidemark binary under test.
pub fn tidemark_bin() -> PathBuf {
    match std::env::var_os("TIDEMARK_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/tidemark"),
    }
}

/// Run a command to completion within `limit`; kill it otherwise.
pub fn run_limited(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {shown}"))?;
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!(
                "{shown} did not finish within {limit:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Run a command that must succeed; returns its stdout.
pub fn run_ok(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = run_limited(cmd, Duration::from_secs(120))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A process killed when dropped.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running `tidemark export`.
pub struct Exported {
    pub child: Child,
    pub socket: PathBuf,
    pub uri: String,
    pub name: String,
}

impl Exported {
    /// The URI of the export under another name (for unknown-export tests).
    pub fn uri_for(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.socket.display())
    }

    /// Send SIGTERM and wait for a clean exit.
    pub fn terminate(mut self) -> Result<std::process::ExitStatus> {
        run_ok(
            Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string()),
        )?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("tidemark export did not exit within 15 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Exported {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `tidemark export FILE --socket DIR/nbd.sock --json EXTRA...` and wait until it
/// listens (its JSON ready line).
pub fn export(dir: &Path, file: &Path, extra: &[&str]) -> Result<Exported> {
    let socket = dir.join(format!("nbd-{}.sock", rand::random::<u32>()));
    let mut child = Command::new(tidemark_bin())
        .arg("export")
        .arg(file)
        .arg("--socket")
        .arg(&socket)
        .arg("--json")
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", tidemark_bin().display()))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let exported = |child| Exported {
        child,
        socket: socket.clone(),
        uri: String::new(),
        name: String::new(),
    };
    let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) else {
        drop(exported(child));
        bail!("tidemark export printed no ready line within 30 s");
    };
    let mut e = exported(child);
    let ready: serde_json::Value = serde_json::from_str(line.trim())
        .with_context(|| format!("tidemark export's ready line is not JSON: {line:?}"))?;
    e.uri = ready["uri"]
        .as_str()
        .context("ready line has no uri")?
        .to_string();
    e.name = ready["name"].as_str().unwrap_or("").to_string();
    Ok(e)
}

/// A deterministic byte pattern: byte at offset `o` of the image.
pub fn pattern(o: u64) -> u8 {
    (o.wrapping_mul(2654435761) >> 13) as u8
}

/// A sparse image of `size` bytes with the pattern written in `data` ranges.
pub fn make_image(path: &Path, size: u64, data: &[(u64, u64)]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    for &(off, len) in data {
        let buf: Vec<u8> = (off..off + len).map(pattern).collect();
        f.write_all_at(&buf, off)?;
    }
    f.sync_all()?;
    Ok(())
}

/// Write a tidemark bitmap file with the given dirty blocks.
pub fn make_bitmap(
    path: &Path,
    name: &str,
    granularity: u32,
    size: u64,
    dirty: &[u64],
) -> Result<()> {
    use tidemark_formats::bitmap::{set_dirty, write_bitmap_file, BitmapHeader};
    let header = BitmapHeader::new(uuid::Uuid::new_v4(), name, granularity, size, 1)?;
    let mut words = vec![0u64; header.word_count()];
    for &b in dirty {
        set_dirty(&mut words, b);
    }
    write_bitmap_file(path, &header, &words)?;
    Ok(())
}

/// Start a peer server (qemu-nbd, nbdkit) and wait for its Unix socket.
pub fn start_peer(cmd: &mut Command, socket: &Path) -> Result<Guard> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let guard = Guard(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if Instant::now() > deadline {
            bail!("{cmd:?} did not create {}", socket.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(guard)
}
