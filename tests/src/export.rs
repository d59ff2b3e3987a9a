//! `tidemark export` of a plain file, stopped when dropped.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::peers::unix_uri;
use crate::{run_ok, tidemark_bin, ChildGuard};

/// A running `tidemark export`.
#[derive(Debug)]
pub struct Exported {
    pub child: ChildGuard,
    pub socket: PathBuf,
    pub uri: String,
    pub name: String,
}

impl Exported {
    /// The URI of the export under another name (for unknown-export tests).
    pub fn uri_for(&self, name: &str) -> String {
        unix_uri(name, &self.socket)
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

/// Start `tidemark export FILE --socket DIR/nbd-N.sock --json EXTRA...` and wait until it
/// listens (its JSON ready line).
pub fn export(dir: &Path, file: &Path, extra: &[&str]) -> Result<Exported> {
    let file = file.display().to_string();
    export_args(dir, &[&file], extra)
}

/// Start `tidemark export ARGS... --socket DIR/nbd-N.sock --json EXTRA...` (ARGS: a file,
/// or `--chain BASE DELTA...`) and wait until it listens.
pub fn export_args(dir: &Path, args: &[&str], extra: &[&str]) -> Result<Exported> {
    export_args_env(dir, args, extra, &[] as &[(&str, &str)])
}

/// [`export_args`] with the extra environment `env` (e.g. the S3 server of a `repo:s3://`
/// point).
pub fn export_args_env<K: AsRef<OsStr>, V: AsRef<OsStr>>(
    dir: &Path,
    args: &[&str],
    extra: &[&str],
    env: &[(K, V)],
) -> Result<Exported> {
    let socket = dir.join(format!("nbd-{}.sock", rand::random::<u32>()));
    let mut child = ChildGuard::new(
        Command::new(tidemark_bin())
            .arg("export")
            .args(args)
            .arg("--socket")
            .arg(&socket)
            .arg("--json")
            .args(extra)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", tidemark_bin().display()))?,
    );
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) else {
        bail!("tidemark export printed no ready line within 30 s");
    };
    let ready: serde_json::Value = serde_json::from_str(line.trim())
        .with_context(|| format!("tidemark export's ready line is not JSON: {line:?}"))?;
    Ok(Exported {
        child,
        socket,
        uri: ready["uri"]
            .as_str()
            .context("ready line has no uri")?
            .to_string(),
        name: ready["name"].as_str().unwrap_or("").to_string(),
    })
}
