//! The registry of named exports, and its view for negotiation.

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
        exports.insert(name.to_string(), Entry { export, removed });
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
