//! Children that die with the test, however it ends.

use std::ops::{Deref, DerefMut};
use std::process::{Child, Command, Stdio};

use anyhow::Context;

/// A child process killed and reaped when dropped, so a failing test never leaves it
/// running.
#[derive(Debug)]
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// Start `command` in the background: stdin and stdout closed, stderr the test's.
    pub fn spawn(command: &mut Command) -> anyhow::Result<ChildGuard> {
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {command:?}"))?;
        Ok(ChildGuard(child))
    }
}

impl Deref for ChildGuard {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
