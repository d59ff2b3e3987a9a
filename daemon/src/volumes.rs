//! The facade over engine volumes and snapshots, quiescing and the NBD server: the one
//! place the daemon's logic calls into `tidemark_engine` and `tidemark_nbd`, so it reads
//! in its own words ([`VolumeHandle`], [`SnapshotHandle`], [`NbdServer`]) and engine
//! errors become control-protocol errors with the right class.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tidemark_engine::checkpoint::CheckpointError;
use tidemark_engine::quiesce::{self, QuiesceError, QuiesceSpec};
use tidemark_engine::rollback::{RollbackError, RollbackReport, RollbackRequest};
use tidemark_engine::snapshot::{CowOptions, Snapshot};
use tidemark_engine::status::{SnapshotState, VolumeStatus};
use tidemark_engine::volume::{
    PausePhases, SnapshotSpec, TrackingMode, Volume, VolumeError, VolumeOptions,
};
use tidemark_formats::delta::CheckpointRef;
use tidemark_nbd::export::{Capabilities, Export, ExportResult, Extent, MetaContext, ZeroFlags};

use tidemark_nbd::server::{Server, ServerConfig, ServerError};

use crate::backup::Progress;
use crate::daemon::DaemonError;
use crate::export::{describe_origin, SnapshotExport, VolumeExport};
use crate::protocol::{CommandError, ErrorClass, PushFormat};
use crate::push;

/// The control-protocol class of an engine error.
fn volume_error(err: VolumeError) -> CommandError {
    let class = match &err {
        VolumeError::NotFound { .. }
        | VolumeError::SnapshotNotFound { .. }
        | VolumeError::Checkpoint(CheckpointError::NotFound { .. }) => ErrorClass::NotFound,
        VolumeError::Exists { .. }
        | VolumeError::Locked { .. }
        | VolumeError::SnapshotExists { .. }
        | VolumeError::Checkpoint(CheckpointError::Exists { .. }) => ErrorClass::Conflict,
        VolumeError::Invalid(_) | VolumeError::Checkpoint(CheckpointError::InvalidName { .. }) => {
            ErrorClass::InvalidParameter
        }
        _ => ErrorClass::GenericError,
    };
    CommandError::new(class, crate::error_chain(&err))
}

/// A volume the daemon owns.
pub struct VolumeHandle {
    state_dir: PathBuf,
    volume: Arc<Volume>,
}

impl VolumeHandle {
    /// Register `backing` as a new volume and open it.
    pub fn create(
        state_dir: &Path,
        name: &str,
        backing: &Path,
        size: Option<u64>,
        granularity: Option<u64>,
        fast: bool,
    ) -> Result<VolumeHandle, CommandError> {
        let mut options = VolumeOptions {
            size,
            ..VolumeOptions::default()
        };
        if fast {
            options.tracking = TrackingMode::Fast;
        }
        if let Some(granularity) = granularity {
            options.granularity = u32::try_from(granularity).map_err(|_| {
                CommandError::new(
                    ErrorClass::InvalidParameter,
                    format!("granularity {granularity} is too large: at most 1 MiB"),
                )
            })?;
        }
        let created = size.is_some() && !backing.exists();
        if created {
            // A new image file: create it empty; the engine extends it to `size`.
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(backing)
                .map_err(|err| {
                    CommandError::new(
                        ErrorClass::GenericError,
                        format!("creating the backing file {}: {err}", backing.display()),
                    )
                })?;
        }
        let volume = Volume::create(state_dir, name, backing, options).map_err(|err| {
            if created {
                // Leave nothing behind for a volume that was refused.
                let _ = std::fs::remove_file(backing);
            }
            volume_error(err)
        })?;
        Ok(VolumeHandle {
            state_dir: state_dir.to_path_buf(),
            volume: Arc::new(volume),
        })
    }

    /// Open every volume of the state dir (a daemon start).
    pub fn open_all(state_dir: &Path) -> Result<Vec<VolumeHandle>, DaemonError> {
        let names = Volume::list(state_dir).map_err(|source| DaemonError::ListVolumes {
            state_dir: state_dir.to_path_buf(),
            source: Box::new(source),
        })?;
        let mut volumes = Vec::new();
        for name in names {
            match Volume::open(state_dir, &name) {
                Ok(volume) => volumes.push(VolumeHandle {
                    state_dir: state_dir.to_path_buf(),
                    volume: Arc::new(volume),
                }),
                // One broken volume must not keep the others offline.
                Err(err) => tracing::error!(volume = %name, "cannot open: {err}"),
            }
        }
        Ok(volumes)
    }

    pub fn name(&self) -> &str {
        self.volume.name()
    }

    pub fn backing(&self) -> &Path {
        self.volume.backing()
    }

    /// The engine's status of the volume.
    pub fn status(&self) -> VolumeStatus {
        self.volume.status()
    }

    /// The live export (read-write) of this volume.
    pub fn live_export(&self) -> Arc<dyn Export> {
        Arc::new(VolumeExport::new(Arc::clone(&self.volume)))
    }

    pub fn checkpoint_create(&self, name: &str) -> Result<Value, CommandError> {
        let info = self.volume.checkpoint_create(name).map_err(volume_error)?;
        Ok(serde_json::to_value(info).unwrap_or(Value::Null))
    }

    pub fn checkpoint_list(&self) -> Result<Value, CommandError> {
        Ok(serde_json::to_value(self.volume.checkpoints()).unwrap_or(Value::Null))
    }

    pub fn checkpoint_delete(&self, name: &str) -> Result<(), CommandError> {
        self.volume.checkpoint_delete(name).map_err(volume_error)
    }

    /// Record that the backup which created checkpoint `name` stored its data.
    pub fn checkpoint_confirm(&self, name: &str) -> Result<(), CommandError> {
        self.volume.checkpoint_confirm(name).map_err(volume_error)
    }

    /// Refuse an incremental backup from checkpoint `since` when the backup that created
    /// it was never seen through (failed, ended `--failed`, or cut off by a daemon stop).
    pub fn check_confirmed(&self, since: &str) -> Result<(), CommandError> {
        match self.volume.checkpoints().iter().find(|c| c.name == since) {
            Some(c) if !c.confirmed => Err(CommandError::conflict(format!(
                "checkpoint {since:?} of volume {:?} is unconfirmed: the backup that created it \
                 did not complete (it failed, was ended with --failed, or the daemon stopped), \
                 so the data changed before {since:?} may be missing from your backups and an \
                 incremental from it would skip it; take a full backup or an incremental from \
                 an earlier confirmed checkpoint, or pass --force (protocol \"force\": true) \
                 if you know the data at {since:?} was stored",
                self.name()
            ))),
            // Unknown names get the engine's own error when the snapshot is taken.
            _ => Ok(()),
        }
    }

    /// Open a volume whose rollback was interrupted, to finish it (nothing else opens it).
    pub(crate) fn open_for_rollback(
        state_dir: &Path,
        name: &str,
    ) -> Result<VolumeHandle, CommandError> {
        let volume = Volume::open_for_rollback(state_dir, name).map_err(volume_error)?;
        Ok(VolumeHandle {
            state_dir: state_dir.to_path_buf(),
            volume: Arc::new(volume),
        })
    }

    /// Roll the volume back (`volume-rollback`); the caller has made sure nothing uses it.
    pub(crate) fn rollback(
        &self,
        request: &RollbackRequest,
        point: Option<&dyn tidemark_engine::rollback::PointRead>,
    ) -> Result<RollbackReport, RollbackError> {
        match point {
            Some(point) => self.volume.rollback_from(request, point),
            None => self.volume.rollback(request),
        }
    }

    /// Wait (bounded) until nobody else holds the volume, e.g. NBD connections that are
    /// closing after their export was removed.
    fn into_sole(self) -> Result<(PathBuf, Volume), VolumeHandle> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut handle = self;
        loop {
            match Arc::try_unwrap(handle.volume) {
                Ok(volume) => return Ok((handle.state_dir, volume)),
                Err(volume) => {
                    handle = VolumeHandle {
                        state_dir: handle.state_dir,
                        volume,
                    };
                    if Instant::now() > deadline {
                        return Err(handle);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// Stop cleanly (bitmaps persisted clean). When something still holds the volume,
    /// it closes when the last holder lets go (dropping a volume closes it cleanly).
    pub fn close(self) -> Result<(), CommandError> {
        match self.into_sole() {
            Ok((_, volume)) => volume.close().map_err(volume_error),
            Err(handle) => {
                tracing::warn!(
                    volume = handle.name(),
                    "still in use; it closes when released"
                );
                Ok(())
            }
        }
    }

    /// Close and forget the volume (manifest, checkpoints, bitmaps); the backing stays.
    /// On failure the volume comes back (still open, or reopened) when it can.
    pub fn remove(self) -> Result<(), (Option<VolumeHandle>, CommandError)> {
        let (state_dir, volume) = self.into_sole().map_err(|handle| {
            let desc = format!(
                "volume {:?} is still in use (NBD connections are closing); retry",
                handle.name()
            );
            (Some(handle), CommandError::new(ErrorClass::Conflict, desc))
        })?;
        let name = volume.name().to_string();
        if let Err(err) = volume.close() {
            tracing::warn!(volume = %name, "closing before removal: {err}");
        }
        Volume::remove(&state_dir, &name).map_err(|err| {
            let failure = CommandError::failed(crate::error_chain(&err));
            match Volume::open(&state_dir, &name) {
                Ok(volume) => (
                    Some(VolumeHandle { state_dir: state_dir.clone(), volume: Arc::new(volume) }),
                    failure,
                ),
                Err(reopen) => {
                    tracing::error!(volume = %name, "removal failed and reopening failed: {reopen}");
                    (None, failure)
                }
            }
        })
    }
}

/// A snapshot taken for a backup; dropping the handle drops the snapshot and its COW
/// store (exports still holding it then read as "dropped").
pub struct SnapshotHandle {
    volume: Arc<Volume>,
    snapshot: Snapshot,
}

impl SnapshotHandle {
    pub fn size(&self) -> u64 {
        self.snapshot.size()
    }

    pub fn status(&self) -> Value {
        serde_json::to_value(self.snapshot.status())
            .unwrap_or_else(|err| json!({"error": err.to_string()}))
    }

    /// A read-only export of the snapshot, offering its frozen dirty bitmap (if any). Its
    /// NBD description names the volume's uuid and granularity, which `tidemark pull
    /// --delta` records in the delta's header (see [`describe_origin`]).
    pub fn export(&self) -> Arc<dyn Export> {
        let description = describe_origin(
            &format!(
                "tidemark snapshot {} of volume {}",
                self.snapshot.name(),
                self.snapshot.volume()
            ),
            self.volume.uuid(),
            self.volume.granularity(),
        );
        Arc::new(Described {
            inner: SnapshotExport::new(self.snapshot.clone()),
            description,
        })
    }

    /// Why the snapshot failed, if it did (COW store full, I/O error).
    pub fn failure(&self) -> Option<String> {
        let status = self.snapshot.status();
        match status.state {
            SnapshotState::Active => None,
            SnapshotState::Failed | SnapshotState::Dropped => Some(
                status
                    .error
                    .unwrap_or_else(|| format!("snapshot {:?}", status.state)),
            ),
        }
    }
}

/// An export with another NBD description; everything else is `inner`'s.
struct Described<E> {
    inner: E,
    description: String,
}

impl<E: Export> Export for Described<E> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn description(&self) -> String {
        self.description.clone()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> ExportResult<()> {
        self.inner.read(offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> ExportResult<()> {
        self.inner.write(offset, data, fua)
    }

    fn flush(&self) -> ExportResult<()> {
        self.inner.flush()
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> ExportResult<()> {
        self.inner.trim(offset, len, fua)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> ExportResult<()> {
        self.inner.write_zeroes(offset, len, flags)
    }

    fn cache(&self, offset: u64, len: u64) -> ExportResult<()> {
        self.inner.cache(offset, len)
    }

    fn dirty_bitmaps(&self) -> Vec<String> {
        self.inner.dirty_bitmaps()
    }

    fn block_status(
        &self,
        context: &MetaContext,
        offset: u64,
        len: u64,
    ) -> ExportResult<Vec<Extent>> {
        self.inner.block_status(context, offset, len)
    }
}

impl Drop for SnapshotHandle {
    fn drop(&mut self) {
        if let Err(err) = self.volume.drop_snapshot(self.snapshot.name()) {
            tracing::warn!(
                volume = self.volume.name(),
                snapshot = self.snapshot.name(),
                "dropping the snapshot: {err}"
            );
        }
    }
}

/// The snapshots of one group snapshot and how long writes were paused.
pub struct GroupSnapshot {
    pub snapshots: Vec<SnapshotHandle>,
    pub pause: Duration,
    pub phases: PausePhases,
}

/// Snapshot `volumes` at one instant (one write pause for all), creating `checkpoint` on
/// each and freezing each one's changes since `since`; all or nothing.
pub fn group_snapshot(
    name: &str,
    volumes: &[Arc<VolumeHandle>],
    checkpoint: Option<&str>,
    since: Option<&str>,
    cow_limit: Option<u64>,
) -> Result<GroupSnapshot, CommandError> {
    let spec = SnapshotSpec {
        name: name.to_string(),
        checkpoint: checkpoint.map(str::to_string),
        since: since.map(str::to_string),
        cow: CowOptions {
            limit: cow_limit,
            ..CowOptions::default()
        },
    };
    let requests: Vec<(&Volume, SnapshotSpec)> =
        volumes.iter().map(|v| (&*v.volume, spec.clone())).collect();
    let group = Volume::snapshot_group(&requests).map_err(volume_error)?;
    let snapshots = volumes
        .iter()
        .zip(group.snapshots)
        .map(|(v, snapshot)| SnapshotHandle {
            volume: Arc::clone(&v.volume),
            snapshot,
        })
        .collect();
    Ok(GroupSnapshot {
        snapshots,
        pause: group.pause,
        phases: group.phases,
    })
}

/// The daemon's NBD server.
pub struct NbdServer {
    server: Server,
}

/// The NBD server's accept loops.
pub struct NbdTask {
    server: Server,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl NbdTask {
    /// Stop accepting, let in-flight requests finish (bounded), close every connection.
    pub async fn stop(self) {
        self.server.shutdown();
        if !self.server.wait_idle(Duration::from_secs(5)).await {
            tracing::warn!("NBD connections still open after 5 s; closing anyway");
        }
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

impl NbdServer {
    pub fn new(config: ServerConfig) -> NbdServer {
        NbdServer {
            server: Server::with_config(config),
        }
    }

    pub fn add_export(&self, name: &str, export: Arc<dyn Export>) -> Result<(), CommandError> {
        self.server.add_export(name, export).map_err(|err| {
            let class = match err {
                ServerError::DuplicateExport(_) => ErrorClass::Conflict,
                ServerError::InvalidName(_) => ErrorClass::InvalidParameter,
                _ => ErrorClass::GenericError,
            };
            CommandError::new(class, crate::error_chain(&err))
        })
    }

    /// Require TLS on every NBD connection over TCP from now on (the Unix socket stays
    /// plain: it is mode 0600, and local clients such as the kernel's speak no TLS).
    pub fn set_tls(&self, tls: tidemark_nbd::tls::TlsServer) {
        self.server.set_tls(tls, false);
    }

    /// Stop serving `name`; its connections close after their in-flight requests.
    pub fn remove_export(&self, name: &str) {
        drop(self.server.remove_export(name));
    }

    /// Every export's NBD activity (metrics).
    pub fn export_stats(&self) -> Vec<tidemark_nbd::server::ExportStats> {
        self.server.export_stats()
    }

    /// Stop serving `name` unless a connection uses it: `Err` with how many do.
    pub(crate) fn remove_export_if_unused(&self, name: &str) -> Result<(), usize> {
        self.server.remove_export_if_unused(name).map(drop)
    }

    pub fn has_export(&self, name: &str) -> bool {
        self.server.export_names().iter().any(|n| n == name)
    }

    /// Bind the Unix socket (mode 0600) and, when asked, TCP; serve until stopped.
    pub async fn serve(
        &self,
        socket: &Path,
        listen: Option<SocketAddr>,
    ) -> Result<NbdTask, ServerError> {
        let mut listeners = vec![self.server.bind_unix(socket)?];
        if let Some(addr) = listen {
            listeners.push(self.server.bind_tcp(&addr.to_string()).await?);
        }
        let tasks = listeners
            .into_iter()
            .map(|listener| {
                let server = self.server.clone();
                tokio::spawn(async move {
                    if let Err(err) = server.serve(listener).await {
                        tracing::error!("NBD server stopped: {err}");
                    }
                })
            })
            .collect();
        Ok(NbdTask {
            server: self.server.clone(),
            tasks,
        })
    }
}

/// Copy every job's snapshot to its target; the first failure stops the push.
///
/// A new full image and a delta are written as `TARGET.partial` (created here, never a
/// file that existed) and renamed into place only when every volume of the backup was
/// written; a failed or cancelled push removes its partial files, so it leaves no target
/// behind and leaves a target that existed before untouched. In place, without staging:
/// a block device, and the update-img of an incremental image push.
pub fn push(
    jobs: &[(Arc<SnapshotHandle>, PathBuf)],
    format: PushFormat,
    checkpoint: Option<&str>,
    progress: &Arc<Progress>,
) -> Result<Value, CommandError> {
    let mut staged: Vec<(PathBuf, PathBuf)> = Vec::new();
    let result = push_staged(jobs, format, checkpoint, progress, &mut staged).and_then(|reports| {
        for (at, (partial, target)) in staged.iter().enumerate() {
            if let Err(desc) = push::commit_partial(partial, target) {
                // The ones before are in place (complete images); drop the rest.
                staged.drain(..at);
                return Err(CommandError::failed(desc));
            }
        }
        staged.clear();
        Ok(reports)
    });
    for (partial, _) in &staged {
        if let Err(err) = std::fs::remove_file(partial) {
            tracing::warn!(
                "removing {} after the failed push: {err}",
                partial.display()
            );
        }
    }
    result
}

fn push_staged(
    jobs: &[(Arc<SnapshotHandle>, PathBuf)],
    format: PushFormat,
    checkpoint: Option<&str>,
    progress: &Arc<Progress>,
    staged: &mut Vec<(PathBuf, PathBuf)>,
) -> Result<Value, CommandError> {
    let failed = |desc: String| CommandError::failed(desc);
    let mut reports = Vec::new();
    for (handle, target) in jobs {
        let snapshot = &handle.snapshot;
        let full = snapshot.dirty_bitmap().is_none();
        let stage = match format {
            PushFormat::Image => full && !push::is_block_device(target),
            PushFormat::Delta => true,
        };
        // The file is opened once here and written through its handle: never reopened by
        // a name someone could swap for a symlink meanwhile.
        let (file, shown) = if stage {
            let partial = push::partial_path(target);
            let file = push::create_partial(&partial, target).map_err(failed)?;
            staged.push((partial.clone(), target.clone()));
            (file, partial)
        } else {
            (push::open_target(target).map_err(failed)?, target.clone())
        };
        let write_to = push::handle_path(&file);
        let report = match format {
            PushFormat::Image => {
                let report =
                    push::push_image(snapshot, &write_to, &shown, progress).map_err(failed)?;
                json!({"volume": snapshot.volume(), "target": target, "copy": report})
            }
            PushFormat::Delta => {
                let volume = &handle.volume;
                let checkpoints = volume.checkpoints();
                let generation = |name: &str| {
                    checkpoints
                        .iter()
                        .find(|c| c.name == name)
                        .map(|c| c.generation)
                        .unwrap_or(0)
                };
                let from = snapshot.dirty_bitmap().map(|b| CheckpointRef {
                    name: b.name().to_string(),
                    generation: generation(b.name()),
                });
                let to = match checkpoint {
                    Some(name) => CheckpointRef {
                        name: name.to_string(),
                        generation: generation(name),
                    },
                    None => CheckpointRef {
                        name: snapshot.name().to_string(),
                        generation: volume.generation(),
                    },
                };
                let origin = push::DeltaOrigin {
                    volume_uuid: volume.uuid(),
                    granularity: volume.granularity(),
                    from,
                    to,
                };
                let bytes =
                    push::push_delta(snapshot, &origin, file, &shown, progress).map_err(failed)?;
                json!({"volume": snapshot.volume(), "target": target, "delta_bytes": bytes})
            }
        };
        reports.push(report);
    }
    Ok(Value::Array(reports))
}

/// What to quiesce around a snapshot.
#[derive(Debug, Default)]
pub struct QuiesceRequest {
    /// Host filesystems to FIFREEZE.
    pub mountpoints: Vec<PathBuf>,
    /// Hook directories; `None` means the default one if it exists
    /// (/usr/lib/tidemark/writers.d; the guest-side /etc/qemu/fsfreeze-hooks.d only when named).
    pub hooks: Option<Vec<PathBuf>>,
    /// A VM's qemu-guest-agent socket.
    pub guest_agent: Option<PathBuf>,
    /// Hard limit of the freeze-to-thaw window (default 10 s).
    pub timeout: Option<Duration>,
    /// Where tidemark itself writes during a backup (never frozen).
    pub protected: Vec<PathBuf>,
}

/// Quiesced state, or nothing to quiesce; thaw it exactly once (dropping thaws too).
pub struct Frozen(Option<quiesce::Quiesced>);

impl Frozen {
    /// Thaw; the report for the backup's status, and an error when the window limit
    /// passed before the thaw (the snapshot may then not be consistent).
    pub fn thaw(self) -> (Value, Option<String>) {
        let Some(quiesced) = self.0 else {
            return (Value::Null, None);
        };
        let summary = quiesced.summary();
        let report = quiesced.thaw();
        let mut value = json!({
            "summary": summary,
            "thaw": &report,
            "freeze_to_thaw_ms": report.freeze_to_thaw.as_secs_f64() * 1e3,
        });
        if !report.errors.is_empty() {
            value["errors"] = json!(report.errors);
        }
        let problem = report.thawed_by_watchdog.as_ref().map(|why| {
            format!(
                "the quiesce window limit passed before the snapshot was taken and the watchdog \
                 thawed ({why}); the snapshot may not be application-consistent, so it was \
                 dropped; raise --quiesce-timeout or fix the slow hook"
            )
        });
        (value, problem)
    }
}

/// Freeze what `request` names (hooks, guest agent, filesystems) under a hard time limit.
pub fn quiesce(request: &QuiesceRequest) -> Result<Frozen, CommandError> {
    let hooks_dirs = match &request.hooks {
        Some(dirs) => dirs.clone(),
        None => quiesce::default_hooks_dirs(),
    };
    if hooks_dirs.is_empty() && request.mountpoints.is_empty() && request.guest_agent.is_none() {
        return Ok(Frozen(None));
    }
    let mut spec = QuiesceSpec {
        hooks_dirs,
        mountpoints: request.mountpoints.clone(),
        guest_agent: request.guest_agent.clone(),
        protected_paths: request.protected.clone(),
        ..QuiesceSpec::default()
    };
    if let Some(limit) = request.timeout {
        spec.window_limit = limit;
    }
    match quiesce::quiesce(&spec) {
        Ok(quiesced) => Ok(Frozen(Some(quiesced))),
        Err(err) => {
            let class = match err {
                QuiesceError::RefuseRoot { .. }
                | QuiesceError::RefuseOwnState { .. }
                | QuiesceError::NotAMountpoint { .. } => ErrorClass::InvalidParameter,
                _ => ErrorClass::GenericError,
            };
            let mut desc = format!("backup not started: {}", crate::error_chain(&err));
            if let QuiesceError::Aborted { report, .. } = &err {
                if !report.log.is_empty() {
                    desc.push_str(&format!("; quiesce log: {}", report.log.join(" | ")));
                }
            }
            Err(CommandError::new(class, desc))
        }
    }
}
