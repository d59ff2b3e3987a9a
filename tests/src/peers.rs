//! The peers the tests run tidemark against (qemu-img, qemu-io, qemu-nbd, nbdkit,
//! nbdinfo, losetup): whether they are installed, servers that wait for their socket,
//! and the few outputs the tests parse.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::run::run;
use crate::ChildGuard;

/// Whether `program` can be run (the peers are installed by scripts/install-deps.sh).
pub fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// `nbd+unix:///EXPORT?socket=PATH`.
pub fn unix_uri(export: &str, socket: &Path) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

/// Start a server (qemu-nbd, nbdkit, tidemark export) in the background and wait until
/// it creates `socket`; fail if it exits first or takes longer than `limit`.
pub fn serve(command: &mut Command, socket: &Path, limit: Duration) -> anyhow::Result<ChildGuard> {
    let mut server = ChildGuard::spawn(command)?;
    let deadline = Instant::now() + limit;
    while !socket.exists() {
        if let Some(status) = server.try_wait()? {
            bail!(
                "{command:?} exited ({status}) before creating {}",
                socket.display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{command:?} did not create {} within {limit:?}",
                socket.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(server)
}

/// A server on a socket in its own temp dir, stopped (and the dir removed) when dropped.
#[derive(Debug)]
pub struct Server {
    pub uri: String,
    _child: ChildGuard,
    _dir: tempfile::TempDir,
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
    let child = serve(
        Command::new(program).args(&args),
        &socket,
        Duration::from_secs(20),
    )
    .unwrap_or_else(|err| panic!("{err:#}"));
    Server {
        uri: unix_uri(export, &socket),
        _child: child,
        _dir: dir,
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
    .ok();
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

/// Run qemu-io with `commands` (each a `-c` argument) against `uri`; must succeed.
pub fn qemu_io(uri: &str, commands: &[String]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = cmd.arg(uri).output().expect("running qemu-io");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("failed"),
        "qemu-io {commands:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img convert` an export into a new raw image.
pub fn qemu_img_convert(uri: &str, dest: &Path) {
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", uri])
        .arg(dest)
        .output()
        .expect("running qemu-img");
    assert!(
        out.status.success(),
        "qemu-img convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A loop device over a backing file, detached on drop.
#[derive(Debug)]
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
