//! Opening the files a job writes without following a link someone planted there.
//!
//! - A destination the job creates ([`create_new`]) is opened O_CREAT|O_EXCL|O_NOFOLLOW
//!   with mode [`CREATE_MODE`] (so 0640 at most, whatever the umask): a name swapped for a
//!   symlink fails the open instead of redirecting the write, an existing file is never
//!   reused, and an image or delta is never readable by others.
//! - A destination written in place ([`open_in_place`]: an existing image, a block device)
//!   is opened O_NOFOLLOW; a symlink is followed only to a block device (`/dev/vg/lv` is
//!   one), checked on the opened handle, never to a regular file.
//!
//! The handle returned is the file to write. Jobs that open their destination by path are
//! given [`handle_path`], which reopens exactly that file, not whatever the name points
//! to by then.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Mode of the files [`create_new`] creates, before the umask: owner read-write, group
/// read.
pub const CREATE_MODE: u32 = 0o640;

/// Why a destination could not be opened safely.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// [`create_new`] found something at the path.
    #[error("{} already exists", path.display())]
    Exists {
        /// The destination.
        path: PathBuf,
    },
    /// [`open_in_place`] found nothing at the path.
    #[error("{} does not exist", path.display())]
    NotFound {
        /// The destination.
        path: PathBuf,
    },
    /// The path is a symlink to something other than a block device.
    #[error(
        "{} is a symlink to {}, which is not a block device; name the file itself \
         (tidemark does not write through a link to a file)",
        path.display(),
        real.display()
    )]
    LinkToFile {
        /// The destination as given.
        path: PathBuf,
        /// Where the link points.
        real: PathBuf,
    },
    /// The path is neither a regular file nor a block device.
    #[error("{} is neither a regular file nor a block device", path.display())]
    NotAnImage {
        /// The destination.
        path: PathBuf,
    },
    /// Any other failure.
    #[error("{action} {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Create `path` for reading and writing: never reuse a file that exists and never
/// follow a symlink (O_EXCL|O_NOFOLLOW), mode [`CREATE_MODE`] less the umask.
pub fn create_new(path: &Path) -> Result<File, TargetError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(CREATE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| match source.kind() {
            io::ErrorKind::AlreadyExists => TargetError::Exists {
                path: path.to_path_buf(),
            },
            _ => TargetError::Io {
                action: "creating",
                path: path.to_path_buf(),
                source,
            },
        })
}

/// Open the existing `path` to write it in place without following a symlink to a regular
/// file: a planted link must not make tidemark write someone else's file. A symlink is
/// followed only to a block device, checked on the opened handle.
pub fn open_in_place(path: &Path) -> Result<File, TargetError> {
    let open = |path: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
    };
    let io_err = |action, path: &Path, source| TargetError::Io {
        action,
        path: path.to_path_buf(),
        source,
    };
    let (file, link_to) = match open(path) {
        Ok(file) => (file, None),
        Err(err) if err.raw_os_error() == Some(libc::ELOOP) => {
            let real = path
                .canonicalize()
                .map_err(|e| io_err("resolving the symlink", path, e))?;
            let file = open(&real).map_err(|e| io_err("opening", &real, e))?;
            (file, Some(real))
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Err(TargetError::NotFound {
                path: path.to_path_buf(),
            })
        }
        Err(err) => return Err(io_err("opening", path, err)),
    };
    let kind = file
        .metadata()
        .map_err(|e| io_err("reading metadata of", path, e))?
        .file_type();
    if kind.is_block_device() {
        return Ok(file);
    }
    if let Some(real) = link_to {
        return Err(TargetError::LinkToFile {
            path: path.to_path_buf(),
            real,
        });
    }
    if !kind.is_file() {
        return Err(TargetError::NotAnImage {
            path: path.to_path_buf(),
        });
    }
    Ok(file)
}

/// A destination that is created when missing ([`create_new`]) and otherwise written in
/// place ([`open_in_place`]): an image `copy` or `restore` writes.
pub fn create_or_open(path: &Path) -> Result<File, TargetError> {
    match create_new(path) {
        Err(TargetError::Exists { .. }) => open_in_place(path),
        other => other,
    }
}

/// A path that reopens exactly the file behind `file` (not whatever its name points to
/// now), for jobs that open their destination by path.
pub fn handle_path(file: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, PermissionsExt};

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn created_files_are_0640_at_most_and_never_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("new.img");
        create_new(&new).unwrap();
        assert_eq!(mode(&new) & !CREATE_MODE, 0, "mode {:o}", mode(&new));
        assert!(matches!(create_new(&new), Err(TargetError::Exists { .. })));
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let link = dir.path().join("link.img");
        symlink(&victim, &link).unwrap();
        assert!(matches!(create_new(&link), Err(TargetError::Exists { .. })));
        let err = create_or_open(&link).unwrap_err();
        assert!(matches!(err, TargetError::LinkToFile { .. }), "{err}");
        assert!(err.to_string().contains("is a symlink to"), "{err}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        // A dangling link is not created through either.
        let dangling = dir.path().join("dangling.img");
        symlink(dir.path().join("nowhere"), &dangling).unwrap();
        assert!(create_or_open(&dangling).is_err());
        assert!(!dir.path().join("nowhere").exists());
    }

    #[test]
    fn in_place_targets_are_files_or_devices_and_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image");
        std::fs::write(&image, b"old").unwrap();
        open_in_place(&image).unwrap();
        let err = open_in_place(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(err, TargetError::NotFound { .. }), "{err}");
        assert!(open_in_place(dir.path()).is_err());
    }

    #[test]
    fn a_handle_path_reopens_the_handle_not_the_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        let file = create_new(&path).unwrap();
        std::fs::rename(&path, dir.path().join("b")).unwrap();
        std::fs::write(&path, b"another file").unwrap();
        std::fs::write(handle_path(&file), b"mine").unwrap();
        assert_eq!(std::fs::read(dir.path().join("b")).unwrap(), b"mine");
        assert_eq!(std::fs::read(&path).unwrap(), b"another file");
    }
}
