//! FUSE + loop: a FUSE filesystem holding one regular file, `volume`, whose bytes are the
//! export's, and a loop device over that file.
//!
//! The FUSE side is tuned for a block device above it: 1 MiB writes and readahead
//! (FUSE_MAX_PAGES), FOPEN_DIRECT_IO so the kernel keeps no second page cache of the
//! volume, asynchronous direct I/O, and a pool of worker threads: the session thread only
//! reads requests off /dev/fuse and hands them to the pool, so reads and writes overlap.
//! The export blocks on O_DIRECT I/O to its backing store, so the number of workers, not
//! of CPUs, bounds the requests in flight: there are as many as the kernel queues
//! (`max_background`), and a queue-depth-32 load reaches the disk as 32 requests.
//! Request data lives in 4 KiB-aligned buffers from a [`BufPool`] (taken per request,
//! returned on reply), so the export's O_DIRECT path uses them as they are: no allocation,
//! no zero-filling and no bounce copy per request.
//!
//! What the kernel does not let us change: a 1 MiB O_DIRECT request on the loop device
//! from user memory spans 256 pages, and the loop queue takes 128 segments (the block
//! layer's default), so it reaches FUSE as two 512 KiB requests.
//! The loop device is configured in one step (LOOP_CONFIGURE) with direct I/O and a
//! 4 KiB logical block size, read-only when the attachment is.
//!
//! How block requests arrive: the loop driver turns FLUSH into fsync (-> [`Export::flush`]),
//! DISCARD and WRITE_ZEROES into fallocate PUNCH_HOLE (-> write-zeroes that may punch, as a
//! punched range of a file must read back as zeroes, which a volume's trim does not
//! promise) and ZERO_RANGE (-> write-zeroes that keeps the range allocated).
//!
//! The FUSE server never touches its own mount: only the attaching thread opens the file,
//! to hand it to the loop driver, while the session thread is already serving.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use fuser::consts::{FOPEN_DIRECT_IO, FUSE_ASYNC_DIO};
use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, MountOption, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, Session,
    SessionUnmounter,
};
use rustix::mount::UnmountFlags;
use tidemark_nbd::export::{Errno, Export, ExportError, ZeroFlags};

use tidemark_engine::io::{BufPool, IoBuf};

use super::{claim, now_secs, sys, AttachError, Attached, Attachment, Counted, FrontEnd};
use super::{IoCounters, Resources, Via};

/// The one file of the filesystem.
pub const FILE_NAME: &str = "volume";
const ROOT_INO: u64 = 1;
const FILE_INO: u64 = 2;
/// The largest FUSE write (and read) request asked of the kernel.
const MAX_REQUEST: u32 = 1 << 20;
/// Attributes never change while mounted: let the kernel cache them.
const TTL: Duration = Duration::from_secs(3600);
/// The loop device's logical block size.
const LOOP_BLOCK_SIZE: u32 = 4096;
/// FUSE requests the kernel keeps in flight (`max_background`), and so the worker threads
/// serving them: each blocks on one export call.
const IN_FLIGHT: u16 = 64;

/// The FUSE + loop front end.
#[derive(Debug, Clone)]
pub struct FuseLoop {
    /// Where the FUSE mounts go, one directory per attachment (e.g. `<state-dir>/attach`).
    pub runtime_dir: PathBuf,
    /// Threads serving FUSE requests of one attachment.
    pub workers: usize,
}

impl FuseLoop {
    /// A front end mounting under `runtime_dir` with a worker per request the kernel keeps
    /// in flight.
    pub fn new(runtime_dir: impl Into<PathBuf>) -> FuseLoop {
        FuseLoop {
            runtime_dir: runtime_dir.into(),
            workers: IN_FLIGHT.into(),
        }
    }
}

/// Where a volume's FUSE mount goes: its name with `/` made safe.
fn mount_dir(runtime_dir: &Path, volume: &str) -> PathBuf {
    runtime_dir.join(volume.replace('/', "_"))
}

fn to_errno(err: &ExportError) -> i32 {
    match err.errno {
        Errno::Perm => libc::EPERM,
        Errno::NoMem => libc::ENOMEM,
        Errno::Inval => libc::EINVAL,
        Errno::NoSpc => libc::ENOSPC,
        Errno::Overflow => libc::EOVERFLOW,
        Errno::NotSup => libc::EOPNOTSUPP,
        Errno::Shutdown => libc::ESHUTDOWN,
        Errno::Io => libc::EIO,
    }
}

/// The bytes of one request: an aligned pool buffer, or (all taken, or a request larger
/// than a pool buffer) a heap one, which the export bounces through its own.
enum Buffer {
    Pooled(IoBuf),
    Heap(Vec<u8>),
}

impl Buffer {
    /// A buffer of `len` bytes with unspecified contents.
    fn take(pool: &BufPool, len: usize) -> Buffer {
        match pool.take() {
            Some(mut buf) if len <= buf.capacity() => {
                buf.set_len(len);
                Buffer::Pooled(buf)
            }
            _ => Buffer::Heap(vec![0; len]),
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Buffer::Pooled(buf) => buf.as_slice(),
            Buffer::Heap(buf) => buf,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            Buffer::Pooled(buf) => buf.as_mut_slice(),
            Buffer::Heap(buf) => buf,
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Worker threads that run export calls and send their replies.
struct Pool {
    jobs: Option<mpsc::Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    fn new(threads: usize, name: &str) -> io::Result<Pool> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let workers = (0..threads.max(1))
            .map(|i| {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("fuse-{name}-{i}"))
                    .spawn(move || loop {
                        let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        match job {
                            Ok(job) => job(),
                            Err(mpsc::RecvError) => return,
                        }
                    })
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Pool {
            jobs: Some(tx),
            workers,
        })
    }

    fn run(&self, job: impl FnOnce() + Send + 'static) {
        if let Some(jobs) = &self.jobs {
            // The workers outlive the sender (joined in drop), so this cannot fail.
            let _ = jobs.send(Box::new(job));
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.jobs = None;
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// The FUSE filesystem: a root directory and the file `volume`.
struct VolumeFs {
    export: Arc<Counted>,
    pool: Pool,
    buffers: BufPool,
    uid: u32,
    gid: u32,
    since: SystemTime,
}

impl VolumeFs {
    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, size, perm, nlink) = match ino {
            ROOT_INO => (FileType::Directory, 0, 0o700, 2),
            FILE_INO => {
                let perm = if self.export.read_only() {
                    0o400
                } else {
                    0o600
                };
                (FileType::RegularFile, self.export.size(), perm, 1)
            }
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.since,
            mtime: self.since,
            ctime: self.since,
            crtime: self.since,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: MAX_REQUEST,
            flags: 0,
        })
    }

    /// The request range clipped to the file, or the errno for one that starts past it.
    fn clip(&self, offset: i64, len: u64) -> Result<(u64, u64), i32> {
        let offset = u64::try_from(offset).map_err(|_| libc::EINVAL)?;
        let size = self.export.size();
        if offset > size {
            return Err(libc::EINVAL);
        }
        Ok((offset, len.min(size - offset)))
    }
}

impl Filesystem for VolumeFs {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), i32> {
        // Each of these is a wish: a kernel that refuses keeps its own limit.
        let _ = config.set_max_write(MAX_REQUEST);
        if let Err(nearest) = config.set_max_readahead(MAX_REQUEST) {
            let _ = config.set_max_readahead(nearest);
        }
        let _ = config.add_capabilities(FUSE_ASYNC_DIO);
        let _ = config.set_max_background(IN_FLIGHT);
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        match self.attr(FILE_INO) {
            Some(attr) if parent == ROOT_INO && name == FILE_NAME => reply.entry(&TTL, &attr, 0),
            _ => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(libc::ENOENT),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        // A volume's size is fixed; everything else about the file is not ours to change.
        match self.attr(ino) {
            Some(attr) if size.is_none_or(|s| s == attr.size) => reply.attr(&TTL, &attr),
            Some(_) => reply.error(libc::EPERM),
            None => reply.error(libc::ENOENT),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        if ino != FILE_INO {
            return reply.error(libc::EISDIR);
        }
        if flags & libc::O_ACCMODE != libc::O_RDONLY && self.export.read_only() {
            return reply.error(libc::EROFS);
        }
        reply.opened(0, FOPEN_DIRECT_IO);
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let (offset, len) = match self.clip(offset, size.into()) {
            Ok(range) => range,
            Err(errno) => return reply.error(errno),
        };
        let export = self.export.clone();
        let mut buf = Buffer::take(&self.buffers, len as usize);
        self.pool
            .run(move || match export.read(offset, buf.as_mut_slice()) {
                Ok(()) => reply.data(buf.as_slice()),
                Err(err) => reply.error(to_errno(&err)),
            });
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        if self.export.read_only() {
            return reply.error(libc::EROFS);
        }
        let offset = match self.clip(offset, data.len() as u64) {
            Ok((offset, len)) if len == data.len() as u64 => offset,
            // A volume does not grow.
            Ok(_) => return reply.error(libc::ENOSPC),
            Err(errno) => return reply.error(errno),
        };
        let fua = flags & (libc::O_SYNC | libc::O_DSYNC) != 0;
        let export = self.export.clone();
        let mut buf = Buffer::take(&self.buffers, data.len());
        buf.as_mut_slice().copy_from_slice(data);
        self.pool
            .run(move || match export.write(offset, buf.as_slice(), fua) {
                Ok(()) => reply.written(buf.as_slice().len() as u32),
                Err(err) => reply.error(to_errno(&err)),
            });
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _owner: u64, reply: ReplyEmpty) {
        self.fsync(_req, FILE_INO, 0, false, reply);
    }

    fn fsync(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _data: bool, reply: ReplyEmpty) {
        let export = self.export.clone();
        self.pool.run(move || match export.flush() {
            Ok(()) => reply.ok(),
            Err(err) => reply.error(to_errno(&err)),
        });
    }

    fn fallocate(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let Ok(length) = u64::try_from(length) else {
            return reply.error(libc::EINVAL);
        };
        let (offset, len) = match self.clip(offset, length) {
            Ok(range) => range,
            Err(errno) => return reply.error(errno),
        };
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        let no_hole = match mode {
            // Plain allocation of a range inside the file: a volume is fully there.
            0 | libc::FALLOC_FL_KEEP_SIZE if len == length => return reply.ok(),
            m if m == libc::FALLOC_FL_PUNCH_HOLE | keep => false,
            m if m == libc::FALLOC_FL_ZERO_RANGE || m == libc::FALLOC_FL_ZERO_RANGE | keep => true,
            _ => return reply.error(libc::EOPNOTSUPP),
        };
        if self.export.read_only() {
            return reply.error(libc::EROFS);
        }
        let flags = ZeroFlags {
            fua: false,
            no_hole,
            fast: false,
        };
        let export = self.export.clone();
        self.pool
            .run(move || match export.write_zeroes(offset, len, flags) {
                Ok(()) => reply.ok(),
                Err(err) => reply.error(to_errno(&err)),
            });
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT_INO {
            return reply.error(libc::ENOTDIR);
        }
        let entries = [
            (ROOT_INO, FileType::Directory, "."),
            (ROOT_INO, FileType::Directory, ".."),
            (FILE_INO, FileType::RegularFile, FILE_NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(*ino, i as i64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// A FUSE + loop attachment served by this process.
pub struct FuseAttachment {
    record: Attachment,
    mount: PathBuf,
    counters: Arc<IoCounters>,
    unmounter: SessionUnmounter,
    session: Option<JoinHandle<io::Result<()>>>,
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
        if let Err(err) = OpenOptions::new().read(true).write(true).open("/dev/fuse") {
            return Err(AttachError::FuseMissing(err));
        }
        let mount = mount_dir(&self.runtime_dir, volume);
        fs::create_dir_all(&mount)
            .map_err(|e| AttachError::io(format!("cannot create {}", mount.display()), e))?;
        let owner = fs::metadata(&mount)
            .map_err(|e| AttachError::io(format!("cannot stat {}", mount.display()), e))?;
        let export = Arc::new(Counted::new(export, read_only));
        let read_only = export.read_only();
        let counters = export.counters();
        let fs = VolumeFs {
            export,
            pool: Pool::new(self.workers, volume)
                .map_err(|e| AttachError::io("cannot start FUSE workers", e))?,
            // One buffer per worker; the mapping is paged in only as buffers are used.
            buffers: BufPool::new(MAX_REQUEST as usize, self.workers.max(1)).map_err(|e| {
                AttachError::io("cannot map FUSE request buffers", io::Error::other(e))
            })?,
            uid: owner.uid(),
            gid: owner.gid(),
            since: SystemTime::now(),
        };
        let mut options = vec![
            MountOption::FSName(format!("tidemark:{volume}")),
            MountOption::Subtype("tidemark".into()),
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
            MountOption::NoAtime,
        ];
        if read_only {
            options.push(MountOption::RO);
        }
        let mut session = Session::new(fs, &mount, &options)
            .map_err(|e| AttachError::io(format!("cannot mount FUSE at {}", mount.display()), e))?;
        let unmounter = session.unmount_callable();
        let serving = std::thread::Builder::new()
            .name(format!("fuse-{volume}"))
            .spawn(move || session.run())
            .map_err(|e| AttachError::io("cannot start the FUSE session", e))?;
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
            unmounter,
            session: Some(serving),
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
        unmount_patiently(&mount)?;
        // The mount is gone: this only releases fuser's handle of it.
        let _ = self.unmounter.unmount();
        if let Some(session) = self.session.take() {
            match session.join() {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::warn!("FUSE session of {}: {err}", mount.display()),
                Err(_) => tracing::error!("FUSE session of {} panicked", mount.display()),
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
        if self.session.is_none() {
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
/// reference to the file asynchronously), then detach it lazily.
fn unmount_patiently(mount: &Path) -> Result<(), AttachError> {
    for _ in 0..50 {
        match rustix::mount::unmount(mount, UnmountFlags::empty()) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::BUSY) => std::thread::sleep(Duration::from_millis(20)),
            // Not mounted (any more).
            Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => return Ok(()),
            Err(e) => {
                let what = format!("cannot unmount {}", mount.display());
                return Err(AttachError::io(what, e.into()));
            }
        }
    }
    rustix::mount::unmount(mount, UnmountFlags::DETACH)
        .map_err(|e| AttachError::io(format!("cannot unmount {}", mount.display()), e.into()))
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
