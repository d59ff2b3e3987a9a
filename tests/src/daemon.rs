//! What the daemon's end-to-end tests share: a `tidemark serve` in a temporary state dir
//! that is stopped (and cleaned up) when dropped, the CLI against it, a raw
//! control-socket client, and the in-memory disk a volume must match.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::peers::unix_uri;
use crate::{tidemark_bin, ChildGuard};

/// A running `tidemark serve`.
#[derive(Debug)]
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub state_dir: PathBuf,
    pub child: Option<ChildGuard>,
    /// Extra arguments of `tidemark serve`.
    pub serve_args: Vec<String>,
    /// Run the daemon with this RLIMIT_FSIZE (bytes) and SIGXFSZ ignored, so its writes
    /// past the limit fail with EFBIG: a target that breaks mid-push.
    pub file_size_limit: Option<u64>,
    /// Extra environment variables of `tidemark serve` (test knobs).
    pub env: Vec<(String, String)>,
}

impl Daemon {
    /// Start a daemon on a fresh state dir and wait until its control socket answers.
    pub fn start() -> Daemon {
        Daemon::start_with(&[])
    }

    /// Start a daemon whose files cannot grow past `limit` bytes (see `file_size_limit`).
    pub fn start_with_file_size_limit(limit: u64) -> Daemon {
        let mut daemon = Daemon::stopped(&[]);
        daemon.file_size_limit = Some(limit);
        daemon.restart();
        daemon
    }

    /// Start a daemon with extra `tidemark serve` arguments.
    pub fn start_with(serve_args: &[&str]) -> Daemon {
        let mut daemon = Daemon::stopped(serve_args);
        daemon.restart();
        daemon
    }

    /// Start a daemon with extra environment variables (test knobs such as
    /// `TIDEMARK_TEST_ROLLBACK_DELAY_MS`); restarts keep them.
    pub fn start_with_env(env: &[(&str, &str)]) -> Daemon {
        let mut daemon = Daemon::stopped(&[]);
        daemon.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        daemon.restart();
        daemon
    }

    fn stopped(serve_args: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let state_dir = dir.path().join("state");
        let serve_args = serve_args.iter().map(|a| a.to_string()).collect();
        Daemon {
            dir,
            state_dir,
            child: None,
            serve_args,
            file_size_limit: None,
            env: Vec::new(),
        }
    }

    /// Start (again) on the same state dir.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the daemon runs already");
        let log = std::fs::File::create(self.dir.path().join("daemon.log")).expect("log file");
        let mut command = match self.file_size_limit {
            None => Command::new(tidemark_bin()),
            Some(limit) => {
                // An ignored signal stays ignored across exec.
                let mut command = Command::new("sh");
                command
                    .arg("-c")
                    .arg(format!(
                        "trap '' XFSZ; exec prlimit --fsize={limit}:{limit} \"$0\" \"$@\""
                    ))
                    .arg(tidemark_bin());
                command
            }
        };
        let child = command
            .args(["serve", "--state-dir"])
            .arg(&self.state_dir)
            .args(&self.serve_args)
            .env("TIDEMARK_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning tidemark serve");
        self.child = Some(ChildGuard::new(child));
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if UnixStream::connect(self.control_socket()).is_ok() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("tidemark serve exited with {status}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("tidemark serve did not come up: {}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub fn control_socket(&self) -> PathBuf {
        self.state_dir.join("control.sock")
    }

    pub fn nbd_socket(&self) -> PathBuf {
        self.state_dir.join("nbd.sock")
    }

    /// `nbd+unix:///EXPORT?socket=...`
    pub fn uri(&self, export: &str) -> String {
        unix_uri(export, &self.nbd_socket())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Send SIGTERM and wait (bounded) for a clean exit; returns its status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                drop(child);
                panic!("tidemark serve ignored SIGTERM: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9.
    pub fn kill(&mut self) {
        drop(self.child.take().expect("running"));
    }

    /// Run `tidemark ARGS... --state-dir DIR` and return its output.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(tidemark_bin())
            .args(args)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .stdin(Stdio::null())
            .output()
            .expect("running tidemark")
    }

    /// Run a CLI command with `--json` that must succeed; its JSON report.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "tidemark {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        serde_json::from_slice(&out.stdout).expect("JSON report")
    }

    /// A raw control connection.
    pub fn control(&self) -> Control {
        Control::connect(&self.control_socket()).expect("control connection")
    }

    /// Create a volume of `size` bytes backed by a new file in the temp dir.
    pub fn create_volume(&self, name: &str, size: u64) -> PathBuf {
        let backing = self.dir.path().join(format!("{name}.raw"));
        self.cli_json(&[
            "volume",
            "create",
            name,
            "--backing",
            backing.to_str().expect("utf-8 path"),
            "--size",
            &size.to_string(),
        ]);
        backing
    }
}

/// A raw JSON-lines client of the control socket.
#[derive(Debug)]
pub struct Control {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    pub greeting: Value,
    pub events: Vec<Value>,
}

impl Control {
    pub fn connect(path: &Path) -> anyhow::Result<Control> {
        let stream = UnixStream::connect(path).context("connecting")?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let writer = stream.try_clone()?;
        let mut control = Control {
            reader: BufReader::new(stream),
            writer,
            greeting: Value::Null,
            events: vec![],
        };
        control.greeting = control.read()?;
        Ok(control)
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.writer.write_all(bytes)?;
        Ok(())
    }

    /// The next line that is not an event (events are collected).
    pub fn reply(&mut self) -> anyhow::Result<Value> {
        loop {
            let line = self.read()?;
            if line.get("event").is_some() {
                self.events.push(line);
                continue;
            }
            return Ok(line);
        }
    }

    pub fn read(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("the daemon closed the connection");
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Execute and return the whole reply (`{"return": ...}` or `{"error": ...}`).
    pub fn execute(&mut self, command: &str, arguments: Value) -> Value {
        let request = json!({"execute": command, "arguments": arguments});
        self.send_raw(format!("{request}\n").as_bytes())
            .expect("send");
        self.reply().expect("reply")
    }

    /// Execute a command that must succeed; what it returned.
    pub fn ok(&mut self, command: &str, arguments: Value) -> Value {
        let reply = self.execute(command, arguments.clone());
        match reply.get("return") {
            Some(value) => value.clone(),
            None => panic!("{command} {arguments} failed: {reply}"),
        }
    }

    /// Wait for event `name` whose data matches `pred`.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> anyhow::Result<Value> {
        if let Some(at) = self.events.iter().position(|e| e["event"] == json!(name)) {
            return Ok(self.events.remove(at));
        }
        self.reader.get_ref().set_read_timeout(Some(timeout))?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let line = self.read()?;
            if line["event"] == json!(name) {
                return Ok(line);
            }
            self.events.push(line);
        }
        bail!("no {name} event within {timeout:?}")
    }
}

/// The libnbd helper script (see its docstring), written next to the daemon's state.
pub const NBD_TOOL: &str = include_str!("nbd_tool.py");

impl Daemon {
    /// Path of the libnbd helper script, written on first use.
    pub fn nbd_tool_path(&self) -> PathBuf {
        let path = self.dir.path().join("nbd_tool.py");
        if !path.exists() {
            std::fs::write(&path, NBD_TOOL).expect("writing nbd_tool.py");
        }
        path
    }

    /// Run the libnbd helper; its stdout. Panics with its stderr on failure.
    pub fn nbd_tool(&self, args: &[&str]) -> String {
        let out = Command::new("/usr/bin/python3")
            .arg(self.nbd_tool_path())
            .args(args)
            .output()
            .expect("running /usr/bin/python3");
        assert!(
            out.status.success(),
            "nbd_tool {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// Start the libnbd helper in the background (a writer).
    pub fn nbd_tool_spawn(&self, args: &[&str]) -> ChildGuard {
        let child = Command::new("/usr/bin/python3")
            .arg(self.nbd_tool_path())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running /usr/bin/python3");
        ChildGuard::new(child)
    }
}

/// A plain in-memory disk: what the volume must hold.
#[derive(Clone, Debug)]
pub struct Model(pub Vec<u8>);

impl Model {
    pub fn new(size: usize) -> Model {
        Model(vec![0; size])
    }

    /// Apply `write -P byte offset len` and return the qemu-io command for it.
    pub fn write(&mut self, offset: usize, len: usize, byte: u8) -> String {
        self.0[offset..offset + len].fill(byte);
        format!("write -P {byte} {offset} {len}")
    }

    /// Assert that `path` holds exactly this disk; name the first differing offset.
    pub fn assert_equals_file(&self, path: &Path, what: &str) {
        let data = std::fs::read(path).expect("reading the image");
        assert_eq!(data.len(), self.0.len(), "{what}: size");
        if let Some(at) = data.iter().zip(&self.0).position(|(a, b)| a != b) {
            panic!(
                "{what}: first difference at offset {at}: image has {} where {} was expected",
                data[at], self.0[at]
            );
        }
    }
}

/// `ranges` rounded out to `granularity` and merged, as `[offset, length]` pairs.
pub fn granular(ranges: &[(u64, u64)], granularity: u64, size: u64) -> Vec<[u64; 2]> {
    let mut blocks: Vec<(u64, u64)> = ranges
        .iter()
        .map(|&(o, l)| {
            (
                o / granularity * granularity,
                ((o + l).div_ceil(granularity) * granularity).min(size),
            )
        })
        .collect();
    blocks.sort();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (start, end) in blocks {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged.into_iter().map(|(s, e)| [s, e - s]).collect()
}
