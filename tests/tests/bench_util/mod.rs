//! Helpers for the `tidemark bench` end-to-end tests: run the binary with a time limit,
//! read its JSON report, and start NBD servers that die with the test.

#![allow(dead_code)] // each bench_*.rs test crate uses part of this module

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test: `TIDEMARK_BIN`, else the workspace's debug build.
pub fn tidemark_bin() -> PathBuf {
    match std::env::var_os("TIDEMARK_BIN") {
        Some(path) => PathBuf::from(path),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/tidemark"),
    }
}

/// The outcome of one `tidemark` run.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The JSON report on stdout; panics with the whole output when there is none.
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|err| panic!("no JSON report ({err}):\n{self:#?}"))
    }

    pub fn assert_success(&self) -> &Run {
        assert_eq!(self.code, Some(0), "tidemark failed:\n{self:#?}");
        self
    }
}

/// Run `tidemark ARGS` with stdout and stderr piped, killed after `limit`.
pub fn tidemark(args: &[&str], limit: Duration) -> Run {
    let mut child = Command::new(tidemark_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| {
            panic!(
                "cannot run {} ({err}); run `cargo build -p tidemark` first",
                tidemark_bin().display()
            )
        });
    let output = wait_with_limit(&mut child, limit, args);
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn wait_with_limit(child: &mut Child, limit: Duration, what: &[&str]) -> Output {
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for tidemark") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tidemark {what:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_reader.join().expect("stdout reader"),
        stderr: err_reader.join().expect("stderr reader"),
    }
}

/// A server process killed (and its socket removed) when dropped.
#[derive(Debug)]
pub struct Server {
    child: Child,
    pub uri: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `program` can be run (the NBD peers are installed by scripts/install-deps.sh).
pub fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Start `program ARGS` where `{socket}` in ARGS stands for a fresh Unix socket path, and
/// wait until the socket exists. The export is then `nbd+unix:///EXPORT?socket=...`.
pub fn start_server(program: &str, args: &[&str], export: &str) -> Server {
    assert!(
        have(program),
        "{program} is not installed; run scripts/install-deps.sh"
    );
    let dir = tempfile::tempdir().expect("a temp dir for the socket");
    let socket = dir.path().join("nbd.sock");
    let socket_text = socket.to_str().expect("temp paths are UTF-8");
    let args: Vec<String> = args
        .iter()
        .map(|arg| arg.replace("{socket}", socket_text))
        .collect();
    let mut child = Command::new(program)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start {program}: {err}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if let Some(status) = child.try_wait().expect("waiting for the server") {
            panic!("{program} {args:?} exited early: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "{program} did not create its socket within 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Server {
        child,
        uri: format!("nbd+unix:///{export}?socket={socket_text}"),
        _dir: dir,
    }
}

/// A field of a JSON report as f64; panics naming the field when it is missing.
pub fn number(report: &Value, pointer: &str) -> f64 {
    report
        .pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("report has no number at {pointer}: {report}"))
}
