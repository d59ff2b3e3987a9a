//! Freeze hooks: executables that make applications flush and pause (a database's
//! `FLUSH TABLES WITH READ LOCK`, a queue's pause) before a snapshot and resume after it.
//!
//! Hooks are the executables found in the hook directories, run in name order with
//! `freeze DIR...` and in reverse order with `thaw DIR...` (the DIRs are the mountpoints
//! being frozen; hooks written for qemu-ga's fsfreeze-hook only look at `$1`). Each run
//! has a time limit; at the limit the hook's whole process group is killed. stdin is
//! `/dev/null`; stdout and stderr are captured (up to [`OUTPUT_CAP`] bytes each).

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::QuiesceError;
use crate::sys;

/// How much of each output stream of one hook run is kept.
pub const OUTPUT_CAP: usize = 64 * 1024;

/// After a hook exits, how long to wait for its output pipes to close. A hook may leave a
/// background process behind on purpose (one that holds a database lock while frozen);
/// its output is then cut off rather than waited for.
const OUTPUT_GRACE: Duration = Duration::from_millis(200);

/// Which way a hook is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookAction {
    Freeze,
    Thaw,
}

impl HookAction {
    fn arg(self) -> &'static str {
        match self {
            HookAction::Freeze => "freeze",
            HookAction::Thaw => "thaw",
        }
    }
}

/// How a hook run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "value")]
pub enum HookOutcome {
    /// Exited with this status (0 is success).
    Exited(i32),
    /// Killed by this signal (not by us).
    Signaled(i32),
    /// Ran past its time limit; its process group was killed.
    TimedOut,
    /// Could not be started.
    SpawnFailed(String),
}

/// One run of one hook, with its captured output.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HookRun {
    pub hook: PathBuf,
    pub action: HookAction,
    pub outcome: HookOutcome,
    /// Wall time of the run, in milliseconds.
    pub millis: f64,
    pub stdout: String,
    pub stderr: String,
}

impl HookRun {
    pub fn succeeded(&self) -> bool {
        self.outcome == HookOutcome::Exited(0)
    }

    /// What went wrong, for an error message; `None` on success.
    pub fn failure(&self, limit: Duration) -> Option<String> {
        let what = match &self.outcome {
            HookOutcome::Exited(0) => return None,
            HookOutcome::Exited(code) => format!("exited with status {code}"),
            HookOutcome::Signaled(signal) => format!("was killed by signal {signal}"),
            HookOutcome::TimedOut => format!("ran past its time limit of {limit:?} and was killed"),
            HookOutcome::SpawnFailed(e) => format!("could not be started: {e}"),
        };
        Some(format!(
            "hook {} {} {what}",
            self.hook.display(),
            self.action.arg()
        ))
    }

    /// Log lines: a summary, then the captured output, prefixed.
    pub fn log_lines(&self) -> Vec<String> {
        let outcome = match &self.outcome {
            HookOutcome::Exited(code) => format!("exit {code}"),
            HookOutcome::Signaled(signal) => format!("signal {signal}"),
            HookOutcome::TimedOut => "timed out, killed".to_string(),
            HookOutcome::SpawnFailed(e) => format!("not started: {e}"),
        };
        let mut lines = vec![format!(
            "hook {} {}: {outcome} in {:.1} ms",
            self.hook.display(),
            self.action.arg(),
            self.millis
        )];
        for (stream, text) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            lines.extend(text.lines().map(|line| format!("  {stream}: {line}")));
        }
        lines
    }
}

/// The hooks of `dirs`, in the order they freeze: by file name, then by directory order.
/// Hidden files, editor backups, package-manager leftovers and non-executables are left
/// out, as qemu-ga's fsfreeze-hook does. A directory that does not exist is an error.
///
/// Hooks run with the daemon's privileges (root, on a host), so, as sudo and cron do,
/// a hook directory or hook (the file a link points to) owned by anyone but root or the
/// daemon's own user, or writable by its group or by others, is refused with an error
/// that names it: whoever could change it could run anything as the daemon.
pub fn discover(dirs: &[PathBuf]) -> Result<Vec<PathBuf>, QuiesceError> {
    let mut found: Vec<(OsString, usize, PathBuf)> = Vec::new();
    for (index, dir) in dirs.iter().enumerate() {
        let meta = std::fs::metadata(dir).map_err(|source| QuiesceError::HooksDir {
            dir: dir.clone(),
            source,
        })?;
        check_trusted(dir, &meta, "hook directory")?;
        let entries = std::fs::read_dir(dir).map_err(|source| QuiesceError::HooksDir {
            dir: dir.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| QuiesceError::HooksDir {
                dir: dir.clone(),
                source,
            })?;
            let name = entry.file_name();
            if !is_hook_name(&name.to_string_lossy()) {
                continue;
            }
            let path = entry.path();
            // metadata() follows symlinks: a link to an executable is a hook.
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                check_trusted(&path, &meta, "hook")?;
                found.push((name, index, path));
            }
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, _, path)| path).collect())
}

/// Refuse `path` unless root or the daemon's own user owns it and neither its group nor
/// others may write it.
fn check_trusted(
    path: &Path,
    meta: &std::fs::Metadata,
    what: &'static str,
) -> Result<(), QuiesceError> {
    match untrusted_because(meta.uid(), meta.mode(), sys::process::effective_uid()) {
        Some(reason) => Err(QuiesceError::UntrustedHook {
            path: path.to_path_buf(),
            what,
            reason,
        }),
        None => Ok(()),
    }
}

/// Why a file of this `owner` and `mode` may not be run by a daemon running as `me`.
fn untrusted_because(owner: u32, mode: u32, me: u32) -> Option<String> {
    if owner != 0 && owner != me {
        Some(format!(
            "it is owned by uid {owner}, not by root or by the daemon's uid {me}"
        ))
    } else if mode & 0o022 != 0 {
        Some(format!(
            "its mode {:04o} lets its group or others write it",
            mode & 0o7777
        ))
    } else {
        None
    }
}

fn is_hook_name(name: &str) -> bool {
    const LEFTOVERS: [&str; 6] = [
        ".dpkg-old",
        ".dpkg-new",
        ".dpkg-dist",
        ".rpmsave",
        ".rpmnew",
        ".rpmorig",
    ];
    !name.starts_with('.')
        && !name.ends_with('~')
        && !LEFTOVERS.iter().any(|suffix| name.ends_with(suffix))
}

/// Runs `hook ACTION DIR...` with a time limit and captures its output.
pub fn run(hook: &Path, action: HookAction, dirs: &[PathBuf], limit: Duration) -> HookRun {
    let start = Instant::now();
    let finish = |outcome, stdout, stderr| HookRun {
        hook: hook.to_path_buf(),
        action,
        outcome,
        millis: start.elapsed().as_secs_f64() * 1e3,
        stdout,
        stderr,
    };
    let spawned = Command::new(hook)
        .arg(action.arg())
        .args(dirs)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills the hook's children too.
        .process_group(0)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            return finish(
                HookOutcome::SpawnFailed(e.to_string()),
                String::new(),
                String::new(),
            )
        }
    };
    let stdout = child.stdout.take().map(capture);
    let stderr = child.stderr.take().map(capture);
    let deadline = start + limit;
    let outcome = loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                break match (status.code(), status.signal()) {
                    (Some(code), _) => HookOutcome::Exited(code),
                    (None, Some(signal)) => HookOutcome::Signaled(signal),
                    (None, None) => HookOutcome::Exited(-1),
                }
            }
            Ok(None) if Instant::now() >= deadline => {
                // The leader is not reaped yet, so its pid still names its group.
                if let Err(e) = sys::kill_process_group(child.id()) {
                    tracing::warn!(hook = %hook.display(), "cannot kill the hook's process group: {e}");
                    let _ = child.kill();
                }
                let _ = child.wait();
                break HookOutcome::TimedOut;
            }
            Ok(None) => thread::sleep(Duration::from_millis(2)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                break HookOutcome::SpawnFailed(format!("cannot wait for it: {e}"));
            }
        }
    };
    let collect = |rx: Option<mpsc::Receiver<String>>| {
        rx.and_then(|rx| rx.recv_timeout(OUTPUT_GRACE).ok())
            .unwrap_or_else(|| "[output cut off: a background process kept it open]".to_string())
    };
    let stdout = collect(stdout);
    let stderr = collect(stderr);
    finish(outcome, stdout, stderr)
}

/// Reads a stream to its end on a thread (so a chatty hook never blocks on a full pipe),
/// keeping the first [`OUTPUT_CAP`] bytes.
fn capture(mut stream: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 8192];
        let mut truncated = false;
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = OUTPUT_CAP.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                    truncated |= n > room;
                }
            }
        }
        let mut text = String::from_utf8_lossy(&kept).into_owned();
        if truncated {
            text.push_str("\n[output truncated]");
        }
        let _ = tx.send(text);
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn hook(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn hooks_are_found_in_name_order_across_directories() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        hook(a.path(), "20-b", "");
        hook(b.path(), "10-a", "");
        hook(a.path(), "30-c~", "");
        hook(a.path(), ".hidden", "");
        hook(b.path(), "40-d.dpkg-old", "");
        fs::write(a.path().join("15-not-executable"), "#!/bin/sh\n").unwrap();
        let found = discover(&[a.path().into(), b.path().into()]).unwrap();
        assert_eq!(found, vec![b.path().join("10-a"), a.path().join("20-b")]);
    }

    #[test]
    fn hooks_writable_by_group_or_others_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let h = hook(dir.path(), "10-db", "");
        fs::set_permissions(&h, fs::Permissions::from_mode(0o775)).unwrap();
        let err = discover(&[dir.path().into()]).unwrap_err().to_string();
        assert!(
            err.contains(&h.display().to_string()) && err.contains("0775"),
            "{err}"
        );
        // A link is judged by the file it runs.
        fs::set_permissions(&h, fs::Permissions::from_mode(0o757)).unwrap();
        let links = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(&h, links.path().join("20-link")).unwrap();
        let err = discover(&[links.path().into()]).unwrap_err().to_string();
        assert!(err.contains("20-link") && err.contains("0757"), "{err}");
        fs::set_permissions(&h, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(discover(&[dir.path().into()]).unwrap(), vec![h]);
    }

    #[test]
    fn a_hook_directory_writable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        hook(dir.path(), "10-db", "");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let err = discover(&[dir.path().into()]).unwrap_err().to_string();
        assert!(
            err.contains("hook directory")
                && err.contains(&dir.path().display().to_string())
                && err.contains("0777"),
            "{err}"
        );
    }

    #[test]
    fn only_root_or_the_daemons_user_may_own_hooks() {
        assert_eq!(untrusted_because(0, 0o100755, 1000), None);
        assert_eq!(untrusted_because(1000, 0o100700, 1000), None);
        let why = untrusted_because(1234, 0o100755, 1000).unwrap();
        assert!(why.contains("uid 1234") && why.contains("1000"), "{why}");
        assert!(untrusted_because(0, 0o100775, 0).is_some());
        assert!(untrusted_because(0, 0o040757, 0).is_some());
    }

    #[test]
    fn the_guest_side_qemu_hook_directory_is_not_a_default() {
        assert!(!super::super::DEFAULT_HOOKS_DIRS.contains(&super::super::QEMU_HOOKS_DIR));
    }

    #[test]
    fn a_missing_hooks_directory_is_an_error() {
        let err = discover(&[PathBuf::from("/nonexistent/tidemark-hooks")]).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/tidemark-hooks"),
            "{err}"
        );
    }

    #[test]
    fn output_and_arguments_are_captured() {
        let dir = tempfile::tempdir().unwrap();
        let h = hook(dir.path(), "10-print", "echo \"args: $*\"; echo oops >&2");
        let run = run(
            &h,
            HookAction::Freeze,
            &[PathBuf::from("/mnt/a"), PathBuf::from("/mnt/b")],
            Duration::from_secs(5),
        );
        assert!(run.succeeded(), "{run:?}");
        assert_eq!(run.stdout, "args: freeze /mnt/a /mnt/b\n");
        assert_eq!(run.stderr, "oops\n");
        assert!(run.log_lines().iter().any(|l| l == "  stderr: oops"));
    }

    #[test]
    fn a_failing_hook_reports_its_status() {
        let dir = tempfile::tempdir().unwrap();
        let h = hook(dir.path(), "10-fail", "exit 3");
        let run = run(&h, HookAction::Thaw, &[], Duration::from_secs(5));
        assert_eq!(run.outcome, HookOutcome::Exited(3));
        assert!(run
            .failure(Duration::from_secs(5))
            .unwrap()
            .contains("status 3"));
    }

    #[test]
    fn a_hanging_hook_and_its_children_are_killed_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("grandchild.pid");
        let h = hook(
            dir.path(),
            "10-hang",
            &format!("sleep 60 & echo $! > {}; wait", pidfile.display()),
        );
        let start = Instant::now();
        let run = run(&h, HookAction::Freeze, &[], Duration::from_millis(300));
        let took = start.elapsed();
        assert_eq!(run.outcome, HookOutcome::TimedOut);
        assert!(took < Duration::from_secs(3), "took {took:?}");
        let pid = fs::read_to_string(&pidfile).unwrap().trim().to_string();
        // The background `sleep` was in the hook's process group, so it died too (allow
        // init a moment to reap it).
        let gone = (0..100).any(|_| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let dead = stat.is_empty() || stat.split(' ').nth(2) == Some("Z");
            if !dead {
                thread::sleep(Duration::from_millis(20));
            }
            dead
        });
        assert!(gone, "the hook's child {pid} survived the timeout");
    }

    #[test]
    fn a_hook_that_cannot_start_is_reported() {
        let run = run(
            Path::new("/nonexistent/hook"),
            HookAction::Freeze,
            &[],
            Duration::from_secs(1),
        );
        assert!(
            matches!(run.outcome, HookOutcome::SpawnFailed(_)),
            "{run:?}"
        );
    }
}
