//! The timed runner: run a command to completion within a deadline, capture what it said.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::{tidemark_bin, ChildGuard};

/// The deadline of commands that name none (copies of a few hundred MiB included).
pub const COMMAND_LIMIT: Duration = Duration::from_secs(120);

/// What a finished command said.
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

    /// This output, if the command succeeded; panics with everything it said otherwise.
    pub fn ok(self) -> Output {
        assert!(self.status.success(), "command failed: {self:#?}");
        self
    }

    /// The JSON report on stdout; panics with the whole output when there is none.
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|err| panic!("stdout is not one JSON report ({err}): {self:#?}"))
    }
}

/// Run `command` (stdin closed) to completion, killing it after `limit`.
pub fn run(command: &mut Command, limit: Duration) -> anyhow::Result<Output> {
    run_with_input(command, None, limit)
}

/// Run `command` with `input` (if any) on its stdin, killing it after `limit`. stdout and
/// stderr are read while it runs, so a chatty command never blocks on a full pipe.
pub fn run_with_input(
    command: &mut Command,
    input: Option<&[u8]>,
    limit: Duration,
) -> anyhow::Result<Output> {
    let stdin = if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    };
    let mut child = ChildGuard::new(
        command
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {command:?}"))?,
    );
    if let Some(input) = input {
        let mut stdin = child.stdin.take().context("stdin is piped")?;
        stdin.write_all(input).context("writing stdin")?;
    }
    let mut stdout = child.stdout.take().context("stdout is piped")?;
    let mut stderr = child.stderr.take().context("stderr is piped")?;
    let out_reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stdout.read_to_end(&mut bytes);
        bytes
    });
    let err_reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stderr.read_to_end(&mut bytes);
        bytes
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            drop(child);
            let stderr = err_reader.join().unwrap_or_default();
            bail!(
                "{command:?} did not finish within {limit:?}; stderr: {}",
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}

/// Run a command that must succeed within [`COMMAND_LIMIT`]; its stdout.
pub fn run_ok(command: &mut Command) -> anyhow::Result<String> {
    run_ok_within(command, COMMAND_LIMIT)
}

/// Run a command that must succeed within `limit`; its stdout.
pub fn run_ok_within(command: &mut Command, limit: Duration) -> anyhow::Result<String> {
    let out = run(command, limit)?;
    if !out.status.success() {
        bail!(
            "{command:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            out.stdout,
            out.stderr
        );
    }
    Ok(out.stdout)
}

/// Run `tidemark ARGS` within `limit`; panics when it cannot run or does not finish.
pub fn tidemark(args: &[&str], limit: Duration) -> Output {
    run(Command::new(tidemark_bin()).args(args), limit).unwrap_or_else(|err| panic!("{err:#}"))
}

/// Run `tidemark ARGS` with the extra environment `env` (e.g. [`crate::seaweed::Seaweed::env`]),
/// within `limit`.
pub fn tidemark_env<K: AsRef<OsStr>, V: AsRef<OsStr>>(
    args: &[&str],
    env: &[(K, V)],
    limit: Duration,
) -> Output {
    let env = env.iter().map(|(k, v)| (k, v));
    run(Command::new(tidemark_bin()).args(args).envs(env), limit)
        .unwrap_or_else(|err| panic!("{err:#}"))
}

/// Run `tidemark ARGS` with `input` on its stdin, within `limit`.
pub fn tidemark_with_input(args: &[&str], input: &[u8], limit: Duration) -> Output {
    run_with_input(Command::new(tidemark_bin()).args(args), Some(input), limit)
        .unwrap_or_else(|err| panic!("{err:#}"))
}

/// A field of a JSON report as f64; panics naming the field when it is missing.
pub fn number(report: &Value, pointer: &str) -> f64 {
    report
        .pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("report has no number at {pointer}: {report}"))
}
