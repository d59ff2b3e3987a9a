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
use tidemark_engine::rollback::{RollbackError, RollbackRequest};
use tidemark_engine::volume::Volume;

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
    let rerun = match marker {
        Ok(marker) => marker.request.command(name),
        Err(_) => format!("tidemark volume rollback {name} --checkpoint C --from POINT..."),
    };
    Some(CommandError::conflict(format!(
        "volume {name}: rollback incomplete, rerun `{rerun}` to finish it (reading, exporting \
         and attaching the volume are refused until then)"
    )))
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
    } = args;
    if let Some(path) = std::iter::once(&base)
        .chain(&deltas)
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
    let result = volume.rollback(&request);
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
