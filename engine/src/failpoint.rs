//! Named failpoints for fault-injection tests, in the manner of TiKV raft-engine's
//! `fail` points: code that must be crash- and error-atomic calls [`check`] between its
//! steps, and a test arms one name to make that step fail with an injected I/O error.
//!
//! Compiled in tests only: outside `cfg(test)`, [`check`] is an empty inline function.
//! The registry is per thread, so tests running in parallel cannot trip each other's
//! failpoints (the code under test runs on the test's own thread).

use std::io;

#[cfg(test)]
thread_local! {
    static ARMED: std::cell::RefCell<std::collections::HashSet<&'static str>> =
        std::cell::RefCell::new(std::collections::HashSet::new());
}

/// Fail with an injected error if `name` is armed on this thread.
#[cfg(test)]
pub(crate) fn check(name: &'static str) -> io::Result<()> {
    if ARMED.with(|armed| armed.borrow().contains(name)) {
        return Err(io::Error::other(format!(
            "injected failure at failpoint {name}"
        )));
    }
    Ok(())
}

/// Fail with an injected error if `name` is armed (never, outside tests).
#[cfg(not(test))]
#[inline(always)]
pub(crate) fn check(_name: &'static str) -> io::Result<()> {
    Ok(())
}

/// An armed failpoint; dropping it disarms it.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct Armed(&'static str);

/// Arm `name` on this thread until the returned guard is dropped.
#[cfg(test)]
pub(crate) fn arm(name: &'static str) -> Armed {
    ARMED.with(|armed| armed.borrow_mut().insert(name));
    Armed(name)
}

#[cfg(test)]
impl Drop for Armed {
    fn drop(&mut self) {
        ARMED.with(|armed| armed.borrow_mut().remove(self.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_armed_failpoint_fails_until_disarmed() {
        assert!(check("x").is_ok());
        let armed = arm("x");
        assert!(check("x").is_err());
        assert!(check("y").is_ok());
        drop(armed);
        assert!(check("x").is_ok());
    }
}
