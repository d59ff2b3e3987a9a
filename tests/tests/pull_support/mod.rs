//! Helpers for the pull and demo end-to-end tests: the binary, children that die with the
//! test, commands with a time limit, sockets to wait for.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// The tidemark binary under test: `TIDEMARK_BIN`, else the workspace's debug build.
pub fn tidemark_bin() -> PathBuf {
    match std::env::var_os("TIDEMARK_BIN") {
        Some(path) => PathBuf::from(path),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/tidemark"),
    }
}

/// A command's outcome.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// The status as a number (-1 when killed by a signal).
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }

    /// Fail with everything the command said unless it succeeded.
    pub fn ok(self) -> anyhow::Result<Output> {
        if !self.status.success() {
            bail!(
                "command failed ({}):\nstdout: {}\nstderr: {}",
                self.status,
                self.stdout,
                self.stderr
            );
        }
        Ok(self)
    }

    /// stdout as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(self.stdout.trim()).with_context(|| {
            format!(
                "stdout is not JSON: {:?} (stderr: {})",
                self.stdout, self.stderr
            )
        })
    }
}

/// Run `command` to completion, killing it after `limit`.
pub fn run(command: &mut Command, limit: Duration) -> anyhow::Result<Output> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    let mut stdout = child.stdout.take().context("stdout is piped")?;
    let mut stderr = child.stderr.take().context("stderr is piped")?;
    let out_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{command:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// A background process killed when the test ends, however it ends.
#[derive(Debug)]
pub struct Background(pub Child);

impl Background {
    pub fn spawn(command: &mut Command) -> anyhow::Result<Background> {
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {command:?}"))?;
        Ok(Background(child))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Wait until `path` exists (a server's socket), failing after `limit`.
pub fn wait_for_path(path: &Path, server: &mut Background, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !path.exists() {
        if let Some(status) = server.0.try_wait()? {
            bail!(
                "the server exited ({status}) before creating {}",
                path.display()
            );
        }
        if Instant::now() > deadline {
            bail!("{} did not appear within {limit:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// `nbd+unix:///EXPORT?socket=PATH`.
pub fn unix_uri(export: &str, socket: &Path) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

/// A path-to-string for command arguments.
pub fn arg(path: &Path) -> String {
    path.display().to_string()
}

/// `cmp A B` (the real tool): whether the two files are byte for byte equal.
pub fn cmp_equal(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let out = run(Command::new("cmp").arg(a).arg(b), Duration::from_secs(60))?;
    match out.code() {
        0 => Ok(true),
        1 => Ok(false),
        _ => bail!("cmp failed: {}", out.stderr),
    }
}

/// Ranges of `nbdinfo --map=CONTEXT URI`: (offset, length, flags).
pub fn nbdinfo_map(uri: &str, context: &str) -> anyhow::Result<Vec<(u64, u64, u32)>> {
    let out = run(
        Command::new("nbdinfo")
            .arg(format!("--map={context}"))
            .arg(uri),
        Duration::from_secs(30),
    )?
    .ok()?;
    let mut runs = Vec::new();
    for line in out.stdout.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 3 {
            continue;
        }
        runs.push((fields[0].parse()?, fields[1].parse()?, fields[2].parse()?));
    }
    Ok(runs)
}

/// Bytes where both maps (each covering the export from 0) satisfy their predicate.
pub fn overlap_bytes(
    a: &[(u64, u64, u32)],
    a_pred: impl Fn(u32) -> bool,
    b: &[(u64, u64, u32)],
    b_pred: impl Fn(u32) -> bool,
) -> u64 {
    let mut total = 0;
    for &(ao, al, _) in a.iter().filter(|r| a_pred(r.2)) {
        for &(bo, bl, _) in b.iter().filter(|r| b_pred(r.2)) {
            let start = ao.max(bo);
            let end = (ao + al).min(bo + bl);
            if start < end {
                total += end - start;
            }
        }
    }
    total
}
