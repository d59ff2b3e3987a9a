//! FUSE + loop: a FUSE filesystem holding one regular file, `volume`, whose bytes are the
//! export's, and a loop device over that file.
//!
//! The FUSE side is this module's own: it mounts with mount(2) on a `/dev/fuse`
//! descriptor (no libfuse, no fusermount: attaching needs root, as the loop device does)
//! and serves requests with [`fuse_server`](super::fuse_server): reader threads, each on
//! its own cloned descriptor and aligned buffer, call the export straight from and into
//! that buffer (its O_DIRECT path: no copy in user space, no hand-off between threads).
//! Tuned for a block device above it: 1 MiB requests and readahead (`max_pages` 256),
//! FOPEN_DIRECT_IO so the kernel keeps no second page cache of the volume,
//! FOPEN_PARALLEL_DIRECT_WRITES so writes do not queue on the inode lock, asynchronous
//! direct I/O, and as many requests queued in the kernel (`max_background`) as there are
//! readers.
//!
//! What the kernel does not let us change: the loop queue takes 128 segments of at most
//! 64 KiB (`max_segments`, `max_segment_size`; `max_sectors_kb` is 1280), so a 1 MiB
//! O_DIRECT request from user memory in 4 KiB pages (256 segments) reaches FUSE as two
//! 512 KiB requests; only physically contiguous user buffers (huge pages) come whole.
//! The loop device is configured in one step (LOOP_CONFIGURE) with direct I/O and a
//! 4 KiB logical block size, read-only when the attachment is.
//!
//! How block requests arrive: the loop driver turns FLUSH into fsync (-> [`Export::flush`]),
//! DISCARD and WRITE_ZEROES into fallocate PUNCH_HOLE (-> write-zeroes that may punch, as a
//! punched range of a file must read back as zeroes, which a volume's trim does not
//! promise) and ZERO_RANGE (-> write-zeroes that keeps the range allocated).
//!
//! The FUSE server never touches its own mount: only the attaching thread opens the file,
//! to hand it to the loop driver, while the readers are already serving.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustix::mount::{MountFlags, UnmountFlags};
use tidemark_nbd::export::Export;

use super::fuse_server::{Server, VolumeFs};
use super::{claim, now_secs, sys, AttachError, Attached, Attachment, Counted, FrontEnd};
use super::{IoCounters, Resources, Via};

pub use super::fuse_server::FILE_NAME;

/// The loop device's logical block size.
const LOOP_BLOCK_SIZE: u32 = 4096;
/// Reader threads per attachment, and so FUSE requests in flight (`max_background`): each
/// blocks on one export call, so a queue depth of 32 at the device reaches the disk as 32.
const READERS: u16 = 32;

/// The FUSE + loop front end.
#[derive(Debug, Clone)]
pub struct FuseLoop {
    /// Where the FUSE mounts go, one directory per attachment (e.g. `<state-dir>/attach`).
    pub runtime_dir: PathBuf,
    /// Threads serving FUSE requests of one attachment (at most 65535).
    pub readers: usize,
}

impl FuseLoop {
    /// A front end mounting under `runtime_dir` with [`READERS`] reader threads.
    pub fn new(runtime_dir: impl Into<PathBuf>) -> FuseLoop {
        FuseLoop {
            runtime_dir: runtime_dir.into(),
            readers: READERS.into(),
        }
    }
}

/// Where a volume's FUSE mount goes: its name with `/` made safe.
fn mount_dir(runtime_dir: &Path, volume: &str) -> PathBuf {
    runtime_dir.join(volume.replace('/', "_"))
}

/// Mount a FUSE filesystem at `mount` on a new `/dev/fuse` descriptor, returned. Its
/// inodes belong to `uid`:`gid`; the kernel sends INIT as soon as this returns.
fn mount_fuse(
    mount: &Path,
    volume: &str,
    uid: u32,
    gid: u32,
    read_only: bool,
) -> Result<File, AttachError> {
    let device = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/fuse")
        .map_err(AttachError::FuseMissing)?;
    let options = format!(
        "fd={},rootmode={:o},user_id={uid},group_id={gid}",
        device.as_raw_fd(),
        libc::S_IFDIR
    );
    let options =
        CString::new(options).map_err(|e| AttachError::io("FUSE mount options", e.into()))?;
    let mut flags =
        MountFlags::NODEV | MountFlags::NOSUID | MountFlags::NOEXEC | MountFlags::NOATIME;
    if read_only {
        flags |= MountFlags::RDONLY;
    }
    rustix::mount::mount(
        format!("tidemark:{volume}").as_str(),
        mount,
        "fuse.tidemark",
        flags,
        options.as_c_str(),
    )
    .map_err(|e| {
        let what = match e {
            rustix::io::Errno::PERM => format!(
                "cannot mount FUSE at {} (attaching needs root: run the daemon as root)",
                mount.display()
            ),
            _ => format!("cannot mount FUSE at {}", mount.display()),
        };
        AttachError::io(what, e.into())
    })?;
    Ok(device)
}

/// A FUSE + loop attachment served by this process.
pub struct FuseAttachment {
    record: Attachment,
    mount: PathBuf,
    counters: Arc<IoCounters>,
    /// The readers; `None` once detached.
    server: Option<Server>,
}

impl std::fmt::Debug for FuseAttachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseAttachment")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

impl FrontEnd for FuseLoop {
    fn via(&self) -> Via {
        Via::Fuse
    }

    fn attach(
        &self,
        volume: &str,
        export: Arc<dyn Export>,
        read_only: bool,
    ) -> Result<Box<dyn Attached>, AttachError> {
        let mount = mount_dir(&self.runtime_dir, volume);
        fs::create_dir_all(&mount)
            .map_err(|e| AttachError::io(format!("cannot create {}", mount.display()), e))?;
        let owner = fs::metadata(&mount)
            .map_err(|e| AttachError::io(format!("cannot stat {}", mount.display()), e))?;
        let export = Arc::new(Counted::new(export, read_only));
        let read_only = export.read_only();
        let counters = export.counters();
        let readers = self.readers.clamp(1, u16::MAX.into());
        let fs = VolumeFs::new(export, owner.uid(), owner.gid(), readers as u16);
        let device = mount_fuse(&mount, volume, owner.uid(), owner.gid(), read_only)?;
        let server = match Server::start(device, fs, readers, volume) {
            Ok(server) => server,
            Err(err) => {
                // Unmounting ends the connection, and with it any reader already started.
                let _ = rustix::mount::unmount(&mount, UnmountFlags::DETACH);
                let _ = fs::remove_dir(&mount);
                return Err(AttachError::io("cannot start the FUSE readers", err));
            }
        };
        let mut attachment = FuseAttachment {
            record: Attachment {
                volume: volume.to_string(),
                device: PathBuf::new(),
                read_only,
                since: now_secs(),
                pid: std::process::id(),
                resources: Resources::Fuse {
                    mount: mount.clone(),
                },
                io: Default::default(),
            },
            mount,
            counters,
            server: Some(server),
        };
        match attachment.bind_loop() {
            Ok(device) => {
                attachment.record.device = device;
                Ok(Box::new(attachment))
            }
            Err(err) => {
                if let Err(undo) = attachment.unmount() {
                    tracing::warn!("undoing a failed attach of {volume}: {undo}");
                }
                Err(err)
            }
        }
    }
}

impl FuseAttachment {
    /// Open the volume file on the mount and put a free loop device over it.
    fn bind_loop(&self) -> Result<PathBuf, AttachError> {
        let path = self.mount.join(FILE_NAME);
        let backing = OpenOptions::new()
            .read(true)
            .write(!self.record.read_only)
            .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| AttachError::io(format!("cannot open {}", path.display()), e))?;
        let mut flags = sys::LO_FLAGS_DIRECT_IO;
        if self.record.read_only {
            flags |= sys::LO_FLAGS_READ_ONLY;
        }
        let name = format!("tidemark:{}", self.record.volume);
        // Another program may take the free device between asking and binding: ask again.
        let mut tries = 0;
        loop {
            let device = sys::free_loop_device()
                .map_err(|e| AttachError::io("cannot get a free loop device", e))?;
            let opened = OpenOptions::new()
                .read(true)
                .write(!self.record.read_only)
                .custom_flags(libc::O_CLOEXEC)
                .open(&device)
                .map_err(|e| AttachError::io(format!("cannot open {}", device.display()), e))?;
            match sys::configure_loop(&opened, &backing, LOOP_BLOCK_SIZE, flags, &name) {
                Ok(()) => return Ok(device),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 8 => tries += 1,
                Err(e) => {
                    let what = format!("cannot bind {} to {}", device.display(), path.display());
                    return Err(AttachError::io(what, e));
                }
            }
        }
    }

    /// Unmount the FUSE filesystem (waiting briefly for the loop driver to let go of the
    /// file, lazily after that) and stop serving it.
    fn unmount(&mut self) -> Result<(), AttachError> {
        let mount = self.mount.clone();
        let clean = unmount_patiently(&mount)?;
        if let Some(server) = self.server.take() {
            if clean {
                // The connection ended with the mount: the readers are stopping.
                server.join();
            } else {
                // They stop when the kernel lets go of the lazily detached mount.
                tracing::warn!(
                    "{} was busy and is detached lazily; its FUSE readers stop when it is released",
                    mount.display()
                );
            }
        }
        let _ = fs::remove_dir(&mount);
        Ok(())
    }
}

impl Attached for FuseAttachment {
    fn record(&self) -> Attachment {
        Attachment {
            io: self.counters.snapshot(),
            ..self.record.clone()
        }
    }

    fn detach(&mut self) -> Result<(), AttachError> {
        if self.server.is_none() {
            return Ok(());
        }
        let device = &self.record.device;
        let claimed = claim(device)?;
        sys::clear_loop(&claimed)
            .map_err(|e| AttachError::io(format!("cannot detach {}", device.display()), e))?;
        // The loop driver lets go of the file when this last opener closes.
        drop(claimed);
        self.unmount()
    }
}

/// Unmount `mount`, retrying for a second while it is busy (the loop driver drops its
/// reference to the file asynchronously), then detach it lazily. True when it is gone
/// at once, false when it was detached lazily.
fn unmount_patiently(mount: &Path) -> Result<bool, AttachError> {
    for _ in 0..50 {
        match rustix::mount::unmount(mount, UnmountFlags::empty()) {
            Ok(()) => return Ok(true),
            Err(rustix::io::Errno::BUSY) => std::thread::sleep(Duration::from_millis(20)),
            // Not mounted (any more).
            Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => return Ok(true),
            Err(e) => {
                let what = format!("cannot unmount {}", mount.display());
                return Err(AttachError::io(what, e.into()));
            }
        }
    }
    rustix::mount::unmount(mount, UnmountFlags::DETACH)
        .map_err(|e| AttachError::io(format!("cannot unmount {}", mount.display()), e.into()))?;
    Ok(false)
}

/// Remove what a crashed process left of a FUSE attachment: unbind its loop device (at
/// once if nothing uses it, else the kernel does it when the filesystem above is
/// unmounted), lazily unmount the FUSE mount and remove its directory. Safe to repeat;
/// a loop device that now serves some other file is left alone.
pub fn cleanup_stale(record: &Attachment) -> Result<(), AttachError> {
    let Resources::Fuse { mount } = &record.resources else {
        return Ok(());
    };
    if loop_backing_file(&record.device).is_some_and(|file| file.starts_with(mount)) {
        let device = File::open(&record.device)
            .map_err(|e| AttachError::io(format!("cannot open {}", record.device.display()), e))?;
        match sys::clear_loop(&device) {
            // ENXIO: already unbound.
            Err(e) if e.raw_os_error() != Some(libc::ENXIO) => {
                let what = format!("cannot detach {}", record.device.display());
                return Err(AttachError::io(what, e));
            }
            _ => {}
        }
    }
    match rustix::mount::unmount(mount, UnmountFlags::DETACH) {
        Ok(()) | Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => {}
        Err(e) => {
            let what = format!("cannot unmount {}", mount.display());
            return Err(AttachError::io(what, e.into()));
        }
    }
    let _ = fs::remove_dir(mount);
    Ok(())
}

/// The file a loop device is bound to, from sysfs; `None` when it is unbound.
pub fn loop_backing_file(device: &Path) -> Option<PathBuf> {
    let name = device.file_name()?.to_str()?;
    let text = fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    // The kernel appends " (deleted)" to a file removed since.
    let text = text.trim_end_matches('\n');
    Some(PathBuf::from(text.trim_end_matches(" (deleted)")))
}
