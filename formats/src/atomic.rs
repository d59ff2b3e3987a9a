//! Atomic replacement of a small file: readers see the old bytes or the new bytes, never a mix.
//!
//! Write order (and why): the new bytes go to a temporary file in the same directory
//! (same filesystem, so the rename is atomic); the temporary file is fsynced so its data is
//! on stable storage before any name points at it; it is renamed over the target; the
//! directory is fsynced so the rename itself survives power loss. A crash at any point leaves
//! either the old file or the new one under the target name, plus at worst a stray
//! `.NAME.tmp-PID-N` file (never read by tidemark; safe to delete).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Replaces `path` with `bytes` atomically and durably (temp file, fsync, rename, fsync dir).
///
/// The temporary file lives next to `path` so the rename never crosses a filesystem.
/// The new file gets mode 0644 (subject to the umask), like a freshly created file.
pub fn atomic_replace(path: &Path, bytes: &[u8]) -> io::Result<()> {
    atomic_replace_with(path, |mut f| f.write_all(bytes))
}

/// [`atomic_replace`] with the new contents written by `write` into the temporary file
/// (opened for writing, empty): for files written sparse, with `set_len` and positioned
/// writes. The file is fsynced after `write` returns.
pub fn atomic_replace_with(
    path: &Path,
    write: impl FnOnce(&File) -> io::Result<()>,
) -> io::Result<()> {
    let file_name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not a file path (no file name)", path.display()),
        )
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(temp_name(file_name));
    let result = write_synced(&tmp, write).and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = result {
        // Best effort: a failed replace must not leave its temporary file behind.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(&dir)?.sync_all()
}

/// `.NAME.tmp-PID-N`: unique per process and call, hidden from plain `ls`.
fn temp_name(file_name: &std::ffi::OsStr) -> std::ffi::OsString {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut name = std::ffi::OsString::from(".");
    name.push(file_name);
    name.push(format!(".tmp-{}-{n}", std::process::id()));
    name
}

fn write_synced(tmp: &Path, write: impl FnOnce(&File) -> io::Result<()>) -> io::Result<()> {
    let f = OpenOptions::new().write(true).create_new(true).open(tmp)?;
    write(&f)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_existing_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("volume.json");
        fs::write(&p, b"old").unwrap();
        atomic_replace(&p, b"new contents").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"new contents");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("volume.json")]);
    }

    #[test]
    fn creates_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("new.json");
        atomic_replace(&p, b"{}").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"{}");
    }

    #[test]
    fn missing_directory_is_an_error_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("no-such-dir").join("x.json");
        assert!(atomic_replace(&p, b"x").is_err());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
