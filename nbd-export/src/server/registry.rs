//! The registry of named exports, and its view for negotiation.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

use super::{Server, ServerError};
use crate::export::Export;
use crate::negotiate::ExportDirectory;
use crate::proto;

pub(super) struct Entry {
    pub(super) export: Arc<dyn Export>,
    /// Flipped to true when the export is removed: its connections close.
    pub(super) removed: watch::Sender<bool>,
    pub(super) counters: Arc<ExportCounters>,
}

/// What an export has served, counted by its connections as they run.
#[derive(Debug, Default)]
pub(super) struct ExportCounters {
    transmitting: AtomicUsize,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

impl ExportCounters {
    /// A READ of `len` bytes succeeded.
    pub(super) fn read(&self, len: u64) {
        self.bytes_read.fetch_add(len, Ordering::Relaxed);
    }

    /// A WRITE of `len` bytes succeeded.
    pub(super) fn written(&self, len: u64) {
        self.bytes_written.fetch_add(len, Ordering::Relaxed);
    }

    /// Count a connection in transmission until the guard drops.
    pub(super) fn transmitting(self: &Arc<Self>) -> Transmitting {
        self.transmitting.fetch_add(1, Ordering::Relaxed);
        Transmitting(self.clone())
    }
}

/// A connection counted in [`ExportStats::connections`] while it lives.
pub(super) struct Transmitting(Arc<ExportCounters>);

impl Drop for Transmitting {
    fn drop(&mut self) {
        self.0.transmitting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An export's activity since it was added, for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportStats {
    /// The export's name.
    pub name: String,
    /// Connections in the transmission phase on it now.
    pub connections: usize,
    /// Bytes of successful READs.
    pub bytes_read: u64,
    /// Bytes of successful WRITEs.
    pub bytes_written: u64,
}

impl Server {
    /// Serve `export` under `name` to new connections from now on.
    pub fn add_export(&self, name: &str, export: Arc<dyn Export>) -> Result<(), ServerError> {
        if name.len() > proto::MAX_STRING || name.contains('\0') {
            return Err(ServerError::InvalidName(name.to_string()));
        }
        let mut exports = self
            .inner
            .exports
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if exports.contains_key(name) {
            return Err(ServerError::DuplicateExport(name.to_string()));
        }
        let (removed, _) = watch::channel(false);
        exports.insert(
            name.to_string(),
            Entry {
                export,
                removed,
                counters: Arc::default(),
            },
        );
        Ok(())
    }

    /// Stop serving `name`: new connections cannot select it and connections that use it
    /// close once their in-flight requests complete. Returns the export, if it existed.
    pub fn remove_export(&self, name: &str) -> Option<Arc<dyn Export>> {
        let entry = self
            .inner
            .exports
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)?;
        entry.removed.send_replace(true);
        Some(entry.export)
    }

    /// Stop serving `name` only when no connection uses it (a connection holds its
    /// export from the moment it selects it until it closes): `Ok` with the export (`None`
    /// when there was none), or `Err` with the number of connections that use it, in
    /// which case nothing changed. Checked and removed under one lock, so no connection
    /// can select the export in between.
    pub fn remove_export_if_unused(&self, name: &str) -> Result<Option<Arc<dyn Export>>, usize> {
        let mut exports = self
            .inner
            .exports
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let Some(entry) = exports.get(name) else {
            return Ok(None);
        };
        let users = Arc::strong_count(&entry.export) - 1;
        if users > 0 {
            return Err(users);
        }
        let entry = exports.remove(name).map(|entry| {
            entry.removed.send_replace(true);
            entry.export
        });
        Ok(entry)
    }

    /// Names of the exports served, sorted.
    pub fn export_names(&self) -> Vec<String> {
        self.inner
            .exports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Every export's activity, by name. The counts cover connections through this
    /// server, not [`serve_transmission`](super::serve_transmission) streams.
    pub fn export_stats(&self) -> Vec<ExportStats> {
        self.inner
            .exports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(name, entry)| ExportStats {
                name: name.clone(),
                connections: entry.counters.transmitting.load(Ordering::Relaxed),
                bytes_read: entry.counters.bytes_read.load(Ordering::Relaxed),
                bytes_written: entry.counters.bytes_written.load(Ordering::Relaxed),
            })
            .collect()
    }
}

impl ExportDirectory for Server {
    fn lookup(&self, name: &str) -> Option<(String, Arc<dyn Export>)> {
        let exports = self.inner.exports.read().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = exports.get(name) {
            return Some((name.to_string(), entry.export.clone()));
        }
        if name.is_empty() && exports.len() == 1 {
            return exports
                .iter()
                .next()
                .map(|(n, e)| (n.clone(), e.export.clone()));
        }
        None
    }

    fn list(&self) -> Vec<(String, String)> {
        let exports = self.inner.exports.read().unwrap_or_else(|e| e.into_inner());
        exports
            .iter()
            .map(|(n, e)| (n.clone(), e.export.description()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_export_a_connection_uses_is_not_removed() {
        let server = Server::new();
        server
            .add_export("a", Arc::new(super::super::command::tests::Striped))
            .unwrap();
        // What a connection holds once it selected the export.
        let (_, selected) = server.lookup("a").unwrap();
        assert_eq!(server.remove_export_if_unused("a").err(), Some(1));
        assert_eq!(server.export_names(), ["a"]);
        drop(selected);
        assert!(server.remove_export_if_unused("a").unwrap().is_some());
        assert!(server.export_names().is_empty());
        assert!(server.remove_export_if_unused("a").unwrap().is_none());
    }
}
