//! What TARGET names, and whether writing to it would destroy data.
//!
//! The guard protects people from benchmarking their data away: a write workload may
//! create a file, extend an empty one or fill a sparse file that is nothing but holes;
//! anything that may hold data (a file with allocated data, any block device) needs
//! `--force`, and a mounted device is refused even then.

use std::fs::{File, Metadata};
use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

/// The thing `tidemark bench` measures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A regular file, which may not exist yet.
    File(PathBuf),
    /// A block device.
    Device(PathBuf),
    /// An NBD export, named by an NBD URI.
    Nbd(String),
}

impl Target {
    /// Read TARGET as the user wrote it: an NBD URI (`nbd://`, `nbds://`, `nbd+unix://`,
    /// `nbds+unix://`, ...) or a path to a file or block device.
    pub fn parse(text: &str) -> anyhow::Result<Target> {
        if text.is_empty() {
            bail!("TARGET is empty: name a file, a block device or an NBD URI");
        }
        let scheme = text.split_once("://").map(|(scheme, _)| scheme);
        if let Some(scheme) = scheme {
            if scheme.starts_with("nbd") {
                return Ok(Target::Nbd(text.to_string()));
            }
            if !scheme.contains('/') {
                bail!(
                    "TARGET {text:?} is a {scheme}:// URI; tidemark bench measures files, block \
                     devices and NBD URIs (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH)"
                );
            }
        }
        let path = PathBuf::from(text);
        match std::fs::metadata(&path) {
            Ok(metadata) if metadata.file_type().is_block_device() => Ok(Target::Device(path)),
            Ok(metadata) if metadata.is_file() => Ok(Target::File(path)),
            Ok(_) => bail!(
                "TARGET {} is neither a regular file nor a block device",
                path.display()
            ),
            Err(err) if err.kind() == ErrorKind::NotFound => Ok(Target::File(path)),
            Err(err) => Err(err).with_context(|| format!("cannot inspect {}", path.display())),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Target::File(_) => "file",
            Target::Device(_) => "device",
            Target::Nbd(_) => "nbd",
        }
    }
}

/// Why a file is safe (or not) to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileContents {
    /// The file does not exist; the benchmark creates it.
    Missing,
    /// The file exists and is empty.
    Empty,
    /// The file has a size but no allocated data (only holes).
    AllHoles,
    /// The file holds data from `first_data` on.
    Data { first_data: u64 },
}

/// Find out whether the file at `path` holds any data, with SEEK_DATA: a file system
/// that does not support it reports the whole file as data, the safe answer.
pub fn file_contents(path: &Path) -> anyhow::Result<FileContents> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(FileContents::Missing),
        Err(err) => return Err(err).with_context(|| format!("cannot open {}", path.display())),
    };
    let metadata = file
        .metadata()
        .with_context(|| format!("cannot inspect {}", path.display()))?;
    if metadata.len() == 0 {
        return Ok(FileContents::Empty);
    }
    match lseek(&file, 0, Whence::SeekData) {
        Ok(first_data) => Ok(FileContents::Data {
            first_data: first_data as u64,
        }),
        Err(Errno::ENXIO) => Ok(FileContents::AllHoles),
        Err(err) => Err(err).with_context(|| format!("SEEK_DATA on {} failed", path.display())),
    }
}

/// Refuse a write workload on a file that holds data, unless `force`.
pub fn check_file_write(path: &Path, force: bool) -> anyhow::Result<FileContents> {
    let contents = file_contents(path)?;
    if let FileContents::Data { first_data } = contents {
        if !force {
            bail!(
                "refusing to write to {}: it holds data (the first allocated byte is at offset \
                 {first_data}) and a write benchmark overwrites it; pass --force to overwrite it, \
                 or name a new file, an empty one or a sparse file that is all holes",
                path.display()
            );
        }
    }
    Ok(contents)
}

/// Refuse a write workload on a block device unless `force`, and always on a mounted one.
pub fn check_device_write(path: &Path, metadata: &Metadata, force: bool) -> anyhow::Result<()> {
    let devices = device_and_partitions(metadata.rdev());
    if let Some(mount_point) = mount_point_of_any(&devices)? {
        bail!(
            "refusing to write to {}: it (or one of its partitions) is mounted at {}; a write \
             benchmark would corrupt that file system. Unmount it first",
            path.display(),
            mount_point
        );
    }
    if !force {
        bail!(
            "refusing to write to block device {}: a write benchmark destroys what it holds; \
             pass --force if its contents may be lost",
            path.display()
        );
    }
    Ok(())
}

/// "major:minor" of the device and of every partition sysfs lists under it.
fn device_and_partitions(rdev: u64) -> Vec<String> {
    let own = format!(
        "{}:{}",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    );
    let mut devices = vec![own.clone()];
    if let Ok(entries) = std::fs::read_dir(format!("/sys/dev/block/{own}")) {
        for entry in entries.flatten() {
            if let Ok(dev) = std::fs::read_to_string(entry.path().join("dev")) {
                devices.push(dev.trim().to_string());
            }
        }
    }
    devices
}

/// The mount point of the first of `devices` ("major:minor") that is mounted.
fn mount_point_of_any(devices: &[String]) -> anyhow::Result<Option<String>> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo to check whether the device is mounted")?;
    Ok(mount_point_in(&mountinfo, devices))
}

fn mount_point_in(mountinfo: &str, devices: &[String]) -> Option<String> {
    mountinfo.lines().find_map(|line| {
        let mut fields = line.split(' ');
        let device = fields.nth(2)?;
        let mount_point = fields.nth(1)?;
        devices
            .iter()
            .any(|d| d == device)
            .then(|| mount_point.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn parses_nbd_uris_paths_and_rejects_other_schemes() {
        assert_eq!(
            Target::parse("nbd+unix:///vm1?socket=/tmp/s").unwrap(),
            Target::Nbd("nbd+unix:///vm1?socket=/tmp/s".into())
        );
        assert_eq!(
            Target::parse("nbd://127.0.0.1:10809/x").unwrap().kind(),
            "nbd"
        );
        assert!(Target::parse("http://example.com/disk").is_err());
        assert!(Target::parse("").is_err());
        assert!(Target::parse("/").is_err(), "a directory is no target");
        assert_eq!(
            Target::parse("/nonexistent/new.img").unwrap(),
            Target::File("/nonexistent/new.img".into())
        );
    }

    #[test]
    fn missing_empty_and_sparse_files_may_be_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        assert_eq!(
            check_file_write(&path, false).unwrap(),
            FileContents::Missing
        );
        File::create(&path).unwrap();
        assert_eq!(check_file_write(&path, false).unwrap(), FileContents::Empty);
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        assert_eq!(
            check_file_write(&path, false).unwrap(),
            FileContents::AllHoles
        );
    }

    #[test]
    fn file_with_data_is_refused_without_force_and_the_message_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut file = File::create(&path).unwrap();
        file.set_len(1 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, b"precious", 512 << 10).unwrap();
        file.flush().unwrap();
        let err = check_file_write(&path, false).unwrap_err().to_string();
        assert!(err.contains("holds data"), "{err}");
        assert!(err.contains("--force"), "{err}");
        assert!(matches!(
            check_file_write(&path, true).unwrap(),
            FileContents::Data { .. }
        ));
    }

    #[test]
    fn finds_mounted_devices_in_mountinfo() {
        let mountinfo = "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
                         30 22 7:3 / /mnt/x rw - ext4 /dev/loop3 rw\n";
        assert_eq!(
            mount_point_in(mountinfo, &["7:3".into()]),
            Some("/mnt/x".into())
        );
        assert_eq!(mount_point_in(mountinfo, &["7:4".into()]), None);
    }
}
