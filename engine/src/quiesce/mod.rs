//! Quiescing: make applications, host filesystems and guest filesystems consistent for the
//! instant a snapshot is taken, then let them go again, within a hard time limit.
//!
//! # Use
//!
//! ```no_run
//! use std::path::PathBuf;
//! use tidemark_engine::quiesce::{self, QuiesceSpec};
//!
//! let spec = QuiesceSpec {
//!     hooks_dirs: quiesce::default_hooks_dirs(),
//!     mountpoints: vec![PathBuf::from("/srv/db")],
//!     guest_agent: Some(PathBuf::from("/run/vm1/qga.sock")),
//!     protected_paths: vec![PathBuf::from("/var/lib/tidemark")],
//!     ..QuiesceSpec::default()
//! };
//! let quiesced = quiesce::quiesce(&spec)?;      // hooks, guest agent, FIFREEZE
//! // ... take the snapshot: milliseconds ...
//! let report = quiesced.thaw();                 // FITHAW, agent thaw, hooks' thaw
//! println!("frozen for {:?}", report.freeze_to_thaw);
//! # Ok::<(), quiesce::QuiesceError>(())
//! ```
//!
//! [`quiesce`] freezes in this order and [`Quiesced::thaw`] undoes it in reverse:
//! 1. hooks ([`hooks`]): executables from [`QuiesceSpec::hooks_dirs`] run in name order
//!    with `freeze DIR...` (DIR = the mountpoints), each within [`QuiesceSpec::hook_timeout`];
//! 2. the guest agent ([`agent`]): `guest-fsfreeze-freeze` (or `-freeze-list` with
//!    [`QuiesceSpec::guest_mountpoints`]) over the qemu-ga socket, then
//!    `guest-fsfreeze-status` to confirm;
//! 3. host filesystems: `syncfs` before the window opens, then `FIFREEZE` sorted by path.
//!
//! A failing step aborts: everything already frozen is thawed (including the hook that
//! failed, which may have half frozen) and [`QuiesceError::Aborted`] carries the log.
//!
//! # Hard limits
//!
//! The window (first freeze step to last thaw step) has a limit,
//! [`QuiesceSpec::window_limit`] (default 10 s). Every freeze step gets at most what is left
//! of it. Before anything freezes, a watchdog process ([`watchdog`]) is started and told
//! each step before it happens; it thaws everything when the window limit passes (even if
//! the caller hangs) or when the caller dies (even by `kill -9`). The watchdog is the
//! tidemark binary's hidden `__quiesce-watchdog` subcommand, found through
//! [`std::env::current_exe`] or [`QuiesceSpec::watchdog_exe`]. Dropping a [`Quiesced`]
//! thaws as [`Quiesced::thaw`] does.
//!
//! Refused: freezing `/`, or the filesystem holding any of
//! [`QuiesceSpec::protected_paths`] (tidemark's state dir, the COW store): our own writes
//! would block behind the freeze until the watchdog gave up.

pub mod agent;
mod fs;
pub mod hooks;
pub mod watchdog;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Serialize, Serializer};

use agent::{AgentClient, AgentError};
use fs::FrozenFs;
use hooks::{HookAction, HookRun};
use watchdog::{FiredReport, ToWatchdog, WatchdogHandle};

use crate::{error, sys};

/// tidemark's own hook directory.
pub const WRITERS_DIR: &str = "/usr/lib/tidemark/writers.d";
/// qemu-ga's hook directory. It belongs inside guests (qemu-guest-agent runs it there),
/// so it is never run on the host by default; name it with `--hooks` to opt in.
pub const QEMU_HOOKS_DIR: &str = "/etc/qemu/fsfreeze-hooks.d";

/// The hook directories run when none is named: [`WRITERS_DIR`] only.
pub const DEFAULT_HOOKS_DIRS: &[&str] = &[WRITERS_DIR];

/// The [`DEFAULT_HOOKS_DIRS`] that exist here.
pub fn default_hooks_dirs() -> Vec<PathBuf> {
    DEFAULT_HOOKS_DIRS
        .iter()
        .map(PathBuf::from)
        .filter(|dir| dir.is_dir())
        .collect()
}

/// What to quiesce, and the time limits.
#[derive(Debug, Clone)]
pub struct QuiesceSpec {
    /// Directories of freeze hooks; each must exist (see [`default_hooks_dirs`]).
    pub hooks_dirs: Vec<PathBuf>,
    /// Host mountpoints to freeze with FIFREEZE.
    pub mountpoints: Vec<PathBuf>,
    /// The host end of a VM's qemu-guest-agent channel (a Unix socket).
    pub guest_agent: Option<PathBuf>,
    /// Guest mountpoints for `guest-fsfreeze-freeze-list`; empty freezes them all.
    pub guest_mountpoints: Vec<String>,
    /// Paths whose filesystem must never be frozen (state dir, COW store).
    pub protected_paths: Vec<PathBuf>,
    /// Limit for each hook run (a freeze run also gets at most what is left of the window).
    pub hook_timeout: Duration,
    /// Limit for each guest-agent call (including connecting and syncing).
    pub agent_timeout: Duration,
    /// Limit for the whole window, first freeze to last thaw.
    pub window_limit: Duration,
    /// The tidemark binary that runs the watchdog; `None` is this process's executable.
    pub watchdog_exe: Option<PathBuf>,
}

impl Default for QuiesceSpec {
    fn default() -> Self {
        QuiesceSpec {
            hooks_dirs: Vec::new(),
            mountpoints: Vec::new(),
            guest_agent: None,
            guest_mountpoints: Vec::new(),
            protected_paths: Vec::new(),
            hook_timeout: Duration::from_secs(5),
            agent_timeout: Duration::from_secs(10),
            window_limit: Duration::from_secs(10),
            watchdog_exe: None,
        }
    }
}

/// Errors of quiescing.
#[derive(Debug, thiserror::Error)]
pub enum QuiesceError {
    #[error("refusing to freeze {mountpoint}: it is the root filesystem, and freezing it would freeze tidemark itself; freeze the data filesystems instead")]
    RefuseRoot { mountpoint: PathBuf },
    #[error("refusing to freeze {mountpoint}: it holds {path}, where tidemark writes during the backup (freezing it would deadlock); move the state dir or COW store to another filesystem")]
    RefuseOwnState { mountpoint: PathBuf, path: PathBuf },
    #[error("cannot freeze {path}: it is not a mount point (give the directory a filesystem is mounted on, as in /proc/mounts)")]
    NotAMountpoint { path: PathBuf },
    #[error("cannot {what} {path}")]
    Io {
        what: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("refusing the {what} {}: {reason}; hooks run with the daemon's privileges, so make it owned by root (or the daemon's user) and not writable by group or others (chown root; chmod go-w)", path.display())]
    UntrustedHook {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error("cannot read the hooks directory {dir}")]
    HooksDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("cannot start the thaw watchdog {exe}: {reason}; nothing was frozen")]
    Watchdog { exe: PathBuf, reason: String },
    #[error(
        "quiesce aborted: {reason}; everything already frozen was thawed{}",
        thaw_problems(report)
    )]
    Aborted {
        reason: String,
        report: Box<ThawReport>,
    },
}

fn thaw_problems(report: &ThawReport) -> String {
    if report.errors.is_empty() {
        String::new()
    } else {
        format!(" (thaw problems: {})", report.errors.join("; "))
    }
}

/// What the guest agent froze.
#[derive(Debug, Clone, Serialize)]
pub struct AgentFreeze {
    pub socket: PathBuf,
    /// How many filesystems the agent says it froze.
    pub frozen: u64,
    /// The guest's filesystems it froze: the requested list, or the guest's mounts
    /// (`guest-get-fsinfo`) when it froze all (empty if the guest could not say).
    pub mountpoints: Vec<String>,
}

/// What is frozen, for a status report.
#[derive(Debug, Clone, Serialize)]
pub struct QuiesceSummary {
    pub hooks: Vec<PathBuf>,
    pub filesystems: Vec<PathBuf>,
    pub agent: Option<AgentFreeze>,
    /// From the first freeze step to everything frozen.
    #[serde(rename = "freeze_ms", serialize_with = "millis")]
    pub freeze: Duration,
    #[serde(rename = "window_limit_ms", serialize_with = "millis")]
    pub window_limit: Duration,
}

/// What thawing did, and how long things were frozen.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ThawReport {
    /// From the first freeze step to the end of the last thaw step.
    #[serde(rename = "freeze_to_thaw_ms", serialize_with = "millis")]
    pub freeze_to_thaw: Duration,
    /// From the first FIFREEZE to the last FITHAW (`None` if no host filesystem froze).
    #[serde(rename = "filesystems_frozen_ms", serialize_with = "opt_millis")]
    pub filesystems_frozen: Option<Duration>,
    /// Set when the watchdog thawed (the window limit passed): why.
    pub thawed_by_watchdog: Option<String>,
    /// Every hook run, freeze and thaw, with captured output.
    pub hook_runs: Vec<HookRun>,
    /// The whole quiesce log: steps, timings, hook output.
    pub log: Vec<String>,
    /// What went wrong while thawing (empty when clean).
    pub errors: Vec<String>,
}

impl ThawReport {
    /// Thawed by the caller in time, with no error.
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty() && self.thawed_by_watchdog.is_none()
    }
}

fn millis<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

fn opt_millis<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => millis(d, s),
        None => s.serialize_none(),
    }
}

/// Something frozen, until [`Quiesced::thaw`] (or drop).
#[derive(Debug)]
pub struct Quiesced {
    hook_dirs_args: Vec<PathBuf>,
    hooks: Vec<PathBuf>,
    agent: Option<AgentFreeze>,
    filesystems: Vec<FrozenFs>,
    watchdog: Option<WatchdogHandle>,
    started: Instant,
    started_mono: Duration,
    first_fifreeze: Option<Instant>,
    all_frozen: Duration,
    hook_timeout: Duration,
    agent_timeout: Duration,
    window_limit: Duration,
    hook_runs: Vec<HookRun>,
    log: Vec<String>,
    thawed: bool,
}

impl Quiesced {
    /// Hooks whose `freeze` ran, in freeze order.
    pub fn hooks(&self) -> &[PathBuf] {
        &self.hooks
    }

    /// Host filesystems frozen, in freeze order.
    pub fn filesystems(&self) -> Vec<&Path> {
        self.filesystems
            .iter()
            .map(|f| f.mountpoint.as_path())
            .collect()
    }

    /// What the guest agent froze.
    pub fn agent(&self) -> Option<&AgentFreeze> {
        self.agent.as_ref()
    }

    /// How long the window has been open.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// What is left of the window limit.
    pub fn remaining(&self) -> Duration {
        self.window_limit.saturating_sub(self.started.elapsed())
    }

    /// The log so far (steps, hook output).
    pub fn log(&self) -> &[String] {
        &self.log
    }

    pub fn summary(&self) -> QuiesceSummary {
        QuiesceSummary {
            hooks: self.hooks.clone(),
            filesystems: self
                .filesystems
                .iter()
                .map(|f| f.mountpoint.clone())
                .collect(),
            agent: self.agent.clone(),
            freeze: self.all_frozen,
            window_limit: self.window_limit,
        }
    }

    /// Thaws everything, in reverse order, and reports how long it was frozen.
    pub fn thaw(mut self) -> ThawReport {
        self.thaw_all()
    }

    fn note(&mut self, line: String) {
        tracing::debug!("{line}");
        self.log.push(format!(
            "[+{:.1} ms] {line}",
            self.started.elapsed().as_secs_f64() * 1e3
        ));
    }

    fn thaw_all(&mut self) -> ThawReport {
        self.thawed = true;
        let mut errors = Vec::new();
        let mut fired = FiredReport::default();
        let mut watchdog_fired = false;
        if let Some(watchdog) = self.watchdog.as_mut() {
            match watchdog.begin_thaw() {
                Ok(Some(report)) => {
                    fired = report;
                    watchdog_fired = true;
                }
                Ok(None) => {}
                Err(e) => self.note(format!("{e}; thawing without it")),
            }
        }
        if watchdog_fired {
            errors.push(format!(
                "the window limit of {:?} passed before thawing: the watchdog thawed ({})",
                self.window_limit, fired.reason
            ));
            errors.extend(fired.errors.iter().cloned());
            self.log.extend(fired.log.iter().cloned());
            self.hook_runs.extend(fired.hook_runs.iter().cloned());
        }
        for frozen in std::mem::take(&mut self.filesystems).iter().rev() {
            match frozen.thaw() {
                Ok(true) => self.note(format!("FITHAW {}", frozen.mountpoint.display())),
                Ok(false) if watchdog_fired => {}
                Ok(false) => self.note(format!(
                    "{} was already thawed by someone else",
                    frozen.mountpoint.display()
                )),
                Err(e) => errors.push(format!(
                    "FITHAW {}: {e}; thaw it with `fsfreeze -u`",
                    frozen.mountpoint.display()
                )),
            }
        }
        let filesystems_thawed = Instant::now();
        if let Some(agent) = &self.agent {
            let socket = agent.socket.clone();
            let result = AgentClient::connect(&socket, self.agent_timeout)
                .and_then(|mut client| client.fsfreeze_thaw(self.agent_timeout));
            match result {
                Ok(count) => self.note(format!("guest agent thawed {count} filesystem(s)")),
                Err(e) => errors.push(format!(
                    "{}; the guest may still be frozen",
                    error::chain(&e)
                )),
            }
        }
        for hook in std::mem::take(&mut self.hooks).iter().rev() {
            if fired.hooks_thawed.contains(hook) {
                continue;
            }
            let run = hooks::run(
                hook,
                HookAction::Thaw,
                &self.hook_dirs_args,
                self.hook_timeout,
            );
            self.log.extend(run.log_lines());
            if let Some(failure) = run.failure(self.hook_timeout) {
                errors.push(failure);
            }
            self.hook_runs.push(run);
        }
        let mut freeze_to_thaw = self.started.elapsed();
        if watchdog_fired {
            freeze_to_thaw =
                Duration::from_nanos(fired.thawed_at_ns).saturating_sub(self.started_mono);
        }
        self.note(format!(
            "thawed; frozen for {:.1} ms",
            freeze_to_thaw.as_secs_f64() * 1e3
        ));
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.finish();
        }
        ThawReport {
            freeze_to_thaw,
            filesystems_frozen: self
                .first_fifreeze
                .map(|t| filesystems_thawed.duration_since(t)),
            thawed_by_watchdog: watchdog_fired.then(|| fired.reason.clone()),
            hook_runs: std::mem::take(&mut self.hook_runs),
            log: std::mem::take(&mut self.log),
            errors,
        }
    }

    /// Thaws what is frozen so far and turns `reason` into [`QuiesceError::Aborted`].
    fn abort(mut self, reason: String) -> QuiesceError {
        self.note(format!("aborting: {reason}"));
        let report = self.thaw_all();
        QuiesceError::Aborted {
            reason,
            report: Box::new(report),
        }
    }

    fn tell_watchdog(&mut self, message: ToWatchdog) -> Result<(), String> {
        match self.watchdog.as_mut() {
            Some(watchdog) => watchdog.send(&message),
            None => Ok(()),
        }
    }
}

impl Drop for Quiesced {
    fn drop(&mut self) {
        if !self.thawed {
            let report = self.thaw_all();
            for error in &report.errors {
                tracing::warn!("thawing on drop: {error}");
            }
        }
    }
}

/// Freezes what `spec` names (hooks, then the guest agent, then host filesystems), with
/// a watchdog armed. See the module doc.
pub fn quiesce(spec: &QuiesceSpec) -> Result<Quiesced, QuiesceError> {
    let mountpoints = fs::plan(&spec.mountpoints, &spec.protected_paths)?;
    let hooks = hooks::discover(&spec.hooks_dirs)?;
    // Everything that may be slow happens before the window opens: writeback, connecting
    // to the agent and syncing with it, asking which filesystems the guest has.
    fs::presync(&mountpoints)?;
    let mut agent = match &spec.guest_agent {
        Some(socket) => Some(AgentClient::connect(socket, spec.agent_timeout)?),
        None => None,
    };
    let guest_mounts = match (&mut agent, spec.guest_mountpoints.is_empty()) {
        (Some(client), true) => client
            .filesystems(spec.agent_timeout)
            .map(|list| list.into_iter().map(|fs| fs.mountpoint).collect())
            .unwrap_or_default(),
        _ => spec.guest_mountpoints.clone(),
    };
    let watchdog = if hooks.is_empty() && mountpoints.is_empty() && agent.is_none() {
        None
    } else {
        let exe = match &spec.watchdog_exe {
            Some(exe) => exe.clone(),
            None => std::env::current_exe().map_err(|e| QuiesceError::Watchdog {
                exe: PathBuf::from("/proc/self/exe"),
                reason: e.to_string(),
            })?,
        };
        Some(WatchdogHandle::spawn(&exe)?)
    };

    let started = Instant::now();
    let started_mono = sys::monotonic_now();
    let deadline = started + spec.window_limit;
    let mut q = Quiesced {
        hook_dirs_args: mountpoints.clone(),
        hooks: Vec::new(),
        agent: None,
        filesystems: Vec::new(),
        watchdog,
        started,
        started_mono,
        first_fifreeze: None,
        all_frozen: Duration::ZERO,
        hook_timeout: spec.hook_timeout,
        agent_timeout: spec.agent_timeout,
        window_limit: spec.window_limit,
        hook_runs: Vec::new(),
        log: Vec::new(),
        thawed: false,
    };
    let arm = ToWatchdog::Arm {
        deadline_ns: (started_mono + spec.window_limit).as_nanos() as u64,
        window_limit_ms: spec.window_limit.as_millis() as u64,
        hook_timeout_ms: spec.hook_timeout.as_millis() as u64,
        agent_timeout_ms: spec.agent_timeout.as_millis() as u64,
        dirs: mountpoints.clone(),
    };
    if let Err(e) = q.tell_watchdog(arm) {
        return Err(q.abort(e));
    }
    let remaining = |what: &str| {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(format!(
                "the window limit of {:?} passed before {what}",
                spec.window_limit
            ))
        } else {
            Ok(left)
        }
    };

    for hook in hooks {
        let left = match remaining(&format!("hook {} could freeze", hook.display())) {
            Ok(left) => left,
            Err(e) => return Err(q.abort(e)),
        };
        if let Err(e) = q.tell_watchdog(ToWatchdog::Hook { path: hook.clone() }) {
            return Err(q.abort(e));
        }
        // Recorded before it runs: a hook that fails half way still gets its thaw.
        q.hooks.push(hook.clone());
        let limit = spec.hook_timeout.min(left);
        let run = hooks::run(&hook, HookAction::Freeze, &mountpoints, limit);
        q.log.extend(run.log_lines());
        let failure = run.failure(limit);
        q.hook_runs.push(run);
        if let Some(failure) = failure {
            return Err(q.abort(failure));
        }
    }

    if let (Some(mut client), Some(socket)) = (agent, spec.guest_agent.clone()) {
        let left = match remaining("the guest agent could freeze") {
            Ok(left) => left,
            Err(e) => return Err(q.abort(e)),
        };
        if let Err(e) = q.tell_watchdog(ToWatchdog::Agent {
            socket: socket.clone(),
        }) {
            return Err(q.abort(e));
        }
        // Recorded before the call: a freeze that times out may still complete in the guest.
        q.agent = Some(AgentFreeze {
            socket,
            frozen: 0,
            mountpoints: guest_mounts,
        });
        let limit = spec.agent_timeout.min(left);
        let frozen = client
            .fsfreeze_freeze(&spec.guest_mountpoints, limit)
            .and_then(|count| {
                let status = client.fsfreeze_status(
                    deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(1)),
                )?;
                Ok((count, status))
            });
        // The channel takes one client at a time: let go of it so the watchdog could thaw.
        drop(client);
        match frozen {
            Ok((count, status)) if status == "frozen" => {
                if let Some(agent) = q.agent.as_mut() {
                    agent.frozen = count;
                }
                q.note(format!("guest agent froze {count} filesystem(s)"));
            }
            Ok((_, status)) => {
                return Err(q.abort(format!(
                    "the guest agent reports its filesystems {status:?} after freezing"
                )))
            }
            Err(e) => return Err(q.abort(error::chain(&e))),
        }
    }

    for mountpoint in &mountpoints {
        if let Err(e) = remaining(&format!("{} could freeze", mountpoint.display())) {
            return Err(q.abort(e));
        }
        if let Err(e) = q.tell_watchdog(ToWatchdog::Filesystem {
            mountpoint: mountpoint.clone(),
        }) {
            return Err(q.abort(e));
        }
        q.first_fifreeze.get_or_insert_with(Instant::now);
        match fs::freeze(mountpoint) {
            Ok(frozen) => {
                q.filesystems.push(frozen);
                q.note(format!("FIFREEZE {}", mountpoint.display()));
            }
            Err(e) => return Err(q.abort(e)),
        }
    }

    if let Err(e) = remaining("everything was frozen") {
        return Err(q.abort(e));
    }
    q.all_frozen = started.elapsed();
    q.note(format!(
        "all frozen in {:.1} ms",
        q.all_frozen.as_secs_f64() * 1e3
    ));
    Ok(q)
}
