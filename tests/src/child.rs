//! Children that die with the test, however it ends.

use std::ops::{Deref, DerefMut};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

/// How long a [`ChildGuard::terminating`] child has between SIGTERM and SIGKILL.
const TERMINATE_GRACE: Duration = Duration::from_secs(5);

/// A child process stopped and reaped when dropped, so a failing test never leaves it
/// running: killed at once, or (made with [`ChildGuard::terminating`]) sent SIGTERM first
/// so it can stop what it started, and killed if it lingers.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    terminate: bool,
}

impl ChildGuard {
    /// Guard `child`: killed on drop.
    pub fn new(child: Child) -> ChildGuard {
        ChildGuard {
            child,
            terminate: false,
        }
    }

    /// Guard `child`: sent SIGTERM on drop (run-vm.sh then stops its QEMU, `tidemark
    /// export` finishes in-flight requests), killed if still running 5 s later.
    pub fn terminating(child: Child) -> ChildGuard {
        ChildGuard {
            child,
            terminate: true,
        }
    }

    /// Start `command` in the background: stdin and stdout closed, stderr the test's.
    pub fn spawn(command: &mut Command) -> anyhow::Result<ChildGuard> {
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {command:?}"))?;
        Ok(ChildGuard::new(child))
    }

    /// Whether the child has exited (and been reaped).
    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// SIGTERM, then up to [`TERMINATE_GRACE`] for the child to exit; whether it did.
    fn terminate(&mut self) -> bool {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .stderr(Stdio::null())
            .status();
        let step = Duration::from_millis(25);
        let steps = TERMINATE_GRACE.as_millis() / step.as_millis();
        (0..steps).any(|_| {
            if self.exited() {
                return true;
            }
            std::thread::sleep(step);
            false
        })
    }
}

impl Deref for ChildGuard {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.child
    }
}

impl DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.terminate && (self.exited() || self.terminate()) {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
