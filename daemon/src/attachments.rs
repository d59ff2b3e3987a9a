//! Attachments as daemon state: `volume-attach` and `volume-detach`, the records in
//! `<state-dir>/attachments/<name>.json`, recovery at start and detaching at shutdown.
//!
//! A record is written (atomically) once the device exists and removed once it is gone,
//! so the state dir always lists what this daemon holds in the kernel. At start:
//! - a kernel NBD record of a volume is served again: new socketpairs go to the same
//!   `/dev/nbdN` with NBD_CMD_RECONFIGURE; the kernel held the I/O meanwhile (the
//!   dead-connection timeout is [`DEAD_CONN_TIMEOUT`]), so a mounted filesystem only
//!   paused;
//! - a FUSE + loop record cannot be served again (a FUSE filesystem dies with its server:
//!   the filesystem above has been getting EIO, never wrong data), so its loop device is
//!   unbound and its FUSE mount lazily unmounted, and the loss is logged and emitted as
//!   `ATTACHMENT_LOST`;
//! - a snapshot's (`NAME@backup`) record is dropped: snapshots do not outlive the daemon.
//!
//! At a clean shutdown every attachment that is not in use is detached. A device still
//! mounted stays: kernel NBD holds its I/O until the next start reconnects it (or the
//! timeout passes); a FUSE one loses its server with the daemon and the next start
//! cleans it up.
//!
//! Lock order: the attachments lock may be held while taking the registry lock, never
//! the other way round.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Value};
use tidemark_nbd::export::Export;

use crate::attach::fuse::{cleanup_stale, FuseLoop};
use crate::attach::nbd::{self, KernelNbd, MAX_QUEUES};
use crate::attach::{AttachError, Attached, Attachment, FrontEnd, Resources, Via};
use crate::daemon::Daemon;
use crate::protocol::{CommandError, VolumeAttachArgs};

/// How long the kernel holds the I/O of a kernel NBD device whose daemon is gone.
pub const DEAD_CONN_TIMEOUT: Duration = Duration::from_secs(120);

/// One live attachment.
struct Live {
    attached: Box<dyn Attached>,
    /// The backup whose snapshot it is (`None`: a live volume).
    backup: Option<String>,
}

/// The daemon's attachments.
pub(crate) struct Attachments {
    /// `<state-dir>/attachments`: one record per attachment.
    records: PathBuf,
    /// `<state-dir>/attach`: the FUSE mounts.
    mounts: PathBuf,
    live: Mutex<BTreeMap<String, Live>>,
}

impl Attachments {
    pub(crate) fn new(state_dir: &Path) -> Attachments {
        Attachments {
            records: state_dir.join("attachments"),
            mounts: state_dir.join("attach"),
            live: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Live>> {
        // Every update is one insert or remove: still consistent after a panic.
        self.live
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.records.join(format!("{name}.json"))
    }

    fn save(&self, record: &Attachment) -> Result<(), String> {
        std::fs::create_dir_all(&self.records)
            .map_err(|err| format!("creating {}: {err}", self.records.display()))?;
        let path = self.record_path(&record.volume);
        let mut text = serde_json::to_vec_pretty(record).map_err(|err| err.to_string())?;
        text.push(b'\n');
        tidemark_formats::atomic_replace(&path, &text)
            .map_err(|err| format!("writing {}: {err}", path.display()))
    }

    fn forget(&self, name: &str) {
        let path = self.record_path(name);
        if let Err(err) = std::fs::remove_file(&path) {
            if err.kind() != std::io::ErrorKind::NotFound {
                tracing::error!("removing the attachment record {}: {err}", path.display());
            }
        }
    }

    /// The attachment of `name`, as reported.
    pub(crate) fn report(&self, name: &str) -> Option<Value> {
        self.lock()
            .get(name)
            .map(|live| report(&live.attached.record()))
    }

    /// Every attachment, as reported.
    pub(crate) fn list(&self) -> Value {
        Value::Array(self.records().iter().map(report).collect())
    }

    /// Every attachment's record, with its I/O counters as they are now.
    pub(crate) fn records(&self) -> Vec<Attachment> {
        self.lock()
            .values()
            .map(|live| live.attached.record())
            .collect()
    }

    /// Refuse removing volume `name` while it is attached; `then` runs with the
    /// attachments locked, so no attach can slip in between.
    pub(crate) fn unless_attached<T>(
        &self,
        name: &str,
        then: impl FnOnce() -> Result<T, CommandError>,
    ) -> Result<T, CommandError> {
        let live = self.lock();
        if let Some(attached) = live.get(name) {
            return Err(CommandError::conflict(format!(
                "volume {name:?} is attached as {}; unmount what uses it and `tidemark volume \
                 detach {name}` first",
                attached.attached.record().device.display()
            )));
        }
        then()
    }

    /// The name of an attached snapshot of backup `id`, if one is.
    pub(crate) fn snapshot_attached(&self, id: &str) -> Option<String> {
        self.lock()
            .iter()
            .find(|(_, live)| live.backup.as_deref() == Some(id))
            .map(|(name, _)| name.clone())
    }

    /// `volume-attach`.
    pub(crate) fn attach(
        &self,
        daemon: &Daemon,
        args: VolumeAttachArgs,
    ) -> Result<Value, CommandError> {
        let VolumeAttachArgs {
            name,
            via,
            read_only,
            queues,
        } = args;
        if let Some(queues) = queues {
            if queues == 0 || queues as usize > MAX_QUEUES {
                return Err(CommandError::invalid(format!(
                    "volume-attach: queues must be 1 to {MAX_QUEUES}, not {queues}"
                )));
            }
        }
        let mut live = self.lock();
        if let Some(existing) = live.get(&name) {
            let record = existing.attached.record();
            return Err(CommandError::conflict(format!(
                "{name:?} is already attached as {} (via {}); `tidemark volume detach {name}` \
                 first",
                record.device.display(),
                record.via()
            )));
        }
        let Target {
            export,
            backup,
            read_only,
        } = resolve(daemon, &name, read_only)?;
        let via = via.unwrap_or_else(|| {
            if nbd::available() {
                Via::Nbd
            } else {
                Via::Fuse
            }
        });
        let attached = match via {
            Via::Nbd => {
                let mut front = KernelNbd {
                    dead_conn_timeout: DEAD_CONN_TIMEOUT,
                    ..KernelNbd::default()
                };
                if let Some(queues) = queues {
                    front.queues = queues as usize;
                }
                front.attach(&name, export, read_only)
            }
            Via::Fuse => {
                if queues.is_some() {
                    return Err(CommandError::invalid(
                        "volume-attach: queues applies to --via nbd only (FUSE serves with a \
                         worker pool of its own)",
                    ));
                }
                FuseLoop::new(&self.mounts).attach(&name, export, read_only)
            }
        }
        .map_err(|err| CommandError::failed(format!("cannot attach {name:?}: {err}")))?;
        let mut attached = attached;
        let record = attached.record();
        if let Err(err) = self.save(&record) {
            if let Err(undo) = attached.detach() {
                tracing::error!(
                    "undoing the attach of {name:?} after its record failed: {undo}; the \
                     device {} stays until the daemon stops",
                    record.device.display()
                );
            }
            return Err(CommandError::failed(format!(
                "{name:?} not attached: recording it failed ({err}); check that the state \
                 dir is writable and not full"
            )));
        }
        tracing::info!(
            volume = %name,
            device = %record.device.display(),
            via = %record.via(),
            "attached"
        );
        live.insert(name, Live { attached, backup });
        Ok(report(&record))
    }

    /// `volume-detach`.
    pub(crate) fn detach(&self, name: &str) -> Result<Value, CommandError> {
        let mut live = self.lock();
        let Some(entry) = live.get_mut(name) else {
            return Err(CommandError::not_found(format!(
                "{name:?} is not attached; `tidemark volume list` shows the attachments"
            )));
        };
        let record = entry.attached.record();
        entry.attached.detach().map_err(|err| match err {
            AttachError::Busy { .. } => {
                CommandError::conflict(format!("cannot detach {name:?}: {err}"))
            }
            other => CommandError::failed(format!("cannot detach {name:?}: {other}")),
        })?;
        live.remove(name);
        self.forget(name);
        tracing::info!(volume = %name, device = %record.device.display(), "detached");
        let mut reply = report(&record);
        reply["detached"] = json!(true);
        Ok(reply)
    }

    /// At start: serve kernel NBD records again, clean up what dead FUSE servers left.
    pub(crate) fn recover(&self, daemon: &Daemon) {
        let Ok(entries) = std::fs::read_dir(&self.records) else {
            return;
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        for path in paths {
            let record: Attachment = match std::fs::read(&path)
                .map_err(|err| err.to_string())
                .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|err| err.to_string()))
            {
                Ok(record) => record,
                Err(err) => {
                    tracing::error!(
                        "the attachment record {} is unreadable ({err}); it is left in place: \
                         check the device it names by hand, then remove the file",
                        path.display()
                    );
                    continue;
                }
            };
            self.recover_one(daemon, record);
        }
    }

    fn recover_one(&self, daemon: &Daemon, record: Attachment) {
        let name = record.volume.clone();
        let device = record.device.display().to_string();
        match record.resources {
            Resources::Fuse { .. } => {
                let cleaned = cleanup_stale(&record);
                self.forget(&name);
                let data = json!({
                    "name": name,
                    "device": device,
                    "via": "fuse",
                    "cleaned_up": cleaned.is_ok(),
                    "reason": "a FUSE attachment cannot outlive the daemon that served it: \
                               the filesystem on it got EIO (never wrong data); unmount it, \
                               then attach the volume again",
                });
                if let Err(err) = cleaned {
                    tracing::error!(volume = %name, "cleaning up {device}: {err}");
                }
                daemon.emit("ATTACHMENT_LOST", data);
            }
            Resources::Nbd { .. } => {
                let volume = daemon.volume(&name).ok();
                let Some(volume) = volume else {
                    self.forget(&name);
                    daemon.emit(
                        "ATTACHMENT_LOST",
                        json!({
                            "name": name, "device": device, "via": "nbd",
                            "reason": "no such volume (a backup snapshot does not outlive the \
                                       daemon); the kernel fails its I/O once the dead-connection \
                                       timeout passes",
                        }),
                    );
                    return;
                };
                let front = KernelNbd {
                    dead_conn_timeout: DEAD_CONN_TIMEOUT,
                    ..KernelNbd::default()
                };
                match front.reconnect(&record, volume.live_export()) {
                    Ok(attached) => {
                        tracing::info!(volume = %name, device = %device, "reconnected");
                        if let Err(err) = self.save(&attached.record()) {
                            tracing::error!(volume = %name, "updating the record: {err}");
                        }
                        self.lock().insert(
                            name.clone(),
                            Live {
                                attached,
                                backup: None,
                            },
                        );
                        daemon.emit(
                            "ATTACHMENT_RECONNECTED",
                            json!({"name": name, "device": device, "via": "nbd"}),
                        );
                    }
                    Err(err) => {
                        self.forget(&name);
                        daemon.emit(
                            "ATTACHMENT_LOST",
                            json!({"name": name, "device": device, "via": "nbd",
                                   "reason": format!("reconnecting failed: {err}")}),
                        );
                    }
                }
            }
        }
    }

    /// At a clean shutdown: detach what is not in use; say what happens to the rest.
    pub(crate) fn shutdown(&self) {
        let all = std::mem::take(&mut *self.lock());
        for (name, mut live) in all {
            let record = live.attached.record();
            match live.attached.detach() {
                Ok(()) => {
                    self.forget(&name);
                    tracing::info!(volume = %name, "detached at shutdown");
                }
                Err(err) => match record.via() {
                    Via::Nbd => tracing::warn!(
                        volume = %name,
                        "{} stays ({err}): the kernel holds its I/O for {} s; start the daemon \
                         again to reconnect it",
                        record.device.display(),
                        DEAD_CONN_TIMEOUT.as_secs()
                    ),
                    Via::Fuse => tracing::warn!(
                        volume = %name,
                        "{} stays ({err}): its FUSE server stops with the daemon, so the \
                         filesystem on it gets EIO from now on; unmount it; the next start \
                         cleans the device up",
                        record.device.display()
                    ),
                },
            }
        }
    }
}

/// What an attachment serves.
struct Target {
    export: Arc<dyn Export>,
    /// The backup whose snapshot it is.
    backup: Option<String>,
    read_only: bool,
}

/// What `name` attaches: a volume's live export, or a running backup's snapshot export
/// (always read-only), with the backup's id.
fn resolve(daemon: &Daemon, name: &str, read_only: bool) -> Result<Target, CommandError> {
    if let Ok(volume) = daemon.volume(name) {
        return Ok(Target {
            export: volume.live_export(),
            backup: None,
            read_only,
        });
    }
    let registry = daemon.registry();
    for backup in registry.backups.values() {
        if let Some(export) = backup.snapshot_export(name) {
            return Ok(Target {
                export,
                backup: Some(backup.id().to_string()),
                read_only: true,
            });
        }
    }
    if let Some(unavailable) = crate::rollback::unavailable(daemon, name) {
        return Err(unavailable);
    }
    let exports: Vec<&str> = registry
        .backups
        .values()
        .flat_map(|b| b.export_names())
        .collect();
    Err(CommandError::not_found(format!(
        "no volume or backup snapshot named {name:?}; `tidemark volume list` shows volumes{}",
        if exports.is_empty() {
            String::new()
        } else {
            format!(", running backups export {}", exports.join(", "))
        }
    )))
}

/// An attachment as `volume-attach`, `volume-info` and `query-status` report it.
pub(crate) fn report(record: &Attachment) -> Value {
    let mut value = json!({
        "name": record.volume,
        "device": record.device,
        "via": record.via(),
        "read_only": record.read_only,
        "since": record.since,
        "pid": record.pid,
        "io": record.io,
    });
    match &record.resources {
        Resources::Nbd { index, queues } => {
            value["index"] = json!(index);
            value["queues"] = json!(queues);
        }
        Resources::Fuse { mount } => value["fuse_mount"] = json!(mount),
    }
    value
}
