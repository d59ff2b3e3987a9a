//! The VM harness of the guest-agent tests (`run-vm.sh`, `make-vm.sh` in ../shared/vm):
//! where it is, its build, and the guest console read line by line.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{run_ok_within, ChildGuard};

/// The guest console, line by line, each with when the host received it.
pub type Console = Arc<Mutex<Vec<(Instant, String)>>>;

/// The directory holding run-vm.sh and make-vm.sh: `TIDEMARK_VM_HARNESS`, else
/// ../shared/vm beside the workspace, else /work/shared/vm.
pub fn harness() -> Result<PathBuf> {
    let candidates = [
        std::env::var_os("TIDEMARK_VM_HARNESS").map(PathBuf::from),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/vm")),
        Some(PathBuf::from("/work/shared/vm")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|dir| dir.join("run-vm.sh").exists())
        .context("the VM harness (run-vm.sh, make-vm.sh) is not found: set TIDEMARK_VM_HARNESS")
}

/// The VM build (kernel + initramfs with qemu-ga), made once with make-vm.sh and shared
/// by every VM test: `TIDEMARK_VM_BUILD`, else /var/tmp/tidemark-vm-build.
pub fn vm_build(harness: &Path) -> Result<PathBuf> {
    vm_build_with(harness, "", "", "")
}

/// A VM build with extra kernel `modules` and host `bins` in the guest (make-vm.sh's
/// VM_EXTRA_MODULES and VM_EXTRA_BINS), kept beside the plain one with the `-{variant}`
/// suffix ("" for the plain build).
pub fn vm_build_with(harness: &Path, variant: &str, modules: &str, bins: &str) -> Result<PathBuf> {
    let mut build = std::env::var_os("TIDEMARK_VM_BUILD")
        .unwrap_or_else(|| "/var/tmp/tidemark-vm-build".into());
    if !variant.is_empty() {
        build.push(format!("-{variant}"));
    }
    let build = PathBuf::from(build);
    if !(build.join("vmlinuz").exists() && build.join("initramfs.cpio.gz").exists()) {
        std::fs::create_dir_all(&build)?;
        // make-vm.sh gets 900 s from its own `timeout`; this deadline only catches a
        // `timeout` that hangs.
        run_ok_within(
            Command::new("timeout")
                .arg("900")
                .arg(harness.join("make-vm.sh"))
                .arg(&build)
                .env("VM_EXTRA_MODULES", modules)
                .env("VM_EXTRA_BINS", bins),
            Duration::from_secs(960),
        )?;
    }
    Ok(build)
}

/// Collect the VM's console output (run-vm.sh's stdout) in the background.
pub fn console(out: ChildStdout) -> Console {
    let console = Console::default();
    let sink = Arc::clone(&console);
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap().push((Instant::now(), line));
        }
    });
    console
}

/// Start run-vm.sh (`command`) with stdin closed and its console collected in the
/// background; the guard terminates it when dropped.
pub fn spawn_with_console(command: &mut Command) -> (ChildGuard, Console) {
    let mut vm = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run-vm.sh");
    let out = vm.stdout.take().expect("piped stdout");
    (ChildGuard::terminating(vm), console(out))
}

/// Wait until `done` holds for the console lines; fail after `limit` with the last ones.
pub fn wait_for(
    console: &Console,
    limit: Duration,
    what: &str,
    done: impl Fn(&[(Instant, String)]) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if done(&console.lock().unwrap()) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let tail: Vec<String> = console
                .lock()
                .unwrap()
                .iter()
                .rev()
                .take(20)
                .map(|l| l.1.clone())
                .collect();
            bail!("timed out waiting for {what}; console tail (newest first): {tail:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
