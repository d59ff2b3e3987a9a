//! Freezing host filesystems with `FIFREEZE`/`FITHAW`, as fsfreeze(8) does.
//!
//! A mountpoint is checked before anything is frozen: it must be a mount point in
//! `/proc/self/mountinfo`, it must not be `/`, and it must not hold one of the caller's
//! protected paths (the state dir, the COW store): freezing the filesystem we write our
//! own snapshot into would block our own writes until the watchdog gives up, a deadlock.
//! Mountpoints are frozen sorted by path (parents before children) and thawed in reverse.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::QuiesceError;
use crate::{error, sys};

/// A filesystem this process froze, with the directory it was frozen through kept open
/// (thawing through the same descriptor needs no path lookup on a frozen filesystem).
#[derive(Debug)]
pub(crate) struct FrozenFs {
    pub(crate) mountpoint: PathBuf,
    dir: File,
}

impl FrozenFs {
    /// Thaws it. `Ok(false)` means it was no longer frozen (the watchdog thawed it).
    pub(crate) fn thaw(&self) -> io::Result<bool> {
        thaw_fd(&self.dir)
    }
}

/// Validates `mountpoints` and returns them canonical, deduplicated per filesystem and
/// sorted, ready to freeze in that order.
pub(crate) fn plan(
    mountpoints: &[PathBuf],
    protected: &[PathBuf],
) -> Result<Vec<PathBuf>, QuiesceError> {
    let mounts = mount_points()?;
    let mut protected_devs = Vec::new();
    for path in protected {
        let existing = nearest_existing(path);
        let meta = std::fs::metadata(&existing).map_err(|source| QuiesceError::Io {
            what: "stat the protected path".into(),
            path: existing.clone(),
            source,
        })?;
        protected_devs.push((meta.dev(), path.clone()));
    }
    let mut planned = BTreeSet::new();
    let mut devs = BTreeSet::new();
    for requested in mountpoints {
        let canonical = requested
            .canonicalize()
            .map_err(|source| QuiesceError::Io {
                what: "resolve the mountpoint".into(),
                path: requested.clone(),
                source,
            })?;
        if canonical == Path::new("/") {
            return Err(QuiesceError::RefuseRoot {
                mountpoint: requested.clone(),
            });
        }
        if !mounts.contains(&canonical) {
            return Err(QuiesceError::NotAMountpoint {
                path: requested.clone(),
            });
        }
        let dev = std::fs::metadata(&canonical)
            .map_err(|source| QuiesceError::Io {
                what: "stat the mountpoint".into(),
                path: canonical.clone(),
                source,
            })?
            .dev();
        if let Some((_, path)) = protected_devs.iter().find(|(d, _)| *d == dev) {
            return Err(QuiesceError::RefuseOwnState {
                mountpoint: requested.clone(),
                path: path.clone(),
            });
        }
        // Bind mounts of one filesystem: freezing it twice would fail with EBUSY.
        if devs.insert(dev) {
            planned.insert(canonical);
        }
    }
    Ok(planned.into_iter().collect())
}

/// Writes back each filesystem's dirty data before the window opens, so the sync the
/// kernel does inside FIFREEZE has little left to do.
pub(crate) fn presync(mountpoints: &[PathBuf]) -> Result<(), QuiesceError> {
    for mountpoint in mountpoints {
        let dir = open_dir(mountpoint)?;
        sys::syncfs(dir.as_fd()).map_err(|source| QuiesceError::Io {
            what: "syncfs".into(),
            path: mountpoint.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Freezes one filesystem.
pub(crate) fn freeze(mountpoint: &Path) -> Result<FrozenFs, String> {
    let dir = open_dir(mountpoint).map_err(|e| error::chain(&e))?;
    match sys::fifreeze(dir.as_fd()) {
        Ok(()) => Ok(FrozenFs {
            mountpoint: mountpoint.to_path_buf(),
            dir,
        }),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(format!(
            "FIFREEZE {}: already frozen by someone else (fsfreeze, another backup tool); \
             thaw it with `fsfreeze -u {}` or wait for the other tool",
            mountpoint.display(),
            mountpoint.display()
        )),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Err(format!(
            "FIFREEZE {}: this filesystem type cannot be frozen; use a freeze hook instead",
            mountpoint.display()
        )),
        Err(e) => Err(format!("FIFREEZE {}: {e}", mountpoint.display())),
    }
}

/// Thaws the filesystem mounted at `mountpoint` (the watchdog's way: it holds no fds).
pub(crate) fn thaw_path(mountpoint: &Path) -> io::Result<bool> {
    let dir = File::open(mountpoint)?;
    thaw_fd(&dir)
}

fn thaw_fd(dir: &File) -> io::Result<bool> {
    match sys::fithaw(dir.as_fd()) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(e),
    }
}

fn open_dir(path: &Path) -> Result<File, QuiesceError> {
    File::open(path).map_err(|source| QuiesceError::Io {
        what: "open the mountpoint".into(),
        path: path.to_path_buf(),
        source,
    })
}

/// The deepest ancestor of `path` that exists (a COW store may not be created yet, but
/// the filesystem it will live on is known).
fn nearest_existing(path: &Path) -> PathBuf {
    let mut candidate = path;
    loop {
        if candidate.exists() {
            return candidate.to_path_buf();
        }
        match candidate.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => candidate = parent,
            _ => return PathBuf::from("."),
        }
    }
}

/// Every mount point of this mount namespace, from `/proc/self/mountinfo`.
fn mount_points() -> Result<BTreeSet<PathBuf>, QuiesceError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(path).map_err(|source| QuiesceError::Io {
        what: "read the mount table".into(),
        path: path.into(),
        source,
    })?;
    Ok(text
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mountinfo)
        .collect())
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape_mountinfo(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                let value = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                out.push(value as u8);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(
            unescape_mountinfo(r"/mnt/a\040b"),
            PathBuf::from("/mnt/a b")
        );
        assert_eq!(unescape_mountinfo(r"/x\134y"), PathBuf::from(r"/x\y"));
        assert_eq!(
            unescape_mountinfo(r"/trailing\04"),
            PathBuf::from(r"/trailing\04")
        );
    }

    #[test]
    fn root_is_refused() {
        let err = plan(&[PathBuf::from("/")], &[]).unwrap_err();
        assert!(matches!(err, QuiesceError::RefuseRoot { .. }), "{err}");
    }

    #[test]
    fn a_plain_directory_is_not_a_mountpoint() {
        let dir = tempfile::tempdir().unwrap();
        let err = plan(&[dir.path().to_path_buf()], &[]).unwrap_err();
        assert!(matches!(err, QuiesceError::NotAMountpoint { .. }), "{err}");
    }

    #[test]
    fn the_filesystem_of_a_protected_path_is_refused() {
        // /proc is a mount point; a (not yet existing) state dir below it shares its device.
        let err = plan(
            &[PathBuf::from("/proc")],
            &[PathBuf::from("/proc/self/not-yet/cow")],
        )
        .unwrap_err();
        assert!(matches!(err, QuiesceError::RefuseOwnState { .. }), "{err}");
    }

    /// An ext4 image on a loop device, mounted (needs root), undone on drop.
    struct LoopMount {
        dir: tempfile::TempDir,
        device: String,
        mounts: Vec<PathBuf>,
    }

    impl LoopMount {
        fn new() -> LoopMount {
            let run = |cmd: &mut std::process::Command| {
                let out = cmd.output().unwrap();
                assert!(
                    out.status.success(),
                    "{cmd:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                String::from_utf8_lossy(&out.stdout).trim().to_string()
            };
            let dir = tempfile::tempdir().unwrap();
            let image = dir.path().join("fs.img");
            File::create(&image).unwrap().set_len(32 << 20).unwrap();
            run(std::process::Command::new("mkfs.ext4")
                .args(["-q", "-F"])
                .arg(&image));
            let device = run(std::process::Command::new("losetup")
                .args(["--find", "--show"])
                .arg(&image));
            let mut fs = LoopMount {
                mounts: Vec::new(),
                device,
                dir,
            };
            let mnt = fs.dir.path().join("mnt");
            let bind = fs.dir.path().join("bind");
            std::fs::create_dir(&mnt).unwrap();
            std::fs::create_dir(&bind).unwrap();
            run(std::process::Command::new("mount")
                .arg(&fs.device)
                .arg(&mnt));
            fs.mounts.push(mnt.clone());
            run(std::process::Command::new("mount")
                .arg("--bind")
                .arg(&mnt)
                .arg(&bind));
            fs.mounts.push(bind);
            fs
        }
    }

    impl Drop for LoopMount {
        fn drop(&mut self) {
            if let Some(mnt) = self.mounts.first() {
                let _ = thaw_path(mnt);
            }
            for mnt in self.mounts.iter().rev() {
                let _ = std::process::Command::new("umount").arg(mnt).status();
            }
            let _ = std::process::Command::new("losetup")
                .arg("-d")
                .arg(&self.device)
                .status();
        }
    }

    #[test]
    fn a_loop_mounted_ext4_freezes_once_and_thaws_once() {
        let fs = LoopMount::new();
        // The mount and its bind mount are one filesystem: planned once.
        let planned = plan(&fs.mounts, &[]).unwrap();
        assert_eq!(planned, vec![fs.mounts[0].canonicalize().unwrap()]);
        presync(&planned).unwrap();
        let frozen = freeze(&planned[0]).unwrap();
        let again = freeze(&fs.mounts[0]).unwrap_err();
        assert!(again.contains("already frozen"), "{again}");
        assert!(frozen.thaw().unwrap(), "the first thaw thaws");
        assert!(!frozen.thaw().unwrap(), "the second finds it thawed");
        assert!(!thaw_path(&fs.mounts[0]).unwrap());
        std::fs::write(fs.mounts[0].join("after"), b"writable").unwrap();
    }
}
