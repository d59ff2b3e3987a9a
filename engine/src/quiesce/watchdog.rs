//! The thaw watchdog: a helper process that thaws whatever is frozen if the window limit
//! passes or the process that froze it dies (even by `kill -9`).
//!
//! The quiescing process spawns `EXE __quiesce-watchdog` (the tidemark binary; see
//! [`WATCHDOG_SUBCOMMAND`]) in its own process group (so a Ctrl-C aimed at the daemon's
//! terminal group does not kill it too) and talks to it over the child's stdin and stdout,
//! one JSON object per line:
//!
//! ```text
//! watchdog -> parent   {"msg":"ready","pid":N}              once, before anything freezes
//! parent -> watchdog   {"msg":"arm","deadline_ns":..,...}   the window opens: an absolute
//!                                                           CLOCK_MONOTONIC deadline
//! parent -> watchdog   {"msg":"hook","path":..}             sent BEFORE each freeze step,
//!                      {"msg":"agent","socket":..}          so the watchdog knows of every
//!                      {"msg":"filesystem","mountpoint":..} step that may have happened
//! parent -> watchdog   {"msg":"thawing"}                    the parent starts thawing
//! watchdog -> parent   {"msg":"go"} | {"msg":"fired",..}    the deadline is off, or it
//!                                                           already passed and the
//!                                                           watchdog thawed (a report)
//! parent -> watchdog   {"msg":"done"}                       all thawed; the watchdog exits
//! ```
//!
//! The watchdog fires (thaws, in reverse order of the steps: `FITHAW` by path,
//! `guest-fsfreeze-thaw` on a new agent connection, each hook's `thaw`) when the deadline
//! passes before `thawing`, or when its stdin reaches end of file before `done`: the pipe's
//! write end lives only in the parent, so EOF means the parent exited or was killed.
//! Pipe order guarantees that every step announced before the parent died is read before
//! the EOF. Thawing something that is not frozen is harmless (`FITHAW` answers EINVAL, the
//! agent thaws 0 filesystems; hooks must accept a `thaw` without a `freeze`, as qemu-ga's
//! hooks already must).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::agent::AgentClient;
use super::hooks::{self, HookAction, HookRun};
use super::{fs, QuiesceError};
use crate::{error, sys};
use std::os::unix::process::CommandExt;

/// The hidden subcommand of the tidemark binary that runs [`serve`].
pub const WATCHDOG_SUBCOMMAND: &str = "__quiesce-watchdog";

/// How long a freshly spawned watchdog may take to say it is ready.
const READY_LIMIT: Duration = Duration::from_secs(5);
/// How long the parent waits for the watchdog's answer to `thawing`, and for it to exit.
const REPLY_LIMIT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "kebab-case")]
pub(crate) enum ToWatchdog {
    Arm {
        deadline_ns: u64,
        window_limit_ms: u64,
        hook_timeout_ms: u64,
        agent_timeout_ms: u64,
        dirs: Vec<PathBuf>,
    },
    Hook {
        path: PathBuf,
    },
    Agent {
        socket: PathBuf,
    },
    Filesystem {
        mountpoint: PathBuf,
    },
    Thawing,
    Done,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "kebab-case")]
pub(crate) enum FromWatchdog {
    Ready { pid: u32 },
    Go,
    Fired(FiredReport),
}

/// What the watchdog did when it fired.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct FiredReport {
    pub(crate) reason: String,
    /// CLOCK_MONOTONIC when the last thaw step ended.
    pub(crate) thawed_at_ns: u64,
    pub(crate) hooks_thawed: Vec<PathBuf>,
    pub(crate) hook_runs: Vec<HookRun>,
    pub(crate) log: Vec<String>,
    pub(crate) errors: Vec<String>,
}

enum Input {
    Message(ToWatchdog),
    Garbage(String),
    Eof,
}

/// The watchdog process's entry point (`tidemark __quiesce-watchdog`): ignores the stop
/// signals (see `sys::ignore_stop_signals`) and serves on stdin/stdout.
pub fn main() -> i32 {
    if let Err(e) = sys::ignore_stop_signals() {
        log_line(&format!("watchdog: cannot ignore stop signals: {e}"));
    }
    serve(std::io::stdin(), std::io::stdout())
}

/// Runs the watchdog on `input`/`output` (the process's stdin and stdout) until the parent
/// says `done` or, having fired, until the parent is gone. Returns the exit status: 0 when
/// nothing had to be thawed by the watchdog or its thaw went cleanly.
pub fn serve(input: impl Read + Send + 'static, mut output: impl Write) -> i32 {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(input).lines() {
            let item = match line {
                Ok(line) => match serde_json::from_str(&line) {
                    Ok(message) => Input::Message(message),
                    Err(e) => Input::Garbage(format!("{e}: {line}")),
                },
                Err(_) => break,
            };
            if tx.send(item).is_err() {
                return;
            }
        }
        let _ = tx.send(Input::Eof);
    });
    let mut watchdog = Watchdog::default();
    let _ = reply(
        &mut output,
        &FromWatchdog::Ready {
            pid: std::process::id(),
        },
    );
    // Inputs read ahead while taking in announced steps at the deadline.
    let mut backlog = std::collections::VecDeque::new();
    loop {
        let next = match watchdog.deadline_ns {
            _ if !backlog.is_empty() => backlog.pop_front().ok_or(RecvTimeoutError::Disconnected),
            Some(deadline) if !watchdog.thawing && watchdog.fired.is_none() => {
                let now = sys::monotonic_now().as_nanos() as u64;
                rx.recv_timeout(Duration::from_nanos(deadline.saturating_sub(now)))
            }
            _ => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match next {
            Ok(Input::Message(ToWatchdog::Thawing)) => {
                watchdog.thawing = true;
                let answer = match &watchdog.fired {
                    Some(report) => FromWatchdog::Fired(report.clone()),
                    None => FromWatchdog::Go,
                };
                let _ = reply(&mut output, &answer);
            }
            Ok(Input::Message(ToWatchdog::Done)) => return 0,
            Ok(Input::Message(message)) => watchdog.record(message),
            Ok(Input::Garbage(what)) => {
                log_line(&format!(
                    "watchdog: unreadable message from the parent ({what}); thawing"
                ));
                return watchdog.fire("the watchdog got an unreadable message");
            }
            Err(RecvTimeoutError::Timeout) => {
                // Take in every step already announced before acting on the deadline; keep
                // anything else for the loop.
                while let Ok(input) = rx.try_recv() {
                    match input {
                        Input::Message(
                            step @ (ToWatchdog::Arm { .. }
                            | ToWatchdog::Hook { .. }
                            | ToWatchdog::Agent { .. }
                            | ToWatchdog::Filesystem { .. }),
                        ) => watchdog.record(step),
                        other => backlog.push_back(other),
                    }
                }
                let limit = watchdog.limit_text();
                watchdog.fire(&format!("the quiesce window limit{limit} passed"));
            }
            Ok(Input::Eof) | Err(RecvTimeoutError::Disconnected) => {
                return watchdog.fire("the process that froze them exited before thawing");
            }
        }
    }
}

/// To stderr (the daemon's log), ignoring errors: that stream may be gone with the parent,
/// and nothing may stop the watchdog from thawing.
fn log_line(line: &str) {
    let _ = writeln!(std::io::stderr(), "tidemark {line}");
}

fn reply(output: &mut impl Write, message: &FromWatchdog) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    line.push(b'\n');
    output.write_all(&line)?;
    output.flush()
}

#[derive(Debug, Default)]
struct Watchdog {
    deadline_ns: Option<u64>,
    window_limit: Duration,
    hook_timeout: Duration,
    agent_timeout: Duration,
    dirs: Vec<PathBuf>,
    steps: Vec<ToWatchdog>,
    /// Steps before this index were undone when the watchdog fired.
    undone: usize,
    thawing: bool,
    fired: Option<FiredReport>,
}

impl Watchdog {
    fn record(&mut self, message: ToWatchdog) {
        match message {
            ToWatchdog::Arm {
                deadline_ns,
                window_limit_ms,
                hook_timeout_ms,
                agent_timeout_ms,
                dirs,
            } => {
                self.deadline_ns = Some(deadline_ns);
                self.window_limit = Duration::from_millis(window_limit_ms);
                self.hook_timeout = Duration::from_millis(hook_timeout_ms);
                self.agent_timeout = Duration::from_millis(agent_timeout_ms);
                self.dirs = dirs;
            }
            step @ (ToWatchdog::Hook { .. }
            | ToWatchdog::Agent { .. }
            | ToWatchdog::Filesystem { .. }) => self.steps.push(step),
            ToWatchdog::Thawing | ToWatchdog::Done => {}
        }
    }

    fn limit_text(&self) -> String {
        match self.deadline_ns {
            Some(_) => format!(" of {:?}", self.window_limit),
            None => String::new(),
        }
    }

    /// Undoes every step not undone yet, newest first; returns the exit status.
    fn fire(&mut self, reason: &str) -> i32 {
        let mut report = self.fired.take().unwrap_or_default();
        if report.reason.is_empty() {
            report.reason = reason.to_string();
        }
        report.log.push(format!("watchdog: {reason}: thawing"));
        let pending: Vec<ToWatchdog> = self.steps[self.undone..].to_vec();
        self.undone = self.steps.len();
        for step in pending.iter().rev() {
            match step {
                ToWatchdog::Filesystem { mountpoint } => match fs::thaw_path(mountpoint) {
                    Ok(true) => report
                        .log
                        .push(format!("watchdog: thawed {}", mountpoint.display())),
                    Ok(false) => report
                        .log
                        .push(format!("watchdog: {} was not frozen", mountpoint.display())),
                    Err(e) => report
                        .errors
                        .push(format!("watchdog: FITHAW {}: {e}", mountpoint.display())),
                },
                ToWatchdog::Agent { socket } => match thaw_agent(socket, self.agent_timeout) {
                    Ok(count) => report.log.push(format!(
                        "watchdog: guest agent thawed {count} filesystem(s)"
                    )),
                    Err(e) => report
                        .errors
                        .push(format!("watchdog: {}", error::chain(&e))),
                },
                ToWatchdog::Hook { path } => {
                    let run = hooks::run(path, HookAction::Thaw, &self.dirs, self.hook_timeout);
                    report.log.extend(
                        run.log_lines()
                            .into_iter()
                            .map(|l| format!("watchdog: {l}")),
                    );
                    if let Some(failure) = run.failure(self.hook_timeout) {
                        report.errors.push(format!("watchdog: {failure}"));
                    }
                    report.hooks_thawed.push(path.clone());
                    report.hook_runs.push(run);
                }
                ToWatchdog::Arm { .. } | ToWatchdog::Thawing | ToWatchdog::Done => {}
            }
        }
        report.thawed_at_ns = sys::monotonic_now().as_nanos() as u64;
        for line in report.log.iter().chain(&report.errors) {
            log_line(line);
        }
        let status = i32::from(!report.errors.is_empty());
        self.fired = Some(report);
        status
    }
}

fn thaw_agent(socket: &Path, limit: Duration) -> Result<u64, super::agent::AgentError> {
    let mut client = AgentClient::connect(socket, limit)?;
    client.fsfreeze_thaw(limit)
}

/// The parent's end of a running watchdog.
#[derive(Debug)]
pub(crate) struct WatchdogHandle {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    replies: Receiver<FromWatchdog>,
}

impl WatchdogHandle {
    /// Starts `exe __quiesce-watchdog` and waits until it is ready.
    pub(crate) fn spawn(exe: &Path) -> Result<Self, QuiesceError> {
        let failed = |reason: String| QuiesceError::Watchdog {
            exe: exe.to_path_buf(),
            reason,
        };
        let mut child = Command::new(exe)
            .arg(WATCHDOG_SUBCOMMAND)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .map_err(|e| failed(e.to_string()))?;
        let (tx, replies) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(message) = serde_json::from_str::<FromWatchdog>(&line) {
                        if tx.send(message).is_err() {
                            break;
                        }
                    }
                }
            });
        }
        let stdin = child.stdin.take();
        let mut handle = WatchdogHandle {
            child: Some(child),
            stdin,
            replies,
        };
        match handle.replies.recv_timeout(READY_LIMIT) {
            Ok(FromWatchdog::Ready { .. }) => Ok(handle),
            Ok(other) => {
                handle.kill();
                Err(failed(format!("it answered {other:?} instead of ready")))
            }
            Err(_) => {
                handle.kill();
                Err(failed(format!(
                    "it did not start within {READY_LIMIT:?} (is this the tidemark binary, with the \
                     hidden `{WATCHDOG_SUBCOMMAND}` subcommand?)"
                )))
            }
        }
    }

    pub(crate) fn send(&mut self, message: &ToWatchdog) -> Result<(), String> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or("the watchdog is already released")?;
        let mut line = serde_json::to_vec(message).map_err(|e| e.to_string())?;
        line.push(b'\n');
        stdin
            .write_all(&line)
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("the watchdog is gone ({e})"))
    }

    /// Says the parent is thawing now; returns the watchdog's report if it already fired.
    pub(crate) fn begin_thaw(&mut self) -> Result<Option<FiredReport>, String> {
        self.send(&ToWatchdog::Thawing)?;
        let deadline = Instant::now() + REPLY_LIMIT;
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            match self.replies.recv_timeout(wait) {
                Ok(FromWatchdog::Go) => return Ok(None),
                Ok(FromWatchdog::Fired(report)) => return Ok(Some(report)),
                Ok(FromWatchdog::Ready { .. }) => continue,
                Err(_) => {
                    return Err(format!(
                        "the watchdog did not answer within {REPLY_LIMIT:?}"
                    ))
                }
            }
        }
    }

    /// Everything is thawed: tells the watchdog so and reaps it.
    pub(crate) fn finish(mut self) {
        let _ = self.send(&ToWatchdog::Done);
        self.stdin = None;
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + REPLY_LIMIT;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(2));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn kill(&mut self) {
        self.stdin = None;
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for WatchdogHandle {
    /// Dropped without [`finish`](Self::finish): closing its stdin makes the watchdog
    /// thaw everything it knows of; a thread reaps it when it is done.
    fn drop(&mut self) {
        self.stdin = None;
        if let Some(mut child) = self.child.take() {
            thread::spawn(move || {
                let _ = child.wait();
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{pipe, PipeReader, PipeWriter};
    use std::os::unix::fs::PermissionsExt;

    struct Harness {
        to: Option<PipeWriter>,
        from: BufReader<PipeReader>,
        served: Option<thread::JoinHandle<i32>>,
        _dir: tempfile::TempDir,
        hook: PathBuf,
        log: PathBuf,
    }

    /// A watchdog served in-process over pipes, with one hook step announced that records
    /// each run in a log.
    fn harness(deadline_in: Duration) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("hook.log");
        let hook = dir.path().join("10-app");
        std::fs::write(
            &hook,
            format!("#!/bin/sh\necho \"$1\" >> '{}'\n", log.display()),
        )
        .unwrap();
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (in_r, in_w) = pipe().unwrap();
        let (out_r, out_w) = pipe().unwrap();
        let served = thread::spawn(move || serve(in_r, out_w));
        let mut h = Harness {
            to: Some(in_w),
            from: BufReader::new(out_r),
            served: Some(served),
            _dir: dir,
            hook,
            log,
        };
        assert!(matches!(h.read(), FromWatchdog::Ready { .. }));
        let deadline = sys::monotonic_now() + deadline_in;
        h.send(&ToWatchdog::Arm {
            deadline_ns: deadline.as_nanos() as u64,
            window_limit_ms: deadline_in.as_millis() as u64,
            hook_timeout_ms: 5000,
            agent_timeout_ms: 1000,
            dirs: vec![],
        });
        let hook = h.hook.clone();
        h.send(&ToWatchdog::Hook { path: hook });
        h
    }

    impl Harness {
        fn send(&mut self, message: &ToWatchdog) {
            let mut line = serde_json::to_vec(message).unwrap();
            line.push(b'\n');
            self.to.as_mut().unwrap().write_all(&line).unwrap();
        }

        fn read(&mut self) -> FromWatchdog {
            let mut line = String::new();
            self.from.read_line(&mut line).unwrap();
            serde_json::from_str(&line).unwrap()
        }

        fn join(&mut self) -> i32 {
            self.served.take().unwrap().join().unwrap()
        }

        fn hook_log(&self) -> String {
            std::fs::read_to_string(&self.log).unwrap_or_default()
        }
    }

    #[test]
    fn at_the_deadline_it_thaws_and_tells_the_parent_when_it_comes_to_thaw() {
        let start = Instant::now();
        let mut h = harness(Duration::from_millis(300));
        while h.hook_log().is_empty() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "the watchdog never fired"
            );
            thread::sleep(Duration::from_millis(5));
        }
        assert!(
            start.elapsed() >= Duration::from_millis(290),
            "fired early: {:?}",
            start.elapsed()
        );
        assert_eq!(h.hook_log(), "thaw\n");
        h.send(&ToWatchdog::Thawing);
        let FromWatchdog::Fired(report) = h.read() else {
            panic!("expected a fired report")
        };
        assert!(
            report.reason.contains("window limit of 300ms"),
            "{}",
            report.reason
        );
        assert_eq!(report.hooks_thawed, vec![h.hook.clone()]);
        h.send(&ToWatchdog::Done);
        assert_eq!(h.join(), 0);
    }

    #[test]
    fn when_the_parent_goes_away_it_thaws_at_once() {
        let mut h = harness(Duration::from_secs(60));
        let start = Instant::now();
        h.to = None;
        assert_eq!(h.join(), 0);
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(h.hook_log(), "thaw\n");
    }

    #[test]
    fn a_parent_that_thaws_in_time_gets_go_and_nothing_is_undone() {
        let mut h = harness(Duration::from_secs(60));
        h.send(&ToWatchdog::Thawing);
        assert!(matches!(h.read(), FromWatchdog::Go));
        h.send(&ToWatchdog::Done);
        assert_eq!(h.join(), 0);
        assert_eq!(h.hook_log(), "");
    }

    #[test]
    fn an_unreadable_message_makes_it_thaw_rather_than_guess() {
        let mut h = harness(Duration::from_secs(60));
        h.to.as_mut()
            .unwrap()
            .write_all(b"{\"msg\": \"bogus\"}\n")
            .unwrap();
        assert_eq!(h.join(), 0);
        assert_eq!(h.hook_log(), "thaw\n");
    }
}
