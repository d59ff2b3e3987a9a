//! `tidemark snapshot [-t TARGET] DIR...`: mounted, consistent point-in-time views of the
//! filesystems that hold DIR..., held for exactly as long as the caller keeps stdin open.
//!
//! The contract with the calling backup program:
//! 1. each DIR's filesystem is found in /proc/self/mountinfo, and its tidemark volume by
//!    the filesystem's device (an attached volume: /dev/loopN over FUSE, /dev/nbdN);
//! 2. the daemon runs the freeze hooks, FIFREEZEs every such filesystem, snapshots all
//!    their volumes in one write pause and thaws (`backup-begin` with a lease on this
//!    process's control connection: its time limits and watchdog thaw apply);
//! 3. each snapshot is attached read-only and mounted at TARGET/<mount point> (ext4
//!    `ro,noload`, xfs `ro,norecovery,nouuid`, others `ro`); a DIR whose filesystem is not
//!    on a tidemark volume is bind-mounted read-only at TARGET/DIR with a warning (it is
//!    live, not a snapshot), or refused with `--strict`;
//! 4. stdout closes (after one JSON line with `--json`): the views are ready;
//! 5. stdin closes (the caller is done, or died), or SIGINT/SIGTERM/SIGHUP arrives: unmount,
//!    detach, end the backup (its snapshots drop).
//!
//! Every step that leaves something behind is written to a record,
//! `<state-dir>/snapshot-leases/<pid>.json`, before it is taken. If this process is killed,
//! the daemon ends the backup as soon as the control connection drops, and the next
//! `tidemark snapshot` (or `tidemark snapshot --cleanup`) unmounts and detaches what the
//! record of a dead process lists. Nothing stays frozen either way: the daemon froze, and
//! its watchdog thaws.

use std::collections::BTreeMap;
use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::signal::{SigSet, Signal};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tidemark_daemon::attach::Via;
use tidemark_daemon::client::{Client, ClientError};
use tidemark_daemon::protocol::{
    BackupBeginArgs, BackupEndArgs, Command as Request, ErrorClass, NoArguments, VolumeAttachArgs,
    VolumeNameArgs,
};
use tidemark_engine::quiesce::{QEMU_HOOKS_DIR, WRITERS_DIR};

use crate::control::{self, ClientArgs};
use crate::ui;

/// Where the views are mounted when -t is not given.
pub const DEFAULT_TARGET: &str = "/mnt/tidemark-snapshot";

/// The records of running (or killed) snapshot leases, under the state dir.
const LEASES_DIR: &str = "snapshot-leases";

/// How long an unmount keeps retrying a busy filesystem before detaching it lazily.
const UNMOUNT_PATIENCE: Duration = Duration::from_secs(5);

/// Mounted, consistent snapshots of the filesystems holding DIR..., held while stdin is open.
///
/// For a backup program: run it with a pipe on stdin and stdout, wait for stdout to close
/// (the views are ready: back up TARGET as if it were /), and close stdin when done. If
/// the program dies, stdin closes and everything is unmounted, detached and dropped.
///
/// Each DIR's filesystem must sit on an attached tidemark volume (`tidemark volume attach`)
/// to be snapshotted: freeze hooks (/usr/lib/tidemark/writers.d, then
/// /etc/qemu/fsfreeze-hooks.d) run with `freeze MOUNTPOINT...`, the filesystems are
/// frozen, all volumes are snapshotted in one write pause, then thawed; each snapshot is
/// attached read-only and mounted at TARGET/<mount point>. A DIR on any other filesystem is
/// bind-mounted read-only at TARGET/DIR with a warning (it is the live directory, not a
/// consistent snapshot); --strict refuses it instead.
///
/// Examples:
///   tidemark snapshot -t /mnt/snap /srv /var/lib/postgresql
///   tidemark snapshot --cleanup        (after tidemark itself was killed)
///
/// Exit status: 0 success; 2 failure (the snapshot failed while held, or cleanup left
/// something behind); 3 the daemon cannot be reached.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The directories to capture.
    #[arg(value_name = "DIR", required_unless_present = "cleanup")]
    dirs: Vec<PathBuf>,

    /// Where the views are mounted: each filesystem at TARGET/<its mount point>.
    #[arg(short = 't', long, value_name = "TARGET", default_value = DEFAULT_TARGET)]
    target: PathBuf,

    /// Refuse a DIR whose filesystem is not on a tidemark volume instead of bind-mounting
    /// the live directory.
    #[arg(long)]
    strict: bool,

    /// Only unmount, detach and drop what killed `tidemark snapshot` processes left.
    #[arg(long, conflicts_with_all = ["dirs", "strict"])]
    cleanup: bool,

    /// Run the freeze/thaw hooks of this directory instead of the default ones
    /// (/usr/lib/tidemark/writers.d, then /etc/qemu/fsfreeze-hooks.d, those that exist);
    /// repeatable.
    #[arg(long, value_name = "DIR")]
    hooks: Vec<PathBuf>,

    /// Run no freeze/thaw hooks.
    #[arg(long, conflicts_with = "hooks")]
    no_hooks: bool,

    /// Hard limit on the whole freeze-to-thaw window, in seconds (default 10).
    #[arg(long, value_name = "SECONDS")]
    quiesce_timeout: Option<f64>,

    /// Cap each snapshot's copy-on-write store (e.g. 2G); if the live volumes overwrite
    /// more than this while held, the snapshot fails and this command exits with 2.
    #[arg(long, value_name = "SIZE", value_parser = ui::parse_size)]
    cow_limit: Option<u64>,

    #[command(flatten)]
    client: ClientArgs,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    control::finish(args.client.json, run_inner(args))
}

fn run_inner(args: Args) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    // Blocked before any thread exists, so every thread inherits the mask and the signals
    // wait for `sigwait` in the holding phase (a Ctrl-C during setup cleans up after it).
    stop_signals()
        .thread_block()
        .context("blocking SIGINT/SIGTERM/SIGHUP")?;
    let leases = args.client.state_dir()?.join(LEASES_DIR);
    let cleaned = cleanup_stale(&leases);
    if args.cleanup {
        return report_cleanup(&cleaned, args.client.json);
    }
    for problem in cleaned.iter().filter_map(|c| c.problem.as_ref()) {
        eprintln!("tidemark: warning: {problem}");
    }
    let hooks = hook_dirs(&args);
    let quiesce_timeout_ms = super::backup::quiesce_timeout_ms(args.quiesce_timeout)?;
    let target = std::path::absolute(&args.target)
        .with_context(|| format!("resolving -t {}", args.target.display()))?;

    let mut client = args.client.connect()?;
    let status = client.execute(&Request::QueryStatus(NoArguments {}))?;
    let mounts = parse_mountinfo(
        &fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?,
    );
    let mut plan = plan(&args.dirs, &mounts, &attached_volumes(&status), &target)?;
    if let Some(refused) = plan.views.iter().find(|v| v.volume.is_none()) {
        if args.strict {
            bail!(
                "{} is on {} ({} on {}), which is not an attached tidemark volume; without \
                 --strict it would be bind-mounted live, not snapshotted; attach its volume \
                 (`tidemark volume attach`) and put the filesystem there",
                refused.dirs[0].display(),
                refused.mountpoint.display(),
                refused.fstype,
                refused.source
            );
        }
    }
    let mut lease = Lease::create(&leases, &args.client.control_path()?)?;
    let held = match lease.take(
        &mut client,
        &mut plan,
        &target,
        &hooks,
        quiesce_timeout_ms,
        args.cow_limit,
    ) {
        Ok(held) => held,
        Err(err) => {
            let problems = lease.release(&mut client);
            for problem in problems {
                eprintln!("tidemark: warning: {problem}");
            }
            return Err(err);
        }
    };
    let ready_ms = started.elapsed().as_secs_f64() * 1e3;
    let report = json!({
        "target": target,
        "backup": held.backup,
        "write_pause_us": held.write_pause_us,
        "freeze_to_thaw_ms": held.freeze_to_thaw_ms,
        "ready_ms": ready_ms,
        "steps_ms": held.steps_ms,
        "mounts": plan.views.iter().map(View::report).collect::<Vec<_>>(),
    });
    announce(&plan, &report, args.client.json)?;
    // Released however holding ended (a daemon gone mid-hold included).
    let ended = hold(&mut client, held.backup.as_deref());
    let problems = lease.release(&mut client);
    for problem in &problems {
        eprintln!("tidemark: warning: {problem}");
    }
    let ended = ended?;
    if let Some(why) = ended.snapshot_failed {
        bail!(
            "the snapshot failed while it was held ({why}); what was read from TARGET after \
             that is not a consistent view, take it again"
        );
    }
    if !problems.is_empty() {
        bail!("cleanup left something behind; run `tidemark snapshot --cleanup` once what holds it is gone");
    }
    eprintln!(
        "tidemark: {} ended: unmounted, detached and dropped",
        ended.why
    );
    Ok(ExitCode::SUCCESS)
}

fn stop_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    set
}

/// The hook directories to run: the named ones, none, or the defaults that exist.
fn hook_dirs(args: &Args) -> Vec<PathBuf> {
    if args.no_hooks {
        return Vec::new();
    }
    if !args.hooks.is_empty() {
        return args
            .hooks
            .iter()
            .map(|d| std::path::absolute(d).unwrap_or_else(|_| d.clone()))
            .collect();
    }
    [WRITERS_DIR, QEMU_HOOKS_DIR]
        .iter()
        .map(PathBuf::from)
        .filter(|d| d.is_dir())
        .collect()
}

/// One line of /proc/self/mountinfo (proc(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
struct MountEntry {
    /// The filesystem's device number: "major:minor".
    dev: (u32, u32),
    /// The directory of the filesystem mounted here ("/" unless a bind of a subdirectory).
    root: PathBuf,
    mountpoint: PathBuf,
    fstype: String,
    source: String,
}

/// The entries of a mountinfo text; malformed lines are skipped (the kernel writes it).
fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_mountinfo_line).collect()
}

fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let (before, after) = line.split_once(" - ")?;
    let fields: Vec<&str> = before.split(' ').collect();
    let (major, minor) = fields.get(2)?.split_once(':')?;
    let mut after = after.split(' ');
    Some(MountEntry {
        dev: (major.parse().ok()?, minor.parse().ok()?),
        root: PathBuf::from(unescape(fields.get(3)?)),
        mountpoint: PathBuf::from(unescape(fields.get(4)?)),
        fstype: after.next()?.to_string(),
        source: unescape(after.next()?),
    })
}

/// Undo mountinfo's octal escapes (`\040` for a space, `\134` for a backslash, ...).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount that holds `dir` (absolute, symlinks resolved): the longest mount point that
/// is `dir` or one of its parents, the later entry when one is mounted over another.
fn mount_of<'a>(dir: &Path, mounts: &'a [MountEntry]) -> Option<&'a MountEntry> {
    mounts
        .iter()
        .filter(|m| dir.starts_with(&m.mountpoint))
        .max_by_key(|m| m.mountpoint.components().count())
        .and_then(|longest| {
            mounts
                .iter()
                .rev()
                .find(|m| m.mountpoint == longest.mountpoint)
        })
}

/// A live (not snapshot) attachment of a volume: the volume, its device number, front end.
#[derive(Debug, Clone)]
struct AttachedVolume {
    volume: String,
    dev: (u32, u32),
    via: Via,
}

/// The daemon's live volume attachments (from `query-status`), by device number.
fn attached_volumes(status: &Value) -> Vec<AttachedVolume> {
    status["attachments"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["read_only"] == json!(false))
        .filter_map(|a| {
            let volume = a["name"].as_str()?.to_string();
            let device = a["device"].as_str()?;
            let via = serde_json::from_value(a["via"].clone()).ok()?;
            let rdev = fs::metadata(device).ok()?.rdev();
            Some(AttachedVolume {
                volume,
                dev: (libc::major(rdev), libc::minor(rdev)),
                via,
            })
        })
        .collect()
}

/// One mounted view under TARGET.
#[derive(Debug, Clone)]
struct View {
    /// The DIRs it serves.
    dirs: Vec<PathBuf>,
    /// The filesystem's mount point (a snapshot), or the DIR itself (a bind of the live dir).
    mountpoint: PathBuf,
    /// TARGET/<mountpoint>.
    path: PathBuf,
    fstype: String,
    source: String,
    dev: (u32, u32),
    /// The volume under the filesystem; `None`: bind the live directory.
    volume: Option<String>,
    via: Option<Via>,
    /// The snapshot's device, once attached.
    device: Option<PathBuf>,
}

impl View {
    fn options(&self) -> (MsFlags, &'static str) {
        match (self.volume.is_some(), self.fstype.as_str()) {
            (false, _) => (MsFlags::MS_BIND | MsFlags::MS_RDONLY, ""),
            (true, "ext4" | "ext3" | "ext2") => (MsFlags::MS_RDONLY, "noload"),
            (true, "xfs") => (MsFlags::MS_RDONLY, "norecovery,nouuid"),
            (true, _) => (MsFlags::MS_RDONLY, ""),
        }
    }

    fn option_text(&self) -> String {
        match self.options() {
            (_, "") if self.volume.is_none() => "bind,ro".to_string(),
            (_, "") => "ro".to_string(),
            (_, data) => format!("ro,{data}"),
        }
    }

    fn report(&self) -> Value {
        json!({
            "path": self.path,
            "dirs": self.dirs,
            "mountpoint": self.mountpoint,
            "kind": if self.volume.is_some() { "snapshot" } else { "bind" },
            "consistent": self.volume.is_some(),
            "volume": self.volume,
            "device": self.device,
            "fstype": self.fstype,
            "options": self.option_text(),
            "source": self.source,
        })
    }
}

/// What to capture: views sorted by path (a parent mounts before what is below it).
#[derive(Debug)]
struct Plan {
    views: Vec<View>,
}

impl Plan {
    /// The snapshotted views, one per volume (a filesystem mounted twice is snapshotted once).
    fn volumes(&self) -> Vec<String> {
        let mut volumes: Vec<String> = self.views.iter().filter_map(|v| v.volume.clone()).collect();
        volumes.sort_unstable();
        volumes.dedup();
        volumes
    }

    /// One mount point per snapshotted filesystem, to freeze.
    fn freeze(&self) -> Vec<PathBuf> {
        let mut seen = BTreeMap::new();
        for view in self.views.iter().filter(|v| v.volume.is_some()) {
            seen.entry(view.dev)
                .or_insert_with(|| view.mountpoint.clone());
        }
        seen.into_values().collect()
    }
}

fn plan(
    dirs: &[PathBuf],
    mounts: &[MountEntry],
    attached: &[AttachedVolume],
    target: &Path,
) -> anyhow::Result<Plan> {
    let mut views: BTreeMap<PathBuf, View> = BTreeMap::new();
    for dir in dirs {
        let resolved = fs::canonicalize(dir)
            .with_context(|| format!("{}: cannot resolve the directory", dir.display()))?;
        anyhow::ensure!(
            resolved.is_dir(),
            "{} is not a directory; name the directories to capture",
            dir.display()
        );
        anyhow::ensure!(
            !resolved.starts_with(target),
            "{} is inside the target {}; choose a -t outside the directories captured",
            resolved.display(),
            target.display()
        );
        let mount = mount_of(&resolved, mounts).with_context(|| {
            format!(
                "no mount in /proc/self/mountinfo holds {}",
                resolved.display()
            )
        })?;
        let volume = attached.iter().find(|a| a.dev == mount.dev);
        if volume.is_some() && mount.root != Path::new("/") {
            bail!(
                "{} is mounted from the subdirectory {} of its filesystem (a bind mount); name \
                 the filesystem's own mount point instead, so its snapshot mounts in the same place",
                mount.mountpoint.display(),
                mount.root.display()
            );
        }
        let mountpoint = match volume {
            Some(_) => mount.mountpoint.clone(),
            None => resolved.clone(),
        };
        let path = under(target, &mountpoint);
        views
            .entry(path.clone())
            .or_insert_with(|| View {
                dirs: Vec::new(),
                mountpoint,
                path,
                fstype: mount.fstype.clone(),
                source: mount.source.clone(),
                dev: mount.dev,
                volume: volume.map(|v| v.volume.clone()),
                via: volume.map(|v| v.via),
                device: None,
            })
            .dirs
            .push(resolved);
    }
    for view in views.values() {
        if mounts.iter().any(|m| m.mountpoint == view.path) {
            bail!(
                "{} is already a mount point; another `tidemark snapshot` may hold it (or one \
                 that was killed: `tidemark snapshot --cleanup`); choose another -t",
                view.path.display()
            );
        }
    }
    Ok(Plan {
        views: views.into_values().collect(),
    })
}

/// `target` joined with the absolute `path` (TARGET/<path>; `/` is TARGET itself).
fn under(target: &Path, path: &Path) -> PathBuf {
    let mut joined = target.to_path_buf();
    for component in path.components() {
        if let Component::Normal(part) = component {
            joined.push(part);
        }
    }
    joined
}

/// What a lease left that cleanup must undo, in the order it was made; written before each
/// step is taken, so a kill between the two leaves an entry whose undo finds nothing to do.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    pid: u32,
    /// The process's start time (/proc/PID/stat field 22), to tell a reused pid apart.
    start_time: u64,
    /// The daemon's control socket.
    control: PathBuf,
    backup: Option<String>,
    attachments: Vec<String>,
    mounts: Vec<PathBuf>,
    /// Directories created under TARGET, removed again when empty.
    created: Vec<PathBuf>,
}

/// The snapshots this process holds, and their record.
struct Lease {
    path: PathBuf,
    record: Record,
}

/// What taking the lease produced.
struct Held {
    backup: Option<String>,
    write_pause_us: Option<u64>,
    freeze_to_thaw_ms: Option<f64>,
    /// Milliseconds spent on each step: the daemon's freeze + snapshot + thaw, attaching
    /// the snapshots, mounting the views.
    steps_ms: BTreeMap<&'static str, f64>,
}

impl Lease {
    fn create(dir: &Path, control: &Path) -> anyhow::Result<Lease> {
        let pid = std::process::id();
        let lease = Lease {
            path: dir.join(format!("{pid}.json")),
            record: Record {
                pid,
                start_time: process_start_time(pid).unwrap_or(0),
                control: control.to_path_buf(),
                ..Record::default()
            },
        };
        lease.save()?;
        Ok(lease)
    }

    /// Write the record atomically (temp file, fsync, rename, fsync the directory).
    fn save(&self) -> anyhow::Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let temp = self.path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            let mut file = fs::File::create(&temp)?;
            file.write_all(&serde_json::to_vec(&self.record).map_err(std::io::Error::other)?)?;
            file.sync_all()?;
            fs::rename(&temp, &self.path)?;
            fs::File::open(dir)?.sync_all()
        };
        write().with_context(|| {
            format!(
                "recording the snapshot lease in {}; check that the state dir is writable",
                self.path.display()
            )
        })
    }

    /// Freeze, snapshot, thaw; attach and mount every view.
    fn take(
        &mut self,
        client: &mut Client,
        plan: &mut Plan,
        target: &Path,
        hooks: &[PathBuf],
        quiesce_timeout_ms: Option<u64>,
        cow_limit: Option<u64>,
    ) -> anyhow::Result<Held> {
        let volumes = plan.volumes();
        let mut held = Held {
            backup: None,
            write_pause_us: None,
            freeze_to_thaw_ms: None,
            steps_ms: BTreeMap::new(),
        };
        let mut step = Instant::now();
        let mut lap = |held: &mut Held, name: &'static str| {
            held.steps_ms
                .insert(name, step.elapsed().as_secs_f64() * 1e3);
            step = Instant::now();
        };
        let mut devices = BTreeMap::new();
        if !volumes.is_empty() {
            let export_name = format!("{{volume}}@snapshot-{}", self.record.pid);
            let backup = client
                .execute(&Request::BackupBegin(BackupBeginArgs {
                    volumes: volumes.clone(),
                    export_name: Some(export_name.clone()),
                    cow_limit,
                    lease: true,
                    freeze: plan.freeze(),
                    hooks: Some(hooks.to_vec()),
                    quiesce_timeout_ms,
                    ..BackupBeginArgs::default()
                }))
                .context("taking the group snapshot")?;
            let id = backup["id"].as_str().unwrap_or_default().to_string();
            self.record.backup = Some(id.clone());
            self.save()?;
            held.backup = Some(id);
            held.write_pause_us = backup["write_pause_us"].as_u64();
            held.freeze_to_thaw_ms = backup["quiesce"]["freeze_to_thaw_ms"].as_f64();
            lap(&mut held, "snapshot");
            for volume in &volumes {
                let name = export_name.replace("{volume}", volume);
                let via = plan
                    .views
                    .iter()
                    .find(|v| v.volume.as_ref() == Some(volume))
                    .and_then(|v| v.via);
                self.record.attachments.push(name.clone());
                self.save()?;
                let attached = client
                    .execute(&Request::VolumeAttach(VolumeAttachArgs {
                        name: name.clone(),
                        via,
                        read_only: true,
                        queues: None,
                    }))
                    .with_context(|| format!("attaching the snapshot {name}"))?;
                let device = attached["device"].as_str().with_context(|| {
                    format!("the daemon attached {name} without a device: {attached}")
                })?;
                devices.insert(volume.clone(), PathBuf::from(device));
            }
        }
        if !volumes.is_empty() {
            lap(&mut held, "attach");
        }
        self.make_dir(target)?;
        for view in &mut plan.views {
            view.device = view.volume.as_ref().map(|v| devices[v].clone());
            self.make_dir(&view.path)?;
            self.record.mounts.push(view.path.clone());
            self.save()?;
            let (flags, data) = view.options();
            match &view.device {
                Some(device) => {
                    nix::mount::mount(
                        Some(device.as_path()),
                        &view.path,
                        Some(view.fstype.as_str()),
                        flags,
                        (!data.is_empty()).then_some(data),
                    )
                    .with_context(|| {
                        format!(
                            "mounting the snapshot of {} ({} on {}) at {} with {}",
                            view.mountpoint.display(),
                            view.fstype,
                            device.display(),
                            view.path.display(),
                            view.option_text()
                        )
                    })?;
                }
                None => bind_read_only(&view.mountpoint, &view.path)?,
            }
        }
        lap(&mut held, "mount");
        Ok(held)
    }

    /// Create `dir` and the parents it lacks, recording each one made.
    fn make_dir(&mut self, dir: &Path) -> anyhow::Result<()> {
        let missing: Vec<PathBuf> = dir
            .ancestors()
            .take_while(|d| !d.exists())
            .map(Path::to_path_buf)
            .collect();
        for dir in missing.into_iter().rev() {
            self.record.created.push(dir.clone());
            self.save()?;
            fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(())
    }

    /// Unmount, detach, end the backup, remove the directories made; the record goes when
    /// all of it went. Returns what could not be undone.
    fn release(self, client: &mut Client) -> Vec<String> {
        let problems = undo(&self.record, Some(client));
        if problems.is_empty() {
            let _ = fs::remove_file(&self.path);
        }
        problems
    }
}

/// Bind-mount the live `dir` read-only at `path` (a bind takes the read-only flag only on a
/// remount).
fn bind_read_only(dir: &Path, path: &Path) -> anyhow::Result<()> {
    eprintln!(
        "tidemark: warning: {} is not on a tidemark volume: bind-mounted read-only at {}; it is \
         the live directory, NOT a consistent snapshot (--strict refuses this)",
        dir.display(),
        path.display()
    );
    nix::mount::mount(
        Some(dir),
        path,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .with_context(|| format!("bind-mounting {} at {}", dir.display(), path.display()))?;
    nix::mount::mount(
        None::<&str>,
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .with_context(|| format!("making the bind mount at {} read-only", path.display()))
}

/// Undo what `record` lists, in reverse: unmount, detach, end the backup, remove the
/// directories made. Without a connection, one is made to the record's daemon.
fn undo(record: &Record, client: Option<&mut Client>) -> Vec<String> {
    let mut problems = Vec::new();
    for path in record.mounts.iter().rev() {
        if let Err(problem) = unmount(path) {
            problems.push(problem);
        }
    }
    if record.backup.is_some() || !record.attachments.is_empty() {
        let mut own;
        let client = match client {
            Some(client) => Some(client),
            None => match Client::connect(&record.control) {
                Ok(connected) => {
                    own = connected;
                    Some(&mut own)
                }
                Err(err) => {
                    problems.push(format!(
                        "cannot reach the daemon to detach {:?} and end backup {:?}: {err}",
                        record.attachments, record.backup
                    ));
                    None
                }
            },
        };
        if let Some(client) = client {
            problems.extend(release_in_daemon(record, client));
        }
    }
    for dir in record.created.iter().rev() {
        match fs::remove_dir(dir) {
            Ok(()) => {}
            Err(err) if err.kind() == ErrorKind::NotFound => {}
            Err(err) => problems.push(format!(
                "cannot remove the directory {} made for the views: {err}",
                dir.display()
            )),
        }
    }
    problems
}

fn release_in_daemon(record: &Record, client: &mut Client) -> Vec<String> {
    let mut problems = Vec::new();
    let absent = |err: &ClientError| matches!(err, ClientError::Command(e) if e.class == ErrorClass::NotFound);
    for name in record.attachments.iter().rev() {
        match client.execute(&Request::VolumeDetach(VolumeNameArgs {
            name: name.clone(),
        })) {
            Ok(_) => {}
            Err(err) if absent(&err) => {}
            Err(err) => problems.push(format!("detaching the snapshot {name}: {err}")),
        }
    }
    if let Some(id) = &record.backup {
        match client.execute(&Request::BackupEnd(BackupEndArgs {
            id: Some(id.clone()),
            ..BackupEndArgs::default()
        })) {
            Ok(_) => {}
            // Ended already: by the daemon when the lease's connection closed, or failed.
            Err(ClientError::Command(e))
                if matches!(e.class, ErrorClass::NotFound | ErrorClass::GenericError) => {}
            Err(err) => problems.push(format!("ending backup {id}: {err}")),
        }
    }
    problems
}

/// Unmount `path`; a filesystem still busy after [`UNMOUNT_PATIENCE`] is detached lazily
/// (it disappears from the tree now, and from the kernel when its last user lets go).
fn unmount(path: &Path) -> Result<(), String> {
    let deadline = Instant::now() + UNMOUNT_PATIENCE;
    loop {
        match nix::mount::umount2(path, MntFlags::empty()) {
            Ok(()) => return Ok(()),
            // Not (or no longer) a mount point, or gone: nothing to undo.
            Err(Errno::EINVAL | Errno::ENOENT) => return Ok(()),
            Err(Errno::EBUSY) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(Errno::EBUSY) => {
                eprintln!(
                    "tidemark: warning: {} is still in use; detaching it lazily",
                    path.display()
                );
                return nix::mount::umount2(path, MntFlags::MNT_DETACH)
                    .map_err(|e| format!("unmounting {}: {e}", path.display()));
            }
            Err(e) => return Err(format!("unmounting {}: {e}", path.display())),
        }
    }
}

/// `starttime` (field 22 of /proc/PID/stat), or `None` when the process is gone.
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count after its end.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// What cleaning one stale record did.
struct Cleaned {
    pid: u32,
    record: Record,
    problem: Option<String>,
}

/// Undo the records of `tidemark snapshot` processes that are gone.
fn cleanup_stale(dir: &Path) -> Vec<Cleaned> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut cleaned = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let record: Record = match fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
        {
            Ok(record) => record,
            Err(err) => {
                cleaned.push(Cleaned {
                    pid: 0,
                    record: Record::default(),
                    problem: Some(format!(
                        "cannot read the snapshot lease record {} ({err}); undo what it held by \
                         hand and remove it",
                        path.display()
                    )),
                });
                continue;
            }
        };
        let alive =
            process_start_time(record.pid).is_some_and(|started| started == record.start_time);
        if alive {
            continue;
        }
        let problems = undo(&record, None);
        let problem = if problems.is_empty() {
            let _ = fs::remove_file(&path);
            None
        } else {
            Some(format!(
                "cleaning up after the killed `tidemark snapshot` (pid {}): {}",
                record.pid,
                problems.join("; ")
            ))
        };
        cleaned.push(Cleaned {
            pid: record.pid,
            record,
            problem,
        });
    }
    cleaned
}

fn report_cleanup(cleaned: &[Cleaned], json_output: bool) -> anyhow::Result<ExitCode> {
    if json_output {
        let list: Vec<Value> = cleaned
            .iter()
            .map(|c| {
                json!({
                    "pid": c.pid,
                    "backup": c.record.backup,
                    "attachments": c.record.attachments,
                    "mounts": c.record.mounts,
                    "error": c.problem,
                })
            })
            .collect();
        ui::print_json(&json!({"cleaned": list}))?;
    } else if cleaned.is_empty() {
        println!("nothing to clean up");
    } else {
        for c in cleaned.iter().filter(|c| c.problem.is_none()) {
            println!(
                "cleaned up after pid {}: unmounted {}, detached {}",
                c.pid,
                c.record.mounts.len(),
                c.record.attachments.len()
            );
        }
    }
    let mut code = ExitCode::SUCCESS;
    for problem in cleaned.iter().filter_map(|c| c.problem.as_deref()) {
        eprintln!("tidemark: error: {problem}");
        code = ExitCode::from(ui::EXIT_FAILURE);
    }
    Ok(code)
}

/// Print what is mounted where, then close stdout: the caller's signal that it is ready.
fn announce(plan: &Plan, report: &Value, json_output: bool) -> anyhow::Result<()> {
    {
        let mut stdout = std::io::stdout().lock();
        if json_output {
            writeln!(stdout, "{report}")?;
        } else {
            for view in &plan.views {
                match (&view.volume, &view.device) {
                    (Some(volume), Some(device)) => writeln!(
                        stdout,
                        "{}  snapshot of {} (volume {volume}, {} on {}, {})",
                        view.path.display(),
                        view.mountpoint.display(),
                        view.fstype,
                        device.display(),
                        view.option_text()
                    )?,
                    _ => writeln!(
                        stdout,
                        "{}  LIVE bind of {} (not on a tidemark volume)",
                        view.path.display(),
                        view.mountpoint.display()
                    )?,
                }
            }
        }
        stdout.flush()?;
    }
    let null = fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .context("opening /dev/null")?;
    nix::unistd::dup2_stdout(&null).context("closing stdout")?;
    Ok(())
}

/// Why holding ended.
struct Ended {
    why: &'static str,
    snapshot_failed: Option<String>,
}

enum Wake {
    StdinClosed,
    Signal(Signal),
}

/// Hold until stdin closes or a stop signal arrives, watching for the backup's failure.
fn hold(client: &mut Client, backup: Option<&str>) -> anyhow::Result<Ended> {
    let (tx, rx) = mpsc::channel();
    let stdin_tx = tx.clone();
    std::thread::Builder::new()
        .name("stdin-watch".into())
        .spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            let _ = stdin_tx.send(Wake::StdinClosed);
        })
        .context("watching stdin")?;
    std::thread::Builder::new()
        .name("signal-watch".into())
        .spawn(move || {
            if let Ok(signal) = stop_signals().wait() {
                let _ = tx.send(Wake::Signal(signal));
            }
        })
        .context("watching for signals")?;
    let mut snapshot_failed = None;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Wake::StdinClosed) => {
                return Ok(Ended {
                    why: "stdin closed",
                    snapshot_failed,
                })
            }
            Ok(Wake::Signal(signal)) => {
                eprintln!("tidemark: {signal} received");
                return Ok(Ended {
                    why: "stopped by a signal",
                    snapshot_failed,
                });
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                bail!("the stdin and signal watchers stopped")
            }
        }
        let Some(id) = backup else { continue };
        while let Some(event) = client.next_event(Some(Duration::ZERO))? {
            if event.event == "BACKUP_FAILED" && event.data["id"].as_str() == Some(id) {
                let why = event.data["error"]
                    .as_str()
                    .unwrap_or("unknown")
                    .to_string();
                eprintln!(
                    "tidemark: error: the snapshot failed while held: {why}; reads under the \
                     target now fail; close stdin to clean up"
                );
                snapshot_failed = Some(why);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
35 22 7:3 / /srv/my\\040data rw,relatime shared:20 - ext4 /dev/loop3 rw
36 22 7:4 / /srv/db rw shared:21 master:3 - xfs /dev/loop4 rw,attr2
37 36 7:4 /sub /srv/db/again rw - xfs /dev/loop4 rw
38 22 0:44 / /srv/db rw - tmpfs tmpfs rw
garbage line
";

    fn entries() -> Vec<MountEntry> {
        parse_mountinfo(MOUNTINFO)
    }

    #[test]
    fn mountinfo_lines_parse_with_optional_fields_and_escapes() {
        let entries = entries();
        assert_eq!(entries.len(), 5);
        assert_eq!(entries[1].mountpoint, PathBuf::from("/srv/my data"));
        assert_eq!(entries[1].dev, (7, 3));
        assert_eq!(entries[2].fstype, "xfs");
        assert_eq!(entries[2].source, "/dev/loop4");
        assert_eq!(entries[3].root, PathBuf::from("/sub"));
    }

    #[test]
    fn the_longest_mount_point_holds_a_dir_and_the_later_of_two_stacked_mounts_wins() {
        let entries = entries();
        let found = |dir: &str| mount_of(Path::new(dir), &entries).unwrap().source.clone();
        assert_eq!(found("/srv/my data/x"), "/dev/loop3");
        assert_eq!(found("/srv/my"), "/dev/vda1");
        assert_eq!(found("/srv/db/x"), "tmpfs");
        assert_eq!(found("/srv/db/again/y"), "/dev/loop4");
    }

    #[test]
    fn a_mount_point_is_placed_under_the_target() {
        let target = Path::new("/mnt/t");
        assert_eq!(under(target, Path::new("/")), PathBuf::from("/mnt/t"));
        assert_eq!(
            under(target, Path::new("/srv/db")),
            PathBuf::from("/mnt/t/srv/db")
        );
    }

    #[test]
    fn snapshot_mount_options_follow_the_filesystem() {
        let view = |fstype: &str, volume: bool| View {
            dirs: vec![],
            mountpoint: PathBuf::from("/srv"),
            path: PathBuf::from("/t/srv"),
            fstype: fstype.into(),
            source: String::new(),
            dev: (7, 1),
            volume: volume.then(|| "v".to_string()),
            via: None,
            device: None,
        };
        assert_eq!(view("ext4", true).option_text(), "ro,noload");
        assert_eq!(view("xfs", true).option_text(), "ro,norecovery,nouuid");
        assert_eq!(view("btrfs", true).option_text(), "ro");
        assert_eq!(view("ext4", false).option_text(), "bind,ro");
    }

    fn entry(dev: (u32, u32), root: &str, mountpoint: &Path) -> MountEntry {
        MountEntry {
            dev,
            root: PathBuf::from(root),
            mountpoint: mountpoint.to_path_buf(),
            fstype: "ext4".into(),
            source: format!("/dev/loop{}", dev.1),
        }
    }

    fn volume(name: &str, dev: (u32, u32)) -> AttachedVolume {
        AttachedVolume {
            volume: name.into(),
            dev,
            via: Via::Fuse,
        }
    }

    #[test]
    fn dirs_on_one_attached_filesystem_share_one_view_and_others_are_bound_live() {
        let scratch = tempfile::tempdir().unwrap();
        let root = fs::canonicalize(scratch.path()).unwrap();
        let (fs_a, plain) = (root.join("a"), root.join("plain"));
        for dir in [fs_a.join("x"), fs_a.join("y"), plain.clone()] {
            fs::create_dir_all(dir).unwrap();
        }
        let mounts = vec![
            entry((8, 1), "/", Path::new("/")),
            entry((7, 3), "/", &fs_a),
            entry((7, 3), "/", &root.join("a-again")),
        ];
        let target = Path::new("/mnt/t");
        let plan = plan(
            &[fs_a.join("x"), fs_a.join("y"), plain.clone()],
            &mounts,
            &[volume("data", (7, 3))],
            target,
        )
        .unwrap();
        assert_eq!(plan.views.len(), 2);
        let snapshot = &plan.views[0];
        assert_eq!(snapshot.path, under(target, &fs_a));
        assert_eq!(snapshot.volume.as_deref(), Some("data"));
        assert_eq!(snapshot.dirs, vec![fs_a.join("x"), fs_a.join("y")]);
        let bind = &plan.views[1];
        assert_eq!(bind.path, under(target, &plain));
        assert_eq!(bind.volume, None);
        assert_eq!(plan.volumes(), vec!["data".to_string()]);
        assert_eq!(plan.freeze(), vec![fs_a]);
    }

    #[test]
    fn a_subdirectory_bind_of_a_volume_a_target_in_use_and_a_dir_in_the_target_are_refused() {
        let scratch = tempfile::tempdir().unwrap();
        let root = fs::canonicalize(scratch.path()).unwrap();
        let dir = root.join("d");
        fs::create_dir_all(&dir).unwrap();
        let attached = [volume("data", (7, 3))];
        let sub = [entry((7, 3), "/sub", &dir)];
        let err = plan(
            std::slice::from_ref(&dir),
            &sub,
            &attached,
            Path::new("/mnt/t"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("bind mount"), "{err}");

        let target = Path::new("/mnt/t");
        let busy = [
            entry((7, 3), "/", &dir),
            entry((0, 9), "/", &under(target, &dir)),
        ];
        let err = plan(std::slice::from_ref(&dir), &busy, &attached, target).unwrap_err();
        assert!(err.to_string().contains("already a mount point"), "{err}");

        let inside = [entry((8, 1), "/", Path::new("/"))];
        let err = plan(std::slice::from_ref(&dir), &inside, &attached, &root).unwrap_err();
        assert!(err.to_string().contains("inside the target"), "{err}");
    }

    #[test]
    fn the_process_start_time_of_this_process_is_readable() {
        let mine = process_start_time(std::process::id());
        assert!(mine.is_some_and(|t| t > 0));
        assert_eq!(process_start_time(u32::MAX), None);
    }
}
