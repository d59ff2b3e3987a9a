//! `tidemark mount POINT DIR` and `tidemark umount DIR`: a restore point's filesystems,
//! read-only, for picking files out of a backup.
//!
//! [`PointMount::mount`] serves the point ([`ChainExport`]) through the FUSE + loop front
//! end. An image with a partition table (MBR primary partitions or GPT, read from the point
//! here, so kernels without partition-table support work too) gets a read-only loop device
//! per partition over the point's device (`losetup --offset --sizelimit`) and each
//! partition's filesystem mounted at `DIR/pN`; an image holding one filesystem gets it
//! mounted at `DIR`. Filesystems are mounted read-only without touching their journal
//! (ext3/4 `noload`, xfs `norecovery,nouuid`), `nodev,nosuid`. The process that mounted it
//! keeps serving until [`PointMount::unmount`].
//!
//! A record in `<state-dir>/mounts/` names the serving process, the attachment and what was
//! mounted where, so [`umount`] (another process) can unmount the filesystems, ask the
//! server to detach (SIGTERM) and wait for it, or clean up after a server that died.
//! Mount options nobody else needs: no daemon is involved, the point is not a volume.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::mount::{MountFlags, UnmountFlags};
use serde::{Deserialize, Serialize};

use crate::attach::fuse::{cleanup_stale, FuseLoop};
use crate::attach::{AttachError, Attached, Attachment, FrontEnd};
use crate::chain_export::{ChainError, ChainExport};
use tidemark_nbd::export::{Export, ExportError};

/// How long [`umount`] waits for the serving process to detach and exit.
const SERVER_EXIT_LIMIT: Duration = Duration::from_secs(20);

/// Why mounting or unmounting a point failed. Messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The point cannot be served.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// The FUSE + loop front end failed.
    #[error(transparent)]
    Attach(#[from] AttachError),
    /// The target directory cannot be used.
    #[error("{dir}: {why}")]
    Target {
        /// The directory.
        dir: PathBuf,
        /// What is wrong and what to do.
        why: String,
    },
    /// Nothing on the point could be mounted.
    #[error("{0}")]
    NoFilesystem(String),
    /// A file, mount or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> MountError {
    let what = what.into();
    move |source| MountError::Io { what, source }
}

/// One filesystem mounted from the point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mounted {
    /// The block device (the loop device or one of its partitions).
    pub device: PathBuf,
    /// Where it is mounted.
    pub dir: PathBuf,
    /// Its filesystem type.
    pub fstype: String,
    /// The directory was made by the mount (`DIR/pN`) and is removed again.
    pub made_dir: bool,
}

/// What `tidemark mount` made, kept in `<state-dir>/mounts/` while it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    /// The directory given to `tidemark mount` (canonical).
    pub dir: PathBuf,
    /// The restore point: base, then deltas (or `repo:URL`, then `VOLUME@CHECKPOINT`).
    pub point: Vec<PathBuf>,
    /// The process serving the point.
    pub pid: u32,
    /// The loop device and FUSE mount serving it.
    pub attachment: Attachment,
    /// Loop devices over the partitions of `attachment`'s device, one per partition.
    #[serde(default)]
    pub partition_devices: Vec<PathBuf>,
    /// The filesystems mounted, in mount order.
    pub mounts: Vec<Mounted>,
    /// Partitions with no filesystem tidemark could mount (swap, unknown), with why.
    pub skipped: Vec<String>,
}

/// Where mount records live.
pub fn records_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("mounts")
}

/// The record of a mount at `dir` (canonical).
fn record_path(state_dir: &Path, dir: &Path) -> PathBuf {
    records_dir(state_dir).join(format!("{}.json", record_key(dir)))
}

/// The log of the process serving a mount at `dir` (canonical, as `tidemark mount`
/// resolves it).
pub fn log_path(state_dir: &Path, dir: &Path) -> Result<PathBuf, MountError> {
    let dir = target_dir(dir)?;
    Ok(records_dir(state_dir).join(format!("{}.log", record_key(&dir))))
}

fn record_key(dir: &Path) -> String {
    dir.to_string_lossy()
        .replace('%', "%25")
        .replace('/', "%2F")
}

/// `dir` made absolute and resolved, which must be an existing directory.
fn target_dir(dir: &Path) -> Result<PathBuf, MountError> {
    let target = |why: String| MountError::Target {
        dir: dir.to_path_buf(),
        why,
    };
    let canonical =
        fs::canonicalize(dir).map_err(|e| target(format!("{e}; create the directory first")))?;
    if !canonical.is_dir() {
        return Err(target("not a directory".into()));
    }
    Ok(canonical)
}

/// Whether process `pid` runs (a zombie does not: it may wait long for a reaper).
fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "PID (COMM) STATE ...": COMM may hold anything, the state follows the last ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
        .is_some_and(|state| state != 'Z' && state != 'X')
}

/// A restore point mounted by this process; see the module doc.
pub struct PointMount {
    attached: Box<dyn Attached>,
    record: MountRecord,
    record_path: PathBuf,
}

impl std::fmt::Debug for PointMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PointMount")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

impl PointMount {
    /// Serve `base` + `deltas` read-only and mount its filesystems at `dir`.
    pub fn mount(
        state_dir: &Path,
        base: &Path,
        deltas: &[PathBuf],
        dir: &Path,
    ) -> Result<PointMount, MountError> {
        let mut point = vec![base.to_path_buf()];
        point.extend(deltas.iter().cloned());
        Self::mount_with(state_dir, point, dir, || {
            Ok(Arc::new(ChainExport::open(base, deltas)?))
        })
    }

    /// Serve a point opened by the caller (a repository point), named `point` in the
    /// record (`repo:URL`, `VOLUME@CHECKPOINT`), read-only, and mount its filesystems at
    /// `dir`. `export` must be read-only.
    pub fn mount_export(
        state_dir: &Path,
        point: Vec<PathBuf>,
        export: Arc<dyn Export>,
        dir: &Path,
    ) -> Result<PointMount, MountError> {
        Self::mount_with(state_dir, point, dir, || Ok(export))
    }

    fn mount_with(
        state_dir: &Path,
        point: Vec<PathBuf>,
        dir: &Path,
        open: impl FnOnce() -> Result<Arc<dyn Export>, MountError>,
    ) -> Result<PointMount, MountError> {
        let dir = target_dir(dir)?;
        let record_path = record_path(state_dir, &dir);
        if let Ok(old) = read_record(&record_path) {
            if pid_alive(old.pid) {
                return Err(MountError::Target {
                    dir,
                    why: format!(
                        "a restore point is already mounted here (served by pid {}); run \
                         `tidemark umount` on it first",
                        old.pid
                    ),
                });
            }
            cleanup(&old, &record_path)?;
        }
        let chain = open()?;
        let table = partition_table(&*chain).map_err(|e| {
            MountError::NoFilesystem(format!("reading the point's partition table: {e}"))
        })?;
        fs::create_dir_all(records_dir(state_dir)).map_err(io_err(format!(
            "creating {}",
            records_dir(state_dir).display()
        )))?;
        let front = FuseLoop::new(state_dir.join("mount-fuse"));
        let name = format!("point-{}", std::process::id());
        let attached = front.attach(&name, chain, true)?;
        let mut this = PointMount {
            record: MountRecord {
                dir: dir.clone(),
                point,
                pid: std::process::id(),
                attachment: attached.record(),
                partition_devices: Vec::new(),
                mounts: Vec::new(),
                skipped: Vec::new(),
            },
            attached,
            record_path,
        };
        match this.mount_filesystems(&table) {
            Ok(()) => Ok(this),
            Err(err) => {
                if let Err(undo) = this.unmount() {
                    tracing::warn!("undoing a failed mount at {}: {undo}", dir.display());
                }
                Err(err)
            }
        }
    }

    /// What was mounted where.
    pub fn record(&self) -> &MountRecord {
        &self.record
    }

    fn mount_filesystems(&mut self, table: &[Partition]) -> Result<(), MountError> {
        let device = self.record.attachment.device.clone();
        if table.is_empty() {
            let fstype = probe(&device)?.ok_or_else(|| {
                MountError::NoFilesystem(format!(
                    "the restore point holds neither a partition table nor a filesystem \
                     blkid recognises ({} is attached at {}; nothing was mounted)",
                    self.record.point[0].display(),
                    device.display()
                ))
            })?;
            let dir = self.record.dir.clone();
            self.mount_one(&device, &dir, &fstype, false)?;
        } else {
            for entry in table {
                let partition = bind_partition(&device, entry)?;
                self.record.partition_devices.push(partition.clone());
                let number = entry.number;
                let Some(fstype) = probe(&partition)? else {
                    self.record.skipped.push(format!(
                        "p{number} ({}): no filesystem",
                        partition.display()
                    ));
                    continue;
                };
                if fstype == "swap" {
                    self.record
                        .skipped
                        .push(format!("p{number} ({}): swap", partition.display()));
                    continue;
                }
                let dir = self.record.dir.join(format!("p{number}"));
                let made = !dir.exists();
                if made {
                    fs::create_dir(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
                }
                if let Err(err) = self.mount_one(&partition, &dir, &fstype, made) {
                    if made {
                        let _ = fs::remove_dir(&dir);
                    }
                    return Err(err);
                }
            }
            if self.record.mounts.is_empty() {
                return Err(MountError::NoFilesystem(format!(
                    "no partition of the restore point holds a filesystem to mount ({})",
                    self.record.skipped.join("; ")
                )));
            }
        }
        let json = serde_json::to_vec_pretty(&self.record)
            .map_err(|e| io_err("encoding the mount record")(io::Error::other(e)))?;
        tidemark_formats::atomic_replace(&self.record_path, &json)
            .map_err(io_err(format!("writing {}", self.record_path.display())))
    }

    fn mount_one(
        &mut self,
        device: &Path,
        dir: &Path,
        fstype: &str,
        made_dir: bool,
    ) -> Result<(), MountError> {
        let data = match fstype {
            "ext3" | "ext4" => "noload",
            "xfs" => "norecovery,nouuid",
            _ => "",
        };
        let data = std::ffi::CString::new(data).unwrap_or_default();
        rustix::mount::mount(
            device,
            dir,
            fstype,
            MountFlags::RDONLY | MountFlags::NODEV | MountFlags::NOSUID,
            data.as_c_str(),
        )
        .map_err(|e| MountError::Io {
            what: format!(
                "mounting {} ({fstype}) read-only at {}",
                device.display(),
                dir.display()
            ),
            source: e.into(),
        })?;
        self.record.mounts.push(Mounted {
            device: device.to_path_buf(),
            dir: dir.to_path_buf(),
            fstype: fstype.to_string(),
            made_dir,
        });
        Ok(())
    }

    /// Unmount the filesystems (refused while busy: nothing changes then and it may be
    /// retried), detach the point and remove the record.
    pub fn unmount(&mut self) -> Result<(), MountError> {
        unmount_filesystems(&mut self.record.mounts)?;
        unbind_partitions(&mut self.record.partition_devices)?;
        let mut tries = 0;
        loop {
            match self.attached.detach() {
                Ok(()) => break,
                // The kernel lets go of a just-unmounted device asynchronously.
                Err(AttachError::Busy { .. }) if tries < 50 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(err) => return Err(err.into()),
            }
        }
        match fs::remove_file(&self.record_path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(format!(
                "removing {}",
                self.record_path.display()
            ))(e)),
            _ => Ok(()),
        }
    }
}

/// Unmount `mounts`, newest first, removing the directories the mount made; each one
/// unmounted is taken off the list. A busy filesystem stops it with an error saying so.
fn unmount_filesystems(mounts: &mut Vec<Mounted>) -> Result<(), MountError> {
    while let Some(mounted) = mounts.last() {
        match rustix::mount::unmount(&mounted.dir, UnmountFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => {}
            Err(rustix::io::Errno::BUSY) => {
                return Err(MountError::Target {
                    dir: mounted.dir.clone(),
                    why: "busy: a program has files open there (`fuser -vm DIR` lists them); \
                          close them and run tidemark umount again"
                        .into(),
                });
            }
            Err(e) => {
                return Err(io_err(format!("unmounting {}", mounted.dir.display()))(
                    e.into(),
                ))
            }
        }
        if mounted.made_dir {
            let _ = fs::remove_dir(&mounted.dir);
        }
        mounts.pop();
    }
    Ok(())
}

/// One partition of the point's partition table, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    /// Its number: 1..=4 for MBR primary partitions, the entry's index + 1 for GPT.
    pub number: u32,
    /// Byte offset in the image.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
}

/// Most GPT entries read (the usual array holds 128).
const MAX_GPT_ENTRIES: u64 = 1024;

/// The partitions of the disk image `export` holds (512-byte sectors): the GPT's if the
/// MBR is protective, else the MBR's primary partitions (extended ones skipped); none when
/// it has no partition table. Entries past the end of the image are dropped.
pub fn partition_table(export: &dyn Export) -> Result<Vec<Partition>, ExportError> {
    let size = export.size();
    if size < 1024 {
        return Ok(Vec::new());
    }
    let mut mbr = [0u8; 512];
    export.read(0, &mut mbr)?;
    if mbr[510..512] != [0x55, 0xAA] {
        return Ok(Vec::new());
    }
    let entries: Vec<&[u8]> = mbr[446..510].chunks_exact(16).collect();
    let le32 = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let le64 = |b: &[u8]| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    // A boot indicator other than 0 or 0x80 means a boot sector, not a partition table.
    if entries.iter().any(|e| e[0] != 0 && e[0] != 0x80) {
        return Ok(Vec::new());
    }
    let within = |p: &Partition| {
        p.length > 0
            && p.offset
                .checked_add(p.length)
                .is_some_and(|end| end <= size)
    };
    if entries.iter().any(|e| e[4] == 0xEE) {
        let mut header = [0u8; 512];
        export.read(512, &mut header)?;
        if &header[..8] != b"EFI PART" {
            return Ok(Vec::new());
        }
        let first = le64(&header[72..80]);
        let count = u64::from(le32(&header[80..84])).min(MAX_GPT_ENTRIES);
        let entry_size = u64::from(le32(&header[84..88]));
        if !(128..=4096).contains(&entry_size) {
            return Ok(Vec::new());
        }
        let Some(table_len) = count.checked_mul(entry_size) else {
            return Ok(Vec::new());
        };
        let Some(start) = first
            .checked_mul(512)
            .filter(|s| s.saturating_add(table_len) <= size)
        else {
            return Ok(Vec::new());
        };
        let mut table = vec![0u8; table_len as usize];
        export.read(start, &mut table)?;
        let mut out = Vec::new();
        for (i, entry) in table.chunks_exact(entry_size as usize).enumerate() {
            if entry[..16].iter().all(|b| *b == 0) {
                continue;
            }
            let (first_lba, last_lba) = (le64(&entry[32..40]), le64(&entry[40..48]));
            if last_lba < first_lba {
                continue;
            }
            let partition = Partition {
                number: i as u32 + 1,
                offset: first_lba.saturating_mul(512),
                length: (last_lba - first_lba + 1).saturating_mul(512),
            };
            if within(&partition) {
                out.push(partition);
            }
        }
        return Ok(out);
    }
    Ok(entries
        .iter()
        .enumerate()
        // 0: unused; 0x05, 0x0F, 0x85: extended partitions (containers, not filesystems).
        .filter(|(_, e)| ![0x00, 0x05, 0x0F, 0x85].contains(&e[4]))
        .map(|(i, e)| Partition {
            number: i as u32 + 1,
            offset: u64::from(le32(&e[8..12])) * 512,
            length: u64::from(le32(&e[12..16])) * 512,
        })
        .filter(within)
        .collect())
}

/// A read-only loop device over `partition` of `device` (`losetup --offset --sizelimit`).
fn bind_partition(device: &Path, partition: &Partition) -> Result<PathBuf, MountError> {
    let out = Command::new("losetup")
        .args(["--find", "--show", "--read-only", "--offset"])
        .arg(partition.offset.to_string())
        .arg("--sizelimit")
        .arg(partition.length.to_string())
        .arg(device)
        .output()
        .map_err(io_err("running losetup (util-linux); install util-linux"))?;
    let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || name.is_empty() {
        return Err(MountError::Io {
            what: format!(
                "binding a loop device to partition {} of {}",
                partition.number,
                device.display()
            ),
            source: io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        });
    }
    Ok(PathBuf::from(name))
}

/// Detach the partitions' loop devices, newest first, each taken off the list once gone.
fn unbind_partitions(devices: &mut Vec<PathBuf>) -> Result<(), MountError> {
    while let Some(device) = devices.last() {
        let mut tries = 0;
        loop {
            let out = Command::new("losetup")
                .arg("--detach")
                .arg(device)
                .output()
                .map_err(io_err("running losetup (util-linux)"))?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            // Gone already (a rerun after a crash): nothing to do.
            if out.status.success() || stderr.contains("No such device") {
                break;
            }
            if tries >= 50 {
                return Err(MountError::Io {
                    what: format!("detaching {}", device.display()),
                    source: io::Error::other(stderr.trim().to_string()),
                });
            }
            tries += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        devices.pop();
    }
    Ok(())
}

/// The filesystem type on `device` (blkid's low-level probe), `None` when it finds none.
fn probe(device: &Path) -> Result<Option<String>, MountError> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE"])
        .arg(device)
        .output()
        .map_err(io_err(
            "running blkid (util-linux) to find the filesystem type; install util-linux",
        ))?;
    let fstype = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok((out.status.success() && !fstype.is_empty()).then_some(fstype))
}

fn read_record(path: &Path) -> Result<MountRecord, MountError> {
    let bytes = fs::read(path).map_err(io_err(format!("reading {}", path.display())))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        io_err(format!(
            "{} is not a mount record; remove it",
            path.display()
        ))(io::Error::other(e))
    })
}

/// Remove what a dead server left of a mount: filesystems, loop device, FUSE mount, record.
fn cleanup(record: &MountRecord, record_path: &Path) -> Result<(), MountError> {
    let mut mounts = record.mounts.clone();
    unmount_filesystems(&mut mounts)?;
    unbind_partitions(&mut record.partition_devices.clone())?;
    cleanup_stale(&record.attachment)?;
    match fs::remove_file(record_path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(io_err(format!("removing {}", record_path.display()))(e))
        }
        _ => Ok(()),
    }
}

/// `tidemark umount DIR`: unmount the point's filesystems, then have the serving process
/// detach and exit (SIGTERM, waiting for it), or clean up after it if it died. Returns the
/// record of what was unmounted.
pub fn umount(state_dir: &Path, dir: &Path) -> Result<MountRecord, MountError> {
    let dir = target_dir(dir)?;
    let path = record_path(state_dir, &dir);
    if !path.exists() {
        return Err(MountError::Target {
            dir,
            why: format!(
                "no restore point is mounted here by tidemark (no record {}); for other \
                 mounts use umount(8)",
                path.display()
            ),
        });
    }
    let record = read_record(&path)?;
    let mut mounts = record.mounts.clone();
    unmount_filesystems(&mut mounts)?;
    if !pid_alive(record.pid) {
        cleanup(&record, &path)?;
        return Ok(record);
    }
    if let Some(pid) = rustix::process::Pid::from_raw(record.pid as i32) {
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .map_err(|e| io_err(format!("signalling the server (pid {})", record.pid))(e.into()))?;
    }
    let deadline = Instant::now() + SERVER_EXIT_LIMIT;
    // It removes the record once detached, then exits.
    while pid_alive(record.pid) {
        if Instant::now() > deadline {
            return Err(MountError::Target {
                dir,
                why: format!(
                    "the serving process (pid {}) did not detach within {SERVER_EXIT_LIMIT:?}; \
                     see its log in {}",
                    record.pid,
                    records_dir(state_dir).display()
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if path.exists() {
        // It died without removing the record.
        cleanup(&record, &path)?;
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_nbd::file::FileExport;

    fn image(bytes: &[(u64, &[u8])], size: u64) -> (tempfile::NamedTempFile, FileExport) {
        use std::os::unix::fs::FileExt;
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(size).unwrap();
        for (at, data) in bytes {
            file.as_file().write_all_at(data, *at).unwrap();
        }
        let export = FileExport::open(file.path(), true).unwrap();
        (file, export)
    }

    fn mbr(entries: &[(u8, u32, u32)]) -> Vec<u8> {
        let mut mbr = vec![0u8; 512];
        for (i, (kind, start, sectors)) in entries.iter().enumerate() {
            let e = &mut mbr[446 + 16 * i..462 + 16 * i];
            e[4] = *kind;
            e[8..12].copy_from_slice(&start.to_le_bytes());
            e[12..16].copy_from_slice(&sectors.to_le_bytes());
        }
        mbr[510] = 0x55;
        mbr[511] = 0xAA;
        mbr
    }

    #[test]
    fn mbr_primary_partitions_are_found_and_extended_ones_skipped() {
        let table = mbr(&[(0x83, 2048, 4096), (0x05, 8192, 100), (0x83, 6144, 2048)]);
        let (_file, export) = image(&[(0, &table)], 8 << 20);
        let found = partition_table(&export).unwrap();
        assert_eq!(
            found,
            [
                Partition {
                    number: 1,
                    offset: 1 << 20,
                    length: 2 << 20
                },
                Partition {
                    number: 3,
                    offset: 3 << 20,
                    length: 1 << 20
                },
            ]
        );
    }

    #[test]
    fn gpt_partitions_are_found_behind_a_protective_mbr() {
        let protective = mbr(&[(0xEE, 1, 16383)]);
        let mut header = vec![0u8; 512];
        header[..8].copy_from_slice(b"EFI PART");
        header[72..80].copy_from_slice(&2u64.to_le_bytes());
        header[80..84].copy_from_slice(&128u32.to_le_bytes());
        header[84..88].copy_from_slice(&128u32.to_le_bytes());
        let mut entries = vec![0u8; 128 * 128];
        let second = &mut entries[128..256];
        second[..16].copy_from_slice(&[7; 16]);
        second[32..40].copy_from_slice(&2048u64.to_le_bytes());
        second[40..48].copy_from_slice(&4095u64.to_le_bytes());
        let (_file, export) = image(
            &[(0, &protective), (512, &header), (1024, &entries)],
            8 << 20,
        );
        assert_eq!(
            partition_table(&export).unwrap(),
            [Partition {
                number: 2,
                offset: 1 << 20,
                length: 1 << 20
            }]
        );
    }

    #[test]
    fn a_filesystem_or_a_bogus_table_has_no_partitions() {
        let (_file, export) = image(&[], 4 << 20);
        assert!(partition_table(&export).unwrap().is_empty());
        // Past the end of the image, and a boot sector's boot indicator.
        let beyond = mbr(&[(0x83, 2048, u32::MAX)]);
        let (_file, export) = image(&[(0, &beyond)], 4 << 20);
        assert!(partition_table(&export).unwrap().is_empty());
        let mut boot = mbr(&[(0x83, 2048, 100)]);
        boot[446] = 0x12;
        let (_file, export) = image(&[(0, &boot)], 4 << 20);
        assert!(partition_table(&export).unwrap().is_empty());
        // A GPT header with an absurd entry size or table past the end.
        let protective = mbr(&[(0xEE, 1, 100)]);
        let mut header = vec![0u8; 512];
        header[..8].copy_from_slice(b"EFI PART");
        header[72..80].copy_from_slice(&u64::MAX.to_le_bytes());
        header[80..84].copy_from_slice(&u32::MAX.to_le_bytes());
        header[84..88].copy_from_slice(&128u32.to_le_bytes());
        let (_file, export) = image(&[(0, &protective), (512, &header)], 4 << 20);
        assert!(partition_table(&export).unwrap().is_empty());
    }

    #[test]
    fn records_are_named_for_their_directory_without_slashes() {
        let path = record_path(Path::new("/state"), Path::new("/mnt/a%b/c"));
        assert_eq!(path, Path::new("/state/mounts/%2Fmnt%2Fa%25b%2Fc.json"));
    }

    #[test]
    fn umount_of_a_directory_tidemark_did_not_mount_says_so() {
        let state = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let err = umount(state.path(), dir.path()).unwrap_err().to_string();
        assert!(err.contains("no restore point is mounted here"), "{err}");
    }

    #[test]
    fn mount_on_a_missing_directory_is_refused_before_anything_is_attached() {
        let state = tempfile::tempdir().unwrap();
        let err = PointMount::mount(
            state.path(),
            Path::new("/nonexistent/base.img"),
            &[],
            Path::new("/nonexistent/dir"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("create the directory first"), "{err}");
    }
}
