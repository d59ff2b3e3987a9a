//! Backup jobs: `backup-begin`, `backup-end`, `backup-status`, and what ends a backup by
//! itself (a push that finished, a snapshot that failed, a lease holder that went away).
//!
//! A backup covers one or more volumes. `backup-begin` quiesces (hooks, FIFREEZE, guest
//! agent, each optional), takes one group snapshot of all its volumes (one write pause),
//! optionally starts a new checkpoint and freezes the dirty bitmap since `incremental`,
//! thaws, and then either exports each snapshot read-only over NBD (pull) or hands them
//! to a worker thread that copies them to the targets (push).
//!
//! State lives in the daemon's registry: a running backup is in `backups` and its volumes
//! are busy; when it ends (for whatever reason) its exports are removed, its snapshots
//! dropped (their COW stores with them), its final status moves to `finished`, and one
//! event says how it ended: `BACKUP_COMPLETED` or `BACKUP_FAILED`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tidemark_engine::volume::PausePhases;
use tidemark_nbd::export::Export;

use crate::daemon::{check_name, Daemon, FINISHED_KEPT};
use crate::protocol::{BackupBeginArgs, CommandError, PushFormat, Timestamp};
use crate::server::ConnectionId;
use crate::volumes::{self, QuiesceRequest, SnapshotHandle, VolumeHandle};

/// The default export name of a backup's snapshot; `{volume}` is the volume's name.
const DEFAULT_EXPORT_NAME: &str = "{volume}@backup";

/// Where a backup's data goes.
#[derive(Debug, Clone)]
enum Mode {
    /// Exported over NBD until `backup-end`.
    Pull,
    /// Copied by a worker to `target` (with `{volume}` replaced) in `format`.
    Push { target: String, format: PushFormat },
}

/// One volume of a backup.
struct Member {
    volume: String,
    snapshot: Arc<SnapshotHandle>,
    /// The export name (pull mode).
    export: Option<String>,
    /// Where a push writes this volume.
    target: Option<PathBuf>,
}

/// A running backup.
pub(crate) struct Backup {
    id: String,
    members: Vec<Member>,
    mode: Mode,
    checkpoint: Option<String>,
    incremental: Option<String>,
    started: Timestamp,
    started_at: Instant,
    pause: Duration,
    pause_phases: PausePhases,
    quiesce: Value,
    lease: Option<ConnectionId>,
    progress: Arc<Progress>,
}

/// Bytes a push has copied, out of how many.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    pub(crate) done: AtomicU64,
    pub(crate) total: AtomicU64,
    pub(crate) cancel: AtomicBool,
}

impl Backup {
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn volume_names(&self) -> impl Iterator<Item = &str> {
        self.members.iter().map(|m| m.volume.as_str())
    }

    /// The snapshot this pull backup exports as `export`, to attach it as a block device.
    pub(crate) fn snapshot_export(&self, export: &str) -> Option<Arc<dyn Export>> {
        self.members
            .iter()
            .find(|m| m.export.as_deref() == Some(export))
            .map(|m| m.snapshot.export())
    }

    /// The names this pull backup exports its snapshots under.
    pub(crate) fn export_names(&self) -> impl Iterator<Item = &str> {
        self.members.iter().filter_map(|m| m.export.as_deref())
    }

    fn report(&self, daemon: &Daemon, state: &str, error: Option<&str>) -> Value {
        let volumes: Vec<Value> = self
            .members
            .iter()
            .map(|m| {
                let mut v = json!({
                    "volume": m.volume,
                    "size": m.snapshot.size(),
                    "snapshot": m.snapshot.status(),
                });
                if let Some(export) = &m.export {
                    v["export"] = json!(export);
                    v["uri"] = daemon.uris(export);
                    v["bitmap"] = json!(self.incremental);
                }
                if let Some(target) = &m.target {
                    v["target"] = json!(target);
                }
                v
            })
            .collect();
        let (mode, push_format) = match &self.mode {
            Mode::Pull => ("pull", Value::Null),
            Mode::Push { format, .. } => ("push", json!(format.as_str())),
        };
        json!({
            "id": self.id,
            "state": state,
            "error": error,
            "mode": mode,
            "push_format": push_format,
            "volumes": volumes,
            "checkpoint": self.checkpoint,
            "incremental": self.incremental,
            "started": self.started,
            "elapsed_ms": self.started_at.elapsed().as_millis() as u64,
            "write_pause_us": self.pause.as_micros() as u64,
            "write_pause_phases_us": phases_json(&self.pause_phases),
            "quiesce": self.quiesce,
            "lease": self.lease.is_some(),
            "progress": {
                "done": self.progress.done.load(Ordering::Relaxed),
                "total": self.progress.total.load(Ordering::Relaxed),
            },
        })
    }
}

/// Volumes reserved by a `backup-begin` still in progress, so two begins cannot race.
/// Where a write pause's time went, in microseconds (each per-volume phase the longest
/// over the group's volumes).
fn phases_json(phases: &PausePhases) -> Value {
    let us = |d: Duration| d.as_micros() as u64;
    json!({
        "drain": us(phases.drain),
        "volumes": us(phases.volumes),
        "bitmaps": us(phases.bitmaps),
        "cow_stores": us(phases.cow_stores),
        "checkpoints": us(phases.checkpoints),
    })
}

fn reserve<'a>(daemon: &'a Daemon, names: &[String]) -> Result<Reservation<'a>, CommandError> {
    let mut registry = daemon.registry();
    for name in names {
        if let Some(backup) = registry
            .backups
            .values()
            .find(|b| b.volume_names().any(|v| v == name))
        {
            return Err(CommandError::conflict(format!(
                "volume {name:?} is already in backup {}; `tidemark backup end {name}` first",
                backup.id()
            )));
        }
        if registry.reserved.contains(name) {
            return Err(CommandError::conflict(format!(
                "a backup of volume {name:?} is being started by another client; wait for it"
            )));
        }
    }
    registry.reserved.extend(names.iter().cloned());
    Ok(Reservation {
        daemon,
        names: names.to_vec(),
    })
}

struct Reservation<'a> {
    daemon: &'a Daemon,
    names: Vec<String>,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut registry = self.daemon.registry();
        for name in &self.names {
            registry.reserved.remove(name);
        }
    }
}

/// `backup-begin`.
pub(crate) fn begin(
    daemon: &Arc<Daemon>,
    conn: ConnectionId,
    args: BackupBeginArgs,
) -> Result<Value, CommandError> {
    let BackupBeginArgs {
        volumes: names,
        checkpoint,
        incremental,
        export_name,
        push,
        push_format,
        cow_limit,
        lease,
        freeze,
        hooks,
        guest_agent,
        quiesce_timeout_ms,
        force,
    } = args;
    if names.is_empty() {
        return Err(CommandError::invalid(
            "backup-begin: \"volumes\" must name at least one volume",
        ));
    }
    let unique: BTreeSet<&String> = names.iter().collect();
    if unique.len() != names.len() {
        return Err(CommandError::invalid(
            "backup-begin: a volume is named twice in \"volumes\"",
        ));
    }
    if let Some(name) = &checkpoint {
        check_name("checkpoint", name)?;
    }
    let template = export_name.unwrap_or_else(|| DEFAULT_EXPORT_NAME.into());
    if names.len() > 1 && !template.contains("{volume}") {
        return Err(CommandError::invalid(format!(
            "backup-begin: export_name {template:?} must contain {{volume}} when several \
             volumes are backed up together"
        )));
    }
    let mode = match push {
        None => {
            if push_format.is_some() {
                return Err(CommandError::invalid(
                    "backup-begin: push_format needs push",
                ));
            }
            Mode::Pull
        }
        Some(target) if target.starts_with(crate::push::REPO_TARGET) => {
            if push_format.is_some() || checkpoint.is_none() {
                return Err(CommandError::invalid(format!(
                    "backup-begin: a push to {target:?} stores the point VOLUME@CHECKPOINT: it \
                     needs checkpoint (the point's name) and takes no push_format"
                )));
            }
            let url = &target[crate::push::REPO_TARGET.len()..];
            if !url.contains("://") && !PathBuf::from(url).is_absolute() {
                return Err(CommandError::invalid(format!(
                    "backup-begin: push target {target:?}: the repository is an absolute \
                     directory path or s3://BUCKET/PREFIX"
                )));
            }
            Mode::Push {
                target,
                format: PushFormat::default(),
            }
        }
        Some(target) => {
            if !PathBuf::from(&target).is_absolute() {
                return Err(CommandError::invalid(format!(
                    "backup-begin: push target {target:?} must be an absolute path"
                )));
            }
            if names.len() > 1 && !target.contains("{volume}") {
                return Err(CommandError::invalid(format!(
                    "backup-begin: push target {target:?} must contain {{volume}} when \
                     several volumes are backed up together"
                )));
            }
            Mode::Push {
                target,
                format: push_format.unwrap_or_default(),
            }
        }
    };
    if lease && !matches!(mode, Mode::Pull) {
        return Err(CommandError::invalid(
            "backup-begin: a lease holds a pull backup; a push backup ends by itself".to_string(),
        ));
    }
    let quiesce = QuiesceRequest {
        mountpoints: freeze,
        hooks,
        guest_agent,
        timeout: quiesce_timeout_ms.map(Duration::from_millis),
        protected: vec![daemon.config.state_dir.clone()],
    };

    let volumes: Vec<Arc<VolumeHandle>> = names
        .iter()
        .map(|n| daemon.volume(n))
        .collect::<Result<_, _>>()?;
    if let (Some(since), false) = (&incremental, force) {
        for volume in &volumes {
            volume.check_confirmed(since)?;
        }
    }
    let exports: Vec<Option<String>> = names
        .iter()
        .map(|n| match mode {
            Mode::Pull => {
                let export = template.replace("{volume}", n);
                check_name("export", &export.replace('@', "_")).map(|()| Some(export))
            }
            Mode::Push { .. } => Ok(None),
        })
        .collect::<Result<_, _>>()?;
    let targets: Vec<Option<PathBuf>> = names
        .iter()
        .map(|n| match &mode {
            Mode::Push { target, .. } => Some(PathBuf::from(target.replace("{volume}", n))),
            Mode::Pull => None,
        })
        .collect();
    let is_repo = |target: &PathBuf| {
        target
            .to_str()
            .is_some_and(|t| t.starts_with(crate::push::REPO_TARGET))
    };
    for target in targets.iter().flatten().filter(|t| !is_repo(t)) {
        check_push_target(daemon, target)?;
    }
    let _reservation = reserve(daemon, &names)?;
    if let Some(taken) = exports.iter().flatten().find(|e| daemon.nbd.has_export(e)) {
        let owner = if daemon.registry().volumes.contains_key(taken) {
            format!("the live export of volume {taken:?}")
        } else {
            "in use by another backup".to_string()
        };
        return Err(CommandError::conflict(format!(
            "the export name {taken:?} is {owner}; export names are unique across volumes \
             and backups, choose another export_name"
        )));
    }

    // Quiesce, snapshot, thaw. The quiesce guard thaws on every path out of this block.
    let started = Timestamp::now();
    let started_at = Instant::now();
    let id = daemon.next_backup_id()?;
    let frozen = volumes::quiesce(&quiesce)?;
    let group = volumes::group_snapshot(
        &id,
        &volumes,
        checkpoint.as_deref(),
        incremental.as_deref(),
        cow_limit,
    );
    let (quiesce_report, quiesce_problem) = frozen.thaw();
    let group = group?;
    tracing::info!(
        backup = %id,
        volumes = names.len(),
        write_pause_us = group.pause.as_micros() as u64,
        drain_us = group.phases.drain.as_micros() as u64,
        volumes_us = group.phases.volumes.as_micros() as u64,
        checkpoints_us = group.phases.checkpoints.as_micros() as u64,
        cow_stores_us = group.phases.cow_stores.as_micros() as u64,
        "group snapshot taken"
    );
    if let Some(problem) = quiesce_problem {
        // Dropping `group` drops the snapshots.
        return Err(CommandError::failed(problem));
    }
    let members: Vec<Member> = names
        .iter()
        .zip(group.snapshots)
        .zip(exports)
        .zip(targets)
        .map(|(((volume, snapshot), export), target)| Member {
            volume: volume.clone(),
            snapshot: Arc::new(snapshot),
            export,
            target,
        })
        .collect();
    let backup = Backup {
        id: id.clone(),
        members,
        mode: mode.clone(),
        checkpoint: checkpoint.clone(),
        incremental: incremental.clone(),
        started,
        started_at,
        pause: group.pause,
        pause_phases: group.phases,
        quiesce: quiesce_report,
        lease: lease.then_some(conn),
        progress: Arc::new(Progress::default()),
    };
    for (at, member) in backup.members.iter().enumerate() {
        if let Some(export) = &member.export {
            if let Err(err) = daemon.nbd.add_export(export, member.snapshot.export()) {
                for earlier in backup.members[..at]
                    .iter()
                    .filter_map(|m| m.export.as_ref())
                {
                    daemon.nbd.remove_export(earlier);
                }
                // Dropping `backup` drops its snapshots. The checkpoint it created stays:
                // it is a valid point in time and the next backup may start from it.
                return Err(err);
            }
        }
    }
    let report = backup.report(daemon, "running", None);
    let push = match &mode {
        Mode::Push { format, .. } => Some((
            *format,
            backup
                .members
                .iter()
                .map(|m| {
                    (
                        Arc::clone(&m.snapshot),
                        m.target.clone().unwrap_or_default(),
                    )
                })
                .collect::<Vec<_>>(),
            Arc::clone(&backup.progress),
        )),
        Mode::Pull => None,
    };
    daemon.registry().backups.insert(id.clone(), backup);
    daemon.emit(
        "BACKUP_STARTED",
        json!({"id": id, "volumes": names, "mode": report["mode"]}),
    );
    if let Some((format, jobs, progress)) = push {
        let repo_jobs = jobs.iter().all(|(_, target)| is_repo(target)).then(|| {
            names
                .iter()
                .zip(&jobs)
                .map(|(name, (snapshot, target))| {
                    (name.clone(), Arc::clone(snapshot), target.clone())
                })
                .collect::<Vec<_>>()
        });
        let worker_daemon = Arc::clone(daemon);
        let new_checkpoint = checkpoint.clone();
        let worker_id = id.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("tidemark-{id}"))
            .spawn(move || {
                let result = match (repo_jobs, new_checkpoint.as_deref()) {
                    (Some(repo_jobs), Some(checkpoint)) => {
                        crate::push::push_repo(&repo_jobs, checkpoint, &progress)
                            .map_err(CommandError::failed)
                    }
                    _ => volumes::push(&jobs, format, new_checkpoint.as_deref(), &progress),
                };
                drop(jobs);
                match result {
                    Ok(copied) => {
                        complete_with(&worker_daemon, &worker_id, Some(copied));
                    }
                    Err(err) => push_failed(&worker_daemon, &worker_id, &err.desc),
                }
            });
        if let Err(err) = spawned {
            fail(
                daemon,
                &id,
                &format!("starting the push worker failed: {err}"),
            );
            return Err(CommandError::failed(format!(
                "starting the push worker failed: {err}"
            )));
        }
    }
    Ok(report)
}

/// Refuse a push target that would overwrite a managed volume's data or the daemon's state.
fn check_push_target(daemon: &Daemon, target: &std::path::Path) -> Result<(), CommandError> {
    let invalid = CommandError::invalid;
    // Compare canonical paths: the target may not exist yet, but its directory must.
    let canonical = match target.canonicalize() {
        Ok(path) => path,
        Err(_) => {
            let dir = target.parent().unwrap_or(std::path::Path::new("/"));
            let dir = dir.canonicalize().map_err(|err| {
                invalid(format!(
                    "push target {}: its directory {} is unusable: {err}",
                    target.display(),
                    dir.display()
                ))
            })?;
            dir.join(target.file_name().unwrap_or_default())
        }
    };
    let state_dir = daemon
        .config
        .state_dir
        .canonicalize()
        .unwrap_or(daemon.config.state_dir.clone());
    if canonical.starts_with(&state_dir) {
        return Err(invalid(format!(
            "push target {} is inside the daemon's state dir {}; choose a path outside it",
            target.display(),
            state_dir.display()
        )));
    }
    if canonical.is_dir() {
        return Err(invalid(format!(
            "push target {} is a directory; name the image or delta file to write",
            target.display()
        )));
    }
    let partial = crate::push::partial_path(target);
    if partial.exists() {
        return Err(CommandError::conflict(format!(
            "{} exists: an earlier push to {} did not finish (the daemon stopped), or \
                 the file is not tidemark's; remove it or choose another target",
            partial.display(),
            target.display()
        )));
    }
    let volumes: Vec<Arc<VolumeHandle>> = daemon.registry().volumes.values().cloned().collect();
    for volume in volumes {
        let backing = volume
            .backing()
            .canonicalize()
            .unwrap_or(volume.backing().to_path_buf());
        if backing == canonical {
            return Err(invalid(format!(
                "push target {} is the backing of volume {:?}: pushing there would overwrite \
                 the volume; choose another path",
                target.display(),
                volume.name()
            )));
        }
    }
    Ok(())
}

/// `backup-end`: end a pull backup (or cancel a running push).
pub(crate) fn end(
    daemon: &Daemon,
    volume: Option<String>,
    id: Option<String>,
    failed: bool,
) -> Result<Value, CommandError> {
    let found = {
        let registry = daemon.registry();
        registry
            .backups
            .values()
            .find(|b| match (&id, &volume) {
                (Some(id), _) => b.id == *id,
                (None, Some(volume)) => b.volume_names().any(|v| v == volume),
                (None, None) => false,
            })
            .map(|b| {
                (
                    b.id.clone(),
                    matches!(b.mode, Mode::Push { .. }),
                    Arc::clone(&b.progress),
                )
            })
    };
    let Some((id, push, progress)) = found else {
        if id.is_none() && volume.is_none() {
            return Err(CommandError::invalid(
                "backup-end: name the backup by \"volume\" or \"id\"".to_string(),
            ));
        }
        // The monitor may have failed the backup a moment before this call: the client
        // gets the same answer as when backup-end itself noticed the failure.
        if let Some(report) = last_failed(daemon, id.as_deref(), volume.as_deref()) {
            return Err(ended_failed(&report));
        }
        let what = id
            .map(|i| format!("backup {i:?}"))
            .unwrap_or_else(|| format!("backup of volume {:?}", volume.unwrap_or_default()));
        return Err(CommandError::not_found(format!(
            "no running {what}; `tidemark backup status` lists them"
        )));
    };
    if !push {
        if let Some(attached) = daemon.attachments.snapshot_attached(&id) {
            return Err(CommandError::conflict(format!(
                "backup {id}'s snapshot {attached:?} is attached as a block device; unmount \
                 what uses it and `tidemark volume detach {attached}` first, then end the backup"
            )));
        }
    }
    if push {
        progress.cancel.store(true, Ordering::Relaxed);
        fail(daemon, &id, "cancelled by backup-end");
        return Ok(json!({"id": id, "state": "cancelled"}));
    }
    if failed {
        fail(
            daemon,
            &id,
            "the client reported that its pull failed (backup-end --failed)",
        );
        return Ok(json!({"id": id, "state": "failed"}));
    }
    // A snapshot that failed since the monitor last looked must not end as completed:
    // what a client pulled after the failure was refused, so the backup is not whole.
    if let Some(report) = fail_if_snapshot_failed(daemon, &id) {
        return Err(ended_failed(&report));
    }
    Ok(complete(daemon, &id))
}

/// The error `backup-end` answers for a backup that failed and has ended.
fn ended_failed(report: &Value) -> CommandError {
    CommandError::failed(format!(
        "backup {} failed and has ended: {}; its exports and snapshots are gone, start a new \
         backup (with a larger --cow-limit if the COW store filled)",
        report["id"].as_str().unwrap_or("?"),
        report["error"].as_str().unwrap_or("a snapshot failed")
    ))
}

/// The most recent ended backup named by `id`, or else the most recent one of `volume`,
/// when it failed (and no backup of that volume is running).
fn last_failed(daemon: &Daemon, id: Option<&str>, volume: Option<&str>) -> Option<Value> {
    let registry = daemon.registry();
    let latest = registry
        .finished
        .iter()
        .rev()
        .find(|r| match (id, volume) {
            (Some(id), _) => r["id"] == json!(id),
            (None, Some(volume)) => r["volumes"]
                .as_array()
                .is_some_and(|vs| vs.iter().any(|v| v["volume"] == json!(volume))),
            (None, None) => false,
        })?;
    (latest["state"] == json!("failed")).then(|| latest.clone())
}

/// `backup-status`: running backups, then recently ended ones.
pub(crate) fn status(daemon: &Daemon) -> Value {
    let registry = daemon.registry();
    let running: Vec<Value> = registry
        .backups
        .values()
        .map(|b| b.report(daemon, "running", None))
        .collect();
    json!({"running": running, "finished": registry.finished.iter().collect::<Vec<_>>()})
}

/// Take backup `id` out of the registry, drop its exports and snapshots, and remember its
/// final report. `None` when it had ended already.
fn finish(
    daemon: &Daemon,
    id: &str,
    state: &str,
    error: Option<&str>,
    push_result: Option<Value>,
) -> Option<Value> {
    let backup = daemon.registry().backups.remove(id)?;
    for member in &backup.members {
        if let Some(export) = &member.export {
            daemon.nbd.remove_export(export);
        }
    }
    if let (Some(checkpoint), "completed") = (&backup.checkpoint, state) {
        // Seen through: the data at the new checkpoint is stored. A failed confirm leaves
        // it unconfirmed, which only makes the next incremental from it ask for --force.
        for member in &backup.members {
            if let Err(err) = daemon
                .volume(&member.volume)
                .and_then(|v| v.checkpoint_confirm(checkpoint))
            {
                tracing::error!(
                    backup = id,
                    volume = %member.volume,
                    "cannot confirm checkpoint {checkpoint:?}: {}",
                    err.desc
                );
            }
        }
    }
    let mut report = backup.report(daemon, state, error);
    if let Some(result) = push_result {
        report["push_result"] = result;
    }
    drop(backup);
    let mut registry = daemon.registry();
    registry.finished.push_back(report.clone());
    while registry.finished.len() > FINISHED_KEPT {
        registry.finished.pop_front();
    }
    Some(report)
}

/// End backup `id` successfully.
fn complete(daemon: &Daemon, id: &str) -> Value {
    complete_with(daemon, id, None)
}

/// End backup `id` successfully, with what its push did.
fn complete_with(daemon: &Daemon, id: &str, push_result: Option<Value>) -> Value {
    match finish(daemon, id, "completed", None, push_result) {
        Some(report) => {
            daemon.emit("BACKUP_COMPLETED", report.clone());
            report
        }
        None => json!({"id": id, "state": "ended"}),
    }
}

/// Fail backup `id` (if it is still running) with `reason`.
pub(crate) fn fail(daemon: &Daemon, id: &str, reason: &str) {
    if let Some(report) = finish(daemon, id, "failed", Some(reason), None) {
        tracing::warn!(backup = id, "backup failed: {reason}");
        daemon.emit("BACKUP_FAILED", report);
    }
}

/// A control connection closed: fail the backups it held a lease on.
pub(crate) fn connection_closed(daemon: &Daemon, conn: ConnectionId) {
    let held: Vec<String> = daemon
        .registry()
        .backups
        .values()
        .filter(|b| b.lease == Some(conn))
        .map(|b| b.id.clone())
        .collect();
    for id in held {
        fail(
            daemon,
            &id,
            "the lease holder disconnected (its process ended)",
        );
    }
}

/// The first failed snapshot of running backup `id`: (volume, why).
fn snapshot_failure(daemon: &Daemon, id: &str) -> Option<(String, String)> {
    let registry = daemon.registry();
    let backup = registry.backups.get(id)?;
    backup
        .members
        .iter()
        .find_map(|m| m.snapshot.failure().map(|why| (m.volume.clone(), why)))
}

/// If a snapshot of running backup `id` failed, fail the backup: `SNAPSHOT_FAILED`, then
/// `BACKUP_FAILED` with the reason in its status. Returns the final status when this call
/// ended the backup (so the events go out once even when several paths notice).
fn fail_if_snapshot_failed(daemon: &Daemon, id: &str) -> Option<Value> {
    let (volume, why) = snapshot_failure(daemon, id)?;
    let reason = format!("the snapshot of volume {volume:?} failed: {why}");
    let report = finish(daemon, id, "failed", Some(&reason), None)?;
    tracing::warn!(backup = id, "backup failed: {reason}");
    daemon.emit(
        "SNAPSHOT_FAILED",
        json!({"id": id, "volume": volume, "error": why}),
    );
    daemon.emit("BACKUP_FAILED", report.clone());
    Some(report)
}

/// A push worker stopped with `desc`: when a snapshot failed underneath it, that is the
/// reason (and `SNAPSHOT_FAILED` goes out); otherwise the copy error is.
fn push_failed(daemon: &Daemon, id: &str, desc: &str) {
    if fail_if_snapshot_failed(daemon, id).is_none() {
        fail(daemon, id, desc);
    }
}

/// Check running backups for snapshots that failed (a full COW store, an I/O error) and
/// fail those backups; the live volumes are unaffected. `backup-end` and a push worker
/// check their own backup too, so a failure is never missed between two rounds.
pub(crate) fn monitor(daemon: &Daemon) {
    let ids: Vec<String> = daemon.registry().backups.keys().cloned().collect();
    for id in ids {
        fail_if_snapshot_failed(daemon, &id);
    }
}

#[cfg(test)]
mod tests;
