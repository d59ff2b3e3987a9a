//! `tidemark serve`: the daemon that owns the volumes of one state dir.
//!
//! It serves every volume's live disk over NBD (`<state-dir>/nbd.sock`, and TCP when
//! asked), answers the control socket (`<state-dir>/control.sock`, docs/CONTROL.md), and
//! runs backup jobs: a group snapshot of one or more volumes, exported read-only over NBD
//! until `backup-end` (pull) or copied to a target by a worker thread (push).
//!
//! Concurrency: the registry of volumes and backups sits behind one mutex; commands run
//! on blocking threads and hold it only for bookkeeping. Long work (a push copy, the NBD
//! traffic) never holds it. A backup problem (COW store full, a lease holder gone, a
//! failed copy) fails that backup and drops its snapshot; the live volume keeps serving.
//!
//! Shutdown (SIGTERM, SIGINT): stop accepting control connections, fail running backups
//! (dropping their snapshots), stop the NBD server, close every volume cleanly (its
//! bitmaps marked clean), remove the sockets.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use tidemark_engine::status::VolumeStatus;
use tidemark_engine::volume::VolumeError;
use tidemark_nbd::server::ServerError;
use tokio::sync::{broadcast, watch};

use crate::attachments::Attachments;
use crate::backup::{self, Backup};
use crate::config::Config;
use crate::lock::DaemonLock;
use crate::protocol::{
    BackupEndArgs, CheckpointArgs, Command, CommandError, Event, Returned, Tracking,
    VolumeCreateArgs, PROTOCOL_VERSION,
};
use crate::server::{self, ConnectionId, Handler};
use crate::volumes::{NbdServer, VolumeHandle};

/// Why the daemon could not start (or stop cleanly).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// An I/O step of starting or stopping failed; `what` says which.
    #[error("{what}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// The state dir exists and is not a directory.
    #[error("the state dir {} is not a directory; choose another with --state-dir", .0.display())]
    NotADirectory(PathBuf),
    /// Another daemon owns the state dir.
    #[error(
        "another `tidemark serve` ({holder}) owns the state dir {}; stop it first or pass \
         another --state-dir",
        state_dir.display()
    )]
    Locked {
        /// "pid N" as the lock file records it.
        holder: String,
        /// The state dir.
        state_dir: PathBuf,
    },
    /// Something listens on a socket path already.
    #[error("something already listens on {}; is another `tidemark serve` running?", .0.display())]
    SocketInUse(PathBuf),
    /// A socket path holds another kind of file.
    #[error("{} exists and is not a socket; move it away or choose another path", .0.display())]
    NotASocket(PathBuf),
    /// The state dir belongs to someone else or others may write to it.
    #[error("refusing the state dir {}: {reason}", dir.display())]
    UnsafeStateDir {
        /// The state dir.
        dir: PathBuf,
        /// What is wrong and the command that fixes it.
        reason: String,
    },
    /// The volumes of the state dir cannot be listed.
    #[error("listing the volumes of {}", state_dir.display())]
    ListVolumes {
        /// The state dir.
        state_dir: PathBuf,
        /// Why listing failed (boxed: the engine's error is large).
        #[source]
        source: Box<VolumeError>,
    },
    /// The backup counter file holds something else than a number.
    #[error(
        "{} holds {text:?}, not a backup number; it is written atomically, so something else \
         changed it: put back the highest backup-N number used so far (see the daemon's log) \
         so backup ids stay unique",
        path.display()
    )]
    BackupCounter {
        /// The counter file.
        path: PathBuf,
        /// Its first characters.
        text: String,
        /// Why it is not a number.
        #[source]
        source: std::num::ParseIntError,
    },
    /// A volume could not be exported at start.
    #[error("exporting volume {name:?}")]
    Export {
        /// The volume.
        name: String,
        /// Why the NBD server refused it.
        #[source]
        source: CommandError,
    },
    /// The NBD server could not listen.
    #[error("starting the NBD server")]
    Nbd(#[source] ServerError),
    /// NBD's TLS settings are missing or unusable.
    #[error("setting up NBD over TLS")]
    Tls(#[source] crate::config::TlsConfigError),
    /// A blocking step of starting or stopping panicked.
    #[error("{what}")]
    Task {
        /// What was being done.
        what: &'static str,
        /// The task's failure.
        #[source]
        source: tokio::task::JoinError,
    },
}

/// `map_err` for an I/O step: `what` names it.
fn io_step(what: impl Into<String>) -> impl FnOnce(io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

/// The file in the state dir that holds the number of the last backup id handed out
/// (decimal), so ids stay unique across daemon restarts and crashes.
const BACKUP_COUNTER: &str = "backup-counter";

/// The last backup number a daemon of `state_dir` used (0 when none ever did).
fn load_backup_counter(state_dir: &Path) -> Result<u64, DaemonError> {
    let path = state_dir.join(BACKUP_COUNTER);
    match std::fs::read_to_string(&path) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(err) => Err(io_step(format!("reading {}", path.display()))(err)),
        Ok(text) => text
            .trim()
            .parse::<u64>()
            .map_err(|source| DaemonError::BackupCounter {
                text: text.chars().take(40).collect(),
                path,
                source,
            }),
    }
}

/// Backups that ended are remembered (for `backup-status`) up to this many.
pub(crate) const FINISHED_KEPT: usize = 32;

/// How often running backups are checked for failed snapshots.
const MONITOR_INTERVAL: Duration = Duration::from_millis(200);

/// The daemon's shared state: the volumes of one state dir, their exports, the backups.
/// [`run`] serves it on sockets; tests drive it in process through [`Daemon::execute`].
pub struct Daemon {
    pub(crate) config: Config,
    pub(crate) nbd: NbdServer,
    events: broadcast::Sender<Event>,
    registry: Mutex<Registry>,
    /// The number of the last backup id handed out, as persisted in [`BACKUP_COUNTER`].
    backup_counter: Mutex<u64>,
    /// Block devices of volumes and snapshots (`volume-attach`).
    pub(crate) attachments: Attachments,
    /// Volumes a `volume-rollback` is writing back.
    pub(crate) rollbacks: crate::rollback::Rollbacks,
    /// Held for the daemon's life: one daemon per state dir.
    _lock: DaemonLock,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
pub(crate) struct Registry {
    pub(crate) volumes: BTreeMap<String, Arc<VolumeHandle>>,
    /// Running backups by id.
    pub(crate) backups: BTreeMap<String, Backup>,
    /// Ended backups, newest last, as their final status.
    pub(crate) finished: VecDeque<Value>,
    /// Volumes a `backup-begin` in progress has claimed.
    pub(crate) reserved: BTreeSet<String>,
    stopping: bool,
}

impl Daemon {
    /// Take the state dir's lock, open its volumes and export each on a new NBD server
    /// (which listens only once [`run`] serves it). The state dir must exist.
    pub fn open(config: Config) -> Result<Arc<Daemon>, DaemonError> {
        let lock = DaemonLock::acquire(&config.state_dir)?;
        let volumes = VolumeHandle::open_all(&config.state_dir)?;
        let backup_counter = load_backup_counter(&config.state_dir)?;
        let nbd = NbdServer::new(tidemark_nbd::server::ServerConfig {
            max_connections: config.max_connections,
            idle_timeout: config.idle_timeout,
            ..Default::default()
        });
        let mut registry = Registry::default();
        for volume in volumes {
            let name = volume.name().to_string();
            nbd.add_export(&name, volume.live_export())
                .map_err(|source| DaemonError::Export {
                    name: name.clone(),
                    source,
                })?;
            tracing::info!(volume = %name, "volume opened");
            registry.volumes.insert(name, Arc::new(volume));
        }
        let (events, _) = broadcast::channel(1024);
        let attachments = Attachments::new(&config.state_dir);
        let daemon = Arc::new(Daemon {
            config,
            nbd,
            events,
            registry: Mutex::new(registry),
            backup_counter: Mutex::new(backup_counter),
            attachments,
            rollbacks: crate::rollback::Rollbacks::default(),
            _lock: lock,
        });
        daemon.attachments.recover(&daemon);
        Ok(daemon)
    }

    /// Every event from now on (what control connections are sent).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    pub(crate) fn registry(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding the lock leaves bookkeeping that is still consistent
        // (every update is a single insert or remove), so keep serving.
        self.registry
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// A backup id never handed out before by a daemon of this state dir: the counter is
    /// persisted (atomically, fsynced) before the id is used, so neither a restart nor a
    /// crash can hand it out again.
    pub(crate) fn next_backup_id(&self) -> Result<String, CommandError> {
        let mut counter = self
            .backup_counter
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let next = *counter + 1;
        let path = self.config.state_dir.join(BACKUP_COUNTER);
        tidemark_formats::atomic_replace(&path, format!("{next}\n").as_bytes()).map_err(|err| {
            CommandError::failed(format!(
                "backup not started: recording its id in {} failed: {err}; check that the \
                 state dir is writable and not full",
                path.display()
            ))
        })?;
        *counter = next;
        Ok(format!("backup-{next}"))
    }

    /// Emit an event to every control connection and to the log.
    pub(crate) fn emit(&self, name: &str, data: Value) {
        tracing::info!(event = name, "{data}");
        let _ = self.events.send(Event::new(name, data));
    }

    /// The NBD URI of export `name` on the Unix socket (and TCP when listening).
    pub(crate) fn uris(&self, name: &str) -> Value {
        serde_json::to_value(self.export_uris(name)).unwrap_or(Value::Null)
    }

    fn export_uris(&self, name: &str) -> ExportUris {
        ExportUris {
            unix: format!(
                "nbd+unix:///{name}?socket={}",
                self.config.nbd_socket.display()
            ),
            tcp: self.config.listen.map(|addr| {
                let scheme = if self.config.tls.is_some() {
                    "nbds"
                } else {
                    "nbd"
                };
                format!("{scheme}://{addr}/{name}")
            }),
        }
    }

    pub(crate) fn volume(&self, name: &str) -> Result<Arc<VolumeHandle>, CommandError> {
        self.registry().volumes.get(name).cloned().ok_or_else(|| {
            if let Some(busy) = crate::rollback::unavailable(self, name) {
                return busy;
            }
            CommandError::not_found(format!(
                "no volume named {name:?}; `tidemark volume list` shows the volumes, \
                 `tidemark volume create` adds one"
            ))
        })
    }

    /// How volume `volume` is reported; `backup` is the running backup holding it.
    fn volume_report(&self, volume: &VolumeHandle, backup: Option<String>) -> VolumeReport {
        let name = volume.name();
        VolumeReport {
            status: volume.status(),
            export: name.to_string(),
            uri: self.export_uris(name),
            backup,
            attachment: self.attachments.report(name),
        }
    }

    /// Every volume (and every volume left unregistered by a rollback), sorted by name:
    /// the registry is locked once for all of them, and nothing builds a JSON tree.
    fn volume_reports(&self) -> Vec<ListedVolume> {
        let (volumes, backups) = {
            let registry = self.registry();
            let volumes: Vec<Arc<VolumeHandle>> = registry.volumes.values().cloned().collect();
            let mut backups: BTreeMap<String, String> = BTreeMap::new();
            for backup in registry.backups.values() {
                for volume in backup.volume_names() {
                    backups
                        .entry(volume.to_string())
                        .or_insert_with(|| backup.id().to_string());
                }
            }
            (volumes, backups)
        };
        let registered = volumes.iter().map(|v| v.name().to_string()).collect();
        let mut list: Vec<ListedVolume> = volumes
            .iter()
            .map(|v| {
                let backup = backups.get(v.name()).cloned();
                ListedVolume::Open(Box::new(self.volume_report(v, backup)))
            })
            .collect();
        list.extend(
            crate::rollback::list_unregistered(self, &registered)
                .into_iter()
                .map(ListedVolume::Unregistered),
        );
        list.sort_by(|a, b| a.name().cmp(b.name()));
        list
    }

    /// Run `command` for control connection `conn` (leases are tied to it). Blocking:
    /// commands touch disks.
    pub fn execute(
        self: &Arc<Self>,
        conn: ConnectionId,
        command: Command,
    ) -> Result<Value, CommandError> {
        if self.registry().stopping && !matches!(command, Command::QueryVersion(_)) {
            return Err(CommandError::failed(
                "the daemon is shutting down; retry once it runs again",
            ));
        }
        match command {
            Command::QmpCapabilities(_) => Ok(json!({})),
            Command::QueryVersion(_) => Ok(json!({
                "version": env!("CARGO_PKG_VERSION"),
                "protocol": PROTOCOL_VERSION,
            })),
            Command::QueryCommands(_) => Ok(json!(Command::NAMES)),
            Command::QueryStatus(_) => Ok(self.query_status()),
            Command::VolumeCreate(args) => self.volume_create(args),
            Command::VolumeList(_) => Ok(self.volume_list()),
            Command::VolumeInfo(args) => {
                let volume = self.volume(&args.name)?;
                let backup = self
                    .registry()
                    .backups
                    .values()
                    .find(|b| b.volume_names().any(|v| v == args.name))
                    .map(|b| b.id().to_string());
                Ok(to_value(&self.volume_report(&volume, backup)))
            }
            Command::VolumeRemove(args) => self.volume_remove(args.name),
            Command::CheckpointCreate(CheckpointArgs { volume, name }) => {
                let volume = self.volume(&volume)?;
                check_name("checkpoint", &name)?;
                volume.checkpoint_create(&name)
            }
            Command::CheckpointList(args) => self.volume(&args.volume)?.checkpoint_list(),
            Command::CheckpointDelete(CheckpointArgs { volume, name }) => {
                self.volume(&volume)?.checkpoint_delete(&name)?;
                Ok(json!({}))
            }
            Command::BackupBegin(args) => backup::begin(self, conn, args),
            Command::BackupEnd(BackupEndArgs { volume, id, failed }) => {
                backup::end(self, volume, id, failed)
            }
            Command::BackupStatus(_) => Ok(backup::status(self)),
            Command::VolumeAttach(args) => self.attachments.attach(self, args),
            Command::VolumeDetach(args) => self.attachments.detach(&args.name),
            Command::VolumeRollback(args) => crate::rollback::rollback(self, args),
        }
    }

    /// Control connection `conn` closed: fail the backups it held a lease on.
    pub fn connection_closed(&self, conn: ConnectionId) {
        backup::connection_closed(self, conn);
    }

    /// Fail running backups whose snapshots failed (the daemon does this every 200 ms).
    pub fn check_backups(&self) {
        backup::monitor(self);
    }

    /// Run `command` as [`Daemon::execute`] does, for the control socket: the reports
    /// that grow with the number of volumes (`query-status`, `volume-list`) come back as
    /// JSON text serialized straight from typed data, not as a `Value` tree per volume.
    pub fn execute_returned(
        self: &Arc<Self>,
        conn: ConnectionId,
        command: Command,
    ) -> Result<Returned, CommandError> {
        if !self.registry().stopping {
            let text = match &command {
                Command::QueryStatus(_) => Some(serde_json::to_string(&self.status_report())),
                Command::VolumeList(_) => Some(serde_json::to_string(&self.volume_reports())),
                _ => None,
            };
            if let Some(text) = text {
                return text.map(Returned::Json).map_err(|err| {
                    CommandError::failed(format!("encoding the report failed: {err}"))
                });
            }
        }
        self.execute(conn, command).map(Returned::Value)
    }

    fn status_report(&self) -> StatusReport<'_> {
        StatusReport {
            version: env!("CARGO_PKG_VERSION"),
            pid: std::process::id(),
            state_dir: &self.config.state_dir,
            nbd_socket: &self.config.nbd_socket,
            control_socket: &self.config.control_socket,
            listen: self.config.listen.map(|a| a.to_string()),
            tls: self.config.tls.is_some(),
            listen_insecure: self.config.listen.is_some() && self.config.tls.is_none(),
            volumes: self.volume_reports(),
            backups: backup::status(self),
            attachments: self.attachments.list(),
        }
    }

    fn query_status(&self) -> Value {
        to_value(&self.status_report())
    }

    fn volume_list(&self) -> Value {
        to_value(&self.volume_reports())
    }

    fn volume_create(&self, args: VolumeCreateArgs) -> Result<Value, CommandError> {
        let VolumeCreateArgs {
            name,
            backing,
            size,
            granularity,
            tracking,
        } = args;
        check_name("volume", &name)?;
        if !backing.is_absolute() {
            return Err(CommandError::invalid(format!(
                "volume-create: backing {} must be an absolute path (the daemon's working \
                 directory is not yours)",
                backing.display()
            )));
        }
        let fast = tracking == Some(Tracking::Fast);
        if self.registry().volumes.contains_key(&name) {
            return Err(CommandError::conflict(format!(
                "a volume named {name:?} exists already; pick another name or `tidemark volume \
                 remove {name}` first"
            )));
        }
        self.check_export_name_free(&name)?;
        if let Ok(canonical) = backing.canonicalize() {
            let volumes: Vec<Arc<VolumeHandle>> =
                self.registry().volumes.values().cloned().collect();
            if let Some(other) = volumes.iter().find(|v| v.backing() == canonical) {
                return Err(CommandError::conflict(format!(
                    "{} is already the backing of volume {:?}; two volumes on one disk would \
                     corrupt each other",
                    backing.display(),
                    other.name()
                )));
            }
        }
        let volume = Arc::new(VolumeHandle::create(
            &self.config.state_dir,
            &name,
            &backing,
            size,
            granularity,
            fast,
        )?);
        {
            let mut registry = self.registry();
            if registry.volumes.contains_key(&name) {
                // The engine's per-volume directory makes a second create of one name
                // fail, so this cannot happen; stay safe anyway.
                return Err(CommandError::conflict(format!(
                    "a volume named {name:?} was just created"
                )));
            }
            registry.volumes.insert(name.clone(), Arc::clone(&volume));
        }
        if let Err(err) = self.nbd.add_export(&name, volume.live_export()) {
            // Taken meanwhile (a backup began with this export name): undo the create
            // rather than leave a volume that another export answers for.
            drop(volume);
            let undo = self.registry().volumes.remove(&name);
            if let Some(Ok(volume)) = undo.map(Arc::try_unwrap) {
                if let Err((_, undo_err)) = volume.remove() {
                    tracing::error!(volume = %name, "undoing the create failed: {}", undo_err.desc);
                }
            }
            self.check_export_name_free(&name)?;
            return Err(CommandError::conflict(format!(
                "volume {name:?} cannot be exported: {}; it was not created",
                err.desc
            )));
        }
        tracing::info!(volume = %name, backing = %backing.display(), "volume created");
        Ok(to_value(&self.volume_report(&volume, None)))
    }

    /// Refuse `name` for a new volume when a backup exports a snapshot under it (export
    /// names are unique across volumes and backups).
    fn check_export_name_free(&self, name: &str) -> Result<(), CommandError> {
        let registry = self.registry();
        if let Some(backup) = registry
            .backups
            .values()
            .find(|b| b.export_names().any(|e| e == name))
        {
            return Err(CommandError::conflict(format!(
                "the name {name:?} is the export of backup {} (volume {}); export names are \
                 unique across volumes and backups: pick another volume name or end that backup",
                backup.id(),
                backup.volume_names().collect::<Vec<_>>().join(", ")
            )));
        }
        drop(registry);
        if self.nbd.has_export(name) {
            return Err(CommandError::conflict(format!(
                "an export named {name:?} exists already; export names are unique across \
                 volumes and backups: pick another volume name"
            )));
        }
        Ok(())
    }

    fn volume_remove(&self, name: String) -> Result<Value, CommandError> {
        self.attachments
            .unless_attached(&name, || self.volume_remove_unattached(name.clone()))
    }

    fn volume_remove_unattached(&self, name: String) -> Result<Value, CommandError> {
        let volume = {
            let mut registry = self.registry();
            if let Some(backup) = registry
                .backups
                .values()
                .find(|b| b.volume_names().any(|v| v == name))
            {
                return Err(CommandError::conflict(format!(
                    "volume {name:?} is in backup {}; `tidemark backup end {name}` first",
                    backup.id()
                )));
            }
            if registry.reserved.contains(&name) {
                return Err(CommandError::conflict(format!(
                    "a backup of volume {name:?} is starting; end it before removing the volume"
                )));
            }
            match registry.volumes.remove(&name) {
                Some(volume) => volume,
                None => {
                    drop(registry);
                    return crate::rollback::remove_unregistered(self, &name).unwrap_or_else(
                        || {
                            Err(CommandError::not_found(format!(
                                "no volume named {name:?}; `tidemark volume list` shows them"
                            )))
                        },
                    );
                }
            }
        };
        self.nbd.remove_export(&name);
        let backing = volume.backing().to_path_buf();
        match Arc::try_unwrap(volume) {
            Ok(volume) => {
                if let Err((back, err)) = volume.remove() {
                    if let Some(back) = back {
                        self.put_back(back);
                    }
                    return Err(err);
                }
            }
            Err(volume) => {
                // A status query holds it for a moment; put it back so the registry and
                // the disk never disagree.
                self.put_back_shared(volume);
                return Err(CommandError::conflict(format!(
                    "volume {name:?} is busy; retry"
                )));
            }
        }
        tracing::info!(volume = %name, "volume removed");
        Ok(json!({"name": name, "backing": backing, "backing_kept": true}))
    }

    fn put_back(&self, volume: VolumeHandle) {
        self.put_back_shared(Arc::new(volume));
    }

    fn put_back_shared(&self, volume: Arc<VolumeHandle>) {
        let name = volume.name().to_string();
        if let Err(err) = self.nbd.add_export(&name, volume.live_export()) {
            tracing::error!(volume = %name, "re-exporting failed: {}", err.desc);
        }
        self.registry().volumes.insert(name, volume);
    }

    /// Fail running backups (dropping their snapshots and exports).
    fn fail_all_backups(&self) {
        let ids: Vec<String> = {
            let mut registry = self.registry();
            registry.stopping = true;
            registry.backups.keys().cloned().collect()
        };
        for id in ids {
            backup::fail(self, &id, "the daemon is shutting down");
        }
    }

    /// Close every volume cleanly (after the NBD server stopped).
    fn close_volumes(&self) {
        let volumes: Vec<(String, Arc<VolumeHandle>)> =
            std::mem::take(&mut self.registry().volumes)
                .into_iter()
                .collect();
        for (name, volume) in volumes {
            self.nbd.remove_export(&name);
            let volume = match Arc::try_unwrap(volume) {
                Ok(volume) => volume,
                Err(_) => {
                    tracing::warn!(volume = %name, "still in use; it closes when released");
                    continue;
                }
            };
            match volume.close() {
                Ok(()) => tracing::info!(volume = %name, "closed cleanly"),
                Err(err) => tracing::error!(volume = %name, "closing failed: {}", err.desc),
            }
        }
    }
}

/// The control server's view of the daemon.
struct DaemonHandler(Arc<Daemon>);

impl Handler for DaemonHandler {
    fn execute(&self, conn: ConnectionId, command: Command) -> Result<Returned, CommandError> {
        self.0.execute_returned(conn, command)
    }

    fn disconnected(&self, conn: ConnectionId) {
        self.0.connection_closed(conn);
    }
}

/// A report as JSON; the typed reports here hold nothing that fails to serialize.
fn to_value<T: Serialize>(report: &T) -> Value {
    serde_json::to_value(report).unwrap_or_else(|err| json!({"error": err.to_string()}))
}

/// Where an export is served.
#[derive(Debug, Serialize)]
struct ExportUris {
    unix: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    tcp: Option<String>,
}

/// One volume as `volume-info`, `volume-list` and `query-status` report it: the engine's
/// status and where and how the volume is served.
#[derive(Debug, Serialize)]
struct VolumeReport {
    #[serde(flatten)]
    status: VolumeStatus,
    export: String,
    uri: ExportUris,
    /// The running backup holding the volume.
    backup: Option<String>,
    attachment: Option<Value>,
}

/// An entry of the volume list: an open volume, or one a rollback holds unregistered.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum ListedVolume {
    Open(Box<VolumeReport>),
    Unregistered(Value),
}

impl ListedVolume {
    fn name(&self) -> &str {
        match self {
            ListedVolume::Open(report) => &report.status.name,
            ListedVolume::Unregistered(value) => value["name"].as_str().unwrap_or_default(),
        }
    }
}

/// Everything `tidemark info --json` prints (`query-status`).
#[derive(Debug, Serialize)]
struct StatusReport<'a> {
    version: &'static str,
    pid: u32,
    state_dir: &'a Path,
    nbd_socket: &'a Path,
    control_socket: &'a Path,
    listen: Option<String>,
    tls: bool,
    listen_insecure: bool,
    volumes: Vec<ListedVolume>,
    backups: Value,
    attachments: Value,
}

/// Check a user-chosen name (volume, checkpoint, export): it ends up in file names, NBD
/// export names and URIs, so it is kept to a portable alphabet.
pub(crate) fn check_name(what: &str, name: &str) -> Result<(), CommandError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(CommandError::invalid(format!(
            "invalid {what} name {name:?}: use 1-128 characters from A-Z a-z 0-9 - _ . \
             (not starting with . or -)"
        )))
    }
}

/// Create `dir` (mode 0700) if missing.
fn prepare_state_dir(dir: &Path) -> Result<(), DaemonError> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_step(format!(
                "creating the state dir {} (choose another with --state-dir)",
                dir.display()
            )))?;
    }
    if !dir.is_dir() {
        return Err(DaemonError::NotADirectory(dir.to_path_buf()));
    }
    let meta = std::fs::metadata(dir).map_err(io_step(format!(
        "inspecting the state dir {}",
        dir.display()
    )))?;
    check_state_dir(dir, &meta, rustix::process::geteuid().as_raw())
}

/// The state dir holds volumes' tracking, COW stores and the sockets: it must belong to
/// the daemon's user and be writable by nobody else (read access is only warned about).
fn check_state_dir(dir: &Path, meta: &std::fs::Metadata, euid: u32) -> Result<(), DaemonError> {
    use std::os::unix::fs::MetadataExt;
    let unsafe_dir = |reason: String| DaemonError::UnsafeStateDir {
        dir: dir.to_path_buf(),
        reason,
    };
    if meta.uid() != euid {
        return Err(unsafe_dir(format!(
            "it is owned by uid {}, not by the daemon's user (uid {euid}): run `chown {euid} \
             {}` or choose another --state-dir",
            meta.uid(),
            dir.display()
        )));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(unsafe_dir(format!(
            "its mode {mode:04o} lets group or others write to it: run `chmod go-w {}` \
             (or `chmod 700`)",
            dir.display()
        )));
    }
    if mode & 0o044 != 0 {
        tracing::warn!(
            "the state dir {} has mode {mode:04o}: group or others can read its volumes' \
             tracking and COW stores; run `chmod 700 {}`",
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}

/// Remove a stale socket file left by a daemon that died; refuse if something listens.
fn clear_stale_socket(path: &Path) -> Result<(), DaemonError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(io_step(format!("inspecting {}", path.display()))(err)),
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(DaemonError::SocketInUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(io_step(format!(
                "removing the stale socket {}",
                path.display()
            )))
        }
        Ok(_) => Err(DaemonError::NotASocket(path.to_path_buf())),
    }
}

/// Run the daemon until SIGTERM or SIGINT.
pub fn run(config: Config) -> Result<(), DaemonError> {
    // Everything the daemon creates (state files, COW stores, pushed images and deltas,
    // sockets) is for its user only, whatever umask it was started under.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    // A descriptor per volume: thousands of volumes need more than the usual 1024.
    match tidemark_engine::sys::raise_open_file_limit() {
        Ok((before, after)) if after > before => {
            tracing::info!(before, after, "raised the open-file limit")
        }
        Ok(_) => {}
        Err(err) => tracing::warn!(%err, "could not raise the open-file limit"),
    }
    let tls = config.nbd_tls().map_err(DaemonError::Tls)?;
    prepare_state_dir(&config.state_dir)?;
    let daemon = Daemon::open(config)?;
    if let Some(tls) = tls {
        daemon.nbd.set_tls(tls);
    }
    clear_stale_socket(&daemon.config.control_socket)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .thread_name("tidemark-serve")
        .enable_all()
        .build()
        .map_err(io_step("starting the async runtime"))?;
    runtime.block_on(run_async(daemon))
}

async fn run_async(daemon: Arc<Daemon>) -> Result<(), DaemonError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(io_step("installing the SIGTERM handler"))?;
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(io_step("installing the SIGINT handler"))?;
    let config = daemon.config.clone();

    let (stop_tx, stop_rx) = watch::channel(false);
    let nbd_task = daemon
        .nbd
        .serve(&config.nbd_socket, config.listen)
        .await
        .map_err(DaemonError::Nbd)?;

    let metrics = match &config.metrics {
        Some(addr) => Some(
            crate::metrics::serve(Arc::clone(&daemon), addr, stop_rx.clone())
                .await
                .map_err(io_step(format!("serving metrics on {addr}")))?,
        ),
        None => None,
    };

    let control = tidemark_nbd::server::bind_private(&config.control_socket)
        .and_then(|listener| {
            listener.set_nonblocking(true)?;
            tokio::net::UnixListener::from_std(listener)
        })
        .map_err(io_step(format!(
            "listening on {}",
            config.control_socket.display()
        )))?;
    let handler: Arc<dyn Handler> = Arc::new(DaemonHandler(Arc::clone(&daemon)));
    let control_task = tokio::spawn(server::serve(
        control,
        handler,
        daemon.events.clone(),
        stop_rx.clone(),
    ));

    let monitor = {
        let daemon = Arc::clone(&daemon);
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(MONITOR_INTERVAL);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let daemon = Arc::clone(&daemon);
                        let _ = tokio::task::spawn_blocking(move || daemon.check_backups()).await;
                    }
                    _ = stop.changed() => break,
                }
            }
        })
    };

    eprintln!(
        "tidemark serve: state dir {}, NBD on {}{}, control on {}",
        config.state_dir.display(),
        config.nbd_socket.display(),
        config
            .listen
            .map(|a| if config.tls.is_some() {
                format!(" and {a} (TLS)")
            } else {
                format!(" and {a} (plain TCP without TLS: --listen-insecure)")
            })
            .unwrap_or_default(),
        config.control_socket.display()
    );
    if let Some(addr) = &config.metrics {
        eprintln!("tidemark serve: metrics on {addr}");
    }
    if config.listen.is_some() && config.tls.is_none() {
        tracing::warn!(
            "NBD over TCP without TLS (--listen-insecure): anyone who reaches the port can \
             read and write every volume"
        );
    }
    tracing::info!("ready");

    let signal_name = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    tracing::info!("{signal_name}: shutting down");
    daemon.emit("SHUTDOWN", json!({"signal": signal_name}));
    // Detach block devices first: a snapshot's goes before its backup fails.
    {
        let daemon = Arc::clone(&daemon);
        tokio::task::spawn_blocking(move || daemon.attachments.shutdown())
            .await
            .map_err(|source| DaemonError::Task {
                what: "detaching block devices",
                source,
            })?;
    }
    // Fail running backups while the control connections are still open, so their
    // clients hear BACKUP_FAILED; then give the event forwarders a moment to pass it on.
    {
        let daemon = Arc::clone(&daemon);
        tokio::task::spawn_blocking(move || daemon.fail_all_backups())
            .await
            .map_err(|source| DaemonError::Task {
                what: "shutting down",
                source,
            })?;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = stop_tx.send(true);
    let _ = control_task.await;
    let _ = monitor.await;
    if let Some(metrics) = metrics {
        metrics.stopped().await;
    }
    nbd_task.stop().await;
    {
        let daemon = Arc::clone(&daemon);
        tokio::task::spawn_blocking(move || daemon.close_volumes())
            .await
            .map_err(|source| DaemonError::Task {
                what: "shutting down",
                source,
            })?;
    }
    for path in [&config.control_socket, &config.nbd_socket] {
        let _ = std::fs::remove_file(path);
    }
    eprintln!("tidemark serve: stopped cleanly");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_portable() {
        for good in ["vm1", "db_data", "a.b-c", "X"] {
            assert!(check_name("volume", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".hidden",
            "-x",
            "a/b",
            "a b",
            "a@b",
            "é",
            &"x".repeat(129),
        ] {
            assert!(check_name("volume", bad).is_err(), "{bad}");
        }
    }
}
