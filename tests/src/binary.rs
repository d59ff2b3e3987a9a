//! Where the binary under test is.

use std::path::{Path, PathBuf};

/// The tidemark binary under test: `TIDEMARK_BIN`, else the workspace's debug build.
pub fn tidemark_bin() -> PathBuf {
    let path = std::env::var_os("TIDEMARK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/tidemark"));
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p tidemark` first",
        path.display()
    );
    path
}
