//! Status of volumes as JSON, like /proc/elastio-info: what `tidemark info --json` and the
//! daemon's `query-volumes` report. Every struct here is plain data (serde), built by
//! [`crate::volume::Volume::status`].

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Seconds since the Unix epoch, now.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStatus {
    /// The volume's name.
    pub name: String,
    /// The volume's uuid.
    pub uuid: Uuid,
    /// The raw image file or block device under management.
    pub backing: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Bytes per tracking block.
    pub granularity: u32,
    /// Whether the volume accepts I/O.
    pub state: VolumeState,
    /// How changes are tracked right now.
    pub tracking: TrackingStatus,
    /// Changes whenever the checkpoint chain is reset; a consumer holding another chain
    /// uuid must start over with a full backup.
    pub chain_uuid: Uuid,
    /// Generation of the latest checkpoint (0 when there is none).
    pub generation: u64,
    /// The checkpoint chain, oldest first.
    pub checkpoints: Vec<CheckpointStatus>,
    /// Active (or failed, not yet dropped) snapshots.
    pub snapshots: Vec<SnapshotStatus>,
    /// Recent events, oldest first (unclean stops, lost snapshots, COW store failures).
    pub events: Vec<Event>,
}

/// Whether a volume accepts I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeState {
    /// Open and serving I/O.
    Online,
    /// Closed; no I/O.
    Closed,
}

/// How a volume tracks changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrackingStatus {
    /// No checkpoint exists: nothing to track.
    Off,
    /// Every newly dirtied block is on stable storage before its data write.
    Durable,
    /// Bits are persisted at clean stops only.
    Fast,
    /// The bitmaps missed changes (fast mode after an unclean stop, or a damaged bitmap
    /// file): the next backup must be full.
    Inconsistent,
}

/// One checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointStatus {
    /// The checkpoint's name.
    pub name: String,
    /// Its generation in the chain (increases by one per checkpoint created).
    pub generation: u64,
    /// When it was created (seconds since the Unix epoch).
    pub created_unix: u64,
    /// Tracking blocks changed since this checkpoint (the OR along the chain).
    pub changed_blocks: u64,
    /// Whether an incremental backup from this checkpoint can be trusted.
    pub consistent: bool,
    /// Why not, when it cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// Whether the data at this checkpoint is known to be stored: false while the backup
    /// that created it has not been seen through (an incremental from it is then refused
    /// unless forced).
    #[serde(default = "confirmed_by_default")]
    pub confirmed: bool,
}

/// Reports from before `confirmed` existed knew only confirmed checkpoints.
fn confirmed_by_default() -> bool {
    true
}

/// One snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotStatus {
    /// The snapshot's name.
    pub name: String,
    /// When it was taken (seconds since the Unix epoch).
    pub created_unix: u64,
    /// Whether it can still be read.
    pub state: SnapshotState,
    /// The COW store file.
    pub cow_path: PathBuf,
    /// Bytes of preserved chunks held in the COW store.
    pub cow_bytes_used: u64,
    /// The COW store's size limit, if any.
    pub cow_limit: Option<u64>,
    /// Bytes per COW chunk.
    pub chunk_size: u32,
    /// The dirty bitmap frozen with the snapshot (exported as `qemu:dirty-bitmap:NAME`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_bitmap: Option<String>,
    /// Why the snapshot failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The life of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotState {
    /// Readable; writes to the volume preserve its chunks.
    Active,
    /// The COW store failed (full, I/O error): reads fail, the volume is unaffected.
    Failed,
    /// Dropped; its COW store is gone.
    Dropped,
}

/// Severity of an [`Event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventLevel {
    /// Normal operation worth knowing about.
    Info,
    /// Something needs attention (a forced full backup, a lost snapshot).
    Warning,
    /// Something failed.
    Error,
}

/// Something that happened to a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// When (seconds since the Unix epoch).
    pub unix_time: u64,
    /// How serious.
    pub level: EventLevel,
    /// What happened and what to do.
    pub message: String,
}

/// A bounded log of recent events, shared by a volume and its snapshots.
#[derive(Debug, Default)]
pub(crate) struct EventLog {
    events: Mutex<VecDeque<Event>>,
}

/// How many events a volume keeps.
const MAX_EVENTS: usize = 64;

impl EventLog {
    pub(crate) fn push(&self, level: EventLevel, message: impl Into<String>) {
        let message = message.into();
        match level {
            EventLevel::Info => tracing::info!("{message}"),
            EventLevel::Warning => tracing::warn!("{message}"),
            EventLevel::Error => tracing::error!("{message}"),
        }
        let mut events = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        if events.len() == MAX_EVENTS {
            events.pop_front();
        }
        events.push_back(Event {
            unix_time: unix_now(),
            level,
            message,
        });
    }

    pub(crate) fn list(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_log_is_bounded_and_ordered() {
        let log = EventLog::default();
        for i in 0..(MAX_EVENTS + 5) {
            log.push(EventLevel::Info, format!("e{i}"));
        }
        let events = log.list();
        assert_eq!(events.len(), MAX_EVENTS);
        assert_eq!(events[0].message, "e5");
        assert_eq!(
            events[MAX_EVENTS - 1].message,
            format!("e{}", MAX_EVENTS + 4)
        );
    }

    #[test]
    fn status_serializes_with_snake_case_states() {
        let s = SnapshotStatus {
            name: "b".into(),
            created_unix: 1,
            state: SnapshotState::Failed,
            cow_path: "/x".into(),
            cow_bytes_used: 0,
            cow_limit: Some(10),
            chunk_size: 65536,
            dirty_bitmap: None,
            error: Some("full".into()),
        };
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"state\":\"failed\""), "{json}");
        let back: SnapshotStatus = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
    }
}
