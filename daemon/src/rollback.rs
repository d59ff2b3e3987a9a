//! `volume-rollback`: write back the blocks changed since a checkpoint from the point taken
//! at it (the engine's `tidemark_engine::rollback` does the writing and keeps it crash-safe).
//!
//! Nothing may hold the volume: a rollback is refused while the volume is attached, in a
//! backup (or one is starting), or while any connection is open to its live export, and
//! the refusal lists the holders. Claiming it takes the volume out of the registry and
//! its export out of the NBD server in one step per lock, so no new connection, attach,
//! backup or checkpoint operation can reach it while the blocks are written (they are
//! told a rollback is running). It comes back, exported again, when the rollback ends,
//! or when it is refused before anything was written. A rollback that fails after the
//! engine's marker was written leaves the volume closed and unexported (its data is part
//! old, part rolled back): every command on it says so and names the rerun, which opens
//! it again and finishes the rollback. A daemon that starts with such a volume does the
//! same (the engine refuses to open it for anything but the rollback).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tidemark_engine::rollback::{
    PointIdentity, PointRead, RepositoryPoint, RollbackError, RollbackMarker, RollbackRequest,
};
use tidemark_engine::volume::Volume;
use tidemark_repo::reader::{PointReader, ReaderOptions};
use tidemark_repo::{Repository, StoreOptions};

use crate::daemon::Daemon;
use crate::protocol::{CommandError, ErrorClass, VolumeRollbackArgs};
use crate::volumes::VolumeHandle;

/// The volumes whose rollback is running.
#[derive(Debug, Default)]
pub(crate) struct Rollbacks(Mutex<BTreeSet<String>>);

impl Rollbacks {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.0.lock().unwrap_or_else(|poison| poison.into_inner())
    }
}

/// Why volume `name`, absent from the registry, cannot be used: a rollback of it is
/// running, or one was interrupted. `None` when neither (it does not exist).
pub(crate) fn unavailable(daemon: &Daemon, name: &str) -> Option<CommandError> {
    if daemon.rollbacks.lock().contains(name) {
        return Some(CommandError::conflict(format!(
            "a rollback of volume {name:?} is running; wait until it ends"
        )));
    }
    let marker = Volume::incomplete_rollback(&daemon.config.state_dir, name)?;
    let rerun = rerun_text(name, &marker);
    Some(CommandError::conflict(format!(
        "volume {name}: rollback incomplete, rerun `{rerun}` to finish it (reading, exporting \
         and attaching the volume are refused until then)"
    )))
}

/// The rerun command of an interrupted rollback of volume `name`.
fn rerun_text(name: &str, marker: &Result<RollbackMarker, String>) -> String {
    match marker {
        Ok(marker) => marker.request.command(name),
        Err(_) => format!("tidemark volume rollback {name} --checkpoint C --from POINT..."),
    }
}

/// `volume-list` entries of the volumes a rollback keeps out of the registry: running
/// ("rolling back") or interrupted ("rollback incomplete", with the command that finishes
/// it). `registered` are the names listed already.
pub(crate) fn list_unregistered(daemon: &Daemon, registered: &BTreeSet<String>) -> Vec<Value> {
    let state_dir = &daemon.config.state_dir;
    let names = match Volume::list(state_dir) {
        Ok(names) => names,
        Err(err) => {
            tracing::warn!("listing the volumes of {}: {err}", state_dir.display());
            return Vec::new();
        }
    };
    let running = daemon.rollbacks.lock().clone();
    let mut out = Vec::new();
    for name in names.into_iter().filter(|n| !registered.contains(n)) {
        let (state, rerun) = if running.contains(&name) {
            ("rolling back", None)
        } else {
            match Volume::incomplete_rollback(state_dir, &name) {
                Some(marker) => ("rollback incomplete", Some(rerun_text(&name, &marker))),
                None => continue,
            }
        };
        let hint = match &rerun {
            Some(rerun) => format!(
                "rerun `{rerun}` to finish the rollback (reading, exporting and attaching \
                 the volume are refused until then), or `tidemark volume remove {name}`"
            ),
            None => "wait until the rollback ends".to_string(),
        };
        out.push(json!({
            "name": name,
            "state": state,
            "rerun": rerun,
            "hint": hint,
            "export": null,
            "uri": null,
            "backup": null,
            "attachment": null,
        }));
    }
    out
}

/// `volume-remove` of volume `name`, absent from the registry: a volume whose rollback
/// was interrupted is removed (its state; the backing stays, part rolled back); a running
/// rollback is a conflict. `None` when there is no such volume.
pub(crate) fn remove_unregistered(
    daemon: &Daemon,
    name: &str,
) -> Option<Result<Value, CommandError>> {
    if daemon.rollbacks.lock().contains(name) {
        return Some(Err(CommandError::conflict(format!(
            "a rollback of volume {name:?} is running; wait until it ends, then remove it"
        ))));
    }
    Volume::incomplete_rollback(&daemon.config.state_dir, name).as_ref()?;
    Some((|| {
        // The engine lock keeps a rerun (which opens it the same way) out meanwhile.
        let volume = VolumeHandle::open_for_rollback(&daemon.config.state_dir, name)?;
        let backing = volume.backing().to_path_buf();
        volume.remove().map_err(|(_, err)| err)?;
        tracing::info!(volume = %name, "volume removed with its rollback incomplete");
        Ok(json!({
            "name": name,
            "backing": backing,
            "backing_kept": true,
            "rollback_incomplete": true,
        }))
    })())
}

/// A repository point opened for a rollback, with the runtime its reads block on (the
/// rollback's threads are not the runtime's own).
struct RepoPoint {
    reader: PointReader,
    describe: String,
    _runtime: tokio::runtime::Runtime,
}

impl RepoPoint {
    fn open(at: &RepositoryPoint) -> Result<RepoPoint, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tidemark-repo-rollback")
            .enable_all()
            .build()
            .map_err(|err| format!("starting the repository reader: {err}"))?;
        let reader = runtime
            .block_on(async {
                let repo = Repository::open(&at.url, &StoreOptions::default()).await?;
                PointReader::open(
                    &repo,
                    &at.point,
                    runtime.handle().clone(),
                    ReaderOptions::default(),
                )
                .await
            })
            .map_err(|err| err.to_string())?;
        Ok(RepoPoint {
            reader,
            describe: format!("repo:{} {}", at.url, at.point),
            _runtime: runtime,
        })
    }
}

impl PointRead for RepoPoint {
    fn identity(&self) -> PointIdentity {
        let point = self.reader.point();
        PointIdentity {
            describe: self.describe.clone(),
            volume_uuid: uuid::Uuid::from_bytes(point.volume_uuid),
            size: point.size,
            checkpoint: point.checkpoint.clone(),
            created_unix: point.created_unix,
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.reader.read(offset, buf).map_err(std::io::Error::other)
    }
}

/// The control-protocol class of a rollback failure.
fn rollback_error(err: &RollbackError) -> CommandError {
    let class = match err {
        RollbackError::Point { .. } | RollbackError::Mismatch(_) => ErrorClass::InvalidParameter,
        RollbackError::Busy(_) | RollbackError::OtherIncomplete { .. } => ErrorClass::Conflict,
        RollbackError::Volume(tidemark_engine::volume::VolumeError::Checkpoint(
            tidemark_engine::checkpoint::CheckpointError::NotFound { .. },
        )) => ErrorClass::NotFound,
        _ => ErrorClass::GenericError,
    };
    CommandError::new(class, crate::error_chain(err))
}

/// How long open connections to the live export may take to end before a rollback is
/// refused for them.
const CLOSING_CONNECTIONS_GRACE: Duration = Duration::from_secs(3);

/// Take volume `name` away from every other user, or say who holds it (and whether open
/// NBD connections are all that hold it). Called with the attachments locked (none can
/// start meanwhile).
fn claim(daemon: &Daemon, name: &str) -> Result<Arc<VolumeHandle>, (CommandError, bool)> {
    let mut registry = daemon.registry();
    let Some(volume) = registry.volumes.get(name).cloned() else {
        drop(registry);
        if Volume::incomplete_rollback(&daemon.config.state_dir, name).is_some() {
            // Interrupted earlier (or before a daemon restart): this rerun finishes it.
            return VolumeHandle::open_for_rollback(&daemon.config.state_dir, name)
                .map(Arc::new)
                .map_err(|err| (err, false));
        }
        return Err((
            CommandError::not_found(format!(
                "no volume named {name:?}; `tidemark volume list` shows the volumes"
            )),
            false,
        ));
    };
    let mut holders = Vec::new();
    if let Some(backup) = registry
        .backups
        .values()
        .find(|b| b.volume_names().any(|v| v == name))
    {
        holders.push(format!(
            "backup {} (end it with `tidemark backup end {name}`)",
            backup.id()
        ));
    }
    if registry.reserved.contains(name) {
        holders.push("a backup that is starting".to_string());
    }
    let mut only_connections = false;
    if holders.is_empty() {
        if let Err(connections) = daemon.nbd.remove_export_if_unused(name) {
            only_connections = true;
            holders.push(format!(
                "{connections} open NBD connection(s) to its live export {} (disconnect \
                 those clients: VMs, nbd tools)",
                daemon.uris(name)["unix"].as_str().unwrap_or(name)
            ));
        }
    }
    if !holders.is_empty() {
        return Err((
            CommandError::conflict(format!(
                "volume {name:?} is in use, so it cannot be rolled back: {}",
                holders.join("; ")
            )),
            only_connections,
        ));
    }
    registry.volumes.remove(name);
    daemon.rollbacks.lock().insert(name.to_string());
    Ok(volume)
}

/// Serve volume `name` again: back in the registry and exported.
fn put_back(daemon: &Daemon, volume: Arc<VolumeHandle>) {
    let name = volume.name().to_string();
    if let Err(err) = daemon.nbd.add_export(&name, volume.live_export()) {
        tracing::error!(volume = %name, "exporting again after the rollback failed: {}", err.desc);
    }
    daemon.registry().volumes.insert(name, volume);
}

/// `volume-rollback`.
pub(crate) fn rollback(daemon: &Daemon, args: VolumeRollbackArgs) -> Result<Value, CommandError> {
    let VolumeRollbackArgs {
        name,
        checkpoint,
        base,
        deltas,
        repository,
        point,
    } = args;
    let repository = match (repository, point) {
        (Some(url), Some(point)) if base.as_os_str().is_empty() && deltas.is_empty() => {
            Some(RepositoryPoint { url, point })
        }
        (None, None) => None,
        _ => {
            return Err(CommandError::invalid(
                "volume-rollback: give the point either as files (base, deltas) or as a \
                 repository point (repository and point), not both",
            ))
        }
    };
    if let Some(path) = std::iter::once(&base)
        .chain(&deltas)
        .filter(|_| repository.is_none())
        .find(|p| !p.is_absolute())
    {
        return Err(CommandError::invalid(format!(
            "volume-rollback: {} must be an absolute path (the daemon's working directory is \
             not yours)",
            path.display()
        )));
    }
    let request = RollbackRequest {
        checkpoint,
        base,
        deltas,
        repository,
    };
    // A repository point is opened before the volume is claimed: a repository that cannot
    // be read leaves the volume untouched and served.
    let opened = match &request.repository {
        Some(at) => Some(RepoPoint::open(at).map_err(|why| {
            CommandError::invalid(format!(
                "volume-rollback: the point repo:{} {}: {why}",
                at.url, at.point
            ))
        })?),
        None => None,
    };
    // A client that has just gone (a VM shut down, qemu-img exited) is still counted until
    // its connection's thread sees the close: give such connections a moment to end.
    let deadline = Instant::now() + CLOSING_CONNECTIONS_GRACE;
    let volume = loop {
        let mut only_connections = false;
        let claimed = daemon.attachments.unless_attached(&name, || {
            claim(daemon, &name).map_err(|(err, connections)| {
                only_connections = connections;
                err
            })
        });
        match claimed {
            Err(_) if only_connections && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            claimed => break claimed?,
        }
    };
    tracing::info!(volume = %name, "rollback: {}", request.command(&name));
    let result = volume.rollback(&request, opened.as_ref().map(|p| p as &dyn PointRead));
    daemon.rollbacks.lock().remove(&name);
    match result {
        Ok(report) => {
            put_back(daemon, volume);
            tracing::info!(
                volume = %name,
                bytes = report.bytes_rolled_back,
                dropped = ?report.dropped_checkpoints,
                "rolled back to checkpoint {}",
                report.checkpoint
            );
            daemon.emit(
                "VOLUME_ROLLED_BACK",
                json!({"volume": name, "checkpoint": report.checkpoint}),
            );
            Ok(serde_json::to_value(&report).unwrap_or(Value::Null))
        }
        Err(err) => {
            let reply = rollback_error(&err);
            if Volume::incomplete_rollback(&daemon.config.state_dir, &name).is_some() {
                // Part written: never serve it like this (dropping the last handle closes
                // the volume); the rerun opens it again.
                tracing::error!(volume = %name, "rollback incomplete: {}", reply.desc);
                drop(volume);
            } else {
                put_back(daemon, volume);
            }
            Err(reply)
        }
    }
}
