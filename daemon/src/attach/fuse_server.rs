//! The FUSE request loop of one attachment: a filesystem with a root directory and one
//! regular file, `volume`, whose bytes are the export's.
//!
//! Several reader threads serve it, each on its own `/dev/fuse` descriptor (cloned with
//! `FUSE_DEV_IOC_CLONE`, so each has its own kernel processing queue) and with its own
//! reused, 4 KiB-aligned buffer. A thread reads a request, calls the export, and answers,
//! then reads the next: as many requests are in flight as there are readers, and the
//! kernel keeps as many queued (`max_background`). Nothing is handed between threads and
//! nothing is copied in user space:
//!
//! ```text
//! reader buffer:  0 .. 4016 unused | 4016 .. 4096 request headers | 4096 .. 4096 + 1 MiB data
//! ```
//!
//! the request is read at offset 4016, so a WRITE's payload (which follows 80 bytes of
//! headers) lands on the 4 KiB boundary at 4096 and goes to the export's O_DIRECT path as
//! it is; a READ's data is read into the same aligned place and written back to the kernel
//! with the reply header in one `writev`. The buffers come from one [`BufPool`] (huge pages
//! where the kernel gives them, so a 1 MiB payload reaches the backing disk in few segments).
//!
//! Every request is parsed by [`super::fuse_abi`], which checks its lengths first;
//! requests the filesystem has no use for are answered ENOSYS.

use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::ops::Range;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tidemark_engine::io::{BufPool, IoBuf, ALIGN};
use tidemark_engine::sys::fusedev::clone_fuse_device;
use tidemark_nbd::export::{Errno, Export, ExportError, ZeroFlags};
use zerocopy::{FromBytes, IntoBytes};

use super::fuse_abi::{self as abi, Request};
use super::Counted;

/// The one file of the filesystem.
pub const FILE_NAME: &str = "volume";
const ROOT_INO: u64 = abi::ROOT_ID;
const FILE_INO: u64 = 2;
/// The largest FUSE read and write request asked of the kernel (`max_write`, and
/// `max_pages` of 4 KiB pages).
pub const MAX_REQUEST: u32 = 1 << 20;
/// Attributes never change while mounted: let the kernel cache them.
const TTL: Duration = Duration::from_secs(3600);
/// Where a WRITE's payload, and a READ's data, sit in a reader's buffer: aligned.
const DATA_AT: usize = ALIGN;
/// Where a request is read into a reader's buffer.
const REQUEST_AT: usize = DATA_AT - abi::WRITE_PAYLOAD_AT;
/// A reader's buffer: headers before the aligned data, the largest payload after it.
const BUFFER_SIZE: usize = DATA_AT + MAX_REQUEST as usize;

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

/// What a request is answered with.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// Nothing (FORGET, or bytes without a header to answer).
    Nothing,
    /// An error, as a positive errno.
    Error(i32),
    /// The reply body in the reader's small-reply buffer.
    Small,
    /// The reply body is this range of the reader's buffer (READ data).
    Data(Range<usize>),
}

/// The filesystem: the export, and what its two inodes look like.
pub struct VolumeFs {
    export: Arc<Counted>,
    uid: u32,
    gid: u32,
    since: SystemTime,
    /// Requests the kernel may queue, told it at INIT (`max_background`).
    in_flight: u16,
}

impl std::fmt::Debug for VolumeFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeFs")
            .field("export", &self.export)
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl VolumeFs {
    /// The filesystem over `export`, its inodes owned by `uid`:`gid`, telling the kernel
    /// to keep `in_flight` requests queued.
    pub fn new(export: Arc<Counted>, uid: u32, gid: u32, in_flight: u16) -> VolumeFs {
        VolumeFs {
            export,
            uid,
            gid,
            since: SystemTime::now(),
            in_flight,
        }
    }

    fn attr(&self, ino: u64) -> Option<abi::Attr> {
        let (mode, size, nlink) = match ino {
            ROOT_INO => (libc::S_IFDIR | 0o700, 0, 2),
            FILE_INO => {
                let perm = if self.export.read_only() {
                    0o400
                } else {
                    0o600
                };
                (libc::S_IFREG | perm, self.export.size(), 1)
            }
            _ => return None,
        };
        let since = self.since.duration_since(UNIX_EPOCH).unwrap_or_default();
        Some(abi::Attr {
            ino: ino.into(),
            size: size.into(),
            blocks: size.div_ceil(512).into(),
            atime: since.as_secs().into(),
            mtime: since.as_secs().into(),
            ctime: since.as_secs().into(),
            atimensec: since.subsec_nanos().into(),
            mtimensec: since.subsec_nanos().into(),
            ctimensec: since.subsec_nanos().into(),
            mode: mode.into(),
            nlink: nlink.into(),
            uid: self.uid.into(),
            gid: self.gid.into(),
            rdev: 0.into(),
            blksize: MAX_REQUEST.into(),
            flags: 0.into(),
        })
    }

    /// The request range clipped to the file, or the errno for one that starts past it.
    fn clip(&self, offset: u64, len: u64) -> Result<(u64, u64), i32> {
        let size = self.export.size();
        if offset > size {
            return Err(libc::EINVAL);
        }
        Ok((offset, len.min(size - offset)))
    }

    /// Answer the request of `n` bytes at [`REQUEST_AT`] of `buf` (a reader's buffer);
    /// small reply bodies go to `out`. Returns the request's `unique` and the answer.
    fn handle(&self, buf: &mut [u8], n: usize, out: &mut Vec<u8>) -> (u64, Answer) {
        let Some(bytes) = buf.get(REQUEST_AT..REQUEST_AT + n) else {
            return (0, Answer::Nothing);
        };
        let Ok((raw, _)) = abi::InHeader::read_from_prefix(bytes) else {
            tracing::warn!("FUSE: a {n}-byte request without a header, ignored");
            return (0, Answer::Nothing);
        };
        let unique = raw.unique.get();
        let request = match abi::header(bytes).and_then(|header| abi::parse(&header, bytes)) {
            Ok(request) => request,
            Err(err) => {
                tracing::warn!("FUSE: {err}");
                return (unique, Answer::Error(err.errno()));
            }
        };
        let answer = match self.answer(raw.nodeid.get(), request, buf, out) {
            Ok(answer) => answer,
            Err(errno) => Answer::Error(errno),
        };
        (unique, answer)
    }

    fn answer(
        &self,
        node: u64,
        request: Request,
        buf: &mut [u8],
        out: &mut Vec<u8>,
    ) -> Result<Answer, i32> {
        let small = |out: &mut Vec<u8>, body: &[u8]| {
            out.extend_from_slice(body);
            Ok(Answer::Small)
        };
        let read_only = self.export.read_only();
        match request {
            Request::Init {
                major,
                minor,
                max_readahead,
                flags,
            } => self.init(major, minor, max_readahead, flags, out),
            Request::Forget => Ok(Answer::Nothing),
            Request::Lookup { name } => {
                if node != ROOT_INO || name != FILE_NAME.as_bytes() {
                    return Err(libc::ENOENT);
                }
                let entry = abi::EntryOut {
                    nodeid: FILE_INO.into(),
                    entry_valid: TTL.as_secs().into(),
                    attr_valid: TTL.as_secs().into(),
                    attr: self.attr(FILE_INO).ok_or(libc::ENOENT)?,
                    ..Default::default()
                };
                small(out, entry.as_bytes())
            }
            Request::Getattr => small(out, self.attr_out(node)?.as_bytes()),
            Request::Setattr { size } => {
                // A volume's size is fixed; everything else about the file is not ours to
                // change, and asking is not an error.
                let attr = self.attr_out(node)?;
                if size.is_some_and(|size| size != attr.attr.size.get()) {
                    return Err(libc::EPERM);
                }
                small(out, attr.as_bytes())
            }
            Request::Open { flags } => {
                match node {
                    FILE_INO => {}
                    ROOT_INO => return Err(libc::EISDIR),
                    _ => return Err(libc::ENOENT),
                }
                if flags as i32 & libc::O_ACCMODE != libc::O_RDONLY && read_only {
                    return Err(libc::EROFS);
                }
                let open = abi::OpenOut {
                    open_flags: (abi::open_flags::DIRECT_IO
                        | abi::open_flags::PARALLEL_DIRECT_WRITES)
                        .into(),
                    ..Default::default()
                };
                small(out, open.as_bytes())
            }
            Request::Read { offset, size } => {
                self.file(node)?;
                if size > MAX_REQUEST {
                    return Err(libc::EINVAL);
                }
                let (offset, len) = self.clip(offset, size.into())?;
                let data = DATA_AT..DATA_AT + len as usize;
                self.export
                    .read(offset, &mut buf[data.clone()])
                    .map_err(|e| to_errno(&e))?;
                Ok(Answer::Data(data))
            }
            Request::Write {
                offset,
                payload,
                flags,
            } => {
                self.file(node)?;
                if read_only {
                    return Err(libc::EROFS);
                }
                let len = payload.len() as u64;
                match self.clip(offset, len)? {
                    (_, clipped) if clipped == len => {}
                    // A volume does not grow.
                    _ => return Err(libc::ENOSPC),
                }
                let fua = flags as i32 & (libc::O_SYNC | libc::O_DSYNC) != 0;
                let data = REQUEST_AT + payload.start..REQUEST_AT + payload.end;
                self.export
                    .write(offset, &buf[data], fua)
                    .map_err(|e| to_errno(&e))?;
                let written = abi::WriteOut {
                    size: (len as u32).into(),
                    ..Default::default()
                };
                small(out, written.as_bytes())
            }
            // FLUSH comes with each close of a descriptor of the file; FSYNC with each
            // flush of the loop device above.
            Request::Flush | Request::Fsync => {
                self.file(node)?;
                self.export.flush().map_err(|e| to_errno(&e))?;
                Ok(Answer::Small)
            }
            Request::Fallocate {
                offset,
                length,
                mode,
            } => {
                self.file(node)?;
                self.fallocate(offset, length, mode)
            }
            Request::Statfs => {
                let statfs = abi::StatfsOut {
                    bsize: 512.into(),
                    frsize: 512.into(),
                    namelen: 255.into(),
                    ..Default::default()
                };
                small(out, statfs.as_bytes())
            }
            Request::Opendir => {
                self.root(node)?;
                small(out, abi::OpenOut::default().as_bytes())
            }
            Request::Readdir { offset, size } => {
                self.root(node)?;
                let entries = [
                    (ROOT_INO, libc::DT_DIR, "."),
                    (ROOT_INO, libc::DT_DIR, ".."),
                    (FILE_INO, libc::DT_REG, FILE_NAME),
                ];
                let limit = (size as usize).min(MAX_REQUEST as usize);
                for (i, (ino, kind, name)) in entries.iter().enumerate() {
                    if (i as u64) < offset {
                        continue;
                    }
                    if !abi::push_dirent(out, limit, *ino, i as u64 + 1, (*kind).into(), name) {
                        break;
                    }
                }
                Ok(Answer::Small)
            }
            Request::Release | Request::Releasedir | Request::Fsyncdir | Request::Destroy => {
                Ok(Answer::Small)
            }
            Request::Unsupported { .. } => Err(libc::ENOSYS),
        }
    }

    fn init(
        &self,
        major: u32,
        minor: u32,
        max_readahead: u32,
        kernel_flags: u32,
        out: &mut Vec<u8>,
    ) -> Result<Answer, i32> {
        let mut reply = abi::InitOut {
            major: abi::KERNEL_MAJOR.into(),
            minor: abi::KERNEL_MINOR.into(),
            ..Default::default()
        };
        if major > abi::KERNEL_MAJOR {
            // The kernel asks again with our major version.
            out.extend_from_slice(&reply.as_bytes()[..8]);
            return Ok(Answer::Small);
        }
        if major < abi::KERNEL_MAJOR || minor < abi::OLDEST_MINOR {
            tracing::error!(
                "FUSE: the kernel speaks protocol {major}.{minor}; the FUSE front end needs \
                 {}.{} (Linux 4.20) or newer: attach with --via nbd",
                abi::KERNEL_MAJOR,
                abi::OLDEST_MINOR
            );
            return Err(libc::EPROTO);
        }
        use abi::init_flags::*;
        let flags = kernel_flags & (ASYNC_READ | BIG_WRITES | ASYNC_DIO | MAX_PAGES);
        reply.max_readahead = max_readahead.min(MAX_REQUEST).into();
        reply.flags = flags.into();
        reply.max_background = self.in_flight.into();
        reply.congestion_threshold = (self.in_flight / 4 * 3).max(1).into();
        reply.max_write = MAX_REQUEST.into();
        reply.time_gran = 1.into();
        reply.max_pages = ((MAX_REQUEST / 4096) as u16).into();
        tracing::debug!(
            "FUSE: protocol {major}.{minor}, flags {flags:#x} of {kernel_flags:#x}, \
             max_write {MAX_REQUEST}, max_background {}",
            self.in_flight
        );
        out.extend_from_slice(reply.as_bytes());
        Ok(Answer::Small)
    }

    fn fallocate(&self, offset: u64, length: u64, mode: u32) -> Result<Answer, i32> {
        let (offset, len) = self.clip(offset, length)?;
        let keep = libc::FALLOC_FL_KEEP_SIZE as u32;
        let punch = libc::FALLOC_FL_PUNCH_HOLE as u32;
        let zero = libc::FALLOC_FL_ZERO_RANGE as u32;
        let no_hole = match mode {
            // Plain allocation of a range inside the file: a volume is fully there.
            m if (m == 0 || m == keep) && len == length => return Ok(Answer::Small),
            m if m == punch | keep => false,
            m if m == zero || m == zero | keep => true,
            _ => return Err(libc::EOPNOTSUPP),
        };
        if self.export.read_only() {
            return Err(libc::EROFS);
        }
        let flags = ZeroFlags {
            fua: false,
            no_hole,
            fast: false,
        };
        self.export
            .write_zeroes(offset, len, flags)
            .map_err(|e| to_errno(&e))?;
        Ok(Answer::Small)
    }

    fn attr_out(&self, node: u64) -> Result<abi::AttrOut, i32> {
        Ok(abi::AttrOut {
            attr_valid: TTL.as_secs().into(),
            attr: self.attr(node).ok_or(libc::ENOENT)?,
            ..Default::default()
        })
    }

    fn file(&self, node: u64) -> Result<(), i32> {
        match node {
            FILE_INO => Ok(()),
            ROOT_INO => Err(libc::EISDIR),
            _ => Err(libc::ENOENT),
        }
    }

    fn root(&self, node: u64) -> Result<(), i32> {
        match node {
            ROOT_INO => Ok(()),
            FILE_INO => Err(libc::ENOTDIR),
            _ => Err(libc::ENOENT),
        }
    }
}

/// The reader threads of one mounted filesystem.
#[derive(Debug)]
pub struct Server {
    readers: Vec<JoinHandle<()>>,
}

impl Server {
    /// Serve `fs` on the mounted connection `session` with `readers` threads (named after
    /// `name`): the first uses `session`, the others clones of it.
    pub fn start(session: File, fs: VolumeFs, readers: usize, name: &str) -> io::Result<Server> {
        let readers = readers.max(1);
        let buffers = BufPool::new(BUFFER_SIZE, readers).map_err(io::Error::other)?;
        let mut devices = Vec::with_capacity(readers);
        for _ in 1..readers {
            devices.push(clone_fuse_device(&session)?);
        }
        devices.push(session);
        let fs = Arc::new(fs);
        let mut server = Server {
            readers: Vec::with_capacity(readers),
        };
        for (i, device) in devices.into_iter().enumerate() {
            let buf = buffers
                .take()
                .ok_or_else(|| io::Error::other("the FUSE buffer pool is short of a buffer"))?;
            let fs = fs.clone();
            let reader = std::thread::Builder::new()
                .name(format!("fuse-{name}-{i}"))
                .spawn(move || serve(&device, buf, &fs))?;
            server.readers.push(reader);
        }
        Ok(server)
    }

    /// Wait for every reader to stop: they do once the connection ends (the filesystem is
    /// unmounted, or the kernel aborted it).
    pub fn join(self) {
        for reader in self.readers {
            if reader.join().is_err() {
                tracing::error!("a FUSE reader thread panicked");
            }
        }
    }
}

/// One reader: read a request, answer it, until the connection ends.
fn serve(device: &File, mut buf: IoBuf, fs: &VolumeFs) {
    let mut out = Vec::with_capacity(4096);
    loop {
        let bytes = buf.as_mut_slice();
        let n = match (&*device).read(&mut bytes[REQUEST_AT..]) {
            Ok(n) => n,
            Err(err) => match err.raw_os_error() {
                // ENOENT: the request was interrupted before it could be read.
                Some(libc::ENOENT) | Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
                // The filesystem was unmounted or the connection aborted.
                Some(libc::ENODEV) | Some(libc::ECONNABORTED) => return,
                _ => {
                    tracing::error!("reading /dev/fuse: {err}; this reader stops");
                    return;
                }
            },
        };
        out.clear();
        let (unique, answer) = fs.handle(bytes, n, &mut out);
        let (error, body): (i32, &[u8]) = match answer {
            Answer::Nothing => continue,
            Answer::Error(errno) => (-errno, &[]),
            Answer::Small => (0, &out),
            Answer::Data(range) => (0, &bytes[range]),
        };
        let header = abi::OutHeader {
            len: ((size_of::<abi::OutHeader>() + body.len()) as u32).into(),
            error: error.into(),
            unique: unique.into(),
        };
        let reply = [IoSlice::new(header.as_bytes()), IoSlice::new(body)];
        match (&*device).write_vectored(&reply) {
            Ok(_) => {}
            // The request was interrupted or the connection ended meanwhile.
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {}
            Err(err) if err.raw_os_error() == Some(libc::ENODEV) => return,
            Err(err) => tracing::warn!("answering FUSE request {unique}: {err}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_nbd::file::FileExport;

    struct Harness {
        _dir: tempfile::TempDir,
        fs: VolumeFs,
        buf: Vec<u8>,
        out: Vec<u8>,
    }

    impl Harness {
        fn new(read_only: bool) -> Harness {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("backing");
            std::fs::write(&path, vec![9u8; 1 << 16]).unwrap();
            let export = Arc::new(FileExport::open(&path, false).unwrap());
            let export = Arc::new(Counted::new(export, read_only));
            Harness {
                _dir: dir,
                fs: VolumeFs::new(export, 0, 0, 8),
                buf: vec![0; BUFFER_SIZE],
                out: Vec::new(),
            }
        }

        /// Put a request with `body` (and `payload`) into the buffer and answer it.
        fn ask(&mut self, opcode: u32, node: u64, body: &[u8], payload: &[u8]) -> Answer {
            let header = abi::InHeader {
                len: ((40 + body.len() + payload.len()) as u32).into(),
                opcode: opcode.into(),
                unique: 99.into(),
                nodeid: node.into(),
                uid: 0.into(),
                gid: 0.into(),
                pid: 1.into(),
                total_extlen: 0.into(),
                padding: 0.into(),
            };
            let mut request = header.as_bytes().to_vec();
            request.extend_from_slice(body);
            request.extend_from_slice(payload);
            self.buf[REQUEST_AT..REQUEST_AT + request.len()].copy_from_slice(&request);
            self.out.clear();
            let (unique, answer) = self.fs.handle(&mut self.buf, request.len(), &mut self.out);
            assert_eq!(unique, 99);
            answer
        }
    }

    fn rw_in(offset: u64, size: u32) -> Vec<u8> {
        let mut body = vec![0u8; 40];
        body[8..16].copy_from_slice(&offset.to_ne_bytes());
        body[16..20].copy_from_slice(&size.to_ne_bytes());
        body
    }

    #[test]
    fn a_write_payload_lands_aligned_and_reads_back_from_the_aligned_data_area() {
        let mut h = Harness::new(false);
        assert_eq!(REQUEST_AT + abi::WRITE_PAYLOAD_AT, DATA_AT);
        let payload = vec![0xabu8; 8192];
        let answer = h.ask(abi::opcode::WRITE, FILE_INO, &rw_in(4096, 8192), &payload);
        assert_eq!(answer, Answer::Small);
        assert_eq!(h.out[..4], 8192u32.to_ne_bytes());
        let answer = h.ask(abi::opcode::READ, FILE_INO, &rw_in(0, 12288), &[]);
        assert_eq!(answer, Answer::Data(DATA_AT..DATA_AT + 12288));
        assert!(h.buf[DATA_AT..DATA_AT + 4096].iter().all(|&b| b == 9));
        assert!(h.buf[DATA_AT + 4096..DATA_AT + 12288]
            .iter()
            .all(|&b| b == 0xab));
    }

    #[test]
    fn reads_stop_at_the_end_and_writes_past_it_are_refused() {
        let mut h = Harness::new(false);
        let end = 1 << 16;
        let answer = h.ask(abi::opcode::READ, FILE_INO, &rw_in(end - 4096, 8192), &[]);
        assert_eq!(answer, Answer::Data(DATA_AT..DATA_AT + 4096));
        let answer = h.ask(abi::opcode::READ, FILE_INO, &rw_in(end + 1, 4096), &[]);
        assert_eq!(answer, Answer::Error(libc::EINVAL));
        let answer = h.ask(
            abi::opcode::WRITE,
            FILE_INO,
            &rw_in(end - 4096, 8192),
            &[1; 8192],
        );
        assert_eq!(answer, Answer::Error(libc::ENOSPC));
        let answer = h.ask(
            abi::opcode::READ,
            FILE_INO,
            &rw_in(0, MAX_REQUEST + 4096),
            &[],
        );
        assert_eq!(answer, Answer::Error(libc::EINVAL));
    }

    #[test]
    fn a_read_only_filesystem_refuses_writes_and_writable_opens() {
        let mut h = Harness::new(true);
        let answer = h.ask(abi::opcode::WRITE, FILE_INO, &rw_in(0, 4096), &[1; 4096]);
        assert_eq!(answer, Answer::Error(libc::EROFS));
        let open = (libc::O_RDWR as u32).to_ne_bytes();
        let answer = h.ask(abi::opcode::OPEN, FILE_INO, &[open, [0; 4]].concat(), &[]);
        assert_eq!(answer, Answer::Error(libc::EROFS));
        let answer = h.ask(abi::opcode::OPEN, FILE_INO, &[0; 8], &[]);
        assert_eq!(answer, Answer::Small);
        let flags = u32::from_ne_bytes(h.out[8..12].try_into().unwrap());
        assert_eq!(
            flags,
            abi::open_flags::DIRECT_IO | abi::open_flags::PARALLEL_DIRECT_WRITES
        );
        let mut fallocate = vec![0u8; 32];
        fallocate[16..24].copy_from_slice(&4096u64.to_ne_bytes());
        fallocate[24..28].copy_from_slice(
            &((libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u32).to_ne_bytes(),
        );
        let answer = h.ask(abi::opcode::FALLOCATE, FILE_INO, &fallocate, &[]);
        assert_eq!(answer, Answer::Error(libc::EROFS));
    }

    #[test]
    fn init_asks_for_big_parallel_requests_only_where_the_kernel_offers_them() {
        let mut h = Harness::new(false);
        let offered = abi::init_flags::ASYNC_DIO | abi::init_flags::MAX_PAGES | (1 << 16);
        let init = [7u32, 44, 128 << 10, offered]
            .map(u32::to_ne_bytes)
            .concat();
        assert_eq!(h.ask(abi::opcode::INIT, 0, &init, &[]), Answer::Small);
        let (reply, _) = abi::InitOut::read_from_prefix(&h.out).unwrap();
        assert_eq!(h.out.len(), 64);
        assert_eq!(
            (reply.major.get(), reply.minor.get()),
            (7, abi::KERNEL_MINOR)
        );
        assert_eq!(
            reply.flags.get(),
            abi::init_flags::ASYNC_DIO | abi::init_flags::MAX_PAGES
        );
        assert_eq!(reply.max_write.get(), MAX_REQUEST);
        assert_eq!(reply.max_pages.get(), 256);
        assert_eq!(reply.max_readahead.get(), 128 << 10);
        assert_eq!(reply.max_background.get(), 8);

        let old = [7u32, 27, 0, offered].map(u32::to_ne_bytes).concat();
        assert_eq!(
            h.ask(abi::opcode::INIT, 0, &old, &[]),
            Answer::Error(libc::EPROTO)
        );
        let newer = [8u32, 0, 0, 0].map(u32::to_ne_bytes).concat();
        assert_eq!(h.ask(abi::opcode::INIT, 0, &newer, &[]), Answer::Small);
        assert_eq!(
            h.out,
            [7u32, abi::KERNEL_MINOR].map(u32::to_ne_bytes).concat()
        );
    }

    #[test]
    fn lookups_find_only_the_volume_and_unknown_requests_get_enosys() {
        let mut h = Harness::new(false);
        let answer = h.ask(abi::opcode::LOOKUP, ROOT_INO, b"volume\0", &[]);
        assert_eq!(answer, Answer::Small);
        let (entry, _) = abi::EntryOut::read_from_prefix(&h.out).unwrap();
        assert_eq!(entry.nodeid.get(), FILE_INO);
        assert_eq!(entry.attr.size.get(), 1 << 16);
        assert_eq!(entry.attr.mode.get(), libc::S_IFREG | 0o600);
        let answer = h.ask(abi::opcode::LOOKUP, ROOT_INO, b"other\0", &[]);
        assert_eq!(answer, Answer::Error(libc::ENOENT));
        let answer = h.ask(abi::opcode::GETATTR, 77, &[0; 16], &[]);
        assert_eq!(answer, Answer::Error(libc::ENOENT));
        assert_eq!(
            h.ask(abi::opcode::INTERRUPT, 0, &[0; 8], &[]),
            Answer::Error(libc::ENOSYS)
        );
        assert_eq!(h.ask(1234, FILE_INO, &[], &[]), Answer::Error(libc::ENOSYS));
        assert_eq!(
            h.ask(abi::opcode::FORGET, FILE_INO, &[0; 8], &[]),
            Answer::Nothing
        );
        let mut size = vec![0u8; 88];
        size[..4].copy_from_slice(&abi::FATTR_SIZE.to_ne_bytes());
        assert_eq!(
            h.ask(abi::opcode::SETATTR, FILE_INO, &size, &[]),
            Answer::Error(libc::EPERM)
        );
    }

    #[test]
    fn a_readdir_lists_the_volume_and_resumes_at_its_offset() {
        let mut h = Harness::new(false);
        assert_eq!(
            h.ask(abi::opcode::READDIR, ROOT_INO, &rw_in(0, 4096), &[]),
            Answer::Small
        );
        assert_eq!(h.out.len(), 3 * 32);
        assert_eq!(&h.out[64 + 24..64 + 30], b"volume");
        assert_eq!(
            h.ask(abi::opcode::READDIR, ROOT_INO, &rw_in(3, 4096), &[]),
            Answer::Small
        );
        assert!(h.out.is_empty());
        assert_eq!(
            h.ask(abi::opcode::READDIR, FILE_INO, &rw_in(0, 4096), &[]),
            Answer::Error(libc::ENOTDIR)
        );
    }
}
