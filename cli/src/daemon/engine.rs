//! The daemon's view of the engine, the NBD server and quiescing: the one place that
//! calls into `tidemark_engine` and `tidemark_nbd`, so the daemon's logic reads in its
//! own words and engine errors become control-protocol errors.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tidemark_nbd::export::Export;
use tokio::sync::watch;

use super::backup::Progress;
use crate::control::{CommandError, ErrorClass};

fn unavailable(what: &str) -> CommandError {
    CommandError::new(
        ErrorClass::GenericError,
        format!("{what}: the engine is not integrated yet"),
    )
}

/// A volume the daemon owns.
pub struct VolumeHandle {
    name: String,
    backing: PathBuf,
}

impl VolumeHandle {
    pub fn create(
        _state_dir: &Path,
        _name: &str,
        _backing: &Path,
        _size: Option<u64>,
        _granularity: Option<u64>,
    ) -> Result<VolumeHandle, CommandError> {
        Err(unavailable("volume-create"))
    }

    pub fn open_all(_state_dir: &Path) -> anyhow::Result<Vec<VolumeHandle>> {
        Ok(Vec::new())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn backing(&self) -> &Path {
        &self.backing
    }

    pub fn status(&self) -> Value {
        json!({"name": self.name})
    }

    pub fn live_export(&self) -> Arc<dyn Export> {
        unreachable!("no volume exists before the engine is integrated")
    }

    pub fn checkpoint_create(&self, _name: &str) -> Result<Value, CommandError> {
        Err(unavailable("checkpoint-create"))
    }

    pub fn checkpoint_list(&self) -> Result<Value, CommandError> {
        Err(unavailable("checkpoint-list"))
    }

    pub fn checkpoint_delete(&self, _name: &str) -> Result<(), CommandError> {
        Err(unavailable("checkpoint-delete"))
    }

    pub fn close(self) -> Result<(), CommandError> {
        Ok(())
    }

    pub fn remove(self) -> Result<(), CommandError> {
        Err(unavailable("volume-remove"))
    }
}

/// A snapshot taken for a backup.
pub struct SnapshotHandle {
    size: u64,
}

impl SnapshotHandle {
    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn status(&self) -> Value {
        json!({})
    }
    pub fn export(&self, _bitmap: Option<&str>) -> Arc<dyn Export> {
        unreachable!("no snapshot exists before the engine is integrated")
    }
    pub fn failure(&self) -> Option<String> {
        None
    }
}

/// The snapshots of one group snapshot and how long writes were paused.
pub struct GroupSnapshot {
    pub snapshots: Vec<SnapshotHandle>,
    pub pause: Duration,
}

pub fn group_snapshot(
    _volumes: &[Arc<VolumeHandle>],
    _checkpoint: Option<&str>,
    _since: Option<&str>,
    _cow_limit: Option<u64>,
) -> Result<GroupSnapshot, CommandError> {
    Err(unavailable("backup-begin"))
}

/// What a push writes.
#[derive(Debug, Clone, Copy)]
pub enum PushFormat {
    /// A raw image: a full copy, or update-img of an existing image for an incremental.
    Image,
    /// A delta file of the changed extents.
    Delta,
}

impl PushFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            PushFormat::Image => "image",
            PushFormat::Delta => "delta",
        }
    }
}

pub fn push(
    _jobs: &[(Arc<SnapshotHandle>, PathBuf)],
    _format: PushFormat,
    _incremental: bool,
    _progress: &Progress,
) -> Result<(), CommandError> {
    Err(unavailable("push"))
}

/// What to quiesce around a snapshot.
#[derive(Debug, Default)]
pub struct QuiesceRequest {
    pub mountpoints: Vec<PathBuf>,
    pub hooks: Option<PathBuf>,
    pub guest_agent: Option<PathBuf>,
    pub timeout: Option<Duration>,
}

/// Quiesced state; thaw it exactly once.
pub struct Frozen;

impl Frozen {
    pub fn thaw(self) -> Result<Value, CommandError> {
        Ok(Value::Null)
    }
}

pub fn quiesce(request: &QuiesceRequest) -> Result<Frozen, CommandError> {
    if request.mountpoints.is_empty()
        && request.hooks.is_none()
        && request.guest_agent.is_none()
        && request.timeout.is_none()
    {
        Ok(Frozen)
    } else {
        Err(unavailable("quiesce"))
    }
}

/// The NBD server and its exports.
pub struct NbdServer {
    exports: Mutex<BTreeMap<String, Arc<dyn Export>>>,
}

/// The running NBD server.
pub struct NbdTask;

impl NbdTask {
    pub async fn stop(self) {}
}

impl NbdServer {
    pub fn new() -> NbdServer {
        NbdServer {
            exports: Mutex::new(BTreeMap::new()),
        }
    }

    fn exports(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<dyn Export>>> {
        self.exports.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn add_export(&self, name: &str, export: Arc<dyn Export>) {
        self.exports().insert(name.to_string(), export);
    }

    pub fn remove_export(&self, name: &str) {
        self.exports().remove(name);
    }

    pub fn has_export(&self, name: &str) -> bool {
        self.exports().contains_key(name)
    }

    pub async fn serve(
        &self,
        socket: &Path,
        _listen: Option<SocketAddr>,
        _stop: watch::Receiver<bool>,
    ) -> anyhow::Result<NbdTask> {
        let _listener = tokio::net::UnixListener::bind(socket)?;
        Ok(NbdTask)
    }
}
