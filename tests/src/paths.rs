//! Paths the tests pass to commands, and scratch space on the main disk, where O_DIRECT,
//! SEEK_HOLE and hole punching work (a tmpfs /tmp may lack them).

use std::path::Path;

/// A scratch directory under /var/tmp, removed when dropped.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tidemark-copy-")
        .tempdir_in("/var/tmp")
        .expect("scratch dir")
}

/// The path of `name` in `dir`, as a command argument.
pub fn p(dir: &tempfile::TempDir, name: &str) -> String {
    dir.path().join(name).display().to_string()
}

/// A path as a command argument.
pub fn arg(path: &Path) -> String {
    path.display().to_string()
}
