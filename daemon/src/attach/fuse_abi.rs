//! The FUSE kernel protocol (`<linux/fuse.h>`, protocol 7.x) as pure code: the request
//! and reply layouts the volume filesystem uses, and a parser that turns the bytes one
//! `read(2)` of `/dev/fuse` returned into a [`Request`], checking every length first.
//! No I/O here; [`super::fuse_server`] reads and answers.
//!
//! Every message is native-endian (the kernel and this process share a CPU). A request is
//! a `fuse_in_header` followed by an opcode-specific body:
//!
//! ```text
//! fuse_in_header (40 bytes)       fuse_write_in (40 bytes)          WRITE payload
//! 0 len  4 opcode  8 unique       40 fh  48 offset  56 size         80 ...
//! 16 nodeid  24 uid 28 gid 32 pid 60 write_flags 64 lock_owner
//! 36 total_extlen 38 padding      72 flags  76 padding
//! ```
//!
//! and a reply is a `fuse_out_header` (`len`, `-errno`, `unique`: 16 bytes) followed by
//! the opcode's reply body, written in one `writev(2)`.

use zerocopy::native_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The protocol major version this server speaks.
pub const KERNEL_MAJOR: u32 = 7;
/// The minor version it implements (Linux 6.1's `<linux/fuse.h>`).
pub const KERNEL_MINOR: u32 = 38;
/// The oldest minor version it accepts: 7.28 (Linux 4.20) brought `max_pages`, without
/// which requests stay at 128 KiB.
pub const OLDEST_MINOR: u32 = 28;

/// The root directory's node id.
pub const ROOT_ID: u64 = 1;

/// Opcodes (`enum fuse_opcode`).
pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
}

/// `FUSE_INIT` flags this server asks for (each only where the kernel offers it).
pub mod init_flags {
    /// Reads may be sent in parallel.
    pub const ASYNC_READ: u32 = 1 << 0;
    /// Writes larger than a page.
    pub const BIG_WRITES: u32 = 1 << 5;
    /// Asynchronous direct I/O: the loop driver's requests queue up instead of waiting
    /// one by one.
    pub const ASYNC_DIO: u32 = 1 << 15;
    /// `max_pages` in the reply is honoured: 1 MiB requests instead of 128 KiB.
    pub const MAX_PAGES: u32 = 1 << 22;
}

/// `FOPEN_*` flags of an OPEN reply.
pub mod open_flags {
    /// Bypass the page cache: the loop device above caches.
    pub const DIRECT_IO: u32 = 1 << 0;
    /// Direct writes to the file run in parallel instead of under the inode lock.
    pub const PARALLEL_DIRECT_WRITES: u32 = 1 << 6;
}

/// `FATTR_SIZE` of `fuse_setattr_in.valid`.
pub const FATTR_SIZE: u32 = 1 << 3;

/// `fuse_in_header`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct InHeader {
    pub len: U32,
    pub opcode: U32,
    pub unique: U64,
    pub nodeid: U64,
    pub uid: U32,
    pub gid: U32,
    pub pid: U32,
    pub total_extlen: U16,
    pub padding: U16,
}

/// `fuse_out_header`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct OutHeader {
    pub len: U32,
    /// Zero or a negated errno.
    pub error: zerocopy::native_endian::I32,
    pub unique: U64,
}

/// The first, always-present part of `fuse_init_in`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct InitIn {
    pub major: U32,
    pub minor: U32,
    pub max_readahead: U32,
    pub flags: U32,
}

/// `fuse_init_out` (64 bytes since 7.23).
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct InitOut {
    pub major: U32,
    pub minor: U32,
    pub max_readahead: U32,
    pub flags: U32,
    pub max_background: U16,
    pub congestion_threshold: U16,
    pub max_write: U32,
    pub time_gran: U32,
    pub max_pages: U16,
    pub map_alignment: U16,
    pub flags2: U32,
    pub unused: [U32; 7],
}

/// `fuse_attr`.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Attr {
    pub ino: U64,
    pub size: U64,
    pub blocks: U64,
    pub atime: U64,
    pub mtime: U64,
    pub ctime: U64,
    pub atimensec: U32,
    pub mtimensec: U32,
    pub ctimensec: U32,
    pub mode: U32,
    pub nlink: U32,
    pub uid: U32,
    pub gid: U32,
    pub rdev: U32,
    pub blksize: U32,
    pub flags: U32,
}

/// `fuse_entry_out`: a LOOKUP reply.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct EntryOut {
    pub nodeid: U64,
    pub generation: U64,
    pub entry_valid: U64,
    pub attr_valid: U64,
    pub entry_valid_nsec: U32,
    pub attr_valid_nsec: U32,
    pub attr: Attr,
}

/// `fuse_attr_out`: a GETATTR and SETATTR reply.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct AttrOut {
    pub attr_valid: U64,
    pub attr_valid_nsec: U32,
    pub dummy: U32,
    pub attr: Attr,
}

/// `fuse_setattr_in`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SetattrIn {
    pub valid: U32,
    pub padding: U32,
    pub fh: U64,
    pub size: U64,
    pub lock_owner: U64,
    pub atime: U64,
    pub mtime: U64,
    pub ctime: U64,
    pub atimensec: U32,
    pub mtimensec: U32,
    pub ctimensec: U32,
    pub mode: U32,
    pub unused4: U32,
    pub uid: U32,
    pub gid: U32,
    pub unused5: U32,
}

/// `fuse_open_in` (OPEN and OPENDIR).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct OpenIn {
    pub flags: U32,
    pub open_flags: U32,
}

/// `fuse_open_out`.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct OpenOut {
    pub fh: U64,
    pub open_flags: U32,
    pub padding: U32,
}

/// `fuse_read_in` (READ and READDIR).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ReadIn {
    pub fh: U64,
    pub offset: U64,
    pub size: U32,
    pub read_flags: U32,
    pub lock_owner: U64,
    pub flags: U32,
    pub padding: U32,
}

/// `fuse_write_in`; the payload follows it.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct WriteIn {
    pub fh: U64,
    pub offset: U64,
    pub size: U32,
    pub write_flags: U32,
    pub lock_owner: U64,
    /// The open flags of the file written through (O_SYNC, O_DSYNC).
    pub flags: U32,
    pub padding: U32,
}

/// `fuse_write_out`.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct WriteOut {
    pub size: U32,
    pub padding: U32,
}

/// `fuse_fallocate_in`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct FallocateIn {
    pub fh: U64,
    pub offset: U64,
    pub length: U64,
    pub mode: U32,
    pub padding: U32,
}

/// `fuse_kstatfs` (the STATFS reply).
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct StatfsOut {
    pub blocks: U64,
    pub bfree: U64,
    pub bavail: U64,
    pub files: U64,
    pub ffree: U64,
    pub bsize: U32,
    pub namelen: U32,
    pub frsize: U32,
    pub padding: U32,
    pub spare: [U32; 6],
}

/// The fixed part of `fuse_dirent`; the name and padding to 8 bytes follow.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Dirent {
    pub ino: U64,
    pub off: U64,
    pub namelen: U32,
    pub kind: U32,
}

const _: () = {
    assert!(size_of::<InHeader>() == 40);
    assert!(size_of::<OutHeader>() == 16);
    assert!(size_of::<InitOut>() == 64);
    assert!(size_of::<Attr>() == 88);
    assert!(size_of::<EntryOut>() == 128);
    assert!(size_of::<AttrOut>() == 104);
    assert!(size_of::<SetattrIn>() == 88);
    assert!(size_of::<ReadIn>() == 40);
    assert!(size_of::<WriteIn>() == 40);
    assert!(size_of::<FallocateIn>() == 32);
    assert!(size_of::<StatfsOut>() == 80);
    assert!(size_of::<Dirent>() == 24);
};

/// Where a WRITE's payload starts in the request.
pub const WRITE_PAYLOAD_AT: usize = size_of::<InHeader>() + size_of::<WriteIn>();

/// One parsed request. Ranges index the request bytes given to [`parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Protocol negotiation, the first request of a connection.
    Init {
        major: u32,
        minor: u32,
        max_readahead: u32,
        flags: u32,
    },
    /// Look `name` up in the directory `parent`.
    Lookup {
        name: Vec<u8>,
    },
    /// The kernel dropped cached references (FORGET, BATCH_FORGET): no reply.
    Forget,
    Getattr,
    /// Change attributes; `size` is the new size if one is asked for.
    Setattr {
        size: Option<u64>,
    },
    Open {
        flags: u32,
    },
    Read {
        offset: u64,
        size: u32,
    },
    /// Write the payload at `payload` (a range of the request) to `offset`.
    Write {
        offset: u64,
        payload: std::ops::Range<usize>,
        flags: u32,
    },
    Statfs,
    Release,
    Fsync,
    Flush,
    Opendir,
    Readdir {
        offset: u64,
        size: u32,
    },
    Releasedir,
    Fsyncdir,
    Fallocate {
        offset: u64,
        length: u64,
        mode: u32,
    },
    /// The connection ends (sent for block-device FUSE only; answered all the same).
    Destroy,
    /// Anything else: answered ENOSYS, which the kernel remembers for most opcodes.
    Unsupported {
        opcode: u32,
    },
}

/// Why request bytes could not be parsed. The request is answered with `errno()` (if its
/// header could be read: see [`parse`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Fewer bytes than a request header.
    #[error("a FUSE request of {0} bytes is shorter than its header")]
    NoHeader(usize),
    /// The header's length disagrees with the bytes read.
    #[error("a FUSE request says it has {said} bytes but {read} were read")]
    Length { said: usize, read: usize },
    /// The body is shorter than the opcode's structure, or a WRITE's payload is not the
    /// size it claims.
    #[error("a FUSE request (opcode {opcode}) has a {len}-byte body, too short or inconsistent")]
    Body { opcode: u32, len: usize },
}

impl ParseError {
    /// The errno a parse error is answered with.
    pub fn errno(&self) -> i32 {
        libc::EINVAL
    }
}

/// The header of `bytes` (what one read of /dev/fuse returned), checked against the
/// length read, or why it is unusable.
pub fn header(bytes: &[u8]) -> Result<InHeader, ParseError> {
    let (header, _) =
        InHeader::read_from_prefix(bytes).map_err(|_| ParseError::NoHeader(bytes.len()))?;
    let said = header.len.get() as usize;
    if said != bytes.len() {
        return Err(ParseError::Length {
            said,
            read: bytes.len(),
        });
    }
    Ok(header)
}

fn body<T: FromBytes>(opcode: u32, body: &[u8]) -> Result<T, ParseError> {
    T::read_from_prefix(body)
        .map(|(value, _)| value)
        .map_err(|_| ParseError::Body {
            opcode,
            len: body.len(),
        })
}

/// Parse one request whose header [`header`] accepted.
pub fn parse(header: &InHeader, bytes: &[u8]) -> Result<Request, ParseError> {
    let opcode = header.opcode.get();
    let at = size_of::<InHeader>();
    let rest = &bytes[at.min(bytes.len())..];
    let request = match opcode {
        opcode::INIT => {
            let init: InitIn = body(opcode, rest)?;
            Request::Init {
                major: init.major.get(),
                minor: init.minor.get(),
                max_readahead: init.max_readahead.get(),
                flags: init.flags.get(),
            }
        }
        opcode::LOOKUP => {
            // A NUL-terminated name.
            let end = rest.iter().position(|&b| b == 0).ok_or(ParseError::Body {
                opcode,
                len: rest.len(),
            })?;
            Request::Lookup {
                name: rest[..end].to_vec(),
            }
        }
        opcode::FORGET | opcode::BATCH_FORGET => Request::Forget,
        opcode::GETATTR => Request::Getattr,
        opcode::SETATTR => {
            let set: SetattrIn = body(opcode, rest)?;
            let size = (set.valid.get() & FATTR_SIZE != 0).then(|| set.size.get());
            Request::Setattr { size }
        }
        opcode::OPEN => {
            let open: OpenIn = body(opcode, rest)?;
            Request::Open {
                flags: open.flags.get(),
            }
        }
        opcode::READ => {
            let read: ReadIn = body(opcode, rest)?;
            Request::Read {
                offset: read.offset.get(),
                size: read.size.get(),
            }
        }
        opcode::WRITE => {
            let write: WriteIn = body(opcode, rest)?;
            let size = write.size.get() as usize;
            if bytes.len() != WRITE_PAYLOAD_AT + size {
                return Err(ParseError::Body {
                    opcode,
                    len: rest.len(),
                });
            }
            Request::Write {
                offset: write.offset.get(),
                payload: WRITE_PAYLOAD_AT..WRITE_PAYLOAD_AT + size,
                flags: write.flags.get(),
            }
        }
        opcode::STATFS => Request::Statfs,
        opcode::RELEASE => Request::Release,
        opcode::FSYNC => Request::Fsync,
        opcode::FLUSH => Request::Flush,
        opcode::OPENDIR => Request::Opendir,
        opcode::READDIR => {
            let read: ReadIn = body(opcode, rest)?;
            Request::Readdir {
                offset: read.offset.get(),
                size: read.size.get(),
            }
        }
        opcode::RELEASEDIR => Request::Releasedir,
        opcode::FSYNCDIR => Request::Fsyncdir,
        opcode::FALLOCATE => {
            let fa: FallocateIn = body(opcode, rest)?;
            Request::Fallocate {
                offset: fa.offset.get(),
                length: fa.length.get(),
                mode: fa.mode.get(),
            }
        }
        opcode::DESTROY => Request::Destroy,
        // Answering ENOSYS tells the kernel not to send more interrupts; the requests it
        // would interrupt finish on their own.
        opcode::INTERRUPT => Request::Unsupported { opcode },
        other => Request::Unsupported { opcode: other },
    };
    Ok(request)
}

/// Append one directory entry to `out` if it fits in `limit` bytes; false when it does not.
pub fn push_dirent(
    out: &mut Vec<u8>,
    limit: usize,
    ino: u64,
    next: u64,
    kind: u32,
    name: &str,
) -> bool {
    let len = size_of::<Dirent>() + name.len();
    let padded = len.next_multiple_of(8);
    if out.len() + padded > limit {
        return false;
    }
    let entry = Dirent {
        ino: ino.into(),
        off: next.into(),
        namelen: (name.len() as u32).into(),
        kind: kind.into(),
    };
    out.extend_from_slice(entry.as_bytes());
    out.extend_from_slice(name.as_bytes());
    out.resize(out.len() + padded - len, 0);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(opcode: u32, body: &[u8]) -> Vec<u8> {
        let header = InHeader {
            len: ((size_of::<InHeader>() + body.len()) as u32).into(),
            opcode: opcode.into(),
            unique: 7.into(),
            nodeid: 2.into(),
            uid: 0.into(),
            gid: 0.into(),
            pid: 1.into(),
            total_extlen: 0.into(),
            padding: 0.into(),
        };
        let mut bytes = header.as_bytes().to_vec();
        bytes.extend_from_slice(body);
        bytes
    }

    fn parsed(bytes: &[u8]) -> Result<Request, ParseError> {
        parse(&header(bytes)?, bytes)
    }

    fn write_in(offset: u64, size: u32, flags: u32) -> WriteIn {
        WriteIn {
            fh: 0.into(),
            offset: offset.into(),
            size: size.into(),
            write_flags: 0.into(),
            lock_owner: 0.into(),
            flags: flags.into(),
            padding: 0.into(),
        }
    }

    #[test]
    fn a_write_names_its_payload_right_after_the_two_headers() {
        let mut body = write_in(8192, 5, libc::O_DSYNC as u32).as_bytes().to_vec();
        body.extend_from_slice(b"hello");
        let bytes = request(opcode::WRITE, &body);
        let Request::Write {
            offset,
            payload,
            flags,
        } = parsed(&bytes).unwrap()
        else {
            panic!("not a write");
        };
        assert_eq!((offset, flags), (8192, libc::O_DSYNC as u32));
        assert_eq!(&bytes[payload], b"hello");
    }

    #[test]
    fn a_write_whose_payload_is_not_its_size_is_refused() {
        let mut body = write_in(0, 4096, 0).as_bytes().to_vec();
        body.extend_from_slice(&[0; 100]);
        let bytes = request(opcode::WRITE, &body);
        let err = parsed(&bytes).unwrap_err();
        assert!(matches!(err, ParseError::Body { opcode: 16, .. }), "{err}");
        assert_eq!(err.errno(), libc::EINVAL);
    }

    #[test]
    fn short_and_mislabelled_requests_are_errors_not_panics() {
        assert_eq!(parsed(&[0; 10]).unwrap_err(), ParseError::NoHeader(10));
        let mut bytes = request(opcode::READ, &[0; 40]);
        bytes.truncate(60);
        assert!(matches!(
            parsed(&bytes).unwrap_err(),
            ParseError::Length { said: 80, read: 60 }
        ));
        for op in [
            opcode::INIT,
            opcode::READ,
            opcode::WRITE,
            opcode::SETATTR,
            opcode::OPEN,
            opcode::FALLOCATE,
            opcode::READDIR,
        ] {
            let bytes = request(op, &[1, 2, 3]);
            assert!(
                matches!(parsed(&bytes), Err(ParseError::Body { .. })),
                "opcode {op}"
            );
        }
        let unterminated = request(opcode::LOOKUP, b"volume");
        assert!(matches!(
            parsed(&unterminated),
            Err(ParseError::Body { .. })
        ));
    }

    #[test]
    fn every_truncation_of_every_request_parses_or_fails_cleanly() {
        let mut write = write_in(0, 3, 0).as_bytes().to_vec();
        write.extend_from_slice(b"abc");
        let bodies: Vec<(u32, Vec<u8>)> = vec![
            (
                opcode::INIT,
                [7u32, 40, 1 << 20, u32::MAX].map(u32::to_ne_bytes).concat(),
            ),
            (opcode::LOOKUP, b"volume\0".to_vec()),
            (opcode::WRITE, write),
            (opcode::READ, vec![0xff; 40]),
            (opcode::SETATTR, vec![0xff; 88]),
            (opcode::FALLOCATE, vec![0xff; 32]),
        ];
        for (op, body) in bodies {
            let full = request(op, &body);
            for cut in 0..=full.len() {
                let mut bytes = full[..cut].to_vec();
                if cut >= 4 {
                    bytes[..4].copy_from_slice(&(cut as u32).to_ne_bytes());
                }
                let _ = parsed(&bytes);
            }
        }
    }

    #[test]
    fn unknown_opcodes_and_interrupts_are_unsupported() {
        for op in [opcode::INTERRUPT, 5, 39, 4096, u32::MAX] {
            assert_eq!(
                parsed(&request(op, &[])).unwrap(),
                Request::Unsupported { opcode: op }
            );
        }
        assert_eq!(
            parsed(&request(opcode::FORGET, &[0; 8])).unwrap(),
            Request::Forget
        );
        assert_eq!(
            parsed(&request(opcode::BATCH_FORGET, &[])).unwrap(),
            Request::Forget
        );
    }

    #[test]
    fn a_setattr_reports_a_size_only_when_it_sets_one() {
        let mut set = vec![0u8; 88];
        set[16..24].copy_from_slice(&77u64.to_ne_bytes());
        assert_eq!(
            parsed(&request(opcode::SETATTR, &set)).unwrap(),
            Request::Setattr { size: None }
        );
        set[..4].copy_from_slice(&FATTR_SIZE.to_ne_bytes());
        assert_eq!(
            parsed(&request(opcode::SETATTR, &set)).unwrap(),
            Request::Setattr { size: Some(77) }
        );
    }

    #[test]
    fn directory_entries_are_padded_to_eight_bytes_and_stop_at_the_limit() {
        let mut out = Vec::new();
        assert!(push_dirent(
            &mut out,
            4096,
            2,
            3,
            libc::DT_REG.into(),
            "volume"
        ));
        assert_eq!(out.len(), 32);
        assert_eq!(&out[24..30], b"volume");
        assert!(!push_dirent(&mut out, 40, 1, 4, libc::DT_DIR.into(), ".."));
        assert_eq!(out.len(), 32);
    }
}
