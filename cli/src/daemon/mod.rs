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

pub mod args;
mod backup;
pub mod control_server;
mod engine;
mod lock;
mod push;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};

use crate::control::{CommandError, ErrorClass, Event, Request};
use args::{check_name, Arguments};
use backup::Backup;
use control_server::{ConnectionId, Handler};
use engine::{NbdServer, VolumeHandle};

/// How the daemon was asked to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// The state dir: volumes, checkpoints, COW stores, sockets, the daemon lock.
    pub state_dir: PathBuf,
    /// The NBD Unix socket.
    pub nbd_socket: PathBuf,
    /// The control Unix socket.
    pub control_socket: PathBuf,
    /// Also serve NBD over TCP on this address.
    pub listen: Option<SocketAddr>,
}

/// The file in the state dir that holds the number of the last backup id handed out
/// (decimal), so ids stay unique across daemon restarts and crashes.
const BACKUP_COUNTER: &str = "backup-counter";

/// The last backup number a daemon of `state_dir` used (0 when none ever did).
fn load_backup_counter(state_dir: &Path) -> anyhow::Result<u64> {
    let path = state_dir.join(BACKUP_COUNTER);
    match std::fs::read_to_string(&path) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(err) => Err(err).with_context(|| format!("reading {}", path.display())),
        Ok(text) => text.trim().parse::<u64>().map_err(|err| {
            anyhow::anyhow!(
                "{} holds {:?}, not a backup number ({err}); it is written atomically, so \
                 something else changed it: put back the highest backup-N number used so far \
                 (see the daemon's log) so backup ids stay unique",
                path.display(),
                text.chars().take(40).collect::<String>()
            )
        }),
    }
}

/// Backups that ended are remembered (for `backup-status`) up to this many.
const FINISHED_KEPT: usize = 32;

/// How often running backups are checked for failed snapshots.
const MONITOR_INTERVAL: Duration = Duration::from_millis(200);

/// The daemon's shared state.
pub struct Daemon {
    config: Config,
    nbd: NbdServer,
    events: broadcast::Sender<Event>,
    registry: Mutex<Registry>,
    /// The number of the last backup id handed out, as persisted in [`BACKUP_COUNTER`].
    backup_counter: Mutex<u64>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Registry {
    volumes: BTreeMap<String, Arc<VolumeHandle>>,
    /// Running backups by id.
    backups: BTreeMap<String, Backup>,
    /// Ended backups, newest last, as their final status.
    finished: VecDeque<Value>,
    /// Volumes a `backup-begin` in progress has claimed.
    reserved: BTreeSet<String>,
    stopping: bool,
}

fn not_found(desc: String) -> CommandError {
    CommandError::new(ErrorClass::NotFound, desc)
}

fn conflict(desc: String) -> CommandError {
    CommandError::new(ErrorClass::Conflict, desc)
}

fn failed(desc: String) -> CommandError {
    CommandError::new(ErrorClass::GenericError, desc)
}

/// Every command the daemon answers, for `query-commands`.
const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "query-status",
    "volume-create",
    "volume-list",
    "volume-info",
    "volume-remove",
    "checkpoint-create",
    "checkpoint-list",
    "checkpoint-delete",
    "backup-begin",
    "backup-end",
    "backup-status",
];

impl Daemon {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding the lock leaves bookkeeping that is still consistent
        // (every update is a single insert or remove), so keep serving.
        self.registry
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// A backup id never handed out before by a daemon of this state dir: the counter is
    /// persisted (atomically, fsynced) before the id is used, so neither a restart nor a
    /// crash can hand it out again.
    fn next_backup_id(&self) -> Result<String, CommandError> {
        let mut counter = self
            .backup_counter
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let next = *counter + 1;
        let path = self.config.state_dir.join(BACKUP_COUNTER);
        tidemark_formats::atomic_replace(&path, format!("{next}\n").as_bytes()).map_err(|err| {
            failed(format!(
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
    fn uris(&self, name: &str) -> Value {
        let mut uris = json!({
            "unix": format!("nbd+unix:///{name}?socket={}", self.config.nbd_socket.display())
        });
        if let Some(addr) = self.config.listen {
            uris["tcp"] = json!(format!("nbd://{addr}/{name}"));
        }
        uris
    }

    fn volume(&self, name: &str) -> Result<Arc<VolumeHandle>, CommandError> {
        self.registry().volumes.get(name).cloned().ok_or_else(|| {
            not_found(format!(
                "no volume named {name:?}; `tidemark volume list` shows the volumes, \
                 `tidemark volume create` adds one"
            ))
        })
    }

    fn volume_report(&self, volume: &VolumeHandle) -> Value {
        let name = volume.name();
        let registry = self.registry();
        let backup = registry
            .backups
            .values()
            .find(|b| b.volume_names().any(|v| v == name))
            .map(|b| json!(b.id()));
        let mut report = volume.status();
        report["export"] = json!(name);
        report["uri"] = self.uris(name);
        report["backup"] = backup.unwrap_or(Value::Null);
        report
    }

    fn dispatch(
        self: &Arc<Self>,
        conn: ConnectionId,
        request: &Request,
    ) -> Result<Value, CommandError> {
        let name = request.execute.as_str();
        let known: &[&str] = match name {
            "qmp_capabilities" | "query-version" | "query-commands" | "query-status"
            | "volume-list" | "backup-status" => &[],
            "volume-create" => &["name", "backing", "size", "granularity", "tracking"],
            "volume-info" => &["name"],
            "volume-remove" => &["name"],
            "checkpoint-create" | "checkpoint-delete" => &["volume", "name"],
            "checkpoint-list" => &["volume"],
            "backup-begin" => backup::BEGIN_ARGUMENTS,
            "backup-end" => &["volume", "id"],
            _ => {
                return Err(CommandError::new(
                    ErrorClass::CommandNotFound,
                    format!(
                        "unknown command {name:?}; `query-commands` lists them (docs/CONTROL.md)"
                    ),
                ))
            }
        };
        let args = Arguments::new(name, &request.arguments, known)?;
        if self.registry().stopping && name != "query-version" {
            return Err(failed(
                "the daemon is shutting down; retry once it runs again".into(),
            ));
        }
        match name {
            "qmp_capabilities" => Ok(json!({})),
            "query-version" => Ok(json!({
                "version": env!("CARGO_PKG_VERSION"),
                "protocol": crate::control::PROTOCOL_VERSION,
            })),
            "query-commands" => Ok(json!(COMMANDS)),
            "query-status" => Ok(self.query_status()),
            "volume-create" => self.volume_create(&args),
            "volume-list" => Ok(self.volume_list()),
            "volume-info" => {
                let volume = self.volume(&args.string("name")?)?;
                Ok(self.volume_report(&volume))
            }
            "volume-remove" => self.volume_remove(&args),
            "checkpoint-create" => {
                let volume = self.volume(&args.string("volume")?)?;
                let checkpoint = args.string("name")?;
                check_name("checkpoint", &checkpoint)?;
                volume.checkpoint_create(&checkpoint)
            }
            "checkpoint-list" => self.volume(&args.string("volume")?)?.checkpoint_list(),
            "checkpoint-delete" => {
                let volume = self.volume(&args.string("volume")?)?;
                let checkpoint = args.string("name")?;
                volume.checkpoint_delete(&checkpoint)?;
                Ok(json!({}))
            }
            "backup-begin" => backup::begin(self, conn, &args),
            "backup-end" => backup::end(self, &args),
            "backup-status" => Ok(backup::status(self)),
            _ => unreachable!("every known command is dispatched"),
        }
    }

    fn query_status(&self) -> Value {
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "state_dir": self.config.state_dir,
            "nbd_socket": self.config.nbd_socket,
            "control_socket": self.config.control_socket,
            "listen": self.config.listen.map(|a| a.to_string()),
            "volumes": self.volume_list(),
            "backups": backup::status(self),
        })
    }

    fn volume_list(&self) -> Value {
        let volumes: Vec<Arc<VolumeHandle>> = self.registry().volumes.values().cloned().collect();
        Value::Array(volumes.iter().map(|v| self.volume_report(v)).collect())
    }

    fn volume_create(&self, args: &Arguments<'_>) -> Result<Value, CommandError> {
        let name = args.string("name")?;
        check_name("volume", &name)?;
        let backing = PathBuf::from(args.string("backing")?);
        if !backing.is_absolute() {
            return Err(CommandError::new(
                ErrorClass::InvalidParameter,
                format!(
                    "volume-create: backing {} must be an absolute path (the daemon's working \
                     directory is not yours)",
                    backing.display()
                ),
            ));
        }
        let size = args.opt_u64("size")?;
        let granularity = args.opt_u64("granularity")?;
        let fast = match args.opt_string("tracking")?.as_deref() {
            None | Some("durable") => false,
            Some("fast") => true,
            Some(other) => {
                return Err(CommandError::new(
                    ErrorClass::InvalidParameter,
                    format!("volume-create: tracking {other:?} is not durable or fast"),
                ))
            }
        };
        if self.registry().volumes.contains_key(&name) {
            return Err(conflict(format!(
                "a volume named {name:?} exists already; pick another name or `tidemark volume \
                 remove {name}` first"
            )));
        }
        if let Ok(canonical) = backing.canonicalize() {
            let volumes: Vec<Arc<VolumeHandle>> =
                self.registry().volumes.values().cloned().collect();
            if let Some(other) = volumes.iter().find(|v| v.backing() == canonical) {
                return Err(conflict(format!(
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
                return Err(conflict(format!(
                    "a volume named {name:?} was just created"
                )));
            }
            registry.volumes.insert(name.clone(), Arc::clone(&volume));
        }
        if let Err(err) = self.nbd.add_export(&name, volume.live_export()) {
            tracing::error!(volume = %name, "exporting the new volume failed: {}", err.desc);
        }
        tracing::info!(volume = %name, backing = %backing.display(), "volume created");
        Ok(self.volume_report(&volume))
    }

    fn volume_remove(&self, args: &Arguments<'_>) -> Result<Value, CommandError> {
        let name = args.string("name")?;
        let volume = {
            let mut registry = self.registry();
            if let Some(backup) = registry
                .backups
                .values()
                .find(|b| b.volume_names().any(|v| v == name))
            {
                return Err(conflict(format!(
                    "volume {name:?} is in backup {}; `tidemark backup end {name}` first",
                    backup.id()
                )));
            }
            if registry.reserved.contains(&name) {
                return Err(conflict(format!(
                    "a backup of volume {name:?} is starting; end it before removing the volume"
                )));
            }
            registry.volumes.remove(&name).ok_or_else(|| {
                not_found(format!(
                    "no volume named {name:?}; `tidemark volume list` shows them"
                ))
            })?
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
                return Err(conflict(format!("volume {name:?} is busy; retry")));
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
    fn execute(&self, conn: ConnectionId, request: Request) -> Result<Value, CommandError> {
        self.0.dispatch(conn, &request)
    }

    fn disconnected(&self, conn: ConnectionId) {
        backup::connection_closed(&self.0, conn);
    }
}

/// Create `dir` (mode 0700) if missing.
fn prepare_state_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| {
                format!(
                    "creating the state dir {} (choose another with --state-dir)",
                    dir.display()
                )
            })?;
    }
    anyhow::ensure!(
        dir.is_dir(),
        "the state dir {} is not a directory; choose another with --state-dir",
        dir.display()
    );
    Ok(())
}

/// Remove a stale socket file left by a daemon that died; refuse if something listens.
fn clear_stale_socket(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("inspecting {}", path.display())),
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                anyhow::bail!(
                    "something already listens on {}; is another `tidemark serve` running?",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))
        }
        Ok(_) => anyhow::bail!(
            "{} exists and is not a socket; move it away or choose another path",
            path.display()
        ),
    }
}

fn restrict_socket(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} private (mode 0600)", path.display()))
}

/// Run the daemon until SIGTERM or SIGINT.
pub fn run(config: Config) -> anyhow::Result<()> {
    prepare_state_dir(&config.state_dir)?;
    let _lock = lock::DaemonLock::acquire(&config.state_dir)?;
    clear_stale_socket(&config.control_socket)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .thread_name("tidemark-serve")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_async(config))
}

async fn run_async(config: Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let volumes = {
        let state_dir = config.state_dir.clone();
        tokio::task::spawn_blocking(move || VolumeHandle::open_all(&state_dir))
            .await
            .context("opening the volumes")??
    };
    let backup_counter = load_backup_counter(&config.state_dir)?;
    let nbd = NbdServer::new();
    let mut registry = Registry::default();
    for volume in volumes {
        nbd.add_export(volume.name(), volume.live_export())
            .map_err(|err| anyhow::anyhow!(err.desc))?;
        tracing::info!(volume = volume.name(), "volume opened");
        registry
            .volumes
            .insert(volume.name().to_string(), Arc::new(volume));
    }
    let (events, _) = broadcast::channel(1024);
    let daemon = Arc::new(Daemon {
        config: config.clone(),
        nbd,
        events,
        registry: Mutex::new(registry),
        backup_counter: Mutex::new(backup_counter),
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    let nbd_task = daemon.nbd.serve(&config.nbd_socket, config.listen).await?;

    let control = tokio::net::UnixListener::bind(&config.control_socket)
        .with_context(|| format!("listening on {}", config.control_socket.display()))?;
    restrict_socket(&config.control_socket)?;
    let handler: Arc<dyn Handler> = Arc::new(DaemonHandler(Arc::clone(&daemon)));
    let control_task = tokio::spawn(control_server::serve(
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
                        let _ = tokio::task::spawn_blocking(move || backup::monitor(&daemon)).await;
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
            .map(|a| format!(" and {a}"))
            .unwrap_or_default(),
        config.control_socket.display()
    );
    tracing::info!("ready");

    let signal_name = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    tracing::info!("{signal_name}: shutting down");
    daemon.emit("SHUTDOWN", json!({"signal": signal_name}));
    // Fail running backups while the control connections are still open, so their
    // clients hear BACKUP_FAILED; then give the event forwarders a moment to pass it on.
    {
        let daemon = Arc::clone(&daemon);
        tokio::task::spawn_blocking(move || daemon.fail_all_backups())
            .await
            .context("shutting down")?;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = stop_tx.send(true);
    let _ = control_task.await;
    let _ = monitor.await;
    nbd_task.stop().await;
    {
        let daemon = Arc::clone(&daemon);
        tokio::task::spawn_blocking(move || daemon.close_volumes())
            .await
            .context("shutting down")?;
    }
    for path in [&config.control_socket, &config.nbd_socket] {
        let _ = std::fs::remove_file(path);
    }
    eprintln!("tidemark serve: stopped cleanly");
    Ok(())
}
